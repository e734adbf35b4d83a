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
