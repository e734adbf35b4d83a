"""`dpdm audit` end to end, for two findings of auditwalk (stop 56); the mechanism checks are stubbed out (they are
tests/cli/test_audit.py's subject), the canary runs are tiny (24 canaries, 32 background images, 2-3 steps).

F1: an INCONCLUSIVE audit said "use more canaries (--canaries)" where no count of canaries can certify the claim (the
one-run bound peaks, near 900 canaries at delta 1e-5: tests/audits/test_audit_power_advice.py), and said it only
after the training. It now says so before any training (a warning), and the verdict's reason says the same.

F2: `dpdm audit --out DIR` silently replaced the report an audit of ANOTHER run against ANOTHER plan had written
there (verdict, bounds, scores and plots). As `dpdm export` and `dpdm sample` keep an output of another plan, it is
kept: one exit-2 line naming it, before any training, unless --force; this run's own report is still replaced."""

import json

import numpy as np
import pytest

import accounting
from cli.main import main

SMALL = ["--canaries", "24", "--steps", "2", "--background", "32"]


def digits_npz(root):
    """64 8x8 digits saved as root/tiny.npz, and that npz dataset loaded."""
    from dpdm.datasets import load_dataset, to_uint8

    digits = load_dataset("digits")
    npz = root / "tiny.npz"
    np.savez(npz, x=to_uint8(digits.x[:64]), y=digits.y[:64].numpy(), num_classes=10)
    return npz, load_dataset(f"npz:{npz}")


def _train(root, npz, data, noise_multiplier, delta, name):
    from dpdm.train import TrainConfig, train

    plan = accounting.PrivacyPlan(dataset_size=64, batch_size=16, steps=3, noise_multiplier=noise_multiplier,
                                  noise_multiplicity=1, delta=delta)
    doc = accounting.make_plan_document(plan)
    run = root / name
    train(doc, data.x, data.y, 10, run, TrainConfig(model="small", log_every=1, checkpoint_every=10),
          dataset_name=f"npz:{npz}", progress=False)
    return run, doc


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two finished 3-step private runs of two plans on 64 8x8 digits: epsilon 3.04 at delta 1e-4 (sigma 1), and
    30.3 at delta 1e-5 (sigma 0.3), a claim no canary count can certify (one step of it, 16.7, is more than the most
    any count certifies)."""
    root = tmp_path_factory.mktemp("audit_power_and_out")
    npz, data = digits_npz(root)
    return _train(root, npz, data, 1.0, 1e-4, "run_a"), _train(root, npz, data, 0.3, 1e-5, "run_b")


@pytest.fixture
def no_mechanism_checks(monkeypatch):
    import audits.suite

    monkeypatch.setattr(audits.suite, "mechanism_checks", lambda *a, **k: ([], "not run in this test"))


@pytest.fixture
def no_plots(monkeypatch):
    """The report's 16 plots, most of an audit's time here: what --out keeps or replaces is the files, not their
    pictures (tests/cli/test_audit.py draws them). Each plot function takes its file as its third argument."""
    from pathlib import Path

    import audits.suite

    def plot(*args, **kwargs):
        Path(args[2]).write_bytes(b"not drawn in this test")
        return Path(args[2])
    for name in ("plot_roc", "plot_score_histogram", "plot_epsilon_vs_guesses"):
        monkeypatch.setattr(audits.suite, name, plot)


def _watch_training(monkeypatch, capsys):
    """Records, at the canary audit's start, what stderr said before it (and consumes it)."""
    import audits.suite

    before = []
    real = audits.suite.canary_audit
    monkeypatch.setattr(audits.suite, "canary_audit",
                        lambda *a, **k: (before.append(capsys.readouterr().err), real(*a, **k))[1])
    return before


def test_an_audit_no_canary_count_can_decide_says_so_before_training_and_advises_no_more_canaries(
        two_runs, tmp_path, capsys, monkeypatch, no_mechanism_checks):
    _, (run_b, _) = two_runs
    before = _watch_training(monkeypatch, capsys)
    out = tmp_path / "report"
    rc = main(["audit", "--run", str(run_b), "--out", str(out), "--canaries", "24", "--steps", "3",
               "--background", "32"])
    err = capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert rc == 3 and report["verdict"] == "INCONCLUSIVE", err
    [reason] = report["reasons"]
    assert reason.startswith("with 24 canaries this audit cannot certify more than epsilon"), reason
    # No count of canaries certifies the claim, nor does one step: retraining with more canaries (the old advice)
    # or fewer steps would end INCONCLUSIVE again.
    assert "use more canaries" not in reason and "use more canaries" not in before[0] + err
    assert "no count of canaries dpdm tries" in reason and "nor can a shorter canary run: one step (--steps 1)" in reason
    # Said before the training, as a warning: the audit still runs (the mechanism checks test the step).
    [warning] = [line for line in before[0].splitlines() if line.startswith("dpdm: warning: ")]
    assert "cannot detect a violation of the claim" in warning and "ends INCONCLUSIVE unless a mechanism check" \
        in warning and "no count of canaries dpdm tries" in warning, warning
    # The report holds the figures: the most any count certifies with this --seed's coins (r2 F1, stop 56) is below
    # one step's epsilon, below the claim.
    from audits.canary import certifiable_curve

    can = report["canary_audit"]
    power = can["power"]
    best_m, best = max(certifiable_curve(1e-5, can["significance_per_attack"], seed=0), key=lambda c: c[1])
    assert power["seed"] == 0 and power["best_canaries"] == best_m
    assert power["best_certifiable_epsilon"] == best < power["one_step_epsilon"] < can["claimed_epsilon"]
    assert power["canaries_needed"] is None and power["canaries_advised"] is None


def test_an_audit_keeps_the_report_of_another_run_and_plan_unless_forced(two_runs, tmp_path, capsys, monkeypatch,
                                                                         no_mechanism_checks, no_plots):
    (run_a, doc_a), (run_b, doc_b) = two_runs
    out = tmp_path / "report"
    assert main(["audit", "--run", str(run_a), "--out", str(out), *SMALL]) == 3
    capsys.readouterr()
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert json.loads(first["report.json"])["claimed_plan"]["digest"] == doc_a.digest

    before = _watch_training(monkeypatch, capsys)
    rc = main(["audit", "--run", str(run_b), "--out", str(out), *SMALL])
    err = capsys.readouterr().err
    # Run A's report (another run, another plan) is kept: one line naming it, exit 2, before any training.
    assert rc == 2 and not before, err
    assert err == (f"dpdm: error: --out={str(out)!r}: holds the report of an audit of another run ({str(run_a)!r}) "
                   f"against another plan ({doc_a.digest[:19]}..., this audit's is {doc_b.digest[:19]}...) "
                   "(INCONCLUSIVE); it is kept: choose another --out, or pass --force to replace it\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    # Against run A's own plan, run B (trained under another plan) is still another run's audit.
    rc = main(["audit", "--run", str(run_b), "--plan", str(run_a / "plan.json"), "--out", str(out), *SMALL])
    err = capsys.readouterr().err
    assert rc == 2 and f"another run ({str(run_a)!r}) against this plan (INCONCLUSIVE)" in err and not before, err
    # --force replaces it.
    assert main(["audit", "--run", str(run_b), "--out", str(out), *SMALL, "--force"]) == 3
    assert json.loads((out / "report.json").read_text())["claimed_plan"]["digest"] == doc_b.digest


def test_an_audit_still_replaces_its_own_earlier_report(two_runs, tmp_path, capsys, monkeypatch, no_mechanism_checks,
                                                         no_plots):
    """The same run and plan audited again (another --seed), named by another path, still replaces its report; so
    does a report from a dpdm before reports named their run folder."""
    (run_a, _), _ = two_runs
    out = tmp_path / "report"
    assert main(["audit", "--run", str(run_a), "--out", str(out), *SMALL]) == 3
    monkeypatch.chdir(run_a.parent)
    assert main(["audit", "--run", f"./{run_a.name}/", "--out", str(out), *SMALL, "--seed", "1"]) == 3
    report = json.loads((out / "report.json").read_text())
    assert report["canary_audit"]["canaries"]["seed"] == 1 and report["run"] == run_a.name
    report.pop("run_folder_sha256", None)
    report["run"] = "elsewhere"
    (out / "report.json").write_text(json.dumps(report))
    assert main(["audit", "--run", str(run_a), "--out", str(out), *SMALL, "--seed", "2"]) == 3
    assert json.loads((out / "report.json").read_text())["canary_audit"]["canaries"]["seed"] == 2
