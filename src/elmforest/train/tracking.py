"""Experiment tracking: the trainer's metrics to the tools people read them in, as callbacks.

metrics.jsonl and valid.jsonl stay the record; trackers are views of it. TensorBoard is on by
default (`train.trackers=[tensorboard]`; the package is a core dependency, small and serverless);
where it is missing or broken a run says so and trains as before. Weights & Biases (offline, never a
server: tracking_wandb.py) and MLflow (a file store in the run directory: tracking_mlflow.py) are
extras, imported only when chosen; one chosen but not installed stops the run before its first step.
A tracker that fails mid-run warns once on stderr and stays off for the rest of the run: a view is
never worth a lost training run. Trackers are an operational setting: changing them does not make a
run a different run (runcheck.py).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import sys
from pathlib import Path

from elmforest.train.callbacks import Callback
from elmforest.utils.errors import UserError
from elmforest.utils.io import read_json, read_jsonl, write_json_atomic

EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}  # tracker -> the pyproject extra that installs it


def tracker_callbacks(names: list[str], run_dir: Path) -> list[Callback]:
    """The callbacks of `names` (already checked against TRACKERS by RunConfig.validate)."""
    out: list[Callback] = []
    if "tensorboard" in names:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as e:  # missing, or broken (a protobuf conflict raises TypeError): train without it
            print(
                f"{run_dir.name}: TensorBoard unavailable ({e}); metrics go to metrics.jsonl only "
                "(pip install tensorboard; train.trackers=[] silences this)",
                file=sys.stderr,
            )
        else:
            out.append(TensorBoardLogger(run_dir / "tensorboard", SummaryWriter))
    if "wandb" in names:
        from elmforest.train.tracking_wandb import WandbLogger

        out.append(WandbLogger(run_dir, require("wandb")))
    if "mlflow" in names:
        from elmforest.train.tracking_mlflow import ENV, MlflowLogger

        with env(**ENV):  # MLflow decides on its usage telemetry when first imported
            out.append(MlflowLogger(run_dir, require("mlflow")))
    return out


def require(name: str):
    """The tracker's package, or a UserError naming the extra: asked for explicitly, so a run that
    would silently go untracked is worse than one that does not start."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # missing, or broken on import (a protobuf conflict): not usable either way
        raise UserError(
            f"train.trackers includes {name}, but {name} cannot be imported ({e}): "
            f'pip install -e ".[{EXTRAS[name]}]", or drop it from train.trackers'
        ) from None


def scalars(m: dict) -> dict[str, float]:
    """A logged metrics line as `train/<name>` scalars: the finite numbers besides the step."""
    return {
        f"train/{k}": float(v)
        for k, v in m.items()
        if k not in ("step", "start_step") and isinstance(v, int | float) and math.isfinite(v)
    }


class Tracker(Callback):
    """A tracker whose failure costs only its own view: the first exception any hook raises is printed
    as a warning on stderr, the tracker releases what it can and is off for the rest of the run, and
    metrics.jsonl and the training go on. KeyboardInterrupt and the like still stop the run.
    Subclasses implement start/log/valid/checkpoint/end/abort."""

    name = "tracker"
    key = "tracker"  # its name in train.trackers and trackers.json
    off = False

    def _call(self, trainer, fn, *args) -> None:
        if self.off:
            return
        try:
            fn(trainer, *args)
        except Exception as e:
            self.off = True
            print(
                f"warning: {trainer.run_dir.name}: {self.name} tracking failed ({type(e).__name__}: {e}); "
                "it is off for the rest of this run, metrics.jsonl goes on",
                file=sys.stderr,
            )
            with contextlib.suppress(Exception):
                self.abort(trainer)

    def on_train_start(self, trainer):
        self._call(trainer, self.start)

    def on_log(self, trainer, m):
        self._call(trainer, self.log, m)

    def on_valid(self, trainer, m):
        if math.isfinite(m["valid_loss"]):
            self._call(trainer, self.valid, m)

    def on_checkpoint(self, trainer, path):
        self._call(trainer, self.checkpoint, path)
        if not self.off:  # what it holds so far: a session run without it is a gap to fill (gap())
            mark_seen(trainer.run_dir, self.key, trainer.step)

    def on_train_end(self, trainer, summary):
        self._call(trainer, self.end, summary)

    def on_abort(self, trainer):
        self._call(trainer, self.abort)

    def start(self, trainer) -> None: ...
    def log(self, trainer, m: dict) -> None: ...
    def valid(self, trainer, m: dict) -> None: ...
    def checkpoint(self, trainer, path: Path) -> None: ...
    def end(self, trainer, summary: dict) -> None: ...
    def abort(self, trainer) -> None: ...


def tracker_ids(run_dir: Path) -> dict:
    """trackers.json: what names this run in each tracker (a W&B run id, an MLflow run id and store),
    so a resumed run continues the same tracked run."""
    path = run_dir / "trackers.json"
    try:
        return read_json(path) if path.is_file() else {}
    except (ValueError, OSError):
        return {}  # unreadable: the tracked run starts anew rather than the training failing


def history(run_dir: Path, up_to: int) -> list[tuple[int, dict[str, float]]]:
    """(step, scalars) of metrics.jsonl and valid.jsonl up to a step, in step order: what a tracker replays
    on a resumed run when it did not see the earlier sessions (chosen only now, another MLflow store, a
    killed session's W&B buffer that never reached its file). metrics.jsonl is the record."""
    rows = [
        (m["step"], scalars(m))
        for m in read_jsonl(run_dir / "metrics.jsonl")
        if isinstance(m.get("step"), int)
    ]
    rows += [
        (m["step"], {"valid/loss": float(m["valid_loss"])})
        for m in read_jsonl(run_dir / "valid.jsonl")
        if isinstance(m.get("step"), int) and isinstance(m.get("valid_loss"), int | float)
    ]
    return sorted((r for r in rows if r[0] <= up_to), key=lambda r: r[0])


def save_tracker_id(run_dir: Path, name: str, value: dict) -> None:
    write_json_atomic(run_dir / "trackers.json", {**tracker_ids(run_dir), name: value})


def mark_seen(run_dir: Path, key: str, step: int) -> None:
    """The last checkpoint's step a tracker logged up to (trackers.json "seen")."""
    ids = tracker_ids(run_dir)
    write_json_atomic(run_dir / "trackers.json", {**ids, "seen": {**(ids.get("seen") or {}), key: step}})


def gap(run_dir: Path, key: str, step: int, had_output: bool) -> list[tuple[int, dict[str, float]]]:
    """The history a resumed tracker missed: steps after the last checkpoint it logged up to (a session
    run with it off, or before it was chosen), up to the resumed step. A run of older versions records
    none: its own output says it was on (nothing missed), none says it never was (everything)."""
    seen = (tracker_ids(run_dir).get("seen") or {}).get(key)
    if not isinstance(seen, int):
        seen = step if had_output else -1
    return [r for r in history(run_dir, step) if r[0] > seen]


@contextlib.contextmanager
def env(**values: str):
    """Environment variables set for one call into a tracking library and restored after it, so
    nothing leaks into the rest of the process (or into what it runs later)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class TensorBoardLogger(Tracker):
    """Every logged metric as a scalar at its step, the validation loss as `valid/loss`, the run's
    config as text. Each step keeps one value, as in metrics.jsonl: a run resumed from its own
    checkpoint writes a purge marker for everything past that step (TensorBoard's purge_step, which
    its Python reader honours; its default fast loader drops stale points when a tag is logged again
    at the same or an earlier step, so they go once the resumed run passes them), and a run starting
    from scratch deletes the events of an earlier start killed before its first checkpoint. Flushed at
    each checkpoint and closed when the run ends or fails."""

    name, key = "TensorBoard", "tensorboard"
    ABORT_WAIT = 10.0  # seconds a failed or killed run waits for the writer to close

    def __init__(self, log_dir: Path, writer_cls):
        self.log_dir, self.writer_cls, self.writer = Path(log_dir), writer_cls, None

    def start(self, trainer):
        resumed = trainer.resumed_from is not None  # not step > 0: a branch starts at its source's step
        if not resumed and self.log_dir.is_dir():
            for f in self.log_dir.glob("events.out.tfevents.*"):
                f.unlink()
        had = resumed and any(self.log_dir.glob("events.out.tfevents.*"))
        self.writer = self.writer_cls(str(self.log_dir), purge_step=trainer.step + 1 if resumed else None)
        if not resumed or not had:  # a run that chose it only now records its config too
            self.writer.add_text("config", "```\n" + json.dumps(trainer.cfg.to_dict(), indent=2) + "\n```", 0)
        if resumed:  # the steps of sessions it was off for (or not yet chosen)
            for step, values in gap(trainer.run_dir, self.key, trainer.step, had):
                for k, v in values.items():
                    self.writer.add_scalar(k, v, step)

    def log(self, trainer, m):
        for k, v in scalars(m).items():
            self.writer.add_scalar(k, v, m["step"])

    def valid(self, trainer, m):
        self.writer.add_scalar("valid/loss", m["valid_loss"], m["step"])

    def checkpoint(self, trainer, path):
        self.writer.flush()

    def end(self, trainer, summary):
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()

    def abort(self, trainer):
        """A run that failed or was killed closes its writer for at most ABORT_WAIT seconds: a SIGTERM
        that landed inside the writer's queue left its thread to wake at the next flush timer (120 s),
        while the run held its lock and a rerun was refused as "another trainer is running"."""
        if self.writer is not None:
            import threading

            writer, self.writer = self.writer, None
            closing = threading.Thread(target=writer.close, name="tensorboard-close", daemon=True)
            closing.start()
            closing.join(self.ABORT_WAIT)


def require_trackers(names) -> None:
    """Each tracker `names` asks for that needs a package (wandb, mlflow) importable: checked by a driver
    (forest train, sweep, study) before any job starts, where every job failed alone, after its run
    folder was written, each with the same message. With Ray it checks the driver's machine only."""
    for name in names:
        if name == "wandb":
            require("wandb")
        elif name == "mlflow":
            from elmforest.train.tracking_mlflow import ENV

            with env(**ENV):
                require("mlflow")
