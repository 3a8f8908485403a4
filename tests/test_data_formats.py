"""Data in the formats people have (issue 15): saved Hugging Face datasets and `datasets` builders
(json/parquet/csv/text, streamed) give the same documents, ids, domains and shards as the same
records in JSON lines; --text-field / --domain-field / --hf-split; bad records counted as before."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from elmforest.cli import main
from elmforest.data.readers import DataError, ReadStats, iter_documents
from elmforest.data.sources import parse_source, resolve_source, with_options
from elmforest.data.splits import SplitSpec
from elmforest.utils.errors import UserError

SPLIT = SplitSpec(0.2, 0.2)


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("datasets", reason="the optional `datasets` package is not installed")


def _records(n: int = 30) -> list[dict]:
    words = {"news": "market vote city rain report".split(), "code": "def return class import self".split()}
    out = []
    for i in range(n):
        domain = "news" if i % 3 else "code"
        text = " ".join(words[domain][(i + j) % 5] for j in range(5 + i % 7))
        if i % 5 == 0:
            text += ", café — ✓\n  second line"
        out.append({"id": f"{i:03d}", "domain": domain, "text": text})  # "007": not the number 7
    return out


def _write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


def _write_csv(path: Path, recs: list[dict], rename: dict | None = None, sep: str = ",") -> Path:
    rename = rename or {}
    cols = list(recs[0])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow([rename.get(c, c) for c in cols])
        for r in recs:
            w.writerow([r[c] for c in cols])
    return path


def _docs(source, **kw) -> tuple[list[tuple], dict]:
    stats = ReadStats()
    docs = [(d.id, d.domain, d.text) for d in iter_documents(source, stats, **kw)]
    return docs, stats.to_dict()


def _shards_content(root: Path) -> dict:
    """Everything a shards directory holds but where it was read from (and how many files)."""
    index = json.loads((root / "index.json").read_text())
    del index["source"], index["read"]["files"]
    out = {"index": index}
    for f in sorted(root.rglob("*")):
        if f.suffix in (".bin", ".npy"):
            out[f.relative_to(root).as_posix()] = (
                np.load(f).tolist() if f.suffix == ".npy" else f.read_bytes()
            )
    return out


# ---- the source string -------------------------------------------------------------------------


def test_a_plain_path_stays_exactly_as_given_and_specs_round_trip(tmp_path):
    for plain in ["data/x.jsonl", "./json:x", "notes.txt", "C:x", "jsonl:x", str(tmp_path)]:
        assert parse_source(plain).format is None and str(parse_source(plain)) == plain
        assert with_options(plain) == plain
    assert with_options("data", text_field="text", domain_field="domain") == "data"  # the defaults
    s = with_options("d/x.csv", text_field="body text", domain_field="a,b:c/d")
    assert s == "auto,text=body%20text,domain=a%2Cb%3Ac%2Fd:d/x.csv"
    src = parse_source(str(Path(s)))  # build_shards passes its data through Path(): nothing changes
    assert (src.format, src.location, src.text_field, src.domain_field) == (
        "auto",
        "d/x.csv",
        "body text",
        "a,b:c/d",
    )
    src = parse_source(with_options("csv:in/*.csv", "body"))
    assert (src.format, src.location, src.text_field, src.domain_field) == (
        "csv",
        "in/*.csv",
        "body",
        "domain",
    )
    assert parse_source(with_options("saved", hf_split=["train", "test"])).hf_splits == ["train", "test"]
    assert resolve_source("csv,text=b:x/*.csv") == f"csv,text=b:{Path.cwd() / 'x/*.csv'}"
    assert resolve_source("x.jsonl") == str(Path("x.jsonl").resolve())


def test_bad_specs_and_contradicting_options_are_refused():
    with pytest.raises(UserError, match="unknown option 'txt'"):
        parse_source("csv,txt=body:x.csv")
    with pytest.raises(UserError, match="applies to auto, not csv"):
        parse_source("csv,split=train:x.csv")
    with pytest.raises(UserError, match="sample_by 'bogus': expected one of line, paragraph, document"):
        parse_source("text,sample_by=bogus:x.txt")  # the builder read 0 documents without a word
    with pytest.raises(UserError, match="'text' given twice"):
        parse_source("json,text=a,text=b:x")
    with pytest.raises(UserError, match="contradicts"):
        with_options("csv,text=body:x.csv", text_field="other")
    # the default named (`--text-field text`) was dropped before the check: the string's `body` was read
    with pytest.raises(UserError, match=r"--text-field 'text' contradicts text='body'"):
        with_options("auto,text=body:x.jsonl", text_field="text")
    with pytest.raises(UserError, match=r"--domain-field 'domain' contradicts domain='lang'"):
        with_options("auto,domain=lang:x.jsonl", domain_field="domain")
    assert with_options("json:x.jsonl", text_field="text") == "json:x.jsonl"  # agrees: unchanged
    with pytest.raises(UserError, match="--hf-split applies"):
        with_options("json:x", hf_split=["train"])
    with pytest.raises(DataError, match="only local files"):
        list(iter_documents("json:hf://datasets/someone/thing"))
    for url in ("hf://datasets/someone/thing", "https://example.com/x.jsonl"):  # was "hf:/...: no such file"
        with pytest.raises(DataError, match=f"{url}: only local files are read"):
            list(iter_documents(url))


def test_a_missing_datasets_package_names_the_extra(tmp_path, monkeypatch):
    _write_jsonl(tmp_path / "a.jsonl", _records(2))
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(UserError, match=r"pip install 'elmforest\[datasets\]'"):
        list(iter_documents(f"json:{tmp_path}/a.jsonl"))


# ---- the same documents in every format --------------------------------------------------------


def test_every_format_gives_the_jsonl_documents_ids_and_domains(hf, tmp_path):
    recs = _records()
    jsonl = _write_jsonl(tmp_path / "mix.jsonl", recs)
    want, want_stats = _docs(jsonl)
    assert len(want) == len(recs) and want_stats["skipped"] == {}
    cols = {k: [r[k] for r in recs] for k in recs[0]}
    hf.Dataset.from_dict(cols).save_to_disk(str(tmp_path / "saved" / "mix"))
    _write_csv(tmp_path / "mix.csv", recs)
    hf.Dataset.from_dict(cols).to_parquet(str(tmp_path / "mix.parquet"))
    for source in [
        tmp_path / "saved" / "mix",  # a saved Dataset, found by its folder
        tmp_path / "saved",  # ... or inside a folder
        f"json:{jsonl}",
        f"csv:{tmp_path}/mix.csv",
        f"parquet:{tmp_path}/*.parquet",
        f"auto:{tmp_path}/mix.parquet",
    ]:
        assert _docs(source) == (want, want_stats), source


def test_without_ids_each_format_numbers_rows_like_the_jsonl_reader(hf, tmp_path):
    recs = [{"text": r["text"]} for r in _records(12)]
    want, _ = _docs(_write_jsonl(tmp_path / "notes.jsonl", recs))
    assert [d[:2] for d in want[:2]] == [("notes:1", "notes"), ("notes:2", "notes")]
    hf.Dataset.from_dict({"text": [r["text"] for r in recs]}).save_to_disk(str(tmp_path / "saved" / "notes"))
    (tmp_path / "c").mkdir()
    _write_csv(tmp_path / "c" / "notes.csv", recs)
    assert _docs(tmp_path / "saved" / "notes")[0] == want
    assert _docs(f"csv:{tmp_path}/c")[0] == want  # a folder: its .csv files
    (tmp_path / "tsv").mkdir()
    _write_csv(tmp_path / "tsv" / "notes.tsv", recs, sep="\t")
    assert _docs(f"csv:{tmp_path}/tsv/notes.tsv")[0] == want  # tab-separated by its name
    assert _docs(f"json:{tmp_path}/notes.jsonl")[0] == want
    # a text file: one document per line, numbered as the lines of JSON lines are (blank ones skipped)
    lines = ["first line", "", "third line", "   ", "fifth"]
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "lines.txt").write_text("\n".join(lines) + "\n")
    _write_jsonl(tmp_path / "t" / "lines.jsonl", [{"text": x} if x.strip() else {} for x in lines])
    jl = (tmp_path / "t" / "lines.jsonl").read_text().replace("{}\n", "\n")
    (tmp_path / "t" / "lines.jsonl").write_text(jl)
    as_text = _docs(f"text:{tmp_path}/t/lines.txt")
    assert as_text == _docs(tmp_path / "t" / "lines.jsonl")
    assert [d[0] for d in as_text[0]] == ["lines:1", "lines:3", "lines:5"] and as_text[1]["skipped"] == {}
    whole = _docs(f"text,sample_by=document:{tmp_path}/t/lines.txt")[0]
    assert whole == [("lines:1", "lines", "\n".join(lines) + "\n")]


def test_shards_from_a_saved_dataset_and_from_csv_equal_those_from_jsonl(hf, tmp_path, tokenizer_dir):
    from elmforest.data.shards_build import build_shards

    recs = _records(40)
    _write_jsonl(tmp_path / "mix.jsonl", recs)
    hf.Dataset.from_dict({k: [r[k] for r in recs] for k in recs[0]}).save_to_disk(str(tmp_path / "mix"))
    _write_csv(tmp_path / "mix.csv", recs)
    built = {}
    for name, source in [
        ("jsonl", tmp_path / "mix.jsonl"),
        ("saved", tmp_path / "mix"),
        ("csv", f"csv:{tmp_path}/mix.csv"),
    ]:
        build_shards(source, tokenizer_dir, tmp_path / name, SPLIT, progress=False)
        built[name] = _shards_content(tmp_path / name)
    assert built["saved"] == built["jsonl"] and built["csv"] == built["jsonl"]
    splits = {s for d in built["jsonl"]["index"]["domains"].values() for s in d["splits"]}
    assert splits == {"train", "valid", "test"}  # the comparison covers the split assignment


# ---- fields, splits, bad records ---------------------------------------------------------------


def test_text_and_domain_fields_through_the_cli(hf, tmp_path, tokenizer_dir, capsys):
    recs = _records(40)
    _write_jsonl(tmp_path / "mix.jsonl", recs)
    _write_csv(tmp_path / "mix.csv", recs, rename={"text": "body", "domain": "source"})
    args = ["--tokenizer", str(tokenizer_dir), "--valid-frac", "0.2", "--test-frac", "0.2", "--no-progress"]
    assert (
        main(["shards", "build", "--data", str(tmp_path / "mix.jsonl"), "--out", str(tmp_path / "a"), *args])
        == 0
    )
    capsys.readouterr()
    rc = main(
        ["shards", "build", "--data", f"csv:{tmp_path}/mix.csv", "--out", str(tmp_path / "b"), *args,
         "--text-field", "body", "--domain-field", "source"]
    )  # fmt: skip
    assert rc == 0
    assert capsys.readouterr().out.startswith("read 40 documents from 1 file(s)\n")
    assert _shards_content(tmp_path / "b") == _shards_content(tmp_path / "a")
    assert sorted(json.loads((tmp_path / "b" / "index.json").read_text())["domains"]) == ["code", "news"]
    # without --domain-field the file's name is the domain, as for any file without a domain field
    rc = main(
        [
            "shards",
            "build",
            "--data",
            f"csv:{tmp_path}/mix.csv",
            "--out",
            str(tmp_path / "c"),
            *args,
            "--text-field",
            "body",
        ]
    )
    assert rc == 0 and list(json.loads((tmp_path / "c" / "index.json").read_text())["domains"]) == ["mix"]
    # a field the data does not have is an error naming it
    assert (
        main(["shards", "build", "--data", f"csv:{tmp_path}/mix.csv", "--out", str(tmp_path / "d"), *args])
        != 0
    )
    assert "csv file has no 'text' column (columns: ['body', 'id', 'source'])" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_the_fields_apply_to_jsonl_and_parquet_too_and_a_missing_one_is_an_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"id": r["id"], "src": r["domain"], "body": r["text"]} for r in _records(6)]
    _write_jsonl(tmp_path / "x.jsonl", recs)
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "x.parquet")
    want = [(r["id"], r["src"], r["body"]) for r in recs]
    assert _docs(tmp_path / "x.jsonl", text_field="body", domain_field="src")[0] == want
    assert _docs(tmp_path / "x.parquet", text_field="body", domain_field="src")[0] == want
    with pytest.raises(DataError, match=r"x.jsonl: no record has the field\(s\) 'source'"):
        list(iter_documents(tmp_path / "x.jsonl", text_field="body", domain_field="source"))
    with pytest.raises(DataError, match="x.parquet: Parquet file has no 'source' column"):
        list(iter_documents(tmp_path / "x.parquet", text_field="body", domain_field="source"))
    # with the default fields nothing changes: a record without `text` is counted, not an error
    assert _docs(tmp_path / "x.jsonl") == ([], {"documents": 0, "files": 1, "skipped": {"missing_text": 6}})


def test_a_dataset_dict_reads_every_split_or_those_asked_for(hf, tmp_path):
    a = hf.Dataset.from_dict({"text": ["one", "two"]})
    b = hf.Dataset.from_dict({"text": ["three"]})
    hf.DatasetDict({"train": a, "test": b}).save_to_disk(str(tmp_path / "dd"))
    every = [("dd:train:1", "dd", "one"), ("dd:train:2", "dd", "two"), ("dd:test:1", "dd", "three")]
    assert _docs(tmp_path / "dd") == (every, {"documents": 3, "files": 2, "skipped": {}})
    assert _docs(tmp_path / "dd", hf_split=["test"])[0] == every[2:]
    assert _docs(f"auto,split=test+train:{tmp_path}/dd")[0] == every[2:] + every[:2]
    assert _docs(tmp_path / "dd" / "test")[0] == every[2:]  # one split's folder: the same ids
    with pytest.raises(DataError, match="no split.* validation .*splits: train, test"):
        list(iter_documents(tmp_path / "dd", hf_split=["validation"]))
    with pytest.raises(DataError, match="saved dataset has no 'body' column"):
        list(iter_documents(tmp_path / "dd", text_field="body"))
    # a split asked for is read, or refused: never silently other rows, nor one split twice
    with pytest.raises(DataError, match="split 'train' of a saved DatasetDict.*test were asked for"):
        list(iter_documents(tmp_path / "dd" / "train", hf_split=["test"]))
    a.save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(DataError, match="not a DatasetDict, so it has no split test"):
        list(iter_documents(tmp_path / "plain", hf_split=["test"]))
    (tmp_path / "j").mkdir()
    _write_jsonl(tmp_path / "j" / "x.jsonl", _records(3))
    with pytest.raises(DataError, match="none here"):
        list(iter_documents(tmp_path / "j", hf_split=["validation"]))
    with pytest.raises(UserError, match=r"\['train'\] given twice"):
        list(iter_documents(tmp_path / "dd", hf_split=["train", "train"]))


def test_bad_records_are_counted_as_by_the_native_readers(hf, tmp_path):
    lines = [
        {"id": "a", "text": "good one"},
        {"id": "b"},  # missing text
        {"id": "c", "text": "   "},  # empty
        {"id": "d", "text": 42},  # wrong type
        {"id": "e", "text": "second good", "domain": "sports"},
        {"id": "f", "text": "bad domain", "domain": 7},  # a domain that is not a string
        {"id": "g", "text": None},
        {"id": 3.0, "text": "a float id", "domain": "floats"},  # pandas' int ids once a NaN made them floats
        {"id": float("nan"), "text": "no id", "domain": "floats"},  # NaN: no id (the line's)
        {"id": 2.5, "text": "a fractional id"},
    ]
    _write_jsonl(tmp_path / "news.jsonl", lines)
    native = _docs(tmp_path / "news.jsonl")
    assert native == (
        [
            ("a", "news", "good one"),
            ("e", "sports", "second good"),
            ("3", "floats", "a float id"),
            ("news:9", "floats", "no id"),
        ],
        {
            "documents": 4,
            "files": 1,
            "skipped": {
                "missing_text": 2,
                "empty_text": 1,
                "wrong_type(text)": 1,
                "wrong_type(domain)": 1,  # the field is named: a user could not tell which it was
                "wrong_type(id)": 1,
            },
        },
    )
    assert _docs(f"json:{tmp_path}/news.jsonl") == native
    # a saved dataset: typed columns, so a bad domain is a whole column of another type
    cols = {"text": ["ok", None, " ", "fine"], "domain": ["x", "y", "", None]}
    hf.Dataset.from_dict(cols).save_to_disk(str(tmp_path / "typed"))
    assert _docs(tmp_path / "typed") == (
        [("typed:1", "x", "ok"), ("typed:4", "typed", "fine")],
        {"documents": 2, "files": 1, "skipped": {"missing_text": 1, "empty_text": 1}},
    )
    hf.Dataset.from_dict({"text": ["a", "b"], "domain": [1, 2]}).save_to_disk(str(tmp_path / "intdom"))
    assert _docs(tmp_path / "intdom")[1]["skipped"] == {"wrong_type(domain)": 2}


def test_a_class_label_column_names_the_domains(hf, tmp_path):
    feats = hf.Features({"text": hf.Value("string"), "label": hf.ClassLabel(names=["world", "sports"])})
    hf.Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 0, 1]}, features=feats).save_to_disk(
        str(tmp_path / "ag")
    )
    assert [d[1] for d in _docs(tmp_path / "ag", domain_field="label")[0]] == ["sports", "world", "sports"]


def test_a_saved_dataset_inside_a_folder_is_read_whole_not_as_json_files(hf, tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "from jsonl"}])
    hf.Dataset.from_dict({"text": ["from arrow"]}).save_to_disk(str(tmp_path / "z" / "b"))
    docs, stats = _docs(tmp_path)
    assert docs == [("a:1", "a", "from jsonl"), ("b:1", "b", "from arrow")]
    assert stats == {"documents": 2, "files": 2, "skipped": {}}  # its state.json is no JSON lines


def test_clustering_and_tokenizer_training_read_the_new_formats_alike(hf, tmp_path):
    from elmforest.cluster.assign import sample_texts
    from elmforest.data.bpe import train_bpe_on

    recs = _records(30)
    _write_jsonl(tmp_path / "mix.jsonl", recs)
    _write_csv(tmp_path / "mix.csv", recs, rename={"text": "body"})
    csv_src = with_options(f"csv:{tmp_path}/mix.csv", text_field="body")
    assert sample_texts(csv_src, 10, seed=3)[0] == sample_texts(tmp_path / "mix.jsonl", 10, seed=3)[0]
    a, _ = train_bpe_on(csv_src, 300, valid_frac=0.2, test_frac=0.2)
    b, _ = train_bpe_on(tmp_path / "mix.jsonl", 300, valid_frac=0.2, test_frac=0.2)
    assert a.fingerprint() == b.fingerprint()


def test_eval_refuses_reading_options_for_a_shards_dir(shards_dir, capsys):
    assert main(["eval", "--data", str(shards_dir), "--model", "m", "--text-field", "body"]) != 0
    assert "read raw data, not a shards directory" in capsys.readouterr().err


def test_csv_cells_pandas_reads_as_missing_are_text(hf, tmp_path):
    """pandas' missing-value words applied under the str converters: a domain `nan` (Min Nan's ISO 639-3
    code) became the file's name, an id `NA` the default id, a text `NA` a skipped record. An empty
    cell is still missing."""
    (tmp_path / "langs.csv").write_text(
        "id,text,domain\nNA,first doc,nan\nnull,second doc,NA\nN/A,NA,None\n4,,x\n"
    )
    docs, stats = _docs(f"csv:{tmp_path}/langs.csv")
    assert docs == [("NA", "nan", "first doc"), ("null", "NA", "second doc"), ("N/A", "None", "NA")]
    assert stats["skipped"] == {"missing_text": 1}


def test_the_dot_slash_escape_reaches_shards_build(tmp_path, tokenizer_dir, monkeypatch):
    """`./json:x.jsonl` names a file really called so (docs/data-formats.md); shards build made it a
    Path, which drops the `./`, and read it as the json builder's source `x.jsonl`."""
    from elmforest.cli import main

    monkeypatch.chdir(tmp_path)
    _write_jsonl(
        tmp_path / "json:x.jsonl", [{"text": f"document {i} of a file named oddly"} for i in range(40)]
    )
    argv = ["shards", "build", "--data", "./json:x.jsonl", "--tokenizer", str(tokenizer_dir), "--out", "sh"]
    assert main([*argv, "--no-progress"]) == 0
    from elmforest.data.shards import Shards

    assert Shards(tmp_path / "sh").domains == ["json:x"]


def test_a_saved_dataset_named_through_dots_is_the_same_dataset(hf, tmp_path, monkeypatch):
    """`hf/agnews/train/..` took the domain `..`, and `.` inside a DatasetDict's split folder missed the
    dict's name: other domains, ids and so splits for the same files."""
    hf.DatasetDict({"train": hf.Dataset.from_dict({"text": ["a b c", "d e f"]})}).save_to_disk(
        str(tmp_path / "agnews")
    )
    want = _docs(tmp_path / "agnews")
    assert want[0][0][:2] == ("agnews:train:1", "agnews")
    assert _docs(tmp_path / "agnews" / "train" / "..") == want
    monkeypatch.chdir(tmp_path / "agnews")
    assert _docs(".") == want
    monkeypatch.chdir(tmp_path / "agnews" / "train")
    assert _docs(".")[0] == [("agnews:train:1", "agnews", "a b c"), ("agnews:train:2", "agnews", "d e f")]


def test_a_binary_text_column_reads_alike_natively_and_through_the_builder(hf, tmp_path):
    """Through `parquet:` every binary text was `wrong_type(text)`; read natively the valid ones are
    documents and the rest `invalid_utf8`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"text": pa.array([b"hello world", b"\xff\xfe bad", None], type=pa.binary())}),
        tmp_path / "bin.parquet",
    )
    native = _docs(tmp_path / "bin.parquet")
    assert native[0] == [("bin:1", "bin", "hello world")]
    assert native[1]["skipped"] == {"invalid_utf8": 1, "missing_text": 1}
    assert _docs(f"parquet:{tmp_path}/bin.parquet") == native


def test_malformed_saved_dataset_metadata_is_a_clear_error(hf, tmp_path):
    """A state.json filename of 5 or a split name of 3 raised TypeError (a traceback), a ClassLabel's
    names as a dict KeyError, and a filename `../test/...` read the other split's file too."""
    import shutil

    from elmforest.data.documents import DataError

    dd = hf.DatasetDict(
        {s: hf.Dataset.from_dict({"text": [f"{s} one", f"{s} two"]}) for s in ("train", "test")}
    )
    dd.save_to_disk(str(tmp_path / "good"))
    theirs = json.loads((tmp_path / "good" / "test" / "state.json").read_text())["_data_files"][0]["filename"]

    def broken(name, file, edit):
        shutil.copytree(tmp_path / "good", tmp_path / name)
        p = tmp_path / name / file
        p.write_text(json.dumps(edit(json.loads(p.read_text()))))
        return tmp_path / name

    cases = [
        (
            broken("splits", "dataset_dict.json", lambda d: {**d, "splits": ["train", 3]}),
            "no list of split names",
        ),
        (
            broken("num", "train/state.json", lambda d: {**d, "_data_files": [{"filename": 5}]}),
            "not file names",
        ),
        (
            broken(
                "up", "train/state.json", lambda d: {**d, "_data_files": [{"filename": f"../test/{theirs}"}]}
            ),
            "not file names",
        ),
    ]
    for path, said in cases:
        with pytest.raises(DataError, match=said):
            _docs(path)
    labels = hf.Dataset.from_dict(
        {"text": ["a b", "c d"], "domain": [0, 1]},
        features=hf.Features({"text": hf.Value("string"), "domain": hf.ClassLabel(names=["x", "y"])}),
    )
    labels.save_to_disk(str(tmp_path / "labels"))
    info = tmp_path / "labels" / "dataset_info.json"
    d = json.loads(info.read_text())
    d["features"]["domain"]["names"] = {"0": "x"}
    info.write_text(json.dumps(d))
    with pytest.raises(DataError, match="has no list of names"):
        _docs(tmp_path / "labels")


def test_a_builder_folder_reads_a_linked_file_once_and_leaves_a_tokenizer_out(hf, tmp_path, capsys):
    """`json:FOLDER` read a link to a file of the folder as a second file (the same text under two ids,
    which the split could put in train and in test) and a tokenizer folder inside it as data; the native
    reader reads the file once and leaves the tokenizer out."""
    import os

    f = tmp_path / "f"
    (f / "sub").mkdir(parents=True)
    _write_jsonl(f / "sub" / "a.jsonl", [{"text": f"in sub {i}"} for i in range(3)])
    os.symlink(f / "sub" / "a.jsonl", f / "link.jsonl")
    (f / "tokdir").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (f / "tokdir" / name).write_text('{"version": "1.0"}')
    docs, _ = _docs(f"json:{f}")
    assert [d[2] for d in docs] == ["in sub 0", "in sub 1", "in sub 2"]
    assert "link.jsonl (a link to" in capsys.readouterr().err


def test_a_file_a_builder_cannot_parse_is_one_line_not_the_builders_log_first(hf, tmp_path, capfd):
    """`json:DIR/*` over a Parquet file printed the json builder's own log line ("Failed to load JSON
    from file ...") before elmforest's error naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"text": ["a parquet file"]}), tmp_path / "d" / "x.parquet")
    import logging

    seen: list[str] = []
    spy = logging.Handler()
    spy.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("datasets").addHandler(spy)  # (its own handler holds a stderr pytest may not capture)
    try:
        with pytest.raises(DataError, match="cannot read with the json builder"):
            list(iter_documents(f"json:{tmp_path / 'd'}/*", ReadStats()))
    finally:
        logging.getLogger("datasets").removeHandler(spy)
    out = capfd.readouterr()
    assert not [m for m in seen if "Failed to load JSON" in m] and "Failed to load JSON" not in out.err
