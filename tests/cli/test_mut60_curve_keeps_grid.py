"""mut60 F1 (stop 56): `dpdm plan --curve` replaces a grid of `dpdm sample`, whose mark (ca79ca8) names its model.

README: "`--curve` replaces only a curve it wrote before". A samples grid carries the same `dpdm.grid/1` mark a curve
carries, so `_curve_path`'s `is_dpdm_grid` check let --curve overwrite it, exit 0, no --force asked (dpdm plan has
none for --curve). Since ca79ca8 a grid of samples names its model's plan and kind (`grid_identity`), which a curve
never does: the two can be told apart. Fails on the snapshot (the grid is replaced)."""
from __future__ import annotations

import numpy as np

from cli.main import main


def test_plan_curve_keeps_a_grid_of_samples(tmp_path, capsys):
    from dpdm.report_utils import grid_identity, save_grid

    grid = save_grid(np.zeros((3, 1, 8, 8), np.uint8), np.arange(3), tmp_path / "grid.png",
                     identity=("sha256:" + "a" * 64, True))
    before = grid.read_bytes()
    code = main(["plan", "--eps", "1", "--delta", "1e-5", "--dataset-size", "1000", "--batch-size", "10", "--steps",
                 "10", "--multiplicity", "1", "--curve", str(grid)])
    err = capsys.readouterr().err
    assert grid.read_bytes() == before and grid_identity(grid) == ("sha256:" + "a" * 64, True), \
        "dpdm plan --curve replaced a dpdm sample grid"
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dpdm: error: --curve="), err
    # a curve it wrote before is still replaced
    assert main(["plan", "--eps", "1", "--delta", "1e-5", "--dataset-size", "1000", "--batch-size", "10", "--steps",
                 "10", "--multiplicity", "1", "--curve", str(tmp_path / "c.png")]) == 0
    assert main(["plan", "--eps", "2", "--delta", "1e-5", "--dataset-size", "1000", "--batch-size", "10", "--steps",
                 "10", "--multiplicity", "1", "--curve", str(tmp_path / "c.png")]) == 0
