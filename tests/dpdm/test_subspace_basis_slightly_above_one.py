"""A basis of spectral norm just above 1 is rescaled too (stop 43, mutant SS1: rescaled only above 1.5).

test_subspace's sensitivity test uses a basis of norm 3, far from any threshold; a basis of norm 1.2, unrescaled,
moves the projected sum by 1.44 C, which breaks the mechanism's sensitivity C."""
from __future__ import annotations

import pytest
import torch

from dpdm.engine import add_noise_in_subspace


@pytest.mark.parametrize("scale", [1.001, 1.2, 1.49])
def test_projected_sum_moves_by_at_most_C_for_a_basis_slightly_above_norm_one(scale):
    g = torch.Generator().manual_seed(0)
    d, k, C = 50, 3, 0.7
    Q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    V = scale * Q                                     # spectral norm `scale`
    added = {"w": (C * Q[:, 0]).reshape(5, 10).float()}   # an example's clipped gradient, norm C, along V's column
    out = add_noise_in_subspace(added, V, noise_multiplier=0.0, clip_norm=C, expected_batch_size=1.0)["w"]
    moved = float(out.double().norm())
    assert moved <= C * (1 + 1e-5), (scale, moved / C)
    assert moved >= C * (1 - 1e-5)                    # rescaled by its norm, not shrunk further
