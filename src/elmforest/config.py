"""The typed config tree of a training run, saved as JSON beside every checkpoint.

Plain dataclasses: `to_dict`/`from_dict` round-trip through JSON, unknown keys are errors, and
`apply_overrides` takes dotted `key=value` strings (`train.steps=200`) so the CLI needs no flag
per field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from elmforest.utils.errors import UserError
from elmforest.utils.typed import from_dict, split_quoted

# The fields of ModelConfig that shape a freshly built model (a Llama). A run config stores them all,
# so a run resumes, exports and branches as the model it was, whatever presets.py says later; a
# preset only fills them when a config is made (model/presets.py `fill_architecture`).
ARCHITECTURE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "max_position_embeddings",
    "tie_embeddings",
    "rms_norm_eps",
)


# batches of valid windows BTM's cached prior averages over unless told (docs/btm.md, "Cached prior"):
# one default for every verb, the quickstart and the study, so a forest scored two ways has one prior
PRIOR_BATCHES = 20


@dataclass
class ModelConfig:
    preset: str = "cpu-small"
    init_from: str | None = None  # a local HF causal-LM checkpoint directory; overrides the preset's weights
    # the architecture (None: the preset's, filled when a config is made; unused with init_from)
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    max_position_embeddings: int | None = None
    tie_embeddings: bool | None = None
    rms_norm_eps: float | None = None
    # Only the command line (--trust-remote-code) turns this on: reading a config from any file (a
    # --config, a run's run_config.json, a forest manifest) sets it False (RunConfig.from_dict).
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"

    def architecture_problems(self) -> list[str]:
        """What transformers would refuse with a traceback, or fail on mid-forward (kv heads that do not
        divide the heads), said as config errors."""
        sizes = [k for k in ARCHITECTURE_FIELDS if k not in ("tie_embeddings", "rms_norm_eps")]
        bad = [
            f"model.{k} must be >= 1" for k in sizes if getattr(self, k) is not None and getattr(self, k) < 1
        ]
        if bad:
            return bad
        h, nh, kv = self.hidden_size, self.num_heads, self.num_kv_heads
        if h and nh and h % nh:
            bad.append(f"model.hidden_size={h} must be a multiple of model.num_heads={nh}")
        elif h and nh and (h // nh) % 2:
            bad.append(f"model.hidden_size / model.num_heads = {h // nh} must be even (rotary embeddings)")
        if nh and kv and nh % kv:
            bad.append(f"model.num_heads={nh} must be a multiple of model.num_kv_heads={kv}")
        if self.rms_norm_eps is not None and not self.rms_norm_eps > 0:
            bad.append("model.rms_norm_eps must be > 0")
        return bad


# what transformers' attention dispatch knows (another is a traceback deep inside build_model)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


@dataclass
class DataConfig:
    shards: str = ""
    domains: list[str] | None = None  # None: every domain in the shards
    # uniform: every domain equally likely (BTM's seed and dense runs; experts get 1/k of the budget each,
    # and the comparison is a macro average over domains) | tokens: in proportion to each domain's size
    mixture: str = "uniform"
    split: str = "train"
    # the order the shards' training documents must be in (source | random | dedup | icp; elmforest shards
    # build --order): a run is refused on shards in another order. None: whatever the shards hold
    order: str | None = None


@dataclass
class OptimConfig:
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio (its last step: one short of it)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_frac: float = 0.08  # of the steps, in [0, 1), rounded half to even (0.05 x 50 = 2 steps)
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)


TRACKERS = ("tensorboard", "wandb", "mlflow")  # train.trackers' choices (train/tracking.py)


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
    # the newest kept while training (at least 1, to resume); 0: one, deleted once the run has finished
    # (a finished run is judged by its model and summary.json; each checkpoint is ~3x the model)
    keep_checkpoints: int = 2
    log_every: int = 10
    # the validation loss (metrics.jsonl `valid_loss`): every this many steps (None: at each
    # checkpoint; 0: never), on this many fixed windows of the valid split
    valid_every: int | None = None
    valid_windows: int = 32
    compile: bool = False  # torch.compile the loss (forward + cross-entropy; backward through AOTAutograd)
    fused_optimizer: bool = False  # AdamW's fused kernel (docs/benchmarks.md, trainer throughput)
    # A trainer checkpoint (…/checkpoints/step-N) of another run to continue from: its weights, optimizer
    # state and step (so the LR schedule continues), while data and batch size may differ (BTM branching).
    init_checkpoint: str | None = None
    stop_at: int | None = None  # pause here (checkpoint, no final model); run again without it to finish
    # Regex over parameter names: only matching parameters train, the rest stay frozen. FlexOlmo-style
    # experts train only their MLPs ('\.mlp\.'), so a merged MoE's shared weights are the seed's exactly;
    # router-only training of a merged MoE uses '\.mlp\.gate\.weight$'.
    trainable: str | None = None
    # An MoE's router losses (BTX fine-tuning of a merged model): the Switch load-balancing loss
    # (Fedus et al.; transformers' load_balancing_loss_func) and the router z-loss (Zoph et al.: the
    # mean squared log-sum-exp of the router logits), each times its coefficient, added to the LM loss.
    router_aux_loss: float = 0.0
    router_z_loss: float = 0.0
    # An MoE's experts kept bit-identical while the rest trains (FlexOlmo: the public expert beside the
    # owner's), with their router rows (train/frozen_experts.py)
    frozen_experts: list[int] = field(default_factory=list)
    # Where metrics go besides metrics.jsonl (train/tracking.py): any of TRACKERS; [] for none
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])

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
        """A config read from JSON. Remote code stays off whatever the file says: a forest or a
        checkpoint from someone else must never be able to run its Python on this machine."""
        cfg = from_dict(cls, d)
        cfg.model.trust_remote_code = False
        cfg.validate()
        return cfg

    def check_pause(self) -> None:
        """A pause past the end is refused when a run is about to train (the run would finish where a
        pause was asked), not when a config is read: a run saved by an older version with such a
        stop_at finished, and its config must still load to be resumed or extended."""
        t = self.train
        if t.stop_at is not None and t.stop_at > t.steps:
            raise UserError(
                f"train.stop_at={t.stop_at} is past train.steps={t.steps}: the run would finish, not pause "
                "(drop stop_at, or give a step before the end)"
            )

    def validate(self) -> None:
        """Catch values that would only fail (or silently misbehave) deep inside training."""
        t, o = self.train, self.optim
        checks = [
            (t.steps >= 1, "train.steps must be >= 1"),
            (
                t.batch_size >= 1 and t.grad_accum >= 1 and t.seq_len >= 1,
                "train.batch_size, train.grad_accum and train.seq_len must be >= 1",
            ),
            (t.log_every >= 1, "train.log_every must be >= 1"),
            (
                (t.valid_every is None or t.valid_every >= 0) and t.valid_windows >= 0,
                "train.valid_every and train.valid_windows must be >= 0",
            ),
            (
                t.ckpt_every >= 0 and t.keep_checkpoints >= 0,
                "train.ckpt_every must be >= 0, keep_checkpoints >= 0",
            ),
            (t.stop_at is None or t.stop_at >= 1, "train.stop_at must be >= 1"),
            (0 <= t.seed < 2**64, "train.seed must be in [0, 2**64)"),  # torch's and numpy's seeds
            (
                self.data.domains is None or len(set(self.data.domains)) == len(self.data.domains),
                "data.domains must name each domain once (a domain named twice would take two shares of "
                "the mixture)",
            ),
            (
                t.router_aux_loss >= 0 and t.router_z_loss >= 0,
                "train.router_aux_loss and train.router_z_loss must be >= 0",
            ),
            (t.precision in ("auto", "bf16", "fp32"), "train.precision must be auto, bf16 or fp32"),
            (
                self.model.attn_implementation in ATTN_IMPLEMENTATIONS,
                f"model.attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}",
            ),
            (
                re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None,
                "train.device must be auto, cpu, cuda or cuda:N",
            ),
            (math.isfinite(o.lr) and o.lr > 0, "optim.lr must be a positive number"),
            (0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]"),
            (0 <= o.warmup_frac < 1, "optim.warmup_frac must be in [0, 1)"),
            (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1 and o.eps > 0, "optim betas must be in [0, 1), eps > 0"),
            (o.weight_decay >= 0 and o.grad_clip >= 0, "optim.weight_decay and optim.grad_clip must be >= 0"),
            (
                o.schedule in ("cosine", "linear", "constant"),
                "optim.schedule must be cosine, linear or constant",
            ),
            (self.data.mixture in ("tokens", "uniform"), "data.mixture must be tokens or uniform"),
            (self.data.split in ("train", "valid", "test"), "data.split must be train, valid or test"),
            (
                self.data.order in (None, "source", "random", "dedup", "icp"),
                "data.order must be source, random, dedup, icp or null (whatever the shards hold)",
            ),
        ]
        bad = [msg for ok, msg in checks if not ok]
        # every float a finite number float32 can hold: an infinite eps or rms_norm_eps trained nothing
        # without a word, an lr of 1e39 failed in the first step after the run folder was written
        huge = [
            f"{section}.{f.name}"
            for section, part in (("model", self.model), ("optim", o), ("train", t), ("data", self.data))
            for f in dataclasses.fields(part)
            if isinstance(v := getattr(part, f.name), float)
            and not (math.isfinite(v) and abs(v) <= FLOAT32_MAX)
        ]
        if huge:
            bad.append(f"{', '.join(huge)}: expected a finite number of at most {FLOAT32_MAX:.3g} in size")
        # every other integer fits an int64, as torch holds it: steps of 1e26 overflowed deep in a run
        vast = [
            f"{section}.{f.name}"
            for section, part in (("model", self.model), ("optim", o), ("train", t), ("data", self.data))
            for f in dataclasses.fields(part)
            if (section, f.name) != ("train", "seed")
            and isinstance(v := getattr(part, f.name), int)
            and not isinstance(v, bool)
            and abs(v) >= 2**63
        ]
        if vast:
            bad.append(f"{', '.join(vast)}: expected an integer below 2**63")
        bad += self.model.architecture_problems()
        if unknown := [x for x in t.trackers if x not in TRACKERS]:
            bad.append(f"train.trackers: unknown {unknown}; known: {list(TRACKERS)}")
        elif twice := sorted({x for x in t.trackers if t.trackers.count(x) > 1}):
            bad.append(f"train.trackers: {twice} named twice")
        if t.trainable is not None:
            try:
                re.compile(t.trainable)
            except re.error as e:
                bad.append(f"train.trainable is not a valid regex ({e})")
        if bad:
            raise UserError("invalid config: " + "; ".join(bad))


FLOAT32_MAX = 3.4028234663852886e38


def _annotation(parts: list[str]) -> str | None:
    """The annotation of a config field (e.g. 'list[str] | None', 'str | None'), else None."""
    cls: Any = RunConfig
    for p in parts:
        ann = {f.name: f.type for f in dataclasses.fields(cls)}.get(p)
        cls = globals().get(ann, ann) if isinstance(ann, str) else ann
        if cls is None:
            return None
        if not dataclasses.is_dataclass(cls):
            return str(ann)
    return None


def _list_field(parts: list[str]) -> str | None:
    """The annotation of a list-typed config field, else None."""
    ann = _annotation(parts)
    return ann if ann and ann.startswith("list[") else None


def _bare_list(raw: str, ann: str) -> list:
    """`[a, b]` for a list field: bare (or quoted) names; numbers where the list holds numbers. A
    quoted name keeps its commas (`['a,b', c]`: two names, not three)."""
    items = split_quoted(raw.strip()[1:-1])
    if ann.startswith("list[str]"):
        return items
    out = []
    for x in items:
        try:
            out.append(json.loads(x))
        except json.JSONDecodeError:
            out.append(x)
    return out


UNKEPT = "train.keep_checkpoints=0"  # the sweeps', studies' and quickstart's runs: docs/design.md


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.key=value` strings; values parse as JSON, else as plain strings. A whole section
    is refused: every check of what an override sets reads its dotted key."""
    d = cfg.to_dict()
    given = cfg.to_dict()  # the types before any override: a bad value given earlier must not set them
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        if key.strip() == "model.preset":  # every caller: the CLI's, a study's overrides, the quickstart's
            raise UserError(
                "model.preset: choose the preset with --preset NAME (a study's `preset`): its architecture "
                "is filled in when the config is made, so setting model.preset would change its label and "
                "not its model"
            )
        parts = key.strip().split(".")
        node = d
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise UserError(f"override {item!r}: unknown section {p!r}")
            node = node[p]
        if parts[-1] not in node:
            raise UserError(f"override {item!r}: unknown key {key!r}")
        if isinstance(node[parts[-1]], dict):
            # a whole section (`data={...}`) set its other fields to their defaults, and went round every
            # check that reads the keys given (an expert's data, the quickstart's shards, the study's own)
            raise UserError(
                f"override {item!r}: {key.strip()} is a section; set its fields one by one "
                f"({key.strip()}.KEY=VALUE)"
            )
        if key.strip() == "model.trust_remote_code":
            raise UserError(f"override {item!r}: remote code is turned on by --trust-remote-code only")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
            ann = _list_field(parts)
            if ann and raw.strip().startswith("[") and raw.strip().endswith("]"):
                value = _bare_list(raw, ann)
        if isinstance(value, list) and str(_list_field(parts)).startswith("list[str]"):
            value = [x if isinstance(x, str) else json.dumps(x) for x in value]  # [2023, 2024]: names
        was = given
        for p in parts:
            was = was[p]
        ann = _annotation(parts) or ""
        text = isinstance(was, str) or (was is None and "str" in ann and not ann.startswith("list["))
        if text and not isinstance(value, str) and value is not None:
            value = raw  # a path or name that happens to look like a number
        if (
            key.strip() == "data.domains"
            and isinstance(value, list)
            and (not value or len(set(value)) < len(value))
        ):
            # a saved config may hold [] (every domain, as null): only a new --set is refused
            raise UserError(
                f"invalid config: {item}: data.domains must name each domain once (null: every domain)"
            )
        node[parts[-1]] = value
    keep_full_attention(d, given, {i.split("=", 1)[0].strip() for i in overrides})
    out = RunConfig.from_dict(d)
    out.model.trust_remote_code = cfg.model.trust_remote_code  # set by the command line, kept
    return out


def keep_full_attention(d: dict, given: dict, keys: set[str]) -> None:
    """A preset fills num_kv_heads from its num_heads: a new num_heads alone kept the old count and made
    a grouped-query model without a word (or was refused for a num_kv_heads never set). Full attention
    stays full unless num_kv_heads is given too."""
    was = given.get("model") or {}
    if (
        "model.num_heads" in keys
        and "model.num_kv_heads" not in keys
        and was.get("num_kv_heads") == was.get("num_heads")
    ):
        d["model"]["num_kv_heads"] = d["model"]["num_heads"]


def override_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    """Every `section.key` that --set accepts, with its type and default, from the dataclass tree itself
    (so the help of a training verb can never fall behind the config)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out += override_keys(t, f"{prefix}{f.name}.")
            continue
        if f.name == "trust_remote_code" or prefix == "model." and f.name == "preset":
            continue  # --trust-remote-code only; --preset only (--set model.preset is refused)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = str(t).replace("typing.", "").replace("<class '", "").replace("'>", "")
        out.append(f"{prefix}{f.name}: {kind} = {json.dumps(default)}")
    return out
