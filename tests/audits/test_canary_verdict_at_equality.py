"""mut44 (V1): a one-run epsilon lower bound EQUAL to the claim is no violation (FAIL needs it to exceed the
claim, canary_verdict's docstring and audits.md 5.4); test_verdict_rule only tried 3.1 against 3.0."""
from audits.canary import canary_verdict


def test_a_lower_bound_equal_to_the_claim_is_not_a_fail():
    verdict, reasons = canary_verdict(2.0, 5.0, 4.0, 2.0, num_canaries=200)
    assert verdict == "PASS", reasons
    assert canary_verdict(2.0000001, 5.0, 4.0, 2.0, num_canaries=200)[0] == "FAIL"


def test_a_ceiling_equal_to_the_claim_is_inconclusive_whatever_the_control():
    """(V2) test_verdict_rule's ceiling == claim case had control == claim too, so the control rule gave
    INCONCLUSIVE even with the ceiling rule made strict. With a control far above the claim only the ceiling
    rule can say INCONCLUSIVE: a perfect attack could certify only the claim itself, never more."""
    verdict, reasons = canary_verdict(0.5, 5.0, 2.0, 2.0, num_canaries=200)
    assert verdict == "INCONCLUSIVE" and "cannot certify more than epsilon 2" in reasons[0], reasons
