"""Whether an error is the machine or the GPU running out of memory, without torch: `dpdm train`'s timing of the
gradient engines (`dpdm.train.time_grad_engines`) falls back to the rules on it, `cli.main` turns it into one line,
and benchmarks/gpu_probe.py sizes its runs by it."""

from __future__ import annotations

# The RuntimeErrors of a failed allocation: CUDA's ("CUDA error: out of memory"), cuBLAS's and cuDNN's
# (CUBLAS_STATUS_ALLOC_FAILED, CUDNN_STATUS_ALLOC_FAILED), and torch's CPU allocator's ("can't allocate memory",
# or C++'s "std::bad_alloc", which `ulimit -v` on a shared host gives).
_ALLOCATION_FAILED = ("ALLOC_FAILED", "can't allocate memory", "std::bad_alloc")


def out_of_memory(error: BaseException | str) -> bool:
    """Whether an error (or a benchmark row's "Type: message") is running out of memory: Python's MemoryError,
    torch's (CUDA) OutOfMemoryError, or a RuntimeError of a failed allocation (`_ALLOCATION_FAILED`, "out of
    memory"), which a smaller batch, chunk or K may avoid as well (h135 F2, stop 53)."""
    if isinstance(error, str):
        text = error
    elif isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    elif isinstance(error, RuntimeError):
        text = f"{type(error).__name__}: {error}"
    else:
        return False
    return ("OutOfMemoryError" in text or any(s in text for s in _ALLOCATION_FAILED)
            or "out of memory" in text.lower())
