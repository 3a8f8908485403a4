"""The ensemble's mixture weights, in log space.

Everything works on per-token log-likelihoods `lp[j, b, t] = log p_j(x_t | x_<t)` of N experts over
B windows of T tokens (0 at padding, which only ever trails a window), so each expert can be run
alone, one after another, and only the gathered log-probs are kept.

- Bayes over the whole prefix (BTM): log w_j(t) = log π_j + Σ_{s<t} lp[j, s] − logsumexp_j(·).
- DEMix's one-token variant: log w_j(t) = log π_j + lp[j, t−1] − logsumexp_j(·) (prior at t = 0).
- Fixed weights: log w_j(t) = log π_j (BTM's cached-prior mixture).
The ensemble's log-likelihood is logsumexp_j(log w_j(t) + lp[j, t]).
"""

from __future__ import annotations

import math

import torch

WEIGHTINGS = ("posterior", "fixed", "demix")


def _as_log_prior(prior: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    """[N, B, 1] log prior; `prior` may be None (uniform), [N] or [N, B] probabilities."""
    if prior is None:
        return torch.full((n, 1, 1), -math.log(n), dtype=like.dtype, device=like.device)
    p = torch.as_tensor(prior, dtype=like.dtype, device=like.device)
    if p.dim() == 1:
        p = p[:, None]
    p = p / p.sum(0, keepdim=True)
    return torch.log(p.clamp_min(0))[:, :, None]


def log_weights(lp: torch.Tensor, prior=None, weighting: str = "posterior") -> torch.Tensor:
    """log w_j(t) [N, B, T], normalised over experts at every position."""
    n = lp.shape[0]
    log_prior = _as_log_prior(prior, n, lp)
    if weighting == "fixed":
        lw = log_prior.expand_as(lp)
    elif weighting == "posterior":
        before = torch.cumsum(lp, dim=-1) - lp  # Σ_{s<t}: exclusive prefix sum
        lw = log_prior + before
    elif weighting == "demix":
        prev = torch.nn.functional.pad(lp[..., :-1], (1, 0))  # lp at t-1; 0 at t = 0
        lw = log_prior + prev
    else:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    return lw - torch.logsumexp(lw, dim=0, keepdim=True)


def ensemble_logprob(lp: torch.Tensor, lw: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) of the mixture, [B, T]."""
    return torch.logsumexp(lw + lp, dim=0)


def sequence_posterior(lp: torch.Tensor, prior=None) -> torch.Tensor:
    """P(D=j | whole window) [N, B]: the evidence of every token in each window."""
    lw = _as_log_prior(prior, lp.shape[0], lp)[:, :, 0] + lp.sum(-1)
    return torch.softmax(lw, dim=0)


def cached_prior(batch_posteriors: list[torch.Tensor], alpha: float = 0.3) -> torch.Tensor:
    """BTM's cached prior: an exponential moving average of per-batch mean posteriors, from uniform."""
    if not batch_posteriors:
        raise ValueError("no batches to estimate a prior from")
    n = batch_posteriors[0].shape[0]
    pi = torch.full((n,), 1.0 / n, dtype=torch.float64)
    for post in batch_posteriors:
        pi = alpha * post.double().mean(-1) + (1 - alpha) * pi
    return pi / pi.sum()
