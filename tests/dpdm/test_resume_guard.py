"""A trainer that lost the race for its run folder (stop 46, h83 F2).

`dpdm.train.train` reads the checkpoint (or finds none), builds the network, and only then takes the folder's
lock. Another `dpdm train` can finish in that folder in between: the one that then gets the lock compares the
checkpoint with what it read and refuses with "changed while this one started". Without that check the late
trainer trained over the finished run: its steps ran twice on the data under a ledger that counts them once, and
the first trainer's checkpoint and metrics were lost. Here the race is made certain by running the first trainer
inside the late one's `_lock_run_folder`.
"""
from __future__ import annotations

import re

import pytest

import dpdm.train as T
from dpdm import checkpoint as ckpt
from dpdm.train import CHECKPOINT_NAME, TrainConfig, TrainError, train
from tests.dpdm.test_train import CFG, Stop, stop_at, tiny_data, tiny_plan

KEPT = (CHECKPOINT_NAME, "metrics.csv", "config.json", "plan.json")   # what the first trainer wrote


def first_trainer_wins_the_race(monkeypatch, first):
    """Patches `_lock_run_folder` so that the next trainer, about to take the lock, first lets `first()` (another
    trainer, with the real lock) run to its end. Returns the files `first` left, read once it has finished."""
    real_lock, left = T._lock_run_folder, {}

    def late_lock(out):
        monkeypatch.setattr(T, "_lock_run_folder", real_lock)
        first()
        left.update({name: (out / name).read_bytes() for name in KEPT})
        return real_lock(out)

    monkeypatch.setattr(T, "_lock_run_folder", late_lock)
    return left


@pytest.mark.parametrize("branch", ["resume", "fresh"])
def test_a_trainer_whose_run_folder_changed_before_its_lock_is_refused(tmp_path, monkeypatch, branch):
    """resume: the late trainer read the checkpoint of step 2 (and asks for another lr, as in h83's repro), the
    first resumed the run to its end. fresh: the late trainer found no checkpoint, the first trained a whole run
    there. Either way the late one refuses, and the first one's checkpoint and metrics stay as it left them."""
    x, y, c = tiny_data()
    doc = tiny_plan()
    out = tmp_path / "run"
    if branch == "resume":
        with pytest.raises(Stop):
            train(doc, x, y, c, out, TrainConfig(**CFG), progress=False, on_step=stop_at(3))
        assert ckpt.load_checkpoint(out / CHECKPOINT_NAME)["ledger"]["steps_done"] == 2
    left = first_trainer_wins_the_race(
        monkeypatch, lambda: train(doc, x, y, c, out, TrainConfig(**CFG), resume=branch == "resume", progress=False))
    late = TrainConfig(**{**CFG, "lr": 1e-3} if branch == "resume" else {**CFG, "seed": 4})
    ran = []
    with pytest.raises(TrainError, match=re.escape(f"the run in {str(out)!r} changed while this one started "
                                                   "(another dpdm train?); start again"
                                                   + (" with --resume" if branch == "resume" else "")) + "$"):
        train(doc, x, y, c, out, late, resume=branch == "resume", progress=False, on_step=ran.append)
    assert ran == []   # not one step of the late trainer
    assert set(left) == set(KEPT)
    for name in KEPT:
        assert (out / name).read_bytes() == left[name], name
    assert ckpt.load_checkpoint(out / CHECKPOINT_NAME)["ledger"]["steps_done"] == doc.plan.steps
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 1 + doc.plan.steps
    # the folder is not left locked: the finished run still answers as finished
    with pytest.raises(TrainError, match="is finished: 6 of 6 steps done"):
        train(doc, x, y, c, out, TrainConfig(**CFG), resume=True, progress=False)


def test_a_resume_whose_run_recorded_steps_before_its_lock_is_refused(tmp_path, monkeypatch):
    """mut55 (stop 53), t14: the late trainer read the checkpoint of step 2 and a record of no step past it, and asks
    for another lr; before it took the lock, the first trainer resumed the run at its own lr, ran step 3 and was
    killed, the checkpoint unchanged. Only the record (`.steps_done`) tells: without comparing it under the lock, the
    late trainer trained step 3 again at lr 1e-3 on fresh noise, the first attempt's step 3 in no ledger."""
    from tests.dpdm.test_train import kill_as_step_begins

    x, y, c = tiny_data()
    doc = tiny_plan()
    out = tmp_path / "run"
    with pytest.raises(Stop):
        train(doc, x, y, c, out, TrainConfig(**CFG), progress=False, on_step=stop_at(3))
    record = out / ".steps_done"
    assert record.read_text().split()[2] == "2"

    def first():
        with monkeypatch.context() as m:
            kill_as_step_begins(m, 3)   # runs step 3 and is killed as step 4 begins: no new checkpoint
            with pytest.raises(Stop):
                train(doc, x, y, c, out, TrainConfig(**CFG), resume=True, progress=False)

    first_trainer_wins_the_race(monkeypatch, first)
    ran = []
    with pytest.raises(TrainError, match=re.escape(f"the run in {str(out)!r} changed while this one started "
                                                   "(another dpdm train?); start again with --resume") + "$"):
        train(doc, x, y, c, out, TrainConfig(**{**CFG, "lr": 1e-3}), resume=True, progress=False,
              on_step=ran.append)
    assert ran == [] and record.read_text().split()[2] == "3"
    assert ckpt.load_checkpoint(out / CHECKPOINT_NAME)["ledger"]["steps_done"] == 2
