"""Embeddings for In-Context Pretraining ordering: elmforest's c-BTM tf-idf -> SVD, over words of
texts or over token ids (TokenDocuments), in one pass over the documents.

Besides the unit vectors (for kNN and the traversal's edge weights) this keeps the L2-normalised
tf-idf rows: near-duplicates are judged on them, because in a 64-d SVD space distinct documents
on one subject sit at cosine 0.99 (two Psalms; the exp2 and fmin manpages on the demo corpus),
while the bag-of-words cosine of the same prefixes stays low for them and high only for copies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from elmforest.cluster.clusterer import WORD, normalise_word
from elmforest.utils.errors import UserError
from elmforest.utils.typed import check_call_args

# ASCII bytes -> themselves for [a-z0-9_] and \x01 (the document separator), A-Z lower-cased, other
# ASCII -> a space; bytes ≥ 128 (UTF-8 of word characters, see `_words`) kept. On ASCII Python's \w
# is exactly [A-Za-z0-9_]; lower-casing first changes no term, normalise_word lower-cases anyway
_TABLE = bytes(
    c + 32 if 65 <= c <= 90 else c if (48 <= c <= 57 or 97 <= c <= 122 or c in (1, 95) or c >= 128) else 32
    for c in range(256)
)
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


def _words(prefixes: list[str]):
    r"""(dictionary: the distinct words in first-seen order, ids: the word per occurrence, documents
    separated by the id of "\x01"): what WORD.findall over each prefix gives, up to ASCII case,
    without a Python object per occurrence. Every character that is not \w becomes a space (ASCII
    ones by a byte table, the few distinct non-ASCII ones, found by a regex that skips ASCII, by
    str.replace in the documents that hold them; \x01 in a text too), so maximal runs of non-spaces are WORD's maximal runs of \w;
    pyarrow splits them and numbers them in first-seen order (dictionary_encode), in C++."""
    import pyarrow as pa
    import pyarrow.compute as pc

    word_char: dict[str, bool] = {}
    clean = []
    for p in prefixes:
        if "\x01" in p:
            p = p.replace("\x01", " ")
        if not p.isascii():  # a few documents, a few distinct characters each
            for c in set("".join(_NON_ASCII.findall(p))):
                if not word_char.setdefault(c, WORD.fullmatch(c) is not None):
                    p = p.replace(c, " ")
        clean.append(p)
    joined = " \x01 ".join(clean)
    data = joined.encode("utf-8").translate(_TABLE)
    offsets = pa.py_buffer(np.array([0, len(data)], dtype=np.int64))
    text = pa.LargeStringArray.from_buffers(1, offsets, pa.py_buffer(data))
    words = pc.dictionary_encode(pc.ascii_split_whitespace(text).flatten())
    return words.dictionary.to_pylist(), words.indices.to_numpy(zero_copy_only=False)


def _word_counts(texts, max_chars: int, batch: int = 4096):
    """(words per document, their term columns, -1 for words the analyser drops), columns numbered
    in first-seen order, as WORD.findall + normalise_word per document numbers them; in batches of
    documents (memory: a few copies of one batch's text; 4,096 documents cost as little time as
    20,000 on the demo corpus, at half the peak memory)."""
    columns: dict[str, int] = {}
    lengths, parts = np.zeros(len(texts), dtype=np.int64), []
    for s in range(0, len(texts), batch):
        prefixes = []
        for text in texts[s : s + batch]:
            if not isinstance(text, str):
                raise UserError(
                    f"ICP input must be texts, TokenDocuments or a 2-D embedding array, got {type(text)}"
                )
            prefixes.append(text[:max_chars])
        dictionary, ids = _words(prefixes)
        lut = np.empty(len(dictionary), dtype=np.int64)
        for i, w in enumerate(dictionary):  # "": pyarrow's split at leading or trailing spaces
            t = normalise_word(w) if w not in ("", "\x01") else None
            lut[i] = (
                -2
                if w == "\x01"
                else -3
                if not w
                else -1
                if t is None
                else columns.setdefault(t, len(columns))
            )
        cols = lut[ids]
        cols = cols[cols != -3]
        sep = np.flatnonzero(cols == -2)
        lengths[s : s + len(prefixes)] = np.diff(np.concatenate([[-1], sep, [len(cols)]])) - 1
        parts.append(np.delete(cols, sep))
    cols = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return lengths, cols, len(columns)


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


MAX_CHARS, MAX_TOKENS = 2_000, 512  # how much of each document `embed` reads: its prefix


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
    raw = np.asarray(docs.tokens)[pos]
    del pos
    if len(raw) and (raw.min() < 0 or raw.max() >= docs.vocab_size):
        raise UserError(f"token ids outside [0, {docs.vocab_size}) in TokenDocuments")
    cols = raw.astype(np.int32 if docs.vocab_size < 2**31 else np.int64)
    if docs.ignore:
        cols[np.isin(cols, np.asarray(docs.ignore, dtype=cols.dtype))] = -1
    return lens, cols, docs.vocab_size


BLOCK_TOKENS = 1 << 22  # token ids read at once (32 MB as int64), never a whole domain's


def token_blocks(docs: TokenDocuments, block: int | None = None):
    """(starts, ends, tokens, kept) per run of whole documents of about `block` tokens (one document
    longer than that alone): their bounds within `tokens`, the ids as int64, and which are not in
    `ignore` (None without one). A domain of a billion tokens as int64 at once was 8 GB, and as much
    again for its mask and sums."""
    block = block or BLOCK_TOKENS
    ends = np.asarray(docs.ends, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    ignore = np.asarray(docs.ignore, dtype=np.int64) if docs.ignore else None
    i = 0
    while i < len(ends):
        j = max(i + 1, int(np.searchsorted(ends, starts[i] + block, side="right")))
        lo = int(starts[i])
        tokens = np.asarray(docs.tokens[lo : int(ends[j - 1])]).astype(np.int64)
        kept = None if ignore is None else ~np.isin(tokens, ignore)
        yield starts[i:j] - lo, ends[i:j] - lo, tokens, kept
        i = j


def bag_counts(lengths: np.ndarray, cols: np.ndarray, v: int, compiled: bool | None = None):
    """CSR counts [n, v]: row i counts the next lengths[i] entries of `cols` (-1: left out), columns
    sorted in each row. The occurrences come grouped by row, so the CSR is built directly and
    only each row's few hundred entries are sorted (scipy's sum_duplicates), not the whole
    corpus's: 3x cheaper on the demo shards than COO -> CSR, and than one global sort of keys.
    `compiled` (default: when numba is there and the vocabulary is not far larger than the input):
    icp_kernels' version runs instead, which sorts only each row's distinct columns (the same matrix,
    about 2-3.5x faster)."""
    import scipy.sparse as sp

    from elmforest.cluster import icp_kernels

    if compiled is None and v > max(1 << 22, 4 * len(cols)):
        compiled = False  # the compiled path keeps v counters: not for a vocabulary far above the input
    if icp_kernels.wanted(compiled):
        return icp_kernels.bag_counts_compiled(lengths, cols, v)
    lengths = np.asarray(lengths, dtype=np.int64)
    indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    m = cols >= 0
    if not m.all():
        indptr = np.concatenate([[0], np.cumsum(m)])[indptr]
        cols = cols[m]
    if len(cols) < 2**31 and v < 2**31:  # scipy's own index type: no copies converting to it
        cols, indptr = cols.astype(np.int32, copy=False), indptr.astype(np.int32)
    x = sp.csr_matrix((np.ones(len(cols)), cols, indptr), shape=(len(lengths), v))
    x.sum_duplicates()  # sorts each row's columns: equal bags give bit-equal rows
    return x


def _tfidf(counts, min_df: int, max_features: int | None):
    """L2-normalised (1 + ln tf) · idf rows [N, V'] over the terms in ≥ min_df documents: the
    column filter here, the weighting by scikit-learn's TfidfTransformer (sublinear tf, smooth idf
    ln((1 + N) / (1 + df)) + 1, L2 rows), so with the same terms the rows equal what Clusterer's
    TfidfVectorizer feeds its SVD."""
    from sklearn.feature_extraction.text import TfidfTransformer

    n, v = counts.shape
    df = np.bincount(counts.indices, minlength=v)
    keep = df >= min_df
    if max_features is not None and keep.sum() > max_features:
        total = np.bincount(counts.indices, weights=counts.data, minlength=v)
        top = np.lexsort((np.arange(v), -total, ~keep))[:max_features]
        keep = np.zeros(v, dtype=bool)
        keep[top] = True
    if not keep.all():  # drop columns without re-sorting: the new column ids keep the order
        import scipy.sparse as sp

        m = keep[counts.indices]
        new_col = np.cumsum(keep) - 1
        indptr = np.concatenate([[0], np.cumsum(m)])[counts.indptr]

        counts = sp.csr_matrix(
            (counts.data[m], new_col[counts.indices[m]], indptr), shape=(n, int(keep.sum()))
        )
        counts.has_sorted_indices = True
    if counts.shape[1] == 0:  # no term in min_df documents (one document, or no shared word): all
        import scipy.sparse as sp  # unembedded, one zero column so every later shape stays valid

        return sp.csr_matrix((n, 1), dtype=np.float64)
    tf = TfidfTransformer(sublinear_tf=True, smooth_idf=True, norm="l2")
    return tf.fit_transform(counts).tocsr()


def embed(
    data,
    *,
    dims: int = 64,
    max_chars: int = MAX_CHARS,
    max_tokens: int = MAX_TOKENS,
    min_df: int = 2,
    max_features: int | None = 200_000,
    fit_docs: int = 5_000,
    svd_iter: int = 2,
    svd_dtype: str = "float32",
    svd_normalizer: str = "LU",
    seed: int = 0,
    threads: int = 1,
    embedder=None,
    pair_rows: bool = True,
):
    """(unit vectors z [N, d] float32, the L2-normalised tf-idf rows (CSR) over every term read, the
    near-duplicate test's, or None for an `embedder`). The embedding keeps the terms of `min_df`
    documents (at most `max_features`); the near-duplicate rows keep all, with the idf over these
    documents: two documents alike but for words each holds alone are not duplicates (`pair_rows=False`,
    no near-duplicate test to come: the embedding's own rows, no second matrix). A document that
    cannot be embedded (no term kept, or an empty text for an embedder) gets a zero vector z.

    Default: the c-BTM tf-idf -> truncated SVD embedding (for texts the same analyser, sublinear tf,
    smooth idf, SVD fitted on L2-normalised rows as Clusterer.fit does; for TokenDocuments the same
    over token ids), fitted on these documents: the SVD on a seeded sample of `fit_docs` (5,000
    documents and 2 power iterations put as many of the demo corpus's 10-NN in the document's own
    domain, 97%, as 20,000 and 5 do, at a quarter of the cost). Texts are read up to `max_chars`,
    token ids up to `max_tokens` (Contriever, the paper's encoder, also reads a bounded prefix; the
    longest tenth of the demo corpus's documents holds most of its words). With no more terms than
    `dims`, the tf-idf rows themselves are the vectors. BLAS runs on one thread here: products with
    64 columns gain little from threads (on a loaded machine two were 10x slower), and the vectors
    then do not depend on the machine's thread count; `threads` splits the projection of every
    document by rows, which changes no bit. `embedder`: anything with
    `.embed(texts) -> (z, ok)` (a SentenceEmbedder, a fitted Clusterer).

    `svd_dtype`: the precision of the SVD fit and the projection, float32 by default (the vectors
    are float32 anyway; the tf-idf rows that judge duplicates stay float64), with the power
    iterations normalised by `svd_normalizer` (scikit-learn's power_iteration_normalizer, whose
    "auto" applies none for 2 iterations: float32 then loses the tail directions, subspace angles
    to the float64 fit up to 1e-2 rad on the demo's domains, against 1-5e-5 with "LU"). Fitting
    the demo's 8 domains and 2 whole corpora: 0.56 CPU-seconds in float32 with LU, 1.38 in float64
    with QR (its angles 1e-11)."""

    _check_sizes(
        dims=dims,
        max_chars=max_chars,
        max_tokens=max_tokens,
        min_df=min_df,
        fit_docs=fit_docs,
        svd_iter=svd_iter,
    )
    if max_features is not None:
        _check_sizes(max_features=max_features)
    if svd_dtype not in ("float32", "float64"):
        raise UserError(f"ICP svd_dtype must be 'float32' or 'float64', got {svd_dtype!r}")
    if svd_normalizer not in ("auto", "QR", "LU", "none"):
        raise UserError(f"ICP svd_normalizer must be 'auto', 'QR', 'LU' or 'none', got {svd_normalizer!r}")
    if embedder is not None:
        if isinstance(data, TokenDocuments):
            raise UserError("an ICP embedder reads texts, not TokenDocuments")
        texts = list(data)
        got = embedder.embed(texts)
        if not (isinstance(got, tuple | list) and len(got) == 2):
            raise UserError("an ICP embedder's .embed(texts) must return (vectors [N, d], ok [N])")
        z, ok = np.asarray(got[0], dtype=np.float64), np.asarray(got[1], dtype=bool)
        if z.ndim != 2 or len(z) != len(texts) or ok.shape != (len(texts),):
            raise UserError(
                f"the ICP embedder returned vectors of shape {z.shape} and ok of shape {ok.shape} for "
                f"{len(texts)} texts; it must return one row and one flag per text"
            )
        if not np.isfinite(z).all():
            raise UserError("the ICP embedder returned NaN or infinite values")
        z[~ok] = 0.0
        return unit(z), None
    if isinstance(data, TokenDocuments):
        n = len(data)
        lengths, cols, v = _token_counts(data, max_tokens)
    else:
        texts = data if isinstance(data, list) else list(data)
        n = len(texts)
        lengths, cols, v = _word_counts(texts, max_chars)
    counts = bag_counts(lengths, cols, v)
    x = _tfidf(counts, min_df, max_features)
    z = _project_tfidf(x, n, dims, fit_docs, svd_iter, svd_dtype, svd_normalizer, seed, threads)
    if pair_rows and not (min_df <= 1 and max_features is None):
        # the near-duplicate test counts every term read: a word in one document alone (left out of the
        # embedding by min_df) is what tells two otherwise alike documents apart; made once the
        # embedding's matrix is freed (the demo corpus as texts: peak 121 MB by tracemalloc, against
        # 111 MB with the embedding's terms alone and 131 MB with both held; time within noise)
        del x
        x = _tfidf(counts, 1, None)
    return z, x


def _check_sizes(**sizes) -> None:
    """Integers of at least 1 (svd_iter: 0), said by name: scikit-learn's own errors name its arguments
    (n_components for dims), and a size of 0 characters or documents is refused there or nowhere."""
    check_call_args("ICP embedding", ints=sizes)
    for name, v in sizes.items():
        if v < (0 if name == "svd_iter" else 1):
            raise UserError(
                f"ICP embedding: {name} must be at least {0 if name == 'svd_iter' else 1}, got {v}"
            )


def _project_tfidf(x, n, dims, fit_docs, svd_iter, svd_dtype, svd_normalizer, seed, threads) -> np.ndarray:
    """The tf-idf rows' unit vectors: themselves with no more terms than `dims`, else their projection
    on a truncated SVD fitted on a seeded sample of `fit_docs` rows (see `embed`)."""
    from elmforest.utils.threads import one_blas_thread

    if x.shape[1] <= dims:
        return unit(x.toarray())
    from sklearn.decomposition import TruncatedSVD

    with one_blas_thread():
        sample = x
        if n > fit_docs:
            sample = x[np.sort(np.random.default_rng(seed).choice(n, fit_docs, replace=False))]
        n_comp = min(dims, max(1, sample.shape[0] - 1))
        svd = TruncatedSVD(
            n_components=n_comp, n_iter=svd_iter, random_state=seed, power_iteration_normalizer=svd_normalizer
        )
        with np.errstate(divide="ignore", invalid="ignore"):  # equal rows: its variance ratio is 0/0
            svd.fit(sample.astype(svd_dtype))
        return unit(project(x.astype(svd_dtype), svd.components_, threads))


def project(x, components: np.ndarray, threads: int = 1, block: int = 4096) -> np.ndarray:
    """x @ components.T in row blocks over `threads` threads (scipy's sparse product releases the
    GIL; each row's product is computed alone, so the result does not depend on the threads)."""
    ct = np.ascontiguousarray(components.T)
    starts = range(0, x.shape[0], block)
    if threads <= 1 or x.shape[0] <= block:
        return np.asarray(x @ ct)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        parts = pool.map(lambda s: np.asarray(x[s : s + block] @ ct), starts)
        return np.concatenate(list(parts))


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
