"""benchmarks/audit.py: its options, and its line for a report without a canary audit."""
import os

import pytest


def test_audit_benchmark_refuses_zero_threads(load_benchmark, option_refused):
    # --threads 0 trained nothing and died in torch.set_num_threads with a RuntimeError traceback.
    b = load_benchmark("audit")
    b.make_run = lambda workdir: pytest.fail("made a run")
    option_refused(b, "audit.py", "--threads", "0")


def test_audit_benchmark_prints_its_line_for_a_fail_whose_canary_audit_stopped(load_benchmark, tmp_path, capsys,
                                                                                monkeypatch):
    """r2 N2 (stop 54): a FAIL report whose canary audit stopped has `canary_audit` null, and the benchmark died in
    a TypeError indexing it, after the audit had run; its line says null for the canary's figures."""
    import json

    import cli.main

    b = load_benchmark("audit")
    b.make_run = lambda workdir: workdir / "run"

    def audit(argv):
        out = argv[argv.index("--out") + 1]
        os.makedirs(out)
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump({"verdict": "FAIL", "timing_s": {"mechanism": 1.0}, "canary_audit": None,
                       "claimed_plan": {"epsilon": 10.0}}, f)
        return 1

    monkeypatch.setattr(cli.main, "main", audit)
    assert b.main(["--workdir", str(tmp_path), "--threads", "1"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["verdict"] == "FAIL" and line["exit_code"] == 1 and line["training_s"] == {}, line
    assert line["max_epsilon_lower_bound"] is None and line["plan_epsilon"] == 10.0, line


@pytest.mark.parametrize("report", [None, {"verdict": None, "timing_s": {}}])
def test_audit_benchmark_fails_when_the_audit_reached_no_verdict(load_benchmark, tmp_path, capsys, monkeypatch,
                                                                report):
    """h156 F2 (stop 55): an audit that stopped early (exit 2 or 4, no report, or one without a verdict) printed
    "within_target": true and the benchmark exited 0: a crashed audit met its 20-minute target."""
    import json

    import cli.main

    b = load_benchmark("audit")
    b.make_run = lambda workdir: workdir / "run"

    def audit(argv):
        if report is not None:
            out = argv[argv.index("--out") + 1]
            os.makedirs(out)
            with open(os.path.join(out, "report.json"), "w") as f:
                json.dump(report, f)
        return 4

    monkeypatch.setattr(cli.main, "main", audit)
    assert b.main(["--workdir", str(tmp_path), "--threads", "1"]) == 1
    captured = capsys.readouterr()
    line = json.loads(captured.out)
    assert line["exit_code"] == 4 and line["verdict"] is None and line["within_target"] is None, line
    [err] = captured.err.strip().splitlines()
    assert "exited 4 without a verdict" in err, err
