"""mut59 (stop 55): `steps_record.read_record_line`, the one parser of a run's .steps_done (`dpdm train --resume`'s
and the advice lines of export and sample), judges each field. The existing test compares train's reader with the
advice's, which since d0fbe8f are one function, so it pins no verdict of its own."""
from __future__ import annotations

import os

import pytest

from dpdm.steps_record import RECORD_WIDTH, STEPS_RECORD, read_record, read_record_line

GOOD = "dpdm-steps-run v2 7 cd102fa0e195d116 0.0003 constant 326b63baa22a5ca9 9cb9e6d250c249f3"
DAMAGED = "not the line dpdm writes there: damaged or edited"


def _write(folder, text: str) -> None:
    (folder / STEPS_RECORD).write_text(text.ljust(RECORD_WIDTH - 1) + "\n")


@pytest.mark.parametrize("line", [
    GOOD.replace("constant", "warmup"),                    # a schedule train has none of
    GOOD.replace("constant", "Constant"),
    GOOD.replace("9cb9e6d250c249f3", "9cb9e6d250c249fg"),    # the data's binding no hex
    GOOD.replace("326b63baa22a5ca9", "326B63BAA22A5CA9"),    # the plan's in upper case
    GOOD.replace("326b63baa22a5ca9", "326b63baa22a5ca"),     # 15 digits
    GOOD.replace("0.0003", "-0.0003"), GOOD.replace("0.0003", "0"), GOOD.replace("0.0003", "inf"),
    GOOD.replace(" 7 ", " -1 "), GOOD.replace("cd102fa0e195d116", "cd102fa0e195d11"),
    GOOD + " 0123456789abcdef",                            # a field too many
    " " * 20,                                              # blanks are no crash's lost write (NULs are)
])
def test_a_line_of_any_field_dpdm_never_writes_is_damaged(tmp_path, line):
    _write(tmp_path, line)
    raw, record, problem = read_record_line(tmp_path)
    assert record is None and problem == DAMAGED, (record, problem)
    assert read_record(str(tmp_path)) == (None, DAMAGED)


def test_the_good_line_and_a_crashs_nuls(tmp_path):
    _write(tmp_path, GOOD)
    assert read_record_line(tmp_path)[1:] == ((7, "cd102fa0e195d116", 0.0003, "constant", "326b63baa22a5ca9",
                                               "9cb9e6d250c249f3"), None)
    assert read_record(str(tmp_path)) == ((7, "326b63baa22a5ca9", "9cb9e6d250c249f3"), None)
    (tmp_path / STEPS_RECORD).write_bytes(b"\0" * RECORD_WIDTH)
    assert read_record_line(tmp_path)[1:] == (None, None) and read_record(str(tmp_path)) == (None, None)


def test_a_link_to_a_good_record_is_not_followed(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    _write(other, GOOD)
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(other / STEPS_RECORD, run / STEPS_RECORD)
    assert read_record_line(run) == (b"a link", None, "a link")
    assert read_record(str(run)) == (None, "a link")
