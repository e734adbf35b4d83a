"""`dpdm audit`: mechanism checks and a canary audit of a run against a plan."""
from __future__ import annotations

import click

from cli._common import DatasetName, FiniteFloatRange, PathOption, emit_json, info, warn
from cli.errors import BadInput
from dpdm.report_utils import epsilon_text

# audits.canary.MIN_CANARIES and MAX_CANARIES (why these: there), repeated so that --help imports no torch; a test
# pins them alike.
MIN_CANARIES = 20
MAX_CANARIES = 100_000


# run_audit names its parameters ("steps=21 must be ..."); the user gave options.
_OPTIONS = {"run": "--run", "plan": "--plan", "out": "--out", "dataset": "--dataset", "steps": "--steps",
            "significance": "--significance", "num_canaries": "--canaries", "background_size": "--background",
            "suite": "--suite", "seed": "--seed"}


def _named_option(message: str) -> str:
    name = message.split("=", 1)[0]
    return _OPTIONS[name] + message[len(name):] if name in _OPTIONS else message


@click.command()
@click.option("--run", "run_dir", required=True, type=PathOption(file_okay=False),
              help="A run folder from `dpdm train`.")
@click.option("--plan", "plan_path", type=PathOption(dir_okay=False), default=None,
              help="The claimed plan (default: the run's own plan.json).")
@click.option("--suite", type=click.Choice(["quick", "full"]), default="quick", show_default=True,
              help="quick: minutes on a CPU (shorter canary run, same per-step mechanism); full: the plan's steps.")
@click.option("--out", "out_dir", required=True, type=PathOption(file_okay=False),
              help="Report folder (report.md, report.json, PNGs, scores.npz).")
@click.option("--dataset", type=DatasetName(), default=None,
              help="Data for the canary run (default: the run's dataset).")
@click.option("--data-root", type=PathOption(file_okay=False), default=None)
# The suites' values in the three help texts below repeat audits.suite.SUITES, which imports torch (a test pins
# them to it): --help stays fast, as every `dpdm` command's does.
@click.option("--canaries", type=int, default=None,
              help=f"Override the suite's number of canaries ({MIN_CANARIES} to {MAX_CANARIES:,}) "
                   "[default: quick 200, full 1,000]. More certify more only up to a point: at delta 1e-5 and the "
                   "default --significance, at most about epsilon 4.3, near 900 canaries, and less beyond; the audit "
                   "says before training where its canaries cannot test the claim, and what could.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Override the suite's canary-run steps, at most the plan's [default: quick the plan's steps up "
                   "to 300, full the plan's steps].")
@click.option("--background", type=click.IntRange(min=1), default=None,
              help="Override the suite's background examples [default: quick 500, full all of the audit's data].")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--significance", type=FiniteFloatRange(min=0, max=1, min_open=True, max_open=True), default=0.05,
              show_default=True, help="Family-wise error budget of the verdict.")
@click.option("--force", is_flag=True,
              help="Let --out replace the report of an audit of another run, or against another plan; one of this "
                   "run against this plan is replaced anyway; any other file, never.")
@click.option("--json", "as_json", is_flag=True, help="Print the report's JSON on stdout.")
def audit(run_dir, plan_path, suite, out_dir, dataset, data_root, canaries, steps, background, seed, significance,
          force, as_json):
    """Audit dpdm's private step under a run's plan: PASS (exit 0), FAIL (exit 1) or INCONCLUSIVE (exit 3).

    Tests `dpdm train`'s private step and the plan's mechanism on fresh canary trainings, and reads the run's
    ledger, config and metrics.csv, never its weights: it cannot tell which model was trained or released.
    INCONCLUSIVE: every mechanism check passed, but the canary attacks had too little power to test the claim."""
    from pathlib import Path

    if canaries is not None and canaries < MIN_CANARIES:
        raise BadInput(f"--canaries={canaries} is too few for a meaningful audit: give at least {MIN_CANARIES} "
                       f"(with fewer even a perfect attack certifies almost nothing)")
    if canaries is not None and canaries > MAX_CANARIES:
        raise BadInput(f"--canaries={canaries} is more than this audit trains on a CPU or GPU in reasonable time "
                       f"and memory: give at most {MAX_CANARIES:,}")
    if plan_path is not None and not Path(plan_path).is_file():
        raise BadInput(f"--plan={plan_path!r} does not exist")
    if not Path(run_dir).is_dir():
        raise BadInput(f"--run={run_dir!r} is not a folder")
    from audits.canary import compared_digits
    from audits.suite import EXIT_CODES, AuditInputError, check_out_dir, run_audit

    # Before any training: a folder the report cannot be written to would lose the verdict at the end.
    try:
        check_out_dir(out_dir, create=False)
    except AuditInputError as e:
        raise BadInput(f"--out={out_dir!r}: {e}") from None

    overrides = {"num_canaries": canaries, "steps": steps, "background_size": background}

    def progress(stage, i, n):
        if i == 0 or i == n:
            info(f"audit: {stage}" + ("" if i == 0 else " done"))

    try:
        doc = run_audit(run_dir, out_dir, plan_path=plan_path, suite=suite, dataset=dataset, data_root=data_root,
                        seed=seed, significance=significance, canary_overrides=overrides, progress=progress,
                        warn=warn, force=force)
    except AuditInputError as e:  # input validation only, before any training; anything else is exit 4
        raise BadInput(_named_option(str(e))) from None
    if as_json:
        emit_json(doc)  # finite-only already: run_audit turns inf and nan into null
    elif doc["canary_audit"] is None:   # FAIL: the canary audit stopped (h143 F2, stop 54), the reasons say where
        info(f"audit verdict: {doc['verdict']}  (no epsilon lower bound: the canary audit stopped; report in "
             f"{out_dir}/report.md)")
        for r in doc["reasons"]:
            info(f"  - {r}")
    else:
        can = doc["canary_audit"]
        claim = can["claimed_epsilon"]
        canary_steps = can["training"]["target"]["steps"]
        plan = doc["claimed_plan"]
        lb = can["max_epsilon_lower_bound"]
        digits = compared_digits(lb, claim)   # a bound above the claim never reads as at or below it
        info(f"audit verdict: {doc['verdict']}  (empirical epsilon lower bound "
             f"{epsilon_text(lb, digits, bound='lower')} vs {epsilon_text(claim, digits)}, the epsilon "
             f"of the {canary_steps}-step canary run; the plan's epsilon over its {plan['steps']} steps: "
             f"{epsilon_text(plan['epsilon'])}; report in {out_dir}/report.md)")
        for r in doc["reasons"]:
            info(f"  - {r}")
    return EXIT_CODES[doc["verdict"]]
