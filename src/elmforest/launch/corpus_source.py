"""Which corpus an output dir's tokenizer and shards were made of, so a rerun resumes only on the same
one: its location, its files' sizes and their digests, checked before anything is reused (a corpus
changed since, or another one, would train and score on the earlier data without a word)."""

from __future__ import annotations

import os
from pathlib import Path

from elmforest.data.shards import Shards
from elmforest.utils.errors import UserError

SOURCE_FILE = "corpus_source.json"  # the corpus an output dir's stages are built from (written first)


def check_shards_source(shards: Shards, corpus: str | Path | None, out: Path) -> None:
    """An output dir is resumed, so its shards are reused: only when built from the corpus asked for now
    (another --data, or the demo corpus and then --data, would train and score on the earlier data).
    `corpus` None is the demo corpus, built in OUT/corpus; a corpus inside OUT moves with it (an output
    dir copied or moved keeps its own)."""
    check_source(shards.index.get("source"), corpus, out, shards.root)


def corpus_listing(corpus) -> dict | None:
    """{relative path: bytes} of a local corpus's files (None for other sources): enough to tell a
    corpus that gained, lost or rewrote files since an output dir tokenized it, without reading it."""
    from elmforest.data.sources import parse_source

    loc = Path(parse_source(corpus).location)
    if loc.is_file():
        return {loc.name: loc.stat().st_size}
    if not loc.is_dir():
        return None
    return {
        str(f.relative_to(loc)): f.stat().st_size
        for f in sorted(loc.rglob("*"))
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(loc).parts)
    }


def corpus_digests(corpus, listing: dict | None) -> dict | None:
    """{relative path: {mtime_ns, sha256}} of a local corpus's files. A file rewritten at the same
    size (a typo fixed, a label changed) keeps its listing; its digest tells it apart. Read once when
    an output dir is started; a rerun hashes again only the files whose mtime changed (a copy)."""
    if listing is None:
        return None
    root = _corpus_root(corpus)
    return {name: _digest(root / name) for name in listing}


def _corpus_root(corpus) -> Path:
    from elmforest.data.sources import parse_source

    loc = Path(parse_source(corpus).location)
    return loc.parent if loc.is_file() else loc


def _digest(path: Path) -> dict:
    from elmforest.utils.io import file_digest

    return {"mtime_ns": path.stat().st_mtime_ns, "sha256": file_digest(path)["sha256"]}


def check_listing(had: dict, corpus, out: Path, digests: dict | None = None) -> dict | None:
    """A rerun on a corpus changed since its tokenizer and shards were built here trained and scored the
    old ones: a domain added since was left out without a word. Refused, naming what changed (a file
    rewritten at its old size too, where the output dir recorded its digest). Returns `digests` with the
    mtimes of files found unchanged by their digest (a copy) brought up to date."""
    now = corpus_listing(corpus)
    if now is None:
        return digests
    fresh = dict(digests) if digests is not None else None
    added = sorted(set(now) - set(had))
    gone = sorted(set(had) - set(now))
    changed = sorted(k for k in set(now) & set(had) if now[k] != had[k])
    rewritten = []
    if not (added or gone or changed) and digests:
        root = _corpus_root(corpus)
        for name, d in sorted(digests.items()):
            path = root / name
            if name in now and path.stat().st_mtime_ns != d.get("mtime_ns"):
                if (got := _digest(path))["sha256"] != d.get("sha256"):
                    rewritten.append(name)
                else:
                    fresh[name] = got
    if not (added or gone or changed or rewritten):
        return fresh
    said = "; ".join(
        f"{what} {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
        for what, names in (
            ("added", added),
            ("removed", gone),
            ("resized", changed),
            ("rewritten", rewritten),
        )
        if names
    )
    raise UserError(
        f"{corpus} changed since {out} tokenized it ({said}): its tokenizer and shards are of the corpus as "
        "it was; give another --out for the corpus as it is now (or delete it to start over)"
    )


def check_source(have, corpus: str | Path | None, out: Path, what) -> None:
    """`have`: the source `what` (shards, or the whole output dir: its tokenizer too) was built from."""

    from elmforest.data.sources import resolve_source

    want = resolve_source(corpus if corpus is not None else out / "corpus")
    if not isinstance(have, str) or have == want:
        return
    rel = os.path.relpath(want, out.resolve())
    if not rel.startswith("..") and have.endswith(os.sep + rel):
        # the output dir's own corpus, moved or copied with it (gone from there, or a built one: a
        # user's folder that happens to be named `corpus` holds no manifest)
        if corpus is not None or not Path(have).exists() or (Path(have) / "manifest.json").is_file():
            return
    resume = f"pass --data {have} to resume that run, or " if corpus is None else ""
    raise UserError(
        f"{what} was built from {have}, not {want}: this output dir belongs to another corpus; "
        f"{resume}give another --out (or delete it to start over)"
    )
