"""The near-duplicate test's pair measures for In-Context Pretraining (cluster/icp.py): exact
duplicates by a digest of the whole document, and the tf-idf cosine of candidate pairs over every term
of the whole documents (the embedding's own tf-idf leaves out words only one document holds, so two
documents alike but for their own words would look identical)."""

from __future__ import annotations

import numpy as np

from elmforest.cluster.icp_embed import (
    TokenDocuments,
    _tfidf,
    _token_counts,
    _word_counts,
    bag_counts,
    token_blocks,
)


def content_keys(whole) -> list[bytes]:
    """A digest of each whole document (TokenDocuments: its token ids, those in `ignore` left out;
    texts: their UTF-8): documents are exact duplicates when these are equal. Their embedded prefixes
    may be equal while the rest differs (a long shared licence header)."""
    import hashlib

    if isinstance(whole, TokenDocuments):
        keys = []
        for starts, ends, tokens, kept in token_blocks(whole):
            if kept is not None:  # left out once per block, the documents' ends moved with it
                at = np.concatenate([[0], np.cumsum(kept)])
                starts, ends, tokens = at[starts], at[ends], tokens[kept]
            keys += [
                hashlib.blake2b(tokens[s:e].tobytes(), digest_size=16).digest()
                for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
            ]
        return keys
    return [hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest() for t in whole]


def whole_pair_cosine(whole, a: np.ndarray, b: np.ndarray, threads: int = 1) -> np.ndarray:
    """The tf-idf cosine of document pairs (a_i, b_i) over their *whole* texts or token ids (the idf
    over the documents of these pairs): a pair whose embedded prefixes look alike is a near-duplicate
    only if the whole documents are too."""
    u = np.unique(np.concatenate([a, b]))
    if isinstance(whole, TokenDocuments):
        ends = np.asarray(whole.ends, dtype=np.int64)
        starts = np.concatenate([[0], ends[:-1]])
        parts = [np.asarray(whole.tokens)[starts[i] : ends[i]] for i in u.tolist()]
        sub = TokenDocuments(
            np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64),
            np.cumsum([len(p) for p in parts]),
            whole.vocab_size,
            whole.ignore,
        )
        counts = _token_counts(sub, np.iinfo(np.int64).max)
    else:
        counts = _word_counts([whole[i] for i in u.tolist()], max_chars=np.iinfo(np.int64).max)
    x = _tfidf(bag_counts(*counts), min_df=1, max_features=None)
    return sparse_pair_cosine(x, np.searchsorted(u, a), np.searchsorted(u, b), threads=threads)


def sparse_pair_cosine(
    x, a: np.ndarray, b: np.ndarray, chunk: int = 1 << 14, threads: int = 1, compiled: bool | None = None
):
    """x[a_i] · x[b_i] for rows of an L2-normalised CSR matrix, in chunks of pairs (never x @ x.T),
    over `threads` threads (scipy's sparse kernels release the GIL; chunks are independent, so the
    values do not depend on the threads). `compiled` (default: when numba is there): icp_kernels'
    scatter-and-gather product instead, 6x faster on one thread than scipy on two, equal within 1e-15
    (the order of the additions differs), so only a pair within 1e-15 of a threshold could change
    side (none of the demo shards' is within 1e-4 of 0.9)."""
    from elmforest.cluster import icp_kernels

    if icp_kernels.wanted(compiled):
        return np.clip(icp_kernels.pair_dot_compiled(x, a, b), -1.0, 1.0)
    out = np.empty(len(a), dtype=np.float64)

    def one(s):
        p = x[a[s : s + chunk]].multiply(x[b[s : s + chunk]])
        out[s : s + chunk] = np.asarray(p.sum(1)).ravel()

    starts = range(0, len(a), chunk)
    if threads > 1 and len(starts) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, starts))
    else:
        for s in starts:
            one(s)
    return np.clip(out, -1.0, 1.0)
