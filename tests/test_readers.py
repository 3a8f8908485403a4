import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from elmforest.data.readers import DataError, ReadStats, iter_documents


def test_jsonl_bad_records_are_skipped_and_counted(tmp_path):
    p = tmp_path / "news.jsonl"
    lines = [
        json.dumps({"id": "a", "text": "good one"}).encode(),
        json.dumps({"id": "b"}).encode(),  # missing text
        json.dumps({"id": "c", "text": "   "}).encode(),  # empty
        json.dumps({"id": "d", "text": 42}).encode(),  # wrong type
        b'{"id": "e", "text": "bad \xff\xfe bytes"}',  # invalid UTF-8
        b"{not json",
        b'{"id": "f", "text": "lone \\ud800 surrogate"}',  # not encodable as UTF-8
        json.dumps({"id": "g", "text": "second good", "domain": "sports"}).encode(),
        json.dumps(["not", "an", "object"]).encode(),
    ]
    p.write_bytes(b"\n".join(lines) + b"\n")
    stats = ReadStats()
    docs = list(iter_documents(p, stats))
    assert [(d.id, d.domain, d.text) for d in docs] == [
        ("a", "news", "good one"),
        ("g", "sports", "second good"),
    ]
    assert stats.documents == 2
    assert dict(stats.skipped) == {
        "missing_text": 1,
        "empty_text": 1,
        "wrong_type(text)": 1,
        "invalid_utf8": 2,
        "invalid_json": 1,
        "not_an_object": 1,
    }
    assert "skipped 7 bad record(s)" in stats.summary()


def test_parquet_streams_and_takes_domain_from_file_name(tmp_path):
    p = tmp_path / "legal.parquet"
    table = pa.table({"text": ["one", None, "", "four"] * 300, "id": [str(i) for i in range(1200)]})
    pq.write_table(table, p, row_group_size=100)
    stats = ReadStats()
    docs = list(iter_documents(p, stats))
    assert len(docs) == 600 and {d.domain for d in docs} == {"legal"}
    assert docs[0].id == "0" and docs[1].text == "four"
    assert stats.skipped == {"missing_text": 300, "empty_text": 300}


def test_parquet_binary_text_with_invalid_utf8(tmp_path):
    p = tmp_path / "bin.parquet"
    pq.write_table(
        pa.table({"text": pa.array([b"ok", b"\xff\xfe"], type=pa.binary()), "domain": ["x", "y"]}), p
    )
    stats = ReadStats()
    docs = list(iter_documents(p, stats))
    assert [(d.domain, d.text) for d in docs] == [("x", "ok")]
    assert stats.skipped == {"invalid_utf8": 1}


def test_txt_folder_domains_from_folder_or_file_name(tmp_path):
    (tmp_path / "poetry").mkdir()
    (tmp_path / "poetry" / "a.txt").write_text("roses are red")
    (tmp_path / "poetry" / "b.txt").write_bytes(b"\xff broken")
    (tmp_path / "notes.txt").write_text("a loose note")
    stats = ReadStats()
    docs = sorted(iter_documents(tmp_path, stats), key=lambda d: d.id)
    assert [(d.id, d.domain) for d in docs] == [("notes.txt", "notes"), ("poetry/a.txt", "poetry")]
    assert stats.skipped == {"invalid_utf8": 1}


def test_unreadable_inputs_name_the_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(iter_documents(tmp_path / "missing.jsonl"))
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match="broken.parquet"):
        list(iter_documents(bad))
    nocol = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"body": ["x"]}), nocol)
    with pytest.raises(DataError, match="no 'text' column"):
        list(iter_documents(nocol))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported"):
        list(iter_documents(tmp_path / "x.csv"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no data files"):
        list(iter_documents(empty))


def test_reading_is_lazy(tmp_path):
    """The first document arrives before the file has been read to its end: lines appended after the
    first document was taken are still read. A reader that loads the whole file (or the list of its
    documents) up front never sees them."""
    p = tmp_path / "growing.jsonl"
    p.write_text(json.dumps({"id": "0", "text": "doc 0"}) + "\n")
    stats = ReadStats()
    it = iter_documents(p, stats)
    first = next(it)
    assert (first.id, first.text) == ("0", "doc 0") and stats.documents == 1
    with open(p, "a") as f:  # written only now, after the first document was consumed
        for i in range(1, 4):
            f.write(json.dumps({"id": str(i), "text": f"doc {i}"}) + "\n")
    assert [d.text for d in it] == ["doc 1", "doc 2", "doc 3"]
    assert stats.documents == 4


def test_parquet_is_read_one_batch_at_a_time(tmp_path, monkeypatch):
    """Parquet: the first document is yielded after one record batch, not after the whole file."""
    p = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(5000)]}), p, row_group_size=500)
    taken = []
    real = pq.ParquetFile.iter_batches

    def counting(self, *a, **k):
        for batch in real(self, *a, **k):
            taken.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    monkeypatch.setattr(pq, "read_table", None)  # an eager reader fails here instead of passing
    it = iter_documents(p)
    assert next(it).text == "doc 0"
    assert len(taken) == 1 and taken[0] < 5000
    assert sum(1 for _ in it) == 4999 and sum(taken) == 5000


def test_entries_with_a_data_suffix_that_are_not_readable_files_are_errors_naming_them(tmp_path):
    """A dangling link or a fifo called x.jsonl beside good files was silently skipped."""
    import os

    (tmp_path / "good.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    (tmp_path / "linked.jsonl").symlink_to(tmp_path / "good.jsonl")  # a link to a file the folder
    assert [d.text for d in iter_documents(tmp_path)] == ["fine"]  # also holds: read once, as the file
    (tmp_path / "sub").mkdir()
    gone = tmp_path / "sub" / "gone.jsonl"
    gone.symlink_to(tmp_path / "nowhere.jsonl")
    with pytest.raises(DataError, match=r"gone\.jsonl: .*dangling") as e:
        list(iter_documents(tmp_path))
    assert str(gone) in str(e.value)
    with pytest.raises(DataError, match=r"gone\.jsonl: .*dangling"):
        list(iter_documents(gone))  # named directly
    gone.unlink()
    (tmp_path / "parts.parquet").mkdir()  # a folder named like data (Spark's x.parquet/) is searched
    (tmp_path / "parts.parquet" / "more.jsonl").write_text(json.dumps({"text": "inside"}) + "\n")
    assert sorted(d.text for d in iter_documents(tmp_path)) == ["fine", "inside"]
    shutil.rmtree(tmp_path / "parts.parquet")
    os.mkfifo(tmp_path / "pipe.ndjson")
    with pytest.raises(DataError, match=r"pipe\.ndjson: .*not a regular file"):
        list(iter_documents(tmp_path))  # and it must not hang reading the fifo
    with pytest.raises(DataError, match=r"pipe\.ndjson: .*not a regular file"):
        list(iter_documents(tmp_path / "pipe.ndjson"))


def test_elmforest_metadata_files_are_not_data(tmp_path):
    (tmp_path / "news.jsonl").write_text(json.dumps({"text": "a story"}) + "\n")
    (tmp_path / "report.meta.json").write_text(json.dumps({"k": 3, "sizes": [1, 2, 3]}, indent=2))
    stats = ReadStats()
    assert [d.text for d in iter_documents(tmp_path, stats)] == ["a story"]
    assert stats.files == 1 and not stats.skipped


def test_one_file_name_in_several_folders_is_said(tmp_path, capsys):
    """drama/part1.jsonl and legal/part1.jsonl without a `domain` field: one domain 'part1' mixing both,
    with colliding ids, and nothing said."""
    from elmforest.data.readers import list_data_files

    for d in ("drama", "legal"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "part1.jsonl").write_text('{"text": "x"}\n')
        (tmp_path / d / f"{d}.jsonl").write_text('{"text": "y"}\n')
    list_data_files(tmp_path)
    err = capsys.readouterr().err
    assert "1 file name(s) appear in several folders (part1 in drama, legal)" in err
    (tmp_path / "legal" / "part1.jsonl").rename(tmp_path / "legal" / "part2.jsonl")
    list_data_files(tmp_path)
    assert "several folders" not in capsys.readouterr().err


def test_a_byte_order_mark_before_the_first_json_line_is_dropped(tmp_path):
    """docs/data-formats.md: a BOM is dropped from JSON lines too (only .txt was tested); read as text
    it made the first record invalid JSON, lost with a count."""
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    stats = ReadStats()
    assert [d.text for d in iter_documents(p, stats)] == ["first", "second"]
    assert not stats.skipped
    # files that each open with one, joined by `cat`, and a line of a BOM alone (was invalid JSON)
    p.write_bytes(b'\xef\xbb\xbf\n\xef\xbb\xbf{"text": "a"}\n\xef\xbb\xbf{"text": "b"}\n')
    assert [d.text for d in iter_documents(p, stats)] == ["a", "b"] and not stats.skipped


def test_hidden_data_files_and_folders_are_left_out_silently(tmp_path, capsys):
    """docs/data-formats.md: hidden files are left out silently (a crash's `.x.jsonl.tmp~...` among
    them); the one test used `.DS_Store`, which no data suffix would have read anyway."""
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "kept"}) + "\n")
    (tmp_path / ".b.jsonl").write_text(json.dumps({"text": "hidden file"}) + "\n")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "c.jsonl").write_text(json.dumps({"text": "hidden folder"}) + "\n")
    assert [d.text for d in iter_documents(tmp_path)] == ["kept"]
    assert "left out" not in capsys.readouterr().err


def test_the_spread_object_note_is_for_a_file_that_yielded_nothing(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text("{\n" + "".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(3)))
    assert [d.text for d in iter_documents(p)] == ["t0", "t1", "t2"]
    assert "spread over lines" not in capsys.readouterr().err


def test_files_named_like_splits_are_said_to_be_split_again(tmp_path, capsys):
    """A corpus split beforehand (train.jsonl, test.jsonl) was split again by id hash without a word:
    its test documents trained."""
    for name in ("train", "test"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"text": f"a {name} document"}) + "\n")
    assert len(list(iter_documents(tmp_path))) == 2
    assert "test.jsonl, train.jsonl: named like a split" in capsys.readouterr().err
    (tmp_path / "train.jsonl").rename(tmp_path / "law.jsonl")
    (tmp_path / "test.jsonl").unlink()
    list(iter_documents(tmp_path))
    assert "named like a split" not in capsys.readouterr().err
