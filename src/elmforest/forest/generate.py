"""Sampling from a forest: the next-token distribution is Σ_j w_j(t) p_j(· | x_<t).

Weights come either from Bayes' rule (the posterior is updated with every prompt and generated
token's likelihood under each expert) or, with `cluster_k`, from c-BTM routing: the top-k clusters
nearest to the context's tf-idf embedding, updated incrementally as tokens are produced. Each expert
keeps its own KV cache and only catches up on the tokens it missed when it is needed, so c-BTM
generation runs only the selected experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from elmforest.data.tokenizer import load_tokenizer
from elmforest.forest.manifest import Forest
from elmforest.model.build import load_model
from elmforest.utils.device import autocast, resolve_device, resolve_precision
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


class _Expert:
    """One expert with a KV cache over a prefix of the shared token list."""

    def __init__(self, model, dev, amp):
        self.m, self.dev, self.amp = model, dev, amp
        self.cache, self.seen, self.last = None, 0, None

    @torch.no_grad()
    def advance(self, ids: list[int]) -> torch.Tensor:
        """Read the tokens not seen yet; log-probs [new, V] predicting each next token."""
        new = torch.tensor([ids[self.seen :]], device=self.dev)
        with autocast(self.dev, self.amp):
            out = self.m(input_ids=new, cache=self.cache, use_cache=True)
        self.cache, self.seen = out.cache, len(ids)
        lp = torch.log_softmax(out.logits[0].float(), -1)
        self.last = lp[-1]
        return lp


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
) -> Generation:
    forest = Forest.load(forest_dir)
    names = experts or forest.names
    if not names:
        raise UserError(f"{forest_dir}: the forest has no experts")
    if weighting not in ("posterior", "fixed"):
        raise UserError("generation supports weighting 'posterior' or 'fixed'")
    dev = resolve_device(device)
    amp = resolve_precision(precision, dev)
    tok = load_tokenizer(forest.expert_dir(names[0]))
    pool = [_Expert(load_model(forest.expert_dir(n)).to(dev).eval(), dev, amp) for n in names]
    ids = [tok.eos_id] + tok.encode_batch([prompt])[0]  # as a document starts in training (BOS included)
    if tok.appends_eos and ids[-1] == tok.eos_id:  # the prompt continues: it has not ended
        ids = ids[:-1]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    vocab = int(pool[0].m.config.vocab_size)
    router = _ClusterRouter(forest, names, tok, cluster_k, routing_temperature) if cluster_k else None
    if router is not None:
        for t in ids:
            router.push(t)

    pi = torch.tensor([(prior or {}).get(n, 1.0) for n in names], dtype=torch.float64)
    log_w = torch.log(pi / pi.sum()).to(dev)
    if router is None:  # read the prompt: the weights absorb its likelihood under every expert
        for j, e in enumerate(pool):
            lp = e.advance(ids)
            if weighting == "posterior" and len(ids) > 1:
                log_w[j] += lp[:-1].gather(1, torch.tensor(ids[1:], device=dev)[:, None]).sum().double()
        log_w = log_w - torch.logsumexp(log_w, 0)

    new, history, chosen = [], [], []
    for _ in range(max_new_tokens):
        if router is not None:
            w = torch.as_tensor(router.weights(), dtype=torch.float64, device=dev)
            active = torch.nonzero(w > 0).flatten().tolist()
            cur_log_w = torch.log(w)
        else:
            active = list(range(len(pool)))
            cur_log_w = log_w
        lps = torch.full((len(pool), vocab), -torch.inf, dtype=torch.float64, device=dev)
        for j in active:
            if pool[j].seen < len(ids):
                pool[j].advance(ids)
            lps[j, : pool[j].last.numel()] = pool[j].last.double()
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
            router.push(nxt)
    text_ids = [t for t in new if t != tok.eos_id]
    return Generation(tok.decode(text_ids), new, history, chosen)


class _ClusterRouter:
    """c-BTM weights over the forest's experts from the incremental embedding of the context."""

    def __init__(self, forest: Forest, names, tok, k: int, temperature: float):
        from elmforest.cluster.clusterer import Clusterer
        from elmforest.cluster.router import IncrementalRouter, token_byte_table

        info = forest.data.get("clusterer")
        if not info:
            raise UserError(f"{forest.root}: the forest has no clusterer; cluster routing needs one")
        self.c = Clusterer.load(forest.root / info["path"])
        self.r = IncrementalRouter(self.c, token_byte_table(tok), tok.eos_id)
        self.expert_of = {
            j: i
            for j in range(self.c.k)
            for i, n in enumerate(names)
            if f"cluster{j}" in forest.expert(n)["domains"]
        }
        self.allowed = np.array([j in self.expert_of for j in range(self.c.k)])
        self.k, self.t, self.n = k, temperature, len(names)

    def push(self, token_id: int) -> None:
        self.r.push_token(token_id)

    def weights(self) -> np.ndarray:
        h, ok = self.r.embedding()
        if ok:
            wc = self.c.route(h[None], self.k, self.t, allowed=self.allowed)[0]
        else:  # no known word yet: the k largest clusters with an expert, by size (as in evaluation)
            wc = (
                np.asarray(self.c.meta.get("fit", {}).get("sizes") or np.ones(self.c.k), float) * self.allowed
            )
            wc[np.argsort(-wc, kind="stable")[self.k :]] = 0.0
            wc = wc / wc.sum()
        w = np.zeros(self.n)
        for j, i in self.expert_of.items():
            w[i] += wc[j]
        return w
