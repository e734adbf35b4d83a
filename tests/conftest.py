import os

from hypothesis import settings

# Deterministic property tests in CI (as jax_privacy does).
settings.register_profile("ci", derandomize=True, database=None, deadline=None, max_examples=50)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

import torch  # noqa: E402

# One intra-op thread: on a shared 2-core machine, two threads per process make tiny ops up to 100x
# slower under contention, and results do not depend on the thread count.
torch.set_num_threads(1)
