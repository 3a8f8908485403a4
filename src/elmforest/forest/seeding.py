"""The seed and the dense run it is the first part of (docs/btm.md): the seed trained as the dense
run's first `seed_share` of steps and stored in the forest, the dense baseline continuing that same
run, a seed shared with another forest or taken from a local checkpoint, and what a rerun checks
(`seed_ready`, `seed_overrides`).

Apart from forest/btm.py, which branches each expert from the seed and trains it: these make the seed
(and the dense run) and never touch an expert.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_model as st_load_model

from elmforest.config import RunConfig
from elmforest.data.shards import Shards
from elmforest.data.tokenizer import load_tokenizer, save_tokenizer
from elmforest.forest.manifest import Forest
from elmforest.forest.plan import Plan, check_plan
from elmforest.forest.trust import copy_regular_files
from elmforest.model.build import build_model
from elmforest.train.trainer import train
from elmforest.utils.errors import Failed, UserError
from elmforest.utils.io import read_json, remove_path, staged_dir, temp_sibling, write_json_atomic


def export_checkpoint(ckpt: Path, cfg: RunConfig, shards: Shards, out: Path) -> Path:
    """Turn a trainer checkpoint into an HF checkpoint directory (atomically). The model is built without
    weights, since the checkpoint holds every one (loaded strictly): initialising it at random, or reading
    `model.init_from`'s weights, cost a second copy's time and disk reads for nothing."""
    model = build_model(cfg.model, shards.vocab_size, shards.eos_id, initialise=False)
    st_load_model(model, str(ckpt / "model.safetensors"), strict=True)
    with staged_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        save_tokenizer(load_tokenizer(shards.root), tmp)
        write_json_atomic(tmp / "elmforest_run.json", cfg.to_dict())
        write_json_atomic(tmp / "elmforest_data.json", shards.record())
    return out


def train_seed(forest: Forest, shards: Shards, base: RunConfig, plan: Plan, progress: bool = True) -> dict:
    """Train the dense run up to the seed's share, then store the seed (HF + trainer state) in the forest."""
    if seed_ready(forest):
        check_plan(forest, plan)
        return forest.data["seed"]
    seed = forest.data.get("seed") or {}
    if seed and "config" not in seed:  # `forest seed --from-checkpoint`: no run of ours to continue
        raise UserError(
            f"{forest.root}: its seed is a {seed.get('source') or 'checkpoint'} (forest seed --from-checkpoint), "
            "not a run this forest trained: training a seed here would replace it, and there is no seed run "
            "for a dense baseline to continue. Train its experts with `forest expert --domain D` (one per "
            "domain), or start a new forest (another --forest) to train a seed and its dense run"
        )
    cfg = dense_config(base, plan, shards)
    cfg.train.stop_at = plan.seed_steps  # the pause always writes a checkpoint
    run_dir = forest.root / "runs" / "dense"
    res = train(cfg, run_dir, progress=progress, label="seed")  # the dense run's first part
    ckpt = run_dir / "checkpoints" / f"step-{plan.seed_steps:08d}"
    if "stopped_at" not in res or not ckpt.is_dir():
        raise Failed(
            f"{run_dir}: the seed checkpoint at step {plan.seed_steps} is missing; the dense run "
            "went past it before the seed was stored; start a new forest (another --forest)"
        )
    copy_dir_atomic(ckpt, forest.root / "seed_state")
    export = temp_sibling(forest.root / "seed", "stage")  # a kill leaves it to the next run to clean
    export_checkpoint(ckpt, cfg, shards, export)
    forest.set_seed(
        export,
        tokens=res["tokens"],
        flops=res["flops"],
        source=f"first {plan.seed_steps} of {plan.total_steps} dense steps on {len(cfg.data.domains or shards.domains)} domains",
        extra={"plan": asdict(plan)},
        seed_fields={"config": cfg.to_dict()},
        link=True,
    )
    remove_path(export)
    return forest.data["seed"]


def seed_overrides(forest: Forest, overrides: list[str]) -> list[str]:
    """The experts and the dense run continue the seed's config, so a `--set` given once the seed exists
    was dropped without a word. One that would change what is trained is refused; the operational ones
    (trackers, logging, checkpoints: runcheck.OPERATIONAL_FIELDS) are returned, for the jobs to apply."""
    from elmforest.config import apply_overrides
    from elmforest.train.runcheck import OPERATIONAL_FIELDS, settings_diff

    if not overrides:
        return []
    was = RunConfig.from_dict(forest.data["seed"]["config"]) if seed_ready(forest) else None
    now = apply_overrides(was, list(overrides)) if was is not None else None  # None: they make the seed
    if was is not None and (diff := settings_diff(was, now)):
        raise UserError(
            f"{forest.root}: its seed was trained with {diff.replace(' -> ', ', not ')}; the experts and the "
            "dense run continue the seed's config, so these --set values would not apply to them: leave them "
            "out, or start a new forest (another --forest)"
        )
    operational = {f"train.{k}" for k in OPERATIONAL_FIELDS if k != "stop_at"}  # each phase has its own end
    return [o for o in overrides if o.split("=", 1)[0].strip() in operational]


def other_seed(other: Forest, forest: Forest) -> str:
    """How the seed `other` grew from differs from `forest`'s ('' when the same, or none yet)."""
    from elmforest.train.runcheck import settings_diff

    if not seed_ready(other):
        return ""
    return settings_diff(other.data["seed"]["config"], forest.data["seed"]["config"])


def seed_ready(forest: Forest) -> bool:
    """A trained seed is complete only with its config, the plan and the full trainer state."""
    seed = forest.data.get("seed") or {}
    state = forest.root / "seed_state"
    return (
        "config" in seed
        and "plan" in forest.data
        and all((state / f).is_file() for f in ("model.safetensors", "optimizer.safetensors", "state.json"))
    )


def copy_dir_atomic(src: Path, dst: Path, link: bool = False) -> None:
    with staged_dir(dst) as tmp:
        copy_regular_files(src, tmp, link=link)


def shared_plan(forest: Forest, domains: list[str], expert_lr: float | None = None) -> Plan:
    """The plan of a forest grown from `forest`'s seed by `share_seed`: its budget, one expert per domain."""
    old = Plan(**forest.data["plan"])
    lr = expert_lr if expert_lr is not None else old.expert_lr
    return Plan(old.total_steps, old.batch_size, len(domains), old.seed_share, list(domains), lr)


def share_seed(
    path: str | Path,
    forest: Forest,
    domains: list[str],
    expert_lr: float | None = None,
    elsewhere: str = "another --forest",
) -> Forest:
    """A new forest grown from the same seed (hard-linked, else copied; recorded in one manifest write), with the
    budget split between one expert per domain of `domains` (each gets batch / k, so compute stays
    matched): BTM's random-split ablation, c-BTM's cluster experts, an LR sweep's expert points.
    `elsewhere`: how the command names a new forest, should `path` be planned otherwise."""
    other = Forest.init(path, exist_ok=True)
    plan = shared_plan(forest, domains, expert_lr)
    if seed_ready(other):  # a rerun: its experts grew from the seed it holds, which must be this one
        if diff := other_seed(other, forest):  # e.g. a sweep's expert points branched at another LR
            raise UserError(
                f"{other.root}: its experts grew from a seed trained with other settings than "
                f"{forest.root}'s ({diff}); use another directory, or delete {other.root} to branch again"
            )
    else:  # hard links where the file system allows: both forests are elmforest's, never written in place
        # (a sweep's expert points, a study's and the quickstart's ablation forests each held a full copy)
        copy_dir_atomic(forest.root / "seed_state", other.root / "seed_state", link=True)
        other.set_seed(
            forest.seed_dir,
            link=True,
            tokens=forest.data["seed"]["tokens"],
            flops=forest.data["seed"]["flops"],
            source="shared with " + str(forest.root),
            extra={"plan": asdict(plan)},
            seed_fields={"config": forest.data["seed"]["config"]},
        )
    check_plan(other, plan, elsewhere)
    return other


def seed_from_checkpoint(
    forest: Forest, model_dir: str | Path, shards: Shards | None = None, trust_remote_code: bool = False
) -> dict:
    """Use any local HF checkpoint as the seed (no seed training; experts get a fresh optimizer). A
    forest's seed is never replaced: its experts branched from it (and a trained seed is the first
    part of the dense run), so another checkpoint here would leave them labelled "from seed" of a
    seed they never saw. The same weights again are kept. The checkpoint is loaded first (weights
    whole and finite, embeddings for every token of `shards`' tokenizer, that tokenizer its own):
    stored unchecked, a broken one failed only at the first expert, its shape already the forest's."""
    from elmforest.forest.staging import weight_digests
    from elmforest.model.build import resolve_model_dir

    seed = forest.data.get("seed")
    if seed:
        have, given = forest.seed_dir, resolve_model_dir(model_dir)
        if have.is_dir() and weight_digests(have) == weight_digests(given):
            print(f"note: {forest.root}: its seed has these weights already; kept")
            return seed
        raise UserError(
            f"{forest.root}: has a seed already ({seed.get('source') or 'trained here'}"
            f"{f', {len(forest.names)} expert(s) branched from it' if forest.names else ''}); another "
            "checkpoint would replace it under them: start a new forest (another --forest) for this one"
        )
    if shards is not None:
        from elmforest.model.build import load_model
        from elmforest.train.runcheck import check_same_tokenizer

        check_same_tokenizer(str(model_dir), shards.tokenizer_fingerprint, shards)
        load_model(model_dir, trust_remote_code=trust_remote_code, vocab_size=shards.vocab_size)
    if (own := resolve_model_dir(model_dir) / "elmforest_run.json").is_file():
        try:  # the experts' config unless --config/--preset give theirs: said now, refused where used
            read_seed_config(own)
        except UserError as e:
            print(f"note: {e}; experts of this seed need --preset or --config", file=sys.stderr)
    forest.set_seed(model_dir, source=f"local checkpoint {Path(model_dir).resolve()}")
    return forest.data["seed"]


def read_seed_config(own: Path) -> RunConfig:
    """A checkpoint seed's own training config (its elmforest_run.json), an error naming the file."""
    raw = read_json(own)  # (its errors name the file)
    try:
        return RunConfig.from_dict(raw)
    except UserError as e:
        raise UserError(f"{own}: {e}") from e


def train_dense(forest: Forest, shards: Shards, base: RunConfig, plan: Plan, progress: bool = True) -> dict:
    """The compute-matched dense baseline: the seed's run, continued to the full budget on all domains."""
    cfg = dense_config(base, plan, shards)
    return train(cfg, forest.root / "runs" / "dense", progress=progress)


def dense_config(base: RunConfig, plan: Plan, shards: Shards) -> RunConfig:
    """The seed's and dense run's config: they mix exactly the plan's domains (one list drives every
    phase), so a config that names other domains is refused rather than trained."""
    cfg = copy.deepcopy(base)
    if plan.domains is not None:
        mixed = cfg.data.domains or [d for d in shards.domains if shards.has(d, "train")]
        if sorted(mixed) != plan.domains:
            raise UserError(
                f"the seed and dense run would mix domains {sorted(mixed)} but the plan's experts are "
                f"{plan.domains}; one domain list must drive every phase (build both with plan_for)"
            )
    cfg.data.shards = str(Path(shards.root).resolve())
    cfg.train.steps, cfg.train.batch_size, cfg.train.stop_at = plan.total_steps, plan.batch_size, None
    return cfg
