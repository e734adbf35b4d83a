"""The mechanism checks on the run's own network in float32 (audit walk F2, stop 42).

`dpdm audit` checked the training step on a float64 Linear/SiLU model only, so a bug in the float32 code of the
engine (every private run trains in float32) or in a per-layer rule of the run's layers (Conv2d, GroupNorm,
attention) passed it. `check_network` runs the step on the run's network in float32: these tests break
`dpdm.engine` the ways the walk did (float32 noise halved, float32 clipping skipped, a Conv2d rule that leaks
one example's gradient into another's) and check that the network checks fail, and that the real step passes.
Each test runs only the checks it is about (`only`), on the 'small' network at 8x8, to stay at a few seconds.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dpdm.engine as engine
from audits.mechanism import (NETWORK_CHECKS, NETWORK_CLIP_TOL, NETWORK_GRAD_TOL, check_network, network_problem)
from audits.suite import training_private_grad

CONFIG = {"model": "small", "precond": "edm", "sigma_data": 3 ** -0.5, "img_resolution": 8, "img_channels": 1,
          "num_classes": 10, "train": {"label_dropout": 0.1}}
SIGMA = 1.27   # not 1: a noise scale right only at sigma 1 must show


@pytest.fixture(scope="module")
def net():
    return network_problem(CONFIG)


def _run(net, *names, rules=True):
    results = check_network(training_private_grad(per_layer_rules=rules), net, noise_multiplier=SIGMA, alpha=0.002,
                            only=names)
    assert [r.name for r in results] == list(names)
    return {r.name: r for r in results}


def test_the_network_is_the_runs_in_float32_with_clip_norm_inside_the_gradient_norms(net):
    p = net.problem
    assert all(t.dtype == torch.float32 for t in p.model.parameters())
    kinds = {type(m).__name__ for m in p.model.modules()}
    assert {"Conv2d", "GroupNorm", "AttnBlock", "Linear"} <= kinds, kinds
    x, y, sigma, noise = p.batch
    assert x.shape == (4, 1, 8, 8) and -1 <= x.min() and x.max() <= 1 and x.dtype == torch.float32
    assert y.max() == 10   # the run drops labels: the null class is among them
    assert noise.shape == (4, 2, 1, 8, 8)
    norms = np.array([np.linalg.norm(g) for g in net.reference])
    assert net.reference[0].dtype == np.float64
    assert len(net.reference[0]) == sum(t.numel() for t in p.model.parameters())
    assert norms.min() < p.clip_norm < norms.max()   # some examples are clipped, one is not
    assert "'small' network" in net.description and "float32" in net.description and "Conv2d" in net.description
    again = network_problem(CONFIG)   # deterministic in the seed, another seed is another draw
    assert again.problem.clip_norm == p.clip_norm and torch.equal(again.problem.batch[0], x)
    assert not torch.equal(network_problem(CONFIG, seed=1).problem.batch[0], x)


def test_a_v_run_without_labels_and_with_frozen_layers_gets_its_own_loss_and_trained_subset():
    cfg = {**CONFIG, "precond": "v", "num_classes": 0,
           "train": {"trainable": ["net.dec.*"], "train_sigma": [0.05, 20.0]}}
    net = network_problem(cfg, num_examples=3)
    p = net.problem
    assert len(p.batch) == 3   # x, sigma, noise: no labels
    trained = [n for n, t in p.model.named_parameters() if t.requires_grad]
    assert trained and all(n.startswith("net.dec.") for n in trained)
    assert len(net.reference[0]) == sum(t.numel() for t in p.model.parameters() if t.requires_grad)
    sigma = p.batch[1]
    assert 0.05 <= float(sigma.min()) and float(sigma.max()) <= 20.0   # VLoss over the run's --train-sigma
    assert type(p.model).__name__ == "VPrecond"


@pytest.mark.parametrize("name", NETWORK_CHECKS)
def test_the_training_step_passes_each_network_check(net, name):
    r = _run(net, name)[name]
    assert r.passed, r.detail
    if name == "network_per_sample_gradients":
        assert r.statistic < NETWORK_GRAD_TOL / 10
    if name == "network_clipping_bound":
        assert r.statistic <= 1.0   # the engine's 8-ulp margin keeps it below C, not just within the tolerance
    if name == "network_noise_variance":
        assert 0.98 < r.statistic < 1.02 and "same generator seed twice: largest difference 0" in r.detail


def test_the_vmap_engine_passes_the_replays(net):
    found = _run(net, "network_per_sample_gradients", "network_clipping_bound", "network_sensitivity_replay",
                 rules=False)
    assert all(r.passed for r in found.values()), [r.detail for r in found.values()]


def test_float32_noise_halved_fails_both_noise_checks(net, monkeypatch):
    real = engine._standard_normal
    monkeypatch.setattr(engine, "_standard_normal",
                        lambda like, gen: real(like, gen) * (0.5 if like.dtype == torch.float32 else 1.0))
    found = _run(net, "network_noise_variance", "network_noise_once_per_step", rules=False)
    for r in found.values():
        assert not r.passed and r.p_value < 1e-6 and abs(r.statistic - 0.25) < 0.01, r.detail


def test_float32_clipping_skipped_fails_the_clipping_checks(net, monkeypatch):
    real = engine._clip_factors
    monkeypatch.setattr(engine, "_clip_factors", lambda norms, clip_norm, dtype: (
        torch.ones_like(norms) if dtype == torch.float32 else real(norms, clip_norm, dtype)))
    found = _run(net, "network_per_sample_gradients", "network_clipping_bound", "network_sensitivity_replay",
                 rules=False)
    assert not any(r.passed for r in found.values()), [r.detail for r in found.values()]
    assert found["network_clipping_bound"].statistic > 1 + 100 * NETWORK_CLIP_TOL


def _leaky_conv_rule(monkeypatch):
    real = engine._conv_param_grads

    def leaky(go, x, w, conf, bias):   # half of example i-1's conv gradient lands in example i's
        gw, gb = real(go, x, w, conf, bias)
        return gw + 0.5 * torch.roll(gw, 1, 0), (None if gb is None else gb + 0.5 * torch.roll(gb, 1, 0))

    monkeypatch.setattr(engine, "_conv_param_grads", leaky)


def test_a_conv2d_rule_that_mixes_examples_fails_the_gradient_replay(net, monkeypatch):
    _leaky_conv_rule(monkeypatch)
    r = _run(net, "network_per_sample_gradients")["network_per_sample_gradients"]
    assert not r.passed and r.statistic > 100 * NETWORK_GRAD_TOL, r.detail


def test_a_conv2d_rule_that_mixes_examples_fails_the_sensitivity_replay(net, monkeypatch):
    _leaky_conv_rule(monkeypatch)
    r = _run(net, "network_sensitivity_replay")["network_sensitivity_replay"]
    assert not r.passed and r.statistic > 1.01, r.detail   # one example moves the step by more than C


def test_a_crashing_step_fails_every_network_check_and_unknown_names_are_refused(net):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    results = check_network(broken, net)
    assert [r.name for r in results] == list(NETWORK_CHECKS)
    assert all(not r.passed and "boom" in r.detail for r in results)
    with pytest.raises(ValueError, match="no check named"):
        check_network(broken, net, only=("network_typo",))
