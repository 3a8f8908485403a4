"""The router losses of a mixture-of-experts model in training (BTX fine-tuning of a merged forest).

Load balancing: the Switch Transformer's auxiliary loss (Fedus et al. 2021), E * sum_e f_e * P_e with f_e
the tokens routed to expert e in any of their k slots over all tokens (so f sums to k, and perfectly
balanced routing scores k: 2 at top-2, where Switch's top-1 scores 1; a coefficient taken from Switch
weighs twice as much at top-2) and P_e its mean router probability, computed by transformers'
`load_balancing_loss_func` (the one its MoE models add when `output_router_logits` is on). Router z-loss
(ST-MoE, Zoph et al. 2022): the mean over tokens and layers of logsumexp(router logits)^2, which keeps
the logits small; transformers has no shared function for it, so it is the one line below.
"""

from __future__ import annotations

import torch

from elmforest.utils.errors import Failed, UserError


def _softmaxed_router_logits() -> bool:
    """transformers 5.0-5.5's MoE routers hand out softmax(logits) as `router_logits` (fixed in 5.6,
    huggingface/transformers#45131): the losses below would softmax them again."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__).release < (5, 6)


SOFTMAXED_ROUTER_LOGITS = _softmaxed_router_logits()


def moe_shape(config, what: str = "train.router_aux_loss / router_z_loss") -> tuple[int, int]:
    """(experts, experts per token) of an MoE config; a UserError naming `what` for a dense model."""
    n = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    k = getattr(config, "num_experts_per_tok", None)
    if not n or not k:
        raise UserError(f"{what} need(s) a mixture-of-experts model; {config.model_type!r} has no router")
    return int(n), int(k)


def router_losses(config, router_logits, aux_coef: float, z_coef: float) -> torch.Tensor:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    n, k = moe_shape(config)
    logits = [g.float().reshape(-1, n) for g in router_logits]
    if SOFTMAXED_ROUTER_LOGITS:  # checked by version: no device sync, nothing for torch.compile to trace
        raise Failed(
            "the model's router_logits are probabilities, not logits (transformers < 5.6 returns them so): "
            "the router losses would be computed on them softmaxed twice; upgrade transformers to >= 5.6"
        )
    total = torch.zeros((), device=logits[0].device)
    if aux_coef > 0:
        total = total + aux_coef * load_balancing_loss_func(tuple(logits), n, k)
    if z_coef > 0:
        total = total + z_coef * torch.cat([torch.logsumexp(g, -1) ** 2 for g in logits]).mean()
    return total
