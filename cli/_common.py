"""Small helpers shared by the CLI commands (no torch at import)."""
from __future__ import annotations

import json
import math
import os
import stat
import sys
from typing import Any

import click


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and +-inf: FloatRange's bounds let nan through (every
    comparison with it is false), and an open upper bound lets inf through. The error reads
    "--delta=nan is not a finite number": the option and the value, as DESIGN.md section 6 asks."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            raise _NamedBadParameter(f"{_option_name(param)}={rv} is not a finite number", ctx=ctx, param=param)
        return rv


class PathOption(click.Path):
    """click.Path that refuses an empty (or blank) value: click takes ``--out ""`` (an unset shell variable) for
    the current folder, or for no option at all (`dpdm plan` then wrote no plan and exited 0)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            raise _NamedBadParameter(f"{_option_name(param)}={value!r} is empty: name a file or folder", ctx=ctx,
                                     param=param)
        return super().convert(value, param, ctx)


class DatasetName(click.types.StringParamType):
    """A dataset option's value (``mnist5k``, ``npz:PATH``, ...) that refuses a blank one: ``--dataset ""`` (an
    unset shell variable) otherwise meant the default, for `dpdm plan` the mnist5k plan."""

    name = "text"

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not value.strip():
            raise _NamedBadParameter(f"{_option_name(param)}={value!r} is empty: name a dataset", ctx=ctx, param=param)
        return value


def _option_name(param) -> str:
    """An option's longest name (``--delta``), for a line that names it."""
    return sorted(getattr(param, "opts", None) or ["value"], key=len)[-1]


class _NamedBadParameter(click.BadParameter):
    """A BadParameter whose message already names the option (no "Invalid value for ..." prefix)."""

    def format_message(self) -> str:
        return self.message


def resolve_device(device: str) -> str:
    import torch

    from cli.errors import BadInput

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise BadInput(f"--device={device!r} is not a device: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device={device!r}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BadInput(f"--device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def checkpoint_of(run_dir: str | None, checkpoint_path: str | None):
    """The checkpoint that `--run RUN` or `--checkpoint FILE` names (exactly one of them)."""
    from pathlib import Path

    from cli.errors import BadInput

    if (run_dir is None) == (checkpoint_path is None):
        raise BadInput("give exactly one of --run and --checkpoint")
    for option, value in (("--run", run_dir), ("--checkpoint", checkpoint_path)):
        if value is not None and not value.strip():   # '' was taken as not given (a TypeError traceback)
            raise BadInput(f"{option}={value!r} is empty")
    path = Path(checkpoint_path) if checkpoint_path is not None else Path(run_dir) / "checkpoint.pt"
    problem = input_name_problem(path)
    if problem:
        option, value = ("--checkpoint", checkpoint_path) if checkpoint_path is not None else ("--run", run_dir)
        raise BadInput(f"{option}={value!r}: {problem}")
    if path.is_symlink() and path.exists() and not path.is_file() and not path.is_dir():
        # a link to /dev/zero or a FIFO: the loader called it "a broken link" (h151 N6, stop 55)
        raise BadInput(f"checkpoint {str(path)!r} is not a regular file (a link to a device or FIFO)")
    return path


def input_name_problem(path) -> str | None:
    """Why the input file `path` cannot even be looked up, or None (a missing file is left to its loader, which
    names it): a name in it longer than its file system takes (NAME_MAX), or a path past the system's PATH_MAX.
    The loaders' `Path.is_file` let that ENAMETOOLONG through, a "runtime failure", exit 4 (h93 F5): `checkpoint_of`
    (sample, export) and eval check with it; outputs are checked by `report_utils.output_parent_problem`."""
    import errno
    import os
    from pathlib import Path

    from dpdm.report_utils import name_max

    try:
        os.stat(path)
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            return None
        part = max(Path(path).parts, key=lambda p: len(os.fsencode(p)))
        size, limit = len(os.fsencode(part)), name_max(Path(path).parent)
        if size > limit:
            return (f"no such file: the name {part[:24]!r}... is {size} bytes long, more than the {limit} its file "
                    "system takes")
        return f"no such file: the path is longer than this system takes ({e.strerror})"
    return None


def emit_json(doc: dict[str, Any]) -> None:
    """The one JSON document that `--json` prints on stdout. Strict JSON (RFC 8259): a NaN or infinite number
    is null, since Python's Infinity and NaN tokens make JSON.parse and other strict readers fail."""
    click.echo(json.dumps(_finite(doc), indent=2, default=lambda v: _finite(_jsonable(v)), allow_nan=False))


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, float):
        return v
    return str(v)


def _finite(v: Any) -> Any:
    """`v` with every non-finite float (numpy's included) in its dicts, lists and tuples replaced by None."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def info(message: str) -> None:
    """Human output that must not pollute `--json` stdout."""
    click.echo(message, err=True)


def warn(message: str) -> None:
    click.echo(f"dpdm: warning: {message}", err=True)


def warn_known_seed(seed: int | None) -> None:
    """A private run or DP baseline given --seed: its guarantee rests on the seed staying secret. None: a resume of
    a run started with one (the seed is not on its command line)."""
    who = f"--seed {seed}: anyone who knows this seed" if seed is not None else \
        "the run was started with a given --seed: anyone who knows it"
    warn(f"{who} can replay the batches and the DP noise, which voids the guarantee; use it for tests and "
         "reproduction only, and keep it secret otherwise")


def warn_inferred(name: str, data) -> None:
    """What private training data's own records decided and the trained model reveals: its channel count
    (`warn_inferred_channels`) and its class count (`warn_inferred_classes`)."""
    warn_inferred_channels(name, data)
    warn_inferred_classes(name, data)


def warn_inferred_classes(name: str, data) -> None:
    """Private data whose class count was read off its own labels: the trained model reveals it (whether the
    largest label occurs at all, one record can decide)."""
    if not data.num_classes_inferred:
        return
    if data.class_names is not None:   # folder: one class per class folder, each of which must hold an image
        warn(f"--dataset={name!r}: the number of classes ({data.num_classes}) is that of the class folders, each of "
             "which must hold a private image, and the model reveals it; to fix it publicly, give the data as an "
             "npz with num_classes")
    else:
        warn(f"--dataset={name!r}: the number of classes ({data.num_classes}) was read from the private labels "
             "(their largest + 1) and the model reveals it; store num_classes in the npz to fix it publicly")


def warn_empty_classes(name: str, data) -> None:
    """Labelled training data with classes that have no image (an npz labelled {3, 7} has 8 classes, 6 of them
    empty): the model learns nothing of them, and `dpdm sample` draws every class evenly. Warned, not refused: a
    class count fixed publicly (an npz's num_classes, README "The number of classes is public too") may hold
    classes the private data lacks, and is then not advised to be remapped. Said to the data's owner only, as the
    class count line is."""
    if data.y is None or not data.num_classes:
        return
    from dpdm.datasets import empty_classes

    empty = empty_classes(data.y, data.num_classes)
    if not empty:
        return
    shown = ", ".join(map(str, empty[:12])) + (", ..." if len(empty) > 12 else "")
    kept = data.num_classes - len(empty)
    labels = "0" if kept == 1 else f"0..{kept - 1}"
    they, them, their = ("they are", "them", "their") if len(empty) > 1 else ("it is", "it", "its")
    # An npz's num_classes (not inferred) declares the classes: they are absent, not a gap in the numbering (h109 F3).
    fix = (f"remap the labels to {labels}, unless the class count is fixed publicly" if data.num_classes_inferred
           else f"its num_classes ({data.num_classes}) declares {them}: where {they} meant to be absent, leave "
                f"{their} samples out (by their y); otherwise lower num_classes to {kept} and remap the labels to "
                f"{labels}")
    warn(f"--dataset={name!r}: {len(empty)} of its {data.num_classes} classes {'have' if len(empty) > 1 else 'has'} "
         f"no image (label{'s' if len(empty) > 1 else ''} {shown}); the model learns nothing of {them}, yet `dpdm "
         f"sample` draws every class evenly, so {len(empty)}/{data.num_classes} of its samples would be of unseen "
         f"classes; {fix}")


def warn_unlabelled_npz(name: str, data) -> None:
    """An npz without ``y`` that holds other arrays (``labels``, ``targets``, ...): `load_npz` never reads them, so
    the data is unlabelled and the model unconditional, and nothing else says so before the budget is spent (h109
    F1). Names only, never their contents; dpdm's own ``meta_*`` arrays (a samples file) are left out."""
    shown = unread_arrays_shown(data)
    if data.y is None and shown:
        warn(f"--dataset={name!r}: it has no array 'y', so the data is unlabelled and the model unconditional; its "
             f"other arrays ({shown}) are never read: for a class-conditional model, store the labels as y")


def unread_arrays_shown(data) -> str:
    """The names of the arrays of `data`'s npz that dpdm did not read (`ImageData.unread_arrays`), as a line shows
    them ("'labels', 'ids'"), or "" where there are none. dpdm's own ``meta_*`` arrays (a samples file) are left
    out; at most 8 names of at most 40 characters."""
    others = [k for k in getattr(data, "unread_arrays", ()) if not k.startswith("meta_")]
    return ", ".join(repr(k if len(k) <= 40 else k[:37] + "...") for k in others[:8]) + (
        ", ..." if len(others) > 8 else "")


def warn_binary_pixels(name: str, data) -> None:
    """Images whose every pixel is 0 or 1 of 0..255: what floats in [0, 1] give when cast with x.astype(np.uint8),
    which the npz dtype check cannot see (h109 F1). They train as near-black images. Warned, not refused: binary
    images stored as 0 and 1 are legitimate, if unusual."""
    if not len(data) or round((float(data.x.max()) + 1) * 127.5) > 1:   # data.x: the uint8 grid mapped to [-1, 1]
        return
    warn(f"--dataset={name!r}: every pixel of its images is 0 or 1 (of 0..255), so they train as near-black images; "
         "floats in [0, 1] cast with x.astype(np.uint8) give that: store (x * 255).round().astype(np.uint8) instead "
         "(binary images as 0 and 255)")


def warn_dataset_not_plans(dataset: str | None, plan_dataset: str | None, what: str) -> None:
    """`--dataset` given as another dataset than the plan names: the guarantee holds for any data of the plan's
    size, but the plan (public, in every release file) names its own. `what`: who records the data ("the run").

    The names are compared as dpdm.train compares them for the run's "plan_names_data" (`same_dataset`, from the
    working folder): the plan's own file, given by another path (absolute, ./, a trailing slash, a link), is
    no other dataset."""
    from dpdm.datasets import same_dataset

    if dataset and plan_dataset and not same_dataset(dataset, plan_dataset):
        warn(f"--dataset={dataset!r}, but the plan was made for {plan_dataset!r}; its guarantee holds for any data "
             f"of its size, and {what} records the data it trained on")


def recorded_steps(out_dir: str) -> int:
    """The steps a private run in `out_dir` recorded (`dpdm.steps_record`), or 0: for advice lines only. Without
    importing torch, for `cli.main`'s signal lines."""
    from dpdm.steps_record import recorded_steps as read

    return read(out_dir)


# `accounting.MAX_PLAN_BYTES`, which the hint of Ctrl-C does not import (scipy: 2 s)
PLAN_BYTES = 16 << 20


def recorded_plan_steps(out_dir: str) -> int | None:
    """The steps of the plan in `out_dir`'s plan.json (a run folder's copy), or None where it cannot be read: for
    advice lines only (`dpdm train` verifies the plan itself). Without importing torch; read as `read_regular`
    reads (a FIFO there hung the hint of Ctrl-C, a link to /dev/zero read until memory ran out)."""
    from dpdm.steps_record import read_regular

    raw = read_regular(os.path.join(os.path.expanduser(out_dir), "plan.json"), PLAN_BYTES)
    try:
        steps = json.loads((raw or b"").decode("utf-8")).get("steps")
        return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else None
    except (ValueError, AttributeError, RecursionError):   # UnicodeDecodeError is a ValueError
        return None


def warn_steps_past_checkpoint(checkpoint, result: dict, what: str, *, data_digest: str | None = None) -> None:
    """The line `dpdm export` and `dpdm sample` add where `checkpoint` is (or links to) the checkpoint.pt of a private
    run that ran d steps (its `.steps_done`) past the checkpoint's c, stopped before it wrote another (h131 F1, stop
    53). The weights of step c are a post-processing of steps 1..c alone, so the epsilon(c) their ledger states holds
    for `what` (the release file, the samples) alone; but the run executed d private steps, and what they showed
    (metrics.csv, the progress bar) costs epsilon(d). The ledger is left as it is; the line names d, c and
    epsilon(d) (from the run's plan.json, where it loads and is the ledger's plan) and the resume that counts them.
    A record that `dpdm train --resume` refuses, one of another plan or other data than the checkpoint's (copied from
    another run's folder) or one that is damaged, is priced at nothing: the line says how many steps the run ran
    past its checkpoint cannot be told, and what train says of it (h151 F2, stop 55).
    `result`: export's or sample's summary (private, steps_done, plan_steps, plan_digest, the epsilon); `what`:
    whose epsilon it is, in the possessive ("the release file's", "the samples'"); `data_digest`: the checkpoint's
    fingerprint of its data (None: not compared), never shown. Torch-free reads."""
    if not result.get("private"):
        return
    done = int(result["steps_done"])
    if done >= int(result["plan_steps"]):
        return   # a finished run ran no step past its last checkpoint, whatever a .steps_done there says (r2 F3)
    spelled = os.path.expanduser(os.fspath(checkpoint))
    real = os.path.realpath(spelled)
    # The run's checkpoint.pt is the run's, also where it links to another name in its folder (the record read in
    # its folder, as `dpdm train --resume` there reads it, r2 F2), and so is a link to a run's checkpoint.pt
    # (`--checkpoint latest.pt`, h151 F3, stop 55); another file (a copy kept of an earlier checkpoint) is no
    # stopped run's (r1 F1, stop 53).
    from dpdm.steps_record import STEPS_RECORD, record_binding, read_record

    folder = os.path.dirname(spelled) or os.curdir
    if os.path.basename(spelled) != "checkpoint.pt" or (
            os.path.basename(real) == "checkpoint.pt" and not os.path.lexists(os.path.join(folder, STEPS_RECORD))):
        if os.path.basename(real) != "checkpoint.pt":
            return
        folder = os.path.dirname(real)
    record, problem = read_record(folder)
    ran = 0 if record is None else record[0]
    other = []   # what `dpdm.train._other_run_of_record` refuses the record for
    if record is not None and record[1] is not None and record[1] != record_binding(str(result["plan_digest"])):
        other.append(f"under plan sha256:{record[1]}... (not this run's plan, "
                     f"sha256:{record_binding(str(result['plan_digest']))}...)")
    if record is not None and record[2] is not None and data_digest and record[2] != record_binding(data_digest):
        other.append("on other data (other images or labels than this run's)")
    if problem is None and not other and ran <= done:
        return
    from dpdm.report_utils import epsilon_text

    stated = epsilon_text(result.get("epsilon_spent", result.get("epsilon")))   # export's name, sample's
    alone = f"{what} epsilon {stated} ({done} steps) holds for these weights alone"
    if _run_is_training(folder):   # sampled between its checkpoints: it has not stopped (r1 F1, stop 53)
        if problem is None and not other:   # its own record (train refused any other): not one read mid-write
            warn(f"the run in {folder!r} is training (step {ran} of its {result['plan_steps']}): these weights are "
                 f"of its checkpoint of step {done}, and {what} epsilon {stated} ({done} steps) holds for them alone")
        return
    untold = (f"its checkpoint of step {done} cannot be told: {alone}, and what anything else published from the "
              "run costs (metrics.csv, its losses, what its progress showed) is unknown; `dpdm train --resume` "
              "refuses the record")
    if problem is not None:   # as `dpdm.train._unsaved_steps` refuses it
        warn(f"the run in {folder!r} has a .steps_done that is not the record dpdm keeps of the steps a run ran "
             f"({problem}), so how many steps the run ran past {untold}: move it away and resume with the lr the "
             "run last trained at (config.json shows it), which replays those steps exactly")
        return
    if other:
        warn(f"the run in {folder!r} has a .steps_done that records {ran} step{'s' if ran != 1 else ''} of a run "
             f"{' and '.join(other)}: it is not this run's record (copied from another run's folder?), and those "
             f"steps stay spent against the data they ran on; how many steps this run ran past {untold}: move it "
             "back to its own run's folder and resume with the lr this run last trained at (config.json shows it), "
             "which replays this run's steps exactly")
        return
    import accounting

    try:   # advice only: where the plan does not load, or is not the ledger's, the line names the steps alone
        doc = accounting.load_plan(os.path.join(folder, "plan.json"))
        cost = (f"epsilon {epsilon_text(accounting.epsilon_spent(doc.plan, ran))} ({ran} steps)"
                if doc.digest == result.get("plan_digest") and ran <= doc.plan.steps else f"the epsilon of {ran} steps")
    except (OSError, ValueError, accounting.AccountingError):
        cost = f"the epsilon of {ran} steps"
    steps, it = (f"step {ran}", "it") if ran == done + 1 else (f"steps {done + 1} to {ran}", "them")
    goes_on = "" if ran >= int(result["plan_steps"]) else " and goes on"   # at the plan's last step, nothing follows
    warn(f"the run in {folder!r} ran {ran} of its {result['plan_steps']} steps (its .steps_done records them), "
         f"past its checkpoint of step {done}, before it stopped: {alone}, but the run has spent {cost}, which "
         "anything else published from it costs (metrics.csv, its losses, what its progress showed); `dpdm train "
         f"--resume` with the run's command and lr replays {steps}{goes_on}, its checkpoints counting {it}")


def _run_is_training(folder: str) -> bool:
    """Whether a `dpdm train` holds the run folder's lock (`dpdm.train._lock_run_folder`'s exclusive flock on
    `.train.lock`): tried with a shared non-blocking lock, released at once. False where there is no lock file, it
    is not a regular file, or the file system takes no locks."""
    try:
        import fcntl
    except ImportError:   # not POSIX: dpdm train locks nothing there either
        return False
    try:
        fd = os.open(os.path.join(folder, ".train.lock"), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError:   # no locks on this file system
        return False
    finally:
        os.close(fd)


def unsaved_steps_advice(out_dir: str) -> str | None:
    """What continues a run in `out_dir` stopped before its first checkpoint after it recorded steps (`.steps_done`):
    the same command with --spend-unsaved-steps, or, where they are all its plan's steps, a new plan (the plan is
    spent, and --spend-unsaved-steps is refused there). None where no step is recorded."""
    ran = recorded_steps(out_dir)
    if not ran:
        return None
    them, are = ("them", "are") if ran != 1 else ("it", "is")
    steps = recorded_plan_steps(out_dir)
    if steps is not None and ran >= steps:
        return (f"all {steps} steps of its plan ran and are spent, with no checkpoint: a new run needs a new plan and "
                "another --out")
    return (f"{ran} step{'s' if ran != 1 else ''} ran and {are} spent: the same command with --spend-unsaved-steps "
            f"counts {them} and goes on (or train in another --out and count {them})")


def warn_inferred_channels(name: str, data) -> None:
    """Private data whose channel count was read off its own images (a ``folder:`` dataset: one colour-mode
    image holding colour makes every image RGB): the trained model and its samples reveal it, and one record can
    decide it. Where colour-mode images made it RGB, the line names the first and how many there are (h124 F2), or
    the first grayscale one where those are the fewer (r1 F1, stop 52)."""
    from dpdm.datasets import inferred_channels_note

    note = inferred_channels_note(data) if getattr(data, "channels_inferred", False) else None
    if note:
        warn(f"--dataset={name!r}: {note}")


def warn_exif_orientation(name: str, data) -> None:
    """A ``folder:`` dataset's images that carry an EXIF orientation tag, which dpdm ignores (it reads pixels as
    stored, as torchvision's ImageFolder does): they train turned or mirrored against what a viewer shows, and a
    folder of phone photos mixes both (h112 F4). One line naming the first. Likewise its images with transparent
    pixels, whose alpha dpdm drops (h124 N3)."""
    from dpdm.datasets import exif_orientation_note, transparency_note

    for note in (exif_orientation_note(data) if getattr(data, "exif_turned", None) else None,
                 transparency_note(data) if getattr(data, "transparent", None) else None):
        if note:
            warn(f"--dataset={name!r}: {note}")


def discarded_note(result: dict) -> str:
    """" (k of them discarded: the weights hold the updates of d-k)" where export's or sample's summary (`result`)
    counts steps whose updates the weights do not hold (a divergence, --spend-unsaved-steps; h151 N1, r2 N2, stop
    55), else "": both commands' lines of one checkpoint say it alike."""
    discarded = result.get("discarded_steps", 0)
    return (f" ({discarded} of them discarded: the weights hold the updates of {result['steps_done'] - discarded})"
            if discarded else "")


def warn_non_private(path: str, what: str) -> None:
    """The line `dpdm export` and `dpdm sample` add for the outputs of a --no-dp model (h115 N1): `what` in `path`
    carries no guarantee about the data the model trained on."""
    warn(f"{path!r} holds {what}: they carry no guarantee about the data it trained on; do not release them where "
         "that data is private")


def warn_if_slow_bf16(precision: str, device: str) -> None:
    """bf16 autocast on a CPU without bf16 units is slower than fp32: say so rather than let it run slow."""
    if precision != "bf16" or not str(device).startswith("cpu"):
        return
    from dpdm.cpu import cpu_has_bf16_units

    if cpu_has_bf16_units() is False:
        warn("--precision bf16: this CPU has no bfloat16 units (AVX512-BF16 or AMX), so bf16 runs slower "
             "than fp32 here (7x as long for a --no-dp step and 14x for sampling, small U-Net, on one such machine)")


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()


def load_locked_plan(plan_path: str):
    """`accounting.load_plan` with every failure turned into one `--plan=...` error line."""
    import accounting
    from cli.errors import BadInput

    try:
        return accounting.load_plan(plan_path)
    except (ValueError, OSError, accounting.AccountingError) as e:
        raise BadInput(f"--plan={plan_path!r}: {e}") from None


def plan_dataset_name(doc, dataset: str | None) -> str:
    """--dataset, or the dataset the plan names. BadInput where the plan names none, or names a path that does not
    exist: said of the plan, which the user may not know names a path, and for a relative path, that it is read
    from the current folder, not the plan's (the line blamed a --dataset never given: h103 F6 for `dpdm train`,
    stop 49; `dpdm baseline` too)."""
    from cli.errors import BadInput
    from dpdm.datasets import dataset_path, is_path_dataset

    if dataset:
        return dataset
    name = doc.plan.dataset_name
    if not name:
        raise BadInput("--dataset is required: the plan names no dataset")
    if is_path_dataset(name) and not os.path.exists(dataset_path(name)):
        relative = "" if os.path.isabs(dataset_path(name)) else ", a path relative to the current folder,"
        raise BadInput(f"the plan's dataset {name!r}{relative} does not exist here; run from the folder the plan "
                       "was made in, or pass --dataset naming the data")
    return name


def load_public_data(option: str, public_name: str, private_name: str, *, data_root, download: bool, use: str):
    """The training split of the PUBLIC dataset `option` names, or one error line when it holds the
    private dataset's images (the same images or their source, `dataset_sizes.same_images`)."""
    from cli.errors import BadInput
    from dpdm.dataset_sizes import same_images

    if same_images(public_name, private_name):
        raise BadInput(f"{option}={public_name!r} holds the private dataset's images ({private_name!r}); "
                       f"{use} must use public data")
    return load_training_data(public_name, data_root=data_root, download=download, option=option)


def load_training_data(name: str, *, data_root, download: bool, option: str = "--dataset"):
    """The training split of `name`, or one `OPTION=...` error line; out of memory while loading it, one runtime
    failure line (exit 4) that says so: cli.main's generic line advised a smaller --physical-batch, which does
    not change the float32 copy of every image made here (h91, stop 47)."""
    from cli.errors import BadInput
    from dpdm.datasets import load_dataset

    try:
        return load_dataset(name, "train", data_root=data_root, download=download)
    except (ValueError, OSError) as e:  # DataError is a ValueError
        raise BadInput(f"{option}={name!r}: {e}") from None
    except (MemoryError, RuntimeError) as e:
        from cli.main import _out_of_memory

        if not _out_of_memory(e):
            raise
        raise _loading_out_of_memory(option, name, e) from None


def _loading_out_of_memory(option: str, name: str, e: BaseException):
    """The exit-4 line of data too large for memory: dpdm holds every image as float32 (4 bytes a pixel value)."""
    import re

    from cli.errors import runtime_failure

    asked = re.search(r"[Tt]ried to allocate (\d+) bytes", str(e))
    size = f" (tried to allocate {int(asked.group(1)) / 2**30:.1f} GiB)" if asked else ""
    return runtime_failure(f"out of memory on the machine while loading {option}={name!r}{size}: dpdm holds all of "
                           "its images in memory as float32, 4 bytes a pixel value (no batch size changes that); "
                           "use a machine with more memory or fewer images; nothing was written")


def check_augment_shift(shift: int, data) -> None:
    """--augment-shift within the images' sides (`dpdm.evaluate.check_shift`), before any training."""
    from cli.errors import BadInput
    from dpdm.evaluate import check_shift

    try:
        check_shift(shift, data.image_shape[1:], "--augment-shift")
    except ValueError as e:
        raise BadInput(str(e)) from None
