"""argparse types shared by the benchmark scripts: a bad value is argparse's one-line usage error, exit 2, naming
the option, before anything runs (a traceback, or a silently wrong run, before)."""
from __future__ import annotations

import argparse
import math


def number(kind, minimum, *, above: bool = False, below=None):
    """argparse type: a finite `kind` (int or float) >= minimum (> minimum when `above`; < `below` when given)."""
    def parse(text: str):
        value = kind(text)
        if not (math.isfinite(value) and (value > minimum if above else value >= minimum)
                and (below is None or value < below)):
            what = "an integer" if kind is int else "a finite number"
            bound = f"in [{minimum:g}, {below:g})" if below is not None else f"{'>' if above else '>='} {minimum:g}"
            raise argparse.ArgumentTypeError(f"{text!r} must be {what} {bound}")
        return value
    parse.__name__ = kind.__name__   # argparse's "invalid int value: 'x'"
    return parse


def int_at_least(minimum: int):
    """argparse type: an integer >= minimum."""
    return number(int, minimum)
