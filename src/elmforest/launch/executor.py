"""Executors: where independent jobs run. `local` (default) runs them one after another in this
process; `ray` runs each as a Ray task with declared resources on an existing cluster (`address`) or
a local Ray instance, concurrently where resources allow, retrying a job whose worker died.

A job that keeps failing is reported by name with its log file once every other job has finished;
nothing it did leaves the forest invalid (manifest writes are atomic and locked).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from elmforest.utils.errors import Failed, UserError
from elmforest.utils.proc import stopped_with  # noqa: F401 - re-exported (tests, older imports)
from elmforest.utils.threads import cpu_cores  # noqa: F401 - re-exported: callers import it from here


class JobsFailed(Failed):
    def __init__(self, failures: dict[str, str]):
        self.failures = failures
        lines = "\n".join(f"  {name}: {why}" for name, why in failures.items())
        super().__init__(f"{len(failures)} job(s) did not finish:\n{lines}")


def _why(e: BaseException) -> str:
    """A failed job's reason: Ray wraps it (RayTaskError(Diverged): ray::run_job() (pid=...), with terminal
    colours and a traceback); the job's own exception names what went wrong, as with the local executor."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def job_threads(kind: str, cpus_per_job: float | None, workers: int) -> int | None:
    """Threads for each job: Ray's declared CPUs (1 when not given), the cores shared among local
    workers, or None (PyTorch's default) for one local job at a time."""
    if kind == "ray":  # at least one: a fractional CPU (0.5) gave 0, and the threads were never set
        return max(1, int(cpus_per_job or 1))
    return max(1, cpu_cores() // workers) if workers > 1 else None


def local_workers(device: str, workers: int | None) -> tuple[int, int]:
    """(jobs at a time, threads per job) of a quickstart: on a CPU, two single-threaded small-batch jobs
    beat one job on two threads; on a GPU one at a time."""
    from elmforest.utils.device import resolve_device

    cores = cpu_cores()
    if workers is None:
        workers = 2 if resolve_device(device).type == "cpu" and cores >= 2 else 1
    workers = max(1, workers)
    return workers, max(1, cores // workers) if workers > 1 else 0


@dataclass
class LocalExecutor:
    """Jobs on this machine: one after another in this process, or `workers` at a time in worker
    processes (spawned, so no thread or OpenMP state is inherited). Small models train faster as two
    single-threaded jobs than as one job on two threads (cpu-small in fp32 on 2 cores: 1.17x the
    tokens/s; the small matmuls do not keep two threads busy), which is what the CPU quickstart
    does with its experts and dense run. Worker processes die with this one (utils/proc.py): a
    killed run leaves none training on."""

    workers: int = 1

    def map(
        self, fn: Callable[[dict], dict], jobs: list[dict], labels: list[str], logs: list[Path]
    ) -> list[dict]:
        if self.workers > 1 and len(jobs) > 1:
            return self._map_processes(fn, jobs, labels, logs)
        results, failures = [], {}
        for job, label, log in zip(jobs, labels, logs, strict=True):
            try:
                results.append(fn(job))
            except Exception as e:  # keep going: other experts do not depend on this one
                failures[label] = _with_log(f"{type(e).__name__}: {e}", log)
        if failures:
            raise JobsFailed(failures)
        return results

    def _map_processes(self, fn, jobs, labels, logs) -> list[dict]:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from elmforest.utils.proc import die_with_parent

        ctx = multiprocessing.get_context("spawn")
        started = time.time()
        results: list[dict | None] = [None] * len(jobs)
        failures = {}
        with (
            ProcessPoolExecutor(
                max_workers=min(self.workers, len(jobs)),
                mp_context=ctx,
                initializer=die_with_parent,  # a killed run leaves no worker training on
                initargs=(os.getpid(),),
            ) as pool,
            stopped_with(pool),
        ):
            futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
            for fut, i in futures.items():
                try:
                    results[i] = fut.result()
                except Exception as e:  # a failed job (or a dead worker) is reported with its log
                    if type(e).__name__ == "BrokenProcessPool":  # one worker died (killed?): all stop
                        was = "was running" if _began(logs[i], started) else "had not started"
                        failures[labels[i]] = (
                            f"stopped ({was}): a worker process died (killed, or out of memory), which stops "
                            f"every job of the pool; rerun to resume them (log: {logs[i]})"
                        )
                        continue
                    failures[labels[i]] = _with_log(f"{type(e).__name__}: {e}", logs[i])
        if failures:
            raise JobsFailed(failures)
        return results


def _began(log: Path, since: float) -> bool:
    """Whether a job started in this pool: its worker writes worker.pid beside its log as it begins
    (launch/jobs.py `logged`). The worker that died is among the jobs that had."""
    try:
        return (Path(log).parent / "worker.pid").stat().st_mtime >= since - 1
    except OSError:
        return False


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A `host:port` where nothing listens is said in seconds: ray.init retries it for minutes,
    printing only its own timeouts. `auto`, `ray://` (Ray Client) and other forms are left to Ray."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not host or "/" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise UserError(
            f"Ray at --address {address}: nothing answers there ({e.strerror or e}); start the cluster "
            "(`ray start --head`) or give its GCS address"
        ) from None


@dataclass
class RayExecutor:
    address: str | None = None
    cpus_per_job: float = 1.0
    gpus_per_job: float = 0.0
    max_retries: int = 3
    num_cpus: int | None = None  # for a local instance; None = all cores

    def _init(self) -> None:
        import signal
        import threading

        import ray

        if ray.is_initialized():
            return
        ours = signal.getsignal(signal.SIGTERM)  # the CLI's: SIGTERM unwinds like Ctrl-C (exit 143)
        if self.address:
            _check_reachable(self.address)
        try:
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:  # an instance of our own, also where a cluster already runs (`ray start`): --address joins one
                ray.init(
                    address="local",
                    num_cpus=self.num_cpus,
                    include_dashboard=False,
                    log_to_driver=False,
                    _node_ip_address="127.0.0.1",
                )
                from elmforest.launch.ray_reaper import ray_process_ids, reap_with_driver

                reap_with_driver(ray_process_ids())  # a SIGKILLed driver leaves no Ray behind
        except (ValueError, ConnectionError) as e:
            raise UserError(f"Ray{f' at --address {self.address}' if self.address else ''}: {e}") from None
        if callable(ours) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, ours)  # Ray's native handler aborts the driver with a core dump

    def _check_resources(self) -> None:
        import ray

        have = ray.cluster_resources()  # the nodes up now: an autoscaling cluster may add more
        for key, want in (("CPU", self.cpus_per_job), ("GPU", self.gpus_per_job)):
            if want > have.get(key, 0):
                said = f"each job asks Ray for {want:g} {key}(s), but the cluster has {have.get(key, 0):g} in all"
                if not self.address:  # our own instance: it never grows
                    raise UserError(f"{said}: no job could ever start; ask for less per job")
                print(
                    f"warning: {said} now: the jobs wait until nodes with more join (an autoscaler)",
                    file=sys.stderr,
                )

    def prepare(self) -> None:
        """Start (or reach) Ray and check the resources asked for, before any local work (a seed) runs."""
        self._init()
        self._check_resources()

    def map(
        self, fn: Callable[[dict], dict], jobs: list[dict], labels: list[str], logs: list[Path]
    ) -> list[dict]:
        import ray

        self.prepare()
        task = ray.remote(
            num_cpus=self.cpus_per_job,
            num_gpus=self.gpus_per_job,
            max_retries=self.max_retries,
            retry_exceptions=False,  # retries are for lost workers and nodes
            # a job that asked for no GPU gets none: Ray no longer hides them (ray-project/ray#54868), and
            # every job on a GPU node trained on cuda:0 unreserved, as many at a time as the CPUs allowed
            **({"runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}} if not self.gpus_per_job else {}),
        )(fn)
        refs = {task.remote(job): i for i, job in enumerate(jobs)}
        results: list[dict | None] = [None] * len(jobs)
        failures = {}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = refs[done[0]]
            try:
                results[i] = ray.get(done[0])
            except Exception as e:  # retries are exhausted: report, keep the others running
                failures[labels[i]] = _with_log(_why(e), logs[i])
        if failures:
            raise JobsFailed(failures)
        return results


def _with_log(why: str, log) -> str:
    """A failure with where its job's output is, once (a job's own error may already name it)."""
    return why if str(log) in why else f"{why} (log: {log})"


def make_executor(
    kind: str = "local",
    address: str | None = None,
    cpus: float | None = None,  # None: not given (Ray: 1 per job); the local executor refuses any given
    gpus: float = 0.0,
    max_retries: int = 3,
    workers: int = 1,
):
    if kind == "local":
        given = {
            "--address": address,
            "--max-retries": max_retries != 3,
            "--cpus-per-expert (--cpus-per-job)": cpus is not None,  # 1 given was taken, then ignored
            "--gpus-per-expert (--gpus-per-job)": gpus != 0.0,  # the local jobs use train.device
        }
        ray_only = [o for o, g in given.items() if g]
        if ray_only:
            raise UserError(
                f"{', '.join(ray_only)}: Ray's (--executor ray); the local executor runs --workers jobs at a "
                "time, each on the cores divided among them (and on train.device)"
            )
        return LocalExecutor(workers)
    if workers != 1:
        raise UserError(
            f"--workers {workers} is the local executor's: Ray runs as many jobs at a time as the CPUs (and "
            "GPUs) asked per job allow"
        )
    if kind == "ray":
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise UserError(
                "--executor ray needs Ray: pip install 'elmforest[ray]' (or pip install ray)"
            ) from e
        return RayExecutor(address, 1.0 if cpus is None else cpus, gpus, max_retries)
    raise UserError(f"unknown executor {kind!r}; expected local or ray")
