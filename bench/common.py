"""Shared set-up for the benchmarks: synthetic data built locally, so they run anywhere offline."""

from __future__ import annotations

import json
import random
from pathlib import Path

from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # per-file save/load bars would bury the measurements


def synthetic_corpus(root: Path, n_docs: int = 3000, seed: int = 0) -> Path:
    """Text with a large random lexicon, so a BPE can fill a few-thousand-token vocabulary."""
    rng = random.Random(seed)
    sy = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "gu", "ba", "ze", "fo", "vi", "ch", "qu"]
    lexicon = ["".join(rng.choice(sy) for _ in range(rng.randint(1, 4))) for _ in range(6000)]
    root.mkdir(parents=True, exist_ok=True)
    for dom in ("alpha", "beta"):
        with open(root / f"{dom}.jsonl", "w") as f:
            for i in range(n_docs // 2):
                text = " ".join(rng.choice(lexicon) for _ in range(rng.randint(50, 400)))
                f.write(json.dumps({"id": f"{dom}/{i}", "text": text}) + "\n")
    return root


def synthetic_shards(work: Path, vocab_size: int) -> Path:
    from elmforest.data.bpe import train_bpe_on
    from elmforest.data.shards import Shards
    from elmforest.data.shards_build import build_shards
    from elmforest.data.tokenizer import save_tokenizer

    shards = work / "shards"
    if Shards.is_shards_dir(shards):
        return shards
    corpus = synthetic_corpus(work / "corpus")
    tok, _ = train_bpe_on(corpus, vocab_size)
    save_tokenizer(tok, work / "tok")
    build_shards(corpus, tok, shards, progress=False)
    return shards


def random_forest(work: Path, n_experts: int, preset: str = "cpu-small"):
    """(forest, shards, tokenizer): `n_experts` randomly initialised experts on synthetic shards. Speed
    does not depend on what the weights learned, so the benchmarks of inference need no training."""
    from elmforest.config import ModelConfig
    from elmforest.data.shards import Shards
    from elmforest.data.tokenizer import load_tokenizer, save_tokenizer
    from elmforest.forest.manifest import Forest
    from elmforest.model.build import build_model

    shards = Shards(synthetic_shards(work, 4096))
    tok = load_tokenizer(shards.root)
    forest = Forest.init(work / "forest")
    for j in range(n_experts):
        m = build_model(ModelConfig(preset=preset), shards.vocab_size, shards.eos_id, seed=j)
        m.save_pretrained(work / f"e{j}")
        save_tokenizer(tok, work / f"e{j}")
        forest.add(work / f"e{j}", f"e{j}", [f"d{j}"])
    return forest, shards, tok


def load_quickstart(qs: Path):
    """A finished quickstart dir: (results, forest, shards, eval kwargs scoring the same test
    documents as its table)."""
    from elmforest.data.shards import Shards
    from elmforest.forest.manifest import Forest

    base = json.loads((qs / "results.json").read_text())
    first = base["methods"]["dense"]
    common = {
        "split": "test",
        "domains": list(first["domains"]),
        "seq_len": first["seq_len"],
        "batch_size": 16,
        "max_bytes": first["max_bytes"],
    }
    return base, Forest.load(qs / "forest"), Shards(qs / "shards"), common


def score_in_and_out(model_dir, shards, ood, common: dict, ood_common: dict | None):
    """One model's test rows on the in-domain shards and, when there are any, the out-of-domain ones."""
    from elmforest.eval.bpb import evaluate_shards
    from elmforest.model.build import load_model

    model = load_model(model_dir)
    row = evaluate_shards(model, shards, progress=False, **common)
    return row, (evaluate_shards(model, ood, progress=False, **ood_common) if ood else None)
