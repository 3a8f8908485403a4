"""Build a causal LM: a Llama from a preset, or any local Hugging Face checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from elmforest.config import ModelConfig
from elmforest.model.presets import get_preset
from elmforest.utils.errors import NotFound, UserError


def resolve_model_dir(path: str | Path) -> Path:
    """Accept a run directory (its `model/` holds the final checkpoint) or an HF checkpoint dir."""
    p = Path(path)
    if (p / "model" / "config.json").is_file():
        return p / "model"
    if (p / "config.json").is_file():
        return p
    raise NotFound(f"{p}: not a model checkpoint (no config.json) nor a run directory (no model/)")


def build_model(cfg: ModelConfig, vocab_size: int, eos_id: int, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised model, or the weights of `cfg.init_from`."""
    if cfg.init_from:
        return load_model(
            cfg.init_from,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
            vocab_size=vocab_size,
        )
    p = get_preset(cfg.preset)
    config = LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        **p.llama_kwargs(),
    )
    config._attn_implementation = cfg.attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def load_model(
    path: str | Path,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """Load a local checkpoint offline; refuse remote code unless asked, and check the vocabulary fits."""
    d = resolve_model_dir(path)
    raw = json.loads((d / "config.json").read_text())
    if raw.get("auto_map") and not trust_remote_code:
        raise UserError(
            f"{d}: checkpoint needs custom code (auto_map in config.json); "
            "pass trust_remote_code only if you trust it"
        )
    config = AutoConfig.from_pretrained(str(d), trust_remote_code=trust_remote_code, local_files_only=True)
    extra = {}
    if getattr(config, "num_local_experts", None) and not torch.cuda.is_available():
        # transformers picks grouped_mm for MoE experts; on CPU its per-token loop is 2x slower than
        # the eager per-expert loop (measured on cpu-small, bench/forest_inference.py)
        extra["experts_implementation"] = "eager"
    model = AutoModelForCausalLM.from_pretrained(
        str(d),
        config=config,
        trust_remote_code=trust_remote_code,
        local_files_only=True,
        dtype=dtype,
        attn_implementation=attn_implementation,
        **extra,
    )
    if vocab_size is not None and model.get_input_embeddings().num_embeddings < vocab_size:
        raise UserError(
            f"{d}: model has {model.get_input_embeddings().num_embeddings} embeddings but the "
            f"tokenizer has {vocab_size} tokens"
        )
    return model


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
