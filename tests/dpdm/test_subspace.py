"""Noise in a public gradient subspace: the basis, the mechanism's sensitivity and noise, training with it."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats as st
from torch import nn

from dpdm import checkpoint as ckpt
from dpdm.engine import (SubspaceSpanError, add_noise_in_subspace, clipped_grad_sum, flatten_grads,
                         per_sample_grads, public_subspace)
from dpdm.train import CHECKPOINT_NAME, TrainConfig, TrainError, train

from tests.dpdm.test_engine import small_unet_case
from tests.dpdm.test_train import CFG, Stop, params_of, stop_at, tiny_data, tiny_plan

F64 = torch.float64


def clipped_rows(model, loss_fn, batch, C):
    rows = torch.cat([g.reshape(g.shape[0], -1) for g in per_sample_grads(model, loss_fn, *batch).values()], 1)
    return rows * (C / (rows.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)


def test_basis_is_orthonormal_and_spans_the_top_principal_directions():
    D, loss_fn, batch = small_unet_case(B=10, K=2, seed=4)
    C, k = 0.5, 4
    V = public_subspace(D, loss_fn, *batch, dim=k, clip_norm=C, chunk_size=3)
    rows = clipped_rows(D, loss_fn, batch, C)
    assert V.shape == (rows.shape[1], k)
    torch.testing.assert_close(V.T @ V, torch.eye(k, dtype=F64), atol=1e-10, rtol=0)
    _, _, Vh = torch.linalg.svd(rows, full_matrices=False)            # the same subspace, computed directly
    top = Vh[:k].T
    cosines = torch.linalg.svdvals(V.T @ top)                          # principal angles: all 0
    torch.testing.assert_close(cosines, torch.ones(k, dtype=F64), atol=1e-8, rtol=0)
    # The top-k directions hold more of the rows than any other k, e.g. a random k-dim subspace.
    R, _ = torch.linalg.qr(torch.randn(rows.shape[1], k, dtype=F64, generator=torch.Generator().manual_seed(0)))
    assert (rows @ V).norm() > 2 * (rows @ R).norm()
    with pytest.raises(ValueError, match="dim"):
        public_subspace(D, loss_fn, *batch, dim=11, clip_norm=C)
    for bad in (0, -1, 2.5):   # a RuntimeError or TypeError from inside the loop before
        with pytest.raises(ValueError, match=f"chunk_size={bad!r} must be None or an integer >= 1"):
            public_subspace(D, loss_fn, *batch, dim=k, clip_norm=C, chunk_size=bad)



def test_the_basis_is_built_from_blocks_of_the_gradients_never_a_float64_copy_of_them_all(monkeypatch):
    """h135 F1 (stop 53): `public_subspace` held the n flat clipped gradients as a list of chunks, their torch.cat
    and a float64 copy of that: 4.5-4.9 times n * d * 4 bytes, which --physical-batch does not lower (about 16 GiB
    for the mnist preset at 512 examples). They go into one preallocated G, and the Gram matrix and the basis are
    built in float64 from blocks of its columns (here 1000 columns at a time): the same subspace, orthonormal."""
    import dpdm.engine as engine_module

    D, loss_fn, batch = small_unet_case(B=10, K=2, dtype=torch.float32, seed=4)
    C, k, n = 0.5, 4, 10
    monkeypatch.setattr(engine_module, "_SUBSPACE_BLOCK_BYTES", 1000 * 8 * n, raising=False)
    made, real_double, real_cat = [], torch.Tensor.double, torch.cat
    monkeypatch.setattr(torch.Tensor, "double", lambda t, *a, **kw: made.append(t.numel()) or real_double(t, *a, **kw))
    monkeypatch.setattr(torch, "cat", lambda ts, *a, **kw: made.append(sum(t.numel() for t in ts)) or real_cat(ts, *a,
                                                                                                               **kw))
    V = public_subspace(D, loss_fn, *batch, dim=k, clip_norm=C, chunk_size=3)
    monkeypatch.undo()
    d = V.shape[0]
    assert V.dtype == torch.float32 and d > 1000 and max(made) <= 3 * d   # a chunk's rows; no copy of all n
    torch.testing.assert_close(V.double().T @ V.double(), torch.eye(k, dtype=F64), atol=1e-6, rtol=0)
    _, _, Vh = torch.linalg.svd(clipped_rows(D, loss_fn, batch, C).double(), full_matrices=False)
    torch.testing.assert_close(torch.linalg.svdvals(V.double().T @ Vh[:k].T), torch.ones(k, dtype=F64), atol=1e-5,
                               rtol=0)

def test_public_gradients_of_too_low_rank_raise_the_span_error():
    """Two of three public examples have a zero gradient: the Gram matrix's other eigenvalues are exactly 0, so
    dim=2 is refused as the caller's setting (SubspaceSpanError, which `dpdm train` turns into "lower the
    dimension"), not a basis of 0/0 that fails later as another error."""
    model = nn.Linear(2, 1, bias=False)
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    loss_fn = lambda m, e: m(e).sum()     # noqa: E731  the gradient is the example itself
    V = public_subspace(model, loss_fn, x, dim=1, clip_norm=1.0)
    torch.testing.assert_close(V.abs(), torch.tensor([[1.0], [0.0]]))
    with pytest.raises(SubspaceSpanError, match="span fewer than 2 directions; lower the dimension"):
        public_subspace(model, loss_fn, x, dim=2, clip_norm=1.0)


def test_without_noise_it_is_the_projected_clipped_sum():
    D, loss_fn, batch = small_unet_case(B=5, K=2, seed=5)
    C, B = 0.7, 8.0
    V = public_subspace(D, loss_fn, *small_unet_case(B=6, K=2, seed=9)[2], dim=3, clip_norm=C)
    s = clipped_grad_sum(D, loss_fn, *batch, clip_norm=C)
    out = add_noise_in_subspace(s, V, noise_multiplier=0.0, clip_norm=C, expected_batch_size=B)
    assert list(out) == list(s) and all(out[n].shape == s[n].shape for n in s)
    # (an orthonormal basis whose computed norm exceeds 1 by rounding is shrunk by 1e-6, hence the rtol)
    torch.testing.assert_close(flatten_grads(out), V @ (V.T @ flatten_grads(s)) / B, atol=1e-12, rtol=1e-5)


def test_sensitivity_add_one_example_is_at_most_the_clip_norm():
    """Replay D and D plus one example (same draws, huge losses so every example hits the bound): the
    projected sums differ by <= C, even for a basis that is NOT orthonormal (it is rescaled)."""
    D, loss_fn, batch = small_unet_case(B=4, K=2, seed=3)
    big = lambda m, *ex: 1e3 * loss_fn(m, *ex)     # noqa: E731
    C = 1.0
    full, base = clipped_grad_sum(D, big, *batch, clip_norm=C), clipped_grad_sum(D, big, *[t[:3] for t in batch],
                                                                                  clip_norm=C)
    added = flatten_grads(full) - flatten_grads(base)               # the added example's clipped gradient
    # A basis whose first column is 3x the added example's direction: an unchecked projection would
    # move the projected sum by 3C.
    u = added / added.norm()
    r = torch.randn_like(u)
    V = torch.stack([3 * u, 0.5 * r / r.norm()], 1)
    diffs = [add_noise_in_subspace(s, V, noise_multiplier=0.0, clip_norm=C, expected_batch_size=1.0)
             for s in (full, base)]
    moved = float((flatten_grads(diffs[0]) - flatten_grads(diffs[1])).norm())
    assert 0.5 * C <= moved <= C * (1 + 1e-6)


def test_noise_lies_in_the_subspace_with_the_plans_std():
    """Zero gradients: the output is V z / B with z ~ N(0, (noise_multiplier C)^2 I_k), nothing outside span(V)."""
    model = nn.Sequential(nn.Linear(60, 40), nn.Linear(40, 10)).double()   # 2,850 coordinates
    d = sum(p.numel() for p in model.parameters())
    zero = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    V, _ = torch.linalg.qr(torch.randn(d, 200, dtype=F64, generator=torch.Generator().manual_seed(1)))
    nm, C, B = 1.3, 0.7, 17.0
    out = flatten_grads(add_noise_in_subspace(zero, V, noise_multiplier=nm, clip_norm=C, expected_batch_size=B,
                                              generator=torch.Generator().manual_seed(2)))
    assert float((out - V @ (V.T @ out)).norm()) < 1e-10 * float(out.norm())
    z = (V.T @ out) * B / (nm * C)
    q, n = float(z.pow(2).sum()), z.numel()
    p = 2 * min(st.chi2.cdf(q, n), st.chi2.sf(q, n))
    assert p > 1e-6, f"noise variance off: sum z^2 = {q:.1f} for {n} coordinates"
    assert abs(float(z.mean())) * math.sqrt(n) < 5.0
    # Its norm scales with sqrt(k), not sqrt(d).
    assert float(out.norm()) == pytest.approx(nm * C / B * math.sqrt(200), rel=0.2)


def test_bad_basis_refused():
    zero = {"w": torch.zeros(5, dtype=F64)}
    for V, match in ((torch.zeros(4, 2, dtype=F64), "rows"), (torch.full((5, 2), float("nan"), dtype=F64), "non-finite")):
        with pytest.raises(ValueError, match=match):
            add_noise_in_subspace(zero, V, noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=1.0)


# ----------------------------------------------------------------------------------------------
# Training with a public subspace


def public_tiny(n=30, classes=3, res=8):
    x, y, _ = tiny_data(n=n, classes=classes, res=res, seed=7)
    return x, y


SUB = dict(subspace_dim=3, subspace_data="public-tiny", subspace_every=2, subspace_examples=6)


def test_subspace_run_updates_only_inside_the_basis_and_resumes_exactly(tmp_path):
    x, y, c = tiny_data()
    doc = tiny_plan(steps=5)
    cfg = TrainConfig(**CFG, **SUB)
    full, part = tmp_path / "full", tmp_path / "part"
    train(doc, x, y, c, full, cfg, dataset_name="tiny", progress=False, public_data=public_tiny())
    state = ckpt.load_checkpoint(full / CHECKPOINT_NAME)
    assert state["config"]["train"]["subspace_dim"] == 3
    assert "subspace" not in state     # recomputed on resume (checkpoints fall on recomputation steps)
    with pytest.raises(Stop):
        train(doc, x, y, c, part, cfg, dataset_name="tiny", progress=False, public_data=public_tiny(),
              on_step=stop_at(3))
    with pytest.raises(TrainError, match="subspace_dim"):
        train(doc, x, y, c, part, TrainConfig(**CFG), dataset_name="tiny", resume=True, progress=False)
    train(doc, x, y, c, part, cfg, dataset_name="tiny", resume=True, progress=False, public_data=public_tiny())
    resumed = params_of(part)   # loaded once: a checkpoint load per parameter took tens of seconds
    for k, v in params_of(full).items():
        torch.testing.assert_close(resumed[k], v, atol=0, rtol=0)


def test_the_training_step_adds_its_noise_in_the_basis(tmp_path):
    """The train loop's gradient (`distributed_private_grad` with a basis) is the engine's projected
    mechanism, lies in span(V), and a run with a subspace trains differently from one without."""
    from dpdm.engine import noise_generator
    from dpdm.train import distributed_private_grad

    D, loss_fn, batch = small_unet_case(B=4, K=2, seed=6, dtype=torch.float32)
    V = public_subspace(D, loss_fn, *small_unet_case(B=6, K=2, seed=8, dtype=torch.float32)[2], dim=3,
                        clip_norm=1.0)
    got = distributed_private_grad(D, loss_fn, *batch, clip_norm=1.0, noise_multiplier=2.0, expected_batch_size=5.0,
                                   noise_seed=123, basis=V)
    s = clipped_grad_sum(D, loss_fn, *batch, clip_norm=1.0)
    want = add_noise_in_subspace(s, V, noise_multiplier=2.0, clip_norm=1.0, expected_batch_size=1.0,
                                 generator=noise_generator(123, torch.device("cpu")))
    torch.testing.assert_close(flatten_grads(got), flatten_grads(want) / 5.0, rtol=1e-5, atol=1e-7)
    flat = flatten_grads(got).double()
    Vd = V.double()
    assert float((flat - Vd @ (Vd.T @ flat)).norm()) < 1e-4 * float(flat.norm())

    x, y, c = tiny_data()
    doc = tiny_plan(steps=2)
    train(doc, x, y, c, tmp_path / "sub", TrainConfig(**CFG, **SUB), dataset_name="tiny", progress=False,
          public_data=public_tiny())
    train(doc, x, y, c, tmp_path / "plain", TrainConfig(**CFG), dataset_name="tiny", progress=False)
    a, b = params_of(tmp_path / "sub"), params_of(tmp_path / "plain")
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad, match", [
    (dict(subspace_data="tiny"), "is the private dataset"),
    (dict(public="private"), "holds 24 of the 24 private images"),
    (dict(public="one-private"), "holds 1 of the 24 private images"),
    (dict(public=None), "needs the public data"),
    (dict(public="shape"), "shape"),
    # checked as the private images are (r2 F2, stop 50): 0..255 floats trained silently, float64 failed at step 1
    # after plan.json was written, uint8 was "spans fewer than 3 directions"
    (dict(public="0..255"), r"the images of the subspace data 'public-tiny': their pixels span \[0, 25\d\]"),
    (dict(public="float64"), r"the subspace data 'public-tiny': images must be float32 .* got torch.float64"),
    (dict(public="uint8"), r"the subspace data 'public-tiny': images must be float32 .* got torch.uint8"),
    (dict(public="float labels"), r"the subspace data 'public-tiny': labels must be int64"),
])
def test_subspace_from_private_or_missing_data_is_refused_before_writing(tmp_path, bad, match):
    x, y, c = tiny_data()
    doc = tiny_plan(steps=2)
    px, py = public_tiny()
    one_private = (torch.cat([px, x[5:6]]), torch.cat([py, y[5:6]]))
    pixels = (px * 127.5 + 127.5).round()
    public = {"private": (x, y), "one-private": one_private, None: None,
              "shape": (torch.zeros(30, 1, 4, 4), y[:1].repeat(30)), "0..255": (pixels, py),
              "float64": (px.double(), py), "uint8": (pixels.to(torch.uint8), py),
              "float labels": (px, py.float())}.get(bad.get("public", "ok"), (px, py))
    sub = {**SUB, **{k: v for k, v in bad.items() if k != "public"}}
    out = tmp_path / "run"
    with pytest.raises(TrainError, match=match):
        train(doc, x, y, c, out, TrainConfig(**CFG, **sub), dataset_name="tiny", progress=False, public_data=public)
    assert not out.exists()


def test_subspace_config_checks():
    with pytest.raises(ValueError, match="private runs only"):
        TrainConfig(**CFG, **SUB, private=False)
    with pytest.raises(ValueError, match="subspace_data"):
        TrainConfig(**CFG, subspace_dim=3)
    with pytest.raises(ValueError, match="subspace_examples"):
        TrainConfig(**CFG, **{**SUB, "subspace_examples": 2})
    with pytest.raises(ValueError, match="must divide checkpoint_every"):
        TrainConfig(**{**CFG, "checkpoint_every": 3}, **SUB)
