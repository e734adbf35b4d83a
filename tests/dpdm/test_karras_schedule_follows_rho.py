"""get_sigmas_karras's interior levels follow Eq. 5 for the rho given, not only EDM's 7 (stop 45, mut45 SK1b).

Every existing schedule test checks the interior at rho = 7 (the default) and other rhos only at the two ends,
so a schedule that ignored `rho` between its ends (`dpdm sample --rho 3` sampling EDM's rho-7 levels, recorded
as rho 3) passed them all."""
import pytest

from dpdm.sampling import get_sigmas_karras


@pytest.mark.parametrize("rho", [1.0, 3.0, 7.0, 20.0])
@pytest.mark.parametrize("n, lo, hi", [(10, 0.002, 80.0), (5, 0.1, 10.0)])
def test_every_level_follows_equation_5_for_the_given_rho(rho, n, lo, hi):
    s = get_sigmas_karras(n, sigma_min=lo, sigma_max=hi, rho=rho)
    expected = [(hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)]
    assert s[:-1].tolist() == pytest.approx(expected, rel=1e-12) and float(s[-1]) == 0.0


def test_rho_1_is_a_linear_ramp():
    assert get_sigmas_karras(5, sigma_min=1.0, sigma_max=9.0, rho=1.0).tolist() == pytest.approx([9, 7, 5, 3, 1, 0])
