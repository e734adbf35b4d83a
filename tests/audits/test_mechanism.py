"""Mechanism checks: all pass on the real engine and sampler, and each deliberately broken engine
(noise halved, clipping off, K summed instead of averaged, noise added per chunk, fixed-size shuffled
batches instead of Poisson) fails the checks meant to catch it. Fixed seeds throughout."""

import json

import numpy as np
import pytest
import torch

from audits.mechanism import (
    ENGINE_CHECKS,
    SAMPLER_CHECKS,
    SUBSPACE_CHECKS,
    CheckResult,
    check_engine,
    check_run,
    check_sampler,
    check_subspace,
    tiny_problem,
)
from dpdm.data import PoissonSampler
from dpdm.engine import private_grad

# ---------------------------------------------------------------------------------------------
# Mutants: wrappers around (or re-implementations of) the real engine and sampler.
# ---------------------------------------------------------------------------------------------


def noise_halved(model, loss_fn, *batch, noise_multiplier, **kw):
    return private_grad(model, loss_fn, *batch, noise_multiplier=noise_multiplier / 2, **kw)


def clipping_off(model, loss_fn, *batch, clip_norm, noise_multiplier, **kw):
    big = 1e9 * clip_norm  # nothing is clipped; the noise keeps its claimed scale
    return private_grad(model, loss_fn, *batch, clip_norm=big,
                        noise_multiplier=noise_multiplier * clip_norm / big, **kw)


def k_summed(model, loss_fn, x, noise, **kw):
    """Treats each of the K draws as its own example: clipped per draw, then summed over K."""
    B, K = noise.shape[:2]
    return private_grad(model, loss_fn, x.repeat_interleave(K, 0), noise.reshape(B * K, 1, -1), **kw)


def noise_per_chunk(model, loss_fn, *batch, chunk_size=None, **kw):
    """Splits the batch into chunks and privatizes each one separately: noise once per chunk."""
    B = batch[0].shape[0]
    if chunk_size is None or B <= chunk_size:
        return private_grad(model, loss_fn, *batch, chunk_size=chunk_size, **kw)
    total = None
    for lo in range(0, B, chunk_size):
        part = private_grad(model, loss_fn, *[b[lo:lo + chunk_size] for b in batch], **kw)
        total = part if total is None else {k: total[k] + v for k, v in part.items()}
    return total


class FixedSizeShuffled:
    """Epoch-shuffled batches of exactly round(n * q) examples (what Poisson accounting forbids)."""

    def __init__(self, n, q, seed):
        self.n, self.size, self.seed = n, max(1, round(n * q)), seed

    def batch(self, step):
        per_epoch = self.n // self.size
        epoch, pos = divmod(step, per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        return perm[pos * self.size:(pos + 1) * self.size]


class RepeatsAnIndex(PoissonSampler):
    """Poisson batches, but step 3's holds its first example twice (twice the sensitivity for that example)."""

    def batch(self, step):
        b = super().batch(step)
        return b if step != 3 or b.numel() == 0 else torch.cat([b, b[:1]])


def _failed(results):
    return {r.name for r in results if not r.passed}


@pytest.fixture(scope="module")
def real_results():
    return check_engine(private_grad)


# ---------------------------------------------------------------------------------------------


def test_real_engine_passes_every_check(real_results):
    assert [r.name for r in real_results] == list(ENGINE_CHECKS)
    for r in real_results:
        assert isinstance(r, CheckResult)
        assert r.passed, r
    byname = {r.name: r for r in real_results}
    assert byname["noise_variance"].p_value > 1e-3
    assert 0.9 < byname["noise_variance"].statistic < 1.1
    assert byname["clipping_bound"].statistic <= 1 + 1e-6
    json.dumps([r.to_dict() for r in real_results])  # JSON-able


@pytest.mark.parametrize(
    "mutant, must_fail",
    [
        (noise_halved, {"noise_variance", "noise_once_per_step"}),
        (clipping_off, {"clipping_bound", "sensitivity_replay"}),
        (k_summed, {"per_sample_gradients", "noise_multiplicity_averaged", "sensitivity_replay"}),
        (noise_per_chunk, {"noise_once_per_step", "sensitivity_replay"}),
    ],
    ids=["noise_halved", "clipping_off", "k_summed", "noise_per_chunk"],
)
def test_broken_engines_fail(mutant, must_fail):
    results = check_engine(mutant, pairs=20)
    failed = _failed(results)
    assert must_fail <= failed, (mutant.__name__, failed, [r.detail for r in results])
    for r in results:
        if r.name in must_fail and r.p_value is not None:
            assert r.p_value < 1e-6  # not a borderline call


def test_noise_checks_pass_with_twenty_pairs_on_real_engine():
    # the mutants above run with pairs=20; the real engine must pass at that size too
    results = {r.name: r for r in check_engine(private_grad, pairs=20)}
    assert results["noise_variance"].passed and results["noise_once_per_step"].passed


def _sigma_mutant(f):
    """The real engine handed f(noise_multiplier) instead of the noise multiplier it was called with."""
    def step(model, loss_fn, *batch, noise_multiplier, **kw):
        return private_grad(model, loss_fn, *batch, noise_multiplier=f(noise_multiplier), **kw)
    return step


@pytest.mark.parametrize("f", [lambda s: 1.0, lambda s: s * s, lambda s: s ** 0.5, lambda s: 1 / s],
                         ids=["ignored_uses_1", "squared", "sqrt", "inverse"])
def test_noise_scale_right_only_at_sigma_one_fails_at_the_default_sigma(f):
    # sigma = 1 (the default) is a fixed point of these bugs: the second noise multiplier catches them
    results = {r.name: r for r in check_engine(_sigma_mutant(f), pairs=20)}
    assert _failed(results.values()) == {"noise_variance", "noise_once_per_step"}, [r.detail for r in results.values()]
    for name in ("noise_variance", "noise_once_per_step"):
        assert results[name].p_value < 1e-6
        assert "sigma=1 (given)" in results[name].detail and "sigma=0.5 (second)" in results[name].detail


def test_engine_that_ignores_the_plan_sigma_fails_at_that_sigma_too():
    results = check_engine(_sigma_mutant(lambda s: 1.0), noise_multiplier=0.6, pairs=20)
    assert _failed(results) == {"noise_variance", "noise_once_per_step"}


def test_second_noise_multiplier_is_far_from_the_given_one_and_from_one():
    from audits.mechanism import second_noise_multiplier

    for s in (0.01, 0.3, 0.5, 0.6, 0.7, 0.99, 1.0, 1.01, 1.5, 2.0, 5.5, 100.0):
        s2 = second_noise_multiplier(s)
        assert s2 in (0.5, 2.0)
        assert max(s2 / s, s / s2) >= 2 - 1e-12, s


class _ExactGaussianNoise:
    """A stand-in for an engine call: exactly N(0, (sigma C / E)^2) noise per coordinate, a function of the seed."""

    def __init__(self, p, sigma, expected=8.0):
        self.noise_multiplier, self.expected, self.C = sigma, expected, p.clip_norm
        self.dim = sum(t.numel() for t in p.model.parameters())

    def __call__(self, idx, seed, *, chunk_size=None, **_):
        return np.random.default_rng(seed).normal(size=self.dim) * self.noise_multiplier * self.C / self.expected


def test_the_noise_checks_p_value_is_bonferroni_over_all_its_tests():
    """mut51 x02, stop 50: the noise check runs many tests (per tensor, pooled, normality, at two noise
    multipliers) and fails below alpha, so its p-value is the smallest p times their number; the smallest p alone
    (which passed every test here) makes `dpdm audit`'s false-alarm rate on a right engine grow with the tensors."""
    import re

    from audits.mechanism import _noise_test

    p = tiny_problem()
    calls = [(_ExactGaussianNoise(p, 1.0), 6), (_ExactGaussianNoise(p, 0.5), 3)]
    r = _noise_test("noise", calls, p, 1e-3, chunk_size=None, what="stand-in")
    n, worst = re.search(r"smallest p of (\d+) tests: ([0-9.e+-]+)", r.detail).groups()
    n, worst = int(n), float(worst)
    assert n >= 6   # 2 sigmas x (pooled variance, KS, 4 tensors)
    assert r.p_value == pytest.approx(min(1.0, n * worst), rel=0.06)   # worst is printed to 2 digits


def _one_tensor_mutant(target, scale):
    """The real clipped sum; every tensor's noise right except `target`'s, which is multiplied by `scale`."""
    from dpdm.engine import add_noise, clipped_grad_sum

    def step(model, loss_fn, *batch, clip_norm, noise_multiplier, expected_batch_size, generator=None,
             chunk_size=None, stats=None):
        G = clipped_grad_sum(model, loss_fn, *batch, clip_norm=clip_norm, chunk_size=chunk_size)
        out = {}
        for k, v in G.items():   # noise drawn tensor by tensor, in order, from the one generator
            out.update(add_noise({k: v}, noise_multiplier=noise_multiplier * (scale if k == target else 1.0),
                                 clip_norm=clip_norm, expected_batch_size=expected_batch_size, generator=generator))
        return out
    return step


@pytest.mark.parametrize("target, scale", [("2.bias", 0.0), ("2.bias", 0.5), ("0.bias", 0.5), ("2.bias", 1.0)],
                         ids=["last_bias_unnoised", "last_bias_half_noise", "first_bias_half_noise", "control"])
def test_wrong_noise_on_one_small_tensor_fails(target, scale):
    # 2.bias is 6 of the tiny model's 162 coordinates: pooled over all of them, its missing noise passed
    results = {r.name: r for r in check_engine(_one_tensor_mutant(target, scale), pairs=20)}
    failed = _failed(results.values())
    if scale == 1.0:   # the same construction with the right noise passes
        assert not failed, [r.detail for r in results.values()]
        return
    assert failed == {"noise_variance", "noise_once_per_step"}, [r.detail for r in results.values()]
    for name in ("noise_variance", "noise_once_per_step"):
        assert results[name].p_value < 1e-6
        assert f"tensor {target} variance" in results[name].detail


def test_nan_on_one_tensor_fails_every_check():
    # Python's max() skips a NaN that does not come first: a NaN must fail, not pass, the replays and noise tests
    def nan_bias(*a, **kw):
        out = private_grad(*a, **kw)
        return {**out, "2.bias": out["2.bias"] * float("nan")}

    results = {r.name: r for r in check_engine(nan_bias, pairs=2)}
    assert not any(r.passed for r in results.values()), results
    for name in ("noise_variance", "noise_once_per_step"):
        assert results[name].p_value == 0.0, results[name]


@pytest.mark.parametrize("sigma", [0.6, 5.5])   # 1.0: test_real_engine_passes_every_check
def test_real_and_training_engines_pass_the_noise_checks_at_several_sigmas(sigma):
    from audits.suite import training_private_grad

    for fn in (private_grad, training_private_grad()):
        results = {r.name: r for r in check_engine(fn, noise_multiplier=sigma, pairs=20)}
        assert not _failed(results.values()), [r.detail for r in results.values() if not r.passed]
        for name in ("noise_variance", "noise_once_per_step"):
            assert f"sigma={sigma:g} (given)" in results[name].detail
            assert 0.85 < results[name].statistic < 1.15


@pytest.mark.slow   # 5.5 s (four seeds)
def test_noise_checks_pass_the_right_engine_at_several_seeds():
    # the 12 tests behind each noise check (per tensor, pooled, KS; two noise multipliers) are
    # Bonferroni-corrected, so each check keeps its false-alarm rate <= alpha; the seed changes the noise drawn
    ratios = []
    for seed in range(1, 5):
        results = check_engine(private_grad, seed=seed, pairs=20)
        assert not _failed(results), (seed, [r.detail for r in results if not r.passed])
        ratios += [r.statistic for r in results if r.name == "noise_variance"]
    assert len(set(ratios)) == 4   # other seeds, other noise (the pooled variance ratio differs)


def test_crashing_engine_fails_instead_of_raising():
    def broken(*a, **k):
        raise RuntimeError("boom")

    results = check_engine(broken, pairs=2)
    assert not any(r.passed for r in results)
    assert all("RuntimeError: boom" in r.detail for r in results)


def test_tiny_problem_has_examples_above_the_clip_norm():
    p = tiny_problem()
    assert p.x.shape[0] >= 32 and p.noise.shape[1] > 1
    from audits.mechanism import _loop_grads

    norms = np.array([np.linalg.norm(g) for g in _loop_grads(p)])
    assert (norms > p.clip_norm).sum() >= 10 and (norms < p.clip_norm).sum() >= 10


def test_the_clipping_check_fails_where_no_example_exceeds_the_clip_norm():
    """mut51 x05, stop 50: a clipping check in which no gradient is above the clip norm tests nothing, and fails
    rather than pass vacuously (with `over > 0` dropped it passed; every test problem has examples above C)."""
    from audits.mechanism import _Caller, _check_clipping, _loop_grads

    p = tiny_problem(num_examples=8)
    loop = _loop_grads(p)
    call = _Caller(private_grad, p, 1.0, 40.0)
    assert _check_clipping(call, p, loop).passed   # its clip norm: the 40th percentile of the norms
    p.clip_norm = 10 * max(np.linalg.norm(v) for v in loop)
    r = _check_clipping(call, p, loop)
    assert not r.passed and r.detail.startswith("0 of 8 examples have gradient norm above clip_norm")


def test_real_sampler_passes():
    results = check_sampler(PoissonSampler)
    assert [r.name for r in results] == list(SAMPLER_CHECKS)
    assert all(r.passed for r in results), results


def test_fixed_size_shuffled_batches_fail():
    failed = _failed(check_sampler(FixedSizeShuffled))
    assert {"poisson_batch_sizes", "poisson_inclusion_counts"} <= failed


def test_sampler_with_bad_rate_fails():
    # Poisson, but at twice the claimed rate
    failed = _failed(check_sampler(lambda n, q, s: PoissonSampler(n, 2 * q, s)))
    assert {"poisson_batch_sizes", "poisson_inclusion_counts"} <= failed


def test_a_sampler_that_repeats_an_index_in_a_batch_fails():
    """mut51 x12, stop 50: Poisson sampling includes each example at most once per step; a sampler whose batch
    holds one twice passed every sampler check with the distinctness check dropped."""
    failed = check_sampler(RepeatsAnIndex, dataset_size=200, sample_rate=0.05, steps=40)
    sizes = next(r for r in failed if r.name == "poisson_batch_sizes")
    assert not sizes.passed and "must be distinct" in sizes.detail
    good = check_sampler(PoissonSampler, dataset_size=200, sample_rate=0.05, steps=40)
    assert all(r.passed for r in good), [r.detail for r in good]


def test_check_arguments_are_validated():
    with pytest.raises(ValueError, match="alpha"):
        check_engine(private_grad, alpha=0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        check_engine(private_grad, noise_multiplier=-1)


# ---------------------------------------------------------------------------------------------
# Noise in a public subspace (`dpdm train --public-subspace`)
# ---------------------------------------------------------------------------------------------


def _subspace_mutant(kind):
    """`make_private_grad(basis)` for a broken subspace step, built from the engine's own pieces."""
    from dpdm.engine import _unflatten_like, add_noise_in_subspace, clipped_grad_sum, flatten_grads

    def make(basis):
        def step(model, loss_fn, *batch, clip_norm, noise_multiplier, expected_batch_size, generator=None,
                 chunk_size=None, stats=None):
            G = clipped_grad_sum(model, loss_fn, *batch, clip_norm=clip_norm, chunk_size=chunk_size)
            if kind == "unscaled_basis":   # the basis used as given, its spectral norm unchecked
                flat = flatten_grads(G)
                z = torch.randn(basis.shape[1], generator=generator, dtype=flat.dtype)
                out = basis @ (basis.T @ flat + noise_multiplier * clip_norm * z) / expected_batch_size
                return _unflatten_like(out, G)
            noisy = add_noise_in_subspace(G, basis, noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                                          expected_batch_size=expected_batch_size, generator=generator)
            if kind == "leak":             # the part of the sum outside the subspace passes unnoised
                proj = add_noise_in_subspace(G, basis, noise_multiplier=0.0, clip_norm=clip_norm,
                                             expected_batch_size=expected_batch_size)
                return {k: noisy[k] + G[k] / expected_batch_size - proj[k] for k in G}
            if kind == "nan":
                last = list(noisy)[-1]
                return {**noisy, last: noisy[last] * float("nan")}
            if kind == "sigma_ignored":
                return add_noise_in_subspace(G, basis, noise_multiplier=1.0, clip_norm=clip_norm,
                                             expected_batch_size=expected_batch_size, generator=generator)
            if kind == "noise_halved":
                return add_noise_in_subspace(G, basis, noise_multiplier=noise_multiplier / 2, clip_norm=clip_norm,
                                             expected_batch_size=expected_batch_size, generator=generator)
            raise AssertionError(kind)
        return step
    return make


@pytest.fixture(scope="module")
def real_subspace_results():
    from audits.suite import training_private_grad

    return check_subspace(lambda basis: training_private_grad(basis), pairs=20)


def test_training_step_passes_the_subspace_checks(real_subspace_results):
    assert [r.name for r in real_subspace_results] == list(SUBSPACE_CHECKS)
    for r in real_subspace_results:
        assert r.passed, r
    byname = {r.name: r for r in real_subspace_results}
    assert byname["subspace_signal_in_noise_span"].statistic < 1e-10
    assert 0.3 < byname["subspace_sensitivity_replay"].statistic <= 1 + 1e-6
    assert 0.85 < byname["subspace_noise_variance"].statistic < 1.15


@pytest.mark.parametrize("kind, must_fail", [
    ("leak", {"subspace_signal_in_noise_span"}),
    ("unscaled_basis", {"subspace_sensitivity_replay", "subspace_noise_variance"}),
    ("noise_halved", {"subspace_noise_variance"}),
    ("sigma_ignored", {"subspace_noise_variance"}),   # noise at sigma = 1 whatever the sigma asked for
    ("nan", set(SUBSPACE_CHECKS)),                     # a NaN in the output's last tensor
])
@pytest.mark.slow   # stop 48: 13-95 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_broken_subspace_steps_fail(kind, must_fail):
    results = check_subspace(_subspace_mutant(kind), pairs=20)
    failed = _failed(results)
    assert failed == must_fail, (kind, [r.detail for r in results])
    for r in results:
        if r.name in must_fail and r.p_value is not None:
            assert r.p_value < 1e-6


def test_training_step_passes_the_engine_checks_with_either_grad_engine():
    from audits.suite import training_private_grad

    for rules in (True, False):
        results = check_engine(training_private_grad(per_layer_rules=rules), pairs=20)
        assert all(r.passed for r in results), [r.detail for r in results if not r.passed]


def test_crashing_subspace_step_fails_every_check_instead_of_raising():
    def make(basis):
        raise RuntimeError("no basis for you")

    results = check_subspace(make, pairs=2)
    assert [r.name for r in results] == list(SUBSPACE_CHECKS)
    assert not any(r.passed for r in results) and all("no basis for you" in r.detail for r in results)


def test_run_logged_batches_passes_a_real_run_and_fails_other_batch_sizes(tmp_path):
    """The audit's run-level sampling check (>= 10 logged rows run the Binomial test): a real 40-step run
    passes; its batch sizes redrawn at twice the plan's rate, or a row marked non-private, fail."""
    import csv

    import accounting
    from audits.mechanism import check_run
    from dpdm.train import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 1, 8, 8, generator=g) * 2 - 1
    y = torch.arange(24) % 3
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=40, noise_multiplier=1.0,
                                  noise_multiplicity=1, delta=1e-5)
    doc = accounting.make_plan_document(plan)
    out = tmp_path / "run"
    train(doc, x, y, 3, out, TrainConfig(model="small", log_every=1, checkpoint_every=40, seed=3), progress=False)

    def logged(rows=None):
        if rows is not None:
            with open(out / "metrics.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        return {c.name: c for c in check_run(out, doc)}["run_logged_batches"]

    assert logged().passed, logged().detail
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40
    rng = np.random.default_rng(0)
    doubled = [{**r, "batch_size": str(rng.binomial(24, 2 * plan.sample_rate))} for r in rows]
    assert not logged(doubled).passed
    assert not logged([{**rows[0], "private": "0"}, *rows[1:]]).passed
    assert logged(rows).passed
    # A few rows are too few to test, but never hold a batch no Poisson draw of 24 examples gives.
    for size in ("-5", "1e23", "25", "2.5"):
        check = logged([{**r, "batch_size": size if i == 0 else r["batch_size"]} for i, r in enumerate(rows[:3])])
        assert not check.passed and "impossible" in check.detail, (size, check.detail)
    assert logged(rows[:3]).passed


def _claim(**plan):
    """A claimed plan document, as check_run reads one (plan fields, digest, epsilon)."""
    from types import SimpleNamespace

    fields = dict(sample_rate=0.25, noise_multiplier=1.0, clip_norm=1.0, steps=6, delta=1e-5, dataset_size=24)
    return SimpleNamespace(plan=SimpleNamespace(**{**fields, **plan}), digest="sha256:" + "cd" * 32, epsilon=2.5)


def _run_ledger_check(monkeypatch, claim, ledger):
    """check_run's run_ledger_matches on a checkpoint holding this ledger."""
    import dpdm.checkpoint

    monkeypatch.setattr(dpdm.checkpoint, "load_checkpoint", lambda path: {"ledger": ledger})
    result = check_run("/nonexistent-run", claim, run_doc=claim)[1]
    assert result.name == "run_ledger_matches"
    return result


def test_check_run_compares_the_runs_clip_norm_with_the_claim():
    """mut51 x11, stop 50: the clip norm sets the sensitivity, so a run whose plan.json has another one is not the
    claimed mechanism (with clip_norm left out of the fields compared, run_plan_matches passed it; the run's
    digest is compared only by the ledger's check)."""
    claim = _claim()
    for run_doc, passed in ((_claim(), True), (_claim(clip_norm=2.0), False)):
        result = check_run("/nonexistent-run", claim, run_doc=run_doc)[0]
        assert result.name == "run_plan_matches" and result.passed is passed, result.detail
    assert "clip_norm: run 2.0 vs claimed 1.0" in result.detail


def test_check_run_refuses_a_ledger_above_the_claimed_epsilon_by_more_than_rounding(monkeypatch):
    """mut51 x08, stop 50: the ledger's epsilon may exceed the claim by float rounding (1e-9) only; 0.05% above it
    is a run that spent more than claimed (a tolerance of 1e-3 passed it)."""
    claim = _claim()
    ledger = {"private": True, "plan_digest": claim.digest, "delta": 1e-5, "steps_done": 6, "plan_steps": 6}
    for spent, passed in ((claim.epsilon, True), (claim.epsilon * (1 + 5e-4), False)):
        result = _run_ledger_check(monkeypatch, claim, {**ledger, "epsilon_spent": spent})
        assert result.passed is passed, result.detail


def test_check_run_compares_the_ledgers_plan_steps_with_the_claim(monkeypatch):
    """mut51 x14, stop 50: a ledger whose plan_steps is not the claim's is not the claimed plan's, whatever its
    digest says (with only steps_done compared, an edited plan_steps passed)."""
    claim = _claim()
    ledger = {"private": True, "plan_digest": claim.digest, "delta": 1e-5, "steps_done": 6, "epsilon_spent": 2.5}
    for plan_steps, passed in ((6, True), (7, False)):
        result = _run_ledger_check(monkeypatch, claim, {**ledger, "plan_steps": plan_steps})
        assert result.passed is passed, result.detail


@pytest.mark.parametrize("noise_multiplier, seed", [(1e6, 0), (1e8, 0), (1.0, 2**62), (2.0, 2**63 - 1)])
def test_the_right_engine_passes_at_huge_noise_and_huge_seeds(noise_multiplier, seed):
    """A plan's noise multiplier may be 1e6 (the replays lost float64 cancellation and per_sample_gradients
    failed), and `dpdm audit --seed` may be 2**63 - 1 (the noise tests' generator seeds overflowed torch's
    2**64 and both failed): a FAIL that reads as a privacy bug (review F2, F6, stop 40)."""
    results = check_engine(private_grad, noise_multiplier=noise_multiplier, seed=seed, pairs=6)
    assert all(r.passed for r in results), [r.detail for r in results if not r.passed]
    assert f"sigma={noise_multiplier:g} (given)" in next(r for r in results if r.name == "noise_variance").detail


def _logged_batches_of(tmp_path, sizes, dataset_size, sample_rate, alpha):
    """run_logged_batches of a run folder holding only a metrics.csv with these batch sizes (the other run
    checks fail for want of plan.json and checkpoint.pt; only the logged sizes are looked at)."""
    from types import SimpleNamespace

    lines = ["step,batch_size,private"] + [f"{10 * (i + 1)},{s},1" for i, s in enumerate(sizes)]
    (tmp_path / "metrics.csv").write_text("\n".join(lines) + "\n")
    doc = SimpleNamespace(plan=SimpleNamespace(dataset_size=dataset_size, sample_rate=sample_rate))
    return {c.name: c for c in check_run(tmp_path, doc, alpha=alpha)}["run_logged_batches"]


@pytest.mark.parametrize("rows", [11, 12, 15])
def test_run_logged_batches_fails_fixed_size_batches_at_11_to_15_rows(tmp_path, rows):
    """Batches of exactly the plan's size (a loop that shuffles instead of Poisson sampling) passed `dpdm audit`
    with 11-15 logged rows: there the chi-square fit has 2 bins, all rows fell in one of them, and its p of
    0.001-0.006 was above the per-check alpha 0.01/7 (review h96 F1, stop 48). A 60000-example plan of batch
    256; under Poisson sampling, 11 batches of exactly 256 have probability about 1e-18."""
    check = _logged_batches_of(tmp_path, [256] * rows, 60000, 256 / 60000, alpha=0.01 / 7)
    assert not check.passed, check.detail
    assert f"{rows} logged batch sizes" in check.detail and "variance 0.0" in check.detail
    rng = np.random.default_rng(rows)
    check = _logged_batches_of(tmp_path, rng.binomial(60000, 256 / 60000, rows), 60000, 256 / 60000,
                               alpha=0.01 / 7)
    assert check.passed, check.detail


def test_run_logged_batches_tests_from_ten_rows_and_fails_ten_fixed_size_batches(tmp_path):
    """mut51 x10, stop 50: run_logged_batches tests the logged batch sizes from 10 rows on, as check_run's
    docstring says; 10 batches of exactly the plan's size fail (`> 10` left exactly 10 rows untested, and they
    passed as too few to test). The test above starts at 11 rows."""
    check = _logged_batches_of(tmp_path, [256] * 10, 60000, 256 / 60000, alpha=0.01 / 7)
    assert not check.passed and "10 logged batch sizes" in check.detail and "variance 0.0" in check.detail, check.detail


@pytest.mark.parametrize("B, rows, alpha", [(8192, 500, 0.001 * 0.2 / 7), (256, 2000, 1e-4 * 0.2 / 7)])
def test_run_logged_batches_fails_fixed_size_batches_below_the_simulations_floor(tmp_path, B, rows, alpha):
    """With many rows the simulated Poisson runs are capped (10,000 to 45,000), so no Monte Carlo p lies below
    about 1e-4: at `--significance 0.001` or 1e-4 (per check 2.9e-5, 2.9e-6) fixed-size batches passed, "cannot
    fail this check at this significance", where the asymptotic tests had failed them (review h98 F1, stop 48).
    A set beyond every simulated one takes the asymptotic p there; an honest one still passes."""
    check = _logged_batches_of(tmp_path, [B] * rows, 60000, B / 60000, alpha=alpha)
    assert not check.passed and "variance 0.0" in check.detail and "asymptotic p" in check.detail, check.detail
    sizes = np.random.default_rng(rows).binomial(60000, B / 60000, rows)
    check = _logged_batches_of(tmp_path, sizes, 60000, B / 60000, alpha=alpha)
    assert check.passed, check.detail


def _false_alarms(n, B, rows, datasets, seed, alpha=0.01 / 7):
    from audits.mechanism import logged_sizes_pvalues

    p, _ = logged_sizes_pvalues(np.random.default_rng(seed).binomial(n, B / n, (datasets, rows)), n, B / n, alpha)
    return int(np.sum(p < alpha))


def test_logged_sizes_p_values_never_fall_below_one_over_the_draws_plus_one():
    """mut51 x07, stop 50: a Monte Carlo p-value is (1 + simulated sets at least as extreme) / (draws + 1): never 0,
    so that alpha keeps its meaning, and a set beyond all the simulated ones gets the smallest p the simulation
    can give (count / draws gave p = 0 for fixed-size batches and mis-stated every other p)."""
    from audits.mechanism import logged_sizes_pvalues

    p, draws = logged_sizes_pvalues(np.full((1, 20), 50), 1000, 0.05, 1e-2)
    assert draws == 9999 and p[0] == pytest.approx(1 / (draws + 1), rel=1e-12)
    honest = np.random.default_rng(7).binomial(1000, 0.05, size=(1, 20))
    p, _ = logged_sizes_pvalues(honest, 1000, 0.05, 1e-2)
    k = p[0] * (draws + 1) - 1   # simulated sets at least as extreme: a whole number
    assert 0.05 < p[0] <= 1 and k == pytest.approx(round(k), abs=1e-6)


@pytest.mark.parametrize("rows", [12, 15])
def test_run_logged_batches_holds_its_level_for_poisson_batches_at_few_rows(rows):
    """True Poisson batch sizes fail run_logged_batches at most at its level, up to Monte Carlo error: the
    chi-square fit's p-value on 1-2 dof had 1.5x (15 rows) and 1.55x (12 rows, level 0.05) false alarms
    (review h96 F3, stop 48). 50,000 sets of batch sizes of a 64-example plan of batch 16 (the review's worst)
    at the per-check level 0.01/7: 71 false alarms are expected (sd 8.5); the chi-square fit gave about 105."""
    alarms = _false_alarms(64, 16, rows, 50_000, seed=rows)
    assert alarms <= 50_000 * 0.01 / 7 + 3 * (50_000 * 0.01 / 7) ** 0.5, alarms


@pytest.mark.slow
def test_run_logged_batches_holds_its_level_for_poisson_batches_at_11_to_20_rows():
    """As above, at every row count 11-20 and for a second plan (1797 examples, batch 64): 200,000 sets per
    plan, 286 false alarms expected (sd 17)."""
    for n, B in ((64, 16), (1797, 64)):
        alarms = sum(_false_alarms(n, B, rows, 20_000, seed=rows) for rows in range(11, 21))
        assert alarms <= 200_000 * 0.01 / 7 + 3 * (200_000 * 0.01 / 7) ** 0.5, (n, B, alarms)
