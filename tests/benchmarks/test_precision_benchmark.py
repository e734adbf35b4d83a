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
