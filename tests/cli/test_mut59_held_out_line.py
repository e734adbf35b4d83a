"""mut59 (stop 55): eval's closing note names the nonzero counts of samples that are test images or near-copies of
them (h152 N4), each on its own: near-copies with no exact test image among the samples are named too."""
from __future__ import annotations

import pytest


@pytest.mark.parametrize("in_test, near, named", [
    (0, 2, "the counts of samples that are test images or near-copies of them are measured"),
    (3, 2, "the counts of samples that are test images or near-copies of them are measured"),
    (3, 0, "the count of samples that are test images is measured"),
    (3, None, "the count of samples that are test images is measured"),
])
def test_the_note_names_each_nonzero_count_of_test_images_among_the_samples(in_test, near, named):
    from cli.eval import held_out_line

    line = held_out_line({"real_test_size": 10, "samples_in_test": in_test, "test_images_near_samples": near})
    assert line is not None and line.startswith(f"note: {named} WITHOUT privacy on the held-out test images"), line


def test_no_count_no_note():
    from cli.eval import held_out_line

    assert held_out_line({"real_test_size": 10, "samples_in_test": 0, "test_images_near_samples": 0}) is None
