"""In-Context Pretraining ordering: throughput, memory and what the order does, on the demo corpus.

    python bench/icp_order.py [--corpus quickstart/corpus] [--shards quickstart/shards] [--seeds 0 1 2]
                              [--per-domain] [--show-pairs] [--embedder minilm]

Without --corpus it reads quickstart/corpus when present, else builds a synthetic corpus of 20,000
documents (bench/common.py's generator). For each seed it orders the whole corpus from its texts and
prints documents/s with the embedding (tokenising, tf-idf, SVD) included and excluded, the time per
stage, the CPU time of all threads (on a shared machine the wall time mostly measures the other
jobs), the peak RSS, the duplicates dropped, jumps, the mean similarity along the path, and how often
two adjacent documents share a domain (ICP order vs a random order). Reading the files is timed
apart and counted in neither rate. Also: the same with an IVF index instead of exact search, and,
with --shards, the ordering of the shards' training documents from their token ids (TokenDocuments:
no text analysis), exact and IVF, for the whole set and for each domain alone, one and two domains
at a time (`shards build --order icp` orders two at a time on 2+ cores). Each row prints the 1-minute
load average after it. --per-domain orders each domain's texts on its own, as each expert's data
would be.
--embedder also orders a seeded sample of --embedder-docs texts with a sentence encoder and, for
comparison, with tf-idf/SVD (the duplicate threshold then applies to the encoder's cosine). --show-pairs prints sample kNN pairs by tf-idf cosine band (what the duplicate threshold cuts).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from elmforest.cluster.icp import TokenDocuments, icp_plan
from elmforest.cluster.icp_embed import embed
from elmforest.cluster.icp_shards import IcpOrder
from elmforest.data.readers import iter_documents
from elmforest.data.reorder import map_domains
from elmforest.utils.io import write_json_atomic


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_corpus(path: str | None) -> tuple[list[str], np.ndarray, str]:
    if path is None:
        default = Path("quickstart/corpus")
        if default.is_dir():
            path = str(default)
        else:
            try:
                from common import synthetic_corpus
            except ImportError:
                from bench.common import synthetic_corpus

            with tempfile.TemporaryDirectory(prefix="icp-bench-") as tmp:  # read whole, then removed
                path = str(synthetic_corpus(Path(tmp) / "corpus", n_docs=20_000))
                docs = list(iter_documents(path))
            return [d.text for d in docs], np.array([d.domain for d in docs]), "a synthetic corpus"
    docs = list(iter_documents(path))
    return [d.text for d in docs], np.array([d.domain for d in docs]), path


def same_domain(domains: np.ndarray, order: np.ndarray) -> float:
    return float(np.mean(domains[order[:-1]] == domains[order[1:]])) if len(order) > 1 else float("nan")


def run(label: str, data, domains: np.ndarray, **kw) -> dict:
    t, cpu = time.perf_counter(), time.process_time()
    plan = icp_plan(data, **kw)
    total, cpu = time.perf_counter() - t, time.process_time() - cpu
    s = plan.stats
    embed_s = s["seconds"]["embed"]
    n = s["documents"]
    rng = np.random.default_rng(kw.get("seed", 0))
    row = {
        "run": label,
        "documents": n,
        "docs_per_s_with_embedding": n / total,
        "docs_per_s_without_embedding": n / max(total - embed_s, 1e-9),
        "seconds": {"total": round(total, 3), **s["seconds"]},
        "cpu_seconds": round(cpu, 3),  # all threads: on a loaded machine wall time says little
        "docs_per_cpu_s": n / cpu,
        "dropped": s["dropped_duplicates"],
        "exact_duplicates": s["exact_duplicates"],
        "unembedded": s["unembedded"],
        "jumps": s["jumps"],
        "mean_neighbour_similarity": s["mean_neighbour_similarity"],
        "mean_adjacent_similarity": s["mean_adjacent_similarity"],
        "random_adjacent_similarity": s["mean_adjacent_similarity_random_order"],
        "same_domain_adjacent": same_domain(domains, plan.order),
        "same_domain_adjacent_random": same_domain(domains, rng.permutation(plan.order)),
        "knn": s["knn"],
        "peak_rss_mb": round(peak_rss_mb()),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other jobs on the machine's cores
    }
    print(
        f"{label:<28} {n:>7,} docs  {row['docs_per_s_with_embedding']:>8,.0f} docs/s with embedding, "
        f"{row['docs_per_s_without_embedding']:>8,.0f} without | dropped {row['dropped']:,} "
        f"({row['exact_duplicates']:,} exact), jumps {row['jumps']:,}, path sim "
        f"{row['mean_neighbour_similarity']:.3f} (adjacent {row['mean_adjacent_similarity']:.3f} vs random "
        f"{row['random_adjacent_similarity']:.3f}), same domain {row['same_domain_adjacent']:.3f} vs "
        f"random {row['same_domain_adjacent_random']:.3f} | peak RSS {row['peak_rss_mb']} MB",
        flush=True,
    )
    print(
        f"{'':<28} seconds: {row['seconds']}; CPU {cpu:.2f}s ({row['docs_per_cpu_s']:,.0f} docs per "
        f"CPU-second); load average {row['load_average_1min']}",
        flush=True,
    )
    return row


def read_shards(root: Path) -> tuple[TokenDocuments, np.ndarray]:
    index = json.loads((root / "index.json").read_text())
    dtype = np.dtype(index["dtype"])
    toks, ends, domains, offset = [], [], [], 0
    for name, entry in sorted(index["domains"].items()):
        if "train" not in entry["splits"]:
            continue
        folder = root / entry["folder"]
        t = np.fromfile(folder / "train.bin", dtype=dtype)
        e = np.load(folder / "train.docs.npy", allow_pickle=False)[:, 0]
        toks.append(t)
        ends.append(e + offset)
        domains += [name] * len(e)
        offset += len(t)
    eos = index["tokenizer"]["eos_id"]
    docs = TokenDocuments(
        np.concatenate(toks), np.concatenate(ends), index["tokenizer"]["vocab_size"], ignore=(eos,)
    )
    return docs, np.array(domains)


def show_pairs(texts: list[str]) -> None:
    from elmforest.cluster.icp_graph import knn_search
    from elmforest.cluster.icp_pairs import sparse_pair_cosine

    z, x = embed(texts)
    nb, _ = knn_search(z, 10)
    src = np.repeat(np.arange(len(z)), 10)
    v = nb.ravel() >= 0
    src, dst = src[v], nb.ravel()[v]
    cos = sparse_pair_cosine(x, src, dst)
    print(f"tf-idf cosine of kNN pairs: quantiles 50/90/99% {np.quantile(cos, [0.5, 0.9, 0.99]).round(3)}")
    rng = np.random.default_rng(0)
    for lo, hi in ((0.7, 0.8), (0.8, 0.9), (0.9, 0.95), (0.95, 1.01)):
        idx = np.flatnonzero((cos >= lo) & (cos < hi))
        later = len(np.unique(np.maximum(src[idx], dst[idx])))
        print(f"== [{lo}, {hi}): {len(idx):,} pairs, {later:,} later documents")
        for i in rng.choice(idx, min(4, len(idx)), replace=False):
            for j in (src[i], dst[i]):
                print(f"   {cos[i]:.3f} | {texts[j][:110]!r}")
            print()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus")
    ap.add_argument("--shards", help="a shards dir: also order its training documents from token ids")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--per-domain", action="store_true")
    ap.add_argument("--show-pairs", action="store_true")
    ap.add_argument("--embedder", help="also order the texts with this sentence encoder (a dir, or minilm)")
    ap.add_argument("--embedder-docs", type=int, default=2000, help="sample size for --embedder")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    t = time.perf_counter()
    texts, domains, path = read_corpus(args.corpus)
    print(
        f"{path}: {len(texts):,} documents, {sum(map(len, texts)) / 1e6:.1f} M characters, read in "
        f"{time.perf_counter() - t:.2f}s (not counted); peak RSS after reading {peak_rss_mb():.0f} MB",
        flush=True,
    )
    common = {"k": args.k, "dedup_threshold": args.threshold, "threads": args.threads}
    t = time.perf_counter()
    # imports faiss, scikit-learn, numba; loads the compiled kernels, for words and for token ids
    icp_plan(texts[:300], seed=0, **common)
    IcpOrder().warm_up()  # the token-id path, as `shards build` warms it
    print(f"one-time per process (imports, compiled kernels): {time.perf_counter() - t:.2f}s (not counted)")
    rows = []
    for seed in args.seeds:
        rows.append(run(f"texts, exact, seed {seed}", texts, domains, seed=seed, **common))
    rows.append(
        run("texts, IVF (exact_limit=0)", texts, domains, seed=args.seeds[0], exact_limit=0, **common)
    )
    if args.embedder:
        from elmforest.cluster.embedder import SentenceEmbedder

        enc = SentenceEmbedder(args.embedder)
        rng = np.random.default_rng(0)
        pick = np.sort(rng.choice(len(texts), min(args.embedder_docs, len(texts)), replace=False))
        sub, sub_dom = [texts[i] for i in pick], domains[pick]
        rows.append(run(f"texts[{len(pick)}], tf-idf/SVD", sub, sub_dom, seed=args.seeds[0], **common))
        name = Path(str(enc.model_dir)).name
        rows.append(
            run(f"texts[{len(pick)}], {name}", sub, sub_dom, seed=args.seeds[0], embedder=enc, **common)
        )
    if args.per_domain:
        t = time.perf_counter()
        n = 0
        for name in sorted(set(domains.tolist())):
            idx = np.flatnonzero(domains == name)
            plan = icp_plan([texts[i] for i in idx], seed=args.seeds[0], **common)
            n += plan.stats["documents"]
        dt = time.perf_counter() - t
        print(f"{'texts, per domain':<28} {n:>7,} docs  {n / dt:>8,.0f} docs/s with embedding", flush=True)
        rows.append({"run": "texts, per domain", "documents": n, "docs_per_s_with_embedding": n / dt})
    if args.shards:
        docs, tdomains = read_shards(Path(args.shards))
        for seed in args.seeds:
            rows.append(run(f"token ids, exact, seed {seed}", docs, tdomains, seed=seed, **common))
        rows.append(
            run("token ids, IVF (exact_limit=0)", docs, tdomains, seed=args.seeds[0], exact_limit=0, **common)
        )
        subs = {}
        for name in sorted(set(tdomains.tolist())):
            idx = np.flatnonzero(tdomains == name)
            lo = int(docs.ends[idx[0] - 1]) if idx[0] else 0  # a domain's documents are contiguous
            subs[name] = TokenDocuments(
                docs.tokens[lo : docs.ends[idx[-1]]], docs.ends[idx] - lo, docs.vocab_size, docs.ignore
            )
        sizes = {name: len(sub) for name, sub in subs.items()}
        for workers in (1, 2):  # what `shards build --order icp` does: each domain alone, 2 at a time
            for label, extra in (("exact", {}), ("IVF", {"exact_limit": 0})):
                t = time.perf_counter()
                plans = map_domains(
                    lambda name, extra=extra: icp_plan(subs[name], seed=args.seeds[0], **common, **extra),
                    sizes,
                    workers,
                )
                dt = time.perf_counter() - t
                n = sum(p.stats["documents"] for p in plans.values())
                label = f"token ids, per domain, {label}, {workers} at a time"
                print(f"{label:<28} {n:>7,} docs  {n / dt:>8,.0f} docs/s", flush=True)
                rows.append({"run": label, "documents": n, "docs_per_s_with_embedding": n / dt})
    if args.show_pairs:
        show_pairs(texts)
    if args.json:
        write_json_atomic(args.json, rows)


if __name__ == "__main__":
    main()
