"""The format of a run's record of the steps it ran (`dpdm.train`'s `_StepsRecord`, which writes and checks it),
without torch: `cli.main`'s signal lines and `cli.train`'s "nothing to resume" read its step count for advice."""

from __future__ import annotations

import os

STEPS_RECORD = ".steps_done"   # in the run folder
# The line: RECORD_HEAD, steps, digest of their lr segments, lr, schedule, and 16 hex digits of the digests of the
# plan and of the data they ran under (a record of one plan's steps is not counted under another plan's price, h141
# F1, stop 54). RECORD_HEAD_V1's line (a dpdm before stop 54) ends at the schedule: bound to no plan or data.
RECORD_HEAD = "dpdm-steps-run v2"
RECORD_HEAD_V1 = "dpdm-steps-run v1"
RECORD_FIELDS = {RECORD_HEAD: 6, RECORD_HEAD_V1: 4}   # the fields after each head
RECORD_WIDTH = 128   # bytes: the line, padded, so that each write replaces the last one whole


def recorded_steps(out_dir: str) -> int:
    """The steps a private run in `out_dir` recorded in `STEPS_RECORD`, or 0 where there is none or it cannot be
    read: for advice lines only (`dpdm train` itself reads and checks the record, `dpdm.train._read_steps_record`)."""
    try:
        with open(os.path.join(os.path.expanduser(out_dir), STEPS_RECORD), "rb") as f:
            parts = f.read(2 * RECORD_WIDTH).split(b"\n", 1)[0].split()
        for head, fields in RECORD_FIELDS.items():
            head = head.encode().split()
            if parts[:len(head)] == head and len(parts) > len(head):
                # a v2 line cut short (a crash's partial write, an edit) says nothing; a v1 line is read as before
                return int(parts[len(head)]) if head[-1] == b"v1" or len(parts) == len(head) + fields else 0
        return 0
    except (OSError, ValueError):
        return 0
