"""`dpdm audit`: verdicts and exit codes (0 PASS / 1 FAIL / 3 INCONCLUSIVE / 2 bad input), report files."""

import dataclasses
import json
import os
import stat
import time

import numpy as np
import pytest

import accounting
from cli.main import main
from dpdm.report_utils import epsilon_text


@pytest.fixture(scope="module", autouse=True)
def _fewer_noise_pairs():
    """The quick suite's tiny-model noise checks on 10 seed pairs instead of 40 in this file's audits. Every audit
    checks both gradient engines and the noise under two run seeds (h123 F1, F2, stop 52), which took each audit's
    mechanism checks from 6 to 11 s; with 10 pairs they take 6.5 s. These tests are about the command, its verdicts
    and its report; the noise checks' power and level are tested in tests/audits/test_mechanism.py."""
    from audits.suite import SUITES

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SUITES["quick"], "noise_pairs", 10)
        yield


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


def test_audit_writes_report_and_json(run_dir, tmp_path, capsys, monkeypatch):
    import audits.suite

    run, npz, doc = run_dir
    out_dir = tmp_path / "report"
    alphas = {}   # the level each kind of mechanism check ran at (h74 F2, stop 44)
    for name in ("check_engine", "check_run_seed", "check_fresh_noise", "check_network", "check_sampler", "check_run"):
        real = getattr(audits.suite, name)
        monkeypatch.setattr(audits.suite, name, lambda *a, _real=real, _name=name, **k:
                            (alphas.setdefault(_name, []).append(k["alpha"]), _real(*a, **k))[1])
    umask = os.umask(0o022)   # the common default, under which a file opened plainly is 0644
    try:
        rc, out, err = _audit(["--run", str(run), "--out", str(out_dir), *SMALL, "--json"], capsys)
    finally:
        os.umask(umask)
    report = json.loads(out)
    assert rc == {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}[report["verdict"]]
    assert report["verdict"] in ("PASS", "INCONCLUSIVE")  # a correct run is never FAIL
    can = report["canary_audit"]
    # 24 canaries cannot certify the 2-step run's epsilon: no lower bound could have exceeded it, so it is no PASS.
    assert can["max_certifiable_epsilon"] <= can["claimed_epsilon"]
    assert report["verdict"] == "INCONCLUSIVE" and rc == 3, report["reasons"]
    assert any("cannot certify more than" in r and "--canaries" in r for r in report["reasons"])
    assert all(c["passed"] for c in report["mechanism_checks"]), report["mechanism_checks"]
    names = {c["name"] for c in report["mechanism_checks"]}
    assert {"noise_variance (rules)", "poisson_batch_sizes", "run_plan_matches", "run_ledger_matches"} <= names
    assert not any(n.startswith("subspace") for n in names)   # the run added its noise in all parameters
    # The step ran on the run's own network in float32 too (audit walk F2, stop 42), and the report says so. Each
    # engine's noise is checked under two run seeds too (h123 F1, stop 52). The run trained with the rules engine
    # and has the vmap engine checked as well: a resume may change --grad-engine, and the checkpoint records the
    # engine of the last start only (h123 F2, stop 52: a run resumed with vmap had its rules steps unchecked).
    # And consecutive steps of one run must draw independent noise (h143 F1, stop 54), and no two of steps 0 to 2047
    # and 2**k the same noise (r2 F2, stop 54).
    from audits.mechanism import (ENGINE_CHECKS, FRESH_NOISE_CHECKS, NETWORK_CHECKS, REPEAT_NOISE_CHECKS,
                                  RUN_SEED_CHECKS)

    assert "noise_keyed_by_run_seed" in RUN_SEED_CHECKS and FRESH_NOISE_CHECKS == ("noise_fresh_each_step",)
    for engine in ("rules", "vmap"):
        assert {f"{n} ({engine})" for n in (*ENGINE_CHECKS, *RUN_SEED_CHECKS, *FRESH_NOISE_CHECKS,
                                            *REPEAT_NOISE_CHECKS, *NETWORK_CHECKS)} <= names, names
    line = next(s for s in report["what_was_audited"] if s.startswith("The mechanism checks ran"))
    assert "tiny float64 model" in line and "the run's 'small' network" in line and "float32" in line, line
    assert "with each per-example gradient engine, rules and vmap (" in line and "two run seeds" in line, line
    # ... at a step before and one after an lr change: the run changed none, so a fixed change at step 3 (r2 F1, stop
    # 52: the seed of a step after a change derives by another path, which no check ran).
    assert "one after an lr change (one at step 3: the run records none)" in line, line
    assert "consecutive steps of one run (steps s and s + 1 from step 0, of both parities" in line, line
    assert "the noise alone of steps 0 to 2047 and 2**k up to 2**62 (no two equal or opposite" in line, line
    # What the audit does not cover, said in the report (h143 F3, stop 54).
    from audits.suite import LOOP_NOT_AUDITED

    assert LOOP_NOT_AUDITED in report["what_was_audited"]
    seeds = next(c for c in report["mechanism_checks"] if c["name"] == "noise_keyed_by_run_seed (rules)")
    assert "at step 10 of a run with lr segments (0, 0.001, constant), (3, 0.0005, constant) (sigma=" in \
        seeds["detail"], seeds
    line = next(s for s in report["what_was_audited"] if s.startswith("Canary training:"))
    assert "`dpdm train`'s private step (plan_private_grad)" in line, line   # h74 F1: not a copy of it
    assert report["claimed_plan"]["digest"] == doc.digest
    budget = report["error_budget"]
    # 6 per engine (noise variance and once per step on the tiny model and on the network, the noise under two run
    # seeds, that of consecutive steps) and the sampler's two and the logged batch sizes.
    assert budget["mechanism_checks"]["statistical_checks"] == 15
    assert budget["mechanism_checks"]["share"] + budget["epsilon_bounds"]["share"] == pytest.approx(0.05)
    # "FAIL at most 5% for a correct implementation" rests on the Bonferroni split: the mechanism share (0.2 of
    # 0.05) over the 15 statistical checks, at which every check runs; 0.01 each would make it 0.04 + 15 * 0.01.
    assert budget["mechanism_checks"]["per_check"] == pytest.approx(0.05 * 0.2 / 15)
    assert set(alphas) == {"check_engine", "check_run_seed", "check_fresh_noise", "check_network", "check_sampler",
                           "check_run"}, alphas
    assert all(a == pytest.approx(0.05 * 0.2 / 15) for seen in alphas.values() for a in seen), alphas
    for f in ("report.md", "report.json", "scores.npz", "roc_target_loss.png", "roc_log_target_loss.png",
              "hist_target_pia.png", "roc_control_loss.png"):
        assert (out_dir / f).is_file(), f
    md = (out_dir / "report.md").read_text()
    for section in ("## Claim under test", "## What was audited", "## Mechanism checks",
                    "## Epsilon lower bounds", "## Error budget", "![roc_log_target_loss.png]"):
        assert section in md
    assert "shorter run under the same per-step mechanism" in md
    # The claim shown is the one the verdict uses (the 2-step canary run's epsilon), with the plan's beside it.
    claim_row = (f"| **epsilon of the 2-step canary run** (what the verdict compares against) | "
                 f"**{epsilon_text(can['claimed_epsilon'], 8)}** |")
    assert claim_row in md
    assert "claimed (epsilon of the 2-step canary run)" in md
    # Rounded as every epsilon on screen: the claim up, the most these canaries could certify down.
    assert (f"claimed epsilon: {epsilon_text(can['claimed_epsilon'])}, the epsilon of the 2-step canary run" in md and
            f"largest certifiable with this setup {epsilon_text(can['max_certifiable_epsilon'], bound='lower')}." in md)
    # 24 canaries leave about 12 excluded ones: too few for a TPR at 1% or 0.1% FPR, which reads n/a.
    rows = [line.split(" | ") for line in md.splitlines() if line.startswith("| loss | target")]
    assert len(rows) == 1 and rows[0][7].startswith("n/a (") and rows[0][8].startswith("n/a ("), rows
    assert json.loads((out_dir / "report.json").read_text())["verdict"] == report["verdict"]
    assert (out_dir.stat().st_mode & 0o777) == 0o700   # the report holds a noise-free control run
    # and every file in it is 0600, as the run's metrics.csv and config.json: a copy of them into another folder
    # (`cp audit/* shared/`) keeps their modes. They were 0644 under this umask (h108 F1, stop 50).
    modes = {p.name: oct(stat.S_IMODE(p.lstat().st_mode)) for p in out_dir.iterdir()}
    assert len(modes) == 19 and set(modes.values()) == {"0o600"}, modes   # 16 plots, no staging folder left
    # The run drew a secret seed; one trained with a given --seed would be named so in the report.
    from audits.suite import _markdown

    assert report["run_config"]["seed_given"] is False and "given --seed" not in md
    seeded = {**report, "run_config": {**report["run_config"], "seed_given": True}}
    assert "It was trained with a given --seed: whoever knows that seed can replay" in _markdown(seeded)
    scores = np.load(out_dir / "scores.npz")
    assert scores["included"].shape == (24,) and scores["target_loss"].shape == (24,)


def test_audit_against_another_plan_fails(run_dir, tmp_path, capsys):
    run, _, doc = run_dir
    other = dataclasses.replace(doc.plan, noise_multiplier=doc.plan.noise_multiplier * 2, target_epsilon=None)
    claimed = tmp_path / "claimed.json"
    accounting.write_plan(accounting.make_plan_document(other), claimed)
    rc, out, err = _audit(["--run", str(run), "--plan", str(claimed), "--out", str(tmp_path / "r"),
                           "--canaries", "20", "--steps", "1", "--background", "8"], capsys)
    assert rc == 1
    assert "audit verdict: FAIL" in err and "run_plan_matches" in err
    # The summary line shows the epsilon the verdict compares against (the 1-step canary run's), beside the plan's.
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    claim = report["canary_audit"]["claimed_epsilon"]
    assert claim < report["claimed_plan"]["epsilon"]
    assert f"vs {epsilon_text(claim)}, the epsilon of the 1-step canary run" in err   # upper bounds rounded up
    assert f"the plan's epsilon over its 3 steps: {epsilon_text(report['claimed_plan']['epsilon'])}" in err
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


@pytest.mark.slow   # stop 42: 1265 s serially; stop 43: 805 s in two workers on a slow day
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
        for engine in ("rules", "vmap"):
            assert checks[f"{name} ({engine})"]["passed"], checks[f"{name} ({engine})"]
    assert report["error_budget"]["mechanism_checks"]["statistical_checks"] == 17   # 7 per engine + 3
    assert any("3-dimensional subspace" in line for line in report["what_was_audited"])


def _strict_json(text):
    """json.loads that refuses Infinity, -Infinity and NaN, as RFC 8259 parsers (JSON.parse, serde) do."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def _no_run_audit(monkeypatch):
    import audits.suite

    def never(*args, **kwargs):
        pytest.fail("run_audit must not start: the input should have been refused first")
    monkeypatch.setattr(audits.suite, "run_audit", never)


def test_bad_out_and_too_few_canaries_exit_2_before_any_training(run_dir, tmp_path, capsys, monkeypatch):
    run, _, _ = run_dir
    _no_run_audit(monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    rc, _, err = _audit(["--run", str(run), "--out", str(a_file / "report")], capsys)
    assert rc == 2 and err.startswith("dpdm: error: --out=") and len(err.strip().splitlines()) == 1, err
    for n in ("2", "3", "19", "0", "100001", "1000000000"):
        rc, _, err = _audit(["--run", str(run), "--out", str(tmp_path / "r"), "--canaries", n], capsys)
        assert rc == 2 and err.startswith(f"dpdm: error: --canaries={n} ") and len(err.strip().splitlines()) == 1


def test_runtime_failures_exit_4_not_1_or_2(run_dir, tmp_path, capsys, monkeypatch):
    """A failure that is nobody's input mistake: its traceback, one `dpdm: runtime failure` line, exit 4 (never
    1, the audit-FAIL code, nor 2: a ValueError raised after the input was validated is not bad input)."""
    import audits.suite

    run, _, _ = run_dir

    def internal_error(*args, **kwargs):
        raise ValueError("an internal statistic went wrong")
    monkeypatch.setattr(audits.suite, "check_engine", internal_error)
    rc, out, err = _audit(["--run", str(run), "--out", str(tmp_path / "r"), *SMALL], capsys)
    assert rc == 4, err
    assert "Traceback" in err
    assert err.strip().splitlines()[-1] == "dpdm: runtime failure: ValueError: an internal statistic went wrong"

    def disk_error(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(audits.suite, "run_audit", disk_error)
    rc, out, err = _audit(["--run", str(run), "--out", str(tmp_path / "r"), *SMALL], capsys)
    # The machine's (permissions taken away mid-command): one line, no traceback, exit 4 (cli/main.py, stop 44)
    assert rc == 4 and "Traceback" not in err, err
    assert err.strip() == "dpdm: runtime failure: [Errno 13] Permission denied (EACCES); files written before are kept"

    def click_error(*args, **kwargs):  # click's own default exit status is 1, the audit-FAIL code
        import click
        raise click.ClickException("something click reports")
    monkeypatch.setattr(audits.suite, "run_audit", click_error)
    rc, out, err = _audit(["--run", str(run), "--out", str(tmp_path / "r"), *SMALL], capsys)
    assert rc == 4 and err.strip() == "dpdm: runtime failure: something click reports", err


def test_audit_seed_beyond_63_bits_is_one_error_line(run_dir, tmp_path, capsys):
    run, _, _ = run_dir
    rc, _, err = _audit(["--run", str(run), "--out", str(tmp_path / "r"), "--seed", str(2**64)], capsys)
    assert rc == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpdm: error:") and "--seed" in lines[0], err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow   # stop 42: 1265 s serially; stop 43: 805 s in two workers on a slow day
def test_audit_of_a_no_dp_run_writes_strict_json(run_dir, tmp_path, capsys):
    """A --no-dp run's ledger spends epsilon inf: report.json and --json must still be JSON (null, not Infinity)."""
    from dpdm.datasets import load_dataset
    from dpdm.train import TrainConfig, train

    _, npz, doc = run_dir
    data = load_dataset(f"npz:{npz}")
    run = tmp_path / "nodp"
    train(doc, data.x, data.y, 10, run, TrainConfig(model="small", log_every=1, checkpoint_every=10, private=False),
          dataset_name=f"npz:{npz}", progress=False)
    out_dir = tmp_path / "report"
    rc, out, err = _audit(["--run", str(run), "--out", str(out_dir), *SMALL, "--json"], capsys)
    report = _strict_json(out)
    on_disk = _strict_json((out_dir / "report.json").read_text())
    assert report["run_ledger"]["private"] is False and report["run_ledger"]["epsilon_spent"] is None
    assert on_disk["run_ledger"]["epsilon_spent"] is None and on_disk["verdict"] == report["verdict"]
    assert rc == {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}[report["verdict"]]
    assert "epsilon spent infinite (trained without DP)" in (out_dir / "report.md").read_text()


@pytest.fixture(scope="module")
def report_inputs(run_dir, tmp_path_factory):
    """What run_audit hands write_report for the SMALL audit of the run (doc, canary)."""
    import copy

    import audits.suite as suite

    run, _, _ = run_dir
    captured = {}
    real = suite.write_report

    def spy(doc, canary, out_dir):
        captured["args"] = copy.deepcopy(doc), copy.deepcopy(canary)
        return real(doc, canary, out_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(suite, "write_report", spy)
        suite.run_audit(run, tmp_path_factory.mktemp("report_inputs"),
                        canary_overrides={"num_canaries": 24, "steps": 2, "background_size": 32})
    return captured["args"]


def _write(report_inputs, out_dir, *, flip=False):
    import copy

    from audits.suite import write_report

    doc, canary = copy.deepcopy(report_inputs[0]), copy.deepcopy(report_inputs[1])
    if flip:  # another run's report: other scores and verdict
        canary["scores"] = {r: {a: [-v for v in s] for a, s in per.items()} for r, per in canary["scores"].items()}
        doc["verdict"] = "FAIL"
    write_report(doc, canary, out_dir)
    return doc


def test_report_md_rounds_the_epsilons_up_and_the_lower_bounds_down(report_inputs):
    """report.md showed "epsilon spent 7.999" and a claim of 7.999181 for a certified 7.99918103 (to nearest, below
    the guarantee) beside its own "8" (h103 F2, stop 49). Every epsilon is rounded up, as on every screen; the
    empirical lower bounds and the most the canaries certify, down."""
    import copy

    from audits.suite import _markdown

    doc = copy.deepcopy(report_inputs[0])
    doc["plots"] = {}
    eps, claim = 7.9991810311052305, 6.141602444
    doc["claimed_plan"]["epsilon"] = doc["run_ledger"]["epsilon_spent"] = eps
    doc["claimed_plan"]["steps"] = doc["run_ledger"]["plan_steps"] = doc["run_ledger"]["steps_done"] = 40
    can = doc["canary_audit"]
    can["claimed_epsilon"] = claim
    can["max_certifiable_epsilon"] = 3.1249996
    for per in can["attacks"].values():
        for rep in per.values():
            rep["one_run"]["epsilon"] = 1.23456789
    md = _markdown(doc)
    assert "| epsilon (the plan's, over its 40 steps) | 7.9991811 |" in md
    assert "| **epsilon of the 2-step canary run** (what the verdict compares against) | **6.1416025** |" in md
    assert "40/40 steps, private=True, epsilon spent 8, delta" in md
    assert "7.999 " not in md and "7.999181 " not in md and "6.1416024" not in md
    assert "claimed epsilon: 6.142, the epsilon of the 2-step canary run (the plan's epsilon over its 40 steps: 8)" in md
    assert "largest certifiable with this setup 3.124." in md
    rows = [line.split(" | ") for line in md.splitlines() if line.startswith("| loss | ")]
    assert rows and all(r[2] == "1.234" and r[9] == "6.142" for r in rows), rows


def test_the_report_says_the_audit_never_reads_the_runs_weights(report_inputs):
    """The audit takes the run's ledger, config and metrics.csv, never its weights: any checkpoint of the same plan
    with the same ledger (another run's, a --no-dp run's relabelled) gets the same report. A reviewer took a PASS
    or INCONCLUSIVE of the run folder for evidence about the model released from it, and the threat model named
    "the final model's denoiser", the canary run's (h115 F2, stop 51). INCONCLUSIVE read "the audit could not have
    failed", where every mechanism check ran and could have failed it (h115 F5)."""
    from audits.suite import _markdown

    doc, canary = report_inputs
    scope = doc["what_was_audited"][0]
    assert scope.startswith("What this audit tests: `dpdm train`'s private step and the plan's per-step mechanism, "
                            "on canary trainings and network initializations of its own."), scope
    assert "uses the ledger, the config and metrics.csv, never the weights: it cannot tell which model was trained " \
           "or released" in scope, scope
    assert canary["threat_model"].startswith("black-box access to the canary run's final denoiser (raw weights, not "
                                             "EMA), not to the audited run's model;"), canary["threat_model"]
    assert f"Threat model: {canary['threat_model']}." in doc["what_was_audited"]
    ledger = next(c for c in doc["mechanism_checks"] if c["name"] == "run_ledger_matches")
    assert ledger["passed"] and ledger["detail"].startswith("ledger (its record; the weights are not read): private")
    assert doc["verdict"] == "INCONCLUSIVE"   # 24 canaries cannot certify the 2-step canary run's epsilon
    md = _markdown({**doc, "plots": {}})
    opening = md.split("\n## Claim under test\n")[0]
    assert "No verdict is about the run's weights, which the audit never reads" in opening, opening
    assert ("INCONCLUSIVE: every mechanism check passed and no epsilon lower bound exceeded the claim, but the canary "
            "attacks had too little power to detect a violation of it") in opening, opening
    assert f"- {scope}" in md.split("\n## What was audited\n")[1].split("\n## ")[0]
    assert "as its ledger records it: 3/3 steps, private=True" in md
    passed = _markdown({**doc, "plots": {}, "verdict": "PASS"})
    assert "never reads" in passed and "INCONCLUSIVE:" not in passed


def test_audit_help_says_what_it_tests_and_what_inconclusive_means(capsys):
    """`dpdm audit --help` said "Audit a run", and nothing of the weights it never reads (h115 F2, stop 51)."""
    assert main(["audit", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert ("Tests `dpdm train`'s private step and the plan's mechanism on fresh canary trainings, and reads the "
            "run's ledger, config and metrics.csv, never its weights: it cannot tell which model was trained or "
            "released.") in text, text
    assert "INCONCLUSIVE: every mechanism check passed, but the canary attacks had too little power" in text, text


def test_report_holds_only_this_runs_plots(report_inputs, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    for stale in ("roc_control_lira.png", "guesses_target_old.png", "hist_target_pia.png"):
        (out / stale).write_bytes(b"an earlier run's plot")
    (out / "notes.txt").write_text("the user's own file")
    doc = _write(report_inputs, out)
    listed = {f for files in doc["plots"].values() for f in files}
    assert {p.name for p in out.glob("*.png")} == listed
    assert (out / "hist_target_pia.png").read_bytes() != b"an earlier run's plot"
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".png")) == [
        "notes.txt", "report.json", "report.md", "scores.npz"]  # no staging folder or temp file left
    assert _strict_json((out / "report.json").read_text())["plots"] == doc["plots"]


def test_an_audit_folder_made_beforehand_becomes_private(report_inputs, tmp_path):
    """`dpdm audit --out` takes an empty folder the user made: it stayed 0755, and the canary scores and the
    noise-free control's figures were world-readable; only a folder dpdm created was 0700."""
    from audits.suite import check_out_dir

    for name, call in (("checked", lambda out: check_out_dir(out, create=True)),
                       ("written", lambda out: _write(report_inputs, out))):
        out = tmp_path / name
        out.mkdir(mode=0o755)
        os.chmod(out, 0o755)
        call(out)
        assert (out.stat().st_mode & 0o777) == 0o700, name


def test_a_killed_audits_staging_folder_goes_and_a_concurrent_ones_stays(report_inputs, tmp_path):
    """An audit killed while writing its report (SIGKILL, out of memory: no `finally`) left its staging folder, with
    the coins and the noise-free control's scores, for good: a later audit into the same --out removed only its own
    (h108 N3, stop 50). One older than an hour goes, as the eval cache's killed temporary files; a younger one may be
    a concurrent audit's and stays, as does a link's target and a file of that name."""
    out = tmp_path / "report"
    elsewhere = tmp_path / "elsewhere"
    for folder in (out, elsewhere):
        folder.mkdir()
    killed, concurrent = out / ".report-k1ll3d_0", out / ".report-runn1ng0"
    for stage in (killed, concurrent, elsewhere):
        stage.mkdir(exist_ok=True)
        (stage / "scores.npz").write_bytes(b"coins and the control's scores")
    (out / ".report-link0000").symlink_to(elsewhere, target_is_directory=True)
    (out / ".report-file0000").write_bytes(b"not a staging folder")
    # a user's own folders: not mkdtemp's name, or holding what no report stage holds (r1 F2, stop 50)
    users = [out / ".report-drafts", out / ".report-notes123"]
    for folder in users:
        folder.mkdir()
        (folder / "notes.md").write_text("mine")
    (users[1] / "report.md").write_text("a draft")
    old = time.time() - 86400   # a day old
    for path in (killed, out / ".report-link0000", out / ".report-file0000", elsewhere, *users):
        os.utime(path, (old, old), follow_symlinks=False)
    _write(report_inputs, out)
    assert not os.path.lexists(killed)
    assert (concurrent / "scores.npz").is_file() and (elsewhere / "scores.npz").is_file()
    assert all((folder / "notes.md").is_file() for folder in users)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [
        ".report-drafts", ".report-file0000", ".report-link0000", ".report-notes123", ".report-runn1ng0"]


def test_interrupted_report_leaves_the_earlier_one_or_no_report_json(report_inputs, tmp_path, monkeypatch):
    import os

    import audits.suite as suite

    out = tmp_path / "report"
    _write(report_inputs, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # Interrupted while the files are made: the earlier report stays as it was, every file of it.
    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")
    monkeypatch.setattr(suite, "plot_score_histogram", boom)
    with pytest.raises(RuntimeError):
        _write(report_inputs, out, flip=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()

    # Interrupted while the new files replace the old: no report.json (the commit marker) is left to vouch
    # for a mix of old and new files.
    real_replace, calls = os.replace, []

    def replace_then_fail(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace_then_fail)
    with pytest.raises(OSError):
        _write(report_inputs, out, flip=True)
    monkeypatch.undo()
    assert not (out / "report.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # and a complete write afterwards commits the new report
    _write(report_inputs, out, flip=True)
    assert _strict_json((out / "report.json").read_text())["verdict"] == "FAIL"


def test_plots_draw_the_ceiling_at_the_canary_runs_epsilon(report_inputs, tmp_path, monkeypatch):
    import audits.suite as suite

    doc, canary = report_inputs
    claim = canary["claimed_epsilon"]
    assert claim < doc["claimed_plan"]["epsilon"]
    seen = []
    real_roc, real_guesses = suite.plot_roc, suite.plot_epsilon_vs_guesses
    monkeypatch.setattr(suite, "plot_roc", lambda *a, **k: (seen.append(k["epsilon"]), real_roc(*a, **k))[1])
    monkeypatch.setattr(suite, "plot_epsilon_vs_guesses",
                        lambda *a, **k: (seen.append(k["claimed_epsilon"]), real_guesses(*a, **k))[1])
    _write(report_inputs, tmp_path / "report")
    assert seen and all(e == claim for e in seen), seen


@pytest.mark.slow   # stop 42: 1265 s serially; stop 43: 805 s in two workers on a slow day
def test_library_audit_whose_coins_include_no_canary_still_reports(run_dir, tmp_path):
    """run_audit with 2 canaries and seed 0 (coins: both out): no two-class statistics or ROC plots, but a report
    (the CLI refuses so few canaries; the library skips what needs both classes and never redraws the coins)."""
    from audits.suite import run_audit

    run, _, _ = run_dir
    out = tmp_path / "r"
    doc = run_audit(run, out, canary_overrides={"num_canaries": 2, "steps": 1, "background_size": 8})
    assert doc["verdict"] == "INCONCLUSIVE" and doc["canary_audit"]["canaries"]["included"] == 0
    names = {p.name for p in out.iterdir()}
    assert "guesses_target_loss.png" in names and not [n for n in names if n.startswith(("roc_", "hist_"))]
    assert "| n/a (one class only) |" in (out / "report.md").read_text()
    assert _strict_json((out / "report.json").read_text())["canary_audit"]["attacks"]["loss"]["target"]["auc"] is None


def test_out_never_replaces_the_users_files_or_writes_into_a_run(run_dir, tmp_path, capsys, monkeypatch):
    """`dpdm audit --out mydocs` replaced the user's mydocs/report.md, and `--out RUN` wrote 20 files into the
    run folder. Now both are refused before any training; an earlier audit's folder is still reused."""
    from audits.suite import check_out_dir

    run, _, _ = run_dir
    _no_run_audit(monkeypatch)
    docs = tmp_path / "mydocs"
    docs.mkdir()
    (docs / "report.md").write_text("# my important report\n")
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "report.json").write_text('{"format": "mine"}')
    (tmp_path / "data" / "0").mkdir(parents=True)              # a dataset folder: the report would break it
    (tmp_path / "data" / "0" / "a.png").write_bytes(b"an image")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    run_files = sorted(p.name for p in run.iterdir())
    for out, what in ((docs, "not an earlier dpdm audit's"), (tmp_path / "j", "not an earlier dpdm audit's"),
                      (tmp_path / "data", "holds files and no earlier dpdm audit's report"),
                      (run, "inside the run folder"), (run / "audit", "inside the run folder")):
        rc, _, err = _audit(["--run", str(run), "--out", str(out), *SMALL], capsys)
        assert rc == 2 and err.startswith(f"dpdm: error: --out={str(out)!r}: ") and what in err, err
        assert len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in run.iterdir()) == run_files
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "report.json").write_text('{"format": "dpdm.audit/1", "verdict": "PASS"}')
    (earlier / "report.md").write_text("# dpdm privacy audit: **PASS**\n")
    assert check_out_dir(earlier) == earlier
    (earlier / "report.json").unlink()   # a report whose rewrite was interrupted before its report.json
    assert check_out_dir(earlier) == earlier
    killed = tmp_path / "killed"        # a first audit killed while staging its report
    (killed / ".report-staging").mkdir(parents=True)
    assert check_out_dir(killed) == killed


def test_refusals_name_the_option_leave_no_folder_and_catch_bad_labels_and_configs(run_dir, tmp_path, capsys):
    """Walk of stop 36: labels beyond the run's classes, a significance that underflows and a checkpoint whose
    config is damaged were tracebacks (exit 4); refusals did not name the option and left an empty --out."""
    import shutil

    import torch

    run, npz, _ = run_dir
    out = tmp_path / "new" / "report"

    def refused(*argv, needles=()):
        rc, _, err = _audit(["--out", str(out), *argv], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("dpdm: error: "), err
        for needle in needles:
            assert needle in err, err
        assert not (tmp_path / "new").exists()   # nothing made for a refused audit

    with np.load(npz) as z:
        x, y = z["x"], z["y"]
    np.savez(tmp_path / "fifty.npz", x=x, y=(np.arange(len(y)) % 50), num_classes=50)
    np.savez(tmp_path / "unlabelled.npz", x=x)
    refused("--run", str(run), "--dataset", f"npz:{tmp_path / 'fifty.npz'}", *SMALL,
            needles=("--dataset=", "has labels up to 49, but the run has 10 classes"))
    refused("--run", str(run), "--dataset", f"npz:{tmp_path / 'unlabelled.npz'}", *SMALL,
            needles=("--dataset=", "has no labels, but the run is class-conditional"))
    refused("--run", str(run), "--significance", "1e-323", *SMALL, needles=("--significance=1e-323 must be in",))
    refused("--run", str(run), "--steps", "4", needles=("--steps=4 must be <=",))
    refused("--run", str(run), "--dataset", "mnist5k", needles=("--dataset='mnist5k' has images of shape",))
    # a claim float32 cannot train (dpdm plan writes one, with a warning): the canary runs train under it, and the
    # engine's refusal was a traceback, exit 4, since 7ee2da9 (r2 F1, stop 50)
    import dataclasses

    import accounting

    claim = accounting.load_plan(run / "plan.json")
    tiny_clip = tmp_path / "tiny_clip.json"
    accounting.write_plan(accounting.make_plan_document(dataclasses.replace(claim.plan, clip_norm=1e-40)), tiny_clip)
    refused("--run", str(run), "--plan", str(tiny_clip), *SMALL,
            needles=(f"--plan={str(tiny_clip)!r}: the claimed plan cannot be trained in float32: clip_norm=1e-40",))
    own = tmp_path / "own_tiny_clip"   # a run's own such plan (a --no-dp run trains under one): --run named (r3 F2)
    shutil.copytree(run, own)
    shutil.copy(tiny_clip, own / "plan.json")
    refused("--run", str(own), *SMALL,
            needles=(f"--run={str(own)!r}: the claimed plan cannot be trained in float32: clip_norm=1e-40",))
    no_plan = tmp_path / "no_plan"
    shutil.copytree(run, no_plan)
    (no_plan / "plan.json").unlink()
    refused("--run", str(no_plan), *SMALL, needles=(f"--run={str(no_plan)!r}: ",))
    for name, edit, needle in (("no_res", lambda c: c.pop("img_resolution"), "its config has no img_resolution"),
                               ("str_classes", lambda c: c.update(num_classes="ten"), "num_classes='ten'")):
        damaged = tmp_path / name
        shutil.copytree(run, damaged)
        state = torch.load(damaged / "checkpoint.pt", weights_only=True)
        edit(state["config"])
        torch.save(state, damaged / "checkpoint.pt")
        refused("--run", str(damaged), *SMALL, needles=(f"--run={str(damaged)!r}: ", "is corrupt", needle))
    # A metrics.csv that is missing, has no rows or is a FIFO was a FAIL (exit 1: a privacy bug) after all the
    # canary training; a FIFO is refused without being opened.
    import os

    for name, spoil, needle in (("no_metrics", lambda p: p.unlink(), "metrics.csv is missing"),
                                ("header_only", lambda p: p.write_text(p.read_text().splitlines()[0] + "\n"),
                                 "metrics.csv has no rows"),
                                ("fifo_metrics", lambda p: (p.unlink(), os.mkfifo(p)),
                                 "metrics.csv is not a regular file")):
        spoilt = tmp_path / name
        shutil.copytree(run, spoilt)
        spoil(spoilt / "metrics.csv")
        refused("--run", str(spoilt), *SMALL, needles=(f"--run={str(spoilt)!r}: ", needle))


def test_a_copy_of_a_report_among_other_files_is_not_an_audit_folder(run_dir, tmp_path, capsys, monkeypatch):
    """An --out holding an edited copy of report.md beside the user's files was taken for an earlier audit's
    folder: the copy was replaced and a plot-named file deleted."""
    run, _, _ = run_dir
    _no_run_audit(monkeypatch)
    paper = tmp_path / "paper"
    paper.mkdir()
    (paper / "report.md").write_text("# dpdm privacy audit: **PASS**\n\nmy notes\n")
    (paper / "paper.tex").write_text("\\documentclass{article}\n")
    (paper / "roc_target_xyz.png").write_bytes(b"png")
    before = {p.name: p.read_bytes() for p in paper.iterdir()}
    rc, _, err = _audit(["--run", str(run), "--out", str(paper), *SMALL], capsys)
    assert rc == 2 and "not an earlier dpdm audit's report" in err, err
    assert {p.name: p.read_bytes() for p in paper.iterdir()} == before


@pytest.mark.slow   # 18 s on 2 cores: the default suite stays under 15 minutes
def test_an_auto_engine_run_has_both_engines_checked(run_dir, tmp_path, capsys, monkeypatch):
    """A run with --grad-engine auto (per_layer_rules None: the rules on a CPU, either on a GPU, chosen at each
    start) had its mechanism checks run on plain vmap only: a broken per-layer rule passed them. Now both
    engines are checked (twice the checks, in the error budget too), and a broken rule fails the audit."""
    from audits.suite import run_audit
    from dpdm import engine
    from dpdm.datasets import load_dataset
    from dpdm.train import TrainConfig, train

    _, npz, doc = run_dir
    data = load_dataset(f"npz:{npz}")
    run = tmp_path / "auto_run"
    train(doc, data.x, data.y, 10, run, TrainConfig(model="small", log_every=1, checkpoint_every=10,
                                                    per_layer_rules=None), dataset_name=f"npz:{npz}", progress=False)
    small = {"num_canaries": 24, "steps": 2, "background_size": 32}
    report = run_audit(run, tmp_path / "ok", suite="quick", canary_overrides=small)
    names = [c["name"] for c in report["mechanism_checks"]]
    assert "per_sample_gradients (rules)" in names and "per_sample_gradients (vmap)" in names, names
    assert report["error_budget"]["mechanism_checks"]["statistical_checks"] == 15   # 6 per engine + 3
    assert all(c["passed"] for c in report["mechanism_checks"]) and report["verdict"] != "FAIL"
    assert any("engine, rules and vmap" in line for line in report["what_was_audited"]), report["what_was_audited"]

    silu = engine._Silu.backward
    monkeypatch.setattr(engine._Silu, "backward", staticmethod(lambda ctx, g: 3.0 * silu(ctx, g)))
    report = run_audit(run, tmp_path / "broken", suite="quick", canary_overrides=small)
    failed = {c["name"] for c in report["mechanism_checks"] if not c["passed"]}
    assert report["verdict"] == "FAIL" and "per_sample_gradients (rules)" in failed, failed
    assert not any(name.endswith("(vmap)") for name in failed), failed


def test_a_half_written_last_row_of_metrics_csv_is_left_out_not_a_fail(run_dir, tmp_path):
    """Audit walk F1 (stop 42): a run that crashed while writing a row of metrics.csv, audited before a resume,
    read the cut row as a non-private step with a batch size of 1: FAIL (exit 1, "a privacy bug") after all the
    canary training. The row is no record of a step: it is left out, as `dpdm train --resume` drops it, and the
    check says so."""
    import shutil

    from audits.mechanism import check_run
    from audits.suite import _check_metrics

    run, _, doc = run_dir
    for tail in ("4,1", "4,13,0.51,0.25,2,3.1,1\r", "4,13,0.51,0.25,2,3.1,"):   # cut anywhere before its newline
        cut = tmp_path / f"cut{len(tail)}"
        shutil.copytree(run, cut)
        with open(cut / "metrics.csv", "a", newline="") as f:
            f.write(tail)
        _check_metrics(cut)   # not refused: the run is audited
        logged = {c.name: c for c in check_run(cut, doc)}["run_logged_batches"]
        assert logged.passed and "non-private" not in logged.detail, (tail, logged.detail)
        assert "half-written row" in logged.detail and "only 3 logged rows" in logged.detail, logged.detail
    # The same run with its file whole has no such note.
    assert "half-written" not in {c.name: c for c in check_run(run, doc)}["run_logged_batches"].detail


def test_a_damaged_metrics_csv_is_exit_2_before_any_training(run_dir, tmp_path, capsys, monkeypatch):
    """A metrics.csv with a row `dpdm train` does not write (a field missing in the middle, a private flag or a
    batch size that is no 0/1 or integer, no private column) was read after the canary training and gave FAIL
    (exit 1, a privacy bug) or a crash: now one error line, exit 2, before any training (audit walk F1)."""
    import shutil

    import audits.suite

    def no_training(*args, **kwargs):
        raise AssertionError("the audit trained before refusing its input")

    monkeypatch.setattr(audits.suite, "canary_audit", no_training)
    run, _, _ = run_dir
    header, *rows = (run / "metrics.csv").read_bytes().decode().splitlines(keepends=True)   # rows end in \r\n
    spoils = {
        "short_middle_row": (header + rows[0].replace(",1\r\n", "\r\n") + "".join(rows[1:]), "line 2 has 6 fields"),
        "private_yes": (header + rows[0][:-3] + "yes\r\n" + "".join(rows[1:]), "private='yes'"),
        "batch_size_float": (header + rows[0].replace(rows[0].split(",")[1], "12.5", 1) + "".join(rows[1:]),
                             "batch_size='12.5'"),
        "no_private_column": (header.replace(",private", "") + "".join(r.rsplit(",", 1)[0] + "\r\n" for r in rows),
                              "no column private"),
    }
    for name, (text, needle) in spoils.items():
        spoilt = tmp_path / name
        shutil.copytree(run, spoilt)
        (spoilt / "metrics.csv").write_text(text, newline="")
        out = tmp_path / "reports" / name
        rc, stdout, err = _audit(["--run", str(spoilt), "--out", str(out), *SMALL], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("dpdm: error: "), (name, err)
        assert f"--run={str(spoilt)!r}: metrics.csv" in err and needle in err, (name, err)
        assert not out.exists() and stdout == ""


def test_a_run_without_its_plan_json_is_exit_2_before_any_training_with_or_without_plan(run_dir, tmp_path, capsys,
                                                                                          monkeypatch):
    """h74 F3 (stop 44): with --plan, a run folder whose plan.json is missing or does not verify was audited: the
    canary runs trained, then run_plan_matches raised and the verdict was FAIL (exit 1, a privacy bug); without
    --plan the same run is one error line, exit 2. Now both are refused before any training, as every other
    command refuses a run away from its plan.json. A run plan.json that verifies but differs from the claim stays
    a FAIL (test_audit_against_another_plan_fails)."""
    import shutil

    import audits.suite

    def no_training(*args, **kwargs):
        raise AssertionError("the audit trained before refusing its input")

    monkeypatch.setattr(audits.suite, "canary_audit", no_training)
    monkeypatch.setattr(audits.suite, "mechanism_checks", no_training)
    run, _, _ = run_dir
    claimed = tmp_path / "claimed.json"
    shutil.copyfile(run / "plan.json", claimed)   # the very plan the run was trained under
    tampered = json.loads((run / "plan.json").read_text())
    tampered["noise_multiplier"] *= 0.5
    for name, spoil in (("missing", lambda p: p.unlink()),
                        ("tampered", lambda p: p.write_text(json.dumps(tampered))),
                        ("not_json", lambda p: p.write_text("{"))):
        spoilt = tmp_path / name
        shutil.copytree(run, spoilt)
        spoil(spoilt / "plan.json")
        for plan_args in (["--plan", str(claimed)], []):
            out = tmp_path / "reports" / f"{name}{len(plan_args)}"
            rc, stdout, err = _audit(["--run", str(spoilt), *plan_args, "--out", str(out), *SMALL], capsys)
            assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("dpdm: error: "), (name, err)
            assert f"--run={str(spoilt)!r}: " in err and "plan.json" in err, (name, err)
            assert not out.exists() and stdout == ""


@pytest.mark.slow   # about 40 s on 2 cores: three quick audits of a 3-step run (24 canaries, 2 steps)
def test_an_audit_fails_engine_bugs_the_float64_tiny_model_misses(run_dir, tmp_path, monkeypatch):
    """Audit walk F2 (stop 42): with float32 noise halved, or float32 clipping skipped, in dpdm.engine, or a
    Conv2d rule that adds half of one example's gradient to the next one's, every mechanism check of
    `dpdm audit` passed (they ran on a float64 Linear/SiLU model only), and the audit of the run said
    INCONCLUSIVE, as for a correct engine. Now the checks on the run's own network in float32 fail: FAIL."""
    import torch

    from audits.suite import run_audit
    from dpdm import engine

    run, _, _ = run_dir
    real_normal, real_factors, real_conv = engine._standard_normal, engine._clip_factors, engine._conv_param_grads

    def leaky_conv(go, x, w, conf, bias):
        gw, gb = real_conv(go, x, w, conf, bias)
        return gw + 0.5 * torch.roll(gw, 1, 0), (None if gb is None else gb + 0.5 * torch.roll(gb, 1, 0))

    mutants = {
        "noise_half_f32": ("_standard_normal", lambda like, gen: real_normal(like, gen)
                           * (0.5 if like.dtype == torch.float32 else 1.0)),
        "no_clip_f32": ("_clip_factors", lambda norms, c, dtype: torch.ones_like(norms) if dtype == torch.float32
                        else real_factors(norms, c, dtype)),
        "conv_crosstalk": ("_conv_param_grads", leaky_conv),
    }
    found = {}
    for name, (attr, fn) in mutants.items():
        with monkeypatch.context() as m:
            m.setattr(engine, attr, fn)
            report = run_audit(run, tmp_path / name, canary_overrides={"num_canaries": 24, "steps": 2,
                                                                        "background_size": 32})
        found[name] = (report["verdict"], report["exit_code"],
                       sorted(c["name"] for c in report["mechanism_checks"] if not c["passed"]))
    for name, (verdict, rc, failed) in found.items():
        assert verdict == "FAIL" and rc == 1, found
        assert failed and all(n.startswith("network_") for n in failed), found
    assert "network_noise_variance (rules)" in found["noise_half_f32"][2], found
    assert "network_clipping_bound (rules)" in found["no_clip_f32"][2], found
    assert "network_sensitivity_replay (rules)" in found["conv_crosstalk"][2], found


def test_more_canaries_than_the_images_have_room_for_is_exit_2_before_any_training(run_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    """Canaries must differ pairwise in 1/8 of their pixels (audit walk F3): images too small for the count asked
    are refused with one line naming --canaries, before any training (8x8 digits hold 100,000, so the check is
    made to refuse here)."""
    import audits.canary

    monkeypatch.setattr(audits.canary, "ood_canary_problem", lambda m, shape: f"{m} canaries do not fit {shape}")
    run, _, _ = run_dir
    out = tmp_path / "report"
    rc, stdout, err = _audit(["--run", str(run), "--out", str(out), *SMALL], capsys)
    assert rc == 2 and err.strip() == "dpdm: error: --canaries=24: 24 canaries do not fit (1, 8, 8)", err
    assert not out.exists() and stdout == ""


def test_the_verdict_line_rounds_the_lower_bound_down_and_the_claim_up(tmp_path, capsys, monkeypatch):
    """Catches a verdict line that rounds the empirical lower bound up (mut47): the tests above have lower
    bound 0 and claim 9.997, which read the same rounded either way; 1.99999 and 2.00001 do not."""
    import audits.suite

    doc = {"verdict": "INCONCLUSIVE", "reasons": ["r"], "claimed_plan": {"steps": 30, "epsilon": 9.99712},
           "canary_audit": {"claimed_epsilon": 2.00001, "max_epsilon_lower_bound": 1.99999,
                            "training": {"target": {"steps": 3}}}}
    monkeypatch.setattr(audits.suite, "run_audit", lambda *a, **kw: doc)
    (tmp_path / "run").mkdir()
    code = main(["audit", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert code == 3, err
    line = next(ln for ln in err.splitlines() if "audit verdict" in ln)
    assert "empirical epsilon lower bound 1.999 vs 2.001" in line and "over its 30 steps: 9.998" in line, line


def test_a_narrow_fail_never_reads_as_a_bound_below_the_claim(report_inputs, tmp_path, capsys, monkeypatch):
    """h123 F3 (stop 52): a FAIL by 1.72585 > 1.7258 read "empirical epsilon lower bound 1.725 vs 1.726" in the
    verdict line and the same in report.md's table beside "violation **yes**" (4 digits, the bound rounded down and
    the claim up); only the reason widened its digits. All three now print as many digits as the reason does."""
    import copy
    import re

    import audits.suite
    from audits.canary import canary_verdict

    lb, claim = 1.72585, 1.7258
    verdict, reasons = canary_verdict(lb, 5.0, 6.0, claim, num_canaries=200)
    assert verdict == "FAIL" and reasons == ["an attack: one-run epsilon lower bound 1.72585 > claimed epsilon 1.7258"]
    doc = {"verdict": "FAIL", "reasons": reasons, "claimed_plan": {"steps": 30, "epsilon": 9.99712},
           "canary_audit": {"claimed_epsilon": claim, "max_epsilon_lower_bound": lb,
                            "training": {"target": {"steps": 3}}}}
    monkeypatch.setattr(audits.suite, "run_audit", lambda *a, **kw: doc)
    (tmp_path / "run").mkdir()
    code = main(["audit", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "report")])
    line = next(ln for ln in capsys.readouterr().err.splitlines() if "audit verdict" in ln)
    shown = re.search(r"lower bound (\S+) vs (\S+), the epsilon", line)
    assert code == 1 and shown and float(shown[1]) > float(shown[2]), line
    assert "lower bound 1.72585 vs 1.7258," in line, line

    # report.md's table: the target's bound above the claim, one digit count for every row (the claim column alike).
    md_doc = copy.deepcopy(report_inputs[0])
    md_doc["plots"], md_doc["verdict"], md_doc["reasons"] = {}, "FAIL", reasons
    can = md_doc["canary_audit"]
    can["claimed_epsilon"] = claim
    for per in can["attacks"].values():
        per["target"]["one_run"]["epsilon"], per["target"]["violation"] = lb, True
    md = audits.suite._markdown(md_doc)
    rows = [r.split(" | ") for r in md.splitlines() if r.startswith(("| loss | ", "| pia | "))]
    targets = [r for r in rows if r[1] == "target"]
    assert len(targets) == 2, rows
    assert all(r[10].startswith("**yes**") and float(r[2]) > float(r[9]) for r in targets), targets
    assert all(r[2] == "1.72585" and r[9] == "1.7258" for r in targets), targets
    assert {r[9] for r in rows} == {"1.7258"}, rows


def test_a_canary_run_that_goes_non_finite_is_a_fail_with_a_report(run_dir, tmp_path, capsys, monkeypatch):
    """h143 F2 (stop 54): a private step whose updates were not finite failed 14 mechanism checks, then the canary
    scores' statistics raised on the non-finite weights: a traceback, exit 4 ("runtime failure") and no report.
    Non-finite canary weights or scores are themselves a FAIL (a correct step keeps every weight finite), and a
    canary audit that crashes after a failed mechanism check keeps the FAIL: exit 1, report.json and report.md,
    and no scores or plots of an earlier report beside them. (The mechanism checks are stubbed: one passes or
    fails, as wanted.)"""
    import audits.suite
    import dpdm.train as T
    from audits.mechanism import CheckResult

    run, _, _ = run_dir
    out_dir = tmp_path / "r"
    outcome = {"passed": True}
    monkeypatch.setattr(audits.suite, "mechanism_checks", lambda *a, **k: (
        [CheckResult("noise_variance (rules)", outcome["passed"], 1.0, 0.5, "stub")], "none"))
    rc, out, _ = _audit(["--run", str(run), "--out", str(out_dir), *SMALL, "--json"], capsys)
    assert rc == 3 and (out_dir / "scores.npz").is_file() and (out_dir / "roc_target_loss.png").is_file()

    real = T.add_noise
    monkeypatch.setattr(T, "add_noise", lambda g, **kw: {k: v * float("inf") for k, v in real(g, **kw).items()})
    for passed in (True, False):   # non-finite weights: FAIL whether a mechanism check failed or not
        outcome["passed"] = passed
        rc, out, err = _audit(["--run", str(run), "--out", str(out_dir), *SMALL, *(["--json"] if passed else [])],
                              capsys)
        assert rc == 1 and "runtime failure" not in err, err
        report = json.loads((out_dir / "report.json").read_text())
        assert report["verdict"] == "FAIL" and report["canary_audit"] is None, report
        assert json.loads(out) == report if passed else \
            "audit verdict: FAIL  (no epsilon lower bound: the canary audit stopped" in err, err
        assert any("canary run's target model has non-finite weights" in r for r in report["reasons"]), report
        assert any("mechanism check noise_variance (rules) failed" in r for r in report["reasons"]) == (not passed)
        assert sorted(p.name for p in out_dir.iterdir()) == ["report.json", "report.md"]
        assert "None: the canary audit stopped" in (out_dir / "report.md").read_text()

    def crash(*a, **k):
        raise ValueError("in_scores must contain only finite scores")
    monkeypatch.setattr(audits.suite, "canary_audit", crash)
    rc, out, err = _audit(["--run", str(run), "--out", str(out_dir), *SMALL, "--json"], capsys)
    reasons = json.loads(out)["reasons"]
    assert rc == 1 and reasons[-1].startswith("canary audit: stopped by ValueError: in_scores must"), reasons
    outcome["passed"] = True   # with every mechanism check passed, a crash is still a runtime failure
    rc, _, err = _audit(["--run", str(run), "--out", str(out_dir), *SMALL], capsys)
    assert rc == 4 and "dpdm: runtime failure: ValueError: in_scores" in err, err
