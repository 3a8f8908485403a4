"""How a merged MoE routes: per-domain expert load, router entropy, and how often the top-1 expert is the
one trained on the token's own domain.

A router built without joint training can fail quietly: rows that are nearly parallel send every domain
to the same experts, and the MoE then averages experts where it should pick one. These statistics show
it. They are measured on held-out text of each domain (`valid` by default), read from each layer's router
input through a forward pre-hook on `mlp.gate` (the router of every format merge/moe_formats.py writes):
logits = x @ W.T, probabilities = softmax, the selection = top-k, exactly as the formats route.

Hand-written because no library reports routing per *data domain*: training loops log a load-balancing
loss over the batch, not which expert each domain reaches.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from elmforest.data.shards import Shards
from elmforest.eval.bpb import default_seq_len, window_batch
from elmforest.merge.router import sample_windows
from elmforest.utils.errors import UserError
from elmforest.utils.io import read_json, write_json_atomic


@torch.no_grad()
def routing_stats(
    model,
    experts: list[dict],
    shards: Shards,
    domains: list[str] | None = None,
    split: str = "valid",
    tokens: int = 8192,
    seq_len: int | None = None,
    batch_size: int = 8,
) -> dict:
    """{"layers", "experts", "top_k", "domains": {d: {"load": [[per expert] per layer], "load_mean",
    "entropy" (nats, mean over tokens and layers), "entropy_norm" (/ ln E), "top1_own" (share of
    tokens whose top-1 expert was trained on d; None when no expert was), "own" (those experts'
    indices), "tokens"}}, "top1_own_mean"}.

    `experts`: elmforest_moe.json's list (index, name, domains). `tokens` per domain, in windows spread
    evenly over its split."""
    layers = model.model.layers
    gates = [layer.mlp.gate for layer in layers]
    E, k = gates[0].weight.shape[0], int(model.config.num_experts_per_tok)
    if len(experts) != E:
        raise UserError(f"the model has {E} experts but its record lists {len(experts)}")
    seq_len = seq_len or min(model.config.max_position_embeddings, 256)
    domains = domains or shards.domains
    own = {d: [e["index"] for e in experts if d in e["domains"]] for d in domains}
    state: dict = {}

    def hook(i):
        def fn(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float32)
            keep = state["mask"].reshape(-1)
            p = torch.softmax(x[keep] @ module.weight.to(torch.float32).T, dim=-1)
            sel = p.topk(k, dim=-1).indices
            state["load"][i] += torch.bincount(sel.reshape(-1), minlength=E).to("cpu", torch.float64)
            state["entropy"][i] += float(-(p * p.clamp_min(1e-30).log()).sum())
            if own[state["domain"]]:
                hit = torch.isin(sel[:, 0], torch.tensor(own[state["domain"]], device=sel.device))
                state["own"][i] += int(hit.sum())

        return fn

    handles = [g.register_forward_pre_hook(hook(i)) for i, g in enumerate(gates)]
    out: dict = {}
    device = next(model.parameters()).device
    try:
        for d in domains:
            ((stream, ids),) = sample_windows(shards, [d], split, seq_len, tokens)
            L = len(layers)
            state.update(
                domain=d, load=torch.zeros(L, E, dtype=torch.float64), entropy=[0.0] * L, own=[0] * L
            )
            n = 0
            for b in range(0, len(ids), batch_size):
                x, y = window_batch(stream, shards.eos_id, seq_len, ids[b : b + batch_size])
                state["mask"] = (y != -100).to(device)  # the tokens a window scores
                model(input_ids=x.to(device))
                n += int(state["mask"].sum())
            if n == 0:
                raise UserError(f"{shards.root}: no {split} tokens for domain {d!r}")
            load = state["load"] / (n * k)
            ent = sum(state["entropy"]) / (n * L)
            out[d] = {
                "load": load.tolist(),
                "load_mean": load.mean(0).tolist(),
                "entropy": ent,
                "entropy_norm": ent / math.log(E) if E > 1 else 0.0,
                "top1_own": sum(state["own"]) / (n * L) if own[d] else None,
                "own": own[d],  # the experts trained on d, by index (a name need not be its domain's)
                "tokens": n,  # the windows' scored tokens: a few short of `tokens` where one is the last
                "split_tokens": len(stream),
            }
    finally:
        for h in handles:
            h.remove()
    scored = [v["top1_own"] for v in out.values() if v["top1_own"] is not None]
    return {
        "layers": len(layers),
        "experts": [e["name"] for e in sorted(experts, key=lambda e: e["index"])],
        "top_k": k,
        "split": split,
        "domains": out,
        "top1_own_mean": sum(scored) / len(scored) if scored else None,
    }


MAX_CELL_LABELS = 14  # experts or domains past which a heatmap (the report's too) has no number in its cells
MAX_FIGURE_INCHES = 16.0  # and its cells shrink to keep it this size


def plot_load(stats: dict, path: Path) -> None:
    """Heatmap: domains (rows) x experts (columns), the share of routing slots each expert takes,
    averaged over layers; a domain's own expert(s) outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms = list(stats["domains"])
    m = [stats["domains"][d]["load_mean"] for d in doms]
    E = len(stats["experts"])
    # a number in each cell up to MAX_CELL_LABELS a side; past it the figure stops growing (64 x 64
    # labelled cells took 0.6 GB and most of `merge moe`'s time, 128 experts 2.4 GB)
    labelled = max(E, len(doms)) <= MAX_CELL_LABELS
    cell = 0.55 if labelled else min(0.55, MAX_FIGURE_INCHES / max(E, len(doms)))
    fig, ax = plt.subplots(figsize=(1.2 + cell * E, 1.0 + 0.75 * cell * len(doms)))
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i, d in enumerate(doms):
        for j in range(E):
            if labelled:
                ax.text(
                    j,
                    i,
                    f"{m[i][j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="w" if m[i][j] < 0.6 else "k",
                )
            mine = stats["domains"][d].get("own")  # routing.json from before it was recorded: by name
            if (j in mine) if mine is not None else stats["experts"][j] == d:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    ticks = 8 if labelled else 5
    ax.set_xticks(range(E), stats["experts"], rotation=45 if labelled else 90, ha="right", fontsize=ticks)
    ax.set_yticks(range(len(doms)), doms, fontsize=ticks)
    ax.set_title(
        f"expert load per domain\n(top-{stats['top_k']}, mean over {stats['layers']} layers)", fontsize=9
    )
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_routing(
    moe_dir: str | Path,
    shards: str | Path | None = None,
    split: str = "valid",
    tokens: int = 8192,
    device: str = "cpu",
) -> dict:
    """routing.json and routing.png beside a merged MoE (`shards`: default the experts' recorded shards)."""
    from elmforest.model.build import load_model
    from elmforest.utils.io import restore_swapped

    moe_dir = Path(moe_dir)
    restore_swapped(moe_dir)  # a merge or fine-tuning cut between its two renames left it aside
    meta_path = moe_dir / "elmforest_moe.json"
    if not meta_path.is_file():
        raise UserError(f"{moe_dir}: not a merged MoE (no elmforest_moe.json; made by `elmforest merge moe`)")
    meta = read_json(meta_path)
    if shards is None:
        run = moe_dir / "elmforest_run.json"
        shards = read_json(run)["data"]["shards"] if run.is_file() else None
        if shards is None:
            raise UserError(f"{moe_dir}: no record of the experts' shards; pass --shards")
    if not Shards.is_shards_dir(shards):
        raise UserError(f"{shards}: not a shards directory")
    sh = Shards(shards)
    from elmforest.data.tokenizer import load_tokenizer

    if sh.tokenizer_fingerprint != load_tokenizer(moe_dir).fingerprint():
        raise UserError(
            f"{sh.root} was tokenized with a different tokenizer than {moe_dir}; pass shards built with its "
            "tokenizer (its experts' shards: leave out --shards)"
        )
    domains = [d for d in sh.domains if sh.has(d, split)]
    if not domains:
        raise UserError(
            f"{sh.root}: no domain has a {split!r} split to route; pass --split or other --shards"
        )
    model = load_model(moe_dir).to(device).eval()
    stats = routing_stats(model, meta["experts"], sh, domains, split, tokens, default_seq_len(moe_dir))
    # a domain without this split (a small data owner) is not routed: said, not left out of the mean unseen
    stats["missing"] = [d for d in sh.domains if d not in domains]
    plot_load(stats, moe_dir / "routing.png")  # first: routing.json marks the step done (the quickstart)
    write_json_atomic(moe_dir / "routing.json", stats)
    return stats


def summary_line(stats: dict) -> str:
    own = stats["top1_own_mean"]
    ent = sum(v["entropy_norm"] for v in stats["domains"].values()) / len(stats["domains"])  # the same
    return (
        (
            # the mean of each domain's share (domains alike, whatever their tokens), said so
            f"routing on {stats['split']}: top-1 expert = the domain's own for {own:.1%} of a domain's tokens "
            "(mean over domains)"
            if own is not None
            else "routing: no domain has its own expert"
        )
        + f"; router entropy {ent:.2f} of its maximum"
        + _missing(stats)
    )


def _missing(stats: dict) -> str:
    if not (missing := stats.get("missing")):
        return ""
    n = len(stats["domains"])
    return f" (over {n} of {n + len(missing)} domains; no {stats['split']} split: {', '.join(missing)})"
