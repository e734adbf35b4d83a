"""mut59 (stop 55): the engine's gradients are the parameters' alone (h154 N5). The existing test gives the batch
requires_grad=True, which the batch's own detach covers; a tensor that requires grad which the loss_fn captures
(a learnable weighting, a model's other part) left an autograd graph on the gradients unless they are detached too."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dpdm import engine
from dpdm.engine import clipped_grad_sum, per_sample_grads, private_grad


@pytest.mark.parametrize("rules", [True, False])
def test_a_tensor_the_loss_fn_captures_leaves_no_graph_on_the_gradients(rules):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    weight = torch.tensor([0.5, 2.0], requires_grad=True)   # not a parameter of the model

    def loss_fn(m, x):
        return (m(x) * weight).pow(2).sum()

    x = torch.randn(5, 4)
    kw = dict(per_layer_rules=rules)
    outs = [per_sample_grads(model, loss_fn, x, **kw), clipped_grad_sum(model, loss_fn, x, clip_norm=0.5, **kw),
            private_grad(model, loss_fn, x, clip_norm=0.5, noise_multiplier=1.0, expected_batch_size=5,
                         generator=engine.noise_generator(1), **kw)]
    for out in outs:
        assert all(not g.requires_grad and g.grad_fn is None for g in out.values()), \
            {k: g.grad_fn for k, g in out.items()}
    assert weight.grad is None
