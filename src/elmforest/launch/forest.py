"""Training a whole forest: the seed here, then every expert (and the dense baseline) as independent
jobs on an executor. Orchestration lives in launch/, above the forest it drives: dependencies run
cli -> launch -> forest -> train -> model/data -> utils."""

from __future__ import annotations

from pathlib import Path

from elmforest.config import RunConfig, apply_overrides
from elmforest.data.shards import Shards
from elmforest.forest.manifest import Forest
from elmforest.forest.plan import Plan, plan_domains
from elmforest.forest.seeding import train_seed
from elmforest.launch.executor import LocalExecutor
from elmforest.launch.jobs import ExpertJob, as_dict, dense_done, expert_kept, run_job
from elmforest.launch.progress import ProgressMonitor
from elmforest.train.tracking import require_trackers


def train_forest(
    forest: Forest,
    shards: Shards,
    base: RunConfig,
    plan: Plan,
    domains: list[str] | None = None,
    executor=None,
    dense: bool = True,
    threads: int | None = None,
    procs: int = 1,
    progress: bool = True,
    monitor_every: float = 10.0,
    overrides: list[str] | tuple = (),
) -> list[dict]:
    """All phases: the seed here, then every expert (and the dense baseline) as independent jobs.

    With the local executor the jobs run one after another in this process (or `workers` at a time in
    worker processes); with Ray they run concurrently wherever resources allow. The forest is re-read
    afterwards, since the jobs add their experts to the manifest on disk. Finished experts are
    skipped, unfinished ones resume. `overrides`: operational `--set` values (trackers, logging) the
    jobs apply on top of the seed's config (seeding.seed_overrides).
    """
    planned = plan_domains(plan, shards, domains)
    names = [d for d in planned if d not in forest.removed]
    finished = _finished(forest, names, dense)
    if finished:  # a rerun: each job only checks it is kept, here (Ray not started)
        executor = LocalExecutor()
    else:  # a tracker's missing package said once, before the seed or any job
        require_trackers(apply_overrides(base, list(overrides)).train.trackers)
    if hasattr(executor, "prepare"):  # Ray: a bad address or resources said before the seed trains
        executor.prepare()
    train_seed(forest, shards, base, plan, progress=progress)
    # absolute: a job on a Ray cluster (--address) runs in the worker's directory, not this one's
    where = (str(forest.root.resolve()), str(Path(shards.root).resolve()))
    trust = base.model.trust_remote_code  # the command line's flag travels with each job, not in a file
    sets = list(overrides)
    jobs = [
        ExpertJob(*where, d, overrides=sets, threads=threads, procs=procs, trust_remote_code=trust)
        for d in names
    ]
    if dense:  # first: the longest job, so it runs beside the experts when jobs run concurrently
        jobs.insert(
            0, ExpertJob(*where, "", kind="dense", overrides=sets, threads=threads, trust_remote_code=trust)
        )
    executor = executor or LocalExecutor()
    runs = {j.label: j.run_dir() for j in jobs}
    if jobs and finished:
        print(
            f"all {len(jobs)} job(s) finished before ({', '.join(runs)}): checking they were trained as asked"
        )
    elif jobs:  # a job writes to its own log: said once, so --no-progress is not minutes of silence
        print(
            f"training {len(jobs)} job(s) ({', '.join(runs)}); each writes to {forest.root}/runs/NAME/job.log, "
            f"progress in {forest.root / 'progress.log'}",
            flush=True,
        )
    with ProgressMonitor(
        runs, plan.total_steps, forest.root / "progress.log", every=monitor_every, echo=progress
    ):
        try:
            return executor.map(
                run_job,
                [as_dict(j) for j in jobs],
                [j.label for j in jobs],
                [j.run_dir() / "job.log" for j in jobs],
            )
        finally:
            forest.reload()


def _finished(forest: Forest, names: list[str], dense: bool) -> bool:
    """Every job's result is there (the seed, each expert's checkpoint, the dense run): the jobs then
    only check that what is kept was trained as asked, which needs no worker or cluster."""
    from elmforest.forest.seeding import seed_ready

    return (
        seed_ready(forest)
        and all(expert_kept(forest, n) for n in names)
        and (not dense or dense_done(forest.root / "runs" / "dense"))
    )
