"""A model's training documents, read from another file or format, scored as held out.

Splits hash each document's id, and ids come from where a document was read: the same corpus as
Parquet instead of JSONL, or as a folder of .txt files, gives every document another id and so
another split. eval/bpb.check_held_out refuses the model's own corpus read otherwise by its location;
a copy elsewhere passed, and its "test" split was mostly the model's training documents (18 of 19 in
a new user's Parquet copy). Here the text decides: the scored documents are hashed and looked up among
the documents the model trained on (or was tuned on, for a test split), read from the corpus its
training shards were built from. Only data that shares a domain name with those shards is checked
(another corpus costs nothing), and each corpus is read once per process (a forest's experts share it).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from elmforest.data.readers import iter_documents
from elmforest.data.splits import SplitSpec
from elmforest.utils.errors import UserError
from elmforest.utils.io import read_json

_SEEN: dict[tuple, set[bytes] | None] = {}  # (index, fractions, splits) -> the texts the model saw
_READ: dict[tuple, list | None] = {}  # (source, fractions, splits, domains) -> the documents scored


def _key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _sources(source) -> list[str]:
    return [str(x) for x in (source if isinstance(source, list) else [source]) if x]


def _stamp(sources: list[str]) -> tuple:
    """The sources as they are now (each file's size and modification time): a memo of an earlier
    read of files since rewritten is stale."""
    out = []
    for x in sources:
        p = Path(x)
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
        out.append((x, tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)))
    return tuple(out)


def _seen_texts(index: Path, held: SplitSpec, splits: frozenset) -> set[bytes] | None:
    """Texts of the training corpus's documents in `splits` of the model's split; None when the corpus
    cannot be read any more (moved, deleted): nothing to compare against."""
    k = (_stamp(_sources(read_json(index).get("source"))), held.valid_frac, held.test_frac, splits)
    if k not in _SEEN:
        try:
            _SEEN[k] = {
                _key(d.text)
                for x in _sources(read_json(index).get("source"))
                for d in iter_documents(x)
                if held.assign(d.id) in splits
            }
        except (UserError, OSError):
            _SEEN[k] = None
    return _SEEN[k]


def check_same_text(
    mdir: Path, index: Path, held: SplitSpec, source, spec: SplitSpec, split: str, data, prior: bool = False
) -> None:
    """Refuse when more than half of the documents read as `split` (or as the prior's valid split) are
    documents `mdir` trained on (a test split: or was tuned on, its valid split); note a few."""
    reads = [s for s, on in (("test", split == "test"), ("valid", split == "valid" or prior)) if on]
    if not reads:
        return
    trained_domains = frozenset(read_json(index).get("domains") or {})
    k = (_stamp(_sources(source)), spec.valid_frac, spec.test_frac, tuple(reads), trained_domains)
    if k not in _READ:  # once per process: a forest's experts and seed are each checked
        try:
            _READ[k] = [
                (s, _key(d.text))
                for x in _sources(source)
                for d in iter_documents(x)
                if d.domain in trained_domains and (s := spec.assign(d.id)) in reads
            ]
        except (UserError, OSError):
            _READ[k] = None  # unreadable here: the evaluation itself says why
    docs = _READ[k]
    if not docs:
        return
    for s in reads:
        keys = [k for r, k in docs if r == s]
        seen = _seen_texts(index, held, frozenset({"train", "valid"} if s == "test" else {"train"}))
        if not keys or seen is None:
            continue
        n = sum(k in seen for k in keys)
        what = "trained or was tuned on" if s == "test" else "trained on"
        said = (
            f"{data}: {n} of the {len(keys)} {s} documents read are documents {mdir} {what} (the same text), "
            f"in the corpus its shards were built from ({read_json(index).get('source')})"
        )
        if 2 * n > len(keys):
            raise UserError(
                f"{said}: read from another file or format, they got other ids, so other splits; evaluate "
                "on the model's own shards, or the files it was trained on as they were read"
            )
        if n:
            print(f"note: {said}; their BPB is not wholly held out", file=sys.stderr)
