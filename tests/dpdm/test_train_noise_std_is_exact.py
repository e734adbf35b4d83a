"""The training step's noise is exactly N(0, (sigma C)^2) from the step's own seed, over the plan's expected batch
(stop 43, mutants N1e/N1f: std * 0.995 in add_noise or in plan_private_grad). The statistical checks of
test_mechanism and test_engine see a 10% change in std, not 0.5%; the noise is a pure function of
(seed, step), so its scale can be pinned exactly by replaying the draws."""
from __future__ import annotations

import torch
from torch import nn

import accounting
from dpdm import engine
from dpdm.engine import clipped_grad_sum
from dpdm.train import _STREAM_DP_NOISE, plan_private_grad, step_seed


def test_plan_private_grad_noise_is_sigma_C_z_over_B():
    torch.manual_seed(0)
    D = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()

    def loss_fn(model, x, y):
        return (model(x) - y).pow(2).sum()

    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=5, noise_multiplier=1.3, clip_norm=0.5,
                                  noise_multiplicity=2, delta=1e-5, dataset_name="tiny")
    seed, step = 3, 2
    for chunk in (None, 3):                           # a physical batch must not change the noise either
        got = plan_private_grad(D, loss_fn, [x, y], plan, seed=seed, step=step, chunk_size=chunk)
        clean = clipped_grad_sum(D, loss_fn, x, y, clip_norm=plan.clip_norm)
        gen = engine.noise_generator(step_seed(seed, step, _STREAM_DP_NOISE))
        for name, g in clean.items():                 # add_noise draws in the gradient dict's order
            z = engine._standard_normal(g, gen)
            want = (g + plan.noise_multiplier * plan.clip_norm * z) / plan.batch_size
            assert torch.allclose(got[name], want, rtol=1e-9, atol=1e-12), (chunk, name)
