"""benchmarks/plan.py (run by `make bench`): its options."""
import pytest


@pytest.mark.parametrize("flag", ["--repeats", "--opacus-repeats"])
def test_plan_benchmark_refuses_zero_repeats(load_benchmark, option_refused, flag):
    # 0 ended in statistics.StatisticsError (a median of no timings); --opacus-repeats 0 only after running
    # `dpdm plan` three times first.
    b = load_benchmark("plan")
    b.time_dpdm = b.time_opacus = lambda *a: pytest.fail("ran a plan")
    option_refused(b, "plan.py", flag, "0")
