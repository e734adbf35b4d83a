"""benchmarks/precision.py at toy size: both precisions run, and the figures it reports are sane."""


def test_precision_benchmark_measures_both_paths(load_benchmark):
    b = load_benchmark("precision")
    r = b.measure("small", n=4, sampler_steps=2, batch=4, K=2, rounds=1)
    for path in ("sample", "step"):
        assert r[path]["speedup"] > 0
    assert r["sample"]["fp32_images_per_s"] > 0 and r["step"]["bf16_ms"] > 0
    # The same network and seeds: bf16 rounds, it does not draw other images or another gradient.
    assert 0 <= r["pixel_diff_mean"] < 8 and 0 < r["grad_relative_diff"] < 0.05
    assert set(b.cpu_features()) >= {"capability"}


def test_precision_benchmark_refuses_out_of_range_options(load_benchmark, option_refused):
    # --rounds 0 had measured nothing and died on a KeyError ('bf16'); each is now argparse's one-line error.
    import pytest

    b = load_benchmark("precision")
    b.measure = lambda *a: pytest.fail("measured")
    for flag, value in (("--rounds", "0"), ("--n", "0"), ("--sampler-steps", "1"), ("--batch", "0"), ("--K", "0"),
                        ("--threads", "0"), ("--rounds", "x")):
        option_refused(b, "precision.py", flag, value)
