"""torch.distributed set-up for `torchrun ... dpdm train` (DESIGN.md section 7).

torch.func runs on the plain module: no DDP wrapper. Every rank derives the same Poisson batch from
the shared seed and takes a disjoint shard; clipped per-example sums are all-reduced; rank 0 alone
adds the noise, so the total noise is exactly what the plan accounts for (see dpdm.train).
"""
from __future__ import annotations

import datetime
import os

import torch


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str) -> str:
    """Initializes the default process group from torchrun's environment.

    Returns the device this rank uses (cuda:LOCAL_RANK on GPUs, cpu with gloo otherwise).
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    timeout = datetime.timedelta(seconds=float(os.environ.get("DPDM_DIST_TIMEOUT", "600")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout)
    if not use_cuda:
        threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
        torch.set_num_threads(max(1, threads))
    # Parameters start identical on every rank because every rank seeds the same generator before
    # building the model; the training loop checks a checksum at every checkpoint.
    return device


def shutdown(*, ok: bool = True) -> None:
    """Tears the process group down. After a successful run every rank first meets at a barrier:
    a rank that destroys gloo's group while its peer is still closing the last collective makes the
    peer abort ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()
