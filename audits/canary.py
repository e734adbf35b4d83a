"""The canary audit: train once with m canaries, each included with probability 1/2, then guess.

What is audited (shared/research/audits.md section 1.5, Steinke, Nasr and Jagielski 2023): a model
is trained from scratch with DP-SGD under the plan's **sample rate, noise multiplier and clip norm**
(Poisson sampling over background data plus the included canaries, then `dpdm train`'s own private
step, ``dpdm.train.plan_private_grad``: per-example clipping, Gaussian noise once per step, the sum
divided by the public expected batch size). Each canary's inclusion bit is
an independent fair coin drawn from a dedicated seed and never shown to the scorers. The canaries
are scored by the calibrated loss attack and PIA (reference: the same network at initialization,
which does not depend on the coins), and the one-run bound turns the guesses into an epsilon lower
bound. A positive control repeats the training with the noise off; if even the control shows no
leakage of the claimed size, or if no attack could certify the claimed epsilon with this many canaries,
the audit has no power against the claim and the verdict is INCONCLUSIVE (``canary_verdict``).

The attacks score the canary training's own final denoiser. The audited run's weights are never read: the audit
tests dpdm's private step under the plan's mechanism, not the model trained or released from the run.

A cheaper audit (a subsample of the data, fewer steps, fewer noise draws K, another network) keeps
the per-step mechanism of the plan but is a shorter run: it composes fewer of the plan's steps, so
its true epsilon is at most the plan's. A lower bound above the plan's epsilon therefore still
proves a violation; a bound below it says nothing about the steps not run. The report states
exactly what was trained.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from scipy import stats

from audits.auditor import Auditor, _check_fair_coins, _jsonable, max_one_run_epsilon, one_run_audit
from audits.scores import PIA, LossAttack, loss_scores, pia_scores
from dpdm.report_utils import epsilon_text

__all__ = [
    "CanaryConfig",
    "MLPNet",
    "TrainedCanaryModel",
    "make_canaries",
    "draw_inclusion",
    "coin_split_problem",
    "compared_digits",
    "train_with_canaries",
    "score_canaries",
    "canary_audit",
    "canary_verdict",
    "canary_power",
    "certifiable_epsilon",
    "power_advice",
    "ood_canary_problem",
    "CANARY_MIN_DIFFERENCE",
    "CanaryNotFinite",
]

CANARY_KINDS = ("ood", "mislabelled")

# The canary counts `dpdm audit --canaries` takes (cli/audit.py repeats them, so that its --help needs no torch; a
# test pins the two alike). Fewer make no meaningful audit: with 20 (delta 1e-5, the quick suite's error budget)
# even a perfect attack certifies an epsilon of at most about 1, and with a handful the fair coins may include none
# or all of them. research/audits.md: m = 500-5,000 on MNIST scale; 10^9 was an allocator failure.
MIN_CANARIES = 20
MAX_CANARIES = 100_000
# The counts `power_advice` names, within MIN_CANARIES..MAX_CANARIES: round numbers a user types.
ADVICE_COUNTS = (20, 30, 50, 75, 100, 150, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1200, 1500, 2000, 3000,
                 5000, 7500, 10_000, 15_000, 20_000, 30_000, 50_000, 100_000)


@dataclass(frozen=True, kw_only=True)
class CanaryConfig:
    """How the canary audit trains. Only privacy-neutral knobs: q, sigma and C come from the plan.

    ``steps``/``noise_multiplicity`` None mean the plan's own; ``background_size`` None means all of
    the data given; ``model`` is a ``dpdm.networks`` preset ("small", "mnist") or "mlp" (``MLPNet``).
    """

    num_canaries: int = 200
    canary_kind: str = "ood"
    background_size: int | None = 500
    steps: int | None = None
    noise_multiplicity: int | None = 4
    model: str = "small"
    precond: str = "edm"
    lr: float = 1e-3
    label_dropout: float = 0.0
    chunk_size: int | None = None
    seed: int = 0
    attacks: tuple[str, ...] = ("loss", "pia")
    loss_attack: LossAttack = field(default_factory=LossAttack)
    pia: PIA = field(default_factory=PIA)

    def __post_init__(self):
        if isinstance(self.num_canaries, bool) or not isinstance(self.num_canaries, int) or self.num_canaries < 2:
            raise ValueError(f"num_canaries={self.num_canaries!r} must be an int >= 2")
        if self.canary_kind not in CANARY_KINDS:
            raise ValueError(f"canary_kind={self.canary_kind!r} must be one of {CANARY_KINDS}")
        for name in ("background_size", "steps", "noise_multiplicity", "chunk_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}={v!r} must be None or an int >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r} must be a positive number")
        if not (0.0 <= self.label_dropout <= 1.0):
            raise ValueError(f"label_dropout={self.label_dropout!r} must be in [0, 1]")
        if not self.attacks or any(a not in ("loss", "pia") for a in self.attacks):
            raise ValueError(f"attacks={self.attacks!r} must be a non-empty subset of ('loss', 'pia')")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["attacks"] = list(self.attacks)
        return d


class CanaryNotFinite(RuntimeError):
    """A canary run's weights or its canaries' scores are not finite: the private step under test made them so (a
    correct one, clipped gradients plus finite Gaussian noise under Adam, keeps every weight finite), which
    ``run_audit`` reports as FAIL (h143 F2, stop 54) rather than a crash of the attacks' statistics."""


@dataclass
class TrainedCanaryModel:
    """A model trained with canaries, its initialization (the reference) and what was done."""

    model: torch.nn.Module
    reference: torch.nn.Module
    info: dict[str, Any]


def draw_inclusion(num_canaries: int, seed: int) -> np.ndarray:
    """Independent fair coins (True = canary included), from their own seed stream."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0135]))
    return rng.random(int(num_canaries)) < 0.5


def coin_split_problem(included, seed: int) -> str | None:
    """Why the coins ``draw_inclusion(m, seed)`` gave cannot be audited, or None. The one-run bound refuses an
    in/out split that fair coins give with probability below ``auditor.FAIR_COIN_P`` (about one ``seed`` in a
    million): 64 of 200 in, or none of 21. The coins are drawn before any training, so the refusal comes before
    it too; found after both canary trainings it was a KeyError or ValueError traceback (h96 F2, stop 48)."""
    inc = np.asarray(included, dtype=bool)
    try:
        _check_fair_coins(int(inc.sum()), int(inc.size))
    except ValueError as e:
        return f"seed={seed}: the coins of this seed cannot be audited ({e}); use another seed"
    return None


def make_canaries(
    num_canaries: int,
    image_shape: tuple[int, int, int],
    num_classes: int,
    *,
    kind: str = "ood",
    seed: int = 0,
    pool_x: torch.Tensor | None = None,
    pool_y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Canary images in [-1, 1] and labels (None when ``num_classes == 0``).

    ``ood``: random +-1 block patterns, unlike natural images and mutually far apart: any two differ in at least
    ``CANARY_MIN_DIFFERENCE`` (1/8) of their pixel values (``_ood_patterns``); random labels. The blocks are about
    a quarter of the side where that grid has room for ``num_canaries`` such patterns, finer where it has not.
    ``mislabelled``: images from ``pool_x`` (held-out data, never in the background) with a label shifted by a
    random non-zero offset.
    """
    m = int(num_canaries)
    C, H, W = (int(s) for s in image_shape)
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), 0xCA7]).generate_state(1)[0]))
    if kind == "ood":
        rows, cols = _ood_grid(m, C, H, W)
        coarse = torch.randint(0, 2, (m, C, int(rows.max()) + 1, int(cols.max()) + 1), generator=g).float() * 2 - 1
        y = torch.randint(0, num_classes, (m,), generator=g) if num_classes > 0 else None
        coarse = _spread_apart(coarse, rows, cols, seed)
        x = coarse[:, :, torch.from_numpy(rows)][:, :, :, torch.from_numpy(cols)].contiguous()
        return x, y
    if kind == "mislabelled":
        if pool_x is None or pool_x.shape[0] < m:
            have = 0 if pool_x is None else pool_x.shape[0]
            raise ValueError(f"canary_kind='mislabelled' needs a pool of >= {m} held-out images, got {have}")
        if num_classes < 2 or pool_y is None:
            raise ValueError("canary_kind='mislabelled' needs labelled data with >= 2 classes")
        idx = torch.randperm(pool_x.shape[0], generator=g)[:m]
        shift = torch.randint(1, num_classes, (m,), generator=g)
        return pool_x[idx].clone(), (pool_y[idx] + shift) % num_classes
    raise ValueError(f"kind={kind!r} must be one of {CANARY_KINDS}")


# Any two ood canaries differ in at least this share of their pixel values (channels counted apart). Two random
# patterns differ in about half; a canary one block (1/16 of the image) away from another was redrawn.
CANARY_MIN_DIFFERENCE = 1 / 8
# A grid is fine enough for m canaries when m times the chance that two random patterns on it are too close is at
# most this: a canary is then rarely redrawn. The default 200 canaries keep the 4x4 grid on 8x8 and 28x28 images.
_CLOSE_SHARE = 0.1


def _grids(H: int, W: int):
    """Row and column block maps (block of each pixel row / column), coarsest first: the 4x4 grid of blocks of
    side H // 4 (as the first canaries of dpdm had), then g x g near-equal blocks for g = 5, 6, ... up to one
    block per pixel."""
    bh, bw = max(1, H // 4), max(1, W // 4)
    yield np.arange(H) // bh, np.arange(W) // bw
    for g in range(5, max(H, W) + 1):
        gh, gw = min(g, H), min(g, W)
        yield np.arange(H) * gh // H, np.arange(W) * gw // W


def _close_chance(weights: np.ndarray, threshold: int) -> float:
    """P(sum_k weights_k * B_k < threshold) for independent fair bits B_k: the chance that two uniformly random
    patterns with blocks of these pixel counts differ in fewer than ``threshold`` pixel values."""
    pmf = np.ones(1)
    for w, count in zip(*np.unique(weights, return_counts=True)):
        part = np.zeros(int(w) * int(count) + 1)
        part[::int(w)] = stats.binom.pmf(np.arange(count + 1), count, 0.5)
        pmf = np.convolve(pmf, part)[:threshold]   # only the mass below the threshold is needed
    return float(pmf[:threshold].sum())


def _min_difference(C: int, H: int, W: int) -> int:
    return math.ceil(CANARY_MIN_DIFFERENCE * C * H * W)


def _ood_grid(m: int, C: int, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """The coarsest grid (``_grids``) on which m random canaries are rarely too close (``_CLOSE_SHARE``); the
    finest (one block per pixel) if none is. ValueError (``ood_canary_problem``) where even that one has no room."""
    threshold = _min_difference(C, H, W)
    for rows, cols in _grids(H, W):
        weights = np.tile(np.outer(np.bincount(rows), np.bincount(cols)).reshape(-1), C)
        chance = m * _close_chance(weights, threshold)
        if chance <= _CLOSE_SHARE:
            break
    if chance > 1:
        raise ValueError(f"{m} canaries cannot differ pairwise in {CANARY_MIN_DIFFERENCE:.3g} of their pixel values "
                         f"on images of shape {(C, H, W)}: use fewer canaries (or larger images)")
    return rows, cols


def ood_canary_problem(num_canaries: int, image_shape: tuple[int, int, int]) -> str | None:
    """Why ``make_canaries(num_canaries, image_shape, kind="ood")`` cannot draw canaries that far apart (images
    too small for so many), or None. Cheap: for checking the input before any training."""
    try:
        _ood_grid(int(num_canaries), *(int(v) for v in image_shape))
    except ValueError as e:
        return str(e)
    return None


def _spread_apart(coarse: torch.Tensor, rows: np.ndarray, cols: np.ndarray, seed: int,
                  max_rounds: int = 1000) -> torch.Tensor:
    """``coarse`` [m, C, gh, gw] (+-1 blocks) with every canary that is too close to an earlier one (fewer than
    ``CANARY_MIN_DIFFERENCE`` of the pixel values differ) redrawn, from a stream of its own, until none is: the
    others keep their patterns. Deterministic in ``seed``. Distances are computed on the blocks, weighted by their
    pixel counts, as exact integers (float32 holds them: at most 3 x 2048 x 2048 values)."""
    m, C = coarse.shape[:2]
    H, W = len(rows), len(cols)
    threshold = _min_difference(C, H, W)
    w = torch.from_numpy(np.tile(np.outer(np.bincount(rows), np.bincount(cols)).reshape(-1), C)).float()
    flat = coarse.reshape(m, -1).clone()
    total = float(w.sum())
    redraw = torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), 0xCA7, 1]).generate_state(1)[0]))
    step = max(1, (1 << 24) // max(m, 1))   # rows of the distance matrix at a time (<= 64 MiB of float32)

    def close_pairs(rows_idx: torch.Tensor, *, earlier_only: bool = False):
        """(a, b) for every canary a of ``rows_idx`` and b too close to it (with ``earlier_only``, ``rows_idx`` is
        0..m-1 and only the b < a are looked at: each pair once)."""
        for s in range(0, len(rows_idx), step):
            idx = rows_idx[s:s + step]
            others = flat[:int(idx[-1]) + 1] if earlier_only else flat
            diff = (total - (flat[idx] * w) @ others.T) / 2   # [len(idx), len(others)] pixel values that differ
            diff[torch.arange(len(idx)), idx] = math.inf
            i, j = torch.nonzero(diff < threshold, as_tuple=True)
            yield from ((a, b) for a, b in zip(idx[i].tolist(), j.tolist()) if b < a or not earlier_only)

    # The later canary of each too-close pair is redrawn; a redrawn canary too close to one that kept its pattern
    # is redrawn again (so the kept ones never change), and of two redrawn ones too close, the later.
    todo = {a for a, _ in close_pairs(torch.arange(m), earlier_only=True)}
    kept = torch.ones(m, dtype=torch.bool)
    for _ in range(max_rounds):
        if not todo:
            return flat.reshape(coarse.shape)
        order = torch.tensor(sorted(todo))
        kept[order] = False
        flat[order] = torch.randint(0, 2, (len(order), flat.shape[1]), generator=redraw).float() * 2 - 1
        todo = {a if kept[b] else max(a, b) for a, b in close_pairs(order)}
    raise ValueError(f"cannot draw {m} canaries of shape {(C, H, W)} that differ in at least "
                     f"{CANARY_MIN_DIFFERENCE:.3g} of their pixel values; use fewer canaries")


def _seed_for(seed: int, step: int, stream: int) -> int:
    s = np.random.SeedSequence([int(seed), int(step), int(stream)]).generate_state(2, dtype=np.uint32)
    return int((int(s[0]) << 31) ^ int(s[1])) & ((1 << 63) - 1)


class MLPNet(torch.nn.Module):
    """A fast fully-connected denoiser network F(x, c_noise, class_labels) for CPU audits.

    Built only from ``nn.Linear``, ``nn.Embedding`` and ``nn.SiLU`` (modules the engine has fast
    per-example rules for). Which network is trained does not change the DP guarantee being audited;
    an MLP of this size memorizes canaries faster per step than the small U-Net, so it gives the
    audit more power per CPU second.
    """

    def __init__(self, *, img_resolution: int, img_channels: int, num_classes: int, hidden: int = 512):
        super().__init__()
        self.img_resolution, self.img_channels, self.num_classes = img_resolution, img_channels, num_classes
        d = img_channels * img_resolution**2
        self.inp = torch.nn.Linear(d, hidden)
        self.emb = torch.nn.Linear(32, hidden)
        self.label = torch.nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        self.mid = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Linear(hidden, d)
        self.act = torch.nn.SiLU()
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, x, c_noise, class_labels=None):
        freqs = torch.exp(torch.arange(16, device=x.device, dtype=x.dtype) * (-math.log(1000.0) / 16))
        ang = c_noise.reshape(-1, 1).to(x.dtype) * 100.0 * freqs
        h = self.inp(x.reshape(x.shape[0], -1)) + self.emb(torch.cat([ang.cos(), ang.sin()], dim=1))
        if self.label is not None and class_labels is not None:
            h = h + self.label(class_labels)
        h = self.act(self.mid(self.act(h)))
        return self.out(h).reshape(x.shape)


def _build(cfg: CanaryConfig, image_shape, num_classes, denoiser_factory):
    if denoiser_factory is not None:
        return denoiser_factory()
    if cfg.model == "mlp":
        from dpdm.precond import EDMPrecond, VPrecond

        net = MLPNet(img_resolution=int(image_shape[-1]), img_channels=int(image_shape[0]), num_classes=int(num_classes))
        return VPrecond(net) if cfg.precond == "v" else EDMPrecond(net, sigma_data=3 ** -0.5)
    from dpdm.train import build_denoiser

    return build_denoiser({
        "model": cfg.model, "precond": cfg.precond, "sigma_data": 3 ** -0.5,
        "img_resolution": int(image_shape[-1]), "img_channels": int(image_shape[0]),
        "num_classes": int(num_classes),
    })


def train_with_canaries(
    plan,
    x: torch.Tensor,
    y: torch.Tensor | None,
    num_classes: int,
    config: CanaryConfig,
    *,
    noise: bool = True,
    denoiser_factory: Callable[[], torch.nn.Module] | None = None,
    progress: Callable[[int, int], None] | None = None,
    expected_batch_size: float | None = None,
) -> TrainedCanaryModel:
    """DP-SGD on ``x`` (background + included canaries) under ``plan``'s q, sigma and C.

    ``noise=False`` trains the positive control: the same clipped steps without the Gaussian noise.
    The network starts from ``torch.manual_seed(config.seed)``; batches, diffusion draws and DP noise
    come from per-step seeds, so two calls with the same arguments train the same model.

    ``expected_batch_size``: the public constant the noisy gradient sum is divided by, as `dpdm train`
    divides by the plan's batch size. It must not depend on which canaries are in ``x`` (the number of
    included canaries is a function of the secret coins): ``canary_audit`` passes
    ``q * (background + num_canaries)``. None means ``q * len(x)``, for data of a public size only.

    Each step's gradient is ``dpdm.train.plan_private_grad``, the function `dpdm train`'s loop and the
    mechanism checks call, with the plan's clip norm and noise multiplier (0 for the control) and this
    divisor: the audited run is the plan's mechanism, not a copy of it that could drift (stop 44).
    """
    import types

    from dpdm.data import PoissonSampler
    from dpdm.loss import EDMLoss, VLoss, drop_labels, engine_loss_fn
    from dpdm.train import _Dist, plan_private_grad

    n = int(x.shape[0])
    q = float(plan.sample_rate)
    steps = int(config.steps or plan.steps)
    K = int(config.noise_multiplicity or plan.noise_multiplicity)
    conditional = num_classes > 0 and y is not None
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    try:
        D = _build(config, tuple(x.shape[1:]), num_classes if conditional else 0, denoiser_factory)
    finally:
        torch.random.set_rng_state(torch_state)
    reference = _copy_frozen(D)
    sigma_data = float(getattr(D, "sigma_data", 3 ** -0.5))
    loss_obj = VLoss() if config.precond == "v" and denoiser_factory is None else EDMLoss(sigma_data=sigma_data)
    loss_fn = engine_loss_fn(loss_obj, conditional=conditional)
    sampler = PoissonSampler(n, q, seed=_seed_for(config.seed, 0, 7) % (2**31))
    optimizer = torch.optim.Adam(D.parameters(), lr=config.lr)
    params = dict(D.named_parameters())
    expected = q * n if expected_batch_size is None else float(expected_batch_size)
    if not (math.isfinite(expected) and expected > 0):
        raise ValueError(f"expected_batch_size={expected_batch_size!r} must be a positive number")
    # The plan's fields as the training loop reads them; batch_size is the divisor (public, see above).
    step_plan = types.SimpleNamespace(clip_norm=float(plan.clip_norm), batch_size=expected,
                                      noise_multiplier=float(plan.noise_multiplier) if noise else 0.0)
    t0 = time.perf_counter()
    batch_sizes = []
    for step in range(steps):
        idx = sampler.batch(step)
        batch_sizes.append(int(len(idx)))
        g = torch.Generator().manual_seed(_seed_for(config.seed, step, 1))
        sigma, nz = loss_obj.draw(len(idx), K, tuple(x.shape[1:]), generator=g)
        batch = [x[idx]]
        if conditional:
            batch.append(drop_labels(y[idx], config.label_dropout, num_classes, generator=g))
        batch += [sigma, nz]
        # Its noise seed, step_seed(config.seed, step, 2), is _seed_for's stream 2: apart from the draws' (1) and
        # the batches' (7), and the same noise as the canary runs drew before they called it.
        # A world of one, explicitly: inside a caller's torch.distributed group plan_private_grad would sum every
        # rank's (identical) clipped sum beside rank 0's one noise draw.
        grad = plan_private_grad(D, loss_fn, batch, step_plan, seed=config.seed, step=step,
                                 chunk_size=config.chunk_size, dist=_Dist())
        for name, p in params.items():
            p.grad = grad[name].to(p.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step + 1, steps)
    D.eval()
    info = {
        "noise": bool(noise),
        "dataset_size": n,
        "sample_rate": q,
        "expected_batch_size": expected,
        "mean_batch_size": float(np.mean(batch_sizes)) if batch_sizes else 0.0,
        "noise_multiplier": step_plan.noise_multiplier,
        "clip_norm": step_plan.clip_norm,
        "steps": steps,
        "plan_steps": int(plan.steps),
        "noise_multiplicity": K,
        "normalizer": "q * dataset size" if expected_batch_size is None else "given (public, fixed in advance)",
        "seconds": time.perf_counter() - t0,
    }
    return TrainedCanaryModel(D, reference, info)


def _copy_frozen(D: torch.nn.Module) -> torch.nn.Module:
    import copy

    ref = copy.deepcopy(D).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def score_canaries(trained: TrainedCanaryModel, x_can, y_can, config: CanaryConfig) -> dict[str, np.ndarray]:
    """Scores of every canary under each attack of ``config`` (higher = member); never sees the coins."""
    out = {}
    if "loss" in config.attacks:
        out["loss"] = loss_scores(trained.model, x_can, y_can, reference=trained.reference, attack=config.loss_attack)
    if "pia" in config.attacks:
        out["pia"] = pia_scores(trained.model, x_can, y_can, reference=trained.reference, pia=config.pia)
    return out


def compared_digits(lower: float, claim: float, digits: int = 4) -> int:
    """The significant digits at which an epsilon lower bound and the claim it is compared with are printed: as
    every epsilon dpdm prints (README), the bound rounded down and the claim up (``epsilon_text``), to ``digits``,
    or, where the bound exceeds the claim, to as many as it takes for the two to read as they compare. At 4 digits
    a FAIL by 1.72585 > 1.7258 read "1.725 vs 1.726" in the verdict line and the report's table (h123 F3, stop 52);
    a bound at or below the claim reads so at any digits. The verdict's reason, `dpdm audit`'s verdict line and
    report.md's table of bounds all use it."""
    if not lower > claim:
        return digits
    return next((d for d in range(digits, 18)
                 if float(epsilon_text(lower, d, bound="lower")) > float(epsilon_text(claim, d))), max(digits, 17))


@functools.lru_cache(maxsize=1024)
def certifiable_epsilon(num_canaries: int, delta: float, level: float, num_included: int | None = None) -> float:
    """``max_one_run_epsilon``: the most a perfect attack certifies with these canaries (``num_included`` of them in;
    None: half, as fair coins give on average). Seconds at 100,000 canaries, so cached: `dpdm audit` says it before
    training (``audits.suite.run_audit``) and again in the verdict."""
    n_in = num_canaries // 2 if num_included is None else int(num_included)
    return max_one_run_epsilon(int(num_canaries), delta=float(delta), significance=float(level), num_included=n_in)


def coins_ceiling(num_canaries: int, delta: float, level: float, seed: int | None = None) -> float:
    """What an audit with ``num_canaries`` canaries and ``--seed seed`` can certify at most: a perfect attack with the
    coins ``draw_inclusion(num_canaries, seed)`` gives it, as ``canary_audit`` judges it (0 where the audit refuses
    those coins: ``coin_split_problem``). ``seed`` None: fair coins' even split, the most any coins give at an even
    count, which a given seed's rarely has (900 canaries: 4.28 with 450 in, 4.04 with seed 0's 432; r2 F1, stop 56)."""
    if seed is None:
        return certifiable_epsilon(int(num_canaries), float(delta), float(level))
    coins = draw_inclusion(int(num_canaries), int(seed))
    if coin_split_problem(coins, int(seed)):
        return 0.0
    return certifiable_epsilon(int(num_canaries), float(delta), float(level), int(coins.sum()))


def certifiable_curve(delta: float, level: float, seed: int | None = None) -> list[tuple[int, float]]:
    """(count, the most a perfect attack certifies with it and the coins of ``seed``: ``coins_ceiling``) over
    ``ADVICE_COUNTS``, up to where no later count can certify more. The one-run bound does not grow without limit
    with the canaries: its ``2 m delta`` term makes it peak (fair coins: near 900 canaries, about 4.3, at delta 1e-5
    and the quick suite's per-attack level 0.02) and fall beyond, to 0 where ``2 m delta`` passes the level. A
    seed's coins make the curve jagged (seed 0: 4.04 at 900, 4.11 at 2,000), so the search ends only where fair
    coins' even split, an upper bound at every (even) count of ``ADVICE_COUNTS``, has passed its peak and fallen to
    the best found: from there no count certifies more."""
    curve: list[tuple[int, float]] = []
    best = 0.0
    for i, m in enumerate(ADVICE_COUNTS):
        eps = coins_ceiling(m, delta, level, seed)
        curve.append((m, eps))
        if eps > best:
            best = eps
            continue
        # Fair coins' curve is asked for only here, where the seed's did not rise: at delta 1e-8 it rises to the
        # last count and this costs nothing (the 100,000 canaries' ceiling takes seconds).
        if best > 0 and i > 0:
            fair = certifiable_epsilon(m, float(delta), float(level))
            if fair <= best and fair < certifiable_epsilon(ADVICE_COUNTS[i - 1], float(delta), float(level)):
                break
    return curve


def _most_steps_below(epsilon_of: Callable[[int], float], steps: int, bound: float) -> int | None:
    """The most steps s < ``steps`` whose epsilon is below ``bound`` (None if not even one step's is), as the two
    read (the epsilon rounded up, the bound down: "epsilon 3.285 is below 3.284" was no advice). Epsilon grows with
    the steps, so a bisection."""
    def below(s):
        return float(epsilon_text(epsilon_of(s))) < float(epsilon_text(bound, bound="lower"))

    if steps <= 1 or not below(1):
        return None
    lo, hi = 1, steps - 1   # below(lo)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if below(mid) else (lo, mid - 1)
    return lo


def _steps_option(steps: int) -> str:
    return "--steps 1" if steps == 1 else f"--steps {steps} or fewer"


def canary_power(plan, num_canaries: int, steps: int, claimed_epsilon: float, *, level: float,
                 ceiling: float | None = None, seed: int | None = None) -> dict[str, Any]:
    """What a canary audit of ``plan`` (an ``accounting.PrivacyPlan``) with ``num_canaries`` canaries, a canary run
    of ``steps`` steps and the coins of ``--seed seed`` can certify, and what could certify more than
    ``claimed_epsilon`` (the canary run's epsilon): known before any training, from the counts, the coins, delta and
    the per-attack ``level`` alone. Every count it names is judged with the coins that count and this seed give
    (``certifiable_curve``), the audit a user runs on this advice with the same --seed; ``seed`` None: fair coins'
    even split (a library caller's "at best"). ``ceiling``: this audit's own, else ``coins_ceiling``'s.
    Keys: ``certifiable_epsilon`` (this audit's ceiling), ``seed``, ``curve`` ([count, ceiling] pairs),
    ``best_canaries`` and ``best_certifiable_epsilon`` (the curve's peak), ``canaries_needed`` (the fewest count of
    the curve that certifies more than the claim; None: none does), ``canaries_advised`` and its
    ``canaries_advised_epsilon`` (the fewest count above this audit's that does, else the peak where it does; None),
    ``shorter_steps`` (the most steps below ``steps`` whose epsilon this audit could certify more than; None: none),
    ``shorter_steps_at_best`` (likewise at ``best_canaries``), ``one_step_epsilon``."""
    import accounting

    delta = float(plan.delta)
    if ceiling is None:
        ceiling = coins_ceiling(int(num_canaries), delta, float(level), seed)
    curve = certifiable_curve(delta, level, seed)
    best_m, best = max(curve, key=lambda c: c[1])
    claim = float(claimed_epsilon)
    needed = next((c for c, eps in curve if eps > claim), None)
    advised = next(((c, eps) for c, eps in curve if eps > claim and c > int(num_canaries)),
                   (best_m, best) if best > claim else (None, None))
    epsilon_of = functools.lru_cache(maxsize=None)(lambda s: accounting.epsilon_spent(plan, s))
    steps = min(int(steps), int(plan.steps))
    power = {
        "num_canaries": int(num_canaries), "steps": steps, "claimed_epsilon": claim, "seed": seed,
        "delta": delta, "significance_per_attack": float(level), "certifiable_epsilon": float(ceiling),
        "curve": [[c, float(eps)] for c, eps in curve],
        "best_canaries": best_m, "best_certifiable_epsilon": float(best), "canaries_needed": needed,
        "canaries_advised": advised[0],
        "canaries_advised_epsilon": None if advised[1] is None else float(advised[1]),
        "shorter_steps": _most_steps_below(epsilon_of, steps, ceiling),
        "shorter_steps_at_best": _most_steps_below(epsilon_of, steps, best) if best > 0 else None,
        "one_step_epsilon": float(epsilon_of(1)),
    }
    for key in ("shorter_steps", "shorter_steps_at_best"):
        power[f"{key}_epsilon"] = None if power[key] is None else float(epsilon_of(power[key]))
    return power


def power_advice(power: dict[str, Any]) -> str | None:
    """What ``canary_power`` says can test a claim this audit cannot (its ceiling at or below the claim), as the end
    of the verdict's reason; None where the audit can. Every count it names certifies what it says with the coins of
    this audit's --seed (``canary_power``), so an audit run as it advises can test the claim. Never more canaries
    where no count certifies the claim (the one-run bound's peak: research/audits.md, a one-run audit can
    essentially never reject claims of epsilon above about 6 at delta 1e-5), and a shorter canary run (--steps) only
    where one's epsilon is below what it could certify."""
    up, low = epsilon_text, functools.partial(epsilon_text, bound="lower")
    if power["certifiable_epsilon"] > power["claimed_epsilon"]:
        return None
    best_m, best = power["best_canaries"], power["best_certifiable_epsilon"]
    here, at_best = power["shorter_steps"], power["shorter_steps_at_best"]
    m, seed = power["num_canaries"], power.get("seed")
    coins = "an even split of the coins" if seed is None else f"the coins of --seed {seed}"

    def more(c):
        return "more" if c > m else "fewer"

    advised = power.get("canaries_advised")
    if advised is not None:
        text = (f"{more(advised)} canaries can: with --canaries {advised} ({coins}) a perfect attack could certify "
                f"{low(power['canaries_advised_epsilon'])}, more than the claim")
        if best_m != advised:
            text += f", and the most, {low(best)}, with --canaries {best_m}"
        if here is not None:
            text += (f"; or a shorter canary run: {_steps_option(here)}, whose epsilon "
                     f"{up(power['shorter_steps_epsilon'])} is below {low(power['certifiable_epsilon'])}")
        return text
    counts = f"{ADVICE_COUNTS[0]} to {ADVICE_COUNTS[-1]:,}"
    if best <= 0:   # 2*m*delta passes the level at every count (delta 1e-3 at the default --significance)
        text = (f"no number of canaries can: at delta {power['delta']:g} and this error budget the one-run bound "
                f"certifies nothing with {counts} canaries (its 2*m*delta term exceeds the error budget)")
    else:
        where = (", the most --canaries takes, where the bound still rises" if best_m == ADVICE_COUNTS[-1]
                 else "; the other counts certify less")
        text = (f"no count of canaries dpdm tries ({counts}) can with {coins}: at delta {power['delta']:g} and this "
                f"error budget the one-run bound certifies at most {low(best)} (--canaries {best_m}{where})")
    if here is not None:
        text += (f"; a shorter canary run can: {_steps_option(here)}, whose epsilon "
                 f"{up(power['shorter_steps_epsilon'])} is below {low(power['certifiable_epsilon'])}")
        if at_best is not None and at_best > here:
            text += f", or {_steps_option(at_best)} with --canaries {best_m}"
        return text
    if at_best is not None:
        return (text + f"; a shorter canary run with {more(best_m)} canaries can: {_steps_option(at_best)} with "
                f"--canaries {best_m}, whose epsilon {up(power['shorter_steps_at_best_epsilon'])} is below that")
    # Nothing can: say what the audit still tests, rather than send the user to retrain for the same verdict.
    return (text + f", nor can a shorter canary run: one step (--steps 1) has epsilon {up(power['one_step_epsilon'])}. "
            "At this delta no canary audit can test this plan's claim; the mechanism checks still test its step")


def canary_verdict(
    target_max: float,
    control_max: float | None,
    ceiling: float,
    claimed_epsilon: float,
    *,
    num_canaries: int,
    worst_attack: str = "an",
    advice: str | None = None,
) -> tuple[str, list[str]]:
    """The canary audit's verdict and its reasons (shared/research/audits.md section 5.4).

    FAIL if an epsilon lower bound exceeds the claim. Otherwise INCONCLUSIVE if the attacks had too
    little power to test the claim: the certifiable ceiling (a perfect attack with these canaries) is at or
    below the claim, so no bound could have exceeded it, or the positive control (noise off) did not reach
    the claim either, so the attacks have not shown they can detect leakage of the claimed size (a bound
    above the claim is still a FAIL then). Otherwise PASS: no violation detected at the stated power (never
    "privacy verified"). ``control_max`` None: no control was trained. ``advice``: what could test the claim where the
    ceiling cannot (``power_advice``; else a generic line that promises no count of canaries).
    """
    claim = float(claimed_epsilon)
    # As every epsilon dpdm prints (README): the claim rounded up, lower bounds (and the most a perfect attack
    # could certify) down, so the verdict line and its reasons show the claim alike.
    up, low = epsilon_text, functools.partial(epsilon_text, bound="lower")
    if target_max > claim:   # as many digits as it takes for the two to read as they compare
        digits = compared_digits(target_max, claim)
        return "FAIL", [f"{worst_attack} attack: one-run epsilon lower bound {low(target_max, digits)} > claimed "
                        f"epsilon {up(claim, digits)}"]
    if ceiling <= claim:
        return "INCONCLUSIVE", [
            f"with {num_canaries} canaries this audit cannot certify more than epsilon {low(ceiling)}, so it cannot "
            f"detect a violation of the claim {up(claim)}; "
            + (advice or "more canaries (--canaries) certify more only up to a point, past which the one-run bound's "
                         "2*m*delta term makes them certify less, and a shorter canary run (--steps) has a smaller "
                         "epsilon")]
    if control_max is not None and control_max <= claim:
        return "INCONCLUSIVE", [
            f"the positive control (noise off) reached an epsilon lower bound of only {low(control_max)} <= the "
            f"claim {up(claim)}: the attacks could not show leakage of the claimed size, so a violation could "
            f"have gone undetected"]
    reason = (f"no violation detected at the stated power: largest epsilon lower bound {low(target_max)} <= claimed "
              f"{up(claim)}; a perfect attack could certify up to {low(ceiling)}")
    if control_max is not None:
        reason += f", and the positive control (noise off) reached {low(control_max)}"
    else:
        reason += " (no positive control was trained)"
    return "PASS", [reason]


def _one_class_report(s, included, *, delta, significance, claimed_epsilon, ceiling) -> dict[str, Any]:
    """``Auditor.report``'s keys when the coins left no included or no excluded canary: the one-run
    bound (which needs no second class) and None for the two-class statistics."""
    inc = np.asarray(included, dtype=bool)
    # With one class empty, s and inc are already in the order Auditor.one_run uses.
    res = one_run_audit(s, inc, delta=delta, significance=significance)
    return {
        "num_in": int(inc.sum()),
        "num_out": int((~inc).sum()),
        "significance": float(significance),
        "delta": float(delta),
        "two_class_statistics": False,
        "auc": None,
        "auc_interval": [None, None],
        "tpr_at_fpr": [],
        "clopper_pearson": None,
        "one_run": _jsonable(res.to_dict()),
        "max_certifiable_epsilon": {"clopper_pearson": None, "one_run": float(ceiling)},
        "claimed_epsilon": float(claimed_epsilon),
    }


def _non_finite_problem(runs: dict[str, TrainedCanaryModel], scores: dict | None) -> str | None:
    """What is not finite in the canary runs (weights) or, given, their canaries' scores; None if all is."""
    for name, run in runs.items():
        bad = [n for n, t in run.model.named_parameters() if not bool(torch.isfinite(t).all())]
        if bad:
            return (f"the canary run's {name} model has non-finite weights ({', '.join(bad[:3])}"
                    f"{', ...' if len(bad) > 3 else ''}) after {run.info['steps']} steps of the plan's private step, "
                    "which keeps every weight finite where it is correct (clipped gradients, finite Gaussian noise)")
    for name, per in (scores or {}).items():
        for attack, sc in per.items():
            if not np.all(np.isfinite(sc)):
                return (f"the {attack} attack's scores of the canary run's {name} model are not finite "
                        f"({int(np.sum(~np.isfinite(sc)))} of {len(sc)}) after {runs[name].info['steps']} steps of "
                        "the plan's private step, though its weights are")
    return None


def canary_audit(
    plan,
    x: torch.Tensor,
    y: torch.Tensor | None,
    num_classes: int,
    config: CanaryConfig = CanaryConfig(),
    *,
    claimed_epsilon: float,
    significance: float = 0.04,
    private: bool = True,
    pool_x: torch.Tensor | None = None,
    pool_y: torch.Tensor | None = None,
    denoiser_factory: Callable[[], torch.nn.Module] | None = None,
    control: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Runs the canary audit of ``plan`` (an ``accounting.PrivacyPlan``) and returns a JSON-able result with the raw
    scores.

    ``claimed_epsilon``: the epsilon the canary runs' own steps spend under ``plan`` (``config.steps`` of them, as
    ``run_audit`` computes it), not the plan's epsilon at its full steps where ``config.steps`` is fewer.
    ``x``/``y``: natural data for the background (a subsample of ``config.background_size`` is used).
    ``private=False`` audits a mechanism without noise (what a ``--no-dp`` run did): then the target
    is itself the control. ``significance`` is the error budget for the epsilon bounds, split evenly
    over the attacks (Bonferroni); the control's bounds use the same per-attack level.

    Keys: ``verdict`` ("PASS"/"FAIL"/"INCONCLUSIVE", see ``canary_verdict``), ``reasons``, ``attacks`` (per
    attack: target and control reports from ``Auditor.report``; when the coins left no included or no
    excluded canary, only the one-run bound, with ``two_class_statistics`` False and None for AUC, ROC and
    Clopper-Pearson), ``max_epsilon_lower_bound``, ``control_max_epsilon``, ``max_certifiable_epsilon``,
    ``training`` (what was trained), ``canaries`` (kind, count, included), ``power`` (where the ceiling is at or
    below the claim: ``canary_power``, what could test it; else None), ``scores`` (arrays).
    Coins the one-run bound refuses (``coin_split_problem``) raise ValueError before any training; a canary run
    whose weights, or its canaries' scores, are not finite raises ``CanaryNotFinite``.
    """
    from accounting import PrivacyPlan

    if not isinstance(plan, PrivacyPlan):   # a PlanDocument failed on a missing .delta (h134 F4, stop 53)
        raise ValueError(f"plan is a {type(plan).__name__}; canary_audit takes an accounting.PrivacyPlan (a plan "
                         "document's .plan, as accounting.load_plan returns it)")
    if not (isinstance(claimed_epsilon, (int, float)) and claimed_epsilon >= 0 and math.isfinite(claimed_epsilon)):
        raise ValueError(f"claimed_epsilon={claimed_epsilon!r} must be a finite number >= 0")
    if not (0 < significance < 1):
        raise ValueError(f"significance={significance!r} must be in (0, 1)")
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"x={getattr(x, 'shape', x)!r} must be a non-empty image tensor [N, C, H, W]")
    conditional = num_classes > 0 and y is not None
    m = config.num_canaries
    delta = float(plan.delta)
    x_can, y_can = make_canaries(m, tuple(x.shape[1:]), num_classes if conditional else 0,
                                 kind=config.canary_kind, seed=config.seed, pool_x=pool_x, pool_y=pool_y)
    included = draw_inclusion(m, config.seed)
    problem = coin_split_problem(included, config.seed)
    if problem:
        raise ValueError(problem)
    gen = torch.Generator().manual_seed(config.seed)
    nb = x.shape[0] if config.background_size is None else min(config.background_size, x.shape[0])
    bg = torch.randperm(x.shape[0], generator=gen)[:nb]
    inc_idx = torch.from_numpy(np.flatnonzero(included))
    x_train = torch.cat([x[bg], x_can[inc_idx]])
    y_train = torch.cat([y[bg], y_can[inc_idx]]) if conditional else None

    def prog(tag):
        return None if progress is None else (lambda i, n: progress(tag, i, n))

    # The divisor of the noisy gradient sum: public and fixed before the coins are drawn, as `dpdm train`
    # divides by the plan's batch size. q * (background + included) would depend on the secret coins.
    expected = float(plan.sample_rate) * (int(nb) + m)
    runs = {}
    target = train_with_canaries(plan, x_train, y_train, num_classes, config, noise=private,
                                 denoiser_factory=denoiser_factory, progress=prog("target"),
                                 expected_batch_size=expected)
    runs["target"] = target
    if control:
        runs["control"] = target if not private else train_with_canaries(
            plan, x_train, y_train, num_classes, config, noise=False,
            denoiser_factory=denoiser_factory, progress=prog("control"), expected_batch_size=expected)
    for run in runs.values():
        run.info["normalizer"] = f"q * (background + canaries) = {float(plan.sample_rate):.6g} * ({int(nb)} + {m})"

    problem = _non_finite_problem(runs, None)
    if problem:
        raise CanaryNotFinite(problem)
    level = significance / len(config.attacks)
    n_in = int(included.sum())
    ceiling = certifiable_epsilon(m, delta, level, n_in)
    scores = {name: score_canaries(run, x_can, y_can if conditional else None, config) for name, run in runs.items()}
    problem = _non_finite_problem(runs, scores)
    if problem:
        raise CanaryNotFinite(problem)
    attacks: dict[str, Any] = {}
    for attack in config.attacks:
        entry = {}
        for name in runs:
            s = scores[name][attack]
            if 0 < n_in < m:
                rep = Auditor(s[included], s[~included]).report(
                    delta=delta, significance=level, claimed_epsilon=float(claimed_epsilon))
                if "one_run" not in rep:   # coins the one-run bound refuses: coin_split_problem stopped them above
                    raise ValueError(f"seed={config.seed}: {rep.get('one_run_left_out', 'no one-run bound')}")
                # The Clopper-Pearson bound assumes one independent training run per score; here all
                # canaries share one run, so only the one-run bound is a valid epsilon lower bound.
                rep["clopper_pearson"]["valid_here"] = False
                rep["two_class_statistics"] = True
            else:
                rep = _one_class_report(s, included, delta=delta, significance=level,
                                        claimed_epsilon=float(claimed_epsilon), ceiling=ceiling)
            rep["epsilon_lower_bound"] = rep["one_run"]["epsilon"]
            rep["violation"] = bool(rep["one_run"]["epsilon"] > claimed_epsilon)
            # Only the one-run ceiling is valid here (the Clopper-Pearson one is not, see above).
            rep["can_detect_violation"] = bool(rep["max_certifiable_epsilon"]["one_run"] > claimed_epsilon)
            entry[name] = rep
        attacks[attack] = entry

    target_max = max(attacks[a]["target"]["epsilon_lower_bound"] for a in config.attacks)
    control_max = max(attacks[a]["control"]["epsilon_lower_bound"] for a in config.attacks) if control else None
    worst = max(config.attacks, key=lambda a: attacks[a]["target"]["epsilon_lower_bound"])
    power = None
    if ceiling <= claimed_epsilon:   # what could test the claim, for the reason (none: the audit could)
        power = canary_power(plan, m, int(config.steps or plan.steps), float(claimed_epsilon), level=level,
                             ceiling=ceiling, seed=config.seed)
    verdict, reasons = canary_verdict(target_max, control_max, ceiling, float(claimed_epsilon), num_canaries=m,
                                      worst_attack=worst, advice=None if power is None else power_advice(power))
    if not 0 < n_in < m:
        reasons.append(f"the coins included {n_in} of {m} canaries: AUC, ROC and TPR need both included and "
                       "excluded canaries and are not reported (the coins are never redrawn)")
    return {
        "verdict": verdict,
        "reasons": reasons,
        "claimed_epsilon": float(claimed_epsilon),
        "delta": delta,
        "significance": float(significance),
        "significance_per_attack": level,
        "max_epsilon_lower_bound": float(target_max),
        "control_max_epsilon": None if control_max is None else float(control_max),
        "max_certifiable_epsilon": float(ceiling),
        "can_detect_violation": bool(ceiling > claimed_epsilon),
        # Where it cannot: the most any count certifies at this delta, and what could test the claim (canary_power).
        "power": power,
        "threat_model": "black-box access to the canary run's final denoiser (raw weights, not EMA), not to the "
                        "audited run's model; one training run with canaries included by fair coins",
        "config": config.to_dict(),
        "training": {name: run.info for name, run in runs.items()},
        "canaries": {"kind": config.canary_kind, "count": m, "included": int(included.sum()),
                     "background": int(nb), "seed": config.seed},
        "attacks": attacks,
        "scores": {name: {a: s.tolist() for a, s in sc.items()} for name, sc in scores.items()},
        "included": included.tolist(),
    }
