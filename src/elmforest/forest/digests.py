"""Checking the experts' weight checksums, without reading every byte again on every resume.

Resuming `forest train` checks each finished expert's checksums, because a flipped byte keeps a file's
size. For a forest of 1B-parameter experts that reads hundreds of GB on every resume. Like git's index
and rsync's quick check, a file whose size, mtime, ctime, inode and device are unchanged since its sum
was last verified is taken as verified (`trust_unchanged`). A write through the file system changes
mtime and ctime (ctime cannot be set back), and a copy or restore makes a new inode. Timestamps are
coarse (a kernel tick), so a file changed within a few seconds of the check could keep them: such a
file is not cached, as git treats "racily clean" entries. What the stat cannot see is the disk
flipping a bit under an unchanged inode; `forest fsck` reads every byte again.

The cache (`.digest-cache.json` in the forest's root) is a hint, never the record: the sums are
forest.json's. A missing, damaged or stale cache only means reading the files again; writers racing
each other lose entries, not correctness. Not in forest.json, so a check never rewrites the manifest.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from elmforest.utils.io import file_digest, write_json_atomic

CACHE = ".digest-cache.json"
RACY_NS = 3 * 10**9  # a file changed this recently is hashed again next time, whatever its stat says


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


_VERIFIED: dict[str, dict] = {}  # this process's own matches: a read-only forest's cache cannot be written


class DigestCheck:
    """One pass of checksum checks over a forest's files (`matches`), then `save`."""

    def __init__(self, root: Path, trust_unchanged: bool):
        self.path = Path(root) / CACHE
        self.trust = trust_unchanged
        self.cache = _read(self.path)
        self.changes: dict[str, dict | None] = {}

    def matches(self, rel: str, f: Path, sha256: str) -> bool:
        """Whether `f` (`rel` to the forest's root) has the checksum `sha256`."""
        st = f.stat()
        entry, where = {"stat": _stat_key(st), "sha256": sha256}, str(f.resolve())
        if self.trust and entry in (self.cache.get(rel), _VERIFIED.get(where)):
            return True
        if file_digest(f)["sha256"] != sha256:
            self.changes[rel] = None
            _VERIFIED.pop(where, None)
            return False
        after = f.stat()
        newest = max(after.st_mtime_ns, after.st_ctime_ns)
        if _stat_key(after) == _stat_key(st) and time.time_ns() - newest > RACY_NS:
            self.changes[rel] = _VERIFIED[where] = {"stat": _stat_key(after), "sha256": sha256}
        return True

    def save(self) -> None:
        """Merge this pass into the cache on disk (read again: another process may have written it)."""
        if not self.changes:
            return
        cache = _read(self.path)
        for rel, entry in self.changes.items():
            if entry is None:
                cache.pop(rel, None)
            else:
                cache[rel] = entry
        try:
            write_json_atomic(self.path, cache)
        except OSError:  # a read-only forest: the check stands, the next one reads the files again
            pass
        self.changes = {}


def forget(root: Path, prefix: str) -> None:
    """Drop the cache's entries under `prefix` (an expert opted out: nothing of it is kept)."""
    check = DigestCheck(root, trust_unchanged=False)
    check.changes = dict.fromkeys((k for k in check.cache if k.startswith(prefix)), None)
    check.save()
