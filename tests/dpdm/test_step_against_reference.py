"""`dpdm.train.train`'s DP-SGD steps against an independent reference.

The loop is only recorded (its Poisson batch, the batch tensors and weights it hands the engine, the gradient it gets
back, the DP noise drawn). The reference then recomputes every step from its own weights with plain autograd, one
example at a time: its own EDM preconditioning and loss (K draws averaged inside the example's loss), the whole
gradient clipped to C, summed, plus sigma * C * z once, divided by q * N; then its own Adam and EMA. The final
checkpoint's weights and EMA must be the reference's. This pins the loop as a whole (the engine's own tests pin the
engine on its own): a loop that divided by the realised batch, skipped an empty batch, noised each physical chunk,
clipped each draw or each chunk, or handed Adam or the EMA anything else fails it.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import accounting
import dpdm.engine as E
import dpdm.train as T
from dpdm import checkpoint as ckpt

SD = 3 ** -0.5


def _record(monkeypatch):
    rec = {"batches": {}, "steps": {}, "samplers": [], "noise": None, "D0": None}
    Real = T.PoissonSampler

    class Sampler(Real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            rec["samplers"].append(self.sample_rate)

        def batch(self, step):
            idx = super().batch(step)
            rec["batches"][step] = idx.clone()
            return idx

    real_grad, real_normal = T.plan_private_grad, E._standard_normal

    def grad(D, loss_fn, batch, plan, *, step, **kw):
        if rec["D0"] is None:
            rec["D0"] = copy.deepcopy(D)
        rec["noise"] = []
        before = {k: p.detach().clone() for k, p in D.named_parameters()}
        out = real_grad(D, loss_fn, batch, plan, step=step, **kw)
        rec["steps"][step] = dict(before=before, batch=[t.clone() for t in batch], noise=rec["noise"],
                                  grads={k: v.clone() for k, v in out.items()})
        return out

    def normal(like, generator):
        z = real_normal(like, generator)
        rec["noise"].append(z.clone())
        return z

    monkeypatch.setattr(T, "PoissonSampler", Sampler)
    monkeypatch.setattr(T, "plan_private_grad", grad)
    monkeypatch.setattr(E, "_standard_normal", normal)
    return rec


def _example_loss(net, x, y, sigma, noise):
    """One example's EDM loss (Karras et al. 2022, Table 1; sigma_data sqrt(1/3)) averaged over its K draws."""
    K = sigma.shape[0]
    xs = x.expand(K, *x.shape)
    s = sigma.reshape(-1, 1, 1, 1)
    xn = xs + s * noise
    c_skip, c_out = SD ** 2 / (s ** 2 + SD ** 2), s * SD / (s ** 2 + SD ** 2).sqrt()
    c_in = 1 / (SD ** 2 + s ** 2).sqrt()
    den = c_skip * xn + c_out * net(c_in * xn, sigma.log() / 4, y.reshape(1).expand(K))
    w = (s ** 2 + SD ** 2) / (s * SD) ** 2
    return (w * (den - xs) ** 2).flatten(1).mean(1).mean()


def _rel(a, b):
    num = math.sqrt(sum(float(((u - v).detach().double() ** 2).sum()) for u, v in zip(a, b)))
    return num / (math.sqrt(sum(float((v.detach().double() ** 2).sum()) for v in b)) or 1.0)


@pytest.mark.parametrize("batch, steps, physical_batch", [(6, 3, 2), (1, 2, None)])
def test_each_step_is_the_reference_dp_sgd_step(tmp_path, monkeypatch, batch, steps, physical_batch):
    n, K, C, sigma, lr, decay = 24, 3, 0.9, 1.3, 3e-3, 0.999
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    y = torch.arange(n) % 3
    plan = accounting.PrivacyPlan(dataset_size=n, batch_size=batch, steps=steps, noise_multiplier=sigma, clip_norm=C,
                                  noise_multiplicity=K, delta=1e-5, dataset_name="tiny")
    rec = _record(monkeypatch)
    cfg = T.TrainConfig(model="small", checkpoint_every=steps, log_every=1, seed=3, lr=lr, ema_decay=decay,
                        physical_batch=physical_batch, label_dropout=0.5)
    T.train(accounting.make_plan_document(plan), x, y, 3, tmp_path / "run", cfg, progress=False)
    assert rec["samplers"] == [plan.sample_rate]          # Bernoulli(q) at exactly the plan's rate

    D = copy.deepcopy(rec["D0"])
    names = [k for k, p in D.named_parameters() if p.requires_grad]
    params = [p for k, p in D.named_parameters() if p.requires_grad]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    ema = [p.detach().clone() for p in D.parameters()]
    qN = plan.sample_rate * plan.dataset_size
    sizes = []
    for s in range(steps):
        r, idx = rec["steps"][s], rec["batches"][s]
        xb, yb, sig, nz = r["batch"]
        sizes.append(len(idx))
        assert torch.equal(xb, x[idx]) and bool(((yb == y[idx]) | (yb == 3)).all())   # labels kept or dropped
        assert tuple(sig.shape) == (len(idx), K) and tuple(nz.shape) == (len(idx), K, 1, 8, 8)
        assert _rel([r["before"][k] for k in names], params) < 1e-6, f"step {s}: the weights left the reference's"
        assert len(r["noise"]) == len(params), f"step {s}: {len(r['noise'])} noise draws for {len(params)} tensors"
        total = [torch.zeros_like(p) for p in params]
        for i in range(len(idx)):
            gi = torch.autograd.grad(_example_loss(D.net, xb[i], yb[i], sig[i], nz[i]), params, allow_unused=True)
            gi = [torch.zeros_like(p) if t is None else t for t, p in zip(gi, params)]
            f = min(1.0, C / (math.sqrt(sum(float((t.double() ** 2).sum()) for t in gi)) + 1e-6))
            for acc, t in zip(total, gi):
                acc += f * t
        want = [(t + sigma * C * z) / qN for t, z in zip(total, r["noise"])]
        got = [r["grads"][k] for k in names]
        assert _rel(got, want) < 1e-6, f"step {s}: the private gradient is not (sum clip(g_i) + sigma C z) / qN"
        signal = [u * qN - sigma * C * z for u, z in zip(got, r["noise"])]
        assert (_rel(signal, total) if len(idx) else max(float(t.abs().max()) for t in signal)) < 1e-4, \
            f"step {s}: the clipped sum differs from the per-example reference"
        with torch.no_grad():   # Adam (torch's defaults) on the private gradient alone, then the EMA with warmup
            for p, gr, mm, vv in zip(params, want, m, v):
                mm.mul_(0.9).add_(0.1 * gr)
                vv.mul_(0.999).add_(0.001 * gr * gr)
                p.sub_(lr * (mm / (1 - 0.9 ** (s + 1))) / ((vv / (1 - 0.999 ** (s + 1))).sqrt() + 1e-8))
            beta = min(decay, (1 + s) / (10 + s))
            for e, p in zip(ema, D.parameters()):
                e.mul_(beta).add_((1 - beta) * p)
    if batch == 1:
        assert 0 in sizes, "seed 3 must draw an empty batch for this case to mean anything"
    state = ckpt.load_checkpoint(tmp_path / "run" / T.CHECKPOINT_NAME)
    assert _rel([state["model"][k] for k in names], params) < 1e-6
    assert _rel([state["ema"][k] for k, _ in D.named_parameters()], ema) < 1e-6
    assert int(state["optimizer"]["state"][0]["step"]) == steps
