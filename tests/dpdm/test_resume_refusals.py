"""Mutation walk of stop 45 (mut46): train()'s resume checks, one comparison each, at the API (the CLI tests reach
some of them only through `dpdm train`'s own earlier checks)."""
from __future__ import annotations

import pytest

from dpdm import checkpoint as ckpt
from dpdm.train import CHECKPOINT_NAME, TrainConfig, TrainError, train
from tests.dpdm.test_train import CFG, Stop, stop_at, tiny_data, tiny_plan


def test_a_half_run_refuses_another_precond_or_privacy_and_keeps_its_seed_given_mark(tmp_path):
    x, y, c = tiny_data()
    doc = tiny_plan(steps=4)
    out = tmp_path / "run"
    with pytest.raises(Stop):
        train(doc, x, y, c, out, TrainConfig(**CFG), progress=False, on_step=stop_at(3))
    path = out / CHECKPOINT_NAME
    before = path.read_bytes()
    assert ckpt.load_checkpoint(path)["ledger"]["steps_done"] == 2
    # another preconditioning: same weights' shapes, another model (dpdm sample reads precond from the checkpoint)
    with pytest.raises(TrainError, match="cannot resume: the run used precond='edm', now 'v'"):
        train(doc, x, y, c, out, TrainConfig(**{**CFG, "precond": "v"}), resume=True, progress=False)
    # a private run resumed with --no-dp (its ledger private, its steps then unnoised)
    with pytest.raises(TrainError, match="cannot resume a --no-dp run as private, or a private run with --no-dp"):
        train(doc, x, y, c, out, TrainConfig(**{**CFG, "private": False}), resume=True, progress=False)
    # a warm start given at the resume of a run begun without one: said so, not "started from None" (h106 N1)
    with pytest.raises(TrainError, match=r"cannot resume with --init-from '\S+w\.pt': the run started from no warm "
                                         r"start; resume without --init-from$"):
        train(doc, x, y, c, out, TrainConfig(**{**CFG, "init_from": str(tmp_path / "w.pt")}), resume=True,
              progress=False)
    assert path.read_bytes() == before
    # resumed without --seed: the seed comes from the checkpoint, and the run stays marked as seeded
    summary = train(doc, x, y, c, out, TrainConfig(**{**CFG, "seed": None}), resume=True, progress=False)
    assert summary["steps_done"] == 4 and summary["seed_given"] is True
    train_cfg = ckpt.load_checkpoint(path)["config"]["train"]
    assert train_cfg["seed_given"] is True and train_cfg["seed"] == CFG["seed"]
