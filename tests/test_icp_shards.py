"""Shards in an order (data/reorder.py, cluster/icp_shards.py): only the training split changes, and
only by a permutation less the duplicates it records; the order is a function of data and seed and is
part of the fingerprint; a run that names an order is refused on shards in another one."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_encoder, tiny_config

from elmforest.cli import main
from elmforest.cluster.icp_shards import DedupOrder, IcpOrder
from elmforest.config import RunConfig
from elmforest.data.reorder import TIMINGS_FILE, RandomOrder, _gather, reorder_shards, start_warm_up
from elmforest.data.shards import Shards
from elmforest.data.shards_build import build_shards
from elmforest.data.splits import SplitSpec
from elmforest.utils.errors import UserError

SPLIT = SplitSpec(0.1, 0.1)
DUP_TEXT = "zebra quantum harpsichord nebula marmalade " * 6
N_COPIES = 12


@pytest.fixture(scope="module")
def dup_corpus(corpus, tmp_path_factory) -> Path:
    """The shared corpus plus N_COPIES exact copies of one document in the legal domain."""
    root = tmp_path_factory.mktemp("dupcorpus")
    for f in corpus.glob("*.jsonl"):
        shutil.copy(f, root / f.name)
    with open(root / "legal.jsonl", "a", encoding="utf-8") as f:
        for i in range(N_COPIES):
            f.write(json.dumps({"id": f"legal/dup{i}", "domain": "legal", "text": DUP_TEXT}) + "\n")
    return root


@pytest.fixture(scope="module")
def builds(dup_corpus, tokenizer_dir, tmp_path_factory) -> dict[str, Shards]:
    root = tmp_path_factory.mktemp("orders")
    specs = {
        "source": ("source", 0),
        "random0": ("random", 0),
        "random0b": ("random", 0),
        "random1": ("random", 1),
        "icp0": (IcpOrder(), 0),
        "icp0b": (IcpOrder(), 0),
        "dedup0": (DedupOrder(), 0),
    }
    out = {}
    for name, (order, seed) in specs.items():
        build_shards(
            dup_corpus, tokenizer_dir, root / name, SPLIT, progress=False, order=order, order_seed=seed
        )
        out[name] = Shards(root / name)
    return out


def _files(sh: Shards, domain: str, split: str) -> tuple[bytes, bytes]:
    folder = sh.root / sh.index["domains"][domain]["folder"]
    return (folder / f"{split}.bin").read_bytes(), (folder / f"{split}.docs.npy").read_bytes()


def _docs(sh: Shards, domain: str, split: str = "train") -> list[tuple[bytes, int]]:
    """Each document's token bytes and text byte count, in stored order."""
    tokens, table = np.asarray(sh.tokens(domain, split)), sh.documents(domain, split)
    starts = np.concatenate([[0], table[:-1, 0]])
    return [(tokens[s:e].tobytes(), int(b)) for s, (e, b) in zip(starts, table, strict=True)]


def test_valid_and_test_are_byte_identical_in_every_order(builds):
    src = builds["source"]
    for name, sh in builds.items():
        assert sh.domains == src.domains
        for d in src.domains:
            for split in ("valid", "test"):
                assert _files(sh, d, split) == _files(src, d, split), (name, d, split)
                assert sh.info(d, split) == src.info(d, split)


def test_train_is_a_permutation_less_the_recorded_duplicates(builds):
    src = builds["source"]
    for name in ("random0", "random1", "icp0"):
        sh = builds[name]
        for d in src.domains:
            before, after = Counter(_docs(src, d)), Counter(_docs(sh, d))
            stats = sh.order["domains"][d]
            assert not after - before, f"{name}/{d}: a document not in the source build"
            assert (before - after).total() == stats["dropped_documents"]
            assert stats["documents_before"] == before.total() == src.info(d, "train")["documents"]
            assert stats["documents_after"] == after.total() == sh.info(d, "train")["documents"]
            info = sh.info(d, "train")  # the index's counts describe the rewritten files
            assert (
                info["tokens"] == len(sh.tokens(d, "train")) == sum(len(t) for t, _ in after.elements()) // 2
            )
            assert info["bytes"] == sum(b for _, b in after.elements())
            if name.startswith("random"):
                assert after == before and stats["dropped_documents"] == 0
            else:
                assert stats["dropped_documents"] == stats["exact_duplicates"] + stats["near_duplicates"]
                assert stats["kept"] == stats["documents_after"]
        if name.startswith("random"):
            assert any(_docs(sh, d) != _docs(src, d) for d in src.domains), "random order = source order"


def test_planted_exact_duplicates_are_dropped_and_counted(builds):
    src, icp = builds["source"], builds["icp0"]
    planted = len(DUP_TEXT.encode())
    copies = Counter(t for t, n in _docs(src, "legal") if n == planted)
    assert len(copies) == 1
    ((tokens, in_train),) = copies.items()
    assert in_train >= 3, "most planted copies should land in the training split"
    assert sum(t == tokens for t, _ in _docs(icp, "legal")) == 1
    assert icp.order["domains"]["legal"]["exact_duplicates"] >= in_train - 1


def test_same_seed_same_files_other_seed_other_order(builds):
    for a, b in (("random0", "random0b"), ("icp0", "icp0b")):
        for d in builds[a].domains:
            assert _files(builds[a], d, "train") == _files(builds[b], d, "train")
        ia, ib = (dict(builds[x].index, source=None) for x in (a, b))
        assert ia == ib
        assert builds[a].fingerprint == builds[b].fingerprint  # timings differ, the fingerprint does not
    assert any(
        _files(builds["random0"], d, "train") != _files(builds["random1"], d, "train")
        for d in builds["source"].domains
    )


def test_index_records_the_order_and_fingerprints_differ_by_order(builds):
    src = builds["source"]
    assert "order" not in src.index and src.order == {"method": "source"}
    assert not (src.root / TIMINGS_FILE).exists()
    assert "order" not in src.record()
    fps = {name: sh.fingerprint for name, sh in builds.items() if not name.endswith("b")}
    assert len(set(fps.values())) == len(fps), fps
    icp = builds["icp0"]
    rec = icp.index["order"]
    assert (rec["method"], rec["seed"]) == ("icp", 0)
    assert rec["params"]["k"] == 10 and rec["params"]["dedup_threshold"] == 0.9
    assert (rec["params"]["svd_dtype"], rec["params"]["svd_normalizer"]) == ("float32", "LU")  # recorded
    assert set(rec["domains"]) == set(src.domains)
    for st in rec["domains"].values():
        assert "seconds" not in st and "threads" not in st
        assert st["mean_adjacent_similarity"] is not None and st["jumps"] >= 0
    timings = json.loads((icp.root / TIMINGS_FILE).read_text())
    assert set(timings["domains"]) == set(src.domains) and timings["seconds"] >= 0
    assert icp.record()["order"]["method"] == "icp"
    assert (
        builds["random0"].order["domains"]["legal"]["order_digest"]
        != (builds["random1"].order["domains"]["legal"]["order_digest"])
    )


@pytest.mark.parametrize("chunk", [1, 3, 7, 10_000])
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_gather_in_chunks_equals_concatenation(chunk, dtype, tmp_path):
    """From a memory map to a file, as reorder_split does; empty documents and ones longer than a
    chunk included."""
    rng = np.random.default_rng(chunk)
    lens = rng.integers(0, 12, size=40)
    ends = np.cumsum(lens)
    starts = ends - lens
    tokens = rng.integers(0, 60000, size=int(ends[-1])).astype(dtype)
    tokens.tofile(tmp_path / "train.bin")
    src = np.memmap(tmp_path / "train.bin", dtype=dtype, mode="r", shape=tokens.shape)
    order = rng.permutation(40)[:31]
    with open(tmp_path / "out.bin", "wb") as f:
        _gather(src, starts, lens, order, f, chunk)
    want = np.concatenate([tokens[starts[i] : ends[i]] for i in order])
    assert (tmp_path / "out.bin").read_bytes() == want.tobytes()


def test_bad_orders_are_refused(dup_corpus, tokenizer_dir, tmp_path, capsys):
    for order, msg in (
        ("icp", "make_orderer"),
        ("dedup", "make_orderer"),
        ("bogus", "unknown shards order"),
        (3, "orderer"),
    ):
        with pytest.raises(UserError, match=msg):
            build_shards(dup_corpus, tokenizer_dir, tmp_path / "x", SPLIT, progress=False, order=order)
        assert not (tmp_path / "x").exists()

    class Twice:
        name = "twice"

        def params(self):
            return {}

        def __call__(self, tokens, ends, vocab_size, eos_id, seed):
            return np.zeros(len(ends), dtype=np.int64), {}

    with pytest.raises(ValueError, match="more than once"):
        build_shards(dup_corpus, tokenizer_dir, tmp_path / "x", SPLIT, progress=False, order=Twice())
    assert not (tmp_path / "x").exists()
    args = ["shards", "build", "--data", str(dup_corpus), "--tokenizer", str(tokenizer_dir)]
    assert main([*args, "--out", str(tmp_path / "y"), "--order", "alphabetical"]) == 2
    assert "--order" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "y"), "--order", "random", "--icp-k", "3"]) != 0
    assert "--icp-k applies only to --order icp or dedup" in capsys.readouterr().err
    for bad, said in (
        (["--order", "source", "--order-seed", "3"], "--order-seed applies to"),
        (["--order", "icp", "--icp-dedup-threshold", "0.95", "--icp-keep-duplicates"], "give one of them"),
        (["--order", "dedup", "--icp-keep-duplicates"], "that is --order random"),
        (["--order", "icp", "--order-seed", str(2**31)], "below 2**31"),  # faiss's C int: a traceback
    ):
        assert main([*args, "--out", str(tmp_path / "y"), *bad]) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_cli_builds_and_shows_icp_order(dup_corpus, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "icp"
    args = [
        "shards",
        "build",
        "--data",
        str(dup_corpus),
        "--tokenizer",
        str(tokenizer_dir),
        "--out",
        str(out),
    ]
    assert main([*args, "--order", "icp", "--order-seed", "2", "--icp-k", "5", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "training documents in icp order" in printed and "legal:" in printed
    sh = Shards(out)
    assert (sh.order["method"], sh.order["seed"], sh.order["params"]["k"]) == ("icp", 2, 5)
    assert main(["shards", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "order of the training documents: icp" in shown and "exact" in shown
    # dedup: ICP's documents without its path, so no path statistics to print
    dedup = tmp_path / "dedup"
    assert main([*args[:-1], str(dedup), "--order", "dedup", "--no-progress"]) == 0
    assert "exact +" in capsys.readouterr().out
    assert main(["shards", "show", str(dedup)]) == 0
    shown = capsys.readouterr().out
    assert "order of the training documents: dedup" in shown and "jumps" not in shown


def test_a_domain_with_one_training_document_is_ordered_not_a_crash(corpus, tokenizer_dir, tmp_path):
    """A low-resource domain (one document) has no term in two documents: it is unembedded, kept as read."""
    root = tmp_path / "c"
    shutil.copytree(corpus, root)
    doc_id = next(f"gle/{i}" for i in range(100) if SPLIT.assign(f"gle/{i}") == "train")
    (root / "gle.jsonl").write_text(
        json.dumps({"id": doc_id, "domain": "gle", "text": "Is maith liom an fharraige agus na sléibhte."})
        + "\n"
    )
    for order in ("icp", "dedup"):
        args = ["shards", "build", "--data", str(root), "--tokenizer", str(tokenizer_dir)]
        assert main([*args, "--out", str(tmp_path / order), "--order", order, "--no-progress"]) == 0
        sh = Shards(tmp_path / order)
        assert sh.order["domains"]["gle"]["documents_after"] == 1
        assert len(_docs(sh, "gle")) == 1


def test_data_order_mismatch_is_refused_at_run_start(builds, tmp_path):
    from elmforest.forest import btm
    from elmforest.forest.manifest import Forest
    from elmforest.train.runcheck import check_order, run_identity
    from elmforest.train.trainer import Trainer

    src, icp = builds["source"], builds["icp0"]
    cfg = tiny_config(src.root, steps=2)
    cfg.data.order = "icp"
    with pytest.raises(UserError, match=r"'source' order.*shards reorder .*--order icp"):
        Trainer(cfg, tmp_path / "run").fit()
    assert not (tmp_path / "run" / "run_config.json").exists()
    plan, base = btm.plan_for(cfg, src.domains)  # a forest phase takes its base config's data.order
    with pytest.raises(UserError, match="data.order='icp'"):
        btm.train_seed(Forest.init(tmp_path / "forest"), src, base, plan, progress=False)
    assert RunConfig.from_dict(base.to_dict()).data.order == "icp"  # the experts' config, saved and read
    check_order(tiny_config(icp.root), icp)  # no order asked: anything goes
    icp_cfg = tiny_config(icp.root)
    icp_cfg.data.order = "icp"
    check_order(icp_cfg, icp)
    icp_cfg.data.order = "random"
    with pytest.raises(UserError, match=r"'icp' order \(seed 0\)"):
        check_order(icp_cfg, icp)
    assert run_identity(icp_cfg.to_dict()) == run_identity(tiny_config(icp.root).to_dict())
    bad = cfg.to_dict()
    bad["data"]["order"] = "sorted"
    with pytest.raises(UserError, match="data.order must be"):
        RunConfig.from_dict(bad)


def test_prepare_data_builds_each_order_beside_the_source_shards(dup_corpus, tokenizer_dir, tmp_path):
    from elmforest.launch.prepare import prepare_data

    shutil.copytree(tokenizer_dir, tmp_path / "tokenizer")  # no tokenizer training
    quiet = dict(corpus=dup_corpus, ood=None, progress=False, log=lambda *a: None)
    rnd = prepare_data(tmp_path, 400, order="random", order_seed=1, **quiet).shards
    assert rnd.root == tmp_path / "shards-random-seed1" and rnd.order["seed"] == 1
    assert (
        prepare_data(tmp_path, 400, order="random", order_seed=1, **quiet).shards.fingerprint
        == rnd.fingerprint
    )
    shutil.copytree(rnd.root, tmp_path / "shards")  # shards that are not in the source order
    with pytest.raises(UserError, match="another order"):
        prepare_data(tmp_path, 400, order="source", **quiet)
    assert prepare_data(tmp_path, 400, **quiet).shards.order["method"] == "random"  # None: as they are


@pytest.mark.parametrize("order", ["random", "icp"])
def test_reorder_of_source_shards_equals_building_in_that_order(builds, tmp_path, capsys, order):
    """`shards reorder` (no second tokenizing) makes the very files and index a build in that order makes."""
    out = tmp_path / f"re-{order}"
    assert main(["shards", "reorder", str(builds["source"].root), "--out", str(out), "--order", order]) == 0
    assert f"{order} order" in capsys.readouterr().out
    re, built = Shards(out), builds[f"{order}0"]
    assert re.index == built.index and re.fingerprint == built.fingerprint
    for d in built.domains:
        for split in ("train", "valid", "test"):
            if built.has(d, split):
                assert _files(re, d, split) == _files(built, d, split)
    with pytest.raises(UserError, match="source order"):  # an order of an order is refused
        reorder_shards(out, tmp_path / "again", "random")
    with pytest.raises(UserError, match="exists"):
        reorder_shards(builds["source"].root, out, "random")


def test_damaged_shards_are_said_before_a_reorder_copies_them_and_by_show(builds, tmp_path, capsys):
    """A truncated token file crashed `shards reorder` with a traceback part-way (mmap length), and a
    missing document table was named under the staging folder; `shards show` printed the index as fine."""
    src = builds["source"]
    d = src.domains[0]
    for name, damage in (("bin", lambda p: p.write_bytes(p.read_bytes()[:10])), ("npy", Path.unlink)):
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(src.root, broken)
        damage(
            broken / src.index["domains"][d]["folder"] / ("train.bin" if name == "bin" else "train.docs.npy")
        )
        assert (
            main(
                ["shards", "reorder", str(broken), "--out", str(tmp_path / f"re-{name}"), "--order", "random"]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert str(broken) in err and "build" in err and "Traceback" not in err and ".tmp" not in err, err
        assert not (tmp_path / f"re-{name}").exists()
        assert main(["shards", "show", str(broken)]) == 2 and str(broken) in capsys.readouterr().err
    assert main(["shards", "show", str(src.root)]) == 0
    assert f"fingerprint: {src.fingerprint}" in capsys.readouterr().out


def test_domains_ordered_two_at_a_time_give_the_same_shards_as_one_at_a_time(builds, tmp_path):
    """Concurrent domains (ICP's default on 2+ cores) change nothing recorded: the same index (so the
    same fingerprint) and the same files as one domain at a time; only the timings say how it ran."""
    got = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        reorder_shards(builds["source"].root, out, IcpOrder(), workers=workers)
        got[workers] = Shards(out)
        timings = json.loads((out / TIMINGS_FILE).read_text())
        assert timings["domain_workers"] == workers
        assert set(timings["domains"]) == set(got[workers].order["domains"])
    one, two = got[1], got[2]
    assert one.index == two.index and one.fingerprint == two.fingerprint
    assert list(two.order["domains"]) == list(one.order["domains"])  # recorded in the index's order
    for d in one.domains:
        if one.has(d, "train"):
            assert _files(one, d, "train") == _files(two, d, "train")
    assert IcpOrder().concurrent_domains and not IcpOrder(embedder="x").concurrent_domains
    out = tmp_path / "random"  # an orderer that does not say it is safe side by side runs alone
    reorder_shards(builds["source"].root, out, RandomOrder(), workers=2)
    assert json.loads((out / TIMINGS_FILE).read_text())["domain_workers"] == 1

    class Spy(RandomOrder):  # side by side: warmed up first; a failing warm-up is left to the ordering
        concurrent_domains = True
        calls: list = []

        def warm_up(self):
            self.calls.append("warm")
            raise RuntimeError("toy input failed")

        def __call__(self, *args):
            self.calls.append("order")
            return super().__call__(*args)

    reorder_shards(builds["source"].root, tmp_path / "spy", Spy(), workers=2)
    assert Spy.calls[0] == "warm" and Spy.calls.count("order") == len(one.order["domains"])


def test_warm_up_runs_in_a_thread_and_leaves_its_failure_to_the_ordering():
    calls = []

    class Failing:
        def warm_up(self):
            calls.append(1)
            raise RuntimeError("no faiss here")

    thread = start_warm_up(Failing())
    thread.join(timeout=10)
    assert calls == [1] and not thread.is_alive()
    assert start_warm_up(RandomOrder()) is None
    thread = start_warm_up(IcpOrder())
    thread.join(timeout=120)
    assert not thread.is_alive()


def test_domains_side_by_side_stop_at_a_failure_and_warm_up_first(tmp_path, monkeypatch):
    """map_domains: a failing domain raises and the domains not started never start; reorder_staging
    runs the orderer's warm_up before ordering side by side (a failing one is left to the ordering),
    and a failed IcpOrder warm-up is tried again next time."""
    import time

    from elmforest.cluster import icp_shards
    from elmforest.data.reorder import map_domains

    started = []

    def fn(d):
        started.append(d)
        if d == "b":
            raise ValueError("bad domain b")
        time.sleep(0.3 if d == "big" else 0.01)
        return d

    sizes = {"big": 100, "b": 50, "c": 10, "d": 9, "e": 8, "f": 7}
    with pytest.raises(ValueError, match="bad domain b"):
        map_domains(fn, sizes, 2)
    assert "f" not in started and "e" not in started  # cancelled after b failed, while big still ran
    assert map_domains(lambda d: d * 2, {"x": 1, "y": 2}, 2) == {"x": "xx", "y": "yy"}

    monkeypatch.setattr(icp_shards, "_WARM", False)
    monkeypatch.setattr(icp_shards, "icp_plan", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("toy")))
    with pytest.raises(RuntimeError, match="toy"):
        IcpOrder().warm_up()
    assert icp_shards._WARM is False  # not marked warm: the next call tries again


def test_dedup_keeps_exactly_icps_documents_in_another_order(builds):
    """The control of the comparison: the same documents as ICP (so ICP vs dedup is the order alone),
    not in ICP's order, and recorded as its own method (its own fingerprint)."""
    icp, dedup = builds["icp0"], builds["dedup0"]
    assert dedup.order["method"] == "dedup" and dedup.fingerprint != icp.fingerprint
    for d in icp.domains:
        if not icp.has(d, "train"):
            continue
        assert Counter(_docs(dedup, d)) == Counter(_docs(icp, d))
        assert dedup.order["domains"][d]["dropped_documents"] == icp.order["domains"][d]["dropped_documents"]
        assert "jumps" not in dedup.order["domains"][d]  # no path: its statistics would describe ICP's
    big = max(icp.domains, key=lambda d: icp.info(d, "train")["documents"] if icp.has(d, "train") else 0)
    assert _docs(dedup, big) != _docs(icp, big)


def test_icp_with_a_sentence_encoder_orders_the_decoded_texts(builds, tokenizer_dir, tmp_path, capsys):
    """--icp-embedder: each training document decoded with the shards' tokenizer and embedded by the
    encoder (a tiny random BERT here; `minilm` in real use); the order equals icp_plan over the
    encoder's vectors of the texts decoded independently (elmforest's tokenizer wrapper), the record
    names the encoder, and every document is kept once (duplicates kept: a random encoder finds
    every pair near cosine 1). Refused: the option with another order, a directory that is not an
    encoder."""
    from elmforest.cluster.embedder import SentenceEmbedder
    from elmforest.cluster.icp import icp_plan
    from elmforest.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    enc = make_tiny_encoder(tokenizer_dir, tmp_path / "encoder")
    src = builds["source"]
    out = tmp_path / "enc"
    argv = [
        "shards",
        "reorder",
        str(src.root),
        "--out",
        str(out),
        "--order",
        "icp",
        "--icp-embedder",
        str(enc),
        "--icp-keep-duplicates",
    ]
    assert main(argv) == 0
    sh = Shards(out)
    params = sh.order["params"]
    assert params["embedding"] == "sentence encoder" and params["encoder"] == "encoder"  # the dir's name
    assert params["encoder_fingerprint"] == SentenceEmbedder(enc).fingerprint()
    weights = params["encoder_weights"]
    assert "dims" not in params  # the tf-idf/SVD settings do not apply
    embedder = SentenceEmbedder(enc)
    for d in src.domains:
        if not src.has(d, "train"):
            continue
        docs = _docs(src, d)
        texts = [
            tok.decode([t for t in np.frombuffer(b, dtype=src.dtype).tolist() if t != tok.eos_id])
            for b, _ in docs
        ]
        z, ok = embedder.embed(texts)
        z[~ok] = 0.0
        plan = icp_plan(z, seed=0, dedup_threshold=None)
        assert _docs(sh, d) == [docs[i] for i in plan.order]
        assert sh.order["domains"][d]["dropped_documents"] == 0 and len(plan.order) == len(docs)
    from safetensors.torch import load_file, save_file

    other = {
        k: v + 1 if v.is_floating_point() else v for k, v in load_file(enc / "model.safetensors").items()
    }
    save_file(other, enc / "model.safetensors", metadata={"format": "pt"})  # other weights
    assert IcpOrder(embedder=str(enc)).params()["encoder_weights"] != weights
    bad = ["shards", "reorder", str(src.root)]
    assert main([*bad, "--out", str(tmp_path / "x"), "--order", "random", "--icp-embedder", str(enc)]) != 0
    assert "applies only to --order icp" in capsys.readouterr().err
    assert main([*bad, "--out", str(tmp_path / "x")]) != 0  # the order is required: no default it refuses
    assert "Missing option '--order'" in capsys.readouterr().err
    assert main([*bad, "--out", str(tmp_path / "x"), "--order", "source"]) != 0
    assert "'source' is not one of" in capsys.readouterr().err
    assert main([*bad, "--out", str(tmp_path / "y"), "--order", "icp", "--icp-embedder", str(tmp_path)]) != 0
    assert "not a local embedding model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_encoder_texts_are_each_documents_first_tokens_without_special_tokens(tokenizer_dir):
    """What the encoder reads: the first DECODE_TOKENS tokens of each document as text, special tokens
    (EOS, wherever they are) left out; an empty document is an empty text; no documents, no texts."""
    from elmforest.cluster.icp_shards import DECODE_TOKENS
    from elmforest.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    long_text = " ".join(f"word{i} license software" for i in range(400))
    ids = tok.encode_batch([long_text])[0]
    assert len(ids) > DECODE_TOKENS + 50
    eos = tok.eos_id
    doc0 = ids[:20] + [eos] + ids[20:] + [eos]  # a special token inside the document
    doc1 = [eos]  # an empty document
    doc2 = tok.encode_batch(["short one"])[0] + [eos]
    tokens = np.array(doc0 + doc1 + doc2, dtype=np.uint16)
    ends = np.cumsum([len(doc0), len(doc1), len(doc2)])
    order = IcpOrder(embedder="unused").for_shards(tokenizer_dir)
    texts = order._texts(tokens, ends, eos)
    kept = [t for t in doc0[:DECODE_TOKENS] if t != eos]
    assert texts[0] == tok.decode(kept) and long_text.startswith(texts[0])
    assert len(texts[0]) < len(long_text) and texts[1] == "" and texts[2] == "short one"
    assert order._texts(tokens[:0], ends[:0], eos) == []


def test_icp_exact_limit_zero_orders_with_ivf_and_is_recorded(builds, tmp_path):
    """--icp-exact-limit 0: every domain's kNN by IVF (the fast path), recorded in the params (so in the
    fingerprint) and in each domain's statistics; the default stays exact, its params as before."""
    src, default = builds["source"], builds["icp0"]
    assert default.order["params"]["exact_limit"] == 20_000
    out = tmp_path / "ivf"
    argv = ["shards", "reorder", str(src.root), "--out", str(out), "--order", "icp", "--icp-exact-limit", "0"]
    assert main(argv) == 0
    sh = Shards(out)
    assert sh.order["params"] == {**default.order["params"], "exact_limit": 0}
    assert sh.fingerprint != default.fingerprint
    for d, stats in sh.order["domains"].items():
        assert stats["knn"]["method"] == "ivf" and default.order["domains"][d]["knn"]["method"] == "exact"
        kept = Counter(_docs(sh, d))
        assert sum(kept.values()) == stats["documents_after"] and not kept - Counter(_docs(src, d))


def test_prepare_data_refuses_a_corpus_changed_since_its_shards_were_built(
    corpus, tokenizer_dir, tmp_path, monkeypatch
):
    """A study rerun after a domain was added to its corpus trained and scored the old shards' domains,
    with no word that the new one was left out."""
    from elmforest.launch.prepare import prepare_data

    mine = tmp_path / "corpus"
    shutil.copytree(corpus, mine)
    out = tmp_path / "out"
    shutil.copytree(tokenizer_dir, out / "tokenizer")
    quiet = dict(corpus=mine, ood=None, progress=False, log=lambda *a: None)
    first = prepare_data(out, 400, **quiet).shards.fingerprint
    assert prepare_data(out, 400, **quiet).shards.fingerprint == first  # unchanged: reused
    legal = mine / "legal.jsonl"
    text = legal.read_text(encoding="utf-8")
    os.utime(legal, ns=(1, 1))  # touched (a copy): the same bytes, reused
    assert prepare_data(out, 400, **quiet).shards.fingerprint == first
    from elmforest.launch import corpus_source

    hashed = []
    with monkeypatch.context() as m:  # hashed once for its new mtime, not again on every rerun
        m.setattr(
            corpus_source, "_digest", lambda p, real=corpus_source._digest: hashed.append(p.name) or real(p)
        )
        prepare_data(out, 400, **quiet)
    assert hashed == []
    legal.write_text(text.replace("license", "licenze", 1), encoding="utf-8")  # the same size, edited
    with pytest.raises(UserError, match=r"changed since .* \(rewritten legal.jsonl\)"):
        prepare_data(out, 400, **quiet)
    legal.write_text(text, encoding="utf-8")
    shutil.copy(mine / "code.jsonl", mine / "licenses.jsonl")
    with pytest.raises(UserError, match=r"changed since .* \(added licenses.jsonl\).*another --out"):
        prepare_data(out, 400, **quiet)
    (mine / "licenses.jsonl").unlink()
    legal.write_text(text + text.splitlines(keepends=True)[0], encoding="utf-8")  # a document appended
    with pytest.raises(UserError, match=r"changed since .* \(resized legal.jsonl\)"):
        prepare_data(out, 400, **quiet)
    from elmforest.launch.corpus_source import SOURCE_FILE

    rec = json.loads((out / SOURCE_FILE).read_text())
    (out / SOURCE_FILE).write_text(json.dumps({k: v for k, v in rec.items() if k != "digests"}))
    with pytest.raises(
        UserError, match=r"changed since .* \(resized legal.jsonl\)"
    ):  # recorded before digests
        prepare_data(out, 400, **quiet)


def test_prepare_data_refuses_another_vocabulary_and_shards_of_another_tokenizer(corpus, tmp_path):
    """A rerun in the same --out with another preset's vocabulary trained on the old tokenizer without a
    word; a tokenizer trained again left the shards of the old one in use beside out-of-domain shards of
    the new one."""
    from elmforest.launch.prepare import prepare_data

    out = tmp_path / "out"
    quiet = dict(corpus=corpus, ood=None, progress=False, log=lambda *a: None, tokenizer_sample_bytes=20_000)
    first = prepare_data(out, 300, **quiet).shards
    assert prepare_data(out, 300, **quiet).shards.fingerprint == first.fingerprint  # the same: reused
    with pytest.raises(UserError, match=r"a 300-token BPE.*asks for 400 tokens.*another --out"):
        prepare_data(out, 400, **quiet)
    shutil.rmtree(out / "tokenizer")
    with pytest.raises(UserError, match="tokenized with another tokenizer"):
        prepare_data(out, 400, **quiet)


def test_a_folder_written_again_in_one_process_is_read_again(corpus, tmp_path):
    """The ICP orderer's tokenizer and the held-out check's `.txt` probe were cached by path alone: a
    staging folder (the same path for one output and process) rebuilt with another tokenizer decoded
    with the first, and a folder that gained .txt files still had none."""
    from elmforest.cluster import icp_shards
    from elmforest.data.bpe import train_bpe_on
    from elmforest.data.tokenizer import save_tokenizer
    from elmforest.eval import held_out

    stage = tmp_path / "stage"
    for vocab in (300, 420):
        tok, _ = train_bpe_on(corpus, vocab_size=vocab, bytes_per_domain=20_000)
        save_tokenizer(tok, stage)
        assert icp_shards._tokenizer(str(stage)).get_vocab_size() == tok.vocab_size
    folder = tmp_path / "texts"
    folder.mkdir()
    assert not held_out._has_txt(folder)
    (folder / "a.txt").write_text("x")
    assert held_out._has_txt(folder)


def test_an_output_folder_inside_the_data_is_refused_before_anything_is_read(dup_corpus, tmp_path):
    """`quickstart --data c --out c/run`: its own files were read as documents, so it failed after
    training (clusters) and every rerun found the corpus changed, whatever the advice."""
    from elmforest.launch.prepare import prepare_data

    data = tmp_path / "c"
    shutil.copytree(dup_corpus, data) if Path(dup_corpus).is_dir() else data.mkdir()
    quiet = dict(corpus=data, ood=None, progress=False, log=lambda *a: None)
    with pytest.raises(UserError, match="is inside the data"):
        prepare_data(data / "run", 400, **quiet)
    with pytest.raises(UserError, match="is inside the data"):  # a source with its format named
        prepare_data(data / "run", 400, **{**quiet, "corpus": f"auto:{data}"})
    assert not (data / "run").exists()
    # a hidden folder is not read as documents (nor listed as the corpus's): accepted
    assert prepare_data(data / ".runs" / "qs", 400, **quiet).shards is not None


def test_prepare_data_with_domains_learns_and_tokenizes_only_those(corpus, tmp_path):
    """A study or quickstart of some of a corpus's domains trained its tokenizer on all of them and
    tokenized every one into its shards: text no run of it trains or is scored on shaped its vocabulary
    (and the tokenizing of a large corpus cost its whole size). Reference: the same two domains alone in
    a corpus of their own give the same tokenizer and the same shards, byte for byte."""
    from elmforest.launch.prepare import SOURCE_FILE, prepare_data

    every = sorted(p.stem for p in corpus.glob("*.jsonl"))
    pick = every[:2]
    alone = tmp_path / "alone"
    alone.mkdir()
    for d in pick:
        shutil.copy(corpus / f"{d}.jsonl", alone / f"{d}.jsonl")
    quiet = dict(ood=None, progress=False, log=lambda *a: None, tokenizer_sample_bytes=20_000)
    got = prepare_data(tmp_path / "out", 300, pick, corpus, **quiet)
    ref = prepare_data(tmp_path / "ref", 300, None, alone, **quiet)
    assert got.names == pick and got.shards.domains == pick and got.corpus_domains == every
    assert got.shards.tokenizer_fingerprint == ref.shards.tokenizer_fingerprint
    for d in pick:
        for split in ("train", "valid", "test"):
            assert _files(got.shards, d, split) == _files(ref.shards, d, split)
    assert Shards(got.shards.root).index["only_domains"] == pick
    assert prepare_data(tmp_path / "out", 300, pick[::-1], corpus, **quiet).names == pick[::-1]  # reused
    with pytest.raises(UserError, match=rf"made of {pick[0]}, {pick[1]}; this run asks for every domain"):
        prepare_data(tmp_path / "out", 300, None, corpus, **quiet)
    with pytest.raises(UserError, match=rf"this run asks for {every[0]}, {every[2]}.*another --out"):
        prepare_data(tmp_path / "out", 300, [every[0], every[2]], corpus, **quiet)
    # nothing trained from them yet (a run refused for a domain, rerun without it): made again
    other = prepare_data(tmp_path / "out", 300, [every[0], every[2]], corpus, **quiet, unused=True)
    assert other.shards.domains == [every[0], every[2]] and other.names == [every[0], every[2]]
    assert other.shards.tokenizer_fingerprint != got.shards.tokenizer_fingerprint
    # a dir made of every domain refuses a subset too (not only the other way round)
    prepare_data(tmp_path / "all", 300, None, corpus, **quiet)
    with pytest.raises(UserError, match="made of every domain of the corpus; this run asks for"):
        prepare_data(tmp_path / "all", 300, pick, corpus, **quiet)
    # an output made before the tokenizer recorded its domains (of every domain) is reused as it was
    old = prepare_data(tmp_path / "old", 300, None, corpus, **quiet)
    rec = json.loads((tmp_path / "old" / SOURCE_FILE).read_text())
    del rec["tokenizer"]["domains"], rec["corpus_domains"]
    (tmp_path / "old" / SOURCE_FILE).write_text(json.dumps(rec))
    again = prepare_data(tmp_path / "old", 300, pick, corpus, **quiet)
    assert again.names == pick and again.shards.domains == every == again.corpus_domains
    assert again.shards.fingerprint == old.shards.fingerprint
    # ... also where it was cut before its shards: they hold every domain, as its tokenizer learnt
    shutil.rmtree(tmp_path / "old" / "shards")
    again = prepare_data(tmp_path / "old", 300, pick, corpus, **quiet)
    assert again.shards.domains == every and again.shards.fingerprint == old.shards.fingerprint
    # every domain named is no list at all; a name the corpus lacks is said so, not "another list"
    assert prepare_data(tmp_path / "ref", 300, None, alone, **quiet).names == pick
    assert prepare_data(tmp_path / "ref", 300, pick, alone, **quiet).names == pick
    rec = json.loads((tmp_path / "ref" / SOURCE_FILE).read_text())
    rec["tokenizer"]["domains"] = pick  # every domain recorded as a list: the same as none
    (tmp_path / "ref" / SOURCE_FILE).write_text(json.dumps(rec))
    assert prepare_data(tmp_path / "ref", 300, None, alone, **quiet).names == pick
    with pytest.raises(
        UserError, match=rf"domains \['nope'\]: no training documents .*\(its domains with some: {pick[0]}"
    ):
        prepare_data(tmp_path / "out", 300, [pick[0], "nope"], corpus, **quiet)


def test_shards_of_domains_the_data_lacks_are_refused_with_its_domains(corpus, tokenizer_dir, tmp_path):
    from elmforest.data.shards_build import build_shards

    with pytest.raises(UserError, match=r"no documents of nope \(its domains: .*legal"):
        build_shards(corpus, tokenizer_dir, tmp_path / "s", progress=False, only_domains=["nope"])


def test_a_domain_typo_binds_nothing_and_no_domain_at_all_is_named(corpus, tmp_path):
    """The tokenizer records its domains, so one saved for a typo's list would refuse the corrected run."""
    from elmforest.data.documents import DataError
    from elmforest.launch.prepare import prepare_data

    quiet = dict(ood=None, progress=False, log=lambda *a: None, tokenizer_sample_bytes=20_000)
    with pytest.raises(UserError, match=r"domains \['Legal'\]: no training documents .*legal"):
        prepare_data(tmp_path / "out", 300, ["code", "Legal"], corpus, **quiet)
    assert not (tmp_path / "out" / "tokenizer").exists()
    assert prepare_data(tmp_path / "out", 300, ["code", "legal"], corpus, **quiet).names == ["code", "legal"]
    with pytest.raises(DataError, match=r"no training-split documents of nope.*with some: .*legal"):
        prepare_data(tmp_path / "other", 300, ["nope"], corpus, **quiet)
