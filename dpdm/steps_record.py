"""The format of a run's record of the steps it ran (`dpdm.train`'s `_StepsRecord`, which writes and checks it),
without torch: `cli.main`'s signal lines and `cli.train`'s "nothing to resume" read its step count for advice. Also
`read_regular`, the bounded read of a run folder's small files that such advice lines read."""

from __future__ import annotations

import os
import stat

STEPS_RECORD = ".steps_done"   # in the run folder
# The line: RECORD_HEAD, steps, digest of their lr segments, lr, schedule, and 16 hex digits of the digests of the
# plan and of the data they ran under (a record of one plan's steps is not counted under another plan's price, h141
# F1, stop 54). RECORD_HEAD_V1's line (a dpdm before stop 54) ends at the schedule: bound to no plan or data.
RECORD_HEAD = "dpdm-steps-run v2"
RECORD_HEAD_V1 = "dpdm-steps-run v1"
RECORD_FIELDS = {RECORD_HEAD: 6, RECORD_HEAD_V1: 4}   # the fields after each head
RECORD_WIDTH = 128   # bytes: the line, padded, so that each write replaces the last one whole


def read_regular(path: str, limit: int, *, whole: bool = True) -> bytes | None:
    """The bytes of `path`, at most `limit` of them, or None where it is not a regular file (or a link to one),
    cannot be read, or (`whole`) holds more than `limit` bytes. For the readers of a run folder's files whose
    lines are advice only: a FIFO there blocked a plain open() for good (`dpdm export` after writing its file, the
    hint of Ctrl-C itself), and a link to /dev/zero read until memory ran out (h145 F1, stop 54); `dpdm train`'s
    own reader refuses both (`dpdm.train._read_steps_record`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(limit + 1 - size, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    return None if whole and len(data) > limit else data[:limit]


def record_binding(digest: str) -> str:
    """The 16 hex digits of a plan's or data's sha256 digest (`sha256:HEX`) that a v2 line names it by."""
    return digest.rsplit(":", 1)[-1][:16]


def recorded_run(out_dir: str) -> tuple[int, str | None]:
    """The steps a private run in `out_dir` recorded in `STEPS_RECORD` (0 where there is none or it cannot be read)
    and the 16 hex digits of the plan its v2 line names them by (None: a v1 line, which names none, or a line cut
    short): for advice lines and `dpdm plan`'s check only (`dpdm train` itself reads and checks the record,
    `dpdm.train._read_steps_record`)."""
    raw = read_regular(os.path.join(os.path.expanduser(out_dir), STEPS_RECORD), 2 * RECORD_WIDTH, whole=False)
    try:
        parts = (raw or b"").split(b"\n", 1)[0].split()
        for head, fields in RECORD_FIELDS.items():
            head = head.encode().split()
            if parts[:len(head)] == head and len(parts) > len(head):
                # a v2 line cut short (a crash's partial write, an edit) says nothing; a v1 line is read as before
                whole = len(parts) == len(head) + fields
                steps = int(parts[len(head)]) if head[-1] == b"v1" or whole else 0
                plan = parts[len(head) + 4].decode("ascii", "replace") if whole and fields >= 5 and steps else None
                return steps, plan if plan and len(plan) == 16 and all(ch in "0123456789abcdef" for ch in plan) \
                    else None
        return 0, None
    except ValueError:
        return 0, None


def recorded_steps(out_dir: str) -> int:
    """The steps a private run in `out_dir` recorded in `STEPS_RECORD`, or 0 (`recorded_run`)."""
    return recorded_run(out_dir)[0]
