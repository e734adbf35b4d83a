"""Samplers: schedule, convergence on toy denoisers, guidance, per-image seeds."""

import math

import pytest
import torch

from dpdm.networks import build_network
from dpdm.precond import EDMPrecond, VPrecond
from dpdm.sampling import (
    StackedRandomGenerator,
    generate,
    get_sigmas_karras,
    guided_denoise,
    sample_churn,
    sample_euler,
    sample_heun,
)

SAMPLERS = [sample_euler, sample_heun, sample_churn]




class PointD:
    """Exact denoiser for data that is one point per class: D(x; sigma, y) = x0[y]."""

    num_classes = 2

    def __init__(self, points):
        self.points = points        # [num_classes + 1, C, H, W]
        self.calls = []

    def __call__(self, x, sigma, class_labels=None):
        assert sigma.shape == (x.shape[0],)
        self.calls.append(None if class_labels is None else class_labels.clone())
        y = torch.zeros(x.shape[0], dtype=torch.long) if class_labels is None else class_labels
        return self.points[y].to(x.dtype)


class GaussD:
    """Exact denoiser for data ~ N(mu, s^2) per pixel: D = mu + s^2 / (s^2 + sigma^2) (x - mu)."""

    num_classes = 0

    def __init__(self, mu, s):
        self.mu, self.s = mu, s

    def __call__(self, x, sigma, class_labels=None):
        sigma = sigma.reshape(-1, 1, 1, 1)
        return self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)


def test_karras_schedule():
    s = get_sigmas_karras(10)
    assert s.shape == (11,) and s.dtype == torch.float64
    assert s[0].item() == pytest.approx(80.0) and s[9].item() == pytest.approx(0.002) and s[10] == 0
    assert (s[1:] < s[:-1]).all()
    i, n, rho = 4, 10, 7
    expected = (80 ** (1 / rho) + i / (n - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    assert s[i].item() == pytest.approx(expected, rel=1e-12)
    assert get_sigmas_karras(1, sigma_max=5.0).tolist() == pytest.approx([5.0, 0.0])
    with pytest.raises(ValueError, match="n=0"):
        get_sigmas_karras(0)
    with pytest.raises(ValueError, match="sigma_min"):
        get_sigmas_karras(5, sigma_min=10.0, sigma_max=1.0)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_single_point_data_is_reached(sampler):
    points = torch.randn(3, 1, 4, 4)
    D = PointD(points)
    x = torch.randn(5, 1, 4, 4) * 80
    y = torch.tensor([0, 1, 1, 0, 1])
    out = sampler(D, x, get_sigmas_karras(8).float(), class_labels=y)
    torch.testing.assert_close(out, points[y], rtol=0, atol=1e-4)


def test_call_counts_and_callback():
    D = PointD(torch.zeros(3, 1, 2, 2))
    sigmas = get_sigmas_karras(6)
    seen = []
    sample_euler(D, torch.randn(1, 1, 2, 2) * 80, sigmas, callback=lambda d: seen.append(d["i"]))
    assert len(D.calls) == 6 and seen == list(range(6))   # N evaluations, like DPDM's "DDIM"
    D.calls.clear()
    sample_heun(D, torch.randn(1, 1, 2, 2) * 80, sigmas)
    assert len(D.calls) == 2 * 6 - 1                      # EDM Algorithm 1: 2N - 1


def test_heun_is_second_order_on_gaussian_data():
    mu, s = 0.3, 0.5
    D = GaussD(mu, s)
    x = torch.randn(64, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80
    # Exact PF-ODE solution: (x - mu) / sqrt(s^2 + sigma^2) is constant along the trajectory.
    exact = mu + (x - mu) * s / math.sqrt(s**2 + 80**2)
    errs = {}
    for name, sampler in [("euler", sample_euler), ("heun", sample_heun)]:
        for n in (16, 32):
            out = sampler(D, x, get_sigmas_karras(n))
            errs[name, n] = (out - exact).abs().max().item()
    # Measured: euler 0.27 -> 0.14 (1st order), heun 0.11 -> 0.025 (2nd order); samples span +-1.6.
    assert errs["heun", 32] < 0.05 and errs["heun", 32] < errs["euler", 32] / 4
    assert errs["heun", 32] < errs["heun", 16] / 3        # ~4x per halving for a 2nd-order method
    assert errs["euler", 32] < errs["euler", 16] / 1.7    # ~2x for a 1st-order method


def test_churn_samples_gaussian_data():
    mu, s = -0.2, 0.4
    D = GaussD(mu, s)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 1, 1, 1, dtype=torch.float64, generator=g) * 80
    out = sample_churn(D, x, get_sigmas_karras(40), randn_like=lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype),
                       S_churn=40, S_min=0.05, S_max=50)
    assert abs(out.mean().item() - mu) < 0.03 and abs(out.std().item() - s) < 0.03


@pytest.mark.parametrize("S_min, S_max", [(60.0, 50.0), (0.05, 0.01), (5.0, 5.0)])
def test_churn_over_an_empty_range_is_refused(S_min, S_max):
    """S_min >= S_max churns at no step: Heun's samples, recorded as churn."""
    x = torch.randn(3, 1, 2, 2) * 80
    with pytest.raises(ValueError, match="S_min=.* must be below S_max"):
        sample_churn(GaussD(0.1, 0.5), x, get_sigmas_karras(5), S_min=S_min, S_max=S_max)


def test_churn_with_zero_churn_is_heun():
    D = GaussD(0.1, 0.5)
    x = torch.randn(3, 1, 2, 2) * 80
    sig = get_sigmas_karras(10)
    torch.testing.assert_close(sample_churn(D, x, sig, S_churn=0.0), sample_heun(D, x, sig))


def test_guidance_formula_and_zero_guidance_is_conditional():
    points = torch.randn(3, 1, 2, 2)
    D = PointD(points)
    x, y = torch.randn(2, 1, 2, 2), torch.tensor([0, 1])
    w = 1.5
    expected = (1 + w) * points[y] - w * points[2]   # null class = num_classes = 2
    torch.testing.assert_close(guided_denoise(D, x, 3.0, y, w), expected)
    D.calls.clear()
    torch.testing.assert_close(guided_denoise(D, x, 3.0, y, 0.0), points[y])
    assert len(D.calls) == 1 and torch.equal(D.calls[0], y)  # w = 0 never evaluates the null class
    # Whole sampler: guidance 0 equals sampling the conditional D, and guidance moves the result.
    net = build_network("small", img_resolution=8, img_channels=1, num_classes=2, init_scale=1.0)
    Dn = EDMPrecond(net)
    xT = torch.randn(2, 1, 8, 8) * 80
    sig = get_sigmas_karras(3).float()
    plain = sample_euler(lambda a, s, c: Dn(a, s, c), xT, sig, class_labels=y)
    torch.testing.assert_close(sample_euler(Dn, xT, sig, class_labels=y, guidance=0.0), plain, rtol=0, atol=0)
    assert not torch.allclose(sample_euler(Dn, xT, sig, class_labels=y, guidance=2.0), plain)


def test_guidance_interval_guides_only_inside_it():
    points = torch.randn(3, 1, 2, 2)
    D = PointD(points)
    x, y = torch.randn(2, 1, 2, 2), torch.tensor([0, 1])
    guided = 3 * points[y] - 2 * points[2]
    for sigma, inside in ((0.5, False), (1.0, True), (4.0, True), (4.5, False)):   # (lo, hi] = (0.5, 4]
        D.calls.clear()
        out = guided_denoise(D, x, sigma, y, 2.0, (0.5, 4.0))
        torch.testing.assert_close(out, guided if inside else points[y])
        assert len(D.calls) == 1 and (D.calls[0].tolist() == [0, 1, 2, 2]) == inside  # one call outside
    # Through every sampler: an interval that holds no step of the schedule is unguided, and one
    # that holds them all is the plain guided sampler.
    net = build_network("small", img_resolution=8, img_channels=1, num_classes=2, init_scale=1.0)
    Dn = EDMPrecond(net)
    xT = torch.randn(2, 1, 8, 8) * 80
    sig = get_sigmas_karras(4).float()
    for sampler in (sample_euler, sample_heun, sample_churn):
        kw = {"randn_like": lambda a: torch.ones_like(a)}
        plain = sampler(Dn, xT, sig, class_labels=y, **kw)
        full = sampler(Dn, xT, sig, class_labels=y, guidance=1.0, **kw)
        assert not torch.allclose(full, plain)
        torch.testing.assert_close(sampler(Dn, xT, sig, class_labels=y, guidance=1.0, guidance_interval=(100, 200), **kw),
                                   plain, rtol=0, atol=0)
        torch.testing.assert_close(sampler(Dn, xT, sig, class_labels=y, guidance=1.0, guidance_interval=(0, 1e4), **kw),
                                   full, rtol=0, atol=0)
        part = sampler(Dn, xT, sig, class_labels=y, guidance=1.0, guidance_interval=(0.01, 10), **kw)
        assert not torch.allclose(part, plain) and not torch.allclose(part, full)
    for bad in ((2.0, 1.0), (-1.0, 1.0), (1.0, 1.0)):
        with pytest.raises(ValueError, match="guidance_interval"):
            generate(Dn, n=1, guidance=1.0, guidance_interval=bad)


def test_stacked_random_generator_one_seed_per_image():
    rnd = StackedRandomGenerator("cpu", [7, 8, 9])
    z = rnd.randn((3, 2, 2))
    for i, seed in enumerate([7, 8, 9]):
        assert torch.equal(z[i], torch.randn((2, 2), generator=torch.Generator().manual_seed(seed)))
    with pytest.raises(ValueError, match="size"):
        rnd.randn((2, 2, 2))


@pytest.fixture(scope="module")
def tiny_denoisers():
    torch.manual_seed(0)
    net_c = build_network("small", img_resolution=8, img_channels=1, num_classes=3, init_scale=1.0)
    net_u = build_network("small", img_resolution=8, img_channels=3, num_classes=0, init_scale=1.0)
    return EDMPrecond(net_c), VPrecond(net_u)


@pytest.mark.parametrize("sampler", ["euler", "churn"])
def test_generate_does_not_depend_on_batch_size(tiny_denoisers, sampler):
    D, _ = tiny_denoisers
    kw = dict(n=5, seed=11, sampler=sampler, sampler_steps=4, guidance=0.5)
    x_a, y_a = generate(D, batch_size=5, **kw)
    x_b, y_b = generate(D, batch_size=2, **kw)
    assert x_a.dtype == torch.uint8 and x_a.shape == (5, 1, 8, 8)
    assert torch.equal(y_a, torch.tensor([0, 1, 2, 0, 1])) and torch.equal(y_a, y_b)
    assert torch.equal(x_a, x_b)
    # Image i depends only on seed + i: a run starting at seed 12 reproduces images 1..4.
    x_c, _ = generate(D, n=4, labels=[1, 2, 0, 1], seed=12, sampler=sampler, sampler_steps=4, guidance=0.5)
    assert torch.equal(x_c, x_a[1:])
    assert not torch.equal(x_a[0], x_a[3])


def test_generate_unconditional_and_errors(tiny_denoisers):
    D_c, D_u = tiny_denoisers
    x, y = generate(D_u, n=3, sampler="heun", sampler_steps=3, batch_size=2)
    assert x.shape == (3, 3, 8, 8) and x.dtype == torch.uint8 and y is None
    x0, y0 = generate(D_u, n=0, sampler_steps=2)
    assert x0.shape == (0, 3, 8, 8)
    with pytest.raises(ValueError, match="sampler='ddpm'"):
        generate(D_c, n=2, sampler="ddpm")
    with pytest.raises(ValueError, match="labels"):
        generate(D_u, n=2, labels=[0, 1])
    with pytest.raises(ValueError, match="n=3"):
        generate(D_c, n=3, labels=[0, 1])
    with pytest.raises(ValueError, match="guidance"):
        generate(D_c, n=2, guidance=-1.0)


def test_generate_schedule_options(tiny_denoisers):
    D, _ = tiny_denoisers
    kw = dict(n=3, seed=5, sampler="euler", sampler_steps=4)
    base = generate(D, **kw)[0]
    assert torch.equal(generate(D, sigma_min=0.002, sigma_max=80.0, rho=7.0, **kw)[0], base)
    assert not torch.equal(generate(D, sigma_min=0.3, **kw)[0], base)
    with pytest.raises(ValueError, match="sigma_min"):
        generate(D, sigma_min=100.0, **kw)


def test_generate_bf16_close_to_fp32_and_batch_independent(tiny_denoisers):
    D, _ = tiny_denoisers
    kw = dict(n=6, seed=3, sampler="heun", sampler_steps=4, guidance=0.5)
    x32 = generate(D, **kw)[0]
    x16 = generate(D, precision="bf16", batch_size=4, **kw)[0]
    assert x16.dtype == torch.uint8 and x16.shape == x32.shape
    diff = (x16.int() - x32.int()).abs()
    assert 0 < diff.sum() and diff.float().mean() < 4     # bf16 arithmetic, the same images (1.6 here)
    assert torch.equal(generate(D, precision="bf16", batch_size=6, **kw)[0], x16)
    assert torch.equal(generate(D, precision="fp32", **kw)[0], x32)
    with pytest.raises(ValueError, match="precision='fp16'"):
        generate(D, precision="fp16", **kw)


# --- review mends: non-finite output and the seed range ------------------------------------------

class ConstD:
    """An unconditional 1x4x4 'network' whose every output is `value` (NaN, inf or a number)."""

    num_classes, img_channels, img_resolution = 0, 1, 4

    def __init__(self, value):
        self.value = value

    def __call__(self, x, sigma, class_labels=None):
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_generate_refuses_non_finite_output(value):
    """(x * 127.5 + 128).clip(0, 255).to(uint8) turned NaN into 0: all-black images and no error."""
    from dpdm.sampling import NonFiniteSamplesError

    with pytest.raises(NonFiniteSamplesError, match=r"non-finite values \(NaN or inf\) for images 0\.\.1"):
        generate(ConstD(value), n=4, batch_size=2, sampler_steps=2)
    # The first batch is fine, the second is not (Euler with 2 steps calls the network twice a batch).
    with pytest.raises(NonFiniteSamplesError, match=r"for images 2\.\.3"):
        generate(_FiniteThenNot(value), n=4, batch_size=2, sampler_steps=2)
    x, _ = generate(ConstD(0.5), n=2, sampler_steps=2)
    assert x.dtype == torch.uint8 and int(x.min()) > 0


class _FiniteThenNot(ConstD):
    """Finite for the first batch of 2 images, then `value`."""

    def __init__(self, value):
        super().__init__(value)
        self.seen = 0

    def __call__(self, x, sigma, class_labels=None):
        self.seen += 1
        return torch.zeros_like(x) if self.seen <= 2 else torch.full_like(x, self.value)


def test_generate_refuses_seeds_past_2_to_the_63():
    """Per-image seeds were taken modulo 2**63: seed 2**63 reproduced seed 0's images."""
    D = ConstD(0.0)
    top = 2**63 - 1
    assert generate(D, n=2, seed=top - 1, sampler_steps=2)[0].shape == (2, 1, 4, 4)
    for seed, n in ((top, 2), (2**63, 1), (-1, 1), (1.5, 1)):
        with pytest.raises(ValueError, match="seed"):
            generate(D, n=n, seed=seed, sampler_steps=2)


# --- review mends: batch-size independence and schedule bounds ------------------------------------

class _BatchSizes:
    """Wraps a denoiser and records the batch size of every network call."""

    def __init__(self, D):
        self.D, self.sizes = D, []
        self.num_classes, self.img_channels, self.img_resolution = D.num_classes, D.img_channels, D.img_resolution

    def __call__(self, x, sigma, class_labels=None):
        self.sizes.append(x.shape[0])
        return self.D(x, sigma, class_labels)


def test_a_small_batch_is_padded_so_its_images_match_a_larger_batch(tiny_denoisers):
    """On one row the network's Linear layers ran as a gemv, whose rounding differs from a batch's gemm: image 0
    of n=1, seed=26 differed from image 0 of n=8, seed=26 by a grey level here, as did a trailing batch of one.
    The float rounding depends on the CPU's kernels, so the call sizes are checked too."""
    from dpdm.sampling import MIN_ROWS

    D, _ = tiny_denoisers
    kw = dict(sampler="euler", sampler_steps=4)
    eight = generate(D, n=8, seed=26, **kw)[0]
    assert torch.equal(generate(D, n=1, seed=26, **kw)[0], eight[:1])
    trailing = generate(D, n=9, seed=18, labels=0, batch_size=8, **kw)[0]   # image 8: seed 26, label 0
    assert trailing.shape == (9, 1, 8, 8) and torch.equal(trailing[8:], eight[:1])
    spy = _BatchSizes(D)
    for sampler in ("euler", "heun", "churn"):   # batches of 4, 4 and 1; guided and unguided steps
        x, y = generate(spy, n=9, seed=3, sampler=sampler, sampler_steps=3, batch_size=4, guidance=0.5,
                        guidance_interval=(0.0, 1.0))
        assert x.shape == (9, 1, 8, 8) and y.tolist() == [i % 3 for i in range(9)]
    generate(spy, n=1, sampler_steps=2)
    assert min(spy.sizes) == MIN_ROWS and set(spy.sizes) == {MIN_ROWS, 2 * MIN_ROWS}


@pytest.mark.parametrize("kwargs, param", [
    (dict(rho=0.001), "rho"),                              # sigma_max ** (1 / rho): OverflowError
    (dict(rho=0.05), "rho"),                               # the low end cancels to 0
    (dict(rho=1e300), "rho"),                              # every level rounds to 1
    (dict(rho=math.inf), "rho"),
    (dict(sigma_max=1e300), "sigma_max"),                  # inf in float32
    (dict(sigma_max=1e38), "sigma_max"),                   # finite in float32, but sigma**2 overflows
    (dict(sigma_min=1e-300), "sigma_min"),                 # 0 in float32
    (dict(n=10**13), "n"),                                 # an 80 TB schedule
    (dict(n=10_001), "n"),
    (dict(n=50, sigma_min=1.0, sigma_max=1.000001), "n"),  # 50 levels that float32 cannot tell apart
])
def test_unusable_schedules_name_their_argument(kwargs, param):
    """These raised OverflowError, gave inf or 0 in float32 (then 'sigmas must be strictly decreasing' from
    the sampler), or tried to allocate the schedule; each is now a ScheduleError naming its argument."""
    from dpdm.sampling import ScheduleError

    kwargs = {"n": 10, **kwargs}
    with pytest.raises(ScheduleError) as e:
        get_sigmas_karras(kwargs.pop("n"), dtype=torch.float32, **kwargs)
    assert e.value.param == param and str(e.value).startswith(f"{param}=")


def test_schedule_limits_hold_usable_values(tiny_denoisers):
    """The limits refuse only what cannot be sampled: their ends sample finitely, and rho from 0.5 to 1e6 works."""
    from dpdm.sampling import MAX_S_NOISE, MAX_SAMPLER_STEPS, SIGMA_LIMITS, ScheduleError

    lo, hi = SIGMA_LIMITS
    s = get_sigmas_karras(MAX_SAMPLER_STEPS, sigma_min=lo, sigma_max=hi, dtype=torch.float32)
    assert s.dtype == torch.float32 and len(s) == MAX_SAMPLER_STEPS + 1 and bool((s[1:] < s[:-1]).all())
    for rho in (0.5, 1.0, 3.0, 7.0, 100.0, 1e6):
        s = get_sigmas_karras(20, rho=rho)
        assert s[0].item() == pytest.approx(80.0, rel=1e-6) and s[-2].item() == pytest.approx(0.002, rel=1e-6)
    D, _ = tiny_denoisers
    for sampler in ("euler", "heun", "churn"):
        kw = {"S_noise": MAX_S_NOISE, "S_min": 0.0, "S_max": 2 * hi} if sampler == "churn" else {}
        x, _ = generate(D, n=2, sampler=sampler, sampler_steps=4, sigma_min=lo, sigma_max=hi, guidance=10.0,
                        sampler_kwargs=kw)   # NonFiniteSamplesError if any of it overflowed
    with pytest.raises(ScheduleError, match="rho=0.001"):
        generate(D, n=1, sampler_steps=4, rho=0.001)
    with pytest.raises(ValueError, match="S_noise=1e[+]300"):
        sample_churn(D, torch.zeros(2, 1, 8, 8), get_sigmas_karras(3).float(), S_noise=1e300)


# --- review mends (sampling review, stop 43): churn against Algorithm 2, the uint8 mapping, option errors ----

class WavyD:
    """A nonlinear denoiser. With an exact Gaussian one (GaussD) churn gives the right distribution whatever its
    gamma_i, so a gamma without its / N, without its cap, or noise without S_noise passed every test."""

    num_classes = 0

    def __call__(self, x, sigma, class_labels=None):
        sigma = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        return torch.tanh(x / (1 + sigma)) + 0.1 * x.roll(1, dims=-1) / (1 + sigma**2)


def edm_algorithm_2(D, x, t, *, S_churn, S_min, S_max, S_noise, cap, noise):
    """Algorithm 2 of Karras et al. 2022, transcribed line by line, with DPDM's cap on gamma_i (`churn_limit`; EDM's
    is sqrt(2) - 1) and fresh noise (from the iterator `noise`) drawn only where gamma_i > 0, as DPDM does.
    `t` is the schedule as floats. Returns x_N and the gamma_i."""
    N = len(t) - 1
    at = lambda s: torch.full((len(x),), s, dtype=x.dtype)   # noqa: E731
    gammas = []
    for i in range(N):
        gamma = min(S_churn / N, cap) if S_min <= t[i] <= S_max else 0.0
        gammas.append(gamma)
        t_hat = t[i] + gamma * t[i]
        x_hat = x
        if gamma > 0:
            eps = S_noise * next(noise)                                # eps_i ~ N(0, S_noise^2 I)
            x_hat = x + math.sqrt(t_hat**2 - t[i]**2) * eps
        d = (x_hat - D(x_hat, at(t_hat))) / t_hat
        x_next = x_hat + (t[i + 1] - t_hat) * d
        if t[i + 1] != 0:
            d_2 = (x_next - D(x_next, at(t[i + 1]))) / t[i + 1]
            x_next = x_hat + (t[i + 1] - t_hat) * (d / 2 + d_2 / 2)
        x = x_next
    return x, gammas


@pytest.mark.parametrize("S_churn, S_noise, cap", [
    (3.0, 1.5, None),                  # gamma 0.3: below the cap (a gamma without / N is 1)
    (100.0, 1.007, None),              # S_churn / N = 10: capped at DPDM's 1 (the default churn_limit)
    (5.0, 1.0, math.sqrt(2) - 1),      # EDM's cap, passed as churn_limit
])
def test_churn_follows_algorithm_2_step_by_step(S_churn, S_noise, cap):
    N, S_min, S_max = 10, 0.05, 50.0   # the window leaves out the top level (80) and the lowest ones
    sigmas = get_sigmas_karras(N)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=g) * 80
    noises = [torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=g) for _ in range(N)]
    drawn = iter(noises)
    seen = []
    kw = {} if cap is None else {"churn_limit": cap}
    got = sample_churn(WavyD(), x0, sigmas, randn_like=lambda t: next(drawn), S_churn=S_churn, S_min=S_min,
                       S_max=S_max, S_noise=S_noise, callback=lambda d: seen.append(float(d["sigma_hat"] / d["sigma"])),
                       **kw)
    expected, gammas = edm_algorithm_2(WavyD(), x0, sigmas.tolist(), S_churn=S_churn, S_min=S_min, S_max=S_max,
                                       S_noise=S_noise, cap=1.0 if cap is None else cap, noise=iter(noises))
    assert 0 < sum(g > 0 for g in gammas) < N                          # some steps churn, some do not
    assert seen == pytest.approx([1 + g for g in gammas], rel=1e-14)   # sigma_hat = sigma (1 + gamma_i)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


class LevelsD:
    """An unconditional 'network' whose output is, whatever its input, the 1x16x16 image of the 256 grey levels
    (pixel p at level p) in [-1, 1], shifted by `offset` grey levels."""

    num_classes, img_channels, img_resolution = 0, 1, 16

    def __init__(self, offset):
        self.offset = offset

    def __call__(self, x, sigma, class_labels=None):
        levels = torch.arange(256, dtype=x.dtype).reshape(1, 1, 16, 16)
        return ((levels + self.offset) / 127.5 - 1).expand(x.shape)


@pytest.mark.parametrize("offset", [0.0, -0.45, 0.45])
def test_uint8_conversion_rounds_each_grey_level_to_itself(offset):
    """Every grey level v in 0..255, written as v / 127.5 - 1 by the network and up to 0.45 of a level off, comes
    back as v (round to nearest, as EDM's x * 127.5 + 128); a truncating x * 127.5 + 127.5 made images half a level
    dark and passed every test (the only uint8 test was the NaN one)."""
    x, _ = generate(LevelsD(offset), n=2, sampler_steps=2)
    for image in x:
        assert torch.equal(image.flatten(), torch.arange(256).to(torch.uint8))
    assert int(generate(ConstD(-5.0), n=2, sampler_steps=2)[0].max()) == 0       # clipped, no wraparound
    assert int(generate(ConstD(5.0), n=2, sampler_steps=2)[0].min()) == 255


def test_churn_window_between_two_noise_levels_is_refused():
    """A window holding no level of the schedule churned nowhere: Heun's samples, recorded as churn."""
    sigmas = get_sigmas_karras(4)   # 80, 9.72, 0.47, 0.002, 0
    x = torch.randn(2, 1, 2, 2) * 80
    for S_min, S_max in ((60.0, 70.0), (1e-4, 1e-3), (90.0, 100.0)):
        with pytest.raises(ValueError, match=r"no noise level of sigmas lies in \[S_min, S_max\]"):
            sample_churn(GaussD(0.1, 0.5), x, sigmas, S_min=S_min, S_max=S_max)
        sample_churn(GaussD(0.1, 0.5), x, sigmas, S_churn=0.0, S_min=S_min, S_max=S_max)   # S_churn 0: Heun
    sample_churn(GaussD(0.1, 0.5), x, sigmas, S_min=9.0, S_max=10.0)   # one level (9.72) in the window


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-step private run on 24 random 8x8 images (v-prediction), trained on noise levels 0.1 to 10 only."""
    from tests.dpdm.test_checkpoint_integrity import train_tiny_run

    d = tmp_path_factory.mktemp("sample_options")
    train_tiny_run(d, 2, "--precond", "v", "--train-sigma", "0.1", "10")
    return d / "run"


def _sample_error(run, tmp_path, capsys, *extra):
    """The one error line (exit 2) of `dpdm sample` with `extra`; nothing written."""
    from cli.main import main

    code = main(["sample", "--run", str(run), "--out", str(tmp_path / "s.npz"), "--device", "cpu",
                 *[str(a) for a in extra]])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dpdm: error: "), err
    assert not list(tmp_path.iterdir())
    return lines[0].removeprefix("dpdm: error: ")


def test_sample_refuses_a_churn_window_with_no_level_of_the_schedule(trained_run, tmp_path, capsys):
    levels = get_sigmas_karras(4, sigma_min=0.1, sigma_max=10.0, dtype=torch.float32)[:-1].tolist()
    between = (levels[2] * 1.01, levels[1] * 0.99)   # the run's default schedule: 10 down to 0.1
    for window in (between, (20.0, 30.0), (0.01, 0.05)):
        line = _sample_error(trained_run, tmp_path, capsys, "--n", 2, "--sampler", "churn", "--sampler-steps", 4,
                             "--s-min", window[0], "--s-max", window[1])
        assert line.startswith(f"--s-min {window[0]:g} --s-max {window[1]:g}: none of the schedule's 4 noise levels")
        assert "no step would churn" in line
    line = _sample_error(trained_run, tmp_path, capsys, "--n", 2, "--sampler", "churn", "--sampler-steps", 4,
                         "--sigma-min", 60, "--sigma-max", 70)   # the default window [0.05, 50] holds none either
    assert line.startswith("--s-min 0.05 (default) --s-max 50 (default): none of the schedule's 4 noise levels")


def test_sample_errors_name_the_option_given(trained_run, tmp_path, capsys):
    line = _sample_error(trained_run, tmp_path, capsys, "--n", 9999999999999999999)
    assert line.startswith("--n 9999999999999999999 is more than 2**63 images") and "--seed" not in line
    # --sigma-max alone, below the lowest level the run trained on: --sigma-min (a default) was blamed.
    line = _sample_error(trained_run, tmp_path, capsys, "--n", 2, "--sigma-max", 0.05)
    assert line == ("sigma_max=0.05 (--sigma-max) must be above 0.1, the lowest noise level the run trained on (the "
                    "default --sigma-min); to sample below it, give --sigma-min too")
    line = _sample_error(trained_run, tmp_path, capsys, "--n", 2, "--sigma-min", 20)
    assert line.startswith("sigma_min=20 (--sigma-min) must be below 10, the highest noise level the run trained on")


# --- stop 45 mends ------------------------------------------------------------------------------------

def test_the_churn_help_states_dpdms_setting_and_what_the_default_does_at_other_step_counts():
    """`--s-churn` said "[default: 100, DPDM's best-FID setting]"; DPDM ran S_churn 100 with 1,000 steps, 0.1 per
    step, while at `dpdm sample`'s default 50 steps 100 is the cap, sigma doubled at every churned step. The help's
    numbers are checked against the sampler itself."""
    from cli.sample import sample as sample_command

    text = " ".join(next(p.help for p in sample_command.params if p.name == "s_churn").split())
    assert "best-FID setting]" not in text
    assert "used 100 with --sampler-steps 1000, 0.1 per step" in text and "--s-churn 5 is DPDM's 0.1" in text
    assert "at the default 50 steps 100 is the cap, 1 per step" in text
    assert "[default: 100]" in text and next(p.default for p in sample_command.params
                                             if p.name == "sampler_steps") == 50   # the steps the help speaks of

    def churn_ratios(steps, **churn):
        seen = []
        sample_churn(GaussD(0.0, 0.5), torch.randn(1, 1, 2, 2) * 80, get_sigmas_karras(steps), callback=lambda s:
                     seen.append(round(float(s["sigma_hat"] / s["sigma"]), 6)), **churn)
        return set(seen) - {1.0}

    assert churn_ratios(1000) == {1.1} and churn_ratios(50) == {2.0} and churn_ratios(50, S_churn=5.0) == {1.1}


@pytest.mark.parametrize("preset, resolution", [("mnist", 16), ("small", 8)])
def test_images_do_not_depend_on_the_batch_size_down_to_a_padded_trailing_batch(preset, resolution, monkeypatch):
    """With MIN_ROWS 8 the mnist preset's images depended on the batch size: on this CPU (AVX512, torch 2.14, one
    thread) a network call on 1 to 15 rows rounds unlike the same rows in a larger call (at 16x16 and 28x28; at
    8x8 only 1-5 rows), so batch 8 and a trailing batch of 9 flipped pixels by a grey level against batch 256.
    From 16 rows on the calls round alike (checked to 39 rows, and 64 against 256). The sampler's float output is
    compared, not only the uint8 images, whose flips are rare.

    Where MKL runs other kernels (its AVX2 ones, as on AMD CPUs: emulated with MKL_ENABLE_INSTRUCTIONS=AVX2), calls
    of 16 to 31 rows still round unlike a 256-row call (2 pixels of 2 in 100 images off by a grey level, h82), and
    no MIN_ROWS short of the batch makes them alike: there the test asks what holds, a grey level at most."""
    import dpdm.sampling
    from dpdm.sampling import MIN_ROWS

    torch.manual_seed(0)
    D = EDMPrecond(build_network(preset, img_resolution=resolution, img_channels=1, num_classes=10,
                                 init_scale=1.0)).eval()
    with torch.no_grad():   # does this CPU's BLAS round calls of 16, 17 and 31 rows like the same rows of a large one?
        probe = torch.randn(256, 1, resolution, resolution, generator=torch.Generator().manual_seed(1))
        labels, sigma = torch.arange(256) % 10, torch.full((256,), 2.0)
        large = D(probe, sigma, labels)
        alike = all(torch.equal(D(probe[:r], sigma[:r], labels[:r]), large[:r]) for r in (16, 17, 31))
    floats = []

    def euler(*args, **kwargs):   # the batch's float images, padding rows included
        floats.append(sample_euler(*args, **kwargs))
        return floats[-1]

    monkeypatch.setitem(dpdm.sampling.SAMPLERS, "euler", euler)
    n, images = 40, {}
    for batch_size in (256, 16, 17, 31):   # trailing batches of 8, 6 and 9 rows, padded to MIN_ROWS
        floats.clear()
        x, _ = generate(D, n=n, seed=5, sampler_steps=2, batch_size=batch_size)
        assert [len(f) for f in floats] == [max(min(batch_size, n - s), MIN_ROWS) for s in range(0, n, batch_size)]
        images[batch_size] = (x, torch.cat([f[:min(batch_size, n - s)] for f, s in zip(floats, range(0, n,
                                                                                              batch_size))]))
    for batch_size in (16, 17, 31):
        if alike:
            assert torch.equal(images[batch_size][1], images[256][1]), (preset, batch_size)
            assert torch.equal(images[batch_size][0], images[256][0]), (preset, batch_size)
        else:
            off = (images[batch_size][0].int() - images[256][0].int()).abs()
            assert int(off.max()) <= 1 and int((off > 0).sum()) <= off.numel() // 100, (preset, batch_size)


# --- stop 47 mends ------------------------------------------------------------------------------------

class SigmaRecorder:
    """A conditional denoiser that records the noise level of every call (the batch's one sigma)."""

    num_classes = 2

    def __init__(self):
        self.levels = []

    def __call__(self, x, sigma, class_labels=None):
        self.levels.append(float(sigma[0]))
        return 0.5 * x


@pytest.mark.parametrize("sampler, kwargs", [("euler", {}), ("heun", {}), ("churn", {}),
                                             ("churn", {"S_churn": 2.0, "S_min": 1.0, "S_max": 20.0})])
def test_network_levels_are_the_levels_the_sampler_calls_the_network_at(sampler, kwargs):
    """The guidance-interval check (h89 F2) looks at the levels the sampler evaluates, churn's raised sigma_hat and
    Heun's second call at sigma_next included, computed as the sampler's own loop computes them."""
    from dpdm.sampling import SAMPLERS, network_levels

    sigmas = get_sigmas_karras(6).float()
    D = SigmaRecorder()
    SAMPLERS[sampler](D, torch.randn(1, 1, 2, 2) * 80, sigmas, class_labels=torch.tensor([0]),
                      randn_like=torch.zeros_like, **kwargs)
    assert network_levels(sigmas, sampler, kwargs) == D.levels


def test_sample_refuses_a_guidance_interval_that_guides_no_step(trained_run, tmp_path, capsys):
    """`--guidance 20 --guidance-interval 0.17 0.45` between the levels 0.47 and 0.117 gave samples bit-identical
    to unguided ones, recorded as guided with weight 20 (h89 F2): refused as an empty churn window is. An interval
    holding only a level of Heun's second call, or of churn's raised sigma_hat, guides a step and is taken."""
    sigmas = get_sigmas_karras(4, sigma_min=0.1, sigma_max=10.0, dtype=torch.float32)   # the run's default schedule
    levels = sigmas[:-1].tolist()
    between = (levels[2] * 1.01, levels[1] * 0.99)
    for sampler in ("euler", "heun"):
        line = _sample_error(trained_run, tmp_path, capsys, "--n", 2, "--sampler-steps", 4, "--sampler", sampler,
                             "--guidance", 2, "--guidance-interval", *between)
        assert line.startswith(f"--guidance-interval {between[0]!r} {between[1]!r}: none of the 4 noise levels "
                               f"the {sampler} sampler evaluates"), line
        assert f"nearest: {levels[1]:g} above, {levels[2]:g} below" in line and "no step would be guided" in line
    line = _sample_error(trained_run, tmp_path, capsys, "--n", 2, "--sampler-steps", 4, "--guidance", 2,
                         "--guidance-interval", 20, 30)
    assert "none of the 4 noise levels" in line and f"nearest: {levels[0]:g} below" in line
    # Churn doubles each level in its window (gamma 1 at 4 steps): 2 * levels[2] lies in `between`'s interval.
    from dpdm.sampling import network_levels

    hat = network_levels(sigmas, "churn", {})
    assert any(between[0] < v <= between[1] for v in hat)
    from cli.main import main

    assert main(["sample", "--run", str(trained_run), "--n", "2", "--sampler-steps", "4", "--sampler", "churn",
                 "--guidance", "2", "--guidance-interval", *map(str, between), "--device", "cpu",
                 "--out", str(tmp_path / "churn.npz")]) == 0
    capsys.readouterr()


def test_a_guidance_interval_refusal_shows_float32_levels_on_their_side_of_it(trained_run, tmp_path, capsys):
    """h93 F3: guidance down to the schedule's sigma_min, `--guidance-interval 0 0.1` on a run whose lowest level
    is 0.1, is rightly refused (the float32 level is 0.10000000149 > 0.1, as `guided_denoise` compares it), but the
    line read "nearest: 0.1 above ... lies in (0, 0.1]". The levels now carry the digits that show their side."""
    import re

    line = _sample_error(trained_run, tmp_path, capsys, "--n", 2, "--sampler-steps", 4, "--guidance", 2,
                         "--guidance-interval", 0, 0.1)
    assert "lies in (0, 0.1]" in line, line
    [above] = re.findall(r"nearest: ([0-9.e+-]+) above", line)
    [lowest] = re.findall(r"down to ([0-9.e+-]+);", line)
    assert float(above) > 0.1 and float(lowest) > 0.1 and float(above) == pytest.approx(0.1), line
    line = _sample_error(trained_run, tmp_path, capsys, "--n", 2, "--sampler-steps", 4, "--guidance", 2,
                         "--guidance-interval", 20, 30)   # away from a bound: %g as before
    assert "(10 down to 0.1; nearest: 10 below) lies in (20, 30]" in line, line


def test_a_guidance_interval_without_guidance_is_refused(trained_run, tmp_path, capsys):
    """Without --guidance no step is guided, yet the interval was recorded in the samples (h89 F2): refused, as
    the churn options are without --sampler churn, by the CLI before loading and by the library before drawing."""
    import dpdm.sample

    line = _sample_error(trained_run, tmp_path, capsys, "--n", 2, "--guidance-interval", 0.1, 5)
    assert line.startswith("--guidance-interval 0.1 5 applies only with --guidance > 0"), line
    with pytest.raises(dpdm.sample.SampleError, match=r"guidance_interval=0.1 5 \(--guidance-interval\) needs "):
        dpdm.sample.sample_checkpoint(trained_run / "checkpoint.pt", n=2, guidance_interval=(0.1, 5.0),
                                      out_path=tmp_path / "s.npz")
    assert not list(tmp_path.iterdir())


def test_sampler_options_that_change_no_sample_are_refused(trained_run, tmp_path, capsys, monkeypatch):
    """--s-noise/--s-min/--s-max with --s-churn 0 (no step churns), and --rho with 2 steps (the schedule is sigma_max,
    sigma_min, 0 whatever rho) drew the images drawn without them, and the samples recorded them (h101 F5): refused
    as a guidance interval without guidance is, before the checkpoint is loaded. What the user did not give is not
    blamed: --s-churn 0 alone, and the default rho, are taken."""
    import dpdm.sample

    # What makes --rho idle: Eq. 5 at two steps is (sigma_max, sigma_min), only rounded through the powers of rho.
    torch.testing.assert_close(get_sigmas_karras(2, rho=1.0), get_sigmas_karras(2, rho=50.0), rtol=1e-10, atol=0)
    line = _sample_error(trained_run, tmp_path, capsys, "--n", 2, "--sampler", "churn", "--sampler-steps", 4,
                         "--s-churn", 0, "--s-noise", 10, "--s-max", 2)
    assert line.startswith("--s-noise 10 --s-max 2 with --s-churn 0: no step churns, so they change none of the "
                           "samples"), line
    line = _sample_error(trained_run, tmp_path, capsys, "--n", 2, "--sampler", "heun", "--sampler-steps", 2,
                         "--rho", 50)
    assert line.startswith("--rho 50 with --sampler-steps 2: the schedule's noise levels are sigma_max and sigma_min "
                           "alone, whatever rho"), line
    from dpdm.sample import SampleError, sample_checkpoint, sampler_options_problem

    monkeypatch.setattr(dpdm.sample, "load_denoiser", lambda *a, **kw: pytest.fail("loaded the checkpoint"))
    with pytest.raises(SampleError, match=r"^--rho 3 with --sampler-steps 1: the schedule's noise levels are "
                                          r"sigma_max alone"):
        sample_checkpoint(trained_run / "checkpoint.pt", n=2, sampler_steps=1, rho=3.0, out_path=tmp_path / "s.npz")
    assert sampler_options_problem("churn", 4, 7.0, {"S_churn": 0.0}) is None
    assert sampler_options_problem("churn", 4, 7.0, {"S_churn": 0.5, "S_noise": 1.5}) is None
    assert sampler_options_problem("euler", 2, 7.0, None) is None
    assert sampler_options_problem("euler", 3, 50.0, None) is None


# --- mut52 (stop 51): mutants of sampling.py / sample.py's option checks that no test pinned ------------

class _OnePixelNaN(ConstD):
    """0.5 everywhere but row `bad` of each call from call `from_call` on: one NaN pixel (or all NaN: `whole`)."""

    def __init__(self, bad, from_call=1, whole=False):
        super().__init__(0.5)
        self.bad, self.from_call, self.whole, self.calls = bad, from_call, whole, 0

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        out = torch.full_like(x, 0.5)
        if self.calls >= self.from_call:
            if self.whole:
                out[self.bad] = float("nan")
            else:
                out[self.bad, 0, 1, 2] = float("nan")
        return out


def test_an_image_with_one_nan_pixel_is_refused_not_written_as_black():
    """One NaN pixel of one image (not the whole batch) is NaN output all the same: the uint8 conversion would
    make it a black pixel without a word (mut52 g04: `.all(1)` of the per-image finiteness as `.any(1)`)."""
    from dpdm.sampling import NonFiniteSamplesError

    with pytest.raises(NonFiniteSamplesError, match=r"for images 0\.\.3") as e:
        generate(_OnePixelNaN(2), n=4, batch_size=4, sampler_steps=2)
    assert e.value.first == 2


def test_the_first_non_finite_image_is_counted_from_the_start_of_all_images():
    """NonFiniteSamplesError.first indexes all n images (sample_checkpoint re-draws image `first` with seed + first
    to blame the settings or the weights), not the failing batch (mut52 g05)."""
    from dpdm.sampling import NonFiniteSamplesError

    with pytest.raises(NonFiniteSamplesError, match=r"for images 4\.\.7") as e:
        # Euler with 2 steps calls the network twice a batch: call 3 is the second batch's first.
        generate(_OnePixelNaN(1, from_call=3, whole=True), n=8, batch_size=4, sampler_steps=2)
    assert e.value.first == 5


@pytest.mark.parametrize("sampler", [sample_euler, sample_churn])
def test_a_schedule_that_does_not_end_in_zero_is_refused(sampler):
    """The samplers' last step returns D(x; sigma_min) only on a schedule ending in 0; one ending at sigma_min
    left the images noisy without a word (mut52 g03: the end-in-0 check dropped)."""
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="end in 0"):
        sampler(ConstD(0.0), x, torch.tensor([2.0, 1.0, 0.5]))


class _LabelD:
    """A conditional 1x4x4 'network' of 2 classes and the null class 2: its output is the label / 4."""

    num_classes, img_channels, img_resolution = 2, 1, 4

    def __call__(self, x, sigma, class_labels=None):
        return (class_labels.to(x.dtype) / 4).reshape(-1, 1, 1, 1).expand_as(x)


def test_generate_takes_the_null_class_as_a_label_and_nothing_beyond_it():
    """labels lie in [0, num_classes]: num_classes is the null class (unconditional draws of a conditional model),
    as the error says (mut52 g07: `> num_classes` as `>= num_classes` refused it)."""
    x, y = generate(_LabelD(), n=2, labels=2, sampler_steps=2)
    assert y.tolist() == [2, 2] and x.flatten().unique().tolist() == [191]   # D = 0.5: 0.5 * 127.5 + 128, cut to uint8
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        generate(_LabelD(), n=2, labels=3, sampler_steps=2)


def test_churn_levels_counts_a_level_on_either_end_of_the_window_as_the_sampler_churns_it():
    """[S_min, S_max] is closed in `_churn_gamma`, so `churn_levels` (which refuses a window that churns no step)
    must count a level on either end: a window whose one level is S_min was refused as churning nowhere, though
    the sampler churns it (mut52 g10: `S_min <= sigma` as `S_min < sigma` in churn_levels)."""
    from dpdm.sampling import churn_levels, get_sigmas_karras, network_levels

    sigmas = get_sigmas_karras(4, sigma_min=0.002, sigma_max=80.0)
    level = float(sigmas[1])
    for window in ((level, level * 1.01), (level * 0.99, level)):
        assert churn_levels(sigmas, *window) == 1, window
        kw = {"S_churn": 4.0, "S_min": window[0], "S_max": window[1]}
        assert network_levels(sigmas, "churn", kw)[2] == pytest.approx(2 * level)   # gamma = min(4 / 4, 1)
        sample_churn(ConstD(0.0), torch.zeros(1, 1, 4, 4), sigmas, **kw)   # not refused


def test_seeds_2_to_the_31_apart_draw_different_noise():
    """Image i's generator is seeded with seed + i modulo 2**63 (the CPU generator then keeps 32 bits): seeds 2**31
    apart are distinct images (mut52 g14: modulo 2**31 made --seed 0 and --seed 2147483648 write identical files)."""
    seeds = [5, 5 + 2**31]
    z = StackedRandomGenerator("cpu", seeds).randn((2, 1, 4, 4))
    for row, seed in zip(z, seeds):
        assert torch.equal(row, torch.randn((1, 4, 4), generator=torch.Generator().manual_seed(seed)))
    assert not torch.equal(z[0], z[1])


def test_a_rho_that_moves_the_schedules_ends_by_a_percent_is_refused():
    """rho = 1e14 rounds sigma ** (1 / rho) so that the schedule's ends come out 0.8% and 0.3% away from sigma_max
    and sigma_min in float64: refused as no usable schedule, as its docstring says (ends kept to 0.1%; mut52 g15:
    a 10% tolerance took it, recording a sigma_max the sampler did not use)."""
    from dpdm.sampling import ScheduleError, get_sigmas_karras

    with pytest.raises(ScheduleError, match="no usable Karras schedule") as e:
        get_sigmas_karras(10, rho=1e14)
    assert e.value.param == "rho"
    ends = get_sigmas_karras(10, rho=1e12)[[0, -2]]   # ends within 2.4e-5: usable
    assert ends.tolist() == pytest.approx([80.0, 0.002], rel=1e-3)


def test_a_guidance_interval_whose_low_end_is_the_only_level_near_it_guides_nothing_and_is_refused():
    """`guided_denoise` guides lo < sigma <= hi: a level equal to lo is unguided, so an interval whose only level is
    its low end guides no step and must be refused (mut52 s31: `lo <= v` in `_guidance_interval_problem` took it,
    and the samples were unguided, recorded as guided)."""
    from dpdm.sample import guidance_options_problem
    from dpdm.sampling import get_sigmas_karras

    sigmas = get_sigmas_karras(4)
    lo, above = float(sigmas[1]), float(sigmas[0])
    problem = guidance_options_problem(1.0, (lo, (lo + above) / 2), sigmas)
    assert problem is not None and "no step would be guided" in problem
    assert guidance_options_problem(1.0, (lo * 0.999, (lo + above) / 2), sigmas) is None


def test_churn_with_s_churn_0_is_heun_and_needs_no_level_in_the_window():
    """--s-churn 0 asks for Heun: no window is needed, so a schedule with no level in the default [0.05, 50] is no
    problem (mut52 s32: the `S_churn == 0` test dropped from `_churn_window_problem` refused it)."""
    from dpdm.sample import _churn_window_problem
    from dpdm.sampling import get_sigmas_karras

    sigmas = get_sigmas_karras(4, sigma_min=60.0, sigma_max=80.0)
    assert _churn_window_problem(sigmas, {"S_churn": 0.0}) is None
    assert "no step would churn" in _churn_window_problem(sigmas, {"S_churn": 1.0})
