"""icp_dots: the compiled similarities equal NumPy's to the bit, the compiled re-ranking equals
knn_search's NumPy code, and the exact-duplicate partners equal the byte-key dictionary's, also
when every hash collides."""

import numpy as np
import pytest
import scipy.sparse as sp

from elmforest.cluster import icp_dots, icp_kernels
from elmforest.cluster.icp_embed import row_keys
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


def by_dict(x, rows):
    first: dict[bytes, int] = {}
    return np.array([first.setdefault(k, i) for i, k in zip(rows.tolist(), row_keys(x, rows), strict=True)])


def test_first_equal_rows_equal_the_byte_keys_and_survive_collisions(monkeypatch):
    rng = np.random.default_rng(2)
    x = sp.random(200, 50, density=0.1, random_state=3, format="csr")
    x.data = np.round(x.data, 1)  # few distinct values: more chances for rows that differ slightly
    rows = x.toarray()
    rows[[20, 70, 150]] = rows[5]  # copies
    rows[71] = rows[70] * (1 + 1e-16)  # equal in float64 (the factor rounds to 1): a copy too
    rows[90] = rows[5]
    rows[90, np.flatnonzero(rows[5])[0]] += 1e-12  # differs in one value's last bits: not a copy
    rows[[120, 121]] = 0.0  # two empty rows are equal
    x = sp.csr_matrix(rows)
    keep = np.sort(rng.choice(200, 180, replace=False))
    keep = np.union1d(keep, [5, 20, 70, 71, 90, 120, 121, 150])
    want = by_dict(x, keep)
    got = icp_dots.first_equal_rows(x, keep)
    assert np.array_equal(got, want)
    assert got[np.searchsorted(keep, 90)] == 90 and got[np.searchsorted(keep, 150)] == 5

    def collide(indptr, indices, bits, out):
        out[:] = 7  # every row the same hash: confirmation must fall back to the byte keys

    monkeypatch.setattr(icp_dots, "_row_hashes", collide)
    assert np.array_equal(icp_dots.first_equal_rows(x, keep), want)


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


def test_first_equal_rows_on_float32_values():
    x = sp.csr_matrix(np.array([[0, 1.5, 0], [0, 1.5, 0], [0, 1.5000001, 0], [2, 0, 0]], dtype=np.float32))
    rows = np.arange(4)
    assert np.array_equal(icp_dots.first_equal_rows(x, rows), by_dict(x, rows))
    assert icp_dots.first_equal_rows(x, rows).tolist() == [0, 0, 2, 3]
