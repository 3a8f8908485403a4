"""What every reader yields and counts: a `Document`, the `ReadStats` of a read, `DataError`, and the
check that turns one raw record (a JSON object, a Parquet or Arrow row) into a Document or a skip
counted by reason.

Apart from data/readers.py (which files are data; the JSONL, Parquet and .txt readers) so that those
readers and data/hf_readers.py share one record check, and a bad record is skipped for the same
reason whichever format it came in.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from elmforest.data.sources import Source
from elmforest.utils.errors import UserError


class DataError(UserError):
    """Input data that cannot be used; the message names the file and the reason."""


def text_key(text: str, size: int = 16) -> bytes:
    """A document's text as compared: the same text under two ids (a copy in two domains, a crawl's
    duplicate) has one key. The shards keep 8 bytes per document (millions fit in an array); the
    leakage and out-of-domain checks 16 (eval/leakage.py, launch/ood_sets.py)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=size).digest()


@dataclass(frozen=True)
class Document:
    id: str
    domain: str
    text: str


@dataclass
class ReadStats:
    """Counts of what a read produced and skipped; `skipped` maps reason -> count."""

    documents: int = 0
    files: int = 0
    skipped: Counter = field(default_factory=Counter)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: ReadStats) -> None:
        self.documents += other.documents
        self.files += other.files
        self.skipped.update(other.skipped)

    def summary(self) -> str:
        s = f"{self.documents} documents from {self.files} file(s)"
        if self.skipped:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
            s += f"; skipped {self.skipped_total} bad record(s) ({reasons})"
        return s

    def to_dict(self) -> dict:
        return {"documents": self.documents, "files": self.files, "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, d: dict) -> ReadStats:
        return cls(d["documents"], d["files"], Counter(d.get("skipped") or {}))


def _check_record(
    rec,
    stats: ReadStats,
    default_domain: str,
    default_id: str,
    text_field: str = "text",
    domain_field: str = "domain",
) -> Document | None:
    if not isinstance(rec, dict):
        stats.skipped["not_an_object"] += 1
        return None
    # defaults come from file and folder names, which need not be UTF-8 (a Latin-1 `café` folder): the
    # text is fine, so the name spells its bad bytes as \xNN (distinct names stay distinct: `café` and
    # `cafè` are two domains) rather than the documents being dropped
    default_domain, default_id = _name_text(default_domain), _name_text(default_id)
    text = rec.get(text_field)
    if text is None:
        stats.skipped["missing_text"] += 1
        return None
    if not isinstance(text, str):
        stats.skipped[f"wrong_type({text_field})"] += 1  # which field: a user cannot guess it
        return None
    if not text.strip():
        stats.skipped["empty_text"] += 1
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from "\udXXX" escapes in JSON
        stats.skipped["invalid_utf8"] += 1
        return None
    domain = rec.get(domain_field, default_domain)
    if domain is None or domain == "":
        domain = default_domain
    if not isinstance(domain, str):
        stats.skipped[f"wrong_type({domain_field})"] += 1
        return None
    rid = rec.get("id", default_id)
    if rid is None or rid == "" or (isinstance(rid, float) and math.isnan(rid)):  # empty: as no id
        rid = default_id  # (an empty id would hash every such document into one split)
    if isinstance(rid, float) and rid.is_integer():  # pandas' integer ids once a NaN made them floats
        rid = int(rid)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        stats.skipped["wrong_type(id)"] += 1
        return None
    try:  # the split hashes the id and folders are named after the domain: both must be UTF-8
        domain.encode("utf-8"), str(rid).encode("utf-8")
    except UnicodeEncodeError:
        stats.skipped["invalid_utf8"] += 1
        return None
    stats.documents += 1
    return Document(id=str(rid), domain=domain, text=text)


def _name_text(name: str) -> str:
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # not from a file name: left for the UTF-8 check to count
        return name


class FieldCheck:
    """Whether the fields the user named occur in a file of schema-less records (JSON lines): a file
    with records but none of them carrying such a field is an error naming it, where the default
    fields keep today's per-record counts (`missing_text`)."""

    def __init__(self, path, src: Source):
        self.path, self.wanted = path, set(src.explicit_fields)
        self.found: set[str] = set()
        self.keys: set[str] = set()

    def see(self, rec) -> None:
        if self.wanted and isinstance(rec, dict):
            self.found.update(self.wanted.intersection(rec))
            if len(self.keys) < 100:  # enough to show in the message
                self.keys.update(rec)

    def done(self) -> None:
        missing = sorted(self.wanted - self.found)
        if missing and self.keys:
            raise DataError(
                f"{self.path}: no record has the field(s) {', '.join(map(repr, missing))} "
                f"(fields seen: {', '.join(sorted(map(str, self.keys))[:20])})"
            )


def check_columns(where, names, src: Source, kind: str) -> None:
    """A schema without the text field, or without a domain field the user named, is an error."""
    for name in dict.fromkeys((src.text_field, *src.explicit_fields)):
        if name not in names:
            raise DataError(f"{where}: {kind} has no {name!r} column (columns: {sorted(names)})")


def record_columns(names, src: Source) -> list[str]:
    return list(dict.fromkeys(c for c in ("id", src.domain_field, src.text_field) if c in names))


def batch_records(batch, columns: list[str], text_field: str, convert=None) -> Iterator[dict]:
    """The rows of an Arrow record batch as dicts of `columns`; binary text columns may hold invalid
    UTF-8, decoded per value (failures marked _InvalidUtf8, to be counted). `convert` maps a column
    name to a function applied to its values (a ClassLabel's ids to names)."""
    cols = {}
    for c in columns:
        arr = batch.column(c)
        if c == text_field and arr.type not in ("string", "large_string"):
            cols[c] = [_decode_bytes(v) for v in arr.to_pylist()]
        else:
            cols[c] = arr.to_pylist()
        if convert and c in convert:
            cols[c] = [convert[c](v) for v in cols[c]]
    for i in range(batch.num_rows):
        yield {c: cols[c][i] for c in columns}


class _InvalidUtf8:
    pass


def _decode_bytes(v):
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            return _InvalidUtf8()
    return v
