"""Child processes that cannot outlive the process that started them, and which process of a
data-parallel job speaks for it.

A worker blocked on its task queue never notices that its parent was SIGKILLed (its siblings keep
the queue's pipe open), so without this it lives on, holding its memory, until someone kills it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1


@contextlib.contextmanager
def stopped_with(pool):
    """Ctrl-C or SIGTERM in the parent stops the workers at once: leaving the pool's `with` would
    otherwise wait for the running jobs and run every queued one (a whole forest's training)."""
    try:
        yield
    except BaseException as e:
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: not a failed job
            if not hasattr(pool, "_processes"):  # CPython's; no public handle on the workers
                print(
                    "warning: this Python's process pool hides its workers; they may outlive this",
                    file=sys.stderr,
                )
            for p in list((getattr(pool, "_processes", None) or {}).values()):
                p.kill()
            pool.shutdown(wait=False, cancel_futures=True)
        raise


def first_process() -> bool:
    """Whether this is the process that speaks and writes for a data-parallel job (rank 0 of torchrun's
    environment; a plain process is its own first). Read from the environment, not the process group, so
    that it holds before the group is made and in helpers that never make one."""
    return int(os.environ.get("RANK", "0")) == 0


def die_with_parent(parent: int | None = None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG); a no-op
    elsewhere. Call it first thing in the child (a pool's initializer, a preexec_fn).

    The signal is tied to the *thread* that forked the child, not to the parent process: if that
    thread exits while the parent lives on, the child is killed too. So fork workers from a thread
    that lives as long as they should (the main thread, or the pool's own threads).

    `parent`: the pid the child expects as its parent. If the parent died before the prctl took
    effect, the child has already been re-parented and no signal will ever come; it then dies now.
    Leave it None when the parent is not the caller (a fork server sits between them)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no libc with prctl (unusual Linux builds): nothing to do
        return
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def run_stoppable(cmd: list[str], grace: float = 60.0, **popen) -> int:
    """Run `cmd` (torchrun) to its end, and if this process is stopped meanwhile (SIGTERM's SystemExit,
    Ctrl-C) pass SIGTERM on and wait up to `grace` seconds before killing it. subprocess.run would
    SIGKILL it at once: torchrun then never stops its workers, which live in sessions of their own
    and went on training, orphaned, into the run directory."""
    import subprocess

    p = subprocess.Popen(cmd, **popen)
    try:
        return p.wait()
    except BaseException:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)  # torchrun stops its workers, then exits
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        raise


def wait_for(paths: list[Path], timeout: float) -> bool:
    """Whether every path appeared within `timeout` seconds (another process writes them)."""
    end = time.time() + timeout
    while time.time() < end:
        if all(p.exists() for p in paths):
            return True
        time.sleep(0.05)
    return False


def main(argv: list[str] | None = None) -> int:
    """`python -m elmforest.utils.proc PARENT_PID -- CMD ...`: die with PARENT_PID, then exec CMD. The
    signal request survives exec, so a child gets it without a preexec_fn (unsafe in a
    multi-threaded parent, such as a Ray worker)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m elmforest.utils.proc PARENT_PID -- CMD [ARG ...]", file=sys.stderr)
        return 2
    die_with_parent(int(argv[0]))
    os.execvp(argv[2], argv[2:])
    return 127  # not reached


def tied_to_this_process(cmd: list[str]) -> list[str]:
    """`cmd` wrapped so that it dies when this process dies."""
    return [sys.executable, "-m", "elmforest.utils.proc", str(os.getpid()), "--", *cmd]


if __name__ == "__main__":
    raise SystemExit(main())
