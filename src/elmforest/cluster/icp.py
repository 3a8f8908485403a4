"""In-Context Pretraining ordering (Shi, Min, Lomeli et al. 2023): documents in an order where each
is followed by its most similar unvisited neighbour, so a context cut from the stream holds related
documents. A pure data stage: `icp_order(texts | TokenDocuments | embeddings, seed=...)` ->
(order, stats); `icp_plan` also returns the path segments and the dropped duplicates.

Stages: embed (icp_embed: the c-BTM tf-idf -> SVD embedding of words or token ids, or any embedder
with `.embed(texts) -> (z, ok)`); drop exact duplicates by hashing (a group of copies larger than k
would otherwise keep several members, since kNN sees only k of them); kNN with faiss; drop
near-duplicates (similarity ≥ threshold to an earlier kept kNN neighbour); greedy traversal
(icp_graph.greedy_path) over the similarity graph of the rest. Documents without a vector (no term
kept) cannot be placed by similarity: they follow the path in index order, one segment each, and
are counted. Every document is either in the order exactly once or dropped as a duplicate.

Duplicates are judged on the bag-of-words (tf-idf) cosine of the embedded prefixes when elmforest
embeds, confirmed on the whole documents' when either was cut to its prefix (documents sharing a header
longer than the prefix are not duplicates), on the embedding cosine when vectors or an embedder are given; exact duplicates are
documents of equal content (a digest of the whole token ids or text), or equal vectors. Why 0.9 by default: on the demo corpus
(bench/icp_order.py --show-pairs) kNN pairs at ≥ 0.95 are copies (one Jargon-File entry in two
glossaries, one licence twice) or stubs of one template whose only differences are words the
analyser drops; 0.9-0.95 holds versions of one licence and pages generated from one template
(ISO-8859 charset pages, codec modules); 0.8-0.9 about half such and half documents sharing only
boilerplate. 5.5% of the corpus goes at 0.9. The paper drops near-duplicates because repeated text
teaches copying (perplexity 8.3 vs 7.3) without stating a threshold; its public code drops a
document whose first 100 characters' 3-gram Jaccard with the previous one in the order exceeds
0.85. For given embeddings (a sentence encoder) choose the threshold for that encoder.

Cost: memory is the embeddings, the tf-idf rows and the N x k graph, never N x N; time is one
tokenising pass, an SVD on a 5,000-document sample, the kNN search (exact up to `exact_limit`,
IVF beyond) and Python loops that touch each graph edge a constant number of times.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import numpy as np

from elmforest.cluster import icp_dots
from elmforest.cluster.icp_embed import (
    MAX_CHARS,
    MAX_TOKENS,
    TokenDocuments,
    embed,
    embed_documents,
    token_blocks,
    unit,
)
from elmforest.cluster.icp_graph import (
    default_threads,
    edge_similarity,
    greedy_path,
    import_faiss,
    knn_search,
    near_duplicates,
    undirected_graph,
)
from elmforest.cluster.icp_pairs import content_keys, sparse_pair_cosine, whole_pair_cosine
from elmforest.utils.errors import UserError
from elmforest.utils.typed import check_call_args

__all__ = ["IcpPlan", "TokenDocuments", "embed_documents", "icp_order", "icp_plan"]


@dataclass
class IcpPlan:
    """The result of `icp_plan`: `order` (document indices, each kept document once), `segments`
    (offsets into order where a path starts: after a jump, or an unembedded document), the dropped
    duplicates with the earlier document each duplicates and their similarity, and `stats`
    (JSON-ready; `stats["seconds"]` is the only part that is not a function of data and seed)."""

    order: np.ndarray
    segments: np.ndarray
    dropped: np.ndarray
    dropped_partner: np.ndarray
    dropped_similarity: np.ndarray
    stats: dict = field(default_factory=dict)


_EMBED_ARGS = set(inspect.signature(embed).parameters) - {"data", "seed", "threads", "pair_rows"}


def _check(k, dedup_threshold, exact_limit, nprobe, chunk, seed):
    if not isinstance(seed, int | np.integer) or not 0 <= seed < 2**31:  # faiss's C int, scikit-learn's
        raise UserError(f"ICP seed must be an integer in [0, 2**31), got {seed!r}")
    if not isinstance(k, int | np.integer) or k < 1:
        raise UserError(f"ICP k (neighbours per document) must be an integer ≥ 1, got {k!r}")
    if dedup_threshold is not None and not (0.0 < float(dedup_threshold) <= 1.0):
        raise UserError(
            f"ICP dedup_threshold must be in (0, 1] (a cosine similarity) or None, got {dedup_threshold!r}"
        )
    if exact_limit < 0:
        raise UserError(f"ICP exact_limit must be ≥ 0, got {exact_limit}")
    if nprobe < 1 or chunk < 1:
        raise UserError(f"ICP nprobe and chunk must be ≥ 1, got nprobe={nprobe}, chunk={chunk}")


def icp_plan(
    data,
    *,
    k: int = 10,
    dedup_threshold: float | None = 0.9,
    seed: int = 0,
    exact_limit: int = 20_000,
    nprobe: int = 16,
    chunk: int = 4096,
    threads: int | None = None,
    whole=None,
    **embed_kwargs,
) -> IcpPlan:
    """ICP ordering of `data`: a list of texts or TokenDocuments (embedded by
    `icp_embed.embed(**embed_kwargs)`), or an [N, d] embedding array (rows are normalised; zero rows
    count as unembedded). A pure function of the data and `seed` (the seed fixes the SVD sample and
    its random start, the IVF training sample and every tie-break). `dedup_threshold=None` keeps
    every document; `threads` (faiss) defaults to torch's thread count, else OMP_NUM_THREADS.
    `whole`: the whole documents (TokenDocuments or texts; `data` itself when it is either) that judge
    duplicates: exact ones by their content, and a pair whose embedded prefixes pass the threshold
    is a near-duplicate only if the whole documents' tf-idf cosine passes it too."""
    _check(k, dedup_threshold, exact_limit, nprobe, chunk, seed)
    if unknown := sorted(set(embed_kwargs) - _EMBED_ARGS):  # (a TypeError naming `embed`, not this call)
        raise UserError(
            f"ICP ordering: unknown argument {unknown[0]!r}; the embedding's are {', '.join(sorted(_EMBED_ARGS))}"
        )
    if (given := sorted(k for k, v in embed_kwargs.items() if v is not None)) and isinstance(
        data, np.ndarray
    ):
        raise UserError(f"ICP ordering: {given[0]!r} is an embedding argument; the vectors are given")
    threads = threads or default_threads()
    t = {"start": time.perf_counter()}

    def lap(name):
        now = time.perf_counter()
        t[name] = now - t["start"]
        t["start"] = now

    x = None
    if isinstance(data, np.ndarray):
        if data.ndim != 2 or data.shape[1] < 1 or not np.issubdtype(data.dtype, np.number):
            raise UserError(f"ICP embeddings must be a numeric [N, d] array, got shape {data.shape}")
        if not np.isfinite(data).all():
            bad = np.flatnonzero(~np.isfinite(data).all(1))
            raise UserError(f"ICP embeddings hold NaN or infinite values (rows {bad[:5].tolist()} ...)")
        if len(data) == 0:
            raise UserError("ICP ordering got no documents")
        import_faiss()
        z = unit(data)
    else:
        check_call_args("icp_plan", lists=dict(data=data))  # one text is not a list of documents
        if not isinstance(data, TokenDocuments | list):
            data = list(data)
        if len(data) == 0:
            raise UserError("ICP ordering got no documents")
        import_faiss()
        z, x = embed(data, seed=seed, threads=threads, pair_rows=dedup_threshold is not None, **embed_kwargs)
        if whole is None:
            whole = data
    n = len(z)
    lap("embed")

    ok = np.any(z != 0, axis=1)
    priority = np.random.default_rng(seed).permutation(n).astype(np.int64)
    dropped = np.zeros(n, dtype=bool)
    partner = np.full(n, -1, dtype=np.int64)
    psim = np.zeros(n, dtype=np.float64)
    # exact copies of any document, embeddable or not (a text of stop words alone, copied)
    cand = np.arange(n) if whole is not None else np.flatnonzero(ok)
    exact_dups = 0
    if dedup_threshold is not None and len(cand):
        if whole is not None:  # equal content, not only equal prefixes
            keys = content_keys(whole)
        else:  # given vectors: equal rows by their bytes
            keys = [r.tobytes() for r in z[cand]]
        first = icp_dots.first_by_keys(keys, cand)
        dup = cand[first != cand]
        dropped[dup], partner[dup], psim[dup] = True, first[first != cand], 1.0
        exact_dups = int(dropped.sum())
        cand = np.flatnonzero(ok & ~dropped)
    lap("exact_duplicates")

    nb, knn_info = knn_search(
        z[cand], k, exact_limit=exact_limit, nprobe=nprobe, chunk=chunk, seed=seed, threads=threads
    )
    lap("knn")
    src = np.repeat(cand, k)
    valid = nb.ravel() >= 0
    src, dst = src[valid], cand[nb.ravel()[valid]]
    sim = edge_similarity(z, src, dst)
    near_dups = 0
    if dedup_threshold is not None:
        if x is not None:  # each unordered pair once: most kNN edges are mutual
            pairs = np.sort(np.minimum(src, dst) * np.int64(n) + np.maximum(src, dst))
            pairs = pairs[np.append(True, pairs[1:] != pairs[:-1])] if len(pairs) else pairs
            a, b = np.divmod(pairs, n)
            ds = sparse_pair_cosine(x, a, b, threads=threads)
        else:
            a, b, ds = src, dst, sim
        if whole is not None and x is not None:  # alike at the start, cut short: alike as a whole?
            cut = truncated(whole, embed_kwargs)
            if (m := (ds >= dedup_threshold) & (cut[a] | cut[b])).any():
                ds = ds.copy()
                ds[m] = np.minimum(ds[m], whole_pair_cosine(whole, a[m], b[m], threads=threads))
        d2, p2, s2 = near_duplicates(n, a, b, ds, float(dedup_threshold))
        dropped |= d2
        partner[d2], psim[d2] = p2[d2], s2[d2]
        near_dups = int(d2.sum())
    lap("near_duplicates")

    keep = ok & ~dropped
    indptr, nbrs, w = undirected_graph(n, src, dst, sim, keep, priority)
    lap("graph")
    path, starts, steps = greedy_path(indptr, nbrs, w, priority, keep)
    unembedded = np.flatnonzero(~ok & ~dropped)
    order = np.concatenate([path, unembedded])
    segments = np.concatenate([starts, len(path) + np.arange(len(unembedded))])
    lap("traverse")

    emb = order[ok[order]]
    adjacent = float(np.mean(edge_similarity(z, emb[:-1], emb[1:]))) if len(emb) > 1 else None
    perm = np.random.default_rng(seed).permutation(emb)
    random_adj = float(np.mean(edge_similarity(z, perm[:-1], perm[1:]))) if len(emb) > 1 else None
    drop_ids = np.flatnonzero(dropped)
    del t["start"]
    stats = {
        "documents": n,
        "kept": len(order),
        "ordered_by_similarity": len(path),
        "unembedded": len(unembedded),
        "dropped_duplicates": len(drop_ids),
        "exact_duplicates": exact_dups,
        "near_duplicates": near_dups,
        "dedup_threshold": dedup_threshold,
        "dedup_similarity": "tf-idf cosine" if x is not None else "embedding cosine",
        "segments": len(segments),
        "jumps": max(0, len(segments) - 1),
        "steps_along_edges": len(steps),
        "mean_neighbour_similarity": float(steps.mean()) if len(steps) else None,
        "mean_adjacent_similarity": adjacent,
        "mean_adjacent_similarity_random_order": random_adj,
        "graph_edges": int(len(nbrs) // 2),
        "knn": knn_info,
        "dims": int(z.shape[1]),
        "seed": seed,
        "threads": threads,
        "seconds": {name: round(s, 4) for name, s in t.items()},
    }
    return IcpPlan(order, segments, drop_ids, partner[drop_ids], psim[drop_ids], stats)


def truncated(whole, embed_kwargs: dict) -> np.ndarray:
    """Which documents the embedding read only the start of (longer than `max_tokens` token ids or
    `max_chars` characters, embed's defaults unless given): the pairs whose verdict the whole decides."""
    limits = {"max_tokens": MAX_TOKENS, "max_chars": MAX_CHARS}
    limits.update({k: v for k, v in embed_kwargs.items() if k in limits})
    if isinstance(whole, TokenDocuments):
        ends = np.asarray(whole.ends, dtype=np.int64)
        starts = np.concatenate([[0], ends[:-1]])
        if not whole.ignore:
            return ends - starts > limits["max_tokens"]
        # cut only where a token the bag counts lies past the prefix: a document of max_tokens tokens and
        # its EOS was read whole, yet its pairs were judged on the whole document as if cut
        cut = []
        for s, e, _, kept in token_blocks(whole):
            counted = np.concatenate([[0], np.cumsum(kept, dtype=np.int64)])
            cut.append(counted[e] - counted[np.minimum(s + limits["max_tokens"], e)] > 0)
        return np.concatenate(cut) if cut else np.zeros(0, dtype=bool)
    return np.array([len(t) > limits["max_chars"] for t in whole], dtype=bool)


def icp_order(data, **kwargs) -> tuple[np.ndarray, dict]:
    """(order: document indices, stats: JSON-ready dict); see `icp_plan` for the arguments."""
    plan = icp_plan(data, **kwargs)
    return plan.order, plan.stats
