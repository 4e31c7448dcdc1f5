"""argparse types for numbers with bounds: a wrong value is a one-line error, exit 2.

Shared by the command line (``ccied.peer.cli``) and the benchmarks' options.
"""

from __future__ import annotations

import argparse


def _number(text: str, kind: type[int] | type[float]) -> float:
    try:
        return kind(text)
    except ValueError:
        name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"not {name}: {text!r}") from None


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An integer of at least 0."""
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """A number above 0."""
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def unit_interval(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    value = _number(text, float)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def slowdown(text: str) -> float:
    """A device slowdown: at least 1 (this machine's speed)."""
    value = _number(text, float)
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"a slowdown is at least 1 (this machine), got {text}")
    return value
