"""Argument types for the command line: a bad number is refused by argparse, naming the flag, before
any work starts (a batch size of 0 would otherwise fail deep inside a run)."""

from __future__ import annotations

import argparse
import math


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


def positive_int(s: str) -> int:
    v = _number(int, s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def nonneg_int(s: str) -> int:
    v = _number(int, s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {v}")
    return v


def positive_float(s: str) -> float:
    v = _number(float, s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {v}")
    return v


def nonneg_float(s: str) -> float:
    v = _number(float, s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {v}")
    return v


def finite_float(s: str) -> float:
    return _number(float, s)


def fraction(s: str) -> float:
    """In [0, 1)."""
    v = _number(float, s)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def open_fraction(s: str) -> float:
    """In (0, 1)."""
    v = _number(float, s)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {v}")
    return v


def unit_fraction(s: str) -> float:
    """In (0, 1]."""
    v = _number(float, s)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return v


def positive_floats(s: str) -> list[float]:
    """A comma-separated list of positive numbers (learning-rate grids)."""
    out = [positive_float(x.strip()) for x in s.split(",") if x.strip()]
    if not out:
        raise argparse.ArgumentTypeError("expected a comma-separated list of numbers")
    return out
