"""Inference cost of a forest: top-1, top-2 and the full ensemble, and the forest merged into one
top-2 Mixtral MoE, vs one expert (= one dense model of the same shape), side by side.

    python bench/forest_inference.py [--experts 8] [--tokens 60000] [--rounds 2]

Builds a forest of randomly initialised `cpu-small` experts on synthetic shards (speed does not
depend on what the weights learned), then times, on the same test windows: one expert alone
(plain evaluation), the top-1 and top-2 sparse ensembles (experts chosen from the prior, only those
run), the full ensemble, and the MoE export (transformers' Mixtral, top-2 per token; random router
rows, which spread tokens evenly). Each configuration gets a fresh expert pool (no cached
log-probs). Target: top-k costs <= 1.1·k single-expert passes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from elmforest.config import ModelConfig
from elmforest.data.shards import Shards
from elmforest.data.tokenizer import load_tokenizer, save_tokenizer
from elmforest.eval.bpb import evaluate_shards
from elmforest.forest.evaluate import evaluate_forest_shards, make_pool
from elmforest.forest.manifest import Forest
from elmforest.merge.moe import MoeSpec, export_moe
from elmforest.model.build import build_model, load_model

try:
    from common import synthetic_shards
except ImportError:
    from bench.common import synthetic_shards


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--bytes", type=int, default=180_000, help="test text per domain (whole documents)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = Shards(synthetic_shards(work, 4096))
        tok = load_tokenizer(shards.root)
        forest = Forest.init(work / "forest")
        for j in range(args.experts):
            m = build_model(ModelConfig(preset="cpu-small"), shards.vocab_size, shards.eos_id, seed=j)
            m.save_pretrained(work / f"e{j}")
            save_tokenizer(tok, work / f"e{j}")
            forest.add(work / f"e{j}", f"e{j}", [f"d{j}"])
        common = {
            "split": "train",
            "domains": [shards.domains[0]],
            "seq_len": 256,
            "batch_size": 16,
            "max_bytes": args.bytes,
        }

        def single():
            evaluate_shards(load_model(forest.expert_dir("e0")), shards, progress=False, **common)

        def forest_eval(mode, k):
            pool = make_pool(forest, batch_size=16)
            return evaluate_forest_shards(
                forest, shards, mode=mode, k=k, prior="uniform", pool=pool, **common
            )  # uniform prior: no valid split is read, so only the scoring itself is timed

        export_moe(forest, work / "moe", MoeSpec(router="random", top_k=2))

        def moe():
            evaluate_shards(load_model(work / "moe"), shards, progress=False, **common)

        runs = {
            "one expert": single,
            "MoE top-2": moe,
            "top-1": lambda: forest_eval("topk", 1),
            "top-2": lambda: forest_eval("topk", 2),
            f"full ({args.experts})": lambda: forest_eval("ensemble", 0),
        }
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        from elmforest.eval.bpb import select_documents

        n_tok = select_documents(shards.documents(shards.domains[0], "train"), args.bytes)[1]
        base = statistics.median(times["one expert"])
        print(f"{args.experts} cpu-small experts, ~{n_tok:,} test tokens, threads {torch.get_num_threads()}")
        print(f"{'config':14s} {'tokens/s':>10s} {'cost vs one expert':>20s}")
        for name, ts in times.items():
            t = statistics.median(ts)
            print(f"{name:14s} {n_tok / t:10,.0f} {t / base:20.2f}")


if __name__ == "__main__":
    main()
