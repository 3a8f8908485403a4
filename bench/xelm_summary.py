"""Mean and spread over seeds of `elmforest quickstart --corpus multilingual` runs, as markdown.

    for s in 0 1 2; do elmforest quickstart --corpus multilingual --out qx-$s --set train.seed=$s; done
    python bench/xelm_summary.py qx-0 qx-1 qx-2

Prints, per language: each arm's mean BPB over the seeds (± the standard deviation), and the number of
seeds in which the arm beat the dense LM on that language; then the added-language table and the
claims: X-ELM's "every language better than the jointly trained model" counts a language only when
the forest won in every seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def main(dirs: list[str]) -> None:
    runs = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    langs = runs[0]["languages"]
    methods = [m for m in runs[0]["methods"] if all(m in r["methods"] for r in runs)]
    n = len(runs)

    def cell(vals: list[float]) -> str:
        return f"{np.mean(vals):.4f} ± {np.std(vals, ddof=1) if n > 1 else 0:.4f}"

    table = [m for m in methods if m in ("dense", "seed") or m.endswith("_ensemble")]
    print(f"per-language BPB, mean ± std over {n} seeds; (w/n): seeds in which the arm beat dense\n")
    print("| language | " + " | ".join(table) + " |")
    print("|---|" + "---:|" * len(table))
    for x in langs:
        row = [x]
        for m in table:
            vals = [r["methods"][m]["domains"][x]["bpb"] for r in runs]
            wins = sum(
                r["methods"][m]["domains"][x]["bpb"] < r["methods"]["dense"]["domains"][x]["bpb"]
                for r in runs
            )
            row.append(cell(vals) + ("" if m == "dense" else f" ({wins}/{n})"))
        print("| " + " | ".join(row) + " |")
    print(
        "| **mean** | " + " | ".join(cell([r["methods"][m]["mean_bpb"] for r in runs]) for m in table) + " |"
    )
    print()
    for m in methods:
        if m in ("dense", "seed"):
            continue
        always = [
            x
            for x in langs
            if all(
                r["methods"][m]["domains"][x]["bpb"] < r["methods"]["dense"]["domains"][x]["bpb"]
                for r in runs
            )
        ]
        never = [x for x in langs if x not in always]
        gain = [1 - r["methods"][m]["mean_bpb"] / r["methods"]["dense"]["mean_bpb"] for r in runs]
        print(
            f"- {m}: mean BPB {cell([r['methods'][m]['mean_bpb'] for r in runs])}, gain over dense {np.mean(gain):+.2%} (seeds {', '.join(f'{g:+.2%}' for g in gain)}); "
            f"better in every seed on {len(always)}/{len(langs)} languages"
            + (f"; not on {', '.join(never)}" if never else "")
        )
    if all(r.get("added") for r in runs):
        new = runs[0]["new_language"]
        rows = [m for m in runs[0]["added"] if all(m in r["added"] for r in runs)]
        print(f"\nadding {new} later: BPB on {new}, and mean over the first-round languages\n")
        print(f"| arm | {new} | first-round mean |")
        print("|---|---:|---:|")
        for m in rows:
            b = [r["added"][m]["domains"][new]["bpb"] for r in runs]
            old = [
                np.mean([r["added"][m]["domains"][x]["bpb"] for x in langs])
                for r in runs
                if all(x in r["added"][m]["domains"] for x in langs)
            ]
            print(f"| {m} | {cell(b)} | {cell(old) if len(old) == n else '-'} |")
    print("\nfindings of each run:")
    for d, r in zip(dirs, runs, strict=True):
        print(f"\n{d}:")
        for line in r["findings"]:
            print(f"  - {line}")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", help="X-ELM quickstart outputs (each holding results.json)")
    main(ap.parse_args().dirs)
