"""Jobs: plain, JSON-serialisable descriptions of independent work, and the functions that run them.

A job runs in whatever process the executor gives it (this one, a Ray worker on another machine);
it only needs the forest and shards paths to be reachable there (shared storage). Everything a job
does is resumable and idempotent, so a retried job continues from its last checkpoint and a
finished expert is merged exactly once.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from elmforest.utils.errors import Failed, UserError
from elmforest.utils.proc import run_stoppable, tied_to_this_process


@dataclass
class ExpertJob:
    forest: str
    shards: str
    domain: str
    name: str | None = None
    branch: str = "seed"
    overrides: list[str] = field(default_factory=list)
    threads: int | None = None  # torch intra-op threads (= the CPUs the executor reserved)
    procs: int = 1  # data-parallel processes for this expert (torchrun; GPUs or gloo on CPU)
    kind: str = "expert"  # expert | dense
    trust_remote_code: bool = False  # the command line's --trust-remote-code (never read from a file)
    mix: list[str] | None = None  # the domains an expert trains on (a group of languages); None: [domain]

    @property
    def label(self) -> str:
        return "dense" if self.kind == "dense" else (self.name or self.domain)

    def run_dir(self) -> Path:
        return Path(self.forest) / "runs" / self.label


@dataclass
class DenseRunJob:
    """A forest's whole dense run from scratch (the seed is its first part): one point of an LR sweep."""

    forest: str
    shards: str
    config: dict  # RunConfig.to_dict() of the dense run
    plan: dict  # btm.Plan fields
    threads: int | None = None
    label: str = "dense"
    trust_remote_code: bool = False
    seed_only: bool = (
        False  # stop at the seed (a forest whose dense run is another's, e.g. a seed-share point)
    )

    def run_dir(self) -> Path:
        return Path(self.forest) / "runs" / "dense"


DENSE_TUNED_RUN = "dense-tuned"  # a forest's runs/ folder of the quickstart's row dense_tuned


@dataclass
class DenseContinueJob:
    """The dense run's second half again from its seed state, at another peak LR: the same weights,
    optimizer moments, step, data order, batch and steps (so the same FLOPs); only `optim.lr` differs.
    One point of a sweep's dense-continuation arm (launch/sweep_continue.py)."""

    point: str  # the point's directory; the run lands in point/runs/dense
    config: str  # the dense run's run_config.json
    seed_state: str  # the trainer state the dense run had at the seed's last step
    lr: float
    threads: int | None = None
    trust_remote_code: bool = False
    shards: str | None = None  # where the shards are now (a sweep on moved shards); None: as the config says
    run: str = "dense"  # the run's folder under point/runs (a study's dense_tuned: DENSE_TUNED_RUN)

    def run_dir(self) -> Path:
        return Path(self.point) / "runs" / self.run


def continuation_config(config: Path, seed_state: Path, lr: float):
    """The dense run's config, continued from `seed_state` at peak LR `lr` (the quickstart's
    dense_tuned row and the sweep's continuation points are built the same way)."""
    from elmforest.train.runcheck import saved_config

    cfg = saved_config(Path(config))
    cfg.optim.lr, cfg.train.init_checkpoint = lr, str(Path(seed_state).resolve())
    return cfg


def run_dense_continue(job: DenseContinueJob | dict) -> dict:
    """Train one continuation, logged like every job; idempotent and resumable (a finished run only
    checks its config)."""
    job = DenseContinueJob(**job) if isinstance(job, dict) else job

    def work(log):
        from elmforest.train.trainer import train

        cfg = continuation_config(Path(job.config), Path(job.seed_state), job.lr)
        cfg.model.trust_remote_code = job.trust_remote_code
        if job.shards is not None:
            cfg.data.shards = job.shards
        s = train(cfg, job.run_dir(), progress=False, label=f"dense continued at LR {job.lr:g}")
        return {"name": "dense", "tokens": s["tokens"], "flops": s["flops"]}

    return logged(job.run_dir(), job.run, job.threads, work)


def expert_kept(forest, name: str) -> bool:
    """The expert's checkpoint is in the forest, whole (its checksums): its job would only check it."""
    return name in forest.names and forest.intact(name, deep=True, trust_unchanged=True) is None


def dense_done(run: Path) -> bool:
    """A dense run finished (its summary, written last, and its model): its job would only check it."""
    return (run / "summary.json").is_file() and (run / "model" / "config.json").is_file()


def job_finished(job: dict) -> bool:
    """A dense or continuation point's run, a seed, or an expert's checkpoint is there: no worker is
    needed for it."""
    from elmforest.forest.manifest import Forest

    if "point" in job:  # DenseContinueJob
        return dense_done(Path(job["point"]) / "runs" / job.get("run", "dense"))
    try:
        forest = Forest.load(job["forest"])
    except Exception:  # noqa: BLE001 - unreadable: the job says why
        return False
    if "config" in job:  # DenseRunJob: the whole dense run, or its seed alone
        if job.get("seed_only"):
            from elmforest.forest.seeding import seed_ready

            return seed_ready(forest)
        return dense_done(Path(job["forest"]) / "runs" / "dense")
    return expert_kept(forest, job.get("name") or job["domain"])


def in_process_if_done(executor, jobs: list[dict]):
    """A rerun whose jobs are all done runs them here, one after another (each only checks what is
    kept), not in a worker process each: a finished study's rerun started about a hundred, 1.6 min of
    process start-ups on the tiny study, to train nothing."""
    if all(job_finished(j) for j in jobs):
        from elmforest.launch.executor import LocalExecutor

        return LocalExecutor()
    return executor


def run_job(job: ExpertJob | dict) -> dict:
    """Run one job here; its output goes to <run dir>/job.log (appended across retries)."""
    job = ExpertJob(**job) if isinstance(job, dict) else job
    return logged(
        job.run_dir(),
        job.label,
        job.threads,
        lambda log: _run_distributed(job, log) if job.procs > 1 else _run_here(job),
    )


def run_dense_run(job: DenseRunJob | dict) -> dict:
    """Seed then dense baseline of one forest, logged like every job; idempotent and resumable."""
    job = DenseRunJob(**job) if isinstance(job, dict) else job

    def work(log):
        from elmforest.config import RunConfig
        from elmforest.data.shards import Shards
        from elmforest.forest import btm
        from elmforest.forest.manifest import Forest

        forest, shards = Forest.init(job.forest, exist_ok=True), Shards(job.shards)
        cfg, plan = RunConfig.from_dict(job.config), btm.Plan(**job.plan)
        cfg.model.trust_remote_code = job.trust_remote_code
        btm.train_seed(forest, shards, cfg, plan, progress=False)
        if job.seed_only:
            seed = forest.data["seed"]
            return {"name": job.label, "tokens": seed["tokens"], "flops": seed["flops"]}
        s = btm.train_dense(forest, shards, cfg, plan, progress=False)
        return {"name": job.label, "tokens": s["tokens"], "flops": s["flops"]}

    return logged(job.run_dir(), job.label, job.threads, work)


def logged(run_dir: Path, label: str, threads: int | None, work, log_name: str = "job.log") -> dict:
    """Run `work(log)` with this process's output (Python's and native) appended to <run_dir>/<log_name>."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "worker.pid").write_text(str(os.getpid()))  # lets operators (and tests) find the worker
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    with (
        open(run_dir / log_name, "a", buffering=1) as log,
        _fds_to(log),
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        print(f"== job {label} (pid {os.getpid()}) ==", flush=True)
        try:
            return work(log)
        except BaseException:
            traceback.print_exc()  # the reason lands in the job's log, where the failure report points
            raise
        finally:
            torch.set_num_threads(before)  # a job run in the driver leaves the driver's threads as they were


def driver_log(stack: contextlib.ExitStack):
    """print() to this process's output as it is now (a study's, for its whole run), flushed per line
    (a redirected log gets the progress lines as they come). A job the driver runs itself (one worker)
    points fd 1 and sys.stdout at its job.log meanwhile, and the progress thread's lines went there: so
    a copy of fd 1 (launch/progress.py's monitor keeps the terminal the same way), or the stream object
    itself where it is none (a test's capture)."""
    stream = sys.stdout
    try:
        if stream.fileno() == 1:
            stream = stack.enter_context(os.fdopen(os.dup(1), "w", buffering=1))
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pass

    def log(*args, **kw):
        sys.stdout.flush()  # what lower layers printed before this line, before it (pipes buffer)
        print(*args, **kw, file=stream, flush=True)

    return log


@contextlib.contextmanager
def _fds_to(log):
    """Point file descriptors 1 and 2 at the job's log too, so native (C++, NCCL) output lands there."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _run_here(job: ExpertJob) -> dict:
    from elmforest.data.shards import Shards
    from elmforest.forest import btm
    from elmforest.forest.manifest import Forest

    forest, shards = Forest.load(job.forest), Shards(job.shards)
    if job.kind == "dense":
        from elmforest.config import RunConfig, apply_overrides

        base = RunConfig.from_dict(forest.data["seed"]["config"])
        base.model.trust_remote_code = job.trust_remote_code
        base = apply_overrides(base, job.overrides)
        s = btm.train_dense(forest, shards, base, btm.Plan(**forest.data["plan"]), progress=False)
        return {
            "name": "dense",
            "tokens": s["tokens"],
            "flops": s["flops"],
            "resumed_from": s.get("resumed_from"),
        }
    e = btm.train_expert(
        forest,
        shards,
        job.domain,
        job.name,
        job.branch,
        overrides=job.overrides,
        progress=False,
        trust_remote_code=job.trust_remote_code,
        mix=job.mix,
    )
    summary = btm.read_summary(forest, e["name"])
    return {
        "name": e["name"],
        "tokens": e["tokens"],
        "flops": e["flops"],
        "resumed_from": (summary or {}).get("resumed_from"),
    }


def _run_distributed(job: ExpertJob, log) -> dict:
    """The expert trains under torchrun with `procs` processes; this process only waits and merges."""
    if job.kind != "expert" or job.mix:
        raise UserError("data-parallel jobs are supported for single-domain experts only")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={job.procs}",
        "-m",
        "elmforest.cli",
        "forest",
        "expert",
        "--forest",
        job.forest,
        "--shards",
        job.shards,
        "--domain",
        job.domain,
        "--branch",
        job.branch,
        "--no-progress",
    ]
    if job.name:
        cmd += ["--name", job.name]
    if job.trust_remote_code:
        cmd += ["--trust-remote-code"]
    for o in job.overrides:
        cmd += ["--set", o]
    env = {**os.environ, "ELMFOREST_LAUNCHED_BY": str(os.getpid())}  # its ranks leave SIGTERM's line to it
    if job.threads:
        env["OMP_NUM_THREADS"] = str(max(1, job.threads // job.procs))
    # torchrun dies with this job (a killed Ray worker leaves no orphans): set in the child itself, not
    # by a preexec_fn, which is unsafe when the job runs in a multi-threaded worker
    rc = run_stoppable(tied_to_this_process(cmd), stdout=log, stderr=log, env=env)
    if rc != 0:
        raise Failed(f"expert {job.label}: torchrun exited with {rc}; see {job.run_dir() / 'job.log'}")
    from elmforest.forest.manifest import Forest

    e = Forest.load(job.forest).expert(job.name or job.domain)
    return {"name": e["name"], "tokens": e["tokens"], "flops": e["flops"], "resumed_from": None}


def as_dict(job: ExpertJob | DenseRunJob) -> dict:
    return asdict(job)
