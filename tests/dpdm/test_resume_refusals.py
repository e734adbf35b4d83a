"""Mutation walk of stop 45 (mut46): train()'s resume checks, one comparison each, at the API (the CLI tests reach
some of them only through `dpdm train`'s own earlier checks). Stop 50 (mut51): its refusals to start at all, on data
smaller than the plan's or in a folder whose run already spent the plan."""
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


def test_data_smaller_than_the_plans_is_refused_and_nothing_written(tmp_path):
    """mut51 t01, stop 50: a plan holds only for data of its size, smaller as well as larger. 23 images under a
    plan for 24 (a subset, or data changed since planning) are refused before anything is written: `n >
    dataset_size` let the run start, write its files and fail mid-step on an index past the data (had that index
    not been drawn, it would have finished under a plan of the wrong size). test_train's test gives 25 images."""
    x, y, c = tiny_data(n=23)
    out = tmp_path / "run"
    with pytest.raises(TrainError, match="the data has 23 examples but the plan was made for dataset_size=24"):
        train(tiny_plan(n=24, steps=2), x, y, c, out, TrainConfig(**CFG), progress=False)
    assert not out.exists()


def test_a_finished_run_whose_only_checkpoint_was_removed_is_not_trained_again(tmp_path):
    """mut51 t09, stop 50: with --checkpoint-every at or above the plan's steps the one checkpoint is the last
    step's, so no metrics row lies past it, and the `.checkpointed` mark alone tells that the folder's run spent the
    plan. With the mark's test dropped, a second `dpdm train` into the folder after checkpoint.pt was deleted
    trained the whole plan again (test_train's test removes the checkpoint of a run that checkpointed mid-way,
    whose rows also tell)."""
    x, y, c = tiny_data()
    doc = tiny_plan(steps=2)
    out = tmp_path / "run"
    config = TrainConfig(**{**CFG, "checkpoint_every": 100})
    train(doc, x, y, c, out, config, progress=False)
    (out / CHECKPOINT_NAME).unlink()
    metrics = (out / "metrics.csv").read_bytes()
    with pytest.raises(TrainError, match="holds a run that saved a checkpoint, but no checkpoint.pt"):
        train(doc, x, y, c, out, config, progress=False)
    assert (out / "metrics.csv").read_bytes() == metrics and not (out / CHECKPOINT_NAME).exists()
