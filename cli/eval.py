"""`dpdm eval`: quality of synthetic images, as the paper measures it (dpdm/evaluate.py)."""
from __future__ import annotations

import os

import click

from cli._common import DatasetName, PathOption, check_augment_shift, emit_json, info, resolve_device, warn
from cli.errors import BadInput
from dpdm.report_utils import epsilon_text

_KINDS = ("logreg", "mlp", "cnn")
_MAX_SEED = 2**63 - 3   # seeds up to seed + 2 feed torch generators (public pretraining uses seed + 2)


@click.command("eval")
# Inputs.
@click.option("--samples", "samples_path", required=True, type=PathOption(dir_okay=False),
              help="samples.npz from `dpdm sample` (x uint8 N x C x H x W, y).")
@click.option("--dataset", type=DatasetName(), required=True,
              help="The real dataset: its train split feeds the reference CNN and FD, its test split the accuracies.")
@click.option("--test-dataset", type=DatasetName(), default=None,
              help="Held-out real images (npz:PATH or folder:PATH); required for path datasets and digits.")
@click.option("--data-root", default=None, type=PathOption(file_okay=False),
              help="Where torchvision datasets live (default $DPDM_DATA, else ~/.cache/dpdm/data; README: Your own data).")
@click.option("--download", is_flag=True, help="Allow downloading a torchvision dataset (needs a network).")
# Metrics.
@click.option("--classifiers", default="logreg,mlp,cnn", show_default=True,
              help="Comma-separated downstream classifiers (logreg, mlp, cnn); empty for none.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Epochs for every classifier [default: logreg 30, mlp 30, cnn 15; the paper: 50].")
@click.option("--public-pretrain", "public_name", type=DatasetName(), default=None,
              help="First train every classifier without privacy on this PUBLIC dataset (e.g. digits28-aug), "
                   "then on the samples: the like-for-like comparison with `dpdm baseline dp-classifier "
                   "--public-pretrain` (not the paper's protocol, which has no public data).")
@click.option("--public-epochs", type=click.IntRange(min=1), default=20, show_default=True,
              help="Non-private epochs on --public-pretrain (dpdm.evaluate.DEFAULT_PUBLIC_EPOCHS).")
@click.option("--augment-shift", type=click.IntRange(min=0), default=0, show_default=True, metavar="PIXELS",
              help="Train the classifiers on samples randomly translated by up to PIXELS (each image, each epoch); "
                   "0 is the paper's protocol. Compare with `dpdm baseline dp-classifier --augment-shift`.")
@click.option("--inception-weights", type=PathOption(dir_okay=False), default=None,
              help="Local torchvision inception_v3 state dict: adds Inception FID (never downloaded).")
@click.option("--reference-epochs", type=click.IntRange(min=1), default=None,
              help="Epochs of the reference CNN behind the classifier FD [default: 20]; part of its cache key.")
@click.option("--cache-dir", type=PathOption(file_okay=False), default=None,
              help="Where the reference CNN is cached [default: $DPDM_CACHE, else ~/.cache/dpdm]. Keep it private: "
                   "the CNN is trained without privacy on the real training data, and its file name fingerprints "
                   "that data.")
# Performance.
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--seed", type=click.IntRange(0, _MAX_SEED), default=0, show_default=True,
              help="Seeds the classifiers, splits and subsampling (0 <= seed <= 2**63 - 3).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def eval_cmd(samples_path, dataset, test_dataset, data_root, download, classifiers, epochs,
             public_name, public_epochs, augment_shift, inception_weights, reference_epochs, cache_dir, device, seed,
             as_json):
    """Downstream accuracy (train on synthetic, test on real), classifier FD, optional Inception FID.

    \b
    What needs labels is skipped (with a line saying so) when they are missing:
    unlabelled samples (an npz without y, as `dpdm sample` writes for an
    unconditional model) get no accuracies; unlabelled real training data no
    classifier FD or precision/recall. Inception FID needs no labels, nor do
    the counts of samples that are training images or near-copies of one
    (the real test images' count is the floor), which every run reports.
    The classifier FD, precision/recall, reference accuracies and Inception FID
    are computed WITHOUT privacy from the real training data: keep them private.
    The accuracies are measured without privacy on the held-out test images:
    keep them private too where those images are.
    The FD grows as the sample count n shrinks, so FD values compare only at
    equal n: the floor (real test vs real train) is measured on as many test
    images as there are samples (all of them when the samples are more).
    """
    from dpdm.datasets import (DataError, dataset_path, empty_classes, exif_orientation_note, has_test_split,
                               load_dataset, load_npz, same_dataset, shared_images)
    from dpdm.evaluate import (MIN_SAMPLES, REFERENCE_EPOCHS, cache_folder_problem, check_public_data,
                               check_samples_held_out, check_test_data, cnn_size_problem, evaluate_samples,
                               label_counts_problem, load_inception, match_test_classes, near_copies_above_floor,
                               samples_classes_problem, samples_fit_problem, skipped_metrics)

    kinds = tuple(k.strip() for k in classifiers.split(",") if k.strip())
    for k in kinds:
        if k not in _KINDS:
            raise BadInput(f"--classifiers={classifiers!r} must list names from {_KINDS}")
    if inception_weights is not None:
        if not os.path.isfile(inception_weights):
            raise BadInput(f"--inception-weights={inception_weights!r} must be an existing file")
    from cli._common import input_name_problem

    problem = input_name_problem(samples_path)
    if problem:
        raise BadInput(f"--samples={samples_path!r}: {problem}")
    try:
        samples = load_npz(samples_path, name=samples_path)
        provenance = samples_provenance(samples_path)
    except DataError as e:
        raise BadInput(f"--samples={samples_path!r}: {e}") from None
    problem = provenance_problem(provenance)
    if problem:
        raise BadInput(f"--samples={samples_path!r}: {problem}")
    check_augment_shift(augment_shift, samples)
    if len(samples) < MIN_SAMPLES:   # checked before any training, not after it
        raise BadInput(f"--samples={samples_path!r} holds {len(samples)} images; dpdm eval needs at least "
                       f"{MIN_SAMPLES} (precision/recall with k = 3)")
    try:
        real_train = load_dataset(dataset, "train", data_root=data_root, download=download)
    except (ValueError, OSError) as e:  # DataError is a ValueError
        raise BadInput(f"--dataset={dataset!r}: {e}") from None
    if len(real_train) < MIN_SAMPLES:
        raise BadInput(f"--dataset={dataset!r} holds {len(real_train)} images; dpdm eval needs at least {MIN_SAMPLES}")
    # Warned after the refusals below (a refused run prints one line); match_test_classes gives a new ImageData.
    exif_notes = {f"--dataset={dataset!r}": exif_orientation_note(real_train)}
    real_test = None
    if test_dataset is None and not has_test_split(dataset):
        if real_train.y is not None:
            raise BadInput(f"--dataset={dataset!r} has no held-out split; give the real held-out images "
                           f"with --test-dataset npz:PATH or folder:PATH")
        # Unlabelled real data: no reference CNN, so held-out images would serve only the accuracies and the floor of
        # the near-copy count, which the table then says it has not.
    else:
        try:
            real_test = (load_dataset(test_dataset, "test", data_root=data_root, download=download)
                         if test_dataset else load_dataset(dataset, "test", data_root=data_root, download=download))
        except (ValueError, OSError) as e:
            raise BadInput(f"--test-dataset={test_dataset or dataset!r}: {e}") from None
        exif_notes[f"--test-dataset={test_dataset or dataset!r}"] = exif_orientation_note(real_test)
        if len(real_test) < 2:
            raise BadInput(f"--test-dataset={test_dataset or dataset!r} holds {len(real_test)} image; "
                           f"dpdm eval needs at least 2")
        if real_test.image_shape != real_train.image_shape:   # else blamed on --samples, which match --dataset
            raise BadInput(f"--test-dataset={test_dataset or dataset!r} has images of "
                           f"{'x'.join(map(str, real_test.image_shape))} (CxHxW), --dataset={dataset!r} of "
                           f"{'x'.join(map(str, real_train.image_shape))}")
        try:
            real_test = match_test_classes(real_train, real_test)
        except DataError as e:
            raise BadInput(f"--test-dataset={test_dataset or dataset!r}: {e}") from None
    for real in (real_train, real_test):   # evaluate_samples checks it too, after the lines below (h132 F1)
        problem = None if real is None else samples_fit_problem(samples, real)
        if problem:
            raise BadInput(f"--samples={samples_path!r}: {problem}")
    problem = samples_classes_problem(samples, real_train)   # the test data takes real_train's classes (above)
    if problem:
        raise BadInput(f"--samples={samples_path!r}: {problem}")
    skipped = skipped_metrics(samples, real_train, real_test, kinds)
    accuracies = bool(kinds) and "classifiers" not in skipped
    # Nothing else computable (unlabelled real data, no Inception weights) is no refusal: the checks for samples that
    # are training images or near-copies of one need no labels, and they are what a user about to share samples of
    # private images asks first (h124 F1: "nothing to compute", exit 2, before them). The skipped lines say the rest.
    problem = cnn_size_problem(samples.image_shape, skipped, kinds)
    if problem:
        raise BadInput(f"--samples={samples_path!r}: {problem}")
    if "classifier_fd" not in skipped:   # the reference CNN is cached there: checked before any training
        # A read-only folder is used as it is: its entry for this data is read, and a new one that cannot be
        # written there is warned of after the evaluation, which it does not end.
        folder, problem = cache_folder_problem(cache_dir, read_only_ok=True)
        if problem:
            raise BadInput(f"{_cache_source(cache_dir, folder)}: {problem}")
        _check_cache_outside_data(cache_dir, folder, {"--dataset": dataset, "--test-dataset": test_dataset,
                                                      "--public-pretrain": public_name})
    inception = None
    if inception_weights is not None:   # before any line or training: a bad file is one error line
        try:
            inception = load_inception(inception_weights)
        except ValueError as e:
            raise BadInput(str(e)) from None
    public = None
    if public_name is not None and accuracies:   # else nothing trains on it (the skipped line says why)
        from dpdm.dataset_sizes import same_images

        for real in (dataset, test_dataset):
            if same_images(public_name, real):
                raise BadInput(f"--public-pretrain={public_name!r} holds the real data's images ({real!r}); "
                               "pretraining must use other, public data")
        try:
            public = load_dataset(public_name, "train", data_root=data_root, download=download)
        except (ValueError, OSError) as e:
            raise BadInput(f"--public-pretrain={public_name!r}: {e}") from None
        exif_notes[f"--public-pretrain={public_name!r}"] = exif_orientation_note(public)
        try:
            check_public_data(public, real_train, real_test)
        except DataError as e:
            raise BadInput(f"--public-pretrain={public_name!r}: {e}") from None
    in_train = 0
    held_out = None   # check_samples_held_out's counts: searched once, here, before any training
    if real_test is not None:
        try:   # the rule of `dpdm baseline dp-classifier`: a few duplicates are reported, half or more refused
            in_train = check_test_data(real_train, real_test)
        except DataError as e:
            raise BadInput(f"--test-dataset={test_dataset or dataset!r}: {e}") from None
        if accuracies:   # the same rule for test images among the samples, which the classifiers train on
            try:
                held_out = check_samples_held_out(samples, real_test, real_train, counts=True)
            except DataError as e:
                raise BadInput(f"--samples={samples_path!r}: {e}") from None
        # Its refusal before any warning line, its warnings with the others below (a refused run prints one line,
        # h152 F2: its "relative path" warning came first).
        generator_notes = _check_test_held_out_from_generator(provenance["dataset"], dataset, real_test,
                                                              test_dataset or dataset, data_root)
    if in_train:
        warn(f"{in_train} of the {len(real_test)} test images of {real_test.name!r} are also training "
             "images; their accuracy is not held-out")
    in_test = 0 if held_out is None else held_out["samples_in_test"]
    if in_test:
        warn(f"{in_test} of the {len(samples)} samples in {samples_path!r} are test images of {real_test.name!r}; "
             "the classifiers train on them, so their accuracy is not held-out")
    near_test = None if held_out is None else held_out["test_images_near_samples"]
    if near_test is not None:
        n, floor, floor_n = held_out["test_images_near_samples_n"], held_out["floor"], held_out["floor_n"]
        # Below the half that refuses, as the near-copies of training images are: only clearly above the rate of
        # training images (distinct images of upsampled low-resolution data can be this alike; h132 F3)
        if near_copies_above_floor(near_test, n, floor, floor_n):
            searched = "" if n == len(real_test) else f" (a seeded subsample of its {len(real_test)})"
            than = "" if floor is None else f"; {floor} of {floor_n} training images do"
            warn(f"{near_test} {'more ' if in_test else ''}of the {n} test images of {real_test.name!r}{searched} "
                 f"have near-copies among the samples in {samples_path!r} (shifted by a pixel, mirrored, brightened, "
                 f"noised or re-encoded{than}); the classifiers train on them, so their accuracy is not held-out")
    if real_test is not None:
        if provenance["dataset"] is None and provenance["private"] is not None:
            # dpdm samples whose model's data has no public name (a path its plan does not name): they cannot say
            # what their model trained on, so the test images cannot be checked against it
            warn(f"{samples_path!r} does not name its model's training data (its plan names none, or another); "
                 f"the test images of {(test_dataset or dataset)!r} are not checked against it: they must not be "
                 "that data")
        for note in generator_notes:
            warn(note)
    if provenance["dataset"] is not None and not same_dataset(provenance["dataset"], dataset):
        # Not refused (another split or a copy of the data can be a fair reference), but the FD and precision /
        # recall then measure the samples against data their model never trained on. After the refusals above,
        # so that a refused run prints one line.
        what = ("the classifier FD and precision/recall measure them against other data"
                if "classifier_fd" not in skipped else "the copies of training images are looked for in other data")
        if _relative_path_dataset(provenance["dataset"]):
            # A plan made from a relative path (the README's `npz:own.npz`) names a file of the folder it was made
            # in, which eval does not know: from another folder, the same data goes by another name (userwalk F1,
            # stop 56: the model's own training data was called "other data").
            here = os.path.exists(dataset_path(provenance["dataset"]))
            names = "from this folder names other data than --dataset" if here else "names nothing from this folder"
            warn(f"the samples' model trained on {provenance['dataset']!r}, a relative path that {names}: eval "
                 f"cannot tell whether --dataset={dataset!r} is that data; if it is not, {what}")
        else:
            warn(f"the samples' model trained on {provenance['dataset']!r}, not --dataset={dataset!r}: {what}")
    if provenance["private"] is False:
        warn(f"{samples_path!r} was drawn from a NON-PRIVATE model (--no-dp): these figures carry no privacy "
             "guarantee")
    elif provenance["seed_given"]:
        warn(f"{samples_path!r} was drawn from a model trained with a given --seed: its guarantee holds only "
             "against whoever does not know that seed")
    for option, note in exif_notes.items():
        if note:
            warn(f"{option}: {note}")
    copies = shared_images(samples, real_train)
    if copies:   # warned, not refused: real images are a fair reference point, and a copying generator must show
        what = ("the metrics measure the training data, not a generator" if 2 * copies >= len(samples) else
                "a generator that reproduces its training images leaks them")
        warn(f"{copies} of the {len(samples)} samples in {samples_path!r} are training images of {real_train.name!r}: "
             f"{what}")
    for metric, reason in _skip_lines(skipped):
        info(f"{metric} skipped: {reason}")
    import numpy as np

    try:
        report = evaluate_samples(samples, real_train, real_test, classifiers=kinds, epochs=epochs,
                                  cache_dir=cache_dir, reference_epochs=reference_epochs or REFERENCE_EPOCHS,
                                  inception=inception, seed=seed, device=resolve_device(device),
                                  progress=None if as_json else info, public=public, public_checked=True,
                                  public_epochs=public_epochs, shift=augment_shift, samples_checked=True,
                                  held_out=held_out, warn=warn)
    except np.linalg.LinAlgError:   # a ValueError, but a numerical failure, not bad input: exit 4
        raise
    except ValueError as e:  # DataError (shape / label mismatch), no cache folder
        raise BadInput(f"--samples={samples_path!r}: {e}" if isinstance(e, DataError) else str(e)) from None
    report["samples_provenance"] = provenance
    # Both from the report, after evaluate_samples has accepted the samples (a refused run prints one line): the
    # near-copy search costs seconds, so it runs once.
    # The DP samples' labels (no privacy cost), judged over the classes the training data has an image of: which
    # those are is said here, to the data's owner, and kept out of the report (h93 F4).
    empty = [] if real_train.y is None else empty_classes(real_train.y, real_train.num_classes)
    trained = None if real_train.y is None else [k for k in range(real_train.num_classes) if k not in empty]
    problem = label_counts_problem(report["samples_label_counts"] or [], trained)
    if problem:
        warn(f"{samples_path!r}: {problem}; classifiers trained on them fail on the rare classes, and "
             "precision/recall does not show it")
    near = report.get("samples_near_train") or 0   # None: images too small for the near-copy search
    floor, floor_n = report.get("test_images_near_train"), report.get("test_images_near_train_n")
    # Only clearly above the real test images' own rate: distinct images of upsampled low-resolution data can be
    # this alike (h93 F2: 31 of 500 real held-out digits28 images were called a leaking generator's).
    if near_copies_above_floor(near - report["samples_in_train"], len(samples), floor, floor_n):
        what = ("the metrics measure the training data, not a generator" if 2 * near >= len(samples) else
                "a generator that reproduces its training images leaks them")
        than = f", clearly more often than the real test images are: {floor} of {floor_n}" if floor else ""
        warn(f"{near - report['samples_in_train']} {'more ' if copies else ''}of the {len(samples)} samples in "
             f"{samples_path!r} are near-copies of training images of {real_train.name!r} (shifted by a pixel, "
             f"mirrored, brightened, noised or re-encoded; {near} copies in all{than}): {what}")
    if as_json:
        emit_json(report)
    else:
        click.echo(format_report(report))


def _check_test_held_out_from_generator(generator_data: str | None, dataset: str, real_test, test_name: str,
                                        data_root) -> list[str]:
    """The test accuracies are of held-out images: `check_test_data` compares the test images with --dataset's
    training split, but the samples' generator may have trained on other data (their ``meta_dataset``), and a
    test set that is that data measures the generator's own training images. Half or more of the test images
    among them is refused, as for --dataset; fewer are warned about. Data that cannot be loaded here (a path
    the plan did not name, a torchvision dataset not on this machine) is not checked, and said so; so is a
    samples file of dpdm's that names no training data (`eval_cmd`).

    Returns the warning lines, for the caller to print after all its refusals (h152 F2): a refusal is one line."""
    from dpdm.datasets import absolute_dataset_name, load_dataset, same_dataset, shared_images

    notes: list[str] = []
    if generator_data is None or same_dataset(generator_data, dataset):   # --dataset's, compared already
        return notes
    relative = _relative_path_dataset(generator_data)
    try:
        trained_on = load_dataset(generator_data, "train", data_root=data_root, download=False)
    except (ValueError, OSError) as e:   # DataError is a ValueError
        which = "a relative path that" if relative else "which"
        return [f"the samples' model trained on {generator_data!r}, {which} cannot be read here ({e}); "
                f"the test images of {test_name!r} are not checked against it"]
    if relative:
        # A plan made from a relative path: the same name may be another file here than where the model trained.
        # Said only once read: it claims a check (userwalk F1, stop 56: "checked against" a path that was not read).
        notes.append(f"the samples' model trained on {generator_data!r}, a relative path; the test images are "
                     f"checked against {absolute_dataset_name(generator_data).split(':', 1)[1]!r}, as read from "
                     "this folder")
    shared = shared_images(real_test, trained_on)
    if len(real_test) and 2 * shared >= len(real_test):
        raise BadInput(f"--test-dataset={test_name!r}: {shared} of its {len(real_test)} images are the training "
                       f"images of the samples' model ({generator_data!r}); the test accuracy must come from "
                       "held-out images")
    if shared:
        notes.append(f"{shared} of the {len(real_test)} test images of {test_name!r} are training images of the "
                     f"samples' model ({generator_data!r}); their accuracy is not held-out")
    return notes


def _relative_path_dataset(name: str) -> bool:
    """Whether `name` is an "npz:PATH" or "folder:PATH" dataset whose path is relative (to the folder its plan was
    made in, which the samples do not record: they name the data as the plan does, and a release names no
    absolute path)."""
    from dpdm.datasets import dataset_path, is_path_dataset

    return is_path_dataset(name) and not os.path.isabs(dataset_path(name))


def samples_provenance(path: str) -> dict:
    """What `dpdm sample` recorded about the model behind the samples (its ``meta_*`` arrays): "private"
    (False: a `--no-dp` model), "seed_given" (trained with a given `--seed`), "epsilon", "delta", "dataset"
    (the model's training data as its plan names it) and "init_dataset" (the public data its run was warm-started
    on, `dpdm train --init-from`: a DP-SGD classifier is a fair partner only if warm-started on it too) and
    "weights_sha256" (the digest of the weights that drew them, `sample.weights_digest`, which `dpdm export` prints
    of a release file; samples of dpdm before it have none); each None where the file does not say (samples from
    elsewhere, a cold start).

    Each array is sized on its header before it is read (`read_npz_scalars`): one that is no scalar was
    decompressed in full first, and a header claiming 10**12 bytes ended the command in "out of memory on the
    machine" (h112 F1).

    Raises:
      DataError: a ``meta_*`` array of these that is no scalar number or text, or a file that cannot be read.
    """
    import math

    from dpdm.datasets import read_npz_scalars

    out = {"private": None, "seed_given": None, "epsilon": None, "delta": None, "dataset": None,
           "init_dataset": None, "weights_sha256": None}
    found = read_npz_scalars(path, [f"meta_{key}" for key in out], name=path)
    for key in out:
        v = found.get(f"meta_{key}")
        if key in ("dataset", "init_dataset", "weights_sha256"):
            if isinstance(v, str) and v not in ("", "None"):
                out[key] = v
        elif isinstance(v, (bool, int, float)):   # text is not a number here, as before
            out[key] = bool(v) if key in ("private", "seed_given") else (float(v) if math.isfinite(v) else None)
    return out


def provenance_problem(provenance: dict) -> str | None:
    """What `samples_provenance` read that `dpdm sample` never writes, or None: samples marked private without a
    finite epsilon (a --no-dp model's record NaN, so one flipped meta_private made them "DP samples (epsilon not
    recorded)", h115 N3), or a weights digest that is no sha256. `dpdm eval` refuses such a file."""
    import re

    again = "the file was edited or is not dpdm's: draw the samples again"
    if provenance["private"] and provenance["epsilon"] is None:
        return f"meta_private is True but meta_epsilon is no finite number; `dpdm sample` records the epsilon of " \
               f"every DP model, so {again}"
    digest = provenance["weights_sha256"]
    if digest is not None and not re.fullmatch("[0-9a-f]{64}", digest):
        return f"meta_weights_sha256 is {digest[:80]!r}, not a sha256 (64 hex digits); {again}"
    return None


def _check_cache_outside_data(cache_dir, folder, datasets: dict[str, str | None]) -> None:
    """BadInput where the cache folder `folder` is, or lies in, the `folder:` or `npz:` data an option of
    `datasets` names, as `dpdm train` and `dpdm sample` refuse their outputs there (`report_utils.place_in_dataset`): its
    reference/ folder would read as an image-less class folder of that data, which no command could then load
    (h103 F1)."""
    from dpdm.report_utils import place_in_dataset

    for option, name in datasets.items():
        where = place_in_dataset(folder, name)
        if where:
            raise BadInput(f"{_cache_source(cache_dir, folder)}: {where} the {option} data ({name!r}), where the "
                           "cached reference CNN would read as part of that data; choose a cache folder outside it")


def _cache_source(cache_dir, folder) -> str:
    """Where the cache folder `folder` came from, for its error line: --cache-dir, else $DPDM_CACHE, else the
    default (`evaluate.default_cache_dir`). A bad DPDM_CACHE was blamed on a --cache-dir the user never gave."""
    if cache_dir is not None:
        return f"--cache-dir={str(folder)!r}"
    if os.environ.get("DPDM_CACHE"):
        return f"DPDM_CACHE={os.environ['DPDM_CACHE']!r} (no --cache-dir given)"
    return f"the default cache folder {str(folder)!r} (no --cache-dir, no DPDM_CACHE)"


def _skip_lines(skipped: dict[str, str]) -> list[tuple[str, str]]:
    """One (metric, reason) per reason: the FD and precision/recall share theirs."""
    names = {"classifiers": "downstream accuracies", "classifier_fd": "classifier FD",
             "classifier_precision_recall": "classifier precision/recall"}
    by_reason: dict[str, list[str]] = {}
    for metric, reason in skipped.items():
        by_reason.setdefault(reason, []).append(names.get(metric, metric))
    return [(" and ".join(metrics), reason) for reason, metrics in by_reason.items()]


_NON_PRIVATE_NAMES = {"classifier_fd": "the classifier FD", "classifier_precision_recall": "precision/recall",
                      "reference": "the reference CNN's accuracies", "inception_fid": "the Inception FID",
                      "test_images_in_train": "the count of test images that are training images",
                      "samples_in_train": "the count of samples that are training images",
                      "samples_near_train": "the counts of samples that are training images or near-copies of them",
                      "test_images_near_train": "the count of test images that are near-copies of training images"}
# The names above that take "is" when they stand alone ("the count ... are computed" read in exact-only runs).
_SINGULAR_NAMES = frozenset(name for key, name in _NON_PRIVATE_NAMES.items()
                            if key in ("classifier_fd", "inception_fid", "test_images_in_train", "samples_in_train",
                                       "test_images_near_train"))


def non_private_line(report: dict) -> str | None:
    """The line that says which numbers are computed without privacy from the private training split."""
    keys = report.get("non_private_statistics_of_the_training_data") or []
    names = []
    for key in keys:
        if key == "test_images_in_train" and not report.get(key):
            continue   # a zero count is not shown; a nonzero one is, in a warning (the samples' are in the table)
        if key == "samples_in_train" and "samples_near_train" in keys:
            continue   # named with the near-copies
        name = _NON_PRIVATE_NAMES["reference" if ".reference." in key else key.split(".")[0]]
        if name not in names:
            names.append(name)
    if not names:
        return None
    listed = ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + names[-1]
    one = len(names) == 1 and names[0] in _SINGULAR_NAMES
    are, they, them = ("is", "it is", "it") if one else ("are", "they are", "them")
    return (f"note: {listed} {are} computed WITHOUT privacy from the private training split of {report['dataset']}: "
            f"{they} outside the DP guarantee; share {them} only as you would that data")


def held_out_line(report: dict) -> str | None:
    """The line that says which figures are measured without privacy on the held-out test images (README:
    "Figures on the held-out test images"): the guarantee covers the training images only, and test images
    may be private too (h115 N4). The counts of samples that are test images or near-copies of them are named
    where they are not zero (the README says this note names them, h152 N4; a zero count is not shown, as
    `non_private_line` leaves out a zero `test_images_in_train`)."""
    fd = report.get("classifier_fd") or {}
    in_test, near_test = report.get("samples_in_test") or 0, report.get("test_images_near_samples") or 0
    names = (["the downstream accuracies"] if report.get("classifiers") else []) + \
        (["the FD's floor"] if "real_test_value" in fd else []) + \
        (["the near-copy count's floor"] if report.get("test_images_near_train") is not None else []) + \
        (["the counts of samples that are test images or near-copies of them"] if near_test else
         ["the count of samples that are test images"] if in_test else [])
    if report.get("real_test_size") is None or not names:
        return None
    are = "is" if names in (["the FD's floor"], ["the near-copy count's floor"],
                            ["the count of samples that are test images"]) else "are"
    return (f"note: {' and '.join(names)} {are} measured WITHOUT privacy on the held-out test images: where those "
            "are private too, they are outside the DP guarantee as well")


def copies_line(report: dict) -> str:
    """The samples that are training images and near-copies of one, shown even when none are: they need no labels,
    and for unlabelled data without Inception weights they are all `dpdm eval` computes (h124 F1)."""
    from dpdm.datasets import NEAR_COPY_MIN_SIDE

    exact, near, n = report["samples_in_train"], report.get("samples_near_train"), report["n_samples"]
    line = f"copies of training images: {exact} of the {n} samples"
    if near is None:   # `samples_near_train`: images too small for the near-copy search
        return (f"{line} (exact copies only: images under {NEAR_COPY_MIN_SIDE}x{NEAR_COPY_MIN_SIDE} pixels get no "
                "near-copy search)")
    floor, floor_n = report.get("test_images_near_train"), report.get("test_images_near_train_n")
    than = ("no real test images to compare with" if floor is None else
            f"real test images: {floor} of {floor_n} near-copies, the floor")
    return f"{line}, and {near - exact} more near-copies ({than})"


def format_report(report: dict) -> str:
    """The human-readable table."""
    # The held-out data named beside the training data (--test-dataset may be any file), and the seed every figure
    # depends on: a figure is tied to its test images and can be reproduced (h152 F1).
    test = report.get("test_dataset")
    tested = "no test data" if report.get("real_test_size") is None else \
        f"test {'' if test is None else f'{test} '}({report['real_test_size']})"
    seed = "" if report.get("seed") is None else f", seed {report['seed']}"
    lines = [f"samples {report['samples']}: {report['n_samples']} images "
             f"{'x'.join(map(str, report['image_shape']))}, real data: train {report['dataset']} "
             f"({report['real_train_size']}), {tested}{seed}"]
    made = report.get("samples_provenance") or {}
    # A warm start lifts every downstream figure (85.5% -> 92.0% for the synthetic CNN on mnist5k): said beside
    # the privacy, so that they are compared with a DP-SGD CNN warm-started on the same public data.
    warm = "" if made.get("init_dataset") is None else f", generator warm-started on public {made['init_dataset']}"
    # The weights that drew them, shortened as plan digests are: check it against the sha256 published with the
    # model (README: the weights sha256 that `dpdm export` prints); --json has all 64 digits.
    drawn = "" if made.get("weights_sha256") is None else f", weights sha256 {made['weights_sha256'][:12]}..."
    if made.get("private") is False:
        lines.append(f"NON-PRIVATE samples: drawn from a --no-dp model{warm}{drawn}")
    elif made.get("private"):   # epsilon None: not in `dpdm eval`, which refuses it (`provenance_problem`)
        eps = ("epsilon not recorded" if made.get("epsilon") is None else
               f"epsilon {epsilon_text(made['epsilon'])}"
               + ("" if made.get("delta") is None else f", delta {made['delta']:g}"))
        lines.append(f"DP samples ({eps})" + (", model trained with a GIVEN --seed" if made.get("seed_given") else "")
                     + warm + drawn)
    counts = report.get("samples_label_counts")
    if counts:   # a class-collapsed set shows here, not in precision/recall
        lines.append(f"samples per class: {' '.join(map(str, counts))}" if len(counts) <= 20 else
                     f"samples per class: {min(counts)} to {max(counts)} over {len(counts)} classes")
    lines.append("")
    pub = report.get("public_pretrain")
    if report["classifiers"]:
        if pub is not None:
            lines.append(f"classifiers first trained {pub['epochs']} epoch{'' if pub['epochs'] == 1 else 's'} on "
                         f"public {pub['dataset']} (without privacy), then on the samples")
        if report.get("augment_shift"):
            lines.append(f"training images randomly shifted by up to {report['augment_shift']} px "
                         "(not the paper's protocol)")
        lines.append(f"{'classifier':<12}{'real test acc':>14}{'synth val acc':>15}{'best epoch':>12}"
                     + (f"{'public only':>13}" if pub is not None else ""))
        for kind, r in report["classifiers"].items():
            lines.append(f"{kind:<12}{r['test_accuracy']:>14.4f}{r['synthetic_val_accuracy']:>15.4f}"
                         f"{str(r['best_epoch']) + '/' + str(r['epochs']):>12}"
                         + (f"{r['public_pretrain']['test_accuracy']:>13.4f}" if "public_pretrain" in r else ""))
        lines.append("")
    fd = report["classifier_fd"]
    if fd is not None:
        ref = fd["reference"]
        # n beside each figure: the FD grows as n shrinks, so the two compare only at equal n.
        lines.append(f"classifier FD (not FID): {fd['value']:.4f} (n={fd['n']})")
        if "real_test_value" in fd:
            lines.append(f"  real test vs real train (floor): {fd['real_test_value']:.4f} (n={fd['real_test_n']})")
        acc = ref.get("real_test_accuracy")
        lines.append(f"  reference CNN: real test acc {acc:.4f}" if acc is not None else "  reference CNN")
    pr = report.get("classifier_precision_recall")
    if pr is not None:
        lines.append(f"classifier precision {pr['precision']:.4f} (fidelity), recall {pr['recall']:.4f} (coverage), "
                     f"k={pr['k']}, {pr['n']} images per set")
    if report["inception_fid"] is not None:
        lines.append(f"Inception FID (torchvision weights): {report['inception_fid']:.4f}")
    lines.append(copies_line(report))
    for metric, reason in _skip_lines(report.get("skipped") or {}):
        lines.append(f"{metric}: skipped ({reason})")
    notes = [note for note in (non_private_line(report), held_out_line(report)) if note]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)
