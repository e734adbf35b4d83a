"""`dpdm baseline`: comparison points trained under the same locked plan."""
from __future__ import annotations

import click

from cli._common import (DatasetName, FiniteFloatRange, PathOption, check_augment_shift, emit_json, load_locked_plan,
                         load_public_data, load_training_data, plan_dataset_name, resolve_device,
                         unread_arrays_shown, warn, warn_dataset_not_plans, warn_exif_orientation, warn_known_seed)
from cli.errors import BadInput
from dpdm.report_utils import epsilon_text


@click.group()
def baseline() -> None:
    """Baselines trained under the diffusion model's plan, each spending as much privacy budget again: run on the
    same private data, a baseline is a second release of it, and its epsilon composes with the generator's."""


@baseline.command("dp-classifier")
@click.option("--plan", "plan_path", required=True, type=PathOption(dir_okay=False),
              help="A locked plan from `dpdm plan --out` (the one the diffusion model used, for a like-for-like "
                   "comparison; its epsilon is spent again, on top of the generator's).")
@click.option("--dataset", type=DatasetName(), default=None, help="Dataset name (default: the plan's).")
@click.option("--test-dataset", type=DatasetName(), default=None,
              help="Held-out real images (npz:PATH or folder:PATH); required for path datasets and digits.")
@click.option("--data-root", default=None, type=PathOption(file_okay=False),
              help="Where torchvision datasets live (default $DPDM_DATA, else ~/.cache/dpdm/data; README: Your own data).")
@click.option("--download", is_flag=True, help="Allow downloading a torchvision dataset (needs a network).")
# 2e-3 repeats dpdm.baseline.DEFAULT_LR (which imports torch; --help does not), pinned to it by a test.
@click.option("--lr", type=FiniteFloatRange(min=0, min_open=True), default=None,
              help="Adam learning rate (privacy-neutral) [default: 2e-3].")
@click.option("--physical-batch", type=click.IntRange(min=1), default=None,
              help="Examples per chunk (memory knob; privacy-neutral).")
@click.option("--public-pretrain", "public_name", type=DatasetName(), default=None,
              help="First train the CNN without privacy on this PUBLIC dataset (e.g. digits28-aug), then "
                   "fine-tune it with DP-SGD: the comparison for a generator started with `dpdm train "
                   "--init-from` on the same public data.")
@click.option("--public-epochs", type=click.IntRange(min=1), default=20, show_default=True,
              help="Non-private epochs on --public-pretrain (dpdm.baseline.DEFAULT_PUBLIC_EPOCHS; repeated "
                   "here so that --help does not import torch).")
@click.option("--public-subspace", "subspace_dim", type=click.IntRange(min=1), default=None, metavar="K",
              help="Add the DP noise in the top-K subspace of the clipped gradients of --public-pretrain's "
                   "examples, as `dpdm train --public-subspace` does (same plan and epsilon).")
@click.option("--subspace-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Steps between recomputations of the public subspace.")
@click.option("--subspace-examples", type=click.IntRange(min=1), default=512, show_default=True,
              help="Public examples per recomputation (at least K).")
@click.option("--augment-shift", type=click.IntRange(min=0), default=0, show_default=True, metavar="PIXELS",
              help="Translate each private example by random offsets of up to PIXELS, as --augment-mult copies "
                   "whose averaged loss is clipped as a whole (augmentation multiplicity; same plan and epsilon).")
@click.option("--augment-mult", type=click.IntRange(min=1), default=1, show_default=True, metavar="A",
              help="Augmented copies per example and step (with --augment-shift).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=None,
              help="Fix the initialization, batches and noise (tests, reproduction). Default: a secret random "
                   "seed, never shown (a known one would let anyone replay the batches and the noise).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def dp_classifier(plan_path, dataset, test_dataset, data_root, download, lr, physical_batch, public_name,
                  public_epochs, subspace_dim, subspace_every, subspace_examples, augment_shift, augment_mult, device,
                  seed, as_json, quiet):
    """A CNN (GroupNorm) trained directly with DP-SGD under the plan; prints its real test accuracy.

    On the generator's private data it is a release of its own: publishing its accuracy beside the generator's
    outputs releases both, whose epsilons compose (`dpdm account` with the steps of both gives the total for equal
    plans); it does not share the generator's budget."""
    from dpdm.baseline import DEFAULT_LR, train_dp_classifier
    from dpdm.datasets import DataError, has_test_split, load_dataset

    if subspace_dim is not None and public_name is None:
        raise BadInput("--public-subspace needs --public-pretrain, the public data to estimate it from")
    if subspace_dim is not None and subspace_examples < subspace_dim:
        raise BadInput(f"--subspace-examples {subspace_examples} must be at least --public-subspace {subspace_dim}")
    if augment_mult > 1 and augment_shift == 0:
        raise BadInput(f"--augment-mult {augment_mult} needs --augment-shift > 0 (the copies would be equal)")
    if augment_shift and subspace_dim is not None:
        raise BadInput("--augment-shift and --public-subspace cannot be combined")
    doc = load_locked_plan(plan_path)
    name = plan_dataset_name(doc, dataset)
    shown = f"--dataset={name!r}" if dataset else f"the plan's dataset {name!r}"   # not an option never given (r1 N1)
    train = load_training_data(name, data_root=data_root, download=download)
    check_augment_shift(augment_shift, train)
    from dpdm.classifiers import CNN_MIN_SIDE

    if min(train.image_shape[1:]) < CNN_MIN_SIDE:
        raise BadInput(f"{shown} has images of {'x'.join(map(str, train.image_shape[1:]))} pixels; the "
                       f"CNN needs at least {CNN_MIN_SIDE}x{CNN_MIN_SIDE}")
    if train.y is None:
        unread = unread_arrays_shown(train)   # labels stored as `labels`, ... (h109 F1)
        raise BadInput(f"{shown} has no labels; the DP-SGD classifier needs them" + (
            f" (an npz's labels are its array y; its other arrays ({unread}) are never read)" if unread else ""))
    if test_dataset is None and not has_test_split(name):   # after the labels: held-out images cannot supply those
        raise BadInput(f"{shown} has no held-out split; give the real held-out images "
                       f"with --test-dataset npz:PATH or folder:PATH")
    if len(train) != doc.plan.dataset_size:
        raise BadInput(f"{shown} has {len(train)} training images but the plan was made "
                       f"for dataset_size={doc.plan.dataset_size}")
    try:
        test = load_dataset(test_dataset or name, "test", data_root=data_root, download=download)
    except (ValueError, OSError) as e:
        raise BadInput(f"--test-dataset={test_dataset or name!r}: {e}") from None
    if test.y is None or len(test) < 2:   # `dpdm eval`'s least test set: one image scores 0 or 1
        raise BadInput(f"--test-dataset={test_dataset or name!r} " + (
            "has no labels; the test accuracy needs them" if test.y is None else
            f"holds {len(test)} image; dpdm baseline dp-classifier needs at least 2"))
    if test.image_shape != train.image_shape:   # as `dpdm eval` says it: both options named (h109 F5)
        raise BadInput(f"--test-dataset={test_dataset or name!r} has images of "
                       f"{'x'.join(map(str, test.image_shape))} (CxHxW), {shown} of "
                       f"{'x'.join(map(str, train.image_shape))}; the test images must have the training images' size "
                       "and channels")
    public = None
    if public_name is not None:
        public = load_public_data("--public-pretrain", public_name, name, data_root=data_root, download=download,
                                  use="pretraining")
        from dpdm.evaluate import check_public_data

        try:
            check_public_data(public, train, test)
        except DataError as e:
            raise BadInput(f"--public-pretrain={public_name!r}: {e}") from None
    if seed is not None:
        warn_known_seed(seed)
    try:
        result = train_dp_classifier(doc, train, test, lr=lr or DEFAULT_LR, seed=seed,
                                     device=resolve_device(device), chunk_size=physical_batch,
                                     progress=not quiet, public=public, public_checked=True,
                                     public_epochs=public_epochs,
                                     subspace_dim=subspace_dim, subspace_every=subspace_every,
                                     subspace_examples=subspace_examples, augment_shift=augment_shift,
                                     augment_multiplicity=augment_mult,
                                     on_start=lambda notes: _warn_before_training(
                                         shown, notes, lambda: (_warn_inferred(shown, train),
                                                                warn_exif_orientation(name, train),
                                                                warn_dataset_not_plans(dataset, doc.plan.dataset_name,
                                                                                       "the result"))))
    except ValueError as e:  # DataError and engine argument checks
        raise BadInput(str(e)) from None
    if result["test_images_in_train"]:
        warn(f"{result['test_images_in_train']} of the {len(test)} test images of {test.name!r} are also training "
             "images; their accuracy is not held-out")
    result = {"baseline": "dp-classifier", "dataset": name, "plan_digest": doc.digest,
              "epsilon": doc.epsilon, "delta": doc.plan.delta, "seed_given": seed is not None, **result}
    if as_json:
        emit_json(result)
    else:
        # The held-out images named (and in the JSON, "test_dataset"): the comparison with `dpdm eval`'s figures is
        # fair only on the same test images, and --test-dataset may be any file (h152 F1).
        click.echo(f"DP-SGD CNN on {name}: real test accuracy {result['test_accuracy']:.4f} on "
                   f"{result['test_dataset']} ({len(test)} images) at epsilon "
                   f"{epsilon_text(doc.epsilon)}, delta {doc.plan.delta:g} (it adds to the generator's where both "
                   f"are released on the same data; {result['steps']} steps, expected batch "
                   f"{result['expected_batch_size']}, {result['seconds']:.0f} s)"
                   + (" (given --seed: no guarantee against whoever knows it)" if seed is not None else ""))
        if "public_pretrain" in result:
            pre = result["public_pretrain"]
            click.echo(f"  started from {pre['epochs']} non-private epochs on public {pre['dataset']}: "
                       f"{pre['test_accuracy']:.4f} before the private steps")
        if "augment" in result:
            aug = result["augment"]
            click.echo(f"  each example as {aug['multiplicity']} copies shifted by up to {aug['shift']} px, "
                       f"their averaged loss clipped as a whole")


def _warn_before_training(shown: str, notes: tuple[str, ...], others) -> None:
    """`train_dp_classifier`'s warnings on the private data (its images that are exact copies of others), said once
    every check has passed and before any step, as `dpdm train` says its own: an image the data holds twice is
    protected only as a group of its copies by this release too (h155 F4, stop 55). `shown`: the data as given.
    `others()` says the CLI's own warnings (a class count read off the data, EXIF-turned images, data that is not
    the plan's), here too: after the library's checks, so that a refused run stays one error line, and before the
    budget is spent, where they came after the training (fixbase, stop 55)."""
    others()
    for note in notes:
        warn(f"{shown}: {note}")


def _warn_inferred(shown: str, train) -> None:
    """`cli._common.warn_inferred` for the baseline: the data named as it was given (`shown`: the plan's dataset where
    no --dataset was, r1 N1), and what is released is an accuracy, not a model whose outputs show the class count
    (h132 N3). The channel count's note is `dpdm.datasets.inferred_channels_note`'s, worded for a trained model."""
    from dpdm.datasets import inferred_channels_note

    note = inferred_channels_note(train) if getattr(train, "channels_inferred", False) else None
    if note:
        warn(f"{shown}: {note}")
    if train.num_classes_inferred:
        read, fix = (("is that of the class folders, each of which must hold a private image",
                      "give the data as an npz with num_classes") if train.class_names is not None else
                     ("was read from the private labels (their largest + 1)", "store num_classes in the npz"))
        warn(f"{shown}: the number of classes ({train.num_classes}) {read}, and the CNN has that many outputs, so "
             f"its accuracy depends on it outside the DP guarantee; {fix} to fix it publicly")
