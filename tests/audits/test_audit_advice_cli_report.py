"""Kill tests of review r2 (stop 56) for `dpdm audit`'s power advice and --out identity, end to end on a tiny
3-step private run (the mechanism checks and plots stubbed out, as tests/cli/test_audit_power_and_out.py does):
the warning before training states the ceiling the verdict's reason states (this audit's coins, its per-attack
level); report.json's power is that of the canary run the audit trained (--steps 2 of 3); and the same run named
through a symbolic link is the same run (its report is replaced, not kept as another run's)."""

import json
import re

import pytest

from cli.main import main
from tests.cli.test_audit_power_and_out import _train, digits_npz, no_mechanism_checks, no_plots  # noqa: F401


@pytest.fixture(scope="module")
def run_b(tmp_path_factory):
    """A finished 3-step private run of epsilon 30.3 at delta 1e-5 (sigma 0.3) on 64 8x8 digits."""
    root = tmp_path_factory.mktemp("s56r2_audit")
    return _train(root, *digits_npz(root), 0.3, 1e-5, "run_b")[0]


@pytest.fixture
def fast(no_mechanism_checks, no_plots):
    """The mechanism checks and the plots stubbed out (tests/cli/test_audit_power_and_out.py)."""


def test_the_warning_and_the_reason_agree_and_the_power_is_the_canary_runs(run_b, tmp_path, capsys, fast):
    out = tmp_path / "report"
    # --seed 0 includes 11 of 24 canaries: this audit's ceiling is below fair coins' (12 of 24).
    rc = main(["audit", "--run", str(run_b), "--out", str(out), "--canaries", "24", "--steps", "2",
               "--background", "32"])
    err = capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert rc == 3, err
    can = report["canary_audit"]
    [warning] = [line for line in err.splitlines() if line.startswith("dpdm: warning: with 24 canaries")]
    said = re.search(r"cannot certify more than epsilon ([0-9.]+)", warning).group(1)
    reason = re.search(r"cannot certify more than epsilon ([0-9.]+)", report["reasons"][0]).group(1)
    assert said == reason, (warning, report["reasons"][0])
    assert "the 2-step canary run" in warning, warning
    assert can["power"]["steps"] == 2 == can["training"]["target"]["steps"], can["power"]


def test_the_same_run_through_a_symbolic_link_replaces_its_report(run_b, tmp_path, capsys, fast):
    link = tmp_path / "link_to_run"
    link.symlink_to(run_b, target_is_directory=True)
    out = tmp_path / "report"
    small = ["--canaries", "24", "--steps", "2", "--background", "32"]
    assert main(["audit", "--run", str(run_b), "--out", str(out), *small]) == 3
    capsys.readouterr()
    rc = main(["audit", "--run", str(link), "--out", str(out), *small, "--seed", "1"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert json.loads((out / "report.json").read_text())["canary_audit"]["canaries"]["seed"] == 1
