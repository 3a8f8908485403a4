"""What experts of one forest must share: the tokenizer and the architecture, each as a short
fingerprint recorded in forest.json and compared whenever an expert or a seed lands."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from elmforest.data.tokenizer import load_tokenizer
from elmforest.model.build import read_config, read_config_as_transformers, resolve_model_dir

# Config keys that do not change what the weights compute.
_NON_ARCH_KEYS = {
    "transformers_version",
    "architectures",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "_attn_implementation",
    "_attn_implementation_autoset",
}


def architecture_config(model_dir: str | Path, raw: bool = False) -> dict:
    """The config keys that decide what the weights compute, as transformers reads them (a config
    written by transformers 4.x, `rope_theta` and no `head_dim`, and its 5.x rewrite are one
    architecture); the file's own keys when transformers cannot read it without remote code, or `raw`."""
    d = resolve_model_dir(model_dir)
    cfg = read_config(d) if raw else read_config_as_transformers(d)
    return {k: v for k, v in cfg.items() if k not in _NON_ARCH_KEYS}


def architecture_fingerprint(model_dir: str | Path, raw: bool = False) -> str:
    """`raw`: of the file's own keys, as forests written before the normalised fingerprint recorded."""
    arch = architecture_config(model_dir, raw)
    return hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_difference(a: dict, b: dict, most: int = 6) -> str:
    """The keys two architecture configs disagree on, with both values, for an error a person can act on."""
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "(absent)") != b.get(k, "(absent)"))
    shown = [f"{k}: {a.get(k, '(absent)')!r} vs {b.get(k, '(absent)')!r}" for k in keys[:most]]
    return "; ".join(shown) + (f"; and {len(keys) - most} more" if len(keys) > most else "")


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    return load_tokenizer(resolve_model_dir(model_dir)).fingerprint()
