"""One trainer per run directory: the lock file a trainer holds while it runs (the kernel drops it with
the process, so a killed trainer leaves no stale lock), and the check others make before they delete or
replace a run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

LOCK = ".trainer.lock"


def _try_lock(run_dir: Path) -> tuple[IO | None, str]:
    """(the open lock file, held), or (None, why not: "gone", the folder is not there; "busy", a
    trainer holds it). The kernel drops the lock with the process."""
    import fcntl

    try:
        f = open(Path(run_dir) / LOCK, "a")  # noqa: SIM115 (held by the caller)
    except (FileNotFoundError, NotADirectoryError):
        return None, "gone"
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None, "busy"
    return f, ""


def lock_run_dir(run_dir: Path) -> IO:
    """The open lock file a trainer holds while it runs in `run_dir`: a second trainer there (an orphan
    of a killed job, a duplicate launch) is refused instead of interleaving checkpoints."""
    from elmforest.utils.errors import Failed

    f, why = _try_lock(run_dir)
    if why == "gone":
        raise Failed(
            f"{run_dir}: the run directory was deleted by another process as this trainer started; "
            "run the command again"
        )
    if why == "busy":
        raise Failed(f"{run_dir}: another trainer is running in this directory")
    return f


def drop_if_empty(run_dir: Path) -> None:
    """Removes a run directory that holds nothing but its lock file: a run refused before it wrote
    anything leaves no folder that looks like a run."""
    import shutil

    if not any(p.is_file() and p.name != LOCK for p in run_dir.rglob("*")):
        shutil.rmtree(run_dir, ignore_errors=True)


def training_now(run_dir: str | Path) -> bool:
    """A live trainer holds `run_dir`'s lock. The check takes the lock for an instant, so a trainer
    starting at that very moment is refused as a duplicate (and says so); it never waits. To delete
    or replace a run, hold the lock instead (`unless_training`)."""
    from elmforest.utils.errors import Failed
    from elmforest.utils.io import held_lock

    lock = Path(run_dir) / LOCK
    if not lock.is_file():
        return False
    try:
        with held_lock(lock, "busy"):
            return False
    except Failed:
        return True


@contextmanager
def unless_training(run_dir: str | Path) -> Iterator[bool]:
    """True, holding `run_dir`'s trainer lock for the block, so no trainer starts there while the run is
    deleted or replaced; False, holding nothing, when a trainer holds it now or the folder is gone. (A
    check, then a delete, lets a trainer start in between and lose its folder under it.)"""
    f, _ = _try_lock(run_dir)
    if f is None:
        yield False
        return
    with f:
        yield True
