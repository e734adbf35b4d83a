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
