"""Embeddings for In-Context Pretraining ordering: elmforest's c-BTM tf-idf -> SVD, over words of
texts or over token ids (TokenDocuments), in one pass over the documents.

Besides the unit vectors (for kNN and the traversal's edge weights) this keeps the L2-normalised
tf-idf rows: near-duplicates are judged on them, because in a 64-d SVD space distinct documents
on one subject sit at cosine 0.99 (two Psalms; the exp2 and fmin manpages on the demo corpus),
while the bag-of-words cosine of the same prefixes stays low for them and high only for copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from elmforest.cluster.clusterer import WORD, normalise_word
from elmforest.utils.errors import UserError


class _Terms(dict):
    """Raw word -> term column (-1: dropped by the c-BTM analyser), filled on first sight: the
    analyser runs once per distinct word, not once per occurrence."""

    def __init__(self):
        super().__init__()
        self.columns: dict[str, int] = {}

    def __missing__(self, word: str) -> int:
        t = normalise_word(word)
        col = -1 if t is None else self.columns.setdefault(t, len(self.columns))
        self[word] = col
        return col


@dataclass
class TokenDocuments:
    """Documents as token ids, e.g. one split of a shards directory: `tokens` flat, document i is
    tokens[ends[i-1]:ends[i]]. `ignore` (EOS, padding) is left out of the bags. Bags of subword ids
    need no text analysis (2-3x cheaper than words); on the demo shards' training documents 99% of
    their 10-NN share the document's domain (words, on the whole demo corpus: 97%)."""

    tokens: np.ndarray
    ends: np.ndarray
    vocab_size: int
    ignore: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.ends)


def _word_counts(texts, max_chars: int):
    lut = _Terms()
    get = lut.__getitem__
    flat: list[int] = []
    lengths: list[int] = []
    for text in texts:
        if not isinstance(text, str):
            raise UserError(
                f"ICP input must be texts, TokenDocuments or a 2-D embedding array, got {type(text)}"
            )
        before = len(flat)
        flat.extend(map(get, WORD.findall(text[:max_chars])))
        lengths.append(len(flat) - before)
    cols = np.fromiter(flat, dtype=np.int64, count=len(flat))
    return np.repeat(np.arange(len(lengths), dtype=np.int64), lengths), cols, len(lut.columns)


def _token_counts(docs: TokenDocuments, max_tokens: int):
    ends = np.asarray(docs.ends, dtype=np.int64)
    if ends.ndim != 1 or (
        len(ends) and (ends[0] < 0 or (np.diff(ends) < 0).any() or ends[-1] > len(docs.tokens))
    ):
        raise UserError("TokenDocuments.ends must be non-decreasing offsets into tokens")
    starts = np.concatenate([[0], ends[:-1]])
    lens = np.minimum(ends - starts, max_tokens)
    offsets = np.cumsum(lens) - lens
    pos = np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(starts - offsets, lens)
    cols = np.asarray(docs.tokens)[pos].astype(np.int64)
    if len(cols) and (cols.min() < 0 or cols.max() >= docs.vocab_size):
        raise UserError(f"token ids outside [0, {docs.vocab_size}) in TokenDocuments")
    if docs.ignore:
        cols[np.isin(cols, np.asarray(docs.ignore, dtype=np.int64))] = -1
    return np.repeat(np.arange(len(ends), dtype=np.int64), lens), cols, docs.vocab_size


def _tfidf(rows: np.ndarray, cols: np.ndarray, n: int, v: int, min_df: int, max_features: int | None):
    """Sparse (1 + ln tf) · idf rows [N, V'] over the terms in ≥ min_df documents (col -1: left out);
    idf as scikit-learn's smooth idf, ln((1 + N) / (1 + df)) + 1, so with the same terms the rows,
    once L2-normalised, equal what Clusterer's TfidfVectorizer feeds its SVD."""
    import scipy.sparse as sp

    m = cols >= 0
    x = sp.csr_matrix((np.ones(int(m.sum())), (rows[m], cols[m])), shape=(n, v))
    x.sum_duplicates()  # counts, columns sorted: equal bags give bit-equal rows
    df = np.bincount(x.indices, minlength=v)
    keep = df >= min_df
    if max_features is not None and keep.sum() > max_features:
        total = np.bincount(x.indices, weights=x.data, minlength=v)
        top = np.lexsort((np.arange(v), -total, ~keep))[:max_features]
        keep = np.zeros(v, dtype=bool)
        keep[top] = True
    x = x[:, np.flatnonzero(keep)].tocsr()
    x.sort_indices()
    x.data = 1.0 + np.log(x.data)
    x.data *= (np.log((1.0 + n) / (1.0 + df[keep])) + 1.0)[x.indices]
    return x


def embed(
    data,
    *,
    dims: int = 64,
    max_chars: int = 2_000,
    max_tokens: int = 512,
    min_df: int = 2,
    max_features: int | None = 200_000,
    fit_docs: int = 5_000,
    svd_iter: int = 2,
    seed: int = 0,
    embedder=None,
):
    """(unit vectors z [N, d] float32, the L2-normalised tf-idf rows x (CSR), None for an
    `embedder`). A document that cannot be embedded (no term kept, or an empty text for an
    embedder) gets a zero row in both.

    Default: the c-BTM tf-idf -> truncated SVD embedding (for texts the same analyser, sublinear tf,
    smooth idf, SVD fitted on L2-normalised rows as Clusterer.fit does; for TokenDocuments the same
    over token ids), fitted on these documents: the SVD on a seeded sample of `fit_docs` (5,000
    documents and 2 power iterations put as many of the demo corpus's 10-NN in the document's own
    domain, 97%, as 20,000 and 5 do, at a quarter of the cost). Texts are read up to `max_chars`,
    token ids up to `max_tokens` (Contriever, the paper's encoder, also reads a bounded prefix; the
    longest tenth of the demo corpus's documents holds most of its words). With no more terms than
    `dims`, the tf-idf rows themselves are the vectors. BLAS runs on one thread here: products with
    64 columns gain little from threads (on a loaded machine two were 10x slower), and the vectors
    then do not depend on the machine's thread count. `embedder`: anything with
    `.embed(texts) -> (z, ok)` (a SentenceEmbedder, a fitted Clusterer)."""
    from threadpoolctl import threadpool_limits

    if embedder is not None:
        if isinstance(data, TokenDocuments):
            raise UserError("an ICP embedder reads texts, not TokenDocuments")
        z, ok = embedder.embed(list(data))
        z = np.asarray(z, dtype=np.float64)
        if not np.isfinite(z).all():
            raise UserError("the ICP embedder returned NaN or infinite values")
        z[~np.asarray(ok, dtype=bool)] = 0.0
        return unit(z), None
    if isinstance(data, TokenDocuments):
        n = len(data)
        rows, cols, v = _token_counts(data, max_tokens)
    else:
        texts = data if isinstance(data, list) else list(data)
        n = len(texts)
        rows, cols, v = _word_counts(texts, max_chars)
    x = _tfidf(rows, cols, n, v, min_df, max_features)
    norm = np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel())
    x = x.multiply(1.0 / np.maximum(norm, 1e-300)[:, None]).tocsr()
    x.sort_indices()
    if x.shape[1] <= dims:
        return unit(x.toarray()), x
    from sklearn.decomposition import TruncatedSVD

    with threadpool_limits(1, user_api="blas"):
        sample = x
        if n > fit_docs:
            sample = x[np.sort(np.random.default_rng(seed).choice(n, fit_docs, replace=False))]
        n_comp = min(dims, max(1, sample.shape[0] - 1))
        svd = TruncatedSVD(n_components=n_comp, n_iter=svd_iter, random_state=seed).fit(sample)
        return unit(np.asarray(x @ np.ascontiguousarray(svd.components_.T))), x


def embed_documents(data, **kwargs) -> np.ndarray:
    """Unit vectors [N, d] float32 (zero rows: documents that cannot be embedded); see `embed`."""
    return embed(data, **kwargs)[0]


def unit(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    norm = np.linalg.norm(z, axis=1)
    ok = norm > 0
    out = np.zeros(z.shape, dtype=np.float32)
    out[ok] = z[ok] / norm[ok, None]
    return out


def sparse_pair_cosine(x, a: np.ndarray, b: np.ndarray, chunk: int = 1 << 14) -> np.ndarray:
    """x[a_i] · x[b_i] for rows of an L2-normalised CSR matrix, in chunks of pairs (never x @ x.T)."""
    out = np.empty(len(a), dtype=np.float64)
    for s in range(0, len(a), chunk):
        p = x[a[s : s + chunk]].multiply(x[b[s : s + chunk]])
        out[s : s + chunk] = np.asarray(p.sum(1)).ravel()
    return np.clip(out, -1.0, 1.0)


def row_keys(x, rows: np.ndarray) -> list[bytes]:
    """A byte string per CSR row (its columns and values): equal keys, equal rows."""
    ip, ind, dat = x.indptr, x.indices, x.data
    return [ind[ip[r] : ip[r + 1]].tobytes() + dat[ip[r] : ip[r + 1]].tobytes() for r in rows.tolist()]
