"""RDP and PLD (dp-accounting) and PRV (prv-accountant) behind one interface.

An accountant is a frozen value holding its numerical settings; `epsilon(event, delta)` builds a
fresh library accountant for every call, so no state leaks between trials of a calibration.

Events are dp-accounting's `DpEvent`s (the plan builds them with `PrivacyPlan.to_event()`). DP-SGD is
the three-node tree `SelfComposed(PoissonSampled(q, Gaussian(noise_multiplier)), steps)`; the
traversal that flattens it into (sample_rate, noise_multiplier, steps) is written once, in
`_dpsgd_terms`, and every accountant uses it.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import logging
import math
import numbers
from typing import Literal

import dp_accounting
import numpy as np
from dp_accounting import dp_event
from dp_accounting.pld import privacy_loss_distribution as _pld
from dp_accounting.rdp import rdp_privacy_accountant as _rdp

__all__ = [
    "DELTA_PER_STEP",
    "MIN_DELTA",
    "EpsilonReport",
    "MembershipBound",
    "UnsupportedEventError",
    "RdpAccountant",
    "PldAccountant",
    "PrvAccountant",
    "delta_floor_problem",
    "dpsgd_event",
    "membership_bound",
    "min_delta",
]

# dp-accounting's default orders (1.1 .. 63, then 128 .. 1024). Larger integer orders cost ~0.2 s
# (a Python series per order) and did not move the optimum on the paper's plans (it sits at 3.2 to 63).
RDP_ORDERS: tuple[float, ...] = tuple(float(a) for a in _rdp.DEFAULT_RDP_ORDERS)


class UnsupportedEventError(ValueError):
    """The accountant cannot interpret this event; the message names the sub-event."""


@dataclasses.dataclass(frozen=True)
class EpsilonReport:
    """Bounds on epsilon at one delta. `upper` is the guarantee; RDP fills only `upper`, PLD
    (pessimistic) fills `estimate` and `upper`, PRV fills all three (a plan document's PRV report is
    empty, all None, where prv-accountant failed: PlanDocument.prv_failed)."""

    lower: float | None
    estimate: float | None
    upper: float
    method: str

    def to_dict(self) -> dict:
        return {"lower": self.lower, "estimate": self.estimate, "upper": self.upper}


def dpsgd_event(sample_rate: float, noise_multiplier: float, steps: int) -> dp_event.DpEvent:
    """DP-SGD as a dp-accounting event: `steps` Poisson-sampled Gaussian steps (plain Gaussian steps
    when every example is in every batch). Raises ValueError unless sample_rate is a finite number in
    (0, 1], noise_multiplier a finite number >= 0 and steps an integer >= 0 (a NaN sample rate used to
    pass `sample_rate < 1.0` as False and be accounted as full-batch training)."""
    if not (_is_finite_real(sample_rate) and 0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample_rate={sample_rate!r} must be a finite number in (0, 1]")
    if not (_is_finite_real(noise_multiplier) and noise_multiplier >= 0.0):
        raise ValueError(f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0")
    if not (isinstance(steps, numbers.Integral) and not isinstance(steps, bool) and steps >= 0):
        raise ValueError(f"steps={steps!r} must be an integer >= 0")
    step: dp_event.DpEvent = dp_event.GaussianDpEvent(float(noise_multiplier))
    if sample_rate < 1.0:
        step = dp_event.PoissonSampledDpEvent(float(sample_rate), step)
    return dp_event.SelfComposedDpEvent(step, int(steps))


def _is_finite_real(value) -> bool:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _dpsgd_terms(event: dp_event.DpEvent, count: int = 1) -> list[tuple[float, float, int]]:
    """Flattens an event into [(sample_rate, noise_multiplier, count)] terms; raises on anything else.

    Side-effect free: the `supports` check of dp-accounting's template and the composition walk in one.
    """
    if isinstance(event, dp_event.NoOpDpEvent):
        return []
    if isinstance(event, dp_event.SelfComposedDpEvent):
        if event.count < 0:
            raise UnsupportedEventError(f"count={event.count!r} must be >= 0 in {event!r}")
        return _dpsgd_terms(event.event, count * event.count)
    if isinstance(event, dp_event.ComposedDpEvent):
        return [t for e in event.events for t in _dpsgd_terms(e, count)]
    if isinstance(event, dp_event.GaussianDpEvent):
        return [(1.0, float(event.noise_multiplier), count)] if count else []
    if isinstance(event, dp_event.PoissonSampledDpEvent) and isinstance(
        event.event, dp_event.GaussianDpEvent
    ):
        q = float(event.sampling_probability)
        if not 0.0 <= q <= 1.0:
            raise UnsupportedEventError(f"sampling_probability={q!r} must be in [0, 1] in {event!r}")
        return [(q, float(event.event.noise_multiplier), count)] if count and q > 0 else []
    raise UnsupportedEventError(f"unsupported event {event!r}: only (Poisson-sampled) Gaussian "
                                "steps and their compositions can be accounted")


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise ValueError(f"delta={delta!r} must be in (0, 1)")


# The smallest delta PLD certifies at, for a plan and for the library's PLD functions alike: MIN_DELTA, and
# DELTA_PER_STEP times the steps. dp-accounting's PLD composes by FFT, whose round-off leaves probability mass astray,
# about 1e-17 of it per step (measured in stop 36's review against an error-tracked composition: 2.6e-15 at 469
# steps, 6e-14 to 1.4e-13 at 10,000, 9e-13 at 100,000; at 100 steps the composed pmf's negative entries alone sum to
# 5e-15). Against a small delta that is not negligible: at delta 1e-12, 100 steps, its "pessimistic" epsilon (9.11315)
# was below the true one (9.11449: a rigorous lower bound on delta there is 1.005e-12). At 1e-10 and 100,000 steps
# the round-off is 1% of delta. The floor is an empirical rule, and its margin is thin. Stop 52's walk (h122) composed
# dp-accounting's own pessimistic one-step pmf without that round-off (an exponentially tilted FFT keeps the tail
# that sets delta to relative precision; mass outside its window moved up, pessimistically) at the floor: delta
# min_delta(steps), 500 to 10,000 steps, sample rate 0.001 to 0.2, noise multiplier 0.35 to 0.8. At the
# certificate's own interval the round-off misplaced up to 7.8e-4 of delta (sample rate 0.01, noise multiplier 0.5,
# 1000 steps, delta 1e-10: epsilon 0.25 PLD intervals low), 8x the 1e-4 that 1e-17 per step predicts. The
# pessimistic rounding's slack still covered it in every case: the same composition at a 16x finer interval, an
# upper bound on the true delta, put at most 0.99935 of delta at the certified epsilon (that same case). Lower still,
# dpdm's own PLD contradicted dp-accounting (1e-13) and its answer moved with its truncation settings (3e-15).
MIN_DELTA = 1e-10
DELTA_PER_STEP = 1e-13
_STEPS_PER_DELTA = 1e13   # 1 / DELTA_PER_STEP, exactly


def min_delta(steps: int) -> float:
    """The smallest delta a plan of `steps` steps may have (MIN_DELTA, or DELTA_PER_STEP per step)."""
    # steps / 1e13, the correctly rounded quotient: 1e-13 * 10**6 rounds to 1.0000000000000001e-07, which refused
    # exactly 1e-13 per step as "below 1e-07" (stop 42).
    return max(MIN_DELTA, steps / _STEPS_PER_DELTA)


def delta_floor_problem(delta: float, steps: int | None = None, *, name: str = "delta",
                        plan_file: bool = False) -> str | None:
    """Why `delta` is too small for a plan of `steps` steps (None: the steps are not known yet), or None.
    `plan_file`: the delta is a plan file's, which an older dpdm that allowed less may have written; the line then
    says to make it again (a library call or a command-line option has no file to make again: r1 N3, stop 52)."""
    floor = MIN_DELTA if steps is None else min_delta(steps)
    if delta >= floor:
        return None
    per_step = f" for {steps} steps (at least {DELTA_PER_STEP:g} per step)" if floor > MIN_DELTA else ""
    again = " (a plan file from an older dpdm that allowed less must be made again)" if plan_file else ""
    return f"{name}={delta!r} is below {floor:g}{per_step}, where the accountants lose double precision{again}"


class _DeltaFloorError(ValueError):
    """`_check_delta_floor`'s refusal: a plan file's loader (`accounting.plan.plan_from_dict`) words it for a file."""


def _check_delta_floor(delta: float, steps: int | None = None) -> None:
    """ValueError (delta_floor_problem's line) unless delta is at least min_delta(steps)."""
    problem = delta_floor_problem(delta, steps)
    if problem:
        raise _DeltaFloorError(problem)


class _Accountant(abc.ABC):
    """Shared contract: `supports(event)`, `epsilon(event, delta) -> EpsilonReport`.

    No-op events give 0; a zero noise multiplier (non-private) gives inf."""

    method: str = ""

    def supports(self, event: dp_event.DpEvent) -> bool:
        try:
            _dpsgd_terms(event)
        except UnsupportedEventError:
            return False
        return True

    def epsilon(self, event: dp_event.DpEvent, delta: float) -> EpsilonReport:
        _check_delta(delta)
        terms = _dpsgd_terms(event)
        if not terms:
            return EpsilonReport(0.0, 0.0, 0.0, self.method)
        if any(sigma == 0 for _, sigma, _ in terms):
            return EpsilonReport(math.inf, math.inf, math.inf, self.method)
        return self._epsilon(terms, delta)

    @abc.abstractmethod
    def _epsilon(self, terms, delta) -> EpsilonReport:
        """The accountant's EpsilonReport for DP-SGD terms [(sample_rate, noise_multiplier, steps)]."""


@dataclasses.dataclass(frozen=True)
class RdpAccountant(_Accountant):
    """Renyi DP (dp-accounting), converted to (eps, delta) at the best order. Fills only `upper`."""

    orders: tuple[float, ...] = RDP_ORDERS
    method: str = "rdp"

    def rdp_curve(self, terms) -> np.ndarray:
        rdp = np.zeros(len(self.orders))
        for q, sigma, count in terms:
            rdp = rdp + count * _rdp_one_step(q, sigma, self.orders)
        return rdp

    def _epsilon(self, terms, delta) -> EpsilonReport:
        with _quiet_absl():
            eps, _ = _rdp.compute_epsilon(self.orders, self.rdp_curve(terms), delta)
        return EpsilonReport(None, None, float(eps), self.method)


@contextlib.contextmanager
def _quiet_absl():
    """dp-accounting's absl warnings off the user's stderr. They are expected, and dp-accounting
    handles them itself: a fractional order whose series does not converge at a small noise multiplier
    is dropped (inf); a Renyi divergence a rounding error below 0 at a huge one (1e9) is taken as 0."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


@functools.lru_cache(maxsize=256)
def _rdp_one_step(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    with _quiet_absl():
        return np.asarray(_rdp._compute_rdp_poisson_subsampled_gaussian(q, sigma, orders), dtype=float)


@dataclasses.dataclass(frozen=True)
class PldAccountant(_Accountant):
    """Privacy loss distributions (dp-accounting), pessimistic discretization: `upper` is a
    rigorous bound for any `discretization`; a smaller interval makes it tighter (and slower).
    Raises ValueError for a delta below min_delta(steps), the event's steps in all: there dp-accounting's
    round-off put its "pessimistic" epsilon below the true one."""

    discretization: float = 1e-4
    method: str = "pld"

    def __post_init__(self):
        if not (self.discretization > 0 and math.isfinite(self.discretization)):
            raise ValueError(f"discretization={self.discretization!r} must be > 0")

    def _epsilon(self, terms, delta) -> EpsilonReport:
        _check_delta_floor(delta, sum(count for _, _, count in terms))
        if delta >= total_variation_bound(terms):
            return EpsilonReport(None, 0.0, 0.0, self.method)
        eps = float(_composed_pld(terms, self.discretization).get_epsilon_for_delta(delta))
        return EpsilonReport(None, eps, eps, self.method)


def total_variation_bound(terms) -> float:
    """An upper bound on delta(0), the total variation distance between DP-SGD's outputs with and without one
    example: 1 - prod (1 - q * TV(N(0, sigma^2), N(1, sigma^2)))^count over `_dpsgd_terms`' terms. One Poisson-sampled
    step's is q * (2 Phi(1 / (2 sigma)) - 1) = q * erf(1 / (2 sqrt(2) sigma)) (its dominating pair, either direction),
    and a maximal coupling of each step given the ones before bounds their (adaptive) composition. At a delta
    at least this, epsilon is exactly 0: PldAccountant answers so without a PLD, whose interval there (from RDP's
    near-zero epsilon) asked for a grid of many GiB (h107 N1, h142 N1). Rounded up, so that it stays a bound."""
    log_same = 0.0
    for q, sigma, count in terms:
        moved = q * math.erf(1.0 / (2.0 * math.sqrt(2.0) * sigma))
        if moved >= 1.0:   # q = 1 and sigma under about 0.1, where erf rounds to 1: log1p(-1) raised "math domain
            return 1.0     # error", the whole line of `dpdm account -s 0.05 -p 1 -i 1000000` (stop 54)
        log_same += count * math.log1p(-moved)
    return min(-math.expm1(log_same) * (1.0 + 1e-9) + 1e-15, 1.0)


def _composed_pld(terms, discretization: float):
    """The pessimistic PLD of `_dpsgd_terms`' (sample_rate, noise_multiplier, count) terms composed (`one_step_pld`
    each, self-composed count times): PldAccountant's, and `membership_bound`'s."""
    pld = None
    for q, sigma, count in terms:
        one = one_step_pld(q, sigma, discretization).self_compose(count)
        pld = one if pld is None else pld.compose(one)
    return pld


@functools.lru_cache(maxsize=64)
def one_step_pld(q: float, sigma: float, discretization: float):
    """The pessimistic PLD of one (Poisson-sampled) Gaussian step, add-or-remove-one neighbours.
    Cached: it is an immutable value, and the ledger asks for the same step at every checkpoint."""
    return _pld.from_gaussian_mechanism(
        standard_deviation=sigma,
        sensitivity=1.0,
        pessimistic_estimate=True,
        value_discretization_interval=discretization,
        sampling_prob=q,
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


@dataclasses.dataclass(frozen=True)
class MembershipBound:
    """What an (epsilon, delta(epsilon))-DP guarantee means for one example: `tpr[fpr]` bounds the true-positive
    rate of ANY membership test for that example (whatever the attacker knows) at false-positive rate `fpr`, and
    `advantage` bounds TPR - FPR at every FPR. Upper bounds (see `membership_bound`)."""

    tpr: dict[float, float]
    advantage: float


# The grid of epsilons `membership_bound` minimises over: any epsilon gives a valid bound, so the grid sets only how
# tight it is (a grid 100 times finer gave the demo plan's figures to the last digit, at 36 times the cost).
_MEMBERSHIP_EPS_STEP = 1e-3


def membership_bound(event: dp_event.DpEvent, fprs=(0.01, 0.001), *, discretization: float = 1e-4
                     ) -> MembershipBound:
    """Bounds on any membership test for one training example, from the event's pessimistic PLD (the one
    PldAccountant certifies with; pass a plan's own interval to bound with the PLD of its certificate).

    A test that says "in the data" with false-positive rate FPR (on data without the example) and true-positive
    rate TPR (on data with it) obeys, for every epsilon, TPR <= delta(eps) + e^eps * FPR and
    TPR <= 1 - e^-eps * (1 - delta(eps) - FPR) (Kairouz, Oh, Viswanath 2015), where delta(eps) is the privacy
    profile (both directions of add-or-remove-one); so TPR <= the minimum over eps of the smaller, taken here over
    a grid of eps from 0 to ln(1/FPR) + 5 (any eps gives a valid bound). TPR - FPR <= delta(0), the total
    variation distance. The pessimistic PLD's delta(eps) is an upper bound on the true profile; it is raised by
    DELTA_PER_STEP per step besides, the FFT round-off that sets a plan's delta floor. Each bound is at least
    its FPR (a test can always guess at that rate) and at most 1; no privacy loss (no steps) gives TPR = FPR, a
    zero noise multiplier TPR = 1. Display the bounds rounded up. ValueError for an FPR outside (0, 1)."""
    given = fprs
    # a 0-d array (np.array(0.01)) is one number, not a tuple of them: tuple() of it raised TypeError (r1 F5)
    fprs = tuple(fprs) if isinstance(fprs, (tuple, list)) or getattr(fprs, "ndim", 0) == 1 else ()
    if not fprs or not all(_is_finite_real(a) and 0.0 < a < 1.0 for a in fprs):
        raise ValueError(f"fprs={given!r} must be a tuple of one or more numbers in (0, 1)")
    fprs = tuple(float(a) for a in fprs)
    terms = _dpsgd_terms(event)
    if not terms:
        return MembershipBound({a: a for a in fprs}, 0.0)
    if any(sigma == 0 for _, sigma, _ in terms):
        return MembershipBound({a: 1.0 for a in fprs}, 1.0)
    pld = _composed_pld(terms, discretization)
    margin = DELTA_PER_STEP * sum(count for _, _, count in terms)
    eps = np.arange(0.0, math.log(1.0 / min(fprs)) + 5.0, _MEMBERSHIP_EPS_STEP)
    delta = np.minimum(np.asarray(pld.get_delta_for_epsilon(eps), dtype=float) + margin, 1.0)
    tpr = {}
    for a in fprs:
        bound = np.minimum(delta + np.exp(eps) * a, 1.0 - np.exp(-eps) * (1.0 - delta - a)).min()
        tpr[a] = float(min(max(bound, a), 1.0))
    return MembershipBound(tpr, float(min(delta[0], 1.0)))


# What prv-accountant raises where its discretisation fails rather than the input (e.g. "Discrete mean
# differs from continuous mean significantly" for small noise at large sample rates, microsoft/prv_accountant#42).
PRV_ERRORS = (ValueError, RuntimeError, OverflowError, FloatingPointError)


def _quiet_numpy():
    """numpy's floating-point warnings off around prv-accountant: its densities overflow in exp at small
    noise multipliers (0.2 printed six RuntimeWarnings on the user's stderr) on the way to bounds it
    checks itself; a failure still raises (PRV_ERRORS)."""
    return np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore")


@dataclasses.dataclass(frozen=True)
class PrvAccountant(_Accountant):
    """Privacy random variables (prv-accountant): (lower, estimate, upper), with
    upper - estimate <= eps_error (+ the effect of delta_error). Slow when eps_error is tiny."""

    eps_error: float = 0.01
    delta_error: float | None = None  # None: delta / 1000
    method: str = "prv"

    def __post_init__(self):
        if not (self.eps_error > 0 and math.isfinite(self.eps_error)):
            raise ValueError(f"eps_error={self.eps_error!r} must be > 0")

    def _epsilon(self, terms, delta) -> EpsilonReport:
        with _quiet_numpy():
            lower, estimate, upper = self._accountant(terms, delta).compute_epsilon(
                delta, [count for _, _, count in terms]
            )
        return _prv_report(lower, estimate, upper, self.eps_error)

    def _accountant(self, terms, delta):
        import prv_accountant  # noqa: PLC0415  (imported on first use: not needed to plan)

        prvs = [
            prv_accountant.GaussianMechanism(noise_multiplier=sigma)
            if q == 1.0
            else prv_accountant.PoissonSubsampledGaussianMechanism(
                sampling_probability=q, noise_multiplier=sigma
            )
            for q, sigma, _ in terms
        ]
        delta_error = self.delta_error if self.delta_error is not None else delta / 1000
        with _quiet_numpy():
            return prv_accountant.PRVAccountant(
                prvs=prvs,
                eps_error=self.eps_error,
                delta_error=delta_error,
                max_self_compositions=[count for _, _, count in terms],
            )

    def curve(self, event: dp_event.DpEvent, delta: float, steps: list[int]) -> list[EpsilonReport]:
        """Reports after each of `steps` (one composition prefix of a single-term event)."""
        terms = _dpsgd_terms(event)
        if len(terms) != 1:
            raise UnsupportedEventError("curve needs a single self-composed step")
        acc = self._accountant(terms, delta)
        out = []
        for n in steps:
            if n == 0:
                out.append(EpsilonReport(0.0, 0.0, 0.0, self.method))
                continue
            with _quiet_numpy():
                lo, est, up = acc.compute_epsilon(delta, [n])
            out.append(_prv_report(lo, est, up, self.eps_error))
        return out


def _prv_report(lower: float, estimate: float, upper: float, eps_error: float) -> EpsilonReport:
    """prv-accountant's triple with each value raised to 0, the least epsilon there is: near 0 (noise
    multiplier 1e9) its estimate came out as -1e-5, which a plan file cannot hold as an epsilon.
    Raising a value only loosens a lower bound and keeps an upper bound an upper bound.

    Raises ValueError (one of PRV_ERRORS: PRV gave no epsilon) for a triple that is no answer: not finite, out
    of order, or an upper bound below 0 by more than its error. At 10**6 steps of q 0.064, sigma 1 (true epsilon in the
    thousands) its grid overflowed and it returned (-6167, -6098, -6028); raised to 0, that had certified 0."""
    triple = (float(lower), float(estimate), float(upper))
    if not all(math.isfinite(v) for v in triple) or not lower <= estimate <= upper or upper < -eps_error:
        raise ValueError(f"prv-accountant returned no epsilon: (lower, estimate, upper) = "
                         f"({lower:.6g}, {estimate:.6g}, {upper:.6g})")
    return EpsilonReport(*(max(v, 0.0) for v in triple), "prv")


Method = Literal["rdp", "pld", "prv"]
