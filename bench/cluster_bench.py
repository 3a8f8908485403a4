"""c-BTM clustering: quality on the demo corpus, speed vs scikit-learn, incremental vs re-vectorised routing.

    python bench/cluster_bench.py --corpus quickstart/corpus [--k 8] [--tokenizer quickstart/tokenizer]

1. Quality: NMI of k clusters (fitted on the training split) against the true domains, with plain
   nearest-centre assignment and with balanced assignment; cluster sizes max/min.
2. Speed, side by side on the same SVD vectors: fit time of our balanced k-means vs scikit-learn's
   (unbalanced) KMeans, and assignment docs/s (nearest centre, balanced) vs KMeans.predict; plus the
   end-to-end streaming assignment of the corpus (read, embed in workers, write).
3. Routing cost per token at contexts of 256, 1024 and 4096 tokens: the incremental router vs
   re-vectorising the whole prefix (c-BTM's public code), over the next 64 tokens.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from elmforest.cluster.assign import assign_corpus, fit_clusterer, sample_texts
from elmforest.cluster.kmeans import balanced_assign, balanced_kmeans
from elmforest.cluster.router import IncrementalRouter
from elmforest.data.bpe import train_bpe_on
from elmforest.data.readers import iter_documents
from elmforest.data.tokenizer import load_tokenizer


def main() -> None:
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score as nmi

    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--tokenizer", help="tokenizer dir for the routing benchmark (default: train one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        c = fit_clusterer(args.corpus, args.k, tmp / "c", split="train")
        t_fit_total = time.perf_counter() - t
        docs = list(iter_documents(args.corpus))
        domains = [d.domain for d in docs]
        print(
            f"1. quality, k={args.k}, {len(docs):,} documents in {len(set(domains))} domains "
            f"(fit on {c.meta['fit']['documents']:,} training documents, {t_fit_total:.1f}s end to end)"
        )
        for balanced in (False, True):
            t = time.perf_counter()
            rep = assign_corpus(
                tmp / "c", args.corpus, tmp / f"a{balanced}", balanced=balanced, progress=False
            )
            dt = time.perf_counter() - t
            print(
                f"   {'balanced' if balanced else 'nearest '} assignment: NMI {rep['nmi']:.3f}, sizes {rep['sizes']}, "
                f"max/min {rep['max_over_min']:.2f}; streaming {len(docs) / dt:,.0f} docs/s"
            )

        texts, _ = sample_texts(args.corpus, 20_000, split="train")
        z, ok = c.embed(texts)
        z = z[ok]
        t = time.perf_counter()
        _, _, info = balanced_kmeans(z, args.k, seed=0)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        km = KMeans(args.k, n_init=1, random_state=0).fit(z)
        t_sk = time.perf_counter() - t
        zall, okall = c.embed([d.text for d in docs])
        t = time.perf_counter()
        c.scores(zall).argmax(1)
        t_near = time.perf_counter() - t
        t = time.perf_counter()
        balanced_assign(c.scores(zall[okall]), -(-okall.sum() // args.k))
        t_bal = time.perf_counter() - t
        t = time.perf_counter()
        km.predict(zall)
        t_pred = time.perf_counter() - t
        print(f"2. speed on the same {z.shape[1]}-d vectors ({len(z):,} to fit, {len(zall):,} to assign)")
        print(
            f"   fit: balanced k-means {t_ours:.2f}s ({info['iterations']} iterations) vs sklearn KMeans "
            f"{t_sk:.2f}s (unbalanced, sizes {np.bincount(km.labels_).tolist()}): ratio {t_ours / t_sk:.1f}x"
        )
        print(
            f"   assign: nearest centre {len(zall) / t_near:,.0f} docs/s, balanced {okall.sum() / t_bal:,.0f} docs/s, "
            f"sklearn predict {len(zall) / t_pred:,.0f} docs/s"
        )
        print(
            f"   NMI of sklearn's unbalanced KMeans on the whole corpus, for reference: "
            f"{nmi(domains, km.predict(zall)):.3f}"
        )

        tok = load_tokenizer(args.tokenizer) if args.tokenizer else train_bpe_on(args.corpus, 4096)[0]
        text = "\n".join(d.text for d in docs if d.domain == sorted(set(domains))[0])[:400_000]
        ids = tok.encode_batch([text])[0]
        table = tok.token_bytes
        print("3. routing cost per token (the next 64 tokens after a context of L tokens)")
        for L in (256, 1024, 4096):
            router = IncrementalRouter(c, table, None)
            for i in ids[:L]:
                router.push_token(i)
            t = time.perf_counter()
            for i in ids[L : L + 64]:
                router.push_token(i)
                router.embedding()
            inc = (time.perf_counter() - t) / 64
            t = time.perf_counter()
            for j in range(L, L + 64):
                c.embed([tok.decode(ids[:j])])
            scratch = (time.perf_counter() - t) / 64
            print(
                f"   L={L:5d}: incremental {inc * 1e6:8.1f} us/token, re-vectorising {scratch * 1e6:9.1f} us/token "
                f"({scratch / inc:.0f}x)"
            )


if __name__ == "__main__":
    main()
