"""How the balanced assignment's cost grows with the number of training documents (c-BTM's
`cluster assign --balanced`): the exact auction (by count) and the Lagrangian one (by bytes).

    OMP_NUM_THREADS=1 python bench/balanced_scaling.py [--n 20000 60000 200000] [--k 64]

Scores are cosines of unit vectors to K unit centres, documents drawn with skewed cluster sizes
(8 clusters hold 60% of them), as a corpus with a few large domains gives; capacity ceil(N/K). Prints
seconds per N and the growth exponent between consecutive sizes (1 = linear).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from elmforest.cluster.kmeans import balanced_assign, weighted_balanced_assign


def scores(n: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(k, 100))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    big = min(8, k)
    p = np.r_[np.full(big, 0.6 / big), np.full(k - big, 0.4 / max(k - big, 1))]
    x = c[rng.choice(k, n, p=p / p.sum())] + rng.normal(size=(n, 100)) * 0.15
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x @ c.T


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[20_000, 60_000, 200_000])
    ap.add_argument("--k", type=int, default=64)
    args = ap.parse_args()
    rows = []
    for n in args.n:
        s = scores(n, args.k)
        t = time.perf_counter()
        balanced_assign(s, math.ceil(n / args.k))
        by_count = time.perf_counter() - t
        w = np.random.default_rng(1).integers(100, 5000, n).astype(float)
        t = time.perf_counter()
        weighted_balanced_assign(s, w, w.sum() / args.k * 1.01)
        rows.append((n, by_count, time.perf_counter() - t))
    print(f"K = {args.k}")
    print("| documents | by count (auction) s | growth | by bytes (Lagrangian) s | growth |")
    print("| --- | --- | --- | --- | --- |")
    for i, (n, a, b) in enumerate(rows):
        if i:
            n0, a0, b0 = rows[i - 1]
            ga, gb = (f"N^{math.log(x / x0) / math.log(n / n0):.2f}" for x, x0 in ((a, a0), (b, b0)))
        else:
            ga = gb = "-"
        print(f"| {n:,} | {a:.1f} | {ga} | {b:.1f} | {gb} |")


if __name__ == "__main__":
    main()
