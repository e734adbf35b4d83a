"""Kill test for a mutant of mut60 F1's fix (stop 56): `dpdm plan --curve` keeps a grid of samples in each
format `dpdm sample --grid` writes, not a PNG alone (the fix's test saves a PNG only; a check on PNGs alone passed
it, a PDF, SVG or JPEG grid of samples then replaced by the curve, exit 0)."""
from __future__ import annotations

import numpy as np
import pytest

from cli.main import main


@pytest.mark.parametrize("suffix", [".pdf", ".svg", ".jpg"])
def test_plan_curve_keeps_a_grid_of_samples_of_any_format(tmp_path, capsys, suffix):
    from dpdm.report_utils import grid_identity, save_grid

    identity = ("sha256:" + "c" * 64, False)
    grid = save_grid(np.zeros((3, 1, 8, 8), np.uint8), np.arange(3), tmp_path / f"grid{suffix}", identity=identity)
    before = grid.read_bytes()
    code = main(["plan", "--eps", "1", "--delta", "1e-5", "--dataset-size", "1000", "--batch-size", "10", "--steps",
                 "10", "--multiplicity", "1", "--curve", str(grid)])
    err = capsys.readouterr().err
    assert grid.read_bytes() == before and grid_identity(grid) == identity, "dpdm plan --curve replaced a grid"
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "is a grid of samples that dpdm sample wrote" in lines[0], err
