"""`dpdm sample --out/--grid`: a file that appears at an output path while the images are drawn (minutes to hours
at a real --n: another `dpdm sample` writing the same name, a --no-dp baseline's samples, the user's own file) is
kept, as one that was there at the start is (`check_outputs`), not replaced (--out) or deleted (--grid) when the
drawing ends: one line, exit 2, nothing written (s56 outwalk F1; the first two tests are its walker's)."""
from __future__ import annotations

import numpy as np
import pytest

from cli.main import main
from tests.cli.test_export import one_error_line, run_cli
from tests.cli.test_output_safety import train_tiny_runs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_runs(tmp_path_factory.mktemp("outputs_made_while_drawing"))


def _sample(run, out, *extra):
    return ["sample", "--run", run / "run", "--n", 4, "--sampler-steps", 2, "--device", "cpu", "--out", out, *extra]


def _appears_while_drawing(monkeypatch, path, data: bytes):
    """Makes `path` appear, holding `data`, while `dpdm sample` draws (as another process would write it)."""
    import dpdm.sampling

    real = dpdm.sampling.generate

    def generate(*a, **k):
        out = real(*a, **k)
        path.write_bytes(data)
        return out
    monkeypatch.setattr(dpdm.sampling, "generate", generate)


def test_a_file_written_at_out_while_drawing_is_kept(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "samples.npz"
    mine = tmp_path / "mine.npz"
    np.savez(mine, x=np.zeros((3, 1, 8, 8), np.uint8))   # the user's own array file, not samples of dpdm
    _appears_while_drawing(monkeypatch, out, mine.read_bytes())
    code, _, err = run_cli(_sample(run, out), capsys)
    assert out.read_bytes() == mine.read_bytes(), f"exit {code}: {err.strip()}: the user's file was replaced"
    line = one_error_line(code, err)
    assert "already exists" in line and "while the images were drawn" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.npz", "samples.npz"]   # no temporary file left


def test_a_file_written_at_grid_while_drawing_is_kept(run, tmp_path, monkeypatch, capsys):
    grid = tmp_path / "grid.png"
    photo = b"\x89PNG\r\n\x1a\n" + b"the user's own picture" * 10
    _appears_while_drawing(monkeypatch, grid, photo)
    code, _, err = run_cli(_sample(run, tmp_path / "s.npz", "--grid", grid), capsys)
    assert grid.exists() and grid.read_bytes() == photo, f"exit {code}: {err.strip()}: the user's picture is gone"
    assert "already exists" in one_error_line(code, err), err
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]   # nothing written: no samples without their grid


def test_samples_of_the_other_kind_written_while_drawing_are_kept_without_force(run, tmp_path, monkeypatch, capsys):
    """Two `dpdm sample` runs started together into one file (the private model's and, here, a file of samples of
    another plan's model): the one that ends last replaced the other's, which it refuses to at its start."""
    out = tmp_path / "samples.npz"
    theirs = tmp_path / "theirs.npz"
    np.savez(theirs, x=np.zeros((2, 1, 8, 8), np.uint8), meta_plan_digest=np.asarray("sha256:" + "b" * 64),
             meta_private=np.asarray(True))
    _appears_while_drawing(monkeypatch, out, theirs.read_bytes())
    code, _, err = run_cli(_sample(run, out), capsys)
    assert out.read_bytes() == theirs.read_bytes(), f"exit {code}: {err.strip()}"
    assert "another plan" in one_error_line(code, err), err
    # --force replaces it, as it does one there at the start
    code, _, err = run_cli(_sample(run, out, "--force"), capsys)
    assert code == 0 and out.read_bytes() != theirs.read_bytes(), err


def test_own_samples_and_grid_are_still_replaced(run, tmp_path, capsys):
    out, grid = tmp_path / "s.npz", tmp_path / "g.png"
    for seed in (0, 4):
        code, _, err = run_cli(_sample(run, out, "--grid", grid, "--seed", seed), capsys)
        assert code == 0, err
        assert int(np.load(out)["meta_seed"]) == seed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "s.npz"]
