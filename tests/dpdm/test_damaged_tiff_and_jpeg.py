"""Damaged TIFFs and JPEGs, whose Pillow errors and warnings reached the user raw (a traceback
and exit 4; Pillow's own UserWarning lines)."""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import accounting
from cli.main import main
from dpdm.datasets import DataError, load_dataset

ROOT = Path(accounting.__file__).resolve().parents[1]   # the repository root (the packages accounting, cli, dpdm)


def second_tiff_page_damaged(path, tag: int, damage) -> None:
    """An 8x8 two-page grayscale TIFF at `path` whose second directory's entry of `tag` is damaged in place by
    `damage(data, at)` (`at`: the entry's offset in the bytearray `data`)."""
    pages = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 200)]
    b = io.BytesIO()
    pages[0].save(b, "TIFF", save_all=True, append_images=pages[1:])
    data = bytearray(b.getvalue())
    assert data[:2] == b"II"
    first = struct.unpack_from("<I", data, 4)[0]
    second = struct.unpack_from("<I", data, first + 2 + 12 * struct.unpack_from("<H", data, first)[0])[0]
    entries = [second + 2 + 12 * i for i in range(struct.unpack_from("<H", data, second)[0])]
    at = next((at for at in entries if struct.unpack_from("<H", data, at)[0] == tag), None)
    assert at is not None, f"no tag {tag} on the second page"
    damage(data, at)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))


def _tiff_whose_second_page_has_no_width(path):
    """An 8x8 two-page grayscale TIFF whose second directory lost its ImageWidth tag (renumbered to a private tag):
    Image.open reads the first page; `n_frames` seeks the second, where Pillow raises TypeError("Missing
    dimensions") from a KeyError. A damaged or cut TIFF directory gives the same."""
    second_tiff_page_damaged(path, 256, lambda data, at: struct.pack_into("<H", data, at, 65000))   # ImageWidth
    with Image.open(path) as img, pytest.raises(TypeError, match="Missing dimensions"):
        img.n_frames   # noqa: B018  (Pillow's own failure, which the loader must turn into its line)


def _folder(d, n=3):
    r = np.random.default_rng(0)
    for c in ("a", "b"):
        (d / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(r.integers(0, 256, (8, 8), dtype=np.uint8)).save(d / c / f"{i}.png")


def test_folder_refuses_a_tiff_with_a_damaged_directory_naming_it(tmp_path):
    """TypeError (Pillow's "Missing dimensions", from a TIFF directory without ImageWidth) escaped `_load_folder`,
    which catches OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError and zlib.error only."""
    _folder(tmp_path / "d")
    bad = tmp_path / "d" / "a" / "bad.tif"
    _tiff_whose_second_page_has_no_width(bad)
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{tmp_path / 'd'}")
    msg = str(e.value)
    assert msg.startswith(f"folder:{tmp_path / 'd'}: cannot read image {str(bad)!r}"), msg
    assert "\n" not in msg


def test_dpdm_train_on_a_folder_with_a_damaged_tiff_is_one_line_exit_2(tmp_path, capsys):
    """Through the CLI the TypeError was a traceback and "dpdm: runtime failure: TypeError: Missing dimensions",
    exit 4, naming no file: the user of a folder of thousands of TIFF scans could not tell which one to remove."""
    _folder(tmp_path / "d")
    bad = tmp_path / "d" / "a" / "bad.tif"
    _tiff_whose_second_page_has_no_width(bad)
    plan = accounting.PrivacyPlan(dataset_size=7, batch_size=2, steps=2, noise_multiplier=2.0, noise_multiplicity=1,
                                  delta=1e-5)
    accounting.write_plan(accounting.make_plan_document(plan), tmp_path / "plan.json")
    code = main(["train", "--plan", str(tmp_path / "plan.json"), "--dataset", f"folder:{tmp_path / 'd'}",
                 "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet"])
    _, err = capsys.readouterr()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpdm: error: ") and repr(str(bad)) in lines[0], err
    assert not (tmp_path / "run").exists()



# The EXIF block of the stop-51 test for PNGs (r2 F3): Orientation 6, and an ImageDescription that claims 1000 bytes
# past the block's end, on which Pillow warns "Tag data larger than file. Skipping tag 270" and goes on.
_DAMAGED_EXIF = (b"II*\x00" + struct.pack("<IH", 8, 2) + struct.pack("<HHII", 0x0112, 3, 1, 6)
                 + struct.pack("<HHII", 0x010E, 2, 1000, 0x1000) + b"\x00\x00\x00\x00")


def _tiff_with_description(path, *, count=None, offset=None):
    """An 8x8 grayscale TIFF with an ImageDescription tag (270), whose count or data offset is then patched: a count
    past the file's end makes Pillow skip the tag with a UserWarning and load the image; an offset past it makes
    Image.open warn "Truncated File Read" and fail ("cannot identify image file")."""
    from PIL import TiffImagePlugin

    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[270] = "a scanner's description"
    b = io.BytesIO()
    Image.fromarray(np.full((8, 8), 90, np.uint8)).save(b, "TIFF", tiffinfo=info)
    data = bytearray(b.getvalue())
    first = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, first)[0]):
        at = first + 2 + 12 * i
        if struct.unpack_from("<H", data, at)[0] == 270:
            if count is not None:
                struct.pack_into("<I", data, at + 4, count)
            if offset is not None:
                struct.pack_into("<I", data, at + 8, offset)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))


def test_a_jpeg_with_a_damaged_exif_block_prints_no_pillow_warning(tmp_path):
    """r2 F3 (stop 51) silenced Pillow's raw UserWarning for a PNG's damaged EXIF, which Pillow parses in getexif()
    (inside `_exif_turned`'s filter). A JPEG's EXIF is parsed in Image.open (`_read_dpi_from_exif`), outside it: the
    same block in a phone's JPEG printed "/.../PIL/TiffImagePlugin.py:946: UserWarning: Tag data larger than file.
    Skipping tag 270" and its source line, from `dpdm train`, `eval` and `baseline`, for an image that loads fine."""
    _folder(tmp_path / "d")
    photo = tmp_path / "d" / "b" / "photo.jpg"
    Image.fromarray(np.full((8, 8), 90, np.uint8)).save(photo, exif=b"Exif\x00\x00" + _DAMAGED_EXIF)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_dataset(f"folder:{tmp_path / 'd'}")
    assert len(data) == 7
    assert [str(w.message) for w in caught] == []
    assert data.exif_turned == (str(photo), 1)   # the orientation it holds is still read


def test_a_tiff_with_a_damaged_tag_prints_no_pillow_warning(tmp_path):
    """The same for a TIFF whose ImageDescription's count runs past the file: Pillow skips the tag, warns from
    Image.open, and the image loads."""
    _folder(tmp_path / "d")
    _tiff_with_description(tmp_path / "d" / "b" / "scan.tif", count=100000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_dataset(f"folder:{tmp_path / 'd'}")
    assert len(data) == 7
    assert [str(w.message) for w in caught] == []


def test_a_refused_tiff_is_one_error_line_without_pillows_warning(tmp_path):
    """A TIFF whose ImageDescription's data lies past the file is refused ("cannot identify image file"), but
    Pillow's "UserWarning: Truncated File Read" and its source line came first: three lines on stderr where a
    refusal is one. Run as a process: pytest records warnings, so capsys would not see them."""
    _folder(tmp_path / "d")
    bad = tmp_path / "d" / "b" / "scan.tif"
    _tiff_with_description(bad, offset=0x100000)
    plan = accounting.PrivacyPlan(dataset_size=7, batch_size=2, steps=1, noise_multiplier=2.0, noise_multiplicity=1,
                                  delta=1e-5)
    accounting.write_plan(accounting.make_plan_document(plan), tmp_path / "plan.json")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, "-m", "cli.main", "train", "--plan", str(tmp_path / "plan.json"),
                           "--dataset", f"folder:{tmp_path / 'd'}", "--out", str(tmp_path / "run"), "--device", "cpu",
                           "--quiet"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpdm: error: ") and repr(str(bad)) in lines[0], proc.stderr


def test_a_refused_image_names_the_reason_pillow_warned_of(tmp_path, monkeypatch):
    """Pillow puts the cause of a failed open into a UserWarning and raises a bare "cannot identify image file": the
    warning, no longer printed raw, is said in the file's one line (r1 N1, stop 56). A Pillow built without WebP
    support is simulated."""
    from PIL import WebPImagePlugin

    folder = tmp_path / "wp" / "d"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(folder / "photo.webp", "WEBP")
    monkeypatch.setattr(WebPImagePlugin, "SUPPORTED", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # nothing of Pillow's reaches the user raw
        with pytest.raises(DataError) as e:
            load_dataset(f"folder:{tmp_path / 'wp'}", "train")
    msg = str(e.value)
    assert f"cannot read image {str(folder / 'photo.webp')!r} (cannot identify image file" in msg, msg
    assert msg.endswith("; image file could not be identified because WEBP support not installed)"), msg
