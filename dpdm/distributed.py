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
    """Whether WORLD_SIZE names more than one process (torchrun sets it; `launch_problem` checks the rest)."""
    size = os.environ.get("WORLD_SIZE", "1").strip()
    return not (size.isdecimal() and int(size) <= 1)


# What torchrun sets beside WORLD_SIZE, and init_process_group("env://") reads.
_TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_TIMEOUT_ENV = "DPDM_DIST_TIMEOUT"
_DEFAULT_TIMEOUT_S = 600.0
_MAX_PORT = 65535


class LaunchError(ValueError):
    """A torchrun launch this machine cannot run as given (a rank with no GPU of its own): an input mistake, which
    `dpdm` prints as one line, exit 2, before any work (`init_from_env` raises it)."""


class RendezvousError(RuntimeError):
    """The ranks could not meet to set up the process group (`init_from_env`): a peer that never joined within
    DPDM_DIST_TIMEOUT (it refused its own input first, or was never started), a port taken. One line, exit 4, as
    a peer lost later is; it was torch's traceback of 44 lines on rank 0, 84 on another (h114 F2, stop 51)."""


class PeerLost(RuntimeError):
    """A peer was gone when the ranks met to tear the process group down after a successful run (`shutdown`):
    every collective of training was done. Rank 0, which writes the checkpoints, knows whether the last one was
    written: on rank 0 it was (`dpdm train` warns and reports the run), on another rank its peer may have failed
    writing it."""


def launch_problem(device: str | None = None) -> str | None:
    """Why this process's environment is neither one process nor a torchrun launch, or None.

    A stray WORLD_SIZE in the shell was a traceback from torch's rendezvous (exit 4). A RANK above 0 with no
    WORLD_SIZE above 1 names one rank of several that were never set up: such a process trained alone, then took
    itself for a peer and printed nothing (a stray RANK='' crashed after the run, exit 4); outside torchrun RANK
    is otherwise not read (see `rank`). Given the resolved `device`, a torchrun launch is also checked against
    the GPUs (`_device_problem`)."""
    size = os.environ.get("WORLD_SIZE", "1").strip()
    if not launched_by_torchrun():
        rank = os.environ.get("RANK", "").strip()
        if rank.isdecimal() and int(rank) > 0:
            if os.environ.get("WORLD_SIZE", "").strip():
                return f"RANK={rank} is not below WORLD_SIZE={size}"
            return (f"RANK={rank} is set, but WORLD_SIZE is not: run the ranks under torchrun (torchrun "
                    "--nproc_per_node=N $(which dpdm) train ...), or unset RANK to train in one process")
        return None
    if not size.isdecimal():
        return f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes"
    missing = [v for v in _TORCHRUN_VARIABLES if not os.environ.get(v, "").strip()]
    if missing:
        return (f"WORLD_SIZE={size} is set, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: run "
                "under torchrun (torchrun --nproc_per_node=N $(which dpdm) train ...), or unset WORLD_SIZE")
    if not all(os.environ[v].strip().isdecimal() for v in ("RANK", "LOCAL_RANK", "MASTER_PORT")):
        return "RANK, LOCAL_RANK and MASTER_PORT must be numbers, as torchrun sets them"
    if int(os.environ["RANK"]) >= int(size):
        return f"RANK={os.environ['RANK']} is not below WORLD_SIZE={size}"
    if not 0 < int(os.environ["MASTER_PORT"]) <= _MAX_PORT:   # was torch's ValueError traceback, exit 4
        return f"MASTER_PORT={os.environ['MASTER_PORT'].strip()} is not a TCP port (1 to {_MAX_PORT})"
    if _timeout_seconds() is None:   # was a ValueError traceback from init_from_env, exit 4
        return (f"{_TIMEOUT_ENV}={os.environ[_TIMEOUT_ENV]!r} must be a number of seconds above 0 "
                f"(default {_DEFAULT_TIMEOUT_S:g})")
    return None if device is None else _device_problem(device)


def _device_problem(device: str) -> str | None:
    """Why a torchrun rank cannot take `device` (after `launch_problem`'s checks of the environment), or None.

    On GPUs rank LOCAL_RANK takes cuda:LOCAL_RANK. A LOCAL_RANK with no such GPU (2 processes per node on a 1-GPU
    machine, the commonest torchrun mistake) was torch's "invalid device ordinal" traceback per surplus rank, exit
    4. An explicit cuda:N is refused rather than replaced: every rank gets the same command line, so N cannot be
    each rank's own GPU, and replacing it silently trained on GPUs the user did not name (CUDA_VISIBLE_DEVICES
    chooses them)."""
    if not device.startswith("cuda"):
        return None
    if torch.device(device).index is not None:
        return (f"--device={device!r}: under torchrun each rank takes cuda:LOCAL_RANK; give --device cuda, and "
                "choose the GPUs with CUDA_VISIBLE_DEVICES")
    local_rank, gpus = os.environ.get("LOCAL_RANK", "0").strip(), torch.cuda.device_count()
    if not local_rank.isdecimal():
        return f"LOCAL_RANK={local_rank!r} is not a GPU index (torchrun sets it to 0, 1, ...)"
    local_rank = int(local_rank)
    if local_rank >= gpus:
        return (f"LOCAL_RANK={local_rank} but this machine has {gpus} CUDA device{'' if gpus == 1 else 's'}: run "
                f"torchrun with --nproc_per_node at most {gpus}, or train with --device cpu")
    return None


def _timeout_seconds() -> float | None:
    """$DPDM_DIST_TIMEOUT (default `_DEFAULT_TIMEOUT_S`, also when empty): how long a collective waits for its
    peers, or None when it is no such number (not a number, nan, 0 or below, or beyond what a timedelta holds)."""
    try:
        seconds = float(os.environ.get(_TIMEOUT_ENV, "").strip() or _DEFAULT_TIMEOUT_S)
        datetime.timedelta(seconds=seconds)   # ValueError for nan, OverflowError for inf or past 999,999,999 days
    except (ValueError, OverflowError):
        return None
    return seconds if seconds > 0 else None


def _omp_threads() -> int:
    """The threads a gloo rank computes with: $OMP_NUM_THREADS, whose first element where it is OpenMP's list form
    ("4,2": threads per nesting level; the first is the top level's), and 1 where it is unset or no positive
    integer. torchrun sets 1 only where the variable is unset and passes a user's list on, which int() refused on
    every rank after the process group was set up (a ValueError traceback, exit 4)."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(first) if first.isdecimal() and int(first) > 0 else 1


def rank() -> int:
    """This process's rank in the process group actually set up, 0 when there is none: outside torchrun this
    process is the whole run, whatever a RANK left in the shell says."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init_from_env(device: str) -> str:
    """Initializes the default process group from torchrun's environment.

    Returns the device this rank uses (cuda:LOCAL_RANK on GPUs, cpu with gloo otherwise).

    Raises:
      LaunchError: `launch_problem(device)` names a problem, before any process group is set up.
      RendezvousError: the ranks did not meet (`_rendezvous_message`).
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return device
    problem = launch_problem(device)
    if problem:
        raise LaunchError(problem)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    timeout = datetime.timedelta(seconds=_timeout_seconds() or _DEFAULT_TIMEOUT_S)   # checked by launch_problem
    try:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout)
    except RuntimeError as e:   # torch's DistStoreError and DistNetworkError are DistErrors, RuntimeErrors
        raise RendezvousError(_rendezvous_message(e, timeout.total_seconds())) from e
    if not use_cuda:
        torch.set_num_threads(_omp_threads())
    # Parameters start identical on every rank because every rank seeds the same generator before
    # building the model; the training loop checks a checksum at every checkpoint.
    return device


def _rendezvous_message(e: BaseException, seconds: float) -> str:
    """RendezvousError's line for this rank (RANK of WORLD_SIZE, as `launch_problem` checked them): who did not
    come, for how long it was waited for, and where the other ranks say why. Rank 0 serves the store at
    MASTER_ADDR:MASTER_PORT and waits for the others; another rank waits to reach it."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    where = f"MASTER_ADDR={os.environ['MASTER_ADDR'].strip()} MASTER_PORT={os.environ['MASTER_PORT'].strip()}"
    cause = " ".join(str(e).splitlines()[0].split())[:200] if str(e).strip() else ""   # torch appends C++ frames
    here = f"here: {type(e).__name__}{': ' + cause if cause else ''}"
    if "timed out" not in str(e).lower():   # a port taken, an address this machine does not have: the cause says
        return f"rank {rank} of {world} could not set up the process group at {where} ({here}); nothing was written"
    if rank == 0:
        who = "rank 1" if world == 2 else "some of the other ranks"
        return (f"{who} did not join rank 0 at {where} within {seconds:g} s ({_TIMEOUT_ENV}): it probably refused "
                f"its own input first (its own output says why), or was not started; nothing was written ({here})")
    return (f"rank {rank} could not reach rank 0 at {where} within {seconds:g} s ({_TIMEOUT_ENV}): rank 0 probably "
            f"refused its own input first (its own output says why), or was not started, or is not at that "
            f"address; nothing was written ({here})")


def shutdown(*, ok: bool = True) -> None:
    """Tears the process group down. After a successful run every rank first meets at a barrier, then
    waits in the rendezvous store until every rank has left it: a rank that destroys gloo's group while
    its peer is still completing the last collective makes the peer abort ("terminate called without an
    active exception"), and the barrier alone is such a last collective (seen once in about 25 runs).

    Raises:
      PeerLost: after a successful run (`ok`), a peer was gone at the barrier: it failed or died after the run's
        last collective (rank 0's final checkpoint on a full disk, a rank killed). That was gloo's traceback on
        each rank left, and rank 0 lost a finished run's summary (h99 F1, stop 49). The group is torn down first.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    lost = None
    if ok:
        try:
            dist.barrier()
        except RuntimeError as e:   # gloo's "Connection closed by peer", a timeout (DistBackendError is one too)
            lost = e
        else:
            _all_left_the_barrier(dist)
    if lost is None:
        dist.destroy_process_group()
        return
    # Of two ranks the peer is the other one. Gloo names only its address, and the store cannot name it either: a
    # rank whose store is served by a peer that is gone (rank 0, where no torchrun agent serves it) prints c10d's
    # 20-line warning on each call.
    rank, world = dist.get_rank(), dist.get_world_size()
    who = f"rank {1 - rank}" if world == 2 else "another rank"
    try:
        dist.destroy_process_group()
    except RuntimeError:   # a group whose peer is gone may fail to close: the line below says what happened
        pass
    cause = " ".join(str(lost).split())[:200]
    raise PeerLost(f"{who} stopped after the run's last step, before the ranks met to finish (its own output says "
                   f"why; here: {type(lost).__name__}: {cause})") from lost


def _all_left_the_barrier(dist) -> None:
    """Waits (up to DPDM_DIST_TIMEOUT) until every rank has counted itself out of the barrier in the store; the
    store is not gloo, so no gloo message is in flight once the count is full."""
    import time

    try:
        store = dist.distributed_c10d._get_default_store()
        key, world = "dpdm/left_barrier", dist.get_world_size()
        store.add(key, 1)
        deadline = time.monotonic() + (_timeout_seconds() or _DEFAULT_TIMEOUT_S)
        while store.add(key, 0) < world and time.monotonic() < deadline:
            time.sleep(0.01)
    except Exception:   # a store that cannot be reached (a peer gone): tear down as before
        return
