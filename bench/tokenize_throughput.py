"""Tokenization throughput of the shard builder, next to a one-document-at-a-time baseline.

    python bench/tokenize_throughput.py [--corpus DIR] [--vocab-size 4096]

With no --corpus, the demo corpus is built (cached downloads) into a temporary directory.
The shard builder batches documents through the Rust tokenizer's parallel `encode_batch`; the
baseline encodes the same documents one by one (single-threaded), both in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from elmforest.data.bpe import train_bpe_on
from elmforest.data.readers import iter_documents
from elmforest.data.shards_build import build_shards


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus")
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(args.corpus) if args.corpus else Path(tmp) / "corpus"
        if not args.corpus:
            from elmforest.corpora.demo import build_demo_corpus

            build_demo_corpus(corpus, progress=False)
        t = time.perf_counter()
        tok, _ = train_bpe_on(corpus, args.vocab_size)
        t_tok = time.perf_counter() - t
        rep = build_shards(corpus, tok, Path(tmp) / "shards", progress=False)
        # baseline: same documents, one encode call each
        t = time.perf_counter()
        n = 0
        for d in iter_documents(corpus):
            tok.tokenizer.encode(d.text, add_special_tokens=False)
            n += len(d.text.encode("utf-8"))
        t_serial = time.perf_counter() - t
        print(
            f"corpus: {rep.text_bytes / 1e6:.1f} MB, {rep.tokens:,} tokens "
            f"({rep.text_bytes / rep.tokens:.2f} bytes/token); BPE training {t_tok:.1f}s"
        )
        print(f"shard builder: {rep.seconds:.1f}s = {rep.mb_per_s:.2f} MB/s (read + tokenize + write)")
        print(f"one-by-one encode: {t_serial:.1f}s = {n / 1e6 / t_serial:.2f} MB/s (tokenize only)")
        print(f"speed-up {t_serial / rep.seconds:.2f}x")


if __name__ == "__main__":
    main()
