"""`dpdm train`: DP-SGD training that cannot leave its plan."""
from __future__ import annotations

import os

import click

from cli._common import (DatasetName, FiniteFloatRange, PathOption, emit_json, info, load_locked_plan, load_public_data,
                         load_training_data, plan_dataset_name, recorded_plan_steps, recorded_steps, resolve_device,
                         warn, warn_binary_pixels, warn_dataset_not_plans, warn_empty_classes, warn_exif_orientation,
                         warn_if_slow_bf16, warn_inferred, warn_known_seed, warn_unlabelled_npz)
from cli.errors import BadInput, runtime_failure
from dpdm.report_utils import epsilon_text


@click.command()
# The contract.
@click.option("--plan", "plan_path", required=True, type=PathOption(dir_okay=False), help="A locked plan from `dpdm plan --out`.")
@click.option("--out", "out_dir", required=True, type=PathOption(file_okay=False), help="Run folder (checkpoint, ledger, metrics).")
# Data.
@click.option("--dataset", type=DatasetName(), default=None,
              help="Dataset name (default: the plan's). mnist5k, digits, digits28, digits28-aug, fonts28, fonts28-aug, digits-fonts28-aug, mnist, fashion-mnist, cifar10, celeba, folder:PATH, npz:PATH.")
@click.option("--data-root", default=None, type=PathOption(file_okay=False),
              help="Where torchvision datasets live (default $DPDM_DATA, else ~/.cache/dpdm/data; README: Your own data).")
@click.option("--download", is_flag=True, help="Allow downloading a torchvision dataset (needs a network).")
# Model and performance (privacy-neutral).
@click.option("--model", type=click.Choice(["small", "mnist"]), default="small", show_default=True, help="Network preset.")
@click.option("--precond", type=click.Choice(["edm", "v"]), default="edm", show_default=True, help="EDM or v-prediction (the paper's choice at eps 0.2).")
@click.option("--train-sigma", type=(FiniteFloatRange(min=0, min_open=True), FiniteFloatRange(min=0, min_open=True)),
              default=None, metavar="MIN MAX",
              help="v only: the noise levels trained on [default: sigma 0.0015 to 90, log-SNR 13 to -9]. "
                   "dpdm sample then keeps to them.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--physical-batch", type=click.IntRange(min=1), default=None, help="Examples per chunk (memory knob; noise is still added once per step).")
@click.option("--grad-engine", type=click.Choice(["auto", "rules", "vmap"]), default="auto", show_default=True,
              help="Per-example gradients: 'rules' runs conv2d, group_norm and silu through dpdm's own vmap rules "
                   "(faster and leaner on a CPU), 'vmap' runs plain torch.func vmap(grad), which costs less Python "
                   "per chunk and more memory (faster on an H200). 'auto': the rules on a CPU; on a GPU, the faster "
                   "on one chunk of random inputs, vmap only if its memory fits. A speed knob: the same steps and "
                   "noise either way, the weights equal up to float rounding (about 1e-10), as with "
                   "--physical-batch.")
@click.option("--lr", type=FiniteFloatRange(min=0, min_open=True), default=3e-4, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True,
              help="cosine: lr decays to 0 at the plan's last step.")
@click.option("--ema-decay", type=FiniteFloatRange(min=0, max=1, max_open=True), default=0.999, show_default=True,
              help="EMA of the weights (what `dpdm sample` draws from), with DPDM's warmup "
                   "min(decay, (1+n)/(10+n)), which decides for the first 9/(1-decay) steps (9,000 at 0.999).")
@click.option("--ema-power", "ema_powers", type=FiniteFloatRange(min=0, min_open=True), multiple=True,
              help="Also keep a power-function EMA with exponent GAMMA (EDM2; repeatable; privacy-free). "
                   "Smaller GAMMA averages more of the run. `dpdm sample --weights power:GAMMA` draws from it.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=None,
              help="Fix the batches and noise (tests, reproduction). Default: a secret random seed, kept in the checkpoint.")
@click.option("--init-from", "init_from", type=PathOption(dir_okay=False), default=None,
              help="Start from the EMA weights of a checkpoint trained on PUBLIC data (e.g. a --no-dp run on "
                   "digits28-aug for MNIST-like data). Privacy-free only if that data holds none of the private "
                   "examples; a checkpoint trained on the same data is refused.")
@click.option("--trainable", default=None, metavar="PATTERNS",
              help="Train only the parameters whose names match these comma-separated fnmatch patterns "
                   "(e.g. 'net.enc.5.*,net.mid.*,net.label_embed.*'); the rest keep their starting (public) "
                   "values and get no noise. Meant for warm starts (--init-from). Default: all.")
@click.option("--public-subspace", "subspace_dim", type=click.IntRange(min=1), default=None, metavar="K",
              help="Private runs: add the DP noise in the top-K subspace of the clipped gradients of PUBLIC "
                   "examples (--subspace-data) instead of in all d parameters, so its norm scales with sqrt(K), "
                   "not sqrt(d). Same plan and epsilon: one example still moves the projected sum by at most "
                   "the clip norm. The update then lies in that subspace, recomputed every --subspace-every steps.")
@click.option("--subspace-data", type=DatasetName(), default=None, metavar="NAME",
              help="The public dataset of --public-subspace (e.g. digits28-aug for mnist5k); never the private data.")
@click.option("--subspace-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Steps between recomputations of the public subspace (at the current weights); must divide "
                   "--checkpoint-every, so that a resume recomputes it where the run left off.")
@click.option("--subspace-examples", type=click.IntRange(min=1), default=512, show_default=True,
              help="Public examples per recomputation (at least K).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="--no-dp runs only (public pretraining): bf16 runs the forward and backward under bfloat16 "
                   "autocast, 1.4-1.8x faster on a CPU with AMX (small to mnist U-Net). Private runs train in fp32.")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option("--spend-unsaved-steps", "spend_unsaved_steps", is_flag=True,
              help="With --resume, where the run stopped after training steps past its last checkpoint and this "
                   "resume changes the lr: count those steps as spent and go on after them from the checkpoint's "
                   "weights (the model loses them, the budget does not get them back). Without it such a resume is "
                   "refused; with the run's own lr it replays them exactly, at no cost. Without --resume, where a "
                   "run in --out was stopped before its first checkpoint: count its steps as spent and go on after "
                   "them with new weights (without it the new run is refused). Refused either way where the steps "
                   "ran under another plan or on other data (the record names both).")
@click.option("--no-dp", "no_dp", is_flag=True, help="Train WITHOUT privacy (a baseline; marked non-private everywhere).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout at the end.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def train(ctx, plan_path, out_dir, dataset, data_root, download, model, precond, train_sigma, device, physical_batch,
          grad_engine, lr,
          lr_schedule, ema_decay, ema_powers, checkpoint_every, log_every, seed, init_from, trainable, subspace_dim,
          subspace_data, subspace_every, subspace_examples, precision, resume, spend_unsaved_steps, no_dp, as_json,
          quiet):
    """Train a diffusion model with DP-SGD under a locked plan.

    With --resume, an option not given takes the run's own value (its checkpoint's); --lr and --lr-schedule may
    change (privacy-neutral for the run; a copy of a run folder is the same run: from an lr change on, its
    batches and noise follow the lr segments, so copies resumed with different lrs compose), other knobs that
    differ are refused."""
    from dpdm import checkpoint as ckpt
    from dpdm.train import RankLost, RunStorageError, TrainConfig, TrainDiverged, TrainError
    from dpdm.train import train as run_training

    # A quoted '~/runs/x' reaches us literally: the checks expand it, so the run is written there too, not in ./~/.
    out_dir = os.path.expanduser(out_dir)
    if os.pardir in out_dir.split(os.sep):
        # `LINK/../run`: the OS reaches the parent of LINK's target, where os.path.abspath removes `LINK/..` by
        # spelling (r2 F1, stop 53). Checked as the OS reads it, then named as it resolves, so that every check and
        # line of the run names the folder its files are in.
        from dpdm.report_utils import output_parent_problem

        problem = output_parent_problem(os.path.join(out_dir, "checkpoint.pt"))
        if problem:
            raise BadInput(f"--out {out_dir!r}: {problem}")
        out_dir = os.path.realpath(out_dir)
    given = {name for name in ctx.params
             if ctx.get_parameter_source(name) in (click.core.ParameterSource.COMMANDLINE,
                                                   click.core.ParameterSource.ENVIRONMENT)}
    dataset_given = dataset
    resume_notes = []   # said once every check has passed (`_warn_before_training`): a refusal stays one line
    if spend_unsaved_steps and no_dp:
        raise BadInput("--spend-unsaved-steps applies to a private run only (the steps a stopped run trained past its "
                       "last checkpoint, or before its first)")
    if resume:
        _check_something_to_resume(out_dir)
        opts = _resumed_options(out_dir, given, no_dp, dict(
            dataset=dataset, model=model, precond=precond, train_sigma=train_sigma, physical_batch=physical_batch,
            grad_engine=grad_engine, lr=lr, lr_schedule=lr_schedule, ema_decay=ema_decay, ema_powers=ema_powers,
            checkpoint_every=checkpoint_every, log_every=log_every, trainable=trainable, subspace_dim=subspace_dim,
            subspace_data=subspace_data, subspace_every=subspace_every, subspace_examples=subspace_examples,
            precision=precision), resume_notes)
        (dataset, model, precond, train_sigma, physical_batch, grad_engine, lr, lr_schedule, ema_decay, ema_powers,
         checkpoint_every, log_every, trainable, subspace_dim, subspace_data, subspace_every, subspace_examples,
         precision) = opts.values()
        if isinstance(trainable, tuple):
            trainable = ",".join(trainable)
    if train_sigma is not None:
        if precond != "v":
            raise BadInput("--train-sigma applies to --precond v only")
        if not train_sigma[0] < train_sigma[1]:
            raise BadInput(f"--train-sigma {train_sigma[0]:g} {train_sigma[1]:g}: MIN must be below MAX")
        if not (1e-10 <= train_sigma[0] and train_sigma[1] <= 1e10):   # dpdm.sampling.SIGMA_LIMITS
            raise BadInput(f"--train-sigma {train_sigma[0]:g} {train_sigma[1]:g}: must lie in [1e-10, 1e+10], the "
                           "noise levels dpdm sample can draw at (1e155 overflowed the v-loss)")
    if precision != "fp32" and not no_dp:
        raise BadInput(f"--precision {precision} is for --no-dp runs only; private runs train in fp32")
    if len({f"{float(g):g}" for g in ema_powers}) != len(ema_powers):   # the checkpoint's keys (ema_power_key)
        raise BadInput(f"--ema-power {' '.join(f'{g:g}' for g in ema_powers)}: give each exponent once")
    if trainable is not None:
        trainable = tuple(p.strip() for p in trainable.split(",") if p.strip())
        if not trainable:
            raise BadInput("--trainable '': give at least one parameter-name pattern")
    if subspace_dim is not None:
        if no_dp:
            raise BadInput("--public-subspace is for private runs; a --no-dp run adds no noise")
        if not subspace_data:
            raise BadInput("--public-subspace needs --subspace-data, the public dataset to estimate it from")
        if subspace_examples < subspace_dim:
            raise BadInput(f"--subspace-examples {subspace_examples} must be at least --public-subspace {subspace_dim}")
        if checkpoint_every % subspace_every:
            raise BadInput(f"--subspace-every {subspace_every} must divide --checkpoint-every {checkpoint_every} "
                           "(a resume recomputes the subspace at the checkpoint)")
    elif subspace_data is not None:
        raise BadInput("--subspace-data is used only with --public-subspace K")
    from dpdm.report_utils import output_parent_problem

    problem = output_parent_problem(os.path.join(out_dir, "checkpoint.pt"))   # before any work, on every rank
    if problem:
        raise BadInput(f"--out {out_dir!r}: {problem}")
    doc = load_locked_plan(plan_path)
    if not dataset:
        _check_plans_dataset(doc, out_dir, resume)
    name = plan_dataset_name(doc, dataset)
    if not resume:
        _check_out_outside_data(out_dir, name, subspace_data)
    data = load_training_data(name, data_root=data_root, download=download)
    public_data = None
    if subspace_dim is not None:
        pub = load_public_data("--subspace-data", subspace_data, name, data_root=data_root, download=download,
                               use="the subspace")
        from dpdm.datasets import class_names_problem

        problem = class_names_problem(pub, data)   # the public labels shape the subspace's per-example gradients
        if problem:
            raise BadInput(f"--subspace-data={subspace_data!r}: {problem}")
        public_data = (pub.x, pub.y)
    if init_from is not None and not resume and not os.path.isfile(init_from):
        raise BadInput(f"--init-from {init_from!r}: no such file")
    from dpdm import distributed

    device = resolve_device(device)
    problem = distributed.launch_problem(device)   # a stray WORLD_SIZE or RANK, a bad DPDM_DIST_TIMEOUT, a rank
    # without a GPU of its own: before any work
    if problem:
        raise BadInput(problem)
    if distributed.launched_by_torchrun():
        try:
            device = distributed.init_from_env(device)
        except distributed.RendezvousError as e:   # a peer that never joined (it refused its own input first), a
            # port taken: one line, exit 4, as a peer lost later (torch's traceback: h114 F2, stop 51)
            raise runtime_failure(str(e)) from None
    rank = distributed.rank()   # the process group's (read before shutdown destroys it), not a RANK left in the shell
    warn_if_slow_bf16(precision, device)
    ok = False
    lost = None   # a peer gone when the ranks met to finish, after the run's last collective
    try:
        config = TrainConfig(model=model, precond=precond, lr=lr, lr_schedule=lr_schedule, ema_decay=ema_decay,
                             ema_powers=tuple(ema_powers),
                             train_sigma=None if train_sigma is None else tuple(train_sigma),
                             physical_batch=physical_batch, per_layer_rules=_PER_LAYER_RULES[grad_engine],
                             checkpoint_every=checkpoint_every, log_every=log_every, seed=seed,
                             device=device, private=not no_dp, init_from=init_from, trainable=trainable,
                             precision=precision, subspace_dim=subspace_dim, subspace_data=subspace_data,
                             subspace_every=subspace_every, subspace_examples=subspace_examples)
        summary = run_training(doc, data.x, data.y, data.num_classes, out_dir, config,
                               dataset_name=name, resume=resume, progress=not quiet, public_data=public_data,
                               class_names=data.class_names, spend_unsaved_steps=spend_unsaved_steps,
                               image_names=data.files,
                               on_start=lambda notes: _warn_before_training(data, name, dataset_given, doc, no_dp,
                                                                            (*resume_notes, *notes),
                                                                            None if resume else seed))
        ok = True
    except (TrainError, ckpt.CheckpointError) as e:
        raise BadInput(str(e)) from None
    except (TrainDiverged, RankLost, RunStorageError) as e:   # the weights went NaN, a peer died, the run folder
        # could not be written: not an input mistake (exit 4, one line naming the checkpoint --resume continues from)
        raise runtime_failure(str(e)) from None
    finally:
        try:
            distributed.shutdown(ok=ok)
        except distributed.PeerLost as e:   # raised only after a run that ended well (ok): no error is in flight
            lost = e
    if lost is not None and rank != 0:   # rank 0 writes the checkpoints: its own output says whether it did
        raise runtime_failure(f"{lost}; this rank's part of the run is done, and rank 0's output says whether the "
                              "run's last checkpoint was written")
    if rank != 0:
        return  # rank 0 alone reports
    if lost is not None:   # the run is complete: its last checkpoint is written whole, and the summary still stands
        warn(f"{lost}; this run is complete all the same: the checkpoint of its last step "
             f"({summary['steps_done']}) is written whole")
    if as_json:
        emit_json(summary)
    else:
        eps = summary["epsilon_spent"]
        privacy = (f"epsilon spent {epsilon_text(eps)} at delta {summary['delta']:g}" if summary["private"] else
                   "NON-PRIVATE (--no-dp)")
        if summary["private"] and summary["seed_given"]:
            privacy += " (given --seed: no guarantee against whoever knows it)"
        held = ""
        if summary.get(ckpt.DISCARDED_STEPS_KEY):   # a divergence's rollback, --spend-unsaved-steps
            discarded = summary[ckpt.DISCARDED_STEPS_KEY]
            held = (f" ({discarded} of them discarded: the weights hold the updates of "
                    f"{summary['steps_done'] - discarded})")
        info(f"run {summary['run']}: {summary['steps_done']}/{summary['plan_steps']} steps{held}, {privacy}")
    if summary.get("init"):
        init = summary["init"]
        info(f"warm start: {init['checkpoint']} (trained on {init['dataset']!r}); the guarantee holds only "
             "if that data is public and holds none of the private examples")


def _check_something_to_resume(out_dir: str) -> None:
    """BadInput where --resume finds no checkpoint in --out: before the dataset is looked for, whose line ("--dataset
    is required", for the size-only plan the README advises for private data) blamed an option the resumed run
    does not need; and saying what to do. A run stopped before its first checkpoint (Ctrl-C, SIGTERM) left nothing
    to resume: the same command without --resume starts it again (its folder is taken as new) (h103 F3)."""
    path = os.path.join(os.path.expanduser(out_dir), "checkpoint.pt")
    if not os.path.lexists(path):
        ran = recorded_steps(out_dir)   # spent: a new run there needs --spend-unsaved-steps (`dpdm.train.STEPS_RECORD`)
        plan_steps = recorded_plan_steps(out_dir)
        if ran and plan_steps is not None and ran >= plan_steps:
            raise BadInput(f"nothing to resume: {path!r} does not exist; the run stopped before its first checkpoint "
                           f"after all {plan_steps} steps of its plan, which are spent: a new run needs a new plan "
                           "and another --out")
        raise BadInput(f"nothing to resume: {path!r} does not exist; a run stopped before its first checkpoint "
                       "starts again with the same command without --resume" + (
                           "" if not ran else f" and with --spend-unsaved-steps, which counts the {ran} step"
                           f"{'s' if ran != 1 else ''} it ran"))


def _check_plans_dataset(doc, out_dir: str, resume: bool) -> None:
    """BadInput where a resumed run with no --dataset finds neither a plan's dataset nor one the run recorded
    (`plan_dataset_name` says where the plan's own path is not found)."""
    if not doc.plan.dataset_name and resume:
        raise BadInput(f"--dataset is required: the plan names no dataset, and the run in {out_dir!r} names none that "
                       "is found here; pass --dataset naming the run's data")


def _check_out_outside_data(out_dir: str, name: str, subspace_data: str | None) -> None:
    """BadInput where a new run's folder is, or lies in, the folder (or file) of its `folder:` (`npz:`) data or
    public --subspace-data, as `dpdm sample` refuses its outputs there (one test: `report_utils.place_in_dataset`): the
    run folder would read as an image-less class folder of that data, so the run could not be resumed, audited or
    evaluated on it once it had spent budget (h94 F1). A run already there resumes as before."""
    from dpdm.report_utils import place_in_dataset

    for dataset, what in ((name, "the run's training data"), (subspace_data, "the run's --subspace-data")):
        where = place_in_dataset(os.path.expanduser(out_dir), dataset)
        if where:
            raise BadInput(f"--out {out_dir!r} {where} {what} ({dataset!r}), where "
                           "the run folder would read as part of that data; choose a run folder outside it")


# --resume: the options that default to the run's own values, as (the checkpoint's config key, its place):
# "run" for the config itself, "train" for its train knobs. Those in _RESUME_KEPT must not differ when given.
_RESUME_DEFAULTS = {"dataset": "run", "model": "run", "precond": "run", "train_sigma": "train",
                    "physical_batch": "train", "grad_engine": "train", "lr": "train", "lr_schedule": "train",
                    "ema_decay": "train", "ema_powers": "train", "checkpoint_every": "train", "log_every": "train",
                    "trainable": "train", "subspace_dim": "train", "subspace_data": "train", "subspace_every": "train",
                    "subspace_examples": "train", "precision": "train"}
_RESUME_KEPT = {"model": "--model", "precond": "--precond", "train_sigma": "--train-sigma", "ema_decay": "--ema-decay",
                "ema_powers": "--ema-power", "trainable": "--trainable", "subspace_dim": "--public-subspace",
                "subspace_data": "--subspace-data", "subspace_every": "--subspace-every",
                "subspace_examples": "--subspace-examples", "precision": "--precision"}
_PER_LAYER_RULES = {"auto": None, "rules": True, "vmap": False}   # --grad-engine -> TrainConfig.per_layer_rules
_GRAD_ENGINES = {rules: engine for engine, rules in _PER_LAYER_RULES.items()}


def _resumed_options(out_dir: str, given: set[str], no_dp: bool, opts: dict, notes: list[str]) -> dict:
    """`opts` (the command's values, in order) with each one the user did not give replaced by the run's
    recorded value, read from its checkpoint (a missing or unreadable one, or a --no-dp run resumed without
    --no-dp, changes nothing: `dpdm.train.train` says why it cannot resume). A kept knob the user gave with
    another value than the run's is refused here, naming the run's value. The run's data path is taken only
    where it still exists (a run folder moved with its data resumes on the plan's name; the data digest decides
    that it is the run's data). --subspace-data is compared as an absolute path, as the run records it; a relative
    one recorded by an older dpdm means the file from the folder the run was started in, and is refused where
    that file is not found (h83 F3). A run that recorded its public data's fingerprint takes --subspace-data at
    another path too (the file moved): `dpdm.train.train` compares the images (h94 F3). A warning for the run is
    added to `notes`, said once every check has passed (h141 F3, stop 54)."""
    from dpdm import checkpoint as ckpt
    from dpdm.datasets import dataset_path, is_path_dataset, same_dataset
    from dpdm.train import SUBSPACE_DIGEST_KEY

    path = os.path.join(out_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        return opts
    try:
        state = ckpt.load_checkpoint(path)
    except (ckpt.CheckpointError, OSError, ValueError):
        return opts
    saved = state["config"]
    if not state["ledger"].get("private", True) and not no_dp:
        return opts   # the library refuses to resume a --no-dp run as private, with its own line
    train_cfg = saved.get("train") if isinstance(saved.get("train"), dict) else {}
    run = {}
    for key, where in _RESUME_DEFAULTS.items():
        source = saved if where == "run" else train_cfg
        if key == "grad_engine":
            if "per_layer_rules" in source and source["per_layer_rules"] in _GRAD_ENGINES:
                run[key] = _GRAD_ENGINES[source["per_layer_rules"]]
        elif key in source:
            run[key] = source[key]
    if isinstance(run.get("train_sigma"), list):
        run["train_sigma"] = tuple(run["train_sigma"])
    if "ema_powers" in run:
        run["ema_powers"] = tuple(run["ema_powers"] or ())
    if isinstance(run.get("trainable"), list):
        run["trainable"] = tuple(run["trainable"])
    recorded = run.get("dataset")
    if recorded is None or (isinstance(recorded, str) and is_path_dataset(recorded)
                            and not os.path.exists(dataset_path(recorded))):
        run.pop("dataset", None)   # no name (a library run), or moved away: the plan's, as before
    recorded = run.get("subspace_data")
    fingerprinted = isinstance(saved.get(SUBSPACE_DIGEST_KEY), str)   # the library compares the images (h94 F3)
    if isinstance(recorded, str) and is_path_dataset(recorded):
        typed = dataset_path(recorded)
        if not os.path.isabs(typed) and not os.path.exists(typed):
            # Recorded as typed by a dpdm before stop 46 (it records the absolute path now): relative to the
            # folder the run was started in. Resumed there, the run records the absolute path.
            raise BadInput(f"the run in {out_dir!r} recorded --subspace-data {recorded!r} as typed, relative to the "
                           f"folder it was started in (an older dpdm), and there is no {typed!r} here; resume from "
                           "that folder")
        if os.path.isabs(typed) and not os.path.exists(typed) and not fingerprinted:
            # One line for both ways of resuming: without the option the file was missing, and with its new path
            # the resume was told to leave the option out (stop 46, h87 F2). Such a run (made before its public
            # data's fingerprint was recorded) names its public data by its path alone.
            raise BadInput(f"the run in {out_dir!r} was trained with --subspace-data {recorded!r}, which no longer "
                           "exists; put that file back there to resume (a run's public data is named by its path)")
        if os.path.isabs(typed) and not os.path.exists(typed) and "subspace_data" not in given:
            raise BadInput(f"the run in {out_dir!r} was trained with --subspace-data {recorded!r}, which no longer "
                           "exists; put that file back there, or resume with --subspace-data naming it where it now "
                           "lies (the run checks its images by their fingerprint)")
    if "lr" not in given and "lr_schedule" not in given:
        notes.extend(_unsaved_lr_change(out_dir, train_cfg))
    out = dict(opts)
    for key, value in opts.items():
        if key not in run:
            continue
        if key not in given or key == "subspace_data" and same_dataset(value, run[key]):
            out[key] = run[key]   # the run's own name for its public file, where the one given is a link to it
            continue
        if key == "subspace_data" and fingerprinted:
            continue   # the same images elsewhere (the file moved) resume: `dpdm.train.train` checks their fingerprint
        if key in _RESUME_KEPT and _kept_value(key, value) != _kept_value(key, run[key]):
            raise BadInput(f"cannot resume with {_RESUME_KEPT[key]} {_shown(key, value)}: the run in {out_dir!r} was "
                           f"trained with {_shown(key, run[key])}; resume without {_RESUME_KEPT[key]} (it takes the "
                           "run's value)")
    return out


def _unsaved_lr_change(out_dir: str, train_cfg: dict) -> list[str]:
    """config.json is written when a run starts; a resume that changed --lr and stopped before its next
    checkpoint left it showing an lr that the checkpoint (the run's record, which this resume follows) does not
    hold. Said (the warning, in a list; none: []), so that the lr that diverged is not taken back without a word;
    only once the resume starts: a refused one (the steps record names the lr to resume with) says its error
    alone (h141 F3, stop 54)."""
    import json

    from dpdm.steps_record import read_regular

    raw = read_regular(os.path.join(out_dir, "config.json"), 1 << 20)   # as `is_run_config`; a FIFO hung here
    try:
        shown = json.loads((raw or b"").decode("utf-8")).get("train") or {}
        if not isinstance(shown, dict):
            return []
    except (ValueError, AttributeError, RecursionError):   # none, a FIFO, a device, over 1 MiB: nothing to say
        return []
    def plain(cfg):   # the checkpoint holds tuples where config.json holds lists
        return json.dumps([cfg.get(k) for k in ("lr", "lr_schedule", "lr_segments")])

    if plain(shown) == plain(train_cfg):
        return []
    return [f"config.json shows lr {shown.get('lr')!r} ({shown.get('lr_schedule')}), given at a resume that "
            f"stopped before its next checkpoint; this resume follows the checkpoint's lr {train_cfg.get('lr')!r} "
            f"({train_cfg.get('lr_schedule')}): give --lr to change it"]


def _kept_value(key: str, value):
    """A knob's value in one form, for comparing the command's with the checkpoint's."""
    if key == "ema_powers":
        return tuple(sorted(f"{float(g):g}" for g in value or ()))
    if key == "trainable" and isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if key == "train_sigma" and value is not None:
        return tuple(float(v) for v in value)
    if key == "subspace_data" and isinstance(value, str):
        from dpdm.datasets import absolute_dataset_name

        return absolute_dataset_name(value)   # as the run records it; a relative name means the file from here
    if isinstance(value, list):
        return tuple(value)
    return value


def _shown(key: str, value) -> str:
    if key == "subspace_data" and isinstance(value, str):
        return value   # as given, or as the run recorded it
    value = _kept_value(key, value)
    if value is None or value == ():
        return "none" if key in ("ema_powers", "subspace_dim", "subspace_data", "train_sigma") else (
            "all parameters" if key == "trainable" else "none")
    if isinstance(value, tuple):
        return (",".join(map(str, value)) if key == "trainable" else " ".join(
            f"{v:g}" if isinstance(v, float) else str(v) for v in value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _warn_before_training(data, name: str, dataset: str | None, doc, no_dp: bool, notes: tuple[str, ...],
                          seed: int | None) -> None:
    """Said once every check has passed and before the first step: a refused run stays one error line, and the
    user can still stop before any of the plan's budget is spent. `notes`: the training library's warnings;
    `seed`: a --seed given to a new run."""
    from dpdm.train import SEED_NOTE, data_notes

    # Said below in the CLI's own words (naming --seed and the dataset): the library's versions once only. Its
    # pixels >= 0 note is for tensors (images in [0, 1] from torchvision); the CLI's data are uint8 mapped to
    # [-1, 1], where it means every pixel is 128 or more: bright images, legitimate, and its "x * 2 - 1" advice would
    # not apply (r1 F2, stop 53)
    # The library names TrainConfig.seed; on a resume (seed None) the CLI's words say it too (r1 N2, stop 53).
    said = {SEED_NOTE, *data_notes(data.x, data.y, data.num_classes).values()}
    if no_dp:
        warn("--no-dp: this run is NOT differentially private; its outputs are marked non-private")
    elif seed is not None or SEED_NOTE in notes:
        warn_known_seed(seed)
    for note in notes:
        if note not in said:
            warn(note)
    if not no_dp:
        warn_inferred(name, data)
    warn_unlabelled_npz(name, data)
    warn_binary_pixels(name, data)
    warn_exif_orientation(name, data)
    warn_empty_classes(name, data)
    warn_dataset_not_plans(dataset, doc.plan.dataset_name, "the run")
