"""Loading benchmarks/*.py (not a package) as modules in tests."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def load_benchmark():
    """load_benchmark("quality") -> benchmarks/quality.py as a fresh module."""
    return _load


@pytest.fixture()
def option_refused(monkeypatch, capsys):
    """option_refused(module, "engine.py", "--rounds", "0"): the script's main() with that option ends in argparse's
    one-line error naming the option and the value, exit 2."""
    def check(module, script: str, flag: str, value: str) -> None:
        with pytest.raises(SystemExit) as e:
            monkeypatch.setattr(sys, "argv", [script, flag, value])
            module.main()
        assert e.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"error: argument {flag}: " in last and repr(value) in last, last
    return check
