"""One trainer per run directory: the lock file a trainer holds while it runs (the kernel drops it with
the process, so a killed trainer leaves no stale lock), and the check others make before they delete or
replace a run."""

from __future__ import annotations

from pathlib import Path

LOCK = ".trainer.lock"


def training_now(run_dir: str | Path) -> bool:
    """A live trainer holds `run_dir`'s lock. The check takes the lock for an instant, so a trainer
    starting at that very moment is refused as a duplicate (and says so); it never waits."""
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
