"""Text cleaning, document ids and the :class:`Doc` record of every corpus builder.

Why a module of their own: they are not about any one source; the demo corpus's parsers
(:mod:`elmforest.corpora.demo_sources`), its evaluation-only domains and the multilingual corpus all
share them, and a change to them changes every corpus's bytes at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# --------------------------------------------------------------------------------------
# Generic text cleaning
# --------------------------------------------------------------------------------------

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
# C0 controls except \t and \n, DEL, C1 controls; plus BOM / zero-width no-break space.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\ufffe\uffff]")


def apply_overstrike(line: str) -> str:
    """Resolve backspace overstrikes the way a printing terminal would.

    ``_\\bx`` and ``x\\b_`` (underline) become ``x``, ``x\\bx`` (bold) becomes ``x``, and
    ``____\\b\\b\\b\\bword`` becomes ``word``. A leading backspace is dropped.
    """
    if "\b" not in line:
        return line
    buf: list[str] = []
    pos = 0
    for ch in line:
        if ch == "\b":
            if pos > 0:
                pos -= 1
            continue
        if pos < len(buf):
            old = buf[pos]
            # Keep the "real" character: underscores and spaces lose to anything else.
            if old in ("_", " ") or ch not in ("_", " "):
                buf[pos] = ch
        else:
            buf.append(ch)
        pos += 1
    return "".join(buf)


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def clean_text(text: str, *, max_blank_lines: int | None = 2) -> str:
    """Normalise newlines, resolve overstrikes, drop ANSI/control junk, strip trailing spaces.

    Leading/trailing blank lines are removed. If ``max_blank_lines`` is given, longer runs of
    blank lines are collapsed to that many. Tabs are kept (ASCII art and code rely on them).
    """
    text = normalize_newlines(text)
    text = _ANSI_RE.sub("", text)
    if "\b" in text:
        text = "\n".join(apply_overstrike(line) for line in text.split("\n"))
    text = _CONTROL_RE.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = text.strip("\n")
    if max_blank_lines is not None:
        text = re.sub(rf"\n{{{max_blank_lines + 2},}}", "\n" * (max_blank_lines + 1), text)
    return text


def decode_text(data: bytes, *, fallback: str = "latin-1") -> str:
    """Decode UTF-8 (BOM tolerated), falling back to ``fallback`` for legacy files."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode(fallback)


def slugify(text: str, *, max_len: int = 80) -> str:
    """Lower-case ASCII-ish slug for ids: ``"1 Samuel"`` -> ``"1-samuel"``."""
    slug = re.sub(r"[^0-9a-z]+", "-", text.lower()).strip("-")[:max_len].rstrip("-")
    if not slug:  # symbols only, e.g. FOLDOC's "!" or "#": spell the code points
        slug = "u" + "-".join(f"{ord(c):x}" for c in text.strip()[:8]) if text.strip() else "x"
    return slug


def unique_ids(keys: Iterable[str]) -> list[str]:
    """Make ids unique deterministically: a repeated key gets ``-2``, ``-3``, ... appended."""
    taken: set[str] = set()
    out: list[str] = []
    for key in keys:
        cand, n = key, 1
        while cand in taken:
            n += 1
            cand = f"{key}-{n}"
        taken.add(cand)
        out.append(cand)
    return out


@dataclass(frozen=True)
class Doc:
    id: str
    text: str
