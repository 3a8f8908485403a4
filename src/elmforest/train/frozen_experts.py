"""Experts of an MoE kept exactly as they are while the others train (FlexOlmo: each data owner trains
its own expert beside a frozen copy of the public one).

transformers 5 holds an MoE layer's experts as one tensor per projection with the expert index first
(`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) and its router as
`mlp.gate.weight` [E, H], so `requires_grad` cannot freeze one expert. Here the frozen experts' slices
get a zero gradient (a tensor hook, so gradient clipping never sees them) and are copied back after
every optimizer step, which also undoes AdamW's decoupled weight decay: they stay bit-identical. Their
weight gradients are still computed (autograd produces the whole tensor's), and the FLOPs ledger counts
them, because they run.
"""

from __future__ import annotations

import torch

from elmforest.utils.errors import UserError


def expert_params(model, n_experts: int) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters that hold one slice per expert along their first dimension."""
    out = []
    for name, p in model.named_parameters():
        per_expert = ".mlp.experts." in name or name.endswith(".mlp.gate.weight")
        if per_expert and p.requires_grad and p.dim() >= 2 and p.shape[0] == n_experts:
            out.append((name, p))
    return out


class FrozenExperts:
    def __init__(self, model, indices: list[int]):
        from elmforest.train.moe_loss import moe_shape

        n, _ = moe_shape(model.config, "train.frozen_experts")
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise UserError(f"train.frozen_experts {bad}: the model has experts 0..{n - 1}")
        self.idx = torch.tensor(sorted(set(indices)))
        self.params = expert_params(model, n)
        if not self.params:
            raise UserError(
                "train.frozen_experts: no trainable per-expert parameter (train.trainable must let the "
                "experts or the router train)"
            )
        self.saved = [p.detach()[self.idx].clone() for _, p in self.params]
        mask = torch.ones(n)
        mask[self.idx] = 0
        for _, p in self.params:
            m = mask.to(p.device, p.dtype).view(-1, *([1] * (p.dim() - 1)))
            p.register_hook(lambda g, m=m: g * m)

    @torch.no_grad()
    def restore(self) -> None:
        for (_, p), s in zip(self.params, self.saved, strict=True):
            p[self.idx.to(p.device)] = s

    def names(self) -> list[str]:
        return [n for n, _ in self.params]
