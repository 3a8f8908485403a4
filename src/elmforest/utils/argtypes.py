"""Argument types for the command line: a bad number is refused by argparse, naming the flag, before
any work starts (a batch size of 0 would otherwise fail deep inside a run)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(kind, s: str):
    try:
        v = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{s!r} is not {'an integer' if kind is int else 'a number'}"
        ) from None
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return v


def _typed(kind, ok: Callable, what: str, name: str):
    def parse(s: str):
        v = _number(kind, s)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
        return v

    parse.__name__ = name
    return parse


positive_int = _typed(int, lambda v: v >= 1, "a positive integer", "positive_int")
nonneg_int = _typed(int, lambda v: v >= 0, "0 or more", "nonneg_int")
positive_float = _typed(float, lambda v: v > 0, "a positive number", "positive_float")
nonneg_float = _typed(float, lambda v: v >= 0, "0 or more", "nonneg_float")
finite_float = _typed(float, lambda v: True, "a number", "finite_float")
fraction = _typed(float, lambda v: 0 <= v < 1, "in [0, 1)", "fraction")
open_fraction = _typed(float, lambda v: 0 < v < 1, "strictly between 0 and 1", "open_fraction")
unit_fraction = _typed(float, lambda v: 0 < v <= 1, "in (0, 1]", "unit_fraction")


def positive_floats(s: str) -> list[float]:
    """A comma-separated list of positive numbers (learning-rate grids)."""
    out = [positive_float(x.strip()) for x in s.split(",") if x.strip()]
    if not out:
        raise argparse.ArgumentTypeError("expected a comma-separated list of numbers")
    return out
