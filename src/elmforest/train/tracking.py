"""Experiment tracking: the trainer's metrics to the tools people read them in, as callbacks.

metrics.jsonl and valid.jsonl stay the record; trackers are views of it. TensorBoard is on by
default (`train.trackers=[tensorboard]`; the package is a core dependency, small and serverless);
where it is missing a run says so and trains as before. Trackers are an operational setting:
changing them does not make a run a different run (runcheck.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from elmforest.config import TRACKERS
from elmforest.train.callbacks import Callback
from elmforest.utils.errors import UserError


def check_trackers(names: list[str]) -> None:
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UserError(f"train.trackers: unknown tracker(s) {unknown}; known: {list(TRACKERS)}")


def tracker_callbacks(names: list[str], run_dir: Path, say=print) -> list[Callback]:
    check_trackers(names)
    out: list[Callback] = []
    if "tensorboard" in names:
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        except ImportError:
            say(
                f"{run_dir.name}: TensorBoard is not installed (pip install tensorboard); "
                "metrics go to metrics.jsonl only (train.trackers=[] silences this)"
            )
        else:
            out.append(TensorBoardLogger(run_dir / "tensorboard"))
    return out


class TensorBoardLogger(Callback):
    """Every logged metric as a scalar at its step, the validation loss as `valid/loss`, the run's
    config as text. A resumed run purges what the killed one wrote past the resumed step (TensorBoard's
    purge_step), as metrics.jsonl drops those lines, so each step has one value. Flushed at each
    checkpoint: what a checkpoint keeps, the events keep too."""

    def __init__(self, log_dir: Path):
        self.log_dir, self.writer = Path(log_dir), None

    def on_train_start(self, trainer):
        from torch.utils.tensorboard import SummaryWriter

        resumed = trainer.step > 0
        self.writer = SummaryWriter(str(self.log_dir), purge_step=trainer.step + 1 if resumed else None)
        if not resumed:
            self.writer.add_text("config", "```\n" + json.dumps(trainer.cfg.to_dict(), indent=2) + "\n```", 0)

    def on_log(self, trainer, m):
        for k, v in m.items():
            if k not in ("step", "start_step") and isinstance(v, int | float) and math.isfinite(v):
                self.writer.add_scalar(f"train/{k}", v, m["step"])

    def on_valid(self, trainer, m):
        self.writer.add_scalar("valid/loss", m["valid_loss"], m["step"])

    def on_checkpoint(self, trainer, path):
        self.writer.flush()

    def on_train_end(self, trainer, summary):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
