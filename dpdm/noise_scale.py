"""The clip norms and noise scales that float32 training can represent (torch-free: `dpdm plan` warns with it,
`dpdm train` and the DP baseline refuse with it; `dpdm.engine` re-exports it)."""
from __future__ import annotations

# The clip norms and noise scales float32 training represents: below MIN_CLIP_NORM a clipped gradient's
# coordinates round in float32's subnormal range, where the clip bound no longer holds (a gradient clipped to
# C = 8.9e-44 had norm 1.575 C); above MAX_NOISE_STD the noise, or a sum of clipped gradients, overflows to inf.
MIN_CLIP_NORM = 1e-30
MAX_NOISE_STD = 1e30


def noise_scale_problem(noise_multiplier: float, clip_norm: float) -> str | None:
    """Why a plan's clip norm and noise cannot be trained in float32 (`MIN_CLIP_NORM`, `MAX_NOISE_STD`), or
    None. The accountants take any; the engine's gradients and noise are float32 (bf16 is for --no-dp runs)."""
    if clip_norm < MIN_CLIP_NORM:
        return (f"clip_norm={clip_norm:g} is below {MIN_CLIP_NORM:g}: float32 gradients clipped to it round in "
                "float32's subnormal range, where the clip bound no longer holds")
    if max(clip_norm, noise_multiplier * clip_norm) > MAX_NOISE_STD:
        return (f"the noise std noise_multiplier x clip_norm = {noise_multiplier * clip_norm:g} (clip_norm "
                f"{clip_norm:g}) is above {MAX_NOISE_STD:g}: float32 noise overflows to inf")
    return None

