"""Tokenizers: train a byte-level BPE, or take the tokenizer of a local HF checkpoint.

Everything downstream works with a `tokenizers.Tokenizer` (the fast Rust object: parallel
`encode_batch`) plus the id of the end-of-document token.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from elmforest.data.readers import Document
from elmforest.utils.errors import UserError
from elmforest.utils.io import atomic_path

EOS_TOKEN = "<|endoftext|>"


@dataclass
class LoadedTokenizer:
    tokenizer: Tokenizer
    eos_id: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def fingerprint(self) -> str:
        """Stable hash of the tokenizer's definition: shards and models must agree on it."""
        return hashlib.sha256(self.tokenizer.to_str().encode("utf-8")).hexdigest()[:16]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def sample_texts(docs: Iterable[Document], bytes_per_domain: int) -> Iterator[str]:
    """Up to `bytes_per_domain` of text from each domain, so a large domain cannot crowd out the rest."""
    used: dict[str, int] = {}
    for d in docs:
        if used.get(d.domain, 0) >= bytes_per_domain:
            continue
        used[d.domain] = used.get(d.domain, 0) + len(d.text.encode("utf-8"))
        yield d.text


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> LoadedTokenizer:
    """Byte-level BPE (GPT-2 style): any UTF-8 text round-trips exactly, no unknown tokens."""
    if vocab_size < 256 + 1:
        raise UserError(f"vocab_size must be at least 257 (256 bytes + EOS), got {vocab_size}")
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


def save_tokenizer(tok: LoadedTokenizer, out_dir: str | os.PathLike) -> None:
    """Write tokenizer.json plus the small HF files so AutoTokenizer.from_pretrained(out_dir) works."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "tokenizer.json") as tmp:
        tok.tokenizer.save(str(tmp))
    eos = tok.tokenizer.id_to_token(tok.eos_id)
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos,
        "eos_token": eos,
        "pad_token": eos,
        "unk_token": None,
        "model_max_length": 1_000_000_000,
        "clean_up_tokenization_spaces": False,
    }
    with atomic_path(out / "tokenizer_config.json") as tmp:
        tmp.write_text(json.dumps(cfg, indent=2) + "\n")


def load_tokenizer(path: str | os.PathLike) -> LoadedTokenizer:
    """Load from a directory (ours or any local HF checkpoint) or a tokenizer.json file."""
    p = Path(path)
    if p.is_dir() and (p / "model").is_dir() and not (p / "tokenizer.json").exists():
        p = p / "model"  # a run directory
    tj = p if p.is_file() else p / "tokenizer.json"
    if tj.is_file():
        tok = Tokenizer.from_file(str(tj))
        eos_id = _find_eos(tok, p if p.is_dir() else p.parent)
        return LoadedTokenizer(_whole_documents(tok), eos_id)
    if p.is_dir():
        # A checkpoint with only a slow tokenizer: let transformers convert it, offline.
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(p), use_fast=True, local_files_only=True)
        except Exception as e:
            raise UserError(f"{p}: no usable tokenizer ({e})") from e
        if hf.eos_token_id is None:
            raise UserError(f"{p}: tokenizer defines no EOS token")
        return LoadedTokenizer(_whole_documents(hf.backend_tokenizer), int(hf.eos_token_id))
    raise UserError(f"{p}: no tokenizer.json found")


def _whole_documents(tok: Tokenizer) -> Tokenizer:
    """Checkpoints may ship truncation/padding settings; documents must be tokenized whole."""
    tok.no_truncation()
    tok.no_padding()
    return tok


def _find_eos(tok: Tokenizer, directory: Path) -> int:
    candidates = []
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = directory / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if eos:
                candidates.append(eos)
    cfg = directory / "config.json"
    if cfg.is_file():
        eos_id = json.loads(cfg.read_text()).get("eos_token_id")
        if isinstance(eos_id, list):
            eos_id = eos_id[0] if eos_id else None
        if isinstance(eos_id, int):
            return eos_id
    candidates += [EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>"]
    for c in candidates:
        i = tok.token_to_id(c)
        if i is not None:
            return i
    raise UserError(f"{directory}: cannot determine the tokenizer's EOS token")


def train_bpe_on(
    data: str | os.PathLike,
    vocab_size: int,
    bytes_per_domain: int = 1_000_000,
    valid_frac: float = 0.05,
    test_frac: float = 0.05,
):
    """Train a BPE on the *training split* of `data` only, so held-out text never shapes the vocabulary."""
    from elmforest.data.readers import ReadStats, iter_documents
    from elmforest.data.splits import SplitSpec

    spec = SplitSpec(valid_frac, test_frac)
    stats = ReadStats()
    docs = (d for d in iter_documents(data, stats) if spec.assign(d.id) == "train")
    tok = train_bpe(sample_texts(docs, bytes_per_domain), vocab_size)
    return tok, stats
