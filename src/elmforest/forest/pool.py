"""The forest's experts: loaded on demand, each run alone; scored windows cached for evaluation, a KV
cache per expert for generation, so both load, place and run experts the same way.

Several mixtures of the same experts on the same data (posterior, fixed, top-k, uniform) run each
expert once; `passes` still counts every token an expert was asked to score, which is the compute of
inference. The cached prior is estimated here too, from the experts' posteriors on held-out windows.
An expert whose log-probs are not finite (corrupt or diverged weights) is an error naming its
directory, before it can turn a mixture into NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from elmforest.eval.bpb import n_windows, token_logprobs, window_batch
from elmforest.forest.manifest import Forest
from elmforest.forest.posterior import cached_prior, sequence_posterior
from elmforest.model.build import load_model
from elmforest.utils.device import autocast, resolve_device, resolve_precision
from elmforest.utils.errors import Diverged, UserError


@dataclass
class ExpertPool:
    """The forest's experts, loaded on demand; `keep_loaded=False` holds one at a time (big models)."""

    dirs: list[Path]
    device: torch.device
    amp: torch.dtype | None
    batch_size: int = 16
    keep_loaded: bool = True
    # scored log-probs kept for reuse, the least recently used dropped past this many bytes (4 bytes a
    # token per expert: a whole corpus's test split at 64 experts would not fit in memory)
    cache_bytes: int = 2 * 1024**3
    _models: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict)
    _cached: int = 0  # bytes in _cache
    _decoding: dict = field(default_factory=dict)  # expert -> its KV cache over a prefix of the tokens
    passes: int = 0  # expert token passes asked for (cached or not): the compute of inference
    scoring: str = ""  # what is being scored ("domain/split"), for the error of a non-finite expert

    def model(self, j: int):
        if j not in self._models:
            if not self.keep_loaded:
                self._models.clear()
            self._models[j] = load_model(self.dirs[j]).to(self.device).eval()
        return self._models[j]

    @torch.no_grad()
    def logprobs(
        self,
        j: int,
        stream: np.ndarray,
        eos_id: int,
        seq_len: int,
        window_ids,
        upto: int | None = None,
        key=None,
    ) -> torch.Tensor:
        """[len(window_ids), T] log-probs of expert j (only the first `upto` positions if given).

        With a `key` naming the stream, results are cached, so several mixtures of the same experts on
        the same data (posterior, fixed, top-k) run each expert once; `passes` still counts every request.
        """
        ids = list(window_ids)
        ck = (j, key, tuple(ids), upto, seq_len) if key is not None else None
        if ck in self._cache:
            out, count = self._cache.pop(ck)
            self._cache[ck] = (out, count)  # most recently used last
            self.passes += count
            return out
        before = self.passes
        out = torch.zeros(len(ids), seq_len)
        m = self.model(j)
        for i in range(0, len(ids), self.batch_size):
            x, y = window_batch(stream, eos_id, seq_len, ids[i : i + self.batch_size])
            if upto is not None:
                x, y = x[:, :upto], y[:, :upto]
            lp = token_logprobs(m, x.to(self.device), y.to(self.device), self.amp).cpu()
            if not bool(torch.isfinite(lp).all()):
                on = f" on {self.scoring}" if self.scoring else ""
                raise Diverged(
                    f"{self.dirs[j]}: non-finite log-probabilities{on}: corrupt or diverged weights"
                )
            out[i : i + len(x), : lp.shape[1]] = lp
            self.passes += int((y != -100).sum())
        if ck is not None:
            self._keep(ck, out, self.passes - before)
        return out

    def _keep(self, ck, out: torch.Tensor, count: int) -> None:
        size = out.numel() * out.element_size()
        if ck in self._cache:  # the same key again (from pools that share experts): replaced
            old, _ = self._cache.pop(ck)
            self._cached -= old.numel() * old.element_size()
        if size > self.cache_bytes:
            return  # never kept: the others stay
        while self._cache and self._cached + size > self.cache_bytes:
            old, _ = self._cache.pop(next(iter(self._cache)))
            self._cached -= old.numel() * old.element_size()
        self._cache[ck] = (out, count)
        self._cached += size

    def clear_cache(self) -> None:
        """Forget every scored log-prob (the models stay loaded)."""
        self._cache.clear()
        self._cached = 0

    def adopt(self, other: ExpertPool) -> None:
        """Take over another pool's loaded experts and cached log-probs for the experts both hold (the same
        directories, device and precision), so a forest scored again with one expert more (a language
        added later) runs only the new one."""
        if (other.device, other.amp) != (self.device, self.amp):
            return
        index = {d: j for j, d in enumerate(self.dirs)}
        same = {j: index[d] for j, d in enumerate(other.dirs) if d in index}
        for (j, *rest), (out, count) in other._cache.items():
            if j in same:
                self._keep((same[j], *rest), out, count)
        if self.keep_loaded:
            self._models.update({same[j]: m for j, m in other._models.items() if j in same})

    def all_logprobs(self, experts, stream, eos_id, seq_len, window_ids, key=None) -> torch.Tensor:
        return torch.stack([self.logprobs(j, stream, eos_id, seq_len, window_ids, key=key) for j in experts])

    @torch.no_grad()
    def advance(self, j: int, ids: list[int]) -> torch.Tensor:
        """Log-probs [new, V] of expert j predicting the token after each of `ids` it has not read yet.

        `ids` only ever grows (generation appends to it): the expert's KV cache holds the prefix it has
        read, so an expert left out of some steps (c-BTM's top-k) catches up in one pass when needed.
        """
        state = self._decoding.setdefault(j, {"cache": None, "seen": 0, "last": None})
        m = self.model(j)
        new = torch.tensor([ids[state["seen"] :]], device=self.device)
        with autocast(self.device, self.amp):
            out = m(input_ids=new, cache=state["cache"], use_cache=True)
        lp = torch.log_softmax(out.logits[0].float(), -1)
        state.update(cache=out.cache, seen=len(ids), last=lp[-1])
        self.passes += new.shape[1]
        return lp

    def reset_decoding(self) -> None:
        """Forget every expert's KV cache: the next generation starts from a new prompt."""
        self._decoding.clear()

    def next_logprobs(self, j: int, ids: list[int]) -> torch.Tensor:
        """Log-probs [V] of expert j for the token after all of `ids` (reading only what it has not)."""
        state = self._decoding.get(j)
        if state is None or state["seen"] < len(ids):
            self.advance(j, ids)
        return self._decoding[j]["last"]


def check_intact(forest: Forest, names: list[str] | None = None) -> None:
    """A missing, resized or changed expert file, said before anything reads it: checksums, read again
    only for files changed since they last matched (forest/digests.py), so a byte flipped on disk is
    not scored or merged without a word, and an unchanged forest costs a stat per file."""
    for x in names or forest.names:
        if problem := forest.intact(x, deep=True, trust_unchanged=True):
            raise UserError(
                f"expert {x}: {problem}; `elmforest forest fsck --forest {forest.root}` lists what is wrong, "
                "and `forest expert` restores an expert from its run"
            )


def make_pool(
    forest: Forest,
    names: list[str] | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 16,
    keep_loaded: bool = True,
) -> ExpertPool:
    dev = resolve_device(device)
    check_intact(forest, names)
    dirs = [forest.expert_dir(x) for x in (names or forest.names)]
    return ExpertPool(dirs, dev, resolve_precision(precision, dev), batch_size, keep_loaded)


PRIOR_BATCH_WINDOWS = 8  # windows per prior batch: 20 batches = 160 windows (41k tokens at T = 256)


def estimate_prior(pool: ExpertPool, *args, **kwargs) -> torch.Tensor:
    """BTM's cached prior from the first `batches` batches of held-out windows of the target domain
    (the arguments of `estimate_prior_info`)."""
    return estimate_prior_info(pool, *args, **kwargs)[0]


def estimate_prior_info(
    pool: ExpertPool,
    stream: np.ndarray,
    eos_id: int,
    seq_len: int,
    batches: int,
    alpha: float | None = None,
    key=None,
    batch_windows: int = PRIOR_BATCH_WINDOWS,
) -> tuple[torch.Tensor, int]:
    """(prior, windows used): `batches` batches of `batch_windows` windows, every window when the split
    holds fewer. Every expert reads them all, so this costs N x the windows."""
    if batches < 1 or batch_windows < 1:
        raise UserError(f"prior batches and their windows must be at least 1, got {batches}, {batch_windows}")
    nw = min(n_windows(len(stream), seq_len), batches * batch_windows)
    lp = pool.all_logprobs(range(len(pool.dirs)), stream, eos_id, seq_len, range(nw), key=key)
    posts = [sequence_posterior(lp[:, i : i + batch_windows]) for i in range(0, nw, batch_windows)]
    return cached_prior(posts, alpha), nw


def doc_starts(stream: np.ndarray, eos_id: int, seq_len: int, nw: int) -> torch.Tensor:
    """[nw, T] True where the predicted token opens a document (the token before it is EOS; the
    stream's very first token counts, its context being the leading EOS)."""
    n = len(stream)
    pos = np.arange(nw * seq_len)
    prev = np.full(len(pos), eos_id, dtype=np.int64)
    inside = (pos >= 1) & (pos <= n)
    prev[inside] = np.asarray(stream[pos[inside] - 1], dtype=np.int64)
    starts = (prev == eos_id) & (pos < n)
    return torch.from_numpy(starts.reshape(nw, seq_len))


def valid_mask(nw: int, seq_len: int, n_tok: int) -> torch.Tensor:
    """[nw, T] 1.0 where a window position predicts a real token, 0.0 at the trailing padding."""
    return (torch.arange(nw * seq_len).view(nw, seq_len) < n_tok).double()
