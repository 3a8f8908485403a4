"""Odd but legal inputs a user brings, found by trying them as a new user would: each either reads
correctly or is refused with a message naming the file and the fix, never a traceback."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from elmforest.cli import main
from elmforest.cluster.clusterer import Clusterer
from elmforest.data.bpe import _pieces
from elmforest.data.readers import DataError, ReadStats, iter_documents
from elmforest.data.shards import Shards
from elmforest.data.splits import SplitSpec
from elmforest.train.batches import WindowSampler
from elmforest.utils.errors import NotFound, UserError


def _run(argv, capsys) -> tuple[int, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_ids_and_domains_that_are_not_utf8_are_skipped_like_such_text(tmp_path):
    """The split hashes the id's UTF-8 and the domain names a folder: a lone surrogate in either
    crashed shards build, cluster assign and eval's table."""
    p = tmp_path / "d.jsonl"
    p.write_text(
        '{"text": "ok", "id": "lone\\udc00id"}\n{"text": "ok", "domain": "dom\\udc00ain"}\n'
        '{"text": "fine", "id": "good"}\n'
    )
    stats = ReadStats()
    assert [d.id for d in iter_documents(p, stats)] == ["good"]
    assert stats.skipped == {"invalid_utf8": 2}


def test_file_and_folder_names_that_are_not_utf8_still_give_their_documents(tmp_path):
    """A Latin-1 folder name (`caf\xe9`) made every document under it an `invalid_utf8` record."""
    import os

    root = os.fsencode(tmp_path)
    for folder, name in [
        (b"caf\xe9", b"a.txt"),
        (b"caf\xe8", b"a.txt"),
        (b"good", b"b\xff.txt"),
        (b"good", b"c.jsonl"),
    ]:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        body = b'{"text": "json text"}\n' if name.endswith(b"jsonl") else b"plain text"
        with open(os.path.join(root, folder, name), "wb") as f:
            f.write(body)
    stats = ReadStats()
    docs = list(iter_documents(tmp_path, stats))
    assert sorted(d.domain for d in docs) == ["c", "caf\\xe8", "caf\\xe9", "good"] and not stats.skipped
    assert all(d.id.encode("utf-8") for d in docs) and len({d.id for d in docs}) == 4


def test_an_empty_id_is_no_id(tmp_path):
    """An empty (constant) id put every document in one split; it now falls back to the line number."""
    p = tmp_path / "x.jsonl"
    p.write_text("".join(json.dumps({"id": "", "text": f"doc {i}"}) + "\n" for i in range(200)))
    docs = list(iter_documents(p))
    assert len({d.id for d in docs}) == 200
    splits = {SplitSpec().assign(d.id) for d in docs}
    assert splits == {"train", "valid", "test"}


@pytest.mark.parametrize("indent", [2, None])
def test_a_json_array_is_refused_naming_the_file(tmp_path, indent):
    (tmp_path / "news.jsonl").write_text(json.dumps({"text": "a line"}) + "\n")
    p = tmp_path / "data.json"
    p.write_text(json.dumps([{"text": "one"}, {"text": "two"}], indent=indent))
    with pytest.raises(DataError, match=r"data\.json: a JSON array, not JSON lines"):
        list(iter_documents(tmp_path))


def test_spark_part_files_take_their_folder_name(tmp_path, capsys):
    folder = tmp_path / "news.parquet"
    folder.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"text": [f"doc {i}"]}), folder / f"part-0000{i}-3f2a.snappy.parquet")
    pq.write_table(pa.table({"text": ["loose"]}), tmp_path / "legal.parquet")
    other = tmp_path / "mixed.parquet"  # a folder that merely ends like a file: its files keep their names
    other.mkdir()
    pq.write_table(pa.table({"text": ["a"]}), other / "forum.parquet")
    docs = list(iter_documents(tmp_path))
    assert sorted({d.domain for d in docs}) == ["forum", "legal", "news"]
    assert len({d.id for d in docs}) == len(docs) == 5  # each part's rows keep ids of their own
    # the builders follow the same rule: a domain per part, each part's ids `1`, `2`, ... before
    docs = list(iter_documents(f"parquet:{tmp_path}"))
    assert sorted({d.domain for d in docs}) == ["forum", "legal", "news"]
    assert len({d.id for d in docs}) == len(docs) == 5
    assert "news/part-00001-3f2a.snappy.parquet:1" in {d.id for d in docs}
    assert "several folders" not in capsys.readouterr().err  # one table's parts share its folder
    # two tables of one name in two folders: one domain, colliding ids: said, natively and by a builder
    (tmp_path / "b" / "news.parquet").mkdir(parents=True)
    pq.write_table(
        pa.table({"text": ["other"]}), tmp_path / "b" / "news.parquet" / "part-00000-3f2a.snappy.parquet"
    )
    for src in (tmp_path, f"parquet:{tmp_path}"):
        list(iter_documents(src))
        assert "(news in b/news.parquet, news.parquet)" in capsys.readouterr().err


def test_a_builder_says_one_file_name_in_several_folders(tmp_path, capsys):
    """`json:FOLDER` (or a glob) over drama/part1.jsonl and legal/part1.jsonl: one domain `part1`
    mixing both with colliding ids, said as the native reader says it."""
    for d in ("drama", "legal"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "part1.jsonl").write_text('{"text": "x"}\n')
    for src in (f"json:{tmp_path}", f"json:{tmp_path}/*/part1.jsonl"):
        assert {d.domain for d in iter_documents(src)} == {"part1"}
        assert "1 file name(s) appear in several folders (part1 in drama, legal)" in capsys.readouterr().err
    (tmp_path / "legal" / "part1.jsonl").rename(tmp_path / "legal" / "part2.jsonl")
    list(iter_documents(f"json:{tmp_path}"))
    assert "several folders" not in capsys.readouterr().err


def test_a_bom_is_not_text_in_txt_files(tmp_path):
    (tmp_path / "notes.txt").write_bytes(b"\xef\xbb\xbfbom text")
    assert [d.text for d in iter_documents(tmp_path)] == ["bom text"]
    # nor through the text: builder, which reads the same file line by line
    (tmp_path / "notes.txt").write_bytes(b"\xef\xbb\xbfbom line\r\nsecond\n")
    assert [d.text for d in iter_documents(f"text:{tmp_path / 'notes.txt'}")] == ["bom line", "second"]


def test_a_bad_line_before_an_array_does_not_make_the_file_an_array(tmp_path, capsys):
    """The array check held for every line until one parsed: a bad line first, and a later line holding
    a list refused the whole file as a JSON array."""
    f = tmp_path / "x.jsonl"
    f.write_text('garbage\n["a", "b"]\n{"text": "fine"}\n')
    assert [d.text for d in iter_documents(f)] == ["fine"]
    f.write_text('{\n  "text": "spread over lines"\n}\n')  # each line was skipped as invalid, unsaid
    assert list(iter_documents(f)) == []
    assert "x.jsonl: a JSON object spread over lines" in capsys.readouterr().err
    for empty in ("", "\n  \n"):  # a language's file truncated to nothing vanished without a word
        f.write_text(empty)
        assert list(iter_documents(f)) == []
        assert "x.jsonl: empty (no line but blank ones)" in capsys.readouterr().err


def test_a_tokenizer_or_shards_written_into_the_data_folder_are_not_read_as_data(tmp_path, capsys):
    """`tokenizer train --out DATA/tok` wrote tokenizer.json there, and every later read of DATA
    refused it as a JSON array."""
    (tmp_path / "news.jsonl").write_text('{"text": "hello"}\n')
    for out in ("tok", "shards/tokenizer"):
        (tmp_path / out).mkdir(parents=True)
        (tmp_path / out / "tokenizer.json").write_text('{"model": {"vocab": [1, 2]}}')
        (tmp_path / out / "tokenizer_config.json").write_text('{"a": 1}')
    (tmp_path / "shards" / "index.json").write_text('[{"text": "no"}]')  # beside it: read, and refused
    assert [d.text for d in iter_documents(tmp_path / "news.jsonl")] == ["hello"]
    (tmp_path / "shards" / "index.json").unlink()
    assert [d.text for d in iter_documents(tmp_path)] == ["hello"]
    assert "tok/ (a tokenizer, shards or model folder)" in capsys.readouterr().err
    for name in ("tokenizer.json", "tokenizer_config.json"):  # written into the data folder itself
        (tmp_path / name).write_text('{\n  "model": {\n    "merges": [\n      ["a", "b"]\n    ]\n  }\n}\n')
    assert [d.text for d in iter_documents(tmp_path)] == ["hello"]
    assert "tokenizer.json (a tokenizer's file)" in capsys.readouterr().err


def test_a_link_to_a_file_of_the_folder_is_read_once(tmp_path, capsys):
    """Read through the link and again as itself, a document had two ids, and the split could put one
    in train and the other in test."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "a.jsonl").symlink_to("sub/b.jsonl")  # listed before its target
    (tmp_path / "c.jsonl").symlink_to(tmp_path / "sub" / "b.jsonl")
    assert [(d.id, d.text) for d in iter_documents(tmp_path)] == [("b:1", "one"), ("b:2", "two")]
    assert "a.jsonl (a link to sub/b.jsonl, read once)" in capsys.readouterr().err


def test_training_on_shards_without_a_train_split_is_refused(shards_dir, tmp_path):
    s = tmp_path / "s"
    shutil.copytree(shards_dir, s)
    index = json.loads((s / "index.json").read_text())
    for d in index["domains"].values():
        d["splits"].pop("train", None)
    (s / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="no domain has a 'train' split"):
        WindowSampler(Shards(s), None, "train", 16, 2, 0)


def test_a_domain_without_training_documents_is_said_when_every_domain_is_trained(
    shards_dir, tmp_path, capsys
):
    """All of a small domain's documents can hash to valid/test: training on every domain left it out unsaid."""
    s = tmp_path / "s"
    shutil.copytree(shards_dir, s)
    index = json.loads((s / "index.json").read_text())
    lone = sorted(index["domains"])[0]
    index["domains"][lone]["splits"].pop("train")
    (s / "index.json").write_text(json.dumps(index))
    capsys.readouterr()
    sampler = WindowSampler(Shards(s), None, "train", 16, 2, 0)
    assert lone not in sampler.domains
    assert f"domain(s) {lone} have no 'train' documents" in capsys.readouterr().err
    WindowSampler(Shards(shards_dir), None, "train", 16, 2, 0)
    assert "note" not in capsys.readouterr().err


def test_clustering_with_no_word_left_after_pruning_is_refused():
    texts = [f"word{chr(97 + i)}xyz" for i in range(12)]  # no word in two documents
    with pytest.raises(UserError, match="no word is left to cluster on.*--min-df"):
        Clusterer.fit(texts, k=2, min_df=2)


def test_long_runs_without_spaces_are_cut_for_the_bpe_trainer():
    text = "intro " + "ACGT" * 5000 + " outro"
    pieces = list(_pieces(text))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 8192 + 6 and len(pieces) == 3
    assert list(_pieces("short text")) == ["short text"]
    assert max(map(len, _pieces("ACGT" * 50_000))) <= 8192  # uncut: 15 s of BPE training at 4,096 types


def test_tokenizer_train_refuses_a_folder_holding_other_files(corpus, shards_dir, tmp_path, capsys):
    s = tmp_path / "s"
    shutil.copytree(shards_dir, s)
    before = (s / "tokenizer.json").read_bytes()
    rc, out = _run(["tokenizer", "train", "--data", corpus, "--out", s, "--vocab-size", 300], capsys)
    assert rc == 2 and "holds other files" in out and "index.json" in out and "Traceback" not in out
    assert (s / "tokenizer.json").read_bytes() == before
    fresh = tmp_path / "tok"
    fresh.mkdir()
    (fresh / ".DS_Store").write_text("")  # hidden files are not the folder's contents
    for _ in range(2):  # a folder with nothing of its own, then the previous tokenizer's (the same one)
        rc, out = _run(["tokenizer", "train", "--data", corpus, "--out", fresh, "--vocab-size", 300], capsys)
        assert rc == 0 and "replaced" not in out, out
    rc, out = _run(["tokenizer", "train", "--data", corpus, "--out", fresh, "--vocab-size", 280], capsys)
    assert rc == 0 and "note: replaced the different tokenizer" in out, out  # shards made with it are stale
    assert "note: learned" not in out  # all 280 learned
    rc, out = _run(["tokenizer", "train", "--data", corpus, "--out", fresh, "--vocab-size", 2**32], capsys)
    assert rc == 2 and "more than 1,048,576" in out, out  # asked, the BPE trainer aborted allocating 283 GB
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "hello world hello there"}\n')
    rc, out = _run(
        [
            "tokenizer",
            "train",
            "--data",
            small,
            "--out",
            tmp_path / "t",
            "--vocab-size",
            1000,
            "--valid-frac",
            0,
            "--test-frac",
            0,
        ],
        capsys,
    )
    assert rc == 0 and "note: learned 261 of the 1,000 tokens asked" in out, out


def test_shards_build_says_when_the_tokenizer_learned_from_documents_it_holds_out(corpus, tmp_path, capsys):
    """A tokenizer trained with nothing held out was taken by `shards build` at its defaults without a
    word: held-out text had shaped the vocabulary. It is said and recorded (the fingerprint unchanged)."""
    tok = tmp_path / "tok"
    argv = ["tokenizer", "train", "--data", corpus, "--out", tok, "--vocab-size", 300]
    assert _run([*argv, "--valid-frac", 0, "--test-frac", 0], capsys)[0] == 0
    plain = tmp_path / "plain"  # the same tokenizer without its record (older versions, or copied by hand)
    plain.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / name, plain / name)

    def build(out, data, tokenizer, *more):
        rc, said = _run(
            [
                "shards",
                "build",
                "--data",
                data,
                "--tokenizer",
                tokenizer,
                "--out",
                tmp_path / out,
                "--no-progress",
                *more,
            ],
            capsys,
        )
        assert rc == 0, said
        return said, Shards(tmp_path / out)

    said, saw = build("saw", corpus, tok)
    assert "note: the tokenizer learned from documents these shards hold out" in said
    assert "0 valid / 0 test held out, and these shards hold out 0.05 / 0.05" in said
    assert saw.index["tokenizer_saw_held_out"]["split"]["valid_frac"] == 0
    said, unsaid = build("unsaid", corpus, plain)
    assert "learned from documents" not in said and "tokenizer_saw_held_out" not in unsaid.index
    assert saw.fingerprint == unsaid.fingerprint  # the same data: runs on either are the same runs
    one_file = next(f for f in sorted(corpus.iterdir()) if f.suffix == ".jsonl")
    assert "learned from documents" in build("file", one_file, tok / "tokenizer.json")[0]  # a file of it
    assert _run([*argv, "--valid-frac", 0.1, "--test-frac", 0.1], capsys)[0] == 0
    assert "learned from documents" not in build("held", corpus, tok)[0]  # held out more than the shards
    assert "learned from documents" in build("more", corpus, tok, "--valid-frac", 0.2)[0]
    (tok / "tokenizer.json").write_bytes((plain / "tokenizer.json").read_bytes())  # replaced by hand
    assert "learned from documents" not in build("hand", corpus, tok, "--valid-frac", 0.2)[0]


def test_training_refuses_shards_whose_tokenizer_was_replaced(shards_dir, tmp_path, capsys):
    s = tmp_path / "s"
    shutil.copytree(shards_dir, s)
    tok = json.loads((s / "tokenizer.json").read_text())
    tok["model"]["merges"] = tok["model"]["merges"][:-1]
    (s / "tokenizer.json").write_text(json.dumps(tok))
    rc, out = _run(["train", "--shards", s, "--out", tmp_path / "r", "--preset", "tiny"], capsys)
    assert rc == 2 and "not the tokenizer its tokens were made with" in out, out


def test_eval_json_that_is_a_folder_is_refused_before_evaluating(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    rc, out = _run(
        ["eval", "--model", tmp_path / "none", "--data", tmp_path, "--json", tmp_path / "out"], capsys
    )
    assert rc == 2 and "is a folder" in out


def test_a_folder_of_loose_txt_files_says_each_is_a_domain(tmp_path, capsys):
    """Passing `corpus/web` where the data was `corpus` makes 200 one-file domains whose ids (and
    so splits) differ from the ones training used: a note says so."""
    web = tmp_path / "corpus" / "web"
    web.mkdir(parents=True)
    for i in range(20):
        (web / f"{i:03d}.txt").write_text(f"document {i}")
    assert len({d.domain for d in iter_documents(web)}) == 20
    assert "each is its own domain" in capsys.readouterr().err
    assert {d.domain for d in iter_documents(tmp_path / "corpus")} == {"web"}
    assert "own domain" not in capsys.readouterr().err


def _random_model(shards_dir, out):
    from elmforest.config import ModelConfig
    from elmforest.data.tokenizer import load_tokenizer, save_tokenizer
    from elmforest.model.build import build_model

    sh = Shards(shards_dir)
    build_model(ModelConfig(preset="tiny"), sh.vocab_size, sh.eos_id).save_pretrained(str(out))
    save_tokenizer(load_tokenizer(shards_dir), out)
    return out


def test_eval_on_raw_data_names_the_data_not_its_temporary_shards(shards_dir, tmp_path, capsys, monkeypatch):
    from elmforest.eval.bpb import evaluate

    model = _random_model(shards_dir, tmp_path / "m")
    spec = SplitSpec()
    held = next(f"d{i}" for i in range(1000) if spec.assign(f"d{i}") == "valid")
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"id": held, "text": "only a valid-split document here"}) + "\n")
    with pytest.raises(UserError, match=r"one\.jsonl: none of its 1 document\(s\) falls in the test split"):
        evaluate(model, one, device="cpu", progress=False)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text(
        "".join(json.dumps({"id": f"a{i}", "text": f"text number {i} of a"}) + "\n" for i in range(200))
    )
    (data / "b.jsonl").write_text(json.dumps({"id": held, "text": "b has only a valid document"}) + "\n")
    res = evaluate(model, data, device="cpu", progress=False, seq_len=16)
    assert list(res["domains"]) == ["a"]
    monkeypatch.chdir(tmp_path)  # given relatively, recorded where it is (as the shards index records it)
    res = evaluate(model, "json:data/*", device="cpu", progress=False, seq_len=16)
    assert res["data"] == f"json:{data}/*"
    err = capsys.readouterr().err
    assert f"note: {data}: b left out" in err and "elmforest-eval-" not in err
    with pytest.raises(NotFound) as e:
        evaluate(model, data, domains=["b"], device="cpu", progress=False, seq_len=16)
    assert str(data) in str(e.value) and "elmforest-eval-" not in str(e.value)
    assert f"{data}/shards" not in str(e.value) and str(e.value).startswith(f"{data}:")


def test_files_and_linked_folders_left_out_of_a_data_folder_are_said(tmp_path, capsys, monkeypatch):
    """A .jsonl.gz file and a link to a folder of text were dropped without a word (400 documents)."""
    import gzip
    import os

    from elmforest.data.readers import is_saved_dataset, list_data_files

    data = tmp_path / "data"
    (data / "news").mkdir(parents=True)
    (data / "news" / "a.txt").write_text("some news")
    (data / "code.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x = 1"}\n'))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.txt").write_text("more")
    os.symlink(tmp_path / "elsewhere", data / "linked")
    (data / "manifest.json").write_text("{}")  # metadata: left out silently, as before
    assert list_data_files(data) == [data / "news" / "a.txt"]
    err = capsys.readouterr().err
    assert (
        "left out 2 file(s) or folder(s) not read as data" in err
        and "code.jsonl.gz" in err
        and "linked/" in err
    )
    assert "manifest.json" not in err
    # a folder that cannot be read is named as such (not as a file in it, nor as the output)
    monkeypatch.setattr(type(data), "is_file", lambda self: (_ for _ in ()).throw(PermissionError(13, "no")))
    with pytest.raises(DataError, match="cannot read this folder"):
        is_saved_dataset(data)


def test_shards_build_says_which_domains_got_no_valid_or_test_documents(tokenizer_dir, tmp_path, capsys):
    """A domain of one document lands whole in one split: said at the build, not first where a prior
    or an evaluation finds nothing of it."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "one.jsonl").write_text('{"text": "a lone document"}\n')
    (data / "big.jsonl").write_text("".join(json.dumps({"text": f"doc {i} text"}) + "\n" for i in range(300)))
    argv = ["shards", "build", "--data", data, "--tokenizer", tokenizer_dir, "--out", tmp_path / "s"]
    assert main([str(a) for a in [*argv, "--no-progress"]]) == 0
    err = capsys.readouterr().err
    assert "note: no valid documents in one (too few" in err and "note: no test documents in one" in err
    assert "big" not in err


def test_each_note_on_the_files_is_said_once_when_a_corpus_is_read_again(tmp_path, capsys):
    """The corpus is read for the tokenizer and again for the shards, the out-of-domain sets for their
    checks and again for theirs: a note on a file left out was said two or three times."""
    from elmforest.launch.prepare import prepare_data

    for d in ("a", "b"):
        (tmp_path / "c" / d).mkdir(parents=True)
        for i in range(12):
            (tmp_path / "c" / d / f"{i}.txt").write_text(f"{d} words number {i} " * 40)
    (tmp_path / "c" / "README.md").write_text("not data")
    (tmp_path / "c" / "a" / "empty.txt").write_text("  \n")  # skipped, and said (it was in the index only)
    (tmp_path / "ood").mkdir()
    (tmp_path / "ood" / "news.jsonl").write_text(
        "".join(json.dumps({"text": f"news {i} " * 30}) + "\n" for i in range(8))
    )
    (tmp_path / "ood" / "notes.md").write_text("not data")
    prepare_data(
        tmp_path / "out",
        300,
        corpus=tmp_path / "c",
        ood=[tmp_path / "ood"],
        progress=False,
    )
    out, err = capsys.readouterr()
    assert "24 documents from 25 file(s); skipped 1 bad record(s) (empty_text: 1)" in out, out
    assert err.count("left out 1 file(s)") == 2, err
    assert err.count("README.md") == 1 and err.count("notes.md") == 1, err


def test_the_quickstart_refuses_a_domain_it_would_drop_or_could_not_train_naming_its_flag(
    shards_dir, tmp_path
):
    """A domain whose few documents all hashed to valid/test was left out of every table without a word;
    one with less training text than a window was refused by the trainer, advising data.domains."""
    from elmforest.quickstart import _check_domains

    s = tmp_path / "s"
    shutil.copytree(shards_dir, s)
    index = json.loads((s / "index.json").read_text())
    lone, *names = sorted(index["domains"])
    index["domains"][lone]["splits"].pop("train")
    (s / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=rf"domain\(s\) {lone} have no training documents.*\(--domains\)"):
        _check_domains(Shards(s), names, 17)
    _check_domains(Shards(s), names, 17, every=False)  # --domains left it out
    n, d = min((Shards(s).info(d, "train")["tokens"], d) for d in names)
    with pytest.raises(UserError, match=rf": {d} \({n} tokens\); .*leave them out \(--domains\)"):
        _check_domains(Shards(s), names, n + 1, every=False)
    _check_domains(Shards(s), names, n, every=False)
