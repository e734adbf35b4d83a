"""Poisson batch selection: Binomial batch sizes, per-index rate, determinism in (seed, step)."""

import numpy as np
import pytest
import torch
from scipy import stats as st

from dpdm.data import PoissonSampler


def _gof_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    """Chi-square goodness of fit, merging tail bins until every expected count is >= 5."""
    obs, exp = [], []
    o_acc = e_acc = 0.0
    for o, e in zip(observed, expected):
        o_acc += o
        e_acc += e
        if e_acc >= 5:
            obs.append(o_acc)
            exp.append(e_acc)
            o_acc = e_acc = 0.0
    obs[-1] += o_acc
    exp[-1] += e_acc
    return float(st.chisquare(obs, exp).pvalue)


def test_batch_sizes_are_binomial():
    N, q, steps = 300, 0.04, 4000
    s = PoissonSampler(N, q, seed=7)
    sizes = np.array([len(s.batch(t)) for t in range(steps)])
    observed = np.bincount(sizes, minlength=N + 1)[: N + 1]
    expected = steps * st.binom.pmf(np.arange(N + 1), N, q)
    p = _gof_pvalue(observed, expected)
    assert p > 1e-6, f"batch sizes do not look Binomial({N}, {q}): p = {p:.2g}"
    assert s.expected_batch_size == pytest.approx(N * q)


def test_each_index_included_at_the_sample_rate():
    N, q, steps = 50, 0.1, 3000
    s = PoissonSampler(N, q, seed=1)
    counts = np.zeros(N)
    for t in range(steps):
        counts[s.batch(t).numpy()] += 1
    p = float(st.chisquare(counts, np.full(N, counts.mean())).pvalue)   # uniform across indices
    assert p > 1e-6
    assert abs(counts.sum() / (N * steps) - q) < 5 * np.sqrt(q * (1 - q) / (N * steps))


def test_batch_is_a_pure_function_of_seed_and_step():
    a, b = PoissonSampler(1000, 0.05, seed=3), PoissonSampler(1000, 0.05, seed=3)
    later = a.batch(9)
    torch.manual_seed(123)                      # the global torch RNG plays no part
    np.random.seed(5)
    assert torch.equal(b.batch(9), later)       # any order of calls, any instance
    assert torch.equal(a.batch(9), later)
    assert not torch.equal(a.batch(8), later)
    assert not torch.equal(PoissonSampler(1000, 0.05, seed=4).batch(9), later)


def test_indices_sorted_unique_int64_in_range():
    idx = PoissonSampler(500, 0.3, seed=0).batch(2)
    assert idx.dtype == torch.int64 and idx.dim() == 1
    assert torch.equal(idx, torch.unique(idx)) and idx.min() >= 0 and idx.max() < 500


def test_empty_batches_happen_and_are_empty_tensors():
    s = PoissonSampler(10, 0.02, seed=0)
    sizes = [len(s.batch(t)) for t in range(200)]
    assert sizes.count(0) > 100            # P(empty) = 0.98^10 ~ 0.82
    empty = next(s.batch(t) for t in range(200) if len(s.batch(t)) == 0)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    assert len(PoissonSampler(7, 1.0, seed=0).batch(0)) == 7   # q = 1: the full dataset


@pytest.mark.parametrize("kwargs, name", [
    (dict(dataset_size=0, sample_rate=0.1, seed=0), "dataset_size"),
    (dict(dataset_size=10, sample_rate=0.0, seed=0), "sample_rate"),
    (dict(dataset_size=10, sample_rate=1.5, seed=0), "sample_rate"),
    (dict(dataset_size=10, sample_rate=float("nan"), seed=0), "sample_rate"),
    (dict(dataset_size=10, sample_rate=0.1, seed=-1), "seed"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PoissonSampler(**kwargs)


def test_numpy_scalars_are_the_numbers_they_hold():
    """h154 N3 (stop 55): sample_rate=np.float32(0.25) was "must be in (0, 1]", a range error for a type it did not
    take. numpy's scalars are the numbers they hold, as in the engine and the plan; bools stay refused."""
    s = PoissonSampler(np.int64(1000), np.float32(0.25), seed=np.uint64(3))
    assert (s.dataset_size, s.sample_rate, s.seed) == (1000, 0.25, 3)
    assert type(s.sample_rate) is float and type(s.dataset_size) is int and type(s.seed) is int
    assert torch.equal(s.batch(np.int64(2)), PoissonSampler(1000, 0.25, seed=3).batch(2))
    for bad in (np.bool_(True), True, "0.25"):
        with pytest.raises(ValueError, match=r"^sample_rate=.* must be a number in \(0, 1\]$"):
            PoissonSampler(1000, bad, seed=0)


def test_bad_step():
    with pytest.raises(ValueError, match="step"):
        PoissonSampler(10, 0.1, seed=0).batch(-1)


def test_seeds_that_differ_only_above_32_bits_draw_other_batches():
    """Catches a sampler that keeps 32 bits of the seed (mut47): the secret seed is 63 bits (dpdm train's
    default), and a sampler that kept 32 of them would let anyone who searches 2**32 seeds replay the batches."""
    for seed in (3, 2**40 + 7):
        a = PoissonSampler(1000, 0.05, seed=seed).batch(9)
        assert not torch.equal(a, PoissonSampler(1000, 0.05, seed=seed + 2**32).batch(9))
        assert not torch.equal(a, PoissonSampler(1000, 0.05, seed=seed ^ (1 << 62)).batch(9))


def test_neighbouring_seeds_do_not_share_shifted_batch_streams():
    """Catches (seed, step) mixed as seed + step (mut47): seed s at step t+1 is not seed s+1 at step t."""
    for t in range(5):
        assert not torch.equal(PoissonSampler(1000, 0.05, seed=3).batch(t + 1),
                               PoissonSampler(1000, 0.05, seed=4).batch(t))


def test_expected_batch_size_is_q_times_n_unrounded():
    """Stop 48 (mut49 DA1): the public normalizer is q * N itself, also where it is not a whole number (the
    binomial test above has N * q = 12)."""
    assert PoissonSampler(10, 0.25, seed=0).expected_batch_size == pytest.approx(2.5, rel=1e-15)
    assert PoissonSampler(7, 0.1, seed=0).expected_batch_size == pytest.approx(0.7, rel=1e-15)


def test_a_rate_that_rounds_to_zero_as_a_float_is_refused():
    """r1 N2 (stop 55): the rate was checked before it was made a float, so np.longdouble("1e-4000") or a tiny
    Fraction (> 0 as given) became 0.0, a sampler that never draws an example; an int too large for a float too."""
    from fractions import Fraction

    for bad in (np.longdouble("1e-4000"), Fraction(1, 10**400), 10**400):
        with pytest.raises(ValueError, match=r"^sample_rate=.* must be a number in \(0, 1\]$"):
            PoissonSampler(1000, bad, seed=0)
    assert PoissonSampler(1000, Fraction(1, 20), seed=0).sample_rate == 0.05
