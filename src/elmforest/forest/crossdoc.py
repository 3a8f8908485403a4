"""Cross-document BPB of a forest (issue 17): the tasks and tables of eval/crossdoc.py, scored by BTM's
ensemble.

Each expert scores the same sequences alone; the mixture is formed afterwards. Its weights are the
Bayes posterior over the *whole* sequence: log w_j(t) = log π_j + Σ_{s<t} log p_j(s), the sum running
over the context and the target tokens before t, so related documents before the target route it too
(no restart at the context's EOS separators: the context is there to inform the target). The prior
π is BTM's cached prior of the target's domain, estimated on that domain's *valid* split exactly as
forest/evaluate.py estimates it (estimate_prior_info: the windows' posteriors, at the same seq_len),
never on test; a domain without a valid split gets the uniform prior, and `prior_source` says so.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from elmforest.config import PRIOR_BATCHES
from elmforest.eval.crossdoc import TaskOptions, prepare_crossdoc, score_sequences, sequences, summarize
from elmforest.eval.crossdoc_tasks import TASKS
from elmforest.forest.manifest import Forest
from elmforest.forest.pool import estimate_prior_info, make_pool
from elmforest.forest.posterior import ensemble_logprob
from elmforest.utils.errors import UserError
from elmforest.utils.io import write_json_atomic
from elmforest.utils.typed import expert_selection


def mixture_target_logprobs(ctx: torch.Tensor, tgt: torch.Tensor, log_prior: torch.Tensor):
    """The ensemble's log-probs of the target tokens [n, T] and its weights there [N, n, T].

    ctx [N, n]: each expert's log-likelihood of each context; tgt [N, n, T]: its log-probs of the target
    tokens (0 past a target's end, which then adds nothing); log_prior [N, n]. All float64.
    """
    before = torch.cumsum(tgt, -1) - tgt  # Σ over the target tokens before t
    lw = log_prior[:, :, None] + ctx[:, :, None] + before
    lw = lw - torch.logsumexp(lw, 0, keepdim=True)
    return ensemble_logprob(tgt, lw), lw


def evaluate_forest_crossdoc(
    forest_dir: str | Path,
    shards_path: str | Path,
    seq_len: int | None = None,
    target_len: int | None = None,
    max_docs: int | None = 200,
    seed: int = 0,
    tasks=tuple(TASKS),
    neighbours: int = 64,
    max_cosine: float = 0.9,
    domains: list[str] | None = None,
    prior: str = "cached",
    prior_batches: int = PRIOR_BATCHES,
    prior_alpha: float | None = None,
    experts: list[str] | None = None,
    batch_size: int = 16,
    device: str = "auto",
    precision: str = "auto",
    keep_loaded: bool = True,
    progress: bool = False,
    out: str | Path | None = None,
    pool=None,
) -> dict:
    """Cross-document BPB of the forest's full ensemble (or of `experts`); the same tasks, targets and
    table as evaluate_crossdoc, so a dense model's numbers compare directly. `pool` (make_pool) may be
    shared with evaluate_forest_shards on the same shards: the valid-split priors are then computed once."""
    if prior not in ("cached", "uniform"):
        raise UserError(f"unknown prior {prior!r}; expected cached or uniform")
    experts = expert_selection(experts, "evaluate_forest_crossdoc")
    forest = Forest.load(forest_dir)
    names = experts or forest.names
    if not names:
        raise UserError(f"{forest.root}: the forest has no experts")
    opts = TaskOptions(seq_len, target_len, max_docs, seed, tasks, neighbours, max_cosine, domains)
    prep = prepare_crossdoc(
        shards_path,
        opts,
        [forest.expert_dir(x) for x in names],
        forest.data["tokenizer"],
        "the forest's experts",
    )
    shards, seq_len, items = prep.shards, prep.seq_len, prep.items
    pool = pool or make_pool(forest, names, device, precision, batch_size, keep_loaded)
    if pool.dirs != [forest.expert_dir(x) for x in names]:
        raise UserError("the expert pool does not hold this forest's experts")
    n = len(names)
    priors, sources = {}, {}
    before = pool.passes  # a shared pool has counted another evaluation's passes already
    for d in dict.fromkeys(it.domain for its in items.values() for it in its):
        if prior == "cached" and shards.has(d, "valid"):
            pool.scoring = f"{d}/valid"
            key = (str(shards.root), d, "valid")
            pi, used = estimate_prior_info(
                pool, shards.tokens(d, "valid"), shards.eos_id, seq_len, prior_batches, prior_alpha, key=key
            )
            sources[d] = f"{d}/valid: {used} windows"
        else:
            pi = torch.full((n,), 1.0 / n, dtype=torch.float64)
            sources[d] = "uniform" if prior == "uniform" else f"uniform: {d} has no valid split"
        priors[d] = pi.double()
    prior_passes = pool.passes - before
    mark = pool.passes
    groups = [
        (task, cond) for task in items if items[task] for cond in TASKS[task]
    ]  # a task none qualify for: unscored
    seqs = {g: sequences(items[g[0]], g[1]) for g in groups}
    scores: dict = {g: [] for g in groups}
    for j in range(n):  # expert by expert: with keep_loaded=False each is loaded once
        model = pool.model(j)
        for g in groups:
            c, t = score_sequences(
                model, seqs[g], shards.eos_id, batch_size, pool.device, pool.amp, str(pool.dirs[j]), progress
            )
            scores[g].append((c, t))
            pool.passes += sum(len(s) for s, _ in seqs[g])
    nll, weights = {}, {}
    for task, cond in groups:
        its = items[task]
        ctx = torch.from_numpy(np.stack([c for c, _ in scores[(task, cond)]]))
        tgt = torch.from_numpy(np.stack([t for _, t in scores[(task, cond)]]))
        log_prior = torch.stack([torch.log(priors[it.domain]) for it in its], 1)
        ens, lw = mixture_target_logprobs(ctx, tgt, log_prior)
        lens = torch.tensor([len(it.target) for it in its])
        mask = (torch.arange(tgt.shape[-1])[None, :] < lens[:, None]).double()
        nll[(task, cond)] = -(ens * mask).sum(1).numpy()
        w = (lw.exp() * mask).sum(-1)  # [N, n]: summed weight over each target's tokens
        weights[(task, cond)] = {
            d: dict(zip(names, _mean_over(w, lens, its, d), strict=True))
            for d in dict.fromkeys(x.domain for x in its)
        }
    res = {
        "forest": str(forest.root),
        "experts": names,
        **prep.header(pool.device, pool.amp),
        "prior": {d: dict(zip(names, p.tolist(), strict=True)) for d, p in priors.items()},
        "prior_source": sources,
        "prior_batches": prior_batches,
        "prior_estimate": "mean of the windows' posteriors"
        if prior_alpha is None
        else f"EMA {prior_alpha:g}",
        "tasks": summarize(items, nll),
        "compute": {"expert_token_passes": pool.passes - mark, "prior_token_passes": prior_passes},
    }
    for (task, cond), w in weights.items():
        res["tasks"][task]["conditions"][cond]["posterior"] = w
    if out:
        write_json_atomic(out, res)
    return res


def _mean_over(w: torch.Tensor, lens: torch.Tensor, items, d: str) -> list[float]:
    """Each expert's mean weight over the target tokens of domain d."""
    sel = torch.tensor([i for i, it in enumerate(items) if it.domain == d])
    total = float(lens[sel].sum())
    return [float(x) / total if total else math.nan for x in w[:, sel].sum(1)]
