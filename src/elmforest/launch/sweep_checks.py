"""What a sweep checks before it reuses the runs already in its folder: the same plan, domains and
training settings, and no arm left pairing the dense arm's new best LR with one tuned from another run.
Apart from launch/sweep.py so the sweep reads as its arms."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from elmforest.config import RunConfig
from elmforest.data.shards import Shards
from elmforest.forest import btm
from elmforest.forest.manifest import Forest
from elmforest.launch.sweep_grid import point_tag
from elmforest.utils.errors import UserError


def check_settings(out: Path, points: list[tuple[float, RunConfig]], plan: btm.Plan, shards: Shards) -> None:
    """Refused once, up front: a rerun of this sweep with other training settings (each dense run would
    refuse them apart, one message per LR, each advising to delete that point)."""
    from elmforest.train.runcheck import config_change

    for lr, cfg in points:
        if diff := config_change(
            out / "dense" / point_tag(lr) / "runs" / "dense", btm.dense_config(cfg, plan, shards)
        ):
            raise UserError(
                f"{out}: this sweep's runs were trained with other settings ({diff}); "
                "a sweep with other training settings needs another --out"
            )


def drop_stale_arms(result: dict, log) -> None:
    """The arms branched from another dense run than the dense arm's best (a dense arm rerun on a wider
    grid moved it) are dropped, said: kept, sweep.json would pair the new dense LR with expert and
    continuation LRs tuned on another run, and a study taking its LRs from it would train that mix."""
    best = result["dense"].get("best_lr")
    for name in ("experts", "grouped", "dense_continue"):
        r = result.get(name)
        if r and best is not None and f"{r.get('seed_lr', best):.6g}" != f"{best:.6g}":
            del result[name]
            log(
                f"sweep: the {name} arm branched from the dense run at LR {r['seed_lr']:g}, no longer the "
                f"best ({best:g}): dropped from sweep.json; run that arm again (its points branched from the "
                "old seed are named then, to delete)"
            )


def swept_points(out: Path, base: RunConfig) -> list[tuple[float, RunConfig]]:
    """The dense points trained here, each as `base` at its own LR: an arm run alone (`--arm experts`)
    with other settings branched from runs trained with the old ones and reported their cached scores
    as if trained with the new."""
    from elmforest.train.runcheck import saved_config

    points = []
    for point in sorted((out / "dense").glob("lr-*")):
        saved = point / "runs" / "dense" / "run_config.json"
        if saved.is_file():
            cfg = RunConfig.from_dict(base.to_dict())
            cfg.optim.lr = saved_config(saved).optim.lr
            points.append((cfg.optim.lr, cfg))
    return points


def check_dense_point(point: Path, plan: btm.Plan, domains: list[str]) -> None:
    """A dense point (and its seed) is reused only if planned as this sweep plans it: a sweep with
    --groups rounds the batch to another multiple and names no expert domains, so it must not branch
    from (or report) dense runs planned for one expert per domain, nor the reverse."""
    if not (point / "forest.json").is_file() or "plan" not in (data := Forest.load(point).data):
        return
    have, want = asdict(btm.Plan(**data["plan"])), asdict(plan)
    diff = [f"{k}: {have[k]!r} -> {want[k]!r}" for k in want if have.get(k) != want[k]]
    mixed = ((data.get("seed") or {}).get("config") or {}).get("data", {}).get("domains")
    if mixed is not None and sorted(mixed) != sorted(domains):
        diff.append(f"mixed domains: {sorted(mixed)} -> {sorted(domains)}")
    if diff:
        raise UserError(
            f"{point}: this dense run was planned by another sweep ({'; '.join(diff)}); a sweep with other "
            "--groups, domains or training settings needs another --out"
        )


def check_expert_points(points: list[Path], seed: Forest) -> None:
    """Expert points of this sweep that grew from another seed (the best dense LR moved since) are
    refused all at once, each named: `share_seed` refused them one per rerun, the user deleting them
    one by one, and advised "another directory", which a sweep cannot choose but by --out."""
    from elmforest.forest.seeding import other_seed

    stale = [str(p) for p in points if (p / "forest.json").is_file() and other_seed(Forest.load(p), seed)]
    if stale:
        raise UserError(
            f"expert point(s) branched from another dense run's seed than {seed.root}'s (the best dense LR "
            f"moved): {', '.join(stale)}; delete them to sweep those LRs from this seed"
        )
