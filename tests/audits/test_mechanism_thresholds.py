"""The audit's mechanism checks fail at their stated thresholds, not 10x past them.

tests/audits/test_mechanism.py's broken engines are broken by factors (noise halved, clipping off: up to 8x C,
K summed), so loosening a threshold (the exact checks' 1 + 1e-6 to 1 + 1e-5 or to 1.1, the noise checks'
alpha to alpha / 10) passes the whole file. Here: an engine that clips to C (1 + 5e-6) must fail clipping_bound
and sensitivity_replay (the module says anything above 1e-6 is a real difference), and a noise check run at an
alpha just above its own p-value must fail.
"""
from __future__ import annotations

import math

from audits import mechanism as M
from dpdm.engine import private_grad

OVER = 1 + 5e-6


def clips_slightly_over(model, loss_fn, *batch, clip_norm, noise_multiplier, **kw):
    """Clips to clip_norm * (1 + 5e-6); the noise keeps its claimed std (noise_multiplier * clip_norm)."""
    return private_grad(model, loss_fn, *batch, clip_norm=clip_norm * OVER, noise_multiplier=noise_multiplier / OVER,
                        **kw)


def _setup(fn):
    p = M.tiny_problem()
    return p, M._loop_grads(p), M._Caller(fn, p, 1.0, 40.0)


def test_a_clip_5e6_above_the_bound_fails_the_exact_checks():
    p, loop, call = _setup(clips_slightly_over)
    clip = M._check_clipping(call, p, loop)
    assert not clip.passed and clip.statistic > 1 + 2e-6, clip
    sens = M._check_sensitivity(call, p, loop)
    assert not sens.passed and sens.statistic > 1 + 2e-6, sens
    p, loop, call = _setup(private_grad)   # the real engine is within 1e-6
    assert M._check_clipping(call, p, loop).passed and M._check_sensitivity(call, p, loop).passed


def test_a_noise_check_fails_when_alpha_is_above_its_p_value():
    p, loop, call = _setup(private_grad)
    calls = [(call, 6)]
    r = M._noise_test("noise_variance", calls, p, 1e-3, chunk_size=None, what="t")
    assert r.passed and r.p_value is not None and r.p_value < 0.6, r   # the real engine, a p-value below 0.6
    above = M._noise_test("noise_variance", calls, p, min(0.99, r.p_value * 1.5), chunk_size=None, what="t")
    assert not above.passed, f"p = {r.p_value:.3g} passed at alpha = {r.p_value * 1.5:.3g}"
    below = M._noise_test("noise_variance", calls, p, r.p_value * 0.9, chunk_size=None, what="t")
    assert below.passed
