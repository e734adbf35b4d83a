"""Calibration: the smallest noise multiplier for a target epsilon, epsilon for a given noise
multiplier, the most steps for a given epsilon and noise multiplier.

Every trial builds a fresh accountant (never a mutated one, as `opacus.get_noise_multiplier` does) and
the search finishes on the private side of the target: "guaranteeing the returned parameter gives no
less privacy than was requested" (dp-accounting's `calibrate_dp_mechanism`).

The search is driven by the certificate itself: the PLD pessimistic estimate at a fine discretization
(about 1e-4 of epsilon), or RDP's bound where that is smaller (over very many steps); PRV only
cross-checks the result (plan.make_plan_document).
"""
from __future__ import annotations

import functools
import math

from scipy import optimize, stats

from accounting.accountants import (DELTA_PER_STEP, PldAccountant, RdpAccountant, _check_delta_floor, _is_finite_real,
                                    dpsgd_event, min_delta)

__all__ = [
    "MAX_NOISE_MULTIPLIER",
    "MAX_STEPS",
    "MIN_ACCOUNTED_NOISE_MULTIPLIER",
    "MIN_NOISE_MULTIPLIER",
    "PLD_RELATIVE_DISCRETIZATION",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "max_steps",
    "pld_discretization",
]

# PLD interval / epsilon. The certificate is within ~1e-4 of exact over few steps; its slack grows with the
# steps (measured: 3% at sample rate 1e-4 over 100,000 steps, 12% at q = 1 over 10^6, 30% at q 0.064 over 3x10^6,
# where RDP's bound certifies at 19%: docs/accounting.md), always above.
PLD_RELATIVE_DISCRETIZATION = 1e-4
_MIN_DISCRETIZATION, _MAX_DISCRETIZATION = 1e-6, 1e-2
MAX_NOISE_MULTIPLIER = 1000.0  # the search space; beyond it a plan trains on noise
MIN_NOISE_MULTIPLIER = 0.3  # below it epsilon is in the hundreds and PLD grids get huge
# The smallest noise multiplier a plan may have at all. A PLD grid grows as 1/noise_multiplier**2: at
# 0.05 a 1000-step plan (sample rate 0.2) took 5 s to account, at 0.02 19 s, and 1e-3 ran for minutes,
# while 1e-9 asked numpy for an array beyond "Maximum allowed size". Epsilon is then in the thousands.
MIN_ACCOUNTED_NOISE_MULTIPLIER = 0.05
# calibrate_noise_multiplier searches at a 10x coarser PLD interval first below this certifying interval
# (target epsilons below 1).
COARSE_FIRST_BELOW = 1e-4
DEFAULT_RTOL = 2.5e-4  # relative width of the final bracket on the noise multiplier (< 1e-3)
# The most noisy steps a plan may have (and max_steps' default limit): 10**7 steps is over 2000 epochs
# of MNIST at the paper's batch of 4096. Far more (`--epochs 1e12`) left the PLD composition running
# with no end in sight, and PRV's grid grows with the square root of the steps.
MAX_STEPS = 10**7


def pld_discretization(epsilon_scale: float) -> float:
    """The PLD value-discretization interval used to certify an epsilon of about `epsilon_scale`."""
    if not math.isfinite(epsilon_scale):
        return _MAX_DISCRETIZATION
    return min(max(PLD_RELATIVE_DISCRETIZATION * epsilon_scale, _MIN_DISCRETIZATION), _MAX_DISCRETIZATION)


@functools.lru_cache(maxsize=256)
def certification_discretization(
    sample_rate: float, noise_multiplier: float, steps: int, delta: float, target_epsilon: float | None
) -> float:
    """The interval that certifies a plan: relative to its target epsilon, or (when the plan was made
    from a given noise multiplier) to its RDP epsilon, a cheap upper bound. Deterministic, so that
    loading a plan re-computes the same number."""
    if target_epsilon is not None:
        return pld_discretization(target_epsilon)
    rdp = RdpAccountant().epsilon(dpsgd_event(sample_rate, noise_multiplier, steps), delta).upper
    return pld_discretization(rdp)


def _check(name: str, value, lo: float, hi: float, *, lo_open=True, hi_open=True) -> None:
    ok = isinstance(value, (int, float)) and _is_finite_real(value)   # not a bool, nor an int too large for a float
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name}={value!r} must be in {interval}")


def _check_steps(name: str, steps, maximum: int | None = MAX_STEPS) -> None:
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"{name}={steps!r} must be an integer >= 1")
    if maximum is not None and steps > maximum:
        raise ValueError(f"{name}={steps!r} must be <= {maximum} (MAX_STEPS)")


def compute_epsilon(
    *,
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    discretization: float | None = None,
) -> float:
    """Certified epsilon (PLD, pessimistic) of DP-SGD with these parameters at `delta`. Raises ValueError for a
    delta below min_delta(steps), a plan's floor: there PLD's round-off made it less than the true epsilon."""
    _check("sample_rate", sample_rate, 0, 1, hi_open=False)
    _check("noise_multiplier", noise_multiplier, 0, math.inf)
    _check_steps("steps", steps)
    _check("delta", delta, 0, 1)
    _check_delta_floor(delta, steps)
    if discretization is None:
        discretization = certification_discretization(sample_rate, noise_multiplier, steps, delta, None)
    event = dpsgd_event(sample_rate, noise_multiplier, steps)
    return PldAccountant(discretization).epsilon(event, delta).upper


def _gdp_mu(epsilon: float, delta: float) -> float:
    """mu such that mu-GDP is exactly (epsilon, delta)-DP (Dong, Roth and Su 2019, Corollary 2.13).

    e^epsilon * Phi(-epsilon/mu - mu/2) is evaluated as exp(epsilon + log Phi(...)), which is at most 1:
    e^epsilon alone overflowed a float for epsilon above about 709 (`dpdm plan --eps 1000`)."""

    def excess(mu):
        tail = math.exp(epsilon + stats.norm.logcdf(-epsilon / mu - mu / 2))
        return stats.norm.cdf(-epsilon / mu + mu / 2) - tail - delta

    return optimize.brentq(excess, 1e-8, 200.0, xtol=1e-12)


def _initial_guess(sample_rate: float, steps: int, epsilon: float, delta: float) -> float:
    """CLT guess: T subsampled Gaussian steps are about mu-GDP, mu = q sqrt(T (e^(1/s^2) - 1))."""
    try:
        mu = _gdp_mu(epsilon, delta)
    except ValueError:
        return 1.0
    if sample_rate == 1.0:
        return math.sqrt(steps) / mu
    ratio = mu**2 / (sample_rate**2 * steps)
    return 1.0 / math.sqrt(math.log1p(ratio))


def calibrate_noise_multiplier(
    *,
    sample_rate: float,
    steps: int,
    target_epsilon: float,
    delta: float,
    rtol: float = DEFAULT_RTOL,
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
    min_noise_multiplier: float = MIN_NOISE_MULTIPLIER,
    discretization: float | None = None,
) -> float:
    """The smallest noise multiplier (to relative precision `rtol`, rounded up) whose certified
    epsilon (the smaller of PLD's bound at `discretization` and RDP's) is <= target_epsilon. Raises ValueError when no multiplier in
    [min_noise_multiplier, max_noise_multiplier] is the answer, or delta is below min_delta(steps) (a plan's
    floor). `discretization` (PLD interval) defaults to pld_discretization(target_epsilon), the one plans are
    certified at."""
    _check("sample_rate", sample_rate, 0, 1, hi_open=False)
    _check_steps("steps", steps)
    _check("eps", target_epsilon, 0, math.inf)
    _check("delta", delta, 0, 1)
    _check_delta_floor(delta, steps)
    _check("rtol", rtol, 0, 1e-3, hi_open=False)
    if discretization is None:
        discretization = pld_discretization(target_epsilon)

    def at(interval: float):
        def epsilon(sigma: float) -> float:   # fresh accountants per trial, always at the same discretization
            return _certificate_epsilon(dpsgd_event(sample_rate, sigma, steps), delta, interval)
        return epsilon

    sigma = min(max(_initial_guess(sample_rate, steps, target_epsilon, delta), min_noise_multiplier),
                max_noise_multiplier)
    factor = 1.05
    if discretization < COARSE_FIRST_BELOW:
        # A trial's cost grows as 1/interval (eps 0.05: 5e-6, 6-35 s a trial, 5 minutes in all). A search at
        # a 10x coarser interval finds the neighbourhood; the search at the certifying interval starts there,
        # with small steps, and decides alone, so the answer is still the smallest multiplier it certifies.
        try:
            sigma, factor = _search(at(discretization * 10), sigma, factor, 1e-3, target_epsilon,
                                    min_noise_multiplier, max_noise_multiplier, sample_rate, steps, delta), 1.002
        except ValueError:   # no answer at the coarse interval: the certifying search says so itself, or finds one
            pass
    return _search(at(discretization), sigma, factor, rtol, target_epsilon, min_noise_multiplier,
                   max_noise_multiplier, sample_rate, steps, delta)


def _certificate_epsilon(event, delta: float, discretization: float) -> float:
    """A plan's certificate for `event`: the smaller of PLD's bound at `discretization` and RDP's (RDP's is the
    smaller only over very many steps), from fresh accountants."""
    return min(PldAccountant(discretization).epsilon(event, delta).upper, RdpAccountant().epsilon(event, delta).upper)


def _search(epsilon, sigma: float, factor: float, rtol: float, target_epsilon: float, min_noise_multiplier: float,
            max_noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The smallest sigma (to relative precision `rtol`, rounded up) with epsilon(sigma) <= target_epsilon:
    brackets it from `sigma` in steps of `factor` (squared at each step), then a safeguarded secant."""
    lo = hi = None  # epsilon(lo) > target >= epsilon(hi)
    e_lo = e_hi = None
    while lo is None or hi is None:
        e = epsilon(sigma)
        if e <= target_epsilon:
            hi, e_hi = sigma, e
            if lo is None:
                if sigma <= min_noise_multiplier:
                    raise ValueError(
                        f"eps={target_epsilon!r} is met even at noise_multiplier={min_noise_multiplier:g} "
                        f"(epsilon {e:.4g}); plan from a given noise multiplier instead")
                sigma = max(sigma / factor, min_noise_multiplier)
        else:
            lo, e_lo = sigma, e
            if hi is None:
                if sigma >= max_noise_multiplier:
                    raise ValueError(
                        f"eps={target_epsilon!r} needs noise_multiplier above {max_noise_multiplier:g} "
                        f"(sample_rate={sample_rate:.4g}, steps={steps}, delta={delta:g}): "
                        "raise eps or delta, or lower the batch size or steps")
                sigma = min(sigma * factor, max_noise_multiplier)
        factor = factor**2

    # Safeguarded secant on (log sigma, log epsilon), pinning the guess from both sides.
    bisect_next = False
    for _ in range(100):
        if hi / lo <= 1 + rtol:
            return hi
        width = math.log(hi / lo)
        if bisect_next or not (e_lo > 0 and e_hi > 0):
            guesses = [math.sqrt(lo * hi)]
        else:
            t = math.log(e_lo / target_epsilon) / math.log(e_lo / e_hi) if e_lo != e_hi else 0.5
            t = min(max(t, 0.01), 0.99)
            g = lo * math.exp(t * width)
            step = math.log1p(rtol) / 2.2
            guesses = [g * math.exp(-step), g * math.exp(step)]
        for g in guesses:
            if not lo < g < hi:
                continue
            e = epsilon(g)
            if e <= target_epsilon:
                hi, e_hi = g, e
            else:
                lo, e_lo = g, e
        bisect_next = math.log(hi / lo) > width / 2
    raise RuntimeError("noise multiplier search did not converge")  # pragma: no cover


def max_steps(
    *,
    sample_rate: float,
    noise_multiplier: float,
    target_epsilon: float,
    delta: float,
    limit: int = MAX_STEPS,
) -> int:
    """The largest number of steps whose certified epsilon is <= target_epsilon (0 if even one step
    exceeds it; `limit` if `limit` steps still fit), and never more than a plan with this delta may have:
    min_delta(steps) <= delta, so at most delta / DELTA_PER_STEP where that is less than `limit`. Raises ValueError
    for a delta below MIN_DELTA, where no plan may have one."""
    _check("sample_rate", sample_rate, 0, 1, hi_open=False)
    _check("noise_multiplier", noise_multiplier, 0, math.inf)
    _check("eps", target_epsilon, 0, math.inf)
    _check("delta", delta, 0, 1)
    _check_delta_floor(delta)
    _check_steps("limit", limit, maximum=None)
    limit = min(limit, _most_steps_at(delta))
    discretization = pld_discretization(target_epsilon)

    def fits(steps: int) -> bool:
        return _certificate_epsilon(dpsgd_event(sample_rate, noise_multiplier, steps), delta,
                                    discretization) <= target_epsilon

    if not fits(1):
        return 0
    good, bad = 1, None
    while bad is None:
        trial = min(good * 2, limit)
        if fits(trial):
            good = trial
            if good == limit:
                return limit
        else:
            bad = trial
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def _most_steps_at(delta: float) -> int:
    """The most steps whose floor delta allows: the largest T with min_delta(T) <= delta (delta >= MIN_DELTA)."""
    steps = math.floor(delta / DELTA_PER_STEP)   # within a step or so: min_delta's own rounding decides
    while min_delta(steps + 1) <= delta:
        steps += 1
    while min_delta(steps) > delta:
        steps -= 1
    return steps
