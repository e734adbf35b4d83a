"""PrivacyPlan validation, plan.json round-trip and tamper refusal, the ledger helper."""
import dataclasses
import json
import math
import os
import stat
import subprocess
import sys

import pytest
from scipy import optimize, stats

import accounting
from accounting import PlanError, PrivacyPlan

BASE = dict(dataset_size=4000, batch_size=256, steps=300, noise_multiplier=1.0, delta=1e-5)


@pytest.fixture(scope="module")
def doc():
    plan = PrivacyPlan(**BASE, dataset_name="mnist5k").calibrate(epsilon=8.0)
    return accounting.make_plan_document(plan)


@pytest.mark.parametrize("field,value", [
    ("dataset_size", 0), ("dataset_size", 4000.0), ("batch_size", 0), ("batch_size", 5000),
    ("sampling", "shuffle"), ("steps", 0), ("steps", True), ("noise_multiplier", 0.0),
    ("noise_multiplier", float("nan")), ("clip_norm", -1.0), ("noise_multiplicity", 0),
    ("delta", 0.0), ("delta", 1.0), ("target_epsilon", 0.0), ("target_epsilon", float("inf")),
    ("dataset_name", ""), ("delta", 3e-15), ("delta", 1e-13), ("delta", 1e-11), ("steps", 10**7 + 1),
    ("dataset_size", 10**12 + 1), ("noise_multiplier", 10**400), ("target_epsilon", 10**400),
])
def test_validation_names_field_and_value(field, value):
    """The value as reprlib shortens it: a 401-digit number no longer fills the line."""
    import re
    import reprlib

    with pytest.raises(ValueError, match=re.escape(f"{field}={reprlib.repr(value)} ")) as e:
        PrivacyPlan(**(BASE | {field: value}))
    assert len(str(e.value)) < 400


def test_delta_floor_and_step_cap_say_why():
    """Below delta 1e-10 the accountants lose double precision (at 1e-12 dp-accounting's "pessimistic"
    epsilon was below the true one, at 1e-13 dpdm's own PLD contradicted it, and at 3e-15 its answer moved
    with its truncation settings);
    beyond 10**7 steps `--epochs 1e12` ran with no end in sight."""
    with pytest.raises(ValueError, match=r"delta=3e-15 is below 1e-10, where the accountants lose double precision"):
        PrivacyPlan(**(BASE | {"delta": 3e-15, "steps": 100}))
    with pytest.raises(ValueError, match=r"steps=10000001 must be an integer in \[1, 10000000\]"):
        PrivacyPlan(**(BASE | {"steps": 10**7 + 1}))
    assert PrivacyPlan(**(BASE | {"delta": 1e-10, "steps": 100})).delta == accounting.MIN_DELTA
    assert PrivacyPlan(**(BASE | {"delta": 1e-5, "steps": accounting.MAX_STEPS})).steps == accounting.MAX_STEPS


def test_the_delta_floor_grows_with_the_steps():
    """dp-accounting's FFT round-off grows by about 1e-17 of mass per step: at delta 1e-10 and 100,000 steps it
    was 1% of delta (stop 36's review), so a plan's delta must also be at least 1e-13 per step."""
    assert accounting.min_delta(100) == accounting.MIN_DELTA and accounting.min_delta(10**5) == pytest.approx(1e-8)
    with pytest.raises(ValueError, match=r"delta=1e-09 is below 1e-08 for 100000 steps \(at least 1e-13 per step\)"):
        PrivacyPlan(**(BASE | {"delta": 1e-9, "steps": 10**5}))
    assert PrivacyPlan(**(BASE | {"delta": 1e-8, "steps": 10**5})).delta == 1e-8
    with pytest.raises(ValueError, match=r"delta=1e-07 is below 1e-06 for 10000000 steps"):
        PrivacyPlan(**(BASE | {"delta": 1e-7, "steps": accounting.MAX_STEPS}))
    # Exactly 1e-13 per step is allowed: 1e-13 * steps rounded above it in floats, and the refusal read "delta=1e-07
    # is below 1e-07 for 1000000 steps" (stop 42; the mnist-paper preset's 4395 steps at 4.395e-10 likewise).
    assert accounting.delta_floor_problem(1e-7, 10**6) is None and accounting.delta_floor_problem(4.395e-10, 4395) is None
    assert accounting.delta_floor_problem(1e-6, accounting.MAX_STEPS) is None
    assert accounting.delta_floor_problem(0.99999e-7, 10**6) is not None


def test_delta_floor_line_says_to_make_a_plan_again_only_for_a_plan_file(tmp_path, capsys):
    """r1 N3, stop 52: compute_epsilon, calibrate_noise_multiplier, max_steps, PldAccountant, PrivacyPlan and
    `dpdm plan --delta` all refused with "(a plan file from an older dpdm that allowed less must be made again)",
    where there is no plan file. Only a plan file's delta (`accounting.load_plan`, `parse_plan`) is told so."""
    from accounting import PldAccountant, dpsgd_event
    from cli.main import main

    line = "delta=1e-12 is below 1e-10, where the accountants lose double precision"
    again = " (a plan file from an older dpdm that allowed less must be made again)"
    calls = (lambda: PrivacyPlan(**(BASE | {"delta": 1e-12, "steps": 100})),
             lambda: accounting.compute_epsilon(sample_rate=0.064, noise_multiplier=1.0, steps=100, delta=1e-12),
             lambda: accounting.calibrate_noise_multiplier(sample_rate=0.064, steps=100, target_epsilon=9.0,
                                                           delta=1e-12),
             lambda: accounting.max_steps(sample_rate=0.01, noise_multiplier=1.0, target_epsilon=6.0, delta=1e-12),
             lambda: PldAccountant(1e-4).epsilon(dpsgd_event(0.064, 1.0, 100), 1e-12))
    for call in calls:
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == line, e.value
    assert accounting.delta_floor_problem(1e-12, 100) == line
    assert accounting.delta_floor_problem(1e-12, 100, plan_file=True) == line + again
    d = json.loads(accounting.make_plan_document(PrivacyPlan(**(BASE | {"steps": 100}))).to_json())
    d["delta"] = 1e-12   # as an older dpdm that allowed it wrote it
    (tmp_path / "plan.json").write_text(json.dumps(d))
    with pytest.raises(PlanError) as e:
        accounting.load_plan(tmp_path / "plan.json")
    assert str(e.value) == f"{tmp_path / 'plan.json'}: {line}{again}", e.value
    code = main(["plan", "--eps", "10", "--delta", "1e-16"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().endswith("--delta=1e-16 is below 1e-10, where the accountants lose double "
                                              "precision"), err


def test_plan_is_frozen_and_hashable():
    plan = PrivacyPlan(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.steps = 1
    assert plan.sample_rate == 256 / 4000
    assert hash(plan) == hash(PrivacyPlan(**BASE))
    assert PrivacyPlan(**(BASE | {"delta": 1e-3})).warnings()  # delta >= 1/N
    assert not plan.warnings()


def test_numpy_scalars_make_the_plan_of_the_numbers_they_hold(doc):
    """h154 N3 (stop 55): batch_size=np.int64(50) was "must be an integer >= 1", np.float32 noise multipliers, clip
    norms and deltas "must be a finite number > 0" or "in (0, 1)". They are the numbers they hold (as in the engine
    since stop 53): the same plan, digest and document JSON. Bools and whole floats stay refused where integers are
    needed."""
    import numpy as np

    plain = doc.plan
    given = dataclasses.replace(
        plain, dataset_size=np.int64(plain.dataset_size), batch_size=np.int32(plain.batch_size),
        steps=np.uint16(plain.steps), noise_multiplicity=np.int64(plain.noise_multiplicity),
        noise_multiplier=np.float64(plain.noise_multiplier), clip_norm=np.float32(plain.clip_norm),
        delta=np.float64(plain.delta), target_epsilon=np.float32(plain.target_epsilon))
    assert given == plain and hash(given) == hash(plain) and given.digest() == plain.digest()
    assert [type(getattr(given, f.name)) for f in dataclasses.fields(given)] == \
        [type(getattr(plain, f.name)) for f in dataclasses.fields(plain)]
    assert dataclasses.replace(doc, plan=given).to_json() == doc.to_json()
    assert accounting.epsilon_spent(plain, np.int64(3)) == accounting.epsilon_spent(plain, 3)
    for field, value, why in [("batch_size", np.float64(256.0), "an integer"), ("steps", np.bool_(True), "an integer"),
                              ("noise_multiplier", np.bool_(True), "a finite number"),
                              ("delta", np.float32("nan"), "in"), ("clip_norm", np.float32(-1.0), "a finite number")]:
        with pytest.raises(ValueError, match=f"^{field}=.* must be {why} "):
            PrivacyPlan(**(BASE | {field: value}))


def test_document_has_the_design_keys(doc):
    d = doc.to_dict()
    assert d["format"] == "dpdm.plan/1"
    assert d["dataset"] == {"name": "mnist5k", "size": 4000}
    for key in ("sampling", "sample_rate", "batch_size", "steps", "noise_multiplier", "clip_norm",
                "noise_multiplicity", "delta", "target_epsilon", "versions", "digest"):
        assert key in d
    eps = d["epsilon"]
    assert set(eps) >= {"certified", "certified_by", "rdp", "pld", "prv"}
    assert set(eps["prv"]) == {"lower", "estimate", "upper"}
    assert eps["certified"] <= d["target_epsilon"] == 8.0
    assert d["digest"].startswith("sha256:") and len(d["digest"]) == 7 + 64
    assert set(d["versions"]) == {"dpdm", "dp-accounting", "prv-accountant"}


def test_round_trip(doc, tmp_path):
    path = tmp_path / "plan.json"
    accounting.write_plan(doc, path)
    loaded = accounting.load_plan(path)
    assert loaded.plan == doc.plan
    assert loaded.epsilon == doc.epsilon and loaded.digest == doc.digest
    assert loaded.to_dict()["epsilon"]["prv"] == doc.to_dict()["epsilon"]["prv"]
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temp file left behind


def _tampered(doc, tmp_path, edit):
    d = json.loads(doc.to_json())
    edit(d)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(noise_multiplier=d["noise_multiplier"] * 0.9), "digest mismatch"),
    (lambda d: d.update(steps=d["steps"] + 1), "digest mismatch"),
    (lambda d: d["dataset"].update(size=5000), "sample_rate"),
    (lambda d: d.update(digest="sha256:" + "0" * 64), "digest mismatch"),
    (lambda d: d["epsilon"].update(certified=d["epsilon"]["certified"] * 0.9), "does not re-compute"),
    (lambda d: d["epsilon"].update(certified=d["epsilon"]["certified"] * 2), "exceeds target_epsilon"),
    (lambda d: d.pop("delta"), "missing key 'delta'"),
    (lambda d: d.update(format="dpdm.plan/0"), "format="),
    (lambda d: d.update(steps=0), "steps=0"),
])
def test_tampered_plan_is_refused(doc, tmp_path, edit, match):
    with pytest.raises(PlanError, match=match):
        accounting.load_plan(_tampered(doc, tmp_path, edit))


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["epsilon"].update(rdp=d["epsilon"]["rdp"] * 0.8), "epsilon.rdp=.* does not re-compute"),
    (lambda d: d["epsilon"].update(rdp=None), "epsilon.rdp=None does not re-compute"),
    (lambda d: d["epsilon"].update(pld=d["epsilon"]["pld"] * 0.99), "epsilon.pld=.* does not re-compute"),
    (lambda d: d["epsilon"]["prv"].update(upper=d["epsilon"]["prv"]["upper"] / 2), "epsilon.prv.upper=.* does not re-"),
    (lambda d: d["epsilon"]["prv"].update(lower=0.0), "epsilon.prv.lower=0.0 does not re-compute"),
    (lambda d: d["epsilon"].update(prv={"lower": None, "estimate": None, "upper": None}),
     "epsilon.prv is empty, but prv-accountant gives figures"),
    (lambda d: d["epsilon"].update(prv_failed="RuntimeError: x"), "epsilon.prv_failed='RuntimeError: x', but prv-ac"),
    (lambda d: d["epsilon"].update(independent={"lower": 1.0, "upper": 9.0, "method": "fft"}),
     "epsilon.independent.lower=1.0 does not re-compute"),
    (lambda d: d["epsilon"].update(prv_overruled="forged: PRV was never overruled"),
     r"epsilon.independent is missing, but dpdm's own PLD brackets this plan at \[.*PRV was overruled records it"),
])
def test_an_edited_informational_figure_is_refused(doc, tmp_path, edit, match):
    """The epsilon block's other figures are outside the digest and certify nothing, but travel with the
    plan into a run's plan.json: an edited one was copied there as if an accountant had given it."""
    with pytest.raises(PlanError, match=match):
        accounting.load_plan(_tampered(doc, tmp_path, edit))
    loaded = accounting.load_plan(_tampered(doc, tmp_path, lambda d: None))
    assert (loaded.rdp, loaded.pld, loaded.prv) == (doc.rdp, doc.pld, doc.prv)


def test_a_prv_overruled_record_is_refused_unless_dpdms_own_pld_derives_it(doc, tmp_path):
    """`prv_overruled` was trusted on load: one key turned off the check of a PRV lower bound above the certificate
    (stop 42's), and the file travelled into the run's plan.json (stop 46). It must be what make_plan_document
    derives: PRV disagrees with the certificate and dpdm's own PLD, present and re-computed, refutes PRV."""
    own = accounting.FftPldAccountant().epsilon(doc.plan.to_event(), doc.plan.delta)
    bracket = {"lower": own.lower, "upper": own.upper, "method": "fft"}
    err = doc.prv_eps_error

    def edit(prv=None, version=None, overruled="forged"):
        def apply(d):
            d["epsilon"].update(independent=bracket, prv_overruled=overruled)
            d["epsilon"]["prv"].update(prv or {})
            if version:
                d["versions"]["prv-accountant"] = version
        return apply

    with pytest.raises(PlanError, match=r"epsilon.prv_overruled='forged', but PRV's figures .* do not disagree with "
                                        "the certificate"):
        accounting.load_plan(_tampered(doc, tmp_path, edit()))
    # Another prv-accountant moves PRV's figures by up to twice its error: a lower bound (and estimate) just above the
    # certificate is refused, with the record too, since dpdm's own PLD bracket holds them.
    above = (doc.epsilon + own.upper) / 2
    assert own.lower <= doc.epsilon < above < own.upper and above - doc.prv.lower < 2 * err
    moved = {"lower": above, "estimate": max(above, doc.prv.estimate)}
    with pytest.raises(PlanError, match=r"epsilon.prv=.* disagrees with the certificate \(PRV lower bound"):
        accounting.load_plan(_tampered(doc, tmp_path, edit(moved, "0.1.0", overruled=None)))
    with pytest.raises(PlanError, match=r"epsilon.prv_overruled='forged', but dpdm's own PLD bracket \[.*\] does not "
                                        "refute PRV's figures"):
        accounting.load_plan(_tampered(doc, tmp_path, edit(moved, "0.1.0")))
    with pytest.raises(PlanError, match=r"epsilon.prv=\[None, .*\] has nulls beside figures"):
        accounting.load_plan(_tampered(doc, tmp_path, edit({"lower": None}, "0.1.0", overruled=None)))


HUGE = 10**400  # a 401-digit integer: valid JSON, too large for a float


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(noise_multiplier=HUGE), "noise_multiplier=1000"),
    (lambda d: d.update(delta=HUGE), "delta=1000"),
    (lambda d: d.update(target_epsilon=HUGE), "target_epsilon=1000"),
    (lambda d: d.update(sample_rate=HUGE), "sample_rate=1000"),
    (lambda d: d["dataset"].update(size=HUGE), "dataset_size=1000"),
    (lambda d: d.update(steps=HUGE), "steps=1000"),
    (lambda d: d["epsilon"].update(certified=HUGE), "epsilon.certified=1000"),
    (lambda d: d["epsilon"].update(prv_eps_error=HUGE), "epsilon.prv_eps_error=1000"),
    (lambda d: d["epsilon"].update(prv_eps_error="0.1"), "epsilon.prv_eps_error='0.1'"),
    (lambda d: d["epsilon"].update(rdp=HUGE), "epsilon.rdp=1000"),
    (lambda d: d["epsilon"].update(rdp="9.9"), "epsilon.rdp='9.9'"),
    (lambda d: d["epsilon"].update(prv=[1, 2]), r"epsilon.prv=\[1, 2\]"),
    (lambda d: d["epsilon"]["prv"].update(lower="x"), "epsilon.prv="),
    (lambda d: d["epsilon"].update(independent={"lower": [], "upper": 1.0}), "epsilon.independent="),
    (lambda d: d["epsilon"].update(independent="fft"), "epsilon.independent='fft'"),
    (lambda d: d.update(versions=5), "versions=5"),        # outside the digest: any hand edit reaches it
    (lambda d: d.update(versions=[1, 2]), r"versions=\[1, 2\]"),
    (lambda d: d.update(versions={"dpdm": 1}), "versions="),
])
def test_malformed_plan_is_a_plan_error(doc, tmp_path, edit, match):
    """Huge integers and wrong types used to escape as OverflowError or TypeError: a traceback from
    `dpdm train --plan` instead of one error line."""
    with pytest.raises(PlanError, match=match):
        accounting.load_plan(_tampered(doc, tmp_path, edit))


@pytest.mark.parametrize("prv_eps_error", [1e-9, 0.1, 1e6])
def test_a_prv_error_plan_could_not_have_used_is_refused_before_prv_runs(doc, tmp_path, prv_eps_error):
    """prv_eps_error is outside the digest and sets PRV's grid: 1e-9 asked for 1.96 TiB (MemoryError), 1e-5
    ran for minutes, from `dpdm train --plan` or a release file."""
    def edit(d):
        d["epsilon"].update(prv_eps_error=prv_eps_error)

    with pytest.raises(PlanError, match=rf"epsilon.prv_eps_error={prv_eps_error!r} must be in \[0.1"):
        accounting.load_plan(_tampered(doc, tmp_path, edit))
    lo, hi = accounting.prv_eps_error_range(doc.pld.upper)
    assert lo == doc.prv_eps_error < hi
    with pytest.raises(ValueError, match="prv_relative_eps_error=1e-06"):
        accounting.make_plan_document(doc.plan, prv_relative_eps_error=1e-6)


def test_a_huge_noise_multiplier_writes_a_plan_that_loads(tmp_path):
    """At noise multiplier 1e9 PRV's estimate came out as -1e-5: `dpdm plan` wrote it and `dpdm train`
    refused the file ("is not an epsilon")."""
    doc = accounting.make_plan_document(PrivacyPlan(**(BASE | dict(noise_multiplier=1e9))))
    assert doc.prv.lower == doc.prv.estimate == 0.0 <= doc.prv.upper
    accounting.write_plan(doc, tmp_path / "plan.json")
    assert accounting.load_plan(tmp_path / "plan.json").epsilon == doc.epsilon == 0.0


def test_a_noise_multiplier_too_small_to_account_for_names_the_bound():
    """At 1e-9 the PLD grid went beyond numpy's "Maximum allowed size exceeded"; at 1e-3 it ran for minutes."""
    with pytest.raises(ValueError, match=r"noise_multiplier=1e-09 is too small to account for: it must be >= 0.05"):
        PrivacyPlan(**(BASE | dict(noise_multiplier=1e-9)))
    assert PrivacyPlan(**(BASE | dict(noise_multiplier=0.05))).noise_multiplier == 0.05


@pytest.mark.parametrize("content,match", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[" * 100_000, "not a locked dpdm.plan/1 plan"),             # RecursionError in json
    (b'{"format": ' + b"9" * 5000 + b"}", "an integer of 5000 digits is no plan's number"),  # beyond int()'s limit
])
def test_undecodable_plan_files_are_plan_errors(tmp_path, content, match):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(PlanError, match=match):
        accounting.load_plan(path)


def test_prv_below_pld_does_not_lower_the_certificate(monkeypatch, tmp_path):
    """PRV's upper bound just below PLD's certified before (certified_by 'prv'). prv-accountant 0.2.0's "upper
    bound" fell below the exact epsilon at large sample rates and many steps, where nothing could refute it
    (`test_prv_never_certifies_below_the_exact_epsilon`); so PLD certifies, always, and the plan loads."""
    pld = accounting.PldAccountant(1e-3).epsilon(PrivacyPlan(**BASE).to_event(), BASE["delta"]).upper
    real_prv = accounting.PrvAccountant._epsilon
    monkeypatch.setattr(accounting.PrvAccountant, "_epsilon", lambda self, terms, delta: dataclasses.replace(
        real_prv(self, terms, delta), upper=pld * 0.9999))
    doc = accounting.make_plan_document(PrivacyPlan(**BASE))
    assert doc.certified_by == "pld" and doc.epsilon == doc.pld.upper > doc.prv.upper
    assert doc.prv_overruled is None and doc.independent is None
    path = tmp_path / "plan.json"
    accounting.write_plan(doc, path)
    assert accounting.load_plan(path).epsilon == doc.epsilon


def test_without_prv_a_delta_too_small_for_dpdms_own_pld_is_refused(monkeypatch):
    """At delta 1e-10 (the floor) dpdm's own PLD cannot bracket this plan. Where PRV fails and that
    PLD must cross-check, its round-off used to put its 'rigorous' lower bound above the certificate,
    and the plan stopped with "accountants disagree"; now it says that delta is too small."""
    def failing(self, terms, delta):
        raise RuntimeError("Discrete mean differs from continuous mean significantly")

    monkeypatch.setattr(accounting.PrvAccountant, "_epsilon", failing)
    plan = PrivacyPlan(**(BASE | {"steps": 100, "delta": 1e-10}))
    with pytest.raises(accounting.FftPrecisionError, match="no bracket at delta=1e-10"):
        accounting.make_plan_document(plan)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_plan_file_gets_the_umask_mode_not_0600(doc, tmp_path, umask, mode):
    """mkstemp's 0600 kept `dpdm train` or an audit running as another user from reading the plan."""
    path = tmp_path / "plan.json"
    path.write_text("{}")
    os.chmod(path, 0o600)
    old = os.umask(umask)
    try:
        accounting.write_plan(doc, path)  # a rewrite too
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert accounting.load_plan(path).digest == doc.digest


def test_plan_file_is_fsynced_with_its_folder(doc, tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    accounting.write_plan(doc, tmp_path / "plan.json")
    assert synced == [False, True]  # the file's data, then the rename in its folder


def test_unreadable_plans_are_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": ')
    with pytest.raises(PlanError, match="not valid JSON"):
        accounting.load_plan(bad)
    with pytest.raises(PlanError, match="cannot read"):
        accounting.load_plan(tmp_path / "missing.json")
    bad.write_text("[1, 2]")
    with pytest.raises(PlanError, match="expected a JSON object"):
        accounting.load_plan(bad)


def test_repeated_keys_and_endless_integers_are_refused(tmp_path):
    """json keeps the last of repeated keys, other readers the first: a plan with "steps" twice trained the second
    value. An integer of thousands of digits was refused with Python's advice to raise its limit."""
    doc = accounting.make_plan_document(PrivacyPlan(**(BASE | {"noise_multiplier": 1.0})))
    text = doc.to_json()
    path = tmp_path / "plan.json"
    steps = f'"steps": {doc.plan.steps}'
    assert text.count(steps) == 1
    for edited, needle in ((text.replace(steps, f'"steps": 1000000, {steps}'),
                            "the key 'steps' appears more than once"),
                           (text.replace('"epsilon": {', '"epsilon": {"certified_by": "prv", ', 1),
                            "the key 'certified_by' appears more than once"),
                           (text.replace(steps, '"steps": ' + "9" * 5000), "an integer of 5000 digits is no plan's"),
                           (text.replace(steps, '"steps": ' + "9" * 400), r"steps=9+\.\.\.9+ must be")):
        path.write_text(edited)
        with pytest.raises(PlanError, match=needle) as e:
            accounting.load_plan(path)
        assert len(str(e.value)) < 300 and "set_int_max_str_digits" not in str(e.value)
    path.write_text(text)
    assert accounting.load_plan(path).digest == doc.digest


def test_plan_that_misses_its_target_is_not_calibrated():
    plan = PrivacyPlan(**(BASE | {"noise_multiplier": 0.7, "target_epsilon": 1.0}))
    with pytest.raises(accounting.NotCalibratedError, match="above target_epsilon=1.0"):
        accounting.make_plan_document(plan)


def test_a_plan_that_misses_its_target_by_a_tenth_of_a_percent_is_not_calibrated(doc):
    """mut51 p12, stop 50: the target is a hard ceiling, so a certificate 0.1% above it is refused, not only a
    gross miss (`certified > target_epsilon * 1.01` passed the test above, whose plan misses 1.0 by far)."""
    plan = dataclasses.replace(doc.plan, target_epsilon=doc.epsilon * 0.999)
    with pytest.raises(accounting.NotCalibratedError, match="above target_epsilon"):
        accounting.make_plan_document(plan)


def test_a_document_certified_above_its_target_by_any_margin_is_refused(doc):
    """mut51 p17, stop 50: a certified epsilon may not exceed the target at all, not even within the
    re-computation's tolerance (`stored > target * (1 + RECOMPUTE_RTOL)` let a certificate 0.05% above its target
    through, and the ledger, capped by it, then reported more than the target). A document whose certificate
    re-computes exactly, under a target 0.05% below it."""
    accounting.verify_document(doc)
    above = dataclasses.replace(doc, plan=dataclasses.replace(doc.plan, target_epsilon=doc.epsilon * (1 - 5e-4)))
    with pytest.raises(PlanError, match="exceeds target_epsilon"):
        accounting.verify_document(above)


def _scaled(monkeypatch, cls, factor, lower_only=None):
    """Make `cls` report its epsilon times `factor` (a faulty accountant)."""
    real = cls._epsilon

    def scaled(self, terms, delta):
        r = real(self, terms, delta)
        lower = None if r.lower is None else r.lower * factor
        estimate = None if r.estimate is None else r.estimate * factor
        if lower_only is not None:
            return dataclasses.replace(r, lower=lower_only(r))
        return dataclasses.replace(r, lower=lower, estimate=estimate, upper=r.upper * factor)

    monkeypatch.setattr(cls, "_epsilon", scaled)


def test_prv_alone_against_the_certificate_is_overruled_and_recorded(monkeypatch, tmp_path):
    """A PRV that brackets a higher epsilon, refuted by dpdm's own PLD, no longer stops the plan (the
    real case: prv-accountant 0.2.0 at sample rate 0.128); the plan records why."""
    _scaled(monkeypatch, accounting.PrvAccountant, 1.5)
    doc = accounting.make_plan_document(PrivacyPlan(**BASE))
    assert doc.certified_by == "pld" and doc.epsilon == doc.pld.upper
    assert doc.independent.lower <= doc.epsilon <= doc.independent.upper < doc.prv.lower
    assert doc.prv_overruled.startswith("PRV lower bound")
    path = tmp_path / "plan.json"
    accounting.write_plan(doc, path)
    loaded = accounting.load_plan(path)
    assert loaded.prv_overruled == doc.prv_overruled and loaded.independent == doc.independent
    assert json.loads(path.read_text())["epsilon"]["independent"]["method"] == "fft"
    assert loaded.to_json() + "\n" == path.read_text()   # re-deriving the record changes no byte
    with pytest.raises(PlanError, match="epsilon.independent is missing, .* a plan whose PRV was overruled"):
        accounting.load_plan(_tampered(doc, tmp_path, lambda d: d["epsilon"].pop("independent")))


def test_prv_erring_low_cannot_lower_the_certificate(monkeypatch):
    """PRV's figures all 20% low: its lower bound is under the certificate, so nothing disagrees, and the
    certificate stays PLD's."""
    _scaled(monkeypatch, accounting.PrvAccountant, 0.8)
    doc = accounting.make_plan_document(PrivacyPlan(**BASE))
    assert doc.certified_by == "pld" and doc.epsilon == doc.pld.upper
    assert doc.prv.upper < doc.epsilon and doc.prv_overruled is None


def _exact_full_batch_epsilon(steps: int, sigma: float, delta: float) -> float:
    """Full batches (q = 1): `steps` Gaussian steps are exactly mu-GDP with mu = sqrt(steps) / sigma."""
    mu = math.sqrt(steps) / sigma
    return optimize.brentq(lambda e: stats.norm.cdf(-e / mu + mu / 2)
                           - math.exp(e) * stats.norm.cdf(-e / mu - mu / 2) - delta, 0, 300)


@pytest.mark.parametrize("steps, sigma", [(50_000, 20.0), (50_000, 21.251)])
def test_prv_never_certifies_below_the_exact_epsilon(steps, sigma):
    """Full batches (q = 1): T steps of the Gaussian mechanism are exactly mu-GDP with mu = sqrt(T) / sigma, so
    the exact epsilon is known. prv-accountant's upper bound there is 88.85 and 86.25 against exact 109.34 and
    99.40, and it certified them (accounting walk F1, stop 40)."""
    plan = PrivacyPlan(dataset_size=1000, batch_size=1000, steps=steps, noise_multiplier=sigma, delta=1e-5,
                       dataset_name="npz:x")
    doc = accounting.make_plan_document(plan)
    exact = _exact_full_batch_epsilon(steps, sigma, 1e-5)
    assert exact <= doc.epsilon <= exact * 1.01 and doc.certified_by == "pld"


def test_a_low_pld_certificate_is_still_an_error(monkeypatch):
    """When it is the certificate that is wrong, the third accountant sides with PRV: an error."""
    _scaled(monkeypatch, accounting.PldAccountant, 0.9)
    with pytest.raises(accounting.AccountingError, match="PRV lower bound .* does not settle it"):
        accounting.make_plan_document(PrivacyPlan(**BASE))


def test_an_undecided_disagreement_is_still_an_error(monkeypatch):
    """PRV's lower bound just above the certificate but inside dpdm's own bracket: nothing proves
    either side wrong, so the plan is refused."""
    pld = accounting.PldAccountant(1e-3).epsilon(PrivacyPlan(**BASE).to_event(), BASE["delta"]).upper
    _scaled(monkeypatch, accounting.PrvAccountant, 1.0, lower_only=lambda r: pld * 1.0005)
    with pytest.raises(accounting.AccountingError, match="does not settle it"):
        accounting.make_plan_document(PrivacyPlan(**BASE))


def test_prv_is_overruled_only_where_dpdms_own_bracket_excludes_its_bounds():
    """mut51 p15, stop 50: PRV's disagreement is overruled only where dpdm's own bracket is disjoint from PRV's
    bounds; a bracket that overlaps them settles nothing, and the disagreement stays an AccountingError
    (`prv.upper < independent.upper` overruled PRV wherever its upper bound was merely below the bracket's top)."""
    from accounting.accountants import EpsilonReport
    from accounting.plan import _prv_overruled

    prv = EpsilonReport(1.2, 1.3, 1.4, "prv")            # its lower bound above the certificate 1.0
    overlapping = EpsilonReport(0.9, None, 1.5, "fft")   # holds the certificate, and PRV's bounds too
    assert _prv_overruled(1.0, prv, overlapping) is None
    disjoint = EpsilonReport(0.9, None, 1.1, "fft")      # below PRV's lower bound: PRV is refuted
    assert "PRV lower bound 1.2 > dpdm's own PLD upper bound 1.1" in _prv_overruled(1.0, prv, disjoint)
    low = EpsilonReport(0.5, 0.6, 0.7, "prv")            # wholly below the bracket: refuted from the other side
    assert "PRV upper bound 0.7 < dpdm's own PLD lower bound 0.8" in _prv_overruled(
        1.0, low, EpsilonReport(0.8, None, 1.1, "fft"))
    assert _prv_overruled(1.0, low, EpsilonReport(0.65, None, 1.1, "fft")) is None


# prv-accountant 0.2.0 raises "Discrete mean differs from continuous mean significantly" for this plan
# (mnist5k, expected batch 512, 60 steps, eps 10: sample rate 0.128, noise multiplier 0.836;
# microsoft/prv_accountant#42); PLD, RDP and dpdm's own PLD all compute it.
PRV_FAILS = dict(dataset_size=4000, batch_size=512, steps=60, noise_multiplier=1.0, noise_multiplicity=2,
                 delta=1e-5, dataset_name="mnist5k")


def test_a_plan_prv_cannot_compute_is_cross_checked_by_dpdms_own_pld(tmp_path):
    """The real case: before, `dpdm plan --batch-size 512 --steps 60` stopped with "the PRV cross-check
    failed". Now PLD certifies, dpdm's own PLD brackets it, and the plan records PRV's failure."""
    plan = PrivacyPlan(**PRV_FAILS).calibrate(epsilon=10.0)
    with pytest.raises(RuntimeError, match="Discrete mean"):
        accounting.PrvAccountant(eps_error=0.2).epsilon(plan.to_event(), plan.delta)
    doc = accounting.make_plan_document(plan)
    assert doc.certified_by == "pld" and doc.epsilon == doc.pld.upper <= 10.0
    assert doc.prv_failed.startswith("RuntimeError: Discrete mean differs")
    assert doc.prv.upper is None and doc.prv.lower is None
    assert doc.independent.lower <= doc.epsilon <= doc.independent.upper <= doc.rdp.upper
    path = tmp_path / "plan.json"
    accounting.write_plan(doc, path)
    loaded = accounting.load_plan(path)   # what `dpdm train` does: re-computes the certificate
    assert loaded.prv_failed == doc.prv_failed and loaded.independent == doc.independent
    assert loaded.epsilon == doc.epsilon and loaded.digest == doc.digest
    eps = json.loads(path.read_text())["epsilon"]
    assert eps["prv"] == {"lower": None, "estimate": None, "upper": None} and eps["certified_by"] == "pld"
    assert loaded.to_json() + "\n" == path.read_text()   # re-deriving its records changes no byte

    def made_by_another(d):
        d["versions"]["prv-accountant"] = "0.1.0"
        d["epsilon"].pop("prv_failed")

    # Figures of its own are checked too: PRV still fails, so none may stand in the file. dpdm's own PLD bracket, its
    # only cross-check, could be deleted, and with another prv-accountant prv_failed too (stop 46).
    for edit, match in [(lambda d: d["epsilon"].update(prv={"lower": 9.0, "estimate": 9.5, "upper": 9.9}),
                         "epsilon.prv has figures, but prv-accountant gives none"),
                        (lambda d: d["epsilon"].pop("prv_failed"), "epsilon.prv_failed=None, but prv-accountant fails"),
                        (lambda d: d["epsilon"]["independent"].update(upper=doc.independent.upper * 2),
                         "epsilon.independent.upper=.* does not re-compute"),
                        (lambda d: d["epsilon"].pop("independent"),
                         r"epsilon.independent is missing, but dpdm's own PLD brackets this plan at \[.* PRV failed"),
                        (made_by_another, "epsilon.prv is empty, but epsilon.prv_failed does not say why")]:
        with pytest.raises(PlanError, match=match):
            accounting.load_plan(_tampered(doc, tmp_path, edit))


def test_without_prv_a_certificate_below_dpdms_lower_bound_is_an_error(monkeypatch):
    """PRV's failure is not a free pass: a PLD certificate that dpdm's own PLD refutes still stops the plan."""
    plan = PrivacyPlan(**PRV_FAILS).calibrate(epsilon=10.0)
    _scaled(monkeypatch, accounting.PldAccountant, 0.99)
    with pytest.raises(accounting.AccountingError, match=r"prv-accountant failed: .*own PLD lower bound"):
        accounting.make_plan_document(plan)


def test_rdp_disagreement_is_an_error(monkeypatch):
    _scaled(monkeypatch, accounting.RdpAccountant, 0.5)
    with pytest.raises(accounting.AccountingError, match="> RDP"):
        accounting.make_plan_document(PrivacyPlan(**BASE))


def test_epsilon_spent_is_a_monotone_ledger(doc):
    plan = doc.plan
    assert accounting.epsilon_spent(plan, 0) == 0.0
    spent = [accounting.epsilon_spent(plan, s) for s in (1, 10, 100, plan.steps)]
    assert spent == sorted(spent)
    assert spent[-1] == doc.epsilon  # the ledger ends at the certified promise
    with pytest.raises(ValueError, match="steps_done="):
        accounting.epsilon_spent(plan, plan.steps + 1)
    with pytest.raises(ValueError, match="steps_done=-1"):
        accounting.epsilon_spent(plan, -1)


def test_accounting_never_imports_torch():
    code = "import sys, accounting; accounting.compute_epsilon(sample_rate=0.1, noise_multiplier=1.0, steps=10, delta=1e-5); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rdp_certifies_where_smaller_than_pld(tmp_path):
    """Over a million full-batch steps PLD's grid makes its bound loose (102.67 against an exact 91.82) and RDP's is
    smaller (96.12). PRV's 93.88 certified this plan before; PRV no longer certifies, and PLD above RDP was an
    'accountants disagree' error. Both are rigorous: the smaller certifies, and the file says which."""
    plan = PrivacyPlan(dataset_size=1000, batch_size=1000, steps=10**6, noise_multiplier=100.0, delta=1e-5,
                       dataset_name="npz:x")
    doc = accounting.make_plan_document(plan)
    exact = _exact_full_batch_epsilon(plan.steps, plan.noise_multiplier, 1e-5)
    assert doc.certified_by == "rdp" and exact <= doc.epsilon == doc.rdp.upper < doc.pld.upper
    assert doc.independent is not None and doc.independent.lower <= doc.epsilon   # checked by dpdm's own PLD
    path = tmp_path / "plan.json"
    accounting.write_plan(doc, path)
    loaded = accounting.load_plan(path)
    assert (loaded.epsilon, loaded.certified_by) == (doc.epsilon, "rdp")
    assert accounting.certified_epsilon(plan) == accounting.certified_epsilon(plan, "rdp") == doc.epsilon
    assert accounting.certified_epsilon(plan, "pld") == doc.pld.upper
    with pytest.raises(PlanError, match="certified=96.1.* by PLD does not re-compute"):   # relabelled
        accounting.load_plan(_tampered(doc, tmp_path, lambda d: d["epsilon"].update(certified_by="pld")))
    with pytest.raises(PlanError, match="epsilon.independent is missing, .* a plan whose certificate is RDP's"):
        accounting.load_plan(_tampered(doc, tmp_path, lambda d: d["epsilon"].pop("independent")))


def test_a_plan_file_certified_by_prv_is_refused(doc, tmp_path):
    """dpdm before stop 40 could write certified_by 'prv' (a PRV figure below PLD's); such a certificate may lie
    below the exact epsilon, so the file is refused in one line, and so is an edit of 'pld' to 'prv'."""
    with pytest.raises(PlanError, match="epsilon certified by PRV: dpdm no longer certifies with prv-accountant's "
                                        rf"upper bound.*This plan's certificate is epsilon {doc.epsilon:.6g}, "
                                        ".*make a new plan with `dpdm plan`"):
        accounting.load_plan(_tampered(doc, tmp_path, lambda d: d["epsilon"].update(certified_by="prv")))
    with pytest.raises(ValueError, match="no longer certifies"):
        accounting.certified_epsilon(doc.plan, "prv")
    assert accounting.certified_epsilon(doc.plan) == doc.epsilon
    with pytest.raises(PlanError, match="by RDP does not re-compute"):      # PLD's figure relabelled RDP's
        accounting.load_plan(_tampered(doc, tmp_path, lambda d: d["epsilon"].update(certified_by="rdp")))


def test_a_forged_tiny_target_is_refused_at_once(doc, tmp_path):
    """target_epsilon sets the certificate's PLD grid; forged to 1e-9 with a certified 0 and the digest
    recomputed, verification ran the PLD for minutes and gigabytes. A quick lower bound refutes it first."""
    forged = dataclasses.replace(doc.plan, target_epsilon=1e-9)

    def edit(d):
        d.update(target_epsilon=1e-9, digest=forged.digest())
        d["epsilon"].update(certified=0.0)

    with pytest.raises(PlanError, match=r"target_epsilon=1e-09 is below a lower bound on the mechanism's epsilon"):
        accounting.load_plan(_tampered(doc, tmp_path, edit))
    # Over many steps the coarse grid's bracket of all of them is too wide: a prefix of them gives the bound.
    long = accounting.make_plan_document(PrivacyPlan(**(BASE | {"batch_size": 4000 // 12, "steps": 12_000}))
                                         .calibrate(epsilon=10.0))
    forged = dataclasses.replace(long.plan, target_epsilon=1e-9)
    with pytest.raises(PlanError, match=r"target_epsilon=1e-09 is below a lower bound on the mechanism's epsilon"):
        accounting.load_plan(_tampered(long, tmp_path, edit))


def test_a_forged_tiny_target_is_refused_at_once_where_delta_is_at_the_floor(tmp_path):
    """At delta 1e-10 the quick bound's coarse FFT has no precision, so the bound was 0 and a forged target of 1e-9
    (digest recomputed) went on to a PLD grid as fine as it asks: 5.5 minutes and 3.4 GB, then "needs more memory
    than this machine has", for an edited plan (stop 46, h84 F2). A lower bound at a larger delta bounds it too."""
    from accounting.fft_pld import FftPldAccountant, FftPrecisionError
    from accounting.plan import _quick_floor

    plan = PrivacyPlan(dataset_size=1_000_000, batch_size=600_000, steps=100, noise_multiplier=1.0,
                       noise_multiplicity=1, delta=1e-10)
    with pytest.raises(FftPrecisionError):   # the case: no bound at the plan's own delta on the coarse grid
        FftPldAccountant(grid_points=2**16).epsilon(plan.to_event(plan.steps), plan.delta)
    doc = accounting.make_plan_document(plan)
    forged = dataclasses.replace(plan, target_epsilon=1e-9)
    floor = _quick_floor(forged)
    assert 0.5 * doc.epsilon < floor <= doc.epsilon   # a bound, and a rigorous one (65.93 certified here)

    def edit(d):
        d.update(target_epsilon=1e-9, digest=forged.digest())
        d["epsilon"].update(certified=0.0)

    with pytest.raises(PlanError, match=r"target_epsilon=1e-09 is below a lower bound on the mechanism's epsilon"):
        accounting.load_plan(_tampered(doc, tmp_path, edit))


def test_a_forged_tiny_target_is_refused_at_once_at_a_small_sample_rate(doc, tmp_path, monkeypatch):
    """At sample rate 0.001 over 10^5 steps the coarse FFT's bracket (about steps x its interval wide) bounds
    nothing, at any delta, so the floor was 0 and a forged target of 1e-9 (digest recomputed) sent the certificate's
    PLD to an interval 200 times finer than the plan's: 2.4 minutes, then "needs more memory than this machine has"
    (stop 48, h95 F1). It is refused from the floor, before any PLD at the target's interval runs."""
    from accounting.plan import _event_floor

    # `dpdm plan --eps 2 --delta 1e-6 --dataset-size 1000000 --batch-size 1000 --steps 100000`: certified 1.9997
    honest = PrivacyPlan(dataset_size=1_000_000, batch_size=1000, steps=100_000, noise_multiplier=0.9618256993072359,
                         delta=1e-6, target_epsilon=2.0)
    assert 1.2 < _event_floor(0.001, honest.noise_multiplier, honest.steps, honest.delta) <= 1.9997046492280321
    forged = dataclasses.replace(honest, target_epsilon=1e-9)

    def edit(d):
        d.update(forged.mechanism_fields(), digest=forged.digest())
        d["epsilon"].update(certified=0.0)

    def no_pld(plan, steps_done):
        raise AssertionError(f"the certificate's PLD ran for a forged target {plan.target_epsilon!r}")

    monkeypatch.setattr(accounting.plan, "epsilon_spent", no_pld)
    with pytest.raises(PlanError, match=r"target_epsilon=1e-09 is below a lower bound on the mechanism's epsilon"):
        accounting.load_plan(_tampered(doc, tmp_path, edit))


def _gdp_epsilon(mu, delta):
    """The exact epsilon of mu-GDP at delta (q = 1: T steps at noise multiplier sigma are sqrt(T)/sigma-GDP)."""
    def excess(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2)) - delta
    return optimize.brentq(excess, 0.0, 200.0, xtol=1e-13, rtol=1e-13)


def _optimistic_pld_epsilon(q, sigma, steps, delta, interval):
    """dp-accounting's optimistic PLD epsilon (privacy buckets, loss rounded down): a lower bound on the truth."""
    import dp_accounting
    from dp_accounting.pld import privacy_loss_distribution

    pld = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, sensitivity=1.0, pessimistic_estimate=False, use_connect_dots=False,
        value_discretization_interval=interval, sampling_prob=q,
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    return pld.self_compose(steps).get_epsilon_for_delta(delta)


def test_the_event_floor_lies_below_the_true_epsilon_and_near_it():
    """`_event_floor` refuses plans, so it must never exceed the true epsilon (a floor above it would refuse honest
    plans), and it must come near enough to refute a forged target where the coarse FFT gives nothing."""
    from accounting.plan import _event_floor

    # q = 1: exact GDP. The sum of the outputs is the optimal test there, so the floor meets the exact epsilon.
    for sigma, steps, delta in [(501.309, 1, 1e-10), (5.0, 1000, 1e-5)]:
        exact = _gdp_epsilon(math.sqrt(steps) / sigma, delta)
        assert exact * (1 - 1e-4) <= _event_floor(1.0, sigma, steps, delta) <= exact
    # q < 1: below dp-accounting's optimistic PLD, itself a lower bound on the true epsilon.
    for q, sigma, steps, delta, ratio in [(0.064, 3.0, 469, 1e-5, 0.98), (0.001, 0.961826, 100, 1e-6, 0.94)]:
        lower = _optimistic_pld_epsilon(q, sigma, steps, delta, 1e-4)
        assert ratio * lower <= _event_floor(q, sigma, steps, delta) <= lower
    # An honest plan whose RDP bound (1.151) is 23 times its target: the floor stays below its certificate
    # (dp-accounting's optimistic PLD at interval 1e-6 gives 0.0499714, above the floor's 0.0499603).
    plan = PrivacyPlan(dataset_size=1_000_000, batch_size=1000, steps=1, noise_multiplier=0.8303897055614825,
                       delta=1e-6, target_epsilon=0.05)   # `dpdm plan --eps 0.05 ... --steps 1`: certified 0.0499719
    assert 0.999 * 0.049971941990217816 <= accounting.plan._quick_floor(plan) <= 0.049971941990217816
    # Small sample rates over many steps, where the coarse FFT gave a floor of 0 (h95 F1): within 0.6 of
    # dp-accounting's pessimistic PLD at interval 1e-3 (an upper bound).
    for q, sigma, steps, delta in [(0.001, 0.961826, 100_000, 1e-6), (0.001, 1.0, 1_000_000, 1e-6)]:
        upper = accounting.accountants.PldAccountant(1e-3).epsilon(accounting.accountants.dpsgd_event(
            q, sigma, steps), delta).upper
        assert 0.6 * upper <= _event_floor(q, sigma, steps, delta) <= upper


def test_an_epsilon_is_shown_rounded_away_from_the_side_it_bounds():
    """A certified 10.004487 was printed "epsilon spent 10" (".4g" rounds to nearest): a guarantee shown below
    the one certified. Upper bounds are rounded up, an audit's lower bounds down."""
    import numpy as np

    from dpdm.report_utils import epsilon_text

    assert epsilon_text(10.004487) == "10.01" and epsilon_text(10.004487, bound="lower") == "10"
    assert epsilon_text(9.99943) == "10" and epsilon_text(9.99943, bound="lower") == "9.999"
    assert epsilon_text(10.004487, 6) == "10.0045" and epsilon_text(2.0) == "2"
    assert epsilon_text(0.000123456) == "0.0001235" and epsilon_text(float("inf")) == "inf"
    for eps in np.random.default_rng(0).uniform(0.01, 100, 200):
        assert float(epsilon_text(eps)) >= eps >= float(epsilon_text(eps, bound="lower"))


def test_prv_figures_made_by_another_prv_accountant_are_checked_within_its_error(doc, tmp_path, monkeypatch):
    """An upgraded prv-accountant may fail where the plan's did not (or the reverse) and move its figures within
    its stated error: a published release file stays loadable; a figure far off is still refused."""
    def made_by_another(edit):
        def both(d):
            d["versions"]["prv-accountant"] = "0.1.0"
            edit(d["epsilon"])
        return both

    err = doc.prv_eps_error
    # A prv_failed beside PRV's figures (which this test loaded before stop 46) is no file dpdm makes.
    with pytest.raises(PlanError, match="epsilon.prv_failed='RuntimeError: x', but epsilon.prv has figures"):
        accounting.load_plan(_tampered(doc, tmp_path, made_by_another(lambda e: e.update(prv_failed="RuntimeError: x"))))

    def failing(self, terms, delta):
        raise RuntimeError("Discrete mean differs from continuous mean significantly")

    with monkeypatch.context() as m:   # this prv-accountant fails where the plan's did not
        m.setattr(accounting.PrvAccountant, "_epsilon", failing)
        assert accounting.load_plan(_tampered(doc, tmp_path, made_by_another(lambda e: None))).prv == doc.prv
    accounting.load_plan(_tampered(doc, tmp_path, made_by_another(
        lambda e: e["prv"].update(upper=e["prv"]["upper"] + 1.5 * err))))
    with pytest.raises(PlanError, match="epsilon.prv.upper=.* does not re-compute"):
        accounting.load_plan(_tampered(doc, tmp_path, made_by_another(
            lambda e: e["prv"].update(upper=e["prv"]["upper"] / 2))))
    with pytest.raises(PlanError, match="epsilon.prv.upper=.* does not re-compute"):   # the same version: its error
        accounting.load_plan(_tampered(doc, tmp_path, lambda d: d["epsilon"]["prv"].update(
            upper=d["epsilon"]["prv"]["upper"] + 1.5 * err)))
    # Within twice the error, but a lower bound above the certificate (and the estimate), which no plan dpdm makes
    # holds: that was loaded (stop 42).
    assert doc.prv.lower + 1.5 * err > doc.epsilon
    with pytest.raises(PlanError, match=r"epsilon.prv=.* disagrees with the certificate \(PRV lower bound"):
        accounting.load_plan(_tampered(doc, tmp_path, made_by_another(
            lambda e: e["prv"].update(lower=e["prv"]["lower"] + 1.5 * err))))


def _strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as RFC 8259 (and every other reader) does."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_a_plan_without_prv_eps_error_is_written_without_it_and_one_with_it_byte_for_byte(doc, tmp_path):
    """DESIGN.md's plan.json schema has no prv_eps_error and load_plan takes a file without one, as NaN, which
    to_dict wrote back: the run's plan.json got the token NaN, refused by every later command, and export of a
    repaired run crashed in to_json (stop 44). The field stays absent; a plan that has one is written as before
    (it is outside the digest)."""
    path = _tampered(doc, tmp_path, lambda d: d["epsilon"].pop("prv_eps_error"))
    loaded = accounting.load_plan(path)
    assert math.isnan(loaded.prv_eps_error) and loaded.digest == doc.digest
    d = _strict_json(loaded.to_json())
    assert "prv_eps_error" not in d["epsilon"] and d["digest"] == doc.digest
    again = tmp_path / "again.json"
    accounting.write_plan(loaded, again)
    assert accounting.load_plan(again).to_dict() == loaded.to_dict()
    # With the field: loading and writing it again changes no byte.
    accounting.write_plan(doc, tmp_path / "with.json")
    accounting.write_plan(accounting.load_plan(tmp_path / "with.json"), tmp_path / "with2.json")
    assert (tmp_path / "with.json").read_bytes() == (tmp_path / "with2.json").read_bytes()
    assert list(doc.to_dict()["epsilon"])[:7] == ["certified", "certified_by", "rdp", "pld", "prv",
                                                  "pld_discretization", "prv_eps_error"]


def test_prv_unreliable_fires_beyond_its_error_and_the_certificates_slack_only():
    """PRV's "upper bound" far below the certificate was shown and stored as a bound without a word (stop 44:
    [529.7, 615.4] beside a certified 2141.55). A gap within PRV's error plus the certificate's grid slack
    (3 sqrt(steps) * interval) is normal; beyond it, one sentence says so."""
    from accounting.plan import PRV_SLACK_FACTOR, prv_unreliable

    kw = dict(prv_eps_error=2.0, steps=10**4, pld_discretization=0.01)
    slack = PRV_SLACK_FACTOR * 100 * 0.01
    assert prv_unreliable(certified=100.0, prv_upper=100.0 - 2.0 - slack + 1e-6, **kw) is None
    assert prv_unreliable(certified=100.0, prv_upper=101.0, **kw) is None
    why = prv_unreliable(certified=100.0, prv_upper=100.0 - 2.0 - slack - 1e-6, **kw)
    # 94.999999 rounded up to 6 digits, as the tables show an upper bound
    assert why.startswith("PRV's upper bound 95 is below the certified epsilon 100 ") and "unreliable" in why


@pytest.mark.slow   # time (12 s): the default suite keeps prv_unreliable's rule and the CLI's warning
def test_a_plan_where_prv_is_unreliable_says_so_from_its_figures_and_a_normal_one_does_not(doc, tmp_path):
    """A real corner (q 0.3, sigma 5, 100,000 steps, delta 1e-7): PRV's upper bound 130.2 beside a certified 281.6
    (the CLT puts the true epsilon near 280). The document says so from its own figures, loaded or made, with no
    field in plan.json; the paper-like plan of this file's fixture, and q 1 over 10**6 steps (certificate 12%
    loose, PRV right), do not."""
    plan = PrivacyPlan(dataset_size=10, batch_size=3, steps=100_000, noise_multiplier=5.0, delta=1e-7)
    bad = accounting.make_plan_document(plan)
    assert bad.prv.upper < 0.5 * bad.epsilon and bad.prv_unreliable and "130.244" in bad.prv_unreliable
    assert "prv_unreliable" not in bad.to_dict()["epsilon"]
    accounting.write_plan(bad, tmp_path / "bad.json")
    assert accounting.load_plan(tmp_path / "bad.json").prv_unreliable == bad.prv_unreliable
    # An older file without prv_eps_error: the error make_plan_document takes.
    without = accounting.load_plan(_tampered(bad, tmp_path, lambda d: d["epsilon"].pop("prv_eps_error")))
    assert without.prv_unreliable == bad.prv_unreliable
    assert doc.prv_unreliable is None
    loose = accounting.make_plan_document(PrivacyPlan(dataset_size=10, batch_size=10, steps=10**6,
                                                      noise_multiplier=100.0, delta=1e-5))
    assert loose.certified_by == "rdp" and loose.prv.upper < loose.epsilon and loose.prv_unreliable is None


def test_a_certificate_a_hair_below_the_accountants_is_refused(doc, tmp_path):
    """Stop 48 (mut49 PL4). The stored epsilon may sit above the re-computed bound (by RECOMPUTE_RTOL) but never
    below it, by even 0.05%: it is the promise. The tamper case above lowers it by 10%."""
    with pytest.raises(PlanError, match="does not re-compute"):
        accounting.load_plan(_tampered(doc, tmp_path, lambda d: d["epsilon"].update(
            certified=d["epsilon"]["certified"] * (1 - 5e-4))))


def test_a_sample_rate_edited_by_a_tenth_of_a_percent_is_refused(doc, tmp_path):
    """Stop 48 (mut49 PL3): plan.json's sample_rate must be batch_size / dataset.size (to 1e-12). It is outside the
    digest (q is recomputed), but the file's q is what a reader sees."""
    with pytest.raises(PlanError, match="sample_rate"):
        accounting.load_plan(_tampered(doc, tmp_path, lambda d: d.update(sample_rate=d["sample_rate"] * 1.001)))


def test_the_digest_is_compared_in_full(doc, tmp_path):
    """mut51 p26, stop 50: a digest that agrees with the computed one in its first 19 characters (all that error
    lines show) but not after is a mismatch (comparing the shown prefix only let a 48-bit prefix collision pass)."""
    def edit(d):
        tail = d["digest"][19:]
        d["digest"] = d["digest"][:19] + ("0" if tail[0] != "0" else "1") + tail[1:]

    with pytest.raises(PlanError, match="digest mismatch"):
        accounting.load_plan(_tampered(doc, tmp_path, edit))


def test_a_certified_epsilon_above_what_the_accountants_give_is_refused_too(tmp_path):
    """mut51 p19, stop 50: the certificate must re-compute from above as well as from below. One stored at twice
    the accountants' figure, in a plan without a target (so that the target's check says nothing), is an edit,
    not a looser promise: with the upper side of the check dropped it loaded, and the plan's figures no longer
    re-computed. The cases above edit it below the accountants' figure, or above a target."""
    plain = accounting.make_plan_document(PrivacyPlan(**BASE))
    with pytest.raises(PlanError, match="does not re-compute"):
        accounting.load_plan(_tampered(plain, tmp_path, lambda d: d["epsilon"].update(
            certified=2 * d["epsilon"]["certified"])))
