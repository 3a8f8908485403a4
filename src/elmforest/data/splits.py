"""Deterministic train/valid/test assignment from a hash of the document id.

A document's split never depends on file order, sharding or which machine reads it, so every
expert, baseline and evaluation agrees on what is held out.

With `by_file`, documents cut from one source file (ids `FILE#N`, N digits, as the demo's
evaluation-only domains write them; any other "#" is part of the id) hash by `FILE` and so fall in one split together: out-of-domain sets are split
half valid (the forest's prior) and half test, and a prior read from the other chunks of the very
files it is then tested on would be fitted to the test text's neighbours, not to the domain.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from elmforest.utils.errors import UserError

SPLITS = ("train", "valid", "test")
_CHUNK = re.compile(r"#\d+$")  # a chunk's number (corpora/demo_ood.py writes FILE#0003); no other "#"


@dataclass(frozen=True)
class SplitSpec:
    valid_frac: float = 0.05
    test_frac: float = 0.05
    by_file: bool = False  # hash FILE of an id FILE#N (N digits): a file's chunks share a split

    def __post_init__(self):
        # valid + test may take everything: evaluation-only data (out-of-domain sets) has no train split
        if not (
            0 <= self.valid_frac <= 1 and 0 <= self.test_frac <= 1 and self.valid_frac + self.test_frac <= 1
        ):
            raise UserError(f"bad split fractions: valid={self.valid_frac}, test={self.test_frac}")

    def assign(self, doc_id: str) -> str:
        key = _CHUNK.sub("", doc_id) if self.by_file else doc_id
        h = hashlib.sha256(key.encode("utf-8")).digest()
        u = int.from_bytes(h[:8], "big") / 2.0**64
        if u < self.test_frac:
            return "test"
        if u < self.test_frac + self.valid_frac:
            return "valid"
        return "train"


def random_domain(doc_id: str, k: int) -> str:
    """A random but stable group for the random-split ablation (salted: independent of the split)."""
    h = hashlib.sha256(b"random-domain:" + doc_id.encode("utf-8")).digest()
    return f"random{int.from_bytes(h[:8], 'big') % k}"
