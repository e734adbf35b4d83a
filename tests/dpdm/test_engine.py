"""The DP-SGD engine: per-example gradients against a loop (the oracle), clipping, sensitivity, noise."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats as st
from torch import nn

from dpdm import engine
from dpdm.engine import add_noise, clipped_grad_sum, per_sample_grads, private_grad, validate_model
from dpdm.loss import EDMLoss, engine_loss_fn
from dpdm.networks import build_network
from dpdm.precond import EDMPrecond

F64 = torch.float64




# ----------------------------------------------------------------------------------------------
# Models and data


def small_unet_case(B=3, K=2, res=8, dtype=F64, seed=0):
    """The `small` U-Net (attention at the lowest resolution, class embedding) with EDM's loss."""
    torch.manual_seed(seed)
    net = build_network("small", img_resolution=res, img_channels=1, num_classes=10, init_scale=1.0)
    D = EDMPrecond(net).to(dtype)
    loss = EDMLoss()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand((B, 1, res, res), generator=g, dtype=dtype) * 2 - 1
    y = torch.randint(0, 11, (B,), generator=g)
    sigma, noise = loss.draw(B, K, (1, res, res), generator=g, dtype=dtype)
    return D, engine_loss_fn(loss), (x, y, sigma, noise)


class TokenNet(nn.Module):
    """Conv stem (strided, grouped, bias-free, 1x1) + GroupNorm + SiLU + token and label embeddings +
    single-head attention + linear head: every kind of layer the engine has rules for, and more."""

    def __init__(self, vocab=7, classes=5, ch=8):
        super().__init__()
        self.conv = nn.Conv2d(2, ch, 3, padding=1)
        self.down = nn.Conv2d(ch, ch, 3, stride=2, padding=1, groups=2, bias=False)
        self.mix = nn.Conv2d(ch, ch, 1)
        self.norm = nn.GroupNorm(2, ch)
        self.norm_plain = nn.GroupNorm(4, ch, affine=False)
        self.tok = nn.Embedding(vocab, ch)
        self.label = nn.Embedding(classes, ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.head = nn.Linear(ch, classes)

    def forward(self, img, tokens, labels):
        h = F.silu(self.norm(self.conv(img)))                       # [N, ch, H, W]
        h = self.mix(self.norm_plain(self.down(h)))                 # [N, ch, H/2, W/2]
        seq = torch.cat([h.flatten(2).transpose(1, 2), self.tok(tokens)], dim=1)   # [N, T, ch]
        seq = seq + self.label(labels)[:, None, :]
        q, k, v = self.qkv(seq).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        return self.head(F.silu(a).mean(dim=1))                     # [N, classes]


def token_case(B=4, dtype=F64, seed=0):
    torch.manual_seed(seed)
    model = TokenNet().to(dtype)
    img = torch.randn(B, 3, 2, 6, 6, dtype=dtype)      # 3 rows (views) per example
    tokens = torch.randint(0, 7, (B, 3, 4))
    labels = torch.randint(0, 5, (B,))
    weight = torch.rand(B, dtype=dtype) + 0.5            # a per-example float input

    def loss_fn(model, img, tokens, labels, weight):
        # one example: img [1, 3, 2, 6, 6], tokens [1, 3, 4], labels [1], weight [1]
        logits = model(img[0], tokens[0], labels.expand(3))                  # rows of this example
        return weight[0] * F.cross_entropy(logits, labels.expand(3))

    return model, loss_fn, (img, tokens, labels, weight)


def loop_grads(model, loss_fn, batch):
    """The oracle: one autograd.grad per example (opacus's microbatch check)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {n: [] for n in params}
    B = batch[0].shape[0]
    for i in range(B):
        loss = loss_fn(model, *[t[i:i + 1] for t in batch])
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            out[n].append(g)
    return {n: torch.stack(v) for n, v in out.items()}


def assert_grads_close(got, want, rtol=1e-6, atol=1e-12):
    assert got.keys() == want.keys()
    bad = []
    for n in want:
        if got[n].shape != want[n].shape:
            bad.append(f"{n}: shape {tuple(got[n].shape)} != {tuple(want[n].shape)}")
        elif not torch.allclose(got[n], want[n], rtol=rtol, atol=atol):
            err = ((got[n] - want[n]).abs().max() / want[n].abs().max()).item()
            bad.append(f"{n}: max relative error {err:.3g}")
    assert not bad, "per-example gradients differ from the loop:\n" + "\n".join(bad)


def by_hand(model, loss_fn, batch, clip_norm):
    """sum_i g_i * min(1, C / (||g_i|| + 1e-6)), written out from the loop gradients."""
    g = loop_grads(model, loss_fn, batch)
    B = batch[0].shape[0]
    norms = torch.sqrt(sum(v.reshape(B, -1).pow(2).sum(1) for v in g.values()))
    factor = torch.clamp(clip_norm / (norms + 1e-6), max=1.0)
    return {n: (v * factor.reshape(-1, *[1] * (v.dim() - 1))).sum(0) for n, v in g.items()}, norms


# ----------------------------------------------------------------------------------------------
# Per-example gradients


def test_per_sample_grads_match_loop_small_unet():
    D, loss_fn, batch = small_unet_case()
    got = per_sample_grads(D, loss_fn, *batch)
    assert_grads_close(got, loop_grads(D, loss_fn, batch))


def test_per_sample_grads_match_loop_attention_embeddings_several_inputs():
    model, loss_fn, batch = token_case()
    got = per_sample_grads(model, loss_fn, *batch)
    assert_grads_close(got, loop_grads(model, loss_fn, batch))


def test_per_layer_rules_agree_with_plain_vmap():
    """The engine's rules change how, not what: same numbers as vmap(grad) without them."""
    model, loss_fn, batch = token_case(B=3)
    fast, loss_fast = engine._per_example(model, loss_fn, batch, None, rules=True)
    plain, loss_plain = engine._per_example(model, loss_fn, batch, None, rules=False)
    assert_grads_close(fast, plain, rtol=1e-10)
    torch.testing.assert_close(loss_fast, loss_plain)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("cin, cout, kernel, padding, stride", [
    (1, 6, 3, 1, 1),       # one input channel: per-tap matmuls
    (6, 1, (3, 5), (0, 2), 1),   # one output channel, rectangular kernel and padding: per-tap matmuls
    (2, 3, 2, 0, 1),       # even kernel, no padding
    (5, 6, 3, 1, 1),       # grouped convolution, transposed layout (rows > 1)
    (5, 6, 1, 0, 1),       # 1x1: grouped convolution, rows folded into the groups
    (3, 5, 3, 1, 2),       # strided
])
def test_conv_rules_match_loop(rows, cin, cout, kernel, padding, stride):
    """Every path of the conv rule (per-tap matmuls, folded and transposed grouped convolutions)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, kernel, padding=padding, stride=stride).double()
    x = torch.randn(4, rows, cin, 7, 9, dtype=F64)
    r = torch.randn_like(conv(x[:, 0]))

    def loss_fn(model, x):
        return (model(x[0]) * r[:1]).pow(2).sum()

    got = per_sample_grads(conv, loss_fn, x)
    assert_grads_close(got, loop_grads(conv, loss_fn, (x,)))


@pytest.mark.parametrize("max_groups, calls", [(4, 5), (8, 3), (13, 2), (65_535, 1), (3, 5), (2, 5)])
def test_group_norm_rule_in_slices_matches_loop(max_groups, calls):
    """CUDA refuses a group-norm backward of more than 65,535 groups (GPU run, stop 26: 512 examples x
    K 8 x 32 groups failed with 'invalid argument'), so the rule splits the examples into slices:
    here 2 rows x 2 groups per example, so 1, 2 or 3 of the 5 examples per call, against the loop.
    Limits 3 and 2 are below one example's 4 groups (K >= 2048 at 32 groups): each example's 2 rows then go
    as a batch of rows in 2 groups, one call per example (stop 42: every call had 4 groups, over the limit)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Conv2d(4, 1, 1)).double()
    x = torch.randn(5, 2, 2, 6, 6, dtype=F64)
    seen = []

    class CountingAten:
        def __getattr__(self, name):
            op = getattr(torch.ops.aten, name)
            if name != "native_group_norm_backward":
                return op

            def counted(*args):
                seen.append(args[-2])   # the groups of this call
                return op(*args)
            return counted

    def loss_fn(model, x):
        return model(x[0]).pow(2).mean()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "_GROUP_NORM_MAX_GROUPS", max_groups)
        mp.setattr(engine, "_aten", CountingAten())
        got = per_sample_grads(model, loss_fn, x)
    assert len(seen) == calls and all(g <= max_groups for g in seen)
    assert sum(seen) == (5 * 2 * 2 if max_groups >= 4 else 5 * 2)
    assert_grads_close(got, loop_grads(model, loss_fn, (x,)))


def test_conv_rule_paths_are_taken():
    """The shapes above reach the paths they name (the choice is by shape, not by accident)."""
    seen = []
    real_taps = engine._conv2d_param_grads_taps

    def taps(*a, **k):
        seen.append("taps")
        return real_taps(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "_conv2d_param_grads_taps", taps)
        conv = nn.Conv2d(1, 6, 3, padding=1).double()
        x = torch.randn(2, 1, 1, 8, 8, dtype=F64)
        per_sample_grads(conv, lambda m, x: m(x[0]).sum(), x)
        assert seen == ["taps"]
        conv = nn.Conv2d(6, 6, 3, padding=1).double()
        per_sample_grads(conv, lambda m, x: m(x[0]).sum(), torch.randn(2, 1, 6, 8, 8, dtype=F64))
        assert seen == ["taps"]   # 6 channels in and out: a grouped convolution


class HyperConv(nn.Module):
    """A convolution whose weight or bias a linear layer computes from the example (a hypernetwork)."""

    def __init__(self, which):
        super().__init__()
        self.which = which
        self.h = nn.Linear(2, 2 * 2 * 3 * 3 if which == "weight" else 2)
        self.fixed = nn.Parameter(torch.randn(2) if which == "weight" else torch.randn(2, 2, 3, 3))   # the other

    def forward(self, x):
        p = self.h(x.mean((0, 2, 3)))
        if self.which == "weight":
            return F.conv2d(x, p.view(2, 2, 3, 3), self.fixed, padding=1)
        return F.conv2d(x, self.fixed, p, padding=1)


@pytest.mark.parametrize("which, chunk_size", [("weight", None), ("weight", 2), ("bias", None)])
def test_conv_rule_takes_a_weight_or_bias_that_depends_on_the_example(which, chunk_size):
    """The conv rule's loop branch (a hypernetwork's or a dynamic convolution's weight) returned its one output as
    a 1-tuple: every such model failed under the default per_layer_rules (stop 50, h110 F4)."""
    torch.manual_seed(0)
    model = HyperConv(which).double()
    x, z = torch.randn(5, 3, 2, 6, 6, dtype=F64), torch.randn(5, 3, 2, 6, 6, dtype=F64)

    def loss_fn(model, x, z):
        return (model(x[0]) - z[0]).pow(2).mean()

    got = per_sample_grads(model, loss_fn, x, z, chunk_size=chunk_size)
    assert_grads_close(got, loop_grads(model, loss_fn, (x, z)))


def test_conv2d_with_one_tuples_reads_them_as_torch_does():
    """h154 F1 (stop 55): F.conv2d(x, w, b, (1,), (1,)) expands the 1-tuples to both dimensions; the conv rule read
    them as they were, and the per-tap path (one to four channels) failed with "not enough values to unpack"."""
    torch.manual_seed(0)
    for cin, cout, stride in ((1, 4, (1,)), (3, 2, (2,)), (6, 6, (1,))):     # per-tap paths, then the grouped one
        model = nn.Conv2d(cin, cout, 3).double()

        def loss_fn(m, x, stride=stride):
            return F.conv2d(x, m.weight, m.bias, stride, (1,), (1,)).pow(2).sum()

        x = torch.randn(3, cin, 6, 7, dtype=F64)
        got = per_sample_grads(model, loss_fn, x)
        assert_grads_close(got, loop_grads(model, loss_fn, (x,)))
        assert_grads_close(got, per_sample_grads(model, loss_fn, x, per_layer_rules=False), rtol=1e-10)


def test_per_sample_grads_float32_and_frozen_parameters():
    model, loss_fn, batch = token_case(B=3, dtype=torch.float32)
    model.tok.weight.requires_grad_(False)
    got = per_sample_grads(model, loss_fn, *batch)
    assert "tok.weight" not in got and got["conv.weight"].dtype == torch.float32
    want = loop_grads(model, loss_fn, batch)
    assert_grads_close(got, want, rtol=1e-4, atol=1e-6)


def test_per_sample_grads_chunked_equals_unchunked():
    model, loss_fn, batch = token_case(B=5)
    assert_grads_close(per_sample_grads(model, loss_fn, *batch, chunk_size=2),
                       per_sample_grads(model, loss_fn, *batch), rtol=1e-12)


def test_loss_fn_gets_the_module_and_one_example():
    seen = {}

    def loss_fn(model, x, y):
        seen["model"], seen["shapes"] = model, (tuple(x.shape), tuple(y.shape))
        return (model(x) * y).sum()

    lin = nn.Linear(3, 1).double()
    per_sample_grads(lin, loss_fn, torch.randn(4, 3, dtype=F64), torch.randn(4, 1, dtype=F64))
    assert seen["model"] is lin and seen["shapes"] == ((1, 3), (1, 1))


# ----------------------------------------------------------------------------------------------
# Clipping, sums, noise


def test_private_grad_without_noise_is_clip_sum_divide():
    D, loss_fn, batch = small_unet_case(B=4)
    _, norms = by_hand(D, loss_fn, batch, clip_norm=1.0)
    low = norms.sort().values[0:2]
    C = float(low.mean())                               # between the two lowest norms: three clipped, one not
    want, norms = by_hand(D, loss_fn, batch, clip_norm=C)
    assert int((norms > C).sum()) == 3
    stats = {}
    got = private_grad(D, loss_fn, *batch, clip_norm=C, noise_multiplier=0.0, expected_batch_size=10.0, stats=stats)
    assert_grads_close(got, {n: v / 10.0 for n, v in want.items()}, rtol=1e-8)
    assert stats["batch_size"] == 4 and stats["nonfinite"] == 0
    assert stats["clipped_fraction"] == 0.75   # not its complement (two of four clipped could not tell them apart)
    with torch.no_grad():
        losses = [float(loss_fn(D, *[t[i:i + 1] for t in batch])) for i in range(4)]
    assert stats["loss_mean"] == pytest.approx(sum(losses) / 4, rel=1e-10)


def test_clipped_norms_at_most_clip_norm():
    model, loss_fn, batch = token_case(B=4)
    big = lambda m, *ex: 1e4 * loss_fn(m, *ex)     # noqa: E731  gradients far above the bound
    C = 0.3
    for i in range(4):
        one = [t[i:i + 1] for t in batch]
        g = clipped_grad_sum(model, big, *one, clip_norm=C)
        norm = torch.sqrt(sum(v.double().pow(2).sum() for v in g.values()))
        assert norm <= C, f"example {i}: clipped norm {float(norm)} > {C}"
        assert norm >= C * (1 - 1e-4)   # and clipping does not shrink more than it must


@pytest.mark.parametrize("C", [1.0, 0.01, 100 / 3])
def test_a_float32_clipped_gradient_never_exceeds_clip_norm(C):
    """The norm is summed in float64 and the factor keeps a margin of a few ulps: with float32 norms and no
    margin, the rounded product g * factor came out up to 1.4e-7 (relative) above C for these gradients, and
    a baseline CNN's example at 1.0000012 C (its float32 norm 1.3e-6 low)."""
    gen = torch.Generator().manual_seed(0)
    n = 100
    grads = {"a": torch.randn(n, 1000, generator=gen) * 1e5, "b": torch.rand(n, 300, 300, generator=gen) * 3e3,
             "c": torch.randn(n, 7, generator=gen)}
    worst = 0.0
    for i in range(n):
        total = {k: torch.zeros_like(v[0]) for k, v in grads.items()}
        engine._clip_and_sum({k: v[i:i + 1] for k, v in grads.items()}, C, total)
        worst = max(worst, float(sum(t.double().pow(2).sum() for t in total.values()).sqrt()) / C)
    assert 1 - 1e-5 < worst <= 1.0


def test_a_gradient_too_large_to_clip_in_float32_is_zeroed():
    """A float32 gradient whose norm overflows float32 (finite in float64) would take a subnormal clip factor,
    too coarse to keep it within C (1.0002 C measured at 1e6 elements of 3.2e38): it is dropped, as a
    non-finite gradient is."""
    worst = 0.0
    for val in torch.linspace(1e38, 3.4e38, 40).tolist():
        total = {"w": torch.zeros(100_000)}
        clipped, nonfinite = engine._clip_and_sum({"w": torch.full((1, 100_000), val)}, 1.0, total)
        assert nonfinite == 1 and clipped == 0
        worst = max(worst, float(torch.linalg.vector_norm(total["w"].double())))
    assert worst == 0.0


def _sum_diff_norm(a, b):
    return float(torch.sqrt(sum((a[n] - b[n]).pow(2).sum() for n in a)))


def _per_draw_clipped_sum(model, loss_fn, batch, clip_norm):
    """A WRONG engine: treats each of an example's K draws as its own example, clips each and sums
    over K (what feeding DPDM's B*K repeated rows to a per-row clipper does)."""
    x, y, sigma, noise = batch
    B, K = sigma.shape
    rows = (x.repeat_interleave(K, 0), y.repeat_interleave(K, 0), sigma.reshape(B * K, 1),
            noise.reshape(B * K, 1, *noise.shape[2:]))
    return clipped_grad_sum(model, loss_fn, *rows, clip_norm=clip_norm)


def test_norms_in_blocks_cover_every_row():
    """_norms64 sums max_elements // d rows at a time (2**22 // d: 18 rows of the small U-Net); no other test
    has more than one block. With blocks of 1, 2 and 2 rows, 5 rows take 5, 3 and 3 blocks."""
    rows = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    want = torch.linalg.vector_norm(rows.double(), dim=1)
    for max_elements in (3, 6, 7, 2**22):
        torch.testing.assert_close(engine._norms64(rows, max_elements=max_elements), want, rtol=0, atol=0)


def test_sensitivity_replay_add_one_example():
    """One step on D and on D plus one example, same randomness, no noise: the sums differ by <= C.
    A per-draw clipping engine (sum over K of clipped draws) fails the same replay."""
    D, loss_fn, batch = small_unet_case(B=4, K=4, seed=3)
    big = lambda m, *ex: 1e3 * loss_fn(m, *ex)    # noqa: E731  every example hits the bound
    C = 1.0
    base = [t[:3] for t in batch]      # D: examples 0..2; D': plus example 3 (same draws throughout)
    d = _sum_diff_norm(clipped_grad_sum(D, big, *batch, clip_norm=C), clipped_grad_sum(D, big, *base, clip_norm=C))
    assert d <= C * (1 + 1e-6)
    assert d >= 0.5 * C                 # the replay is sensitive: the added example is visible
    wrong = _sum_diff_norm(_per_draw_clipped_sum(D, big, batch, C), _per_draw_clipped_sum(D, big, base, C))
    assert wrong > C * (1 + 1e-6), f"per-draw engine moved the sum by only {wrong}"


def test_noise_variance_with_zero_gradients_chi_square():
    """Zero gradients: private_grad is pure noise, per coordinate N(0, (noise_multiplier*C/B)^2)."""
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 50)).double()   # 15,150 coordinates
    zero_loss = lambda m, x: 0.0 * m(x).sum()     # noqa: E731
    nm, C, B = 1.3, 0.7, 17.0
    x = torch.randn(5, 100, dtype=F64)
    out = private_grad(model, zero_loss, x, clip_norm=C, noise_multiplier=nm, expected_batch_size=B,
                       generator=torch.Generator().manual_seed(11))
    z = torch.cat([v.flatten() for v in out.values()]) / (nm * C / B)
    n = z.numel()
    q = float(z.pow(2).sum())
    p = 2 * min(st.chi2.cdf(q, n), st.chi2.sf(q, n))      # two-sided chi-square test of the variance
    assert p > 1e-6, f"noise variance off: sum z^2 = {q:.1f} for {n} coordinates (p = {p:.2g})"
    assert abs(float(z.mean())) * math.sqrt(n) < 5.0       # centred


def test_private_grad_is_add_noise_of_clipped_sum():
    model, loss_fn, batch = token_case(B=3)
    kw = dict(clip_norm=0.2, noise_multiplier=0.8, expected_batch_size=4.0)
    got = private_grad(model, loss_fn, *batch, generator=torch.Generator().manual_seed(5), **kw)
    s = clipped_grad_sum(model, loss_fn, *batch, clip_norm=kw["clip_norm"])
    want = add_noise(s, generator=torch.Generator().manual_seed(5), **kw)
    assert_grads_close(got, want, rtol=1e-12)
    # and the noise is really there
    assert _sum_diff_norm(got, {n: v / 4.0 for n, v in s.items()}) > 0.1


def test_empty_batch_is_pure_noise_over_expected_batch_size():
    model, loss_fn, batch = token_case(B=3)
    empty = [t[:0] for t in batch]
    stats = {}
    kw = dict(clip_norm=0.5, noise_multiplier=1.1, expected_batch_size=8.0)
    got = private_grad(model, loss_fn, *empty, generator=torch.Generator().manual_seed(2), stats=stats, **kw)
    zeros = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    want = add_noise(zeros, generator=torch.Generator().manual_seed(2), **kw)
    assert_grads_close(got, want, rtol=1e-12)
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in got.values())
    assert stats["batch_size"] == 0 and stats["nonfinite"] == 0 and math.isnan(stats["loss_mean"])
    g = per_sample_grads(model, loss_fn, *empty)
    assert all(v.shape[0] == 0 for v in g.values())


def test_an_expected_batch_size_below_one_divides_as_it_is():
    """q * N < 1 is a valid (if odd) plan: the sum is divided by it, never by a floor of 1."""
    out = add_noise({"w": torch.ones(3, dtype=F64)}, noise_multiplier=0.0, clip_norm=1.0, expected_batch_size=0.25)
    torch.testing.assert_close(out["w"], torch.full((3,), 4.0, dtype=F64), rtol=0, atol=0)


def test_chunked_equals_unchunked():
    D, loss_fn, batch = small_unet_case(B=5)
    C = 0.5
    whole = clipped_grad_sum(D, loss_fn, *batch, clip_norm=C)
    for chunk in (1, 2, 5, 64):
        stats = {}
        part = clipped_grad_sum(D, loss_fn, *batch, clip_norm=C, chunk_size=chunk, stats=stats)
        assert_grads_close(part, whole, rtol=1e-10)
        assert stats["batch_size"] == 5


def test_per_layer_rules_flag_of_the_public_api(monkeypatch):
    """per_layer_rules=False (`dpdm train --grad-engine vmap`) runs plain vmap(grad) in every entry point
    that computes per-example gradients, with the same numbers."""
    entered = []

    class Counting(engine._PerLayerRules):
        def __enter__(self):
            entered.append(1)
            return super().__enter__()

    monkeypatch.setattr(engine, "_PerLayerRules", Counting)
    D, loss_fn, batch = small_unet_case(B=3)
    runs = {}
    for rules in (True, False):
        entered.clear()
        runs[rules] = (
            per_sample_grads(D, loss_fn, *batch, per_layer_rules=rules),
            clipped_grad_sum(D, loss_fn, *batch, clip_norm=0.5, chunk_size=2, per_layer_rules=rules),
            private_grad(D, loss_fn, *batch, clip_norm=0.5, noise_multiplier=1.0, expected_batch_size=3.0,
                         generator=torch.Generator().manual_seed(0), per_layer_rules=rules),
            engine.public_subspace(D, loss_fn, *batch, dim=2, clip_norm=0.5, per_layer_rules=rules),
        )
        assert len(entered) == (5 if rules else 0)   # 1 + 2 chunks + 1 + 1
    for fast, plain in zip(runs[True][:3], runs[False][:3]):
        assert_grads_close(fast, plain, rtol=1e-10)
    # The same subspace (the basis is unique up to the sign of each column).
    torch.testing.assert_close((runs[True][3].T @ runs[False][3]).abs(), torch.eye(2, dtype=runs[True][3].dtype),
                               rtol=0, atol=1e-8)


def test_nonfinite_examples_are_zeroed_and_counted():
    model, loss_fn, batch = token_case(B=4)
    img = batch[0].clone()
    img[1, 0, 0, 0, 0] = float("nan")
    img[3, 1, 1, 2, 2] = float("inf")
    bad = (img, *batch[1:])
    stats = {}
    got = clipped_grad_sum(model, loss_fn, *bad, clip_norm=1.0, stats=stats)
    assert stats["nonfinite"] == 2
    keep = [t[[0, 2]] for t in batch]
    assert_grads_close(got, clipped_grad_sum(model, loss_fn, *keep, clip_norm=1.0), rtol=1e-10)
    noisy = private_grad(model, loss_fn, *bad, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4.0)
    assert all(torch.isfinite(v).all() for v in noisy.values())
    # The logged loss averages the finite losses only (one NaN image must not turn it into nan).
    clean = {}
    clipped_grad_sum(model, loss_fn, *keep, clip_norm=1.0, stats=clean)
    assert stats["loss_count"] == 2 and clean["loss_count"] == 2
    assert stats["loss_mean"] == pytest.approx(clean["loss_mean"], rel=1e-12)


def test_noise_generator_keeps_every_bit_of_the_seed():
    """torch's CPU generator keeps a seed's low 32 bits only; the DP noise's generator keeps them all."""
    a = torch.randn(4, generator=torch.Generator().manual_seed(12345))
    assert torch.equal(a, torch.randn(4, generator=torch.Generator().manual_seed(12345 + (7 << 32))))  # the flaw
    zeros = {"w": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float64)}

    def noise(seed):
        return add_noise(zeros, noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=1.0,
                         generator=engine.noise_generator(seed))
    base = noise(12345)
    assert base["w"].dtype == torch.float32 and base["b"].dtype == torch.float64
    assert_grads_close(noise(12345), base, rtol=0)                                   # a pure function of the seed
    assert not torch.equal(noise(12345 + (7 << 32))["w"], base["w"])
    assert not torch.equal(noise((1 << 64) - 1)["w"], noise((1 << 63) - 1)["w"])
    for bad in (-1, 1 << 64, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            engine.noise_generator(bad)
    # Its draws are standard normal: N(0, (sigma C)^2) / B with sigma C = 2 and B = 4 has variance 0.25.
    big = add_noise({"w": torch.zeros(200_000)}, noise_multiplier=2.0, clip_norm=1.0, expected_batch_size=4.0,
                    generator=engine.noise_generator(7))["w"].double()
    assert abs(float(big.mean())) < 5 * 0.5 / 200_000 ** 0.5
    assert float(big.var()) == pytest.approx(0.25, rel=5 * (2 / 200_000) ** 0.5)


def test_default_noise_is_not_the_global_torch_rng():
    """h134 F1 (stop 53): with generator=None the noise came from torch's global generator, so a notebook's
    torch.manual_seed(0) let anyone replay it and subtract it. None is now a fresh generator with a secret seed."""
    m = nn.Linear(4, 1, dtype=F64)
    empty = torch.zeros(0, 4, dtype=F64)
    kw = dict(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=1.0)
    zeros = {"w": torch.zeros(8, dtype=F64)}

    def seeded(fn):
        torch.manual_seed(0)
        out = fn()
        return torch.cat([v.reshape(-1) for v in out.values()]), torch.randn(8, dtype=F64)

    torch.manual_seed(0)
    global_draw = torch.randn(8, dtype=F64)
    for fn in (lambda: private_grad(m, lambda m, a: m(a).sum(), empty, **kw),
               lambda: add_noise(zeros, **kw),
               lambda: engine.add_noise_in_subspace(zeros, torch.eye(8, dtype=F64), **kw)):
        (a, after_a), (b, after_b) = seeded(fn), seeded(fn)
        assert not torch.equal(a, b)                          # not replayable from the global seed
        assert not torch.equal(a[:5], global_draw[:5])
        assert torch.equal(after_a, global_draw) and torch.equal(after_b, global_draw)   # the global RNG untouched


def test_numpy_scalars_are_numbers():
    """h134 F5 (stop 53): noise_multiplier=np.float32(1.0) was "must be a finite number >= 0", np.int64 seeds and batch
    sizes likewise. numpy's scalars are taken as the Python numbers they equal; bools stay refused."""
    model, loss_fn, batch = token_case(B=3)
    kw = dict(clip_norm=0.5, noise_multiplier=1.25, expected_batch_size=4)
    want = private_grad(model, loss_fn, *batch, generator=engine.noise_generator(5), **kw)
    got = private_grad(model, loss_fn, *batch, clip_norm=np.float32(0.5), noise_multiplier=np.float64(1.25),
                       expected_batch_size=np.int64(4), generator=engine.noise_generator(np.uint64(5)))
    assert_grads_close(got, want, rtol=0)
    assert all(v.dtype == want[k].dtype for k, v in got.items())
    for bad in (dict(noise_multiplier=np.bool_(True)), dict(clip_norm=True), dict(expected_batch_size=np.float32("nan"))):
        with pytest.raises(ValueError, match="must be a finite number"):
            private_grad(model, loss_fn, *batch, **{**kw, **bad})
    with pytest.raises(ValueError, match="seed"):
        engine.noise_generator(np.int64(-1))


def test_half_precision_parameters_refused_for_clipping():
    """In bfloat16 the norm, the clip factor and the sum round so coarsely that a clipped gradient
    exceeds C (measured 1.005 C), and float16 norms overflow: the clipping paths refuse them."""
    for dtype in (torch.bfloat16, torch.float16):
        model = nn.Linear(6, 3).to(dtype)
        x = torch.randn(4, 6, dtype=dtype)
        loss_fn = lambda m, x: m(x).square().sum()                         # noqa: E731
        assert per_sample_grads(model, loss_fn, x)["weight"].dtype == dtype   # no clipping: allowed
        for call in (lambda: clipped_grad_sum(model, loss_fn, x, clip_norm=1.0),
                     lambda: private_grad(model, loss_fn, x, clip_norm=1.0, noise_multiplier=1.0,
                                          expected_batch_size=4.0)):
            with pytest.raises(ValueError, match=rf"'weight' is {dtype}.*float32"):
                call()
    frozen_half = nn.Sequential(nn.Linear(6, 3).to(torch.bfloat16).requires_grad_(False), nn.Linear(3, 1))
    got = clipped_grad_sum(frozen_half, lambda m, x: m[1](m[0](x.bfloat16()).float()).sum(), torch.randn(2, 6),
                           clip_norm=1.0)                                     # only trainable ones count
    assert set(got) == {"1.weight", "1.bias"}


def test_model_without_trainable_parameters_refused():
    model = nn.Linear(4, 2).requires_grad_(False)
    x = torch.randn(3, 4)
    for call in (lambda b: per_sample_grads(model, lambda m, x: m(x).sum(), b),
                 lambda b: private_grad(model, lambda m, x: m(x).sum(), b, clip_norm=1.0, noise_multiplier=1.0,
                                        expected_batch_size=3.0)):
        for b in (x, x[:0]):                                                  # also an empty batch
            with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
                call(b)


# ----------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("layer, name", [
    (nn.BatchNorm2d(4), "BatchNorm2d"),
    (nn.SyncBatchNorm(4), "SyncBatchNorm"),
    (nn.InstanceNorm2d(4, track_running_stats=True), "InstanceNorm2d"),
])
def test_cross_example_layers_rejected_by_name(layer, name):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), layer)
    with pytest.raises(ValueError, match=name) as info:
        validate_model(model)
    assert "GroupNorm" in str(info.value) and "1" in str(info.value)   # module path "1" and the fix
    x = torch.randn(2, 1, 5, 5)
    with pytest.raises(ValueError, match=name):
        private_grad(model, lambda m, x: m(x).sum(), x, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=2)


class _RunningMean(nn.Module):
    """A custom cross-example layer validate_model cannot know: its forward updates a running mean in place."""

    def __init__(self, d: int):
        super().__init__()
        self.register_buffer("run_mean", torch.zeros(d))

    def forward(self, x):
        with torch.no_grad():
            self.run_mean.mul_(0.9).add_(0.1 * x.mean(0))
        return x - self.run_mean


@pytest.mark.parametrize("rules", [True, False])
def test_custom_running_statistic_refused_naming_the_buffer_holders(rules):
    # torch.func refuses the in-place update with a message naming no module (h79 N1, stop 45); DESIGN.md promises
    # the layer's name.
    model = nn.Sequential(nn.Linear(4, 4), _RunningMean(4), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"updates a tensor it holds in place.*holding buffers: 1$"):
        per_sample_grads(model, lambda m, x: m(x).sum(), torch.randn(3, 4), per_layer_rules=rules)
    assert torch.equal(model[1].run_mean, torch.zeros(4))


@pytest.mark.parametrize("rules", [True, False])
def test_randomness_inside_the_loss_named_not_a_vmap_error(rules):
    """h134 F4 (stop 53): torch.randn_like or functional dropout inside loss_fn failed with torch's "use the 'same' or
    'different' randomness flags on vmap", flags the caller cannot set."""
    model = nn.Linear(4, 1)
    for loss_fn in (lambda m, x: m(x + torch.randn_like(x)).sum(),
                    lambda m, x: F.dropout(m(x), 0.5, training=True).sum()):
        with pytest.raises(ValueError, match=r"^the model or loss_fn draws random numbers .* pass them in as batch "
                                             r"tensors"):
            private_grad(model, loss_fn, torch.randn(3, 4), clip_norm=1.0, noise_multiplier=1.0,
                         expected_batch_size=3, per_layer_rules=rules)


def test_double_backward_under_the_rules_names_the_engine_that_takes_it():
    """h154 N1 (stop 55): a loss_fn that differentiates through the model (an input-gradient penalty) is refused by
    the rules with a message that now names the fix; plain vmap computes it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(), nn.Conv2d(4, 1, 3, padding=1))
    model = model.double()

    def loss_fn(m, x):
        gx = torch.func.grad(lambda xx: m(xx).sum())(x)
        return gx.pow(2).mean() + m(x).mean()

    x = torch.randn(3, 1, 5, 5, dtype=F64)
    with pytest.raises(ValueError, match=r"^dpdm.engine's per-layer rules do not support double backward .*"
                                         r"pass per_layer_rules=False .*--grad-engine vmap\)$"):
        per_sample_grads(model, loss_fn, x)
    assert_grads_close(per_sample_grads(model, loss_fn, x, per_layer_rules=False), loop_grads(model, loss_fn, (x,)))


@pytest.mark.parametrize("rules", [True, False])
def test_embeddings_the_engine_cannot_take_are_named(rules):
    """h154 N2 (stop 55): max_norm (a renorm of the looked-up rows in place, by the private batch) and sparse=True
    failed with torch's vmap and SparseCPU messages. The module is named; a functional call is named by its setting."""
    tokens, labels = torch.tensor([[1, 2], [3, 3], [1, 4]]), torch.tensor([0, 1, 2])
    for kw, setting in ((dict(max_norm=1.0), "max_norm=1"), (dict(sparse=True), "sparse=True")):
        model = nn.Sequential(nn.Embedding(10, 4, **kw), nn.Flatten(), nn.Linear(8, 3))
        with torch.no_grad():
            model[0].weight.mul_(5)
        before = model[0].weight.detach().clone()
        with pytest.raises(ValueError, match=rf"^model contains 0 \(Embedding\) with {setting}, .*; use "):
            private_grad(model, lambda m, t, y: F.cross_entropy(m(t), y), tokens, labels, clip_norm=1.0,
                         noise_multiplier=1.0, expected_batch_size=3, per_layer_rules=rules)
        assert torch.equal(model[0].weight, before)
    weight = nn.Parameter(torch.randn(10, 4) * 5)
    before = weight.detach().clone()
    for kw, fix in ((dict(max_norm=1.0), "use max_norm=None"), (dict(sparse=True), "use sparse=False")):
        with pytest.raises(ValueError, match=rf"^the model or loss_fn .* embedding with .*: {fix}$"):
            per_sample_grads(nn.ParameterList([weight]), lambda m, t: F.embedding(t, m[0], **kw).sum(), tokens,
                             per_layer_rules=rules)
        assert torch.equal(weight.detach(), before)


def test_inputs_that_require_grad_leave_no_graph_on_the_gradients():
    """h154 N5 (stop 55): a batch tensor with requires_grad=True left a grad_fn back to it on the returned gradients
    (held until they were overwritten). They are detached, and equal those of the detached batch."""
    model, loss_fn, batch = token_case(B=3)
    grad_batch = [t.clone().requires_grad_(True) if t.is_floating_point() else t for t in batch]
    kw = dict(clip_norm=0.5, noise_multiplier=1.0, expected_batch_size=3)
    outs = [per_sample_grads(model, loss_fn, *grad_batch), clipped_grad_sum(model, loss_fn, *grad_batch, clip_norm=0.5),
            private_grad(model, loss_fn, *grad_batch, generator=engine.noise_generator(1), **kw)]
    for out in outs:
        assert all(not g.requires_grad and g.grad_fn is None for g in out.values())
    assert_grads_close(outs[2], private_grad(model, loss_fn, *batch, generator=engine.noise_generator(1), **kw), rtol=0)


def test_per_example_layers_accepted():
    validate_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.InstanceNorm2d(4), nn.LayerNorm(3)))
    validate_model(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.0), nn.Dropout(0.5).eval()))


def test_active_dropout_named_not_a_vmap_error():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"1 \(Dropout\) with p=0.5 in training mode.*\.eval\(\)"):
        private_grad(model, lambda m, x: m(x).sum(), torch.randn(3, 4), clip_norm=1.0, noise_multiplier=1.0,
                     expected_batch_size=3)


def test_mixed_float64_float32_parameters_clip_to_c_in_the_coarser_dtype():
    """A float64 parameter first, float32 ones after: float64's 8-ulp margin let float32 rows round to 5e-8
    above C (engine walk F3, stop 40). The margin is the coarsest dtype's."""
    torch.manual_seed(0)

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor([0.3], dtype=torch.float64))
            self.w = nn.Parameter(torch.randn(4096) * 0.1)

        def forward(self, x):
            return (self.a * x[:, :1].double()).sum(1) + (x.float() @ self.w.view(-1, 1)).squeeze(1).double()

    model = Mixed()
    x = torch.randn(200, 4096) * torch.logspace(-1, 2, 200)[:, None]
    worst = 0.0
    for i in range(200):
        total = clipped_grad_sum(model, lambda m, x: m(x).square().sum(), x[i:i + 1], clip_norm=1.0)
        worst = max(worst, float(sum(v.double().square().sum() for v in total.values()).sqrt()))
    assert worst <= 1.0


@pytest.mark.parametrize("fn", ["clipped_grad_sum", "private_grad", "public_subspace"])
def test_clip_norms_float32_cannot_hold_refused(fn):
    """A gradient clipped to C = 1.57e-43 rounded in float32's subnormals to norm 1.14 C (stop 50, h110 F2): the
    engine refuses the clip norms `dpdm train` refuses (`noise_scale_problem`), and takes MIN_CLIP_NORM."""
    model = nn.Linear(4096, 1, bias=False)
    x = torch.full((1, 4096), 1e-7)
    kw = {"private_grad": dict(noise_multiplier=0.0, expected_batch_size=1.0), "public_subspace": dict(dim=1)}
    with pytest.raises(ValueError, match=r"^clip_norm=1.57e-43 is below 1e-30: float32 gradients clipped to it"):
        getattr(engine, fn)(model, lambda m, x: m(x).sum(), x, clip_norm=1.57e-43, **kw.get(fn, {}))
    getattr(engine, fn)(model, lambda m, x: m(x).sum(), x, clip_norm=engine.MIN_CLIP_NORM, **kw.get(fn, {}))
    total = clipped_grad_sum(model, lambda m, x: m(x).sum(), x, clip_norm=engine.MIN_CLIP_NORM)
    assert float(total["weight"].double().norm()) <= engine.MIN_CLIP_NORM


def test_noise_std_float32_cannot_hold_refused():
    """noise_multiplier x clip_norm above MAX_NOISE_STD overflows float32 noise to inf: refused, as by `dpdm train`."""
    with pytest.raises(ValueError, match=r"^the noise std noise_multiplier x clip_norm = 1e\+31 .* is above 1e\+30"):
        add_noise({"w": torch.zeros(3)}, noise_multiplier=1e25, clip_norm=1e6, expected_batch_size=1.0)
    with pytest.raises(ValueError, match=r"is above 1e\+30"):   # before the compute
        private_grad(None, None, torch.zeros(1), clip_norm=1e6, noise_multiplier=1e25, expected_batch_size=1.0)


def test_add_noise_refuses_other_generators():
    for bad in (3, np.random.RandomState(0)):
        with pytest.raises(ValueError, match="must be None, a torch.Generator or a numpy.random.Generator"):
            add_noise({"w": torch.zeros(3)}, noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=1.0,
                      generator=bad)


def test_bad_inputs_raise_value_error():
    model, loss_fn, batch = token_case(B=3)
    with pytest.raises(ValueError, match="leading sizes"):
        per_sample_grads(model, loss_fn, batch[0], batch[1][:2], *batch[2:])
    with pytest.raises(ValueError, match="scalar"):
        per_sample_grads(model, lambda m, *ex: m(ex[0][0], ex[1][0], ex[2].expand(3)), *batch[:3])
    with pytest.raises(ValueError, match="clip_norm"):
        clipped_grad_sum(model, loss_fn, *batch, clip_norm=0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        private_grad(model, loss_fn, *batch, clip_norm=1.0, noise_multiplier=-1.0, expected_batch_size=3)
    with pytest.raises(ValueError, match="expected_batch_size"):
        private_grad(model, loss_fn, *batch, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        clipped_grad_sum(model, loss_fn, *batch, clip_norm=1.0, chunk_size=0)
    with pytest.raises(ValueError, match="at least one tensor"):
        per_sample_grads(model, loss_fn)


def test_default_noise_takes_a_fresh_full_64_bit_secret_seed_each_call(monkeypatch):
    """generator=None (mut56, stop 54): each call seeds a fresh generator with 64 secret bits. A seed of 32 bits passed
    every other test (the draws still differ from call to call and from torch's global generator), yet 2**32 seeds can
    be searched for the one whose noise, subtracted, leaves a plausible gradient. The seeds are recorded through
    `noise_generator`, which `add_noise` calls for them: 32 calls must show many different top 16 bits."""
    seeds, real = [], engine.noise_generator

    def recorded(seed, device="cpu"):
        seeds.append(seed)
        return real(seed, device)

    monkeypatch.setattr(engine, "noise_generator", recorded)
    zeros = {"w": torch.zeros(3, dtype=F64)}
    for _ in range(32):
        add_noise(zeros, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=1.0)
    assert len(seeds) == 32 and all(0 <= s < 2**64 for s in seeds), seeds
    assert len({s >> 48 for s in seeds}) > 16, [hex(s) for s in seeds]


@pytest.mark.parametrize("rules", [True, False])
def test_a_frozen_sparse_embedding_is_accepted_and_exact(rules):
    torch.manual_seed(0)
    tokens, labels = torch.tensor([[1, 2], [3, 3], [1, 4]]), torch.tensor([0, 1, 2])
    dense = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3))
    dense[0].weight.requires_grad_(False)
    sparse = copy.deepcopy(dense)   # r1 F1 (stop 55): a frozen table makes no sparse gradient; it ran before 05dbad1
    sparse[0].sparse = True
    lf = lambda m, t, y: F.cross_entropy(m(t), y)
    want = per_sample_grads(dense, lf, tokens, labels, per_layer_rules=rules)
    got = per_sample_grads(sparse, lf, tokens, labels, per_layer_rules=rules)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_trainable_sparse_embedding_is_still_refused():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"^model contains 0 \(Embedding\) with sparse=True"):
        per_sample_grads(model, lambda m, t: m(t).sum(), torch.tensor([[1, 2], [3, 4]]))
