"""mut44 (TR2, TR2b, TR3): the labels and diffusion draws each training step hands the engine are a pure
function of (seed, step, the diffusion stream), with classifier-free-guidance label dropout at the
configured rate (RNG_SCHEME: per-step SeedSequence(seed, step, stream)). Nothing in test_train.py checked
the labels a step trains on: the 10% dropout switched off, or always on, or the diffusion draws taken from
the DP-noise stream (the same Philox stream as the DP noise on CUDA), all passed."""
import torch

import accounting
import dpdm.train as T
from dpdm.loss import drop_labels
from dpdm.train import TrainConfig, train


def test_each_steps_labels_and_noise_replay_from_the_diffusion_stream(tmp_path, monkeypatch):
    n, c, seed = 24, 3, 3
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    y = torch.arange(n) % c
    plan = accounting.PrivacyPlan(dataset_size=n, batch_size=12, steps=6, noise_multiplier=1.0, clip_norm=1.0,
                                  noise_multiplicity=2, delta=1e-5, dataset_name="tiny")
    doc = accounting.make_plan_document(plan)
    cfg = TrainConfig(model="small", checkpoint_every=6, log_every=1, seed=seed)
    seen = []
    real = T.plan_private_grad

    def spy(D, loss_fn, batch, plan, *, seed, step, **kw):
        seen.append((step, [t.detach().clone() for t in batch]))
        return real(D, loss_fn, batch, plan, seed=seed, step=step, **kw)

    monkeypatch.setattr(T, "plan_private_grad", spy)
    train(doc, x, y, c, tmp_path / "run", cfg, progress=False)
    assert [s for s, _ in seen] == list(range(6))
    loss_obj = T.training_loss(cfg.precond, cfg.train_sigma, 0.5)
    flat = x.reshape(n, -1)
    dropped = kept = 0
    for step, (xb, yb, sigma, noise) in seen:
        idx = torch.tensor([int((flat == row).all(1).nonzero()) for row in xb.reshape(len(xb), -1)], dtype=torch.long)
        gen = T._generator(T.step_seed(seed, step, T._STREAM_DIFFUSION), torch.device("cpu"))
        y_exp = drop_labels(y[idx], cfg.label_dropout, c, generator=gen)
        s_exp, n_exp = loss_obj.draw(len(idx), plan.noise_multiplicity, (1, 8, 8), generator=gen, device="cpu")
        assert torch.equal(yb, y_exp), (step, yb, y_exp)
        assert torch.equal(sigma, s_exp) and torch.equal(noise, n_exp), step
        # h92 F1: each example's K = 2 draws are its own; the replay above would replay a shared draw faithfully.
        assert sigma.shape == (len(idx), 2) and (sigma[:, 0] != sigma[:, 1]).all(), step
        assert (noise[:, 0] != noise[:, 1]).flatten(1).any(1).all(), step
        dropped += int((y_exp == c).sum())
        kept += int((y_exp != c).sum())
    assert cfg.label_dropout == 0.1 and dropped > 0 and kept > dropped   # the replay exercised both outcomes
