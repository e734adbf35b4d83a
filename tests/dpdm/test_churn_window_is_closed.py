"""The churn window is closed at both ends (mut48, stop 47: mutant SM3 passed every test)."""
from __future__ import annotations

import pytest
import torch

from dpdm.sampling import get_sigmas_karras, sample_churn


class GaussD:
    num_classes, img_channels, img_resolution = 0, 1, 4

    def __call__(self, x, sigma, class_labels=None):
        sigma = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        return 0.1 + 0.25 / (0.25 + sigma**2) * (x - 0.1)


def test_churn_window_includes_both_of_its_ends():
    """Algorithm 2 (and DPDM's edm_sampler) churns for S_min <= sigma_i <= S_max: a level equal to an end of the
    window churns. An open window (S_min < sigma < S_max) passed every test: none had a level on an end."""
    sigmas = get_sigmas_karras(4)   # 80, 9.72, 0.47, 0.002, 0 (float64, compared as the loop compares them)
    levels = sigmas.tolist()
    seen = []
    sample_churn(GaussD(), torch.randn(2, 1, 4, 4, dtype=torch.float64) * 80, sigmas, S_churn=2.0,
                 S_min=levels[2], S_max=levels[1], randn_like=torch.zeros_like,
                 callback=lambda d: seen.append(float(d["sigma_hat"] / d["sigma"])))
    assert seen == pytest.approx([1.0, 1.5, 1.5, 1.0], rel=1e-12)   # gamma = min(2 / 4, 1) at both ends

