"""The main job: demo corpus -> tokenizer -> shards -> dense LM -> per-domain bits per byte.

Every stage is skipped when its output already exists, so re-running after a crash continues
where it stopped (training itself resumes from its last checkpoint).
"""

from __future__ import annotations

import time
from pathlib import Path

from elmforest.config import apply_overrides
from elmforest.data.shards import Shards, build_shards
from elmforest.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe_on
from elmforest.eval.bpb import evaluate
from elmforest.eval.report import print_table
from elmforest.model.presets import get_preset, preset_run_config
from elmforest.train.trainer import train
from elmforest.utils.io import read_json, write_json_atomic


def quickstart(
    out: str | Path = "quickstart",
    preset: str = "cpu-small",
    domains: list[str] | None = None,
    overrides: list[str] | tuple = (),
    progress: bool = True,
    corpus: str | Path | None = None,
) -> dict:
    """Run the pipeline into `out`; `corpus` (any JSONL/Parquet/txt data) replaces the demo corpus."""
    out = Path(out)
    p = get_preset(preset)
    t0 = time.perf_counter()

    if corpus is None:
        corpus = out / "corpus"
        if not (corpus / "manifest.json").exists():
            from elmforest.data.demo import build_demo_corpus

            print(f"[1/5] building the demo corpus -> {corpus}")
            build_demo_corpus(corpus, domains=domains, progress=progress)
        manifest = read_json(corpus / "manifest.json")
        for name, why in manifest.get("skipped", {}).items():
            print(f"      skipped domain {name}: {why}")
    corpus = Path(corpus)

    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        print(f"[2/5] training a {p.vocab_size}-token byte-level BPE on the training split")
        tok, _ = train_bpe_on(corpus, p.vocab_size, bytes_per_domain=1_000_000)
        save_tokenizer(tok, tok_dir)

    shards_dir = out / "shards"
    if not Shards.is_shards_dir(shards_dir):
        print(f"[3/5] tokenizing into shards -> {shards_dir}")
        rep = build_shards(corpus, load_tokenizer(tok_dir), shards_dir, progress=progress)
        print(f"      {rep.tokens:,} tokens from {rep.text_bytes / 1e6:.1f} MB ({rep.mb_per_s:.2f} MB/s)")

    cfg = preset_run_config(preset, str(shards_dir.resolve()))
    cfg.data.domains = domains
    cfg = apply_overrides(cfg, list(overrides))
    run_dir = out / "runs" / "dense"
    print(
        f"[4/5] training the dense LM ({preset}, {cfg.train.steps} steps of {cfg.train.tokens_per_step:,} tokens)"
        f" -> {run_dir}"
    )
    summary = train(cfg, run_dir, progress=progress)

    print("[5/5] evaluating bits per byte on each domain's test split")
    res = evaluate(
        run_dir, shards_dir, split="test", domains=domains, batch_size=cfg.train.batch_size, progress=progress
    )
    write_json_atomic(out / "eval" / "dense.json", res)
    results = {
        "methods": {"dense": res},
        "compute": {"dense_flops": summary["flops"], "dense_tokens": summary["tokens"]},
    }
    write_json_atomic(out / "results.json", results)
    print_table(results["methods"])
    print(
        f"dense: {summary['params']:,} parameters, {summary['tokens']:,} tokens, {summary['flops']:.3e} FLOPs; "
        f"total {time.perf_counter() - t0:.0f}s; results in {out / 'results.json'}"
    )
    return results
