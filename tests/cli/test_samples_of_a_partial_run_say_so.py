"""Samples of a run stopped part-way record the steps it took and the epsilon it spent, not its plan's
(stop 45, mut45 M1). Every existing sample test samples a finished run, where steps_done == plan_steps, so
`meta_steps_done` copied from the plan passed them all: a 2-of-4-step model's samples then read as fully trained.
The same for `dpdm export`'s line (stop 47, mut48 X4)."""
import json

import numpy as np
import pytest

import accounting
from cli.main import main
from dpdm import checkpoint as ckpt


def test_samples_of_a_run_killed_at_step_2_say_2_of_4(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(24, 1, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", x=x, y=(np.arange(24) % 3).astype(np.int64), num_classes=3)
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=4, noise_multiplier=2.0, noise_multiplicity=2,
                                  delta=1e-5, dataset_name=f"npz:{tmp_path / 'data.npz'}")
    accounting.write_plan(accounting.make_plan_document(plan), tmp_path / "plan.json")
    real_save = ckpt.save_checkpoint

    def save_then_die(state, path):
        real_save(state, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    code = main([str(a) for a in ["train", "--plan", tmp_path / "plan.json", "--out", tmp_path / "run", "--device",
                                  "cpu", "--quiet", "--checkpoint-every", "2", "--seed", "5"]])
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    capsys.readouterr()
    assert code != 0 and ckpt.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["ledger"]["steps_done"] == 2
    code = main([str(a) for a in ["sample", "--run", tmp_path / "run", "--n", 3, "--sampler-steps", 2, "--out",
                                  tmp_path / "s.npz", "--device", "cpu", "--json"]])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    eps2 = accounting.epsilon_spent(accounting.load_plan(tmp_path / "plan.json").plan, 2)
    assert doc["steps_done"] == 2 and doc["plan_steps"] == 4 and doc["epsilon"] == pytest.approx(eps2)
    with np.load(tmp_path / "s.npz") as z:
        assert int(z["meta_steps_done"]) == 2 and int(z["meta_plan_steps"]) == 4
        assert float(z["meta_epsilon"]) == pytest.approx(eps2)
    # `dpdm export`'s line and JSON say the same (mut48, stop 47: "after 4 of 4 steps" passed every test)
    assert main([str(a) for a in ["export", "--run", tmp_path / "run", "--out", tmp_path / "m.pt"]]) == 0
    assert "after 2 of 4 steps" in capsys.readouterr().err
    assert main([str(a) for a in ["export", "--run", tmp_path / "run", "--out", tmp_path / "m.pt", "--json"]]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["steps_done"] == 2 and doc["plan_steps"] == 4 and doc["epsilon_spent"] == pytest.approx(eps2)
