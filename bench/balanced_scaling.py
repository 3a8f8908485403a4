"""How the balanced assignment's cost grows with the number of training documents (c-BTM's
`cluster assign --balanced`): the exact auction (by count) and the Lagrangian one (by bytes).

    OMP_NUM_THREADS=1 python bench/balanced_scaling.py [--n 20000 60000 200000] [--k 64] [--against REV]

Scores are cosines of unit vectors to K unit centres, documents drawn with skewed cluster sizes
(8 clusters hold 60% of them), as a corpus with a few large domains gives; capacity ceil(N/K). Prints
seconds per N and the growth exponent between consecutive sizes (1 = linear). `--against REV` also
times the auction of cluster/kmeans.py at git revision REV on the same scores, side by side, and checks
that both give the same labels; `--no-bytes` skips the Lagrangian.

Real scores instead, as `cluster assign --balanced` makes them (tf-idf scores run many more rounds of
a few bidders each than the synthetic ones):

    OMP_NUM_THREADS=1 python bench/balanced_scaling.py --clusterer CLUS --data DIR [--fractions 0.1 1]

scores the training documents of the first fraction of each DIR/*.jsonl file with the clusterer.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import tempfile
import time
from pathlib import Path

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


def real_scores(clusterer: str, data: str, fractions: list[float]) -> list[np.ndarray]:
    """`cluster assign --balanced`'s scores (float32, as it keeps them) of the training documents, for
    the first `fraction` of every JSONL file of `data`."""
    import json

    from elmforest.cluster.clusterer import Clusterer
    from elmforest.data.splits import SplitSpec

    c, spec = Clusterer.load(clusterer), SplitSpec()
    files = [[json.loads(line) for line in open(f)] for f in sorted(Path(data).glob("*.jsonl"))]
    out = []
    for fr in fractions:
        docs = [
            r for rows in files for r in rows[: math.ceil(len(rows) * fr)] if spec.assign(r["id"]) == "train"
        ]
        z, ok = c.embed([r["text"] for r in docs])
        out.append(c.scores(z[ok]).astype(np.float32).astype(np.float64))
    return out


def auction_at(rev: str):
    """balanced_assign as cluster/kmeans.py had it at git revision `rev`."""
    repo = Path(__file__).resolve().parents[1]
    text = subprocess.run(
        ["git", "show", f"{rev}:src/elmforest/cluster/kmeans.py"],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kmeans_then.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location("kmeans_then", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module.balanced_assign


def growth(rows: list[tuple], col: int, i: int) -> str:
    if not i:
        return "-"
    (n0, *a), (n, *b) = rows[i - 1], rows[i]
    return f"N^{math.log(b[col] / a[col]) / math.log(n / n0):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[20_000, 60_000, 200_000])
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--against", metavar="REV", help="also time the auction at this git revision")
    ap.add_argument("--no-bytes", action="store_true", help="skip the by-bytes (Lagrangian) assignment")
    ap.add_argument("--clusterer", help="score real documents with this clusterer (with --data)")
    ap.add_argument("--data", help="a folder of JSONL files (with --clusterer)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    args = ap.parse_args()
    if bool(args.clusterer) != bool(args.data):
        ap.error("--clusterer and --data go together")
    then = auction_at(args.against) if args.against else None
    if args.clusterer:
        sets = real_scores(args.clusterer, args.data, args.fractions)
        args.k, args.no_bytes = sets[0].shape[1], True
    else:
        sets = (scores(n, args.k) for n in args.n)
    rows = []
    for s in sets:
        n = len(s)
        t = time.perf_counter()
        labels = balanced_assign(s, math.ceil(n / args.k))
        row = [n, time.perf_counter() - t]
        if then is not None:
            t = time.perf_counter()
            same = np.array_equal(then(s, math.ceil(n / args.k)), labels)
            row += [time.perf_counter() - t, same]
        if not args.no_bytes:
            w = np.random.default_rng(1).integers(100, 5000, n).astype(float)
            t = time.perf_counter()
            weighted_balanced_assign(s, w, w.sum() / args.k * 1.01)
            row.append(time.perf_counter() - t)
        rows.append(tuple(row))
        print(f"  {n:,} done", flush=True)
    head = ["documents", "by count (auction) s", "growth"]
    if then is not None:
        head += [f"auction at {args.against} s", "growth", "same labels"]
    if not args.no_bytes:
        head += ["by bytes (Lagrangian) s", "growth"]
    print(f"K = {args.k}")
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for i, (n, *r) in enumerate(rows):
        cells = [f"{n:,}", f"{r[0]:.1f}", growth(rows, 0, i)]
        if then is not None:
            cells += [f"{r[1]:.1f}", growth(rows, 1, i), "yes" if r[2] else "NO"]
        if not args.no_bytes:
            cells += [f"{r[-1]:.1f}", growth(rows, len(r) - 1, i)]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
