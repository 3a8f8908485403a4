"""Running a scaling study: which runs it needs, training them once each, scoring them on the same bytes.

A *point* is one forest directory under `runs/`: a budget (a multiple of the 1x dense run), a training
seed, the domains, the seed's share. Its dense run (the seed's run continued to the budget) is the
dense arm at that budget, and its experts (branched from that seed) are the forest arm, so the two
arms share the seed and a dense budget that is also a forest budget is trained once. Points of the
domain-count axis (the first n domains) and the seed-share axis are points like the others.

Everything is an ordinary elmforest run: phase 1 trains every point's seed and dense run as jobs on
the executor (local workers or Ray), phase 2 every expert of every forest point; a rerun skips what is
done and resumes what was cut. Scores are cached beside each point, keyed by what was scored.
"""

from __future__ import annotations

import copy
import json
import math
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from elmforest.config import RunConfig
from elmforest.forest.manifest import Forest
from elmforest.forest.plan import Plan, check_plan, plan_domains, plan_for
from elmforest.launch.jobs import (
    DENSE_TUNED_RUN,
    DenseContinueJob,
    DenseRunJob,
    ExpertJob,
    as_dict,
    in_process_if_done,
    run_dense_continue,
    run_dense_run,
    run_job,
)
from elmforest.launch.progress import last_metrics
from elmforest.launch.sweep import run_points
from elmforest.launch.sweep_continue import check_same_seed
from elmforest.launch.sweep_results import DIVERGED
from elmforest.study.config import StudyConfig
from elmforest.train.checkpoint import newest_step
from elmforest.utils.errors import UserError
from elmforest.utils.io import read_json


@dataclass(frozen=True)
class Point:
    axis: str  # main | domains | share | cbtm
    budget: float
    seed: int
    domains: tuple[str, ...]
    seed_share: float
    forest: bool  # trains experts
    dense: bool  # trains the dense run to the budget
    data_fraction: float = 1.0  # of the training documents (the c-BTM axis subsamples them)

    @property
    def tag(self) -> str:
        if self.axis == "cbtm":
            return f"data{self.data_fraction:g}-s{self.seed}"
        if self.axis == "domains":
            return f"domains{len(self.domains)}-s{self.seed}"
        if self.axis == "share":
            return f"share{self.seed_share:g}-s{self.seed}"
        return f"b{self.budget:g}-s{self.seed}"


def plan_points(cfg: StudyConfig, names: list[str]) -> list[Point]:
    """Every point the study needs, each once."""
    dense, forest = set(cfg.dense_budgets), set(cfg.forest_budgets)
    pts = [
        Point("main", b, s, tuple(names), cfg.seed_share, b in forest, b in dense)
        for b in sorted(dense | forest)
        for s in cfg.seeds
    ]
    main_1x = 1.0 in forest and 1.0 in dense
    for n in sorted(set(cfg.domain_counts)):
        if n > len(names):
            raise UserError(f"domain_counts asks for {n} domains; the corpus has {len(names)}: {names}")
        if n == len(names) and main_1x:
            continue  # the main 1x point is this one
        pts += [Point("domains", 1.0, s, tuple(names[:n]), cfg.seed_share, True, True) for s in cfg.seeds]
    for share in sorted(set(cfg.seed_shares) - {cfg.seed_share}):
        # the dense run does not depend on where the seed stops: the main 1x point's is this one's
        pts += [Point("share", 1.0, s, tuple(names), share, True, False) for s in cfg.seeds]
    for f in sorted(set(cfg.cbtm_data) if cfg.cbtm_ks else ()):
        if f == 1.0 and 1.0 in dense:
            continue  # all the data at the 1x budget: the main 1x point
        pts += [Point("cbtm", f, s, tuple(names), cfg.seed_share, False, True, f) for s in cfg.seeds]
    return pts


def plan_batch(cfg: StudyConfig, base: RunConfig, names: list[str]) -> int:
    """The dense batch of every run (the preset's, rounded to a multiple of the domains by the plan),
    refused now when c-BTM's experts or a domain-count point's cannot split it evenly, not once every
    seed has trained: each point of those axes trains the main 1x run's tokens (the plan rounded its own
    batch to its n domains, so the gain against n compared forests of other budgets: 2.7x apart)."""
    batch = plan_for(copy.deepcopy(base), list(names))[0].batch_size
    for field, ks in (("cbtm_ks", cfg.cbtm_ks), ("domain_counts", cfg.domain_counts)):
        if any(batch % k for k in ks):
            raise UserError(
                f"the batch ({batch} sequences, a multiple of the {len(names)} domains) does not divide "
                f"among {field} {ks}: set train.batch_size to a multiple of each"
            )
    return batch


def budget_steps(budget: float, steps_1x: int) -> int:
    return max(4, round(budget * steps_1x))


def check_budget_steps(cfg: StudyConfig, steps_1x: int) -> None:
    """Budgets must be the runs they name: one under 4 steps trains 4, and two that round to the same
    steps train the same run twice; both would record a budget that never ran and leave the fit fewer
    distinct computes than it needs, found only after every run had trained."""
    for name in ("dense_budgets", "forest_budgets", *(("cbtm_data",) if cfg.cbtm_ks else ())):
        steps = {b: budget_steps(b, steps_1x) for b in sorted(set(getattr(cfg, name)))}  # c-BTM: by fraction
        short = [b for b in steps if b * steps_1x < 3.5]
        if short or len(set(steps.values())) < len(steps):
            shown = ", ".join(f"{b:g}x -> {n}" for b, n in steps.items())
            raise UserError(
                f"invalid study config: {name}: at 1x = {steps_1x} steps they train {shown} steps; "
                + ("a budget under 4 steps trains 4, " if short else "")
                + "budgets must train different numbers of steps (raise steps or spread the budgets)"
            )


def cbtm_base(p_fraction: float, seed: int, cfg: StudyConfig) -> str:
    """The tag of the point whose seed and dense run a c-BTM forest at this data fraction shares."""
    if p_fraction == 1.0 and 1.0 in cfg.dense_budgets:
        return f"b1-s{seed}"
    return f"data{p_fraction:g}-s{seed}"


def lr_key(p: Point) -> float | str:
    """The point's entry in the swept LRs (study/lrs.py): a main-axis point's budget, a c-BTM point's data
    fraction, a domain-count point's n ("domains2"), a seed-share point's share ("share0.25")."""
    if p.axis in ("domains", "share"):
        return f"domains{len(p.domains)}" if p.axis == "domains" else f"share{p.seed_share:g}"
    return p.budget if p.axis == "main" else f"data{p.data_fraction:g}"


def continue_lr(cfg: StudyConfig, p: Point, lrs: dict | None, dense_lr: float) -> float | None:
    """The peak LR of the point's dense_tuned run: a dense run's second half at its budget's (or data
    fraction's) swept continuation LR, else the study's; None where there is none to train (no dense run,
    or the LR is the dense run's own: dense_tuned is then the dense run itself). Every axis compares its
    forests with it, so every dense run of the study has one."""
    if not p.dense:
        return None
    lr = ((lrs or {}).get(lr_key(p)) or {}).get("dense_continue_lr", cfg.dense_continue_lr)
    return None if lr is None or f"{lr:.3g}" == f"{dense_lr:.3g}" else lr


def point_plan(
    cfg: StudyConfig, base: RunConfig, p: Point, steps_1x: int, lrs: dict | None = None
) -> tuple[Plan, RunConfig]:
    """The point's plan and dense config; `lrs` (swept LRs by `lr_key`, study/lrs.py) sets each point's
    LRs to its own sweep's; without them every point takes the study's (already in `base`/`cfg`)."""
    c = copy.deepcopy(base)
    c.train.steps = budget_steps(p.budget, steps_1x)
    c.train.seed = p.seed
    c.data.domains = None
    expert_lr = cfg.expert_lr
    key = lr_key(p)
    if lrs and key in lrs:
        c.optim.lr = lrs[key]["dense_lr"]
        expert_lr = lrs[key].get("expert_lr", expert_lr)
    return plan_for(c, list(p.domains), p.seed_share, expert_lr)


class Progress:
    """Runs done / total and an ETA from the tokens trained so far, every `every` seconds."""

    def __init__(self, runs: list[tuple[str, Path, int, int, int]], log, every: float = 30.0):
        # (label, run dir, first step, last step, tokens per step)
        self.runs, self.log, self.every = runs, log, every
        self.total = sum((b - a) * t for _, _, a, b, t in runs)
        self.t0, self.stop = time.perf_counter(), threading.Event()
        self.before = self._done()[1]  # trained before this invocation (a resumed study): not in the rate

    def _done(self) -> tuple[int, int]:
        done_runs, tokens = 0, 0
        for _, d, a, b, t in self.runs:
            m = {"step": b} if (d / "summary.json").is_file() else last_metrics(d / "metrics.jsonl") or {}
            step = min(
                b, max(a, int(m.get("step", a)), newest_step(d / "checkpoints") or 0)
            )  # a pause off the log grid
            done_runs += step >= b
            tokens += (step - a) * t
        return done_runs, tokens

    def line(self) -> str:
        done_runs, tokens = self._done()
        elapsed, now = time.perf_counter() - self.t0, tokens - self.before
        eta = f", ETA {elapsed * (self.total - tokens) / now / 60:.1f} min" if now > 0 else ""
        return f"      study: {done_runs}/{len(self.runs)} runs, {tokens / max(1, self.total):.0%} of the tokens{eta}"

    def _loop(self):
        while not self.stop.wait(self.every):
            try:
                self.log(self.line())
            except (OSError, ValueError):  # the output closed as the study ended: nothing left to say
                return

    def __enter__(self):
        threading.Thread(target=self._loop, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.stop.set()


def train_points(
    points: list[Point],
    root: Path,
    shards_of,
    cfg: StudyConfig,
    base: RunConfig,
    steps_1x: int,
    executor,
    threads: int | None,
    log=print,
    every: float = 30.0,
    more_forests=None,
    lrs: dict | None = None,
) -> dict[Point, float]:
    """`shards_of(point)` gives a point's shards; `more_forests()`, called once the seeds exist, gives
    further forests (directory, shards) whose experts train in phase 2 with the points' (c-BTM's).
    Returns {point: its dense_tuned run's LR} for the points that have one (scoring's `tuned_lr`)."""
    plans = {p: point_plan(cfg, base, p, steps_1x, lrs) for p in points}
    for p, (plan, _) in plans.items():  # said once, here, with the study's way out: not by each job
        if (root / p.tag / "forest.json").is_file():
            check_plan(Forest.load(root / p.tag), plan, elsewhere="another --out")
    seq = base.train.seq_len
    dense_jobs, runs = [], []
    for p, (plan, c) in plans.items():
        where, shards = root / p.tag, shards_of(p)
        if p.dense or p.forest:  # a forest-only point trains its seed alone (its dense run is another's)
            path, label = str(Path(shards.root).resolve()), f"{p.tag}/{'dense' if p.dense else 'seed'}"
            job = DenseRunJob(
                str(where), path, c.to_dict(), asdict(plan), threads, label, seed_only=not p.dense
            )
            dense_jobs.append(job)
            last = plan.total_steps if p.dense else plan.seed_steps
            runs.append((label, where / "runs" / "dense", 0, last, plan.batch_size * seq))
    with Progress(runs, log, every) as prog:
        log(f"      phase 1: {len(dense_jobs)} seed (+ dense) runs")
        jobs = [as_dict(j) for j in dense_jobs]
        in_process_if_done(executor, jobs).map(
            run_dense_run,
            jobs,
            [j.label for j in dense_jobs],
            [j.run_dir() / "job.log" for j in dense_jobs],
        )
        log(prog.line())
    tuned = [
        (p, lr) for p, (_, c) in plans.items() if (lr := continue_lr(cfg, p, lrs, c.optim.lr)) is not None
    ]
    for p, _ in tuned:  # a finished run from an older seed state is refused, not scored as this one's
        check_same_seed(root / p.tag, root / p.tag / "seed_state", DENSE_TUNED_RUN)
    for p in set(plans) - {p for p, _ in tuned}:  # no continuation asked for now: an old mark is not news
        (root / p.tag / "runs" / DENSE_TUNED_RUN / DIVERGED).unlink(missing_ok=True)
    if tuned:  # each dense run's second half again at its own LR: the dense_tuned arm
        jobs = [
            DenseContinueJob(
                str(root / p.tag),
                str(root / p.tag / "runs" / "dense" / "run_config.json"),
                str(root / p.tag / "seed_state"),
                lr,
                threads,
                shards=str(Path(shards_of(p).root).resolve()),
                run=DENSE_TUNED_RUN,
            )
            for p, lr in tuned
        ]
        labels = [f"{p.tag}/{DENSE_TUNED_RUN} at LR {lr:g}" for p, lr in tuned]
        for j, label in zip(jobs, labels, strict=True):
            mark = j.run_dir() / DIVERGED
            if mark.is_file() and (was := read_json(mark).get("job")) != label:
                raise UserError(
                    f"{j.run_dir()}: {was} diverged; the study now asks for {label}: delete that folder "
                    "to train it at this LR"
                )
        runs = [
            (
                f"{p.tag}/{DENSE_TUNED_RUN}",
                j.run_dir(),
                plans[p][0].seed_steps,
                plans[p][0].total_steps,
                plans[p][0].batch_size * seq,
            )
            for (p, _), j in zip(tuned, jobs, strict=True)
        ]
        with Progress(runs, log, every) as prog:
            log(f"      phase 1b: {len(jobs)} dense runs' second half at its own LR (arm dense_tuned)")
            # a continuation that diverges (a too-high LR) is marked so, not fatal: that point's
            # dense_tuned is then its dense run, the grid's fallback (study/score.py)
            run_points(
                executor,
                run_dense_continue,
                [as_dict(j) for j in jobs],
                labels,
                [j.run_dir() / "job.log" for j in jobs],
                [j.run_dir() for j in jobs],
            )
            log(prog.line())
        for label, j in zip(labels, jobs, strict=True):
            if (j.run_dir() / DIVERGED).is_file():
                log(f"      {label} diverged: that point's dense_tuned is its dense run (the run's own LR)")
    forests = [(root / p.tag, shards_of(p)) for p in points if p.forest]
    forests += more_forests() if more_forests else []
    expert_jobs, runs = [], []
    for where, shards in forests:
        plan = Plan(**Forest.load(where).data["plan"])
        for d in plan_domains(plan, shards):
            expert_jobs.append(ExpertJob(str(where), str(Path(shards.root).resolve()), d, threads=threads))
            runs.append(
                (
                    f"{where.name}/{d}",
                    where / "runs" / d,
                    plan.seed_steps,
                    plan.total_steps,
                    plan.expert_batch_size * seq,
                )
            )
    with Progress(runs, log, every) as prog:
        log(f"      phase 2: {len(expert_jobs)} experts")
        jobs = [as_dict(j) for j in expert_jobs]
        in_process_if_done(executor, jobs).map(
            run_job,
            jobs,
            [f"{Path(j.forest).name}/{j.domain}" for j in expert_jobs],
            [j.run_dir() / "job.log" for j in expert_jobs],
        )
        log(prog.line())
    return dict(tuned)


def record(p: Point, arm: str, where: Path, scores: dict, **extra) -> dict:
    """One trained arm of a point: what study.json lists and the fits read."""
    return {
        "axis": p.axis,
        "arm": arm,
        "budget": p.budget,
        "seed": p.seed,
        "seed_share": p.seed_share,
        "n_domains": len(p.domains),
        "domains": list(p.domains),
        "data_fraction": p.data_fraction,
        "dir": str(where),
        **extra,
        **scores,
    }


def records(points: list[Point], root: Path, scores: dict[str, dict]) -> list[dict]:
    return [record(p, arm, root / p.tag, s) for p in points for arm, s in scores[p.tag].items()]


def seed_position(runs_dir: Path, cfg: StudyConfig, steps_1x: int, vocab_size: int) -> dict | None:
    """Where the 1x forest's seed stops on the dense loss curve, from the valid losses the runs logged.

    The seed is the 1x dense run's prefix (same schedule), so its curve is that run's. "Past the steep
    part" is judged on a log scale of steps: the valid loss it lost over its last doubling of steps,
    against what the largest dense run lost over its own last doubling, and the share of the fall from
    the uniform loss ln(vocab) to the largest run's final loss that the seed made. None when a curve is
    missing (valid losses switched off)."""

    def curve(tag: str) -> dict[int, float]:
        f = runs_dir / tag / "runs" / "dense" / "valid.jsonl"
        if not f.is_file():
            return {}
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        return {int(r["step"]): float(r["valid_loss"]) for r in rows}

    s0, big = cfg.seeds[0], max(cfg.dense_budgets)
    one, last = curve(f"b1-s{s0}"), curve(f"b{big:g}-s{s0}")
    seed = max(1, min(steps_1x - 1, round(steps_1x * cfg.seed_share)))
    n = round(steps_1x * big)
    if not (one and last) or seed not in one or n not in last:
        return None
    half = min(one, key=lambda s: abs(s - seed / 2))
    lhalf = min(last, key=lambda s: abs(s - n / 2))
    if half >= seed or lhalf >= n:  # valid losses too sparse to see a doubling
        return None
    uniform = math.log(vocab_size)
    return {
        "seed_steps": seed,
        "seed_valid_loss": one[seed],
        "seed_last_doubling_drop": (one[half] - one[seed]) / math.log2(seed / half),
        "largest_run_steps": n,
        "largest_run_valid_loss": last[n],
        "largest_last_doubling_drop": (last[lhalf] - last[n]) / math.log2(n / lhalf),
        "uniform_loss": uniform,
        "share_of_fall": (uniform - one[seed]) / (uniform - last[n]),
    }
