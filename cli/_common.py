"""Small helpers shared by the CLI commands (no torch at import)."""
from __future__ import annotations

import json
import sys
from typing import Any

import click


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from cli.errors import BadInput

        raise BadInput(f"--device={device!r}: CUDA is not available on this machine")
    return device


def emit_json(doc: dict[str, Any]) -> None:
    """The one JSON document that `--json` prints on stdout."""
    click.echo(json.dumps(doc, indent=2, default=_jsonable))


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, float):
        return v
    return str(v)


def info(message: str) -> None:
    """Human output that must not pollute `--json` stdout."""
    click.echo(message, err=True)


def warn(message: str) -> None:
    click.echo(f"dpdm: warning: {message}", err=True)


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()
