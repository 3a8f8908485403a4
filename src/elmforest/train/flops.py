"""Training compute, counted by what actually runs, so forests and dense baselines can be matched.

Per trained token (Kaplan et al. 2020; PaLM appendix B), each weight matrix W that takes part in a
multiply costs
- 2·|W| forward (for an MoE's experts only the routed share: |W| · top_k / n_experts);
- 2·|W| for the gradient of its input, when some trainable parameter lies *before* it (backward
  has to pass through it to reach that parameter);
- 2·|W| for its own weight gradient, when it trains.
A fully trained dense model therefore costs the familiar 6·N per token; a frozen matrix behind a
trainable one costs 4, a frozen matrix in front of every trainable one 2 (FlexOlmo's frozen
attention in layer 0, router-only training). N counts only matrices: not the input embedding table
(a lookup costs no multiply-adds; its gradient is a scatter), not norms or biases; the LM head is
counted even when tied to the input embedding.

The attention products (QKᵀ and the weighted sum of V: 4·T·d_attn per token and layer forward, over
the full context as PaLM counts them, causal masking not subtracted) cost twice as much again in
backward, where a trainable parameter lies at or before that layer's Q/K/V projections.

"Before" follows the forward order of the parameters, with the matrices that read the same input
(Q, K, V; gate and up; an MoE's router and its experts' gate/up) counted as siblings: a trainable
sibling does not make its siblings need an input gradient, and an MoE router's gradient reaches only
its routing weights (not its experts' inputs). The test suite checks these counts against torch's
FlopCounterMode, exactly, for dense and MoE models and several frozen/trainable splits.

Training FLOPs of a run = FLOPs per token × tokens trained (batch × accumulation × seq_len × steps).
"""

from __future__ import annotations

import re

import torch
from transformers import PreTrainedModel

FLOPS_FORMULA = (
    "per token: 2*W forward (MoE experts: W*top_k/n_experts) + 2*W input gradient (behind a trainable "
    "parameter) + 2*W weight gradient (trainable) per weight matrix W, input embedding excluded, tied "
    "LM head counted; plus 4*seq_len*d_attn per layer forward and 8*seq_len*d_attn backward (layers "
    "at or behind a trainable parameter); times tokens"
)

_LAYER = re.compile(r"\.(\d+)\.")
# matrices that read the same input as the one before them (their group's first member)
_SIBLING = re.compile(r"\.(k_proj|v_proj|up_proj|w3|experts\.gate_up_proj|experts\.\d+\.w1)(\.weight)?$")
_ROUTER = re.compile(r"\.mlp\.gate\.weight$")
_ATTN_IN = re.compile(r"(attn|attention)\.(q_proj|k_proj|v_proj|c_attn|query_key_value|qkv_proj|Wqkv)")
_QKV = re.compile(r"(?:attn|attention)\.([qkv])_proj\.")  # separate Q, K, V matrices (and their biases)


def _layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _moe_share(model: PreTrainedModel) -> float:
    c = model.config
    n = getattr(c, "num_local_experts", None) or getattr(
        c, "num_experts", None
    )  # Mixtral | Qwen-MoE, FlexOlmo
    k = getattr(c, "num_experts_per_tok", None)
    return k / n if n and k else 1.0


def flops_breakdown(model: PreTrainedModel, seq_len: int) -> dict:
    """Per-token training FLOPs of `model` as it is set up now (requires_grad marks what trains)."""
    c = model.config
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    share = _moe_share(model)
    # units in forward order: (name, active multiply-adds per token, trains, group id, layer)
    units: list[tuple[str, float, bool, int, int | None]] = [
        ("embed (lookup)", 0.0, emb.requires_grad, 0, None)
    ]
    group = 0
    layer_start: dict[int, int] = {}  # the first group of each layer
    trained_vecs: list[tuple[str, int | None]] = []  # trainable vectors (norms, biases) and their layer
    # every lookup table (a learned position embedding too: GPT-2's wpe, OPT's embed_positions) is read,
    # not multiplied; like the input embedding it costs nothing but needs the gradient of its output
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in model.named_parameters():
        layer = _layer_of(name)
        if p is emb:
            continue
        if id(p) in lookups:
            units.append((f"{name} (lookup)", 0.0, p.requires_grad, 0, None))
            continue
        if p.dim() < 2:  # no multiply, but a trainable norm needs the gradient of its output
            if p.requires_grad:
                trained_vecs.append((name, layer))
            continue
        if not _SIBLING.search(name):
            group += 1
        layer_start.setdefault(layer, group) if layer is not None else None
        active = p.numel() * (share if ".experts." in name else 1.0)
        units.append((name, active, p.requires_grad, group, layer))
    head_group = group + 1 if tied else group
    if tied:
        units.append(("lm_head (tied)", float(emb.numel()), emb.requires_grad, head_group, None))
    # a norm runs just before its layer's first matrix (the final norm just before the head)
    down_group = {layer: g for name, _, _, g, layer in units if name.endswith(".mlp.experts.down_proj")}
    starts = [
        # an MoE router's gradient reaches its routing weights, not its experts' inputs
        down_group.get(layer, g) if share < 1 and _ROUTER.search(name) else g
        for name, _, t, g, layer in units
        if t
    ] + [_vector_position(name, layer, units, layer_start, head_group) for name, layer in trained_vecs]
    first = min(starts) if starts else None

    forward = sum(2 * a for _, a, _, _, _ in units)
    input_grad = sum(2 * a for _, a, _, g, _ in units if first is not None and g > first)
    weight_grad = sum(2 * a for _, a, t, _, _ in units if t)

    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_layer = 4 * seq_len * c.num_attention_heads * head_dim
    attn_in_group: dict[int, int] = {}
    for name, _, _, g, layer in units:
        if layer is not None and _ATTN_IN.search(name):
            attn_in_group.setdefault(layer, g)
    layers = c.num_hidden_layers
    attn_fwd = per_layer * layers
    # backward through a layer's attention products when anything at or before its Q/K/V trains
    # (a layer whose Q/K/V are not recognised by name is assumed to need it)
    trains = {name for name, p in model.named_parameters() if p.requires_grad}

    def attn_backward(layer: int) -> float:
        if first is None or (layer in attn_in_group and first > attn_in_group[layer]):
            return 0.0
        if layer in attn_in_group and first == attn_in_group[layer]:
            # the first trained matrices are this layer's Q/K/V: only the products their gradients
            # need run (dV = P^T dO; dP = dO V^T for Q or K; then dQ, dK), each per_layer / 2
            own = {m.group(1) for n in trains if _layer_of(n) == layer and (m := _QKV.search(n))}
            if own and not any(
                _ATTN_IN.search(n) and not _QKV.search(n) for n in trains if _layer_of(n) == layer
            ):
                need = ("v" in own) + bool(own & {"q", "k"}) + ("q" in own) + ("k" in own)
                return per_layer / 2 * need
        return 2.0 * per_layer

    attn_bwd = sum(attn_backward(layer) for layer in range(layers))
    total = forward + input_grad + weight_grad + attn_fwd + attn_bwd
    return {
        "flops_per_token": int(round(total)),
        "forward": int(round(forward + attn_fwd)),
        "input_grad": int(round(input_grad + attn_bwd)),
        "weight_grad": int(round(weight_grad)),
        "matmul_params": int(round(sum(a for _, a, _, _, _ in units))),
        "trainable_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "moe_active_share": share,
    }


def _vector_position(name: str, layer, units, layer_start: dict, head_group: int) -> float:
    """Where a trainable vector sits in forward order, in groups: its gradient needs the input
    gradient of every group after it. A bias is the output of its own matrix (G); a norm feeds the
    next matrix (G - 0.5): the attention's first for input_layernorm, the MLP's (or MoE router's)
    first for post_attention_layernorm, the head for the final norm. Unknown vectors are placed at
    their layer's start, which never undercounts."""
    if name.endswith(".bias"):
        weight = name[: -len("bias")] + "weight"
        for n, _, _, g, _ in units:
            if n == weight:
                return g
    if layer is None:
        return head_group - 0.5
    if "post_attention_layernorm" in name:
        prefix = f"layers.{layer}."
        for n, _, _, g, _ in units:
            if prefix in n and (".mlp." in n or ".block_sparse_moe." in n):
                return g - 0.5
    return layer_start.get(layer, head_group) - 0.5


def matmul_params(model: PreTrainedModel) -> int:
    """Weights that take part in a multiply per token (an MoE's routed share of its experts)."""
    return flops_breakdown(model, 1)["matmul_params"]


def flops_per_token(model: PreTrainedModel, seq_len: int) -> int:
    return flops_breakdown(model, seq_len)["flops_per_token"]
