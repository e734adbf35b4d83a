"""`dpdm demo` (and `make demo`): the whole path on the embedded mnist5k data.

plan (eps 10) -> public warm start -> train -> sample -> eval -> audit -> report.md / report.html, sized
to finish within 15 minutes on 2 CPU cores. The demo plan is smaller than a quality run (see
benchmarks/quality.py): it shows the path and the guarantees, not the best images dpdm can make.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import click

from cli._common import PathOption, info, resolve_device, warn
from cli.errors import EXIT_AUDIT_FAIL
from dpdm.cpu import keep_freed_memory_if_asked
from dpdm.report_utils import epsilon_text

# The demo's plan: mnist5k (N = 4000), expected batch 1024 (sample rate 0.256), 30 steps, K = 1, eps 10 at
# delta 1e-5 (noise multiplier 1.0): about 4 minutes of private training on 2 cores, after a public warm
# start (below) of about 5. benchmarks/quality.py trains longer, with K > 1, for quality.
# K = 1 because the demo must fit 15 minutes on 2 cores, and at its size K = 2 bought less than it cost: on
# a slow 2-core AMD EPYC this demo with a K = 2 plan took 955 s (private phase 387 s). From the same warm
# start (400 public steps), the held-out v-loss of the EMA on the 1,000 mnist5k test images (4 draws each)
# was 0.1486 with K = 2 (387 s), 0.1505 with K = 1 (243 s) and 0.1498 with K = 2 at expected batch 768
# (327 s); the public warm start's length mattered more: 300 steps then batch 768 at K = 2 gave 0.1539 (an
# 804 s demo, CNN 64.3%, classifier FD 35.3 against 70.6% and 27.8 for the 955 s one).
DEMO = dict(epsilon=10.0, delta=1e-5, batch_size=1024, steps=30, noise_multiplicity=1, clip_norm=1.0)
DEMO_MODEL = "small"
DEMO_PHYSICAL_BATCH = 256   # examples per vmap chunk: memory only, the noise is still added once per step
# The public warm start: the generator first trains WITHOUT privacy on digits28-aug (scikit-learn's
# digits, re-framed like MNIST and distorted; no mnist5k image, so no privacy budget), and the private
# run starts from its EMA. Measured with 400 public steps: whole digits in the grid where the cold start
# (300 steps of batch 128, 332 s of training against 482 s) drew blobs; classifier FD 20.9 against
# 46.8, precision / recall 0.87 / 0.68 against 0.79 / 0.50; but no better downstream classifiers at
# this size (CNN 68.0% against 72.7%, one seed each; README, issue 4 note). 300 steps at K 2 then: on a
# 2-core AMD EPYC the 400-step demo took 815 s of the 15 minutes it must fit (922 s before the demo kept
# freed memory); 300 take 755 s there, with FD 28.8 against 24.6 and CNN 70.3% against 77.0% and 71.0%
# (secret seeds: one run says little) and a grid of digits still.
# K 1 for the public run: it has no clipping for K to help with, and K 2 doubled its cost for nothing
# (2-core AMD EPYC, held-out v-loss as above: 300 steps at K 2 took 411 s for 0.1880, at K 1 210 s for
# 0.1870; 450 steps at K 1, 314 s for 0.1800). 400 steps at K 1: a better start than 300 at K 2 (0.1806)
# in three quarters of the time.
DEMO_PUBLIC = "digits28-aug"
DEMO_PUBLIC_STEPS = 400
DEMO_PUBLIC_BATCH = 128
DEMO_PUBLIC_K = 1
# v-prediction and lr 1e-3: what the quality runs found best at mnist5k's scale (with the paper's EDM
# settings the demo's digits had no global shape; benchmarks/quality.py, issue 4 note). Guidance 1: from
# the warm start (500 public steps, 30-epoch evaluation) it draws the cleaner grid and FD 19 against 33,
# at CNN 75% against 78% for 0, and 93% of its samples are read as their label by the reference CNN
# (77% for 0); the old cold demo's 300-step run also preferred 1 (CNN 66.9% against 54.8%, FD 46 against
# 85). After 1407 steps (benchmarks/quality.py) 0 is better.
DEMO_PRECOND = "v"
DEMO_LR = 1e-3
DEMO_GUIDANCE = 1.0
DEMO_SAMPLES = 1000
DEMO_SAMPLER_STEPS = 30
# The paper's 50 epochs: at 8-10 epochs even 1,000 REAL training images scored 55% (CNN) under this
# protocol, the same as the cold demo's samples, so the figures said nothing. The report also shows the
# same CNN trained on DEMO_SAMPLES real training images: what these figures can reach at this size.
DEMO_EVAL_EPOCHS = {"logreg": 50, "mlp": 50, "cnn": 50}


# Checked before the folder is claimed (10**30 public steps removed an earlier demo's outputs, then crashed): a
# demo of more steps than this is no demo (the default is 30 private and 400 public steps).
MAX_DEMO_STEPS = 100_000


@click.command()
@click.option("--out", "out_dir", type=PathOption(file_okay=False), default="demo_out", show_default=True)
@click.option("--steps", type=click.IntRange(min=1, max=MAX_DEMO_STEPS), default=DEMO["steps"], show_default=True,
              help="DP-SGD steps of the demo plan.")
@click.option("--public-steps", type=click.IntRange(min=0, max=MAX_DEMO_STEPS), default=DEMO_PUBLIC_STEPS,
              show_default=True,
              help=f"Non-private warm-start steps on the public {DEMO_PUBLIC} (0: start the private run cold).")
@click.option("--device", default="auto", show_default=True)
@click.option("--skip-audit", is_flag=True, help="Stop after eval.")
def demo(out_dir, steps, public_steps, device, skip_audit):
    """Plan, train, sample, evaluate and audit on mnist5k; writes a report and prints its path.

    Exits 1 when the audit says FAIL (a failed mechanism check is a privacy bug), 0 otherwise: at the
    demo's epsilon 10 the quick suite's 200 canaries can only give INCONCLUSIVE, which the report explains."""
    path, verdict = run_demo(Path(out_dir), steps=steps, public_steps=public_steps, device=resolve_device(device),
                             audit=not skip_audit)
    click.echo(os.path.abspath(path))   # right for the user's shell after `make -C DIR demo` too (h136 N6)
    if verdict == "FAIL":
        return EXIT_AUDIT_FAIL
    return 0


# Written into the demo's folder before anything else: a rerun recognises the folder as the demo's own even
# when the run before it stopped before its report.
DEMO_MARK = ".dpdm-demo"
# What a run of the demo writes into its folder, and a rerun replaces (run/ and public/ start afresh).
DEMO_OUTPUTS = ("plan.json", "run", "public", "model.pt", "samples.npz", "grid.png", "privacy_curve.png", "audit",
                "report.md", "report.html")


# Bytes that the deepest file the demo writes adds to the path of its mark, and more: a plot of the audit staged as
# `audit/.report-XXXXXXXX/roc_log_control_ATTACK.png`, the temporary file of `run/checkpoint.pt`.
_DEMO_DEPTH = 112


def _claim_demo_folder(out: Path) -> None:
    """Makes `out` the demo's folder: a new or empty folder, or one an earlier demo marked as its own. Anything
    else is refused before any work (exit 2), since the demo replaces what it writes there (a run/ folder of the
    user's included). The outputs of an earlier demo are removed: it starts afresh."""
    from cli.errors import BadInput

    from dpdm.report_utils import output_parent_problem, path_length_problem

    # Before any lookup: `out.exists()` of a name past NAME_MAX (or a path past PATH_MAX) raised ENAMETOOLONG, a
    # runtime failure (exit 4) where `dpdm train` says the name is too long (s56 outwalk F2).
    problem = path_length_problem(out / DEMO_MARK, room=_DEMO_DEPTH)
    if problem:
        raise BadInput(f"--out {str(out)!r}: {problem}")
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {str(out)!r} is not a folder")
    problem = None if out.is_dir() else output_parent_problem(out / DEMO_MARK)
    if problem:   # a file or a broken link in the way, a folder that takes no files (/proc)
        raise BadInput(f"--out {str(out)!r}: {problem}")
    if out.is_dir() and any(out.iterdir()):
        if not (out / DEMO_MARK).is_file():
            report = out / "report.md"
            copied = report.is_file() and report.read_text(encoding="utf-8", errors="replace").startswith(
                "# dpdm demo:")
            # A demo's report without the mark is a copy among a project's files (another plan's run/ and
            # plan.json), or a demo from before the mark: either way not the demo's to replace.
            raise BadInput(f"--out {str(out)!r} holds "
                           + ("a demo's report.md but no .dpdm-demo mark (a copy, or a demo older than the mark)"
                              if copied else "files of something other than an earlier demo")
                           + f"; the demo writes {', '.join(DEMO_OUTPUTS)} there, replacing them: choose a new or "
                           "empty folder")
        for name in DEMO_OUTPUTS:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / DEMO_MARK).write_text("written by `dpdm demo`: a rerun replaces this folder's demo outputs\n")
    except OSError as e:
        raise BadInput(f"--out {str(out)!r}: cannot write there ({e.strerror or e})") from None


def _check_cache_folder() -> Path:
    """The folder the eval stage caches its reference CNN in ($DPDM_CACHE, else ~/.cache/dpdm), checked before any
    work as `dpdm eval` checks its --cache-dir: a file in its way or a read-only home was a traceback, exit 4,
    after the ten minutes of training and sampling, and no report."""
    from cli.errors import BadInput

    from dpdm.evaluate import cache_folder_problem

    folder, problem = cache_folder_problem(read_only_ok=True)   # a read-only cache is read, as `dpdm eval` reads it
    if problem:
        raise BadInput(f"the cache folder of the eval stage {str(folder)!r} ($DPDM_CACHE, else ~/.cache/dpdm): "
                       f"{problem}; set DPDM_CACHE to a writable folder")
    return folder


def _home_relative(path: str | Path) -> str:
    """`path` as ~/... where it lies in the home folder: the report is for sharing, the user's name is not. A
    relative path (the default --out demo_out) stays as given: it names no home folder."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    try:
        home = Path.home().resolve()
        if home == Path(home.anchor) or not home.is_dir():   # HOME=/ (CI runners, service accounts) made every path
            return str(path)                                 # ~/..., wrong for any reader (h114 N3, stop 51)
        return str(Path("~") / path.resolve().relative_to(home))   # whole folders: /home/al is not in /home/alice
    except (ValueError, RuntimeError, OSError):   # elsewhere, or no home
        return str(path)


def run_demo(out: Path, *, steps: int, device: str, audit: bool = True,
             public_steps: int = DEMO_PUBLIC_STEPS) -> tuple[Path, str | None]:
    """Runs the demo into `out`; returns the report's path and the audit's verdict (None without audit)."""
    import accounting
    from dpdm.datasets import load_dataset, load_npz
    from dpdm.evaluate import evaluate_samples
    from dpdm.report import write_report
    from dpdm.sample import sample_checkpoint
    from dpdm.train import TrainConfig, train

    t_start = time.perf_counter()
    # The demo's sizes are fixed (3.3 GB peak with either allocator setting), so it keeps freed memory in
    # glibc's heap (dpdm/cpu.py) unless DPDM_MALLOC=default says otherwise: the same results, 1.3x faster
    # private steps and 1.2x faster public ones on a 2-core AMD EPYC, where the demo took 922 s without it.
    keep_freed_memory_if_asked(default="keep")
    cache = _check_cache_folder()
    _claim_demo_folder(out)
    timings: list[tuple[str, str]] = []

    def lap(name: str, t0: float) -> None:
        timings.append((name, f"{time.perf_counter() - t0:.1f} s"))

    stages = 4 + bool(public_steps) + bool(audit)
    done = [0]

    def stage(text: str) -> None:
        done[0] += 1
        info(f"[{done[0]}/{stages}] {text}")

    # 1. Plan.
    t0 = time.perf_counter()
    stage(f"plan: eps={DEMO['epsilon']} delta={DEMO['delta']} on mnist5k")
    base = accounting.PrivacyPlan(dataset_size=4000, batch_size=DEMO["batch_size"], steps=steps, noise_multiplier=1.0,
                                  clip_norm=DEMO["clip_norm"], noise_multiplicity=DEMO["noise_multiplicity"],
                                  delta=DEMO["delta"], dataset_name="mnist5k")
    doc = accounting.make_plan_document(base.calibrate(epsilon=DEMO["epsilon"]))
    plan_path = out / "plan.json"
    accounting.write_plan(doc, plan_path)
    doc = accounting.load_plan(plan_path)  # train from the locked file, as `dpdm train` does
    plan = doc.plan
    lap("plan", t0)

    # 2. Public warm start: no privacy needed, the data is public (and no mnist5k image is in it).
    init_from = None
    if public_steps:
        t0 = time.perf_counter()
        stage(f"public warm start: {public_steps} NON-PRIVATE steps on the public {DEMO_PUBLIC} "
              f"(no mnist5k image; costs no privacy budget)")
        public = load_dataset(DEMO_PUBLIC, "train")
        public_doc = accounting.make_plan_document(accounting.PrivacyPlan(
            dataset_size=len(public), batch_size=DEMO_PUBLIC_BATCH, steps=public_steps, noise_multiplier=1.0,
            noise_multiplicity=DEMO_PUBLIC_K, delta=DEMO["delta"], dataset_name=DEMO_PUBLIC))
        public_dir = out / "public"
        train(public_doc, public.x, public.y, public.num_classes, public_dir,
              TrainConfig(model=DEMO_MODEL, precond=DEMO_PRECOND, lr=DEMO_LR, device=device, private=False,
                          checkpoint_every=max(public_steps, 1), log_every=10),
              dataset_name=DEMO_PUBLIC, progress=True)
        init_from = str(public_dir / "checkpoint.pt")
        lap("public warm start", t0)

    # 3. Train.
    t0 = time.perf_counter()
    stage(f"train: {plan.steps} DP-SGD steps, expected batch {plan.batch_size}, K={plan.noise_multiplicity}, "
          f"noise multiplier {plan.noise_multiplier:.4f}" + (", from the public warm start" if init_from else ""))
    data = load_dataset("mnist5k", "train")
    run_dir = out / "run"
    summary = train(doc, data.x, data.y, data.num_classes, run_dir,
                    TrainConfig(model=DEMO_MODEL, precond=DEMO_PRECOND, lr=DEMO_LR, device=device,
                                checkpoint_every=10, log_every=2, physical_batch=DEMO_PHYSICAL_BATCH,
                                init_from=init_from),
                    dataset_name="mnist5k", progress=True)
    # The file to release: the EMA weights and the ledger, without the run folder's secrets.
    from dpdm.export import export_model

    released = export_model(run_dir / "checkpoint.pt", out / "model.pt")
    lap("train", t0)

    # 4. Sample.
    t0 = time.perf_counter()
    stage(f"sample: {DEMO_SAMPLES} images, Euler {DEMO_SAMPLER_STEPS} steps, guidance {DEMO_GUIDANCE:g}")
    samples_path = out / "samples.npz"
    grid_path = out / "grid.png"
    sample_checkpoint(run_dir / "checkpoint.pt", n=DEMO_SAMPLES, sampler="euler", sampler_steps=DEMO_SAMPLER_STEPS,
                      guidance=DEMO_GUIDANCE, device=device, out_path=samples_path, grid_path=grid_path)
    lap("sample", t0)

    # 5. Evaluate.
    t0 = time.perf_counter()
    stage("eval: logreg / MLP / CNN trained on synthetic, tested on 1,000 real held-out digits")
    test = load_dataset("mnist5k", "test")
    metrics = evaluate_samples(load_npz(samples_path, name="samples"), data, test,
                               epochs=DEMO_EVAL_EPOCHS, device=device, progress=lambda m: info(f"      {m}"),
                               warn=warn)   # a reference CNN that could not be cached: one line, as in `dpdm eval`
    info(f"      training cnn: {DEMO_SAMPLES} real training images instead (what this protocol reaches)")
    real_cnn = _real_reference(data, test, device=device)
    lap("eval", t0)

    # 6. Audit.
    audit_section = None
    if audit:
        t0 = time.perf_counter()
        stage("audit: quick suite")
        from audits.suite import run_audit

        def progress(msg: str, i: int, n: int) -> None:
            line = audit_progress_line(msg, i, n)
            if line:
                info(line)

        # warn: said before the canary runs train, as `dpdm audit` says it, where they cannot test the plan's claim
        audit_report = run_audit(run_dir, out / "audit", plan_path=plan_path, suite="quick", progress=progress,
                                 warn=warn)
        audit_section = audit_report
        lap("audit", t0)
        info(f"dpdm: audit verdict: {audit_verdict_line(audit_report)}")

    curve_path = _write_curve(plan, out / "privacy_curve.png", steps_done=summary["steps_done"])
    rows_metrics = quality_rows(metrics, real_cnn)
    # The report is for sharing: each path in it as ~/... (_home_relative), as --out ~/demo named the user (h99 F2).
    audit_kept = f" and {_home_relative(out / 'audit')}" if audit_section is not None else ""   # --skip-audit: none
    sections = [
        {"title": "Privacy", "rows": [
            ("guarantee", f"(epsilon={epsilon_text(doc.epsilon)}, delta={plan.delta:g})-DP for each of the "
                          f"{plan.dataset_size} training images"),
            membership_row(plan),
            ("epsilon spent", f"{epsilon_text(summary['epsilon_spent'])} after {summary['steps_done']} of "
                              f"{plan.steps} steps"),
            ("noise multiplier / clip norm", f"{plan.noise_multiplier:.4f} / {plan.clip_norm:g}"),
            ("sample rate / expected batch", f"{plan.sample_rate:.4g} / {plan.batch_size}"),
            ("noise multiplicity K", plan.noise_multiplicity),
            ("public warm start", f"{public_steps} non-private steps (batch {DEMO_PUBLIC_BATCH}, K {DEMO_PUBLIC_K}) "
                                  f"on the public {DEMO_PUBLIC} (no mnist5k image: outside the guarantee, and it "
                                  f"needs none)" if public_steps else "none"),
            ("plan digest", doc.digest)]},
        {"title": "Samples", "image": str(grid_path), "text": f"One row per class, EMA weights, Euler (PF-ODE) sampler, "
                                                              f"classifier-free guidance {DEMO_GUIDANCE:g}."},
        {"title": "Release", "rows": [
            ("model to release", f"{_home_relative(released['model'])} (EMA weights and the ledger; sha256 "
                                 f"{released['sha256']}, weights sha256 {released['weights_sha256']}, which "
                                 f"samples.npz records: publish both)"),
            ("synthetic data to release", _home_relative(samples_path)),
            ("keep private", f"{_home_relative(run_dir)} (its checkpoint holds the secret seed of the batches and the "
                             f"noise){audit_kept}; the reference CNN eval trained on the private images, cached in "
                             f"{_home_relative(cache / 'reference')}; the demo's terminal output (the training bar "
                             f"shows un-noised losses); and this report's rows marked {NON_PRIVATE}"
                             + (" (in Quality and Audit)" if audit_section is not None else " (in Quality)"))]},
        {"title": "Quality", "rows": rows_metrics, "text": QUALITY_TEXT},
        {"title": "Privacy curve", "image": str(curve_path)},
    ]
    if audit_section is not None:
        sections.append({"title": "Audit", "rows": audit_rows(audit_section, out / "audit"), "text": AUDIT_TEXT})
    timings.append(("total", f"{time.perf_counter() - t_start:.1f} s"))
    sections.append({"title": "Timings", "rows": timings})
    sections.append({"title": "Plan (plan.json)", "json": doc.to_dict()})
    md, html_path = write_report(out, sections, title="dpdm demo: DP diffusion on mnist5k")
    info(f"report: {os.path.abspath(html_path)} (also {os.path.abspath(md)})")
    return html_path, (audit_section or {}).get("verdict")


def _write_curve(plan, path: Path, *, steps_done: int) -> Path:
    """`dpdm.report.privacy_curve` into `path` atomically and durably, as the demo's other outputs are: plotted into
    a temporary file beside it, fsynced, renamed (a demo stopped while plotting left half a PNG where the last one had
    been: s56 outwalk N1), none left behind on failure."""
    import re

    from accounting.plan import fsync_folder
    from dpdm.report import privacy_curve
    from dpdm.report_utils import TEMP_PATH_REST, remove_temp_leftovers, temp_path

    remove_temp_leftovers(path, TEMP_PATH_REST + re.escape(".tmp.png"))   # of a demo killed while plotting
    tmp = temp_path(path, ".tmp.png")   # savefig takes the format from the suffix
    try:
        privacy_curve(plan, tmp, steps_done=steps_done)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_folder(path.parent)
    return path


def audit_verdict_line(report: dict) -> str:
    """'VERDICT (first reason)' for stderr: the demo's exit code says FAIL, this line says why."""
    reasons = report.get("reasons") or []
    return f"{report.get('verdict')}" + (f" ({reasons[0]})" if reasons else "")


NON_PRIVATE = "(non-private)"
QUALITY_TEXT = (f"Rows marked {NON_PRIVATE} are computed without privacy from the private training images (a CNN "
                "trained on them, or their statistics): they are outside the guarantee, so share this report without "
                "them. The downstream accuracies use only the DP samples and the held-out real test images.")


AUDIT_TEXT = ("The audit tests dpdm's private step and the plan's mechanism on canary trainings of its own; it never "
              "reads this run's weights, so no verdict is about this model. "
              f"Rows marked {NON_PRIVATE} come from the audit's canary runs on private training images, one of them "
              "(the positive control) without noise and none of them inside the plan's budget: keep them private, "
              "as the audit folder.")


# What the guarantee means for one training image: bounds on a membership test at these false-positive rates.
MEMBERSHIP_FPRS = (0.01, 0.001)


def membership_row(plan) -> tuple[str, str]:
    """The Privacy section's "what it means" row: the most any membership test for one training image can find at
    false-positive rates of 1% and 0.1%, and its largest advantage, from the plan alone (public: its
    `accounting.membership_bound`, with the pessimistic PLD its certificate comes from), rounded up. The textbook
    reading, e^epsilon times the odds (22,000 at epsilon 10), says nothing a reader can use (h136 F1, stop 53)."""
    import accounting
    from accounting.calibrate import certification_discretization

    bound = accounting.membership_bound(plan.to_event(), MEMBERSHIP_FPRS, discretization=certification_discretization(
        plan.sample_rate, plan.noise_multiplier, plan.steps, plan.delta, plan.target_epsilon))
    (a, b), pct = MEMBERSHIP_FPRS, lambda x: f"{epsilon_text(100 * x, 3)}%"
    return ("what it means", f"any test of whether one image was trained on (whatever else the attacker knows) that "
                             f"wrongly flags {a:.0%} of the images not trained on flags at most {pct(bound.tpr[a])} of "
                             f"those trained on (at {b:.1%}: at most {pct(bound.tpr[b])}); at any false-positive rate, "
                             f"the true-positive rate exceeds it by at most {epsilon_text(bound.advantage, 3)}")


def quality_rows(metrics: dict, real_cnn: float) -> list[tuple[str, str]]:
    """The report's Quality rows; those computed from the private training images are marked NON_PRIVATE."""
    acc = metrics.get("classifiers", {})
    rows = [(f"{k} accuracy (synthetic -> real test)", f"{v['test_accuracy']:.3f}") for k, v in acc.items()
            if isinstance(v, dict) and "test_accuracy" in v]
    rows.append((f"cnn accuracy, {DEMO_SAMPLES} real training images instead (this protocol's reach here) "
                 f"{NON_PRIVATE}", f"{real_cnn:.3f}"))
    fd = metrics.get("classifier_fd")
    if fd is not None:
        # n beside each: the FD grows as n shrinks, so the two compare only at equal n (dpdm eval's floor is
        # measured at the samples' size).
        n = f" (n={fd['n']})" if "n" in fd else ""
        rows.append((f"classifier FD (not FID) {NON_PRIVATE}", f"{fd['value']:.3f}{n}"))
        if "real_test_value" in fd:
            n = f" (n={fd['real_test_n']})" if "real_test_n" in fd else ""
            rows.append((f"classifier FD, real test vs real train (floor) {NON_PRIVATE}",
                         f"{fd['real_test_value']:.3f}{n}"))
    pr = metrics.get("classifier_precision_recall")
    if pr is not None:
        rows.append((f"classifier precision / recall (fidelity / coverage, k=3) {NON_PRIVATE}",
                     f"{pr['precision']:.3f} / {pr['recall']:.3f}"))
    return rows


def audit_progress_line(stage: str, i: int, n: int) -> str | None:
    """The demo's line for a progress call of the audit (`run_audit`'s `progress(stage, i, n)`): a stage once,
    when it starts (i = 0) or when its training ends (i = n), not one "target" line per canary-training step."""
    if i not in (0, n):
        return None
    return f"      {stage}" + (f" ({n} steps)" if i and n > 1 else "")


def audit_rows(report: dict, report_dir: Path) -> list[tuple[str, str]]:
    """The demo report's audit rows: the verdict with its reasons and the epsilon it compares against.

    The demo's eps-10 plan is beyond what the quick suite's 200 canaries can certify, so its audit is
    INCONCLUSIVE by design, and the demo says why rather than exit non-zero.

    The positive control's bound (noise off) has a row of its own: what the attacks reach at all, which the
    INCONCLUSIVE reason about too few canaries does not say (h136 F2, stop 53).

    Every row but the folder's is marked NON_PRIVATE: the figures come from canary runs on private images (the
    positive control's without noise), outside the plan's guarantee (AUDIT_TEXT). The folder is
    shown as ~/... where it lies in the home folder (`_home_relative`)."""
    rows = [(f"verdict {NON_PRIVATE}", str(report.get("verdict")))]
    rows += [(f"reason {NON_PRIVATE}", r) for r in report.get("reasons", [])]
    can = report.get("canary_audit") or {}
    if can.get("claimed_epsilon") is not None:
        from audits.canary import compared_digits

        steps = (can.get("training") or {}).get("target", {}).get("steps")
        claim, lb = can["claimed_epsilon"], can.get("max_epsilon_lower_bound", float("nan"))
        d = compared_digits(lb, claim)   # a narrow FAIL never reads as a bound below the claim (h123 F3)
        rows.append((f"epsilon of the {steps}-step canary run (compared against) {NON_PRIVATE}",
                     f"{epsilon_text(claim, d)}; largest epsilon lower bound "
                     f"{epsilon_text(lb, d, bound='lower')}, largest "
                     f"certifiable with these canaries "
                     f"{epsilon_text(can.get('max_certifiable_epsilon', float('nan')), bound='lower')}"))
    if can.get("control_max_epsilon") is not None:   # what the attacks reach with no noise at all (h136 F2)
        rows.append((f"positive control (noise off) {NON_PRIVATE}",
                     f"largest epsilon lower bound {epsilon_text(can['control_max_epsilon'], bound='lower')}: the "
                     f"most these attacks showed on a training without noise"))
    rows.append(("report", _home_relative(report_dir)))
    return rows


def _real_reference(data, test, *, device: str) -> float:
    """Real test accuracy of the demo's CNN trained, under the same protocol, on DEMO_SAMPLES real
    training images (a fixed, class-mixed draw) instead of the samples."""
    import dataclasses

    import torch

    from dpdm.evaluate import downstream_accuracy

    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:DEMO_SAMPLES]
    real = dataclasses.replace(data, x=data.x[idx], y=data.y[idx], name=f"{data.name}[{DEMO_SAMPLES} real]")
    return downstream_accuracy(real, test, kind="cnn", epochs=DEMO_EVAL_EPOCHS["cnn"], device=device)["test_accuracy"]


if __name__ == "__main__":
    from cli.main import main

    sys.exit(main(["demo", *sys.argv[1:]]))
