"""Samplers for the probability-flow ODE / reverse SDE in sigma-space (Karras et al. 2022).

One family with one signature, as k-diffusion's `sample_*`:
    sample_xxx(D, x, sigmas, *, class_labels=None, guidance=0.0, randn_like=torch.randn_like,
               callback=None, ...) -> x_0
`x` is the starting noise already scaled by sigmas[0]; `sigmas` is decreasing and ends in 0
(`get_sigmas_karras`). D is a preconditioned denoiser D(x, sigma [B], class_labels); VPrecond
works the same way, since it is also written in sigma-space.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch


# EDM's schedule defaults (Karras et al. 2022, Table 1).
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0

# Arithmetic of the network's evaluations. "bf16": the network runs under torch.autocast in
# bfloat16 (its convolutions and matmuls; the sampler's own arithmetic on x stays in the
# parameters' dtype). Fast on GPUs and on CPUs with AMX or AVX512-BF16; slow elsewhere.
PRECISIONS = ("fp32", "bf16")

# Image i of `generate` draws from seed + i; every such seed must be below 2**63 (torch.Generator's seeds
# are taken modulo 2**63 here, so a larger one would repeat seed - 2**63's images). On the CPU, torch's generator
# (mt19937) keeps only the low 32 bits of a seed: seeds that agree modulo 2**32 draw the same images there
# (`--seed 0` and `--seed 12884901888` wrote identical files; mut48, stop 47); CUDA's generator uses all 64.
MAX_SEED = 2**63 - 1

# Bounds of the sampler's options, so that an option value cannot overflow the arithmetic into NaN (which reads
# as broken weights) or exhaust memory. Steps: 10x DPDM's largest published setting (1,000, its README's churn
# example); 1e13 steps failed allocating an 80 TB schedule. Noise levels: float32 squares sigma (EDM's c_in,
# churn's sigma_hat**2), which overflows above 1.8e19 (sigma_max 1e38 gave NaN), and heun divides float32
# rounding of a guided D by sigma (sigma_min 1e-25 with guidance 100 gave NaN); within [1e-10, 1e10], over 1e7
# times beyond EDM's [0.002, 80], every sampler stayed finite with guidance 100 and S_noise 10 (the small U-Net).
# S_noise: EDM tunes it in [1, 1.01] (Table 5), k-diffusion's default is 1; 1e300 overflowed into NaN.
MAX_SAMPLER_STEPS = 10_000
SIGMA_LIMITS = (1e-10, 1e10)
MAX_S_NOISE = 10.0

# The fewest rows a network call of `generate` sees: a smaller batch is padded with copies of its images. On
# one row MKL runs a Linear layer as a gemv, and on a few rows as another gemm kernel, each rounding unlike a
# large batch; that flipped pixels of --n 1 against the same image in a larger batch. Measured on AVX512 CPUs
# (one thread): the small preset rounds alike from 3 rows on; the mnist preset from 6 rows at 8x8, but only from
# 16 at 16x16 to 28x28 (a 9-row batch flipped a pixel of 4 of 108 images by a grey level against a 16-row one).
# From 16 rows on, calls of 16 to 39, 64 and 256 rows round alike for both (the float outputs, not only images).
# Not so with MKL's AVX2 kernels (MKL_ENABLE_INSTRUCTIONS=AVX2, as MKL runs on AMD CPUs): calls of 16 to 31 rows
# still flip a pixel now and then by a grey level against 256 rows, whatever the padding short of the batch.
MIN_ROWS = 16


def first_seed_fits(seed, n: int) -> bool:
    """Whether `seed` is an integer (not a bool) with 0 <= seed and seed + n - 1 <= MAX_SEED."""
    return not isinstance(seed, bool) and int(seed) == seed and 0 <= int(seed) <= MAX_SEED - max(int(n) - 1, 0)


class NonFiniteSamplesError(RuntimeError):
    """The network produced NaN or inf: its weights, or the sampler's settings, are unusable (`first`: the
    index of the first such image). The uint8 conversion would otherwise turn NaN into black images
    without a word."""

    def __init__(self, message: str, first: int = 0) -> None:
        super().__init__(message)
        self.first = first


class ImagesMemoryError(MemoryError):
    """The uint8 buffer of all n images of `generate` does not fit in memory: a smaller n needs less, a smaller
    batch_size does not (the CLI's out-of-memory line named --batch-size)."""


class ScheduleError(ValueError):
    """A Karras schedule that cannot be used: `param` ("n", "sigma_min", "sigma_max" or "rho")
    is the argument at fault and `value` its value, so that a caller can name its own option."""

    def __init__(self, param: str, value, reason: str) -> None:
        super().__init__(f"{param}={value!r} {reason}")
        self.param, self.value, self.reason = param, value, reason


def autocast_for(precision: str, device: torch.device | str):
    """The context in which a network runs at `precision` ("fp32": none; "bf16": autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {PRECISIONS}")
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                          enabled=precision == "bf16")


def get_sigmas_karras(
    n: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5: n noise levels from sigma_max down to sigma_min, then a final 0.

    Returns:
        tensor [n + 1] in `dtype` (computed in float64).

    Raises:
        ScheduleError: n outside [1, MAX_SAMPLER_STEPS], a sigma outside SIGMA_LIMITS, or a schedule that does
          not run from sigma_max to sigma_min, finite and strictly decreasing, in `dtype`.
    """
    if int(n) != n or not 1 <= n <= MAX_SAMPLER_STEPS:
        raise ScheduleError("n", n, f"must be an integer in [1, {MAX_SAMPLER_STEPS:,}]")
    lo, hi = SIGMA_LIMITS
    for param, sigma in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if not lo <= sigma <= hi:
            raise ScheduleError(param, sigma, f"must lie in [{lo:g}, {hi:g}]: beyond it the sampler's float32 "
                                              f"arithmetic overflows into NaN")
    if not sigma_min < sigma_max:
        raise ScheduleError("sigma_min", sigma_min, f"must be below sigma_max={sigma_max!r}")
    if not (math.isfinite(rho) and rho > 0):
        raise ScheduleError("rho", rho, "must be a positive number")
    ramp = torch.linspace(0, 1, int(n), dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    try:
        max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    except OverflowError:
        max_inv_rho = min_inv_rho = math.inf
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    # A small rho overflows sigma ** (1 / rho), or cancels the low end to 0; a huge one rounds every level to 1.
    ends = (sigma_max, sigma_min) if n > 1 else (sigma_max,)
    if not (bool(torch.isfinite(sigmas).all())
            and all(abs(float(s) / e - 1) <= 1e-3 for s, e in zip(sigmas[[0, -1]], ends))):
        raise ScheduleError("rho", rho, f"gives no usable Karras schedule from sigma_max={sigma_max:g} to "
                                        f"sigma_min={sigma_min:g} (sigma ** (1 / rho) overflows or loses the range's "
                                        f"ends in float64); EDM's rho is 7")
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)
    if bool((sigmas[1:] >= sigmas[:-1]).any()):
        raise ScheduleError("n", n, f"noise levels from sigma_max={sigma_max:g} to sigma_min={sigma_min:g} are "
                                    f"not all distinct in {dtype}: use fewer steps or a wider range")
    return sigmas.to(device)


def guided_denoise(
    D: Callable,
    x: torch.Tensor,                          # [B, C, H, W]
    sigma: torch.Tensor | float,              # scalar noise level of the whole batch
    class_labels: torch.Tensor | None = None, # [B] or None
    guidance: float = 0.0,
    interval: tuple[float, float] | None = None,  # guide only where lo < sigma <= hi
) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022; DPDM `guidance_wrapper`):
    (1 + w) D(x, y) - w D(x, null), with null = D.num_classes. w = 0 is the conditional D.

    `interval` (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval"): outside
    (lo, hi] the step is unguided, one network call instead of two."""
    if interval is not None and not interval[0] < float(torch.as_tensor(sigma).max()) <= interval[1]:
        guidance = 0.0
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])  # [B]
    if guidance == 0 or class_labels is None:
        return D(x, sigma, class_labels)
    null = torch.full_like(class_labels, int(D.num_classes))
    both = D(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([class_labels, null]))  # [2B, ...]
    cond, uncond = both.chunk(2)
    return (1 + guidance) * cond - guidance * uncond


def _check_sigmas(sigmas: torch.Tensor) -> None:
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas of shape {tuple(sigmas.shape)} must be 1-D with at least 2 entries")
    if float(sigmas[-1]) != 0.0 or bool((sigmas[1:] >= sigmas[:-1]).any()):
        raise ValueError("sigmas must be strictly decreasing and end in 0 (see get_sigmas_karras)")


@torch.no_grad()
def sample_euler(D, x, sigmas, *, class_labels=None, guidance=0.0, randn_like=torch.randn_like, callback=None,
                 guidance_interval=None):
    """Euler on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma.

    This is DPDM's deterministic "DDIM" sampler: with sigmas ending in 0 the last step returns
    D(x; sigma_min), DPDM's final denoise. len(sigmas) - 1 network evaluations.
    """
    _check_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = guided_denoise(D, x, sigma, class_labels, guidance, guidance_interval)
        d = (x - denoised) / sigma
        x = x + d * (sigma_next - sigma).to(x.dtype)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
    return x


@torch.no_grad()
def sample_heun(D, x, sigmas, *, class_labels=None, guidance=0.0, randn_like=torch.randn_like, callback=None,
                guidance_interval=None):
    """Deterministic 2nd-order Heun sampler, Algorithm 1 of Karras et al. 2022."""
    return sample_churn(D, x, sigmas, class_labels=class_labels, guidance=guidance, randn_like=randn_like,
                        callback=callback, S_churn=0.0, guidance_interval=guidance_interval)


def churn_levels(sigmas: torch.Tensor, S_min: float, S_max: float) -> int:
    """How many noise levels of `sigmas` (the final 0 left out) `sample_churn` adds noise at: those in
    [S_min, S_max], compared as its loop compares them."""
    return sum(1 for sigma in sigmas[:-1] if S_min <= float(sigma) <= S_max)


def _churn_gamma(sigma: torch.Tensor, N: int, S_churn: float, S_min: float, S_max: float,
                 churn_limit: float) -> float:
    """gamma_i of Algorithm 2 (Karras et al. 2022): min(S_churn / N, churn_limit) for sigma in [S_min, S_max],
    else 0. One expression for the sampler and for `network_levels`, which must agree with it."""
    return min(S_churn / N, churn_limit) if S_min <= float(sigma) <= S_max else 0.0


def network_levels(sigmas: torch.Tensor, sampler: str = "euler", sampler_kwargs: dict | None = None) -> list[float]:
    """The noise levels at which `SAMPLERS[sampler]` (with `sampler_kwargs`) calls the network on the schedule
    `sigmas`, in order, computed as its loop computes them: sigma_i for euler; for heun and churn, sigma_hat_i (sigma_i
    raised by the churn) and sigma_{i+1} (Heun's correction, not taken at the final 0). `guided_denoise` compares
    these with a guidance interval."""
    import inspect

    _check_sigmas(sigmas)
    if sampler == "euler":
        return [float(sigma) for sigma in sigmas[:-1]]
    kw = {k: p.default for k, p in inspect.signature(sample_churn).parameters.items()
          if k in ("S_churn", "S_min", "S_max", "churn_limit")}
    kw.update({k: v for k, v in (sampler_kwargs or {}).items() if k in kw})
    if sampler == "heun":
        kw["S_churn"] = 0.0
    N, levels = len(sigmas) - 1, []
    for i in range(N):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        levels.append(float(sigma * (1 + _churn_gamma(sigma, N, **kw))))
        if float(sigma_next) != 0:
            levels.append(float(sigma_next))
    return levels


@torch.no_grad()
def sample_churn(
    D,
    x,
    sigmas,
    *,
    class_labels=None,
    guidance=0.0,
    randn_like=torch.randn_like,
    callback=None,
    S_churn: float = 100.0,                   # Total churn; gamma_i = min(S_churn / N, churn_limit) (DPDM: N=1000).
    S_min: float = 0.05,                      # Churn only for sigma in [S_min, S_max].
    S_max: float = 50.0,
    S_noise: float = 1.0,                     # Scale of the fresh noise.
    churn_limit: float = 1.0,                 # DPDM's cap on gamma_i (EDM uses sqrt(2) - 1).
    guidance_interval: tuple[float, float] | None = None,  # see guided_denoise
):
    """Stochastic Heun sampler, Algorithm 2 of Karras et al. 2022 (DPDM `edm_sampler`).

    Defaults are DPDM's README setting for its best MNIST FID (s_churn=100, s_min=0.05, s_max=50), which it ran
    with 1,000 steps: gamma_i = 100 / 1000 = 0.1. S_churn is a total spread over the N steps, so with fewer steps
    the same 100 churns more per step (at 50 steps gamma_i = min(2, churn_limit) = 1, sigma doubled); S_churn =
    0.1 * N keeps DPDM's per-step churn. S_churn = 0 gives Algorithm 1 (Heun).
    """
    _check_sigmas(sigmas)
    if S_churn < 0 or S_noise < 0 or churn_limit < 0:
        raise ValueError(f"S_churn={S_churn!r}, S_noise={S_noise!r}, churn_limit={churn_limit!r} must be >= 0")
    if not S_noise <= MAX_S_NOISE:
        raise ValueError(f"S_noise={S_noise!r} must be at most {MAX_S_NOISE:g} (MAX_S_NOISE)")
    if S_churn > 0 and not S_min < S_max:
        raise ValueError(f"S_min={S_min!r} must be below S_max={S_max!r} (else no step churns)")
    if S_churn > 0 and not churn_levels(sigmas, S_min, S_max):   # a window between two levels: Heun, unasked
        raise ValueError(f"no noise level of sigmas lies in [S_min, S_max] = [{S_min!r}, {S_max!r}], so no step "
                         f"churns; S_churn=0 is Heun")
    N = len(sigmas) - 1
    for i in range(N):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = _churn_gamma(sigma, N, S_churn, S_min, S_max, churn_limit)
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            eps = randn_like(x) * S_noise
            x = x + eps * (sigma_hat**2 - sigma**2).sqrt().to(x.dtype)
        denoised = guided_denoise(D, x, sigma_hat, class_labels, guidance, guidance_interval)
        d = (x - denoised) / sigma_hat
        dt = (sigma_next - sigma_hat).to(x.dtype)
        if float(sigma_next) == 0:
            x = x + d * dt                                      # Euler step to sigma = 0
        else:
            x_euler = x + d * dt
            denoised_2 = guided_denoise(D, x_euler, sigma_next, class_labels, guidance, guidance_interval)
            d_2 = (x_euler - denoised_2) / sigma_next
            x = x + (d + d_2) / 2 * dt                          # Heun correction
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})
    return x


SAMPLERS: dict[str, Callable] = {"euler": sample_euler, "heun": sample_heun, "churn": sample_churn}


class StackedRandomGenerator:
    """One torch.Generator per image (EDM's `StackedRandomGenerator`): image i's randomness depends
    only on its own seed, so results do not depend on how images are batched."""

    def __init__(self, device: torch.device | str, seeds: Sequence[int]) -> None:
        self.generators = [torch.Generator(device).manual_seed(int(s) % (1 << 63)) for s in seeds]

    def randn(self, size, **kwargs) -> torch.Tensor:
        size = tuple(size)
        if size[0] != len(self.generators):
            raise ValueError(f"size[0]={size[0]!r} must equal the number of seeds ({len(self.generators)})")
        return torch.stack([torch.randn(size[1:], generator=g, **kwargs) for g in self.generators])

    def randn_like(self, input: torch.Tensor) -> torch.Tensor:
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)


def _labels_for(n: int, labels, num_classes: int) -> torch.Tensor | None:
    if num_classes == 0:
        if labels is not None:
            raise ValueError("labels must be None for an unconditional model (num_classes=0)")
        return None
    if labels is None:
        return torch.arange(n, dtype=torch.int64) % num_classes        # balanced: image i has class i % C
    if isinstance(labels, int):
        labels = [labels] * n
    y = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if len(y) != n:
        raise ValueError(f"labels has {len(y)} entries; must have n={n}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) > num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}] (num_classes={num_classes} is the null class)")
    return y


@torch.no_grad()
def generate(
    D,
    *,
    n: int,
    labels=None,                              # None: image i gets class i % num_classes; or an int, or [n] ints
    seed: int = 0,
    sampler: str = "euler",
    sampler_steps: int = 50,
    guidance: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,  # guide only for sigma in (lo, hi]
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    sampler_kwargs: dict | None = None,       # extra keywords for the sampler (e.g. S_churn for "churn")
    sigma_min: float = SIGMA_MIN,             # Karras schedule (EDM's defaults); the last step returns
    sigma_max: float = SIGMA_MAX,             # D(x; sigma_min), so a larger sigma_min ends on a
    rho: float = RHO,                         # posterior mean instead of the lowest noise levels
    precision: str = "fp32",                  # "bf16": the network under bfloat16 autocast (PRECISIONS)
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw n images; image i uses seed `seed + i`, so results do not depend on batch_size. (The network's
    float rounding can still vary with the batch, by about 1e-7, e.g. in elementwise ops split across threads;
    a batch below MIN_ROWS is padded to avoid the largest such effect, so the uint8 images match in practice.)
    0 <= seed and seed + n - 1 <= MAX_SEED (2**63 - 1).

    Returns:
        x uint8 [n, C, H, W] (data in [-1, 1] mapped to [0, 255]) and y int64 [n] (None if unconditional).

    Raises:
        ImagesMemoryError: the uint8 buffer of all n images cannot be allocated.
        NonFiniteSamplesError: the network's output (hence a batch of images) is not finite.
        ScheduleError: sampler_steps, sigma_min, sigma_max or rho give no usable schedule (get_sigmas_karras).
    """
    if int(n) != n or n < 0:
        raise ValueError(f"n={n!r} must be a non-negative integer")
    if not first_seed_fits(seed, n):
        raise ValueError(f"seed={seed!r} must be an integer with 0 <= seed and seed + n - 1 <= 2**63 - 1 "
                         f"(image i uses seed + i)")
    seed = int(seed)
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} must be one of {sorted(SAMPLERS)}")
    if not (math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"guidance={guidance!r} must be a non-negative float")
    if guidance_interval is not None:
        lo, hi = (float(v) for v in guidance_interval)
        if not 0 <= lo < hi:
            raise ValueError(f"guidance_interval={guidance_interval!r} must be (lo, hi) with 0 <= lo < hi")
        guidance_interval = (lo, hi)
    num_classes = int(D.num_classes)
    y = _labels_for(int(n), labels, num_classes)
    C, R = int(D.img_channels), int(D.img_resolution)
    params = list(D.parameters()) if isinstance(D, torch.nn.Module) else []
    dtype = params[0].dtype if params else torch.float32
    sigmas = get_sigmas_karras(sampler_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, device=device,
                               dtype=dtype)
    sample = SAMPLERS[sampler]
    autocast = autocast_for(precision, device)
    try:
        out = torch.empty((int(n), C, R, R), dtype=torch.uint8)
    except RuntimeError as e:   # torch's allocators ("can't allocate memory", "std::bad_alloc", OutOfMemoryError)
        raise ImagesMemoryError(f"{int(n) * C * R * R / 2**30:.3g} GiB for the uint8 images could not be "
                                f"allocated") from e
    for start in range(0, int(n), int(batch_size)):
        stop = min(start + int(batch_size), int(n))
        # A batch below MIN_ROWS images (--n 1, a trailing batch) is padded with copies of its images, same
        # seeds and labels, dropped after sampling, so that its images round as they do in a larger batch.
        rows = [start + k % (stop - start) for k in range(max(stop - start, MIN_ROWS))]
        rnd = StackedRandomGenerator(device, [seed + i for i in rows])
        x = rnd.randn((len(rows), C, R, R), device=device, dtype=dtype) * sigmas[0]
        y_b = None if y is None else y[rows].to(device)
        with autocast:
            x = sample(D, x, sigmas, class_labels=y_b, guidance=guidance, guidance_interval=guidance_interval,
                       randn_like=rnd.randn_like,
                       **(sampler_kwargs or {}))
        x = x[:stop - start]
        finite = torch.isfinite(x).flatten(1).all(1)   # [B]
        if not bool(finite.all()):
            raise NonFiniteSamplesError(f"the network produced non-finite values (NaN or inf) for images "
                                        f"{start}..{stop - 1}", first=start + int((~finite).nonzero()[0]))
        out[start:stop] = (x * 127.5 + 128).clip(0, 255).to(torch.uint8).cpu()
    return out, y
