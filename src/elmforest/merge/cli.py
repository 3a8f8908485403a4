"""`elmforest merge moe | finetune | routing | flexolmo-pair | flexolmo`: each verb is its signature (see utils/argtypes.py); the work is in merge/moe.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from elmforest.train.cli import CONFIG_KEYS, NoProgress
from elmforest.utils.argtypes import flag, group, opt, positive_float, positive_int, verb
from elmforest.utils.errors import UserError

# the training's own options (--steps, --lr, --batch-size, ...) are refused here: merge/moe_train.py own_keys
TrainingOverrides = Annotated[
    list[str] | None,
    opt(
        "override a field of the training's config, e.g. --set train.precision=fp32 --set train.grad_accum=2 "
        "(repeatable; keys below, but those the training sets itself are refused: steps, batch size, LR, "
        "device, the data's shards, mix and split, and what trains; data.domains may be set)",
        name="--set",
        metavar="KEY=VALUE",
    ),
]


def register(app: typer.Typer) -> None:
    mg = group("merge a forest's experts into one model")
    verb(mg, epilog=CONFIG_KEYS)(moe)  # --set: the router training run's config
    verb(mg, epilog=CONFIG_KEYS)(finetune)  # --set: the fine-tuning run's config
    verb(mg)(routing)
    verb(mg, name="flexolmo-pair")(flexolmo_pair)
    verb(mg)(flexolmo)
    app.add_typer(mg, name="merge")


ROUTER_TRAINING = {"steps": 100, "lr": 1e-3, "batch_size": 16}  # `merge moe --train-router` defaults


def moe(
    forest: Annotated[str, opt("forest directory", metavar="DIR")],
    out: Annotated[str, opt("output HF checkpoint directory", metavar="DIR")],
    top_k: Annotated[int, opt("experts per token", positive_int)] = 2,
    shared: Annotated[
        Literal["average", "seed"],
        opt(
            "shared weights (embeddings, attention, norms, head): the experts' average (BTX) or the seed's (FlexOlmo)"
        ),
    ] = "average",
    router: Annotated[
        Literal["domain-embeddings", "hidden-states", "random"], opt("how each expert's router row is made")
    ] = "domain-embeddings",
    router_center: Annotated[
        bool,
        flag(
            "--router-center",
            "subtract the mean router row over experts before normalising (sharper routing)",
        ),
    ] = False,
    sample_tokens: Annotated[
        int, opt("tokens of each expert's data for its router row", positive_int)
    ] = 16384,
    exclude: Annotated[list[str] | None, opt("leave an expert out (repeatable)", metavar="NAME")] = None,
    data: Annotated[
        str | None,
        opt(
            "shards holding the experts' training domains (default: the shards each expert was trained on)",
            metavar="DIR",
        ),
    ] = None,
    train_router: Annotated[
        bool, flag("--train-router", "then train only the router rows (FlexOlmo RT)")
    ] = False,
    # None: not given (a default of 100 given as --steps 100 without --train-router was taken silently)
    steps: Annotated[
        int | None, opt(f"router training steps (default {ROUTER_TRAINING['steps']})", positive_int)
    ] = None,
    lr: Annotated[
        float | None,
        opt(f"router training learning rate (default {ROUTER_TRAINING['lr']:g})", positive_float),
    ] = None,
    batch_size: Annotated[
        int | None,
        opt(f"router training sequences per step (default {ROUTER_TRAINING['batch_size']})", positive_int),
    ] = None,
    train_data: Annotated[
        str | None,
        opt("shards for router training (default: --data, else the first expert's shards)", metavar="DIR"),
    ] = None,
    device: Annotated[str, opt("auto | cpu | cuda | cuda:N", metavar="DEVICE")] = "auto",
    max_shard_bytes: Annotated[
        int | None, opt("largest safetensors shard (default: one expert's checkpoint size)", positive_int)
    ] = None,
    no_routing: Annotated[
        bool, flag("--no-routing", "skip the routing statistics (they load the whole MoE into memory)")
    ] = False,
    overrides: TrainingOverrides = None,
    no_progress: NoProgress = False,
) -> None:
    """Merge the experts into one Hugging Face mixture-of-experts checkpoint (BTX / FlexOlmo): Llama/Mistral
    experts into Mixtral, Qwen2 into Qwen2-MoE, Qwen3 into Qwen3-MoE, OLMo-2 into FlexOlmo."""
    from elmforest.merge.moe import MoeSpec, export_moe
    from elmforest.merge.moe_train import train_router as train_rows
    from elmforest.utils.io import read_json

    spec = MoeSpec(
        top_k=top_k,
        shared=shared,
        router=router,
        center=router_center,
        sample_tokens=sample_tokens,
        exclude=exclude or [],
    )
    given = {"steps": steps, "lr": lr, "batch_size": batch_size}
    router_options = {f"--{k.replace('_', '-')}": v is not None for k, v in given.items()}
    router_options |= {"--train-data": train_data is not None, "--set": bool(overrides)}
    if not train_router and any(router_options.values()):
        given = [k for k, v in router_options.items() if v]
        raise UserError(f"{', '.join(given)} set the router training: add --train-router, or leave them out")
    steps = ROUTER_TRAINING["steps"] if steps is None else steps
    lr = ROUTER_TRAINING["lr"] if lr is None else lr
    batch_size = ROUTER_TRAINING["batch_size"] if batch_size is None else batch_size
    router_shards = None
    if train_router:  # what would fail after the merge is checked before it (a merge can take long)
        router_shards = _check_router_training(forest, spec, overrides, train_data, data)
    path = export_moe(
        forest,
        out,
        spec,
        data=data,
        device=device,
        max_shard_bytes=max_shard_bytes,
        redo=("router_training",) if train_router else (),
    )
    meta = read_json(path / "elmforest_moe.json")
    names = ", ".join(e["name"] for e in meta["experts"])
    print(
        f"merged {len(meta['experts'])} expert{'s' if len(meta['experts']) != 1 else ''} ({names}) into a {meta['moe_model_type']} MoE, "
        f"top-{meta['top_k']} -> {path}"
    )
    if train_router:
        shards = router_shards
        train_rows(
            path,
            shards,
            steps,
            lr=lr,
            batch_size=batch_size,
            overrides=overrides or [],
            progress=not no_progress,
            device=None if device == "auto" else device,
        )
        print(f"trained the router for {steps} steps on {shards} -> {path}")
    if not no_routing and ((path / "elmforest_run.json").is_file() or data is not None):
        _report_routing(path, data, device)
    elif not no_routing:  # every merged model gets them (docs/moe.md): one that cannot is said
        print(
            f"note: no routing statistics for {path}: its first expert records no shards; give --data SHARDS, "
            f"or run `elmforest merge routing --model {path} --shards SHARDS`",
            file=sys.stderr,
        )


def _check_router_training(forest: str, spec, overrides, train_data: str | None, data: str | None) -> str:
    """The router training's shards (--train-data, else --data, else those the first expert trained on),
    checked with its top-k and `--set` before the merge is written: found after it, they left an
    untrained merge in `--out`, over whatever was there."""
    from elmforest.config import RunConfig, apply_overrides
    from elmforest.data.shards import Shards
    from elmforest.forest.manifest import Forest
    from elmforest.merge.moe_train import refuse_own_keys
    from elmforest.utils.io import read_json

    refuse_own_keys(list(overrides or []), "router_training")
    cfg = apply_overrides(RunConfig(), list(overrides or []))
    f = Forest.load(forest)
    names = [n for n in f.names if n not in spec.exclude]
    if not names:
        return ""  # nothing to merge: export_moe says so in its own words
    if min(spec.top_k, len(names)) < 2:
        raise UserError(
            f"--train-router needs top-k >= 2 (here top-{min(spec.top_k, len(names))} of {len(names)} "
            "experts): with top-1 routing the renormalised weight is always 1, so no gradient reaches the router"
        )
    shards, flag = (train_data, "--train-data") if train_data is not None else (data, "--data")
    if shards is None:
        run = f.expert_dir(names[0]) / "elmforest_run.json"
        shards = read_json(run)["data"]["shards"] if run.is_file() else None
        flag = f"the shards {names[0]} trained on,"
    if shards is None:
        raise UserError(
            "--train-router needs --train-data (or --data) SHARDS: the first expert records no shards"
        )
    if not Shards.is_shards_dir(shards):
        raise UserError(f"{flag} {shards}: not a shards directory")
    sh = Shards(shards)
    check_shards_tokenizer(forest, sh, flag)
    if missing := [d for d in cfg.data.domains or [] if not sh.has(d, "train")]:
        raise UserError(f"--set data.domains: no 'train' split for domain(s) {missing} in {shards}")
    return shards


def check_shards_tokenizer(forest: str, shards, flag: str) -> None:
    from elmforest.forest.manifest import Forest

    want = Forest.load(forest).data.get("tokenizer")
    if want and shards.tokenizer_fingerprint != want:
        raise UserError(
            f"{flag} {shards.root} was tokenized with a different tokenizer than {forest}'s experts"
        )


def _report_routing(path, shards, device: str) -> None:
    """Routing statistics beside a model just written; a failure here (memory: the whole MoE is loaded;
    shards gone) is a warning, never a failure of the merge or fine-tuning that already succeeded."""
    from elmforest.merge.routing import summary_line, write_routing
    from elmforest.utils.device import resolve_device

    try:
        stats = write_routing(path, shards, device=str(resolve_device(device)))
    except (UserError, OSError, RuntimeError) as e:
        print(f"warning: routing statistics skipped ({e}); run `elmforest merge routing --model {path}`")
        return
    print(summary_line(stats) + f" -> {path}/routing.json")


def routing(
    model: Annotated[str, opt("a merged MoE directory (from `elmforest merge moe`)", metavar="DIR")],
    shards: Annotated[
        str | None, opt("shards to route (default: the ones the experts trained on)", metavar="DIR")
    ] = None,
    split: Annotated[Literal["train", "valid", "test"], opt("the split whose text is routed")] = "valid",
    tokens: Annotated[int, opt("tokens per domain", positive_int)] = 8192,
    device: Annotated[str, opt("auto | cpu | cuda | cuda:N", metavar="DEVICE")] = "auto",
) -> None:
    """Routing statistics of a merged MoE per domain (expert load, router entropy, top-1 = own expert),
    written beside it as routing.json and routing.png."""
    from elmforest.merge.routing import MAX_CELL_LABELS, summary_line, write_routing
    from elmforest.utils.device import resolve_device

    stats = write_routing(model, shards, split, tokens, str(resolve_device(device)))
    print(summary_line(stats))
    for d, v in stats["domains"].items():
        own = "-" if v["top1_own"] is None else f"{v['top1_own']:.1%}"
        fewer = (
            f"  (only {v['tokens']} tokens routed: its {split} split is short)"
            if v["tokens"] < tokens and v.get("split_tokens", 0) < tokens
            else ""
        )
        load = v["load_mean"]
        if len(load) > MAX_CELL_LABELS:  # as its heatmap: its three busiest experts, not 64 numbers
            top = sorted(range(len(load)), key=lambda j: -load[j])[:3]
            shown = "top " + ", ".join(f"{stats['experts'][j]} {load[j]:.2f}" for j in top)
        else:
            shown = f"load {[round(x, 2) for x in load]}"
        print(f"  {d:24s} top-1 own {own:>6s}  entropy {v['entropy_norm']:.2f}  {shown}" + fewer)
    print(f"-> {model}/routing.json, routing.png")


def finetune(
    model: Annotated[str, opt("a merged MoE directory (from `elmforest merge moe`)", metavar="DIR")],
    steps: Annotated[int, opt("fine-tuning steps", positive_int)],
    out: Annotated[str | None, opt("output directory (default: replace --model)", metavar="DIR")] = None,
    shards: Annotated[
        str | None, opt("shards to train on (default: the ones the experts trained on)", metavar="DIR")
    ] = None,
    lr: Annotated[float, opt("peak learning rate (warm-up 10%, cosine to 10%)", positive_float)] = 5e-4,
    batch_size: Annotated[int, opt("sequences per step", positive_int)] = 16,
    aux_loss: Annotated[float, opt("Switch load-balancing loss coefficient (0: off)")] = 0.01,
    z_loss: Annotated[float, opt("router z-loss coefficient (0: off)")] = 0.0,
    trainable: Annotated[
        str | None, opt("regex of the parameters that train (default: all of them)", metavar="REGEX")
    ] = None,
    device: Annotated[str, opt("auto | cpu | cuda | cuda:N", metavar="DEVICE")] = "auto",
    no_routing: Annotated[
        bool, flag("--no-routing", "skip the routing statistics (they load the whole MoE into memory)")
    ] = False,
    overrides: TrainingOverrides = None,
    no_progress: NoProgress = False,
) -> None:
    """BTX: fine-tune a merged MoE on a uniform mix of its experts' domains with the load-balancing
    loss, as a resumable run; its FLOPs are recorded in the forest's ledger."""
    import time

    from elmforest.data.shards import Shards
    from elmforest.merge.moe_train import finetune_moe
    from elmforest.model.build import resolve_model_dir
    from elmforest.utils.io import read_json, restore_swapped

    if aux_loss < 0 or z_loss < 0:
        raise UserError("--aux-loss and --z-loss must be >= 0")
    started = time.time()
    src = Path(model)
    restore_swapped(src)  # a fine-tuning in place cut between its two renames left it aside
    resolve_model_dir(src)  # a model that is not there is said as such, not as shards not recorded
    if shards is None:
        run = src / "elmforest_run.json"
        shards = read_json(run)["data"]["shards"] if run.is_file() else None
        if shards is None:
            raise UserError(f"{src}: no record of the experts' shards; pass --shards")
        if not Shards.is_shards_dir(shards):  # moved or deleted since (a copied tree, another machine)
            raise UserError(
                f"{shards}: the shards {run} records the experts' training on are not there (moved or "
                "deleted?); pass --shards"
            )
    path = finetune_moe(
        src,
        shards,
        steps,
        out=out,
        lr=lr,
        batch_size=batch_size,
        aux_loss=aux_loss,
        z_loss=z_loss,
        trainable=trainable,
        overrides=overrides or [],
        progress=not no_progress,
        device=None if device == "auto" else device,
    )
    ft = read_json(path / "elmforest_moe.json")["finetuning"]  # its ledger row: written with it
    if ft.get("finished", 0) < started:  # kept: fine-tuned before, as asked (said by finetune_moe)
        return
    print(f"fine-tuned for {ft['steps']} steps ({ft['tokens']:,} tokens, {ft['flops']:.3g} FLOPs) -> {path}")
    if not no_routing:
        _report_routing(path, shards, device)


def flexolmo_pair(
    seed: Annotated[str, opt("the public seed (an HF checkpoint or a forest's seed)", metavar="DIR")],
    out: Annotated[str, opt("output: the 2-expert MoE each owner starts from", metavar="DIR")],
) -> None:
    """FlexOlmo: the seed as a 2-expert MoE (both experts its FFN; it computes exactly the seed). Each owner
    trains it on its own data only, expert 1 and its router row: `elmforest train --set
    model.init_from=PAIR --set 'train.trainable=\\.mlp\\.(experts|gate)\\.' --set 'train.frozen_experts=[0]'`."""
    from elmforest.forest.trust import refuse_inside_forest
    from elmforest.merge.flexolmo import public_pair

    refuse_inside_forest(out)  # `forest expert --branch flexolmo` writes its own inside (branches/NAME)
    print(f"public pair -> {public_pair(seed, out)}")


def flexolmo(
    out: Annotated[str, opt("output MoE directory", metavar="DIR")],
    owner: Annotated[
        list[str] | None,
        opt(
            "an owner's trained pair, NAME=DIR (repeatable; leave one out to opt it out)", metavar="NAME=DIR"
        ),
    ] = None,
    forest: Annotated[
        str | None,
        opt(
            "a forest whose owners trained as `forest expert --branch flexolmo` (all of them)", metavar="DIR"
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None, opt("with --forest: leave an owner out (repeatable; the opt-out)", metavar="NAME")
    ] = None,
    top_k: Annotated[int, opt("experts per token", positive_int)] = 2,
    no_routing: Annotated[
        bool, flag("--no-routing", "skip the routing statistics (they load the whole MoE into memory)")
    ] = False,
) -> None:
    """FlexOlmo: merge owners' trained pairs into one MoE with no training (the public expert once)."""
    from elmforest.merge.flexolmo import forest_pairs, merge_pairs

    if (owner is None) == (forest is None):
        raise UserError("give either the owners' pairs (--owner NAME=DIR ...) or a forest (--forest DIR)")
    if exclude and forest is None:
        raise UserError("--exclude goes with --forest; with --owner, leave the owner out")
    pairs = []
    for item in owner or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--owner {item!r}: expected NAME=DIR")
        pairs.append((name, Path(path)))
    if forest is not None:
        pairs = forest_pairs(forest, exclude or [])
    path = merge_pairs(pairs, out, top_k, forest, exclude or [])
    print(f"merged the public expert and {len(pairs)} owner(s) ({', '.join(n for n, _ in pairs)}) -> {path}")
    if not no_routing:
        _report_routing(path, None, "auto")
