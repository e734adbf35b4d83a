"""Loading benchmarks/*.py (not a package) as modules in tests."""
import importlib.util
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
