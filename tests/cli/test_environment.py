"""The environment a command runs in: variables left in the shell, Ctrl-C."""
from __future__ import annotations

import json

import numpy as np
import pytest

import accounting
from cli.main import main


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.integers(0, 256, size=(24, 1, 8, 8), dtype=np.uint8),
             y=(np.arange(24) % 3).astype(np.int64), num_classes=3)
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=2, noise_multiplier=2.0, noise_multiplicity=2,
                                  delta=1e-5, dataset_name=f"npz:{tmp_path / 'data.npz'}")
    accounting.write_plan(accounting.make_plan_document(plan), tmp_path / "plan.json")
    return tmp_path


@pytest.mark.parametrize("rank", ["", "abc", "0"])
def test_a_stray_rank_outside_torchrun_is_not_read(tiny, monkeypatch, capsys, rank):
    """RANK left in the shell, no torchrun (no WORLD_SIZE): `dpdm train` read it after the run had trained and
    spent its budget, so RANK='' was a ValueError traceback, exit 4 ("runtime failure"), and a rerun said the folder
    already holds a run. Outside a process group this process is rank 0: the run reports as usual."""
    monkeypatch.setenv("RANK", rank)
    rc = main([str(a) for a in ["train", "--plan", tiny / "plan.json", "--out", tiny / "run", "--device", "cpu",
                                "--quiet", "--seed", "1", "--json"]])
    out, err = capsys.readouterr()
    assert rc == 0 and "Traceback" not in err, err
    assert json.loads(out)["steps_done"] == 2


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    """Ctrl-C wrote an empty line (click's, closing a terminal's ^C echo) and then `dpdm: aborted`: two lines
    where the exit codes promise one (README). Exit 130 as before."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(accounting, "make_plan_document", interrupted)
    rc = main(["plan", "--noise-multiplier", "1", "--dataset-size", "100", "--batch-size", "10", "--steps", "3",
               "--delta", "1e-5"])
    out, err = capsys.readouterr()
    assert rc == 130 and out == "" and err == "dpdm: aborted\n", repr(err)
