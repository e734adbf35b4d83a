"""Whole-process time of `dpdm plan --preset mnist-paper --eps E --delta 1e-5` against opacus's
`get_noise_multiplier(accountant="prv")` on the same inputs, in the same run.

Prints, per epsilon: the noise multiplier each returns, the tightest value (PLD pessimistic at 10x
finer discretization, bisected to 1e-5), both times and their ratio; then medians. Targets: median
<= 3 s per plan, <= 1/3 of opacus's time, noise multiplier within 0.1% of the tightest.

The 1/3 target is on whole-process times, and opacus's process spends most of its time importing opacus (and
with it torch). So the table also gives opacus's `get_noise_multiplier` call alone, without that import, and
dpdm's whole process against it ("vs call"): the same dpdm time, against the accountant's work only.

    .venv/bin/python benchmarks/plan.py [--repeats 3] [--opacus-repeats 1]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))   # this tree's accounting, not the one installed
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _argtypes import int_at_least  # noqa: E402

EPSILONS = (0.2, 1.0, 10.0)
DELTA = 1e-5
N, B, EPOCHS = 60000, 4096, 300
DPDM = Path(sys.executable).with_name("dpdm")   # the venv's command, beside its python, run on this tree's code

OPACUS = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
t0 = time.perf_counter()
from opacus.accountants.utils import get_noise_multiplier
t1 = time.perf_counter()
sigma = get_noise_multiplier(target_epsilon={eps}, target_delta={delta}, sample_rate={q}, steps={steps},
                             accountant="prv")
t2 = time.perf_counter()
print(json.dumps({{"sigma": sigma, "import_s": t1 - t0, "call_s": t2 - t1}}))
"""


class SideFailed(RuntimeError):
    """A timed child process that failed (main() prints it in one line, exit 2)."""


def _output(side: str, proc: subprocess.CompletedProcess) -> str:
    """The child's stdout; SideFailed naming the side and the last line of its stderr where it failed: with
    check=True its stderr was captured and dropped, and a CalledProcessError traceback said only "exit status 1"."""
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise SideFailed(f"{side} failed (exit {proc.returncode}): {lines[-1] if lines else 'no error output'}")
    return proc.stdout


def opacus_installed() -> bool:
    """Whether this python has opacus (the bench extra), which the opacus side's child imports."""
    return importlib.util.find_spec("opacus") is not None


def time_dpdm(eps: float) -> tuple[float, float]:
    cmd = [str(DPDM), "plan", "--preset", "mnist-paper", "--eps", repr(eps), "--delta", repr(DELTA), "--json"]
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}   # this tree's code first
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    whole = time.perf_counter() - t0
    return whole, json.loads(_output(f"dpdm plan --eps {eps!r}", proc))["noise_multiplier"]


def time_opacus(eps: float, q: float, steps: int) -> tuple[float, float, float]:
    code = OPACUS.format(eps=eps, delta=DELTA, q=q, steps=steps)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    whole = time.perf_counter() - t0
    r = json.loads(_output(f"opacus get_noise_multiplier (eps {eps!r})", proc).strip().splitlines()[-1])
    return whole, r["call_s"], r["sigma"]


def main() -> None:
    ap = argparse.ArgumentParser()
    # at least 1: 0 ended in a median of no timings, after running the other side's plans first
    ap.add_argument("--repeats", type=int_at_least(1), default=3, help="dpdm plan runs per epsilon (median)")
    ap.add_argument("--opacus-repeats", type=int_at_least(1), default=1, help="opacus runs per epsilon (median)")
    args = ap.parse_args()
    if not DPDM.is_file():   # a python outside the venv: a FileNotFoundError traceback once timing began
        ap.exit(2, f"{ap.prog}: error: no dpdm command beside {sys.executable} ({DPDM}); run it with the venv's "
                   "python (.venv/bin/python benchmarks/plan.py) or `make bench`\n")
    if not opacus_installed():   # found by its child only after dpdm's plans at the first epsilon, a traceback
        ap.exit(2, f"{ap.prog}: error: opacus is not installed in {sys.executable}: install the bench extra "
                   "(pip install -e '.[bench]'; `make bench` does)\n")
    try:
        _compare(args)
    except SideFailed as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")


def _compare(args) -> None:
    import accounting

    q, steps = B / N, math.ceil(EPOCHS * N / B)
    rows = []
    print(f"mnist-paper: N={N} B={B} sample_rate={q:.6g} steps={steps} delta={DELTA:g}; "
          f"dpdm: {args.repeats} runs (median), opacus: {args.opacus_repeats} run(s) (median)")
    header = (f"{'eps':>5} {'sigma dpdm':>11} {'sigma opacus':>12} {'sigma tight':>11} {'dpdm +%':>8} "
              f"{'opacus +%':>9} {'eps(opacus)':>11} {'dpdm s':>7} {'opacus s':>9} {'(call s)':>8} {'ratio':>6} "
              f"{'vs call':>7}")
    print(header)
    for eps in EPSILONS:
        dpdm_runs = [time_dpdm(eps) for _ in range(args.repeats)]
        dpdm_s = statistics.median(t for t, _ in dpdm_runs)
        sigma = dpdm_runs[0][1]
        op_runs = [time_opacus(eps, q, steps) for _ in range(args.opacus_repeats)]
        op_whole = statistics.median(r[0] for r in op_runs)
        op_call = statistics.median(r[1] for r in op_runs)
        op_sigma = op_runs[0][2]
        tight = accounting.calibrate_noise_multiplier(
            sample_rate=q, steps=steps, target_epsilon=eps, delta=DELTA, rtol=1e-5,
            discretization=accounting.pld_discretization(eps) / 10)
        op_eps = accounting.compute_epsilon(sample_rate=q, noise_multiplier=op_sigma, steps=steps, delta=DELTA,
                                            discretization=accounting.pld_discretization(eps))
        ratio = dpdm_s / op_whole
        call_ratio = dpdm_s / op_call   # against the accountant's work alone, without opacus's torch import
        rows.append((dpdm_s, ratio, sigma / tight - 1, call_ratio))
        print(f"{eps:>5g} {sigma:>11.5f} {op_sigma:>12.5f} {tight:>11.5f} {100 * (sigma / tight - 1):>8.3f} "
              f"{100 * (op_sigma / tight - 1):>9.3f} {op_eps:>11.5f} {dpdm_s:>7.2f} {op_whole:>9.2f} "
              f"{op_call:>8.2f} {ratio:>6.3f} {call_ratio:>7.3f}")
    print(f"median dpdm plan time: {statistics.median(r[0] for r in rows):.2f} s (target <= 3 s); "
          f"median dpdm/opacus time ratio: {statistics.median(r[1] for r in rows):.3f} (target <= 0.333, whole "
          f"processes); against opacus's call alone (no import): {statistics.median(r[3] for r in rows):.3f}; "
          f"max sigma excess over tight: {100 * max(r[2] for r in rows):.3f}% (target <= 0.1%)")


if __name__ == "__main__":
    main()
