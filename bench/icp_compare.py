"""In-Context Pretraining vs random document order at matched compute, for a dense LM and a BTM forest.

    python bench/icp_compare.py --base quickstart --out icp-runs --seeds 0 1 2     # trains and scores
    python bench/icp_compare.py --out icp-runs --summary                           # markdown tables

`--base` is a quickstart output (its corpus, tokenizer and source-order shards; `elmforest quickstart`
or launch.prepare.prepare_data makes one). For each seed s and order o in {random, icp} the base shards
are copied into order o with seed s (`elmforest shards reorder`: the same tokens; ICP also drops the
near-duplicates it finds from the training split), then one BTM forest is trained on them exactly as
the quickstart trains its own (the cpu-small preset at its swept LRs; seed = the first half of a
domain-balanced dense run, one expert per domain at batch B/8 continuing it, the dense baseline = the
same run continued), with `data.order` set so a run on the wrong shards is refused. The model seed and
the batch positions are those of seed s in both orders: only the order of the training documents
differs. Contexts are `--seq-len` tokens (512 by default, twice the quickstart's, at half its batch:
the same tokens per step; ICP can only change a context that spans documents, and the demo domains'
documents are mostly longer than 256 tokens).

Every model is scored on the *base* shards (valid/test are identical in every order; the retrieval
pool of eval-crossdoc is then the full training split for both orders): ordinary test BPB (the first
whole documents within `--eval-bytes` of each domain, as the quickstart), and eval-crossdoc's
retrieval-augmented BPB (a test document's first half-context after its nearest training documents,
after random ones, alone) and second half given the first half. Dense = the dense model; forest = the
full ensemble with the cached valid-split prior.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from elmforest.cluster.icp_shards import make_orderer
from elmforest.config import apply_overrides
from elmforest.data.reorder import reorder_shards
from elmforest.data.shards import Shards
from elmforest.eval.bpb import evaluate_shards
from elmforest.eval.crossdoc import evaluate_crossdoc
from elmforest.forest.crossdoc import evaluate_forest_crossdoc
from elmforest.forest.evaluate import evaluate_forest_shards, make_pool
from elmforest.forest.manifest import Forest
from elmforest.forest.plan import plan_for
from elmforest.launch.executor import LocalExecutor
from elmforest.launch.forest import train_forest
from elmforest.model.build import load_model
from elmforest.model.presets import get_preset, preset_run_config
from elmforest.utils.io import read_json, write_json_atomic

ORDERS = ("random", "dedup", "icp")


def shards_for(base: Path, out: Path, order: str, seed: int) -> Shards:
    d = out / "shards" / f"{order}-s{seed}"
    if not Shards.is_shards_dir(d):
        rec = reorder_shards(base / "shards", d, make_orderer(order), seed)
        print(f"  {d}: {sum(x['dropped_documents'] for x in rec['domains'].values())} documents dropped")
    sh = Shards(d)
    if (sh.order["method"], sh.order.get("seed")) != (order, seed):
        raise SystemExit(
            f"{d} holds the {sh.order['method']} order, seed {sh.order.get('seed')}: not this arm's"
        )
    return sh


def run_config(args, names: list[str], shards: Shards, order: str, seed: int):
    cfg = preset_run_config(args.preset, str(shards.root.resolve()))
    cfg.data.domains = names
    return apply_overrides(
        cfg,
        [
            f"data.order={order}",
            f"train.seed={seed}",
            f"train.seq_len={args.seq_len}",
            f"train.batch_size={args.batch_size}",
            *args.set,
        ],
    )


def train_arm(args, base_shards: Shards, shards: Shards, order: str, seed: int) -> Forest:
    names = [d for d in base_shards.domains if base_shards.has(d, "train")]
    cfg = run_config(args, names, shards, order, seed)
    plan, cfg = plan_for(cfg, names, 0.5, args.expert_lr or get_preset(args.preset).expert_lr)
    forest = Forest.init(args.out / f"{order}-s{seed}" / "forest", exist_ok=True)
    train_forest(forest, shards, cfg, plan, executor=LocalExecutor(2), threads=1, progress=False)
    return forest


def _dense_job(job: tuple) -> dict:
    """One dense run of the LR check, in a worker process on one thread (two at a time on 2 cores)."""
    import torch

    from elmforest.config import RunConfig
    from elmforest.train.trainer import train

    torch.set_num_threads(1)
    cfg, run_dir = job
    train(RunConfig.from_dict(cfg), run_dir, progress=False)
    return {"run": run_dir}


def lr_check(args, base_shards: Shards) -> None:
    """Dense runs at other LRs (`--dense-lrs`) in both orders: is the preset's LR the best for each
    order, or would ICP (or random) win only because the LR suits it? Scored like the main runs."""
    from concurrent.futures import ProcessPoolExecutor

    names = [d for d in base_shards.domains if base_shards.has(d, "train")]
    jobs, todo = [], []
    for seed in args.seeds:
        for order in args.orders:
            shards = shards_for(args.base, args.out, order, seed)
            for lr in args.dense_lrs:
                d = args.out / "lr-check" / f"{order}-s{seed}-lr{lr:g}"
                cfg = run_config(args, names, shards, order, seed)
                cfg.optim.lr = lr
                if not (d / "model").is_dir():
                    jobs.append((cfg.to_dict(), str(d)))
                todo.append((order, seed, lr, d))
    with ProcessPoolExecutor(2) as ex:
        list(ex.map(_dense_job, jobs))
    common = {"split": "test", "domains": names, "seq_len": args.seq_len, "batch_size": 16}
    common["max_bytes"] = args.eval_bytes
    rows = {}
    for order, _seed, lr, d in todo:
        res = evaluate_shards(load_model(d / "model"), base_shards, progress=False, **common)
        rows.setdefault((order, lr), []).append(res["mean_bpb"])
    lr0 = get_preset(args.preset).optim.lr
    for order, seed in sorted({(o, s) for o, s, _, _ in todo}):  # the main runs: the preset's LR
        f = args.out / f"{order}-s{seed}" / "results.json"
        if f.exists():
            rows.setdefault((order, lr0), []).append(read_json(f)["bpb"]["dense"]["mean_bpb"])
    write_json_atomic(
        args.out / "lr-check" / "results.json", {f"{o} {lr:g}": v for (o, lr), v in rows.items()}
    )
    print("| order | dense LR | test BPB (mean over seeds) | seeds |")
    print("|---|---:|---:|---:|")
    for (order, lr), v in sorted(rows.items()):
        print(f"| {order} | {lr:g} | {np.mean(v):.4f} | {len(v)} |")


def score_arm(args, base_shards: Shards, forest: Forest) -> dict:
    names = [d for d in base_shards.domains if base_shards.has(d, "test")]
    common = {"split": "test", "domains": names, "seq_len": args.seq_len, "batch_size": 16}
    common["max_bytes"] = args.eval_bytes
    dense_dir = forest.root / "runs" / "dense" / "model"
    pool = make_pool(forest, batch_size=16)  # the valid-split priors computed once for both evaluations
    cd = {"seq_len": args.seq_len, "max_docs": args.max_docs, "seed": 0, "progress": False}
    return {
        "bpb": {
            "dense": evaluate_shards(load_model(dense_dir), base_shards, progress=False, **common),
            "forest": evaluate_forest_shards(
                forest, base_shards, mode="ensemble", prior="cached", pool=pool, **common
            ),
        },
        "crossdoc": {
            "dense": evaluate_crossdoc(dense_dir, base_shards.root, **cd),
            "forest": evaluate_forest_crossdoc(forest.root, base_shards.root, pool=pool, **cd),
        },
        "compute": {"forest_flops": float(forest.total_flops()), "ledger": forest.ledger()},
    }


def run(args) -> None:
    """Train every arm first (each resumable: a rerun skips finished forests), then score them."""
    base_shards = Shards(args.base / "shards")
    if base_shards.order["method"] != "source":
        raise SystemExit(f"{base_shards.root}: the base shards must be in source order")
    arms = [(order, seed) for seed in args.seeds for order in args.orders]
    for order, seed in arms:
        t0 = time.perf_counter()
        print(f"[{order} seed {seed}] shards, forest (seed, {len(base_shards.domains)} experts, dense)")
        shards = shards_for(args.base, args.out, order, seed)
        train_arm(args, base_shards, shards, order, seed)
        print(f"  trained in {time.perf_counter() - t0:.0f}s")
    if args.train_only:
        return
    for order, seed in arms:
        res_path = args.out / f"{order}-s{seed}" / "results.json"
        if res_path.exists():
            continue
        t0 = time.perf_counter()
        forest = Forest.load(args.out / f"{order}-s{seed}" / "forest")
        res = score_arm(args, base_shards, forest)
        res["order"] = Shards(args.out / "shards" / f"{order}-s{seed}").order
        res["seconds"] = {"score": time.perf_counter() - t0}
        res["protocol"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        write_json_atomic(res_path, res)
        print(f"[{order} seed {seed}] scored in {res['seconds']['score']:.0f}s -> {res_path}")


def _ms(xs, signed: bool = False) -> str:
    xs = np.asarray(xs, dtype=float)
    sd = xs.std(ddof=1) if len(xs) > 1 else 0.0
    return f"{xs.mean():+.4f} ± {sd:.4f}" if signed else f"{xs.mean():.4f} ± {sd:.4f}"


CONTRASTS = (
    ("icp", "dedup", "the order"),
    ("dedup", "random", "dropping duplicates"),
    ("icp", "random", "ICP"),
)


def summary(out: Path) -> None:
    """Mean ± std over seeds per order, and paired differences (same seed) that split ICP's effect into
    the order's (icp - dedup: the same documents) and the deduplication's (dedup - random)."""
    runs = {}
    for f in sorted(out.glob("*-s*/results.json")):
        order, seed = f.parent.name.rsplit("-s", 1)
        runs[(order, int(seed))] = read_json(f)
    orders = [o for o in ORDERS if any(k[0] == o for k in runs)]
    seeds = sorted({s for o, s in runs if all((x, s) in runs for x in orders)})
    if not seeds:
        print(f"{out}: no seed has every order scored yet")
        return
    contrasts = [c for c in CONTRASTS if c[0] in orders and c[1] in orders]
    print(f"orders {orders}, {len(seeds)} paired seeds {seeds}; mean ± std over seeds")

    def cond(task, c):
        return lambda res, arm: res["crossdoc"][arm]["tasks"][task]["conditions"][c]["mean_bpb"]

    def gain(task, g):
        return lambda res, arm: res["crossdoc"][arm]["tasks"][task]["gain"][g]["mean"]

    rows = [  # sign: -1 lower is better (BPB), +1 higher (a gain)
        ("test BPB", lambda res, arm: res["bpb"][arm]["mean_bpb"], -1),
        ("retrieval: after nearest train documents", cond("retrieval", "retrieved"), -1),
        ("retrieval: after random train documents", cond("retrieval", "random"), -1),
        ("retrieval: alone", cond("retrieval", "none"), -1),
        ("gain from related text (random - retrieved)", gain("retrieval", "related_text"), +1),
        ("second half after the first half", cond("second_half", "first_half"), -1),
        ("second half alone", cond("second_half", "none"), -1),
        ("gain from the first half (alone - after)", gain("second_half", "first_half"), +1),
    ]
    head = " | ".join(orders) + " | " + " | ".join(f"{x} - {y} ({what})" for x, y, what in contrasts)
    print(f"\n| arm | measure | {head} |")
    print("|---|---|" + "---:|" * (len(orders) + len(contrasts)))
    for arm in ("dense", "forest"):
        for label, fn, sign in rows:
            vals = {o: np.array([fn(runs[(o, s)], arm) for s in seeds]) for o in orders}
            cells = [_ms(vals[o]) for o in orders]
            for x, y, _ in contrasts:
                diff = vals[x] - vals[y]
                cells.append(f"{_ms(diff, signed=True)} ({int((sign * diff > 0).sum())}/{len(diff)})")
            print(f"| {arm} | {label} | " + " | ".join(cells) + " |")
    print("\n(n/m): seeds in which the first order of the difference is better\n")
    for arm in ("dense", "forest"):
        doms = list(runs[(orders[0], seeds[0])]["bpb"][arm]["domains"])
        print(f"{arm}, per domain, mean over seeds: test BPB by order; related-text gain by order")
        print("| domain | " + " | ".join(orders) + " | " + " | ".join(f"gain {o}" for o in orders) + " |")
        print("|---|" + "---:|" * (2 * len(orders)))
        for d in doms:
            bpb = [np.mean([runs[(o, s)]["bpb"][arm]["domains"][d]["bpb"] for s in seeds]) for o in orders]
            g = [
                np.mean(
                    [
                        runs[(o, s)]["crossdoc"][arm]["tasks"]["retrieval"]["gain"]["related_text"][
                            "domains"
                        ][d]
                        for s in seeds
                    ]
                )
                for o in orders
            ]
            print(
                f"| {d} | "
                + " | ".join(f"{x:.4f}" for x in bpb)
                + " | "
                + " | ".join(f"{x:+.4f}" for x in g)
                + " |"
            )
        print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=Path("quickstart"))
    ap.add_argument("--out", type=Path, default=Path("icp-runs"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--orders", nargs="+", default=list(ORDERS), choices=ORDERS)
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--expert-lr", type=float, default=None)
    ap.add_argument("--eval-bytes", type=int, default=200_000)
    ap.add_argument("--max-docs", type=int, default=200)
    ap.add_argument("--set", nargs="*", default=[], help="more run-config overrides, section.key=value")
    ap.add_argument("--summary", action="store_true", help="print the tables of finished runs")
    ap.add_argument("--train-only", action="store_true", help="train every arm, score none")
    ap.add_argument(
        "--dense-lrs", type=float, nargs="*", default=None, help="LR check: dense runs at these LRs instead"
    )
    args = ap.parse_args()
    if args.summary:
        summary(args.out)
    elif args.dense_lrs:
        lr_check(args, Shards(args.base / "shards"))
    else:
        run(args)
        summary(args.out)


if __name__ == "__main__":
    main()
