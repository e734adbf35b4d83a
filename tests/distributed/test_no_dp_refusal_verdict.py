"""Kill test for a mutant of trainwalk F1's fix (stop 56) that its own test let live: rank 0 alone reads the
steps record of the folder a new --no-dp run would take (`_private_steps_before_a_no_dp_run`), and every rank takes its
verdict in one broadcast (`_agreed_spend`). With the broadcast skipped, rank 0 refused alone while the other ranks went
on, each collective after it paired with another (a hang, or rank 0's refusal never said on rank 1)."""
from __future__ import annotations

import pytest

import accounting
from tests.distributed.test_distributed import _one_rank_of_two, _private_images, small_plan  # noqa: F401


@pytest.mark.parametrize("verdict", [-1, 0])
def test_rank_1_of_a_no_dp_run_takes_rank_0s_verdict_on_the_folder(tmp_path, monkeypatch, small_plan, verdict):
    """Rank 1 (whose own folder holds nothing) of a new --no-dp run: its first broadcast is rank 0's verdict on the
    record, here -1 (refused: rank 0 found a private attempt's steps) or 0 (none). Refused, it stops with the
    run-wide line and writes nothing; allowed, it trains."""
    import torch.distributed as tdist

    from dpdm.train import TrainConfig, TrainError, train

    monkeypatch.setattr(accounting, "verify_document", lambda d: None)   # checked by `small_plan`
    _one_rank_of_two(monkeypatch, rank=1)
    broadcasts = []

    def broadcast(t, *a, **k):
        broadcasts.append(int(t.item()))
        if len(broadcasts) == 1:
            t.fill_(verdict)

    monkeypatch.setattr(tdist, "broadcast", broadcast)
    out, done = tmp_path / "run", []
    cfg = TrainConfig(model="small", seed=3, checkpoint_every=2, private=False)
    if verdict < 0:
        with pytest.raises(TrainError, match=r"^rank 0 refused to start the run \(its line says why\); nothing was "
                                             r"written$"):
            train(small_plan, *_private_images(), 3, out, cfg, progress=False, on_step=done.append)
        assert done == [] and not out.exists()
    else:
        summary = train(small_plan, *_private_images(), 3, out, cfg, progress=False, on_step=done.append)
        assert done == [1, 2, 3, 4] and summary["steps_done"] == 4 and summary["private"] is False
    assert broadcasts[0] == 0   # rank 1 read no record: its own value is no verdict
