"""Router rows for a merged MoE, built without joint training.

`domain-embeddings` (FlexOlmo): each expert embeds a sample of its *own* training data with its own
model; row (layer l, expert i) is the L2-normalised mean of the hidden states entering layer l's MLP.
A data owner can compute its row alone, without sharing data or seeing the others' models.

`hidden-states` (mergekit-moe's "hidden" gates): one common model (the seed, or the uniform average
of the experts) embeds every expert's data, so all rows live in the same basis; it needs every
owner's data in one place.

`random`: N(0, 0.02²) rows, BTX's starting point before router training.

Hidden states of LMs share a large common direction, so mean states of different domains are often
nearly parallel and route weakly; `center=True` subtracts the mean over experts before normalising,
keeping only what distinguishes each domain.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from elmforest.data.shards import Shards
from elmforest.eval.bpb import n_windows, window_batch
from elmforest.utils.errors import UserError

ROUTERS = ("domain-embeddings", "hidden-states", "random")


def sample_windows(shards: Shards, domains: list[str], split: str, seq_len: int, tokens: int) -> list:
    """(stream, window ids) per domain: windows spread evenly over each domain's split, about
    `tokens` tokens in all (shared equally among the domains)."""
    out = []
    per = max(1, math.ceil(tokens / seq_len / len(domains)))
    for d in domains:
        if not shards.has(d, split):
            raise UserError(f"{shards.root}: no {split} split for domain {d!r} to build a router row from")
        stream = shards.tokens(d, split)
        nw = n_windows(len(stream), seq_len)
        ids = sorted(set(np.linspace(0, nw - 1, num=min(per, nw)).round().astype(int).tolist()))
        out.append((stream, ids))
    return out


@torch.no_grad()
def mean_mlp_inputs(
    model, samples: list, eos_id: int, seq_len: int, batch_size: int = 8, device: torch.device | None = None
) -> torch.Tensor:
    """[layers, hidden]: the mean (over real tokens) of the hidden state entering each layer's MLP."""
    device = device or torch.device("cpu")
    layers = model.model.layers
    sums = torch.zeros(len(layers), model.config.hidden_size, dtype=torch.float64)
    count = 0
    mask: list[torch.Tensor] = []

    def hook(i):
        def fn(_module, args):
            h = args[0].detach().to(torch.float64)
            sums[i] += (h * mask[0].unsqueeze(-1)).sum(dim=(0, 1)).cpu()

        return fn

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for stream, ids in samples:
            for b in range(0, len(ids), batch_size):
                x, y = window_batch(stream, eos_id, seq_len, ids[b : b + batch_size])
                m = (y != -100).to(device=device, dtype=torch.float64)
                mask[:] = [m]
                model(input_ids=x.to(device))
                count += int(m.sum())
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise UserError("no tokens in the router sample")
    return (sums / count).to(torch.float32)


def normalise_rows(means: torch.Tensor, center: bool) -> torch.Tensor:
    """means [layers, experts, hidden] -> unit rows (centred over experts first when asked)."""
    rows = means.clone()
    if center and rows.shape[1] > 1:
        rows = rows - rows.mean(dim=1, keepdim=True)
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def random_rows(layers: int, experts: int, hidden: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, experts, hidden, generator=g) * 0.02


def parallel_pairs(rows: torch.Tensor, names: list[str], threshold: float = 0.99) -> list[dict]:
    """Pairs of experts whose router rows have cosine >= threshold in some layer: the router can
    hardly tell them apart there."""
    found = []
    unit = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    for layer in range(rows.shape[0]):
        cos = unit[layer] @ unit[layer].T
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                if cos[i, j] >= threshold:
                    found.append({"layer": layer, "a": names[i], "b": names[j], "cosine": float(cos[i, j])})
    return found


def warn_parallel(pairs: list[dict]) -> None:
    if pairs:
        worst = max(pairs, key=lambda p: p["cosine"])
        warnings.warn(
            f"router rows of {len(pairs)} expert pair(s) are nearly parallel (worst: {worst['a']} vs "
            f"{worst['b']} in layer {worst['layer']}, cosine {worst['cosine']:.4f}); the router can hardly "
            "tell them apart. Try --router-center, more --sample-tokens, or --train-router.",
            stacklevel=2,
        )


def expert_data(expert_dir: Path, domains: list[str], data: str | Path | None, tokenizer_fp: str):
    """The shards and domains an expert was trained on: `data` when given, else its own run record."""
    from elmforest.utils.io import read_json

    if data is None:
        run = expert_dir / "elmforest_run.json"
        if not run.is_file():
            raise UserError(
                f"{expert_dir}: no record of its training data (added with `forest add`?); "
                "pass --data SHARDS holding its domain(s)"
            )
        cfg = read_json(run)["data"]
        data, domains = cfg["shards"], cfg["domains"] or domains
        if not Shards.is_shards_dir(data):  # moved or deleted since (a copied forest, another machine)
            raise UserError(
                f"{data}: the shards {run} records its training on are not there (moved or deleted?); "
                "pass --data SHARDS holding its domain(s)"
            )
    if not Shards.is_shards_dir(data):
        raise UserError(f"{data}: not a shards directory (build one with `elmforest shards build`)")
    shards = Shards(data)
    if shards.tokenizer_fingerprint != tokenizer_fp:
        raise UserError(f"{shards.root} was tokenized with a different tokenizer than the forest's experts")
    missing = [d for d in domains if not shards.has(d, "train")]
    if missing:
        raise UserError(f"{shards.root}: no train split for {missing}; pass --data with the experts' shards")
    return shards, list(domains)
