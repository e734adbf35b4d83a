"""Kill tests of mut60 (stop 56) for ca79ca8's grid mark: a grid names its model's plan AND kind, read back as such."""
from __future__ import annotations

import numpy as np
import pytest

import accounting
from cli.main import main
from tests.cli.test_export import one_error_line, run_cli
from tests.cli.test_output_safety import train_tiny_runs


@pytest.fixture(scope="module")
def no_dp_run(tmp_path_factory):
    return train_tiny_runs(tmp_path_factory.mktemp("grid_kind"), (("np", ["--no-dp"]), ("p", [])))


def test_a_no_dp_models_grid_names_it_non_private_and_a_private_models_sample_keeps_it(no_dp_run, tmp_path,
                                                                                         capsys):
    """The mark of a --no-dp model's grid says private=no (mut60 g4: a mark of private=yes on every grid survived
    the suite, which tested only private models' grids): a private model of the same plan then keeps it without
    --force, as it keeps that model's samples file."""
    from dpdm.report_utils import grid_identity

    d = no_dp_run
    digest = accounting.load_plan(d / "plan.json").digest
    sample = ["sample", "--n", 2, "--sampler-steps", 2, "--device", "cpu"]
    code, _, err = run_cli([*sample, "--run", d / "np", "--out", tmp_path / "np.npz", "--grid", tmp_path / "g.png"],
                           capsys)
    assert code == 0, err
    assert grid_identity(tmp_path / "g.png") == (digest, False)
    before = (tmp_path / "g.png").read_bytes()
    line = one_error_line(*run_cli([*sample, "--run", d / "p", "--out", tmp_path / "p.npz", "--grid",
                                    tmp_path / "g.png"], capsys)[::2])
    assert "holds a grid of samples of the model of a NON-PRIVATE (--no-dp) run of this plan, and this model is " \
           "private" in line, line
    assert (tmp_path / "g.png").read_bytes() == before and not (tmp_path / "p.npz").exists()


def test_a_grid_whose_marks_name_two_models_names_none(tmp_path):
    """grid_identity: a file carrying the marks of two models (made by hand) names neither (its docstring; mut60
    g1: "the one of them" survived), so `dpdm sample --grid` replaces it only with --force."""
    from dpdm.report_utils import grid_identity, grid_mark
    from dpdm.sample import SampleError, check_outputs

    a, b = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    grid = tmp_path / "g.svg"
    grid.write_text(f"<svg><!-- {grid_mark(a, True)} --><!-- {grid_mark(b, False)} --></svg>")
    assert grid_identity(grid) is None
    grid.write_text(f"<svg><!-- {grid_mark(a, True)} --><!-- {grid_mark(a, True)} --></svg>")
    assert grid_identity(grid) == (a, True)
    grid.write_text(f"<svg><!-- {grid_mark(a, True)} --><!-- {grid_mark(a, False)} --></svg>")
    with pytest.raises(SampleError, match="names no plan or kind"):
        check_outputs(tmp_path / "s.npz", grid, plan_digest=a, private=True)
