"""benchmarks/gpu_probe.py's sizing rule: private steps first, then public steps, then a larger K; its
out-of-memory handling; gpu_step_times.py's chunk check; and gpu_run.sh's engine choice, chunk check and
time guard (run with a stub PYTHON)."""
import json
import os
import subprocess
import sys
from pathlib import Path

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


def _probe_main(p, monkeypatch, tmp_path, *, n: int, oom_k: int | None, error=None) -> tuple[dict, list[int]]:
    """gpu_probe.main on the CPU with the timing, the data and the sampling stubbed: (its JSON, the sample
    counts it asked for). A private step at K = oom_k raises `error` (torch.OutOfMemoryError by default)."""
    import torch

    sampled = []
    monkeypatch.setattr("dpdm.datasets.load_dataset", lambda name, split: list(range(20_000)))
    monkeypatch.setattr("dpdm.sample.sample_checkpoint", lambda path, *, n, **kw: sampled.append(n))

    def time_steps(doc, data, run_dir, *, private, **kw):
        if private and doc.plan.noise_multiplicity == oom_k:
            raise error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")
        return 1.0 if private else 0.1

    monkeypatch.setattr(p, "time_steps", time_steps)
    plan, out = tmp_path / "plan.json", tmp_path / "probe.json"
    monkeypatch.setattr(sys, "argv", ["gpu_probe.py", "--device", "cpu", "--model", "small", "--K", "2",
                                      "--n", str(n), "--seconds", "5000", "--eval-reserve", "10",
                                      "--min-public-steps", "10", "--max-public-steps", "20",
                                      "--plan-out", str(plan), "--json", str(out)])
    p.main()
    return json.loads(out.read_text()), sampled



def test_out_of_memory_is_dpdms_own_test_of_an_error_or_a_rows_text(load_benchmark):
    """The probe and gpu_step_times.py judge out-of-memory with the predicate `dpdm train` and the CLI use
    (`dpdm.memory.out_of_memory`, h135 F2, stop 53), on errors and on a row's "Type: message"."""
    from dpdm.memory import out_of_memory

    p = load_benchmark("gpu_probe")
    assert p.out_of_memory is out_of_memory
    assert p.out_of_memory("RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    assert p.out_of_memory("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not p.out_of_memory("RuntimeError: CUDA error: an illegal memory access was encountered")
    assert p.out_of_memory(MemoryError()) and not p.out_of_memory(ValueError("out of memory"))

def test_probe_goes_on_at_k_when_2k_runs_out_of_memory(load_benchmark, monkeypatch, tmp_path, capsys):
    """On an 80 GB H100, plain vmap at 2K (K 4, chunks of 1024: 118.9 GiB on the H200) runs out of memory:
    the probe records it and sizes the run at K, instead of failing (and gpu_run.sh with it, exit 3)."""
    p = load_benchmark("gpu_probe")
    probe, _ = _probe_main(p, monkeypatch, tmp_path, n=20, oom_k=4)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("PUBLIC_STEPS=") and last.endswith(" K=2")
    assert probe["choice"]["K"] == 2 and probe["timings"]["out_of_memory_K"] == 4
    assert probe["timings"]["private_step_s"] == {"2": 1.0}
    assert json.loads((tmp_path / "plan.json").read_text())["noise_multiplicity"] == 2


@pytest.mark.parametrize("message", ["CUDA error: out of memory",
                                     "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"])
def test_probe_goes_on_at_k_when_2k_fails_to_allocate_in_a_runtime_error(load_benchmark, monkeypatch, tmp_path,
                                                                          capsys, message):
    """h113 N1: CUDA and cuBLAS report a failed allocation as a plain RuntimeError, which ended the whole probe
    (and gpu_run.sh with it); another RuntimeError still does."""
    p = load_benchmark("gpu_probe")
    probe, _ = _probe_main(p, monkeypatch, tmp_path, n=20, oom_k=4, error=RuntimeError(message))
    assert probe["choice"]["K"] == 2 and probe["timings"]["out_of_memory_K"] == 4
    with pytest.raises(RuntimeError, match="device-side assert"):
        _probe_main(p, monkeypatch, tmp_path, n=20, oom_k=4, error=RuntimeError("CUDA error: device-side assert"))


def test_probe_samples_as_many_images_as_the_run_at_most(load_benchmark, monkeypatch, tmp_path, capsys):
    """The sampling rate is measured on min(1000, max(100, n)) images: a CPU dry run's --n 20 samples 100,
    not 1000 (about 140 s on this CPU)."""
    p = load_benchmark("gpu_probe")
    assert _probe_main(p, monkeypatch, tmp_path, n=20, oom_k=None)[1] == [100]
    assert _probe_main(p, monkeypatch, tmp_path, n=10_000, oom_k=None)[1] == [1000]


def test_choose_with_k_alone(load_benchmark):
    """Where 2K ran out of memory only K was timed: K stays, whatever time is left."""
    p = load_benchmark("gpu_probe")
    c = p.choose(seconds=1500, eval_reserve=90, public_s=0.13, private_s={2: 1.08}, sample_s=0.002,
                 private_gib={2: 62.8}, memory_gib=79.1, **SIZES)
    assert c["K"] == 2 and c["private_steps"] == 235 and c["public_steps"] == 500


def _chunk_table(monkeypatch, t, table: dict, memory_gib: float) -> list[str]:
    """gpu_step_times.time_chunk answering from `table` ("plain:1024" -> row figures; absent: out of memory)."""
    timed = []

    def time_chunk(model, n, k, mode, *, device, repeats=3, clipped=False):
        timed.append(f"{mode}:{n}")
        row = {"model": model, "chunk": n, "K": k, "engine": mode, "clipped": clipped, "memory_gib": memory_gib}
        return {**row, **table.get(f"{mode}:{n}", {"error": "OutOfMemoryError: CUDA out of memory"})}

    monkeypatch.setattr(t, "time_chunk", time_chunk)
    return timed


def test_fit_chunk_halves_the_chunk_then_tries_the_rules(load_benchmark, monkeypatch):
    t = load_benchmark("gpu_step_times")
    fit = dict(device="cuda", log=lambda _: None)
    # H200 (139.8 GiB): stop 27's K 4 in chunks of 1024, 118.9 GiB (85%), is kept at FIT_SHARE 0.9.
    timed = _chunk_table(monkeypatch, t, {"plain:1024": {"chunk_s": 1.0, "peak_gib": 118.9}}, 139.8)
    assert t.fit_chunk("mnist", 1024, 4, "plain", share=0.9, **fit)["physical"] == 1024 and timed == ["plain:1024"]
    # H100 (79.1 GiB): 1024 runs out of memory, 512 fits.
    timed = _chunk_table(monkeypatch, t, {"plain:512": {"chunk_s": 0.6, "peak_gib": 60.0}}, 79.1)
    r = t.fit_chunk("mnist", 1024, 4, "plain", share=0.9, **fit)
    assert (r["physical"], r["engine"], timed) == (512, "plain", ["plain:1024", "plain:512"])
    # A peak over the share counts as not fitting; below a quarter of PHYSICAL, the rules.
    timed = _chunk_table(monkeypatch, t, {"plain:256": {"chunk_s": 0.3, "peak_gib": 75.0},
                                          "rules:1024": {"chunk_s": 1.5, "peak_gib": 38.0}}, 79.1)
    r = t.fit_chunk("mnist", 1024, 4, "plain", share=0.9, **fit)
    assert (r["physical"], r["engine"]) == (1024, "rules")
    assert timed == ["plain:1024", "plain:512", "plain:256", "rules:1024"]
    # Nothing fits: None. A failure that is not memory stops at once.
    _chunk_table(monkeypatch, t, {}, 79.1)
    assert t.fit_chunk("mnist", 1024, 4, "plain", share=0.9, **fit) is None
    timed = _chunk_table(monkeypatch, t, {"rules:64": {"error": "ValueError: no such preset"}}, 79.1)
    assert t.fit_chunk("huge", 64, 2, "rules", share=0.9, **fit) is None and timed == ["rules:64"]
    # Rows timed before (gpu_run.sh's engine choice, clipped) are not timed again.
    timed = _chunk_table(monkeypatch, t, {}, 79.1)
    known = [{"model": "mnist", "chunk": 1024, "K": 4, "engine": "rules", "clipped": True, "chunk_s": 1.5,
              "peak_gib": 38.0, "memory_gib": 79.1}]
    assert t.fit_chunk("mnist", 1024, 4, "rules", share=0.9, known=known, **fit)["physical"] == 1024
    assert timed == []


def test_fit_chunk_halves_on_allocation_failures_raised_as_runtime_errors(load_benchmark, monkeypatch):
    """h113 N1: a chunk that fails to allocate with a RuntimeError (CUDA's "out of memory", cuBLAS's or cuDNN's
    ALLOC_FAILED) is out of memory too: halved, as for torch's OutOfMemoryError, not the end of the fit (exit 3)."""
    t = load_benchmark("gpu_step_times")
    for error in ("RuntimeError: CUDA error: out of memory",
                  "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
                  "RuntimeError: cuDNN error: CUDNN_STATUS_ALLOC_FAILED"):
        timed = _chunk_table(monkeypatch, t, {"plain:1024": {"error": error},
                                              "plain:512": {"chunk_s": 0.6, "peak_gib": 60.0}}, 79.1)
        r = t.fit_chunk("mnist", 1024, 4, "plain", device="cuda", share=0.9, log=lambda _: None)
        assert r is not None and (r["physical"], r["chunk_s"], timed) == (512, 0.6, ["plain:1024", "plain:512"])


def test_chunk_fits_judges_the_reserved_peak_too(load_benchmark):
    """h113 F2: the process holds what its caching allocator reserved, not only what it allocated; a chunk
    whose reserved peak is over the share does not fit, whatever its allocated peak."""
    t = load_benchmark("gpu_step_times")
    row = {"chunk_s": 0.6, "peak_gib": 60.0, "memory_gib": 79.1}   # 60 GiB allocated: within 90% (71.2 GiB)
    assert t.chunk_fits(row, 0.9)
    assert not t.chunk_fits({**row, "reserved_gib": 75.0}, 0.9)
    assert t.chunk_fits({**row, "reserved_gib": 70.0}, 0.9)


def _without_probe(p, monkeypatch, tmp_path, capsys, *, chunk_s: float, physical: int, seconds: float,
                   **options) -> tuple[int, str, str, dict | None]:
    """gpu_probe.py --chunk-s (gpu_run.sh's PROBE=0 sizing) with the recommended run's variables: (exit code,
    stdout's last line, stderr, the plan written, uncalibrated (the accountant takes seconds a plan), or None)."""
    plan = tmp_path / "plan.json"
    plan.unlink(missing_ok=True)
    monkeypatch.setattr(p.quality, "default_plan", lambda **kw: p.quality.plan_shape(**kw))
    monkeypatch.setattr(p.accounting, "write_plan", lambda shape, path: Path(path).write_text(json.dumps(
        {"steps": shape.steps, "noise_multiplicity": shape.noise_multiplicity})))
    argv = {"--chunk-s": chunk_s, "--physical-batch": physical, "--seconds": seconds, "--batch-size": 1024,
            "--K": 4, "--clip-norm": 0.1, "--n": 10_000, "--eval-reserve": 90, "--margin": 1.2,
            "--max-public-steps": 900, "--min-public-steps": 150, "--max-epochs": 60, "--min-epochs": 20, **options}
    monkeypatch.setattr(sys, "argv", ["gpu_probe.py", "--plan-out", str(plan),
                                      *[str(x) for kv in argv.items() for x in kv]])
    code = 0
    try:
        p.main()
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, (out.strip().splitlines() or [""])[-1], err, json.loads(plan.read_text()) if plan.exists() else None


def test_without_probe_the_run_is_sized_from_the_chunk_time(load_benchmark, monkeypatch, tmp_path, capsys):
    """h113 F1: with PROBE=0 gpu_run.sh trained the whole plan whatever the chunk check found. On the H200 the
    recommended run fits as given (a chunk of 1024 x K 4 about 0.7 s: the probe's 1.03 s step less the 0.32 s
    its K 2 step spent beyond the 0.42 s chunk); on an H100 in chunks of 512 (0.75 s each, 2 a step) it does not,
    and the public steps, then the epochs, are lowered to fit, saying so; where even the minimum does not fit,
    exit 3 and no plan."""
    p = load_benchmark("gpu_probe")
    code, last, err, plan = _without_probe(p, monkeypatch, tmp_path, capsys, chunk_s=0.7, physical=1024,
                                           seconds=509)   # 550 s less the chunk check's 26 s and 15
    assert (code, last, plan["steps"], plan["noise_multiplicity"]) == (0, "PUBLIC_STEPS=900 EPOCHS=60 K=4", 235, 4)
    assert "235 private steps (60 epochs) and 900 public steps fit the 509 s left" in err
    code, last, err, plan = _without_probe(p, monkeypatch, tmp_path, capsys, chunk_s=0.75, physical=512,
                                           seconds=509)
    # (509 - 90 - 20 sampling) / 1.2 = 332.5 s of training: 150 public steps (19.5 s) leave room for 208 private
    # steps of 1.5 s, and the 20.5 s then left for 157 public steps.
    assert (code, last, plan["steps"]) == (0, "PUBLIC_STEPS=157 EPOCHS=53.248 K=4", 208)
    assert "235 private steps (60 epochs) and 900 public steps do not fit the 509 s left (about 673.4 s" in err
    assert "EPOCHS 60 -> 53.25 (208 private steps), PUBLIC_STEPS 900 -> 157 (about 508.9 s)" in err
    code, last, err, plan = _without_probe(p, monkeypatch, tmp_path, capsys, chunk_s=3.0, physical=512,
                                           seconds=509)
    assert (code, plan) == (3, None) and len(err.strip().splitlines()) == 1
    assert err.startswith("no time left for the smallest run: 79 private steps") and "MIN_EPOCHS" in err
    # A CPU dry run's 4 public steps (under MIN_PUBLIC_STEPS) keep no time for 150 from the private steps.
    code, last, err, plan = _without_probe(p, monkeypatch, tmp_path, capsys, chunk_s=1.0, physical=64, seconds=600,
                                           **{"--batch-size": 64, "--max-public-steps": 4, "--max-epochs": 0.1,
                                              "--n": 20})
    assert (code, last, plan["steps"]) == (0, "PUBLIC_STEPS=4 EPOCHS=0.1 K=4", 7)


FAKE_STEP_TIMES = '''
import json, os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import gpu_step_times as t
TABLE = json.loads(os.environ["STUB_CHUNKS"])

def time_chunk(model, n, k, mode, *, device, repeats=3, clipped=False):
    with open(os.environ["STUB_LOG"], "a") as f:
        f.write(f"chunk {mode}:{n}:{k}\\n")
    row = {"model": model, "chunk": n, "K": k, "engine": mode, "memory_gib": float(os.environ["STUB_MEMORY_GIB"])}
    if clipped:
        row["clipped"] = True
    return {**row, **TABLE.get(f"{mode}:{n}", {"error": "OutOfMemoryError: CUDA out of memory"})}

t.time_chunk = time_chunk
t.main()
'''

STUB_PYTHON = '''#!/usr/bin/env bash
echo "alloc $1 ${PYTORCH_CUDA_ALLOC_CONF-unset}" >> "$STUB_LOG"   # the allocator setting each process gets
case "$1" in
-) cat >/dev/null; echo "python (stub)" ;;
benchmarks/gpu_step_times.py) shift; exec "$REAL_PYTHON" "$FAKE_STEP_TIMES" "$@" ;;
benchmarks/quality.py) echo "quality.py $*" >> "$STUB_LOG" ;;
*) exec "$REAL_PYTHON" "$@" ;;
esac
'''


def _gpu_run(tmp_path, chunks: dict, memory_gib: float, **env):
    """benchmarks/gpu_run.sh run with a stub PYTHON: the chunk timings come from `chunks` (as in _chunk_table),
    quality.py only logs its arguments, the rest (the engine choice, the plan) runs for real.
    Returns (the completed process, the stub's log lines, probe.log)."""
    root = Path(__file__).resolve().parents[2]
    (tmp_path / "fake_step_times.py").write_text(FAKE_STEP_TIMES)
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    log = tmp_path / "stub.log"
    log.write_text("")
    mine = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    run_env = {**mine, "PYTHON": str(stub), "REAL_PYTHON": sys.executable,
               "FAKE_STEP_TIMES": str(tmp_path / "fake_step_times.py"), "STUB_LOG": str(log),
               "STUB_CHUNKS": json.dumps(chunks), "STUB_MEMORY_GIB": str(memory_gib), "SKIP_INSTALL": "1",
               "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "DPDM_CACHE": str(tmp_path / "cache"),
               "OMP_WAIT_POLICY": "PASSIVE", "PROBE": "0", "K": "4", "PHYSICAL": "1024", **env}
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_run.sh"), "run"], env=run_env,
                          capture_output=True, text=True, timeout=300)
    probe_log = (tmp_path / "out" / "probe.log")
    return proc, log.read_text().splitlines(), probe_log.read_text() if probe_log.exists() else ""


def _allocator(lines: list[str]) -> set[str]:
    """The PYTORCH_CUDA_ALLOC_CONF that the chunk check and the two quality.py processes ran with."""
    return {line.split()[2] for line in lines if line.startswith("alloc benchmarks/")}


def _quality_args(lines: list[str]) -> list[str]:
    calls = [line for line in lines if line.startswith("quality.py ")]
    assert len(calls) == 2, lines   # the baseline process and the generator's
    return next(c for c in calls if "--skip-baseline" in c).split()


@pytest.mark.slow   # 13 s on 2 cores: the default suite stays under 15 minutes
def test_gpu_run_engine_choice_applies_the_memory_rule(tmp_path):
    """On an 80 GB H100, plain vmap at K 4 in chunks of 1024 (0.6 s, 118.9 GiB) is faster than the rules
    (1.0 s, 38 GiB) but over 80% of the memory: `dpdm train --grad-engine auto`'s rule takes the rules, and
    gpu_run.sh must too (it had dropped the peaks). The PROBE=0 chunk check reuses the rows it timed."""
    chunks = {"rules:1024": {"chunk_s": 1.0, "peak_gib": 38.0}, "plain:1024": {"chunk_s": 0.6, "peak_gib": 118.9}}
    proc, lines, probe_log = _gpu_run(tmp_path, chunks, 79.1, PYTORCH_CUDA_ALLOC_CONF="max_split_size_mb:512")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "grad engine: rules" in probe_log
    args = _quality_args(lines)
    assert args[args.index("--grad-engine") + 1] == "rules" and args[args.index("--physical-batch") + 1] == "1024"
    assert [line for line in lines if line.startswith("chunk ")] == ["chunk rules:1024:4", "chunk plain:1024:4"]
    assert _allocator(lines) == {"max_split_size_mb:512"}   # the user's own allocator setting is kept


@pytest.mark.slow   # 7 s on 2 cores: the default suite stays under 15 minutes
def test_gpu_run_without_probe_halves_a_chunk_that_does_not_fit(tmp_path):
    """The recommended run (PROBE=0 K=4 GRAD_ENGINE=vmap, chunks of 1024) on an H100: one chunk is checked
    before training, and the run trains in chunks of 512, saying so, instead of failing at its first
    private step after the public ones."""
    chunks = {"plain:512": {"chunk_s": 0.6, "peak_gib": 60.0}}
    proc, lines, probe_log = _gpu_run(tmp_path, chunks, 79.1, GRAD_ENGINE="vmap")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = _quality_args(lines)
    assert args[args.index("--grad-engine") + 1] == "vmap" and args[args.index("--physical-batch") + 1] == "512"
    assert "fit: PHYSICAL=512 GRAD_ENGINE=vmap" in probe_log and "chunks of 512" in probe_log


@pytest.mark.slow   # 8 s on 2 cores: the default suite stays under 15 minutes
def test_gpu_run_without_probe_sizes_the_run_to_the_chunk_it_trains_with(tmp_path):
    """h113 F1, F2: the recommended run (PROBE=0 K=4 GRAD_ENGINE=vmap PUBLIC_STEPS=900 EPOCHS=60) on an H100,
    where the chunk check halves the chunk to 512 (0.75 s, two a step): it wrote the whole 60-epoch plan and ran
    the 900 public steps, about 670 s of the 550 s budget, and said nothing. Now it lowers PUBLIC_STEPS, then
    EPOCHS, to fit, saying so in probe.log; and every process runs with the allocator's expandable segments."""
    chunks = {"plain:512": {"chunk_s": 0.75, "peak_gib": 60.0}}
    proc, lines, probe_log = _gpu_run(tmp_path, chunks, 79.1, GRAD_ENGINE="vmap", PUBLIC_STEPS="900", EPOCHS="60")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    args = _quality_args(lines)
    public_steps = int(args[args.index("--public-steps") + 1])
    plan = json.loads((tmp_path / "work" / "plan.json").read_text())
    assert 150 <= public_steps < 900 and 79 <= plan["steps"] < 235 and args[args.index("--physical-batch") + 1] == "512"
    assert "900 public steps do not fit the" in probe_log and f"PUBLIC_STEPS 900 -> {public_steps}" in probe_log
    assert f"({plan['steps']} private steps)" in probe_log
    assert _allocator(lines) == {"expandable_segments:True"}


@pytest.mark.slow   # 7 s on 2 cores: the default suite stays under 15 minutes
def test_gpu_run_stops_when_no_time_is_left(tmp_path):
    """Fewer than 30 s left before quality.py: exit 3 with a line, not `timeout 0` (no limit at all) or a
    negative timeout (nothing runs, rc 125)."""
    chunks = {"rules:1024": {"chunk_s": 1.0, "peak_gib": 38.0}}
    proc, lines, probe_log = _gpu_run(tmp_path, chunks, 79.1, GRAD_ENGINE="rules", BUDGET_S="20")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "no time left" in proc.stdout and not [line for line in lines if line.startswith("quality.py")]


@pytest.mark.parametrize("script, flag, value", [
    ("gpu_probe", "--n", "0"), ("gpu_probe", "--K", "-1"), ("gpu_probe", "--physical-batch", "0"),
    ("gpu_probe", "--seconds", "nan"), ("gpu_probe", "--margin", "0.5"),
    ("gpu_step_times", "--steps", "1"), ("gpu_step_times", "--batch-size", "0"),
    ("quality_sweep", "--batch", "0"), ("quality_sweep", "--threads", "0"), ("quality_sweep", "--epochs", "0"),
])
def test_gpu_scripts_and_the_sweep_refuse_out_of_range_counts(load_benchmark, option_refused, script, flag, value):
    # Bare type=int/float let --n 0 or --steps 1 through to a traceback (or a probe with no timing) after minutes
    # of set-up on the GPU; now argparse's one line, exit 2, before anything runs.
    option_refused(load_benchmark(script), f"{script}.py", flag, value)
