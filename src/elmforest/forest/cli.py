"""`elmforest forest ...` verbs, `eval --forest` and `generate`: argument parsing only."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from elmforest.utils.argtypes import (
    finite_float,
    nonneg_float,
    nonneg_int,
    open_fraction,
    positive_float,
    positive_int,
    unit_fraction,
)
from elmforest.utils.errors import UserError
from elmforest.utils.io import split_list


def add_forest_parsers(sub, add_common_train) -> None:
    fo = sub.add_parser("forest", help="create, grow and inspect an ELMforest").add_subparsers(
        dest="forest_cmd", required=True
    )

    def forest_arg(p):
        p.add_argument("--forest", required=True, help="forest directory")

    p = fo.add_parser("init", help="create an empty forest")
    forest_arg(p)
    p.add_argument("--clusterer", help="c-BTM: the clusterer whose clusters the experts are trained on")
    for verb, help_ in [("list", "one line per expert"), ("show", "the whole manifest (JSON)")]:
        forest_arg(fo.add_parser(verb, help=help_))
    p = fo.add_parser("add", help="register an expert trained elsewhere (an HF checkpoint or run directory)")
    forest_arg(p)
    p.add_argument("--expert", required=True, help="HF checkpoint dir or elmforest run dir")
    p.add_argument(
        "--domain", required=True, action="append", help="domain(s) it was trained on (repeatable)"
    )
    p.add_argument("--name", help="expert name (default: the first domain)")
    p = fo.add_parser(
        "remove",
        help="opt an expert out: delete its weights, run and merged copies, verified; re-run to finish an "
        "interrupted removal",
    )
    forest_arg(p)
    p.add_argument("--expert", required=True, help="expert name")
    p = fo.add_parser(
        "fsck",
        help="check a forest and repair what is safe: finish pending removals, delete temporary files of dead "
        "processes, verify each expert's weights against their recorded checksums",
    )
    forest_arg(p)
    p.add_argument("--quick", action="store_true", help="check sizes only, not checksums")

    p = fo.add_parser("seed", help="train the seed: the first share of the dense run on all domains mixed")
    forest_arg(p)
    p.add_argument("--shards", required=True)
    p.add_argument(
        "--experts",
        type=positive_int,
        help="how many experts will share the budget (default: one per domain)",
    )
    p.add_argument(
        "--seed-share", type=open_fraction, default=0.5, help="share of the dense run's steps (BTM: 0.5)"
    )
    p.add_argument(
        "--from-checkpoint",
        help="take this local HF checkpoint as the seed itself, trained no further (its experts then train "
        "with its own elmforest_run.json, else the preset); --init-from instead starts the seed's dense run "
        "from its weights",
    )
    _expert_lr_arg(p)
    add_common_train(p)
    p = fo.add_parser("expert", help="branch, train one domain expert alone, and merge it into the forest")
    forest_arg(p)
    p.add_argument("--shards", required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--name")
    p.add_argument(
        "--branch", default="seed", help="seed | expert:NAME | mixture (posterior-weighted average)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="train an expert that was opted out again (its owner's call only)",
    )
    add_common_train(p)
    p = fo.add_parser(
        "dense", help="continue the seed's run to the full budget: the compute-matched dense LM"
    )
    forest_arg(p)
    p.add_argument("--shards", required=True)
    p.add_argument("--no-progress", action="store_true")
    p = fo.add_parser("train", help="all phases: seed, one expert per domain, dense baseline")
    forest_arg(p)
    p.add_argument("--shards", required=True)
    p.add_argument("--seed-share", type=open_fraction, default=0.5)
    p.add_argument("--no-dense", action="store_true", help="skip the compute-matched dense baseline")
    p.add_argument("--clusterer", help="c-BTM: the clusterer that made the shards' cluster domains")
    p.add_argument(
        "--executor",
        default="local",
        choices=["local", "ray"],
        help="local: experts one after another here; ray: each expert a Ray task",
    )
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--cpus-per-expert", type=positive_float, default=1.0)
    p.add_argument("--gpus-per-expert", type=nonneg_float, default=0.0)
    p.add_argument(
        "--procs-per-expert",
        type=positive_int,
        default=1,
        help="data-parallel processes per expert (torchrun: one per GPU, or gloo on CPU)",
    )
    p.add_argument("--max-retries", type=nonneg_int, default=3, help="retries of an expert whose worker died")
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="local executor: train this many experts (and the dense run) at a time in worker processes, "
        "each on cores/workers threads",
    )
    p.add_argument(
        "--progress-every", type=positive_float, default=10.0, help="seconds between progress lines"
    )
    _expert_lr_arg(p)
    add_common_train(p)
    p = fo.add_parser("average", help="average the experts' parameters into one HF checkpoint")
    forest_arg(p)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--weights", default="uniform", help="uniform | posterior (needs --data and --domain) | NAME=W,NAME=W"
    )
    p.add_argument("--data", help="shards or raw data holding the target domain (for posterior weights)")
    p.add_argument("--domain", help="target domain whose valid split sets the posterior weights")
    p.add_argument("--prior-batches", type=positive_int, default=20)
    p.add_argument(
        "--method",
        default="linear",
        choices=["linear", "task_arithmetic", "ties"],
        help="linear: weighted mean; task_arithmetic / ties: merge the experts' updates relative to the seed",
    )
    p.add_argument(
        "--scale", type=finite_float, default=1.0, help="task_arithmetic / ties: lambda on the merged update"
    )
    p.add_argument("--density", type=unit_fraction, default=0.2, help="ties: fraction of each update kept")

    g = sub.add_parser("generate", help="sample from a forest's ensemble")
    g.add_argument("--forest", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=positive_int, default=100)
    g.add_argument("--temperature", type=nonneg_float, default=1.0, help="0 = greedy")
    g.add_argument("--seed", type=nonneg_int, default=0)
    g.add_argument("--weighting", default="posterior", choices=["posterior", "fixed"])
    g.add_argument("--show-weights", action="store_true", help="print the final mixture weights")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument(
        "--cluster-k", type=positive_int, help="c-BTM: route each step to the top-k clusters of the context"
    )
    g.add_argument(
        "--temperature-routing",
        type=positive_float,
        default=0.1,
        help="c-BTM: T in exp(-distance^2 / T) when routing to clusters (with --cluster-k)",
    )


def _expert_lr_arg(p) -> None:
    p.add_argument(
        "--expert-lr",
        type=positive_float,
        help="peak LR of the expert phase (default: the preset's swept expert LR, else optim.lr)",
    )


def expert_lr(args) -> float | None:
    """--expert-lr, else the preset's recorded expert LR (not for a --config run: it names its own)."""
    if getattr(args, "expert_lr", None) is not None:
        return args.expert_lr
    if getattr(args, "config", None):
        return None
    from elmforest.model.presets import DEFAULT_PRESET, get_preset

    return get_preset(args.preset or DEFAULT_PRESET).expert_lr


def add_forest_eval_args(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("--forest", help="evaluate a forest instead of one model")
    ev.add_argument(
        "--mode",
        default="ensemble",
        choices=["ensemble", "topk", "average", "cluster"],
        help="cluster: c-BTM routing by distance to the forest's cluster centres",
    )
    ev.add_argument(
        "--k",
        type=positive_int,
        default=2,
        help="experts used: --mode topk, the k of the largest prior (or prefix) weights; --mode cluster, "
        "the k nearest clusters",
    )
    ev.add_argument("--prior", default="cached", choices=["cached", "uniform"])
    ev.add_argument(
        "--weighting",
        default="posterior",
        choices=["posterior", "fixed", "demix"],
        help="posterior: Bayes over the whole prefix; fixed: the prior as fixed weights; "
        "demix: the previous token only",
    )
    ev.add_argument("--select", default="prior", help="top-k selection: prior | prefix:W (first W tokens)")
    ev.add_argument(
        "--prior-batches",
        type=positive_int,
        default=20,
        help="valid batches for the cached prior (every valid window when there are fewer)",
    )
    ev.add_argument(
        "--prior-ema",
        type=positive_float,
        help="estimate the cached prior with BTM's (bias-corrected) moving average of per-batch means at "
        "this alpha (BTM: 0.3) instead of the mean over every valid window",
    )
    ev.add_argument(
        "--reset",
        default="document",
        choices=["document", "window"],
        help="document: the posterior and c-BTM routing restart at each document inside a window; "
        "window: carried across documents within a window",
    )
    ev.add_argument("--temperature", type=positive_float, default=0.1, help="c-BTM routing temperature T")
    ev.add_argument("--route", default="sequence", help="c-BTM routing: sequence | segment:W")


def run_forest_eval(args) -> dict:
    from elmforest.forest.evaluate import evaluate_forest

    return evaluate_forest(
        args.forest,
        args.data,
        split=args.split,
        split_spec=args.split_fractions,
        mode=args.mode,
        k=args.k,
        prior=args.prior,
        weighting=args.weighting,
        select=args.select,
        domains=split_list(args.domains),
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_bytes=args.max_bytes,
        prior_batches=args.prior_batches,
        device=args.device,
        precision=args.precision,
        temperature=args.temperature,
        route=args.route,
        reset=args.reset,
        prior_alpha=args.prior_ema,
    )


def dispatch(args, run_config) -> int:
    from elmforest.data.shards import Shards
    from elmforest.forest import btm, commands
    from elmforest.forest.manifest import Forest

    if args.cmd == "generate":
        from elmforest.forest.generate import generate

        g = generate(
            args.forest,
            args.prompt,
            args.max_new_tokens,
            args.temperature,
            args.seed,
            weighting=args.weighting,
            device=args.device,
            cluster_k=args.cluster_k,
            routing_temperature=args.temperature_routing,
        )
        print(args.prompt + g.text)
        if args.show_weights and g.weights:
            print(json.dumps(g.weights[-1], indent=2))
        return 0
    cmd = args.forest_cmd
    if cmd == "init":
        if args.clusterer:  # refuse a bad clusterer before anything is created
            from elmforest.cluster.clusterer import Clusterer

            Clusterer.load(args.clusterer)
        f = Forest.init(args.forest)
        if args.clusterer:
            f.set_clusterer(args.clusterer)
        print(f"created an empty forest in {args.forest}")
        return 0
    forest = (
        Forest.load(args.forest) if cmd not in ("seed", "train") else Forest.init(args.forest, exist_ok=True)
    )
    if cmd == "list":
        print(forest.describe())
    elif cmd == "show":
        print(json.dumps(forest.data, indent=2))
    elif cmd == "add":
        src = Path(args.expert)
        summary = commands.summary_of(src)
        e = forest.add(
            src,
            args.name or args.domain[0],
            args.domain,
            tokens=summary.get("tokens", 0),
            flops=summary.get("flops", 0),
            parents=[{"name": "external", "weight": 1.0}],
        )
        print(f"added expert {e['name']} ({', '.join(e['domains'])})")
    elif cmd == "remove":
        commands.remove(forest, args.expert)
    elif cmd == "fsck":
        return commands.fsck(forest, deep=not args.quick)
    elif cmd == "seed":
        if args.from_checkpoint:
            btm.seed_from_checkpoint(forest, args.from_checkpoint)
        else:
            shards = Shards(args.shards)
            cfg = run_config(args)
            domains = (
                args.experts or cfg.data.domains or [d for d in shards.domains if shards.has(d, "train")]
            )
            plan, base = btm.plan_for(cfg, domains, args.seed_share, expert_lr(args))
            btm.train_seed(forest, shards, base, plan, progress=not args.no_progress)
        print(forest.describe())
    elif cmd == "expert":
        shards = Shards(args.shards)
        seed = forest.data.get("seed")
        base = (
            commands.checkpoint_seed_config(forest, args, run_config)
            if seed and "config" not in seed
            else None
        )
        e = btm.train_expert(
            forest,
            shards,
            args.domain,
            args.name,
            args.branch,
            base=base,
            overrides=args.overrides if base is None else [],
            progress=not args.no_progress,
            force=args.force,
            trust_remote_code=args.trust_remote_code,
        )
        print(
            f"expert {e['name']}: {e['tokens']:,} tokens, {e['flops']:.3e} FLOPs, parents "
            + ", ".join(f"{p['name']}×{p['weight']:.3f}" for p in e["parents"])
        )
    elif cmd == "dense":
        if "plan" not in forest.data:
            raise UserError(f"{args.forest}: no trained seed; the dense baseline continues the seed's run")
        s = btm.train_dense(
            forest,
            Shards(args.shards),
            commands.seed_config(forest),
            btm.Plan(**forest.data["plan"]),
            progress=not args.no_progress,
        )
        print(
            f"dense baseline: {s['tokens']:,} tokens, {s['flops']:.3e} FLOPs -> {args.forest}/runs/dense/model"
        )
    elif cmd == "train":
        shards = Shards(args.shards)
        if args.clusterer:
            forest.set_clusterer(args.clusterer)
        from elmforest.launch.executor import job_threads, make_executor
        from elmforest.launch.forest import train_forest

        if args.procs_per_expert > 1 and args.gpus_per_expert not in (0, args.procs_per_expert):
            raise UserError(
                "--gpus-per-expert must be 0 (CPU, gloo) or equal to --procs-per-expert (one GPU per process)"
            )

        cfg = run_config(args)
        # one domain list (data.domains, else every domain with training data) drives every phase
        domains = cfg.data.domains or [d for d in shards.domains if shards.has(d, "train")]
        plan, base = btm.plan_for(cfg, domains, args.seed_share, expert_lr(args))
        if plan.expert_batch_size % args.procs_per_expert:
            raise UserError(
                f"each expert's batch ({plan.expert_batch_size}) must divide among "
                f"--procs-per-expert {args.procs_per_expert} processes"
            )
        executor = make_executor(
            args.executor,
            args.address,
            args.cpus_per_expert,
            args.gpus_per_expert,
            args.max_retries,
            args.workers,
        )
        threads = job_threads(args.executor, args.cpus_per_expert, args.workers)
        train_forest(
            forest,
            shards,
            base,
            plan,
            executor=executor,
            dense=not args.no_dense,
            threads=threads,
            procs=args.procs_per_expert,
            progress=not args.no_progress,
            monitor_every=args.progress_every,
        )
        print(Forest.load(args.forest).describe())
    elif cmd == "average":
        commands.average(forest, args)
    return 0
