"""Errors the CLI turns into one line on stderr and an exit code."""
from __future__ import annotations

EXIT_OK = 0
EXIT_AUDIT_FAIL = 1
EXIT_BAD_INPUT = 2
EXIT_AUDIT_INCONCLUSIVE = 3
EXIT_RUNTIME = 4  # any failure that is nobody's input mistake (cli.main turns uncaught exceptions into it)


class BadInput(Exception):
    """A user mistake: bad option value, impossible plan, tampered plan, corrupt checkpoint,
    data of the wrong size or shape. The CLI prints `dpdm: error: <message>` and exits 2.

    Library code raises ValueError (or a subclass); commands convert it with `bad_input(...)`.
    """


def bad_input(message: str) -> BadInput:
    return BadInput(message)


def runtime_failure(message: str):
    """A failure that is nobody's input mistake (accountants disagree, ...): exit 4."""
    import click

    e = click.ClickException(message)
    e.exit_code = EXIT_RUNTIME
    return e
