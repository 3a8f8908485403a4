"""The negative log-likelihood of a forest's mixture on one token stream: the full ensemble, BTM's top-k
experts by prior, or the k most probable after each window's first W tokens (`--select prefix:W`),
each expert run only where it is used.

Apart from forest/evaluate.py, which decides what is scored and how the prior is read, because the
forest LM (forest/lm.py) scores its requests with the same mixture.
"""

from __future__ import annotations

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
        return _prefix_topk(pool, stream, eos, seq_len, nw, pi, k, weighting, w, starts)
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


def _prefix_topk(pool, stream, eos, seq_len, nw, pi, k, weighting, w, starts):
    """Per window: all experts read the first w tokens, the k most probable then score the rest.

    Positions < w are scored by the full ensemble (every expert has run there); positions >= w by
    the chosen k only, with the prior restricted to them and renormalised.
    """
    n = len(pool.dirs)
    w = max(1, min(w, seq_len))
    head = torch.stack([pool.logprobs(j, stream, eos, seq_len, range(nw), upto=w) for j in range(n)])
    lw_head = log_weights(head.double(), pi, weighting, starts)
    nll = -float(ensemble_logprob(head.double(), lw_head)[:, :w].sum())
    valid = valid_mask(nw, seq_len, len(stream))
    if w == seq_len:  # the full ensemble scored every position: no expert needs a second pass
        return nll, _mean_weight(lw_head, valid), list(range(n))
    post_w = sequence_posterior(head.double()[:, :, :w], pi)  # [N, B] after the first w tokens
    chosen = torch.topk(post_w, k, dim=0).indices  # [k, B]
    used = sorted(set(chosen.flatten().tolist()))
    # run each expert only on the windows that chose it
    lp_sel = torch.zeros(k, nw, seq_len, dtype=torch.float64)
    for j in used:
        rows, wins = (chosen == j).nonzero(as_tuple=True)
        lp_j = pool.logprobs(j, stream, eos, seq_len, wins.tolist())
        lp_sel[rows, wins] = lp_j.double()
    # each window's k-expert mixture: the prior restricted to the chosen experts and renormalised; the
    # posterior then re-reads the first w tokens itself (using post_w as the prior would count them twice)
    sel_prior = pi.double()[chosen]
    lw = log_weights(lp_sel, sel_prior, weighting, starts)
    ens = ensemble_logprob(lp_sel, lw)
    nll += -float(ens[:, w:].sum())
    # mean weights: the full ensemble's before w, the chosen experts' from w on
    mean_w = (lw_head[:, :, :w].exp() * valid[:, :w]).sum((1, 2))
    for slot in range(k):
        mean_w.index_add_(0, chosen[slot], (lw[slot, :, w:].exp() * valid[:, w:]).sum(-1))
    mean_w /= valid.sum().clamp_min(1)
    return nll, mean_w, list(range(n))  # every expert read the first w tokens


def _mean_weight(lw: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean weight of each expert over the real (non-padding) positions."""
    return (lw.exp() * valid).sum((1, 2)) / valid.sum().clamp_min(1)
