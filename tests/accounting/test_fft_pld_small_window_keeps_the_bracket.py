"""mut44 (FFT2, FFT3): the truncation to the window must move mass in the safe direction on each side.
The default window (2 * RDP epsilon + 10) puts so little mass outside that dropping it changes nothing
measurable; a small explicit window (a public parameter) makes the truncation matter. Whatever the window,
the bracket must hold the exact epsilon of the Gaussian mechanism (q = 1: mu = sqrt(T) / sigma)."""
import math

import pytest
from scipy import optimize, stats

from accounting.accountants import dpsgd_event
from accounting.fft_pld import FftPldAccountant


def exact_gaussian_epsilon(mu, delta):
    def excess(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta
    return optimize.brentq(excess, 0.0, 100.0, xtol=1e-12)


@pytest.mark.parametrize("window", [2.0, 3.0, 4.0, 6.0])
@pytest.mark.parametrize("sigma,steps", [(1.0, 1), (2.0, 4)])
def test_bracket_holds_whatever_the_window(window, sigma, steps):
    delta = 1e-5
    exact = exact_gaussian_epsilon(math.sqrt(steps) / sigma, delta)
    r = FftPldAccountant(discretization=1e-3, window=window).epsilon(dpsgd_event(1.0, sigma, steps), delta)
    assert r.lower <= exact + 1e-9, (window, r, exact)
    assert r.upper >= exact - 1e-9, (window, r, exact)
