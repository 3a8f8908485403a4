"""The graph half of In-Context Pretraining ordering: kNN (faiss; exact search compiled where numba
is installed), near-duplicates, greedy traversal.

Memory is the embeddings plus the N x k neighbour lists and the undirected adjacency built from them
(at most 2·N·k entries); nothing is ever N x N. The queries go to faiss in chunks, and exact search
(IndexFlatIP, or icp_knn.self_knn_compiled) itself blocks its score computation, so the score
block and the candidate lists (one N x k' set per search thread, bounded) are the only extra.

Edge weights are recomputed in float64 from the float32 embeddings, one dot product per edge: the
search decides only *which* documents are neighbours, so the weights that break ties and decide
duplicates do not depend on how the search or BLAS split the work across threads or chunks.
"""

from __future__ import annotations

import heapq
import math
import os
import sys
from contextlib import contextmanager

import numpy as np

from elmforest.cluster import icp_dots, icp_kernels, icp_knn
from elmforest.utils.errors import UserError


def default_threads() -> int:
    """torch's intra-op thread count where torch is loaded (a trainer that set it means it), else
    OMP_NUM_THREADS, else the cores this process may run on. Importing torch only to ask would cost
    more than ordering a small corpus."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return max(1, torch.get_num_threads())
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    from elmforest.utils.threads import cpu_cores

    return max(1, cpu_cores())


@contextmanager
def faiss_threads(n: int):
    """faiss's OpenMP thread count for a block, restored afterwards (it is process-wide)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, int(n)))
    try:
        yield faiss
    finally:
        faiss.omp_set_num_threads(before)


def import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise UserError("ICP ordering needs faiss: `pip install faiss-cpu` (the icp extra)") from e
    return faiss


def knn_search(
    z: np.ndarray,
    k: int,
    *,
    exact_limit: int = 20_000,
    nprobe: int = 16,
    nlist: int | None = None,
    chunk: int = 4096,
    seed: int = 0,
    threads: int | None = None,
    margin: int = 4,
    compiled: bool | None = None,
) -> tuple[np.ndarray, dict]:
    """The k most similar other rows of unit vectors `z` by inner product: ids [N, k] int64, -1 where
    fewer than k were found. Exact up to `exact_limit` rows; beyond, IVF-Flat with nlist ≈ 4·√N
    (at most N/39, faiss's minimum of training points per list) probed `nprobe` lists deep.

    faiss proposes k + 1 + `margin` candidates; they are re-ranked by `edge_similarity` (ties: lower
    id) and the best k other than the row itself kept. faiss's float32 scores change in the last
    bits with its thread count and query blocking (23 of the demo corpus's 19,081 lists did between
    1 and 2 threads); the re-ranking makes the lists independent of both, except within a group of
    more than `margin` bit-identical vectors (documents that differ only outside the SVD subspace),
    where faiss picks which members to propose.

    Exact search goes to icp_knn.self_knn_compiled where numba is installed (`compiled`, default:
    then): each pair's score computed once instead of twice, 1.4-1.7x faster on the demo corpus's
    largest domain, and the same candidates as IndexFlatIP, except where more than `margin` scores
    tie at the cut (bit-identical vectors): it proposes the lowest ids, faiss whichever its blocking
    met first (on the whole demo shards 1 list of 17,178 differed so). Which search ran is not in the
    order's params; the order digests in the index tell such orders apart."""
    import_faiss()
    z = np.ascontiguousarray(z, dtype=np.float32)
    n, d = z.shape
    out = np.full((n, k), -1, dtype=np.int64)
    info = {"method": "exact", "k": k}
    if n < 2:
        return out, info
    kk = min(k + 1 + margin, n)
    threads = threads or default_threads()
    proposed = index = None
    if n <= exact_limit and icp_kernels.wanted(compiled):
        proposed = icp_knn.self_knn_compiled(z, kk, threads)[1]
    else:
        index = _faiss_index(z, exact_limit, nprobe, nlist, seed, threads, info)
    # the re-ranking compiled, bit for bit (icp_dots); NaN scores keep NumPy's order
    fast = icp_dots.fits(z) and icp_kernels.wanted(compiled) and bool(np.isfinite(z).all())
    with faiss_threads(threads):
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            ids = proposed[s:e] if index is None else index.search(z[s:e], kk)[1]
            if fast:
                out[s:e, : min(k, kk)] = icp_dots.rerank(z, ids, s, k)
                continue
            rows = np.arange(s, e)[:, None]
            found = ids >= 0
            safe = np.where(found, ids, 0)
            sim = (z[s:e, None, :] * z[safe]).sum(-1, dtype=np.float64)
            sim[~found | (ids == rows)] = -np.inf  # itself and empty slots last
            o = np.lexsort((safe, -sim), axis=-1)[:, :k]
            best = np.take_along_axis(ids, o, axis=1)
            best[np.take_along_axis(sim, o, axis=1) == -np.inf] = -1
            out[s:e, : best.shape[1]] = best
    return out, info


def _faiss_index(z, exact_limit, nprobe, nlist, seed, threads, info):
    """A filled faiss index over z: IndexFlatIP up to exact_limit rows, else IVF-Flat (`info` says
    which)."""
    n, d = z.shape
    with faiss_threads(threads) as faiss:
        if n <= exact_limit:
            index = faiss.IndexFlatIP(d)
        else:
            nl = nlist or round(4 * math.sqrt(n))
            nl = max(1, min(nl, n // 39))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nl, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            index.cp.niter = 10  # faiss's 25 buys little recall for IVF lists; training is most of the cost
            index.cp.max_points_per_centroid = 39  # a seeded sample of ≤ 39 · nlist (faiss's minimum)
            index.train(z)
            index.nprobe = min(nprobe, nl)
            info.update(method="ivf", nlist=nl, nprobe=index.nprobe)
        index.add(z)
    return index


def edge_similarity(
    z: np.ndarray, src: np.ndarray, dst: np.ndarray, chunk: int = 1 << 14, compiled: bool | None = None
) -> np.ndarray:
    """cos(z[src], z[dst]): float32 products summed in float64 (elementwise, so no thread count or
    chunking changes a bit), clipped to [-1, 1]; in chunks of edges that stay in cache. `compiled`
    (default: where numba is installed): icp_dots computes the same bits without temporaries."""
    if icp_dots.fits(z) and icp_kernels.wanted(compiled):
        return np.clip(icp_dots.pair_sims(z, src, dst), -1.0, 1.0)
    out = np.empty(len(src), dtype=np.float64)
    for s in range(0, len(src), chunk):
        prod = z[src[s : s + chunk]] * z[dst[s : s + chunk]]
        out[s : s + chunk] = prod.sum(1, dtype=np.float64)
    return np.clip(out, -1.0, 1.0)


def near_duplicates(
    n: int, src: np.ndarray, dst: np.ndarray, sim: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy in index order: a document is dropped when an earlier document that is kept is its
    neighbour with similarity ≥ threshold. Returns (dropped mask [n], partner [n] (-1 if kept), the
    pair's similarity [n]). Only pairs present in the kNN lists (either direction) are seen.

    Pairs are visited sorted by (earlier, later); when (a, b) comes up, every pair that could drop
    `a` (all have a smaller first member) has been seen, so a's status is final: the outcome equals
    the brute-force rule over the same pairs."""
    m = (sim >= threshold) & (src != dst) & (dst >= 0)
    a, b, w = np.minimum(src[m], dst[m]), np.maximum(src[m], dst[m]), sim[m]
    o = np.lexsort((b, a))
    dropped = np.zeros(n, dtype=bool)
    partner = np.full(n, -1, dtype=np.int64)
    psim = np.zeros(n, dtype=np.float64)
    gone = bytearray(n)
    for x, y, s in zip(a[o].tolist(), b[o].tolist(), w[o].tolist(), strict=True):
        if not gone[x] and not gone[y]:
            gone[y] = 1
            partner[y], psim[y] = x, s
    dropped[np.frombuffer(bytes(gone), dtype=np.uint8).astype(bool)] = True
    return dropped, partner, psim


def undirected_graph(
    n: int,
    src: np.ndarray,
    dst: np.ndarray,
    sim: np.ndarray,
    keep: np.ndarray,
    priority: np.ndarray,
    compiled: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR adjacency (indptr [n+1], neighbours, weights) of the union of the kNN lists, both
    directions, edges touching a node outside `keep` removed, one entry per pair. Each node's
    neighbours are sorted by weight descending, ties by `priority` ascending: the traversal then
    takes the first unvisited entry. `compiled`: icp_kernels' version (the same result; default:
    when numba is there)."""
    v = (dst >= 0) & (src != dst)
    v[v] &= keep[src[v]] & keep[dst[v]]
    a = np.concatenate([src[v], dst[v]])
    b = np.concatenate([dst[v], src[v]])
    w = np.concatenate([sim[v], sim[v]])
    from elmforest.cluster import icp_kernels

    if icp_kernels.wanted(compiled):
        return icp_kernels.adjacency_compiled(n, a, b, w, priority)
    o = np.lexsort((priority[b], -w, a))
    a, b, w = a[o], b[o], w[o]
    # a pair in both kNN lists comes twice with the same weight (edge_similarity is symmetric to the
    # bit), so its copies sort next to each other: keep the first
    first = np.ones(len(a), dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    a, b, w = a[first], b[first], w[first]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(a, minlength=n), out=indptr[1:])
    return indptr, b, w


def greedy_path(
    indptr: np.ndarray,
    nbrs: np.ndarray,
    weights: np.ndarray,
    priority: np.ndarray,
    nodes: np.ndarray,
    compiled: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's greedy traversal over `nodes` (bool [n]): start at an unvisited node of minimum
    degree, step to its most similar unvisited neighbour until none is left, then start again.

    Degree means the degree in the graph of the *unvisited* nodes, kept current as nodes are
    visited (the paper's Algorithm 1 removes each visited document from the graph before the next
    min_deg). A node whose neighbours are mostly taken is the one about to be stranded as a
    one-document segment; starting there lets it lead a path instead. Ties go to the lowest
    `priority` (a permutation of range(n): the seeded tie-break). The minimum is kept in one lazy
    heap of keys degree·n + priority, pushed again on every decrement and skipped when stale.

    Returns (order, segment start offsets into order, similarity of each step along an edge).
    `compiled`: the numba version in icp_kernels (the same result; default: when numba is there)."""
    from elmforest.cluster import icp_kernels

    if icp_kernels.wanted(compiled):
        return icp_kernels.greedy_path_compiled(indptr, nbrs, weights, priority, nodes)
    n = len(indptr) - 1
    ip = indptr.tolist()
    nb, wt = nbrs.tolist(), weights.tolist()
    adj = [nb[ip[v] : ip[v + 1]] for v in range(n)]  # per node: the C-level scans below need lists
    pr = priority.tolist()
    by_priority = np.empty(n, dtype=np.int64)
    by_priority[priority] = np.arange(n)
    bp = by_priority.tolist()
    deg = np.diff(indptr).tolist()
    nodes_idx = np.flatnonzero(nodes)
    heap = (np.diff(indptr)[nodes_idx] * n + priority[nodes_idx]).tolist()
    heapq.heapify(heap)
    visited = bytearray(n)
    order: list[int] = []
    starts: list[int] = []
    steps: list[float] = []
    push, pop = heapq.heappush, heapq.heappop
    left = len(nodes_idx)
    while left and heap:  # not `while heap`: the stale keys left once every node is visited need no popping
        key = pop(heap)
        d, r = divmod(key, n)
        v = bp[r]
        if visited[v] or deg[v] != d:
            continue
        starts.append(len(order))
        while True:
            visited[v] = 1
            order.append(v)
            left -= 1
            a = adj[v]
            free = [u for u in a if not visited[u]]
            if not free:
                break
            for u in free:
                deg[u] -= 1
            for u in free[1:]:
                push(heap, deg[u] * n + pr[u])
            v = free[0]
            steps.append(wt[ip[order[-1]] + a.index(v)])
    return (
        np.asarray(order, dtype=np.int64),
        np.asarray(starts, dtype=np.int64),
        np.asarray(steps, dtype=np.float64),
    )
