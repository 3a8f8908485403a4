"""`elmforest quickstart` and `elmforest sweep`: each verb is its signature (see utils/argtypes.py); the
work is in elmforest.quickstart and elmforest.launch.sweep."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import typer

from elmforest.config import PRIOR_BATCHES, UNKEPT
from elmforest.train.cli import (
    CONFIG_KEYS,
    DEFAULT_TRAIN_ARGS,
    NoProgress,
    Overrides,
    TrainArgs,
)
from elmforest.utils.argtypes import (
    flag,
    nonneg_float,
    nonneg_int,
    open_fraction,
    opt,
    positive_float,
    positive_floats,
    positive_int,
    verb,
)
from elmforest.utils.typed import split_list


def _grid(text: str | None, flag: str) -> list[float] | None:
    """A comma-separated LR grid (one option value, not a repeated option)."""
    if text is None:
        return None
    try:
        return positive_floats(text)
    except typer.BadParameter as e:
        raise typer.BadParameter(e.message, param_hint=flag) from None


def register(app: typer.Typer) -> None:
    verb(app, epilog=CONFIG_KEYS)(quickstart)
    verb(app, epilog=CONFIG_KEYS)(sweep)


def quickstart(
    out: Annotated[
        str | None,
        opt(
            "output directory, resumed when it exists (default quickstart; quickstart-xelm for X-ELM)",
            metavar="DIR",
        ),
    ] = None,
    preset: Annotated[
        str, opt("model + training preset (see `elmforest presets`)", metavar="NAME")
    ] = "cpu-small",
    domains: Annotated[
        str | None,
        opt(
            "comma-separated subset of the demo domains or of --data's (in a new --out, the others shape neither the tokenizer nor the shards; quote a name holding a comma: \"'a,b',c\")",
            metavar="A,B,...",
        ),
    ] = None,
    data: Annotated[
        str | None,
        opt(
            "your corpus instead of the demo one (JSONL / Parquet / a folder of domains; docs/data-formats.md): "
            "the same comparison on your data (out-of-domain rows only from --ood)",
            metavar="PATH",
        ),
    ] = None,
    overrides: Overrides = None,
    split: Annotated[
        Literal["domains", "random", "clusters"],
        opt("random adds the ablation (experts on random splits); clusters adds c-BTM"),
    ] = "domains",
    eval_bytes: Annotated[
        int | None,
        opt(
            "test text per domain: the first whole documents within this many bytes (same for every model; "
            "default 64000, 32000 per language for X-ELM)",
            positive_int,
        ),
    ] = None,
    ood: Annotated[
        list[str] | None,
        opt(
            "add an out-of-domain set (JSONL / Parquet / folder of .txt; repeatable) to the demo's own",
            metavar="PATH",
        ),
    ] = None,
    expert_lr: Annotated[
        float | None, opt("peak LR of the expert phase (default: the preset's swept one)", positive_float)
    ] = None,
    dense_continue_lr: Annotated[
        float | None,
        opt(
            "peak LR of the dense run's second half, row dense_tuned (default: the preset's swept one, else "
            "the expert LR; no such row when it equals the dense LR; sweep's continuation arm finds it)",
            positive_float,
        ),
    ] = None,
    workers: Annotated[
        int | None,
        opt(
            "train this many experts (and the dense run) at a time (default: 2 on a CPU of 2+ cores)",
            positive_int,
        ),
    ] = None,
    prior_batches: Annotated[
        int | None,
        opt(
            f"valid batches for each cached prior, or all windows (default {PRIOR_BATCHES}; 5 for X-ELM)",
            positive_int,
        ),
    ] = None,
    clusters: Annotated[
        int | None, opt("number of clusters for --split clusters (default 8)", positive_int)
    ] = None,
    no_moe: Annotated[bool, flag("--no-moe", "skip merging the experts into one MoE model")] = False,
    moe_router_steps: Annotated[
        int,
        opt("also train the MoE's router alone for this many steps (adds moe_router_trained)", nonneg_int),
    ] = 0,
    moe_finetune_steps: Annotated[
        int | None,
        opt(
            "BTX: fine-tune the whole MoE on the mix for this many steps (row moe_btx; 0 skips it; "
            "default 64)",
            nonneg_int,
        ),
    ] = None,
    corpus: Annotated[
        Literal["demo", "multilingual"],
        opt(
            "demo: BTM on the demo corpus; multilingual: X-ELM (language-group experts, k = 2, 4, 8, a "
            "language added later; docs/xelm.md)"
        ),
    ] = "demo",
    languages: Annotated[
        str | None,
        opt("--corpus multilingual: the first round's languages (ISO 639-3)", metavar="A,B,..."),
    ] = None,
    new_language: Annotated[
        str | None,
        opt("--corpus multilingual: the language added later ('none' skips it; default por)", metavar="CODE"),
    ] = None,
    k: Annotated[
        str | None,
        opt("--corpus multilingual: numbers of language groups (default 2,4,8)", metavar="K,K,..."),
    ] = None,
    no_progress: NoProgress = False,
) -> None:
    """BTM on the demo corpus vs a compute-matched dense LM, per-domain BPB (X-ELM: --corpus multilingual)."""
    if corpus == "multilingual":
        demo_only = {
            "--domains": domains,
            "--data": data,
            "--split": split != "domains",
            "--ood": ood,
            "--expert-lr": expert_lr,
            "--dense-continue-lr": dense_continue_lr,
            "--no-moe": no_moe,
            "--moe-router-steps": moe_router_steps,
            "--clusters": clusters is not None,  # given at all, even at the demo's default
            "--moe-finetune-steps": moe_finetune_steps is not None,
        }
        bad = [f for f, v in demo_only.items() if v]
        if bad:
            raise typer.BadParameter(
                f"{', '.join(bad)} apply to the demo corpus only, not --corpus multilingual"
            )
        from elmforest.xelm.quickstart import quickstart_xelm

        quickstart_xelm(
            out or "quickstart-xelm",
            preset=preset,
            languages=split_list(languages, "--languages"),
            new_language=_new_language(new_language),
            ks=_ks(k),
            overrides=overrides or [],
            progress=not no_progress,
            eval_bytes=eval_bytes or 32_000,
            prior_batches=prior_batches or 5,
            workers=workers,
        )
        return
    given = [
        f
        for f, v in (("--languages", languages), ("--new-language", new_language), ("--k", k))
        if v is not None  # given at all, even empty
    ]
    if given:
        raise typer.BadParameter(f"{', '.join(given)} need(s) --corpus multilingual")
    unused = [  # said, not silently dropped
        f"{flag} (it needs {need})"
        for flag, v, need in (
            ("--moe-router-steps", no_moe and moe_router_steps, "the MoE: drop --no-moe"),
            ("--moe-finetune-steps", no_moe and moe_finetune_steps, "the MoE: drop --no-moe"),
            ("--clusters", clusters is not None and split != "clusters", "--split clusters"),
        )
        if v
    ]
    if unused:
        raise typer.BadParameter(f"{'; '.join(unused)} would not be used")
    from elmforest.quickstart import quickstart as run

    run(
        out or "quickstart",
        preset=preset,
        domains=split_list(domains, "--domains"),
        overrides=overrides or [],
        progress=not no_progress,
        corpus=data,
        split=split,
        eval_bytes=eval_bytes or 64_000,
        ood=ood or [],
        expert_lr=expert_lr,
        dense_continue_lr=dense_continue_lr,
        workers=workers,
        prior_batches=prior_batches or PRIOR_BATCHES,
        clusters=8 if clusters is None else clusters,
        moe=not no_moe,
        moe_router_steps=moe_router_steps,
        moe_finetune_steps=64 if moe_finetune_steps is None else moe_finetune_steps,
    )


def _new_language(code: str | None) -> str | None:
    from elmforest.xelm.quickstart import NEW_LANGUAGE

    if code is not None and not code.strip():  # it trained the whole first round, then failed on ""
        raise typer.BadParameter("--new-language needs a language code, or 'none' for no second round")
    return NEW_LANGUAGE if code is None else (None if code.lower() == "none" else code)


def _ks(k: str | None) -> list[int]:
    from elmforest.xelm.quickstart import KS

    items = split_list(k, "--k")  # (a UserError: not the ValueError below)
    try:
        ks = [int(x) for x in items] if items is not None else list(KS)
    except ValueError:
        raise typer.BadParameter(f"--k takes whole numbers, got {k!r}") from None
    if any(x < 1 for x in ks):
        raise typer.BadParameter(f"--k takes positive numbers, got {k!r}")
    return ks


def sweep(
    shards: Annotated[str, opt("shards directory (train and valid splits)", metavar="DIR")],
    out: Annotated[str, opt("sweep directory; an existing one is resumed", metavar="DIR")],
    arm: Annotated[
        Literal["dense", "experts", "continue", "both", "all"],
        opt(
            "which arm(s) to tune: continue = the best dense run's second half, continued from its seed at "
            "each LR; both = dense and experts; all = the three",
        ),
    ] = "all",
    lrs: Annotated[
        str | None,
        opt(
            "comma-separated dense LRs (default: 5 points, x2 apart, around the preset's optim.lr)",
            metavar="X,X,...",
        ),
    ] = None,
    expert_lrs: Annotated[
        str | None,
        opt(
            "comma-separated expert LRs (default: 5 points, x2 apart, around the seed's LR)",
            metavar="X,X,...",
        ),
    ] = None,
    continue_lrs: Annotated[
        str | None,
        opt(
            "comma-separated LRs of the dense run's second half (default: the expert LRs)", metavar="X,X,..."
        ),
    ] = None,
    dense_lr: Annotated[
        float | None,
        opt("--arm experts/continue: the LR of the dense run the seed comes from", positive_float),
    ] = None,
    seed_share: Annotated[
        float, opt("share of the dense run's steps that trains the seed", open_fraction)
    ] = 0.5,
    executor: Annotated[Literal["local", "ray"], opt("where the jobs run")] = "local",
    address: Annotated[
        str | None, opt("Ray cluster address (default: start a local Ray instance)", metavar="ADDR")
    ] = None,
    cpus_per_job: Annotated[float | None, opt("Ray: CPUs per job (default 1)", positive_float)] = None,
    gpus_per_job: Annotated[float, opt("Ray: GPUs per job", nonneg_float)] = 0.0,
    max_retries: Annotated[int, opt("retries of a job whose worker died", nonneg_int)] = 3,
    workers: Annotated[
        int,
        opt(
            "local executor: run this many jobs at a time in worker processes (each on cores/workers threads; "
            "on a CPU, 2 single-threaded jobs of a small model beat one job on 2 threads)",
            positive_int,
        ),
    ] = 1,
    groups: Annotated[
        str | None,
        opt(
            'comma-separated grouping files (elmforest cluster languages: {"groups": {NAME: [DOMAIN, '
            "...]}}): X-ELM's expert arm, for each file one expert per group trained on its domains mixed, "
            "each domain scored by its group's expert; the dense arm mixes the groups' domains",
            metavar="FILE,FILE,...",
        ),
    ] = None,
    eval_bytes: Annotated[
        int | None,
        opt("score on the first N bytes of each domain's valid split (default: all of it)", positive_int),
    ] = None,
    json: Annotated[str | None, opt("also write the result here", metavar="FILE")] = None,
    train_args: TrainArgs = DEFAULT_TRAIN_ARGS,
    no_progress: NoProgress = False,
) -> None:
    """Tune the learning rate of each arm (dense run, expert phase, dense run's second half) on the valid split."""
    from elmforest.launch.executor import job_threads, make_executor
    from elmforest.launch.groupings import load_groupings
    from elmforest.launch.sweep import format_sweep
    from elmforest.launch.sweep import sweep as run
    from elmforest.utils.io import write_json_atomic

    grid, expert_grid = _grid(lrs, "--lrs"), _grid(expert_lrs, "--expert-lrs")  # refused before any work
    continue_grid = _grid(continue_lrs, "--continue-lrs")
    from elmforest.data.shards import Shards

    paths = split_list(groups, "--groups")
    held = set(Shards(shards).domains) if paths else set()
    groupings = load_groupings(paths, held) if paths else None
    # finished runs keep no checkpoints (nothing reads them; --set train.keep_checkpoints=N keeps them)
    run_cfg = dataclasses.replace(train_args, overrides=[UNKEPT, *train_args.overrides]).run_config(shards)
    ex = make_executor(executor, address, cpus_per_job, gpus_per_job, max_retries, workers)
    res = run(
        shards,
        out,
        run_cfg,
        arm=arm,
        lrs=grid,
        expert_lrs=expert_grid,
        continue_lrs=continue_grid,
        dense_lr=dense_lr,
        seed_share=seed_share,
        executor=ex,
        threads=job_threads(executor, cpus_per_job, workers),
        groups=groupings,
        max_bytes=eval_bytes,
    )
    print(format_sweep(res))
    if json:
        write_json_atomic(json, res)
