"""icp_dots: the compiled similarities equal NumPy's to the bit, the compiled re-ranking equals
knn_search's NumPy code, and the exact-duplicate partners equal the byte-key dictionary's, also
when every hash collides."""

import numpy as np
import pytest

from elmforest.cluster import icp_dots, icp_kernels
from elmforest.cluster.icp_graph import edge_similarity, knn_search

pytestmark = pytest.mark.skipif(not icp_kernels.available(), reason="no numba")


@pytest.mark.parametrize("d", [1, 3, 7, 8, 9, 37, 64, 100, 128])
def test_pair_sims_are_numpys_bits(d):
    rng = np.random.default_rng(d)
    z = rng.standard_normal((300, d)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    a, b = rng.integers(0, 300, 5000), rng.integers(0, 300, 5000)
    want = (z[a] * z[b]).sum(1, dtype=np.float64)
    assert np.array_equal(icp_dots.pair_sims(z, a, b), want)  # equal bits, not close
    assert np.array_equal(edge_similarity(z, a, b), edge_similarity(z, a, b, compiled=False))
    assert icp_dots.fits(z) and not icp_dots.fits(z.astype(np.float64))
    wide = np.ones((2, 129), dtype=np.float32)  # NumPy halves rows above 128 terms: left to it
    assert not icp_dots.fits(wide) and edge_similarity(wide, [0], [1])[0] == 1.0


@pytest.mark.parametrize("exact_limit", [10_000, 0])
def test_compiled_reranking_equals_numpys(exact_limit):
    """Exact search and IVF (empty slots: -1) with planted copies (tied scores, broken by id)."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((8, 16))
    z = (centres[rng.integers(0, 8, 400)] + 0.3 * rng.standard_normal((400, 16))).astype(np.float32)
    z[[10, 50, 51, 300]] = z[3]
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    for k in (1, 5, 12):
        fast, _ = knn_search(z, k, exact_limit=exact_limit, nprobe=1, compiled=True, chunk=97)
        slow, _ = knn_search(z, k, exact_limit=exact_limit, nprobe=1, compiled=False, chunk=97)
        if exact_limit:
            assert np.array_equal(fast, slow)
        else:  # faiss searched both: only the re-ranking differs in code
            ids = np.stack([fast, slow])
            assert np.array_equal(fast, slow), np.argwhere(ids[0] != ids[1])[:5]
    tiny = knn_search(z[:4], 6, compiled=True)[0]
    assert (tiny[:, 3:] == -1).all() and np.array_equal(tiny, knn_search(z[:4], 6, compiled=False)[0])


def test_out_of_range_rows_are_refused_not_read():
    z = np.eye(4, 8, dtype=np.float32)
    with pytest.raises(IndexError):
        icp_dots.pair_sims(z, np.array([0, 4]), np.array([1, 1]))
    with pytest.raises(IndexError):
        icp_dots.rerank(z, np.array([[1, 9]]), 0, 1)
    with pytest.raises(IndexError):
        icp_dots.rerank(z, np.array([[1, 2]]), 4, 1)


def numpy_rerank(z, ids, r0, k):
    """knn_search's NumPy re-ranking, for the rows r0.. of the candidates `ids`."""
    rows = np.arange(r0, r0 + len(ids))[:, None]
    found = ids >= 0
    safe = np.where(found, ids, 0)
    sim = (z[r0 : r0 + len(ids), None, :] * z[safe]).sum(-1, dtype=np.float64)
    sim[~found | (ids == rows)] = -np.inf
    o = np.lexsort((safe, -sim), axis=-1)[:, :k]
    best = np.take_along_axis(ids, o, axis=1)
    best[np.take_along_axis(sim, o, axis=1) == -np.inf] = -1
    return best


def test_rerank_equals_numpy_with_empty_slots_repeats_and_ties():
    rng = np.random.default_rng(4)
    z = rng.standard_normal((60, 16)).astype(np.float32)
    z[[7, 8, 9, 40]] = z[3]  # tied scores
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    for trial in range(60):
        kk, r0 = int(rng.integers(1, 9)), int(rng.integers(0, 30))
        ids = rng.integers(-1, 60, size=(int(rng.integers(1, 30)), kk))  # -1 slots, repeats, the row itself
        ids[:, 0] = np.where(rng.random(len(ids)) < 0.3, np.arange(r0, r0 + len(ids)), ids[:, 0])
        for k in (1, kk, kk + 3):
            want = numpy_rerank(z, ids, r0, k)
            assert np.array_equal(icp_dots.rerank(z, ids, r0, k), want), (trial, k)
