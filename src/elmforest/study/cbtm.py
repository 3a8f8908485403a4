"""The c-BTM axis of a study: k discovered clusters x the amount of data, clusters balanced by document
count (c-BTM) or by bytes of text.

c-BTM's claim is that the best number of clusters, and the gain over dense, grow with the amount of
training data. So for each data fraction f the training documents are subsampled (by a salted hash of
their id; valid and test documents are all kept, so every arm is scored on the same bytes), the budget
is f x the 1x budget (compute grows with the data, one pass at most, as in the paper), and at that
budget a dense run (k = 1) and, sharing its seed, a forest of k cluster experts for every k: the
clusterer is fitted on that subsample's training split and assigns every document, and each expert
trains on its cluster. The forest is scored with c-BTM's routing (top-2 clusters by distance).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from elmforest.data.readers import iter_documents
from elmforest.data.shards import Shards
from elmforest.data.shards_build import build_shards
from elmforest.data.splits import SplitSpec
from elmforest.data.tokenizer import load_tokenizer
from elmforest.utils.io import read_json, staged_dir


@dataclass(frozen=True)
class CbtmForest:
    fraction: float
    seed: int
    k: int
    balance: str  # documents | bytes

    @property
    def tag(self) -> str:
        return f"{sweep_key(self.fraction, self.k, self.balance)}-s{self.seed}"


def sweep_key(fraction: float, k: int, balance: str) -> str:
    """The LR sweep (and `budget_lrs` entry) of c-BTM's k cluster experts at this data fraction and
    balance, shared by every training seed."""
    return f"cbtm-k{k}-{balance}-data{fraction:g}"


def kept(doc_id: str, fraction: float) -> bool:
    """A training document is kept in the f-subsample when its salted hash falls below f: nested (the
    0.25 subsample is inside the 0.5 one) and independent of the split."""
    h = hashlib.sha256(b"subsample:" + doc_id.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < fraction


def subsample(
    corpus: Path, out: Path, fraction: float, domains: list[str] | None = None, spec: SplitSpec | None = None
) -> Path:
    """`corpus` with only a `fraction` of its training documents (every valid and test one kept) of
    `domains` (the study's, so c-BTM sees no data its dense baseline does not), one JSONL per domain;
    written once."""
    if (out / "manifest.json").is_file():
        return out
    spec = spec or SplitSpec()  # the shards' default split, so valid and test are the full corpus's
    with staged_dir(out) as tmp:
        handles, counts = {}, {}
        try:
            for d in iter_documents(corpus):
                if domains is not None and d.domain not in domains:
                    continue
                if spec.assign(d.id) == "train" and not kept(d.id, fraction):
                    continue
                if d.domain not in handles:
                    handles[d.domain] = open(tmp / f"{d.domain}.jsonl", "w", encoding="utf-8")
                handles[d.domain].write(json.dumps({"id": d.id, "domain": d.domain, "text": d.text}) + "\n")
                counts[d.domain] = counts.get(d.domain, 0) + 1
        finally:
            for h in handles.values():
                h.close()
        (tmp / "manifest.json").write_text(
            json.dumps({"source": str(corpus), "fraction": fraction, "documents": counts}, indent=2)
        )
    return out


def subsample_shards(root: Path, sub: Path, tokenizer: Path, fraction: float, progress: bool) -> Shards:
    sh = root / f"shards-data{fraction:g}"
    if not Shards.is_shards_dir(sh):
        build_shards(sub, load_tokenizer(tokenizer), sh, progress=progress)
    return Shards(sh)


def cluster_shards(
    root: Path, corpus: Path, tokenizer: Path, fraction: float, k: int, balance: str, progress: bool
) -> tuple[Shards, Path]:
    """(shards of the k clusters, clusterer dir) of the f-subsample `corpus`: fitted on its training
    split, its training documents assigned under a balanced cap (by count or by bytes, 5% slack), the
    held-out ones to their nearest centre (an assignment cached by an older version capped them all)."""
    from elmforest.cluster.assign import assign_corpus, fit_clusterer

    sub = corpus
    name = f"k{k}-{balance}-data{fraction:g}"
    cdir = root / f"clusterer-{name}"
    if not (cdir / "clusterer.json").is_file():
        fit_clusterer(sub, k, cdir, split="train", balance=balance)
    assigned = root / f"clusters-{name}"
    if not (assigned / "report.meta.json").is_file():
        assign_corpus(cdir, sub, assigned, balanced=True, slack=0.05, balance=balance, progress=progress)
    elif "balanced_split" not in read_json(assigned / "report.meta.json"):  # kept: its runs train on it
        print(
            f"note: {assigned} was assigned by an older elmforest, whose cap covered the held-out documents "
            "too (its c-BTM experts' training sets moved with the test set); delete it and the runs that "
            "train on it to assign them again",
            file=sys.stderr,
        )
    sh = root / f"shards-{name}"
    if not Shards.is_shards_dir(sh):
        build_shards(assigned, load_tokenizer(tokenizer), sh, progress=progress)
    return Shards(sh), cdir
