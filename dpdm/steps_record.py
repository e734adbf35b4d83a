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


# The schedules a record's line may name: `dpdm.train.LR_SCHEDULES` (not imported: torch), which a test keeps equal.
RECORD_SCHEDULES = ("constant", "cosine")


def read_record_line(out_dir, schedules: tuple[str, ...] = RECORD_SCHEDULES
                     ) -> tuple[bytes | None, tuple | None, str | None]:
    """The run's `STEPS_RECORD` in `out_dir` (a str or Path), read and judged as `dpdm train` reads and judges it
    (`dpdm.train._read_steps_record` is this, with its `LR_SCHEDULES`), without torch: its bytes (None: there is
    none), what it records (steps, the digest of their lr segments, the last lr and schedule, and the 16 hex digits
    of the plan's and of the data's digests they ran under, None and None in a v1 line; None: none, or an empty one
    whose writes a crash lost), and what is wrong with it (None: nothing): "a link", "not a regular file",
    "unreadable: ...", or "not the line dpdm writes there: damaged or edited" (a line cut short too). Not through a
    link, never blocking on a FIFO."""
    import math

    path = os.path.join(out_dir, STEPS_RECORD)   # as given: `dpdm.train.train` writes it in a literal "~" (r2 F1)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, None, None
    except OSError as e:
        what = "a link" if os.path.islink(path) else f"unreadable: {e.strerror or e}"
        return what.encode(), None, what
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b"", None, "not a regular file"
        raw = os.read(fd, 4 * RECORD_WIDTH)
    except OSError as e:
        return b"", None, f"unreadable: {e.strerror or e}"
    finally:
        os.close(fd)
    if not raw.strip(b"\0"):
        return raw, None, None
    parts = raw.split(b"\n", 1)[0].decode("ascii", "replace").split()

    def hex16(text: str) -> bool:
        return len(text) == 16 and all(ch in "0123456789abcdef" for ch in text)

    try:
        head = next((h.split() for h in RECORD_FIELDS if parts[:len(h.split())] == h.split()), None)
        if head is None or len(parts) != len(head) + RECORD_FIELDS[" ".join(head)]:
            raise ValueError
        steps, digest, lr, schedule = int(parts[len(head)]), parts[len(head) + 1], float(parts[len(head) + 2]), \
            parts[len(head) + 3]
        bound = tuple(parts[len(head) + 4:]) or (None, None)   # a v1 line: bound to no plan or data
        if not (steps >= 0 and hex16(digest) and math.isfinite(lr) and lr > 0 and schedule in schedules
                and all(b is None or hex16(b) for b in bound)):
            raise ValueError
    except ValueError:
        return raw, None, "not the line dpdm writes there: damaged or edited"
    return raw, (steps, digest, lr, schedule, *bound), None


def read_record(out_dir: str) -> tuple[tuple[int, str | None, str | None] | None, str | None]:
    """What the run in `out_dir` recorded in `STEPS_RECORD`, as `dpdm train --resume` judges it (`read_record_line`):
    (steps, and the 16 hex digits of the plan and of the data its v2 line names them by, None and None in a v1
    line), or None where there is none or it is empty (a crash lost its writes); and what is wrong with it, or None.
    For the advice lines of `dpdm export` and `dpdm sample` (`cli._common.warn_steps_past_checkpoint`)."""
    _, record, problem = read_record_line(os.path.expanduser(out_dir))
    return (None if record is None else (record[0], *record[4:6])), problem
