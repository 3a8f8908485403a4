"""Evaluation, sweep and c-BTM inputs a user tried that crashed, returned stale numbers or silently
changed the forest: each is now refused naming the problem, or said."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from elmforest.cli import main
from elmforest.config import RunConfig
from elmforest.data.shards import Shards
from elmforest.forest.manifest import Forest
from elmforest.launch.sweep import sweep
from elmforest.utils.errors import UserError


def test_crossdoc_with_no_qualifying_document_says_so(forest_dir, shards_dir, tmp_path, capsys):
    model = Forest.load(forest_dir).expert_dir(Forest.load(forest_dir).names[0])
    argv = ["eval-crossdoc", "--data", str(shards_dir), "--model", str(model), "--tasks", "second_half"]
    argv += ["--max-docs", "3", "--seq-len", "2048", "--no-progress"]  # no test document is that long
    assert main(argv) == 0
    assert "second_half: no test document qualifies" in capsys.readouterr().out
    (tmp_path / "j").mkdir()
    assert main([*argv, "--json", str(tmp_path / "j")]) == 2  # refused before the evaluation
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "opts",
    [
        ["--mode", "cluster", "--route", "segment:abc"],
        ["--mode", "cluster", "--route", "segment:\u00b2"],  # a digit to isdigit(), not to int()
        ["--mode", "topk", "--select", "prefix:0"],
    ],
)
def test_a_malformed_window_width_is_refused(cluster_forest, shards_dir, capsys, opts):
    assert main(["eval", "--forest", str(cluster_forest), "--data", str(shards_dir), *opts]) == 2
    err = capsys.readouterr().err
    assert "W must be a whole number of tokens >= 1" in err and "Traceback" not in err


def test_a_sweep_rerun_on_other_shards_is_refused(shards_dir, tmp_path):
    out = tmp_path / "sw"
    out.mkdir()
    (out / "sweep.json").write_text(
        json.dumps({"shards": "/elsewhere", "shards_fingerprint": "0123456789abcdef"})
    )
    with pytest.raises(UserError, match="a sweep on other shards needs another --out"):
        sweep(shards_dir, out, RunConfig(), lrs=[1e-3, 2e-3, 4e-3, 8e-3], arm="dense")
    assert not (out / "dense").exists()


def test_a_trained_cluster_forest_keeps_its_clusterer(cluster_forest, corpus, tmp_path):
    from elmforest.cluster.assign import fit_clusterer

    f = tmp_path / "f"
    shutil.copytree(cluster_forest, f, symlinks=True)
    other = tmp_path / "other"
    fit_clusterer(corpus, 2, other, sample_docs=300, dims=8, min_df=1)
    with pytest.raises(UserError, match="a new clusterer needs a new forest"):
        Forest.load(f).set_clusterer(other)
    assert Forest.load(f).data["clusterer"]["k"] == 3
    Forest.load(f).set_clusterer(f / "clusterer")  # the same clusterer again is fine
    same = tmp_path / "same"
    shutil.copytree(f / "clusterer", same)
    (same / "NOTES.txt").write_text("fitted on the train split")  # a note beside it changes nothing
    Forest.load(f).set_clusterer(same)


def test_forest_eval_on_raw_data_prints_what_it_read_and_the_routing_fallback(
    cluster_forest, corpus, tmp_path, capsys
):
    argv = ["eval", "--forest", str(cluster_forest), "--data", str(corpus), "--mode", "cluster"]
    assert main([*argv, "--k", "1", "--max-bytes", "4000", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "documents from" in out.split("forest cluster")[0]  # the read counts come before the table
    share = float(out.split("no known word of their document yet): ")[1].split("%")[0])
    assert 0 < share < 50
    # routing alone weighs the experts: no prior or weighting is reported as if it applied
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["prior"] is None and res["weighting"] is None
    for v in res["domains"].values():
        assert "prior" not in v and "prior_max" not in v and v["prior_source"] == "none: c-BTM routing"
    # c-BTM's own routing points: more tokens keep the size fallback, and the JSON says how it routed
    once = tmp_path / "once.json"
    assert main([*argv, "--k", "1", "--max-bytes", "4000", "--no-reroute", "--json", str(once)]) == 2
    assert "--router-context document" in capsys.readouterr().err  # every token by the sizes otherwise
    doc = tmp_path / "doc.json"
    assert (
        main([*argv, "--k", "1", "--max-bytes", "4000", "--router-context", "document", "--json", str(doc)])
        == 0
    )
    argv += ["--k", "1", "--max-bytes", "4000", "--router-context", "document"]
    assert main([*argv, "--no-reroute", "--json", str(once)]) == 0
    assert res["reroute"] is True and json.loads(once.read_text())["reroute"] is False
    assert json.loads(once.read_text())["fallback_share"] > json.loads(doc.read_text())["fallback_share"]
    assert json.loads(doc.read_text())["router_context"] == "document" and res["router_context"] == "window"


def test_no_reroute_outside_cluster_routing_is_refused(cluster_forest, shards_dir, capsys):
    argv = ["eval", "--forest", str(cluster_forest), "--data", str(shards_dir), "--no-reroute"]
    assert main(argv) == 2  # --mode ensemble, the default: no routing points to change
    assert "--no-reroute is c-BTM routing's" in capsys.readouterr().err
    assert main([*argv, "--mode", "cluster", "--reset", "window"]) == 2  # no document starts to re-route
    assert "--reset window routes at the grid only" in capsys.readouterr().err


def test_cluster_fit_on_a_split_uses_the_given_fractions(corpus, tmp_path, capsys):
    from elmforest.cluster.assign import fit_clusterer
    from elmforest.data.readers import ReadStats, iter_documents
    from elmforest.data.splits import SplitSpec

    spec = SplitSpec(0.3, 0.3)
    ids = [d.id for d in iter_documents(corpus, ReadStats())]
    train = sum(spec.assign(i) == "train" for i in ids)
    assert 0 < train < sum(SplitSpec().assign(i) == "train" for i in ids)
    c = fit_clusterer(corpus, 2, tmp_path / "c", 10**6, dims=8, min_df=1, split="train", split_spec=spec)
    assert c.meta["fit"]["documents"] == train
    assert c.meta["fit"]["split_spec"] == {"valid_frac": 0.3, "test_frac": 0.3, "by_file": False}
    with pytest.raises(UserError, match="split must be train, valid or test"):
        fit_clusterer(corpus, 2, tmp_path / "d", split="training")
    argv = ["cluster", "fit", "--data", str(corpus), "--k", "2", "--out", str(tmp_path / "e")]
    assert main([*argv, "--split", "training"]) == 2
    assert "training" in capsys.readouterr().err and not (tmp_path / "e").exists()
    argv += ["--split", "valid", "--valid-frac", "0.5", "--dims", "8", "--min-df", "1"]
    assert main(argv) == 0
    valid = sum(SplitSpec(0.5, 0.05).assign(i) == "valid" for i in ids)
    assert f"on {valid} sampled documents" in capsys.readouterr().out
    # fitting again into it would silently change the clusters experts and shards were made with
    assert main(argv) == 2 and "holds a clusterer already" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_shards_assigned_by_another_clusterer_are_refused(
    clusterer_dir, corpus, tokenizer_dir, tmp_path, capsys
):
    """Any clusterer of the same k names its clusters cluster0..k-1: shards assigned by another one
    passed, and routing then sent code text to the legal expert."""
    from elmforest.cluster.assign import assign_corpus, fit_clusterer
    from elmforest.data.shards_build import build_shards
    from elmforest.forest.cli import _check_cluster_domains

    assign_corpus(clusterer_dir, corpus, tmp_path / "clusters", progress=False, workers=1)
    sh = build_shards(tmp_path / "clusters", tokenizer_dir, tmp_path / "shards", progress=False).out
    other = tmp_path / "other"
    fit_clusterer(corpus, 3, other, sample_docs=1000, dims=16, min_df=1, seed=5)
    domains = Shards(sh).domains
    with pytest.raises(UserError, match="assigned by another clusterer"):
        _check_cluster_domains(str(other), domains, str(sh))
    _check_cluster_domains(str(clusterer_dir), domains, str(sh))
    shutil.copytree(clusterer_dir, tmp_path / "copy")  # a copy (a forest keeps one) is the same clusterer
    _check_cluster_domains(str(tmp_path / "copy"), domains, str(sh))
    # the assign output moved or deleted: the index keeps the clusterer's checksum (unchecked before)
    fingerprint = Shards(sh).fingerprint
    shutil.rmtree(tmp_path / "clusters")
    with pytest.raises(UserError, match="assigned by another clusterer"):
        _check_cluster_domains(str(other), domains, str(sh))
    _check_cluster_domains(str(clusterer_dir), domains, str(sh))
    index = json.loads((Path(sh) / "index.json").read_text())
    del index["assigned_by"]  # shards of older versions: said, not refused (nothing to check against)
    (Path(sh) / "index.json").write_text(json.dumps(index))
    _check_cluster_domains(str(other), domains, str(sh))
    assert "cannot tell which clusterer assigned its clusters" in capsys.readouterr().err
    assert Shards(sh).fingerprint == fingerprint  # where it came from, not what it holds


def test_a_forest_whose_clusterer_was_replaced_is_refused_and_fsck_names_it(cluster_forest, tmp_path, corpus):
    """A consistent clusterer of the same k copied over the forest's own passed fsck, and routing used its
    centres without a word."""
    from elmforest.cluster.assign import fit_clusterer
    from elmforest.forest.cluster_route import ClusterRouting
    from elmforest.forest.optout import fsck

    f = tmp_path / "f"
    shutil.copytree(cluster_forest, f, symlinks=True)
    forest = Forest.load(f)
    assert forest.data["clusterer"]["sha256"] and fsck(forest)[1] == []
    ClusterRouting(forest, forest.names, 1, 0.1)
    other = tmp_path / "other"
    fit_clusterer(corpus, 3, other, sample_docs=1000, dims=16, min_df=1, seed=5)
    shutil.rmtree(f / "clusterer")
    shutil.copytree(other, f / "clusterer")
    with pytest.raises(UserError, match="not the clusterer its experts were trained on"):
        ClusterRouting(forest, forest.names, 1, 0.1)
    assert any("not the clusterer its experts were trained on" in w for w in fsck(forest)[1])


def test_forest_train_with_a_clusterer_refuses_shards_of_other_domains(
    clusterer_dir, cluster_forest, shards_dir, tmp_path, capsys
):
    argv = [
        "forest",
        "train",
        "--forest",
        str(tmp_path / "f"),
        "--shards",
        str(shards_dir),
        "--set",
        "train.steps=2",
    ]
    assert main([*argv, "--clusterer", str(clusterer_dir)]) == 2
    err = capsys.readouterr().err
    assert "are not the clusterer's clusters (cluster0..cluster2)" in err
    n = len(Shards(shards_dir).domains)
    assert f"{n} domain(s) (" in err and (", ...)" in err) == (n > 5)  # how many, not five of them unsaid
    from elmforest.forest.cli import _check_cluster_domains

    many = [f"d{i}" for i in range(7)]
    with pytest.raises(
        UserError, match=r"7 domain\(s\) \(d0, d1, d2, d3, d4, \.\.\.\) are not the clusterer's"
    ):
        _check_cluster_domains(str(clusterer_dir), many, str(shards_dir))
    assert not (tmp_path / "f").exists()  # refused before anything was created
    g = tmp_path / "g"
    shutil.copytree(cluster_forest, g, symlinks=True)  # a c-BTM forest trained further: its own clusterer
    assert (
        main(["forest", "train", "--forest", str(g), "--shards", str(shards_dir), "--set", "train.steps=2"])
        == 2
    )
    assert "are not the clusterer's clusters" in capsys.readouterr().err
    # and one phase at a time: `forest expert` / `forest seed` trained on them, never to be routed to
    before = (g / "forest.json").read_text()
    one = ["--forest", str(g), "--shards", str(shards_dir)]
    assert main(["forest", "expert", *one, "--domain", Shards(shards_dir).domains[0]]) == 2
    assert "are not the clusterer's clusters" in capsys.readouterr().err
    assert main(["forest", "seed", *one, "--set", "train.steps=2"]) == 2
    assert "are not the clusterer's clusters" in capsys.readouterr().err
    assert (g / "forest.json").read_text() == before


def test_cluster_assign_names_empty_clusters(clusterer_dir, tmp_path, capsys):
    src = tmp_path / "one.jsonl"
    src.write_text("".join(json.dumps({"text": "license warranty software"}) + "\n" for _ in range(6)))
    argv = ["cluster", "assign", "--clusterer", str(clusterer_dir), "--data", str(src)]
    assert main([*argv, "--out", str(tmp_path / "a"), "--no-progress", "--workers", "1"]) == 0
    rep = json.loads((tmp_path / "a" / "report.meta.json").read_text())
    assert sorted(rep["sizes"]) == [0, 0, 6] and len(rep["empty"]) == 2
    assert rep["max_over_min"] == 1.0  # over the clusters that got documents
    err = capsys.readouterr().err
    assert f"warning: {', '.join(rep['empty'])} got no documents" in err


def test_held_out_documents_cut_from_the_training_corpus_at_other_fractions_are_refused(
    forest_dir, corpus, tokenizer_dir, shards_dir, tmp_path, capsys
):
    """Shards rebuilt from the experts' own corpus at other fractions held 37 of 119 training documents
    in `test`, and eval scored them as held out."""
    from elmforest.data.shards_build import build_shards
    from elmforest.data.splits import SplitSpec
    from elmforest.eval.bpb import evaluate
    from elmforest.eval.held_out import check_held_out

    other = tmp_path / "other"
    build_shards(corpus, tokenizer_dir, other, SplitSpec(0.3, 0.3), progress=False)
    f = Forest.load(forest_dir)
    model = f.expert_dir(f.names[0])
    said = "some of the documents read were trained or tuned on"
    for argv, advice in (
        (["eval", "--forest", forest_dir, "--data", other], "--valid-frac 0.1 --test-frac 0.1"),
        (["eval", "--model", model, "--data", other, "--split", "valid"], "--valid-frac 0.1 --test-frac 0.1"),
        (["eval", "--model", model, "--data", corpus, "--split-fractions", "0.3,0.3"], "(e.g. 0.1,0.1)"),
        # part of the corpus (one file of it), and the same file read with an option, are the corpus
        (["eval", "--model", model, "--data", corpus / "code.jsonl", "--split-fractions", "0.3,0.3"], said),
        (
            [
                "eval",
                "--model",
                model,
                "--data",
                corpus / "code.jsonl",
                "--text-field",
                "body",
                "--split-fractions",
                "0.3,0.3",
            ],
            said,
        ),
    ):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert said in err and advice in err, err
    # the training split, fractions inside what the model held out, and other corpora pass
    check_held_out(model, corpus, SplitSpec(0.3, 0.3), "train", other)
    check_held_out(model, corpus, SplitSpec(0.1, 0.1), "test", other)
    check_held_out(model, corpus, SplitSpec(0.05, 0.05), "test", other)  # inside its test and held-out
    code = corpus / "code.jsonl"
    check_held_out(model, code, SplitSpec(0.15, 0.05), "valid", other, prior=True)  # valid + test 0.2 <= 0.2
    for split, prior in (("valid", False), ("test", True)):  # valid + test 0.25: past its held-out 0.2
        with pytest.raises(UserError, match="its valid split reaches 0.25, past the 0.2 the model held out"):
            check_held_out(model, code, SplitSpec(0.2, 0.05), split, other, prior=prior)
    check_held_out(model, code, SplitSpec(0.2, 0.05), "test", other)  # test alone: inside its test 0.1
    with pytest.raises(UserError, match="its test split reaches 0.15 of the id hash, past the model's 0.1"):
        check_held_out(model, code, SplitSpec(0.0, 0.15), "test", other)  # its valid documents (tuned on)
    # read in another format, the same files number their documents otherwise: other ids, other splits
    with pytest.raises(
        UserError, match="read as json, but .* read as a plain path: its documents get other ids"
    ):
        check_held_out(model, f"json:{code}", SplitSpec(0.1, 0.1), "test", other)
    check_held_out(model, tmp_path, SplitSpec(0.3, 0.3), "test", other)
    # shards built from several sources record a list (the quickstart's --ood shards)
    with pytest.raises(UserError, match=said):
        check_held_out(model, [str(tmp_path), str(corpus)], SplitSpec(0.3, 0.3), "test", other)
    check_held_out(model, [str(tmp_path)], SplitSpec(0.3, 0.3), "test", other)
    # no valid documents at these fractions: the cached prior turned uniform without a word
    assert (
        main(["eval", "--forest", str(forest_dir), "--data", str(corpus), "--split-fractions", "0,0.1"]) == 2
    )
    assert "no valid documents to read the cached prior on" in capsys.readouterr().err
    # a shards directory's splits are fixed: --split-fractions there was ignored without a word
    for who in (["--model", model], ["--forest", forest_dir]):
        assert main(["eval", *map(str, who), "--data", str(shards_dir), "--split-fractions", "0.1,0.1"]) == 2
        assert "--split-fractions applies to raw data" in capsys.readouterr().err
    assert evaluate(model, shards_dir, max_bytes=2000, progress=False)["split"] == "test"


def _fake_model(root: Path, source: Path, split=(0.1, 0.1)) -> Path:
    """A model directory whose recorded training shards were built from `source` at `split`."""
    (root / "shards").mkdir(parents=True)
    (root / "shards" / "index.json").write_text(json.dumps({"source": str(source)}))
    (root / "m").mkdir()
    rec = {"shards": str(root / "shards"), "split": {"valid_frac": split[0], "test_frac": split[1]}}
    (root / "m" / "elmforest_data.json").write_text(json.dumps(rec))
    return root / "m"


def test_txt_documents_read_from_another_folder_of_the_training_corpus_are_refused(tmp_path):
    """A .txt document is named by its path under the folder given (`tiny/d0.txt` from the corpus,
    `d0.txt` from corpus/tiny), so read from another folder it is hashed into another split, whatever
    the fractions: the model's training documents were scored as test."""
    from elmforest.data.splits import SplitSpec
    from elmforest.eval.held_out import check_held_out

    corpus = tmp_path / "corpus"
    (corpus / "tiny").mkdir(parents=True)
    (corpus / "tiny" / "d0.txt").write_text("a document")
    (corpus / "prose.jsonl").write_text('{"text": "x"}\n')
    model = _fake_model(tmp_path, corpus)
    same = SplitSpec(0.1, 0.1)
    check_held_out(model, corpus, same, "test", corpus)  # the training read itself
    check_held_out(model, corpus / "prose.jsonl", same, "test", "p")  # JSON lines keep their ids
    for data in (corpus / "tiny", corpus / "tiny" / "d0.txt", tmp_path):
        with pytest.raises(UserError, match=r"\.txt documents .* get other names"):
            check_held_out(model, data, same, "test", data)
    # a glob stands for its folder: a file it matched is the training corpus
    globbed = _fake_model(tmp_path / "g", f"json:{corpus}/*.jsonl")
    check_held_out(globbed, f"json:{corpus / 'prose.jsonl'}", same, "test", "p")
    with pytest.raises(UserError, match="its test split reaches 0.3"):
        check_held_out(globbed, f"json:{corpus / 'prose.jsonl'}", SplitSpec(0.1, 0.3), "test", "p")


def test_a_forest_of_experts_split_at_different_fractions_reads_the_fractions_all_held_out(tmp_path, capsys):
    """Experts built from shards at 0.1/0.1 and 0.1/0.2: raw data was split at the first expert's
    fractions, then refused for the other, so such a forest could not be evaluated at all."""
    from elmforest.data.splits import SplitSpec
    from elmforest.forest.evaluate_text import held_out_by_all

    a = _fake_model(tmp_path / "a", tmp_path, (0.1, 0.2))
    b = _fake_model(tmp_path / "b", tmp_path, (0.1, 0.1))
    assert held_out_by_all([a, a], None) == SplitSpec(0.1, 0.2)
    assert "different fractions" not in capsys.readouterr().err
    assert held_out_by_all([a, b], None) == SplitSpec(0.1, 0.1)  # inside a's 0.3 and b's 0.2
    assert "split at valid 0.1, test 0.1, inside what each held out" in capsys.readouterr().err
    assert held_out_by_all([a, b], SplitSpec(0.05, 0.05)) == SplitSpec(0.05, 0.05)
    # the test split inside every model's test, whatever the order (valid+test sums tie here)
    c, d = (
        _fake_model(tmp_path / "c", tmp_path, (0.05, 0.05)),
        _fake_model(tmp_path / "d", tmp_path, (0.02, 0.08)),
    )
    assert held_out_by_all([c, d], None) == held_out_by_all([d, c], None) == SplitSpec(0.05, 0.05)
    capsys.readouterr()
    (ext := tmp_path / "hub").mkdir()  # a checkpoint from elsewhere: its split is unknown, not 0.05/0.05
    assert held_out_by_all([a, ext], None) == SplitSpec(0.1, 0.2)
    assert "different fractions" not in capsys.readouterr().err


def test_the_training_corpus_copied_elsewhere_without_ids_is_refused_by_its_text(
    forest_dir, corpus, tmp_path, capsys
):
    """The same documents as another file (no ids: numbered by that file) get other splits; its "test"
    split was mostly the model's training documents and was scored as held out (a new user's Parquet
    copy: 18 of 19)."""
    import json

    from elmforest.data.splits import SplitSpec
    from elmforest.eval.held_out import check_held_out

    f = Forest.load(forest_dir)
    model = f.expert_dir(f.names[0])
    copy = tmp_path / "copy"
    copy.mkdir()
    rows = [json.loads(x) for x in (corpus / "code.jsonl").read_text().splitlines()]
    (copy / "code.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    argv = ["eval", "--model", str(model), "--data", str(copy)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "10 of the 10 test documents read are documents" in err, err
    assert "trained or was tuned on (the same text, in its train or valid split" in err, err
    # another corpus of the same domain name passes; a few shared documents are a note
    other = tmp_path / "other"
    other.mkdir()
    fresh = [{"text": f"fresh document number {i} " * 5} for i in range(len(rows))]
    (other / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fresh))
    check_held_out(model, other, SplitSpec(0.1, 0.1), "test", "other")
    assert "note" not in capsys.readouterr().err
    spec = SplitSpec(0.1, 0.1)
    test = [i for i in range(len(fresh)) if spec.assign(f"code:{i + 1}") == "test"]  # ids: name:line
    trained = next(r for r in rows if spec.assign(r["id"]) == "train")
    fresh[test[0]] = {"text": trained["text"]}
    (other / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fresh))
    check_held_out(model, other, spec, "test", "other")
    assert f"note: other: 1 of the {len(test)} test documents read are documents" in capsys.readouterr().err


def test_the_leakage_checks_cache_keys_hold_the_whole_split(tmp_path):
    """The check's per-process cache was keyed by the split fractions alone: a second model whose corpus
    was split by file got the first one's split of the same corpus."""
    from elmforest.data.splits import SplitSpec
    from elmforest.eval import leakage

    src = tmp_path / "c" / "a.jsonl"
    src.parent.mkdir()
    rows = [{"id": f"file{i // 20}#{i % 20}", "domain": "a", "text": f"doc {i} text"} for i in range(400)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    index, allowed = {"source": str(src.parent)}, frozenset({"a"})
    by_doc, by_file = SplitSpec(0.2, 0.2, by_file=False), SplitSpec(0.2, 0.2, by_file=True)
    leakage._SEEN.clear()
    first = dict(leakage._unique_texts(index, by_doc, allowed, {}))
    second = leakage._unique_texts(index, by_file, allowed, {})
    want = {leakage.text_key(r["text"]): by_file.assign(r["id"]) for r in rows}
    assert second == want and first != want
    assert leakage._unique_texts(index, by_file, allowed, {"a": "b"}) == {}  # another map: no domain a


@pytest.mark.parametrize(
    "name, text",
    [
        ("elmforest_data.json", '{"shards": "x", "split": {"bogus": 1}}'),
        ("elmforest_data.json", '{"shards": "x"}'),
        ("elmforest_data.json", '{"split": [1, 2]}'),
        ("elmforest_run.json", '{"data": 3}'),
    ],
)
def test_a_malformed_training_record_beside_a_model_is_named(tmp_path, name, text):
    from elmforest.data.splits import SplitSpec
    from elmforest.eval.held_out import check_held_out, training_split_spec

    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=name):
        training_split_spec(tmp_path)
    if name == "elmforest_data.json":  # also where shards are scored, or fractions are given
        with pytest.raises(UserError, match=name):
            check_held_out(tmp_path, "somewhere", SplitSpec(), "test", "somewhere")


def test_the_domains_a_model_read_follow_its_training_state_and_merges_read_all(tmp_path):
    """An expert records the seed's state as `train.init_checkpoint`, not `model.init_from`: its
    training was taken as its own domain alone (the seed mixed every one); a merge carries its first
    expert's run file, so an 8-expert MoE was taken as trained on one domain. The leak check then
    looked up the scored documents among too few training documents."""
    from elmforest.eval.leakage import model_domains

    def run(d, domains, **start):
        d.mkdir()
        cfg = {
            "data": {"domains": domains},
            "model": {"init_from": start.get("init_from")},
            "train": {"init_checkpoint": start.get("init_checkpoint")},
        }
        (d / "elmforest_run.json").write_text(json.dumps(cfg))
        return cfg

    state = tmp_path / "seed_state"
    state.mkdir()
    (state / "state.json").write_text(
        json.dumps({"step": 3, "config": {"data": {"domains": ["a", "b", "c"]}}})
    )
    run(tmp_path / "expert", ["a"], init_checkpoint=str(state))
    assert model_domains(tmp_path / "expert") == {"a", "b", "c"}
    run(tmp_path / "alone", ["b"])
    assert model_domains(tmp_path / "alone") == {"b"}
    run(tmp_path / "from_model", ["c"], init_from=str(tmp_path / "alone"))
    assert model_domains(tmp_path / "from_model") == {"b", "c"}
    for record in ("elmforest_moe.json", "elmforest_average.json", "elmforest_flexolmo.json"):
        merged = tmp_path / record
        run(merged, ["a"])  # the first expert's run file, copied with the merge
        (merged / record).write_text("{}")
        assert model_domains(merged) is None  # the record names no experts: every domain
    # the seed mixed a and b; an expert added later on d: the merges read a, b and d, not c
    run(tmp_path / "added", ["d"], init_checkpoint=str(state))
    state_ab = tmp_path / "seed_ab"
    state_ab.mkdir()
    (state_ab / "state.json").write_text(json.dumps({"config": {"data": {"domains": ["a", "b"]}}}))
    run(tmp_path / "ea", ["a"], init_checkpoint=str(state_ab))
    run(tmp_path / "ed", ["d"], init_checkpoint=str(state_ab))
    avg = tmp_path / "avg"
    run(avg, ["a"], init_checkpoint=str(state_ab))
    (avg / "elmforest_average.json").write_text(
        json.dumps({"experts": [str(tmp_path / "ea"), str(tmp_path / "ed")]})
    )
    assert model_domains(avg) == {"a", "b", "d"}
    moe = tmp_path / "moe"
    run(moe, ["a"], init_checkpoint=str(state_ab))
    (moe / "elmforest_moe.json").write_text(json.dumps({"experts": [{"domains": ["a"]}, {"domains": ["d"]}]}))
    assert model_domains(moe) == {"a", "b", "d"}
