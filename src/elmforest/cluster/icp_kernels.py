"""The ICP graph build and traversal compiled with numba, when numba is installed (the icp extra).

Why hand-written: the greedy traversal is sequential by nature (each step depends on every earlier
visit), so no vectorised or library routine computes it; in Python it costs about 12 µs per
document, compiled under 1 µs. The adjacency build replaces one lexsort over every edge entry by a
counting sort by node and a small sort per node (2-4x). `icp_graph.greedy_path` and
`undirected_graph` call these and fall back to their NumPy/Python code without numba; both give the
same result (tested): the heap keys degree·n + priority are unique, so the pop order does not
depend on how the heap is written. The exact kNN search that comes before them is compiled in
:mod:`elmforest.cluster.icp_knn`.

Each function compiles on its first call in a process tree without a cache (a few seconds); the
machine code is cached on disk beside this file (or in NUMBA_CACHE_DIR), so a later process only
loads it (about 1 s with numba's import: bench/icp_order.py prints it apart).
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None


def available() -> bool:
    return numba is not None


def wanted(compiled: bool | None) -> bool:
    """A caller's `compiled` switch: None means the compiled kernel wherever numba is installed."""
    return available() if compiled is None else bool(compiled)


def _push(heap, size, key):
    i = size
    heap[i] = key
    while i > 0:
        parent = (i - 1) >> 1
        if heap[parent] <= key:
            break
        heap[i] = heap[parent]
        i = parent
    heap[i] = key
    return size + 1


def _pop(heap, size):
    top = heap[0]
    size -= 1
    last = heap[size]
    i = 0
    while True:
        child = 2 * i + 1
        if child >= size:
            break
        if child + 1 < size and heap[child + 1] < heap[child]:
            child += 1
        if heap[child] >= last:
            break
        heap[i] = heap[child]
        i = child
    if size > 0:
        heap[i] = last
    return top, size


def _greedy(indptr, nbrs, weights, priority, nodes):
    n = len(indptr) - 1
    by_priority = np.empty(n, dtype=np.int64)
    for v in range(n):
        by_priority[priority[v]] = v
    deg = np.empty(n, dtype=np.int64)
    for v in range(n):
        deg[v] = indptr[v + 1] - indptr[v]
    heap = np.empty(n + len(nbrs) + 1, dtype=np.int64)
    size = 0
    left = 0
    for v in range(n):
        if nodes[v]:
            size = _push(heap, size, deg[v] * n + priority[v])
            left += 1
    visited = np.zeros(n, dtype=np.bool_)
    order = np.empty(n, dtype=np.int64)  # n, not `left`: as in Python, a walk may enter any node
    starts = np.empty(n, dtype=np.int64)
    steps = np.empty(n, dtype=np.float64)
    n_order = 0
    n_starts = 0
    n_steps = 0
    while left != 0 and size > 0:  # Python's `while left and heap`
        key, size = _pop(heap, size)
        d = key // n
        v = by_priority[key - d * n]
        if visited[v] or deg[v] != d:
            continue
        starts[n_starts] = n_order
        n_starts += 1
        while True:
            visited[v] = True
            order[n_order] = v
            n_order += 1
            left -= 1
            nxt = -1
            w = 0.0
            for e in range(indptr[v], indptr[v + 1]):
                u = nbrs[e]
                if visited[u]:
                    continue
                deg[u] -= 1
                if nxt < 0:
                    nxt = u
                    w = weights[e]
                else:
                    size = _push(heap, size, deg[u] * n + priority[u])
            if nxt < 0:
                break
            steps[n_steps] = w
            n_steps += 1
            v = nxt
    return order[:n_order], starts[:n_starts], steps[:n_steps]


def _adjacency(n, a, b, w, prio_b):
    counts = np.zeros(n + 1, dtype=np.int64)
    for i in range(len(a)):
        counts[a[i] + 1] += 1
    indptr = np.cumsum(counts)
    fill = indptr[:-1].copy()
    pos = np.empty(len(a), dtype=np.int64)
    for i in range(len(a)):  # stable counting sort by source node
        pos[fill[a[i]]] = i
        fill[a[i]] += 1
    out_b = np.empty(len(a), dtype=np.int64)
    out_w = np.empty(len(a), dtype=np.float64)
    new_ptr = np.zeros(n + 1, dtype=np.int64)
    m = 0
    for v in range(n):
        seg = pos[indptr[v] : indptr[v + 1]]
        o = np.argsort(prio_b[seg], kind="mergesort")
        o = o[np.argsort(-w[seg[o]], kind="mergesort")]  # weight descending, ties by priority
        last = -1
        for j in o:
            e = seg[j]
            if b[e] == last:  # a pair from both kNN lists: equal weights, so the copies are adjacent
                continue
            last = b[e]
            out_b[m] = b[e]
            out_w[m] = w[e]
            m += 1
        new_ptr[v + 1] = m
    return new_ptr, out_b[:m].copy(), out_w[:m].copy()


def _pair_dot(indptr, indices, data, a, b, dense, out):
    current = -1
    for i in range(len(a)):
        if a[i] != current:  # scatter row a[i] into the dense scratch row (pairs come grouped by a)
            if current >= 0:
                for p in range(indptr[current], indptr[current + 1]):
                    dense[indices[p]] = 0.0
            current = a[i]
            for p in range(indptr[current], indptr[current + 1]):
                dense[indices[p]] = data[p]
        acc = 0.0
        for q in range(indptr[b[i]], indptr[b[i] + 1]):
            acc += data[q] * dense[indices[q]]
        out[i] = acc


def _bags(indptr, cols, v, out_ptr, out_cols, out_counts):
    count = np.zeros(v, dtype=np.int64)
    m = 0
    for r in range(len(indptr) - 1):
        start = m
        for p in range(indptr[r], indptr[r + 1]):
            c = cols[p]
            if c < 0:
                continue
            if count[c] == 0:
                out_cols[m] = c
                m += 1
            count[c] += 1
        out_cols[start:m] = np.sort(out_cols[start:m])
        for q in range(start, m):
            out_counts[q] = count[out_cols[q]]
            count[out_cols[q]] = 0
        out_ptr[r + 1] = m
    return m


def _jit(f):
    """Compiled with an on-disk cache where numba finds a writable place for one, else without (a
    read-only install under a user without a home: numba refuses cache=True there)."""
    try:
        return numba.njit(cache=True, nogil=True)(f)
    except RuntimeError:
        return numba.njit(cache=False, nogil=True)(f)


if numba is not None:
    _bags = _jit(_bags)
    _pair_dot = _jit(_pair_dot)
    _adjacency = _jit(_adjacency)
    _push = _jit(_push)
    _pop = _jit(_pop)
    _greedy = _jit(_greedy)


def greedy_path_compiled(indptr, nbrs, weights, priority, nodes):
    """icp_graph.greedy_path's contract, compiled (see the module docstring). `priority` must be a
    permutation of range(n) (checked: the kernel indexes by it)."""
    n = len(indptr) - 1
    p = np.asarray(priority)
    if len(p) != n or (n and (p.min() < 0 or p.max() >= n or np.bincount(p, minlength=n).max() != 1)):
        raise ValueError("ICP traversal: priority must be a permutation of range(n)")
    order, starts, steps = _greedy(
        np.ascontiguousarray(indptr, dtype=np.int64),
        np.ascontiguousarray(nbrs, dtype=np.int64),
        np.ascontiguousarray(weights, dtype=np.float64),
        np.ascontiguousarray(priority, dtype=np.int64),
        np.ascontiguousarray(nodes, dtype=np.bool_),
    )
    return order.copy(), starts.copy(), steps.copy()


def adjacency_compiled(n: int, a: np.ndarray, b: np.ndarray, w: np.ndarray, priority: np.ndarray):
    """The sorting half of icp_graph.undirected_graph, compiled: CSR (indptr, neighbours, weights) of
    the directed entries a -> b, each node's sorted by weight descending then priority, a repeated
    (a, b) kept once. A counting sort by node and a small sort per node, not one lexsort over
    every entry (the same result, tested)."""
    b64 = np.ascontiguousarray(b, dtype=np.int64)
    indptr, nb, wt = _adjacency(
        int(n),
        np.ascontiguousarray(a, dtype=np.int64),
        b64,
        np.ascontiguousarray(w, dtype=np.float64),
        np.ascontiguousarray(priority, dtype=np.int64)[b64],
    )
    return (
        indptr,
        nb.astype(b.dtype, copy=False),
        wt.astype(w.dtype, copy=False),
    )  # the input's dtypes, as Python


def pair_dot_compiled(x, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x[a_i] · x[b_i] for rows of a CSR matrix: row a_i scattered into one dense scratch row (kept
    while consecutive pairs share a_i), then row b_i's entries multiplied against it, with no
    branches, instead of fetching both rows and merging their columns. Equal to the sparse product
    up to the order of the additions (within 1e-15; tested)."""
    import scipy.sparse as sp

    x = sp.csr_matrix(x)
    if not x.has_canonical_format:  # the scatter needs each column once per row
        x = x.copy()
        x.sum_duplicates()
    a, b = np.asarray(a), np.asarray(b)
    if len(a) != len(b):
        raise ValueError(f"pair_dot: {len(a)} first rows but {len(b)} second rows")
    n = x.shape[0]
    if len(a) and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n):
        raise IndexError(f"pair_dot: row ids outside [0, {n})")
    out = np.empty(len(a), dtype=np.float64)
    dense = np.zeros(x.shape[1], dtype=np.float64)
    _pair_dot(
        x.indptr,
        x.indices,
        np.asarray(x.data, dtype=np.float64),
        np.ascontiguousarray(a, dtype=np.int64),
        np.ascontiguousarray(b, dtype=np.int64),
        dense,
        out,
    )
    return out


def bag_counts_compiled(lengths: np.ndarray, cols: np.ndarray, v: int):
    """icp_embed.bag_counts compiled: each row's counts gathered in a scratch row of v counters, its
    distinct columns (a few hundred) sorted, instead of sorting every occurrence of the row: the same
    CSR (tested; index dtypes as scipy picks them below 2**31 entries), about 2-3.5x faster on the
    demo shards. The scratch holds v counters: icp_embed.bag_counts takes this path only for a
    vocabulary not much larger than the input."""
    import scipy.sparse as sp

    lengths = np.asarray(lengths, dtype=np.int64)
    cols = np.asarray(cols)
    if not np.issubdtype(cols.dtype, np.integer):
        cols = cols.astype(np.int64)
    indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    if (lengths < 0).any() or indptr[-1] != len(cols):
        raise ValueError(f"bag counts: row lengths sum to {indptr[-1]}, not to the {len(cols)} columns given")
    if len(cols) and cols.max() >= v:
        raise ValueError(f"bag counts: column {int(cols.max())} outside a vocabulary of {v}")
    index_t = np.int32 if len(cols) < 2**31 and v < 2**31 else np.int64
    out_ptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    out_cols = np.empty(len(cols), dtype=index_t)
    out_counts = np.empty(len(cols), dtype=np.float64)
    m = _bags(indptr, np.ascontiguousarray(cols), int(v), out_ptr, out_cols, out_counts)
    x = sp.csr_matrix(
        (out_counts[:m].copy(), out_cols[:m].copy(), out_ptr.astype(index_t)), shape=(len(lengths), v)
    )
    x.has_sorted_indices = True
    x.has_canonical_format = True
    return x
