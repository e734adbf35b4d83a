"""Samples of a run stopped part-way record the steps it took and the epsilon it spent, not its plan's
(stop 45, mut45 M1). Every existing sample test samples a finished run, where steps_done == plan_steps, so
`meta_steps_done` copied from the plan passed them all: a 2-of-4-step model's samples then read as fully trained.
The same for `dpdm export`'s line (stop 47, mut48 X4). A run stopped past its checkpoint (its .steps_done records
more steps than the checkpoint's ledger) releases the checkpoint's epsilon, which holds for those weights alone, and
both commands say what the run itself spent (h131 F1, stop 53)."""
import json
import shutil

import numpy as np
import pytest

import accounting
from cli.main import main
from dpdm import checkpoint as ckpt
from dpdm.report_utils import epsilon_text


def test_samples_of_a_run_killed_at_step_3_after_its_checkpoint_of_step_2_say_2_of_4_and_warn_of_3(
        tmp_path, capsys, monkeypatch):
    """Killed in step 4, after step 3's record (Ctrl-C): the checkpoint holds step 2. The samples and
    the release state epsilon(2) of 2 of 4 steps (the weights of step 2 depend on steps 1..2 alone), and each
    command warns, in one line, that the run ran step 3 and spent epsilon(3) (metrics.csv showed it), naming the
    resume; their human lines say "2 of 4" (h131 N1: sample's said nothing)."""
    import dpdm.train

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(24, 1, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", x=x, y=(np.arange(24) % 3).astype(np.int64), num_classes=3)
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=4, noise_multiplier=2.0, noise_multiplicity=2,
                                  delta=1e-5, dataset_name=f"npz:{tmp_path / 'data.npz'}")
    accounting.write_plan(accounting.make_plan_document(plan), tmp_path / "plan.json")
    real_check, checks = dpdm.train._finite_model, []

    def die_in_step_4(*args):   # step 4's check of the weights: steps 1..3 ran and are recorded
        checks.append(1)
        if len(checks) == 4:
            raise KeyboardInterrupt
        return real_check(*args)

    monkeypatch.setattr(dpdm.train, "_finite_model", die_in_step_4)
    code = main([str(a) for a in ["train", "--plan", tmp_path / "plan.json", "--out", tmp_path / "run", "--device",
                                  "cpu", "--quiet", "--checkpoint-every", "2", "--seed", "5"]])
    monkeypatch.setattr(dpdm.train, "_finite_model", real_check)
    capsys.readouterr()
    assert code != 0 and ckpt.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["ledger"]["steps_done"] == 2
    assert (tmp_path / "run" / ".steps_done").read_text().split()[2] == "3"
    plan = accounting.load_plan(tmp_path / "plan.json").plan
    eps2, eps3 = (accounting.epsilon_spent(plan, k) for k in (2, 3))

    def warned(err):   # one line: the steps the run ran, past which checkpoint, what it spent, the resume
        lines = [line for line in err.splitlines() if ".steps_done" in line]
        assert len(lines) == 1, err
        line = lines[0]
        assert line.startswith("dpdm: warning: the run in ") and "ran 3 of its 4 steps" in line, line
        assert "checkpoint of step 2" in line and f"epsilon {epsilon_text(eps2)} (2 steps) holds for" in line, line
        assert f"spent epsilon {epsilon_text(eps3)} (3 steps)" in line and "metrics.csv" in line, line
        assert "dpdm train --resume" in line and "replays step 3" in line, line

    code = main([str(a) for a in ["sample", "--run", tmp_path / "run", "--n", 3, "--sampler-steps", 2, "--out",
                                  tmp_path / "s.npz", "--device", "cpu", "--json"]])
    out, err = capsys.readouterr()
    assert code == 0, err
    warned(err)
    doc = json.loads(out)
    assert doc["steps_done"] == 2 and doc["plan_steps"] == 4 and doc["epsilon"] == pytest.approx(eps2)
    with np.load(tmp_path / "s.npz") as z:
        assert int(z["meta_steps_done"]) == 2 and int(z["meta_plan_steps"]) == 4
        assert float(z["meta_epsilon"]) == pytest.approx(eps2)
    # `dpdm export`'s line and JSON say the same (mut48, stop 47: "after 4 of 4 steps" passed every test)
    assert main([str(a) for a in ["export", "--run", tmp_path / "run", "--out", tmp_path / "m.pt"]]) == 0
    err = capsys.readouterr().err
    assert "after 2 of 4 steps" in err
    warned(err)
    assert main([str(a) for a in ["export", "--run", tmp_path / "run", "--out", tmp_path / "m.pt", "--json"]]) == 0
    out, err = capsys.readouterr()
    warned(err)
    doc = json.loads(out)
    assert doc["steps_done"] == 2 and doc["plan_steps"] == 4 and doc["epsilon_spent"] == pytest.approx(eps2)
    # The release file, sampled away from the run folder, is the weights alone: no line about the run. Sample's
    # human line says "2 of 4" as export's does (h131 N1).
    code = main([str(a) for a in ["sample", "--checkpoint", tmp_path / "m.pt", "--n", 3, "--sampler-steps", 2,
                                  "--out", tmp_path / "s.npz", "--device", "cpu"]])
    err = capsys.readouterr().err
    assert code == 0 and f"wrote 3 samples to {tmp_path / 's.npz'} from step 2 of 4" in err, err
    assert ".steps_done" not in err, err
    # A copy of the checkpoint kept under another name in the run folder is no stopped run's checkpoint, and a
    # run that is training (its .train.lock held) has not stopped: no resume advice (r1 F1, stop 53)
    import fcntl
    import shutil

    shutil.copyfile(tmp_path / "run" / "checkpoint.pt", tmp_path / "run" / "ckpt2.pt")
    code = main([str(a) for a in ["sample", "--checkpoint", tmp_path / "run" / "ckpt2.pt", "--n", 3,
                                  "--sampler-steps", 2, "--out", tmp_path / "s.npz", "--device", "cpu"]])
    err = capsys.readouterr().err
    assert code == 0 and ".steps_done" not in err and "--resume" not in err, err
    with open(tmp_path / "run" / ".train.lock", "a") as lock:   # as dpdm.train._lock_run_folder holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = main([str(a) for a in ["sample", "--run", tmp_path / "run", "--n", 3, "--sampler-steps", 2, "--out",
                                      tmp_path / "s.npz", "--device", "cpu"]])
        err = capsys.readouterr().err
    assert code == 0 and "is training (step 3 of its 4)" in err and "checkpoint of step 2" in err, err
    assert "before it stopped" not in err and "--resume" not in err, err
    # A record of the run's plan on other data than its checkpoint's (copied from a run of the plan on other data)
    # is not priced at this run's plan: both commands compare it with the checkpoint's data digest (h151 F2)
    line = (tmp_path / "run" / ".steps_done").read_text().split()
    (tmp_path / "run" / ".steps_done").write_text(" ".join([*line[:-1], "0" * 16]).ljust(127) + "\n")
    for command in (["export", "--run", tmp_path / "run", "--out", tmp_path / "m.pt"],
                    ["sample", "--run", tmp_path / "run", "--n", 3, "--sampler-steps", 2, "--out", tmp_path / "s.npz",
                     "--device", "cpu"]):
        code = main([str(a) for a in command])
        err = capsys.readouterr().err
        assert code == 0 and "records 3 steps of a run on other data" in err and "cannot be told" in err, err
        assert f"spent epsilon {epsilon_text(eps3)}" not in err and "replays step 3" not in err, err


def _planned_run(tmp_path, steps_done, plan_steps=4):
    """A run folder with its locked plan.json (24 images, batch 6), and the summary export or sample gives of its
    checkpoint of `steps_done` steps: for `warn_steps_past_checkpoint`, without a training."""
    run = tmp_path / "run"
    run.mkdir()
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=plan_steps, noise_multiplier=2.0,
                                  noise_multiplicity=2, delta=1e-5, dataset_name=f"npz:{tmp_path / 'data.npz'}")
    doc = accounting.make_plan_document(plan)
    accounting.write_plan(doc, run / "plan.json")
    return run, plan, doc, {"private": True, "steps_done": steps_done, "plan_steps": plan_steps,
                            "plan_digest": doc.digest, "epsilon": accounting.epsilon_spent(plan, steps_done)}


def test_the_line_of_a_run_stopped_past_its_checkpoint_reads_the_record_and_the_runs_own_plan(tmp_path, capsys):
    """`warn_steps_past_checkpoint`'s branches, without a training (mut56, stop 54): a record at the checkpoint's step
    says nothing (a finished run's); a run that ran to its plan's last step has nothing that "goes on", and two steps
    past the checkpoint are named as a range; a --no-dp run says nothing; and a plan.json that is not the ledger's plan
    (a run folder whose plan was replaced) gives no epsilon of its own, only "the epsilon of 4 steps"."""
    from cli._common import warn_steps_past_checkpoint
    from dpdm.steps_record import RECORD_HEAD_V1, RECORD_WIDTH, STEPS_RECORD

    run, plan, doc, result = _planned_run(tmp_path, 2)

    def record(steps):   # a v1 line of dpdm.train's _StepsRecord (its digest, lr and schedule checked, not used)
        (run / STEPS_RECORD).write_text(f"{RECORD_HEAD_V1} {steps} {'0' * 16} 0.001 constant".ljust(
            RECORD_WIDTH - 1) + "\n")

    def said(**changed):
        warn_steps_past_checkpoint(run / "checkpoint.pt", {**result, **changed}, "the samples'")
        return capsys.readouterr().err

    record(2)
    assert said() == ""   # the record at the checkpoint's step: nothing ran past it
    record(4)
    err = said()
    assert "ran 4 of its 4 steps" in err and "checkpoint of step 2" in err, err
    assert f"spent epsilon {epsilon_text(accounting.epsilon_spent(plan, 4))} (4 steps)" in err, err
    assert "replays steps 3 to 4, its checkpoints counting them" in err and "goes on" not in err, err
    record(3)
    assert "replays step 3 and goes on, its checkpoints counting it" in said()
    assert said(private=False) == ""   # a --no-dp run's checkpoint: no epsilon to speak of
    record(4)
    (run / "plan.json").unlink()
    other = accounting.make_plan_document(accounting.PrivacyPlan(
        dataset_size=24, batch_size=6, steps=4, noise_multiplier=3.0, noise_multiplicity=2, delta=1e-5,
        dataset_name=f"npz:{tmp_path / 'data.npz'}"))
    accounting.write_plan(other, run / "plan.json")
    err = said()
    assert "the run has spent the epsilon of 4 steps," in err, err
    assert epsilon_text(accounting.epsilon_spent(other.plan, 4)) not in err, err


def test_a_record_train_refuses_is_priced_at_nothing_and_a_link_to_the_checkpoint_is_the_runs(tmp_path, capsys):
    """A v2 record naming another plan or other data than the checkpoint's (copied from another run's folder), or a
    damaged one, was priced at this run's plan ("spent epsilon ... replays steps 3 to 4"), or for a line cut short
    not said at all, where `dpdm train --resume` refuses each (h151 F2, stop 55): the line says the record is not this
    run's, or is damaged, that the steps past the checkpoint cannot be told, and prices none. A link to the run's
    checkpoint.pt (`--checkpoint latest.pt`) is the run's, and was given no line (h151 F3); a link to a copy is not."""
    from cli._common import warn_steps_past_checkpoint
    from dpdm.steps_record import RECORD_HEAD, RECORD_WIDTH, STEPS_RECORD, record_binding

    run, plan, doc, result = _planned_run(tmp_path, 2)
    (run / "checkpoint.pt").write_bytes(b"")   # read by nothing here: a link's target
    data = "sha256:" + "ab" * 32
    eps4 = epsilon_text(accounting.epsilon_spent(plan, 4))

    def record(plan_bound=record_binding(doc.digest), data_bound=record_binding(data), cut=False):
        line = f"{RECORD_HEAD} 4 {'0' * 16} 0.0003 constant {plan_bound}" + ("" if cut else f" {data_bound}")
        (run / STEPS_RECORD).write_text(line.ljust(RECORD_WIDTH - 1) + "\n")

    def said(checkpoint=run / "checkpoint.pt"):
        warn_steps_past_checkpoint(checkpoint, result, "the samples'", data_digest=data)
        return capsys.readouterr().err

    record()
    err = said()
    assert "ran 4 of its 4 steps" in err and f"spent epsilon {eps4} (4 steps)" in err, err
    for kind, needle in ((dict(plan_bound="f" * 16), f"of a run under plan sha256:{'f' * 16}... (not this run's "
                                                     f"plan, sha256:{record_binding(doc.digest)}...)"),
                         (dict(data_bound="0" * 16), "of a run on other data"),
                         (dict(cut=True), "is not the record dpdm keeps of the steps a run ran (not the line dpdm "
                                          "writes there: damaged or edited)")):
        record(**kind)
        err = said()
        assert err.count("dpdm: warning:") == 1 and needle in err, err
        assert "past its checkpoint of step 2 cannot be told" in err and "refuses the record" in err, err
        assert "has spent" not in err and eps4 not in err and "replays steps 3 to 4" not in err, err
        assert "the samples' epsilon" in err and "(2 steps) holds for these weights alone" in err, err
    record(plan_bound="f" * 16)
    result["steps_done"] = 4   # a finished run (train says so, not the record's plan): no step past it (r2 F3)
    assert said() == ""
    result["steps_done"] = 2
    # Through a link: the run's checkpoint.pt, under another name or from another folder, is the run's (its record
    # and plan.json are read in its folder)
    elsewhere = tmp_path / "release"
    elsewhere.mkdir()
    (elsewhere / "latest.pt").symlink_to(run / "checkpoint.pt")
    (elsewhere / "checkpoint.pt").symlink_to(run / "checkpoint.pt")
    assert f"the run in {str(run)!r} has a .steps_done that records 4 steps of a run under plan" in said(
        elsewhere / "checkpoint.pt")
    record()
    err = said(elsewhere / "latest.pt")
    assert f"the run in {str(run)!r} ran 4 of its 4 steps" in err and f"spent epsilon {eps4}" in err, err
    shutil.copyfile(run / "checkpoint.pt", run / "ckpt2.pt")
    (elsewhere / "copy.pt").symlink_to(run / "ckpt2.pt")
    assert said(elsewhere / "copy.pt") == ""   # a link to a copy kept of a checkpoint: no stopped run's (r1 F1)


@pytest.mark.parametrize("line", [
    "dpdm-steps-run v2 7 cd102fa0e195d116 0.0003 constant 326b63baa22a5ca9 9cb9e6d250c249f3",
    "dpdm-steps-run v2 7 cd102fa0e195d116 0.0003 constant 326b63baa22a5ca9",   # cut short
    "dpdm-steps-run v2 7 cd102fa0e195d116 0.0003 warmup 326b63baa22a5ca9 9cb9e6d250c249f3",
    "dpdm-steps-run v2 7 cd102fa0e195d116 nan constant 326b63baa22a5ca9 9cb9e6d250c249f3",
    "dpdm-steps-run v2 7 cd102fa0e195d116 0.0003 cosine 326b63baa22a5ca9 9CB9E6D250C249F3",
    "dpdm-steps-run v2 -1 cd102fa0e195d116 0.0003 constant 326b63baa22a5ca9 9cb9e6d250c249f3",
    "dpdm-steps-run v1 3 cd102fa0e195d116 0x1.3a92a30553261p-12 cosine",
    "dpdm-steps-run v1 3 cd102fa0e195d116 0.0003",
    "\0" * 127, "", "garbage"])
def test_the_advice_lines_read_a_steps_record_as_train_does(tmp_path, line):
    """`steps_record.read_record` (export's and sample's line, torch-free) judges a record as `dpdm train --resume`
    does (`dpdm.train._read_steps_record`): the steps and bindings it counts, and the records it refuses as damaged
    (h151 F2, stop 55). Its schedules are train's."""
    from pathlib import Path

    import dpdm.train
    from dpdm.steps_record import RECORD_SCHEDULES, STEPS_RECORD, read_record

    assert RECORD_SCHEDULES == dpdm.train.LR_SCHEDULES
    (tmp_path / STEPS_RECORD).write_text(line if not line.strip() else line.ljust(127) + "\n")
    _, record, problem = dpdm.train._read_steps_record(Path(tmp_path))
    got, got_problem = read_record(str(tmp_path))
    assert got_problem == problem
    assert got == (None if record is None else (record[0], *record[4:6]))


def _r2_run(tmp_path, steps_done, plan_steps=4):
    from dpdm.steps_record import RECORD_HEAD, RECORD_WIDTH, STEPS_RECORD, record_binding

    run, plan, doc, result = _planned_run(tmp_path, steps_done, plan_steps)
    data = "sha256:" + "ab" * 32

    def record(steps, plan_bound=record_binding(doc.digest)):
        line = f"{RECORD_HEAD} {steps} {'0' * 16} 0.0003 constant {plan_bound} {record_binding(data)}"
        (run / STEPS_RECORD).write_text(line.ljust(RECORD_WIDTH - 1) + "\n")
    return run, plan, data, result, record


def test_a_runs_checkpoint_pt_linked_to_another_name_in_its_folder_is_the_runs(tmp_path, capsys):
    from cli._common import warn_steps_past_checkpoint

    run, plan, data, result, record = _r2_run(tmp_path, 2)
    (run / "ckpt2.pt").write_bytes(b"")
    (run / "checkpoint.pt").symlink_to("ckpt2.pt")   # `dpdm train --resume` resumes from it and reads the record
    record(4)
    warn_steps_past_checkpoint(run / "checkpoint.pt", result, "the samples'", data_digest=data)
    assert "ran 4 of its 4 steps" in capsys.readouterr().err


def test_a_finished_runs_foreign_record_does_not_say_steps_past_its_last_checkpoint_are_unknown(tmp_path, capsys):
    from cli._common import warn_steps_past_checkpoint

    run, plan, data, result, record = _r2_run(tmp_path, 4)
    (run / "checkpoint.pt").write_bytes(b"")
    record(9, plan_bound="f" * 16)
    warn_steps_past_checkpoint(run / "checkpoint.pt", result, "the samples'", data_digest=data)
    err = capsys.readouterr().err
    assert "cannot be told" not in err and "is unknown" not in err, err
