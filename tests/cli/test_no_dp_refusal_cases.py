"""Kill tests for the mutants of trainwalk F1's fix (stop 56) that its own test let live, and r1 F1.

`_private_steps_before_a_no_dp_run` refuses a new --no-dp run the folder of a private attempt killed before its
first checkpoint. Its test kills an attempt after 2 steps only; these pin the rest of what the fix does: one step is
refused too, a damaged record is refused (how many private steps ran cannot be told), a record that says no step
ran (an attempt killed in its first step: the record is created empty) is no refusal, and a private attempt that
trains in the folder between the --no-dp run's check and its lock is caught under the lock."""
from __future__ import annotations

import re

import pytest

import dpdm.train as T
from dpdm.train import TrainConfig, TrainError, train
from tests.cli.test_train_sample import _train_args, run_cli, write_tiny_data_and_plan
from tests.dpdm.test_train import CFG, Stop, kill_as_step_begins, tiny_data, tiny_plan


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != ".train.lock"}


def _killed_private_attempt(tmp_path, monkeypatch, capsys, steps_run, plan_steps=6):
    """A private attempt in tmp_path/run killed as its step `steps_run` + 1 begins, before its first checkpoint."""
    write_tiny_data_and_plan(tmp_path, steps=plan_steps)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        kill_as_step_begins(m, steps_run)
        try:
            code, _, _ = run_cli(_train_args(tmp_path, out, "--checkpoint-every", "4", "--log-every", "1"), capsys)
        except Stop:
            code = None
    assert code != 0 and not (out / "checkpoint.pt").exists()
    return out


def test_a_no_dp_run_is_refused_after_a_private_attempt_of_one_step(tmp_path, monkeypatch, capsys):
    """Mutant `record[0] > 1` (the fix's test kills after 2 steps): one private step is budget spent too."""
    out = _killed_private_attempt(tmp_path, monkeypatch, capsys, 1)
    assert (out / ".steps_done").read_text().split()[2] == "1"
    before = _files(out)
    code, _, err = run_cli(_train_args(tmp_path, out, "--checkpoint-every", "4", "--no-dp"), capsys)
    assert code == 2, err
    assert "trained 1 step and was stopped before its first checkpoint" in err, err
    assert "or start the private run there again with --spend-unsaved-steps, which counts them" in err, err
    assert _files(out) == before and not (out / "checkpoint.pt").exists()


def test_a_no_dp_run_is_refused_beside_a_damaged_steps_record(tmp_path, monkeypatch, capsys):
    """Mutant: the `problem is not None` branch dropped. A damaged record cannot say how many private steps ran: the
    --no-dp run would take the folder and write a --no-dp checkpoint over whatever they were."""
    out = _killed_private_attempt(tmp_path, monkeypatch, capsys, 2)
    (out / ".steps_done").write_bytes(b"dpdm-steps-run v2 two\n")
    before = _files(out)
    code, _, err = run_cli(_train_args(tmp_path, out, "--checkpoint-every", "4", "--no-dp"), capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "is not the record dpdm keeps of the steps a run ran" in lines[0], err
    assert _files(out) == before and not (out / "checkpoint.pt").exists()


def test_a_no_dp_run_takes_the_folder_of_a_private_attempt_killed_in_its_first_step(tmp_path, monkeypatch, capsys):
    """Mutant: `_private_steps_before_a_no_dp_run` returns None, not the record's bytes. The attempt created its
    record (empty: no step ran) and died in step 1; the --no-dp run may start there (a private one may too), but
    under the lock it compared the empty record with None and refused: "changed while this one started"."""
    out = _killed_private_attempt(tmp_path, monkeypatch, capsys, 0)
    assert (out / ".steps_done").read_bytes().strip(b"\0") == b""
    code, _, err = run_cli(_train_args(tmp_path, out, "--checkpoint-every", "4", "--no-dp"), capsys)
    assert code == 0, err
    assert (out / "checkpoint.pt").exists()


def test_a_no_dp_run_whose_folder_got_private_steps_before_its_lock_is_refused(tmp_path, monkeypatch):
    """Mutant: the after-lock re-check of the record only for private runs (`config.private` without `or state is
    None`). The --no-dp run read no record; before it took the lock, a private attempt ran 2 steps there and was
    killed before its first checkpoint. Without the re-check the --no-dp run trained there, replaced the attempt's
    metrics and wrote a --no-dp checkpoint: those private steps in no ledger."""
    x, y, c = tiny_data()
    doc = tiny_plan()
    out = tmp_path / "run"
    real_lock = T._lock_run_folder

    def late_lock(folder):
        monkeypatch.setattr(T, "_lock_run_folder", real_lock)
        with monkeypatch.context() as m:
            kill_as_step_begins(m, 2)
            with pytest.raises(Stop):
                train(doc, x, y, c, out, TrainConfig(**{**CFG, "checkpoint_every": 4}), progress=False)
        return real_lock(folder)

    monkeypatch.setattr(T, "_lock_run_folder", late_lock)
    ran = []
    with pytest.raises(TrainError, match=re.escape(f"the run in {str(out)!r} changed while this one started")):
        train(doc, x, y, c, out, TrainConfig(**{**CFG, "private": False, "checkpoint_every": 4}), progress=False,
              on_step=ran.append)
    assert ran == [] and not (out / "checkpoint.pt").exists()
    assert (out / ".steps_done").read_text().split()[2] == "2"


def test_r1_f1_the_no_dp_refusal_advises_nothing_that_is_refused(tmp_path, monkeypatch, capsys):
    """r1 F1 (fails on 7ed201d): a private attempt ran all the plan's steps and was killed before its checkpoint
    (here: as it saved it). The --no-dp refusal advises "resume that run privately with --spend-unsaved-steps",
    which is refused (the plan is spent); and "resume" led a user to --resume, which is "nothing to resume"."""
    write_tiny_data_and_plan(tmp_path, steps=2)
    out = tmp_path / "run"

    def killed(*a, **k):
        raise Stop

    with monkeypatch.context() as m:
        m.setattr(T.ckpt, "save_checkpoint", killed)
        try:
            run_cli(_train_args(tmp_path, out, "--checkpoint-every", "4"), capsys)
        except Stop:
            pass
    capsys.readouterr()
    assert (out / ".steps_done").read_text().split()[2] == "2" and not (out / "checkpoint.pt").exists()
    code, _, err = run_cli(_train_args(tmp_path, out, "--checkpoint-every", "4", "--no-dp"), capsys)
    assert code == 2, err
    # All 2 steps of the plan ran: --spend-unsaved-steps would be refused ("the plan is spent"), so it is not advised.
    assert "--spend-unsaved-steps" not in err and "resume" not in err, err
    assert err.strip().endswith("choose another --out (nothing was written)"), err
    code2, _, err2 = run_cli(_train_args(tmp_path, out, "--checkpoint-every", "4", "--spend-unsaved-steps"), capsys)
    assert code2 == 2 and "which is spent" in err2, err2
