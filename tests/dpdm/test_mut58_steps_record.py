"""mut58 (stop 55): `dpdm.steps_record.read_regular` and `recorded_run`, the torch-free readers of a run folder's
files for advice lines and for `dpdm plan`'s check beside a run's record, pinned at their edges."""

import os
import threading

from dpdm.steps_record import RECORD_WIDTH, read_regular, recorded_run, recorded_steps


def test_read_regular_reads_a_file_of_its_limit_and_refuses_one_byte_more(tmp_path):
    """The size cap is "more than `limit` bytes": a file of exactly `limit` bytes is read whole; one of limit + 1
    is None where `whole`, and its first `limit` bytes where not (a record's first line)."""
    path = tmp_path / "f"
    for limit in (1, 64, 3 << 20):   # below, at and above the 1 MiB chunk
        path.write_bytes(b"a" * limit)
        assert read_regular(str(path), limit) == b"a" * limit, limit
        assert read_regular(str(path), limit, whole=False) == b"a" * limit, limit
        path.write_bytes(b"a" * limit + b"b")
        assert read_regular(str(path), limit) is None, limit
        assert read_regular(str(path), limit, whole=False) == b"a" * limit, limit
    path.write_bytes(b"")
    assert read_regular(str(path), 8) == b""


def test_read_regular_reads_no_device_or_fifo_even_in_part(tmp_path):
    """None for what is not a regular file, `whole` or not: a link to /dev/zero is not read as 256 zero bytes, and a
    FIFO whose writer wrote a line is not read as that line (the record of no run)."""
    link = tmp_path / "zero"
    link.symlink_to("/dev/zero")
    assert read_regular(str(link), 2 * RECORD_WIDTH, whole=False) is None
    assert read_regular(str(link), 2 * RECORD_WIDTH) is None
    fifo = tmp_path / ".steps_done"
    os.mkfifo(fifo)
    line = b"dpdm-steps-run v1 3 0123456789abcdef 0.001 constant".ljust(127) + b"\n"
    opened = threading.Event()

    def write():
        fd = os.open(fifo, os.O_RDWR)   # does not block: the FIFO holds the line for a reader
        os.write(fd, line)
        opened.set()
        done.wait(5)
        os.close(fd)

    done = threading.Event()
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        assert opened.wait(5)
        assert read_regular(str(fifo), 2 * RECORD_WIDTH, whole=False) is None
        assert recorded_run(str(tmp_path)) == (0, None)
    finally:
        done.set()
        writer.join(5)


def test_recorded_run_names_a_plan_only_by_a_whole_v2_lines_16_lower_case_hex_digits(tmp_path):
    """`dpdm plan`'s check beside a run's record (`cli.plan._lost_plan_problem`) reads the plan a v2 line names,
    as `dpdm.train._read_steps_record` does (`hex16`): 16 lower-case hex digits, or none (a plan field of another
    form is the record of no plan it can name, as a v1 line's, which `dpdm plan` refuses to write beside unless
    the run's checkpoint names the plan)."""
    record = tmp_path / ".steps_done"
    head = "dpdm-steps-run v2 3 0123456789abcdef 0.0003 constant"
    for plan, named in (("fedcba9876543210", "fedcba9876543210"), ("FEDCBA9876543210", None),
                        ("fedcba987654321", None), ("fedcba98765432100", None), ("fedcba987654321g", None)):
        record.write_bytes(f"{head} {plan} 0123456789abcdef".encode().ljust(127) + b"\n")
        assert recorded_run(str(tmp_path)) == (3, named), plan
        assert recorded_steps(str(tmp_path)) == 3, plan
    for line, want in ((f"{head} fedcba9876543210", (0, None)),                      # cut short
                       (f"{head} fedcba9876543210 0123456789abcdef 0", (0, None)),   # a field too many
                       ("dpdm-steps-run v1 1 0123456789abcdef 0.0003 constant", (1, None))):
        record.write_bytes(line.encode().ljust(127) + b"\n")
        assert recorded_run(str(tmp_path)) == want, line
