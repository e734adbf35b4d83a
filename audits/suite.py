"""The audit suite behind `dpdm audit`: mechanism checks + canary audit -> verdict and report.

What it tests (``AUDIT_SCOPE``): `dpdm train`'s private step and the plan's per-step mechanism, on canary
trainings and network initializations of its own. From the run folder it uses the ledger, the config and
metrics.csv, never the weights, so its verdict says nothing about which model was trained or released.

Error budget (family-wise, Bonferroni): ``significance`` (default 0.05) is split as

* 1/5 (0.01) over the statistical mechanism checks (noise variance and noise once per step, on the tiny
  model and on the run's own network, the noise of one step under two run seeds, and that of consecutive steps of
  one run, per engine: both are checked; for a `--public-subspace` run the noise in the subspace too; Poisson batch
  sizes, inclusion counts, logged batch sizes): each is run at 0.01 / 15 (0.01 / 17 for a subspace run;
  ``statistical_check_count``);
* 4/5 (0.04) over the epsilon lower bounds of the canary audit, evenly over its attacks (loss and
  PIA: 0.02 each); each one-run bound further splits its share over its grid of guess counts.

So the probability that a correct implementation of a correct plan gets FAIL is at most 0.05.
The positive control's bounds are computed at the same per-attack level; they only decide between
PASS and INCONCLUSIVE, never FAIL.

The claimed epsilon of the canary audit is that of the canary run: the plan's per-step mechanism
composed over the canary run's steps (at most the plan's epsilon; the report shows both).

Verdict: FAIL if a mechanism check fails, a canary run's weights or scores are not finite (``CanaryNotFinite``),
or an epsilon lower bound exceeds the claimed epsilon;
otherwise INCONCLUSIVE if the canary attacks had too little power to test the claim (the certifiable
ceiling with these canaries is at or below the claim, or the positive control does not reach the claim
either; ``audits.canary.canary_verdict``): every mechanism check ran and passed, and none of the lower bounds
exceeded the claim; otherwise PASS ("no violation detected at the stated power", never "privacy verified").

Bad input (run, plan, dataset, suite settings, report folder) raises ``AuditInputError`` (a
ValueError) before any training; any other exception is a runtime failure, except one of the canary audit after a
mechanism check failed: the verdict is FAIL then, and the report says where the canary audit stopped.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import stat
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from audits.auditor import _jsonable
from audits.canary import (CanaryConfig, CanaryNotFinite, canary_audit, canary_power, coin_split_problem,
                           coins_ceiling, compared_digits, draw_inclusion, power_advice)
from audits.mechanism import (REPEAT_POWERS, REPEAT_STEPS, CheckResult, check_engine, check_fresh_noise, check_network,
                               check_noise_never_repeats, check_run, check_run_seed, check_sampler, check_subspace,
                               network_problem, second_noise_multiplier)
from audits.plots import plot_epsilon_vs_guesses, plot_roc, plot_score_histogram
from dpdm.report_utils import epsilon_text

__all__ = ["SUITES", "suite_config", "run_audit", "write_report", "EXIT_CODES", "AUDIT_SCOPE", "LOOP_NOT_AUDITED",
           "training_private_grad", "AuditInputError", "check_out_dir", "mechanism_checks"]

EXIT_CODES = {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}

# The first line of the report's "What was audited" (h115 F2, stop 51): a reviewer took an audit of a run folder
# for evidence about the model released from it. The README's audit row and `dpdm audit --help` say the same.
AUDIT_SCOPE = ("What this audit tests: `dpdm train`'s private step and the plan's per-step mechanism, on canary "
               "trainings and network initializations of its own. From the run folder it uses the ledger, the "
               "config and metrics.csv, never the weights: it cannot tell which model was trained or released "
               "(another checkpoint with the same ledger and config gets the same report).")

# A line of the report's "What was audited" after the mechanism checks' (h143 F3, stop 54): the checks and the canary
# runs call the loop's step themselves, with arguments of their own; what `dpdm train`'s loop passes it is not audited.
# The README's audit section says the same.
LOOP_NOT_AUDITED = ("Not audited: what `dpdm train`'s loop (`dpdm.train.train`) passes to that step: the plan, "
                    "the step index, the run seed and lr segments, the Poisson sampler's arguments and each step's "
                    "batch. The checks and the canary runs call the step (plan_private_grad) themselves, and from the "
                    "run the audit reads the ledger, config and metrics.csv, which the loop writes from the plan "
                    "whatever it passed: a dpdm whose loop passed the step other arguments would get this report too. "
                    "dpdm's test suite checks the loop (tests/dpdm/test_train.py, "
                    "test_the_train_loop_runs_the_plans_mechanism).")

# What each suite trains. "quick": minutes on 2 CPU cores; "full": the plan's own steps and K, the
# run's own network and all of its data.
SUITES: dict[str, dict[str, Any]] = {
    "quick": {"num_canaries": 200, "background_size": 500, "max_steps": 300, "noise_multiplicity": 4,
              "model": "mlp", "noise_pairs": 40, "network_pairs": 1},
    "full": {"num_canaries": 1000, "background_size": None, "max_steps": None, "noise_multiplicity": None,
             "model": None, "noise_pairs": 100, "network_pairs": 2},
}



# Bytes that the deepest file of a report adds to its folder's report.json path, and more: a plot staged as
# `.report-XXXXXXXX/roc_log_control_ATTACK.png` (`write_report`, `_PLOT_NAME`), or its temporary file.
_REPORT_DEPTH = 96


class AuditInputError(ValueError):
    """Bad input to ``run_audit`` (run, plan, dataset, suite settings, report folder), found before any
    training. Other exceptions from ``run_audit`` (ValueError included) are not the user's mistake."""


def check_out_dir(out_dir, *, create: bool = True, datasets: dict[str, str | None] | None = None,
                  identity: tuple[str, str] | None = None, force: bool = False) -> Path:
    """Creates the report folder if needed and checks that files can be written in it (AuditInputError
    otherwise), so that a bad folder is found before minutes of training rather than after. A folder in a
    run folder (`dpdm train --out`, `report_utils.run_folder_of`), or one holding files but no earlier audit's
    report (report.json of format dpdm.audit/1), is refused: the report would replace or add to files that are
    not an audit's. So is a folder that is, or lies in, the data of a `folder:` or `npz:` name in `datasets` (what
    each is, as the error line says it, to its name), as `dpdm train` and `dpdm sample` refuse their outputs there
    (`report_utils.place_in_dataset`): the report's PNGs would read as images of that data, which no command could
    then load (h103 F1). With `create` False an absent folder is not made, only checked to be creatable (a refused
    audit leaves no empty folder behind). With `identity` (this audit's ``report_identity``), an earlier report of an
    audit of another run, or against another plan, is refused unless `force`, as `dpdm export` and `dpdm sample` keep
    an output of another plan: it may be costly to remake (``--suite full``) or be evidence (a FAIL). One of this run
    against this plan is replaced; so is one that names neither (from a dpdm before reports named them)."""
    from dpdm.report_utils import output_parent_problem, path_length_problem, place_in_dataset, run_folder_of

    out = Path(out_dir)
    # First: a name past NAME_MAX, or a path past PATH_MAX, raised ENAMETOOLONG from the lookups below (exit 4, s56
    # outwalk F2). Room for the deepest file the report writes: a plot in its staging folder (`write_report`).
    problem = path_length_problem(out.expanduser() / "report.json", room=_REPORT_DEPTH)
    if problem:
        raise AuditInputError(problem)
    run = run_folder_of(out)
    if run is not None:
        raise AuditInputError(f"lies inside the run folder {str(run)!r}; write the report outside it")
    for what, name in (datasets or {}).items():
        where = place_in_dataset(out.expanduser(), name)
        if where:
            raise AuditInputError(f"{where} {what} ({name!r}), where the report's images would read as part of that "
                                  "data; write the report outside it")
    foreign = [name for name in ("report.md", "report.json", "scores.npz") if os.path.lexists(out / name)]
    if foreign and not _holds_audit_report(out):
        raise AuditInputError(f"holds {', '.join(foreign)}, which {'is' if len(foreign) == 1 else 'are'} not an "
                              "earlier dpdm audit's report (no report.json of format dpdm.audit/1) and is kept: "
                              "choose another --out")
    if foreign and identity is not None and not force:
        problem = _other_audits_report(out, identity)
        if problem:
            raise AuditInputError(f"holds {problem}; it is kept: choose another --out, or pass --force to replace it")
    # A data folder, a project folder: not the audit's. Hidden names (an interrupted report's staging folder,
    # a write test) are the audit's own.
    if out.is_dir() and not foreign and any(not p.name.startswith(".") for p in out.iterdir()):
        raise AuditInputError("holds files and no earlier dpdm audit's report; the audit writes its report, plots "
                              "and scores there: choose a new or empty --out")
    if not create and not os.path.lexists(out):
        problem = output_parent_problem(out / "report.json")
        if problem is not None:
            raise AuditInputError(problem)
        return out
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)   # 0700: the report holds a noise-free control run
        os.chmod(out, 0o700)   # an empty folder made beforehand too (mkdir's mode applies to a new one only)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise AuditInputError("exists and is not a folder") from None
    except OSError as e:
        raise AuditInputError(f"cannot create or write the report folder ({e.strerror or e})") from None
    return out


_MARKDOWN_TITLE = "# dpdm privacy audit:"   # how report.md begins (`_markdown`)


def _holds_audit_report(out: Path) -> bool:
    """Whether the folder `out` holds a `dpdm audit` report: its report.json (format dpdm.audit/1), or, where
    an interrupted `write_report` removed that, a report.md that `_markdown` wrote beside nothing but the
    audit's own files."""
    try:
        if not os.path.lexists(out / "report.json"):
            # Only the files an audit writes, then: a copy of a report.md among other files is not an audit's.
            if any(not (p.name.startswith(".") or p.name in ("report.md", "scores.npz") or _PLOT_NAME.match(p.name))
                   for p in out.iterdir()):
                return False
            with open(out / "report.md", encoding="utf-8") as f:
                return f.readline().startswith(_MARKDOWN_TITLE)
        if (out / "report.json").stat().st_size > 64 << 20:
            return False
        doc = json.loads((out / "report.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == "dpdm.audit/1"


def report_identity(run_dir) -> str:
    """What names the run in a report (report.json's ``run_folder_sha256``): the sha256 of the run folder's resolved
    path, which ``run`` (the path as given, relative to where the audit ran) is not, and which tells no reader of a
    shared report where the folder lies."""
    import hashlib

    return "sha256:" + hashlib.sha256(os.path.realpath(run_dir).encode("utf-8", "surrogateescape")).hexdigest()


def _other_audits_report(out: Path, identity: tuple[str, str]) -> str | None:
    """What the report in `out` is, where it is of an audit of another run or against another plan than `identity`
    (run folder's ``report_identity``, claimed plan's digest); None where it is this audit's, names neither, or is no
    report.json (an interrupted report's report.md: `_holds_audit_report`)."""
    try:
        doc = json.loads((out / "report.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    plan = doc.get("claimed_plan")
    digest = plan.get("digest") if isinstance(plan, dict) else None
    run_key = doc.get("run_folder_sha256")
    other_plan = isinstance(digest, str) and digest != identity[1]
    other_run = isinstance(run_key, str) and run_key != identity[0]
    if not (other_plan or other_run):
        return None
    run_text = f"another run ({doc.get('run')!r})" if other_run else "this run"
    plan_text = (f"another plan ({digest[:19]}..., this audit's is {identity[1][:19]}...)" if other_plan
                 else "this plan")
    return f"the report of an audit of {run_text} against {plan_text} ({doc.get('verdict')})"


MECHANISM_SHARE = 0.2  # of the significance budget; the rest goes to the epsilon bounds
MIN_SIGNIFICANCE = 1e-12  # smaller budgets underflow in the per-check shares (1e-323 became 0)
# Per engine: noise_variance, noise_once_per_step (tiny model), noise_keyed_by_run_seed (tiny model, two run seeds,
# at a step before and one after an lr change: one check, one p-value), noise_fresh_each_step (tiny model,
# consecutive steps of one run, from step 0 and around an lr change: one check), network_noise_variance,
# network_noise_once_per_step (the run's network), and subspace_noise_variance for a --public-subspace run; once:
# the sampler's two and the logged batch sizes. `statistical_check_count` counts them.
ENGINE_STATISTICAL_CHECKS = 6
RUN_STATISTICAL_CHECKS = 3
GRAD_ENGINES = ("rules", "vmap")   # `dpdm train --grad-engine`'s two (auto picks one of them at each start)


def run_grad_engines(train_config: dict) -> tuple[str, ...]:
    """The per-example gradient engines a run's private steps may have used: both, for every run. The checkpoint
    records the engine of the run's last start only (``per_layer_rules``, ``grad_engine``), and each start may
    use another: `--grad-engine` may change on a resume, and ``auto`` (``per_layer_rules`` None) is decided afresh
    at each start (the rules on a CPU, the faster of the two on a GPU). A run started with the rules and resumed
    with vmap had the rules' steps left unchecked, and its report named vmap alone (h123 F2, stop 52)."""
    return GRAD_ENGINES


_RUN_SEED = 20231  # the run seed of training_private_grad's steps (any fixed value)
_STEP = 7          # the step of its run seeds (vary="run_seed"; any fixed value), after the last lr change
# The lr segments of a run whose lr changed at step 3 (any fixed pair), for a run that recorded no change of its
# own: from an lr change on, `dpdm.train.run_seed_at` derives each step's seed from a hash of the run seed and the
# segments rather than the run seed itself, and noise_keyed_by_run_seed tests that path too (r2 F1, stop 52).
LR_CHANGE = ((0, 1e-3, "constant"), (3, 5e-4, "constant"))


def lr_change_segments(train_config: dict) -> tuple[tuple[int, float, str], ...]:
    """The lr segments after whose last change noise_keyed_by_run_seed tests a step: the run's own where its
    checkpoint records a change (well formed, as `dpdm train --resume` reads them), else ``LR_CHANGE`` itself."""
    from dpdm.train import lr_segments_problem

    saved = train_config.get("lr_segments")
    if isinstance(saved, (list, tuple)) and len(saved) > 1 and lr_segments_problem(saved) is None:
        return tuple((int(a), float(b), str(c)) for a, b, c in saved)
    return LR_CHANGE


def run_seed_step(lr_segments=None) -> int:
    """The step ``training_private_grad(vary="run_seed", lr_segments=...)`` takes: ``_STEP`` steps after the
    last segment begins (``_STEP`` without segments)."""
    return _STEP + (int(lr_segments[-1][0]) if lr_segments else 0)


def training_private_grad(basis=None, *, per_layer_rules: bool = True, vary: str = "step",
                          lr_segments=None) -> Callable:
    """What `dpdm train` computes each step (`dpdm.train.plan_private_grad`, one process; with `basis`, the
    noise in that subspace), with the signature of `dpdm.engine.private_grad` that the mechanism checks call.

    The arguments reach it as a plan's fields (clip_norm, noise_multiplier, batch_size: the expected batch
    size), as the training loop's do. The generator handed in picks the step of one run (seed fixed), so two
    calls with generators seeded alike replay a step's noise, and calls with other seeds are other steps:
    a step that drew the same noise as another would show as too little variance between them. With
    ``vary="run_seed"`` it picks the run seed of one step (step fixed) instead: calls with other seeds are the same
    step of other runs (``check_run_seed``: noise that ignores the run's secret seed is the same in every run).
    With ``vary="consecutive"`` the generator's seed is itself the step of one run (seed fixed): calls with seeds s
    and s + 1 are neighbouring steps (``check_fresh_noise``), which two random steps of 2**62 never are.
    ``lr_segments`` ((first step, lr, schedule), ...): the steps are those of a run with these segments (its lr
    changed: `dpdm.train.run_seed_at`'s other path), and ``vary="run_seed"``'s step ``run_seed_step`` is after
    the last change."""
    import types

    import torch

    from dpdm.train import plan_private_grad

    if vary not in ("step", "run_seed", "consecutive"):
        raise ValueError(f"vary={vary!r} must be 'step', 'run_seed' or 'consecutive'")

    def step(model, loss_fn, *batch, clip_norm, noise_multiplier, expected_batch_size, generator=None,
             chunk_size=None, stats=None):
        plan = types.SimpleNamespace(clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                                     batch_size=expected_batch_size)
        if vary == "consecutive":   # the generator's seed is the step: seeds s, s + 1 are neighbouring steps
            seed, step_index = _RUN_SEED, int(generator.initial_seed())
        else:
            drawn = int(torch.randint(0, 2**62, (1,), generator=generator))
            seed, step_index = (_RUN_SEED, drawn) if vary == "step" else (drawn, run_seed_step(lr_segments))
        return plan_private_grad(model, loss_fn, batch, plan, seed=seed, step=step_index, lr_segments=lr_segments,
                                 chunk_size=chunk_size, stats=stats, basis=basis, per_layer_rules=per_layer_rules)
    return step


def statistical_check_count(train_config: dict) -> int:
    """How many statistical mechanism checks `mechanism_checks` runs for a run of this training config (the
    Bonferroni count of the mechanism share of the error budget): ``ENGINE_STATISTICAL_CHECKS`` (6) per engine, 7
    for a --public-subspace run, plus the sampler's two and the logged batch sizes (``RUN_STATISTICAL_CHECKS``)."""
    per_engine = ENGINE_STATISTICAL_CHECKS + (1 if train_config.get("subspace_dim") else 0)
    return per_engine * len(run_grad_engines(train_config)) + RUN_STATISTICAL_CHECKS


def mechanism_checks(run_dir, plan_doc, run_config: dict, *, alpha: float, seed: int = 0,
                     suite: str = "quick", run_doc=None) -> tuple[list[CheckResult], str]:
    """The mechanism checks of `dpdm audit` (each statistical one at ``alpha``), and what the run's own network
    in them was (``NetworkProblem.description``). Per engine the run's steps may have used (``run_grad_engines``:
    both), `dpdm train`'s own step (``training_private_grad``) is checked on the tiny float64 model (``check_engine``,
    ``check_run_seed`` for its noise under two run seeds, at a step before and one after an lr change, the
    run's own where it made one (``lr_change_segments``), ``check_fresh_noise`` for the noise of consecutive
    steps, from step 0 and around that lr change, and ``check_noise_never_repeats`` for noise repeated at any
    distance; ``check_subspace`` too for a --public-subspace run) and
    on the run's own network in float32 (``check_network``); then the Poisson sampler and the run folder against the
    plan (``check_run``)."""
    from dpdm.data import PoissonSampler

    plan = plan_doc.plan
    train_config = run_config.get("train") or {}
    subspace_dim = train_config.get("subspace_dim")
    engines = run_grad_engines(train_config)
    net = network_problem(run_config, seed=seed)
    segments = lr_change_segments(train_config)
    lr_labels = (f"step {run_seed_step()} of a run whose lr never changed",
                 f"step {run_seed_step(segments)} of a run with lr segments "
                 f"{', '.join(f'({a}, {b:g}, {c})' for a, b, c in segments)}"
                 + (" (the run's own)" if segments is not LR_CHANGE else ""))
    checks = []
    for engine in engines:
        rules = engine == "rules"
        step = training_private_grad(per_layer_rules=rules)
        found = check_engine(step, noise_multiplier=plan.noise_multiplier, alpha=alpha, seed=seed,
                             pairs=SUITES[suite]["noise_pairs"])
        found += check_run_seed(training_private_grad(per_layer_rules=rules, vary="run_seed"),
                                noise_multiplier=plan.noise_multiplier, alpha=alpha, seed=seed,
                                pairs=max(1, SUITES[suite]["noise_pairs"] // 2),
                                after_lr_change=training_private_grad(per_layer_rules=rules, vary="run_seed",
                                                                      lr_segments=segments), labels=lr_labels)
        # Neighbouring steps (two random steps of 2**62, as above, never are: h143 F1, stop 54), 1/8 of the noise
        # pairs per parity: a step that shares its noise with the next gives a variance of exactly 0.
        found += check_fresh_noise(training_private_grad(per_layer_rules=rules, vary="consecutive"),
                                   noise_multiplier=plan.noise_multiplier, alpha=alpha, seed=seed,
                                   pairs=max(1, SUITES[suite]["noise_pairs"] // 8),
                                   after_lr_change=training_private_grad(per_layer_rules=rules, vary="consecutive",
                                                                         lr_segments=segments),
                                   lr_change_step=int(segments[-1][0]))
        # Steps N apart that share their noise (a seed of `step % N`) pass the checks above from N of about 64: an
        # exact check of steps 0 to 2047 and 2**k (r2 F2, stop 54), outside the Bonferroni count (no false alarm).
        found += check_noise_never_repeats(training_private_grad(per_layer_rules=rules, vary="consecutive"),
                                           noise_multiplier=plan.noise_multiplier, seed=seed)
        found += check_network(step, net, noise_multiplier=plan.noise_multiplier, alpha=alpha, seed=seed,
                               pairs=SUITES[suite]["network_pairs"])
        if subspace_dim:
            found += check_subspace(lambda basis: training_private_grad(basis, per_layer_rules=rules),
                                    noise_multiplier=plan.noise_multiplier, alpha=alpha, seed=seed,
                                    pairs=SUITES[suite]["noise_pairs"])
        checks += [replace(c, name=f"{c.name} ({engine})") for c in found]
    checks += check_sampler(PoissonSampler, alpha=alpha, seed=seed)
    checks += check_run(run_dir, plan_doc, alpha=alpha, run_doc=run_doc)
    return checks, net.description


def suite_config(suite: str, plan, run_config: dict, *, seed: int = 0, **overrides) -> CanaryConfig:
    """The canary-audit configuration of a suite for a run (``overrides``: any CanaryConfig field)."""
    if suite not in SUITES:
        raise ValueError(f"suite={suite!r} must be one of {sorted(SUITES)}")
    s = SUITES[suite]
    steps = plan.steps if s["max_steps"] is None else min(plan.steps, s["max_steps"])
    train_cfg = run_config.get("train", {}) or {}
    cfg = CanaryConfig(
        num_canaries=s["num_canaries"],
        background_size=s["background_size"],
        steps=steps,
        noise_multiplicity=s["noise_multiplicity"],
        model=s["model"] or run_config.get("model", "small"),
        precond=run_config.get("precond", "edm"),
        label_dropout=float(train_cfg.get("label_dropout", 0.0)),
        seed=seed,
    )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("steps") is not None and overrides["steps"] > plan.steps:
        raise ValueError(f"steps={overrides['steps']!r} must be <= the plan's steps={plan.steps} (auditing more "
                         "steps than the plan allows would not test the plan)")
    return replace(cfg, **overrides) if overrides else cfg


def _load_run(run_dir: Path):
    from dpdm.checkpoint import load_checkpoint

    if not run_dir.is_dir():
        raise ValueError(f"run={str(run_dir)!r} must be a run folder (from `dpdm train`)")
    state = load_checkpoint(run_dir / "checkpoint.pt")
    _check_metrics(run_dir)
    return state["config"], state["ledger"]


def _check_metrics(run_dir: Path) -> None:
    """The run's metrics.csv, whose logged batch sizes a mechanism check tests, is a regular file with a complete
    row, each row as `dpdm train` writes it (``audits.mechanism.read_metrics``, strict: a step, a batch size
    and a private flag in every row): refused here, before any training, rather than a FAIL after the canary
    runs (exit 1 reads as a privacy bug). A last line cut short by a crash is no row and is left out (the check
    says so), as `dpdm train --resume` drops it. A FIFO would block the read for good."""
    from audits.mechanism import MetricsError, read_metrics

    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise ValueError(f"run={str(run_dir)!r}: metrics.csv "
                         f"{'is not a regular file' if os.path.lexists(path) else 'is missing'}; the audit tests "
                         "the batch sizes `dpdm train` logs there")
    try:
        rows, _ = read_metrics(path, strict=True)
    except MetricsError as e:
        raise ValueError(f"run={str(run_dir)!r}: {e}; the audit tests the batch sizes logged there") from None
    if not rows:
        raise ValueError(f"run={str(run_dir)!r}: metrics.csv has no rows; the audit tests the batch sizes "
                         "`dpdm train` logs there (audit a run that has logged a step)")


def run_audit(
    run_dir,
    out_dir,
    *,
    plan_path=None,
    suite: str = "quick",
    dataset: str | None = None,
    data_root=None,
    seed: int = 0,
    significance: float = 0.05,
    canary_overrides: dict[str, Any] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Audits the run in ``run_dir`` against ``plan_path`` (default: the run's own plan.json).

    Writes the report into ``out_dir`` and returns its JSON document. Raises ValueError for bad
    input (missing/corrupt run, tampered plan, unknown dataset, data that does not fit the run), and for a report
    in ``out_dir`` of an audit of another run or against another plan unless ``force`` (``check_out_dir``).
    ``warn``: told, before any training, where the canary stage cannot detect a violation of the claim whatever it
    finds (``canary_power``: known from the canary count, delta and the error budget), and what could.
    """
    import torch

    import accounting
    from dpdm.checkpoint import seed_given
    from dpdm.datasets import has_test_split, load_dataset

    t_start = time.perf_counter()
    try:
        check_out_dir(out_dir, create=False)
    except AuditInputError as e:
        raise AuditInputError(f"out={str(out_dir)!r}: {e}") from None
    # Everything up to the first training is input validation: a ValueError here is the user's (a missing
    # or corrupt run, a tampered plan, an unknown dataset, data that does not fit the run, bad settings).
    try:
        # Each statistical check gets a share of the budget; below MIN_SIGNIFICANCE those shares underflow.
        if not (MIN_SIGNIFICANCE <= significance < 1):
            raise ValueError(f"significance={significance!r} must be in [{MIN_SIGNIFICANCE:g}, 1)")
        run = Path(run_dir)
        try:
            run_config, ledger = _load_run(run)
        except ValueError as e:   # CheckpointError too; _load_run's own message names the run already
            raise ValueError(str(e) if str(e).startswith("run=") else f"run={str(run_dir)!r}: {e}") from None
        claimed_path = Path(plan_path) if plan_path is not None else run / "plan.json"
        try:
            doc = accounting.load_plan(claimed_path)
        except ValueError as e:   # PlanError
            raise ValueError(f"{'plan' if plan_path is not None else 'run'}="
                             f"{str(plan_path if plan_path is not None else run_dir)!r}: {e}") from None
        if plan_path is not None:
            # The run's own plan.json, which run_plan_matches compares with the claim, is refused here as it is
            # without --plan when it is missing or does not verify: before any training, not a FAIL after the
            # canary runs (exit 1 reads as a privacy bug; h74 F3, stop 44). One that verifies but differs from
            # the claim is that check's FAIL.
            try:
                run_doc = accounting.load_plan(run / "plan.json")
            except ValueError as e:   # PlanError
                raise ValueError(f"run={str(run_dir)!r}: {e}") from None
        else:
            run_doc = doc   # the claim is the run's own plan.json
        plan = doc.plan
        from dpdm.noise_scale import noise_scale_problem

        problem = noise_scale_problem(plan.noise_multiplier, plan.clip_norm)
        if problem:   # the canary runs train under the claim; the engine refuses it (r2 F1, stop 50): not a traceback
            raise ValueError(f"{'plan' if plan_path is not None else 'run'}="
                             f"{str(plan_path if plan_path is not None else run_dir)!r}: the claimed plan cannot be "
                             f"trained in float32: {problem}")
        cfg = suite_config(suite, plan, run_config, seed=seed, **(canary_overrides or {}))
        problem = coin_split_problem(draw_inclusion(cfg.num_canaries, cfg.seed), cfg.seed)
        if problem:   # before the mechanism checks and the canary trainings (canary_audit refuses them too)
            raise ValueError(problem)
        name = dataset or run_config.get("dataset")
        if not name:
            # a run of train() without dataset_name: the library caller passes dataset=, the CLI --dataset
            raise ValueError("the run does not name its dataset; give dataset= (--dataset) naming the data it was "
                             "trained on")
        # Before the data is read: a report written there earlier would have it refused; and a report of another
        # run or plan is kept (unless force) before minutes of training rather than replaced after them.
        identity = (report_identity(run), doc.digest)
        try:
            check_out_dir(out_dir, create=False, datasets={"the run's training data": run_config.get("dataset"),
                                                           "the audit's --dataset": dataset},
                          identity=identity, force=force)
        except AuditInputError as e:
            raise AuditInputError(f"out={str(out_dir)!r}: {e}") from None
        try:
            data = load_dataset(name, "train", data_root=data_root, download_option=False)
        except ValueError as e:   # DataError
            raise ValueError(f"dataset={name!r}: {e}") from None
        want = (run_config["img_channels"], run_config["img_resolution"], run_config["img_resolution"])
        if tuple(data.x.shape[1:]) != want:
            raise ValueError(f"dataset={name!r} has images of shape {tuple(data.x.shape[1:])}, the run was "
                             f"trained on {want}")
        if cfg.canary_kind == "ood":
            from audits.canary import ood_canary_problem

            problem = ood_canary_problem(cfg.num_canaries, want)
            if problem:
                raise ValueError(f"num_canaries={cfg.num_canaries}: {problem}")
        num_classes = run_config["num_classes"]
        if num_classes and data.y is None:
            raise ValueError(f"dataset={name!r} has no labels, but the run is class-conditional "
                             f"({num_classes} classes)")
        if num_classes and len(data.y) and int(data.y.max()) >= num_classes:
            raise ValueError(f"dataset={name!r} has labels up to {int(data.y.max())}, but the run has "
                             f"{num_classes} classes")
        pool_x = pool_y = None
        if cfg.canary_kind == "mislabelled":
            if not has_test_split(name):
                # A path dataset is one split: its "test" split is the training data the background is drawn
                # from, so the canaries would not be the held-out images `canary_audit` promises (h91 F5).
                raise ValueError(f"canary_kind='mislabelled' draws its canaries from held-out images, and "
                                 f"dataset={name!r} has no held-out split; use canary_kind='ood'")
            held = load_dataset(name, "test", data_root=data_root, download_option=False)
            pool_x, pool_y = held.x, held.y
    except AuditInputError:
        raise
    except ValueError as e:
        raise AuditInputError(str(e)) from e
    try:   # the inputs are good: now the folder is made (0700)
        check_out_dir(out_dir, identity=identity, force=force)
    except AuditInputError as e:
        raise AuditInputError(f"out={str(out_dir)!r}: {e}") from None

    train_config = run_config.get("train") or {}
    statistical_checks = statistical_check_count(train_config)
    alpha_check = significance * MECHANISM_SHARE / statistical_checks
    alpha_bounds = significance * (1 - MECHANISM_SHARE)
    # A canary run of fewer steps than the plan is held to the epsilon of THAT run (the plan's
    # per-step mechanism composed over cfg.steps), which is smaller and gives the audit more power.
    canary_steps = int(cfg.steps or plan.steps)
    canary_claim = min(doc.epsilon, accounting.epsilon_spent(plan, canary_steps))
    if warn is not None:
        # The most the canary stage can certify depends on the canary count, the coins, delta and the level alone:
        # where it is at or below the claim, no attack result can make it FAIL, and no more canaries may help either
        # (the one-run bound peaks). Said now, not after minutes (hours with --suite full) of training; a warning,
        # not a refusal: the mechanism checks still test the step.
        level = alpha_bounds / len(cfg.attacks)
        ceiling = coins_ceiling(cfg.num_canaries, plan.delta, level, cfg.seed)   # coins refused above
        if ceiling <= canary_claim:
            power = canary_power(plan, cfg.num_canaries, canary_steps, canary_claim, level=level, ceiling=ceiling,
                                 seed=cfg.seed)
            warn(f"with {cfg.num_canaries} canaries this audit cannot certify more than epsilon "
                 f"{epsilon_text(ceiling, bound='lower')}, so its canary runs cannot detect a violation of the claim "
                 f"{epsilon_text(canary_claim)} (the epsilon of the {canary_steps}-step canary run) and it ends "
                 f"INCONCLUSIVE unless a mechanism check fails; {power_advice(power)}")

    def stage(name):
        if progress is not None:
            progress(name, 0, 1)

    stage("mechanism checks")
    t0 = time.perf_counter()
    checks, network = mechanism_checks(run, doc, run_config, alpha=alpha_check, seed=seed, suite=suite,
                                       run_doc=run_doc)
    t_checks = time.perf_counter() - t0

    private = bool(ledger["private"])
    torch_threads = torch.get_num_threads()
    failed = [c for c in checks if not c.passed]
    reasons = [f"mechanism check {c.name} failed: {c.detail}" for c in failed]
    t0 = time.perf_counter()
    try:
        canary = canary_audit(
            plan, data.x, data.y if num_classes > 0 else None, num_classes, cfg,
            claimed_epsilon=canary_claim, significance=alpha_bounds, private=private,
            pool_x=pool_x, pool_y=pool_y, progress=progress,
        )
    except CanaryNotFinite as e:   # the step under test made them so: FAIL, with a report (h143 F2, stop 54)
        canary = None
        reasons.append(f"canary audit: {e}; no epsilon lower bound was computed")
    except Exception as e:   # noqa: BLE001 - after a failed check, a crash of the broken step must not lose the FAIL
        if not failed:
            raise
        canary = None
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        reasons.append(f"canary audit: stopped by {type(e).__name__}: {first[:300]}, after the failed mechanism "
                       "checks above; no epsilon lower bound was computed")
    t_canary = time.perf_counter() - t0

    if canary is None:
        verdict = "FAIL"
    elif canary["verdict"] == "FAIL":
        verdict = "FAIL"
        reasons += canary["reasons"]
    elif failed:
        verdict = "FAIL"
    elif canary["verdict"] == "INCONCLUSIVE":
        verdict = "INCONCLUSIVE"
        reasons += canary["reasons"]
    else:
        verdict = "PASS"
        reasons += canary["reasons"]
    audited = _what_was_audited(plan, canary, cfg, private, train_config, plan_epsilon=doc.epsilon,
                                network=network)
    doc_out = {
        "format": "dpdm.audit/1",
        "verdict": verdict,
        "exit_code": EXIT_CODES[verdict],
        "reasons": reasons,
        "run": str(run),
        "run_folder_sha256": identity[0],   # whose report this is, for a later audit's --out (check_out_dir)
        "claimed_plan": {"path": str(claimed_path), "digest": doc.digest, "epsilon": doc.epsilon,
                         "certified_by": doc.certified_by, **plan.mechanism_fields()},
        "run_ledger": {k: ledger[k] for k in ("plan_digest", "plan_steps", "steps_done", "epsilon_spent", "delta", "private")},
        "run_config": {**{k: run_config.get(k) for k in ("model", "precond", "img_resolution", "img_channels",
                                                          "num_classes", "dataset")},
                       "seed_given": seed_given(run_config)},
        "suite": suite,
        "dataset": name,
        "what_was_audited": audited,
        "error_budget": {
            "significance": significance,
            "mechanism_checks": {"share": significance * MECHANISM_SHARE, "per_check": alpha_check,
                                 "statistical_checks": statistical_checks},
            "epsilon_bounds": {"share": alpha_bounds, "per_attack": alpha_bounds / len(cfg.attacks) if canary is None
                               else canary["significance_per_attack"],
                               "attacks": list(cfg.attacks),
                               "note": "each one-run bound splits its share over its grid of guess counts"},
        },
        "mechanism_checks": [c.to_dict() for c in checks],
        # None where the canary audit stopped (reasons say why): no scores, bounds or plots.
        "canary_audit": None if canary is None else {k: v for k, v in canary.items()
                                                     if k not in ("scores", "included")},
        "timing_s": {"mechanism_checks": t_checks, "canary_audit": t_canary,
                     "total": time.perf_counter() - t_start},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "torch_threads": torch_threads},
    }
    # Finite numbers only (a --no-dp run's ledger spends epsilon inf): report.json and --json must be
    # RFC 8259 JSON, which has no Infinity or NaN. Non-finite values become null (None).
    doc_out = _jsonable(doc_out)
    write_report(doc_out, canary, out_dir)
    return doc_out


def _what_was_audited(plan, canary, cfg: CanaryConfig, private: bool, train_config: dict | None = None, *,
                      plan_epsilon: float | None = None, network: str | None = None) -> list[str]:
    train_config = train_config or {}
    lines = [
        AUDIT_SCOPE,
        f"Per-step mechanism of the plan: Poisson sampling at q={plan.sample_rate:.6g}, clip norm "
        f"C={plan.clip_norm:g}, Gaussian noise multiplier sigma={plan.noise_multiplier:.6g}"
        + ("" if private else " -- but the run was trained WITHOUT DP, so the audited training adds no noise")
        + ".",
    ]
    if canary is None:   # the canary audit stopped (the reasons say where): what was meant to run
        lines.append(f"Canary training: {cfg.num_canaries} canaries, up to {cfg.steps or plan.steps} of the plan's "
                     f"{plan.steps} steps, network '{cfg.model}'; it stopped before any epsilon lower bound.")
    t = canary["training"]["target"] if canary is not None else {}
    claim = canary["claimed_epsilon"] if canary is not None else None
    lines += [] if canary is None else [
        f"Canary training: {t['steps']} of the plan's {plan.steps} steps on {t['dataset_size']} examples "
        f"({canary['canaries']['background']} background + {canary['canaries']['included']} included "
        f"canaries; the plan's dataset has {plan.dataset_size}), expected batch {t['expected_batch_size']:.1f} "
        f"(the update's divisor: {t.get('normalizer', 'q * dataset size')}, fixed before the coins are drawn), "
        f"K={t['noise_multiplicity']} noise draws (plan: {plan.noise_multiplicity}; privacy-neutral), "
        f"network '{cfg.model}'; each step is `dpdm train`'s private step (plan_private_grad) at "
        f"C={t['clip_norm']:g}, sigma={t['noise_multiplier']:.6g} (the positive control: sigma 0).",
        f"Claimed epsilon of the audit: {epsilon_text(claim)}, the epsilon of the {t['steps']}-step canary run "
        f"(the plan's per-step mechanism composed over {t['steps']} steps, by the plan's accountant)"
        + ("" if plan_epsilon is None else
           f"; the plan's epsilon over its {plan.steps} steps is {epsilon_text(plan_epsilon)}")
        + ". The verdict compares the epsilon lower bounds with the canary run's epsilon.",
    ]
    sigmas = f"sigma={plan.noise_multiplier:g} and {second_noise_multiplier(plan.noise_multiplier):g}"
    lines.append(
        f"The mechanism checks ran `dpdm train`'s private step (plan_private_grad) with each per-example gradient "
        f"engine, {' and '.join(run_grad_engines(train_config))} (the checkpoint records the engine of the run's "
        "last start only, and --grad-engine may change on a resume, or auto pick another, so either may have "
        "computed the run's steps): (1) on the audit's own tiny float64 model (Linear and SiLU layers, 48 "
        f"examples): per-example gradients, K averaging, clipping, sensitivity replay, noise variance at {sigmas}, "
        "noise once per step, and the noise of one step under two run seeds (independent draws: noise that ignored "
        "the run's secret seed would be the same in every run), at a step before and one after an lr change ("
        + ("the run's own last one" if lr_change_segments(train_config) is not LR_CHANGE else
           f"one at step {LR_CHANGE[-1][0]}: the run records none")
        + "), and the noise of consecutive steps of one run (steps s and s + 1 from step 0, of both parities, and on "
        "either side of that lr change: independent draws, so no two neighbouring steps share their noise), and "
        f"the noise alone of steps 0 to {REPEAT_STEPS - 1} and 2**k up to 2**{REPEAT_POWERS} (no two equal or "
        "opposite: noise repeated every N steps); "
        + (f"(2) on {network}, a fresh initialization (not the run's weights): per-example gradients per parameter "
           "tensor against a float64 autograd loop, clipping bound, sensitivity replay, and the float32 noise at "
           f"{sigmas}, once per step." if network else "(2) not on the run's own network."))
    lines.append(LOOP_NOT_AUDITED)
    if canary is not None and t["dataset_size"] != plan.dataset_size:
        lines.append(
            f"The canary run trains on {t['dataset_size']} examples instead of the plan's {plan.dataset_size} at the "
            "same sample rate: the per-example guarantee depends only on q, sigma, C and the number of steps."
        )
    if canary is not None and t["steps"] < plan.steps:
        lines.append(
            "This is a shorter run under the same per-step mechanism: it composes fewer of the plan's "
            f"steps ({t['steps']} on {t['dataset_size']} examples), so its true epsilon is at most "
            f"{epsilon_text(claim)}, at most the plan's. An epsilon lower bound above that shorter run's epsilon "
            "therefore proves a violation; a bound below it certifies nothing about the steps that were not run."
        )
    if train_config.get("subspace_dim"):
        lines.append(
            f"The run added its noise in a {train_config['subspace_dim']}-dimensional subspace of public gradients "
            f"({train_config.get('subspace_data')!r}, --public-subspace). The mechanism checks test that step "
            "(subspace_* checks, on the audit's own tiny float64 model and basis; the checks on the run's network "
            "add the noise in all parameters); the canary training adds its noise "
            "in all parameters, so the epsilon lower bounds do not exercise the subspace.")
    if canary is not None:
        lines.append(f"Threat model: {canary['threat_model']}.")
    return lines


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _fmt(x, nd=4, *, bound: str | None = None) -> str:
    """A figure of the report to `nd` significant digits: to nearest, or with `bound` an epsilon rounded away
    from the side it bounds (`epsilon_text`: "upper" for a guarantee, up, as on every screen and in the README;
    "lower" for an audit's lower bound, down). To nearest, a certified 7.99918 read "epsilon spent 7.999" beside
    the same report's 8 (h103 F2)."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.{nd}g}" if bound is None else epsilon_text(x, nd, bound=bound)
    return str(x)


# Plot files this module writes; plots of an earlier run in the same folder that this run did not
# write are removed, so that the folder holds one run's report.
_PLOT_NAME = re.compile(r"^(roc|roc_log|hist|guesses)_(target|control)_[A-Za-z0-9]+\.png$")
# The staging folder of `write_report` (`tempfile.mkdtemp(prefix=".report-")`), and the age (seconds) at which one is
# a killed audit's leftover: a report is staged in seconds, and a concurrent audit's stage is younger.
_STAGE_NAME = re.compile(r"\.report-[a-z0-9_]{8}")   # mkdtemp's 8 characters: not a user's `.report-drafts`
_STALE_STAGE_SECONDS = 3600


def write_report(doc: dict[str, Any], canary: dict[str, Any] | None, out_dir) -> Path:
    """Writes report.md, report.json, scores.npz and the PNG plots into ``out_dir`` (report.md and report.json alone
    where ``canary`` is None: the canary audit stopped, and the verdict is FAIL).

    All or nothing, with report.json as the commit marker: every file is first written and fsynced in
    a staging folder inside ``out_dir`` (an interruption there leaves an earlier report as it was); then
    the earlier report.json is removed, the new files replace the old ones (``os.replace``), plots of an
    earlier run that this run did not write are removed, and report.json is written last. So a
    report.json always belongs to the files beside it. The ROC curves and the plots' ceilings are drawn
    at the epsilon the verdict uses (the canary run's). Every file is written 0600 whatever the umask, and the
    staging folders that killed audits left in ``out_dir`` are removed first (`_remove_stale_stages`).
    """
    from accounting.plan import fsync_folder   # lazily, as before: accounting imports the accountants

    out = Path(out_dir)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(out, 0o700)   # the canary scores and the noise-free control's figures (README: "What stays private")
    _remove_stale_stages(out)
    delta = doc["claimed_plan"]["delta"]
    stage = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        plots: dict[str, list[str]] = {}
        if canary is not None:
            included = np.asarray(canary["included"], dtype=bool)
            claim = float(canary["claimed_epsilon"])
            arrays = {"included": included}
        for run_name, per_attack in (canary["scores"] if canary is not None else {}).items():
            for attack, s in per_attack.items():
                s = np.asarray(s, dtype=np.float64)
                arrays[f"{run_name}_{attack}"] = s
                ins, outs = s[included], s[~included]
                tag = f"{run_name}_{attack}"
                files = []
                if ins.size and outs.size:  # ROC and histograms need both classes
                    files += [
                        plot_roc(ins, outs, stage / f"roc_{tag}.png", epsilon=claim, delta=delta,
                                 title=f"ROC: {attack} attack, {run_name}"),
                        plot_roc(ins, outs, stage / f"roc_log_{tag}.png", epsilon=claim, delta=delta, log=True,
                                 title=f"ROC (log-log): {attack} attack, {run_name}"),
                        plot_score_histogram(ins, outs, stage / f"hist_{tag}.png", bins=30,
                                             title=f"scores: {attack} attack, {run_name}"),
                    ]
                grid = canary["attacks"][attack][run_name]["one_run"]["grid"]
                files.append(plot_epsilon_vs_guesses([g[0] for g in grid], [g[2] for g in grid],
                                                     stage / f"guesses_{tag}.png", claimed_epsilon=claim,
                                                     title=f"one-run bound vs guesses: {attack}, {run_name}"))
                plots[tag] = [f.name for f in files]
        doc["plots"] = plots
        doc["files"] = {"markdown": "report.md", "json": "report.json"}
        if canary is not None:
            doc["files"]["scores"] = "scores.npz"
            with open(stage / "scores.npz", "wb") as f:
                np.savez(f, **arrays)
        _write_text(stage / "report.md", _markdown(doc))
        text = json.dumps(_jsonable(doc), indent=2, allow_nan=False, default=_json_default) + "\n"
        _write_text(stage / "report.json", text)
        for f in stage.iterdir():
            # 0600 as the run's metrics.csv and config.json: a copy into another folder (`cp audit/* shared/`)
            # keeps the mode, and matplotlib makes the plots with the umask's (h108 F1, stop 50).
            os.chmod(f, 0o600)
            _fsync_file(f)

        # Commit: no report.json while the files change, then report.json last.
        (out / "report.json").unlink(missing_ok=True)
        fsync_folder(out)
        written = {f for names in plots.values() for f in names} | set(doc["files"].values()) - {"report.json"}
        for name in sorted(written):
            os.replace(stage / name, out / name)
        for f in out.iterdir():
            if (_PLOT_NAME.match(f.name) or f.name == "scores.npz") and f.name not in written and f.is_file():
                f.unlink()   # an earlier run's
        fsync_folder(out)
        os.replace(stage / "report.json", out / "report.json")
        fsync_folder(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def _json_default(v):
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def _remove_stale_stages(out: Path) -> None:
    """Removes the staging folders of `write_report` in `out` older than `_STALE_STAGE_SECONDS`: an audit killed
    (SIGKILL, out of memory) while writing its report leaves one, which no later audit replaces, holding the inclusion
    coins and the noise-free control's canary scores (h108 N3, stop 50). A younger one may be a concurrent audit's and
    stays. Best effort, as the eval cache's `_remove_stale_temp_files`: what cannot be removed stays."""
    from dpdm.report_utils import stale_entries

    for path, st in stale_entries(out, _STAGE_NAME, _STALE_STAGE_SECONDS):
        if stat.S_ISDIR(st.st_mode) and _holds_report_files(path):
            shutil.rmtree(path, ignore_errors=True)


def _holds_report_files(folder: str) -> bool:
    """Whether `folder` holds nothing but files `write_report` stages (report.md/json, scores.npz, its plots): a
    folder of the user's that happens to match the stage's name is left alone (r1 F2, stop 50)."""
    try:
        with os.scandir(folder) as entries:
            return all(entry.is_file(follow_symlinks=False)
                       and (entry.name in ("report.md", "report.json", "scores.npz") or _PLOT_NAME.fullmatch(entry.name))
                       for entry in entries)
    except OSError:
        return False


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _tpr_cell(t: dict | None, num_out: int) -> str:
    """TPR at a target FPR, or n/a when n_out * FPR < 10 (research/audits.md section 5.5)."""
    if t is None:
        return "n/a"
    if not t.get("enough_negatives"):
        return f"n/a ({num_out} out)"
    return _fmt(t["tpr"], 3)


def _markdown(doc: dict[str, Any]) -> str:
    from dpdm.checkpoint import SEED_GIVEN_NOTE

    plan = doc["claimed_plan"]
    can = doc["canary_audit"]
    L = [f"{_MARKDOWN_TITLE} **{doc['verdict']}**", ""]
    L += [f"- {r}" for r in doc["reasons"]] + [""]
    L += ["PASS means *no violation detected at the stated power*; it does not verify privacy. No verdict is "
          "about the run's weights, which the audit never reads: it tests dpdm's private step and the plan's "
          "mechanism on trainings of its own (see What was audited).", ""]
    if doc["verdict"] == "INCONCLUSIVE":
        L += ["INCONCLUSIVE: every mechanism check passed and no epsilon lower bound exceeded the claim, but the "
              "canary attacks had too little power to detect a violation of it (the reasons above say why).", ""]
    L += ["## Claim under test", "",
          "| field | value |", "|---|---|"]
    canary_steps = can["training"]["target"]["steps"] if can is not None else None
    claim_label = f"epsilon of the {canary_steps}-step canary run"
    for k in ("epsilon", "delta", "sample_rate", "noise_multiplier", "clip_norm", "steps", "batch_size",
              "noise_multiplicity", "certified_by", "digest", "path"):
        label = f"epsilon (the plan's, over its {plan.get('steps')} steps)" if k == "epsilon" else k
        L.append(f"| {label} | {_fmt(plan.get(k), 8, bound='upper' if k == 'epsilon' else None)} |")
        if k == "epsilon" and can is not None:
            L.append(f"| **{claim_label}** (what the verdict compares against) | "
                     f"**{_fmt(can['claimed_epsilon'], 8, bound='upper')}** |")
    L.append(f"| dataset | {plan['dataset']['name']} ({plan['dataset']['size']} examples) |")
    led = doc["run_ledger"]
    spent = led["epsilon_spent"]
    spent = "infinite (trained without DP)" if spent is None and not led["private"] else _fmt(spent, bound="upper")
    L += ["", f"Run `{doc['run']}`, as its ledger records it: {led['steps_done']}/{led['plan_steps']} steps, "
          f"private={led['private']}, epsilon spent {spent}, delta {_fmt(led['delta'])}."
          + (f" It was {SEED_GIVEN_NOTE}." if led["private"] and doc["run_config"].get("seed_given") else ""), ""]
    L += ["## What was audited", ""] + [f"- {s}" for s in doc["what_was_audited"]] + [""]
    L += ["## Mechanism checks", "", "| check | passed | statistic | p-value | detail |", "|---|---|---|---|---|"]
    for c in doc["mechanism_checks"]:
        L.append(f"| {c['name']} | {'PASS' if c['passed'] else '**FAIL**'} | {_fmt(c['statistic'])} | "
                 f"{_fmt(c['p_value'], 3)} | {c['detail'].replace('|', chr(92) + '|')} |")
    b = doc["error_budget"]
    L += ["", "## Error budget", "",
          f"Total significance {b['significance']:g} (Bonferroni): {b['mechanism_checks']['share']:g} over "
          f"{b['mechanism_checks']['statistical_checks']} statistical mechanism checks "
          f"({b['mechanism_checks']['per_check']:g} each); {b['epsilon_bounds']['share']:g} over the epsilon "
          f"bounds of {len(b['epsilon_bounds']['attacks'])} attacks ({b['epsilon_bounds']['per_attack']:g} each, "
          f"{b['epsilon_bounds']['note']}).", ""]
    if can is None:   # the canary audit stopped (h143 F2, stop 54)
        L += ["## Epsilon lower bounds", "", "None: the canary audit stopped before any (the reasons above say where).",
              ""]
        tm = doc["timing_s"]
        L += [f"Timing: mechanism checks {tm['mechanism_checks']:.0f} s, canary audit {tm['canary_audit']:.0f} s, "
              f"total {tm['total']:.0f} s. Everything above: `report.json`.", ""]
        return "\n".join(L)
    L += ["## Epsilon lower bounds (canary audit, one-run bound of Steinke, Nasr & Jagielski 2023)", "",
          f"{can['canaries']['count']} {can['canaries']['kind']} canaries, {can['canaries']['included']} included "
          f"(fair coins, seed {can['canaries']['seed']}); claimed epsilon: {epsilon_text(can['claimed_epsilon'])}, the "
          f"{claim_label} (the plan's epsilon over its {plan.get('steps')} steps: {epsilon_text(plan['epsilon'])}); "
          f"largest certifiable with this setup {epsilon_text(can['max_certifiable_epsilon'], bound='lower')}.", "",
          "| attack | model | epsilon lower bound | alpha spent | guesses | correct | AUC [CI] | TPR@1%FPR | "
          f"TPR@0.1%FPR | claimed ({claim_label}) | violation |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    # One number of digits for the table, at which every bound above the claim reads so (`compared_digits`).
    digits = max((compared_digits(rep["one_run"]["epsilon"], can["claimed_epsilon"])
                  for per in can["attacks"].values() for rep in per.values()), default=4)
    for attack, per in can["attacks"].items():
        for run_name, rep in per.items():
            o = rep["one_run"]
            if rep.get("auc") is None:
                auc_text = "n/a (one class only)"
            else:
                auc_text = (f"{_fmt(rep['auc'], 3)} [{_fmt(rep['auc_interval'][0], 3)}, "
                            f"{_fmt(rep['auc_interval'][1], 3)}]")
            tprs = {t["target_fpr"]: t for t in rep.get("tpr_at_fpr") or []}
            L.append(f"| {attack} | {run_name}{' (noise off)' if run_name == 'control' else ''} | "
                     f"{epsilon_text(o['epsilon'], digits, bound='lower')} | {_fmt(o['significance'])} | "
                     f"{o['num_guesses']} | {o['num_correct']} | "
                     f"{auc_text} | {_tpr_cell(tprs.get(0.01), rep['num_out'])} | "
                     f"{_tpr_cell(tprs.get(0.001), rep['num_out'])} | {epsilon_text(can['claimed_epsilon'], digits)} | "
                     f"{'n/a (control)' if run_name == 'control' else ('**yes**' if rep['violation'] else 'no')} |")
    L += ["", "The Clopper-Pearson bound needs one independent training run per score; with one run and "
          "many canaries only the one-run bound is valid, so it is the only epsilon bound used for the verdict.",
          "AUC intervals are DeLong (asymptotic, descriptive). TPR at an FPR is n/a when there are too few "
          "excluded canaries for it (fewer than 10 expected false positives).", ""]
    L += ["## Plots", ""]
    for tag, files in doc["plots"].items():
        L.append(f"### {tag.replace('_', ' ')}")
        L += [f"![{f}]({f})" for f in files] + [""]
    L += ["## Training", "", "| model | noise | steps | dataset size | expected batch | K | seconds |",
          "|---|---|---|---|---|---|---|"]
    for run_name, t in can["training"].items():
        L.append(f"| {run_name} | {t['noise_multiplier']:.4g} | {t['steps']} | {t['dataset_size']} | "
                 f"{t['expected_batch_size']:.1f} | {t['noise_multiplicity']} | {t['seconds']:.0f} |")
    tm = doc["timing_s"]
    L += ["", f"Timing: mechanism checks {tm['mechanism_checks']:.0f} s, canary audit {tm['canary_audit']:.0f} s, "
          f"total {tm['total']:.0f} s. Raw scores and inclusion bits: `scores.npz`; everything above: `report.json`.", ""]
    return "\n".join(L)
