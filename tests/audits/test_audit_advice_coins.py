"""The advice of an INCONCLUSIVE audit (``canary_power`` / ``power_advice``) must be advice a user can follow: an audit
run as it says (--canaries N --steps S, the same --seed) must be able to certify more than its canary run's epsilon.
The one-run bound of a real audit depends on its coins' in-count, not on fair coins' m // 2: with 900 canaries only an
exact 450/450 split reaches the peak 4.28 (delta 1e-5); seed 0 includes 432 and certifies at most 4.04, and the
advised "--steps 80 or fewer with --canaries 900" ended INCONCLUSIVE again (review r2 F1, F2, N1, N2, stop 56)."""

import pytest

import accounting
from audits.canary import (ADVICE_COUNTS, MAX_CANARIES, canary_power, certifiable_curve, certifiable_epsilon,
                           coins_ceiling, draw_inclusion, power_advice)

LEVEL = 0.05 * 0.8 / 2   # the quick and full suites' per-attack level at the default --significance (run_audit)
# `dpdm plan --eps 10 --delta 1e-5` on mnist5k, audited by the quick suite (200 canaries, 300 steps).
EPS10 = dict(dataset_size=4000, batch_size=256, steps=469, noise_multiplier=0.9782477829779281, noise_multiplicity=32)


def _ceiling(m, delta, seed=0):
    """What an audit with m canaries and this --seed can certify at most (as run_audit computes it)."""
    return certifiable_epsilon(m, delta, LEVEL, int(draw_inclusion(m, seed).sum()))


def _power(plan, m, steps, seed=0):
    """canary_power as run_audit calls it: this audit's ceiling and its --seed."""
    claim = accounting.epsilon_spent(plan, min(steps, plan.steps))
    return canary_power(plan, m, steps, claim, level=LEVEL, ceiling=_ceiling(m, plan.delta, seed), seed=seed)


def _follow(plan, power, seed):
    """Every (--canaries, --steps) the advice names, each audited as run_audit would with the same --seed: its
    canary run's epsilon must be below what its coins let a perfect attack certify, and it must give no advice."""
    advice = power_advice(power)
    runs = []
    if power["canaries_advised"] is not None:
        runs.append((power["canaries_advised"], power["steps"]))
    if power["shorter_steps_at_best"] is not None:
        runs.append((power["best_canaries"], power["shorter_steps_at_best"]))
    if power["shorter_steps"] is not None:
        runs.append((power["num_canaries"], power["shorter_steps"]))
    for m, steps in runs:
        assert f"--canaries {m}" in advice or m == power["num_canaries"], advice
        eps = accounting.epsilon_spent(plan, steps)
        assert eps < _ceiling(m, plan.delta, seed), (
            f"advised --canaries {m} --steps {steps} --seed {seed}: epsilon {eps:.4f}, but its coins certify at most "
            f"{_ceiling(m, plan.delta, seed):.4f}: {advice}")
        assert power_advice(_power(plan, m, steps, seed)) is None
    return runs, advice


@pytest.mark.parametrize("seed", [0, 1])
def test_the_shorter_run_with_other_canaries_it_advises_can_certify_its_epsilon(seed):
    plan = accounting.PrivacyPlan(**EPS10, delta=1e-5)
    power = _power(plan, 200, 300, seed)
    runs, advice = _follow(plan, power, seed)
    m, steps = power["best_canaries"], power["shorter_steps_at_best"]
    assert steps is not None and (m, steps) in runs and f"--steps {steps} or fewer with --canaries {m}" in advice
    assert "other coins" not in advice, advice   # nearly always false: no seed was checked


def test_more_canaries_it_advises_certify_the_claim_with_this_seeds_coins():
    # claim 4.0 at delta 1e-5: fair coins' 700 would certify 4.25, seed 0's 700 certify 4.03 and its 900 only 4.04;
    # the advised count is one whose own coins certify more than 4.0.
    plan = accounting.PrivacyPlan(**EPS10, delta=1e-5)
    power = canary_power(plan, 200, 300, 4.0, level=LEVEL, ceiling=_ceiling(200, 1e-5), seed=0)
    advice = power_advice(power)
    c = power["canaries_advised"]
    assert advice.startswith(f"more canaries can: with --canaries {c} (the coins of --seed 0) a perfect attack could "
                             f"certify"), advice
    assert _ceiling(c, 1e-5) == power["canaries_advised_epsilon"] > 4.0


def test_a_count_below_this_audits_is_not_called_more_canaries():
    # 100,000 canaries (past the peak), a plan whose one step (epsilon 4.08) is above what they certify but below
    # the curve's peak: the advice names a count that is fewer, not more (r2 F2).
    plan = accounting.PrivacyPlan(dataset_size=1000, batch_size=500, steps=50, noise_multiplier=0.9,
                                  noise_multiplicity=1, delta=1e-5)
    power = _power(plan, 100_000, 50)
    advice = power_advice(power)
    assert power["best_canaries"] < power["num_canaries"]
    assert "with more canaries" not in advice and "with fewer canaries can: --steps 1 with --canaries" in advice, \
        advice
    _follow(plan, power, 0)


def test_where_the_bound_still_rises_at_the_last_count_it_does_not_say_more_certify_less():
    # delta 1e-8: the ceiling still rises at 100,000 canaries, the most --canaries takes (r2 N1).
    plan = accounting.PrivacyPlan(**EPS10, delta=1e-8)
    power = _power(plan, 200, 300)
    advice = power_advice(power)
    assert power["best_canaries"] == MAX_CANARIES == ADVICE_COUNTS[-1]
    assert "certify less" not in advice and "(--canaries 100000, the most --canaries takes" in advice, advice


def test_where_every_count_certifies_nothing_it_says_so_shortly():
    # delta 1e-3: 2*m*delta passes the per-attack level at every count; no count, no peak to name (r2 N2).
    plan = accounting.PrivacyPlan(**EPS10, delta=1e-3)
    power = _power(plan, 200, 300)
    advice = power_advice(power)
    assert power["best_certifiable_epsilon"] == 0 and power["shorter_steps_at_best"] is None
    assert advice.startswith("no number of canaries can: at delta 0.001 and this error budget the one-run bound "
                             "certifies nothing"), advice
    assert "--canaries" not in advice and "certify less" not in advice and "about" not in advice, advice


def test_the_curve_stops_only_where_no_later_count_certifies_more():
    # The seed's curve is jagged (seed 0: 4.04 at 900, 4.11 at 2,000); wherever it stops, every later count (fair
    # coins' even split bounds them) certifies less than its best.
    for seed in (0, 3):
        curve = certifiable_curve(1e-5, LEVEL, seed)
        best = max(eps for _, eps in curve)
        assert [c for c, _ in curve] == list(ADVICE_COUNTS[:len(curve)])
        for c in ADVICE_COUNTS[len(curve):len(curve) + 2]:
            assert coins_ceiling(c, 1e-5, LEVEL, seed) <= certifiable_epsilon(c, 1e-5, LEVEL) <= best
        assert dict(curve)[900] == _ceiling(900, 1e-5, seed)


def test_the_power_names_the_canary_runs_own_steps():
    # report.json's power "steps" is the canary run's (--steps, the quick suite's 300), not the plan's 469.
    plan = accounting.PrivacyPlan(**EPS10, delta=1e-5)
    assert _power(plan, 200, 300)["steps"] == 300
    assert _power(plan, 200, 1000)["steps"] == 469   # at most the plan's


def test_more_canaries_names_a_count_above_this_audits():
    # Without a seed (fair coins' even split for every count) and this audit's own ceiling (seed 0: 101 of 200 in,
    # 3.12): fair coins' 200 would certify 3.28 > the claim 3.2, but the count named is 300, not this audit's 200.
    plan = accounting.PrivacyPlan(**EPS10, delta=1e-5)
    power = canary_power(plan, 200, 300, 3.2, level=LEVEL, ceiling=_ceiling(200, 1e-5))
    advice = power_advice(power)
    assert power["canaries_needed"] == 200 and "--canaries 200 " not in advice, advice
    assert "more canaries can: with --canaries 300 (an even split of the coins)" in advice, advice
