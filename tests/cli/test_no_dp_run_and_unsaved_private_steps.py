"""A --no-dp run took, without a word, the folder of a private attempt killed before its first
checkpoint, whose steps record (`.steps_done`) says it ran steps on the private data. The new run deleted the
attempt's metrics rows (which showed those steps) and wrote a --no-dp checkpoint there, after which no command speaks
of the private steps again (`--resume` is "cannot resume a --no-dp run as private", a new private run is "already
holds a run"): spent budget forgotten. A private new run there is refused (or spends them with
--spend-unsaved-steps); a --no-dp one should be refused too, one line, exit 2, nothing written."""
from __future__ import annotations

from tests.cli.test_train_sample import _train_args, run_cli, write_tiny_data_and_plan
from tests.dpdm.test_train import Stop, kill_as_step_begins


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != ".train.lock"}


def test_a_no_dp_run_is_refused_the_folder_of_a_private_attempt_killed_before_its_first_checkpoint(
        tmp_path, monkeypatch, capsys):
    write_tiny_data_and_plan(tmp_path, steps=6)
    out = tmp_path / "run"
    kill_as_step_begins(monkeypatch, 2)   # the private attempt ran steps 1 and 2, then died; its checkpoint is at 4
    try:   # `dpdm`'s main turns the Stop into its internal-error line; the folder is what a kill leaves
        code, _, _ = run_cli(_train_args(tmp_path, out, "--checkpoint-every", "4", "--log-every", "1"), capsys)
    except Stop:
        code = None
    assert code != 0
    monkeypatch.undo()
    assert not (out / "checkpoint.pt").exists()
    assert (out / ".steps_done").read_text().split()[2] == "2"
    before = _files(out)
    assert before["metrics.csv"].count(b"\n") == 3   # the header and the rows of the 2 private steps

    code, out_text, err = run_cli(_train_args(tmp_path, out, "--checkpoint-every", "4", "--no-dp"), capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpdm: error: ") and ".steps_done" in lines[0], err
    assert _files(out) == before   # the private attempt's record and its metrics rows are kept
    assert not (out / "checkpoint.pt").exists()
