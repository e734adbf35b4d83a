"""Pillow's recorded warnings in a failed image's line (r1 N1, stop 56) are that file's own: a warning
Pillow gave while opening an earlier image that loaded is not said as the reason a later image failed, and a
warning that is no UserWarning (a DeprecationWarning of a plugin) is no reason either (s56 r3 mutation tests)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from dpdm.datasets import DataError, load_dataset


def _folder(d):
    for c in ("a", "b"):
        (d / c).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 30 * i, np.uint8)).save(d / c / f"{i}.png")


def _warning_on_open(monkeypatch, name, message, category=UserWarning):
    """Image.open warns `message` while opening the file called `name` (as Pillow warns of a damaged TIFF tag or a
    JPEG's EXIF past its end), then opens it."""
    real = Image.open

    def open_(fp, *a, **k):
        if str(fp).endswith(name):
            warnings.warn(message, category, stacklevel=2)
        return real(fp, *a, **k)
    monkeypatch.setattr(Image, "open", open_)


def test_a_warning_of_an_earlier_image_is_not_a_later_ones_reason(tmp_path, monkeypatch):
    _folder(tmp_path / "d")
    bad = tmp_path / "d" / "b" / "z.png"
    bad.write_bytes(b"not an image at all")
    _warning_on_open(monkeypatch, "/a/1.png", "Metadata Warning, tag 282 had too many entries")
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # nothing raw
        with pytest.raises(DataError) as e:
            load_dataset(f"folder:{tmp_path / 'd'}", "train")
    msg = str(e.value)
    assert f"cannot read image {str(bad)!r} (" in msg, msg
    assert "tag 282" not in msg, msg


def _line_of_a_failed_image_whose_open_warns(tmp_path, monkeypatch, *warned) -> str:
    """The error line of a folder whose image z.png fails, Image.open giving the (message, category) `warned` first."""
    _folder(tmp_path / "d")
    (tmp_path / "d" / "b" / "z.png").write_bytes(b"not an image at all")
    real = Image.open

    def open_(fp, *a, **k):
        if str(fp).endswith("z.png"):
            for message, category in warned:
                warnings.warn(message, category, stacklevel=2)
        return real(fp, *a, **k)
    monkeypatch.setattr(Image, "open", open_)
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{tmp_path / 'd'}", "train")
    return str(e.value)


def test_a_failed_images_own_warning_is_its_reason_but_not_a_deprecation(tmp_path, monkeypatch):
    msg = _line_of_a_failed_image_whose_open_warns(tmp_path, monkeypatch, ("a plugin's API is deprecated",
                                                   DeprecationWarning), ("Tag data larger than file", UserWarning))
    assert msg.endswith("; Tag data larger than file)"), msg
    assert "deprecated" not in msg, msg


def test_two_warnings_of_the_failed_image_are_both_said(tmp_path, monkeypatch):
    msg = _line_of_a_failed_image_whose_open_warns(tmp_path, monkeypatch, ("Corrupt EXIF data", UserWarning),
                                                   ("Tag data larger than file", UserWarning))
    assert msg.endswith("; Corrupt EXIF data; Tag data larger than file)"), msg
