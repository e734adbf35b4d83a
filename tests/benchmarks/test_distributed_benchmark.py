"""benchmarks/distributed.py runs end to end (1 and 2 gloo ranks) at a toy size."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_distributed_benchmark_measures_both_world_sizes():
    # Its warm-up step had passed noise seed -1, which the noise generator refuses: the script died
    # before measuring anything.
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distributed.py"), "--batch", "4", "--K", "1",
                        "--iters", "1", "--preset", "small"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert any(ln.startswith("1 rank :") for ln in lines) and any(ln.startswith("2 ranks:") for ln in lines)
    assert "scaling:" in r.stdout
