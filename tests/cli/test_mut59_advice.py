"""mut59 (stop 55): `warn_steps_past_checkpoint` beside a run that is training (its .train.lock held) says "is
training (step N ...)" only of the run's own record: a record train would refuse (another plan's, other data's, a
damaged one) read while the run trains is none of its steps, and was given a line with their count (or "step 0")."""
from __future__ import annotations

import fcntl

import accounting
from dpdm.report_utils import epsilon_text


def test_a_training_runs_line_reads_only_its_own_record(tmp_path, capsys):
    from cli._common import warn_steps_past_checkpoint
    from dpdm.steps_record import RECORD_HEAD, RECORD_WIDTH, STEPS_RECORD, record_binding

    run = tmp_path / "run"
    run.mkdir()
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=4, noise_multiplier=2.0, delta=1e-5,
                                  dataset_name=f"npz:{tmp_path / 'data.npz'}")
    doc = accounting.make_plan_document(plan)
    accounting.write_plan(doc, run / "plan.json")
    (run / "checkpoint.pt").write_bytes(b"")
    data = "sha256:" + "ab" * 32
    result = {"private": True, "steps_done": 2, "plan_steps": 4, "plan_digest": doc.digest,
              "epsilon": accounting.epsilon_spent(plan, 2)}

    def record(plan_bound=record_binding(doc.digest), data_bound=record_binding(data), cut=False):
        line = f"{RECORD_HEAD} 3 {'0' * 16} 0.0003 constant {plan_bound}" + ("" if cut else f" {data_bound}")
        (run / STEPS_RECORD).write_text(line.ljust(RECORD_WIDTH - 1) + "\n")

    def said():
        warn_steps_past_checkpoint(run / "checkpoint.pt", result, "the samples'", data_digest=data)
        return capsys.readouterr().err

    with open(run / ".train.lock", "a") as lock:   # as dpdm.train._lock_run_folder holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        record()
        err = said()
        assert "is training (step 3 of its 4)" in err and "checkpoint of step 2" in err, err
        assert epsilon_text(result["epsilon"]) in err, err
        for kind in (dict(plan_bound="f" * 16), dict(data_bound="0" * 16), dict(cut=True)):
            record(**kind)
            assert said() == "", kind
    record(plan_bound="f" * 16)   # once the lock is gone: the line on another plan's record
    assert "of a run under plan sha256:ffff" in said()
