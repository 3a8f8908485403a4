"""Each arm of a study at its own best learning rate at every budget ("Don't sweep your LR under the rug").

The optimal LR moves with the training length, so an LR swept at 1x and reused at 0.5x and 4x favours
whichever arm sits nearer its optimum there, and a multiplier read off such a curve measures the tuning,
not the method. With `lr_grid` / `expert_lr_grid` the study runs `elmforest sweep` (launch/sweep.py) at
every main-axis budget before it trains anything: the dense arm over `lr_grid` (whole dense runs at that
budget), and at forest budgets the experts over `expert_lr_grid`, branched from the best dense run's seed,
both chosen on the valid split with training seed `seeds[0]`. A best LR at either end of its grid is
reported as such (the optimum may lie outside it). Sweeps are ordinary sweep directories under
`sweeps/`, resumable like every run.
"""

from __future__ import annotations

import copy
from pathlib import Path

from elmforest.launch.sweep import sweep


def budget_lrs(
    cfg, base, names: list[str], shards_root: str, out: Path, steps_1x: int, executor, threads, log
):
    """{budget: {"dense_lr", "expert_lr" (forest budgets), "dense_edge", "expert_edge", "sweep"}}; {} when
    the study sweeps nothing."""
    if not cfg.lr_grid:
        return {}
    forest = set(cfg.forest_budgets)
    result = {}
    for b in sorted(set(cfg.dense_budgets) | forest):
        c = copy.deepcopy(base)
        c.train.steps = max(4, round(b * steps_1x))
        c.train.seed = cfg.seeds[0]
        c.data.domains = list(names)
        where = out / "sweeps" / f"b{b:g}"
        s = _finished(where, b in forest, cfg)
        if s is None:
            log(f"      LR sweep at {b:g}x ({c.train.steps} steps): {where}")
        s = s or sweep(
            shards_root,
            where,
            c,
            "both" if b in forest else "dense",
            list(cfg.lr_grid),
            list(cfg.expert_lr_grid),
            seed_share=cfg.seed_share,
            executor=executor,
            threads=threads,
            log=log,
        )
        r = {"dense_lr": s["dense"]["best_lr"], "dense_edge": s["dense"]["at_edge"], "sweep": str(where)}
        if b in forest:
            r |= {"expert_lr": s["experts"]["best_lr"], "expert_edge": s["experts"]["at_edge"]}
        result[b] = r
    return result


def _finished(where: Path, experts: bool, cfg) -> dict | None:
    """A sweep.json that already holds this budget's answer over these grids (a rerun dispatches none
    of its jobs again)."""
    from elmforest.utils.io import read_json

    if not (where / "sweep.json").is_file():
        return None
    s = read_json(where / "sweep.json")
    arms = [("dense", cfg.lr_grid)] + ([("experts", cfg.expert_lr_grid)] if experts else [])
    ok = all((s.get(a) or {}).get("grid") == sorted(set(map(float, g))) for a, g in arms)
    return s if ok else None


def lrs_table(lrs: dict) -> list[str]:
    """Markdown rows of the report: each budget's chosen LRs, the grid's edge flagged."""
    if not lrs:
        return []
    rows = ["| budget | dense LR | expert LR |", "| --- | --- | --- |"]
    for b, r in sorted(lrs.items(), key=lambda kv: float(kv[0])):
        d = f"{r['dense_lr']:g}" + (f" ({r['dense_edge']} of the grid)" if r.get("dense_edge") else "")
        e = "-"
        if "expert_lr" in r:
            e = f"{r['expert_lr']:g}" + (f" ({r['expert_edge']} of the grid)" if r.get("expert_edge") else "")
        rows.append(f"| {float(b):g}x | {d} | {e} |")
    return rows
