"""Sampling from a forest: the next-token distribution is Σ_j w_j(t) p_j(· | x_<t).

Weights come either from Bayes' rule (the posterior is updated with every prompt and generated
token's likelihood under each expert) or, with `cluster_k`, from c-BTM routing: the top-k clusters
nearest to the context's tf-idf embedding, updated incrementally as tokens are produced, with the same
routing as evaluation (cluster_route.py). The experts are evaluation's pool (pool.py): each keeps its
own KV cache and only catches up on the tokens it missed when it is needed, so c-BTM generation runs
(and loads) only the selected experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from elmforest.data.tokenizer import load_tokenizer
from elmforest.forest.cluster_route import ClusterRouting
from elmforest.forest.manifest import Forest
from elmforest.forest.pool import make_pool
from elmforest.utils.errors import UserError


def mixture_logprobs(logprobs: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """log Σ_j w_j p_j(v) for every vocabulary entry v: logprobs [N, ..., V], log_w [N, ...]."""
    return torch.logsumexp(log_w.unsqueeze(-1) + logprobs, dim=0)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    weights: list[dict[str, float]]  # the mixture weights before each generated token
    logprobs: list[float]  # log p(token | everything before) under the mixture, per generated token


@torch.no_grad()
def generate(
    forest_dir: str | Path,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    seed: int = 0,
    prior: dict[str, float] | None = None,
    weighting: str = "posterior",
    experts: list[str] | None = None,
    device: str = "auto",
    precision: str = "auto",
    cluster_k: int | None = None,
    routing_temperature: float = 0.1,
    pool=None,
) -> Generation:
    """`pool`: an expert pool made for these `experts` (pool.make_pool) to reuse across calls, models
    loaded once; its KV caches are reset first."""
    forest = Forest.load(forest_dir)
    names = experts or forest.names
    if not names:
        raise UserError(f"{forest_dir}: the forest has no experts")
    if weighting not in ("posterior", "fixed"):
        raise UserError("generation supports weighting 'posterior' or 'fixed'")
    if pool is None:
        pool = make_pool(forest, names, device, precision)
    else:
        pool.reset_decoding()
    dev, n_exp = pool.device, len(names)
    tok = load_tokenizer(forest.expert_dir(names[0]))
    ids = [tok.eos_id] + tok.encode_batch([prompt])[0]  # as a document starts in training (BOS included)
    if tok.appends_eos and ids[-1] == tok.eos_id:  # the prompt continues: it has not ended
        ids = ids[:-1]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    vocab = int(pool.model(0).config.vocab_size)
    routing = ClusterRouting(forest, names, cluster_k, routing_temperature) if cluster_k else None
    router = routing.incremental_router(tok) if routing is not None else None
    if router is not None:
        for t in ids:
            router.push_token(t)

    pi = torch.tensor([(prior or {}).get(n, 1.0) for n in names], dtype=torch.float64)
    log_w = torch.log(pi / pi.sum()).to(dev)
    if router is None:  # read the prompt: the weights absorb its likelihood under every expert
        for j in range(n_exp):
            lp = pool.advance(j, ids)
            if weighting == "posterior" and len(ids) > 1:
                log_w[j] += lp[:-1].gather(1, torch.tensor(ids[1:], device=dev)[:, None]).sum().double()
        log_w = log_w - torch.logsumexp(log_w, 0)

    new, history, chosen = [], [], []
    for _ in range(max_new_tokens):
        if router is not None:
            w = torch.as_tensor(routing.context_weights(router), dtype=torch.float64, device=dev)
            active = torch.nonzero(w > 0).flatten().tolist()
            cur_log_w = torch.log(w)
        else:
            active = list(range(n_exp))
            cur_log_w = log_w
        lps = torch.full((n_exp, vocab), -torch.inf, dtype=torch.float64, device=dev)
        for j in active:
            last = pool.next_logprobs(j, ids)
            lps[j, : last.numel()] = last.double()
        history.append(dict(zip(names, cur_log_w.exp().tolist(), strict=True)))
        mix = mixture_logprobs(lps[active], cur_log_w[active])
        if temperature > 0:
            probs = torch.softmax(mix / temperature, -1).float().cpu()
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        else:
            nxt = int(mix.argmax())
        new.append(nxt)
        chosen.append(float(mix[nxt]))
        if nxt == tok.eos_id:
            break
        if router is None and weighting == "posterior":
            log_w = log_w + lps[:, nxt]
            log_w = log_w - torch.logsumexp(log_w, 0)
        ids.append(nxt)
        if router is not None:
            router.push_token(nxt)
    text_ids = [t for t in new if t != tok.eos_id]
    return Generation(tok.decode(text_ids), new, history, chosen)
