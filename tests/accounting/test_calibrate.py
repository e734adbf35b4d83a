"""Calibration finishes on the private side of the target, within 0.1%."""
import pytest

import accounting
from accounting import calibrate_noise_multiplier, compute_epsilon, max_steps, pld_discretization

DELTA = 1e-5


@pytest.mark.parametrize("sample_rate,steps,eps", [
    (0.064, 469, 10.0),     # the mnist5k default
    (4096 / 60000, 4395, 1.0),  # mnist-paper
    (4096 / 60000, 4395, 0.2),
    (0.01, 1000, 0.5),
    (1.0, 20, 3.0),         # full batch
])
def test_calibrated_sigma_is_smallest_to_a_tenth_of_a_percent(sample_rate, steps, eps):
    sigma = calibrate_noise_multiplier(sample_rate=sample_rate, steps=steps, target_epsilon=eps, delta=DELTA)
    disc = pld_discretization(eps)
    at = compute_epsilon(sample_rate=sample_rate, noise_multiplier=sigma, steps=steps, delta=DELTA, discretization=disc)
    below = compute_epsilon(sample_rate=sample_rate, noise_multiplier=sigma * 0.999, steps=steps, delta=DELTA,
                            discretization=disc)
    assert at <= eps < below
    # The plan made from it certifies the target too.
    plan = accounting.PrivacyPlan(dataset_size=60000, batch_size=round(sample_rate * 60000), steps=steps,
                                  noise_multiplier=1.0, delta=DELTA)
    if plan.sample_rate == sample_rate:
        doc = accounting.make_plan_document(plan.calibrate(epsilon=eps))
        assert doc.epsilon <= eps
        assert doc.plan.noise_multiplier == sigma


def test_small_targets_search_a_coarser_interval_first(monkeypatch):
    """A trial at the certifying interval costs as 1/interval: `dpdm plan --eps 0.05` at sample rate 1e-4 took 5
    minutes with no output (accounting walk F3, stop 40). A 10x coarser search finds the neighbourhood first, and
    the certifying search, which decides alone, needs fewer of its costly trials (here 4 instead of 9)."""
    from accounting.accountants import PldAccountant

    trials = []
    real = PldAccountant.epsilon
    monkeypatch.setattr(PldAccountant, "epsilon", lambda self, *a, **k: trials.append(self.discretization)
                        or real(self, *a, **k))
    q, steps, eps = 3e-3, 300, 0.5
    sigma = calibrate_noise_multiplier(sample_rate=q, steps=steps, target_epsilon=eps, delta=DELTA)
    disc = pld_discretization(eps)
    assert disc < accounting.calibrate.COARSE_FIRST_BELOW
    assert trials.count(disc) <= 5 and set(trials) == {disc, 10 * disc}
    at = compute_epsilon(sample_rate=q, noise_multiplier=sigma, steps=steps, delta=DELTA, discretization=disc)
    below = compute_epsilon(sample_rate=q, noise_multiplier=sigma * 0.999, steps=steps, delta=DELTA,
                            discretization=disc)
    assert at <= eps < below


@pytest.mark.slow   # 8 s (a million steps)
def test_calibration_takes_rdp_where_it_certifies_below_pld():
    """Over a million full-batch steps RDP's bound is below PLD's (at sigma 100: 96.12 against 102.67), and the plan
    is certified by the smaller; the search looked at PLD alone and returned a sigma above 100 for eps 97."""
    sigma = calibrate_noise_multiplier(sample_rate=1.0, steps=10**6, target_epsilon=97.0, delta=DELTA)
    assert 99 < sigma < 100
    assert max_steps(sample_rate=1.0, noise_multiplier=100.0, target_epsilon=97.0, delta=DELTA) >= 10**6


def test_tight_value_at_paper_mnist_eps_0_2():
    """The tight sigma for mnist-paper at eps 0.2 is about 73.9; opacus (PRV) returns 80, DPDM's RDP 85."""
    sigma = calibrate_noise_multiplier(sample_rate=4096 / 60000, steps=4395, target_epsilon=0.2, delta=DELTA)
    assert 73.0 < sigma < 74.5


def test_unreachable_epsilon_names_the_bound():
    with pytest.raises(ValueError, match=r"eps=1e-06 needs noise_multiplier above 1000"):
        calibrate_noise_multiplier(sample_rate=0.064, steps=469, target_epsilon=1e-6, delta=DELTA)


def test_epsilon_met_below_smallest_multiplier():
    with pytest.raises(ValueError, match="is met even at noise_multiplier"):
        calibrate_noise_multiplier(sample_rate=0.001, steps=1, target_epsilon=50.0, delta=DELTA)


@pytest.mark.parametrize("sample_rate,steps", [(0.2, 5), (0.064, 469)])
def test_an_epsilon_beyond_exp_overflow_is_met_below_smallest_multiplier(sample_rate, steps):
    """The initial guess's GDP mu took exp(eps): `dpdm plan --eps 1000` ended in OverflowError (exit 4)."""
    with pytest.raises(ValueError, match="eps=1000.0 is met even at noise_multiplier=0.3"):
        calibrate_noise_multiplier(sample_rate=sample_rate, steps=steps, target_epsilon=1000.0, delta=DELTA)


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_epsilon=0.0), "eps=0.0"),
    (dict(target_epsilon=float("inf")), "eps=inf"),
    (dict(delta=1.0), "delta=1.0"),
    (dict(steps=0), "steps=0"),
    (dict(sample_rate=1.5), "sample_rate=1.5"),
])
def test_bad_arguments(kwargs, match):
    args = dict(sample_rate=0.064, steps=469, target_epsilon=1.0, delta=DELTA) | kwargs
    with pytest.raises(ValueError, match=match):
        calibrate_noise_multiplier(**args)


def test_max_steps_is_the_largest_that_fits():
    q, sigma, eps = 0.064, 1.2, 4.0
    t = max_steps(sample_rate=q, noise_multiplier=sigma, target_epsilon=eps, delta=DELTA)
    disc = pld_discretization(eps)
    assert t > 1
    assert compute_epsilon(sample_rate=q, noise_multiplier=sigma, steps=t, delta=DELTA, discretization=disc) <= eps
    assert compute_epsilon(sample_rate=q, noise_multiplier=sigma, steps=t + 1, delta=DELTA, discretization=disc) > eps
    assert max_steps(sample_rate=1.0, noise_multiplier=0.8, target_epsilon=0.5, delta=DELTA) == 0
    assert max_steps(sample_rate=q, noise_multiplier=50.0, target_epsilon=10.0, delta=DELTA, limit=64) == 64


def test_max_steps_never_tries_or_returns_more_than_its_limit(monkeypatch):
    """mut51 c03, stop 50: the doubling search stops at a limit that is no power of two (it tried 128 steps for a
    limit of 100, and returned them), and returns the limit itself where every step count fits. The test above
    has limit 64."""
    tried = []

    def every_prefix_fits(event, delta, discretization):
        tried.append(event.count)
        assert event.count <= 100, f"tried {event.count} steps, beyond the limit of 100"
        return 0.0

    monkeypatch.setattr(accounting.calibrate, "_certificate_epsilon", every_prefix_fits)
    assert max_steps(sample_rate=0.01, noise_multiplier=50.0, target_epsilon=10.0, delta=DELTA, limit=100) == 100
    assert max(tried) == 100


def test_max_steps_itself_is_a_legal_step_count_for_the_accountants():
    """mut51 c04, stop 50: PrivacyPlan takes up to MAX_STEPS steps inclusive, and so must compute_epsilon's and
    calibrate_noise_multiplier's check (`steps >= maximum` refused exactly the MAX_STEPS that `dpdm plan --steps
    10000000` accepts)."""
    accounting.calibrate._check_steps("steps", accounting.MAX_STEPS)
    with pytest.raises(ValueError, match=r"steps=10000001 must be <= 10000000"):
        accounting.calibrate._check_steps("steps", accounting.MAX_STEPS + 1)


def test_a_delta_below_the_floor_is_refused_as_a_plan_refuses_it():
    """h122 F1, stop 52: only PrivacyPlan and the CLI checked the delta floor (accounting.min_delta). Below it
    compute_epsilon(sample_rate=0.064, noise_multiplier=1.0, steps=100, delta=1e-12) returned a "certified" 9.11315,
    where a lower bound on the true epsilon is 9.11398, and calibrate_noise_multiplier calibrated at 1e-14. They
    refuse it with the plan's line, before any accounting."""
    floor = "delta=1e-12 is below 1e-10, where the accountants lose double precision"
    with pytest.raises(ValueError, match=floor):
        compute_epsilon(sample_rate=0.064, noise_multiplier=1.0, steps=100, delta=1e-12)
    with pytest.raises(ValueError, match=r"delta=1e-09 is below 1e-08 for 100000 steps \(at least 1e-13 per step\)"):
        compute_epsilon(sample_rate=0.064, noise_multiplier=1.0, steps=10**5, delta=1e-9)
    with pytest.raises(ValueError, match="delta=1e-14 is below 1e-10, where the accountants lose double precision"):
        calibrate_noise_multiplier(sample_rate=0.064, steps=100, target_epsilon=9.0, delta=1e-14)
    with pytest.raises(ValueError, match=r"delta=1e-09 is below 1e-08 for 100000 steps"):
        calibrate_noise_multiplier(sample_rate=0.064, steps=10**5, target_epsilon=9.0, delta=1e-9)
    with pytest.raises(ValueError, match=floor):
        max_steps(sample_rate=0.01, noise_multiplier=1.0, target_epsilon=6.0, delta=1e-12)
    assert 7.8 < compute_epsilon(sample_rate=0.064, noise_multiplier=1.0, steps=100, delta=accounting.MIN_DELTA) < 7.9


def test_max_steps_returns_only_steps_a_plan_with_its_delta_takes(monkeypatch):
    """h122 F1, stop 52: max_steps(sample_rate=0.01, noise_multiplier=1.0, target_epsilon=6.0, delta=1e-10) returned
    4189 steps, and PrivacyPlan refused them ("delta=1e-10 is below 4.189e-10 for 4189 steps"). It stops at the most
    steps the delta allows (1e-13 per step), exactly: where every step count fits, it returns that many."""
    assert max_steps(sample_rate=0.01, noise_multiplier=1.0, target_epsilon=6.0, delta=1e-10) == 1000
    monkeypatch.setattr(accounting.calibrate, "_certificate_epsilon", lambda event, delta, discretization: 0.0)
    for delta in (1e-10, 4.395e-10, 3e-9, 1e-7):
        t = max_steps(sample_rate=0.01, noise_multiplier=50.0, target_epsilon=10.0, delta=delta)
        plan = dict(dataset_size=10**6, batch_size=10**4, noise_multiplier=50.0, delta=delta)
        assert accounting.PrivacyPlan(steps=t, **plan).steps == t
        with pytest.raises(ValueError, match=f"is below .* for {t + 1} steps"):
            accounting.PrivacyPlan(steps=t + 1, **plan)
    assert max_steps(sample_rate=0.01, noise_multiplier=50.0, target_epsilon=10.0, delta=1e-6) == accounting.MAX_STEPS
    assert max_steps(sample_rate=0.01, noise_multiplier=50.0, target_epsilon=10.0, delta=1e-9, limit=64) == 64


def test_epsilon_decreases_with_noise_and_grows_with_steps():
    eps = [compute_epsilon(sample_rate=0.05, noise_multiplier=s, steps=200, delta=DELTA) for s in (0.8, 1.0, 2.0, 4.0)]
    assert eps == sorted(eps, reverse=True)
    eps = [compute_epsilon(sample_rate=0.05, noise_multiplier=1.0, steps=t, delta=DELTA) for t in (1, 10, 100, 1000)]
    assert eps == sorted(eps)
