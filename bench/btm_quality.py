"""BTM quality at matched compute on the demo corpus, in and out of domain, over several training seeds.

    python bench/btm_quality.py --out bench-runs/btm [--seeds 0 1 2] [--preset cpu-small]
        [--set data.mixture=tokens --set optim.lr=X --expert-lr Y] [--from-quickstart quickstart]

Runs the quickstart pipeline (fair protocol, with the random-split ablation) once per seed, sharing the
corpus, tokenizer and shards, and reports every method's mean BPB in domain and out of domain as mean
± std over seeds, each method's ratio to the compute-matched dense model (mean of per-seed ratios),
and the per-seed gap of the ensemble to dense. Each arm runs at the preset's swept LRs unless --set
optim.lr / --expert-lr say otherwise (the tokens mixture has its own sweep: docs/benchmarks.md).
Finished seeds are reused when the command is run again.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from elmforest.eval.report import flops_mark
from elmforest.quickstart import quickstart
from elmforest.utils.io import write_json_atomic

SHARED = ("corpus", "corpus-ood", "tokenizer", "shards", "shards-ood", "shards-random")


def _rows(results: dict, block: str) -> list[dict]:
    first = next(iter(results.values()))
    if not first.get(block):
        return []
    rows = []
    for m in first[block]:
        vals = [r[block][m]["mean_bpb"] for r in results.values()]
        ratios = [r[block][m]["mean_bpb"] / r[block]["dense"]["mean_bpb"] for r in results.values()]
        rows.append(
            {
                "method": m,
                "mean_bpb": statistics.mean(vals),
                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "vs_dense": statistics.mean(ratios),
                "per_seed": vals,
                "train_flops_vs_dense": first["compute"]["methods"].get(m),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-runs/btm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--expert-lr", type=float)
    ap.add_argument("--no-random", action="store_true", help="skip the random-split ablation")
    ap.add_argument(
        "--from-quickstart",
        help="an existing quickstart dir to reuse as the first seed (and its data); it is extended in place "
        "(the random-split ablation unless --no-random, its logs and results.json rewritten): copy it first "
        "to keep it as it is",
    )
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for s in args.seeds:
        run = out / f"seed{s}"
        if s == args.seeds[0] and args.from_quickstart and not run.exists():
            run.symlink_to(Path(args.from_quickstart).resolve())
        run.mkdir(exist_ok=True)
        first = out / f"seed{args.seeds[0]}"
        if run != first:
            for name in SHARED:  # same data for every seed: only the training seed changes
                if (first / name).exists() and not (run / name).exists():
                    os.symlink((first / name).resolve(), run / name)
        results[s] = quickstart(
            run,
            preset=args.preset,
            overrides=[f"train.seed={s}", *args.overrides],
            split="domains" if args.no_random else "random",
            progress=False,
            expert_lr=args.expert_lr,
        )
    rows, ood_rows = _rows(results, "methods"), _rows(results, "ood_methods")
    gaps = {
        block: [r[block]["ensemble"]["mean_bpb"] - r[block]["dense"]["mean_bpb"] for r in results.values()]
        for block in ("methods", "ood_methods")
        if next(iter(results.values())).get(block)
    }
    summary = {
        "seeds": args.seeds,
        "preset": args.preset,
        "overrides": args.overrides,
        "protocol": {s: r["protocol"] for s, r in results.items()},
        "rows": rows,
        "ood_rows": ood_rows,
        "ensemble_minus_dense": gaps,
        "ablations": {s: r["ablations"] for s, r in results.items()},
        "priors": {s: r["priors"] for s, r in results.items()},
        "compute": {s: r["compute"]["forest_over_dense"] for s, r in results.items()},
    }
    write_json_atomic(out / "summary.json", summary)
    p = next(iter(results.values()))["protocol"]
    print(
        f"{args.preset}, mixture {p['mixture']}, dense LR {p['dense_lr']:g}, expert LR {p['expert_lr']:g}, "
        f"seeds {args.seeds}"
    )
    for title, rs in (("in-domain", rows), ("out-of-domain", ood_rows)):
        if not rs:
            continue
        print(f"\n{title} mean BPB:")
        print("| method | mean ± std | vs dense | train FLOPs / dense | per seed |")
        print("| --- | ---: | ---: | ---: | --- |")
        for r in rs:
            per = ", ".join(f"{v:.4f}" for v in r["per_seed"])
            print(
                f"| {r['method']} | {r['mean_bpb']:.4f} ± {r['std']:.4f} | {r['vs_dense']:.3f} | "
                f"{flops_mark(r['train_flops_vs_dense'])} | {per} |"
            )
    for block, g in gaps.items():
        print(f"ensemble - dense ({block}), per seed: " + ", ".join(f"{x:+.4f}" for x in g))


if __name__ == "__main__":
    main()
