"""argparse types for numeric flags: an out-of-range value is refused while parsing, as one
line naming the flag and the allowed range (argparse exits with code 2)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer flag in [low, high] (no upper bound when high is None)."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: expected {allowed}")
        return value

    parse.__name__ = allowed  # what argparse names in its own messages
    return parse


positive = int_range(1)
non_negative = int_range(0)
port = int_range(1, 65535)


def fraction(text: str) -> float:
    """A float flag strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in (0, 1)") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range: expected a number in (0, 1)")
    return value
