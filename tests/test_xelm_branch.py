"""X-ELM's branching for a domain added later: from the most similar expert, the choice in the lineage."""

from __future__ import annotations

import shutil

import pytest

from elmforest.data.shards import Shards
from elmforest.forest import btm
from elmforest.forest.manifest import Forest
from elmforest.forest.nearest import nearest_expert
from elmforest.utils.errors import UserError


def test_nearest_by_posterior_branches_from_the_expert_that_knows_the_domain(
    forest_dir, shards_dir, tmp_path
):
    root = tmp_path / "f"
    shutil.copytree(forest_dir, root, symlinks=True)
    f, sh = Forest.load(root), Shards(shards_dir)
    entry = btm.train_expert(
        f, sh, "legal", name="legal2", branch="nearest", overrides=["train.steps=2"], progress=False
    )
    scores = entry["nearest"]["posterior"]
    assert entry["nearest"]["by"] == "posterior" and max(scores, key=scores.get) == "legal"
    assert entry["parents"] == [{"name": "legal", "weight": 1.0}] and entry["branch"] == "nearest"
    assert sum(scores.values()) == pytest.approx(1.0)
    # damaged, then restored: from the source its run branched from, not scored again (it was among the
    # candidates, and its broken weights stopped the restore)
    w = next((root / "experts" / "legal2").glob("*.safetensors"))
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    again = btm.train_expert(
        Forest.load(root),
        sh,
        "legal",
        name="legal2",
        branch="nearest",
        overrides=["train.steps=2"],
        progress=False,
    )
    assert again["parents"] == entry["parents"] and again["nearest"] == entry["nearest"]
    assert Forest.load(root).intact("legal2", deep=True) is None
    with pytest.raises(UserError, match="ISO 639-3"):  # these domains are not languages
        nearest_expert(f, sh, "legal", "typology")
    with pytest.raises(UserError, match="unknown nearest measure"):
        nearest_expert(f, sh, "legal", "vibes")


def test_nearest_by_typology_picks_the_closest_language(forest_dir, shards_dir, tmp_path):
    pytest.importorskip("lang2vec", reason="lang2vec not installed (pip install -e '.[xelm]')")
    src = Forest.load(forest_dir)
    f = Forest.init(tmp_path / "langs")
    for n, lang in zip(src.names, ["deu", "jpn", "ara"], strict=False):
        f.add(src.expert_dir(n), lang, [lang])
    best, why = nearest_expert(f, Shards(shards_dir), "nld", "typology")
    assert best == "deu" and why["by"] == "typology"
    assert why["syntax_distance"]["deu"] < min(why["syntax_distance"]["jpn"], why["syntax_distance"]["ara"])


def test_typology_finds_a_group_experts_languages_in_the_shards_it_trained_on(
    forest_dir, shards_dir, tmp_path, capsys
):
    """X-ELM adds a language later from shards that hold it alone: the old experts' groups are named by
    the domain map of the shards they trained on, not by the new language's shards."""
    pytest.importorskip("lang2vec", reason="lang2vec not installed (pip install -e '.[xelm]')")
    import json

    src = Forest.load(forest_dir)
    grouped = tmp_path / "grouped"
    grouped.mkdir()
    langs = {"group0": ["deu", "nld"], "group1": ["jpn", "kor"]}
    index = {"domain_map": {lang: g for g, ls in langs.items() for lang in ls}}
    (grouped / "index.json").write_text(json.dumps(index))
    f = Forest.init(tmp_path / "langs")
    for n, g in zip(src.names, langs, strict=False):
        f.add(src.expert_dir(n), g, [g])
        rec = f.expert_dir(g) / "elmforest_data.json"
        rec.write_text(json.dumps({**json.loads(rec.read_text()), "shards": str(grouped)}))
    best, why = nearest_expert(f, Shards(shards_dir), "afr", "typology")  # these shards map nothing
    assert best == "group0", why
    # a language a group trained on already: said, and branched from that group (was: from the others,
    # its own group measured without it)
    best, why = nearest_expert(f, Shards(shards_dir), "kor", "typology")
    assert best == "group1" and why["trained_on_it"] == ["group1"]
    assert "kor is already one of the languages of expert(s) group1" in capsys.readouterr().err
    assert nearest_expert(f, Shards(shards_dir), "ko", "typology")[0] == "group1"  # compared as languages
    # the same forest with its groups' languages nowhere to be found: a UserError naming the group
    (grouped / "index.json").write_text(json.dumps({}))
    with pytest.raises(UserError, match="group 'group0'.*language 'group0'.*nearest:posterior"):
        nearest_expert(f, Shards(shards_dir), "afr", "typology")


def test_forest_expert_mix_trains_one_expert_on_several_domains(forest_dir, shards_dir, tmp_path):
    """`forest expert --mix`: X-ELM's expert for a group of languages, each still a domain of its own."""
    from elmforest.cli import main
    from elmforest.config import RunConfig

    root = tmp_path / "f"
    shutil.copytree(forest_dir, root, symlinks=True)
    sh = Shards(shards_dir)
    a, b = sh.domains[:2]
    args = ["forest", "expert", "--forest", str(root), "--shards", str(shards_dir), "--no-progress"]
    assert main([*args, "--domain", a, "--name", "pair", "--mix", f"{a},{b}", "--set", "train.steps=14"]) == 0
    f = Forest.load(root)
    assert f.expert("pair")["domains"] == [a, b]
    assert f.expert("pair")["fingerprints"]["data"] == btm.data_fingerprint(sh, [a, b])
    cfg = RunConfig.from_dict(
        __import__("json").loads((root / "runs" / "pair" / "run_config.json").read_text())
    )
    assert cfg.data.domains == [a, b]
    # --domain must be one of the mix, and each domain listed once
    assert main([*args, "--domain", sh.domains[2], "--name", "bad", "--mix", f"{a},{b}"]) == 2
    with pytest.raises(UserError, match="each domain once"):
        btm.train_expert(f, sh, a, name="bad", mix=[a, a], progress=False)


def test_nearest_among_limits_the_candidates_and_their_posterior(forest_dir, shards_dir):
    f, sh = Forest.load(forest_dir), Shards(shards_dir)
    others = [n for n in f.names if n != "legal"]
    best, why = nearest_expert(f, sh, "legal", "posterior", among=others)
    assert best in others and set(why["posterior"]) == set(others)
    assert sum(why["posterior"].values()) == pytest.approx(1.0)  # renormalised over the candidates
    with pytest.raises(UserError, match="no expert\\(s\\) \\['nope'\\]"):
        nearest_expert(f, sh, "legal", "posterior", among=["nope"])


def test_flexolmo_owners_left_out_of_nearest_are_named(forest_dir, shards_dir, tmp_path, capsys):
    """`--branch nearest` left FlexOlmo owners (2-expert MoEs) out of its candidates without a word,
    where `--branch mixture` refuses them."""
    import json

    root = tmp_path / "f"
    shutil.copytree(forest_dir, root, symlinks=True)
    m = json.loads((root / "forest.json").read_text())
    m["experts"][0]["branch"] = "flexolmo"
    owner = m["experts"][0]["name"]
    (root / "forest.json").write_text(json.dumps(m))
    best, why = nearest_expert(Forest.load(root), Shards(shards_dir), "legal", "posterior", prior_batches=2)
    assert owner not in why["posterior"] and best != owner
    assert f"note: FlexOlmo owner(s) {owner} are not candidates" in capsys.readouterr().err
