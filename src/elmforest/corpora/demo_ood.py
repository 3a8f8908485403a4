"""Evaluation-only demo domains: text no model of the demo forest trains on, different in kind.

BTM claims its forests beat dense LMs out of domain too, so the demo needs domains that neither the
tokenizer, the seed, the experts nor the dense baseline ever saw. Each is unlike all eight training
domains in a different way:

    german_fortunes   German prose and verse (fortunes-de): another language, familiar genre
    unicode_tables    the Unicode Character Database (unicode-data): semicolon-separated tables
    tex_macros        LaTeX classes, packages and BibTeX styles (texlive-latex-base): macro code
    perl_code         the Perl 5 standard library with its POD (perl-modules-5.36): code, another language

Built like the demo corpus (Debian packages, cached under the same cache directory), capped at
`EVAL_ONLY_BYTES` per domain: documents are cut to at most `CHUNK_LINES` lines (so no single document
dominates a byte budget), then a deterministic sample by id hash is kept up to the cap. Evaluation
splits them half valid (the forest's prior for that domain), half test, by source file: every chunk
id is `FILE#N`, and the chunks of one file stay on one side (data/splits.py, `by_file`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

from elmforest.corpora import demo_sources as src
from elmforest.corpora.demo import DomainBuild, SkipDomain, SourceCache
from elmforest.corpora.demo_sources import Doc

EVAL_ONLY_DOMAINS: tuple[str, ...] = ("german_fortunes", "unicode_tables", "tex_macros", "perl_code")
EVAL_ONLY_BYTES = 240_000  # per domain, after sampling: about half valid (priors), half test, by file
EVAL_ONLY_MIN_BYTES = 100_000
CHUNK_LINES = 120
EVAL_ONLY_REVISION = 3  # bump when the sampling or the ids change: quickstarts rebuild an older one
PERL_PACKAGE = "perl-modules-5.36"  # Debian 12's; pinned so rebuilds are reproducible


def chunk_lines(doc_id: str, text: str, lines: int = CHUNK_LINES) -> list[Doc]:
    """Cut a long text into pieces of at most `lines` lines (ids doc_id#k)."""
    rows = text.split("\n")
    if len(rows) <= lines:
        return [Doc(doc_id, text)]
    return [
        Doc(f"{doc_id}#{k // lines:04d}", "\n".join(rows[k : k + lines]))
        for k in range(0, len(rows), lines)
        if "\n".join(rows[k : k + lines]).strip()
    ]


def sample_by_hash(docs: Iterable[Doc], max_bytes: int = EVAL_ONLY_BYTES) -> list[Doc]:
    """A deterministic sample spread over the whole source: documents in the order of a hash of their
    id, kept while they fit in `max_bytes`, then put back in id order."""
    # salted: the train/valid/test split hashes the same ids, and an unsalted sample would keep exactly
    # the documents with the smallest hashes, i.e. the test split's
    ranked = sorted(docs, key=lambda d: hashlib.sha256(b"eval-only-sample:" + d.id.encode()).digest())
    kept, total = [], 0
    for d in ranked:
        n = len(d.text.encode("utf-8"))
        if total + n > max_bytes:
            continue
        kept.append(d)
        total += n
    return sorted(kept, key=lambda d: d.id)


def _files(root: Path, pattern: str, suffixes: tuple[str, ...] = ()) -> list[Path]:
    real = root.resolve()
    out = []
    for p in sorted(root.glob(pattern)):
        if p.is_symlink() or not p.is_file() or not p.resolve().is_relative_to(real):
            continue  # links are aliases (or point out of the package)
        if suffixes and not p.name.endswith(suffixes):
            continue
        out.append(p)
    return out


def _text_docs(domain: str, root: Path, files: list[Path], fallback: str = "latin-1") -> list[Doc]:
    docs = []
    for f in files:
        text = src.clean_text(src.decode_text(f.read_bytes(), fallback=fallback), max_blank_lines=None)
        if text.strip():
            docs.extend(chunk_lines(f"{domain}/{f.relative_to(root).as_posix()}", text))
    return docs


def fortune_id(doc_id: str) -> str:
    """aphorisms/<file>/<k> -> german_fortunes/<file>#<k>: the cookie file is the split's file key."""
    file, k = doc_id.split("/", 1)[1].rsplit("/", 1)
    return f"german_fortunes/{file}#{k}"


def _build_german_fortunes(cache: SourceCache) -> DomainBuild:
    root = cache.unpack_deb("fortunes-de")
    base = root / "usr/share/games/fortunes/de"
    files = [f for f in _files(base, "*") if not f.name.endswith((".dat", ".u8"))]
    if not files:
        raise SkipDomain("fortunes-de has no usr/share/games/fortunes/de files")
    docs = []
    for f in files:
        for d in src.fortune_docs(f.name, src.decode_text(f.read_bytes()), group=20):
            docs.append(Doc(fortune_id(d.id), d.text))
    return DomainBuild(
        sample_by_hash(docs),
        f"German fortune cookies from Debian {cache.deb_label('fortunes-de')}, 20 per document",
    )


def _build_unicode_tables(cache: SourceCache) -> DomainBuild:
    root = cache.unpack_deb("unicode-data")
    base = root / "usr/share/unicode"
    files = _files(base, "**/*.txt")
    if not files:
        raise SkipDomain("unicode-data has no usr/share/unicode/*.txt tables")
    return DomainBuild(
        sample_by_hash(_text_docs("unicode_tables", base, files)),
        f"Unicode Character Database tables from Debian {cache.deb_label('unicode-data')}, "
        f"{CHUNK_LINES} lines per document",
    )


def _build_tex_macros(cache: SourceCache) -> DomainBuild:
    root = cache.unpack_deb("texlive-latex-base")
    base = root / "usr/share/texlive/texmf-dist"
    suffixes = (".sty", ".cls", ".def", ".ltx", ".clo", ".fd", ".cfg", ".bst", ".tex")
    files = _files(base, "**/*", suffixes)
    if not files:
        raise SkipDomain("texlive-latex-base has no TeX sources under usr/share/texlive/texmf-dist")
    return DomainBuild(
        sample_by_hash(_text_docs("tex_macros", base, files)),
        f"LaTeX classes, packages and BibTeX styles from Debian {cache.deb_label('texlive-latex-base')}",
    )


def _build_perl_code(cache: SourceCache) -> DomainBuild:
    root = cache.unpack_deb(PERL_PACKAGE)
    base = root / "usr/share/perl"
    files = _files(base, "**/*", (".pm", ".pl", ".pod"))
    if not files:
        raise SkipDomain(f"{PERL_PACKAGE} has no Perl sources under usr/share/perl")
    return DomainBuild(
        sample_by_hash(_text_docs("perl_code", base, files)),
        f"Perl 5 standard library modules and POD from Debian {cache.deb_label(PERL_PACKAGE)}",
    )


EVAL_ONLY_BUILDERS: dict[str, Callable[[SourceCache], DomainBuild]] = {
    "german_fortunes": _build_german_fortunes,
    "unicode_tables": _build_unicode_tables,
    "tex_macros": _build_tex_macros,
    "perl_code": _build_perl_code,
}
