"""benchmarks/plan.py (run by `make bench`): its options and the ratio it prints."""
import pytest


@pytest.mark.parametrize("flag", ["--repeats", "--opacus-repeats"])
def test_plan_benchmark_refuses_zero_repeats(load_benchmark, option_refused, flag):
    # 0 ended in statistics.StatisticsError (a median of no timings); --opacus-repeats 0 only after running
    # `dpdm plan` three times first.
    b = load_benchmark("plan")
    b.time_dpdm = b.time_opacus = lambda *a: pytest.fail("ran a plan")
    option_refused(b, "plan.py", flag, "0")


def test_plan_benchmark_ratio_is_dpdm_time_over_opacus_time(load_benchmark, monkeypatch, capsys, tmp_path):
    # h88 F5: no test reached the ratio, so an inverted one (opacus / dpdm) passed. Stubbed timings: dpdm 1 s,
    # opacus 4 s whole-process (0.5 s in its call) -> 0.25, against the target <= 0.333; against the call alone
    # (h100: the whole-process ratio is mostly opacus's torch import) -> 2.
    import sys

    import accounting

    b = load_benchmark("plan")
    b.DPDM = tmp_path / "dpdm"
    b.DPDM.write_text("")
    b.time_dpdm = lambda eps: (1.0, 1.0)
    b.time_opacus = lambda eps, q, steps: (4.0, 0.5, 1.1)
    b.opacus_installed = lambda: True    # whether the venv has the bench extra or not
    monkeypatch.setattr(accounting, "calibrate_noise_multiplier", lambda **kw: 1.0)
    monkeypatch.setattr(accounting, "compute_epsilon", lambda **kw: 1.0)
    monkeypatch.setattr(sys, "argv", ["plan.py", "--repeats", "1"])
    b.main()
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out[2:2 + len(b.EPSILONS)]]
    assert [(r[7], r[8], r[9], r[10], r[11]) for r in rows] == [("1.00", "4.00", "0.50", "0.250", "2.000")] * len(
        b.EPSILONS)
    assert out[1].split()[-3:] == ["ratio", "vs", "call"]
    assert "median dpdm/opacus time ratio: 0.250 (target <= 0.333, whole processes); against opacus's call alone " \
           "(no import): 2.000;" in out[-1]


def test_plan_benchmark_outside_the_venv_is_one_line(load_benchmark, monkeypatch, capsys, tmp_path):
    # h100: run with a python that has no dpdm command beside it, a FileNotFoundError traceback once timing began.
    import sys

    b = load_benchmark("plan")
    b.DPDM = tmp_path / "dpdm"
    b.time_dpdm = b.time_opacus = lambda *a: pytest.fail("timed a plan")
    monkeypatch.setattr(sys, "argv", ["plan.py"])
    with pytest.raises(SystemExit) as e:
        b.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and f"no dpdm command beside {sys.executable}" in err[0], err


def test_plan_benchmark_runs_the_code_of_its_own_tree(load_benchmark, monkeypatch, tmp_path):
    # h113 F3: plan.py put only benchmarks/ on sys.path, and its `dpdm plan` ran the venv's command as installed:
    # a second checkout sharing the venv timed another tree's code. Its own accounting (a copy of the benchmark
    # beside an accounting that stops when imported), and its `dpdm plan` on the tree's code first.
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.benchmarks.conftest import run_beside_stand_in

    root = Path(__file__).resolve().parents[2]
    proc = run_beside_stand_in(tmp_path, "plan.py", "accounting", "imported the accounting beside it", "--repeats", "1")
    assert "imported the accounting beside it" in proc.stderr, proc.stdout + proc.stderr[-2000:]

    b = load_benchmark("plan")
    seen = {}

    def run(cmd, **kw):
        seen.update(kw)
        return subprocess.CompletedProcess(cmd, 0, stdout='{"noise_multiplier": 1.5}', stderr="")

    monkeypatch.setattr(b.subprocess, "run", run)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    assert b.time_dpdm(1.0)[1] == 1.5
    assert seen["env"]["PYTHONPATH"].split(os.pathsep) == [str(root), "/elsewhere"]


def test_plan_benchmark_without_opacus_is_one_line_naming_it(load_benchmark, monkeypatch, capsys, tmp_path):
    # h156 F3 (stop 55): without opacus, its child failed after dpdm's plans at epsilon 0.2, and check=True ended in a
    # CalledProcessError traceback that dropped the child's stderr (ModuleNotFoundError was nowhere in the output).
    import importlib.util
    import sys

    b = load_benchmark("plan")
    b.DPDM = tmp_path / "dpdm"
    b.DPDM.write_text("")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "opacus" else find_spec(name, *a))
    b.time_dpdm = b.time_opacus = lambda *a: pytest.fail("timed a plan")
    monkeypatch.setattr(sys, "argv", ["plan.py"])
    with pytest.raises(SystemExit) as e:
        b.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "opacus is not installed" in err[0] and ".[bench]" in err[0] and "make bench" in err[0], err


@pytest.mark.parametrize("side", ["dpdm", "opacus"])
def test_plan_benchmark_a_failed_side_is_one_line_with_its_error(load_benchmark, monkeypatch, capsys, tmp_path, side):
    # h156 F3: a child that failed (say opacus broken at import) was a traceback ending in "returned non-zero exit
    # status 1", its stderr captured and dropped; now one line naming the side and the child's last error line.
    import subprocess
    import sys

    b = load_benchmark("plan")
    b.DPDM = tmp_path / "dpdm"
    b.DPDM.write_text("")
    b.opacus_installed = lambda: True

    def run(cmd, **kw):
        if (side == "dpdm") == (cmd[0] == str(b.DPDM)):
            return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="Traceback ...\nImportError: broken here\n")
        out = '{"noise_multiplier": 1.0}' if cmd[0] == str(b.DPDM) else '{"sigma": 1.0, "import_s": 1, "call_s": 1}'
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

    monkeypatch.setattr(b.subprocess, "run", run)
    monkeypatch.setattr(sys, "argv", ["plan.py", "--repeats", "1"])
    with pytest.raises(SystemExit) as e:
        b.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    name = "dpdm plan --eps 0.2" if side == "dpdm" else "opacus get_noise_multiplier (eps 0.2)"
    assert err[0] == f"plan.py: error: {name} failed (exit 1): ImportError: broken here", err
