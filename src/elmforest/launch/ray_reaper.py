"""Ray's processes die with the command that started them, even when that command is SIGKILLed.

`ray.init()` without an address starts a Ray instance of the driver's own (GCS, raylet, dashboard and
runtime-env agents, workers) and stops it at exit; a SIGKILLed driver (the OOM killer, `kill -9`, a
scheduler's hard stop) has no exit, and the instance stayed, holding memory and ports, until someone ran
`ray stop` (which stops every instance on the machine, other users' too). Ray has no option to tie its
head to the driver's life, so a small process of its own watches the driver and kills what the driver
started: the recorded processes and everything they spawned, nothing else (each named by pid *and*
start time, so a reused pid is never touched). Linux only (it reads /proc); elsewhere nothing is done.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _start_time(pid: int) -> str | None:
    try:  # field 22 of /proc/PID/stat, after the command name in parentheses (which may hold spaces)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int(p.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(p.name))
    return out


def _tree(roots: list[int]) -> list[int]:
    kids, seen, todo = _children(), [], list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo += kids.get(pid, [])
    return seen


def watch(driver: str, processes: list[str], poll: float = 1.0) -> None:
    """`driver` and `processes` as PID:START; returns once the driver is gone and its Ray with it."""
    pid, start = driver.split(":")
    known = {int(p): s for p, s in (x.split(":") for x in processes)}
    while _start_time(int(pid)) == start:
        if not any(s is not None and _start_time(p) == s for p, s in known.items()):
            return  # Ray was shut down (ray.shutdown, the driver's normal exit): nothing left to watch
        # what they spawned (agents, workers), recorded while it lives: once the raylet dies with the
        # driver its agents belong to init, no longer found under it
        for p in _tree([p for p, s in known.items() if s is not None and _start_time(p) == s]):
            if p not in known and (s := _start_time(p)) is not None:  # gone since the scan: nothing to kill
                known[p] = s
        time.sleep(poll)
    for victim, s in known.items():
        if s is not None and _start_time(victim) == s:
            try:
                os.kill(victim, signal.SIGKILL)
            except OSError:
                pass


def reap_with_driver(pids: list[int]) -> None:
    """Starts the watcher of this process for the Ray processes `pids` (those ray.init started)."""
    if not Path("/proc/self/stat").is_file():
        return
    me = f"{os.getpid()}:{_start_time(os.getpid())}"
    procs = [f"{p}:{s}" for p in pids if (s := _start_time(p)) is not None]
    subprocess.Popen(
        [sys.executable, "-m", "elmforest.launch.ray_reaper", me, *procs],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not in the driver's process group: a Ctrl-C or group kill spares it
        close_fds=True,
    )


def ray_process_ids() -> list[int]:
    """The processes of the Ray instance this driver started (ray.init without an address)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # no public handle on them
    procs = getattr(node, "all_processes", None) or {}
    return [p.process.pid for ps in procs.values() for p in ps if getattr(p, "process", None)]


if __name__ == "__main__":
    watch(sys.argv[1], sys.argv[2:])
