"""Threads: the cores this process may use, and BLAS held at one thread for a block of code.

Why not `threadpool_limits(1)` each time: entering it inspects every shared library the process has
loaded (about 5 ms here), and ICP enters it per domain and per kNN search (0.09 s of 1.4 on the demo
shards). One controller is kept per set of loaded modules: a module imported since (faiss, torch)
may bring its own BLAS, so the controller is built again then.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

_lock = threading.Lock()
_cached: tuple[int, object] | None = None


def one_blas_thread():
    """A context manager holding every BLAS the process has loaded at one thread; on exit the counts
    it found are restored (process-wide: code that runs it in several threads at once should hold it
    around all of them, as data/reorder.py's map_domains does)."""
    global _cached
    from threadpoolctl import ThreadpoolController

    with _lock:
        if _cached is None or _cached[0] != len(sys.modules):
            _cached = (len(sys.modules), ThreadpoolController())
        controller = _cached[1]
    return controller.limit(limits=1, user_api="blas")


def cpu_cores() -> int:
    """The cores this process may run on: its affinity mask (not the machine's count), capped by its
    cgroup's CPU quota where one is set (a container given 2 CPUs on a 64-core host sees all 64 in its
    mask, and 32 workers of 2 threads each would share 2 CPUs' time)."""
    mask = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(mask, quota)) if quota else mask


def threads_within_quota() -> None:
    """Sets OMP_NUM_THREADS to the cgroup's CPU quota where one caps the affinity mask and the user set
    none, before torch is imported: torch starts a thread per core of the mask, and 64 threads sharing 2
    CPUs' time run slower than 2 (child processes inherit it)."""
    mask = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if "OMP_NUM_THREADS" not in os.environ and (quota := cgroup_cpu_quota()) and quota < mask:
        os.environ["OMP_NUM_THREADS"] = str(quota)


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota() -> int | None:
    """The CPUs this process's cgroup may use (quota / period, rounded up), None where unlimited or
    unreadable: cgroup v2's `cpu.max` ("max 100000" or "200000 100000"), else v1's cfs quota and period
    (quota -1 = none)."""
    try:
        if (v2 := CGROUP_ROOT / "cpu.max").is_file():
            quota, period = v2.read_text().split()[:2]
        else:
            v1 = CGROUP_ROOT / "cpu"
            quota = (v1 / "cpu.cfs_quota_us").read_text().strip()
            period = (v1 / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1") or int(period) <= 0 or int(quota) <= 0:
            return None
        return -(-int(quota) // int(period))
    except (OSError, ValueError):
        return None
