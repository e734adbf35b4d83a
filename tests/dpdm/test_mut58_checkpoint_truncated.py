"""mut58 (stop 55), F1: a checkpoint that torch's legacy (non-zip) reader takes, cut short where its pickle reads
4 bytes (LONG_BINGET, BININT, BINUNICODE, ...), made `torch.load(weights_only=True)` raise struct.error, which
`dpdm.checkpoint.TORCH_LOAD_ERRORS` did not name: a traceback (exit 4) from `dpdm sample`, `dpdm export`,
`dpdm train --resume`, and `dpdm plan --out RUN/plan.json` beside a record (`cli.plan._ledger_plan`). The 4 bytes
b"junk" are one (b"junk\\n" is a KeyError, which the existing tests use). It is a CheckpointError, one line."""

import io

import pytest
import torch

import dpdm.checkpoint as ckpt


def test_a_legacy_torch_file_cut_anywhere_is_a_checkpoint_error(tmp_path):
    buf = io.BytesIO()
    torch.save({"format": "x", "a": torch.zeros(3)}, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    path = tmp_path / "checkpoint.pt"
    for cut in [b"junk", b"J\0", b"X\1\0", *(raw[:n] for n in range(1, len(raw)))]:
        path.write_bytes(cut)
        with pytest.raises(ckpt.CheckpointError, match="is corrupt or truncated|refused|not a dpdm checkpoint"):
            ckpt.load_checkpoint(path)


def test_dpdm_plan_beside_a_record_and_a_checkpoint_cut_to_4_bytes_is_one_line(tmp_path, capsys):
    from cli.main import main

    (tmp_path / "checkpoint.pt").write_bytes(b"junk")
    (tmp_path / ".steps_done").write_bytes(b"dpdm-steps-run v1 3 0123456789abcdef 0.0003 constant".ljust(127) + b"\n")
    rc = main(["plan", "--dataset-size", "40", "--batch-size", "8", "--steps", "5", "--multiplicity", "1",
               "--delta", "1e-5", "--noise-multiplier", "1", "--out", str(tmp_path / "plan.json")])
    _, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and not (tmp_path / "plan.json").exists(), err
    assert "would be the plan.json of a run whose plan.json is gone" in err, err
