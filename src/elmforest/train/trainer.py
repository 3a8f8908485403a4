"""The one trainer behind every run: dense baselines now, seeds and experts later.

A run directory holds::

    run_config.json        the resolved config tree
    inputs.json            the shards (and checkpoints) it started from: path and content fingerprint
    metrics.jsonl          one JSON object per logged step
    valid.jsonl            the validation loss at each checkpoint (fixed windows of the valid split)
    checkpoints/step-*/    resumable checkpoints (see checkpoint.py)
    model/                 the final Hugging Face checkpoint (safetensors + tokenizer)
    summary.json           tokens, FLOPs, parameters, wall time; written last, marks the run complete

Starting a run whose directory holds checkpoints resumes from the newest good one (a corrupt one is
set aside, saying so); starting a complete run does nothing. A directory holding no checkpoint yet
is not a run to protect: it starts over with whatever config it is given. Progress, metrics,
the divergence guard, the validation loss and checkpointing are callbacks; other phases add their own.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from elmforest.config import RunConfig
from elmforest.data.tokenizer import save_tokenizer
from elmforest.model.presets import fill_architecture
from elmforest.train.callbacks import (
    Callback,
    Checkpointer,
    DivergenceGuard,
    JsonlLogger,
    ProgressBar,
    ValidationLoss,
)
from elmforest.train.checkpoint import clean_partial, list_checkpoints, load_checkpoint, set_aside_corrupt
from elmforest.train.flops import FLOPS_FORMULA
from elmforest.train.frozen_experts import FrozenExperts
from elmforest.train.runcheck import (
    check_config,
    check_finished_data,
    check_inputs,
)
from elmforest.train.runlock import drop_if_empty, lock_run_dir
from elmforest.train.schedule import lr_at
from elmforest.train.setup import TrainerSetup
from elmforest.train.tracking import require_trackers, tracker_callbacks
from elmforest.utils.device import autocast
from elmforest.utils.errors import UserError
from elmforest.utils.io import discard_dir, read_json, staged_dir, write_json_atomic
from elmforest.utils.proc import first_process


def rank_step_seed(seed: int, rank: int, step: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest(), "little")


@dataclass
class Trainer(TrainerSetup):
    cfg: RunConfig
    run_dir: Path
    callbacks: list[Callback] = field(default_factory=list)
    progress: bool = True
    label: str | None = None  # what progress lines call the run (default: its directory's name)

    def __post_init__(self):
        self.run_dir = Path(self.run_dir)
        self.cfg = copy.deepcopy(self.cfg)
        fill_architecture(self.cfg.model)  # run_config.json names the whole model, not just a preset
        self.cfg.validate()  # a config built in code, not read: refused before anything is written
        self.cfg.check_pause()
        self.step = 0
        self.tokens = 0

    def _apply_optim_hparams(self) -> None:
        o = self.cfg.optim
        for g, wd in zip(self.opt.param_groups, (o.weight_decay, 0.0), strict=True):
            g.update(betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=wd)

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict:
        created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # locked before anything is read: a run being set up (hashing a large init_from takes minutes)
        # must not look like a dead leftover that another command may delete (runlock.unless_training)
        if first_process():
            self._lock_run_dir()
        try:
            summary_path = self.run_dir / "summary.json"
            check_config(self.run_dir, self.cfg)
            if summary_path.exists() and (self.run_dir / "model" / "config.json").exists():
                check_finished_data(self.run_dir, self.cfg)
                if first_process():  # a kill between the summary and the deletion left them, or keep was 2
                    self._drop_checkpoints_if_unkept()
                self._release_lock()
                return read_json(summary_path)  # complete: nothing to do
            try:
                self._setup()
                self.inputs = check_inputs(self.run_dir, self.cfg, self.shards)
                require_trackers(self.cfg.train.trackers)  # before its run folder holds anything
            except BaseException:
                if created:  # refused before anything was written: leave no empty run folder behind
                    drop_if_empty(self.run_dir)
                raise
            self.lead = self.rank == 0  # only the first process writes; the others compute
            return self._locked_fit(summary_path)
        except BaseException:  # the lock freed now, not when the garbage collector gets to this trainer:
            self._release_lock()  # a caller in the same process may train or delete the run next
            raise

    def _locked_fit(self, summary_path: Path) -> dict:
        if self.lead:
            write_json_atomic(self.run_dir / "run_config.json", self.cfg.to_dict())
            write_json_atomic(self.run_dir / "inputs.json", self.inputs)
        self.ckpt_root = self.run_dir / "checkpoints"
        self._resume()
        stop = self.cfg.train.stop_at
        if stop is not None and self.step >= stop and not list_checkpoints(self.ckpt_root):
            raise UserError(
                f"{self.run_dir}: train.stop_at={stop} is not past step {self.step}, where this run starts "
                "(its init_checkpoint's): there is nothing to train before pausing"
            )
        # after the weights in effect are loaded: those are the ones kept
        self.frozen = (
            FrozenExperts(self.model, self.cfg.train.frozen_experts)
            if self.cfg.train.frozen_experts
            else None
        )
        callbacks = self.active_callbacks = self._all_callbacks()
        try:
            return self._fit_loop(callbacks, summary_path)
        except BaseException:
            for cb in callbacks:  # a failed run keeps what its trackers were sent (divergence, Ctrl-C)
                cb.on_abort(self)
            raise

    def _fit_loop(self, callbacks: list[Callback], summary_path: Path) -> dict:
        for cb in callbacks:
            cb.on_train_start(self)
        tc = self.cfg.train
        self.t_start = t_log = time.perf_counter()
        tokens_at_log = self.tokens
        self.end = min(tc.steps, tc.stop_at) if tc.stop_at else tc.steps
        while self.step < self.end:
            if self.rank > 0:  # only rank 0's generator is checkpointed: every rank loaded it on a resume,
                # and from an init_checkpoint (each expert), so ranks drew one dropout stream. Past rank 0
                # each draws from (seed, rank, step): the same whether the run was paused or not
                torch.manual_seed(rank_step_seed(tc.seed, self.rank, self.step))
            lr = lr_at(self.step, tc.steps, self.cfg.optim)
            grad_norm = self._train_step(lr)
            self.step += 1
            self.tokens += tc.tokens_per_step
            is_last = self.step == self.end
            # a pause (stop_at) off the log grid logs nothing: its window goes on in the checkpoint, so a
            # paused and resumed run logs what an uninterrupted one does (valid.jsonl gains the pause's
            # step: ValidationLoss measures at every last step, and the study reads the seed's there)
            if self.step % tc.log_every == 0 or self.step == tc.steps:
                now = time.perf_counter()
                self.last_loss = self._mean_over_processes(self.loss_sum / self.loss_count)
                m = {
                    "step": self.step,
                    "start_step": self.start_step,
                    "loss": self.last_loss,
                    "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens": self.tokens,
                    "flops": self.tokens * self.flops_per_token,
                    "tokens_per_s": (self.tokens - tokens_at_log) / max(now - t_log, 1e-9),
                    "elapsed_s": self.wall_before + now - self.t_start,
                }
                for cb in callbacks:
                    cb.on_log(self, m)
                t_log, tokens_at_log = now, self.tokens
                self.loss_sum.zero_()
                self.loss_count = 0
            for cb in callbacks:
                cb.on_step_end(self, is_last)
        if self.step < tc.steps:  # paused at stop_at: the newest checkpoint is the result
            for cb in callbacks:
                cb.on_train_end(self, {})
            self._finish_distributed()
            return {
                "stopped_at": self.step,
                "tokens": self.tokens,
                "flops": self.tokens * self.flops_per_token,
                "checkpoint": str(list_checkpoints(self.ckpt_root)[-1]),
            }
        if self.lead:
            self._save_final()
        summary = self._summary()
        if self.lead:
            write_json_atomic(summary_path, summary)
        for cb in callbacks:
            cb.on_train_end(self, summary)
        self._finish_distributed()
        if self.lead:
            self._drop_checkpoints_if_unkept()
        return summary

    def _drop_checkpoints_if_unkept(self) -> None:
        """keep_checkpoints=0: a finished run is its model and summary. Renamed aside before deletion,
        so a kill never leaves a half-deleted checkpoint that still looks complete."""
        if self.cfg.train.keep_checkpoints == 0 and (root := self.run_dir / "checkpoints").is_dir():
            discard_dir(root)

    def _resume(self) -> None:
        """Where this run starts: its newest good checkpoint, else the checkpoint it branches from
        (its step, weights and moments: the LR schedule continues), else step 0."""
        if self.lead:
            clean_partial(self.ckpt_root)
        if self.lead:
            set_aside_corrupt(self.ckpt_root)
        self._barrier()
        ckpts = list_checkpoints(self.ckpt_root)
        self.resumed_from, self.start_step, self.wall_before = None, 0, 0.0
        loss_window, self.last_loss, self.zero_grads_at_start = (0.0, 0), math.nan, 0
        if ckpts:
            # set_aside_corrupt verified it (the first process, before the barrier): hash it only once
            st = load_checkpoint(ckpts[-1], self.model, self.opt, self.device, verified=True)
            self.step, self.tokens, self.wall_before = st["step"], st["tokens"], st.get("wall_s", 0.0)
            self.resumed_from = self.step
            self.start_step = st.get("start_step", 0)
            loss_window, self.last_loss = (
                tuple(st.get("loss_window", (0.0, 0))),
                st.get("last_loss", math.nan),
            )
            self.zero_grads_at_start = int(st.get("zero_grads", 0))
            if st.get("precision", self._precision()) != self._precision() and self.lead:
                print(  # operational (a resume may move device), but then not bit-identical: said
                    f"warning: {self.run_dir}: trained in {st['precision']} up to step {self.step}, resumed in "
                    f"{self._precision()} (train.precision {self.cfg.train.precision!r} on {self.device})",
                    file=sys.stderr,
                )
        elif self.cfg.train.init_checkpoint:
            st = load_checkpoint(Path(self.cfg.train.init_checkpoint), self.model, self.opt, self.device)
            self.step = self.start_step = st["step"]  # tokens count this run's training only
            if self.step >= self.cfg.train.steps:
                raise UserError(
                    f"init_checkpoint is at step {self.step}, not before train.steps={self.cfg.train.steps}"
                )
        self._apply_optim_hparams()  # a checkpoint brings its moments, not its hyper-parameters
        self.loss_sum = torch.tensor(float(loss_window[0]), device=self.device)
        self.loss_count = int(loss_window[1])

    def _all_callbacks(self) -> list[Callback]:
        """Every process guards against divergence and takes part in checkpointing (a collective step);
        the first one also reports progress, logs metrics and measures the validation loss."""
        shared = [DivergenceGuard(), Checkpointer()]
        if not self.lead:
            return shared
        return [
            shared[0],
            ProgressBar(self.progress),
            JsonlLogger(self.run_dir / "metrics.jsonl"),
            ValidationLoss(),
            shared[1],
            *tracker_callbacks(self.cfg.train.trackers, self.run_dir),
            *self.callbacks,
        ]

    def _train_step(self, lr: float):
        """One optimizer step over `grad_accum` micro-batches; the loss accumulates for the next log."""
        tc = self.cfg.train
        for g in self.opt.param_groups:
            g["lr"] = lr
        for micro in range(tc.grad_accum):
            batch = self.sampler.batch(self.step, micro)
            if self.world > 1:
                per = tc.batch_size // self.world
                batch = batch[self.rank * per : (self.rank + 1) * per]
            batch = batch.to(self.device, non_blocking=True)
            sync = self.world == 1 or micro == tc.grad_accum - 1  # all-reduce once per step
            with contextlib.nullcontext() if sync else self.forward.no_sync():
                objective, loss = self.loss_of(batch)
                (objective / tc.grad_accum).backward()
            self.loss_sum += loss.detach()
            self.loss_count += 1
        if self.cfg.optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        else:  # measured all the same: it is logged, and the divergence checks read it (a dead network)
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]  # as clip_grad_norm_
            grad_norm = (
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                if grads
                else None
            )
        self.opt.step()
        if self.frozen is not None:
            self.frozen.restore()
        self.opt.zero_grad(set_to_none=True)
        return grad_norm

    def checkpoint_state(self) -> dict:
        """Everything besides weights and optimizer that a resumed run needs (collective: every
        process calls it)."""
        return {
            "step": self.step,
            "start_step": self.start_step,
            "loss_window": [self._mean_over_processes(self.loss_sum), self.loss_count],
            "last_loss": self.last_loss,
            # logged zero gradient norms in a row (DivergenceGuard): a resume counts on from them
            "zero_grads": next(
                (cb.zero_grads for cb in self.active_callbacks if isinstance(cb, DivergenceGuard)), 0
            ),
            "tokens": self.tokens,
            "flops": self.tokens * self.flops_per_token,
            "wall_s": self.wall_before + time.perf_counter() - self.t_start,
            "precision": self._precision(),  # as resolved: `auto` differs by device
            "scheduler": {"type": self.cfg.optim.schedule, "step": self.step},
            "data": {"sampler": "random_windows", "next_step": self.step},
            "config": self.cfg.to_dict(),
        }

    def _precision(self) -> str:
        return str(self.amp_dtype or torch.float32).replace("torch.", "")

    def _summary(self) -> dict:
        tc = self.cfg.train
        return {
            "steps": self.step,
            "start_step": self.start_step,
            "tokens": self.tokens,
            "flops": self.tokens * self.flops_per_token,
            "flops_per_token": self.flops_per_token,
            "flops_formula": FLOPS_FORMULA,
            "params": self.n_params,
            "matmul_params": self.flops_info["matmul_params"],
            "trainable_params": self.flops_info["trainable_params"],
            "flops_breakdown": self.flops_info,
            "seq_len": tc.seq_len,
            "tokens_per_step": tc.tokens_per_step,
            "final_loss": self.last_loss,
            "wall_s": self.wall_before + time.perf_counter() - self.t_start,
            "device": str(self.device),
            "precision": self._precision(),
            "domains": self.sampler.domains,
            "processes": self.world,
            "resumed_from": self.resumed_from,
        }

    @torch.no_grad()
    def validation_loss(self, windows: torch.Tensor) -> float:
        """Mean next-token loss of the model on `windows` [W, T + 1] (the undistributed model: no
        collective step, so the first process alone can measure it)."""
        self.model.eval()
        total, n = 0.0, 0
        try:
            for i in range(0, len(windows), self.cfg.train.batch_size):
                x = windows[i : i + self.cfg.train.batch_size].to(self.device)
                with autocast(self.device, self.amp_dtype):
                    logits = self.model(input_ids=x[:, :-1]).logits
                total += float(
                    F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
                )
                n += x[:, 1:].numel()
        finally:
            self.model.train()
        return total / n

    # -- data parallel helpers ---------------------------------------------------------------
    def barrier(self) -> None:
        self._barrier()

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def _mean_over_processes(self, x: torch.Tensor) -> float:
        if self.world > 1:
            x = x.detach().clone()
            torch.distributed.all_reduce(x)
            x /= self.world
        return float(x)

    def _lock_run_dir(self) -> None:
        self._lock = lock_run_dir(self.run_dir)

    def _release_lock(self) -> None:
        if getattr(self, "_lock", None) is not None:
            self._lock.close()
            self._lock = None

    def _finish_distributed(self) -> None:
        self._release_lock()
        self._barrier()
        if self._owns_group:
            torch.distributed.destroy_process_group()

    def _save_final(self) -> None:
        with staged_dir(self.run_dir / "model") as tmp:
            self.model.save_pretrained(str(tmp), safe_serialization=True)
            save_tokenizer(self.tokenizer, tmp)
            write_json_atomic(tmp / "elmforest_run.json", self.cfg.to_dict())
            write_json_atomic(tmp / "elmforest_data.json", self.shards.record())


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    progress: bool = True,
    callbacks: list[Callback] | None = None,
    label: str | None = None,
) -> dict:
    return Trainer(cfg, Path(run_dir), callbacks or [], progress, label).fit()
