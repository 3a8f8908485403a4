"""The Hugging Face MoE formats a forest merges into: one per dense architecture whose MoE counterpart in
transformers computes exactly the dense layer with its MLP replaced by routed experts.

A merge is only sound when the MoE model runs each expert's MLP on the same input it saw in training
(the same norms, in the same place) and everything else is the dense model's computation. So the format
follows from the experts' architecture rather than from a choice: Llama/Mistral (pre-norm, SwiGLU, no
biases) -> Mixtral; Qwen2 (biased q/k/v) -> Qwen2-MoE with its shared expert sized 0; Qwen3 (per-head
q/k norms) -> Qwen3-MoE; OLMo-2 (norms after each sublayer, q/k norms) -> FlexOlmo. Every format routes
with softmax -> top-k -> renormalised weights (Mixtral's rule; `norm_topk_prob` set where it is a choice).
Architectures with no such counterpart are refused with the reason and what to do instead (BLOCKED).

Tensors use the per-expert names transformers' own `save_pretrained` writes for each format (and its
loaders fuse on load), checked by a round trip in tests/test_moe_formats.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from elmforest.utils.errors import UserError

# fields of a dense config that mean the same in its MoE counterpart
COMMON = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "rope_theta",  # configs written by transformers 4.x: the MoE configs convert these two
    "rope_scaling",
    "attention_dropout",
)
PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MoeFormat:
    model_type: str
    architecture: str
    dense: tuple[str, ...]  # the dense model types it holds
    expert: str  # tensor name of expert e's projection p in layer l: {l}, {e}, {p}
    router: str  # the router's [experts, hidden] weight in layer l: {l}
    fields: tuple[str, ...]  # dense config fields copied besides COMMON
    moe_fields: Callable[[dict, int, int], dict]  # (dense config, experts, top-k) -> MoE fields
    proj: dict[str, str] | None = None  # dense projection name -> the format's (None: the same)
    extra: Callable[[dict, torch.dtype], Iterator[tuple[str, torch.Tensor]]] | None = None

    def expert_name(self, layer: int, expert: int, proj: str) -> str:
        return self.expert.format(l=layer, e=expert, p=(self.proj or {}).get(proj, proj))

    def router_name(self, layer: int) -> str:
        return self.router.format(l=layer)

    def config(self, dense: dict, n_experts: int, top_k: int) -> dict:
        """The MoE config equivalent to `dense` with its MLP replaced by n experts."""
        cfg = {k: dense[k] for k in (*COMMON, *self.fields) if k in dense}
        if "rope_parameters" not in cfg and "rope_theta" not in cfg:
            cfg["rope_theta"] = 10000.0  # the dense default (Llama's), not the MoE's
        cfg.update(self.moe_fields(dense, n_experts, top_k))
        cfg.update(model_type=self.model_type, architectures=[self.architecture], output_router_logits=False)
        return cfg


def _mixtral(dense: dict, n: int, k: int) -> dict:
    return {"num_local_experts": n, "num_experts_per_tok": k, "router_jitter_noise": 0.0}


def _routed(dense: dict, n: int, k: int) -> dict:  # Qwen3-MoE, FlexOlmo: experts as wide as the MLP
    return {
        "num_experts": n,
        "num_experts_per_tok": k,
        "norm_topk_prob": True,
        "intermediate_size": dense["intermediate_size"],
    }


def _qwen2_moe(dense: dict, n: int, k: int) -> dict:
    return {
        **_routed(dense, n, k),
        "moe_intermediate_size": dense["intermediate_size"],
        "shared_expert_intermediate_size": 0,  # no shared expert: its output is exactly 0
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "qkv_bias": True,  # Qwen2's q/k/v always carry biases
    }


def _qwen3_moe(dense: dict, n: int, k: int) -> dict:
    return {
        **_routed(dense, n, k),
        "moe_intermediate_size": dense["intermediate_size"],
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


def _no_shared_expert(cfg: dict, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Qwen2-MoE's shared expert at width 0 (its gate too, zeros): it adds exactly nothing."""
    H = cfg["hidden_size"]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp."
        yield p + "shared_expert.gate_proj.weight", torch.zeros(0, H, dtype=dtype)
        yield p + "shared_expert.up_proj.weight", torch.zeros(0, H, dtype=dtype)
        yield p + "shared_expert.down_proj.weight", torch.zeros(H, 0, dtype=dtype)
        yield p + "shared_expert_gate.weight", torch.zeros(1, H, dtype=dtype)


_ROUTED = "model.layers.{l}.mlp.experts.{e}.{p}.weight"
_GATE = "model.layers.{l}.mlp.gate.weight"
FORMATS = {
    "mixtral": MoeFormat(
        "mixtral",
        "MixtralForCausalLM",
        ("llama", "mistral"),
        "model.layers.{l}.block_sparse_moe.experts.{e}.{p}.weight",
        "model.layers.{l}.block_sparse_moe.gate.weight",
        ("sliding_window",),
        _mixtral,
        proj={"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
    ),
    "qwen2_moe": MoeFormat(
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        ("qwen2",),
        _ROUTED,
        _GATE,
        ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
        _qwen2_moe,
        extra=_no_shared_expert,
    ),
    "qwen3_moe": MoeFormat(
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        ("qwen3",),
        _ROUTED,
        _GATE,
        ("attention_bias", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
        _qwen3_moe,
    ),
    "flex_olmo": MoeFormat(
        "flex_olmo",
        "FlexOlmoForCausalLM",
        ("olmo2",),
        _ROUTED,
        _GATE,
        ("attention_bias",),
        _routed,
    ),
}

_INSTEAD = (
    "merge the experts by parameter averaging (`elmforest forest average`), or keep them as a forest "
    "(`elmforest eval --forest`, the ensemble)"
)
BLOCKED = {
    "gpt2": "GPT-2 has learned position embeddings, LayerNorm and a biased GELU MLP, and transformers has no "
    "MoE model built from GPT-2 layers",
    "opt": "OPT has learned position embeddings, LayerNorm and a biased ReLU MLP, and transformers has no "
    "MoE model built from OPT layers",
    "gemma": "Gemma's gated-GELU MLP, (1 + w) RMSNorm and scaled embeddings have no MoE counterpart in "
    "transformers",
    "gemma2": "Gemma-2's layers (sandwich norms, logit soft-capping, gated-GELU MLP) have no MoE "
    "counterpart in transformers",
    **dict.fromkeys(
        ("gemma3", "gemma3_text"),
        "Gemma-3's layers (sandwich norms, q/k norms, gated-GELU MLP) have no MoE counterpart in transformers",
    ),
    "phi3": "PhiMoE, Phi-3's MoE sibling, uses LayerNorm with biases where Phi-3 uses RMSNorm and routes "
    "with SparseMixer, so no PhiMoE model computes a Phi-3 layer",
    "olmo": "OLMo-1's non-parametric LayerNorm has no MoE counterpart (OLMoE uses RMSNorm with weights and "
    "q/k norms)",
}


def supported() -> str:
    return ", ".join(f"{'/'.join(f.dense)} -> {f.model_type}" for f in FORMATS.values())


def format_for(dense: dict) -> MoeFormat:
    """The MoE format of a dense config, or a UserError saying what blocks it and what to do instead."""
    mt = dense.get("model_type")
    fmt = next((f for f in FORMATS.values() if mt in f.dense), None)
    if fmt is None:
        why = BLOCKED.get(mt, f"no MoE format for {mt!r} models is known")
        raise UserError(
            f"cannot merge {mt!r} experts into one MoE: {why}. Instead, {_INSTEAD}. Supported: {supported()}"
        )
    if fmt.model_type in ("qwen2_moe", "qwen3_moe") and dense.get("use_sliding_window"):
        raise UserError(
            f"cannot merge into {fmt.model_type}: the experts use a sliding window on some layers "
            f"(use_sliding_window with max_window_layers), and {fmt.model_type} places its windows by "
            f"another rule, so the merged model would attend differently. Instead, {_INSTEAD}"
        )
    if dense.get("mlp_bias"):
        raise UserError(
            f"cannot merge into {fmt.model_type}: the experts' MLPs have biases (mlp_bias=True). Instead, {_INSTEAD}"
        )
    if fmt.model_type == "mixtral" and dense.get("attention_bias"):
        raise UserError(
            "cannot merge into mixtral: the experts have attention_bias=True (Mixtral's attention has no "
            f"biases). Instead, {_INSTEAD}"
        )
    if dense.get("hidden_act", "silu") != "silu":
        raise UserError(
            f"cannot merge into {fmt.model_type}: hidden_act {dense.get('hidden_act')!r} (its experts are "
            f"SwiGLU: silu). Instead, {_INSTEAD}"
        )
    return fmt
