"""mut59 (stop 55): `cli.eval._check_test_held_out_from_generator` returns its warnings (h152 F2). Where the samples'
model trained on a relative path that cannot be read here, both are said: that the path is relative, and that the
test images are not checked against it (in one note, stop 56). The existing tests read one or the other."""
from __future__ import annotations

import numpy as np


def test_a_relative_generator_path_that_cannot_be_read_says_both(tmp_path, monkeypatch):
    from cli.eval import _check_test_held_out_from_generator
    from dpdm.datasets import load_dataset

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "test.npz", x=rng.integers(0, 256, size=(6, 1, 8, 8), dtype=np.uint8),
             y=np.arange(6) % 3, num_classes=3)
    real_test = load_dataset(f"npz:{tmp_path / 'test.npz'}", "train")
    monkeypatch.chdir(tmp_path)
    notes = _check_test_held_out_from_generator("npz:gone/train.npz", f"npz:{tmp_path / 'other.npz'}", real_test,
                                                "npz:test.npz", None)
    # One note saying both (userwalk F1, stop 56: a first note "the test images are checked against" the path as read
    # here, before the load that failed, contradicted the second).
    assert len(notes) == 1, notes
    assert notes[0].startswith("the samples' model trained on 'npz:gone/train.npz', a relative path that cannot be "
                               "read here"), notes
    assert notes[0].endswith("the test images of 'npz:test.npz' are not checked against it"), notes
