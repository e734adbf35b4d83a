"""mut58 (stop 55): an image-named link in a folder dataset to something that is no regular file (a FIFO, a
device) is named as such, not as "a broken link", whose target would be gone (`dpdm.datasets._unreadable`)."""

import os

import numpy as np
import pytest
from PIL import Image

from dpdm.datasets import DataError, load_dataset


def test_a_link_to_a_fifo_or_a_device_is_no_broken_link(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((4, 4), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    os.mkfifo(tmp_path / "fifo")
    for target in (tmp_path / "fifo", "/dev/null"):
        link = tmp_path / "a" / "x.png"
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        with pytest.raises(DataError, match=r"cannot read image '.*a/x\.png' \(it is a link to no regular file\)"):
            load_dataset(f"folder:{tmp_path}")
    link.unlink()
    link.symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DataError, match=r"cannot read image '.*a/x\.png' \(it is a broken link\)"):
        load_dataset(f"folder:{tmp_path}")
