"""The dense run's second half at its own LR, on a finished quickstart: is the forest's advantage the
protocol's?

    python bench/dense_continuation.py --quickstart quickstart [--lrs 0.002 0.004 0.008 0.016 0.032]

The quickstart's experts train their phase at an LR swept for it (`sweep --expert-lrs`), while the
dense run's second half, the part that runs beside them, keeps the whole dense run's LR. Here the dense
run is continued from the same seed state (`forest/seed_state`: the same weights, optimizer moments,
step, data order, batch and steps, so the same FLOPs) with only `optim.lr` changed, each LR scored on
the valid split (the choice, as `sweep` chooses) and on the quickstart's test bytes in and out of
domain, against the quickstart's ensemble. Continuations land in OUT/lr-X (resumable: a finished one
is kept). The LR the quickstart used must reproduce its dense row exactly: the first check.

`elmforest sweep` now tunes this continuation itself (its `continue` arm, on the whole valid split or
--eval-bytes) and the quickstart trains row dense_tuned at the LR it found; this benchmark stays as the
check on a finished quickstart's own test bytes, in and out of domain.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from elmforest.data.shards import Shards
from elmforest.eval.bpb import evaluate_shards
from elmforest.model.build import load_model
from elmforest.train.runcheck import saved_config
from elmforest.train.trainer import train
from elmforest.utils.io import read_json, write_json_atomic

try:
    from common import load_quickstart
except ImportError:
    from bench.common import load_quickstart


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quickstart", default="quickstart")
    ap.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2])
    ap.add_argument("--out", default=None, help="default: QUICKSTART/dense-continuation")
    args = ap.parse_args()
    qs = Path(args.quickstart)
    out = Path(args.out or qs / "dense-continuation")
    results, forest, shards, common = load_quickstart(qs)
    ood = Shards(qs / "shards-ood") if Shards.is_shards_dir(qs / "shards-ood") else None
    valid = {**common, "split": "valid"}
    base = saved_config(forest.root / "runs" / "dense" / "run_config.json")
    rows = []
    for lr in sorted(args.lrs):
        cfg = saved_config(forest.root / "runs" / "dense" / "run_config.json")
        cfg.optim.lr, cfg.train.init_checkpoint, cfg.train.trackers = lr, str(forest.root / "seed_state"), []
        run = out / f"lr-{lr:g}"
        train(cfg, run, progress=False)
        cache = run / "scores.json"
        if not cache.is_file():
            model = load_model(run / "model")
            row = {
                "lr": lr,
                "valid": evaluate_shards(model, shards, progress=False, **valid)["mean_bpb"],
                "test": evaluate_shards(model, shards, progress=False, **common)["mean_bpb"],
                "flops": read_json(run / "summary.json")["flops"],
            }
            if ood is not None:
                row["ood"] = evaluate_shards(
                    model, ood, progress=False, **{**common, "domains": ood.domains}
                )["mean_bpb"]
            write_json_atomic(cache, row)
        rows.append(read_json(cache))
        print(f"lr {lr:g}: valid {rows[-1]['valid']:.4f} test {rows[-1]['test']:.4f}", flush=True)
    ens, dense = results["methods"]["ensemble"]["mean_bpb"], results["methods"]["dense"]["mean_bpb"]
    oods = results.get("ood_methods") or {}
    print(f"\nquickstart: dense LR {base.optim.lr:g} (whole run), dense {dense:.4f}, ensemble {ens:.4f}")
    print(
        "| dense second-half LR | mean valid BPB | mean test BPB | ensemble / dense | OOD dense | "
        "OOD ensemble / dense | OOD ensemble_fixed / dense |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    best = min(rows, key=lambda r: r["valid"])
    for r in rows:
        mark = " (best on valid" + (", the grid's edge)" if r is rows[0] or r is rows[-1] else ")")
        o = r.get("ood")
        cells = [
            f"{r['lr']:g}"
            + (mark if r is best else "")
            + (" (the quickstart's)" if r["lr"] == base.optim.lr else ""),
            f"{r['valid']:.4f}",
            f"{r['test']:.4f}",
            f"{ens / r['test']:.3f}",
        ]
        if o is not None and "ensemble" in oods:
            cells += [
                f"{o:.4f}",
                f"{oods['ensemble']['mean_bpb'] / o:.3f}",
                f"{oods.get('ensemble_fixed', oods['ensemble'])['mean_bpb'] / o:.3f}",
            ]
        print("| " + " | ".join(cells) + " |")
    same = [r for r in rows if r["lr"] == base.optim.lr]
    if same:
        print(
            f"\ncheck: at the quickstart's LR the continuation scores {same[0]['test']:.6f}, its dense row {dense:.6f}"
        )
    write_json_atomic(out / "dense_continuation.json", {"rows": rows, "best_lr": best["lr"], "ensemble": ens})


if __name__ == "__main__":
    main()
