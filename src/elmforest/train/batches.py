"""Training batches as a pure function of (seed, step, micro-batch).

Each row is a random window of seq_len + 1 tokens from one domain's memory-mapped shard, the
domain drawn by the mixture weights. Because a batch depends only on its step number, the data
position of a run is just its step: a resumed run sees exactly the batches an uninterrupted run
would, with no iterator state to save.

This is also the sampler In-Context Pretraining needs (shards built with --order icp): a window
cut at any offset of an ICP-ordered stream holds a run of neighbouring, related documents, while
the rows of one batch are independent positions (and domains), so a batch stays diverse. Shards in
source or random order are read the same way, so the order is the only difference between runs.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from elmforest.data.shards import Shards
from elmforest.utils.errors import UserError


class WindowSampler:
    def __init__(
        self,
        shards: Shards,
        domains: list[str] | None,
        split: str,
        seq_len: int,
        batch_size: int,
        seed: int,
        mixture: str = "uniform",
    ):
        if not domains:
            domains = [d for d in shards.domains if shards.has(d, split)]
            if domains and (lacking := [d for d in shards.domains if d not in domains]):
                print(  # every document of theirs fell in the other splits: few documents, or big shares
                    f"note: {shards.root}: domain(s) {', '.join(lacking)} have no {split!r} documents; "
                    f"the {split} windows come from the other {len(domains)}",
                    file=sys.stderr,
                )
        if not domains:
            raise UserError(
                f"{shards.root}: no domain has a {split!r} split (shards built with --valid-frac + "
                "--test-frac = 1, or too few documents); rebuild them with a smaller held-out share"
            )
        missing = [d for d in domains if not shards.has(d, split)]
        if missing:
            raise UserError(
                f"{shards.root}: no {split!r} split for domain(s) {missing}; have {shards.domains}"
            )
        self.arrays = [shards.tokens(d, split) for d in domains]
        self.domains = domains
        too_small = {d: len(a) for d, a in zip(domains, self.arrays, strict=True) if len(a) < seq_len + 1}
        if too_small:  # dropping them would train on other domains than the config names, silently
            raise UserError(
                f"{shards.root}: domain(s) with fewer than seq_len + 1 = {seq_len + 1} tokens in split "
                f"{split!r}: "
                + ", ".join(f"{d} ({n} tokens)" for d, n in too_small.items())
                + "; give them more text, leave them out (data.domains), or lower train.seq_len"
            )
        sizes = np.array([len(a) for a in self.arrays], dtype=np.float64)
        if mixture == "tokens":
            self.weights = sizes / sizes.sum()
        elif mixture == "uniform":
            self.weights = np.full(len(sizes), 1.0 / len(sizes))
        else:
            raise UserError(f"unknown mixture {mixture!r}; expected 'tokens' or 'uniform'")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed

    def batch(self, step: int, micro: int = 0) -> torch.Tensor:
        """int64 [batch_size, seq_len + 1]: inputs are [:, :-1], targets [:, 1:]."""
        rng = np.random.default_rng([self.seed, step, micro])
        which = rng.choice(len(self.arrays), size=self.batch_size, p=self.weights)
        out = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for row, i in enumerate(which):
            arr = self.arrays[i]
            start = int(rng.integers(0, len(arr) - self.seq_len))
            out[row] = arr[start : start + self.seq_len + 1]
        return torch.from_numpy(out)
