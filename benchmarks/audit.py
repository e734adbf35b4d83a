"""Benchmark: wall time of `dpdm audit --suite quick` on mnist5k (target: <= 20 minutes on 2 cores).

    .venv/bin/python benchmarks/audit.py [--workdir DIR] [--threads 2] [--suite quick]

Makes a plan for mnist5k (4,000 images, expected batch 256, 500 steps, epsilon 10, delta 1e-5,
K = 4), trains the first step of it with the `small` network (the quick suite trains its own canary
models, so the run's weights do not affect the audit's cost), then times the audit itself through
the CLI and prints one JSON line with the verdict and the seconds spent per stage. An audit that reached no
verdict (it stopped early: exit 2 or 4) has "within_target": null, and the benchmark exits 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _argtypes import int_at_least  # noqa: E402


class _Stop(Exception):
    pass


def make_run(workdir: Path) -> Path:
    import accounting
    from dpdm.datasets import load_dataset
    from dpdm.train import TrainConfig, train

    data = load_dataset("mnist5k")
    plan = accounting.PrivacyPlan(dataset_size=len(data), batch_size=256, steps=500, noise_multiplier=1.0,
                                  noise_multiplicity=4, delta=1e-5, dataset_name="mnist5k").calibrate(epsilon=10.0)
    doc = accounting.make_plan_document(plan)
    run = workdir / "run"

    def stop_after_first(step: int) -> None:
        if step >= 2:
            raise _Stop  # the checkpoint of step 1 is on disk

    try:
        train(doc, data.x, data.y, data.num_classes, run,
              TrainConfig(model="small", log_every=1, checkpoint_every=1), dataset_name="mnist5k",
              progress=False, on_step=stop_after_first)
    except _Stop:
        pass
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--threads", type=int_at_least(1), default=2)   # torch.set_num_threads(0) raises
    ap.add_argument("--suite", default="quick", choices=["quick", "full"])
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dpdm_audit_bench_"))
    # A second benchmark on one --workdir ended in train()'s TrainError traceback (auditwalk N1, stop 56); and a
    # report left there would be read as this audit's where it stopped early. One line, before any work.
    taken = [name for name in ("run", "report") if (workdir / name).exists()]
    if taken:
        print(f"audit.py: error: argument --workdir: {str(workdir)!r} already holds {' and '.join(taken)} from an "
              "earlier benchmark; give a new or empty --workdir (or none: a fresh temporary one)", file=sys.stderr)
        return 2
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run = make_run(workdir)
    t_run = time.perf_counter() - t0

    from cli.main import main as dpdm

    t0 = time.perf_counter()
    rc = dpdm(["audit", "--run", str(run), "--suite", args.suite, "--out", str(workdir / "report")])
    wall = time.perf_counter() - t0
    path = workdir / "report" / "report.json"
    report = json.loads(path.read_text()) if path.exists() else {}   # none: the audit failed to run (exit 2 or 4)
    # Only an audit that reached a verdict (PASS or FAIL) is timed against the target: one that stopped early (a
    # crash, a refused run) "met" it, and the benchmark exited 0 (h156 F2, stop 55).
    ran = rc in (0, 1, 3) and report.get("verdict") is not None   # exit 2 or 4 wrote no report, whatever lies there
    # A FAIL whose canary audit stopped (a non-finite canary run, a crash after a failed check) has none: null
    canary = report.get("canary_audit") or {}
    print(json.dumps({
        "benchmark": f"dpdm audit --suite {args.suite} (mnist5k)",
        "threads": args.threads,
        "exit_code": rc,
        "verdict": report.get("verdict"),
        "audit_wall_s": round(wall, 1),
        "stages_s": {k: round(v, 1) for k, v in (report.get("timing_s") or {}).items()},
        "training_s": {k: round(v["seconds"], 1) for k, v in (canary.get("training") or {}).items()},
        "max_epsilon_lower_bound": canary.get("max_epsilon_lower_bound"),
        "control_max_epsilon": canary.get("control_max_epsilon"),
        "claimed_epsilon": canary.get("claimed_epsilon"),   # the canary run's: what the verdict uses
        "plan_epsilon": (report.get("claimed_plan") or {}).get("epsilon"),
        "make_run_s": round(t_run, 1),
        "report": str(workdir / "report" / "report.md"),
        "target_s": 1200,
        "within_target": wall <= 1200 if ran else None,
    }))
    if not ran:
        print(f"audit.py: error: `dpdm audit` exited {rc} without a verdict (no {path}); its error is above",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
