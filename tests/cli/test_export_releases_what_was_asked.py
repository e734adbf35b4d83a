"""`dpdm export` releases the weights asked for, keeps the trained noise range and says the steps a part-run took
(mut48, stop 47: mutants X2, X3, X4 passed every test)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import accounting
from cli.main import main
from dpdm import checkpoint as ckpt
from dpdm.export import release_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("export_weights")
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x=rng.integers(0, 256, size=(24, 1, 8, 8), dtype=np.uint8), y=(np.arange(24) % 3))
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=3, noise_multiplier=2.0,
                                  noise_multiplicity=2, delta=1e-5, dataset_name=f"npz:{d / 'data.npz'}")
    accounting.write_plan(accounting.make_plan_document(plan), d / "plan.json")
    assert main(["train", "--plan", str(d / "plan.json"), "--out", str(d / "run"), "--device", "cpu", "--quiet",
                 "--ema-power", "0.1"]) == 0
    return d


def test_the_release_holds_the_weights_asked_for(run, capsys):
    """--weights raw (and power:GAMMA) released the EMA under the asked name: only the name was checked."""
    state = ckpt.load_checkpoint(run / "run" / "checkpoint.pt")
    for weights, want in (("ema", state["ema"]), ("raw", state["model"]), ("power:0.1", state["ema_power"]["0.1"])):
        out = run / f"{weights.replace(':', '_')}.pt"
        assert main(["export", "--run", str(run / "run"), "--out", str(out), "--weights", weights]) == 0
        capsys.readouterr()
        model = torch.load(out, weights_only=True)
        assert model["weights"] == weights and set(model["state_dict"]) == set(want)
        for name, t in model["state_dict"].items():
            assert torch.equal(t, want[name]), (weights, name)
    # The three sets differ after 3 steps, so the comparison above tells them apart.
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    assert any(not torch.equal(state["ema"][k], state["ema_power"]["0.1"][k]) for k in state["model"])


def test_a_release_keeps_the_trained_noise_levels():
    """The sampler narrows its default schedule to `dpdm train --train-sigma`'s range; a release file must keep it
    (config.train.train_sigma), or samples from the release ask the network about levels it never saw."""
    config = {"model": "small", "precond": "edm", "sigma_data": 3 ** -0.5, "img_resolution": 8, "img_channels": 1,
              "num_classes": 3, "dataset": "digits", "private": True,
              "train": {"train_sigma": [0.1, 10.0], "seed": 5}, "data_digest": "ab" * 32}
    out = release_config(config, "digits")
    assert out["train"]["train_sigma"] == [0.1, 10.0]
    assert "seed" not in out["train"] and "data_digest" not in out


def test_export_of_a_run_stopped_part_way_says_the_steps_it_took(tmp_path, capsys, monkeypatch):
    """`dpdm export`'s line "epsilon E, delta D after S of P steps": S is the steps the run took, not its plan's
    (every export test exported a finished run, where the two agree)."""
    import json

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.integers(0, 256, size=(24, 1, 8, 8), dtype=np.uint8),
             y=(np.arange(24) % 3).astype(np.int64), num_classes=3)
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=4, noise_multiplier=2.0, noise_multiplicity=2,
                                  delta=1e-5, dataset_name=f"npz:{tmp_path / 'data.npz'}")
    accounting.write_plan(accounting.make_plan_document(plan), tmp_path / "plan.json")
    real_save = ckpt.save_checkpoint

    def save_then_die(state, path):
        real_save(state, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    code = main([str(a) for a in ["train", "--plan", tmp_path / "plan.json", "--out", tmp_path / "run", "--device",
                                  "cpu", "--quiet", "--checkpoint-every", "2"]])
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    capsys.readouterr()
    assert code != 0 and ckpt.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["ledger"]["steps_done"] == 2
    eps2 = accounting.epsilon_spent(accounting.load_plan(tmp_path / "plan.json").plan, 2)
    assert main([str(a) for a in ["export", "--run", tmp_path / "run", "--out", tmp_path / "m.pt"]]) == 0
    err = capsys.readouterr().err
    assert "after 2 of 4 steps" in err, err
    assert main([str(a) for a in ["export", "--run", tmp_path / "run", "--out", tmp_path / "m.pt", "--json"]]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["steps_done"] == 2 and doc["plan_steps"] == 4 and doc["epsilon_spent"] == pytest.approx(eps2)
