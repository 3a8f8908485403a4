import json

import pytest
from transformers import AutoTokenizer

from elmforest.data.bpe import train_bpe, train_bpe_on
from elmforest.data.readers import DataError, iter_documents
from elmforest.data.splits import SplitSpec
from elmforest.data.tokenizer import EOS_TOKEN, load_tokenizer, save_tokenizer


def test_bpe_round_trips_any_utf8(tmp_path):
    texts = ["hello world", "def f(x):\n    return x  # ok", "café naïve — ✓ 日本語 🙂"] * 20
    tok = train_bpe(texts, vocab_size=300)
    assert tok.tokenizer.id_to_token(tok.eos_id) == EOS_TOKEN
    for t in texts[:3] + ["unseen ☃ \t\r\n text ∑"]:
        ids = tok.encode_batch([t])[0]
        assert tok.eos_id not in ids
        assert tok.decode(ids) == t
    save_tokenizer(tok, tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.fingerprint() == tok.fingerprint()
    assert again.encode_batch(texts[:3]) == tok.encode_batch(texts[:3])
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token_id == tok.eos_id
    assert hf(texts[2])["input_ids"] == tok.encode_batch([texts[2]])[0]


def test_vocab_size_is_respected(corpus):
    tok = train_bpe((d.text for d in iter_documents(corpus)), vocab_size=330)
    assert tok.vocab_size <= 330
    assert tok.vocab_size > 256 + 1  # merges were learned beyond the byte alphabet


def test_tokenizer_is_trained_on_the_training_split_only(tmp_path):
    spec = SplitSpec()
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(300):
            held = spec.assign(f"d{i}") != "train"
            text = "zyzzyvaquux " * 50 if held else "the quick brown fox jumps over the lazy dog " * 5
            f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    word = "zyzzyvaquux"
    train_only, _ = train_bpe_on(tmp_path, vocab_size=400)
    everything, _ = train_bpe_on(tmp_path, vocab_size=400, valid_frac=0.0, test_frac=0.0)
    assert len(everything.encode_batch([word])[0]) <= 2  # learned when held-out text is included
    assert len(train_only.encode_batch([word])[0]) >= 5  # never seen by the training-split tokenizer


def test_load_from_run_or_checkpoint_dir(tmp_path, tokenizer_dir):
    run = tmp_path / "run"
    save_tokenizer(load_tokenizer(tokenizer_dir), run / "model")
    (run / "model" / "config.json").write_text('{"eos_token_id": 0}')
    assert load_tokenizer(run).fingerprint() == load_tokenizer(tokenizer_dir).fingerprint()


def test_a_tokenizer_is_loaded_once_per_process_until_its_files_change(tmp_path, tokenizer_dir):
    """Each load built a new `tokenizers.Tokenizer`, whose encoding keeps native memory after it is
    dropped (~4 MB per raw-data evaluation in one process); the same files give the same object."""
    d = tmp_path / "tok"
    save_tokenizer(load_tokenizer(tokenizer_dir), d)
    a = load_tokenizer(d)
    assert load_tokenizer(d) is a and load_tokenizer(str(d) + "/") is a
    (d / "config.json").write_text('{"eos_token_id": 1}')  # where an HF checkpoint's EOS may come from
    b = load_tokenizer(d)
    assert b is not a and load_tokenizer(d) is b
    text = (d / "tokenizer.json").read_text()
    (d / "tokenizer.json").write_text(text.replace('"<eos>"', '"<eos>"', 1) + " ")  # other bytes
    assert load_tokenizer(d) is not b
    # given as a tokenizer.json file, the EOS may come from its folder's files: they are in the key too
    c = load_tokenizer(d / "tokenizer.json")
    (d / "index.json").write_text('{"tokenizer": {"eos_id": 2}}')
    assert load_tokenizer(d / "tokenizer.json") is not c


def test_saved_truncation_and_padding_are_ignored(tmp_path):
    """An HF checkpoint's tokenizer.json may carry max_length truncation: documents must stay whole."""
    tok = train_bpe(["some words to learn from"] * 10, vocab_size=300)
    tok.tokenizer.enable_truncation(4)
    tok.tokenizer.enable_padding(length=64)
    save_tokenizer(tok, tmp_path)
    ids = load_tokenizer(tmp_path).encode_batch(["a much longer document than four tokens, surely"])[0]
    assert len(ids) > 10 and load_tokenizer(tmp_path).decode(ids).startswith("a much longer")


def test_training_on_no_documents_is_refused(tmp_path):
    """An empty input (or one whose documents are all held out) would give a bare 257-token tokenizer."""
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl: no training-split documents"):
        train_bpe_on(tmp_path / "empty.jsonl", vocab_size=300)
    spec = SplitSpec()
    held = next(f"d{i}" for i in range(1000) if spec.assign(f"d{i}") != "train")
    (tmp_path / "held.jsonl").write_text(json.dumps({"id": held, "text": "only held-out text here"}) + "\n")
    with pytest.raises(DataError, match="held.jsonl: no training-split documents"):
        train_bpe_on(tmp_path / "held.jsonl", vocab_size=300)


def test_a_checkpoints_own_end_token_travels_with_its_shards_and_a_mismatch_is_refused(
    forest_dir, corpus, tmp_path
):
    """A checkpoint whose config.json names another eos_token_id than its tokenizer files: shards built
    from its files alone (or from shards built from it) had the same fingerprint and other separators,
    and eval scored them without a word."""
    import shutil

    from elmforest.data.shards import Shards
    from elmforest.data.shards_build import build_shards
    from elmforest.eval.bpb import evaluate
    from elmforest.forest.manifest import Forest
    from elmforest.utils.errors import UserError

    model = tmp_path / "m"
    shutil.copytree(Forest.load(forest_dir).expert_dir(Forest.load(forest_dir).names[0]), model)
    files_eos = load_tokenizer(model).eos_id
    cfg = json.loads((model / "config.json").read_text())
    cfg["eos_token_id"] = other = files_eos + 5
    (model / "config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(model).eos_id == other
    files_only = tmp_path / "tok"
    save_tokenizer(load_tokenizer(model), files_only)  # the tokenizer files alone, as shards hold them
    spec = SplitSpec(0.1, 0.1)  # the model's own
    build_shards(corpus, files_only, tmp_path / "s_files", split=spec, progress=False)
    build_shards(corpus, model, tmp_path / "s_model", split=spec, progress=False)
    assert Shards(tmp_path / "s_model").eos_id == other == load_tokenizer(tmp_path / "s_model").eos_id
    build_shards(corpus, tmp_path / "s_model", tmp_path / "s_again", split=spec, progress=False)
    assert Shards(tmp_path / "s_again").eos_id == other  # shards built from shards keep the end token
    with pytest.raises(
        UserError, match=f"its documents end with token {files_eos}; .* ends them with {other}"
    ):
        evaluate(model, tmp_path / "s_files", split="test", seq_len=64, device="cpu", progress=False)
    evaluate(
        model, tmp_path / "s_model", split="test", seq_len=64, device="cpu", progress=False, max_bytes=2000
    )


@pytest.mark.parametrize("loaded", [False, True])
def test_a_save_cut_between_its_files_leaves_no_tokenizer_json(tmp_path, monkeypatch, loaded):
    """tokenizer.json is what a rerun looks for (launch/prepare.py): written first, a kill before its
    config left a tokenizer without tokenizer_config.json (no eos for AutoTokenizer) for good."""
    from elmforest.data import tokenizer as tokmod

    tok = train_bpe(["hello world", "def f(x): return x"] * 20, vocab_size=280)
    if loaded:  # written back from its files, as a checkpoint's tokenizer is
        save_tokenizer(tok, tmp_path / "src")
        tok = load_tokenizer(tmp_path / "src")
    real, calls = tokmod.atomic_path, []

    def killed_at_the_second(path):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # SIGKILL, as far as the files on disk go
        return real(path)

    monkeypatch.setattr(tokmod, "atomic_path", killed_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        save_tokenizer(tok, tmp_path / "out")
    assert calls[-1] == "tokenizer.json" and not (tmp_path / "out" / "tokenizer.json").exists()
