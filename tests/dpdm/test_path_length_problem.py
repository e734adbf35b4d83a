"""`report_utils.path_length_problem` (outwalk F2, stop 56): the longest path it accepts is the one its line
names, counted in bytes (not characters), against the limits of the file system the file lands on as
os.pathconf reports them (an eCryptfs home takes names of 143 bytes, not 255), and against the path as written
(absolute), not as spelled. Kill tests of surviving mutants (s56 r3)."""
from __future__ import annotations

import os
import re

from dpdm import report_utils
from dpdm.report_utils import path_length_problem


def _path_of(base, size: int) -> str:
    """A path below `base` (which exists) of exactly `size` bytes, each name within 200 bytes."""
    path, rest = str(base), size - len(os.fsencode(str(base)))
    while rest > 201:
        path, rest = os.path.join(path, "b" * 200), rest - 201
    return os.path.join(path, "c" * (rest - 1))


def test_the_longest_path_accepted_is_the_one_the_line_names(tmp_path):
    refused = path_length_problem(_path_of(tmp_path, 4090))
    stated = int(re.search(r"more than the ([\d,]+) a file", refused)[1].replace(",", ""))
    assert path_length_problem(_path_of(tmp_path, stated)) is None
    assert path_length_problem(_path_of(tmp_path, stated + 1)) is not None


def test_non_ascii_path_counted_in_bytes(tmp_path):
    # 2,100 characters, 4,200 bytes in UTF-8: past PATH_MAX in bytes though short of it in characters
    path = os.path.join(str(tmp_path), *["é" * 100] * 21, "s.npz")
    assert len(path) < 4000 < len(os.fsencode(path))
    assert "PATH_MAX" in (path_length_problem(path) or "")


def test_name_max_is_the_file_systems(tmp_path, monkeypatch):
    """A file system whose NAME_MAX is 143 (eCryptfs): a name of 150 bytes is refused there, by that limit."""
    real = os.pathconf

    def pathconf(p, name):
        return 143 if name == "PC_NAME_MAX" else real(p, name)
    monkeypatch.setattr(report_utils.os, "pathconf", pathconf)
    problem = path_length_problem(tmp_path / ("n" * 150 + ".npz"))
    assert problem and "154 bytes long, more than the 143" in problem, problem
    assert path_length_problem(tmp_path / ("n" * 139 + ".npz")) is None


def test_a_relative_path_is_counted_as_written(tmp_path, monkeypatch):
    """The write goes to the absolute path (`output_target`): a short relative name in a deep folder is measured
    there, as the OS will take it."""
    deep = tmp_path
    for _ in range((4000 - len(os.fsencode(str(tmp_path)))) // 201 + 1):
        deep = deep / ("d" * 200)
        os.mkdir(deep)   # each step within PATH_MAX
    monkeypatch.chdir(deep)
    assert len(os.fsencode(os.getcwd())) > 4000
    assert "PATH_MAX" in (path_length_problem("s" * 80 + ".npz") or "")


def test_a_non_ascii_name_is_counted_in_bytes(tmp_path):
    # 128 characters, 256 bytes: one past NAME_MAX
    problem = path_length_problem(tmp_path / ("é" * 128))
    assert problem and "256 bytes long, more than the 255" in problem, problem
    assert path_length_problem(tmp_path / ("é" * 127)) is None


def test_room_is_left_for_the_temporary_files_name(tmp_path):
    """A path 20 bytes short of PATH_MAX is legal, but its temporary file (".NAME.PID.TOKEN.tmp.npz", up to 28 bytes
    more) is not: refused before the work, as its write would fail after it."""
    longest = os.pathconf(str(tmp_path), "PC_PATH_MAX")
    assert "PATH_MAX" in (path_length_problem(_path_of(tmp_path, longest - 20)) or "")
