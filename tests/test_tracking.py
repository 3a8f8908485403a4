"""Experiment tracking: TensorBoard event files, W&B's offline history and MLflow's file store hold
exactly what metrics.jsonl / valid.jsonl hold, across a crash and a resume; a failing tracker never
stops training, and a chosen one that is not installed stops the run before its first step."""

import json
import os
import re
import shutil
import struct
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from elmforest.train.callbacks import Callback
from elmforest.train.checkpoint import list_checkpoints
from elmforest.train.trainer import train
from elmforest.utils.errors import UserError

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _scalars(run):
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def _jsonl(path, key):
    return [(m["step"], m[key]) for m in map(json.loads, path.read_text().splitlines())]


def _mlflow_series(run, key):
    """(step, value) of a metric of the run's one MLflow run in its own store, in step order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    (mrun,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return sorted((m.step, m.value) for m in client.get_metric_history(mrun.info.run_id, key))


def _same_series(got, want) -> bool:
    """(step, value) pairs: the same steps, values equal to float32 precision (pytest.approx takes no pairs)."""
    got, want = list(got), list(want)
    return [s for s, _ in got] == [s for s, _ in want] and [v for _, v in got] == pytest.approx(
        [v for _, v in want], rel=1e-6
    )


def test_tensorboard_events_equal_the_jsonl_logs_across_a_crash_and_resume(shards_dir, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(shards_dir, steps=8, log_every=2, ckpt_every=4)
    cfg.train.stop_at = 6
    train(cfg, run, progress=False)
    # a crash between step 4's checkpoint and step 6's: its events and metrics past step 4 are orphans
    newest = list_checkpoints(run / "checkpoints")[-1]
    assert newest.name.endswith("6")
    shutil.rmtree(newest)
    cfg.train.stop_at = None
    train(cfg, run, progress=False)

    scalars, acc = _scalars(run)
    loss = _jsonl(run / "metrics.jsonl", "loss")
    assert [s for s, _ in loss] == [2, 4, 6, 8]
    got = scalars["train/loss"]
    assert [s for s, _ in got] == [2, 4, 6, 8]  # step 6 once: the crashed session's value purged
    assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(got, loss, strict=True))
    lr = _jsonl(run / "metrics.jsonl", "lr")
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([v for _, v in lr], rel=1e-6)
    valid = _jsonl(run / "valid.jsonl", "valid_loss")
    assert [s for s, _ in scalars["valid/loss"]] == [s for s, _ in valid] == [4, 8]
    assert [v for _, v in scalars["valid/loss"]] == pytest.approx([v for _, v in valid], rel=1e-6)
    assert "config/text_summary" in acc.Tags()["tensors"]  # the run's config
    assert len(acc.Tensors("config/text_summary")) == 1


def test_a_restart_before_any_checkpoint_a_branch_and_a_failed_run(shards_dir, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(shards_dir, steps=8, log_every=2, ckpt_every=4)
    cfg.train.stop_at = 4
    out = train(cfg, run, progress=False)
    shutil.rmtree(run / "checkpoints")  # as if killed before its first checkpoint: it starts over
    cfg.train.stop_at = None
    train(cfg, run, progress=False)
    scalars, acc = _scalars(run)
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6, 8]
    assert len(acc.Tensors("config/text_summary")) == 1

    # a branch starts at its source checkpoint's step, yet is a new run: its config is recorded
    pause = tiny_config(shards_dir, steps=8, log_every=2, ckpt_every=4)
    pause.train.stop_at = 4
    out = train(pause, tmp_path / "src", progress=False)
    branch = tiny_config(shards_dir, steps=8, log_every=2, ckpt_every=4)
    branch.train.init_checkpoint = out["checkpoint"]
    train(branch, tmp_path / "branch", progress=False)
    scalars, acc = _scalars(tmp_path / "branch")
    assert [s for s, _ in scalars["train/loss"]] == [6, 8]
    assert "config/text_summary" in acc.Tags()["tensors"]

    # a run that fails keeps the events it logged before failing
    class Boom(Callback):
        def on_step_end(self, trainer, is_last):
            if trainer.step == 5:
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train(
            tiny_config(shards_dir, steps=8, log_every=2, ckpt_every=100), tmp_path / "fail", False, [Boom()]
        )
    scalars, _ = _scalars(tmp_path / "fail")
    assert [s for s, _ in scalars["train/loss"]] == [2, 4]


def test_no_trackers_writes_no_events_and_an_unknown_tracker_is_refused(shards_dir, tmp_path):
    cfg = tiny_config(shards_dir, steps=2, log_every=1)
    cfg.train.trackers = []
    train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "tensorboard").exists()
    cfg.train.trackers = ["tensorbored"]
    with pytest.raises(UserError, match="tensorbored"):
        cfg.validate()


# -- the guard, and extras that are not installed ----------------------------------------------------


def test_a_failing_tracker_warns_once_and_the_run_trains_on(shards_dir, tmp_path, capsys):
    from elmforest.train.tracking import Tracker

    class Flaky(Tracker):
        name = "Flaky"
        calls: list = []

        def log(self, trainer, m):
            self.calls.append(("log", m["step"]))
            if m["step"] == 4:
                raise OSError("disk full")

        def abort(self, trainer):
            self.calls.append(("abort", trainer.step))

        def end(self, trainer, summary):
            self.calls.append(("end", trainer.step))

    flaky = Flaky()
    out = train(tiny_config(shards_dir, steps=8, log_every=2, ckpt_every=4), tmp_path / "run", False, [flaky])
    assert out["steps"] == 8
    assert [s for s, _ in _jsonl(tmp_path / "run" / "metrics.jsonl", "loss")] == [2, 4, 6, 8]
    # released once, right after its failure; never called again
    assert flaky.calls == [("log", 2), ("log", 4), ("abort", 4)]
    err = capsys.readouterr().err
    assert err.count("Flaky tracking failed (OSError: disk full)") == 1


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_chosen_tracker_that_is_not_installed_stops_the_run_before_its_first_step(
    shards_dir, tmp_path, monkeypatch, name
):
    monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    cfg = tiny_config(shards_dir, steps=4, log_every=1)
    cfg.train.trackers = ["tensorboard", name]
    cfg.validate()  # a known tracker
    with pytest.raises(UserError, match=re.escape(f'pip install -e ".[{name}]"')):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))


# -- Weights & Biases, offline -----------------------------------------------------------------------


def _with_train(cfg, **train):
    return {**cfg, "train": {**cfg["train"], **train}}


def _wandb_records(path):
    """The records of an offline .wandb file: W&B's LevelDB-style log (a 7-byte header `:W&B`, magic
    0xBEE1, version; then 32 KiB blocks of chunks, each `<crc32, length, type>` + data: 1 full, 2 first,
    3 middle, 4 last) of wandb_internal_pb2.Record. This W&B version ships no Python reader for it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # a block's zero padding
            pos += left
            continue
        buf = (b"" if kind in (1, 2) else buf) + data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def _wandb_session(session_dir):
    """(run record, {key: [(step, value)]}, exit code) of one offline session directory."""
    (f,) = session_dir.glob("run-*.wandb")
    recs = _wandb_records(f)
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    hist: dict = {}
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    hist.setdefault(key, []).append((r.history.step.num, json.loads(item.value_json)))
    exits = [r.exit.exit_code for r in recs if r.WhichOneof("record_type") == "exit"]
    return run, hist, exits


def test_wandb_offline_history_equals_the_jsonl_logs_and_a_resume_continues_the_run(
    shards_dir, tmp_path, monkeypatch
):
    pytest.importorskip("wandb")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # W&B must write nothing outside the run directory
    monkeypatch.setenv("WANDB_MODE", "online")  # and stay offline whatever the environment says
    run = tmp_path / "run"
    cfg = tiny_config(shards_dir, steps=8, log_every=2, ckpt_every=4)
    cfg.train.trackers = ["wandb"]
    cfg.train.stop_at = 6
    train(cfg, run, progress=False)
    shutil.rmtree(list_checkpoints(run / "checkpoints")[-1])  # killed after step 6, before its checkpoint
    cfg.train.stop_at = None
    train(cfg, run, progress=False)

    run_id = json.loads((run / "trackers.json").read_text())["wandb"]["id"]
    sessions = sorted((run / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<id>, with "-1" after it when the resume starts within the same second
    ids = [re.fullmatch(r"offline-run-[\d_]+-(\w+?)(?:-\d+)?", s.name).group(1) for s in sessions]
    assert ids == [run_id, run_id]  # one W&B run, two sessions
    (first_run, first, first_exit), (second_run, second, second_exit) = map(_wandb_session, sessions)
    assert first_exit == second_exit == [0]
    assert first_run.run_id == second_run.run_id == run_id and first_run.display_name == "run"
    first_cfg, second_cfg = (
        {c.key: json.loads(c.value_json) for c in r.config.update if c.key != "_wandb"}
        for r in (first_run, second_run)
    )
    assert second_cfg == json.loads((run / "run_config.json").read_text())  # each session's whole config
    assert first_cfg == _with_train(second_cfg, stop_at=6)

    loss, valid = _jsonl(run / "metrics.jsonl", "loss"), _jsonl(run / "valid.jsonl", "valid_loss")
    assert [s for s, _ in first["train/loss"]] == [2, 4, 6] and [s for s, _ in second["train/loss"]] == [6, 8]
    # in start order, each step's last value (step 6: the resumed session's) is metrics.jsonl's
    merged = dict(first["train/loss"] + second["train/loss"])
    assert _same_series(merged.items(), loss)
    lr = dict(first["train/lr"] + second["train/lr"])
    assert list(lr.values()) == pytest.approx([v for _, v in _jsonl(run / "metrics.jsonl", "lr")], rel=1e-6)
    # the killed session's step-6 points (its last, paused step) stay in its own directory
    assert [s for s, _ in first["valid/loss"]] == [4, 6] and [s for s, _ in second["valid/loss"]] == [8]
    assert _same_series([first["valid/loss"][0], *second["valid/loss"]], valid)
    assert os.environ["WANDB_MODE"] == "online" and "WANDB_ERROR_REPORTING" not in os.environ
    assert not any(home.iterdir())

    # a failed run finishes its W&B run with a nonzero exit code, keeping what it logged
    class Boom(Callback):
        def on_step_end(self, trainer, is_last):
            if trainer.step == 3:
                raise RuntimeError("boom")

    fail_cfg = tiny_config(shards_dir, steps=8, log_every=1, ckpt_every=100)
    fail_cfg.train.trackers = ["wandb"]
    with pytest.raises(RuntimeError, match="boom"):
        train(fail_cfg, tmp_path / "fail", False, [Boom()])
    (session,) = (tmp_path / "fail" / "wandb").glob("offline-run-*")
    _, hist, exits = _wandb_session(session)
    assert exits == [1] and [s for s, _ in hist["train/loss"]] == [1, 2, 3]


# -- MLflow, a file store in the run directory -------------------------------------------------------


def test_mlflow_file_store_equals_the_jsonl_logs_across_a_crash_and_resume_and_a_failure(
    shards_dir, tmp_path, monkeypatch
):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    run = tmp_path / "run"
    cfg = tiny_config(shards_dir, steps=8, log_every=2, ckpt_every=4)
    cfg.train.trackers = ["mlflow"]
    cfg.train.stop_at = 6
    train(cfg, run, progress=False)
    shutil.rmtree(list_checkpoints(run / "checkpoints")[-1])  # killed after step 6, before its checkpoint
    cfg.train.stop_at = None
    train(cfg, run, progress=False)
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # set for elmforest's calls only

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "elmforest"]
    (mrun,) = client.search_runs([exp.experiment_id])
    assert mrun.info.run_id == json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    assert mrun.info.status == "FINISHED" and mrun.data.tags["elmforest.state"] == "complete"
    assert mrun.info.run_name == "run"

    saved = json.loads((run / "run_config.json").read_text())
    params = mrun.data.params
    assert params["train.steps"] == "8" and params["optim.lr"] == json.dumps(saved["optim"]["lr"])
    assert params["data.shards"] == saved["data"]["shards"] and params["train.trackers"] == '["mlflow"]'
    assert len(params) == sum(len(v) for v in saved.values())
    assert params["train.stop_at"] == "6"  # params hold the config the MLflow run was created with
    logged_cfg = json.loads(
        (Path(mrun.info.artifact_uri.removeprefix("file://")) / "run_config.json").read_text()
    )
    assert logged_cfg == _with_train(saved, stop_at=6)

    def history(key):
        return [(m.step, m.value) for m in client.get_metric_history(mrun.info.run_id, key)]

    loss = _jsonl(run / "metrics.jsonl", "loss")
    assert [s for s, _ in history("train/loss")] == [2, 4, 6, 8]  # step 6 once: the killed session's dropped
    assert _same_series(history("train/loss"), loss)
    assert history("train/tokens") == [(s, float(v)) for s, v in _jsonl(run / "metrics.jsonl", "tokens")]
    assert _same_series(history("valid/loss"), _jsonl(run / "valid.jsonl", "valid_loss"))

    class Boom(Callback):
        def on_step_end(self, trainer, is_last):
            if trainer.step == 3:
                raise RuntimeError("boom")

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    fail_cfg = tiny_config(shards_dir, steps=8, log_every=1, ckpt_every=100)
    fail_cfg.train.trackers = ["mlflow"]
    with pytest.raises(RuntimeError, match="boom"):
        train(fail_cfg, tmp_path / "fail", False, [Boom()])
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tmp_path / "fail" / "mlruns").as_uri())
    (mrun,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert mrun.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(mrun.info.run_id, "train/loss")] == [1, 2, 3]


def test_an_mlflow_run_moved_with_its_run_directory_keeps_its_artifacts_there(
    shards_dir, tmp_path, monkeypatch
):
    """MLflow's file store holds absolute artifact URIs: a run directory moved and resumed points them
    at its new place, so its run_config.json is found after the old place is gone."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cfg = tiny_config(shards_dir, steps=8, log_every=2, ckpt_every=4)
    cfg.train.trackers = ["mlflow"]
    cfg.train.stop_at = 4
    train(cfg, tmp_path / "old" / "run", progress=False)
    run = tmp_path / "new" / "run"
    shutil.copytree(tmp_path / "old", tmp_path / "new", symlinks=True)
    shutil.rmtree(tmp_path / "old")
    cfg.train.stop_at = None
    train(cfg, run, progress=False)

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "elmforest"]
    (mrun,) = client.search_runs([exp.experiment_id])
    assert mrun.info.run_id == json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    assert mrun.info.status == "FINISHED" and exp.artifact_location.startswith(
        (run / "mlruns").resolve().as_uri()
    )
    art = Path(mrun.info.artifact_uri.removeprefix("file://"))
    assert art.is_relative_to(run.resolve()) and (art / "run_config.json").is_file()
    assert [m.step for m in client.get_metric_history(mrun.info.run_id, "train/loss")] == [2, 4, 6, 8]


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch):
    """W&B and MLflow installed (else skipped), their files under tmp_path, MLflow's local store."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_a_killed_wandb_session_and_trackers_chosen_on_resume_get_the_history_so_far(
    shards_dir, tmp_path, monkeypatch, offline_trackers
):
    """A SIGKILLed session's W&B file held only its header (its steps were in W&B's buffer), and a
    tracker added on resume (or MLflow pointed at another store) started at the resumed step: the
    steps before it never reached them."""
    run = tmp_path / "run"
    cfg = tiny_config(shards_dir, steps=8, log_every=2, ckpt_every=4)
    cfg.train.trackers = ["wandb"]
    cfg.train.stop_at = 4
    train(cfg, run, progress=False)
    (first,) = (run / "wandb").glob("offline-run-*")
    assert json.loads((run / "trackers.json").read_text())["wandb"]["open"] is False  # ended cleanly
    # what a SIGKILL leaves: the session still marked open, its file no more than the header
    ids = json.loads((run / "trackers.json").read_text())
    (run / "trackers.json").write_text(json.dumps({**ids, "wandb": {**ids["wandb"], "open": True}}))
    (f,) = first.glob("run-*.wandb")
    f.write_bytes(f.read_bytes()[:7])
    cfg.train.stop_at, cfg.train.trackers = None, ["wandb", "mlflow"]
    train(cfg, run, progress=False)
    second = next(s for s in (run / "wandb").glob("offline-run-*") if s != first)
    _, hist, _ = _wandb_session(second)
    loss = _jsonl(run / "metrics.jsonl", "loss")
    assert _same_series(hist["train/loss"], loss)  # steps 2, 4 replayed, then 6, 8
    assert [s for s, _ in hist["valid/loss"]] == [s for s, _ in _jsonl(run / "valid.jsonl", "valid_loss")]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert _same_series(_mlflow_series(run, "train/loss"), loss)
    # a clean pause and resume replays nothing (each session holds its own steps)
    again = tmp_path / "again"
    cfg.train.trackers, cfg.train.stop_at = ["wandb"], 4
    train(cfg, again, progress=False)
    cfg.train.stop_at = None
    train(cfg, again, progress=False)
    hists = [_wandb_session(s)[1] for s in sorted((again / "wandb").glob("offline-run-*"))]
    assert sorted(len(h["train/loss"]) for h in hists) == [2, 2]


def test_a_session_run_with_the_trackers_off_is_filled_in_when_they_are_on_again(
    shards_dir, tmp_path, monkeypatch, offline_trackers
):
    """Trackers are an operational setting: on, then off for a session, then on again left the off
    session's steps missing in all three for good (and TensorBoard, chosen only on resume, never had the
    steps before it)."""
    run = tmp_path / "run"
    cfg = tiny_config(shards_dir, steps=12, log_every=2, ckpt_every=4)
    every = ["tensorboard", "wandb", "mlflow"]
    for trackers, stop in ((every, 4), ([], 8), (every, None)):
        cfg.train.trackers, cfg.train.stop_at = trackers, stop
        train(cfg, run, progress=False)
    loss = _jsonl(run / "metrics.jsonl", "loss")
    assert [s for s, _ in loss] == [2, 4, 6, 8, 10, 12]
    assert _same_series(_scalars(run)[0]["train/loss"], loss)  # steps 6 and 8 once, none twice
    points = sorted(
        p for s in (run / "wandb").glob("offline-run-*") for p in _wandb_session(s)[1]["train/loss"]
    )
    assert _same_series(points, loss)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert _same_series(_mlflow_series(run, "train/loss"), loss)
    # TensorBoard chosen only on resume: the steps before it, and the config, once
    late = tmp_path / "late"
    for trackers, stop in (([], 4), (["tensorboard"], None)):
        cfg.train.trackers, cfg.train.stop_at = trackers, stop
        train(cfg, late, progress=False)
    scalars, acc = _scalars(late)
    assert _same_series(scalars["train/loss"], _jsonl(late / "metrics.jsonl", "loss"))
    assert len(acc.Tensors("config/text_summary")) == 1


def test_a_killed_run_waits_for_its_tensorboard_writer_a_bounded_time(monkeypatch):
    """A SIGTERM inside the writer's queue left its thread asleep until the flush timer (120 s): the killed
    run sat in SummaryWriter.close() holding its lock. A failed run waits ABORT_WAIT at most; one that
    ends closes its writer whole."""
    import threading
    import time

    from elmforest.train.tracking import TensorBoardLogger

    released, closed = threading.Event(), []

    class Stuck:
        def close(self):
            released.wait(30)
            closed.append(True)

    logger = TensorBoardLogger(Path("unused"), None)
    monkeypatch.setattr(TensorBoardLogger, "ABORT_WAIT", 0.2)
    logger.writer = Stuck()
    t0 = time.monotonic()
    logger.abort(None)
    assert time.monotonic() - t0 < 5 and logger.writer is None
    released.set()

    class Ends:
        def close(self):
            closed.append("end")

    logger.writer = Ends()
    logger.end(None, {})
    assert "end" in closed and logger.writer is None  # closed whole, before end() returned


def test_a_merged_moes_training_logs_keep_their_mlflow_artifacts(shards_dir, tmp_path, monkeypatch):
    """The scratch run of a router training or BTX fine-tune is deleted and its logs move into OUT/
    train_logs: MLflow's store there still named the deleted run's folder for its artifacts (none listed)."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from elmforest.merge.moe_train import _keep_logs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run, out = tmp_path / "OUT.finetune-run-x", tmp_path / "OUT"
    cfg = tiny_config(shards_dir, steps=2, log_every=1, ckpt_every=2)
    cfg.train.trackers = ["mlflow"]
    train(cfg, run, progress=False)
    out.mkdir()
    _keep_logs(run, out)
    shutil.rmtree(run)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "train_logs" / "mlruns").as_uri())
    (mrun,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [a.path for a in client.list_artifacts(mrun.info.run_id)] == ["run_config.json"]
