"""Copies of one run folder resumed with different learning rates (stop 44, h72 F3).

A copy of a run folder is the same run: it holds the run's secret seed, and every step's batch and noise derive
from it. Two copies resumed with different --lr drew the same Poisson batches and the same DP noise at different
weights, so the difference of their noisy gradients was noise-free. From an lr change on, a step's randomness now
derives from the seed mixed with the run's lr segments (`dpdm.train.run_seed_at`); a run whose lr never changed
draws exactly what it drew before, and a resume replays exactly.
"""
from __future__ import annotations

import shutil

import pytest
import torch

import accounting
import dpdm.train as T
from dpdm import checkpoint as ckpt
from dpdm import engine
from dpdm.data import PoissonSampler
from dpdm.loss import drop_labels
from dpdm.train import (_STREAM_DIFFUSION, _STREAM_DP_NOISE, CHECKPOINT_NAME, TrainConfig, _generator, step_seed,
                        train, training_loss)

SEED = 3
CFG = dict(model="small", checkpoint_every=2, log_every=1, seed=SEED)


def tiny_data(n=24, classes=3, res=8):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, res, res, generator=g) * 2 - 1, torch.arange(n) % classes, classes


def tiny_plan(steps=6):
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=steps, noise_multiplier=1.0, clip_norm=1.0,
                                  noise_multiplicity=2, delta=1e-5, dataset_name="tiny")
    return accounting.make_plan_document(plan)


class Stop(Exception):
    pass


def stop_at(n):
    def callback(steps_done):
        if steps_done == n:
            raise Stop
    return callback


def state_of(run):
    return ckpt.load_checkpoint(run / CHECKPOINT_NAME)


def assert_same_run(a, b):
    sa, sb = state_of(a), state_of(b)
    for key in ("model", "ema"):
        assert all(torch.equal(sa[key][k], sb[key][k]) for k in sa[key]), key
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i]), "optimizer"
    assert sa["ledger"] == sb["ledger"]


@pytest.fixture
def spied(monkeypatch):
    """Each private step the loop takes: its inputs (images, labels, sigma, noise) and its noise seed."""
    calls = []
    real = T.distributed_private_grad

    def spy(D, loss_fn, *batch, **kw):
        calls.append(([t.detach().clone() for t in batch], kw["noise_seed"]))
        return real(D, loss_fn, *batch, **kw)

    monkeypatch.setattr(T, "distributed_private_grad", spy)
    return calls


def dp_noise(noise_seed, like):
    """The DP noise a step with this noise seed adds to a gradient sum shaped as `like` (a state dict)."""
    zeros = {k: torch.zeros_like(v) for k, v in like.items()}
    drawn = engine.add_noise(zeros, noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=1.0,
                             generator=engine.noise_generator(noise_seed))
    return torch.cat([v.flatten() for v in drawn.values()])


def test_a_run_whose_lr_never_changed_draws_the_seeds_it_always_drew(tmp_path, spied):
    """No lr change: each step's batch, diffusion draws and DP noise come from step_seed(seed, step, stream) of the
    run's own seed, as before the fix (every existing run, checkpoint and test is unchanged)."""
    x, y, c = tiny_data()
    doc = tiny_plan(steps=4)
    train(doc, x, y, c, tmp_path / "run", TrainConfig(**CFG), progress=False)
    assert len(spied) == 4
    sampler, loss = PoissonSampler(24, doc.plan.sample_rate, seed=SEED), training_loss("edm", None, 3 ** -0.5)
    for step, (batch, noise_seed) in enumerate(spied):
        assert noise_seed == step_seed(SEED, step, _STREAM_DP_NOISE)
        idx = sampler.batch(step)
        g = _generator(step_seed(SEED, step, _STREAM_DIFFUSION), torch.device("cpu"))
        labels = drop_labels(y[idx], 0.1, c, generator=g)
        sigma, noise = loss.draw(len(idx), 2, (1, 8, 8), generator=g)
        for got, want in zip(batch, (x[idx], labels, sigma, noise)):
            assert torch.equal(got, want), step
    assert T.run_seed_at(SEED, None, 5) == SEED
    assert T.run_seed_at(SEED, ((0, 3e-4, "constant"),), 5) == SEED
    two = ((0, 3e-4, "constant"), (2, 1e-3, "constant"))
    assert [T.run_seed_at(SEED, two, s) == SEED for s in range(4)] == [True, True, False, False]


def test_copies_resumed_with_different_lrs_draw_different_batches_and_noise(tmp_path, spied):
    """`cp -a run runB`, then one copy resumed with the run's lr and the other with another: from the step where
    they part, the copies draw other Poisson batches and independent DP noise (the difference of their noisy
    gradients is no longer noise-free); before it, they are one run."""
    x, y, c = tiny_data()
    doc = tiny_plan(steps=6)
    run = tmp_path / "run"
    with pytest.raises(Stop):
        train(doc, x, y, c, run, TrainConfig(**CFG, lr=1e-3), progress=False, on_step=stop_at(3))
    assert state_of(run)["ledger"]["steps_done"] == 2
    shutil.copytree(run, tmp_path / "A")
    shutil.copytree(run, tmp_path / "B")
    del spied[:]
    train(doc, x, y, c, tmp_path / "A", TrainConfig(**CFG, lr=1e-3), resume=True, progress=False)
    steps_a = spied[:]
    del spied[:]
    train(doc, x, y, c, tmp_path / "B", TrainConfig(**CFG, lr=4e-4), resume=True, progress=False)
    steps_b = spied[:]
    assert len(steps_a) == len(steps_b) == 4   # steps 2..5 of each copy
    like = state_of(run)["model"]
    for (batch_a, seed_a), (batch_b, seed_b) in zip(steps_a, steps_b):
        assert seed_a != seed_b
        na, nb = dp_noise(seed_a, like), dp_noise(seed_b, like)
        assert abs(float(torch.corrcoef(torch.stack([na, nb]))[0, 1])) < 0.05   # independent draws
        assert not (len(batch_a[0]) == len(batch_b[0]) and torch.equal(batch_a[2], batch_b[2]))   # other sigmas
    batches_a = [PoissonSampler(24, doc.plan.sample_rate, seed=SEED).batch(s) for s in range(2, 6)]
    segments_b = ((0, 1e-3, "constant"), (2, 4e-4, "constant"))
    batches_b = [PoissonSampler(24, doc.plan.sample_rate, seed=T.run_seed_at(SEED, segments_b, s)).batch(s)
                 for s in range(2, 6)]
    assert [torch.equal(x[i], b[0]) for i, (b, _) in zip(batches_a, steps_a)] == [True] * 4
    assert [torch.equal(x[i], b[0]) for i, (b, _) in zip(batches_b, steps_b)] == [True] * 4
    assert any(not torch.equal(a, b) for a, b in zip(batches_a, batches_b)), "the same Poisson batches"
    # The copy resumed with the run's own lr is the run, uninterrupted.
    train(doc, x, y, c, tmp_path / "full", TrainConfig(**CFG, lr=1e-3), progress=False)
    assert_same_run(tmp_path / "A", tmp_path / "full")


@pytest.mark.slow   # time: the default suite keeps the copies that part and the exact replay
def test_copies_resumed_with_the_same_lr_change_stay_one_run(tmp_path):
    """Two copies given the same new lr are the same run, bit for bit (they leak nothing more than one)."""
    x, y, c = tiny_data()
    doc = tiny_plan(steps=4)
    run = tmp_path / "run"
    with pytest.raises(Stop):
        train(doc, x, y, c, run, TrainConfig(**CFG, lr=1e-3), progress=False, on_step=stop_at(3))
    for name in ("A", "B"):
        shutil.copytree(run, tmp_path / name)
        train(doc, x, y, c, tmp_path / name, TrainConfig(**CFG, lr=4e-4), resume=True, progress=False)
    assert_same_run(tmp_path / "A", tmp_path / "B")


def test_a_run_resumed_after_an_lr_change_replays_exactly(tmp_path):
    """An lr change on resume, then a kill after the next checkpoint and a resume: the run ends bitwise equal to
    the same run uninterrupted (its lr segments given up front), and to the one resumed once after the change."""
    x, y, c = tiny_data()
    doc = tiny_plan(steps=6)
    segments = ((0, 1e-3, "constant"), (2, 4e-4, "cosine"))
    twice, once = tmp_path / "twice", tmp_path / "once"
    for run in (twice, once):
        with pytest.raises(Stop):
            train(doc, x, y, c, run, TrainConfig(**CFG, lr=1e-3), progress=False, on_step=stop_at(3))
    changed = TrainConfig(**CFG, lr=4e-4, lr_schedule="cosine")
    with pytest.raises(Stop):
        train(doc, x, y, c, twice, changed, resume=True, progress=False, on_step=stop_at(5))
    saved = state_of(twice)
    assert saved["ledger"]["steps_done"] == 4
    assert tuple(map(tuple, saved["config"]["train"]["lr_segments"])) == segments
    assert train(doc, x, y, c, twice, changed, resume=True, progress=False)["lr_segments"] == [list(s) for s in segments]
    train(doc, x, y, c, once, changed, resume=True, progress=False)
    train(doc, x, y, c, tmp_path / "full", TrainConfig(**CFG, lr=4e-4, lr_schedule="cosine", lr_segments=segments),
          progress=False)
    assert_same_run(twice, tmp_path / "full")
    assert_same_run(once, tmp_path / "full")
    assert state_of(twice)["rng"]["scheme"] == T.RNG_SCHEME


def test_plan_private_grad_follows_the_lr_segments_and_keeps_the_audits_call(tmp_path):
    """The audit calls plan_private_grad(seed=..., step=...) without segments: the run seed's own noise. With the
    segments of a copy whose lr changed, the same weights and batch give another noise draw of the same scale."""
    x, y, c = tiny_data()
    doc = tiny_plan(steps=4)
    D = T.build_denoiser({"model": "small", "precond": "edm", "sigma_data": 3 ** -0.5, "img_resolution": 8,
                          "img_channels": 1, "num_classes": c})
    loss = training_loss("edm", None, 3 ** -0.5)
    loss_fn = T.engine_loss_fn(loss, conditional=True)
    g = _generator(0, torch.device("cpu"))
    sigma, noise = loss.draw(6, 2, (1, 8, 8), generator=g)
    batch = [x[:6], y[:6], sigma, noise]
    one = ((0, 1e-3, "constant"),)
    fork = ((0, 1e-3, "constant"), (2, 4e-4, "constant"))

    def flat(grads):
        return torch.cat([v.flatten() for v in grads.values()])

    base = flat(T.plan_private_grad(D, loss_fn, batch, doc.plan, seed=SEED, step=2))
    assert torch.equal(base, flat(T.plan_private_grad(D, loss_fn, batch, doc.plan, seed=SEED, step=2,
                                                      lr_segments=one)))
    other = flat(T.plan_private_grad(D, loss_fn, batch, doc.plan, seed=SEED, step=2, lr_segments=fork))
    std = doc.plan.noise_multiplier * doc.plan.clip_norm / doc.plan.batch_size
    assert float((base - other).std()) == pytest.approx(std * 2 ** 0.5, rel=0.05)   # two independent draws
    assert torch.equal(base, flat(T.plan_private_grad(D, loss_fn, batch, doc.plan, seed=SEED, step=2,
                                                      lr_segments=fork[:1])))


def test_copies_that_both_change_the_lr_to_different_values_draw_different_seeds():
    """Stop 48 (mut49 RS2), privacy: two copies of a run both resumed at step 2 with a new lr, 4e-4 and 2e-4 (same
    schedule). Their steps from 2 on derive from different seeds, so their DP noise is independent. A seed that
    mixed only the segments' steps and schedules gave both copies the same noise at different weights; the test
    above keeps one copy on the run's own lr, so it could not see that."""
    a = ((0, 1e-3, "constant"), (2, 4e-4, "constant"))
    b = ((0, 1e-3, "constant"), (2, 2e-4, "constant"))
    for step in (2, 3, 5):
        assert T.run_seed_at(SEED, a, step) != T.run_seed_at(SEED, b, step)
    assert T.run_seed_at(SEED, a, 1) == T.run_seed_at(SEED, b, 1) == SEED   # one run before they part
    c = ((0, 1e-3, "constant"), (2, 4e-4, "cosine"))
    assert T.run_seed_at(SEED, a, 2) != T.run_seed_at(SEED, c, 2)
