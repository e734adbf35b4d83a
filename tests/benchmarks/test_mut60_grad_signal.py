"""Kill test of mut60 (stop 56) for 7a0500e: grad_signal.py's main says a missing or corrupt checkpoint in one line."""
import sys

import pytest


@pytest.mark.parametrize("content", [None, b"not a checkpoint"])
def test_a_missing_or_corrupt_checkpoint_is_one_line(tmp_path, load_benchmark, monkeypatch, capsys, content):
    """main() catches dpdm's CheckpointError as it catches RunRefused (mut60 k3: dropping it survived the suite,
    whose refusals all came through RunRefused): one `grad_signal.py: error:` line, exit 2, no traceback."""
    gs = load_benchmark("grad_signal")
    path = tmp_path / "checkpoint.pt"
    if content is not None:
        path.write_bytes(content)
    monkeypatch.setattr(sys, "argv", ["grad_signal.py", "--checkpoint", str(path)])
    with pytest.raises(SystemExit) as e:
        gs.main()
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and str(path) in lines[0], lines
