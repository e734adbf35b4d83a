"""benchmarks/precision.py at toy size: both precisions run, and the figures it reports are sane."""
import pytest


@pytest.mark.slow   # stop 48: 13-95 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_precision_benchmark_measures_both_paths(load_benchmark):
    b = load_benchmark("precision")
    r = b.measure("small", n=4, sampler_steps=2, batch=4, K=2, rounds=1)
    for path in ("sample", "step"):
        assert r[path]["speedup"] > 0
    assert r["sample"]["fp32_images_per_s"] > 0 and r["step"]["bf16_ms"] > 0
    # The same network and seeds: bf16 rounds, it does not draw other images or another gradient.
    assert 0 <= r["pixel_diff_mean"] < 8 and 0 < r["grad_relative_diff"] < 0.05
    assert set(b.cpu_features()) >= {"capability"}


def test_precision_benchmark_speedup_is_fp32_time_over_bf16_time(load_benchmark, monkeypatch):
    # h88 F5: the test above asserts only speedup > 0, so inverted ratios (bf16 / fp32) passed. A fake clock:
    # sampling takes 2 s in fp32 and 1 s in bf16, the step 3 s and 1 s -> speed-ups 2x and 3x.
    import contextlib
    import types

    import torch

    import dpdm.sampling
    import dpdm.train

    b = load_benchmark("precision")
    clock = {"now": 0.0, "precision": "fp32"}
    b.time = types.SimpleNamespace(perf_counter=lambda: clock["now"])

    def generate(D, n, sampler_steps, batch_size=None, precision="fp32"):
        clock["now"] += {"fp32": 2.0, "bf16": 1.0}[precision]
        return torch.zeros((n, 1, 28, 28), dtype=torch.uint8), None

    def autocast_for(precision, device):
        clock["precision"] = precision
        return contextlib.nullcontext()

    def grad_sum(D, loss, batch, conditional, params):
        clock["now"] += {"fp32": 3.0, "bf16": 1.0}[clock["precision"]]
        return {k: torch.ones_like(p) for k, p in params.items()}, None

    monkeypatch.setattr(dpdm.sampling, "generate", generate)
    monkeypatch.setattr(dpdm.sampling, "autocast_for", autocast_for)
    monkeypatch.setattr(dpdm.train, "_nonprivate_grad_sum", grad_sum)
    r = b.measure("small", n=4, sampler_steps=2, batch=2, K=1, rounds=2)
    assert r["sample"]["speedup"] == 2.0 and r["step"]["speedup"] == 3.0
    assert r["sample"]["fp32_images_per_s"] == 2.0 and r["sample"]["bf16_images_per_s"] == 4.0
    assert r["step"]["fp32_ms"] == 3000.0 and r["step"]["bf16_ms"] == 1000.0


def test_precision_benchmark_refuses_out_of_range_options(load_benchmark, option_refused):
    # --rounds 0 had measured nothing and died on a KeyError ('bf16'); each is now argparse's one-line error.
    import pytest

    b = load_benchmark("precision")
    b.measure = lambda *a: pytest.fail("measured")
    for flag, value in (("--rounds", "0"), ("--n", "0"), ("--sampler-steps", "1"), ("--batch", "0"), ("--K", "0"),
                        ("--threads", "0"), ("--rounds", "x")):
        option_refused(b, "precision.py", flag, value)
