"""Sizes issue 4's GPU run (benchmarks/gpu_run.sh) to the seconds it has, before it starts.

A device machine is lent for minutes, once, and nobody has timed dpdm's `mnist` preset on one, so the
run cannot be sized in advance. This script times, on the device and on PUBLIC data only (the private
images are not touched):
  - the non-private public pretraining step (--public-batch, --precision as given);
  - the private step (per-example gradients of the K-averaged loss, clipped, noised) at the plan's
    expected batch, for K = --K and 2K (other K are extrapolated linearly from these two; where 2K runs
    out of memory, the run stays at K);
  - sampling (30 Euler steps), in images per second, on min(1000, max(100, --n)) images;
then chooses, in this order: the private steps at K (as many as fit beside --min-public-steps, between
--min-epochs and --max-epochs), the public steps with the time left (at least --min-public-steps, at
most --max-public-steps), and last a larger K (2K, 4K) when time is still left over,
since more diffusion draws per example cost no privacy and lower the gradient's variance. It writes
the chosen plan (calibrated to epsilon 10, delta 1e-5, as quality.py's default_plan) and prints one
line of shell assignments (PUBLIC_STEPS=... EPOCHS=... K=...) on stdout; the timings go to stderr and
--json.

Usage (gpu_run.sh calls it):
    python benchmarks/gpu_probe.py --device cuda --model mnist --public digits28-aug --public-batch 512 \
        --batch-size 1024 --physical-batch 1024 --K 2 --clip-norm 0.1 --precision bf16 --seconds 480 \
        --plan-out plan.json

With --chunk-s S (gpu_run.sh's PROBE=0) nothing is timed: the run is sized from S, the seconds of one chunk
that gpu_step_times.py --fit measured, by the same rule (`without_probe`).

On the H200 (stop 26) it took 56 s and chose well but cautiously: its 150 s kept for evaluation were
used 41 s, and it timed the private step in chunks of 256 examples (2.2 s), where chunks of 1024
take 1.1 s (benchmarks/gpu_step_times.py). gpu_run.sh's defaults now follow those figures.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _argtypes import int_at_least, number  # noqa: E402
import accounting  # noqa: E402
import quality  # noqa: E402
from dpdm.memory import out_of_memory  # noqa: E402


def time_steps(doc: accounting.PlanDocument, data, run_dir: Path, *, model: str, private: bool, device: str,
               precision: str, physical_batch: int | None, grad_engine: str = "rules") -> float:
    """Median seconds per step over the second half of the steps. The first steps hold the warm-up, and
    on a GPU the allocator's too: each Poisson batch of a new size allocates afresh until its caches
    cover the sizes (stop 27's H200 probe took 0.21 s a public step and 0.74 s a private one, medians
    from the second step on, where the runs then took 0.105 s and at most 0.63 s). No metrics rows are
    logged in between: each computes epsilon, which took 0.1-0.3 s on a CPU here."""
    from dpdm.train import TrainConfig, train

    stamps: list[float] = []
    train(doc, data.x, data.y, data.num_classes, run_dir,
          TrainConfig(model=model, precond=quality.PRECOND, lr=quality.LR, private=private, device=device,
                      seed=0, log_every=10**6, checkpoint_every=10**6, physical_batch=physical_batch,
                      per_layer_rules=grad_engine == "rules",
                      precision=precision if not private else "fp32"),
          dataset_name=doc.plan.dataset_name, progress=False, on_step=lambda _: stamps.append(time.perf_counter()))
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(steps[len(steps) // 2:])


def with_peak_gib(device: str, fn):
    """(fn(), the peak GPU memory in GiB allocated while it ran, the peak reserved by the caching allocator;
    both None off cuda). The reserved peak is what the process holds of the card: the allocated one plus
    the blocks cached between chunks of other sizes (a Poisson batch's remainder), which only
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (gpu_run.sh's default) keeps close to it."""
    import torch

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = fn()
    if not cuda:
        return out, None, None
    return out, torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30


def _linear(points: dict[int, float], k: int) -> float:
    """The line through the two smallest-K points, at k."""
    (k0, v0), (k1, v1) = sorted(points.items())[:2]
    return v0 + (v1 - v0) * (k - k0) / (k1 - k0)


def public_private_plan(public: str, size: int, *, batch_size: int, steps: int, noise_multiplicity: int,
                        clip_norm: float) -> accounting.PlanDocument:
    """A throwaway private plan on the PUBLIC data, for timing private steps without the private images."""
    plan = accounting.PrivacyPlan(dataset_size=size, batch_size=batch_size, steps=steps, noise_multiplier=1.0,
                                  noise_multiplicity=noise_multiplicity, clip_norm=clip_norm, delta=quality.DELTA,
                                  dataset_name=public)
    return accounting.make_plan_document(plan)


def choose(*, seconds: float, eval_reserve: float, public_s: float, private_s: dict[int, float],
           sample_s: float, n: int, K: int, max_public: int, min_public: int, max_epochs: float,
           min_epochs: float, size: int, batch: int, margin: float, private_gib: dict[int, float] | None = None,
           memory_gib: float | None = None, memory_share: float = 0.85) -> dict:
    """The largest run that fits: private steps first, then public steps, then a larger K.

    With the peak memory of the private probes (`private_gib`, GiB at each probed K) and the device's
    (`memory_gib`), a larger K is taken only if its peak, extrapolated linearly in K, stays within
    `memory_share` of the device (on the H200, chunks of 1024: 19.3 GiB at K 2, 76.5 at K 8, K 16 out of
    memory), so that the run does not stop at its first private step after the public ones. With K alone
    in `private_s` (2K ran out of memory), K stays."""
    def steps_for(epochs: float) -> int:
        return max(1, math.ceil(round(epochs * size / batch, 9)))

    def per_k(k: int) -> float:   # seconds per private step at k draws (linear between/beyond the probes)
        if len(private_s) < 2:   # 2K did not fit: K alone was timed
            return private_s[k]
        return max(private_s[min(private_s)], _linear(private_s, k))

    avail = seconds - eval_reserve - n * sample_s
    # As many private steps as fit beside the fewest public ones, between min_epochs and max_epochs.
    fit = math.floor((avail / margin - min_public * public_s) / per_k(K))
    steps = min(steps_for(max_epochs), max(steps_for(min_epochs), fit))
    epochs = steps * batch / size
    left = avail / margin - steps * per_k(K)
    public = int(min(max_public, max(min_public, left // public_s)))
    left -= public * public_s
    def fits_memory(k: int) -> bool:
        return not private_gib or not memory_gib or _linear(private_gib, k) <= memory_share * memory_gib

    k = K
    for bigger in (2 * K, 4 * K):
        if len(private_s) >= 2 and steps * (per_k(bigger) - per_k(K)) <= left and fits_memory(bigger):
            k = bigger
    est = margin * (steps * per_k(k) + public * public_s) + n * sample_s + eval_reserve
    return {"epochs": epochs, "private_steps": steps, "public_steps": public, "K": k,
            "estimated_seconds": round(est, 1)}


def without_probe(args: argparse.Namespace) -> None:
    """--chunk-s (gpu_run.sh with PROBE=0): sizes the run from the chunk check's time alone
    (gpu_step_times.py --fit: one chunk of --physical-batch x --K with the engine the run trains with). A
    private step is costed as ceil(batch / physical) such chunks; its noise, optimizer and EMA, and a
    Poisson batch's extra chunk, are left to --margin (on the H200 a chunk of 1024 x K 2 took 0.42 s and the
    run's steps at most 0.63 s). A public step costs --public-step-s, an image's sampling --sample-s.
    `choose` keeps --max-epochs and --max-public-steps where they fit and otherwise lowers them as it sizes
    the probed run (the public steps first, down to --min-public-steps, then the epochs, down to
    --min-epochs); stderr says what changed and why. Where even the smallest run does not fit: one line, exit
    3, and no plan."""
    from dpdm.datasets import DATASET_SIZES

    size = DATASET_SIZES[quality.DATASET]
    chunks = 1 if args.physical_batch is None else math.ceil(args.batch_size / args.physical_batch)
    sizes = dict(seconds=args.seconds, eval_reserve=args.eval_reserve, public_s=args.public_step_s,
                 private_s={args.K: chunks * args.chunk_s}, sample_s=args.sample_s, n=args.n, K=args.K,
                 max_public=args.max_public_steps, max_epochs=args.max_epochs, size=size, batch=args.batch_size,
                 margin=args.margin)
    whole = choose(min_public=args.max_public_steps, min_epochs=args.max_epochs, **sizes)   # as the variables say
    choice = choose(min_public=min(args.min_public_steps, args.max_public_steps),   # a CPU dry run's 4 public
                    min_epochs=min(args.min_epochs, args.max_epochs), **sizes)      # steps keep no room for 150
    cost = (f"a private step {chunks} x {args.chunk_s:g} s (chunks of {args.physical_batch or args.batch_size}), "
            f"a public step {args.public_step_s:g} s, {args.sample_s:g} s an image sampled, x{args.margin:g}, "
            f"{args.eval_reserve:g} s kept for evaluation")
    if choice["estimated_seconds"] > args.seconds:
        print(f"no time left for the smallest run: {choice['private_steps']} private steps "
              f"({choice['epochs']:.4g} epochs) and {choice['public_steps']} public steps take about "
              f"{choice['estimated_seconds']:g} s of the {args.seconds:g} s left ({cost}); lower --min-epochs and "
              "--min-public-steps (gpu_run.sh: MIN_EPOCHS, MIN_PUBLIC_STEPS), the chunk's time (PHYSICAL, K) "
              "or raise the budget", file=sys.stderr)
        raise SystemExit(3)
    runs = (f"{whole['private_steps']} private steps ({args.max_epochs:g} epochs) and {whole['public_steps']} "
            f"public steps")
    same_steps = choice["private_steps"] == whole["private_steps"]
    epochs = args.max_epochs if same_steps else choice["epochs"]   # the same plan, and EPOCHS as given
    if same_steps and choice["public_steps"] == whole["public_steps"]:
        print(f"sized without the probe: {runs} fit the {args.seconds:g} s left (about "
              f"{whole['estimated_seconds']:g} s: {cost})", file=sys.stderr)
    else:
        changed = [] if same_steps else [
            f"EPOCHS {args.max_epochs:g} -> {epochs:.4g} ({choice['private_steps']} private steps)"]
        changed += [f"PUBLIC_STEPS {whole['public_steps']} -> {choice['public_steps']}"
                    ] if choice["public_steps"] != whole["public_steps"] else []
        print(f"sized without the probe: {runs} do not fit the {args.seconds:g} s left (about "
              f"{whole['estimated_seconds']:g} s: {cost}); {', '.join(changed)} (about "
              f"{choice['estimated_seconds']:g} s)", file=sys.stderr)
    doc = quality.default_plan(epochs=epochs, batch_size=args.batch_size, noise_multiplicity=args.K,
                               clip_norm=args.clip_norm)
    accounting.write_plan(doc, args.plan_out)
    if args.json:
        Path(args.json).write_text(json.dumps({"timings": {"chunk_s": args.chunk_s, "chunks_per_step": chunks,
                                                           "public_step_s": args.public_step_s,
                                                           "sample_s_per_image": args.sample_s},
                                               "choice": choice}, indent=2))
    print(f"PUBLIC_STEPS={choice['public_steps']} EPOCHS={epochs:.12g} K={args.K}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="mnist")
    ap.add_argument("--public", default="digits28-aug")
    ap.add_argument("--batch-size", type=int_at_least(1), default=1024)
    ap.add_argument("--physical-batch", type=int_at_least(1), default=None)
    ap.add_argument("--K", type=int_at_least(1), default=2)
    ap.add_argument("--grad-engine", default="rules", choices=("rules", "vmap"), help="as `dpdm train --grad-engine`")
    ap.add_argument("--public-batch", type=int_at_least(1), default=quality.PUBLIC_BATCH,
                    help="batch of the public steps")
    ap.add_argument("--public-K", type=int_at_least(1), default=None, help="K of the public steps (default: --K)")
    ap.add_argument("--clip-norm", type=float, default=0.1)
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--n", type=int_at_least(1), default=quality.N_SAMPLES)
    ap.add_argument("--seconds", type=number(float, 0, above=True), required=True,
                    help="what the whole of quality.py may take")
    ap.add_argument("--eval-reserve", type=number(float, 0), default=150.0,
                    help="seconds kept for the synthetic classifiers and FD (not probed)")
    ap.add_argument("--margin", type=number(float, 1), default=1.2, help="training time is budgeted at this multiple")
    ap.add_argument("--max-public-steps", type=int_at_least(1), default=2000)
    ap.add_argument("--min-public-steps", type=int_at_least(1), default=500)
    ap.add_argument("--max-epochs", type=number(float, 0, above=True), default=60.0)
    ap.add_argument("--min-epochs", type=number(float, 0, above=True), default=20.0)
    ap.add_argument("--plan-out", required=True, help="the chosen plan is written here")
    ap.add_argument("--json", help="timings and choices")
    ap.add_argument("--chunk-s", type=number(float, 0, above=True), default=None,
                    help="no probe: size the run from these seconds a chunk of --physical-batch x --K "
                         "(gpu_step_times.py --fit's CHUNK_S), --public-step-s and --sample-s (gpu_run.sh's PROBE=0)")
    ap.add_argument("--public-step-s", type=number(float, 0, above=True), default=0.13,
                    help="--chunk-s: seconds a public step (H200, batch 512, K 2, bf16: 0.13)")
    ap.add_argument("--sample-s", type=number(float, 0), default=0.002,
                    help="--chunk-s: seconds an image of sampling (H200: 526 and 585 images/s)")
    args = ap.parse_args()
    if args.chunk_s is not None:
        without_probe(args)
        return

    import torch

    from dpdm.datasets import DATASET_SIZES, load_dataset
    from dpdm.sample import sample_checkpoint

    t_start = time.perf_counter()
    public = load_dataset(args.public, "train")
    timings: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pub_doc = quality.public_plan(args.public, steps=40, batch_size=args.public_batch,
                                      noise_multiplicity=args.public_K or args.K)
        timings["public_step_s"] = time_steps(pub_doc, public, tmp / "public", model=args.model, private=False,
                                              device=args.device, precision=args.precision, physical_batch=None)
        print(f"public step (batch {args.public_batch}, {args.precision}): {timings['public_step_s']:.4f} s",
              file=sys.stderr)
        t0 = time.perf_counter()
        m = min(1000, max(100, args.n))   # enough for a rate; a CPU dry run's --n 20 is not kept waiting
        sample_checkpoint(tmp / "public" / "checkpoint.pt", n=m, sampler="euler",
                          sampler_steps=quality.SAMPLER_STEPS, device=args.device, precision=args.precision,
                          out_path=tmp / "s.npz")
        timings["sample_s_per_image"] = (time.perf_counter() - t0) / m
        print(f"sampling: {1 / timings['sample_s_per_image']:.0f} images/s (first batch's warm-up included)",
              file=sys.stderr)
        private_s, private_gib = {}, {}
        for k in (args.K, 2 * args.K):
            doc = public_private_plan(args.public, len(public), batch_size=args.batch_size, steps=8,
                                      noise_multiplicity=k, clip_norm=args.clip_norm)
            try:
                private_s[k], peak, _ = with_peak_gib(args.device, lambda: time_steps(
                    doc, public, tmp / f"private{k}", model=args.model, private=True, device=args.device,
                    precision="fp32", physical_batch=args.physical_batch, grad_engine=args.grad_engine))
            except RuntimeError as e:   # torch.OutOfMemoryError is one, and so is cuBLAS's failed allocation
                if k == args.K or not out_of_memory(e):   # the run itself would not fit: nothing to size
                    raise
                timings["out_of_memory_K"] = k
                print(f"private step (expected batch {args.batch_size}, K {k}, {args.grad_engine}): out of memory "
                      f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); the run stays at K {args.K}",
                      file=sys.stderr)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                break
            if peak is not None:
                private_gib[k] = peak
            print(f"private step (expected batch {args.batch_size}, K {k}, {args.grad_engine}): {private_s[k]:.3f} s"
                  + (f", peak {peak:.1f} GiB" if peak is not None else ""), file=sys.stderr)
        timings["private_step_s"] = {str(k): v for k, v in private_s.items()}
        timings["private_peak_gib"] = {str(k): round(v, 2) for k, v in private_gib.items()}
        memory_gib = (torch.cuda.get_device_properties(args.device).total_memory / 2**30 if private_gib
                      else None)
    timings["probe_seconds"] = round(time.perf_counter() - t_start, 1)
    choice = choose(seconds=args.seconds - timings["probe_seconds"], eval_reserve=args.eval_reserve,
                    public_s=timings["public_step_s"], private_s=private_s,
                    sample_s=timings["sample_s_per_image"], n=args.n, K=args.K,
                    max_public=args.max_public_steps, min_public=args.min_public_steps,
                    max_epochs=args.max_epochs, min_epochs=args.min_epochs, size=DATASET_SIZES[quality.DATASET],
                    batch=args.batch_size, margin=args.margin, private_gib=private_gib, memory_gib=memory_gib)
    doc = quality.default_plan(epochs=choice["epochs"], batch_size=args.batch_size, noise_multiplicity=choice["K"],
                               clip_norm=args.clip_norm)
    accounting.write_plan(doc, args.plan_out)
    print(f"chosen: {choice} (probe {timings['probe_seconds']} s); plan sigma {doc.plan.noise_multiplier:.4f}",
          file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"timings": timings, "choice": choice}, indent=2))
    print(f"PUBLIC_STEPS={choice['public_steps']} EPOCHS={choice['epochs']:.12g} K={choice['K']}")


if __name__ == "__main__":
    main()
