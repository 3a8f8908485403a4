"""Tokenization throughput of the shard builder, next to a one-document-at-a-time baseline.

    python bench/tokenize_throughput.py [--corpus DIR] [--vocab-size 4096]

With no --corpus, the demo corpus is built (cached downloads) into a temporary directory.
The shard builder batches documents through the Rust tokenizer's parallel `encode_batch`; the
baseline encodes the same documents one by one (single-threaded), and `encode_batch` alone over them
gives the batching's own speed-up on the same work (the builder also reads, splits, checks and
writes), all in the same run.
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
        texts = [d.text for d in iter_documents(corpus)]  # read once, untimed: both sides tokenize only
        n = sum(len(x.encode("utf-8")) for x in texts)
        t = time.perf_counter()  # baseline: one encode call each
        for x in texts:
            tok.tokenizer.encode(x, add_special_tokens=False)
        t_serial = time.perf_counter() - t
        t = time.perf_counter()  # the builder's way: batches through the Rust tokenizer's threads
        for i in range(0, len(texts), 1024):
            tok.tokenizer.encode_batch(texts[i : i + 1024], add_special_tokens=False)
        t_batch = time.perf_counter() - t
        print(
            f"corpus: {rep.text_bytes / 1e6:.1f} MB, {rep.tokens:,} tokens "
            f"({rep.text_bytes / rep.tokens:.2f} bytes/token); BPE training {t_tok:.1f}s"
        )
        print(f"shard builder: {rep.seconds:.1f}s = {rep.mb_per_s:.2f} MB/s (read + tokenize + write)")
        print(f"one-by-one encode: {t_serial:.1f}s = {n / 1e6 / t_serial:.2f} MB/s (tokenize only)")
        print(f"encode_batch: {t_batch:.1f}s = {n / 1e6 / t_batch:.2f} MB/s (tokenize only)")
        print(f"speed-up of batching, the same work: {t_serial / t_batch:.2f}x")


if __name__ == "__main__":
    main()
