"""Experiment tracking: the trainer's metrics to the tools people read them in, as callbacks.

metrics.jsonl and valid.jsonl stay the record; trackers are views of it. TensorBoard is on by
default (`train.trackers=[tensorboard]`; the package is a core dependency, small and serverless);
where it is missing or broken a run says so and trains as before. Trackers are an operational setting:
changing them does not make a run a different run (runcheck.py).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from elmforest.train.callbacks import Callback


def tracker_callbacks(names: list[str], run_dir: Path) -> list[Callback]:
    """The callbacks of `names` (already checked against TRACKERS by RunConfig.validate)."""
    out: list[Callback] = []
    if "tensorboard" in names:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # missing, or broken (a protobuf conflict): train without it
            print(
                f"{run_dir.name}: TensorBoard unavailable ({e}); metrics go to metrics.jsonl only "
                "(pip install tensorboard; train.trackers=[] silences this)",
                file=sys.stderr,
            )
        else:
            out.append(TensorBoardLogger(run_dir / "tensorboard", SummaryWriter))
    return out


class TensorBoardLogger(Callback):
    """Every logged metric as a scalar at its step, the validation loss as `valid/loss`, the run's
    config as text. Each step keeps one value, as in metrics.jsonl: a run resumed from its own
    checkpoint writes a purge marker for everything past that step (TensorBoard's purge_step, which
    its Python reader honours; its default fast loader drops stale points when a tag is logged again
    at the same or an earlier step, so they go once the resumed run passes them), and a run starting
    from scratch deletes the events of an earlier start killed before its first checkpoint. Flushed at
    each checkpoint and closed when the run ends or fails."""

    def __init__(self, log_dir: Path, writer_cls):
        self.log_dir, self.writer_cls, self.writer = Path(log_dir), writer_cls, None

    def on_train_start(self, trainer):
        resumed = trainer.resumed_from is not None  # not step > 0: a branch starts at its source's step
        if not resumed and self.log_dir.is_dir():
            for f in self.log_dir.glob("events.out.tfevents.*"):
                f.unlink()
        self.writer = self.writer_cls(str(self.log_dir), purge_step=trainer.step + 1 if resumed else None)
        if not resumed:
            self.writer.add_text("config", "```\n" + json.dumps(trainer.cfg.to_dict(), indent=2) + "\n```", 0)

    def on_log(self, trainer, m):
        for k, v in m.items():
            if k not in ("step", "start_step") and isinstance(v, int | float) and math.isfinite(v):
                self.writer.add_scalar(f"train/{k}", v, m["step"])

    def on_valid(self, trainer, m):
        if math.isfinite(m["valid_loss"]):
            self.writer.add_scalar("valid/loss", m["valid_loss"], m["step"])

    def on_checkpoint(self, trainer, path):
        self.writer.flush()

    def on_train_end(self, trainer, summary):
        self.on_abort(trainer)

    def on_abort(self, trainer):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
