"""`elmforest quickstart` and `elmforest sweep`: argument parsing only (the work is in
elmforest.quickstart and elmforest.launch.sweep)."""

from __future__ import annotations

from elmforest.utils.argtypes import (
    nonneg_float,
    nonneg_int,
    open_fraction,
    positive_float,
    positive_floats,
    positive_int,
)
from elmforest.utils.io import split_list


def add_launch_parsers(sub, add_common_train) -> None:
    qs = sub.add_parser(
        "quickstart", help="BTM on the demo corpus vs a compute-matched dense LM, per-domain BPB"
    )
    qs.add_argument("--out", default="quickstart")
    qs.add_argument("--preset", default="cpu-small")
    qs.add_argument("--domains", help="comma-separated subset of the demo domains")
    qs.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    qs.add_argument(
        "--split",
        default="domains",
        choices=["domains", "random", "clusters"],
        help="random adds the ablation (experts on random splits); clusters adds c-BTM",
    )
    qs.add_argument(
        "--eval-bytes",
        type=positive_int,
        default=64_000,
        help="test text per domain: the first whole documents within this many bytes (same for every model)",
    )
    qs.add_argument(
        "--ood",
        action="append",
        default=[],
        metavar="PATH",
        help="add an out-of-domain set (JSONL / Parquet / folder of .txt; repeatable) to the demo's own",
    )
    qs.add_argument(
        "--expert-lr",
        type=positive_float,
        help="peak LR of the expert phase (default: the preset's swept one)",
    )
    qs.add_argument(
        "--workers",
        type=positive_int,
        help="train this many experts (and the dense run) at a time (default: 2 on a CPU of 2+ cores)",
    )
    qs.add_argument(
        "--prior-batches",
        type=positive_int,
        default=20,
        help="valid batches for each cached prior (or all windows)",
    )
    qs.add_argument(
        "--clusters", type=positive_int, default=8, help="number of clusters for --split clusters"
    )
    qs.add_argument("--no-moe", action="store_true", help="skip merging the experts into one MoE model")
    qs.add_argument(
        "--moe-router-steps",
        type=nonneg_int,
        default=0,
        help="also train the MoE's router alone for this many steps (adds moe_router_trained)",
    )
    qs.add_argument("--no-progress", action="store_true")

    sw = sub.add_parser(
        "sweep", help="tune the learning rate of each arm (dense run, expert phase) on the valid split"
    )
    sw.add_argument("--shards", required=True, help="shards directory (train and valid splits)")
    sw.add_argument("--out", required=True, help="sweep directory; an existing one is resumed")
    sw.add_argument("--arm", default="both", choices=["dense", "experts", "both"])
    sw.add_argument(
        "--lrs",
        type=positive_floats,
        help="comma-separated dense LRs (default: 5 points, x2 apart, around the preset's optim.lr)",
    )
    sw.add_argument(
        "--expert-lrs",
        type=positive_floats,
        help="comma-separated expert LRs (default: 5 points, x2 apart, around the seed's LR)",
    )
    sw.add_argument(
        "--dense-lr", type=positive_float, help="--arm experts: the LR of the dense run the seed comes from"
    )
    sw.add_argument("--seed-share", type=open_fraction, default=0.5)
    sw.add_argument("--executor", default="local", choices=["local", "ray"])
    sw.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    sw.add_argument("--cpus-per-job", type=positive_float, default=1.0)
    sw.add_argument("--gpus-per-job", type=nonneg_float, default=0.0)
    sw.add_argument("--max-retries", type=nonneg_int, default=3)
    sw.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="local executor: run this many jobs at a time in worker processes (each on cores/workers "
        "threads; on a CPU, 2 single-threaded jobs of a small model beat one job on 2 threads)",
    )
    sw.add_argument("--json", help="also write the result here")
    add_common_train(sw)


def dispatch(args, run_config) -> int:
    if args.cmd == "quickstart":
        from elmforest.quickstart import quickstart

        quickstart(
            args.out,
            preset=args.preset,
            domains=split_list(args.domains),
            overrides=args.overrides,
            progress=not args.no_progress,
            split=args.split,
            eval_bytes=args.eval_bytes,
            ood=args.ood,
            expert_lr=args.expert_lr,
            workers=args.workers,
            prior_batches=args.prior_batches,
            clusters=args.clusters,
            moe=not args.no_moe,
            moe_router_steps=args.moe_router_steps,
        )
        return 0
    if args.cmd == "sweep":
        from elmforest.launch.executor import job_threads, make_executor
        from elmforest.launch.sweep import format_sweep, sweep
        from elmforest.utils.io import write_json_atomic

        executor = make_executor(
            args.executor, args.address, args.cpus_per_job, args.gpus_per_job, args.max_retries, args.workers
        )
        threads = job_threads(args.executor, args.cpus_per_job, args.workers)
        res = sweep(
            args.shards,
            args.out,
            run_config(args),
            arm=args.arm,
            lrs=args.lrs,
            expert_lrs=args.expert_lrs,
            dense_lr=args.dense_lr,
            seed_share=args.seed_share,
            executor=executor,
            threads=threads,
        )
        print(format_sweep(res))
        if args.json:
            write_json_atomic(args.json, res)
        return 0
    raise AssertionError(args.cmd)
