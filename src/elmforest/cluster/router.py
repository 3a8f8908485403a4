"""Incremental c-BTM routing: the context's embedding is updated as tokens arrive.

c-BTM's public code re-vectorises every prefix from scratch. Here the router keeps the term
counts of the context and the unnormalised projection u = Σ_w (1 + ln tf_w) · idf_w · C[:, w]; a
new word changes one term's count, so u moves by one precomputed vector: O(d) per word, however
long the context. The trailing, possibly unfinished word is added on the fly when an embedding is
read, so the result equals `Clusterer.embed` on the text so far, at every prefix.

Tokens become text through their bytes (byte-level BPE maps every token to fixed bytes) and an
incremental UTF-8 decoder, so multi-byte characters split across tokens are decoded exactly.
"""

from __future__ import annotations

import codecs
from collections import Counter

import numpy as np

from elmforest.cluster.clusterer import WORD, Clusterer, normalise_word


class IncrementalRouter:
    def __init__(
        self, clusterer: Clusterer, token_bytes: list[bytes] | None = None, eos_id: int | None = None
    ):
        self.c = clusterer
        self.token_bytes = token_bytes
        self.eos_id = eos_id
        self.reset()

    def reset(self) -> None:
        self.counts: Counter = Counter()
        self.u = np.zeros(self.c.dims)
        self.fragment = ""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text: list[str] = []  # the document's text, for an embedding-model clusterer

    def _delta(self, word: str) -> np.ndarray | float:
        """How u changes when `word` is counted once more (0 for words the clusterer ignores)."""
        term = normalise_word(word)
        i = self.c.vocab.get(term) if term is not None else None
        if i is None:
            return 0.0
        tf = self.counts[term]
        f_old = 1.0 + np.log(tf) if tf > 0 else 0.0
        return (1.0 + np.log(tf + 1) - f_old) * self.c.term_vectors[i]

    def _commit(self, word: str) -> None:
        self.u += self._delta(word)
        term = normalise_word(word)
        if term is not None and term in self.c.vocab:
            self.counts[term] += 1

    def push_text(self, text: str) -> None:
        if self.c.embedder is not None:  # no word statistics to update: the text is re-embedded
            self.text.append(text)
            return
        s = self.fragment + text
        words = WORD.findall(s)
        if words and WORD.search(s[-1:] or " "):  # the text ends inside a word: keep it open
            self.fragment = words.pop()
        else:
            self.fragment = ""
        for w in words:
            self._commit(w)

    def push_token(self, token_id: int) -> None:
        if self.eos_id is not None and token_id == self.eos_id:
            self.reset()  # a new document: its own context
            return
        self.push_text(self._utf8.decode(self.token_bytes[token_id]))

    def embedding(self) -> tuple[np.ndarray, bool]:
        """(unit vector, ok) of everything pushed since the last reset; ok=False when no known word.

        An embedding-model clusterer cannot be updated word by word: its sentence encoder re-embeds the
        text so far (the same embedding `route_stream` and evaluation use), so generation and scoring
        follow the context with either kind of clusterer."""
        if self.c.embedder is not None:
            z, ok = self.c.embed(["".join(self.text)], recent=True)
            return z[0], bool(ok[0])
        v = self.u + self._delta(self.fragment) if self.fragment else self.u.copy()
        n = float(np.linalg.norm(v))
        return (v / n, True) if n > 1e-12 else (v, False)


def route_stream(
    router: IncrementalRouter, stream: np.ndarray, positions: np.ndarray, window: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of the document context before each stream position (sorted), in one pass.

    The context of position p is every token of its document before p (documents end with EOS); with
    `window` T, only those of its own window of T tokens (the stream cut at multiples of T): the text a
    model scoring that window conditions on, and nothing before it.
    """
    if router.c.embedder is not None:
        return _route_stream_from_scratch(router, stream, positions, window)
    router.reset()
    out = np.zeros((len(positions), router.c.dims))
    ok = np.zeros(len(positions), dtype=bool)
    j = 0
    for p, t in enumerate(np.asarray(stream)):
        if window and p % window == 0:
            router.reset()
        while j < len(positions) and positions[j] == p:
            out[j], ok[j] = router.embedding()
            j += 1
        if j == len(positions):
            break
        router.push_token(int(t))
    while j < len(positions):
        out[j], ok[j] = router.embedding()
        j += 1
    return out, ok


def _route_stream_from_scratch(
    router: IncrementalRouter, stream: np.ndarray, positions: np.ndarray, window: int | None = None
):
    """Embedding-model clusterers cannot be updated incrementally: re-embed the document's text."""
    texts, pieces, j = [], [], 0
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for p, t in enumerate(np.asarray(stream)):
        if window and p % window == 0:
            pieces, decoder = [], codecs.getincrementaldecoder("utf-8")(errors="replace")
        while j < len(positions) and positions[j] == p:
            texts.append("".join(pieces))
            j += 1
        if j == len(positions):
            break
        if router.eos_id is not None and int(t) == router.eos_id:
            pieces, decoder = [], codecs.getincrementaldecoder("utf-8")(errors="replace")
        else:
            pieces.append(decoder.decode(router.token_bytes[int(t)]))
    texts += ["".join(pieces)] * (len(positions) - len(texts))
    return router.c.embed(texts, recent=True)
