"""Checkpoints: written atomically, read only with `torch.load(weights_only=True)`, after the CRC-32 of every
zip record is checked (`damaged_record`: torch.load checks none).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (nothing that needs
pickle's GLOBAL opcode), so `weights_only=True` loads it and refuses anything else. It holds the
model, its EMA, the optimizer, every RNG state and the privacy ledger (plan digest, steps done,
epsilon spent so far).
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import math
import os
import pickle
import re
import shutil
import struct
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

FORMAT = "dpdm.checkpoint/1"
REQUIRED_KEYS = ("format", "model", "ema", "optimizer", "rng", "ledger", "config")
LEDGER_KEYS = ("plan_digest", "plan_steps", "steps_done", "epsilon_spent", "delta", "private")
# A release file (`dpdm export`): one set of weights, the network's description and the ledger; none of
# the run's secrets (seed, RNG state), optimizer state, or fingerprint of the private data. It carries
# its plan (the text of the run's plan.json), against which its ledger is re-accounted when loaded.
MODEL_FORMAT = "dpdm.model/1"
MODEL_KEYS = ("format", "weights", "state_dict", "config", "ledger", "plan")
LEDGER_RTOL = 1e-6   # a release file's epsilon against the accountant's at its steps
# A private run whose training seed its user chose (`dpdm train --seed`) carries no guarantee against whoever
# knows that seed; its outputs say so.
# A training checkpoint's count of steps whose updates its weights do not hold (absent: 0): a run that diverged at
# step d after its checkpoint of step c goes on from c's weights with a ledger of d steps (`dpdm.train`), the d - c
# steps between spent but discarded. Its optimizer has then taken steps_done - discarded_steps steps.
DISCARDED_STEPS_KEY = "discarded_steps"
SEED_GIVEN_NOTE = ("trained with a given --seed: whoever knows that seed can replay the batches and the DP noise, "
                   "so the guarantee holds only while it stays secret")


def seed_given(config: dict[str, Any]) -> bool:
    """Whether a run's config (a checkpoint's or a release file's) says its training seed was given by the user."""
    return bool((config.get("train") or {}).get("seed_given", False))


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated, not a dpdm checkpoint, or that would need
    arbitrary code (pickle globals) to load."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes `state` to `path` atomically: a temp file in the same folder, fsync, then rename.

    A crash at any moment leaves either the previous checkpoint or the new one, never a torn file.
    """
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    return atomic_torch_save(state, path)


def temp_file_pattern(path: str | os.PathLike) -> str:
    """The glob of the temporary files `atomic_torch_save(obj, path)` writes beside `path` (a write killed midway
    leaves one): their names start as `report_utils.temp_name_prefix` cuts them."""
    from dpdm.report_utils import temp_name_prefix

    return f"{glob.escape(temp_name_prefix(path))}.*.tmp"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save(obj)` to `path` through a temp file in the same folder, fsync and rename. The file
    is readable by its owner only (mkstemp's 0600): checkpoints hold the run's secret seed."""
    from accounting.plan import fsync_folder, written_folder   # lazily: accounting imports the accountants
    from dpdm.report_utils import temp_name_prefix

    # Where the OS puts `path`: mkstemp names its file as os.path.abspath would, which removes `LINK/..` by spelling
    # (r1 F4, stop 53)
    path = Path(written_folder(path)) / Path(path).name
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{temp_name_prefix(path)}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                _save_and_sync(obj, f, path)
            except BaseException:
                # Closing flushes what is still buffered; past a file-size limit that fails again, and the
                # `with` would raise that path-less "[Errno 27] File too large" in place of this error.
                with contextlib.suppress(OSError):
                    f.close()
                raise
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _save_and_sync(obj: Any, f, path: Path) -> None:
    """`torch.save(obj, f)`, flush and fsync; a failed write is an OSError naming `path`."""
    try:
        torch.save(obj, f)   # its writer flushes the file itself on the way out
    except OSError as e:   # past a size limit or a quota Python's write names no file
        _raise_naming(e, path)
    except RuntimeError as e:   # torch's writer: "unexpected pos 2043776 vs 2043668" on a full disk
        cause = e.__context__   # the write's own error, where Python's file object raised it
        if isinstance(cause, BaseException) and not isinstance(cause, Exception):
            # Ctrl-C (KeyboardInterrupt) or SIGTERM (cli.main.Terminated) raised by a signal handler that Python ran
            # inside the file's write: torch's writer made it "unexpected pos N vs M", which `dpdm` reported as an
            # internal error (a traceback, exit 4) where the signal's own line and exit code (130, 143) belong.
            raise cause.with_traceback(None) from None
        if isinstance(cause, OSError) and cause.errno is not None:
            # A quota (EDQUOT) or a file-size limit (EFBIG, `ulimit -f`) on a disk with room to spare
            # stayed torch's RuntimeError, a traceback: the OSError is what `dpdm` reports in one line.
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from None
        if shutil.disk_usage(path.parent).free >= (1 << 20):
            raise
        raise OSError(errno.ENOSPC, f"cannot write {str(path)!r}: no space left on device "
                                    f"({str(e).strip().splitlines()[0] if str(e).strip() else 'torch.save'})"
                      ) from None
    try:
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:
        _raise_naming(e, path)


def _raise_naming(e: OSError, path: Path) -> None:
    """Raises `e`, as an OSError naming `path` where it names no file."""
    if e.filename is not None or e.errno is None:
        raise e
    raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int = 0o666) -> Path:
    """Writes `text` to `path` atomically and durably, with `mode` less the umask
    (`accounting.plan.atomic_write_text`)."""
    from accounting.plan import atomic_write_text

    atomic_write_text(path, text, mode=mode)
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a checkpoint with `weights_only=True` and checks its layout.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, asks for pickle globals (it
            would run code: refused without running it), or is not a dpdm checkpoint.
    """
    state = _load_weights_only(path)
    if state.get("format") == MODEL_FORMAT:
        raise CheckpointError(f"{str(path)!r} is a release file from `dpdm export` (weights only), not a "
                              "training checkpoint")
    return _checked_checkpoint(state, path)


def load_model_or_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint or a release file (`dpdm export`), loaded with `weights_only=True` and checked.

    Raises:
        CheckpointError: as `load_checkpoint`, or a release file that lacks a part or whose ledger
            does not re-account against its plan (`verify_release_ledger`).
    """
    state = _load_weights_only(path)
    if state.get("format") != MODEL_FORMAT:
        return _checked_checkpoint(state, path)
    from dpdm.datasets import public_dataset_name

    state = _check_parts(state, MODEL_KEYS, f"model file {str(path)!r}")
    doc = verify_release_ledger(state, f"model file {str(path)!r}")
    # The dataset as the release's plan names it (a file exported before dpdm left private paths out holds one).
    state["config"] = {**state["config"], "public_dataset": public_dataset_name(state["config"].get("dataset"),
                                                                                 doc.plan.dataset_name)}
    return state


def verify_release_ledger(state: dict[str, Any], what: str) -> Any:
    """Raises CheckpointError unless the release file's plan is a locked plan (digest, certificate)
    and its ledger is that plan's (`verify_ledger`). An edited ledger, or a plan swapped in, is refused;
    a file rewritten consistently from scratch cannot be detected, so publish the file's sha256 (`dpdm
    export` prints it). Returns the plan document."""
    import accounting

    text = state.get("plan")
    if not isinstance(text, str):
        raise CheckpointError(f"{what} is incomplete (its plan is not the text of a plan.json)")
    try:
        doc = accounting.parse_plan(text, f"{what}: its plan")
    except accounting.PlanError as e:
        raise CheckpointError(str(e)) from None
    verify_ledger(state, doc, what)
    return doc


def verify_run_ledger(path: str | os.PathLike, state: dict[str, Any], *, missing: str) -> Any:
    """The plan document of the training checkpoint `state` read from `path`: the locked plan.json beside it (its
    run's, as `dpdm train` writes it), of the ledger's digest, against which its ledger re-accounts
    (`verify_ledger`). CheckpointError otherwise, with `missing` where no plan.json lies beside a copied checkpoint;
    in its run folder (beside the run's config.json), the line asks for the run's plan.json back, by its digest:
    advice to sample or export "from the run folder" was what the user had done."""
    import accounting
    from dpdm.report_utils import is_run_config

    path = Path(path)
    plan_path = path.parent / "plan.json"
    if not plan_path.exists():
        if is_run_config(path.parent / "config.json"):
            raise CheckpointError(f"the run folder {str(path.parent)!r} of checkpoint {str(path)!r} has lost its "
                                  "plan.json, against which the checkpoint's epsilon is checked: put the run's "
                                  "plan.json back (the locked plan it was trained under, whose \"digest\" is "
                                  f"{str(state['ledger']['plan_digest'])[:19]}...)")
        raise CheckpointError(missing)
    try:
        doc = accounting.load_plan(plan_path)
    except accounting.PlanError as e:
        raise CheckpointError(str(e)) from None
    if doc.digest != state["ledger"]["plan_digest"]:
        raise CheckpointError(f"{str(plan_path)!r} is plan {doc.digest[:19]}..., but checkpoint {str(path)!r} was "
                              f"trained under {str(state['ledger']['plan_digest'])[:19]}...")
    verify_ledger(state, doc, f"checkpoint {str(path)!r}")
    return doc


def verify_ledger(state: dict[str, Any], doc, what: str) -> None:
    """Raises CheckpointError unless the ledger of `state` (a checkpoint or a release file, already through
    `_check_parts`) is that of the plan document `doc`: same digest, steps and delta, steps done within the
    plan, and (private runs) epsilon spent equal to the accountant's at the steps done."""
    import math

    import accounting

    ledger, plan = state["ledger"], doc.plan
    steps = ledger["steps_done"]
    if (ledger["plan_digest"] != doc.digest or ledger["plan_steps"] != plan.steps or ledger["delta"] != plan.delta
            or isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= plan.steps):
        raise CheckpointError(f"{what}: its ledger (plan {str(ledger['plan_digest'])[:19]}..., {steps!r} of "
                              f"{ledger['plan_steps']!r} steps, delta {ledger['delta']!r}) is not its plan's "
                              f"({doc.digest[:19]}..., {plan.steps} steps, delta {plan.delta!r}); the file was edited")
    if ledger["private"]:
        expected = min(accounting.epsilon_spent(plan, steps), doc.epsilon)
        got = ledger["epsilon_spent"]
        if not isinstance(got, (int, float)) or not math.isclose(float(got), expected, rel_tol=LEDGER_RTOL):
            raise CheckpointError(f"{what}: its ledger says epsilon {got!r} after {steps} steps, the accountant "
                                  f"{expected:.6g}; the file was edited")


# What torch.load(weights_only=True) raises on a file it refuses: a pickle asking for code, a truncated zip, or
# a file that is no torch file at all (its legacy reader then fails with a KeyError on the "magic number", or with
# struct.error where the file ends inside one of its 4-byte reads: `printf junk`, mut58 F1, stop 55).
TORCH_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError,
                     AttributeError, TypeError, IndexError, struct.error)


def _load_weights_only(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        what = ("is a folder, not a file" if path.is_dir() else "is a broken link" if path.is_symlink()
                else "is not a regular file" if path.exists() else "does not exist")
        raise CheckpointError(f"checkpoint {str(path)!r} {what}")
    damaged = damaged_record(path)
    if damaged is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or truncated: {damaged}")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols; we refuse them anyway
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} refused: it cannot be loaded with weights_only=True "
            f"(it is corrupt or would run code when loaded): {unpickling_reason(e)}"
        ) from None
    except PermissionError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({e.strerror or e})") from None
    except TORCH_LOAD_ERRORS as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or truncated: {load_error_reason(e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} is not a dpdm checkpoint (format {FORMAT!r} expected)")
    return state


def damaged_record(path: str | os.PathLike) -> str | None:
    """Why a record of the zip file at `path` is damaged, as text naming it, or None when every record matches
    the CRC-32 its zip directory gives it (and for a file that is no zip at all: `torch.load` says what it is).

    torch.load does not check the CRC-32s torch.save writes: a flipped bit in a tensor's bytes loaded as another
    weight, was sampled from and re-exported, under a fresh sha256, without a word. Reading the file once more
    costs about 30 ms for the mnist preset's 27 MiB training checkpoint (torch.load itself: about 110 ms).

    Before anything is read, every record must be stored uncompressed, as torch.save writes them all, and hold no
    more bytes than the file itself: the memory torch.load can be asked for then follows the file's size, whatever
    the model's. A 2.5 MB file whose one record was DEFLATE-compressed 1.5 GiB of zeros had torch.load inflate it
    all into memory before refusing it (about 1,000:1: a 20 MB file asked for 20 GB; h101 F2)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None   # no zip directory, or none readable: torch.load refuses it with its own reason
    with archive:
        size = os.path.getsize(path)
        for info in archive.infolist():   # the zip directory only: nothing is inflated
            if info.compress_type != zipfile.ZIP_STORED:
                return (f"its record {info.filename} is compressed (zip method {info.compress_type}) and would "
                        f"inflate to {info.file_size:,} bytes; torch.save compresses none, so it is refused unread")
            if max(info.file_size, info.compress_size) > size:
                return (f"its record {info.filename} claims {max(info.file_size, info.compress_size):,} bytes, more "
                        f"than the whole file's {size:,}")
        try:
            bad = archive.testzip()   # reads every record; a CRC mismatch or a bad local header names the record
        except (OSError, EOFError, ValueError, NotImplementedError, zlib.error) as e:
            return f"its zip records cannot be read back ({load_error_reason(e)})"
    return None if bad is None else f"its record {bad} is damaged (its bytes fail the zip's CRC-32 check)"


# torch's weights_only refusal wraps its reason in advice this tool must not pass on (re-run with
# weights_only=False) and in a request to file a torch issue; only the reason is kept.
_TORCH_BOILERPLATE = ("Weights only load failed", "Check the documentation of torch.load", "Please file an issue",
                      "(1) ", "(2) ")


def load_error_reason(e: Exception) -> str:
    """One line saying why torch.load(weights_only=True), or loading a checkpoint's state dicts, failed: torch's
    reason for a refused pickle (`unpickling_reason`), else the error's first line, else its type."""
    if isinstance(e, pickle.UnpicklingError):
        return unpickling_reason(e)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    # torch's C++ prefix ("[enforce fail at inline_container.cc:180] . file in archive is not in a subdirectory")
    first = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", first)
    if isinstance(e, (KeyError, IndexError)):   # its text is a bare key ("174812789"): the type says more
        return f"{type(e).__name__} {first}".strip()
    return first or type(e).__name__


def state_dict_mismatch_reason(e: Exception, limit: int = 300) -> str:
    """One line saying why load_state_dict refused weights: torch's first line only says "Error(s) in loading
    state_dict for EDMPrecond:"; the lines after it name the keys (missing, unexpected, of another shape)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    text = " ".join(lines) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def unpickling_reason(e: Exception) -> str:
    """The line of a torch.load(weights_only=True) error that says what was refused, e.g. "Trying to load
    unsupported GLOBAL posix.system whose module posix is blocked." or "Unsupported operand 103"."""
    lines = [line.strip() for line in str(e).splitlines()]
    tag = "WeightsUnpickler error:"
    marked = [line.split(tag, 1)[1].strip() for line in lines if tag in line]
    for line in marked or lines:
        # "... was not an allowed global by default. Please use `torch.serialization.add_safe_globals(...)` ...":
        # how to allowlist it is advice this tool must not pass on either.
        line = line.split(" Please use ", 1)[0].strip()
        if line and not line.startswith(_TORCH_BOILERPLATE):
            return line
    return type(e).__name__


def _checked_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a dpdm checkpoint (format {FORMAT!r} expected)")
    return _check_parts(state, REQUIRED_KEYS, f"checkpoint {str(path)!r}")


# What every command that rebuilds the network reads from a checkpoint's (or release file's) config, and the
# ledger fields read as numbers: a file that loads but lacks one, or holds another type, is corrupt (a
# KeyError or AttributeError deep in `dpdm audit` or `dpdm sample` was a traceback, exit 4).
_CONFIG_TYPES = {"model": str, "precond": str, "sigma_data": float, "img_resolution": int, "img_channels": int,
                 "num_classes": int}
PRECONDS = ("edm", "v")   # `dpdm train --precond`: EDM's preconditioning or v-prediction
# The sigma_data `dpdm train` writes into every run's config, for either precond (the std of U[-1, 1], DPDM's): any
# other value is an edit (1e300 overflowed the sampler into a traceback, 1e30 into NaN blamed on the weights).
SIGMA_DATA = 3 ** -0.5
# Above this an image size, channel or class count is no network dpdm trains (2**31 classes: 128 GiB of label
# embedding at the small preset's 16 features), and near 2**63 torch's sizes overflow building it.
MAX_CONFIG_SIZE = 2**31 - 1
_LEDGER_TYPES = {"plan_steps": int, "steps_done": int, "epsilon_spent": float, "delta": float, "private": bool}


def _of_kind(v: Any, kind: type) -> bool:
    """bool for bool only; int: a non-negative int; float: any int or float; others by isinstance."""
    if kind is bool or isinstance(v, bool):
        return kind is bool and isinstance(v, bool)
    if kind is int:
        return isinstance(v, int) and v >= 0
    if kind is float:
        return isinstance(v, (int, float))
    return isinstance(v, kind)


def _bad_field(mapping: dict[str, Any], types: dict[str, type]) -> str | None:
    """The first field of `mapping` missing or not of its kind in `types`, as text, or None."""
    for key, kind in types.items():
        if key not in mapping:
            return f"no {key}"
        if not _of_kind(mapping[key], kind):
            return f"{key}={mapping[key]!r}"
    return None


def _check_parts(state: dict[str, Any], keys: tuple[str, ...], what: str) -> dict[str, Any]:
    """`state` itself, if it has every key of `keys`, a complete ledger and a config from which the network
    can be rebuilt, each field of its type; else CheckpointError."""
    missing = [k for k in keys if k not in state]
    ledger = state.get("ledger")
    if missing or not isinstance(ledger, dict) or any(k not in ledger for k in LEDGER_KEYS):
        raise CheckpointError(f"{what} is incomplete (missing {missing or 'ledger fields'})")
    config = state.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{what} is corrupt: its config is a {type(config).__name__}, not a mapping")
    for part, mapping, types in (("config", config, _CONFIG_TYPES), ("ledger", ledger, _LEDGER_TYPES)):
        bad = _bad_field(mapping, types)
        if bad is not None:
            raise CheckpointError(f"{what} is corrupt: its {part} has {bad}")
    training = state.get("format") == FORMAT
    problem = (_config_problem(config, training) or _ledger_problem(ledger, config)
               or (None if training else _release_weights_problem(state["weights"])))
    if problem is None and training:
        problem = _training_state_problem(state)
    if problem is not None:
        raise CheckpointError(f"{what} is corrupt or was edited: {problem}")
    return state


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _value_text(v: Any) -> str:
    """A field's value for an error line: its repr where short and flat, else its type (a list nested 200 deep)."""
    text = repr(v) if isinstance(v, (str, int, float, bool)) else ""
    return text if 0 < len(text) <= 80 else f"a {type(v).__name__}"


def _release_weights_problem(weights: Any) -> str | None:
    """Why a release file's `weights` is not a name `dpdm export` writes ("ema", "raw", "power:GAMMA"), or None:
    it reaches the samples' meta as it is."""
    if isinstance(weights, str) and weights in ("ema", "raw"):
        return None
    if isinstance(weights, str) and weights.startswith("power:"):
        try:
            if math.isfinite(float(weights.removeprefix("power:"))):
                return None
        except ValueError:
            pass
    return f"its weights are {_value_text(weights)}, not ema, raw or power:GAMMA"


def _config_problem(config: dict[str, Any], training: bool) -> str | None:
    """What is wrong with the config parts that commands read past the network's description, or None. The
    free-form fields that reach the samples' meta (dataset, init's dataset and sha256, train.seed_given) are typed
    too: a list there was a traceback (exit 4) after every image had been drawn (h101 F6)."""
    if config["precond"] not in PRECONDS:   # build_denoiser took any other name for EDM's
        return f"its config's precond is {config['precond']!r}, not one of {', '.join(map(repr, PRECONDS))}"
    if not math.isclose(config["sigma_data"], SIGMA_DATA, rel_tol=1e-9):
        return f"its config's sigma_data is {config['sigma_data']!r}; dpdm trains every network at sqrt(1/3) = 0.57735"
    for key in ("img_resolution", "img_channels", "num_classes"):
        if config[key] > MAX_CONFIG_SIZE:
            return f"its config's {key} is {config[key]}, more than any network dpdm trains (at most 2**31 - 1)"
    if config.get("dataset") is not None and not isinstance(config["dataset"], str):
        return f"its config's dataset is {_value_text(config['dataset'])}, not a dataset's name"
    train = config.get("train")
    if train is not None or training:   # a release file may lack it; a training checkpoint holds its seed there
        if not isinstance(train, dict):
            return f"its config's train is {type(train).__name__}, not a mapping"
        seed = train.get("seed")
        if training and not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
            return f"its config's train.seed is {seed!r}, not an integer in [0, 2**63)"
        sigma = train.get("train_sigma")
        if sigma is not None and not (isinstance(sigma, (list, tuple)) and len(sigma) == 2
                                      and all(_is_number(v) and math.isfinite(v) for v in sigma)
                                      and 0 < sigma[0] < sigma[1]):   # [nan, 1] was sampled from
            return f"its config's train.train_sigma is {sigma!r}, not (min, max) with 0 < min < max"
        if not isinstance(train.get("seed_given", False), bool):
            return f"its config's train.seed_given is {_value_text(train['seed_given'])}, not true or false"
        if training:
            problem = _train_knobs_problem(train)
            if problem:
                return problem
    init = config.get("init")
    if init is not None and not isinstance(init, dict):
        return f"its config's init is {type(init).__name__}, not a mapping"
    for key in ("dataset", "sha256"):
        value = (init or {}).get(key)
        if value is not None and not isinstance(value, str):
            return f"its config's init.{key} is {_value_text(value)}, not text"
    empty = config.get("empty_classes")   # a training checkpoint's labels without an image (`dpdm sample` says so)
    if empty is not None and not (isinstance(empty, list) and all(_of_kind(c, int) for c in empty)):
        return f"its config's empty_classes is {_value_text(empty)}, not a list of class labels"
    if "private" in config and not isinstance(config["private"], bool):
        return f"its config's private is {config['private']!r}"
    return None


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_segment(seg: Any) -> bool:
    return isinstance(seg, (list, tuple)) and len(seg) == 3 and all(isinstance(v, (int, float, str)) for v in seg)


# A training checkpoint's train knobs that `dpdm train --resume` takes as the run's options (`cli.train`'s
# `_resumed_options`), before `TrainConfig` checks their values: each as what it must be, and that test. Typed
# here, where a list was a traceback (exit 4), and a list of shared references in lr_segments a hang (h145 F3).
_TRAIN_KNOBS = {
    "lr": ("a number", _is_number),
    "lr_schedule": ("a schedule's name", lambda v: isinstance(v, str)),
    "lr_segments": ("null or a list of (first step, lr, schedule)",
                    lambda v: v is None or isinstance(v, (list, tuple)) and all(map(_is_segment, v))),
    "per_layer_rules": ("true, false or null", lambda v: v is None or isinstance(v, bool)),
    "physical_batch": ("null or an integer >= 1", lambda v: v is None or _is_count(v)),
    "checkpoint_every": ("an integer >= 1", _is_count),
    "log_every": ("an integer >= 1", _is_count),
    "ema_decay": ("a number", _is_number),
    "ema_powers": ("a list of numbers", lambda v: isinstance(v, (list, tuple)) and all(map(_is_number, v))),
    "trainable": ("null or a list of patterns",
                  lambda v: v is None or isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v)),
    "subspace_dim": ("null or an integer >= 1", lambda v: v is None or _is_count(v)),
    "subspace_data": ("null or a dataset's name", lambda v: v is None or isinstance(v, str)),
    "subspace_every": ("an integer >= 1", _is_count),
    "subspace_examples": ("an integer >= 1", _is_count),
    "precision": ("a precision's name", lambda v: isinstance(v, str)),
}


def _train_knobs_problem(train: dict[str, Any]) -> str | None:
    """The first of a training checkpoint's `_TRAIN_KNOBS` not of its kind, as a line's end, or None (one an older
    dpdm did not record is not there)."""
    for key, (what, ok) in _TRAIN_KNOBS.items():
        if key in train and not ok(train[key]):
            return f"its config's train.{key} is {_value_text(train[key])}, not {what}"
    return None


def _ledger_problem(ledger: dict[str, Any], config: dict[str, Any]) -> str | None:
    """A ledger at odds with itself or with the config (a flipped private flag turned a --no-dp run's outputs
    into "DP" ones), or None."""
    private, eps = ledger["private"], float(ledger["epsilon_spent"])
    if "private" in config and config["private"] != private:
        return f"its ledger says private={private}, its config private={config['private']}"
    if private and not (eps >= 0 and eps != float("inf")):
        return f"its ledger is private with epsilon {eps!r}"
    if not private and eps != float("inf"):
        return f"its ledger is not private (--no-dp) but records epsilon {eps!r}"
    if ledger["steps_done"] > ledger["plan_steps"]:
        return f"its ledger has {ledger['steps_done']} of {ledger['plan_steps']} steps done"
    return None


def _training_state_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with a training checkpoint's optimizer and RNG state, or None. A private run steps Adam
    once per step for every trained parameter, so each parameter's step count is the ledger's steps done less the
    discarded ones (`DISCARDED_STEPS_KEY`; one edited field, or a flipped bit, had a finished run resume and train
    past its plan); a --no-dp run skips empty batches, so its counts are at most that. Weights that hold no step
    (a run that diverged before its first checkpoint) come with no optimizer state."""
    if not isinstance(state.get("ema_power", {}), dict):
        return "its power EMAs are not a mapping"
    rng = state["rng"]
    if not (isinstance(rng, dict) and torch.is_tensor(rng.get("torch")) and rng["torch"].dtype == torch.uint8
            and rng["torch"].shape == torch.get_rng_state().shape):
        return "its RNG state is not a torch generator state"
    opt = state["optimizer"]
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)):
        return "its optimizer state is not an optimizer's state_dict"
    ledger = state["ledger"]
    done, private = ledger["steps_done"], ledger["private"]
    if done == 0:   # dpdm train saves after a step, never before the first: resuming it would spend again
        return "its ledger has no step done (dpdm never saves such a checkpoint)"
    discarded = state.get(DISCARDED_STEPS_KEY, 0)
    if isinstance(discarded, bool) or not isinstance(discarded, int) or not 0 <= discarded <= done:
        return f"its {DISCARDED_STEPS_KEY} is {_value_text(discarded)}, not a number of steps from 0 to its {done} done"
    applied = done - discarded   # the steps whose updates the weights hold
    trained = sum(len(g.get("params", ())) if isinstance(g, dict) else 0 for g in opt["param_groups"])
    if private and len(opt["state"]) != (trained if applied else 0):
        return (f"its optimizer has state for {len(opt['state'])} of its {trained} parameters, its ledger {done} steps"
                + (f" ({discarded} discarded)" if discarded else ""))
    for per_param in opt["state"].values():
        step = per_param.get("step") if isinstance(per_param, dict) else None
        if step is None or not ((torch.is_tensor(step) and step.numel() == 1) or _is_number(step)):
            return "its optimizer state has a parameter without a step count"
        step = float(step)
        if private:
            consistent = step == applied
        else:
            consistent = 0 <= step <= applied
        if not consistent:
            return (f"its optimizer has taken {step:g} steps, its ledger says {done} were done"
                    + (f", {discarded} of them discarded" if discarded else ""))
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
