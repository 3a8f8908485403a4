"""The sweep's third arm: the dense run's second half, at its own peak LR.

The expert phase trains at an LR swept for it (the `experts` arm), while the dense run's second half,
the part that runs beside the experts, kept the whole dense run's LR: one more tuned setting for the
forest. On the demo corpus that setting alone made the forest look better than dense in domain
(ensemble/dense 0.943; 1.001 with the dense half tuned too: docs/benchmarks.md, "The dense run's
second half was not tuned"). So the dense arm gets the same freedom: its run is continued from the
seed state (`seed_state`: the same weights, optimizer moments, step, data order, batch and steps, so
the same FLOPs) with only `optim.lr` changed, once per LR of the grid, and chosen on the valid split
by the dense arm's criterion (mean valid BPB over the domains). The point at the seed's own LR is the
dense run itself, not trained again.

Each point is `OUT/dense-continue/from-lr-X/lr-Y` (X the dense run's LR) holding a run at `runs/dense`, so the dense arm's scoring and
diverged-point record apply unchanged.
"""

from __future__ import annotations

from pathlib import Path

from elmforest.data.shards import Shards
from elmforest.forest.btm import Plan
from elmforest.launch.jobs import DenseContinueJob, run_dense_continue
from elmforest.launch.sweep import run_arm
from elmforest.launch.sweep_grid import point_tag
from elmforest.launch.sweep_results import choose, score_dense
from elmforest.utils.errors import UserError

CONTINUE_DIR = "dense-continue"  # under the sweep's --out


def sweep_continuation(
    out: Path,
    seed_forest: Path,
    seed_lr: float,
    grid: list[float],
    shards: Shards,
    domains: list[str],
    plan: Plan,
    seq_len: int,
    executor,
    threads: int | None,
    trust_remote_code: bool,
    max_bytes: int | None,
    log,
    echo: bool,
) -> dict:
    """sweep.json's `dense_continue`: each point run and scored as a dense point of the sweep is, the
    best chosen by the same `choose`."""
    dense_run = seed_forest / "runs" / "dense"
    where = out / CONTINUE_DIR / f"from-{point_tag(seed_lr)}"  # another best dense LR: other points
    own = point_tag(seed_lr)
    if own not in {point_tag(x) for x in grid}:  # not continuing at all is a point of the grid, for free
        log(f"      the dense run's own LR {seed_lr:g} joins the grid (that run itself, nothing trained)")
        grid = sorted([*grid, seed_lr])
    state = seed_forest / "seed_state"
    jobs, labels, points = [], [], []
    for lr in grid:
        if point_tag(lr) == own:  # the dense run at its own LR is this point already
            continue
        point = where / point_tag(lr)
        check_same_seed(point, state)
        jobs.append(
            DenseContinueJob(
                str(point),
                str(dense_run / "run_config.json"),
                str(state),
                lr,
                threads,
                trust_remote_code=trust_remote_code,
                shards=str(shards.root),
            )
        )
        labels.append(f"{where.parent.name}/{where.name}/{point_tag(lr)}")
        points.append(point)
    log(
        f"sweep, dense continuation arm: the dense run at LR {seed_lr:g} continued from its seed at LR "
        f"{grid} ({len(jobs)} runs; the point at {seed_lr:g} is that run itself)"
    )
    run_arm(executor, run_dense_continue, jobs, labels, points, plan, out, echo)
    scored = []
    for lr in grid:
        point = seed_forest if point_tag(lr) == own else where / point_tag(lr)
        scored.append({"lr": lr, **score_dense(point, shards, domains, seq_len, max_bytes)})
    return {"grid": grid, "seed_lr": seed_lr, "max_bytes": max_bytes, "points": scored, **choose(scored)}


def check_same_seed(point: Path, state: Path, run: str = "dense") -> None:
    """A point continued from another seed state (the dense run it came from was deleted and trained
    again) is refused, not scored as this seed's: a finished run checks only its own config."""
    import hashlib

    from elmforest.utils.io import read_json

    inputs = point / "runs" / run / "inputs.json"
    if not inputs.is_file() or not (state / "state.json").is_file():
        return
    had = (read_json(inputs).get("init_checkpoint") or {}).get("fingerprint")
    now = hashlib.sha256((state / "state.json").read_bytes()).hexdigest()[:16]
    if had is not None and had != now:
        raise UserError(
            f"{point / 'runs' / run}: continued from another seed state than {state} holds now (the dense run "
            "was trained again); delete it to continue from the new one"
        )
