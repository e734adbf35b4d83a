"""Signals that end a command: SIGTERM (a scheduler's stop) takes Ctrl-C's path, with its own line and exit code."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import accounting
from cli.main import main
from dpdm import checkpoint as ckpt
from tests.cli.test_train_sample import write_tiny_data_and_plan

ROOT = Path(__file__).resolve().parents[2]
TRAIN_LINE = "dpdm: terminated (SIGTERM); files written before are kept; a training run continues with --resume"


def test_sigterm_ends_a_training_run_with_one_line_and_a_whole_checkpoint(tmp_path):
    """`kill`, `docker stop`, Slurm's preemption: SIGTERM's default action ended `dpdm train` with exit 143 and not a
    line, with --json nothing on stdout either (h83, stop 46). It now raises where Ctrl-C would, so the writes in
    flight are abandoned whole, and the run says so in one line, exit 143. A real process and a real signal, once
    the checkpoint of step 2 is on disk; the plan is far longer than the test waits."""
    write_tiny_data_and_plan(tmp_path, steps=1000)
    plan = accounting.load_plan(tmp_path / "plan.json").plan
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "train", "--plan", str(tmp_path / "plan.json"),
                             "--out", str(run), "--device", "cpu", "--quiet", "--json", "--seed", "3",
                             "--checkpoint-every", "2"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not (run / "checkpoint.pt").exists():
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [ln for ln in err.splitlines() if ln.startswith("dpdm:") and not ln.startswith("dpdm: warning:")]
    assert proc.returncode == 143 and out == "", (proc.returncode, out, err)
    assert lines == [TRAIN_LINE] and "Traceback" not in err, err
    steps_done = ckpt.load_checkpoint(run / "checkpoint.pt")["ledger"]["steps_done"]
    assert 2 <= steps_done < plan.steps
    assert not list(run.glob(ckpt.temp_file_pattern(run / "checkpoint.pt"))), sorted(os.listdir(run))


@pytest.mark.skipif(signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL,
                    reason="SIGTERM is handled by the test runner here: dpdm leaves such a handler alone")
def test_sigterm_is_handled_only_while_a_command_runs(monkeypatch, capsys):
    """In-process: the handler is set for the command's run only (a program that calls `main` gets SIGTERM's
    default back), and the line names no --resume outside `dpdm train`."""
    seen = []

    def terminated(*args, **kwargs):
        handler = signal.getsignal(signal.SIGTERM)
        seen.append(handler)
        if handler is signal.SIG_DFL:   # never kill the test runner itself
            raise AssertionError("no SIGTERM handler while the command runs")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)   # the handler raises as soon as the signal is delivered
        raise AssertionError("SIGTERM was not raised")

    monkeypatch.setattr(accounting, "make_plan_document", terminated)
    rc = main(["plan", "--noise-multiplier", "1", "--dataset-size", "100", "--batch-size", "10", "--steps", "3",
               "--delta", "1e-5"])
    out, err = capsys.readouterr()
    assert rc == 143 and out == "" and err == "dpdm: terminated (SIGTERM); files written before are kept\n", err
    assert len(seen) == 1 and callable(seen[0])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_rank_of_several_keeps_sigterms_default(tmp_path, monkeypatch, capsys):
    """Under torchrun (WORLD_SIZE above 1) SIGTERM keeps its default action: a Python handler waits for the C++
    call in progress, so rank 0 waiting in the rendezvous for a rank that had refused its input ignored the agent's
    SIGTERM and was killed 30 s later (SIGKILL), where the default ends it at once (measured, stop 46). `dpdm train`
    alone runs under torchrun (the other commands refuse it), so SIGTERM is looked at where it checks the launch."""
    from dpdm import distributed

    seen = []

    def look(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGTERM))
        raise KeyboardInterrupt

    write_tiny_data_and_plan(tmp_path, steps=2)
    monkeypatch.setattr(distributed, "launch_problem", look)
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = main(["train", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "run"), "--device", "cpu",
               "--quiet"])
    assert rc == 130 and seen == [signal.getsignal(signal.SIGTERM)], (rc, seen, capsys.readouterr().err)


def test_the_line_advises_resume_only_where_a_checkpoint_is(tmp_path):
    """SIGTERM or running out of memory before a run's first checkpoint: the line advised --resume, which was then
    refused ("nothing to resume"; stop 46, h87 F1). Before one, the same command starts the run again."""
    from cli.main import _resume_hint

    run = tmp_path / "run"
    fresh = "; no checkpoint was written yet: the same command starts the run again"
    assert _resume_hint(["train", "--plan", "p.json", "--out", str(run)]) == fresh
    run.mkdir()
    (run / "plan.json").write_text("{}")
    assert _resume_hint(["train", "--plan", "p.json", "--out", str(run)]) == fresh
    # steps ran before the first checkpoint (`.steps_done`): the same command is refused without
    # --spend-unsaved-steps (stop 52), so the line names it; the record as dpdm.train writes it
    from dpdm.train import _StepsRecord

    record = _StepsRecord(run, ((0, 3e-4, "constant"),), 0)
    record.open()
    record.note(3)
    record.close()
    assert _resume_hint(["train", "--plan", "p.json", "--out", str(run)]) == (
        "; no checkpoint was written yet, but 3 steps ran and are spent: the same command with --spend-unsaved-steps "
        "counts them and goes on (or train in another --out and count them)")
    # all the plan's steps ran: --spend-unsaved-steps is refused there (the plan is spent), so the line says so
    (run / "plan.json").write_text('{"steps": 3}')
    assert _resume_hint(["train", "--plan", "p.json", "--out", str(run)]) == (
        "; no checkpoint was written yet, but all 3 steps of its plan ran and are spent, with no checkpoint: a new "
        "run needs a new plan and another --out")
    (run / "plan.json").write_text("{}")
    (run / ".steps_done").unlink()
    (run / "checkpoint.pt").write_bytes(b"x")
    for argv in (["train", "--plan", "p.json", "--out", str(run)], ["train", f"--out={run}", "--resume"]):
        assert _resume_hint(argv) == "; a training run continues with --resume", argv
    assert _resume_hint(["train", "--plan", "p.json"]) == fresh and _resume_hint(["sample", "--run", str(run)]) == ""
    # after the last checkpoint (the signal came before --json was printed): --resume refuses the finished run, so
    # the line says it is complete (h106 F2, stop 50); a ledger with steps still to do keeps the --resume advice
    torch.save({"ledger": {"steps_done": 12, "plan_steps": 12}, "model": {"w": torch.zeros(3)}}, run / "checkpoint.pt")
    assert _resume_hint(["train", f"--out={run}"]) == ("; the run is complete (12 of 12 steps): dpdm sample and dpdm "
                                                      "export use it as it is (--resume refuses a finished run)")
    torch.save({"ledger": {"steps_done": 11, "plan_steps": 12}}, run / "checkpoint.pt")
    assert _resume_hint(["train", f"--out={run}"]) == "; a training run continues with --resume"


def test_the_complete_run_hint_never_imports_torch(tmp_path):
    """A signal while torch was still being imported (a resume's first second), with a checkpoint in --out: the hint
    imported torch again to read the ledger, and that second import crashed the process (SIGSEGV in torch._C, no
    `dpdm:` line; r1 F1, stop 50). Without torch imported there is no finished run to read: the --resume hint."""
    torch.save({"ledger": {"steps_done": 12, "plan_steps": 12}}, tmp_path / "checkpoint.pt")
    code = ("import sys; from cli.main import _resume_hint; "
            f"print(_resume_hint(['train', '--out', {str(tmp_path)!r}])); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0 and done.stdout.splitlines() == ["; a training run continues with --resume", "False"], (
        done.stdout, done.stderr)


def test_ctrl_c_on_train_says_how_the_run_goes_on(tmp_path, capsys, monkeypatch):
    """Ctrl-C on `dpdm train` said only `dpdm: aborted`, where SIGTERM's line says what continues the run (h103 F3,
    stop 49): --resume once a checkpoint is written, before one the same command."""
    import dpdm.train

    write_tiny_data_and_plan(tmp_path, steps=4)
    checkpointed = []

    def interrupted(doc, x, y, num_classes, out, config, **kwargs):
        if checkpointed:
            (Path(out) / "checkpoint.pt").write_bytes(b"written")
        raise KeyboardInterrupt

    monkeypatch.setattr(dpdm.train, "train", interrupted)
    for run, line in ((tmp_path / "early", "dpdm: aborted; no checkpoint was written yet: the same command starts "
                                           "the run again"),
                      (tmp_path / "later", "dpdm: aborted; a training run continues with --resume")):
        (run).mkdir()
        rc = main(["train", "--plan", str(tmp_path / "plan.json"), "--out", str(run), "--device", "cpu", "--quiet"])
        out, err = capsys.readouterr()
        assert rc == 130 and out == "" and err == line + "\n", (rc, err)
        checkpointed.append(True)


def test_resume_with_nothing_to_resume_says_to_run_the_command_without_it(tmp_path, capsys):
    """After a Ctrl-C before the first checkpoint, `--resume` under a size-only plan (the README's advice for private
    data) was refused with "--dataset is required: the plan names no dataset", and with --dataset, "nothing to
    resume" (h103 F3, stop 49). Both now say that nothing is to be resumed and what starts the run; a run whose
    checkpoint names no data that is found here, under such a plan, is told to give --dataset."""
    plan = accounting.PrivacyPlan(dataset_size=24, batch_size=6, steps=4, noise_multiplier=2.0, delta=1e-5)
    accounting.write_plan(accounting.make_plan_document(plan), tmp_path / "plan.json")
    run = tmp_path / "run"
    run.mkdir()
    (run / "plan.json").write_text("{}")   # what a run stopped before its first checkpoint leaves
    args = ["train", "--plan", str(tmp_path / "plan.json"), "--out", str(run), "--resume", "--device", "cpu"]
    for extra in ([], ["--dataset", f"npz:{tmp_path / 'data.npz'}"]):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert err == (f"dpdm: error: nothing to resume: {str(run / 'checkpoint.pt')!r} does not exist; a run stopped "
                       "before its first checkpoint starts again with the same command without --resume\n"), err
    from dpdm.train import _StepsRecord

    record = _StepsRecord(run, ((0, 3e-4, "constant"),), 0)   # one step ran before it stopped (stop 52)
    record.open()
    record.note(1)
    record.close()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"dpdm: error: nothing to resume: {str(run / 'checkpoint.pt')!r} does not exist; a run stopped "
                   "before its first checkpoint starts again with the same command without --resume and with "
                   "--spend-unsaved-steps, which counts the 1 step it ran\n"), err
    record = _StepsRecord(run, ((0, 3e-4, "constant"),), 1)   # the plan's last step ran too
    record.open()
    record.note(int(accounting.load_plan(tmp_path / "plan.json").plan.steps))
    record.close()
    (run / "plan.json").write_bytes((tmp_path / "plan.json").read_bytes())   # the run folder's copy of its plan
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "which are spent: a new run needs a new plan and another --out\n" in err and err.count("\n") == 1, err
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"dpdm: error: --dataset is required: the plan names no dataset, and the run in {str(run)!r} names "
                   "none that is found here; pass --dataset naming the run's data\n"), err


def test_a_record_that_is_not_dpdms_line_reads_as_no_steps_for_the_hint(tmp_path):
    """mut55 (stop 53), s01: the signal line's hint reads the run's `.steps_done` without torch (`recorded_steps`);
    a record cut after its head (a machine crash's partial write, an edit) raised IndexError inside the signal
    handler instead of reading as no step recorded."""
    from dpdm.steps_record import recorded_steps

    record = tmp_path / ".steps_done"
    for raw in (b"dpdm-steps-run v1\n", b"dpdm-steps-run v1", b"", b"\0" * 128, b"dpdm-steps-run v1 three\n",
                b"dpdm-steps-run v2 3 0123456789abcdef 0.001 constant\n"):
        record.write_bytes(raw)
        assert recorded_steps(str(tmp_path)) == 0, raw
    record.write_bytes(b"dpdm-steps-run v1 3 0123456789abcdef 0.001 constant".ljust(127) + b"\n")
    assert recorded_steps(str(tmp_path)) == 3


def test_the_hint_reads_a_plan_json_whose_steps_are_no_count_as_no_plan(tmp_path):
    """mut55 (stop 53), s03: `recorded_plan_steps` reads plan.json's steps for the hint's "all N steps of its plan
    ran" only where it is a count > 0: a bool (True == 1) or 0 there said all the plan's steps ran after one step."""
    import json

    from cli._common import recorded_plan_steps, unsaved_steps_advice

    (tmp_path / ".steps_done").write_bytes(b"dpdm-steps-run v1 1 0123456789abcdef 0.001 constant".ljust(127) + b"\n")
    for steps in (True, 0, -3, "6", 2.0):
        (tmp_path / "plan.json").write_text(json.dumps({"steps": steps}))
        assert recorded_plan_steps(str(tmp_path)) is None, steps
        assert unsaved_steps_advice(str(tmp_path)).startswith("1 step ran and is spent: the same command with "
                                                             "--spend-unsaved-steps"), steps
    (tmp_path / "plan.json").write_text(json.dumps({"steps": 6}))
    assert recorded_plan_steps(str(tmp_path)) == 6


_READERS = '''
import json, sys, threading
from cli._common import recorded_plan_steps, recorded_steps
from cli.train import _unsaved_lr_change
readers = {".steps_done": recorded_steps, "plan.json": recorded_plan_steps,
           "config.json": lambda d: _unsaved_lr_change(d, {"lr": 0.001, "lr_schedule": "constant"})}
out = {}
for folder in sys.argv[1:]:
    name = folder.rsplit("-", 1)[1]
    got = []
    def read():
        try:
            got.append(readers[name](folder))
        except BaseException as e:
            got.append(type(e).__name__)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(3)
    out[folder.rsplit("/", 1)[1]] = got[0] if got else "hung"
print(json.dumps(out), flush=True)
import os; os._exit(0)   # a reader still blocked on a FIFO
'''


def test_the_advice_readers_say_nothing_of_a_fifo_a_device_or_an_oversized_file(tmp_path):
    """The torch-free readers of a run folder's files for advice lines (`recorded_steps`: .steps_done, for export's,
    sample's and the Ctrl-C hint's lines; `recorded_plan_steps`: plan.json; `cli.train._unsaved_lr_change`:
    config.json) opened them with a plain open(): a FIFO hung the command for good, even its Ctrl-C hint, and a link
    to /dev/zero or a sparse 3 GB file read until memory ran out (h145 F1, stop 54). They read as `dpdm train`'s own
    reader does now (`read_regular`: O_NONBLOCK, a regular file, a size cap) and say nothing there. In a child
    process under a 2 GiB address-space limit, each read in a thread given 3 s."""
    import json
    import resource

    folders = []
    for name in (".steps_done", "plan.json", "config.json"):
        for kind in ("fifo", "zero", "big"):
            folder = tmp_path / f"{kind}-{name}"
            folder.mkdir()
            if kind == "fifo":
                os.mkfifo(folder / name)
            elif kind == "zero":
                (folder / name).symlink_to("/dev/zero")
            else:   # sparse: a few kilobytes of disk; a record's line, or a valid start of JSON, then 3 GB
                with open(folder / name, "wb") as f:
                    f.write(b"dpdm-steps-run v1 3 0123456789abcdef 0.001 constant".ljust(127) + b"\n"
                            if name == ".steps_done" else b'{"steps": 4, "train": {"lr": 0.5}}')
                    f.truncate(3 << 30)
            folders.append(str(folder))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    proc = subprocess.run([sys.executable, "-c", _READERS, *folders], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, preexec_fn=limit)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    # a large record reads as dpdm train reads it: its first line (`dpdm.train._read_steps_record`)
    assert got == {"fifo-.steps_done": 0, "zero-.steps_done": 0, "big-.steps_done": 3,
                   "fifo-plan.json": None, "zero-plan.json": None, "big-plan.json": None,
                   "fifo-config.json": [], "zero-config.json": [], "big-config.json": []}, got
    from cli._common import PLAN_BYTES

    assert PLAN_BYTES == accounting.MAX_PLAN_BYTES   # plan.json's cap, without importing accounting in the hint
