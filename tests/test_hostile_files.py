"""Files handed over by someone else, corrupt or crafted: each is refused as a one-line error naming
the file (or, a corpus line, skipped and counted like any other bad line), never a traceback, a hang
or a number computed from what is not there."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from elmforest.data.documents import ReadStats
from elmforest.data.readers import iter_documents
from elmforest.data.shards import Shards
from elmforest.utils.errors import UserError
from elmforest.utils.io import read_json
from elmforest.utils.yaml_file import read_yaml

DEEP = "[" * 100_000 + "]" * 100_000
HUGE = "9" * 5_000  # past the 4,300 digits Python converts


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """300 bytes of nested aliases: 9^9 values once expanded; printing it in a type error ran out of
    memory."""
    lines = ["preset: tiny", "corpus: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"bomb\.yaml: holds more than 1,000,000 values"):
        read_yaml(p)
    assert time.perf_counter() - t0 < 20  # the walk stops at the limit
    small = tmp_path / "ok.yaml"  # aliases of a normal size still load
    small.write_text("a: &x [1, 2]\nb: *x\n")
    assert read_yaml(small) == {"a": [1, 2], "b": [1, 2]}


@pytest.mark.parametrize(
    ("text", "said"),
    [(DEEP, "nested too deeply"), (f'{{"n": {HUGE}}}', "4300 digits")],
    ids=["nested", "long-integer"],
)
def test_json_and_yaml_past_pythons_limits_name_the_file(tmp_path, text, said):
    p = tmp_path / "odd.json"
    p.write_text(text)
    for read in (read_json, read_yaml):
        with pytest.raises(UserError, match=rf"odd\.json: not valid (YAML/)?JSON \(.*{said}") as e:
            read(p)
        assert "\n" not in str(e.value)


def test_corpus_lines_past_pythons_limits_are_skipped_and_counted(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(f'{{"text": "ok"}}\n{DEEP}\n{{"text": "x", "n": {HUGE}}}\n{{"text": "also ok"}}\n')
    stats = ReadStats()
    assert [d.text for d in iter_documents(p, stats)] == ["ok", "also ok"]
    assert stats.skipped["invalid_json"] == 2


@pytest.fixture()
def copied(shards_dir, tmp_path) -> tuple[Path, str]:
    dst = tmp_path / "shards"
    shutil.copytree(shards_dir, dst)
    return dst, sorted(Shards(dst).domains)[0]


def _edit_index(root: Path, change) -> None:
    index = json.loads((root / "index.json").read_text())
    change(index)
    (root / "index.json").write_text(json.dumps(index))


def test_half_copied_or_edited_shards_are_refused_not_read_short(copied):
    """A count halved in the index read half the tokens, silently (BPB 1.98 instead of 3.99); a
    truncated file was numpy's 'mmap length is greater than file size'."""
    root, d = copied
    sh = Shards(root)
    n, folder = sh.info(d, "test")["tokens"], root / sh.index["domains"][d]["folder"]
    assert len(sh.tokens(d, "test")) == n and sh.documents(d, "test")[-1, 0] == n
    _edit_index(root, lambda ix: ix["domains"][d]["splits"]["test"].update(tokens=n // 2))
    with pytest.raises(UserError, match=rf"test\.bin: {n * 2:,} bytes, but the index says {n // 2:,} uint16"):
        Shards(root).tokens(d, "test")
    with pytest.raises(UserError, match=r"test\.docs\.npy: not the document table"):
        Shards(root).documents(d, "test")  # its ends run past the count
    for bad in (-5, "134", True):
        _edit_index(root, lambda ix, b=bad: ix["domains"][d]["splits"]["test"].update(tokens=b))
        with pytest.raises(UserError, match="is not a count"):
            Shards(root).tokens(d, "test")
    _edit_index(root, lambda ix: ix["domains"][d]["splits"]["test"].update(tokens=n))
    with open(folder / "test.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match=r"test\.bin: 100 bytes, but the index says"):
        Shards(root).tokens(d, "test")
    docs = np.load(folder / "valid.docs.npy")
    np.save(folder / "valid.docs.npy", docs[:, 0])  # one column
    with pytest.raises(UserError, match=r"valid\.docs\.npy: not the document table"):
        Shards(root).documents(d, "valid")
    (folder / "valid.docs.npy").write_bytes((folder / "train.docs.npy").read_bytes()[:90])
    with pytest.raises(UserError, match=r"valid\.docs\.npy: not a document table"):
        Shards(root).documents(d, "valid")
    _edit_index(root, lambda ix: ix.update(dtype="object"))
    with pytest.raises(UserError, match="token dtype 'object'"):
        Shards(root)


def test_an_end_of_document_id_outside_the_vocabulary_is_refused(tokenizer_dir, tmp_path):
    """A checkpoint's config.json naming id 600 for a 400-token vocabulary built shards that then failed
    in training ('Padding_idx must be within num_embeddings'); 70000 overflowed uint16."""
    from elmforest.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(tokenizer_dir).vocab_size
    for i, bad in enumerate((vocab + 200, -1, True)):
        d = tmp_path / f"t{i}"
        shutil.copytree(tokenizer_dir, d)
        (d / "config.json").write_text(json.dumps({"eos_token_id": bad}))
        with pytest.raises(UserError, match=rf"config\.json: end-of-document id {bad!r} is not a token"):
            load_tokenizer(d)
    # an id the tokenizer holds past its count of tokens (a vocabulary with a gap) is a token all the same
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    eos_name = next(
        t["content"] for t in tok["added_tokens"] if t["id"] == load_tokenizer(tokenizer_dir).eos_id
    )
    for t in tok["added_tokens"]:
        if t["content"] == eos_name:
            t["id"] = vocab + 20
    tok["model"]["vocab"][eos_name] = vocab + 20
    gap = tmp_path / "gap"
    shutil.copytree(tokenizer_dir, gap)
    (gap / "tokenizer.json").write_text(json.dumps(tok))
    (gap / "config.json").write_text(json.dumps({"eos_token_id": vocab + 20}))
    assert load_tokenizer(gap).eos_id == vocab + 20
    d = tmp_path / "named"
    shutil.copytree(tokenizer_dir, d)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": 5}))
    with pytest.raises(UserError, match=r"tokenizer_config\.json: eos_token 5 is not a token's text"):
        load_tokenizer(d)


def test_a_results_file_with_a_mean_that_is_not_a_number_is_named(tmp_path):
    from elmforest.clients.report_data import _results

    r = {"methods": {"dense": {"domains": {"a": {"bpb": 1.0}}, "mean_bpb": None}}}
    (tmp_path / "results.json").write_text(json.dumps(r))
    with pytest.raises(UserError, match=r"methods\.dense\.mean_bpb is None, not a number"):
        _results(tmp_path / "results.json")


def test_domains_that_print_alike_are_said(tokenizer_dir, tmp_path, capsys):
    """`café` written precomposed and decomposed are two domains, two rows that look like one."""
    import unicodedata

    from elmforest.data.shards_build import build_shards
    from elmforest.data.splits import SplitSpec

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    lines = [
        json.dumps({"id": f"{d}{i}", "domain": d, "text": f"coffee and cake number {i} " * 5})
        for d in (nfc, nfd, "tea", "legal", "legal ", "Legal\u200b")
        for i in range(30)
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    build_shards(tmp_path / "c.jsonl", tokenizer_dir, tmp_path / "sh", SplitSpec(0.1, 0.1), progress=False)
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note: domains")]
    assert len(notes) == 2 and not any("tea" in n for n in notes), err
    assert any("2 domains that may print alike" in n and "caf" in n for n in notes), notes
    # a trailing space and a zero-width space were not said (3 domains: "two" before)
    assert any("3 domains that may print alike" in n and "'legal '" in n and "\\u200b" in n for n in notes), (
        notes
    )
    assert len(Shards(tmp_path / "sh").domains) == 6  # kept, not merged
    from elmforest.data.shards_build import _note_lookalikes

    _note_lookalikes(["\u0645\u06cc\u200c\u062e", "\u0645\u06cc\u062e"])  # ZWNJ: drawn apart, not alike
    assert "print alike" not in capsys.readouterr().err
