"""Kill tests for mutants of datawalk F1/F2's fix (stop 56) that its own tests let live.

- KeyError in `_IMAGE_READ_ERRORS`: the fix's test damages a TIFF's second page so that Pillow raises TypeError; a
  second page of an unknown Compression code raises KeyError (`COMPRESSION_INFO[...]`) from `n_frames`, which was a
  traceback and exit 4 naming no file. Removing KeyError from the tuple let every test pass.
- `_exif_turned` now catches `_IMAGE_READ_ERRORS` (which took in its KeyError and TypeError): narrowed, a PNG whose
  eXIf chunk holds no valid TIFF header (Pillow's getexif raises SyntaxError "not a TIFF file") was refused as
  "cannot read image", though it loads; every test passed."""
from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest
from PIL import Image

from dpdm.datasets import DataError, load_dataset
from tests.dpdm.test_damaged_tiff_and_jpeg import _folder, second_tiff_page_damaged


def _tiff_whose_second_page_has_an_unknown_compression(path):
    # Compression, a SHORT held in the entry: code 37 is none Pillow knows
    second_tiff_page_damaged(path, 259, lambda data, at: struct.pack_into("<H", data, at + 8, 37))
    with Image.open(path) as img, pytest.raises(KeyError):
        img.n_frames   # noqa: B018  (Pillow's own failure)


def test_a_tiff_whose_second_page_has_an_unknown_compression_is_one_line_naming_it(tmp_path):
    _folder(tmp_path / "d")
    bad = tmp_path / "d" / "a" / "bad.tif"
    _tiff_whose_second_page_has_an_unknown_compression(bad)
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{tmp_path / 'd'}")
    msg = str(e.value)
    assert msg.startswith(f"folder:{tmp_path / 'd'}: cannot read image {str(bad)!r}"), msg
    assert "\n" not in msg


def test_a_png_whose_exif_is_no_tiff_loads_as_untagged(tmp_path):
    _folder(tmp_path / "d")
    odd = tmp_path / "d" / "b" / "odd.png"
    exif = b"II*4" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x0112, 3, 1, 6) + b"\0\0\0\0"
    Image.fromarray(np.full((8, 8), 90, np.uint8)).save(odd, exif=exif)
    with Image.open(odd) as img, pytest.raises(SyntaxError):
        img.getexif()   # Pillow's own failure: "not a TIFF file"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_dataset(f"folder:{tmp_path / 'd'}")
    assert len(data) == 7 and data.exif_turned is None
    assert [str(w.message) for w in caught] == []
