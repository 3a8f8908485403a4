"""Atomic file writes: a crash never leaves a half-written artifact behind, and a failed or killed
write leaves nothing behind either.

Every artifact is written under a temporary name beside its destination, `.NAME.TAG~HOST~PID[~R]`,
and renamed into place. The host and process id in the name let the next write of the same
destination (or `forest fsck`) tell a leftover of a dead process from the work of a live one, and
remove it: a kill never leaves temporary files that nothing cleans. Error paths only ever remove
what they created and never raise a second exception (after a disk-full error the cleanup is what
frees the disk). Disk-full, read-only and permission errors become a `WriteError` naming the
destination.

Durable across a power cut, not only a kill: the new bytes are flushed (fsync) before the rename that
publishes them, and the folder holding the rename after it. Without the first, a file system that
allocates late can publish a folder whose weights read back empty after the cut; without the second,
the rename itself can be lost while what follows it (a pruned checkpoint) is kept.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from elmforest.utils.errors import UserError, WriteError


def _read_umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it, which
    would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022  # no /proc (not Linux): the usual default


_UMASK = _read_umask()
FILE_MODE = 0o666 & ~_UMASK  # what a plain open() would give; safetensors and mkstemp make 0600
HOST = socket.gethostname().replace("~", "-")

# .NAME.TAG~HOST~PID[~RANDOM]; legacy names: .NAME.tmp-PID / .NAME.old-PID, .stage-HOST-PID-NS
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<tag>tmp|old|stage|trash)~(?P<host>[^~]*)~(?P<pid>\d+)(?:~[^~]*)?$")
_LEGACY = re.compile(r"^\.(?P<name>.+)\.(?P<tag>tmp|old)-(?P<pid>\d+)$")
_LEGACY_STAGE = re.compile(r"^\.stage-(?P<host>.+)-(?P<pid>\d+)-\d+$")


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def parse_temp(name: str) -> dict | None:
    """{'name', 'tag', 'host', 'pid'} of a temporary name written by elmforest, else None."""
    for pat in (_TEMP, _LEGACY, _LEGACY_STAGE):
        m = pat.match(name)
        if m:
            d = m.groupdict()
            return {
                "name": d.get("name"),
                "tag": d.get("tag", "stage"),
                "host": d.get("host") or HOST,
                "pid": int(d["pid"]),
            }
    return None


def remove_path(p: str | os.PathLike) -> None:
    """Remove a file, link or directory tree; never raises (it runs on error paths)."""
    p = Path(p)
    try:
        if p.is_symlink() or not p.is_dir():
            p.unlink(missing_ok=True)
        else:
            shutil.rmtree(p, ignore_errors=True)
    except OSError:
        pass


def discard_dir(p: str | os.PathLike) -> None:
    """Delete a folder whole or not at all: renamed aside first (a dead process's temporary, removed by
    the next write beside it), then deleted. rmtree alone, killed, left part of it, in the file system's
    order: a run without its run_config.json, an MoE export without its card, read on the rerun."""
    p = Path(p)
    trash = temp_sibling(p, "trash", unique=True)
    os.rename(p, trash)
    shutil.rmtree(trash)


def clean_stale(parent: str | os.PathLike, name: str | None = None, restore_only: bool = False) -> list[Path]:
    """Remove temporary entries in `parent` (those for destination `name` only, if given) left by
    processes of this host that are dead. An `old` copy whose destination is missing (a kill
    between the two renames of `replace_dir`) is the only copy: it is put back instead;
    `restore_only` does just that (for readers, which must not delete). Returns what was removed or
    restored; never raises."""
    parent = Path(parent)
    done = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return done
    for p in entries:
        t = parse_temp(p.name)
        # a temporary of a temporary (a stage folder's own staging copy) belongs to the innermost name
        inner = t and t["name"] and parse_temp(t["name"])
        owner = inner["name"] if inner else t and t["name"]
        if t is None or (name is not None and owner != name) or t["host"] != HOST or pid_alive(t["pid"]):
            continue
        if t["tag"] == "old" and t["name"] and not (parent / t["name"]).exists():
            try:
                os.rename(p, parent / t["name"])
                done.append(p)
            except OSError:
                pass
            continue
        if not restore_only:
            remove_path(p)
            done.append(p)
    return done


def restore_swapped(path: str | os.PathLike) -> None:
    """Put back the directory a kill left aside while replacing it (`replace_dir`'s `.NAME.old~`), when
    `path` is missing: readers found nothing there (a fine-tuned MoE said "not a model checkpoint"), and
    a writer checking what it would replace took nothing for nothing to lose."""
    p = Path(path)
    if not (p.exists() or p.is_symlink()):
        clean_stale(p.parent, p.name, restore_only=True)


def refuse_linked_dir(dst: str | os.PathLike) -> None:
    """A folder output is written beside its name and renamed onto it: onto a link to a folder, which
    became a real folder on this disk while its target (a bigger disk, say) kept the old output. Called by
    temp_sibling, and first thing by writers that work long before they stage their output."""
    dst = Path(dst)
    if dst.is_symlink() and dst.is_dir():
        raise UserError(f"{dst} is a symbolic link to a folder ({dst.resolve()}); give that folder itself")


def temp_sibling(dst: str | os.PathLike, tag: str = "tmp", unique: bool = False) -> Path:
    """A temporary name beside `dst` for this process (stale ones of dead processes removed first);
    `unique` adds a random part for several temporaries of one destination in one process."""
    dst = Path(dst)
    if tag != "trash":
        refuse_linked_dir(dst)
    clean_stale(dst.parent, dst.name)
    suffix = f"~{secrets.token_hex(4)}" if unique else ""
    p = dst.with_name(f".{dst.name}.{tag}~{HOST}~{os.getpid()}{suffix}")
    remove_path(p)  # an earlier attempt of this same process
    return p


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def as_write_error(
    e: BaseException, path: str | os.PathLike, tmp: str | os.PathLike | None = None
) -> WriteError | None:
    """A WriteError naming `path` for disk-full / read-only / permission failures (also those safetensors
    reports as its own error type), or for any file-system error about `path`'s temporary `tmp` (a
    person never chose that name: `path` is a directory, its folder takes no files), else None."""
    if isinstance(e, WriteError):
        return None
    named = [str(f) for f in (getattr(e, "filename", None), getattr(e, "filename2", None)) if f]
    about_tmp = tmp is not None and str(tmp) in named
    # a refused read elsewhere (an unreadable input folder) is not a failure to write `path`
    mine = [os.path.abspath(r) for r in (path, tmp) if r is not None]
    elsewhere = bool(named) and not any(
        a == r or a.startswith(r + os.sep) for a in map(os.path.abspath, named) for r in mine
    )
    if isinstance(e, OSError) and (about_tmp or (e.errno in _DISK_ERRNOS and not elsewhere)):
        reason = e.strerror or str(e)
    elif type(e).__name__ == "SafetensorError" and (m := re.search(r"(?:code: |os error )(\d+)", str(e))):
        if int(m.group(1)) not in _DISK_ERRNOS:
            return None
        reason = os.strerror(int(m.group(1)))
    else:
        return None
    return WriteError(f"{path}: cannot write ({reason}); nothing was changed")


def file_digest(path: str | os.PathLike) -> dict:
    """{'bytes', 'sha256'} of a file, read in blocks (weights can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": os.stat(path).st_size, "sha256": h.hexdigest()}


def fix_modes(path: str | os.PathLike) -> None:
    """Give every file under `path` the mode a plain open() would (safetensors writes 0600). A file
    with other hard links (a seed shared between forests) is left alone: its mode is the other
    path's too, set when it was written, and perhaps made read-only since by its owner."""
    path = Path(path)
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file() and not f.is_symlink()]
    for f in files:
        if f.stat().st_nlink == 1:
            os.chmod(f, FILE_MODE)


@contextmanager
def undone_on_failure(tmp: str | os.PathLike, dst: str | os.PathLike) -> Iterator[None]:
    """If the block fails: remove `tmp` (never raising: this runs on a full disk) and re-raise, as a
    WriteError naming `dst` when the disk refused the write."""
    try:
        yield
    except BaseException as e:
        remove_path(tmp)
        if (err := as_write_error(e, dst, tmp)) is not None:
            raise err from e
        raise


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The complete JSON lines of a log (a run still writing may leave a partial last line)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            out.append(row)
    return out


@contextmanager
def held_lock(path: str | os.PathLike, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` for the block, or fail at once with `busy` when another process
    holds it (the kernel drops a killed holder's lock: no stale lock files to clean)."""
    import fcntl

    from elmforest.utils.errors import Failed

    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Failed(busy) from None
        yield


@contextmanager
def atomic_path(path: str | os.PathLike, before_replace=None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.
    `before_replace()` runs once the new file is on disk (synced), just before the rename: what must
    change with it (forest.json and the weights it records) moves only when it could be written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path, unique=True)
    with undone_on_failure(tmp, path):
        tmp.touch()
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    sync_dir(path.parent, published=True)


@contextmanager
def staged_dir(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty directory beside `dst`; it replaces `dst` whole only if the block succeeds, and
    is removed (never half kept) if it fails."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dst)
    with undone_on_failure(tmp, dst):
        tmp.mkdir()
        yield tmp
        replace_dir(tmp, dst)


def write_text_atomic(path: str | os.PathLike, text: str, before_replace=None) -> None:
    with atomic_path(path, before_replace) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any, before_replace=None) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", before_replace)


def read_json(path: str | os.PathLike, unique_keys: bool = False) -> Any:
    """A JSON file's contents; a truncated or corrupt file is a UserError naming it (json's own
    message names only a line and column). `unique_keys`: a key given twice in one object is refused
    (json keeps the last one silently: a hand-written map would lose an entry without a word)."""

    def once(pairs: list) -> dict:
        seen: dict = {}
        for k, v in pairs:
            if k in seen:
                raise UserError(f"{path}: key {k!r} is given twice in one object")
            seen[k] = v
        return seen

    with parse_errors(path, "JSON"):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f, object_pairs_hook=once if unique_keys else None)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e


@contextmanager
def parse_errors(path, kind: str) -> Iterator[None]:
    """What a JSON or YAML parser could not read that is not a syntax error (the caller says those: each
    parser words them its own way), as one UserError naming the file: text that is not UTF-8, nesting
    deeper than Python's stack, an integer longer than Python converts (4,300 digits)."""
    try:
        yield
    except UserError:
        raise
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid {kind} (not UTF-8 text at byte {e.start})") from e
    except (ValueError, RecursionError) as e:
        what = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
        raise UserError(f"{path}: not valid {kind} ({what})") from None


def file_stamps(sources) -> list[list]:
    """[resolved path, size, modification time] of every file of `sources` (files or folders, walked):
    what says a corpus read earlier was rewritten since (a missing source has none)."""
    files = [
        f for s in map(Path, sources) for f in ([s] if s.is_file() else sorted(s.rglob("*"))) if f.is_file()
    ]
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def replace_dir(staged: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Move a fully written directory into place. An existing `dst` steps aside whole first, so `dst`
    is never half deleted nor half written (a kill between the two renames leaves the old one at
    `.NAME.old~HOST~PID`, which the next write of `dst` puts back). Files get the usual modes."""
    staged, dst = Path(staged), Path(dst)
    fix_modes(staged)
    sync_tree(staged)
    old = temp_sibling(dst, "old")
    moved = dst.exists() or dst.is_symlink()
    if moved:
        os.rename(dst, old)
    try:
        os.rename(staged, dst)
    except BaseException:  # (a full disk can refuse a rename that must grow the directory)
        if moved:
            os.rename(old, dst)  # the old one back: "nothing was changed" stays true
        raise
    sync_dir(dst.parent, published=True)
    remove_path(old)
    return dst


def sync_dir(path: str | os.PathLike, published: bool = False) -> bool:
    """Flush a folder's entries (the names created, renamed or removed in it) to disk; False if it could
    not. A file system that cannot sync a folder (EINVAL: some network and FUSE file systems) has
    nothing to flush: True there (a checkpoint's pruning waits on it). `published`: after the rename that put a new version in place, a failure (a
    folder that can be written but not read, an I/O error) is not raised: the write did happen, and
    "nothing was changed" would be false."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            return True  # (nothing such a file system could flush: done, as far as it goes)
        if published:
            return False
        raise
    return True


def sync_tree(path: str | os.PathLike) -> None:
    """Flush every file under `path` (a folder, or one file) and every folder's entries, `path`'s own
    included, before a rename publishes it. Links are not followed."""
    path = Path(path)
    folder = path.is_dir() and not path.is_symlink()
    for root, _dirs, files in os.walk(path) if folder else [(path.parent, [], [path.name])]:
        for f in (Path(root) / name for name in files):
            if stat.S_ISREG(os.lstat(f).st_mode):  # (not a link, nor a FIFO, whose open would block)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if folder:
            sync_dir(root)
