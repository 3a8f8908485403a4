"""What `study --analyse-only` checks in a study.json before fitting anything.

A finished study wrote every run itself, so these fail only on a file edited by hand, cut, or merged
from two studies: a run lacking a field, a budget whose FLOPs are not the budget it is labelled (its
point would sit at the wrong place on the curve, and the multiplier read off it would be wrong with no
sign of it), or a main-axis point missing (the dense curve fitted over fewer budgets than the config
says, a forest budget then beyond it). Each is named before the fits start.
"""

from __future__ import annotations

import math
import statistics

from elmforest.study.config import StudyConfig
from elmforest.utils.errors import UserError

NEED = (
    "axis",
    "arm",
    "budget",
    "seed",
    "seed_share",
    "n_domains",
    "domains",
    "data_fraction",
    "flops",
    "bpb",
)
# a run's steps are its budget x steps_1x rounded (a forest's seed and experts each rounded), so a true
# label misses by a few steps; a wrong one by a whole budget step (0.5x, 2x)
SLACK_STEPS = 3
SLACK = 0.05


def _name(i: int, r: dict) -> str:
    return f"run {i} ({r['arm']}, {r['axis']} axis, budget {r['budget']:g}, seed {r['seed']})"


def check_runs(runs: list, cfg: StudyConfig, steps_1x: int, where: str) -> None:
    """Refuse, naming the run, what would make the fits wrong rather than fail."""
    for i, r in enumerate(runs):  # a hand-edited or cut file: named, not a KeyError in the fits
        if lack := [k for k in NEED if not isinstance(r, dict) or k not in r]:
            raise UserError(
                f"{where}: run {i} ({r.get('arm') if isinstance(r, dict) else r!r}) lacks {', '.join(lack)}"
            )
        for k in ("budget", "flops"):
            v = r[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise UserError(f"{where}: run {i} ({r['arm']}): its {k} {v!r} is not a positive number")
    per_1x = statistics.median(r["flops"] / r["budget"] for r in runs)  # most runs' FLOPs at 1x
    for i, r in enumerate(runs):
        want = r["budget"] * per_1x
        slack = SLACK + SLACK_STEPS / max(1.0, r["budget"] * steps_1x)
        if abs(r["flops"] / want - 1) > slack:
            raise UserError(
                f"{where}: {_name(i, r)} counts {r['flops']:.4g} FLOPs; its budget is {r['budget']:g} x "
                f"{per_1x:.4g} (the other runs' 1x) = {want:.4g}: its budget label or its FLOPs are wrong; "
                "rerun the study (without --analyse-only) to score it again"
            )
    main = {(r["arm"], r["budget"], r["seed"]) for r in runs if r["axis"] == "main" and r["bpb"]}
    missing = [
        f"{arm} {b:g}x seed {s}"
        for arm, budgets in (("dense", cfg.dense_budgets), ("btm", cfg.forest_budgets))
        for b in sorted(set(budgets))
        for s in cfg.seeds
        if (arm, float(b), s) not in main
    ]
    if missing:
        raise UserError(
            f"{where}: the config's main-axis points {', '.join(missing)} have no scored run: the curves would "
            "be fitted without them; rerun the study (without --analyse-only) to train and score them"
        )
