"""transformers' MoE expert kernels on CPU, against the dense model of the same shape: a bare forward.

    python bench/moe_kernels.py [--rounds 10] [--impls eager,sorted_loop,grouped_mm,batched_mm]

A `cpu-small`-shaped Llama (d=128, 4 layers, SwiGLU 344, vocab 4,096) and the Mixtral with 8 such
MLPs, top-2, random init (the router spreads tokens evenly), one forward of 16 x 256 tokens under bf16
autocast, the dense model and each kernel interleaved, each first in turn and every other round in
reverse order, so a drifting machine, or a run slowed by the one before it, affects them alike.
Prints the MoE/dense time per expert kernel and the FLOP ratio (not a floor on time: the extra MLP
matmuls may run faster per FLOP than the shared attention and head). Kernels: transformers' `eager`, `grouped_mm` and `batched_mm` (timed once: it materialises each token's expert
weights), and elmforest's `sorted_loop` (model/moe_experts.py), which `load_model` picks on CPU; the
largest logit difference of each from the first is printed (0: bit-identical).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

from elmforest.model.moe_experts import NAME as SORTED_LOOP  # (registers it with transformers)

SHAPE = dict(
    vocab_size=4096,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls of each model first")
    ap.add_argument(
        "--impls",
        default=f"eager,{SORTED_LOOP},grouped_mm,batched_mm",
        help="expert kernels to time (batched_mm: one round; minutes on one thread)",
    )
    args = ap.parse_args()
    impls = args.impls.split(",")
    if bad := [i for i in impls if i not in (SORTED_LOOP, "eager", "grouped_mm", "batched_mm")]:
        ap.error(f"unknown --impls {bad}: eager, {SORTED_LOOP}, grouped_mm, batched_mm")
    torch.manual_seed(0)
    x = torch.randint(0, SHAPE["vocab_size"], (16, 256))
    dense = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE)).eval()

    def once(m) -> float:
        t = time.perf_counter()
        m(x)
        return time.perf_counter() - t

    d, L, ff, V, T = 128, 4, 344, 4096, 256
    per_layer = 2 * 4 * d * d + 2 * 2 * T * d  # projections, scores and values (full T)
    dense_fl = L * (per_layer + 2 * 3 * d * ff) + 2 * d * V
    moe_fl = dense_fl + L * 2 * 3 * d * ff
    print(
        f"FLOP ratio of MoE / dense: {moe_fl / dense_fl:.2f} ({moe_fl / 1e6:.2f} vs {dense_fl / 1e6:.2f} MFLOPs/token)"
    )
    models = {"dense": dense}
    for impl in impls:  # the same weights under each kernel; a config each (the kernel is set on it)
        moe_cfg = MixtralConfig(**SHAPE, num_local_experts=8, num_experts_per_tok=2)
        models[impl] = AutoModelForCausalLM.from_config(moe_cfg, experts_implementation=impl).eval()
        if impl != impls[0]:
            models[impl].load_state_dict(models[impls[0]].state_dict())

    looped = ["dense"] + [i for i in impls if i != "batched_mm"]
    times: dict[str, list[float]] = {i: [] for i in ["dense", *impls]}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = models[impls[0]](x[:2]).logits
        for impl in impls[1:]:  # (2 sequences: cheap for batched_mm too, and its warm-up)
            diff = (models[impl](x[:2]).logits - want).abs().max().item()
            print(f"{impl} vs {impls[0]}: largest logit difference {diff:.3g} (bf16 autocast)")
        # one untimed call each was too few: the model timed first ran slow for a while
        for r in range(args.warmup + args.rounds):
            order = looped[(r // 2) % len(looped) :] + looped[: (r // 2) % len(looped)]
            for i in order[::-1] if r % 2 else order:  # each first in turn, every other round reversed
                t = once(models[i])
                if r >= args.warmup:
                    times[i].append(t)
        if "batched_mm" in impls:
            times["batched_mm"].append(once(models["batched_mm"]))
    td = times.pop("dense")
    for impl, tm in times.items():
        n = len(tm)
        print(
            f"{impl:11s} MoE / dense: median {statistics.median(tm) / statistics.median(td):.2f}, "
            f"best-of {min(tm) / min(td):.2f} ({n} round{'s' if n > 1 else ''}, interleaved)"
        )


if __name__ == "__main__":
    main()
