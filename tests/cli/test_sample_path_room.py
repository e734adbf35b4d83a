"""`dpdm sample --out` a path of PATH_MAX less 20 bytes: legal itself, but the temporary file written beside it first
is not; refused in one line, exit 2, before any image is drawn (outwalk F2, stop 56), not "File name too long",
exit 4, after drawing every image. Kill test of a surviving mutant (no room for the temporary file; s56 r3)."""
from __future__ import annotations

import os

from tests.cli.test_export import one_error_line, run_cli
from tests.cli.test_output_safety import no_drawing, run  # noqa: F401  (fixtures)


def test_sample_leaves_room_for_its_temporary_file(run, tmp_path, capsys, no_drawing):  # noqa: F811
    size = os.pathconf(str(tmp_path), "PC_PATH_MAX") - 20
    path, rest = str(tmp_path), size - len(os.fsencode(str(tmp_path)))
    while rest > 201:
        path, rest = os.path.join(path, "b" * 200), rest - 201
    out = os.path.join(path, "c" * (rest - 1 - len(".npz")) + ".npz")
    assert len(os.fsencode(out)) == size
    code, _, err = run_cli(["sample", "--run", run / "run", "--n", 2, "--sampler-steps", 2, "--device", "cpu",
                            "--out", out], capsys)
    assert "PATH_MAX" in one_error_line(code, err)
    assert not list(tmp_path.iterdir())
