"""One progress line per job (step, loss, tokens/s, ETA), read from each run's metrics.jsonl.

Runs in a thread of the driver, so it works the same whether jobs run here or on Ray workers on
other machines (with shared storage); lines go to the terminal and to a log file.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path


def last_metrics(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 4096))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def progress_line(name: str, run_dir: Path, total_steps: int | None, before: dict | None = None) -> str:
    """`before`: the run's last metrics when the jobs were started; while it is still the last, the job
    has not begun (the dense run's lines are the seed's until it continues)."""
    if (run_dir / "summary.json").is_file():
        return f"{name:24s} done"
    m = last_metrics(run_dir / "metrics.jsonl")
    if not m:
        return f"{name:24s} waiting"
    if m == before:
        return f"{name:24s} waiting (logged up to step {m.get('step')})"
    eta = ""
    if total_steps and m.get("tokens_per_s") and m.get("elapsed_s"):
        rate = (m["step"] - m.get("start_step", 0)) / max(m["elapsed_s"], 1e-9)  # experts start at the seed
        eta = f" ETA {max(0.0, (total_steps - m['step']) / max(rate, 1e-9)):6.0f}s"
    total = f"/{total_steps}" if total_steps else ""
    again = ""  # a cut run resumes from its last checkpoint, before the last step it logged
    if before and isinstance(before.get("step"), int) and m["step"] <= before["step"]:
        again = f" (again: resumed from a checkpoint before step {before['step']})"
    line = f"{name:24s} step {m['step']}{total} loss {m['loss']:.3f} {m['tokens_per_s']:8,.0f} tok/s{eta}"
    return line + again


class ProgressMonitor:
    def __init__(
        self,
        runs: dict[str, Path],
        total_steps: int | None,
        log_file: Path,
        every: float = 10.0,
        echo: bool = True,
    ):
        self.runs, self.total, self.log_file, self.every, self.echo = runs, total_steps, log_file, every, echo
        self.every = max(0.2, every)
        # the terminal as it is now: jobs in this process may point fds 1 and 2 at their logs
        self._out = os.fdopen(os.dup(1), "w", buffering=1) if echo else None
        self._before = {n: last_metrics(d / "metrics.jsonl") for n, d in runs.items()}
        self._shown: dict[str, str] = {}  # each job's (or the count's) line last put on the terminal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def report(self) -> list[str]:
        keyed = {n: progress_line(n, d, self.total, self._before[n]) for n, d in self.runs.items()}
        if len(keyed) > 12:  # many jobs (a sweep): the running ones, and a count of the others
            done = sum(ln.endswith(" done") for ln in keyed.values())
            waiting = sum(" waiting" in ln for ln in keyed.values())
            keyed = {n: ln for n, ln in keyed.items() if not (ln.endswith(" done") or " waiting" in ln)}
            keyed[""] = f"{len(self.runs)} jobs: {done} done, {len(keyed)} running, {waiting} waiting"
        lines = list(keyed.values())
        stamp = time.strftime("%H:%M:%S")
        with open(self.log_file, "a") as f:
            for line in lines:
                f.write(f"{stamp} {line}\n")
        if self._out is not None:  # the terminal: a job's line when it changed, not its `done` every 10 s
            new = [ln for n, ln in keyed.items() if self._shown.get(n) != ln]
            self._shown.update(keyed)
            self._out.write("".join(f"{stamp} {line}\n" for line in new))
        return lines

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.report()

    def __enter__(self):
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        try:
            self.report()
        except OSError:
            pass  # a last progress line must never hide the jobs' own outcome
        if self._out is not None:
            self._out.close()
