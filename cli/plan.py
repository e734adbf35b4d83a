"""`dpdm plan` (calibrate a locked privacy plan) and `dpdm account` (epsilon side by side).

Never imports torch: planning starts fast. matplotlib is imported only for --curve.
"""
from __future__ import annotations

import functools
import json
import math
import os

import click

from cli._common import DatasetName, FiniteFloatRange, PathOption, emit_json, warn
from cli.errors import BadInput, runtime_failure

from dpdm.cpu import address_space
from dpdm.dataset_sizes import DATASET_SIZES, copies_per_source_image  # noqa: E402  (one table, torch-free)
from dpdm.noise_scale import noise_scale_problem
from dpdm.report_utils import (epsilon_text, file_name_problem, output_folder, output_target, path_length_problem,
                               through_a_file_problem)

# Defaults of a plain `dpdm plan --eps E --delta D`: mnist5k on a CPU. An expected batch of 256
# keeps the sample rate (0.064) near the paper's 1/15, so the noise multiplier behaves as in the
# paper's MNIST runs, while one step (256 examples x K noise draws) stays at CPU scale; 30 epochs
# (469 steps) is the fewest that gave recognisable digits in small DP diffusion runs and keeps a
# CPU run to hours, not days. At eps 10 this gives noise_multiplier ~1.0. Change them here.
DEFAULT_DATASET = "mnist5k"
DEFAULT_BATCH_SIZE = 256
DEFAULT_EPOCHS = 30.0
DEFAULT_CLIP_NORM = 1.0
DEFAULT_MULTIPLICITY = 32  # K, as in the paper (privacy-neutral; costs compute)

# The paper's settings (research/dpdm.md section 2). Epsilon is chosen per run.
PRESETS = {
    "mnist-paper": dict(dataset="mnist", batch_size=4096, epochs=300.0, multiplicity=32, clip_norm=1.0, delta=1e-5),
    "fashion-mnist-paper": dict(dataset="fashion-mnist", batch_size=4096, epochs=300.0, multiplicity=32,
                                clip_norm=1.0, delta=1e-5),
    "cifar10-paper": dict(dataset="cifar10", batch_size=2048, epochs=500.0, multiplicity=8, clip_norm=1.0,
                          delta=1e-5),
    "celeba-paper": dict(dataset="celeba", batch_size=2048, epochs=300.0, multiplicity=32, clip_norm=1.0,
                         delta=1e-6),
}

_POSITIVE = FiniteFloatRange(min=0, min_open=True)
_UNIT_OPEN = FiniteFloatRange(min=0, max=1, min_open=True, max_open=True)
# The limits the accounting package sets (delta >= 1e-10 and 1e-13 per step, MAX_STEPS 10**7, MAX_DATASET_SIZE 10**12)
# are checked in the command bodies: importing accounting here would slow `dpdm --help`.
_DELTA_HELP = "(at least 1e-10, and 1e-13 per step: below it the accountants lose double precision)"


# dp-accounting fails on a subnormal sample rate ("a must be greater than b. Got a=inf and b=inf."); 1e-300 works.
_SMALLEST_NORMAL = 2.2250738585072014e-308

# DPDM_MEMORY_LIMIT: bytes (suffix K, M, G or T; at least _MIN_MEMORY_LIMIT; "off" for none) that `dpdm plan` and
# `dpdm account` may add to their address space, once the accountants are imported; by default 90% of the memory
# available when they start.
MEMORY_LIMIT_ENV = "DPDM_MEMORY_LIMIT"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_MIN_MEMORY_LIMIT = 256 * 2**20   # matplotlib's import for --curve and a small plan fit well within it


def _memory_capped(command):
    """Runs `command` under a cap on the address space (Linux, `resource.RLIMIT_AS`): the accountants' grids grow
    with the steps and shrink with the noise, and within the accepted ranges (noise multiplier 0.05 at sample
    rate 1 over 10**7 steps) PLD took array after array until the kernel's OOM killer ended the process without a
    word, after two minutes, at 24 GB on a 23 GiB machine. Under the cap the first allocation beyond it fails as
    MemoryError: one line, exit 4 (`cli.main`). The limit is restored afterwards (tests call commands in-process)."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            import resource
        except ImportError:   # not on Linux or macOS: no cap
            return command(*args, **kwargs)
        extra = _memory_allowance()
        import accounting  # noqa: F401  (scipy, dp-accounting, prv-accountant: their imports map memory of their own)

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = None if extra is None else address_space() + extra
        if cap is None or cap >= 2**62 or (soft != resource.RLIM_INFINITY and soft <= cap):
            return command(*args, **kwargs)
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        try:
            return command(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return run


def _memory_allowance() -> int | None:
    """Bytes the command may add: $DPDM_MEMORY_LIMIT, else 90% of /proc/meminfo's MemAvailable (None: no cap)."""
    given = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    text = given.upper().removesuffix("B").removesuffix("I")
    if text in ("OFF", "NONE", "UNLIMITED"):
        return None
    if given:   # not `text`: "B", "I" or "IB" alone left nothing and read as unset, the default cap
        unit = text[-1] if text and text[-1] in _UNITS else ""
        try:
            value = float(text[:len(text) - len(unit)]) * _UNITS[unit]
        except ValueError:
            value = -1.0
        if not (math.isfinite(value) and value >= _MIN_MEMORY_LIMIT):
            raise BadInput(f"{MEMORY_LIMIT_ENV}={os.environ[MEMORY_LIMIT_ENV]!r} must be a number of bytes of at least "
                           f"256M (optionally with K, M, G or T), or off")
        return int(min(value, 2**62))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(0.9 * int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return None


@click.command("plan")
# Budget
@click.option("--eps", "epsilon", type=_POSITIVE, help="Target epsilon: calibrate the noise multiplier.")
@click.option("--noise-multiplier", type=_POSITIVE, help="Given noise multiplier: compute epsilon instead.")
@click.option("--delta", type=_UNIT_OPEN, help=f"Target delta {_DELTA_HELP}; a preset supplies one.")
# Data
@click.option("--dataset", type=DatasetName(),
              help=f"Dataset name: {', '.join(DATASET_SIZES)}, or folder:PATH, npz:PATH (your own data; with "
                   f"--dataset-size)  [default: {DEFAULT_DATASET}, none with --dataset-size alone]")
@click.option("--dataset-size", type=click.IntRange(min=1), help="Number of private examples N (at most 10**12).")
# Mechanism
@click.option("--batch-size", type=click.IntRange(min=1),
              help=f"Expected batch size B (sample rate B/N)  [default: {DEFAULT_BATCH_SIZE}]")
@click.option("--epochs", type=_POSITIVE, help=f"Epochs X: steps = ceil(X*N/B)  [default: {DEFAULT_EPOCHS:g}]")
@click.option("--steps", type=click.IntRange(min=1), help="Number of noisy steps T (at most 10**7).")
@click.option("--clip-norm", type=_POSITIVE, help=f"Per-example clipping norm C  [default: {DEFAULT_CLIP_NORM:g}]")
@click.option("--multiplicity", type=click.IntRange(min=1),
              help=f"Noise draws per example K  [default: {DEFAULT_MULTIPLICITY}]")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), help="The paper's settings for a dataset.")
# Output
@click.option("--out", type=PathOption(dir_okay=False, writable=True),
              help="Write the locked plan here (an existing file holding another plan is kept; see --force).")
@click.option("--force", is_flag=True,
              help="Let --out replace a file that holds a different plan, or an empty file; any other file is kept, "
                   "and so is a run's own plan.json.")
@click.option("--curve", type=PathOption(dir_okay=False, writable=True),
              help="Plot epsilon against steps (.png; .pdf, .svg, .jpg by extension).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan document (JSON) and nothing else on stdout.")
@_memory_capped
def plan(epsilon, noise_multiplier, delta, dataset, dataset_size, batch_size, epochs, steps, clip_norm,
         multiplicity, preset, out, force, curve, as_json):
    """Calibrate the smallest noise that meets (eps, delta), certified by RDP and PLD (PRV a cross-check)."""
    import accounting

    if (epsilon is None) == (noise_multiplier is None):
        raise click.UsageError("give exactly one of --eps (calibrate) or --noise-multiplier (compute epsilon)"
                               if epsilon is None else "--eps and --noise-multiplier are mutually exclusive")
    if epochs is not None and steps is not None:
        raise click.UsageError("--epochs and --steps are mutually exclusive")
    p = dict(PRESETS[preset]) if preset else {}
    delta = delta if delta is not None else p.get("delta")
    if delta is None:
        raise click.UsageError("--delta is required (for example --delta 1e-5)")
    _check_delta(delta)
    for option, value in (("--dataset-size", dataset_size), ("--batch-size", batch_size)):
        if value is not None and value > accounting.MAX_DATASET_SIZE:
            raise BadInput(f"{option}={_brief(value)} must be <= {accounting.MAX_DATASET_SIZE} (10**12)")
    _check_steps(steps)
    unnamed = None  # why the plan names no dataset although the preset does
    if dataset is None and dataset_size is not None and p.get("dataset"):
        if dataset_size == DATASET_SIZES[p["dataset"]]:
            dataset = p["dataset"]  # the preset's own dataset: keep its name in the plan
        else:
            unnamed = (f"--preset {preset} with --dataset-size {dataset_size} (not the {DATASET_SIZES[p['dataset']]} "
                       f"examples of {p['dataset']!r}): the plan names no dataset, so give `dpdm train` --dataset")
    name, size = _resolve_dataset(dataset or (None if dataset_size else p.get("dataset", DEFAULT_DATASET)),
                                  dataset_size)
    batch_source = _source(batch_size, "batch_size", p, preset)
    batch_size = batch_size or p.get("batch_size", DEFAULT_BATCH_SIZE)
    if batch_size > size:
        raise BadInput(f"--batch-size={batch_size}{batch_source} must be <= the dataset size {size}")
    if steps is None:
        epochs_source = _source(epochs, "epochs", p, preset)
        epochs = epochs or p.get("epochs", DEFAULT_EPOCHS)
        exact = epochs * size / batch_size
        if not exact <= accounting.MAX_STEPS:
            raise BadInput(f"--epochs={epochs:g}{epochs_source} gives {exact:.3g} steps (epochs * N / B), above the "
                           f"limit of {accounting.MAX_STEPS} steps")
        steps = max(1, math.ceil(round(exact, 9)))
    _check_delta(delta, steps)
    # '~' as `dpdm sample` and `dpdm export` read it: `--out='~/p.json'` (a '~' the shell leaves alone) made a
    # folder named '~' here (r1 N1, stop 53)
    out, curve = (os.path.expanduser(p) if p else p for p in (out, curve))
    if out:
        _check_output("--out", out)
    if curve:
        curve = _curve_path(curve, name)
        if out and output_target(curve) == output_target(out):
            raise BadInput(f"--curve={curve!r} is the --out plan file; give the plot its own file")
    if unnamed:
        warn(unnamed)
    copies = copies_per_source_image(name)
    if copies > 1:   # public sets meant for warm starts; private data made this way is protected per copy
        warn(f"{name} holds up to {copies} distorted copies of each of its source images: this plan's epsilon "
             f"protects one copy, and an image's copies together only as a group (up to about {copies} times the "
             "epsilon); it is public data for warm starts, and a plan on the source images protects them")
    try:
        privacy_plan = accounting.PrivacyPlan(
            dataset_size=size, dataset_name=name, batch_size=batch_size, steps=steps,
            noise_multiplier=noise_multiplier or 1.0, target_epsilon=epsilon, delta=delta,
            clip_norm=clip_norm or p.get("clip_norm", DEFAULT_CLIP_NORM),
            noise_multiplicity=multiplicity or p.get("multiplicity", DEFAULT_MULTIPLICITY))
        for warning in privacy_plan.warnings():
            warn(warning)
        if epsilon is not None:
            privacy_plan = privacy_plan.calibrate(epsilon=epsilon)
        doc = accounting.make_plan_document(privacy_plan)
    except accounting.AccountingError as e:
        raise runtime_failure(str(e)) from e
    except accounting.FftPrecisionError as e:
        raise BadInput(f"--delta={delta:g} is too small to cross-check this plan ({e}); raise --delta or take "
                       "fewer steps") from e
    except ValueError as e:   # PrivacyPlan's checks name its fields: name the options instead
        raise BadInput(_named_option(str(e))) from e
    if doc.prv_overruled:
        warn(f"PRV overruled: {doc.prv_overruled}")
    if doc.prv_failed:
        warn(f"prv-accountant gave no epsilon for this plan ({doc.prv_failed}); " + (
            "dpdm's own PLD cross-checked the certificate in its place" if _bracketed(doc) else
            "dpdm's own PLD gives no bracket for it either, so nothing cross-checked the certificate (PLD's "
            "and RDP's bounds are both rigorous upper bounds)"))
    if doc.prv_unreliable:   # from the figures at hand: no accounting of its own
        warn(doc.prv_unreliable)
    untrainable = noise_scale_problem(doc.plan.noise_multiplier, doc.plan.clip_norm)
    if untrainable:   # the accountants take it; float32 training cannot (dpdm.noise_scale)
        warn(f"dpdm train and dpdm baseline will refuse this plan: {untrainable}")
    if out:
        _refuse_to_replace(out, doc.digest, force=force)
        try:
            accounting.write_plan(doc, out)
        except (OSError, ValueError) as e:
            raise BadInput(f"--out={out!r}: cannot write the plan ({_reason(e)})") from e
    if curve:
        try:
            _plot_curve(doc, curve)
        except (OSError, ValueError, RuntimeError) as e:
            written = f"; the plan was written to {out}" if out else ""
            raise BadInput(f"--curve={curve!r}: cannot write the plot ({_reason(e)}){written}") from e
    if as_json:
        click.echo(doc.to_json())
    else:
        click.echo(_table(doc))
        if out:
            click.echo(f"wrote {out} ({doc.digest[:19]}...)")
        if curve:
            click.echo(f"wrote {curve}")


_PLAN_OPTIONS = {"noise_multiplier": "--noise-multiplier", "noise_multiplicity": "--multiplicity",
                 "target_epsilon": "--eps", "eps": "--eps", "clip_norm": "--clip-norm", "batch_size": "--batch-size",
                 "dataset_size": "--dataset-size", "steps": "--steps", "delta": "--delta"}


def _named_option(message: str) -> str:
    field = message.split("=", 1)[0]
    return _PLAN_OPTIONS[field] + message[len(field):] if field in _PLAN_OPTIONS else message


def _check_delta(delta: float, steps: int | None = None) -> None:
    """BadInput unless delta is at least accounting.min_delta(steps) (MIN_DELTA while the steps are not known;
    click already kept delta finite, in (0, 1))."""
    import accounting

    problem = accounting.delta_floor_problem(delta, steps, name="--delta")
    if problem:
        raise BadInput(problem.replace(f"--delta={delta!r}", f"--delta={delta:g}", 1))


def _check_steps(steps: int | None) -> None:
    import accounting

    if steps is not None and steps > accounting.MAX_STEPS:
        raise BadInput(f"--steps={_brief(steps)} must be <= {accounting.MAX_STEPS}")


def _brief(value: int) -> str:
    """An integer for an error line: a 401-digit one shortened."""
    digits = str(value)
    return digits if len(digits) <= 20 else f"{digits[:8]}...({len(digits)} digits)"


def _source(value, key: str, preset_values: dict, preset: str | None) -> str:
    """Where an option's value comes from, for an error message: the user, the preset or the default."""
    if value is not None:
        return ""
    return f" (from --preset {preset})" if key in preset_values else " (default)"


def _reason(e: Exception) -> str:
    return (e.strerror or str(e)) if isinstance(e, OSError) else str(e)


def _check_output(option: str, path: str) -> None:
    """BadInput unless `path`'s folder exists and can be written, or can be created (its nearest
    existing ancestor is a writable folder; it is created when the file is written, as `dpdm sample`
    and `dpdm export` do): checked before the (slow) calibration, so that a plan is never calibrated,
    or written, only to fail at the end. The folder is the one the OS reaches (`report_utils.output_folder`:
    `LINK/..` is the parent of LINK's target), and a ".." after a part that does not exist, or a path that ends
    in a folder's name (`x/..`, `x/`), is refused here: both failed after the calibration (r1 F4, stop 53)."""
    # `data.npz/..`: abspath removes it by spelling (h131 F2); `new/../p.json`: the OS cannot follow it
    # A name past NAME_MAX or a path past PATH_MAX was refused by the write, after the calibration, and the folders
    # made on the way were left behind (s56 outwalk N2)
    problem = file_name_problem(path) or through_a_file_problem(path) or path_length_problem(path)
    if problem:
        raise BadInput(f"{option}={path!r}: {problem}")
    folder = output_folder(path)
    existing = folder
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise BadInput(f"{option}={path!r}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"{option}={path!r}: the folder {existing} is not writable")


def _curve_path(path: str, dataset: str | None = None) -> str:
    """The file --curve writes: checked like --out, in a format that carries dpdm's mark (png, pdf, svg, jpg;
    none: .png, as matplotlib itself would add). A gif or tiff was written unmarked, then refused by the same
    command as "not a curve dpdm wrote". Not in the plan's `folder:` (`npz:`) `dataset`, as `dpdm train` and
    `dpdm sample` refuse their outputs there (`report_utils.place_in_dataset`): the plot would read as an image of
    that data, of another size, and no command could load it (h103 F1)."""
    from dpdm.report_utils import grid_identity, grid_suffix_problem, is_dpdm_grid, place_in_dataset

    problem = file_name_problem(path)   # `x/..` and `x/` became `x/.png` below
    if problem:
        raise BadInput(f"--curve={path!r} {problem}")
    if not os.path.splitext(path)[1][1:]:
        path = path.rstrip(".") + ".png"
    problem = grid_suffix_problem(path)
    if problem:
        raise BadInput(f"--curve={path!r} {problem}: the formats that carry dpdm's mark, by which a later --curve "
                       "may replace it")
    where = place_in_dataset(path, dataset)   # None for a named dataset
    if where:
        raise BadInput(f"--curve={path!r} {where} the plan's data ({dataset!r}), where the plot would read as "
                       "part of that data; write it elsewhere")
    _check_output("--curve", path)

    # Replaced only if an earlier --curve wrote it (it carries the mark save_grid's grids carry): an image, a
    # link or anything else of the user's is kept.
    if os.path.lexists(path) and (os.path.islink(path) or not is_dpdm_grid(path)):
        raise BadInput(f"--curve={path!r} already exists and is not a curve dpdm wrote; it is kept: choose "
                       "another --curve")
    # A grid of samples carries the mark too, and names its model's plan and kind, which a curve never does
    # (mut60 F1, stop 56: --curve replaced it, exit 0).
    if os.path.lexists(path) and grid_identity(path) is not None:
        raise BadInput(f"--curve={path!r} already exists and is a grid of samples that dpdm sample wrote, not a "
                       "curve; it is kept: choose another --curve")
    return path


def _refuse_to_replace(path: str, digest: str, *, force: bool = False) -> None:
    """BadInput if `path` exists and does not hold the plan `digest` names (unless it holds another plan and
    `force` is given), and always when it is a run's own plan.json (beside its checkpoint.pt, or a record of the
    steps a run stopped before its first checkpoint ran, or a train holding the folder's lock), or not a regular
    file. Where none is there, a plan is refused beside a lock a train holds, or beside a record of steps that ran
    under another plan or under a plan that cannot be told, with or without --force (`_lost_plan_problem`).

    A run is locked to its plan's digest, and `dpdm train --resume` and `dpdm audit --plan` check the
    file against it: writing a new plan over the old one would lose the record that a run in progress
    is locked to (`dpdm export` then refuses the run and `dpdm audit` says FAIL). The same plan again
    (same mechanism fields, same digest) is rewritten.
    """
    if not os.path.lexists(path):
        problem = _lost_plan_problem(path, digest)
        if problem:
            raise BadInput(f"--out {path} would be the plan.json of a run whose plan.json is gone, and {problem}")
        return
    import stat

    import accounting

    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):   # a FIFO would block the read, /dev/zero never end it
        raise BadInput(f"--out {path} exists and is not a regular file (a link, a device, a FIFO); it is kept: "
                       "choose another --out")
    old = None
    if info.st_size <= accounting.MAX_PLAN_BYTES:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            # A plan is a dpdm.plan document: any JSON with a "digest" string (an OCI descriptor) was taken for
            # "a different plan", which --force replaced (acctwalk F2, stop 56).
            if str(doc.get("format")).startswith("dpdm.plan/"):
                old = doc.get("digest")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            old = None
    if old == digest:
        return
    what = f"a different plan ({old[:19]}...)" if isinstance(old, str) else "something that is not a dpdm plan"
    run = output_folder(path)   # where the OS reaches it (`LINK/../plan.json`)
    if os.path.basename(path) == "plan.json" and os.path.exists(os.path.join(run, "checkpoint.pt")):
        raise BadInput(f"--out {path} is the locked plan of the run in {run} and holds {what}; even --force "
                       "does not replace it: write the new plan elsewhere and train a new run")
    held = _steps_held(path, " under it")
    if held:
        raise BadInput(f"--out {path} holds {what}, and {held}; even --force does not replace it: write the "
                       "new plan elsewhere and train a new run in another --out")
    if not isinstance(old, str) and info.st_size:   # a checkpoint, a config.json, data: --force replaces plans only
        raise BadInput(f"--out {path} already exists and holds {what}; it is kept, even with --force (which "
                       "replaces only another plan): choose another --out")
    if force:
        return
    raise BadInput(f"--out {path} already exists and holds {what}; it is kept (runs are locked to their plan). "
                   "Choose another --out, or pass --force to replace it")


def _steps_held(path: str, under: str = "") -> str | None:
    """Why `path`, a run's plan.json, holds the plan of steps that ran (`under` says that it does), for
    `_refuse_to_replace`: a run stopped before its first checkpoint, or training toward it. Its plan.json is the
    only record of the plan its steps ran under (a new plan there priced them at its own rate once spent, h141 F1
    and N5, stop 54; `dpdm train` also refuses a v2 record of another plan's steps). None for another name."""
    if os.path.basename(path) != "plan.json":
        return None
    from cli._common import _run_is_training
    from dpdm.steps_record import STEPS_RECORD, recorded_steps

    run = output_folder(path)   # where the OS reaches it (`LINK/../plan.json`)
    ran = recorded_steps(run)
    if not ran and not _run_is_training(run):
        return None
    if not ran:
        return f"a dpdm train is training in {run}{under}"
    return (f"the run in {run} trained {ran} step{'s' if ran != 1 else ''}{under} before its first checkpoint "
            f"({STEPS_RECORD} records {'it' if ran == 1 else 'them'}), spent against its data")


def _lost_plan_problem(path: str, digest: str) -> str | None:
    """Why the plan `digest` is not written at `path`, a run's removed plan.json, for `_refuse_to_replace` (the
    reason and the advice, with or without --force), or None where it may be: where no step is recorded there
    (`STEPS_RECORD`), or where the plan is the one the run's steps ran under, as the record's v2 line names it
    (its plan field) or the ledger of the run's checkpoint.pt does (a finished run keeps its record; `dpdm export`
    asks for that plan back, r2 F1, stop 54). Refused: a train holding the folder's lock; a record or ledger of
    another plan; a v1 record (a dpdm before stop 54) with no checkpoint naming the plan, whose steps a plan written
    there priced at its own rate once spent (r1 F3, stop 54)."""
    if os.path.basename(path) != "plan.json":
        return None
    from cli._common import _run_is_training
    from dpdm.steps_record import STEPS_RECORD, record_binding, recorded_run

    run = output_folder(path)   # where the OS reaches it (`LINK/../plan.json`)
    elsewhere = "write the new plan elsewhere and train a new run in another --out"
    if _run_is_training(run):
        return f"a dpdm train is training in {run}; even --force does not write a plan there: {elsewhere}"
    ran, named = recorded_run(run)
    if not ran:
        return None
    steps = f"{ran} step{'s' if ran != 1 else ''}"
    them = "it" if ran == 1 else "them"
    ledger = _ledger_plan(os.path.join(run, "checkpoint.pt"))   # None: no checkpoint, or none that loads
    if ledger is not None and ledger != digest:
        return (f"its checkpoint {os.path.join(run, 'checkpoint.pt')} was trained under plan {ledger[:19]}..., not "
                f"this plan ({digest[:19]}...); even --force does not write another plan there: put that plan back "
                f"(the one of that digest), or {elsewhere}")
    if named is not None and named != record_binding(digest):
        return (f"the run in {run} trained {steps} under plan sha256:{named}... ({STEPS_RECORD} records {them}), "
                f"not this plan ({digest[:19]}...), spent against its data; even --force does not write another plan "
                f"there: put that plan back (the one of that digest), or {elsewhere}")
    if named is None and ledger is None:
        return (f"the run in {run} trained {steps} ({STEPS_RECORD} records {them}, spent against its data) under a "
                "plan its record does not name (a dpdm before stop 54 wrote it) and no checkpoint.pt names; even "
                f"--force does not write a plan there: {elsewhere}, or copy the run's own plan.json back by hand")
    return None


def _ledger_plan(checkpoint: str) -> str | None:
    """The plan digest of the ledger of the checkpoint at `checkpoint` (loaded with weights_only=True), or None
    where there is none or it does not load."""
    if not os.path.exists(checkpoint):
        return None
    from dpdm.checkpoint import CheckpointError, load_checkpoint

    try:
        digest = load_checkpoint(checkpoint)["ledger"]["plan_digest"]
    except (CheckpointError, MemoryError):
        return None
    return digest if isinstance(digest, str) else None


def _resolve_dataset(name: str | None, size: int | None) -> tuple[str | None, int]:
    if name is None:
        return None, size
    if name in DATASET_SIZES:
        if size is not None and size != DATASET_SIZES[name]:
            raise BadInput(f"--dataset-size={size} disagrees with --dataset={name!r} ({DATASET_SIZES[name]} examples)")
        return name, DATASET_SIZES[name]
    if name.startswith(("folder:", "npz:")) and not name.split(":", 1)[1].strip():   # no later command takes it
        raise BadInput(f"--dataset={name!r} names no path (an unset variable?): give {name.split(':')[0]}:PATH")
    if name.startswith(("folder:", "npz:")):
        if size is None:
            raise BadInput(f"--dataset={name!r} needs --dataset-size N (its size is not known in advance)")
        return name, size
    raise BadInput(f"--dataset={name!r} must be one of {', '.join(DATASET_SIZES)} "
                   "(or folder:PATH / npz:PATH with --dataset-size)")


def _fmt(x, bound: str | None = None) -> str:
    """A cell of the accountant table, 6 significant digits: an upper bound rounded up and a lower bound down
    (`epsilon_text`, as the certified line is; to nearest, PLD's upper bound showed below itself), an estimate
    to nearest."""
    if x is None:
        return "-"
    return f"{x:.6g}" if bound is None else epsilon_text(x, 6, bound=bound)


def _bounds_row(label: str, r) -> str:
    return _row(label, _fmt(r.lower, "lower"), _fmt(r.estimate), _fmt(r.upper, "upper"))


def _row(label: str, *cells: str) -> str:
    """A row of the accountant table: a space before every cell, so that a 12-character number
    (-1.00001e-05) no longer runs into the one before it."""
    return f"{label:<12}" + "".join(f" {cell:>12}" for cell in cells)


def _table(doc) -> str:
    p = doc.plan
    epochs = p.steps * p.batch_size / p.dataset_size
    target = "none (computed from the noise multiplier)" if p.target_epsilon is None else f"{p.target_epsilon:g}"
    lines = [
        f"dataset           {p.dataset_name or '-'} (N={p.dataset_size})",
        f"sampling          {p.sampling}, sample_rate={p.sample_rate:.6g} (expected batch {p.batch_size})",
        f"steps             {p.steps} ({epochs:.4g} epochs)",
        f"noise_multiplier  {p.noise_multiplier:.6g}  (noise std {p.noise_std:.6g} on the clipped-gradient sum)",
        f"clip_norm         {p.clip_norm:g}    noise_multiplicity {p.noise_multiplicity}",
        f"delta             {p.delta:g}",
        f"target epsilon    {target}",
        "",
        _row("accountant", "lower", "estimate", "upper"),
    ]
    reports = [("RDP", doc.rdp), ("PLD", doc.pld), ("PRV*" if doc.prv_unreliable else "PRV", doc.prv)]
    if doc.independent is not None:
        reports.append(("dpdm PLD", doc.independent))
    for label, r in reports:
        lines.append(_bounds_row(label, r))
    lines += ["", f"certified epsilon {epsilon_text(doc.epsilon, 6)} (by {doc.certified_by}, the smaller of PLD's "
                  f"and RDP's bounds; PLD pessimistic at interval {doc.pld_discretization:.2g}, PRV error "
                  f"{doc.prv_eps_error:.2g})"]
    if doc.prv_unreliable:
        lines.append(_PRV_UNRELIABLE_NOTE)
    if doc.prv_overruled:
        lines.append("PRV overruled (see the warning; recorded in the plan)")
    if doc.prv_failed:
        lines.append("PRV failed; " + ("dpdm's own PLD cross-checked instead" if _bracketed(doc) else
                                       "nothing cross-checked") + " (see the warning; recorded in the plan)")
    return "\n".join(lines)


# Under the table, where PRV's upper bound lies below the certificate beyond its error (accounting.plan.prv_unreliable).
_PRV_UNRELIABLE_NOTE = ("* PRV unreliable here: its upper bound is below the certified epsilon, so it is no bound "
                        "(see the warning)")


def _bracketed(doc) -> bool:
    """Whether dpdm's own PLD gave the plan a bracket (its upper bound is infinite, or null in a file, where its
    grid is too coarse for the steps)."""
    return doc.independent is not None and doc.independent.upper is not None and math.isfinite(doc.independent.upper)


def _plot_curve(doc, path: str, points: int = 24, prv_points: int = 6) -> None:
    """Epsilon against steps for RDP and PLD (the certificate is the smaller) and PRV (band between its bounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import accounting

    p = doc.plan
    steps = sorted({int(round(s)) for s in np.geomspace(1, p.steps, points)} | {p.steps})
    rdp = [accounting.RdpAccountant().epsilon(p.to_event(s), p.delta).upper for s in steps]
    pld = [accounting.epsilon_spent(p, s) for s in steps]
    prv_steps = sorted({int(round(s)) for s in np.linspace(p.steps / prv_points, p.steps, prv_points)})
    prv = None
    if not doc.prv_failed:
        try:
            prv = accounting.PrvAccountant(eps_error=doc.prv_eps_error if math.isfinite(doc.prv_eps_error)
                                           else 0.05).curve(p.to_event(), p.delta, prv_steps)
        except accounting.PRV_ERRORS:
            prv = None  # prv-accountant's discretisation failed (see make_plan_document): no PRV band
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, rdp, label="RDP (upper" + (", certified)" if doc.certified_by == "rdp" else ")"))
    ax.plot(steps, pld, label="PLD pessimistic" + (" (certified)" if doc.certified_by == "pld" else ""))
    if prv is not None:
        ax.fill_between(prv_steps, [r.lower for r in prv], [r.upper for r in prv], alpha=0.3, color="C2",
                        label="PRV bounds")
        ax.plot(prv_steps, [r.estimate for r in prv], "o", color="C2", label="PRV estimate")
    if p.target_epsilon is not None:
        ax.axhline(p.target_epsilon, color="k", lw=0.8, ls="--", label="target")
    ax.set_xlabel("steps")
    ax.set_ylabel(f"epsilon at delta={p.delta:g}")
    ax.set_title(f"noise_multiplier={p.noise_multiplier:.4g}, sample_rate={p.sample_rate:.4g}")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    import re

    from dpdm.report_utils import TEMP_PATH_REST, remove_temp_leftovers, save_marked_figure

    # `save_marked_figure`'s temporary files (`temp_path`) of an earlier --curve of this path killed before its
    # rename, as `dpdm sample` and `dpdm export` remove theirs (fixsample's note on h111 N1)
    remove_temp_leftovers(path, TEMP_PATH_REST + re.escape(".tmp"))
    try:   # other formats than png, pdf, svg and jpg hold no mark: such a curve is not replaced later
        save_marked_figure(fig, path, dpi=100)
    finally:
        plt.close(fig)


# dpdm account --eps-error: its default, and the least dpdm plan asks PRV for (accounting.plan.PRV_MIN_EPS_ERROR,
# not imported here: the CLI loads the accountants only when a command needs them).
_MIN_EPS_ERROR = 0.01


@click.command("account")
@click.option("-s", "--noise-multiplier", type=_POSITIVE, required=True, help="Noise multiplier.")
@click.option("-p", "--sample-rate", type=FiniteFloatRange(min=_SMALLEST_NORMAL, max=1), required=True,
              help="Poisson sample rate.")
@click.option("-i", "--steps", type=click.IntRange(min=1), required=True, help="Number of steps (at most 10**7).")
@click.option("--delta", type=_UNIT_OPEN, required=True, help=f"Target delta {_DELTA_HELP}.")
@click.option("--eps-error", type=_POSITIVE, default=None,
              help="PRV error in epsilon: from 0.01 to the PLD epsilon.  [default: what dpdm plan asks for, "
                   "0.01 or 2% of the PLD epsilon if more]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
@_memory_capped
def account(noise_multiplier, sample_rate, steps, delta, eps_error, as_json):
    """Epsilon of DP-SGD from RDP, PLD and PRV, side by side."""
    import accounting

    _check_steps(steps)
    _check_delta(delta, steps)
    if noise_multiplier > accounting.MAX_ACCOUNTED_NOISE_MULTIPLIER:
        raise BadInput(f"--noise-multiplier={noise_multiplier:g} must be at most "
                       f"{accounting.MAX_ACCOUNTED_NOISE_MULTIPLIER:g}: epsilon is 0 to double precision long before")
    if noise_multiplier < accounting.MIN_ACCOUNTED_NOISE_MULTIPLIER:
        raise BadInput(f"--noise-multiplier={noise_multiplier:g} is too small to account for: it must be >= "
                       f"{accounting.MIN_ACCOUNTED_NOISE_MULTIPLIER:g} (below it the accountants' grids grow beyond "
                       "memory, and epsilon is in the thousands)")
    try:
        event = accounting.dpsgd_event(sample_rate, noise_multiplier, steps)
        disc = accounting.pld_discretization(accounting.RdpAccountant().epsilon(event, delta).upper)
        reports = [accounting.RdpAccountant().epsilon(event, delta),
                   accounting.PldAccountant(disc).epsilon(event, delta)]
    except (RuntimeError, OverflowError) as e:
        raise runtime_failure(f"accounting failed: {e}") from e
    except ValueError as e:
        raise BadInput(str(e)) from e
    # PRV's grid grows as its error shrinks (1e-9 asked for 1.28 TiB); an error beyond epsilon says nothing.
    lo, hi = accounting.prv_eps_error_range(reports[1].upper)
    if eps_error is None:   # 0.01 at an epsilon of 1,000 asked for 18 GB
        eps_error = lo
    if not _MIN_EPS_ERROR <= eps_error <= hi * (1 + 1e-9):
        raise BadInput(f"--eps-error={eps_error:g} must be in [{_MIN_EPS_ERROR:g}, {hi:.3g}] here (at most the PLD "
                       f"epsilon {reports[1].upper:.4g}): smaller asks PRV for more memory and time than its answer "
                       "is worth, larger makes its estimate meaningless")
    prv_failed = None
    try:
        reports.append(accounting.PrvAccountant(eps_error=eps_error).epsilon(event, delta))
    except accounting.PRV_ERRORS as e:  # say so, and show the other two
        prv_failed = f"{type(e).__name__}: {e}"
        warn(f"prv-accountant gave no epsilon ({prv_failed})")
    unreliable = None
    if prv_failed is None:   # from the figures at hand: no accounting of its own
        unreliable = accounting.prv_unreliable(certified=min(reports[0].upper, reports[1].upper),
                                               prv_upper=reports[2].upper, prv_eps_error=eps_error, steps=steps,
                                               pld_discretization=disc)
        if unreliable:
            warn(unreliable)
    if as_json:
        doc = {r.method: r.to_dict() for r in reports}
        if prv_failed is not None:
            doc["prv_failed"] = prv_failed
        if unreliable:
            doc["prv_unreliable"] = unreliable
        emit_json(doc)   # strict JSON: an infinite bound as null
        return
    click.echo(_row("accountant", "lower", "estimate", "upper"))
    for r in reports:
        click.echo(_bounds_row(r.method.upper() + ("*" if unreliable and r.method == "prv" else ""), r))
    if unreliable:
        click.echo(_PRV_UNRELIABLE_NOTE)
