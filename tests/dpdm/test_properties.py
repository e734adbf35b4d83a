"""Property tests (hypothesis): the clipped sum's sensitivity, whatever the batch, K, scale and chunking.

The accountant assumes that adding or removing one example moves the clipped gradient sum by at most the
clip norm C, with each example's gradient that of its K-averaged loss. These draw the batch size, the input
scale (from far below to far above C), K, C and the chunk size, and check the bound and the chunking
invariance on a network with the layers the engine has its own vmap rules for (conv2d, group_norm, silu).
"""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dpdm.engine import clipped_grad_sum, flatten_grads


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 3))


def _k_averaged_loss(model: nn.Module, x: torch.Tensor, noise: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One example's loss: the mean over its K noise draws (noise [1, K, 1, 5, 5])."""
    k = noise.shape[1]
    out = model(x.expand(k, -1, -1, -1) + noise[0])
    return nn.functional.cross_entropy(out, y.expand(k))


def _batch(n: int, k: int, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64) * scale
    noise = torch.randn(n, k, 1, 5, 5, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, 3, (n,), generator=g)
    return x, noise, y


@given(n=st.integers(0, 6), k=st.integers(1, 3), log_scale=st.floats(-3, 3), clip=st.floats(1e-3, 10.0),
       seed=st.integers(0, 2**31 - 1), chunk=st.one_of(st.none(), st.integers(1, 7)))
def test_one_example_moves_the_clipped_sum_by_at_most_the_clip_norm(n, k, log_scale, clip, seed, chunk):
    model = _model(seed % 1000).double()
    x, noise, y = _batch(n + 1, k, 10.0 ** log_scale, seed)
    with_it = flatten_grads(clipped_grad_sum(model, _k_averaged_loss, x, noise, y, clip_norm=clip, chunk_size=chunk))
    without = flatten_grads(clipped_grad_sum(model, _k_averaged_loss, x[:n], noise[:n], y[:n], clip_norm=clip,
                                             chunk_size=chunk))
    assert float((with_it - without).norm()) <= clip * (1 + 1e-9)
    # Chunking is a memory knob only.
    whole = flatten_grads(clipped_grad_sum(model, _k_averaged_loss, x, noise, y, clip_norm=clip))
    torch.testing.assert_close(with_it, whole, rtol=1e-9, atol=1e-12)


@given(k=st.integers(1, 3), log_scale=st.floats(-3, 3), clip=st.floats(1e-3, 10.0), seed=st.integers(0, 2**31 - 1))
def test_each_example_is_clipped_as_a_whole_over_its_k_draws(k, log_scale, clip, seed):
    """One example's contribution is min(1, C / ||g||) g for g the gradient of its K-averaged loss (not the
    mean of K separately clipped gradients)."""
    model = _model(seed % 1000).double()
    x, noise, y = _batch(1, k, 10.0 ** log_scale, seed)
    got = flatten_grads(clipped_grad_sum(model, _k_averaged_loss, x, noise, y, clip_norm=clip))
    model.zero_grad()
    _k_averaged_loss(model, x, noise, y).backward()
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    want = g * min(1.0, clip / (float(g.norm()) + 1e-6))
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-12)
