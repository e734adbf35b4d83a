"""Mechanism checks: is the mechanism that ran the one the accountant measured? (DESIGN.md section 5)

Six groups, each returning a list of ``CheckResult``:

* ``check_engine(private_grad_fn)``: black-box tests of any function with the signature of
  ``dpdm.engine.private_grad``. They run it on a tiny model of our own (float64, two ``nn.Linear``)
  with a loss whose examples carry a K axis of noise draws, batches of 48 examples, and examples whose
  gradients exceed the clip norm. Most checks *replay* randomness: two calls with generators seeded
  alike draw the same noise, so the difference of their outputs is exactly the difference of the
  clipped sums; no access to the engine's internals is needed. The noise is tested per parameter tensor, at
  the given noise multiplier and at a second one (``second_noise_multiplier``): sigma = 1 alone is a fixed
  point of the usual bugs (the argument ignored, sigma**2, sqrt(sigma), 1/sigma).
* ``check_run_seed(private_grad_fn)``: the noise of one step under two run seeds, where the generator handed in
  picks the run seed (``audits.suite.training_private_grad(vary="run_seed")``): independent draws of the plan's
  variance, so a step whose noise ignores the run's secret seed (anyone with the code could regenerate it) fails;
  with ``after_lr_change``, a step after an lr change as well (its seed derives from the run seed by another path).
* ``check_fresh_noise(private_grad_fn)``: the noise of consecutive steps of one run, where the generator's seed is
  the step (``audits.suite.training_private_grad(vary="consecutive")``): steps s, s + 1 from 0 of both parities,
  and on either side of an lr change with ``after_lr_change``, must draw independent noise.
* ``check_noise_never_repeats(private_grad_fn)``: the same steps' noise alone (an empty batch), steps 0 to 2047
  and 2**k up to 2**62: no two may be equal or opposite (exact; a seed of ``step % N`` repeats it every N steps).
* ``check_network(private_grad_fn, network_problem(run_config))``: what the tiny model cannot show, on the
  run's own network (Conv2d, GroupNorm, attention and their per-layer rules) in float32, the dtype every
  private run trains in: per-example gradients per parameter tensor against a float64 autograd loop, the
  clipping bound to a few float32 ulps, a sensitivity replay, and the float32 noise (random images; about
  6 s on the ``small`` network, 11 s on ``mnist``, on one CPU core).
* ``check_subspace(make_private_grad)``: the same kind of replays for noise added in a public subspace
  (``dpdm train --public-subspace``): ``make_private_grad(basis)`` returns a function like the above that
  projects the clipped sum onto ``basis`` [d, k] and adds its noise there. The change one example makes
  must lie inside the noise's span (where it does not, no noise covers it) and have norm <= the clip
  norm even for a basis handed in with spectral norm 1.5; the noise in the span must have the plan's
  variance (at the given and the second noise multiplier).
* ``check_sampler(make_sampler)``: Poisson batch sizes and per-example inclusion counts against their
  binomial laws (fixed-size shuffled batches fail both), and determinism in (seed, step).
* ``check_run(run_dir, plan_doc)``: the run's plan.json, checkpoint ledger and metrics.csv against a
  claimed plan (sample rate, noise multiplier, clip norm, steps, delta); the run's weights are not read.
  metrics.csv is read with ``read_metrics``: a last line a crash cut short is left out, as `dpdm train
  --resume` drops it.

Statistical checks fail when their p-value is below ``alpha`` (default 1e-3 each; a suite of N such
checks then raises a false alarm with probability at most N * alpha); exact checks compare with a
floating-point tolerance and report ``p_value=None``. Seeds are fixed: the same engine always gets
the same results.
"""

from __future__ import annotations

import csv
import functools
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import stats

from dpdm.report_utils import epsilon_text

__all__ = [
    "CheckResult",
    "ENGINE_CHECKS",
    "SAMPLER_CHECKS",
    "RUN_CHECKS",
    "check_engine",
    "RUN_SEED_CHECKS",
    "check_run_seed",
    "FRESH_NOISE_CHECKS",
    "check_fresh_noise",
    "REPEAT_NOISE_CHECKS",
    "check_noise_never_repeats",
    "check_subspace",
    "SUBSPACE_CHECKS",
    "check_sampler",
    "check_run",
    "second_noise_multiplier",
    "tiny_problem",
    "NETWORK_CHECKS",
    "NetworkProblem",
    "network_problem",
    "check_network",
    "MetricsError",
    "read_metrics",
]

ENGINE_CHECKS = (
    "per_sample_gradients",
    "noise_multiplicity_averaged",
    "clipping_bound",
    "sensitivity_replay",
    "noise_variance",
    "noise_once_per_step",
)
RUN_SEED_CHECKS = ("noise_keyed_by_run_seed",)
FRESH_NOISE_CHECKS = ("noise_fresh_each_step",)
REPEAT_NOISE_CHECKS = ("noise_never_repeats",)
SUBSPACE_CHECKS = ("subspace_signal_in_noise_span", "subspace_sensitivity_replay", "subspace_noise_variance")
SAMPLER_CHECKS = ("poisson_batch_sizes", "poisson_inclusion_counts", "sampler_deterministic")
RUN_CHECKS = ("run_plan_matches", "run_ledger_matches", "run_logged_batches")

_REL_TOL = 1e-6  # float64 replays agree to ~1e-12; anything above 1e-6 is a real difference


@dataclass(frozen=True)
class CheckResult:
    """One check: ``passed``, its ``statistic``, a ``p_value`` (None for exact checks), a one-line ``detail``."""

    name: str
    passed: bool
    statistic: float
    p_value: float | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = bool(self.passed)
        d["statistic"] = _finite_or_none(self.statistic)
        d["p_value"] = None if self.p_value is None else _finite_or_none(self.p_value)
        return d


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _alpha(alpha) -> float:
    if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise ValueError(f"alpha={alpha!r} must be a number in (0, 1)")
    return float(alpha)


def _check_noise_multiplier(noise_multiplier) -> None:
    """ValueError unless the checks' ``noise_multiplier`` is a number > 0."""
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier={noise_multiplier!r} must be a number > 0")


def _guarded(name: str, fn: Callable[[], CheckResult]) -> CheckResult:
    """A check that crashes fails (with the error as its detail) instead of aborting the suite."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any crash of the code under test is a failed check
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return CheckResult(name, False, float("nan"), None, f"raised {type(e).__name__}: {first}"[:300])


# ----------------------------------------------------------------------------------------------
# Engine checks
# ----------------------------------------------------------------------------------------------


@dataclass
class _Problem:
    """A model, its per-example loss, a batch (tensors with the examples along dim 0, in the order ``loss_fn``
    takes them after the model) and a clip norm. ``x`` is the batch's first tensor, ``noise`` its last."""

    model: Any
    loss_fn: Callable
    batch: tuple
    clip_norm: float

    @property
    def x(self):
        return self.batch[0]

    @property
    def noise(self):
        return self.batch[-1]

    @property
    def size(self) -> int:
        return int(self.batch[0].shape[0])


def tiny_problem(num_examples: int = 48, K: int = 4, dim: int = 6, hidden: int = 12, seed: int = 0) -> _Problem:
    """The model, loss and data the engine checks use (exposed so tests can reuse them).

    loss_fn(model, x [1, d], noise [1, K, d]) = mean over the K draws and the d outputs of
    (model(x + noise_k) - x / 2)^2: one example carries K draws that must be averaged inside its loss.
    Example scales vary over a factor of 30, so that gradient norms straddle the clip norm, which is
    set to the 40th percentile of the per-example gradient norms.
    """
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim)).double()
    torch.random.set_rng_state(torch_state)
    scale = torch.exp(torch.linspace(math.log(0.2), math.log(6.0), num_examples, dtype=torch.float64))
    perm = torch.randperm(num_examples, generator=g)
    x = torch.randn(num_examples, dim, generator=g, dtype=torch.float64) * scale[perm, None]
    noise = 0.5 * torch.randn(num_examples, K, dim, generator=g, dtype=torch.float64)

    def loss_fn(model, x, noise):
        pred = model(x.unsqueeze(1) + noise)  # [1, K, d]
        return ((pred - 0.5 * x.unsqueeze(1)) ** 2).mean()

    problem = _Problem(model, loss_fn, (x, noise), 1.0)
    norms = np.array([np.linalg.norm(v) for v in _loop_grads(problem)])
    problem.clip_norm = float(np.quantile(norms, 0.4))
    return problem


def _flat(grads: dict, model) -> np.ndarray:
    names = [n for n, t in model.named_parameters() if t.requires_grad]
    missing = [n for n in names if n not in grads]
    if missing:
        raise ValueError(f"the engine returned no gradient for {missing}")
    return np.concatenate([grads[n].detach().double().reshape(-1).cpu().numpy() for n in names])


def _loop_grads(p: _Problem, x=None, noise=None) -> list[np.ndarray]:
    """Per-example gradients by a plain Python loop over examples (the reference), in ``_flat``'s order."""
    import torch

    batch = _batch(p, x, noise)
    named = [(n, t) for n, t in p.model.named_parameters() if t.requires_grad]
    out = []
    for i in range(batch[0].shape[0]):
        loss = p.loss_fn(p.model, *(t[i : i + 1] for t in batch))
        gs = torch.autograd.grad(loss, [t for _, t in named])
        out.append(np.concatenate([g.detach().double().reshape(-1).cpu().numpy() for g in gs]))
    return out


def _batch(p: _Problem, x=None, noise=None) -> tuple:
    """The problem's batch with its first (``x``) or last (``noise``) tensor replaced where given."""
    batch = list(p.batch)
    if x is not None:
        batch[0] = x
    if noise is not None:
        batch[-1] = noise
    return tuple(batch)


class _Caller:
    """Calls the engine on subsets of the problem with a seeded generator."""

    def __init__(self, fn, p: _Problem, noise_multiplier: float, expected_batch_size: float):
        self.fn, self.p = fn, p
        self.noise_multiplier = noise_multiplier
        self.expected = expected_batch_size

    def __call__(self, idx, seed: int, *, clip_norm=None, chunk_size=None, x=None, noise=None) -> np.ndarray:
        import torch

        idx = torch.as_tensor(idx, dtype=torch.long)
        gen = torch.Generator().manual_seed(int(seed))
        out = self.fn(
            self.p.model,
            self.p.loss_fn,
            *(t[idx] for t in _batch(self.p, x, noise)),
            clip_norm=self.p.clip_norm if clip_norm is None else clip_norm,
            noise_multiplier=self.noise_multiplier,
            expected_batch_size=self.expected,
            generator=gen,
            chunk_size=chunk_size,
        )
        return _flat(out, self.p.model)


def _max(values, default: float = 0.0) -> float:
    """max() that a NaN cannot hide in (Python's max skips a NaN that is not first): NaN counts as +inf."""
    return max((math.inf if math.isnan(v) else float(v) for v in values), default=default)


def _min(values, default: float = math.inf) -> float:
    """min() where a NaN counts as -inf (the worst case for a quantity that must be large enough)."""
    return min((-math.inf if math.isnan(v) else float(v) for v in values), default=default)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def _check_per_sample(call: _Caller, p: _Problem, loop: list[np.ndarray]) -> CheckResult:
    big = _no_clip(p, loop)
    E = call.expected
    base = call([], 11, clip_norm=big)
    errs = [_rel_err(E * (call([i], 11, clip_norm=big) - base), loop[i]) for i in range(len(loop))]
    total = E * (call(list(range(len(loop))), 11, clip_norm=big) - base)
    errs.append(_rel_err(total, np.sum(loop, axis=0)))
    worst = _max(errs)
    return CheckResult(
        "per_sample_gradients",
        worst <= _REL_TOL,
        worst,
        None,
        f"max relative error of {len(loop)} per-example gradients and their sum vs a loop, clipping "
        f"disabled: {worst:.2e} (tolerance {_REL_TOL:g})",
    )


def _no_clip(p: _Problem, loop: list[np.ndarray]) -> float:
    """A clip norm far above every gradient (noise scales with it, so not absurdly large)."""
    return 10.0 * (p.clip_norm + max(np.linalg.norm(v) for v in loop))


def _check_k_averaged(call: _Caller, p: _Problem, loop: list[np.ndarray]) -> CheckResult:
    big = _no_clip(p, loop)
    K = p.noise.shape[1]
    single = p.noise[:, :1]  # one draw
    same = single.expand(-1, K, -1).contiguous()  # the same draw K times
    E = call.expected
    base1 = call([], 12, clip_norm=big, noise=single)
    baseK = call([], 12, clip_norm=big, noise=same)
    errs, ratios = [], []
    for i in range(min(8, p.x.shape[0])):
        g1 = E * (call([i], 12, clip_norm=big, noise=single) - base1)
        gK = E * (call([i], 12, clip_norm=big, noise=same) - baseK)
        errs.append(_rel_err(gK, g1))
        ratios.append(np.linalg.norm(gK) / max(np.linalg.norm(g1), 1e-300))
    worst = _max(errs)
    return CheckResult(
        "noise_multiplicity_averaged",
        worst <= _REL_TOL,
        worst,
        None,
        f"an example whose K={K} draws are identical must have the gradient of one draw (K averaged, "
        f"not summed): max relative difference {worst:.2e}, median norm ratio {np.median(ratios):.3f}",
    )


def _check_clipping(call: _Caller, p: _Problem, loop: list[np.ndarray]) -> CheckResult:
    C, E = p.clip_norm, call.expected
    base = call([], 21)
    norms = np.array([np.linalg.norm(E * (call([i], 21) - base)) for i in range(len(loop))])
    raw = np.array([np.linalg.norm(v) for v in loop])
    over = int(np.sum(raw > C))
    worst = float(norms.max() / C)
    # Examples under the bound must be left alone, those over it scaled down to (at most) C.
    under_err = _max((_rel_err(E * (call([i], 21) - base), loop[i]) for i in np.flatnonzero(raw < 0.99 * C)), default=0.0)
    ok = worst <= 1 + _REL_TOL and over > 0 and under_err <= _REL_TOL
    return CheckResult(
        "clipping_bound",
        ok,
        worst,
        None,
        f"{over} of {len(loop)} examples have gradient norm above clip_norm={C:.4g} (up to "
        f"{raw.max() / C:.1f}x); largest clipped contribution / C = {worst:.6f} (must be <= 1); "
        f"relative change of unclipped examples {under_err:.1e}",
    )


def _neighbour_changes(call: _Caller, p: _Problem, loop: list[np.ndarray], seed: int):
    """E * (step(D + e) - step(D)) with the same randomness, for the 6 examples e with the largest
    gradients (the hardest cases), |D| from 32 to 37 (chunk boundaries move), chunk_size None and 16."""
    n = p.x.shape[0]
    raw = np.array([np.linalg.norm(v) for v in loop])
    extras = [int(i) for i in np.argsort(-raw)[:6]]
    for chunk in (None, 16):
        for j, e in enumerate(extras):
            base = [i for i in range(n) if i != e][: 32 + j]
            d1 = call(base, seed + j, chunk_size=chunk)
            d2 = call(base + [e], seed + j, chunk_size=chunk)
            yield call.expected * (d2 - d1)


def _check_sensitivity(call: _Caller, p: _Problem, loop: list[np.ndarray]) -> CheckResult:
    C = p.clip_norm
    worst = 0.0
    cases = 0
    for diff in _neighbour_changes(call, p, loop, 100):
        worst = _max([worst, float(np.linalg.norm(diff) / C)])
        cases += 1
    return CheckResult(
        "sensitivity_replay",
        worst <= 1 + _REL_TOL,
        worst,
        None,
        f"one step on D and on D plus one example with the same randomness ({cases} cases, |D| = "
        f"32..37, chunk_size None and 16): largest ||sum difference|| / C = {worst:.6f} (must be <= 1)",
    )


def second_noise_multiplier(noise_multiplier: float) -> float:
    """The second noise multiplier the noise checks run at: 0.5 or 2.0, whichever is farther (by ratio) from
    ``noise_multiplier`` (0.5 for 1.0 itself). It differs from the given one by a factor >= 2 and from 1 by a
    factor of 2, so a noise scale that is right only at the given sigma or only at sigma = 1 (the argument
    ignored, sigma**2, sqrt(sigma), 1/sigma, a constant) is off by a factor >= sqrt(2) there: a noise variance
    off by a factor >= 2."""
    s = float(noise_multiplier)
    return 0.5 if abs(math.log(s / 0.5)) >= abs(math.log(2.0 / s)) else 2.0


def _tensor_slices(model) -> list[tuple[str, slice]]:
    """(name, slice of the flat vector) per trained parameter tensor, in ``_flat``'s (``named_parameters``) order."""
    out, start = [], 0
    for name, t in model.named_parameters():
        if t.requires_grad:
            out.append((name, slice(start, start + t.numel())))
            start += t.numel()
    return out


def _chi2_two_sided(z: np.ndarray) -> tuple[float, float]:
    """(sum z^2 / n, two-sided p of sum z^2 against chi-square(n)): is the variance of ``z`` 1?"""
    ss, dof = float(np.sum(z**2)), z.size
    if not math.isfinite(ss):   # NaN or inf noise is no Gaussian noise (and NaN would compare as a pass)
        return ss / dof, 0.0
    cdf, sf = stats.chi2.cdf(ss, dof), stats.chi2.sf(ss, dof)
    return ss / dof, float(min(1.0, 2 * min(cdf, sf)))


def _noise_test(name: str, calls: list[tuple[_Caller, int]], p: _Problem, alpha: float, *, chunk_size, what: str,
                seed: int = 0, project: Callable[[np.ndarray], np.ndarray] | None = None,
                examples: int | None = None, replay: bool = False,
                labels: list[str] | None = None, first_seeds: list[int] | None = None) -> CheckResult:
    """The noise of ``2 * pairs`` calls (all the problem's examples, a fresh seed each) per ``(caller, pairs)``:
    the difference of two calls is ``sqrt(2) * sigma * C / E`` times N(0, I) under the claim, whatever the
    clipped sum. One check, the first caller's noise multiplier (the plan's) and a second one
    (``second_noise_multiplier``, so a noise scale right only at one sigma fails), each tested with

    * a two-sided chi-square of the variance per parameter tensor (a tensor that gets no noise, or too little,
      is a small share of the coordinates and would pass a pooled test), and one over all coordinates;
    * a Kolmogorov-Smirnov test of normality over all coordinates.

    With ``project`` (noise in a subspace) the coordinates are the projections, one pooled group. The check's
    p-value is the smallest of these p-values times their number (Bonferroni); its statistic the pooled
    variance ratio at the first noise multiplier.

    ``labels``: the callers are other steps of one claim rather than the given and a second noise multiplier
    (``check_run_seed``: a step before and one after an lr change); the detail and the tests name each by its
    label, and the statistic is the smallest of their pooled variance ratios (0 where one caller's noise repeats).

    ``examples``: the calls take the problem's first ``examples`` examples (default all). ``replay``: each
    caller's first call is made twice, and the check fails unless the two give the same output (the noise is a
    function of the generator handed in; the other replays run without noise there).

    ``first_seeds``: each caller's pairs are the generator seeds (s, s + 1), (s + 2, s + 3), ... from this s rather
    than from one drawn from ``seed`` (``check_fresh_noise``: seeds that are steps, of a parity it picks)."""
    C, E = p.clip_norm, calls[0][0].expected
    idx = list(range(p.size if examples is None else examples))
    groups = _tensor_slices(p.model) if project is None else [("projection", slice(None))]
    # Generator seeds below 2**62 whatever the check's seed (dpdm audit --seed takes up to 2**63 - 1; torch's
    # generators up to 2**64 - 1, and 1000 + 10**6 * seed overflowed them: both noise checks failed).
    base = [int(x) >> 2 for x in np.random.SeedSequence([int(seed), 4242]).generate_state(len(calls), np.uint64)]
    if first_seeds is not None:
        base = [int(s) for s in first_seeds]
    tests: list[tuple[str, float]] = []  # (what was tested, p-value)
    parts, pooled = [], []
    replayed = []   # per caller, where replay: the largest difference of its first call made twice
    for k, (call, pairs) in enumerate(calls):
        sigma = call.noise_multiplier
        z = []
        for j in range(pairs):
            s = base[k] + 2 * j   # fresh noise per (check seed, caller, pair)
            a = call(idx, s, chunk_size=chunk_size)
            if replay and j == 0:
                again = call(idx, s, chunk_size=chunk_size)
                replayed.append(float(np.max(np.abs(again - a), initial=0.0) / (sigma * C / E)))
            b = call(idx, s + 1, chunk_size=chunk_size)
            d = E * (a - b) / (math.sqrt(2) * sigma * C)  # N(0, I) under the claim
            z.append(d if project is None else project(d))
        z = np.stack(z)  # [pairs, coordinates]
        ratio, p_var = _chi2_two_sided(z)
        pooled.append(ratio)
        p_ks = float(stats.kstest(z.reshape(-1), "norm").pvalue) if np.all(np.isfinite(z)) else 0.0
        label = f"sigma={sigma:g}" if labels is None else labels[k]
        tests += [(f"{label} all coordinates variance", p_var), (f"{label} normality (KS)", p_ks)]
        if len(groups) > 1:
            per = [(g, *_chi2_two_sided(z[:, sl])) for g, sl in groups]
            tests += [(f"{label} tensor {g} variance", pv) for g, _, pv in per]
            lo, hi = min(per, key=lambda t: t[1]), max(per, key=lambda t: t[1])
            spread = f", per tensor {lo[1]:.4f} ({lo[0]}) to {hi[1]:.4f} ({hi[0]})"
        else:
            spread = ""
        head = f"sigma={sigma:g}{' (given)' if k == 0 else ' (second)'}" if labels is None else \
            f"{labels[k]} (sigma={sigma:g})"
        parts.append(f"{head}: {ratio:.4f}{spread} over {pairs} "
                     f"seed pairs x {z.shape[1]} coordinates (chi-square p={p_var:.2g}, KS p={p_ks:.2g})")
    worst = min(tests, key=lambda t: t[1])
    p_val = min(1.0, len(tests) * worst[1])  # Bonferroni over all the tests
    same = all(r == 0.0 for r in replayed)   # NaN compares unequal: a failure
    return CheckResult(
        name,
        p_val >= alpha and same,
        pooled[0] if labels is None else min(pooled, key=lambda r: -math.inf if math.isnan(r) else r),
        p_val,
        f"{what}: noise variance / (noise_multiplier * clip_norm)^2 at " + "; at ".join(parts)
        + f"; smallest p of {len(tests)} tests: {worst[1]:.2g} ({worst[0]})"
        + ("" if not replayed else
           f"; the same generator seed twice: largest difference "
           f"{max(replayed, key=lambda r: math.inf if math.isnan(r) else r):.2g} noise std (must be 0)"),
    )


def check_engine(
    private_grad_fn: Callable,
    *,
    noise_multiplier: float = 1.0,
    alpha: float = 1e-3,
    seed: int = 0,
    pairs: int = 60,
) -> list[CheckResult]:
    """Runs the engine checks against ``private_grad_fn`` (signature of ``dpdm.engine.private_grad``).

    The function must return ``(sum of per-example gradients clipped to clip_norm + N(0,
    (noise_multiplier * clip_norm)^2 I)) / expected_batch_size`` as a dict keyed like
    ``model.named_parameters()``, draw its noise from ``generator`` only, once per call whatever
    ``chunk_size`` is, and average (not sum) the K noise draws inside an example's loss. The
    expected batch size (40) differs from the batch sizes used (0 to 49), so dividing by the real
    batch size is caught too.

    The two noise checks each test ``pairs`` seed pairs at ``noise_multiplier`` (pass the plan's) and
    ``pairs // 2`` at ``second_noise_multiplier(noise_multiplier)`` (0.5 or 2.0), each parameter tensor's
    noise on its own as well as all coordinates pooled; the smallest p-value, Bonferroni-corrected, is the
    check's.
    """
    alpha = _alpha(alpha)
    _check_noise_multiplier(noise_multiplier)
    p = tiny_problem(seed=seed)
    loop = _loop_grads(p)
    # The replays cancel the noise exactly only where it is not too large against the gradients (in float64, a
    # noise multiplier of 1e6 failed per_sample_gradients): they run at 1; the noise tests at the given one.
    call = _Caller(private_grad_fn, p, 1.0, 40.0)
    noise_calls = [(_Caller(private_grad_fn, p, float(noise_multiplier), 40.0), pairs),
                   (_Caller(private_grad_fn, p, second_noise_multiplier(noise_multiplier), 40.0), max(1, pairs // 2))]
    return [
        _guarded("per_sample_gradients", lambda: _check_per_sample(call, p, loop)),
        _guarded("noise_multiplicity_averaged", lambda: _check_k_averaged(call, p, loop)),
        _guarded("clipping_bound", lambda: _check_clipping(call, p, loop)),
        _guarded("sensitivity_replay", lambda: _check_sensitivity(call, p, loop)),
        _guarded("noise_variance", lambda: _noise_test(
            "noise_variance", noise_calls, p, alpha, chunk_size=None, seed=seed, what="one call, no chunks")),
        _guarded("noise_once_per_step", lambda: _noise_test(
            "noise_once_per_step", noise_calls, p, alpha, chunk_size=8, seed=seed,
            what="chunk_size=8 (6 chunks), noise must still be added once")),
    ]


def check_run_seed(
    private_grad_fn: Callable,
    *,
    noise_multiplier: float = 1.0,
    alpha: float = 1e-3,
    seed: int = 0,
    pairs: int = 20,
    after_lr_change: Callable | None = None,
    labels: tuple[str, str] = ("one step", "a step after an lr change"),
) -> list[CheckResult]:
    """``noise_keyed_by_run_seed``: is a step's noise drawn from the run's secret seed? ``private_grad_fn`` has the
    signature of ``dpdm.engine.private_grad``, but the generator handed in picks the run seed of one fixed step
    (``audits.suite.training_private_grad(vary="run_seed")``), not a step of one run as for ``check_engine``.
    ``after_lr_change``: the same for a step after an lr change (``training_private_grad(vary="run_seed",
    lr_segments=...)``), whose seed `dpdm.train.run_seed_at` derives by another path (a hash of the run seed and
    the lr segments, not the run seed itself): tested in the same check (r2 F1, stop 52); ``labels`` name the two
    in the detail.

    On the tiny float64 problem, all of its examples, ``pairs`` pairs of run seeds at ``noise_multiplier`` per
    step: two runs' noise at one step on one batch are independent draws, so their difference is
    ``sqrt(2) * sigma * C / E`` times N(0, I) (``_noise_test``: variance per parameter tensor and pooled, normality),
    and one run seed twice gives the same output (a resume replays its steps). A noise seed that ignores the run
    seed (a constant, the step alone, the lr segments alone) gives the same noise in every run: a difference of 0
    (the check's statistic, the smaller of the steps' variance ratios), where anyone with the code could
    regenerate every step's noise and subtract it. ``check_engine``'s noise checks compare steps of one run and
    cannot see that (h123 F1, stop 52); ``sampler_deterministic`` is the same check for the Poisson batches."""
    alpha = _alpha(alpha)
    _check_noise_multiplier(noise_multiplier)
    p = tiny_problem(seed=seed)
    fns = [private_grad_fn] + ([] if after_lr_change is None else [after_lr_change])
    return [_guarded("noise_keyed_by_run_seed", lambda: _noise_test(
        "noise_keyed_by_run_seed", [(_Caller(fn, p, float(noise_multiplier), 40.0), pairs) for fn in fns], p, alpha,
        chunk_size=None, seed=seed + 2, replay=True, labels=list(labels[:len(fns)]),
        what=f"{' and '.join(labels[:len(fns)])}, each on one batch under two run seeds (independent draws; 0 where "
             "the noise ignores the run's secret seed)"))]


def check_fresh_noise(
    private_grad_fn: Callable,
    *,
    noise_multiplier: float = 1.0,
    alpha: float = 1e-3,
    seed: int = 0,
    pairs: int = 5,
    after_lr_change: Callable | None = None,
    lr_change_step: int | None = None,
) -> list[CheckResult]:
    """``noise_fresh_each_step``: do consecutive steps of one run draw independent noise? ``private_grad_fn`` has
    the signature of ``dpdm.engine.private_grad``, but the seed of the generator handed in is the step of one run
    (``audits.suite.training_private_grad(vary="consecutive")``); ``after_lr_change`` the same for a run whose lr
    changed at step ``lr_change_step``.

    On the tiny float64 problem, all of its examples, at ``noise_multiplier``: ``pairs`` pairs of steps (0, 1),
    (2, 3), ... and as many (1, 2), (3, 4), ...; with ``after_lr_change``, for c = ``lr_change_step``, the pair
    (c - 1, c) across the change (alone, so that noise shared there fails with all the check's power) and ``pairs``
    pairs (c, c + 1), (c + 2, c + 3), ... after it. Two steps' noise on one batch are independent draws, so their
    difference is ``sqrt(2) * sigma * C / E`` times N(0, I) (``_noise_test``). Noise that two neighbouring steps
    share (a step's seed from ``step // 2``, an off-by-one in its derivation, the step before an lr change reused
    after it) cancels in their difference: a variance of 0 (the check's statistic, the smallest of the callers').
    ``check_engine``'s noise checks compare two random steps of 2**62, never neighbours (h143 F1, stop 54)."""
    alpha = _alpha(alpha)
    _check_noise_multiplier(noise_multiplier)
    p = tiny_problem(seed=seed)
    callers = [(private_grad_fn, 0, pairs, "steps (0, 1), (2, 3), ..."),
               (private_grad_fn, 1, pairs, "steps (1, 2), (3, 4), ...")]
    if after_lr_change is not None:
        c = int(lr_change_step) if lr_change_step is not None else 0
        if c < 1:
            raise ValueError(f"lr_change_step={lr_change_step!r} must be >= 1 (an lr changes after a run's first step)")
        callers += [(after_lr_change, c - 1, 1, f"steps ({c - 1}, {c}) of a run whose lr changed at step {c}"),
                    (after_lr_change, c, pairs, f"steps ({c}, {c + 1}), ({c + 2}, {c + 3}), ... of that run")]
    return [_guarded("noise_fresh_each_step", lambda: _noise_test(
        "noise_fresh_each_step", [(_Caller(fn, p, float(noise_multiplier), 40.0), n) for fn, _, n, _ in callers],
        p, alpha, chunk_size=None, seed=seed, labels=[label for *_, label in callers],
        first_seeds=[first for _, first, _, _ in callers],
        what="consecutive steps of one run, each pair on one batch (independent draws; 0 where two steps share "
             "their noise)"))]


REPEAT_STEPS = 2048   # check_noise_never_repeats: steps 0 to REPEAT_STEPS - 1 ...
REPEAT_POWERS = 62    # ... and 2**k for k up to this


def check_noise_never_repeats(
    private_grad_fn: Callable,
    *,
    noise_multiplier: float = 1.0,
    seed: int = 0,
    steps: int = REPEAT_STEPS,
    powers: int = REPEAT_POWERS,
) -> list[CheckResult]:
    """``noise_never_repeats``: does any step of one run draw the noise of another, or its negative?
    ``private_grad_fn`` is called as for ``check_fresh_noise`` (the generator's seed is the step of one run,
    ``audits.suite.training_private_grad(vary="consecutive")``), on an empty batch: its output is the step's noise
    alone. Steps 0 to ``steps`` - 1 and 2**k for k up to ``powers`` (about 1 s on one CPU core): an exact check
    (``p_value`` None, no false alarm: independent float64 Gaussian vectors are never equal), failing where two
    are bit for bit equal or opposite, or one is not finite. The statistical noise checks compare neighbours
    (``check_fresh_noise``) or two random steps of 2**62, so noise that repeats every N steps (a seed of
    ``step % N``, the step within an epoch, N = 1/q) passed them all from N of about 64 (r2 F2, stop 54); here it
    fails for every N < ``steps``, and for N a power of two up to 2**``powers``. The statistic: the number of
    steps whose noise repeats an earlier one's."""
    _check_noise_multiplier(noise_multiplier)
    p = tiny_problem(seed=seed)
    call = _Caller(private_grad_fn, p, float(noise_multiplier), 40.0)
    first = min(powers + 1, max(0, steps - 1).bit_length())   # the powers of two below `steps` are among them
    seen: dict[bytes, int] = {}
    repeats, example, bad = 0, "", None
    for s in [*range(steps), *(2**k for k in range(first, powers + 1))]:
        v = np.asarray(call([], s), dtype=np.float64)
        if bad is None and not np.all(np.isfinite(v)):
            bad = s
        key, opposite = (v + 0.0).tobytes(), (-v + 0.0).tobytes()   # + 0.0: -0.0 and 0.0 alike
        earlier = seen.get(key, seen.get(opposite))
        if earlier is not None:
            repeats += 1
            example = example or f"step {s} drew {'the' if key in seen else 'minus the'} noise of step {earlier}"
        seen.setdefault(key, s)
    n = steps + powers + 1 - first
    what = (f"the noise alone (an empty batch) of {n} steps of one run, 0 to {steps - 1} and 2**k for k = "
            f"{first} to {powers}: ")
    if bad is not None:
        return [CheckResult("noise_never_repeats", False, float(repeats), None,
                            what + f"step {bad}'s noise is not finite")]
    return [CheckResult("noise_never_repeats", repeats == 0, float(repeats), None,
                        what + (f"{repeats} step{'s' if repeats != 1 else ''} drew the noise of an earlier step or "
                                f"its negative (the first: {example})" if repeats else "no two equal or opposite"))]


# ----------------------------------------------------------------------------------------------
# The run's own network, in float32
# ----------------------------------------------------------------------------------------------

NETWORK_CHECKS = (
    "network_per_sample_gradients",
    "network_clipping_bound",
    "network_sensitivity_replay",
    "network_noise_variance",
    "network_noise_once_per_step",
)
_F32_EPS = float(np.finfo(np.float32).eps)   # 1.19e-7
# Per parameter tensor, the float32 engine against a float64 loop: measured up to ~3e-6 on the presets' U-Nets at
# initialization (random images); a rule that mixes examples is off by ~0.1 to 1, a wrong clip factor by its error.
NETWORK_GRAD_TOL = 1e-3
# One example's clipped contribution, measured from the float32 output: the engine clips with a margin of 8 ulps,
# so it stays below C; a few ulps above C are allowed for the measurement.
NETWORK_CLIP_TOL = 4 * _F32_EPS
# step(D + e) - step(D) of float32 sums over a handful of examples (chunked or not): rounding of the sums adds
# ~|D| ulps of C at most.
NETWORK_SENSITIVITY_TOL = 64 * _F32_EPS


@dataclass
class NetworkProblem:
    """The run's network, loss and a few random examples in float32 (``problem``), with the per-example
    gradients of a float64 copy computed by a plain autograd loop (``reference``, in ``_flat``'s order)."""

    problem: _Problem
    reference: list
    description: str


def _layer_summary(model) -> str:
    from torch import nn

    counts = {}
    for m in model.modules():
        layer_types = (nn.Conv2d, nn.GroupNorm, nn.Linear, nn.Embedding)
        kind = ("attention" if type(m).__name__.startswith("Attn") else
                next((t.__name__ for t in layer_types if isinstance(m, t)), None))
        if kind:
            counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in counts.items())


def network_problem(run_config: dict, *, num_examples: int = 4, noise_multiplicity: int = 2,
                    seed: int = 0) -> NetworkProblem:
    """The run's own denoiser (``dpdm.train.build_denoiser(run_config)``, its ``--trainable`` subset, float32 as
    every private run trains) and the loss `dpdm train` gives it (``engine_loss_fn`` of EDMLoss, or of VLoss for
    ``precond`` v), on ``num_examples`` random images of the run's shape (uniform in [-1, 1]; random labels,
    the null class among them where the run drops labels) with ``noise_multiplicity`` diffusion draws each.
    No private image is used: which examples the engine is tested on does not matter, and the run's images are
    private. The weights are a fresh initialization seeded from ``seed`` (the run's weights are not needed
    either). The clip norm is the 25th percentile of the float64 per-example gradient norms: of the 4 examples,
    3 are clipped and 1 is not.

    The reference gradients come from a float64 copy of the network, one example at a time with plain
    autograd: no vmap, no per-layer rule, no float32."""
    import copy

    import torch

    from dpdm.loss import engine_loss_fn
    from dpdm.train import build_denoiser, select_trainable, training_loss

    n = int(num_examples)
    if n < 3:
        raise ValueError(f"num_examples={num_examples!r} must be >= 3")
    train = run_config.get("train") or {}
    num_classes = int(run_config.get("num_classes") or 0)
    C, R = int(run_config["img_channels"]), int(run_config["img_resolution"])
    init_seed, data_seed = (int(v) for v in np.random.SeedSequence([int(seed), 0x4E7]).generate_state(2))
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(init_seed)
    try:
        model = build_denoiser(run_config).float()
    finally:
        torch.random.set_rng_state(torch_state)
    if train.get("trainable"):
        select_trainable(model, tuple(train["trainable"]))
    loss_obj = training_loss(run_config.get("precond"), train.get("train_sigma"),
                             float(run_config.get("sigma_data", 3 ** -0.5)))
    g = torch.Generator().manual_seed(data_seed)
    batch = [torch.rand(n, C, R, R, generator=g) * 2 - 1]
    if num_classes:
        dropped = float(train.get("label_dropout") or 0.0) > 0   # then the null class (num_classes) is seen too
        y = torch.randint(0, num_classes, (n,), generator=g)
        if dropped:
            y[-1] = num_classes
        batch.append(y)
    sigma, noise = loss_obj.draw(n, int(noise_multiplicity), (C, R, R), generator=g)
    batch += [sigma, noise]
    loss_fn = engine_loss_fn(loss_obj, conditional=bool(num_classes))
    problem = _Problem(model, loss_fn, tuple(batch), 1.0)
    model64 = copy.deepcopy(model).double()
    batch64 = tuple(t.double() if t.is_floating_point() else t for t in batch)
    reference = _loop_grads(_Problem(model64, loss_fn, batch64, 1.0))
    norms = np.array([np.linalg.norm(v) for v in reference])
    problem.clip_norm = float(np.quantile(norms, 0.25))
    trained = sum(t.numel() for t in model.parameters() if t.requires_grad)
    description = (f"the run's '{run_config.get('model')}' network ({trained:,} trained parameters; "
                   f"{_layer_summary(model)}), float32, {n} random {C}x{R}x{R} images"
                   + (" with random labels" if num_classes else "") + f", K={int(noise_multiplicity)}")
    return NetworkProblem(problem, reference, description)


def _tensor_error(a: np.ndarray, ref: np.ndarray, slices) -> tuple[float, str]:
    """The largest relative error of ``a`` against ``ref`` over the parameter tensors, and that tensor's name.
    A tensor whose reference gradient is below 1e-9 of the whole one is compared on that scale (its
    own relative error would be float32 noise)."""
    floor = 1e-9 * float(np.linalg.norm(ref))
    worst, where = 0.0, ""
    for name, sl in slices:
        err = float(np.linalg.norm(a[sl] - ref[sl])) / max(float(np.linalg.norm(ref[sl])), floor, 1e-300)
        if math.isnan(err) or err > worst:
            worst, where = (math.inf if math.isnan(err) else err), name
    return worst, where


def check_network(
    private_grad_fn: Callable,
    net: NetworkProblem,
    *,
    noise_multiplier: float = 1.0,
    alpha: float = 1e-3,
    seed: int = 0,
    pairs: int = 1,
    only: tuple[str, ...] | None = None,
) -> list[CheckResult]:
    """The engine checks that depend on the network and the dtype, on the run's own network in float32
    (``network_problem``), through ``private_grad_fn`` (signature of ``dpdm.engine.private_grad``; expected
    batch size 4, a power of two, so that scaling by it is exact):

    * ``network_per_sample_gradients``: the step (no noise) on each example alone and on all of them, against
      the float64 loop's gradients clipped to C, per parameter tensor (a per-layer rule that mixes examples, or
      a wrong rule for Conv2d, GroupNorm, attention or SiLU, is off in its own tensor however small that
      tensor's gradient is at initialization; so is an example that was clipped when it should not have been,
      or not clipped): relative error <= ``NETWORK_GRAD_TOL``;
    * ``network_clipping_bound``: each example's contribution (the same calls) is <= C within
      ``NETWORK_CLIP_TOL``;
    * ``network_sensitivity_replay``: step(D + e) - step(D), for e the example with the largest gradient and D
      the 3 others, chunk_size None and 3 (e alone in the last chunk), has norm <= C (within
      ``NETWORK_SENSITIVITY_TOL``);
    * ``network_noise_variance``: the noise of the float32 step (no example: the noise alone) at
      ``noise_multiplier`` and at ``second_noise_multiplier``, ``pairs`` and ``max(1, pairs // 2)`` seed pairs of
      every coordinate, per tensor and pooled, as ``check_engine``'s; the same generator seed must give the same
      output;
    * ``network_noise_once_per_step``: the same at ``noise_multiplier``, on 2 examples in chunks of 1.

    ``only``: run just these checks (by name). Cost: 10 calls of the step on 1 to 4 examples and 6 on none;
    on one CPU core about 6 s for the ``small`` network with the rules engine (most of it their fixed cost per
    call and a first call's warm-up), 2 s with vmap, and about 11 s for ``mnist`` (1.75M parameters).

    The replays run without noise (noise multiplier 0): float32 cannot cancel noise exactly enough to
    measure a gradient of 1e-5 of its scale or a norm to a few ulps.
    """
    alpha = _alpha(alpha)
    _check_noise_multiplier(noise_multiplier)
    p, ref = net.problem, net.reference
    E = 4.0
    call = _Caller(private_grad_fn, p, 0.0, E)
    slices = _tensor_slices(p.model)
    raw = np.array([np.linalg.norm(v) for v in ref])
    C = p.clip_norm
    what = net.description
    largest = int(np.argmax(raw))
    rest = [i for i in range(p.size) if i != largest]
    everyone = rest + [largest]   # the largest gradient last: the sensitivity replay adds it to the others
    # What each example should contribute at clip norm C: its float64 gradient, scaled to norm C if above it.
    want = [v * min(1.0, C / max(float(np.linalg.norm(v)), 1e-300)) for v in ref]
    cache: dict[tuple, np.ndarray] = {}

    def step(idx, chunk=None):   # E * (the clipped sum of the examples idx), no noise; each call made once
        key = (tuple(idx), chunk)
        if key not in cache:
            cache[key] = E * call(list(idx), 31, chunk_size=chunk)
        return cache[key]

    def per_sample():
        errs = [(*_tensor_error(step([i]), want[i], slices), f"example {i}") for i in range(p.size)]
        errs.append((*_tensor_error(step(everyone), np.sum(want, axis=0), slices), f"all {p.size} examples"))
        worst = max(errs, key=lambda t: t[0])
        return CheckResult(
            "network_per_sample_gradients", worst[0] <= NETWORK_GRAD_TOL, worst[0], None,
            f"{what}: the step (no noise) on each example and on all {p.size} vs a float64 autograd loop's "
            f"gradients clipped to C, per parameter tensor: largest relative error {worst[0]:.2e} ({worst[1]}, "
            f"{worst[2]}; tolerance {NETWORK_GRAD_TOL:g})")

    def clipping():
        norms = np.array([np.linalg.norm(step([i])) for i in range(p.size)])
        worst = _max(norms / C)
        over = int(np.sum(raw > C))
        ok = worst <= 1 + NETWORK_CLIP_TOL and over > 0
        return CheckResult(
            "network_clipping_bound", ok, worst, None,
            f"the run's network: {over} of {p.size} examples have gradient norm above clip_norm={C:.4g} (up to "
            f"{raw.max() / C:.2f}x); largest contribution of one example / C - 1 = {worst - 1:.2e} (must be <= "
            f"{NETWORK_CLIP_TOL:.1e}, {NETWORK_CLIP_TOL / _F32_EPS:g} float32 ulps)")

    def sensitivity():
        worst = _max([float(np.linalg.norm(step(everyone, chunk) - step(rest, chunk))) / C for chunk in (None, 3)])
        return CheckResult(
            "network_sensitivity_replay", worst <= 1 + NETWORK_SENSITIVITY_TOL, worst, None,
            f"the run's network: one step on D ({len(rest)} examples) and on D plus the example with the largest "
            f"gradient (added last), chunk_size None and 3 (it alone in the last chunk), no noise: largest ||sum "
            f"difference|| / C - 1 = {worst - 1:.2e} (must be <= {NETWORK_SENSITIVITY_TOL:.1e})")

    noise_calls = [(_Caller(private_grad_fn, p, float(noise_multiplier), E), pairs),
                   (_Caller(private_grad_fn, p, second_noise_multiplier(noise_multiplier), E), max(1, pairs // 2))]
    checks = {
        "network_per_sample_gradients": per_sample,
        "network_clipping_bound": clipping,
        "network_sensitivity_replay": sensitivity,
        "network_noise_variance": lambda: _noise_test(
            "network_noise_variance", noise_calls, p, alpha, chunk_size=None, seed=seed, examples=0, replay=True,
            what="the run's network, float32, the step's noise alone (no example)"),
        "network_noise_once_per_step": lambda: _noise_test(
            "network_noise_once_per_step", noise_calls[:1], p, alpha, chunk_size=1, seed=seed + 1, examples=2,
            what="the run's network, float32, 2 examples in chunks of 1 (noise must still be added once)"),
    }
    unknown = sorted(set(only or ()) - set(checks))
    if unknown:
        raise ValueError(f"only={only!r}: no check named {unknown}; the checks are {NETWORK_CHECKS}")
    return [_guarded(name, fn) for name, fn in checks.items() if only is None or name in only]


# ----------------------------------------------------------------------------------------------
# Subspace checks (noise in a public subspace)
# ----------------------------------------------------------------------------------------------


def _top_directions(p: _Problem, loop: list[np.ndarray], dim: int) -> np.ndarray:
    """[d, dim] orthonormal: the top right singular vectors of the problem's clipped per-example
    gradients (computed here with numpy, not by the code under test). The tiny problem plays the
    public data; spanning the gradients' main directions makes the projected changes large."""
    G = np.stack([v * min(1.0, p.clip_norm / (np.linalg.norm(v) + 1e-12)) for v in loop])
    _, _, vt = np.linalg.svd(G, full_matrices=False)
    return np.ascontiguousarray(vt[:dim].T)


def _check_subspace_replays(calls: dict[float, _Caller], p: _Problem, loop: list[np.ndarray],
                            Q: np.ndarray) -> tuple[CheckResult, CheckResult]:
    C = p.clip_norm
    worst_out = worst_sens = 0.0
    smallest_in = math.inf
    cases = 0
    for call in calls.values():
        for diff in _neighbour_changes(call, p, loop, 200):
            inside = Q @ (Q.T @ diff)
            norm = float(np.linalg.norm(diff))
            worst_out = _max([worst_out, float(np.linalg.norm(diff - inside)) / max(norm, 1e-300)])
            smallest_in = _min([smallest_in, float(np.linalg.norm(inside)) / C])
            worst_sens = _max([worst_sens, norm / C])
            cases += 1
    span = CheckResult(
        "subspace_signal_in_noise_span",
        worst_out <= _REL_TOL and smallest_in > 1e-3,
        worst_out,
        None,
        f"one step on D and on D plus one example with the same randomness ({cases} cases, basis of "
        f"spectral norm 1 and 1.5, chunk_size None and 16): largest share of the change outside the "
        f"basis' span {worst_out:.2e} (must be <= {_REL_TOL:g}: no noise covers it there); smallest change "
        f"inside / C = {smallest_in:.3f} (must be > 0)",
    )
    sens = CheckResult(
        "subspace_sensitivity_replay",
        worst_sens <= 1 + _REL_TOL,
        worst_sens,
        None,
        f"the same {cases} cases: largest ||sum difference|| / C = {worst_sens:.6f} (must be <= 1; a basis "
        "of spectral norm 1.5 must be scaled down, not used as given)",
    )
    return span, sens


def check_subspace(
    make_private_grad: Callable[[Any], Callable],
    *,
    noise_multiplier: float = 1.0,
    alpha: float = 1e-3,
    seed: int = 0,
    pairs: int = 60,
    dim: int = 8,
) -> list[CheckResult]:
    """Runs the subspace checks against ``make_private_grad(basis)``.

    ``basis`` is a float64 tensor [d, dim] (d: the tiny model's parameters, in ``named_parameters``
    order) holding ``dim`` orthonormal directions, once as given and once multiplied by 1.5. The
    function returned must have the signature of ``dpdm.engine.private_grad`` and compute
    ``basis' @ (basis'^T sum_i clip(g_i) + N(0, (noise_multiplier * clip_norm)^2 I_dim)) / expected_batch_size``
    with basis' = basis scaled to spectral norm <= 1 (as ``dpdm.engine.add_noise_in_subspace`` does).
    The noise check runs ``4 * pairs`` seed pairs (``dim`` coordinates each) on the basis of norm 1.5 at
    ``noise_multiplier`` and ``2 * pairs`` at ``second_noise_multiplier(noise_multiplier)`` (0.5 or 2.0).
    """
    import torch

    alpha = _alpha(alpha)
    _check_noise_multiplier(noise_multiplier)
    p = tiny_problem(seed=seed)
    loop = _loop_grads(p)
    Q = _top_directions(p, loop, dim)
    calls: dict[float, _Caller] = {}

    def replays():   # at noise multiplier 1, as check_engine's
        for scale in (1.0, 1.5):
            calls[scale] = _Caller(make_private_grad(torch.from_numpy(scale * Q)), p, 1.0, 40.0)
        return _check_subspace_replays(calls, p, loop, Q)

    span_sens = _guarded("subspace replays", replays)
    if isinstance(span_sens, CheckResult):   # it crashed: every check fails with the error
        return [CheckResult(name, False, span_sens.statistic, None, span_sens.detail) for name in SUBSPACE_CHECKS]
    return [
        *span_sens,
        _guarded("subspace_noise_variance", lambda: _noise_test(
            "subspace_noise_variance",
            [(_Caller(calls[1.5].fn, p, float(noise_multiplier), 40.0), 4 * pairs),
             (_Caller(calls[1.5].fn, p, second_noise_multiplier(noise_multiplier), 40.0), max(1, 2 * pairs))],
            p, alpha, chunk_size=8, seed=seed, project=lambda z: Q.T @ z,
            what=f"coordinates in the {dim} basis directions, basis of spectral norm 1.5, chunk_size=8")),
    ]


# ----------------------------------------------------------------------------------------------
# Sampler checks
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)   # one check of logged sizes asks for the same bins three times
def _gof_bins(n: int, q: float, N: int) -> tuple[tuple[tuple[int, int], ...], np.ndarray] | None:
    """The bins of ``_binomial_gof`` for N observations of Binomial(n, q): their (first, last) values, covering
    0..n, and probabilities (read-only: cached); None when fewer than two bins reach an expected count of 5.
    Only the values between the 1e-9 quantiles are summed one by one (the tails come from the cdf), so the cost
    does not grow with n (the pmf over all of 0..n took seconds at n = 3e7)."""
    lo = int(stats.binom.ppf(1e-9, n, q))
    hi = int(stats.binom.isf(1e-9, n, q))
    pmf = stats.binom.pmf(np.arange(lo, hi + 1), n, q)
    edges, exp_bins, acc, start = [], [], 0.0, lo
    # Build bins over [lo, hi] each with expected count >= 5; tails go into the end bins.
    for k in range(lo, hi + 1):
        acc += pmf[k - lo]
        if acc * N >= 5:
            edges.append((start, k))
            exp_bins.append(acc)
            acc, start = 0.0, k + 1
    if len(edges) < 2:
        return None
    if acc > 0:  # remainder joins the last bin
        edges[-1] = (edges[-1][0], hi)
        exp_bins[-1] += acc
    edges[0] = (0, edges[0][1])
    edges[-1] = (edges[-1][0], n)
    exp_bins = np.array(exp_bins)
    exp_bins[0] = stats.binom.cdf(edges[0][1], n, q)
    exp_bins[-1] = stats.binom.sf(edges[-1][0] - 1, n, q)
    probs = exp_bins / exp_bins.sum()
    probs.setflags(write=False)
    return tuple(edges), probs


def _binomial_gof(observed: np.ndarray, n: int, q: float) -> tuple[float, float, int]:
    """Chi-square goodness of fit of integer observations to Binomial(n, q); bins with expected < 5 merged."""
    observed = np.asarray(observed, dtype=np.int64)
    N = observed.size
    bins = _gof_bins(n, q, N)
    if bins is None:
        return float("inf"), 0.0, 0
    edges, probs = bins
    obs = np.array([np.sum((observed >= a) & (observed <= b)) for a, b in edges])
    expected = probs * N
    dof = len(edges) - 1
    chi = float(np.sum((obs - expected) ** 2 / expected))
    return chi, float(stats.chi2.sf(chi, dof)), dof


# The logged batch sizes' test (``check_run``'s run_logged_batches). Its statistic is the smaller of two
# asymptotic log p-values: the chi-square fit above (a wrong rate or shape) and the two-sided dispersion
# sum (x - nq)^2 / (nq(1 - q)) against chi2(N) (fixed-size batches have variance 0). With 11-20 rows the fit
# has 1-2 dof and expected counts near 5, where its chi-square tail is too light (1.3-2x the level), and
# fixed-size batches all fall in one of 2 bins (p 0.001-0.006): they passed at 11-15 rows (h96 F1, F3, stop
# 48). So neither p-value is used as such: the statistic is compared with its law under Poisson sampling,
# simulated from a fixed seed (a reproducible verdict), which is valid at every row count up to Monte Carlo
# error. The draws are about 100 / alpha (a relative error of about 10% on the level), at most
# LOGGED_SIZES_DRAWS batch sizes in all (about a second).
LOGGED_SIZES_DRAWS = 10_000_000
LOGGED_SIZES_SEED = 0x5A3B


class _SizeStatistic:
    """The statistic of sets of N batch sizes from Binomial(n, q) over the values lo..hi: the smaller of the log
    p-values of the chi-square fit (``_gof_bins``; none when they make one bin) and of the two-sided dispersion
    test. Smaller is further from Binomial(n, q)."""

    def __init__(self, n: int, q: float, N: int, lo: int, hi: int):
        self.N, self.values = N, np.arange(lo, hi + 1)
        self.z = (self.values - n * q) ** 2 / (n * q * (1 - q))   # each value's share of the dispersion
        bins = _gof_bins(n, q, N)
        self.expected = None if bins is None else bins[1] * N
        # Each value's bin (the bins cover 0..n)
        self.bin = None if bins is None else np.searchsorted([last for _, last in bins[0]], self.values)

    def of_rows(self, idx: np.ndarray) -> np.ndarray:
        """Of each row of ``idx`` (N indices into the values)."""
        counts = None
        if self.expected is not None:
            B, r = self.expected.size, idx.shape[0]
            counts = np.bincount((np.arange(r)[:, None] * B + self.bin[idx]).ravel(), minlength=r * B).reshape(r, B)
        return self._log_p(self.z[idx].sum(axis=1), counts)

    def of_histograms(self, hist: np.ndarray) -> np.ndarray:
        """Of each row of ``hist`` (how many of the N sizes take each value)."""
        counts = None
        if self.expected is not None:
            last = np.searchsorted(self.bin, np.arange(self.expected.size), side="right") - 1   # bins are runs
            counts = np.diff(np.cumsum(hist, axis=1)[:, last], axis=1, prepend=0)
        return self._log_p(hist @ self.z, counts)

    def _log_p(self, disp: np.ndarray, counts) -> np.ndarray:
        from scipy import special

        with np.errstate(divide="ignore"):   # chi-square cdf and sf (scipy.stats' are 5x slower); log 0 = -inf
            tails = np.minimum(special.gammainc(self.N / 2, disp / 2), special.gammaincc(self.N / 2, disp / 2))
            t = np.minimum(0.0, np.log(2 * tails))
            if counts is not None:
                chi = np.sum((counts - self.expected) ** 2 / self.expected, axis=1)
                t = np.minimum(t, np.log(special.gammaincc((self.expected.size - 1) / 2, chi / 2)))
        return t


def _sizes_support(n: int, q: float) -> tuple[int, int]:
    # Batch sizes outside it have probability 2e-12 per row: the simulation leaves them out.
    return int(stats.binom.ppf(1e-12, n, q)), int(stats.binom.isf(1e-12, n, q))


def _logged_sizes_draws(n: int, q: float, N: int, alpha: float) -> int:
    lo, hi = _sizes_support(n, q)
    wanted = max(9_999, math.ceil(100 / alpha) - 1)
    return int(min(wanted, max(9_999, LOGGED_SIZES_DRAWS // min(N, hi - lo + 1))))


@functools.lru_cache(maxsize=4)   # one audit needs one; tests reuse a few
def _sizes_null(n: int, q: float, N: int, draws: int) -> np.ndarray:
    """The statistic of ``draws`` simulated sets of N Binomial(n, q) batch sizes, sorted (seeded)."""
    lo, hi = _sizes_support(n, q)
    stat = _SizeStatistic(n, q, N, lo, hi)
    K = stat.values.size
    pmf = stats.binom.pmf(stat.values, n, q)
    pmf /= pmf.sum()
    cdf = np.cumsum(pmf)
    rng = np.random.default_rng(LOGGED_SIZES_SEED)
    out, chunk = [], max(1, 2_000_000 // min(N, K))
    for start in range(0, draws, chunk):
        r = min(chunk, draws - start)
        if N < K:   # fewer rows than values: draw the rows (by inversion, 4x faster than rng.binomial)
            out.append(stat.of_rows(np.minimum(np.searchsorted(cdf, rng.random((r, N)), side="right"), K - 1)))
        else:       # else their counts per value, at a cost independent of N
            out.append(stat.of_histograms(rng.multinomial(N, pmf, size=r)))
    return np.sort(np.concatenate(out))


def logged_sizes_pvalues(sizes, n: int, q: float, alpha: float) -> tuple[np.ndarray, int]:
    """Monte Carlo p-values that the rows of ``sizes`` (sets of N integer batch sizes in 0..n, N >= 1) are N
    independent Binomial(n, q) draws, as Poisson sampling gives, and the number of simulated sets behind
    them (``_logged_sizes_draws``; no Monte Carlo p-value is below 1 / (draws + 1)).

    Where that floor is not below ``alpha`` (a small significance over many rows, where the draws are capped), a
    set beyond every simulated one takes the asymptotic p-value of its statistic instead, Bonferroni over its two
    tests (2 exp(t)): without it fixed-size batches passed at ``--significance 0.001`` over 500-2000 rows, which the
    asymptotic tests alone had failed (h98 F1, stop 48). There the rows are many and the asymptotics sound; an honest
    set reaches it with probability at most the asymptotic level."""
    sizes = np.atleast_2d(np.asarray(sizes, dtype=np.int64))
    N = sizes.shape[1]
    if not 0 < q < 1:   # no randomness: every batch holds n * q examples
        return np.where(np.all(sizes == round(n * q), axis=1), 1.0, 0.0), 0
    draws = _logged_sizes_draws(n, q, N, alpha)
    null = _sizes_null(int(n), float(q), int(N), draws)
    lo, hi = _sizes_support(n, q)
    lo, hi = min(lo, int(sizes.min())), max(hi, int(sizes.max()))
    t = _SizeStatistic(n, q, N, lo, hi).of_rows(sizes - lo)
    asymptotic = np.minimum(1.0, 2 * np.exp(t))
    # A simulated set that ties with the observed one counts as at least as extreme (rounding aside).
    finite = np.isfinite(t)
    t[finite] += 1e-9 * np.maximum(1.0, np.abs(t[finite]))
    p = (1 + np.searchsorted(null, t, side="right")) / (draws + 1)
    if 1 / (draws + 1) >= alpha:
        p = np.where(p == 1 / (draws + 1), np.minimum(p, asymptotic), p)
    return p, draws


def check_sampler(
    make_sampler: Callable[..., Any],
    *,
    dataset_size: int = 1000,
    sample_rate: float = 0.05,
    steps: int = 1000,
    seed: int = 0,
    alpha: float = 1e-3,
) -> list[CheckResult]:
    """Checks a sampler class/factory called as ``make_sampler(dataset_size, sample_rate, seed)``.

    Its ``.batch(step)`` must return the indices of step ``step``: each index included independently
    with probability ``sample_rate`` (Poisson sampling), as a pure function of (seed, step).
    """
    alpha = _alpha(alpha)
    n, q, T = int(dataset_size), float(sample_rate), int(steps)
    state: dict[str, Any] = {}

    def draw():
        if "batches" not in state:
            s = make_sampler(n, q, seed)
            batches = []
            for t in range(T):
                b = np.asarray(s.batch(t)).astype(np.int64).reshape(-1)
                if b.size and (b.min() < 0 or b.max() >= n or np.unique(b).size != b.size):
                    raise ValueError(f"step {t}: indices must be distinct and in [0, {n})")
                batches.append(b)
            state["batches"] = batches
        return state["batches"]

    def sizes_check():
        sizes = np.array([b.size for b in draw()])
        chi, pv, dof = _binomial_gof(sizes, n, q)
        return CheckResult(
            "poisson_batch_sizes", pv >= alpha, chi, pv,
            f"{T} batch sizes vs Binomial({n}, {q:g}): mean {sizes.mean():.2f} (expected {n * q:.2f}), "
            f"variance {sizes.var():.2f} (expected {n * q * (1 - q):.2f}); chi-square {chi:.1f} on {dof} dof")

    def counts_check():
        counts = np.bincount(np.concatenate(draw()), minlength=n)
        chi, pv, dof = _binomial_gof(counts, T, q)
        return CheckResult(
            "poisson_inclusion_counts", pv >= alpha, chi, pv,
            f"times each of {n} examples was drawn in {T} steps vs Binomial({T}, {q:g}): variance "
            f"{counts.var():.2f} (expected {T * q * (1 - q):.2f}); chi-square {chi:.1f} on {dof} dof")

    def determinism_check():
        a = make_sampler(n, q, seed)
        b = make_sampler(n, q, seed)
        c = make_sampler(n, q, seed + 1)
        steps_ = [0, 1, 7, T // 2, 5 * T]
        same = all(np.array_equal(np.asarray(a.batch(t)), np.asarray(b.batch(t))) for t in reversed(steps_))
        again = all(np.array_equal(np.asarray(a.batch(t)), np.asarray(a.batch(t))) for t in steps_)
        differ = any(not np.array_equal(np.asarray(a.batch(t)), np.asarray(c.batch(t))) for t in steps_)
        ok = same and again and differ
        return CheckResult(
            "sampler_deterministic", ok, float(ok), None,
            f"batch(step) a pure function of (seed, step): same seed, any call order {same}; "
            f"repeat calls {again}; another seed differs {differ}")

    return [
        _guarded("poisson_batch_sizes", sizes_check),
        _guarded("poisson_inclusion_counts", counts_check),
        _guarded("sampler_deterministic", determinism_check),
    ]


# ----------------------------------------------------------------------------------------------
# Run vs plan
# ----------------------------------------------------------------------------------------------


def _close(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    except (TypeError, ValueError):
        return False


class MetricsError(ValueError):
    """A run's metrics.csv that `dpdm train` cannot have written as it is (damaged or edited), or cannot be read."""


METRICS_COLUMNS = ("step", "batch_size", "private")   # the columns of `dpdm train`'s metrics.csv the audit reads
HALF_ROW_NOTE = ("its last line, a half-written row (the run stopped while writing it; `dpdm train --resume` drops "
                 "it too), is not counted")


def read_metrics(path, *, strict: bool = False) -> tuple[list[dict[str, str]], bool]:
    """The rows of a run's metrics.csv (dicts keyed by its header) and whether its last line was a half-written
    row, left out.

    `dpdm train` writes each row whole, ending in a newline, and flushes it; a crash can therefore leave only the
    last line incomplete, and a resumed run drops it (``dpdm.train._truncate_metrics``: a row is kept only if it
    ends in a newline and has the header's number of fields). That line is no record of a step, so it is left
    out here too, never read as a batch size or a non-private row. Anything else that `dpdm train` does not write
    raises MetricsError: a header without the columns step, batch_size and private, a complete line with another
    number of fields than the header, and, with ``strict``, a step or batch size that is not a non-negative
    integer or a private flag other than 0 or 1. (Without ``strict`` those values are left to the caller:
    ``check_run`` reports impossible batch sizes and rows not marked private.) Empty lines are skipped, as
    csv.DictReader skips them."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_file():   # a FIFO would block the read for good
        raise MetricsError("metrics.csv is not a regular file")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")   # as `dpdm train` reads it on resume
    except OSError as e:
        raise MetricsError(f"metrics.csv cannot be read ({e.strerror or e})") from None
    lines = text.split("\n")
    half = lines.pop() != ""   # the text after the last newline: a row cut short (or nothing)
    try:
        parsed = [(k + 1, fields) for k, fields in enumerate(csv.reader(ln[:-1] if ln.endswith("\r") else ln
                                                                           for ln in lines)) if fields]
    except csv.Error as e:
        raise MetricsError(f"metrics.csv is not CSV ({e})") from None
    if not parsed:
        return [], half
    (_, header), body = parsed[0], parsed[1:]
    missing = [c for c in METRICS_COLUMNS if c not in header]
    if missing:
        raise MetricsError(f"metrics.csv has no column {', '.join(missing)} in its header (line 1); it is not the "
                           "file `dpdm train` writes")
    rows = []
    for line, fields in body:
        if len(fields) != len(header):
            raise MetricsError(f"metrics.csv line {line} has {len(fields)} fields, its header {len(header)}: the "
                               "file is damaged (`dpdm train` writes whole rows, and only a crash's last line can be "
                               "cut short)")
        row = dict(zip(header, fields))
        if strict:
            bad = [f"{c}={row[c]!r}" for c in ("step", "batch_size")
                   if not (row[c].isascii() and row[c].isdigit())]
            if row["private"] not in ("0", "1"):
                bad.append(f"private={row['private']!r}")
            if bad:
                raise MetricsError(f"metrics.csv line {line} holds {', '.join(bad)}, which `dpdm train` does not "
                                   "write (a step and a batch size are integers >= 0, private is 0 or 1): the file "
                                   "is damaged")
        rows.append(row)
    return rows, half


def check_run(run_dir, plan_doc, *, alpha: float = 1e-3, run_doc=None) -> list[CheckResult]:
    """Checks a run folder against a claimed ``accounting.PlanDocument``.

    * ``run_plan_matches``: the run's plan.json verifies (digest, epsilon) and its sample rate, noise
      multiplier, clip norm, steps, delta and dataset size equal the claimed plan's. ``run_doc``: that plan.json
      as the caller loaded (and so verified) it already; None loads it here (a re-accounting of half a second).
    * ``run_ledger_matches``: the checkpoint's ledger records a private run under that plan (digest),
      with delta equal to the claim's, no more steps than the claim, and epsilon spent within the
      claimed epsilon. It reads the ledger's record, not the weights: a checkpoint rewritten consistently
      (a `--no-dp` run's with its flags and epsilon edited) passes it (h115 F2, stop 51).
    * ``run_logged_batches``: metrics.csv marks every row private, and its logged batch sizes fit
      Binomial(dataset_size, sample_rate) (with >= 10 rows; fewer rows are only reported): neither too far
      from its rate and shape nor too little spread, as fixed-size batches (``logged_sizes_pvalues``).
    """
    alpha = _alpha(alpha)
    run = Path(run_dir)
    claim = plan_doc.plan
    fields = ("sample_rate", "noise_multiplier", "clip_norm", "steps", "delta", "dataset_size")

    def plan_check():
        import accounting

        doc = run_doc if run_doc is not None else accounting.load_plan(run / "plan.json")
        diff = [f"{f}: run {getattr(doc.plan, f)!r} vs claimed {getattr(claim, f)!r}"
                for f in fields if not _close(getattr(doc.plan, f), getattr(claim, f))]
        state["run_digest"] = doc.digest
        return CheckResult(
            "run_plan_matches", not diff, float(len(diff)), None,
            ("run plan.json equals the claimed plan in " + ", ".join(fields)) if not diff
            else "mismatch: " + "; ".join(diff))

    def ledger_check():
        from dpdm.checkpoint import load_checkpoint

        ledger = load_checkpoint(run / "checkpoint.pt")["ledger"]
        problems = []
        if not bool(ledger["private"]):
            problems.append("the run was trained without DP (private=False)")
        if ledger["plan_digest"] != plan_doc.digest:
            problems.append(f"trained under plan {str(ledger['plan_digest'])[:19]}..., claimed {plan_doc.digest[:19]}...")
        if not _close(ledger["delta"], claim.delta):
            problems.append(f"delta {ledger['delta']!r} vs claimed {claim.delta!r}")
        if int(ledger["steps_done"]) > claim.steps or int(ledger["plan_steps"]) != claim.steps:
            problems.append(f"steps {ledger['steps_done']}/{ledger['plan_steps']} vs claimed {claim.steps}")
        spent = float(ledger["epsilon_spent"])
        if not (spent <= plan_doc.epsilon * (1 + 1e-9)):
            problems.append(f"epsilon_spent {spent!r} above the claimed {plan_doc.epsilon!r}")
        return CheckResult(
            "run_ledger_matches", not problems, float(len(problems)), None,
            (f"ledger (its record; the weights are not read): private, plan digest matches, "
             f"{ledger['steps_done']}/{ledger['plan_steps']} steps, epsilon_spent {epsilon_text(spent)} <= "
             f"{epsilon_text(plan_doc.epsilon)}, delta {ledger['delta']:g}")
            if not problems else "; ".join(problems))

    def logged_check():
        path = run / "metrics.csv"
        rows, half = read_metrics(path)
        if not rows:
            raise ValueError(f"{path} has no complete rows")
        private = all(str(r.get("private", "")).strip() == "1" for r in rows)
        n, q = claim.dataset_size, claim.sample_rate
        logged = [float(r["batch_size"]) for r in rows]
        impossible = [v for v in logged if not (0 <= v <= n and v == int(v))]
        if impossible:   # a Poisson batch of N examples holds 0..N of them, whatever the number of rows
            return CheckResult("run_logged_batches", False, float("nan"), None,
                               f"{len(impossible)} of {len(logged)} logged batch sizes are impossible for "
                               f"{n} examples (e.g. {impossible[0]:g}): metrics.csv is not this run's record")
        sizes = np.array([int(v) for v in logged])
        if sizes.size >= 10:
            chi, _, dof = _binomial_gof(sizes, n, q)
            if dof == 0:  # too few rows for two bins of >= 5: the dispersion statistic
                chi = float(np.sum((sizes - n * q) ** 2) / (n * q * (1 - q))) if 0 < q < 1 else float("nan")
            pvs, draws = logged_sizes_pvalues(sizes, n, q, alpha)
            pv = float(pvs[0])
            ok = private and pv >= alpha
            floor = (f"; {draws} simulated runs give no p below {1 / (draws + 1):.2g} >= alpha {alpha:.2g}: batch "
                     "sizes beyond all of them take the asymptotic p" if draws and 1 / (draws + 1) >= alpha else "")
            detail = (f"{sizes.size} logged batch sizes: mean {sizes.mean():.1f} (plan {n * q:.1f}), "
                      f"variance {sizes.var():.1f} (plan {n * q * (1 - q):.1f}); p={pv:.2g} (fit and dispersion "
                      f"against {draws} simulated Poisson runs){floor}")
        else:
            chi, pv, ok = float("nan"), None, private
            detail = f"only {sizes.size} logged rows (mean batch {sizes.mean():.1f}, plan {n * q:.1f}): too few to test"
        if not private:
            detail = "metrics.csv has rows marked non-private; " + detail
        if half:
            detail += f"; {HALF_ROW_NOTE}"
        return CheckResult("run_logged_batches", ok, chi, pv, detail)

    state: dict[str, Any] = {}
    return [
        _guarded("run_plan_matches", plan_check),
        _guarded("run_ledger_matches", ledger_check),
        _guarded("run_logged_batches", logged_check),
    ]
