"""The order of each domain's training documents in a shards directory: as read ("source"), a seeded
shuffle ("random"), or any orderer a higher layer passes in (In-Context Pretraining: cluster/icp_shards.py).

An orderer is a pure function of one domain's training documents and a seed that returns the indices of
the documents to keep, in their new order; documents it leaves out (duplicates) leave the training
split. Only the training split is ever reordered or deduplicated: validation and test stay as read, so
every score stays comparable with a model trained on the source order.

The rewrite is a post-pass over a staging directory (shards_build.build_shards, before its atomic rename):
each domain's train.bin is rewritten into a new file one document slice at a time, straight from the
memory-mapped old one, so memory is the order array plus the slice bounds of 65,536 documents, never
the domain's tokens.

What the index records (`order`: method, seed, params, per-domain statistics and a digest of each
domain's order) is a function of the data and the seed alone, so the shards' fingerprint, which hashes
the index, tells orders apart and ties a run to the order it trained on. Wall-clock times and thread
counts are not: they go to `order_timings.json` beside the index, outside the fingerprint.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from elmforest.utils.errors import UserError

ORDERS = ("source", "random", "dedup", "icp")  # the names the CLI and data.order know
ABOVE = ("dedup", "icp")  # orders computed in cluster/icp_shards.py, passed in as objects
TIMINGS_FILE = "order_timings.json"
TIMING_KEYS = ("seconds", "threads")  # an orderer's statistics that are not a function of data and seed
CHUNK_TOKENS = 1 << 22  # tokens per write at most: a longer document goes out in slices of 4 Mi tokens


@runtime_checkable
class DocumentOrderer(Protocol):
    """Orders one domain's training documents: `tokens` flat (memory-mapped), document i is
    tokens[ends[i-1]:ends[i]] (its EOS last). Returns (the kept documents' indices in their new order,
    each at most once, as int64; JSON-ready statistics). `params()` is everything besides the seed that
    the order depends on: it is recorded, and so part of the fingerprint."""

    name: str

    def params(self) -> dict: ...

    # optional: `warm_up()`, the one-time cost of a first call (imports, compiled code), which
    # shards_build.build_shards runs in a thread while it tokenizes

    def __call__(
        self, tokens: np.ndarray, ends: np.ndarray, vocab_size: int, eos_id: int, seed: int
    ) -> tuple[np.ndarray, dict]: ...


class RandomOrder:
    """A seeded permutation of the documents: the control ICP is measured against (same documents,
    no similarity structure), and a shuffled stream for corpora read in a biased order."""

    name = "random"

    def params(self) -> dict:
        return {}

    def __call__(self, tokens, ends, vocab_size, eos_id, seed) -> tuple[np.ndarray, dict]:
        return np.random.default_rng(seed).permutation(len(ends)).astype(np.int64), {}


def resolve_orderer(order) -> DocumentOrderer | None:
    """None for the source order (nothing to do), else the orderer. The data layer knows only
    "source" and "random"; "icp" lives above it and is passed in as an object."""
    if order is None or order == "source":
        return None
    if order == "random":
        return RandomOrder()
    if isinstance(order, str):
        if order in ABOVE:
            raise UserError(
                f"order {order!r} is computed by elmforest.cluster.icp_shards (make_orderer): pass that "
                f"object as order= (the CLI does this for --order {order})"
            )
        raise UserError(f"unknown shards order {order!r}; expected one of {', '.join(ORDERS)}")
    if not isinstance(order, DocumentOrderer):
        raise UserError(
            f"order must be 'source', 'random' or an orderer (.name, .params(), called on a domain's "
            f"documents), got {type(order).__name__}"
        )
    return order


def order_digest(order: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(order, dtype="<i8").tobytes()).hexdigest()[:16]


def _checked(order, n: int, who: str, domain: str) -> np.ndarray:
    order = np.asarray(order)
    if order.ndim != 1 or not np.issubdtype(order.dtype, np.integer):
        raise ValueError(
            f"orderer {who!r} returned a {order.dtype} array of shape {order.shape} for {domain!r}"
        )
    order = order.astype(np.int64, copy=False)
    if len(order) == 0 and n:
        raise ValueError(f"orderer {who!r} kept none of {domain!r}'s {n} training documents")
    if len(order) and (order.min() < 0 or order.max() >= n):
        raise ValueError(f"orderer {who!r} returned document indices outside [0, {n}) for {domain!r}")
    if len(np.unique(order)) != len(order):
        raise ValueError(f"orderer {who!r} returned a document more than once for {domain!r}")
    return order


def _gather(src: np.ndarray, starts: np.ndarray, lens: np.ndarray, order: np.ndarray, f, chunk: int) -> None:
    """Write the documents `order` names, in that order, to `f`: each document's tokens written
    straight from the memory map as one slice (no gather index, no copy; 2-5x faster on the demo
    shards than gathering through an index array of every token), `chunk` tokens of a document at
    most per write, the slice bounds listed for 65,536 documents at a time."""
    # a plain view: slicing it costs a fraction of a memmap slice
    flat = np.ascontiguousarray(src.view(np.ndarray))
    for i in range(0, len(order), 1 << 16):
        ids = order[i : i + (1 << 16)]
        for s, e in zip(starts[ids].tolist(), (starts[ids] + lens[ids]).tolist(), strict=True):
            if e - s <= chunk:
                f.write(flat[s:e])
            else:
                for a in range(s, e, chunk):
                    f.write(flat[a : min(e, a + chunk)])


def reorder_split(
    folder: Path,
    dtype: np.dtype,
    orderer: DocumentOrderer,
    vocab_size: int,
    eos_id: int,
    seed: int,
    domain: str,
    chunk: int = CHUNK_TOKENS,
) -> tuple[dict, dict, dict]:
    """Rewrite `folder`/train.bin and train.docs.npy in the orderer's order. Returns (the split's new
    index entry, the statistics the index records, timings)."""
    t0 = time.perf_counter()
    table = np.load(folder / "train.docs.npy", allow_pickle=False)
    ends, nbytes = table[:, 0], table[:, 1]
    n = len(ends)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    lens = ends - starts
    n_tokens = int(ends[-1]) if n else 0
    src = np.memmap(folder / "train.bin", dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else None
    tokens = src if src is not None else np.zeros(0, dtype=dtype)
    order, found = orderer(tokens, ends, vocab_size, eos_id, seed)
    order = _checked(order, n, orderer.name, domain)
    t1 = time.perf_counter()
    found = dict(found or {})
    timings = {k: found.pop(k) for k in TIMING_KEYS if k in found}
    new_bin = folder / "train.bin.reordered"
    with open(new_bin, "wb") as f:
        if src is not None:
            _gather(src, starts, lens, order, f, chunk)
    del src, tokens
    new_ends = np.cumsum(lens[order])
    new_table = np.stack([new_ends.astype(np.int64), nbytes[order]], axis=1)
    new_docs = folder / "train.docs.reordered.npy"
    np.save(new_docs, new_table, allow_pickle=False)
    os.replace(new_bin, folder / "train.bin")
    os.replace(new_docs, folder / "train.docs.npy")
    split = {
        "tokens": int(new_ends[-1]) if len(new_ends) else 0,
        "documents": len(order),
        "bytes": int(new_table[:, 1].sum()),
    }
    stats = {
        "documents_before": n,
        "documents_after": len(order),
        "dropped_documents": n - len(order),
        "tokens_before": n_tokens,
        "tokens_after": split["tokens"],
        "order_digest": order_digest(order),
        **found,
    }
    timings = {"order_seconds": round(t1 - t0, 4), "rewrite_seconds": round(time.perf_counter() - t1, 4)} | {
        f"orderer_{k}": v for k, v in timings.items()
    }
    return split, stats, timings


def start_warm_up(orderer) -> threading.Thread | None:
    """The orderer's `warm_up` in a daemon thread (None if it has none). A failure there is left
    for the real call to raise, with its context."""
    warm = getattr(orderer, "warm_up", None)
    if warm is None:
        return None

    def run():
        try:
            warm()
        except Exception:  # noqa: BLE001 - the ordering itself reports it
            pass

    thread = threading.Thread(target=run, name="orderer-warm-up", daemon=True)
    thread.start()
    return thread


def map_domains(fn, sizes: dict, workers: int) -> dict:
    """{domain: fn(domain)} for the domains in `sizes` (name -> documents), `workers` at a time,
    largest first, under one process-wide BLAS limit of one thread (see reorder_staging). When one
    fails, the domains not started are cancelled and its error raised once the running ones end
    (they write into the staging directory the caller then removes)."""
    if workers <= 1:
        return {d: fn(d) for d in sizes}
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    from elmforest.utils.threads import one_blas_thread

    largest_first = sorted(sizes, key=lambda d: -sizes[d])
    with one_blas_thread(), ThreadPoolExecutor(workers) as pool:
        futures = {d: pool.submit(fn, d) for d in largest_first}
        done, _ = wait(futures.values(), return_when=FIRST_EXCEPTION)
        failed = [f for f in futures.values() if f in done and f.exception() is not None]
        if failed:
            for f in futures.values():
                f.cancel()  # those not started; the pool's exit waits for the running ones
            raise failed[0].exception()
    return {d: f.result() for d, f in futures.items()}


def reorder_staging(
    staging: Path, index: dict, orderer: DocumentOrderer, seed: int, workers: int | None = None
) -> dict:
    """Reorder every domain's training split in a staged shards directory and record the order in
    `index` (updated in place); returns the timings (written beside the index by the caller).

    Domains are independent, so an orderer that says so (`concurrent_domains = True`: its work
    releases the GIL and is thread-safe, like ICP's tf-idf/SVD ordering) orders `workers` of them at
    a time (default: 2 where the process may use 2 or more cores), largest first: much of one
    domain's work runs on one core (the embedding, most compiled kernels; the kNN search and the
    projection use every core), so a small domain fits beside a large one (ICP on the demo shards,
    2 free cores, bench/icp_order.py: 17.6-20.5k -> 21.5-25.4k documents/s in one set of runs).
    Nothing recorded depends on it: each order is a function of its domain and the seed, and BLAS is held at one thread for the
    whole pass (threadpoolctl's limit is process-wide, so the domains' own limits could not restore
    it under each other; the orderer's `warm_up` runs first, so every BLAS it loads is held too).
    The per-domain times then overlap; `seconds` is the wall time."""
    dtype = np.dtype(index["dtype"])
    vocab, eos = int(index["tokenizer"]["vocab_size"]), int(index["tokenizer"]["eos_id"])
    if hasattr(orderer, "for_shards"):  # an orderer that reads the shards' own files (a tokenizer)
        orderer = orderer.for_shards(staging)
    record = {"method": orderer.name, "seed": int(seed), "params": dict(orderer.params()), "domains": {}}
    timings: dict = {"method": orderer.name, "domains": {}}
    jobs = [d for d, entry in index["domains"].items() if "train" in entry.get("splits", {})]
    if not getattr(orderer, "concurrent_domains", False):  # not said to be safe side by side: alone
        workers = 1
    elif workers is None:
        from elmforest.utils.threads import cpu_cores

        workers = min(2, cpu_cores())
    workers = max(1, min(int(workers), len(jobs)))
    if workers > 1 and hasattr(orderer, "warm_up"):
        try:  # its libraries loaded before map_domains limits BLAS (a no-op when warm)
            orderer.warm_up()
        except Exception:  # noqa: BLE001 - left for the ordering itself to raise, with its context
            pass
    timings["domain_workers"] = workers

    def one(domain):
        folder = staging / index["domains"][domain]["folder"]
        return reorder_split(folder, dtype, orderer, vocab, eos, seed, domain)

    t0 = time.perf_counter()
    size = {d: index["domains"][d]["splits"]["train"].get("documents", 0) for d in jobs}
    results = map_domains(one, size, workers)
    for domain in jobs:  # recorded in the index's order, whatever order they finished in
        split, stats, times = results[domain]
        index["domains"][domain]["splits"]["train"] = split
        record["domains"][domain] = stats
        timings["domains"][domain] = times
    timings["seconds"] = round(time.perf_counter() - t0, 4)
    index["order"] = record
    return timings


def reorder_shards(
    src: str | os.PathLike, out: str | os.PathLike, order, seed: int = 0, workers: int | None = None
) -> dict:
    """A copy of the source-order shards `src` in another order at `out`, without tokenizing again
    (an ICP-vs-random comparison needs one shards set per order and seed of the same tokens).
    Only shards in source order are taken: the record then says what happened to the documents as
    read, never an order of an order. Built under a temporary name and renamed into place. Returns the
    new index's order record. `workers`: domains ordered at a time (see reorder_staging)."""
    import shutil

    from elmforest.utils.io import read_json, remove_path, replace_dir, temp_sibling, write_json_atomic

    src, out = Path(src), Path(os.path.abspath(out))  # `--out .` has no name to stage its sibling by
    orderer = resolve_orderer(order)
    if orderer is None:
        raise UserError("reorder needs an order other than 'source' (random, or an orderer such as icp)")
    if not (src / "index.json").is_file():
        raise UserError(f"{src}: not a shards directory (no index.json)")
    if out.exists():
        raise UserError(f"{out} exists; choose a new directory for the reordered shards")
    from elmforest.data.shards import Shards

    Shards(src).check_files()  # damaged shards said as such, not met part-way through the copy
    index = read_json(src / "index.json")
    if "order" in index:
        raise UserError(
            f"{src} holds its training documents in {index['order']['method']!r} order; reorder shards in "
            "source order (elmforest shards build without --order)"
        )
    staging = temp_sibling(out)
    try:
        shutil.copytree(src, staging, ignore=shutil.ignore_patterns(TIMINGS_FILE))
        timings = reorder_staging(staging, index, orderer, seed, workers)
        write_json_atomic(staging / TIMINGS_FILE, timings)
        write_json_atomic(staging / "index.json", index)
        replace_dir(staging, out)
    except BaseException:
        remove_path(staging)
        raise
    return index["order"]
