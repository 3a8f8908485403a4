"""Bits per byte, the tokenizer-independent measure every comparison in elmforest uses.

BPB = Σ next-token NLL (nats) / ln 2 / UTF-8 bytes of the predicted text.

Convention (one for the whole project): a domain's split is evaluated as the stream
`EOS d1 EOS d2 EOS ... dn EOS`; the leading EOS is context only, every later token is predicted
exactly once. Each document-ending EOS is predicted and counted as 1 byte (as in BLT), so the
byte count is Σ UTF-8 bytes of the documents + number of documents. A document is encoded as the
tokenizer's own `AutoTokenizer` would (a Llama-style `<s>` included): such a BOS is predicted, its
loss counted, and it counts 0 bytes (it stands for no text). The stream is cut into
non-overlapping windows of `seq_len` predictions; each window's input is the token before its first
prediction (a later window's: the last token of the one before) and its own tokens but its last; no
context is carried further.
Token perplexity is exp(Σ NLL / predicted tokens) (inf when that overflows: a finite but huge loss).

A non-finite summed loss is an error naming the model and the domain (corrupt or diverged weights),
never a NaN in a table. A domain of the shards with no documents in the evaluated split is left out
of the table and of `mean_bpb`, and said so: a note on stderr, and `missing` in the result.
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from elmforest.data.shards import Shards
from elmforest.data.shards_build import build_shards
from elmforest.data.sources import resolve_source
from elmforest.data.splits import SplitSpec
from elmforest.data.tokenizer import load_tokenizer
from elmforest.eval.held_out import check_held_out, training_split_spec
from elmforest.model.build import load_model, position_limit, read_config, resolve_model_dir
from elmforest.utils.device import autocast, resolve_device, resolve_precision
from elmforest.utils.errors import Diverged, NotFound, UserError
from elmforest.utils.io import read_json


@dataclass
class StreamScore:
    nll: float  # nats, summed
    tokens: int  # predicted tokens
    bytes: int

    @property
    def bpb(self) -> float:
        return self.nll / math.log(2) / self.bytes

    @property
    def ppl(self) -> float:
        try:
            return math.exp(self.nll / self.tokens)
        except OverflowError:  # a loss above ~709 nats per token: report it, do not crash the table
            return math.inf


def check_finite(nll: float, model: str, domain: str, split: str) -> float:
    if not math.isfinite(nll):
        raise Diverged(
            f"{model}: the loss on {domain}/{split} is {nll}: corrupt or diverged weights "
            "(a flipped byte in the weights file?)"
        )
    return nll


def missing_domains(
    shards: Shards, split: str, domains: list[str] | None, where=None
) -> tuple[list[str], dict]:
    """The domains to score (the given ones, or every domain with documents in `split`) and those of
    the shards left out, with why; a note on stderr names the left-out ones (and `where` the data,
    when the shards are a temporary tokenization of it)."""
    if domains:
        return domains, {}
    names = [d for d in shards.domains if shards.has(d, split)]
    missing = {d: f"no {split} documents" for d in shards.domains if not shards.has(d, split)}
    if missing:
        print(
            f"note: {where or shards.root}: {', '.join(missing)} left out: no {split} documents",
            file=sys.stderr,
        )
    return names, missing


def n_windows(n_tokens: int, seq_len: int) -> int:
    return max(1, math.ceil(n_tokens / seq_len))


def window_batch(stream: np.ndarray, eos_id: int, seq_len: int, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [len(ids), seq_len] of the given windows, sliced lazily from a (memmapped) stream.

    Window w predicts stream[w*T : (w+1)*T] from the token before each; the token before the very
    first is EOS. Padding targets past the end of the stream are -100 (ignored).
    """
    n = len(stream)
    x = np.full((len(ids), seq_len), eos_id, dtype=np.int64)
    y = np.full((len(ids), seq_len), -100, dtype=np.int64)
    for row, w in enumerate(ids):
        lo, hi = w * seq_len, min((w + 1) * seq_len, n)
        tgt = np.asarray(stream[lo:hi], dtype=np.int64)
        y[row, : len(tgt)] = tgt
        if lo > 0:
            x[row, 0] = stream[lo - 1]
        x[row, 1 : len(tgt)] = tgt[:-1]
    return torch.from_numpy(x), torch.from_numpy(y)


def windows(stream: np.ndarray, eos_id: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All windows of a stream at once (small streams and tests)."""
    return window_batch(stream, eos_id, seq_len, range(n_windows(len(stream), seq_len)))


def token_logprobs(model, x: torch.Tensor, y: torch.Tensor, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """log p(y_t | x_<=t) as float32 [batch, seq_len]; 0 where the target is padding."""
    with autocast(x.device, amp_dtype):
        logits = model(input_ids=x).logits
    return -F.cross_entropy(
        logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none"
    ).view_as(y)


@torch.no_grad()
def stream_nll(
    model,
    stream: np.ndarray,
    eos_id: int,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    progress: bool = False,
    desc: str = "eval",
) -> float:
    """Summed NLL (nats) of every token of `stream` given the tokens before it in its window."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    nw = n_windows(len(stream), seq_len)
    for i in tqdm(range(0, nw, batch_size), desc=desc, disable=not progress, leave=False):
        x, y = window_batch(stream, eos_id, seq_len, range(i, min(i + batch_size, nw)))
        lp = token_logprobs(model, x.to(device), y.to(device), amp_dtype)
        total -= lp.double().sum()  # float64 accumulation: millions of tokens lose no precision
    return float(total)


def select_documents(docs: np.ndarray, max_bytes: int | None) -> tuple[int, int, int]:
    """Whole documents from the start of a split, as many as fit in `max_bytes` of text (at least one):
    (n_docs, tokens, bytes).

    Chosen by bytes, never by tokens: documents sit in the same order whatever the tokenizer (the
    split and the file order decide it), so every model, whatever its tokenizer, scores exactly the
    same documents and the same bytes.
    """
    ends, nbytes = docs[:, 0], docs[:, 1]
    if max_bytes:
        n = max(1, int(np.searchsorted(np.cumsum(nbytes), max_bytes, side="right")))
    else:
        n = len(ends)
    return n, int(ends[n - 1]), int(nbytes[:n].sum())


def no_split_hint(where) -> str:
    """Raw data (`where` names it) split too finely for its few documents: what to pass."""
    if not where:
        return ""
    return (
        "; too few documents to reach it at these split fractions: for an evaluation-only set, --split all "
        "scores every document (or larger --split-fractions VALID,TEST)"
    )


def evaluate_shards(
    model,
    shards: Shards,
    split: str = "test",
    domains: list[str] | None = None,
    seq_len: int = 256,
    batch_size: int = 16,
    max_bytes: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    name: str | None = None,
    where=None,
) -> dict:
    """`name` says which model a non-finite loss came from (default: the directory it was loaded from);
    `where` names the data in messages when `shards` is a temporary tokenization of it."""
    dev = resolve_device(device)
    amp = resolve_precision(precision, dev)
    model.to(dev).eval()
    name = name or getattr(model, "name_or_path", None) or type(model).__name__
    names, missing = missing_domains(shards, split, domains, where)
    if not names:
        raise UserError(f"{where or shards.root}: no domain has a {split!r} split" + no_split_hint(where))
    out = {}
    for d in names:
        n_docs, n_tok, n_bytes = select_documents(shards.documents(d, split), max_bytes)
        stream = shards.tokens(d, split)[:n_tok]
        nll = stream_nll(model, stream, shards.eos_id, seq_len, batch_size, dev, amp, progress, desc=d)
        check_finite(nll, name, d, split)
        sc = StreamScore(nll, n_tok, n_bytes + n_docs)
        out[d] = {
            "bpb": sc.bpb,
            "ppl": sc.ppl,
            "tokens": sc.tokens,
            "bytes": sc.bytes,
            "documents": n_docs,
            "nll_nats": nll,
        }
    return {
        "domains": out,
        "mean_bpb": float(np.mean([v["bpb"] for v in out.values()])),
        "missing": missing,
        "split": split,
        "seq_len": seq_len,
        "max_bytes": max_bytes,
        "device": str(dev),
        "precision": str(amp or torch.float32).replace("torch.", ""),
        "convention": "EOS predicted and counted as 1 byte per document; a tokenizer-added BOS predicted, "
        "0 bytes; non-overlapping windows",
    }


def evaluate(
    model_path: str | Path,
    data: str | Path,
    split: str | None = None,
    domains: list[str] | None = None,
    seq_len: int | None = None,
    batch_size: int = 16,
    max_bytes: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    trust_remote_code: bool = False,
    split_spec: SplitSpec | None = None,
) -> dict:
    """Evaluate a model (run dir or HF checkpoint) on a shards dir or on raw JSONL/Parquet/txt data.

    `split` is `test` by default, for shards and raw data alike and for models and forests alike, so
    every mode scores the same documents; `all` scores every document. Raw data is tokenized with the
    model's own tokenizer into temporary shards, its documents split by the id hash with the fractions
    of the model's training shards. Shards must have been made with the model's tokenizer.
    """
    mdir = resolve_model_dir(model_path)
    tok = load_tokenizer(mdir)
    model = load_model(mdir, trust_remote_code=trust_remote_code)
    seq_len = seq_len or default_seq_len(mdir)
    check_seq_len(mdir, seq_len)
    split = split or "test"
    if split not in ("train", "valid", "test", "all"):
        raise UserError(f"split must be train, valid, test or all, got {split!r}")
    settings = dict(
        domains=domains,
        seq_len=seq_len,
        batch_size=batch_size,
        max_bytes=max_bytes,
        device=device,
        precision=precision,
        progress=progress,
    )
    if Shards.is_shards_dir(data):
        if split_spec is not None:  # its splits are fixed: the option would be ignored
            raise UserError(
                f"{data} is a shards directory, split when it was built: --split-fractions applies to raw data"
            )
        shards = Shards(data)
        if shards.tokenizer_fingerprint != tok.fingerprint():
            raise UserError(
                f"{data} was tokenized with a different tokenizer than {mdir}; "
                "pass the raw text instead (it is re-tokenized with the model's tokenizer)"
            )
        shards.check_eos(tok.eos_id, mdir)
        if split == "all":
            raise UserError("--split all needs raw data (a shards directory keeps its splits apart)")
        check_held_out(mdir, shards.index.get("source"), SplitSpec(**shards.index["split"]), split, data)
        result = evaluate_shards(model, shards, split, **settings, name=str(mdir))
    else:  # raw text, split at the model's training shards' fractions when known, else the defaults
        spec = SplitSpec(0.0, 0.0) if split == "all" else training_split_spec(mdir, split_spec)
        check_held_out(mdir, data, spec, split, data, given=split_spec is not None)
        with raw_as_shards(data, tok, spec, split, progress=progress) as (shards, stored):
            result = evaluate_shards(model, shards, stored, **settings, name=str(mdir), where=data)
            read_from_raw(result, shards, spec)
    result["split"] = split
    result["model"] = str(mdir)
    result["data"] = resolve_source(data)  # where it was read, as the shards index records it
    return result


@contextmanager
def raw_as_shards(
    data: str | Path, tok, spec: SplitSpec, split: str, also: tuple[str, ...] = (), progress: bool = False
) -> Iterator[tuple[Shards, str]]:
    """Raw text as temporary shards for one evaluation: the documents of `split` (and `also`, e.g. the
    prior's split), split by the id hash at `spec` and tokenized with `tok`. Yields the shards and the
    split they hold `split` as (`all` is stored as train, at fractions 0). An error naming the temporary
    shards names `data` instead: the user never saw the former."""
    stored = "train" if split == "all" else split
    with tempfile.TemporaryDirectory(prefix="elmforest-eval-") as tmp:
        built = build_shards(
            data,
            tok,
            Path(tmp) / "shards",
            spec,
            progress=progress,
            only_splits=tuple(dict.fromkeys((stored, *also))),
        )
        shards = Shards(built.out)
        try:
            yield shards, stored
        except (UserError, NotFound) as e:
            raise type(e)(str(e).replace(str(shards.root), str(data))) from None


def read_from_raw(result: dict, shards: Shards, spec: SplitSpec) -> dict:
    """What a result on raw text records: what was read, and which documents its split meant (the hash
    split at these fractions), so two results can be checked for the same bytes."""
    result["read"] = shards.index["read"]
    result["split_spec"] = asdict(spec)  # every field: a by-file split re-reads as one
    return result


def check_seq_len(mdir: Path, seq_len: int) -> None:
    """A window longer than the model's position table is scored on positions it never had (Llama's
    rotary embedding runs on) or fails deep in the embedding (GPT-2's IndexError): refused."""
    cfg = read_config(Path(mdir))
    most = position_limit(cfg)
    if most and seq_len > most:
        raise UserError(
            f"seq_len {seq_len} is longer than {mdir}'s {most} positions (its config.json); use --seq-len "
            f"{most} or less"
        )


def default_seq_len(mdir: Path) -> int:
    """The context length the model was trained with, else its maximum (capped at 1024)."""
    run_cfg = mdir / "elmforest_run.json"
    if run_cfg.is_file():
        return int(read_json(run_cfg)["train"]["seq_len"])
    cfg = read_json(mdir / "config.json")
    return int(min(position_limit(cfg) or 1024, 1024))
