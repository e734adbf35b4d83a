"""Sampling from a checkpoint into samples.npz (the library side of `dpdm sample`)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from dpdm import checkpoint as ckpt
from dpdm.cpu import address_space
from dpdm.datasets import DataError, public_dataset_name, public_init_name, read_npz_scalars
from dpdm.report_utils import place_in_dataset  # noqa: F401  (torch-free, for `dpdm plan`; the name stays here)
from dpdm.report_utils import TEMP_PATH_REST, remove_temp_leftovers
from dpdm.sampling import MIN_ROWS, RHO, SIGMA_MAX, SIGMA_MIN


class SampleError(ValueError):
    """A checkpoint that cannot be sampled from, or bad sampling options."""


class SampleFailure(RuntimeError):
    """Sampling ran but failed through nobody's input mistake: the network's output is not finite with the
    default sampler settings (NaN or inf weights). Nothing is written. `dpdm sample` exits 4 (a runtime failure)."""


# The `dpdm sample` option behind each sampler argument, for the errors that name one.
_OPTIONS = {"sampler_steps": "--sampler-steps", "sigma_min": "--sigma-min",
            "sigma_max": "--sigma-max", "rho": "--rho", "sampler": "--sampler", "guidance": "--guidance",
            "guidance_interval": "--guidance-interval", "precision": "--precision", "S_churn": "--s-churn",
            "S_min": "--s-min", "S_max": "--s-max", "S_noise": "--s-noise"}


def weights_name(weights: str) -> str:
    """The canonical spelling of a weights name: "power:0.50" and "power: 0.5" are the EMA "power:0.5" keeps
    (`train.ema_power_key`); other names as they are. A release file records it, and sampling compares it."""
    from dpdm.train import ema_power_key

    if isinstance(weights, str) and weights.startswith("power:"):
        try:
            return f"power:{ema_power_key(float(weights.removeprefix('power:')))}"
        except ValueError:
            pass
    return weights


def _weights_of(state: dict, weights: str, path) -> dict:
    """The state dict `weights` names: "ema", "raw", or "power:GAMMA" (a power EMA kept by `--ema-power`)."""
    if weights in ("ema", "raw"):
        return state["ema" if weights == "ema" else "model"]
    kept = state.get("ema_power", {})
    name = weights_name(weights)   # "power:<ema_power_key(GAMMA)>" where GAMMA is a number
    key = name.removeprefix("power:") if name.startswith("power:") else None
    if key is None or key not in kept:
        have = ", ".join(f"power:{k}" for k in sorted(kept, key=float)) or "no power EMAs"
        raise SampleError(f"weights={weights!r}: checkpoint {str(path)!r} has ema, raw and {have}")
    return kept[key]


# What `weights_digest` hashes first: the version of its encoding.
WEIGHTS_DIGEST_FORMAT = "dpdm.weights/1"


def weights_digest(state_dict: dict) -> str:
    """The sha256 (hex) of a network's weights: `WEIGHTS_DIGEST_FORMAT`, then each tensor in the order of its name,
    as a JSON line of its name, dtype and shape followed by its bytes (C order, on the CPU). The same weights give
    the same digest whatever file held them: a run's EMA (`dpdm sample --run`) and the release file `dpdm export`
    wrote of it (the same tensors, bit for bit), which `dpdm export` prints beside the file's sha256 and `dpdm sample`
    records in the samples (meta_weights_sha256), so that samples can be checked against a released model without
    drawing them again. The file's sha256 also covers its ledger, config and plan; this one the weights alone."""
    h = hashlib.sha256(f"{WEIGHTS_DIGEST_FORMAT}\n".encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{json.dumps([name, str(t.dtype).removeprefix('torch.'), list(t.shape)])}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)   # its bytes, whatever its dtype (bfloat16 too)
    return h.hexdigest()


def load_denoiser(path: str | os.PathLike, *, weights: str | None = "ema", device: str = "cpu"):
    """Rebuilds the preconditioned network of a checkpoint or release file (`dpdm export`).
    Returns (D, state); state["weights"] names the weights taken (`weights_name`), state["weights_sha256"] their
    `weights_digest` (computed once, on the CPU, from the network as loaded).

    weights: "ema" (the run's EMA), "raw" (the last iterate) or "power:GAMMA" (a power EMA the run kept); None:
    a release file's one set, a checkpoint's EMA."""
    from dpdm.train import build_denoiser

    try:
        state = ckpt.load_model_or_checkpoint(path)
    except ckpt.CheckpointError as e:
        raise SampleError(str(e)) from None
    # A release file's ledger was re-accounted against the plan it carries (and its dataset named as that plan
    # names it); a checkpoint's is re-accounted against its run's plan.json.
    if state["format"] != ckpt.MODEL_FORMAT:
        try:   # an edited epsilon reached the samples and `dpdm eval`'s line
            doc = ckpt.verify_run_ledger(path, state, missing=(
                f"checkpoint {str(path)!r} is a training checkpoint without its run's plan.json beside it, against "
                "which its epsilon is checked; sample from the run folder, or from the release file of `dpdm export`"))
        except ckpt.CheckpointError as e:
            raise SampleError(str(e)) from None
        cfg = state["config"]
        state["config"] = {**cfg, "public_dataset": public_dataset_name(cfg.get("dataset"), doc.plan.dataset_name,
                                                                        cfg.get("plan_names_data"))}
    if state["format"] == ckpt.MODEL_FORMAT:   # a release file (`dpdm export`) holds one set of weights
        if weights is not None and weights_name(weights) != weights_name(state["weights"]):
            raise SampleError(f"weights={weights!r}: model file {str(path)!r} holds only its "
                              f"{state['weights']!r} weights")
        chosen = state["state_dict"]
        state["weights"] = weights_name(state["weights"])
    else:   # None alone means the EMA: '' goes to `_weights_of`, which refuses it as `dpdm export` does
        weights = "ema" if weights is None else weights
        chosen = _weights_of(state, weights, path)
        state["weights"] = weights_name(weights)
    problem = weights_problem(state["config"], chosen)   # before the network the config describes is built
    if problem is not None:
        raise SampleError(f"checkpoint {str(path)!r} does not match its own config: {problem}")
    try:
        D = build_denoiser(state["config"])
        D.load_state_dict(chosen)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise SampleError(f"checkpoint {str(path)!r} does not match its own config: "
                          f"{ckpt.state_dict_mismatch_reason(e)}") from None
    state["weights_sha256"] = weights_digest(D.state_dict())   # the weights sampled with, before any device
    return D.to(device).eval(), state


class _SkipInit(TorchFunctionMode):
    """Leaves the tensors `torch.nn.init` would fill on the meta device as they are: a network built under it has
    its shapes and dtypes and nothing else (torch's normal_ on meta imports torch._dynamo first: 2.5 to 4 s)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        if getattr(func, "__module__", None) == "torch.nn.init" and torch.is_tensor(target) and target.is_meta:
            return target
        return func(*args, **kwargs)


def weights_problem(config: dict, weights) -> str | None:
    """Why `weights` (a checkpoint's or release file's state dict, as loaded) are not the weights of the network
    `config` describes, or None: each of its tensors under its name, of its shape and dtype, in storage of its own,
    and nothing else. The network is built on the meta device (its shapes, no memory), so that what building it
    for real costs follows the file's size, not a number in it: a release file whose config said num_classes=5e7
    had `build_denoiser` allocate and fill 3.2 GB before load_state_dict compared the shapes, and one of 1e15 failed
    with the allocator's line (h101 F1). As a stride-0 view saved in 4 bytes takes any shape, each tensor must hold
    its own elements, and all of them the bytes they need. A dtype other than the network's was cast without a
    word (bool weights loaded as 1.0, h101 F4): `dpdm train` keeps every weight in float32, under --precision bf16
    too."""
    from dpdm.train import build_denoiser

    try:
        with torch.device("meta"), _SkipInit():
            want = build_denoiser(config).state_dict()
    except (ValueError, TypeError, RuntimeError) as e:   # e.g. a resolution the U-Net cannot halve
        return ckpt.load_error_reason(e)
    if not isinstance(weights, dict):
        return f"its weights are a {type(weights).__name__}, not a state dict"

    def names(keys: list) -> str:
        shown = ", ".join(repr(k) if len(repr(k)) <= 80 else f"{repr(k)[:77]}..." for k in keys[:2])
        return shown + (f" and {len(keys) - 2} more" if len(keys) > 2 else "")

    missing, extra = [k for k in want if k not in weights], [k for k in weights if k not in want]
    if missing:
        return f"it lacks the network's tensor{'s' if len(missing) > 1 else ''} {names(missing)}"
    if extra:
        return f"it has {names(extra)}, which the network has not"

    def kind(t: torch.Tensor) -> str:
        return f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"

    storages, need = {}, 0
    for key, w in want.items():
        t = weights[key]
        if not (torch.is_tensor(t) and t.layout == torch.strided):
            what = f"a {t.layout} tensor" if torch.is_tensor(t) else f"of type {type(t).__name__}"
            return f"its {key!r} is {what}, not a dense tensor"
        if t.dtype != w.dtype or t.shape != w.shape:
            return f"its {key!r} is {kind(t)}, the network's is {kind(w)}"
        size, storage = t.numel() * t.element_size(), t.untyped_storage()
        if size > storage.nbytes():
            return (f"its {key!r} ({kind(t)}) is a view of {storage.nbytes():,} bytes, fewer than its {size:,}: "
                    "dpdm saves every tensor whole")
        storages[storage.data_ptr()] = storage.nbytes()
        need += size
    if need > sum(storages.values()):
        return (f"its tensors are views of {sum(storages.values()):,} bytes of storage, fewer than their {need:,}: "
                "dpdm saves every tensor whole")
    return None


def sample_checkpoint(path, *, n: int, sampler: str = "euler", sampler_steps: int = 50, guidance: float = 0.0,
                      guidance_interval: tuple[float, float] | None = None,
                      weights: str | None = "ema", seed: int = 0, batch_size: int = 256, device: str = "cpu",
                      sigma_min: float | None = None, sigma_max: float | None = None, rho: float = RHO,
                      sampler_kwargs: dict | None = None, precision: str = "fp32",
                      out_path: str | os.PathLike, grid_path: str | os.PathLike | None = None,
                      force: bool = False, notes: list[str] | None = None,
                      facts: dict | None = None) -> dict[str, Any]:
    """Draws `n` images (balanced labels (seed + i) % num_classes) and writes them to `out_path` atomically.

    The npz holds ``x`` (uint8 [n, C, H, W]), ``y`` (int64 [n]) for a conditional model and no ``y`` for
    an unconditional one (`dpdm.datasets.load_npz` reads a file without ``y`` as unlabelled), and
    ``meta_*`` scalars (never an object array). `grid_path` (a suffix of `report_utils.GRID_SUFFIXES`)
    is written atomically too; a failure leaves no temporary file.

    seed: image i uses seed + i, for its noise and its label ((seed + i) % classes); 0 <= seed <= 2**63 - n
      (`dpdm.sampling.MAX_SEED`).
    sigma_min / sigma_max None: Karras's 0.002 / 80, narrowed to the noise levels the run trained on
    (`dpdm train --train-sigma`), so that the sampler does not ask the network about levels it never saw.
    precision: "fp32", or "bf16" (the network under bfloat16 autocast; `dpdm.sampling.PRECISIONS`).
    force: replace a samples file or grid of a model of another plan, or of the other private flag, or a grid that
      names neither (`check_outputs`).
    notes: where given, warnings for the user are appended to it: how many of the images are of classes the run
      had no training image of (a training checkpoint's "empty_classes"; drawn evenly all the same, since drawing
      only the others would show in released samples which classes the private data lacks). Never in the npz
      or the returned summary: it is a statistic of the private data.
    facts: where given, filled with "data_digest", a training checkpoint's fingerprint of its private data (None
      for a release file), for `dpdm sample`'s line on the run's .steps_done; never in the npz or the summary.

    Raises:
      SampleError: bad options, a checkpoint that cannot be sampled from, outputs that would replace a file
        `dpdm sample` did not write or the run's dataset (`check_outputs`), or more images than fit in the
        memory this process may use (`memory_allowed`; nothing written).
        Also bad options: sampler settings that drive a network whose output is finite with the default settings
        to NaN or inf (nothing written).
      SampleFailure: the network produced NaN or inf with the default sampler settings (nothing written).
    """
    from accounting.plan import fsync_folder
    from dpdm.report_utils import epsilon_text, grid_suffix_problem, temp_path
    from dpdm.sampling import (MAX_S_NOISE, MAX_SEED, PRECISIONS, ImagesMemoryError, NonFiniteSamplesError,
                               ScheduleError, first_seed_fits, generate, get_sigmas_karras)

    if precision not in PRECISIONS:
        raise SampleError(f"precision={precision!r} must be one of {', '.join(PRECISIONS)}")
    # n=-1 failed in torch.arange, n=0 wrote an empty samples file (h134 F4, stop 53); numpy integers are integers
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise SampleError(f"n={n!r} (--n) must be an integer >= 1: the number of images to draw")
    n = int(n)
    if n - 1 > MAX_SEED:   # no seed fits: n is at fault, not seed
        raise SampleError(f"n={n} (--n) is more than 2**63 images: image i uses seed + i, which must stay below 2**63")
    if not first_seed_fits(seed, n):
        raise SampleError(f"seed={seed!r} must be in [0, 2**63 - n] = [0, {MAX_SEED - max(int(n) - 1, 0)}] "
                          f"(image i uses seed + i)")
    grid_problem = grid_path and grid_suffix_problem(grid_path)
    if grid_problem:
        raise SampleError(f"grid path {str(grid_path)!r} {grid_problem}")
    problem = (guidance_options_problem(guidance, guidance_interval)   # recorded, but no step guided
               or sampler_options_problem(sampler, sampler_steps, rho, sampler_kwargs))   # recorded, no effect
    if problem:
        raise SampleError(problem)

    D, state = load_denoiser(path, weights=weights, device=device)
    weights = state["weights"]   # None: the release file's own set
    cfg, ledger = state["config"], state["ledger"]
    if guidance != 0 and int(cfg.get("num_classes", 0)) == 0:
        raise SampleError(f"guidance={guidance:g} (--guidance) needs a class-conditional model; {str(path)!r} was "
                          "trained without labels, so there is nothing to guide towards")
    dropout = (cfg.get("train") or {}).get("label_dropout")   # a release file of before stop 51 records none
    if guidance != 0 and isinstance(dropout, (int, float)) and dropout == 0:
        raise SampleError(f"guidance={guidance:g} (--guidance) steers by the network's output for the null label, "
                          f"which {str(path)!r} never trained on (label_dropout 0: no label was dropped in training); "
                          "sample without --guidance")
    if facts is not None:
        facts["data_digest"] = cfg.get("data_digest")
    check_outputs(out_path, grid_path, dataset=cfg.get("dataset"), plan_digest=str(ledger["plan_digest"]),
                  private=bool(ledger["private"]), force=force)   # before any drawing
    need = memory_needed(n, cfg, batch_size=batch_size)
    have, limited = memory_allowed()
    if have is not None and need > have:
        room = (f"the {have / 2**30:.3g} GiB left under this process's address-space limit (ulimit -v)" if limited
                else f"this machine's {have / 2**30:.3g} GiB")
        raise SampleError(_too_many_images(n, cfg, f"need {need / 2**30:.3g} GiB of memory, more than {room}"))
    trained = (cfg.get("train") or {}).get("train_sigma")   # train: None passes checkpoint's checks
    default_min, default_max = default_sigma_range(trained)
    # The options that change the sampler's arithmetic, as given (blamed when its output is not finite).
    given = {"sampler": None if sampler == "euler" else sampler, "sigma_min": sigma_min, "sigma_max": sigma_max,
             "rho": None if rho == RHO else rho, "guidance": guidance or None, "guidance_interval": guidance_interval,
             "precision": None if precision == "fp32" else precision, **(sampler_kwargs or {})}
    sigma_min = default_min if sigma_min is None else sigma_min
    sigma_max = default_max if sigma_max is None else sigma_max
    if not 0 < sigma_min < sigma_max:
        raise SampleError(_sigma_range_problem(sigma_min, sigma_max, given=given, trained=trained))
    dtype = next(D.parameters()).dtype
    try:   # before any drawing: a rho that overflows, a sigma that float32 cannot sample, too many steps
        sigmas = get_sigmas_karras(sampler_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, dtype=dtype)
    except ScheduleError as e:
        option = _OPTIONS["sampler_steps" if e.param == "n" else e.param]   # n: get_sigmas_karras's steps
        raise SampleError(f"{option}={_option_text(e.value)} {e.reason}") from None
    s_noise = (sampler_kwargs or {}).get("S_noise")
    if s_noise is not None and not 0 <= s_noise <= MAX_S_NOISE:
        raise SampleError(f"--s-noise={s_noise:g} must lie in [0, {MAX_S_NOISE:g}]: EDM tunes it in [1, 1.007] "
                          f"and 1 is the default; a large scale overflows the sampler into NaN")
    if sampler == "churn":
        problem = _churn_window_problem(sigmas, sampler_kwargs or {})
        if problem:
            raise SampleError(problem)
    problem = guidance_options_problem(guidance, guidance_interval, sigmas, sampler, sampler_kwargs)
    if problem:
        raise SampleError(problem)
    num_classes = int(cfg["num_classes"])
    # Image i is image seed + i of one sequence, label included: a run split into files (advancing --seed by
    # each file's --n) draws the same images as one file (labels restarting at 0 in each file did not).
    labels = (seed % num_classes + torch.arange(n)) % num_classes if num_classes > 0 else None
    empty = cfg.get("empty_classes") if labels is not None else None
    if empty and notes is not None:
        unseen = int(torch.isin(labels, torch.tensor(empty, dtype=labels.dtype)).sum())
        shown = ", ".join(map(str, empty[:12])) + (", ..." if len(empty) > 12 else "")
        notes.append(f"{unseen} of the {n} images are of classes the run had no training image of (label"
                     f"{'s' if len(empty) > 1 else ''} {shown}; {len(empty)} of its {num_classes} classes), drawn "
                     "evenly with the others: the model learned nothing of them; leave those images out (by their y)")
    try:
        with torch.no_grad():
            x, y = generate(D, n=n, labels=labels, seed=seed, sampler=sampler, sampler_steps=sampler_steps,
                            guidance=guidance, guidance_interval=guidance_interval, batch_size=batch_size,
                            device=device, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                            sampler_kwargs=sampler_kwargs, precision=precision)
    except ImagesMemoryError as e:   # the buffer for all n images, which no --batch-size makes smaller
        raise SampleError(_too_many_images(n, cfg, f"do not fit in memory ({e})")) from None
    except NonFiniteSamplesError as e:
        settings = ", ".join(f"{_OPTIONS.get(k, k)}={_option_text(v)}" for k, v in given.items() if v is not None)
        first = None if labels is None else labels[e.first:e.first + 1]
        if settings and _finite_by_default(D, first, seed=seed + e.first, sampler_steps=sampler_steps,
                                           sigma_min=default_min, sigma_max=default_max, device=device):
            raise SampleError(f"{settings}: {e} with these sampler settings, while image {e.first} comes out "
                              f"finite with the default ones: the settings, not the weights of checkpoint "
                              f"{str(path)!r}, are the cause; nothing written") from None
        also = " with the default sampler settings too" if settings else ""
        raise SampleFailure(f"checkpoint {str(path)!r} ({weights} weights): {e}{also}; its weights are unusable, "
                            f"nothing written") from None
    x = np.asarray(x.cpu().numpy() if torch.is_tensor(x) else x, dtype=np.uint8)
    # No y for an unconditional model: load_npz reads that as unlabelled (a y of -1 would be refused).
    y_np = None if y is None else np.asarray(y.cpu().numpy() if torch.is_tensor(y) else y, dtype=np.int64)
    private = bool(ledger["private"])
    # Steps of the ledger whose updates the weights do not hold (a divergence's, --spend-unsaved-steps'): a training
    # checkpoint's; a release file records none (h151 N1, stop 55)
    discarded = 0 if state["format"] == ckpt.MODEL_FORMAT else int(state.get(ckpt.DISCARDED_STEPS_KEY, 0))
    meta = {
        "private": private,
        "seed_given": ckpt.seed_given(cfg),   # trained with a given --seed (ckpt.SEED_GIVEN_NOTE)
        "epsilon": float(ledger["epsilon_spent"]) if private else None,
        "delta": float(ledger["delta"]),
        "plan_digest": str(ledger["plan_digest"]),
        "steps_done": int(ledger["steps_done"]),
        "plan_steps": int(ledger["plan_steps"]),
        # no private path (public_dataset_name); None (NaN in the npz, null in --json) where no name is public
        "dataset": None if (name := cfg.get("public_dataset", cfg.get("dataset"))) is None else str(name),
        "sampler": sampler, "sampler_steps": sampler_steps, "guidance": guidance, "weights": weights,
        # Which weights drew them (`weights_digest`): equal to what `dpdm export --json` reports of the release file.
        "weights_sha256": state["weights_sha256"],
        "guidance_interval": None if guidance_interval is None else [float(v) for v in guidance_interval], "seed": seed,
        "sigma_min": float(sigma_min), "sigma_max": float(sigma_max), "rho": float(rho),
        "sampler_kwargs": json.dumps(sampler_kwargs or {}, sort_keys=True), "precision": precision,
        # A generator warm-started on public data (`dpdm train --init-from`) says so in its samples.
        "init_dataset": public_init_name((cfg.get("init") or {}).get("dataset")),   # no folders (release_config)
    }
    out_path = Path(out_path)
    tmp = temp_path(out_path, ".tmp.npz")   # within NAME_MAX whatever the name's length (`temp_name_prefix`)
    grid_tmp = None
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        remove_temp_leftovers(out_path, TEMP_PATH_REST + re.escape(".tmp.npz"))
        # The model's class count (public: a label embedding per class) for `load_npz`, which read it off the
        # largest label: 2 classes for --n 2 of a 10-class model. Not for an unconditional model (no y).
        labels_part = {} if y_np is None else {"y": y_np, "num_classes": np.int64(num_classes)}
        # 0600 whatever the umask, as release files (the samples of a --no-dp model are near-copies of private
        # images), and on disk before the rename, as checkpoints.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            np.savez(f, x=x, **labels_part, **{f"meta_{k}": _meta_array(v) for k, v in meta.items()})
            f.flush()
            os.fsync(f.fileno())
        if grid_path:   # written (staged) before the npz is renamed into place: a failure writes neither
            from dpdm.report_utils import save_grid

            title = (f"dpdm samples, DP (eps={epsilon_text(meta['epsilon'], 3)}, delta={meta['delta']:g})" if private
                     else "dpdm samples, NON-PRIVATE (--no-dp)")
            if meta["steps_done"] < meta["plan_steps"] or discarded:   # as `dpdm sample`'s line says
                title += f", step {meta['steps_done']} of {meta['plan_steps']}" + (
                    f" (weights of {meta['steps_done'] - discarded} steps: {discarded} discarded)" if discarded else "")
            if private and meta["seed_given"]:
                title += ", GIVEN --seed"
            remove_temp_leftovers(grid_path, TEMP_PATH_REST + re.escape(".tmp"))
            # its mark names the model's plan and kind, which a later --grid of another model's samples checks
            grid_tmp = save_grid(x, y_np, grid_path, title=title, staged=True, identity=(meta["plan_digest"], private))
        # Checked again now that the images are drawn (minutes to hours at a real --n): a file that appeared at
        # --out or --grid meanwhile (another `dpdm sample` of the other kind, the user's own) was replaced, or
        # unlinked, where one there at the start is kept (s56 outwalk F1). What is left is the moment between
        # this check and the renames.
        try:
            check_outputs(out_path, grid_path, dataset=cfg.get("dataset"), plan_digest=str(ledger["plan_digest"]),
                          private=private, force=force)
        except SampleError as e:
            raise SampleError(f"{e} (it was put there while the images were drawn; the {n} images were not "
                              "written)") from None
        if grid_tmp is not None:
            # The old grid goes first and the new one comes last: a kill between the renames leaves the samples
            # (old or new) without a grid, never beside a grid of other samples (h111 N3).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(grid_path)   # a grid `dpdm sample` wrote (`check_outputs`, just now)
        os.replace(tmp, out_path)
        if grid_tmp is not None:
            os.replace(grid_tmp, grid_path)
    finally:
        tmp.unlink(missing_ok=True)
        if grid_tmp is not None:
            grid_tmp.unlink(missing_ok=True)
    for folder in dict.fromkeys(Path(os.path.abspath(p)).parent for p in (out_path, grid_path) if p):
        fsync_folder(folder)   # the renames, as `checkpoint.atomic_torch_save`'s
    return {"samples": str(out_path), "n": n, "grid": str(grid_path) if grid_path else None, **meta,
            **({ckpt.DISCARDED_STEPS_KEY: discarded} if discarded else {})}


def _too_many_images(n: int, cfg: dict, problem: str) -> str:
    """The error line of an --n whose images do not fit in memory, with the way out (several files)."""
    return (f"n={n} (--n) images of {cfg['img_channels']}x{cfg['img_resolution']}x{cfg['img_resolution']} "
            f"{problem}: draw them into several files with a smaller --n each, advancing --seed by that --n from "
            f"file to file (image i uses seed + i)")


def _churn_window_problem(sigmas: torch.Tensor, churn: dict) -> str | None:
    """Why `--sampler churn` with the keywords `churn` (S_churn, S_min, S_max as given; `sample_churn`'s defaults
    for the others) would not churn at any step of the schedule `sigmas`, or None. A window [S_min, S_max] between
    two noise levels (--s-min 60 --s-max 70 with levels 80 and 9.7) gave Heun's samples, recorded as churn."""
    import inspect

    from dpdm.sampling import churn_levels, sample_churn

    defaults = {k: p.default for k, p in inspect.signature(sample_churn).parameters.items()}
    S_churn, S_min, S_max = (float(churn.get(k, defaults[k])) for k in ("S_churn", "S_min", "S_max"))
    if S_churn == 0 or churn_levels(sigmas, S_min, S_max):   # S_churn 0 asks for Heun
        return None
    levels = [float(v) for v in sigmas[:-1]]
    nearest = [f"{v:g} {side}" for v, side in ((min((v for v in levels if v > S_max), default=None), "above"),
                                               (max((v for v in levels if v < S_min), default=None), "below"))
               if v is not None]
    window = " ".join(f"--{k.lower().replace('_', '-')} {v:g}{'' if k in churn else ' (default)'}"
                      for k, v in (("S_min", S_min), ("S_max", S_max)))
    return (f"{window}: none of the schedule's {len(levels)} noise levels ({levels[0]:g} down to {levels[-1]:g}; "
            f"nearest: {', '.join(nearest)}) lies in [{S_min:g}, {S_max:g}], so no step would churn and the samples "
            "would be Heun's, recorded as churn: widen the window, or use --sampler heun")


def default_sigma_range(train_sigma) -> tuple[float, float]:
    """The schedule's default (sigma_min, sigma_max) for a run trained on the noise levels `train_sigma` ((MIN, MAX)
    of `dpdm train --train-sigma`; None: the loss's own range): Karras's, narrowed to the levels the run trained on,
    so that the sampler does not ask the network about levels it never saw."""
    if train_sigma is None:
        return SIGMA_MIN, SIGMA_MAX
    return max(SIGMA_MIN, float(train_sigma[0])), min(SIGMA_MAX, float(train_sigma[1]))


def guidance_options_problem(guidance: float, guidance_interval, sigmas: torch.Tensor | None = None,
                             sampler: str = "euler", sampler_kwargs: dict | None = None) -> str | None:
    """Why `sample_checkpoint` refuses these guidance options, or None: an interval without guidance (recorded, but
    no step guided), or, given the schedule `sigmas`, an interval that holds none of the noise levels `sampler`
    evaluates (`_guidance_interval_problem`). Needs no checkpoint: benchmarks/quality.py asks before it trains the
    generator, whose sampling refused them only after hours of training (h93 F1)."""
    if guidance_interval is None:
        return None
    if guidance == 0:
        return (f"guidance_interval={_option_text(tuple(guidance_interval))} (--guidance-interval) needs guidance > 0 "
                "(--guidance): without it no step is guided")
    if sigmas is None:
        return None
    return _guidance_interval_problem(sigmas, guidance_interval, sampler, sampler_kwargs or {})


def sampler_options_problem(sampler: str, sampler_steps: int, rho: float, sampler_kwargs: dict | None) -> str | None:
    """Why `sample_checkpoint` refuses these sampler options, or None: options given (a rho other than RHO, a
    churn keyword present) that would be recorded in the samples and change none of them (h101 F5), as a
    guidance interval without guidance is: --s-noise, --s-min or --s-max with --s-churn 0 (no step churns: Heun's
    samples), and --rho with two steps or fewer (Eq. 5 of Karras et al. 2022 at n = 2 is sigma_max then sigma_min,
    whatever rho). Needs no checkpoint."""
    churn = sampler_kwargs or {}
    idle = [k for k in ("S_noise", "S_min", "S_max") if k in churn]
    if sampler == "churn" and idle and "S_churn" in churn and float(churn["S_churn"]) == 0:
        given = " ".join(f"{_OPTIONS[k]} {_given_text(churn[k])}" for k in idle)
        return (f"{given} with --s-churn 0: no step churns, so {'it changes' if len(idle) == 1 else 'they change'} "
                "none of the samples (they are Heun's) and would be recorded all the same: leave "
                f"{'it' if len(idle) == 1 else 'them'} out, or give --s-churn above 0")
    if rho != RHO and sampler_steps <= 2:
        levels = "sigma_max and sigma_min" if sampler_steps == 2 else "sigma_max"
        return (f"--rho {_given_text(rho)} with --sampler-steps {sampler_steps}: the schedule's noise levels are "
                f"{levels} alone, whatever rho, so it changes none of the samples and would be recorded all the same: "
                f"leave out --rho, or sample with 3 steps or more")
    return None


def _level_text(level: float, *bounds: float) -> str:
    """A noise level in %g, with more significant digits where 6 would put it on the other side of one of `bounds`
    (or on one): the float32 level 0.0020000000949949026 read "0.002 above (0, 0.002]", a refusal that looked like
    a bug (h93 F3)."""
    for digits in range(6, 18):
        text = f"{level:.{digits}g}"
        if all((float(text) > b) == (level > b) and (float(text) < b) == (level < b) for b in bounds):
            return text
    return repr(level)


def _given_text(value: float) -> str:
    """A number as the user typed it: the shortest text that reads back as `value` (Python's repr), "80" for 80.0."""
    text = repr(float(value))
    return text.removesuffix(".0")


def _guidance_interval_problem(sigmas: torch.Tensor, interval, sampler: str, churn: dict) -> str | None:
    """Why guidance in `interval` (lo, hi] would guide no network call of `sampler` on the schedule `sigmas`, or
    None. An interval between two noise levels (0.17 0.45 with levels 0.47 and 0.117) gave unguided samples,
    recorded as guided; the levels are those the sampler evaluates (`sampling.network_levels`: churn's raised
    sigma_hat, Heun's second call at sigma_next)."""
    from dpdm.sampling import network_levels

    lo, hi = (float(v) for v in interval)
    levels = sorted(set(network_levels(sigmas, sampler, churn)), reverse=True)   # Heun's repeat sigma_{i+1}
    if any(lo < v <= hi for v in levels):   # as `guided_denoise` compares them
        return None

    def level(v: float) -> str:   # as many digits as keep it on its side of lo and hi
        return _level_text(v, lo, hi)

    low, high = _given_text(lo), _given_text(hi)   # as typed: %g cut 0.0020000001 to 0.002
    nearest = [f"{level(v)} {side}" for v, side in ((min((v for v in levels if v > hi), default=None), "above"),
                                                    (max((v for v in levels if v <= lo), default=None), "below"))
               if v is not None]
    return (f"--guidance-interval {low} {high}: none of the {len(levels)} noise levels the {sampler} sampler "
            f"evaluates ({level(max(levels))} down to {level(min(levels))}; nearest: {', '.join(nearest)}) lies in "
            f"({low}, {high}], so no step would be guided and the samples would be unguided, recorded as guided: "
            "widen the interval, or leave out --guidance and --guidance-interval for unguided samples")


def _sigma_range_problem(sigma_min: float, sigma_max: float, *, given: dict, trained) -> str:
    """The error line of a schedule whose sigma_min is not below its sigma_max, blaming the option the user gave:
    an end left out is a default (Karras's, or the run's trained range: `dpdm train --train-sigma`), named as such
    (--sigma-max 0.05 on a run trained from 0.1 up blamed --sigma-min, which nobody had given)."""
    def default(end: str) -> str:
        low = end == "min"
        karras, value = (SIGMA_MIN, sigma_min) if low else (SIGMA_MAX, sigma_max)
        source = (f"Karras's sigma_{end}" if value == karras or trained is None
                  else f"the {'lowest' if low else 'highest'} noise level the run trained on")
        return f"{value:g}, {source} (the default --sigma-{end})"

    if given["sigma_min"] is None and given["sigma_max"] is not None:
        return (f"sigma_max={sigma_max:g} (--sigma-max) must be above {default('min')}; to sample below it, give "
                f"--sigma-min too")
    if given["sigma_max"] is None and given["sigma_min"] is not None and sigma_min > 0:
        return (f"sigma_min={sigma_min:g} (--sigma-min) must be below {default('max')}; to sample above it, give "
                f"--sigma-max too")
    if given["sigma_min"] is None:   # neither given: the trained range lies outside Karras's [0.002, 80]
        return (f"the run trained on noise levels {float(trained[0]):g} to {float(trained[1]):g}, outside Karras's "
                f"default schedule ({SIGMA_MIN:g} to {SIGMA_MAX:g}): give --sigma-min and --sigma-max")
    return (f"sigma_min={sigma_min:g} (--sigma-min) must be positive and below sigma_max={sigma_max:g} "
            f"(--sigma-max)")


def _option_text(value) -> str:
    """An option's value as a user types it: numbers in %g, a pair as "LO HI"."""
    if isinstance(value, (tuple, list)):
        return " ".join(_option_text(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _finite_by_default(D, labels, *, seed: int, sampler_steps: int, sigma_min: float, sigma_max: float,
                       device) -> bool:
    """Whether one image (`seed`, `labels`: its label [1] or None) comes out finite with the default sampler
    settings (euler, the default schedule, no guidance, fp32): then the weights are not what broke it."""
    from dpdm.sampling import NonFiniteSamplesError, generate

    try:
        generate(D, n=1, labels=labels, seed=seed, sampler_steps=sampler_steps, sigma_min=sigma_min,
                 sigma_max=sigma_max, device=device)
    except NonFiniteSamplesError:
        return False
    return True


def is_samples_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a samples file that `sample_checkpoint` wrote: an npz (read without pickle) with
    ``x`` and its ``meta_*`` arrays."""
    try:
        z = np.load(path, mmap_mode="r", allow_pickle=False)   # an .npy file: mapped, not read
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False
    if not isinstance(z, np.lib.npyio.NpzFile):
        return False
    with z:
        return {"x", "meta_plan_digest", "meta_private"} <= set(z.files)


def check_outputs(out_path: str | os.PathLike, grid_path: str | os.PathLike | None = None, *,
                  dataset: str | None = None, plan_digest: str | None = None, private: bool | None = None,
                  force: bool = False) -> None:
    """SampleError unless `sample_checkpoint` may write `out_path` and `grid_path`: each is new, or a file
    `dpdm sample` wrote (a samples npz, `is_samples_file`; a grid, `report_utils.is_dpdm_grid`), and
    neither is, or lies in, the run's dataset (`dataset`: its config's name, "npz:PATH" or "folder:PATH").
    A samples file of a model of another plan than `plan_digest` is replaced only with `force`: it may be
    another run's training data (a release file names no local path to protect); so is one of this plan whose
    private flag is not `private` (where given): a private model's samples and its --no-dp baseline's (h151 F1,
    stop 55). A grid likewise, by the plan and flag its mark names (`report_utils.grid_identity`); one whose mark
    names neither (drawn by a dpdm from before marks named them, or a `dpdm plan --curve` plot) is replaced only with
    `force` too, as a samples file without its plan's digest is (N1, stop 55). The kept file's kind is named where it
    differs from this model's, of another plan too (N4). Reads the files; writes nothing."""
    from dpdm.report_utils import grid_identity, is_dpdm_grid

    for option, path, ours, what in (("--out", out_path, is_samples_file, "samples file"),
                                     ("--grid", grid_path, is_dpdm_grid, "grid")):
        if not path:
            continue
        if os.path.lexists(path) and not (os.path.isfile(path) and ours(path)):
            raise SampleError(f"{option}={str(path)!r} already exists and is not a {what} from `dpdm sample`; it "
                              f"is kept: choose another {option}")
        # What a link names, and where the file lands: in a folder that is or lies in the data, the file lies in it
        # (`place_in_dataset` of the file itself would follow the link that the write replaces).
        where = place_in_dataset(path, dataset) or (place_in_dataset(written_path(path).parent, dataset)
                                                    and "is inside")
        if where:
            raise SampleError(f"{option}={str(path)!r} {where} the run's training data ({dataset!r}); write the "
                              "samples elsewhere")
        if plan_digest is None or force or not os.path.lexists(path):
            continue
        kept = f"; it is kept: choose another {option}, or pass --force to replace it"
        if option == "--out":
            (other, other_private), held = _samples_identity(path), "samples of"
        else:   # a grid names its model in its mark, as a samples file in its meta arrays
            (other, other_private), held = grid_identity(path) or (None, None), "a grid of samples of"
            if other is None:
                raise SampleError(f"--grid={str(path)!r} holds a grid from `dpdm sample` that names no plan or kind "
                                  "(private or --no-dp) of the model it shows (drawn by a dpdm from before grids "
                                  f"named them, or a `dpdm plan --curve` plot){kept}")
        this = f"this model is {'private' if private else 'NON-PRIVATE (--no-dp)'}"
        other_kind = private is not None and other_private is not private
        if other != plan_digest:   # its kind too where it is the other (N4, stop 55)
            whose = (f"the model of {privacy_name(other_private)} of another plan ({other[:19]}...; {this})"
                     if other_kind else f"a model of another plan ({other[:19]}...)")
            raise SampleError(f"{option}={str(path)!r} holds {held} {whose}"
                              + (", perhaps another run's training data" if option == "--out" else "") + kept)
        if other_kind:
            raise SampleError(f"{option}={str(path)!r} holds {held} the model of {privacy_name(other_private)} of "
                              f"this plan, and {this}{kept}")


def privacy_name(private: Any) -> str:
    """The run a release's or samples' private flag (their ledger's "private", their meta_private) names, as the
    line that keeps such a file names it (`check_outputs`, `dpdm.export.export_model`)."""
    return ("a private run" if private is True else "a NON-PRIVATE (--no-dp) run" if private is False
            else f"a run whose file says private={private!r}")


def written_path(path: str | os.PathLike) -> Path:
    """Where a write that renames a temporary file onto `path` puts the file: `path`'s folder with its links
    resolved, and `path`'s own name, a link or not (`os.replace` replaces a link, it does not write through it).
    `path` with its links resolved is where its link points: a check of that alone passed `dpdm export --out
    RUN/release.pt`, a link in the run folder to a file outside it, and the release was written into the run
    folder (h111 F2). The folder is resolved as the OS resolves it: os.path.abspath first removed a ".." after a
    link by its spelling, and `--grid LINK/../g.png` (LINK a link to a class folder) was checked in the folder
    holding LINK and written into the dataset's root."""
    path = os.path.join(os.getcwd(), os.fspath(path))   # not abspath: no ".." removed before the links it follows
    folder, name = os.path.split(path.rstrip(os.sep) or os.sep)
    if name in ("", os.curdir, os.pardir):   # a folder, not a file's name: where it resolves
        return Path(os.path.realpath(path))
    return Path(os.path.realpath(folder)) / name


def _samples_identity(path: str | os.PathLike) -> tuple[str, Any]:
    """The plan digest a samples file (`is_samples_file`) records ("" where it cannot be read, or is no scalar) and
    its private flag (meta_private: True, False, or None where it cannot be read). Sized on its header before it is
    read (`read_npz_scalars`): numpy decompressed it in full to show it, and a header claiming 10**12 bytes ended
    `dpdm sample --out` in "out of memory on the machine" (h112 F1)."""
    read = []
    for key in ("meta_plan_digest", "meta_private"):   # each on its own: one that is no scalar spoils only itself
        try:
            read.append(read_npz_scalars(path, [key]).get(key))
        except DataError:
            read.append(None)
    return "" if read[0] is None else str(read[0]), read[1]


def memory_needed(n: int, config: dict, *, batch_size: int) -> int:
    """Bytes `sample_checkpoint` holds for `n` images of the run `config` describes: the uint8 images, their
    int64 labels (twice: asked for and returned) and one float32 batch (of at least MIN_ROWS images)."""
    pixels = int(config["img_channels"]) * int(config["img_resolution"]) ** 2
    labels = 16 if int(config.get("num_classes", 0)) > 0 else 0
    return int(n) * (pixels + labels) + max(min(int(batch_size), int(n)), MIN_ROWS) * pixels * 4


def physical_memory() -> int | None:
    """This machine's physical memory in bytes (None where os.sysconf cannot say)."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return pages * size if pages > 0 and size > 0 else None


def memory_allowed() -> tuple[int | None, bool]:
    """The bytes this process may still allocate, as far as cheaply known (None: unknown), and whether an
    address-space limit sets it: the machine's physical memory, or less under `ulimit -v` (`resource.RLIMIT_AS`):
    the limit less the address space already in use. Under `ulimit -v 5000000` (4.8 GiB, 3 GiB of it taken by
    torch's libraries), 2.4 GiB of images passed the check against physical memory, failed to allocate, and the
    out-of-memory line advised a smaller --batch-size, which does not shrink them."""
    have = physical_memory()
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    except ImportError:
        return have, False
    used = address_space()
    if not used:   # no /proc to say what is in use
        return have, False
    if limit != resource.RLIM_INFINITY and (have is None or limit - used < have):
        return max(limit - used, 0), True
    return have, False


def _meta_array(value) -> np.ndarray:
    """A meta value as a plain numpy scalar/array: None as NaN, and anything numpy would store as an
    object array (which np.savez pickles and load_npz refuses) as its text."""
    try:
        a = np.asarray(np.nan if value is None else value)
    except ValueError:   # a ragged list, or one nested past numpy's 64 dimensions
        return np.asarray(str(value))
    return np.asarray(str(value)) if a.dtype == object else a
