"""Training elmforest's own byte-level BPE (GPT-2 style) on the training split of a corpus, each domain
capped so a large one cannot crowd out the rest; data/tokenizer.py saves and loads it."""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from elmforest.data.documents import DataError, Document
from elmforest.data.tokenizer import EOS_TOKEN, LoadedTokenizer
from elmforest.utils.errors import UserError

_LONG_RUN = 8192
_LONG = re.compile(rf"\S{{{_LONG_RUN},}}")

MIN_VOCAB = 256 + 1  # every byte and the end-of-document token


def _pieces(text: str) -> Iterator[str]:
    """The text, with runs of more than 8,192 non-space characters cut into pieces of that length.

    The BPE trainer's time grows with the square of a pre-tokenized word's length (a 200,000-letter
    DNA or base64 line takes 15 s at a 4,096 vocabulary, 0.4 s cut into 100-letter words); cutting
    changes only the pair counts at the cuts."""
    if not _LONG.search(text):
        yield text
        return
    start = 0
    for m in _LONG.finditer(text):
        a, b = m.span()
        for cut in range(a + _LONG_RUN, b, _LONG_RUN):
            yield text[start:cut]
            start = cut
    yield text[start:]


def sample_texts(docs: Iterable[Document], bytes_per_domain: int) -> Iterator[str]:
    """Whole documents of each domain until `bytes_per_domain` is reached (the last one whole, so one
    huge document passes the cap), so a large domain cannot crowd out the rest."""
    used: dict[str, int] = {}
    for d in docs:
        if used.get(d.domain, 0) >= bytes_per_domain:
            continue
        used[d.domain] = used.get(d.domain, 0) + len(d.text.encode("utf-8"))
        yield from _pieces(d.text)


MAX_VOCAB = 1 << 20


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> LoadedTokenizer:
    """Byte-level BPE (GPT-2 style): any UTF-8 text round-trips exactly, no unknown tokens."""
    if vocab_size < MIN_VOCAB:
        raise UserError(f"vocab_size must be at least {MIN_VOCAB} (256 bytes + EOS), got {vocab_size}")
    if vocab_size > MAX_VOCAB:  # the BPE trainer allocates by it up front (2^32 asked for 283 GB)
        raise UserError(
            f"vocab_size {vocab_size:,} is more than {MAX_VOCAB:,}, 4x the largest vocabularies in use (256k)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return LoadedTokenizer(tok, tok.token_to_id(EOS_TOKEN))


def train_bpe_on(
    data: str | os.PathLike,
    vocab_size: int,
    bytes_per_domain: int = 1_000_000,
    valid_frac: float = 0.05,
    test_frac: float = 0.05,
    domains: set | None = None,
    only: Collection[str] | None = None,
):
    """Train a BPE on the *training split* of `data` only, so held-out text never shapes the vocabulary.
    `domains`, a set, receives the training documents' domains, `only`'s or not (read anyway: a bad
    one is said before the shards are built). `only` names the domains whose text it learns from (a
    study of some of a corpus's domains: the others shape neither its vocabulary nor its shards)."""
    from elmforest.data.readers import ReadStats, iter_documents
    from elmforest.data.splits import SplitSpec

    spec = SplitSpec(valid_frac, test_frac)
    stats = ReadStats()
    seen = 0
    found = domains if domains is not None else set()

    def docs():
        nonlocal seen
        for d in iter_documents(data, stats):
            if spec.assign(d.id) == "train":
                found.add(d.domain)
                if only is None or d.domain in only:
                    seen += 1
                    yield d

    tok = train_bpe(sample_texts(docs(), bytes_per_domain), vocab_size)
    if not seen:
        # a BPE of nothing is the bare byte alphabet: refuse it rather than write a useless tokenizer
        if only is not None and stats.documents:
            raise DataError(
                f"{data}: no training-split documents of {', '.join(sorted(only))} to learn a "
                f"tokenizer from ({stats.summary()}; its domains with some: {', '.join(sorted(found))})"
            )
        raise DataError(f"{data}: no training-split documents to learn a tokenizer from ({stats.summary()})")
    return tok, stats
