"""The format of a run's record of the steps it ran (`dpdm.train`'s `_StepsRecord`, which writes and checks it),
without torch: `cli.main`'s signal lines and `cli.train`'s "nothing to resume" read its step count for advice."""

from __future__ import annotations

import os

STEPS_RECORD = ".steps_done"   # in the run folder
RECORD_HEAD = "dpdm-steps-run v1"   # the line: RECORD_HEAD, steps, digest of their lr segments, lr, schedule
RECORD_WIDTH = 128   # bytes: the line, padded, so that each write replaces the last one whole


def recorded_steps(out_dir: str) -> int:
    """The steps a private run in `out_dir` recorded in `STEPS_RECORD`, or 0 where there is none or it cannot be
    read: for advice lines only (`dpdm train` itself reads and checks the record, `dpdm.train._read_steps_record`)."""
    try:
        with open(os.path.join(os.path.expanduser(out_dir), STEPS_RECORD), "rb") as f:
            parts = f.read(2 * RECORD_WIDTH).split(b"\n", 1)[0].split()
        head = RECORD_HEAD.encode().split()
        return int(parts[len(head)]) if parts[:len(head)] == head and len(parts) > len(head) else 0
    except (OSError, ValueError):
        return 0
