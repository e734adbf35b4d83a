"""Membership scores for diffusion models: (model, examples) -> one score per example.

Sign convention (as ``audits.auditor``): **a higher score means "member"**.

Attacks (shared/research/audits.md sections 2 and 5.2):

* ``loss_scores``: the calibrated loss attack. The denoising loss of each example is measured at a
  few fixed noise levels sigma, with fixed noise draws (the same draws for every model, so that two
  models are compared on identical inputs). Calibrated: the score is the loss under a *reference*
  model minus the loss under the target (an example the target fits much better than the reference
  was probably trained on); without a reference it is minus the target's loss. Averaged over levels.
* ``pia_scores``: PIA, the proximal initial attack (Kong et al. 2023), in EDM form. PIA replaces the
  random noise of x_t by the model's own noise prediction at t = 0, then measures how consistently the
  model predicts that same noise at time t. In EDM terms the noise prediction is
  eps(x; sigma) = (x - D(x; sigma)) / sigma, x_t = x_0 + sigma * eps_0 with
  eps_0 = eps(x_0; sigma_0) at a tiny sigma_0, and the score is minus the l_p distance
  ||eps(x_t; sigma) - eps_0||_p (per-pixel mean of |.|^p, to the 1/p). Deterministic: no random draws.
* ``synthetic_distance_scores``: for a synthetic-data release, minus the L2 distance from each
  candidate to its nearest synthetic image (DCR). Sampling is post-processing, so this attack's
  epsilon bound can never legitimately exceed the model attacks' bound.

Models are called as ``D(x [N,C,H,W], sigma [N], class_labels [N] | None)`` (``dpdm.precond``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "LossAttack",
    "PIA",
    "fixed_noise",
    "diffusion_losses",
    "loss_scores",
    "pia_scores",
    "synthetic_distance_scores",
]


def _levels(name: str, values) -> tuple[float, ...]:
    try:
        levels = tuple(float(v) for v in values)
    except TypeError:
        raise ValueError(f"{name}={values!r} must be a sequence of positive noise levels") from None
    if not levels or not all(np.isfinite(v) and v > 0 for v in levels):
        raise ValueError(f"{name}={values!r} must be a non-empty sequence of positive noise levels")
    return levels


@dataclass(frozen=True)
class LossAttack:
    """Parameters of the calibrated loss attack.

    ``sigmas``: the fixed noise levels; ``draws``: noise draws per example and level; ``seed``: seeds
    the draws (the noise depends only on seed, example position and image shape).
    """

    sigmas: tuple[float, ...] = (0.05, 0.2, 0.5, 1.0, 2.0)
    draws: int = 8
    seed: int = 0
    batch_size: int = 256

    def __post_init__(self):
        object.__setattr__(self, "sigmas", _levels("sigmas", self.sigmas))
        for name in ("draws", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an int >= 1")


@dataclass(frozen=True)
class PIA:
    """Parameters of PIA in EDM form: levels ``sigmas`` (scores averaged), ``sigma0`` for eps_0, norm ``p``."""

    sigmas: tuple[float, ...] = (0.5,)
    sigma0: float = 0.01
    p: float = 4.0
    batch_size: int = 256

    def __post_init__(self):
        object.__setattr__(self, "sigmas", _levels("sigmas", self.sigmas))
        if not (np.isfinite(self.sigma0) and self.sigma0 > 0):
            raise ValueError(f"sigma0={self.sigma0!r} must be a positive number")
        if not (np.isfinite(self.p) and self.p >= 1):
            raise ValueError(f"p={self.p!r} must be a number >= 1")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} must be an int >= 1")


def _images(x) -> torch.Tensor:
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[0] == 0 or not x.is_floating_point():
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"x={shape!r} must be a non-empty float tensor [N, C, H, W]")
    return x


def _labels(y, n: int) -> torch.Tensor | None:
    if y is None:
        return None
    if not torch.is_tensor(y) or y.shape != (n,) or y.dtype != torch.int64:
        shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
        raise ValueError(f"y={shape!r} must be None or an int64 tensor of shape ({n},)")
    return y


def _sigma_data(D) -> float:
    return float(getattr(D, "sigma_data", 0.5))


def fixed_noise(n: int, image_shape, draws: int, seed: int) -> torch.Tensor:
    """Standard-normal noise [n, draws, C, H, W]; row i depends only on (seed, i, shape, draws)."""
    out = torch.empty((n, draws, *image_shape))
    g = torch.Generator()
    for i in range(n):
        g.manual_seed(int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0]))
        out[i] = torch.randn((draws, *image_shape), generator=g)
    return out


@torch.no_grad()
def diffusion_losses(D, x, y=None, *, attack: LossAttack = LossAttack(), noise: torch.Tensor | None = None) -> np.ndarray:
    """EDM-weighted denoising loss of each example at each fixed level: array [N, len(sigmas)].

    ``noise`` ([N, draws, C, H, W]) defaults to ``fixed_noise(N, ..., attack.draws, attack.seed)``.
    """
    x = _images(x)
    y = _labels(y, x.shape[0])
    n, shape = x.shape[0], tuple(x.shape[1:])
    if noise is None:
        noise = fixed_noise(n, shape, attack.draws, attack.seed)
    sd = _sigma_data(D)
    device = next(iter(D.parameters())).device if any(True for _ in D.parameters()) else x.device
    out = np.zeros((n, len(attack.sigmas)))
    for lo in range(0, n, attack.batch_size):
        xb = x[lo : lo + attack.batch_size].to(device)
        nb = noise[lo : lo + attack.batch_size].to(device, xb.dtype)
        b, k = nb.shape[:2]
        yb = None if y is None else y[lo : lo + attack.batch_size].to(device).repeat_interleave(k)
        x_rep = xb.unsqueeze(1).expand(b, k, *shape)
        for j, s in enumerate(attack.sigmas):
            noisy = (x_rep + s * nb).reshape(b * k, *shape)
            sig = torch.full((b * k,), s, dtype=xb.dtype, device=device)
            den = D(noisy, sig, yb).reshape(b, k, *shape)
            w = (s**2 + sd**2) / (s * sd) ** 2
            out[lo : lo + b, j] = (w * (den - x_rep) ** 2).reshape(b, -1).mean(1).double().cpu().numpy()
    return out


def loss_scores(
    target,
    x,
    y=None,
    *,
    reference=None,
    attack: LossAttack = LossAttack(),
    per_level: bool = False,
) -> np.ndarray:
    """Calibrated loss attack: mean over levels of loss(reference) - loss(target) (higher = member).

    Without ``reference`` the score is minus the target's loss. With ``per_level`` the [N, levels]
    matrix is returned instead of its row means.
    """
    x = _images(x)
    noise = fixed_noise(x.shape[0], tuple(x.shape[1:]), attack.draws, attack.seed)
    scores = -diffusion_losses(target, x, y, attack=attack, noise=noise)
    if reference is not None:
        scores = scores + diffusion_losses(reference, x, y, attack=attack, noise=noise)
    return scores if per_level else scores.mean(1)


@torch.no_grad()
def _pia_distance(D, x, y, pia: PIA) -> np.ndarray:
    device = next(iter(D.parameters())).device if any(True for _ in D.parameters()) else x.device
    n = x.shape[0]
    out = np.zeros((n, len(pia.sigmas)))
    for lo in range(0, n, pia.batch_size):
        xb = x[lo : lo + pia.batch_size].to(device)
        b = xb.shape[0]
        yb = None if y is None else y[lo : lo + pia.batch_size].to(device)
        s0 = torch.full((b,), pia.sigma0, dtype=xb.dtype, device=device)
        eps0 = (xb - D(xb, s0, yb)) / pia.sigma0  # the model's own noise estimate at t ~ 0
        for j, s in enumerate(pia.sigmas):
            xt = xb + s * eps0
            st = torch.full((b,), s, dtype=xb.dtype, device=device)
            eps_t = (xt - D(xt, st, yb)) / s
            d = (eps_t - eps0).abs().pow(pia.p).reshape(b, -1).mean(1).pow(1.0 / pia.p)
            out[lo : lo + b, j] = d.double().cpu().numpy()
    return out


def pia_scores(target, x, y=None, *, reference=None, pia: PIA = PIA()) -> np.ndarray:
    """PIA (EDM form): minus the l_p gap between eps(x_t; sigma) and eps_0, averaged over levels.

    With ``reference`` the score is calibrated: gap(reference) - gap(target).
    """
    x = _images(x)
    y = _labels(y, x.shape[0])
    scores = -_pia_distance(target, x, y, pia)
    if reference is not None:
        scores = scores + _pia_distance(reference, x, y, pia)
    return scores.mean(1)


def synthetic_distance_scores(candidates, synthetic, *, batch_size: int = 512) -> np.ndarray:
    """Minus the L2 distance from each candidate to its nearest synthetic image (higher = member).

    Both are image tensors [N, C, H, W] / [M, C, H, W] on the same scale (e.g. [-1, 1]); uint8 synthetic
    images are mapped to [-1, 1] first.
    """
    cand = _images(candidates)
    if not torch.is_tensor(synthetic) or synthetic.ndim != 4 or synthetic.shape[0] == 0:
        shape = tuple(synthetic.shape) if torch.is_tensor(synthetic) else type(synthetic).__name__
        raise ValueError(f"synthetic={shape!r} must be a non-empty image tensor [M, C, H, W]")
    if synthetic.dtype == torch.uint8:
        synthetic = synthetic.float() / 127.5 - 1.0
    if tuple(synthetic.shape[1:]) != tuple(cand.shape[1:]):
        raise ValueError(
            f"synthetic images of shape {tuple(synthetic.shape[1:])} must match the candidates' "
            f"{tuple(cand.shape[1:])}"
        )
    a = cand.reshape(cand.shape[0], -1).double()
    s = synthetic.reshape(synthetic.shape[0], -1).double()
    best = torch.full((a.shape[0],), float("inf"), dtype=torch.float64)
    for lo in range(0, s.shape[0], batch_size):
        best = torch.minimum(best, torch.cdist(a, s[lo : lo + batch_size]).min(1).values)
    return (-best).numpy()
