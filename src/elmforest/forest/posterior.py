"""The ensemble's mixture weights, in log space.

Everything works on per-token log-likelihoods `lp[j, b, t] = log p_j(x_t | x_<t)` of N experts over
B windows of T tokens (0 at padding, which only ever trails a window), so each expert can be run
alone, one after another, and only the gathered log-probs are kept.

- Bayes over the whole prefix (BTM): log w_j(t) = log π_j + Σ_{s<t} lp[j, s] − logsumexp_j(·).
- DEMix's one-token variant: log w_j(t) = log π_j + lp[j, t−1] − logsumexp_j(·) (prior at t = 0).
- Fixed weights: log w_j(t) = log π_j (BTM's cached-prior mixture).
The ensemble's log-likelihood is logsumexp_j(log w_j(t) + lp[j, t]).

Document boundaries: a window can hold the end of one document and the start of the next. With
`starts` (True where the token predicted is a document's first: the input token is EOS), the
evidence restarts there, so each document's posterior starts from the prior and never uses what the
previous document said about the domain (`reset="document"`, the default in forest evaluation). In
a test stream of one domain, carrying it over would leak the stream's construction (neighbouring
documents share a domain) into the score; a deployed model sees one document at a time.
"""

from __future__ import annotations

import math

import torch

from elmforest.utils.errors import UserError

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


def log_weights(
    lp: torch.Tensor, prior=None, weighting: str = "posterior", starts: torch.Tensor | None = None
) -> torch.Tensor:
    """log w_j(t) [N, B, T], normalised over experts at every position.

    `starts` [B, T] (bool) marks the first token of each document inside a window: the evidence of the
    posterior (and DEMix's previous token) restarts there.
    """
    n = lp.shape[0]
    log_prior = _as_log_prior(prior, n, lp)
    if weighting == "fixed":
        lw = log_prior.expand_as(lp)
    elif weighting == "posterior":
        before = torch.cumsum(lp, dim=-1) - lp  # Σ_{s<t}: exclusive prefix sum
        if starts is not None:  # Σ_{doc start <= s < t}: subtract what came before the document began
            t = lp.shape[-1]
            idx = torch.where(starts, torch.arange(t, device=lp.device), torch.zeros((), dtype=torch.long))
            first = torch.cummax(idx, dim=-1).values  # [B, T] index of the current document's first token
            before = before - torch.gather(before, -1, first.expand(n, -1, -1))
        lw = log_prior + before
    elif weighting == "demix":
        prev = torch.nn.functional.pad(lp[..., :-1], (1, 0))  # lp at t-1; 0 at t = 0
        if starts is not None:
            prev = prev.masked_fill(starts, 0.0)
        lw = log_prior + prev
    else:
        raise UserError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    return lw - torch.logsumexp(lw, dim=0, keepdim=True)


def ensemble_logprob(lp: torch.Tensor, lw: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) of the mixture, [B, T]."""
    return torch.logsumexp(lw + lp, dim=0)


def sequence_posterior(lp: torch.Tensor, prior=None) -> torch.Tensor:
    """P(D=j | whole window) [N, B]: the evidence of every token in each window, in float64 (a window's
    evidence spans hundreds of nats: in float32 an expert 104 nats behind underflows to exactly 0, and a
    cached prior made of such windows would shut it out of every later posterior for good)."""
    lp = lp.double()
    lw = _as_log_prior(prior, lp.shape[0], lp)[:, :, 0] + lp.sum(-1)
    return torch.softmax(lw, dim=0)


def cached_prior(batch_posteriors: list[torch.Tensor], alpha: float | None = None) -> torch.Tensor:
    """The cached prior from per-batch posteriors [N, windows].

    alpha=None (the default): the mean posterior over every window, each window weighing the same:
    one EM step for the mixture weights from a uniform start, using all the valid data given.
    alpha in (0, 1]: BTM's exponential moving average of per-batch mean posteriors, bias-corrected (as
    Adam corrects its moments: the average starts at zero and is divided by the weight it has gathered,
    1 − (1 − α)^n), so no weight is left on a uniform start (started at uniform, 4 batches kept 24% of
    it). Batch i of n weighs α(1 − α)^(n−i): with α = 0.3 the last six batches hold 88% of the weight,
    so the estimate follows the end of the split (it was made for a stream); measured in
    docs/benchmarks.md.
    """
    if not batch_posteriors:
        raise UserError("no batches to estimate a prior from")
    if alpha is None:
        pi = torch.cat([p.double() for p in batch_posteriors], dim=-1).mean(-1)
        return pi / pi.sum()
    if not 0 < alpha <= 1:
        raise UserError(f"alpha must be in (0, 1], got {alpha}")
    n = batch_posteriors[0].shape[0]
    pi = torch.zeros(n, dtype=torch.float64)
    for post in batch_posteriors:
        pi = alpha * post.double().mean(-1) + (1 - alpha) * pi
    pi = pi / (1 - (1 - alpha) ** len(batch_posteriors))
    return pi / pi.sum()
