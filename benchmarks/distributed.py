"""Examples per second of the private step with 1 and 2 ranks on CPU (gloo, one thread each).

    python benchmarks/distributed.py [--batch 128] [--K 4] [--preset small] [--iters 5]

Each rank computes the clipped per-example sum of its shard of the same logical batch
(`dpdm.train.distributed_private_grad`: shard, clip, sum, noise once on rank 0, all-reduce), exactly
as `torchrun ... dpdm train` does. It prints scaling = (examples/s with 2 ranks) / (examples/s with 1)
(the goal: >= 1.8x) and efficiency = scaling / 2, the number of ranks (100%: linear scaling).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _argtypes import int_at_least  # noqa: E402

from dpdm.networks import PRESETS  # noqa: E402  (the ranks build these)


def _rank(rank, world, init_file, args, out_dir):
    import torch.distributed as dist

    from dpdm.loss import EDMLoss, engine_loss_fn
    from dpdm.networks import build_network
    from dpdm.precond import EDMPrecond
    from dpdm.train import _Dist, distributed_private_grad

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    D = EDMPrecond(build_network(args.preset, img_resolution=28, img_channels=1, num_classes=10))
    loss = EDMLoss()
    fn = engine_loss_fn(loss)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 1, 28, 28, generator=g) * 2 - 1
    y = torch.randint(0, 10, (args.batch,), generator=g)
    sigma, noise = loss.draw(args.batch, args.K, (1, 28, 28), generator=g)
    d = _Dist.current()
    pos = torch.arange(args.batch)[rank::world]
    batch = (x[pos], y[pos], sigma[pos], noise[pos])

    def step(i):
        distributed_private_grad(D, fn, *batch, clip_norm=1.0, noise_multiplier=1.0,
                                 expected_batch_size=args.batch, noise_seed=i, dist=d)

    step(args.iters)  # warm-up (noise seeds are non-negative; this one is not reused below)
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(args.iters):
        step(i)
    dist.barrier()
    elapsed = time.perf_counter() - t0
    if rank == 0:
        (Path(out_dir) / f"w{world}.json").write_text(json.dumps({"seconds": elapsed}))
    dist.barrier()
    dist.destroy_process_group()


def measure(world: int, args) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(world, os.path.join(tmp, "init"), args, tmp), nprocs=world,
                           join=True, start_method="spawn")
        seconds = json.loads((Path(tmp) / f"w{world}.json").read_text())["seconds"]
    return args.batch * args.iters / seconds


def scaling_line(one: float, two: float, ranks: int = 2) -> str:
    """The summary, as the module's docstring defines it: scaling = two / one, efficiency = scaling / ranks."""
    scaling = two / one
    return f"scaling: {scaling:.2f}x (goal >= 1.8x; efficiency {scaling / ranks:.0%})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int_at_least(1), default=128, help="logical batch, split over the ranks")
    p.add_argument("--K", type=int_at_least(1), default=4)
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))   # checked here, not in the spawned ranks
    p.add_argument("--iters", type=int_at_least(1), default=5)
    args = p.parse_args(argv)
    one = measure(1, args)
    two = measure(2, args)
    print(f"preset={args.preset} logical batch={args.batch} K={args.K} iters={args.iters} (gloo, 1 thread per rank)")
    print(f"1 rank : {one:8.2f} examples/s")
    print(f"2 ranks: {two:8.2f} examples/s")
    print(scaling_line(one, two))


if __name__ == "__main__":
    main()
