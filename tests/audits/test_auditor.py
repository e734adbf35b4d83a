"""Tests for audits.auditor: audit statistics (numpy/scipy only).

Statistical tests use ``np.random.default_rng(0xBAD5EED)`` (as jax_privacy's tests do) or
deterministic quantile-generated scores, with the tolerance stated at each assertion.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics

import audits.auditor as A
from audits.auditor import (
    SIGN_CONVENTION,
    Auditor,
    Bonferroni,
    Explicit,
    Split,
    auc,
    auc_interval,
    clopper_pearson_epsilon,
    clopper_pearson_interval,
    default_guess_grid,
    dp_auc_ceiling,
    dp_tpr_ceiling,
    epsilon_lower_bound,
    gaussian_epsilon,
    max_certifiable_epsilon,
    max_one_run_epsilon,
    one_run_audit,
    one_run_epsilon,
    one_run_p_value,
    roc_curve,
    tpr_at_fpr,
)

SEED = 0xBAD5EED


def _quantile_gaussian(mu, n):
    """Deterministic 'samples' of N(0,1) and N(mu,1) at the midpoints of n quantile bins."""
    out = stats.norm.ppf((np.arange(n) + 0.5) / n)
    return out + mu, out


# ------------------------------------------------------------------------------------------
# One-run bound (Steinke, Nasr, Jagielski 2023)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "m, r, expected",
    [
        # research/audits.md section 1.5, perfect-attack table (95%, delta = 1e-5), 2 decimals.
        (1000, 10, 1.01),
        (1000, 50, 2.76),
        (1000, 100, 3.47),
        (1000, 500, 5.09),
        (1000, 1000, 5.78),
        (100, 100, 3.49),
        (5000, 1000, 5.67),
        (10000, 10, 0.61),
        (50000, 10, 0.00),
        (50000, 1000, 4.28),
    ],
)
def test_one_run_reproduces_perfect_attack_table(m, r, expected):
    # The table is printed to 2 decimals: agree to within rounding (0.005 + float slack).
    assert one_run_epsilon(m, r, r, 1e-5, significance=0.05) == pytest.approx(expected, abs=0.0051)


def _naive_p_value(m, r, v, eps, delta):
    """Direct transcription of the p-value with explicit loops (the oracle)."""
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(r + 1)]
    beta = sum(pmf[v:])
    alpha = 0.0
    for i in range(1, v + 1):
        alpha = max(alpha, sum(pmf[max(v - i, 0) : v]) / i)
    return min(1.0, beta + alpha * 2 * m * delta)


@pytest.mark.parametrize("m, r, v", [(50, 20, 15), (200, 40, 40), (100, 30, 10), (10, 1, 1)])
@pytest.mark.parametrize("eps, delta", [(0.0, 0.0), (0.5, 1e-3), (2.0, 1e-5), (1.0, 0.01)])
def test_one_run_p_value_equals_naive_loop(m, r, v, eps, delta):
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(
        _naive_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-14
    )


def test_one_run_p_value_at_zero_is_fair_coin_tail():
    assert one_run_p_value(100, 60, 40, 0.0, 0.0) == pytest.approx(stats.binom.sf(39, 60, 0.5))


def test_one_run_epsilon_is_the_crossing_point():
    m, r, v, d = 1000, 200, 170, 1e-5
    eps = one_run_epsilon(m, r, v, d)
    assert eps > 0
    assert one_run_p_value(m, r, v, eps, d) <= 0.05
    assert one_run_p_value(m, r, v, eps + 1e-6, d) > 0.05
    # every smaller epsilon is rejected too (what makes the bound valid)
    assert all(one_run_p_value(m, r, v, e, d) <= 0.05 for e in np.linspace(0, eps, 50))


def test_one_run_epsilon_monotone_in_its_inputs():
    base = one_run_epsilon(1000, 200, 170, 1e-5)
    assert one_run_epsilon(1000, 200, 180, 1e-5) > base  # more correct
    assert one_run_epsilon(1000, 200, 170, 1e-5, significance=0.01) < base  # more confidence
    assert one_run_epsilon(1000, 200, 170, 1e-3) < base  # more delta
    assert one_run_epsilon(1000, 200, 100, 1e-5) == 0.0  # chance level certifies nothing
    assert one_run_epsilon(1000, 0, 0, 1e-5) == 0.0


def test_one_run_audit_counts_and_grid():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([1, 1, 0, 1, 0, 0])
    res = one_run_audit(scores, included, delta=0.0, num_guesses=[2, 4, 6])
    rows = {k: c for k, c, _ in res.grid}
    # both sides: k=2 -> top1 in (right) + bottom1 out (right); k=4 -> top2 + bottom2 all right;
    # k=6 -> top3 (5,4,3: 2 right) + bottom3 (2,1,0: 2 right)
    assert rows == {2: 2, 4: 4, 6: 4}
    res_pos = one_run_audit(scores, included, delta=0.0, num_guesses=[3], both_sides=False)
    assert res_pos.grid[0][:2] == (3, 2)
    # each grid entry is at the Bonferroni-corrected level
    assert res.grid[1][2] == pytest.approx(one_run_epsilon(6, 4, 4, 0.0, significance=0.05 / 3))
    assert res.epsilon == max(e for _, _, e in res.grid)
    json.dumps(res.to_dict(), allow_nan=False)


def test_one_run_audit_breaks_ties_without_looking_at_position():
    # All scores equal and the included canaries listed first: a position-based tie-break would
    # guess them all right and certify a large epsilon from nothing.
    m = 2000
    included = np.r_[np.ones(m // 2), np.zeros(m // 2)]
    res = one_run_audit(np.zeros(m), included, delta=1e-5)
    assert res.epsilon < 0.3


def test_one_run_bound_never_exceeds_true_epsilon():
    """Laplace mechanism (pure 3-DP, delta=0) and Gaussian mechanism (mu=2 GDP at delta=1e-5)."""
    rng = np.random.default_rng(SEED)
    eps_lap = 3.0
    eps_gauss = gaussian_epsilon(2.0, 1e-5)
    lap, gauss = [], []
    for _ in range(25):
        s = rng.random(1000) < 0.5
        lap.append(one_run_audit(rng.laplace(s.astype(float), 1 / eps_lap), s, delta=0.0).epsilon)
        gauss.append(one_run_audit(rng.normal(2.0 * s, 1.0), s, delta=1e-5).epsilon)
    assert max(lap) < eps_lap
    assert max(gauss) < eps_gauss
    # and the audit has power: the Laplace case gets within a factor 2 of the truth on average
    assert np.mean(lap) > eps_lap / 2


def test_max_one_run_epsilon_is_a_perfect_attack():
    m = 1000
    # a perfect attack through the public API reaches exactly the ceiling
    included = np.r_[np.ones(m // 2, bool), np.zeros(m // 2, bool)]
    perfect = one_run_audit(included.astype(float), included, delta=1e-5).epsilon
    assert max_one_run_epsilon(m, delta=1e-5) == pytest.approx(perfect)
    # with one k and no correction it is the table's number
    assert max_one_run_epsilon(m, delta=1e-5, num_guesses=[1000]) == pytest.approx(5.78, abs=0.0051)


def test_default_guess_grid():
    g = default_guess_grid(1000)
    assert g[0] == 10 and g[-1] == 1000 and list(g) == sorted(set(g)) and len(g) == 20
    assert default_guess_grid(3) == (3,)


# ------------------------------------------------------------------------------------------
# Clopper-Pearson
# ------------------------------------------------------------------------------------------


def test_clopper_pearson_interval_coverage_by_simulation():
    """Miscoverage of each side <= significance/2 (+ 5% relative, for 1e6 draws)."""
    rng = np.random.default_rng(SEED)
    n, p = 50, 0.3
    k = rng.binomial(n, p, size=1_000_000)
    ks, counts = np.unique(k, return_counts=True)
    lo_miss = hi_miss = 0
    for kk, c in zip(ks, counts):
        lo, hi = clopper_pearson_interval(int(kk), n, 0.05)
        lo_miss += c * (lo > p)
        hi_miss += c * (hi < p)
    assert lo_miss / k.size <= 0.025 * 1.05
    assert hi_miss / k.size <= 0.025 * 1.05
    assert clopper_pearson_interval(0, 10)[0] == 0.0 and clopper_pearson_interval(10, 10)[1] == 1.0


@pytest.mark.parametrize("a", [1e-3, 1e-12, 1.7e-16, 6e-17, 1e-30])
def test_clopper_pearson_bounds_hold_their_level_however_small(a):
    """Each one-sided bound's level, from the exact binomial tails at 0 or 1 and at n - 1 or n successes, is at
    most `a` and within 1e-9 of it. The upper bound inverted the lower tail at 1 - a, which rounds a to a multiple of
    1.1e-16: at a = 1.7e-16 its level was 1.31 a, at 6e-17 1.85 a, and below 5.5e-17 the bound was 1 (h108 N1)."""
    n, log_a = 1000, math.log(a)
    for k in (0, 1):   # P(X <= k | p = upper bound)
        ub = float(A._cp_upper(k, n, a))
        assert 0 < ub < 1, (k, ub)
        log_level = (n - 1) * math.log1p(-ub) + (math.log1p(-ub) if k == 0 else math.log1p((n - 1) * ub))
        assert log_a - 1e-9 <= log_level <= log_a + 1e-9, (k, ub, math.exp(log_level - log_a))
    for k in (n, n - 1):   # P(X >= k | p = lower bound)
        lb = float(A._cp_lower(k, n, a))
        assert 0 < lb < 1, (k, lb)
        log_level = (n - 1) * math.log(lb) + (math.log(lb) if k == n else math.log(n - (n - 1) * lb))
        assert log_a - 1e-9 <= log_level <= log_a + 1e-9, (k, lb, math.exp(log_level - log_a))


def test_cp_bound_never_exceeds_true_epsilon_gaussian_mechanism():
    """100 seeds of Gaussian-mechanism scores: N(0,1) out vs N(mu,1) in, true eps via GDP."""
    rng = np.random.default_rng(SEED)
    cases = [(1.0, 1e-5), (2.0, 1e-2)]  # true eps 4.38 and 6.00
    for mu, delta in cases:
        true_eps = gaussian_epsilon(mu, delta)
        bonf, split = [], []
        for seed in range(100):
            ins, outs = rng.normal(mu, 1, 500), rng.normal(0, 1, 500)
            bonf.append(epsilon_lower_bound(ins, outs, delta=delta))
            split.append(epsilon_lower_bound(ins, outs, delta=delta, strategy=Split(seed=seed)))
        assert max(bonf) < true_eps, (mu, max(bonf), true_eps)
        assert max(split) < true_eps, (mu, max(split), true_eps)
        assert np.median(bonf) > 0.15 * true_eps  # not vacuous (about 0.2 observed)


def test_cp_bound_valid_and_sharp_on_randomized_response():
    """Randomized response is exactly eps-DP (delta 0), so large samples get close to eps.

    The plug-in estimate log(TPR/FPR) overshoots eps in about half of the seeds; the
    Clopper-Pearson bound must never do so (this is what the test could catch).
    """
    rng = np.random.default_rng(SEED)
    eps, n = 1.0, 5000
    p = math.exp(eps) / (1 + math.exp(eps))
    bounds, overshoot = [], 0
    for _ in range(100):
        ins = (rng.random(n) < p).astype(float)
        outs = (rng.random(n) < 1 - p).astype(float)
        bounds.append(epsilon_lower_bound(ins, outs))
        overshoot += math.log(ins.mean() / outs.mean()) > eps
    assert max(bounds) < eps
    assert np.mean(bounds) > 0.8 * eps
    assert overshoot > 20


def test_cp_bound_tight_on_quantile_gaussian_scores():
    # mu = 1, delta = 0.01: true eps 2.318; with 1e6 quantile scores the bound (2.18) is within 10%.
    ins, outs = _quantile_gaussian(1.0, 1_000_000)
    true_eps = gaussian_epsilon(1.0, 0.01)
    bound = epsilon_lower_bound(ins, outs, delta=0.01)
    assert 0.9 * true_eps < bound < true_eps


def test_cp_bound_details_and_strategies():
    ins, outs = _quantile_gaussian(2.0, 2000)
    b = clopper_pearson_epsilon(ins, outs, delta=1e-5)
    assert b.epsilon > 0 and b.threshold is not None
    one_sided = clopper_pearson_epsilon(ins, outs, delta=1e-5, two_sided=False).epsilon
    assert one_sided <= b.epsilon
    # An explicit threshold pays no correction: at the Bonferroni optimum it is at least as large.
    assert epsilon_lower_bound(ins, outs, delta=1e-5, strategy=Explicit(b.threshold)) >= b.epsilon
    # Split is reproducible from its seed
    s1 = epsilon_lower_bound(ins, outs, strategy=Split(seed=3))
    assert s1 == epsilon_lower_bound(ins, outs, strategy=Split(seed=3))
    # uninformative scores certify nothing
    rng = np.random.default_rng(SEED)
    assert epsilon_lower_bound(rng.normal(size=300), rng.normal(size=300)) < 0.5
    assert epsilon_lower_bound(np.zeros(100), np.zeros(100)) == 0.0
    # wrong sign convention (lower = member) gives a low one-sided bound
    assert clopper_pearson_epsilon(outs, ins, two_sided=False).epsilon == 0.0


def test_max_certifiable_epsilon():
    # perfect separation, Bonferroni: TPR_lo = (a)^(1/n), FPR_hi = 1 - (a)^(1/n), a = 0.025/n
    n = 1000
    a = 0.025 / n
    expected = math.log(a ** (1 / n) / (1 - a ** (1 / n)))
    assert max_certifiable_epsilon(n, n) == pytest.approx(expected, rel=1e-9)
    assert max_certifiable_epsilon(n, n, delta=1e-5) < expected
    assert max_certifiable_epsilon(10 * n, 10 * n) > expected  # grows with n
    # no attack does better than the ceiling
    ins, outs = _quantile_gaussian(4.0, n)
    assert epsilon_lower_bound(ins, outs) <= max_certifiable_epsilon(n, n)
    assert Auditor(ins, outs).max_certifiable_epsilon() == max_certifiable_epsilon(n, n)


# ------------------------------------------------------------------------------------------
# ROC / AUC / TPR at FPR
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
def test_roc_and_auc_match_sklearn(ties):
    rng = np.random.default_rng(SEED)
    for _ in range(5):
        ins, outs = rng.normal(0.7, 1, 300), rng.normal(0, 1, 400)
        if ties:
            ins, outs = np.round(ins), np.round(outs)
        y = np.r_[np.ones(ins.size), np.zeros(outs.size)]
        s = np.r_[ins, outs]
        fpr, tpr, thr = roc_curve(ins, outs)
        fpr_s, tpr_s, thr_s = metrics.roc_curve(y, s, drop_intermediate=False)
        np.testing.assert_allclose(fpr, fpr_s)
        np.testing.assert_allclose(tpr, tpr_s)
        np.testing.assert_allclose(thr[1:], thr_s[1:])
        assert auc(ins, outs) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)


def test_auc_interval_covers_true_auc():
    # Gaussian: true AUC = Phi(mu / sqrt 2). 95% DeLong interval covers it in >= 90% of 200 seeds.
    rng = np.random.default_rng(SEED)
    mu = 0.8
    true_auc = stats.norm.cdf(mu / math.sqrt(2))
    hits = 0
    for _ in range(200):
        lo, hi = auc_interval(rng.normal(mu, 1, 200), rng.normal(0, 1, 200))
        hits += lo <= true_auc <= hi
    assert hits >= 180


def test_tpr_at_fpr():
    ins, outs = _quantile_gaussian(2.0, 10_000)
    r = tpr_at_fpr(ins, outs, 0.01)
    assert r.fpr <= 0.01 and r.fpr == pytest.approx(0.01, abs=1e-4)
    true_tpr = stats.norm.cdf(stats.norm.ppf(0.01) + 2.0)  # GDP curve
    assert r.tpr == pytest.approx(true_tpr, abs=2e-3)
    assert r.tpr_lower <= r.tpr <= r.tpr_upper and r.enough_negatives
    lo, hi = clopper_pearson_interval(round(r.tpr * ins.size), ins.size)
    assert (r.tpr_lower, r.tpr_upper) == pytest.approx((lo, hi))
    assert not tpr_at_fpr(ins[:100], outs[:500], 0.001).enough_negatives
    # fpr 0: no out-score at or above the threshold
    r0 = tpr_at_fpr(ins, outs, 0.0)
    assert r0.fpr == 0.0 and r0.threshold > outs.max()


def test_tpr_at_fpr_never_exceeds_the_target_fpr_where_it_is_no_whole_number_of_negatives():
    """mut51 u13, stop 50: at 150 negatives an FPR of 1% allows 1.5 false positives; the threshold admits 1, and
    the empirical FPR stays at or below the target (rounding the allowance up admitted 2, an FPR of 1.33%; the
    test above has a whole target x negatives)."""
    outs = np.linspace(0.0, 1.0, 150)
    ins = np.linspace(0.5, 1.5, 100)
    r = tpr_at_fpr(ins, outs, 0.01)
    assert r.fpr <= 0.01 and r.fpr == pytest.approx(1 / 150)


# ------------------------------------------------------------------------------------------
# DP ceiling
# ------------------------------------------------------------------------------------------


def test_dp_ceiling_table_and_properties():
    # research/audits.md section 1.1 table, delta = 1e-5; agree to within one unit of the last
    # printed digit (the table rounds inconsistently, e.g. 0.0165 is printed 0.016).
    def close(value, printed):
        unit = 10.0 ** -len(printed.split(".")[1])
        return abs(value - float(printed)) <= unit

    for eps, max_auc, tpr1, tpr01 in [
        (0.5, "0.622", "0.016", "0.0017"),
        (1, "0.731", "0.027", "0.0027"),
        (2, "0.881", "0.074", "0.0074"),
        (4, "0.982", "0.546", "0.055"),
        (8, "1.000", "1.000", "0.9997"),
    ]:
        assert close(dp_auc_ceiling(eps, 1e-5), max_auc)
        assert close(dp_tpr_ceiling(0.01, eps, 1e-5), tpr1)
        assert close(dp_tpr_ceiling(0.001, eps, 1e-5), tpr01)
    x = np.linspace(0, 1, 2001)
    for eps, delta in [(0.0, 0.0), (0.3, 0.0), (1.0, 1e-5), (3.0, 0.1)]:
        c = dp_tpr_ceiling(x, eps, delta)
        assert np.all(np.diff(c) >= -1e-15)  # nondecreasing
        assert np.all(np.diff(c, 2) <= 1e-12)  # concave
        assert np.all(c >= x - 1e-15) and np.all(c <= 1)
        assert c[0] == pytest.approx(delta) and c[-1] == 1.0
        # the AUC ceiling is the area under it
        assert dp_auc_ceiling(eps, delta) == pytest.approx(np.trapezoid(c, x), abs=1e-6)
    np.testing.assert_allclose(dp_tpr_ceiling(x, 0.0, 0.0), x)  # eps = 0: chance line
    # every GDP ROC curve lies under the ceiling at its own (eps, delta)
    mu, delta = 1.0, 1e-5
    gdp = stats.norm.cdf(stats.norm.ppf(np.clip(x, 1e-300, 1)) + mu)
    assert np.all(gdp <= dp_tpr_ceiling(x, gaussian_epsilon(mu, delta), delta) + 1e-9)
    assert isinstance(dp_tpr_ceiling(0.5, 1.0, 0.0), float)


def test_gaussian_epsilon():
    # Known values (research/audits.md): mu = 1 -> 4.38, mu = 2 -> 10.0 at delta = 1e-5.
    assert gaussian_epsilon(1.0, 1e-5) == pytest.approx(4.377, abs=1e-3)
    assert gaussian_epsilon(2.0, 1e-5) == pytest.approx(9.997, abs=1e-3)


# ------------------------------------------------------------------------------------------
# Auditor and report
# ------------------------------------------------------------------------------------------


def test_auditor_methods_agree_with_functions_and_report_is_json():
    rng = np.random.default_rng(SEED)
    ins, outs = rng.normal(1.5, 1, 1000), rng.normal(0, 1, 1000)
    a = Auditor(ins, outs)
    assert a.sign_convention == SIGN_CONVENTION == "higher score means member"
    assert (a.num_in, a.num_out) == (1000, 1000)
    assert a.auc() == auc(ins, outs)
    assert a.epsilon_lower_bound(delta=1e-5) == epsilon_lower_bound(ins, outs, delta=1e-5)
    assert a.tpr_at_fpr(0.01) == tpr_at_fpr(ins, outs, 0.01)
    assert a.one_run_epsilon(1e-5) == a.one_run(1e-5).epsilon > 0
    rep = a.report(delta=1e-5, claimed_epsilon=1.0)
    text = json.dumps(rep, allow_nan=False)
    back = json.loads(text)
    assert back["auc"] == pytest.approx(a.auc())
    assert back["clopper_pearson"]["epsilon"] == pytest.approx(a.epsilon_lower_bound(delta=1e-5))
    assert [t["target_fpr"] for t in back["tpr_at_fpr"]] == [0.01, 0.001]
    assert back["one_run"]["epsilon"] == pytest.approx(a.one_run(1e-5).epsilon)
    assert set(back["max_certifiable_epsilon"]) == {"clopper_pearson", "one_run"}
    # mu = 1.5 is about 6.8-DP at 1e-5; the bounds exceed a (false) claim of eps = 1
    assert back["violation"] is True and back["can_detect_violation"] is True
    rep2 = a.report(delta=1e-5, claimed_epsilon=20.0, one_run=False)
    assert rep2["violation"] is False and rep2["can_detect_violation"] is False
    assert "one_run" not in rep2
    with pytest.raises(ValueError):
        a.in_scores[0] = 3.0  # read-only


def test_report_violation_splits_the_error_budget_between_its_two_bounds():
    """The flag is the union of the Clopper-Pearson and one-run bounds; each at the full significance gave a
    false-alarm rate up to twice it (audit walk F4, stop 40)."""
    rng = np.random.default_rng(SEED)
    a = Auditor(rng.normal(1.0, 1, 600), rng.normal(0, 1, 600))
    full = max(a.epsilon_bound(0.05, 1e-5).epsilon, a.one_run(1e-5, 0.05).epsilon)
    half = max(a.epsilon_bound(0.025, 1e-5).epsilon, a.one_run(1e-5, 0.025).epsilon)
    assert half < full
    claim = (half + full) / 2          # above both bounds at 0.025 each, below one of them at 0.05
    rep = a.report(delta=1e-5, significance=0.05, claimed_epsilon=claim)
    assert rep["violation"] is False
    assert max(rep["clopper_pearson"]["epsilon"], rep["one_run"]["epsilon"]) == pytest.approx(full)   # as computed
    assert a.report(delta=1e-5, significance=0.05, claimed_epsilon=half * 0.99)["violation"] is True
    assert a.report(delta=1e-5, significance=0.05, claimed_epsilon=claim, one_run=False)["violation"] is (
        a.epsilon_bound(0.05, 1e-5).epsilon > claim)
    # can_detect_violation takes the same shares as violation
    ceiling_half = max(a.max_certifiable_epsilon(0.025, 1e-5), a.max_one_run_epsilon(1e-5, 0.025))
    ceiling_full = max(a.max_certifiable_epsilon(0.05, 1e-5), a.max_one_run_epsilon(1e-5, 0.05))
    assert ceiling_half < ceiling_full
    between = (ceiling_half + ceiling_full) / 2
    assert a.report(delta=1e-5, significance=0.05, claimed_epsilon=between)["can_detect_violation"] is False


def _auditor_at_mu_one():
    rng = np.random.default_rng(SEED)
    return Auditor(rng.normal(1.0, 1, 600), rng.normal(0, 1, 600))


def test_report_flags_a_violation_only_strictly_above_the_claim():
    """mut51 u11, stop 50: a lower bound equal to the claimed epsilon is no violation (the plan's epsilon is an
    upper bound the mechanism may meet): `violation` is `bound > claim`, and `>=` flagged a claim met exactly. The
    bounds are those the flag computes, at half the significance each."""
    a = _auditor_at_mu_one()
    bound = max(a.epsilon_bound(0.025, 1e-5).epsilon, a.one_run(1e-5, 0.025).epsilon)
    assert bound > 0
    assert a.report(delta=1e-5, significance=0.05, claimed_epsilon=bound)["violation"] is False
    assert a.report(delta=1e-5, significance=0.05, claimed_epsilon=np.nextafter(bound, 0))["violation"] is True


def test_can_detect_violation_takes_the_larger_of_the_two_ceilings():
    """mut51 u12, stop 50: either bound can flag a violation, so the audit can detect one wherever either ceiling
    is above the claim (`min(ceilings)` said it could not where only one of them reached the claim; the test
    above checks the False side only)."""
    a = _auditor_at_mu_one()
    cp, one = a.max_certifiable_epsilon(0.025, 1e-5), a.max_one_run_epsilon(1e-5, 0.025)
    assert cp != pytest.approx(one, rel=1e-3)
    claim = (cp + one) / 2   # below the larger ceiling, above the smaller
    assert a.report(delta=1e-5, significance=0.05, claimed_epsilon=claim)["can_detect_violation"] is True
    above_both = max(cp, one) * 1.001
    assert a.report(delta=1e-5, significance=0.05, claimed_epsilon=above_both)["can_detect_violation"] is False


def test_one_run_refuses_splits_fair_coins_do_not_give():
    """900 in and 100 out from one distribution (no signal): guessing "in" is right 90% of the time by the base
    rate, and both_sides=False certified epsilon 2.03 (audit walk F5, stop 40)."""
    rng = np.random.default_rng(SEED)
    scores = rng.normal(size=1000)
    included = np.arange(1000) < 900
    for both in (True, False):
        with pytest.raises(ValueError, match="900 of 1000 canaries in: the one-run bound needs each canary "
                                             "included by a fair coin"):
            one_run_audit(scores, included, delta=1e-5, both_sides=both)
    rep = Auditor(scores[:900], scores[900:]).report(delta=1e-5, claimed_epsilon=1.0)   # independent runs, say
    assert "one_run" not in rep and "fair coin" in rep["one_run_left_out"] and rep["violation"] is False
    assert set(rep["max_certifiable_epsilon"]) == {"clopper_pearson"}
    one_run_audit(scores, np.arange(1000) < 540, delta=1e-5)     # 540 of 1000: fair coins do that (p = 0.012)


def test_auditor_does_not_import_torch():
    code = "import sys, audits.auditor; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: Auditor([], [1.0]), "in_scores"),
        (lambda: Auditor([1.0], np.ones((2, 2))), "out_scores"),
        (lambda: Auditor([1.0, np.nan], [0.0]), "in_scores"),
        (lambda: Auditor([1.0], [np.inf]), "out_scores"),
        (lambda: Auditor(["a"], [1.0]), "in_scores"),
        (lambda: epsilon_lower_bound([1.0], [0.0], significance=0.0), "significance"),
        (lambda: epsilon_lower_bound([1.0], [0.0], significance=1.5), "significance"),
        (lambda: epsilon_lower_bound([1.0], [0.0], delta=-1e-5), "delta"),
        (lambda: epsilon_lower_bound([1.0], [0.0], delta=1.0), "delta"),
        (lambda: epsilon_lower_bound([1.0], [0.0], strategy="bonferroni"), "strategy"),
        (lambda: epsilon_lower_bound([1.0], [0.0], strategy=Split()), "in_scores"),
        (lambda: Split(fraction=1.0), "fraction"),
        (lambda: Explicit(float("nan")), "threshold"),
        (lambda: one_run_epsilon(0, 0, 0, 1e-5), "num_canaries"),
        (lambda: one_run_epsilon(10, 11, 0, 1e-5), "num_guesses"),
        (lambda: one_run_epsilon(10, 5, 6, 1e-5), "num_correct"),
        (lambda: one_run_epsilon(10, 5, 2.0, 1e-5), "num_correct"),
        (lambda: one_run_epsilon(10, 5, 2, 1e-5, significance=0), "significance"),
        (lambda: one_run_p_value(10, 5, 2, -1.0, 0.0), "epsilon"),
        (lambda: one_run_audit([1.0, 2.0], [1], delta=0.0), "included"),
        (lambda: one_run_audit([1.0, 2.0], [1, 2], delta=0.0), "included"),
        (lambda: one_run_audit([1.0, 2.0], [1, 0], delta=0.0, num_guesses=[3]), "num_guesses"),
        (lambda: one_run_audit([1.0, 2.0], [1, 0], delta=0.0, num_guesses=[]), "num_guesses"),
        (lambda: dp_tpr_ceiling(1.5, 1.0, 0.0), "fpr"),
        (lambda: dp_tpr_ceiling(0.5, -1.0, 0.0), "epsilon"),
        (lambda: dp_auc_ceiling(float("inf"), 0.0), "epsilon"),
        (lambda: tpr_at_fpr([1.0], [0.0], 1.0), "fpr"),
        (lambda: max_certifiable_epsilon(0, 10), "num_in"),
        (lambda: max_certifiable_epsilon(10, 10, strategy=Explicit(0.0)), "strategy"),
        (lambda: clopper_pearson_interval(5, 4), "successes"),
        (lambda: gaussian_epsilon(0.0, 1e-5), "mu"),
        (lambda: Auditor([1.0], [0.0]).report(delta=1e-5, claimed_epsilon=-1), "claimed_epsilon"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()


def test_strategies_are_frozen_dataclasses():
    s = Split(seed=1)
    with pytest.raises(AttributeError):
        s.seed = 2  # type: ignore[misc]
    assert Bonferroni() == Bonferroni() and Split(seed=1) == s


def test_one_run_epsilon_retreats_to_the_first_crossing_of_a_non_monotone_p(monkeypatch):
    """Stop 48 (mut49 AU6). The bound is valid only if every epsilon below it is rejected too: where p(eps) rises
    above the level on (0.3, 0.4) and falls again, the bound is 0.3, not the last crossing. `_one_run_p` is
    monotone on every real input, so only a forged p shows the retreat."""
    def p(m, r, v, e, delta):
        return 0.5 if 0.3 < e < 0.4 or e > 2.0 else 0.01
    monkeypatch.setattr(A, "_one_run_p", p)
    assert one_run_epsilon(100, 50, 40, 0.0, 0.05) == pytest.approx(0.3, abs=1e-6)
