"""In-Context Pretraining ordering (cluster/icp*.py): completeness, duplicates, the traversal against a
trace by hand, determinism, kNN exact vs IVF and in chunks, bounded memory, refused input."""

import random
import tracemalloc

import numpy as np
import pytest

from elmforest.cluster import icp_kernels, icp_knn
from elmforest.cluster.icp import TokenDocuments, icp_order, icp_plan
from elmforest.cluster.icp_embed import embed
from elmforest.cluster.icp_graph import greedy_path, knn_search, undirected_graph
from elmforest.utils.errors import UserError


def brute_force_dropped(sim: np.ndarray, ok: np.ndarray, threshold: float) -> set[int]:
    """The rule over every pair: a document goes when an earlier kept document is ≥ threshold."""
    kept: list[int] = []
    dropped = set()
    for i in range(len(sim)):
        if not ok[i]:
            continue
        if any(sim[i, j] >= threshold for j in kept):
            dropped.add(i)
        else:
            kept.append(i)
    return dropped


def check_partition(plan, n: int) -> None:
    order = plan.order.tolist()
    assert len(order) == len(set(order))  # nothing twice
    assert set(order).isdisjoint(plan.dropped.tolist())
    assert sorted(order + plan.dropped.tolist()) == list(range(n))  # nothing lost
    assert plan.stats["kept"] == len(order) and plan.stats["dropped_duplicates"] == len(plan.dropped)
    assert plan.stats["documents"] == n


def clustered(n_clusters: int, per: int, d: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d))
    z = np.repeat(centres, per, axis=0) + spread * rng.normal(size=(n_clusters * per, d))
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)


def test_embeddings_every_document_once_and_duplicates_as_brute_force():
    pytest.importorskip("faiss")
    z = clustered(12, 20, 24, 0.35, seed=0)
    rng = np.random.default_rng(1)
    # plant near-copies (tiny noise) and exact copies of random earlier rows, groups smaller than k
    src = rng.choice(len(z), 30, replace=False)
    near = z[src[:20]] + 0.01 * rng.normal(size=(20, z.shape[1])).astype(np.float32)
    z = np.concatenate([z, near, z[src[20:]], np.zeros((3, z.shape[1]), np.float32)])
    z = z[rng.permutation(len(z))]  # copies sometimes before their original
    plan = icp_plan(z, k=10, dedup_threshold=0.98, seed=0)
    check_partition(plan, len(z))
    u = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-30)
    ok = np.linalg.norm(z, axis=1) > 0
    expected = brute_force_dropped(u.astype(np.float64) @ u.T.astype(np.float64), ok, 0.98)
    assert len(expected) >= 25 and set(plan.dropped.tolist()) == expected
    sims = (u[plan.dropped] * u[plan.dropped_partner]).sum(1)
    assert (plan.dropped_partner < plan.dropped).all() and np.allclose(
        sims, plan.dropped_similarity, atol=1e-6
    )
    assert plan.stats["unembedded"] == 3 and set(plan.order[-3:].tolist()) == set(
        np.flatnonzero(~ok).tolist()
    )
    assert plan.stats["exact_duplicates"] + plan.stats["near_duplicates"] == len(expected)


def _doc(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n))


def test_texts_duplicates_by_tfidf_cosine_and_unembedded_documents_kept():
    pytest.importorskip("faiss")
    rng = random.Random(0)
    topics = [[f"t{t}w{i}x" for i in range(40)] for t in range(6)]
    texts = [_doc(rng, topics[i % 6], 60) for i in range(90)]
    texts.append(texts[5])  # exact copy
    texts.append(texts[7].replace(texts[7].split()[0], "changed", 1))  # one word differs
    texts.append(texts[9] + " " + _doc(rng, topics[0], 30))  # another topic appended: not a copy
    texts += ["", "!!! ... ???", "a b c"]  # no word the analyser keeps
    plan = icp_plan(texts, k=10, dedup_threshold=0.9, seed=0)
    check_partition(plan, len(texts))
    z, x = embed(texts, seed=0)
    ok = np.asarray(x.sum(1)).ravel() > 0
    expected = brute_force_dropped((x @ x.T).toarray(), ok, 0.9)
    assert {90, 91} <= expected and 92 not in expected
    assert set(plan.dropped.tolist()) == expected
    assert plan.stats["exact_duplicates"] == 1 and plan.stats["dedup_similarity"] == "tf-idf cosine"
    assert plan.order[-3:].tolist() == [93, 94, 95] and plan.stats["unembedded"] == 3
    assert plan.segments[-3:].tolist() == [len(plan.order) - 3, len(plan.order) - 2, len(plan.order) - 1]
    # related documents follow each other: mostly the same topic, far above a random order's 1/6
    o = [i for i in plan.order.tolist() if i < 90]
    assert np.mean([a % 6 == b % 6 for a, b in zip(o, o[1:], strict=False)]) > 0.8


@pytest.mark.parametrize(
    "texts",
    [
        ["hello world foo bar"],
        ["hello world foo", "zebra yak xylophone"],
        ["!!!", "???"],
        ["a b c d", "x y z"],
    ],
)
def test_documents_without_a_shared_term_are_kept_in_order_one_segment_each(texts):
    """No term in min_df = 2 documents (one document, or none shared): nothing to place by similarity."""
    pytest.importorskip("faiss")
    plan = icp_plan(texts, seed=0)
    check_partition(plan, len(texts))
    assert plan.order.tolist() == list(range(len(texts))) and plan.segments.tolist() == list(
        range(len(texts))
    )
    assert plan.stats["unembedded"] == len(texts) and plan.stats["dropped_duplicates"] == 0


TRAVERSALS = [
    False,
    pytest.param(True, marks=pytest.mark.skipif(not icp_kernels.available(), reason="no numba")),
]


@pytest.mark.parametrize("compiled", TRAVERSALS)
def test_traversal_equals_the_trace_by_hand(compiled):
    """Edges (weight): 0-1 .9, 1-3 .7, 2-3 .75, 3-4 .6, 4-5 .65, 3-5 .5, 6-7 .55, 5-6 .2.
    Degrees 0:1 1:2 2:1 3:4 4:2 5:3 6:2 7:1; priorities (lower first) below.
    Degree 1: 0 (p5), 2 (p0), 7 (p4) -> start at 2. 2 -> 3 (its only neighbour). 3's unvisited
    neighbours 1 (.7), 4 (.6), 5 (.5) -> 1. 1 -> 0 (.9). 0: dead end; segment [2, 3, 1, 0].
    Left: 4 (unvisited degree 1: only 5), 5 (2), 6 (2), 7 (1) -> 4 (p1) before 7 (p4); with the static
    degree 7 (1) would come before 4 (2). 4 -> 5 (.65) -> 6 (.2, its only unvisited) -> 7 (.55)."""
    e = [
        (0, 1, 0.9),
        (1, 3, 0.7),
        (2, 3, 0.75),
        (3, 4, 0.6),
        (4, 5, 0.65),
        (3, 5, 0.5),
        (6, 7, 0.55),
        (5, 6, 0.2),
    ]
    src = np.array([a for a, _, _ in e])
    dst = np.array([b for _, b, _ in e])
    w = np.array([s for _, _, s in e])
    priority = np.array([5, 3, 0, 6, 1, 7, 2, 4])
    keep = np.ones(8, dtype=bool)
    graph = undirected_graph(8, src, dst, w, keep, priority, compiled=compiled)
    order, starts, steps = greedy_path(*graph, priority, keep, compiled=compiled)
    assert order.tolist() == [2, 3, 1, 0, 4, 5, 6, 7]
    assert starts.tolist() == [0, 4]
    assert steps.tolist() == [0.75, 0.7, 0.9, 0.65, 0.2, 0.55]
    # a node left out of `keep` (a dropped duplicate) loses its edges and is never visited. Without 3:
    # 2 has degree 0 -> [2]; degree 1: 0 (p5), 1 (p3), 4 (p1), 7 (p4) -> 4 -> 5 -> 6 -> 7; then 1 -> 0
    keep[3] = False
    graph = undirected_graph(8, src, dst, w, keep, priority, compiled=compiled)
    order, starts, _ = greedy_path(*graph, priority, keep, compiled=compiled)
    assert order.tolist() == [2, 4, 5, 6, 7, 1, 0] and starts.tolist() == [0, 1, 5]


def naive_path(n, edges, priority, keep):
    """The rule, recomputed from scratch at every jump: O(N^2), for comparison only."""
    adj = {v: {} for v in range(n)}
    for a, b, w in edges:
        if keep[a] and keep[b] and a != b:
            adj[a][b] = adj[b][a] = w
    visited, order, starts = set(), [], []
    left = {v for v in range(n) if keep[v]}
    while left:
        v = min(left, key=lambda u: (sum(x in left for x in adj[u]), priority[u]))
        starts.append(len(order))
        while v is not None:
            visited.add(v), left.discard(v), order.append(v)
            free = [u for u in adj[v] if u not in visited]
            v = min(free, key=lambda u: (-adj[order[-1]][u], priority[u])) if free else None
    return order, starts


@pytest.mark.parametrize("compiled", TRAVERSALS)
def test_traversal_equals_the_rule_recomputed_from_scratch_on_random_graphs(compiled):
    rng = np.random.default_rng(7)
    for _ in range(30):
        n = int(rng.integers(2, 40))
        m = int(rng.integers(0, 3 * n))
        src, dst = rng.integers(0, n, m), rng.integers(0, n, m)
        w = rng.choice([0.1, 0.5, 0.9], m)  # repeated weights: the tie-break matters
        keep_pairs = {}
        for a, b, x in zip(src.tolist(), dst.tolist(), w.tolist(), strict=True):
            keep_pairs.setdefault((min(a, b), max(a, b)), x)  # one weight per pair, as similarities are
        e = [(a, b, x) for (a, b), x in keep_pairs.items()]
        s, d = np.array([a for a, _, _ in e], dtype=np.int64), np.array([b for _, b, _ in e], dtype=np.int64)
        ws = np.array([x for _, _, x in e])
        priority = rng.permutation(n)
        keep = rng.random(n) > 0.2
        graph = undirected_graph(n, s, d, ws, keep, priority, compiled=compiled)
        order, starts, steps = greedy_path(*graph, priority, keep, compiled=compiled)
        if compiled:  # the same results as the Python code, weights and steps included
            ref_graph = undirected_graph(n, s, d, ws, keep, priority, compiled=False)
            assert all(np.array_equal(a, b) for a, b in zip(graph, ref_graph, strict=True))
            ref = greedy_path(*ref_graph, priority, keep, compiled=False)
            assert all(np.array_equal(a, b) for a, b in zip((order, starts, steps), ref, strict=True))
        assert (order.tolist(), starts.tolist()) == naive_path(n, e, priority, keep)


def test_same_seed_same_order_and_the_tie_break_follows_the_seed():
    pytest.importorskip("faiss")
    # 10 pairs of twins in orthogonal directions, k=1: every degree is 1, every start is a tie
    base = np.eye(10, dtype=np.float32)
    z = np.concatenate([base, base + 0.05 * np.roll(base, 1, axis=1)])
    runs = {seed: icp_order(z, k=1, dedup_threshold=None, seed=seed)[0].tolist() for seed in range(4)}
    assert icp_order(z, k=1, dedup_threshold=None, seed=2)[0].tolist() == runs[2]
    assert len({tuple(r) for r in runs.values()}) > 1
    for r in runs.values():  # every pair stays together whatever the seed
        assert all(a % 10 == b % 10 for a, b in zip(r[::2], r[1::2], strict=True))
    texts = [_doc(random.Random(i), [f"w{j}" for j in range(30)], 40) for i in range(60)]
    a, sa = icp_order(texts, seed=3)
    b, sb = icp_order(texts, seed=3)
    sa.pop("seconds"), sb.pop("seconds")
    assert a.tolist() == b.tolist() and sa == sb


def test_exact_and_ivf_find_the_same_neighbours_on_separated_clusters():
    pytest.importorskip("faiss")
    # 8 tight clusters, 8 lists (N/39); k-means started on sampled points may split a cluster between
    # lists (and merge two others): 4 probes cover a cluster split up to 4 ways
    z = clustered(8, 40, 16, 0.05, seed=3)
    exact, info_e = knn_search(z, 5, exact_limit=10**9)
    ivf, info_i = knn_search(z, 5, exact_limit=0, nprobe=4, seed=0)
    assert info_e["method"] == "exact" and info_i == {"method": "ivf", "k": 5, "nlist": 8, "nprobe": 4}
    assert [set(r) for r in exact.tolist()] == [set(r) for r in ivf.tolist()]
    assert (exact // 40 == np.arange(len(z))[:, None] // 40).all()  # the neighbours are in the cluster


def test_chunked_search_equals_brute_force_and_memory_stays_below_n_squared():
    pytest.importorskip("faiss")
    z = clustered(5, 10, 8, 0.5, seed=4)
    nb, _ = knn_search(z, 4, chunk=7)  # 50 queries in chunks of 7
    s = z.astype(np.float64) @ z.T.astype(np.float64)
    np.fill_diagonal(s, -np.inf)
    assert [set(r) for r in nb.tolist()] == [set(r) for r in np.argsort(-s, axis=1)[:, :4].tolist()]
    small, _ = knn_search(z[:3], 10)  # fewer documents than k: the rest are -1
    assert (small[:, 2:] == -1).all() and (np.sort(small[:, :2], axis=1) >= 0).all()
    n = 6000  # an N x N float32 matrix would be 144 MB
    big = clustered(60, n // 60, 8, 0.5, seed=5)
    tracemalloc.start()
    plan = icp_plan(big, k=10, chunk=1000, dedup_threshold=0.999)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    check_partition(plan, n)
    assert peak < 40e6, f"peak {peak / 1e6:.0f} MB"


@pytest.mark.skipif(not icp_kernels.available(), reason="no numba")
def test_compiled_exact_search_equals_brute_force_and_faiss():
    """self_knn_compiled against a sort of every score (score descending, then id), with planted
    copies (ties) and rows fewer than kk, in blocks of two shapes; with the block fixed the lists do
    not depend on the threads, and knn_search proposes the same neighbours through it as through
    faiss's IndexFlatIP."""
    pytest.importorskip("faiss")
    z = clustered(6, 25, 8, 0.3, seed=6)
    z[[7, 30, 31, 90]] = z[5]  # a group of identical vectors: ties broken by id
    n, kk = len(z), 9
    s = (z @ z.T).astype(np.float32)  # the same float32 products the kernel's BLAS blocks compute
    want = np.array([np.lexsort((np.arange(n), -s[r]))[: kk + 1] for r in range(n)])
    sure = s[np.arange(n), want[:, kk - 1]] - s[np.arange(n), want[:, kk]] > 1e-5  # no near-tie at the cut
    want = want[:, :kk]
    assert sure.mean() > 0.9
    runs = {(t, b): icp_knn.self_knn_compiled(z, kk, threads=t, block=b) for t in (1, 2, 3) for b in (512, 7)}
    for (_, b), (scores, ids) in runs.items():
        np.testing.assert_allclose(scores, np.take_along_axis(s, want, 1), rtol=0, atol=1e-6)
        assert np.array_equal(np.sort(ids[sure], 1), np.sort(want[sure], 1))
        assert (np.diff(scores, axis=1) <= 0).all()
        assert np.array_equal(ids, runs[1, b][1]) and np.array_equal(
            scores, runs[1, b][0]
        )  # no bit by threads
        assert {5, 7, 30, 31, 90} <= set(ids[5].tolist())  # the copies are each other's best
    one = icp_knn.self_knn_compiled(z, kk, threads=4, memory=12 * n * kk)  # room for one thread's lists
    assert np.array_equal(one[1], runs[1, 512][1])
    with pytest.raises(ValueError, match="kk and block"):
        icp_knn.self_knn_compiled(z, 0)
    _, few = icp_knn.self_knn_compiled(z[:3], 5)
    assert (few[:, 3:] == -1).all() and sorted(few[0, :3].tolist()) == [0, 1, 2]
    compiled, info = knn_search(z, 5, compiled=True)
    via_faiss, _ = knn_search(z, 5, compiled=False)
    assert info == {"method": "exact", "k": 5}
    assert np.array_equal(compiled, via_faiss)


def test_token_documents_are_ordered_and_checked():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    docs = [rng.integers(100 * (i % 4), 100 * (i % 4) + 100, size=40) for i in range(40)]
    docs[39] = docs[2][::-1].copy()  # the same bag of tokens: an exact duplicate
    ends = np.cumsum([len(d) + 1 for d in docs])
    tokens = np.concatenate([np.append(d, 999) for d in docs])  # 999: EOS after each document
    plan = icp_plan(TokenDocuments(tokens, ends, vocab_size=1000, ignore=(999,)), k=5, seed=0)
    check_partition(plan, 40)
    assert plan.dropped.tolist() == [39] and plan.dropped_partner.tolist() == [2]
    o = plan.order.tolist()
    assert np.mean([a % 4 == b % 4 for a, b in zip(o, o[1:], strict=False)]) > 0.8
    with pytest.raises(UserError, match="token ids outside"):
        icp_order(TokenDocuments(tokens, ends, vocab_size=500))
    with pytest.raises(UserError, match="non-decreasing"):
        icp_order(TokenDocuments(tokens, ends[::-1], vocab_size=1000))


@pytest.mark.parametrize(
    "data, kwargs, message",
    [
        (np.ones((4, 3)), {"k": 0}, "k .*must be an integer ≥ 1"),
        (np.ones((4, 3)), {"k": 2.5}, "k .*must be an integer ≥ 1"),
        ([], {}, "got no documents"),
        (np.zeros((0, 3)), {}, "got no documents"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), {}, "NaN or infinite"),
        (np.ones(5), {}, r"\[N, d\] array"),
        (np.ones((4, 3)), {"dedup_threshold": 0.0}, r"dedup_threshold must be in \(0, 1\]"),
        (np.ones((4, 3)), {"dedup_threshold": 1.5}, r"dedup_threshold must be in \(0, 1\]"),
        (np.ones((4, 3)), {"nprobe": 0}, "nprobe"),
        (np.ones((4, 3)), {"seed": 2**31}, r"seed must be an integer in \[0, 2\*\*31\)"),
        (np.ones((4, 3)), {"seed": -1}, r"seed must be an integer in \[0, 2\*\*31\)"),
        (["text", 3], {}, "texts, TokenDocuments or a 2-D embedding array"),
        (["a b", "c d"], {"svd_dtype": "float16"}, "svd_dtype must be 'float32' or 'float64'"),
        (["a b", "c d"], {"svd_normalizer": "qr"}, "svd_normalizer must be"),
        (["a b", "c d"], {"dims": 0}, "dims must be at least 1, got 0"),
        (["a b", "c d"], {"fit_docs": "5000"}, "fit_docs must be an integer"),
        (["a b", "c d"], {"max_features": 0}, "max_features must be at least 1"),
        (["a b", "c d"], {"svd_iter": -1}, "svd_iter must be at least 0"),
        (["a b", "c d"], {"dim": 8}, "unknown argument 'dim'; the embedding's are dims, "),
        (np.ones((4, 3)), {"dims": 8}, "'dims' is an embedding argument; the vectors are given"),
    ],
)
def test_bad_input_is_refused_with_a_named_problem(data, kwargs, message):
    if isinstance(data, list) and data:
        pytest.importorskip("faiss")  # checked while embedding, after faiss is found
    with pytest.raises(UserError, match=message):
        icp_order(data, **kwargs)


def test_given_vectors_take_an_embedding_argument_left_at_none():
    pytest.importorskip("faiss")
    z = np.random.default_rng(0).normal(size=(20, 4))
    assert sorted(icp_order(z, embedder=None, dedup_threshold=None)[0].tolist()) == list(range(20))


def test_faiss_thread_count_is_restored():
    faiss = pytest.importorskip("faiss")
    before = faiss.omp_get_max_threads()
    _, stats = icp_order(clustered(3, 10, 4, 0.3, seed=0), k=3, threads=1)
    assert stats["threads"] == 1 and faiss.omp_get_max_threads() == before


def reference_word_counts(texts, max_chars):
    """WORD.findall + normalise_word per document, terms numbered in first-seen order."""
    from elmforest.cluster.clusterer import WORD, normalise_word

    columns, lengths, cols = {}, [], []
    for text in texts:
        terms = [normalise_word(w) for w in WORD.findall(text[:max_chars])]
        cols += [-1 if t is None else columns.setdefault(t, len(columns)) for t in terms]
        lengths.append(len(terms))
    return lengths, cols, len(columns)


def test_word_bags_equal_a_regex_per_document_on_unicode_text():
    from elmforest.cluster.icp_embed import _word_counts

    rng = random.Random(0)
    pieces = [
        "Hello",
        "WORLD",
        "the",
        "a",
        "x1",
        "2nd",
        "snake_case",
        "__init__",
        "Ünïcode",
        "İstanbul",
        "ΟΔΟΣ",
        "straße",
        "e\u0301t\u00e9",
        "日本語",
        "²",
        "½",
        "٣٤",
        "Ⅻ",
        "naïve—dash",
        "a\xa0b",
        "│box─",
        "‘quoted’",
        "\ud800lone",
        "nel\x85x",
        "ctl\x01sep",
        "tab\tnew\nline",
        "!!",
        "",
    ]
    texts = [
        "".join(rng.choice(pieces) + rng.choice(" .,;") for _ in range(rng.randint(0, 30))) for _ in range(60)
    ]
    texts += ["", "\x01", "only ascii words here", "ÉCOLE école"]
    for max_chars in (2_000, 17):  # 17: cuts inside words and inside the non-ASCII runs
        lengths, cols, v = _word_counts(texts, max_chars, batch=7)  # batches: numbering carries over
        want_lengths, want_cols, want_v = reference_word_counts(texts, max_chars)
        assert lengths.tolist() == want_lengths and cols.tolist() == want_cols and v == want_v


@pytest.mark.parametrize("compiled", TRAVERSALS)
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_bag_counts_equal_a_count_per_row(compiled, dtype):
    from collections import Counter

    from elmforest.cluster.icp_embed import bag_counts

    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 30, 50)
    lengths[[3, 49]] = 0  # empty rows, the last one too
    cols = rng.integers(-1, 12, int(lengths.sum()))  # -1: left out
    cols = cols.astype(dtype)
    x = bag_counts(lengths, cols, 12, compiled=compiled)
    assert x.has_canonical_format and x.indices.dtype == np.int32 and x.data.dtype == np.float64
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    for i in range(len(lengths)):
        want = Counter(c for c in cols[bounds[i] : bounds[i + 1]].tolist() if c >= 0)
        row = x.indices[x.indptr[i] : x.indptr[i + 1]].tolist()
        assert row == sorted(want) and x.data[x.indptr[i] : x.indptr[i + 1]].tolist() == [
            want[c] for c in row
        ]


def test_tfidf_rows_equal_the_formula_and_threads_change_no_bit():
    from elmforest.cluster.icp_embed import _tfidf, bag_counts, project
    from elmforest.cluster.icp_pairs import sparse_pair_cosine

    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 40, 300)
    cols = rng.integers(0, 90, int(lengths.sum()))
    cols[:5] = [90, 91, 92, 93, 93]  # columns in one document only
    c = bag_counts(lengths, cols, 94).toarray()
    df = (c > 0).sum(0)
    want = np.where(c > 0, 1 + np.log(np.maximum(c, 1)), 0) * (np.log(301 / (1 + df)) + 1)
    want = want[:, df >= 2]  # min_df=2 drops the columns seen in one document
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    x = _tfidf(bag_counts(lengths, cols, 94), 2, None)
    assert (df < 2).any() and x.shape == want.shape
    np.testing.assert_allclose(x.toarray(), want, atol=1e-12)
    comps = np.linalg.qr(rng.normal(size=(x.shape[1], 8)))[0].T
    assert np.array_equal(project(x, comps, threads=1, block=64), project(x, comps, threads=2, block=64))
    a, b = rng.integers(0, 300, 500), rng.integers(0, 300, 500)
    one = sparse_pair_cosine(x, a, b, chunk=64, threads=1, compiled=False)
    assert np.array_equal(one, sparse_pair_cosine(x, a, b, chunk=64, threads=2, compiled=False))
    want = (x[a].toarray() * x[b].toarray()).sum(1)
    np.testing.assert_allclose(one, want, atol=1e-12)
    if icp_kernels.available():  # pairs in any order, grouped by a or not; a == b; empty rows
        for aa, bb in ((a, b), (np.sort(a), b), (a, a)):
            got = sparse_pair_cosine(x, aa, bb, compiled=True)
            np.testing.assert_allclose(got, (x[aa].toarray() * x[bb].toarray()).sum(1), atol=1e-12)


@pytest.mark.skipif(not icp_kernels.available(), reason="no numba")
def test_compiled_traversal_walks_beyond_the_start_nodes_as_python_does_and_checks_priority():
    """A walk may enter nodes outside `nodes` (the Python loop does): the compiled one must too, not
    write past its arrays; a priority that is not a permutation is refused, not read out of bounds."""
    src, dst, w = np.array([0, 1, 2]), np.array([1, 2, 3]), np.array([0.9, 0.8, 0.7])
    priority = np.arange(4)
    graph = undirected_graph(4, src, dst, w, np.ones(4, dtype=bool), priority)
    start_only = np.array([True, False, False, False])
    want = greedy_path(*graph, priority, start_only, compiled=False)
    got = greedy_path(*graph, priority, start_only, compiled=True)
    assert want[0].tolist() == [0, 1, 2, 3]
    assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))
    with pytest.raises(ValueError, match="permutation"):
        greedy_path(*graph, np.array([0, 1, 2, 7]), start_only, compiled=True)


@pytest.mark.skipif(not icp_kernels.available(), reason="no numba")
def test_compiled_pair_products_and_bags_equal_scipy_and_refuse_bad_input():
    """The compiled kernels against the scipy paths on rows that include empty ones (all terms under
    min_df), and their input checks: they index raw arrays, so bad ids must raise, not read garbage."""
    from elmforest.cluster.icp_embed import _tfidf, bag_counts
    from elmforest.cluster.icp_pairs import sparse_pair_cosine

    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 30, 200)
    cols = rng.integers(0, 60, int(lengths.sum()))
    cols[: lengths[0]] = 60 + np.arange(lengths[0])  # document 0: every term in it alone -> an empty row
    v = int(cols.max()) + 1
    want = bag_counts(lengths, cols, v, compiled=False)
    got = bag_counts(lengths, cols, v, compiled=True)
    assert all(np.array_equal(getattr(want, f), getattr(got, f)) for f in ("data", "indices", "indptr"))
    x = _tfidf(got, 2, None)
    assert x[0].nnz == 0
    a, b = rng.integers(0, 200, 3000), rng.integers(0, 200, 3000)
    a[:5] = 0
    ref = sparse_pair_cosine(x, a, b, compiled=False)
    np.testing.assert_allclose(sparse_pair_cosine(x, a, b, compiled=True), ref, rtol=0, atol=1e-15)
    with pytest.raises(IndexError):
        sparse_pair_cosine(x, np.array([-1]), np.array([0]), compiled=True)
    with pytest.raises(IndexError):
        sparse_pair_cosine(x, np.array([0]), np.array([200]), compiled=True)
    dup = x.copy()  # a row with a repeated column (not canonical): summed, as scipy does
    dup.indices[dup.indptr[1] + 1] = dup.indices[dup.indptr[1]]
    dup.has_canonical_format = False
    np.testing.assert_allclose(
        sparse_pair_cosine(dup, np.array([1]), np.array([1]), compiled=True),
        sparse_pair_cosine(dup, np.array([1]), np.array([1]), compiled=False),
        atol=1e-12,
    )
    with pytest.raises(ValueError, match="outside a vocabulary"):
        bag_counts(lengths, cols, v - 1, compiled=True)
    with pytest.raises(ValueError, match="sum to"):
        bag_counts(lengths + 1, cols, v, compiled=True)


def test_documents_sharing_a_header_longer_than_the_prefix_are_not_duplicates():
    """Documents whose first 512 tokens were equal (a long licence header) were dropped as "exact
    duplicates" whatever followed: 68 of 69 distinct documents of one domain."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    header = rng.integers(0, 300, size=600)
    bodies = [rng.integers(300 + 20 * i, 320 + 20 * i, size=600) for i in range(30)]  # words of its own
    docs = [np.concatenate([header, b]) for b in bodies]
    docs.append(docs[4].copy())  # an exact copy
    ends = np.cumsum([len(d) for d in docs])
    plan = icp_plan(TokenDocuments(np.concatenate(docs), ends, vocab_size=1000), k=5, seed=0)
    check_partition(plan, len(docs))
    assert list(zip(plan.dropped.tolist(), plan.dropped_partner.tolist(), strict=True)) == [(30, 4)]
    assert plan.stats["exact_duplicates"] == 1 and plan.stats["near_duplicates"] == 0


def test_a_document_read_whole_but_for_its_eos_is_not_cut():
    """The whole-document check applies to pairs where a document was cut to its prefix; a document of
    exactly max_tokens tokens and its trailing EOS was counted as cut, though the bag read all of it."""
    from elmforest.cluster.icp import truncated

    eos, n = 0, 8
    docs = [np.r_[np.arange(1, n + 1), eos], np.r_[np.arange(1, n + 2), eos], np.r_[eos, np.arange(1, n + 1)]]
    whole = TokenDocuments(np.concatenate(docs), np.cumsum([len(d) for d in docs]), 50, ignore=(eos,))
    assert truncated(whole, {"max_tokens": n}).tolist() == [False, True, True]  # brute force: what is past
    plain = TokenDocuments(whole.tokens, whole.ends, 50)  # nothing ignored: every token counts
    assert truncated(plain, {"max_tokens": n}).tolist() == [True, True, True]


@pytest.mark.parametrize("block", [1, 7, 1 << 22])  # one document per block, a few, all at once
def test_whole_document_keys_and_cuts_read_in_blocks_match_brute_force(monkeypatch, block):
    """Read a block of documents at a time (a domain of a billion ids as int64 at once was 8 GB, and
    its mask and sums as much again): the same keys and cuts as each document by hand."""
    import hashlib

    from elmforest.cluster import icp_embed
    from elmforest.cluster.icp import TokenDocuments, truncated
    from elmforest.cluster.icp_pairs import content_keys

    monkeypatch.setattr(icp_embed, "BLOCK_TOKENS", block)
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 12, 40)
    tokens = rng.integers(0, 6, int(lens.sum())).astype(np.uint16)
    ends = np.cumsum(lens)
    docs = TokenDocuments(tokens, ends, 6, ignore=(0, 5))
    starts = np.concatenate([[0], ends[:-1]])
    want_keys, want_cut = [], []
    for s, e in zip(starts, ends, strict=True):
        t = tokens[s:e].astype(np.int64)
        want_keys.append(hashlib.blake2b(t[(t != 0) & (t != 5)].tobytes(), digest_size=16).digest())
        want_cut.append(bool(((t[4:] != 0) & (t[4:] != 5)).any()))
    assert content_keys(docs) == want_keys
    assert truncated(docs, {"max_tokens": 4}).tolist() == want_cut


def test_words_a_document_holds_alone_count_in_the_duplicate_test():
    """The near-duplicate cosine was taken on the embedding's tf-idf, which leaves out words of one
    document (min_df=2): two sayings alike but for their own words scored 1.0 and one was dropped
    (all-terms tf-idf: 0.59 and 0.63). Reference: scikit-learn's tf-idf over every word."""
    pytest.importorskip("faiss")
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = [
        "Patience is the key to wisdom and a long happy life",
        "Silence is the fence around wisdom and a long happy life",
        "Rockets reach orbit after launch from the pad",
        "Rockets reach the moon after launch from Florida",
        "Courts hear appeals from lower courts",
    ]
    x = TfidfVectorizer(sublinear_tf=True).fit_transform(texts)
    assert (x[0] @ x[1].T).toarray()[0, 0] < 0.9 and (x[2] @ x[3].T).toarray()[0, 0] < 0.9
    plan = icp_plan(texts, seed=0, threads=1)
    check_partition(plan, len(texts))
    assert plan.dropped.tolist() == [] and plan.stats["near_duplicates"] == 0
    copied = [*texts, texts[1] + " "]  # a near copy (a space more) still goes
    plan = icp_plan(copied, seed=0, threads=1)
    assert plan.dropped.tolist() == [5] and plan.dropped_partner.tolist() == [1]


def test_exact_copies_of_a_document_with_nothing_to_embed_are_dropped():
    """Exact duplicates were looked for among embeddable documents only: two copies of a text of words
    no other document holds were both kept, each a segment of its own."""
    pytest.importorskip("faiss")
    texts = ["It is what it is.", "It is what it is.", "rockets reach orbit", "rockets reach the moon"]
    plan = icp_plan(texts, seed=0)
    check_partition(plan, len(texts))
    assert list(zip(plan.dropped.tolist(), plan.dropped_partner.tolist(), strict=True)) == [(1, 0)]
    assert plan.stats["exact_duplicates"] == 1 and plan.stats["unembedded"] == 1
    assert sorted(plan.order.tolist()) == [0, 2, 3]
