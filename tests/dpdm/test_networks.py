"""DDPM++ U-Net: parameter counts, shapes, row independence, allowed module types."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpdm.networks import PRESETS, AttnBlock, ResBlock, build_network, count_parameters, timestep_embedding
from dpdm.precond import EDMPrecond

ALLOWED = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.Embedding, nn.SiLU)




def test_mnist_preset_matches_paper_count():
    net = build_network("mnist", img_resolution=28, img_channels=1, num_classes=10)
    n = count_parameters(net)
    print(f"mnist preset: {n:,} parameters")
    assert abs(n - 1.75e6) <= 0.05 * 1.75e6
    assert n == 1_753_345   # DPDM's NCSNpp for MNIST, counted analytically in research/dpdm.md 1.4
    attn = [m for m in net.modules() if isinstance(m, AttnBlock)]
    assert len(attn) == 4   # 2 encoder blocks at 7x7, middle, decoder at 7x7


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_attention_sits_at_the_lowest_resolution(preset):
    """For "mnist" (1, 2, 2) the 14x14 and 7x7 levels both have 64 channels: attention at 14x14 has the paper's
    parameter count too (the test above), at 16x the attention's compute, and is no longer DPDM's network."""
    net = build_network(preset, img_resolution=28, img_channels=1, num_classes=0)
    sides = []
    for m in net.modules():
        if isinstance(m, AttnBlock):
            m.register_forward_pre_hook(lambda mod, args: sides.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        net(torch.zeros(1, 1, 28, 28), torch.zeros(1))
    assert sides and set(sides) == {(7, 7)}, sides


def test_small_preset_under_300k():
    for res, ch, k in [(28, 1, 10), (32, 3, 10), (8, 1, 0)]:
        n = count_parameters(build_network("small", img_resolution=res, img_channels=ch, num_classes=k))
        print(f"small preset ({res}x{res}x{ch}, {k} classes): {n:,} parameters")
        assert n < 300_000


@pytest.mark.parametrize("preset", ["mnist", "small"])
def test_only_engine_supported_layers(preset):
    net = build_network(preset, img_resolution=28, img_channels=1, num_classes=10)
    for name, m in net.named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            assert isinstance(m, ALLOWED), f"{name} is a {type(m).__name__}"
    for g in (m for m in net.modules() if isinstance(m, nn.GroupNorm)):
        assert g.num_groups == min(g.num_channels // 4, 32) and g.eps == 1e-6


@pytest.mark.parametrize("preset", ["mnist", "small"])
@pytest.mark.parametrize("res,ch,num_classes", [(8, 1, 10), (28, 1, 10), (32, 3, 10), (32, 3, 0), (8, 3, 0)])
def test_output_shapes(preset, res, ch, num_classes):
    net = build_network(preset, img_resolution=res, img_channels=ch, num_classes=num_classes)
    x = torch.randn(2, ch, res, res)
    y = torch.tensor([0, num_classes]) if num_classes else None   # row 1 uses the null class
    out = net(x, torch.randn(2), y)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_unconditional_network_has_no_label_embedding_and_rejects_labels():
    net = build_network("small", img_resolution=8, img_channels=1, num_classes=0)
    assert not any(isinstance(m, nn.Embedding) for m in net.modules())
    assert EDMPrecond(net).num_classes == 0
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.randn(1, 1, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_conditional_network_needs_labels():
    net = build_network("small", img_resolution=8, img_channels=1, num_classes=10)
    assert net.label_embed.num_embeddings == 11   # one extra null class
    with pytest.raises(ValueError, match="null class 10"):
        net(torch.randn(1, 1, 8, 8), torch.zeros(1), None)


def test_class_labels_change_output():
    net = build_network("small", img_resolution=8, img_channels=1, num_classes=10, init_scale=1.0)
    x, c = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1), torch.zeros(2)
    out = net(x, c, torch.tensor([3, 10]))
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("preset,res", [("small", 28), ("mnist", 28)])
def test_rows_are_independent(preset, res):
    torch.manual_seed(0)
    net = build_network(preset, img_resolution=res, img_channels=1, num_classes=10, init_scale=1.0).double()
    x = torch.randn(4, 1, res, res, dtype=torch.float64)
    c = torch.randn(4, dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 10])
    out = net(x, c, y)
    x2, c2, y2 = x.clone(), c.clone(), y.clone()
    x2[2] = torch.randn(1, res, res, dtype=torch.float64) * 5
    c2[2], y2[2] = 3.0, 7
    out2 = net(x2, c2, y2)
    keep = [0, 1, 3]
    torch.testing.assert_close(out2[keep], out[keep], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(out2[2], out[2])
    # A row's output does not depend on the batch it is in.
    torch.testing.assert_close(net(x[1:2], c[1:2], y[1:2]), out[1:2], rtol=1e-10, atol=1e-12)


# The blocks computed by hand: none of these changes moves a parameter count or the row independence above.

def test_attention_is_scaled_dot_product_over_the_keys_then_skip_rescaled():
    torch.manual_seed(0)
    blk = AttnBlock(8, init_scale=1.0).double()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    q, k, v = blk.qkv(blk.norm(x)).reshape(2, 3, 8, 9).unbind(1)                     # [B, C, HW] each
    h = F.scaled_dot_product_attention(q.mT, k.mT, v.mT).mT.reshape(2, 8, 3, 3)     # softmax(q k^T / sqrt(C)) v
    torch.testing.assert_close(blk(x), (x + blk.proj(h)) / math.sqrt(2), rtol=1e-10, atol=1e-12)


def test_res_block_by_hand():
    torch.manual_seed(1)
    for cin, cout, kw in ((8, 8, {}), (8, 16, {}), (8, 8, {"down": True})):
        blk = ResBlock(cin, cout, 12, init_scale=1.0, **kw).double()
        x, emb = torch.randn(2, cin, 4, 4, dtype=torch.float64), torch.randn(2, 12, dtype=torch.float64)
        rs = (lambda t: F.avg_pool2d(t, 2)) if kw else (lambda t: t)   # noqa: E731
        h = blk.conv0(rs(F.silu(blk.norm0(x)))) + blk.affine(emb)[:, :, None, None]
        h = blk.conv1(F.silu(blk.norm1(h)))
        skip = blk.skip(rs(x)) if blk.skip is not None else x
        torch.testing.assert_close(blk(x, emb), (skip + h) / math.sqrt(2), rtol=1e-10, atol=1e-12)


def test_unet_conditions_on_the_activated_embedding_and_saves_the_attended_skip():
    torch.manual_seed(2)
    net = build_network("small", img_resolution=16, img_channels=1, num_classes=3, init_scale=1.0).double()
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    c, y = torch.tensor([0.3, -1.2], dtype=torch.float64), torch.tensor([2, 3])
    seen = {}
    net.enc[0].affine.register_forward_pre_hook(lambda m, args: seen.__setitem__("emb", args[0]))
    attn = net.enc[-1]
    assert isinstance(attn, AttnBlock)   # the last saved activation is the attention's
    attn.register_forward_hook(lambda m, args, out: seen.__setitem__("attn", out))
    net.dec[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("dec0", args[0]))
    net(x, c, y)
    emb = timestep_embedding(c, net.nf) + net.label_embed(y)
    torch.testing.assert_close(seen["emb"], F.silu(net.map1(F.silu(net.map0(emb)))), rtol=1e-12, atol=1e-12)
    C = seen["attn"].shape[1]
    torch.testing.assert_close(seen["dec0"][:, -C:], seen["attn"], rtol=0, atol=0)


def test_zero_ish_init_output_is_small_but_gradients_reach_every_layer():
    net = build_network("small", img_resolution=8, img_channels=1, num_classes=10)   # default init_scale
    out = net(torch.randn(2, 1, 8, 8), torch.randn(2), torch.tensor([0, 10]))
    assert out.abs().max() < 1e-3
    out.square().sum().mul(1e6).backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, no_grad


def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0.0, 1.0]), 32)
    assert emb.shape == (2, 32)
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(16), torch.ones(16)]))
    assert emb[1, 0].item() == pytest.approx(torch.sin(torch.tensor(1.0)).item())
    # DDPM's get_timestep_embedding: freq_j = max_positions ** (-j / (half - 1)), j = 0 .. half - 1
    c = torch.tensor([0.7, 250.0], dtype=torch.float64)
    freqs = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 3)
    want = torch.cat([(c[:, None] * freqs).sin(), (c[:, None] * freqs).cos()], 1)
    torch.testing.assert_close(timestep_embedding(c, 8), want, rtol=1e-12, atol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="preset='huge'"):
        build_network("huge", img_resolution=28, img_channels=1, num_classes=10)
    with pytest.raises(ValueError, match="img_resolution=30"):
        build_network("mnist", img_resolution=30, img_channels=1, num_classes=10)
    with pytest.raises(ValueError, match="img_channels=0"):
        build_network("small", img_resolution=8, img_channels=0, num_classes=10)
    with pytest.raises(ValueError, match="num_classes=-1"):
        build_network("small", img_resolution=8, img_channels=1, num_classes=-1)
