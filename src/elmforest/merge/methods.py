"""Per-tensor merge methods, registered by name.

Each method maps one tensor of every expert, their normalised weights and the base model's tensor
(the seed; needed by the task-vector methods) to the merged tensor. The experts' tensors come as a
lazy iterable of float32 tensors, read from disk one at a time: linear and task arithmetic keep a
single accumulator (memory: two copies of the tensor whatever the number of experts); TIES needs all
of them at once (its sign election is across experts), so it holds N float32 copies of the tensor. Task vectors
are δ_i = θ_i − θ_base (Ilharco et al. 2023); TIES is Yadav et al. 2023 (trim, elect sign, disjoint
mean), as model-merging tools apply it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from elmforest.utils.errors import UserError

MergeFn = Callable[..., torch.Tensor]
METHODS: dict[str, MergeFn] = {}
NEEDS_BASE: set[str] = set()


def register(name: str, needs_base: bool = False):
    def deco(fn: MergeFn) -> MergeFn:
        METHODS[name] = fn
        if needs_base:
            NEEDS_BASE.add(name)
        return fn

    return deco


def get_method(name: str) -> MergeFn:
    if name not in METHODS:
        raise UserError(f"unknown merge method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name]


@register("linear")
def linear(ts: Iterable[torch.Tensor], w: Sequence[float], base: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i w_i θ_i (the weights sum to 1): uniform or posterior-weighted averaging."""
    acc = None
    for t, wi in zip(ts, w, strict=True):
        if acc is None:
            acc = t * wi
        else:
            acc.add_(t, alpha=wi)
    return acc


@register("task_arithmetic", needs_base=True)
def task_arithmetic(
    ts: Iterable[torch.Tensor], w: Sequence[float], base: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """θ_base + λ Σ_i w_i δ_i. With λ = 1 and weights summing to 1 this equals linear averaging;
    λ > 1 extrapolates along the experts' mean update."""
    delta = torch.zeros_like(base)
    for t, wi in zip(ts, w, strict=True):
        delta.add_(t - base, alpha=wi)
    return base + scale * delta


@register("ties", needs_base=True)
def ties(
    ts: Iterable[torch.Tensor],
    w: Sequence[float],
    base: torch.Tensor,
    scale: float = 1.0,
    density: float = 0.2,
) -> torch.Tensor:
    """TIES: keep each δ_i's `density` largest-magnitude entries, elect a sign per entry from the
    weighted sum of the trimmed deltas, and average only the entries that agree with it."""
    if not 0.0 < density <= 1.0:
        raise UserError(f"TIES density must be in (0, 1], got {density}")
    deltas = torch.stack([t - base for t in ts])  # [n, ...]
    n = deltas.shape[0]
    flat = deltas.view(n, -1)
    keep = max(1, int(round(density * flat.shape[1])))
    if keep < flat.shape[1]:
        for row in flat:  # exactly `keep` entries each: those above the keep-th largest magnitude, then
            a = row.abs()  # of those equal to it the first ones. Keeping every tie kept 65% at density
            thresh = a.kthvalue(a.numel() - keep + 1).values  # 0.5 of bf16 checkpoints, whose deltas
            mask = a > thresh  # take few distinct values
            ties_at = (a == thresh).nonzero().flatten()
            mask[ties_at[: keep - int(mask.sum())]] = True
            row.mul_(mask)
    wv = torch.tensor(w, dtype=flat.dtype).view(n, 1)
    sign = torch.sign((wv * flat).sum(0, keepdim=True))
    agree = (torch.sign(flat) == sign) & (flat != 0)
    num = (wv * flat * agree).sum(0)
    den = (wv * agree).sum(0)
    merged = torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))
    return base + scale * merged.view_as(base)
