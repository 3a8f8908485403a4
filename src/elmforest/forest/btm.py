"""Branch-Train-Merge: seed, branch, train each expert alone, merge it into the forest.

Compute is matched the way the BTM paper does it (see shards/REFERENCE notes in docs/btm.md):
the dense baseline is one run of S steps at batch B; the seed *is* its first `seed_share · S`
steps (a paused checkpoint of the same run), and each of the k experts continues the seed's
weights, Adam moments and LR schedule for the remaining steps at batch B / k on its own domain.
Seed + k experts then train exactly as many tokens (and FLOPs) as the dense run, and the dense
baseline continues from the seed instead of being trained again.

Each expert is its own resumable run directory (forest/runs/<name>) and touches nothing that
another expert reads, so experts can train in any order, in separate processes or machines.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from safetensors.torch import load_model as st_load_model

from elmforest.config import RunConfig
from elmforest.data.shards import Shards
from elmforest.data.tokenizer import load_tokenizer, save_tokenizer
from elmforest.forest.branching import _flexolmo_owner, _kept_average, branch_weights, owner_overrides
from elmforest.forest.kept import check_branch, check_kept, set_aside_damaged_run_model
from elmforest.forest.manifest import Forest, architecture_fingerprint, valid_name
from elmforest.forest.plan import Plan, check_plan, plan_domains, plan_for  # noqa: F401 - btm.Plan etc.
from elmforest.forest.trust import copy_regular_files
from elmforest.model.build import build_model
from elmforest.train.trainer import train
from elmforest.utils.errors import Failed, UserError
from elmforest.utils.io import read_json, remove_path, staged_dir, temp_sibling, write_json_atomic


def data_fingerprint(shards: Shards, domains: list[str], split: str = "train") -> str:
    """Identifies the training data: tokenizer, and each domain's document table (ends and bytes)."""
    h = hashlib.sha256(shards.tokenizer_fingerprint.encode())
    for d in sorted(domains):
        h.update(d.encode())
        h.update(np.ascontiguousarray(shards.documents(d, split)).tobytes())
    return h.hexdigest()[:16]


def export_checkpoint(ckpt: Path, cfg: RunConfig, shards: Shards, out: Path) -> Path:
    """Turn a trainer checkpoint into an HF checkpoint directory (atomically)."""
    model = build_model(cfg.model, shards.vocab_size, shards.eos_id)
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


def seed_ready(forest: Forest) -> bool:
    """A trained seed is complete only with its config, the plan and the full trainer state."""
    seed = forest.data.get("seed") or {}
    state = forest.root / "seed_state"
    return (
        "config" in seed
        and "plan" in forest.data
        and all((state / f).is_file() for f in ("model.safetensors", "optimizer.safetensors", "state.json"))
    )


def copy_dir_atomic(src: Path, dst: Path) -> None:
    with staged_dir(dst) as tmp:
        copy_regular_files(src, tmp)


def share_seed(
    path: str | Path, forest: Forest, domains: list[str], expert_lr: float | None = None
) -> Forest:
    """A new forest grown from the same seed (copied whole, recorded in one manifest write), with the
    budget split between one expert per domain of `domains` (each gets batch / k, so compute stays
    matched): BTM's random-split ablation, c-BTM's cluster experts, an LR sweep's expert points."""
    other = Forest.init(path, exist_ok=True)
    old = Plan(**forest.data["plan"])
    lr = expert_lr if expert_lr is not None else old.expert_lr
    plan = Plan(old.total_steps, old.batch_size, len(domains), old.seed_share, list(domains), lr)
    if seed_ready(other):  # a rerun: its experts grew from the seed it holds, which must be this one
        from elmforest.train.runcheck import settings_diff

        if diff := settings_diff(
            other.data["seed"]["config"], forest.data["seed"]["config"]
        ):  # e.g. a sweep's expert points branched from the dense run at another LR
            raise UserError(
                f"{other.root}: its experts grew from a seed trained with other settings than "
                f"{forest.root}'s ({diff}); use another directory, or delete {other.root} to branch again"
            )
    else:
        copy_dir_atomic(forest.root / "seed_state", other.root / "seed_state")
        other.set_seed(
            forest.seed_dir,
            tokens=forest.data["seed"]["tokens"],
            flops=forest.data["seed"]["flops"],
            source="shared with " + str(forest.root),
            extra={"plan": asdict(plan)},
            seed_fields={"config": forest.data["seed"]["config"]},
        )
    check_plan(other, plan)
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

        check_same_tokenizer(str(model_dir), shards.tokenizer_fingerprint, Path(shards.root))
        load_model(model_dir, trust_remote_code=trust_remote_code, vocab_size=shards.vocab_size)
    forest.set_seed(model_dir, source=f"local checkpoint {Path(model_dir).resolve()}")
    return forest.data["seed"]


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


def expert_config(
    forest: Forest,
    shards: Shards,
    domain: str,
    base: RunConfig | None = None,
    trust_remote_code: bool = False,
) -> RunConfig:
    """The run config of a domain expert branched from the forest's seed (BTM's recipe).

    Remote code is `trust_remote_code` (the command line's flag), never the manifest's: a forest from
    someone else cannot turn it on. A trained seed's model is rebuilt from the forest's own copy of
    the seed, never from a path the manifest names outside the forest."""
    seed = forest.data.get("seed")
    if not seed:
        raise UserError(
            f"{forest.root}: the forest has no seed; train one (forest seed) or set one from a checkpoint"
        )
    if "config" in seed and (forest.root / "seed_state").is_dir():
        plan = Plan(**forest.data["plan"])
        cfg = RunConfig.from_dict(seed["config"])
        cfg.train.batch_size = plan.expert_batch_size
        cfg.train.init_checkpoint = str((forest.root / "seed_state").resolve())
        if cfg.model.init_from is not None:  # its architecture; the weights come from seed_state
            cfg.model.init_from = str(forest.seed_dir.resolve())
        if plan.expert_lr is not None:  # the seed's schedule, continued at the experts' own peak LR
            cfg.optim.lr = plan.expert_lr
    else:
        if base is None:
            raise UserError("the seed came from a checkpoint: give the experts' run config (preset/--set)")
        cfg = copy.deepcopy(base)
        cfg.model.init_from = str(forest.seed_dir.resolve())
    cfg.data.shards = str(Path(shards.root).resolve())
    cfg.data.domains = [domain]
    cfg.train.stop_at = None
    cfg.model.trust_remote_code = trust_remote_code
    return cfg


def train_expert(
    forest: Forest,
    shards: Shards,
    domain: str,
    name: str | None = None,
    branch: str = "seed",
    base: RunConfig | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
    prior_batches: int = 20,
    force: bool = False,
    trust_remote_code: bool = False,
    mix: list[str] | None = None,
    candidates: list[str] | None = None,
) -> dict:
    """Branch, train on `domain` only, and merge into the forest. Idempotent: a finished expert is kept;
    one whose checkpoint went missing from the forest is restored from its run (or trained again).

    branch: "seed" (default), "expert:NAME" (start from one expert's weights), "mixture"
    (a posterior-weighted average of the current experts, weights stored in the lineage), or
    "nearest[:posterior|typology]" (X-ELM: the most similar expert, forest/nearest.py; the measure and
    every expert's score stored in the lineage).

    `mix`: the expert trains on these domains instead, mixed as the seed's run mixes its domains
    (`data.mixture`), and is recorded with all of them: X-ELM's expert for a group of languages,
    each language kept a domain of its own so the group's languages stay balanced and every
    language is still scored on its own. `domain` (one of `mix`) is then the domain whose valid split
    `nearest:posterior` / `mixture` weigh the experts on, and the default name. `candidates` limits
    the experts `nearest` may pick (default: all).
    """
    from elmforest.config import apply_overrides
    from elmforest.merge.average import average_checkpoints

    name = valid_name(name or domain)
    replace, arch = False, None
    check_branch(branch)
    if name in forest.names:
        # a flipped byte keeps the size: check the sums (not read again for files unchanged since)
        problem = forest.intact(name, deep=True, trust_unchanged=True)
        want = None
        if base is not None:  # a checkpoint seed: the config asked for now, whole
            want = expert_config(forest, shards, (list(mix) if mix else [domain])[0], base, trust_remote_code)
            want.data.domains = list(mix) if mix else [domain]
            if branch == "flexolmo":  # what makes it an owner run (_flexolmo_owner), as it was saved
                want = apply_overrides(want, owner_overrides())
        check_kept(forest, name, list(mix) if mix else [domain], branch, list(overrides or []), want)
        if problem is None:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"note: expert {name} exists, trained as asked; kept (not trained again)")
            return forest.expert(name)
        print(f"note: expert {name}: {problem}; restoring it from runs/{name} (training what is missing)")
        set_aside_damaged_run_model(forest, name)
        replace = True
    if name in forest.removed and not force:
        raise UserError(
            f"{forest.root}: expert {name!r} was opted out (forest remove); only its owner may train it "
            "again (forest expert --force)"
        )
    trained = list(mix) if mix else [domain]
    if mix is not None and (not mix or len(set(mix)) != len(mix) or domain not in mix):
        raise UserError(f"expert {name}: mix must list each domain once, {domain!r} among them; got {mix}")
    no_data = [d for d in trained if not shards.has(d, "train")]
    if no_data:
        raise UserError(f"{shards.root}: no training data for domain(s) {no_data}; have {shards.domains}")
    cfg = expert_config(forest, shards, trained[0], base, trust_remote_code)
    cfg.data.domains = trained
    planned = (forest.data.get("plan") or {}).get("domains")
    label = name if mix else domain
    if planned is not None and label not in planned and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"note: {label!r} is not one of the plan's experts {planned}: this expert's compute comes on "
            "top of the matched budget (the forest's ledger counts it)"
        )
    parents: list[dict] = [{"name": "seed", "weight": 1.0}]
    extra = {"run": f"runs/{name}", "branch": branch}
    if branch == "nearest" or branch.startswith("nearest:"):  # X-ELM: from the most similar expert
        from elmforest.forest.nearest import nearest_expert

        src, extra["nearest"] = nearest_expert(
            forest, shards, domain, branch.partition(":")[2] or "posterior", among=candidates
        )
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"note: {name} branches from {src} ({extra['nearest']['by']})")
        branch = f"expert:{src}"
    if branch.startswith("expert:") or branch == "mixture":
        sources = [branch.split(":", 1)[1]] if branch != "mixture" else forest.names
        owners = [n for n in sources if n in forest.names and forest.expert(n).get("branch") == "flexolmo"]
        if owners:  # refused before training, not after: its shape is not the forest's
            raise UserError(
                f"cannot branch from FlexOlmo owner(s) {owners}: they are 2-expert MoEs, not the seed's "
                "architecture; branch from the seed (--branch flexolmo for another owner)"
            )
        if branch == "mixture":
            init = forest.root / "branches" / name
            others = [n for n in forest.names if n != name]
            meta = _kept_average(init, name, domain, others, forest.root / "runs" / name)
            if meta is not None:  # a re-run: keep the weights actually averaged
                weights = dict(zip(meta["names"], meta["weights"], strict=True))
            elif int(os.environ.get("RANK", "0")) != 0:  # data parallel: the first process averages
                import time

                end = time.time() + 3600
                while (
                    meta := _kept_average(init, name, domain, others, forest.root / "runs" / name)
                ) is None:
                    if time.time() > end:
                        raise Failed(f"{init}: the branch average never appeared")
                    time.sleep(0.05)
                weights = dict(zip(meta["names"], meta["weights"], strict=True))
            else:
                weights = branch_weights(forest, shards, domain, prior_batches, names=others)
                average_checkpoints(
                    [forest.expert_dir(n) for n in weights],
                    init,
                    list(weights.values()),
                    metadata={"branch_for": domain, "names": list(weights)},
                )
            parents = [{"name": n, "weight": w} for n, w in weights.items()]
        else:
            src = branch.split(":", 1)[1]
            init = forest.expert_dir(src)
            parents = [{"name": src, "weight": 1.0}]
        # A branched expert starts a schedule of its own from those weights (no optimizer state to continue).
        plan = forest.data.get("plan")
        cfg.train.init_checkpoint = None
        cfg.model.init_from = str(Path(init).resolve())
        if plan:
            cfg.train.steps = plan["total_steps"] - Plan(**plan).seed_steps
    elif branch == "flexolmo":
        cfg, owner = _flexolmo_owner(forest, shards, domain, name, cfg)
        overrides = [*owner, *(overrides or [])]
        arch = architecture_fingerprint(cfg.model.init_from)
    cfg = apply_overrides(cfg, list(overrides or []))
    run_dir = forest.root / "runs" / name
    if name in forest.removed and int(os.environ.get("RANK", "0")) == 0:
        from elmforest.forest.optout import mark_retraining

        mark_retraining(forest, name)  # its run is the owner's again: `forest fsck` must not delete it
    summary = train(cfg, run_dir, progress=progress)
    if int(os.environ.get("RANK", "0")) != 0:  # data parallel: only the first process merges
        return {"name": name, "tokens": summary["tokens"], "flops": summary["flops"], "parents": parents}
    entry = forest.add(
        run_dir / "model",
        name,
        trained,
        parents=parents,
        tokens=summary["tokens"],
        flops=summary["flops"],
        data_fingerprint=data_fingerprint(shards, trained),
        extra=extra,
        force=force,
        replace=replace,
        architecture=arch,
    )
    return entry


def read_summary(forest: Forest, name: str) -> dict | None:
    p = forest.root / "runs" / name / "summary.json"
    return read_json(p) if p.is_file() else None
