"""argparse types for the benchmarks' numbers: a count, a duration, a rate or a fraction out of
range is a usage error (one line, exit 2) before any setup, never a silent substitute or a
failure after minutes of it. Scripts import it as a sibling (`python benchmarks/x.py` puts this
folder first on sys.path)."""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: not a finite number")
    return value


def positive_int(text: str) -> int:
    """A count of at least 1."""
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return value


def nonnegative_int(text: str) -> int:
    """A count of at least 0 (e.g. data-loader workers)."""
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 0")
    return value


def positive_float(text: str) -> float:
    """A duration, a rate or a factor: finite and above 0."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number above 0")
    return value


def nonnegative_float(text: str) -> float:
    """A wait that may be 0: finite and at least 0."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of at least 0")
    return value


def fraction(text: str) -> float:
    """A share strictly between 0 and 1 (a pruning ratio, host.resume_below)."""
    value = _number(text, float)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number between 0 and 1 (exclusive)")
    return value


def probability(text: str) -> float:
    """A share above 0 and at most 1 (a target accuracy)."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number above 0 and at most 1")
    return value
