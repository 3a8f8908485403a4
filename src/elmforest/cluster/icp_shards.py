"""In-Context Pretraining as a shards order: `build_shards(..., order=IcpOrder())` orders each domain's
training documents by `icp_plan` (cluster/icp.py) on their token ids, so no text is read again.

The order is computed per domain, not over the whole corpus: a domain is one expert's training
stream, and a dense run's mixture draws a domain before a window, so neighbours from other domains
could never be adjacent in what it sees anyway. Per domain the kNN index is also smaller (exact
search up to icp_plan's `exact_limit` documents).

With a sentence encoder (`IcpOrder(embedder=DIR or "minilm")`, `--icp-embedder`) the documents are
decoded back to text with the shards' own tokenizer (the first DECODE_TOKENS tokens: more than an
encoder reads) and embedded by it instead; near-duplicates are then judged on the encoder's cosine.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from elmforest.cluster.embedder import weights_digest
from elmforest.cluster.icp import TokenDocuments, icp_plan
from elmforest.cluster.icp_embed import embed
from elmforest.data.reorder import DocumentOrderer, resolve_orderer
from elmforest.utils.errors import UserError
from elmforest.utils.io import file_stamps

_EMBED_CHOICES = (
    "dims",
    "max_tokens",
    "min_df",
    "max_features",
    "fit_docs",
    "svd_iter",
    "svd_dtype",
    "svd_normalizer",
)
_EMBED_DEFAULTS = {n: p for n, p in inspect.signature(embed).parameters.items() if n in _EMBED_CHOICES}
_SEARCH_DEFAULTS = {
    n: p for n, p in inspect.signature(icp_plan).parameters.items() if n in ("exact_limit", "nprobe")
}

_WARM = False  # IcpOrder.warm_up has run in this process
DECODE_TOKENS = 512  # tokens of a document decoded for a sentence encoder (it reads ≤ 256 of its own)

# the statistics of icp_plan the index keeps (all functions of the data and the seed)
KEPT_STATS = (
    "kept",
    "ordered_by_similarity",
    "unembedded",
    "dropped_duplicates",
    "exact_duplicates",
    "near_duplicates",
    "dedup_similarity",
    "segments",
    "jumps",
    "mean_neighbour_similarity",
    "mean_adjacent_similarity",
    "mean_adjacent_similarity_random_order",
    "graph_edges",
    "knn",
    "dims",
)


def _files_stamp(path: str) -> tuple:
    """What a folder's files are now (utils.io.file_stamps, walked): a cache keyed by the path alone kept
    the first tokenizer or encoder read from a folder written again in the same process (a build's
    staging folder is the same path for the same output and process)."""
    return tuple(map(tuple, file_stamps([path]))) if Path(path).is_dir() else ()


def _tokenizer(root: str):
    return _load_tokenizer(root, _files_stamp(root))


@functools.lru_cache(maxsize=1)  # loaded once for all the domains of one shards directory
def _load_tokenizer(root: str, stamp: tuple):
    from elmforest.data.tokenizer import load_tokenizer

    return load_tokenizer(root).tokenizer


def _encoder(name: str):
    return _load_encoder(name, _files_stamp(name))


@functools.lru_cache(maxsize=1)  # one encoder resident at a time
def _load_encoder(name: str, stamp: tuple):
    from elmforest.cluster.embedder import SentenceEmbedder

    return SentenceEmbedder(name)


@dataclass(frozen=True)
class IcpOrder:
    """The ICP orderer (data/reorder.py's DocumentOrderer): documents embedded as bags of token ids
    (EOS left out), or by a sentence encoder (`embedder`), `k` nearest neighbours, near-duplicates at
    cosine ≥ `dedup_threshold` dropped (None keeps every document), then the greedy traversal."""

    k: int = 10
    dedup_threshold: float | None = 0.9
    embedder: str | None = None  # a local encoder dir, or "minilm"
    exact_limit: int = _SEARCH_DEFAULTS[
        "exact_limit"
    ].default  # exact kNN up to this many documents, IVF beyond
    shards_root: str | None = None  # set by for_shards: their tokenizer decodes documents for the encoder
    name: ClassVar[str] = "icp"

    @property
    def concurrent_domains(self) -> bool:
        """Two domains at a time (data/reorder.py): tf-idf/SVD ordering runs mostly on one core and
        releases the GIL; an encoder is a torch model that uses every core by itself."""
        return self.embedder is None

    def params(self) -> dict:
        """Everything besides the seed the order depends on (recorded, so part of the fingerprint): a
        change of the embedding's or the search's defaults makes other shards, never the same ones."""
        search = {name: p.default for name, p in _SEARCH_DEFAULTS.items()} | {"exact_limit": self.exact_limit}
        base = {"k": self.k, "dedup_threshold": self.dedup_threshold}
        if self.embedder is not None:
            enc = _encoder(self.embedder)
            return base | {
                "embedding": "sentence encoder",
                "encoder": Path(self.embedder).name,  # not the path: shards built elsewhere compare
                "encoder_fingerprint": enc.fingerprint(),  # its config and vocabulary
                "encoder_weights": weights_digest(enc.model_dir),
                "encoder_max_length": enc.max_length,
                "decode_tokens": DECODE_TOKENS,
                **search,
            }
        return base | {
            "embedding": "token-id tf-idf/SVD",
            **{name: p.default for name, p in _EMBED_DEFAULTS.items()},
            **search,
        }

    def warm_up(self) -> None:
        """What the first ordering in a process pays once, on a toy input: importing faiss and
        scikit-learn and loading the compiled kernels (0.44-0.69 s here; about 6 s when numba compiles
        them after an install). `shards build` runs it in a thread while it tokenizes; reordering
        runs it first when it orders domains side by side, so every BLAS library is loaded before
        their one-thread limit is set. Once per process."""
        global _WARM
        if self.embedder is not None or _WARM:
            return
        from elmforest.cluster import icp_kernels, icp_knn

        toks = (np.arange(30_000) * 7919 % 500).astype(np.uint16)
        icp_plan(TokenDocuments(toks, np.arange(100, 30_001, 100), 500, ignore=(0,)), seed=0)
        if icp_kernels.available():  # two workers' lists merged: the one kernel the toy misses
            icp_knn.self_knn_compiled(np.eye(20, 8, dtype=np.float32), 3, threads=2, block=8)
        _WARM = True

    def for_shards(self, root: Path) -> IcpOrder:
        """This orderer reading the shards at `root` (an encoder decodes with their tokenizer: the
        files the build loaded, so whatever tokenized them also decodes them)."""
        return self if self.embedder is None else dataclasses.replace(self, shards_root=str(root))

    def _texts(self, tokens, ends, eos_id) -> list[str]:
        """Each document's first DECODE_TOKENS tokens as text, its special tokens (EOS) left out."""
        if self.shards_root is None:
            raise UserError("an ICP encoder needs the shards' tokenizer: call for_shards(root) first")
        ends = np.asarray(ends, dtype=np.int64)
        if len(ends) == 0:
            return []
        tok = _tokenizer(self.shards_root)
        starts = np.concatenate([[0], ends[:-1]])
        ids = [np.asarray(tokens[s : min(e, s + DECODE_TOKENS)]) for s, e in zip(starts, ends, strict=True)]
        return tok.decode_batch([x[x != eos_id].tolist() for x in ids], skip_special_tokens=True)

    def __call__(self, tokens, ends, vocab_size, eos_id, seed) -> tuple[np.ndarray, dict]:
        common = {
            "seed": seed,
            "k": self.k,
            "dedup_threshold": self.dedup_threshold,
            "exact_limit": self.exact_limit,
        }
        docs = TokenDocuments(tokens, ends, vocab_size, ignore=(eos_id,))
        if self.embedder is not None:  # exact duplicates by the whole documents, not the decoded starts
            plan = icp_plan(
                self._texts(tokens, ends, eos_id), embedder=_encoder(self.embedder), whole=docs, **common
            )
        else:
            plan = icp_plan(docs, **common)
        stats = {key: plan.stats[key] for key in KEPT_STATS if key in plan.stats}
        stats["seconds"] = plan.stats.get("seconds")  # moved to order_timings.json by the data layer
        stats["threads"] = plan.stats.get("threads")
        return plan.order, stats


@dataclass(frozen=True)
class DedupOrder(IcpOrder):
    """ICP's control for its deduplication: the documents ICP would keep (the same embedding, kNN and
    near-duplicate rule, so the very same documents), in a seeded random order. ICP vs dedup is then
    the effect of the order alone; dedup vs random the effect of dropping the duplicates."""

    name: ClassVar[str] = "dedup"

    def __call__(self, tokens, ends, vocab_size, eos_id, seed) -> tuple[np.ndarray, dict]:
        order, stats = super().__call__(tokens, ends, vocab_size, eos_id, seed)
        order = np.sort(order)  # forget the path, keep the documents
        path_only = ("segments", "jumps", "mean_neighbour_similarity", "mean_adjacent_similarity")
        return np.random.default_rng([seed, 1]).permutation(order), {
            k: v for k, v in stats.items() if k not in path_only
        }


def make_orderer(
    order: str | DocumentOrderer | None,
    k: int = 10,
    dedup_threshold: float | None = 0.9,
    embedder: str | None = None,
    exact_limit: int = IcpOrder.exact_limit,
) -> DocumentOrderer | None:
    """The orderer a name stands for ("source" -> None, "random", "dedup" and "icp" with the given
    options; `embedder`: a sentence encoder instead of tf-idf/SVD; `exact_limit`: exact kNN up to this
    many documents per domain, IVF beyond, 0: IVF always); an orderer object passes through."""
    if order in ("dedup", "icp"):
        if k < 1:
            raise UserError(f"ICP k (neighbours per document) must be ≥ 1, got {k}")
        if dedup_threshold is not None and not 0 < dedup_threshold <= 1:
            raise UserError(
                f"ICP dedup threshold must be in (0, 1] (a cosine similarity), got {dedup_threshold}"
            )
        if embedder is not None:
            from elmforest.cluster.embedder import resolve_embedding_model

            resolve_embedding_model(embedder)  # refused here, before any work, if it is not one
        if exact_limit < 0:
            raise UserError(f"ICP exact_limit must be ≥ 0 (0: IVF search always), got {exact_limit}")
        cls = IcpOrder if order == "icp" else DedupOrder
        return cls(k=k, dedup_threshold=dedup_threshold, embedder=embedder, exact_limit=exact_limit)
    return resolve_orderer(order)
