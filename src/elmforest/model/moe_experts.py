"""A faster CPU inference kernel for transformers' MoE expert layers (Mixtral, Qwen2-MoE, Qwen3-MoE,
PhiMoE, OLMoE, FlexOlmo), registered in transformers' `ExpertsInterface` as `sorted_loop`.

Why hand-written: of transformers' own kernels, `grouped_mm` (its default) and `batched_mm` are slower
than its `eager` loop on CPU (bench/moe_kernels.py), and `eager` works per expert: a `where` over a
one-hot mask, a gather of the hidden states, their cast by autocast, a gather of the routing weights
and a scatter-add. Here the (slot, token) pairs are sorted by expert once, the hidden states cast once
and gathered once, each expert's rows are a contiguous slice in eager's order, and one scatter-add
sums them back (per expert in bf16/fp16, where eager rounds after each). The same products are summed
in the same order as `eager`, so switching kernels changes no number (tests/test_moe_experts.py, on
1 and 2 threads), only the time: the merged MoE 0.93x-0.95x eager's end to end (docs/benchmarks.md).

Inference only: when autograd records through the experts (their weights or the hidden states
require grad: BTX, FlexOlmo owners), or with a layout other than the plain one (gate and up
concatenated, no biases, not transposed, no post-expert norm, no expert parallelism), it runs the
class's own `eager` forward. A router trained alone gets eager's gradients through this one. A
model loaded by `load_model` and pickled needs this module imported where it is unpickled.
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
    n_tokens = top_k_index.shape[0]
    # slot-major, as eager's torch.where(mask[e]) lists an expert's rows: a row's place in a GEMM can
    # change its result (MKL, fp32 on 2+ threads, fp64), so each expert sees its rows in eager's order
    flat = top_k_index.T.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=self.num_experts).tolist()
    token = order % n_tokens
    dev = hidden_states.device.type
    fp64 = hidden_states.dtype == torch.float64  # autocast leaves fp64 alone
    dtype = (
        torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and not fp64 else hidden_states.dtype
    )
    rows = hidden_states.to(dtype).index_select(0, token)
    out = torch.empty(rows.shape[0], hidden_states.shape[-1], dtype=dtype, device=hidden_states.device)
    parts, start = [], 0  # each expert's rows: one contiguous slice
    with torch.autocast(dev, enabled=False):  # the casts autocast would make, made explicitly above
        for e, n in enumerate(counts):
            if not n:
                continue
            part = slice(start, start + n)
            parts.append(part)
            start += n
            gate_up = torch.nn.functional.linear(rows[part], self.gate_up_proj[e].to(dtype))
            torch.mm(self._apply_gate(gate_up), self.down_proj[e].to(dtype).T, out=out[part])
    summed = torch.zeros_like(hidden_states)
    weighted = out * top_k_weights.T.reshape(-1)[order, None]  # type-promoted, as eager
    weighted = weighted.to(summed.dtype)
    if summed.dtype in (torch.float32, torch.float64):  # one scatter-add sums in eager's order
        return summed.index_add_(0, token, weighted)
    for part in parts:  # bf16/fp16: one index_add_ sums in fp32 and rounds once; eager rounds per expert
        summed.index_add_(0, token[part], weighted[part])
    return summed


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
