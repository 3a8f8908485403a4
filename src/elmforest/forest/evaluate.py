"""Bits per byte of a forest: full ensemble, sparse top-k ensemble, or parameter average.

Windows and the byte convention are exactly those of single-model evaluation (eval/bpb.py), so a
forest's numbers compare directly with a dense model's. Each expert is run on its own and only
its per-token log-probs are kept; the mixture is formed afterwards (forest/posterior.py).

Cached prior (BTM): for each target domain, the posterior over experts after each window of the
first `prior_batches` batches of 8 windows (default 20: 160 windows, or every window when there are
fewer) of that domain's *validation* split, averaged over all those windows (`prior_alpha=None`),
or smoothed by BTM's exponential moving average of per-batch means, bias-corrected
(`prior_alpha=0.3`). It is then either the prior of the per-token Bayes posterior
(`weighting=posterior`), or the fixed mixture weights (`weighting=fixed`). A domain without a
validation split (a small out-of-domain set) gets the uniform prior, and the result says so (`prior_source`). The prior never
sees the test split.

Document boundaries (`reset`): with "document" (the default) the posterior, and c-BTM's routing,
restart at each document's first token inside a window; "window" carries them across documents
within a window (the behaviour before; kept to measure the difference). See forest/posterior.py.

A domain of the shards without documents in the evaluated split is named (stderr and `missing` in the
result), as for single models; an expert with non-finite log-probs is an error naming it (pool.py).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from elmforest.config import PRIOR_BATCHES
from elmforest.data.shards import Shards
from elmforest.data.tokenizer import load_tokenizer
from elmforest.eval.bpb import (
    StreamScore,
    check_finite,
    check_seq_len,
    evaluate_shards,
    missing_domains,
    n_windows,
    no_split_hint,
    select_documents,
)
from elmforest.forest.cluster_route import ClusterContext
from elmforest.forest.manifest import Forest
from elmforest.forest.mixture import _mixture_nll, tied_at_k
from elmforest.forest.pool import (  # noqa: F401 - re-exported: the pool is part of this module's API
    PRIOR_BATCH_WINDOWS,
    ExpertPool,
    check_intact,
    doc_starts,
    estimate_prior,
    estimate_prior_info,
    make_pool,
    valid_mask,
)
from elmforest.merge.average import average_state_dict, warn_unrelated
from elmforest.model.build import load_model
from elmforest.utils.errors import UserError
from elmforest.utils.typed import expert_selection

MODES = ("ensemble", "topk", "average", "cluster")
RESETS = ("document", "window")


def _score(nll: float, n_tok: int, n_bytes: int, n_docs: int) -> dict:
    sc = StreamScore(nll, n_tok, n_bytes + n_docs)
    return {
        "bpb": sc.bpb,
        "ppl": sc.ppl,
        "tokens": n_tok,
        "bytes": sc.bytes,
        "documents": n_docs,
        "nll_nats": nll,
    }


def evaluate_forest_shards(
    forest: Forest,
    shards: Shards,
    mode: str = "ensemble",
    k: int = 2,
    prior: str = "cached",
    weighting: str = "posterior",
    select: str = "prior",
    split: str = "test",
    domains: list[str] | None = None,
    seq_len: int = 256,
    batch_size: int = 16,
    max_bytes: int | None = None,
    prior_batches: int = PRIOR_BATCHES,
    prior_split: str = "valid",
    device: str = "auto",
    precision: str = "auto",
    keep_loaded: bool = True,
    experts: list[str] | None = None,
    pool: ExpertPool | None = None,
    temperature: float = 0.1,
    route: str = "sequence",
    reset: str = "document",
    prior_alpha: float | None = None,
    given_prior: dict[str, dict[str, float]] | None = None,
    reroute: bool = True,
    where: str | None = None,
    router_context: str = "window",
) -> dict:
    """`pool` (from `make_pool`) may be shared between calls, so experts are loaded and run once.

    prior="given" takes each domain's prior from `given_prior` (domain -> expert -> weight, renormalised):
    weights known without looking at the text, e.g. X-ELM's routing by the document's language.

    mode="cluster" is c-BTM's sparse routing: the top-k experts by exp(−‖h(context) − c_j‖² / T) with
    the forest's clusterer, per window (`route="sequence"`) or per segment of W tokens (`segment:W`).
    With reset="document" each document is also re-routed 1, 2, 4, ... tokens into it; reroute=False
    routes it only at its first token and the grid, as c-BTM's own evaluation does. The router reads
    the document's text in the window being scored (`router_context="window"`: the tokens every other
    model conditions on), or all of it before the position ("document": more than the dense model sees).
    """
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; expected one of {MODES}")
    if prior not in ("cached", "uniform", "given"):
        raise UserError(f"unknown prior {prior!r}; expected cached, uniform or given")
    if (prior == "given") != (given_prior is not None):
        raise UserError("prior='given' needs given_prior (domain -> expert -> weight), and only it does")
    if reset not in RESETS:
        raise UserError(f"unknown reset {reset!r}; expected one of {RESETS}")
    if prior == "cached" and prior_split == split:
        raise UserError(f"the prior must come from other documents than the {split!r} split it scores")
    names = expert_selection(experts, "evaluate_forest_shards") or forest.names
    if not names:
        raise UserError(f"{forest.root}: the forest has no experts")
    for name in names:
        check_seq_len(forest.expert_dir(name), seq_len)
    if forest.data["tokenizer"] != shards.tokenizer_fingerprint:
        raise UserError(
            f"{shards.root} was tokenized with a different tokenizer than the forest's experts; pass the raw "
            "text instead (it is re-tokenized with the forest's tokenizer)"
        )
    shards.check_eos(load_tokenizer(forest.expert_dir(names[0])).eos_id, forest.expert_dir(names[0]))
    n = len(names)
    if mode in ("topk", "cluster") and k < 1:  # cluster: no cluster routed to, NaN weights
        raise UserError(f"k must be at least 1, got {k}")
    if mode == "topk" and k > n:  # cluster: k counts clusters, and one expert may serve several (below)
        print(f"note: --k {k} is more than the forest's {n} experts: every expert is used", file=sys.stderr)
        k = n
    if mode == "average":
        warn_unrelated(forest, names, "averaging")
    own_pool = pool is None  # nobody scores these domains again with it: keep one domain's log-probs
    pool = pool or make_pool(forest, names, device, precision, batch_size, keep_loaded)
    if pool.dirs != [forest.expert_dir(x) for x in names]:
        raise UserError("the expert pool does not hold this forest's experts")
    dev, amp = pool.device, pool.amp
    pool.passes = 0
    wanted, left_out = missing_domains(shards, split, domains, where)
    if not wanted:
        raise UserError(f"{where or shards.root}: no domain has a {split!r} split" + no_split_hint(where))
    eos = shards.eos_id
    out, posterior_table, full_passes, prior_passes = {}, {}, 0, 0
    tied: dict[tuple, list[str]] = {}  # the experts a tie chose -> the domains it chose them for
    if mode == "cluster":
        prior = "uniform"  # routing replaces the prior
        cluster_ctx = ClusterContext(
            forest,
            names,
            shards,
            k,
            temperature,
            route,
            seq_len,
            reset,
            reroute=reroute,
            context=router_context,
        )
        if k > (clusters := int(cluster_ctx.allowed.sum())):
            print(
                f"note: --k {k} is more than the {clusters} clusters with an expert: every one is used",
                file=sys.stderr,
            )
            k = clusters
    # mode average: one model, holding the average of the last weights (a uniform prior: one average)
    averaged, averaged_by = None, None
    for d in wanted:
        n_docs, n_tok, n_bytes = select_documents(shards.documents(d, split), max_bytes)
        stream = shards.tokens(d, split)[:n_tok]
        nw = n_windows(n_tok, seq_len)
        full_passes += n * n_tok
        entry: dict = {}
        if prior == "cached" and shards.has(d, prior_split):
            pool.scoring = f"{d}/{prior_split}"
            pkey = (str(shards.root), d, prior_split)
            before = pool.passes
            pi, used = estimate_prior_info(
                pool, shards.tokens(d, prior_split), eos, seq_len, prior_batches, prior_alpha, key=pkey
            )
            prior_passes += pool.passes - before
            entry["prior_source"] = f"{d}/{prior_split}: {used} windows"
        elif prior == "given" and mode != "cluster":
            pi = _given(given_prior, d, names)
            entry["prior_source"] = "given"
        else:
            pi = torch.full((n,), 1.0 / n, dtype=torch.float64)
            entry["prior_source"] = (
                "uniform"
                if prior == "uniform" or mode == "cluster"
                else f"uniform: {d} has no {prior_split} split"
            )
        if mode == "cluster":  # no prior: the clusterer's routing alone weighs the experts
            entry["prior_source"] = "none: c-BTM routing"
        else:
            entry["prior"] = dict(zip(names, pi.tolist(), strict=True))
            top = int(torch.argmax(pi))
            entry["prior_max"] = {"expert": names[top], "weight": float(pi[top])}
        starts = doc_starts(stream, eos, seq_len, nw) if reset == "document" else None
        pool.scoring = f"{d}/{split}"
        if mode == "cluster":
            nll, mean_w, run, fallback = cluster_ctx.nll(pool, stream, nw)
            entry.update(_score(nll, n_tok, n_bytes, n_docs))
            entry["fallback_share"] = fallback  # tokens routed by the size prior: no known word yet
            entry["posterior"] = dict(zip(names, mean_w.tolist(), strict=True))
            entry["experts_run"] = [names[j] for j in run]
            posterior_table[d] = entry["posterior"]
        elif mode == "average":
            weights = pi.tolist()
            if weights != averaged_by:  # every expert's weights read again per domain otherwise
                if averaged is None:
                    averaged = load_model(pool.dirs[0])
                state = average_state_dict(pool.dirs, weights)
                missing, unexpected = averaged.load_state_dict(state, strict=False)
                if unexpected or any(not _is_tied(averaged, m) for m in missing):
                    raise UserError(
                        f"averaged weights do not fit the model (missing {missing}, unexpected {unexpected})"
                    )
                averaged_by = weights
            res = evaluate_shards(
                averaged,
                shards,
                split,
                [d],
                seq_len,
                batch_size,
                max_bytes,
                device,
                precision,
                progress=False,
                name=f"{forest.root} (the parameter average of {', '.join(names)})",
            )
            pool.passes += n_tok
            entry.update({k2: v for k2, v in res["domains"][d].items()})
            entry["weights"] = dict(zip(names, weights, strict=True))
            posterior_table[d] = entry["weights"]
        else:
            key = (str(shards.root), d, split, n_tok)
            nll, mean_w, run = _mixture_nll(
                pool, stream, eos, seq_len, nw, pi, mode, k, weighting, select, key, starts
            )
            entry.update(_score(nll, n_tok, n_bytes, n_docs))
            entry["posterior"] = dict(zip(names, mean_w.tolist(), strict=True))
            entry["experts_run"] = [names[j] for j in run]
            posterior_table[d] = entry["posterior"]
            if mode == "topk" and select == "prior" and tied_at_k(pi, k):
                entry["top_by"] = "a tie in the prior: the first experts in the forest's order"
                tied.setdefault(tuple(entry["experts_run"]), []).append(d)
        check_finite(entry["nll_nats"], str(forest.root), d, split)
        out[d] = entry
        if own_pool:
            pool.clear_cache()
    pool.scoring = ""
    if tied:  # one clause per set of experts chosen (a uniform prior: every domain, the same experts)
        said = "; ".join(
            f"{_some(ds)} ({', '.join(run)})" for run, ds in sorted(tied.items(), key=lambda x: -len(x[1]))
        )
        print(
            f"note: top-{k} by the prior, which ties for {said}: those experts are the first in "
            "the forest's order, not chosen by the data (a cached prior from a valid split, or "
            "--select prefix:W, chooses by the data)",
            file=sys.stderr,
        )
    return {
        "domains": out,
        "mean_bpb": float(np.mean([v["bpb"] for v in out.values()])),
        "missing": left_out,
        "mode": mode,
        "k": k if mode in ("topk", "cluster") else n,
        "temperature": temperature if mode == "cluster" else None,
        "route": route if mode == "cluster" else None,
        "reroute": reroute if mode == "cluster" and reset == "document" else None,
        "router_context": router_context if mode == "cluster" else None,
        "prior": prior if mode != "cluster" else None,
        "weighting": weighting if mode in ("ensemble", "topk") else None,
        "reset": reset if mode in ("ensemble", "topk", "cluster") else None,
        "select": select if mode == "topk" else None,
        # c-BTM: the share of scored tokens routed by the cluster sizes (their document had no known word)
        "fallback_share": (
            sum(v["fallback_share"] * v["tokens"] for v in out.values())
            / max(sum(v["tokens"] for v in out.values()), 1)
            if mode == "cluster"
            else None
        ),
        "experts": names,
        "split": split,
        "seq_len": seq_len,
        "max_bytes": max_bytes,
        "prior_batches": prior_batches,
        "prior_split": prior_split,
        "prior_estimate": "mean of the windows' posteriors"
        if prior_alpha is None
        else f"EMA {prior_alpha:g}",
        "device": str(dev),
        "precision": str(amp or torch.float32).replace("torch.", ""),
        "posterior": posterior_table,
        "compute": {
            "expert_token_passes": pool.passes - prior_passes,
            "full_ensemble_token_passes": full_passes,
            "fraction_of_full": (pool.passes - prior_passes) / max(full_passes, 1),
            "prior_token_passes": prior_passes,  # estimating the cached prior on the valid split
        },
        "convention": "EOS predicted and counted as 1 byte per document; non-overlapping windows",
    }


def _given(given_prior: dict, d: str, names: list[str]) -> torch.Tensor:
    w = given_prior.get(d)
    if w is None:
        raise UserError(f"given_prior has no weights for domain {d!r}")
    unknown = sorted(set(w) - set(names))
    if unknown:
        raise UserError(f"given_prior for {d!r} names expert(s) {unknown} not among {names}")
    pi = torch.tensor([float(w.get(x, 0.0)) for x in names], dtype=torch.float64)
    if not bool(torch.isfinite(pi).all()) or bool((pi < 0).any()) or float(pi.sum()) <= 0:
        raise UserError(f"given_prior for {d!r} must be non-negative weights with a positive sum, got {w}")
    return pi / pi.sum()


def _some(names: list[str], shown: int = 6) -> str:
    """A list of domains for a note: the first few and how many more (64 domains were one long line)."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _is_tied(model, name: str) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False)) and name.endswith("lm_head.weight")
