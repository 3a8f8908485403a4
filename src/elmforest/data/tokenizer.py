"""Tokenizers: a byte-level BPE trained here (data/bpe.py), or the tokenizer of a local HF checkpoint.

Everything downstream works with a `tokenizers.Tokenizer` (the fast Rust object: parallel
`encode_batch`) plus the id of the end-of-document token.

A checkpoint's tokenizer stays the user's: its files are kept verbatim and written back unchanged
into shards, runs, experts and merges, and it encodes exactly as `AutoTokenizer` of those files
does (its own special tokens included, e.g. Llama's BOS), so what elmforest trains on is what the
exported checkpoint's users will feed it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer

from elmforest.utils.errors import UserError
from elmforest.utils.io import atomic_path

EOS_TOKEN = "<|endoftext|>"

# The files a tokenizer may consist of (as transformers names them): all travel with it, unchanged.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tiktoken.model",
    "tekken.json",
)

# How shards' ids were made (index.json "tokenizer.encoding"): the tokenizer's own special tokens
# (AutoTokenizer's default, add_special_tokens=True), then EOS unless the tokenizer already ended
# the document with it. Shards without the field predate it and hold no such special tokens.
ENCODING = "special_tokens+eos"


@dataclass
class LoadedTokenizer:
    tokenizer: Tokenizer
    eos_id: int
    # the source's tokenizer files, verbatim (name -> bytes); empty for one elmforest just trained
    files: dict[str, bytes] = field(default_factory=dict, repr=False)
    # loaded through AutoTokenizer: the files, not elmforest, define it (and its fingerprint)
    hf: bool = False

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def fingerprint(self) -> str:
        """Stable hash of the tokenizer's definition: shards and models must agree on it.

        A checkpoint's tokenizer is its files, which travel byte for byte; transformers may rebuild
        the backend differently from the same files (by model type), so its serialisation is no
        identity. A tokenizer elmforest trained keeps the hash of its definition, as it always had.
        """
        if not self.hf:
            return hashlib.sha256(self.tokenizer.to_str().encode("utf-8")).hexdigest()[:16]
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(f"{name}\0{len(self.files[name])}\0".encode())
            h.update(self.files[name])
        return h.hexdigest()[:16]

    @cached_property
    def appends_eos(self) -> bool:
        """Whether the tokenizer itself ends every text with EOS (then elmforest adds no second one)."""
        enc = self.tokenizer.encode("a", add_special_tokens=True)
        return bool(enc.ids) and enc.ids[-1] == self.eos_id and enc.special_tokens_mask[-1] == 1

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """The bytes each token id stands for (exact for byte-level BPE; per-token decode otherwise); the
        c-BTM router reads tokens through it and the server spells partial characters with it."""
        spec = json.loads(self.tokenizer.to_str())
        byte_level = "ByteLevel" in json.dumps(spec.get("decoder") or {})
        special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        # GPT-2's reversible byte <-> printable-character table, in which byte-level BPE spells its tokens:
        # transformers' own rather than a copy (5.x keeps it here; the GPT-2 tokenizer module lost it)
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        decoder = {c: b for b, c in bytes_to_unicode().items()}
        table = []
        for i in range(self.vocab_size):
            piece = self.tokenizer.id_to_token(i)
            if piece is None or i in special:
                table.append(b"")
            elif byte_level and all(ch in decoder for ch in piece):
                table.append(bytes(decoder[ch] for ch in piece))
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):  # SentencePiece byte fallback
                table.append(bytes([int(piece[3:5], 16)]))
            else:  # SentencePiece pieces mark a leading space with U+2581
                table.append(piece.replace("\u2581", " ").encode("utf-8"))
        return table

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """As `AutoTokenizer(texts)` would: with the tokenizer's own special tokens, never truncated."""
        try:
            return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
        except TypeError:  # a str the tokenizers library cannot take: lone surrogates, no UTF-8
            for t in texts:
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise UserError(
                        f"text is not valid UTF-8 (a lone surrogate at character {e.start}: undecodable "
                        "bytes in a prompt or an escaped \\udXXX)"
                    ) from None
            raise

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """Whole documents as training sees them: each ends with exactly one EOS."""
        ids = self.encode_batch(texts)
        return ids if self.appends_eos else [x + [self.eos_id] for x in ids]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _own_config(eos: str) -> dict:
    """The tokenizer_config.json elmforest writes for a tokenizer that came without one."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos,
        "eos_token": eos,
        "pad_token": eos,
        "unk_token": None,
        "model_max_length": 1_000_000_000,
        "clean_up_tokenization_spaces": False,
    }


def save_tokenizer(tok: LoadedTokenizer, out_dir: str | os.PathLike) -> None:
    """Write the tokenizer so AutoTokenizer.from_pretrained(out_dir) works and encodes as `tok` does.

    A loaded tokenizer's files are written back byte for byte and nothing is added to a checkpoint's
    own (a converted tokenizer.json beside slow-only files would change what transformers loads).
    A tokenizer elmforest trained, or a bare tokenizer.json, gets elmforest's tokenizer_config.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # tokenizer.json last: callers take it as the sign the tokenizer is saved (launch/prepare.py), so a
    # kill between the files leaves none of it there, not one without its config for good
    for name, data in sorted(tok.files.items(), key=lambda kv: kv[0] == "tokenizer.json"):
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(data)
    if tok.hf:
        return
    if "tokenizer_config.json" not in tok.files:
        cfg = _own_config(tok.tokenizer.id_to_token(tok.eos_id))
        with atomic_path(out / "tokenizer_config.json") as tmp:
            tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    if "tokenizer.json" not in tok.files:
        with atomic_path(out / "tokenizer.json") as tmp:
            tok.tokenizer.save(str(tmp))


# Loaded tokenizers by (folder, its files' bytes): one process scoring many arms loaded the same one per
# call, and each `tokenizers.Tokenizer` that has encoded keeps native memory after it is dropped (~4 MB a
# raw-data evaluation, measured; upstream: huggingface/tokenizers#1495). Nothing mutates a LoadedTokenizer.
_LOADED: dict[tuple, LoadedTokenizer] = {}
_KEEP = 8
_ALSO_READ = ("config.json", "index.json")  # where the EOS is found (_find_eos): part of the key only


def load_tokenizer(path: str | os.PathLike) -> LoadedTokenizer:
    """Load from a directory (ours or any local HF checkpoint) or a tokenizer.json file (the same
    files loaded before in this process: the same object)."""
    p = Path(path)
    also: dict[str, bytes] = {}  # read to find the EOS only (_find_eos): part of the key
    if p.is_file():
        files = {"tokenizer.json": p.read_bytes()}
        also = {
            n: (p.parent / n).read_bytes()
            for n in (*TOKENIZER_FILES, *_ALSO_READ)
            if n != p.name and (p.parent / n).is_file()
        }
    elif not p.is_dir():
        raise UserError(f"{p}: no tokenizer.json found")
    else:
        if (p / "model").is_dir() and not any((p / n).is_file() for n in TOKENIZER_FILES):
            p = p / "model"  # a run directory
        files = {n: (p / n).read_bytes() for n in (*TOKENIZER_FILES, *_ALSO_READ) if (p / n).is_file()}
        if not set(files) - set(_ALSO_READ):
            raise UserError(f"{p}: no tokenizer files found (tokenizer.json, tokenizer_config.json, ...)")
    key = (
        str(p.resolve()),
        tuple(sorted((n, hashlib.sha256(b).digest()) for n, b in files.items())),
        tuple(sorted((n, hashlib.sha256(b).digest()) for n, b in also.items())),
    )
    if (tok := _LOADED.get(key)) is None:
        tok = _load(p, {n: b for n, b in files.items() if n not in _ALSO_READ})
        if len(_LOADED) >= _KEEP:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = tok
    return tok


def _load(p: Path, files: dict[str, bytes]) -> LoadedTokenizer:
    if p.is_file():
        tok = _from_json(p, files["tokenizer.json"])
        return LoadedTokenizer(_whole_documents(tok), _find_eos(tok, p.parent), files)
    if "tokenizer.json" in files and not _is_hf(p, files):
        tok = _from_json(p / "tokenizer.json", files["tokenizer.json"])
        return LoadedTokenizer(_whole_documents(tok), _find_eos(tok, p), files)
    # A checkpoint's own tokenizer: encode with exactly what AutoTokenizer builds from these files
    # (transformers may rebuild the backend, or its post-processor from tokenizer_config.json).
    from transformers import AutoTokenizer

    try:
        backend = AutoTokenizer.from_pretrained(str(p), local_files_only=True).backend_tokenizer
    except Exception as e:
        if "tokenizer.json" not in files:
            first = str(e).splitlines()[0] if str(e) else repr(e)
            raise UserError(f"{p}: no usable tokenizer ({first})") from e
        # transformers cannot load it here (custom code, say); neither can it for the exported
        # checkpoint, so the tokenizer.json as written is the best account of how it encodes
        backend = _from_json(p / "tokenizer.json", files["tokenizer.json"])
    return LoadedTokenizer(_whole_documents(backend), _find_eos(backend, p), files, hf=True)


def _from_json(path: Path, data: bytes) -> Tokenizer:
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:
        raise UserError(f"{path}: not a readable tokenizer.json ({e})") from None


def _is_hf(directory: Path, files: dict[str, bytes]) -> bool:
    """A tokenizer_config.json that elmforest did not write: transformers decides how it encodes."""
    if "tokenizer_config.json" not in files:
        return False
    try:
        cfg = json.loads(files["tokenizer_config.json"])
    except ValueError as e:
        raise UserError(f"{directory / 'tokenizer_config.json'}: not valid JSON ({e})") from None
    return not isinstance(cfg, dict) or cfg != _own_config(cfg.get("eos_token"))


def _whole_documents(tok: Tokenizer) -> Tokenizer:
    """Checkpoints may ship truncation/padding settings; documents must be tokenized whole."""
    tok.no_truncation()
    tok.no_padding()
    return tok


def _json_object(f: Path) -> dict:
    try:
        v = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(v, dict):
        raise UserError(f"{f}: expected a JSON object, got {type(v).__name__}")
    return v


def _find_eos(tok: Tokenizer, directory: Path) -> int:
    """A shards dir's own record first (the end token its documents were built with: a checkpoint's
    config.json may name another than its tokenizer files do, and only those files are copied here),
    then config.json's `eos_token_id`, then the tokenizer files' `eos_token`, then the usual names;
    an id that is not a token of the tokenizer is refused, naming the file that gave it."""
    vocab = tok.get_vocab_size(with_added_tokens=True)

    def token(i, f: Path) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0 or tok.id_to_token(i) is None:
            raise UserError(
                f"{f}: end-of-document id {i!r} is not a token of its tokenizer (vocabulary {vocab})"
            )
        return i

    index = directory / "index.json"
    if index.is_file():
        eos_id = (_json_object(index).get("tokenizer") or {}).get("eos_id")
        if eos_id is not None:
            return token(eos_id, index)
    candidates = []
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = directory / name
        if f.is_file():
            eos = _json_object(f).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if eos is not None and not isinstance(eos, str):
                raise UserError(f"{f}: eos_token {eos!r} is not a token's text")
            if eos:
                candidates.append(eos)
    cfg = directory / "config.json"
    if cfg.is_file():
        eos_id = _json_object(cfg).get("eos_token_id")
        if isinstance(eos_id, list):
            eos_id = eos_id[0] if eos_id else None
        if eos_id is not None:
            return token(eos_id, cfg)
    candidates += [EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>"]
    for c in candidates:
        i = tok.token_to_id(c)
        if i is not None:
            return i
    raise UserError(f"{directory}: cannot determine the tokenizer's EOS token")


# What `tokenizer train` learned from, beside the tokenizer: a *.meta.json (never read as data), so that
# `shards build` can say when the tokenizer saw text the shards hold out (held-out text shaping the
# vocabulary flatters held-out BPB a little, and nothing else would tell).
TRAINING_RECORD = "tokenizer_training.meta.json"


def write_training_record(out_dir: str | os.PathLike, tok: LoadedTokenizer, data: str, split: dict) -> None:
    with atomic_path(Path(out_dir) / TRAINING_RECORD) as tmp:
        record = {"fingerprint": tok.fingerprint(), "data": data, "split": split}
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def training_record(path: str | os.PathLike, tok: LoadedTokenizer) -> dict | None:
    """The record of the tokenizer at `path` (a folder or its tokenizer.json), if it describes `tok`:
    one written before the tokenizer.json was replaced by another describes nothing."""
    p = Path(path)
    f = (p if p.is_dir() else p.parent) / TRAINING_RECORD
    try:
        record = json.loads(f.read_text())
    except (OSError, ValueError):
        return None  # none (a tokenizer of older versions, or not trained here), or unreadable: no claim
    ok = isinstance(record, dict) and record.get("fingerprint") == tok.fingerprint()
    return record if ok else None
