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


def run_beside_stand_in(tmp_path: Path, script: str, package: str, message: str, *args: str):
    """Runs a copy of benchmarks/`script` (with _argtypes.py) from `tmp_path`, beside a package `package` whose
    import stops the process with `message`: a benchmark that imports its own tree imports that one."""
    import shutil
    import subprocess

    (tmp_path / "benchmarks").mkdir()
    for name in (script, "_argtypes.py"):
        shutil.copy(ROOT / "benchmarks" / name, tmp_path / "benchmarks" / name)
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text(f"raise SystemExit({message!r})\n")
    return subprocess.run([sys.executable, str(tmp_path / "benchmarks" / script), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


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
