"""Trainer throughput vs a bare PyTorch loop, side by side, and the fraction of the matmul peak.

    python bench/trainer_throughput.py                       # cpu-small (the study's model), 1 thread
    python bench/trainer_throughput.py --model 20m --threads 2
    python bench/trainer_throughput.py --model 40m --threads 2 --variants compile+fused
    python bench/trainer_throughput.py --variants eager,compile,compile+fused --rounds 3

For each variant (eager; `compile`: train.compile, forward + cross-entropy compiled as one function;
`fused`: train.fused_optimizer, AdamW's fused kernel) the elmforest trainer and a bare loop with the very
same switches run alternately, `--rounds` times, so machine noise hits both alike. Both start from
identical weights, use the same AdamW parameter groups, clipping, bf16 autocast and the same batches (the
bare loop gets them pre-materialised: an upper bound). Tokens/s is taken after the warm-up steps (the
compilation is in the warm-up, reported separately).

Then what limits it: the achieved FLOP/s (elmforest's FLOPs formula) against two peaks measured here, a
large square bf16 matmul (timed in every round, beside the variants, since a shared host's peak drifts)
and the model's own matmul shapes (tokens x hidden by hidden x out), and a
profile of one eager step split into matmuls, attention, the loss, the optimizer and the rest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from elmforest.config import apply_overrides
from elmforest.data.shards import Shards
from elmforest.model.build import build_model
from elmforest.model.presets import get_preset, preset_run_config
from elmforest.train.batches import WindowSampler
from elmforest.train.flops import flops_per_token
from elmforest.train.trainer import train
from elmforest.utils.device import autocast, resolve_device, resolve_precision

try:
    from common import synthetic_shards
except ImportError:  # run as a module
    from bench.common import synthetic_shards

# model shapes: a preset, or a preset with overrides (a 20M+ model for the "50% of peak" question); 4
# key/value heads, as measured (grouped-query: cpu-small's count, which a new num_heads kept until
# 2026-12-07, when full attention became what a num_heads alone gives)
MODELS = {
    "cpu-small": ("cpu-small", []),
    "20m": (
        "cpu-small",
        [
            "model.hidden_size=512",
            "model.num_layers=6",
            "model.num_heads=8",
            "model.num_kv_heads=4",
            "model.intermediate_size=1376",
        ],
    ),
    # the same depth at GPT-2 small's width: 64-wide heads and matmuls of 4,096 x 768 x 2,304 and up
    "40m": (
        "cpu-small",
        [
            "model.hidden_size=768",
            "model.num_layers=6",
            "model.num_heads=12",
            "model.num_kv_heads=4",
            "model.intermediate_size=2048",
        ],
    ),
}


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 0.3, tries: int = 5) -> float:
    """FLOP/s of one matmul shape: the best of `tries` timings (noise only ever slows a timing down)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(tries):
        reps, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            a @ b
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t))
    return best


def square_peak(dtype: torch.dtype, tries: int = 5) -> float:
    """The machine's matmul peak: the best square matmul of 1024, 2048 and 4096."""
    return max(matmul_rate(n, n, n, dtype, tries=tries) for n in (1024, 2048, 4096))


def model_matmul_peak(cfg, tokens: int, dtype: torch.dtype) -> float:
    """FLOP/s of the model's own linear layers at this batch (forward shapes), weighted by their FLOPs."""
    h, f, v = cfg.model.hidden_size, cfg.model.intermediate_size, get_preset("cpu-small").vocab_size
    shapes = [(h, 3 * h), (h, h), (h, 2 * f), (f, h), (h, v)]  # qkv, out, gate+up, down, head
    work = [tokens * k * n for k, n in shapes]
    rates = [matmul_rate(tokens, k, n, dtype) for k, n in shapes]
    return sum(work) / sum(w / r for w, r in zip(work, rates, strict=True))


def variant_config(cfg, variant: str):
    c = apply_overrides(cfg, [])
    c.train.compile = "compile" in variant
    c.train.fused_optimizer = "fused" in variant
    return c


def ours(cfg, work: Path, warm: int) -> tuple[float, float]:
    """(tokens/s after warm-up, seconds of warm-up)."""
    run = Path(tempfile.mkdtemp(dir=work))
    train(cfg, run, progress=False)
    m = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    a = next(x for x in m if x["step"] == warm)
    b = m[-1]
    return (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"]), a["elapsed_s"]


def bare(cfg, shards: Shards, warm: int, profile: bool = False):
    dev = resolve_device(cfg.train.device)
    amp = resolve_precision(cfg.train.precision, dev)
    model = build_model(cfg.model, shards.vocab_size, shards.eos_id, seed=cfg.train.seed).to(dev).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    o = cfg.optim
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        **({"fused": True} if cfg.train.fused_optimizer else {}),
    )

    def loss_of(batch):
        with autocast(dev, amp):
            logits = model(input_ids=batch[:, :-1]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    step_loss = torch.compile(loss_of) if cfg.train.compile else loss_of
    s = WindowSampler(shards, None, "train", cfg.train.seq_len, cfg.train.batch_size, cfg.train.seed)
    batches = [s.batch(i).to(dev) for i in range(cfg.train.steps)]

    def step(batch):
        loss = step_loss(batch)
        loss.backward()
        with torch.profiler.record_function(OPTIMIZER_RANGE):  # CPU AdamW runs plain elementwise ops
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    if profile:
        return profile_step(step, batches)
    t0 = time.perf_counter()
    for i, batch in enumerate(batches):
        if i == warm:
            t = time.perf_counter()
        loss = step(batch)
    loss.item()
    return (cfg.train.steps - warm) * cfg.train.tokens_per_step / (time.perf_counter() - t), t - t0


OPTIMIZER = "optimizer (AdamW, clipping)"
OPTIMIZER_RANGE = "elmforest-bench::optimizer"
OTHER = "other (elementwise, norms, copies, casts)"
CATEGORIES = {
    "matmuls": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
    "loss (log-softmax, cross-entropy)": ("aten::_log_softmax", "aten::nll_loss", "aten::cross_entropy"),
}


def profile_step(step, batches) -> dict[str, float]:
    """Self CPU time of a few eager steps by category: where the time goes. Everything under the
    step's optimizer range (clipping, AdamW's per-tensor elementwise kernels on CPU, zeroing) is the
    optimizer's, whatever its ops are called; the rest goes by op name."""
    from torch.profiler import ProfilerActivity, profile

    for b in batches[:3]:
        step(b)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[3:8]:
            step(b)
    totals = dict.fromkeys([*CATEGORIES, OPTIMIZER, OTHER], 0.0)

    def add(e, in_optimizer: bool) -> None:
        in_optimizer = in_optimizer or e.name == OPTIMIZER_RANGE
        cat = OPTIMIZER if in_optimizer else None
        cat = cat or next((c for c, names in CATEGORIES.items() if e.name.startswith(names)), OTHER)
        totals[cat] += e.self_cpu_time_total
        for child in e.cpu_children:
            add(child, in_optimizer)

    for e in prof.events():
        if e.cpu_parent is None:
            add(e, False)
    whole = sum(totals.values())
    return {k: v / whole for k, v in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="cpu-small")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warm", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: as a study or quickstart job)")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: the preset's)")
    ap.add_argument("--variants", default="eager,compile,fused,compile+fused")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="config override, e.g. model.num_layers=2",
    )
    args = ap.parse_args()
    if not 1 <= args.warm < args.steps or args.steps < 8:
        ap.error(
            f"--warm {args.warm}, --steps {args.steps}: need 1 <= --warm < --steps (the timed steps come after "
            "it) and --steps >= 8 (the eager profile times steps 3-7)"
        )
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    preset, overrides = MODELS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards_dir = synthetic_shards(work, get_preset(preset).vocab_size)
        shards = Shards(shards_dir)
        cfg = apply_overrides(preset_run_config(preset, str(shards_dir)), overrides + args.overrides)
        cfg.train.steps, cfg.train.log_every, cfg.train.ckpt_every = args.steps, args.warm, 0
        cfg.train.valid_every = 0
        if args.batch_size:
            cfg.train.batch_size = args.batch_size
        res = {v: {"ours": [], "bare": [], "warm_s": []} for v in variants}
        amp = resolve_precision(cfg.train.precision, resolve_device(cfg.train.device)) or torch.float32
        # the peak drifts with the machine's load and clock (a shared host: 212-406 GFLOP/s on 2 threads
        # within minutes), so it is timed in every round beside the variants and each round's
        # fraction uses its own peak
        peaks = []
        for r in range(args.rounds):
            peaks.append(square_peak(amp, tries=2))
            print(f"round {r + 1} square matmul peak {peaks[-1] / 1e9:.0f} GFLOP/s")
            for v in variants:
                c = variant_config(cfg, v)
                a, wa = ours(c, work, args.warm)
                b, _ = bare(c, shards, args.warm)
                res[v]["ours"].append(a)
                res[v]["bare"].append(b)
                res[v]["warm_s"].append(wa)
                print(
                    f"round {r + 1} {v:>14}: elmforest {a:,.0f} tok/s, bare {b:,.0f} tok/s, ratio {a / b:.3f}"
                )
        model = build_model(cfg.model, shards.vocab_size, shards.eos_id)
        fpt = flops_per_token(model, cfg.train.seq_len)
        square = statistics.median(peaks)
        shaped = model_matmul_peak(cfg, cfg.train.tokens_per_step, amp)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"\nmodel {args.model}: {n_params:,} params, {fpt:,} FLOPs/token, {cfg.train.tokens_per_step} "
            f"tokens/step, {amp}, {args.threads} thread(s)"
        )
        print(
            f"peaks: best square matmul (1024-4096), median of the rounds' {square / 1e9:.0f} GFLOP/s "
            f"({', '.join(f'{x / 1e9:.0f}' for x in peaks)}); the model's matmul shapes {shaped / 1e9:.0f} GFLOP/s"
        )
        base = statistics.median(res[variants[0]]["ours"])
        print(
            "| variant | elmforest tok/s | bare tok/s | elmforest / bare | vs first | GFLOP/s | of square peak | of shaped peak | warm-up s |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for v in variants:
            o, b = statistics.median(res[v]["ours"]), statistics.median(res[v]["bare"])
            ratio = statistics.median(x / y for x, y in zip(res[v]["ours"], res[v]["bare"], strict=True))
            of_peak = statistics.median(x * fpt / pk for x, pk in zip(res[v]["ours"], peaks, strict=True))
            print(
                f"| {v} | {o:,.0f} | {b:,.0f} | {ratio:.3f} | {o / base:.2f}x | {o * fpt / 1e9:.0f} | "
                f"{of_peak:.0%} | {o * fpt / shaped:.0%} | {statistics.median(res[v]['warm_s']):.0f} |"
            )
        shares = bare(variant_config(cfg, "eager"), shards, args.warm, profile=True)
        print("\nwhere an eager step's time goes (self CPU time):")
        for k, v in shares.items():
            print(f"  {k}: {v:.0%}")


if __name__ == "__main__":
    main()
