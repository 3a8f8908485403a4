"""Learning-rate sweeps for every arm of a BTM comparison.

"Don't Sweep your Learning Rate under the Rug": a comparison where one arm is tuned and the other is
not can flip. So each arm is swept on its own, and chosen on the **valid** split, never on test:

- **dense**: the whole dense run (S steps at batch B on the domain mixture), once per LR of the grid,
  scored by its mean valid BPB over the domains (macro average, as the comparison reports);
- **experts**: the expert phase (S − seed steps at batch B/k, each expert on its own domain), branched
  from the seed = the first part of the dense run at the dense arm's best LR (the forest and the
  dense baseline keep sharing it, as BTM's compute matching needs), once per expert LR, scored by each
  expert's valid BPB on its own domain, averaged over domains. Experts continue the seed's schedule;
  their LR is that schedule's peak, so the LR steps from the seed's curve to the experts' at the branch.
  With `groups` (X-ELM: one expert per group of languages), one expert per group instead, each on its
  group's domains mixed as the seed mixes them, at batch B/k for k groups; each domain is scored by the
  valid BPB of the expert whose group holds it. Several groupings (k = 2, 4, 8) share the dense arm and
  the seed, and the plan splits the batch evenly for every k, as X-ELM's forests do.
- **dense continuation** (launch/sweep_continue.py): that best dense run's second half, continued from
  its seed state once per LR, scored as the dense arm is, so the dense arm has a second-phase LR of its
  own as the experts' phase has.

Every point is a forest directory under `out` (dense/lr-X: seed + dense run; experts/lr-Y, or
experts-LABEL/lr-Y for a grouping: experts sharing the best seed; dense-continue/from-lr-X/lr-Y a run
continued from that seed), so a killed sweep resumes where it
stopped, and the Ray executor runs points (and each point's experts) in parallel. A dense point planned
by another sweep (other groupings round the batch otherwise) is refused, never reused as a seed. A best LR at either
end of the grid is reported as such: the optimum may lie outside the grid.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

from elmforest.config import FLOAT32_MAX, RunConfig
from elmforest.data.shards import Shards
from elmforest.forest import btm
from elmforest.forest.manifest import Forest
from elmforest.launch.executor import JobsFailed, LocalExecutor
from elmforest.launch.groupings import canon, check_groupings, normalize
from elmforest.launch.jobs import (
    DenseRunJob,
    ExpertJob,
    as_dict,
    dense_done,
    in_process_if_done,
    run_dense_run,
    run_job,
)
from elmforest.launch.sweep_checks import (
    check_dense_point,
    check_expert_points,
    check_settings,
    drop_stale_arms,
    swept_points,
)
from elmforest.launch.sweep_grid import btm_grid_default, check_grid, lr_grid, point_tag
from elmforest.launch.sweep_results import (
    DIVERGED,
    choose,
    format_sweep,
    score_dense,
    score_experts,
    scored_domains,
)
from elmforest.train.runlock import drop_if_empty
from elmforest.train.tracking import require_trackers
from elmforest.utils.errors import UserError
from elmforest.utils.io import read_json, write_json_atomic

# scoring, choosing and formatting live in sweep_results.py; their names stay importable from here
__all__ = ["ARMS", "btm_grid_default", "choose", "format_sweep", "lr_grid", "score_experts", "sweep"]

ARMS = ("dense", "experts", "continue", "both", "all")  # both: dense and experts; all: the three


DIVERGED_ERRORS = (
    "Diverged",
    "FloatingPointError",
    "NonFiniteWeights",
)  # how a failed job's report names them


def run_points(executor, fn, jobs: list[dict], labels: list[str], logs: list[Path], points: list[Path]):
    """Run the jobs of the sweep's points. A job whose loss diverged (high LRs do, which is what a
    sweep is there to find) marks its point diverged, remembered on disk so a rerun does not train it
    again, instead of failing the sweep; any other failure still fails it. (A study's dense_tuned runs
    go through here too, each run's folder its point.)"""
    todo = [i for i, p in enumerate(points) if not (p / DIVERGED).is_file()]
    executor = in_process_if_done(executor, [jobs[i] for i in todo])
    try:
        executor.map(fn, [jobs[i] for i in todo], [labels[i] for i in todo], [logs[i] for i in todo])
    except JobsFailed as e:
        other = {k: v for k, v in e.failures.items() if not v.startswith(DIVERGED_ERRORS)}
        for i in todo:
            why = e.failures.get(labels[i])
            if why and labels[i] not in other and not (points[i] / DIVERGED).is_file():
                write_json_atomic(points[i] / DIVERGED, {"job": labels[i], "why": why})
        if other:
            raise JobsFailed(other) from e


def sweep(shards_dir: str | Path, out: str | Path, base: RunConfig, *args, **kwargs) -> dict:
    """Sweep the dense arm, then the expert arm from the best dense run's seed, then that dense run's
    second half (launch/sweep_continue.py: at `continue_lrs`, by default the expert grid); returns
    sweep.json (`_sweep` has the options). A sweep refused before anything is written leaves no `out`
    it created (as a refused run leaves no run folder)."""
    created = not Path(out).exists()
    try:
        return _sweep(shards_dir, out, base, *args, **kwargs)
    except BaseException:
        if created and Path(out).is_dir():
            drop_if_empty(Path(out))
        raise


def _sweep(
    shards_dir: str | Path,
    out: str | Path,
    base: RunConfig,
    arm: str = "all",
    lrs: list[float] | None = None,
    expert_lrs: list[float] | None = None,
    continue_lrs: list[float] | None = None,
    dense_lr: float | None = None,
    seed_share: float = 0.5,
    executor=None,
    threads: int | None = None,
    log=print,
    groups: dict | None = None,
    max_bytes: int | None = None,
) -> dict:
    """Sweep the dense arm, then the expert arm from the best dense run's seed, then that dense run's
    second half (launch/sweep_continue.py: at `continue_lrs`, by default the expert grid); returns
    sweep.json.

    `groups`: X-ELM's expert arm, {label: {expert name: [domains]}} (or one bare {expert name:
    [domains]}, labelled `groups`), each grouping swept apart (sweep.json's `grouped`) instead of one
    expert per domain. `max_bytes`: score on the first bytes of each domain's valid split only."""
    if arm not in ARMS:
        raise UserError(f"arm must be one of {ARMS}, got {arm!r}")
    for given, what in ((lrs, "dense"), (expert_lrs, "expert"), (continue_lrs, "dense continuation")):
        if given:  # refused before any run trains, not after the arms before it
            check_grid(given, what)
    if dense_lr is not None and not (math.isfinite(dense_lr) and 0 < dense_lr <= FLOAT32_MAX):
        raise UserError(f"--dense-lr {dense_lr:g}: a positive learning rate of at most {FLOAT32_MAX:.3g}")
    require_trackers(base.train.trackers)
    # absolute: a job on a Ray cluster (--address) runs in the worker's directory, not this one's
    shards = Shards(Path(shards_dir).resolve())
    out = Path(out).resolve()
    groupings = normalize(groups) if groups is not None else None
    if groupings is not None:
        domains = check_groupings(groupings, base.data.domains, shards)
        # X-ELM's language added later is one: said, not dropped silently (unless data.domains chose)
        left = [d for d in shards.domains if shards.has(d, "train") and d not in domains]
        if left and log is not None and base.data.domains is None:
            log(
                f"note: {', '.join(left)} in {shards.root} but in no group: neither swept arm trains on or "
                "scores them"
            )
    else:
        domains = base.data.domains or [d for d in shards.domains if shards.has(d, "train")]
    scored = scored_domains(shards, domains, log)
    result = read_json(out / "sweep.json") if (out / "sweep.json").is_file() else {}
    had = {"shards": result.get("shards"), "fingerprint": result.get("shards_fingerprint")}
    now = {"shards": str(shards.root.resolve()), "fingerprint": shards.fingerprint}
    key = "fingerprint" if had["fingerprint"] else "shards"  # the content; a sweep.json from before: the path
    same = shards.fingerprints if key == "fingerprint" else (now["shards"],)
    if had[key] is not None and had[key] not in same:  # its runs and cached scores are of other data
        what = (
            f"content {had['fingerprint']}, not {now['fingerprint']}"
            if key == "fingerprint"
            else f"not {now['shards']}"
        )
        raise UserError(
            f"{out}: swept on shards {had['shards']} ({what}): other data; a sweep on other shards needs "
            "another --out"
        )
    for label, grouping in (groupings or {}).items():
        had = (result.get("grouped") or {}).get(label, {}).get("groups")
        if had is not None and canon(had) != canon(grouping):
            raise UserError(
                f"{out}: grouping {label!r} was swept here as {had}, not {grouping}; use another --out "
                "or another label (file name)"
            )
    out.mkdir(parents=True, exist_ok=True)
    executor = executor or LocalExecutor()
    if hasattr(executor, "prepare"):  # Ray: a bad address or resources said before any run trains here
        executor.prepare()
    echo = log is not None
    log = log or (lambda *_: None)
    base = RunConfig.from_dict(base.to_dict())
    base.data.shards = str(shards.root.resolve())
    if groupings is None:
        plan, base = btm.plan_for(base, domains, seed_share)
    else:  # the seed mixes the domains; the batch splits evenly between the experts of every grouping
        base.data.domains = list(domains)
        sizes = sorted({len(g) for g in groupings.values()})
        asked = base.train.batch_size
        plan, base = btm.plan_for(base, math.lcm(*sizes), seed_share)
        log(
            f"sweep: dense batch {asked} -> {plan.batch_size} (a multiple of {plan.n_experts}) so every "
            f"grouping's experts ({', '.join(map(str, sizes))}) get an equal share"
        )
    for point in sorted((out / "dense").glob("lr-*")):  # before any work, seeds included
        check_dense_point(point, plan, base.data.domains)
    # every dense run trained here, not only a new grid's: a dense arm rerun on a grid disjoint from the
    # old one would otherwise train other settings beside the old runs, and the arms branched from them
    check_settings(out, swept_points(out, base), plan, shards)
    seq_len = base.train.seq_len
    result.update(
        {
            "shards": str(shards.root.resolve()),
            "shards_fingerprint": shards.fingerprint,
            "domains": domains,
            "plan": asdict(plan),
        }
    )
    result.pop("scored_domains", None)
    if scored != domains:  # a domain with no valid documents trains, but no LR is chosen on it
        result["scored_domains"] = scored
    result.pop("max_bytes", None)  # each arm records the bytes it was scored on (a rerun may rescore one)
    result["criterion"] = {
        "dense": "mean valid BPB over the domains (those with a valid split) of the dense run",
        "experts": "mean over domains of each expert's valid BPB on its own domain",
        "grouped": "mean over domains of the valid BPB of the expert whose group holds the domain",
        "dense_continue": "mean valid BPB over the domains of the dense run, its second half at this LR",
    }

    if arm in ("dense", "both", "all"):
        grid = check_grid(lrs or btm_grid_default(base.optim.lr), "dense")
        jobs, cfgs = [], []
        for lr in grid:
            cfg = RunConfig.from_dict(base.to_dict())
            cfg.optim.lr = lr
            cfgs.append((lr, cfg))
            jobs.append(
                DenseRunJob(
                    str(out / "dense" / point_tag(lr)),
                    str(shards.root),
                    cfg.to_dict(),
                    asdict(plan),
                    threads,
                    trust_remote_code=cfg.model.trust_remote_code,
                )
            )
        check_settings(out, cfgs, plan, shards)
        log(f"sweep, dense arm: {len(grid)} full dense runs ({plan.total_steps} steps) at LR {grid}")
        labels = [f"dense/{point_tag(x)}" for x in grid]
        points = [out / "dense" / point_tag(x) for x in grid]
        run_arm(executor, run_dense_run, jobs, labels, points, plan, out, echo)
        points = [
            {"lr": lr, **score_dense(out / "dense" / point_tag(lr), shards, scored, seq_len, max_bytes)}
            for lr in grid
        ]
        result["dense"] = {"grid": grid, "max_bytes": max_bytes, "points": points, **choose(points)}
        drop_stale_arms(result, log)
        write_json_atomic(out / "sweep.json", result)
    if arm in ("experts", "continue", "both", "all"):
        seed_lr = dense_lr or (result.get("dense") or {}).get("best_lr")
        if seed_lr is None:
            raise UserError(
                f"the {'expert' if arm != 'continue' else 'dense continuation'} arm branches from the best "
                "dense run: sweep the dense arm first or give --dense-lr"
            )
        seed_forest = out / "dense" / point_tag(seed_lr)
        trust = base.model.trust_remote_code
        if not btm.seed_ready(Forest.init(seed_forest, exist_ok=True)) or (
            arm in ("continue", "all") and not dense_done(seed_forest / "runs" / "dense")
        ):  # the continuation arm continues the dense run's config: it must have run
            cfg = RunConfig.from_dict(base.to_dict())
            cfg.optim.lr = seed_lr
            # the expert arm alone needs only the seed, the first part of that run: not the rest of it
            what = "its seed" if arm == "experts" else "the dense run"
            log(f"sweep: {what} at LR {seed_lr:g}, which the other arms continue -> {seed_forest}")
            run_dense_run(
                DenseRunJob(
                    str(seed_forest),
                    str(shards.root),
                    cfg.to_dict(),
                    asdict(plan),
                    threads,
                    trust_remote_code=trust,
                    seed_only=arm == "experts",
                )
            )
        seed = Forest.load(seed_forest)
        grid = check_grid(expert_lrs or btm_grid_default(seed_lr), "expert")
    if arm in ("experts", "both", "all"):
        # each arm: (result key, directory, {expert: its domains}, None for one expert per domain)
        arms = [("experts", out / "experts", {d: [d] for d in domains}, None)]
        if groupings is not None:
            arms = [(label, out / f"experts-{label}", g, g) for label, g in groupings.items()]
        forests, jobs, labels = {}, [], []
        check_expert_points([where / point_tag(lr) for _, where, _, _ in arms for lr in grid], seed)
        for key, where, experts, grouping in arms:
            for lr in grid:
                f = btm.share_seed(where / point_tag(lr), seed, list(experts), expert_lr=lr)
                forests[key, lr] = f
                for name, mine in experts.items():
                    jobs.append(
                        ExpertJob(
                            str(f.root),
                            str(shards.root),
                            mine[0],
                            name=name if grouping else None,
                            threads=threads,
                            trust_remote_code=trust,
                            mix=list(mine) if grouping else None,
                        )
                    )
                    labels.append(f"{where.name}/{f.root.name}/{name}")
            log(
                f"sweep, expert arm{'' if grouping is None else ' ' + key}: {len(experts)} experts x "
                f"{len(grid)} LRs {grid}, branched from the seed of the dense run at LR {seed_lr:g}"
            )
        run_arm(executor, run_job, jobs, labels, [Path(j.forest) for j in jobs], plan, out, echo)
        for key, _, _, grouping in arms:
            points = [
                {
                    "lr": lr,
                    **score_experts(
                        Forest.load(forests[key, lr].root), shards, scored, seq_len, grouping, max_bytes
                    ),
                }
                for lr in grid
            ]
            r = {"grid": grid, "seed_lr": seed_lr, "max_bytes": max_bytes, "points": points, **choose(points)}
            if grouping is None:
                result["experts"] = r
            else:
                result.setdefault("grouped", {})[key] = {"groups": grouping, **r}
        write_json_atomic(out / "sweep.json", result)
    if arm in ("continue", "all"):
        from elmforest.launch.sweep_continue import sweep_continuation

        cgrid = check_grid(continue_lrs or grid, "dense continuation")
        result["dense_continue"] = sweep_continuation(
            out,
            seed_forest,
            seed_lr,
            cgrid,
            shards,
            scored,
            plan,
            seq_len,
            executor,
            threads,
            trust,
            max_bytes,
            log,
            echo,
        )
        write_json_atomic(out / "sweep.json", result)
    return result


def run_arm(executor, fn, jobs: list, labels: list[str], points: list[Path], plan, out: Path, echo: bool):
    """One arm's jobs (each with its run_dir), a progress line per job while they run."""
    with _monitor(dict(zip(labels, [j.run_dir() for j in jobs], strict=True)), plan, out, echo):
        logs = [j.run_dir() / "job.log" for j in jobs]
        run_points(executor, fn, [as_dict(j) for j in jobs], labels, logs, points)


def _monitor(runs: dict, plan: btm.Plan, out: Path, echo: bool):
    from elmforest.launch.progress import ProgressMonitor

    return ProgressMonitor(runs, plan.total_steps, out / "progress.log", every=60.0, echo=echo)
