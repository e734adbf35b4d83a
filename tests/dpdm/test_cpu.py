"""dpdm.cpu: the allocator setting is applied where glibc is, and changes no result."""

import subprocess
import sys
import textwrap


def _run(code: str, env_extra: dict | None = None) -> str:
    import os

    env = dict(os.environ, **(env_extra or {}))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         check=True)
    return out.stdout.strip()


def test_keep_freed_memory_applies_on_glibc_and_is_idempotent():
    code = """
        import platform, resource, torch
        from dpdm.cpu import keep_freed_memory
        glibc = platform.libc_ver()[0] == "glibc"
        assert keep_freed_memory() is glibc and keep_freed_memory() is glibc
        # Allocate and free a 64 MiB block twice: with the setting, the second time faults no new pages.
        torch.empty(16 * 2**20).fill_(1.0)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(16 * 2**20).fill_(1.0)
        f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        print(glibc, f1 - f0)
    """
    glibc, faults = _run(code).split()
    if glibc == "True":
        assert int(faults) < 1000          # 64 MiB anew would be ~16,000 faults of 4 KiB


def test_keep_freed_memory_opt_out():
    out = _run("from dpdm.cpu import keep_freed_memory; print(keep_freed_memory())", {"DPDM_MALLOC": "default"})
    assert out == "False"
