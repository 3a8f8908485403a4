import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DOMAIN_WORDS, assert_all_die, descendants, make_tiny_encoder
from scipy.optimize import linear_sum_assignment

from elmforest.cluster.assign import assign_corpus, fit_clusterer
from elmforest.cluster.clusterer import Clusterer, ClustererError
from elmforest.cluster.kmeans import assign_labels, balanced_assign, balanced_kmeans
from elmforest.cluster.router import IncrementalRouter
from elmforest.data.readers import ReadStats, iter_documents
from elmforest.data.shards import Shards
from elmforest.data.tokenizer import load_tokenizer
from elmforest.utils.errors import AlreadyExists, UserError


def test_balanced_assignment_is_optimal_and_respects_capacity():
    rng = np.random.default_rng(0)
    for n, k in [(12, 3), (30, 4), (17, 5)]:
        s = rng.normal(size=(n, k))
        cap = math.ceil(n / k)
        lab = balanced_assign(s, cap)
        assert np.bincount(lab, minlength=k).max() <= cap
        r, c = linear_sum_assignment(-np.repeat(s, cap, axis=1))  # brute force: one column per slot
        assert s[np.arange(n), lab].sum() == pytest.approx(
            np.repeat(s, cap, axis=1)[r, c].sum(), abs=n * 1e-3
        )


def _auction_as_first_written(scores, cap, prices):
    """The auction as first written: every bid re-sorts the cluster's members (found by scanning all N
    labels), O(N) per bid. The reference for the incremental bookkeeping that replaced it."""
    n, k = scores.shape
    eps = max(float(scores.max() - scores.min()), 1e-12) / (4.0 * n)
    price = prices - prices[np.isfinite(prices)].min()
    label, bid_of = np.full(n, -1), np.zeros(n)
    price[cap <= 0] = np.inf
    unassigned = np.arange(n)
    while unassigned.size:
        v = scores[unassigned] - price
        best = np.argmax(v, axis=1)
        v_best = v[np.arange(len(unassigned)), best]
        v[np.arange(len(unassigned)), best] = -np.inf
        v_second = v.max(axis=1) if k > 1 else v_best
        bids = price[best] + (v_best - np.where(np.isfinite(v_second), v_second, v_best)) + eps
        evicted = []
        for j in np.unique(best):
            newcomers, members = unassigned[best == j], np.flatnonzero(label == j)
            cand = np.concatenate([members, newcomers])
            amounts = np.concatenate([bid_of[members], bids[best == j]])
            keep, drop = cand, cand[:0]
            if len(cand) > cap[j]:
                order = np.argsort(-amounts, kind="stable")
                keep, drop = cand[order[: cap[j]]], cand[order[cap[j] :]]
                price[j] = amounts[order[cap[j] - 1]]
            label[keep], bid_of[newcomers], label[drop] = j, bids[best == j], -1
            evicted.append(drop)
        unassigned = np.concatenate(evicted)
    return label, price


def test_equal_bids_over_several_rounds_are_kept_by_index_as_the_first_version_keeps_them():
    """Rows that bid exactly alike for one cluster, round after round: which of them keeps a place is
    the order of ties (members by index, before newcomers), kept across the rounds."""
    s = np.zeros((6, 2))
    s[:, 0] = 1.0
    one_in_a_tie = np.array([[1, 0, 1], [1, 1, 0], [1, 1, 0], [1, 1, 0], [0, 1, 0], [1, 1, 0]], dtype=float)
    for scores, cap in [(s, [3, 3]), (s, [2, 4]), (s, [4, 2]), (one_in_a_tie, [2, 2, 2])]:
        k = scores.shape[1]
        prices, want_prices = np.zeros(k), np.zeros(k)
        got = balanced_assign(scores, np.array(cap), prices=prices)
        want, want_prices = _auction_as_first_written(scores, np.array(cap), want_prices)
        assert got.tolist() == want.tolist() and prices.tolist() == pytest.approx(want_prices.tolist())


@pytest.mark.parametrize("seed", range(6))
def test_the_auction_gives_the_labels_and_prices_of_its_first_version(seed):
    """Members kept sorted per cluster (only the lowest can be outbid) must change the cost, not one
    label: ties included (integer scores, duplicated rows), unequal and zero capacities, warm prices."""
    rng = np.random.default_rng(seed)
    for trial in range(40):
        n, k = int(rng.integers(1, 60)), int(rng.integers(1, 7))
        s = rng.integers(-3, 4, size=(n, k)).astype(float) if trial % 2 else rng.normal(size=(n, k))
        if trial % 3 == 0:
            s[n // 2 :] = s[: n - n // 2]  # duplicated documents bid exactly alike
        cap = rng.integers(0, n + 1, size=k)
        cap[rng.integers(k)] += max(n - cap.sum(), 0)
        warm = rng.uniform(0, 2, size=k) if trial % 4 == 1 else np.zeros(k)
        got_prices = warm.copy()
        got = balanced_assign(s, cap, prices=got_prices)
        want, want_prices = _auction_as_first_written(s, cap, warm.copy())
        assert got.tolist() == want.tolist(), (seed, trial)
        fin = np.isfinite(want_prices)
        assert np.isfinite(got_prices).tolist() == fin.tolist()
        assert got_prices[fin] == pytest.approx(want_prices[fin], abs=1e-12)


def test_balanced_kmeans_caps_every_cluster():
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [rng.normal(0, 0.1, (70, 5)), rng.normal(3, 0.1, (20, 5)), rng.normal(-3, 0.1, (10, 5))]
    )
    _, labels, info = balanced_kmeans(x, 4, seed=0)
    sizes = np.bincount(labels, minlength=4)
    assert (sizes == 25).all() and info["sizes"] == sizes.tolist()  # N a multiple of K: exactly equal
    _, labels, _ = balanced_kmeans(x[:97], 4, seed=0)
    assert np.bincount(labels, minlength=4).max() <= 25 and len(labels) == 97  # otherwise at most ceil(N/K)


def test_warm_started_auction_stays_near_optimal():
    rng = np.random.default_rng(3)
    for _ in range(50):
        s = rng.normal(size=(12, 4))
        prices = rng.uniform(0, 2, size=4)
        lab = balanced_assign(s, 3, prices=prices)
        r, c = linear_sum_assignment(-np.repeat(s, 3, axis=1))
        assert s[np.arange(12), lab].sum() >= np.repeat(s, 3, axis=1)[r, c].sum() - 12 * 0.1


def test_unvectorised_documents_go_where_there_is_most_room():
    """One rule for `Clusterer.assign` and `cluster assign`: documents without a vector fill the most
    room left under the capacities, or else the smallest cluster, counting earlier chunks' sizes."""
    s = np.array([[0.0, -1, -2], [0, -1, -2], [0, -1, -2], [0, 0, 0], [0, 0, 0]])
    ok = np.array([True, True, True, False, False])
    labels = assign_labels(s, ok, sizes=np.array([0, 0, 5]))
    assert labels.tolist() == [0, 0, 0, 1, 1]  # cluster 2 already holds 5 from earlier chunks
    labels = assign_labels(s, ok, np.array([2, 2, 2]))
    assert np.bincount(labels[ok], minlength=3).tolist() == [2, 1, 0]
    assert labels[~ok].tolist() == [2, 1]  # the most room first
    assert assign_labels(s, ok, 2).tolist() == labels.tolist()  # a scalar capacity is every cluster's


def test_clusters_find_the_domains_and_fit_is_balanced(clusterer_dir, corpus, tmp_path):
    c = Clusterer.load(clusterer_dir)
    sizes = c.meta["fit"]["sizes"]
    assert max(sizes) <= math.ceil(sum(sizes) / 3)  # the balanced fit's capacity
    rep = assign_corpus(clusterer_dir, corpus, tmp_path / "out", progress=False, workers=2)
    n_docs = sum(1 for _ in iter_documents(corpus))
    assert rep["documents"] == n_docs == sum(rep["sizes"])
    assert rep["nmi"] > 0.9  # three very different synthetic domains
    stats = ReadStats()
    written = sum(1 for _ in iter_documents(tmp_path / "out", stats))
    assert written == n_docs  # nothing dropped
    assert not stats.skipped  # ... and its report is not read as (bad) data by `shards build`
    assert json.loads((tmp_path / "out" / "report.meta.json").read_text()) == rep
    rec = json.loads((tmp_path / "out" / "cluster0.jsonl").read_text().splitlines()[0])
    assert rec["domain"] == "cluster0" and rec["source_domain"] in DOMAIN_WORDS


def _consistent(out: Path) -> dict:
    """The report of an assign output describes exactly the cluster files beside it."""
    rep = json.loads((out / "report.meta.json").read_text())
    files = {p.name: sum(1 for _ in open(p, encoding="utf-8")) for p in out.glob("cluster*.jsonl")}
    assert files == {f"cluster{j}.jsonl": n for j, n in enumerate(rep["sizes"]) if n}
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, "report.meta.json"])
    return rep


# documents trickle in (in the parent) so the run can be killed with its workers busy
_SLOW_ASSIGN = """
import sys, time
import elmforest.cluster.assign as a
real = a.iter_documents
def slow(data, stats=None):
    for d in real(data, stats):
        time.sleep(0.02)
        yield d
a.iter_documents = slow
a.assign_corpus(sys.argv[1], sys.argv[2], sys.argv[3], workers=2, chunk_docs=4, progress=False)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")
def test_a_killed_assign_keeps_the_previous_output_and_leaves_no_worker(clusterer_dir, corpus, tmp_path):
    out = tmp_path / "out"
    assign_corpus(clusterer_dir, corpus, out, progress=False, workers=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _consistent(out)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_ASSIGN, str(clusterer_dir), str(corpus), str(out)])
    workers: set[int] = set()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None and len(workers) < 2:
            time.sleep(0.05)
            workers = descendants(proc.pid)
        assert proc.poll() is None and len(workers) >= 2, "the run ended before it could be killed"
        time.sleep(1.0)  # well into the run: documents written, workers embedding
        workers = descendants(proc.pid)
        staging = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    finally:
        proc.kill()
        proc.wait()
    assert_all_die(workers)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old output, whole
    assert staging  # the killed run was writing beside it
    # the next run cleans up what the killed one left beside `out` and replaces the output whole
    rep = assign_corpus(clusterer_dir, corpus, out, progress=False, workers=1)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert _consistent(out) == rep


def test_assign_refuses_an_output_folder_it_did_not_write(clusterer_dir, corpus, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(AlreadyExists, match="mine"):
        assign_corpus(clusterer_dir, corpus, out, progress=False, workers=1)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(AlreadyExists, match="file"):
        assign_corpus(clusterer_dir, corpus, tmp_path / "file", progress=False, workers=1)
    # an empty folder, and an earlier output (also from before the report was renamed), are fine
    (tmp_path / "empty").mkdir()
    assign_corpus(clusterer_dir, corpus, tmp_path / "empty", progress=False, workers=1)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "cluster0.jsonl").write_text("{}\n")
    (legacy / "report.json").write_text(json.dumps({"k": 3, "sizes": [1, 0, 0], "documents": 1}))
    assign_corpus(clusterer_dir, corpus, legacy, progress=False, workers=1)
    _consistent(legacy)


def test_unvectorisable_documents_are_counted_not_dropped(clusterer_dir, tmp_path):
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(9):
            text = "the and of" if i % 3 == 0 else "license software warranty copyright"
            f.write(json.dumps({"id": str(i), "text": text}) + "\n")
    rep = assign_corpus(
        clusterer_dir, tmp_path / "d.jsonl", tmp_path / "out", balanced=True, progress=False, workers=1
    )
    assert rep["not_vectorised"] == 3 and rep["documents"] == 9
    assert max(rep["sizes"]) <= 3  # balanced: ceil(9 / 3)


def test_save_load_round_trip_gives_identical_assignments_in_a_fresh_process(clusterer_dir, corpus, tmp_path):
    texts = [d.text for d in iter_documents(corpus)][:60]
    c = Clusterer.load(clusterer_dir)
    labels, _ = c.assign(texts)
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    code = (
        "import json,sys; from elmforest.cluster.clusterer import Clusterer; "
        "c=Clusterer.load(sys.argv[1]); t=json.load(open(sys.argv[2])); "
        "z,_=c.embed(t); print(json.dumps([c.assign(t)[0].tolist(), z.tolist()]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(clusterer_dir), str(tmp_path / "texts.json")],
        capture_output=True,
        text=True,
        check=True,
    )
    other_labels, other_z = json.loads(out.stdout)
    assert other_labels == labels.tolist()
    assert np.array_equal(np.array(other_z), c.embed(texts)[0])


def test_corrupted_or_mismatched_clusterer_files_are_refused(clusterer_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(clusterer_dir, bad)
    data = bytearray((bad / "arrays.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (bad / "arrays.safetensors").write_bytes(bytes(data))
    with pytest.raises(ClustererError, match="checksum"):
        Clusterer.load(bad)
    shutil.copy(clusterer_dir / "arrays.safetensors", bad / "arrays.safetensors")
    info = json.loads((bad / "clusterer.json").read_text())
    (bad / "clusterer.json").write_text(json.dumps({**info, "version": 99}))
    with pytest.raises(ClustererError, match="unsupported"):
        Clusterer.load(bad)
    (bad / "clusterer.json").write_text(json.dumps({**info, "vocabulary": info["vocabulary"][:-1]}))
    with pytest.raises(ClustererError, match="checksum"):  # the vocabulary is covered by the checksum
        Clusterer.load(bad)
    # a v1 file (its checksum covered the arrays only) still loads and assigns the same
    import hashlib

    v1 = {**info, "version": 1}
    v1["arrays"] = {
        **info["arrays"],
        "sha256": hashlib.sha256((bad / "arrays.safetensors").read_bytes()).hexdigest(),
    }
    (bad / "clusterer.json").write_text(json.dumps(v1))
    texts = ["thou shalt not", "def return self", "license warranty"]
    assert (
        Clusterer.load(bad).assign(texts)[0].tolist()
        == Clusterer.load(clusterer_dir).assign(texts)[0].tolist()
    )
    (bad / "clusterer.json").write_text("{not json")
    with pytest.raises(ClustererError, match="corrupted"):
        Clusterer.load(bad)
    with pytest.raises(ClustererError, match="not a clusterer"):
        Clusterer.load(tmp_path)
    assert not list(clusterer_dir.glob("*.pkl"))


def test_incremental_routing_equals_routing_from_scratch_on_every_prefix(clusterer_dir, tokenizer_dir):
    c = Clusterer.load(clusterer_dir)
    tok = load_tokenizer(tokenizer_dir)
    text = "the lord said unto moses — café naïve ✓ def return self\nlicense 42 warranty thou shalt"
    ids = tok.encode_batch([text])[0]
    router = IncrementalRouter(c, tok.token_bytes, tok.eos_id)
    for t in range(len(ids) + 1):
        if t:
            router.push_token(ids[t - 1])
        h, ok = router.embedding()
        z, ok_ref = c.embed([tok.decode(ids[:t])])
        assert ok == bool(ok_ref[0]), t
        assert np.allclose(h, z[0], rtol=0, atol=1e-7), t  # float64, summed in another order
    router.push_token(tok.eos_id)  # a new document starts from an empty context
    assert router.embedding()[1] is False


def test_byte_table_is_gpt2s_and_spells_every_token(tokenizer_dir):
    """The byte <-> character table comes from transformers now; it must be GPT-2's, as written before."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    rest = [b for b in range(256) if b not in printable]
    want = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(rest)}
    assert bytes_to_unicode() == want
    tok = load_tokenizer(tokenizer_dir)
    text = "the lord — café naïve ✓\nlicense 42"
    table = tok.token_bytes
    assert b"".join(table[t] for t in tok.encode_batch([text])[0]) == text.encode("utf-8")


def test_route_top_k_and_temperature(clusterer_dir):
    c = Clusterer.load(clusterer_dir)
    z = c.embed(["license software warranty", "def return self import"])[0]
    full = c.route(z, None, 0.1)
    want = np.exp(c.scores(z) / 0.1)
    assert np.allclose(full, want / want.sum(1, keepdims=True))
    top1 = c.route(z, 1, 0.1)
    assert ((top1 > 0).sum(1) == 1).all() and np.allclose(top1.sum(1), 1)
    masked = c.route(z, 1, 0.1, allowed=np.array([True, False, True]))
    assert (masked[:, 1] == 0).all()


def test_cluster_routing_with_all_experts_equals_the_dense_mixture(cluster_forest, shards_dir):
    from elmforest.eval.bpb import window_batch
    from elmforest.forest.evaluate import evaluate_forest_shards
    from elmforest.forest.manifest import Forest
    from elmforest.model.build import load_model

    f, sh = Forest.load(cluster_forest), Shards(shards_dir)
    c = Clusterer.load(cluster_forest / "clusterer")
    tok = load_tokenizer(shards_dir)
    d = sh.domains[0]
    run = {
        "mode": "cluster",
        "domains": [d],
        "seq_len": 32,
        "batch_size": 4,
        "device": "cpu",
        "precision": "fp32",
    }
    stream = sh.tokens(d, "test")
    models = [load_model(x).eval() for x in f.expert_dirs()]
    ends = set(np.flatnonzero(np.asarray(stream) == sh.eos_id).tolist())

    def routing(pos: int, context: str) -> tuple[np.ndarray, bool]:
        """The weights c-BTM gives at stream position `pos`: its document's text before it (in its own
        window of 32 tokens with context="window"), re-vectorised; and whether they are the size prior (no
        known word yet)."""
        doc_start = max([e + 1 for e in ends if e < pos], default=0)
        if context == "window":
            doc_start = max(doc_start, pos - pos % 32)
        z, ok = c.embed([tok.decode(stream[doc_start:pos].tolist())])
        if ok[0]:
            return c.route(z, None, 0.5)[0], False
        sizes = np.asarray(c.meta["fit"]["sizes"], float)
        return sizes / sizes.sum(), True

    def point_of(pos: int, start: int, reset: str, seg: int, reroute: bool, context: str) -> int:
        """The routing point position `pos` follows: the latest of its window's start, the window's
        regular points (every seg tokens), and (reset="document") its document's first token and (with
        reroute) the points 1, 2, 4, ... (< seg) tokens into that document (with context="window": into
        its text in this window), all within its window."""
        cands = [start + j for j in range(0, pos - start + 1, seg)]
        if reset == "document":
            d0 = max([e + 1 for e in ends if e < pos], default=0)
            offs = [2**i for i in range(8) if 2**i < seg] if reroute else []
            cands += [q for q in [d0] if start <= q <= pos]
            d0 = max(d0, start) if context == "window" else d0
            cands += [q for q in [d0 + o for o in offs] if start <= q <= pos]
        return max(cands)

    def brute(
        reset: str, seg: int = 32, reroute: bool = True, context: str = "window", k: int = 3
    ) -> tuple[float, float]:
        nll, fell_back, scored = 0.0, 0, 0
        for w in range(math.ceil(len(stream) / 32)):
            start = w * 32
            x, y = window_batch(stream, sh.eos_id, 32, [w])
            with torch.no_grad():
                lps = [torch.log_softmax(m(input_ids=x).logits[0].double(), -1) for m in models]
            for t in range(32):
                if y[0, t] < 0:
                    continue
                weights, fb = routing(point_of(start + t, start, reset, seg, reroute, context), context)
                if k == 1:  # the nearest centre (or the largest cluster) alone
                    weights = np.eye(3)[np.argmax(weights)]
                fell_back, scored = fell_back + fb, scored + 1
                nll -= math.log(sum(weights[j] * math.exp(float(lps[j][t, y[0, t]])) for j in range(3)))
        return nll, fell_back / scored

    # routed only at the grid (reset="window"), the window's own text is empty at every point: refused
    with pytest.raises(UserError, match="--router-context document"):
        evaluate_forest_shards(f, sh, k=3, temperature=0.5, reset="window", **run)
    doc_ctx = {"router_context": "document"}
    res = evaluate_forest_shards(f, sh, k=3, temperature=0.5, reset="window", **doc_ctx, **run)
    want, want_fb = brute("window", context="document")
    assert res["domains"][d]["nll_nats"] == pytest.approx(want, rel=1e-6)
    assert res["domains"][d]["fallback_share"] == pytest.approx(want_fb, abs=1e-12)
    doc = evaluate_forest_shards(f, sh, k=3, temperature=0.5, **run)  # reset="document", the default
    assert doc["reset"] == "document"
    want, want_fb = brute("document")
    assert doc["domains"][d]["nll_nats"] == pytest.approx(want, rel=1e-6)
    assert doc["domains"][d]["fallback_share"] == pytest.approx(want_fb, abs=1e-12)
    assert 0 < want_fb < 0.5  # only a document's first tokens fall back
    assert doc["domains"][d]["nll_nats"] != pytest.approx(res["domains"][d]["nll_nats"], rel=1e-6)
    # c-BTM's own routing points: a document's first token and the grid, no re-routing into it
    once = evaluate_forest_shards(f, sh, k=3, temperature=0.5, reroute=False, **doc_ctx, **run)
    want, want_fb_once = brute("document", reroute=False, context="document")
    assert once["reroute"] is False and doc["reroute"] is True and res["reroute"] is None
    assert once["domains"][d]["nll_nats"] == pytest.approx(want, rel=1e-6)
    assert once["domains"][d]["fallback_share"] == pytest.approx(want_fb_once, abs=1e-12)
    assert want_fb_once > want_fb
    # the router reading the document's text before the window too (more than any model scored sees)
    whole = evaluate_forest_shards(f, sh, k=3, temperature=0.5, router_context="document", **run)
    want, want_fb_whole = brute("document", context="document")
    assert whole["router_context"] == "document" and doc["router_context"] == "window"
    assert whole["domains"][d]["nll_nats"] == pytest.approx(want, rel=1e-6)
    assert whole["domains"][d]["fallback_share"] == pytest.approx(want_fb_whole, abs=1e-12)
    assert whole["domains"][d]["nll_nats"] != pytest.approx(doc["domains"][d]["nll_nats"], rel=1e-6)
    seg5 = evaluate_forest_shards(f, sh, k=3, temperature=0.5, route="segment:5", **run)
    want, want_fb = brute("document", 5)  # offsets run across segment boundaries
    assert seg5["domains"][d]["nll_nats"] == pytest.approx(want, rel=1e-6)
    assert seg5["domains"][d]["fallback_share"] == pytest.approx(want_fb, abs=1e-12)
    top1 = evaluate_forest_shards(f, sh, k=1, reset="window", **doc_ctx, **run)
    with pytest.raises(UserError, match="k must be at least 1"):  # no cluster routed to: NaN weights
        evaluate_forest_shards(f, sh, k=0, **run)
    assert top1["compute"]["fraction_of_full"] <= 1 / 3 + 1e-9
    # restarted at documents, a window holding two documents may run one expert for each of them
    # (and a window opening inside a document starts with an empty context: the largest cluster's expert
    # runs on it too). Each expert some position of a window is routed to runs on the window's tokens up
    # to the last such position (the models are causal), rounded up to a power of two.
    top1_doc = evaluate_forest_shards(f, sh, k=1, **run)
    want, _ = brute("document", k=1)
    assert top1_doc["domains"][d]["nll_nats"] == pytest.approx(want, rel=1e-6)
    runs, whole_runs, windows = 0, 0, math.ceil(len(stream) / 32)
    for w in range(windows):
        scored = min(32, len(stream) - w * 32)  # window w predicts stream[32w : 32w + 32]
        last = {}
        for t in range(scored):
            weights, _ = routing(point_of(w * 32 + t, w * 32, "document", 32, True, "window"), "window")
            last[int(np.argmax(weights))] = t
        runs += sum(min(scored, 2 ** math.ceil(math.log2(t + 1))) for t in last.values())
        whole_runs += len(last)
    full = 3 * len(stream)
    assert top1_doc["compute"]["fraction_of_full"] == pytest.approx(runs / full, rel=1e-9)
    assert 1 / 3 < top1_doc["compute"]["fraction_of_full"] < whole_runs / (3 * windows) - 0.01
    # segment routing: W = the window is sequence routing; a shorter W re-routes inside windows
    seg32 = evaluate_forest_shards(
        f, sh, k=3, temperature=0.5, route="segment:32", reset="window", **doc_ctx, **run
    )
    assert seg32["domains"][d]["nll_nats"] == pytest.approx(res["domains"][d]["nll_nats"], rel=1e-6)


def test_no_expert_runs_over_the_last_windows_padding(cluster_forest, shards_dir, monkeypatch):
    """The last window of a stream is partly padding: its experts run over its real tokens (rounded up to
    a power of two), not the whole window, and the NLL is what whole-window runs give."""
    from elmforest.forest import cluster_route
    from elmforest.forest.cluster_route import ClusterContext
    from elmforest.forest.manifest import Forest
    from elmforest.forest.pool import ExpertPool, make_pool

    f, sh = Forest.load(cluster_forest), Shards(shards_dir)
    stream = np.asarray(sh.tokens(sh.domains[0], "test")[: 2 * 32 + 5])  # 2 whole windows and 5 tokens
    ctx = ClusterContext(f, f.names, sh, 2, 0.5, "sequence", 32)
    pool = make_pool(f, precision="fp32")
    ran, logprobs = [], ExpertPool.logprobs

    def spy(self, j, stream, eos_id, seq_len, window_ids, upto=None, key=None):
        ran.append((list(window_ids), upto or seq_len, j))
        return logprobs(self, j, stream, eos_id, seq_len, window_ids, upto, key)

    monkeypatch.setattr(ExpertPool, "logprobs", spy)
    nll, _, experts_run, _ = ctx.nll(pool, stream, 3)
    assert ran and max(u for wins, u, _ in ran if 2 in wins) == 8  # 5 real tokens -> a run of 8
    assert sorted(experts_run) == sorted({j for _, _, j in ran})  # the experts run: those that ran
    some = []  # top-1: the experts run per domain are those that ran, fewer than all somewhere
    for d in sh.domains:
        ran.clear()
        one = ClusterContext(f, f.names, sh, 1, 0.5, "sequence", 32)
        got = one.nll(pool, np.asarray(sh.tokens(d, "test")[: 2 * 32 + 5]), 3)[2]
        assert sorted(got) == sorted({j for _, _, j in ran}), d
        some.append(len(got) < len(f.names))
    assert any(some)
    assert list(cluster_route.prefix_runs(np.zeros((0, 32, 3), bool))) == []  # no window: no run
    # every needed expert over whole windows: the same NLL
    monkeypatch.setattr(
        cluster_route,
        "prefix_runs",
        lambda routed: (
            (i, np.flatnonzero(routed[:, :, i].any(1)), 32)
            for i in range(routed.shape[2])
            if routed[:, :, i].any()
        ),
    )
    assert ctx.nll(pool, stream, 3)[0] == pytest.approx(nll, rel=1e-6)


def test_a_tie_of_the_fitted_sizes_is_said_where_it_picks_the_first_clusters(
    cluster_forest, tokenizer_dir, monkeypatch, capsys
):
    """A document-balanced fit makes every size equal: a context with no known word went to the first k
    clusters by number, a choice nothing said."""
    from elmforest.cluster.clusterer import Clusterer
    from elmforest.forest.cluster_route import ClusterContext, ClusterRouting
    from elmforest.forest.manifest import Forest

    f = Forest.load(cluster_forest)
    load, fitted = Clusterer.load, []

    def with_sizes(path, *a, **kw):
        c = load(path, *a, **kw)
        c.meta["fit"]["sizes"] = fitted[-1]
        return c

    monkeypatch.setattr(Clusterer, "load", staticmethod(with_sizes))
    fitted.append([3, 9, 5])
    ClusterRouting(f, f.names, k=1, temperature=0.1)
    assert "tie" not in capsys.readouterr().err  # unequal: the largest, nothing to say
    fitted.append([7, 7, 7])  # a document-balanced fit
    r = ClusterRouting(f, [f.names[1], f.names[2]], k=1, temperature=0.1)
    assert "the tie is broken by number: cluster1" in capsys.readouterr().err
    tok = load_tokenizer(tokenizer_dir)  # a ForestLM's evaluation context takes its routing: said once
    ClusterContext(f, [f.names[1], f.names[2]], None, 1, 0.1, "sequence", 16, tok=tok, routing=r)
    assert "tie" not in capsys.readouterr().err
    assert r.expert_weights(np.zeros((1, r.clusterer.dims)), np.array([False]))[0].tolist() == [1.0, 0.0]
    ClusterRouting(f, f.names, k=None, temperature=0.1)  # every cluster: nothing is picked
    assert "tie" not in capsys.readouterr().err


def test_cluster_routing_maps_clusters_to_experts_and_falls_back_on_sizes(
    cluster_forest, forest_dir, tokenizer_dir, tmp_path
):
    """Evaluation and generation share this: cluster -> expert map, top-k, and the size prior."""
    from elmforest.forest.cluster_route import ClusterRouting
    from elmforest.forest.manifest import Forest

    f = Forest.load(cluster_forest)
    r = ClusterRouting(f, [f.names[0], f.names[2]], k=1, temperature=0.1)  # cluster1 has no expert
    assert r.expert_of == {0: 0, 2: 1} and r.allowed.tolist() == [True, False, True]
    tok = load_tokenizer(tokenizer_dir)
    router = r.incremental_router(tok)
    sizes = np.asarray(r.clusterer.meta["fit"]["sizes"], float)[[0, 2]]
    want = np.zeros(2)
    want[int(np.argmax(sizes))] = 1.0  # no word yet: the largest cluster with an expert
    assert r.context_weights(router).tolist() == want.tolist()
    text = "license software warranty"
    for t in tok.encode_batch([text])[0]:
        router.push_token(t)
    z, ok = r.clusterer.embed([text])
    assert np.allclose(r.context_weights(router), r.expert_weights(z, ok)[0], atol=1e-12)
    assert (r.context_weights(router) > 0).sum() == 1
    every = ClusterRouting(f, [f.names[0], f.names[2]], k=None, temperature=0.1)  # k None: every cluster
    z[:] = 0
    assert np.allclose(every.expert_weights(z, np.array([False]))[0], sizes / sizes.sum())
    with pytest.raises(UserError, match="no clusterer"):
        ClusterRouting(Forest.load(forest_dir), Forest.load(forest_dir).names, 1, 0.1)
    g = Forest.init(tmp_path / "g")
    g.set_clusterer(cluster_forest / "clusterer")
    g.add(f.expert_dir(f.names[0]), "plain", ["code"])
    with pytest.raises(UserError, match="no expert is trained on a cluster"):
        ClusterRouting(Forest.load(tmp_path / "g"), ["plain"], 1, 0.1)


def test_cbtm_generation_routes_to_top_k(cluster_forest):
    from elmforest.forest.generate import generate

    g = generate(
        cluster_forest, "license software", max_new_tokens=6, temperature=0, cluster_k=1, device="cpu"
    )
    assert all(sum(v > 0 for v in w.values()) == 1 for w in g.weights)
    assert all(sum(w.values()) == pytest.approx(1.0) for w in g.weights)


def test_embedding_model_clusterer_round_trip_and_routing(corpus, tokenizer_dir, tmp_path):
    """A local sentence encoder instead of tf-idf (here a tiny random BERT; `minilm` in real use)."""
    from elmforest.cluster.router import route_stream

    tok = load_tokenizer(tokenizer_dir)
    enc_dir = make_tiny_encoder(tokenizer_dir, tmp_path / "encoder")
    c = fit_clusterer(corpus, 3, tmp_path / "c", sample_docs=300, embeddings=str(enc_dir))
    assert c.dims == 32 and max(c.meta["fit"]["sizes"]) - min(c.meta["fit"]["sizes"]) <= 1
    texts = [d.text for d in iter_documents(corpus)][:20]
    again = Clusterer.load(tmp_path / "c")
    assert np.array_equal(again.assign(texts)[0], c.assign(texts)[0])
    # routing re-embeds the document context from scratch (no incremental tf-idf for encoders)
    ids = np.array(
        tok.encode_batch(["license software warranty"])[0] + [tok.eos_id] + tok.encode_batch(["def x"])[0]
    )
    router = IncrementalRouter(again, tok.token_bytes, tok.eos_id)
    z, ok = route_stream(router, ids, np.array([2, len(ids) - 1]))
    want, _ = again.embed(
        [tok.decode(ids[:2].tolist()), tok.decode(ids[len(ids) - 3 : len(ids) - 1].tolist())]
    )
    assert np.allclose(z, want, atol=1e-6) and ok.all()
    # generation and lm-eval/server scoring push tokens one at a time: the same embedding of the context
    router.reset()
    for t in ids[: len(ids) - 1].tolist():
        router.push_token(t)
    h, h_ok = router.embedding()
    assert h_ok and np.allclose(h, want[1], atol=1e-6)
    # past the encoder's 256 tokens a routing context keeps its end: the weights go on following it
    long = np.array(tok.encode_batch([" ".join(texts) * 3])[0][:1200])
    z, ok = route_stream(router, long, np.array([600, 1199]))
    assert ok.all() and not np.allclose(z[0], z[1], atol=1e-4)
    want, _ = again.embed([tok.decode(long[:1199].tolist())], recent=True)
    assert np.allclose(z[1], want[0], atol=1e-6)
    # other weights under the same config and vocabulary embed differently: refused
    from transformers import BertConfig, BertModel

    meta = tmp_path / "c" / "clusterer.json"
    info = json.loads(meta.read_text())
    full = info["embedder"]["fingerprint"]
    info["embedder"]["fingerprint"] = again.embedder.fingerprint(weights=False)  # as fitted before: 16
    meta.write_text(json.dumps(info))
    assert len(full) == 32 and Clusterer.load(tmp_path / "c").embedder.fingerprint() == full
    info["embedder"]["fingerprint"] = full
    meta.write_text(json.dumps(info))
    torch.manual_seed(1)
    BertModel(BertConfig.from_pretrained(enc_dir)).save_pretrained(enc_dir)
    with pytest.raises(ClustererError, match="not the embedding model"):
        Clusterer.load(tmp_path / "c")
    (enc_dir / "config.json").write_text(
        (enc_dir / "config.json").read_text().replace('"hidden_act"', '"x": 1, "hidden_act"')
    )
    with pytest.raises(ClustererError, match="not the embedding model"):
        Clusterer.load(tmp_path / "c")


def test_tfidf_transform_matches_sklearn_tfidf_vectorizer(corpus):
    """The clusterer's own transform (sublinear tf 1 + ln tf, its stored idf, L2 rows) equals sklearn's
    TfidfVectorizer configured the same way with its built-in analyzer (lower-case, words of 2+ word
    characters, English stop words; a preprocessor maps words starting with a digit to the number term)."""
    import re
    from collections import Counter

    from sklearn.feature_extraction.text import TfidfVectorizer

    from elmforest.cluster.clusterer import NUMBER, analyze

    def numbers(text: str) -> str:
        return re.sub(r"\w+", lambda m: NUMBER if m.group()[0].isdigit() else m.group(), text.lower())

    docs = [d.text for d in iter_documents(corpus)]
    fit = docs[::4] + [f"In 19{i} the LORD's 2nd King said: x y Thou SHALT 7 times" for i in range(5)]
    probe = [
        *docs[1:40:4],  # documents the fit never saw
        "The Lord SAID unto Moses, unto MOSES: 42 and 4x2 and 7",  # tf > 1, case, numbers
        "def def def return return lambda yield king",
        "zzz qqq the and of",  # no known word: a zero row
        "",
    ]
    c = Clusterer.fit(fit, 3, dims=8, min_df=2)
    kw = {"preprocessor": numbers, "stop_words": "english", "sublinear_tf": True, "min_df": 2}
    ref = TfidfVectorizer(norm=None, dtype=np.float64, **kw).fit(fit)
    assert ref.get_feature_names_out().tolist() == c.terms and NUMBER in c.terms and "king" in c.terms
    np.testing.assert_allclose(c.idf, ref.idf_, rtol=1e-12)
    raw = ref.transform(probe).toarray()  # [N, V] unnormalised tf-idf
    unit = TfidfVectorizer(norm="l2", dtype=np.float64, **kw).fit(fit).transform(probe).toarray()

    # the whole tf-idf matrix: a clusterer whose projection is the identity embeds texts as their rows
    v = len(c.terms)
    ident = Clusterer(c.terms, c.idf, np.eye(v), np.zeros((1, v)))
    z, ok = ident.embed(probe)
    np.testing.assert_allclose(z, unit, rtol=1e-9, atol=1e-12)
    assert ok.tolist() == (np.abs(raw).sum(1) > 0).tolist() and ok.sum() == len(probe) - 2
    for text, row in zip(probe, raw, strict=True):
        np.testing.assert_allclose(ident.counts_vector(Counter(analyze(text))), row, rtol=1e-9, atol=1e-12)
    col = {t: i for i, t in enumerate(c.terms)}
    for term, tf in (("def", 3), ("return", 2), ("king", 1)):  # sublinear tf, by hand
        assert raw[len(probe) - 3, col[term]] == pytest.approx(
            (1 + math.log(tf)) * c.idf[col[term]], rel=1e-12
        )
    # and the real clusterer: sklearn's tf-idf rows, projected on its SVD components, L2-normalised
    proj = raw @ c.components.T
    norm = np.linalg.norm(proj, axis=1, keepdims=True)
    zc, okc = c.embed(probe)
    np.testing.assert_allclose(zc[okc], (proj / np.where(norm > 0, norm, 1))[okc], rtol=1e-9, atol=1e-12)
    assert okc.tolist() == ok.tolist()


def test_a_refit_killed_between_its_two_files_leaves_the_old_clusterer_whole(
    clusterer_dir, tmp_path, monkeypatch
):
    import shutil

    from elmforest.cluster import clusterer as mod

    folder = tmp_path / "c"
    shutil.copytree(clusterer_dir, folder)
    old = Clusterer.load(folder)
    new = Clusterer.load(folder)
    new.centres = new.centres[::-1].copy()  # another fit: its clusters in the other order

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(mod, "write_json_atomic", killed)
        with pytest.raises(KeyboardInterrupt):
            new.save(folder)
    assert np.array_equal(Clusterer.load(folder).centres, old.centres)  # not a checksum mismatch
    for _ in range(2):  # each refit swaps the arrays' name, and leaves one arrays file
        new.save(folder)
        assert np.array_equal(Clusterer.load(folder).centres, new.centres)
        assert len(list(folder.glob("arrays*.safetensors"))) == 1


def test_top_k_below_1_and_a_balanced_assignment_of_nothing_are_refused(clusterer_dir, tmp_path, capsys):
    """k = 0 gave NaN weights and k = -1 sliced off one cluster (top-(K-1)) through the Python API; a
    corpus whose every record was skipped raised numpy's 'need at least one array to concatenate'."""
    from elmforest.cli import main
    from elmforest.utils.errors import UserError

    c = Clusterer.load(clusterer_dir)
    z = c.embed(["thou shalt not", "def return self"])[0]
    assert np.allclose(c.route(z, k=1).sum(1), 1.0)
    for k in (0, -1):
        with pytest.raises(UserError, match="k >= 1"):
            c.route(z, k=k)
    data = tmp_path / "empty.jsonl"
    data.write_text('{"text": ""}\n{"text": "   "}\n')
    argv = [
        "cluster",
        "assign",
        "--clusterer",
        str(clusterer_dir),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--balanced", "--no-progress"]) == 2
    assert "no documents to assign" in capsys.readouterr().err
    # unbalanced too: it wrote a folder of its report alone over an earlier assignment, and said done
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "thou shalt not kill"}\n{"text": "def return self value"}\n')
    assert main([*argv[:5], str(good), *argv[6:], "--no-progress"]) == 0
    before = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert main([*argv, "--no-progress"]) == 2
    assert "no documents to assign" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == before and len(before) > 1


def test_nmi_from_the_cluster_by_domain_counts_is_sklearns():
    from collections import Counter

    from sklearn.metrics import normalized_mutual_info_score

    from elmforest.cluster.assign import nmi_of

    rng = np.random.default_rng(4)
    for k, nd in [(4, 3), (1, 3), (3, 1), (1, 1), (5, 5)]:
        labels = rng.integers(0, k, 500)
        domains = [f"d{(x + rng.integers(0, 2)) % nd}" for x in labels]
        table = Counter(zip(labels.tolist(), domains, strict=True))
        assert nmi_of(table) == pytest.approx(normalized_mutual_info_score(domains, labels), abs=1e-12)
    same = Counter({(0, "a"): 10, (1, "b"): 5})  # a perfect match
    assert nmi_of(same) == pytest.approx(1.0)


def test_every_kmeans_assignment_step_is_the_optimal_balanced_one(monkeypatch):
    """Warm-started prices may be stale where a cluster ends under-filled (N not a multiple of K): the
    step then starts cold. Each step's labels, for the centres of that step, against brute force."""
    import elmforest.cluster.kmeans as km

    steps, real = [], km.balanced_assign

    def spy(scores, cap, **kw):
        lab = real(scores, cap, **kw)
        if steps and steps[-1][0] is scores:
            steps.pop()  # the cold redo of this step: its labels are the step's
        steps.append((scores, np.broadcast_to(np.asarray(cap), (scores.shape[1],)), lab))
        return lab

    monkeypatch.setattr(km, "balanced_assign", spy)
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(30):
        x = np.concatenate([rng.normal(0, 1, (14, 2)), rng.normal(4, 1, (5, 2)), rng.normal(-4, 1, (3, 2))])
        steps.clear()
        balanced_kmeans(x, 4, seed=int(rng.integers(1000)), max_iter=6)
        for s, cap, lab in steps:
            n, k = s.shape
            slots = np.repeat(np.arange(k), cap)
            r, c = linear_sum_assignment(-s[:, slots])
            best = s[r, slots[c]].sum()
            assert s[np.arange(n), lab].sum() >= best - (s.max() - s.min()) / 4 - 1e-9
            checked += 1
    assert checked >= 60


def test_a_cluster_served_by_two_experts_is_said_to_route_to_the_last(cluster_forest, tmp_path, capsys):
    """An expert added later on a cluster that had one (`forest add` / `forest expert`) took the cluster
    over in cluster routing, the first never running, without a word."""
    import shutil

    from elmforest.forest.cluster_route import ClusterRouting
    from elmforest.forest.manifest import Forest

    shutil.copytree(cluster_forest, tmp_path / "f", symlinks=True)
    f = Forest.load(tmp_path / "f")
    ClusterRouting(f, f.names, 2, 1.0)
    assert "served by several experts" not in capsys.readouterr().err
    f.add(f.expert_dir("cluster0"), "extra", ["cluster1"])
    f = Forest.load(tmp_path / "f")
    r = ClusterRouting(f, f.names, 2, 1.0)
    assert r.expert_of[1] == f.names.index("extra") and r.expert_of[0] == f.names.index("cluster0")
    assert "(cluster1: cluster1, extra -> extra)" in capsys.readouterr().err


def test_a_fit_with_an_empty_cluster_and_an_assign_with_no_training_split_are_said(tmp_path, capsys):
    """Both passed without a word: a fitted cluster holding no document (an expert with nothing to
    train on; only `assign` warned), and `--balanced` with valid + test taking every document."""
    from elmforest.cli import main

    data = tmp_path / "d"
    data.mkdir()
    texts = ["apples pears fruit"] * 3 + ["dogs cats pets"] * 2
    (data / "d.jsonl").write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    assert main(["cluster", "fit", "--data", str(data), "--k", "4", "--out", str(tmp_path / "c4")]) == 0
    out = capsys.readouterr()
    assert "sizes [2, 2, 1, 0]" in out.out and "cluster(s) [3] hold none of the sampled documents" in out.err
    assert main(["cluster", "fit", "--data", str(data), "--k", "2", "--out", str(tmp_path / "c2")]) == 0
    assert "hold none" not in capsys.readouterr().err
    argv = ["cluster", "assign", "--clusterer", str(tmp_path / "c2"), "--data", str(data), "--balanced"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--valid-frac", "0.5", "--test-frac", "0.5"]) == 2
    assert "leave no training split for --balanced to cap" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "a"), "--valid-frac", "0.95"]) == 2
    assert "--valid-frac 0.95 and --test-frac 0.05 (the clusterer's) leave no" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
