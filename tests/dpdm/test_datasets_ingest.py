"""Data ingestion: malformed npz members and images, folder layouts and limits, corrupt torchvision files."""
from __future__ import annotations

import io
import os
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
from PIL import Image

import dpdm.datasets as datasets
from dpdm.datasets import DataError, load_dataset, load_npz


def _npy(array) -> bytes:
    b = io.BytesIO()
    np.save(b, array)
    return b.getvalue()


# --- npz ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", ["x", "y", "num_classes"])
def test_npz_member_that_is_no_npy_array_is_refused(tmp_path, raw):
    """numpy's NpzFile returns the raw bytes of a member written without np.save: refused, not an AttributeError."""
    arrays = {"x": np.zeros((4, 1, 8, 8), np.uint8), "y": np.arange(4) % 2, "num_classes": np.array(3)}
    path = tmp_path / "a.npz"
    with zipfile.ZipFile(path, "w") as z:
        for key, value in arrays.items():
            if key == raw:
                z.writestr(key, value.tobytes() if key == "x" else b"3")
            else:
                z.writestr(key + ".npy", _npy(value))
    with pytest.raises(DataError, match=rf"^npz:.*a\.npz: its array '{raw}' is not an \.npy array; write") as e:
        load_npz(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("shape", [(24, 1, 0, 0), (3, 0, 5), (3, 5, 0), (3, 3, 4, 0), (3, 0, 4, 1)])
def test_npz_refuses_images_with_a_zero_side(tmp_path, shape):
    np.savez(tmp_path / "z.npz", x=np.zeros(shape, np.uint8))
    with pytest.raises(DataError, match=r"its images are \d+x\d+ and hold no pixels; every image side must be"):
        load_npz(tmp_path / "z.npz")


def test_npz_refuses_images_above_the_pixel_limit_as_a_folder_does(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MAX_IMAGE_PIXELS", 64)
    np.savez(tmp_path / "ok.npz", x=np.zeros((2, 8, 8, 1), np.uint8))
    assert load_npz(tmp_path / "ok.npz").image_shape == (1, 8, 8)
    for shape in [(2, 9, 8), (2, 3, 8, 9), (2, 9, 8, 3)]:
        np.savez(tmp_path / "big.npz", x=np.zeros(shape, np.uint8))
        with pytest.raises(DataError, match=r"x holds images of (9x8|8x9) pixels; images may have at most 64 pixels"):
            load_npz(tmp_path / "big.npz")


def test_npz_pixel_limit_is_read_off_the_header_before_the_data(tmp_path):
    """A header claiming one 20000x20000 image (a 0.4 MB compressed file would decompress to 400 MB) is refused on
    the header: here the data is missing altogether, so reading it would fail otherwise."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (1, 1, 20000, 20000)})
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", header.getvalue())   # the header (magic included), no data
    with pytest.raises(DataError, match=r"x holds images of 20000x20000 pixels; images may have at most 16777216"):
        load_npz(path)


def _header_only(shape, descr="|u1") -> bytes:
    """An .npy member that claims `shape` and holds no data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return header.getvalue()


def test_npz_reads_only_x_y_and_num_classes(tmp_path):
    """Every member was decompressed, read or not: an unused 1.5 GB array of zeros in a 1.5 MB file took 12 s and
    2.2 GB; one whose header claims 10**12 bytes, an object array or a raw member refused the whole file (h102 F1).
    Members other than x, y and num_classes are never read, whatever their size or dtype."""
    x, y = np.arange(6 * 64, dtype=np.uint8).reshape(6, 1, 8, 8), np.arange(6) % 3
    path = tmp_path / "extra.npz"
    np.savez(path, x=x, y=y, num_classes=np.array(4), meta_note=np.array([object()], dtype=object))
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("junk.npy", _header_only((10**12,)))   # no data: reading it would fail
        z.writestr("notes", b"raw bytes, no .npy header")
    data = load_npz(path)
    assert len(data) == 6 and data.num_classes == 4 and data.y.tolist() == y.tolist()
    np.testing.assert_array_equal(datasets.to_uint8(data.x), x)


def test_npz_names_the_arrays_it_does_not_read(tmp_path):
    """Labels stored as `labels` are never read, so the data loaded as unlabelled and trained an unconditional model
    in silence (h109 F1). The arrays left unread are named (`dpdm train` warns with them), from the archive's
    member list: none of them is decompressed, not even one whose header claims 10**12 bytes."""
    x = np.zeros((6, 1, 8, 8), np.uint8)
    path = tmp_path / "labels.npz"
    np.savez(path, x=x, labels=np.arange(6) % 3, meta_note=np.array([object()], dtype=object))
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("junk.npy", _header_only((10**12,)))   # no data: reading it would fail
        z.writestr("notes", b"raw bytes, no .npy header")
    data = load_npz(path)
    assert data.y is None and data.num_classes == 0
    assert data.unread_arrays == ("junk", "labels", "meta_note", "notes")
    np.savez(path, x=x, y=np.arange(6) % 3, num_classes=np.array(3))
    assert load_npz(path).unread_arrays == ()


def test_npz_sizes_are_checked_on_the_headers_before_the_data(tmp_path, monkeypatch):
    """An x too large for this process's memory is refused on its header, naming it, before numpy allocates it
    (an allocation that overcommit lets through ends in the OOM killer); so are a y of another length and a large
    num_classes array, whose messages are the ones given after reading."""
    import dpdm.sample

    monkeypatch.setattr(dpdm.sample, "memory_allowed", lambda: (10_000, False))   # x: 100 * 64 * (1 + 4) bytes
    for members, match in [({"x.npy": _header_only((100, 1, 8, 8))},
                            r"^npz:.*big\.npz: cannot read '.*big\.npz': its x of shape \(100, 1, 8, 8\) \(uint8\) "
                            r"needs 2\.98e-05 GiB of memory to load, more than this machine's 9\.31e-06 GiB; the file "
                            r"is corrupt or too large for this machine's memory$"),
                           ({"x.npy": _npy(np.zeros((6, 8, 8), np.uint8)), "y.npy": _header_only((10**12,), "<i8")},
                            r"y must be integers of shape \(6,\), got int64 \(1000000000000,\) \(unlabelled"),
                           ({"x.npy": _npy(np.zeros((6, 8, 8), np.uint8)), "y.npy": _npy(np.arange(6)),
                             "num_classes.npy": _header_only((10**12,), "<i8")},
                            r"num_classes must be an integer scalar >= 1, got 'int64 \(1000000000000,\)'$")]:
        path = tmp_path / "big.npz"
        with zipfile.ZipFile(path, "w") as z:
            for member, content in members.items():
                z.writestr(member, content)
        with pytest.raises(DataError, match=match):
            load_npz(path)
    monkeypatch.setattr(dpdm.sample, "memory_allowed", lambda: (10_000, True))
    np.savez(tmp_path / "big2.npz", x=np.zeros((100, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"more than the 9\.31e-06 GiB left under this process's address-space limit"):
        load_npz(tmp_path / "big2.npz")
    np.savez(tmp_path / "small.npz", x=np.zeros((6, 8, 8), np.uint8))   # 1,920 bytes: loads
    assert len(load_npz(tmp_path / "small.npz")) == 6


def test_npz_refuses_a_y_or_num_classes_of_no_integers_on_its_header(tmp_path):
    """A y of dtype |S15000000 (1.5 GB of zeros in a 1.5 MB file) was decompressed in full, 10 s and 2 GB, before
    it was refused as no integers; so was a num_classes of |S400000000 (h145 F2, stop 54). Both are refused on their
    headers, with the lines given after reading: here the members hold a header and no data, which a read fails on."""
    x = _npy(np.zeros((6, 8, 8), np.uint8))
    for members, match in [({"y.npy": _header_only((6,), "|S1000000")},
                            r"y must be integers of shape \(6,\), got \|S1000000 \(6,\) \(unlabelled data has no y\)$"),
                           ({"y.npy": _header_only((6,), "<f8")}, r"y must be integers of shape \(6,\), got float64 "),
                           ({"y.npy": _npy(np.arange(6)), "num_classes.npy": _header_only((), "|S1000000")},
                            r"num_classes must be an integer scalar >= 1, got '\|S1000000 \(\)'$")]:
        path = tmp_path / "labels.npz"
        with zipfile.ZipFile(path, "w") as z:
            for member, content in {"x.npy": x, **members}.items():
                z.writestr(member, content)
        with pytest.raises(DataError, match=match):
            load_npz(path)
    np.savez(path, x=np.zeros((6, 8, 8), np.uint8), y=np.arange(6, dtype=np.uint16), num_classes=np.float64(6))
    with pytest.raises(DataError, match=r"num_classes must be an integer scalar >= 1, got 6\.0$"):
        load_npz(path)   # a small scalar is still read and shown as it is


def test_npz_reads_the_member_whose_header_it_checked(tmp_path):
    """numpy reads a raw member 'x' before 'x.npy' where an archive holds both; the header of 'x.npy' was checked
    and the raw 'x' decompressed in full, or returned as bytes: an AttributeError, exit 4 (h112 F2). The header
    checked is that of the member numpy reads."""
    x10, x20 = np.zeros((10, 1, 8, 8), np.uint8), np.full((20, 1, 8, 8), 7, np.uint8)
    for raw, match in [(b"hello world", r"its array 'x' is not an \.npy array; write the file with numpy\.savez"),
                       (_header_only((10**12, 28, 28)), r"its x of shape \(1000000000000, 28, 28\) \(uint8\) needs "
                                                        r".* GiB of memory to load, more than"),
                       (_npy(x20), None)]:
        path = tmp_path / "dup.npz"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x.npy", _npy(x10))
            z.writestr("x", raw)
        if match is None:   # the images loaded are those numpy gives for 'x'
            with np.load(path) as f:
                np.testing.assert_array_equal(f["x"], x20)
            np.testing.assert_array_equal(datasets.to_uint8(load_npz(path).x), x20)
        else:
            with pytest.raises(DataError, match=match) as e:
                load_npz(path)
            assert "\n" not in str(e.value)


def test_read_npz_scalars_sizes_each_array_on_its_header_before_reading_it(tmp_path):
    """A samples file's meta_* arrays were decompressed in full to see their shape: 600 MB of zeros cost 600 MB,
    and a header claiming 10**12 bytes ended `dpdm eval` in "out of memory on the machine", exit 4 (h112 F1).
    Scalars are read as Python values; anything else is refused on its header, naming it; other arrays are not
    read."""
    path = tmp_path / "s.npz"
    np.savez(path, x=np.zeros((2, 8, 8), np.uint8), meta_a=np.array(True), meta_b=np.array(3, np.uint8),
             meta_c=np.array(0.5, np.float32), meta_d=np.array("npz:/data/train.npz"), meta_e=np.array([1.0, 2.0]))
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("meta_big.npy", _header_only((10**12,)))   # no data: reading it would fail
    got = datasets.read_npz_scalars(path, ["meta_a", "meta_b", "meta_c", "meta_d", "meta_none"])
    assert got == {"meta_a": True, "meta_b": 3, "meta_c": 0.5, "meta_d": "npz:/data/train.npz"}
    assert [type(v) for v in got.values()] == [bool, int, float, str]
    for member, content, shown in [("meta_big.npy", _header_only((10**12,)), r"uint8 \(1000000000000,\)"),
                                   ("meta_big.npy", _header_only((), "<U100000"), r"<U100000 \(\)"),
                                   ("meta_big.npy", _npy(np.array([1.0, 2.0])), r"float64 \(2,\)"),
                                   ("meta_big.npy", _npy(np.array(1j)), r"complex128 \(\)"),
                                   ("meta_big.npy", _npy(np.array([object()], dtype=object)), r"object \(1,\)")]:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(member, content)
        with pytest.raises(DataError, match=rf"^npz:.*s\.npz: its array 'meta_big' must be a scalar \(a number, or "
                                            rf"text of at most 65536 characters\), got {shown}; rewrite the file"):
            datasets.read_npz_scalars(path, ["meta_big"])
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("meta_big", b"raw bytes")
    with pytest.raises(DataError, match=r"its array 'meta_big' is not an \.npy array"):
        datasets.read_npz_scalars(path, ["meta_big"])
    path.write_text("junk")
    with pytest.raises(DataError, match=r"cannot read .* as \.npz \(it is not an \.npz archive; dpdm never loads"):
        datasets.read_npz_scalars(path, ["meta_big"])


# --- folder ---------------------------------------------------------------------------------------

def _png(path, array, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _classes(root, names=("a", "b", "c")):
    r = np.random.default_rng(0)
    for c in names:
        _png(root / c / "0.png", r.integers(0, 256, (8, 8), dtype=np.uint8))


def test_folder_class_count_is_marked_inferred_from_the_data(tmp_path):
    """A folder's class count is its class folders', each of which must hold a private image: the CLI warns."""
    _classes(tmp_path / "d")
    data = load_dataset(f"folder:{tmp_path / 'd'}")
    assert data.num_classes == 3 and data.num_classes_inferred is True
    flat = tmp_path / "flat"
    _png(flat / "0.png", np.zeros((8, 8), np.uint8))
    assert load_dataset(f"folder:{flat}").num_classes_inferred is False   # unlabelled: no class count


def test_folder_channel_count_is_marked_inferred_from_the_data(tmp_path):
    """One colour-mode image among grayscale ones makes a folder's images RGB: the channel count is read off the
    (private) data, and the CLI warns (an npz's x array states it)."""
    r = np.random.default_rng(0)
    for i in range(3):
        _png(tmp_path / "gray" / f"{i}.png", r.integers(0, 256, (8, 8), dtype=np.uint8))
    gray = load_dataset(f"folder:{tmp_path / 'gray'}")
    assert gray.image_shape[0] == 1 and gray.channels_inferred is True
    _png(tmp_path / "gray" / "3.png", r.integers(0, 256, (8, 8, 3), dtype=np.uint8), mode="RGB")
    mixed = load_dataset(f"folder:{tmp_path / 'gray'}")
    assert mixed.image_shape[0] == 3 and mixed.channels_inferred is True
    _classes(tmp_path / "d")
    assert load_dataset(f"folder:{tmp_path / 'd'}").channels_inferred is True
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 1, 8, 8), np.uint8))
    assert load_npz(tmp_path / "a.npz").channels_inferred is False


def test_folder_caps_the_class_count_as_npz_does(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MAX_NUM_CLASSES", 2)
    _classes(tmp_path / "d")
    with pytest.raises(DataError, match=r"has 3 class folders; a dataset may have at most 2 classes"):
        load_dataset(f"folder:{tmp_path / 'd'}")
    _classes(tmp_path / "e", names=("a", "b"))
    assert load_dataset(f"folder:{tmp_path / 'e'}").num_classes == 2


def _png_bytes(array, color_type, bit_depth) -> bytes:
    h, w = array.shape[:2]
    raw = b"".join(b"\x00" + array[i].astype(">u2" if bit_depth == 16 else "u1").tobytes() for i in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("color_type,channels", [(2, 3), (4, 2), (6, 4)])
def test_folder_refuses_16_bit_colour_and_gray_alpha_pngs(tmp_path, color_type, channels):
    """Pillow opens them as RGB/RGBA and keeps each value's high byte; the docs say 16-bit images are refused."""
    a = np.random.default_rng(0).integers(0, 65536, (8, 8, channels), dtype=np.uint16)
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "a" / "0.png").write_bytes(_png_bytes(a, color_type, 16))
    kind = {2: "RGB", 4: "LA", 6: "RGBA"}[color_type]
    with pytest.raises(DataError, match=rf"0\.png' is a 16-bit {kind} PNG: 16-bit/float images are not supported"):
        load_dataset(f"folder:{tmp_path / 'd'}")
    (tmp_path / "d" / "a" / "0.png").write_bytes(_png_bytes(a >> 8, color_type, 8))   # 8-bit: loads
    assert len(load_dataset(f"folder:{tmp_path / 'd'}")) == 1


def _tiff16_bytes(a, order="<", deflate=False) -> bytes:
    """A baseline TIFF of `a` ([H, W, 3 or 4] uint16, chunky; 4: RGB and unassociated alpha), one strip, raw or
    deflated, in byte order `order`: Pillow writes no 16-bit colour TIFF."""
    h, w, c = a.shape
    data = a.astype(order + "u2").tobytes()
    data = zlib.compress(data) if deflate else data
    tags = [(256, 3, w), (257, 3, h), (258, 3, None), (259, 3, 8 if deflate else 1), (262, 3, 2), (273, 4, None),
            (277, 3, c), (278, 3, h), (279, 4, len(data)), (284, 3, 1)] + ([(338, 3, 2)] if c == 4 else [])
    bits_at = 8 + 2 + 12 * len(tags) + 4     # BitsPerSample's c values follow the one IFD, then the strip
    entries = b""
    for tag, typ, value in tags:
        count = c if tag == 258 else 1
        value = bits_at if tag == 258 else bits_at + 2 * c if tag == 273 else value
        short = typ == 3 and count == 1    # a lone SHORT is left-justified in the 4-byte field, an offset is not
        packed = struct.pack(order + ("HH" if short else "I"), *((value, 0) if short else (value,)))
        entries += struct.pack(order + "HHI", tag, typ, count) + packed
    head = (b"II*\x00" if order == "<" else b"MM\x00*") + struct.pack(order + "I", 8)
    return (head + struct.pack(order + "H", len(tags)) + entries + struct.pack(order + "I", 0)
            + struct.pack(order + "H" * c, *[16] * c) + data)


@pytest.mark.parametrize("channels,order,deflate", [(3, "<", False), (3, ">", False), (4, "<", False), (4, ">", True)])
def test_folder_refuses_16_bit_colour_tiffs(tmp_path, channels, order, deflate):
    """Pillow opens them as RGB/RGBA and keeps each value's high byte: 12-bit data stored in 16 bits (0..4095, as
    scientific and medical images are) loaded as near-black 0..15 of 255, without a word."""
    a = np.random.default_rng(0).integers(0, 4096, (8, 8, channels), dtype=np.uint16)
    path = tmp_path / "d" / "a" / "0.tif"
    path.parent.mkdir(parents=True)
    path.write_bytes(_tiff16_bytes(a, order, deflate))
    with Image.open(path) as img:   # what made it pass: an 8-bit mode
        assert img.mode == ("RGB", "RGBA")[channels - 3]
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{tmp_path / 'd'}")
    msg = str(e.value)
    kind = ("RGB", "RGBA")[channels - 3]
    assert (f"image {str(path)!r} is a 16-bit {kind} TIFF: 16-bit/float images are not supported; convert to "
            "8-bit") in msg and "\n" not in msg, msg
    Image.fromarray((a >> 4).astype(np.uint8)).save(path)   # 8-bit: loads
    assert len(load_dataset(f"folder:{tmp_path / 'd'}")) == 1


@pytest.mark.parametrize("magic,maxval", [("P6", 65535), ("P6", 4095), ("P3", 1000), ("P5", 65535), ("P2", 1000)])
def test_folder_refuses_16_bit_ppms_as_it_does_16_bit_pgms(tmp_path, magic, maxval):
    """A 16-bit PGM (Pillow's mode I) was refused, but Pillow rescales a 16-bit PPM to 8 bits: it loaded, its
    precision lost without a word."""
    channels = 3 if magic in ("P6", "P3") else 1
    a = np.random.default_rng(0).integers(0, maxval + 1, (8, 8, channels), dtype=np.uint16)
    body = a.astype(">u2").tobytes() if magic in ("P6", "P5") else " ".join(map(str, a.ravel())).encode()
    path = tmp_path / "d" / ("0.ppm" if channels == 3 else "0.pgm")
    path.parent.mkdir()
    path.write_bytes(f"{magic}\n8 8\n{maxval}\n".encode() + body)
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{tmp_path / 'd'}")
    msg = str(e.value)
    assert "16-bit/float images are not supported; convert to 8-bit" in msg and "\n" not in msg, msg
    if channels == 3:
        assert f"image {str(path)!r} is a 16-bit RGB PPM (maxval {maxval}): " in msg, msg
    binary = {"P3": "P6", "P2": "P5"}.get(magic, magic)
    path.write_bytes(f"{binary}\n8 8\n255\n".encode() + (a.astype(np.int64) * 255 // maxval).astype(np.uint8).tobytes())
    assert len(load_dataset(f"folder:{tmp_path / 'd'}")) == 1


def test_palette_images_with_byte_transparency_load_without_pillows_warning(tmp_path):
    """Pillow's "Palette images with Transparency expressed in bytes should be converted to RGBA images" reached
    stderr, with its own path, for every such folder; the alpha is dropped here as every image's is."""
    rng = np.random.default_rng(0)
    d = tmp_path / "d"
    d.mkdir()
    trns = bytes([0] * 4 + [255] * 12)
    for i in range(2):
        img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).convert("P", colors=16,
                                                                                        palette=Image.ADAPTIVE)
        img.save(d / f"{i}.png", transparency=trns)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_dataset(f"folder:{d}")
    assert data.x.shape == (2, 3, 8, 8)
    with Image.open(d / "1.png") as img:
        assert img.mode == "P" and isinstance(img.info["transparency"], bytes)
        rgb = np.asarray(img.convert("RGBA"))[..., :3].transpose(2, 0, 1)   # the palette's colours, alpha dropped
    assert (datasets.to_uint8(data.x[1]) == rgb).all()


def test_flat_folder_with_an_imageless_subfolder_names_the_subfolder(tmp_path):
    d = tmp_path / "flat"
    for i in range(3):
        _png(d / f"{i}.png", np.full((8, 8), i, np.uint8))
    (d / "__MACOSX").mkdir()
    (d / "__MACOSX" / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{d}")
    msg = str(e.value)
    assert "__MACOSX" in msg and "3 images and 1 subfolder(s) without images" in msg and "remove the subfolder" in msg
    assert "lies beside" not in msg and "\n" not in msg
    # Class folders with images beside them are still refused naming the image.
    _classes(tmp_path / "c", names=("a", "b"))
    _png(tmp_path / "c" / "x.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"image '.*x\.png' lies beside the class folders"):
        load_dataset(f"folder:{tmp_path / 'c'}")


def test_flat_folder_with_a_subfolder_holding_an_image_names_the_subfolder(tmp_path):
    """A flat folder of images with one stray subfolder that holds an image (an old/ copy) read as class folders,
    and the line blamed the loose images: "image '0.png' lies beside the class folders ... move it into a class
    folder (the first of 5 such paths)" (h124 F3). The subfolder is named, with its image count."""
    d = tmp_path / "flat"
    for i in range(5):
        _png(d / f"{i}.png", np.full((8, 8), i, np.uint8))
    _png(d / "old" / "x.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{d}")
    msg = str(e.value)
    assert msg == (f"folder:{d}: {str(d)!r} holds 5 images and 1 subfolder(s) with 1 image(s) in all "
                   f"({str(d / 'old')!r}: 1), which make it read as class folders (PATH/<class>/<image>), where its "
                   f"own 5 images have no class; move the subfolder(s) out of {str(d)!r} (or remove them) to load its "
                   f"images unlabelled, or move its images into class folders"), msg
    _png(d / "old" / "deep" / "y.png", np.zeros((8, 8), np.uint8))   # nested images count as the subfolder's
    (d / "__MACOSX").mkdir()
    with pytest.raises(DataError, match=rf"5 images and 2 subfolder\(s\) with 2 image\(s\) in all "
                                        rf"\('.*__MACOSX': 0, '.*old': 2\)"):
        load_dataset(f"folder:{d}")
    (d / "old" / "deep" / "checkpoint.pt").write_bytes(b"")   # a run folder in it: moved, never removed (h94 F1)
    with pytest.raises(DataError, match=r"folder '.*/old' holds the dpdm run folder '.*/old/deep' \(`dpdm train "
                                        r"--out`\), which does not belong in the data: move the run folder out"):
        load_dataset(f"folder:{d}")
    # Class folders holding more images than lie beside them: the loose image is named, as before.
    _classes(tmp_path / "c", names=("a", "b"))
    _png(tmp_path / "c" / "x.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"image '.*x\.png' lies beside the class folders"):
        load_dataset(f"folder:{tmp_path / 'c'}")


def _grey_folder(d, n):
    r = np.random.default_rng(0)
    for i in range(n):
        _png(d / f"{i}.png", r.integers(0, 256, (8, 8), dtype=np.uint8))


@pytest.mark.parametrize("mode", ["P", "RGB", "RGBA"])
def test_grayscale_folder_with_a_grey_colour_mode_image_is_refused_naming_it(tmp_path, mode):
    """One palette or RGB export of a grey scan among grayscale ones made every image RGB, and the only word was
    the channel line every run prints, with "3, RGB" for "1, grayscale": the run spent its plan on a 3-channel
    model, which the release reveals (h124 F2). Its three channels would carry nothing: refused, naming the file,
    how many there are and the fix either way."""
    d = tmp_path / "d"
    _grey_folder(d, 6)
    odd = d / "3.png"
    with Image.open(odd) as img:
        img.convert(mode).save(odd)
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{d}")
    msg = str(e.value)
    assert msg == (f"folder:{d}: 1 of its 6 images is a colour-mode file (the first: {str(odd)!r}, mode {mode!r}) "
                   f"whose pixels are all grey, beside 5 grayscale ones, so that every image would load as 3-channel "
                   f"RGB; convert it to 8-bit grayscale (PIL: img.convert('L')) to train on one channel, or every "
                   f"image to RGB to train on three"), msg
    with Image.open(d / "5.png") as img:
        img.convert(mode).save(d / "5.png")
    with pytest.raises(DataError, match=rf"2 of its 6 images are colour-mode files \(the first: '.*3\.png', mode "
                                        rf"'{mode}'\) whose pixels are all grey, beside 4 grayscale ones"):
        load_dataset(f"folder:{d}")
    for i in range(6):   # every image RGB: three channels, as asked, and the channel line says they are grey
        with Image.open(d / f"{i}.png") as img:
            img.convert("RGB").save(d / f"{i}.png")
    data = load_dataset(f"folder:{d}")
    assert data.image_shape == (3, 8, 8) and data.colour_images == (str(d / "0.png"), 6, True)
    assert "all its 6 images are in a colour mode (the first: " in datasets.inferred_channels_note(data)
    assert "but their pixels are grey; convert them to 8-bit grayscale" in datasets.inferred_channels_note(data)
    for i in range(6):
        with Image.open(d / f"{i}.png") as img:
            img.convert("L").save(d / f"{i}.png")
    assert load_dataset(f"folder:{d}").image_shape == (1, 8, 8)


def test_mixed_folder_whose_colour_image_holds_colour_loads_as_rgb_and_names_it(tmp_path, capsys):
    """A colour image among grayscale ones (a folder of photos with a few grey ones, as torchvision's ImageFolder
    loads it) still makes every image RGB; the channel line names the first colour-mode image and how many there
    are beside grayscale ones, where it was the same line every run prints (h124 F2)."""
    d = tmp_path / "d"
    _grey_folder(d, 6)
    _png(d / "2.png", np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8), mode="RGB")
    data = load_dataset(f"folder:{d}")
    assert data.image_shape == (3, 8, 8) and data.colour_images == (str(d / "2.png"), 1, False)
    note = datasets.inferred_channels_note(data)
    assert note == (f"the number of channels (3, RGB) was read off the private images: 1 of its 6 images is in a "
                    f"colour mode (the first: {str(d / '2.png')!r}) and 5 grayscale, and one colour-mode image "
                    f"holding colour makes them all RGB (to train on one channel, convert it to 8-bit grayscale or "
                    f"remove it), and the model reveals it; to fix it publicly, give the data as an npz, whose x "
                    f"array [N, C, H, W] states it"), note
    (d / "2.png").unlink()
    gray = load_dataset(f"folder:{d}")
    assert gray.colour_images is None and "(1, grayscale)" in datasets.inferred_channels_note(gray)
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 3, 8, 8), np.uint8))
    assert datasets.inferred_channels_note(load_npz(tmp_path / "a.npz")) is None


def test_colour_folder_with_a_few_grayscale_images_names_the_first_grayscale_one(tmp_path):
    """r1 F1, stop 52: in a colour folder with a few grey photos (as torchvision's ImageFolder loads it), the channel
    line named an ordinary colour photo as "the first" colour-mode image and advised converting the colour images to
    grayscale or removing them. Where the grayscale images are the fewer, it names the first of them and their count,
    and says they load with three equal channels."""
    d = tmp_path / "d"
    r = np.random.default_rng(2)
    for i in range(7):
        _png(d / f"{i}.png", r.integers(0, 256, (8, 8, 3), dtype=np.uint8), mode="RGB")
    _png(d / "4.png", r.integers(0, 256, (8, 8), dtype=np.uint8))
    data = load_dataset(f"folder:{d}")
    assert data.image_shape == (3, 8, 8) and data.colour_images == (str(d / "0.png"), 6, False)
    assert data.grayscale_images == (str(d / "4.png"), 1)
    note = datasets.inferred_channels_note(data)
    assert note == (f"the number of channels (3, RGB) was read off the private images: 1 of its 7 images is "
                    f"grayscale (the first: {str(d / '4.png')!r}) and 6 in a colour mode, and one colour-mode image "
                    f"holding colour makes them all RGB (the grayscale one loads with three equal channels, as "
                    f"torchvision's ImageFolder loads it; remove it if it does not belong in a colour dataset), and "
                    f"the model reveals it; to fix it publicly, give the data as an npz, whose x array [N, C, H, W] "
                    f"states it"), note
    _png(d / "5.png", r.integers(0, 256, (8, 8), dtype=np.uint8), mode="L")
    note = datasets.inferred_channels_note(load_dataset(f"folder:{d}"))
    assert f": 2 of its 7 images are grayscale (the first: {str(d / '4.png')!r}) and 5 in a colour mode" in note, note
    assert "convert them to 8-bit grayscale" not in note and "(the grayscale ones load with three" in note, note


def test_mixed_folder_is_rgb_where_any_colour_mode_image_holds_colour_not_only_the_first(tmp_path):
    """r1 F2, stop 52: the grey check must look at every colour-mode image. A folder of grayscale images whose first
    colour-mode images are grey and whose last holds colour is a colour folder (a photo folder with a few
    desaturated exports); checking only the first colour-mode image, or refusing where any is grey, refused it."""
    d = tmp_path / "d"
    _grey_folder(d, 3)   # 0..2: grayscale
    r = np.random.default_rng(3)
    for i in range(3, 9):   # 3..8: RGB exports of grey images
        grey = r.integers(0, 256, (8, 8), dtype=np.uint8)
        _png(d / f"{i}.png", np.stack([grey] * 3, axis=-1), mode="RGB")
    _png(d / "9.png", r.integers(0, 256, (8, 8, 3), dtype=np.uint8), mode="RGB")   # the last file: colourful
    data = load_dataset(f"folder:{d}")
    assert data.image_shape == (3, 8, 8) and data.colour_images == (str(d / "3.png"), 7, False)
    assert not bool((data.x[9, 0] == data.x[9, 1]).all() and (data.x[9, 1] == data.x[9, 2]).all())
    (d / "9.png").unlink()
    with pytest.raises(DataError, match=r"6 of its 9 images are colour-mode files \(the first: '.*3\.png', mode "
                                        r"'RGB'\) whose pixels are all grey, beside 3 grayscale ones"):
        load_dataset(f"folder:{d}")


def test_folder_names_the_images_whose_transparency_it_drops(tmp_path):
    """A grey+alpha image loaded as grayscale, its alpha dropped without a word, as an RGBA or a transparent
    palette image's was (h124 N3): a mask was lost. The images with a pixel that is not fully opaque are named
    (an alpha channel that is all opaque loses nothing)."""
    d = tmp_path / "d"
    _grey_folder(d, 4)
    gray = np.full((8, 8), 90, np.uint8)
    opaque = np.full((8, 8), 255, np.uint8)
    Image.merge("LA", [Image.fromarray(gray), Image.fromarray(opaque)]).save(d / "1.png")
    data = load_dataset(f"folder:{d}")
    assert data.image_shape == (1, 8, 8) and data.transparent is None
    assert datasets.transparency_note(data) is None
    mask = opaque.copy()
    mask[:4] = 0
    Image.merge("LA", [Image.fromarray(gray), Image.fromarray(mask)]).save(d / "2.png")
    data = load_dataset(f"folder:{d}")
    assert data.image_shape == (1, 8, 8) and data.transparent == (str(d / "2.png"), 1)
    assert datasets.transparency_note(data) == (
        f"1 of its 4 images has transparent pixels (the first: {str(d / '2.png')!r}), whose alpha channel dpdm drops, "
        f"as torchvision's ImageFolder does: they train on their stored grey or colour values alone; to keep a mask, "
        f"store it in the pixels (or as another image)")
    colour = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.merge("RGBA", [*Image.fromarray(colour).split(), Image.fromarray(mask)]).save(d / "3.png")
    Image.fromarray(gray).save(d / "0.png", transparency=90)   # a colour key: every pixel transparent
    data = load_dataset(f"folder:{d}")
    assert data.image_shape == (3, 8, 8) and data.transparent == (str(d / "0.png"), 3)
    assert datasets.transparency_note(data).startswith("3 of its 4 images have transparent pixels (the first: ")


def _broken_png(path):
    """A 12x12 RGB PNG whose IDAT chunk length is 56 bytes short (one damaged length field): Pillow opens it, and its
    load() raises SyntaxError ("broken PNG file (chunk ...)")."""
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(b, "PNG")
    d = bytearray(b.getvalue())
    i = d.find(b"IDAT") - 4
    d[i:i + 4] = struct.pack(">I", struct.unpack(">I", d[i:i + 4])[0] - 56)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(d))


def test_folder_refuses_a_png_with_a_broken_chunk_naming_it(tmp_path):
    """The SyntaxError that Pillow's PNG reader raises from load() escaped as a traceback (exit 4), naming no file."""
    _classes(tmp_path / "d", names=("a", "b"))
    bad = tmp_path / "d" / "b" / "1.png"
    _broken_png(bad)
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{tmp_path / 'd'}")
    msg = str(e.value)
    assert msg.startswith(f"folder:{tmp_path / 'd'}: cannot read image {str(bad)!r} (broken PNG file"), msg
    assert "\n" not in msg
    bad.unlink()
    assert len(load_dataset(f"folder:{tmp_path / 'd'}")) == 2


@pytest.mark.parametrize("suffix, extra", [(".tif", {}), (".png", {}), (".gif", {"duration": 100})])
def test_folder_refuses_a_file_of_several_frames_naming_it(tmp_path, suffix, extra):
    """A multi-page TIFF or an animated PNG/GIF loaded its first frame only: the other frames were left out of the
    count without a word (stop 47, h91 F3)."""
    _classes(tmp_path / "d", names=("a", "b"))
    r = np.random.default_rng(1)
    frames = [Image.fromarray(r.integers(0, 256, (8, 8), dtype=np.uint8)) for _ in range(3)]
    stack = tmp_path / "d" / "b" / f"stack{suffix}"
    frames[0].save(stack, save_all=True, append_images=frames[1:], **extra)
    with Image.open(stack) as img:
        assert img.n_frames == 3
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{tmp_path / 'd'}")
    msg = str(e.value)
    assert msg.startswith(f"folder:{tmp_path / 'd'}: image {str(stack)!r} holds 3 frames"), msg
    assert "own file" in msg and "\n" not in msg
    frames[0].save(stack)   # one frame: loaded as before
    if suffix == ".gif":   # a GIF is a palette image: a grey one beside grayscale PNGs is refused (h124 F2)
        with pytest.raises(DataError, match=r"stack\.gif', mode 'P'\) whose pixels are all grey"):
            load_dataset(f"folder:{tmp_path / 'd'}")
        frames[0].save(stack.with_suffix(".png"))
        stack.unlink()
    assert len(load_dataset(f"folder:{tmp_path / 'd'}")) == 3


def test_folder_reads_a_cameras_mpo_jpeg_as_one_image(tmp_path):
    """Phones and cameras write JPEGs as MPO: the photo, then previews or a depth map of it as further frames. One
    photo, one image: the several-frames refusal (h91 F3) would have refused a folder of ordinary photos."""
    _classes(tmp_path / "d", names=("a", "b"))
    r = np.random.default_rng(2)
    photo = Image.fromarray(r.integers(0, 256, (8, 8), dtype=np.uint8))
    preview = Image.fromarray(r.integers(0, 256, (8, 8), dtype=np.uint8))
    path = tmp_path / "d" / "b" / "photo.jpg"
    photo.save(path, format="MPO", save_all=True, append_images=[preview])
    with Image.open(path) as img:
        assert img.format == "MPO" and img.n_frames == 2
    assert len(load_dataset(f"folder:{tmp_path / 'd'}")) == 3


@pytest.mark.parametrize("error", [SyntaxError("broken PNG file"), EOFError(), struct.error("unpack requires a "
                                   "buffer of 4 bytes"), IndexError("index out of range"), zlib.error("bad data")])
def test_folder_refuses_an_image_whose_decoder_fails_naming_it(tmp_path, monkeypatch, error):
    """Besides OSError and ValueError, Pillow's plugins raise these on damaged data (Image.open turns them into
    UnidentifiedImageError; load() does not)."""
    from PIL import ImageFile

    _png(tmp_path / "d" / "0.png", np.zeros((8, 8), np.uint8))

    def load(self):
        raise error

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{tmp_path / 'd'}")
    msg = str(e.value)
    why = " ".join(str(error).split()) or type(error).__name__
    assert msg == f"folder:{tmp_path / 'd'}: cannot read image {str(tmp_path / 'd' / '0.png')!r} ({why})", msg


def test_folder_refuses_an_image_reached_through_a_linked_folder_in_a_class_folder(tmp_path):
    """os.walk did not enter a link to a folder below a class folder's subfolder: its images were left out of the
    count without a word, where the same image in a real folder is refused naming it."""
    _classes(tmp_path / "d", names=("a", "b"))
    _png(tmp_path / "outside" / "o.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "d" / "a" / "sub").mkdir()
    (tmp_path / "d" / "a" / "sub" / "lnk").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{tmp_path / 'd'}")
    msg = str(e.value)
    assert msg == (f"folder:{tmp_path / 'd'}: image {str(tmp_path / 'd' / 'a' / 'sub' / 'lnk' / 'o.png')!r} lies "
                   f"in a subfolder of class folder {str(tmp_path / 'd' / 'a')!r}; images must lie directly in "
                   "their class folder (PATH/<class>/<image>)"), msg
    # A link to an imageless folder adds nothing to leave out: it loads, as an imageless real subfolder does.
    (tmp_path / "outside" / "o.png").unlink()
    assert len(load_dataset(f"folder:{tmp_path / 'd'}")) == 2


def test_folder_walks_a_link_to_a_folder_above_once(tmp_path):
    """A link below a class folder to the class folder (or the dataset) ends the walk where it comes round again;
    the class folder's own images, reached through it, are refused as the same link directly in the class folder
    was."""
    _classes(tmp_path / "d", names=("a", "b"))
    (tmp_path / "d" / "a" / "sub").mkdir()
    (tmp_path / "d" / "a" / "sub" / "up").symlink_to(tmp_path / "d", target_is_directory=True)
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{tmp_path / 'd'}")
    msg = str(e.value)
    first = tmp_path / "d" / "a" / "sub" / "up" / "a" / "0.png"
    assert msg.startswith(f"folder:{tmp_path / 'd'}: image {str(first)!r} lies in a subfolder of class folder "), msg
    assert "(the first of 2 such paths" in msg, msg


def test_folder_refuses_a_subfolder_it_cannot_list(tmp_path, monkeypatch):
    """os.walk skips a folder it cannot list (its images too) unless told otherwise: refused, naming it."""
    import os

    _classes(tmp_path / "d", names=("a", "b"))
    sub = tmp_path / "d" / "a" / "sub"
    _png(sub / "s.png", np.zeros((8, 8), np.uint8))
    scandir = os.scandir

    def unlistable(path="."):
        if os.fspath(path) == str(sub):
            raise PermissionError(13, "Permission denied", str(sub))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", unlistable)
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{tmp_path / 'd'}")
    msg = str(e.value)
    assert msg == (f"folder:{tmp_path / 'd'}: cannot list {str(tmp_path / 'd')!r} ([Errno 13] Permission denied: "
                   f"{str(sub)!r})"), msg


def _exif_png(path, array, orientation):
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation   # EXIF Orientation (6: turn 90 degrees clockwise to show)
    Image.fromarray(array).save(path, exif=exif)


def test_folder_says_which_images_carry_an_exif_orientation_it_ignores(tmp_path):
    """Phone photos tagged with an EXIF orientation loaded as stored, turned against what every viewer shows, and
    nothing said so; a tagged photo of swapped sides was refused as "all images must share one size" (h112 F4). The
    pixels stay as stored (as torchvision's ImageFolder reads them: turning them would change the data digest of
    an existing run, which could then not be resumed); the images tagged are counted and the first named."""
    r = np.random.default_rng(0)
    pixels = r.integers(0, 256, (6, 8), dtype=np.uint8)   # 8 wide, 6 tall
    _png(tmp_path / "d" / "a" / "0.png", pixels)
    _exif_png(tmp_path / "d" / "a" / "1.png", pixels, 1)   # upright: not counted
    _exif_png(tmp_path / "d" / "b" / "2.png", pixels, 6)
    _exif_png(tmp_path / "d" / "b" / "3.png", pixels, 8)
    data = load_dataset(f"folder:{tmp_path / 'd'}")
    assert data.image_shape == (1, 6, 8)
    np.testing.assert_array_equal(datasets.to_uint8(data.x)[2, 0], pixels)   # as stored
    first = str(tmp_path / "d" / "b" / "2.png")
    assert data.exif_turned == (first, 2)
    note = datasets.exif_orientation_note(data)
    assert note.startswith(f"2 of its 4 images carry an EXIF orientation tag (the first: {first!r}), which dpdm "
                           "ignores: they are read as stored") and "PIL.ImageOps.exif_transpose" in note
    _classes(tmp_path / "plain")
    plain = load_dataset(f"folder:{tmp_path / 'plain'}")
    assert plain.exif_turned is None and datasets.exif_orientation_note(plain) is None
    _exif_png(tmp_path / "d" / "b" / "4.png", pixels.T.copy(), 6)   # 6 wide, 8 tall: shown as 8 wide
    with pytest.raises(DataError, match=r"all images must share one size \('.*4\.png' carries an EXIF orientation "
                                        r"tag, which dpdm ignores: it reads pixels as stored; rotate its pixels"):
        load_dataset(f"folder:{tmp_path / 'd'}")


def test_folder_loads_a_gray_tiff_with_premultiplied_alpha(tmp_path):
    """A gray TIFF whose alpha is premultiplied (Pillow's mode "La") was accepted, then refused with Pillow's
    "conversion from La to L not supported", naming no file (h112 F6). It loads as gray, its alpha dropped as an
    LA image's is (RGBa's likewise: the colour unpremultiplied)."""
    r = np.random.default_rng(0)
    gray, alpha = r.integers(0, 256, (8, 8), dtype=np.uint8), np.full((8, 8), 255, np.uint8)
    Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)]).save(tmp_path / "la.tif")
    tiff = bytearray((tmp_path / "la.tif").read_bytes())
    assert tiff[:2] == b"II"
    ifd = struct.unpack_from("<I", tiff, 4)[0]
    for k in range(struct.unpack_from("<H", tiff, ifd)[0]):   # ExtraSamples (338): 2 unassociated -> 1 associated
        if struct.unpack_from("<H", tiff, ifd + 2 + 12 * k)[0] == 338:
            struct.pack_into("<H", tiff, ifd + 2 + 12 * k + 8, 1)
    (tmp_path / "d" / "1").mkdir(parents=True)
    (tmp_path / "d" / "1" / "9.tif").write_bytes(bytes(tiff))
    with Image.open(tmp_path / "d" / "1" / "9.tif") as img:
        assert img.mode == "La"
    _png(tmp_path / "d" / "0" / "0.png", r.integers(0, 256, (8, 8), dtype=np.uint8))
    data = load_dataset(f"folder:{tmp_path / 'd'}")
    assert data.image_shape == (1, 8, 8)
    np.testing.assert_array_equal(datasets.to_uint8(data.x)[1, 0], gray)   # opaque: unchanged


# --- torchvision ----------------------------------------------------------------------------------

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")


def _mnist_root(root, train_images: bytes | None = None, empty: bool = False):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = struct.pack(">IIII", 0x803, 3, 28, 28) + bytes(3 * 784)
    labels = struct.pack(">II", 0x801, 3) + bytes(3)
    for f in _MNIST_FILES:
        data = b"" if empty else labels if "labels" in f else images
        (raw / f).write_bytes(data)
    if train_images is not None:
        (raw / _MNIST_FILES[0]).write_bytes(train_images)
    return root


def test_mnist_reads_well_formed_raw_files(tmp_path):
    data = load_dataset("mnist", data_root=_mnist_root(tmp_path / "r"))
    assert data.x.shape == (3, 1, 28, 28) and data.num_classes == 10


@pytest.mark.parametrize("contents", ["html", "truncated", "empty"])
def test_mnist_corrupt_raw_files_are_said_to_be_there_but_unreadable(tmp_path, contents):
    html = b"<!DOCTYPE html><html><body>503 Service Unavailable</body></html>\n"
    truncated = struct.pack(">IIII", 0x803, 60000, 28, 28) + bytes(1000 * 784)
    root = _mnist_root(tmp_path / "r", train_images={"html": html, "truncated": truncated}.get(contents),
                       empty=contents == "empty")
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_root=root)
    msg = str(e.value)
    assert msg.startswith(f"dataset 'mnist': its files under {str(root)!r} are there but unreadable (")
    assert "corrupt or truncated" in msg and "remove them and download them again" in msg
    assert "not found" not in msg and "\n" not in msg


_CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                  "batches.meta")
_CELEBA_FILES = ("list_attr_celeba.txt", "identity_CelebA.txt", "list_bbox_celeba.txt",
                 "list_landmarks_align_celeba.txt", "list_eval_partition.txt")


def _corrupt_root(root, name):
    """`name`'s files where torchvision looks for them under `root`, each holding an HTML error page."""
    folder = root / {"cifar10": "cifar-10-batches-py", "celeba": "celeba"}[name]
    folder.mkdir(parents=True)
    for f in {"cifar10": _CIFAR10_FILES, "celeba": _CELEBA_FILES}[name]:
        (folder / f).write_bytes(b"<!DOCTYPE html><html><body>503 Service Unavailable</body></html>\n")
    if name == "celeba":
        (folder / "img_align_celeba").mkdir()
    return folder


@pytest.mark.parametrize("name", ["cifar10", "celeba"])
def test_corrupt_cifar10_and_celeba_files_are_said_to_be_there_but_unreadable(tmp_path, name):
    """torchvision says "Dataset not found or corrupted" when their md5 check fails: they were said not to be
    there ("put the files there"), although they were."""
    folder = _corrupt_root(tmp_path / "r", name)
    with pytest.raises(DataError) as e:
        load_dataset(name, data_root=tmp_path / "r")
    msg = str(e.value)
    first = {"cifar10": "data_batch_1", "celeba": "list_attr_celeba.txt"}[name]
    assert msg.startswith(f"dataset {name!r}: its files under {str(tmp_path / 'r')!r} are there but unreadable "
                          f"(md5 mismatch: {first}, "), msg
    assert "remove them and download them again" in msg and "not found" not in msg and "\n" not in msg
    # One file missing: not found, naming it (the layout torchvision expects under the root).
    missing = folder / {"cifar10": "test_batch", "celeba": "list_eval_partition.txt"}[name]
    missing.unlink()
    with pytest.raises(DataError) as e:
        load_dataset(name, data_root=tmp_path / "r")
    msg = str(e.value)
    assert msg.startswith(f"dataset {name!r} not found under {str(tmp_path / 'r')!r} (missing {str(missing)!r}); "
                          "put the files there"), msg


def test_mnist_root_one_folder_too_deep_names_the_path_it_looks_for(tmp_path):
    """--data-root ROOT/MNIST for files in ROOT/MNIST/raw/: "not found under 'ROOT/MNIST'; put the files there",
    where they were."""
    deep = _mnist_root(tmp_path / "r") / "MNIST"
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_root=deep)
    expected = deep / "MNIST" / "raw" / "train-images-idx3-ubyte"
    assert f"not found under {str(deep)!r} (missing {str(expected)!r} and 3 more of its files); " in str(e.value)


def test_failed_download_says_so_and_names_the_error(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.mnist as tv_mnist

    def offline(*args, **kwargs):
        raise URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    for name in ("mnist", "cifar10"):
        root = tmp_path / name
        with pytest.raises(DataError) as e:
            load_dataset(name, data_root=root, download=True)
        msg = str(e.value)
        assert msg.startswith(f"dataset {name!r} not found under {str(root)!r} and its download failed (<urlopen "
                              "error [Errno -2] Name or service not known>)"), msg
        assert "pass --download" not in msg and "\n" not in msg
    # Corrupt files, where a download would write over them: they are said to be there.
    _corrupt_root(tmp_path / "bad", "cifar10")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_root=tmp_path / "bad", download=True)
    msg = str(e.value)
    assert msg.startswith(f"dataset 'cifar10': its files under {str(tmp_path / 'bad')!r} are there but unreadable "
                          "(md5 mismatch: data_batch_1, "), msg
    assert "and a new download failed (<urlopen error [Errno -2] Name or service not known>)" in msg, msg


def test_celeba_download_without_gdown_says_to_install_it(tmp_path, monkeypatch):
    """torchvision fetches CelebA from Google Drive through gdown, which dpdm does not depend on: its download
    failed for want of it, and the line advised connecting to a network (h112 F5)."""
    import sys

    monkeypatch.setitem(sys.modules, "gdown", None)   # not installed (import gdown raises ImportError)
    with pytest.raises(DataError) as e:
        load_dataset("celeba", data_root=tmp_path, download=True)
    msg = str(e.value)
    assert msg.startswith(f"dataset 'celeba' not found under {str(tmp_path)!r} and its download failed ("), msg
    assert "; install gdown (pip install gdown), which torchvision needs to download it, and try again, or put the " \
           "files there yourself" in msg and "connect to a network" not in msg and "\n" not in msg, msg


def test_an_empty_dpdm_data_is_unset(monkeypatch, tmp_path):
    """DPDM_DATA= made the current folder the data root (--download would put MNIST/ there, in a folder: dataset
    an image-less class folder), where DPDM_CACHE= is unset (h112 F7)."""
    monkeypatch.setenv("DPDM_DATA", "")
    assert datasets.default_data_root() == Path("~/.cache/dpdm/data").expanduser()
    monkeypatch.setenv("DPDM_DATA", str(tmp_path))
    assert datasets.default_data_root() == tmp_path


def test_not_found_advises_download_only_where_the_caller_has_the_option(tmp_path):
    with pytest.raises(DataError, match=r"put the files there, point --data-root at them, or pass --download$"):
        load_dataset("mnist", data_root=tmp_path)
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_root=tmp_path, download_option=False)
    msg = str(e.value)
    assert msg.endswith("put the files there or point --data-root at them") and "--download" not in msg




def test_train_and_baseline_warn_of_images_with_an_exif_orientation(tmp_path, capsys):
    from cli._common import warn_exif_orientation
    from dpdm.datasets import load_dataset

    exif = Image.Exif()
    exif[0x0112] = 6
    for c in "ab":
        (tmp_path / "d" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "d" / c / "0.png", exif=exif if c == "b" else None)
    name = f"folder:{tmp_path / 'd'}"
    warn_exif_orientation(name, load_dataset(name))
    err = capsys.readouterr().err
    assert err.startswith(f"dpdm: warning: --dataset={name!r}: 1 of its 2 images carries an EXIF orientation tag (the "
                          f"first: {str(tmp_path / 'd' / 'b' / '0.png')!r})") and err.count("\n") == 1, err


def test_a_damaged_exif_block_prints_no_pillow_warning(tmp_path):
    """On an EXIF block whose tag claims more bytes than the block holds, Pillow's getexif warns "Tag data larger
    than file. Skipping tag 270" and goes on: the raw UserWarning, with Pillow's path, was printed by train, eval
    and baseline for an image that loads fine (r2 F3, stop 51). Nothing is printed; the orientation it holds is
    still read."""
    exif = (b"II*\x00" + struct.pack("<IH", 8, 2) + struct.pack("<HHII", 0x0112, 3, 1, 6)   # Orientation 6
            + struct.pack("<HHII", 0x010E, 2, 1000, 0x1000) + b"\x00\x00\x00\x00")   # 1000 bytes, past the end
    for c in "ab":
        (tmp_path / "d" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "d" / c / "0.png", exif=exif if c == "b" else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_dataset(f"folder:{tmp_path / 'd'}")
    assert [str(w.message) for w in caught] == []
    assert data.exif_turned == (str(tmp_path / "d" / "b" / "0.png"), 1)


def test_train_and_baseline_name_the_colour_and_transparent_images_of_a_folder(tmp_path, capsys):
    """The channel line was the same every run prints, with "3, RGB" for "1, grayscale", naming no image (h124 F2);
    an image's dropped alpha was not mentioned (h124 N3)."""
    from cli._common import warn_exif_orientation, warn_inferred_channels

    d = tmp_path / "d"
    _grey_folder(d, 4)
    _png(d / "2.png", np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8), mode="RGB")
    mask = np.full((8, 8), 255, np.uint8)
    mask[:4] = 0
    Image.merge("LA", [Image.fromarray(np.full((8, 8), 90, np.uint8)), Image.fromarray(mask)]).save(d / "3.png")
    name = f"folder:{d}"
    data = load_dataset(name)
    warn_inferred_channels(name, data)
    warn_exif_orientation(name, data)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"dpdm: warning: --dataset={name!r}: the number of channels (3, RGB) was read off the "
                               f"private images: 1 of its 4 images is in a colour mode (the first: "
                               f"{str(d / '2.png')!r}) and 3 grayscale"), lines
    assert lines[1].startswith(f"dpdm: warning: --dataset={name!r}: 1 of its 4 images has transparent pixels (the "
                               f"first: {str(d / '3.png')!r})"), lines


def test_dpdm_trains_warning_names_the_images_with_an_exif_orientation(tmp_path, capsys):
    """mut54 (stop 52): the test above calls `warn_exif_orientation` itself; this one pins that `dpdm train` says it
    before the first step (`cli.train._warn_before_training`), as 9bdfce7 made it."""
    from types import SimpleNamespace

    from cli.train import _warn_before_training
    from dpdm.datasets import load_dataset

    exif = Image.Exif()
    exif[0x0112] = 6
    for c in "ab":
        (tmp_path / "d" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "d" / c / "0.png", exif=exif if c == "b" else None)
    name = f"folder:{tmp_path / 'd'}"
    doc = SimpleNamespace(plan=SimpleNamespace(dataset_name=name))
    _warn_before_training(load_dataset(name), name, name, doc, False, (), None)
    err = capsys.readouterr().err
    assert (f"dpdm: warning: --dataset={name!r}: 1 of its 2 images carries an EXIF orientation tag (the first: "
            f"{str(tmp_path / 'd' / 'b' / '0.png')!r})") in err, err


@pytest.mark.parametrize("how", ["symlink", "link through a link", "linked class folder", "class folder to the root",
                                 "class folder to a folder above", "class folder into another"])
def test_folder_refuses_a_second_path_to_one_of_its_images_naming_the_link(tmp_path, how):
    """A link to an image of the folder (or a class folder linked to another) counted the file twice without a
    word, and that image was then protected only as a group of two (h144 F1, stop 54): refused, naming the link and
    what it reaches, one line. A link to an image outside the folder is one image, and loads."""
    d = tmp_path / "d"
    _classes(d, names=("a", "b"))
    _png(d / "a" / "1.png", np.full((8, 8), 7, np.uint8))
    link = d / "a" / "2.png"
    if how == "symlink":   # named first, whichever class folder sorts first: the link is the path to remove
        link.symlink_to(d / "b" / "0.png")
        why = f"image {str(link)!r} is a link to image {str(d / 'b' / '0.png')!r} of the folder, so that image"
    elif how == "link through a link":   # a/2.png -> b/1.png -> a file outside: a second path to b/1.png
        _png(tmp_path / "object.png", np.full((8, 8), 9, np.uint8))
        (d / "b" / "1.png").symlink_to(tmp_path / "object.png")
        link.symlink_to(Path("..") / "b" / "1.png")
        why = f"image {str(link)!r} is a link to image {str(d / 'b' / '1.png')!r} of the folder, so that image"
    else:
        link, target = d / "c", {"linked class folder": d / "a", "class folder to the root": d,
                                 "class folder to a folder above": tmp_path,
                                 "class folder into another": d / "a" / ".sub"}[how]
        target.mkdir(exist_ok=True)
        link.symlink_to(target, target_is_directory=True)
        what = {"linked class folder": f"class folder {str(d / 'a')!r}",
                "class folder to the root": f"{str(d)!r}, the data folder itself",
                "class folder to a folder above": f"{str(tmp_path)!r}, a folder that holds the data folder",
                "class folder into another": f"{str(target)!r}, inside class folder {str(d / 'a')!r}"}[how]
        why = f"class folder {str(link)!r} is a link to {what}, so its images"
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{d}")
    msg = str(e.value)
    assert msg == (f"folder:{d}: {why} would count twice and {'each ' if link.name == 'c' else ''}be protected only "
                   "as a group of two; remove the link"), msg
    link.unlink()
    _png(tmp_path / "outside.png", np.full((8, 8), 9, np.uint8))
    (d / "b" / "3.png").symlink_to(tmp_path / "outside.png")   # one image, reached through a link
    assert len(load_dataset(f"folder:{d}")) == 4 + (how == "link through a link")


@pytest.mark.parametrize("how", ["two links to one file outside", "hard link"])
def test_folder_counts_other_paths_to_one_file_as_the_copies_they_are(tmp_path, how):
    """git-annex, DVC and the Hugging Face cache store two records' identical images as two links to one object
    outside the folder; refusing any two paths to one file refused such data (r1 F1, stop 54). Neither link is a
    second path to an image of the folder: both are counted, as copies are (a hard link too), and
    `duplicate_images` (`dpdm train`'s warning) names them."""
    from dpdm.datasets import duplicate_images

    d = tmp_path / "d"
    _classes(d, names=("a", "b"))
    if how == "hard link":
        os.link(d / "a" / "0.png", d / "b" / "1.png")
    else:
        _png(tmp_path / "annex" / "objects" / "SHA256E-s99--0a1b.png", np.full((8, 8), 7, np.uint8))
        for f in (d / "a" / "1.png", d / "b" / "1.png"):
            f.symlink_to(Path(os.path.relpath(tmp_path / "annex" / "objects" / "SHA256E-s99--0a1b.png", f.parent)))
    data = load_dataset(f"folder:{d}")
    assert len(data) == 4 - (how == "hard link") and data.y.tolist() == [0, 0, 1, 1][how == "hard link":]
    first = "a/0.png" if how == "hard link" else "a/1.png"
    assert duplicate_images(data).startswith(f"1 of the {len(data)} images is an exact copy of another (the first: "
                                             f"'b/1.png' is {first!r}, paths in the data folder)"), data


def test_the_copies_warning_names_a_folders_files_and_an_npzs_rows(tmp_path):
    """h155 F3 (stop 55): the warning named a folder's copies by index ("image 11 is image 0", counted in the
    data's order: class folders, then files sorted as strings, 10.png before 2.png), which a user with thousands
    of photos could not map to the files to remove. A folder's copies are named by their paths in the data folder
    (`ImageData.files`); an npz's by their rows; a subset of a folder's images (`dataclasses.replace`) by index,
    not by the files of other images."""
    import dataclasses
    import shutil

    from dpdm.datasets import duplicate_images
    from dpdm.train import data_notes

    d = tmp_path / "d"
    r = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(12):
            _png(d / c / f"{i}.png", r.integers(0, 256, (8, 8), dtype=np.uint8))
    shutil.copy(d / "a" / "2.png", d / "b" / "10.png")   # image 14, a copy of image 4 (0, 1, 10, 11, 2, ...)
    data = load_dataset(f"folder:{d}")
    assert data.files[:5] == ("a/0.png", "a/1.png", "a/10.png", "a/11.png", "a/2.png") and len(data.files) == 24
    note = duplicate_images(data)
    assert note.startswith("1 of the 24 images is an exact copy of another (the first: 'b/10.png' is 'a/2.png', "
                           "paths in the data folder): "), note
    assert data_notes(data.x, data.y, 2, digests=data.image_digests, names=data.files)["duplicates"] == note
    part = dataclasses.replace(data, x=data.x[4:], y=data.y[4:])
    assert part.files is None and "(the first: image 10 is image 0, counted from 0 in the data's order)" in (
        duplicate_images(part)), duplicate_images(part)
    flat = tmp_path / "flat"
    for i in range(3):
        _png(flat / f"{i}.png", np.full((8, 8), 9 * (i == 1), np.uint8))   # unlabelled: 2.png is 0.png
    note = duplicate_images(load_dataset(f"folder:{flat}"))
    assert "(the first: '2.png' is '0.png', paths in the data folder)" in note, note
    np.savez(tmp_path / "x.npz", x=((data.x.numpy() + 1) * 127.5).round().astype(np.uint8))
    rows = load_dataset(f"npz:{tmp_path / 'x.npz'}")
    assert rows.files is None and "(the first: image 14 is image 4, counted from 0 in the data's order)" in (
        duplicate_images(rows)), duplicate_images(rows)


@pytest.mark.parametrize("suffix", [".jfif", ".jpe", ".pbm", ".pnm"])
def test_folder_reads_the_other_names_of_the_formats_it_takes(tmp_path, suffix):
    """A JPEG named .jfif (as Windows names downloaded ones) or a Netpbm .pbm/.pnm (.ppm and .pgm were taken) was
    skipped as a notes.txt is, so that the count differed from the images the user sees (h144 F2, stop 54)."""
    d = tmp_path / "d"
    _classes(d, names=("a", "b"))
    fmt = "JPEG" if suffix in (".jfif", ".jpe") else "PPM"
    mode = "1" if suffix == ".pbm" else "L"
    Image.fromarray(np.full((8, 8), 255, np.uint8), mode="L").convert(mode).save(d / "a" / f"1{suffix}", format=fmt)
    data = load_dataset(f"folder:{d}")
    assert len(data) == 3 and data.y.tolist() == [0, 0, 1]


@pytest.mark.parametrize("suffix, fmt", [(".tga", "TGA"), (".ico", "ICO"), (".dib", "DIB")])
def test_folder_refuses_an_image_in_a_format_it_does_not_read_naming_it(tmp_path, suffix, fmt):
    """A readable image whose suffix dpdm does not take was skipped without a word (h144 F2, stop 54): refused,
    naming it and how many there are, as any image that dpdm would otherwise leave out of the count is."""
    d = tmp_path / "d"
    _classes(d, names=("a", "b"))
    for i in (1, 2):
        Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").convert("RGB").save(d / "b" / f"{i}{suffix}",
                                                                                  format=fmt)
    (d / "b" / "notes.txt").write_text("not an image")   # still skipped
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{d}")
    msg = str(e.value)
    assert msg == (f"folder:{d}: image {str(d / 'b' / f'1{suffix}')!r} is in a format dpdm does not read "
                   f"({suffix}); convert it to PNG (or JPEG), or move it out of the data (the first of 2 such paths "
                   f"in {str(d)!r})"), msg


@pytest.mark.parametrize("where", ["beside the class folders", "in a subfolder of a class folder"])
@pytest.mark.parametrize("suffix", [".png", ".heic", ".TGA"])
def test_folder_refuses_an_image_it_does_not_read_where_it_refuses_one_it_reads(tmp_path, where, suffix):
    """A .heic beside the class folders, or a .tga in a subfolder of a class folder, was skipped without a word
    where a .png there is refused (r1 F2, stop 54): either is left out of the count the plan locks. The same line."""
    d = tmp_path / "d"
    _classes(d, names=("a", "b"))
    image = d / f"x{suffix}" if where == "beside the class folders" else d / "a" / "iphone" / f"x{suffix}"
    image.parent.mkdir(exist_ok=True)
    image.write_bytes(b"an image")
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{d}")
    msg = str(e.value)
    assert msg == (f"folder:{d}: image {str(image)!r} " + (
        "lies beside the class folders, where it has no class; move it into a class folder or remove it"
        if where == "beside the class folders" else
        f"lies in a subfolder of class folder {str(d / 'a')!r}; images must lie directly in their class folder "
        "(PATH/<class>/<image>)")), msg
    image.rename(image.with_suffix(".txt"))   # skipped, as a notes.txt is
    assert len(load_dataset(f"folder:{d}")) == 2


def test_root_holding_one_folder_of_class_folders_names_it(tmp_path):
    """PATH/train/<class>/<image> was refused as images in subfolders of class folder PATH/train, whose advice,
    followed, made one class of them (h144 N2, stop 54): the line names the folder to give."""
    _classes(tmp_path / "d" / "train", names=("a", "b"))
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{tmp_path / 'd'}")
    train = tmp_path / "d" / "train"
    assert str(e.value).endswith(f"(the first of 2 such paths in {str(tmp_path / 'd')!r}); if {str(train)!r} holds "
                                 f"the class folders, give folder:{train}"), str(e.value)
    assert len(load_dataset(f"folder:{train}")) == 2


@pytest.mark.parametrize("stored", [False, True])
def test_npz_labels_of_shape_n_by_1_are_refused_with_the_fix(tmp_path, stored):
    """Keras' cifar10.load_data() gives y of shape (N, 1) (h144 N3, stop 54)."""
    save = np.savez if stored else np.savez_compressed
    save(tmp_path / "k.npz", x=np.zeros((3, 8, 8), np.uint8), y=np.zeros((3, 1), np.int64))
    with pytest.raises(DataError, match=r"y must be integers of shape \(3,\), got int64 \(3, 1\); store y\.ravel\(\) "
                                        r"\(unlabelled data has no y\)$"):
        load_npz(tmp_path / "k.npz")


def test_a_class_folder_linked_to_one_that_sorts_after_it_is_refused(tmp_path):
    """mut57 (stop 54): a class folder that is a link to another class folder is refused whichever sorts first
    (`_linked_class_folder` keeps the real folder, not the first link to it): "a" -> "b" counted b's images twice,
    in two classes, each protected only as a group of two, where the link's name sorted before its target's."""
    d = tmp_path / "d"
    _classes(d, names=("b", "c"))
    (d / "a").symlink_to(d / "b", target_is_directory=True)
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{d}")
    msg = str(e.value)
    assert msg == (f"folder:{d}: class folder {str(d / 'a')!r} is a link to class folder {str(d / 'b')!r}, so its "
                   "images would count twice and each be protected only as a group of two; remove the link"), msg
