"""`elmforest study CONFIG`: the forest's compute multiplier on the user's corpus and budget.

data (prepared once) -> every point's seed and dense run -> every forest point's experts -> scores on
the same bytes -> fits, multiplier with bootstrap intervals, the axes -> study.json, fits.json,
report.md and plots. A rerun skips what is done and resumes what was cut; a rerun with a config that
would change runs already trained (another preset, steps, LR, seeds' share, domains) is refused,
naming the fields, while budgets, seeds and axes may be added.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from pathlib import Path

from elmforest.config import UNKEPT, apply_overrides
from elmforest.launch.executor import LocalExecutor, job_threads, make_executor
from elmforest.launch.jobs import driver_log
from elmforest.launch.prepare import prepare_data
from elmforest.model.presets import get_preset, preset_run_config
from elmforest.study.analysis import analyse
from elmforest.study.cbtm_arm import cbtm_data, cbtm_points, cbtm_seeds, check_cbtm_plans, fraction_shards
from elmforest.study.checks import check_runs
from elmforest.study.config import StudyConfig, load_study_config
from elmforest.study.lrs import budget_lrs, learning_rates, sweep_matches
from elmforest.study.report import write_report
from elmforest.study.run import (
    check_budget_steps,
    plan_batch,
    plan_points,
    record,
    records,
    seed_position,
    train_points,
)
from elmforest.study.score import score_all, score_job, scored_text
from elmforest.train.tracking import require_trackers
from elmforest.utils.errors import UserError
from elmforest.utils.io import held_lock, read_json, write_json_atomic
from elmforest.utils.typed import from_dict

# the fields that shape runs already trained: changing them in an existing study is refused (not
# dense_continue_lr: only the dense_tuned runs change, each refused by name with "delete it", so a new
# LR for that arm, after one diverged say, keeps every other run)
IDENTITY = (
    "preset",
    "overrides",
    "corpus",
    "domains",
    "steps",
    "seed_share",
    "dense_lr",
    "expert_lr",
    "sweep",
    "lr_grid",
    "expert_lr_grid",
)


def strict_json(obj):
    """fits.json is strict JSON: an interval the data cannot bound ends at "inf" (a string), not Infinity."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


def _same_overrides(preset: str, a, b) -> bool:
    """Whether two override lists make the same runs (another order, a key repeated, an operational
    field such as train.keep_checkpoints, which a run takes at any time): compared by applying them,
    since a key given twice depends on the order."""
    from elmforest.train.runcheck import run_identity

    if list(a or ()) == list(b or ()):
        return True
    try:
        made = [
            run_identity(apply_overrides(preset_run_config(preset), list(x or ())).to_dict()) for x in (a, b)
        ]
    except (UserError, ValueError):
        return False
    return made[0] == made[1]


def _where(corpus):
    return str(Path(corpus).resolve()) if corpus and Path(corpus).exists() else corpus


def _check_identity(out: Path, cfg: StudyConfig, write: bool = True) -> None:
    """Refuses a config other than the one `out` was started with; `write` records it (done once the
    data and the plan pass their checks: a config refused there, a typo in a domain, must not bind
    `out` to itself)."""
    path = out / "study_config.json"
    if path.is_file():
        saved = read_json(path)
        defaults = StudyConfig()
        old = {k: saved.get(k, getattr(defaults, k)) for k in (*IDENTITY, "seeds")}  # a field added since
        diff = [k for k in IDENTITY if old[k] != getattr(cfg, k)]
        if "corpus" in diff and _where(old["corpus"]) == _where(cfg.corpus):
            diff.remove("corpus")  # the same folder written otherwise (a trailing slash, relative)
        if "overrides" in diff and _same_overrides(cfg.preset, old["overrides"], cfg.overrides):
            diff.remove("overrides")  # the same settings in another order (or one repeated): the same runs
        if cfg.lr_grid and old["seeds"][:1] != cfg.seeds[:1]:
            diff.append("seeds")  # the first seed is the LR sweeps' (study/lrs.py)
        if diff:
            raise UserError(
                f"{out} was started with other {', '.join(diff)} ("
                + "; ".join(f"{k}: {old[k]!r} -> {getattr(cfg, k)!r}" for k in diff)
                + "); the runs there would not match: use another --out"
                + (
                    " (with lr_grid the first seed is the LR sweeps' seed: keep it first)"
                    if "seeds" in diff
                    else ""
                )
            )
    if write:
        write_json_atomic(path, cfg.to_dict())


def _write_fits(out: Path, study: dict, fits: dict, log) -> None:
    write_json_atomic(out / "fits.json", strict_json(fits))
    write_report(out, study, fits)
    for f in fits["findings"]:
        log(f"  - {f['verdict'].upper()}: {f['claim']}: {f['evidence']}")
    if fits.get("caveat"):
        log(f"  caveat: {fits['caveat']}")


PARTIAL = "study.partial.json"  # the runs of a study whose analysis has not finished


def _finished_as(out: Path, cfg: StudyConfig) -> bool:
    """Whether out/study.json is a finished study of this very config (but its `workers`, the local
    executor's: Ray refuses it)."""
    try:
        had = dict(read_json(out / "study.json")["config"], **dict.fromkeys(RESULTLESS))
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return had == strict_json(dict(cfg.to_dict(), **dict.fromkeys(RESULTLESS)))


def reanalyse(out: str | Path, log=print) -> dict:
    """The fits, findings and report again from a finished study's study.json (after a change to the
    analysis, or with other n_boot / ci / seed_pool: `--set` them), without training or scoring anything."""
    out = Path(out)
    if not (out / "study.json").is_file() or "steps_1x" not in read_json(out / "study.json"):
        raise UserError(f"{out}: no finished study (study.json) to analyse again; run the study first")
    study = read_json(out / "study.json")
    if not isinstance(study.get("config"), dict) or not study.get("runs"):
        raise UserError(f"{out}/study.json: no config or no runs to analyse; run the study again")
    cfg = from_dict(StudyConfig, study["config"], where=f" ({out}/study.json)")
    check_runs(study["runs"], cfg, study["steps_1x"], f"{out}/study.json")
    fits = analyse(study["runs"], cfg)
    _write_fits(out, study, fits, log)
    return fits


def run_study(
    source: str | Path,
    out: str | Path,
    overrides: list[str] | tuple = (),
    executor: str = "local",
    address: str | None = None,
    cpus_per_job: float | None = None,
    gpus_per_job: float = 0.0,
    progress: bool = True,
    log=None,
    every: float = 30.0,
    analyse_only: bool = False,
) -> dict:
    """One study at a time in a folder: a second one started beside it would prepare the same data and
    train the same runs, and fail later on their run locks; it is refused at once instead."""
    with contextlib.ExitStack() as stack:
        log = log or driver_log(stack)  # the output it started with, for the whole study
        t0 = time.perf_counter()
        cfg = load_study_config(source, overrides)  # a bad config leaves no folder behind
        if executor != "ray":  # Ray's options given to the local executor: refused, not dropped
            make_executor(executor, address, cpus_per_job, gpus_per_job)
        out = Path(out).resolve()  # absolute: jobs on a Ray cluster run in the worker's directory
        if analyse_only and not (out / "study.json").is_file():
            return {"fits": reanalyse(out, log)}  # which says there is no study there
        out.mkdir(parents=True, exist_ok=True)
        busy = f"{out}: another study is running in this folder; " + (
            "analyse it again once that one has finished"
            if analyse_only
            else "wait for it, or give this one another --out"
        )
        with held_lock(out / ".study.lock", busy):
            if analyse_only:
                return {"fits": _analyse_again(cfg, out, log)}
            return _study(cfg, out, t0, log, executor, address, cpus_per_job, gpus_per_job, progress, every)


ANALYSIS_FIELDS = ("n_boot", "ci", "seed_pool")  # what --analyse-only takes from the config
RESULTLESS = ("workers",)  # jobs at a time: no run, score or fit changes with it
LR_FIELDS = ("dense_lr", "expert_lr", "dense_continue_lr")  # None: the sweep's or the preset's


def _analyse_again(cfg: StudyConfig, out: Path, log) -> dict:
    """--analyse-only: the fits again with this config's n_boot, ci and seed_pool; its other changes are
    named."""
    study = read_json(out / "study.json")
    if study.get("config"):
        changed = sorted(
            k
            for k, v in cfg.to_dict().items()
            if k not in ANALYSIS_FIELDS + RESULTLESS
            and study["config"].get(k, v) != v
            and not (k == "overrides" and _same_overrides(cfg.preset, study["config"][k], v))
            # an older study recorded the LR it resolved (the preset's) in its config
            and not (k in LR_FIELDS and v is None and study["config"][k] == study.get(k))
        )
        if changed:
            log(
                f"note: --analyse-only re-fits the runs in {out} with this config's n_boot, ci and seed_pool only; "
                f"its other changes ({', '.join(changed)}) need a full run"
            )
        study["config"].update({k: getattr(cfg, k) for k in ANALYSIS_FIELDS})
        write_json_atomic(out / "study.json", strict_json(study))
    return reanalyse(out, log)


def _study(
    cfg: StudyConfig,
    out: Path,
    t0: float,
    log,
    executor,
    address,
    cpus_per_job,
    gpus_per_job,
    progress,
    every,
) -> dict:
    _check_identity(out, cfg, write=False)
    steps_1x = cfg.steps_1x()
    check_budget_steps(cfg, steps_1x)  # before the data: it needs none
    preset = get_preset(cfg.preset)
    # a tracker's missing package said once, before the data and any run (the shards are not there yet)
    require_trackers(apply_overrides(preset_run_config(cfg.preset, "."), list(cfg.overrides)).train.trackers)
    ray = None
    if executor == "ray":  # Ray missing, a bad address or resources: said before the data is prepared
        if cfg.workers is not None:  # taken, then dropped without a word
            raise UserError(
                f"workers {cfg.workers} (the study config's) is the local executor's: Ray runs as many jobs at "
                "a time as the CPUs (and GPUs) asked per job allow (--cpus-per-job): remove it from the config"
            )
        ray = make_executor("ray", address, cpus_per_job, gpus_per_job)
        if not _finished_as(out, cfg):  # a finished study's rerun reads what it has: Ray starts only if a
            ray.prepare()  # job must run (its map prepares it; where one must, a bad address is said then)
    data = prepare_data(
        out / "data",
        preset.vocab_size,
        cfg.domains,
        cfg.corpus,
        cfg.ood,
        progress,
        log,
        unused=not (out / "runs").exists(),  # nothing trained from its tokenizer yet
    )
    base = apply_overrides(  # finished runs keep no checkpoints unless the study's overrides say so
        preset_run_config(cfg.preset, str(Path(data.shards.root).resolve())), [UNKEPT, *cfg.overrides]
    )
    if len(data.names) < 2:
        raise UserError(
            f"{cfg.corpus or 'the demo corpus'}: {len(data.names)} domain(s) with training documents "
            f"({', '.join(data.names) or 'none'}); a forest needs >= 2 to compare with a dense LM"
        )
    points = plan_points(cfg, data.names)
    batch = plan_batch(cfg, base, data.names)  # the preset's, rounded to a multiple of the domains
    base.train.batch_size = batch  # every point's: a domain-count point's plan keeps it (it divides)
    if cfg.sweep and not cfg.lr_grid:  # before the c-BTM data and any run (lr_grid sweeps its own)
        sweep_matches(cfg.sweep, data.names, steps_1x, batch, str(Path(data.shards.root).resolve()))
    _check_identity(out, cfg)
    if ray is not None:
        ex, threads = ray, job_threads("ray", cpus_per_job, 1)
    else:
        from elmforest.launch.executor import local_workers

        workers, _ = local_workers(base.train.device, cfg.workers)  # "auto" on a GPU: one at a time
        ex, threads = LocalExecutor(workers), job_threads("local", 1.0, workers)
    root = str(Path(data.shards.root).resolve())
    shards_of, cbtm_forests, cbtm_shards = cbtm_data(cfg, data, out / "data", progress, log)
    subsamples = {f: str(Path(sh.root).resolve()) for f, sh in fraction_shards(shards_of, cfg).items()}
    lrs = budget_lrs(cfg, base, data.names, root, out, steps_1x, ex, threads, log, subsamples, cbtm_shards)
    dense_lr, expert_lr, continue_lr, lr_source, tuned = learning_rates(cfg, base, lrs)
    given = cfg.to_dict()  # as written: --analyse-only compares with it (the LRs chosen are below)
    base.optim.lr = dense_lr
    cfg.expert_lr, cfg.dense_continue_lr = expert_lr, continue_lr
    log(
        f"study: {len(points)} points ({sum(p.dense for p in points)} dense runs, "
        f"{sum(p.forest for p in points)} forests of up to {len(data.names)} experts); 1x = {steps_1x} steps; "
        f"dense LR {dense_lr:g}, expert LR {expert_lr:g}"
        + (
            f"; no dense_tuned arm: the second half's LR {continue_lr:g} is the dense runs' own"
            if f"{continue_lr:.3g}" == f"{dense_lr:.3g}" and not lrs  # nothing trained (run.continue_lr)
            else f", the dense runs' second half at {continue_lr:g} too (arm dense_tuned)"
            if tuned
            else f" (the dense runs' second half has no LR of its own: the expert LR {continue_lr:g} stands "
            "in, arm dense_tuned; give dense_continue_lr or lr_grid to tune it)"
        )
        + f" ({lr_source})"
    )
    runs_dir = out / "runs"
    check_cbtm_plans(cfg, cbtm_forests, cbtm_shards, runs_dir, expert_lr, lrs)
    more = functools.partial(cbtm_seeds, cfg, cbtm_forests, cbtm_shards, runs_dir, expert_lr, lrs)
    tuned_lrs = train_points(
        points, runs_dir, shards_of, cfg, base, steps_1x, ex, threads, log, every, more, lrs
    )
    seq = base.train.seq_len
    cb = cbtm_points(cfg, cbtm_forests, data)
    jobs = [
        score_job(
            p, runs_dir / p.tag, shards_of(p), data.ood_shards, cfg, seq, None, threads, tuned_lrs.get(p)
        )
        for p in points
    ]
    jobs += [
        score_job(p, runs_dir / c.tag, shards_of(p), data.ood_shards, cfg, seq, r, threads) for p, c, r in cb
    ]
    log(f"      scoring {len(jobs)} points on the same bytes")
    scores = score_all(jobs, ex)
    recs = records(points, runs_dir, dict(zip([p.tag for p in points], scores[: len(points)], strict=True)))
    recs += [
        record(p, "cbtm", runs_dir / c.tag, s["btm"], k=c.k, balance=c.balance, routing=r)
        for (p, c, r), s in zip(cb, scores[len(points) :], strict=True)
    ]
    trained = ("lost_on_valid", "diverged")  # a continuation trained, not chosen: kept, and said
    if not tuned and all(
        r.get("same_as") and not any(k in r for k in trained) for r in recs if r["arm"] == "dense_tuned"
    ):
        recs = [r for r in recs if r["arm"] != "dense_tuned"]  # nothing tuned, nothing trained: no such arm
        continue_lr = None
    # the runs as scored, kept if the analysis fails; beside study.json, not over it: a study extended
    # (more seeds) and killed while it fits kept neither its last finished record nor a new one
    write_json_atomic(out / PARTIAL, strict_json({"config": given, "runs": recs}))
    fits = analyse(recs, cfg)
    first = read_json(runs_dir / points[0].tag / "runs" / "dense" / "summary.json")
    one_x = [r for r in recs if r["axis"] == "main" and r["budget"] == 1.0 and r["arm"] == "dense"]
    tokens_1x = one_x[0]["tokens"] if one_x else steps_1x * batch * base.train.grad_accum * base.train.seq_len
    study = {
        "config": given,
        "steps_1x": steps_1x,
        "batch_size": batch,
        "seq_len": base.train.seq_len,
        "dense_lr": dense_lr,
        "expert_lr": expert_lr,
        "dense_continue_lr": continue_lr,
        "lr_source": lr_source,
        "lrs_by_budget": {(b if isinstance(b, str) else f"{b:g}"): r for b, r in lrs.items()},
        "parameters": first["params"],
        "tokens_per_parameter_1x": tokens_1x / first["params"],
        "tokens_per_expert_1x": int(tokens_1x * (1 - cfg.seed_share) / len(data.names)),
        "seed_position": seed_position(runs_dir, cfg, steps_1x, data.shards.vocab_size),
        "domains": data.names,
        "ood_domains": sorted(data.ood_shards.domains) if data.ood_shards is not None else [],
        "scored": {
            "in_domain": scored_text(data.shards, data.names, cfg.eval_bytes),
            "ood": scored_text(data.ood_shards, data.ood_shards.domains, cfg.eval_bytes)
            if data.ood_shards is not None
            else {},
        },
        "runs": recs,
        "seconds": time.perf_counter() - t0,
    }
    write_json_atomic(out / "study.json", strict_json(study))
    _write_fits(out, study, fits, log)
    (out / PARTIAL).unlink(missing_ok=True)
    log(f"study done in {study['seconds'] / 60:.1f} min: {out / 'report.md'}")
    return {"study": study, "fits": fits}
