"""benchmarks/audit.py run twice on one --workdir (auditwalk N1, stop 56): the second ended in train()'s TrainError
traceback ("'DIR/run' already holds a run"), and a report.json left in DIR/report would have been read as that of an
audit that stopped early (exit 2 or 4), which then "met" its target. Now one line naming --workdir, exit 2, before
any work."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _benchmark():
    spec = importlib.util.spec_from_file_location("audit_bench_workdir", ROOT / "benchmarks" / "audit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("left", ["run", "report"])
def test_a_workdir_of_an_earlier_benchmark_is_one_line_before_any_work(tmp_path, capsys, left):
    b = _benchmark()
    b.make_run = lambda workdir: pytest.fail("made a run")
    (tmp_path / left).mkdir()
    assert b.main(["--workdir", str(tmp_path), "--threads", "1"]) == 2
    captured = capsys.readouterr()
    [err] = captured.err.strip().splitlines()
    assert err.startswith(f"audit.py: error: argument --workdir: {str(tmp_path)!r} already holds {left} ") and \
        not captured.out, err


def test_a_report_beside_an_audit_that_stopped_early_is_not_its_verdict(tmp_path, capsys, monkeypatch):
    import cli.main

    b = _benchmark()
    b.make_run = lambda workdir: workdir / "run"

    def refused(argv):   # exit 2: wrote nothing; a report.json appears there all the same (another process's)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir()
        (out / "report.json").write_text(json.dumps({"verdict": "PASS", "timing_s": {}, "canary_audit": None,
                                                     "claimed_plan": {"epsilon": 10.0}}))
        return 2

    monkeypatch.setattr(cli.main, "main", refused)
    assert b.main(["--workdir", str(tmp_path / "w"), "--threads", "1"]) == 1
    line = json.loads(capsys.readouterr().out)
    assert line["exit_code"] == 2 and line["within_target"] is None, line
