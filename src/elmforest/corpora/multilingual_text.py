"""Pure text functions for the multilingual corpus (see :mod:`elmforest.corpora.multilingual`).

Roff is stripped in Python rather than rendered with groff: the output then depends on nothing
installed (a second machine writes the same bytes), and we want prose, not layout. No-fill blocks
(``.nf``/``.EX``: code, synopses, examples) and tables (``.TS``) are dropped because they are not
the language; inline markup is removed and filled lines are joined into paragraphs.

Language filtering works per paragraph and then per document, because translated man pages
(po4a) leave untranslated paragraphs in English:

* a paragraph is *English* when it holds at least :data:`EN_MIN_HITS` English stopwords and, for
  a Latin-script language, more English than target-language stopwords (words both lists share
  count for neither), for another script, letters mostly outside that script; it is dropped;
* a document must then keep at least :data:`MIN_SCRIPT_SHARE` of its letters (CJK weighted by
  UTF-8 length, see :func:`script_share`) in the language's script (catches pages left in English or in another script), and for a language with a
  stopword list at least :data:`MIN_STOPWORD_RATE` of its words must be that language's
  stopwords while English ones stay rarer (catches e.g. a German page in the Dutch set or
  code-only pages).

Deduplication hashes the normalised text (NFKC, case-folded, digits and punctuation dropped,
whitespace collapsed): exact copies and copies that differ only in layout, case, numbering or
punctuation collapse to one key.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable

from elmforest.corpora.demo_sources import clean_text

EN_MIN_HITS = 2
MIN_SCRIPT_SHARE = 0.3
MIN_STOPWORD_RATE = 0.04
MIN_DOC_BYTES = 200  # UTF-8 bytes, so a CJK document needs about 70 characters

# --------------------------------------------------------------------------------------
# scripts
# --------------------------------------------------------------------------------------

SCRIPT_RANGES: dict[str, str] = {
    "Latin": "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff",
    "Cyrillic": "\u0400-\u04ff\u0500-\u052f",
    "Greek": "\u0370-\u03ff\u1f00-\u1fff",
    "Han": "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff",
    "Kana": "\u3040-\u30ff\u31f0-\u31ff",
    "Hangul": "\uac00-\ud7af\u1100-\u11ff",
    "Arabic": "\u0600-\u06ff",
    "Hebrew": "\u0590-\u05ff",
}
_SCRIPT_RES = {name: re.compile(f"[{chars}]") for name, chars in SCRIPT_RANGES.items()}
_WORD_RE = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?")


def script_counts(text: str) -> dict[str, int]:
    """Letters per script (only the scripts in :data:`SCRIPT_RANGES`)."""
    return {name: len(rx.findall(text)) for name, rx in _SCRIPT_RES.items()}


_WIDE = frozenset({"Han", "Kana", "Hangul"})


def script_share(text: str, scripts: Iterable[str]) -> float:
    """Share of the text's letters (in any known script) that belong to ``scripts``.

    A Han/Kana/Hangul character counts 3 (its UTF-8 length): one such character carries about
    as much as a short Latin word, so a Chinese page full of option names is not outvoted.
    """
    counts = {k: v * (3 if k in _WIDE else 1) for k, v in script_counts(text).items()}
    total = sum(counts.values())
    return sum(counts[s] for s in scripts) / total if total else 0.0


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


# --------------------------------------------------------------------------------------
# language filter
# --------------------------------------------------------------------------------------

ENGLISH_STOPWORDS = frozenset(
    "the of and to is are was were be been this that these those which with for from by not or "
    "it its if when then than there their they you your will would should can could may must "
    "has have had does do an as at but all any each such only also into other more most some "
    "what who how where about after before over under between through while because".split()
)


def english_hits(ws: list[str], stopwords: frozenset[str]) -> tuple[int, int]:
    """``(target hits, English hits)``, words in both lists counting for neither."""
    en = ENGLISH_STOPWORDS - stopwords
    own = stopwords - ENGLISH_STOPWORDS
    return sum(w in own for w in ws), sum(w in en for w in ws)


def is_english_paragraph(par: str, scripts: tuple[str, ...], stopwords: frozenset[str]) -> bool:
    """At least EN_MIN_HITS English stopwords, and more of them than the language's own (Latin
    script) or letters mostly outside the language's script (others: command names such as
    `at` or `as` inside Japanese prose must not count)."""
    own, en = english_hits(words(par), stopwords)
    if en < EN_MIN_HITS:
        return False
    return en > own if "Latin" in scripts else script_share(par, scripts) < 0.5


def filter_document(text: str, scripts: tuple[str, ...], stopwords: frozenset[str]) -> tuple[str, str]:
    """``(kept text, "")`` or ``("", skip reason)``; see the module docstring for the rules."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    kept = [p for p in paragraphs if not is_english_paragraph(p, scripts, stopwords)]
    out = "\n\n".join(kept).strip()
    if not out:
        return "", "english" if paragraphs else "empty"
    if len(out.encode("utf-8")) < MIN_DOC_BYTES:
        return "", "too short"
    if script_share(out, scripts) < MIN_SCRIPT_SHARE:
        return "", "script mismatch"
    if stopwords:
        ws = words(out)
        own, en = english_hits(ws, stopwords)
        if not ws or own / len(ws) < MIN_STOPWORD_RATE or en >= own:
            return "", "stopword profile"
    return out, ""


# --------------------------------------------------------------------------------------
# dedup
# --------------------------------------------------------------------------------------

_NON_LETTER_RE = re.compile(r"[\W\d_]+")


def dedup_key(text: str) -> str:
    """Hash of the normalised text: equal for copies differing in case/space/digits/punctuation."""
    norm = _NON_LETTER_RE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------
# roff -> text
# --------------------------------------------------------------------------------------

_GLYPHS = {
    "em": "—", "en": "–", "hy": "-", "mi": "-", "aq": "'", "dq": '"', "lq": "“", "rq": "”",
    "oq": "‘", "cq": "’", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "bu": "•", "co": "©",
    "rg": "®", "tm": "™", "de": "°", "ti": "~", "ha": "^", "rs": "\\", "sl": "/", "ba": "|",
    "at": "@", "sh": "#", "Do": "$", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "la": "⟨",
    "ra": "⟩", "<=": "≤", ">=": "≥", "!=": "≠", "->": "→", "<-": "←", "mu": "×", "di": "÷",
    "+-": "±", "ss": "ß", "ae": "æ", "AE": "Æ", "a^": "â", "e'": "é", "e`": "è", "a`": "à",
    "o:": "ö", "a:": "ä", "u:": "ü", "O:": "Ö", "A:": "Ä", "U:": "Ü", "c,": "ç", "n~": "ñ",
    "Eu": "€", "eu": "€", "sc": "§", "ps": "¶", "dg": "†", "pl": "+", "eq": "=", "ul": "_",
    "lh": "☜", "rh": "☞", "pc": "·", "ga": "`", "aa": "´",
}  # fmt: skip
_STRINGS = {"lq": "“", "rq": "”", "R": "®", "Tm": "™", "Lq": "“", "Rq": "”", "aq": "'"}

_ESCAPE_RE = re.compile(
    r"""\\(?:
        f(?:\[[^\]]*\]|\(..|.)           # font
      | s(?:[-+]?\d+|\([-+]?\d\d|\[[^\]]*\])  # size
      | \((?P<g2>..)                      # glyph \(xx
      | \[(?P<gl>[^\]]*)\]                # glyph \[name]
      | \*(?:\((?P<s2>..)|\[(?P<sl>[^\]]*)\]|(?P<s1>.))  # string
      | [nmgk](?:\(..|\[[^\]]*\]|.)       # register, colour, mark
      | [hvwlLoXZDbRNSxHCuYVJ]'[^']*'     # escapes with a quoted argument
      | (?P<ch>.)
    )""",
    re.VERBOSE | re.DOTALL,
)
_CH = {"-": "-", "e": "\\", "\\": "\\", "~": " ", " ": " ", "0": " ", "'": "´", "`": "`", ".": "."}


def _escape(m: re.Match) -> str:
    if m.group("g2") is not None or m.group("gl") is not None:
        name = m.group("g2") or m.group("gl")
        if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}(_[0-9A-Fa-f]{4,6})*", name):
            return "".join(chr(int(p.lstrip("u"), 16)) for p in name.split("_"))
        return _GLYPHS.get(name, "")
    if m.group("s2") or m.group("sl") or m.group("s1"):
        return _STRINGS.get(m.group("s2") or m.group("sl") or m.group("s1"), "")
    ch = m.group("ch")
    return _CH.get(ch, "") if ch is not None else ""


def unescape_roff(line: str) -> str:
    """Resolve roff escapes: fonts and sizes vanish, glyphs become characters."""
    if "\\" not in line:
        return line
    line = re.sub(r'\\".*', "", line)  # trailing comment
    return _ESCAPE_RE.sub(_escape, line)


def _macro_args(rest: str) -> list[str]:
    return [
        a[1:-1].replace('""', '"') if a.startswith('"') else a
        for a in re.findall(r'"(?:[^"]|"")*"?|\S+', rest)
    ]


_BREAK = {"PP", "LP", "P", "sp", "br", "TP", "TQ", "IP", "HP", "RS", "RE", "in", "ti", "Pp", "Lp", "PD", "ne"}
_JOINED = {"BR", "RB", "IR", "RI", "BI", "IB"}
_SPACED = {"B", "I", "SM", "SB", "Nm", "Nd", "Em", "Sy", "Dq", "Qq", "Sq", "Pq", "Aq", "Ql", "Li"}
_MDOC_WORDS = frozenset(
    "Nm Nd Fl Ar Op Oo Oc Pa Va Xr Em Sy Li Cm Ic Dv Er Ev Fn Fa Ft Fd In Aq Dq Qq Sq Pq Ql Ns No "
    "Xo Xc Bq Brq Lk Mt An Lb Ta It Dl Ux Bx St Tn Ms Sx Ad Cd Pf Ap Eo Ec Do Dc Po Pc Qo Qc So Sc".split()
)
_SKIP_BLOCKS = {
    "nf": "fi",
    "EX": "EE",
    "TS": "TE",
    "de": "..",
    "ig": "..",
    "Bd": "Ed",
    "EQ": "EN",
    "SY": "YS",
}


def roff_to_text(source: str) -> str:
    """Plain prose of a man(7)/mdoc(7) page: headings and filled paragraphs, code blocks dropped."""
    paragraphs: list[str] = []
    cur: list[str] = []
    end_block: str | None = None

    def flush() -> None:
        if cur:
            text = re.sub(r"[ \t]+", " ", " ".join(cur)).strip()
            if text:
                paragraphs.append(text)
            cur.clear()

    for raw in source.replace("\r\n", "\n").split("\n"):
        line = raw.rstrip()
        if end_block is not None:
            if line[:1] in ".'" and line[1:].strip().split(" ", 1)[0] in (end_block, end_block[1:] + "."):
                end_block = None
            elif line.strip() == end_block:
                end_block = None
            continue
        if line.startswith(('.\\"', "'\\\"", '\\"')) or line in (".", "'"):
            continue
        if line[:1] in ".'":
            parts = line[1:].strip().split(None, 1)
            if not parts:
                continue
            name, rest = parts[0], (parts[1] if len(parts) > 1 else "")
            if name in _SKIP_BLOCKS:
                flush()
                end_block = _SKIP_BLOCKS[name]
            elif name in ("SH", "SS", "Sh", "Ss"):
                flush()
                cur.append(unescape_roff(" ".join(_macro_args(rest))))
                flush()
            elif name in _BREAK:
                flush()
                if name == "IP" and rest:
                    tag = unescape_roff(_macro_args(rest)[0]).strip()
                    if tag and tag not in ("•", "-", "*", "o"):
                        cur.append(tag)
            elif name in _JOINED:
                cur.append(unescape_roff("".join(_macro_args(rest))))
            elif name in _SPACED or (name in _MDOC_WORDS and rest):
                args = [a for a in _macro_args(rest) if a not in _MDOC_WORDS]
                cur.append(unescape_roff(" ".join(args)))
            # every other request (TH, UR, ad, ds, nr, so, ...) carries no prose
            continue
        if line.strip():
            cur.append(unescape_roff(line))
        else:
            flush()
    flush()
    return clean_text("\n\n".join(paragraphs), max_blank_lines=1)


def is_roff_redirect(source: str) -> bool:
    lines = [ln for ln in source.splitlines() if ln.strip() and not ln.startswith('.\\"')]
    return len(lines) == 1 and lines[0].startswith(".so ")


def decode_legacy(data: bytes, encodings: Iterable[str], stopwords: frozenset[str] = frozenset()) -> str:
    """UTF-8 (BOM tolerated), else the legacy encoding that reads the most of the language's
    `stopwords` (the first, on a tie or with none given), else UTF-8 with U+FFFD. The first that decodes
    is not enough: koi8-r and iso-8859-2 map every byte, so cp1251 and cp1250 text came out garbled."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    read = []
    for enc in encodings:
        try:
            read.append(data.decode(enc))
        except UnicodeDecodeError:
            continue
    if not read:
        return data.decode("utf-8", "replace")
    if len(read) == 1 or not stopwords:
        return read[0]
    # a C1 control is a byte the encoding misread, and splits a word into pieces that can be stopwords
    hits = [sum(w in stopwords for w in words(t)) - sum("\x80" <= c <= "\x9f" for c in t) for t in read]
    return read[hits.index(max(hits))]
