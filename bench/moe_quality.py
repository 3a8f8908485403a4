"""One merged MoE vs the forest it came from, at matched training compute, on the demo corpus.

    python bench/moe_quality.py --quickstart quickstart [--router-steps 100] [--opt-out legal]

Reuses a finished quickstart directory (its seed, dense baseline, BTM forest and results). Adds a
FlexOlmo-style forest: the same number of experts branched from the same seed with the same
budget, but training only their MLPs (`train.trainable='\\.mlp\\.'`), so their shared weights stay
the seed's. Then merges into top-2 Mixtral MoEs and evaluates on the same test documents:

- btx_avg / btx_seed: the quickstart's BTM experts (all parameters trained), shared weights
  averaged (BTX) or the seed's.
- flex: the MLP-only experts, shared = seed, router rows from domain embeddings, no training;
  flex_center: the same with centred router rows; flex_hidden: hidden-state rows from the seed;
  flex_rt: flex with its router trained alone for --router-steps steps.
- flex_ensemble / flex_top2: the MLP-only experts ensembled (the MoE's upper reference).
- opt-out: flex without one expert; per-domain BPB before and after.
- oracle: on the opt-out domain, every token forced to that domain's expert (router bypassed), for
  btx_avg, btx_seed and flex: whether the merged MLP still works with the shared weights at all.

Writes moe.json beside the quickstart's results and prints one table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from elmforest.data.shards import Shards
from elmforest.eval.bpb import evaluate_shards
from elmforest.forest import btm
from elmforest.forest.btm import share_seed
from elmforest.forest.evaluate import evaluate_forest_shards, make_pool
from elmforest.merge.moe import MoeSpec, export_moe, train_router
from elmforest.model.build import load_model
from elmforest.utils.io import write_json_atomic

try:
    from common import load_quickstart
except ImportError:
    from bench.common import load_quickstart


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quickstart", required=True)
    ap.add_argument("--router-steps", type=int, default=100)
    ap.add_argument("--router-lr", type=float, default=1e-3)
    ap.add_argument("--opt-out", default="legal", help="expert left out for the opt-out comparison")
    args = ap.parse_args()
    qs = Path(args.quickstart)
    base, forest, shards, common = load_quickstart(qs)
    results_path = qs / "moe.json"
    saved = json.loads(results_path.read_text()) if results_path.is_file() else {}
    rows, oracle = saved.get("methods", {}), saved.get("oracle", {})
    for m in ("dense", "seed", "ensemble", "top2", "average", "average_uniform"):
        rows[m] = base["methods"][m]

    def save():
        write_json_atomic(results_path, {"methods": rows, "oracle": oracle, "opt_out": args.opt_out})

    def moe_row(name, f, spec, out=None):
        out = out or qs / f"moe-{name}"
        if name not in rows:
            export_moe(f, out, spec)
            rows[name] = evaluate_shards(load_model(out), shards, progress=False, **common)
            save()
        return out

    moe_row("btx_avg", forest, MoeSpec(shared="average"))
    moe_row("btx_seed", forest, MoeSpec(shared="seed"))

    flex = share_seed(qs / "forest-flex", forest, forest.names)
    for n in forest.names:
        btm.train_expert(flex, shards, forest.expert(n)["domains"][0], overrides=[r"train.trainable=\.mlp\."])
    if "flex_ensemble" not in rows:
        pool = make_pool(flex, batch_size=16)
        fe = {"prior_batches": 20, "pool": pool, **common}
        rows["flex_ensemble"] = evaluate_forest_shards(flex, shards, mode="ensemble", prior="cached", **fe)
        rows["flex_top2"] = evaluate_forest_shards(flex, shards, mode="topk", k=2, prior="cached", **fe)
        save()
    flex_dir = moe_row("flex", flex, MoeSpec(shared="seed"))
    moe_row("flex_center", flex, MoeSpec(shared="seed", center=True))
    moe_row("flex_hidden", flex, MoeSpec(shared="seed", router="hidden-states"))
    if args.router_steps and "flex_rt" not in rows:
        rt = train_router(
            flex_dir,
            shards.root,
            args.router_steps,
            out=qs / "moe-flex_rt",
            lr=args.router_lr,
            progress=False,
        )
        rows["flex_rt"] = evaluate_shards(load_model(rt), shards, progress=False, **common)
        save()
    moe_row(f"flex_without_{args.opt_out}", flex, MoeSpec(shared="seed", exclude=[args.opt_out]))

    for name in ("btx_avg", "btx_seed", "flex"):
        if name not in oracle:
            oracle[name] = oracle_bpb(qs / f"moe-{name}", args.opt_out, shards, common)
            save()

    domains = common["domains"]
    print(f"test BPB per domain ({len(domains)} domains, matched training compute):")
    print("| method | mean | " + " | ".join(domains) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in domains) + " |")
    for m, r in rows.items():
        per = " | ".join(f"{r['domains'][d]['bpb']:.3f}" for d in domains)
        print(f"| {m} | {r['mean_bpb']:.4f} | {per} |")
    before, after = rows["flex"], rows[f"flex_without_{args.opt_out}"]
    deltas = {d: after["domains"][d]["bpb"] - before["domains"][d]["bpb"] for d in domains}
    others = [abs(v) for d, v in deltas.items() if d != args.opt_out]
    print(
        f"opt-out of {args.opt_out}: its BPB {before['domains'][args.opt_out]['bpb']:.4f} -> "
        f"{after['domains'][args.opt_out]['bpb']:.4f} ({deltas[args.opt_out]:+.4f}); other domains move "
        f"{sum(others) / len(others):.4f} on average (max {max(others):.4f})"
    )
    alone = evaluate_shards(
        load_model(forest.expert_dir(args.opt_out)),
        shards,
        progress=False,
        **{**common, "domains": [args.opt_out]},
    )["domains"][args.opt_out]["bpb"]
    print(
        f"oracle routing on {args.opt_out} (every token to its expert): "
        + ", ".join(f"{k} {v:.4f}" for k, v in oracle.items())
        + f"; the BTM expert alone {alone:.4f}"
    )


def oracle_bpb(moe_dir: Path, domain: str, shards: Shards, common: dict) -> float:
    """BPB on `domain` with every router forced to that domain's expert (weight 1)."""
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    meta = json.loads((moe_dir / "elmforest_moe.json").read_text())
    j = next(e["index"] for e in meta["experts"] if domain in e["domains"])
    orig = MixtralTopKRouter.forward

    def forced(self, h):
        logits, scores, idx = orig(self, h)
        return logits, torch.ones_like(scores[:, :1]), torch.full_like(idx[:, :1], j)

    model = load_model(moe_dir)
    MixtralTopKRouter.forward = forced
    try:
        r = evaluate_shards(model, shards, progress=False, **{**common, "domains": [domain]})
    finally:
        MixtralTopKRouter.forward = orig
    return r["domains"][domain]["bpb"]


if __name__ == "__main__":
    main()
