"""A third accountant, written here from the mechanism's densities: the tie-breaker when PRV and PLD
disagree.

It shares no code with dp-accounting or prv-accountant. For one Poisson-sampled Gaussian step the
privacy loss has a closed-form distribution in both directions of add-or-remove-one:

    remove: x ~ P = (1-q) N(0, s^2) + q N(1, s^2),  L(x) = log(1 - q + q exp((2x - 1) / (2 s^2)))
    add:    x ~ P = N(0, s^2),                      L(x) = -log(1 - q + q exp((2x - 1) / (2 s^2)))

L is monotone in x, so P(L <= t) is a normal CDF at the inverse x(t). On a grid of width h the loss
is rounded *up* to the next grid point (the pessimistic PLD: delta(eps) can only grow) or *down*
(the optimistic one: it can only shrink). T steps compose by convolution (FFT, by repeated
squaring), truncating to a window after every product: pessimistically, mass above the window goes
to +inf (it counts fully towards delta) and mass below it is rounded up to the window's lowest
point; optimistically, mass above is rounded down to the highest point and mass below is dropped.
Every one of these moves only raises (pessimistic) or only lowers (optimistic) delta(eps), so

    lower <= true epsilon <= upper

except for floating-point round-off, which is not negligible at every delta. Each FFT product of n
points can misplace up to about 8 * 2**-53 * log2(n) * sqrt(n) * (|a|_2 |b|_1 + |a|_1 |b|_2) of
probability mass (the normwise bound, see `_fft_roundoff`; the errors measured were 140-270 times
smaller), and these errors add up over the composition: at 2**19 grid points the bound is about
1e-11 to 1e-8 of mass for 100 to 5000 steps. At delta 1e-12 that matters: for q 0.064, sigma 1, T
100 the lower bound without a guard (9.1245) sat above dp-accounting's pessimistic epsilon (9.1174).
So the accountant carries the bound (`_Pmf.err`) through every product and meets delta - err on the
pessimistic side and delta + err on the optimistic side, which keeps the bracket valid; where err
exceeds _MAX_ROUNDOFF_SHARE of delta it gives no bracket and raises `FftPrecisionError`.
Each step's rounding moves the loss by at most h, so the bracket is about T * h wide.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import signal, special

from accounting.accountants import EpsilonReport, RdpAccountant, _Accountant

__all__ = ["FftPldAccountant", "FftPrecisionError", "step_pmf"]

# Per-step losses whose probability beyond the window is below this are cut off (pessimistically:
# sent to +inf); far below any delta a plan can ask for.
_TAIL_MASS = 1e-30
# No bracket when the bound on FFT round-off (in probability mass) exceeds this share of delta.
_MAX_ROUNDOFF_SHARE = 0.1
_UNIT_ROUNDOFF = 2.0**-53
_FFT_ERROR_CONSTANT = 8.0   # see _fft_roundoff


class FftPrecisionError(ValueError):
    """delta is too small for the FFT's double-precision round-off: no rigorous bracket."""


def _x_of_loss(t: np.ndarray, q: float, sigma: float) -> np.ndarray:
    """The x at which l(x) = log(1 - q + q exp((2x - 1) / (2 sigma^2))) equals t; defined for
    t > log(1 - q) (elsewhere -inf or nan, which callers mask)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if q == 1.0:
            return sigma**2 * t + 0.5
        # e^t - (1 - q) without cancellation for t > 0
        inner = np.where(t > 0, np.expm1(t) + q, np.exp(t) - (1 - q))
        return sigma**2 * np.log(inner / q) + 0.5


def _loss_tails(t: np.ndarray, q: float, sigma: float, direction: str) -> tuple[np.ndarray, np.ndarray]:
    """(P(L <= t), P(L > t)) for one step's privacy loss in `direction` ('remove' or 'add'), each
    computed from its own tail (no 1 - cdf cancellation)."""
    t = np.asarray(t, dtype=float)
    bound = math.log1p(-q) if q < 1 else -math.inf  # infimum of l
    if direction == "remove":  # L = l(x), x ~ (1-q) N(0, s^2) + q N(1, s^2); l increasing
        x = _x_of_loss(t, q, sigma)
        cdf = (1 - q) * special.ndtr(x / sigma) + q * special.ndtr((x - 1) / sigma)
        sf = (1 - q) * special.ndtr(-x / sigma) + q * special.ndtr((1 - x) / sigma)
        return np.where(t <= bound, 0.0, cdf), np.where(t <= bound, 1.0, sf)
    if direction != "add":
        raise ValueError(f"direction={direction!r} must be 'remove' or 'add'")
    # L = -l(x), x ~ N(0, s^2): L <= t  <=>  l(x) >= -t  <=>  x >= x(-t)
    x = _x_of_loss(-t, q, sigma)
    cdf, sf = special.ndtr(-x / sigma), special.ndtr(x / sigma)
    return np.where(t >= -bound, 1.0, cdf), np.where(t >= -bound, 0.0, sf)


@dataclasses.dataclass
class _Pmf:
    """Mass `p[i]` at loss (offset + i) * h, plus `inf` mass at +infinity; `err` bounds the total
    probability mass that floating-point round-off may have misplaced in `p`."""

    p: np.ndarray
    offset: int
    inf: float
    err: float = 0.0


def _support(q: float, sigma: float, direction: str, h: float) -> tuple[int, int]:
    """Grid indices [k0, k1] outside which one step's loss has mass < _TAIL_MASS on each side."""
    def quantile(target: float, upper_tail: bool) -> float:
        def f(t: float) -> float:
            return float(_loss_tails(np.array(t), q, sigma, direction)[1 if upper_tail else 0]) - target

        a, b = -1.0, 1.0
        while (f(b) > 0) if upper_tail else (f(a) > 0):
            a, b = a * 2, b * 2
            if b > 1e6:
                break
        lo_t, hi_t = (0.0, b) if upper_tail else (a, 0.0)
        for _ in range(200):
            mid = (lo_t + hi_t) / 2
            if (f(mid) > 0) == upper_tail:
                lo_t = mid
            else:
                hi_t = mid
        return hi_t if upper_tail else lo_t

    t_hi = quantile(_TAIL_MASS, upper_tail=True)
    if direction == "remove" and q < 1:
        t_lo = math.log1p(-q)
    else:
        t_lo = quantile(_TAIL_MASS, upper_tail=False)
    if direction == "add" and q < 1:
        t_hi = min(t_hi, -math.log1p(-q))
    return math.floor(t_lo / h) - 1, math.ceil(t_hi / h) + 1


def step_pmf(q: float, sigma: float, direction: str, h: float, pessimistic: bool) -> _Pmf:
    """One step's privacy loss on the grid h * Z, rounded up (pessimistic) or down."""
    k0, k1 = _support(q, sigma, direction, h)
    grid = np.arange(k0, k1 + 1, dtype=float) * h
    cdf, sf = _loss_tails(grid, q, sigma, direction)
    # mass of (t_{i-1}, t_i], from whichever tail is accurate
    cell = np.where(grid[1:] > 0, sf[:-1] - sf[1:], cdf[1:] - cdf[:-1])
    cell = np.maximum(cell, 0.0)
    below, above = float(cdf[0]), float(sf[-1])
    if pessimistic:
        p = np.concatenate([[below], cell])  # cell (t_{i-1}, t_i] -> t_i; below t_0 -> t_0
        return _Pmf(p, k0, above)
    p = np.concatenate([cell, [above]])      # cell (t_{i-1}, t_i] -> t_{i-1}; above t_n -> t_n
    return _Pmf(p, k0, 0.0)                  # below t_0: dropped


def _truncate(f: _Pmf, lo: int, hi: int, pessimistic: bool) -> _Pmf:
    start, end = f.offset, f.offset + len(f.p) - 1
    p, inf = f.p, f.inf
    if end > hi:
        cut = p[hi - start + 1:].sum()
        p = p[: hi - start + 1].copy()
        if pessimistic:
            inf = inf + float(cut)
        else:
            p[-1] += cut
        end = hi
    if start < lo:
        cut = p[: lo - start].sum()
        p = p[lo - start:].copy()
        if pessimistic:
            p[0] += cut
        start = lo
    return _Pmf(p, start, inf, f.err)  # moving mass does not add to the round-off


def _fft_roundoff(a: np.ndarray, b: np.ndarray) -> float:
    """A bound on the l1 round-off of fftconvolve(a, b) (nonnegative a, b) under the normwise FFT
    error model: _FFT_ERROR_CONSTANT * 2**-53 * log2(n) * (|a|_2 |b|_1 + |a|_1 |b|_2) on the l2 error,
    times sqrt(n) for l1. Higham (Accuracy and Stability of Numerical Algorithms, 2nd ed., Thm 24.2)
    bounds one radix-2 transform's relative error by log2(n) * eta, eta = mu + gamma_4 (sqrt(2) + mu),
    about 5.7 u with exact twiddle factors; the constant 8 covers that plus the product and the
    inverse transform's share. scipy's mixed-radix sizes are not covered by the theorem: the errors
    measured against a long-double direct convolution were 140-270 times below this figure."""
    n = len(a) + len(b)
    norms = np.linalg.norm(a) * np.sum(b) + np.sum(a) * np.linalg.norm(b)
    return float(_FFT_ERROR_CONSTANT * _UNIT_ROUNDOFF * math.log2(n) * math.sqrt(n) * norms)


def _compose(a: _Pmf, b: _Pmf, lo: int, hi: int, pessimistic: bool) -> _Pmf:
    p = signal.fftconvolve(a.p, b.p)
    p = np.maximum(p, 0.0)  # FFT round-off can leave -1e-18 (clipping only moves it towards the truth)
    inf = 1.0 - (1.0 - a.inf) * (1.0 - b.inf)
    # Errors already in a and b are spread by a convolution with mass <= 1, and this product adds its own.
    err = a.err + b.err + a.err * b.err + _fft_roundoff(a.p, b.p)
    return _truncate(_Pmf(p, a.offset + b.offset, inf, err), lo, hi, pessimistic)


def _self_compose(f: _Pmf, count: int, lo: int, hi: int, pessimistic: bool) -> _Pmf:
    result = None
    power = f
    while True:
        if count & 1:
            result = power if result is None else _compose(result, power, lo, hi, pessimistic)
        count >>= 1
        if not count:
            return result
        power = _compose(power, power, lo, hi, pessimistic)


def epsilon_for_delta(f: _Pmf, h: float, delta: float) -> float:
    """The smallest epsilon >= 0 with D(epsilon) <= delta, where
    D(epsilon) = inf + sum over t_k > epsilon of p_k (1 - exp(epsilon - t_k)) (continuous, decreasing)."""
    if f.inf > delta:
        return math.inf
    t = (f.offset + np.arange(len(f.p))) * h
    keep = t > 0  # D(epsilon) for epsilon >= 0 involves only positive losses
    t, p = t[keep], f.p[keep]
    if len(t) == 0 or f.inf + float(np.sum(p * -np.expm1(-t))) <= delta:  # D(0)
        return 0.0
    # suffix sums over k >= j: S1 = sum p_k, and S2 = sum p_k exp(-t_k) kept as its log (exp(t) overflows a
    # float above t = 709: an epsilon of 1,000 then came out as 709.87 on both sides of the bracket)
    s1 = np.cumsum(p[::-1])[::-1]
    with np.errstate(divide="ignore"):
        log_s2 = np.logaddexp.accumulate((np.log(p) - t)[::-1])[::-1]
    # D(t_j) = inf + S1[j+1] - exp(t_j) S2[j+1], where exp(t_j) S2[j+1] <= S1[j+1] <= 1
    s1n, log_s2n = np.append(s1[1:], 0.0), np.append(log_s2[1:], -np.inf)
    d_at = f.inf + s1n - np.exp(t + log_s2n)
    j = int(np.argmax(d_at <= delta))  # exists: D(t_last) = inf <= delta
    # On (t_{j-1}, t_j] (or (0, t_0]) the terms are k >= j: D(eps) = inf + S1[j] - e^eps S2[j]
    left = float(t[j - 1]) if j > 0 else 0.0
    eps = math.log(f.inf + s1[j] - delta) - float(log_s2[j])
    return min(max(eps, left), float(t[j]))


@dataclasses.dataclass(frozen=True)
class FftPldAccountant(_Accountant):
    """Lower and upper bounds on epsilon from this module's own PLD (see the module docstring).

    The composed loss is kept on [-window, window], window = 2 * RDP epsilon + 10 unless given (the
    RDP tail bound puts far less than delta above it). `discretization` is the grid h; None spreads
    `grid_points` over the window, which bounds the cost (about 5 s on 2 cores for 2**19 points,
    whatever the steps). The bracket is about steps * h wide, and widened for the FFT's round-off;
    raises FftPrecisionError where that round-off is not small against delta (see the module docstring)."""

    discretization: float | None = None
    grid_points: int = 2**19
    window: float | None = None
    method: str = "fft"

    def __post_init__(self):
        if self.discretization is not None and not (self.discretization > 0 and math.isfinite(self.discretization)):
            raise ValueError(f"discretization={self.discretization!r} must be > 0")
        if self.grid_points < 2:
            raise ValueError(f"grid_points={self.grid_points!r} must be >= 2")

    def _epsilon(self, terms, delta) -> EpsilonReport:
        window = self.window
        if window is None:
            rdp = RdpAccountant()._epsilon(terms, delta).upper
            window = 2 * rdp + 10 if math.isfinite(rdp) else 200.0
        h = self.discretization if self.discretization is not None else 2 * window / self.grid_points
        lo_idx, hi_idx = -math.ceil(window / h), math.ceil(window / h)
        bounds = {}
        for pessimistic in (True, False):
            eps = 0.0
            for direction in ("remove", "add"):
                total = None
                for q, sigma, count in terms:
                    one = _self_compose(step_pmf(q, sigma, direction, h, pessimistic), count,
                                        lo_idx, hi_idx, pessimistic)
                    total = one if total is None else _compose(total, one, lo_idx, hi_idx, pessimistic)
                if total.err > _MAX_ROUNDOFF_SHARE * delta:
                    raise FftPrecisionError(
                        f"dpdm's own PLD gives no bracket at delta={delta!r}: its FFT round-off may misplace "
                        f"{total.err:.2g} of probability mass, more than {_MAX_ROUNDOFF_SHARE:g} of delta")
                # D(eps) is off by at most err: the pessimistic side must meet delta - err, the optimistic
                # side may stop at delta + err.
                eps = max(eps, epsilon_for_delta(total, h, delta - total.err if pessimistic else delta + total.err))
            bounds[pessimistic] = eps
        return EpsilonReport(bounds[False], None, bounds[True], self.method)
