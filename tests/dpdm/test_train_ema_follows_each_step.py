"""mut44 (TR1, TR5): the run's EMA is updated after each optimizer step, with DPDM's warmup decay
min(ema_decay, (1 + n) / (10 + n)) for update n (0-based). Nothing compared a run's EMA with its weights: the
EMA taken before the step (one step stale) or a warmup off by one passed every test. With a checkpoint after
every step, the checkpoints give each step's weights and EMA: ema_k = b ema_(k-1) + (1 - b) model_k."""
import torch

import accounting
from dpdm import checkpoint as ckpt
from dpdm.train import CHECKPOINT_NAME, TrainConfig, train


def test_ema_is_updated_after_each_step_with_the_warmup_decay(tmp_path):
    n, c, steps = 24, 3, 5
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    y = torch.arange(n) % c
    plan = accounting.PrivacyPlan(dataset_size=n, batch_size=6, steps=steps, noise_multiplier=1.0, clip_norm=1.0,
                                  noise_multiplicity=2, delta=1e-5, dataset_name="tiny")
    doc = accounting.make_plan_document(plan)
    out = tmp_path / "run"
    states = {}

    def on_step(done):   # called before step `done` is saved: the file holds step done - 1
        if done >= 2:
            s = ckpt.load_checkpoint(out / CHECKPOINT_NAME)
            states[s["ledger"]["steps_done"]] = (s["model"], s["ema"])

    cfg = TrainConfig(model="small", checkpoint_every=1, log_every=1, seed=3, lr=1e-2)
    train(doc, x, y, c, out, cfg, progress=False, on_step=on_step)
    s = ckpt.load_checkpoint(out / CHECKPOINT_NAME)
    states[steps] = (s["model"], s["ema"])
    assert sorted(states) == list(range(1, steps + 1))
    moved = 0
    for k in range(2, steps + 1):
        b = min(cfg.ema_decay, (1 + (k - 1)) / (10 + (k - 1)))
        (model_k, ema_k), (_, ema_prev) = states[k], states[k - 1]
        for name, e in ema_k.items():
            if not e.is_floating_point():
                continue
            expected = b * ema_prev[name].double() + (1 - b) * model_k[name].double()
            torch.testing.assert_close(e.double(), expected, rtol=1e-5, atol=1e-6, msg=f"step {k}, {name}")
            moved += int(not torch.equal(ema_prev[name], e))
    assert moved > 0   # the weights moved, so a stale or mis-weighted EMA differs
