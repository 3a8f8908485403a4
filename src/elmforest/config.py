"""The typed config tree of a training run, saved as JSON beside every checkpoint.

Plain dataclasses: `to_dict`/`from_dict` round-trip through JSON, unknown keys are errors, and
`apply_overrides` takes dotted `key=value` strings (`train.steps=200`) so the CLI needs no flag
per field.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    preset: str = "cpu-small"
    init_from: str | None = None  # a local HF causal-LM checkpoint directory; overrides the preset's weights
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"


@dataclass
class DataConfig:
    shards: str = ""
    domains: list[str] | None = None  # None: every domain in the shards
    mixture: str = "tokens"  # tokens: sample domains in proportion to their size | uniform
    split: str = "train"


@dataclass
class OptimConfig:
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # final LR = lr * min_lr_ratio
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_frac: float = 0.08
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    precision: str = "auto"  # auto (bf16 where supported) | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    compile: bool = False

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return from_dict(cls, d)


def from_dict(cls, d: dict, where: str = ""):
    if not isinstance(d, dict):
        raise ValueError(f"config{where}: expected an object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"config{where}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        t = hints[k]
        kwargs[k] = (
            from_dict(t, v, f"{where}.{k}") if dataclasses.is_dataclass(t) else _coerce(t, v, f"{where}.{k}")
        )
    return cls(**kwargs)


def _coerce(t, v, where: str):
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        if v is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, v, where)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"config{where}: {v!r} does not fit {t}")
    if origin is list:
        if not isinstance(v, list):
            raise ValueError(f"config{where}: expected a list, got {v!r}")
        (a,) = typing.get_args(t)
        return [_coerce(a, x, where) for x in v]
    if t is bool:
        if isinstance(v, bool):
            return v
        raise ValueError(f"config{where}: expected true/false, got {v!r}")
    if t is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        raise ValueError(f"config{where}: expected an integer, got {v!r}")
    if t is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        raise ValueError(f"config{where}: expected a number, got {v!r}")
    if t is str:
        if isinstance(v, str):
            return v
        raise ValueError(f"config{where}: expected a string, got {v!r}")
    return v


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.key=value` strings; values parse as JSON, else as plain strings."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = d
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"override {item!r}: unknown section {p!r}")
            node = node[p]
        if parts[-1] not in node:
            raise ValueError(f"override {item!r}: unknown key {key!r}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node[parts[-1]] = value
    return RunConfig.from_dict(d)
