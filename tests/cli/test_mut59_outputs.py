"""mut59 (stop 55): `check_outputs` keeps a samples file of this plan whose private flag is not the model's, in both
directions (h151 F1): the existing tests covered a --no-dp model over a private model's samples only."""
from __future__ import annotations

import numpy as np
import pytest

DIGEST = "sha256:" + "0" * 64


def _samples(path, private):
    np.savez(path, x=np.zeros((2, 1, 8, 8), np.uint8), meta_private=np.array(private),
             meta_plan_digest=np.array(DIGEST))


@pytest.mark.parametrize("old, new", [(True, False), (False, True)])
def test_a_samples_file_of_this_plan_and_the_other_kind_is_kept_either_way(tmp_path, old, new):
    from dpdm.sample import SampleError, check_outputs

    path = tmp_path / "s.npz"
    _samples(path, old)
    before = path.read_bytes()
    was = "a private run" if old else r"a NON-PRIVATE \(--no-dp\) run"
    now = "private" if new else r"NON-PRIVATE \(--no-dp\)"
    with pytest.raises(SampleError, match=rf"holds samples of the model of {was} of this plan, and this model is "
                                          rf"{now}; it is kept"):
        check_outputs(path, plan_digest=DIGEST, private=new)
    assert path.read_bytes() == before
    check_outputs(path, plan_digest=DIGEST, private=old)              # its own kind: replaced without --force
    check_outputs(path, plan_digest=DIGEST, private=new, force=True)  # the other kind: with --force


def test_a_samples_file_whose_private_flag_cannot_be_read_is_kept_without_force(tmp_path):
    """meta_private that is no scalar: the file's kind is unknown, so neither kind replaces it without --force."""
    from dpdm.sample import SampleError, check_outputs

    path = tmp_path / "s.npz"
    np.savez(path, x=np.zeros((2, 1, 8, 8), np.uint8), meta_private=np.array([True, False]),
             meta_plan_digest=np.array(DIGEST))
    for private in (True, False):
        with pytest.raises(SampleError, match=r"of a run whose file says private=None of this plan"):
            check_outputs(path, plan_digest=DIGEST, private=private)
