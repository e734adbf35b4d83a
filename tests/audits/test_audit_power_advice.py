"""What an audit whose canaries cannot certify the claim advises (auditwalk F1, stop 56). The one-run bound's ceiling
does not grow without limit with the canaries: its 2*m*delta term makes it peak (near 900 canaries, about 4.3, at delta
1e-5 and the quick suite's per-attack level 0.02) and fall beyond. An INCONCLUSIVE of an eps-8 or eps-10 plan said
"use more canaries (--canaries)", and said it again after --canaries 1000 and 5000. Seconds: no training here
(tests/cli/test_audit_power_and_out.py runs the command)."""

import pytest

import accounting
from audits.canary import (ADVICE_COUNTS, MAX_CANARIES, MIN_CANARIES, canary_power, canary_verdict,
                           certifiable_curve, certifiable_epsilon, power_advice)
from dpdm.report_utils import epsilon_text

LEVEL = 0.02   # the quick suite's per-attack level at the default --significance 0.05


# The README's eps-10 plan (mnist, batch 256, 300 steps): its calibrated noise multiplier, given rather than calibrated
# again (seconds per plan); epsilon_spent(300) is 9.997, one step's 3.851.
README_SIGMA = 0.407670770355941


def _plan(sigma, *, n=60_000, batch=256, steps=300, delta=1e-5):
    return accounting.PrivacyPlan(dataset_size=n, batch_size=batch, steps=steps, noise_multiplier=sigma,
                                  noise_multiplicity=1, delta=delta)


def _reason(plan, m, steps):
    claim = accounting.epsilon_spent(plan, steps)
    power = canary_power(plan, m, steps, claim, level=LEVEL)
    verdict, [reason] = canary_verdict(0.1, 1.0, power["certifiable_epsilon"], claim, num_canaries=m,
                                       advice=power_advice(power))
    return verdict, reason, power


def test_the_most_any_count_certifies_peaks_and_falls():
    curve = dict(certifiable_curve(1e-5, LEVEL))
    best = max(curve, key=curve.get)
    assert best == 900 and 4.2 < curve[best] < 4.35, curve
    assert curve[200] < curve[best] and curve[1000] < curve[best]   # beyond the peak: less
    assert certifiable_epsilon(1500, 1e-5, LEVEL) < certifiable_epsilon(1200, 1e-5, LEVEL) < curve[1000]
    assert certifiable_epsilon(5000, 1e-5, LEVEL) < curve[best]
    assert ADVICE_COUNTS[0] == MIN_CANARIES and ADVICE_COUNTS[-1] == MAX_CANARIES


def test_no_more_canaries_where_no_count_certifies_the_claim():
    """The README's eps-10 plan: 200 canaries certify 3.28, and no count more than 4.29; one canary-run step (3.85)
    is below that with 900 canaries, which the reason names instead of more canaries. Likewise after --canaries 1000."""
    plan = _plan(README_SIGMA)
    verdict, reason, power = _reason(plan, 200, 300)
    assert verdict == "INCONCLUSIVE" and power["canaries_needed"] is None
    assert reason.startswith("with 200 canaries this audit cannot certify more than epsilon 3.284, so it cannot "
                             "detect a violation of the claim 9.997; no count of canaries dpdm tries (20 to 100,000) "
                             "can with an even split of the coins: at delta 1e-05"), reason
    assert "certifies at most 4.281 (--canaries 900; the other counts certify less)" in reason, reason
    assert "--steps 1 with --canaries 900, whose epsilon 3.851 is below that" in reason, reason
    assert "use more canaries" not in reason and "; more canaries can" not in reason
    _, reason, _ = _reason(plan, 1000, 300)   # 1,000 certify 4.275 > 3.851: one step at these canaries
    assert "no count of canaries dpdm tries" in reason
    assert "a shorter canary run can: --steps 1, whose epsilon 3.851" in reason, reason


def test_where_nothing_can_test_the_claim_it_says_so_and_what_still_does():
    """An eps-30 plan of 3 steps (sigma 0.3): even one step's epsilon is above what any count certifies."""
    plan = _plan(0.3, n=64, batch=16, steps=3)   # epsilon 30.3; one step 16.7
    _, reason, power = _reason(plan, 24, 3)
    assert power["shorter_steps"] is None and power["shorter_steps_at_best"] is None
    assert power["one_step_epsilon"] > power["best_certifiable_epsilon"]
    assert "no count of canaries dpdm tries" in reason and "nor can a shorter canary run: one step (--steps 1)" in reason
    assert reason.endswith("At this delta no canary audit can test this plan's claim; the mechanism checks still test "
                           "its step"), reason


def test_more_canaries_are_advised_only_where_they_can_help_and_how_many():
    plan = _plan(0.56)   # epsilon 3.677 over 300 steps
    _, reason, power = _reason(plan, 200, 300)
    assert power["canaries_needed"] == 400 and certifiable_epsilon(400, 1e-5, LEVEL) > power["claimed_epsilon"] > \
        certifiable_epsilon(300, 1e-5, LEVEL)
    assert "more canaries can: with --canaries 400 (an even split of the coins) a perfect attack could certify " \
           "3.903, more than the claim, and the most, 4.281, with --canaries 900" in reason, reason
    # A shorter run is advised only at a count of steps whose epsilon READS below the ceiling (3.285 vs 3.284 did not).
    steps = power["shorter_steps"]
    def reads(eps, **kw):
        return float(epsilon_text(eps, **kw))
    ceiling = reads(power["certifiable_epsilon"], bound="lower")
    assert reads(accounting.epsilon_spent(plan, steps)) < ceiling <= reads(accounting.epsilon_spent(plan, steps + 1))
    assert f"or a shorter canary run: --steps {steps} or fewer" in reason
    # delta 1e-4: the peak is near 100 canaries, and said so once.
    plan = _plan(1.26, n=64, batch=16, steps=3, delta=1e-4)   # epsilon 1.759 over 2 steps: 100 canaries certify 1.815
    _, reason, power = _reason(plan, 24, 2)
    assert power["best_canaries"] == power["canaries_needed"] == 100
    assert "more canaries can: with --canaries 100 (an even split of the coins) a perfect attack could certify " \
           "1.815, more than the claim" in reason and "the most" not in reason, reason


def test_past_the_peak_it_advises_fewer_canaries():
    """5,000 canaries certify 4.11, less than 900 do (4.28): a claim of 4.2 needs fewer, not more."""
    power = canary_power(_plan(README_SIGMA), 5000, 1, 4.2, level=LEVEL)
    reason = power_advice(power)
    assert power["canaries_needed"] == 700 and reason.startswith(
        "fewer canaries can: with --canaries 900 (an even split of the coins) a perfect attack could certify 4.281, "
        "more than the claim"), reason


def test_no_advice_where_the_audit_can_certify_the_claim_and_no_promise_without_one():
    plan = _plan(0.58)   # epsilon 3.272 over 300 steps, below the 3.284 of 200 canaries
    power = canary_power(plan, 200, 300, accounting.epsilon_spent(plan, 300), level=LEVEL)
    assert power_advice(power) is None
    verdict, [reason] = canary_verdict(0.5, 5.0, 2.0, 9.0, num_canaries=200)   # a library caller gives no advice
    assert verdict == "INCONCLUSIVE" and "use more canaries" not in reason and "only up to a point" in reason


def test_the_cli_repeats_the_canary_range():
    import cli.audit

    assert (cli.audit.MIN_CANARIES, cli.audit.MAX_CANARIES) == (MIN_CANARIES, MAX_CANARIES)


@pytest.mark.parametrize("m", [MIN_CANARIES, 200, 1000])
def test_the_curve_is_the_ceiling_of_fair_coins(m):
    from audits.auditor import max_one_run_epsilon

    assert certifiable_epsilon(m, 1e-5, LEVEL) == max_one_run_epsilon(m, delta=1e-5, significance=LEVEL,
                                                                      num_included=m // 2)
