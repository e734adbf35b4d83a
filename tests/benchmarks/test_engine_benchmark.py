"""benchmarks/engine.py: its options and the ratios it prints against the peers measured in the same run."""
import sys

import pytest


def _main(b, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["engine.py", *map(str, argv)])
    b.main()


@pytest.mark.parametrize("flag, value", [("--rounds", "0"), ("--repeats", "0"), ("--warmup", "-1"), ("--batch", "0"),
                                         ("--K", "0"), ("--threads", "0"), ("--chunk-size", "0"),
                                         ("--max-opacus-gib", "nan")])
def test_engine_benchmark_refuses_out_of_range_options(load_benchmark, option_refused, flag, value):
    # --rounds 0 had run nothing and died formatting n_params None; --repeats 0 on min() of no timings.
    b = load_benchmark("engine")
    b._run_variant = lambda args, v: pytest.fail("ran a variant")
    option_refused(b, "engine.py", flag, value)


def _fake_run(ms: dict, mib: dict):
    def run(args, v):
        return {"variant": v, "wall": [ms[v] / 1e3], "cpu": [ms[v] / 2e3], "peak_mib": mib[v], "n_params": 1000}
    return run


def test_engine_benchmark_prints_vmap_against_dpdm(load_benchmark, monkeypatch, capsys):
    # docs/performance.md cites `--variants dpdm,vmap` for plain vmap against dpdm's rules: that run printed
    # no ratio between the two (only against nonprivate, and a dpdm / opacus line).
    b = load_benchmark("engine")
    b._run_variant = _fake_run({"dpdm": 200.0, "vmap": 300.0}, {"dpdm": 100.0, "vmap": 250.0})
    _main(b, monkeypatch, "--variants", "dpdm,vmap", "--rounds", "1")
    out = capsys.readouterr().out.splitlines()
    assert "vmap / dpdm: wall 1.50x, cpu 1.50x, memory 2.50x" in out
    assert not any(line.startswith("dpdm / opacus") for line in out)


def test_engine_benchmark_ratio_lines_for_every_pair_that_ran(load_benchmark, monkeypatch, tmp_path, capsys):
    import json

    b = load_benchmark("engine")
    ms = {"nonprivate": 100.0, "dpdm": 150.0, "opacus": 300.0, "vmap": 120.0}
    b._run_variant = _fake_run(ms, {"nonprivate": 50.0, "dpdm": 100.0, "opacus": 400.0, "vmap": 0.0})
    _main(b, monkeypatch, "--variants", "nonprivate,dpdm,opacus,vmap", "--rounds", "1", "--json", tmp_path / "e.json")
    out = capsys.readouterr().out.splitlines()
    assert "dpdm / opacus: wall 0.50x, cpu 0.50x, memory 0.25x" in out     # the line as it was
    assert "vmap / dpdm: wall 0.80x, cpu 0.80x, memory 0.00x" in out
    assert json.loads((tmp_path / "e.json").read_text())["ratios"]["vmap / dpdm"]["wall"] == pytest.approx(0.8)
    # a peer whose peak-memory increase read 0 (ru_maxrss did not move): time ratios only, no division by zero
    assert b.format_ratios(b.peer_ratios({"dpdm": {"wall_min_ms": 2.0, "cpu_min_ms": 3.0, "peak_mib": 0.0},
                                          "vmap": {"wall_min_ms": 1.0, "cpu_min_ms": 1.0, "peak_mib": 5.0}})) == [
        "vmap / dpdm: wall 0.50x, cpu 0.33x"]


def test_engine_benchmark_header_says_the_physical_batch_of_every_variant(load_benchmark, monkeypatch, capsys):
    # --chunk-size reached dpdm alone, and the header read the same with it as without: the dpdm / opacus memory
    # ratio then set a chunked dpdm against an opacus holding all B*K rows at once, and nothing printed said so.
    b = load_benchmark("engine")
    ms = {"nonprivate": 100.0, "dpdm": 150.0, "opacus": 300.0}
    b._run_variant = _fake_run(ms, {"nonprivate": 50.0, "dpdm": 100.0, "opacus": 400.0})
    _main(b, monkeypatch, "--batch", "16", "--K", "2", "--chunk-size", "4", "--rounds", "1")
    out = capsys.readouterr().out.splitlines()
    assert "B=16, K=2 (32 rows), chunk=4, threads=" in out[0]
    assert out[1] == ("physical batch: chunk=4 examples (8 rows) per pass, 4 passes per step, every variant "
                      "(opacus: clipped sums accumulated; nonprivate: gradients accumulated)")
    _main(b, monkeypatch, "--batch", "16", "--K", "2", "--rounds", "1")
    out = capsys.readouterr().out.splitlines()
    assert "(32 rows), chunk=none, threads=" in out[0]
    assert out[1] == "physical batch: all 16 examples (32 rows) in one pass, every variant"


@pytest.mark.parametrize("order", ["opacus,dpdm", "dpdm,opacus"])
def test_engine_benchmark_max_opacus_gib_holds_whatever_the_order(load_benchmark, monkeypatch, capsys, order):
    # h135 F4: the parameter count came from the first variant's run, so opacus listed first ran in round 1 and was
    # skipped in round 2 alone, its table then holding both a measured opacus row and a "skipped" one.
    b = load_benchmark("engine")
    ran = []
    fake = _fake_run({"dpdm": 200.0, "opacus": 300.0}, {"dpdm": 100.0, "opacus": 400.0})
    b._run_variant = lambda args, v: ran.append(v) or {**fake(args, v), "n_params": 223_937}   # small's, as run
    # small preset, B 2, K 1: 2 rows of 223,937 float32 gradients, 1.67 MiB of grad_sample
    _main(b, monkeypatch, "--variants", order, "--preset", "small", "--batch", "2", "--K", "1",
          "--max-opacus-gib", "0.001", "--rounds", "2")
    out = capsys.readouterr().out.splitlines()
    assert ran == ["dpdm", "dpdm"]
    assert "preset=small (223,937 params)" in out[0]
    assert not any(line.split("|")[0].strip() == "opacus" and "skipped" not in line for line in out)
    assert ("     opacus | skipped: B*K*P*4 bytes = 0.00167 GiB of grad_sample per pass > --max-opacus-gib 0.001"
            in out)
    assert not any(line.startswith("dpdm / opacus") for line in out)
    # under the limit, opacus runs in every round, first or not
    ran.clear()
    _main(b, monkeypatch, "--variants", order, "--preset", "small", "--batch", "2", "--K", "1",
          "--max-opacus-gib", "0.002", "--rounds", "2")
    assert ran == order.split(",") * 2
    assert "dpdm / opacus: wall 0.67x, cpu 0.67x, memory 0.25x" in capsys.readouterr().out.splitlines()


def test_engine_benchmark_refuses_an_unknown_preset(load_benchmark, monkeypatch, capsys):
    # the parameter count is taken before any variant runs: an unknown preset is one line, exit 2, nothing run
    b = load_benchmark("engine")
    b._run_variant = lambda args, v: pytest.fail("ran a variant")
    with pytest.raises(SystemExit) as e:
        _main(b, monkeypatch, "--preset", "nope")
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: --preset: preset='nope' must be one of" in last, last


def _noise_free_steps(b, variant: str, B: int, K: int, chunk_size, clip_norm: float):
    """(trainable parameter names, step function) of `variant` on a fresh small model, without noise."""
    D, loss, batch, _ = b._setup("small", B, K)
    names = [n for n, p in D.named_parameters() if p.requires_grad]
    return D, loss, batch, names, b._step_fn(variant, D, loss, batch, K, chunk_size, clip_norm=clip_norm,
                                              noise_multiplier=0.0)


def _flat(out, names):
    """One vector of a step's output: a {name: grad} dict (dpdm, nonprivate) or a list in parameter order (opacus)."""
    import torch

    return torch.cat([t.reshape(-1) for t in ([out[n] for n in names] if isinstance(out, dict) else out)])


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("clip_norm", [1e-3, 1e3])     # every example clipped; none clipped
def test_engine_benchmark_opacus_peer_computes_dpdms_clipped_sum(load_benchmark, chunk_size, clip_norm):
    # The dpdm / opacus ratio means something only if both compute the same clipped, K-averaged sum; the other
    # tests stub the steps out. Without noise the two agree to float rounding; a peer that summed over K, used
    # loss_reduction="mean", or clipped per row before averaging would differ by far more (in one of the two
    # clipping regimes). chunk_size 2 of B 3: uneven physical batches, accumulated.
    pytest.importorskip("opacus")     # the `bench` extra
    b = load_benchmark("engine")
    B, K = 3, 2
    *_, names, dpdm_step = _noise_free_steps(b, "dpdm", B, K, chunk_size, clip_norm)
    d = _flat(dpdm_step(), names)
    *_, names_o, opacus_step = _noise_free_steps(b, "opacus", B, K, chunk_size, clip_norm)
    assert names_o == names
    o = _flat(opacus_step(), names)
    assert d.norm() > 0
    assert (d - o).norm() <= 1e-5 * d.norm(), ((d - o).norm().item(), d.norm().item())
    if clip_norm < 1:   # every example clipped to C: the sum's norm is at most B*C, divided by B
        assert d.norm() <= clip_norm * (1 + 1e-5)


@pytest.mark.parametrize("variant", ["opacus", "dpdm"])
def test_engine_benchmark_peers_add_the_same_dp_noise(load_benchmark, variant):
    # h88 F5: the peer-equivalence test runs without noise, so an Opacus peer that skipped its noise (less work than
    # dpdm's step, flattering Opacus in the ratio) passed. The step's output minus its noise-free output is the
    # noise on the mean: N(0, (sigma C / B)^2) in every coordinate.
    if variant == "opacus":
        pytest.importorskip("opacus")     # the `bench` extra
    b = load_benchmark("engine")
    B, K, C, sigma = 3, 2, 0.5, 2.0
    *_, names, clean = _noise_free_steps(b, variant, B, K, None, C)
    D, loss, batch, _ = b._setup("small", B, K)   # the same model and batch again (Opacus hooks a model once)
    noisy = b._step_fn(variant, D, loss, batch, K, None, clip_norm=C, noise_multiplier=sigma)
    diff = (_flat(noisy(), names) - _flat(clean(), names)).double()
    assert diff.numel() > 10_000      # the std below is then within about 1% of its true value
    assert diff.std().item() == pytest.approx(sigma * C / B, rel=0.03)
    assert abs(diff.mean().item()) < 0.05 * sigma * C / B


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_engine_benchmark_nonprivate_step_is_the_mean_loss_gradient(load_benchmark, chunk_size):
    # the baseline of the `x nonpriv` columns: the gradient of the plain mean loss over the B examples, chunked or not
    import torch

    b = load_benchmark("engine")
    D, loss, batch, names, step = _noise_free_steps(b, "nonprivate", 3, 2, chunk_size, 1.0)
    n = _flat(step(), names)
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(D, *batch).mean(),
                                                                [p for p in D.parameters() if p.requires_grad])])
    assert (n - ref).norm() <= 1e-5 * ref.norm()


@pytest.mark.parametrize("variant", ["nonprivate", "opacus"])
def test_engine_benchmark_peers_run_the_chunk_size_rows_per_pass(load_benchmark, variant):
    # opacus and nonprivate ran all B*K rows in one pass whatever --chunk-size said (dpdm's chunking: tests/engine).
    if variant == "opacus":
        pytest.importorskip("opacus")
    b = load_benchmark("engine")
    D, loss, batch, names, step = _noise_free_steps(b, variant, 3, 2, 2, 1.0)
    rows = []
    D.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    step()
    assert rows == [4, 2]


def test_engine_benchmark_times_the_dpdm_of_its_own_tree(tmp_path):
    # h113 F3: engine.py put only benchmarks/ on sys.path, so its workers (run as scripts from the tree's root)
    # imported whatever dpdm the venv's editable install points at: a second checkout sharing the venv timed
    # another tree's engine against Opacus, and nothing said so. A copy of the benchmark beside a dpdm that stops
    # when imported must import that one.
    from tests.benchmarks.conftest import run_beside_stand_in

    proc = run_beside_stand_in(tmp_path, "engine.py", "dpdm", "imported the dpdm beside the benchmark", "--worker",
                               "dpdm", "--preset", "small", "--batch", "1", "--K", "1", "--threads", "1",
                               "--repeats", "1", "--warmup", "0")
    assert "imported the dpdm beside the benchmark" in proc.stderr, proc.stdout + proc.stderr[-2000:]


def test_engine_benchmark_without_opacus_skips_it_and_keeps_the_others(load_benchmark, monkeypatch, tmp_path, capsys):
    # h156 F4 (stop 55): without opacus (a venv made without the bench extra), its subprocess failed on the import
    # after nonprivate and dpdm had run, and the benchmark died in a nested traceback, their results lost.
    import importlib.util
    import json

    b = load_benchmark("engine")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "opacus" else find_spec(name, *a))
    ran = []
    fake = _fake_run({"nonprivate": 100.0, "dpdm": 150.0}, {"nonprivate": 50.0, "dpdm": 100.0})
    b._run_variant = lambda args, v: ran.append(v) or fake(args, v)
    _main(b, monkeypatch, "--variants", "opacus,nonprivate,dpdm", "--rounds", "1", "--json", tmp_path / "e.json")
    out = capsys.readouterr().out.splitlines()
    assert ran == ["nonprivate", "dpdm"]
    [row] = [line for line in out if line.split("|")[0].strip() == "opacus"]
    assert "skipped: opacus is not installed" in row and ".[bench]" in row and "make bench" in row, row
    assert [line.split("|")[0].strip() for line in out[3:5]] == ["nonprivate", "dpdm"]
    saved = json.loads((tmp_path / "e.json").read_text())
    assert set(saved["summary"]) == {"nonprivate", "dpdm"} and "not installed" in saved["skipped"]["opacus"]
