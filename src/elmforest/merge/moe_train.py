"""Training a merged MoE after the merge: FlexOlmo's router-only training and BTX's fine-tuning.

Both are ordinary resumable elmforest runs (`train`) started from the export, on a uniform mix of the
experts' domains: router training freezes everything but the router rows (FlexOlmo's "RT"); BTX
fine-tuning (Sukhbaatar et al. 2024) trains every parameter, or a chosen subset, with the Switch
load-balancing loss and optionally the router z-loss (train/moe_loss.py) under the export's top-k
routing. The trained model replaces the output atomically, its card and metadata say what trained,
and the run's tokens and FLOPs (counted by what ran: frozen weights cost no weight gradient) are
recorded so the forest's ledger can count them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from elmforest.forest.manifest import Forest
from elmforest.forest.trust import refuse_inside_forest
from elmforest.merge.moe import check_untrained
from elmforest.merge.moe_card import export_fingerprint, model_card, weight_digests
from elmforest.merge.moe_copies import (
    drop_other_runs,
    forests_of,
    forget,
    record_copies,
    unrecord_if_untouched,
)
from elmforest.model.build import resolve_model_dir
from elmforest.utils.errors import AlreadyExists, UserError
from elmforest.utils.io import (
    read_json,
    refuse_linked_dir,
    remove_path,
    replace_dir,
    temp_sibling,
    undone_on_failure,
    write_json_atomic,
    write_text_atomic,
)

ROUTER_PARAMS = r"\.mlp\.gate\.weight$"


def train_router(
    moe_dir: str | Path,
    shards: str | Path,
    steps: int,
    out: str | Path | None = None,
    run_dir: str | Path | None = None,
    lr: float = 1e-3,
    batch_size: int = 16,
    domains: list[str] | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
    device: str | None = None,
) -> Path:
    """FlexOlmo's router-only training: every parameter but the router rows frozen, a few steps on a
    small mix of the domains (sampled uniformly), no weight decay. The run is resumable; the trained
    model replaces `out` (default: `moe_dir`) atomically, with its card and metadata updated; returns
    that output's path."""
    return _train_moe(
        "router_training",
        moe_dir,
        shards,
        steps,
        out,
        run_dir,
        dict(lr=lr, weight_decay=0.0),
        dict(trainable=ROUTER_PARAMS, router_aux_loss=0.0, router_z_loss=0.0),
        batch_size,
        domains,
        overrides,
        progress,
        device,
    )


def finetune_moe(
    moe_dir: str | Path,
    shards: str | Path,
    steps: int,
    out: str | Path | None = None,
    run_dir: str | Path | None = None,
    lr: float = 5e-4,
    batch_size: int = 16,
    aux_loss: float = 0.01,
    z_loss: float = 0.0,
    trainable: str | None = None,
    domains: list[str] | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
    device: str | None = None,
) -> Path:
    """BTX's fine-tuning: the whole merged MoE (or the parameters `trainable` matches) trained on a
    uniform mix of the experts' domains with the Switch load-balancing loss (x `aux_loss`, 0.01 as in
    Switch) and the router z-loss (x `z_loss`, off by default), AdamW with the run config's weight decay,
    warm-up 10%, cosine to 10% of `lr`. Resumable; replaces `out` atomically like `train_router`, and
    returns its path."""
    return _train_moe(
        "finetuning",
        moe_dir,
        shards,
        steps,
        out,
        run_dir,
        dict(lr=lr),
        dict(trainable=trainable, router_aux_loss=aux_loss, router_z_loss=z_loss),
        batch_size,
        domains,
        overrides,
        progress,
        device,
    )


def own_keys(kind: str) -> dict[str, str]:
    """The config keys a router training or fine-tuning sets itself, each with how to change it
    (`data.domains` is not one: `--set data.domains=[...]` is how the command line picks them)."""
    data = "the training's data is a uniform mix of the experts' domains' train splits"
    keys = {
        "train.steps": "give --steps",
        "train.batch_size": "give --batch-size",
        "optim.lr": "give --lr",
        "train.device": "give --device",
        "data.shards": "give --shards" if kind == "finetuning" else "give --train-data",
        "model.init_from": "it trains the merged model given",
        "data.mixture": data,
        "data.split": data,
    }
    if kind == "finetuning":
        return keys | {
            "train.router_aux_loss": "give --aux-loss",
            "train.router_z_loss": "give --z-loss",
            "train.trainable": "give --trainable",
        }
    rows = "it trains only the router rows, with no weight decay and no router losses"
    return keys | dict.fromkeys(
        ("train.router_aux_loss", "train.router_z_loss", "train.trainable", "optim.weight_decay"), rows
    )


def refuse_own_keys(overrides, kind: str) -> None:
    """`--set` for a key the run sets itself was applied over its options without a word (`--steps 2
    --set train.steps=3` trained 3 steps, and `merge moe` said 2)."""
    what = {"router_training": "router training", "finetuning": "fine-tuning"}[kind]
    keys = own_keys(kind)
    for item in overrides if isinstance(overrides, list | tuple) else []:
        key = str(item).split("=", 1)[0].strip()
        if key in keys:
            raise UserError(f"--set {key}: the {what} sets it itself ({keys[key]})")


def _train_moe(
    kind,
    moe_dir,
    shards,
    steps,
    out,
    run_dir,
    optim,
    train_fields,
    batch_size,
    domains,
    overrides,
    progress,
    device,
) -> Path:
    from elmforest.config import RunConfig, apply_overrides
    from elmforest.data.shards import Shards
    from elmforest.train.trainer import train
    from elmforest.utils.typed import check_call_args

    api, what = {
        "router_training": ("train_router", "router training"),
        "finetuning": ("finetune_moe", "fine-tuning"),
    }[kind]
    check_call_args(api, dict(steps=steps, batch_size=batch_size), dict(domains=domains, overrides=overrides))
    refuse_own_keys(overrides, kind)
    moe_dir = resolve_model_dir(moe_dir)
    out = Path(out or moe_dir)
    if not (moe_dir / "elmforest_moe.json").is_file():
        raise UserError(f"{moe_dir}: not a merged MoE (no elmforest_moe.json; made by `elmforest merge moe`)")
    meta = located(read_json(moe_dir / "elmforest_moe.json"), moe_dir)
    if kind == "finetuning" and out.resolve() == moe_dir.resolve() and "finetuning" in meta:
        _settle_finished(meta, kind, meta[kind], out, moe_dir)
        raise UserError(
            f"{moe_dir} is already fine-tuned; fine-tune it into another --out (the ledger counts each run once)"
        )
    if kind == "router_training" and read_json(moe_dir / "config.json").get("num_experts_per_tok", 2) < 2:
        raise UserError(
            f"{moe_dir}: {what} needs top-k >= 2: with top-1 routing the renormalised weight "
            "is always 1, so no gradient reaches the router"
        )
    refuse_inside_forest(out)
    refuse_linked_dir(out)  # before training: temp_sibling would refuse it only once trained
    if out.exists() and any(out.iterdir()) and not (out / "elmforest_moe.json").is_file():
        raise AlreadyExists(f"{out} exists and is not an MoE export; choose another output directory")
    fingerprint = export_fingerprint(moe_dir)
    if not Shards.is_shards_dir(shards):
        raise UserError(f"{shards}: {what} needs a shards directory (elmforest shards build)")
    sh = Shards(shards)
    if domains is None:
        # each domain once, also when two experts share one
        wanted = list(dict.fromkeys(d for e in meta["experts"] for d in e["domains"]))
        domains = [d for d in wanted if sh.has(d, "train")] or sh.domains
    run_cfg = moe_dir / "elmforest_run.json"
    cfg = RunConfig.from_dict(read_json(run_cfg)) if run_cfg.is_file() else RunConfig()
    cfg.model.init_from = str(moe_dir.resolve())
    cfg.data.shards, cfg.data.domains, cfg.data.mixture, cfg.data.split = (
        str(sh.root.resolve()),  # absolute: the run config and card are read from elsewhere (a copy)
        domains,
        "uniform",
        "train",
    )
    t, o = cfg.train, cfg.optim
    t.steps, t.init_checkpoint, t.stop_at = steps, None, None
    t.frozen_experts = []  # an owner's run config (a FlexOlmo merge) froze expert 0; this run trains it
    for k, v in train_fields.items():
        setattr(t, k, v)
    t.batch_size, t.grad_accum = batch_size, 1
    if device is not None:
        t.device = device
    t.ckpt_every = max(1, min(t.ckpt_every, steps))
    o.warmup_frac, o.schedule, o.min_lr_ratio = 0.1, "cosine", 0.1
    for k, v in optim.items():
        setattr(o, k, v)
    cfg = apply_overrides(cfg, list(overrides or []))
    digest = _config_digest(cfg)
    if out.resolve() != moe_dir.resolve() and (out / "elmforest_moe.json").is_file():
        held = read_json(out / "elmforest_moe.json").get(kind) or {}
        asked = {"from_fingerprint": fingerprint, "config_digest": digest}
        same_data = (
            held.get("data") is not None and Path(held["data"]).resolve() == Path(cfg.data.shards).resolve()
        )
        if same_data and all(held.get(k) == v for k, v in asked.items()):  # this very run, finished
            print(f"note: {out} already holds this {what} ({cfg.train.steps} steps from {moe_dir}); kept")
            if run_dir is None:  # a run the caller placed is theirs to keep
                _settle_finished(meta, kind, held, out, moe_dir)
            else:
                _ledger(meta, kind, held, out)
            return out
        check_untrained(out, doing=what)  # another training there would be lost, its ledger row left behind
        if _export_of(out) != fingerprint:  # another export (other settings, another forest): the user's
            raise AlreadyExists(
                f"{out} holds another MoE export than {moe_dir}; {what} would replace it: choose another "
                "--out, or delete it first"
            )
    # one run per export: re-exporting into the same place must not pick up an older finished run
    keep = run_dir is not None  # a run the caller placed is theirs; the default one is scratch
    tag = _TAGS[kind]
    run_dir = Path(run_dir or _scratch(out, kind, fingerprint))
    held = forests_of(meta, moe_dir)
    for forest, names in held:  # before anything is touched: opted-out weights stay out
        forest.refuse_opted_out(names, out)
    if not keep:
        drop_other_runs(out, tag, run_dir, meta, moe_dir)
    record_copies(meta, held, run_dir, out, tag)
    try:
        summary = train(
            cfg, run_dir, progress=progress, label="router" if kind == "router_training" else "btx"
        )
    except UserError:  # refused before training (a --trainable that matches nothing): nothing to keep
        unrecord_if_untouched(meta, run_dir, out, moe_dir)
        raise
    if "stopped_at" in summary:  # `--set train.stop_at`: paused; there is no model to finish `out` with
        raise UserError(
            f"{what} paused at step {summary['stopped_at']} of {cfg.train.steps} (train.stop_at) in {run_dir}; "
            "the same command without train.stop_at continues it"
        )

    record = {  # from the config that ran: --set train.steps / data.domains outrank the flags
        "steps": cfg.train.steps,
        "lr": cfg.optim.lr,
        "batch_size": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "data": str(Path(cfg.data.shards).resolve()),
        "domains": list(cfg.data.domains or sh.domains),
        "trainable": cfg.train.trainable,
        "frozen_experts": list(cfg.train.frozen_experts),
        "router_aux_loss": cfg.train.router_aux_loss,
        "router_z_loss": cfg.train.router_z_loss,
        "tokens": summary["tokens"],
        "flops": summary["flops"],  # by what ran: frozen weights cost no weight gradient
        "run": str(run_dir) if keep else None,  # kept only where the caller asked for it
        "from": str(moe_dir.resolve()),
        "from_fingerprint": fingerprint,
        "config_digest": digest,  # every setting that shapes the result (a rerun of the same is kept)
        "finished": time.time(),
    }
    if meta.get(kind):  # trained this way before (a fine-tuned MoE fine-tuned again): kept, not hidden
        record["previous"] = meta[kind]
    tmp = temp_sibling(out)
    with undone_on_failure(tmp, out):
        _finish(tmp, run_dir / "model", moe_dir, meta, kind, record, out)
    for f, names in forests_of(meta, moe_dir):
        f.settle_output(out, names)
    _ledger(meta, kind, record, out)
    if not keep:  # resumable while it trains; once `out` holds the result it is a stray copy of the experts
        _tidy(out, run_dir, meta, moe_dir)
    return out


def located(meta: dict, moe_dir: Path) -> dict:
    """`meta` with `forest` the forest this MoE sits with. The card records its forest's absolute path,
    so a copied tree (cp -r, rsync) recorded its training, and its copies of the experts, in the
    original's manifest (whose opt-out then deleted in the copy, and the copy's missed them): the forest
    at the recorded place relative to the MoE (`forest_relative`; cards from before it: a sibling of the
    recorded forest's name, the quickstart's layout) is taken where it holds the MoE's experts."""
    recorded = meta.get("forest")
    if recorded is None:
        return meta
    rel = meta.get("forest_relative")
    here = (
        Path(os.path.normpath(moe_dir.resolve() / rel))
        if rel
        else moe_dir.resolve().parent / Path(recorded).name
    )
    if here == Path(recorded) or not (here / "forest.json").is_file():
        return meta
    try:
        f = Forest.load(here)
        have = set(f.names) | {r.get("name") for r in f.data.get("removed", [])}
    except (OSError, ValueError, UserError):
        return meta
    if {e.get("forest_name") or e["name"] for e in meta["experts"] if e["name"] != "public"} <= have:
        return {**meta, "forest": str(here)}
    return meta


def _settle_finished(meta: dict, kind: str, record: dict, out: Path, moe_dir: Path) -> None:
    """A finished output found again: a run killed after `out` was written, before its ledger row or
    before its scratch run was removed, gets both done now (the row is replaced, never added twice)."""
    _ledger(meta, kind, record, out)
    if record.get("run") is None and record.get("from_fingerprint"):
        _tidy(out, _scratch(out, kind, record["from_fingerprint"]), meta, moe_dir)


def _ledger(meta: dict, kind: str, record: dict, out: Path) -> None:
    """The training's row in the ledger of the forest the MoE was merged from: written here, with the
    output, where the CLI wrote it after the run returned (a kill between them, or a call from Python,
    left the compute out of the ledger). A rerun replaces the row of the same output. A merge of owner
    pairs given by folder records no forest: its training has no ledger (Path("") was the working
    directory, so a forest there gained the row)."""
    if not meta.get("forest"):
        return
    root = Path(meta["forest"])
    if {"tokens", "flops"} <= set(record) and (root / "forest.json").is_file():
        phase = "btx_finetuning" if kind == "finetuning" else kind
        row = {"phase": phase, "name": out.name, "tokens": record["tokens"], "flops": record["flops"]}
        Forest.load(root).record_phase({**row, "output": str(out)})


_TAGS = {"router_training": "router-run", "finetuning": "finetune-run"}  # the scratch runs' names


def _export_of(out: Path) -> str | None:
    """The export fingerprint of what `out` holds (None: unreadable): a copy of the export trained is
    the same, another merge is not."""
    try:
        return export_fingerprint(out)
    except (OSError, ValueError):
        return None


def _scratch(out: Path, kind: str, fingerprint: str) -> Path:
    return out.with_name(f"{out.name}.{_TAGS[kind]}-{fingerprint}")


def _tidy(out: Path, run_dir: Path, meta: dict, moe_dir: Path) -> None:
    """The scratch run of a finished `out`: its logs into `out`, the rest (a copy of the experts) deleted."""
    from elmforest.train.runlock import unless_training

    with unless_training(run_dir) as idle:
        if idle:
            _keep_logs(run_dir, out)
            remove_path(run_dir)
    if idle:
        forget(meta, run_dir, moe_dir)


def _config_digest(cfg) -> str:
    import hashlib
    import json

    from elmforest.train.runcheck import run_identity

    text = json.dumps(run_identity(cfg.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


LOGS = ("metrics.jsonl", "valid.jsonl", "summary.json", "trackers.json", "tensorboard", "wandb", "mlruns")


def _keep_logs(run_dir: Path, out: Path) -> None:
    """The scratch run is deleted, its training record is not: its metrics and tracker output (TensorBoard
    events, an offline W&B run to sync, an MLflow store) move to OUT/train_logs/."""
    import shutil

    logs = [run_dir / n for n in LOGS if (run_dir / n).exists()]
    if not logs:
        return
    dst = out / "train_logs"
    dst.mkdir(exist_ok=True)
    for src in logs:
        remove_path(dst / src.name)
        shutil.move(str(src), str(dst / src.name))
    if (dst / "mlruns").is_dir():  # its artifact paths named the deleted scratch run: MLflow listed none
        from elmforest.train.tracking_mlflow import _relocate

        _relocate(dst / "mlruns")


def _finish(tmp, trained, moe_dir, meta, kind: str, record: dict, out):
    import shutil

    shutil.copytree(trained, tmp)
    for f in ("generation_config.json", "elmforest_flexolmo.json"):  # the latter: where the pairs came from
        if (moe_dir / f).is_file() and not (tmp / f).is_file():
            shutil.copy2(moe_dir / f, tmp / f)
    meta[kind] = record
    meta["weight_files"] = weight_digests(tmp)  # the trained weights, not the export's
    if meta.get("forest"):  # the forest it was trained with, from where the output sits
        meta["forest_relative"] = os.path.relpath(meta["forest"], Path(out).resolve())
    write_json_atomic(tmp / "elmforest_moe.json", meta)
    write_text_atomic(tmp / "README.md", model_card(meta))
    return replace_dir(tmp, out)
