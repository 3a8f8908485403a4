"""Where an expert starts when it does not start from the seed: BTM's branch from a mixture (the
current experts' posterior on the new domain's valid data as the weights of their average, and the
average already written that a rerun keeps) and FlexOlmo's owner pair (the seed as a 2-expert MoE,
the owner's copy of the FFN the one to train).

Apart from forest/btm.py, which picks an expert's start and trains from it: these weigh or build the
start, and `branch_weights` also weighs a posterior merge (forest/commands.py) and X-ELM's nearest
expert (forest/nearest.py).
"""

from __future__ import annotations

from pathlib import Path

from elmforest.config import PRIOR_BATCHES, RunConfig
from elmforest.data.shards import Shards
from elmforest.forest.manifest import Forest
from elmforest.forest.plan import Plan
from elmforest.utils.errors import Failed, UserError
from elmforest.utils.io import read_json
from elmforest.utils.proc import first_process


def branch_weights(
    forest: Forest,
    shards: Shards,
    domain: str,
    prior_batches: int = PRIOR_BATCHES,
    device: str = "auto",
    names: list[str] | None = None,
    instead: str = "branch it with --branch seed or --branch expert:NAME",
) -> dict[str, float]:
    """BTM's branching from a mixture: the current forest's posterior over experts (`names`, default
    all) on the new domain's held-out (valid) data, estimated like a cached prior. `instead`: what the
    caller's user can do where the domain has no valid split (its own options, not branching's)."""
    from elmforest.eval.bpb import default_seq_len
    from elmforest.forest.evaluate import estimate_prior, make_pool

    if not forest.names:
        raise UserError(f"{forest.root}: no experts to branch from")
    if domain not in shards.domains:
        raise UserError(f"{shards.root}: no domain {domain!r}; it has {', '.join(shards.domains)}")
    if not shards.has(domain, "valid"):
        raise UserError(
            f"{shards.root}: domain {domain!r} has no valid split to weigh the experts on; {instead}, "
            "or build the shards with a larger --valid-frac"
        )
    if shards.tokenizer_fingerprint != forest.data["tokenizer"]:
        raise UserError(f"{shards.root} was tokenized with a different tokenizer than the forest's experts")
    names = list(names or forest.names)
    pool = make_pool(forest, names, device=device)
    seq_len = default_seq_len(forest.expert_dir(names[0]))
    pi = estimate_prior(pool, shards.tokens(domain, "valid"), shards.eos_id, seq_len, prior_batches)
    return dict(zip(names, pi.tolist(), strict=True))


def _kept_average(init: Path, name: str, domain: str, others: list[str], run_dir: Path | None) -> dict | None:
    """The metadata of a mixture branch's average already written, when it is still this expert's
    start: weighed for this domain, and on the forest's current experts unless its run has begun from
    it (a run cut before its first checkpoint, re-run for another domain, started from the posterior on
    the first one's text, recorded as its parents). None: average again."""
    from elmforest.train.runcheck import has_progress

    if not (init / "elmforest_average.json").is_file():
        return None
    meta = read_json(init / "elmforest_average.json")
    started = run_dir is not None and has_progress(run_dir)  # a checkpoint, or finished (its model)
    if meta.get("branch_for", domain) != domain:
        if started:
            raise UserError(
                f"expert {name}: its run began from an average weighed for domain {meta['branch_for']!r}, not "
                f"{domain!r}; train it for {meta['branch_for']!r}, or remove {run_dir} and {init} to start over"
            )
        return None
    if sorted(meta["names"]) != sorted(others) and not started:
        return None  # experts added or removed since: the current forest's posterior
    return meta


def _flexolmo_owner(forest: Forest, shards: Shards, domain: str, name: str, cfg: RunConfig):
    """FlexOlmo's owner training as an expert phase: the expert starts from the seed as a 2-expert MoE
    (merge/flexolmo.py: the public FFN frozen as expert 0, the owner's copy as expert 1, router rows
    from domain embeddings) and trains only expert 1 and its router row on its own domain; attention,
    embeddings, norms and head stay the seed's, so the owners merge with no training (`merge flexolmo
    --forest`). Its schedule is the expert phase's, started fresh (the seed's optimizer state has no
    place for a router), and its FLOPs are what that run costs, frozen weights' missing gradients
    included. Returns (config, overrides that make it an owner run)."""
    from elmforest.merge.flexolmo import owner_rows, public_pair

    init = forest.root / "branches" / name
    if not (init / "elmforest_pair.json").is_file():
        if not first_process():  # data parallel: the first process builds the pair
            from elmforest.utils.proc import wait_for

            if not wait_for([init / "elmforest_pair.json"], timeout=3600):
                raise Failed(f"{init}: the owner's pair never appeared")
        else:
            plan = forest.data.get("plan") or {}
            public = plan.get("domains") or [d for d in shards.domains if shards.has(d, "train")]
            rows = owner_rows(
                forest.seed_dir,
                shards,
                public,
                [domain],
                forest.root / "branches" / "flexolmo-public-rows.safetensors",
            )
            public_pair(forest.seed_dir, init, rows)
    cfg.train.init_checkpoint = None
    cfg.model.init_from = str(init.resolve())
    plan = forest.data.get("plan")
    if plan:
        cfg.train.steps = plan["total_steps"] - Plan(**plan).seed_steps
    return cfg, owner_overrides()


def owner_overrides() -> list[str]:
    """What makes a run a FlexOlmo owner's: only its FFN copy and router row train, the public FFN frozen."""
    from elmforest.merge.flexolmo import OWNER_TRAINABLE

    return [f"train.trainable={OWNER_TRAINABLE}", "train.frozen_experts=[0]"]
