"""The X-ELM comparison end to end on a tiny synthetic multilingual corpus (preset tiny): language-group
experts trained on their languages mixed, every routing option against a brute-force score, a language
added later without changing any first-round expert, and a language too small to split skipped."""

from __future__ import annotations

import json
import math
import random

import pytest

pytest.importorskip("lang2vec")

from elmforest.data.shards import Shards  # noqa: E402
from elmforest.eval.bpb import evaluate_shards  # noqa: E402
from elmforest.forest.manifest import Forest  # noqa: E402
from elmforest.model.build import load_model  # noqa: E402
from elmforest.utils.errors import UserError  # noqa: E402
from elmforest.utils.io import read_json  # noqa: E402
from elmforest.xelm.evaluate import typology_weights  # noqa: E402
from elmforest.xelm.quickstart import quickstart_xelm  # noqa: E402

SYLLABLES = {
    "deu": ["sch", "ei", "en", "ung", "ich", "ber", "st"],
    "fra": ["ou", "eau", "ai", "le", "es", "tion", "qu"],
    "spa": ["ar", "os", "ña", "ue", "la", "ci", "do"],
    "rus": ["ст", "во", "ни", "ать", "ой", "пр", "ка"],
    "jpn": ["の", "して", "ます", "か", "る", "です", "こ"],
    "por": ["ão", "os", "lh", "nh", "ar", "ei", "do"],
    "ell": ["το", "και", "ει", "ου", "στ", "ια", "πο"],
}


def _corpus(path, docs_per_lang: int = 60, small: str = "ell"):
    path.mkdir()
    for lang, syl in SYLLABLES.items():
        rng = random.Random(lang)
        n = 1 if lang == small else docs_per_lang
        with open(path / f"{lang}.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                words = ["".join(rng.choice(syl) for _ in range(rng.randint(1, 3))) for _ in range(120)]
                f.write(json.dumps({"id": f"{lang}-{i}", "domain": lang, "text": " ".join(words)}) + "\n")
    return path


# the run every test reads (tiny preset, 5 languages kept + one too small, Portuguese added later)
RUN = {
    "preset": "tiny",
    "languages": ["deu", "fra", "spa", "rus", "jpn", "ell"],
    "new_language": "por",
    "ks": (2, 4),
    "progress": False,
    "eval_bytes": 4000,
    "prior_batches": 2,
    "workers": 1,
}


@pytest.fixture(scope="module")
def xelm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("xelm")
    corpus = _corpus(root / "corpus")
    out = root / "out"
    res = quickstart_xelm(out, corpus=corpus, **RUN)
    return out, res


def test_small_language_is_reported_and_skipped(xelm_run):
    out, res = xelm_run
    assert "ell" in res["skipped"] and "too little text" in res["skipped"]["ell"]
    assert "ell" not in res["languages"]
    for k, groups in res["groupings"].items():
        members = sorted(x for g in groups.values() for x in g)
        assert members == sorted(res["languages"]), k  # never merged into a group


def test_group_experts_train_on_their_languages_with_matched_compute(xelm_run):
    out, res = xelm_run
    for k in (2, 4):
        f = Forest.load(out / f"forest-k{k}")
        groups = res["groupings"][k] if k in res["groupings"] else res["groupings"][str(k)]
        for g, members in groups.items():
            assert f.expert(g)["domains"] == members
            cfg = json.loads((out / f"forest-k{k}" / "runs" / g / "run_config.json").read_text())
            assert (
                cfg["data"]["domains"] == members
                and cfg["train"]["batch_size"] == res["plan"]["batch_size"] // k
            )
        # seed + k experts = the dense run's FLOPs (each expert at batch B/k for the second half)
        assert res["compute"]["over_dense"][f"k{k}_ensemble"] == pytest.approx(1.0, rel=0.01)
    # X-ELM's other grouping: 4 balanced tf-idf clusters of the first round's documents, same budget
    [tf_dir] = out.glob("forest-clusters-4*")
    tf = Forest.load(tf_dir)
    assert len(tf.names) == 4 and tf.data.get("clusterer")
    assert "por" not in (out / "clusters-4" / "report.meta.json").read_text()  # added later, not clustered
    assert {"tfidf4_ensemble", "tfidf4_cluster"} <= set(res["methods"])
    assert res["compute"]["over_dense"]["tfidf4_cluster"] == pytest.approx(1.0, rel=0.01)


def test_top1_and_typology_routing_equal_brute_force(xelm_run):
    out, res = xelm_run
    shards = Shards(out / "shards")
    f = Forest.load(out / "forest-k2")
    groups = res["groupings"][2]
    common = {"split": "test", "seq_len": 64, "batch_size": 16, "max_bytes": 4000, "progress": False}
    for g, members in groups.items():
        own = evaluate_shards(load_model(f.expert_dir(g)), shards, domains=members, **common)
        for x in members:
            assert res["methods"]["k2_top1"]["domains"][x]["bpb"] == pytest.approx(
                own["domains"][x]["bpb"], rel=1e-4
            )
    # typology weights: softmax(-d^2/T) of the mean syntax distance to each group's members, by hand
    dist = json.loads((out / "groups" / "k2.json").read_text())["distances"]
    w = typology_weights("deu", groups, dist, 0.1)
    d = {g: sum(dist["deu"][m] for m in ms) / len(ms) for g, ms in groups.items()}
    z = {g: math.exp(-(v**2) / 0.1) for g, v in d.items()}
    assert w == pytest.approx({g: v / sum(z.values()) for g, v in z.items()}, rel=1e-12)
    # the typology mixture, brute force: log of the weighted mean of the experts' probabilities per token
    models = {g: load_model(f.expert_dir(g)) for g in groups}
    tok = shards.tokens("deu", "test")
    n_docs_bytes = res["methods"]["k2_typology"]["domains"]["deu"]
    import torch

    eos = shards.eos_id
    n_tok = n_docs_bytes["tokens"]
    stream = torch.as_tensor(tok[:n_tok].astype("int64"))
    nll = 0.0
    for s in range(0, n_tok, 64):
        chunk = stream[s : s + 64]
        # the evaluator's windows: the token before each (EOS before the first), no overlap
        first = torch.tensor([eos]) if s == 0 else stream[s - 1 : s]
        inp = torch.cat([first, chunk[:-1]])
        lp = torch.stack(
            [torch.log_softmax(models[g](inp[None]).logits[0].float(), -1) for g in groups]
        )  # E, T, V
        tgt = lp[:, torch.arange(len(chunk)), chunk]
        wt = torch.tensor([w[g] for g in groups], dtype=torch.float32)[:, None]
        nll -= torch.logsumexp(tgt + wt.log(), 0).sum().item()
    assert n_docs_bytes["nll_nats"] == pytest.approx(nll, rel=2e-3)


def test_added_language_leaves_first_round_experts_unchanged(xelm_run):
    out, res = xelm_run
    f = Forest.load(out / "forest-k4")
    near = f.expert("por-nearest")
    assert near["domains"] == ["por"] and near["nearest"]["by"] == "typology"
    picks = res["added_language"]["picks"]
    assert near["parents"] == [{"name": picks["typology"]["expert"], "weight": 1.0}]
    assert set(near["nearest"]["syntax_distance"]) == set(res["groupings"][4])  # only the first round's
    assert set(picks["posterior"]["posterior"]) == set(res["groupings"][4])
    assert sum(picks["posterior"]["posterior"].values()) == pytest.approx(1.0)
    assert f.expert("por-seed")["parents"] == [{"name": "seed", "weight": 1.0}]
    # both start a schedule of their own from their weights: they differ in where they start only (the
    # seed's expert continued the seed's half-decayed schedule and its optimizer state)
    cfgs = {n: read_json(f.root / "runs" / n / "run_config.json") for n in ("por-nearest", "por-seed")}
    for c in cfgs.values():
        assert c["train"]["init_checkpoint"] is None
    assert cfgs["por-seed"]["model"]["init_from"] == str(f.seed_dir.resolve())
    assert cfgs["por-nearest"]["model"]["init_from"] == str(
        f.expert_dir(picks["typology"]["expert"]).resolve()
    )
    for c in cfgs.values():
        c["model"].pop("init_from")
    assert cfgs["por-nearest"] == cfgs["por-seed"]
    a = res["added"]
    for x in res["languages"]:
        assert a["k4+nearest_top1"]["domains"][x]["bpb"] == res["methods"]["k4_top1"]["domains"][x]["bpb"]
        assert a["k4+seed_top1"]["domains"][x]["bpb"] == res["methods"]["k4_top1"]["domains"][x]["bpb"]
    assert set(a["dense_continued"]["domains"]) == {*res["languages"], "por"}
    assert any("no forgetting" in line for line in res["findings"])
    assert any("every language" in line for line in res["findings"])
    # the extra compute is the same for the new expert and for the dense LM continued with it
    over = res["compute"]["over_dense"]
    assert over["k4+nearest_ensemble"] - over["k4_ensemble"] == pytest.approx(
        over["dense_continued"] - 1, rel=0.02
    )


def test_rerun_trains_nothing_and_refuses_bad_input(xelm_run, tmp_path):
    out, res = xelm_run
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("forest*/runs/*/summary.json")}
    stamp = json.loads((out / "xelm-settings.json").read_text())
    stamp["seed_config"]["train"]["keep_checkpoints"] = 2  # as outputs made before the default was 0 hold it
    (out / "xelm-settings.json").write_text(json.dumps(stamp))
    quickstart_xelm(
        out,
        corpus=out.parent / "corpus",
        **{**RUN, "overrides": [*RUN.get("overrides", []), "train.keep_checkpoints=2"]},
    )
    again = quickstart_xelm(out, corpus=out.parent / "corpus", **RUN)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert mtimes and not [p for p in out.rglob("summary.json") if (p.parent / "checkpoints").exists()]
    assert again["methods"]["k2_ensemble"]["mean_bpb"] == pytest.approx(
        res["methods"]["k2_ensemble"]["mean_bpb"]
    )
    with pytest.raises(UserError, match="other settings \\(seed_config differ"):  # another seed: refused
        quickstart_xelm(out, corpus=out.parent / "corpus", **{**RUN, "overrides": ["train.seed=1"]})
    with pytest.raises(UserError, match="k = \\[8\\]"):
        quickstart_xelm(
            out,
            preset="tiny",
            languages=["deu", "fra", "spa", "rus", "jpn"],
            ks=(8,),
            corpus=out.parent / "corpus",
            progress=False,
            workers=1,
        )
    with pytest.raises(UserError, match="also one of"):
        quickstart_xelm(
            tmp_path / "o",
            preset="tiny",
            languages=["deu", "por"],
            new_language="por",
            corpus=out.parent / "corpus",
            progress=False,
        )


def test_cli_keeps_the_demo_and_multilingual_options_apart(capsys):
    from elmforest.cli import main

    assert main(["quickstart", "--corpus", "multilingual", "--split", "random"]) == 2
    assert "--split apply to the demo corpus only" in capsys.readouterr().err
    assert main(["quickstart", "--languages", "deu,fra"]) == 2
    assert "need(s) --corpus multilingual" in capsys.readouterr().err
    assert main(["quickstart", "--corpus", "multilingual", "--k", "2,x"]) == 2
    assert "whole numbers" in capsys.readouterr().err
    # options this run would not use: said, not silently dropped
    for argv, says in (
        (["--no-moe", "--moe-finetune-steps", "8"], "--moe-finetune-steps (it needs the MoE"),
        (["--no-moe", "--moe-router-steps", "8"], "--moe-router-steps (it needs the MoE"),
        (["--clusters", "4"], "--clusters (it needs --split clusters)"),
    ):
        assert main(["quickstart", *argv]) == 2
        assert says in capsys.readouterr().err, argv
    # empty values: refused at once, not the defaults, nor a first round trained to fail on language ""
    for argv, says in (
        (["--corpus", "multilingual", "--new-language", ""], "needs a language code"),
        (["--corpus", "multilingual", "--languages", ""], "--languages is empty"),
        (["--corpus", "multilingual", "--k", ""], "--k is empty"),
        (["--new-language", ""], "need(s) --corpus multilingual"),
    ):
        assert main(["quickstart", *argv]) == 2
        assert says in capsys.readouterr().err, argv
    for given in (["--clusters", "8"], ["--moe-finetune-steps", "64"]):  # at the demo's default: still given
        assert main(["quickstart", "--corpus", "multilingual", *given]) == 2
        assert f"{given[0]} apply to the demo corpus only" in capsys.readouterr().err


def test_what_a_quickstart_cannot_do_is_refused_before_anything_is_built(tmp_path, capsys):
    from elmforest.quickstart import quickstart

    five = ["deu", "fra", "spa", "rus", "jpn"]
    with pytest.raises(UserError, match="5 languages were asked for"):  # before building the corpus
        quickstart_xelm(tmp_path / "a", preset="tiny", languages=five, ks=(6,), progress=False)
    for bad, said in (
        ("data.order=icp", "shards reorder"),
        ("data.shards=/elsewhere", "forest train --shards"),
    ):
        with pytest.raises(UserError, match=said):
            quickstart_xelm(tmp_path / "b", preset="tiny", languages=five, overrides=[bad], progress=False)
        with pytest.raises(UserError, match=said):
            quickstart(tmp_path / "c", preset="tiny", overrides=[bad], progress=False)
    # the typology knows `de`, the corpus builder does not: refused before step 1, not after it
    for langs, new in ((["de", "fra", "jpn"], None), (["deu", "fra", "jpn"], "pt")):
        with pytest.raises(
            UserError, match=f"unknown language code\\(s\\) \\['{'de' if new is None else 'pt'}'\\]"
        ):
            quickstart_xelm(
                tmp_path / "d", preset="tiny", languages=langs, new_language=new, ks=(2,), progress=False
            )
        assert "[1/8]" not in capsys.readouterr().out  # nothing started
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_settings_only_training_uses_may_change_until_a_model_is_trained(tmp_path, capsys):
    from elmforest.xelm.quickstart import _check_stamp

    first = {"languages": ["deu", "fra"], "seed_config": {"train": {"seed": 0}}}
    _check_stamp(tmp_path, first)
    other_seed = {**first, "seed_config": {"train": {"seed": 1}}}
    _check_stamp(tmp_path, other_seed)  # nothing trained: replaced, said
    assert "seed_config" in capsys.readouterr().out
    assert json.loads((tmp_path / "xelm-settings.json").read_text()) == other_seed
    with pytest.raises(UserError, match="languages differ"):  # the shards hold them: refused
        _check_stamp(tmp_path, {**other_seed, "languages": ["deu", "rus"]})
    (tmp_path / "forest" / "seed").mkdir(parents=True)
    (tmp_path / "forest" / "seed" / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="seed_config differ"):  # a model trained: refused
        _check_stamp(tmp_path, first)


def test_a_language_the_shards_were_built_without_is_refused_not_skipped(tmp_path):
    """A rerun asking for a language an earlier run of the directory did not build (the corpus grew,
    the tokenizer and shards did not) said it had no documents and scored the others: exit 0."""
    from elmforest.xelm.quickstart import prepare

    corpus = _corpus(tmp_path / "corpus", docs_per_lang=30)
    held = tmp_path / "held"
    held.mkdir()
    (corpus / "rus.jsonl").rename(held / "rus.jsonl")  # not there when the shards are built
    args = (400, corpus, 10**6, False, lambda *a: None)
    prepare(tmp_path / "out", ["deu", "fra"], None, *args)
    (held / "rus.jsonl").rename(corpus / "rus.jsonl")
    # the corpus grew since its shards were built (prepare_data's listing), or they lack the language
    with pytest.raises(
        UserError, match=r"\(added rus.jsonl\)|built by an earlier run for other languages, without rus"
    ):
        prepare(tmp_path / "out", ["deu", "fra", "rus"], None, *args)
    with pytest.raises(UserError, match="deu given twice"):  # refused before anything is built
        quickstart_xelm(tmp_path / "twice", preset="tiny", languages=["deu", "fra", "deu"], progress=False)
    assert not (tmp_path / "twice").exists()


def test_the_smallest_corpus_is_no_test_of_the_curse_under_a_uniform_mixture():
    """Every language was capped and mixed uniformly, yet the finding read the gain on the language
    with the fewest bytes as the curse of multilinguality's low-resource prediction."""
    from elmforest.xelm.evaluate import findings

    dom = {x: {"bpb": 1.0} for x in ("deu", "fra")}
    out = {
        "methods": {
            "dense": {"domains": dom, "mean_bpb": 1.0},
            "k2_ensemble": {"domains": dom, "mean_bpb": 1.0},
        },
        "gains": {"k2_ensemble": {"deu": 0.01, "fra": 0.02}},
        "train_bytes": {"deu": 700_000, "fra": 780_000},
    }
    line = next(x for x in findings(out, ["deu", "fra"], None) if "smallest training corpus" in x)
    assert "deu (0.70 MB)" in line and "not a test of the curse of multilinguality" in line
    line = next(x for x in findings(out, ["deu", "fra"], None, "tokens") if "smallest training corpus" in x)
    assert "predicts the largest gains there; mixture tokens" in line


def test_the_report_of_an_xelm_dir_holds_its_tables_runs_and_compute(xelm_run, tmp_path):
    """`elmforest report` on an X-ELM --out read the demo quickstart's keys only: `preset ?`, no FLOPs
    rows, no second-round table, no curve of the dense run continued, a k-forest's ledger at 1.75x
    dense with no word that no arm used it all, and nothing said of a forest dir that was gone."""
    import shutil

    from test_report import _parse

    from elmforest.clients.report import render_report

    out, res = xelm_run
    html = render_report(out)
    import re

    def unstamped(page):  # its minute stamp: another minute may have begun since the quickstart wrote it
        return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", "", page)

    assert unstamped((out / "report.html").read_text(encoding="utf-8")) == unstamped(html)  # none before
    page = _parse(html)
    assert "preset tiny" in html
    arms = res["compute"]["arms"]
    header, *rows = page.cells["results-in-domain"]
    assert header[1:] == list(res["methods"])
    flops = dict(zip(header[1:], next(r for r in rows if r[0] == "train FLOPs / dense")[1:], strict=True))
    assert flops["seed"] == "0.500!" and flops["k4_ensemble"] == "1.000"
    # the second round, its FLOPs against the dense run continued on the new language
    header, *rows = page.cells["results-added-language-x-elm-s-second-round"]
    assert header[1:] == list(res["added"])
    by = {r[0]: dict(zip(header[1:], r[1:], strict=True)) for r in rows}
    assert (
        by["por"]["k4+nearest_ensemble"]
        == f"{res['added']['k4+nearest_ensemble']['domains']['por']['bpb']:.4f}"
    )
    near = arms["k4+nearest_ensemble"] / arms["dense_continued"]
    assert by["train FLOPs / dense"]["dense_continued"] == "1.000"
    assert by["train FLOPs / dense"]["k4+nearest_ensemble"] == f"{near:.3f}" + (
        "!" if abs(near - 1) > 0.01 else ""
    )
    assert "dense-continued" in [r[0] for r in page.cells["runs-other"][1:]]
    assert "No arm uses all of forest-k4" in html.replace("&#x27;", "'")
    # a grouping's forest gone: said among what is absent
    copy = tmp_path / "x"
    shutil.copytree(
        out, copy, ignore=shutil.ignore_patterns("forest-k2", "checkpoints", "corpus*", "shards*")
    )
    assert f"{copy / 'forest-k2'}: no forest, yet results.json has its rows (k2_*)" in render_report(copy)
    # the note compares a forest with its own arms: a bigger arm of another forest does not hide it
    r = json.loads((copy / "results.json").read_text())
    r["compute"]["arms"]["tfidf9_ensemble"] = 100 * r["compute"]["arms"]["dense"]
    (copy / "results.json").write_text(json.dumps(r))
    assert "No arm uses all of forest-k4" in render_report(copy).replace("&#x27;", "'")


def test_every_language_is_judged_by_the_quickstarts_tie_rule_and_its_compute():
    """A forest 0.1% better everywhere 'held' while one equal language did not; a language 0.01% worse
    flipped the verdict; a forest trained on 1.5x the dense FLOPs 'held' with no flag; exactly 1% was a
    tie here and a result in the quickstart's findings."""
    from elmforest.xelm.evaluate import findings

    def run(**rows):
        langs = ("deu", "fra")
        methods = {n: {"domains": {x: {"bpb": v[i]} for i, x in enumerate(langs)}, "mean_bpb": sum(v) / 2}
                   for n, v in rows.items()}  # fmt: skip
        out = {
            "methods": methods,
            "gains": {n: {x: 0.0 for x in langs} for n in methods},
            "train_bytes": {x: 1 for x in langs},
            "compute": {"over_dense": {"far": 1.5}},
        }
        return [x for x in findings(out, list(langs), None) if "every language" in x]

    lines = run(
        dense=(1.0, 1.0), near=(0.999, 0.9999), worse=(0.9, 1.02), better=(0.98, 0.95), far=(0.9, 0.9)
    )
    by = {x.split(" ")[0]: x for x in lines}
    assert "not shown: a tie (within 1%) in deu, fra" in by["near"]
    assert "does NOT hold: worse in fra" in by["worse"]
    assert ": holds (" in by["better"] and "NOT compute-matched" not in by["better"]
    assert ": holds (" in by["far"] and by["far"].endswith("[NOT compute-matched: 1.500x the dense FLOPs]")
    # the routing options that read the test text's language say so; the posterior from a uniform prior not
    lines = run(dense=(1.0, 1.0), k2_ensemble=(0.9, 0.9), k2_uniform=(0.9, 0.9), k2_top1=(0.9, 0.9))
    by = {x.split(" ")[0]: x for x in lines}
    assert "[uses the test text's language label: its prior is cached" in by["k2_ensemble"]
    assert "[uses the test text's language label: routed by the text's language]" in by["k2_top1"]
    assert "language label" not in by["k2_uniform"]


def test_the_scorer_scores_at_the_runs_precision_not_auto(xelm_run):
    """The quickstart's log states train.precision; its scores were made at "auto" whatever it was."""
    import torch

    from elmforest.data.shards import Shards
    from elmforest.utils.device import cpu_supports_bf16
    from elmforest.xelm.evaluate import Scorer

    out, res = xelm_run
    want = "fp32" if cpu_supports_bf16() else "bf16"  # what "auto" would not choose on this host
    sc = Scorer(Shards(out / "shards"), 2000, 1, 32, device="cpu", precision=want)
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[want]
    assert sc.model(out / "forest" / "runs" / "dense" / "model", res["languages"][:2])["precision"] == dtype
    f = Forest.load(out / "forest-k2")
    assert sc.pool(f, f.names).amp == (None if want == "fp32" else torch.bfloat16)


def test_a_language_whose_download_failed_is_built_again_on_the_rerun(tmp_path, monkeypatch):
    """A language skipped by a failed download counted as built: a rerun with the network back never
    asked for it again, and with every language skipped the error was the tokenizer's "no data files"."""
    from elmforest.corpora import multilingual
    from elmforest.xelm.quickstart import prepare

    calls = []

    def offline(out, codes, max_bytes, min_bytes, progress):
        calls.append(list(codes))
        out.mkdir(parents=True, exist_ok=True)
        skipped = {c: f"manpages-{c} unavailable: apt-get download failed" for c in codes}
        (out / "manifest.json").write_text(
            json.dumps({"domains": {}, "skipped": skipped, "max_bytes": max_bytes})
        )

    monkeypatch.setattr(multilingual, "build_multilingual_corpus", offline)
    for _ in range(2):
        with pytest.raises(UserError, match="could be built: deu: manpages-deu unavailable"):
            prepare(tmp_path / "o", ["deu", "fin"], None, 512, None, 1000, False, lambda s: None)
    assert calls == [["deu", "fin"], ["deu", "fin"]]
    # a language built under another cap is built again; one built under this cap is kept
    corpus = tmp_path / "p" / "corpus"
    corpus.mkdir(parents=True)
    built = {"deu": {"file": "deu.jsonl", "max_bytes": 1000}, "fin": {"file": "fin.jsonl", "max_bytes": 500}}
    (corpus / "manifest.json").write_text(json.dumps({"domains": built, "max_bytes": "mixed"}))
    calls.clear()
    with pytest.raises(UserError, match="could be built"):
        prepare(tmp_path / "p", ["deu", "fin"], None, 512, None, 1000, False, lambda s: None)
    assert calls == [["fin"]]
