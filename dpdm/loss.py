"""Denoising score-matching losses with noise multiplicity K (DPDM, Section 3.2).

The randomness (K draws of (sigma, noise) per example, the label drop for classifier-free guidance)
is drawn outside by `draw` and `drop_labels` and passed in. `__call__` is then a pure function, so
the DP-SGD engine can take per-example gradients of it under `torch.func.vmap`. The K draws are
averaged *inside* each example's loss, so an example's gradient is clipped once and the
sensitivity stays `clip_norm` whatever K is.
"""

from __future__ import annotations

import abc
import math
from typing import Callable

import torch


def _check_draw_args(batch: int, K: int, image_shape) -> tuple[int, ...]:
    if int(batch) != batch or batch < 0:
        raise ValueError(f"batch={batch!r} must be a non-negative integer")
    if int(K) != K or K < 1:
        raise ValueError(f"K={K!r} must be a positive integer")
    image_shape = tuple(int(s) for s in image_shape)
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape={image_shape!r} must be (C, H, W) with positive sizes")
    return image_shape


class _KLoss(abc.ABC):
    """Per-example loss averaged over K draws: mean_k mean_pixels w(sigma_k) (D(x + sigma_k n_k) - x)^2."""

    @abc.abstractmethod
    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """The loss weight lambda(sigma)."""

    @abc.abstractmethod
    def draw_sigma(self, shape, *, generator, device, dtype) -> torch.Tensor:
        """Training noise levels of the given shape, from the parameterization's p(sigma)."""

    def draw(
        self,
        batch: int,
        K: int,
        image_shape: tuple[int, int, int],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K independent (sigma, noise) draws per example.

        Returns:
            sigma [B, K] and noise [B, K, C, H, W] (standard normal; the loss scales it by sigma).
        """
        image_shape = _check_draw_args(batch, K, image_shape)
        sigma = self.draw_sigma((batch, K), generator=generator, device=device, dtype=dtype)
        noise = torch.randn((batch, K, *image_shape), generator=generator, device=device, dtype=dtype)
        return sigma, noise

    def __call__(
        self,
        D: Callable,                              # D(x [N,C,H,W], sigma [N], class_labels [N] | None)
        x: torch.Tensor,                          # [B, C, H, W] clean images
        y: torch.Tensor | None,                   # [B] labels (already dropped) or None
        sigma: torch.Tensor,                      # [B, K]
        noise: torch.Tensor,                      # [B, K, C, H, W] standard normal
    ) -> torch.Tensor:
        B, K = sigma.shape
        x_rep = x.unsqueeze(1).expand(B, K, *x.shape[1:])            # [B, K, C, H, W]
        s = sigma.to(x.dtype).reshape(B, K, 1, 1, 1)                 # [B, K, 1, 1, 1]
        x_noisy = x_rep + s * noise.to(x.dtype)                       # [B, K, C, H, W]
        y_rep = None if y is None else y.unsqueeze(1).expand(B, K).reshape(B * K)  # [B*K]
        denoised = D(x_noisy.reshape(B * K, *x.shape[1:]), s.reshape(B * K), y_rep)
        denoised = denoised.reshape(B, K, *x.shape[1:])              # [B, K, C, H, W]
        loss = self.weight(s) * (denoised - x_rep) ** 2
        return loss.reshape(B, -1).mean(1)                            # [B]


class EDMLoss(_KLoss):
    """EDM loss (Karras et al. 2022, Table 1): ln sigma ~ N(P_mean, P_std^2), w = (s^2+s_d^2)/(s s_d)^2."""

    def __init__(
        self,
        P_mean: float = -1.2,                     # Mean of ln(sigma) during training.
        P_std: float = 1.2,                       # Std of ln(sigma) during training.
        sigma_data: float = 3**-0.5,              # Expected std of the data (DPDM: sqrt(1/3)).
    ) -> None:
        if not math.isfinite(P_mean):
            raise ValueError(f"P_mean={P_mean!r} must be finite")
        if not (math.isfinite(P_std) and P_std > 0):
            raise ValueError(f"P_std={P_std!r} must be a positive finite float")
        if not (math.isfinite(sigma_data) and sigma_data > 0):
            raise ValueError(f"sigma_data={sigma_data!r} must be a positive finite float")
        self.P_mean = float(P_mean)
        self.P_std = float(P_std)
        self.sigma_data = float(sigma_data)

    def draw_sigma(self, shape, *, generator, device, dtype):
        rnd_normal = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return (rnd_normal * self.P_std + self.P_mean).exp()

    def weight(self, sigma):
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


class VLoss(_KLoss):
    """v-prediction loss (DPDM `VLoss`): t ~ U[t(logsnr_max), t(logsnr_min)], sigma = tan(pi t / 2),
    w = (sigma^2 + 1) / sigma^2, with t(lambda) = (2/pi) arccos(1 / sqrt(1 + exp(-lambda)))
    = (2/pi) arctan(exp(-lambda / 2)), the inverse of sigma = exp(-lambda / 2)."""

    def __init__(
        self,
        logsnr_min: float = -9.0,                 # Lowest log-SNR trained on (sigma_max ~ 90).
        logsnr_max: float = 13.0,                 # Highest log-SNR trained on (sigma_min ~ 0.0015).
    ) -> None:
        if not (math.isfinite(logsnr_min) and math.isfinite(logsnr_max) and logsnr_min < logsnr_max):
            raise ValueError(f"logsnr_min={logsnr_min!r} must be finite and below logsnr_max={logsnr_max!r}")
        self.logsnr_min = float(logsnr_min)
        self.logsnr_max = float(logsnr_max)
        self.t_min = self.t_of_logsnr(self.logsnr_max)
        self.t_max = self.t_of_logsnr(self.logsnr_min)

    @classmethod
    def from_sigma_range(cls, sigma_min: float, sigma_max: float) -> "VLoss":
        """Training noise levels in [sigma_min, sigma_max] (log-SNR = -2 ln sigma)."""
        if not (math.isfinite(sigma_min) and math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
            raise ValueError(f"sigma range ({sigma_min!r}, {sigma_max!r}) must satisfy 0 < sigma_min < sigma_max")
        return cls(logsnr_min=-2 * math.log(sigma_max), logsnr_max=-2 * math.log(sigma_min))

    @staticmethod
    def t_of_logsnr(logsnr: float) -> float:
        # The arctan form, not DPDM's arccos(1 / sqrt(1 + e^-lambda)): at a high log-SNR that argument
        # rounds to 1 and t to 0 (sigma 0, an infinite weight) for any sigma_min <= 1e-8. For lambda < 0
        # use arctan(x) = pi/2 - arctan(1/x), so that exp never overflows.
        if logsnr >= 0:
            return 2 / math.pi * math.atan(math.exp(-logsnr / 2))
        return 1 - 2 / math.pi * math.atan(math.exp(logsnr / 2))

    def draw_sigma(self, shape, *, generator, device, dtype):
        u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
        t = self.t_min + (self.t_max - self.t_min) * u
        return torch.tan(math.pi * t / 2).to(dtype)

    def weight(self, sigma):
        return (sigma**2 + 1) / sigma**2


def drop_labels(
    y: torch.Tensor | None,
    p: float,
    null_class: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """Replace each label by `null_class` independently with probability p (classifier-free guidance).

    One draw per example: all K noise draws of an example share its (possibly null) label, as in
    DPDM's `dropout_label_for_cfg_training`. Call outside vmap.
    """
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"p={p!r} must be in [0, 1]")
    if y is None:
        return None
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, int(null_class)), y)


def engine_loss_fn(loss_obj: _KLoss, conditional: bool = True) -> Callable:
    """The engine's `loss_fn(D, *example)` for ONE example (leading dims 1), returning a scalar.

    conditional=True:  loss_fn(D, x, y, sigma, noise)
    conditional=False: loss_fn(D, x, sigma, noise)   (unconditional data, no labels)
    """
    if conditional:
        def loss_fn(D, x, y, sigma, noise):
            return loss_obj(D, x, y, sigma, noise).sum()
    else:
        def loss_fn(D, x, sigma, noise):
            return loss_obj(D, x, None, sigma, noise).sum()
    return loss_fn
