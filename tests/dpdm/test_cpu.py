"""dpdm.cpu: the opt-in allocator setting (its speed is measured by benchmarks/engine.py --malloc)."""

import os
import subprocess
import sys
import textwrap


def _run(code: str, **env: str) -> str:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}).stdout.strip()


def test_keep_freed_memory_applies_on_glibc_and_is_idempotent():
    out = _run("""
        import platform
        from dpdm.cpu import keep_freed_memory
        glibc = platform.libc_ver()[0] == "glibc"
        print(keep_freed_memory() is glibc and keep_freed_memory() is glibc)
    """)
    assert out == "True"


def test_training_applies_it_only_when_asked():
    code = """
        from dpdm import cpu
        print(cpu.keep_freed_memory_if_asked(), cpu._applied)
    """
    assert _run(code, DPDM_MALLOC="default") == "False None"
    assert _run(code, DPDM_MALLOC="keep") in ("True True", "False False")   # False False: no glibc
