"""The one trainer behind every run: dense baselines now, seeds and experts later.

A run directory holds::

    run_config.json        the resolved config tree
    inputs.json            the shards (and checkpoints) it started from: path and content fingerprint
    metrics.jsonl          one JSON object per logged step
    checkpoints/step-*/    resumable checkpoints (see checkpoint.py)
    model/                 the final Hugging Face checkpoint (safetensors + tokenizer)
    summary.json           tokens, FLOPs, parameters, wall time; written last, marks the run complete

Starting a run whose directory holds checkpoints resumes from the newest good one (a corrupt one is
set aside, saying so); starting a complete run does nothing. A directory holding no checkpoint yet
is not a run to protect: it starts over with whatever config it is given. Progress and logging are callbacks, so other phases can add their own.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from elmforest.config import RunConfig
from elmforest.data.shards import Shards
from elmforest.data.tokenizer import load_tokenizer, save_tokenizer
from elmforest.model.build import build_model, count_params
from elmforest.train.batches import WindowSampler
from elmforest.train.callbacks import Callback, JsonlLogger, ProgressBar
from elmforest.train.checkpoint import (
    CorruptCheckpoint,
    clean_partial,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_aside,
    verify_checkpoint,
)
from elmforest.train.flops import FLOPS_FORMULA, flops_breakdown
from elmforest.train.runcheck import (
    check_context,
    check_same_tokenizer,
    config_diff,
    input_fingerprints,
    run_identity,
)
from elmforest.train.schedule import lr_at
from elmforest.utils.device import autocast, resolve_device, resolve_precision
from elmforest.utils.errors import Diverged, Failed, UserError
from elmforest.utils.io import read_json, staged_dir, write_json_atomic


@dataclass
class Trainer:
    cfg: RunConfig
    run_dir: Path
    callbacks: list[Callback] = field(default_factory=list)
    progress: bool = True

    def __post_init__(self):
        self.run_dir = Path(self.run_dir)
        self.step = 0
        self.tokens = 0

    # -- setup -------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        if not cfg.data.shards:
            raise UserError("data.shards is not set: point it at a shards directory (elmforest shards build)")
        self.shards = Shards(cfg.data.shards)
        self.tokenizer = load_tokenizer(self.shards.root)
        if cfg.model.init_from:
            check_same_tokenizer(cfg.model.init_from, self.tokenizer.fingerprint(), self.shards.root)
        self.rank, self.world, self._owns_group = _init_distributed(cfg.train.device)
        self.device = resolve_device(cfg.train.device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        if cfg.train.batch_size % self.world:
            raise UserError(
                f"train.batch_size={cfg.train.batch_size} must divide evenly among {self.world} processes"
            )
        self.amp_dtype = resolve_precision(cfg.train.precision, self.device)
        self.model = build_model(cfg.model, self.shards.vocab_size, self.shards.eos_id, seed=cfg.train.seed)
        check_context(self.model, cfg)
        self.model.to(self.device)
        self.model.train()
        if cfg.train.trainable:
            freeze_except(self.model, cfg.train.trainable)
        self.n_params = count_params(self.model)
        # after freezing: frozen weights cost no weight gradient (train/flops.py)
        self.flops_info = flops_breakdown(self.model, cfg.train.seq_len)
        self.flops_per_token = self.flops_info["flops_per_token"]
        self.sampler = WindowSampler(
            self.shards,
            cfg.data.domains,
            cfg.data.split,
            cfg.train.seq_len,
            cfg.train.batch_size,
            cfg.train.seed,
            cfg.data.mixture,
        )
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        o = cfg.optim
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            foreach=self.device.type == "cuda" or None,
        )
        self.forward = self.model
        if self.world > 1:  # data parallel: each process takes its slice of every global batch
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.model, device_ids=ids)
        if cfg.train.compile:
            self.forward = torch.compile(self.forward)

    def _apply_optim_hparams(self) -> None:
        o = self.cfg.optim
        for g, wd in zip(self.opt.param_groups, (o.weight_decay, 0.0), strict=True):
            g.update(betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=wd)

    def _has_progress(self) -> bool:
        return bool(list_checkpoints(self.run_dir / "checkpoints")) or (self.run_dir / "model").exists()

    def _check_config(self) -> None:
        """A run with progress resumes only with the same config and the same shards content; a
        directory with no checkpoint yet (a run that failed before its first) holds nothing to keep."""
        saved = self.run_dir / "run_config.json"
        if not saved.exists() or not self._has_progress():
            return
        # through RunConfig, so fields added since the run started take their defaults
        old, new = (
            run_identity(RunConfig.from_dict(read_json(saved)).to_dict()),
            run_identity(self.cfg.to_dict()),
        )
        if old != new:
            raise UserError(
                f"{self.run_dir} holds a run with a different config ({config_diff(old, new)}); resume it "
                f"with the same settings, or delete {self.run_dir} to train it again with the new ones"
            )

    def _check_inputs(self) -> None:
        """What the run was started from is identified by content, not path (inputs.json): shards rebuilt
        at the same path are refused (training would silently continue on other text), a moved corpus
        or forest is accepted."""
        saved = self.run_dir / "inputs.json"
        old = read_json(saved) if saved.is_file() and self._has_progress() else None
        self.inputs = input_fingerprints(self.cfg, self.shards, old)
        if old is None:
            return
        for key, new in self.inputs.items():
            was = old.get(key)
            if was is not None and new is not None and was["fingerprint"] != new["fingerprint"]:
                what = "shards" if key == "shards" else key.replace("_", ".")
                raise UserError(
                    f"{self.run_dir} was started from {what} {was['path']} (fingerprint {was['fingerprint']}) "
                    f"but {new['path']} holds other data (fingerprint {new['fingerprint']}); point it at the "
                    f"original, or delete {self.run_dir} to start over"
                )

    def _resume_point(self, ckpt_root: Path, lead: bool) -> list[Path]:
        """The complete checkpoints, newest last, after setting aside (lead process) any newest ones
        that fail verification, so a flipped byte costs the steps since the previous checkpoint, not
        the run."""
        ckpts = list_checkpoints(ckpt_root)
        while lead and ckpts:
            try:
                verify_checkpoint(ckpts[-1])
                break
            except CorruptCheckpoint as e:
                bad = ckpts.pop()
                aside = set_aside(bad)
                then = f"resuming from {ckpts[-1].name}" if ckpts else "no earlier checkpoint: starting over"
                print(f"warning: {e}; kept aside as {aside.name}; {then}", file=sys.stderr, flush=True)
        self._barrier()
        return list_checkpoints(ckpt_root)

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        summary_path = self.run_dir / "summary.json"
        self._check_config()
        if summary_path.exists() and (self.run_dir / "model" / "config.json").exists():
            return read_json(summary_path)  # complete: nothing to do
        self._setup()
        self._check_inputs()
        lead = self.rank == 0  # only the first process writes; the others compute
        if lead:
            self._lock_run_dir()
        if lead:  # once setup succeeded
            write_json_atomic(self.run_dir / "run_config.json", self.cfg.to_dict())
            write_json_atomic(self.run_dir / "inputs.json", self.inputs)
        ckpt_root = self.run_dir / "checkpoints"
        wall_before = 0.0
        if lead:
            clean_partial(ckpt_root)
        ckpts = self._resume_point(ckpt_root, lead)
        self.resumed_from = None
        self.start_step = 0
        loss_window, last_loss = (0.0, 0), math.nan
        if ckpts:
            st = load_checkpoint(ckpts[-1], self.model, self.opt, self.device)
            self.step, self.tokens, wall_before = st["step"], st["tokens"], st.get("wall_s", 0.0)
            self.resumed_from = self.step
            self.start_step = st.get("start_step", 0)
            loss_window, last_loss = tuple(st.get("loss_window", (0.0, 0))), st.get("last_loss", math.nan)
        elif self.cfg.train.init_checkpoint:
            st = load_checkpoint(Path(self.cfg.train.init_checkpoint), self.model, self.opt, self.device)
            self.step = self.start_step = st["step"]  # tokens count this run's training only
            if self.step >= self.cfg.train.steps:
                raise UserError(
                    f"init_checkpoint is at step {self.step}, not before train.steps={self.cfg.train.steps}"
                )
        self._apply_optim_hparams()  # a checkpoint brings its moments, not its hyper-parameters
        callbacks = (
            [ProgressBar(self.progress), JsonlLogger(self.run_dir / "metrics.jsonl"), *self.callbacks]
            if lead
            else []
        )
        for cb in callbacks:
            cb.on_train_start(self)

        tc = self.cfg.train
        tokens_per_step = tc.tokens_per_step
        t_start = t_log = time.perf_counter()
        tokens_at_log = self.tokens
        loss_sum = torch.tensor(float(loss_window[0]), device=self.device)
        loss_count = int(loss_window[1])
        end = min(tc.steps, tc.stop_at) if tc.stop_at else tc.steps
        while self.step < end:
            lr = lr_at(self.step, tc.steps, self.cfg.optim)
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
                    with autocast(self.device, self.amp_dtype):
                        logits = self.forward(input_ids=batch[:, :-1]).logits
                    loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
                    (loss / tc.grad_accum).backward()
                loss_sum += loss.detach()
                loss_count += 1
            if self.cfg.optim.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
            else:
                grad_norm = None
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            self.tokens += tokens_per_step
            is_last = self.step == end
            if self.step % tc.log_every == 0 or is_last:
                now = time.perf_counter()
                last_loss = self._mean_over_processes(loss_sum / loss_count)
                m = {
                    "step": self.step,
                    "start_step": self.start_step,
                    "loss": last_loss,
                    "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens": self.tokens,
                    "flops": self.tokens * self.flops_per_token,
                    "tokens_per_s": (self.tokens - tokens_at_log) / max(now - t_log, 1e-9),
                    "elapsed_s": wall_before + now - t_start,
                }
                if not math.isfinite(last_loss):
                    raise Diverged(
                        f"{self.run_dir}: loss is {last_loss} at step {self.step}; lower optim.lr?"
                    )
                for cb in callbacks:
                    cb.on_log(self, m)
                t_log, tokens_at_log = now, self.tokens
                loss_sum.zero_()
                loss_count = 0
            if (tc.ckpt_every and self.step % tc.ckpt_every == 0) or is_last:
                state = {
                    "step": self.step,
                    "start_step": self.start_step,
                    "loss_window": [self._mean_over_processes(loss_sum), loss_count],
                    "last_loss": last_loss,
                    "tokens": self.tokens,
                    "flops": self.tokens * self.flops_per_token,
                    "wall_s": wall_before + time.perf_counter() - t_start,
                    "scheduler": {"type": self.cfg.optim.schedule, "step": self.step},
                    "data": {"sampler": "random_windows", "next_step": self.step},
                    "config": self.cfg.to_dict(),
                }
                if lead:
                    path = save_checkpoint(ckpt_root, self.model, self.opt, state, tc.keep_checkpoints)
                    for cb in callbacks:
                        cb.on_checkpoint(self, path)
                self._barrier()

        if self.step < tc.steps:  # paused at stop_at: the newest checkpoint is the result
            for cb in callbacks:
                cb.on_train_end(self, {})
            self._finish_distributed()
            return {
                "stopped_at": self.step,
                "tokens": self.tokens,
                "flops": self.tokens * self.flops_per_token,
                "checkpoint": str(list_checkpoints(ckpt_root)[-1]),
            }
        if lead:
            self._save_final()
        summary = {
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
            "tokens_per_step": tokens_per_step,
            "final_loss": last_loss,
            "wall_s": wall_before + time.perf_counter() - t_start,
            "device": str(self.device),
            "precision": str(self.amp_dtype or torch.float32).replace("torch.", ""),
            "domains": self.sampler.domains,
            "processes": self.world,
            "resumed_from": self.resumed_from,
        }
        if lead:
            write_json_atomic(summary_path, summary)
        for cb in callbacks:
            cb.on_train_end(self, summary)
        self._finish_distributed()
        return summary

    # -- data parallel helpers ---------------------------------------------------------------
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
        """One trainer per run directory: a second one (an orphan of a killed job, a duplicate launch)
        is refused instead of interleaving checkpoints. The lock dies with the process."""
        import fcntl

        self._lock = open(self.run_dir / ".trainer.lock", "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Failed(f"{self.run_dir}: another trainer is running in this directory") from None

    def _finish_distributed(self) -> None:
        if getattr(self, "_lock", None) is not None:
            self._lock.close()
            self._lock = None
        self._barrier()
        if self._owns_group:
            torch.distributed.destroy_process_group()

    def _save_final(self) -> None:
        with staged_dir(self.run_dir / "model") as tmp:
            self.model.save_pretrained(str(tmp), safe_serialization=True)
            save_tokenizer(self.tokenizer, tmp)
            write_json_atomic(tmp / "elmforest_run.json", self.cfg.to_dict())


def freeze_except(model, pattern: str) -> int:
    """Train only the parameters whose name matches `pattern` (re.search); returns how many do."""
    pat = re.compile(pattern)
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(bool(pat.search(name)))
        n += p.numel() if p.requires_grad else 0
    if n == 0:
        names = [k for k, _ in model.named_parameters()][:4]
        raise UserError(f"train.trainable={pattern!r} matches no parameter (names look like {names})")
    return n


def _init_distributed(device: str) -> tuple[int, int, bool]:
    """(rank, world size, whether we created the process group), from torchrun's environment."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    owns = False
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return dist.get_rank(), dist.get_world_size(), owns


def train(
    cfg: RunConfig, run_dir: str | Path, progress: bool = True, callbacks: list[Callback] | None = None
) -> dict:
    return Trainer(cfg, Path(run_dir), callbacks or [], progress).fit()
