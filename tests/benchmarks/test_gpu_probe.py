"""benchmarks/gpu_probe.py's sizing rule: private steps first, then public steps, then a larger K."""
import pytest

SIZES = dict(size=4000, batch=1024, max_public=500, min_public=150, max_epochs=60.0, min_epochs=20.0, margin=1.2,
             n=10_000, K=2)


def test_fast_device_gets_the_whole_recipe_and_a_larger_k(load_benchmark):
    p = load_benchmark("gpu_probe")
    # H200 figures (stop 26): public 0.13 s, private 1.08 s at K 2 and 2.22 s at K 8 (1.46 s at K 4, interpolated)
    c = p.choose(seconds=700, eval_reserve=90, public_s=0.13, private_s={2: 1.08, 4: 1.46}, sample_s=0.002, **SIZES)
    assert c["private_steps"] == 235 and c["public_steps"] == 500   # 60 epochs: ceil(60 * 4000 / 1024) steps
    assert c["K"] == 4 and c["estimated_seconds"] <= 700
    c = p.choose(seconds=1000, eval_reserve=90, public_s=0.13, private_s={2: 1.08, 4: 1.46}, sample_s=0.002, **SIZES)
    assert c["K"] == 8 and c["estimated_seconds"] <= 1000


@pytest.mark.parametrize("seconds", [450, 550, 700])
def test_private_steps_come_before_public_steps_and_fit(load_benchmark, seconds):
    p = load_benchmark("gpu_probe")
    c = p.choose(seconds=seconds, eval_reserve=90, public_s=0.13, private_s={2: 2.2, 4: 2.4}, sample_s=0.002,
                 **SIZES)
    assert c["K"] == 2 and SIZES["min_epochs"] <= c["epochs"] <= SIZES["max_epochs"]
    assert c["estimated_seconds"] <= seconds
    assert c["private_steps"] == round(c["epochs"] * SIZES["size"] / SIZES["batch"])
    if c["private_steps"] < 235:   # public steps grow past the minimum only once no private step fits
        assert 1.2 * ((c["private_steps"] + 1) * 2.2 + 150 * 0.13) + 20 + 90 > seconds


def test_too_slow_a_device_gets_the_minimum(load_benchmark):
    p = load_benchmark("gpu_probe")
    c = p.choose(seconds=300, eval_reserve=90, public_s=0.2, private_s={2: 4.2, 4: 4.4}, sample_s=0.002, **SIZES)
    assert (c["private_steps"], c["public_steps"], c["K"]) == (79, 150, 2)
    assert c["estimated_seconds"] > 300   # it says so: the caller's timeout then keeps what finished


def test_step_times_chunk_rows_and_failures(load_benchmark):
    """gpu_step_times.py's engine-only rows: a time per chunk for rules and plain vmap, and an error row
    (not an exception) for a configuration that fails, so one bad entry does not cost the others."""
    t = load_benchmark("gpu_step_times")
    for mode in ("rules", "plain"):
        row = t.time_chunk("small", 2, 1, mode, device="cpu", repeats=1)
        assert row["chunk_s"] > 0 and "error" not in row and row["engine"] == mode
    assert "ValueError" in t.time_chunk("small", 2, 1, "fast", device="cpu")["error"]
    assert "preset" in t.time_chunk("huge", 2, 1, "rules", device="cpu")["error"]


def test_larger_k_only_where_its_memory_fits(load_benchmark):
    """H200 figures (stop 26, chunks of 1024): 19.3 GiB at K 2, 76.5 GiB at K 8, K 16 out of memory."""
    p = load_benchmark("gpu_probe")
    times = dict(seconds=1500, eval_reserve=90, public_s=0.13, sample_s=0.002)   # time allows 4K
    sizes = {**SIZES, "K": 4}
    # Memory (9.6 GiB per draw, extrapolated from K 4 and 8) does not: 153 GiB > 0.85 * 139.
    c = p.choose(private_s={4: 1.46, 8: 2.22}, private_gib={4: 38.4, 8: 76.5}, memory_gib=139.8, **times, **sizes)
    assert c["K"] == 8
    assert p.choose(private_s={4: 1.46, 8: 2.22}, **times, **sizes)["K"] == 16   # no memory figures: time alone
    c = p.choose(private_s={2: 1.08, 4: 1.46}, private_gib={2: 19.3, 4: 38.4}, memory_gib=139.8, **times, **SIZES)
    assert c["K"] == 8   # 76.6 GiB extrapolated: fits
    c = p.choose(private_s={2: 1.08, 4: 1.46}, private_gib={2: 19.3, 4: 38.4}, memory_gib=80.0, **times, **SIZES)
    assert c["K"] == 4   # on an 80 GiB card K 8 would not
