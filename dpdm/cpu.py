"""Opt-in CPU runtime setting for training: keep freed memory in glibc's heap, not the kernel's.

A DP-SGD step on the CPU allocates and frees the same few gigabytes every step (activations of
B*K rows, B per-example gradients). glibc serves blocks over its mmap threshold (at most 32 MiB)
with fresh mmap()s and unmaps them on free, so every step touches its memory anew: hundreds of
thousands of page faults a step, zeroed by the kernel, 20-40% of a step's time on a 2-core machine
(measured with `benchmarks/engine.py --malloc default|keep`). PyTorch's CPU performance guide
reaches for jemalloc or tcmalloc for the same reason; this does the same with glibc alone: every
block comes from the heap and freed memory stays there for the next step.

Opt-in (`DPDM_MALLOC=keep dpdm train ...`), because the heap never shrinks and can fragment: at
B = 64, K = 32 on the mnist U-Net (about 20 GB a step with glibc's default) the non-private step ran
out of a 24 GB machine with this setting.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["address_space", "bf16_unit_probes", "cpu_has_bf16_units", "keep_freed_memory", "keep_freed_memory_if_asked"]

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tell glibc malloc to serve large blocks from its heap and keep freed memory for reuse.

    Idempotent; returns True where applied (Linux with glibc), False elsewhere. Changes only where
    memory comes from, never a result.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = (mallopt(_M_MMAP_MAX, 0) == 1                       # no mmap()ed blocks: all from the heap
          and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1     # never give the heap's top back
          and mallopt(_M_TOP_PAD, 256 * 2**20) == 1)         # grow the heap in 256 MiB steps
    _applied = bool(ok)
    return _applied


def keep_freed_memory_if_asked(default: str = "default") -> bool:
    """`keep_freed_memory()` where the environment says DPDM_MALLOC=keep (unset: `default`, which the
    demo sets to "keep"); else nothing (False)."""
    import os

    return os.environ.get("DPDM_MALLOC", default) == "keep" and keep_freed_memory()


def bf16_unit_probes() -> dict[str, bool | None]:
    """What torch reports of this CPU's bfloat16 matrix units, by probe (torch's private helpers; a probe this
    torch lacks, or one that fails, reads None)."""
    import torch

    out: dict[str, bool | None] = {}
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, name, None)
        try:
            out[name.strip("_")] = None if fn is None else bool(fn())
        except (RuntimeError, AttributeError):
            out[name.strip("_")] = None
    return out


def cpu_has_bf16_units() -> bool | None:
    """Whether this CPU has bfloat16 matrix units (AVX512-BF16 or Intel AMX), as torch reports them.

    Without them bf16 autocast runs slower than fp32 (`benchmarks/precision.py --preset small` on a 2-core AMD
    EPYC with AVX2 only: a --no-dp step 7.2x as long, sampling 14x). None where this torch cannot tell.
    """
    answers = [v for v in bf16_unit_probes().values() if v is not None]
    return any(answers) if answers else None


def address_space() -> int:
    """This process's address space now (VmSize, bytes; 0 where /proc does not say): what counts against an
    address-space limit (`ulimit -v`, `resource.RLIMIT_AS`) before the next allocation."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
