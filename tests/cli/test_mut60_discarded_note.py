"""Kill test of mut60 (stop 56) for 80d1699's `cli._common.discarded_note`: nothing is said where no step was
discarded (mut60 c3: " (0 of them discarded: ...)" on every line of export and sample)."""
from cli._common import discarded_note


def test_no_discarded_step_no_clause():
    assert discarded_note({"steps_done": 4, "plan_steps": 4}) == ""
    assert discarded_note({"steps_done": 4, "plan_steps": 4, "discarded_steps": 0}) == ""
    assert discarded_note({"steps_done": 4, "discarded_steps": 1}) == \
        " (1 of them discarded: the weights hold the updates of 3)"
