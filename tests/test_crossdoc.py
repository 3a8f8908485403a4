"""Cross-document BPB (issue 17): scores against a plain forward, the byte table against the recorded
bytes, retrieval against a dense brute force, the forest's mixture against a hand-computed posterior."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from elmforest.cli import main
from elmforest.data.shards import Shards
from elmforest.data.tokenizer import load_tokenizer
from elmforest.eval.bpb import stream_nll
from elmforest.eval.crossdoc import evaluate_crossdoc, score_sequences, sequences
from elmforest.eval.crossdoc_tasks import (
    TrainIndex,
    _bags,
    build_tasks,
    document_bytes_ok,
    token_byte_table,
)
from elmforest.forest.crossdoc import evaluate_forest_crossdoc
from elmforest.forest.manifest import Forest
from elmforest.model.build import load_model
from elmforest.utils.errors import UserError

SEQ = 64  # the tiny preset's context


@pytest.fixture(scope="module")
def dense(forest_dir) -> Path:
    return Path(forest_dir) / "runs" / "dense" / "model"


def _forward(model, seq: np.ndarray, eos: int) -> np.ndarray:
    """log p(s_i | EOS, s_<i) by one plain forward of a single unpadded sequence."""
    s = torch.as_tensor(seq, dtype=torch.long)
    x = torch.cat([torch.tensor([eos]), s[:-1]])[None]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
    return lp.gather(1, s[:, None])[:, 0].numpy()


def test_dense_scores_equal_a_plain_forward_and_padding_changes_nothing(dense, shards_dir):
    sh = Shards(shards_dir)
    items, _ = build_tasks(sh, SEQ, max_docs=3, seed=1)
    model = load_model(dense).eval()
    seqs = sequences(items["retrieval"], "retrieved") + sequences(items["second_half"], "none")
    seqs += sequences(items["retrieval"], "none")
    assert len({len(s) for s, _ in seqs}) > 2  # lengths differ: batches are padded
    ctx, tgt = score_sequences(model, seqs, sh.eos_id, batch_size=4, amp=None)
    ctx1, tgt1 = score_sequences(model, seqs, sh.eos_id, batch_size=1, amp=None)
    assert np.allclose(tgt, tgt1, atol=1e-5) and np.allclose(ctx, ctx1, atol=1e-4)
    for i, (s, c) in enumerate(seqs):
        lp = _forward(model, s, sh.eos_id)
        assert ctx[i] == pytest.approx(lp[:c].sum(), abs=1e-4)
        assert np.allclose(tgt[i, : len(s) - c], lp[c:], atol=1e-5)
        assert not tgt[i, len(s) - c :].any()


def test_a_whole_document_alone_scores_as_ordinary_bpb(dense, shards_dir):
    """The `none` condition of a whole-document target is ordinary BPB's window on that document."""
    sh = Shards(shards_dir)
    dom = sh.domains[0]
    docs = sh.documents(dom, "test")
    ends = docs[:, 0]
    lens = np.diff(np.concatenate([[0], ends]))
    i = int(np.flatnonzero(lens < SEQ)[0])
    start, n = int(ends[i] - lens[i]), int(lens[i])
    items, _ = build_tasks(sh, SEQ, target_len=n, max_docs=None, tasks=("retrieval",), domains=[dom])
    it = next(x for x in items["retrieval"] if x.doc == i)
    assert len(it.target) == n and it.nbytes == int(docs[i, 1]) + 1  # the EOS: predicted, 1 byte
    model = load_model(dense).eval()
    _, tgt = score_sequences(model, sequences([it], "none"), sh.eos_id, amp=None)
    ref = stream_nll(
        model, sh.tokens(dom, "test")[start : start + n], sh.eos_id, SEQ, 1, torch.device("cpu"), None
    )
    assert -tgt.sum() == pytest.approx(ref, abs=1e-4)


def test_token_bytes_sum_to_the_recorded_bytes_of_every_test_document(shards_dir):
    sh = Shards(shards_dir)
    table, special = token_byte_table(Path(shards_dir) / "tokenizer.json")
    tok = load_tokenizer(shards_dir)
    assert list(special) == [sh.eos_id] and table[sh.eos_id] == 0
    for d in sh.domains:
        docs, stream = sh.documents(d, "test"), np.asarray(sh.tokens(d, "test"), dtype=np.int64)
        assert document_bytes_ok(sh, d, "test", table, special).all()
        start = 0
        for end, nbytes in docs:
            ids = stream[start:end]
            assert table[ids].sum() == nbytes == len(tok.decode(ids[:-1].tolist()).encode("utf-8"))
            start = end
    # a wrong table is an error naming the document, not a silent BPB
    bad = table.copy()
    bad[int(stream[0])] += 1
    with pytest.raises(UserError, match="byte table is wrong"):
        document_bytes_ok(sh, d, "test", bad, special)


def test_a_document_holding_a_special_token_is_skipped(corpus, tokenizer_dir, tmp_path):
    from elmforest.data.shards_build import build_shards
    from elmforest.data.splits import SplitSpec

    raw = tmp_path / "raw"
    raw.mkdir()
    texts = ["plain text one", "it says <|endoftext|> inside", "plain text two"] * 4
    texts[2] = "<|endoftext|> at its very start"  # was "the tokenizer's byte table is wrong", the run aborted
    (raw / "x.jsonl").write_text(
        "".join(json.dumps({"id": f"x{i}", "domain": "x", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    built = build_shards(raw, tokenizer_dir, tmp_path / "sh", SplitSpec(0.0, 0.999), progress=False)
    sh = Shards(built.out)
    table, special = token_byte_table(sh.root / "tokenizer.json")
    ok = document_bytes_ok(sh, "x", "test", table, special)
    assert (~ok).sum() == 5 and ok.sum() == 7


def test_a_copy_of_the_target_never_enters_its_context(corpus, tokenizer_dir, tmp_path, monkeypatch):
    """A long document repeated under many ids lands in train and test alike. Its train copies share
    most of the test target's 8-grams (the cosine of a short target's bag to a long document's bag
    stays below 0.9, so the cosine rule alone lets them in): they must be left out and counted."""
    import random

    from elmforest.data.shards_build import build_shards
    from elmforest.data.splits import SplitSpec
    from elmforest.eval import crossdoc_tasks as ct

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(3000)]
    long_doc = " ".join(rng.choice(words) for _ in range(400))
    others = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)]
    texts = [long_doc] * 20 + others
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "x.jsonl").write_text(
        "".join(json.dumps({"id": f"x{i}", "domain": "x", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    sh = Shards(build_shards(raw, tokenizer_dir, tmp_path / "sh", SplitSpec(0.0, 0.3), progress=False).out)
    copy = np.asarray(sh.tokens("x", "train")[: sh.documents("x", "train")[0, 0]])

    def overlap(ctx, tgt):
        g = ct._grams(tgt)
        return np.isin(g, ct._grams(ctx)).mean()

    def copies_in_context(items):
        return sum(overlap(it.contexts[c], it.target) > 0.5 for it in items for c in ("retrieved", "random"))

    items, info = build_tasks(sh, seq_len=64, target_len=32, max_docs=None, tasks=("retrieval",))
    long_targets = [it for it in items["retrieval"] if overlap(copy, it.target) > 0.9]
    assert long_targets, "the corpus should put copies of the long document in test"
    assert copies_in_context(items["retrieval"]) == 0
    assert info["domains"]["x"]["retrieval"]["copies_left_out"] >= len(long_targets)
    monkeypatch.setattr(ct, "MAX_OVERLAP", 1.0)  # the rule off: the copies come back (the test can fail)
    items, _ = build_tasks(sh, seq_len=64, target_len=32, max_docs=None, tasks=("retrieval",))
    assert copies_in_context(items["retrieval"]) >= len(long_targets)


def test_random_contexts_fill_the_retrieved_length_on_a_corpus_of_copies(
    tokenizer_dir, tmp_path, monkeypatch
):
    """Nearly every training document a copy of the target: the spare draws ran out and a random
    context came out empty beside a full retrieved one, with nothing said."""
    import random

    from elmforest.data.shards_build import build_shards
    from elmforest.data.splits import SplitSpec
    from elmforest.eval import crossdoc_tasks as ct

    rng = random.Random(0)
    line = "Permission is hereby granted, free of charge, to any person obtaining a copy of this software"
    words = line.split()
    texts = [line if rng.random() < 0.95 else " ".join(rng.sample(words, len(words))) for _ in range(600)]
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "x.jsonl").write_text(
        "".join(json.dumps({"id": f"x{i}", "domain": "x", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    sh = Shards(build_shards(raw, tokenizer_dir, tmp_path / "sh", SplitSpec(0.0, 0.1), progress=False).out)

    tries = ct.RANDOM_TRIES

    def lengths(tries):
        monkeypatch.setattr(ct, "RANDOM_TRIES", tries)
        items, info = build_tasks(
            sh, seq_len=64, target_len=32, max_docs=None, tasks=("retrieval",), neighbours=600
        )
        got = [(len(it.contexts["retrieved"]), len(it.contexts["random"])) for it in items["retrieval"]]
        return got, info["domains"]["x"]["retrieval"]["random_context_short"]

    got, short = lengths(1)  # the old single draw: some fall short, and are counted
    assert short == sum(r < c for c, r in got) > 0
    got, short = lengths(tries)
    assert short == 0 and all(r == c for c, r in got)


def _tfidf_dense(bags: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's default tf-idf by hand: idf = ln((1 + n) / (1 + df)) + 1, rows L2-normalised."""
    n = bags.shape[0]
    idf = np.log((1 + n) / (1 + (bags > 0).sum(0))) + 1
    x, y = bags * idf, q * idf
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
    y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-300)
    return x, y


def _bag_dense(tokens, vocab: int, special) -> np.ndarray:
    """A document's bag by hand: counts of its first 512 token ids, special tokens left out."""
    t = np.asarray(tokens[:512], dtype=np.int64)
    return np.bincount(t[~np.isin(t, special)], minlength=vocab).astype(float)


def test_bags_count_each_spans_first_512_tokens_without_special_ones():
    """Spans longer than 512 tokens (none in the fixture shards), empty, overlapping, holding EOS."""
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 50, 5000).astype(np.uint16)
    stream[rng.random(5000) < 0.1] = 7
    starts = rng.integers(0, 4000, 40)
    ends = np.minimum(starts + rng.integers(0, 1200, 40), 5000)
    ends[:3] = starts[:3]
    got = _bags(stream, starts, ends, 60, np.array([7])).toarray()
    want = np.stack([_bag_dense(stream[a:b], 60, [7]) for a, b in zip(starts, ends, strict=True)])
    assert (ends - starts).max() > 512 and np.array_equal(got, want)
    with pytest.raises(UserError, match="beyond the shards' vocabulary"):
        _bags(stream, starts, ends, 40, np.array([7]))


def test_retrieval_equals_a_dense_brute_force_and_reads_train_only(shards_dir, monkeypatch):
    sh = Shards(shards_dir)
    table, special = token_byte_table(Path(shards_dir) / "tokenizer.json")
    read = []
    orig = Shards.tokens
    monkeypatch.setattr(Shards, "tokens", lambda self, d, s: read.append(s) or orig(self, d, s))
    index = TrainIndex.build(sh, special)
    assert set(read) == {"train"} and len(index) == sum(len(sh.documents(d, "train")) for d in sh.domains)
    monkeypatch.undo()
    d = sh.domains[1]
    docs, stream = sh.documents(d, "test"), sh.tokens(d, "test")
    starts = np.concatenate([[0], docs[:-1, 0]])
    q = _bags(stream, starts, docs[:, 0], sh.vocab_size, special)
    # a query equal to a train document: its copy (cosine 1) must be left out
    dom, s0, e0 = index.where[5]
    copy = _bags(index.streams[dom], np.array([s0]), np.array([e0]), sh.vocab_size, special)
    queries = sp.vstack([q, copy]).tocsr()
    ids, cos = index.neighbours(queries, 5, 0.9, chunk_cells=1000)  # several chunks
    train_bags = np.stack(
        [_bag_dense(index.streams[w[0]][w[1] : w[2]], sh.vocab_size, special) for w in index.where]
    )
    want_q = [
        _bag_dense(stream[a:b], sh.vocab_size, special) for a, b in zip(starts, docs[:, 0], strict=True)
    ]
    assert np.array_equal(queries.toarray(), np.stack([*want_q, train_bags[5]]))
    x, y = _tfidf_dense(train_bags, queries.toarray())
    sims = y @ x.T
    assert np.allclose(index.vectors.toarray(), x, atol=1e-9)
    for r in range(queries.shape[0]):
        s = np.where((sims[r] >= 0.9) | (sims[r] <= 0), -np.inf, sims[r])
        want = np.sort(s)[::-1][:5]
        assert np.allclose(cos[r], want, atol=1e-9)
        assert np.allclose(sims[r, ids[r]], cos[r], atol=1e-9)  # the ids are those similarities'
    assert 5 not in ids[-1] and (sims[-1, 5] > 0.999)
    assert (cos < 0.9).all()


def test_contexts_put_the_nearest_last_and_random_ones_match_their_length(shards_dir):
    sh = Shards(shards_dir)
    items, info = build_tasks(sh, SEQ, max_docs=4, seed=3, tasks=("retrieval",))
    again, _ = build_tasks(sh, SEQ, max_docs=4, seed=3, tasks=("retrieval",))
    assert all(
        np.array_equal(a.contexts[c], b.contexts[c])
        for a, b in zip(items["retrieval"], again["retrieval"], strict=True)
        for c in a.contexts
    )
    _, special = token_byte_table(Path(shards_dir) / "tokenizer.json")
    index = TrainIndex.build(sh, special)
    for it in items["retrieval"]:
        ctx, rnd = it.contexts["retrieved"], it.contexts["random"]
        assert len(ctx) == len(rnd) <= SEQ - len(it.target) and len(ctx) + len(it.target) <= SEQ
        if len(ctx):
            docs = sh.documents(it.domain, "test")
            start = 0 if it.doc == 0 else int(docs[it.doc - 1, 0])
            q = _bags(
                sh.tokens(it.domain, "test"),
                np.array([start]),
                np.array([start + len(it.target)]),
                sh.vocab_size,
                special,
            )
            best = index.neighbours(q, 1, 0.9)[0][0, 0]
            tail = index.doc_tokens(int(best), SEQ // 2 - 1)
            assert np.array_equal(ctx[-len(tail) :], tail) and ctx[-1] == sh.eos_id
    assert info["domains"][sh.domains[0]]["retrieval"]["documents"] == 4


def test_forest_score_is_the_posterior_mixture_by_hand(forest_dir, shards_dir):
    # a uniform prior: the cached one is ~one-hot on these tiny experts, hiding what the context does
    res = evaluate_forest_crossdoc(
        forest_dir, shards_dir, max_docs=2, seed=2, batch_size=3, precision="fp32", prior="uniform"
    )
    forest, sh = Forest.load(forest_dir), Shards(shards_dir)
    items, _ = build_tasks(sh, SEQ, max_docs=2, seed=2)
    models = [load_model(forest.expert_dir(x)).eval() for x in res["experts"]]
    checked = 0
    for task, its in items.items():
        for cond in ("none", "retrieved", "first_half"):
            if cond not in its[0].contexts:
                continue
            for it, (s, c) in list(zip(its, sequences(its, cond), strict=True))[::3]:
                lp = np.stack([_forward(m, s, sh.eos_id) for m in models])  # [N, len]
                log_pi = np.log([res["prior"][it.domain][x] for x in res["experts"]])
                nll = 0.0
                for t in range(c, len(s)):
                    lw = log_pi + lp[:, :t].sum(1)
                    lw -= np.logaddexp.reduce(lw)
                    nll -= np.logaddexp.reduce(lw + lp[:, t])
                got = res["tasks"][task]["documents"][it.domain]
                k = got["doc"].index(it.doc)
                assert got[cond][k] == pytest.approx(nll, abs=1e-4)
                checked += 1
    assert checked >= 4
    for t in res["tasks"].values():  # each expert's mean weight over target tokens: no padding counted
        for c in t["conditions"].values():
            for w in c["posterior"].values():
                assert sum(w.values()) == pytest.approx(1.0, abs=1e-9)
    r = res["tasks"]["retrieval"]
    assert r["gain"]["related_text"]["mean"] == pytest.approx(
        r["conditions"]["random"]["mean_bpb"] - r["conditions"]["retrieved"]["mean_bpb"]
    )


def test_the_forest_prior_is_the_cached_prior_of_the_valid_split(forest_dir, shards_dir):
    from elmforest.forest.pool import estimate_prior, make_pool

    res = evaluate_forest_crossdoc(
        forest_dir, shards_dir, max_docs=1, tasks="second_half", precision="fp32", prior_batches=2
    )
    forest, sh = Forest.load(forest_dir), Shards(shards_dir)
    pool = make_pool(forest, precision="fp32")
    for d, w in res["prior"].items():
        want = estimate_prior(pool, sh.tokens(d, "valid"), sh.eos_id, SEQ, 2)
        assert np.allclose([w[x] for x in forest.names], want.numpy(), atol=1e-9)
        assert res["prior_source"][d].startswith(f"{d}/valid")
    with pytest.raises(UserError, match="more than once"):  # it would count twice in the mixture
        evaluate_forest_crossdoc(forest_dir, shards_dir, experts=[forest.names[0]] * 2, max_docs=1)
    # a pool that scored before (the priors above): this evaluation's passes alone
    again = evaluate_forest_crossdoc(
        forest_dir, shards_dir, max_docs=1, tasks="second_half", precision="fp32", prior_batches=2, pool=pool
    )
    fresh = evaluate_forest_crossdoc(
        forest_dir, shards_dir, max_docs=1, tasks="second_half", precision="fp32", prior_batches=2
    )
    assert again["compute"]["expert_token_passes"] == fresh["compute"]["expert_token_passes"] > 0
    assert again["compute"]["prior_token_passes"] == fresh["compute"]["prior_token_passes"] > 0


def test_a_task_no_document_qualifies_for_is_left_unscored_by_a_forest_too(forest_dir, shards_dir):
    """A context longer than every test document: the dense path said "nothing scored", the forest
    crashed in torch.stack after every expert had scored the other task."""
    sh = Shards(shards_dir)
    longest = max(int(np.diff(np.r_[0, sh.documents(d, "test")[:, 0]]).max()) for d in sh.domains)
    res = evaluate_forest_crossdoc(
        forest_dir, shards_dir, max_docs=1, tasks="second_half", precision="fp32", seq_len=longest + 2
    )
    assert all(not c.get("domains") for c in res["tasks"]["second_half"]["conditions"].values())


def test_bad_input_is_refused(shards_dir, dense, tmp_path):
    sh = Shards(shards_dir)
    with pytest.raises(UserError, match="seq_len must be at least"):
        build_tasks(sh, 4)
    with pytest.raises(UserError, match="target_len"):
        build_tasks(sh, SEQ, target_len=SEQ)
    with pytest.raises(UserError, match="no room for a neighbour"):  # every context its EOS alone
        build_tasks(sh, SEQ, target_len=SEQ - 1, tasks=("retrieval",))
    assert build_tasks(sh, SEQ, target_len=SEQ - 1, tasks=("second_half",), max_docs=1)[0]["second_half"]
    with pytest.raises(UserError, match="unknown task"):
        build_tasks(sh, SEQ, tasks=("nope",))
    with pytest.raises(UserError, match="no task given"):
        build_tasks(sh, SEQ, tasks=())
    with pytest.raises(UserError, match=r"no domain\(s\) \['nope'\]; it has"):
        build_tasks(sh, SEQ, domains=["nope"])
    index = json.loads((Path(shards_dir) / "index.json").read_text())  # no test split anywhere
    for d in index["domains"].values():
        d["splits"].pop("test", None)
    (tmp_path / "notest").mkdir()
    for f in Path(shards_dir).iterdir():
        if f.name != "index.json":
            (tmp_path / "notest" / f.name).symlink_to(f)
    (tmp_path / "notest" / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="no domain has a 'test' split"):  # was: exit 0, "nothing scored"
        build_tasks(Shards(tmp_path / "notest"), SEQ)
    with pytest.raises(UserError, match=r"positions \(its config.json\)"):
        evaluate_crossdoc(dense, shards_dir, seq_len=100_000)
    import shutil

    other = tmp_path / "other-eos"  # the same tokenizer files, documents ended with another token
    shutil.copytree(dense, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "eos_token_id": sh.eos_id + 1}))
    with pytest.raises(UserError, match=f"its documents end with token {sh.eos_id}"):
        evaluate_crossdoc(other, shards_dir, max_docs=1)
    spec = json.loads((Path(shards_dir) / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {
        "type": "Metaspace",
        "replacement": "▁",
        "prepend_scheme": "always",
        "split": True,
    }
    spec["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="not a byte-level BPE"):
        token_byte_table(tmp_path / "tokenizer.json")
    with pytest.raises(UserError, match="no tokenizer.json"):
        token_byte_table(tmp_path / "missing.json")


def test_cli_writes_the_result(dense, shards_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["eval-crossdoc", "--data", str(shards_dir), "--max-docs", "2", "--no-progress", "--device", "cpu"]
    assert main([*args, "--model", str(dense), "--json", str(out), "--precision", "fp32"]) == 0
    res, first = json.loads(out.read_text()), capsys.readouterr().out
    assert set(res["tasks"]) == {"retrieval", "second_half"} and "gain related_text" in first
    assert "retrieval targets had no neighbour" not in first, first
    for cond in res["tasks"]["retrieval"]["conditions"].values():
        assert all(math.isfinite(v["bpb"]) and v["documents"] == 2 for v in cond["domains"].values())
    assert main([*args, "--model", str(dense), "--forest", "f"]) == 2
    # no neighbour close enough for any target: the gain is over nothing, and the output says so
    assert main([*args, "--model", str(dense), "--max-cosine", "1e-9", "--tasks", "retrieval"]) == 0
    out = capsys.readouterr().out
    assert "6 of 6 retrieval targets had no neighbour" in out and "nothing was measured" in out, out


def test_the_notes_name_why_targets_lack_context_and_what_was_left_out():
    """Targets left without a neighbour by the copy rule were said to have none in the pool; random
    contexts that fell short, and documents left out for a special token, were said nowhere."""
    from elmforest.eval.crossdoc_tasks import retrieval_notes, skipped_note

    def said(**b):
        res = {"built": {"domains": {"x": {"retrieval": b, "skipped_special_inside": b.pop("skipped", 0)}}}}
        return " ".join([*retrieval_notes(res), skipped_note(res) or ""]).strip()

    out = said(documents=39, without_neighbours=39, copies_left_out=2496)
    assert (
        "39 of 39 retrieval targets had no neighbour" in out
        and "2496 candidates were left out as copies" in out
    )
    assert "nothing was measured" in out
    assert "copies" not in said(documents=39, without_neighbours=3, copies_left_out=0)
    assert "for 2 retrieval target(s) the random context is shorter" in said(
        documents=9, random_context_short=2
    )
    assert "1 test document(s) hold a special token" in said(documents=9, skipped=1)
    assert said(documents=9) == ""
