"""c-BTM's command-line pieces on the inputs a new user gave them: small samples, identical or
very long documents, held-out documents in a balanced assignment, a cap at an exact integer."""

import json
import math
import random

import numpy as np
import pytest
from conftest import DOMAIN_WORDS, make_tiny_encoder

from elmforest.cli import main
from elmforest.cluster.assign import assign_corpus, fit_clusterer, sample_texts
from elmforest.cluster.clusterer import Clusterer
from elmforest.data.domain_map import load_domain_map
from elmforest.data.readers import iter_documents
from elmforest.data.splits import SplitSpec
from elmforest.launch.groupings import load_grouping
from elmforest.utils.errors import NotFound, UserError


def _write(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for i, (domain, text) in enumerate(docs):
            f.write(json.dumps({"id": f"d{i}", "domain": domain, "text": text}) + "\n")
    return path


def _docs(n_by_domain: dict[str, int], seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for domain, n in n_by_domain.items():
        out += [(domain, " ".join(rng.choice(DOMAIN_WORDS[domain]) for _ in range(30))) for _ in range(n)]
    rng.shuffle(out)
    return out


def test_fewer_sampled_documents_than_dims_and_identical_documents_fit(tmp_path):
    """30 sampled documents and the default 100 dims failed with "inconsistent shapes"; identical
    documents wrote NaN (not JSON) into clusterer.json."""
    data = _write(tmp_path / "small.jsonl", _docs({"code": 10, "legal": 10, "scripture": 10}))
    c = fit_clusterer(data, 3, tmp_path / "c", dims=100, min_df=1)
    assert c.dims == 29 and c.components.shape == (29, len(c.terms)) and c.centres.shape == (3, 29)
    again = Clusterer.load(tmp_path / "c")
    texts = [d.text for d in iter_documents(data)]
    assert np.array_equal(again.assign(texts)[0], c.assign(texts)[0])
    same = _write(tmp_path / "same.jsonl", [("code", "def return self import class")] * 12)
    fit_clusterer(same, 2, tmp_path / "s", min_df=1)

    def no_nan(x):
        raise AssertionError(f"{x} in clusterer.json")

    info = json.loads((tmp_path / "s" / "clusterer.json").read_text(), parse_constant=no_nan)
    assert info["meta"]["fit"]["explained_variance"] is None


def test_too_few_vectorisable_documents_are_named_and_long_documents_weigh_their_whole_size(tmp_path):
    stop = _write(tmp_path / "stop.jsonl", [("code", "the and of")] * 6 + [("code", "def class")] * 2)
    with pytest.raises(UserError, match="only 2 of 8 sampled documents have a word"):
        fit_clusterer(stop, 3, tmp_path / "c", min_df=1)
    # the sample keeps each document's first characters, but its bytes weigh what it holds
    long = _write(tmp_path / "long.jsonl", [("code", "é" * 50), ("code", "ab")])
    sizes: list[int] = []
    texts, _ = sample_texts(long, 10, max_chars=10, sizes=sizes)
    assert sorted(len(t) for t in texts) == [2, 10] and sorted(sizes) == [2, 100]


def test_balanced_assign_caps_the_training_split_and_routes_held_out_documents_to_the_nearest(
    clusterer_dir, tmp_path
):
    """Held-out documents competed for the cap with training documents: the test set moved training
    documents between experts. Now the cap is over the training split; the rest go to the nearest."""
    docs = _docs({"code": 200, "legal": 60, "scripture": 60}, seed=1)
    spec = SplitSpec(0.15, 0.15)
    full = _write(tmp_path / "full.jsonl", docs)
    rep = assign_corpus(
        clusterer_dir,
        full,
        tmp_path / "a",
        balanced=True,
        slack=0.1,
        split_spec=spec,
        progress=False,
        workers=1,
    )
    c = Clusterer.load(clusterer_dir)
    label = {d.id: int(d.domain.removeprefix("cluster")) for d in iter_documents(tmp_path / "a")}
    train = [d for d in iter_documents(full) if spec.assign(d.id) == "train"]
    held = [d for d in iter_documents(full) if spec.assign(d.id) != "train"]
    assert held and train
    counts = np.bincount([label[d.id] for d in train], minlength=3)
    assert rep["train_sizes"] == counts.tolist()
    assert counts.max() <= math.ceil(len(train) / 3 * 1.1) and counts.max() < 200 * 0.7  # capped
    z, ok = c.embed([d.text for d in held])
    assert ok.all() and [label[d.id] for d in held] == c.scores(z).argmax(1).tolist()
    # the training documents land where they land without the held-out ones beside them
    only = _write(tmp_path / "train.jsonl", [(d.domain, d.text) for d in train])
    ids = {f"d{i}": d.id for i, d in enumerate(train)}
    assign_corpus(
        clusterer_dir,
        only,
        tmp_path / "b",
        balanced=True,
        slack=0.1,
        split_spec=SplitSpec(0, 0),
        progress=False,
    )
    alone = {ids[d.id]: int(d.domain.removeprefix("cluster")) for d in iter_documents(tmp_path / "b")}
    assert alone == {d.id: label[d.id] for d in train}


def test_the_cap_at_an_exact_integer_is_that_integer(clusterer_dir, tmp_path):
    """300 documents / 3 * 1.1 is 110.00000000000001 in floating point: the cap was 111."""
    data = _write(tmp_path / "d.jsonl", _docs({"code": 200, "legal": 50, "scripture": 50}, seed=2))
    rep = assign_corpus(
        clusterer_dir,
        data,
        tmp_path / "a",
        balanced=True,
        slack=0.1,
        split_spec=SplitSpec(0, 0),
        progress=False,
    )
    assert rep["train_sizes"] == rep["sizes"] and max(rep["sizes"]) == 110


def test_an_embedding_clusterer_works_from_any_folder_and_refuses_tfidf_options(
    corpus, tokenizer_dir, tmp_path, monkeypatch, capsys
):
    make_tiny_encoder(tokenizer_dir, tmp_path / "encoder")
    monkeypatch.chdir(tmp_path)
    fit_clusterer(corpus, 3, tmp_path / "c", sample_docs=60, embeddings="encoder")  # a relative path
    monkeypatch.chdir(tmp_path / "c")
    assert Clusterer.load(tmp_path / "c").embedder.model_dir == (tmp_path / "encoder").resolve()
    rc = main(["cluster", "fit", "--data", str(corpus), "--k", "3", "--out", str(tmp_path / "d")]
              + ["--embeddings", str(tmp_path / "encoder"), "--dims", "5"])  # fmt: skip
    assert rc == 2 and "--dims and --min-df" in capsys.readouterr().err


def test_skipped_records_are_said_and_domain_maps_refuse_a_key_given_twice(clusterer_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    _write(data, _docs({"code": 20, "legal": 20}))
    with open(data, "a") as f:
        f.write(json.dumps({"id": "e", "text": ""}) + "\n")
    assert main(["cluster", "fit", "--data", str(data), "--k", "2", "--out", str(tmp_path / "c")]) == 0
    assert "skipped 1 bad record(s): empty_text=1" in capsys.readouterr().out
    args = ["cluster", "assign", "--clusterer", str(tmp_path / "c"), "--data", str(data)]
    assert main([*args, "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert "skipped 1 bad record(s): empty_text=1" in capsys.readouterr().out
    twice = tmp_path / "map.json"
    twice.write_text('{"deu": "g0", "fra": "g1", "deu": "g1"}')
    with pytest.raises(UserError, match="'deu' is given twice"):
        load_domain_map(twice)
    with pytest.raises(NotFound, match="--groups file .*no such file"):
        load_grouping(tmp_path / "missing.json")


def test_a_causal_lm_is_refused_as_an_encoder_and_a_tokenizer_without_pad_pads_with_eos(
    corpus, tokenizer_dir, tmp_path
):
    """A causal LM's pooled states sit at cosine ~0.99: as --icp-embedder it dropped 163 of 185
    documents as near-duplicates; a tokenizer without a pad token was a transformers traceback."""
    from elmforest.cluster.embedder import ClustererError, SentenceEmbedder

    enc = make_tiny_encoder(tokenizer_dir, tmp_path / "enc")
    cfg = json.loads((enc / "config.json").read_text())
    tok_cfg = json.loads((enc / "tokenizer_config.json").read_text())
    tok_cfg.pop("pad_token")
    (enc / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    texts = [d.text for d in iter_documents(corpus)][:5]
    z, ok = SentenceEmbedder(enc).embed(texts)
    assert ok.all() and np.allclose(np.linalg.norm(z, axis=1), 1)
    (enc / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ClustererError, match="a causal language model .*not a sentence encoder"):
        SentenceEmbedder(enc)
    (enc / "modules.json").write_text("[]")  # a sentence-transformers encoder built on a decoder (gte-Qwen2)
    assert SentenceEmbedder(enc).embed(texts)[1].all()
    import torch  # pickled weights only: refused, never loaded (torch.load, even weights_only, is not run)
    from safetensors.torch import load_file

    torch.save(load_file(enc / "model.safetensors"), enc / "pytorch_model.bin")
    (enc / "model.safetensors").unlink()
    with pytest.raises(UserError, match="pytorch_model.bin: pickled weights are refused"):
        SentenceEmbedder(enc)


def test_the_balanced_split_defaults_to_the_clusterers_fractions_and_a_mismatch_is_refused(
    tmp_path, capsys, tokenizer_dir
):
    data = _write(tmp_path / "d.jsonl", _docs({"code": 60, "legal": 60, "scripture": 60}))
    fit_clusterer(data, 3, tmp_path / "c", min_df=1, split="train", split_spec=SplitSpec(0.2, 0.1))
    rep = assign_corpus(tmp_path / "c", data, tmp_path / "a", balanced=True, progress=False, workers=1)
    assert rep["balanced_split"] == {"split": "train", "valid_frac": 0.2, "test_frac": 0.1, "by_file": False}
    # shards split at other fractions train on documents the cap never balanced: refused, before tokenizing
    from elmforest.data.shards_build import build_shards

    build = ["shards", "build", "--data", str(tmp_path / "a"), "--tokenizer", str(tokenizer_dir)]
    assert main([*build, "--out", str(tmp_path / "sh")]) == 2
    said = "balanced on the training split at valid/test fractions 0.2/0.1"
    assert said in capsys.readouterr().err and not (tmp_path / "sh").exists()
    assert main([*build, "--out", str(tmp_path / "sh"), "--valid-frac", "0.2", "--test-frac", "0.1"]) == 0
    # an evaluation's own shards of the folder (eval --data, a prior) split as it is asked: not refused
    build_shards(tmp_path / "a", tokenizer_dir, tmp_path / "ev", SplitSpec(0, 0), progress=False)
    with pytest.raises(UserError, match="fitted on the training split at valid/test fractions 0.2/0.1"):
        assign_corpus(
            tmp_path / "c", data, tmp_path / "b", balanced=True, split_spec=SplitSpec(), progress=False
        )
    args = [
        "cluster",
        "assign",
        "--clusterer",
        str(tmp_path / "c"),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "e"),
    ]
    assert main([*args, "--valid-frac", "0.2"]) == 2
    assert "they need --balanced" in capsys.readouterr().err
    assert main([*args, "--slack", "0.1"]) == 2  # taken and dropped without a word
    assert "--slack 0.1 loosens the cap of --balanced: it needs --balanced" in capsys.readouterr().err
    fit = [
        "cluster",
        "fit",
        "--data",
        str(data),
        "--k",
        "2",
        "--out",
        str(tmp_path / "f"),
        "--valid-frac",
        "0.2",
    ]
    assert main(fit) == 2 and "they need --split" in capsys.readouterr().err
    assert not (tmp_path / "e").exists() and not (tmp_path / "f").exists()
    # the fraction not given is the clusterer's (the test fraction was 0.05, then refused as a mismatch)
    assert main([*args, "--balanced", "--valid-frac", "0.2"]) == 0
    rep = json.loads((tmp_path / "e" / "report.meta.json").read_text())
    assert rep["balanced_split"] == {"split": "train", "valid_frac": 0.2, "test_frac": 0.1, "by_file": False}


def test_an_output_in_or_at_the_data_it_reads_is_refused(clusterer_dir, tmp_path):
    """`cluster assign --out` inside its --data folder: the second run read the first's cluster files as
    documents (every document twice, NMI against itself); --out the data folder itself replaced the
    corpus (its domain labels lost). Refused before anything is read or written."""
    data = tmp_path / "corpus"
    data.mkdir()
    _write(data / "d.jsonl", _docs({"code": 30, "legal": 30, "scripture": 30}, seed=4))
    before = (data / "d.jsonl").read_bytes()
    for out, said in ((data / "clusters", "inside the data"), (data, "is the data")):
        with pytest.raises(UserError, match=said):
            assign_corpus(clusterer_dir, data, out, progress=False)
        with pytest.raises(UserError, match=said):
            fit_clusterer(data, 2, out, sample_docs=50)
        with pytest.raises(UserError, match=said):  # a reader's spec (--text-field) names the folder too
            assign_corpus(clusterer_dir, f"auto,text=text:{data}", out, progress=False)
    assert sorted(p.name for p in data.iterdir()) == ["d.jsonl"] and (data / "d.jsonl").read_bytes() == before
    rep = assign_corpus(clusterer_dir, data, tmp_path / "a", progress=False)  # beside it: fine
    assert sum(rep["sizes"]) == 90


def test_cluster_fit_takes_its_iteration_limit_and_says_when_it_was_reached(tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", _docs({"code": 60, "legal": 60, "scripture": 60}))
    argv = ["cluster", "fit", "--data", str(data), "--k", "3", "--min-df", "1", "--dims", "8"]
    assert main([*argv, "--out", str(tmp_path / "one"), "--max-iter", "1"]) == 0
    fit = Clusterer.load(tmp_path / "one").meta["fit"]
    out = capsys.readouterr().out
    assert fit["iterations"] == 1 and fit["stopped"] == "limit"  # one step cannot see its labels settle
    assert "1 iterations, the iteration limit (--max-iter)" in out
    assert main([*argv, "--out", str(tmp_path / "many"), "--max-iter", "50"]) == 0
    assert Clusterer.load(tmp_path / "many").meta["fit"]["stopped"] != "limit"
    assert main([*argv, "--out", str(tmp_path / "none"), "--max-iter", "0"]) == 2
