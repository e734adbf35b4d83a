"""`dpdm train` / `dpdm sample` / `dpdm eval` end to end on tiny data, through the CLI."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import accounting
from cli.main import main
from dpdm import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def tiny(tmp_path):
    x, y = write_tiny_data_and_plan(tmp_path, steps=4)
    held_out = np.random.default_rng(1).integers(0, 256, size=(12, 1, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "test.npz", x=held_out, y=y[:12], num_classes=3)   # no training image: eval refuses those
    np.savez(tmp_path / "other.npz", x=np.concatenate([x, x[:1]]), y=np.concatenate([y, y[:1]]), num_classes=3)
    return tmp_path


def write_tiny_data_and_plan(d, *, steps, noise_multiplicity=2):
    """24 random 8x8 images of 3 classes as d/data.npz and a plan of them (expected batch 6, noise multiplier 2) as
    d/plan.json; returns the images and labels."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(24, 1, 8, 8), dtype=np.uint8)
    y = (np.arange(24) % 3).astype(np.int64)
    np.savez(d / "data.npz", x=x, y=y, num_classes=3)
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=steps, noise_multiplier=2.0,
                                  noise_multiplicity=noise_multiplicity, delta=1e-5,
                                  dataset_name=f"npz:{d / 'data.npz'}")
    accounting.write_plan(accounting.make_plan_document(plan), d / "plan.json")
    return x, y


def _train_args(d, out, *extra):
    return ["train", "--plan", d / "plan.json", "--out", out, "--device", "cpu", "--quiet",
            "--checkpoint-every", "2", *extra]


def test_train_sample_eval_end_to_end(tiny, capsys):
    d = tiny
    code, out, err = run_cli(_train_args(d, d / "run", "--json"), capsys)
    assert code == 0, err
    doc = json.loads(out)  # one JSON document on stdout, nothing else
    assert doc["steps_done"] == 4 and doc["private"] is True
    assert doc["plan_digest"] == accounting.load_plan(d / "plan.json").digest
    assert doc["epsilon_spent"] == pytest.approx(accounting.epsilon_spent(accounting.load_plan(d / "plan.json").plan, 4))
    assert (d / "run" / "metrics.csv").exists() and (d / "run" / "plan.json").exists()

    code, out, err = run_cli(["sample", "--run", d / "run", "--n", 7, "--sampler-steps", 4, "--out", d / "s.npz",
                              "--grid", d / "grid.png", "--batch-size", 3, "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    with np.load(d / "s.npz") as z:
        assert z["x"].dtype == np.uint8 and z["x"].shape == (7, 1, 8, 8)
        assert z["y"].tolist() == [i % 3 for i in range(7)]
        assert bool(z["meta_private"]) is True
    assert (d / "grid.png").stat().st_size > 0
    assert json.loads(out)["epsilon"] == pytest.approx(doc["epsilon_spent"])
    # Split into files by advancing --seed by each file's --n (the out-of-memory line's advice): the same images,
    # labels included (they restarted at 0 in each file, so --seed 5 was not images 5.. of --seed 0).
    for seed, n in ((0, 5), (5, 2)):
        code, _, err = run_cli(["sample", "--run", d / "run", "--n", n, "--sampler-steps", 4, "--seed", seed,
                                "--out", d / f"part{seed}.npz", "--device", "cpu"], capsys)
        assert code == 0, err
    with np.load(d / "s.npz") as whole, np.load(d / "part0.npz") as a, np.load(d / "part5.npz") as b:
        assert b["y"].tolist() == [2, 0]
        np.testing.assert_array_equal(np.concatenate([a["y"], b["y"]]), whole["y"])
        np.testing.assert_array_equal(np.concatenate([a["x"], b["x"]]), whole["x"])
    # The Karras schedule is a flag; it is recorded in the npz, and an inverted one is refused.
    code, out, err = run_cli(["sample", "--run", d / "run", "--n", 2, "--sampler-steps", 3, "--sigma-min", 0.1,
                              "--out", d / "s2.npz", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["sigma_min"] == 0.1
    with np.load(d / "s2.npz") as z:
        assert float(z["meta_sigma_min"]) == 0.1 and float(z["meta_rho"]) == 7.0
    code, _, err = run_cli(["sample", "--run", d / "run", "--n", 2, "--sigma-min", 90, "--out", d / "s3.npz"], capsys)
    assert "--sigma-min" in _one_error_line(code, err) and not (d / "s3.npz").exists()
    # Guidance in a limited interval: recorded, and an empty interval is refused.
    code, out, err = run_cli(["sample", "--run", d / "run", "--n", 2, "--sampler-steps", 3, "--guidance", 1,
                              "--guidance-interval", 0.3, 5, "--out", d / "s4.npz", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["guidance_interval"] == [0.3, 5.0]
    with np.load(d / "s4.npz") as z:
        assert z["meta_guidance_interval"].tolist() == [0.3, 5.0]
    code, _, err = run_cli(["sample", "--run", d / "run", "--n", 2, "--guidance", 1, "--guidance-interval", 5, 0.3,
                            "--out", d / "s5.npz"], capsys)
    assert "--guidance-interval" in _one_error_line(code, err) and not (d / "s5.npz").exists()
    # Churn settings: recorded in the npz; refused for a deterministic sampler.
    code, out, err = run_cli(["sample", "--run", d / "run", "--n", 2, "--sampler", "churn", "--sampler-steps", 3,
                              "--s-churn", 5, "--s-max", 10, "--out", d / "s6.npz", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    with np.load(d / "s6.npz") as z:
        assert json.loads(str(z["meta_sampler_kwargs"])) == {"S_churn": 5.0, "S_max": 10.0}
    code, _, err = run_cli(["sample", "--run", d / "run", "--n", 2, "--s-churn", 5, "--out", d / "s7.npz"], capsys)
    assert "--sampler churn" in _one_error_line(code, err) and not (d / "s7.npz").exists()

    code, out, err = run_cli(["eval", "--samples", d / "s.npz", "--dataset", f"npz:{d / 'data.npz'}",
                              "--test-dataset", f"npz:{d / 'test.npz'}", "--epochs", 1, "--reference-epochs", 1,
                              "--cache-dir", d / "cache", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    for kind in ("logreg", "mlp", "cnn"):
        assert 0.0 <= report["classifiers"][kind]["test_accuracy"] <= 1.0
    assert np.isfinite(report["classifier_fd"]["value"])

    # The run is finished: no command takes it further.
    code, out, err = run_cli(_train_args(d, d / "run", "--resume"), capsys)
    assert code == 2 and "finished" in err and len(err.strip().splitlines()) == 1


def _one_error_line(code, err):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpdm: error:"), err
    assert "Traceback" not in err
    return lines[0]


def test_power_ema_flags(tiny, capsys):
    d = tiny
    code, _, err = run_cli(_train_args(d, d / "dup", "--ema-power", 2, "--ema-power", 2), capsys)
    assert "--ema-power" in _one_error_line(code, err) and not (d / "dup").exists()
    code, _, err = run_cli(_train_args(d, d / "run", "--ema-power", 2, "--ema-power", 0.5), capsys)
    assert code == 0, err
    code, out, err = run_cli(["sample", "--run", d / "run", "--n", 2, "--sampler-steps", 2, "--weights", "power:0.5",
                              "--out", d / "s.npz", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["weights"] == "power:0.5"
    with np.load(d / "s.npz") as z:
        assert str(z["meta_weights"]) == "power:0.5"
    for bad in ("power:3", "power:x", "best"):
        code, _, err = run_cli(["sample", "--run", d / "run", "--n", 2, "--weights", bad, "--out", d / "t.npz"], capsys)
        assert "power:0.5, power:2" in _one_error_line(code, err) and not (d / "t.npz").exists()


def test_init_from_flag(tiny, capsys):
    d = tiny
    code, _, err = run_cli(_train_args(d, d / "run", "--init-from", d / "absent.pt"), capsys)
    assert "--init-from" in _one_error_line(code, err) and not (d / "run").exists()
    # A --no-dp run on the private images is not a public warm start.
    assert run_cli(_train_args(d, d / "leak", "--no-dp"), capsys)[0] == 0
    code, _, err = run_cli(_train_args(d, d / "run", "--init-from", d / "leak" / "checkpoint.pt"), capsys)
    assert "same data" in _one_error_line(code, err) and not (d / "run").exists()
    (d / "bad.pt").write_bytes(b"\x80\x04garbage")
    code, _, err = run_cli(_train_args(d, d / "run", "--init-from", d / "bad.pt"), capsys)
    _one_error_line(code, err)
    # Other images (public), same shape: accepted and recorded in config.json.
    rng = np.random.default_rng(1)
    np.savez(d / "public.npz", x=rng.integers(0, 256, size=(30, 1, 8, 8), dtype=np.uint8),
             y=(np.arange(30) % 3).astype(np.int64))
    assert run_cli(_train_args(d, d / "pub", "--no-dp", "--dataset", f"npz:{d / 'public.npz'}"), capsys)[0] == 0
    code, _, err = run_cli(_train_args(d, d / "run", "--init-from", d / "pub" / "checkpoint.pt"), capsys)
    assert code == 0, err
    init = json.loads((d / "run" / "config.json").read_text())["init"]
    assert init["dataset"] == f"npz:{d / 'public.npz'}" and init["private"] is False


def test_trainable_flag(tiny, capsys):
    d = tiny
    for bad, needle in ((",", "--trainable"), ("nothing.*", "match no parameter")):
        code, _, err = run_cli(_train_args(d, d / "run", "--trainable", bad), capsys)
        assert needle in _one_error_line(code, err) and not (d / "run").exists()
    code, _, err = run_cli(_train_args(d, d / "run", "--trainable", "net.mid.*, net.dec.*"), capsys)
    assert code == 0, err
    assert json.loads((d / "run" / "config.json").read_text())["train"]["trainable"] == ["net.mid.*", "net.dec.*"]


def test_public_subspace_flags(tiny, capsys):
    d = tiny
    rng = np.random.default_rng(2)
    np.savez(d / "public.npz", x=rng.integers(0, 256, size=(30, 1, 8, 8), dtype=np.uint8),
             y=(np.arange(30) % 3).astype(np.int64))
    public = f"npz:{d / 'public.npz'}"
    for extra, needle in ((["--public-subspace", 4], "--subspace-data"),
                          (["--subspace-data", public], "--public-subspace"),
                          (["--public-subspace", 4, "--subspace-data", public, "--no-dp"], "private runs"),
                          (["--public-subspace", 8, "--subspace-data", public, "--subspace-examples", 4], "at least"),
                          (["--public-subspace", 4, "--subspace-data", f"npz:{d / 'data.npz'}", "--subspace-every", 2],
                           "public data")):
        code, _, err = run_cli(_train_args(d, d / "run", *extra), capsys)
        assert needle in _one_error_line(code, err) and not (d / "run").exists()
    code, _, err = run_cli(_train_args(d, d / "run", "--public-subspace", 3, "--subspace-data", public,
                                       "--subspace-examples", 8, "--subspace-every", 2), capsys)
    assert code == 0, err
    train = json.loads((d / "run" / "config.json").read_text())["train"]
    assert (train["subspace_dim"], train["subspace_data"], train["subspace_every"]) == (3, public, 2)
    code, _, err = run_cli(_train_args(d, d / "odd", "--public-subspace", 3, "--subspace-data", public,
                                       "--subspace-examples", 8, "--subspace-every", 3), capsys)
    assert "must divide --checkpoint-every" in _one_error_line(code, err) and not (d / "odd").exists()


def test_a_new_run_inside_its_folder_data_is_refused_before_anything_is_written(tiny, capsys):
    """h94 F1: `dpdm train --out DATA/run` on a `folder:DATA` dataset trained and spent budget, and its run folder
    then read as an image-less class folder of DATA, so the run could not be resumed, audited or evaluated, and the
    loader's line advised removing it (its ledger and seed). Refused now, as `dpdm sample` refuses its outputs
    there; the same for the public --subspace-data."""
    d = tiny
    for folder in ("fd", "pub"):
        for cls in range(3):
            (d / folder / str(cls)).mkdir(parents=True)   # the check comes before the (image-less) data is read
    data, public = f"folder:{d / 'fd'}", f"folder:{d / 'pub'}"
    for out, extra, shown in (
            (d / "fd" / "run", ["--dataset", data], f"inside the run's training data ({data!r})"),
            (d / "fd", ["--dataset", data], f"the run's training data ({data!r})"),
            (d / "pub" / "0" / "run", ["--public-subspace", 2, "--subspace-every", 2, "--subspace-data", public],
             f"inside the run's --subspace-data ({public!r})")):
        line = _one_error_line(*run_cli(_train_args(d, out, *extra), capsys)[::2])
        assert line == (f"dpdm: error: --out {str(out)!r} is {shown}, where the run folder would read as part of that "
                        "data; choose a run folder outside it"), line
    assert sorted(str(p.relative_to(d)) for p in (d / "fd").rglob("*")) == ["fd/0", "fd/1", "fd/2"]
    assert not (d / "pub" / "0" / "run").exists()


@pytest.mark.slow   # stop 47: 9-25 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_grad_engine_flag_trains_the_same_model(tiny, capsys):
    d = tiny
    for engine, flag in (("rules", True), ("vmap", False), ("auto", None)):
        code, _, err = run_cli(_train_args(d, d / engine, "--grad-engine", engine, "--seed", 3), capsys)
        assert code == 0, err
        config = json.loads((d / engine / "config.json").read_text())
        assert config["train"]["per_layer_rules"] is flag
        assert config["grad_engine"]["engine"] == ("vmap" if engine == "vmap" else "rules")   # auto: rules on a CPU
    auto = ckpt.load_checkpoint(d / "auto" / "checkpoint.pt")["model"]
    a = ckpt.load_checkpoint(d / "rules" / "checkpoint.pt")["model"]
    b = ckpt.load_checkpoint(d / "vmap" / "checkpoint.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:   # float32, 4 Adam steps: rounding differences only
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(auto[k], a[k], rtol=0, atol=0)
    code, _, err = run_cli(_train_args(d, d / "x", "--grad-engine", "plain"), capsys)
    assert code == 2 and "--grad-engine" in err


def test_precision_flags(tiny, capsys):
    d = tiny
    code, _, err = run_cli(_train_args(d, d / "run", "--precision", "bf16"), capsys)
    assert "--no-dp runs only" in _one_error_line(code, err) and not (d / "run").exists()
    code, out, err = run_cli(_train_args(d, d / "run", "--precision", "bf16", "--no-dp", "--json"), capsys)
    assert code == 0, err
    assert json.loads(out)["private"] is False
    assert json.loads((d / "run" / "config.json").read_text())["train"]["precision"] == "bf16"
    code, out, err = run_cli(["sample", "--run", d / "run", "--n", 3, "--sampler-steps", 3, "--precision", "bf16",
                              "--out", d / "s.npz", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["precision"] == "bf16"
    with np.load(d / "s.npz") as z:
        assert str(z["meta_precision"]) == "bf16" and z["x"].shape == (3, 1, 8, 8)
    code, _, err = run_cli(["sample", "--run", d / "run", "--n", 3, "--precision", "fp16", "--out", d / "t.npz"], capsys)
    assert code == 2 and not (d / "t.npz").exists()


@pytest.mark.parametrize("has_units", [False, True, None])
def test_bf16_on_a_cpu_without_bf16_units_warns(tiny, capsys, monkeypatch, has_units):
    import dpdm.cpu

    monkeypatch.setattr(dpdm.cpu, "cpu_has_bf16_units", lambda: has_units)
    d = tiny
    code, _, err = run_cli(_train_args(d, d / "run", "--precision", "bf16", "--no-dp"), capsys)
    assert code == 0, err
    assert ("no bfloat16 units" in err) == (has_units is False)
    code, _, err = run_cli(["sample", "--run", d / "run", "--n", 2, "--sampler-steps", 2, "--precision", "bf16",
                            "--out", d / "s.npz", "--device", "cpu"], capsys)
    assert code == 0, err
    assert ("no bfloat16 units" in err) == (has_units is False)
    code, _, err = run_cli(["sample", "--run", d / "run", "--n", 2, "--sampler-steps", 2,
                            "--out", d / "t.npz", "--device", "cpu"], capsys)   # fp32: nothing to say
    assert code == 0 and "bfloat16" not in err


def test_tampered_plan_refused_and_nothing_written(tiny, capsys):
    d = tiny
    doc = json.loads((d / "plan.json").read_text())
    doc["noise_multiplier"] = doc["noise_multiplier"] / 2
    (d / "bad.json").write_text(json.dumps(doc))
    code, _, err = run_cli(["train", "--plan", d / "bad.json", "--out", d / "run", "--quiet"], capsys)
    line = _one_error_line(code, err)
    assert "--plan" in line and "digest mismatch" in line, line
    assert not (d / "run").exists()


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_or_truncated_checkpoints_are_refused_through_the_cli(tiny, capsys):
    """`train --resume`, `train --init-from` and `sample --checkpoint` on a code-running pickle or a
    truncated checkpoint: one line, exit 2, the code never runs and the run folder is unchanged."""
    d = tiny
    assert run_cli(_train_args(d, d / "run"), capsys)[0] == 0
    marker = d / "pwned"
    torch.save({"format": ckpt.FORMAT, "model": _RunsCodeWhenUnpickled(marker)}, d / "evil.pt")
    data = (d / "run" / "checkpoint.pt").read_bytes()
    (d / "cut.pt").write_bytes(data[: len(data) // 2])
    for bad, needle in ((d / "evil.pt", "refused"), (d / "cut.pt", "corrupt or truncated")):
        code, _, err = run_cli(["sample", "--checkpoint", bad, "--n", 2, "--out", d / "s.npz", "--device", "cpu"],
                               capsys)
        assert needle in _one_error_line(code, err) and not (d / "s.npz").exists()
        code, _, err = run_cli(_train_args(d, d / "warm", "--init-from", bad), capsys)
        assert needle in _one_error_line(code, err) and not (d / "warm").exists()
    # A resume whose checkpoint was truncated (or swapped for the pickle) changes nothing in the run folder.
    for bad, needle in ((d / "evil.pt", "refused"), (d / "cut.pt", "corrupt or truncated")):
        (d / "run" / "checkpoint.pt").write_bytes(bad.read_bytes())
        before = {p.name: p.read_bytes() for p in (d / "run").iterdir()}
        code, _, err = run_cli(_train_args(d, d / "run", "--resume"), capsys)
        assert needle in _one_error_line(code, err)
        assert {p.name: p.read_bytes() for p in (d / "run").iterdir()} == before
    assert not marker.exists()


def test_wrong_size_data_refused(tiny, capsys):
    d = tiny
    code, _, err = run_cli(_train_args(d, d / "run", "--dataset", f"npz:{d / 'other.npz'}"), capsys)
    line = _one_error_line(code, err)
    assert "25" in line and "24" in line
    assert not (d / "run").exists()


@pytest.mark.parametrize("shape, needle", [((24, 64), ""), ((24, 1, 8, 12), "square"),
                                           ((24, 1, 10, 10), "multiple of 4")])
def test_wrong_image_shape_refused(tiny, capsys, shape, needle):
    d = tiny
    np.savez(d / "bad.npz", x=np.zeros(shape, dtype=np.uint8), y=np.zeros(24, dtype=np.int64), num_classes=3)
    code, _, err = run_cli(_train_args(d, d / "run", "--dataset", f"npz:{d / 'bad.npz'}"), capsys)
    assert needle in _one_error_line(code, err)
    assert not (d / "run").exists()


@pytest.mark.parametrize("device", ["foo", "cuda:x", "cuda:99"])
def test_bad_device_is_one_error_line(tiny, capsys, device):
    d = tiny
    args = [a if a != "cpu" else device for a in _train_args(d, d / "run")]
    assert "--device" in _one_error_line(*run_cli(args, capsys)[::2])
    assert not (d / "run").exists()


@pytest.mark.slow   # stop 47: 9-25 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_a_class_count_read_from_the_private_labels_warns(tiny, capsys):
    d = tiny
    code, _, err = run_cli(_train_args(d, d / "run"), capsys)
    assert code == 0 and "read from the private labels" not in err     # the npz states num_classes
    with np.load(d / "data.npz") as f:
        np.savez(d / "inferred.npz", x=f["x"], y=f["y"])
    code, _, err = run_cli(_train_args(d, d / "run2", "--dataset", f"npz:{d / 'inferred.npz'}"), capsys)
    assert code == 0 and "the number of classes (3) was read from the private labels" in err
    # Said once the checks have passed, before the first step: a refused run stays one error line.
    code, _, err = run_cli(_train_args(d, d / "run2", "--dataset", f"npz:{d / 'inferred.npz'}"), capsys)
    assert "already holds a finished run" in _one_error_line(code, err)


@pytest.mark.slow   # stop 47: 9-25 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_training_on_another_dataset_than_the_plans_warns(tiny, capsys):
    d = tiny
    x = np.random.default_rng(2).integers(0, 256, size=(24, 1, 8, 8), dtype=np.uint8)
    np.savez(d / "same_size.npz", x=x, y=(np.arange(24) % 3).astype(np.int64), num_classes=3)
    code, _, err = run_cli(_train_args(d, d / "run", "--dataset", f"npz:{d / 'same_size.npz'}"), capsys)
    assert code == 0 and f"but the plan was made for 'npz:{d / 'data.npz'}'" in err
    code, _, err = run_cli(_train_args(d, d / "run2", "--dataset", f"npz:{d / 'data.npz'}"), capsys)
    assert code == 0 and "the plan was made for" not in err


def test_a_fixed_seed_on_a_private_run_warns(tiny, capsys):
    d = tiny
    code, _, err = run_cli(_train_args(d, d / "run", "--seed", "5"), capsys)
    assert code == 0 and "--seed 5: anyone who knows this seed can replay" in err
    code, _, err = run_cli(_train_args(d, d / "nodp", "--seed", "5", "--no-dp"), capsys)
    assert code == 0 and "anyone who knows" not in err


def test_a_diverging_run_is_a_runtime_failure(tiny, capsys):
    d = tiny
    code, _, err = run_cli(_train_args(d, d / "run", "--lr", "1e30"), capsys)
    lines = err.strip().splitlines()
    assert code == 4 and lines[-1].startswith("dpdm: runtime failure: the run diverged:"), err
    assert "lower --lr" in lines[-1] and "Traceback" not in err


def _seed_given_outputs(d, run, capsys):
    """What a finished run's export and samples say of its training seed."""
    code, out, err = run_cli(["export", "--run", run, "--out", d / f"{run.name}.pt", "--json"], capsys)
    assert code == 0, err
    exported, export_err = json.loads(out), err
    release = torch.load(d / f"{run.name}.pt", weights_only=True)
    code, out, err = run_cli(["sample", "--checkpoint", d / f"{run.name}.pt", "--n", 3, "--sampler-steps", 2,
                              "--device", "cpu", "--out", d / f"{run.name}.npz", "--json"], capsys)
    assert code == 0, err
    with np.load(d / f"{run.name}.npz") as f:
        meta = bool(f["meta_seed_given"])
    return exported["seed_given"], release["config"]["train"]["seed_given"], json.loads(out)["seed_given"], meta, \
        export_err + err


def test_a_private_run_trained_with_a_given_seed_says_so_in_its_outputs(tiny, capsys, monkeypatch):
    """--seed voids the guarantee for whoever knows it: the run, its release file and its samples record it,
    also after a resume without --seed (which takes the seed from the checkpoint)."""
    d = tiny
    real_save = ckpt.save_checkpoint

    def save_then_die(state, path):   # the step-2 checkpoint is written, then the process "dies"
        real_save(state, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    code, _, err = run_cli(_train_args(d, d / "seeded", "--seed", "5"), capsys)
    assert code != 0 and "aborted" in err
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    assert ckpt.load_checkpoint(d / "seeded" / "checkpoint.pt")["ledger"]["steps_done"] == 2
    code, out, _ = run_cli(_train_args(d, d / "seeded", "--resume", "--json"), capsys)
    assert code == 0 and json.loads(out)["seed_given"] is True and json.loads(out)["steps_done"] == 4
    assert json.loads((d / "seeded" / "config.json").read_text())["train"]["seed"] == "(given with --seed: not secret)"
    *flags, err = _seed_given_outputs(d, d / "seeded", capsys)
    assert flags == [True] * 4
    assert err.count("trained with a given --seed: whoever knows that seed can replay") == 2

    code, _, err = run_cli(_train_args(d, d / "secret", "--json"), capsys)
    assert code == 0 and "anyone who knows" not in err
    *flags, err = _seed_given_outputs(d, d / "secret", capsys)
    assert flags == [False] * 4 and "given --seed" not in err
    assert json.loads((d / "secret" / "config.json").read_text())["train"]["seed"] == "(secret: in checkpoint.pt only)"


@pytest.mark.parametrize("extra, needle", [(["--train-sigma", "0.05", "20"], "--precond v only"),
                                           (["--precond", "v", "--train-sigma", "20", "0.05"], "below MAX")])
def test_bad_train_sigma_refused(tiny, capsys, extra, needle):
    d = tiny
    code, _, err = run_cli(_train_args(d, d / "run", *extra), capsys)
    assert needle in _one_error_line(code, err)
    assert not (d / "run").exists()


def test_corrupt_checkpoint_refused_by_sample(tiny, capsys):
    d = tiny
    (d / "bad.pt").write_bytes(b"\x80\x04garbage")
    code, _, err = run_cli(["sample", "--checkpoint", d / "bad.pt", "--n", 2, "--out", d / "s.npz"], capsys)
    line = _one_error_line(code, err)
    assert "bad.pt" in line and "weights_only` set to `False`" not in line
    assert not (d / "s.npz").exists()


def test_existing_run_not_overwritten(tiny, capsys):
    d = tiny
    assert run_cli(_train_args(d, d / "run"), capsys)[0] == 0
    before = (d / "run" / "checkpoint.pt").read_bytes()
    code, _, err = run_cli(_train_args(d, d / "run"), capsys)
    assert "--resume" in _one_error_line(code, err)
    assert (d / "run" / "checkpoint.pt").read_bytes() == before


def test_a_quoted_tilde_out_is_the_home_folders_where_it_is_checked(tiny, capsys, monkeypatch):
    """--out '~/run' (quoted, so no shell expanded it) was checked in the home folder and written to ./~/run."""
    d = tiny
    monkeypatch.setenv("HOME", str(d / "home"))
    (d / "home").mkdir()
    monkeypatch.chdir(d)
    assert run_cli(_train_args(d, "~/run"), capsys)[0] == 0
    assert (d / "home" / "run" / "checkpoint.pt").is_file() and not (d / "~").exists()


def test_unusable_out_folder_is_one_error_line_before_any_work(tiny, capsys):
    d = tiny
    (d / "file").write_text("x")
    for out in (d / "file" / "run", d / "file" / "a" / "run"):
        code, _, err = run_cli(_train_args(d, out), capsys)
        line = _one_error_line(code, err)
        assert "--out" in line and "is not a folder" in line, line
    if os.geteuid() != 0:   # root may write anywhere
        (d / "ro").mkdir(mode=0o500)
        code, _, err = run_cli(_train_args(d, d / "ro" / "run"), capsys)
        assert "not writable" in _one_error_line(code, err)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    """A real SIGKILL mid-run: the resumed run ends at plan.steps with the same parameters."""
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "data.npz", x=rng.integers(0, 256, size=(32, 1, 8, 8), dtype=np.uint8),
             y=(np.arange(32) % 4).astype(np.int64))
    plan = accounting.PrivacyPlan(dataset_size=32, batch_size=8, steps=40, noise_multiplier=3.0,
                                  noise_multiplicity=2, delta=1e-5, dataset_name=f"npz:{tmp_path / 'data.npz'}")
    accounting.write_plan(accounting.make_plan_document(plan), tmp_path / "plan.json")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def cmd(out, *extra):
        return [sys.executable, "-m", "cli.main", "train", "--plan", str(tmp_path / "plan.json"), "--out", str(out),
                "--device", "cpu", "--quiet", "--checkpoint-every", "3", "--seed", "7", *extra]

    subprocess.run(cmd(tmp_path / "full"), env=env, check=True, timeout=300, cwd=ROOT)
    proc = subprocess.Popen(cmd(tmp_path / "killed"), env=env, cwd=ROOT)
    ck = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 240
    while time.time() < deadline:
        if ck.exists() and proc.poll() is None:
            try:
                if ckpt.load_checkpoint(ck)["ledger"]["steps_done"] >= 6:
                    break
            except ckpt.CheckpointError:
                pass  # never happens with atomic writes; tolerated while polling
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_at_kill = ckpt.load_checkpoint(ck)["ledger"]["steps_done"]
    assert 0 < steps_at_kill < 40, "the run finished before it could be killed; make it longer"
    subprocess.run(cmd(tmp_path / "killed", "--resume"), env=env, check=True, timeout=300, cwd=ROOT)
    a = ckpt.load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = ckpt.load_checkpoint(ck)
    assert a["ledger"] == b["ledger"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)


@pytest.mark.parametrize("command, option, value", [
    ("sample", "--guidance", "nan"), ("sample", "--guidance", "inf"), ("sample", "--guidance", "-1"),
    ("sample", "--rho", "nan"), ("sample", "--s-churn", "inf"),
    ("train", "--lr", "nan"), ("train", "--lr", "inf"), ("train", "--ema-power", "nan"),
    ("baseline", "--lr", "inf"), ("audit", "--significance", "nan"),
])
def test_non_finite_floats_are_one_error_line(tiny, capsys, command, option, value):
    """click's FloatRange lets nan through every bound (and inf through an open one): `--lr inf` used to
    train a DP-SGD CNN to NaN and report 10%, `--guidance nan` and `--lr nan` ended in a traceback."""
    d = tiny
    argv = {"sample": ["sample", "--run", d / "run", "--n", 2, "--out", d / "s.npz", "--sampler", "churn"],
            "train": _train_args(d, d / "run"),
            "baseline": ["baseline", "dp-classifier", "--plan", d / "plan.json", "--device", "cpu"],
            "audit": ["audit", "--run", d / "run", "--out", d / "audit"]}[command]
    code, _, err = run_cli([*argv, option, value], capsys)
    assert option in _one_error_line(code, err)
    assert not (d / "run").exists() and not (d / "s.npz").exists() and not (d / "audit").exists()


# --- review mends (dpdm sample) --------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A conditional run (3 classes) and an unconditional one (an npz without y), 2 steps each."""
    d = tmp_path_factory.mktemp("sample_runs")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(24, 1, 8, 8), dtype=np.uint8)
    np.savez(d / "data.npz", x=x, y=(np.arange(24) % 3).astype(np.int64))
    np.savez(d / "udata.npz", x=x)
    held_out = np.random.default_rng(1).integers(0, 256, size=(12, 1, 8, 8), dtype=np.uint8)
    np.savez(d / "test.npz", x=held_out, y=(np.arange(12) % 3).astype(np.int64))   # no training image
    for data, run in (("data.npz", "run"), ("udata.npz", "urun")):
        plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=2, noise_multiplier=2.0, delta=1e-5,
                                      dataset_name=f"npz:{d / data}")
        accounting.write_plan(accounting.make_plan_document(plan), d / f"{run}.json")
        assert main(["train", "--plan", str(d / f"{run}.json"), "--out", str(d / run), "--device", "cpu",
                     "--quiet"]) == 0
    return d


def _sample_args(run, out, *extra):
    return ["sample", "--run", run, "--n", 6, "--sampler-steps", 2, "--device", "cpu", "--out", out, *extra]


def _no_leftovers(folder):
    return not [p.name for p in folder.iterdir() if ".tmp" in p.name]


def test_unconditional_samples_have_no_y_and_eval_takes_them(runs, tmp_path, capsys):
    """Unconditional samples carried y = -1, which `dpdm eval` refused ("y must be >= 0")."""
    code, _, err = run_cli(_sample_args(runs / "urun", tmp_path / "u.npz", "--grid", tmp_path / "u.png"), capsys)
    assert code == 0, err
    with np.load(tmp_path / "u.npz") as z:
        assert "y" not in z.files and "num_classes" not in z.files and z["x"].shape == (6, 1, 8, 8)
        assert all(z[k].dtype != object for k in z.files)
    code, _, err = run_cli(_sample_args(runs / "urun", tmp_path / "g.npz", "--guidance", 2), capsys)
    assert "--guidance" in _one_error_line(code, err) and "trained without labels" in err
    assert not (tmp_path / "g.npz").exists()
    code, out, err = run_cli(["eval", "--samples", tmp_path / "u.npz", "--dataset", f"npz:{runs / 'data.npz'}",
                              "--test-dataset", f"npz:{runs / 'test.npz'}", "--reference-epochs", 1,
                              "--cache-dir", tmp_path / "cache", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["classifiers"] == {} and "no labels" in report["skipped"]["classifiers"]
    assert np.isfinite(report["classifier_fd"]["value"])


def test_bad_grid_or_output_folder_refused_before_sampling(runs, tmp_path, capsys, monkeypatch):
    """--grid g.txt failed in matplotlib after all the sampling (the npz already written); --out afile/s.npz
    raised FileExistsError after it. Now each is one line naming its option, and nothing is sampled."""
    import dpdm.sample

    def no_sampling(*a, **k):
        raise AssertionError("sampled before checking the options")

    monkeypatch.setattr(dpdm.sample, "sample_checkpoint", no_sampling)
    (tmp_path / "afile").write_text("a file")
    for extra, option in (((tmp_path / "s.npz", "--grid", tmp_path / "g.txt"), "--grid"),
                          ((tmp_path / "s.npz", "--grid", tmp_path / "g"), "--grid"),
                          ((tmp_path / "afile" / "s.npz",), "--out"),
                          ((tmp_path / "afile" / "sub" / "s.npz",), "--out"),
                          ((tmp_path / "s.npz", "--grid", tmp_path / "afile" / "g.png"), "--grid")):
        code, _, err = run_cli(_sample_args(runs / "run", *extra), capsys)
        assert _one_error_line(code, err).startswith(f"dpdm: error: {option}=")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg", ".jpg", ".jpeg"])
def test_grid_formats_written_atomically(runs, tmp_path, capsys, suffix):
    code, _, err = run_cli(_sample_args(runs / "run", tmp_path / "new" / "s.npz", "--grid",
                                        tmp_path / "g" / f"grid{suffix}"), capsys)
    assert code == 0, err
    assert (tmp_path / "g" / f"grid{suffix}").stat().st_size > 0 and (tmp_path / "new" / "s.npz").exists()
    assert _no_leftovers(tmp_path / "g") and _no_leftovers(tmp_path / "new")


def test_a_failing_grid_leaves_nothing_behind(runs, tmp_path, monkeypatch):
    """The grid was written in place after the npz; a failure left the npz and a partial grid behind."""
    import matplotlib.figure

    from dpdm.sample import sample_checkpoint

    def disk_full(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", disk_full)
    with pytest.raises(OSError, match="No space left"):
        sample_checkpoint(runs / "run" / "checkpoint.pt", n=4, sampler_steps=2, out_path=tmp_path / "s.npz",
                          grid_path=tmp_path / "grid.png")
    assert not list(tmp_path.iterdir())



def test_the_grid_title_says_the_model_is_of_an_unfinished_run(runs, tmp_path, monkeypatch):
    """fixsample N1 (stop 53): `dpdm sample` says "from step 2 of 4" of an unfinished run's model, and its grid's
    title said nothing of it; a finished run's title names no step."""
    import dpdm.report_utils
    from dpdm.sample import sample_checkpoint
    from dpdm.train import TrainConfig, train

    titles, real = [], dpdm.report_utils.save_grid
    monkeypatch.setattr(dpdm.report_utils, "save_grid", lambda *a, title, **k: titles.append(title) or real(
        *a, title=title, **k))
    with np.load(runs / "data.npz") as f:
        x, y = torch.from_numpy(f["x"]).float() / 127.5 - 1, torch.from_numpy(f["y"])
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=4, noise_multiplier=2.0, delta=1e-5,
                                  dataset_name="tiny")
    with pytest.raises(KeyboardInterrupt):   # killed after its checkpoint of step 2 of 4
        train(accounting.make_plan_document(plan), x, y, 3, tmp_path / "part", TrainConfig(model="small",
              checkpoint_every=2), progress=False, on_step=lambda s: s == 3 and _raise(KeyboardInterrupt))
    for run in (tmp_path / "part", runs / "run"):
        sample_checkpoint(run / "checkpoint.pt", n=3, sampler_steps=2, out_path=tmp_path / f"{run.name}.npz",
                          grid_path=tmp_path / f"{run.name}.png")
    assert titles[0].startswith("dpdm samples, DP (eps=") and titles[0].endswith("), step 2 of 4")
    assert titles[1].endswith(")") and "step" not in titles[1]


def _raise(error):
    raise error

def _nan_checkpoint(runs, path):
    """The run's checkpoint with NaN EMA weights, saved to `path`, with the run's plan.json beside it (against
    which `dpdm sample` checks a training checkpoint's ledger)."""
    state = torch.load(runs / "run" / "checkpoint.pt", weights_only=True)
    for t in state["ema"].values():
        if t.is_floating_point():
            t.fill_(float("nan"))
    torch.save(state, path)
    shutil.copy(runs / "run" / "plan.json", path.parent / "plan.json")


def test_non_finite_weights_are_a_runtime_failure(runs, tmp_path, capsys):
    """NaN EMA weights gave all-black samples and exit 0; now exit 4, naming the checkpoint, nothing written."""
    _nan_checkpoint(runs, tmp_path / "nan.pt")
    code, out, err = run_cli(["sample", "--checkpoint", tmp_path / "nan.pt", "--n", 2, "--sampler-steps", 2,
                              "--device", "cpu", "--out", tmp_path / "s.npz", "--grid", tmp_path / "g.png"], capsys)
    assert code == 4, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("dpdm: runtime failure:"), err
    assert "nan.pt" in lines[0] and "ema weights" in lines[0] and "NaN" in lines[0] and "nothing written" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pt", "plan.json"]
    # The raw weights are finite: sampling them works.
    code, _, err = run_cli(["sample", "--checkpoint", tmp_path / "nan.pt", "--weights", "raw", "--n", 2,
                            "--sampler-steps", 2, "--device", "cpu", "--out", tmp_path / "s.npz"], capsys)
    assert code == 0, err


def test_seed_range_keeps_every_image_seed_below_2_to_the_63(runs, tmp_path, capsys):
    """--seed 2**64 wrote an object array (pickled) that `dpdm eval` refused; seeds wrapped modulo 2**63."""
    from dpdm.sample import SampleError, sample_checkpoint

    for seed, n in ((2**64, 1), (2**63, 1), (2**63 - 1, 2), (-1, 1)):
        code, _, err = run_cli(["sample", "--run", runs / "run", "--n", n, "--seed", seed, "--out",
                                tmp_path / "s.npz"], capsys)
        assert "--seed" in _one_error_line(code, err)
    assert not list(tmp_path.iterdir())
    top = 2**63 - 2   # the largest seed for --n 2
    code, _, err = run_cli(["sample", "--run", runs / "run", "--n", 2, "--seed", top, "--sampler-steps", 2,
                            "--device", "cpu", "--out", tmp_path / "s.npz"], capsys)
    assert code == 0, err
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:
        assert int(z["meta_seed"]) == top and z["meta_seed"].dtype == np.int64
    with pytest.raises(SampleError, match="seed"):
        sample_checkpoint(runs / "run" / "checkpoint.pt", n=2, seed=2**63 - 1, out_path=tmp_path / "t.npz")
    assert not (tmp_path / "t.npz").exists()


@pytest.mark.slow   # stop 47: 9-25 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_a_run_folder_that_cannot_be_locked_warns(tiny, capsys, monkeypatch):
    """A file system without locks (ENOLCK on some network mounts) trained unlocked without a word."""
    import errno
    import fcntl

    d = tiny
    code, _, err = run_cli(_train_args(d, d / "run"), capsys)
    assert code == 0 and "cannot be locked" not in err

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    code, _, err = run_cli(_train_args(d, d / "run2"), capsys)
    assert code == 0 and f"dpdm: warning: {str(d / 'run2')!r} cannot be locked (its file system takes no locks)" in err


# --- review mends (dpdm sample: sampler options, strict JSON) ---------------------------------------

@pytest.mark.parametrize("extra, option", [
    # (3 steps: at 2 the schedule is sigma_max, sigma_min whatever rho, and any --rho is refused as changing nothing)
    (("--rho", "0.001", "--sampler-steps", "3"), "--rho"),         # OverflowError in sigma_max ** (1 / rho)
    (("--rho", "1e300", "--sampler-steps", "3"), "--rho"),         # every noise level rounds to 1
    (("--sigma-max", "1e300"), "--sigma-max"),                      # inf in float32: ValueError in the sampler
    (("--sigma-min", "1e-300"), "--sigma-min"),                     # 0 in float32
    (("--sigma-max", "1e38"), "--sigma-max"),                       # NaN, blamed on the weights
    (("--sampler-steps", "10000000000000"), "--sampler-steps"),     # an 80 TB schedule
    (("--sampler", "churn", "--s-noise", "1e300"), "--s-noise"),    # NaN, blamed on the weights
    (("--guidance", "1", "--guidance-interval", "0", "inf"), "--guidance-interval"),   # Infinity in --json
])
def test_sampler_options_that_cannot_be_sampled_are_one_error_line(runs, tmp_path, capsys, extra, option):
    """Each of these ended in a traceback (exit 4), in NaN blamed on the checkpoint ("its weights are
    unusable", exit 4), or in a --json document with Infinity in it (exit 0)."""
    code, out, err = run_cli([*_sample_args(runs / "run", tmp_path / "s.npz", "--json"), *extra], capsys)
    line = _one_error_line(code, err)
    assert option in line and "unusable" not in line and out == ""
    assert not list(tmp_path.iterdir())


def test_settings_that_overflow_a_sound_network_are_blamed_not_its_weights(runs, tmp_path, capsys):
    """--guidance 1e30 (a finite weight) drives the network to NaN; the message blamed the weights (exit 4),
    which sample fine with the default settings. Now it names the settings, exit 2."""
    code, _, err = run_cli(_sample_args(runs / "run", tmp_path / "s.npz", "--guidance", "1e30"), capsys)
    line = _one_error_line(code, err)
    assert line.startswith("dpdm: error: --guidance=1e+30: the network produced non-finite values")
    assert "finite with the default ones" in line and "not the weights" in line and "unusable" not in line
    assert not list(tmp_path.iterdir())
    code, _, err = run_cli(_sample_args(runs / "run", tmp_path / "s.npz"), capsys)
    assert code == 0, err


def test_non_finite_weights_with_other_settings_are_still_a_runtime_failure(runs, tmp_path, capsys):
    """NaN weights fail with the default settings too: still the weights' fault, exit 4."""
    _nan_checkpoint(runs, tmp_path / "nan.pt")
    code, _, err = run_cli(["sample", "--checkpoint", tmp_path / "nan.pt", "--n", 2, "--sampler-steps", 3,
                            "--device", "cpu", "--out", tmp_path / "s.npz", "--rho", 3, "--guidance", 1], capsys)
    assert code == 4 and err.startswith("dpdm: runtime failure:") and len(err.strip().splitlines()) == 1, err
    assert "with the default sampler settings too; its weights are unusable" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pt", "plan.json"]


def test_sigma_min_help_names_the_churned_last_level(capsys):
    """The help said the last step returns D(x; sigma_min); under churn with --s-min at or below sigma_min it returns
    D at the level the churn raised sigma_min to (h111 N9)."""
    import re

    assert main(["sample", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    entry = re.search(r"--sigma-min FLOAT.*?--sigma-max", text).group(0)
    assert "D(x; sigma_min)" in entry and "churn" in entry, entry


def test_sampler_step_cap_matches_the_library():
    """cli/sample.py repeats the cap so that `dpdm sample --help` loads no torch."""
    from cli.sample import _MAX_SAMPLER_STEPS
    from dpdm.sampling import MAX_SAMPLER_STEPS

    assert _MAX_SAMPLER_STEPS == MAX_SAMPLER_STEPS


def test_emit_json_is_strict_json(capsys):
    """emit_json printed Python's Infinity and NaN, which JSON.parse refuses; now they are null, nested ones too."""
    from cli._common import emit_json

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    emit_json({"a": float("inf"), "b": [np.float32("nan"), (1.5, float("-inf"))], "c": {"d": np.float64(np.inf)},
               "e": torch.tensor(float("nan")), "f": np.int64(3), "g": 0.25, "h": "inf"})
    doc = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert doc == {"a": None, "b": [None, [1.5, None]], "c": {"d": None}, "e": None, "f": 3, "g": 0.25, "h": "inf"}


def test_train_option_walk_refusals_are_one_line(tiny, capsys):
    """Walk of stop 36: these were tracebacks (exit 4), named the wrong option, or printed a warning before the
    refusal; each is now one error line naming the option, and leaves no run folder."""
    d = tiny
    np.savez(d / "public.npz", x=np.random.default_rng(5).integers(0, 256, size=(80, 1, 8, 8), dtype=np.uint8),
             y=(np.arange(80) % 3).astype(np.int64), num_classes=3)
    cases = [
        (("--public-subspace", "50", "--subspace-data", f"npz:{d / 'public.npz'}", "--subspace-examples", "60",
          "--subspace-every", "2", "--trainable", "net.conv_in.bias"),
         "subspace_dim=50 (--public-subspace) must be at most the"),
        (("--precond", "v", "--train-sigma", "1", "1e155"), "must lie in [1e-10, 1e+10]"),
        (("--public-subspace", "2", "--subspace-data", "npz:nope.npz", "--subspace-every", "2"),
         "--subspace-data='npz:nope.npz'"),
        (("--ema-power", "7", "--ema-power", "7.0000001"), "give each exponent once"),
        (("--seed", "3", "--trainable", "zzz*"), "--trainable pattern(s) 'zzz*' match no parameter"),
        (("--no-dp", "--init-from", str(d / "plan.json")), f"--init-from {str(d / 'plan.json')!r}: "),
    ]
    for extra, needle in cases:
        code, _, err = run_cli(_train_args(d, d / "run", *extra), capsys)
        assert needle in _one_error_line(code, err), (extra, err)   # no warning before it either
        assert not (d / "run").exists()


@pytest.mark.slow   # stop 48: 13-95 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_resume_repairs_a_metrics_file_with_foreign_bytes_and_names_an_unreadable_one(tiny, capsys):
    from dpdm.train import _metrics_step

    d = tiny
    code, _, err = run_cli(_train_args(d, d / "run", "--seed", "1"), capsys)
    assert code == 0, err
    state = torch.load(d / "run" / "checkpoint.pt", weights_only=True)
    # As if killed after the checkpoint of step 2 (a test-only edit, consistent: the ledger's epsilon and the
    # optimizer's step count are those of step 2, which every command checks).
    state["ledger"].update(steps_done=2, epsilon_spent=accounting.epsilon_spent(
        accounting.load_plan(d / "plan.json").plan, 2))
    for per_param in state["optimizer"]["state"].values():
        per_param["step"] = torch.tensor(2.0)
    torch.save(state, d / "run" / "checkpoint.pt")
    metrics = d / "run" / "metrics.csv"
    metrics.write_bytes(metrics.read_bytes() + b"\xff\xfe,1,2\r\n")
    code, _, err = run_cli(_train_args(d, d / "run", "--resume"), capsys)
    assert code == 0, err       # a UnicodeDecodeError traceback, exit 4, before
    assert b"\xff" not in metrics.read_bytes()
    assert _metrics_step("3,6,0.1\r\n") == 3 and _metrics_step("\u00b2,6\r\n") is None   # isdigit() took "²"


@pytest.mark.parametrize("name", ["metrics.csv", ".train.lock", "link:.train.lock", ".steps_done",
                                  "link:.steps_done"])
def test_a_fifo_or_link_in_the_run_folder_is_refused_not_waited_on(tiny, capsys, name):
    """A FIFO named metrics.csv or .train.lock blocked `dpdm train` for good; a .train.lock linked elsewhere
    made its target outside the run folder. So would the record of the steps run (.steps_done, stop 52)."""
    d = tiny
    (d / "run").mkdir()
    if name.startswith("link:"):
        os.symlink(d / "victim", d / "run" / name[5:])
    else:
        os.mkfifo(d / "run" / name)

    def hung(*_):
        raise TimeoutError(f"dpdm train blocked on {name}")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        code, _, err = run_cli(_train_args(d, d / "run"), capsys)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert "is not a regular file" in _one_error_line(code, err)
    assert not (d / "victim").exists() and not (d / "run" / "checkpoint.pt").exists()


def test_folder_data_warns_of_its_class_count_and_its_public_class_names_must_match(tmp_path, capsys):
    """An npz without num_classes was warned about (the model reveals a class count read from the private data);
    a folder: dataset's count is its class folders, each of which must hold a private image, and said nothing."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for i in range(12):
        (tmp_path / "data" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "data" / f"c{i % 3}" / f"{i}.png")
    plan = accounting.PrivacyPlan(dataset_size=12, batch_size=4, steps=1, noise_multiplier=2.0, noise_multiplicity=1,
                                  delta=1e-5)
    accounting.write_plan(accounting.make_plan_document(plan), tmp_path / "plan.json")
    code, _, err = run_cli(["train", "--plan", tmp_path / "plan.json", "--dataset", f"folder:{tmp_path / 'data'}",
                            "--out", tmp_path / "run", "--device", "cpu", "--quiet"], capsys)
    assert code == 0, err
    assert "the number of classes (3) is that of the class folders, each of which must hold a private image" in err
    # Public class folders named otherwise (c1, c2, c3 against c0, c1, c2) are refused as --subspace-data: their
    # labels were matched to the private classes by number.
    for i in range(12):
        (tmp_path / "pub" / f"c{i % 3 + 1}").mkdir(parents=True, exist_ok=True)
        folder = tmp_path / "pub" / f"c{i % 3 + 1}"
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    code, _, err = run_cli(["train", "--plan", tmp_path / "plan.json", "--dataset", f"folder:{tmp_path / 'data'}",
                            "--out", tmp_path / "run2", "--device", "cpu", "--quiet", "--public-subspace", 2,
                            "--subspace-data", f"folder:{tmp_path / 'pub'}"], capsys)
    assert code == 2 and err.count("\n") == 1 and "has classes c1, c2, c3, but" in err and "named alike" in err, err
    assert not (tmp_path / "run2").exists()


@pytest.mark.slow   # stop 47: 9-25 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_resume_takes_the_runs_own_options_and_a_given_one_that_differs_names_the_runs(tiny, capsys, monkeypatch):
    """`--resume` compared the CLI's defaults with the run's knobs ("cannot resume with --lr 0.0003" when no --lr
    was given) and read the plan's dataset, not the run's. Options not given now take the run's values; a kept
    knob given with another value is one line naming the run's; the lr may change (a diverged run goes on)."""
    import dpdm.train as train_module

    d = tiny
    x = np.random.default_rng(2).integers(0, 256, size=(24, 1, 8, 8), dtype=np.uint8)
    np.savez(d / "same_size.npz", x=x, y=(np.arange(24) % 3).astype(np.int64), num_classes=3)
    real, calls = train_module._finite_model, []

    def diverges_at_step_3(*a):
        calls.append(1)
        return len(calls) != 3 and real(*a)

    monkeypatch.setattr(train_module, "_finite_model", diverges_at_step_3)
    knobs = ["--dataset", f"npz:{d / 'same_size.npz'}", "--precond", "v", "--train-sigma", "0.05", "20",
             "--ema-decay", "0.9", "--ema-power", "7", "--lr", "1e-3", "--lr-schedule", "cosine",
             "--trainable", "net.*", "--log-every", "1"]
    code, _, err = run_cli(_train_args(d, d / "run", *knobs), capsys)
    assert code == 4 and "--resume and a lower --lr" in err.strip().splitlines()[-1], err
    monkeypatch.undo()
    resume = ["train", "--plan", d / "plan.json", "--out", d / "run", "--device", "cpu", "--quiet", "--resume"]
    before = {f: (d / "run" / f).read_bytes() for f in ("checkpoint.pt", "metrics.csv", "config.json")}
    for extra, needle in ((["--precond", "edm"], "--precond edm: the run in"), (["--ema-decay", "0.999"], "with 0.9;"),
                          (["--ema-power", "2"], "--ema-power 2: the run in"), (["--model", "mnist"], "with small;"),
                          (["--train-sigma", "0.1", "10"], "with 0.05 20;"), (["--trainable", "net.enc.*"], "net.*"),
                          (["--dataset", f"npz:{d / 'data.npz'}"], f"('npz:{d / 'same_size.npz'}'")):
        line = _one_error_line(*run_cli([*resume, *extra], capsys)[::2])
        assert "cannot resume" in line and needle in line, line
        assert {f: (d / "run" / f).read_bytes() for f in before} == before
    code, out, err = run_cli([*resume, "--lr", "5e-4", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    # It diverged at step 3, which is spent: its checkpoint holds step 2's weights and a ledger of 3 steps (h115 F1).
    assert summary["steps_done"] == 4 and summary["lr_segments"] == [[0, 1e-3, "cosine"], [3, 5e-4, "cosine"]]
    saved = ckpt.load_checkpoint(d / "run" / "checkpoint.pt")["config"]
    assert saved["dataset"] == f"npz:{d / 'same_size.npz'}" and saved["precond"] == "v"
    train = saved["train"]
    assert (tuple(train["train_sigma"]), train["ema_decay"], tuple(train["ema_powers"]), tuple(train["trainable"]),
            train["log_every"]) == ((0.05, 20.0), 0.9, (7.0,), ("net.*",), 1)
    assert len((d / "run" / "metrics.csv").read_text().strip().splitlines()) == 1 + 4   # --log-every 1 kept


def test_help_of_spend_unsaved_steps_says_it_is_refused_for_another_plans_or_other_datas_steps(capsys):
    """`--spend-unsaved-steps`' help did not say that steps recorded under another plan or on other data are not
    spent by it, as the README and the refusal say (h155 N3, stop 55)."""
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert ("without it the new run is refused). Refused either way where the steps ran under another plan or on "
            "other data (the record names both).") in text, text


def test_a_resume_at_another_lr_past_the_checkpoint_is_one_line_and_spend_unsaved_steps_goes_on(tiny, capsys,
                                                                                                   monkeypatch):
    """Stop 52: a run stopped at step 3 after its checkpoint of step 2 (as where a peer rank died) and resumed with
    another --lr is refused, one line naming the two ways on, nothing written; --spend-unsaved-steps takes the second
    (step 3 spent, the run goes on from step 4 at the new lr); the flag is for a private run only. A run stopped
    after step 1, before its first checkpoint, is not started afresh in its folder either, unless the flag spends
    that step. The summary (--json, the final line) says how many steps the weights lost (h121 N3)."""
    import dpdm.train as train_module

    d = tiny
    real, calls = train_module._finite_model, []

    def stopped_after_step_3(*a):   # raised at step 4's check: steps 1 to 3 ran, the checkpoint is step 2's
        calls.append(1)
        if len(calls) == 4:
            raise train_module.RankLost("stopped by the test")
        return real(*a)

    monkeypatch.setattr(train_module, "_finite_model", stopped_after_step_3)
    assert run_cli(_train_args(d, d / "run"), capsys)[0] == 4
    calls[:] = [1, 1]   # stopped at step 2's check: step 1 ran, before the first checkpoint
    assert run_cli(_train_args(d, d / "fresh"), capsys)[0] == 4
    monkeypatch.undo()
    line = _one_error_line(*run_cli(_train_args(d, d / "fresh"), capsys)[::2])
    assert "trained step 1 and was stopped before its first checkpoint" in line and "--spend-unsaved-steps" in line
    code, out, err = run_cli(_train_args(d, d / "fresh", "--spend-unsaved-steps"), capsys)
    assert code == 0 and "step 1 and was stopped before its first checkpoint" in err, err
    assert err.strip().splitlines()[-1].startswith(f"run {d / 'fresh'}: 4/4 steps (1 of them discarded: the weights "
                                                   "hold the updates of 3), epsilon spent "), err
    before = {f.name: f.read_bytes() for f in (d / "run").iterdir() if f.name != ".train.lock"}
    line = _one_error_line(*run_cli(_train_args(d, d / "run", "--resume", "--lr", "1e-3"), capsys)[::2])
    assert "the run trained step 3 after its checkpoint of step 2, at lr 0.0003 (constant)" in line, line
    assert "resume with --lr 0.0003 --lr-schedule constant" in line and "--spend-unsaved-steps" in line, line
    assert {f.name: f.read_bytes() for f in (d / "run").iterdir() if f.name != ".train.lock"} == before
    for extra in (["--no-dp"], ["--resume", "--no-dp"]):
        line = _one_error_line(*run_cli(_train_args(d, d / "other", "--spend-unsaved-steps", *extra), capsys)[::2])
        assert "--spend-unsaved-steps applies to a private run only" in line, line
    code, out, err = run_cli(_train_args(d, d / "run", "--resume", "--lr", "1e-3", "--spend-unsaved-steps",
                                         "--json"), capsys)
    assert code == 0, err
    assert "step 3 after its checkpoint of step 2" in err and "is spent (--spend-unsaved-steps)" in err, err
    summary = json.loads(out)
    assert summary["steps_done"] == 4 and summary["lr_segments"] == [[0, 3e-4, "constant"], [3, 1e-3, "constant"]]
    assert ckpt.load_checkpoint(d / "run" / "checkpoint.pt")[ckpt.DISCARDED_STEPS_KEY] == 1
    assert summary["discarded_steps"] == 1
    # Its samples' line and grid title said nothing of it (step 4 of 4), or, from the checkpoint written at the
    # resume, "from step 3" with the weights of step 2: both say how many steps' updates the weights hold (h151 N1)
    import dpdm.report_utils

    titles = []
    monkeypatch.setattr(dpdm.report_utils, "save_grid", lambda x, y, path, *, title="", **kw: titles.append(title))
    code, _, err = run_cli(["sample", "--run", d / "run", "--n", 2, "--sampler-steps", 2, "--device", "cpu", "--out",
                            d / "s.npz", "--grid", d / "g.png"], capsys)
    assert code == 0 and (f"wrote 2 samples to {d / 's.npz'} from step 4 of 4 (1 of them discarded: the weights hold "
                          "the updates of 3)") in err, err
    assert len(titles) == 1 and titles[0].endswith(", step 4 of 4 (weights of 3 steps: 1 discarded)"), titles
    # `dpdm export`'s line of the same checkpoint said only "after 4 of 4 steps"; it says so too, and its --json as
    # sample's (r2 N2, stop 55)
    code, _, err = run_cli(["export", "--run", d / "run", "--out", d / "m.pt"], capsys)
    assert code == 0 and " after 4 of 4 steps (1 of them discarded: the weights hold the updates of 3); sha256 " in err
    code, out, err = run_cli(["export", "--run", d / "run", "--out", d / "m.pt", "--json"], capsys)
    assert code == 0 and json.loads(out)["discarded_steps"] == 1, err


def test_init_from_weights_that_do_not_fit_are_one_error_line(tiny, capsys):
    """They were a RuntimeError traceback, exit 4 ("size mismatch for ..."), as a resume's are one line."""
    d = tiny
    rng = np.random.default_rng(1)
    np.savez(d / "public.npz", x=rng.integers(0, 256, size=(30, 1, 8, 8), dtype=np.uint8),
             y=(np.arange(30) % 3).astype(np.int64), num_classes=3)
    assert run_cli(_train_args(d, d / "pub", "--no-dp", "--dataset", f"npz:{d / 'public.npz'}"), capsys)[0] == 0
    state = torch.load(d / "pub" / "checkpoint.pt", weights_only=True)
    key = next(iter(state["ema"]))
    state["ema"][key] = torch.zeros(3, 3)
    torch.save(state, d / "old.pt")
    line = _one_error_line(*run_cli(_train_args(d, d / "run", "--init-from", d / "old.pt"), capsys)[::2])
    assert "its EMA weights do not fit the 'small' network" in line and key in line, line
    assert not (d / "run").exists()


def test_folder_data_whose_channels_were_read_off_the_images_warns(tmp_path, capsys):
    """One RGB image among grayscale ones made the network 3-channel, which the model reveals, and nothing warned."""
    from PIL import Image

    rng = np.random.default_rng(3)
    (tmp_path / "data").mkdir()
    for i in range(12):
        pixels = rng.integers(0, 256, (8, 8, 3) if i == 0 else (8, 8), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "data" / f"{i}.png")
    plan = accounting.PrivacyPlan(dataset_size=12, batch_size=4, steps=1, noise_multiplier=2.0, noise_multiplicity=1,
                                  delta=1e-5)
    accounting.write_plan(accounting.make_plan_document(plan), tmp_path / "plan.json")
    args = ["train", "--plan", tmp_path / "plan.json", "--dataset", f"folder:{tmp_path / 'data'}", "--device", "cpu",
            "--quiet"]
    code, _, err = run_cli([*args, "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    assert "the number of channels (3, RGB) was read off the private images" in err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["img_channels"] == 3
    code, _, err = run_cli([*args, "--out", tmp_path / "nodp", "--no-dp"], capsys)
    assert code == 0 and "number of channels" not in err, err


@pytest.mark.slow   # stop 47: 9-25 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_resume_of_a_moved_run_a_dropped_lr_change_and_a_no_dp_run(tiny, capsys, monkeypatch):
    """Review of the resume defaults: (1) the run's data path came from its checkpoint even where it no longer
    existed, so a run folder moved with its data failed on a --dataset never given; (2) an lr given at a resume
    that stopped before its next checkpoint showed in config.json, and the next plain resume went back to the lr
    that diverged without a word; (3) a --no-dp --precision bf16 run resumed without --no-dp was refused for
    its --precision, which was not given, rather than for --no-dp."""
    import shutil

    import dpdm.train as train_module

    d = tiny
    real = train_module._finite_model

    def stop_at_next_step_3(count):   # stopped there (exit 4), as where a peer rank died: not a divergence, whose
        calls = []                      # steps are spent and whose checkpoint records its lr (h115 F1, stop 51)

        def finite(*a):
            calls.append(1)
            if len(calls) == count:
                raise train_module.RankLost("stopped by the test")
            return real(*a)
        monkeypatch.setattr(train_module, "_finite_model", finite)

    (d / "sub").mkdir()
    shutil.copy(d / "data.npz", d / "sub" / "data.npz")   # the plan's images, at another path
    stop_at_next_step_3(3)
    assert run_cli(_train_args(d, d / "run", "--dataset", f"npz:{d / 'sub' / 'data.npz'}", "--lr", "1e-3"),
                   capsys)[0] == 4
    stop_at_next_step_3(1)   # resumed at step 2: its first step is step 3
    assert run_cli(_train_args(d, d / "run", "--resume", "--lr", "5e-4"), capsys)[0] == 4
    monkeypatch.undo()
    shutil.rmtree(d / "sub")   # moved away: the plan's name holds the same images
    code, out, err = run_cli(_train_args(d, d / "run", "--resume", "--json"), capsys)
    assert code == 0, err
    assert "config.json shows lr 0.0005" in err and "follows the checkpoint's lr 0.001" in err, err
    assert json.loads(out)["steps_done"] == 4 and json.loads(out)["lr_segments"] == [[0, 1e-3, "constant"]]

    stop_at_next_step_3(3)
    assert run_cli(_train_args(d, d / "nodp", "--no-dp", "--precision", "bf16"), capsys)[0] == 4
    monkeypatch.undo()
    line = _one_error_line(*run_cli(_train_args(d, d / "nodp", "--resume"), capsys)[::2])
    assert "cannot resume a --no-dp run as private" in line, line


def test_a_refused_resume_says_its_error_alone_and_one_on_other_data_names_the_runs(runs, tmp_path, capsys):
    """h141 F3 (stop 54): config.json's lr note ("config.json shows lr ..., this resume follows the checkpoint's lr")
    was said as the resumed options were read, before the training library's checks: a refused resume printed it
    above its error line (the steps record's refusal names the lr to resume with, the note another). It is said with
    the run's other warnings, once every check has passed. h141 N2: a resume on data of another size was told to
    make a new plan for that data, which does not continue the run: it is told to resume on the run's own data."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs / "run", run)
    config = json.loads((run / "config.json").read_text())
    config["train"]["lr"] = 1e-3   # as a resume at --lr 0.001 stopped before its next checkpoint leaves it
    (run / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "more.npz", x=rng.integers(0, 256, size=(25, 1, 8, 8), dtype=np.uint8),
             y=(np.arange(25) % 3).astype(np.int64))
    args = ["train", "--plan", runs / "run.json", "--out", run, "--device", "cpu", "--quiet", "--resume"]
    line = _one_error_line(*run_cli(args, capsys)[::2])   # the run is finished
    assert "is finished" in line, line
    line = _one_error_line(*run_cli([*args, "--dataset", f"npz:{tmp_path / 'more.npz'}"], capsys)[::2])
    assert line.endswith("the data has 25 examples but the run's plan was made for dataset_size=24; a run resumes "
                         "on the data it was trained on: resume on the run's own data (nothing was written)"), line


def test_the_plans_own_file_by_another_path_is_not_warned_of_as_another_dataset(tiny, capsys, monkeypatch):
    """"--dataset=... but the plan was made for ..." was said for the plan's own file given by its absolute path
    (or ./, or a trailing slash), while the run recorded "plan_names_data": true: it told the user that they
    trained on other data than the plan's."""
    from cli._common import warn_dataset_not_plans

    d = tiny
    monkeypatch.chdir(d)
    code, _, err = run_cli(_train_args(d, d / "run", "--dataset", "npz:./data.npz"), capsys)   # plan: absolute
    assert code == 0 and "the plan was made for" not in err, err
    assert json.loads((d / "run" / "config.json").read_text())["plan_names_data"] is True
    for given, plan in ((f"npz:{d / 'data.npz'}", "npz:data.npz"), (f"folder:{d}/", f"folder:{d}"),
                        ("folder:./imgs", f"folder:{d / 'imgs'}/")):
        warn_dataset_not_plans(given, plan, "the run")
        assert capsys.readouterr().err == "", (given, plan)
    warn_dataset_not_plans("npz:other.npz", f"npz:{d / 'data.npz'}", "the run")   # another file: still said
    assert "but the plan was made for" in capsys.readouterr().err


@pytest.mark.slow   # stop 48: 13-95 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_the_plans_own_file_through_a_link_is_the_plans_data(tiny, capsys, monkeypatch):
    """The plan's file reached through a symbolic link was "another dataset": train warned, the run recorded
    "plan_names_data": false, and its samples named no dataset; a resume given the run's --subspace-data through
    a link was refused as other public data (stop 47, h91 F4)."""
    from cli._common import warn_dataset_not_plans

    d = tiny
    (d / "link.npz").symlink_to(d / "data.npz")
    os.link(d / "data.npz", d / "hard.npz")
    code, _, err = run_cli(_train_args(d, d / "run", "--dataset", f"npz:{d / 'link.npz'}"), capsys)
    assert code == 0 and "the plan was made for" not in err, err
    assert json.loads((d / "run" / "config.json").read_text())["plan_names_data"] is True
    (d / "imgs").mkdir()
    (d / "imgs_link").symlink_to(d / "imgs", target_is_directory=True)
    for given in (f"npz:{d / 'hard.npz'}", f"folder:{d / 'imgs_link'}"):
        plan = f"npz:{d / 'data.npz'}" if given.startswith("npz:") else f"folder:{d / 'imgs'}"
        warn_dataset_not_plans(given, plan, "the run")
        assert capsys.readouterr().err == "", given
    warn_dataset_not_plans(f"folder:{d / 'imgs_link'}", f"npz:{d / 'data.npz'}", "the run")   # another kind
    assert "but the plan was made for" in capsys.readouterr().err
    # --subspace-data through a link to the run's public file: resumed, and the run keeps its own name for it.
    _public_npz(d / "pub.npz")
    (d / "publink.npz").symlink_to(d / "pub.npz")
    _stop_at_the_runs_step(monkeypatch, 3)
    assert run_cli(_train_args(d, d / "sub", "--subspace-data", f"npz:{d / 'pub.npz'}", *SUBSPACE), capsys)[0] == 4
    monkeypatch.undo()
    code, _, err = run_cli(["train", "--plan", d / "plan.json", "--out", d / "sub", "--device", "cpu", "--quiet",
                            "--resume", "--subspace-data", f"npz:{d / 'publink.npz'}"], capsys)
    assert code == 0, err
    train_cfg = ckpt.load_checkpoint(d / "sub" / "checkpoint.pt")["config"]["train"]
    assert train_cfg["subspace_data"] == f"npz:{d / 'pub.npz'}"


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. "
                                   "DefaultCPUAllocator: can't allocate memory: you tried to allocate 6227020800 "
                                   "bytes. Error code 12 (Cannot allocate memory)")])
def test_data_too_large_for_memory_is_said_to_be_the_data_not_the_batch(tiny, capsys, monkeypatch, error):
    """Out of memory while loading the data (its float32 copy), the line advised "a smaller --physical-batch
    needs less", which changes nothing there (stop 47, h91 minor)."""
    import dpdm.datasets

    def load_dataset(*a, **k):
        raise error

    monkeypatch.setattr(dpdm.datasets, "load_dataset", load_dataset)
    code, _, err = run_cli(_train_args(tiny, tiny / "run"), capsys)
    lines = err.strip().splitlines()
    assert code == 4 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"dpdm: runtime failure: out of memory on the machine while loading "
                               f"--dataset='npz:{tiny / 'data.npz'}'"), err
    assert "--physical-batch" not in err and not (tiny / "run").exists()
    assert ("(tried to allocate 5.8 GiB)" in err) == isinstance(error, RuntimeError)


def _folder_data(root, names, n, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        (root / names[i % len(names)]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / names[i % len(names)] / f"{i}.png")


def test_init_from_public_class_folders_named_otherwise_is_one_error_line(tiny, capsys):
    """`--init-from` a --no-dp run on folders cat, dog trained a run on folders dog, wolf with no word (the
    public dog embedding served wolf), and one on folders 0..10 started an npz run whose label 2 is folder 10;
    `--subspace-data` refused both pairs (stop 47, h91 F1)."""
    d = tiny
    _folder_data(d / "pubw", ("cat", "dog"), 24, 5)
    _folder_data(d / "privw", ("dog", "wolf"), 24, 6)
    assert run_cli(_train_args(d, d / "rp", "--no-dp", "--dataset", f"folder:{d / 'pubw'}"), capsys)[0] == 0
    code, _, err = run_cli(_train_args(d, d / "rq", "--dataset", f"folder:{d / 'privw'}", "--init-from",
                                       d / "rp" / "checkpoint.pt"), capsys)
    line = _one_error_line(code, err)
    assert f"has classes cat, dog, but 'folder:{d / 'privw'}' has dog, wolf" in line and not (d / "rq").exists()
    _folder_data(d / "pub11", [str(i) for i in range(11)], 22, 7)
    x = np.random.default_rng(8).integers(0, 256, size=(24, 1, 8, 8), dtype=np.uint8)
    np.savez(d / "priv11.npz", x=x, y=(np.arange(24) % 11).astype(np.int64), num_classes=11)
    assert run_cli(_train_args(d, d / "rpub", "--no-dp", "--dataset", f"folder:{d / 'pub11'}"), capsys)[0] == 0
    code, _, err = run_cli(_train_args(d, d / "rpriv", "--dataset", f"npz:{d / 'priv11.npz'}", "--init-from",
                                       d / "rpub" / "checkpoint.pt"), capsys)
    line = _one_error_line(code, err)
    assert "has class folders 0, 1, 10, 2," in line and "sorted by name" in line and not (d / "rpriv").exists()
    # Folders named by label number in order: taken.
    _folder_data(d / "pub3", ("0", "1", "2"), 24, 9)
    assert run_cli(_train_args(d, d / "rpub3", "--no-dp", "--dataset", f"folder:{d / 'pub3'}"), capsys)[0] == 0
    code, _, err = run_cli(_train_args(d, d / "run", "--init-from", d / "rpub3" / "checkpoint.pt"), capsys)
    assert code == 0 and "class names" not in err, err


def test_labels_with_gaps_name_their_empty_classes_in_train_and_sample(tiny, capsys):
    """An npz labelled {1, 3} trains a model of 4 classes, 2 of them without an image, and `dpdm sample` drew all
    4 evenly: half the samples of classes the model never saw, with only "the number of classes (4) was read
    from the private labels" said (stop 47, h91 F2). Train names them; sampling counts the images drawn of them,
    for the user only (not in the samples file, whose labels would otherwise tell which classes were empty)."""
    from dpdm.export import export_model
    from dpdm.sample import sample_checkpoint

    d = tiny
    with np.load(d / "data.npz") as f:
        np.savez(d / "gaps.npz", x=f["x"], y=np.where(np.arange(24) % 2, 3, 1).astype(np.int64))
    code, _, err = run_cli(_train_args(d, d / "run", "--dataset", f"npz:{d / 'gaps.npz'}"), capsys)
    assert code == 0, err
    assert (f"--dataset='npz:{d / 'gaps.npz'}': 2 of its 4 classes have no image (labels 0, 2); the model learns "
            "nothing of them, yet `dpdm sample` draws every class evenly") in err, err
    assert json.loads((d / "run" / "config.json").read_text())["empty_classes"] == [0, 2]
    notes = []
    got = sample_checkpoint(d / "run" / "checkpoint.pt", n=6, sampler_steps=2, out_path=d / "s.npz", notes=notes)
    assert notes == ["3 of the 6 images are of classes the run had no training image of (labels 0, 2; 2 of its 4 "
                     "classes), drawn evenly with the others: the model learned nothing of them; leave those images "
                     "out (by their y)"], notes
    with np.load(d / "s.npz") as z:
        assert z["y"].tolist() == [0, 1, 2, 3, 0, 1] and not [k for k in z.files if "empty" in k]
    assert "empty_classes" not in got
    code, out, err = run_cli(["sample", "--run", d / "run", "--n", 6, "--sampler-steps", 2, "--out", d / "c.npz"],
                             capsys)   # the CLI says it (to whoever samples), not the file
    assert code == 0 and "dpdm: warning: 3 of the 6 images are of classes the run had no training image of" in err, err
    export_model(d / "run" / "checkpoint.pt", d / "model.pt")   # a release file does not carry them
    notes = []
    sample_checkpoint(d / "model.pt", n=2, sampler_steps=2, out_path=d / "s2.npz", notes=notes)
    assert notes == []
    code, _, err = run_cli(_train_args(d, d / "run2"), capsys)   # every class has images: nothing said
    assert code == 0 and "have no image" not in err, err


def _interrupt_before_the_first_step(monkeypatch):
    """`dpdm train`'s library call, stopped (Ctrl-C) right after it has said its warnings (`on_start`): every check
    has passed and no step, so no budget, is taken. The warnings said before training are tested without training."""
    import dpdm.train

    real = dpdm.train.train

    def train(*args, on_start, **kwargs):
        def start(notes):
            on_start(notes)
            raise KeyboardInterrupt

        return real(*args, on_start=start, **kwargs)

    monkeypatch.setattr(dpdm.train, "train", train)


def test_data_mistakes_are_warned_before_the_first_step(tiny, capsys, monkeypatch):
    """Two npz mistakes trained in silence and spent the plan's budget on the wrong data (h109 F1): floats in
    [0, 1] cast with x.astype(np.uint8), whose every pixel is then 0 or 1, and labels stored as `labels` (never read:
    an unconditional model). Both are said before the first step, as warnings (binary images stored as 0 and 1 are
    legitimate), naming the unread arrays only, never their contents."""
    d = tiny
    _interrupt_before_the_first_step(monkeypatch)
    with np.load(d / "data.npz") as f:
        x, y = f["x"], f["y"]
    np.savez(d / "cast.npz", x=(x / 255.0).astype(np.uint8), y=y, num_classes=3)
    code, _, err = run_cli(_train_args(d, d / "r1", "--dataset", f"npz:{d / 'cast.npz'}"), capsys)
    assert code == 130 and "aborted" in err, err
    assert (f"dpdm: warning: --dataset='npz:{d / 'cast.npz'}': every pixel of its images is 0 or 1 (of 0..255), so "
            "they train as near-black images; floats in [0, 1] cast with x.astype(np.uint8) give that: store "
            "(x * 255).round().astype(np.uint8) instead (binary images as 0 and 255)") in err, err
    assert "no array 'y'" not in err
    np.savez(d / "named.npz", x=x, labels=y, meta_seed=np.int64(1))
    code, _, err = run_cli(_train_args(d, d / "r2", "--dataset", f"npz:{d / 'named.npz'}"), capsys)
    assert code == 130, err
    assert (f"dpdm: warning: --dataset='npz:{d / 'named.npz'}': it has no array 'y', so the data is unlabelled and "
            "the model unconditional; its other arrays ('labels') are never read: for a class-conditional model, "
            "store the labels as y") in err, err
    assert "0 or 1" not in err and "[0 1 2" not in err
    # Nothing is said of the plan's own data, nor of an npz holding x alone, or x beside `dpdm sample`'s meta_*
    # arrays (an unconditional model's samples).
    np.savez(d / "u.npz", x=x, meta_seed=np.int64(1))
    for name in ("data.npz", "u.npz"):
        code, _, err = run_cli(_train_args(d, d / f"r_{name}", "--dataset", f"npz:{d / name}"), capsys)
        assert code == 130 and "0 or 1" not in err and "no array 'y'" not in err, err


def test_sample_checkpoint_refuses_a_count_below_one_before_reading_anything(tmp_path):
    """h134 F4 (stop 53): n=-1 failed in torch.arange with "upper bound and lower bound inconsistent with step sign",
    and n=0 wrote an empty samples file. Refused first, as --n below 1 is; numpy integers are integers."""
    from dpdm.sample import SampleError, sample_checkpoint

    for n in (-1, 0, 2.0, True):
        with pytest.raises(SampleError, match=rf"^n={n!r} \(--n\) must be an integer >= 1"):
            sample_checkpoint(tmp_path / "none.pt", n=n, out_path=tmp_path / "s.npz")
    with pytest.raises(SampleError) as e:   # np.int64(2) passes the count's check: the missing file is the problem
        sample_checkpoint(tmp_path / "none.pt", n=np.int64(2), out_path=tmp_path / "s.npz")
    assert "none.pt" in str(e.value) and not (tmp_path / "s.npz").exists()


def test_the_librarys_seed_and_data_notes_are_said_once(tiny, capsys, monkeypatch):
    """train() notes a given seed, binary pixels and empty classes itself since stop 53 (h134 F2, F3); the CLI says
    them in its own words (naming --seed and the dataset), each once. train()'s pixels >= 0 note, about tensors in
    [0, 1], is not said: the CLI's uint8 pixels are all >= 0 only for bright images, and its advice is for tensors
    (r1 F2)."""
    d = tiny
    _interrupt_before_the_first_step(monkeypatch)
    with np.load(d / "data.npz") as f:
        x, y = f["x"], f["y"]
    np.savez(d / "cast.npz", x=(x / 255.0).astype(np.uint8), y=y % 2, num_classes=3)   # binary, class 2 empty
    code, _, err = run_cli(_train_args(d, d / "r1", "--seed", "5", "--dataset", f"npz:{d / 'cast.npz'}"), capsys)
    assert code == 130, err
    assert err.count("replay the batches") == 1 and "--seed 5: anyone who knows this seed" in err, err
    assert err.count("near-black") == 1 and "--dataset=" in err.split("near-black")[0].splitlines()[-1], err
    assert err.count("have no image") + err.count("has no image") == 1 and "declares it" in err, err
    np.savez(d / "bright.npz", x=(x // 2 + 128).astype(np.uint8), y=y, num_classes=3)   # every pixel >= 0
    code, _, err = run_cli(_train_args(d, d / "r2", "--dataset", f"npz:{d / 'bright.npz'}"), capsys)
    assert code == 130 and "every pixel of the images is >= 0" not in err and "x * 2 - 1" not in err, err


def test_empty_classes_of_a_declared_class_count_are_not_a_numbering_gap(tiny, capsys, monkeypatch):
    """An npz that stores num_classes declares its classes: those without an image are absent, and "remap the labels"
    was the wrong advice (a public warm start labelled 0 under the private num_classes got it; h109 F3). Where the
    count was read off the labels, the advice stands. One empty class "has" no image."""
    d = tiny
    _interrupt_before_the_first_step(monkeypatch)
    with np.load(d / "data.npz") as f:
        x, y = f["x"], f["y"]
    cases = [(dict(y=np.zeros(24, np.int64), num_classes=3),
              "2 of its 3 classes have no image (labels 1, 2); the model learns nothing of them, yet `dpdm sample` "
              "draws every class evenly, so 2/3 of its samples would be of unseen classes; its num_classes (3) "
              "declares them: where they are meant to be absent, leave their samples out (by their y); otherwise "
              "lower num_classes to 1 and remap the labels to 0"),
             (dict(y=y % 2, num_classes=3), "1 of its 3 classes has no image (label 2); "),
             (dict(y=y % 2 + 1), "1 of its 3 classes has no image (label 0); the model learns nothing of it, yet "
              "`dpdm sample` draws every class evenly, so 1/3 of its samples would be of unseen classes; remap the "
              "labels to 0..1, unless the class count is fixed publicly")]
    for i, (arrays, said) in enumerate(cases):
        np.savez(d / f"e{i}.npz", x=x, **arrays)
        code, _, err = run_cli(_train_args(d, d / f"r{i}", "--dataset", f"npz:{d / f'e{i}.npz'}"), capsys)
        assert code == 130 and f"dpdm: warning: --dataset='npz:{d / f'e{i}.npz'}': {said}" in err, err
        assert ("its num_classes (3) declares" in err) == ("num_classes" in arrays), err


# --- stop 45 mends (dpdm sample) -------------------------------------------------------------------

def test_a_release_file_with_no_train_config_samples(runs, tmp_path, capsys):
    """The integrity check accepts a release file whose config.train is None ("a release file may lack it"), and
    `dpdm sample` then died with AttributeError: 'NoneType' object has no attribute 'get' (exit 4, a traceback).
    Now it samples with the default noise range, as from a release without the key."""
    code, _, err = run_cli(["export", "--run", runs / "run", "--out", tmp_path / "model.pt"], capsys)
    assert code == 0, err
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    state["config"]["train"] = None
    torch.save(state, tmp_path / "none.pt")
    del state["config"]["train"]
    torch.save(state, tmp_path / "absent.pt")
    for name in ("none", "absent"):
        code, _, err = run_cli(["sample", "--checkpoint", tmp_path / f"{name}.pt", "--n", 3, "--sampler-steps", 2,
                                "--device", "cpu", "--out", tmp_path / f"{name}.npz"], capsys)
        assert code == 0 and "Traceback" not in err, err
    with np.load(tmp_path / "none.npz") as a, np.load(tmp_path / "absent.npz") as b:
        assert np.array_equal(a["x"], b["x"]) and float(a["meta_sigma_min"]) == 0.002


def test_more_images_than_the_address_space_limit_is_the_n_line_not_the_batch_size_hint(runs, tmp_path, capsys,
                                                                                       monkeypatch):
    """Under `ulimit -v` the pre-check compared --n's images with physical memory only; the buffer of all --n
    images then failed to allocate, and the out-of-memory line said "a smaller --batch-size needs less", which
    does not shrink it. Now the pre-check counts the room left under the limit, and a failure to allocate that
    buffer is the same line: exit 2, naming --n, with the advice to split the images into files."""
    import resource

    import dpdm.sample
    import dpdm.sampling

    def no_drawing(*a, **k):
        raise AssertionError("drew images past the memory check")

    monkeypatch.setattr(dpdm.sample, "physical_memory", lambda: 2**40)
    real_getrlimit = resource.getrlimit
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    room = 2**20   # 1 MiB left under the limit: 10**5 images of 1x8x8 (with labels) need 7.6 MiB
    monkeypatch.setattr(resource, "getrlimit", lambda r: (used + room, resource.RLIM_INFINITY)
                        if r == resource.RLIMIT_AS else real_getrlimit(r))
    monkeypatch.setattr(dpdm.sampling, "generate", no_drawing)
    big = ["sample", "--run", runs / "run", "--n", 10**5, "--sampler-steps", 2, "--device", "cpu",
           "--out", tmp_path / "s.npz"]
    code, _, err = run_cli(big + ["--batch-size", 1], capsys)
    line = _one_error_line(code, err)
    assert line.startswith("dpdm: error: n=100000 (--n) images of 1x8x8 need") and "ulimit -v" in line, line
    assert "smaller --n" in line and "--batch-size" not in line
    # The buffer of all --n images failing to allocate (a limit the pre-check does not see): the same advice.
    monkeypatch.undo()
    monkeypatch.setattr(dpdm.sample, "memory_allowed", lambda: (None, False))
    real_empty = torch.empty

    def empty(*size, **kwargs):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
        if int(np.prod(shape)) >= 10**5 * 64:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 6400000 bytes. Error code 12 (Cannot allocate memory)")
        return real_empty(*size, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    code, _, err = run_cli(big, capsys)
    line = _one_error_line(code, err)
    assert line.startswith("dpdm: error: n=100000 (--n) images of 1x8x8 do not fit in memory") and \
        "could not be allocated" in line and "smaller --n" in line and "--batch-size" not in line, line
    assert not list(tmp_path.iterdir())


def _stop_at_the_runs_step(monkeypatch, count):
    """The next `dpdm train` stops at its `count`-th step (exit 4, as where a peer rank died), leaving the checkpoint it
    last saved (a divergence's steps are spent: its checkpoint has a ledger of them, h115 F1, stop 51)."""
    import dpdm.train as train_module

    real, calls = train_module._finite_model, []

    def finite(*a):
        calls.append(1)
        if len(calls) == count:
            raise train_module.RankLost("stopped by the test")
        return real(*a)

    monkeypatch.setattr(train_module, "_finite_model", finite)


def _public_npz(path, seed=2):
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 256, size=(30, 1, 8, 8), dtype=np.uint8), y=(np.arange(30) % 3).astype(np.int64))


SUBSPACE = ("--public-subspace", 2, "--subspace-every", 2, "--subspace-examples", 8)


@pytest.mark.slow   # stop 47: 9-25 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_a_relative_subspace_data_is_recorded_absolute_and_resumes_from_any_folder(tiny, capsys, monkeypatch):
    """h83 F3 (stop 46): `--subspace-data npz:pub.npz` was recorded as typed. Resumed from another folder, the run
    read 'pub.npz' there ("does not exist", or another folder's public file), and the same file named by its
    absolute path was refused as other subspace data; each message told the user to do what the other refused.
    It is recorded absolute now, as --dataset is, and a given one is compared as an absolute path."""
    d = tiny
    (d / "f3").mkdir()
    _public_npz(d / "f3" / "pub.npz")
    _public_npz(d / "pub2.npz", seed=3)
    monkeypatch.chdir(d / "f3")
    _stop_at_the_runs_step(monkeypatch, 3)
    assert run_cli(_train_args(d, d / "f3" / "run", "--subspace-data", "npz:pub.npz", *SUBSPACE), capsys)[0] == 4
    monkeypatch.undo()
    checkpoint = d / "f3" / "run" / "checkpoint.pt"
    assert ckpt.load_checkpoint(checkpoint)["config"]["train"]["subspace_data"] == f"npz:{d / 'f3' / 'pub.npz'}"
    monkeypatch.chdir(d)
    resume = ["train", "--plan", d / "plan.json", "--out", d / "f3" / "run", "--device", "cpu", "--quiet", "--resume"]
    _stop_at_the_runs_step(monkeypatch, 1)   # the same file named from here: taken (it trains, then stops)
    assert run_cli([*resume, "--subspace-data", "npz:f3/pub.npz"], capsys)[0] == 4
    monkeypatch.undo()
    monkeypatch.chdir(d)
    before = checkpoint.read_bytes()
    # Other public images, given by another name or put in the run's file: refused by their fingerprint (h94 F3).
    recorded = f"npz:{d / 'f3' / 'pub.npz'}"
    line = _one_error_line(*run_cli([*resume, "--subspace-data", "npz:pub2.npz"], capsys)[::2])
    assert line == (f"dpdm: error: cannot resume with --subspace-data 'npz:{d / 'pub2.npz'}': it holds other images "
                    f"than the run's public data {recorded!r} (their fingerprint differs from the run's record); give "
                    "--subspace-data naming that file where it now lies"), line
    (d / "f3" / "pub.npz").rename(d / "moved.npz")
    shutil.copy(d / "pub2.npz", d / "f3" / "pub.npz")
    line = _one_error_line(*run_cli(resume, capsys)[::2])
    assert line == (f"dpdm: error: cannot resume: the run's --subspace-data {recorded!r} now holds other images than "
                    "it was trained with (their fingerprint differs from the run's record); put the run's file back "
                    "there, or give --subspace-data naming it where it now lies"), line
    # The public file moved away: without the option, one line naming both ways; with its new path, resumed (the
    # fingerprint, not the path, says it is the run's; stop 46 and h87 F2 had refused both).
    (d / "f3" / "pub.npz").unlink()
    line = _one_error_line(*run_cli(resume, capsys)[::2])
    assert line == (f"dpdm: error: the run in {str(d / 'f3' / 'run')!r} was trained with --subspace-data {recorded!r}, "
                    "which no longer exists; put that file back there, or resume with --subspace-data naming it where "
                    "it now lies (the run checks its images by their fingerprint)"), line
    assert checkpoint.read_bytes() == before
    code, out, err = run_cli([*resume, "--json", "--subspace-data", "npz:moved.npz"], capsys)
    assert code == 0, err
    assert json.loads(out)["steps_done"] == 4
    assert ckpt.load_checkpoint(checkpoint)["config"]["train"]["subspace_data"] == f"npz:{d / 'moved.npz'}"


@pytest.mark.slow   # stop 47: 9-25 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_a_relative_subspace_data_recorded_by_an_older_dpdm_resumes_from_its_own_folder(tiny, capsys, monkeypatch):
    """A run recorded with `npz:pub.npz` as typed (a dpdm before stop 46) still means the file from the folder it
    was started in: there it resumes, with the name as typed or absolute, and records the absolute path. From
    another folder it is one line saying so, not "file 'pub.npz' does not exist"."""
    d = tiny
    (d / "f3").mkdir()
    _public_npz(d / "f3" / "pub.npz")
    monkeypatch.chdir(d / "f3")
    _stop_at_the_runs_step(monkeypatch, 3)
    assert run_cli(_train_args(d, d / "f3" / "run", "--subspace-data", "npz:pub.npz", *SUBSPACE), capsys)[0] == 4
    monkeypatch.undo()
    checkpoint = d / "f3" / "run" / "checkpoint.pt"
    state = ckpt.load_checkpoint(checkpoint)
    state["config"]["train"]["subspace_data"] = "npz:pub.npz"   # as an older dpdm recorded it,
    del state["config"]["subspace_data_digest"]                  # with no fingerprint of the images (h94 F3)
    ckpt.save_checkpoint(state, checkpoint)
    before = checkpoint.read_bytes()
    resume = ["train", "--plan", d / "plan.json", "--out", d / "f3" / "run", "--device", "cpu", "--quiet", "--resume"]
    monkeypatch.chdir(d)
    for extra in ([], ["--subspace-data", f"npz:{d / 'f3' / 'pub.npz'}"]):
        line = _one_error_line(*run_cli([*resume, *extra], capsys)[::2])
        assert line == (f"dpdm: error: the run in {str(d / 'f3' / 'run')!r} recorded --subspace-data 'npz:pub.npz' as "
                        "typed, relative to the folder it was started in (an older dpdm), and there is no 'pub.npz' "
                        "here; resume from that folder"), line
        assert checkpoint.read_bytes() == before
    monkeypatch.chdir(d / "f3")
    _stop_at_the_runs_step(monkeypatch, 1)   # its own folder, the file named absolute: taken
    assert run_cli([*resume, "--subspace-data", f"npz:{d / 'f3' / 'pub.npz'}"], capsys)[0] == 4
    monkeypatch.undo()
    monkeypatch.chdir(d / "f3")
    code, out, err = run_cli([*resume, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["steps_done"] == 4
    assert ckpt.load_checkpoint(checkpoint)["config"]["train"]["subspace_data"] == f"npz:{d / 'f3' / 'pub.npz'}"


@pytest.mark.slow   # stop 47: 9-25 s on 2 cores; moved out of `make test` to keep it under 15 minutes
def test_a_resume_without_dataset_whose_recorded_file_changed_is_not_told_to_resume_without_it(tiny, capsys,
                                                                                                 monkeypatch):
    """h83 F4 (stop 46): the run's recorded data file was replaced by other images of the same size; the resume,
    given no --dataset, was told "resume without --dataset, or with that one". It is told that the file now holds
    other images and to give --dataset with the run's data (naming the plan's), which resumes it."""
    d = tiny
    shutil.copy(d / "data.npz", d / "mine.npz")   # the plan's images, under another name
    _stop_at_the_runs_step(monkeypatch, 3)
    assert run_cli(_train_args(d, d / "run", "--dataset", f"npz:{d / 'mine.npz'}"), capsys)[0] == 4
    monkeypatch.undo()
    x = np.random.default_rng(5).integers(0, 256, size=(24, 1, 8, 8), dtype=np.uint8)
    np.savez(d / "mine.npz", x=x, y=(np.arange(24) % 3).astype(np.int64), num_classes=3)
    before = (d / "run" / "checkpoint.pt").read_bytes()
    line = _one_error_line(*run_cli(_train_args(d, d / "run", "--resume"), capsys)[::2])
    assert line == ("dpdm: error: cannot resume on other data: the images or their labels differ from those the run "
                    f"was trained on ('npz:{d / 'mine.npz'}', which held them, now holds others: resume with --dataset "
                    f"naming the data the run was trained on; the plan names 'npz:{d / 'data.npz'}')"), line
    assert (d / "run" / "checkpoint.pt").read_bytes() == before
    code, out, err = run_cli(_train_args(d, d / "run", "--resume", "--json", "--dataset", f"npz:{d / 'data.npz'}"),
                             capsys)
    assert code == 0, err
    assert json.loads(out)["steps_done"] == 4


# --- argument checks and last lines (mut47) --------------------------------------------------------------------

def test_subspace_examples_equal_to_k_is_enough(tiny, capsys):
    """Catches `dpdm train` refusing --subspace-examples K (mut47): its help says "at least K", and the library's
    own check is >=."""
    d = tiny
    rng = np.random.default_rng(2)   # not tiny's seed 0: other images than the private ones
    np.savez(d / "public.npz", x=rng.integers(0, 256, size=(30, 1, 8, 8), dtype=np.uint8),
             y=(np.arange(30) % 3).astype(np.int64))
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=2, noise_multiplier=2.0,
                                  noise_multiplicity=1, delta=1e-5, dataset_name=f"npz:{d / 'data.npz'}")
    accounting.write_plan(accounting.make_plan_document(plan), d / "plan.json")   # 2 steps, K 1: half the time
    code, _, err = run_cli(_train_args(d, d / "run", "--public-subspace", 3, "--subspace-data",
                                       f"npz:{d / 'public.npz'}", "--subspace-examples", 3, "--subspace-every", 2),
                           capsys)
    assert code == 0, err


def _stub_training(monkeypatch, result):
    """dpdm.train.train returns `result`, or raises it where it is an exception."""
    import dpdm.train

    def fake(doc, x, y, num_classes, out_dir, config, **kw):
        if isinstance(result, BaseException):
            raise result
        return result

    monkeypatch.setattr(dpdm.train, "train", fake)


def test_a_run_folder_that_cannot_be_written_is_exit_4_not_2(tiny, capsys, monkeypatch):
    """Catches RunStorageError turned into exit 2 (mut47): the disk filled or the folder went read-only mid-run,
    nobody's input mistake: exit 4, one line (README's exit-code table)."""
    from dpdm.train import RunStorageError

    _stub_training(monkeypatch, RunStorageError("could not write checkpoint.pt: no space left on device"))
    code, _, err = run_cli(_train_args(tiny, tiny / "run"), capsys)
    assert code == 4 and len(err.strip().splitlines()) == 1 and "no space left" in err, (code, err)


def test_a_private_run_with_a_given_seed_says_so_on_its_last_line(tiny, capsys, monkeypatch):
    """Catches train's last line losing "(given --seed: ...)" (mut47); a run without --seed has no such note."""
    summary = {"run": str(tiny / "run"), "steps_done": 4, "plan_steps": 4, "epsilon_spent": 1.5, "delta": 1e-5,
               "private": True, "seed_given": True}
    _stub_training(monkeypatch, summary)
    code, _, err = run_cli(_train_args(tiny, tiny / "run", "--seed", 5), capsys)
    last = err.strip().splitlines()[-1]
    assert code == 0 and "epsilon spent 1.5 at delta 1e-05" in last, err
    assert "(given --seed: no guarantee against whoever knows it)" in last, last
    _stub_training(monkeypatch, dict(summary, seed_given=False))
    code, _, err = run_cli(_train_args(tiny, tiny / "run2"), capsys)
    assert code == 0 and "given --seed" not in err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def nodp_run(tmp_path_factory):
    """A --no-dp run of 2 steps on 24 8x8 images of 3 classes."""
    d = tmp_path_factory.mktemp("nodp_run")
    write_tiny_data_and_plan(d, steps=2, noise_multiplicity=1)
    assert main(["train", "--plan", str(d / "plan.json"), "--out", str(d / "run"), "--device", "cpu", "--quiet",
                 "--checkpoint-every", "2", "--no-dp"]) == 0
    return d / "run"


def test_an_empty_guidance_interval_is_one_line_before_drawing(nodp_run, tmp_path, capsys, monkeypatch):
    """Catches `dpdm sample` taking --guidance-interval LO LO (mut47): one line, exit 2, before any drawing (the
    library's own check would refuse it later)."""
    import dpdm.sample

    monkeypatch.setattr(dpdm.sample, "sample_checkpoint", lambda *a, **kw: pytest.fail("sampled"))
    code, _, err = run_cli(["sample", "--run", nodp_run, "--n", 2, "--guidance", 1, "--guidance-interval", 1, 1,
                            "--out", tmp_path / "s.npz", "--device", "cpu"], capsys)
    assert "--guidance-interval" in _one_error_line(code, err)
    assert not (tmp_path / "s.npz").exists()


def test_samples_of_a_no_dp_run_are_marked_non_private(nodp_run, tmp_path, capsys):
    """Catches `dpdm sample`'s line losing "[NON-PRIVATE]" for a --no-dp run (mut47): non-private outputs are
    marked wherever they appear."""
    code, _, err = run_cli(["sample", "--run", nodp_run, "--n", 2, "--sampler-steps", 2, "--out",
                            tmp_path / "s.npz", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "[NON-PRIVATE]" in err.strip().splitlines()[-1], err


def test_samples_of_a_no_dp_run_are_warned_of(nodp_run, tmp_path, capsys, monkeypatch):
    """Samples of a --no-dp model were marked only by "[NON-PRIVATE]" on the last line, exit 0, as `dpdm export`'s
    release file was (h115 N1): one warning line says they carry no guarantee about the training data; samples of
    a private model have none (`sample_checkpoint` stubbed)."""
    code, _, err = run_cli(["sample", "--run", nodp_run, "--n", 2, "--sampler-steps", 2, "--out",
                            tmp_path / "s.npz", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("dpdm: warning:")] == [
        f"dpdm: warning: {str(tmp_path / 's.npz')!r} holds samples of a NON-PRIVATE (--no-dp) model: they carry no "
        "guarantee about the data it trained on; do not release them where that data is private"], err
    import dpdm.sample

    monkeypatch.setattr(dpdm.sample, "sample_checkpoint",   # the steps: read by sample's line since h131 (stop 53)
                        lambda *a, **kw: {"private": True, "seed_given": False, "steps_done": 2, "plan_steps": 2})
    code, _, err = run_cli(["sample", "--run", nodp_run, "--n", 2, "--out", tmp_path / "p.npz", "--device", "cpu"],
                           capsys)
    assert code == 0 and "dpdm: warning" not in err, err


def test_a_resume_of_a_seeded_run_says_the_seed_in_the_clis_words(tiny, capsys, monkeypatch):
    """r1 N2 (stop 53): since train() notes a given seed itself (h134 F2), a `dpdm train --resume` of a run started
    with --seed said the library's note, naming TrainConfig.seed to a CLI user; it says the CLI's line, once."""
    import dpdm.train

    d = tiny
    real_check, checks = dpdm.train._finite_model, []

    def stop_in_step_3(*args):   # the checkpoint of step 2 is written
        checks.append(1)
        if len(checks) == 3:
            raise KeyboardInterrupt
        return real_check(*args)

    monkeypatch.setattr(dpdm.train, "_finite_model", stop_in_step_3)
    code, _, err = run_cli(_train_args(d, d / "run", "--seed", "5"), capsys)
    assert code == 130 and err.count("--seed 5: anyone who knows this seed") == 1, err
    monkeypatch.setattr(dpdm.train, "_finite_model", real_check)
    _interrupt_before_the_first_step(monkeypatch)
    code, _, err = run_cli(_train_args(d, d / "run", "--resume"), capsys)
    assert code == 130 and err.count("the run was started with a given --seed: anyone who knows it") == 1, err
    assert "TrainConfig" not in err, err


def _npz_with_image_0_twice(d):
    """d/dup.npz: the tiny data with image 0 stored again as image 1 (an exact copy)."""
    with np.load(d / "data.npz") as f:
        x, y = f["x"].copy(), f["y"]
    x[1] = x[0]
    np.savez(d / "dup.npz", x=x, y=y, num_classes=3)


def test_train_warns_once_of_images_that_are_exact_copies_and_still_trains(tiny, capsys):
    """An npz with a row stored twice trained without a word, and that image was protected only as a group of two
    (h144 F1, stop 54): one warning line, and the run still trains."""
    d = tiny
    _npz_with_image_0_twice(d)
    code, out, err = run_cli(_train_args(d, d / "run", "--dataset", f"npz:{d / 'dup.npz'}", "--json"), capsys)
    assert code == 0, err
    lines = [line for line in err.splitlines() if "exact cop" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("dpdm: warning: 1 of the 24 images is an exact copy of another (the first: image 1 "
                               "is image 0,"), lines[0]
    assert json.loads(out)["steps_done"] == 4


def test_train_warns_of_two_links_to_one_file_outside_a_folder_as_copies(tiny, capsys, monkeypatch):
    """git-annex (DVC, the Hugging Face cache) stores two records' identical images as two links to one object
    outside the folder: refused as a link since h144 F1, though neither names an image of the folder (r1 F1, stop
    54). Both are counted, and the copies' warning names them, by their paths in the folder (h155 F3, stop 55), before
    any step."""
    from PIL import Image

    d = tiny
    with np.load(d / "data.npz") as f:
        x, y = f["x"], f["y"]
    for i, (image, label) in enumerate(zip(x, y)):
        (d / "annex" / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(d / "annex" / f"c{label}" / f"{i:02d}.png")
    (d / "objects").mkdir()
    os.replace(d / "annex" / "c0" / "00.png", d / "objects" / "SHA256E-s1--0a.png")
    (d / "annex" / "c1" / "01.png").unlink()
    for f in (d / "annex" / "c0" / "00.png", d / "annex" / "c1" / "01.png"):
        f.symlink_to(os.path.join("..", "..", "objects", "SHA256E-s1--0a.png"))
    _interrupt_before_the_first_step(monkeypatch)
    code, _, err = run_cli(_train_args(d, d / "run", "--dataset", f"folder:{d / 'annex'}"), capsys)
    assert code == 130, err
    lines = [line for line in err.splitlines() if "exact cop" in line]
    assert len(lines) == 1 and lines[0].startswith(
        "dpdm: warning: 1 of the 24 images is an exact copy of another (the first: 'c1/01.png' is 'c0/00.png', "
        "paths in the data folder):"), err


def test_a_no_dp_run_on_data_with_exact_copies_is_not_told_of_the_plans_epsilon(tiny, capsys):
    """mut57 (stop 54): the "duplicates" note speaks of the plan's epsilon for an image held twice; a --no-dp run
    spends none (it is marked non-private), so it is said to a new private run only."""
    d = tiny
    _npz_with_image_0_twice(d)
    code, _, err = run_cli(_train_args(d, d / "run", "--dataset", f"npz:{d / 'dup.npz'}", "--no-dp"), capsys)
    assert code == 0 and "exact cop" not in err, err
