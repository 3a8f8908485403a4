"""Model presets as code: a Llama architecture plus the training defaults that suit it.

`tiny` is for tests, `cpu-small` is the quickstart default on a laptop CPU (its dense and expert LRs
come from a recorded `elmforest sweep` on the demo corpus, docs/benchmarks.md), `cpu-medium` a 4M
model for faster machines; the `btm-*` presets
match the sizes of the BTM paper (GPT-3-style widths/depths, 1024-token blocks, the paper's
optimiser recipe: Adam(0.9, 0.95), LR 5e-4, 8% warmup, weight decay 0.1, clip 0.1, linear decay).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass

from elmforest.config import ARCHITECTURE_FIELDS, ModelConfig, OptimConfig, RunConfig, TrainConfig
from elmforest.utils.errors import UserError


@dataclass(frozen=True)
class Preset:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int  # default size of a tokenizer trained for this preset
    seq_len: int
    tie_embeddings: bool
    optim: OptimConfig
    train: TrainConfig
    description: str = ""
    # The peak LR of the expert phase (experts see 1/k of the batch, so theirs may differ from the dense
    # run's optim.lr); None: the same. Set from a recorded `elmforest sweep` where the preset has one.
    expert_lr: float | None = None
    # The peak LR of the dense run's second half (the quickstart's dense_tuned row), from the recorded
    # sweep's continuation arm; None: not swept (the quickstart then takes the experts' LR).
    dense_continue_lr: float | None = None
    # The peak LR of BTX's fine-tuning of the merged MoE (merge finetune); None: the dense run's optim.lr.
    # Set from bench/moe_goals.py's sweep on the valid split where the preset has one.
    moe_finetune_lr: float | None = None

    def parameters(self) -> int:
        """The model's parameter count at this preset's vocabulary (Llama: attention, SwiGLU MLP and two
        RMSNorms per layer, a final norm, the embeddings, and the head when it is not tied to them)."""
        d, ff, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = 4 * d * d + 3 * d * ff + 2 * d  # (full attention: num_kv_heads == num_heads)
        return self.num_layers * per_layer + d + v * d * (1 if self.tie_embeddings else 2)

    def architecture(self) -> dict:
        """The ModelConfig architecture fields this preset fills (config.ARCHITECTURE_FIELDS)."""
        return dict(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_heads,
            max_position_embeddings=max(self.seq_len, 2048),
            tie_embeddings=self.tie_embeddings,
            rms_norm_eps=1e-5,
        )


_BTM_OPTIM = OptimConfig(
    lr=5e-4, min_lr_ratio=0.0, weight_decay=0.1, grad_clip=0.1, warmup_frac=0.08, schedule="linear"
)


def _btm(name: str, hidden: int, layers: int, heads: int, inter: int, steps: int, desc: str) -> Preset:
    return Preset(
        name,
        hidden,
        layers,
        heads,
        inter,
        vocab_size=50304,
        seq_len=1024,
        tie_embeddings=False,
        optim=_BTM_OPTIM,
        train=TrainConfig(
            steps=steps, batch_size=8, grad_accum=4, seq_len=1024, ckpt_every=1000, log_every=50
        ),
        description=desc,
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "tiny",
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            intermediate_size=128,
            vocab_size=512,
            seq_len=64,
            tie_embeddings=True,
            optim=OptimConfig(lr=3e-3, warmup_frac=0.1),
            train=TrainConfig(steps=40, batch_size=8, seq_len=64, ckpt_every=10, log_every=5),
            description="for tests",
        ),
        Preset(
            "cpu-small",
            hidden_size=128,
            num_layers=4,
            num_heads=4,
            intermediate_size=344,
            vocab_size=4096,
            seq_len=256,
            tie_embeddings=True,
            # dense, expert and dense-continuation LRs: `elmforest sweep --shards quickstart/shards --out sweep-cpu-small`
            # (5 points x2 apart each, chosen on the valid split; docs/benchmarks.md, docs/sweeps/)
            optim=OptimConfig(lr=2e-3, warmup_frac=0.05),
            train=TrainConfig(steps=256, batch_size=16, seq_len=256, ckpt_every=64, log_every=8),
            description="the quickstart default, sized for 15 minutes on 2 CPU "
            "cores (5-15 min in bf16 by the machine; fp32-only CPUs about 1.3x longer)",
            expert_lr=8e-3,
            # the dense run's second half: the same sweep's continuation arm (--arm continue, grid
            # 5e-4..3.2e-2 from the 2e-3 run's seed; 1.6e-2 2.4418 vs 8e-3 2.4436 mean valid BPB)
            dense_continue_lr=1.6e-2,
            # bench/moe_goals.py: 64 steps of 16 x 256, grid 1e-3..1.6e-2, best 4e-3 (docs/moe.md)
            moe_finetune_lr=4e-3,
        ),
        Preset(
            "cpu-medium",
            hidden_size=256,
            num_layers=4,
            num_heads=4,
            intermediate_size=688,
            vocab_size=4096,
            seq_len=256,
            tie_embeddings=True,
            optim=OptimConfig(lr=2e-3, warmup_frac=0.05),
            train=TrainConfig(steps=800, batch_size=16, seq_len=256, ckpt_every=100, log_every=10),
            description="the quickstart's model before the fair protocol; LR not swept",
        ),
        _btm("btm-125m", 768, 12, 12, 2048, 80_000, "BTM 125M (GPT-3 Small shape)"),
        _btm("btm-350m", 1024, 24, 16, 2816, 32_000, "BTM 350M (GPT-3 Medium shape)"),
        _btm("btm-750m", 1536, 24, 16, 4096, 24_000, "BTM 750M (GPT-3 Large shape)"),
        _btm("btm-1.3b", 2048, 24, 32, 5504, 12_000, "BTM 1.3B (GPT-3 XL shape)"),
    ]
}


DEFAULT_PRESET = "cpu-small"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def preset_run_config(name: str, shards: str = "") -> RunConfig:
    """A run config filled with the preset's defaults."""
    p = get_preset(name)
    # deep copies: a shallow one shared the preset's lists (trackers), so one caller's append was the next's
    cfg = RunConfig(optim=copy.deepcopy(p.optim), train=copy.deepcopy(p.train))
    cfg.model.preset = name
    fill_architecture(cfg.model)
    cfg.data.shards = shards
    return cfg


def build_run_config(
    preset: str | None = None,
    config_file: str | None = None,
    shards: str | None = None,
    init_from: str | None = None,
    trust_remote_code: bool = False,
    overrides: list[str] | tuple = (),
) -> RunConfig:
    """The run config a training command asks for: a saved run_config.json, else the preset's defaults;
    then the shards and starting checkpoint given, then `section.key=value` overrides. Remote code is
    on only when the caller (the command line) says so, never because a file does."""
    from pathlib import Path

    from elmforest.config import apply_overrides, keep_full_attention
    from elmforest.utils.io import read_json

    if config_file and Path(config_file).suffix.lower() in (".yaml", ".yml"):
        raise UserError(
            f"--config {config_file}: a run config is JSON (a run's run_config.json); YAML is read by `elmforest study`"
        )

    def from_file(d: dict) -> RunConfig:
        try:
            return RunConfig.from_dict(d)
        except UserError as e:  # the file is where the user must look
            raise UserError(f"--config {config_file}: {e}") from e

    if config_file and preset:  # the file's fields over the preset's: a partial file is completed by it
        base, top = preset_run_config(preset).to_dict(), read_json(config_file, unique_keys=True)
        given = top.get("model") if isinstance(top, dict) else None
        given = given if isinstance(given, dict) else {}
        if given.get("preset", preset) != preset:  # the file's label over --preset's model
            raise UserError(
                f"--config {config_file}: model.preset {given['preset']!r} with --preset {preset}: the "
                "preset's architecture fills the config, so the file's label would name another model; "
                "drop one of them"
            )
        layered = _layered(base, top)
        keep_full_attention(layered, base, {f"model.{k}" for k in given})  # as --set model.num_heads does
        cfg = from_file(layered)
    elif config_file:  # as given (runs started from it resume as they were), missing fields said
        top = read_json(config_file, unique_keys=True)  # a key given twice: json kept the last silently
        cfg = from_file(top)
        missing = [f"{s}.{k}" for s, v in cfg.to_dict().items() for k in v if k not in (top.get(s) or {})]
        if missing and any(not m.startswith("model.") for m in missing):
            print(
                f"note: {config_file} leaves out {len(missing)} field(s) (e.g. {', '.join(missing[:3])}): they "
                f"take elmforest's built-in defaults, not preset {cfg.model.preset}'s; add --preset "
                f"{cfg.model.preset} to complete it from the preset",
                file=sys.stderr,
            )
    else:
        cfg = preset_run_config(preset or DEFAULT_PRESET)
    if shards:
        cfg.data.shards = str(Path(shards).resolve())
    if init_from:
        cfg.model.init_from = str(Path(init_from).resolve())
    cfg.model.trust_remote_code = bool(trust_remote_code)
    cfg = apply_overrides(cfg, list(overrides))  # refuses model.preset (a label, not the model)
    if cfg.model.init_from:  # the checkpoint is the architecture: the preset's fields do not apply
        if given := [o.split("=", 1)[0].strip() for o in overrides if _architecture_key(o)]:
            raise UserError(
                f"{', '.join(given)}: a run from a checkpoint (--init-from / model.init_from) has the "
                "checkpoint's architecture; change it in the checkpoint, or train from a preset"
            )
        fill_architecture(cfg.model)
    return cfg


def _architecture_key(override: str) -> bool:
    key = override.split("=", 1)[0].strip()
    return key.startswith("model.") and key[len("model.") :] in ARCHITECTURE_FIELDS


def _layered(base: dict, top) -> dict:
    """`top`'s keys over `base`'s, section by section (a non-object `top` is left for from_dict to refuse)."""
    if not isinstance(top, dict):
        return top
    out = dict(base)
    for k, v in top.items():
        out[k] = _layered(base[k], v) if isinstance(base.get(k), dict) and isinstance(v, dict) else v
    return out


def fill_architecture(model: ModelConfig) -> ModelConfig:
    """Fill the architecture fields left unset from the preset (in place). A config made today is
    filled when it is made; one saved before the fields existed is filled from today's preset when
    read, which is what it always meant. A config that starts from a checkpoint (init_from) has its
    architecture in the checkpoint and keeps these unset (cleared, if a preset filled them first)."""
    if model.init_from:
        for k in ARCHITECTURE_FIELDS:
            setattr(model, k, None)
        return model
    if all(getattr(model, k) is not None for k in ARCHITECTURE_FIELDS):
        return model  # whole: a run is the model it was, whatever presets.py says (or drops) later
    arch = get_preset(model.preset).architecture()
    for k in ARCHITECTURE_FIELDS:
        if getattr(model, k) is None:
            setattr(model, k, arch[k])
    return model


def llama_kwargs(model: ModelConfig) -> dict:
    """transformers' LlamaConfig arguments of a (filled) ModelConfig."""
    m = fill_architecture(dataclasses.replace(model))
    return dict(
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=m.tie_embeddings,
        rms_norm_eps=m.rms_norm_eps,
    )
