"""Experiment tracking: TensorBoard event files hold exactly what metrics.jsonl / valid.jsonl hold,
one value per step even after a crash and a resume."""

import json
import shutil

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
