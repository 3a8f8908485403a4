"""Child processes that cannot outlive the process that started them.

A worker blocked on its task queue never notices that its parent was SIGKILLed (its siblings keep
the queue's pipe open), so without this it lives on, holding its memory, until someone kills it.
"""

from __future__ import annotations

import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


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
