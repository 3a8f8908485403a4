"""X-ELM language grouping: the merging against a brute-force reference, cosine distances against a
plain loop, the real lang2vec syntax vectors (read directly, checked against lang2vec's own reader),
the artifact, the relabelling of language domains into group domains at shard build, the errors."""

from __future__ import annotations

import json
import os
import sys
import types
from itertools import combinations

import numpy as np
import pytest

from elmforest.cli import main
from elmforest.cluster import language_groupings as G
from elmforest.cluster import languages as L
from elmforest.utils.errors import AlreadyExists, NotFound, UserError

LANGS14 = "deu fra spa ita por rus pol jpn zho kor ara ell heb tur".split()
has_lang2vec = pytest.mark.skipif(
    not L._installed(), reason='lang2vec not installed (pip install -e ".[xelm]")'
)


def brute_force_groups(x: np.ndarray, k: int) -> set[frozenset[int]]:
    """Independent O(n^3)-and-worse reference: recompute every pair of groups' mean member distance
    from the raw vectors at every step, merge the smallest."""
    n = len(x)

    def cos_d(i, j):
        return 1 - float(np.dot(x[i], x[j]) / (np.linalg.norm(x[i]) * np.linalg.norm(x[j])))

    groups = [[i] for i in range(n)]
    while len(groups) > k:
        best = None
        for a, b in combinations(range(len(groups)), 2):
            d = np.mean([cos_d(i, j) for i in groups[a] for j in groups[b]])
            if best is None or d < best[0]:
                best = (d, a, b)
        _, a, b = best
        groups[a] = groups[a] + groups[b]
        del groups[b]
    return {frozenset(g) for g in groups}


@pytest.mark.parametrize("seed", range(4))
def test_merging_matches_a_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(11, 5)) + rng.normal(size=(3, 5))[rng.integers(0, 3, 11)] * 2  # some structure
    names = [f"l{i:02d}" for i in range(len(x))]
    merges = L.agglomerate(L.cosine_distances(x), names)
    assert len(merges) == len(x) - 1
    for k in range(1, len(x) + 1):
        got = {frozenset(int(c[1:]) for c in g) for g in L.cut(names, merges, k)}
        assert got == brute_force_groups(x, k), k
    # merge heights agree with scipy's average linkage on the same cosine distances
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import pdist

    ref = linkage(pdist(x, "cosine"), method="average")[:, 2]
    np.testing.assert_allclose(sorted(m[2] for m in merges), sorted(ref), atol=1e-9)


def test_cosine_distances_against_a_plain_loop():
    x = np.random.default_rng(1).normal(size=(7, 9))
    d = L.cosine_distances(x)
    for i in range(7):
        for j in range(7):
            ref = 0.0 if i == j else 1 - x[i] @ x[j] / np.sqrt((x[i] @ x[i]) * (x[j] @ x[j]))
            assert d[i, j] == pytest.approx(ref, abs=1e-12)
    assert (d == d.T).all()


def test_a_size_cap_balances_and_refuses_what_it_cannot_reach():
    x = np.array([[1, 0], [1, 0.01], [1, 0.5], [0, 1]], dtype=float)
    names = ["a", "b", "c", "d"]
    d = L.cosine_distances(x)
    assert L.cut(names, L.agglomerate(d, names), 2) == [("a", "b", "c"), ("d",)]
    capped = L.agglomerate(d, names, max_size=2)
    assert L.cut(names, capped, 2) == [("a", "b"), ("c", "d")]
    with pytest.raises(UserError, match="cap stops the merging at 2 groups"):
        L.cut(names, capped, 1)


@has_lang2vec
def test_our_reader_gives_lang2vecs_own_vectors(monkeypatch):
    """lang2vec.lang2vec needs pkg_resources (gone from current setuptools): a stand-in for it, here only."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        stub = types.ModuleType("pkg_resources")
        stub.resource_filename = lambda pkg, rel: os.path.join(
            os.path.dirname(sys.modules[pkg].__file__), rel
        )
        monkeypatch.setitem(sys.modules, "pkg_resources", stub)
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        from lang2vec import lang2vec as l2v

        ref = l2v.get_features(["deu", "jpn", "ara"], "syntax_knn", header=True)
    t = L.load_features("syntax_knn")
    assert list(t.features) == [f.replace(" ", "_") for f in ref["CODE"]] and len(t.features) == 103
    for c in ("deu", "jpn", "ara"):
        np.testing.assert_array_equal(t.row(c), np.array(ref[c], dtype=float))


@has_lang2vec
def test_real_syntax_features_group_related_languages(tmp_path):
    groupings, aliases = L.group_languages(["de", "nld", "eng", "jpn", "KOR"], [2])
    assert aliases == {"de": "deu", "KOR": "kor"}  # as given: a corpus's domain may be spelled so
    g = groupings[2]
    assert g["groups"] == {"group0": ["deu", "eng", "nld"], "group1": ["jpn", "kor"]}
    d = g["distances"]
    within = max(d[a][b] for a, b in combinations(["deu", "nld", "eng"], 2))
    assert within < min(d[a][b] for a in ["deu", "nld", "eng"] for b in ["jpn", "kor"])
    assert G.nearest_group("afr", g)[0] == "group0" and G.nearest_group("jpn", g)[0] == "group1"
    # the 14-language set: every k is a cut of one merge sequence, and the order given changes nothing
    many, _ = L.group_languages(LANGS14, [2, 4, 8])
    shuffled, _ = L.group_languages(list(reversed(LANGS14)), [2, 4, 8])
    assert many == shuffled
    for small, big in ((8, 4), (4, 2)):
        for members in many[small]["groups"].values():
            assert any(set(members) <= set(m) for m in many[big]["groups"].values())
    for k in (2, 4, 8):
        assert len(many[k]["groups"]) == k
        assert sorted(c for m in many[k]["groups"].values() for c in m) == sorted(LANGS14)


@has_lang2vec
def test_artifact_round_trip_and_the_cli(tmp_path, capsys):
    assert (
        main(
            ["cluster", "languages", "--langs", ",".join(LANGS14), "--k", "2,4", "--out", str(tmp_path / "g")]
        )
        == 0
    )
    assert sorted(os.listdir(tmp_path / "g")) == ["k2.json", "k4.json"]
    g4 = G.load_grouping(tmp_path / "g" / "k4.json")
    assert g4 == L.group_languages(LANGS14, [4])[0][4]
    assert g4["method"] == "lang2vec-syntax" and g4["features"] == "syntax_knn" and g4["k"] == 4
    assert g4["lang2vec_version"] == "1.1.2" and g4["languages"] == sorted(LANGS14)
    dm = G.domain_map(g4)
    assert set(dm) == set(LANGS14) and set(dm.values()) == set(g4["groups"])
    from elmforest.data.domain_map import load_domain_map

    assert load_domain_map(tmp_path / "g" / "k4.json") == dm
    with pytest.raises(NotFound, match="a directory, not a JSON file"):
        load_domain_map(tmp_path / "g")
    # languages given by two-letter codes: a corpus whose domains are `de`, `ja` maps through the aliases
    two = tmp_path / "two.json"
    assert main(["cluster", "languages", "--langs", "de,ja,fr", "--k", "2", "--out", str(two)]) == 0
    dm2 = load_domain_map(two)
    assert (
        dm2["de"] == dm2["deu"]
        and dm2["ja"] == dm2["jpn"]
        and set(dm2) == {"de", "deu", "ja", "jpn", "fr", "fra"}
    )
    assert dm2.unused({"de", "jpn"}) == ["fr", "fra"]  # one spelling of a language is enough
    upper = tmp_path / "upper.json"  # an upper-case code is the language too, under the name given
    assert main(["cluster", "languages", "--langs", "DEU,jpn", "--k", "2", "--out", str(upper)]) == 0
    assert load_domain_map(upper)["DEU"] == load_domain_map(upper)["deu"]
    assert (
        main(["cluster", "languages", "--langs", "DE,jpn", "--k", "2", "--out", str(upper), "--overwrite"])
        == 0
    )
    assert json.loads(upper.read_text())["aliases"] == {"DE": "deu", "de": "deu"}  # either spelling
    # an alias and its code in one group are one language to the typology
    g = {"groups": {"a": ["deu", "de"], "b": ["jpn"]}}
    assert G.nearest_group("nld", g)[0] == "a"
    one = tmp_path / "one.json"
    assert main(["cluster", "languages", "--langs", "deu,jpn", "--k", "2", "--out", str(one)]) == 0
    assert json.loads(one.read_text())["groups"] == {"group0": ["deu"], "group1": ["jpn"]}
    with pytest.raises(AlreadyExists, match="--overwrite"):
        G.write_groupings(L.group_languages(["deu", "jpn"], [2])[0], one)
    # a folder rewritten for other languages: its other k's files of the earlier run are said
    folder = ["cluster", "languages", "--out", str(tmp_path / "gs")]
    assert main([*folder, "--langs", "deu,fra,jpn", "--k", "2,3"]) == 0
    capsys.readouterr()
    assert (
        main([*folder, "--langs", "deu,fra,jpn", "--k", "2", "--overwrite"]) == 0
    )  # same languages: nothing
    assert "note" not in capsys.readouterr().err
    assert main([*folder, "--langs", "deu,jpn", "--k", "2", "--overwrite"]) == 0
    assert "k3.json (from an earlier run) group other languages" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["cluster", "languages", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 7970 and "deu\tde,ger" in listed and "ell\tel,gre" in listed


@has_lang2vec
@pytest.mark.parametrize(
    "codes, ks, match",
    [
        (["deu", "xyz"], [2], "'xyz' is not one of lang2vec's 7970 ISO 639-3 codes.*--list"),
        (
            ["deu", "qq"],
            [2],
            r"'qq': lang2vec has no ISO 639-3 code for this two-letter code \(close: sq \(sqi\), qu",
        ),
        (["deu", "de"], [1], "language deu given twice: 'deu' and 'de' are both deu"),
        (["de", "deu"], [1], "'de' and 'deu' are both deu"),  # the user's spelling named (was 'deu' (as deu))
        (["fra", "fra"], [1], "language 'fra' given twice"),
        (["gre", "ell"], [1], "'gre' and 'ell' are both ell"),  # gre was lang2vec's own entry, not Greek
        (["alb", "sqi"], [1], "'alb' and 'sqi' are both sqi"),
        (["deu", "fra"], [3], "k = 3 but only 2 languages"),
        (["deu"], [1], "at least 2 languages"),
    ],
)
def test_bad_input_is_refused_by_name(codes, ks, match):
    with pytest.raises(UserError, match=match):
        L.group_languages(codes, ks)


@has_lang2vec
def test_feature_sets_with_missing_values_are_refused_for_those_languages():
    with pytest.raises(UserError, match="syntax_wals leaves values missing for deu"):
        L.group_languages(["deu", "fra"], [1], features="syntax_wals")
    with pytest.raises(UserError, match="unknown feature set"):
        L.load_features("phonology_knn")


def test_a_missing_extra_names_it(monkeypatch, tmp_path):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(UserError, match=r'pip install -e "\.\[xelm\]"'):
        L.group_languages(["deu", "fra"], [1])
    twice = {"groups": {"a": ["de"], "b": ["deu"]}, "aliases": {"de": "deu"}}  # one language, two spellings
    for bad, match in (
        ({"groups": {"a": ["x"], "b": ["x"]}}, "'x' is in both"),
        ({"k": 2}, "no `groups`"),
        (twice, "'deu' is in both 'a' \\(as 'de'\\) and 'b'"),
    ):
        (tmp_path / "g.json").write_text(json.dumps(bad))
        with pytest.raises(UserError, match=match):
            G.load_grouping(tmp_path / "g.json")


def test_shards_built_with_a_domain_map_hold_the_groups(corpus, tokenizer_dir, shards_dir, tmp_path, capsys):
    """Relabelling happens as the shards are built: same documents, same splits (by id), group domains."""
    from elmforest.data.shards import Shards
    from elmforest.data.shards_build import build_shards
    from elmforest.data.splits import SplitSpec

    grouping = tmp_path / "k2.json"
    grouping.write_text(json.dumps({"groups": {"group0": ["scripture"], "group1": ["code", "legal"]}}))
    out = tmp_path / "grouped"
    assert (
        main(["shards", "build", "--data", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out),
              "--valid-frac", "0.1", "--test-frac", "0.1", "--domain-map", str(grouping), "--no-progress"])
        == 0
    )  # fmt: skip
    by_lang, by_group = Shards(shards_dir), Shards(out)
    assert sorted(by_group.domains) == ["group0", "group1"]
    assert by_group.index["domain_map"] == {"code": "group1", "legal": "group1", "scripture": "group0"}
    for split in ("train", "valid", "test"):
        for field in ("documents", "tokens", "bytes"):
            langs = by_lang.index["domains"]
            assert by_group.index["domains"]["group1"]["splits"][split][field] == sum(
                langs[d]["splits"][split][field] for d in ("code", "legal")
            )
            assert (
                by_group.index["domains"]["group0"]["splits"][split][field]
                == langs["scripture"]["splits"][split][field]
            )
    with pytest.raises(UserError, match="domain 'legal' .* is in no group"):
        build_shards(
            corpus, tokenizer_dir, tmp_path / "x", domain_map={"code": "g", "scripture": "g"}, progress=False
        )
    with pytest.raises(UserError, match="give one"):
        build_shards(
            corpus, tokenizer_dir, tmp_path / "y", SplitSpec(), random_domains=2, domain_map={"a": "b"}
        )
    capsys.readouterr()
    extra = {"code": "g", "legal": "g", "scripture": "g", "xxx": "g"}  # a domain the data does not hold
    build_shards(corpus, tokenizer_dir, tmp_path / "z", domain_map=extra, progress=False)
    assert "the domain map names xxx, which the data does not hold" in capsys.readouterr().err


def test_an_inline_domain_map_is_told_to_be_a_file():
    from elmforest.data.domain_map import load_domain_map
    from elmforest.utils.errors import NotFound

    with pytest.raises(NotFound, match="inline JSON is not read: write it to a file"):
        load_domain_map('{"deu": "g0"}', role="--domain-map")


@has_lang2vec
def test_the_xelm_quickstart_raises_its_group_cap_where_it_blocks_a_k(capsys):
    """Capped at half the languages, average linkage stops at 3 pairs of ces deu fin jpn rus tur, none
    of which may join another: k = 2 was refused after the corpus, tokenizer and shards were built,
    naming a flag the quickstart does not take."""
    from elmforest.xelm.quickstart import _groupings

    langs = ["ces", "deu", "fin", "jpn", "rus", "tur"]
    with pytest.raises(UserError, match="group size cap"):
        L.group_languages(langs, [2], max_group_size=3)
    g = _groupings(langs, [2])
    assert sorted(len(m) for m in g[2]["groups"].values()) == [2, 4]
    assert "groups hold up to 4" in capsys.readouterr().out
    capsys.readouterr()
    twelve = ["ces", "deu", "fin", "fra", "ita", "jpn", "pol", "rus", "spa", "tur", "ukr", "zho"]
    _groupings(twelve, [2, 4])  # the quickstart's languages: half is enough, nothing said
    assert "note" not in capsys.readouterr().out


def test_a_domain_map_or_sweep_grouping_with_one_language_in_two_groups_is_refused(
    corpus, tokenizer_dir, tmp_path, capsys
):
    """`shards build --domain-map` and `sweep --groups` read a grouping as a plain domain map: `de` in one
    group and `deu` in the other built shards with German in both, said only as 'the map names de'."""
    from elmforest.launch.groupings import load_grouping as sweep_grouping

    twice = tmp_path / "twice.json"
    twice.write_text(
        json.dumps({"groups": {"a": ["de", "fra"], "b": ["deu", "jpn"]}, "aliases": {"de": "deu"}})
    )
    argv = ["shards", "build", "--data", str(corpus), "--tokenizer", str(tokenizer_dir), "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "s"), "--domain-map", str(twice)]) == 2
    assert "'deu' is in both 'a' (as 'de') and 'b'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    with pytest.raises(UserError, match="'deu' is in both"):
        sweep_grouping(twice)
    plain = tmp_path / "plain.json"  # a plain {domain: group} map is no grouping: as before
    plain.write_text(json.dumps({"code": "a", "legal": "a", "scripture": "b"}))
    assert sweep_grouping(plain) == {"a": ["code", "legal"], "b": ["scripture"]}
    named = tmp_path / "named.json"  # domains that are not language codes keep their case: two domains
    named.write_text(json.dumps({"groups": {"a": ["News"], "b": ["news"]}}))
    assert sweep_grouping(named) == {"a": ["News"], "b": ["news"]}


@has_lang2vec
def test_a_hand_written_grouping_with_one_language_spelled_two_ways_is_refused(tmp_path):
    """`de` in one group and `deu` in another loaded, and the language then sat in both."""
    (tmp_path / "g.json").write_text(json.dumps({"groups": {"g0": ["de", "fra"], "g1": ["deu", "jpn"]}}))
    with pytest.raises(UserError, match="'deu' is in both 'g0' \\(as 'de'\\) and 'g1'"):
        G.load_grouping(tmp_path / "g.json")
    (tmp_path / "g.json").write_text(json.dumps({"groups": {"g0": ["de", "fra"], "g1": ["jpn"]}}))
    assert G.load_grouping(tmp_path / "g.json")["groups"]["g0"] == ["de", "fra"]
