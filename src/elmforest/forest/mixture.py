"""The negative log-likelihood of a forest's mixture on one token stream: the full ensemble, BTM's top-k
experts by prior, or the k most probable after each document's first W tokens in a window (`--select prefix:W`),
each expert run only where it is used.

Apart from forest/evaluate.py, which decides what is scored and how the prior is read, because the
forest LM (forest/lm.py) scores its requests with the same mixture.
"""

from __future__ import annotations

import math

import torch

from elmforest.forest.cluster_route import width
from elmforest.forest.pool import ExpertPool, valid_mask
from elmforest.forest.posterior import ensemble_logprob, log_weights, sequence_posterior
from elmforest.utils.errors import UserError


def _mixture_nll(pool: ExpertPool, stream, eos, seq_len, nw, pi, mode, k, weighting, select, key, starts):
    """Summed NLL of the (top-k) mixture, the mean weight per expert, and the experts that ran."""
    n = len(pool.dirs)
    if mode == "ensemble":
        lp = pool.all_logprobs(range(n), stream, eos, seq_len, range(nw), key=key)
        lw = log_weights(lp.double(), pi, weighting, starts)
        ens = ensemble_logprob(lp.double(), lw)
        return -float(ens.sum()), _mean_weight(lw, valid_mask(nw, seq_len, len(stream))), list(range(n))
    if select == "prior":
        # BTM: keep the k largest prior entries, renormalise, and run only those experts.
        top = top_experts(pi, k)
        lp = pool.all_logprobs(top, stream, eos, seq_len, range(nw), key=key)
        lw = log_weights(lp.double(), pi[top], weighting, starts)
        ens = ensemble_logprob(lp.double(), lw)
        mean_w = torch.zeros(n, dtype=torch.float64)
        mean_w[top] = _mean_weight(lw, valid_mask(nw, seq_len, len(stream)))
        return -float(ens.sum()), mean_w, top
    if select.startswith("prefix:"):
        w = width(select, "--select")
        return _prefix_topk(pool, stream, eos, seq_len, nw, pi, k, weighting, w, starts, key)
    raise UserError(f"unknown expert selection {select!r}; expected 'prior' or 'prefix:W'")


def top_experts(pi: torch.Tensor, k: int) -> list[int]:
    """The k experts of largest prior, in forest order. A tie goes to the earlier expert (a stable
    sort): torch.topk breaks ties by no documented rule (of 8 equal priors, k = 2 gave experts 5, 6)."""
    return sorted(torch.sort(pi, descending=True, stable=True).indices[:k].tolist())


def tied_at_k(pi: torch.Tensor, k: int) -> bool:
    """Whether the k-th and (k+1)-th largest prior entries tie (a uniform prior: a domain with no valid
    split to read one from): then `top_experts` picks by the forest's order, not by the data, and a
    top-k row that does not say so reads as a choice."""
    if k >= len(pi):
        return False
    v = torch.sort(pi, descending=True).values
    return bool(v[k - 1] == v[k])


def _prefix_topk(pool, stream, eos, seq_len, nw, pi, k, weighting, w, starts, key=None):
    """Per document in each window: every expert reads its first w tokens, the k most probable then
    score the rest of it.

    With `starts` (`--reset document`) a window is cut where each document opens, and each piece is
    chosen for on its own first w tokens: choosing once per window let the end of one document pick the
    experts of the next (in a test stream of one domain, the leak the posterior's reset closes), and
    the document's own opening tokens did not count. Without `starts` a window is one piece. Positions
    within w of a piece's start are scored by the full ensemble (every expert has run there); the rest
    by the chosen k, with the prior restricted to them and renormalised, the posterior re-reading the
    piece from its start (using the choice's posterior as the prior would count those tokens twice).
    The models are causal over the window, so every expert reads each window up to its last piece's
    head (min(a + w, end), rounded up to a power of two below T so that runs batch), and the last
    piece's chosen k read it again, from its start, to that piece's end (only the last piece can end
    past the heads). Where that second read would cost as much as every expert reading the window to
    that end at once (k·U >= N·(U - u), for a first read to u and an end at U), every expert reads it
    once instead. So a window costs N·w + k·T with one piece, and never more than the full ensemble's
    N·T. k >= N is the full ensemble, read once.
    """
    n, T = len(pool.dirs), seq_len
    if k >= n:  # every expert scores every piece: the full ensemble, read once
        lp = pool.all_logprobs(range(n), stream, eos, seq_len, range(nw), key=key).double()
        lw = log_weights(lp, pi, weighting, starts)
        return (
            -float(ensemble_logprob(lp, lw).sum()),
            _mean_weight(lw, valid_mask(nw, T, len(stream))),
            list(range(n)),
        )
    w = max(1, min(w, T))
    valid = valid_mask(nw, T, len(stream))
    length = valid.sum(1).long().tolist()  # real tokens per window
    cut = starts.clone() if starts is not None else torch.zeros(nw, T, dtype=torch.bool)
    cut[:, 0] = True
    pieces = []  # (window, start, end of its head, end)
    need = [0] * nw  # every expert runs each window up to its last head position
    head_mask = torch.zeros(nw, T, dtype=torch.bool)
    for b in range(nw):
        opens = [int(a) for a in cut[b].nonzero().flatten() if a < length[b]]
        for a, e in zip(opens, [*opens[1:], length[b]], strict=True):
            pieces.append((b, a, min(a + w, e), e))
            head_mask[b, a : pieces[-1][2]] = True
            need[b] = pieces[-1][2]
        if opens and need[b] < length[b]:  # the last piece has a tail: its k read again, or all read once
            u, end = _rounded(need[b], w, T), _rounded(length[b], T, T)
            if k * end >= n * (end - u):
                need[b] = length[b]
    lp = torch.zeros(n, nw, T, dtype=torch.float64)
    read = [0] * nw  # how far every expert has read each window
    for u, wins in _by_length(need, w, T):
        for b in wins:
            read[b] = u
        for j in range(n):
            lp[j, wins, :u] = pool.logprobs(j, stream, eos, T, wins, upto=u).double()[:, :u]
    lw = log_weights(lp, pi, weighting, starts)
    nll = -float(ensemble_logprob(lp, lw)[head_mask].sum())
    weight = (lw.exp() * head_mask).sum((1, 2))  # the full ensemble's weights in the heads
    # each piece with tokens past its head: the k most probable after its head, scored to its end; an
    # expert runs a window again only past what it has read (a piece ending before the window's last
    # head needs nothing more: rereading it made short documents cost more than the full ensemble)
    active = torch.zeros(n, nw, T, dtype=torch.bool)
    ends = [[0] * nw for _ in range(n)]
    for b, a, h, e in (p for p in pieces if p[2] < p[3]):
        post = sequence_posterior(lp[:, b : b + 1, a:h], pi)[:, 0]
        for j in torch.topk(post, k).indices.tolist():
            active[j, b, h:e] = True
            ends[j][b] = max(ends[j][b], e)
    for j in range(n):
        further = [e if e > read[b] else 0 for b, e in enumerate(ends[j])]
        for u, wins in _by_length(further, T, T):
            lp[j, wins, :u] = pool.logprobs(j, stream, eos, T, wins, upto=u).double()[:, :u]
    lw = log_weights(lp, pi, weighting, starts).masked_fill(~active, -math.inf)
    lw = lw - torch.logsumexp(lw, dim=0, keepdim=True).nan_to_num(neginf=0.0)
    nll += -float(ensemble_logprob(lp, lw)[active.any(0)].sum())
    weight += lw.exp().sum((1, 2))  # zero outside the chosen experts' tails
    return nll, weight / valid.sum().clamp_min(1), list(range(n))  # every expert read the heads


def _by_length(need: list[int], keep: int, T: int):
    """(length, windows) groups that run each window up to `need` tokens (0: not at all). A need of
    `keep` or T runs as it is; others are rounded up to a power of two (at most T), so that pieces
    opening anywhere in a window batch into a few lengths rather than one call per length."""
    groups: dict[int, list[int]] = {}
    for b, u in enumerate(need):
        if u > 0:
            groups.setdefault(_rounded(u, keep, T), []).append(b)
    return sorted(groups.items())


def _rounded(u: int, keep: int, T: int) -> int:
    return u if u in (keep, T) else min(T, 1 << (u - 1).bit_length())


def _mean_weight(lw: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean weight of each expert over the real (non-padding) positions."""
    return (lw.exp() * valid).sum((1, 2)) / valid.sum().clamp_min(1)
