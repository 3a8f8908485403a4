import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from elmforest.cli import main
from elmforest.quickstart import quickstart
from elmforest.utils.errors import UserError


def test_cli_pipeline_and_errors(corpus, tmp_path, capsys):
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--data",
                str(corpus),
                "--out",
                str(tmp_path / "tok"),
                "--vocab-size",
                "350",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "shards",
                "build",
                "--data",
                str(corpus),
                "--tokenizer",
                str(tmp_path / "tok"),
                "--out",
                str(tmp_path / "sh"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--shards",
                str(tmp_path / "sh"),
                "--out",
                str(tmp_path / "run"),
                "--preset",
                "tiny",
                "--set",
                "train.steps=4",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "run"),
                "--data",
                str(tmp_path / "sh"),
                "--json",
                str(tmp_path / "ev.json"),
                "--no-progress",
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "ev.json").read_text())
    assert set(res["domains"]) == {"scripture", "code", "legal"}
    for v in res["domains"].values():
        assert set(v) >= {"bpb", "ppl", "tokens", "bytes"} and v["bpb"] > 0
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "run"), "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--shards",
                str(tmp_path / "sh"),
                "--out",
                str(tmp_path / "r2"),
                "--set",
                "train.bogus=1",
            ]
        )
        == 2
    )


def test_train_from_local_hf_checkpoint(shards_dir, tmp_path):
    """Any local HF causal LM can be the starting point: its weights, not a fresh init."""
    from elmforest.config import ModelConfig
    from elmforest.data.shards import Shards
    from elmforest.model.build import build_model

    sh = Shards(shards_dir)
    start = build_model(ModelConfig(preset="tiny"), sh.vocab_size, sh.eos_id, seed=123)
    start.save_pretrained(tmp_path / "start")
    assert (
        main(
            [
                "train",
                "--shards",
                str(shards_dir),
                "--out",
                str(tmp_path / "run"),
                "--preset",
                "tiny",
                "--init-from",
                str(tmp_path / "start"),
                "--set",
                "train.steps=1",
                "--set",
                "optim.lr=1e-12",
                "--no-progress",
            ]
        )
        == 0
    )
    got = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    want = {k: v for k, v in start.state_dict().items()}
    assert torch.allclose(
        got["model.layers.0.mlp.up_proj.weight"], want["model.layers.0.mlp.up_proj.weight"], atol=1e-6
    )


def _ood_set(path):
    """A domain none of the test corpus's experts saw (its own vocabulary), as a user would bring it."""
    import random

    rng = random.Random(3)
    words = "river stone moon wind cedar snow harbor lantern meadow thunder".split()
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "poetry.jsonl", "w") as f:
        for i in range(60):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))
            f.write(json.dumps({"id": f"poetry/{i}", "text": text}) + "\n")
    return path


def test_an_ablation_split_of_part_of_a_corpus_is_refused_before_training(corpus, tmp_path):
    """--split random/clusters build their forest from the whole corpus: with --domains naming part of it,
    the ablation experts trained on domains the main forest never saw, at the same FLOPs."""
    from elmforest.utils.errors import UserError

    with pytest.raises(UserError, match="domains the main forest never saw"):
        quickstart(
            tmp_path / "qs",
            preset="tiny",
            corpus=corpus,
            domains=["code", "legal"],
            split="random",
            progress=False,
            ood=[],
        )
    assert not (tmp_path / "qs" / "forest" / "seed").exists()


def test_quickstart_end_to_end_on_a_user_corpus(corpus, tmp_path, capsys):
    kw = dict(
        preset="tiny",
        corpus=corpus,
        overrides=["train.steps=20"],
        progress=False,
        split="random",
        eval_bytes=6000,
        prior_batches=1,
        moe_router_steps=2,
        moe_finetune_steps=2,
        ood=[_ood_set(tmp_path / "ood")],
        expert_lr=0.02,  # not the dense LR: the dense run's second half is trained again at it
    )
    res = quickstart(tmp_path / "qs", **kw)
    assert (tmp_path / "qs" / "report.html").is_file()  # the quickstart writes its run report
    kept = [s.parent for s in (tmp_path / "qs").rglob("summary.json") if (s.parent / "checkpoints").exists()]
    assert not kept  # its finished runs keep no checkpoints (~3x the model each; nothing reads them)
    said = capsys.readouterr().out
    assert "the preset's LRs were not swept, not on" in said  # tiny's never were (cpu-small's were)
    assert "--preset tiny --set train.steps=20` and pass what it finds" in said  # the run's own settings
    assert "to a quickstart in a new --out" in said
    methods = res["methods"]
    assert set(methods) == {
        "dense",
        "seed",
        "ensemble",
        "ensemble_fixed",
        "ensemble_uniform",
        "top2",
        "average",
        "average_uniform",
        "random_ensemble",
        "moe",
        "moe_router_trained",
        "moe_btx",
        "dense_tuned",
    }
    for m in methods.values():
        assert set(m["domains"]) == {"scripture", "code", "legal"}
        assert all(v["bpb"] > 0 for v in m["domains"].values())
    # all methods scored the very same test documents, in and out of domain
    for block in (methods, res["ood_methods"]):
        assert (
            len({json.dumps({d: v["bytes"] for d, v in m["domains"].items()}) for m in block.values()}) == 1
        )
    # out of domain: the same methods, on the user's set, priors from its own valid split
    assert set(res["ood_methods"]) == set(methods)
    assert set(res["ood_methods"]["ensemble"]["domains"]) == {"poetry"}
    assert res["priors"]["ood"]["poetry"]["source"].startswith("poetry/valid")
    assert res["ood_methods"]["ensemble_uniform"]["domains"]["poetry"]["prior_source"] == "uniform"
    # the protocol is stated: balanced mixture, the LRs, priors from valid, documents restart the posterior
    p = res["protocol"]
    assert p["mixture"] == "uniform" and p["prior_split"] == "valid" and p["reset"] == "document"
    assert (
        json.loads((tmp_path / "qs" / "forest" / "runs" / "dense" / "run_config.json").read_text())["data"][
            "mixture"
        ]
        == "uniform"
    )
    for v in res["priors"]["in_domain"].values():
        assert v["weight"] == max(v["prior"].values()) and v["expert"] in v["prior"]
    # the ledger: each phase by what ran, the exact ratio, router training counted on top
    c = res["compute"]
    assert c["forest_over_dense"] == pytest.approx(1.0, abs=1e-9)
    assert {r["phase"] for r in c["ledger"]} == {
        "seed",
        "expert",
        "router_training",
        "btx_finetuning",
        "dense",
    }
    assert c["methods"]["ensemble"] == pytest.approx(1.0) and c["methods"]["seed"] == pytest.approx(0.5)
    # the dense run's second half again at its own LR (tiny's is not swept: the experts'), the same
    # FLOPs, from the same seed state; the claims are checked against it, then against dense at one LR
    assert c["methods"]["dense_tuned"] == pytest.approx(1.0, rel=1e-6)
    again = json.loads((tmp_path / "qs" / "forest" / "runs" / "dense-tuned" / "run_config.json").read_text())
    assert again["optim"]["lr"] == 0.02 and again["train"]["init_checkpoint"].endswith("seed_state")
    assert p["dense_continue_lr"] == 0.02 and p["dense_continue_lr_source"] == "not swept: the experts' LR"
    assert p["dense_lr_source"] == "preset tiny's default: not swept"
    assert p["expert_lr_source"] == "given (--expert-lr)"  # (this test gives one)
    assert methods["dense_tuned"]["mean_bpb"] != methods["dense"]["mean_bpb"]
    assert "the dense run's second half at LR 0.02 too (not swept: the experts' LR)" in said
    for who, row in (("ensemble", "ensemble (cached prior)"), ("moe_btx", "BTX-fine-tuned MoE")):
        assert any(
            f.startswith(f"the {row} beats ") and f" {who} " in f and "vs dense_tuned" in f
            for f in res["findings"]
        )
        assert any(f.startswith("  the ") and f" {who} " in f and "vs dense " in f for f in res["findings"])
    assert c["methods"]["moe_router_trained"] > 1.01
    router = next(r for r in c["ledger"] if r["phase"] == "router_training")
    assert c["arms"]["moe_router_trained"] == pytest.approx(c["arms"]["forest"] + router["flops"])
    btx = next(
        r for r in c["ledger"] if r["phase"] == "btx_finetuning"
    )  # the fine-tuning on top, by what ran
    ft = json.loads((tmp_path / "qs" / "moe-btx" / "elmforest_moe.json").read_text())["finetuning"]
    assert btx["flops"] == ft["flops"] > 0 and ft["steps"] == 2 and ft["router_aux_loss"] == 0.01
    btx_flops = btx["flops"]
    assert c["arms"]["moe_btx"] == pytest.approx(c["arms"]["forest"] + btx["flops"])
    assert any(f.startswith("the BTX-fine-tuned MoE beats dense in-domain") for f in res["findings"])
    assert methods["top2"]["compute"]["fraction_of_full"] == 2 / 3
    # what running each row costs per token beside what training it cost: 3 experts run on every token
    serve = c["inference"]
    assert (serve["ensemble"], serve["top2"], serve["average"], serve["dense"]) == (3.0, 2.0, 1.0, 1.0)
    assert serve["dense_tuned"] == 1.0 and 1.0 < serve["moe"] == serve["moe_btx"] < 2.0  # top-2 of 3
    assert "inference FLOPs/token / dense" in said and "3.00x" in said
    assert "inference FLOPs/token / dense" in (tmp_path / "qs" / "report.html").read_text()
    assert any("out-of-domain" in f for f in res["findings"])
    assert set(res["ablations"]["in_domain"]["document_reset"]["ensemble"]) == {"document", "window"}
    moe_cfg = json.loads((tmp_path / "qs" / "moe" / "config.json").read_text())
    assert moe_cfg["model_type"] == "mixtral" and moe_cfg["num_local_experts"] == 3
    for d in ("moe", "moe-router-trained", "moe-btx"):  # each MoE's routing statistics beside it
        routing = json.loads((tmp_path / "qs" / d / "routing.json").read_text())
        assert len(routing["experts"]) == 3 and (tmp_path / "qs" / d / "routing.png").is_file()
    on_disk = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert on_disk["methods"]["ensemble"]["mean_bpb"] == methods["ensemble"]["mean_bpb"]
    assert on_disk["ood_methods"]["dense"]["mean_bpb"] == res["ood_methods"]["dense"]["mean_bpb"]
    assert (tmp_path / "qs" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = json.loads((tmp_path / "qs" / "forest" / "forest.json").read_text())["plan"]
    assert plan["domains"] == ["code", "legal", "scripture"] and plan["expert_lr"] == 0.02
    # re-running continues from what exists and trains nothing more
    mtime = (tmp_path / "qs" / "forest" / "experts" / "code" / "model.safetensors").stat().st_mtime_ns
    moe_mtime = [
        (tmp_path / "qs" / d / "elmforest_moe.json").stat().st_mtime_ns
        for d in ("moe", "moe-router-trained", "moe-btx")
    ]
    again = quickstart(tmp_path / "qs", **kw)
    assert again["methods"]["ensemble"]["mean_bpb"] == methods["ensemble"]["mean_bpb"]
    assert again["methods"]["moe_router_trained"]["mean_bpb"] == methods["moe_router_trained"]["mean_bpb"]
    assert moe_mtime == [
        (tmp_path / "qs" / d / "elmforest_moe.json").stat().st_mtime_ns
        for d in ("moe", "moe-router-trained", "moe-btx")
    ]
    assert (tmp_path / "qs" / "forest" / "experts" / "code" / "model.safetensors").stat().st_mtime_ns == mtime
    # one domain, or a domain too small for a test split, failed only after all the training
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(Path(corpus) / "code.jsonl", one / "code.jsonl")
    with pytest.raises(UserError, match="1 domain\\(s\\) with training documents \\(code\\); a forest needs"):
        quickstart(tmp_path / "one-out", **{**kw, "corpus": one, "ood": [], "split": "domains"})
    (one / "few.jsonl").write_text(
        "".join(json.dumps({"id": f"f{i}", "text": "few words " * 40}) + "\n" for i in range(3))
    )
    with pytest.raises(UserError, match="domain\\(s\\) few have no valid or no test documents"):
        quickstart(tmp_path / "few-out", **{**kw, "corpus": one, "ood": [], "split": "domains"})
    with pytest.raises(UserError, match="nope: no such file or directory"):  # a typo: the --out stays usable
        quickstart(tmp_path / "typo", **{**kw, "corpus": tmp_path / "nope", "ood": []})
    assert not (tmp_path / "typo" / "corpus_source.json").exists()
    # another --set (the LR a sweep found) kept the forest trained before, reported under the new LR
    with pytest.raises(UserError, match=r"was run with other settings \(optim.lr: 0.003 -> 0.012\)"):
        quickstart(tmp_path / "qs", **{**kw, "overrides": [*kw["overrides"], "optim.lr=0.012"]})
    quickstart(tmp_path / "qs", **{**kw, "overrides": [*kw["overrides"], "train.log_every=5"]})  # operational
    with pytest.raises(
        UserError, match=r"planned differently \(expert_lr: .*\); use a new forest \(another --out\)"
    ):
        quickstart(
            tmp_path / "qs", **{**kw, "expert_lr": 0.05}
        )  # the quickstart's flag, not forest's --forest
    # other BTX steps: the quickstart's own fine-tuned MoE is out of date, trained again (not refused)
    capsys.readouterr()
    longer = quickstart(tmp_path / "qs", **{**kw, "moe_finetune_steps": 3, "dense_continue_lr": 0.01})
    said = capsys.readouterr().out
    assert "moe-btx: trained from another export or with other settings; trained again" in said
    assert "dense-tuned: trained at another LR (0.02); trained again" in said  # its own row, given now
    assert longer["protocol"]["dense_continue_lr"] == 0.01
    assert longer["protocol"]["dense_continue_lr_source"] == "given"
    tuned = json.loads((tmp_path / "qs" / "forest" / "runs" / "dense-tuned" / "run_config.json").read_text())
    assert tuned["optim"]["lr"] == 0.01
    ft = json.loads((tmp_path / "qs" / "moe-btx" / "elmforest_moe.json").read_text())["finetuning"]
    btx = [r for r in longer["compute"]["ledger"] if r["phase"] == "btx_finetuning"]
    assert (
        ft["steps"] == 3
        and len(btx) == 1
        and btx[0]["flops"] == ft["flops"] == pytest.approx(1.5 * btx_flops)
    )
    # an out-of-domain set named like a training domain is refused
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "legal.jsonl").write_text(
        json.dumps({"id": "x", "text": "a licence of another kind " * 20}) + "\n"
    )
    with pytest.raises(ValueError, match="share a name with a training domain"):
        quickstart(tmp_path / "qs", **{**kw, "ood": [clash]})
    # the training documents under another domain name are not out of domain either
    (copy := tmp_path / "copy").mkdir()
    rows = [json.loads(x) for x in (Path(corpus) / "legal.jsonl").read_text().splitlines()]
    (copy / "renamed.jsonl").write_text("".join(json.dumps({**r, "domain": "renamed"}) + "\n" for r in rows))
    with pytest.raises(
        UserError, match=f"out-of-domain set renamed: {len(rows)} of its {len(rows)} documents are"
    ):
        quickstart(tmp_path / "qs", **{**kw, "ood": [copy]})
    # the output dir holds this corpus's shards: another corpus (or the demo one) is refused before anything runs
    assert res["protocol"]["corpus"] == str(Path(corpus).resolve())
    with pytest.raises(
        UserError, match=r"was built from .*, not .*clash: this output dir belongs to another"
    ):
        quickstart(tmp_path / "qs", **{**kw, "corpus": clash, "ood": []})
    with pytest.raises(
        UserError,
        match=r"qs/corpus: this output dir belongs to another corpus; pass --data .* to resume that run",
    ):
        quickstart(tmp_path / "qs", **{**kw, "corpus": None, "ood": []})
    assert not (tmp_path / "qs" / "corpus").exists()  # refused before building the demo corpus
    # killed after its tokenizer, before its shards: the output dir still says which corpus it is for

    shutil.rmtree(tmp_path / "qs" / "shards")
    with pytest.raises(
        UserError, match=r"qs was built from .*, not .*clash: this output dir belongs to another"
    ):
        quickstart(tmp_path / "qs", **{**kw, "corpus": clash, "ood": []})
    assert not (tmp_path / "qs" / "shards").exists()


@pytest.mark.parametrize("given, kept", [([], 0), (["train.keep_checkpoints=3"], 3)])
def test_the_quickstarts_runs_keep_no_checkpoints_unless_asked(corpus, tmp_path, monkeypatch, given, kept):
    import elmforest.quickstart as qs_mod

    seen = []

    def stop(forest, shards, base, plan, out):
        seen.append(base.train.keep_checkpoints)
        raise UserError("stopped here")

    monkeypatch.setattr(qs_mod, "_check_seed_settings", stop)
    with pytest.raises(UserError, match="stopped here"):
        quickstart(tmp_path / "qs", preset="tiny", corpus=corpus, overrides=given, progress=False)
    assert seen == [kept]


def test_quickstart_data_option_and_the_corpus_an_output_dir_belongs_to(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import elmforest.quickstart as qs_mod
    from elmforest.launch.corpus_source import check_shards_source

    seen = {}
    monkeypatch.setattr(qs_mod, "quickstart", lambda out, **kw: seen.update(kw, out=out))
    assert main(["quickstart", "--data", "mine.jsonl", "--preset", "tiny", "--out", str(tmp_path / "o")]) == 0
    assert seen["corpus"] == "mine.jsonl" and seen["out"] == str(tmp_path / "o")
    assert main(["quickstart", "--data", "mine.jsonl", "--corpus", "multilingual"]) == 2
    # the demo corpus lives in OUT/corpus: an output dir copied or moved still resumes
    out = tmp_path / "copy"
    moved = SimpleNamespace(index={"source": "/elsewhere/old/corpus"}, root=out / "shards")
    check_shards_source(moved, None, out)
    check_shards_source(SimpleNamespace(index={"source": str(out.resolve() / "corpus")}, root=""), None, out)
    mine = tmp_path / "data" / "corpus"  # a user's folder named like the demo's
    mine.mkdir(parents=True)
    with pytest.raises(UserError, match="data/corpus, not .*copy/corpus: this output dir belongs to another"):
        check_shards_source(SimpleNamespace(index={"source": str(mine)}, root=out / "shards"), None, out)
    (mine / "manifest.json").write_text("{}")  # a built demo corpus (of the output dir copied from)
    check_shards_source(SimpleNamespace(index={"source": str(mine)}, root=out / "shards"), None, out)
    with pytest.raises(UserError, match="mine.jsonl, not .*copy/corpus: this output dir belongs to another"):
        check_shards_source(
            SimpleNamespace(index={"source": "/data/mine.jsonl"}, root=out / "shards"), None, out
        )


def test_quickstart_cbtm_adds_cluster_rows(corpus, tmp_path):
    """2 clusters of 3 domains: the dense batch (8, rounded to 9 for the domains) divided by neither, and
    the run failed once everything else had trained; it is a multiple of both from the start. Scored at
    the precision asked for (train.precision), which the evaluation took as "auto" while the log said it."""
    from elmforest.utils.device import cpu_supports_bf16

    want = "fp32" if cpu_supports_bf16() else "bf16"  # what "auto" would not choose on this host
    res = quickstart(
        tmp_path / "qs",
        preset="tiny",
        corpus=corpus,
        overrides=["train.steps=20", f"train.precision={want}"],
        progress=False,
        split="clusters",
        clusters=2,
        eval_bytes=6000,
        prior_batches=1,
        moe_finetune_steps=0,
    )
    assert {"cbtm_top1", "cbtm_top2"} <= set(res["methods"])
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[want]
    assert {m: r["precision"] for m, r in res["methods"].items()} == {m: dtype for m in res["methods"]}
    assert res["protocol"]["precision"].startswith(want)
    assert res["compute"]["methods"]["cbtm_top1"] == pytest.approx(1.0)
    assert 1.0 <= res["compute"]["inference"]["cbtm_top1"] < 2.0  # one cluster expert a token, by what ran
    # tiny's LRs were never swept and none was given: said as a finding, not only in the protocol
    assert res["protocol"]["expert_lr_source"] == "not swept: the dense LR"
    assert any(f.startswith("no arm's LR was swept") for f in res["findings"])
    ((name, ab),) = res["compute"]["ablation_ledgers"].items()  # its experts itemised, as the main forest's
    rows = ab["ledger"]
    assert ab["arms"] == ["cbtm_top1", "cbtm_top2"] and (tmp_path / "qs" / name / "forest.json").is_file()
    assert sorted(r["name"] for r in rows if r["phase"] == "expert") == ["cluster0", "cluster1"]
    total = sum(r["flops"] for r in rows if r["phase"] in ("seed", "expert"))
    assert total == res["compute"]["arms"]["cbtm_top1"] == res["compute"]["arms"]["cbtm_top2"]
    top1 = res["methods"]["cbtm_top1"]
    # top-1 per document: a window holding the end of one document and the start of another runs two
    assert top1["mode"] == "cluster" and 1 / 2 - 1e-9 <= top1["compute"]["fraction_of_full"] < 1
    report = json.loads((tmp_path / "qs" / "clusters-2" / "report.meta.json").read_text())
    assert report["documents"] == sum(report["sizes"]) and report["nmi"] > 0.3
    forest = json.loads((tmp_path / "qs" / "forest-clusters-2" / "forest.json").read_text())
    assert forest["clusterer"]["k"] == 2 and forest["plan"]["n_experts"] == 2
    assert forest["plan"]["batch_size"] == 6  # a multiple of 3 domains and 2 clusters
    assert sorted(e["name"] for e in forest["experts"]) == ["cluster0", "cluster1"]


def test_ood_shards_split_by_file_and_older_ones_split_by_document_are_rebuilt(
    tokenizer_dir, tmp_path, capsys
):
    """Two source files of 10 chunks each: valid (the prior) and test hold whole files, never chunks of
    the same one; shards split by document (before the split was by file) are rebuilt, not reused."""
    from elmforest.data.shards import Shards
    from elmforest.data.shards_build import build_shards
    from elmforest.data.splits import SplitSpec
    from elmforest.data.tokenizer import load_tokenizer
    from elmforest.launch.ood_sets import OOD_SPLIT, build_ood_shards
    from elmforest.utils.io import file_stamps

    def words(sh, split):
        return set(tok.decode(sh.tokens("poetry", split).tolist()).replace("<|endoftext|>", " ").split())

    names = [f"f{i}" for i in range(40)]
    a = next(n for n in names if OOD_SPLIT.assign(f"poetry/{n}") == "valid")
    b = next(n for n in names if OOD_SPLIT.assign(f"poetry/{n}") == "test")
    src = tmp_path / "ood"
    src.mkdir()
    with open(src / "poetry.jsonl", "w") as f:
        for name, word in ((a, "river"), (b, "stone")):
            for k in range(10):
                f.write(json.dumps({"id": f"poetry/{name}#{k:04d}", "text": f"{word} " * (20 + k)}) + "\n")
    build_shards([src], tokenizer_dir, tmp_path / "sh", SplitSpec(0.5, 0.5), progress=False)
    stamp = {"sources": [str(src.resolve())], "files": file_stamps([src])}  # as written before the split
    (tmp_path / "sh" / "sources.json").write_text(json.dumps(stamp))
    tok = load_tokenizer(tokenizer_dir)
    old = Shards(tmp_path / "sh")
    assert {"river", "stone"} <= words(old, "valid")  # by document: chunks of both files on each side
    sh = build_ood_shards(tmp_path / "sh", [src], tokenizer_dir, ["code"], progress=False)
    assert sh.index["split"]["by_file"] is True
    assert json.loads((tmp_path / "sh" / "sources.json").read_text())["split"]["by_file"] is True
    for split, word in (("valid", "river"), ("test", "stone")):
        assert sh.info("poetry", split)["documents"] == 10
        assert words(sh, split) == {word}
    assert "has no" not in capsys.readouterr().err
    with open(src / "poetry.jsonl", "w") as f:  # one file only: all of it on its side, and said
        f.writelines(
            json.dumps({"id": f"poetry/{a}#{k:04d}", "text": "river " * 30}) + "\n" for k in range(10)
        )
    sh = build_ood_shards(tmp_path / "sh", [src], tokenizer_dir, ["code"], progress=False)
    assert not sh.has("poetry", "test") and "poetry has no test documents" in capsys.readouterr().err


def test_ood_shards_are_rebuilt_when_a_source_changes(tokenizer_dir, tmp_path):
    import os

    from elmforest.launch.ood_sets import build_ood_shards

    src = tmp_path / "ood"
    _ood_set(src)
    first = build_ood_shards(tmp_path / "sh", [src], tokenizer_dir, ["code"], progress=False)
    n = len(first.tokens("poetry", "test")) + len(first.tokens("poetry", "valid"))
    again = build_ood_shards(tmp_path / "sh", [src], tokenizer_dir, ["code"], progress=False)
    assert len(again.tokens("poetry", "test")) + len(again.tokens("poetry", "valid")) == n
    with open(src / "poetry.jsonl", "a") as f:  # the user edits the file in place (same path)
        for i in range(40):
            f.write(json.dumps({"id": f"poetry/x{i}", "text": "moon " * 50}) + "\n")
    st = (src / "poetry.jsonl").stat()
    os.utime(src / "poetry.jsonl", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    grown = build_ood_shards(tmp_path / "sh", [src], tokenizer_dir, ["code"], progress=False)
    assert len(grown.tokens("poetry", "test")) + len(grown.tokens("poetry", "valid")) > n


def test_two_out_of_domain_sets_of_one_name_are_refused_not_merged(tokenizer_dir, tmp_path):
    """`--ood A/poetry.jsonl --ood B/poetry.jsonl` (or a user's set named like one of the demo's) were
    built into one `poetry` set, scored as one row, with no word."""
    from elmforest.launch.ood_sets import build_ood_shards
    from elmforest.utils.errors import UserError

    _ood_set(tmp_path / "A")
    _ood_set(tmp_path / "B")
    with pytest.raises(UserError, match=r"same name from more than one source \(poetry in .*A and .*B\)"):
        build_ood_shards(
            tmp_path / "sh", [tmp_path / "A", tmp_path / "B"], tokenizer_dir, ["code"], progress=False
        )
    assert not (tmp_path / "sh").exists()
    (tmp_path / "B" / "poetry.jsonl").rename(tmp_path / "B" / "verse.jsonl")
    sh = build_ood_shards(
        tmp_path / "sh", [tmp_path / "A", tmp_path / "B"], tokenizer_dir, ["code"], progress=False
    )
    assert sorted(sh.domains) == ["poetry", "verse"]


@pytest.mark.parametrize("names", [["code", "code"], ["code"]])
def test_a_duplicated_or_single_domain_is_refused_before_the_tokenizer_is_made(corpus, tmp_path, names):
    """The tokenizer is made of the named domains: refused after it was saved, the corrected rerun in
    the same --out found a tokenizer of one domain and was refused in turn."""
    from elmforest.utils.errors import UserError

    with pytest.raises(UserError, match="name at least 2 domains, each once"):
        quickstart(tmp_path / "qs", preset="tiny", corpus=corpus, domains=names, progress=False, ood=[])
    assert not (tmp_path / "qs" / "tokenizer").exists()


def test_a_list_option_given_empty_is_refused_not_taken_for_the_default(shards_dir, tmp_path, capsys):
    """`--domains ","` scored every domain, `forest expert --mix ","` trained on one, `sweep --groups ","`
    raised a TypeError: a list given with no item (a slip of quoting or of a script) is refused, before
    any work."""
    for argv, says in (
        (
            ["eval", "--model", str(tmp_path / "none"), "--data", str(shards_dir), "--domains", ","],
            "--domains is empty",
        ),
        (
            ["sweep", "--shards", str(shards_dir), "--out", str(tmp_path / "sw"), "--groups", " , "],
            "--groups is empty",
        ),
        (["serve", "--model", str(tmp_path / "none"), "--experts", ","], "--experts is empty"),
        # no default to fall back on: not "leave it out"
        (["cluster", "languages", "--langs", "", "--out", str(tmp_path / "g.json")], "--langs is empty ('')"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert says in err and ("leave it out" in err) == (argv[0] != "cluster"), (argv, err)
    assert not (tmp_path / "sw").exists()
