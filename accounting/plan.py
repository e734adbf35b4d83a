"""The privacy contract: a frozen, validated PrivacyPlan, its checked document (plan.json), and the
ledger helper that training calls at every checkpoint.

A plan document is *checked* (DESIGN.md section 2) when its certified epsilon (PLD pessimistic at a
fine discretization, or RDP's bound where that is smaller) is <= the target and PRV's lower bound does
not exceed it. Departures from DESIGN.md: PRV never certifies, even where its upper bound is tighter
(prv-accountant 0.2.0's "upper bound" came out below the exact epsilon at large sample rates and many
steps), so the certificate may lie above PRV's upper bound; RDP certifies where its bound is smaller
than PLD's; and when PRV alone disagrees, dpdm's own PLD (accounting/fft_pld.py, no code shared with
either library) decides. If its rigorous bracket holds the certificate and excludes PRV's bounds, PRV
is overruled, and the document records the bracket and why; otherwise the disagreement stays an error.
A document is *locked* when its digest verifies and its epsilon re-computes; `load_plan` refuses
anything else.
"""
from __future__ import annotations

import dataclasses
import decimal
import functools
import hashlib
import json
import math
import numbers
import os
import reprlib
import stat
import tempfile
from importlib import metadata
from typing import Any

import numpy as np
from scipy import special, stats

from accounting.accountants import (   # the delta floor (MIN_DELTA, min_delta) lives there: PldAccountant checks it
    DELTA_PER_STEP,
    MIN_DELTA,
    PRV_ERRORS,
    EpsilonReport,
    _check_delta_floor,
    _DeltaFloorError,
    _is_finite_real,
    PldAccountant,
    PrvAccountant,
    RdpAccountant,
    _quiet_numpy,
    delta_floor_problem,
    dpsgd_event,
    min_delta,
)
from accounting.calibrate import (
    MAX_STEPS,
    MIN_ACCOUNTED_NOISE_MULTIPLIER,
    calibrate_noise_multiplier,
    certification_discretization,
)
from accounting.fft_pld import FftPldAccountant, FftPrecisionError

__all__ = [
    "FORMAT",
    "MAX_DATASET_SIZE",
    "DELTA_PER_STEP",
    "MAX_ACCOUNTED_NOISE_MULTIPLIER",
    "MAX_NOISE_MULTIPLICITY",
    "MAX_PLAN_BYTES",
    "MIN_DELTA",
    "AccountingError",
    "NotCalibratedError",
    "PlanDocument",
    "PlanError",
    "PrivacyPlan",
    "delta_floor_problem",
    "epsilon_spent",
    "load_plan",
    "make_plan_document",
    "min_delta",
    "prv_eps_error_range",
    "prv_unreliable",
    "write_plan",
]

FORMAT = "dpdm.plan/1"
# PRV cross-check error in epsilon: 2% of the certified epsilon, but at least 0.01. PRV's cost grows
# as its error shrinks, and below eps ~ 1 its grid is dominated by a fixed-size domain (+-3 around
# the RDP tail bound), so a purely relative error makes small epsilons slow: over a minute at eps 0.2
# for 1e-4, ~2 s for 2%, ~0.8 s for 0.01 (5%), measured on 2 shared cores. The bounds are rigorous at
# any error; PRV checks the certificate, it never drives it (`dpdm account --eps-error` for tighter).
PRV_RELATIVE_EPS_ERROR = 0.02
PRV_MIN_EPS_ERROR = 0.01
# The largest relative PRV error make_plan_document takes (the PRV bounds are then as wide as epsilon).
# A plan file's prv_eps_error lies outside the digest and sets how much work re-computing its PRV figures
# takes (1e-9 asked for a 1.96 TiB grid), so a loaded plan's must lie where make_plan_document puts it.
PRV_MAX_RELATIVE_EPS_ERROR = 1.0
# How far PRV's upper bound may lie below the certificate, beyond PRV's stated error, in units of sqrt(steps) times
# the PLD interval: the certificate's slack above the true epsilon was measured at up to 2.1 of them (`prv_unreliable`).
PRV_SLACK_FACTOR = 3.0
# A loaded plan's epsilon must re-compute to the stored value: never above it, and not more than
# this far below it (a different dp-accounting version may shift the last digits).
RECOMPUTE_RTOL = 1e-3
# The quick lower bound that verification starts with: its grid, and the prefix of the steps it also bounds.
_QUICK_FLOOR_POINTS, _QUICK_FLOOR_PREFIX = 2**16, 2048
_QUICK_FLOOR_DELTAS = (1e-8, 1e-6)   # tried in turn where the plan's delta is too small for that grid
# `_event_floor`: the thresholds and cut points it tries, and the safety margin on the probabilities it computes
# (their relative round-off is below 1e-11: sums of positive terms, each accurate to about 1e-14).
_EVENT_FLOOR_POINTS = 256
_EVENT_FLOOR_RTOL = 1e-9
_FLOAT_RTOL = 1e-9
MAX_ACCOUNTED_NOISE_MULTIPLIER = 1e100
MAX_PLAN_BYTES = 16 << 20   # plans are a few kilobytes; a larger file is not one
# K, the diffusion-noise draws per example: training holds K noised copies of every image of a batch (10**6
# crashed `dpdm train`); the paper ablates K up to 32, where its metrics plateau.
MAX_NOISE_MULTIPLICITY = 4096


# The largest dataset a plan may name (sample_rate = B/N stays a meaningful float; a 401-digit N used
# to end in OverflowError).
MAX_DATASET_SIZE = 10**12


class PlanError(ValueError):
    """A plan file that is not a locked plan: bad JSON, missing keys, a digest that does not verify,
    an epsilon that does not re-compute."""


class NotCalibratedError(ValueError):
    """A plan whose noise multiplier does not meet its target epsilon."""


class AccountingError(RuntimeError):
    """The accountants disagree beyond numerical error (a bug here or in a library): never a warning."""


def _is_int(value) -> bool:
    """An integer, Python's or numpy's scalar (not a bool, nor a float such as 50.0)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    """A finite real number, Python's or numpy's scalar (not a bool; an int too large for a float, a 401-digit
    number in plan.json, is not)."""
    return _is_finite_real(value) and not isinstance(value, np.bool_)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyPlan:
    """What DP-SGD releases, in terms an accountant can interpret (DESIGN.md section 2)."""

    dataset_size: int
    batch_size: int  # expected batch size: sample_rate = batch_size / dataset_size
    sampling: str = "poisson"
    steps: int
    noise_multiplier: float
    clip_norm: float = 1.0
    noise_multiplicity: int = 32  # privacy-neutral: diffusion-noise draws averaged per example
    delta: float
    target_epsilon: float | None = None
    dataset_name: str | None = None

    def __post_init__(self):
        # numpy's scalars (np.int64(50), np.float32(1.0)) as the Python numbers they equal, before any check, so that
        # the plan's JSON and digest are those of the plain numbers (h154 N3, stop 55). Anything else stays as given,
        # to be refused below.
        for name in ("dataset_size", "batch_size", "steps", "noise_multiplicity"):
            value = getattr(self, name)
            if _is_int(value):
                object.__setattr__(self, name, int(value))
        for name in ("noise_multiplier", "clip_norm", "delta", "target_epsilon"):
            value = getattr(self, name)
            if _is_real(value):
                object.__setattr__(self, name, float(value))
        if not (_is_int(self.dataset_size) and 1 <= self.dataset_size <= MAX_DATASET_SIZE):
            raise ValueError(f"dataset_size={reprlib.repr(self.dataset_size)} must be an integer in "
                             f"[1, {MAX_DATASET_SIZE}]")
        if not (_is_int(self.batch_size) and self.batch_size >= 1):
            raise ValueError(f"batch_size={reprlib.repr(self.batch_size)} must be an integer >= 1")
        if self.batch_size > self.dataset_size:
            raise ValueError(
                f"batch_size={reprlib.repr(self.batch_size)} must be <= dataset_size={reprlib.repr(self.dataset_size)}")
        if self.sampling != "poisson":
            raise ValueError(f"sampling={reprlib.repr(self.sampling)} must be 'poisson'")
        if not (_is_int(self.steps) and 1 <= self.steps <= MAX_STEPS):
            raise ValueError(f"steps={reprlib.repr(self.steps)} must be an integer in [1, {MAX_STEPS}]")
        if not (_is_real(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier={reprlib.repr(self.noise_multiplier)} must be a finite number > 0")
        if self.noise_multiplier > MAX_ACCOUNTED_NOISE_MULTIPLIER:   # 1e155 overflowed sigma**2 (exit 4)
            raise ValueError(f"noise_multiplier={reprlib.repr(self.noise_multiplier)} must be at most "
                             f"{MAX_ACCOUNTED_NOISE_MULTIPLIER:g}: epsilon is 0 to double precision long before")
        if self.noise_multiplier < MIN_ACCOUNTED_NOISE_MULTIPLIER:
            raise ValueError(f"noise_multiplier={reprlib.repr(self.noise_multiplier)} is too small to account for: "
                             f"it must be >= {MIN_ACCOUNTED_NOISE_MULTIPLIER:g} (below it the accountants' grids grow "
                             "beyond memory, and epsilon is in the thousands)")
        if not (_is_real(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm={reprlib.repr(self.clip_norm)} must be a finite number > 0")
        if not (_is_int(self.noise_multiplicity) and 1 <= self.noise_multiplicity <= MAX_NOISE_MULTIPLICITY):
            raise ValueError(f"noise_multiplicity={reprlib.repr(self.noise_multiplicity)} must be an integer in [1, "
                             f"{MAX_NOISE_MULTIPLICITY}]")
        if not (_is_real(self.delta) and 0 < self.delta < 1):
            raise ValueError(f"delta={reprlib.repr(self.delta)} must be in (0, 1)")
        _check_delta_floor(self.delta, self.steps)
        if self.target_epsilon is not None and not (_is_real(self.target_epsilon) and self.target_epsilon > 0):
            raise ValueError(f"target_epsilon={reprlib.repr(self.target_epsilon)} must be a finite number > 0 or None")
        if self.dataset_name is not None and not (isinstance(self.dataset_name, str) and self.dataset_name):
            raise ValueError(f"dataset_name={reprlib.repr(self.dataset_name)} must be a non-empty string or None")

    @property
    def sample_rate(self) -> float:
        return self.batch_size / self.dataset_size

    @property
    def noise_std(self) -> float:
        """Absolute std of the noise added to the sum of clipped per-example gradients."""
        return self.noise_multiplier * self.clip_norm

    def to_event(self, steps: int | None = None):
        """DP-SGD as a dp-accounting event: `steps` (default: all) Poisson-sampled Gaussian steps."""
        return dpsgd_event(self.sample_rate, self.noise_multiplier, self.steps if steps is None else steps)

    def calibrate(self, *, epsilon: float) -> "PrivacyPlan":
        """This plan with the smallest noise multiplier that certifies `epsilon` (its new target)."""
        sigma = calibrate_noise_multiplier(
            sample_rate=self.sample_rate, steps=self.steps, target_epsilon=epsilon, delta=self.delta)
        return dataclasses.replace(self, noise_multiplier=sigma, target_epsilon=float(epsilon))

    def warnings(self) -> list[str]:
        """Legal but unwise choices, for the CLI to print on stderr."""
        out = []
        if self.delta >= 1 / self.dataset_size:
            out.append(
                f"delta={self.delta:g} is >= 1/dataset_size={1 / self.dataset_size:.3g}: a mechanism that "
                "releases one random example outright meets it; prefer delta << 1/N")
        return out

    def mechanism_fields(self) -> dict[str, Any]:
        """The fields the digest covers: everything that determines the privacy guarantee."""
        return {
            "dataset": {"name": self.dataset_name, "size": self.dataset_size},
            "sampling": self.sampling,
            "sample_rate": self.sample_rate,
            "batch_size": self.batch_size,
            "steps": self.steps,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "noise_multiplicity": self.noise_multiplicity,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
        }

    def digest(self) -> str:
        canonical = json.dumps(self.mechanism_fields(), sort_keys=True, separators=(",", ":"),
                               ensure_ascii=True, allow_nan=False)
        return "sha256:" + hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("dpdm", "dp-accounting", "prv-accountant"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanDocument:
    """A checked plan and its epsilon reports: what plan.json holds."""

    plan: PrivacyPlan
    epsilon: float  # certified: the promise
    certified_by: str  # "pld", or "rdp" where smaller (older files may say "prv": load_plan refuses them)
    rdp: EpsilonReport
    pld: EpsilonReport
    prv: EpsilonReport
    pld_discretization: float
    prv_eps_error: float
    versions: dict[str, str] = dataclasses.field(default_factory=_versions)
    # dpdm's own PLD bracket (accounting/fft_pld.py), computed only when PRV disagreed with PLD or failed;
    # and why PRV was overruled, when that bracket refuted it.
    independent: EpsilonReport | None = None
    prv_overruled: str | None = None
    # Why prv-accountant gave no epsilon for this plan (its discretisation fails for small noise at large
    # sample rates, microsoft/prv_accountant#42); `prv` is then empty and `independent` cross-checks PLD.
    prv_failed: str | None = None

    @property
    def digest(self) -> str:
        return self.plan.digest()

    def to_dict(self) -> dict[str, Any]:
        d = self.plan.mechanism_fields()
        d = {"format": FORMAT, **d}
        d["epsilon"] = {
            "certified": self.epsilon,
            "certified_by": self.certified_by,
            "rdp": self.rdp.upper,
            "pld": self.pld.upper,
            "prv": {"lower": self.prv.lower, "estimate": self.prv.estimate, "upper": self.prv.upper},
            "pld_discretization": self.pld_discretization,
        }
        # A file without one (DESIGN.md's schema does not list it; load_plan takes it as NaN) keeps it absent: NaN
        # is no JSON, and a run's plan.json that held it was refused by every later command (stop 44). Outside the
        # digest, so a plan that has one is written byte for byte as before.
        if math.isfinite(self.prv_eps_error):
            d["epsilon"]["prv_eps_error"] = self.prv_eps_error
        if self.independent is not None:
            # Its upper bound is infinite where its grid's bracket (steps * interval wide) says nothing: JSON
            # has no infinity, so null (a 10**6-step plan whose PRV failed could not be written).
            d["epsilon"]["independent"] = {k: (v if v is None or math.isfinite(v) else None) for k, v in
                                           (("lower", self.independent.lower), ("upper", self.independent.upper))}
            d["epsilon"]["independent"]["method"] = self.independent.method
        if self.prv_overruled is not None:
            d["epsilon"]["prv_overruled"] = self.prv_overruled
        if self.prv_failed is not None:
            d["epsilon"]["prv_failed"] = self.prv_failed
        d["versions"] = dict(self.versions)
        d["digest"] = self.digest
        return d

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @property
    def prv_unreliable(self) -> str | None:
        """Why PRV's figures are no bounds for this plan, or None (`prv_unreliable`): from the figures the
        document holds, so a loaded plan says the same, with no accounting and nothing more in plan.json."""
        if self.prv_overruled is not None or self.prv.upper is None:   # said already, or PRV gave nothing
            return None
        eps_error = self.prv_eps_error
        if not math.isfinite(eps_error):   # a file without one: the error make_plan_document takes
            eps_error = prv_eps_error_range(self.pld.upper)[0]
        return prv_unreliable(certified=self.epsilon, prv_upper=self.prv.upper, prv_eps_error=eps_error,
                              steps=self.plan.steps, pld_discretization=self.pld_discretization)


def certified_epsilon(plan: PrivacyPlan, certified_by: str | None = None, prv_eps_error: float | None = None) -> float:
    """Re-computes a plan's certified epsilon: the bound `certified_by` names ('pld': PLD's pessimistic bound at
    the plan's discretization, 'rdp': RDP's), or by default the smaller, which make_plan_document certifies.
    Both are rigorous upper bounds. ValueError for 'prv' (PRV no longer certifies: see make_plan_document) or
    another name. `prv_eps_error` is accepted for compatibility and unused."""
    if certified_by == "prv":
        raise ValueError(PRV_CERTIFICATE_REFUSED)
    if certified_by not in (None, "pld", "rdp"):
        raise ValueError(f"certified_by={certified_by!r} must be 'pld' or 'rdp'")
    bounds = {"pld": epsilon_spent(plan, plan.steps), "rdp": _rdp_upper(plan)}
    return bounds[certified_by] if certified_by else _certificate(**bounds)[0]


def _certificate(pld: float, rdp: float) -> tuple[float, str]:
    """The certificate: the smaller rigorous upper bound, and its name. PLD's is the smaller but over very many
    steps, where its grid makes it loose, up to tens of percent (q = 1, 10^6 steps, sigma 100: PLD 102.67, RDP 96.12,
    exact 91.82)."""
    return (pld, "pld") if pld <= rdp else (rdp, "rdp")


@functools.lru_cache(maxsize=64)
def _rdp_upper(plan: PrivacyPlan) -> float:
    return RdpAccountant().epsilon(plan.to_event(), plan.delta).upper


PRV_CERTIFICATE_REFUSED = ("epsilon certified by PRV: dpdm no longer certifies with prv-accountant's upper bound, "
                           "which came out below the exact epsilon at large sample rates and many steps")


def prv_eps_error_range(pld_epsilon: float) -> tuple[float, float]:
    """The PRV errors in epsilon make_plan_document can take for a plan whose PLD certificate is
    `pld_epsilon`: its default (the least) to PRV_MAX_RELATIVE_EPS_ERROR of epsilon. PRV's cost grows
    as its error shrinks, so the least bounds the work of verifying a PRV certificate."""
    return (max(PRV_RELATIVE_EPS_ERROR * pld_epsilon, PRV_MIN_EPS_ERROR),
            max(PRV_MAX_RELATIVE_EPS_ERROR * pld_epsilon, PRV_MIN_EPS_ERROR))


def prv_unreliable(*, certified: float, prv_upper: float, prv_eps_error: float, steps: int,
                   pld_discretization: float) -> str | None:
    """Why PRV's "upper bound" is no bound here, or None: it lies below the certificate by more than PRV's stated
    error and the certificate's own slack together (stop 44: at q 0.3, sigma 5, 10**6 steps, delta 1e-7, PRV
    said [529.7, 615.4] beside a certified 2141.55, and the true epsilon is above 1500).

    A PRV upper bound somewhat below the certificate is normal: the certificate lies above the true epsilon,
    and over many steps PLD's grid makes it loose (RDP, where it certifies, is below PLD). That slack was
    measured at 1.1 to 2.1 times sqrt(steps) * interval (q 1 over 10**6 steps, q 0.064 over 3 * 10**6 and 10**7:
    docs/accounting.md); PRV_SLACK_FACTOR times it is allowed. Where PRV was wrong, the gap was 8 times it and more
    (q 1, 50,000 steps, sigma 20: PRV 88.85 against an exact 109.34). Takes figures already computed, and
    accounts nothing itself.

    Args:
        certified: the certified epsilon (the smaller of PLD's and RDP's rigorous upper bounds).
        prv_upper: PRV's upper bound.
        prv_eps_error: PRV's stated error in epsilon.
        steps: the plan's steps.
        pld_discretization: the interval of the PLD that certified or was compared.
    Returns:
        One sentence for a warning, or None where PRV's upper bound is within tolerance.
    """
    slack = PRV_SLACK_FACTOR * math.sqrt(steps) * pld_discretization
    if not prv_upper < certified - prv_eps_error - slack:
        return None
    return (f"PRV's upper bound {bound_text(prv_upper, 6)} is below the certified epsilon "
            f"{bound_text(certified, 6)} (the smaller of PLD's and RDP's rigorous upper bounds) by more than PRV's "
            f"stated error ({prv_eps_error:.2g}) and the certificate's grid slack ({slack:.2g}): prv-accountant is "
            "unreliable here and its figures are no bounds; the certified epsilon is the figure to use")


def bound_text(epsilon: float, digits: int = 4, *, bound: str = "upper") -> str:
    """`epsilon` to `digits` significant digits, rounded away from the side it bounds: up for a guarantee
    (an upper bound: a certified 10.0045 shows as 10.01, where ".4g" showed 10), down for an audit's lower
    bound. Infinity and NaN as Python writes them. (`dpdm.report_utils.epsilon_text` is this.)"""
    if bound not in ("upper", "lower"):
        raise ValueError(f"bound={bound!r} must be 'upper' or 'lower'")
    if not math.isfinite(epsilon) or epsilon == 0:
        return f"{epsilon:g}"
    d = decimal.Decimal(repr(float(epsilon)))
    step = decimal.Decimal(1).scaleb(d.adjusted() - digits + 1)
    rounded = d.quantize(step, rounding=decimal.ROUND_CEILING if bound == "upper" else decimal.ROUND_FLOOR)
    return f"{float(rounded):.{digits}g}"


def _check_prv_eps_error(prv_eps_error: float, pld_epsilon: float) -> None:
    """ValueError unless prv_eps_error lies in prv_eps_error_range(pld_epsilon), with RECOMPUTE_RTOL of
    slack (the PLD certificate may shift in its last digits between dp-accounting versions)."""
    lo, hi = prv_eps_error_range(pld_epsilon)
    if not lo * (1 - RECOMPUTE_RTOL) <= prv_eps_error <= hi * (1 + RECOMPUTE_RTOL):
        raise ValueError(f"prv_eps_error={prv_eps_error!r} must be in [{lo:.6g}, {hi:.6g}], the PRV errors "
                         f"`dpdm plan` can use for this plan (PLD epsilon {pld_epsilon:.6g})")


def _discretization(plan: PrivacyPlan) -> float:
    return certification_discretization(
        plan.sample_rate, plan.noise_multiplier, plan.steps, plan.delta, plan.target_epsilon)


def make_plan_document(plan: PrivacyPlan, *, prv_relative_eps_error: float = PRV_RELATIVE_EPS_ERROR) -> PlanDocument:
    """Runs the three accountants on `plan`, certifies its epsilon and checks them against each other.

    The smaller of two rigorous upper bounds certifies: PLD's (pessimistic), or RDP's where that is smaller
    (over very many steps, where PLD's grid makes it loose); PRV cross-checks, and never certifies. Raises
    NotCalibratedError if the certified epsilon exceeds plan.target_epsilon, and AccountingError if the
    accountants disagree beyond numerical error (a lower bound above the certificate), unless the
    disagreement is PRV's alone and dpdm's own PLD refutes PRV (then the document records it:
    `prv_overruled`).
    Where prv-accountant cannot compute at all (`prv_failed`), or RDP certifies, dpdm's own PLD brackets the
    true epsilon too (`independent`): its rigorous lower bound may not exceed the certificate.
    Where dpdm's own PLD is needed but delta is too small for its precision, FftPrecisionError (a
    ValueError) says so: the plan is neither certified by PRV nor cross-checked without it.
    `prv_relative_eps_error` must lie in [PRV_RELATIVE_EPS_ERROR, PRV_MAX_RELATIVE_EPS_ERROR]: a loaded
    plan's PRV error is checked against that range (prv_eps_error_range)."""
    if not (_is_real(prv_relative_eps_error)
            and PRV_RELATIVE_EPS_ERROR <= prv_relative_eps_error <= PRV_MAX_RELATIVE_EPS_ERROR):
        raise ValueError(f"prv_relative_eps_error={prv_relative_eps_error!r} must be in "
                         f"[{PRV_RELATIVE_EPS_ERROR:g}, {PRV_MAX_RELATIVE_EPS_ERROR:g}]")
    prv_relative_eps_error = float(prv_relative_eps_error)   # numpy's scalars too: the document holds floats
    event, delta = plan.to_event(), plan.delta
    disc = _discretization(plan)
    rdp = RdpAccountant().epsilon(event, delta)
    pld = PldAccountant(disc).epsilon(event, delta)
    if not math.isfinite(pld.upper):
        raise ValueError(f"noise_multiplier={plan.noise_multiplier!r} gives no finite epsilon")
    prv_eps_error = max(prv_relative_eps_error * pld.upper, PRV_MIN_EPS_ERROR)
    try:
        prv, failed = PrvAccountant(eps_error=prv_eps_error).epsilon(event, delta), None
    except PRV_ERRORS as e:
        # E.g. "Discrete mean differs from continuous mean significantly" at sample rate 0.128 and noise
        # multiplier 0.84: prv-accountant's discretisation, not the plan, is at fault.
        prv, failed = None, f"{type(e).__name__}: {e}"
    independent = overruled = None
    if prv is None:
        # PLD (or RDP, where smaller) certifies; dpdm's own PLD, which shares no code with either library,
        # brackets the true epsilon in PRV's place, as for any plan.
        certified, certified_by = _certificate(pld.upper, rdp.upper)
        independent = _own_pld(plan)
        problems = _disagreements(certified=certified, rdp=rdp, prv=None) + _below_own_floor(certified, independent)
    else:
        # PLD certifies (or RDP, where smaller: both are rigorous upper bounds), never PRV: prv-accountant
        # 0.2.0's "upper bound" fell below the exact epsilon at large sample rates and many steps (q = 1, 50,000
        # steps, sigma 20: 88.85 against an exact 109.34), where dpdm's own PLD bracket was too wide to refute it.
        # PRV cross-checks: its lower bound must not exceed the certificate. Its upper bound below the
        # certificate is no disagreement (a pessimistic PLD lies above the true epsilon, and over very many
        # steps its grid makes it loose: docs/accounting.md).
        certified, certified_by = _certificate(pld.upper, rdp.upper)
        problems = _disagreements(certified=certified, rdp=rdp, prv=prv)
        if certified_by == "rdp" and not problems:
            # PLD's bound is not the certificate, so it checks nothing here: dpdm's own PLD brackets the true
            # epsilon as well, where delta leaves it the precision to.
            independent = _own_pld_or_none(plan)
            if independent is not None:
                problems += _below_own_floor(certified, independent)
        if problems and all(kind == "prv" for kind, _ in problems):
            # PRV against the certificate: a third accountant, sharing no code with either library, decides.
            independent = _own_pld(plan)
            overruled = _prv_overruled(certified, prv, independent)
            if overruled is not None:
                problems = [p for p in problems if p[0] != "prv"]
            else:
                problems.append(("fft", f"dpdm's own PLD bracket [{independent.lower:.6g}, "
                                        f"{independent.upper:.6g}] does not settle it"))
    if problems:
        raise AccountingError(
            f"accountants disagree for sample_rate={plan.sample_rate:.6g}, noise_multiplier="
            f"{plan.noise_multiplier!r}, steps={plan.steps}, delta={plan.delta!r}"
            + ("" if failed is None else f" (prv-accountant failed: {failed})") + ": "
            + "; ".join(message for _, message in problems))
    if plan.target_epsilon is not None and certified > plan.target_epsilon:
        raise NotCalibratedError(
            f"noise_multiplier={plan.noise_multiplier!r} certifies eps={certified:.6g}, above "
            f"target_epsilon={plan.target_epsilon!r}; calibrate the plan")
    return PlanDocument(plan=plan, epsilon=certified, certified_by=certified_by, rdp=rdp, pld=pld,
                        prv=prv or EpsilonReport(None, None, None, "prv"), pld_discretization=disc,
                        prv_eps_error=prv_eps_error, independent=independent, prv_overruled=overruled,
                        prv_failed=failed)


@functools.lru_cache(maxsize=64)
def _own_pld(plan: PrivacyPlan) -> EpsilonReport:
    """dpdm's own PLD bracket of the plan's epsilon (accounting/fft_pld.py). Cached: making a plan and each
    verification of it (a command verifies the same plan more than once) would otherwise re-run it."""
    return FftPldAccountant().epsilon(plan.to_event(), plan.delta)


@functools.lru_cache(maxsize=64)
def _own_pld_or_none(plan: PrivacyPlan) -> EpsilonReport | None:
    """`_own_pld`, or None where delta is too small for its precision (FftPrecisionError). Cached as well: the
    FFT runs in full before it raises, and lru_cache keeps no exception (an RDP-certified plan at such a delta
    re-ran it at every verification)."""
    try:
        return _own_pld(plan)
    except FftPrecisionError:
        return None


def _below_own_floor(certified: float, independent: EpsilonReport) -> list[tuple[str, str]]:
    """The problem, if any, of a certificate below dpdm's own PLD lower bound (a rigorous lower bound)."""
    if independent.lower > certified * (1 + _FLOAT_RTOL):
        return [("fft", f"dpdm's own PLD lower bound {independent.lower:.6g} > certified {certified:.6g}")]
    return []


def _disagreements(*, certified: float, rdp: EpsilonReport, prv: EpsilonReport | None) -> list[tuple[str, str]]:
    """(kind, message) for every check the certificate fails; kind 'prv' when PRV is a party to it
    (prv None: PRV gave no figures, only RDP is checked)."""
    problems = []
    if prv is not None and prv.lower is not None and prv.lower > certified * (1 + _FLOAT_RTOL):
        problems.append(("prv", f"PRV lower bound {prv.lower:.6g} > certified {certified:.6g}"))
    if prv is not None and prv.lower is not None and prv.lower > rdp.upper * (1 + _FLOAT_RTOL):
        problems.append(("prv", f"PRV lower bound {prv.lower:.6g} > RDP {rdp.upper:.6g}"))
    return problems


def _prv_overruled(certified: float, prv: EpsilonReport, independent: EpsilonReport) -> str | None:
    """Why PRV is wrong for this plan, or None when that is not proven.

    PRV is overruled only when the independent bracket [lower, upper] (a) holds the certificate's
    side: lower <= certified, so the certificate is not below a rigorous lower bound on the true
    epsilon; and (b) is disjoint from PRV's own bounds, so PRV contradicts a second, independent
    pair of rigorous bounds as well as the PLD certificate."""
    if not independent.lower <= certified * (1 + _FLOAT_RTOL):
        return None
    if prv.lower is not None and prv.lower > independent.upper * (1 + _FLOAT_RTOL):
        side = f"PRV lower bound {prv.lower:.6g} > dpdm's own PLD upper bound {independent.upper:.6g}"
    elif prv.upper < independent.lower * (1 - _FLOAT_RTOL):
        side = f"PRV upper bound {prv.upper:.6g} < dpdm's own PLD lower bound {independent.lower:.6g}"
    else:
        return None
    return (f"{side}: PRV's bounds [{_g(prv.lower)}, {prv.upper:.6g}] exclude the true epsilon, which "
            f"dpdm's own PLD puts in [{independent.lower:.6g}, {independent.upper:.6g}] and the certificate "
            f"bounds as <= {certified:.6g} (prv-accountant's discretisation is known to fail at some sample "
            "rates: microsoft/prv_accountant#36)")


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.6g}"


def write_plan(doc: PlanDocument, path: str | os.PathLike) -> None:
    """Writes plan.json atomically and durably (`atomic_write_text`), readable by other users: `dpdm
    train` or an audit running as another user must be able to read it."""
    atomic_write_text(path, doc.to_json() + "\n")


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int = 0o666) -> None:
    """Writes `text` atomically and durably: a temp file in the same folder, fsync, os.replace, then
    fsync of the folder. The file gets the mode a plain open(path, mode) would (`mode` less the umask: 0644
    for the default 0o666 under umask 022), not mkstemp's 0600; 0o600 keeps it its owner's. The one
    implementation: dpdm.checkpoint uses it for the run's text files."""
    folder = written_folder(path)   # where the OS puts `path` (`LINK/..`), the temporary file beside it
    path = os.path.join(folder, os.path.basename(os.fspath(path)))
    os.makedirs(folder, exist_ok=True)
    # The temp name starts with the file's name cut to 100 bytes (whole characters): in full, a legal name of
    # 243 to 255 bytes made the temp name too long (ENAMETOOLONG after the work; h89 F1's case, stop 47).
    prefix = os.path.basename(path)
    while len(os.fsencode(prefix)) > 100:
        prefix = prefix[:-1]
    fd, tmp = tempfile.mkstemp(prefix=f".{prefix}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode & ~_umask())
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_folder(folder)


def written_folder(path: str | os.PathLike) -> str:
    """The folder, absolute, that a file written at `path` lands in, as the OS reaches it: where the folder's
    spelling holds a "..", os.path.realpath, since the OS follows a link before the ".." after it; os.path.abspath
    (and mkstemp, which returns its file so named) removes `LINK/..` by spelling, so the temporary file of a write
    went to the folder holding LINK while the rename went to the parent of LINK's target (across file systems:
    EXDEV after the work; r1 F4, stop 53). Without "..", os.path.abspath: the same folder, named as given."""
    folder = os.path.dirname(os.path.join(os.getcwd(), os.fspath(path)))
    if os.pardir in folder.split(os.sep):
        return os.path.realpath(folder)
    return os.path.abspath(folder)


def _umask() -> int:
    """The process umask (os.umask can only be read by setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_folder(folder: str | os.PathLike) -> None:
    """Makes a rename in `folder` durable (where the platform lets a folder be opened and fsynced).
    The one implementation: dpdm.checkpoint and audits.suite use it too."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _get(d: dict, key: str, path: str, kind=None):
    if not isinstance(d, dict) or key not in d:
        raise PlanError(f"{path}: missing key {key!r}; not a {FORMAT} plan")
    value = d[key]
    if kind is not None and not isinstance(value, kind):
        raise PlanError(f"{path}: {key}={value!r} has the wrong type")
    return value


def plan_from_dict(d: dict, path: str = "plan") -> PrivacyPlan:
    """The PrivacyPlan of a plan.json dict (no digest or epsilon checks)."""
    if not isinstance(d, dict):
        raise PlanError(f"{path}: expected a JSON object, found {type(d).__name__}")
    fmt = d.get("format")
    if fmt != FORMAT:
        raise PlanError(f"{path}: format={fmt!r} must be {FORMAT!r}")
    dataset = _get(d, "dataset", path, dict)
    try:
        plan = PrivacyPlan(
            dataset_size=_get(dataset, "size", path),
            dataset_name=_get(dataset, "name", path),
            batch_size=_get(d, "batch_size", path),
            sampling=_get(d, "sampling", path),
            steps=_get(d, "steps", path),
            noise_multiplier=_get(d, "noise_multiplier", path),
            clip_norm=_get(d, "clip_norm", path),
            noise_multiplicity=_get(d, "noise_multiplicity", path),
            delta=_get(d, "delta", path),
            target_epsilon=_get(d, "target_epsilon", path),
        )
    except PlanError:
        raise
    except _DeltaFloorError as e:   # the file's delta and steps passed their own checks: worded for a file
        raise PlanError(f"{path}: {delta_floor_problem(d['delta'], d['steps'], plan_file=True)}") from e
    except ValueError as e:
        raise PlanError(f"{path}: {e}") from e
    sample_rate = _get(d, "sample_rate", path)
    if not (_is_real(sample_rate) and math.isclose(sample_rate, plan.sample_rate, rel_tol=1e-12)):
        raise PlanError(f"{path}: sample_rate={sample_rate!r} is not batch_size/dataset.size="
                        f"{plan.sample_rate!r}")
    return plan


def load_plan(path: str | os.PathLike) -> PlanDocument:
    """Reads plan.json and returns it only if it is locked: the digest verifies and the certified
    epsilon re-computes (never above the stored promise). Raises PlanError otherwise."""
    path = os.fspath(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):   # a FIFO blocked the read for good
            raise PlanError(f"{path}: not a {FORMAT} plan (not a regular file)")
        if info.st_size > MAX_PLAN_BYTES:
            raise PlanError(f"{path}: not a {FORMAT} plan ({info.st_size} bytes; a plan is a few kilobytes)")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise PlanError(f"{path}: cannot read the plan ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise PlanError(f"{path}: not a {FORMAT} plan (not UTF-8 text: {e.reason})") from e
    return parse_plan(text, path)


def parse_plan(text: str, path: str = "plan") -> PlanDocument:
    """`load_plan` of a plan.json's text (e.g. one embedded in a release file); `path` names it in errors.

    Raises PlanError, and nothing else, for any text that is not a locked plan: a malformed file (a
    401-digit number, a list where an object belongs) or a certificate that cannot be re-computed
    (prv-accountant failing, a delta too small for dpdm's own PLD) is refused, never a traceback."""
    try:
        return _parse_plan(text, path)
    except PlanError:
        raise
    except (ValueError, TypeError, ArithmeticError, *PRV_ERRORS) as e:  # RecursionError is a RuntimeError
        raise PlanError(f"{path}: not a locked {FORMAT} plan ({type(e).__name__}: {e})") from e


def _parse_plan(text: str, path: str) -> PlanDocument:
    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # json keeps the last of repeated keys, other readers the first: {"steps": 1000000, "steps": 6} trained 6
        # steps from a file that reads as a million elsewhere.
        d = dict(pairs)
        if len(d) < len(pairs):   # one pass, not a count per key: a 16 MiB object of distinct keys stays fast
            seen: set[str] = set()
            repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise PlanError(f"{path}: the key {reprlib.repr(repeated)} appears more than once; a plan names each "
                            "field once")
        return d

    def short_int(digits: str) -> int:
        # Python refuses 4,300 digits with advice for code (sys.set_int_max_str_digits); fewer reach the field's check.
        if len(digits.lstrip("-")) > 4000:
            raise PlanError(f"{path}: an integer of {len(digits.lstrip('-'))} digits is no plan's number")
        return int(digits)

    try:
        d = json.loads(text, object_pairs_hook=unique_keys, parse_int=short_int)
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    plan = plan_from_dict(d, path)
    stored_digest = _get(d, "digest", path, str)
    if stored_digest != plan.digest():
        raise PlanError(f"{path}: digest mismatch: the mechanism fields were changed after planning "
                        f"(stored {stored_digest[:19]}..., computed {plan.digest()[:19]}...); "
                        "make a new plan with `dpdm plan`")
    eps = _get(d, "epsilon", path, dict)
    stored = _get(eps, "certified", path)
    certified_by = _get(eps, "certified_by", path, str)
    _check_certified_value(plan, stored, certified_by, path)
    prv_eps_error = eps.get("prv_eps_error")
    if not (prv_eps_error is None or (_is_real(prv_eps_error) and prv_eps_error > 0)):
        raise PlanError(f"{path}: epsilon.prv_eps_error={reprlib.repr(prv_eps_error)} must be a number > 0")
    versions = d.get("versions")
    if versions is None:
        versions = {}
    if not (isinstance(versions, dict) and all(isinstance(v, str) for v in versions.values())):
        raise PlanError(f"{path}: versions={reprlib.repr(versions)} must be an object of version strings")

    def numbers(key: str, value, names: tuple[str, ...]) -> list[float | None]:
        """The numbers (or nulls) of an informational report in the epsilon block."""
        parts = [value.get(name) for name in names] if isinstance(value, dict) else [value]
        if not all(x is None or (_is_real(x) and x >= 0) for x in parts):
            raise PlanError(f"{path}: epsilon.{key}={reprlib.repr(value)} is not an epsilon (numbers >= 0 or null)")
        return [None if x is None else float(x) for x in parts]

    def report(key: str, method: str) -> EpsilonReport:
        value = eps.get(key)
        if isinstance(value, dict):
            return EpsilonReport(*numbers(key, value, ("lower", "estimate", "upper")), method)
        (upper,) = numbers(key, value, ())
        return EpsilonReport(None, upper if method == "pld" else None, upper, method)

    rdp, pld, prv = report("rdp", "rdp"), report("pld", "pld"), report("prv", "prv")
    independent = eps.get("independent")
    if isinstance(independent, dict):
        lower, upper = numbers("independent", independent, ("lower", "upper"))
        independent = EpsilonReport(lower, None, upper, "fft")
    elif independent is not None:
        raise PlanError(f"{path}: epsilon.independent={reprlib.repr(independent)} must be an object or null")
    _check_certificate(plan, stored, certified_by, prv_eps_error, path)   # prv_eps_error: checked above
    overruled = eps.get("prv_overruled")
    failed = eps.get("prv_failed")
    doc = PlanDocument(
        plan=plan, epsilon=float(stored), certified_by=certified_by, rdp=rdp, pld=pld, prv=prv,
        pld_discretization=_discretization(plan),
        prv_eps_error=float("nan") if prv_eps_error is None else float(prv_eps_error),
        versions=dict(versions),
        independent=independent,
        prv_overruled=overruled if isinstance(overruled, str) else None,
        prv_failed=failed if isinstance(failed, str) else None,
    )
    _check_reports(doc, path)
    return doc


def verify_document(doc: PlanDocument) -> None:
    """Raises PlanError unless `doc.epsilon` is a certificate the accountants re-compute, and its other
    figures re-compute too, as `load_plan` checks a file (for documents built in Python rather than read
    from plan.json)."""
    _check_certified_value(doc.plan, doc.epsilon, doc.certified_by, "plan document")
    _check_certificate(doc.plan, doc.epsilon, doc.certified_by,
                       doc.prv_eps_error if math.isfinite(doc.prv_eps_error) else None, "plan document")
    _check_reports(doc, "plan document")


def _check_reports(doc: PlanDocument, where: str) -> None:
    """Raises PlanError unless the epsilon block's other figures (rdp, pld, prv, and dpdm's own PLD where
    present) re-compute within RECOMPUTE_RTOL. They are outside the digest, certify nothing, and travel
    with the plan into a run's plan.json: an edited RDP or PRV figure would be copied there as if an
    accountant had given it. PRV's figures are checked within PRV's stated error; where prv-accountant failed
    they are all null, and it must fail again. With another prv-accountant version than the plan's, which may
    fail where that one did not, only figures both give are compared, within twice that error (a published
    release file must stay loadable). Then `_check_cross_checks` re-derives the records beside them."""
    plan = doc.plan

    def check(name: str, stored: float | None, recomputed: float | None, atol: float = 1e-12) -> None:
        if recomputed is None or not math.isfinite(recomputed):
            same = stored is None or stored == recomputed   # an infinite bound is null in a file
        else:
            same = (stored is not None and math.isfinite(stored)
                    and abs(stored - recomputed) <= RECOMPUTE_RTOL * abs(recomputed) + atol)
        if not same:
            raise PlanError(f"{where}: epsilon.{name}={stored!r} does not re-compute (got {recomputed!r}); the "
                            "epsilon block was edited or the accountants changed; make a new plan")

    check("rdp", doc.rdp.upper, _rdp_upper(plan))
    check("pld", doc.pld.upper, epsilon_spent(plan, plan.steps))
    if doc.independent is not None:
        own = _own_pld_or_none(plan)
        if own is None:
            raise PlanError(f"{where}: epsilon.independent is present, but dpdm's own PLD gives no bracket at "
                            f"delta={plan.delta!r}; the epsilon block was edited or the accountants changed; make a "
                            "new plan")
        check("independent.lower", doc.independent.lower, own.lower)
        check("independent.upper", doc.independent.upper, own.upper)
    _check_prv_figures(doc, where, check)
    _check_cross_checks(doc, where)


def _check_prv_figures(doc: PlanDocument, where: str, check) -> None:
    """`_check_reports`' PRV part: re-runs prv-accountant and compares (`check`) its figures and whether it
    failed; returns early where it cannot, which the records' own checks (`_check_cross_checks`) never skip."""
    plan = doc.plan
    prv = (doc.prv.lower, doc.prv.estimate, doc.prv.upper)
    eps_error = doc.prv_eps_error
    if not math.isfinite(eps_error):   # a file without one: the error make_plan_document takes
        eps_error = prv_eps_error_range(epsilon_spent(plan, plan.steps))[0]
    # Another prv-accountant than the plan's may fail where that one did not, or the reverse, and move its
    # figures within its stated error: a published release file must stay loadable after an upgrade.
    same_prv = doc.versions.get("prv-accountant", "unknown") == _versions().get("prv-accountant")
    try:
        figures = PrvAccountant(eps_error=eps_error).epsilon(plan.to_event(), plan.delta)
    except MemoryError:
        return   # PRV's figures certify nothing: a machine too small to re-compute them does not refuse the plan
    except PRV_ERRORS as e:
        if not same_prv:
            return
        if any(x is not None for x in prv):
            raise PlanError(f"{where}: epsilon.prv has figures, but prv-accountant gives none for this plan "
                            f"({type(e).__name__}: {e}); the epsilon block was edited; make a new plan") from e
        figures = None   # PRV failed when the plan was made, and fails again
    if not same_prv:
        if all(x is not None for x in prv):
            for part, stored in zip(("lower", "estimate", "upper"), prv):
                check(f"prv.{part}", stored, getattr(figures, part), atol=2 * eps_error)
        return
    if (figures is None) != (doc.prv_failed is not None):
        raise PlanError(f"{where}: epsilon.prv_failed={reprlib.repr(doc.prv_failed)}, but prv-accountant "
                        + ("fails" if figures is None else "gives figures") + " for this plan; the epsilon block "
                        "was edited; make a new plan")
    if figures is not None and all(x is None for x in prv):
        raise PlanError(f"{where}: epsilon.prv is empty, but prv-accountant gives figures for this plan "
                        f"(upper {figures.upper:.6g}); the epsilon block was edited; make a new plan")
    if figures is not None:   # within PRV's own stated error: another prv-accountant may move them that much
        for part, stored in zip(("lower", "estimate", "upper"), prv):
            check(f"prv.{part}", stored, getattr(figures, part), atol=eps_error)


def _check_cross_checks(doc: PlanDocument, where: str) -> None:
    """Raises PlanError unless the records beside the figures are what make_plan_document derives from them:
    the PRV figures agree with the certificate, or `prv_overruled` says they do not and dpdm's own PLD refutes
    them; `independent` is there wherever make_plan_document computes it (PRV failed or was overruled, or RDP
    certifies and delta leaves dpdm's own PLD the precision); and an empty `prv` says why (`prv_failed`).

    The figures are checked (`_check_reports`) before this, but not the records: a one-word `prv_overruled`
    turned off stop 42's check of a PRV lower bound above the certificate, and dpdm's own PLD bracket, the only
    cross-check of a plan whose PRV failed, could be deleted (stop 46); both travel into a run's plan.json. Only
    a record's text is not re-checked. dpdm's own PLD runs (once: cached) only where the plan had it when made,
    or where a record claims it."""
    plan = doc.plan
    prv = [doc.prv.lower, doc.prv.estimate, doc.prv.upper]

    def refuse(what: str) -> PlanError:
        return PlanError(f"{where}: {what}, as no plan dpdm makes does; the epsilon block was edited; make a new plan")

    # PRV gives all three figures or, where it failed, none. With the plan's prv-accountant that is checked
    # against PRV itself; with another, only here.
    if None in prv and any(x is not None for x in prv):
        raise refuse(f"epsilon.prv={prv!r} has nulls beside figures")
    if None in prv and doc.prv_failed is None:
        raise refuse("epsilon.prv is empty, but epsilon.prv_failed does not say why")
    if None not in prv and doc.prv_failed is not None:
        raise refuse(f"epsilon.prv_failed={reprlib.repr(doc.prv_failed)}, but epsilon.prv has figures")
    problems = _disagreements(certified=doc.epsilon, rdp=doc.rdp, prv=doc.prv)
    if problems and doc.prv_overruled is None:
        raise refuse(f"epsilon.prv={prv!r} disagrees with the certificate ({'; '.join(m for _, m in problems)})")
    if doc.prv_failed is None and doc.prv_overruled is None and doc.certified_by != "rdp":
        return   # make_plan_document runs no own PLD: nothing more to re-derive (an extra bracket re-computed above)
    own = _own_pld_or_none(plan)
    if own is None and (doc.prv_failed is not None or doc.prv_overruled is not None):
        raise refuse(f"epsilon.{'prv_overruled' if doc.prv_overruled is not None else 'prv_failed'} is set, but dpdm's "
                     f"own PLD, which must then cross-check, gives no bracket at delta={plan.delta!r}")
    if own is not None and doc.independent is None:
        raise refuse(f"epsilon.independent is missing, but dpdm's own PLD brackets this plan at "
                     f"[{own.lower:.6g}, {own.upper:.6g}] and a plan whose "
                     + ("PRV failed" if doc.prv_failed is not None else "PRV was overruled"
                        if doc.prv_overruled is not None else "certificate is RDP's") + " records it")
    if doc.prv_overruled is not None:
        if not problems:
            raise refuse(f"epsilon.prv_overruled={reprlib.repr(doc.prv_overruled)}, but PRV's figures {prv!r} do not "
                         f"disagree with the certificate {doc.epsilon!r}")
        if _prv_overruled(doc.epsilon, doc.prv, own) is None:
            raise refuse(f"epsilon.prv_overruled={reprlib.repr(doc.prv_overruled)}, but dpdm's own PLD bracket "
                         f"[{own.lower:.6g}, {own.upper:.6g}] does not refute PRV's figures {prv!r}")


def _check_certified_value(plan: PrivacyPlan, stored, certified_by, where: str) -> None:
    """Raises PlanError unless `stored` is a finite epsilon >= 0, at most the plan's target, from an accountant
    dpdm knows: checked before any accounting, for a file and for a document built in Python alike (stop 42:
    `verify_document` let `train()` run a document certified at 21.7 against its target of 10, or at NaN)."""
    if not (_is_real(stored) and stored >= 0) or certified_by not in ("pld", "rdp", "prv"):
        raise PlanError(f"{where}: epsilon.certified={reprlib.repr(stored)} by {certified_by!r} is not a certificate")
    if plan.target_epsilon is not None and stored > plan.target_epsilon:
        raise PlanError(f"{where}: epsilon.certified={stored!r} exceeds target_epsilon={plan.target_epsilon!r}")


def _check_certificate(plan: PrivacyPlan, stored: float, certified_by: str, prv_eps_error: float | None,
                       where: str) -> None:
    """Raises PlanError unless `stored` re-computes as the bound `certified_by` names (PLD's or RDP's; a file
    certified by PRV, as older dpdm could write, is refused, naming the certificate it has now). The value itself
    is checked first by the caller (`_check_certified_value`)."""
    if certified_by == "prv":
        raise PlanError(f"{where}: {PRV_CERTIFICATE_REFUSED}. This plan's certificate is epsilon "
                        f"{certified_epsilon(plan):.6g}, not the file's {stored:.6g}, and a model trained under it has "
                        "that; make a new plan with `dpdm plan`")
    if certified_by not in ("pld", "rdp"):
        raise PlanError(f"{where}: certified_by={certified_by!r} must be 'pld' or 'rdp'")
    # The certificate's PLD grid is set by target_epsilon (finer for a smaller target), which can be forged
    # together with the certified epsilon and the digest (a plain sha256): a target of 1e-9 and a certified 0
    # kept the PLD below busy for minutes and gigabytes. A quick rigorous lower bound refutes such a target in
    # a moment first; no real plan is refuted, since its certified epsilon, at most its target, bounds the
    # true one from above. On the plans measured the bound was 0.48 to 1.0 of the certificate wherever that was
    # above 0.1 (`_event_floor`), so a target that passes it makes the grid at most a few times finer than the plan's.
    if plan.target_epsilon is not None:
        floor = _quick_floor(plan)
        if floor > plan.target_epsilon * (1 + RECOMPUTE_RTOL):
            raise PlanError(f"{where}: target_epsilon={plan.target_epsilon!r} is below a lower bound on the "
                            f"mechanism's epsilon ({floor:.6g}); the plan was edited; make a new plan")
    try:
        pld = epsilon_spent(plan, plan.steps)   # the PLD certificate, cached for the ledger
    except MemoryError:
        raise PlanError(f"{where}: re-accounting this plan needs more memory than this machine has (its PLD grid, "
                        f"interval {_discretization(plan):.2g}, is too fine); verify it on a larger machine; if it "
                        "was edited, make a new plan") from None
    if prv_eps_error is not None:
        # Outside the digest, and it sets PRV's grid (1e-9 asked for 1.96 TiB): checked before any PRV work.
        try:
            _check_prv_eps_error(prv_eps_error, pld)
        except ValueError as e:
            raise PlanError(f"{where}: epsilon.{e}; the epsilon block was edited; make a new plan") from e
    # The bound the file names must re-compute (make_plan_document names the smaller; either is rigorous).
    recomputed = pld if certified_by == "pld" else _rdp_upper(plan)
    if recomputed > stored * (1 + _FLOAT_RTOL) or recomputed < stored * (1 - RECOMPUTE_RTOL):
        raise PlanError(f"{where}: epsilon.certified={stored!r} by {certified_by.upper()} does not re-compute (got "
                        f"{recomputed!r}); the epsilon block was edited or the accountants changed; make a new plan")


@functools.lru_cache(maxsize=64)
def _quick_floor(plan: PrivacyPlan) -> float:
    """A quick rigorous lower bound on the plan's epsilon (0 where none comes out): `_event_floor` first, then
    dpdm's own PLD on a coarse grid, over all the steps and over a prefix of them (epsilon grows with the steps, so
    a prefix's lower bound bounds the whole; over many steps the coarse grid's bracket is too wide to give one),
    stopping once one refutes the target. Cached: a command verifies the same plan more than once (the CLI, then
    the library).

    Where the coarse FFT has no precision at the plan's delta (near the 1e-10 floor), at a larger delta: epsilon
    falls as delta grows, so a lower bound at delta' >= delta bounds epsilon at delta too. Without that the floor
    was 0 there, and a forged tiny target (digest recomputed) went on to a PLD grid as fine as that target asks:
    5.5 minutes and 3.4 GB, then "needs more memory than this machine has", for a plan that was edited (stop 46,
    h84 F2). At small sample rates over many steps the FFT's bracket (about steps * its interval wide) gave no
    bound at all, at any delta (q 0.001, 10^5 steps: 2.4 minutes, then the same message; stop 48, h95 F1):
    `_event_floor` gives 1.44 there, against a certified 2.00."""
    floor = _event_floor(plan.sample_rate, plan.noise_multiplier, plan.steps, plan.delta)
    if floor > plan.target_epsilon * (1 + RECOMPUTE_RTOL):
        return floor
    deltas = sorted({plan.delta, *(d for d in _QUICK_FLOOR_DELTAS if d > plan.delta)})
    for steps in sorted({min(plan.steps, _QUICK_FLOOR_PREFIX), plan.steps}):
        for delta in deltas:
            try:
                with _quiet_numpy():   # overflow at large epsilon on the way to a bound it checks itself
                    floor = max(floor, FftPldAccountant(grid_points=_QUICK_FLOOR_POINTS).epsilon(
                        plan.to_event(steps), delta).lower)
                break
            except FftPrecisionError:   # no bracket at this delta: try a larger one, else the checks after decide
                pass
        if floor > plan.target_epsilon * (1 + RECOMPUTE_RTOL):
            break
    return floor


def _event_floor(q: float, sigma: float, steps: int, delta: float) -> float:
    """A rigorous lower bound on the epsilon of `steps` Poisson-sampled Gaussian steps at `delta`, from one event
    of their outputs: in closed form, so in a fraction of a second whatever the steps.

    The add-or-remove pair of one step is P = (1-q) N(0, s^2) + q N(1, s^2) against Q = N(0, s^2) (s = sigma),
    and of T steps the products P^T, Q^T, whose hockey-stick divergence every accountant here bounds from above
    (the certificate is PLD's pessimistic bound or RDP's). For any event A,
    H_{e^eps}(P^T || Q^T) = sup_A' P^T(A') - e^eps Q^T(A') >= P^T(A) - e^eps Q^T(A), which exceeds delta for every
    eps < log((P^T(A) - delta) / Q^T(A)): so that figure is <= the true epsilon, and below every honest
    certificate and target. Two families of events, each exact in law:
      - the sum of the outputs above t: under Q^T it is N(0, T s^2); under P^T it is K + N(0, T s^2) with
        K ~ Binomial(T, q). Near-optimal where each step's loss is nearly linear in x (large sigma; exact GDP at
        q = 1);
      - at least m of the T outputs above c: Binomial(T, Q(x > c)) against Binomial(T, P(x > c)). The better at
        small sigma, where the loss grows as exp(x / s^2) and a few large outputs tell most.
    Probabilities are summed from positive terms (binomial masses left out only lower P^T(A)) and taken
    _EVENT_FLOOR_RTOL against their side; an event whose Q^T(A) is near underflow is skipped. Measured against
    dp-accounting's pessimistic epsilon (interval 1e-3): 0.69 of it at q 0.001 over 10^5 and 10^6 steps, 0.97 at
    q 0.064 over 469 steps, 0.48 to 0.62 at sigma 0.3 to 0.7; over 36 random plans of up to 2000 steps above 0.9
    at 28, 0.61 to 0.81 at 5, and far below only where epsilon is under 2e-5 (the finest grid anyway); never above
    it (stop 48; and test_the_event_floor_lies_below_the_true_epsilon_and_near_it).

    Args:
        q: the sample rate, in (0, 1].
        sigma: the noise multiplier, > 0.
        steps: T, >= 1.
        delta: in (0, 1).
    Returns:
        The largest bound the events tried give, or 0.0.
    """
    floor, margin = 0.0, _EVENT_FLOOR_RTOL

    def best(log_p: np.ndarray, log_q: np.ndarray) -> float:
        # log((P - delta) / Q), P and Q taken margin against the bound; nan or -inf where P <= delta
        with np.errstate(divide="ignore", invalid="ignore"):
            e = np.log(np.exp(log_p) * (1 - margin) - delta) - log_q - math.log1p(margin)
        e = e[np.isfinite(e) & (log_q > -690.0)]   # Q above 1e-300: no underflow to a spurious infinity
        return float(e.max()) if len(e) else 0.0

    # The sum of the outputs. K's masses beyond 10 standard deviations (below 1e-20) are left out.
    s = sigma * math.sqrt(steps)
    if q == 1.0:
        ks, mass = np.array([float(steps)]), np.array([1.0])
    else:
        mean, sd = steps * q, math.sqrt(steps * q * (1 - q))
        ks = np.arange(max(0, math.floor(mean - 10 * sd) - 1), min(steps, math.ceil(mean + 10 * sd) + 1) + 1,
                       dtype=float)
        mass = stats.binom.pmf(ks, steps, q)
    z = -special.ndtri(delta)   # P^T(S > t) falls to about delta near t = T q + z sd(S)
    ts = np.linspace(0.0, steps * q + (z + 2) * math.sqrt(s**2 + steps * q * (1 - q)), _EVENT_FLOOR_POINTS)
    p_sum = np.array([np.dot(mass, special.ndtr((ks - t) / s)) for t in ts])
    with np.errstate(divide="ignore"):
        floor = max(floor, best(np.log(p_sum), special.log_ndtr(-ts / s)))
    # How many outputs lie above c, for c from the midpoint of the two means up to 8 sigma above it.
    for c in 0.5 + sigma * np.linspace(0.0, 8.0, 33):
        pq, pp = special.ndtr(-c / sigma), (1 - q) * special.ndtr(-c / sigma) + q * special.ndtr((1 - c) / sigma)
        # m from Q's mean count (below it Q^T(A) is near 1) to where P^T(A) falls to delta, at most
        # _EVENT_FLOOR_POINTS of them (any m gives a bound)
        top = min(steps, math.ceil(steps * pp + (z + 2) * math.sqrt(steps * pp * (1 - pp))) + 1)
        ms = np.unique(np.linspace(max(1, math.floor(steps * pq)), top, _EVENT_FLOOR_POINTS).round())
        with np.errstate(divide="ignore"):
            floor = max(floor, best(stats.binom.logsf(ms - 1, steps, pp), stats.binom.logsf(ms - 1, steps, pq)))
    return floor


@functools.lru_cache(maxsize=1024)
def epsilon_spent(plan: PrivacyPlan, steps_done: int) -> float:
    """A rigorous upper bound on epsilon (at plan.delta) after `steps_done` of the plan's steps:
    the PLD certificate of the prefix, at the plan's own discretization (so that
    epsilon_spent(plan, plan.steps) is the PLD-certified epsilon). Cached and fast."""
    if not (_is_int(steps_done) and 0 <= steps_done <= plan.steps):
        raise ValueError(f"steps_done={steps_done!r} must be an integer in [0, {plan.steps}]")
    if steps_done == 0:
        return 0.0
    return PldAccountant(_discretization(plan)).epsilon(plan.to_event(steps_done), plan.delta).upper
