"""mut58 (stop 55): `audits.mechanism.check_noise_never_repeats` (r2 F2, stop 54), pinned where the existing tests
left a mutant alive: the steps it draws (every one of 0 to steps - 1 and each 2**k up to 2**powers, the last
included) and its failing on a step whose noise is not finite."""

from __future__ import annotations

import math

import torch

from audits.mechanism import REPEAT_POWERS, REPEAT_STEPS, check_noise_never_repeats
from audits.suite import training_private_grad


def _recording(steps_seen: list):
    base = training_private_grad(vary="consecutive")

    def fn(model, loss_fn, *batch, generator, **kw):
        steps_seen.append(int(generator.initial_seed()))
        return base(model, loss_fn, *batch, generator=generator, **kw)
    return fn


def test_noise_never_repeats_draws_every_step_below_steps_and_each_power_of_two_up_to_powers():
    for steps, powers in ((8, 3), (8, 5), (5, 4), (1, 2)):
        seen: list[int] = []
        found = check_noise_never_repeats(_recording(seen), steps=steps, powers=powers)[0]
        want = sorted(set(range(steps)) | {2**k for k in range(powers + 1)})
        assert sorted(seen) == want and len(seen) == len(want), (steps, powers, seen)
        assert found.passed and found.statistic == 0 and found.p_value is None, found
    seen = []
    found = check_noise_never_repeats(_recording(seen))[0]   # what `mechanism_checks` runs
    assert sorted(seen) == sorted(set(range(REPEAT_STEPS)) | {2**k for k in range(REPEAT_POWERS + 1)}), seen[-3:]
    assert max(seen) == 2**62 and len(seen) == 2048 + 52, (max(seen), len(seen))
    assert found.passed and "0 to 2047 and 2**k for k = 11 to 62" in found.detail, found.detail


def test_a_step_whose_noise_is_not_finite_fails_noise_never_repeats_naming_it():
    """Noise with one non-finite value at one step (an overflow at a large step) repeats no other step's, yet the
    step is no Gaussian draw: FAIL, naming the step, for inf and nan alike."""
    base = training_private_grad(vary="consecutive")
    for bad_value in (math.inf, math.nan):
        def fn(model, loss_fn, *batch, generator, bad_value=bad_value, **kw):
            out = base(model, loss_fn, *batch, generator=generator, **kw)
            if int(generator.initial_seed()) == 5:
                key = next(iter(out))
                flat = out[key].clone().reshape(-1)
                flat[0] = bad_value
                out = {**out, key: flat.reshape(out[key].shape)}
            return out

        found = check_noise_never_repeats(fn, steps=8, powers=3)[0]
        assert not found.passed and found.p_value is None, found
        assert "step 5's noise is not finite" in found.detail, found.detail


def test_one_step_that_draws_an_earlier_steps_noise_fails_noise_never_repeats():
    """One repeat is a FAIL (a period of 2047 repeats a single pair among steps 0 to 2047): the statistic counts
    it, 1, and the detail names it."""
    base = training_private_grad(vary="consecutive")

    def fn(model, loss_fn, *batch, generator, **kw):
        s = int(generator.initial_seed())
        return base(model, loss_fn, *batch, generator=torch.Generator().manual_seed(3 if s == 7 else s), **kw)

    found = check_noise_never_repeats(fn, steps=8, powers=3)[0]
    assert not found.passed and found.statistic == 1.0, found
    assert "1 step drew the noise of an earlier step or its negative (the first: step 7 drew the noise of step 3)" \
        in found.detail, found.detail
