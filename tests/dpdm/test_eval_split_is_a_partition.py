"""mut44 (EV3): the 90/10 selection split of the synthetic samples must be disjoint (validation images never
trained on) and cover every sample. test_downstream_accuracy_selects_on_the_synthetic_split_only compares
fit_classifier's inputs with evaluate._split's own output, so a _split whose train part contains the
validation part passed it."""
import pytest
import torch

import dpdm.evaluate as evaluate


@pytest.mark.parametrize("n,seed", [(500, 5), (11, 0), (2, 3), (1000, 1)])
def test_split_is_disjoint_and_covers_every_sample(n, seed):
    train, val = evaluate._split(n, 0.1, seed)
    assert len(val) == max(1, round(n * 0.1))
    assert len(train) + len(val) == n
    assert not set(train.tolist()) & set(val.tolist())
    assert torch.equal(torch.sort(torch.cat([train, val])).values, torch.arange(n))
