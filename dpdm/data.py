"""Batch selection for DP-SGD: Poisson sampling, as the privacy accountant assumes.

Each step includes every index independently with probability `sample_rate` (the sampled Gaussian
mechanism of Mironov, Talwar and Zhang 2019; opacus's `UniformWithReplacementSampler`). Batch sizes
are Binomial(dataset_size, sample_rate) and may be 0; the engine divides by the public expected
batch size, never by the realised one.

The batch of step t is a pure function of (seed, t): resuming from a checkpoint and every rank of
a distributed run reproduce it without carrying RNG state. The sampler's generator is its own
(numpy's PCG64 seeded by SeedSequence([seed, step, stream])), independent of torch's global RNG.
"""

from __future__ import annotations

import math
import numbers
import reprlib

import numpy as np
import torch

__all__ = ["PoissonSampler"]

_STREAM = 0x5A3B1E   # separates the sampler's streams from other users of (seed, step)


def _finite_float(value) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:   # an int or Fraction too large for a float
        return False


class PoissonSampler:
    """Poisson (independent Bernoulli) batch selection over range(dataset_size).

    Args:
        dataset_size: N >= 1, the number of examples.
        sample_rate: q in (0, 1], the probability of including each example in a step.
        seed: non-negative integer; with the step it fixes the batch.
    """

    def __init__(self, dataset_size: int, sample_rate: float, seed: int) -> None:
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, (int, np.integer)) or dataset_size < 1:
            raise ValueError(f"dataset_size={dataset_size!r} must be an integer >= 1")
        # numpy's float scalars too (np.float32(0.05) was "must be in (0, 1]", h154 N3, stop 55), taken as the
        # number they hold; bools are not rates.
        # Checked as the float it is used as: a rate that rounds to 0.0 (np.longdouble("1e-4000"), a tiny Fraction)
        # would draw no example ever (r1 N2, stop 55).
        if isinstance(sample_rate, (bool, np.bool_)) or not isinstance(sample_rate, numbers.Real) \
                or not _finite_float(sample_rate) or not 0 < float(sample_rate) <= 1:
            raise ValueError(f"sample_rate={reprlib.repr(sample_rate)} must be a number in (0, 1]")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r} must be an integer >= 0")
        self.dataset_size = int(dataset_size)
        self.sample_rate = float(sample_rate)
        self.seed = int(seed)

    @property
    def expected_batch_size(self) -> float:
        """sample_rate * dataset_size: the public normalizer of the noisy gradient sum."""
        return self.sample_rate * self.dataset_size

    def batch(self, step: int) -> torch.Tensor:
        """Sorted int64 indices of the examples in step `step`'s batch (possibly empty)."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step={step!r} must be an integer >= 0")
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(step), _STREAM])))
        included = rng.random(self.dataset_size) < self.sample_rate        # [N] Bernoulli(q)
        return torch.from_numpy(np.flatnonzero(included).astype(np.int64))

    def __repr__(self) -> str:
        return f"PoissonSampler(dataset_size={self.dataset_size}, sample_rate={self.sample_rate}, seed={self.seed})"
