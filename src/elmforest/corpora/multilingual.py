"""Offline multilingual corpus: translated man pages and fortunes from Debian, one JSONL per language.

``build_multilingual_corpus(out)`` writes::

    out/{iso639_3}.jsonl   one {"id", "domain", "text"} object per line; ``domain`` is the ISO 639-3 code
    out/manifest.json      {"version", "kind": "multilingual", "domains": {...}, "skipped": {...}}

Each language comes from the packages listed in :mod:`elmforest.corpora.multilingual_langs`,
fetched and unpacked through the demo corpus's :class:`SourceCache` (same cache directory), so a
second run downloads nothing. Per package, the cleaned and language-filtered documents are also
cached (keyed by the .deb file, the filter settings and :data:`CLEAN_REVISION`): a warm rebuild only
deduplicates and writes, and writes the same bytes.

Cleaning and filtering (see :mod:`elmforest.corpora.multilingual_text`): roff is stripped in Python
(code blocks and tables dropped), untranslated English paragraphs are removed, and a document is
dropped if its letters are not mostly in the language's script or, for languages with a stopword
list, if its stopword profile does not match. Fortune cookies are deduplicated one by one and then
grouped :data:`FORTUNE_GROUP` per document. Deduplication (exact and near-exact, on normalised-text
hashes) runs across all of a language's sources. Every dropped document is counted under its reason
in the language's ``skipped_documents``; a package that cannot be fetched is a note, and a language
with no document left is listed under ``"skipped"`` with the reason: never a silent drop.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from elmforest.corpora import multilingual_text as mt
from elmforest.corpora.demo import claim_folder, corpus_kind, load_manifest, write_domain_jsonl
from elmforest.corpora.demo_fetch import SkipDomain, SourceCache, default_cache_dir
from elmforest.corpora.demo_sources import Doc, clean_text, parse_fortunes
from elmforest.corpora.multilingual_langs import BY_CODE, LANGUAGES, Language, Source
from elmforest.utils.errors import UserError
from elmforest.utils.io import atomic_path, write_json_atomic

MANIFEST_VERSION = 1
CLEAN_REVISION = 2  # bump when extraction/cleaning/filtering changes
FORTUNE_GROUP = 50
DEFAULT_MIN_BYTES = 1_000_000


@dataclass
class Extracted:
    docs: list[Doc]
    skips: Counter = field(default_factory=Counter)


# --------------------------------------------------------------------------------------
# extraction from an unpacked package (pure file reading; testable on a fake tree)
# --------------------------------------------------------------------------------------


def _safe_files(root: Path, pattern: str) -> list[Path]:
    real = root.resolve()
    return [
        p
        for p in sorted(root.glob(pattern))
        if p.is_file() and not p.is_symlink() and p.resolve().is_relative_to(real)
    ]


def extract_manpages(lang: Language, root: Path, pkg: str) -> Extracted:
    """One document per translated page under ``usr/share/man/<locale>/man*/``; symlinks are aliases."""
    out = Extracted([])
    links = sum(p.is_symlink() for p in root.glob("usr/share/man/*/man*/*"))
    if links:
        out.skips["alias"] += links
    for path in _safe_files(root, "usr/share/man/*/man*/*"):
        rel = path.relative_to(root / "usr/share/man").as_posix()
        try:
            raw = path.read_bytes()
            raw = gzip.decompress(raw) if path.suffix == ".gz" else raw
        except (OSError, EOFError, gzip.BadGzipFile):
            out.skips["unreadable"] += 1
            continue
        source = mt.decode_legacy(raw, lang.encodings, lang.stopwords)
        if mt.is_roff_redirect(source):
            out.skips["alias"] += 1
            continue
        text, reason = mt.filter_document(mt.roff_to_text(source), lang.scripts, lang.stopwords)
        if reason:
            out.skips[reason] += 1
            continue
        out.docs.append(Doc(f"{lang.code}/{pkg}/{rel.removesuffix('.gz')}", text))
    return out


def extract_fortunes(lang: Language, root: Path, pkg: str, globs: Sequence[str]) -> Extracted:
    """Cookies deduplicated one by one, then grouped per file; offensive (``off/``) files skipped."""
    files: dict[str, Path] = {}
    for pattern in globs:
        for path in _safe_files(root, pattern):
            rel = path.relative_to(root).as_posix()
            if path.suffix == ".dat" or "/off/" in f"/{rel}":
                continue
            twin = path.with_name(path.name + ".u8")
            if twin.is_file() and not twin.is_symlink():
                continue  # the UTF-8 twin is read instead
            files.setdefault(rel.removesuffix(".u8"), path)
    out = Extracted([])
    seen: set[str] = set()
    for rel in sorted(files):
        text = mt.decode_legacy(files[rel].read_bytes(), lang.encodings, lang.stopwords)
        cookies = []
        for cookie in parse_fortunes(text):
            key = mt.dedup_key(cookie)
            if key in seen:
                out.skips["duplicate"] += 1
                continue
            seen.add(key)
            cookies.append(cookie)
        name = rel.rsplit("/", 1)[-1]
        for i in range(0, len(cookies), FORTUNE_GROUP):
            group = "\n\n".join(cookies[i : i + FORTUNE_GROUP])
            kept, reason = mt.filter_document(clean_text(group), lang.scripts, lang.stopwords)
            if reason:
                out.skips[reason] += 1
                continue
            out.docs.append(Doc(f"{lang.code}/{pkg}/{name}/{i // FORTUNE_GROUP + 1}", kept))
    return out


def _extract(lang: Language, src: Source, root: Path) -> Extracted:
    if src.kind == "man":
        return extract_manpages(lang, root, src.package)
    return extract_fortunes(lang, root, src.package, src.globs)


# --------------------------------------------------------------------------------------
# per-package cache of the cleaned documents
# --------------------------------------------------------------------------------------


def _cache_key(lang: Language, src: Source, deb_name: str) -> str:
    tag = json.dumps(
        [CLEAN_REVISION, deb_name, src.kind, list(src.globs), lang.code, list(lang.scripts),
         sorted(lang.stopwords), list(lang.encodings), mt.EN_MIN_HITS, mt.MIN_SCRIPT_SHARE,
         mt.MIN_STOPWORD_RATE, mt.MIN_DOC_BYTES, FORTUNE_GROUP],
        ensure_ascii=False,
    )  # fmt: skip
    return hashlib.sha256(tag.encode()).hexdigest()[:16]


def cleaned_source(cache: SourceCache, lang: Language, src: Source) -> tuple[Extracted, str]:
    """The package's cleaned documents (from the cache when present) and its ``name version`` label."""
    deb = cache.deb(src.package)
    label = f"{src.package} {cache.deb_version(deb)}"
    path = cache.root / "rendered" / f"ml-{lang.code}-{src.package}-{_cache_key(lang, src, deb.name)}.json.gz"
    if path.is_file():
        try:
            obj = json.loads(gzip.decompress(path.read_bytes()))
            return Extracted([Doc(i, t) for i, t in obj["docs"]], Counter(obj["skips"])), label
        except (OSError, ValueError, EOFError, KeyError, TypeError):
            pass  # a damaged cache entry is rebuilt
    ext = _extract(lang, src, cache.unpack_deb(src.package))
    obj = {"docs": [[d.id, d.text] for d in ext.docs], "skips": dict(sorted(ext.skips.items()))}
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(json.dumps(obj, ensure_ascii=False).encode(), compresslevel=1, mtime=0))
    return ext, label


# --------------------------------------------------------------------------------------
# building a language and the corpus
# --------------------------------------------------------------------------------------


def dedup_docs(docs: Sequence[Doc]) -> tuple[list[Doc], int]:
    """Keep the first document of each normalised-text hash; returns ``(kept, dropped)``."""
    seen: set[str] = set()
    kept = []
    for d in docs:
        key = mt.dedup_key(d.text)
        if key not in seen:
            seen.add(key)
            kept.append(d)
    return kept, len(docs) - len(kept)


def build_language(
    cache: SourceCache, lang: Language, max_bytes: int | None = None
) -> tuple[list[Doc], dict]:
    """Documents of one language and its report entry (without file stats); SkipDomain if none."""
    docs: list[Doc] = []
    skips: Counter = Counter()
    sources, notes = [], []
    for src in lang.sources:
        try:
            ext, label = cleaned_source(cache, lang, src)
        except SkipDomain as e:
            notes.append(f"{src.package} unavailable: {e}")
            continue
        docs.extend(ext.docs)
        skips.update(ext.skips)
        name, _, version = label.partition(" ")
        sources.append({"package": name, "version": version, "kind": src.kind, "documents": len(ext.docs)})
    if not sources:
        raise SkipDomain("; ".join(notes) or "no sources")
    docs, dups = dedup_docs(docs)
    if dups:
        skips["duplicate"] += dups
    if max_bytes is not None:
        total, capped = 0, []
        for d in docs:
            n = len(d.text.encode("utf-8"))
            if total + n > max_bytes and capped:
                skips["over max_bytes"] += 1
                continue
            total += n
            capped.append(d)
        docs = capped
    if not docs:
        raise SkipDomain(f"no document survived cleaning (skipped: {dict(sorted(skips.items()))})")
    entry = {
        "name": lang.name,
        "script": lang.script,
        "sources": sources,
        "skipped_documents": dict(sorted(skips.items())),
    }
    if notes:
        entry["notes"] = notes
    return docs, entry


def format_report(manifest: dict) -> str:
    """Per-language table (code, script, documents, MB, sources, skip counts), then skipped languages."""
    lines = [f"  {'lang':<5} {'script':<11} {'docs':>6} {'MB':>7}  sources; skipped documents"]
    for code, e in manifest.get("domains", {}).items():
        srcs = ", ".join(f"{s['package']} {s['version']}" for s in e["sources"])
        skips = ", ".join(f"{k}={v}" for k, v in e.get("skipped_documents", {}).items()) or "-"
        flag = " [below min_bytes]" if e.get("below_min_bytes") else ""
        lines.append(
            f"  {code:<5} {e['script']:<11} {e['documents']:>6} {e['bytes'] / 1e6:7.2f}  {srcs}; {skips}{flag}"
        )
    for code, reason in manifest.get("skipped", {}).items():
        lines.append(f"  {code:<5} SKIPPED: {reason}")
    return "\n".join(lines)


def check_codes(codes) -> None:
    """Codes this corpus builds (ISO 639-3, as its sources name them): the X-ELM quickstart asks before
    anything is built, where the typology had taken `de` and the builder refused it after step 1."""
    if unknown := [c for c in codes if c not in BY_CODE]:
        raise UserError(f"unknown language code(s) {unknown}; choose from {sorted(BY_CODE)}")


def _common(entries: dict, key: str, built: int | None) -> int | None | str:
    """The cap every language was built under, or "mixed" where a rebuild of some languages changed it
    (each entry says its own): the top-level value must not claim the new cap for the languages kept."""
    values = {e.get(key) for e in entries.values()} or {built}
    return values.pop() if len(values) == 1 else "mixed"


def build_multilingual_corpus(
    out: str | Path,
    languages: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    min_bytes: int = DEFAULT_MIN_BYTES,
    max_bytes: int | None = None,
    progress: bool = True,
    cache: SourceCache | None = None,
) -> dict:
    """Build the corpus into ``out``; returns the manifest (also written, and printed as a table).

    ``languages`` (ISO 639-3 codes) defaults to every language; building a subset rewrites only
    those entries of an existing manifest. A language under ``min_bytes`` is kept and flagged
    ``below_min_bytes``; ``max_bytes`` caps each language (documents kept in id order).
    """
    codes = list(BY_CODE if languages is None else languages)
    check_codes(codes)
    if twice := sorted({c for c in codes if codes.count(c) > 1}):
        raise UserError(f"language code(s) {twice} given more than once")
    out = Path(out)
    manifest_path = out / "manifest.json"
    found = load_manifest(manifest_path)
    claim_folder(out, corpus_kind({"kind": "multilingual"}), found, BY_CODE)
    if cache is None:
        cache = SourceCache(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    out.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    old = (
        found
        if found and found.get("kind") == "multilingual" and found.get("version") == MANIFEST_VERSION
        else {}
    )
    entries = {  # kept entries say the caps they were built under (a manifest before this said them once)
        k: {"max_bytes": old.get("max_bytes"), "min_bytes": old.get("min_bytes"), **v}
        for k, v in old.get("domains", {}).items()
        if k in BY_CODE and k not in codes and (out / v.get("file", "")).is_file()
    }
    skipped = {k: v for k, v in old.get("skipped", {}).items() if k in BY_CODE and k not in codes}
    say(f"building the multilingual corpus into {out} (cache: {cache.root})")
    t_all = time.perf_counter()
    for code in codes:
        t0 = time.perf_counter()
        path = out / f"{code}.jsonl"
        try:
            docs, entry = build_language(cache, BY_CODE[code], max_bytes)
            stats = write_domain_jsonl(path, code, docs)
        except Exception as e:  # noqa: BLE001 - one language must never abort the others
            skipped[code] = str(e) if isinstance(e, SkipDomain) else f"{type(e).__name__}: {e}"
            entries.pop(code, None)
            path.unlink(missing_ok=True)
            say(f"  {code} SKIPPED ({time.perf_counter() - t0:.1f}s): {skipped[code]}")
            continue
        entries[code] = {"file": path.name, **stats, **entry, "max_bytes": max_bytes, "min_bytes": min_bytes}
        if stats["bytes"] < min_bytes:
            entries[code]["below_min_bytes"] = True
        skipped.pop(code, None)
        say(
            f"  {code} {stats['documents']:>6} docs {stats['bytes'] / 1e6:7.2f} MB ({time.perf_counter() - t0:.1f}s)"
        )
    order = [lang.code for lang in LANGUAGES]
    manifest = {
        "version": MANIFEST_VERSION,
        "kind": "multilingual",
        "revision": CLEAN_REVISION,
        "min_bytes": _common(entries, "min_bytes", min_bytes),
        "max_bytes": _common(entries, "max_bytes", max_bytes),
        "domains": {k: entries[k] for k in order if k in entries},
        "skipped": {k: skipped[k] for k in order if k in skipped},
    }
    write_json_atomic(manifest_path, manifest)
    n_scripts = len({e["script"] for e in manifest["domains"].values()})
    say(f"done in {time.perf_counter() - t_all:.1f}s")
    print(format_report(manifest))
    print(
        f"{len(manifest['domains'])} languages over {n_scripts} scripts, {len(manifest['skipped'])} skipped -> {out}"
    )
    return manifest
