"""Branch-Train-Merge: seed, branch, train each expert alone, merge it into the forest.

Compute is matched the way the BTM paper does it (see shards/REFERENCE notes in docs/btm.md):
the dense baseline is one run of S steps at batch B; the seed *is* its first `seed_share · S`
steps (a paused checkpoint of the same run), and each of the k experts continues the seed's
weights, Adam moments and LR schedule for the remaining steps at batch B / k on its own domain.
Seed + k experts then train exactly as many tokens (and FLOPs) as the dense run, and the dense
baseline continues from the seed instead of being trained again.

Each expert is its own resumable run directory (forest/runs/<name>) and touches nothing that
another expert reads, so experts can train in any order, in separate processes or machines.
The seed and the dense run are made in forest/seeding.py, the plan in forest/plan.py.
"""

from __future__ import annotations

import copy
import hashlib
import sys
from pathlib import Path

import numpy as np

from elmforest.config import PRIOR_BATCHES, RunConfig
from elmforest.data.shards import Shards
from elmforest.forest.branching import _flexolmo_owner, _kept_average, branch_weights, owner_overrides
from elmforest.forest.fingerprint import architecture_fingerprint
from elmforest.forest.kept import check_branch, check_kept, set_aside_damaged_run_model
from elmforest.forest.manifest import Forest, valid_name
from elmforest.forest.plan import Plan, check_plan, plan_domains, plan_for  # noqa: F401 - btm.Plan etc.
from elmforest.forest.seeding import (  # noqa: F401 - btm.train_seed etc.
    copy_dir_atomic,
    dense_config,
    export_checkpoint,
    seed_from_checkpoint,
    seed_overrides,
    seed_ready,
    share_seed,
    train_dense,
    train_seed,
)
from elmforest.train.trainer import train
from elmforest.utils.errors import ElmforestError, Failed, UserError
from elmforest.utils.io import read_json
from elmforest.utils.proc import first_process


def data_fingerprint(shards: Shards, domains: list[str], split: str = "train") -> str:
    """Identifies the training data: tokenizer, and each domain's document table (ends and bytes)."""
    h = hashlib.sha256(shards.tokenizer_fingerprint.encode())
    for d in sorted(domains):
        h.update(d.encode())
        h.update(np.ascontiguousarray(shards.documents(d, split)).tobytes())
    return h.hexdigest()[:16]


def _note_off_plan(name: str, planned, cfg, seed_steps: int) -> None:
    """A plan's expert that --set makes train other tokens than the plan's share (its steps, batch,
    sequence length, or a start from the seed's weights instead of its state) did so silently before
    (the ledger counted it; nothing said so): said, as an expert off the plan is. Compared by the
    tokens each config trains: a batch traded for accumulation at the same tokens is the plan's."""

    def tokens(c) -> int:  # from seed_state the run continues at the seed's step; from weights, at 0
        return (c.train.steps - (seed_steps if c.train.init_checkpoint else 0)) * c.train.tokens_per_step

    if (got := tokens(cfg)) != (want := tokens(planned)) or cfg.train.seq_len != planned.train.seq_len:
        print(
            f"note: expert {name} trains {got:,} tokens of {cfg.train.seq_len} (the plan's share: {want:,} of "
            f"{planned.train.seq_len}): its compute is not the plan's; the difference is off the matched "
            "budget (the forest's ledger counts what it trains)"
        )


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
    prior_batches: int = PRIOR_BATCHES,
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
    from elmforest.merge.average import average_checkpoints, normalise, warn_unrelated

    name = valid_name(name or domain)
    forest.check_new_name(name)  # before the training, not after it
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
            if first_process():
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
    twin = [e["name"] for e in forest.data["experts"] if e["name"] != name and e["domains"] == trained]
    off_plan = planned is not None and (label not in planned or bool(twin))  # on top of the budget: said
    if planned is not None and label not in planned and first_process():
        print(
            f"note: {label!r} is not one of the plan's experts {planned}: this expert's compute comes on "
            "top of the matched budget (the forest's ledger counts it)"
        )
    elif planned is not None and first_process() and twin:
        print(
            f"note: {twin[0]!r} is the plan's expert for {label!r} already: this second one's compute comes "
            "on top of the matched budget (the forest's ledger counts it)"
        )
    parents: list[dict] = [{"name": "seed", "weight": 1.0}]
    extra = {"run": f"runs/{name}", "branch": branch}
    if branch == "nearest" or branch.startswith("nearest:"):  # X-ELM: from the most similar expert
        from elmforest.forest.nearest import nearest_expert

        kept = forest.expert(name) if replace else {}  # a restore: the choice its run was branched on
        was = [p["name"] for p in kept.get("parents", [])]
        if kept.get("nearest") and len(was) == 1 and was[0] in forest.names and was[0] != name:
            src, extra["nearest"] = was[0], kept["nearest"]
        else:  # never itself (a damaged expert being restored cannot be scored, nor branched from)
            among = candidates if candidates is not None else [n for n in forest.names if n != name]
            src, extra["nearest"] = nearest_expert(
                forest, shards, domain, branch.partition(":")[2] or "posterior", prior_batches, among=among
            )
        if first_process():
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
            # a copy beside its original (`forest add` of its files, copy_of) would double its weight
            others = [
                n for n in forest.names if n != name and forest.expert(n).get("copy_of") not in forest.names
            ]
            meta = _kept_average(init, name, domain, others, forest.root / "runs" / name)
            if meta is not None:  # a re-run: keep the weights actually averaged
                weights = dict(zip(meta["names"], meta["weights"], strict=True))
            elif not first_process():  # data parallel: the first process averages
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
                warn_unrelated(forest, others, f"branching {name} from an average of")
                weights = branch_weights(forest, shards, domain, prior_batches, names=others)
                average_checkpoints(
                    [forest.expert_dir(n) for n in weights],
                    init,
                    list(weights.values()),
                    metadata={"branch_for": domain, "names": list(weights)},
                )
                # the weights averaged, as a re-run reads them back: one lineage whether or not cut
                weights = dict(zip(weights, normalise(list(weights.values()), len(weights)), strict=True))
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
    if owned := [
        o
        for o in overrides or []
        if o.partition("=")[0].strip() in ("data.domains", "data.shards", "data.split")
    ]:
        raise UserError(  # the manifest records the domain given; the run trained on the override's
            f"{owned[0]}: an expert's data is its --domain (or --mix) in --shards' train split, not a --set"
        )
    was = cfg
    cfg = apply_overrides(cfg, list(overrides or []))
    if planned is not None and not off_plan and first_process():
        _note_off_plan(name, was, cfg, Plan(**forest.data["plan"]).seed_steps)
    run_dir = forest.root / "runs" / name
    if name in forest.removed and first_process():
        from elmforest.forest.optout import finish_removal, mark_retraining, pending

        tomb = next(r for r in forest.data["removed"] if r["name"] == name)
        if name in pending(forest) and not tomb.get("retraining"):
            # a removal cut short: its old run must go before a new one starts there (it resumed at its
            # last step: the old weights back, counted twice, trained never)
            try:
                finish_removal(forest, name)
            except ElmforestError:
                if run_dir.exists():
                    raise
                print(
                    f"note: the removal of {name} is still pending (above); its old run is gone",
                    file=sys.stderr,
                )
        mark_retraining(forest, name)  # its run is the owner's again: `forest fsck` must not delete it
    summary = train(cfg, run_dir, progress=progress)
    if not first_process():  # data parallel: only the first process merges
        return {"name": name, "tokens": summary["tokens"], "flops": summary["flops"], "parents": parents}
    entry = forest.add(
        run_dir / "model",
        name,
        trained,
        ran=True,
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
