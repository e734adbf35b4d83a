"""Private training under a locked plan (DESIGN.md section 3).

The loop consumes a verified `accounting.PlanDocument` and has no accounting logic of its own: the
plan fixes the sample rate, the noise multiplier, the clip norm, K and the number of steps; the
ledger asks `accounting.epsilon_spent` what the steps done so far cost.

Randomness is derived per step from (seed, step, stream), so that a resumed run draws exactly the
batches, diffusion noise and DP noise an uninterrupted run would have drawn, and so that every rank
of a distributed run derives the same Poisson batch without communicating. After a change of the
learning rate on resume, the seed of each step is mixed with the run's lr segments (`run_seed_at`), so
that two copies of one run folder resumed with different lrs do not draw the same noise.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import errno
import fnmatch
import functools
import hashlib
import json
import math
import os
import secrets
import stat
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import torch

import accounting
from dpdm import checkpoint as ckpt
from dpdm.cpu import keep_freed_memory_if_asked
from dpdm.dataset_sizes import same_images
from dpdm.datasets import (DataError, ImageData, absolute_dataset_name, dataset_path, duplicate_images, empty_classes,
                           image_digests, is_path_dataset, near_copy_problem, same_dataset, shared_images)
from dpdm.data import PoissonSampler
from dpdm.engine import (SubspaceSpanError, add_noise, add_noise_in_subspace, clipped_grad_sum, noise_generator,
                          noise_scale_problem, public_subspace, validate_model)
from dpdm.loss import EDMLoss, VLoss, drop_labels, engine_loss_fn
from dpdm.memory import out_of_memory
from dpdm.networks import build_network
from dpdm.precond import EDMPrecond, VPrecond
from dpdm.report_utils import epsilon_text
from dpdm.steps_record import (RECORD_HEAD as _RECORD_HEAD,
                               RECORD_HEAD_V1 as _RECORD_HEAD_V1, RECORD_WIDTH as _RECORD_WIDTH, STEPS_RECORD,
                               read_record_line, record_binding)
from dpdm.sampling import PRECISIONS, SIGMA_LIMITS, autocast_for

CHECKPOINT_NAME = "checkpoint.pt"
LR_SCHEDULES = ("constant", "cosine")

# Streams of per-step randomness (never reuse a number for two purposes).
_STREAM_DIFFUSION = 1
_STREAM_DP_NOISE = 2
_STREAM_PUBLIC = 3      # public examples and their diffusion draws for the gradient subspace
_STREAM_INIT = 4        # the network's initial weights (public: frozen ones are released)
# How a checkpoint's randomness is derived (recorded in it; nothing reads it back). v2: the DP noise comes
# from `engine.noise_generator` (numpy PCG64 on the CPU: torch's CPU generator keeps 32 bits of a seed)
# and the initial weights from their own stream, so no released weight depends on the secret seed's
# low bits. v3: from the first lr change on, a step's seed is `run_seed_at` (the seed mixed with the lr
# segments so far); a run whose lr never changed draws exactly what v2 drew.
RNG_SCHEME = "per-step SeedSequence(run_seed_at(seed, lr_segments, step), step, stream); noise_generator (v3)"
# Knobs a resumed run must keep: changing them midway would train another model than the one the
# checkpoint describes (and `dpdm sample` reads train_sigma and precond from it). Flag names for the message.
# The learning rate and its schedule may change on resume (a diverged run continues from its last checkpoint's
# weights with a lower one, its ledger counting every step it did): the run records each change as a segment
# (`TrainConfig.lr_segments`), so `lr_at` stays a pure function of what the checkpoint holds. Privacy-neutral for
# the run: the lr is a public choice applied to the noisy gradient (a choice made from a divergence depends on the
# steps that diverged, which is why they stay in the ledger). A copy of the run folder is the same run, though:
# resumed with another lr than the original, it would draw the original's batches and DP noise at other weights,
# and the difference of the two noisy gradients is noise-free. So every step from an lr change on derives its
# randomness from the seed and the segments so far (`run_seed_at`): copies whose lrs differ draw independent noise
# from the step where they part (their releases compose), a resume replays exactly (the segments are in the
# checkpoint), and copies with the same lrs stay one run, bit for bit.
_RESUME_FIXED = {"ema_decay": "--ema-decay", "train_sigma": "--train-sigma", "label_dropout": "label_dropout",
                 "precision": "--precision"}


class TrainError(ValueError):
    """A run that must not start or continue: wrong plan, wrong data, finished run, bad resume."""


# train()'s `on_start` note for a private run whose seed was given (TrainConfig.seed, `dpdm train --seed`).
SEED_NOTE = ("the run's seed was given (TrainConfig.seed, --seed): anyone who knows it can replay the batches and the "
             "DP noise, which voids the guarantee; use a given seed for tests and reproduction only, and keep it "
             "secret otherwise")


class TrainDiverged(RuntimeError):
    """The weights became non-finite (NaN or inf) during training. The steps done are spent: the run's checkpoint
    then holds the weights of its last checkpoint (or of its start) with a ledger of every step done (`train`)."""


class RankLost(RuntimeError):
    """Another rank of a distributed run stopped (died, was killed) during training: a collective failed."""


class RunStorageError(RuntimeError):
    """The run folder could not be written during training (read-only, permissions, full, an I/O error): the
    machine, not a bug and not the user's input. Every file written before is kept whole (atomic writes)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Privacy-neutral knobs: none of them changes what the accountant measured."""

    model: str = "small"                 # network preset: "small" or "mnist"
    precond: str = "edm"                 # "edm" or "v" (v-prediction, the paper's choice at eps 0.2)
    lr: float = 3e-4                     # Adam learning rate
    lr_schedule: str = "constant"        # "constant", or "cosine": lr * (1 + cos(pi * step / steps)) / 2
    ema_decay: float = 0.999             # EMA of weights, with warmup min(decay, (1+n)/(10+n))
    ema_powers: tuple[float, ...] = ()   # extra power-function EMAs (Karras et al. 2024, EDM2), one per
                                         # exponent gamma: beta_t = (1 - 1/t)^(gamma + 1); privacy-free
    label_dropout: float = 0.1           # labels dropped for classifier-free guidance
    train_sigma: tuple[float, float] | None = None  # v only: noise levels trained on, (min, max); None:
                                         # VLoss's log-SNR range [-9, 13] (sigma 0.0015 to 90)
    physical_batch: int | None = None    # examples per vmap chunk (memory knob)
    per_layer_rules: bool | None = True  # the engine's hand-written vmap rules for conv2d, group_norm and
                                         # silu (False: plain vmap(grad); same numbers; speed knob). None
                                         # (--grad-engine auto): the rules on a CPU; on a GPU, the faster of
                                         # the two on one chunk of random inputs (`choose_grad_engine`)
    checkpoint_every: int = 100          # steps between checkpoints (and at the end)
    log_every: int = 10                  # steps between metrics rows
    seed: int | None = None              # batches, diffusion and DP noise derive from it; None: a secret
                                         # random seed (kept in the checkpoint only, reused on resume). A
                                         # given seed lets anyone who knows it replay the batches and the
                                         # noise, which voids the guarantee: tests and reproduction only
    device: str = "cpu"
    private: bool = True                 # False: --no-dp baseline, marked non-private everywhere
    init_from: str | None = None         # checkpoint trained on PUBLIC data whose EMA weights start the
                                         # run (a warm start; see `load_warm_start`)
    precision: str = "fp32"              # "bf16": --no-dp runs only, the forward and backward under
                                         # bfloat16 autocast (weights, Adam and EMA stay fp32)
    trainable: tuple[str, ...] | None = None  # fnmatch patterns of the parameters that train (names as
                                         # in the denoiser's state dict); the rest stay at their start
                                         # (public: the warm start or the seeded init) and get neither
                                         # per-example gradients nor noise. None: all train
    subspace_dim: int | None = None      # private runs: add the DP noise in the top-k subspace of PUBLIC
                                         # per-example gradients (`engine.add_noise_in_subspace`); None: off
    subspace_data: str | None = None     # name of the public dataset the subspace comes from
    subspace_every: int = 10             # steps between recomputations of the subspace (at the current weights)
    subspace_examples: int = 512         # public examples per recomputation (>= subspace_dim)
    lr_segments: tuple[tuple[int, float, str], ...] | None = None   # ((first step, lr, schedule), ...) from
                                         # step 0 on, where the lr changed on a resume; the last is (lr,
                                         # lr_schedule). None: one segment, (0, lr, lr_schedule). See `lr_at`

    def __post_init__(self) -> None:
        if self.precond not in ckpt.PRECONDS:
            raise ValueError(f"precond={self.precond!r} must be 'edm' or 'v'")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} must be one of {LR_SCHEDULES}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r} must be a finite number > 0")
        if self.lr_segments is not None:
            problem = lr_segments_problem(self.lr_segments)
            if problem is None and tuple(self.lr_segments[-1][1:]) != (self.lr, self.lr_schedule):
                problem = f"its last segment is not lr={self.lr!r}, lr_schedule={self.lr_schedule!r}"
            if problem:
                raise ValueError(f"lr_segments={self.lr_segments!r}: {problem}")
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise ValueError(f"seed={self.seed!r} must be in [0, 2**63)")
        if self.train_sigma is not None:
            if self.precond != "v":
                raise ValueError("train_sigma applies to precond='v' only")
            lo, hi = self.train_sigma
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
                raise ValueError(f"train_sigma={self.train_sigma!r} must be (min, max) with 0 < min < max")
            if not (SIGMA_LIMITS[0] <= lo and hi <= SIGMA_LIMITS[1]):   # 1e155 overflowed VLoss's exp(-logsnr)
                raise ValueError(f"train_sigma={self.train_sigma!r} must lie in [{SIGMA_LIMITS[0]:g}, "
                                 f"{SIGMA_LIMITS[1]:g}], the noise levels dpdm sample can draw at")
        if not all(math.isfinite(g) and g > 0 for g in self.ema_powers) or \
                len({ema_power_key(g) for g in self.ema_powers}) != len(self.ema_powers):
            # distinct as the checkpoint keys them (7 and 7.0000001 are both "7": one EMA, two names)
            raise ValueError(f"ema_powers={self.ema_powers!r} must be distinct positive exponents (to 6 digits)")
        if self.physical_batch is not None and self.physical_batch < 1:
            raise ValueError(f"physical_batch={self.physical_batch!r} must be >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {PRECISIONS}")
        if self.private and self.precision != "fp32":
            # The DP step's per-example weight gradients are grouped convolutions, which oneDNN's
            # bf16 kernels do not speed up here (a bf16 engine measured slower, issue 4's notes).
            raise ValueError(f"precision={self.precision!r} is for --no-dp runs only; private runs train in fp32")
        if self.subspace_dim is not None:
            if not self.private:
                raise ValueError("subspace_dim applies to private runs only")
            if not (isinstance(self.subspace_dim, int) and self.subspace_dim >= 1):
                raise ValueError(f"subspace_dim={self.subspace_dim!r} must be a positive integer")
            if not self.subspace_data:
                raise ValueError("subspace_dim needs subspace_data, the public dataset's name")
            if self.subspace_every < 1:
                raise ValueError(f"subspace_every={self.subspace_every!r} must be >= 1")
            if self.checkpoint_every % self.subspace_every:
                # A resumed run recomputes the subspace at its checkpoint's step from the saved weights,
                # as the uninterrupted run did there; so checkpoints need not hold the d x k basis.
                raise ValueError(f"subspace_every={self.subspace_every} must divide checkpoint_every="
                                 f"{self.checkpoint_every} (a resume recomputes the subspace at the checkpoint)")
            if self.subspace_examples < self.subspace_dim:
                raise ValueError(f"subspace_examples={self.subspace_examples!r} must be >= subspace_dim="
                                 f"{self.subspace_dim}")
        if self.trainable is not None and (not self.trainable or not all(
                isinstance(p, str) and p.strip() for p in self.trainable)):
            raise ValueError(f"trainable={self.trainable!r} must be None or non-empty patterns")


def select_trainable(model: torch.nn.Module, patterns: tuple[str, ...] | None) -> list[str]:
    """Freezes every parameter whose name matches none of `patterns` (fnmatch) and returns the names
    that still train. Raises TrainError when a pattern matches nothing (a typo would otherwise freeze
    silently)."""
    names = [name for name, _ in model.named_parameters()]
    if patterns is None:
        return names
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise TrainError(f"--trainable pattern(s) {', '.join(map(repr, unmatched))} match no parameter; "
                         f"the names look like {names[0]!r}, {names[len(names) // 2]!r}")
    chosen = []
    for name, p in model.named_parameters():
        train_it = any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        p.requires_grad_(train_it)
        if train_it:
            chosen.append(name)
    return chosen


def lr_segments_problem(segments) -> str | None:
    """What is wrong with a list of lr segments ((first step, lr, schedule), ...), or None: the first starts at
    step 0, the steps increase, each lr is a finite number > 0 and each schedule one of LR_SCHEDULES."""
    if not isinstance(segments, (list, tuple)) or not segments:
        return "must be a non-empty list of (first step, lr, schedule)"
    last = -1
    for seg in segments:
        if not (isinstance(seg, (list, tuple)) and len(seg) == 3):
            return f"{seg!r} is not (first step, lr, schedule)"
        start, lr, schedule = seg
        if not (isinstance(start, int) and not isinstance(start, bool) and start > last):
            return "the first steps must be integers that increase"
        if last < 0 and start != 0:
            return "the first segment must start at step 0"
        if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0):
            return f"lr {lr!r} is not a finite number > 0"
        if schedule not in LR_SCHEDULES:
            return f"schedule {schedule!r} is not one of {LR_SCHEDULES}"
        last = start
    return None


def lr_segments_of(config: "TrainConfig") -> tuple[tuple[int, float, str], ...]:
    """The run's lr segments ((first step, lr, schedule), ...): `config.lr_segments`, or one from step 0."""
    if config.lr_segments is None:
        return ((0, config.lr, config.lr_schedule),)
    return tuple((int(a), b, c) for a, b, c in config.lr_segments)


def lr_at(config: "TrainConfig", step: int, steps: int) -> float:
    """The learning rate of step `step` (0-based) of a `steps`-step run: a pure function of the run's recorded
    lr segments, so resuming continues the schedule exactly. Each segment applies its own lr and schedule from
    its first step on; a cosine one follows the run's curve (lr * (1 + cos(pi * step / steps)) / 2) at the
    run's step, not restarted."""
    lr, schedule = config.lr, config.lr_schedule
    for start, seg_lr, seg_schedule in lr_segments_of(config):
        if start <= step:
            lr, schedule = seg_lr, seg_schedule
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))
    return lr


def step_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed that is a pure function of (seed, step, stream)."""
    state = np.random.SeedSequence([int(seed), int(step), int(stream)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def run_seed_at(seed: int, lr_segments, step: int) -> int:
    """The seed that step `step`'s randomness derives from (`step_seed(run_seed_at(...), step, stream)`: its
    Poisson batch, diffusion noise, DP noise and public draws).

    The run's `seed` itself while its lr never changed (one segment up to `step`: every run, checkpoint and
    resume without an lr change draws what it drew before); from an lr change on (or a spend's segment, which a
    resume at the earlier lr replaces: `_resumed_lr_segments`), 63 bits of the sha256 of the seed and the lr
    segments ((first step, lr, schedule), ...) begun at or before `step`. A copy of a run folder
    resumed with another lr than the original then draws other batches and other DP noise from the step where
    they part, instead of the same noise at other weights (the difference of the two noisy gradients would be
    noise-free): at worst the two releases compose. The segments are in the checkpoint, so resumes replay
    exactly, and every rank of a distributed run derives the same value."""
    segments = [seg for seg in (lr_segments or ()) if int(seg[0]) <= step]
    if len(segments) <= 1:
        return int(seed)
    record = json.dumps([int(seed), [[int(a), float(b).hex(), str(c)] for a, b, c in segments]])
    return int.from_bytes(hashlib.sha256(record.encode()).digest()[:8], "big") & ((1 << 63) - 1)


def data_fingerprint(x: torch.Tensor, y: torch.Tensor | None) -> str:
    """sha256 of the training images and labels: a resumed run must see the same data."""
    h = hashlib.sha256()
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    if y is not None:
        h.update(y.detach().cpu().contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def build_denoiser(config: dict[str, Any]) -> torch.nn.Module:
    """The preconditioned network described by a checkpoint's or run's `config` dict."""
    net = build_network(
        config["model"],
        img_resolution=config["img_resolution"],
        img_channels=config["img_channels"],
        num_classes=config["num_classes"],
    )
    if config["precond"] == "v":
        return VPrecond(net)
    return EDMPrecond(net, sigma_data=config["sigma_data"])


def digest_table(digests) -> torch.Tensor:
    """Image digests (`dpdm.datasets.image_digests`, 16 bytes each) as a sorted, duplicate-free uint8 tensor
    [M, 16], as a checkpoint keeps them (`IMAGE_DIGESTS_KEY`)."""
    rows = sorted(set(digests))
    if not rows:
        return torch.zeros((0, 16), dtype=torch.uint8)
    return torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.uint8).reshape(len(rows), 16)


def digest_set(table: torch.Tensor) -> set[bytes]:
    """The digests of a `digest_table`."""
    return {bytes(row) for row in table.numpy()}


# A checkpoint's digests of every image it was trained on, its warm start's included (`digest_table`): a
# later run started from it refuses it if it saw any of that run's private images. The checkpoint stays
# private (it holds the secret seed too); a release file does not carry them.
IMAGE_DIGESTS_KEY = "image_digests"

# A run config's fingerprint (`data_fingerprint`) of its --subspace-data images and labels, as "data_digest" is
# the private data's: a resume refuses other public images under the recorded path, and takes the same images
# from wherever they lie now (h94 F3). Runs made before it was recorded resume on their path alone. Release files
# keep none of it (`export.RELEASED_CONFIG_KEYS`).
SUBSPACE_DIGEST_KEY = "subspace_data_digest"


def load_warm_start(path: str | os.PathLike, run_config: dict[str, Any], private_digests: tuple[bytes, ...] = (),
                    notes: list[str] | None = None) -> tuple[dict, dict[str, Any], set[bytes] | None]:
    """The EMA weights of a checkpoint trained on public data, the record the run keeps of it, and the
    digests of the images it was trained on (None for a checkpoint written before they were kept).

    Its labels must mean this run's classes, as `--subspace-data`'s must (`datasets.class_names_problem`, on the
    class names both runs record): label 1's embedding of a checkpoint trained on folders cat, dog would serve
    the private class 1 of folders dog, wolf. Where the checkpoint's names are not known (a ``folder:`` run of a
    dpdm that did not record them), a line saying so is appended to `notes`.

    A warm start is privacy-free only if the checkpoint's training data is public and holds none of
    the private examples: a `--no-dp` run on them would carry them into the "private" model without
    noise. dpdm refuses a checkpoint trained on any of the private images (`private_digests`, compared
    image by image on the uint8 grid, whatever their order or the file's name), itself or through its own
    warm start, on these very data (same data digest), or on the same named dataset. Transformed copies
    (shifted, flipped, re-encoded) are not recognised.
    """
    try:
        state = ckpt.load_checkpoint(path)                # weights_only=True; corrupt files refused
    except ckpt.CheckpointError as e:
        raise TrainError(f"--init-from {str(path)!r}: {e}") from None
    cfg = state["config"]
    for key in ("model", "precond", "img_resolution", "img_channels", "num_classes"):
        if cfg.get(key) != run_config[key]:
            raise TrainError(f"--init-from {str(path)!r}: it has {key}={cfg.get(key)!r}, this run "
                             f"{run_config[key]!r}")
    # The checkpoint's own data, then the data of every warm start it descends from.
    lineage = [{"dataset": cfg.get("dataset"), "data_digest": cfg.get("data_digest")},
               *((cfg.get("init") or {}).get("lineage") or [])]
    for entry in lineage:
        same_digest = entry.get("data_digest") is not None and entry["data_digest"] == run_config["data_digest"]
        same_name = same_images(entry.get("dataset"), run_config["dataset"])
        if same_digest or same_name:
            raise TrainError(f"--init-from {str(path)!r} was trained on the same data "
                             f"({entry.get('dataset')!r}), itself or through its own warm start; a warm "
                             "start must come from public data, not from the private images")
    table, seen = state.get(IMAGE_DIGESTS_KEY), None
    if table is not None:
        if not (torch.is_tensor(table) and table.dtype == torch.uint8 and table.dim() == 2 and table.shape[1] == 16):
            raise TrainError(f"--init-from {str(path)!r}: its {IMAGE_DIGESTS_KEY!r} are not a uint8 table [M, 16]")
        seen = digest_set(table)
        shared = sum(d in seen for d in private_digests)
        if shared:
            raise TrainError(f"--init-from {str(path)!r} was trained on {shared} of the {len(private_digests)} "
                             f"private images (compared image by image), itself or through its own warm start; "
                             "a warm start must come from public data that holds none of the private images")
    # After the privacy checks, which say more: a checkpoint of the private data is refused as such.
    problem = _warm_start_classes_problem(cfg, run_config)
    if problem is not None and problem.startswith("unknown:"):
        if notes is not None:
            notes.append(f"--init-from {str(path)!r}: {problem.removeprefix('unknown:')}")
    elif problem is not None:
        raise TrainError(f"--init-from {str(path)!r}: {problem}; nothing was written")
    record = {
        "checkpoint": str(path),
        "sha256": ckpt.file_sha256(path),
        "dataset": cfg.get("dataset"),
        "data_digest": cfg.get("data_digest"),
        "steps_done": int(state["ledger"]["steps_done"]),
        "private": bool(state["ledger"]["private"]),
        "weights": "ema",
        "lineage": lineage,
    }
    return state["ema"], record, seen


def _warm_start_classes_problem(cfg: dict[str, Any], run_config: dict[str, Any]) -> str | None:
    """Why the labels of the checkpoint whose config is `cfg` do not mean the classes of the run `run_config`
    (`datasets.class_names_problem`'s rules), or None. "unknown:" and a warning where that cannot be told: one
    side's class names were not recorded (a run of a dpdm before stop 47 on a ``folder:`` dataset, or a library
    run given a ``folder:`` name without `class_names`). A run without "class_names" on a built-in or ``npz:``
    dataset numbers its classes (names None)."""
    from types import SimpleNamespace

    from dpdm.datasets import class_names_problem

    if not run_config.get("num_classes"):
        return None
    sides = []
    for config, who, why in ((cfg, "its data", "a run of an older dpdm"),
                             (run_config, "the private data", "not given to dpdm.train")):
        name = config.get("dataset")
        if "class_names" in config:
            names = config["class_names"]
        elif isinstance(name, str) and not name.startswith("folder:"):
            names = None   # a built-in or npz: dataset numbers its classes
        else:
            return (f"unknown:the class names of {who} ({name!r}) were not recorded ({why}), so its labels cannot be "
                    "matched to this run's classes: label k's embedding serves class k; that is right only where "
                    "the public class folders are named as the private ones (or by label number, 0, 1, ...)")
        sides.append(SimpleNamespace(class_names=None if names is None else tuple(names), y=True,
                                     name=name if name is not None else who))
    return class_names_problem(*sides)


class EMA:
    """Exponential moving average of the weights, with DPDM's warmup."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def beta(self, num_updates: int) -> float:
        """The decay of update number `num_updates` (0-based)."""
        return min(self.decay, (1 + num_updates) / (10 + num_updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, num_updates: int) -> None:
        decay = self.beta(num_updates)
        for p_ema, p in zip(self.model.parameters(), model.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - decay)


class PowerEMA(EMA):
    """Power-function EMA (Karras et al. 2024, "Analyzing and improving the training dynamics of
    diffusion models", Eq. 2): beta_t = (1 - 1/t)^(gamma + 1) after t updates, so the average spans a
    fixed fraction of the run whatever its length (relative width sigma_rel, `power_ema_sigma_rel`).

    DPDM's warmup min(decay, (1+n)/(10+n)) is close to gamma = 8 until n nears 9 / (1 - decay), so
    with decay 0.999 any run under about 9,000 steps averages its last ~11%. Smaller gamma averages
    more of the run, and with it more of the DP noise in the iterates."""

    def __init__(self, model: torch.nn.Module, gamma: float):
        super().__init__(model, decay=1.0)
        self.gamma = float(gamma)

    def beta(self, num_updates: int) -> float:
        t = num_updates + 1                          # updates so far, this one included
        return (1.0 - 1.0 / t) ** (self.gamma + 1.0)


def power_ema_sigma_rel(gamma: float) -> float:
    """EDM2's relative width of a power-function EMA's averaging profile (its Eq. 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def ema_power_key(gamma: float) -> str:
    return f"{float(gamma):g}"


@dataclass
class Ledger:
    """What the run has spent. `epsilon_spent` is the accountant's bound after `steps_done`."""

    plan_digest: str
    plan_steps: int
    steps_done: int
    epsilon_spent: float
    delta: float
    private: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Dist:
    """The process group seen by the loop (world of one unless torch.distributed is initialized)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # What RankLost's line says (`_rank_lost_message`): whether the first step began, and the step of the
    # checkpoint on disk (0: none). `train` keeps them.
    training: bool = False
    last_saved: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls, device: str | torch.device = "cpu") -> "_Dist":
        """The default process group; `device` is where collectives' tensors live (cuda for NCCL)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), device=torch.device(device))
        return cls(device=torch.device(device))

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        return indices[self.rank :: self.world_size]

    @contextlib.contextmanager
    def _peers(self):
        """A collective whose peer stopped raises one line (RankLost), not gloo's traceback: under torchrun the
        agent stops the other ranks, but ranks started by a scheduler (RANK, WORLD_SIZE) got 39 lines of it
        (stop 42). Rank 0 writes each checkpoint whole (atomically), so the last one is valid."""
        try:
            yield
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise RankLost(_rank_lost_message(e, self)) from e

    def all_reduce_(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.world_size == 1:
            return
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors.values()])
        with self._peers():
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors.values():
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

    def all_reduce_scalars(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        with self._peers():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def broadcast_int(self, value: int) -> int:
        """Rank 0's `value` on every rank."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        with self._peers():
            dist.broadcast(t, src=0)
        return int(t.item())

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Overwrites `tensor` with rank 0's on every rank, and returns it."""
        if self.world_size > 1:
            import torch.distributed as dist

            with self._peers():
                dist.broadcast(tensor, src=0)
        return tensor

    def disagreements(self, parts: dict[str, str]) -> list[str]:
        """The names of `parts` whose values differ between ranks (every rank passes the same names in the same
        order): a 64-bit hash of each value is gathered from every rank. Only with more than one rank."""
        import torch.distributed as dist

        local = torch.tensor([int.from_bytes(hashlib.sha256(v.encode()).digest()[:8], "little", signed=True)
                              for v in parts.values()], dtype=torch.int64, device=self.device)
        gathered = [torch.zeros_like(local) for _ in range(self.world_size)]
        try:
            dist.all_gather(gathered, local)
        except RuntimeError:   # a peer refused its own input first (its line says why): "Connection closed by peer"
            raise TrainError("another rank stopped before the first step (its own line says why); nothing was "
                             "written") from None
        table = torch.stack(gathered).cpu()
        return [name for i, name in enumerate(parts) if bool((table[:, i] != table[0, i]).any())]

    def check_same_params(self, model: torch.nn.Module) -> None:
        """Raises if parameters differ across ranks (a checksum compared at each checkpoint)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        local = torch.tensor(
            [float(sum(p.detach().double().sum() for p in model.parameters()))], dtype=torch.float64,
            device=self.device,
        )
        gathered = [torch.zeros_like(local) for _ in range(self.world_size)]
        with self._peers():
            dist.all_gather(gathered, local)
        values = [g.item() for g in gathered]
        if max(values) != min(values):
            raise RuntimeError(f"parameters diverged across ranks: checksums {values}")


def _rank_lost_message(e: BaseException, dist: _Dist) -> str:
    """RankLost's line: the collective's failure, and how to go on from what is on disk. It advised `--resume`
    whatever the run held, also where no checkpoint was saved yet, which `--resume` then refused (h114 F3, stop 51).
    Rank 0 writes the checkpoints and knows the last; another rank's `last_saved` may be one ahead of the disk,
    where rank 0 stopped while writing it (a full disk)."""
    cause = " ".join(str(e).split())[:200]
    text = (f"another rank stopped {'during training' if dist.training else 'before the first step'} (its own "
            f"output says why; here: {type(e).__name__}: {cause}); ")
    if not dist.last_saved:
        # a new run there is refused where the steps run are recorded (`STEPS_RECORD`), unless it spends them
        return text + ("no checkpoint was saved: run the same command again" + (
            ", adding --spend-unsaved-steps if it says steps ran" if dist.training else "")
            + " (`--resume` has nothing to resume)")
    if dist.is_main or not dist.training:
        return text + (f"the run's checkpoint of step {dist.last_saved} is whole, and `dpdm train --resume` "
                       "continues from it")
    return text + (f"`dpdm train --resume` continues from the run's last checkpoint, that of step {dist.last_saved} "
                   "unless rank 0 stopped while writing it (rank 0's output says)")


def _weights_digest(models: Sequence[torch.nn.Module]) -> str:
    """A sha256 of the weights of `models` (names, dtypes, shapes and bytes): what `train` compares across ranks."""
    h = hashlib.sha256()
    for model in models:
        for name, t in model.state_dict().items():
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name} {t.dtype} {t.numel()};".encode())
            h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def train(
    plan_doc: "accounting.PlanDocument",
    x: torch.Tensor,
    y: torch.Tensor | None,
    num_classes: int,
    out_dir: str | os.PathLike,
    config: TrainConfig,
    *,
    dataset_name: str | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    on_start: Callable[[tuple[str, ...]], None] | None = None,
    public_data: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    class_names: Sequence[str] | None = None,
    spend_unsaved_steps: bool = False,
    image_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Trains under `plan_doc` until the run has done exactly `plan.steps` steps.

    Args:
        plan_doc: a verified plan (from `accounting.load_plan`).
        x: the private images, float32 in [-1, 1], [N, C, H, W]; N must equal the plan's size.
        y: int64 labels [N] in [0, num_classes), or None for unconditional data.
        num_classes: 0 for unconditional data.
        out_dir: the run folder (checkpoint, plan.json, config.json, metrics.csv).
        config: privacy-neutral training knobs.
        resume: continue from `out_dir/checkpoint.pt`.
        progress: show a progress bar on stderr (rank 0 only).
        on_step: called with the number of steps done after each step (tests use it).
        on_start: called on rank 0 once every check has passed, before the first step, with the run's warnings
            (the CLI's warnings are said then too): among them `SEED_NOTE` for a private run with a given seed,
            and `data_notes`' (pixels all >= 0, binary pixels, classes without an image, and on a new private run
            images that are exact copies of others).
        public_data: (images, labels) of `config.subspace_data`, PUBLIC data from which the gradient
            subspace is estimated (with config.subspace_dim only). Refused if it is the private data.
        class_names: the name of each label (`ImageData.class_names`: a ``folder:`` dataset's class folders);
            None for data that numbers its classes. Recorded, so that a warm start from this run
            (`load_warm_start`) is matched to the classes of the data it starts.
        spend_unsaved_steps: on a resume of a private run whose last attempt trained steps past the checkpoint
            (`STEPS_RECORD`) with another lr than this resume's: count them as spent and go on after them from
            the checkpoint's weights (`--spend-unsaved-steps`). Without it such a resume is refused.
        image_names: each image's file in the data folder (`ImageData.files`: a ``folder:`` dataset's), by which
            the warning of images that are exact copies of others names them; None: by their indices.

    Returns:
        The run summary: run, steps_done, epsilon_spent, plan_digest, private, ..., and discarded_steps where
        some of the steps done are spent but their updates not in the weights.

    Raises:
        TrainError: a plan document whose epsilon does not re-compute, data of another size, images that are
            not float32 in [-1, 1] or labels that are not int64 in [0, num_classes) (`ImageData`'s checks), labels
            given with num_classes=0 or none with num_classes > 0, a plan_doc that is not a PlanDocument, x or y
            that are not tensors, an existing run without --resume, a resume against another plan, a run that
            already finished, a resume at another lr of a run that trained steps past its checkpoint (`_unsaved_steps`).
    """
    if not isinstance(plan_doc, accounting.PlanDocument):   # a bare PrivacyPlan, a dict: an AttributeError
        raise TrainError(f"plan_doc is a {type(plan_doc).__name__}; train() takes a verified plan document "
                         "(accounting.load_plan(path), or accounting.make_plan_document(plan) for a PrivacyPlan)")
    for name, t in (("x", x), ("y", y)):
        if t is not None and not isinstance(t, torch.Tensor):   # numpy arrays: an AttributeError of .dim, .detach
            raise TrainError(f"{name} is a {type(t).__name__}; train() takes torch tensors (torch.from_numpy)")
    plan = plan_doc.plan
    dist = _Dist.current(config.device)
    out = Path(out_dir)
    n = int(x.shape[0])
    if config.private:
        try:
            accounting.verify_document(plan_doc)   # the ledger records its epsilon: never an unchecked one
        except accounting.PlanError as e:
            raise TrainError(str(e)) from None
        problem = noise_scale_problem(plan.noise_multiplier, plan.clip_norm)
        if problem:   # it failed at step 1 as "the run diverged ... lower --lr"
            raise TrainError(f"the plan cannot be trained: {problem}")
    if config.private and n != plan.dataset_size:
        if resume:   # a new plan does not continue this run (h141 N2, stop 54)
            raise TrainError(f"the data has {n} examples but the run's plan was made for dataset_size="
                             f"{plan.dataset_size}; a run resumes on the data it was trained on: resume on the run's "
                             "own data (nothing was written)")
        raise TrainError(
            f"the data has {n} examples but the plan was made for dataset_size={plan.dataset_size}; "
            f"a plan is valid only for data of its size: make one for this data (`dpdm plan ... --dataset-size {n}`; "
            "nothing has trained under it, so it costs nothing)"
        )
    if y is not None and y.shape[0] != n:
        raise TrainError(f"labels ({y.shape[0]}) and images ({n}) differ in number")
    if y is not None and num_classes == 0:   # the labels were dropped and an unconditional model trained
        raise TrainError("labels y were given with num_classes=0: give num_classes (labels in [0, num_classes)) for a "
                         "class-conditional model, or y=None for an unconditional one")
    if y is None and num_classes > 0:   # failed inside step 1's gradient, after the run folder was written
        raise TrainError(f"num_classes={num_classes} but no labels (y=None): give y (int64 labels in "
                         f"[0, {num_classes}), one per image), or num_classes=0 for unlabelled data")
    if class_names is not None and len(class_names) != num_classes:
        raise TrainError(f"{len(class_names)} class names for {num_classes} classes")
    if image_names is not None and len(image_names) != n:
        raise TrainError(f"{len(image_names)} image names for {n} images")
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise TrainError(f"the images are {'x'.join(map(str, x.shape[1:]))} (CxHxW); the network needs square "
                         "images (N x C x H x H)")
    x, y = x.detach(), (y.detach() if y is not None else None)   # the data is never differentiated
    _check_images(x, y, num_classes, "the training data")
    if config.subspace_dim is not None:
        _check_public_data(public_data, x, y, config, dataset_name, num_classes=num_classes)
        # Recorded absolute, as the dataset is: a name relative to the folder the run started in meant another
        # file (or none) to a resume from elsewhere, which was told both to leave it out and to give it.
        config = replace(config, subspace_data=absolute_dataset_name(config.subspace_data))
    elif public_data is not None:
        raise TrainError("public_data is used only with a gradient subspace (subspace_dim)")
    ckpt_path = out / CHECKPOINT_NAME
    state = None
    spent_to, spent_note, record_seen = None, None, None   # `_unsaved_steps`
    if ckpt_path.exists():
        if not resume:
            raise TrainError(_existing_run_message(out, ckpt_path, plan_doc))
        loaded_stat = _file_identity(ckpt_path)
        state = ckpt.load_checkpoint(ckpt_path)
        ledger = state["ledger"]
        if ledger["plan_digest"] != plan_doc.digest:
            # A run's plan is its budget: another plan (one of more steps included) does not extend it (trainwalk
            # N1, stop 56: the line named two digests, and not what to do).
            raise TrainError(
                f"the run in {str(out)!r} was trained under plan {ledger['plan_digest']}, not {plan_doc.digest}: a "
                f"run goes on only under its own plan ({str(out / 'plan.json')!r}), which no other plan extends; more "
                "training is a new run under a new plan in another --out, whose epsilon adds to this run's"
            )
        if bool(ledger["private"]) != config.private:
            raise TrainError("cannot resume a --no-dp run as private, or a private run with --no-dp")
        try:   # its epsilon the accountant's at its steps (an edited ledger had a finished run train on)
            ckpt.verify_ledger(state, plan_doc, f"checkpoint {str(ckpt_path)!r}")
        except ckpt.CheckpointError as e:
            raise TrainError(str(e)) from None
        if ledger["steps_done"] >= plan.steps:
            raise TrainError(
                f"the run in {str(out)!r} is finished: {ledger['steps_done']} of {plan.steps} steps done; "
                "the plan allows no more"
            )
        for name in ("plan.json", "config.json"):   # rewritten by the resume: a folder there was an exit 4 that
            _check_regular(out / name)              # advised waiting for the folder to be writable (h141 N3)
    elif resume:
        raise TrainError(f"nothing to resume: {str(ckpt_path)!r} does not exist")
    else:
        _check_fresh_run_folder(out, plan_doc, config.checkpoint_every)

    device = torch.device(config.device)
    if device.type == "cpu":
        keep_freed_memory_if_asked()   # DPDM_MALLOC=keep: no page faults on every step's gigabytes (dpdm/cpu.py)
    data_digest = data_fingerprint(x, y)
    public_digest = None if public_data is None else data_fingerprint(*public_data)
    # Each rank reads its own plan, data and options, and clips with its own plan's clip norm, while rank 0's
    # plan alone sizes the noise and the ledger: a rank with another clip norm broke the guarantee unseen, one
    # with other data of the same size trained on it. Every rank must start from the same inputs.
    differ = [] if dist.world_size == 1 else dist.disagreements({
        "the plan": plan_doc.digest,
        "the data": data_digest,
        "the number of classes": str(num_classes),
        "the options": json.dumps({k: v for k, v in asdict(config).items() if k != "device"}, sort_keys=True,
                                  default=str),
        "the checkpoint resumed": "" if state is None else json.dumps(
            [state["ledger"], state["config"]["train"].get("seed")], sort_keys=True, default=str),
        "the public data": public_digest or "",
    })
    if differ:
        raise TrainError(f"the ranks differ in {', '.join(differ)}: every rank must train with the same plan, data "
                         "and options (nothing was written)")
    if state is not None:
        saved_seed = int(state["config"]["train"]["seed"])
        if config.seed is not None and config.seed != saved_seed:
            raise TrainError("cannot resume with another --seed: the run's batches and noise derive from its own seed")
        if state["config"].get("data_digest") not in (None, data_digest):
            raise TrainError("cannot resume on other data: the images or their labels differ from those the run "
                             "was trained on" + _other_data_advice(state["config"].get("dataset"), dataset_name,
                                                                   plan.dataset_name))
        lr_segments, lr_note = _resumed_lr_segments(state, config)
        if config.private:   # steps a stopped attempt ran past the checkpoint: replayed, refused or spent
            spent_to, spent_note, record_seen = _unsaved_steps(out, state, lr_segments_of(
                replace(config, lr_segments=lr_segments)), plan.steps, spend_unsaved_steps, dist,
                bound=(plan_doc.digest, data_digest))
            if spent_to is not None:   # the resume goes on from the record's step: its lr segment begins there
                lr_segments, lr_note = _resumed_lr_segments(
                    {**state, "ledger": {**state["ledger"], "steps_done": spent_to}}, config)
        config = replace(config, lr_segments=lr_segments)
        seed = saved_seed
        # A run seeded by its user stays marked so on resume, which takes the seed from the checkpoint.
        seed_given = ckpt.seed_given(state["config"]) or config.seed is not None
    else:
        if config.private:   # steps an attempt killed before its first checkpoint ran: refused or spent
            spent_to, spent_note, record_seen = _unsaved_steps(out, None, (), plan.steps, spend_unsaved_steps, dist,
                                                               bound=(plan_doc.digest, data_digest))
        else:   # a --no-dp run may not take the folder of a private attempt whose steps no checkpoint holds
            record_seen = _private_steps_before_a_no_dp_run(out, plan.steps, dist)
        if config.seed is not None:
            seed, seed_given = config.seed, True
        else:
            # A public seed would let anyone replay the Poisson batches and the noise: draw a secret one (a new run
            # that spends the steps of an attempt killed before its first checkpoint too: that seed is lost).
            seed, seed_given = dist.broadcast_int(secrets.randbits(62)), False
    run_config = {
        "model": config.model,
        "precond": config.precond,
        "sigma_data": 3 ** -0.5,
        "img_resolution": int(x.shape[-1]),
        "img_channels": int(x.shape[1]),
        "num_classes": int(num_classes),
        # absolute: `dpdm sample` (which must not write over it) and `dpdm audit` find it from any folder
        "dataset": None if dataset_name is None else absolute_dataset_name(dataset_name),
        # whether that is the data the plan names (resolved here, where a relative name means what it meant to
        # the user): release files and samples show the plan's name only then (`public_dataset_name`)
        "plan_names_data": same_dataset(dataset_name, plan.dataset_name),   # a link to the plan's file too
        "data_digest": data_digest,
        **({} if public_digest is None else {SUBSPACE_DIGEST_KEY: public_digest}),
        # seed_given: the user chose the seed (--seed), so whoever knows it can replay the batches and the
        # noise; a private run so trained is marked wherever its outputs appear (summary, export, samples).
        "train": {**asdict(config), "seed": seed, "seed_given": seed_given},
    }
    if class_names is not None or not (y is not None and num_classes and isinstance(dataset_name, str)
                                       and dataset_name.startswith("folder:")):
        # The label names a warm start from this run is matched by (`load_warm_start`); kept out of release files
        # (`export.RELEASED_CONFIG_KEYS`). Left out where a folder: dataset's names were not given: not known.
        run_config["class_names"] = None if class_names is None or y is None else list(class_names)
    if y is not None and num_classes:
        # Labels with no image (an npz labelled {3, 7}): `dpdm sample` draws every class evenly, and says how many
        # of its samples are of these. Private (one record decides), as the run folder is: not in release files.
        run_config["empty_classes"] = empty_classes(y, num_classes)
    # said before the first step, with the run's other warnings
    own = image_digests(x) if state is None else None   # a new run's (its record of what it trained on, below)
    start_notes = [*([SEED_NOTE] if config.private and seed_given else []),
                   *data_notes(x, y, num_classes, digests=own if config.private else None,
                               names=image_names).values()]
    init_weights = None
    if state is not None:
        saved = state["config"]
        for key in ("model", "precond", "img_resolution", "img_channels", "num_classes"):
            if saved[key] != run_config[key]:
                raise TrainError(f"cannot resume: the run used {key}={saved[key]!r}, now {run_config[key]!r}")
        run_config["sigma_data"] = saved["sigma_data"]
        # the same data (its digest was checked), resumed from another folder: the plan still names it
        run_config["plan_names_data"] = bool(saved.get("plan_names_data")) or run_config["plan_names_data"]
        saved_init = saved.get("train", {}).get("init_from")
        if config.init_from is not None and config.init_from != saved_init:
            started = "no warm start" if saved_init is None else repr(saved_init)
            raise TrainError(f"cannot resume with --init-from {config.init_from!r}: the run started from "
                             f"{started}; resume without --init-from")
        run_config["train"]["init_from"] = saved_init
        saved_trainable = saved.get("train", {}).get("trainable")
        saved_trainable = None if saved_trainable is None else tuple(saved_trainable)
        if saved_trainable != config.trainable:
            raise TrainError(f"cannot resume: the run trained {_patterns(saved_trainable)}, now "
                             f"{_patterns(config.trainable)} (--trainable)")
        run_config["init"] = saved.get("init")
        saved_train = saved.get("train", {})
        saved_public = saved.get(SUBSPACE_DIGEST_KEY)
        for key in ("subspace_dim", "subspace_data", "subspace_every", "subspace_examples"):
            was, now = saved_train.get(key, getattr(TrainConfig, key)), getattr(config, key)
            if key == "subspace_data" and isinstance(was, str) and isinstance(now, str) and (
                    same_dataset(was, now) or saved_public is not None):
                # a run of a dpdm before stop 46 recorded the name as typed: relative to the folder it started
                # in, which is the current one where it resumes as it always did; a link to the file is that file.
                # A run that recorded its public data's fingerprint takes the same images wherever they lie now.
                was = now
            if was != now:
                raise TrainError(f"cannot resume: the run used {key}={saved_train.get(key)!r}, now {now!r}")
        if saved_public is None:
            run_config.pop(SUBSPACE_DIGEST_KEY, None)   # an older run: its record stays the path alone
        elif saved_public != public_digest:
            recorded = saved_train.get("subspace_data")
            if same_dataset(recorded, config.subspace_data):
                raise TrainError(f"cannot resume: the run's --subspace-data {config.subspace_data!r} now holds other "
                                 "images than it was trained with (their fingerprint differs from the run's record); "
                                 "put the run's file back there, or give --subspace-data naming it where it now lies")
            raise TrainError(f"cannot resume with --subspace-data {config.subspace_data!r}: it holds other images "
                             f"than the run's public data {recorded!r} (their fingerprint differs from the run's "
                             "record); give --subspace-data naming that file where it now lies")
        for key, flag in _RESUME_FIXED.items():
            was, now = saved_train.get(key, getattr(TrainConfig, key)), getattr(config, key)
            if isinstance(was, list):
                was = tuple(was)
            if was != now:
                raise TrainError(f"cannot resume with {flag} {now!r}: the run was trained with {was!r}; "
                                 "resume with the same value")
        trained_on = state.get(IMAGE_DIGESTS_KEY)
    else:
        init_seen = None
        if config.init_from is not None:
            init_weights, run_config["init"], init_seen = load_warm_start(config.init_from, run_config, own,
                                                                          notes=start_notes)
        trained_on = digest_table(own if init_seen is None else (*own, *init_seen))

    # The initial weights are public (frozen ones are exported as they are): seed them from their own
    # stream, never from the secret seed itself (torch's CPU generator would expose its low 32 bits).
    torch.manual_seed(step_seed(seed, 0, _STREAM_INIT))
    try:
        D = build_denoiser(run_config).to(device)
    except ValueError as e:
        raise TrainError(f"the {config.model!r} network cannot take "
                         f"{x.shape[-1]}x{x.shape[-1]} images: {e}") from None
    validate_model(D)
    if init_weights is not None:
        # load_state_dict casts: a warm start's float64, float16 or bool weights loaded as float32 without a word
        # (`dpdm sample` refuses such weights, `sample.weights_problem`; dpdm writes float32 only).
        own = D.state_dict()
        cast = [k for k, v in init_weights.items() if torch.is_tensor(v) and k in own and v.dtype != own[k].dtype]
        if cast:
            kind = str(init_weights[cast[0]].dtype).removeprefix("torch.")
            raise TrainError(f"--init-from {str(config.init_from)!r}: its EMA weights do not fit the "
                             f"{config.model!r} network ({cast[0]!r} is {kind}, the network's is "
                             f"{str(own[cast[0]].dtype).removeprefix('torch.')}); nothing was written")
        try:   # a warm start saved by a dpdm whose network layout has changed since, under the same preset name
            D.load_state_dict(init_weights)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise TrainError(f"--init-from {str(config.init_from)!r}: its EMA weights do not fit the "
                             f"{config.model!r} network ({ckpt.state_dict_mismatch_reason(e)}); nothing was "
                             "written") from None
        # A diverged run's weights (dpdm never saves them, an edited file may hold them): all NaN stopped at step 1
        # advising a lower --lr; a NaN in a frozen row (--trainable) zeroed that class's gradients silently (h92 F3).
        bad = [k for k, v in D.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise TrainError(f"--init-from {str(config.init_from)!r}: its EMA weights are not finite (NaN or inf in "
                             f"{len(bad)} tensor{'s' if len(bad) > 1 else ''}, first {bad[0]!r}); a warm start must "
                             "be a trained model; nothing was written")
    select_trainable(D, config.trainable)
    run_config["trained_parameters"] = sum(p.numel() for p in D.parameters() if p.requires_grad)
    if config.subspace_dim is not None and config.subspace_dim > run_config["trained_parameters"]:
        raise TrainError(f"subspace_dim={config.subspace_dim} (--public-subspace) must be at most the "
                         f"{run_config['trained_parameters']} parameters that train")
    ema = EMA(D, config.ema_decay)
    power_emas = {ema_power_key(g): PowerEMA(D, g) for g in config.ema_powers}
    optimizer = torch.optim.Adam([p for p in D.parameters() if p.requires_grad], lr=config.lr)
    steps_done = 0
    discarded = 0   # steps done whose updates the weights do not hold (a divergence discards them: `roll_back`)
    if state is not None:
        saved_powers = state.get("ema_power", {})
        if sorted(saved_powers) != sorted(power_emas):   # a mapping (`checkpoint._check_parts`)
            raise TrainError(f"cannot resume: the run kept power EMAs {sorted(saved_powers) or 'none'}, "
                             f"now {sorted(power_emas) or 'none'} (--ema-power)")
        try:   # weights or optimizer state that do not fit the network the run's config describes
            D.load_state_dict(state["model"])
            ema.model.load_state_dict(state["ema"])
            for key, pe in power_emas.items():
                pe.model.load_state_dict(saved_powers[key])
            optimizer.load_state_dict(state["optimizer"])
            for group in optimizer.param_groups:   # load_state_dict checks the counts, not the shapes
                for p in group["params"]:
                    for key, t in optimizer.state.get(p, {}).items():
                        if torch.is_tensor(t) and key != "step" and t.shape != p.shape:
                            raise ValueError(f"its optimizer's {key} has shape {tuple(t.shape)} for a parameter "
                                             f"of shape {tuple(p.shape)}")
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise TrainError(f"checkpoint {str(ckpt_path)!r} is corrupt: its weights or optimizer state do not "
                             f"fit its run ({ckpt.load_error_reason(e)})") from None
        torch.set_rng_state(state["rng"]["torch"])
        steps_done = int(state["ledger"]["steps_done"])
        discarded = int(state.get(ckpt.DISCARDED_STEPS_KEY, 0))
        if spent_to is not None:   # steps steps_done + 1 to spent_to ran and are spent: their updates discarded
            discarded += spent_to - steps_done
            steps_done = spent_to
    elif spent_to is not None:   # a new run after an attempt killed before its first checkpoint: its steps spent
        steps_done = discarded = spent_to   # on fresh weights, optimizer and EMAs, none of whose updates they hold
    # the step of the checkpoint the run starts from (0: none)
    checkpointed = 0 if state is None else int(state["ledger"]["steps_done"])
    # the checkpoint a resume starts from (0: none): RankLost's line names it (a spend's once it is written)
    dist.last_saved = checkpointed
    if dist.world_size > 1:
        # The ranks compared the options above, so the name of --init-from, not the weights it holds on each rank
        # (another copy on another node, a relative name read from another folder): they trained on the private
        # data to the first checkpoint, whose check (`check_same_params`) then failed in a traceback, after
        # config.json and metrics.csv were written (h114 F1, stop 51). One all_gather of a digest, as above.
        start = [D] if state is None else [D, ema.model, *(pe.model for pe in power_emas.values())]
        if dist.disagreements({"the starting weights": _weights_digest(start)}):
            raise TrainError(_other_weights_message(config, state, ckpt_path))
    # {"basis": [d, k] public basis, "step": the step it was computed at}. Checkpoints fall on steps
    # where it is recomputed (subspace_every divides checkpoint_every), so a resume computes it afresh.
    subspace = None

    loss_obj = training_loss(config.precond, config.train_sigma, run_config["sigma_data"])
    conditional = num_classes > 0 and y is not None
    loss_fn = engine_loss_fn(loss_obj, conditional=conditional)
    K = plan.noise_multiplicity
    if config.per_layer_rules is None:   # --grad-engine auto: decided afresh on each start (a speed knob)
        run_config["grad_engine"] = choose_grad_engine(
            D, loss_fn, loss_obj, shape=tuple(x.shape[1:]), num_classes=num_classes if conditional else 0, K=K,
            chunk=min(config.physical_batch or plan.batch_size, plan.batch_size), device=device,
            private=config.private, dist=dist)
        config = replace(config, per_layer_rules=run_config["grad_engine"]["engine"] == "rules")
    else:
        run_config["grad_engine"] = {"engine": "rules" if config.per_layer_rules else "vmap", "auto": False}

    lock, refusal, notes, record = None, None, list(start_notes), None
    if state is not None and lr_note:
        notes.append(lr_note)
    if spent_note:
        notes.append(spent_note)
    if dist.is_main:
        try:   # 0700: the folder holds the secret seed, metrics computed without noise and a digest of the data
            out.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock = _lock_run_folder(out)
            if lock is None:
                notes.append(f"{str(out)!r} cannot be locked (its file system takes no locks): nothing stops a "
                             "second dpdm train from training in this folder at the same time")
        except OSError as e:
            refusal = f"cannot create the run folder {str(out)!r} ({e.strerror or e})"
        except TrainError as e:
            refusal = str(e)
        # Another process may have trained here between the checks above and the lock.
        if refusal is None and ((ckpt_path.exists() if state is None else _file_identity(ckpt_path) != loaded_stat)
                                or ((config.private or state is None)
                                    and _read_steps_record(out)[0] != record_seen)):
            refusal = (f"the run in {str(out)!r} changed while this one started (another dpdm train?); start again"
                       + ("" if state is None else " with --resume"))
        if refusal is None and config.private:   # the record of the steps run (`STEPS_RECORD`)
            recorded = _read_steps_record(out)[1]   # a new run's none or spent (`_unsaved_steps`)
            record = _StepsRecord(out, lr_segments_of(config), recorded[0] if recorded else 0,
                                  plan_digest=plan_doc.digest, data_digest=data_digest)
            try:
                record.open()
            except TrainError as e:
                refusal, record = str(e), None
        if refusal is not None and lock is not None:
            lock.close()
        if refusal is None and lock is not None:
            _remove_checkpoint_leftovers(out)
        if refusal is None:
            try:   # a folder made beforehand (`dpdm plan --out RUN/plan.json`, an older dpdm's run) becomes private
                os.chmod(out, 0o700)
            except OSError:
                pass
    # Rank 0 alone takes the folder; the other ranks learn its verdict rather than wait for it.
    if dist.broadcast_int(int(refusal is not None)):
        raise TrainError(refusal or f"rank 0 could not take the run folder {str(out)!r}; see its message")
    bar = metrics_file = None
    finished = False
    # the step of the checkpoint on disk (0: none yet); a spend's is written below, before any step
    last_saved = checkpointed
    dist.training = True

    @contextlib.contextmanager
    def writing(what: str, path: Path):
        # An OSError while writing the run's files (the folder turned read-only, lost its permissions, filled
        # up, an I/O error): one line saying what is kept and where --resume continues, not a traceback.
        try:
            yield
        except OSError as e:
            error = RunStorageError(_storage_message(e, what, path, last_saved,
                                                     record.recorded if record is not None else 0, plan.steps))
            error.problem = _storage_problem(e, what, path)   # without the advice: `roll_back`'s line gives its own
            raise error from e

    try:   # however the run ends: the lock released, the progress bar and the metrics file closed
        segments = lr_segments_of(config)   # a step's seed: run_seed_at(seed, segments, step)
        sample_size = plan.dataset_size if config.private else n
        sampler = PoissonSampler(sample_size, plan.sample_rate, seed=run_seed_at(seed, segments, steps_done))
        x_dev = x.to(device)
        y_dev = y.to(device) if conditional else None
        params = {name: p for name, p in D.named_parameters() if p.requires_grad}  # what --trainable left

        def ledger_at(steps: int) -> Ledger:
            # epsilon after a prefix of the steps is at most the epsilon of all of them, so the plan's
            # certificate (PLD, or RDP where smaller) also bounds every prefix.
            eps = min(accounting.epsilon_spent(plan, steps), plan_doc.epsilon) if config.private else math.inf
            return Ledger(plan_doc.digest, plan.steps, steps, eps, plan.delta, config.private)

        def checkpoint_state(ledger: Ledger) -> dict[str, Any]:
            # What a checkpoint holds now (`save`), and the copy of step 0 that `roll_back` writes from.
            return {
                "format": ckpt.FORMAT,
                "model": D.state_dict(),
                "ema": ema.model.state_dict(),
                "ema_power": {k: pe.model.state_dict() for k, pe in power_emas.items()},
                "optimizer": optimizer.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "scheme": RNG_SCHEME},
                "ledger": ledger.to_dict(),
                "config": {**run_config, "private": config.private},
                **({} if trained_on is None else {IMAGE_DIGESTS_KEY: trained_on}),
                **({} if not discarded else {ckpt.DISCARDED_STEPS_KEY: discarded}),
            }

        def save(steps: int) -> Ledger:
            nonlocal last_saved, at_start
            ledger = ledger_at(steps)
            dist.check_same_params(D)
            if dist.is_main:
                with writing(f"the checkpoint of step {steps}", ckpt_path):
                    ckpt.save_checkpoint(checkpoint_state(ledger), ckpt_path)
            last_saved = dist.last_saved = steps   # on every rank; the mark's message below names it
            at_start = None
            if dist.is_main:
                with writing(f"the mark of the checkpoint of step {steps}", out / CHECKPOINTED_MARK):
                    (out / CHECKPOINTED_MARK).touch()   # this folder's run saved a checkpoint (_check_fresh_run_folder)
            return ledger

        def rolled_back_state(ledger: Ledger, kept: dict[str, Any], discarded_now: int) -> dict[str, Any]:
            # A checkpoint of `ledger` holding the weights, EMAs, optimizer and RNG state of `kept` (an earlier
            # checkpoint's, or the start's), the steps between spent but discarded: `roll_back`'s, and a resume's
            # that spends the steps a stopped attempt ran past its checkpoint (`_unsaved_steps`).
            return {**checkpoint_state(ledger), **{k: kept[k] for k in ("model", "ema", "optimizer", "rng")},
                    "ema_power": kept.get("ema_power", {}), ckpt.DISCARDED_STEPS_KEY: discarded_now}

        def roll_back(done: int) -> str:
            # The run diverged at step `done`. Its steps 1..done ran on the private data and are spent, whatever
            # became of the weights: whether and where it diverged chooses the lr it goes on with, so the release
            # depends on them. A resume that trained the steps after the last checkpoint again, on fresh noise,
            # under a ledger of the checkpoint's steps, under-counted them (h115 F1, stop 51). Rank 0 writes the
            # checkpoint again with the weights, EMAs, optimizer and RNG state of the last one (of the start where
            # none was saved) and a ledger of `done` steps: `--resume` goes on from step done + 1, whose randomness
            # no step used, and the run ends at the plan's steps. Returns TrainDiverged's line.
            nonlocal last_saved
            lost = done - last_saved
            ledger, error, unmarked = ledger_at(done), None, None
            if dist.is_main:
                try:
                    with writing(f"the checkpoint of step {done} (the run diverged)", ckpt_path):
                        kept = at_start if not last_saved else ckpt.load_checkpoint(ckpt_path)   # weights_only
                        ckpt.save_checkpoint(rolled_back_state(ledger, kept, discarded + lost), ckpt_path)
                except (RunStorageError, ckpt.CheckpointError) as e:
                    error = e
                if error is None:
                    try:   # the steps are recorded (checkpoint.pt holds them) whether or not the mark is written
                        with writing(f"the mark of the checkpoint of step {done}", out / CHECKPOINTED_MARK):
                            (out / CHECKPOINTED_MARK).touch()
                    except RunStorageError as e:
                        unmarked = e
            # Every rank waits for rank 0's write (under torchrun a rank that leaves first has the others stopped).
            if not dist.broadcast_int(int(error is None and dist.is_main)):
                lr = lr_at(config, done - 1, plan.steps)
                head = _diverged_message(done, plan.steps, lr, None, None, None)
                spent = f"steps 1 to {done} are spent but could not be recorded"
                # Only a resume with the same lr replays steps last_saved + 1.. exactly (the same seeds, batches and
                # noise, so it spends nothing new), diverges at `done` again and records it; one with a lower lr
                # trained them again on fresh noise under a ledger that never counted the first attempt's (r1 F1).
                # Not "--lr X": the lr at a step of a cosine schedule, or one printed to 6 digits, is another lr
                # to the resume, which then starts a new segment on fresh noise (r3 F1). A lower lr is refused
                # unless given --spend-unsaved-steps, which records them as this rollback would have (`STEPS_RECORD`
                # holds step `done`: it was written before the check that found the divergence).
                # At the plan's last step no lower --lr has a step left to train: the spend it would need is refused
                # (`_unsaved_steps`; r2 F2, stop 52), so the line names the replay alone, or says the plan is spent.
                replay = (f"once it can be written, `dpdm train --resume` without --lr or --lr-schedule (the run keeps "
                          f"its own) replays steps {last_saved + 1} to {done} exactly and records them; with a lower "
                          f"--lr, add --spend-unsaved-steps, which records them and goes on from step {done + 1}"
                          if last_saved and done < plan.steps else
                          f"once it can be written, `dpdm train --resume` without --lr or --lr-schedule (the run keeps "
                          f"its own) replays steps {last_saved + 1} to {done} exactly, diverges at step {done} again "
                          f"and records them: they end the plan, so no lower --lr has a step left to train"
                          if last_saved else
                          f"no checkpoint holds them: once it can be written, the same command with a lower --lr "
                          f"and --spend-unsaved-steps counts them ({STEPS_RECORD} records them) and goes on from step "
                          f"{done + 1} with new weights"
                          if done < plan.steps else
                          f"no checkpoint holds them, and they are all {plan.steps} steps of the plan, which is spent "
                          f"({STEPS_RECORD} records them): a new run on these data needs a new plan and another --out")
                if isinstance(error, ckpt.CheckpointError):   # damaged on disk since it was saved (mut54 N1)
                    replay = (f"the checkpoint of step {last_saved} cannot be read back, so `dpdm train --resume` "
                              f"refuses it too: the run cannot go on from it; count these {done} steps in what any "
                              "new run on these data releases (another --out)")
                if error is None:   # not rank 0: its output says why
                    return head + f"{spent} (rank 0's output says why); {replay}"
                return head + f"{spent}: {getattr(error, 'problem', error)}; {replay}"
            last_saved = dist.last_saved = done
            # The weights hold the updates of the steps not discarded, this divergence's and earlier ones' (r1 F2).
            line = _diverged_message(done, plan.steps, lr_at(config, done - 1, plan.steps), done - discarded - lost,
                                     ledger.epsilon_spent if config.private else None, plan_doc.epsilon,
                                     rolled_back_before=bool(discarded))
            if unmarked is not None:   # as `save`'s: the checkpoint is whole, its mark alone is missing (h121 N1)
                line += (f"; only the checkpoint's mark could not be written ({unmarked.problem}): the checkpoint is "
                         "whole, and the resume goes on from it")
            return line

        if spent_to is not None and state is None:
            # The steps of an attempt killed before its first checkpoint, spent (`_unsaved_steps`): a checkpoint of
            # them is written before any step, holding this run's fresh weights, so that a crash from here on
            # leaves them counted and a resume goes on from it.
            save(steps_done)
        elif spent_to is not None:
            # The steps a stopped attempt ran after the checkpoint, spent (`_unsaved_steps`): the checkpoint is
            # written again as a divergence's rollback writes it, before any step, so that a crash from here on
            # leaves them counted. Its ledger is that of spent_to steps, its weights the checkpoint's.
            if dist.is_main:
                with writing(f"the checkpoint of step {steps_done} (steps {last_saved + 1} to {steps_done} spent)",
                             ckpt_path):
                    ckpt.save_checkpoint(rolled_back_state(ledger_at(steps_done), state, discarded), ckpt_path)
            last_saved = dist.last_saved = steps_done
        if dist.is_main:
            # After a spend's checkpoint (above), so that config.json only ever shows an lr some start trained at: a
            # spend killed before its checkpoint landed left config.json at its new lr while the steps past the
            # checkpoint ran at the old one, and a damaged record's refusal sent the user to config.json's lr, which
            # trained them again on fresh noise, the first attempt's in no ledger (h133 F1, stop 53).
            with writing("plan.json", out / "plan.json"):
                _write_json(out / "plan.json", plan_doc.to_dict())
            shown = "(given with --seed: not secret)" if seed_given else "(secret: in checkpoint.pt only)"
            public = {**run_config, "train": {**run_config["train"], "seed": shown},
                      "private": config.private}
            with writing("config.json", out / "config.json"):   # the data's digest: its owner's, as the checkpoint
                _write_json(out / "config.json", public, mode=0o600)
        metrics_path = out / "metrics.csv"
        metrics_file = None
        writer = None
        if dist.is_main:
            # The header and the rows up to the checkpoint, written atomically before any step: a run killed
            # before its first row still has the header, and rows logged after the checkpoint are redone.
            with writing("metrics.csv", metrics_path):
                _truncate_metrics(metrics_path, steps_done)
                metrics_file = open(metrics_path, "a", newline="")
            writer = csv.writer(metrics_file)

        if on_start is not None and dist.is_main:
            on_start(tuple(notes))
        bar = None
        if progress and dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=plan.steps, initial=steps_done, file=sys.stderr, unit="step",
                       desc="train" if config.private else "train (NON-PRIVATE)", dynamic_ncols=True)

        # What a checkpoint of step 0 would hold, on the CPU, until one is saved: a run that diverges before its
        # first checkpoint goes on from it (`roll_back`).
        at_start = _cpu_copy(checkpoint_state(ledger_at(0))) if dist.is_main and not last_saved else None
        eps_now = ledger_at(steps_done).epsilon_spent
        shown, logged_at = {}, steps_done   # the progress bar's postfix at the last logged step
        t_last, steps_last = time.perf_counter(), steps_done
        ledger = None
        probe = (torch.zeros(1, *x.shape[1:], device=device), torch.ones(1, device=device),
                 torch.zeros(1, dtype=torch.long, device=device) if conditional else None)
        while steps_done < plan.steps:
            step = steps_done
            seed_now = run_seed_at(seed, segments, step)   # the seed itself unless the lr changed by now
            if sampler.seed != seed_now:
                sampler = PoissonSampler(sample_size, plan.sample_rate, seed=seed_now)
            idx = sampler.batch(step).to(device)
            local = dist.shard(idx)
            g_diff = _generator(step_seed(seed_now, step, _STREAM_DIFFUSION), device)
            # Every rank draws the diffusion randomness of the whole logical batch, then takes its
            # shard, so the result does not depend on the number of ranks.
            y_b = None
            if conditional:
                y_b = drop_labels(y_dev[idx], config.label_dropout, num_classes, generator=g_diff)
            sigma, noise = loss_obj.draw(len(idx), K, tuple(x.shape[1:]), generator=g_diff, device=device)
            pos = torch.arange(len(idx), device=device)[dist.rank :: dist.world_size]
            batch = [x_dev[local]]
            if conditional:
                batch.append(y_b[pos])
            batch += [sigma[pos], noise[pos]]
            stats: dict[str, Any] = {}
            if config.subspace_dim is not None and (subspace is None or step % config.subspace_every == 0):
                subspace = {"basis": _public_basis(D, loss_obj, loss_fn, public_data, config, conditional,
                                                   num_classes, K, plan.clip_norm,
                                                   step_seed(seed_now, step, _STREAM_PUBLIC), device, dist),
                            "step": step}
            if config.private:
                grads = plan_private_grad(D, loss_fn, batch, plan, seed=seed, step=step, lr_segments=segments,
                                          chunk_size=config.physical_batch, stats=stats, dist=dist,
                                          basis=None if subspace is None else subspace["basis"],
                                          per_layer_rules=config.per_layer_rules)
                loss_n = float(stats.get("loss_count", 0))     # finite losses (a NaN image is zeroed, not averaged)
                loss_sum, loss_n, count = dist.all_reduce_scalars(
                    [float(stats["loss_mean"]) * loss_n if loss_n else 0.0, loss_n, float(len(local))])
                clipped = dist.all_reduce_scalars([float(stats.get("clipped_fraction", 0.0)) * len(local)])[0]
            else:
                with autocast_for(config.precision, device):
                    grads, loss_sum = _nonprivate_grad_sum(D, loss_obj, batch, conditional, params,
                                                           chunk_size=config.physical_batch)
                loss_sum, count = dist.all_reduce_scalars([loss_sum, float(len(local))])
                loss_n = count
                dist.all_reduce_(grads)
                grads = {k: v / max(count, 1.0) for k, v in grads.items()}
                clipped = 0.0
            if config.private or count > 0:
                for name, p in params.items():
                    p.grad = grads[name].to(p.dtype)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(config, step, plan.steps)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                # The EMAs' warmups count the updates the weights hold: those of discarded steps are not among them.
                ema.update(D, step - discarded)
                for pe in power_emas.values():
                    pe.update(D, step - discarded)
            # Weights that are NaN or inf, or that give NaN or inf on a fixed input: the run has diverged.
            # Judged on the (noisy) weights alone, never on the private batch's losses: when a run stops must
            # not depend on the private data.
            diverged = not _finite_model(D, params, probe)
            steps_done = step + 1
            if not diverged:
                _maybe_inject_fault(dist.rank, steps_done)
                if on_step is not None:
                    on_step(steps_done)
            if record is not None:   # before anything shows the step: its metrics row, the bar, a checkpoint
                with writing(f"the record of step {steps_done}", record.path):
                    record.note(steps_done)

            if steps_done % config.log_every == 0 or steps_done == plan.steps:
                eps_now = ledger_at(steps_done).epsilon_spent
                now = time.perf_counter()
                rate = (steps_done - steps_last) / max(now - t_last, 1e-9)
                t_last, steps_last = now, steps_done
                loss_mean = loss_sum / loss_n if loss_n else float("nan")
                if writer is not None:   # an upper bound: rounded up, as everywhere else (epsilon_text)
                    with writing(f"the metrics row of step {steps_done}", metrics_path):
                        writer.writerow([steps_done, int(count), f"{loss_mean:.6g}",
                                         f"{clipped / count if count else 0.0:.4f}",
                                         epsilon_text(eps_now, 6), f"{rate:.4g}", int(config.private)])
                        metrics_file.flush()
            if diverged:   # after its metrics row: the step is spent
                raise TrainDiverged(roll_back(steps_done))
            if bar is not None:
                # The postfix is set (unshown) before the update draws the bar: the epsilon shown is that of the
                # step the bar shows, or, between logged steps, that of the last logged step, which it names.
                if steps_done % config.log_every == 0 or steps_done == plan.steps:
                    shown = dict(loss=f"{loss_mean:.4f}", lr=f"{lr_at(config, step, plan.steps):.3g}",
                                 eps=epsilon_text(eps_now) if config.private else "inf (no-dp)")
                    bar.set_postfix(shown, refresh=False)
                    logged_at = steps_done
                elif shown:
                    bar.set_postfix({**shown, "lr": f"{lr_at(config, step, plan.steps):.3g}",
                                     "eps": shown["eps"] + (f" (step {logged_at})" if config.private else "")},
                                    refresh=False)
                bar.update(1)
            if steps_done % config.checkpoint_every == 0 or steps_done == plan.steps:
                ledger = save(steps_done)
        finished = True
    finally:
        if bar is not None:
            bar.close()
        if record is not None:
            record.close()
        if metrics_file is not None:
            try:
                metrics_file.close()
            except OSError:   # the row it still holds could not be written: the error on its way says so
                if finished:
                    raise
        if lock is not None:
            lock.close()
    if ledger is None:
        ledger = ledger_at(steps_done)
    return {
        "run": str(out),
        "steps_done": ledger.steps_done,
        "plan_steps": plan.steps,
        "epsilon_spent": ledger.epsilon_spent if config.private else None,
        "delta": plan.delta,
        "plan_digest": plan_doc.digest,
        "private": config.private,
        "seed_given": seed_given,
        "checkpoint": str(ckpt_path),
        "init": run_config.get("init"),
        "grad_engine": run_config["grad_engine"]["engine"] if config.private else None,
        # the lr of the last step done, and every change of it (on a resume) as (first step, lr, schedule)
        "lr": lr_at(config, max(ledger.steps_done - 1, 0), plan.steps),
        "lr_segments": [list(seg) for seg in lr_segments_of(config)],
        # steps spent whose updates the weights do not hold (a divergence's rollback, --spend-unsaved-steps)
        **({ckpt.DISCARDED_STEPS_KEY: discarded} if discarded else {}),
    }


def _existing_run_message(out: Path, ckpt_path: Path, plan_doc) -> str:
    """TrainError's line where a new run's --out holds a run's checkpoint: "pass --resume" only where a resume
    would go on (h124 F4: a finished run's, or one of another plan, was refused again by --resume)."""
    try:   # weights_only; a checkpoint that cannot be read: the resume's refusal says why
        ledger = ckpt.load_checkpoint(ckpt_path)["ledger"]
        steps, plan_steps, digest = int(ledger["steps_done"]), int(ledger["plan_steps"]), ledger["plan_digest"]
    except (ckpt.CheckpointError, OSError, KeyError, TypeError, ValueError):
        steps = plan_steps = digest = None
    if digest is not None and digest != plan_doc.digest:
        return (f"{str(out)!r} already holds a run trained under another plan ({str(digest)[:19]}...), which "
                "--resume under this one refuses: choose another --out")
    if steps is not None and steps >= plan_steps:
        return (f"{str(out)!r} already holds a finished run ({steps} of {plan_steps} steps done), which --resume "
                "refuses: choose another --out")
    return f"{str(out)!r} already holds a run; pass --resume to continue it or choose another --out"


def _other_weights_message(config: TrainConfig, state: dict[str, Any] | None, ckpt_path: Path) -> str:
    """TrainError's line where the ranks would start from different weights (`train`)."""
    if state is not None:
        return (f"the ranks differ in the weights they resume: {str(ckpt_path)!r} holds another checkpoint of the run "
                "on some rank (a stale copy of the run folder?); give every rank the same run folder (nothing was "
                "written)")
    if config.init_from is not None:
        return (f"the ranks differ in the weights they start from: --init-from {str(config.init_from)!r} holds other "
                "weights on some rank (another copy, or a relative name read from another folder); give every rank "
                "the same file (nothing was written)")
    return ("the ranks differ in the weights they start from, built from the same seed: run every rank with the same "
            "dpdm and torch (nothing was written)")


def _storage_message(e: OSError, what: str, path: Path, last_saved: int, ran: int = 0,
                     plan_steps: int | None = None) -> str:
    """RunStorageError's line: the file that could not be written and why, what is kept, and how to go on. `ran`:
    the steps the run's record holds (`STEPS_RECORD`), which a new run in the folder spends or is refused; where
    they are all `plan_steps` of the plan, it is spent (`_unsaved_steps_of_a_new_run` refuses the spend)."""
    text = f"{_storage_problem(e, what, path)}; files written before are kept; "
    if last_saved:
        return text + (f"`dpdm train --resume` continues from the checkpoint of step {last_saved} once "
                       f"{str(path.parent)!r} can be written")
    if ran and plan_steps is not None and ran >= plan_steps:
        return text + (f"no checkpoint was saved, and all {plan_steps} steps of the plan ran: it is spent, though no "
                       "checkpoint holds its weights; a new run on these data needs a new plan and another --out")
    if ran:
        what_ran, them = ("step 1", "it") if ran == 1 else (f"steps 1 to {ran}", "them")
        return text + (f"no checkpoint was saved, and {what_ran} ran: once {str(path.parent)!r} can be written, the "
                       f"same command with --spend-unsaved-steps counts {them} and goes on from step {ran + 1}")
    return text + f"no checkpoint was saved: run the same command again once {str(path.parent)!r} can be written"


def _storage_problem(e: OSError, what: str, path: Path) -> str:
    """The file that could not be written, and why (the first part of `_storage_message`)."""
    code = errno.errorcode.get(e.errno, "") if isinstance(e.errno, int) else ""
    reason = " ".join(str(e.strerror or e).split()) + (f", {code}" if code else "")
    head = "no space left on the device: " if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"{head}cannot write {what} ({str(path)!r}: {reason})"


def _diverged_message(done: int, steps: int, lr: float, weights_of: int | None, eps_spent: float | None,
                      eps_plan: float | None, *, rolled_back_before: bool = False) -> str:
    """TrainDiverged's line: where the run stopped, what it spent, what its checkpoint now holds (the weights of
    step `weights_of`, 0: the start, with a ledger of `done` steps; None: only the first part, the caller says the
    rest), and how to go on within the plan. `weights_of` counts the steps whose updates the weights hold; where
    the run was rolled back before (`rolled_back_before`), that is no step number of the run (r3 F2). It said the lr could change "at no privacy cost" and the steps after
    the checkpoint were trained again under a ledger that did not count them (h115 F1, stop 51)."""
    text = (f"the run diverged: its weights, or its output on a fixed input, became NaN or inf at step {done} of "
            f"{steps} (lr {lr:g}); ")
    if weights_of is None:
        return text
    what, are = ("step 1", "is") if done == 1 else (f"steps 1 to {done}", "are")
    spent = (f"{what} ran on the private data and {are} spent (epsilon {epsilon_text(eps_spent)} of the plan's "
             f"{epsilon_text(eps_plan)})" if eps_spent is not None else f"{what} {are} done (--no-dp)")
    held = ("the weights it started from" if not weights_of else
            f"the weights its last checkpoint held (the updates of {weights_of} step{'s' if weights_of != 1 else ''})"
            if rolled_back_before else
            f"the weights of step {weights_of}")
    lost = done - weights_of
    if done >= steps:
        return text + (f"{spent}, and the plan has none left: the run's checkpoint holds {held}; a new run on these "
                       "data spends a new plan on top")
    return text + (f"lower --lr. {spent[0].upper()}{spent[1:]}; its checkpoint now holds {held} with a ledger of "
                   f"{done} step{'s' if done != 1 else ''}: dpdm train --resume and a lower --lr continue from step "
                   f"{done + 1} within the plan (the model loses {lost} step{'s' if lost != 1 else ''}"
                   + (f", the budget does not get {'them' if lost != 1 else 'it'} back)" if eps_spent is not None
                      else ")"))


def _cpu_copy(obj: Any) -> Any:
    """A copy of `obj` (a checkpoint's state: dicts, lists and tuples of tensors and plain values) whose tensors
    are copies on the CPU."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


# --grad-engine auto: plain vmap is taken only where it is this much faster than the rules on the timed
# chunk, and its peak memory stays within this share of the GPU's (a Poisson batch, when not chunked,
# can exceed the expected size by a few standard deviations).
AUTO_MIN_GAIN = 0.05
AUTO_MEMORY_SHARE = 0.8


def pick_grad_engine(seconds: dict[str, float | None], peak_gib: dict[str, float | None],
                     memory_gib: float | None) -> str:
    """"rules" or "vmap" from one chunk timed each way (None: that engine failed, e.g. out of memory).

    Plain vmap only where it ran, is at least AUTO_MIN_GAIN faster than the rules (or the rules failed),
    and its peak stays within AUTO_MEMORY_SHARE of the device's memory. On an H200 (mnist preset, chunks
    of 1024, K 2): rules 0.70 s and 19.2 GiB, plain vmap 0.42 s and 62.8 GiB: vmap."""
    plain, rules = seconds.get("vmap"), seconds.get("rules")
    if plain is None:
        return "rules"
    if rules is not None and plain >= (1 - AUTO_MIN_GAIN) * rules:
        return "rules"
    peak = peak_gib.get("vmap")
    if memory_gib is not None and peak is not None and peak > AUTO_MEMORY_SHARE * memory_gib:
        return "rules"
    return "vmap"


def time_grad_engines(D, loss_fn, loss_obj, *, shape: tuple[int, ...], num_classes: int, K: int, chunk: int,
                      device: torch.device, repeats: int = 2) -> dict[str, Any]:
    """Seconds (best of `repeats`, after a warm-up) and peak GPU memory of one chunk of `chunk` examples'
    clipped gradient sum with the engine's rules and with plain vmap. The inputs are random images of the
    data's shape (and random labels): no private data is touched, so the choice costs no privacy.
    An engine that runs out of memory (`dpdm.memory.out_of_memory`) gets None."""
    g = _generator(0, device)
    batch = [torch.rand((chunk, *shape), generator=g, device=device) * 2 - 1]
    if num_classes:
        batch.append(torch.randint(0, num_classes, (chunk,), generator=g, device=device))
    sigma, noise = loss_obj.draw(chunk, K, shape, generator=g, device=device)
    batch += [sigma, noise]
    cuda = device.type == "cuda"
    seconds: dict[str, float | None] = {}
    peak_gib: dict[str, float | None] = {}
    for name in ("rules", "vmap"):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        try:
            for _ in range(1 + repeats):
                t0 = time.perf_counter()
                out = clipped_grad_sum(D, loss_fn, *batch, clip_norm=1.0, chunk_size=chunk,
                                       per_layer_rules=name == "rules")
                if cuda:
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
                del out
            seconds[name] = round(min(times[1:]), 4)
        except RuntimeError as e:   # torch's OutOfMemoryError, and cuBLAS's or cuDNN's failed allocation (h135 F2)
            if not out_of_memory(e):
                raise
            seconds[name] = None
        peak_gib[name] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None
    if cuda:
        torch.cuda.empty_cache()
    return {"chunk": chunk, "K": K, "seconds": seconds, "peak_gib": peak_gib}


def choose_grad_engine(D, loss_fn, loss_obj, *, shape: tuple[int, ...], num_classes: int, K: int, chunk: int,
                       device: torch.device, private: bool, dist: "_Dist") -> dict[str, Any]:
    """--grad-engine auto. On a CPU (and for --no-dp runs, which use no per-example engine) the rules,
    untimed: they were faster there at the sizes dpdm trains at (benchmarks/engine.py, README). On a GPU,
    `time_grad_engines` then `pick_grad_engine`; rank 0's choice holds on every rank."""
    if not private or device.type != "cuda":
        return {"engine": "rules", "auto": True, "timed": None}
    timed = time_grad_engines(D, loss_fn, loss_obj, shape=shape, num_classes=num_classes, K=K, chunk=chunk,
                              device=device)
    memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    engine = pick_grad_engine(timed["seconds"], timed["peak_gib"], memory_gib)
    engine = ("rules", "vmap")[dist.broadcast_int(("rules", "vmap").index(engine))]
    info = (f"grad engine (auto): {engine}; one chunk of {chunk} x K {K}: rules {timed['seconds']['rules']} s, "
            f"plain vmap {timed['seconds']['vmap']} s (peak {timed['peak_gib']['vmap']} GiB of {memory_gib:.0f})")
    if dist.is_main:
        print(f"dpdm: {info}", file=sys.stderr)
    return {"engine": engine, "auto": True, "timed": timed}


def training_loss(precond: str, train_sigma, sigma_data: float):
    """The loss object `dpdm train` trains a run of this preconditioning with (VLoss for "v", over `train_sigma`
    where given; EDMLoss at `sigma_data` otherwise); `dpdm audit` checks the run's network with the same."""
    if precond == "v":
        return VLoss() if train_sigma is None else VLoss.from_sigma_range(*train_sigma)
    return EDMLoss(sigma_data=sigma_data)


def plan_private_grad(D, loss_fn, batch, plan, *, seed: int, step: int, lr_segments=None,
                      chunk_size: int | None = None, stats: dict | None = None, dist: _Dist | None = None,
                      basis: torch.Tensor | None = None, per_layer_rules: bool = True) -> dict[str, torch.Tensor]:
    """The private gradient of `dpdm train`'s step `step` of a run seeded `seed` (with the run's `lr_segments`:
    None, or one segment, for a run whose lr never changed): `distributed_private_grad` with the plan's clip norm,
    noise multiplier and expected batch size, and the step's own noise seed
    (`step_seed(run_seed_at(seed, lr_segments, step), step, _STREAM_DP_NOISE)`).

    `dpdm audit`'s mechanism checks call this very function (`audits.suite.training_private_grad`), and so do
    its canary runs (`audits.canary.train_with_canaries`). Their noise tests compare random steps of one run seed,
    consecutive steps (noise_fresh_each_step), and the noise alone of steps 0 to 2047 and 2**k exactly
    (noise_never_repeats), so noise that repeats across steps fails them (every N steps for N < 2048 or a power of
    two). What the training loop passes here is not audited (`audits.suite.LOOP_NOT_AUDITED`)."""
    return distributed_private_grad(D, loss_fn, *batch, clip_norm=plan.clip_norm,
                                    noise_multiplier=plan.noise_multiplier, expected_batch_size=plan.batch_size,
                                    noise_seed=step_seed(run_seed_at(seed, lr_segments, step), step,
                                                         _STREAM_DP_NOISE), chunk_size=chunk_size,
                                    stats=stats, dist=dist, basis=basis, per_layer_rules=per_layer_rules)


def distributed_private_grad(
    D: torch.nn.Module,
    loss_fn: Callable,
    *local_batch: torch.Tensor,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    noise_seed: int,
    chunk_size: int | None = None,
    stats: dict | None = None,
    dist: _Dist | None = None,
    basis: torch.Tensor | None = None,
    per_layer_rules: bool = True,
) -> dict[str, torch.Tensor]:
    """One logical DP-SGD step's gradient over the ranks of `dist` (a world of one by default).

    Each rank clips and sums the per-example gradients of its shard; rank 0 alone adds
    N(0, (noise_multiplier * clip_norm)^2) to its sum, exactly once per logical step; the sums are
    all-reduced and divided by the expected (public) batch size of the whole logical batch. With one
    rank this is `dpdm.engine.private_grad`. With a public `basis` [d, k], each rank's sum is
    projected onto it and rank 0's noise lies in it (`dpdm.engine.add_noise_in_subspace`); the
    projection is linear, so the all-reduced result is the projected sum plus one noise draw.
    """
    dist = dist or _Dist.current()
    grad_sum = clipped_grad_sum(D, loss_fn, *local_batch, clip_norm=clip_norm, chunk_size=chunk_size, stats=stats,
                                per_layer_rules=per_layer_rules)
    if basis is not None:
        device = next(iter(grad_sum.values())).device
        grad_sum = add_noise_in_subspace(grad_sum, basis, noise_multiplier=noise_multiplier if dist.is_main else 0.0,
                                         clip_norm=clip_norm, expected_batch_size=1.0,
                                         generator=noise_generator(noise_seed, device))
    elif dist.is_main:
        device = next(iter(grad_sum.values())).device
        grad_sum = add_noise(grad_sum, noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                             expected_batch_size=1.0, generator=noise_generator(noise_seed, device))
    dist.all_reduce_(grad_sum)
    return {k: v / expected_batch_size for k, v in grad_sum.items()}


def data_notes(x: torch.Tensor, y: torch.Tensor | None, num_classes: int,
               digests: Sequence[bytes] | None = None, names: Sequence[str] | None = None) -> dict[str, str]:
    """`train()`'s notes on data that passed `_check_images` yet looks mistaken, by kind: "nonnegative" (every pixel
    >= 0: images in [0, 1], as torchvision's ToTensor() gives them, train a washed-out model), "binary" (every pixel
    -1 or -1 + 2/255: 0 and 1 of 0..255, floats in [0, 1] cast to uint8), "empty_classes" (classes without an
    image) and, given the images' `digests` (`image_digests(x)`, which a new run computes anyway), "duplicates"
    (images that are exact copies of others, `duplicate_images`, named by their files where `names` gives them: each
    is protected only as a group of its copies; h144 F1, stop 54). Warned, not refused: bright or binary images, a
    publicly fixed class count and two people's identical images are legitimate. The CLI says the kinds it computes
    without `digests` in its own words, and "duplicates" as `train()` gives it."""
    notes = {}
    if len(x) and float(x.min()) >= 0:
        notes["nonnegative"] = (f"every pixel of the images is >= 0 (they span [{float(x.min()):g}, "
                                f"{float(x.max()):g}]); train() takes pixels in [-1, 1], and images in [0, 1] (as "
                                "torchvision's ToTensor() gives them) train a washed-out model: map them with "
                                "x * 2 - 1")
    elif len(x) and round((float(x.max()) + 1) * 127.5) <= 1:
        notes["binary"] = ("every pixel of the images is -1 or -1 + 2/255 (0 or 1 of 0..255), so they train as "
                           "near-black images; floats in [0, 1] cast with x.astype(np.uint8) give that (binary images "
                           "are -1 and 1)")
    empty = empty_classes(y, num_classes) if y is not None and num_classes else []
    if empty:
        shown = ", ".join(map(str, empty[:12])) + (", ..." if len(empty) > 12 else "")
        one = len(empty) == 1
        notes["empty_classes"] = (f"{len(empty)} of the {num_classes} classes {'has' if one else 'have'} no image "
                                  f"(label{'' if one else 's'} {shown}): the model learns nothing of "
                                  f"{'it' if one else 'them'}, yet sampling draws every class evenly; remap the "
                                  "labels to 0..k-1 unless the class count is fixed publicly")
    copies = None if digests is None else duplicate_images(digests, names)
    if copies:
        notes["duplicates"] = copies
    return notes


def _check_images(x: torch.Tensor, y: torch.Tensor | None, num_classes: int, name: str, of: str = "") -> None:
    """TrainError unless `x` (and `y`) pass `ImageData`'s checks (float32 N x C x H x W, int64 labels in
    [0, num_classes)) and the pixels are finite and in [-1, 1]: a library caller's raw tensors of uint8 images
    trained a whole plan on 0..255 pixels (stop 50, h110 F3), and a NaN pixel's example had its gradient zeroed by
    the engine in silence (stop 42). `of`: " of DATA" where the images are not the private ones."""
    try:
        ImageData(x, y if num_classes else None, num_classes, name)
    except DataError as e:
        raise TrainError(str(e)) from None
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x.flatten(1))).any(1).sum())
        raise TrainError(f"{bad} of the {len(x)} images{of} hold a NaN or infinite pixel")
    if len(x) and not -1 <= float(x.min()) <= float(x.max()) <= 1:
        pixels = f"the images{of}: their pixels" if of else "the images' pixels"
        raise TrainError(f"{pixels} span [{float(x.min()):g}, {float(x.max()):g}]; train() needs them in [-1, 1] "
                         "(uint8 pixels p as p / 127.5 - 1, as dpdm.datasets loads them)")


def _check_public_data(public_data, x, y, config: TrainConfig, dataset_name: str | None, *,
                       num_classes: int | None = None) -> None:
    """The subspace's data must be given, public and shaped alike. Public: not the private dataset or its
    source, no private image (`datasets.shared_images`), and fewer than max(1, 0.1% of its images)
    near-copies of them (`datasets.near_copies`: shifted by a pixel, mirrored, brightened, noised or re-encoded;
    under 16 pixels a side, exact copies only), since the subspace is computed from it without noise."""
    if public_data is None:
        raise TrainError(f"a gradient subspace needs the public data ({config.subspace_data!r})")
    px, py = public_data
    if py is not None and num_classes is not None and len(py) and \
            not (0 <= int(py.min()) and int(py.max()) < num_classes):
        # An index error deep in the network (label 9 of 3 classes), or, at num_classes, the dropped-label class.
        raise TrainError(f"the subspace data {config.subspace_data!r} has labels {int(py.min())}..{int(py.max())}, "
                         f"the private data {num_classes} classes (0..{num_classes - 1})")
    # as the private images are checked: 0..255 floats trained the subspace silently, float64 failed at step 1
    # after plan.json was written, and uint8 was "spans fewer than K directions" (r2 F2, stop 50)
    _check_images(px.detach(), None if py is None else py.detach(), num_classes or 0,
                  f"the subspace data {config.subspace_data!r}", f" of the subspace data {config.subspace_data!r}")
    if same_images(config.subspace_data, dataset_name):
        raise TrainError(f"the subspace data {config.subspace_data!r} is the private dataset {dataset_name!r} "
                         "(or its source); the subspace must come from public data")
    if tuple(px.shape[1:]) != tuple(x.shape[1:]):
        raise TrainError(f"the subspace data {config.subspace_data!r} has images of shape {tuple(px.shape[1:])}, "
                         f"the private data {tuple(x.shape[1:])}")
    shared = shared_images(px, x)
    if shared:
        raise TrainError(f"the subspace data {config.subspace_data!r} holds {shared} of the {len(x)} private "
                         "images; the subspace must come from public data")
    if len(px) < config.subspace_examples:
        raise TrainError(f"the subspace data {config.subspace_data!r} has {len(px)} images, fewer than "
                         f"subspace_examples={config.subspace_examples}")
    if (y is None) != (py is None):
        raise TrainError(f"the subspace data {config.subspace_data!r} and the private data must both have "
                         "labels or both have none")
    problem = near_copy_problem(px, x, of="the private images", original="private image {}")   # last: seconds
    if problem:
        raise TrainError(f"the subspace data {config.subspace_data!r} {problem}; the subspace must come from public "
                         "data")


def _public_basis(D, loss_obj, loss_fn, public_data, config: TrainConfig, conditional: bool, num_classes: int,
                  K: int, clip_norm: float, seed: int, device, dist: _Dist | None = None) -> torch.Tensor:
    """`engine.public_subspace` at the current weights, from `config.subspace_examples` public examples
    (drawn, with their diffusion noise and label drops, from the public stream of this step).

    Rank 0 computes it and every rank gets rank 0's. Each rank projects its own clipped sum and only rank 0
    adds noise, so a rank whose basis differed (nondeterministic CUDA kernels, or an ill-conditioned top-k)
    would put part of its sum outside the noised subspace, with no noise on it."""
    dist = dist or _Dist()
    basis = problem = None
    if dist.is_main:
        px, py = public_data
        g = _generator(seed, torch.device("cpu"))
        idx = torch.randperm(len(px), generator=g)[:config.subspace_examples]
        batch = [px[idx].to(device)]
        if conditional:
            batch.append(drop_labels(py[idx], config.label_dropout, num_classes, generator=g).to(device))
        sigma, noise = loss_obj.draw(len(idx), K, tuple(px.shape[1:]), generator=g)
        batch += [sigma.to(device), noise.to(device)]
        try:
            basis = public_subspace(D, loss_fn, *batch, dim=config.subspace_dim, clip_norm=clip_norm,
                                    chunk_size=config.physical_batch, per_layer_rules=config.per_layer_rules)
        except SubspaceSpanError as e:   # the public data cannot give that many directions: the user's settings
            problem = str(e)
    if dist.broadcast_int(int(problem is not None)):   # the other ranks stop with rank 0, not in the broadcast
        raise TrainError(f"subspace_dim={config.subspace_dim} (--public-subspace): "
                         + (problem or "rank 0 could not compute the public subspace (its own line says why)"))
    if basis is None:
        trainable = [p for p in D.parameters() if p.requires_grad]
        basis = torch.empty(sum(p.numel() for p in trainable), config.subspace_dim, device=device,
                            dtype=functools.reduce(torch.promote_types, (p.dtype for p in trainable)))
    return dist.broadcast_(basis.contiguous())


METRICS_HEADER = ("step", "batch_size", "loss", "clipped_fraction", "epsilon_spent", "steps_per_s", "private")


def _truncate_metrics(path: Path, steps_done: int) -> None:
    """Rewrites metrics.csv as the header and its complete rows of steps <= steps_done (none for a new run).

    A file that is missing, empty, headerless, or ends in a half-written row (a crash) is repaired, so that
    the audit's check of the logged batches reads every row a resumed run logged."""
    lines = []
    _check_regular(path)
    if steps_done and path.exists():
        try:   # keep csv's \r\n; bytes that are not UTF-8 spoil their row only
            with open(path, newline="", encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines(keepends=True)
        except OSError as e:
            raise TrainError(f"cannot read the run's {str(path)!r} ({e.strerror or e}); move it away to resume "
                             "(its rows are rewritten from the checkpoint's step on)") from None
    width = len(METRICS_HEADER)
    kept = [ln for ln in lines if ln.endswith("\n") and ln.count(",") == width - 1
            and (step := _metrics_step(ln)) is not None and step <= steps_done]
    # 0600 whatever the umask, as the checkpoint: the losses of the private batches, without noise. The run folder is
    # 0700, but a copy of its files into another folder (`cp run/* shared/`) keeps their modes (h99 N2, stop 49).
    # The rows are appended to this file, which keeps its mode.
    ckpt.atomic_write_text(path, ",".join(METRICS_HEADER) + "\r\n" + "".join(kept), mode=0o600)


def _check_regular(path: Path) -> None:
    """TrainError where `path` exists but is not a regular file (or a link to one): reading a FIFO blocked the
    run for good."""
    if os.path.lexists(path) and not path.is_file():
        raise TrainError(f"{str(path)!r} is not a regular file (a folder, FIFO, device or broken link); move it "
                         "away")


def _metrics_step(line: str) -> int | None:
    """The step a metrics.csv row begins with, or None (a header, a damaged row; "²" is a digit to isdigit
    but not to int)."""
    first = line.split(",", 1)[0]
    return int(first) if first.isascii() and first.isdigit() else None


def _finite_model(D: torch.nn.Module, params: dict[str, torch.Tensor], probe: tuple) -> bool:
    """Whether the trained weights and the network's output on the fixed `probe` (x, sigma, labels) are finite."""
    if not bool(torch.stack([torch.isfinite(p).all() for p in params.values()]).all()):
        return False
    with torch.no_grad():
        return bool(torch.isfinite(D(*probe)).all())


def _other_data_advice(trained: str | None, dataset_name: str | None, plan_dataset: str | None) -> str:
    """The end of the refusal of a resume on other data than the run's: the name the run recorded (`trained`,
    absolute) and what would resume it, as far as that is true. `dpdm train --resume` without --dataset takes the
    recorded name while it exists, so "resume without --dataset" was also said to a resume that gave none, and
    whose recorded file had since been replaced by other images (stop 46, h83 F4)."""
    if not trained:
        return ""
    if dataset_name is not None and absolute_dataset_name(dataset_name) == trained:
        named = ("" if plan_dataset is None or absolute_dataset_name(plan_dataset) == trained
                 else f"; the plan names {plan_dataset!r}")
        return (f" ({trained!r}, which held them, now holds others: resume with --dataset naming the data the run "
                f"was trained on{named})")
    if is_path_dataset(trained) and not os.path.exists(dataset_path(trained)):
        return f" ({trained!r}, which no longer exists: resume with --dataset naming that data where it lies now)"
    return f" ({trained!r}; resume without --dataset, or with that one)"


def _file_identity(path: Path) -> tuple | None:
    """What changes when a file is replaced (inode, size, modification time), or None where there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


# Written beside the first checkpoint a run saves: a run folder holding it but no checkpoint lost a checkpoint
# (removed by hand), and a new run there would spend the plan again.
CHECKPOINTED_MARK = ".checkpointed"


def _check_fresh_run_folder(out: Path, plan_doc, checkpoint_every: int) -> None:
    """A new run starts only in a folder that is absent, or holds nothing of another run: its plan.json (if
    any) is this plan, its config.json (if any) a dpdm run's beside that plan, and no checkpoint of it was
    ever saved (`CHECKPOINTED_MARK`, or a metrics row logged after the first checkpoint): training there again
    would spend the plan again. A run killed before its first checkpoint was saved may start afresh, spending
    the steps it recorded (`_unsaved_steps`)."""
    from dpdm.report_utils import is_run_config

    if not out.exists():
        return
    if not out.is_dir():
        raise TrainError(f"--out {str(out)!r} is not a folder")
    plan_file, config_file, metrics = out / "plan.json", out / "config.json", out / "metrics.csv"
    _check_regular(plan_file)   # a FIFO blocked the run, a link to /dev/zero read without end
    if plan_file.exists():
        try:   # the digest is the plan's identity; this run writes its own verified plan.json anyway
            digest = (json.loads(plan_file.read_text(encoding="utf-8")).get("digest")
                      if plan_file.stat().st_size <= accounting.MAX_PLAN_BYTES else None)
        except (OSError, ValueError, AttributeError):
            digest = None
        if digest != plan_doc.digest:
            shown = f"plan {digest[:19]}..." if isinstance(digest, str) else "not a locked plan"
            raise TrainError(f"{str(out)!r} holds another plan.json ({shown}); a new run there would replace it: "
                             "choose another --out")
    if config_file.exists() and not (is_run_config(config_file) and plan_file.exists()):
        raise TrainError(f"{str(out)!r} holds a config.json of something else; a new run there would replace it: "
                         "choose another --out")
    steps = []
    _check_regular(metrics)
    if metrics.exists():
        try:
            with open(metrics, newline="") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError):
            lines = []
        if not lines or lines[0] != ",".join(METRICS_HEADER):
            raise TrainError(f"{str(out)!r} holds a metrics.csv that is not a dpdm run's; a new run there would "
                             "replace it: choose another --out")
        steps = [step for ln in lines[1:] if (step := _metrics_step(ln)) is not None]
    # A run's files, and hidden ones (its lock and marks, the temporary files of its atomic writes, a file
    # system's own); anything else (data, a release file, the user's own files) is not the run's, and a run
    # folder holds secrets.
    others = sorted(p.name for p in out.iterdir()
                    if p.name not in ("plan.json", "config.json", "metrics.csv", "lost+found")
                    and not p.name.startswith("."))
    if others:
        raise TrainError(f"{str(out)!r} holds files that are not this run's ({', '.join(others[:3])}"
                         f"{', ...' if len(others) > 3 else ''}); a run folder holds the run's secrets: choose a new "
                         "or empty --out")
    # A row past the first checkpoint's step was logged after that checkpoint was saved; the row of that step
    # itself is logged just before it is saved (a run killed while saving may start afresh). The first
    # checkpoint came at the earlier run's --checkpoint-every (its config.json), or else at this one's.
    try:
        every = int(json.loads(config_file.read_text(encoding="utf-8"))["train"]["checkpoint_every"])
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        every = checkpoint_every
    first = min(every, plan_doc.plan.steps)
    if (out / CHECKPOINTED_MARK).exists() or (steps and max(steps) > first):
        raise TrainError(f"{str(out)!r} holds a run that saved a checkpoint, but no {CHECKPOINT_NAME}: it was "
                         "removed, and training here again would spend the plan again; choose another --out (and "
                         "another plan, if that run's outputs were used)")


_LOCK_PATIENCE_S = 1.0   # `_lock_run_folder`: how long a lock held by another process is waited for


def _lock_run_folder(out: Path):
    """An exclusive lock on the run folder for as long as this process trains in it: a second `dpdm train`
    into the same folder is refused instead of interleaving. None where the file system takes no locks (then
    nothing is locked, and the run says so); a system without fcntl (not POSIX) locks nothing either."""
    try:
        import fcntl
    except ImportError:   # not POSIX
        return None
    path = out / ".train.lock"
    try:   # not through a link (it made its target outside the folder), never blocking on a FIFO
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    except OSError as e:
        if os.path.lexists(path) and not (path.is_file() and not path.is_symlink()):
            raise TrainError(f"{str(path)!r} is not a regular file (a link, FIFO or device); remove it") from None
        raise TrainError(f"cannot write in the run folder {str(out)!r} ({e.strerror or e})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TrainError(f"{str(path)!r} is not a regular file (a link, FIFO or device); remove it")
    f = os.fdopen(fd, "a")
    # A `dpdm sample` or `dpdm export` probing the run (`cli._common._run_is_training`) holds a shared lock for a
    # moment: tried again for about a second before another train is named (h141 F2, stop 54); a train holds it
    # for its whole run.
    give_up = time.monotonic() + _LOCK_PATIENCE_S
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() < give_up:
                time.sleep(0.02)
                continue
            f.close()
            raise TrainError(f"another dpdm train is running in {str(out)!r}; wait for it, or choose another "
                             "--out") from None
        except OSError:   # no locks on this file system (ENOLCK, EINVAL on some network mounts)
            f.close()
            return None


def _remove_checkpoint_leftovers(out: Path) -> None:
    """Removes the temporary files of checkpoint writes killed midway (`checkpoint.atomic_torch_save`:
    ``.checkpoint.pt.XXXX.tmp``), and of config.json and metrics.csv (`atomic_write_text`, named alike). Called by
    rank 0 once it holds the folder's lock, so no other dpdm train is writing one: a kill after the fsync and
    before the rename left a full copy of the run's secrets (its seed, its image digests) under a hidden name that
    nothing else knows of; config.json's holds the data's digest, metrics.csv's the noise-free losses (h106 N2)."""
    try:
        leftovers = [path for name in (CHECKPOINT_NAME, "config.json", "metrics.csv")
                     for path in out.glob(ckpt.temp_file_pattern(out / name))]
    except OSError:
        return
    for path in leftovers:
        try:
            if path.is_symlink() or path.is_file():
                path.unlink()
        except OSError:
            pass


def _maybe_inject_fault(rank: int, steps_done: int) -> None:
    """Fault injection for the distributed tests: DPDM_FAULT_INJECT="RANK:STEP" makes that rank die
    (os._exit, like a SIGKILL: no clean-up) right after finishing step STEP."""
    spec = os.environ.get("DPDM_FAULT_INJECT")
    if spec:
        r, s = (int(v) for v in spec.split(":"))
        if r == rank and s == steps_done:
            os._exit(17)


def _nonprivate_grad_sum(D, loss_obj, batch, conditional, params,
                         chunk_size: int | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """Unclipped, noiseless sum of per-example loss gradients (the --no-dp baseline), `chunk_size`
    examples per forward and backward pass (--physical-batch, the memory knob; None: the whole batch)."""
    grads = {name: torch.zeros_like(p) for name, p in params.items()}
    n = batch[0].shape[0]
    total = 0.0
    step = chunk_size or max(n, 1)
    for start in range(0, n, step):
        part = [t[start:start + step] for t in batch]
        if conditional:
            x, y, sigma, noise = part
        else:
            (x, sigma, noise), y = part, None
        losses = loss_obj(D, x, y, sigma, noise)
        for g, p_grad in zip(grads.values(), torch.autograd.grad(losses.sum(), list(params.values()))):
            g.add_(p_grad)
        total += float(losses.detach().sum())
    return grads, total


def _resumed_lr_segments(state: dict[str, Any], config: TrainConfig) -> tuple[tuple | None, str | None]:
    """The lr segments of a resumed run: the checkpoint's up to its step (its lr and schedule from step 0 where
    it records none), then, where `config`'s lr or schedule differs from the last of them, a segment from the
    checkpoint's step on. A last one that begins at the checkpoint's step (written by a resume that spent the steps
    a stopped attempt ran, `_unsaved_steps`, or a library config's) has trained no step the checkpoint holds:
    `config` keeps it with its lr, or replaces it with its own. A `config` with segments of its own must agree
    with the checkpoint's before that step. None where the run keeps one segment (recorded as before: lr and
    lr_schedule alone). Also a note where the lr or schedule the run goes on at changes."""
    train_cfg = state["config"].get("train") or {}
    done = int(state["ledger"]["steps_done"])
    saved = train_cfg.get("lr_segments")
    if saved is None:
        saved = [(0, train_cfg.get("lr", TrainConfig.lr), train_cfg.get("lr_schedule", TrainConfig.lr_schedule))]
    problem = lr_segments_problem(saved if isinstance(saved, (list, tuple)) else None)
    if problem:
        raise TrainError(f"the run's checkpoint is corrupt or was edited: its lr segments: {problem}")
    # Up to the checkpoint's step, a segment begun there included. Dropped (r2 F3, stop 52), a resume with the
    # spend's own lr was told of a change that was none, and one with the lr before the spend changed it without a
    # note and drew its steps from the spend's on the seed of the steps before it (`run_seed_at`), as a copy of the
    # folder made before the spend and resumed at that lr draws them, at other weights. Replaced, the segment keys
    # those steps' randomness on the resume's lr as well: other seeds than any attempt before the spend drew.
    history = tuple((int(a), float(b), str(c)) for a, b, c in saved if int(a) <= done)
    trained = tuple(seg for seg in history if seg[0] < done)
    if config.lr_segments is not None:
        given = lr_segments_of(config)
        if tuple(g for g in given if g[0] < done) != trained:
            raise TrainError(f"cannot resume with lr_segments {given!r}: the run trained its first {done} steps "
                             f"with {trained!r}")
        segments = given
    elif (config.lr, config.lr_schedule) == history[-1][1:]:
        segments = history
    elif history[-1][0] == done:
        segments = (*history[:-1], (done, float(config.lr), config.lr_schedule))
    else:
        segments = (*history, (done, float(config.lr), config.lr_schedule))
    note = None
    goes_on = [seg for seg in segments if seg[0] <= done][-1]   # the lr and schedule of step done + 1
    if goes_on[1:] != history[-1][1:]:
        _, was_lr, was_schedule = history[-1]
        note = (f"the learning rate changes from {was_lr:g} ({was_schedule}) to {goes_on[1]:g} "
                f"({goes_on[2]}) at step {done}, where the run resumes; its checkpoint records the change")
    return (None if len(segments) == 1 else segments), note


# The run's record of the steps it ran, kept in its folder by rank 0 of a private run: one line, written after each
# step's update is applied and before anything shows the step (its metrics row, the progress bar, a checkpoint; the
# hooks before it, `on_step` and the fault injector, show nothing of the data, so a step killed there is lost unseen).
# A run stopped after its checkpoint of step c (Ctrl-C, a kill, preemption) ran steps c + 1 to d on the private
# data, and what they showed may choose the lr it is resumed with: a resume with the lr they ran at replays them
# exactly (the same seeds, batches and noise at the same weights), while one with another lr would train them
# again on fresh noise under a ledger that never counted the first attempt's. `_unsaved_steps` tells the two
# apart by the record: the steps ran (the most any attempt reached) and a digest of the lr segments they ran
# under (`_segments_digest`), and their last lr and schedule, which the refusal names; and the plan and data they
# ran under (`record_binding`): a new run under another plan (`dpdm plan --force` over RUN/plan.json), or on other
# data, priced them at its own plan's rate when it spent them (h141 F1, stop 54). Its name and line format:
# `dpdm.steps_record` (STEPS_RECORD), which the CLI's advice lines read without torch.


def _segments_digest(segments, steps: int) -> str:
    """16 hex digits of the sha256 of the lr segments begun before step `steps` (0-based): those under which
    steps 0 to steps - 1 drew their randomness (`run_seed_at`) and took their lr (`lr_at`)."""
    below = [[int(a), float(b).hex(), str(c)] for a, b, c in segments if int(a) < steps]
    return hashlib.sha256(json.dumps(below).encode()).hexdigest()[:16]


class _StepsRecord:
    """`STEPS_RECORD`, open for the run (rank 0 of a private run): `note(steps)` after each step. A fixed-width
    pwrite at offset 0 of an open file, no fsync: a kill (SIGKILL, preemption) cannot lose a write the kernel
    has taken, but a machine crash, unlike a kill, may lose the last ones, and the record then says fewer steps
    than ran. It never goes down: a resume that replays steps the record holds leaves it as it is."""

    def __init__(self, out: Path, segments, recorded: int, *, plan_digest: str | None = None,
                 data_digest: str | None = None):
        self.path, self.segments, self.recorded, self.fd = out / STEPS_RECORD, tuple(segments), recorded, None
        self._digests: dict[int, str] = {}
        # the plan and data the steps run under (`train` gives both); without them, a v1 line, bound to neither
        self._bound = ("" if plan_digest is None or data_digest is None else
                       f" {record_binding(plan_digest)} {record_binding(data_digest)}")

    def open(self) -> None:
        """Opens (creates, 0600) the record; TrainError where it is not a regular file."""
        try:   # not through a link, never blocking on a FIFO (`_lock_run_folder`)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        except OSError as e:
            if os.path.lexists(self.path) and not (self.path.is_file() and not self.path.is_symlink()):
                raise TrainError(f"{str(self.path)!r} is not a regular file (a link, FIFO or device); remove it") \
                    from None
            raise TrainError(f"cannot write in the run folder {str(self.path.parent)!r} ({e.strerror or e})") \
                from None
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            self.close()
            raise TrainError(f"{str(self.path)!r} is not a regular file (a link, FIFO or device); remove it")

    def note(self, steps: int) -> None:
        """Records that `steps` steps ran (at the lr segments of this run), unless it holds as many or more."""
        if steps <= self.recorded:
            return
        begun = sum(1 for seg in self.segments if int(seg[0]) < steps)
        if begun not in self._digests:
            self._digests[begun] = _segments_digest(self.segments, steps)
        _, lr, schedule = self.segments[begun - 1]
        line = (f"{_RECORD_HEAD if self._bound else _RECORD_HEAD_V1} {steps} {self._digests[begun]} "
                f"{float(lr)!r} {schedule}{self._bound}")   # at most 17 + 20 + 16 + 24 + 8 + 34 + 4 = 123 bytes
        os.pwrite(self.fd, (line.ljust(_RECORD_WIDTH - 1) + "\n").encode(), 0)
        self.recorded = steps

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


def _read_steps_record(out: Path) -> tuple[bytes | None, tuple | None, str | None]:
    """The bytes of the run's `STEPS_RECORD` (None: there is none), what it records (steps, the digest of their
    lr segments, the last lr and schedule, and the 16 hex digits of the plan's and of the data's digests they ran
    under, None and None in a v1 line; None: none, or an empty one whose writes a crash lost), and what is wrong
    with it (None: nothing): `steps_record.read_record_line`, which the advice lines of export and sample share."""
    return read_record_line(out, LR_SCHEDULES)


def _other_run_of_record(record: tuple, bound: tuple[str, str]) -> str | None:
    """Where a record's steps ran under another plan or on other data than `bound` (this run's plan and data
    digests): "under plan sha256:... (not this plan, sha256:...)", "on other data", or both; None where the record
    names this plan and data, or none (a v1 line, written by a dpdm before stop 54)."""
    plan, data = record[4:6]
    other = []
    if plan is not None and plan != record_binding(bound[0]):
        other.append(f"under plan sha256:{plan}... (not this plan, sha256:{record_binding(bound[0])}...)")
    if data is not None and data != record_binding(bound[1]):
        other.append("on other data (other images or labels than these)")
    return " and ".join(other) or None


def _unsaved_steps(out: Path, state: dict[str, Any] | None, segments, plan_steps: int, spend: bool,
                   dist: "_Dist", *, bound: tuple[str, str]) -> tuple[int | None, str | None, bytes | None]:
    """Where a private run is resumed from its checkpoint of step c while its record (`STEPS_RECORD`) says a
    stopped attempt ran steps c + 1 to d: (d where they are spent, else None; a note for the run's warnings; the
    record's bytes, which rank 0 compares once it holds the folder's lock). A resume whose lr segments (`segments`)
    are those the steps ran under replays them exactly and costs nothing; one with another lr or schedule would
    train them again on fresh noise, the first attempt's in no ledger, though what they showed (the progress bar,
    metrics.csv) may have chosen the new lr. It is refused (TrainError, nothing written), or with `spend`
    (--spend-unsaved-steps) the steps are spent as a divergence's are (`train`'s `roll_back`): the run goes on from
    step d + 1 with step c's weights, EMAs, optimizer and RNG state, its ledger of d steps, the d - c steps
    discarded. A record at or below the checkpoint's step, or none (a run of an older dpdm), says nothing. Rank 0
    reads the record, and every rank takes its verdict.

    A new run (`state` None) in the folder of an attempt killed before its first checkpoint, whose record says it
    ran k steps, would draw a new seed and train from step 1 again, the first attempt's k steps in no ledger: it is
    refused, or with `spend` it goes on from step k + 1 (fresh weights and seed) under a ledger of k steps, all k
    discarded; where k is the plan's steps, the plan is spent.

    A record whose steps ran under another plan or on other data than `bound` (the digests of this run's plan and
    data) is refused either way: this plan's ledger would price them at its own rate (h141 F1, stop 54)."""
    if state is None:
        return _unsaved_steps_of_a_new_run(out, plan_steps, spend, dist, bound)
    done = int(state["ledger"]["steps_done"])
    path = out / STEPS_RECORD
    spent_to, note, raw, refusal = None, None, None, None
    if dist.is_main:
        raw, record, problem = _read_steps_record(out)
        if problem is not None:
            refusal = (f"{str(path)!r} is not the record dpdm keeps of the steps a run ran ({problem}), so how many "
                       f"steps ran after the checkpoint of step {done}, and at which lr, cannot be told: move it away "
                       "and resume with the lr the run last trained at (config.json shows it), which replays them "
                       "exactly (nothing was written)")
        elif record is not None and (other := _other_run_of_record(record, bound)):
            ran = record[0]
            refusal = (f"{str(path)!r} records {ran} step{'s' if ran != 1 else ''} of a run {other}: it is not "
                       "this run's record (copied from another run's folder?), and those steps stay spent against "
                       "the data they ran on, whatever this run does; how many steps this run ran after its "
                       f"checkpoint of step {done}, and at which lr, cannot be told: move it back to its own run's "
                       "folder and resume with the lr this run last trained at (config.json shows it), which "
                       "replays them exactly (nothing was written)")
        elif record is None or record[0] <= done:
            if spend:
                note = (f"--spend-unsaved-steps: no step ran after the checkpoint of step {done} (none is "
                        "recorded); nothing to spend")
        else:
            ran, digest, lr, schedule = record[:4]
            what = f"step {ran}" if ran == done + 1 else f"steps {done + 1} to {ran}"
            them = "it" if ran == done + 1 else "them"
            they = "it" if ran == done + 1 else "they"
            ran_at = (f"the run trained {what} after its checkpoint of step {done}, at lr {lr!r} ({schedule}), "
                      f"before it stopped ({str(path)!r} records {them})")
            again = f"--lr {lr!r} --lr-schedule {schedule}, which replays {them} exactly"
            if _segments_digest(segments, ran) == digest:
                if spend:
                    note = f"--spend-unsaved-steps: nothing to spend: {ran_at}, and this resume replays {them} exactly"
            elif ran >= plan_steps:
                refusal = (f"{ran_at}: that is all {plan_steps} steps of its plan, so a resume at another lr has no "
                           f"step left to train; resume with {again} and finishes the run (nothing was written)")
            elif not spend:
                refusal = (f"{ran_at}: a resume at another lr trains {them} again on fresh noise, the first "
                           f"attempt's in no ledger, though what {they} showed may have chosen that lr; resume with "
                           f"{again} (change the lr at a later checkpoint), or pass --spend-unsaved-steps to count "
                           f"{them} as spent and go on from step {ran + 1} with the weights of step {done} (nothing "
                           "was written)")
            else:
                spent_to = ran
                note = (f"{ran_at[0].upper()}{ran_at[1:]}: {they} {'is' if they == 'it' else 'are'} spent "
                        f"(--spend-unsaved-steps): the checkpoint is written again with a ledger of {ran} steps and "
                        f"the weights of step {done}, and the run goes on from step {ran + 1} (the model loses "
                        f"{ran - done} step{'s' if ran - done != 1 else ''}, the budget does not get "
                        f"{them} back)")
    return _agreed_spend(dist, refusal, spent_to, "resume"), note, raw


def _agreed_spend(dist: "_Dist", refusal: str | None, spent_to: int | None, what: str) -> int | None:
    """Rank 0's verdict on the steps record (`_unsaved_steps`, `_unsaved_steps_of_a_new_run`), taken by every rank:
    TrainError with rank 0's refusal, else the steps spent (None: none)."""
    code = dist.broadcast_int(-1 if refusal is not None else spent_to or 0)
    if code < 0:
        raise TrainError(refusal or f"rank 0 refused to {what} the run (its line says why); nothing was written")
    return code or None


def _unsaved_steps_of_a_new_run(out: Path, plan_steps: int, spend: bool, dist: "_Dist",
                                bound: tuple[str, str]) -> tuple[int | None, str | None, bytes | None]:
    """`_unsaved_steps` of a new run (no checkpoint in `out`): the steps an attempt killed before its first
    checkpoint ran there, as its record says, under this plan and on this data (`bound`), or refused."""
    path = out / STEPS_RECORD
    spent_to, note, raw, refusal = None, None, None, None
    if dist.is_main:
        raw, record, problem = _read_steps_record(out)
        ran = 0 if record is None else record[0]
        if problem in ("a link", "not a regular file"):
            pass   # refused as the run opens it (`_StepsRecord.open`): "is not a regular file ...; remove it"
        elif problem is not None:
            refusal = (f"{str(path)!r} is not the record dpdm keeps of the steps a run ran ({problem}), so how many "
                       f"steps the run killed in {str(out)!r} before its first checkpoint ran cannot be told: "
                       "choose another --out (and count those steps in what it releases), or move it away if no "
                       "step ran (nothing was written)")
        elif not ran:
            if spend:
                note = f"--spend-unsaved-steps: no step ran in {str(out)!r} (none is recorded); nothing to spend"
        else:
            what = "step 1" if ran == 1 else f"steps 1 to {ran}"
            them, they = ("it", "it") if ran == 1 else ("them", "they")
            ran_at = (f"a run in {str(out)!r} trained {what} and was stopped before its first checkpoint "
                      f"({str(path)!r} records {them})")
            other = _other_run_of_record(record, bound)
            if other:   # `dpdm plan --force` over RUN/plan.json, or other data of the plan's size (h141 F1, stop 54)
                # Under the same plan on other data, it is the data whose ledger cannot hold them (h155 N4, stop 55).
                why = (f"this plan cannot count {them} at its own price" if other.startswith("under plan") else
                       f"this run's ledger, of these data, cannot count {them}")
                refusal = (f"a run in {str(out)!r} trained {what} {other} and was stopped before its first "
                           f"checkpoint ({str(path)!r} records {them}): {why}; {they} "
                           f"{'stays' if they == 'it' else 'stay'} spent against the data {they} ran on: choose "
                           "another --out for this run (nothing was written)")
            elif ran >= plan_steps:
                refusal = (f"{ran_at}: that is all {plan_steps} steps of its plan, which is spent, though no "
                           "checkpoint holds its weights; make a new plan and choose another --out (nothing was "
                           "written)")
            elif not spend:
                refusal = (f"{ran_at}: a new run there draws a new seed and trains from step 1 again, the first "
                           f"attempt's {what} in no ledger; pass --spend-unsaved-steps to count {them} as spent and "
                           f"go on from step {ran + 1} with new weights, or choose another --out and count {them} in "
                           "what it releases (nothing was written)")
            else:
                spent_to = ran
                note = (f"{ran_at[0].upper()}{ran_at[1:]}: {they} {'is' if they == 'it' else 'are'} spent "
                        f"(--spend-unsaved-steps): this run starts with a ledger of {ran} "
                        f"step{'s' if ran != 1 else ''} and new weights, and goes on from step {ran + 1} (the model "
                        f"loses {ran} step{'s' if ran != 1 else ''}, "
                        f"the budget does not get {them} back)")
    return _agreed_spend(dist, refusal, spent_to, "start"), note, raw


def _private_steps_before_a_no_dp_run(out: Path, plan_steps: int, dist: "_Dist") -> bytes | None:
    """The steps record's bytes where a new --no-dp run may start in `out` (no checkpoint there), else TrainError:
    a record of steps that a private attempt killed before its first checkpoint ran there. The --no-dp run would
    replace that attempt's metrics.csv and write a --no-dp checkpoint, after which no command speaks of those
    private steps again (a resume is "cannot resume a --no-dp run as private"), as a private new run there is
    refused without --spend-unsaved-steps (trainwalk F1, stop 56). The line's advice is one that is taken: a
    private run started again there with --spend-unsaved-steps, unless the attempt ran all `plan_steps` (r1 F1)."""
    path = out / STEPS_RECORD
    raw, refusal = None, None
    if dist.is_main:
        raw, record, problem = _read_steps_record(out)
        if problem is not None:
            refusal = (f"{str(path)!r} is not the record dpdm keeps of the steps a run ran ({problem}), so how many "
                       f"private steps a run killed in {str(out)!r} ran cannot be told; a --no-dp run there would "
                       "leave them in no ledger: choose another --out (nothing was written)")
        elif record is not None and record[0] > 0:
            ran = record[0]
            # The plan spent: a private run there is refused too ("that is all N steps of its plan").
            other = ("" if ran >= plan_steps else
                     ", or start the private run there again with --spend-unsaved-steps, which counts them")
            refusal = (f"a private run in {str(out)!r} trained {ran} step{'' if ran == 1 else 's'} and was stopped "
                       f"before its first checkpoint ({str(path)!r} records them): a --no-dp run there would replace "
                       f"its metrics and leave those steps in no ledger; choose another --out{other} (nothing was "
                       "written)")
    _agreed_spend(dist, refusal, None, "start")
    return raw


def _patterns(patterns: tuple[str, ...] | None) -> str:
    return "all parameters" if patterns is None else "only " + ",".join(patterns)


def _write_json(path: Path, obj: dict, *, mode: int = 0o666) -> None:
    # Strict JSON (RFC 8259): a NaN written as the token NaN made the run's plan.json unreadable to every later
    # command (stop 44). Now it is a ValueError before the file is touched, and before any step. `mode` less the
    # umask: plan.json stays readable by other users (accounting.write_plan), config.json is 0600.
    ckpt.atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n", mode=mode)
