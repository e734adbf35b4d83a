"""Audit statistics: membership scores in, privacy numbers out (numpy and scipy only).

Sign convention: **a higher score means "member"**. An attack predicts "member" for an example whose
score is at or above a threshold. ``in_scores`` are the scores of examples (canaries) that were in the
training set, ``out_scores`` those of examples that were not.

What is here (formulas: shared/research/audits.md sections 1.1, 1.2 and 1.5):

* Clopper-Pearson lower bounds on epsilon from the error rates of a threshold attack, with the choice
  of threshold paid for either by a Bonferroni correction (``Bonferroni()``), by choosing the threshold
  on one half of the scores and evaluating it on the other (``Split(seed=0)``), or by fixing it in
  advance (``Explicit(threshold)``).
* The one-run bound of Steinke, Nasr and Jagielski (2023), including its ``2*m*delta`` term
  (``one_run_epsilon``), and the search over the number of guesses with a Bonferroni correction over
  the grid of guess counts (``one_run_audit``).
* ROC, AUC (with a DeLong interval), TPR at a given FPR (Clopper-Pearson interval on the TPR at the
  threshold chosen from the out-scores alone), the (eps, delta)-DP ceiling on the ROC curve and on the
  AUC, and the largest epsilon a setup could certify at all.
* ``Auditor(in_scores, out_scores)`` bundling the above, with a JSON-able ``report()``.

Every bound is a *lower* bound on the epsilon of the mechanism that produced the scores, valid with
probability at least ``1 - significance`` over the randomness of the audit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import optimize, special, stats

__all__ = [
    "SIGN_CONVENTION",
    "Bonferroni",
    "Split",
    "Explicit",
    "EpsilonBound",
    "OneRunResult",
    "TprAtFpr",
    "Auditor",
    "clopper_pearson_interval",
    "clopper_pearson_epsilon",
    "epsilon_lower_bound",
    "one_run_p_value",
    "one_run_epsilon",
    "one_run_audit",
    "default_guess_grid",
    "max_one_run_epsilon",
    "max_certifiable_epsilon",
    "roc_curve",
    "auc",
    "auc_interval",
    "tpr_at_fpr",
    "dp_tpr_ceiling",
    "dp_auc_ceiling",
    "gaussian_epsilon",
]

SIGN_CONVENTION = "higher score means member"

# Above this many distinct thresholds, the Clopper-Pearson search evaluates an evenly spaced (by rank)
# subset. The Bonferroni correction used here holds simultaneously for *all* thresholds, so any
# subset, even a data-dependent one, keeps the bound valid; it only costs a little tightness.
_MAX_THRESHOLDS = 20_000


# ----------------------------------------------------------------------------------------------
# Threshold strategies (small frozen dataclasses, not strings).
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bonferroni:
    """Search every threshold; pay with a correction that holds for all thresholds at once.

    The Clopper-Pearson bound on the TPR is taken at ``significance / (2 * n_in)`` and the one on the
    FPR at ``significance / (2 * n_out)``: a union bound over the ``n`` count values each rate's
    bound can take, which covers every real threshold simultaneously (see ``_cp_epsilon_curve``).
    """


@dataclass(frozen=True)
class Split:
    """Choose the threshold on a random ``fraction`` of the in- and out-scores, evaluate on the rest."""

    seed: int = 0
    fraction: float = 0.5

    def __post_init__(self):
        if not (0.0 < self.fraction < 1.0):
            raise ValueError(f"fraction={self.fraction!r} must be in (0, 1)")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool):
            raise ValueError(f"seed={self.seed!r} must be an int")


@dataclass(frozen=True)
class Explicit:
    """A threshold fixed before looking at the scores ("member" iff score >= threshold)."""

    threshold: float

    def __post_init__(self):
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold={self.threshold!r} must be a finite number")


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpsilonBound:
    """A Clopper-Pearson epsilon lower bound and the threshold that achieved it."""

    epsilon: float
    threshold: float | None
    tpr_lower: float
    fpr_upper: float
    significance: float
    delta: float
    strategy: str
    two_sided: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class OneRunResult:
    """The one-run audit (Steinke, Nasr, Jagielski 2023) with the best number of guesses.

    ``grid`` lists ``(num_guesses, num_correct, epsilon)`` for every guess count tried; each
    ``epsilon`` there is already at the corrected significance ``significance / len(grid)``.
    """

    epsilon: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    significance: float
    delta: float
    both_sides: bool
    grid: tuple[tuple[int, int, float], ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = [list(row) for row in self.grid]
        return d


@dataclass(frozen=True)
class TprAtFpr:
    """TPR of the most permissive threshold whose empirical FPR is at most ``target_fpr``."""

    target_fpr: float
    threshold: float
    fpr: float
    tpr: float
    tpr_lower: float
    tpr_upper: float
    significance: float
    enough_negatives: bool  # n_out * target_fpr >= 10; otherwise the number means little

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------


def _short_repr(value) -> str:
    if isinstance(value, np.ndarray):
        return f"array(shape={value.shape}, dtype={value.dtype})"
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def _scores(name: str, value) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={_short_repr(value)} must be a 1-D array of real numbers") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"{name}={_short_repr(value)} must be a non-empty 1-D array of scores "
            f"({SIGN_CONVENTION})"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}={_short_repr(value)} must contain only finite scores")
    return arr


def _probability(name: str, value, *, allow_zero: bool) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a number") from None
    ok = (0.0 <= v < 1.0) if allow_zero else (0.0 < v < 1.0)
    if not ok or isinstance(value, bool):
        bounds = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name}={value!r} must be in {bounds}")
    return v


def _count(name: str, value, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    if value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    return int(value)


def _epsilon_arg(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a number") from None
    if not (v >= 0.0) or math.isinf(v):
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    return v


# ----------------------------------------------------------------------------------------------
# Clopper-Pearson
# ----------------------------------------------------------------------------------------------


def _cp_upper(k, n, a):
    """One-sided upper bound on p from k successes in n trials at level a (vectorized in k)."""
    k = np.asarray(k, dtype=np.float64)
    safe = np.minimum(k, n - 1)
    # The upper tail inverted at a itself (Boost's ibetac_inv; scipy >= 1.11 names it special.betainccinv): the lower
    # tail inverted at 1 - a rounded a to a multiple of 1.1e-16, so at a = 1.7e-16 the bound's level was 1.31 a (h108
    # N1, stop 50). `_cp_lower` inverts its lower tail at a itself.
    ub = stats.beta.isf(a, safe + 1, n - safe)
    return np.where(k >= n, 1.0, ub)


def _cp_lower(k, n, a):
    """One-sided lower bound on p from k successes in n trials at level a (vectorized in k)."""
    k = np.asarray(k, dtype=np.float64)
    safe = np.maximum(k, 1)
    lb = special.betaincinv(safe, n - safe + 1, a)  # = beta.ppf(a, k, n - k + 1)
    return np.where(k <= 0, 0.0, lb)


def clopper_pearson_interval(successes: int, trials: int, significance: float = 0.05) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval for a binomial proportion (``significance/2`` per side)."""
    n = _count("trials", trials, minimum=1)
    k = _count("successes", successes)
    if k > n:
        raise ValueError(f"successes={successes!r} must be <= trials={trials!r}")
    a = _probability("significance", significance, allow_zero=False) / 2
    return float(_cp_lower(k, n, a)), float(_cp_upper(k, n, a))


def _cp_epsilon_curve(tp, fp, n_in, n_out, a_in, a_out, delta, two_sided):
    """Epsilon lower bound at each threshold from the counts; also returns the rate bounds."""
    tpr_lo = _cp_lower(tp, n_in, a_in)
    fpr_hi = _cp_upper(fp, n_out, a_out)
    with np.errstate(divide="ignore", invalid="ignore"):
        # TPR <= e^eps FPR + delta   =>   eps >= log((TPR - delta) / FPR)
        eps = np.log(np.maximum(tpr_lo - delta, 0.0)) - np.log(fpr_hi)
        if two_sided:
            # TNR <= e^eps FNR + delta  =>  eps >= log((1 - FPR - delta) / (1 - TPR))
            eps2 = np.log(np.maximum(1.0 - fpr_hi - delta, 0.0)) - np.log1p(-tpr_lo)
            eps = np.maximum(eps, eps2)
    eps = np.where(np.isfinite(eps), eps, 0.0)  # -inf where the numerator is <= 0
    return np.maximum(eps, 0.0), tpr_lo, fpr_hi


def _counts_at(in_sorted, out_sorted, thresholds):
    """True and false positives of the rule "member iff score >= threshold"."""
    tp = in_sorted.size - np.searchsorted(in_sorted, thresholds, side="left")
    fp = out_sorted.size - np.searchsorted(out_sorted, thresholds, side="left")
    return tp, fp


def _candidate_thresholds(in_sorted, out_sorted):
    thr = np.unique(np.concatenate([in_sorted, out_sorted]))
    if thr.size > _MAX_THRESHOLDS:
        idx = np.unique(np.linspace(0, thr.size - 1, _MAX_THRESHOLDS).round().astype(int))
        thr = thr[idx]
    return thr


def _best_threshold(in_sorted, out_sorted, a_in, a_out, delta, two_sided):
    thr = _candidate_thresholds(in_sorted, out_sorted)
    tp, fp = _counts_at(in_sorted, out_sorted, thr)
    eps, tpr_lo, fpr_hi = _cp_epsilon_curve(
        tp, fp, in_sorted.size, out_sorted.size, a_in, a_out, delta, two_sided
    )
    i = int(np.argmax(eps))
    return float(thr[i]), float(eps[i]), float(tpr_lo[i]), float(fpr_hi[i])


def clopper_pearson_epsilon(
    in_scores,
    out_scores,
    *,
    significance: float = 0.05,
    delta: float = 0.0,
    strategy: Bonferroni | Split | Explicit = Bonferroni(),
    two_sided: bool = True,
) -> EpsilonBound:
    """Clopper-Pearson epsilon lower bound of a threshold attack, with details.

    For a threshold, TPR is bounded below and FPR above by one-sided Clopper-Pearson bounds, each at
    half the significance; (eps, delta)-DP implies TPR <= e^eps FPR + delta, hence
    eps >= log((TPR_lo - delta) / FPR_hi). With ``two_sided`` the symmetric rule
    TNR <= e^eps FNR + delta is used too (valid whenever the neighbouring relation is symmetric,
    as it is for add/remove-one DP); it needs no extra significance since it reuses the same two
    rate bounds. Scores are one per independent run of the mechanism.
    """
    ins = np.sort(_scores("in_scores", in_scores))
    outs = np.sort(_scores("out_scores", out_scores))
    significance = _probability("significance", significance, allow_zero=False)
    delta = _probability("delta", delta, allow_zero=True)
    if not isinstance(strategy, (Bonferroni, Split, Explicit)):
        raise ValueError(f"strategy={strategy!r} must be Bonferroni(), Split(...) or Explicit(...)")
    half = significance / 2

    if isinstance(strategy, Bonferroni):
        thr, eps, lo, hi = _best_threshold(
            ins, outs, half / ins.size, half / outs.size, delta, two_sided
        )
    elif isinstance(strategy, Explicit):
        thr = float(strategy.threshold)
        tp, fp = _counts_at(ins, outs, np.array([thr]))
        e, lo_, hi_ = _cp_epsilon_curve(tp, fp, ins.size, outs.size, half, half, delta, two_sided)
        eps, lo, hi = float(e[0]), float(lo_[0]), float(hi_[0])
    else:
        rng = np.random.default_rng(strategy.seed)
        sel_in, ev_in = _split(rng, ins, strategy.fraction, "in_scores")
        sel_out, ev_out = _split(rng, outs, strategy.fraction, "out_scores")
        # The choice looks only at the selection half, so the evaluation half needs no correction.
        thr, _, _, _ = _best_threshold(sel_in, sel_out, half, half, delta, two_sided)
        tp, fp = _counts_at(ev_in, ev_out, np.array([thr]))
        e, lo_, hi_ = _cp_epsilon_curve(
            tp, fp, ev_in.size, ev_out.size, half, half, delta, two_sided
        )
        eps, lo, hi = float(e[0]), float(lo_[0]), float(hi_[0])

    return EpsilonBound(
        epsilon=float(eps),
        threshold=thr,
        tpr_lower=lo,
        fpr_upper=hi,
        significance=significance,
        delta=delta,
        strategy=repr(strategy),
        two_sided=bool(two_sided),
    )


def _split(rng, sorted_scores, fraction, name):
    n = sorted_scores.size
    k = int(round(fraction * n))
    if k < 1 or k > n - 1:
        raise ValueError(
            f"{name} has {n} score(s); Split(fraction={fraction}) needs at least one on each side"
        )
    perm = rng.permutation(n)
    return np.sort(sorted_scores[perm[:k]]), np.sort(sorted_scores[perm[k:]])


def epsilon_lower_bound(
    in_scores,
    out_scores,
    *,
    significance: float = 0.05,
    delta: float = 0.0,
    strategy: Bonferroni | Split | Explicit = Bonferroni(),
    two_sided: bool = True,
) -> float:
    """Clopper-Pearson epsilon lower bound (a float); see ``clopper_pearson_epsilon``."""
    return clopper_pearson_epsilon(
        in_scores,
        out_scores,
        significance=significance,
        delta=delta,
        strategy=strategy,
        two_sided=two_sided,
    ).epsilon


def max_certifiable_epsilon(
    num_in: int,
    num_out: int,
    *,
    significance: float = 0.05,
    delta: float = 0.0,
    strategy: Bonferroni | Split = Bonferroni(),
    two_sided: bool = True,
) -> float:
    """The largest Clopper-Pearson epsilon lower bound these sample sizes can give at all.

    That is the bound of a perfect attack (every in-score above every out-score). If the claimed
    epsilon is above this, the audit cannot fail, whatever the attack.
    """
    n_in = _count("num_in", num_in, minimum=1)
    n_out = _count("num_out", num_out, minimum=1)
    if isinstance(strategy, Explicit):
        raise ValueError(f"strategy={strategy!r} must be Bonferroni() or Split(...)")
    return epsilon_lower_bound(
        np.ones(n_in),
        np.zeros(n_out),
        significance=significance,
        delta=delta,
        strategy=strategy,
        two_sided=two_sided,
    )


# ----------------------------------------------------------------------------------------------
# One-run audit (Steinke, Nasr, Jagielski 2023)
# ----------------------------------------------------------------------------------------------


def _one_run_p(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    if v == 0:
        return 1.0
    q = float(special.expit(epsilon))  # e^eps / (1 + e^eps)
    beta = float(special.bdtrc(v - 1, r, q))  # P[Bin(r, q) >= v]  (= binom.sf, less overhead)
    alpha = 0.0
    if delta > 0:
        i = np.arange(1, v + 1)
        # P[v - i <= B < v] = P[B >= v - i] - P[B >= v]
        window = special.bdtrc(v - i - 1, r, q) - beta
        alpha = float(np.max(window / i))
    return min(1.0, beta + alpha * 2.0 * m * delta)


def _check_one_run_counts(num_canaries, num_guesses, num_correct):
    m = _count("num_canaries", num_canaries, minimum=1)
    r = _count("num_guesses", num_guesses)
    v = _count("num_correct", num_correct)
    if r > m:
        raise ValueError(f"num_guesses={num_guesses!r} must be <= num_canaries={num_canaries!r}")
    if v > r:
        raise ValueError(f"num_correct={num_correct!r} must be <= num_guesses={num_guesses!r}")
    return m, r, v


def one_run_p_value(
    num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float
) -> float:
    """p-value of "the mechanism is (epsilon, delta)-DP" after ``num_correct`` of ``num_guesses``.

    ``beta + alpha * 2 m delta`` with beta = P[Bin(r, q) >= v], q = e^eps / (1 + e^eps), and
    alpha = max_{i=1..v} P[v - i <= Bin(r, q) < v] / i (research/audits.md section 1.5).
    """
    m, r, v = _check_one_run_counts(num_canaries, num_guesses, num_correct)
    epsilon = _epsilon_arg("epsilon", epsilon)
    delta = _probability("delta", delta, allow_zero=True)
    return _one_run_p(m, r, v, epsilon, delta)


def _one_run_eps(m: int, r: int, v: int, delta: float, significance: float) -> float:
    def p(e):
        return _one_run_p(m, r, v, e, delta)

    if p(0.0) > significance:
        return 0.0
    hi = 1.0
    while p(hi) <= significance:
        hi *= 2.0
        if hi > 1e4:  # cannot happen for v <= r (p -> 1 as eps -> inf); guard anyway
            return hi
    eps = _bisect_first_crossing(p, 0.0, hi, significance)
    # p is monotone in practice, but nothing proves it; the bound is valid only if every epsilon
    # below it is rejected too. Check a grid and retreat to the first crossing if needed.
    grid = np.linspace(0.0, eps, 33)[1:-1]
    bad = [e for e in grid if p(e) > significance]
    if bad:
        eps = _bisect_first_crossing(p, 0.0, bad[0], significance)
    return eps


def _bisect_first_crossing(p, lo, hi, level):
    """Largest e in [lo, hi] with p(e) <= level, for p(lo) <= level < p(hi) (to 1e-9 abs)."""
    for _ in range(200):
        if hi - lo <= 1e-9 * max(1.0, hi):
            break
        mid = 0.5 * (lo + hi)
        if p(mid) <= level:
            lo = mid
        else:
            hi = mid
    return lo


def one_run_epsilon(
    num_canaries: int,
    num_guesses: int,
    num_correct: int,
    delta: float,
    significance: float = 0.05,
) -> float:
    """Largest epsilon that ``num_correct`` right out of ``num_guesses`` guesses certifies.

    Steinke, Nasr and Jagielski (2023): ``num_canaries`` canaries, each included independently with
    probability 1/2; the auditor guesses in/out for ``num_guesses`` of them (abstaining on the rest)
    from scores that never look at the inclusion bits. Returns sup{eps : p(eps, delta) <=
    significance}, 0.0 when even eps = 0 cannot be rejected.
    """
    m, r, v = _check_one_run_counts(num_canaries, num_guesses, num_correct)
    delta = _probability("delta", delta, allow_zero=True)
    significance = _probability("significance", significance, allow_zero=False)
    return _one_run_eps(m, r, v, delta, significance)


def default_guess_grid(num_canaries: int, num_points: int = 20) -> tuple[int, ...]:
    """Guess counts to try: about ``num_points`` geometrically spaced values in [min(10, m), m].

    The grid depends only on the number of canaries, never on the scores.
    """
    m = _count("num_canaries", num_canaries, minimum=1)
    num_points = _count("num_points", num_points, minimum=1)
    grid = np.unique(np.geomspace(min(10, m), m, num_points).round().astype(int))
    return tuple(int(k) for k in grid)


def _check_grid(num_guesses, m):
    grid = default_guess_grid(m) if num_guesses is None else tuple(num_guesses)
    if len(grid) == 0:
        raise ValueError(f"num_guesses={num_guesses!r} must be a non-empty sequence of ints")
    for k in grid:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not (1 <= k <= m):
            raise ValueError(f"num_guesses={num_guesses!r} must hold ints in [1, {m}]")
    if len(set(grid)) != len(grid):
        raise ValueError(f"num_guesses={num_guesses!r} must not repeat values")
    return tuple(int(k) for k in grid)


FAIR_COIN_P = 1e-6   # one_run_audit refuses inclusion counts less likely than this under fair coins


def _check_fair_coins(num_in: int, m: int) -> None:
    """The one-run bound assumes each canary was included by a fair coin. With 900 of 1000 in, guessing "in"
    is right 90% of the time by the base rate alone, and ``both_sides=False`` certified epsilon 2.03 from scores
    without any signal. Counts that fair coins give with two-sided probability below FAIR_COIN_P are refused."""
    p = float(stats.binomtest(num_in, m, 0.5).pvalue) if m else 1.0
    if p < FAIR_COIN_P:
        raise ValueError(f"included has {num_in} of {m} canaries in: the one-run bound needs each canary included by "
                         f"a fair coin, and fair coins give such a split with probability {p:.2g}")


def one_run_audit(
    scores,
    included,
    *,
    delta: float,
    significance: float = 0.05,
    num_guesses: Sequence[int] | None = None,
    both_sides: bool = True,
    seed: int = 0,
) -> OneRunResult:
    """One-run audit from canary ``scores`` and their true inclusion bits.

    For each k in ``num_guesses`` (default ``default_guess_grid(m)``): guess "in" for the
    ceil(k/2) highest scores and "out" for the floor(k/2) lowest (``both_sides``), or "in" for the
    k highest (``both_sides=False``); abstain on the rest; count correct guesses; compute the
    one-run bound at ``significance / len(num_guesses)`` (Bonferroni over the grid). Returns the
    best k. Ties among scores are broken by a random permutation drawn from ``seed`` (never by
    position, which could correlate with the inclusion bits).
    """
    s = _scores("scores", scores)
    inc = np.asarray(included)
    if inc.shape != s.shape:
        raise ValueError(f"included={_short_repr(included)} must have the shape of scores {s.shape}")
    if inc.dtype != bool:
        if not np.all(np.isin(inc, (0, 1))):
            raise ValueError(f"included={_short_repr(included)} must hold booleans or 0/1")
        inc = inc.astype(bool)
    delta = _probability("delta", delta, allow_zero=True)
    significance = _probability("significance", significance, allow_zero=False)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed={seed!r} must be an int")
    m = s.size
    _check_fair_coins(int(inc.sum()), m)
    grid = _check_grid(num_guesses, m)
    level = significance / len(grid)

    perm = np.random.default_rng(seed).permutation(m)
    order = perm[np.argsort(-s[perm], kind="stable")]  # highest first, ties in random order
    inc_sorted = inc[order]
    hits_top = np.concatenate([[0], np.cumsum(inc_sorted)])  # included among the top j
    hits_bottom = np.concatenate([[0], np.cumsum(~inc_sorted[::-1])])  # excluded among bottom j

    rows = []
    for k in grid:
        if both_sides:
            k_pos, k_neg = (k + 1) // 2, k // 2
        else:
            k_pos, k_neg = k, 0
        correct = int(hits_top[k_pos] + hits_bottom[k_neg])
        rows.append((k, correct, _one_run_eps(m, k, correct, delta, level)))
    best = max(rows, key=lambda row: row[2])
    return OneRunResult(
        epsilon=float(best[2]),
        num_canaries=m,
        num_guesses=best[0],
        num_correct=best[1],
        significance=significance,
        delta=delta,
        both_sides=bool(both_sides),
        grid=tuple(rows),
    )


def max_one_run_epsilon(
    num_canaries: int,
    *,
    delta: float,
    significance: float = 0.05,
    num_guesses: Sequence[int] | None = None,
    num_included: int | None = None,
    both_sides: bool = True,
) -> float:
    """The largest epsilon ``one_run_audit`` could certify with ``num_canaries`` canaries.

    A perfect attack: every guess is right, except that with ``both_sides=False`` at most
    ``num_included`` of k "in" guesses can be right (pass it; default m/2 rounded down), and with
    ``both_sides`` at most ``num_included`` "in" and ``m - num_included`` "out" guesses. Uses the same
    guess grid and Bonferroni correction as ``one_run_audit``.
    """
    m = _count("num_canaries", num_canaries, minimum=1)
    delta = _probability("delta", delta, allow_zero=True)
    significance = _probability("significance", significance, allow_zero=False)
    n_in = m // 2 if num_included is None else _count("num_included", num_included)
    if n_in > m:
        raise ValueError(f"num_included={num_included!r} must be <= num_canaries={num_canaries!r}")
    grid = _check_grid(num_guesses, m)
    level = significance / len(grid)
    best = 0.0
    for k in grid:
        if both_sides:
            correct = min((k + 1) // 2, n_in) + min(k // 2, m - n_in)
        else:
            correct = min(k, n_in)
        best = max(best, _one_run_eps(m, k, correct, delta, level))
    return best


# ----------------------------------------------------------------------------------------------
# ROC, AUC, TPR at FPR
# ----------------------------------------------------------------------------------------------


def roc_curve(in_scores, out_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of "member iff score >= threshold", thresholds decreasing.

    Starts at (0, 0) with threshold +inf and ends at (1, 1); one point per distinct score (as
    ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``).
    """
    ins = np.sort(_scores("in_scores", in_scores))
    outs = np.sort(_scores("out_scores", out_scores))
    thr = np.unique(np.concatenate([ins, outs]))[::-1]
    tp, fp = _counts_at(ins, outs, thr)
    fpr = np.concatenate([[0.0], fp / outs.size])
    tpr = np.concatenate([[0.0], tp / ins.size])
    return fpr, tpr, np.concatenate([[np.inf], thr])


def _auc_components(ins, outs):
    """AUC = P[in > out] + P[in == out] / 2 and the DeLong placement values."""
    outs_sorted = np.sort(outs)
    ins_sorted = np.sort(ins)
    # For each in-score: fraction of out-scores below it, ties counted one half.
    below = np.searchsorted(outs_sorted, ins, side="left")
    below_or_eq = np.searchsorted(outs_sorted, ins, side="right")
    v10 = (below + below_or_eq) / (2.0 * outs.size)
    # For each out-score: fraction of in-scores above it, ties counted one half.
    above = ins.size - np.searchsorted(ins_sorted, outs, side="right")
    above_or_eq = ins.size - np.searchsorted(ins_sorted, outs, side="left")
    v01 = (above + above_or_eq) / (2.0 * ins.size)
    return float(np.mean(v10)), v10, v01


def auc(in_scores, out_scores) -> float:
    """Area under the ROC curve: P[in-score > out-score] + P[tie] / 2."""
    return _auc_components(_scores("in_scores", in_scores), _scores("out_scores", out_scores))[0]


def auc_interval(in_scores, out_scores, significance: float = 0.05) -> tuple[float, float]:
    """Approximate two-sided confidence interval for the AUC (DeLong variance, normal quantile).

    Asymptotic, not exact: use it as a descriptive interval, not as a hard pass/fail statistic.
    """
    ins = _scores("in_scores", in_scores)
    outs = _scores("out_scores", out_scores)
    significance = _probability("significance", significance, allow_zero=False)
    a, v10, v01 = _auc_components(ins, outs)
    var = 0.0
    if ins.size > 1:
        var += np.var(v10, ddof=1) / ins.size
    if outs.size > 1:
        var += np.var(v01, ddof=1) / outs.size
    half = float(stats.norm.ppf(1 - significance / 2) * math.sqrt(var))
    return max(0.0, a - half), min(1.0, a + half)


def tpr_at_fpr(in_scores, out_scores, fpr: float, significance: float = 0.05) -> TprAtFpr:
    """TPR at the most permissive threshold whose empirical FPR is <= ``fpr``.

    The threshold is chosen from the out-scores alone, so a two-sided Clopper-Pearson interval on
    the in-scores' hit count at that threshold is valid as it stands.
    """
    ins = np.sort(_scores("in_scores", in_scores))
    outs = np.sort(_scores("out_scores", out_scores))
    target = _probability("fpr", fpr, allow_zero=True)
    significance = _probability("significance", significance, allow_zero=False)
    allowed_fp = int(math.floor(target * outs.size + 1e-9))
    if allowed_fp >= outs.size:
        threshold = -np.inf
    else:
        # Smallest threshold with at most allowed_fp out-scores at or above it: just above the
        # (allowed_fp + 1)-th largest out-score.
        threshold = float(np.nextafter(outs[outs.size - allowed_fp - 1], np.inf))
    tp, fp = _counts_at(ins, outs, np.array([threshold]))
    tp, fp = int(tp[0]), int(fp[0])
    lo, hi = clopper_pearson_interval(tp, ins.size, significance)
    return TprAtFpr(
        target_fpr=target,
        threshold=threshold,
        fpr=fp / outs.size,
        tpr=tp / ins.size,
        tpr_lower=lo,
        tpr_upper=hi,
        significance=significance,
        enough_negatives=bool(outs.size * target >= 10),
    )


# ----------------------------------------------------------------------------------------------
# DP ceilings and the Gaussian mechanism
# ----------------------------------------------------------------------------------------------


def dp_tpr_ceiling(fpr, epsilon: float, delta: float):
    """Largest TPR any test can reach at this FPR against an (epsilon, delta)-DP mechanism.

    ``min(1, delta + e^eps FPR, 1 - e^-eps (1 - delta - FPR))``, clipped to [0, 1]. ``fpr`` may be
    a number (returns a float) or an array (returns an array).
    """
    epsilon = _epsilon_arg("epsilon", epsilon)
    delta = _probability("delta", delta, allow_zero=True)
    x = np.asarray(fpr, dtype=np.float64)
    if not np.all((x >= 0) & (x <= 1)):
        raise ValueError(f"fpr={_short_repr(fpr)} must be in [0, 1]")
    ceiling = np.minimum.reduce(
        [np.ones_like(x), delta + math.exp(epsilon) * x, 1 - math.exp(-epsilon) * (1 - delta - x)]
    )
    ceiling = np.clip(ceiling, 0.0, 1.0)
    return float(ceiling) if ceiling.ndim == 0 else ceiling


def dp_auc_ceiling(epsilon: float, delta: float) -> float:
    """Largest AUC against an (epsilon, delta)-DP mechanism: the area under ``dp_tpr_ceiling``.

    The ceiling is piecewise linear with kinks at (1 - delta) / (e^eps + 1) and 1 - delta, so the
    trapezoid rule on those points is exact.
    """
    epsilon = _epsilon_arg("epsilon", epsilon)
    delta = _probability("delta", delta, allow_zero=True)
    x = np.array([0.0, (1 - delta) / (math.exp(epsilon) + 1), 1 - delta, 1.0])
    y = dp_tpr_ceiling(x, epsilon, delta)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Epsilon at ``delta`` of mu-GDP (the Gaussian mechanism with sensitivity/sigma = mu).

    Solves delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Dong, Roth, Su).
    """
    mu = float(mu)
    if not (mu > 0) or math.isinf(mu):
        raise ValueError(f"mu={mu!r} must be a finite number > 0")
    delta = _probability("delta", delta, allow_zero=False)

    def gap(eps):
        return (
            stats.norm.cdf(-eps / mu + mu / 2)
            - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
            - delta
        )

    if gap(0.0) <= 0:
        return 0.0
    hi = 1.0
    while gap(hi) > 0:
        hi *= 2
    return float(optimize.brentq(gap, 0.0, hi, xtol=1e-12))


# ----------------------------------------------------------------------------------------------
# Auditor
# ----------------------------------------------------------------------------------------------


class Auditor:
    """Privacy statistics from membership scores (``higher score means member``).

    ``in_scores``: scores of canaries that were in the training set (or of runs with the canary);
    ``out_scores``: of canaries that were not. For the Clopper-Pearson bound each score must come
    from an independent run of the mechanism; for the one-run bound they are the canaries of one
    training run, each included with probability 1/2.

    >>> a = Auditor(in_scores, out_scores)
    >>> a.epsilon_lower_bound(significance=0.05, delta=plan.delta)
    """

    sign_convention = SIGN_CONVENTION

    def __init__(self, in_scores, out_scores):
        self.in_scores = _scores("in_scores", in_scores)
        self.out_scores = _scores("out_scores", out_scores)
        self.in_scores.setflags(write=False)
        self.out_scores.setflags(write=False)

    @property
    def num_in(self) -> int:
        return int(self.in_scores.size)

    @property
    def num_out(self) -> int:
        return int(self.out_scores.size)

    def __repr__(self) -> str:
        return f"Auditor(num_in={self.num_in}, num_out={self.num_out})"

    # -- attack quality -----------------------------------------------------------------------

    def roc(self):
        """(fpr, tpr, thresholds); see ``roc_curve``."""
        return roc_curve(self.in_scores, self.out_scores)

    def auc(self) -> float:
        return auc(self.in_scores, self.out_scores)

    def auc_interval(self, significance: float = 0.05) -> tuple[float, float]:
        return auc_interval(self.in_scores, self.out_scores, significance)

    def tpr_at_fpr(self, fpr: float, significance: float = 0.05) -> TprAtFpr:
        return tpr_at_fpr(self.in_scores, self.out_scores, fpr, significance)

    # -- epsilon lower bounds -----------------------------------------------------------------

    def epsilon_bound(
        self,
        significance: float = 0.05,
        delta: float = 0.0,
        strategy: Bonferroni | Split | Explicit = Bonferroni(),
        two_sided: bool = True,
    ) -> EpsilonBound:
        return clopper_pearson_epsilon(
            self.in_scores,
            self.out_scores,
            significance=significance,
            delta=delta,
            strategy=strategy,
            two_sided=two_sided,
        )

    def epsilon_lower_bound(
        self,
        significance: float = 0.05,
        delta: float = 0.0,
        strategy: Bonferroni | Split | Explicit = Bonferroni(),
        two_sided: bool = True,
    ) -> float:
        """Clopper-Pearson epsilon lower bound (multi-run setting)."""
        return self.epsilon_bound(significance, delta, strategy, two_sided).epsilon

    def one_run(
        self,
        delta: float,
        significance: float = 0.05,
        num_guesses: Sequence[int] | None = None,
        both_sides: bool = True,
        seed: int = 0,
    ) -> OneRunResult:
        """One-run bound treating the in- and out-scores as the canaries of one training run."""
        scores = np.concatenate([self.in_scores, self.out_scores])
        included = np.concatenate([np.ones(self.num_in, bool), np.zeros(self.num_out, bool)])
        return one_run_audit(
            scores,
            included,
            delta=delta,
            significance=significance,
            num_guesses=num_guesses,
            both_sides=both_sides,
            seed=seed,
        )

    def one_run_epsilon(self, delta: float, significance: float = 0.05, **kwargs) -> float:
        return self.one_run(delta, significance, **kwargs).epsilon

    def max_certifiable_epsilon(
        self,
        significance: float = 0.05,
        delta: float = 0.0,
        strategy: Bonferroni | Split = Bonferroni(),
        two_sided: bool = True,
    ) -> float:
        """Largest Clopper-Pearson bound these sample sizes allow (a perfect attack)."""
        return max_certifiable_epsilon(
            self.num_in,
            self.num_out,
            significance=significance,
            delta=delta,
            strategy=strategy,
            two_sided=two_sided,
        )

    def max_one_run_epsilon(
        self, delta: float, significance: float = 0.05, num_guesses=None, both_sides: bool = True
    ) -> float:
        """Largest one-run bound with these canaries (a perfect attack)."""
        return max_one_run_epsilon(
            self.num_in + self.num_out,
            delta=delta,
            significance=significance,
            num_guesses=num_guesses,
            num_included=self.num_in,
            both_sides=both_sides,
        )

    # -- report -------------------------------------------------------------------------------

    def report(
        self,
        *,
        delta: float,
        significance: float = 0.05,
        claimed_epsilon: float | None = None,
        one_run: bool = True,
        fprs: Sequence[float] = (0.01, 0.001),
    ) -> dict:
        """All numbers as a JSON-able dict (plain floats, ints, bools, strings, lists, None).

        Each statistic is computed at ``significance`` on its own; a caller combining several into
        one verdict must split its error budget (e.g. pass significance / number_of_bounds).
        With ``claimed_epsilon`` (the plan's upper bound) the DP ceilings at that epsilon and a
        ``violation`` flag (a lower bound above the claim) are included. The flag combines the bounds
        (Clopper-Pearson, and one-run with ``one_run``), so each is recomputed for it at
        ``significance / number_of_bounds``: a false alarm has probability at most ``significance``.
        ``one_run`` needs in/out counts that fair coins could give (``one_run_audit``); where they are not,
        the one-run block is left out and ``one_run_left_out`` says why.
        """
        delta = _probability("delta", delta, allow_zero=True)
        significance = _probability("significance", significance, allow_zero=False)
        lo, hi = self.auc_interval(significance)
        cp = self.epsilon_bound(significance, delta)
        out: dict = {
            "sign_convention": SIGN_CONVENTION,
            "num_in": self.num_in,
            "num_out": self.num_out,
            "significance": significance,
            "delta": delta,
            "auc": self.auc(),
            "auc_interval": [lo, hi],
            "auc_interval_method": "DeLong (asymptotic)",
            "tpr_at_fpr": [self.tpr_at_fpr(f, significance).to_dict() for f in fprs],
            "clopper_pearson": cp.to_dict(),
            "max_certifiable_epsilon": {
                "clopper_pearson": self.max_certifiable_epsilon(significance, delta),
            },
        }
        if one_run:
            try:
                _check_fair_coins(self.num_in, self.num_in + self.num_out)
            except ValueError as e:   # in/out sets of another kind (e.g. independent runs): no one-run bound
                one_run = False
                out["one_run_left_out"] = str(e)
        if one_run:
            out["one_run"] = self.one_run(delta, significance).to_dict()
            out["max_certifiable_epsilon"]["one_run"] = self.max_one_run_epsilon(delta, significance)
        if claimed_epsilon is not None:
            eps = _epsilon_arg("claimed_epsilon", claimed_epsilon)
            out["claimed_epsilon"] = eps
            out["ceiling"] = {
                "auc": dp_auc_ceiling(eps, delta),
                "tpr_at_fpr": [[float(f), dp_tpr_ceiling(float(f), eps, delta)] for f in fprs],
            }
            # The flags are unions over the bounds: each at its share of the error budget.
            bounds, ceilings = [cp.epsilon], [out["max_certifiable_epsilon"]["clopper_pearson"]]
            if one_run:
                share = significance / 2
                bounds = [self.epsilon_bound(share, delta).epsilon, self.one_run(delta, share).epsilon]
                ceilings = [self.max_certifiable_epsilon(share, delta), self.max_one_run_epsilon(delta, share)]
            out["violation"] = bool(max(bounds) > eps)
            out["can_detect_violation"] = bool(max(ceilings) > eps)
        return _jsonable(out)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        f = float(x)
        return f if math.isfinite(f) else None  # e.g. threshold -inf at FPR 1
    return x
