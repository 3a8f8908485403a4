"""transformers' MoE expert kernels on CPU, against the dense model of the same shape: a bare forward.

    python bench/moe_kernels.py [--rounds 10] [--impls eager,grouped_mm,batched_mm]

A `cpu-small`-shaped Llama (d=128, 4 layers, SwiGLU 344, vocab 4,096) and the Mixtral with 8 such
MLPs, top-2, random init (the router spreads tokens evenly), one forward of 16 x 256 tokens under bf16
autocast, dense and MoE interleaved so a drifting machine affects both alike. Prints the MoE/dense
time per expert kernel (`eager`, which `load_model` picks on CPU; `grouped_mm`; `batched_mm`, timed
once: it materialises each token's expert weights) and the FLOP ratio (not a floor on time: the extra
MLP matmuls may run faster per FLOP than the shared attention and head).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

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
        default="eager,grouped_mm,batched_mm",
        help="expert kernels to time (batched_mm: one round; minutes on one thread)",
    )
    args = ap.parse_args()
    impls = args.impls.split(",")
    if bad := [i for i in impls if i not in ("eager", "grouped_mm", "batched_mm")]:
        ap.error(f"unknown --impls {bad}: eager, grouped_mm, batched_mm")
    torch.manual_seed(0)
    x = torch.randint(0, SHAPE["vocab_size"], (16, 256))
    dense = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE)).eval()
    moe_cfg = MixtralConfig(**SHAPE, num_local_experts=8, num_experts_per_tok=2)

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
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for impl in impls:
            rounds = 1 if impl == "batched_mm" else args.rounds
            moe = AutoModelForCausalLM.from_config(moe_cfg, experts_implementation=impl).eval()
            for _ in range(1 if impl == "batched_mm" else args.warmup):  # one call each was too few: the
                (
                    once(dense),
                    once(moe),
                )  # dense model, timed first, ran slow for a while (its ratio 1.2-1.3, then 1.5)
            td, tm = [], []
            for _ in range(rounds):
                td.append(once(dense))
                tm.append(once(moe))
            print(
                f"{impl:11s} MoE / dense: median {statistics.median(tm) / statistics.median(td):.2f}, "
                f"best-of {min(tm) / min(td):.2f} ({rounds} interleaved rounds)"
            )


if __name__ == "__main__":
    main()
