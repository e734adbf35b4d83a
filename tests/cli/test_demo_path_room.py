"""`dpdm demo --out` near PATH_MAX (outwalk F2, stop 56): the longest --out the demo takes before any work is one
its audit takes too, and whose deepest file (audit/.report-XXXXXXXX/guesses_control_loss.png, staged by the audit's
`write_report`) fits within PATH_MAX: else the demo trained its model, then its audit was refused or failed on the
path, after minutes of work. Kill test of a surviving mutant (the demo's check with only a temporary file's room;
s56 r3)."""
from __future__ import annotations

import os

import pytest

from cli.errors import BadInput


def test_the_longest_demo_out_fits_its_audit_and_its_deepest_file(tmp_path):
    import audits.suite
    import cli.demo
    from dpdm.report_utils import path_length_problem

    longest = os.pathconf(str(tmp_path), "PC_PATH_MAX")
    parent = tmp_path
    while len(os.fsencode(str(parent))) < longest - 400:
        parent = parent / ("p" * 150)
        os.mkdir(parent)
    accepted = None
    for size in range(longest - 1, len(os.fsencode(str(parent))) + 2, -1):
        out = parent / ("o" * (size - len(os.fsencode(str(parent))) - 1))
        assert len(os.fsencode(str(out))) == size
        try:
            cli.demo._claim_demo_folder(out)
        except BadInput as e:
            assert "PATH_MAX" in str(e) or "bytes long" in str(e), e
            continue
        accepted = out
        break
    assert accepted is not None
    audit = accepted / "audit"
    assert path_length_problem(audit / "report.json", room=audits.suite._REPORT_DEPTH) is None
    deepest = audit / ".report-abcdefgh" / "guesses_control_loss.png"
    assert len(os.fsencode(str(deepest))) < longest, len(os.fsencode(str(deepest)))
