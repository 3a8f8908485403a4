"""The X-ELM quickstart's learning rates, each arm swept on its own and chosen on the valid split.

    python bench/xelm_lr_sweep.py --out OUT [--dense 2e-3,4e-3,8e-3] [--experts 4e-3,8e-3,1.6e-2]

OUT is a finished (or at least prepared) `elmforest quickstart --corpus multilingual --out OUT`: its
shards, groups and seed config are reused. The dense arm: one whole dense run per LR (the seed is its
first half), scored by the mean valid BPB over the languages. The expert arm, for each k: the
experts at each LR from the best dense LR's seed, scored by the mean over languages of the valid BPB
of the expert whose group holds the language. The best point of each grid is printed, with a warning
when it sits on the grid's edge; the results land in OUT/lr-sweep.json. Put the winners into
elmforest/xelm/quickstart.py (DENSE_LR, EXPERT_LRS) and docs/xelm.md.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from elmforest.config import RunConfig
from elmforest.data.shards import Shards
from elmforest.eval.bpb import evaluate_shards
from elmforest.forest import btm
from elmforest.forest.manifest import Forest
from elmforest.launch.executor import LocalExecutor
from elmforest.launch.jobs import DenseRunJob, ExpertJob, as_dict, run_dense_run, run_job
from elmforest.model.build import load_model
from elmforest.utils.io import write_json_atomic


def _valid(path, shards, langs, seq_len) -> float:
    r = evaluate_shards(load_model(path), shards, "valid", langs, seq_len, 16, 32_000, progress=False)
    return r["mean_bpb"]


def _best(points: dict[float, float], what: str) -> float:
    ok = {lr: v for lr, v in points.items() if math.isfinite(v)}
    best = min(ok, key=ok.get)
    edge = " (ON THE GRID'S EDGE: extend it)" if best in (min(points), max(points)) else ""
    print(
        f"{what}: " + ", ".join(f"{lr:g} {v:.4f}" for lr, v in sorted(points.items())) + f" -> {best:g}{edge}"
    )
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dense", default="2e-3,4e-3,8e-3")
    ap.add_argument("--experts", default="4e-3,8e-3,1.6e-2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--continue-lrs",
        default=None,
        help="instead: the LR of the dense LM continued with the added language (from OUT's dense model)",
    )
    a = ap.parse_args()
    out = Path(a.out)
    if a.continue_lrs:
        return sweep_continuation(out, [float(x) for x in a.continue_lrs.split(",")])
    shards = Shards(out / "shards")
    main_forest = Forest.load(out / "forest")
    base = RunConfig.from_dict(main_forest.data["seed"]["config"])
    plan = btm.Plan(**main_forest.data["plan"])
    langs = list(base.data.domains)
    seq = base.train.seq_len
    root = out / "lr-sweep"
    sroot = str(Path(shards.root).resolve())

    dense_lrs = [float(x) for x in a.dense.split(",")]
    jobs, dirs = [], {}
    for lr in dense_lrs:
        if lr == base.optim.lr:  # the quickstart's own run: reused, not trained again
            dirs[lr] = out / "forest"
            continue
        cfg = RunConfig.from_dict(base.to_dict())
        cfg.optim.lr = lr
        d = root / f"dense-{lr:g}"
        dirs[lr] = d
        jobs.append(
            DenseRunJob(str(d), sroot, cfg.to_dict(), plan.__dict__, threads=1, label=f"dense {lr:g}")
        )
    LocalExecutor(a.workers).map(
        run_dense_run,
        [as_dict(j) for j in jobs],
        [j.label for j in jobs],
        [j.run_dir() / "job.log" for j in jobs],
    )
    dense = {lr: _valid(dirs[lr] / "runs" / "dense" / "model", shards, langs, seq) for lr in dense_lrs}
    best_dense = _best(dense, "dense LR (mean valid BPB)")

    seed_forest = Forest.load(dirs[best_dense])
    expert_lrs = [float(x) for x in a.experts.split(",")]
    ks = sorted(int(p.stem[1:]) for p in (out / "groups").glob("k*.json"))
    groups = {k: json.loads((out / "groups" / f"k{k}.json").read_text())["groups"] for k in ks}
    forests, jobs = {}, []
    for k in ks:
        for lr in expert_lrs:
            mine = Forest.load(out / f"forest-k{k}") if (out / f"forest-k{k}").is_dir() else None
            if mine and best_dense == base.optim.lr and mine.data["plan"]["expert_lr"] == lr:
                forests[k, lr] = mine  # the quickstart's forest at this LR: reused
                continue
            f = btm.share_seed(root / f"k{k}-{lr:g}-seed-{best_dense:g}", seed_forest, list(groups[k]), lr)
            forests[k, lr] = f
            for g, ms in groups[k].items():
                jobs.append(ExpertJob(str(f.root), sroot, ms[0], name=g, threads=1, mix=list(ms)))
    LocalExecutor(a.workers).map(
        run_job,
        [as_dict(j) for j in jobs],
        [f"{j.forest}/{j.label}" for j in jobs],
        [j.run_dir() / "job.log" for j in jobs],
    )
    result = {"dense": {f"{lr:g}": v for lr, v in dense.items()}, "best_dense": best_dense, "experts": {}}
    for k in ks:
        pts = {}
        for lr in expert_lrs:
            f = Forest.load(forests[k, lr].root)
            per = [_valid(f.expert_dir(g), shards, [x], seq) for g, ms in groups[k].items() for x in ms]
            pts[lr] = sum(per) / len(per)
        best = _best(pts, f"k={k} expert LR (mean valid BPB of each language's own expert)")
        result["experts"][k] = {"points": {f"{lr:g}": v for lr, v in pts.items()}, "best": best}
    write_json_atomic(out / "lr-sweep.json", result)
    print(json.dumps(result, indent=1))


def sweep_continuation(out: Path, lrs: list[float]) -> None:
    """The dense arm of the second round: the dense LM continued on every language (the added one too) for
    the new expert's steps and batch, at each peak LR; chosen by the mean valid BPB over all languages."""
    from elmforest.xelm.quickstart import ADD_K, continue_dense

    settings = json.loads((out / "xelm-settings.json").read_text())
    shards, forest = Shards(out / "shards"), Forest.load(out / "forest")
    plan = btm.Plan(**forest.data["plan"])
    new, langs = settings["new_language"], settings["languages"]
    k = ADD_K if ADD_K in settings["ks"] else settings["ks"][len(settings["ks"]) // 2]
    steps, batch = plan.total_steps - plan.seed_steps, plan.batch_size // k
    seq = RunConfig.from_dict(forest.data["seed"]["config"]).train.seq_len
    pts, per = {}, {}
    for lr in lrs:
        run = continue_dense(
            out / "lr-sweep" / f"continue-{lr:g}", forest, shards, new, steps, batch, False, lr
        )
        r = evaluate_shards(
            load_model(run["model"]), shards, "valid", [*langs, new], seq, 16, 32_000, progress=False
        )
        pts[lr], per[lr] = r["mean_bpb"], r["domains"][new]["bpb"]
    best = _best(pts, f"dense continued with {new} (mean valid BPB over {len(langs) + 1} languages)")
    print("valid BPB on " + new + ": " + ", ".join(f"{lr:g} {v:.4f}" for lr, v in per.items()))
    write_json_atomic(
        out / "lr-sweep-continue.json",
        {
            "points": {f"{lr:g}": v for lr, v in pts.items()},
            "new_language": {f"{lr:g}": v for lr, v in per.items()},
            "best": best,
        },
    )


if __name__ == "__main__":
    main()
