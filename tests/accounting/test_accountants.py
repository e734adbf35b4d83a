"""Accountants against an exact oracle and against each other (STYLE.md section 10)."""
import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting import rdp as dp_rdp
from scipy import optimize, stats

import accounting
from accounting import PldAccountant, PrvAccountant, RdpAccountant, dpsgd_event

DELTA = 1e-5


def exact_gdp_epsilon(mu: float, delta: float) -> float:
    """Full batch: T Gaussian steps with noise multiplier s are exactly mu-GDP, mu = sqrt(T)/s, and
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Dong, Roth, Su 2019, Cor. 2.13)."""

    def excess(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta

    return optimize.brentq(excess, 0.0, 500.0, xtol=1e-13, rtol=1e-14)


@pytest.mark.parametrize("noise_multiplier,steps", [(0.9, 1), (2.0, 10), (5.0, 100), (20.0, 1000), (1.2, 50)])
def test_full_batch_gaussian_matches_exact_oracle(noise_multiplier, steps):
    exact = exact_gdp_epsilon(math.sqrt(steps) / noise_multiplier, DELTA)
    event = dpsgd_event(1.0, noise_multiplier, steps)
    prv = PrvAccountant(eps_error=max(0.01 * exact, 1e-3)).epsilon(event, DELTA)
    assert prv.lower <= exact <= prv.upper
    rdp = RdpAccountant().epsilon(event, DELTA)
    assert rdp.upper >= exact
    plan = accounting.PrivacyPlan(dataset_size=1000, batch_size=1000, steps=steps,
                                  noise_multiplier=noise_multiplier, delta=DELTA)
    doc = accounting.make_plan_document(plan)
    assert exact <= doc.epsilon <= exact * 1.005, (exact, doc.epsilon)


GRID = [(q, s, t) for q in (0.01, 0.1) for s in (0.8, 2.0, 8.0) for t in (10, 1000)]


@pytest.mark.parametrize("sample_rate,noise_multiplier,steps", GRID)
def test_grid_rdp_above_prv_lower_and_certified_within_prv(sample_rate, noise_multiplier, steps):
    event = dpsgd_event(sample_rate, noise_multiplier, steps)
    pld_eps = PldAccountant(1e-3).epsilon(event, DELTA).upper
    prv = PrvAccountant(eps_error=max(0.02 * pld_eps, 0.01)).epsilon(event, DELTA)
    rdp = RdpAccountant().epsilon(event, DELTA)
    assert rdp.upper >= prv.lower
    n = 10_000
    plan = accounting.PrivacyPlan(dataset_size=n, batch_size=round(sample_rate * n), steps=steps,
                                  noise_multiplier=noise_multiplier, delta=DELTA)
    doc = accounting.make_plan_document(plan)
    assert doc.prv.lower <= doc.epsilon <= doc.prv.upper
    assert prv.lower <= doc.epsilon <= prv.upper
    assert doc.epsilon <= doc.rdp.upper


@pytest.mark.slow
@pytest.mark.parametrize("sample_rate,noise_multiplier,steps", [(4096 / 60000, 73.9, 4395), (0.064, 1.0, 469)])
def test_certified_matches_tight_prv(sample_rate, noise_multiplier, steps):
    """PRV at 0.2% error: the certificate is inside its (tight) bounds and within 1e-3 of its estimate."""
    event = dpsgd_event(sample_rate, noise_multiplier, steps)
    certified = accounting.compute_epsilon(sample_rate=sample_rate, noise_multiplier=noise_multiplier,
                                           steps=steps, delta=DELTA)
    prv = PrvAccountant(eps_error=0.002 * certified).epsilon(event, DELTA)
    assert prv.lower <= certified <= prv.upper
    assert abs(certified - prv.estimate) <= 1e-3 * certified


@pytest.mark.parametrize("accountant", [RdpAccountant(), PldAccountant(1e-3), PrvAccountant(eps_error=0.05)],
                         ids=["rdp", "pld", "prv"])
class TestContract:
    def test_no_op_gives_zero(self, accountant):
        assert accountant.epsilon(dp_event.NoOpDpEvent(), DELTA).upper == 0.0
        assert accountant.epsilon(dpsgd_event(0.1, 1.0, 0), DELTA).upper == 0.0

    def test_non_private_gives_inf(self, accountant):
        assert accountant.epsilon(dpsgd_event(0.1, 0.0, 10), DELTA).upper == math.inf

    def test_unknown_event_raises(self, accountant):
        event = dp_event.SelfComposedDpEvent(dp_event.LaplaceDpEvent(1.0), 3)
        assert not accountant.supports(event)
        with pytest.raises(accounting.UnsupportedEventError, match="LaplaceDpEvent"):
            accountant.epsilon(event, DELTA)

    def test_self_composed_equals_composed(self, accountant):
        step = dp_event.PoissonSampledDpEvent(0.05, dp_event.GaussianDpEvent(1.5))
        a = accountant.epsilon(dp_event.SelfComposedDpEvent(step, 6), DELTA).upper
        b = accountant.epsilon(dp_event.ComposedDpEvent([step] * 6), DELTA).upper
        c = accountant.epsilon(dp_event.SelfComposedDpEvent(dp_event.ComposedDpEvent([step] * 2), 3), DELTA).upper
        assert a == pytest.approx(b, rel=1e-6) and a == pytest.approx(c, rel=1e-6)

    @pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5])
    def test_bad_delta(self, accountant, delta):
        with pytest.raises(ValueError, match="delta="):
            accountant.epsilon(dpsgd_event(0.1, 1.0, 10), delta)


@pytest.mark.parametrize("accountant", [RdpAccountant(), PldAccountant(1e-3)], ids=["rdp", "pld"])
def test_nested_self_compositions_multiply_their_counts(accountant):
    """mut51 a02, stop 50: SelfComposed(SelfComposed(step, 2), 3) is six steps, not two. Dropping the outer count
    in `_dpsgd_terms` under-reported epsilon for any event nested so (a plan's own event has one level, and the
    contract test above nests a Composed event, not a SelfComposed one)."""
    step = dp_event.PoissonSampledDpEvent(0.05, dp_event.GaussianDpEvent(1.5))
    six = accountant.epsilon(dp_event.SelfComposedDpEvent(step, 6), DELTA).upper
    nested = accountant.epsilon(dp_event.SelfComposedDpEvent(dp_event.SelfComposedDpEvent(step, 2), 3), DELTA).upper
    assert nested == pytest.approx(six, rel=1e-9)


def test_pld_refuses_a_delta_below_the_floor_of_all_its_steps():
    """h122 F1, stop 52: PldAccountant's `upper`, "a rigorous bound for any discretization", came out below a lower
    bound on the true epsilon (9.11398) at delta 1e-12 and 100 steps: 9.11368 at interval 1e-4, 9.11394 at 2e-5.
    Below the delta floor it raises the plan's line, counting the steps of every term; RDP's bound, analytic, still
    answers there."""
    with pytest.raises(ValueError, match="delta=1e-12 is below 1e-10, where the accountants lose double precision"):
        PldAccountant(1e-4).epsilon(dpsgd_event(0.064, 1.0, 100), 1e-12)
    two_terms = dp_event.ComposedDpEvent([dpsgd_event(0.064, 1.0, 600), dpsgd_event(0.01, 2.0, 600)])
    with pytest.raises(ValueError, match=r"delta=1e-10 is below 1.2e-10 for 1200 steps \(at least 1e-13 per step\)"):
        PldAccountant(1e-2).epsilon(two_terms, 1e-10)
    assert PldAccountant(1e-2).epsilon(two_terms, 1.2e-10).upper > 0
    assert math.isfinite(RdpAccountant().epsilon(dpsgd_event(0.064, 1.0, 100), 1e-12).upper)


@pytest.mark.parametrize("triple", [(1.0, 3.0, 2.0), (2.5, 2.0, 3.0)])
def test_a_prv_triple_out_of_order_is_no_answer(triple):
    """mut51 a07, stop 50: prv-accountant's (lower, estimate, upper) must be in order; a triple that is not is a
    failed computation, never figures for a plan file (the order check dropped from `_prv_report` took it)."""
    from accounting.accountants import _prv_report

    with pytest.raises(ValueError, match="prv-accountant returned no epsilon"):
        _prv_report(*triple, eps_error=0.01)
    assert _prv_report(1.0, 2.0, 3.0, eps_error=0.01).upper == 3.0


def test_rdp_golden_value_from_opacus():
    """opacus RDP (its alphas 1.1..10.9, 12..63) gives eps = 7.329 at sigma=1.5, q=0.04, 90 epochs
    (2250 steps), delta=1e-5 (opacus tests/accountants_test.py; opacus 1.6 prints 7.32911). Our grid
    contains opacus's orders and dp-accounting's RDP terms agree with opacus's to about 1e-4."""
    eps = RdpAccountant().epsilon(dpsgd_event(0.04, 1.5, 2250), 1e-5).upper
    assert eps == pytest.approx(7.329, abs=1e-3)


@pytest.mark.parametrize("args,match", [
    ((float("nan"), 1.0, 10), "sample_rate=nan"),   # used to pass `< 1.0` as False: full-batch numbers
    ((float("inf"), 1.0, 10), "sample_rate=inf"),
    ((1.5, 1.0, 10), "sample_rate=1.5"),
    ((0.0, 1.0, 10), "sample_rate=0.0"),
    ((True, 1.0, 10), "sample_rate=True"),
    ((0.1, float("nan"), 10), "noise_multiplier=nan"),
    ((0.1, float("inf"), 10), "noise_multiplier=inf"),
    ((0.1, -1.0, 10), "noise_multiplier=-1.0"),
    ((0.1, 10**400, 10), "noise_multiplier=1000"),  # an int too large for a float
    ((0.1, 1.0, -1), "steps=-1"),
    ((0.1, 1.0, 2.5), "steps=2.5"),
    ((0.1, 1.0, True), "steps=True"),
])
def test_dpsgd_event_refuses_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        dpsgd_event(*args)


def test_dpsgd_event_takes_numpy_numbers():
    import numpy as np

    event = dpsgd_event(np.float64(0.25), np.float64(1.5), np.int64(7))
    assert event == dpsgd_event(0.25, 1.5, 7)
    assert event.count == 7 and type(event.count) is int


def test_prv_keeps_numpy_warnings_off_stderr():
    """At noise multiplier 0.2 prv-accountant's densities overflow in exp on the way to its bounds:
    `dpdm plan --noise-multiplier 0.2` printed numpy RuntimeWarnings on the user's stderr."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = PrvAccountant(eps_error=5.0).epsilon(dpsgd_event(0.064, 0.2, 469), DELTA)
    assert 0 < report.lower <= report.estimate <= report.upper
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []


@pytest.mark.parametrize("q,sigma,steps", [(0.1, 0.7, 100)])   # stop 48 (mut49 AC5)
def test_rdp_epsilon_is_dp_accountings_default_rdp(q, sigma, steps):
    """The fractional orders (1.1 .. 10.9) matter where epsilon is large: a grid of integer orders only gave a
    looser RDP figure, and the opacus golden value above has its optimum at an integer order. The oracle is
    dp-accounting's own RdpAccountant with its default orders."""
    event = dpsgd_event(q, sigma, steps)
    ref = dp_rdp.RdpAccountant().compose(event).get_epsilon(1e-5)
    assert RdpAccountant().epsilon(event, 1e-5).upper == pytest.approx(ref, rel=1e-9)


# --- what a guarantee means for one example: bounds on a membership test (h136 F1, stop 53) ----------------------

def test_membership_bound_of_the_demo_plan_is_its_pessimistic_plds():
    """The demo plan (q 0.256, sigma 1.000466, 30 steps, interval 1e-3): TPR <= 0.2458 at FPR 1%, 0.0842 at 0.1%,
    TPR - FPR <= delta(0) = 0.5439; and an upper bound: at least what the optimistic PLD of the same grid gives."""
    import numpy as np
    from dp_accounting.pld import privacy_loss_distribution as pld

    event = dpsgd_event(0.256, 1.0004660308266127, 30)
    bound = accounting.membership_bound(event, (0.01, 0.001), discretization=1e-3)
    assert bound.tpr[0.01] == pytest.approx(0.24578, abs=2e-5) and bound.tpr[0.001] == pytest.approx(0.08420, abs=2e-5)
    assert bound.advantage == pytest.approx(0.54386, abs=2e-5)
    lower = pld.from_gaussian_mechanism(1.0004660308266127, sampling_prob=0.256, value_discretization_interval=1e-3,
                                        pessimistic_estimate=False, use_connect_dots=False).self_compose(30)
    eps = np.arange(0.0, 12.0, 1e-3)
    d = np.asarray(lower.get_delta_for_epsilon(eps))
    for a in (0.01, 0.001):
        optimistic = np.minimum(d + np.exp(eps) * a, 1 - np.exp(-eps) * (1 - d - a)).min()
        assert optimistic < bound.tpr[a] < optimistic + 0.01, (a, optimistic, bound.tpr[a])
    assert d[0] < bound.advantage


def test_membership_bound_grows_with_fpr_and_never_below_it():
    fprs = (1e-4, 1e-3, 0.01, 0.05, 0.1, 0.3, 0.6, 0.9)
    weak = accounting.membership_bound(dpsgd_event(0.1, 0.8, 200), fprs, discretization=1e-3)
    tprs = [weak.tpr[a] for a in fprs]
    assert tprs == sorted(tprs) and all(a <= t <= 1 for a, t in zip(fprs, tprs)), tprs
    assert all(t - a <= weak.advantage + 1e-12 for a, t in zip(fprs, tprs))
    # A tiny epsilon: a test can do little better than guess, TPR about FPR.
    tiny = accounting.membership_bound(dpsgd_event(0.01, 50.0, 10), fprs, discretization=1e-4)
    assert all(a <= tiny.tpr[a] <= a + 1e-3 for a in fprs), tiny
    assert tiny.advantage < 1e-3
    # No steps: no loss at all; no noise: no bound.
    assert accounting.membership_bound(dpsgd_event(0.1, 1.0, 0), (0.01,)).tpr == {0.01: 0.01}
    assert accounting.membership_bound(dpsgd_event(0.1, 0.0, 5), (0.01,)).tpr == {0.01: 1.0}
    for bad in ((0.0,), (1.0,), (float("nan"),), ()):
        with pytest.raises(ValueError, match="of one or more numbers in"):
            accounting.membership_bound(dpsgd_event(0.1, 1.0, 5), bad)


def test_pld_answers_zero_at_a_delta_past_the_total_variation_without_a_grid():
    """h142 N1, stop 54: at a delta at least the outputs' total variation distance, epsilon is exactly 0; the PLD
    answered it with a grid (from RDP's near-zero epsilon) that ran the machine out of memory. The bound must also
    hold: never below the pessimistic PLD's own delta(0), and equal to it for one step, where it is exact."""
    from accounting.accountants import _composed_pld, _dpsgd_terms, total_variation_bound

    assert PldAccountant(1e-6).epsilon(dpsgd_event(0.1, 1.0, 10), 0.999999).upper == 0.0
    for q, sigma, steps in [(1.0, 0.5, 1), (0.001, 0.3, 1), (0.1, 1.0, 10), (0.5, 2.0, 3)]:
        terms = _dpsgd_terms(dpsgd_event(q, sigma, steps))
        tv = total_variation_bound(terms)
        delta0 = _composed_pld(terms, 1e-3).get_delta_for_epsilon(0.0)
        assert tv >= delta0
        if steps == 1:
            assert tv == pytest.approx(delta0, rel=1e-6)
            # just below it the answer is a PLD's, and positive
            assert PldAccountant(1e-3).epsilon(dpsgd_event(q, sigma, steps), tv * 0.99).upper > 0
    # Full batches at a noise multiplier whose step's TV rounds to 1: "math domain error" from log1p(-1), the whole
    # line of `dpdm account -s 0.05 -p 1 -i 1000000` (stop 54). The outputs are apart: the bound is 1.
    assert total_variation_bound(_dpsgd_terms(dpsgd_event(1.0, 0.05, 3))) == 1.0
    assert PldAccountant(1e-2).epsilon(dpsgd_event(1.0, 0.05, 2), 1e-5).upper > 100


@pytest.mark.parametrize("fprs", [0.01, "0.01", ("0.01",), (), (0.0,), (True,), np.array(0.01),
                                  np.array([[0.01]])])
def test_membership_bound_refuses_what_is_not_a_tuple_of_rates(fprs):
    """h142 N2, stop 54: a bare number raised TypeError and strings were taken as numbers; a 0-d array too (r1 F5)."""
    with pytest.raises(ValueError, match="must be a tuple of one or more numbers in"):
        accounting.membership_bound(dpsgd_event(0.1, 1.0, 10), fprs)
