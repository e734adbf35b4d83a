"""dpdm's own PLD (accounting/fft_pld.py), the tie-breaker between PLD and PRV: it must bracket the
true epsilon, which is known exactly for the Gaussian mechanism and to within dp-accounting's
rigorous bounds for the subsampled one."""
import math

import numpy as np
import pytest
from scipy import optimize, stats

from accounting.accountants import PldAccountant, dpsgd_event
from accounting.fft_pld import (FftPldAccountant, FftPrecisionError, _compose, _fft_roundoff, _Pmf,
                                _self_compose, epsilon_for_delta, step_pmf)


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Balle and Wang (2018): mu-GDP is (eps, delta)-DP exactly when this delta is met."""
    def excess(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta

    return optimize.brentq(excess, 0.0, 100.0, xtol=1e-12)


@pytest.mark.parametrize("sigma,steps", [(5.0, 10), (2.0, 1), (20.0, 300)])
def test_gaussian_bracket_holds_the_exact_epsilon(sigma, steps):
    h = 1e-4
    r = FftPldAccountant(discretization=h).epsilon(dpsgd_event(1.0, sigma, steps), 1e-5)
    exact = exact_gaussian_epsilon(math.sqrt(steps) / sigma, 1e-5)
    assert r.lower <= exact <= r.upper
    assert r.upper - r.lower <= steps * h * 1.01 + 1e-9


@pytest.mark.parametrize("q,sigma,steps,delta", [(0.064, 1.0, 300, 1e-5), (0.128, 1.227, 235, 1e-5),
                                                 (0.01, 0.8, 500, 1e-6)])
def test_subsampled_bracket_agrees_with_dp_accounting(q, sigma, steps, delta):
    """dp-accounting's pessimistic PLD is >= the truth >= our lower bound, and the other way round."""
    event = dpsgd_event(q, sigma, steps)
    r = FftPldAccountant(discretization=2e-4).epsilon(event, delta)
    pessimistic = PldAccountant(1e-4).epsilon(event, delta).upper
    assert r.lower <= pessimistic <= r.upper  # PLD's pessimistic bound is tight: within ours
    assert r.upper - r.lower <= steps * 2e-4 * 1.01


def test_finer_grid_narrows_the_bracket():
    event = dpsgd_event(0.064, 1.0, 300)
    coarse = FftPldAccountant(discretization=1e-3).epsilon(event, 1e-5)
    fine = FftPldAccountant(discretization=1e-4).epsilon(event, 1e-5)
    assert coarse.lower <= fine.lower <= fine.upper <= coarse.upper
    assert fine.upper - fine.lower < (coarse.upper - coarse.lower) / 5


@pytest.mark.parametrize("direction", ["remove", "add"])
@pytest.mark.parametrize("q,sigma", [(0.064, 1.0), (0.5, 0.7), (1.0, 2.0)])
def test_one_step_distribution_is_a_privacy_loss(direction, q, sigma):
    """Total mass 1, and E_P[exp(-L)] = 1 (the other distribution integrates to 1): rounding the
    loss up can only lower that mean, rounding down only raise it."""
    h = 1e-3
    up, down = step_pmf(q, sigma, direction, h, True), step_pmf(q, sigma, direction, h, False)
    assert up.p.sum() + up.inf == pytest.approx(1.0, abs=1e-12)
    assert down.p.sum() == pytest.approx(1.0, abs=1e-12)
    t_up = (up.offset + np.arange(len(up.p))) * h
    t_down = (down.offset + np.arange(len(down.p))) * h
    mean_up, mean_down = np.sum(up.p * np.exp(-t_up)), np.sum(down.p * np.exp(-t_down))
    assert mean_up <= 1.0 + 1e-12 <= mean_down + 2e-12
    assert mean_down - mean_up < 2 * h


def test_epsilon_for_delta_on_a_point_mass():
    h = 0.01
    point = _Pmf(np.array([1.0]), 100, 0.0)  # all mass at loss 1.0
    assert epsilon_for_delta(point, h, 0.1) == pytest.approx(1.0 + math.log(0.9), rel=1e-12)
    assert epsilon_for_delta(_Pmf(np.array([1.0]), 100, 0.2), h, 0.1) == math.inf  # inf mass > delta
    assert epsilon_for_delta(_Pmf(np.array([1.0]), -5, 0.0), h, 0.1) == 0.0        # no positive loss
    two = _Pmf(np.array([0.5, 0.0, 0.5]), 100, 0.0)                               # losses 1.00 and 1.02
    eps = epsilon_for_delta(two, h, 0.05)
    d = 0.5 * (1 - math.exp(eps - 1.0)) + 0.5 * (1 - math.exp(eps - 1.02))
    assert d == pytest.approx(0.05, rel=1e-9)


@pytest.mark.slow   # 26 s on 2 cores: the default suite stays under 15 minutes
def test_epsilon_above_709_does_not_overflow():
    """exp(t) overflows a float above t = 709: an epsilon of 1,500 came out as 709.87 on both sides."""
    h = 0.01
    point = _Pmf(np.array([1.0]), 100_000, 0.0)  # all mass at loss 1000.0
    assert epsilon_for_delta(point, h, 0.1) == pytest.approx(1000.0 + math.log(0.9), rel=1e-12)
    event = dpsgd_event(0.5, 0.06, 10)
    r = FftPldAccountant(grid_points=2**16).epsilon(event, 1e-5)
    pessimistic = PldAccountant().epsilon(event, 1e-5).upper
    assert 1400 < r.lower <= pessimistic
    assert r.upper - r.lower < 2.0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="discretization"):
        FftPldAccountant(discretization=0.0)
    with pytest.raises(ValueError, match="direction"):
        step_pmf(0.1, 1.0, "swap", 1e-3, True)


def test_round_off_bound_covers_the_fft_error():
    """The bound each FFT product adds to `err` is above the error it makes (against a direct
    convolution of the same arrays), and errors already present are carried forward."""
    wide = (-10**9, 10**9)
    a = _self_compose(step_pmf(0.064, 1.0, "remove", 3e-3, False), 4, *wide, False)
    assert a.err > 0
    fft = _compose(a, a, *wide, False)
    error = np.abs(fft.p - np.convolve(a.p, a.p)).sum()
    assert 0 < error <= _fft_roundoff(a.p, a.p)
    assert fft.err >= 2 * a.err + _fft_roundoff(a.p, a.p)


def test_no_bracket_where_round_off_is_not_small_against_delta():
    """At delta 1e-12 (q 0.064, sigma 1, 100 steps) the FFT's round-off put the 'rigorous' lower bound
    (9.1245) above dp-accounting's pessimistic epsilon (9.1174): now there is no bracket (nor at 1e-10,
    where the bound, 3.7e-11 of mass, is over a tenth of delta). At 1e-9 the bracket, widened for the
    round-off, still holds dp-accounting's epsilon."""
    event = dpsgd_event(0.064, 1.0, 100)
    for delta in (1e-12, 1e-10):
        with pytest.raises(FftPrecisionError, match=f"no bracket at delta={delta:g}"):
            FftPldAccountant().epsilon(event, delta)
    r = FftPldAccountant().epsilon(event, 1e-9)
    assert r.lower <= PldAccountant(1e-4).epsilon(event, 1e-9).upper <= r.upper
