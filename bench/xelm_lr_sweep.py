"""The LR of the X-ELM quickstart's second-round dense arm: the dense LM continued on every language after
a language is added, chosen on the valid split.

    python bench/xelm_lr_sweep.py --out OUT --continue-lrs 5e-4,1e-3,2e-3,4e-3,8e-3

OUT is a finished `elmforest quickstart --corpus multilingual --out OUT`. At each peak LR, its trained
dense LM is continued on all languages (the added one too, mixed equally) for the new expert's steps and
batch (xelm.quickstart.continue_dense), and scored by the mean valid BPB over all languages; the result
lands in OUT/lr-sweep-continue.json. Put the winner into elmforest/xelm/second_round.py (DENSE_CONTINUE_LR).

The first round's LRs (the dense run and seed, the experts of each grouping) are `elmforest sweep` with
the quickstart's grouping files (docs/xelm.md, "Learning rates"):

    elmforest sweep --shards OUT/shards --out OUT/sweep --preset cpu-small \\
        --groups OUT/groups/k2.json,OUT/groups/k4.json,OUT/groups/k8.json \\
        --lrs 2e-3,4e-3,8e-3,1.6e-2 --expert-lrs 4e-3,8e-3,1.6e-2,3.2e-2 --eval-bytes 32000 --workers 2

This part stays here because it is not a sweep point of a BTM plan: no seed and no expert phase, but a
finished quickstart's dense model continued with a language it never saw (X-ELM's second round), which
only the quickstart's settings (xelm-settings.json, the forest the language is added to) define.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from elmforest.config import RunConfig
from elmforest.data.shards import Shards
from elmforest.eval.bpb import evaluate_shards
from elmforest.forest import btm
from elmforest.forest.manifest import Forest
from elmforest.launch.sweep import choose
from elmforest.model.build import load_model
from elmforest.utils.io import write_json_atomic
from elmforest.xelm.quickstart import ADD_K, continue_dense

EVAL_BYTES = 32_000  # per language, as the quickstart scores its arms


def sweep_continuation(out: Path, lrs: list[float]) -> dict:
    """The dense LM continued on every language (the added one too) for the new expert's steps and
    batch, at each peak LR; chosen by the mean valid BPB over all languages."""
    settings = json.loads((out / "xelm-settings.json").read_text())
    shards, forest = Shards(out / "shards"), Forest.load(out / "forest")
    plan = btm.Plan(**forest.data["plan"])
    new, langs = settings["new_language"], settings["languages"]
    k = ADD_K if ADD_K in settings["ks"] else settings["ks"][len(settings["ks"]) // 2]
    steps, batch = plan.total_steps - plan.seed_steps, plan.batch_size // k
    seq = RunConfig.from_dict(forest.data["seed"]["config"]).train.seq_len
    points = []
    for lr in lrs:
        run = continue_dense(
            out / "lr-sweep" / f"continue-{lr:g}", forest, shards, new, steps, batch, False, lr
        )
        r = evaluate_shards(
            load_model(run["model"]), shards, "valid", [*langs, new], seq, 16, EVAL_BYTES, progress=False
        )
        points.append({"lr": lr, "valid_mean_bpb": r["mean_bpb"], "new_language": r["domains"][new]["bpb"]})
    best = choose(points)
    edge = f" (on the grid's {best['at_edge']} end: extend it)" if best["at_edge"] else ""
    print(
        f"dense continued with {new}, mean valid BPB over {len(langs) + 1} languages: "
        + ", ".join(f"{p['lr']:g} {p['valid_mean_bpb']:.4f}" for p in points)
        + f" -> {best['best_lr']:g}{edge}"
    )
    print(f"valid BPB on {new}: " + ", ".join(f"{p['lr']:g} {p['new_language']:.4f}" for p in points))
    result = {
        "points": {f"{p['lr']:g}": p["valid_mean_bpb"] for p in points},
        "new_language": {f"{p['lr']:g}": p["new_language"] for p in points},
        "best": best["best_lr"],
        "at_edge": best["at_edge"],
    }
    write_json_atomic(out / "lr-sweep-continue.json", result)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="a finished X-ELM quickstart directory")
    ap.add_argument(
        "--continue-lrs", required=True, help="comma-separated peak LRs of the continued dense LM"
    )
    a = ap.parse_args()
    sweep_continuation(Path(a.out), [float(x) for x in a.continue_lrs.split(",")])


if __name__ == "__main__":
    main()
