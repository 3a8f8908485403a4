"""BTM quality at matched compute on the demo corpus, over several training seeds.

    python bench/btm_quality.py --out bench-runs/btm [--seeds 0 1 2] [--preset cpu-small] [--set k=v ...]

Runs the quickstart pipeline (with the random-split ablation) once per seed, sharing the corpus,
tokenizer and shards, and reports the in-domain mean BPB of every method as mean ± std over seeds,
plus each method's ratio to the compute-matched dense model. About 15 minutes per seed on 2 CPU cores
with the defaults; finished seeds are reused when the command is run again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from elmforest.quickstart import quickstart

SHARED = ("corpus", "tokenizer", "shards", "shards-random")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-runs/btm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--from-quickstart", help="an existing quickstart dir to reuse as seed 0 (and its data)")
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
            split="random",
            progress=False,
        )
    methods = list(next(iter(results.values()))["methods"])
    rows = []
    for m in methods:
        vals = [r["methods"][m]["mean_bpb"] for r in results.values()]
        ratios = [r["methods"][m]["mean_bpb"] / r["methods"]["dense"]["mean_bpb"] for r in results.values()]
        rows.append(
            {
                "method": m,
                "mean_bpb": statistics.mean(vals),
                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "vs_dense": statistics.mean(ratios),
                "per_seed": vals,
            }
        )
    summary = {
        "seeds": args.seeds,
        "preset": args.preset,
        "overrides": args.overrides,
        "rows": rows,
        "compute": {s: r["compute"] for s, r in results.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"in-domain mean BPB over seeds {args.seeds} ({args.preset}):")
    print("| method | mean BPB | std | vs dense | per seed |\n| --- | ---: | ---: | ---: | --- |")
    for r in rows:
        per = ", ".join(f"{v:.4f}" for v in r["per_seed"])
        print(f"| {r['method']} | {r['mean_bpb']:.4f} | {r['std']:.4f} | {r['vs_dense']:.3f} | {per} |")


if __name__ == "__main__":
    main()
