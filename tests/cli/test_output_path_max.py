"""An output path longer than the system takes in all (PATH_MAX, 4096 bytes on Linux), each name within NAME_MAX,
and for the demo and the audit a single name past NAME_MAX: refused in one line, exit 2, before any work, as a name
longer than NAME_MAX is (tests/cli/test_long_names_and_write_limits.py), not a runtime failure (exit 4) after `dpdm
sample` has drawn every image (s56 outwalk F2; the sample, export, demo and audit tests are its walker's). `dpdm
plan` says so before its calibration and leaves no empty folders behind (s56 outwalk N2)."""
from __future__ import annotations

import os

import pytest

from tests.cli.test_export import one_error_line, run_cli
from tests.cli.test_output_safety import no_drawing, run  # noqa: F401  (fixtures)


def _too_long(base) -> str:
    path = os.path.join(str(base), *["b" * 200] * 25)   # 25 names of 200 bytes: each legal, 5,000+ bytes in all
    assert len(os.fsencode(path)) > os.pathconf(str(base), "PC_PATH_MAX")
    return path


def test_sample_refuses_a_path_longer_than_path_max_before_drawing(run, tmp_path, capsys, no_drawing):  # noqa: F811
    out = os.path.join(_too_long(tmp_path), "s.npz")
    code, _, err = run_cli(["sample", "--run", run / "run", "--n", 4, "--sampler-steps", 2, "--device", "cpu",
                            "--out", out], capsys)
    assert "PATH_MAX" in one_error_line(code, err)
    assert not list(tmp_path.iterdir())


def test_a_path_just_within_path_max_is_written(run, tmp_path, capsys):  # noqa: F811
    """The limit is PATH_MAX less the temporary file's room, not less: a path 40 bytes short of it is written."""
    room = os.pathconf(str(tmp_path), "PC_PATH_MAX") - len(os.fsencode(str(tmp_path))) - 40
    names = [*["c" * 200] * (room // 201)]
    names.append("d" * (room - 201 * len(names) - 1 - len("/s.npz")))
    out = os.path.join(str(tmp_path), *names, "s.npz")
    assert os.pathconf(str(tmp_path), "PC_PATH_MAX") - 41 <= len(os.fsencode(out)) < os.pathconf(str(tmp_path),
                                                                                                   "PC_PATH_MAX") - 32
    code, _, err = run_cli(["sample", "--run", run / "run", "--n", 2, "--sampler-steps", 2, "--device", "cpu",
                            "--out", out], capsys)
    assert code == 0 and os.path.isfile(out), err


def test_export_refuses_a_path_longer_than_path_max_in_one_line(run, tmp_path, capsys):  # noqa: F811
    out = os.path.join(_too_long(tmp_path), "model.pt")
    code, _, err = run_cli(["export", "--run", run / "run", "--out", out], capsys)
    assert "PATH_MAX" in one_error_line(code, err)


def test_train_refuses_a_path_longer_than_path_max_in_one_line(run, tmp_path, capsys):  # noqa: F811
    code, _, err = run_cli(["train", "--plan", run / "plan.json", "--out", _too_long(tmp_path), "--device", "cpu",
                            "--quiet"], capsys)
    assert "PATH_MAX" in one_error_line(code, err)
    assert not list(tmp_path.iterdir())


def test_demo_refuses_a_name_longer_than_name_max_in_one_line(tmp_path, capsys):
    # `dpdm train/sample/export` say "the name ... is 300 bytes long, more than the 255 that ... takes"; the demo
    # ended in "runtime failure: [Errno 36] File name too long", exit 4 (its Path.exists() raised ENAMETOOLONG)
    code, _, err = run_cli(["demo", "--out", tmp_path / ("a" * 300)], capsys)
    assert "300 bytes" in one_error_line(code, err)
    code, _, err = run_cli(["demo", "--out", _too_long(tmp_path)], capsys)
    assert "PATH_MAX" in one_error_line(code, err)
    assert not list(tmp_path.iterdir())


def test_audit_refuses_a_name_longer_than_name_max_in_one_line(run, tmp_path, capsys):  # noqa: F811
    # audits/suite.py check_out_dir -> report_utils.run_folder_of: Path.is_file() raised ENAMETOOLONG, exit 4
    code, _, err = run_cli(["audit", "--run", run / "run", "--out", tmp_path / ("a" * 300)], capsys)
    assert "300 bytes" in one_error_line(code, err)
    code, _, err = run_cli(["audit", "--run", run / "run", "--out", _too_long(tmp_path)], capsys)
    assert "PATH_MAX" in one_error_line(code, err)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("option", ["--out", "--curve"])
def test_plan_refuses_a_path_longer_than_path_max_before_calibrating_and_makes_no_folder(tmp_path, capsys,
                                                                                          monkeypatch, option):
    import accounting

    def calibrate(*a, **k):
        raise AssertionError("calibrated before checking the outputs")
    monkeypatch.setattr(accounting.PrivacyPlan, "calibrate", calibrate)
    path = os.path.join(_too_long(tmp_path), "p.json" if option == "--out" else "c.png")
    code, _, err = run_cli(["plan", "--eps", 5, "--delta", 1e-5, "--dataset-size", 24, "--batch-size", 6,
                            "--steps", 2, "--multiplicity", 1, option, path], capsys)
    assert "PATH_MAX" in one_error_line(code, err)
    assert not list(tmp_path.iterdir()), "empty folders left behind"
