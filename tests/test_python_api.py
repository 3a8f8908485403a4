"""The Python API's arguments that the CLI's parser types for its users: a caller passing a string
where a list belongs, a number as a string, or a path where a loaded object belongs gets an error
naming the argument, not a result built from the string's characters or a traceback deep inside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from elmforest.utils.errors import UserError


def test_icp_refuses_one_string_and_an_embedder_that_returns_other_rows():
    pytest.importorskip("faiss")
    from elmforest.cluster.icp import icp_plan

    with pytest.raises(UserError, match="data must be a list, got one str"):
        icp_plan("the quick brown fox jumps over the lazy dog")  # was 43 one-character documents

    class Rows:
        def __init__(self, n, pair=True):
            self.n, self.pair = n, pair

        def embed(self, texts):
            z = np.eye(self.n, 4)
            return (z, np.ones(self.n, dtype=bool)) if self.pair else z

    texts = ["a b c", "d e f", "a b d", "x y z", "g h i"]
    for n in (3, 7):  # 3: two documents were missing from the order; 7: an IndexError
        with pytest.raises(UserError, match=f"shape \\({n}, 4\\).*for 5 texts"):
            icp_plan(texts, embedder=Rows(n))
    with pytest.raises(UserError, match="must return \\(vectors"):
        icp_plan(texts, embedder=Rows(5, pair=False))
    assert sorted(icp_plan(texts, embedder=Rows(5)).order.tolist()) == [0, 1, 2, 3, 4]


def test_prepare_data_names_a_mistyped_argument(tmp_path):
    from elmforest.launch.prepare import prepare_data

    with pytest.raises(UserError, match="prepare_data: vocab_size must be an integer, got '512'"):
        prepare_data(tmp_path, "512")
    with pytest.raises(UserError, match="order_seed must be an integer"):
        prepare_data(tmp_path, 512, order="random", order_seed="1")
    with pytest.raises(UserError, match=r"domains must be a list, got one str \('legal'\); give \['legal'\]"):
        prepare_data(tmp_path, 512, domains="legal")  # was the domains l, e, g, a, l
    with pytest.raises(UserError, match="ood must be a list"):
        prepare_data(tmp_path, 512, ood=str(tmp_path / "ood"))
    with pytest.raises(UserError, match="no such file or directory"):  # a str out: was a TypeError
        prepare_data(str(tmp_path / "out"), 512, corpus=str(tmp_path / "missing"))
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_moe_training_from_python_names_a_mistyped_argument(tmp_path):
    from elmforest.merge.moe_train import finetune_moe, train_router

    with pytest.raises(UserError, match="train_router: steps must be an integer, got '2'"):
        train_router(tmp_path / "moe", tmp_path / "shards", steps="2")
    with pytest.raises(UserError, match="finetune_moe: overrides must be a list"):
        finetune_moe(tmp_path / "moe", tmp_path / "shards", steps=2, overrides="train.seed=3")
    with pytest.raises(UserError, match="finetune_moe: batch_size must be an integer, got True"):
        finetune_moe(tmp_path / "moe", tmp_path / "shards", steps=2, batch_size=True)


def test_language_helpers_want_a_loaded_grouping_and_lists():
    from elmforest.cluster.language_groupings import domain_map, nearest_group
    from elmforest.cluster.languages import group_languages

    grouping = {"groups": {"g0": ["deu", "nld"], "g1": ["fra", "spa"]}}
    assert domain_map(grouping) == {"deu": "g0", "nld": "g0", "fra": "g1", "spa": "g1"}
    for bad in ("groups/k4.json", Path("groups/k4.json"), {}):
        with pytest.raises(UserError, match="expected a language grouping"):
            domain_map(bad)
        with pytest.raises(UserError, match="expected a language grouping"):
            nearest_group("ukr", bad)
    with pytest.raises(UserError, match="one language code"):
        nearest_group(["ukr"], grouping)
    with pytest.raises(UserError, match="codes must be a list"):
        group_languages("deu,fra,spa", [2])


def test_names_that_differ_only_in_case_are_refused_before_training(tmp_path):
    """`Legal` and `legal` (or an expert `Dense` beside the dense baseline's `runs/dense`) were two
    folders on Linux and one on macOS or Windows, where a copied forest lost one of them."""
    from elmforest.forest.plan import check_expert_names

    check_expert_names(["legal", "code"])
    for names, twin in ((["legal", "Legal"], "legal"), (["Dense", "code"], "dense"), (["SEED"], "seed")):
        with pytest.raises(UserError, match=f"differs from {twin!r} only in case"):
            check_expert_names(names)


def test_generate_refuses_a_repeated_empty_or_string_expert_list_and_a_string_prior(forest_dir):
    """experts=['legal', 'legal', ...] ran legal twice in the mixture, [] ran every expert, 'legal' was
    read as experts 'l', 'e', ...; prior='cached' (the CLI's value) and a non-text prompt were tracebacks."""
    from elmforest.forest.generate import generate

    f = str(forest_dir)
    for bad, match in (
        ({"experts": ["code", "code"]}, "experts named more than once: code"),
        ({"experts": []}, "experts is an empty list"),
        ({"experts": "code"}, "experts"),
        ({"prior": "cached"}, r"a dict \{expert: weight\}"),
        ({"max_new_tokens": "2"}, "max_new_tokens"),
        ({"prompt": None}, "prompt must be text"),
    ):
        with pytest.raises(UserError, match=match):
            generate(f, **{"prompt": "x", **bad})


def test_xelm_quickstart_and_prepare_data_refuse_strings_empty_lists_and_bad_keys_before_work(tmp_path):
    """languages='deu' was read as languages 'd', 'e', 'u'; expert_lrs={"4": lr} (the run record's
    keys) was looked up as nothing; domains=[] built every domain; vocab_size=0 announced its tokenizer
    and left a file before the refusal."""
    from elmforest.launch.prepare import prepare_data
    from elmforest.xelm.quickstart import quickstart_xelm

    out = tmp_path / "x"
    with pytest.raises(UserError, match="languages"):
        quickstart_xelm(out=out, preset="tiny", languages="deu")
    with pytest.raises(UserError, match="ks"):
        quickstart_xelm(out=out, preset="tiny", ks=4)
    with pytest.raises(UserError, match=r"expert_lrs: key\(s\) \['4'\]"):
        quickstart_xelm(out=out, preset="tiny", ks=[4], expert_lrs={"4": 1e-3})
    with pytest.raises(UserError, match="domains is an empty list"):
        prepare_data(tmp_path / "p", 512, domains=[])
    with pytest.raises(UserError, match="vocab_size 0"):
        prepare_data(tmp_path / "p", 0)
    assert not out.exists() and not (tmp_path / "p").exists()
