"""`dpdm audit`: verdicts and exit codes (0 PASS / 1 FAIL / 3 INCONCLUSIVE / 2 bad input), report files."""

import dataclasses
import json

import numpy as np
import pytest

import accounting
from cli.main import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 3-step private run on 64 8x8 digits (saved as an npz dataset)."""
    from dpdm.datasets import load_dataset, to_uint8
    from dpdm.train import TrainConfig, train

    root = tmp_path_factory.mktemp("audit_cli")
    digits = load_dataset("digits")
    npz = root / "tiny.npz"
    np.savez(npz, x=to_uint8(digits.x[:64]), y=digits.y[:64].numpy(), num_classes=10)
    data = load_dataset(f"npz:{npz}")
    plan = accounting.PrivacyPlan(dataset_size=64, batch_size=16, steps=3, noise_multiplier=1.0,
                                  noise_multiplicity=1, delta=1e-4).calibrate(epsilon=2.0)
    doc = accounting.make_plan_document(plan)
    run = root / "run"
    train(doc, data.x, data.y, 10, run, TrainConfig(model="small", log_every=1, checkpoint_every=10),
          dataset_name=f"npz:{npz}", progress=False)
    return run, npz, doc


def _audit(argv, capsys):
    rc = main(["audit", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


SMALL = ["--canaries", "24", "--steps", "2", "--background", "32"]


def test_audit_writes_report_and_json(run_dir, tmp_path, capsys):
    run, npz, doc = run_dir
    out_dir = tmp_path / "report"
    rc, out, err = _audit(["--run", str(run), "--out", str(out_dir), *SMALL, "--json"], capsys)
    report = json.loads(out)
    assert rc == {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}[report["verdict"]]
    assert report["verdict"] in ("PASS", "INCONCLUSIVE")  # a correct run is never FAIL
    assert all(c["passed"] for c in report["mechanism_checks"]), report["mechanism_checks"]
    names = {c["name"] for c in report["mechanism_checks"]}
    assert {"noise_variance", "poisson_batch_sizes", "run_plan_matches", "run_ledger_matches"} <= names
    assert not any(n.startswith("subspace") for n in names)   # the run added its noise in all parameters
    assert report["claimed_plan"]["digest"] == doc.digest
    budget = report["error_budget"]
    assert budget["mechanism_checks"]["statistical_checks"] == 5
    assert budget["mechanism_checks"]["share"] + budget["epsilon_bounds"]["share"] == pytest.approx(0.05)
    for f in ("report.md", "report.json", "scores.npz", "roc_target_loss.png", "roc_log_target_loss.png",
              "hist_target_pia.png", "roc_control_loss.png"):
        assert (out_dir / f).is_file(), f
    md = (out_dir / "report.md").read_text()
    for section in ("## Claim under test", "## What was audited", "## Mechanism checks",
                    "## Epsilon lower bounds", "## Error budget", "![roc_log_target_loss.png]"):
        assert section in md
    assert "shorter run under the same per-step mechanism" in md
    assert json.loads((out_dir / "report.json").read_text())["verdict"] == report["verdict"]
    scores = np.load(out_dir / "scores.npz")
    assert scores["included"].shape == (24,) and scores["target_loss"].shape == (24,)


def test_audit_against_another_plan_fails(run_dir, tmp_path, capsys):
    run, _, doc = run_dir
    other = dataclasses.replace(doc.plan, noise_multiplier=doc.plan.noise_multiplier * 2, target_epsilon=None)
    claimed = tmp_path / "claimed.json"
    accounting.write_plan(accounting.make_plan_document(other), claimed)
    rc, out, err = _audit(["--run", str(run), "--plan", str(claimed), "--out", str(tmp_path / "r"),
                           "--canaries", "8", "--steps", "1", "--background", "8"], capsys)
    assert rc == 1
    assert "audit verdict: FAIL" in err and "run_plan_matches" in err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    failed = {c["name"] for c in report["mechanism_checks"] if not c["passed"]}
    assert {"run_plan_matches", "run_ledger_matches"} <= failed


def test_bad_input_exits_2(run_dir, tmp_path, capsys):
    run, _, _ = run_dir
    rc, _, err = _audit(["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "r")], capsys)
    assert rc == 2 and err.startswith("dpdm: error:") and "--run" in err
    tampered = tmp_path / "plan.json"
    d = json.loads((run / "plan.json").read_text())
    d["noise_multiplier"] = 0.01
    tampered.write_text(json.dumps(d))
    rc, _, err = _audit(["--run", str(run), "--plan", str(tampered), "--out", str(tmp_path / "r")], capsys)
    assert rc == 2 and "dpdm: error:" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _audit(["--run", str(run), "--out", str(tmp_path / "r"), "--suite", "huge"], capsys)
    assert rc == 2
    rc, _, err = _audit(["--run", str(run), "--out", str(tmp_path / "r"), "--dataset", "mnist5k"], capsys)
    assert rc == 2 and "shape" in err  # 28x28 data for an 8x8 run
    rc, _, err = _audit(["--run", str(run), "--out", str(tmp_path / "r"), "--dataset", f"npz:{tmp_path}/no.npz"], capsys)
    assert rc == 2 and "does not exist" in err
    rc, _, err = _audit(["--run", str(run), "--out", str(tmp_path / "r"), "--steps", "4"], capsys)
    assert rc == 2 and "steps=4" in err  # never more steps than the plan


def test_audit_of_a_subspace_run_checks_the_subspace_step(run_dir, tmp_path, capsys):
    """A `--public-subspace` run: the audit adds the subspace checks (and their share of the error
    budget) and says that the canary training does not exercise the subspace."""
    from dpdm.datasets import load_dataset, to_uint8
    from dpdm.train import TrainConfig, train

    _, npz, doc = run_dir
    digits = load_dataset("digits")
    public = tmp_path / "public.npz"
    np.savez(public, x=to_uint8(digits.x[64:128]), y=digits.y[64:128].numpy(), num_classes=10)
    pub = load_dataset(f"npz:{public}")
    data = load_dataset(f"npz:{npz}")
    run = tmp_path / "run"
    train(doc, data.x, data.y, 10, run,
          TrainConfig(model="small", log_every=1, checkpoint_every=10, subspace_dim=3, subspace_data=f"npz:{public}",
                      subspace_every=1, subspace_examples=16),
          dataset_name=f"npz:{npz}", progress=False, public_data=(pub.x, pub.y))
    rc, out, err = _audit(["--run", str(run), "--out", str(tmp_path / "report"), *SMALL, "--json"], capsys)
    report = json.loads(out)
    assert report["verdict"] in ("PASS", "INCONCLUSIVE"), report["reasons"]
    checks = {c["name"]: c for c in report["mechanism_checks"]}
    for name in ("subspace_signal_in_noise_span", "subspace_sensitivity_replay", "subspace_noise_variance"):
        assert checks[name]["passed"], checks[name]
    assert report["error_budget"]["mechanism_checks"]["statistical_checks"] == 6
    assert any("3-dimensional subspace" in line for line in report["what_was_audited"])
