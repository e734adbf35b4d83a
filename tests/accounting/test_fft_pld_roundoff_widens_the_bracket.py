"""mut44 (FFT4): the round-off bound `err` must widen the bracket, never narrow it: the pessimistic side
meets delta - err, the optimistic side delta + err. At the deltas a plan may use, err is 1e-4 of delta or
less and the side it is applied on changes epsilon by less than the bracket's width, so no bracket test sees
it. Here the bound is inflated (still under the 0.1 * delta at which the accountant gives up)."""
import pytest

import accounting.fft_pld as fft_pld
from accounting.accountants import dpsgd_event
from accounting.fft_pld import FftPldAccountant


def test_a_larger_roundoff_bound_only_widens_the_bracket(monkeypatch):
    event, delta = dpsgd_event(0.064, 1.0, 50), 1e-5
    acc = FftPldAccountant(discretization=1e-3)
    base = acc.epsilon(event, delta)
    # 50 steps: 5 products in the self-composition (and 0 between terms); each adds 2e-9; squaring doubles what is carried, some 1e-7 in all.
    monkeypatch.setattr(fft_pld, "_fft_roundoff", lambda a, b: 2e-9)
    wide = acc.epsilon(event, delta)
    assert wide.upper > base.upper + 1e-4, (base, wide)
    assert wide.lower < base.lower - 1e-4, (base, wide)
