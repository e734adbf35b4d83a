"""Release files (`dpdm export`): the part of a run that may leave the run folder.

A training checkpoint is for resuming, not for release: it holds the run's secret seed and RNG state
(from which the Poisson batches and every step's DP noise derive, so anyone holding them could
subtract the noise), and a fingerprint of the private images (`data_digest`, which lets whoever
can guess the dataset test the guess). A release file holds one set of weights, the description of
the network the sampler needs, the public dataset a warm start came from, and the privacy ledger
with the run's plan.json text (re-accounted by `checkpoint.verify_release_ledger` whenever it is loaded);
the weights are DP-SGD's output and the rest is public (the plan is), so releasing it costs no budget.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from dpdm import checkpoint as ckpt

# The keys of a run's config that describe the network or were public before training.
RELEASED_CONFIG_KEYS = ("model", "precond", "sigma_data", "img_resolution", "img_channels", "num_classes",
                        "dataset", "private")


class ExportError(ValueError):
    """A checkpoint that cannot be exported, or an output path that would overwrite it."""


def release_config(config: dict[str, Any], plan_dataset: str | None = None) -> dict[str, Any]:
    """What a release file keeps of a run's config: no seed, no data digest, no local paths. The dataset is
    named as the plan (public, in the file) names it, or by a built-in name; a path the plan does not name
    (`dpdm plan --dataset-size` alone, then `dpdm train --dataset npz:/home/.../patients.npz`) is left out."""
    from dpdm.datasets import public_dataset_name, public_init_name

    out = {k: config[k] for k in RELEASED_CONFIG_KEYS if k in config}
    if "dataset" in out:
        out["dataset"] = public_dataset_name(out["dataset"], plan_dataset, config.get("plan_names_data"))
    # The noise levels the network was trained on (`dpdm train --train-sigma`): the sampler stays inside them.
    # seed_given: the user chose the training seed (`dpdm train --seed`), not its value (ckpt.SEED_GIVEN_NOTE).
    # label_dropout (a setting, public): 0 trained no null label, so `dpdm sample` refuses --guidance (h111 N6).
    train = config.get("train") or {}
    out["train"] = {"train_sigma": train.get("train_sigma"), "seed_given": ckpt.seed_given(config),
                    **({"label_dropout": train["label_dropout"]} if "label_dropout" in train else {})}
    init = config.get("init")
    out["init"] = None if init is None else {"dataset": public_init_name(init.get("dataset")),
                                             "sha256": init.get("sha256")}
    return out


def release_identity(path: str | os.PathLike) -> tuple[str, Any] | None:
    """The plan digest and the private flag (True, or False for a --no-dp run's) in the ledger of the release file
    at `path`, or None when nothing is there: what `dpdm export --out` replaces without --force where both are
    this run's (h151 F1, stop 55).

    Raises:
        ExportError: `path` exists and is damaged (a zip record fails its CRC-32) or is not a release file of
            `dpdm export` (read only with `weights_only=True`), so `dpdm export` must not replace it.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return None
    try:
        state = ckpt._load_weights_only(path)   # a folder or a broken link: CheckpointError
    except ckpt.CheckpointError:
        # Perhaps an earlier release file, bit-rotted: said so, not "not a release file" (the CRC-32s are read
        # again only here, on the way to refusing).
        damaged = ckpt.damaged_record(path) if path.is_file() else None
        if damaged is not None:
            raise ExportError(f"--out={str(path)!r} already exists and is damaged: {damaged}; it is kept: remove "
                              "it or choose another --out") from None
        state = None
    ledger = state.get("ledger") if state is not None and state.get("format") == ckpt.MODEL_FORMAT else None
    if not isinstance(ledger, dict):
        raise ExportError(f"--out={str(path)!r} already exists and is not a release file from `dpdm export`; it "
                          "is kept: choose another --out")
    return str(ledger.get("plan_digest")), ledger.get("private")


def export_model(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike, *,
                 weights: str = "ema", keep_other_plans: bool = False, facts: dict | None = None) -> dict[str, Any]:
    """Writes the release file of a checkpoint to `out_path` atomically. Returns a summary: with the file's
    "sha256", its weights' "weights_sha256" (`sample.weights_digest`), which samples drawn with them record, and
    "discarded_steps" where the weights hold fewer steps' updates than the ledger counts (as `dpdm sample`'s).

    weights: "ema", "raw" or "power:GAMMA" (`dpdm.sample`'s names): the one set the file holds.
    keep_other_plans: refuse to replace a release file of another plan (`dpdm export` without --force),
        as `dpdm plan --out` keeps a different plan, or one of the same plan whose private flag differs (a private
        run's release is no --no-dp baseline's of its plan); a release file of this plan and flag is replaced.
    facts: where given, filled with "data_digest", the checkpoint's fingerprint of its private data (None where
        it has none), for `dpdm export`'s line on the run's .steps_done; never in the file or the summary.

    Raises:
        ExportError: the checkpoint is missing, corrupt or not a training checkpoint; `weights` is not
            in it; no locked plan.json of its plan lies beside it; or `out_path` is the checkpoint itself,
            lies anywhere inside the run folder (the checkpoint's folder, whose plan.json, config.json,
            metrics.csv and checkpoints it would overwrite, and which is not for release) or inside another
            run folder (`report_utils.run_folder_of`), names an existing file that is not a release file
            (a checkpoint, a plan, the data: never replaced), or (keep_other_plans) a release file of
            another plan or of the other private flag.
    """
    import torch

    from dpdm.report_utils import remove_temp_leftovers, run_folder_of
    from dpdm.sample import (SampleError, _weights_of, privacy_name, weights_digest, weights_name, weights_problem,
                             written_path)

    src, out = Path(checkpoint_path), Path(out_path)
    try:
        state = ckpt.load_checkpoint(src)
    except ckpt.CheckpointError as e:
        raise ExportError(str(e)) from None
    if facts is not None:
        facts["data_digest"] = state["config"].get("data_digest")
    if out.exists() and out.resolve() == src.resolve():
        raise ExportError(f"--out={str(out)!r} is the checkpoint itself; write the release file elsewhere")
    run_dir = src.resolve().parent
    # Where a link --out points (links resolved, so a link into the run folder is inside it too), and where the
    # file is written: a link --out is replaced, not written through (`sample.written_path`).
    for target in (out.resolve(), written_path(out)):
        if target == run_dir or run_dir in target.parents:
            raise ExportError(f"--out={str(out)!r} lies inside the run folder {str(run_dir)!r}; write the release "
                              "file outside it (the run folder holds the run's secrets and its locked files)")
        other_run = run_folder_of(target.parent)
        if other_run is not None:
            raise ExportError(f"--out={str(out)!r} lies inside the run folder {str(other_run)!r} of another run; "
                              "write the release file outside it (a run folder holds its run's secrets and locked "
                              "files)")
    old = release_identity(out)
    try:
        chosen = _weights_of(state, weights, src)
    except SampleError as e:
        raise ExportError(str(e)) from None
    try:   # the run's plan.json, against which the ledger re-accounts (what `dpdm sample` checks of the release)
        doc = ckpt.verify_run_ledger(src, state, missing=(
            f"no plan.json beside {str(src)!r}: export from the run folder, which holds the plan the ledger is "
            "certified against"))
    except ckpt.CheckpointError as e:
        raise ExportError(str(e)) from None
    ledger = {k: state["ledger"][k] for k in ckpt.LEDGER_KEYS}
    weights = weights_name(weights)   # "power:0.50" and "power:0.5" are one EMA: one name, one file
    config = release_config(state["config"], doc.plan.dataset_name)
    problem = weights_problem(config, chosen)   # the network the file describes, as `dpdm sample` will check
    if problem is not None:
        raise ExportError(f"checkpoint {str(src)!r} is corrupt: its {weights} weights do not fit its own config "
                          f"({problem})")
    # Each tensor in a storage of its own: torch.save writes a tensor's whole storage, so a view into one that also
    # held the raw weights (a checkpoint made by hand) released them too (h101 N7). The state dict's own metadata
    # (module versions) is kept: a release of dpdm's own checkpoint is the same file, byte for byte.
    chosen = copy.copy(chosen)
    for key, tensor in chosen.items():
        chosen[key] = tensor.detach().clone(memory_format=torch.contiguous_format)
    # The verified document as dpdm writes it, not the file's text: keys dpdm does not write stay out of the release.
    release = {"format": ckpt.MODEL_FORMAT, "weights": weights, "state_dict": chosen, "config": config,
               "ledger": ledger, "plan": doc.to_json() + "\n"}
    this = f"this run is {'private' if ledger['private'] else 'NON-PRIVATE (--no-dp)'}"
    other_kind = old is not None and old[1] is not bool(ledger["private"])
    if keep_other_plans and old is not None and old[0] != ledger["plan_digest"]:
        # its kind too where it is the other: a private release is no --no-dp one of another plan either (N4, stop 55)
        raise ExportError(f"--out={str(out)!r} already exists and holds the release file of "
                          f"{privacy_name(old[1]) + ' of ' if other_kind else ''}another plan ({old[0][:19]}..., "
                          f"this run's is {str(ledger['plan_digest'])[:19]}...){', and ' + this if other_kind else ''}"
                          "; it is kept. Choose another --out, or pass --force to replace it")
    if keep_other_plans and other_kind:
        # One plan, a private run and its --no-dp baseline (the non-private ceiling): two files, never one path
        raise ExportError(f"--out={str(out)!r} already exists and holds the release file of "
                          f"{privacy_name(old[1])} of this plan, and {this}; it is kept. Choose "
                          "another --out, or pass --force to replace it")
    # Steps of the ledger whose updates the weights do not hold (a divergence's, --spend-unsaved-steps'), in the
    # summary as `dpdm sample`'s of the same checkpoint (N2, stop 55); the release file records none
    discarded = int(state.get(ckpt.DISCARDED_STEPS_KEY, 0))
    remove_temp_leftovers(out, r"\.[a-z0-9_]{8}\.tmp")   # `atomic_torch_save`'s (mkstemp's) of a killed export
    ckpt.atomic_torch_save(release, out)   # where the OS puts `out` (`LINK/..`: r1 F4)
    # sha256: the file's, to publish; weights_sha256: its weights' (`sample.weights_digest`), which `dpdm sample`
    # records in the samples it draws from this file or from the run's same weights (meta_weights_sha256).
    return {"model": str(out), "sha256": ckpt.file_sha256(out), "weights_sha256": weights_digest(chosen),
            "checkpoint": str(src), "weights": weights,
            "parameters": int(sum(t.numel() for t in chosen.values() if t.is_floating_point())),
            **ledger, "epsilon_spent": float(ledger["epsilon_spent"]) if ledger["private"] else None,
            "seed_given": ckpt.seed_given(state["config"]),
            **({ckpt.DISCARDED_STEPS_KEY: discarded} if discarded else {})}
