"""One merged MoE vs the forest it came from, at matched training compute, on the demo corpus.

    python bench/moe_quality.py --quickstart quickstart [--router-steps 100] [--opt-out legal]
        [--expert-lrs 0.002 0.004 0.008 0.016 0.032] [--router-lrs 0.0003 0.001 0.003 0.01 0.03 0.1]

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

Fair protocol (issue 10): the MLP-only experts and the router each run at their own LR, swept on
the valid split (the experts each on its own domain, the router on every domain); every row is
scored in domain and on the quickstart's out-of-domain sets, and carries its training FLOPs over
the dense run's (MLP-only experts cost less: frozen weights get no weight gradient; router training
costs more), flagged beyond 1%. Writes moe.json beside the quickstart's results and prints the tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from elmforest.data.shards import Shards
from elmforest.eval.bpb import evaluate_shards
from elmforest.eval.report import flops_mark
from elmforest.forest import btm
from elmforest.forest.btm import share_seed
from elmforest.forest.evaluate import evaluate_forest_shards, make_pool
from elmforest.forest.manifest import Forest
from elmforest.launch.sweep import choose, score_experts
from elmforest.merge.moe import MoeSpec, export_moe
from elmforest.merge.moe_train import train_router
from elmforest.model.build import load_model
from elmforest.utils.io import write_json_atomic

try:
    from common import load_quickstart, score_in_and_out
except ImportError:
    from bench.common import load_quickstart, score_in_and_out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quickstart", required=True)
    ap.add_argument("--router-steps", type=int, default=100)
    ap.add_argument(
        "--router-lrs",
        type=float,
        nargs="+",
        default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
        help="router LR grid (scored on every domain's valid split)",
    )
    ap.add_argument(
        "--expert-lrs",
        type=float,
        nargs="+",
        default=[2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2],
        help="LR grid of the MLP-only experts (each scored on its own domain's valid split)",
    )
    ap.add_argument("--opt-out", default="legal", help="expert left out for the opt-out comparison")
    args = ap.parse_args()
    qs = Path(args.quickstart)
    base, forest, shards, common = load_quickstart(qs)
    ood = Shards(qs / "shards-ood") if Shards.is_shards_dir(qs / "shards-ood") else None
    ood_common = {**common, "domains": ood.domains} if ood else None
    results_path = qs / "moe.json"
    saved = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if saved.get("protocol") != "fair":
        saved = {}  # an older run of this benchmark: untuned LRs, no OOD rows
    rows, ood_rows, oracle = saved.get("methods", {}), saved.get("ood_methods", {}), saved.get("oracle", {})
    flops, sweeps = saved.get("flops", {}), saved.get("sweeps", {})
    dense_flops = base["compute"]["dense_flops"]
    for m in ("dense", "seed", "ensemble", "top2", "average", "average_uniform"):
        rows[m] = base["methods"][m]
        if ood:
            ood_rows[m] = base["ood_methods"][m]
        flops[m] = base["compute"]["methods"][m]

    def save():
        write_json_atomic(
            results_path,
            {
                "protocol": "fair",
                "methods": rows,
                "ood_methods": ood_rows,
                "flops": flops,
                "sweeps": sweeps,
                "oracle": oracle,
                "opt_out": args.opt_out,
            },
        )

    def score(name, model_dir, fl):
        if name not in rows:
            rows[name], o = score_in_and_out(model_dir, shards, ood, common, ood_common)
            if o is not None:
                ood_rows[name] = o
            flops[name] = fl
            save()

    def moe_row(name, f, spec, out=None):
        out = out or qs / f"moe-{name}"
        if not (out / "elmforest_moe.json").is_file():
            export_moe(f, out, spec)
        score(name, out, f.total_flops() / dense_flops)
        return out

    moe_row("btx_avg", forest, MoeSpec(shared="average"))
    moe_row("btx_seed", forest, MoeSpec(shared="seed"))

    # MLP-only experts at their own best LR (their batch is the BTM experts', their trainable set is not)
    points = []
    for lr in sorted(args.expert_lrs):
        f = share_seed(qs / f"forest-flex-lr-{lr:g}", forest, forest.names, expert_lr=lr)
        for n in forest.names:
            btm.train_expert(
                f,
                shards,
                forest.expert(n)["domains"][0],
                overrides=[r"train.trainable=\.mlp\."],
                progress=False,
            )
        f = Forest.load(f.root)
        points.append({"lr": lr, **score_experts(f, shards, f.names, common["seq_len"]), "forest": f})
        print(f"flex experts at LR {lr:g}: mean valid BPB {points[-1]['valid_mean_bpb']:.4f}")
    pts = [{"lr": p["lr"], "valid_mean_bpb": p["valid_mean_bpb"]} for p in points]
    pick = choose(pts)  # the same choice (and edge check) as `elmforest sweep`
    best = next(p for p in points if p["lr"] == pick["best_lr"])
    flex = best["forest"]
    if (sweeps.get("flex_expert_lr") or {}).get("best_lr") != best["lr"]:  # rows of another flex forest
        for m in [m for m in rows if m.startswith("flex")]:
            rows.pop(m), ood_rows.pop(m, None), flops.pop(m, None), oracle.pop(m, None)
    tag = f"-lr-{best['lr']:g}"
    sweeps["flex_expert_lr"] = {"points": pts, **pick}
    flex_fl = flex.total_flops() / dense_flops
    if "flex_ensemble" not in rows:
        pool = make_pool(flex, batch_size=16)
        fe = {"prior_batches": 20, "pool": pool}
        for name, kw in (("flex_ensemble", {"mode": "ensemble"}), ("flex_top2", {"mode": "topk", "k": 2})):
            rows[name] = evaluate_forest_shards(flex, shards, prior="cached", **kw, **fe, **common)
            if ood:
                ood_rows[name] = evaluate_forest_shards(flex, ood, prior="cached", **kw, **fe, **ood_common)
            flops[name] = flex_fl
        save()
    flex_dir = moe_row("flex", flex, MoeSpec(shared="seed"), qs / f"moe-flex{tag}")
    moe_row("flex_center", flex, MoeSpec(shared="seed", center=True), qs / f"moe-flex_center{tag}")
    moe_row("flex_hidden", flex, MoeSpec(shared="seed", router="hidden-states"), qs / f"moe-flex_hidden{tag}")
    if args.router_steps:
        rpoints = []
        for rlr in sorted(args.router_lrs):
            rt = qs / f"moe-flex_rt{tag}-router-lr-{rlr:g}"
            if not (rt / "elmforest_moe.json").is_file():
                train_router(flex_dir, shards.root, args.router_steps, out=rt, lr=rlr, progress=False)
            v = evaluate_shards(load_model(rt), shards, progress=False, **{**common, "split": "valid"})
            rflops = json.loads((rt / "elmforest_moe.json").read_text())["router_training"]["flops"]
            rpoints.append({"lr": rlr, "valid_mean_bpb": v["mean_bpb"], "dir": rt, "flops": rflops})
            print(f"router at LR {rlr:g}: mean valid BPB {v['mean_bpb']:.4f}")
        rpts = [{"lr": p["lr"], "valid_mean_bpb": p["valid_mean_bpb"]} for p in rpoints]
        rpick = choose(rpts)
        rb = next(p for p in rpoints if p["lr"] == rpick["best_lr"])
        if (sweeps.get("router_lr") or {}).get("best_lr") != rb["lr"]:  # scored with another router
            rows.pop("flex_rt", None), ood_rows.pop("flex_rt", None), flops.pop("flex_rt", None)
        sweeps["router_lr"] = {"points": rpts, **rpick, "steps": args.router_steps}
        score("flex_rt", rb["dir"], flex_fl + rb["flops"] / dense_flops)
    moe_row(
        f"flex_without_{args.opt_out}",
        flex,
        MoeSpec(shared="seed", exclude=[args.opt_out]),
        qs / f"moe-flex_without_{args.opt_out}{tag}",
    )

    for name, d in (("btx_avg", "moe-btx_avg"), ("btx_seed", "moe-btx_seed"), ("flex", f"moe-flex{tag}")):
        if name not in oracle:
            oracle[name] = oracle_bpb(qs / d, args.opt_out, shards, common)
            save()

    for title, block, dom in (("in-domain", rows, common["domains"]), ("out-of-domain", ood_rows, None)):
        if not block:
            continue
        dom = dom or ood.domains
        print(f"\n{title} test BPB per domain ({len(dom)} domains):")
        print("| method | mean | vs dense | train FLOPs / dense | " + " | ".join(dom) + " |")
        print("| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in dom) + " |")
        for m, r in block.items():
            per = " | ".join(f"{r['domains'][d]['bpb']:.3f}" for d in dom)
            ratio = r["mean_bpb"] / block["dense"]["mean_bpb"]
            print(f"| {m} | {r['mean_bpb']:.4f} | {ratio:.3f} | {flops_mark(flops.get(m))} | {per} |")
    for name, sw in sweeps.items():
        pts = ", ".join(f"{p['lr']:g}: {p['valid_mean_bpb']:.4f}" for p in sw["points"])
        edge = f" -- AT THE {sw['at_edge'].upper()} EDGE of the grid" if sw["at_edge"] else ""
        print(f"{name} sweep (mean valid BPB): {pts}; best {sw['best_lr']:g}{edge}")
    domains = common["domains"]
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
