"""A faster CPU inference kernel for transformers' MoE expert layers (Mixtral, Qwen2-MoE, PhiMoE,
OLMoE, FlexOlmo), registered in transformers' `ExpertsInterface` as `sorted_loop`.

Why hand-written: of transformers' own kernels, `grouped_mm` and `batched_mm` are 2x and 100x+ slower
than the `eager` loop on CPU (bench/moe_kernels.py), and `eager` spends a sixth of a layer's time
outside its matmuls: per expert a `where` over a one-hot mask, a gather of the fp32 hidden states,
an autocast cast of them, a gather of the routing weights and a scatter-add. Here the (token, slot)
pairs are sorted by expert once, the hidden states cast once and gathered once, each expert's rows
are a contiguous slice, and one scatter-add sums them back. It computes the same products in the same
order as `eager` (bit-identical outputs, tests/test_moe_experts.py), so switching kernels changes no
number, only the time.

Inference only: with autograd recording (training: BTX, FlexOlmo), or with a layout other than the
plain one (gate and up concatenated, no biases, not transposed, no post-expert norm, no expert
parallelism), it runs the class's own `eager` forward.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ExpertsInterface, _default_apply_gate

NAME = "sorted_loop"


def sorted_loop_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    if not _plain(self) or (torch.is_grad_enabled() and _records_grad(self, hidden_states)):
        return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)
    n_slots = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # stable: a token's slots stay in eager's order
    counts = torch.bincount(flat, minlength=self.num_experts).tolist()
    token = order // n_slots
    dev = hidden_states.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden_states.dtype
    rows = hidden_states.to(dtype).index_select(0, token)
    out = torch.empty(rows.shape[0], hidden_states.shape[-1], dtype=dtype, device=hidden_states.device)
    start = 0
    with torch.autocast(dev, enabled=False):  # the casts autocast would make, made explicitly above
        for e, n in enumerate(counts):
            if not n:
                continue
            part = slice(start, start + n)
            start += n
            gate_up = torch.nn.functional.linear(rows[part], self.gate_up_proj[e].to(dtype))
            torch.mm(self._apply_gate(gate_up), self.down_proj[e].to(dtype).T, out=out[part])
    summed = torch.zeros_like(hidden_states)
    weighted = out * top_k_weights.reshape(-1)[order, None]  # as eager: the product in the weights' dtype
    return summed.index_add_(0, token, weighted.to(summed.dtype))


def _plain(experts: torch.nn.Module) -> bool:
    return (
        getattr(experts, "has_gate", False)
        and not experts.has_bias
        and not experts.is_transposed
        and experts.is_concatenated
        and not experts.has_post_expert_norm
        and type(experts)._apply_gate is _default_apply_gate
        and not experts._is_expert_parallel  # (its sentinel expert ids are not routed here)
        and hasattr(type(experts).forward, "__wrapped__")
    )


def _records_grad(experts: torch.nn.Module, hidden_states: torch.Tensor) -> bool:
    return (
        hidden_states.requires_grad or experts.gate_up_proj.requires_grad or experts.down_proj.requires_grad
    )


ExpertsInterface.register(NAME, sorted_loop_experts_forward)
