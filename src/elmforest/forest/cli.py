"""`elmforest forest ...` verbs and `elmforest generate`: each verb is its signature (see utils/argtypes.py);
the work is in forest/btm.py, forest/commands.py and launch/forest.py. The training verbs are here; those
that train nothing are in forest/manage_cli.py, registered here under the same group."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from elmforest.config import PRIOR_BATCHES
from elmforest.forest.manage_cli import (
    Clusterer,
    ForestDir,
    _load,
    add,
    average,
    fsck,
    generate,
    init,
    list_,
    remove,
    show,
)
from elmforest.train.cli import (
    CONFIG_KEYS,
    DEFAULT_TRAIN_ARGS,
    NoProgress,
    TrainArgs,
)
from elmforest.utils.argtypes import (
    flag,
    group,
    nonneg_float,
    nonneg_int,
    open_fraction,
    opt,
    positive_float,
    positive_int,
    verb,
)
from elmforest.utils.errors import UserError
from elmforest.utils.io import remove_path
from elmforest.utils.proc import first_process
from elmforest.utils.typed import split_list

ShardsDir = Annotated[str, opt("shards directory", metavar="DIR")]
SeedShare = Annotated[
    float, opt("share of the dense run's steps that trains the seed (BTM: 0.5)", open_fraction)
]
ExpertLr = Annotated[
    float | None,
    opt("peak LR of the expert phase (default: the preset's swept expert LR, else optim.lr)", positive_float),
]


def register(app: typer.Typer) -> None:
    fo = group("create, grow and inspect an ELMforest")
    for fn in (init, list_, show, add, remove, fsck):
        verb(fo, fn.__name__.rstrip("_"))(fn)
    for fn in (seed, expert, train):
        verb(fo, epilog=CONFIG_KEYS)(fn)
    verb(fo)(dense)
    verb(fo)(average)
    app.add_typer(fo, name="forest")
    verb(app)(generate)


def with_seed_preset(forest: str, train_args: TrainArgs) -> TrainArgs:
    """No --preset, --config or --init-from on a forest whose seed it trained itself: the seed's preset
    (the options' help: "default cpu-small, or a seed's own"). The default planned another forest, so
    `forest train` run again to resume a `--preset tiny` forest was refused as a changed plan."""
    import dataclasses

    from elmforest.utils.io import read_json

    path = Path(forest) / "forest.json"
    if train_args.preset or train_args.config or train_args.init_from or not path.is_file():
        return train_args
    try:
        preset = read_json(path)["seed"]["config"]["model"]["preset"]
    except (KeyError, TypeError, ValueError, OSError):  # no seed yet, or one from a checkpoint
        return train_args
    return dataclasses.replace(train_args, preset=preset) if preset else train_args


def expert_lr_of(given: float | None, train_args: TrainArgs) -> float | None:
    """--expert-lr, else the preset's recorded expert LR (not for a --config run: it names its own)."""
    if given is not None:
        return given
    if train_args.config:
        return None
    from elmforest.model.presets import DEFAULT_PRESET, get_preset

    return get_preset(train_args.preset or DEFAULT_PRESET).expert_lr


def seed(
    forest: ForestDir,
    shards: ShardsDir,
    experts: Annotated[
        int | None, opt("how many experts will share the budget (default: one per domain)", positive_int)
    ] = None,
    seed_share: SeedShare = 0.5,
    from_checkpoint: Annotated[
        str | None,
        opt(
            "take this local HF checkpoint as the seed itself, trained no further (its experts then train with "
            "its own elmforest_run.json, else the preset); --init-from instead starts the seed's dense run "
            "from its weights",
            metavar="DIR",
        ),
    ] = None,
    expert_lr: ExpertLr = None,
    train_args: TrainArgs = DEFAULT_TRAIN_ARGS,
    no_progress: NoProgress = False,
) -> None:
    """Train the seed: the first share of the dense run on all domains mixed."""
    from elmforest.data.shards import Shards
    from elmforest.forest import btm

    new = not Path(forest).exists()
    if from_checkpoint and (
        unused := [
            name
            for name, given in (
                ("--experts", experts is not None),
                ("--seed-share", seed_share != 0.5),
                ("--expert-lr", expert_lr is not None),
                ("--preset", train_args.preset is not None),
                ("--config", train_args.config is not None),
                ("--init-from", train_args.init_from is not None),
                ("--set", bool(train_args.overrides)),
            )
            if given
        ]
    ):
        raise UserError(  # they were parsed and dropped: the checkpoint is the seed, nothing is planned
            f"{', '.join(unused)}: not used with --from-checkpoint (the checkpoint is the seed, trained no "
            "further; each expert takes its settings from `forest expert`)"
        )
    if not from_checkpoint:  # the config and plan first: one refused leaves no empty forest behind
        sh = Shards(shards)
        train_args = with_seed_preset(forest, train_args)
        cfg = train_args.run_config(shards)
        domains = experts or cfg.data.domains or [d for d in sh.domains if sh.has(d, "train")]
        _check_trainable(sh, domains)
        _note_unscored(sh, domains)
        plan, base = btm.plan_for(cfg, domains, seed_share, expert_lr_of(expert_lr, train_args))
        _note_batch(cfg, plan)
    f = _load(forest, create=True)
    if not from_checkpoint and f.data.get("clusterer") and isinstance(domains, list):
        _check_cluster_domains(str(f.root / f.data["clusterer"]["path"]), domains, shards)  # as `train`
    if from_checkpoint:
        try:
            btm.seed_from_checkpoint(f, from_checkpoint, Shards(shards), train_args.trust_remote_code)
        except Exception:
            if new:  # a refused checkpoint leaves no empty forest behind
                remove_path(f.root)
            raise
    else:
        btm.train_seed(f, sh, base, plan, progress=not no_progress)
    print(f.describe())


def _check_trainable(sh, domains: list[str]) -> None:
    """A domain the shards hold no training documents of was found only when the seed's run started
    (after the forest and its run folder were made), behind a note that it had no valid or test ones."""
    if isinstance(domains, list) and (bad := [d for d in domains if not sh.has(d, "train")]):
        have = [d for d in sh.domains if sh.has(d, "train")]
        raise UserError(
            f"{sh.root} holds no training documents of {', '.join(bad)} (it has {', '.join(have)})"
        )


def _note_unscored(sh, domains: list[str]) -> None:
    """A domain with training documents but no valid or test ones (a handful of documents) still takes
    a full share of the seed's mix and an expert of its own, which no evaluation can score: said."""
    if isinstance(domains, int):  # --experts N: N experts over the mix, not named domains
        return
    bare = sh.unscorable(domains)
    if bare:
        print(
            f"note: {', '.join(bare)}: no valid or no test documents in {sh.root}, yet each takes an equal share "
            "of the seed's mix and an expert that evaluation cannot score (nor a prior be read for); leave "
            "them out with --set 'data.domains=[...]', or build the shards with a larger --valid-frac / --test-frac",
            file=sys.stderr,
        )


def _note_batch(cfg, plan) -> None:
    """The dense batch rounded to a multiple of the experts is another budget than the one asked for
    (16 over 11 domains trains at 11): said, as the sweep and the quickstart say it."""
    if plan.batch_size != cfg.train.batch_size:
        print(
            f"note: dense batch {cfg.train.batch_size} -> {plan.batch_size}, a multiple of the "
            f"{plan.n_experts} experts ({plan.expert_batch_size} sequence(s) each)",
            file=sys.stderr,
        )


def expert(
    forest: ForestDir,
    shards: ShardsDir,
    domain: Annotated[str, opt("the domain this expert trains on", metavar="DOMAIN")],
    name: Annotated[str | None, opt("expert name (default: the domain)", metavar="NAME")] = None,
    branch: Annotated[
        str,
        opt(
            "seed | expert:NAME | mixture (posterior-weighted average) | nearest[:posterior|typology] (the "
            "most similar expert: by the forest's posterior on the domain's valid split, or by URIEL syntax "
            "distance for ISO 639-3 language domains) | flexolmo (a FlexOlmo owner: the "
            "seed as a 2-expert MoE, only its own expert and router row train)",
            metavar="FROM",
        ),
    ] = "seed",
    force: Annotated[
        bool, flag("--force", "train an expert that was opted out again (its owner's call only)")
    ] = False,
    mix: Annotated[
        str | None,
        opt(
            "train on these domains mixed (data.mixture; X-ELM's group of languages), --domain among them; "
            "each stays a domain of its own in the shards and the lineage (quote a name holding a comma: "
            "\"'a,b',c\")",
            metavar="A,B,...",
        ),
    ] = None,
    prior_batches: Annotated[
        int | None,
        opt(
            f"--branch mixture / nearest[:posterior]: valid batches for the posterior weights (default "
            f"{PRIOR_BATCHES}, as `forest average`'s)",
            positive_int,
        ),
    ] = None,
    train_args: TrainArgs = DEFAULT_TRAIN_ARGS,
    no_progress: NoProgress = False,
) -> None:
    """Branch, train one domain expert alone, and merge it into the forest."""
    from elmforest.data.shards import Shards
    from elmforest.forest import btm, commands

    if prior_batches is not None and branch not in ("mixture", "nearest", "nearest:posterior"):
        raise UserError(
            f"--prior-batches sets the posterior weights of --branch mixture or nearest, not {branch}"
        )
    f = _load(forest)
    if f.data.get("clusterer"):  # as `forest train`: an expert on other shards is never routed to
        _check_cluster_domains(
            str(f.root / f.data["clusterer"]["path"]), split_list(mix, "--mix") or [domain], shards
        )
    seed_entry = f.data.get("seed")
    base = (
        commands.checkpoint_seed_config(f, train_args, shards)
        if seed_entry and "config" not in seed_entry
        else None
    )
    e = btm.train_expert(
        f,
        Shards(shards),
        domain,
        name,
        branch,
        base=base,
        overrides=train_args.overrides if base is None else [],
        progress=not no_progress,
        force=force,
        trust_remote_code=train_args.trust_remote_code,
        mix=split_list(mix, "--mix"),
        prior_batches=PRIOR_BATCHES if prior_batches is None else prior_batches,
    )
    if first_process():  # data parallel: said once, by the process that merged it
        print(
            f"expert {e['name']}: {e['tokens']:,} tokens, {e['flops']:.3e} FLOPs, parents "
            + ", ".join(f"{p['name']}×{p['weight']:.3f}" for p in e["parents"])
        )


def dense(forest: ForestDir, shards: ShardsDir, no_progress: NoProgress = False) -> None:
    """Continue the seed's run to the full budget: the compute-matched dense LM."""
    from elmforest.data.shards import Shards
    from elmforest.forest import btm, commands

    f = _load(forest)
    if "plan" not in f.data:
        raise UserError(f"{forest}: no trained seed; the dense baseline continues the seed's run")
    s = btm.train_dense(
        f, Shards(shards), commands.seed_config(f), btm.Plan(**f.data["plan"]), progress=not no_progress
    )
    print(f"dense baseline: {s['tokens']:,} tokens, {s['flops']:.3e} FLOPs -> {forest}/runs/dense/model")


def _check_cluster_domains(clusterer: str, domains: list[str], shards: str) -> None:
    """c-BTM routes to the expert of domain `clusterJ`: an expert trained on another domain is never
    routed to, so shards that were not built from `cluster assign`'s output are refused up front."""
    from elmforest.cluster.assign import assigned_by, clusterer_digest
    from elmforest.cluster.clusterer import Clusterer as C
    from elmforest.data.shards import Shards

    k = C.load(clusterer).k
    names = {f"cluster{j}" for j in range(k)}
    other = [d for d in domains if d not in names]
    if other:
        raise UserError(
            f"{shards}: {len(other)} domain(s) ({', '.join(other[:5])}{', ...' if len(other) > 5 else ''}) are "
            f"not the clusterer's clusters (cluster0..cluster{k - 1}); "
            f"build the shards from `elmforest cluster assign --clusterer {clusterer}`'s output"
        )
    # the names match for any clusterer of this k: the assignment must be this clusterer's (recorded in
    # the index; shards of older versions: in the assign report beside their corpus, if still there)
    index = Shards(shards).index
    rec = index.get("assigned_by") or {}
    by, digest = rec.get("clusterer"), rec.get("clusterer_sha256")
    if digest is None:
        by, digest = assigned_by(index.get("source"))
    if digest is None:
        print(
            f"note: {shards}: cannot tell which clusterer assigned its clusters (built by an older elmforest, "
            f"and the `cluster assign` output it was built from is gone): make sure it was {clusterer}",
            file=sys.stderr,
        )
    elif digest != clusterer_digest(clusterer):
        raise UserError(
            f"{shards}: its clusters were assigned by another clusterer ({by}), not {clusterer}: the names "
            f"match but not the documents, so routing would send text to the wrong experts; build the shards "
            f"from `elmforest cluster assign --clusterer {clusterer}`'s output"
        )


def train(
    forest: ForestDir,
    shards: ShardsDir,
    seed_share: SeedShare = 0.5,
    no_dense: Annotated[bool, flag("--no-dense", "skip the compute-matched dense baseline")] = False,
    clusterer: Clusterer = None,
    executor: Annotated[
        Literal["local", "ray"],
        opt("local: experts one after another here (or --workers at a time); ray: each expert a Ray task"),
    ] = "local",
    address: Annotated[
        str | None, opt("Ray cluster address (default: start a local Ray instance)", metavar="ADDR")
    ] = None,
    cpus_per_expert: Annotated[
        float | None,
        opt("Ray: CPUs per expert, at least one per process (default: --procs-per-expert)", positive_float),
    ] = None,
    gpus_per_expert: Annotated[float, opt("Ray: GPUs per expert", nonneg_float)] = 0.0,
    procs_per_expert: Annotated[
        int, opt("data-parallel processes per expert (torchrun: one per GPU, or gloo on CPU)", positive_int)
    ] = 1,
    max_retries: Annotated[int, opt("retries of an expert whose worker died", nonneg_int)] = 3,
    workers: Annotated[
        int,
        opt(
            "local executor: train this many experts (and the dense run) at a time in worker processes, each "
            "on cores/workers threads",
            positive_int,
        ),
    ] = 1,
    progress_every: Annotated[float, opt("seconds between progress lines", positive_float)] = 10.0,
    expert_lr: ExpertLr = None,
    train_args: TrainArgs = DEFAULT_TRAIN_ARGS,
    no_progress: NoProgress = False,
) -> None:
    """All phases: seed, one expert per domain, dense baseline."""
    from elmforest.data.shards import Shards
    from elmforest.forest import btm
    from elmforest.launch.executor import job_threads, make_executor
    from elmforest.launch.forest import train_forest

    sh = Shards(shards)
    if procs_per_expert > 1 and gpus_per_expert not in (0, procs_per_expert):
        raise UserError(
            "--gpus-per-expert must be 0 (CPU, gloo) or equal to --procs-per-expert (one GPU per process)"
        )
    if (
        executor == "ray"
        and procs_per_expert > 1
        and cpus_per_expert is not None
        and cpus_per_expert < procs_per_expert
    ):
        raise UserError(  # Ray would reserve fewer CPUs than the processes it runs busy
            f"--cpus-per-expert {cpus_per_expert:g} < --procs-per-expert {procs_per_expert}: Ray reserves "
            "--cpus-per-expert CPUs for each expert's processes; give at least one per process"
        )
    if cpus_per_expert is None and executor == "ray":  # the local executor refuses any value given
        cpus_per_expert = float(procs_per_expert)
    ex = make_executor(
        executor, address, cpus_per_expert, gpus_per_expert, max_retries, workers
    )  # refused first
    train_args = with_seed_preset(forest, train_args)
    cfg = train_args.run_config(shards)
    # one domain list (data.domains, else every domain with training data) drives every phase
    domains = cfg.data.domains or [d for d in sh.domains if sh.has(d, "train")]
    if clusterer:
        _check_cluster_domains(clusterer, domains, shards)
    _check_trainable(sh, domains)
    _note_unscored(sh, domains)
    plan, base = btm.plan_for(cfg, domains, seed_share, expert_lr_of(expert_lr, train_args))
    _note_batch(cfg, plan)
    if plan.expert_batch_size % procs_per_expert:  # before the forest is made
        raise UserError(
            f"each expert's batch ({plan.expert_batch_size}) must divide among "
            f"--procs-per-expert {procs_per_expert} processes"
        )
    if hasattr(ex, "prepare") and not (Path(forest) / "forest.json").is_file():
        ex.prepare()  # Ray unreachable or short of resources: said before a new forest is made (an existing
        # one's rerun starts Ray only if a job is left: launch/forest.py)
    f = _load(forest, create=True)
    if clusterer:
        f.set_clusterer(clusterer)
    elif f.data.get("clusterer"):  # a c-BTM forest trained further
        _check_cluster_domains(str(f.root / f.data["clusterer"]["path"]), domains, shards)
    sets = btm.seed_overrides(f, train_args.overrides)  # refused when the seed was trained otherwise
    train_forest(
        f,
        sh,
        base,
        plan,
        executor=ex,
        dense=not no_dense,
        threads=job_threads(executor, cpus_per_expert, workers),
        procs=procs_per_expert,
        progress=not no_progress,
        monitor_every=progress_every,
        overrides=sets,
    )
    print(_load(forest).describe())
