"""benchmarks/audit.py: its options."""
import pytest


def test_audit_benchmark_refuses_zero_threads(load_benchmark, option_refused):
    # --threads 0 trained nothing and died in torch.set_num_threads with a RuntimeError traceback.
    b = load_benchmark("audit")
    b.make_run = lambda workdir: pytest.fail("made a run")
    option_refused(b, "audit.py", "--threads", "0")
