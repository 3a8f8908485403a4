"""Learning-rate schedule as a pure function of the step (nothing to checkpoint but the step)."""

from __future__ import annotations

import math

from elmforest.config import OptimConfig
from elmforest.utils.errors import UserError


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    warmup = int(round(cfg.warmup_frac * total_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return min_lr + (cfg.lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - min_lr) * progress
    raise UserError(f"unknown schedule {cfg.schedule!r}; expected cosine, linear or constant")
