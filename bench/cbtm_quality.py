"""c-BTM at matched compute: k in {2, 4, 8} clusters vs metadata-domain BTM vs random split vs dense.

    python bench/cbtm_quality.py --quickstart quickstart [--ks 2 4 8] [--compare-warmup] [--compare-context]

Reuses a finished `elmforest quickstart --split random` directory: its seed (the first half of the
dense run), its dense baseline, BTM forest and random-split forest. For each k it fits k balanced
clusters on the training split, trains one expert per cluster from the same seed (batch B / k, so
seed + experts = the dense run's FLOPs), and evaluates sparse cluster routing (top-1 and top-2) on
the same test documents as the quickstart. Writes `cbtm.json` and `cbtm.png` (BPB against k).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from elmforest.eval.report import flops_mark
from elmforest.forest.evaluate import evaluate_forest_shards, make_pool
from elmforest.quickstart_arms import cluster_forest
from elmforest.utils.io import write_json_atomic

try:
    from common import load_quickstart
except ImportError:
    from bench.common import load_quickstart


def _summary(r: dict) -> dict:
    return {
        "mean_bpb": r["mean_bpb"],
        "fraction_of_full": r["compute"]["fraction_of_full"],
        "fallback_share": r["fallback_share"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quickstart", required=True)
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument(
        "--expert-lrs",
        type=float,
        nargs="+",
        help="sweep the cluster experts' LR per k (each expert scored on its cluster's valid split) and "
        "evaluate the best; default: the seed forest's expert LR for every k",
    )
    ap.add_argument(
        "--compare-warmup",
        action="store_true",
        help="also score each forest without re-routing a document on its first tokens, the router "
        "reading the document before the window (the routing before 12-04: a document opening inside a "
        "window kept the cluster-size fallback to the window's end)",
    )
    ap.add_argument(
        "--compare-context",
        action="store_true",
        help="also score each forest with the router reading the document's text before the window "
        "(router_context='document', the routing before 12-06: context no other row's model sees)",
    )
    args = ap.parse_args()
    qs = Path(args.quickstart)
    base, forest, shards, common = load_quickstart(qs)
    rows = {
        m: base["methods"][m]["mean_bpb"]
        for m in ("dense", "ensemble", "random_ensemble")
        if m in base["methods"]
    }
    # the routings compared with the default: (key, what the line says, evaluate's settings); the
    # first-token-only one reads the document before the window (on the window's own text alone every
    # routing point left would be empty)
    others = []
    if args.compare_warmup:
        warmup = {"reroute": False, "router_context": "document"}
        others.append(("without_warmup", "without re-routing documents on their first tokens", warmup))
    if args.compare_context:
        context = {"router_context": "document"}
        others.append(("document_context", "routed on the document's text before the window too", context))
    cbtm = {}
    for k in args.ks:
        cf, lr_sweep = _best_cluster_forest(qs, forest, k, args.expert_lrs, common["seq_len"])
        pool = make_pool(cf, batch_size=16)
        res = {}
        for top in sorted({1, min(2, k)}):
            r = evaluate_forest_shards(cf, shards, mode="cluster", k=top, pool=pool, **common)
            res[f"top{top}"] = {**_summary(r), "domains": {d: v["bpb"] for d, v in r["domains"].items()}}
            for key, _, how in others:
                o = evaluate_forest_shards(cf, shards, mode="cluster", k=top, pool=pool, **how, **common)
                res[f"top{top}"][key] = _summary(o)
        report = json.loads((qs / f"clusters-{k}" / "report.meta.json").read_text())
        cbtm[k] = {
            "nmi": report.get("nmi"),
            "sizes": report["sizes"],
            **res,
            "forest_flops": cf.total_flops(),
            "expert_lr": (cf.data.get("plan") or {}).get("expert_lr"),
            "lr_sweep": lr_sweep,
        }
        print(
            f"k={k}: NMI {report.get('nmi', float('nan')):.3f}, "
            + ", ".join(f"{n} {v['mean_bpb']:.4f}" for n, v in res.items())
        )
        for n, v in res.items():
            line = f"k={k} {n}: {v['fallback_share']:.1%} of tokens routed by the size fallback"
            for key, said, _ in others:
                w = v[key]
                line += (
                    f"; {said} {w['mean_bpb']:.4f} ({w['fallback_share']:.1%} fallback, "
                    f"{w['fraction_of_full']:.3f} of full passes vs {v['fraction_of_full']:.3f})"
                )
            print(line)
    out = {"baselines": rows, "cbtm": cbtm, "dense_flops": base["compute"]["dense_flops"]}
    write_json_atomic(qs / "cbtm.json", out)
    _plot(out, qs / "cbtm.png")
    flops = base["compute"]["methods"]
    plan = forest.data.get("plan") or {}
    for k, r in cbtm.items():
        how = (
            f"swept per k on the clusters' valid splits over {[p['lr'] for p in r['lr_sweep']['points']]}"
            if r["lr_sweep"]
            else f"not swept for k: the domain experts' LR (their batch {plan['batch_size'] // plan['n_experts']})"
        )
        lr = (
            f"{r['expert_lr']:g}"
            if r["expert_lr"] is not None
            else "none recorded (the run config's optim.lr)"
        )
        print(f"k={k}: cluster experts at batch {plan['batch_size'] // k}, expert LR {lr} ({how})")
    print("| method | mean BPB | vs dense | train FLOPs / dense |\n| --- | ---: | ---: | ---: |")
    for m, v in rows.items():
        print(f"| {m} | {v:.4f} | {v / rows['dense']:.3f} | {flops_mark(flops.get(m))} |")
    for k, r in cbtm.items():
        fl = flops_mark(r["forest_flops"] / out["dense_flops"])
        for n in ("top1", "top2"):
            if n in r:
                print(
                    f"| c-BTM k={k} {n} | {r[n]['mean_bpb']:.4f} | {r[n]['mean_bpb'] / rows['dense']:.3f} | {fl} |"
                )


def _best_cluster_forest(qs: Path, forest, k: int, lrs, seq_len: int):
    """The c-BTM forest for k clusters at the expert LR best on the clusters' valid splits (the
    same criterion as `elmforest sweep`'s expert arm), with the sweep's points; no sweep without lrs."""
    from elmforest.data.shards import Shards
    from elmforest.launch.sweep import choose, score_experts

    if not lrs:
        return cluster_forest(qs, qs / "corpus", forest, k, progress=False, log=print), None
    points = []
    for lr in sorted(lrs):
        cf = cluster_forest(qs, qs / "corpus", forest, k, progress=False, log=print, expert_lr=lr)
        cs = Shards(qs / f"shards-clusters-{k}")
        points.append({"lr": lr, **score_experts(cf, cs, cs.domains, seq_len), "forest": cf})
        print(f"k={k} expert LR {lr:g}: mean valid BPB {points[-1]['valid_mean_bpb']:.4f}")
    sweep = [{"lr": p["lr"], "valid_mean_bpb": p["valid_mean_bpb"]} for p in points]
    pick = choose(sweep)  # the same choice (and edge check) as `elmforest sweep`
    edge = f" (at the {pick['at_edge']} end of the grid)" if pick["at_edge"] else ""
    print(f"k={k}: best expert LR {pick['best_lr']:g}{edge}")
    best = next(p for p in points if p["lr"] == pick["best_lr"])
    return best["forest"], {"points": sweep, **pick}


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(out["cbtm"], key=int)
    fig, ax = plt.subplots(figsize=(6, 4))
    for n, style in (("top1", "o-"), ("top2", "s-")):
        pts = [(int(k), out["cbtm"][k][n]["mean_bpb"]) for k in ks if n in out["cbtm"][k]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"c-BTM {n}")
    for m, v in out["baselines"].items():
        ax.axhline(
            v,
            linestyle="--",
            linewidth=1,
            label=m,
            color={"dense": "k", "ensemble": "tab:green"}.get(m, "tab:red"),
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(k) for k in ks], [str(k) for k in ks])
    ax.set_xlabel("clusters k")
    ax.set_ylabel("mean test BPB (lower is better)")
    ax.set_title("c-BTM vs BTM vs dense at matched compute")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
