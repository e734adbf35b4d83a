"""Quality of synthetic images, measured as the paper does (research/dpdm.md section 4).

- **Downstream accuracy**: a classifier (`LogReg`, `MLP`, `CNN`) is trained on the synthetic images
  only, with a 90/10 split of the synthetic set for model selection: after every epoch the accuracy on
  the synthetic validation part is measured, and the weights of the best epoch are kept. The number
  reported is that model's accuracy on the real held-out test split, which never influences
  training or selection. Adam (lr 3e-4), batch 128, as the paper; the paper trains 50 epochs, our
  defaults (`DEFAULT_EPOCHS`) are smaller so that a 10,000-image evaluation fits in a few CPU
  minutes. Unlike the paper's script, the synthetic training set is shuffled every epoch.
- **Public initialization** (``public=``, optional): each classifier is first trained without
  privacy on labelled public data (Adam 1e-3, batch 128, `DEFAULT_PUBLIC_EPOCHS` epochs, as the
  DP-SGD baseline's ``public=``), then on the synthetic images as above. This is the like-for-like
  comparison with a DP-SGD classifier pretrained on the same public data; the public data alone is
  reported beside it. The paper's protocol has no public data.
- **Classifier FD**: the Frechet distance between Gaussian fits of the synthetic and the real
  *training* images in the 128-d penultimate features of a reference CNN trained on the real training
  split (the paper computes FID against training-split statistics). It is not FID and is labelled
  "classifier FD". The reference network is cached under ``~/.cache/dpdm/reference`` (or
  ``cache_dir``), keyed by dataset name and a digest of the training data. That cache is as private as
  the data (a network trained without privacy on it, and a fingerprint of it in the file name): the
  report says only whether the network came from the cache (``"cached"``), never its path. The FD
  between the real test split and the real training split is reported beside it as a floor. The FD of
  Gaussian fits grows as the set shrinks (roughly by tr(S)/n: 24.8 at n=20 against 0.28 at n=1000 for
  real held-out MNIST digits), so FD values compare only at equal n: the floor is measured on a seeded
  subsample of the test split of the samples' size when the samples are fewer (on the whole split
  otherwise), and both n are reported (``"n"``, ``"real_test_n"``).
- **Classifier precision / recall** (Kynkaenniemi et al. 2019, k = 3) in the same features: the
  share of synthetic images inside the real images' k-NN balls (fidelity) and the share of real
  training images inside the synthetic images' balls (coverage). Both sets are subsampled to the
  same size first, as the k-NN radii depend on it. Recall does not reveal a set collapsed onto few
  classes: k-NN balls are outlier-sensitive, so the sparse samples of the rare classes get large balls, and
  one measurement gave a set that is 77% one class a higher recall (0.25) than a balanced one (0.14). The FD
  and the samples' label counts (``"samples_label_counts"``, `label_counts_problem`) show it.
- **Inception FID**: only with a local torchvision ``inception_v3`` state-dict file (never
  downloaded), loaded with ``torch.load(weights_only=True)``; 2048-d pool features of images resized
  to 299x299 (grayscale repeated to 3 channels). torchvision's Inception differs from the TF-Inception
  of standard FID, so values are comparable with each other, not with published FIDs.

The classifier FD, precision / recall, the reference CNN's accuracies and the Inception FID are
computed **without privacy** from the private training split: they are outside the DP guarantee,
and the report lists them under ``"non_private_statistics_of_the_training_data"``. The downstream
accuracies use only the (DP) samples and the held-out real test split.

The test split must be held out: one with another class count, or with half or more of its images in the
training split, is refused (`check_test_data`, the DP-SGD baseline's rule). The report counts the test
images and the samples that are training images (``"test_images_in_train"``, ``"samples_in_train"``,
both computed without privacy): samples that are training images make every metric describe the
training data, not a generator. So do near-copies of them (``"samples_near_train"``, `samples_near_train`:
shifted by a pixel, mirrored, brightened, noised or re-encoded; computed without privacy), which the exact count
misses; the real test images' own count of them is their floor (``"test_images_near_train"``: distinct images of
upsampled low-resolution data can be this alike), and only a count clearly above it tells of copying
(`near_copies_above_floor`). It counts the samples that are test images too (``"samples_in_test"``): the
classifiers train on them, so half or more of the test images among the samples, as copies or near-copies, is
refused when the accuracies are computed (`check_samples_held_out`); fewer near-copies are counted
(``"test_images_near_samples"``) for a warning when clearly more than of as many training images.

What needs labels is skipped, with its reason under ``"skipped"``, when they are missing: the
accuracies need labelled samples and a labelled test split; the reference CNN (classifier FD,
precision / recall) needs a labelled training split. Inception FID needs no labels, nor do the counts of
samples that are training images or near-copies of one: on unlabelled data without Inception weights they are
all there is (h124 F1). Unlabelled samples are an npz without ``y`` (what `dpdm sample` writes for an
unconditional model).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import os
import re
import stat
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpdm.checkpoint import TORCH_LOAD_ERRORS, damaged_record, load_error_reason
from dpdm.classifiers import CNN, CNN_MIN_SIDE, build_classifier
from dpdm.datasets import (NEAR_COPY_MIN_SIDE, DataError, ImageData, class_names_problem, empty_classes,
                           label_numbers, near_copies, near_copy_problem, shared_images)

__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_PUBLIC_EPOCHS",
    "MIN_SAMPLES",
    "NON_PRIVATE_KEY",
    "REFERENCE_EPOCHS",
    "accuracy",
    "check_public_data",
    "check_samples_held_out",
    "check_shift",
    "check_test_data",
    "classifier_fd",
    "classifier_precision_recall",
    "cnn_size_problem",
    "default_cache_dir",
    "downstream_accuracy",
    "evaluate_samples",
    "feature_stats",
    "fit_classifier",
    "frechet_distance",
    "inception_fid",
    "label_counts_problem",
    "load_inception",
    "near_copies_above_floor",
    "precision_recall",
    "pretrain_on_public",
    "random_shift",
    "reference_classifier",
    "samples_classes_problem",
    "samples_fit_problem",
    "samples_near_train",
    "skipped_metrics",
]

DEFAULT_EPOCHS = {"logreg": 30, "mlp": 30, "cnn": 15}  # paper: 50 each
REFERENCE_EPOCHS = 20
DEFAULT_PUBLIC_EPOCHS = 20  # non-private epochs on public data before the synthetic (or DP-SGD) ones
# Bump when the reference training recipe or its record changes (2: `_weights_sha256` covers the record's figures;
# a new key, so that an older dpdm sharing the cache does not retrain the entries this one writes, and back).
_REFERENCE_VERSION = 2
_FEATURES = "penultimate (128-d) of a CNN trained on the real training split"
# Precision / recall's k-NN balls (k = 3) need k + 2 images in each set; the Frechet distance needs 2.
MIN_SAMPLES = 5
# The report's list of the values computed without privacy from the private training split.
NON_PRIVATE_KEY = "non_private_statistics_of_the_training_data"
# The samples' near-copies of training images tell of copying when a one-sided binomial test puts their count
# above the real test images' rate at this level (`near_copies_above_floor`).
NEAR_COPY_ALPHA = 1e-3
# The test images searched for near-copies among the samples (`check_samples_held_out`): a seeded subsample of a larger
# test split, and as many training images for the samples' rate of near-copies of real images they need not hold.
HELD_OUT_SEARCH_IMAGES = 1000
# The most bytes a cached reference CNN's record (.json) may hold: its four figures take about 150.
_REFERENCE_RECORD_LIMIT = 4096
# A temporary file of `_atomic_write` this old (seconds) is a killed run's leftover: a write takes under a second.
_STALE_TEMP_SECONDS = 3600
_TEMP_NAME = re.compile(r"\..+\.(pt|json)\.\d+\.tmp")

Progress = Callable[[str], None]


def default_cache_dir() -> Path:
    """$DPDM_CACHE, or ~/.cache/dpdm where it is unset or empty: ``DPDM_CACHE=`` is how a script unsets it, and
    taken as a path it would put the private reference CNN in the current folder."""
    return Path(os.environ.get("DPDM_CACHE") or "~/.cache/dpdm").expanduser()


def cache_folder_problem(cache_dir: str | os.PathLike | None = None, *,
                         read_only_ok: bool = False) -> tuple[Path, str | None]:
    """The reference-CNN cache folder (`cache_dir`, else `default_cache_dir`) and why its reference/ folder can
    neither be used nor created, or None: checked before any training (`dpdm eval`, `dpdm demo`). Creates nothing.

    `read_only_ok`: a reference/ folder that exists but takes no new files (a prebuilt cache mounted read-only) is
    no problem: its entries are read, and one that cannot be written there is warned of (`reference_classifier`).
    """
    from dpdm.report_utils import output_parent_problem

    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    reference = folder / "reference"
    # Read-only is fine; one this user cannot read or enter (another user's 0700 folder in a shared DPDM_CACHE) is
    # not: it was a runtime failure after the downstream classifiers had trained, naming an entry (h104 F1).
    if read_only_ok and reference.is_dir() and os.access(reference, os.R_OK | os.X_OK):
        return folder, None
    return folder, output_parent_problem(folder / "reference" / "reference.pt")


# --- training ------------------------------------------------------------------------------------

@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000,
             device: str | torch.device = "cpu") -> float:
    """Fraction of correctly classified examples (model put in eval mode)."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == y[i:i + batch_size]).sum())
    return correct / max(len(x), 1)


def check_shift(shift: int, size: tuple[int, ...], name: str = "shift") -> None:
    """Raises ValueError unless `shift` is an integer in [0, min(H, W)) for images of `size` (H, W): a larger
    one translates images out of their frame (replicated borders only), and pads each batch to (H + 2 shift)^2,
    so a typo (3000 for 30) ran out of memory rather than failing."""
    if int(shift) != shift or shift < 0:
        raise ValueError(f"{name}={shift!r} must be a non-negative integer")
    if shift >= min(size):
        raise ValueError(f"{name}={shift!r} must be smaller than the images' sides ({'x'.join(map(str, size))})")


def random_shift(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of `x` [B, C, H, W] translated by its own random (dy, dx) in [-shift, shift]^2.

    The border is replicated into the uncovered pixels (MNIST's background, whatever its value).
    Offsets come from `generator` (CPU), so a seeded run is reproducible.
    """
    check_shift(shift, x.shape[-2:])
    if shift == 0:
        return x
    b, _, h, w = x.shape
    dy, dx = torch.randint(0, 2 * shift + 1, (2, b), generator=generator).to(x.device)
    padded = nn.functional.pad(x, (shift, shift, shift, shift), mode="replicate")
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]   # [B, H, 1]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]   # [B, 1, W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()  # [B, H, W, C] -> [B, C, H, W]


def fit_classifier(model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor,
                   val_x: torch.Tensor, val_y: torch.Tensor, *, epochs: int, lr: float = 3e-4,
                   batch_size: int = 128, seed: int = 0, device: str | torch.device = "cpu",
                   shift: int = 0) -> tuple[int, float]:
    """Trains with Adam and cross-entropy; leaves `model` at the epoch of best validation accuracy.

    `shift` > 0 translates each training image by a random offset of up to that many pixels, anew
    each epoch (`random_shift`); validation images are not augmented.

    Returns:
      (best_epoch (1-based), best validation accuracy).
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be >= 1")
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    best_epoch, best_acc, best_state = 0, -1.0, None
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(train_x), generator=gen).split(batch_size):
            x = random_shift(train_x[idx].to(device), shift, gen)
            loss = nn.functional.cross_entropy(model(x), train_y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = accuracy(model, val_x, val_y, device=device)
        if acc > best_acc:
            best_epoch, best_acc, best_state = epoch, acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return best_epoch, best_acc


def pretrain_on_public(model: nn.Module, public: ImageData, *, epochs: int = DEFAULT_PUBLIC_EPOCHS,
                       seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """Plain (non-private) training on labelled public data: Adam 1e-3, batch 128, shuffled each epoch.

    Returns:
      {"dataset", "epochs"}.
    """
    if public.y is None:
        raise DataError(f"public data {public.name!r} has no labels")
    if int(epochs) != epochs or epochs < 1:
        raise ValueError(f"public_epochs={epochs!r} must be a positive integer")
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 2)
    x, y = public.x.to(device), public.y.to(device)
    model.train()
    for _ in range(int(epochs)):
        order = torch.randperm(len(public), generator=gen).to(device)
        for start in range(0, len(public), 128):
            idx = order[start:start + 128]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return {"dataset": public.name, "epochs": int(epochs)}


def check_public_data(public: ImageData, real: ImageData, *others: ImageData | None) -> None:
    """Raises DataError unless `public` is labelled, has `real`'s image shape and classes (by name where both name
    them; those of the first labelled of `others` where `real` has no labels), shares no image with `real` or
    `others` (`datasets.shared_images`) and holds fewer than max(1, 0.1% of its images) near-copies of theirs
    (`datasets.near_copies`: shifted by a pixel, mirrored, brightened, noised or re-encoded; images under 16
    pixels a side are compared exactly only). Whatever its name, a copy of the
    real images is not public, and pretraining on held-out images would inflate their test accuracy; the
    allowance (`datasets.near_copy_limit`) absorbs chance matches between distinct images of a large set."""
    # Unlabelled private training data has no classes (0): the public data's are those of a labelled test split
    labelled = real if real.y is not None else next((o for o in others if o is not None and o.y is not None), real)
    if public.y is None or public.image_shape != real.image_shape or public.num_classes != labelled.num_classes:
        raise DataError(f"public data {public.name!r} must be labelled, of shape "
                        f"{'x'.join(map(str, real.image_shape))} and {labelled.num_classes} classes, like "
                        f"{labelled.name!r}")
    problem = class_names_problem(public, labelled)
    if problem:
        raise DataError(problem)
    reals = (real, *(o for o in others if o is not None))
    for other in reals:
        shared = shared_images(public, other)
        if shared:
            raise DataError(f"public data {public.name!r} holds {shared} of the {len(other)} images of "
                            f"{other.name!r}; pretraining must use other, public data")
    for other in reals:   # after the exact check of all: it costs seconds, not milliseconds
        problem = near_copy_problem(public, other, of=f"images of {other.name!r}",
                                    original=f"image {{}} of {other.name!r}")
        if problem:
            raise DataError(f"public data {public.name!r} {problem}; pretraining must use other, public data")


def match_test_classes(real_train: ImageData, real_test: ImageData) -> ImageData:
    """`real_test` with its labels numbered, and counted, as `real_train`'s classes.

    A ``folder:`` dataset numbers its classes in the order of their folder names, so a test folder that lacks
    one of the training classes would number the others differently: its ``dog`` images would be labelled
    ``cat``. Where both name their classes, the test labels are renumbered by name. Data without class names
    (``npz:``, the built-in datasets) is matched by label number, and takes the training data's class count
    (a test split without the last class infers one class fewer, and the samples' labels reach that class).
    Where only one side names its classes, the names must be label numbers (folders ``0``, ``1``, ...), and are
    matched as those numbers: a folder's ``10`` sorts before its ``2``, and one without ``3`` numbers its ``4``
    3, so matching its positions mislabelled the test images without a word. Labels of unnamed test data beyond
    the training classes are left for `check_test_data` to refuse.

    Raises:
      DataError: the test data names a class the training data has not, or one side names its classes
        otherwise than by label number and the other does not name them.
    """
    if real_train.y is None or real_test.y is None:
        return real_test
    train_names, test_names = real_train.class_names, real_test.class_names
    if train_names is not None and test_names is not None and test_names != train_names:
        unknown = [n for n in test_names if n not in train_names]
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise DataError(f"test data {real_test.name!r} has class {unknown[0]!r}{more}, which training data "
                            f"{real_train.name!r} has not; they must share their classes")
        index = torch.tensor([train_names.index(n) for n in test_names], dtype=torch.int64)
        return ImageData(real_test.x, index[real_test.y], real_train.num_classes, real_test.name,
                         class_names=train_names)
    if (train_names is None) != (test_names is None):
        return _match_by_number(real_train, real_test)
    if real_test.num_classes == real_train.num_classes or \
            (len(real_test.y) and int(real_test.y.max()) >= real_train.num_classes):
        return real_test
    return ImageData(real_test.x, real_test.y, real_train.num_classes, real_test.name,
                     class_names=real_train.class_names)


def _match_by_number(real_train: ImageData, real_test: ImageData) -> ImageData:
    """`match_test_classes` where exactly one side names its classes: the names, read as label numbers, map the
    named side's sorted-name positions to the other side's labels."""
    named, other = (real_test, real_train) if real_test.class_names is not None else (real_train, real_test)
    numbers = label_numbers(named.class_names)
    if numbers is None:
        shown = ", ".join(named.class_names[:5]) + (", ..." if len(named.class_names) > 5 else "")
        raise DataError(f"{'test' if named is real_test else 'training'} data {named.name!r} names its classes "
                        f"({shown}) but {'test' if other is real_test else 'training'} data {other.name!r} numbers "
                        "them, so the labels cannot be matched; name the class folders by label number (0, 1, ...)")
    if named is real_test:   # test position i is class folder numbers[i] of the training labels
        beyond = [n for n, v in zip(real_test.class_names, numbers) if v >= real_train.num_classes]
        if beyond:
            more = f" (and {len(beyond) - 1} more)" if len(beyond) > 1 else ""
            raise DataError(f"test data {real_test.name!r} has class {beyond[0]!r}{more}, which training data "
                            f"{real_train.name!r} has not (labels 0 to {real_train.num_classes - 1}); they must "
                            "share their classes")
        index = torch.tensor(numbers, dtype=torch.int64)
        return ImageData(real_test.x, index[real_test.y], real_train.num_classes, real_test.name)
    position = {v: i for i, v in enumerate(numbers)}   # training label number -> its sorted-name position
    labels = sorted(set(real_test.y.tolist()))
    missing = [v for v in labels if v not in position]
    if missing:
        raise DataError(f"test data {real_test.name!r} has label {missing[0]}, which training data "
                        f"{real_train.name!r} has no class folder for; they must share their classes")
    index = torch.zeros(max(labels, default=0) + 1, dtype=torch.int64)
    for v in labels:
        index[v] = position[v]
    return ImageData(real_test.x, index[real_test.y], real_train.num_classes, real_test.name,
                     class_names=real_train.class_names)


def check_test_data(real_train: ImageData, real_test: ImageData) -> int:
    """How many images of `real_test` are also images of `real_train` (`datasets.shared_images`).

    The same rule as the DP-SGD baseline's: a few duplicates across splits (public benchmarks have some) are
    counted, half or more of the test images is no held-out test set. The count is computed without privacy
    from the training images: a report lists it under `NON_PRIVATE_KEY`.

    Raises:
      DataError: a test label outside the training split's classes, half or more of the test images of classes
        the training split has no image of, or half or more of the test images are training images.
    """
    # A test split may lack a class (its inferred count is then smaller), but never hold one the training
    # split has not.
    if real_train.y is not None and real_test.y is not None and len(real_test) and \
            (top := int(real_test.y.max())) >= real_train.num_classes:
        raise DataError(f"test data {real_test.name!r} has labels up to {top} but training data "
                        f"{real_train.name!r} has {real_train.num_classes} classes; they must share their classes")
    if real_train.y is not None and real_test.y is not None and len(real_test) and len(real_train):
        # Classes the training split has no image of (an npz labelled {3, 7} has 8 classes): a test set that is
        # half or more of them measures nothing (h91 F2: test labels {0, 1} against training labels {3, 7} gave
        # logreg 0.31, accepted without a word). Counted from the training labels: said to their owner only.
        empty = torch.tensor(empty_classes(real_train.y, real_train.num_classes), dtype=torch.int64)
        unseen = int(torch.isin(real_test.y.to(torch.int64), empty).sum())
        if 2 * unseen >= len(real_test):
            raise DataError(f"{unseen} of the {len(real_test)} test images of {real_test.name!r} are of classes that "
                            f"training data {real_train.name!r} has no image of; they must share their classes")
    shared = shared_images(real_test, real_train)
    if len(real_test) and 2 * shared >= len(real_test):
        # Unlabelled data: no accuracy, the test images serve the floors of the FD and of the near-copy count
        what = "the test accuracy" if real_train.y is not None and real_test.y is not None else \
            "what is measured on the test images"
        raise DataError(f"{shared} of the {len(real_test)} test images of {real_test.name!r} are training images of "
                        f"{real_train.name!r}; {what} must come from held-out images")
    return shared


def check_samples_held_out(samples: ImageData, real_test: ImageData, real_train: ImageData | None = None, *,
                           counts: bool = False) -> int | dict:
    """How many of the `samples` are images of `real_test` (`datasets.shared_images`); with `counts`, what the
    search found (`_held_out_counts`), for the report and its warning.

    The downstream classifiers train on the samples: test images among them make the test accuracy partly a
    training accuracy (real held-out images given as samples, for a "real data" figure, scored as high as the
    training split). `check_test_data`'s rule, with the samples as the training data: a few are counted,
    half or more of the test images is no held-out test set.

    Near-copies count towards that half too (`datasets.near_copies`, for images of `NEAR_COPY_MIN_SIDE` pixels a side
    or more): the test images brightened by one grey level passed the exact count, and their MLP scored 0.78
    against 0.72 for training images so disguised (h102 F3). Distinct images of upsampled low-resolution data can be
    this alike, and more so against many samples, so the share of test images with an exact or near copy among the
    samples must also be clearly above that of as many `real_train` images (`near_copies_above_floor`; without
    `real_train`, any share counts). Searched on a seeded subsample of `HELD_OUT_SEARCH_IMAGES` test images (and
    as many training images, where the test images pass half or have a near-copy among the samples):
    len(samples) * 1000 pairs, about 3 s of one CPU core for 10,000 samples of 28x28. `dpdm eval` runs it once
    (`evaluate_samples`'s ``held_out``).

    Raises:
      DataError: half or more of the test images are samples, or have near-copies among them.
    """
    found = _held_out_counts(samples, real_test, real_train)
    return found if counts else found["samples_in_test"]


def _held_out_counts(samples: ImageData, real_test: ImageData, real_train: ImageData | None = None) -> dict:
    """`check_samples_held_out`'s refusal, and what its search found: ``"samples_in_test"`` (the samples that are
    test images, an exact count), ``"test_images_near_samples"`` (of ``"test_images_near_samples_n"`` test images
    searched, those with a near-copy but no exact copy among the samples; both None for images under
    `NEAR_COPY_MIN_SIDE` pixels a side), and their floor, ``"floor"`` of ``"floor_n"`` training images with such a
    near-copy among the samples (None without `real_train`, or where no test image has one: nothing to compare).
    `near_copies_above_floor` of the four tells of test images copied below the half that refuses: the classifiers
    train on them, so their accuracy is not held-out, as for exact copies (h132 F3). The floor is computed without
    privacy from the training images: said to their owner only (`dpdm eval`'s warning), never in a report.

    Raises:
      DataError: as `check_samples_held_out`.
    """
    seen = shared_images(real_test, samples)
    if len(real_test) and 2 * seen >= len(real_test):
        raise DataError(f"{seen} of the {len(real_test)} test images of {real_test.name!r} are among the samples, "
                        "which the classifiers train on; the test accuracy must come from held-out images")
    counts = {"samples_in_test": shared_images(samples, real_test), "test_images_near_samples": None,
              "test_images_near_samples_n": None, "floor": None, "floor_n": None}
    if len(real_test) and min(samples.image_shape[-2:]) >= NEAR_COPY_MIN_SIDE:
        test = _subsample(real_test, HELD_OUT_SEARCH_IMAGES, 0)
        near, near_only = _with_copies_in(test, samples)
        counts["test_images_near_samples"], counts["test_images_near_samples_n"] = near_only, len(test)
        floor = floor_n = None
        if real_train is not None and (2 * near >= len(test) or near_only):   # one search serves both
            train = _subsample(real_train, len(test), 0)
            (floor, counts["floor"]), floor_n = _with_copies_in(train, samples), len(train)
            counts["floor_n"] = floor_n
        if 2 * near >= len(test) and near_copies_above_floor(near, len(test), floor, floor_n):
            searched = "" if len(test) == len(real_test) else f" (a seeded subsample of its {len(real_test)})"
            than = "" if floor is None else f"; {floor} of {floor_n} training images do"
            raise DataError(f"{near} of the {len(test)} test images of {real_test.name!r}{searched} have copies "
                            f"among the samples (shifted by a pixel, mirrored, brightened, noised or re-encoded"
                            f"{than}), which the classifiers train on; the test accuracy must come from held-out "
                            "images")
    return counts


def _with_copies_in(images: ImageData, samples: ImageData) -> tuple[int, int]:
    """How many of `images` have an exact or near copy (`datasets.near_copies`) among the `samples`, and how many
    of them a near-copy but no exact one."""
    digests = set(samples.image_digests)
    exact = torch.tensor([d in digests for d in images.image_digests], dtype=torch.bool)
    near = near_copies(images, samples) >= 0
    return int((near | exact).sum()), int((near & ~exact).sum())


def samples_near_train(samples: ImageData, real_train: ImageData) -> int | None:
    """How many of the `samples` are training images or near-copies of one (`datasets.near_copies`, as
    `check_public_data` looks for them in public data: shifted by a pixel, mirrored, brightened, noised or
    re-encoded), computed without privacy; None for images under `datasets.NEAR_COPY_MIN_SIDE` pixels a side,
    which only the exact count (`datasets.shared_images`) covers.

    A generator that reproduces its training images up to a grey level or some noise leaks them as surely as
    one that copies them byte for byte, and its FD can fall below the real data's floor; the exact count missed
    every such copy. It costs about 5 s of one CPU core for 10,000 samples against mnist5k's 4,000 training
    images (len(samples) * len(real_train) pairs).
    """
    if min(samples.image_shape[-2:]) < NEAR_COPY_MIN_SIDE:
        return None
    train = set(real_train.image_digests)
    exact = torch.tensor([d in train for d in samples.image_digests], dtype=torch.bool)
    return int(((near_copies(samples, real_train) >= 0) | exact).sum())


def near_copies_above_floor(near: int, n: int, floor: int | None, floor_n: int | None, *,
                            alpha: float = NEAR_COPY_ALPHA) -> bool:
    """Whether `near` of `n` samples that are near-copies of training images, but not exact copies, are clearly more
    than real held-out images show: `floor` of `floor_n` test images are such near-copies (``"test_images_near_train"``
    of `evaluate_samples`). A one-sided binomial test, near ~ Bin(n, floor / floor_n), warns when P(X >= near) <
    `alpha`; the floor's rate is taken as it is measured, as the FD's floor is. Without a floor (no test data) or
    with a floor of 0, the data shows no distinct images this alike, and every near-copy counts (the threshold's
    calibration on MNIST: none of its test images passed).

    Distinct images of upsampled low-resolution data can be this alike: digits28 (8x8 digits at 28x28) has 71 of
    898 real images near-copies of the other half's, so 31 of 500 real held-out images given as samples were called
    a generator that leaks its training images (h93 F2).
    """
    if near <= 0 or n <= 0:
        return False
    if not floor or not floor_n:
        return True
    from scipy.stats import binom

    return float(binom.sf(near - 1, n, min(1.0, floor / floor_n))) < alpha


def label_counts_problem(counts: list[int], classes: list[int] | None = None) -> str | None:
    """Why the samples' label counts per class (`counts`) are no balanced synthetic set, or None: a class has
    no sample, or one holds under half or over twice its uniform share n / K by more than chance allows (4
    standard deviations of a uniform draw, sqrt(n / K)). The counts of DP samples cost no privacy, and the
    comparison is with uniform, never with the training data's counts.

    `dpdm sample` draws the classes in turn; a set collapsed onto a few classes trains classifiers that fail
    on the others, yet can score a higher recall than a balanced one (module docstring).

    classes: the classes the real training data has an image of (None: all). Only they are judged, over their
    own samples: an npz labelled {3, 7} has 8 classes, and samples kept to {3, 7} as `dpdm sample` advises were
    said to lack 6 of them (h93 F4). Which classes those are is a fact of the training data: the caller says the
    line to the data's owner only.
    """
    judged = range(len(counts)) if classes is None else sorted(c for c in set(classes) if 0 <= c < len(counts))
    n, k = sum(counts[c] for c in judged), len(judged)
    if k < 2 or n == 0:
        return None
    of = f"the {k} classes" if k == len(counts) else f"the {k} classes with training images"
    absent = [c for c in judged if counts[c] == 0]
    if absent:
        shown = ", ".join(map(str, absent[:10])) + (", ..." if len(absent) > 10 else "")
        many = len(absent) > 1
        return (f"{len(absent)} of {of} {'have' if many else 'has'} no sample "
                f"(class{'es' if many else ''} {shown})")
    share = n / k
    far = [c for c in judged
           if (counts[c] < share / 2 or counts[c] > 2 * share) and abs(counts[c] - share) > 4 * share ** 0.5]
    if not far:
        return None
    c = max(far, key=lambda c: abs(counts[c] - share))
    return (f"the label counts are far from uniform: class {c} holds {counts[c]} of the {n} samples"
            f"{'' if k == len(counts) else ' of ' + of}, against a uniform share of {share:.4g}")


def _split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def downstream_accuracy(samples: ImageData, real_test: ImageData, *, kind: str, epochs: int | None = None,
                        val_fraction: float = 0.1, seed: int = 0, device: str | torch.device = "cpu",
                        public: ImageData | None = None, public_epochs: int = DEFAULT_PUBLIC_EPOCHS,
                        shift: int = 0, public_checked: bool = False) -> dict:
    """The paper's protocol: train on synthetic (90%), select on synthetic (10%), test on real.

    With `public`, the classifier first trains `public_epochs` epochs on that labelled public data
    (`pretrain_on_public`); selection still picks one of the synthetic epochs. `public_checked`: the caller
    has run `check_public_data` on it against `real_test` already (it costs seconds on large sets).

    Returns:
      {"test_accuracy", "synthetic_val_accuracy", "best_epoch", "epochs", "train_size", "seconds"},
      and "public_pretrain" ({"dataset", "epochs", "test_accuracy"}: the real test accuracy after the
      public epochs, before any synthetic one) when `public` is given.
    """
    _check_compatible(samples, real_test)
    if samples.y is None:
        raise DataError(f"{samples.name}: samples have no labels 'y'; downstream accuracy needs them")
    if len(samples) < 2:
        raise DataError(f"{samples.name}: need at least 2 samples, got {len(samples)}")
    if public is not None and not public_checked:
        check_public_data(public, real_test)
    epochs = DEFAULT_EPOCHS[kind] if epochs is None else epochs
    t0 = time.perf_counter()
    train, val = _split(len(samples), val_fraction, seed)
    c, h, w = samples.image_shape
    pretrain = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_classifier(kind, img_channels=c, img_resolution=(h, w),
                                 num_classes=real_test.num_classes)
        if public is not None:
            pretrain = pretrain_on_public(model, public, epochs=public_epochs, seed=seed, device=device)
            pretrain["test_accuracy"] = accuracy(model, real_test.x, real_test.y, device=device)
        best_epoch, val_acc = fit_classifier(
            model, samples.x[train], samples.y[train], samples.x[val], samples.y[val],
            epochs=epochs, seed=seed, device=device, shift=shift)
    return {"test_accuracy": accuracy(model, real_test.x, real_test.y, device=device),
            "synthetic_val_accuracy": val_acc, "best_epoch": best_epoch, "epochs": epochs,
            "train_size": len(train), **({"public_pretrain": pretrain} if pretrain is not None else {}),
            "seconds": round(time.perf_counter() - t0, 2)}


def samples_fit_problem(samples: ImageData, real: ImageData) -> str | None:
    """Why `samples` cannot be measured against `real` (another image shape, labels beyond its classes), or None;
    without the samples' name, which the caller's line gives (`dpdm eval` checks it before any other line)."""
    if samples.image_shape != real.image_shape:
        s, r = ("x".join(map(str, d.image_shape)) for d in (samples, real))
        return f"samples are {s} (CxHxW) but {real.name} images are {r}"
    if samples.y is not None and real.y is not None and len(samples.y) and \
            int(samples.y.max()) >= real.num_classes:
        return f"sample labels reach {int(samples.y.max())} but {real.name} has {real.num_classes} classes"
    return None


def samples_classes_problem(samples: ImageData, real_train: ImageData) -> str | None:
    """Why `samples` of a model with another class count than `real_train`'s (the count the samples file records,
    `dpdm sample` writes its model's) cannot be measured against it, or None; like `samples_fit_problem`, without
    the samples' name. A ``folder:`` dataset numbers its classes in the order of their folder names, so one with a
    class folder more than the model's data measured the samples against other meanings of their labels, exit 0
    (h144 F3, stop 54). A count read off the samples' own labels (``num_classes_inferred``) is not compared."""
    if samples.y is None or real_train.y is None or samples.num_classes_inferred or \
            samples.num_classes == real_train.num_classes:
        return None
    return (f"their model has {samples.num_classes} classes but {real_train.name} has {real_train.num_classes}, so "
            f"their labels would be measured against other classes; evaluate them against the data the model was "
            f"trained on")


def _check_compatible(samples: ImageData, real: ImageData) -> None:
    problem = samples_fit_problem(samples, real)
    if problem:
        raise DataError(f"{samples.name}: {problem}")


# --- classifier FD -------------------------------------------------------------------------------

def _digest(data: ImageData) -> str:
    h = hashlib.sha256()
    h.update(str((data.name, data.image_shape, data.num_classes)).encode())
    h.update(data.x.numpy().tobytes())
    if data.y is not None:
        h.update(data.y.numpy().tobytes())
    return h.hexdigest()


def reference_classifier(real_train: ImageData, *, cache_dir: str | os.PathLike | None = None,
                         epochs: int = REFERENCE_EPOCHS, seed: int = 0,
                         device: str | torch.device = "cpu", progress: Progress | None = None,
                         warn: Progress | None = None) -> tuple[CNN, dict]:
    """The paper's CNN trained on the real training split (90/10 selection), cached on disk.

    An entry is used only if its record holds the sha256 of the full data digest, the record's figures and the
    weight file's bytes (`_weights_sha256`): weights of another network (another dataset's reference of the same
    shape, zeroed or otherwise altered ones) are trained again, not measured with, and so is a record whose
    figures were edited (they are copied into the report as measured). The folder is set to mode 0700 and the
    entries are written 0600.

    The cache only spares the next run this training: an entry that cannot be written (a full disk, a read-only
    folder, a folder in the way) is said in one line to `warn` (else a RuntimeWarning), and the network trained
    is used all the same ("cached" false). A failed `dpdm eval` used to lose every figure at that point (h102 F2).

    Returns:
      (model in eval mode, info dict with "cache" (the file's path, whose name holds a digest of the
      private data: keep it local), "cached", "real_val_accuracy", "best_epoch", "epochs").
    """
    if real_train.y is None:
        raise DataError(f"{real_train.name}: the reference classifier needs labelled training data")
    c, h, w = real_train.image_shape
    digest = _digest(real_train)
    key = f"{_safe(real_train.name)}-{digest[:16]}-e{epochs}-s{seed}-v{_REFERENCE_VERSION}"
    path = _reference_folder(cache_dir) / f"{key}.pt"

    def fresh() -> CNN:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return CNN(c, (h, w), real_train.num_classes)

    model = fresh()
    try:   # an entry this user may not read is no entry (a shared cache): trained again, and its write warned of
        found = path.is_file() and path.with_suffix(".json").is_file()
    except OSError:
        found = False
    if found:
        try:
            # Checked before torch.load, as every checkpoint is (`damaged_record`): torch.load inflates a compressed
            # record in full before the entry's sha256 binding can refuse it, and a prebuilt cache mounted into a
            # container may come from someone else; a 1.5 MB entry took 600 MB (h112 F3). No larger file than a
            # reference CNN of this shape saves is read at all.
            if path.stat().st_size > _reference_file_limit(model):
                raise ValueError("larger than a reference CNN of this shape")
            damaged = damaged_record(path)
            if damaged is not None:
                raise ValueError(damaged)
            weights = path.read_bytes()
            with warnings.catch_warnings():  # a damaged file can make torch warn before it refuses
                warnings.simplefilter("ignore")
                model.load_state_dict(torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True))
            with open(path.with_suffix(".json"), "rb") as f:   # bounded as the weights are: a foreign cache
                record = f.read(_REFERENCE_RECORD_LIMIT + 1)
            if len(record) > _REFERENCE_RECORD_LIMIT:
                raise ValueError("a record larger than the reference's")
            info = json.loads(record)
            _check_reference_entry(model, info, epochs, digest, weights)
            model.to(device).eval()
            info = {k: v for k, v in info.items() if k != "weights_sha256"}   # a fingerprint of the data too
            return model, {**info, "cache": str(path), "cached": True}
        except TORCH_LOAD_ERRORS:
            # A damaged (or foreign, refused by weights_only) cache entry is rebuilt, from a fresh network: a
            # failed load_state_dict may have copied some of its tensors.
            model = fresh()
    if progress:   # the folder only: the file name holds a fingerprint of the private data
        progress(f"training the reference CNN on {real_train.name} ({len(real_train)} images, "
                 f"{_epochs(epochs)}, without privacy); cached under {str(path.parent)!r}")
    train, val = _split(len(real_train), 0.1, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        best_epoch, val_acc = fit_classifier(
            model, real_train.x[train], real_train.y[train], real_train.x[val], real_train.y[val],
            epochs=epochs, seed=seed, device=device)
    info = {"real_val_accuracy": val_acc, "best_epoch": best_epoch, "epochs": epochs}
    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buffer)
    weights = buffer.getvalue()
    record = {**info, "weights_sha256": _weights_sha256(digest, info, weights)}
    try:
        _write_reference_entry(path, weights, json.dumps(record).encode())
    except OSError as e:   # the folder only, as above; the error's own text would name the file
        message = (f"could not cache the reference CNN in {str(path.parent)!r} ({e.strerror or type(e).__name__}); "
                   "it is used for this run only and trained again next time")
        if warn is None:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        else:
            warn(message)
    return model, {**info, "cache": str(path), "cached": False}


def _reference_file_limit(model: nn.Module) -> int:
    """The most bytes a cached reference CNN's weight file may hold: twice its tensors' bytes, plus 1 MiB for what
    torch.save adds (the pickle, the zip's headers and 64-byte alignment; an mnist entry holds 0.97 MB)."""
    return 2 * sum(v.numel() * v.element_size() for v in model.state_dict().values()) + 2**20


def _weights_sha256(data_digest: str, figures: dict, weights: bytes) -> str:
    """Ties a cached reference CNN's weight file and its record's `figures` ("real_val_accuracy", "best_epoch",
    "epochs", as canonical JSON: they round-trip the record exactly) to the data it was trained on (the file name
    holds only a prefix of `data_digest`)."""
    canonical = json.dumps({k: figures[k] for k in ("real_val_accuracy", "best_epoch", "epochs")}, sort_keys=True)
    return hashlib.sha256(data_digest.encode() + b"\n" + canonical.encode() + b"\n" + weights).hexdigest()


def _epochs(n: int) -> str:
    """"1 epoch", "3 epochs": the progress lines' count (userwalk N5, stop 56: "1 epochs")."""
    return f"{n} epoch{'' if n == 1 else 's'}"


def _check_reference_entry(model: nn.Module, info: Any, epochs: int, data_digest: str, weights: bytes) -> None:
    """Raises ValueError unless a cached reference CNN is usable: the weights and figures it recorded
    (`_weights_sha256`, of this data, the record's figures and the file's bytes; zeroed weights reported FD 0 and
    precision/recall 1, an edited accuracy was reported as measured), finite (NaN ones made every later eval fail
    with "Eigenvalues did not converge"), and the figures `reference_classifier` records, of their types (they
    are copied into the report)."""
    if not isinstance(info, dict) or set(info) != {"real_val_accuracy", "best_epoch", "epochs", "weights_sha256"}:
        raise ValueError("not the reference's record")
    if info["weights_sha256"] != _weights_sha256(data_digest, info, weights):
        raise ValueError("weights or figures other than those recorded")
    if not all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point()):
        raise ValueError("weights that are not finite")
    acc, best = info["real_val_accuracy"], info["best_epoch"]
    if not (type(acc) in (int, float) and 0 <= acc <= 1 and type(best) is int and 0 <= best <= epochs
            and info["epochs"] == epochs and type(info["epochs"]) is int):
        raise ValueError("figures out of range")


def _reference_folder(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir/reference`` (default: `default_cache_dir`), created if missing.

    Raises:
      ValueError: the folder cannot be created (a file in its way, a read-only or virtual file system).
    """
    folder = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "reference"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)   # 0700: a CNN trained on the private data
    except OSError as e:
        raise ValueError(f"cannot create the cache folder {str(folder)!r} ({' '.join(str(e).split())})") from None
    try:   # a folder made beforehand (an older dpdm, a shared DPDM_CACHE) becomes private too, as run folders do;
        # the owner's own bits stay as they are: a folder made read-only (0500) is used as it is (h104 F2)
        mode = stat.S_IMODE(folder.stat().st_mode)
        if mode & 0o077:
            os.chmod(folder, mode & 0o700)
    except OSError:
        pass
    return folder


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:40]


def _write_reference_entry(path: Path, weights: bytes, record: bytes) -> None:
    """Writes a reference CNN's weight file `path` and its record (the .json beside it), after removing the
    leftovers of killed runs (`_remove_stale_temp_files`). Where the record cannot be written, the weights go too.

    Raises:
      OSError: from the file system.
    """
    _remove_stale_temp_files(path.parent)
    _atomic_write(path, lambda f: f.write(weights))
    try:
        _atomic_write(path.with_suffix(".json"), lambda f: f.write(record))
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()   # weights without their record would be trained again anyway
        raise


def _remove_stale_temp_files(folder: Path) -> None:
    """Removes the temporary files of `_atomic_write` in `folder` older than `_STALE_TEMP_SECONDS`: a run killed
    while writing leaves one, named with its pid, that no later run replaces, and each is a partial copy of a
    network trained without privacy on the private data. Best effort: what cannot be removed stays."""
    from dpdm.report_utils import stale_entries

    for path, st in stale_entries(folder, _TEMP_NAME, _STALE_TEMP_SECONDS):
        if stat.S_ISREG(st.st_mode):
            with contextlib.suppress(OSError):
                os.unlink(path)


def _atomic_write(path: Path, write: Callable) -> None:
    """Writes `path` through a temporary file of mode 0600 (the entries are as private as the data), removed
    where the write fails.

    Raises:
      OSError: from the file system.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)   # a leftover of a killed run keeps its mode; O_EXCL makes a new one
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


@torch.no_grad()
def _features(extract: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *,
              batch_size: int = 500, device: str | torch.device = "cpu") -> np.ndarray:
    out = [extract(x[i:i + batch_size].to(device)).double().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def _reference_features(reference: CNN, *datasets: ImageData, device: str | torch.device = "cpu") -> list[np.ndarray]:
    """The reference CNN's penultimate features of each dataset."""
    reference.eval()
    return [_features(reference.features, d.x, device=device) for d in datasets]


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rowvar=False) of [N, D] features."""
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features.shape={features.shape} must be [N >= 2, D]")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Dowson and Landau 1982; Heusel et al. 2017)."""
    diff = mu1 - mu2
    # Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)): a symmetric PSD form, computed with eigh,
    # which stays exact for the singular covariances that ReLU features produce.
    w1, v1 = np.linalg.eigh(sigma1)
    s1_half = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    m = s1_half @ sigma2 @ s1_half
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean, 0.0))


def _subsample(data: ImageData, n: int, seed: int) -> ImageData:
    """`data` itself if it holds at most `n` images, else `n` of them drawn without replacement (seeded)."""
    if len(data) <= n:
        return data
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    return dataclasses.replace(data, x=data.x[idx], y=None if data.y is None else data.y[idx])


def classifier_fd(samples: ImageData, real: ImageData, reference: CNN, *,
                  device: str | torch.device = "cpu") -> float:
    """Frechet distance between `samples` and `real` in the reference CNN's penultimate features."""
    _check_compatible(samples, real)
    f1, f2 = _reference_features(reference, samples, real, device=device)
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


def _kth_nn_radius(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    out = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)       # the 0 to itself comes first
    return torch.cat(out)


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                     chunk: int = 1024) -> torch.Tensor:
    out = []
    for i in range(0, len(points), chunk):
        out.append((torch.cdist(points[i:i + chunk], centres) <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, *, k: int = 3,
                     seed: int = 0) -> dict:
    """Improved precision and recall (Kynkaenniemi et al. 2019) of [N, D] feature sets.

    Both sets are first subsampled (without replacement, seeded) to the smaller one's size.
    Returns {"precision", "recall", "k", "n"}.
    """
    n = min(len(real_features), len(fake_features))
    if n < k + 2:
        raise ValueError(f"need more than k + 1 = {k + 1} features in each set, got {n}")
    g = torch.Generator().manual_seed(seed)
    real = torch.as_tensor(real_features, dtype=torch.float64)
    fake = torch.as_tensor(fake_features, dtype=torch.float64)
    real = real[torch.randperm(len(real), generator=g)[:n]]
    fake = fake[torch.randperm(len(fake), generator=g)[:n]]
    precision = _inside_any_ball(fake, real, _kth_nn_radius(real, k)).double().mean()
    recall = _inside_any_ball(real, fake, _kth_nn_radius(fake, k)).double().mean()
    return {"precision": float(precision), "recall": float(recall), "k": k, "n": n}


def classifier_precision_recall(samples: ImageData, real: ImageData, reference: CNN, *, k: int = 3,
                                seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """`precision_recall` of `samples` against `real` in the reference CNN's penultimate features."""
    _check_compatible(samples, real)
    f1, f2 = _reference_features(reference, samples, real, device=device)
    return {**precision_recall(f2, f1, k=k, seed=seed), "features": _FEATURES}


# --- Inception FID -------------------------------------------------------------------------------

def load_inception(weights: str | os.PathLike) -> nn.Module:
    """torchvision inception_v3 from a local state-dict file, fc removed (2048-d pool features).

    Raises:
      ValueError: missing file, not an inception_v3 state dict, or non-finite weights (NaN or inf ones made the
        FID fail at the very end, with "Eigenvalues did not converge").
    """
    from torchvision.models import inception_v3

    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(f"--inception-weights={str(weights)!r} must be an existing file")
    damaged = damaged_record(path)   # torch.load checks no CRC: a flipped bit would load as another weight
    if damaged is not None:
        raise ValueError(f"--inception-weights={str(weights)!r} is corrupt or truncated: {damaged}")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols; they are refused anyway
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as e:  # all of them mean "refused"
        raise ValueError(f"--inception-weights={str(weights)!r} cannot be loaded with "
                         f"weights_only=True: {load_error_reason(e)}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"--inception-weights={str(weights)!r} must hold a state dict of tensors")
    bad = sum(1 for v in state.values() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(f"--inception-weights={str(weights)!r} holds non-finite weights (NaN or inf, in {bad} "
                         f"tensor{'s' if bad > 1 else ''})")
    aux = any(k.startswith("AuxLogits.") for k in state)
    net = inception_v3(weights=None, aux_logits=aux, init_weights=False, transform_input=False)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"--inception-weights={str(weights)!r} is not a torchvision inception_v3 "
                         f"state dict ({' '.join(str(e).split())[:200]})") from None
    net.fc = nn.Identity()
    return net.eval()


def _inception_input(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> [B, 3, 299, 299] in [-1, 1] (what transform_input produces internally)."""
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)


def inception_fid(samples: ImageData, real: ImageData, inception: nn.Module, *,
                  batch_size: int = 100, device: str | torch.device = "cpu") -> float:
    """FID in the pool features of a (torchvision) Inception-v3."""
    _check_compatible(samples, real)
    inception.to(device).eval()

    def extract(x: torch.Tensor) -> torch.Tensor:
        return inception(_inception_input(x))

    f1 = _features(extract, samples.x, batch_size=batch_size, device=device)
    f2 = _features(extract, real.x, batch_size=batch_size, device=device)
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


# --- everything at once --------------------------------------------------------------------------

def skipped_metrics(samples: ImageData, real_train: ImageData, real_test: ImageData | None,
                    classifiers: tuple[str, ...]) -> dict[str, str]:
    """What `evaluate_samples` leaves out for want of labels or held-out data: {metric: reason}."""
    skipped = {}
    if classifiers:
        if samples.y is None:
            skipped["classifiers"] = f"the samples {samples.name} have no labels 'y'"
        elif real_test is None:
            skipped["classifiers"] = "there is no real held-out test data"
        elif real_test.y is None:
            skipped["classifiers"] = f"the real test data {real_test.name} has no labels"
    if real_train.y is None:
        why = f"the real training data {real_train.name} has no labels, which the reference CNN needs"
        skipped["classifier_fd"] = skipped["classifier_precision_recall"] = why
    return skipped


def cnn_size_problem(image_shape: tuple[int, ...], skipped: dict[str, str], classifiers: tuple[str, ...]) -> str | None:
    """Why images of `image_shape` (C, H, W) are too small for the CNNs `evaluate_samples` would train (the
    reference CNN unless `skipped` names the classifier FD, the downstream "cnn" unless it names the
    classifiers), or None."""
    h, w = image_shape[-2:]
    if min(h, w) >= CNN_MIN_SIDE:
        return None
    uses = (["the reference CNN of the classifier FD and precision/recall"] if "classifier_fd" not in skipped else []) \
        + (["the downstream classifier 'cnn'"] if "cnn" in classifiers and "classifiers" not in skipped else [])
    if not uses:
        return None
    return (f"the images are {h}x{w} pixels, and {' and '.join(uses)} need{'s' if len(uses) == 1 else ''} at "
            f"least {CNN_MIN_SIDE}x{CNN_MIN_SIDE}")


def evaluate_samples(samples: ImageData, real_train: ImageData, real_test: ImageData | None, *,
                     classifiers: tuple[str, ...] = ("logreg", "mlp", "cnn"),
                     epochs: dict[str, int] | int | None = None,
                     cache_dir: str | os.PathLike | None = None,
                     reference_epochs: int = REFERENCE_EPOCHS,
                     inception_weights: str | os.PathLike | None = None, seed: int = 0,
                     device: str | torch.device = "cpu", progress: Progress | None = None,
                     public: ImageData | None = None, public_epochs: int = DEFAULT_PUBLIC_EPOCHS,
                     shift: int = 0, inception: nn.Module | None = None, public_checked: bool = False,
                     samples_checked: bool = False, held_out: dict | None = None,
                     warn: Progress | None = None) -> dict:
    """Downstream accuracies, classifier FD and (optionally) Inception FID of `samples`.

    Args:
      samples: the synthetic images (labels needed for the accuracies), at least `MIN_SAMPLES`.
      real_train: the real training split (reference CNN and FD statistics; labels needed for the
        reference CNN, hence the classifier FD and precision / recall).
      real_test: the real held-out split (accuracies); None skips the accuracies.
      epochs: per-classifier epochs (dict), one number for all, or None for `DEFAULT_EPOCHS`.
      public: labelled PUBLIC data every downstream classifier first trains on (`pretrain_on_public`);
        checked with `check_public_data` unless `public_checked` (the caller did). None: the paper's
        protocol. Unused (and reported None) when no accuracy is computed.
      shift: train the downstream classifiers on randomly translated samples (up to `shift` pixels,
        `random_shift`); 0: the paper's protocol.
      inception: an Inception network already loaded with `load_inception`, instead of `inception_weights`.
      samples_checked: the caller has run `check_samples_held_out` (its near-copy search costs seconds); the
        report's near-copy count of test images is then None.
      held_out: what `check_samples_held_out` (``counts=True``) returned to the caller, who has run it (`dpdm eval`,
        before any training): the report takes its counts, and the search is not run again.
      warn: where a warning goes (one line): the reference CNN that could not be cached (`reference_classifier`).

    Returns:
      A JSON-serializable dict (see `cli/eval.py` for the printed form). "dataset" and "test_dataset" name the
      training and the held-out data (None without `real_test`), "seed" is `seed`. What could not be computed
      is None (the accuracies: an empty "classifiers") with its reason under "skipped"
      (`skipped_metrics`); `NON_PRIVATE_KEY` lists the values computed without privacy from
      `real_train`. The reference CNN's cache path is not in it (its name fingerprints the data).
      "test_images_in_train" (`check_test_data`; None without `real_test`) and "samples_in_train" count
      the test images and the samples that are also training images (`datasets.shared_images`): samples
      that are training images make the metrics measure the training data, not a generator.
      "samples_near_train" counts those and the near-copies of training images (`samples_near_train`; None for
      images under 16 pixels a side). Its floor, "test_images_near_train", counts the near-copies of training images
      that are not exact copies among "test_images_near_train_n" test images (the FD floor's subsample; None
      without `real_test` or near-copy search): `near_copies_above_floor` compares the two.
      "samples_label_counts": the samples per class (None without labels; `label_counts_problem` says when they
      are far from uniform).
      "samples_in_test" (None without `real_test`) counts the samples that are test images
      (`check_samples_held_out`); "test_images_near_samples", those of "test_images_near_samples_n" test images
      searched that have a near-copy but no exact copy among the samples (`check_samples_held_out`; None where not
      searched: no accuracies, images under 16 pixels a side). "classifier_fd" holds the samples' FD ("value",
      on "n" images) and the floor ("real_test_value", on "real_test_n" test images: min(len(samples),
      len(real_test)), a seeded subsample when fewer than the split; FD values compare only at equal n).

    Raises:
      DataError: samples whose image shape, labels or class count do not fit the dataset, or fewer than
        `MIN_SAMPLES` of them; a test split that is no held-out data (`check_test_data`), or that is half
        or more among the samples, near-copies included, when the accuracies are computed
        (`check_samples_held_out`); images too
        small for a CNN it would train (`cnn_size_problem`).
      ValueError: the reference CNN's cache folder cannot be created, or unusable Inception weights (checked
        before any training).
    """
    _check_compatible(samples, real_train)
    problem = samples_classes_problem(samples, real_train)
    if problem:
        raise DataError(f"{samples.name}: {problem}")
    if real_test is not None:
        real_test = match_test_classes(real_train, real_test)
        _check_compatible(samples, real_test)
    if len(samples) < MIN_SAMPLES:
        raise DataError(f"{samples.name}: holds {len(samples)} images; the evaluation needs at least "
                        f"{MIN_SAMPLES} (precision / recall with k = 3)")
    test_in_train = None if real_test is None else check_test_data(real_train, real_test)
    skipped = skipped_metrics(samples, real_train, real_test, classifiers)
    accuracies = bool(classifiers) and "classifiers" not in skipped
    if real_test is None:
        held_out = {}
    elif held_out is None:
        held_out = check_samples_held_out(samples, real_test, real_train, counts=True) if accuracies and \
            not samples_checked else \
            {"samples_in_test": shared_images(samples, real_test)}
    problem = cnn_size_problem(samples.image_shape, skipped, classifiers)
    if problem:
        raise DataError(f"{samples.name}: {problem}")
    if not accuracies:
        public = None   # nothing trains on it
    if public is not None and not public_checked:
        check_public_data(public, real_train, real_test)
    if inception is None and inception_weights is not None:
        inception = load_inception(inception_weights)
    if isinstance(epochs, int):
        epochs = {k: epochs for k in classifiers}
    epochs = {**DEFAULT_EPOCHS, **(epochs or {})}
    t0 = time.perf_counter()
    check_shift(shift, samples.image_shape[1:])
    if "classifier_fd" not in skipped:
        _reference_folder(cache_dir)   # before any training, not after it
    # The test data named as well as the training data, and the seed every figure depends on (the classifiers'
    # initialisation, the 90/10 split, the reference CNN, the subsamples): a figure is tied to the held-out images
    # it was measured on and can be reproduced (h152 F1).
    report: dict = {"samples": samples.name, "n_samples": len(samples), "dataset": real_train.name,
                    "test_dataset": None if real_test is None else real_test.name, "seed": int(seed),
                    "image_shape": list(samples.image_shape), "real_train_size": len(real_train),
                    "real_test_size": None if real_test is None else len(real_test),
                    "classifiers": {},
                    "public_pretrain": None if public is None else {"dataset": public.name,
                                                                    "epochs": int(public_epochs)},
                    "augment_shift": int(shift), "skipped": skipped,
                    "test_images_in_train": test_in_train, "samples_in_train": shared_images(samples, real_train),
                    "samples_near_train": samples_near_train(samples, real_train),
                    "test_images_near_train": None, "test_images_near_train_n": None,
                    "samples_in_test": held_out.get("samples_in_test"),
                    "test_images_near_samples": held_out.get("test_images_near_samples"),
                    "test_images_near_samples_n": held_out.get("test_images_near_samples_n"),
                    "samples_label_counts": None if samples.y is None else samples.y.bincount(
                        minlength=real_train.num_classes if real_train.y is not None else samples.num_classes
                    ).tolist()}
    non_private = ([] if real_test is None else ["test_images_in_train"]) + ["samples_in_train"] + \
        ([] if report["samples_near_train"] is None else ["samples_near_train"])
    if real_test is not None and report["samples_near_train"] is not None:
        # The floor: real held-out images this alike to training images, on as many test images as there are
        # samples at most (the same subsample as the FD's floor; the search costs no more than the samples' own).
        floor_test = _subsample(real_test, len(samples), seed)
        report["test_images_near_train"] = (samples_near_train(floor_test, real_train) -
                                            shared_images(floor_test, real_train))
        report["test_images_near_train_n"] = len(floor_test)
        non_private.append("test_images_near_train")
    if accuracies:
        for kind in classifiers:
            if progress:
                first = "" if public is None else f"{_epochs(public_epochs)} on public {public.name}, then "
                aug = f", shifted up to {shift} px" if shift else ""
                progress(f"training {kind}: {first}{len(samples)} synthetic images ({_epochs(epochs[kind])}{aug})")
            report["classifiers"][kind] = downstream_accuracy(
                samples, real_test, kind=kind, epochs=epochs[kind], seed=seed, device=device,
                public=public, public_epochs=public_epochs, shift=shift, public_checked=True)
    report["classifier_fd"] = report["classifier_precision_recall"] = None
    if "classifier_fd" not in skipped:
        reference, info = reference_classifier(real_train, cache_dir=cache_dir, epochs=reference_epochs,
                                               seed=seed, device=device, progress=progress, warn=warn)
        info = {k: v for k, v in info.items() if k != "cache"}   # its file name is a digest of the data
        f_samples, f_train = _reference_features(reference, samples, real_train, device=device)  # FD and P/R
        train_stats = feature_stats(f_train)   # the FD's and its floor's (the training split's features, once)
        fd = {"value": frechet_distance(*feature_stats(f_samples), *train_stats),
              "n": len(samples), "features": _FEATURES,
              "reference": info}
        non_private += ["classifier_fd.value", "classifier_fd.reference.real_val_accuracy",
                        "classifier_fd.reference.best_epoch"]   # chosen on 10% of the training split
        if real_test is not None:
            # At the samples' size: measured on more images, the floor would lack the small-n bias the
            # samples' FD carries, and real held-out images would score many times "the floor".
            floor_test = _subsample(real_test, len(samples), seed)
            _check_compatible(floor_test, real_train)
            [f_test] = _reference_features(reference, floor_test, device=device)
            fd["real_test_value"] = frechet_distance(*feature_stats(f_test), *train_stats)
            fd["real_test_n"] = len(floor_test)
            non_private.append("classifier_fd.real_test_value")
        if real_test is not None and real_test.y is not None:
            info["real_test_accuracy"] = accuracy(reference, real_test.x, real_test.y, device=device)
            non_private.append("classifier_fd.reference.real_test_accuracy")
        report["classifier_fd"] = fd
        report["classifier_precision_recall"] = {**precision_recall(f_train, f_samples, seed=seed),
                                                 "features": _FEATURES}
        non_private.append("classifier_precision_recall")
    report["inception_fid"] = None
    if inception is not None:
        if progress:
            progress("computing Inception features (299x299)")
        report["inception_fid"] = inception_fid(samples, real_train, inception, device=device)
        non_private.append("inception_fid")
    report[NON_PRIVATE_KEY] = non_private
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report
