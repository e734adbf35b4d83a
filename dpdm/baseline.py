"""The paper's comparison point: a classifier trained directly on the private data with DP-SGD.

The baseline spends as much privacy budget as the diffusion model it is compared with: it
runs under the same locked `PrivacyPlan` (Poisson sampling at ``plan.sample_rate``, ``plan.steps``
noisy steps, ``plan.clip_norm``, ``plan.noise_multiplier``), through the same engine
(`dpdm.engine.private_grad`) and the same sampler (`dpdm.data.PoissonSampler`). So its epsilon is
the plan's epsilon, spent again: on the generator's private data it is a second release, whose epsilon composes
with the generator's (README "What the plan promises"). Only privacy-neutral choices are its own: the network (the paper's CNN with
GroupNorm and without dropout) and the optimizer (Adam; DP-SGD with Adam is much stronger than with
plain SGD at the same epsilon, see issue 4's Opacus figures).

With ``augment_shift=S`` each example of a batch is seen as ``augment_multiplicity`` copies, each
translated by its own random offset of up to S pixels; its gradient is that of the loss averaged over
its copies, clipped as a whole (augmentation multiplicity, De et al. 2022, like the diffusion model's
K noise draws): one example still moves the clipped sum by at most the clip norm, so the plan and its
epsilon are unchanged. `dpdm eval --augment-shift` gives the classifiers trained on synthetic images the
same augmentation, so that the comparison stays fair.

With ``public=`` the CNN is first trained without privacy on public data (e.g. ``digits28``), then
fine-tuned with DP-SGD: the fair comparison for a generator warm-started from the same public data
(`dpdm train --init-from`). The public phase costs no privacy only if that data holds none of the
private examples; its own test accuracy is reported too (what the public data gives alone).
"""
from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import accounting
from dpdm.classifiers import CNN
from dpdm.datasets import DataError, ImageData, duplicate_images
from dpdm.evaluate import (DEFAULT_PUBLIC_EPOCHS, NON_PRIVATE_KEY, accuracy, check_public_data, check_shift,
                           check_test_data, match_test_classes, pretrain_on_public, random_shift)
from dpdm.train import step_seed

__all__ = ["DEFAULT_LR", "DEFAULT_PUBLIC_EPOCHS", "train_dp_classifier"]

DEFAULT_LR = 2e-3


_STREAM_NOISE, _STREAM_SUBSPACE, _STREAM_AUGMENT, _STREAM_INIT, _STREAM_PRETRAIN = 1, 2, 3, 4, 5


def _loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ONE example (leading dim 1), as the engine expects."""
    return nn.functional.cross_entropy(model(x), y)


def _augmented_loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ONE example averaged over its A augmented copies (x: [1, A, C, H, W])."""
    return nn.functional.cross_entropy(model(x[0]), y.expand(x.shape[1]))


def augmented_copies(x: torch.Tensor, shift: int, multiplicity: int, generator: torch.Generator) -> torch.Tensor:
    """[B, C, H, W] -> [B, A, C, H, W]: A randomly shifted copies of each image (`random_shift`)."""
    b = x.shape[0]
    return random_shift(x.repeat_interleave(multiplicity, 0), shift, generator).view(b, multiplicity, *x.shape[1:])


def _certified(plan) -> tuple[accounting.PrivacyPlan, float, str]:
    """The plan to train under, its certified epsilon and its digest: a PlanDocument must re-compute
    (`accounting.verify_document`, as `dpdm.train.train` checks one); a bare PrivacyPlan is certified here
    (`accounting.certified_epsilon`) and refused above its target_epsilon. A bare plan trained unchecked: an
    uncalibrated one of epsilon 161 ran as if it had its target 1 (stop 50, h110 F1)."""
    if isinstance(plan, accounting.PlanDocument):
        accounting.verify_document(plan)
        return plan.plan, plan.epsilon, plan.digest
    if not isinstance(plan, accounting.PrivacyPlan):
        raise ValueError(f"plan is a {type(plan).__name__}; it must be an accounting.PlanDocument "
                         "(accounting.load_plan) or an accounting.PrivacyPlan")
    epsilon = accounting.certified_epsilon(plan)
    if plan.target_epsilon is not None and epsilon > plan.target_epsilon:   # as make_plan_document refuses it
        raise accounting.NotCalibratedError(
            f"noise_multiplier={plan.noise_multiplier!r} certifies eps={epsilon:.6g}, above "
            f"target_epsilon={plan.target_epsilon!r}; calibrate the plan")
    return plan, epsilon, plan.digest()


def train_dp_classifier(plan: accounting.PlanDocument | accounting.PrivacyPlan, train: ImageData, test: ImageData,
                        *, lr: float = DEFAULT_LR, seed: int | None = None, device: str | torch.device = "cpu",
                        chunk_size: int | None = None, progress: bool = False,
                        public: ImageData | None = None, public_epochs: int = DEFAULT_PUBLIC_EPOCHS,
                        public_checked: bool = False, subspace_dim: int | None = None, subspace_every: int = 10,
                        subspace_examples: int = 512, augment_shift: int = 0,
                        augment_multiplicity: int = 1,
                        on_start: Callable[[tuple[str, ...]], None] | None = None) -> dict:
    """Trains a GroupNorm CNN with DP-SGD under `plan` and measures its real test accuracy.

    Args:
      plan: a plan document (`accounting.load_plan`), whose epsilon must re-compute, or a bare
        `accounting.PrivacyPlan`, certified here and refused above its target_epsilon.
      train: the private training split; its size must equal ``plan.dataset_size``.
      test: the real held-out split.
      lr: Adam learning rate (privacy-neutral).
      seed: seeds the initialization, the Poisson batches and the DP noise (tests, reproduction).
        None (the default): a secret random seed, never returned, as `dpdm train` draws one: a known
        seed would let anyone replay the batches and the noise.
      chunk_size: examples per vmap chunk (memory knob, privacy-neutral).
      progress: show a progress bar on stderr.
      public: labelled public data of the same image shape and classes: trained on without
        privacy (Adam, batch 128, `public_epochs` epochs) before the DP-SGD steps; checked with
        `evaluate.check_public_data` unless `public_checked` (the caller did: its near-copy search costs seconds,
        25 to 45 for digits-fonts28-aug against mnist5k).
      subspace_dim: add the noise in the top-k subspace of the public examples' clipped gradients,
        recomputed every `subspace_every` steps from `subspace_examples` of them (as `dpdm train
        --public-subspace`; needs `public`). Same plan, same epsilon.
      augment_shift: translate each private example by random offsets of up to this many pixels, as
        `augment_multiplicity` copies whose averaged loss is clipped as a whole (0: no augmentation).
      on_start: called once every check has passed, before the public pretraining and the first private step, with
        the run's warnings on the private data, as `dpdm.train.train` calls its own: images of `train` that are exact
        copies of others (`datasets.duplicate_images`, named by their files for a ``folder:`` dataset), each
        protected only as a group of its copies here too (h155 F4, stop 55). Not said of the public data.

    Returns:
      {"test_accuracy", "test_dataset", "epsilon", "delta", "plan_digest", "steps", "expected_batch_size", "lr",
      "model", "seed", "test_images_in_train", "seconds"} ("test_dataset" is `test`'s name, the held-out images
      the accuracy was measured on; "epsilon" is the plan's certified epsilon, what the run spends;
      "seed" is the given one, or "secret"; "test_images_in_train" counts the test images that
      are also training images, `datasets.shared_images`: fewer than half, or this refuses; an exact count
      over the private images, so it is listed under `evaluate.NON_PRIVATE_KEY`), and
      "public_pretrain" ({"dataset", "epochs", "test_accuracy"}, the accuracy before any private step)
      when `public` is given.

    Raises:
      PlanError: a plan document whose epsilon does not re-compute. NotCalibratedError: a bare plan whose
        certified epsilon exceeds its target_epsilon.
      DataError: training data whose size differs from the plan's, unlabelled data, a test set that is
        half or more training images, or public data that shares an image with the train or test data.
    """
    from dpdm.data import PoissonSampler
    from dpdm.engine import (add_noise_in_subspace, clipped_grad_sum, noise_generator, noise_scale_problem,
                             private_grad, public_subspace)

    plan, epsilon, digest = _certified(plan)
    if len(train) != plan.dataset_size:
        raise DataError(f"dataset {train.name!r} has {len(train)} training images but the plan was "
                        f"made for dataset_size={plan.dataset_size}")
    if train.y is None or test.y is None:
        raise DataError("the DP classifier baseline needs labelled training and test data")
    if train.image_shape != test.image_shape:
        raise DataError(f"the test images of {test.name!r} are {'x'.join(map(str, test.image_shape))} (CxHxW) but "
                        f"the training images of {train.name!r} are {'x'.join(map(str, train.image_shape))}")
    for data in (train, test) if public is None else (train, test, public):
        # dpdm.datasets loads uint8 pixels p as p / 127.5 - 1; an ImageData of 0..255 floats trained silently, and
        # the clamping made distinct images collide into a false "test images are training images" (r2 F3, stop 50)
        if len(data) and not -1 <= float(data.x.min()) <= float(data.x.max()) <= 1:
            raise DataError(f"the images of {data.name!r} have pixels in [{float(data.x.min()):g}, "
                            f"{float(data.x.max()):g}]; they must lie in [-1, 1] (uint8 pixels p as p / 127.5 - 1, as "
                            "dpdm.datasets loads them)")
    if not 0 < lr < float("inf"):   # inf (and NaN) trained NaN weights
        raise ValueError(f"lr={lr!r} must be a finite number > 0")
    problem = noise_scale_problem(plan.noise_multiplier, plan.clip_norm)
    if problem:
        raise ValueError(f"the plan cannot be trained: {problem}")
    check_shift(augment_shift, train.image_shape[1:], "augment_shift")
    if int(augment_multiplicity) != augment_multiplicity or augment_multiplicity < 1:
        raise ValueError(f"augment_multiplicity={augment_multiplicity!r} must be a positive integer")
    if augment_multiplicity > 1 and augment_shift == 0:
        raise ValueError(f"augment_multiplicity={augment_multiplicity} needs augment_shift > 0 "
                         "(the copies would be equal)")
    if augment_shift and subspace_dim is not None:
        raise ValueError("augment_shift and subspace_dim cannot be combined")
    if len(test) == 0:
        raise DataError(f"test data {test.name!r} holds no images")
    test = match_test_classes(train, test)   # a test folder may lack a class: its labels by class name
    shared = check_test_data(train, test)   # `dpdm eval`'s rule: the classes, and at most a few duplicates
    if public is not None and not public_checked:
        check_public_data(public, train, test)   # public_epochs is checked by pretrain_on_public
    if subspace_dim is not None:
        if public is None:
            raise ValueError("subspace_dim needs public data to estimate the subspace from")
        if not (1 <= subspace_dim <= subspace_examples <= len(public)) or subspace_every < 1:
            raise ValueError(f"need 1 <= subspace_dim ({subspace_dim}) <= subspace_examples ({subspace_examples}) "
                             f"<= public images ({len(public)}) and subspace_every >= 1")
    if on_start is not None:
        copies = duplicate_images(train)
        on_start((copies,) if copies else ())
    t0 = time.perf_counter()
    given_seed = seed
    if seed is None:
        seed = secrets.randbits(62)
    c, h, w = train.image_shape
    # One stream per purpose, each a hash of the whole seed (`dpdm.train.step_seed`), as dpdm train
    # draws them: torch's CPU generator keeps only 32 bits of a seed, and two purposes never share one.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step_seed(seed, 0, _STREAM_INIT))
        model = CNN(c, (h, w), train.num_classes, dropout=0.0, group_norm=True).to(device)
    params = dict(model.named_parameters())
    pretrain = None
    if public is not None:
        pretrain = pretrain_on_public(model, public, epochs=public_epochs, device=device,
                                      seed=step_seed(seed, 0, _STREAM_PRETRAIN))
        pretrain["test_accuracy"] = accuracy(model, test.x, test.y, device=device)
        model.train()
    opt = torch.optim.Adam(params.values(), lr=lr)
    sampler = PoissonSampler(plan.dataset_size, plan.sample_rate, seed)
    noise_gen = noise_generator(step_seed(seed, 0, _STREAM_NOISE), device)   # PCG64 / Philox: 63 bits
    public_gen = torch.Generator().manual_seed(step_seed(seed, 0, _STREAM_SUBSPACE))   # public examples
    augment_gen = torch.Generator().manual_seed(step_seed(seed, 0, _STREAM_AUGMENT))   # the copies' offsets
    x, y = train.x.to(device), train.y.to(device)

    from tqdm import tqdm

    bar = tqdm(range(plan.steps), desc="dp-classifier", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    model.train()
    for step in bar:
        idx = sampler.batch(step).to(device)
        if subspace_dim is None:
            batch, loss_fn = ((augmented_copies(x[idx], augment_shift, augment_multiplicity, augment_gen),
                               _augmented_loss_fn) if augment_shift else (x[idx], _loss_fn))
            grads = private_grad(model, loss_fn, batch, y[idx], clip_norm=plan.clip_norm,
                                 noise_multiplier=plan.noise_multiplier,
                                 expected_batch_size=plan.batch_size, generator=noise_gen,
                                 chunk_size=chunk_size)
        else:
            if step % subspace_every == 0:
                pick = torch.randperm(len(public), generator=public_gen)[:subspace_examples]
                basis = public_subspace(model, _loss_fn, public.x[pick].to(device), public.y[pick].to(device),
                                        dim=subspace_dim, clip_norm=plan.clip_norm, chunk_size=chunk_size)
            grads = add_noise_in_subspace(
                clipped_grad_sum(model, _loss_fn, x[idx], y[idx], clip_norm=plan.clip_norm, chunk_size=chunk_size),
                basis, noise_multiplier=plan.noise_multiplier, clip_norm=plan.clip_norm,
                expected_batch_size=plan.batch_size, generator=noise_gen)
        for name, p in params.items():
            p.grad = grads[name].to(p.dtype)
        opt.step()   # the bar shows no loss: the private batch's un-noised mean loss is a statistic of the data
    bar.close()
    return {"test_accuracy": accuracy(model, test.x, test.y, device=device), "test_dataset": test.name,
            "epsilon": epsilon, "delta": plan.delta, "plan_digest": digest,
            "steps": plan.steps, "expected_batch_size": plan.batch_size, "lr": lr,
            "seed": "secret" if given_seed is None else given_seed, "test_images_in_train": shared,
            NON_PRIVATE_KEY: ["test_images_in_train"],
            "model": "CNN (paper's, GroupNorm, no dropout), Adam",
            **({"public_pretrain": pretrain} if pretrain is not None else {}),
            **({"public_subspace": {"dim": subspace_dim, "every": subspace_every, "examples": subspace_examples}}
               if subspace_dim is not None else {}),
            **({"augment": {"shift": augment_shift, "multiplicity": augment_multiplicity}} if augment_shift else {}),
            "seconds": round(time.perf_counter() - t0, 2)}
