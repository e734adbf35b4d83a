"""Only `dpdm train` runs on several processes. Under torchrun every other command ran once per rank: `dpdm baseline`
trained N separate DP-SGD classifiers on the private data, each printed at one plan's epsilon (h153 F1, stop 55).
They are refused, before any work or write. No process group is needed: torchrun's environment is enough."""
from __future__ import annotations

import numpy as np
import pytest

import accounting
from cli.main import main

TORCHRUN = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.fixture()
def inputs(tmp_path, monkeypatch):
    """A plan and the 24 images it was made for, written before torchrun's environment is set."""
    for name in TORCHRUN:
        monkeypatch.delenv(name, raising=False)
    rng = np.random.default_rng(0)
    y = (np.arange(24) % 3).astype(np.int64)
    np.savez(tmp_path / "data.npz", x=rng.integers(0, 256, size=(24, 1, 8, 8), dtype=np.uint8), y=y, num_classes=3)
    np.savez(tmp_path / "test.npz", x=rng.integers(0, 256, size=(12, 1, 8, 8), dtype=np.uint8), y=y[:12],
             num_classes=3)
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=2, noise_multiplier=2.0, delta=1e-5,
                                  dataset_name=f"npz:{tmp_path / 'data.npz'}")
    accounting.write_plan(accounting.make_plan_document(plan), tmp_path / "plan.json")
    return tmp_path


def _argv(name: str, d) -> list[str]:
    plan, data, test = str(d / "plan.json"), f"npz:{d / 'data.npz'}", f"npz:{d / 'test.npz'}"
    return {
        "plan": ["plan", "--noise-multiplier", "1", "--dataset-size", "100", "--batch-size", "10", "--steps", "3",
                 "--delta", "1e-5", "--out", str(d / "new_plan.json")],
        "account": ["account", "-s", "1", "-p", "0.01", "-i", "10", "--delta", "1e-5"],
        "sample": ["sample", "--run", str(d / "run"), "--n", "4", "--out", str(d / "samples.npz")],
        "export": ["export", "--run", str(d / "run"), "--out", str(d / "model.pt")],
        "eval": ["eval", "--samples", str(d / "samples.npz"), "--dataset", data, "--test-dataset", test],
        "baseline": ["baseline", "dp-classifier", "--plan", plan, "--dataset", data, "--test-dataset", test,
                     "--device", "cpu", "--quiet"],
        "audit": ["audit", "--run", str(d / "run"), "--out", str(d / "report")],
        "demo": ["demo", "--out", str(d / "demo"), "--device", "cpu"],
    }[name]


@pytest.mark.parametrize("name", ["plan", "account", "sample", "export", "eval", "baseline", "audit", "demo"])
def test_a_command_other_than_train_refuses_torchrun(inputs, monkeypatch, capsys, name):
    """One `dpdm: error:` line naming torchrun, exit 2, and nothing trained or written: the line was each rank's
    result (baseline: N private trainings, each shown at one plan's epsilon), or each rank's own refusal of its
    input."""
    import cli.demo
    import dpdm.baseline

    trained = []
    monkeypatch.setattr(dpdm.baseline, "train_dp_classifier", lambda *a, **k: trained.append(a) or 1 / 0)
    monkeypatch.setattr(cli.demo, "run_demo", lambda *a, **k: trained.append(a) or 1 / 0)
    for key, value in TORCHRUN.items():
        monkeypatch.setenv(key, value)
    before = sorted(inputs.iterdir())
    rc = main(_argv(name, inputs))
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"dpdm: error: dpdm {name} runs in one process"), err
    assert "without torchrun" in err and "WORLD_SIZE=2" in err, err
    assert not trained and out == "" and sorted(inputs.iterdir()) == before


def test_a_world_size_of_one_runs_the_command(inputs, monkeypatch, capsys):
    """WORLD_SIZE=1 (torchrun --nproc_per_node=1, or left in the shell) is one process: the command runs."""
    for key, value in TORCHRUN.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WORLD_SIZE", " 1 ")
    assert main(_argv("plan", inputs)) == 0, capsys.readouterr().err
    assert accounting.load_plan(inputs / "new_plan.json").plan.steps == 3


def test_train_keeps_its_own_torchrun_checks(inputs, monkeypatch, capsys):
    """`dpdm train` is the command that runs under torchrun: the refusal leaves it to its own launch checks."""
    from dpdm import distributed

    monkeypatch.setattr(distributed, "launch_problem", lambda device=None: "reached train's own launch check")
    for key, value in TORCHRUN.items():
        monkeypatch.setenv(key, value)
    rc = main(["train", "--plan", str(inputs / "plan.json"), "--out", str(inputs / "run"), "--device", "cpu",
               "--quiet"])
    assert rc == 2 and capsys.readouterr().err == "dpdm: error: reached train's own launch check\n"
