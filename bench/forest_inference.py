"""Inference cost of a forest: top-1, top-2 and the full ensemble, and the forest merged into one
top-2 Mixtral MoE, vs one expert (= one dense model of the same shape), side by side.

    python bench/forest_inference.py [--experts 8] [--bytes 180000] [--rounds 2]

Builds a forest of randomly initialised `cpu-small` experts on synthetic shards (speed does not
depend on what the weights learned), then times, on the same windows: one expert alone
(plain evaluation), the top-1 and top-2 sparse ensembles (experts chosen from the prior, only those
run), the full ensemble, and the MoE export (transformers' Mixtral, top-2 per token; random router
rows, which spread tokens evenly), with the expert kernel `load_model` picks on CPU (the sorted loop,
model/moe_experts.py) and, beside it, transformers' eager loop; their ratio is also given paired
round by round, which the machine's drift disturbs less. Each configuration gets a fresh expert pool
(no cached log-probs). The cost is per token: every model is loaded before its timing starts (a
server loads once), and the load times are printed apart. Target: top-k costs <= 1.1·k single-expert passes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from elmforest.data.shards import Shards
from elmforest.data.tokenizer import load_tokenizer
from elmforest.eval.bpb import evaluate_shards
from elmforest.forest.evaluate import evaluate_forest_shards, make_pool
from elmforest.forest.manifest import Forest
from elmforest.merge.moe import MoeSpec, export_moe
from elmforest.model.build import load_model

try:
    from common import random_forest
except ImportError:
    from bench.common import random_forest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument(
        "--bytes",
        type=int,
        default=180_000,
        help="text scored per domain (whole documents of the synthetic shards' training split)",
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=128, help="greedy generation timing (0: skip)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        forest, shards, tok = random_forest(work, args.experts)
        common = {
            "split": "train",
            "domains": [shards.domains[0]],
            "seq_len": 256,
            "batch_size": 16,
            "max_bytes": args.bytes,
        }

        export_moe(forest, work / "moe", MoeSpec(router="random", top_k=2))
        loads: dict[str, list[float]] = {"one expert": [], "MoE top-2": [], f"{args.experts} experts": []}

        def loaded(what: str, load):
            t = time.perf_counter()
            out = load()
            loads[what].append(time.perf_counter() - t)
            return out

        def model_run(what: str, path: Path, experts: str | None = None):
            def setup():
                m = loaded(what, lambda: load_model(path))
                if experts:  # another expert kernel than the one load_model picks
                    m.set_experts_implementation(experts)
                return m

            return setup, lambda m: evaluate_shards(m, shards, progress=False, **common)

        def forest_run(mode: str, k: int):
            def load_all():  # a fresh pool (no cached log-probs) with every expert loaded
                pool = make_pool(forest, batch_size=16)
                for j in range(len(pool.dirs)):
                    pool.model(j)
                return pool

            def setup():
                return loaded(f"{args.experts} experts", load_all)

            # uniform prior: no valid split is read, so only the scoring itself is timed
            return setup, lambda pool: evaluate_forest_shards(
                forest, shards, mode=mode, k=k, prior="uniform", pool=pool, **common
            )

        runs = {
            "one expert": model_run("one expert", forest.expert_dir("e0")),
            "MoE top-2": model_run("MoE top-2", work / "moe"),
            "MoE (eager)": model_run("MoE top-2", work / "moe", "eager"),
            "top-1": forest_run("topk", 1),
            "top-2": forest_run("topk", 2),
            f"full ({args.experts})": forest_run("ensemble", 0),
        }
        times = _interleaved_times(runs, args.rounds)
        from elmforest.eval.bpb import select_documents

        n_tok = select_documents(shards.documents(shards.domains[0], "train"), args.bytes)[1]
        base = statistics.median(times["one expert"])
        print(
            f"{args.experts} cpu-small experts, ~{n_tok:,} tokens scored (synthetic text), threads {torch.get_num_threads()}"
        )
        print(f"{'config':14s} {'tokens/s':>10s} {'cost vs one expert':>20s}")
        for name, ts in times.items():
            t = statistics.median(ts)
            print(f"{name:14s} {n_tok / t:10,.0f} {t / base:20.2f}")
        paired = [a / b for a, b in zip(times["MoE top-2"], times["MoE (eager)"], strict=True)]
        spread = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
        print(
            f"MoE top-2 / MoE (eager), paired by round: median {statistics.median(paired):.3f} "
            f"(quartiles {spread[0]:.3f}, {spread[2]:.3f})"
        )
        print(
            "loading (s, median; not in the times above): "
            + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in loads.items())
        )
        if args.gen_tokens:
            generation(forest, work / "moe", shards, args.gen_tokens, args.rounds)


def _interleaved_times(runs: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each run, the runs interleaved within each round so a machine whose speed
    drifts affects them alike, after one untimed round (the first run, one expert, the baseline of
    every ratio, was timed cold: its median over 2 rounds was half a cold call), each run first in
    turn and the order reversed every other round, so that no run always follows the same one (a run
    timed right after a heavy one can run slower). A run is a function, or (setup, fn): setup's result
    (a loaded model) is made untimed before each call and passed to fn."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds + 1):
        order = names[(r // 2) % len(names) :] + names[: (r // 2) % len(names)]
        for name in order[::-1] if r % 2 else order:
            run = runs[name]
            setup, fn = run if isinstance(run, tuple) else (None, run)
            args = (setup(),) if setup else ()
            t = time.perf_counter()
            fn(*args)
            if r:
                times[name].append(time.perf_counter() - t)
    return times


def generation(forest: Forest, moe_dir: Path, shards: Shards, new_tokens: int, rounds: int) -> None:
    """Greedy decoding of `new_tokens` after a 32-token prompt, batch 1, bf16 autocast where the CPU has
    it: one expert and the merged MoE through transformers' generate, with its KV cache (the default
    the exported config keeps: use_cache=true) and without it, and the 2-expert ensemble through
    `elmforest generate` (each expert keeps its own KV cache, forest/pool.py); the MoE with
    transformers' eager expert loop too, cached."""
    from elmforest.forest.generate import generate
    from elmforest.utils.device import autocast, resolve_precision

    prompt = torch.as_tensor(shards.tokens(shards.domains[0], "train")[:32].astype("int64"))[None]
    amp = resolve_precision("auto", torch.device("cpu"))
    models = {
        "one expert": load_model(forest.expert_dir("e0")).eval(),
        "MoE top-2": load_model(moe_dir).eval(),
        "MoE (eager)": load_model(moe_dir).eval(),
    }
    models["MoE (eager)"].set_experts_implementation("eager")  # transformers' loop, for comparison
    runs = {}
    for name, m in models.items():
        for cache in (True, False) if name != "MoE (eager)" else (True,):

            def run(m=m, cache=cache):
                with torch.no_grad(), autocast(torch.device("cpu"), amp):
                    out = m.generate(
                        prompt,
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                        use_cache=cache,
                    )
                assert out.shape[1] == prompt.shape[1] + new_tokens

            runs[f"{name}, {'KV cache' if cache else 'no cache'}"] = run
    text = load_tokenizer(forest.expert_dir("e0")).decode(prompt[0].tolist())
    pool = make_pool(forest, ["e0", "e1"], "cpu")  # loaded once, like the models above

    def ensemble():
        g = generate(
            forest.root, text, new_tokens, temperature=0.0, experts=["e0", "e1"], device="cpu", pool=pool
        )
        assert len(g.token_ids) == new_tokens, "stopped at EOS: the tokens/s would be wrong"

    runs["2-expert ensemble, KV caches"] = ensemble
    times = _interleaved_times(runs, rounds)
    base = statistics.median(times["one expert, KV cache"])
    print(f"\ngreedy generation: {new_tokens} new tokens after a 32-token prompt, batch 1, precision {amp}")
    print(f"{'config':30s} {'tokens/s':>10s} {'cost vs one expert (cached)':>28s}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:30s} {new_tokens / t:10,.1f} {t / base:28.2f}")


if __name__ == "__main__":
    main()
