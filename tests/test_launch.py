"""Executors: local and Ray (a local cluster on 127.0.0.1 started by the test), kill-and-retry.

The local executor's tests run without Ray installed; only those that take the `ray_cluster` fixture
skip when it is missing."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from elmforest.data.shards import Shards
from elmforest.forest import btm
from elmforest.forest.manifest import Forest
from elmforest.launch.executor import JobsFailed, LocalExecutor, RayExecutor
from elmforest.launch.forest import train_forest
from elmforest.launch.jobs import ExpertJob, as_dict, run_job
from elmforest.train.checkpoint import list_checkpoints
from elmforest.utils.errors import UserError

STEPS = 300


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # ray.init installs its own SIGTERM handler and sets environment variables, and shutdown leaves both:
    # put back for the tests this worker process runs next (pytest-xdist: any test may follow)
    handler, env = signal.getsignal(signal.SIGTERM), dict(os.environ)
    # a fresh instance of its own, also where a cluster already runs on this machine (`ray start --head`)
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    yield
    ray.shutdown()
    signal.signal(signal.SIGTERM, handler)
    os.environ.clear()
    os.environ.update(env)


def _plan(shards_dir):
    shards = Shards(shards_dir)
    base = tiny_config(shards_dir, steps=STEPS, batch_size=6, ckpt_every=10, log_every=10)
    plan, base = btm.plan_for(base, shards.domains)
    return shards, base, plan


def _train(root, shards_dir, executor, **kw):
    shards, base, plan = _plan(shards_dir)
    forest = Forest.init(root, exist_ok=True)
    return train_forest(
        forest, shards, base, plan, executor=executor, threads=1, progress=False, monitor_every=0.5, **kw
    )


@pytest.fixture(scope="module")
def local_forest(shards_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("local") / "f"
    _train(root, shards_dir, LocalExecutor())
    return root


def _weights(forest_root, name):
    return load_file(str(Forest.load(forest_root).expert_dir(name) / "model.safetensors"))


def test_ray_trains_experts_concurrently_with_the_same_weights_as_local(
    ray_cluster, local_forest, shards_dir, tmp_path
):
    root = tmp_path / "f"
    results = _train(root, shards_dir, RayExecutor(cpus_per_job=1, max_retries=1))
    names = sorted(Forest.load(local_forest).names)
    assert sorted(r["name"] for r in results) == sorted([*names, "dense"])
    assert sorted(Forest.load(root).names) == names
    for n in names:
        a, b = _weights(local_forest, n), _weights(root, n)
        assert all(torch.equal(a[k], b[k]) for k in a), n
    # each expert ran in a Ray worker, not in this process; whether two ran at once is timing (a worker
    # that finishes before the next starts is reused: a loaded host failed `2 pids` once), so not asserted
    pids = {(root / "runs" / n / "worker.pid").read_text().strip() for n in names}
    assert pids and str(os.getpid()) not in pids
    assert "step" in (root / "progress.log").read_text()
    # re-running the same command trains nothing
    stamp = {n: (root / "experts" / n / "model.safetensors").stat().st_mtime_ns for n in names}
    t = time.time()
    _train(root, shards_dir, RayExecutor(cpus_per_job=1, max_retries=1))
    assert {n: (root / "experts" / n / "model.safetensors").stat().st_mtime_ns for n in names} == stamp
    assert time.time() - t < 60


def test_a_rerun_of_a_finished_forest_starts_no_executor(local_forest, shards_dir, capsys):
    """A rerun started Ray (or a worker per job) only for each job to say its expert is kept, and
    said `training 3 job(s)` when there was nothing to train."""

    class Refuses:
        def prepare(self):
            raise AssertionError("a cluster was started")

        def map(self, *args):
            raise AssertionError("workers were started")

    results = _train(local_forest, shards_dir, Refuses())
    assert sorted(r["name"] for r in results) == sorted([*Forest.load(local_forest).names, "dense"])
    out = capsys.readouterr().out
    assert "finished before" in out and "training" not in out


def test_killed_worker_resumes_from_its_checkpoint(ray_cluster, local_forest, shards_dir, tmp_path):
    root = tmp_path / "f"
    victim = sorted(Shards(shards_dir).domains)[0]
    run = root / "runs" / victim
    killed = {}

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline:
            if list_checkpoints(run / "checkpoints") and (run / "worker.pid").exists():
                pid = int((run / "worker.pid").read_text())
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                return
            time.sleep(0.005)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    _train(root, shards_dir, RayExecutor(cpus_per_job=1, max_retries=3), dense=False)
    th.join()
    assert killed, "the expert finished before it could be killed"
    summary = btm.read_summary(Forest.load(root), victim)
    assert summary["resumed_from"] and summary["resumed_from"] > 0  # resumed, not restarted
    assert int((run / "worker.pid").read_text()) != killed["pid"]  # a new worker took over
    a, b = _weights(local_forest, victim), _weights(root, victim)
    assert all(torch.equal(a[k], b[k]) for k in a)
    f = Forest.load(root)
    assert sorted(f.names) == sorted(Shards(shards_dir).domains)  # every expert merged, each once
    assert len(f.names) == len(set(f.names))


def _failing_and_finished_jobs(root, shards_dir):
    bad = ExpertJob(str(root), str(shards_dir), "no_such_domain")
    good = ExpertJob(str(root), str(shards_dir), sorted(Shards(shards_dir).domains)[0])  # finished: a no-op
    return (
        [as_dict(bad), as_dict(good)],
        ["no_such_domain", "good"],
        [j.run_dir() / "job.log" for j in (bad, good)],
    )


def test_local_executor_names_a_failing_expert_with_its_log_and_the_forest_stays_valid(
    forest_dir, shards_dir, tmp_path
):
    import shutil

    root = tmp_path / "f"
    shutil.copytree(forest_dir, root)
    before = {n: Forest.load(root).expert(n)["files"] for n in Forest.load(root).names}
    jobs, labels, logs = _failing_and_finished_jobs(root, shards_dir)
    with pytest.raises(JobsFailed, match="no_such_domain") as err:
        LocalExecutor().map(run_job, jobs, labels, logs)
    assert list(err.value.failures) == ["no_such_domain"]  # the finished expert's job succeeded
    assert "job.log" in str(err.value)
    assert "no training data" in (root / "runs" / "no_such_domain" / "job.log").read_text()
    after = Forest.load(root)
    assert {n: after.expert(n)["files"] for n in after.names} == before  # nothing retrained or dropped


def test_a_failing_expert_is_named_with_its_log_and_the_forest_stays_valid(
    ray_cluster, local_forest, shards_dir, tmp_path
):
    import shutil

    shutil.copytree(local_forest, tmp_path / "f")
    root = tmp_path / "f"
    jobs, labels, logs = _failing_and_finished_jobs(root, shards_dir)
    with pytest.raises(JobsFailed, match="no_such_domain") as err:
        RayExecutor(cpus_per_job=1, max_retries=1).map(run_job, jobs, labels, logs)
    assert "job.log" in str(err.value)
    assert sorted(Forest.load(root).names) == sorted(Forest.load(local_forest).names)
    assert "no training data" in (root / "runs" / "no_such_domain" / "job.log").read_text()
    # the job's own reason, as locally (Ray's wrapper named only RayTaskError and coloured the text, and
    # a sweep took its diverged points for failures)
    why = err.value.failures["no_such_domain"]
    assert not why.startswith("RayTaskError") and "\x1b[" not in why and "no_such_domain" in why
    with pytest.raises(UserError, match=r"asks Ray for 64 CPU\(s\), but the cluster has 2 in all"):
        RayExecutor(cpus_per_job=64).map(run_job, jobs, labels, logs)


def _visible_gpus(job: dict) -> dict:
    import os

    return {"cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}


def test_a_ray_job_that_asks_for_no_gpu_sees_none(ray_cluster, tmp_path):
    """Ray no longer hides the GPUs from a task that asked for none: on a GPU node every expert trained
    on cuda:0, unreserved, as many at a time as the CPUs allowed."""
    import sys

    from ray import cloudpickle

    logs = [tmp_path / "a.log"]
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    try:
        assert RayExecutor(cpus_per_job=1).map(_visible_gpus, [{}], ["a"], logs) == [{"cuda": ""}]
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_lr_sweep_on_ray_matches_the_local_sweep(ray_cluster, shards_dir, tmp_path):
    """Every sweep point is an independent job: on Ray they run in parallel and choose the same LRs."""
    from elmforest.launch.sweep import sweep

    base = tiny_config(shards_dir, steps=6, batch_size=6)
    grid = {"lrs": [1e-3, 3e-3, 1e-2, 3e-2], "expert_lrs": [1e-3, 3e-3, 1e-2, 3e-2]}
    local = sweep(shards_dir, tmp_path / "local", base, log=None, **grid)
    remote = sweep(
        shards_dir, tmp_path / "ray", base, log=None, executor=RayExecutor(cpus_per_job=1), threads=1, **grid
    )
    for arm in ("dense", "experts"):
        assert remote[arm]["best_lr"] == local[arm]["best_lr"]
        for a, b in zip(local[arm]["points"], remote[arm]["points"], strict=True):
            assert a["valid_mean_bpb"] == pytest.approx(b["valid_mean_bpb"], abs=1e-6)
    pids = {(p / "runs" / "dense" / "worker.pid").read_text() for p in (tmp_path / "ray" / "dense").iterdir()}
    assert (
        pids and str(os.getpid()) not in pids
    )  # in Ray workers (how many: timing, a loaded host reuses one)


def test_local_workers_keep_job_order_and_name_a_failed_job(tmp_path):
    import operator

    jobs = [{"x": 1}, {"x": 2}, {"y": 3}, {"x": 4}]
    labels = ["a", "b", "c", "d"]
    logs = [tmp_path / f"{n}.log" for n in labels]
    ok = LocalExecutor(workers=2).map(
        operator.itemgetter("x"), jobs[:2] + jobs[3:], ["a", "b", "d"], logs[:3]
    )
    assert ok == [1, 2, 4]
    with pytest.raises(JobsFailed) as e:
        LocalExecutor(workers=2).map(operator.itemgetter("x"), jobs, labels, logs)
    assert list(e.value.failures) == ["c"] and "c.log" in e.value.failures["c"]


_STOP_SCRIPT = """
import os, signal, sys, threading, time
from pathlib import Path
from elmforest.launch.executor import LocalExecutor

def job(d):
    time.sleep(d["s"])
    Path(d["done"]).write_text("finished")
    return d

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(143))  # as the CLI's handler does
    threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    out = Path(sys.argv[1])
    LocalExecutor(2).map(job, [{"s": 5, "done": str(out / f"{i}")} for i in range(4)], list("abcd"), [None] * 4)
"""


def test_sigterm_stops_the_worker_jobs_at_once(tmp_path):
    """The CLI unwinds on SIGTERM; leaving the worker pool then waited for the running jobs and ran
    every queued one (the whole forest's training) before the process ended."""
    import subprocess
    import sys

    script = tmp_path / "stop.py"
    script.write_text(_STOP_SCRIPT)
    (tmp_path / "done").mkdir()
    p = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "done")], capture_output=True, timeout=120
    )
    assert p.returncode == 143, p.stderr.decode()[-2000:]
    assert list((tmp_path / "done").iterdir()) == []  # no job ran to its end


def test_progress_says_waiting_until_a_job_writes_past_where_it_was(tmp_path):
    """The dense run's metrics are the seed's until it continues: the driver printed them as its
    progress (`dense step 200/400 ... ETA 3s`) while the job had not started."""
    import json

    from elmforest.launch.progress import ProgressMonitor

    run = tmp_path / "dense"
    run.mkdir()
    line = {"step": 200, "loss": 2.0, "tokens_per_s": 1000.0, "elapsed_s": 10.0}
    (run / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    mon = ProgressMonitor({"dense": run}, 400, tmp_path / "progress.log", echo=False)
    assert mon.report() == [f"{'dense':24s} waiting (logged up to step 200)"]
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**line, "step": 210, "start_step": 200, "elapsed_s": 1.0}) + "\n")
    (now,) = mon.report()
    assert now.startswith(f"{'dense':24s} step 210/400 loss 2.000") and "ETA" in now and "again" not in now
    # a run cut at step 210 resumes from its checkpoint at 205: its steps after 205 are not a regression
    mon = ProgressMonitor({"dense": run}, 400, tmp_path / "progress.log", echo=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**line, "step": 206, "start_step": 200, "elapsed_s": 11.0}) + "\n")
    (now,) = mon.report()
    assert now.startswith(f"{'dense':24s} step 206/400") and now.endswith(
        "(again: resumed from a checkpoint before step 210)"
    )


def test_progress_prints_a_line_once_on_the_terminal_and_every_time_in_its_log(tmp_path, capfd):
    """Every report printed every job's line: a finished job's `done` came back every 10 s."""
    import json

    from elmforest.launch.progress import ProgressMonitor

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
    (a / "summary.json").write_text("{}")
    mon = ProgressMonitor({"a": a, "b": b}, 400, tmp_path / "progress.log")
    mon.report()
    (b / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 2.0, "tokens_per_s": 10.0}) + "\n")
    mon.report()
    mon.report()
    (b / "metrics.jsonl").unlink()  # started over (a retried job): its waiting line is news again
    mon.report()
    mon._out.flush()
    out = capfd.readouterr().out
    assert out.count(" done") == 1 and out.count(" waiting") == 2 and out.count("step 5/400") == 1
    log = (tmp_path / "progress.log").read_text()
    assert log.count(" done") == 4 and log.count("step 5/400") == 2


def test_jobs_name_absolute_paths_for_workers_that_run_elsewhere(shards_dir, tmp_path, monkeypatch):
    """On a Ray cluster (--address) a job runs in the worker's directory: a relative --forest sent
    every job to look (and write) there."""

    class Captures:
        def map(self, fn, jobs, labels, logs):
            self.jobs = jobs
            raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    ex = Captures()
    with pytest.raises(KeyboardInterrupt):
        _train(Path("f"), os.path.relpath(shards_dir, tmp_path), ex)
    assert ex.jobs and all(
        Path(j["forest"]).is_absolute() and Path(j["shards"]).is_absolute() for j in ex.jobs
    )
    assert Path(ex.jobs[0]["forest"]) == tmp_path / "f"


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="the reaper reads /proc (Linux)")
def test_a_sigkilled_driver_leaves_no_ray_instance_behind(tmp_path):
    """ray.init's own instance (GCS, raylet, agents, workers) outlived a SIGKILLed driver until `ray stop`."""
    pytest.importorskip("ray")
    from elmforest.launch.ray_reaper import _start_time, _tree

    script = tmp_path / "driver.py"
    script.write_text(
        "import time\n"
        "from elmforest.launch.executor import RayExecutor\n"
        "from elmforest.launch.ray_reaper import ray_process_ids\n"
        "RayExecutor(num_cpus=1)._init()\n"
        "print(' '.join(map(str, ray_process_ids())), flush=True)\n"
        "time.sleep(300)\n"
    )
    p = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        roots = [int(x) for x in p.stdout.readline().split()]
        assert roots, "the driver started no Ray processes"
        deadline = time.time() + 30
        while len(_tree(roots)) <= len(roots) and time.time() < deadline:
            time.sleep(0.2)  # the raylet's agents and workers
        time.sleep(1.5)  # the reaper's first look at them
        ray = {q: _start_time(q) for q in _tree(roots)}
        assert len(ray) > len(roots)
    finally:
        p.kill()
        p.wait()

    def running(q):
        try:
            stat = Path(f"/proc/{q}/stat").read_text()
        except OSError:
            return False
        return _start_time(q) == ray[q] and stat.rsplit(")", 1)[1].split()[0] != "Z"  # zombies are dead

    deadline = time.time() + 20
    while any(running(q) for q in ray) and time.time() < deadline:
        time.sleep(0.2)
    assert not [q for q in ray if running(q)]


_KILL_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
from elmforest.launch.executor import JobsFailed, LocalExecutor

def job(d):
    Path(d["dir"]).mkdir(parents=True, exist_ok=True)
    (Path(d["dir"]) / "worker.pid").write_text(str(os.getpid()))  # as launch/jobs.py's `logged`
    time.sleep(0.5)
    if d["die"]:
        os.kill(os.getpid(), signal.SIGKILL)  # killed, or out of memory
    time.sleep(5)
    return d

if __name__ == "__main__":
    out = Path(sys.argv[1])
    names = list("abcd")
    jobs = [{"dir": str(out / n), "die": n == "a"} for n in names]
    try:
        LocalExecutor(2).map(job, jobs, names, [out / n / "job.log" for n in names])
    except JobsFailed as e:
        print(e)
"""


def test_a_killed_worker_says_which_jobs_were_running_and_which_had_not_started(tmp_path):
    """Every job got the same line when a worker died, the ones never started too, under 'N job(s)
    failed' though none had failed on its own."""
    import subprocess
    import sys

    script = tmp_path / "kill.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    said = out.stdout
    assert "4 job(s) did not finish" in said, out.stderr
    lines = {x.split(":")[0].strip(): x for x in said.splitlines() if x.startswith("  ")}
    assert "(was running)" in lines["a"] and "(was running)" in lines["b"]
    assert "(had not started)" in lines["c"] and "(had not started)" in lines["d"]


def test_a_domain_that_cannot_name_an_expert_is_refused_before_the_shards_and_its_rename_is_taken(tmp_path):
    """A non-ASCII folder name was refused after the tokenizer and shards were built, by a rule saying
    "letters"; renamed, the corpus was then refused as changed since it was tokenized (it never was)."""
    from elmforest.launch.prepare import prepare_data
    from elmforest.utils.errors import UserError

    corpus = tmp_path / "c"
    for d in ("café latte", "plain"):
        (corpus / d).mkdir(parents=True)
        for i in range(40):
            (corpus / d / f"{i}.txt").write_text(f"{d} document {i} " * 20)
    quiet = {"progress": False, "log": lambda *a: None}
    with pytest.raises(UserError, match=r"domain 'café latte' cannot name an expert.*ASCII letters.*folder"):
        prepare_data(tmp_path / "o", 300, corpus=corpus, **quiet)
    assert not (tmp_path / "o" / "shards").exists() and not (tmp_path / "o" / "tokenizer").exists()
    (corpus / "café latte").rename(corpus / "cafe_latte")
    data = prepare_data(tmp_path / "o", 300, corpus=corpus, **quiet)
    assert data.names == ["cafe_latte", "plain"]


def test_an_ood_set_copied_from_a_domain_left_out_is_out_of_domain(tmp_path):
    """`--domains drama,legal --ood scripture.jsonl` (scripture's own text) was refused as "documents of
    the training corpus": no model trained on them."""
    from elmforest.launch.ood_sets import scan_ood_sources

    rows = [
        {"id": f"{d}{i}", "domain": d, "text": f"{d} text number {i}"} for d in ("a", "b") for i in range(10)
    ]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ood = tmp_path / "ood.jsonl"
    ood.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows if r["domain"] == "b"))
    assert scan_ood_sources(tmp_path / "c.jsonl", [ood], ["a"]) == (["ood"], {})
    assert scan_ood_sources(tmp_path / "c.jsonl", [ood], ["a", "b"]) == (["ood"], {"ood": [10, 10]})


def test_the_quickstarts_dense_tuned_row_is_not_deleted_under_a_trainer(forest_dir, tmp_path):
    """An out-of-date dense_tuned run is deleted and trained again, but only under its trainer lock: a
    second quickstart into the same --out deleted it while the first was training it."""
    import fcntl
    import shutil

    from elmforest.compare import DENSE_TUNED_RUN
    from elmforest.quickstart_arms import dense_tuned
    from elmforest.train.runlock import LOCK

    root = tmp_path / "forest"
    shutil.copytree(forest_dir, root)
    run = root / "runs" / DENSE_TUNED_RUN
    run.mkdir(parents=True)
    cfg = json.loads((root / "runs" / "dense" / "run_config.json").read_text())
    cfg["optim"]["lr"] = 0.5  # trained at another LR: out of date
    (run / "run_config.json").write_text(json.dumps(cfg))
    with open(run / LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="training in another process"):
            dense_tuned(Forest.load(root), 0.01, False, lambda s: None)
        assert (run / "run_config.json").is_file()


@pytest.mark.parametrize("shared, refused", [(5, False), (6, True)])
def test_an_ood_set_mostly_of_training_text_is_refused_and_half_of_it_said(
    tmp_path, tokenizer_dir, shared, refused, capsys
):
    """The line is more than half: 6 of 10 documents of the training corpus is not out of domain; 5 of
    10 is scored, with a note (only 0 and 10 of 10 were tested)."""
    from elmforest.launch.ood_sets import build_ood_shards

    rows = [{"id": f"a{i}", "domain": "a", "text": f"a text number {i}"} for i in range(10)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ood = tmp_path / "ood"
    ood.mkdir()
    texts = [r["text"] for r in rows[:shared]] + [f"other words {i}" for i in range(10 - shared)]
    for j in range(2):  # two files: one valid, one test
        (ood / f"p{j}.jsonl").write_text(
            "".join(json.dumps({"text": t, "domain": "o"}) + "\n" for t in texts[j::2])
        )
    args = (tmp_path / "shards-ood", [ood], tokenizer_dir, ["a"], False, tmp_path / "c.jsonl")
    if refused:
        with pytest.raises(UserError, match=f"{shared} of its 10 documents are documents of the training"):
            build_ood_shards(*args)
    else:
        build_ood_shards(*args)
        assert f"{shared} of its 10 documents are also in the training corpus" in capsys.readouterr().err
