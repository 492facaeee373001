"""argparse types the benchmark scripts share: counts and durations that must make sense."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """An argparse type: a whole number above 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number of seconds above 0."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be above 0, got 0")
    return value
