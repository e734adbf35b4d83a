"""PrivacyPlan validation, plan.json round-trip and tamper refusal, the ledger helper."""
import dataclasses
import json
import subprocess
import sys

import pytest

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
    ("dataset_name", ""),
])
def test_validation_names_field_and_value(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        PrivacyPlan(**(BASE | {field: value}))


def test_plan_is_frozen_and_hashable():
    plan = PrivacyPlan(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.steps = 1
    assert plan.sample_rate == 256 / 4000
    assert hash(plan) == hash(PrivacyPlan(**BASE))
    assert PrivacyPlan(**(BASE | {"delta": 1e-3})).warnings()  # delta >= 1/N
    assert not plan.warnings()


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


def test_plan_that_misses_its_target_is_not_calibrated():
    plan = PrivacyPlan(**(BASE | {"noise_multiplier": 0.7, "target_epsilon": 1.0}))
    with pytest.raises(accounting.NotCalibratedError, match="above target_epsilon=1.0"):
        accounting.make_plan_document(plan)


def test_disagreeing_accountants_raise(monkeypatch):
    """A PRV that brackets a different epsilon is an error, not a warning."""
    real = accounting.PrvAccountant._epsilon

    def shifted(self, terms, delta):
        r = real(self, terms, delta)
        return dataclasses.replace(r, lower=r.lower * 1.5, estimate=r.estimate * 1.5, upper=r.upper * 1.5)

    monkeypatch.setattr(accounting.PrvAccountant, "_epsilon", shifted)
    with pytest.raises(accounting.AccountingError, match="PRV lower bound"):
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
