"""Preconditioning of the raw network: D(x; sigma) = c_skip x + c_out F(c_in x, c_noise).

EDMPrecond follows Table 1 of Karras et al. 2022 ("Elucidating the design space of diffusion-based
generative models"), with DPDM's sigma_data = sqrt(1/3) (the std of U[-1, 1]). VPrecond is the
v-prediction parameterization DPDM uses at epsilon = 0.2 (Salimans & Ho 2022; DPDM `VDenoiser`).

Both are pure functions of their inputs (no random ops, no in-place writes on inputs, no
data-dependent Python control flow), so they run under `torch.func.vmap`.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import nn


def _as_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """sigma as a [B, 1, 1, 1] tensor in x's dtype (a scalar or a [1] tensor is broadcast)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)  # [B, 1, 1, 1]


class _Precond(nn.Module, abc.ABC):
    """Shared plumbing: holds the raw network and forwards its shape attributes."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    @property
    def num_classes(self) -> int:
        return int(getattr(self.net, "num_classes", 0))

    @property
    def img_resolution(self) -> int:
        return int(self.net.img_resolution)

    @property
    def img_channels(self) -> int:
        return int(self.net.img_channels)

    @abc.abstractmethod
    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) of the parameterization at noise level sigma."""

    def forward(
        self,
        x: torch.Tensor,                          # [B, C, H, W] noisy images
        sigma: torch.Tensor | float,              # [B], [B, 1, 1, 1] or a scalar
        class_labels: torch.Tensor | None = None, # [B] int64 in [0, num_classes] or None
    ) -> torch.Tensor:
        sigma = _as_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.net(c_in * x, c_noise.reshape(-1), class_labels)
        return c_skip * x + c_out * F_x.to(x.dtype)


class EDMPrecond(_Precond):
    """EDM preconditioning (Karras et al. 2022, Table 1, column "Ours")."""

    def __init__(
        self,
        net: nn.Module,                           # F: forward(x, c_noise, class_labels).
        sigma_data: float = 3**-0.5,              # Expected std of the training data (DPDM: sqrt(1/3)).
    ) -> None:
        super().__init__(net)
        if not (math.isfinite(sigma_data) and sigma_data > 0):
            raise ValueError(f"sigma_data={sigma_data!r} must be a positive finite float")
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


class VPrecond(_Precond):
    """v-prediction (Salimans & Ho 2022) in EDM form, as DPDM's `VDenoiser` (sigma_data = 1).

    c_noise = t = (2/pi) arccos(1/sqrt(1 + sigma^2)) = (2/pi) arctan(sigma), i.e. sigma = tan(pi t / 2).
    """

    sigma_data = 1.0

    def coefficients(self, sigma):
        c_skip = 1 / (sigma**2 + 1)
        c_out = sigma / (1 + sigma**2).sqrt()
        c_in = 1 / (1 + sigma**2).sqrt()
        c_noise = torch.atan(sigma) * (2 / math.pi)
        return c_skip, c_out, c_in, c_noise
