"""Seconds per private step against the vmap chunk (--physical-batch) and K, on public data.

What a GPU run needs to know before it is sized: on the H200 (stop 26) the `mnist` preset's private
step at expected batch 1024 took 2.2 s at K 2 and 2.4 s at K 4 in chunks of 256 examples, so the step
is bound by something other than arithmetic. This times each MODEL:PHYSICAL:K given (the median step
of a few, the first left out as warm-up; stop 26's figures came from an earlier version that also
counted one epsilon computation per two steps, 0.1-0.3 s on a CPU) and writes the figures to --json
after each one, so a run stopped by its time limit keeps what it measured. A configuration that fails
(out of memory, say) is recorded with its error and the next one runs.

MODEL:PHYSICAL:K:rules and MODEL:PHYSICAL:K:plain time one chunk of per-example gradients alone
(`dpdm.engine._per_example`, 28x28 images), with the engine's per-layer rules or with plain
vmap(grad). The rules are custom autograd Functions, and functorch runs each through Python: on this
2-core CPU a chunk of ONE example costs 236 ms with them and 53 ms without (small preset; mnist 297
against 97 ms), while at CPU sizes they are faster and leaner (small, 256 examples, K 2: 2.8 s and
2.7 GB against 4.6 s and 6.2 GB). On a GPU, where the arithmetic is cheap, that overhead may decide.

    python benchmarks/gpu_step_times.py --device cuda --json times.json mnist:256:2 mnist:512:8 small:1024:8 \
        mnist:1024:2:rules mnist:1024:2:plain

--clipped times the chunk's clipped gradient sum instead (what a training step and `dpdm train --grad-engine
auto` run per chunk: a little more memory). gpu_run.sh uses it twice, with the device's memory (memory_gib)
recorded in each row: `pick_engine` applies `dpdm train --grad-engine auto`'s rule to the rules/plain rows, and
--fit SHARE (one MODEL:PHYSICAL:K:ENGINE) checks that the chunk the run will train with fits before it starts:
while its peak (the larger of the allocated and the reserved one, peak_gib and reserved_gib) exceeds SHARE of
the device's memory (or it runs out of memory) it halves PHYSICAL, down to a quarter, then tries the rules
engine the same way, and prints `PHYSICAL=... GRAD_ENGINE=... CHUNK_S=...` (the chunk's seconds, which size
gpu_run.sh's PROBE=0 run; exit 3 if nothing fits). Rows in --known (an earlier --json, gpu_run.sh's engine
timings) are not timed again.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _argtypes import int_at_least, number  # noqa: E402
from gpu_probe import out_of_memory, public_private_plan, time_steps, with_peak_gib  # noqa: E402


def _failed(row: dict, e: Exception) -> dict:
    """The row of a configuration that failed (out of memory, say): its error, and the GPU's cache freed
    for the next one."""
    import torch

    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def time_step(data, name: str, model: str, physical: int, k: int, *, expected_batch: int, steps: int,
              device: str) -> dict:
    """Median seconds per private step (and peak GPU memory) of one configuration, on public data."""
    row = {"model": model, "physical_batch": physical, "K": k, "expected_batch": expected_batch}
    t0 = time.perf_counter()
    try:
        doc = public_private_plan(name, len(data), batch_size=expected_batch, steps=steps, noise_multiplicity=k,
                                  clip_norm=0.1)
        with tempfile.TemporaryDirectory() as tmp:
            step_s, peak, reserved = with_peak_gib(device, lambda: time_steps(
                doc, data, Path(tmp) / "run", model=model, private=True, device=device, precision="fp32",
                physical_batch=physical))
        row["step_s"] = round(step_s, 4)
        if peak is not None:
            row["peak_gib"], row["reserved_gib"] = round(peak, 2), round(reserved, 2)
    except Exception as e:   # one failing configuration must not cost the others
        _failed(row, e)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def device_memory_gib(device: str) -> float | None:
    """The device's total memory in GiB; None off cuda."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def time_chunk(model: str, n: int, k: int, mode: str, *, device: str, repeats: int = 3,
               clipped: bool = False) -> dict:
    """Seconds for the per-example gradients of n examples x k draws in one chunk (after one warm-up); with
    `clipped`, for their clipped sum (`engine.clipped_grad_sum`, as a training step computes it)."""
    import torch

    from dpdm import engine
    from dpdm.loss import VLoss, engine_loss_fn
    from dpdm.networks import build_network
    from dpdm.precond import VPrecond

    row = {"model": model, "chunk": n, "K": k, "engine": mode}
    if clipped:
        row["clipped"] = True
    try:
        if mode not in ("rules", "plain"):
            raise ValueError(f"engine mode {mode!r} must be 'rules' or 'plain'")
        D = VPrecond(build_network(model, img_resolution=28, img_channels=1, num_classes=10)).to(device)
        loss = VLoss()
        g = torch.Generator(device).manual_seed(0)
        x = torch.rand((n, 1, 28, 28), generator=g, device=device) * 2 - 1
        y = torch.randint(0, 10, (n,), generator=g, device=device)
        sigma, noise = loss.draw(n, k, (1, 28, 28), generator=g, device=device)
        batch, fn = (x, y, sigma, noise), engine_loss_fn(loss)
        cuda = torch.device(device).type == "cuda"

        def once() -> None:
            if clipped:
                engine.clipped_grad_sum(D, fn, *batch, clip_norm=1.0, chunk_size=n, per_layer_rules=mode == "rules")
            else:
                engine.per_sample_grads(D, fn, *batch, per_layer_rules=mode == "rules")

        def timed() -> float:   # one warm-up, then the mean of `repeats`
            once()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(repeats):
                once()
            if cuda:
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) / repeats

        chunk_s, peak, reserved = with_peak_gib(device, timed)
        row["chunk_s"] = round(chunk_s, 4)
        if peak is not None:
            row["peak_gib"], row["reserved_gib"] = round(peak, 2), round(reserved, 2)
    except Exception as e:   # one failing configuration must not cost the others
        _failed(row, e)
    memory = device_memory_gib(device)
    if memory is not None:
        row["memory_gib"] = round(memory, 2)
    return row


def pick_engine(rows: list[dict]) -> str:
    """"rules" or "vmap" from the MODEL:PHYSICAL:K:rules and :plain rows, by `dpdm train --grad-engine auto`'s
    rule (`dpdm.train.pick_grad_engine`): plain vmap only where it is 5% faster and its peak stays within 80% of
    the device's memory (rows without memory_gib, off cuda: time alone)."""
    from dpdm.train import pick_grad_engine

    by = {r.get("engine"): r for r in rows}
    rules, plain = by.get("rules", {}), by.get("plain", {})
    memory = next((r["memory_gib"] for r in rows if r.get("memory_gib")), None)
    return pick_grad_engine({"rules": rules.get("chunk_s"), "vmap": plain.get("chunk_s")},
                            {"vmap": plain.get("peak_gib")}, memory)


def chunk_fits(row: dict, share: float) -> bool:
    """Whether a timed chunk ran and its peak is within `share` of the device's memory (no figures: yes): the
    larger of the peaks allocated and reserved (`with_peak_gib`), since the process holds what its allocator
    reserved, and the run's chunks vary in size where the check's did not."""
    if "chunk_s" not in row:
        return False
    peaks = [row[k] for k in ("peak_gib", "reserved_gib") if row.get(k) is not None]
    memory = row.get("memory_gib")
    return not peaks or memory is None or max(peaks) <= share * memory


def fit_chunk(model: str, physical: int, k: int, mode: str, *, device: str, share: float,
              known: list[dict] | tuple = (), log=print) -> dict | None:
    """The first of PHYSICAL, PHYSICAL/2, PHYSICAL/4 with `mode`, then the same with the rules engine, whose
    clipped chunk fits `share` of the device's memory: {"physical", "engine" (rules|plain), "chunk_s" (its
    seconds), "rows"}; None if none does, or a chunk fails for another reason than memory (`out_of_memory`:
    halving would not help)."""
    import torch

    sizes = [p for p in (physical, physical // 2, physical // 4) if p >= 1]
    tries = [(mode, p) for p in sizes] + ([("rules", p) for p in sizes] if mode == "plain" else [])
    rows = []
    for m, p in tries:   # distinct: the sizes strictly decrease
        row = next((r for r in known if (r.get("model"), r.get("chunk"), r.get("K"), r.get("engine"),
                                         r.get("clipped")) == (model, p, k, m, True)), None)
        if row is None:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            row = time_chunk(model, p, k, m, device=device, repeats=1, clipped=True)
        rows.append(row)
        log(json.dumps(row))
        if chunk_fits(row, share):
            return {"physical": p, "engine": m, "chunk_s": row["chunk_s"], "rows": rows}
        if "chunk_s" not in row and not out_of_memory(row.get("error", "")):
            break
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="+", metavar="MODEL:PHYSICAL:K")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--public", default="digits28-aug")
    ap.add_argument("--batch-size", type=int_at_least(1), default=1024, help="expected batch of the private steps")
    ap.add_argument("--steps", type=int_at_least(2), default=6)
    ap.add_argument("--json", required=True)
    ap.add_argument("--clipped", action="store_true", help="engine rows: time the chunk's clipped gradient sum")
    ap.add_argument("--fit", type=float, metavar="SHARE",
                    help="one MODEL:PHYSICAL:K:ENGINE: halve PHYSICAL (then try the rules) until the chunk's peak is "
                         "within SHARE of the device's memory; prints PHYSICAL=... GRAD_ENGINE=...")
    ap.add_argument("--known", help="--fit: rows already timed (an earlier --json), not timed again")
    args = ap.parse_args()

    if args.fit is not None:
        if len(args.configs) != 1 or len(args.configs[0].split(":")) != 4:
            ap.error("--fit takes one MODEL:PHYSICAL:K:ENGINE")
        model, physical, k, mode = args.configs[0].split(":")
        mode = {"vmap": "plain"}.get(mode, mode)   # gpu_run.sh's GRAD_ENGINE names plain vmap `vmap`
        known = json.loads(Path(args.known).read_text()) if args.known and Path(args.known).exists() else []
        fit = fit_chunk(model, int(physical), int(k), mode, device=args.device, share=args.fit, known=known,
                        log=lambda line: print(line, flush=True))
        Path(args.json).write_text(json.dumps(fit["rows"] if fit else [], indent=2))
        what = f"one chunk of {physical} x K {k} ({mode})"
        if fit is None:
            print(f"fit: no chunk of {model} x K {k} fits {args.fit:.0%} of the device's memory, from {what} down",
                  file=sys.stderr)
            raise SystemExit(3)
        engine = {"plain": "vmap", "rules": "rules"}[fit["engine"]]
        if (fit["physical"], fit["engine"]) != (int(physical), mode):
            print(f"fit: {what} does not fit {args.fit:.0%} of the device's memory; training in chunks of "
                  f"{fit['physical']} with the {engine} engine", file=sys.stderr)
        print(f"PHYSICAL={fit['physical']} GRAD_ENGINE={engine} CHUNK_S={fit['chunk_s']:g}")
        return

    from dpdm.datasets import load_dataset

    data = load_dataset(args.public, "train")
    results = []
    for config in args.configs:
        model, physical, k, *engine_only = config.split(":")
        if engine_only:
            row = time_chunk(model, int(physical), int(k), engine_only[0], device=args.device, clipped=args.clipped)
        else:
            row = time_step(data, args.public, model, int(physical), int(k), expected_batch=args.batch_size,
                            steps=args.steps, device=args.device)
        results.append(row)
        print(json.dumps(row), flush=True)
        Path(args.json).write_text(json.dumps(results, indent=2))

if __name__ == "__main__":
    main()
