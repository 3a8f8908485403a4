import json

import torch
from safetensors.torch import load_file

from elmforest.cli import main
from elmforest.quickstart import quickstart


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


def test_quickstart_end_to_end_on_a_user_corpus(corpus, tmp_path):
    res = quickstart(
        tmp_path / "qs", preset="tiny", corpus=corpus, overrides=["train.steps=20"], progress=False
    )
    assert set(res["methods"]["dense"]["domains"]) == {"scripture", "code", "legal"}
    assert res["compute"]["dense_flops"] > 0
    on_disk = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert on_disk["methods"]["dense"]["mean_bpb"] == res["methods"]["dense"]["mean_bpb"]
    # re-running continues from what exists and trains nothing more
    again = quickstart(
        tmp_path / "qs", preset="tiny", corpus=corpus, overrides=["train.steps=20"], progress=False
    )
    assert again["methods"]["dense"]["mean_bpb"] == res["methods"]["dense"]["mean_bpb"]


def test_init_from_checkpoint_with_another_tokenizer_is_refused(shards_dir, corpus, tmp_path, capsys):
    from elmforest.config import ModelConfig
    from elmforest.data.tokenizer import save_tokenizer, train_bpe_on
    from elmforest.model.build import build_model

    other, _ = train_bpe_on(corpus, vocab_size=300)
    m = build_model(ModelConfig(preset="tiny"), 512, other.eos_id)
    m.save_pretrained(tmp_path / "ckpt")
    save_tokenizer(other, tmp_path / "ckpt")
    code = main(
        [
            "train",
            "--shards",
            str(shards_dir),
            "--out",
            str(tmp_path / "run"),
            "--preset",
            "tiny",
            "--init-from",
            str(tmp_path / "ckpt"),
            "--set",
            "train.steps=1",
            "--no-progress",
        ]
    )
    assert code == 2
    assert "different tokenizer" in capsys.readouterr().err
