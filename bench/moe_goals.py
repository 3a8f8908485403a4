"""Issue 14's goals, measured on a finished quickstart: one merged model against the dense LM.

    python bench/moe_goals.py --quickstart quickstart [--ft-steps 64] [--opt-out legal]
        [--owner-lrs 0.001 0.002 0.004 0.008 0.016] [--ft-lrs 0.001 0.002 0.004 0.008 0.016]
        [--dense-lrs 0.001 0.002 0.004] [--dense-tuned-lrs 0.008 0.016 0.032] [--skip-flexolmo]

Arms, each at its own LR chosen on the valid split (`elmforest sweep`'s rule, edges reported):
- flexolmo: FlexOlmo's owner training as the paper does it (`forest expert --branch flexolmo`: the
  seed as a 2-expert MoE, the public FFN frozen, only each owner's FFN and router row train, router
  rows from domain embeddings, the expert phase's steps and batch), merged with no training (`merge
  flexolmo --forest`, top-2 of 9); flexolmo_ensemble: the owners' own models ensembled (cached prior);
  flexolmo_without_X: owner X opted out.
- btx_ft: BTX: the quickstart's experts merged (shared weights averaged, router rows from domain
  embeddings), then the whole MoE fine-tuned on the uniform mix for --ft-steps x 16 sequences with
  the Switch load-balancing loss (0.01), top-2; flexolmo_ft: the FlexOlmo MoE fine-tuned the same way.
- dense_long: the dense run lengthened so its training FLOPs equal seed + experts + fine-tuning (the
  comparison BTX's fine-tuning must win), at its own LR.
- dense_long_tuned: the same FLOPs as dense_long, but the quickstart's dense run continued from its
  seed state (the state the experts branch from) to dense_long's steps, that second part at its own
  LR (--dense-tuned-lrs), as the experts' phase and the fine-tuning have theirs: the quickstart's
  dense_tuned lengthened. The goals are judged against it first.
--skip-flexolmo runs only the BTX and dense arms (FlexOlmo's rows stay as goals.json has them).

Every row is scored on the quickstart's test bytes in and out of domain, with its training FLOPs over
the quickstart dense run's. Writes goals.json beside the quickstart's results and prints the tables
and each goal as met / not met. Resumable: finished runs and scores are kept.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from elmforest.config import RunConfig
from elmforest.data.shards import Shards
from elmforest.eval.bpb import evaluate_shards
from elmforest.eval.report import flops_mark
from elmforest.forest.btm import share_seed
from elmforest.forest.evaluate import evaluate_forest_shards, make_pool
from elmforest.forest.manifest import Forest
from elmforest.launch.executor import LocalExecutor
from elmforest.launch.jobs import ExpertJob, as_dict, continuation_config, run_job
from elmforest.launch.ood_sets import ood_stamp
from elmforest.launch.sweep import choose, score_experts
from elmforest.launch.sweep_results import DIVERGED
from elmforest.merge.flexolmo import forest_pairs, merge_pairs
from elmforest.merge.moe import MoeSpec, export_moe
from elmforest.merge.moe_train import finetune_moe
from elmforest.model.build import load_model
from elmforest.train.trainer import train
from elmforest.utils.errors import Diverged
from elmforest.utils.io import read_json, write_json_atomic

try:
    from common import load_quickstart, score_in_and_out
except ImportError:
    from bench.common import load_quickstart, score_in_and_out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quickstart", required=True)
    ap.add_argument("--ft-steps", type=int, default=64, help="BTX fine-tuning steps of 16 sequences")
    ap.add_argument("--owner-lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2])
    ap.add_argument("--ft-lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2])
    ap.add_argument("--dense-lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3])
    ap.add_argument("--dense-tuned-lrs", type=float, nargs="+", default=[8e-3, 1.6e-2, 3.2e-2])
    ap.add_argument("--skip-flexolmo", action="store_true", help="only the BTX and dense arms")
    ap.add_argument("--opt-out", default="legal")
    args = ap.parse_args()
    qs = Path(args.quickstart)
    base, forest, shards, common = load_quickstart(qs)
    ood = Shards(qs / "shards-ood") if Shards.is_shards_dir(qs / "shards-ood") else None
    ood_common = {**common, "domains": ood.domains} if ood else None
    valid = {**common, "split": "valid", "max_bytes": None}
    path = qs / "goals.json"
    saved = read_json(path) if path.is_file() else {}
    # rows scored on other test bytes (a rebuilt out-of-domain set, other eval settings) are scored again
    scored_on = {"ood": ood_stamp(qs / "shards-ood"), "common": {k: str(v) for k, v in common.items()}}
    if saved.get("scored_on") != scored_on:
        saved = {k: v for k, v in saved.items() if k not in ("methods", "ood_methods", "sources")}
    rows, ood_rows = saved.get("methods", {}), saved.get("ood_methods", {})
    flops, sweeps, sources = saved.get("flops", {}), saved.get("sweeps", {}), saved.get("sources", {})
    dense_flops = base["compute"]["dense_flops"]
    for m in ("dense", "seed", "ensemble", "average"):
        rows[m], flops[m] = base["methods"][m], base["compute"]["methods"][m]
        if ood:
            ood_rows[m] = base["ood_methods"][m]

    def save():
        write_json_atomic(
            path,
            {
                "methods": rows,
                "ood_methods": ood_rows,
                "flops": flops,
                "sweeps": sweeps,
                "sources": sources,
                "opt_out": args.opt_out,
                "scored_on": scored_on,
            },
        )

    def score(name, model_dir, fl):
        if sources.get(name) != str(model_dir):  # another LR won since: score the new winner
            rows.pop(name, None), ood_rows.pop(name, None)
        sources[name] = str(model_dir)
        if name not in rows:
            rows[name], o = score_in_and_out(model_dir, shards, ood, common, ood_common)
            if o is not None:
                ood_rows[name] = o
        flops[name] = fl
        save()

    def valid_bpb(model_dir) -> float:
        return evaluate_shards(load_model(model_dir), shards, progress=False, **valid)["mean_bpb"]

    def pick(name, points):
        sw = {"points": [{"lr": p["lr"], "valid_mean_bpb": p["valid_mean_bpb"]} for p in points]}
        sw.update(choose(sw["points"]))
        sweeps[name] = sw
        shown = [
            f"{p['lr']:g}: " + ("diverged" if p["valid_mean_bpb"] is None else f"{p['valid_mean_bpb']:.4f}")
            for p in points
        ]
        print(f"{name} sweep: " + ", ".join(shown))
        return next(p for p in points if p["lr"] == sw["best_lr"])

    # 1. FlexOlmo owners, each LR a forest sharing the quickstart's seed
    moe_flex = tag = flex_fl = None
    if not args.skip_flexolmo:
        points = []
        for lr in sorted(args.owner_lrs):
            f = share_seed(qs / f"forest-flexolmo-lr-{lr:g}", forest, forest.names, expert_lr=lr)
            todo = [n for n in forest.names if n not in f.names]
            jobs = [
                ExpertJob(
                    str(f.root),
                    str(Path(shards.root).resolve()),
                    forest.expert(n)["domains"][0],
                    branch="flexolmo",
                    threads=1,
                )
                for n in todo
            ]
            if jobs:
                LocalExecutor(2).map(
                    run_job,
                    [as_dict(j) for j in jobs],
                    [j.label for j in jobs],
                    [j.run_dir() / "job.log" for j in jobs],
                )
            f = Forest.load(f.root)
            points.append({"lr": lr, **score_experts(f, shards, f.names, common["seq_len"]), "forest": f})
        before = (sweeps.get("flexolmo_owner_lr") or {}).get("best_lr")
        flex = pick("flexolmo_owner_lr", points)["forest"]
        if before is not None and before != sweeps["flexolmo_owner_lr"]["best_lr"]:  # rows of other owners
            for k in [k for k in rows if k.startswith("flexolmo")]:
                rows.pop(k), ood_rows.pop(k, None), flops.pop(k, None)
        flex_fl = flex.total_flops() / dense_flops
        tag = f"lr-{sweeps['flexolmo_owner_lr']['best_lr']:g}"
        moe_flex = qs / f"moe-flexolmo-{tag}"
        if not (moe_flex / "elmforest_moe.json").is_file():
            merge_pairs(forest_pairs(flex), moe_flex)
        score("flexolmo", moe_flex, flex_fl)
        out_dir = qs / f"moe-flexolmo-{tag}-without-{args.opt_out}"
        if not (out_dir / "elmforest_moe.json").is_file():
            merge_pairs(forest_pairs(flex, [args.opt_out]), out_dir)
        score(f"flexolmo_without_{args.opt_out}", out_dir, flex_fl)
        if "flexolmo_ensemble" not in rows:
            fe = {
                "prior_batches": 20,
                "pool": make_pool(flex, batch_size=16),
                "prior": "cached",
                "mode": "ensemble",
            }
            rows["flexolmo_ensemble"] = evaluate_forest_shards(flex, shards, **fe, **common)
            if ood:
                ood_rows["flexolmo_ensemble"] = evaluate_forest_shards(flex, ood, **fe, **ood_common)
            flops["flexolmo_ensemble"] = flex_fl
            save()

    # 2. BTX: the experts merged (shared weights averaged), then the whole MoE fine-tuned
    btx = qs / "moe-btx_avg"
    if not (btx / "elmforest_moe.json").is_file():
        export_moe(forest, btx, MoeSpec(shared="average"))
    ft_flops = None
    arms = [("btx_ft", btx, forest.total_flops() / dense_flops)]
    arms += [] if args.skip_flexolmo else [("flexolmo_ft", moe_flex, flex_fl)]
    for name, src, fl in arms:
        pts = []
        for lr in sorted(args.ft_lrs):
            out = qs / f"moe-{name}{'' if name == 'btx_ft' else '-' + tag}-{args.ft_steps}-lr-{lr:g}"
            if not (out / "elmforest_moe.json").is_file() or "finetuning" not in read_json(
                out / "elmforest_moe.json"
            ):
                finetune_moe(src, shards.root, args.ft_steps, out=out, lr=lr, progress=False)
            rec = read_json(out / "elmforest_moe.json")["finetuning"]
            pts.append(
                {"lr": lr, "valid_mean_bpb": _cached_valid(out, valid_bpb), "dir": out, "flops": rec["flops"]}
            )
        best = pick(f"{name}_lr", pts)
        ft_flops = best["flops"] if name == "btx_ft" else ft_flops
        score(name, best["dir"], fl + best["flops"] / dense_flops)

    # 3. the dense run lengthened to the fine-tuned MoE's total FLOPs, at its own LR
    target = forest.total_flops() + ft_flops
    dense_run = forest.root / "runs" / "dense"
    cfg0 = RunConfig.from_dict(read_json(dense_run / "model" / "elmforest_run.json"))
    per_step = dense_flops / cfg0.train.steps
    steps = math.ceil(target / per_step)  # whole steps, at least the target: never less than BTX's
    if (over := steps * per_step / target - 1) > 0.01:
        print(
            f"note: the same-FLOPs dense runs take {over:.1%} more FLOPs than BTX's total (whole steps of a short run)"
        )
    pts = []
    for lr in sorted(args.dense_lrs):
        cfg = RunConfig.from_dict(cfg0.to_dict())
        cfg.train.steps, cfg.optim.lr, cfg.train.stop_at = steps, lr, None
        run = qs / f"dense-long-{steps}-lr-{lr:g}"
        pts.append(_dense_point(run, cfg, lr, f"dense at {steps} steps, LR {lr:g}", valid_bpb))
    best = pick("dense_long_lr", pts)
    score("dense_long", best["dir"], steps * per_step / dense_flops)

    # 4. the same FLOPs from the seed state the experts branch from, the second part at its own LR
    # (the dense run's own LR is always in the grid; a point that diverges is one the grid rules out)
    pts = []
    for lr in sorted({*args.dense_tuned_lrs, cfg0.optim.lr}):
        cfg = continuation_config(dense_run / "run_config.json", forest.root / "seed_state", lr)
        cfg.train.steps, cfg.train.stop_at = steps, None
        run = qs / f"dense-long-tuned-{steps}-lr-{lr:g}"
        pts.append(_dense_point(run, cfg, lr, f"dense continued to {steps} steps at LR {lr:g}", valid_bpb))
    best = pick("dense_long_tuned_lr", pts)
    score("dense_long_tuned", best["dir"], steps * per_step / dense_flops)
    report(rows, ood_rows, flops, sweeps, common["domains"], ood.domains if ood else None, args.opt_out)
    save()


def _dense_point(run: Path, cfg: RunConfig, lr: float, label: str, valid_bpb) -> dict:
    """One LR of a dense arm's grid, trained (kept when done) and scored on valid; a run that diverges is
    marked so and is a point the grid rules out (`choose` skips it), not the end of the benchmark."""
    try:
        if not (run / DIVERGED).is_file():
            train(cfg, run, progress=False, label=label)
    except Diverged as e:
        write_json_atomic(run / DIVERGED, {"job": run.name, "why": f"Diverged: {e}"})
    if (run / DIVERGED).is_file():
        return {"lr": lr, "valid_mean_bpb": None, "dir": None}
    return {"lr": lr, "valid_mean_bpb": _cached_valid(run / "model", valid_bpb), "dir": run / "model"}


def _cached_valid(model_dir: Path, fn) -> float:
    p = Path(model_dir) / "valid_bpb.json"
    if p.is_file():
        return read_json(p)["mean_bpb"]
    v = fn(model_dir)
    write_json_atomic(p, {"mean_bpb": v})
    return v


def report(rows, ood_rows, flops, sweeps, domains, ood_domains, opt_out) -> None:
    for title, block, dom in (("in-domain", rows, domains), ("out-of-domain", ood_rows, ood_domains)):
        if not block:
            continue
        print(f"\n{title} test BPB per domain ({len(dom)} domains):")
        heads = "| method | mean | vs dense | vs dense_long | vs dense_long_tuned | train FLOPs / dense | "
        print(heads + " | ".join(dom) + " |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in dom) + " |")
        for m, r in block.items():
            per = " | ".join(f"{r['domains'][d]['bpb']:.3f}" for d in dom)
            a, b, c = (
                r["mean_bpb"] / block[k]["mean_bpb"] if k in block else math.nan
                for k in ("dense", "dense_long", "dense_long_tuned")
            )
            print(
                f"| {m} | {r['mean_bpb']:.4f} | {a:.3f} | {b:.3f} | {c:.3f} | {flops_mark(flops.get(m))} | {per} |"
            )
    for name, sw in sweeps.items():
        edge = f" -- AT THE {sw['at_edge'].upper()} EDGE" if sw["at_edge"] else ""
        print(f"{name}: best {sw['best_lr']:g}{edge}")
    m = lambda blk, k: blk[k]["mean_bpb"]  # noqa: E731
    best_merged = min(
        (k for k in ("flexolmo", "btx_ft", "flexolmo_ft") if k in rows), key=lambda k: m(rows, k)
    )
    goals = []
    if "flexolmo" in rows:
        goals.append(
            (
                "an untrained merged MoE (flexolmo) beats dense in domain",
                m(rows, "flexolmo") < m(rows, "dense"),
            )
        )
    for dense in ("dense_long_tuned", "dense_long"):  # the same FLOPs, the second part tuned first
        goals.append((f"btx_ft beats the same-FLOPs {dense} in domain", m(rows, "btx_ft") < m(rows, dense)))
        if ood_rows:
            goals.append((f"btx_ft beats {dense} out of domain", m(ood_rows, "btx_ft") < m(ood_rows, dense)))
    goals.append(
        ("btx_ft within 1% of the full ensemble in domain", m(rows, "btx_ft") <= 1.01 * m(rows, "ensemble"))
    )
    if f"flexolmo_without_{opt_out}" in rows:
        before, after = rows["flexolmo"], rows[f"flexolmo_without_{opt_out}"]
        others = [d for d in domains if d != opt_out]
        rel = [abs(after["domains"][d]["bpb"] / before["domains"][d]["bpb"] - 1) for d in others] or [0.0]
        goals.append(
            (
                f"opting {opt_out} out moves every other domain < 0.5% (max {100 * max(rel):.2f}%)",
                max(rel) < 0.005,
            )
        )
    print(f"\nbest merged model in domain: {best_merged} ({m(rows, best_merged):.4f})")
    for text, ok in goals:
        print(f"  {'MET    ' if ok else 'NOT MET'}  {text}")


if __name__ == "__main__":
    main()
