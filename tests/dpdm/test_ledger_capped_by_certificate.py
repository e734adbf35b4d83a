"""The ledger never reports more than the plan's certificate (stop 43, mutant LR2).

An RDP-certified plan (RDP below PLD: very many steps, e.g. q=1, 10^6 steps, sigma 100: PLD 102.67, RDP 96.12)
has PLD prefixes above its certificate near the end; train's ledger caps them with min(..., certificate), and
verify_ledger expects the capped figure. No trainable plan is RDP-certified (24 examples, <= 20 steps: PLD always
wins), so this test stands in for one by making `accounting.epsilon_spent` (the PLD prefix the ledger asks)
exceed the certificate, as it does on such a plan. The plan's own verification (accounting.plan's module-level
epsilon_spent) is untouched."""
from __future__ import annotations

import csv
import math

import pytest
import torch

import accounting
from dpdm import checkpoint as ckpt
from dpdm.train import CHECKPOINT_NAME, TrainConfig, train


def test_ledger_is_capped_by_the_plans_certificate(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 1, 8, 8, generator=g) * 2 - 1
    y = torch.arange(24) % 3
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=3, noise_multiplier=1.0, clip_norm=1.0,
                                  noise_multiplicity=2, delta=1e-5, dataset_name="tiny")
    doc = accounting.make_plan_document(plan)
    real = accounting.epsilon_spent
    # PLD's prefix bound above the certificate from step 2 on (as on an RDP-certified plan's last steps).
    monkeypatch.setattr(accounting, "epsilon_spent",
                        lambda p, s: real(p, s) * (1.0 if s < 2 else 10.0))
    out = tmp_path / "run"
    summary = train(doc, x, y, 3, out, TrainConfig(model="small", checkpoint_every=1, log_every=1, seed=3),
                    progress=False)
    assert summary["steps_done"] == 3
    assert summary["epsilon_spent"] <= doc.epsilon * (1 + 1e-9), (summary["epsilon_spent"], doc.epsilon)
    ledger = ckpt.load_checkpoint(out / CHECKPOINT_NAME)["ledger"]
    assert ledger["epsilon_spent"] == pytest.approx(doc.epsilon, rel=1e-9)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    eps = [float(r["epsilon_spent"]) for r in rows]
    assert all(e <= doc.epsilon * (1 + 1e-5) for e in eps), eps   # metrics.csv rounds to 6 digits
    assert eps == sorted(eps) and math.isclose(eps[-1], doc.epsilon, rel_tol=1e-5), eps
