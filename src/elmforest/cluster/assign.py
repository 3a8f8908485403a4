"""Fit a clusterer on a sample of a corpus, and assign a whole corpus to clusters, streaming.

`assign_corpus` writes one JSONL per cluster (`cluster<j>.jsonl`, domain = `cluster<j>`, the
original domain kept as `source_domain`) — ready for `elmforest shards build` — plus
`report.meta.json` (metadata, which the reader never takes for data): cluster sizes, how many
documents could not be vectorised, and, where the input has domain labels, the cluster x domain
table and the normalised mutual information. No document is dropped.
Embedding runs in worker processes (all cores) that die with the assigning process; the balanced
variant caps every cluster at ceil(N/K · (1 + slack)) documents, spread evenly over the stream.

The output is written in a folder beside `out` and swapped in whole: a run killed at any point
leaves the previous output as it was, its report describing its files (the next run removes what
the killed one left). A non-empty `out` that is not an earlier output is refused, never deleted.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import re
import signal
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from elmforest.cluster.clusterer import Clusterer
from elmforest.cluster.kmeans import assign_by_bytes, assign_labels
from elmforest.data.provenance import ASSIGN_REPORT
from elmforest.data.readers import ReadStats, iter_documents
from elmforest.data.sources import refuse_out_in_data, resolve_source
from elmforest.utils.errors import AlreadyExists, UserError
from elmforest.utils.io import read_json, staged_dir, write_json_atomic
from elmforest.utils.proc import die_with_parent, stopped_with
from elmforest.utils.threads import cpu_cores

REPORT = ASSIGN_REPORT  # shards build keeps its clusterer's checksum in the index
_LEGACY_REPORT = "report.json"  # its name before: `shards build` read it as (bad) data
# what an earlier output may hold: cluster files, the report, and temporaries of a killed older version
_OWN = re.compile(r"cluster\d+\.jsonl|report(\.meta)?\.json|\.(cluster\d+\.jsonl|report(\.meta)?\.json)\..*")


def sample_texts(
    data,
    n: int,
    seed: int = 0,
    max_chars: int = 100_000,
    split: str | None = None,
    split_spec=None,
    sizes: list[int] | None = None,
) -> tuple[list[str], ReadStats]:
    """A uniform reservoir sample of n documents, streaming (each text capped at max_chars, its
    first part: memory stays bounded however long a document is); `split` keeps only that split's
    documents (by the id hash at `split_spec`'s fractions, the defaults if None), e.g. to fit on
    training data only: the shards' fractions keep it the same documents the experts train on.
    `sizes`, if given, is filled with each sampled document's whole size in bytes (before the cap)."""
    from elmforest.data.splits import SplitSpec

    if split not in (None, "train", "valid", "test"):
        raise UserError(f"split must be train, valid or test, got {split!r}")
    spec = split_spec or SplitSpec()
    rng = random.Random(seed)
    stats = ReadStats()
    sample: list[str] = []
    docs = (d for d in iter_documents(data, stats) if split is None or spec.assign(d.id) == split)
    whole: list[int] = []
    for i, d in enumerate(docs):
        text = d.text[:max_chars]
        size = len(d.text.encode("utf-8")) if len(d.text) > max_chars else -1  # -1: as `text`
        if len(sample) < n:
            sample.append(text)
            whole.append(size)
        else:
            j = rng.randrange(i + 1)
            if j < n:
                sample[j], whole[j] = text, size
    if sizes is not None:
        sizes[:] = [s if s >= 0 else len(t.encode("utf-8")) for s, t in zip(whole, sample, strict=True)]
    return sample, stats


def fit_clusterer(
    data,
    k: int,
    out,
    sample_docs: int = 20_000,
    dims: int = 100,
    seed: int = 0,
    min_df: int = 2,
    split: str | None = None,
    embeddings: str | None = None,
    balance: str = "documents",
    split_spec=None,
    max_iter: int = 20,
) -> Clusterer:
    """`embeddings` (a local sentence-embedding model dir, or `minilm`) replaces tf-idf + SVD; `balance`
    is documents (c-BTM) or bytes (clusters of about equal text); `max_iter`: k-means steps at most."""
    from elmforest.cluster.embedder import SentenceEmbedder
    from elmforest.data.splits import SplitSpec

    refuse_out_in_data(out, data, "`cluster fit`")
    sizes: list[int] = []
    texts, stats = sample_texts(data, sample_docs, seed, split=split, split_spec=split_spec, sizes=sizes)
    embedder = SentenceEmbedder(embeddings) if embeddings else None
    c = Clusterer.fit(
        texts,
        k,
        dims=dims,
        seed=seed,
        min_df=min_df,
        embedder=embedder,
        balance=balance,
        sizes=sizes,
        max_iter=max_iter,
    )
    c.meta["fit"]["read"] = stats.to_dict()
    c.meta["fit"]["source"] = resolve_source(data)
    c.meta["fit"]["split"] = split
    if split is not None:
        sp = split_spec or SplitSpec()
        c.meta["fit"]["split_spec"] = asdict(sp)  # every field: SplitSpec(**it) is this split again
    c.save(out)
    return c


_WORKER: Clusterer | None = None


def _init_worker(path: str, parent: int | None) -> None:
    global _WORKER
    die_with_parent(parent)  # a killed `cluster assign` leaves no worker waiting forever for work
    # forked with the CLI's handlers: Ctrl-C printed each worker's traceback, and the pool's SIGTERM of
    # the others printed "terminated (SIGTERM)". The parent alone answers Ctrl-C, and stops them
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _WORKER = Clusterer.load(path)


def _embed_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    z, ok = _WORKER.embed(texts)
    return z.astype(np.float64), ok


def _embedded_chunks(clusterer_dir, data, stats: ReadStats, chunk_docs: int, workers: int):
    """(documents, unit vectors, ok) chunk by chunk, embedded in worker processes, in input order."""

    def chunks():
        buf = []
        for d in iter_documents(data, stats):
            buf.append(d)
            if len(buf) >= chunk_docs:
                yield buf
                buf = []
        if buf:
            yield buf

    ctx = multiprocessing.get_context()
    parent = None if ctx.get_start_method() == "forkserver" else os.getpid()  # else the fork server's
    with (
        ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(str(clusterer_dir), parent)
        ) as pool,
        stopped_with(pool),  # Ctrl-C: the workers ignore it, so they are stopped here
    ):
        pending = []
        for docs in chunks():  # a few chunks in flight: reading, embedding and writing overlap
            pending.append((docs, pool.submit(_embed_chunk, [d.text for d in docs])))
            if len(pending) >= 2 * workers:
                docs0, fut = pending.pop(0)
                yield (docs0, *fut.result())
        for docs0, fut in pending:
            yield (docs0, *fut.result())


def assign_corpus(
    clusterer_dir,
    data,
    out,
    balanced: bool = False,
    slack: float = 0.0,
    balance: str = "documents",
    chunk_docs: int = 512,
    workers: int | None = None,
    progress: bool = True,
    split_spec=None,
) -> dict:
    """Assign every document of `data` to a cluster and write per-cluster JSONL plus a report.

    balanced=True caps every cluster at ceil(N/K · (1 + slack)) of the N training documents
    (balance="bytes": at (1 + slack) / K of their bytes) with one global balanced assignment: a
    first streaming pass keeps only each document's K scores and size (not its text), a second pass
    writes them out. The training split is told by the id hash at `split_spec`'s fractions (those
    `shards build` will split at; the defaults if None); valid and test documents go to their nearest
    centre, as c-BTM routes unseen text, so held-out data never moves a training document.
    """
    from elmforest.data.splits import SplitSpec

    refuse_out_in_data(out, data, "`cluster assign`")
    if balance not in ("documents", "bytes"):
        raise UserError(f"balance must be documents or bytes, got {balance!r}")
    if balance == "bytes" and not balanced:
        raise UserError("balance by bytes caps the clusters: it needs --balanced")
    if balance == "bytes":
        slack = max(slack, 0.01)  # a cap of exactly 1/K of the bytes rarely fits whole documents
    from tqdm.auto import tqdm

    clusterer = Clusterer.load(clusterer_dir)
    k = clusterer.k
    out = Path(out)
    _check_out(out)
    workers = workers or min(cpu_cores(), 8)
    global_labels = None
    recorded = clusterer.meta.get("fit", {}).get("split_spec")  # `cluster fit --split train`'s fractions
    if split_spec is not None and recorded and SplitSpec(**recorded) != split_spec:
        raise UserError(
            f"the clusterer was fitted on the training split at valid/test fractions "
            f"{recorded['valid_frac']}/{recorded['test_frac']}, but the assignment is asked to use "
            f"{split_spec.valid_frac}/{split_spec.test_frac}; give the fractions your shards use to both"
        )
    spec = split_spec or (SplitSpec(**recorded) if recorded else SplitSpec())
    train_sizes = train_bytes = byte_cap = None
    if balanced and slack > k:  # (and 1e308 overflowed the cap's ceil)
        raise UserError(
            f"--slack {slack} caps no cluster of {k} (a slack over K never binds): give at most {k}"
        )
    if balanced:
        scores, oks, sizes_b, trains = [], [], [], []
        for docs, z, ok in tqdm(
            _embedded_chunks(clusterer_dir, data, ReadStats(), chunk_docs, workers),
            desc="scoring",
            unit="chunk",
            disable=not progress,
        ):
            scores.append(clusterer.scores(z).astype(np.float32))
            oks.append(ok)
            sizes_b.append(np.array([max(1, len(d.text.encode("utf-8"))) for d in docs], dtype=np.float64))
            trains.append(np.array([spec.assign(d.id) == "train" for d in docs], dtype=bool))
        if not scores:  # every record skipped (empty text): nothing to balance
            raise UserError(
                f"{data}: no documents to assign (every record was skipped: empty or unreadable text)"
            )
        s, ok, train = np.concatenate(scores), np.concatenate(oks), np.concatenate(trains)
        global_labels = np.zeros(len(s), dtype=np.int64)
        if train.any():
            st, okt = s[train], ok[train]
            if balance == "bytes":
                w = np.concatenate(sizes_b)[train]
                st = np.where(okt[:, None], st, 0.0)  # documents with no known word: placed by room alone
                global_labels[train], byte_cap = assign_by_bytes(st.astype(np.float64), w, slack)
            else:  # rounded first: 400 / 4 * 1.1 is 110.00000000000001 in floating point, not 110
                cap = np.full(k, math.ceil(round(len(st) / k * (1 + slack), 9)), dtype=np.int64)
                global_labels[train] = assign_labels(st, okt, cap)
        train_sizes = np.bincount(global_labels[train], minlength=k)
        train_bytes = np.bincount(global_labels[train], np.concatenate(sizes_b)[train], minlength=k)
        if (~train).any():  # held out: the nearest centre
            global_labels[~train] = assign_labels(s[~train], ok[~train], sizes=train_sizes)
    stats = ReadStats()
    sizes = np.zeros(k, dtype=np.int64)
    text_bytes = np.zeros(k, dtype=np.int64)
    table: Counter = Counter()
    not_vectorised, done = 0, 0
    with staged_dir(out) as stage:
        paths = {j: stage / f"cluster{j}.jsonl" for j in range(k)}
        handles = {}
        try:
            for j in range(k):
                handles[j] = open(paths[j], "w", encoding="utf-8")
            for docs, z, ok in tqdm(
                _embedded_chunks(clusterer_dir, data, stats, chunk_docs, workers),
                desc="assigning",
                unit="chunk",
                disable=not progress,
            ):
                if global_labels is not None:
                    labels = global_labels[done : done + len(docs)]
                else:
                    labels = assign_labels(clusterer.scores(z), ok, sizes=sizes)
                np.add.at(sizes, labels, 1)
                np.add.at(text_bytes, labels, [len(d.text.encode("utf-8")) for d in docs])
                done += len(docs)
                not_vectorised += int((~ok).sum())
                for d, j, good in zip(docs, labels, ok, strict=True):
                    j = int(j)
                    rec = {"id": d.id, "domain": f"cluster{j}", "text": d.text, "source_domain": d.domain}
                    if not good:
                        rec["vectorised"] = False
                    handles[j].write(json.dumps(rec, ensure_ascii=False) + "\n")
                    table[(j, d.domain)] += 1
            for h in handles.values():  # on disk before the folder is swapped in
                h.flush()
                os.fsync(h.fileno())
        finally:
            for h in handles.values():
                h.close()
        if not done:  # (raised in the stage: an earlier assignment in `out` stays, as --balanced leaves it)
            raise UserError(f"{data}: no documents to assign ({stats.summary()})")
        for j in range(k):
            if not sizes[j]:
                paths[j].unlink()
        sizes = sizes.tolist()
        domain_names = sorted({d for _, d in table})
        report = {
            "clusterer": str(Path(clusterer_dir).resolve()),
            # its content (arrays and vocabulary): clusters of another clusterer share only their names
            "clusterer_sha256": clusterer_digest(clusterer_dir),
            "data": resolve_source(data),
            "k": k,
            "balanced": balanced,
            "balance": balance if balanced else None,
            "slack": slack,
            # bytes each cluster may hold: a document over (1 + slack)/K of them has a cluster of its own
            "byte_caps": [round(float(c), 3) for c in byte_cap] if byte_cap is not None else None,
            # what the cap applied to: the training split's documents (valid/test by nearest centre)
            "balanced_split": {"split": "train", **asdict(spec)} if balanced else None,
            "train_sizes": train_sizes.tolist() if train_sizes is not None else None,
            "train_bytes": train_bytes.astype(np.int64).tolist() if train_bytes is not None else None,
            "documents": done,
            "sizes": sizes,
            # over the clusters that got documents: an empty one is listed, not a ratio against 1
            "max_over_min": max(sizes) / max(min([x for x in sizes if x] or [1]), 1),
            "bytes": text_bytes.tolist(),
            "bytes_max_over_min": float(text_bytes.max() / max(min([x for x in text_bytes if x] or [1]), 1)),
            "empty": [f"cluster{j}" for j in range(k) if not sizes[j]],
            "not_vectorised": not_vectorised,
            "read": stats.to_dict(),
            "cluster_by_domain": {f"cluster{j}": {d: table[(j, d)] for d in domain_names} for j in range(k)},
        }
        if len(domain_names) > 1:
            report["nmi"] = nmi_of(table)
        write_json_atomic(stage / REPORT, report)
    return report


def nmi_of(table: Counter) -> float:
    """sklearn's normalized_mutual_info_score (arithmetic mean of the entropies) from the cluster x
    domain counts, so no list of every document's labels is kept for it (a few GB at 10M documents)."""
    from scipy.stats import entropy
    from sklearn.metrics import mutual_info_score

    rows = sorted({j for j, _ in table})
    cols = sorted({d for _, d in table})
    c = np.array([[table[(j, d)] for d in cols] for j in rows], dtype=np.int64)
    if len(rows) == len(cols) == 1:
        return 1.0
    mi = mutual_info_score(None, None, contingency=c)
    if mi == 0:
        return 0.0
    norm = max((entropy(c.sum(1)) + entropy(c.sum(0))) / 2, np.finfo(np.float64).eps)
    return float(mi / norm)


def clusterer_digest(clusterer_dir) -> str | None:
    """The clusterer's own checksum of its arrays and vocabulary (clusterer.json), None if unreadable."""
    try:
        return read_json(Path(clusterer_dir) / "clusterer.json")["arrays"]["sha256"]
    except (OSError, UserError, KeyError, TypeError):
        return None


def assigned_by(source) -> tuple[str | None, str | None]:
    """(clusterer path, its checksum) that assigned the corpus at `source` (`cluster assign`'s report),
    or Nones when the corpus is not such an output or the report is older than the checksum."""
    rep = Path(str(source)) / REPORT
    if not rep.is_file():
        return None, None
    r = read_json(rep)
    path = r.get("clusterer")
    return path, r.get("clusterer_sha256") or (clusterer_digest(path) if path else None)


def _check_out(out: Path) -> None:
    """`out` may be missing, empty, or an earlier output of assign (replaced whole); nothing else."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise AlreadyExists(f"{out} exists and is not a folder; refusing to replace it")
    names = [p.name for p in out.iterdir()]
    if not names:
        return
    foreign = sorted(n for n in names if not _OWN.fullmatch(n))
    if foreign or not {REPORT, _LEGACY_REPORT} & set(names):
        what = f"it holds {foreign[0]}" if foreign else f"no {REPORT}"
        raise AlreadyExists(
            f"{out} exists and is not the output of `cluster assign` ({what}); refusing to replace it: "
            "pass another --out"
        )
