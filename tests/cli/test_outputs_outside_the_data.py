"""No output of `dpdm audit`, `dpdm eval` (its reference-CNN cache) or `dpdm plan --curve` lands in the command's own
`folder:` data (h103 F1, stop 49), as `dpdm train`'s run folder and `dpdm sample`'s files never do (stop 48, one test:
`dpdm.sample.place_in_dataset`). An audit report's 16 PNG plots in a class folder read as images of another size,
the cache's reference/ folder as an image-less class: the data could then not be loaded by any command (a resume,
the audit itself, eval, the baseline), and the lines named a plot or an empty class, not dpdm's own writes."""
from __future__ import annotations

import numpy as np
import pytest

import accounting
from cli.main import main


def _one_error_line(capsys, argv) -> str:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("dpdm: error: "), (rc, out, err)
    return lines[0]


def _tree(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """64 8x8 digits as PNGs in the class folders c0..c9 of data/, 64 others in test/, 64 of them as samples.npz,
    and run/plan.json, a plan of data/'s size."""
    from PIL import Image

    from dpdm.datasets import load_dataset, to_uint8

    root = tmp_path_factory.mktemp("outputs_outside")
    digits = load_dataset("digits")
    x, y = to_uint8(digits.x[:128]), digits.y[:128].numpy()
    for part, rows in (("data", range(64)), ("test", range(64, 128))):
        for i in rows:
            (root / part / f"c{y[i]}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i, 0], mode="L").save(root / part / f"c{y[i]}" / f"{i}.png")
    np.savez(root / "samples.npz", x=x[:64], y=y[:64])
    (root / "run").mkdir()
    plan = accounting.PrivacyPlan(dataset_size=64, batch_size=16, steps=2, noise_multiplier=1.0,
                                  noise_multiplicity=1, delta=1e-4)
    accounting.write_plan(accounting.make_plan_document(plan), root / "run" / "plan.json")
    return root


def test_an_audit_report_in_the_runs_data_or_its_dataset_is_refused_before_any_work(folders, capsys, monkeypatch):
    """Exit 3 after the canary runs, with report.md, report.json, scores.npz and 16 PNGs in the private data; one
    line, exit 2, nothing written, now. `--dataset` (the canary run's data) is no place for them either. The run
    is its plan and the config `dpdm train` records for a `folder:` dataset (its absolute path); its checkpoint is
    not read (`_load_run`), as training one would take seconds."""
    import audits.suite

    root = folders
    config = {"dataset": f"folder:{root / 'data'}", "model": "small", "precond": "edm", "img_channels": 1,
              "img_resolution": 8, "num_classes": 10, "train": {}}
    monkeypatch.setattr(audits.suite, "_load_run", lambda run: (config, {"private": True}))
    before = _tree(root / "data"), _tree(root / "test")
    small = ["--canaries", "20", "--steps", "1", "--background", "20"]
    for out, extra, shown in (
            (root / "data" / "zz_audit", [], f"is inside the run's training data ('folder:{root / 'data'}')"),
            (root / "data" / "c3" / "audit", [], f"is inside the run's training data ('folder:{root / 'data'}')"),
            (root / "test" / "audit", ["--dataset", f"folder:{root / 'test'}"],
             f"is inside the audit's --dataset ('folder:{root / 'test'}')")):
        line = _one_error_line(capsys, ["audit", "--run", root / "run", "--out", out, *small, *extra])
        assert line == (f"dpdm: error: --out={str(out)!r}: {shown}, where the report's images would read as part of "
                        "that data; write the report outside it"), line
    assert (_tree(root / "data"), _tree(root / "test")) == before


def test_an_eval_cache_in_the_data_is_refused_before_any_training(folders, capsys, monkeypatch):
    """--cache-dir DATA made DATA/reference/, an image-less class folder that every later command refused the data
    for; $DPDM_CACHE alike. Refused, naming where the folder came from, before the reference CNN is trained."""
    root = folders
    before = _tree(root / "data"), _tree(root / "test")
    common = ["eval", "--samples", root / "samples.npz", "--dataset", f"folder:{root / 'data'}",
              "--test-dataset", f"folder:{root / 'test'}", "--classifiers", "", "--reference-epochs", "1"]
    for cache, source, where, option, data in (
            (root / "data", f"--cache-dir={str(root / 'data')!r}", "is", "--dataset", "data"),
            (root / "test" / "c1" / "cache", f"--cache-dir={str(root / 'test' / 'c1' / 'cache')!r}", "is inside",
             "--test-dataset", "test")):
        line = _one_error_line(capsys, [*common, "--cache-dir", cache])
        assert line == (f"dpdm: error: {source}: {where} the {option} data ('folder:{root / data}'), where the cached "
                        "reference CNN would read as part of that data; choose a cache folder outside it"), line
    monkeypatch.setenv("DPDM_CACHE", str(root / "data" / "cache"))
    line = _one_error_line(capsys, common)
    assert line.startswith(f"dpdm: error: DPDM_CACHE={str(root / 'data' / 'cache')!r} (no --cache-dir given): is "
                           f"inside the --dataset data ('folder:{root / 'data'}')"), line
    assert (_tree(root / "data"), _tree(root / "test")) == before


def test_a_plans_curve_in_its_data_is_refused_before_the_plan_is_made(folders, capsys):
    """`dpdm plan --dataset folder:DATA --curve DATA/c3/curve.png` wrote a 600x400 image into a class folder."""
    root = folders
    before = _tree(root / "data")
    curve = root / "data" / "c3" / "curve.png"
    line = _one_error_line(capsys, ["plan", "--dataset", f"folder:{root / 'data'}", "--dataset-size", 64,
                                    "--noise-multiplier", 1, "--delta", "1e-5", "--batch-size", 16, "--steps", 2,
                                    "--curve", curve, "--out", root / "plan.json"])
    assert line == (f"dpdm: error: --curve={str(curve)!r} is inside the plan's data ('folder:{root / 'data'}'), where "
                    "the plot would read as part of that data; write it elsewhere"), line
    assert _tree(root / "data") == before and not (root / "plan.json").exists()
