"""`dpdm audit`: mechanism checks and a canary audit of a run against a plan."""
from __future__ import annotations

import click

from cli._common import FiniteFloatRange, emit_json, info
from cli.errors import BadInput


@click.command()
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False),
              help="A run folder from `dpdm train`.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), default=None,
              help="The claimed plan (default: the run's own plan.json).")
@click.option("--suite", type=click.Choice(["quick", "full"]), default="quick", show_default=True,
              help="quick: minutes on a CPU (shorter canary run, same per-step mechanism); full: the plan's steps.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Report folder (report.md, report.json, PNGs, scores.npz).")
@click.option("--dataset", default=None, help="Data for the canary run (default: the run's dataset).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None)
@click.option("--canaries", type=click.IntRange(min=2), default=None, help="Override the suite's number of canaries.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Override the suite's canary-run steps.")
@click.option("--background", type=click.IntRange(min=1), default=None, help="Override the suite's background examples.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--significance", type=FiniteFloatRange(min=0, max=1, min_open=True, max_open=True), default=0.05,
              show_default=True, help="Family-wise error budget of the verdict.")
@click.option("--json", "as_json", is_flag=True, help="Print the report's JSON on stdout.")
def audit(run_dir, plan_path, suite, out_dir, dataset, data_root, canaries, steps, background, seed, significance,
          as_json):
    """Audit a run: PASS (exit 0), FAIL (exit 1) or INCONCLUSIVE (exit 3)."""
    from pathlib import Path

    if plan_path is not None and not Path(plan_path).is_file():
        raise BadInput(f"--plan={plan_path!r} does not exist")
    if not Path(run_dir).is_dir():
        raise BadInput(f"--run={run_dir!r} is not a folder")
    from audits.suite import EXIT_CODES, run_audit

    overrides = {"num_canaries": canaries, "steps": steps, "background_size": background}

    def progress(stage, i, n):
        if i == 0 or i == n:
            info(f"audit: {stage}" + ("" if i == 0 else " done"))

    try:
        doc = run_audit(run_dir, out_dir, plan_path=plan_path, suite=suite, dataset=dataset, data_root=data_root,
                        seed=seed, significance=significance, canary_overrides=overrides, progress=progress)
    except ValueError as e:
        raise BadInput(str(e)) from None
    if as_json:
        emit_json(doc)
    else:
        eps = doc["claimed_plan"]["epsilon"]
        lb = doc["canary_audit"]["max_epsilon_lower_bound"]
        info(f"audit verdict: {doc['verdict']}  (empirical epsilon lower bound {lb:.3f} vs claimed upper bound "
             f"{eps:.3f}; report in {out_dir}/report.md)")
        for r in doc["reasons"]:
            info(f"  - {r}")
    return EXIT_CODES[doc["verdict"]]
