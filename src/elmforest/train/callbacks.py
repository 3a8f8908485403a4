"""The trainer's callbacks: everything the loop does besides stepping the optimizer.

Progress, metrics, the divergence guard, the periodic validation loss and checkpointing each hook
into the loop (`on_log` after a logged step, `on_step_end` after every step); a phase adds its own
the same way. The divergence guard and the checkpointer run in every data-parallel process (a
checkpoint is a collective step), the rest only in the first.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from elmforest.train.checkpoint import save_checkpoint
from elmforest.utils.errors import Diverged
from elmforest.utils.io import as_write_error, write_text_atomic

if TYPE_CHECKING:
    from elmforest.train.trainer import Trainer


class Callback:
    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_log(self, trainer: Trainer, metrics: dict) -> None: ...
    def on_step_end(self, trainer: Trainer, is_last: bool) -> None: ...
    def on_checkpoint(self, trainer: Trainer, path: Path) -> None: ...
    def on_train_end(self, trainer: Trainer, summary: dict) -> None: ...
    def on_valid(self, trainer: Trainer, metrics: dict) -> None: ...
    def on_abort(self, trainer: Trainer) -> None: ...  # the run raised; release what must be kept


# the LR that applies: the run's, or for experts of a forest the expert phase's
LOWER_LR = (  # --expert-lr exists on forest seed/train only: an existing forest's expert takes --set
    "lower the learning rate (`--set optim.lr=X`, also for one expert of a forest with `forest expert`; "
    "every expert of a new forest: `--expert-lr X`)?"
)


class DivergenceGuard(Callback):
    """A non-finite loss or gradient norm ends the run before it is logged or checkpointed (both are the
    same on every process, so every process stops at the same step). The logged loss was computed
    before the step's update, so a step whose gradient broke the weights shows a finite loss: on the
    last step nothing would log the NaN that follows, and the broken weights would be saved as the
    run's result (a sweep's expert at a too-high LR did). The weights are checked before the last
    checkpoint for that reason. A gradient norm of exactly 0 at two logged steps in a row is a dead
    network (a blow-up killed every unit; no update can revive it, and its loss sits at the log of the
    vocabulary, finite): it ends the run too, instead of training on to a model that a sweep would have
    to tell from a real one. The weights are checked before every checkpoint, not only the last: a
    step between two logged ones can break them, and a resume would start from the broken ones."""

    zero_grads = 0

    def on_train_start(self, trainer):  # a resumed run counts on from its checkpoint's count
        self.zero_grads = getattr(trainer, "zero_grads_at_start", 0)

    def on_log(self, trainer, m):
        for key in ("loss", "grad_norm"):
            if m.get(key) is not None and not math.isfinite(m[key]):
                raise Diverged(f"{trainer.run_dir}: {key} is {m[key]} at step {m['step']}; {LOWER_LR}")
        self.zero_grads = self.zero_grads + 1 if m.get("grad_norm") == 0.0 else 0
        if self.zero_grads >= 2:
            raise Diverged(
                f"{trainer.run_dir}: the gradients vanished (grad norm 0 at step {m['step']}): a dead "
                f"network; {LOWER_LR}"
            )

    def on_step_end(self, trainer, is_last):
        every = trainer.cfg.train.ckpt_every
        due = is_last or (every and trainer.step % every == 0)  # the Checkpointer saves next
        if due and not all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters()):
            raise Diverged(
                f"{trainer.run_dir}: the weights are not finite after step {trainer.step}; {LOWER_LR}"
            )


class Checkpointer(Callback):
    """Every `train.ckpt_every` steps and at the last step (a pause included): a resumable checkpoint.
    Not at the last step of a run that finishes with `keep_checkpoints=0`: it would be deleted once the
    final model is saved (at 1.3B parameters ~16 GB written, hashed and deleted per run); a kill before
    that save resumes from the newest periodic checkpoint instead."""

    def on_train_start(self, trainer):
        self.others = [cb for cb in trainer.active_callbacks if cb is not self]

    def on_step_end(self, trainer, is_last):
        tc = trainer.cfg.train
        if not ((tc.ckpt_every and trainer.step % tc.ckpt_every == 0) or is_last):
            return
        if tc.keep_checkpoints == 0 and trainer.step >= tc.steps:
            return
        state = trainer.checkpoint_state()  # collective: every process takes part
        if trainer.lead:
            path = save_checkpoint(trainer.ckpt_root, trainer.model, trainer.opt, state, tc.keep_checkpoints)
            for cb in self.others:
                cb.on_checkpoint(trainer, path)
        trainer.barrier()


class ValidationLoss(Callback):
    """The mean next-token loss on fixed held-out windows of the run's own domains (their valid split,
    the same windows every time, spread evenly over the domains), every `train.valid_every` steps
    (default: at each checkpoint) and at the end, one line per measurement in valid.jsonl. It reads
    no random state and changes no weight, so a run trains exactly as without it."""

    def on_train_start(self, trainer):
        tc = trainer.cfg.train
        self.every = tc.ckpt_every if tc.valid_every is None else tc.valid_every
        # at the end too, also where the only checkpoint is the last one (ckpt_every 0); 0 given: never
        on = self.every or tc.valid_every is None
        self.windows = _valid_windows(trainer) if on and tc.valid_windows else None
        self.log = JsonlLogger(trainer.run_dir / "valid.jsonl")
        self.log.on_train_start(trainer)  # lines past a resumed step go, as in metrics.jsonl

    def on_step_end(self, trainer, is_last):
        if self.windows is None or not ((self.every and trainer.step % self.every == 0) or is_last):
            return
        loss = trainer.validation_loss(self.windows)
        m = {"step": trainer.step, "valid_loss": loss, "windows": len(self.windows)}
        self.log.on_log(trainer, m)
        for cb in trainer.active_callbacks:
            cb.on_valid(trainer, m)


def _valid_windows(trainer) -> torch.Tensor | None:
    """int64 [W, seq_len + 1]: the first non-overlapping windows of each training domain's valid split."""
    tc, shards = trainer.cfg.train, trainer.shards
    domains = [d for d in trainer.sampler.domains if shards.has(d, "valid")]
    if not domains:
        print(
            f"note: {trainer.run_dir.name}: no valid split for its domains; no validation loss",
            file=sys.stderr,
        )
        return None
    per, T = max(1, math.ceil(tc.valid_windows / len(domains))), tc.seq_len
    rows = []
    for d in domains:
        arr = shards.tokens(d, "valid")
        rows += [
            np.asarray(arr[w * T : w * T + T + 1], dtype=np.int64)
            for w in range(min(per, (len(arr) - 1) // T))
        ]
    return torch.from_numpy(np.stack(rows)) if rows else None


class ProgressBar(Callback):
    """A progress bar; without one (--no-progress, jobs writing to a log), a line per logged step, so a
    long run is never silent for minutes."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bar = enabled, None

    def on_train_start(self, trainer):
        self.desc = trainer.label or trainer.run_dir.name
        if trainer.resumed_from is not None:  # a rerun that continues says so, and from where
            print(f"{self.desc}: resuming from its checkpoint at step {trainer.resumed_from}", flush=True)
        self.bar = tqdm(
            total=trainer.cfg.train.steps,
            initial=trainer.step,
            desc=self.desc,
            unit="step",
            disable=not self.enabled,
            dynamic_ncols=True,
        )

    def on_log(self, trainer, m):
        if not self.enabled:
            print(
                f"{self.desc}: step {m['step']}/{trainer.cfg.train.steps} loss {m['loss']:.4f} "
                f"lr {m['lr']:.2e} {m['tokens_per_s']:.0f} tok/s",
                flush=True,
            )
            return
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
            write_text_atomic(self.path, "".join(ln + "\n" for ln in keep))

    def on_log(self, trainer, m):
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(m) + "\n")
        except OSError as e:  # a write's own error names no file: a full disk said only "No space left"
            raise (as_write_error(e, self.path) or e) from e


def _logged_step(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash sorts after everything (dropped)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
