"""Sampling from a forest: the next-token distribution is Σ_j w_j(t) p_j(· | x_<t).

Each expert keeps its own KV cache; after every token (prompt or sampled) the weights are updated
by Bayes' rule with that token's likelihood under each expert, so the mixture shifts towards the
experts that explain the text so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from elmforest.data.tokenizer import load_tokenizer
from elmforest.forest.manifest import Forest
from elmforest.model.build import load_model
from elmforest.utils.device import autocast, resolve_device, resolve_precision


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
) -> Generation:
    forest = Forest.load(forest_dir)
    names = experts or forest.names
    if not names:
        raise ValueError(f"{forest_dir}: the forest has no experts")
    if weighting not in ("posterior", "fixed"):
        raise ValueError("generation supports weighting 'posterior' or 'fixed'")
    dev = resolve_device(device)
    amp = resolve_precision(precision, dev)
    tok = load_tokenizer(forest.expert_dir(names[0]))
    models = [load_model(forest.expert_dir(n)).to(dev).eval() for n in names]
    pi = torch.tensor([(prior or {}).get(n, 1.0) for n in names], dtype=torch.float64)
    log_w = torch.log(pi / pi.sum()).to(dev)
    ids = [tok.eos_id] + tok.encode_batch([prompt])[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)

    # Read the prompt: every expert scores it, and the weights absorb its likelihood.
    x = torch.tensor([ids], device=dev)
    caches, last = [], []
    for m in models:
        with autocast(dev, amp):
            out = m(input_ids=x, use_cache=True)
        lp = torch.log_softmax(out.logits[0].float(), -1)  # [L, V]
        if weighting == "posterior" and len(ids) > 1:
            log_w = log_w.clone()
            log_w[len(last)] += lp[:-1].gather(1, x[0, 1:, None]).sum().double()
        caches.append(out.cache)
        last.append(lp[-1])
    log_w = log_w - torch.logsumexp(log_w, 0)

    new, history, chosen = [], [], []
    for _ in range(max_new_tokens):
        lps = torch.stack(last)  # [N, V]
        history.append(dict(zip(names, log_w.exp().tolist(), strict=True)))
        mix = mixture_logprobs(lps.double(), log_w)
        probs = torch.softmax(mix / max(temperature, 1e-6), -1) if temperature > 0 else None
        nxt = (
            int(mix.argmax())
            if probs is None
            else int(torch.multinomial(probs.float().cpu(), 1, generator=gen))
        )
        new.append(nxt)
        chosen.append(float(mix[nxt]))
        if nxt == tok.eos_id:
            break
        if weighting == "posterior":
            log_w = log_w + lps[:, nxt].double()
            log_w = log_w - torch.logsumexp(log_w, 0)
        step = torch.tensor([[nxt]], device=dev)
        last = []
        for j, m in enumerate(models):
            with autocast(dev, amp):
                out = m(input_ids=step, cache=caches[j], use_cache=True)
            caches[j] = out.cache
            last.append(torch.log_softmax(out.logits[0, -1].float(), -1))
    text_ids = [t for t in new if t != tok.eos_id]
    return Generation(tok.decode(text_ids), new, history, chosen)
