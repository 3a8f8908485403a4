"""The LR grids of a sweep: built around a centre, checked before any run trains.

Apart from launch/sweep.py because every arm of a sweep (and its continuation arm, sweep_continue.py)
names its points by these tags and refuses the same bad grids.
"""

from __future__ import annotations

import math

from elmforest.config import FLOAT32_MAX
from elmforest.utils.errors import UserError


def lr_grid(center: float, points: int = 5, factor: float = 2.0) -> list[float]:
    """`points` learning rates log-spaced by `factor`, centred on `center`."""
    if points < 1 or factor <= 1 or not center > 0:
        raise UserError("an LR grid needs points >= 1, factor > 1 and a positive centre")
    return [float(f"{center * factor ** (i - (points - 1) / 2):.3g}") for i in range(points)]


def point_tag(lr: float) -> str:
    return f"lr-{lr:.3g}"


def check_grid(lrs: list[float], what: str) -> list[float]:
    given = [float(x) for x in lrs]
    lrs = sorted(set(given))
    if len(lrs) < len(given):  # dropped without a word, a grid of 4 became 3 and was refused as such
        twice = sorted({x for x in given if given.count(x) > 1})
        raise UserError(f"the {what} grid repeats {', '.join(f'{x:g}' for x in twice)}: give each LR once")
    if len(lrs) < 4:
        raise UserError(f"the {what} grid has {len(lrs)} learning rate(s); a sweep needs at least 4")
    if not all(math.isfinite(x) and 0 < x <= FLOAT32_MAX for x in lrs):  # past it, its job fails last
        raise UserError(
            f"the {what} grid must hold positive learning rates of at most {FLOAT32_MAX:.3g}, got {lrs}"
        )
    tags = [point_tag(x) for x in lrs]
    if len(set(tags)) < len(tags):
        raise UserError(
            f"the {what} grid has LRs equal to 3 significant digits (they share a directory): {lrs}"
        )
    return lrs


def btm_grid_default(center: float) -> list[float]:
    return lr_grid(center, 5, 2.0)
