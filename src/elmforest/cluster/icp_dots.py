"""ICP's float64 similarities of float32 unit vectors, compiled with numba
when it is installed (the icp extra).

Why hand-written: the edge weights and the re-ranking of kNN candidates are dot products of float32
rows summed in float64, and NumPy computes them as `(a * b).sum(-1, dtype=float64)`: a temporary
array of every product, cast and reduced through its buffered iterator, ten times the arithmetic's
cost on the demo shards' largest domain. The kernels here compute the same numbers without the
temporaries, and bit for bit the same: the float32 product of each pair of coordinates, then NumPy's
own pairwise summation (8 accumulators over a block of at most 128 terms; wider rows are left to
NumPy) starting from 0.0, so no weight, tie-break or order changes (tested against NumPy on random rows of many widths).
"""

from __future__ import annotations

import numpy as np

from elmforest.cluster.icp_kernels import _jit, available

MAX_WIDTH = 128  # NumPy's PW_BLOCKSIZE: wider rows (a sentence encoder's) go to NumPy, which halves them


def _pairwise(p, lo, n):
    """NumPy's pairwise sum of p[lo:lo+n] (float32, n ≤ 128: one block, no halving) in float64, term
    for term."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += np.float64(p[lo + i])
        return res
    r0, r1 = np.float64(p[lo]), np.float64(p[lo + 1])
    r2, r3 = np.float64(p[lo + 2]), np.float64(p[lo + 3])
    r4, r5 = np.float64(p[lo + 4]), np.float64(p[lo + 5])
    r6, r7 = np.float64(p[lo + 6]), np.float64(p[lo + 7])
    i = 8
    m = n - n % 8
    while i < m:
        r0 += p[lo + i]
        r1 += p[lo + i + 1]
        r2 += p[lo + i + 2]
        r3 += p[lo + i + 3]
        r4 += p[lo + i + 4]
        r5 += p[lo + i + 5]
        r6 += p[lo + i + 6]
        r7 += p[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += p[lo + i]
        i += 1
    return res


def _dot(z, i, j, prod):
    for t in range(z.shape[1]):
        prod[t] = z[i, t] * z[j, t]
    return 0.0 + _pairwise(prod, 0, z.shape[1])


def _pair_sims(z, a, b, out):
    prod = np.empty(z.shape[1], dtype=np.float32)
    for e in range(len(a)):
        out[e] = _dot(z, a[e], b[e], prod)


def _rerank(z, ids, r0, k, out):
    """Rows r0.. of `ids` (candidates per row): each candidate's similarity to its row, -inf for
    itself and empty slots (-1), the best k by similarity descending then id ascending (an empty
    slot counts as id 0, as icp_graph.knn_search's NumPy code has it), -1 where -inf remains."""
    kk = ids.shape[1]
    prod = np.empty(z.shape[1], dtype=np.float32)
    sim = np.empty(kk, dtype=np.float64)
    key = np.empty(kk, dtype=np.int64)
    pos = np.empty(kk, dtype=np.int64)
    for q in range(ids.shape[0]):
        r = r0 + q
        for c in range(kk):
            i = ids[q, c]
            key[c] = i if i >= 0 else 0
            sim[c] = _dot(z, r, key[c], prod)
            if i < 0 or i == r:
                sim[c] = -np.inf
        for c in range(kk):  # insertion sort of the slots: stable, like the lexsort it replaces
            pos[c] = c
            j = c
            while j > 0 and (
                sim[pos[j - 1]] < sim[c] or (sim[pos[j - 1]] == sim[c] and key[pos[j - 1]] > key[c])
            ):
                pos[j] = pos[j - 1]
                j -= 1
            pos[j] = c
        for c in range(min(k, kk)):
            out[q, c] = ids[q, pos[c]] if sim[pos[c]] != -np.inf else -1


if available():
    _pairwise = _jit(_pairwise)
    _dot = _jit(_dot)
    _pair_sims = _jit(_pair_sims)
    _rerank = _jit(_rerank)


def fits(z: np.ndarray) -> bool:
    """Whether these kernels give NumPy's bits for rows of `z`: float32, at most MAX_WIDTH wide (the
    default embedding has 64 dimensions)."""
    return available() and z.dtype == np.float32 and 0 < z.shape[1] <= MAX_WIDTH


def pair_sims(z: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(z[a] * z[b]).sum(1, dtype=float64) for float32 rows, compiled (see the module docstring)."""
    a, b = np.asarray(a), np.asarray(b)
    if len(a) != len(b):
        raise ValueError(f"pair_sims: {len(a)} first rows but {len(b)} second rows")
    if len(a) and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= len(z)):
        raise IndexError(f"pair_sims: row ids outside [0, {len(z)})")  # the kernel does not check
    out = np.empty(len(a), dtype=np.float64)
    _pair_sims(
        np.ascontiguousarray(z), np.ascontiguousarray(a, np.int64), np.ascontiguousarray(b, np.int64), out
    )
    return out


def rerank(z: np.ndarray, ids: np.ndarray, r0: int, k: int) -> np.ndarray:
    """icp_graph.knn_search's re-ranking of the candidates `ids` of rows r0.. (see `_rerank`)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < -1 or ids.max() >= len(z) or r0 < 0 or r0 + len(ids) > len(z)):
        raise IndexError(f"rerank: candidates or rows outside [0, {len(z)})")  # the kernel does not check
    out = np.full((len(ids), min(k, ids.shape[1])), -1, dtype=np.int64)
    _rerank(np.ascontiguousarray(z), np.ascontiguousarray(ids, np.int64), int(r0), int(k), out)
    return out


def first_by_keys(keys, rows: np.ndarray) -> np.ndarray:
    """For each of `rows`, the first of `rows` with an equal key (itself if none earlier): exact
    duplicates by their content digests (icp_pairs.content_keys) or their vectors' bytes."""
    first: dict[bytes, int] = {}
    return np.array(
        [first.setdefault(key, i) for i, key in zip(np.asarray(rows).tolist(), keys, strict=True)],
        dtype=np.int64,
    )
