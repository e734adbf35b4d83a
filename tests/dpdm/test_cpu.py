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


def test_the_demos_default_applies_when_the_environment_is_silent():
    """Catches keep_freed_memory_if_asked ignoring its `default` (mut47): with DPDM_MALLOC unset, the demo's
    default="keep" applies (its measured 1.3x), wherever glibc is there to apply it."""
    env = {k: v for k, v in os.environ.items() if k != "DPDM_MALLOC"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import platform
        from dpdm import cpu
        print(cpu.keep_freed_memory_if_asked(default="keep") is (platform.libc_ver()[0] == "glibc"))
    """)], capture_output=True, text=True, check=True, env=env).stdout.strip()
    assert out == "True"


def test_bf16_units_any_probe_says_yes(monkeypatch):
    """Catches bf16 units that need every probe to say yes (mut47): one yes is enough, None means unknown."""
    from dpdm import cpu

    for probes, want in (({"a": True, "b": False}, True), ({"a": None, "b": True}, True),
                         ({"a": False, "b": None}, False), ({"a": None, "b": None}, None)):
        monkeypatch.setattr(cpu, "bf16_unit_probes", lambda p=probes: p)
        assert cpu.cpu_has_bf16_units() is want, probes
