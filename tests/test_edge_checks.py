"""The edges of the refusals added on 2026-12-07 (ICP's duplicate test, the Python API's argument
checks, shards tables, end-of-document ids, manifest counts, case twins, crossdoc's passes): each test
here failed on a mutant of its check that the first tests let through (mutation round 9)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from elmforest.data.shards import Shards
from elmforest.utils.errors import UserError

SAYINGS = [
    "Patience is the key to wisdom and a long happy life",
    "Silence is the fence around wisdom and a long happy life",
    "Rockets reach orbit after launch from the pad",
    "Rockets reach the moon after launch from Florida",
    "Courts hear appeals from lower courts",
]


@pytest.mark.parametrize("kw", [{"dims": 2}, {"max_features": None}], ids=["svd", "no-cap"])
def test_duplicate_test_counts_every_term_on_every_embed_path(kw):
    pytest.importorskip("faiss")
    from elmforest.cluster.icp import icp_plan

    plan = icp_plan(SAYINGS, seed=0, threads=1, **kw)
    assert plan.dropped.tolist() == [] and plan.stats["near_duplicates"] == 0


def test_embedder_rows_and_flags_disagree():
    pytest.importorskip("faiss")
    from elmforest.cluster.icp import icp_plan

    class E:
        def embed(self, texts):
            return np.eye(3, 4), np.ones(len(texts), dtype=bool)

    with pytest.raises(UserError, match=r"shape \(3, 4\).*for 5 texts"):
        icp_plan(["a b", "c d", "e f", "g h", "i j"], embedder=E())


def test_prepare_data_ood_as_a_path(tmp_path):
    from elmforest.launch.prepare import prepare_data

    with pytest.raises(UserError, match=r"ood must be a list, got one PosixPath"):
        prepare_data(tmp_path, 512, ood=tmp_path / "ood")


def test_quoted_item_kept_as_written():
    from elmforest.utils.typed import split_list

    assert split_list("' a ',b", "--domains") == [" a ", "b"]


def test_type_error_message_is_bounded():
    from elmforest.utils.typed import _coerce

    with pytest.raises(UserError) as e:
        _coerce(str, ["x" * 50] * 100_000, ".data.corpus")
    assert len(str(e.value)) < 2_000


@pytest.mark.parametrize("edit", ["swap", "negative", "int32"])
def test_document_table_checks(shards_dir, tmp_path, edit):
    dst = tmp_path / "sh"
    shutil.copytree(shards_dir, dst)
    sh = Shards(dst)
    d = sorted(sh.domains)[0]
    p = dst / sh.index["domains"][d]["folder"] / "train.docs.npy"
    docs = np.load(p)
    assert len(docs) >= 3
    if edit == "swap":
        docs[[0, 1]] = docs[[1, 0]]
    elif edit == "negative":
        docs[0, 1] = -1
    else:
        docs = docs.astype(np.int32)
    np.save(p, docs)
    with pytest.raises(UserError, match="not the document table"):
        Shards(dst).documents(d, "train")


def test_shards_index_eos_outside_vocab(tokenizer_dir, tmp_path):
    from elmforest.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(tokenizer_dir).vocab_size
    d = tmp_path / "t"
    shutil.copytree(tokenizer_dir, d)
    (d / "index.json").write_text(json.dumps({"tokenizer": {"eos_id": vocab + 200}}))
    with pytest.raises(UserError, match=r"index\.json: end-of-document id"):
        load_tokenizer(d)


def test_case_twin_ahead_of_the_replaced_expert(forest_dir, tmp_path):
    from elmforest.forest.manifest import Forest

    shutil.copytree(forest_dir, tmp_path / "f", symlinks=True)
    f = Forest.load(tmp_path / "f")
    name = f.names[0]
    f.data["experts"] = [{**f.expert(name), "name": name.upper()}, *f.data["experts"]]
    f.add(f.expert_dir(name), name, f.expert(name)["domains"], replace=True)


def test_expert_passes_exclude_prior_passes(forest_dir, shards_dir):
    from elmforest.forest.crossdoc import evaluate_forest_crossdoc

    kw = dict(max_docs=1, tasks="second_half", precision="fp32", prior_batches=2)
    cached = evaluate_forest_crossdoc(forest_dir, shards_dir, **kw)
    uniform = evaluate_forest_crossdoc(forest_dir, shards_dir, prior="uniform", **kw)
    assert cached["compute"]["prior_token_passes"] > 0 == uniform["compute"]["prior_token_passes"]
    assert cached["compute"]["expert_token_passes"] == uniform["compute"]["expert_token_passes"]


def test_mean_bpb_string(tmp_path):
    from elmforest.clients.report_data import _results

    r = {"methods": {"dense": {"domains": {"a": {"bpb": 1.0}}, "mean_bpb": "1.0"}}}
    (tmp_path / "results.json").write_text(json.dumps(r))
    with pytest.raises(UserError, match=r"mean_bpb is '1.0', not a number"):
        _results(tmp_path / "results.json")


def test_case_twin_domains_are_said(tokenizer_dir, tmp_path, capsys):
    from elmforest.data.shards_build import build_shards
    from elmforest.data.splits import SplitSpec

    lines = [
        json.dumps({"id": f"{d}{i}", "domain": d, "text": f"coffee and cake number {i} " * 5})
        for d in ("Legal", "legal")
        for i in range(30)
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    build_shards(tmp_path / "c.jsonl", tokenizer_dir, tmp_path / "sh", SplitSpec(0.1, 0.1), progress=False)
    assert "differ only in case" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["ledger-tokens", "seed-flops"])
def test_infinite_counts(forest_dir, tmp_path, where):
    from elmforest.forest.manifest import Forest

    root = tmp_path / "f"
    shutil.copytree(forest_dir, root, symlinks=True)
    m = json.loads((root / "forest.json").read_text())
    if where == "ledger-tokens":
        m["ledger"] = [{"phase": "btx_finetuning", "name": "moe", "tokens": float("inf"), "flops": 1}]
    else:
        m["seed"] = {**m["seed"], "flops": float("inf")}
    (root / "forest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="must be non-negative numbers"):
        Forest.load(root)


def test_the_router_logits_guard_follows_the_transformers_version(monkeypatch):
    import transformers

    from elmforest.train.moe_loss import _softmaxed_router_logits

    for version, softmaxed in (("5.5.4", True), ("5.0.0", True), ("5.6.0", False), ("5.25.0", False)):
        monkeypatch.setattr(transformers, "__version__", version)
        assert _softmaxed_router_logits() is softmaxed
