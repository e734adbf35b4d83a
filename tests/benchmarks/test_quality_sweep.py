"""benchmarks/quality_sweep.py: every option read before the generator trains, the plan and knobs of the run it
evaluates in res.json, and dpdm.evaluate's non-private mark kept on the classifier FD (h100 F2-F4)."""
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dpdm.evaluate import NON_PRIVATE_KEY

# What run_record reads from a finished 3-step run (a stub where no run was trained).
RECORD = {"steps": 3, "sigma": 0.3195, "steps_done": 3, "private": True, "seeded": True, "knobs": {}}


@pytest.fixture()
def sweep(load_benchmark, monkeypatch):
    """quality_sweep.py with sampling and evaluation stubbed (the FD's reference CNN alone trains for 85 s);
    calls lists the guidance weights sampled."""
    mod = load_benchmark("quality_sweep")
    import quality   # the module the sweep imports (benchmarks/ is on sys.path once it is loaded)

    calls = []

    def sample(run, path, **kw):
        calls.append(kw["guidance"])
        Path(path).write_bytes(b"")

    def evaluate(path, **kw):   # evaluate_samples' shape: the FD is listed as computed from the private images
        return {"classifiers": {"cnn": {"test_accuracy": 0.5}}, "classifier_fd": {"value": 557.1},
                NON_PRIVATE_KEY: ["samples_in_train", "classifier_fd.value"]}

    monkeypatch.setattr(quality, "sample", sample)
    monkeypatch.setattr(quality, "evaluate_synthetic", evaluate)
    return mod, quality, calls


def _uncalibrated(quality, monkeypatch):
    """default_plan without its calibration (2-5 s): the plan's shape, noise multiplier 1."""
    monkeypatch.setattr(quality, "default_plan", lambda **kw: SimpleNamespace(plan=quality.plan_shape(**kw)))


def _main(mod, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["quality_sweep.py", *map(str, argv)])
    mod.main()


@pytest.mark.parametrize("weights", ["0,x", "0 1", "0,,1", "1,", "-1", "nan", "0,1,0"])
def test_guidance_is_refused_before_the_generator_trains(sweep, tmp_path, monkeypatch, capsys, weights):
    # h100 F3: --guidance was split only after training (313 steps by default), then a ValueError traceback.
    mod, quality, _ = sweep
    monkeypatch.setattr(quality, "train_generator", lambda *a, **kw: pytest.fail("trained before reading --guidance"))
    with pytest.raises(SystemExit) as e:
        _main(mod, monkeypatch, "--out", tmp_path / "sw", "--guidance", weights)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --guidance: " in last and repr(weights) in last, last


@pytest.mark.parametrize("argv, names", [
    (["--train-sigma", "0.01", "5"], ["--train-sigma applies to --precond v only"]),
    (["--train-sigma", "100", "200", "--precond", "v"], ["--train-sigma 100 200", "a MIN below 80"]),
    (["--batch", "5000"], ["--batch 5000", "must be <= dataset_size=4000"]),
    (["--model", "tiny"], ["--model='tiny'", "NF/CH_MULT/BLOCKS"])])
def test_options_that_cannot_train_or_sample_are_refused_in_one_line(sweep, tmp_path, monkeypatch, capsys, argv,
                                                                     names):
    # TrainConfig's ValueError or a plan's were tracebacks; a schedule the sampler refuses came only after training.
    mod, quality, _ = sweep
    monkeypatch.setattr(quality, "train_generator", lambda *a, **kw: pytest.fail("trained"))
    with pytest.raises(SystemExit) as e:
        _main(mod, monkeypatch, "--out", tmp_path / "sw", *argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and all(n in err[0] for n in names), err
    assert not (tmp_path / "sw").exists()


def test_the_classifier_fd_keeps_its_non_private_mark(sweep, tmp_path, monkeypatch, capsys):
    # h100 F2: the FD (a reference CNN trained on the private images, their features' statistics) was printed and
    # written beside the CNN accuracy as an ordinary score, while the docstring said the sweep never scores on them.
    mod, quality, calls = sweep
    trained = []
    monkeypatch.setattr(quality, "train_generator", lambda doc, run, **kw: trained.append(kw))
    monkeypatch.setattr(mod, "run_record", lambda run: RECORD, raising=False)
    _uncalibrated(quality, monkeypatch)
    _main(mod, monkeypatch, "--out", tmp_path / "sw", "--epochs", 0.02, "--batch", 32, "--n", 20)
    res = json.loads((tmp_path / "sw" / "res.json").read_text())
    assert calls == [0.0, 1.0] and res["g0"]["fd"] == 557.1 and res["g0"]["cnn"] == 0.5
    assert res[NON_PRIVATE_KEY] == ["g0.fd", "g1.fd"]
    shown = [line for line in capsys.readouterr().out.splitlines() if " guidance " in line]
    assert len(shown) == 2 and all("557.1 (NON-PRIVATE: from the private training images" in s for s in shown), shown
    assert "never scores on the private training images" not in mod.__doc__
    assert "do not rank by it" in mod.__doc__
    # seed 0 (a paired comparison): res.json says the run is seeded, as its checkpoint does
    assert trained[0]["seed"] == 0 and res["seeded"] is True


def test_usage_line_shows_what_a_run_without_options_trains(sweep, tmp_path, monkeypatch):
    # h100 (noticed): the usage line showed [--precond v] [--lr 1e-3], the defaults being edm and 3e-4.
    mod, quality, calls = sweep
    seen = {}

    def train_generator(doc, run, **kw):
        seen.update(kw, batch=doc.plan.batch_size, K=doc.plan.noise_multiplicity, steps=doc.plan.steps)

    monkeypatch.setattr(quality, "train_generator", train_generator)
    monkeypatch.setattr(mod, "run_record", lambda run: RECORD, raising=False)
    _uncalibrated(quality, monkeypatch)
    _main(mod, monkeypatch, "--out", tmp_path / "sw")
    usage = mod.__doc__.split("quality_sweep.py --out DIR")[1].split("\n\n")[0]
    shown = dict(re.findall(r"\[--([\w-]+) ([^\]\s]+)\]", usage))
    assert (shown.get("precond"), float(shown.get("lr", "nan")), shown.get("model"), shown.get("lr-schedule"),
            float(shown.get("ema", "nan"))) == (
        seen["precond"], seen["lr"], seen["model"], seen["lr_schedule"], seen["ema_decay"])
    assert (int(shown["batch"]), int(shown["K"])) == (seen["batch"], seen["K"])
    assert seen["steps"] == quality.plan_shape(epochs=float(shown["epochs"]), batch_size=seen["batch"]).steps
    assert [float(g) for g in shown["guidance"].split(",")] == calls


def test_eval_only_refuses_training_options_and_a_missing_run_in_one_line(sweep, tmp_path, monkeypatch, capsys):
    # h100 F4: --eval-only on a folder without a run was a SampleError traceback; training options were recorded
    # in res.json as if the run had been trained with them.
    mod, _, _ = sweep
    for argv, words in ((["--epochs", "20", "--lr", "1e-3"], "--epochs, --lr shape only training"),
                        ([], "checkpoint.pt: no such file")):
        with pytest.raises(SystemExit) as e:
            _main(mod, monkeypatch, "--out", tmp_path / "none", "--eval-only", *argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "none").exists()


def test_eval_only_records_what_the_run_says_of_itself(sweep, tmp_path, monkeypatch):
    # h100 F4: --eval-only wrote the command line's default plan (313 steps, sigma 0.88) over a 3-step run's.
    mod, quality, _ = sweep
    (tmp_path / "sw" / "run").mkdir(parents=True)
    (tmp_path / "sw" / "run" / "checkpoint.pt").write_bytes(b"")   # read by the stubbed run_record only
    knobs = {"epochs": 0.024, "batch": 32, "K": 4, "lr": 1e-3, "precond": "v", "model": "small", "ema": 0.99,
             "lr_schedule": "cosine", "train_sigma": None}
    monkeypatch.setattr(mod, "run_record", lambda run: {**RECORD, "knobs": knobs}, raising=False)
    monkeypatch.setattr(quality, "train_generator", lambda *a, **kw: pytest.fail("trained"))
    _main(mod, monkeypatch, "--out", tmp_path / "sw", "--n", 20, "--guidance", 0, "--eval-only")
    res = json.loads((tmp_path / "sw" / "res.json").read_text())
    assert (res["steps"], res["sigma"], res["steps_done"], res["train_s"]) == (3, 0.3195, 3, 0)
    assert {k: res["args"][k] for k in knobs} == knobs


@pytest.mark.slow   # trains 3 steps: 15 s on 2 loaded cores
def test_eval_only_records_the_plan_and_knobs_of_the_run_it_evaluates(sweep, tmp_path, monkeypatch):
    # h100 F4, end to end: run_record reads a real run's plan.json and checkpoint.
    mod, quality, calls = sweep
    out = tmp_path / "sw"
    _main(mod, monkeypatch, "--out", out, "--epochs", 0.02, "--batch", 32, "--n", 20, "--guidance", 0)  # 3 steps
    trained = json.loads((out / "res.json").read_text())
    assert trained["steps"] == 3
    monkeypatch.setattr(quality, "train_generator", lambda *a, **kw: pytest.fail("trained again"))
    _main(mod, monkeypatch, "--out", out, "--n", 20, "--guidance", 1, "--eval-only")
    res = json.loads((out / "res.json").read_text())
    assert (res["steps"], res["sigma"]) == (trained["steps"], trained["sigma"]) and "g1" in res
    assert (res["args"]["batch"], res["args"]["K"], res["args"]["lr"], res["args"]["precond"]) == (32, 1, 3e-4, "edm")
    assert res["steps_done"] == 3 and res["seeded"] is True and res["train_s"] == 0
