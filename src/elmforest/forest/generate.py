"""Sampling from a forest: the next-token distribution is Σ_j w_j(t) p_j(· | x_<t).

Weights come either from Bayes' rule (the posterior is updated with every prompt and generated
token's likelihood under each expert) or, with `routing`, from c-BTM: the top-k clusters nearest to
the context's embedding (tf-idf updated incrementally as tokens are produced, or a sentence encoder
re-embedding the text so far), with the same routing as
evaluation (cluster_route.py). The experts are evaluation's pool (pool.py): each keeps its own KV cache
and only catches up on the tokens it missed when it is needed, so c-BTM generation runs (and loads)
only the selected experts.

`generate_steps` is the one decoding loop: `elmforest generate`, the OpenAI-compatible server and
lm-eval's generate_until all consume it, so they sample the same mixture the evaluation scores.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from elmforest.data.tokenizer import load_tokenizer
from elmforest.forest.cluster_route import ClusterRouting
from elmforest.forest.manifest import Forest
from elmforest.forest.pool import ExpertPool, make_pool
from elmforest.utils.errors import Diverged, UserError
from elmforest.utils.typed import check_call_args, expert_selection


def mixture_logprobs(logprobs: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """log Σ_j w_j p_j(v) for every vocabulary entry v: logprobs [N, ..., V], log_w [N, ...]."""
    return torch.logsumexp(log_w.unsqueeze(-1) + logprobs, dim=0)


class Step(NamedTuple):
    """One generated token and the distribution it was drawn from (a tuple: `step[0]` is the token)."""

    token_id: int
    logprob: float  # log p(token | everything before) under the mixture, before temperature / top-p
    mixture: torch.Tensor  # [V] the mixture's log-probs (float64, on the pool's device)
    weights: dict[str, float]  # the mixture weights this token was drawn with

    def top(self, n: int) -> list[tuple[int, float]]:
        """The n most likely tokens under the mixture, most likely first."""
        if n <= 0:
            return []
        v, i = torch.topk(self.mixture, min(n, self.mixture.numel()))
        return list(zip(i.tolist(), v.tolist(), strict=True))


def check_finite(lps: torch.Tensor, pool: ExpertPool, experts: list[int]) -> None:
    """A Diverged naming the first expert whose log-probs [.., V] hold a NaN, or a row with no finite
    entry. Without it a diverged expert's NaNs poison the mixture: its argmax is token 0 (EOS, an empty
    completion that looks fine) and sampling fails inside torch."""
    lps = lps.reshape(len(experts), -1, lps.shape[-1])  # [experts, positions, V]
    bad = lps.isnan().any(-1).any(-1) | ~torch.isfinite(lps.amax(-1)).all(-1)
    if bool(bad.any()):
        j = experts[int(bad.nonzero()[0])]
        raise Diverged(f"{pool.dirs[j]}: non-finite log-probabilities: corrupt or diverged weights")


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    weights: list[dict[str, float]]  # the mixture weights before each generated token
    logprobs: list[float]  # log p(token | everything before) under the mixture, per generated token


def sample_token(mix: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Draw from softmax(mix / temperature) restricted to its nucleus (the most likely tokens whose
    probabilities first sum to at least top_p); temperature 0 is the argmax."""
    if temperature <= 0:
        return int(mix.argmax())
    # shifted by the maximum first: a tiny temperature then tends to the argmax instead of 0/0 = NaN
    probs = torch.softmax((mix - mix.max()) / temperature, -1).float().cpu()
    if top_p < 1.0:
        p, order = torch.sort(probs, descending=True)
        # keep a token while the mass before it is below top_p: the first token always stays
        keep = (torch.cumsum(p, 0) - p) < top_p
        keep[0] = True  # a top_p below float32's smallest number rounds to 0 and would keep none
        probs = torch.zeros_like(probs).scatter_(0, order[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def generate_steps(
    pool: ExpertPool,
    tok,
    prompt_ids: list[int],
    names: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    prior: torch.Tensor | dict[str, float] | None = None,
    weighting: str = "posterior",
    routing: ClusterRouting | None = None,
) -> Iterator[Step]:
    """Yield one `Step` per new token, until EOS (yielded too) or `max_new_tokens`.

    `prompt_ids`: the tokens read before generating, opening with EOS as a document does in training:
    `[eos, *ForestLM.encode(text)]` (the text's own trailing EOS removed: it has not ended); an EOS is
    put in front if they do not start with one. `prior`: probabilities over `names` (a tensor
    in their order, or a dict; uniform if None). `weighting`: posterior (Bayes' rule over everything
    read so far) or fixed (the prior throughout); ignored with `routing` (c-BTM re-routes on the
    context after every token).

    The work is lazy: the prompt is read on the first `next()`, each later `next()` costs one decoding
    step, and closing the generator early (a stop string, a client gone) stops the work. The generator
    keeps its own KV caches and puts them into the pool only while it runs, so several generations over
    one pool may be interleaved step by step from one thread (never from several at once: the models
    are not thread-safe).
    """
    if weighting not in ("posterior", "fixed"):
        raise UserError(f"generation supports weighting 'posterior' or 'fixed', got {weighting!r}")
    if not 0 < top_p <= 1 or temperature < 0 or not math.isfinite(temperature):
        raise UserError(f"need temperature >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    if max_new_tokens <= 0:
        return
    caches: dict = {}  # this generation's KV caches, swapped into the pool whenever it runs
    pool._decoding = caches
    dev, n_exp = pool.device, len(names)
    ids = list(prompt_ids) if prompt_ids and prompt_ids[0] == tok.eos_id else [tok.eos_id, *prompt_ids]
    # any integer seed, reduced as the server reduces a request's (torch takes at most 64 bits)
    gen = torch.Generator(device="cpu").manual_seed(seed % 2**63)
    router = routing.incremental_router(tok) if routing is not None else None
    if router is not None:
        for t in ids:
            router.push_token(t)
    if prior is None:
        pi = torch.ones(len(names), dtype=torch.float64)
    elif isinstance(prior, dict):  # as evaluation reads a given prior: an expert not named has none
        if unknown := sorted(set(prior) - set(names)):
            raise UserError(f"prior names expert(s) {unknown} not among {names}")
        pi = torch.tensor([float(prior.get(n, 0.0)) for n in names], dtype=torch.float64)
    else:
        pi = torch.as_tensor(prior, dtype=torch.float64).cpu()
    if pi.shape != (len(names),) or not bool(torch.isfinite(pi).all()) or (pi < 0).any() or pi.sum() <= 0:
        raise UserError(f"prior: {len(names)} non-negative weights with a positive sum, got {prior}")
    log_w = torch.log(pi / pi.sum()).to(dev)
    try:  # from the prompt's read on: a failure anywhere still frees this generation's caches
        if router is None:  # read the prompt: the weights absorb its likelihood under every expert
            for j in range(n_exp):
                lp = pool.advance(j, ids)
                check_finite(lp[None], pool, [j])
                if weighting == "posterior" and len(ids) > 1:
                    log_w[j] += (
                        lp[:-1].gather(1, torch.tensor(ids[1:], device=dev)[:, None]).double().sum()
                    )  # fp64: long prompts
            log_w = log_w - torch.logsumexp(log_w, 0)
        for _ in range(max_new_tokens):
            pool._decoding = caches  # another generation may have run on this pool since the last step
            if router is not None:
                w = torch.as_tensor(routing.context_weights(router), dtype=torch.float64, device=dev)
                active = torch.nonzero(w > 0).flatten().tolist()
                cur_log_w = torch.log(w)
            else:
                active = list(range(n_exp))
                cur_log_w = log_w
            lps = torch.stack([pool.next_logprobs(j, ids).double() for j in active])  # [active, V]
            check_finite(lps, pool, active)
            mix = mixture_logprobs(lps, cur_log_w[active])
            nxt = sample_token(mix, temperature, top_p, gen)
            weights = dict(zip(names, cur_log_w.exp().tolist(), strict=True))
            yield Step(nxt, float(mix[nxt]), mix, weights)
            if nxt == tok.eos_id:
                return
            if router is None and weighting == "posterior":
                log_w = log_w + lps[:, nxt]
                log_w = log_w - torch.logsumexp(log_w, 0)
            ids.append(nxt)
            if router is not None:
                router.push_token(nxt)
    finally:  # free this generation's KV caches as soon as it ends or is closed
        if pool._decoding is caches:
            pool._decoding = {}


def check_context(model_dir: Path, n_prompt: int, max_new_tokens: int) -> None:
    """Refuse what the model's positions cannot hold; note what goes past the context it trained on
    (the server refuses that too; here it is allowed, to see how the model degrades)."""
    from elmforest.eval.bpb import default_seq_len
    from elmforest.model.build import position_limit, read_config

    total = n_prompt + max_new_tokens - 1  # the positions read: the last new token is never fed back
    limit = position_limit(read_config(Path(model_dir)))  # GPT-2: n_positions (an IndexError past it)
    if limit is not None and total > limit:
        raise UserError(
            f"{n_prompt} prompt tokens (with the start token) + {max_new_tokens} new ones read {total} "
            f"positions (the last new one is not read back), past the model's {limit} positions; shorten "
            "the prompt or --max-new-tokens"
        )
    trained = default_seq_len(Path(model_dir))
    if total > trained:
        print(
            f"note: {total} tokens is past the {trained}-token context the experts were trained on; "
            "expect worse text beyond it",
            file=sys.stderr,
        )


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
    top_p: float = 1.0,
) -> Generation:
    """Text from the forest's mixture (generate_steps says how each token is drawn). `prior`: weights
    over the experts, {name: weight} (None: uniform); `experts`: the experts that run, each named once
    (None: all); `weighting` posterior follows the text so far (Bayes), fixed keeps the prior;
    `cluster_k`: c-BTM's routing to the k nearest clusters instead of a prior. `pool`: an expert pool
    made for these `experts` (pool.make_pool) to reuse across calls, models loaded once; each
    generation starts from empty KV caches."""
    check_call_args("generate", ints={"max_new_tokens": max_new_tokens})
    experts = expert_selection(experts, "generate")
    if not isinstance(prompt, str):
        raise UserError(f"generate: prompt must be text (a str), got {type(prompt).__name__}")
    if isinstance(prior, str):  # the CLI's --prior values are not a prior
        raise UserError(f"generate: prior={prior!r}: a dict {{expert: weight}} or None (uniform)")
    forest = Forest.load(forest_dir)
    names = experts or forest.names
    if not names:
        raise UserError(f"{forest_dir}: the forest has no experts")
    if weighting not in ("posterior", "fixed"):
        raise UserError("generation supports weighting 'posterior' or 'fixed'")
    # first: a forest without a clusterer is refused before models load and notes are printed
    routing = ClusterRouting(forest, names, cluster_k, routing_temperature) if cluster_k is not None else None
    if pool is None:
        pool = make_pool(forest, names, device, precision)
    tok = load_tokenizer(forest.expert_dir(names[0]))
    ids = [tok.eos_id] + tok.encode_batch([prompt])[0]  # as a document starts in training
    if tok.appends_eos and len(ids) > 1 and ids[-1] == tok.eos_id:  # the prompt continues: not ended
        ids = ids[:-1]
    check_context(forest.expert_dir(names[0]), len(ids), max_new_tokens)
    new, weights, logprobs = [], [], []
    for step in generate_steps(
        pool,
        tok,
        ids,
        names,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        prior=prior,
        weighting=weighting,
        routing=routing,
    ):
        new.append(step.token_id)
        weights.append(step.weights)
        logprobs.append(step.logprob)
    text_ids = [t for t in new if t != tok.eos_id]
    return Generation(tok.decode(text_ids), new, weights, logprobs)
