"""DDPM++ U-Net (Song et al. 2021, `NCSNpp` with BigGAN residual blocks), as configured by DPDM.

Built only from nn.Conv2d, nn.Linear, nn.GroupNorm, nn.Embedding, nn.SiLU and parameter-free
functional ops (avg-pool, nearest upsampling, softmax), so that every row of a batch is processed
independently (required for per-example gradients) and the DP engine's per-layer rules apply.

Initialization: weights are Xavier-uniform ("fan_avg" variance scaling, as DDPM++), biases zero.
The layers that close a residual branch (second conv of each block, attention output projection)
and the output conv are scaled by `init_scale`. DDPM++/DPDM use init_scale = 0 (exactly 1e-10);
we default to EDM's 1e-5 (`init_zero` in EDM's networks.py): the output starts near zero, as in the
paper, yet every parameter receives a non-zero gradient at step 0, which the engine's per-example
gradient checks need. After one Adam step the two choices are indistinguishable. Pass
init_scale=1.0 for a fully random network (tests with comparable gradient magnitudes everywhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------
# Layers


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm as in DDPM++: num_groups = min(channels // 4, 32), eps = 1e-6."""
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


def _init(layer: nn.Module, scale: float = 1.0) -> nn.Module:
    nn.init.xavier_uniform_(layer.weight)
    with torch.no_grad():
        layer.weight.mul_(scale)
    nn.init.zeros_(layer.bias)
    return layer


def _conv(in_ch: int, out_ch: int, kernel: int, scale: float = 1.0) -> nn.Conv2d:
    return _init(nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2), scale)


def timestep_embedding(c_noise: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal positional embedding of the noise level (DDPM `get_timestep_embedding`)."""
    half = dim // 2
    freqs = torch.arange(half, dtype=c_noise.dtype, device=c_noise.device)
    freqs = torch.exp(freqs * (-math.log(max_positions) / (half - 1)))    # [dim/2]
    args = c_noise.reshape(-1, 1) * freqs                                  # [B, dim/2]
    return torch.cat([args.sin(), args.cos()], dim=1)                      # [B, dim]


class ResBlock(nn.Module):
    """BigGAN-style residual block of DDPM++ (`ResnetBlockBigGANpp`), optional up/down-sampling."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, *, up: bool = False, down: bool = False,
                 init_scale: float = 1e-5) -> None:
        super().__init__()
        self.up, self.down = up, down
        self.norm0 = _group_norm(in_ch)
        self.conv0 = _conv(in_ch, out_ch, 3)
        self.affine = _init(nn.Linear(emb_ch, out_ch))
        self.norm1 = _group_norm(out_ch)
        self.conv1 = _conv(out_ch, out_ch, 3, init_scale)
        self.skip = _conv(in_ch, out_ch, 1) if (in_ch != out_ch or up or down) else None
        self.act = nn.SiLU()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm0(x))
        h = self.conv0(self._resample(h))
        x = self._resample(x)
        h = h + self.affine(emb)[:, :, None, None]   # emb is already SiLU-activated, [B, out_ch, 1, 1]
        h = self.conv1(self.act(self.norm1(h)))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) / math.sqrt(2)


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels (DDPM++ `AttnBlockpp`), skip-rescaled."""

    def __init__(self, channels: int, *, init_scale: float = 1e-5) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = _conv(channels, 3 * channels, 1)
        self.proj = _conv(channels, channels, 1, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)       # 3 x [B, C, HW]
        w = torch.einsum("bci,bcj->bij", q, k * C**-0.5).softmax(dim=-1)          # [B, HW, HW]
        h = torch.einsum("bij,bcj->bci", w, v).reshape(B, C, H, W)                # [B, C, H, W]
        return (x + self.proj(h)) / math.sqrt(2)


# ----------------------------------------------------------------------------------------------
# U-Net


class DDPMpp(nn.Module):
    """DDPM++ U-Net: forward(x [B,C,H,W], c_noise [B], class_labels [B] | None) -> [B,C,H,W]."""

    def __init__(
        self,
        *,
        img_resolution: int,                      # Image height = width.
        img_channels: int,                        # Channels in and out.
        num_classes: int = 0,                     # 0: unconditional; else one extra null class.
        nf: int = 32,                             # Base channel count (= noise-embedding dim).
        ch_mult: tuple[int, ...] = (1, 2, 2),     # Channel multipliers per resolution.
        num_blocks: int = 2,                      # Residual blocks per resolution.
        attn_resolutions: tuple[int, ...] = (7,), # Resolutions with attention after each block.
        init_scale: float = 1e-5,                 # Scale of residual-closing/output layers.
    ) -> None:
        super().__init__()
        _validate(img_resolution, img_channels, num_classes, nf, ch_mult, num_blocks)
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.num_classes = num_classes
        self.nf = nf
        emb_ch = 4 * nf
        self.act = nn.SiLU()

        # Noise-level and class embedding (class added before the MLP; row num_classes = null).
        self.label_embed = nn.Embedding(num_classes + 1, nf) if num_classes > 0 else None
        self.map0 = _init(nn.Linear(nf, emb_ch))
        self.map1 = _init(nn.Linear(emb_ch, emb_ch))

        block = lambda i, o, **kw: ResBlock(i, o, emb_ch, init_scale=init_scale, **kw)  # noqa: E731
        attn = lambda c: AttnBlock(c, init_scale=init_scale)                            # noqa: E731

        # Encoder. `skips` holds the channel count of every saved activation.
        self.conv_in = _conv(img_channels, nf, 3)
        self.enc = nn.ModuleList()
        skips, ch, res = [nf], nf, img_resolution
        for level, mult in enumerate(ch_mult):
            for _ in range(num_blocks):
                self.enc.append(block(ch, nf * mult))
                ch = nf * mult
                if res in attn_resolutions:
                    self.enc.append(attn(ch))
                skips.append(ch)
            if level != len(ch_mult) - 1:
                self.enc.append(block(ch, ch, down=True))
                res //= 2
                skips.append(ch)

        # Middle.
        self.mid = nn.ModuleList([block(ch, ch), attn(ch), block(ch, ch)])

        # Decoder.
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_blocks + 1):
                self.dec.append(block(ch + skips.pop(), nf * mult))
                ch = nf * mult
            if res in attn_resolutions:
                self.dec.append(attn(ch))
            if level != 0:
                self.dec.append(block(ch, ch, up=True))
                res *= 2
        assert not skips
        self.norm_out = _group_norm(ch)
        self.conv_out = _conv(ch, img_channels, 3, init_scale)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None):
        emb = timestep_embedding(c_noise.to(x.dtype), self.nf)                  # [B, nf]
        if self.label_embed is not None:
            if class_labels is None:
                raise ValueError(f"class_labels=None but the network has num_classes={self.num_classes}; "
                                 f"pass the null class {self.num_classes} for unconditional use")
            emb = emb + self.label_embed(class_labels.reshape(-1))
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional network (num_classes=0)")
        emb = self.act(self.map1(self.act(self.map0(emb))))                     # [B, 4 nf]

        h = self.conv_in(x)
        hs = [h]
        for m in self.enc:
            if isinstance(m, AttnBlock):
                h = hs[-1] = m(h)    # attention refines the activation saved by the block before it
            else:
                h = m(h, emb)
                hs.append(h)
        for m in self.mid:
            h = m(h) if isinstance(m, AttnBlock) else m(h, emb)
        for m in self.dec:
            if isinstance(m, AttnBlock):
                h = m(h)
            elif m.up:
                h = m(h, emb)
            else:
                h = m(torch.cat([h, hs.pop()], dim=1), emb)
        assert not hs
        return self.conv_out(self.act(self.norm_out(h)))


def _validate(img_resolution, img_channels, num_classes, nf, ch_mult, num_blocks) -> None:
    if not isinstance(img_channels, int) or img_channels < 1:
        raise ValueError(f"img_channels={img_channels!r} must be a positive integer")
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes={num_classes!r} must be a non-negative integer")
    factor = 2 ** (len(ch_mult) - 1)
    if not isinstance(img_resolution, int) or img_resolution < factor or img_resolution % factor:
        raise ValueError(f"img_resolution={img_resolution!r} must be a positive multiple of {factor} "
                         f"(the U-Net halves it {len(ch_mult) - 1} times)")
    if nf < 8 or nf % 4:
        raise ValueError(f"nf={nf!r} must be a multiple of 4 and at least 8")
    if num_blocks < 1:
        raise ValueError(f"num_blocks={num_blocks!r} must be at least 1")


# ----------------------------------------------------------------------------------------------
# Presets


@dataclass(frozen=True)
class Preset:
    nf: int
    ch_mult: tuple[int, ...]
    num_blocks: int


# Attention sits at the lowest resolution of every preset (7x7 for 28x28 MNIST with "mnist", as DPDM).
PRESETS: dict[str, Preset] = {
    "mnist": Preset(nf=32, ch_mult=(1, 2, 2), num_blocks=2),   # DPDM's MNIST network (1,753,345 params)
    # For CPU work and tests (223,937 params at 28x28x1): three levels so that attention sits at 7x7
    # (at 14x14 it cost 30% of the step); 1.8x faster per step than (1, 2) with attention at 14x14.
    "small": Preset(nf=16, ch_mult=(1, 1, 2), num_blocks=1),
}


def build_network(
    preset: str,
    *,
    img_resolution: int,
    img_channels: int,
    num_classes: int,
    init_scale: float = 1e-5,
) -> DDPMpp:
    """The raw network F of a preset; wrap it in `dpdm.precond.EDMPrecond` or `VPrecond`."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} must be one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    factor = 2 ** (len(p.ch_mult) - 1)
    lowest = img_resolution // factor if isinstance(img_resolution, int) else None
    return DDPMpp(
        img_resolution=img_resolution,
        img_channels=img_channels,
        num_classes=num_classes,
        nf=p.nf,
        ch_mult=p.ch_mult,
        num_blocks=p.num_blocks,
        attn_resolutions=(lowest,),
        init_scale=init_scale,
    )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
