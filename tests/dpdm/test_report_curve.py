"""The report's privacy curve counts epsilon as the ledger does."""
import pytest

import accounting
from dpdm.report import privacy_curve, privacy_curve_points


def test_curve_is_the_ledgers_epsilon_capped_at_the_certificate(monkeypatch, tmp_path):
    """Where RDP's bound certifies (over very many steps) the ledger shows min(PLD of the steps done, certificate);
    the curve showed PLD alone, above the certified epsilon at the last steps (review, stop 40)."""
    plan = accounting.PrivacyPlan(dataset_size=4000, batch_size=256, steps=300, noise_multiplier=1.0, delta=1e-5,
                                  dataset_name="mnist5k")
    steps, eps = privacy_curve_points(plan, points=6)
    assert eps == [accounting.epsilon_spent(plan, int(s)) for s in steps] and eps == sorted(eps)
    cap = eps[3]                                   # as if RDP's bound were that small
    monkeypatch.setattr(accounting, "certified_epsilon", lambda p: cap)
    _, capped = privacy_curve_points(plan, points=6)
    assert capped == pytest.approx(eps[:3] + [cap] * 3)
    assert privacy_curve(plan, tmp_path / "curve.png", points=6, steps_done=100).stat().st_size > 0
