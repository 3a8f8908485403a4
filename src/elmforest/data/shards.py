"""Tokenize once into memory-mapped token files, one per domain and split.

Layout of a shards directory::

    index.json                 tokenizer fingerprint and encoding, dtype, split fractions, per-file counts,
                               and the training documents' order when not as read (data/reorder.py)
    order_timings.json         how long that ordering took (not part of the fingerprint)
    tokenizer.json, ...        the tokenizer's files, as the source had them (self-describing shards)
    <domain>/<split>.bin       flat token ids: each document as the tokenizer encodes it, then EOS
    <domain>/<split>.docs.npy  int64 [n_docs, 2]: (end offset in tokens, UTF-8 bytes of the text)

The per-document byte counts make bits-per-byte exact for any tokenizer: a stream of whole
documents is predicted token by token, and its bytes are known without decoding.
The directory is built under a temporary name and renamed into place, so a crash never leaves a
half-written shard set.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from elmforest.data.splits import SPLITS
from elmforest.data.tokenizer import (
    ENCODING,
)
from elmforest.utils.errors import NotFound, UserError
from elmforest.utils.io import (
    read_json,
)

INDEX_VERSION = 1
# where the data came from and what was said of it, not what the shards hold: outside the fingerprint
# ("read": how the reader got the documents, e.g. from 1 Arrow file or 2: the same documents, the same data)
_PROVENANCE = ("source", "in_train", "tokenizer_saw_held_out", "assigned_by", "read")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def safe_name(domain: str) -> str:
    """A file-system-safe folder name for a domain (the index keeps the real name)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", domain).strip("._") or "domain"
    return s[:100]


def _digest(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


class Shards:
    """Read-only view of a shards directory; token arrays are memory-mapped, never loaded whole."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        idx = self.root / "index.json"
        if not idx.is_file():
            raise NotFound(f"{self.root}: not a shards directory (no index.json)")
        self.index = read_json(idx)
        if self.index.get("version") != INDEX_VERSION:
            raise UserError(f"{idx}: unsupported shards version {self.index.get('version')}")
        if self.index.get("dtype") not in ("uint16", "uint32"):
            raise UserError(f"{idx}: token dtype {self.index.get('dtype')!r}; shards hold uint16 or uint32")
        self.dtype = np.dtype(self.index["dtype"])
        self._check_encoding(idx)

    def _check_encoding(self, idx: Path) -> None:
        """Shards from before the encoding was recorded dropped the special tokens the tokenizer adds
        (a BOS, say), which the exported checkpoint's tokenizer puts back: their ids would train and
        score a model on sequences it never sees. Those of a tokenizer that adds none stay valid."""
        encoding = self.index.get("tokenizer", {}).get("encoding")
        if encoding == ENCODING:
            return
        if encoding is not None:
            raise UserError(f"{idx}: unknown token encoding {encoding!r} (made by a newer elmforest?)")
        tj = self.root / "tokenizer.json"
        pp = Tokenizer.from_file(str(tj)).post_processor if tj.is_file() else None
        if pp is not None and pp.num_special_tokens_to_add(False) > 0:
            raise UserError(
                f"{idx}: built by an older elmforest that left out the special tokens its tokenizer adds "
                "to every document (e.g. BOS); rebuild the shards with --overwrite"
            )

    @property
    def fingerprint(self) -> str:
        """What the shards hold (tokenizer, split, every domain's token, document and byte counts),
        not where they came from: a run is tied to this, not to a path."""
        return _digest(self._content())

    def _content(self) -> dict:
        return {k: v for k, v in self.index.items() if k not in _PROVENANCE}

    @property
    def fingerprints(self) -> tuple[str, ...]:
        """`fingerprint`, then the same content's as older versions digested it: with the read counts
        (until 2026-12-07), and as written before the split recorded `by_file` (2026-12-05; false
        throughout before): shards rebuilt from the same data by either version are the data that runs
        recorded by the other trained on."""
        content = self._content()
        contents = [content] + ([{**content, "read": self.index["read"]}] if "read" in self.index else [])
        out = []
        for c in contents:
            out.append(_digest(c))
            split = c.get("split")
            if isinstance(split, dict) and split.get("by_file", False) is False:
                other = (
                    {k: v for k, v in split.items() if k != "by_file"}
                    if "by_file" in split
                    else {**split, "by_file": False}
                )
                out.append(_digest({**c, "split": other}))
        return tuple(out)

    @property
    def order(self) -> dict:
        """How the training documents are ordered: the index's record ({"method", "seed", "params",
        "domains"}), or {"method": "source"} for documents as read (shards built before orders existed)."""
        return self.index.get("order") or {"method": "source"}

    def record(self) -> dict:
        """What a model trained on these shards keeps of them (elmforest_data.json beside its weights):
        which documents were held out, and the training documents' order when not as read."""
        rec = {
            "shards": str(self.root.resolve()),
            "fingerprint": self.fingerprint,
            "split": self.index["split"],
        }
        if "order" in self.index:
            rec["order"] = {k: self.order[k] for k in ("method", "seed", "params")}
        return rec

    @staticmethod
    def is_shards_dir(path: str | os.PathLike) -> bool:
        return (Path(path) / "index.json").is_file()

    @property
    def domains(self) -> list[str]:
        return list(self.index["domains"])

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.index["tokenizer"]["fingerprint"]

    @property
    def eos_id(self) -> int:
        return int(self.index["tokenizer"]["eos_id"])

    def check_eos(self, eos_id: int, model) -> None:
        """The same tokenizer files can end documents with another token (a checkpoint's config.json
        naming another `eos_token_id` than its tokenizer files): its fingerprint matches, its separators
        would not, and every document boundary would read as text."""
        if self.eos_id != eos_id:
            raise UserError(
                f"{self.root}: its documents end with token {self.eos_id}; {model} ends them with {eos_id} "
                f"(the same tokenizer files, another end-of-document token): build the shards with "
                f"--tokenizer {model}"
            )

    @property
    def vocab_size(self) -> int:
        return int(self.index["tokenizer"]["vocab_size"])

    def has(self, domain: str, split: str) -> bool:
        return split in self.index["domains"].get(domain, {}).get("splits", {})

    def unscorable(self, domains) -> list[str]:
        """Domains with no valid or no test documents (too few for the id-hash split): an expert for one
        cannot be scored, nor a prior read for it."""
        return [d for d in domains if not (self.has(d, "valid") and self.has(d, "test"))]

    def info(self, domain: str, split: str) -> dict:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; expected one of {SPLITS}")
        try:
            info = self.index["domains"][domain]["splits"][split]
        except KeyError:
            if domain not in self.index["domains"]:
                raise NotFound(f"{self.root}: no domain {domain!r}; it has {self.domains}") from None
            raise NotFound(f"{self.root}: no {split!r} split for domain {domain!r}") from None
        n = info.get("tokens") if isinstance(info, dict) else None
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:  # an index edited by hand
            raise UserError(f"{self.root / 'index.json'}: {domain}/{split} tokens {n!r} is not a count")
        return info

    def _path(self, domain: str, split: str, suffix: str) -> Path:
        return self.root / self.index["domains"][domain]["folder"] / f"{split}{suffix}"

    def tokens(self, domain: str, split: str) -> np.ndarray:
        """The split's token ids, memory-mapped: as many as the index says, the file exactly that size
        (a half-copied or edited shards folder is said as such, not read short or past its end)."""
        n = self.info(domain, split)["tokens"]
        path = self._path(domain, split, ".bin")
        size = path.stat().st_size if path.is_file() else None
        if size != n * self.dtype.itemsize:
            raise UserError(
                f"{path}: {'missing' if size is None else f'{size:,} bytes'}, but the index says {n:,} "
                f"{self.dtype.name} tokens ({n * self.dtype.itemsize:,} bytes): truncated or edited shards; "
                "build them again"
            )
        if n == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(n,))

    def documents(self, domain: str, split: str) -> np.ndarray:
        """int64 [n_docs, 2]: (end offset in tokens, UTF-8 bytes), checked against the index: ends that
        never decrease, the last one the split's token count."""
        n = self.info(domain, split)["tokens"]
        path = self._path(domain, split, ".docs.npy")
        try:
            docs = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"{path}: not a document table ({e}); build the shards again") from None
        ends = docs[:, 0] if docs.ndim == 2 and docs.shape[1:] == (2,) else None
        if (
            ends is None
            or docs.dtype != np.int64
            or (len(ends) and (ends[0] < 0 or (np.diff(ends) < 0).any() or ends[-1] != n))
            or (docs[:, 1] < 0).any()
        ):
            raise UserError(
                f"{path}: not the document table of {domain}/{split} (int64 [documents, 2], ends rising to "
                f"the {n!r} tokens the index says); build the shards again"
            )
        return docs

    def check_files(self) -> int:
        """Every split's token and document files against the index (sizes and document tables; the
        tokens are not read): the whole set's check before a command copies or reports it, so damage
        is said as such, naming the file, rather than met part-way. Returns the splits checked."""
        n = 0
        for d in self.domains:
            for split in SPLITS:
                if self.has(d, split):
                    self.tokens(d, split)
                    self.documents(d, split)
                    n += 1
        return n
