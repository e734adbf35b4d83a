"""`dpdm audit` checks the training loop's own step: `dpdm.train.plan_private_grad` (audit walk F3, stop 40).

The mechanism checks called `distributed_private_grad` with arguments of their own, so a training loop that
passed the engine half its plan's noise multiplier, or reused one noise seed at every step, passed them all.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dpdm.train as train_mod
from audits.mechanism import check_engine
from audits.suite import training_private_grad


def _failed(results):
    return sorted(r.name for r in results if not r.passed)


def test_the_audited_step_is_the_loops_step(monkeypatch):
    real = train_mod.plan_private_grad

    def half_noise(D, loss_fn, batch, plan, **kw):
        plan = type("Plan", (), {"clip_norm": plan.clip_norm, "noise_multiplier": plan.noise_multiplier / 2,
                                 "batch_size": plan.batch_size})()
        return real(D, loss_fn, batch, plan, **kw)

    monkeypatch.setattr(train_mod, "plan_private_grad", half_noise)
    assert {"noise_variance", "noise_once_per_step"} <= set(_failed(check_engine(training_private_grad(), pairs=20)))


def test_noise_reused_across_steps_fails(monkeypatch):
    real = train_mod.step_seed
    monkeypatch.setattr(train_mod, "step_seed", lambda seed, step, stream: real(seed, 0, stream))
    assert {"noise_variance", "noise_once_per_step"} <= set(_failed(check_engine(training_private_grad(), pairs=20)))


def test_noise_that_ignores_the_run_seed_fails(monkeypatch):
    """h123 F1 (stop 52): a step whose noise seed ignores the run's secret seed draws the same noise in every run,
    which anyone with the code can regenerate and subtract; every check of `dpdm audit` passed it (they compare steps
    of one run seed). noise_keyed_by_run_seed compares one step of two runs: it fails such a step and passes the
    real one."""
    from audits.mechanism import check_run_seed

    assert [(r.name, r.passed) for r in check_run_seed(training_private_grad(vary="run_seed"), pairs=10)] == [
        ("noise_keyed_by_run_seed", True)]
    real_step_seed, real_grad = train_mod.step_seed, train_mod.plan_private_grad
    mutants = {   # the noise stream keyed by the step alone; the run seed replaced by a constant (h123's mut_seed.py)
        "step_seed": lambda seed, step, stream: real_step_seed(0 if stream == train_mod._STREAM_DP_NOISE else seed,
                                                               step, stream),
        "plan_private_grad": lambda D, loss_fn, batch, plan, *, seed, step, **kw: real_grad(
            D, loss_fn, batch, plan, seed=12345, step=step, **kw),
    }
    for name, mutant in mutants.items():
        with monkeypatch.context() as m:
            m.setattr(train_mod, name, mutant)
            for rules in (True, False):
                r, = check_run_seed(training_private_grad(per_layer_rules=rules, vary="run_seed"), pairs=10)
                assert not r.passed and r.statistic == 0.0, (name, rules, r.detail)


def test_every_run_has_both_engines_checked():
    """h123 F2 (stop 52): the audit checked the engine of the checkpoint's config, the last start's; a run started
    with the rules and resumed with --grad-engine vmap had its rules steps unchecked (and the reverse). The
    checkpoint records no earlier start's engine, so every run gets both, in the error budget too."""
    from audits.suite import run_grad_engines, statistical_check_count

    for rules in (True, False, None):
        assert run_grad_engines({"per_layer_rules": rules}) == ("rules", "vmap"), rules
        assert statistical_check_count({"per_layer_rules": rules}) == 13
        assert statistical_check_count({"per_layer_rules": rules, "subspace_dim": 3}) == 15


def test_train_loop_takes_each_steps_gradient_from_plan_private_grad(tmp_path, monkeypatch):
    import accounting
    from dpdm.train import TrainConfig, train

    n = 16
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1, 1, size=(n, 1, 8, 8)).astype(np.float32))
    y = torch.arange(n) % 2
    plan = accounting.PrivacyPlan(dataset_size=n, batch_size=4, steps=3, noise_multiplier=1.2, clip_norm=0.7,
                                  noise_multiplicity=2, delta=1e-5, dataset_name="tiny")
    calls = []
    real = train_mod.plan_private_grad
    monkeypatch.setattr(train_mod, "plan_private_grad",
                        lambda D, loss_fn, batch, p, **kw: calls.append((p, kw["seed"], kw["step"], batch[0]))
                        or real(D, loss_fn, batch, p, **kw))
    train(accounting.make_plan_document(plan), x, y, 2, tmp_path / "run",
          TrainConfig(model="small", checkpoint_every=3, log_every=1, seed=3), progress=False)
    assert [c[2] for c in calls] == [0, 1, 2] and all(c[1] == calls[0][1] for c in calls)
    assert all((c[0].noise_multiplier, c[0].clip_norm, c[0].batch_size) == (1.2, 0.7, 4) for c in calls)
    # Each step's images are the Poisson batch the accountant assumes: the plan's rate, the run's seed (a loop
    # sampling at twice the rate passed every test and the audit's checks of short runs; stop 46, h85).
    from dpdm.data import PoissonSampler

    sampler = PoissonSampler(n, plan.sample_rate, seed=3)
    for _, _, step, images in calls:
        assert torch.equal(images, x[sampler.batch(step)]), step
