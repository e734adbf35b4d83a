"""One DP-SGD step of dpdm's engine against the non-private step and Opacus, same model and examples.

Variants (each in its own subprocess, so peak memory is the process's own high-water mark):

  nonprivate  the EDM loss over the B*K rows, loss.backward()                      (baseline)
  dpdm        dpdm.engine.private_grad: per-example grads of the K-averaged loss, clip, sum, noise
  opacus      opacus GradSampleModule (hooks) over the B*K rows (each example repeated K times, as
              DPDM's code does), grad_sample.mean over K, flat clipping, sum, noise
  vmap        (reference, not run by default) the engine with plain vmap(grad), no per-layer rules
              (`dpdm train --grad-engine vmap`)

Reports ms/step (min and median over repeats; wall clock and process CPU time, the latter being
less sensitive to other load on a shared machine), examples/s, the peak-memory increase over the
process's state after building model and data (ru_maxrss delta), the ratios to `nonprivate`, and
a line for each pair that ran, against the peer measured in the same run: dpdm / opacus and vmap / dpdm
(wall, CPU time and memory). Rounds interleave the variants, so slow phases of a shared machine hit all of them.
Every variant runs with OMP_WAIT_POLICY=PASSIVE (--omp-wait-policy): with OpenMP's default
spinning, 2-thread timings on a machine shared with other jobs vary by 5x from run to run. And
every variant runs with the same allocator setting (--malloc): `default` is glibc's own, under
which each step page-faults gigabytes anew (sys time), more so for the variants that allocate more;
`keep` keeps freed memory in glibc's heap (what `DPDM_MALLOC=keep dpdm train` does).

--chunk-size N gives every variant the same physical batch: N examples (N*K rows) per forward/backward pass,
the clipped sums (nonprivate: the gradients) accumulated over the passes of one logical step of B examples, as
Opacus's BatchMemoryManager does; without it every variant runs all B*K rows in one pass. The header says which.

Targets (mnist preset, B=64, K=4, 2 threads): dpdm <= 1.3x nonprivate, <= 0.75x opacus, peak
memory <= 2x nonprivate.

    .venv/bin/python benchmarks/engine.py [--batch 64] [--K 4] [--preset mnist] [--threads 2]
        [--repeats 3] [--rounds 2] [--variants nonprivate,dpdm,opacus] [--chunk-size N] [--json PATH]
        [--malloc keep|default]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # this tree's dpdm, not the one installed
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _argtypes import int_at_least, number  # noqa: E402

VARIANTS = ("nonprivate", "dpdm", "opacus", "vmap")
IMG = (1, 28, 28)
NUM_CLASSES = 10


def opacus_installed() -> bool:
    """Whether this python has opacus (the bench extra), which the opacus variant's subprocess imports."""
    return importlib.util.find_spec("opacus") is not None


def _setup(preset: str, batch: int, K: int, seed: int = 0):
    import torch

    from dpdm.loss import EDMLoss
    from dpdm.networks import build_network, count_parameters
    from dpdm.precond import EDMPrecond

    torch.manual_seed(seed)
    net = build_network(preset, img_resolution=IMG[1], img_channels=IMG[0], num_classes=NUM_CLASSES)
    D = EDMPrecond(net)
    loss = EDMLoss()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand((batch, *IMG), generator=g) * 2 - 1
    y = torch.randint(0, NUM_CLASSES + 1, (batch,), generator=g)
    sigma, noise = loss.draw(batch, K, IMG, generator=g)
    return D, loss, (x, y, sigma, noise), count_parameters(D)


def _count_parameters(preset: str) -> int:
    """The parameters of `preset`'s network as the workers build it (a ValueError names an unknown preset): known
    before any variant runs, so that --max-opacus-gib holds whichever variant comes first."""
    from dpdm.networks import build_network, count_parameters
    from dpdm.precond import EDMPrecond

    return count_parameters(EDMPrecond(build_network(preset, img_resolution=IMG[1], img_channels=IMG[0],
                                                     num_classes=NUM_CLASSES)))


def _chunks(B: int, chunk_size: int | None) -> list[slice]:
    """The physical passes of one logical step: slices of `chunk_size` examples (one slice of all B without)."""
    size = chunk_size or B
    return [slice(a, min(a + size, B)) for a in range(0, B, size)]


def _step_fn(variant: str, D, loss, batch, K: int, chunk_size, *, clip_norm: float = 1.0,
             noise_multiplier: float = 1.0):
    """One step of `variant`, every variant in the same physical chunks of `chunk_size` examples (None: all B).
    clip_norm and noise_multiplier are keywords so that the tests can compare the variants without noise."""
    import torch

    from dpdm import engine
    from dpdm.loss import engine_loss_fn

    x, y, sigma, noise = batch
    B = x.shape[0]
    chunks = _chunks(B, chunk_size)
    gen = torch.Generator().manual_seed(123)

    if variant == "nonprivate":
        def step():   # gradient accumulation over the chunks: the gradient of the mean loss over the B examples
            D.zero_grad(set_to_none=True)
            for c in chunks:
                (loss(D, x[c], y[c], sigma[c], noise[c]).sum() / B).backward()   # the chunk's rows inside the loss
            return {n: p.grad for n, p in D.named_parameters()}
        return step

    if variant in ("dpdm", "vmap"):
        loss_fn = engine_loss_fn(loss)
        def step():   # vmap: the same mechanism on plain vmap(grad) (`dpdm train --grad-engine vmap`)
            return engine.private_grad(D, loss_fn, x, y, sigma, noise, clip_norm=clip_norm,
                                       noise_multiplier=noise_multiplier, expected_batch_size=B,
                                       generator=gen, chunk_size=chunk_size, per_layer_rules=variant == "dpdm")
        return step

    if variant == "opacus":
        import warnings

        from opacus import GradSampleModule

        warnings.simplefilter("ignore")
        gsm = GradSampleModule(D, batch_first=True, loss_reduction="sum")
        params = [p for p in gsm.parameters() if p.requires_grad]
        # DPDM's data path: every example repeated K times, one (sigma, noise) draw per row.
        x_rows = x.repeat_interleave(K, dim=0)                       # [B*K, C, H, W]
        y_rows = y.repeat_interleave(K, dim=0)                       # [B*K]
        sigma_rows = sigma.reshape(B * K, 1)                         # [B*K, 1]
        noise_rows = noise.reshape(B * K, 1, *IMG)                   # [B*K, 1, C, H, W]

        def step():
            sums = [torch.zeros_like(p) for p in params]
            for c in chunks:   # BatchMemoryManager's way: clip per physical batch, accumulate the clipped sums
                rows = slice(c.start * K, c.stop * K)
                n = c.stop - c.start
                for p in params:
                    p.grad = None
                    p.grad_sample = None
                loss(gsm, x_rows[rows], y_rows[rows], sigma_rows[rows], noise_rows[rows]).sum().backward()
                # DPDM's optimizer: mean over the K rows of each example, then flat clipping per example.
                per_ex = [p.grad_sample.reshape(n, K, *p.shape).mean(dim=1) for p in params]
                norms = torch.stack([g.reshape(n, -1).norm(2, dim=1) for g in per_ex], dim=1).norm(2, dim=1)
                factor = (clip_norm / (norms + 1e-6)).clamp(max=1.0)
                for s, g in zip(sums, per_ex):
                    s += torch.einsum("i,i...->...", factor, g)
            return [(s + noise_multiplier * clip_norm * torch.randn(s.shape, generator=gen)) / B for s in sums]
        return step

    raise ValueError(f"variant={variant!r} must be one of {VARIANTS}")


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.malloc == "keep":
        from dpdm.cpu import keep_freed_memory

        if not keep_freed_memory():
            raise SystemExit("--malloc keep: glibc mallopt is not available here; use --malloc default")
    D, loss, batch, n_params = _setup(args.preset, args.batch, args.K)
    step = _step_fn(args.worker, D, loss, batch, args.K, args.chunk_size)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = [], []
    for i in range(args.warmup + args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = step()
        t1, c1 = time.perf_counter(), time.process_time()
        del out
        if i >= args.warmup:
            wall.append(t1 - t0)
            cpu.append(c1 - c0)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": args.worker, "wall": wall, "cpu": cpu, "peak_mib": (rss1 - rss0) / 1024,
                      "n_params": n_params}))


def _run_variant(args, variant: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--batch", str(args.batch),
           "--K", str(args.K), "--preset", args.preset, "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--malloc", args.malloc]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    env = dict(os.environ)
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The summary lines: each variant against the named peer measured in the same run (when both ran).
PEERS = (("dpdm", "opacus"), ("vmap", "dpdm"))


def physical_batch_line(B: int, K: int, chunk_size: int | None) -> str:
    """What each variant ran per forward/backward pass (the same for all of them), so that the ratios below read
    as like for like: before, --chunk-size reached dpdm alone and nothing printed said so."""
    passes = len(_chunks(B, chunk_size))
    if passes == 1:
        why = f" (--chunk-size {chunk_size} >= B)" if chunk_size else ""
        return f"physical batch: all {B} examples ({B * K} rows) in one pass, every variant{why}"
    return (f"physical batch: chunk={chunk_size} examples ({chunk_size * K} rows) per pass, {passes} passes per "
            f"step, every variant (opacus: clipped sums accumulated; nonprivate: gradients accumulated)")


def peer_ratios(summary: dict) -> dict:
    """{"dpdm / opacus": {"wall": x, "cpu": x, "memory": x}, ...} for each pair of PEERS that both ran
    (min wall and CPU ms/step, median peak-memory increase); memory only where the peer's was measured (> 0)."""
    out = {}
    for v, peer in PEERS:
        if v in summary and peer in summary:
            s, p = summary[v], summary[peer]
            r = {"wall": s["wall_min_ms"] / p["wall_min_ms"], "cpu": s["cpu_min_ms"] / p["cpu_min_ms"]}
            if p["peak_mib"] > 0:
                r["memory"] = s["peak_mib"] / p["peak_mib"]
            out[f"{v} / {peer}"] = r
    return out


def format_ratios(ratios: dict) -> list[str]:
    """One line per pair: "dpdm / opacus: wall 0.70x, cpu 0.65x, memory 0.50x"."""
    return [f"{pair}: " + ", ".join(f"{k} {x:.2f}x" for k, x in r.items()) for pair, r in ratios.items()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int_at_least(1), default=64, help="examples per step (B)")
    ap.add_argument("--K", type=int_at_least(1), default=4, help="noise draws per example (noise multiplicity)")
    ap.add_argument("--preset", default="mnist", help="network preset (mnist, small)")
    ap.add_argument("--threads", type=int_at_least(1), default=2, help="torch.set_num_threads")
    ap.add_argument("--repeats", type=int_at_least(1), default=3, help="timed steps per subprocess")
    ap.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed steps per subprocess")
    ap.add_argument("--malloc", choices=("keep", "default"), default="default",
                    help="default: glibc's own (maps and unmaps blocks over 32 MiB, so each step page-faults "
                         "its memory anew); keep: glibc keeps freed memory for reuse (dpdm.cpu.keep_freed_memory, "
                         "`DPDM_MALLOC=keep dpdm train`), for every variant")
    ap.add_argument("--rounds", type=int_at_least(1), default=2, help="subprocesses per variant, interleaved")
    ap.add_argument("--variants", default="nonprivate,dpdm,opacus", help=f"comma-separated subset of {VARIANTS}")
    ap.add_argument("--chunk-size", type=int_at_least(1), default=None,
                    help="physical batch (examples per pass) of every variant; default: all B in one pass")
    ap.add_argument("--max-opacus-gib", type=number(float, 0), default=8.0,
                    help="skip opacus when the per-row gradients of one pass (B*K rows, or chunk*K) would exceed this")
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY for every variant ('' keeps the environment's): on a shared, "
                         "oversubscribed machine the default spinning makes 2-thread timings erratic")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"--variants: {v!r} must be one of {VARIANTS}")
    try:
        n_params = _count_parameters(args.preset)
    except ValueError as e:
        ap.error(f"--preset: {e}")
    # known before any variant runs: from the first variant's run, an opacus listed first ran unchecked (h135 F4)
    skipped = {}
    gib = min(args.chunk_size or args.batch, args.batch) * args.K * n_params * 4 / 2**30
    if "opacus" in variants and gib > args.max_opacus_gib:
        what = "chunk" if args.chunk_size and args.chunk_size < args.batch else "B"
        skipped["opacus"] = (f"{what}*K*P*4 bytes = {gib:.3g} GiB of grad_sample per pass "
                             f"> --max-opacus-gib {args.max_opacus_gib}")
        variants = [v for v in variants if v != "opacus"]
    elif "opacus" in variants and not opacus_installed():
        # its subprocess failed on the import, after the variants before it had run, and their results were lost
        skipped["opacus"] = ("opacus is not installed in this python: install the bench extra "
                             "(pip install -e '.[bench]'; `make bench` does)")
        variants = [v for v in variants if v != "opacus"]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            res = _run_variant(args, v)
            results[v].append(res)
            print(f"  round {r + 1}/{args.rounds} {v:>10}: wall {min(res['wall']) * 1e3:8.0f} ms  "
                  f"cpu {min(res['cpu']) * 1e3:8.0f} ms  peak +{res['peak_mib']:.0f} MiB", file=sys.stderr)

    summary = {}
    for v, runs in results.items():
        if not runs:
            continue
        wall = [t for r in runs for t in r["wall"]]
        cpu = [t for r in runs for t in r["cpu"]]
        summary[v] = {"wall_min_ms": min(wall) * 1e3, "wall_median_ms": statistics.median(wall) * 1e3,
                      "cpu_min_ms": min(cpu) * 1e3, "examples_per_s": args.batch / min(wall),
                      "peak_mib": statistics.median(r["peak_mib"] for r in runs)}
    print(f"engine benchmark: preset={args.preset} ({n_params:,} params), B={args.batch}, K={args.K} "
          f"({args.batch * args.K} rows), chunk={args.chunk_size or 'none'}, threads={args.threads}, "
          f"OMP_WAIT_POLICY={args.omp_wait_policy or 'env'}, malloc={args.malloc}, "
          f"{args.rounds} rounds x {args.repeats} steps per variant")
    print(physical_batch_line(args.batch, args.K, args.chunk_size))
    print(f"{'variant':>11} | {'ms/step min':>11} | {'median':>8} | {'cpu ms':>8} | {'examples/s':>10} | "
          f"{'peak MiB':>8} | {'x nonpriv':>9} | {'cpu x np':>8} | {'mem x np':>8}")
    base = summary.get("nonprivate")
    for v, s in summary.items():
        rt = f"{s['wall_min_ms'] / base['wall_min_ms']:.2f}" if base else "-"
        rc = f"{s['cpu_min_ms'] / base['cpu_min_ms']:.2f}" if base else "-"
        rm = f"{s['peak_mib'] / base['peak_mib']:.2f}" if base and base["peak_mib"] > 0 else "-"
        print(f"{v:>11} | {s['wall_min_ms']:11.0f} | {s['wall_median_ms']:8.0f} | {s['cpu_min_ms']:8.0f} | "
              f"{s['examples_per_s']:10.1f} | {s['peak_mib']:8.0f} | {rt:>9} | {rc:>8} | {rm:>8}")
    for v, why in skipped.items():
        print(f"{v:>11} | skipped: {why}")
    ratios = peer_ratios(summary)
    for line in format_ratios(ratios):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "worker"},
                                               "n_params": n_params, "summary": summary, "skipped": skipped,
                                               "ratios": ratios, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
