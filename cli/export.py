"""`dpdm export`: the release file of a run, without the run's secrets."""
from __future__ import annotations

import os

import click

from cli._common import (PathOption, checkpoint_of, discarded_note, emit_json, info, warn, warn_non_private,
                         warn_steps_past_checkpoint)
from cli.errors import BadInput
from dpdm.report_utils import epsilon_text


@click.command()
@click.option("--run", "run_dir", type=PathOption(file_okay=False), default=None, help="A run folder from `dpdm train`.")
@click.option("--checkpoint", "checkpoint_path", type=PathOption(dir_okay=False), default=None,
              help="A checkpoint file instead of --run.")
@click.option("--weights", default="ema", show_default=True,
              help="The one set of weights to release: ema, raw (the last iterate), or power:GAMMA.")
@click.option("--out", "out_path", required=True, type=PathOption(dir_okay=False),
              help="The release file (model.pt), outside the run folder; `dpdm sample --checkpoint` reads it.")
@click.option("--force", is_flag=True,
              help="Let --out replace the release file of another plan, or one of this plan from a run of the "
                   "other kind (a private run's where this run is --no-dp, or the reverse); one of this plan and "
                   "kind is replaced anyway; any other file, never.")
@click.option("--json", "as_json", is_flag=True)
def export(run_dir, checkpoint_path, weights, out_path, force, as_json):
    """Write the model file to release: a run's weights without its secrets.

    \b
    The run folder is not to be released: checkpoint.pt holds the secret seed and
    RNG state from which the batches and the DP noise derive, and a fingerprint of
    the private images. The release file holds one set of weights, the network's
    description and the privacy ledger (epsilon spent, delta, plan digest) with the
    run's plan (public), against which a reader re-accounts the ledger; nothing
    else. Prints the file's sha256 and its weights' sha256, which `dpdm sample`
    records in samples drawn with them (meta_weights_sha256). The weights are only
    as private as the run: those of a --no-dp run carry no guarantee about the data
    it trained on (a warning says so), and must not be released where that data is
    private.
    """
    path = checkpoint_of(run_dir, checkpoint_path)
    out_path = os.path.expanduser(out_path)   # '~' as `output_parent_problem` reads it (h111 N5)
    from dpdm.checkpoint import SEED_GIVEN_NOTE
    from dpdm.export import ExportError, export_model
    from dpdm.report_utils import output_parent_problem

    if out_path.endswith(("/", "\\")):   # a folder's name: the file would be written as the folder's name
        raise BadInput(f"--out={out_path!r} names a folder; name the release file (e.g. {out_path}model.pt)")
    problem = output_parent_problem(out_path)
    if problem:
        raise BadInput(f"--out={out_path!r}: {problem}")

    facts: dict = {}   # the checkpoint's data digest, for the line on its run's .steps_done (never printed)
    try:
        result = export_model(path, out_path, weights=weights, keep_other_plans=not force, facts=facts)
    except ExportError as e:
        raise BadInput(str(e)) from None
    if result["private"] and result["seed_given"]:
        warn(f"the run was {SEED_GIVEN_NOTE}; the release file records that (config.train.seed_given)")
    if not result["private"]:   # marked on the line too; said apart, as loudly as a given seed (h115 N1)
        warn_non_private(out_path, "the weights of a NON-PRIVATE (--no-dp) run")
    warn_steps_past_checkpoint(path, result, "the release file's",   # a run stopped past its checkpoint (h131 F1)
                               data_digest=facts.get("data_digest"))
    if as_json:
        emit_json(result)
        return
    if result["private"]:
        # weights that hold fewer steps' updates than the ledger counts say how many, as `dpdm sample`'s line does
        what = (f"DP: epsilon {epsilon_text(result['epsilon_spent'])}, delta {result['delta']:g} after "
                f"{result['steps_done']} of {result['plan_steps']} steps{discarded_note(result)}")
    else:
        what = "NON-PRIVATE (--no-dp)"
    info(f"wrote {out_path}: {result['weights']} weights, {result['parameters']:,} parameters, {what}; "
         f"sha256 {result['sha256']}; weights sha256 {result['weights_sha256']} (samples drawn with them record it)")
