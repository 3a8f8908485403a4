"""Trainer throughput vs a bare PyTorch loop, measured side by side (same model, batches, dtype).

    python bench/trainer_throughput.py [--preset cpu-small] [--steps 30] [--rounds 3]

Both loops start from identical weights, use the same AdamW parameter groups, gradient clipping,
autocast dtype and the very same batches (the bare loop gets them pre-materialised, so it is an
upper bound). Rounds alternate between the two so machine noise hits both alike. Also reports the
achieved FLOP/s (elmforest's FLOPs formula) against a measured matmul peak.
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


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def ours(cfg, work: Path, warm: int) -> float:
    run = Path(tempfile.mkdtemp(dir=work))
    train(cfg, run, progress=False)
    m = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    a = next(x for x in m if x["step"] == warm)
    b = m[-1]
    return (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"])


def bare(cfg, shards: Shards, warm: int) -> float:
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
    )
    s = WindowSampler(shards, None, "train", cfg.train.seq_len, cfg.train.batch_size, cfg.train.seed)
    batches = [s.batch(i).to(dev) for i in range(cfg.train.steps)]
    for i, batch in enumerate(batches):
        if i == warm:
            t = time.perf_counter()
        with autocast(dev, amp):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    return (cfg.train.steps - warm) * cfg.train.tokens_per_step / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    warm = 5
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards_dir = synthetic_shards(work, get_preset(args.preset).vocab_size)
        shards = Shards(shards_dir)
        cfg = preset_run_config(args.preset, str(shards_dir))
        cfg.train.steps, cfg.train.log_every, cfg.train.ckpt_every = args.steps, warm, 0
        ratios, ours_tps, bare_tps = [], [], []
        for r in range(args.rounds):
            a = ours(cfg, work, warm)
            b = bare(cfg, shards, warm)
            ours_tps.append(a)
            bare_tps.append(b)
            ratios.append(a / b)
            print(f"round {r + 1}: elmforest {a:,.0f} tok/s, bare loop {b:,.0f} tok/s, ratio {a / b:.3f}")
        model = build_model(cfg.model, shards.vocab_size, shards.eos_id)
        fpt = flops_per_token(model, cfg.train.seq_len)
        amp = resolve_precision(cfg.train.precision, resolve_device(cfg.train.device))
        peak = matmul_peak(amp or torch.float32)
        achieved = statistics.median(ours_tps) * fpt
        print(
            f"\npreset {args.preset}, {sum(p.numel() for p in model.parameters()):,} params, "
            f"{cfg.train.tokens_per_step} tokens/step, dtype {amp or torch.float32}, threads {torch.get_num_threads()}"
        )
        print(f"median ratio elmforest/bare = {statistics.median(ratios):.3f} (target >= 0.95)")
        print(
            f"achieved {achieved / 1e9:.1f} GFLOP/s vs matmul peak {peak / 1e9:.1f} GFLOP/s "
            f"({achieved / peak:.0%} of peak; {fpt:,} FLOPs/token)"
        )


if __name__ == "__main__":
    main()
