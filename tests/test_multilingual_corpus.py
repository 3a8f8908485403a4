"""Offline tests of the multilingual corpus: roff stripping, language filter, dedup, report, cache.

Nothing is downloaded: packages are fake trees served by a fake SourceCache.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

from elmforest.corpora import multilingual as ml
from elmforest.corpora import multilingual_text as mt
from elmforest.corpora.demo_fetch import SkipDomain, SourceCache
from elmforest.corpora.demo_sources import Doc
from elmforest.corpora.multilingual_langs import BY_CODE, LANGUAGES
from elmforest.utils.errors import UserError

DE = (
    "Die Datei wird nicht gelesen, wenn sie mit einem Punkt beginnt. Das ist auch bei der "
    "Ausgabe von Verzeichnissen so, und es kann mit dieser Option geändert werden. Die Einträge "
    "werden nach dem Namen sortiert."
)
EN = "This option is ignored when the file does not exist, and the output is written to the terminal."
RU = "Выводит информацию о файлах в текущем каталоге, если не указан ни один из параметров. " * 2
JA = "オプションの指定順序は任意である。ファイル名の前でも後でもよい。"


# ---------------------------------------------------------------------------------------
# roff -> text
# ---------------------------------------------------------------------------------------

PAGE = r""".\" a comment
.TH LS 1 "2022" "GNU" "Handbuch"
.SH BEZEICHNUNG
ls \- Verzeichnisinhalte auflisten
.SH BESCHREIBUNG
.PP
Auflistung von \fBInformationen\fP über die \fI\,DATEIen\/\fR
(Standard ist \(lqdas\(rq aktuelle Verzeichnis) \[em] caf\[u00E9] \*(lqx\*(rq.
.nf
int main(void) { return 0; }
.fi
.TS
l l.
a	b
.TE
.TP
.BR \-a ", " \-\-all
Einträge nicht ignorieren \" trailing comment
.IP "\-b" 4
zweite Option
"""


def test_roff_is_stripped_to_paragraphs_and_code_blocks_are_dropped():
    text = mt.roff_to_text(PAGE)
    assert text.split("\n\n") == [
        "BEZEICHNUNG",
        "ls - Verzeichnisinhalte auflisten",
        "BESCHREIBUNG",
        "Auflistung von Informationen über die DATEIen (Standard ist “das” aktuelle Verzeichnis) — café “x”.",
        "-a, --all Einträge nicht ignorieren",
        "-b zweite Option",
    ]


def test_roff_redirects_and_legacy_encodings():
    assert mt.is_roff_redirect('.\\" alias\n.so man1/ls.1\n')
    assert not mt.is_roff_redirect(".so man1/ls.1\n.PP\ntext\n")
    assert mt.decode_legacy("Größe".encode("iso-8859-2"), ("iso-8859-2",)) == "Größe"
    assert mt.decode_legacy("текст".encode("koi8-r"), ("koi8-r",)) == "текст"
    assert mt.decode_legacy("\ufefftext".encode(), ()) == "text"
    # koi8-r and iso-8859-2 decode any bytes: the encoding that reads the language's words wins
    rus, pol, ces = BY_CODE["rus"], BY_CODE["pol"], BY_CODE["ces"]
    for lang, text in (
        (rus, "это не то, что он может и будет для них"),
        (pol, "jeśli są tacy, że się nie da, to ich nie ma"),  # ś, ą: iso-8859-2 and cp1250 differ on them
        (ces, "Tento příkaz vypíše seznam souborů, které jsou ve složce, a že je to všechno."),
    ):
        for enc in lang.encodings:
            assert mt.decode_legacy(text.encode(enc), lang.encodings, lang.stopwords) == text, (
                lang.code,
                enc,
            )


# ---------------------------------------------------------------------------------------
# language / script filter
# ---------------------------------------------------------------------------------------


def test_script_share_counts_cjk_by_utf8_length():
    assert mt.script_share("abc", ("Latin",)) == 1.0
    assert mt.script_share("абв abc", ("Cyrillic",)) == pytest.approx(0.5)
    assert mt.script_share("中文 abc", ("Han",)) == pytest.approx(6 / 9)
    assert mt.script_share("123 !", ("Latin",)) == 0.0


def test_english_paragraphs_are_dropped_and_the_language_kept():
    de = BY_CODE["deu"]
    text, reason = mt.filter_document(f"{DE}\n\n{EN}\n\n{DE} Ende.", de.scripts, de.stopwords)
    assert reason == "" and EN not in text and text.count("Die Datei") == 2
    # German words that are also English stopwords ("an", "was") do not make a paragraph English
    assert not mt.is_english_paragraph("Was hängt an der Datei an?", de.scripts, de.stopwords)
    assert mt.filter_document(EN * 3, de.scripts, de.stopwords) == ("", "english")


def test_a_document_in_the_wrong_script_or_profile_is_skipped_with_its_reason():
    ru, de, ja = BY_CODE["rus"], BY_CODE["deu"], BY_CODE["jpn"]
    assert mt.filter_document(DE, ru.scripts, ru.stopwords) == ("", "script mismatch")
    nl_like = "Het bestand wordt niet gelezen als het met een punt begint, ook niet voor mappen. " * 3
    assert mt.filter_document(nl_like, de.scripts, de.stopwords) == ("", "stopword profile")
    assert mt.filter_document(DE[:80], de.scripts, de.stopwords) == ("", "too short")
    # English inside Russian is dropped by script; command names inside Japanese prose are not English
    text, reason = mt.filter_document(f"{RU}\n\n{EN}\n\n{RU} {RU}", ru.scripts, ru.stopwords)
    assert reason == "" and EN not in text
    ja_par = f"as と at は {JA} the command is " + JA * 4
    assert mt.filter_document(ja_par, ja.scripts, ja.stopwords) == (ja_par, "")


def test_every_language_is_well_formed():
    assert len(LANGUAGES) >= 10 and len({lang.code for lang in LANGUAGES}) == len(LANGUAGES)
    assert len({lang.script for lang in LANGUAGES}) >= 3
    for lang in LANGUAGES:
        assert len(lang.code) == 3 and lang.code.isalpha() and lang.sources
        assert set(lang.scripts) <= set(mt.SCRIPT_RANGES)
        assert ("Latin" in lang.scripts) <= bool(lang.stopwords)  # Latin needs stopwords to spot English


# ---------------------------------------------------------------------------------------
# dedup
# ---------------------------------------------------------------------------------------


def test_near_exact_copies_share_a_key_and_the_first_is_kept():
    a = "Die Datei,  wird\nnicht gelesen (1)."
    assert mt.dedup_key(a) == mt.dedup_key("die datei wird nicht gelesen 2") == mt.dedup_key(a.upper())
    assert mt.dedup_key(a) != mt.dedup_key("Die Datei wird gelesen.")
    kept, dropped = ml.dedup_docs(
        [Doc("x", a), Doc("y", "DIE DATEI wird nicht gelesen."), Doc("z", "anders")]
    )
    assert [d.id for d in kept] == ["x", "z"] and dropped == 1


# ---------------------------------------------------------------------------------------
# extraction from fake packages
# ---------------------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _man_tree(root: Path, locale: str, pages: dict[str, str]) -> None:
    for name, body in pages.items():
        _write(root / f"usr/share/man/{locale}/man1/{name}.1.gz", gzip.compress(body.encode(), mtime=0))
    _write(root / "usr/share/man/man1/english.1.gz", gzip.compress(f".PP\n{EN}\n".encode()))  # not translated


def _fortune_tree(root: Path) -> None:
    cookies = [f"{DE} Nummer {n}." for n in ("eins", "zwei", "drei")]
    base = root / "usr/share/games/fortunes/de"
    _write(base / "sprueche", "\n%\n".join([*cookies, cookies[0].upper()]).encode("latin-1"))
    (base / "sprueche.u8").symlink_to("sprueche")  # an alias: the base file is read
    _write(base / "alt", b"veraltet")
    _write(base / "alt.u8", f"{DE} aus alt.".encode())  # a real UTF-8 twin: read instead of `alt`
    _write(base / "sprueche.dat", b"\0\1")
    _write(base / "off/derb", f"{DE} derb.".encode())


def test_manpages_are_extracted_with_skip_reasons(tmp_path):
    de = BY_CODE["deu"]
    _man_tree(tmp_path, "de", {"ls": f".PP\n{DE}\n", "en": f".PP\n{EN}\n", "so": ".so man1/ls.1\n"})
    (tmp_path / "usr/share/man/de/man1/dir.1.gz").symlink_to("ls.1.gz")
    ext = ml.extract_manpages(de, tmp_path, "manpages-de")
    assert [d.id for d in ext.docs] == ["deu/manpages-de/de/man1/ls.1"] and ext.docs[0].text == DE
    assert ext.skips == {"alias": 2, "english": 1}


def test_fortunes_are_deduplicated_per_cookie_and_grouped(tmp_path, monkeypatch):
    monkeypatch.setattr(ml, "FORTUNE_GROUP", 2)
    _fortune_tree(tmp_path)
    ext = ml.extract_fortunes(BY_CODE["deu"], tmp_path, "fortunes-de", ("usr/share/games/fortunes/*/*",))
    ids = [d.id for d in ext.docs]
    assert ids == ["deu/fortunes-de/alt/1", "deu/fortunes-de/sprueche/1", "deu/fortunes-de/sprueche/2"]
    assert "aus alt" in ext.docs[0].text and "veraltet" not in ext.docs[0].text
    assert (
        "Nummer eins" in ext.docs[1].text and "Nummer zwei" in ext.docs[1].text and "derb" not in "".join(ids)
    )
    assert ext.skips == {"duplicate": 1}


# ---------------------------------------------------------------------------------------
# building with a fake cache: report, skips, determinism, cache reuse
# ---------------------------------------------------------------------------------------


class FakeCache(SourceCache):
    """Serves prepared trees as unpacked packages; a package without a tree cannot be fetched."""

    def __init__(self, root: Path, trees: dict[str, Path]) -> None:
        super().__init__(root)
        self.trees = trees
        self.unpacks = 0

    def deb(self, pkg: str) -> Path:
        if pkg not in self.trees:
            raise SkipDomain(f"apt-get download {pkg} failed (fake)")
        path = self.debs / f"{pkg}_1.0-1_all.deb"
        if not path.exists():
            _write(path, b"fake")
        return path

    def unpack_deb(self, pkg: str) -> Path:
        self.deb(pkg)
        self.unpacks += 1
        return self.trees[pkg]


def _fake_cache(tmp_path: Path) -> FakeCache:
    trees = {p: tmp_path / "trees" / p for p in ("manpages-de", "fortunes-de", "manpages-ru")}
    _man_tree(
        trees["manpages-de"], "de", {"ls": f".PP\n{DE}\n", "cp": f".PP\n{DE} Kopie.\n", "dup": f".PP\n{DE}\n"}
    )
    _fortune_tree(trees["fortunes-de"])
    _man_tree(trees["manpages-ru"], "ru", {"en": f".PP\n{EN}\n"})  # nothing Russian survives
    return FakeCache(tmp_path / "cache", trees)


def test_a_build_writes_tagged_jsonl_and_a_report(tmp_path, capsys):
    cache = _fake_cache(tmp_path)
    out = tmp_path / "out"
    man = ml.build_multilingual_corpus(out, ["deu", "rus", "jpn"], cache=cache, progress=False)
    assert list(man["domains"]) == ["deu"] and set(man["skipped"]) == {"rus", "jpn"}
    assert "no document survived" in man["skipped"]["rus"] and "english" in man["skipped"]["rus"]
    assert "manpages-ja" in man["skipped"]["jpn"]  # the package that could not be fetched is named
    e = man["domains"]["deu"]
    recs = [json.loads(x) for x in (out / "deu.jsonl").read_text().splitlines()]
    assert {r["domain"] for r in recs} == {"deu"} and len(recs) == e["documents"] == 4
    assert e["bytes"] == sum(len(r["text"].encode()) for r in recs) and e["below_min_bytes"]
    assert e["skipped_documents"] == {"duplicate": 2} and e["script"] == "Latin"
    assert [(s["package"], s["version"]) for s in e["sources"]] == [
        ("manpages-de", "1.0-1"),
        ("fortunes-de", "1.0-1"),
    ]
    assert json.loads((out / "manifest.json").read_text()) == man
    printed = capsys.readouterr().out
    assert "manpages-de 1.0-1" in printed and "SKIPPED" in printed and "duplicate=2" in printed


def test_a_second_build_reuses_the_cache_and_writes_the_same_bytes(tmp_path, monkeypatch):
    cache = _fake_cache(tmp_path)
    ml.build_multilingual_corpus(tmp_path / "a", ["deu"], cache=cache, progress=False)
    assert cache.unpacks == 2

    def boom(*a, **k):
        raise AssertionError("extracted again despite the cache")

    monkeypatch.setattr(ml, "_extract", boom)
    ml.build_multilingual_corpus(tmp_path / "b", ["deu"], cache=cache, progress=False)
    assert cache.unpacks == 2
    for name in ("deu.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_max_bytes_caps_a_language_and_subsets_update_the_manifest(tmp_path):
    cache = _fake_cache(tmp_path)
    out = tmp_path / "out"
    ml.build_multilingual_corpus(out, ["rus"], cache=cache, progress=False)
    man = ml.build_multilingual_corpus(out, ["deu"], cache=cache, progress=False, max_bytes=len(DE) + 50)
    assert "rus" in man["skipped"]  # kept from the first build
    e = man["domains"]["deu"]
    assert e["documents"] == 1 and e["skipped_documents"]["over max_bytes"] == 3
    assert e["max_bytes"] == man["max_bytes"] == len(DE) + 50
    # a language built again under another cap: the German text kept does not take on its cap
    man = ml.build_multilingual_corpus(out, ["rus"], cache=cache, progress=False, max_bytes=10**6)
    assert man["domains"]["deu"]["max_bytes"] == len(DE) + 50 and man["max_bytes"] == len(DE) + 50
    ml.build_multilingual_corpus(tmp_path / "two", ["deu"], cache=cache, progress=False)
    shutil.copy(tmp_path / "two" / "deu.jsonl", out / "deu.jsonl")
    manifest = json.loads((out / "manifest.json").read_text())  # two languages, built under two caps
    manifest["domains"]["fra"] = {**manifest["domains"]["deu"], "file": "deu.jsonl", "max_bytes": None}
    (out / "manifest.json").write_text(json.dumps(manifest))
    man = ml.build_multilingual_corpus(out, ["rus"], cache=cache, progress=False)
    assert man["max_bytes"] == "mixed" and man["domains"]["fra"]["max_bytes"] is None


def test_unknown_language_codes_are_refused_with_the_list(tmp_path):
    with pytest.raises(UserError, match=r"'xxx'.*deu"):
        ml.build_multilingual_corpus(tmp_path, ["deu", "xxx"], cache=_fake_cache(tmp_path), progress=False)
    assert not os.path.exists(tmp_path / "manifest.json")


def test_a_folder_of_another_corpus_or_of_foreign_data_is_refused(tmp_path):
    """Built into the demo corpus's folder, the languages joined its training domains (and the manifest,
    rewritten, listed only them); a user's `deu.jsonl` was replaced without a word."""
    cache = _fake_cache(tmp_path)
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    (demo_dir / "manifest.json").write_text(json.dumps({"version": 1, "domains": {}, "skipped": {}}))
    with pytest.raises(UserError, match="holds the demo's training corpus"):
        ml.build_multilingual_corpus(demo_dir, ["deu"], cache=cache, progress=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "deu.jsonl").write_text('{"text": "meins"}\n')
    with pytest.raises(UserError, match=r"did not write \(deu.jsonl\)"):
        ml.build_multilingual_corpus(mine, ["deu"], cache=cache, progress=False)
    assert (mine / "deu.jsonl").read_text() == '{"text": "meins"}\n'
    with pytest.raises(UserError, match="given more than once"):
        ml.build_multilingual_corpus(tmp_path / "x", ["deu", "deu"], cache=cache, progress=False)
    out = tmp_path / "out"  # its own folder, built again: fine
    ml.build_multilingual_corpus(out, ["deu"], cache=cache, progress=False)
    ml.build_multilingual_corpus(out, ["deu"], cache=cache, progress=False)
