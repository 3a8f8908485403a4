"""The trainer's callbacks: progress and metrics logging (checkpointing stays in the loop, since
resuming depends on it)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from elmforest.train.trainer import Trainer


class Callback:
    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_log(self, trainer: Trainer, metrics: dict) -> None: ...
    def on_checkpoint(self, trainer: Trainer, path: Path) -> None: ...
    def on_train_end(self, trainer: Trainer, summary: dict) -> None: ...


class ProgressBar(Callback):
    def __init__(self, enabled: bool = True):
        self.enabled, self.bar = enabled, None

    def on_train_start(self, trainer):
        self.bar = tqdm(
            total=trainer.cfg.train.steps,
            initial=trainer.step,
            desc=trainer.run_dir.name,
            unit="step",
            disable=not self.enabled,
            dynamic_ncols=True,
        )

    def on_log(self, trainer, m):
        self.bar.update(m["step"] - self.bar.n)
        self.bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}", lr=f"{m['lr']:.2e}")

    def on_train_end(self, trainer, summary):
        if self.bar is not None:
            self.bar.close()


class JsonlLogger(Callback):
    def __init__(self, path: Path):
        self.path = path

    def on_train_start(self, trainer):
        # Drop lines past the resumed step: they belong to work the crash threw away.
        if self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if _logged_step(ln) <= trainer.step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, self.path)

    def on_log(self, trainer, m):
        with open(self.path, "a") as f:
            f.write(json.dumps(m) + "\n")


def _logged_step(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash sorts after everything (dropped)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
