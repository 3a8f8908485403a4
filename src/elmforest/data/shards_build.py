"""Building a shards directory (data/shards.py says what one holds): documents read from any source,
split by the id hash, tokenized in batches and appended per (domain, split), the whole staged under a
temporary name and renamed into place. Apart from data/shards.py so that module is the reader alone."""

from __future__ import annotations

import os
import sys
import time
from array import array
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from elmforest.data.documents import text_key
from elmforest.data.domain_map import DomainMap, _relabeller
from elmforest.data.provenance import assigning_clusterer, tokenizer_saw_held_out
from elmforest.data.readers import ReadStats, iter_documents
from elmforest.data.reorder import TIMINGS_FILE, reorder_staging, resolve_orderer, start_warm_up
from elmforest.data.shards import INDEX_VERSION, Shards, safe_name, token_dtype
from elmforest.data.sources import parse_source, resolve_source
from elmforest.data.splits import SplitSpec
from elmforest.data.tokenizer import (
    ENCODING,
    TOKENIZER_FILES,
    LoadedTokenizer,
    load_tokenizer,
    save_tokenizer,
)
from elmforest.utils.errors import AlreadyExists, UserError
from elmforest.utils.io import (
    as_write_error,
    remove_path,
    replace_dir,
    temp_sibling,
    write_json_atomic,
)

PENDING_BYTES = 256 << 20  # tokens held in memory over every (domain, split) before all are written


@dataclass
class _Writer:
    """One (domain, split)'s token file. It buffers and appends, holding no file open between writes:
    a corpus of hundreds of domains would otherwise hold two open files per domain and hit the
    process's open-file limit (1024 by default)."""

    tokens_path: Path
    ends: list
    nbytes: list
    count: int = 0
    keys: array = field(default_factory=lambda: array("Q"))  # each document's text hash (_text_key)
    pending: list = field(default_factory=list)
    pending_bytes: int = 0

    FLUSH_BYTES = 1 << 20

    def add(self, ids: list[int], nbytes: int, dtype: np.dtype) -> None:
        arr = np.asarray(ids, dtype=dtype)
        self.pending.append(arr.tobytes())
        self.pending_bytes += arr.nbytes
        self.count += len(arr)
        self.ends.append(self.count)
        self.nbytes.append(nbytes)
        if self.pending_bytes >= self.FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        with open(self.tokens_path, "ab") as f:  # creates the file even when nothing is pending
            f.writelines(self.pending)
        self.pending, self.pending_bytes = [], 0


@dataclass
class BuildReport:
    out: str
    read: dict
    seconds: float
    text_bytes: int
    tokens: int
    order: dict | None = None  # the index's order record (None: source order)
    order_seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)


def build_shards(
    data: str | os.PathLike | list,
    tokenizer: LoadedTokenizer | str | os.PathLike,
    out: str | os.PathLike,
    split: SplitSpec | None = None,
    batch_docs: int = 256,
    overwrite: bool = False,
    progress: bool = True,
    random_domains: int | None = None,
    only_splits: tuple[str, ...] | None = None,
    domain_map: dict[str, str] | None = None,
    order=None,
    order_seed: int = 0,
    only_domains: Collection[str] | None = None,
) -> BuildReport:
    """Tokenize every document under `data` into `out`. Uses all cores via `encode_batch`.

    `random_domains=K` replaces every document's domain by one of K random groups (stable per id):
    the BTM ablation of experts trained on random splits of the data. `only_splits` skips the
    other splits' documents before tokenizing them (evaluation needs only its held-out split).
    `data` may be a list of paths, read one after another (several out-of-domain sets in one build).
    `domain_map` renames domains (X-ELM: language -> language group, load_domain_map); a document whose
    domain it does not name is an error, never a silent extra expert. The index records the map.
    `order` ("source": as read; "random"; or an orderer object, data/reorder.py) reorders, and may
    deduplicate, each domain's training documents after tokenizing, seeded by `order_seed`;
    validation and test are never touched. The index records the order and its statistics.
    `only_domains` names the domains, as read (before `random_domains` or `domain_map`), whose documents
    are tokenized; the others are read past (the index records the list).
    """
    # strings, not Paths: Path("./json:x") is "json:x", a json builder source, not the file the escape names
    sources = [os.fspath(x) for x in data] if isinstance(data, (list, tuple)) else [os.fspath(data)]
    keys = [os.path.realpath(s) if parse_source(s).format is None else str(s) for s in sources]
    if twice := sorted({str(s) for s, k in zip(sources, keys, strict=True) if keys.count(k) > 1}):
        raise UserError(f"{', '.join(twice)}: given twice; every document would be read twice")
    relabel = _relabeller(random_domains, domain_map)
    orderer = resolve_orderer(order)  # a bad order is refused before any tokenizing
    tok = tokenizer if isinstance(tokenizer, LoadedTokenizer) else load_tokenizer(tokenizer)
    split = split or SplitSpec()
    out = Path(os.path.abspath(out))  # `--out .` has no name to stage its sibling by
    if out.exists():
        if not overwrite:
            raise AlreadyExists(f"{out} exists; pass --overwrite to replace it")
        if not (Shards.is_shards_dir(out) or (out.is_dir() and not any(out.iterdir()))):
            raise AlreadyExists(f"{out} exists and is not a shards directory; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_sibling(out)  # a killed build's leftovers go now
    staging.mkdir()
    warming = start_warm_up(orderer)  # its one-time cost overlaps the tokenizing
    dtype = token_dtype(tok.vocab_size)
    writers: dict[tuple[str, str], _Writer] = {}
    folders: dict[str, str] = {}
    read_domains: set[str] = set()  # with only_splits: domains read whose documents all fell elsewhere
    source_domains: set[str] = set()  # as read, before a domain map
    stats = ReadStats()
    t0 = time.perf_counter()
    text_bytes = 0
    total_tokens = 0
    bar = tqdm(desc="tokenizing", unit="B", unit_scale=True, disable=not progress)

    def flush(batch):
        nonlocal total_tokens
        ids_list = tok.encode_documents([d.text for d, _ in batch])
        for (doc, nbytes), ids in zip(batch, ids_list, strict=True):
            domain = relabel(doc)
            key = (domain, split.assign(doc.id))
            w = writers.get(key)
            if w is None:
                folder = folders.setdefault(domain, _unique_folder(domain, folders))
                (staging / folder).mkdir(exist_ok=True)
                path = staging / folder / f"{key[1]}.bin"
                w = writers[key] = _Writer(path, [], [])
            w.add(ids, nbytes, dtype)
            w.keys.append(_text_key(doc.text))
            total_tokens += len(ids)
        if sum(w.pending_bytes for w in writers.values()) > PENDING_BYTES:  # thousands of small domains
            for w in writers.values():
                if w.pending:
                    w.flush()
        bar.update(sum(n for _, n in batch))

    try:
        batch = []
        docs = (doc for path in sources for doc in iter_documents(path, stats))
        for doc in docs:
            source_domains.add(doc.domain)
            if only_domains is not None and doc.domain not in only_domains:
                continue
            if only_splits and split.assign(doc.id) not in only_splits:
                read_domains.add(relabel(doc))
                continue
            nbytes = len(doc.text.encode("utf-8"))
            text_bytes += nbytes
            batch.append((doc, nbytes))
            if len(batch) >= batch_docs:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        bar.close()
        if not writers:
            where = ", ".join(map(str, sources))
            if only_domains is not None and stats.documents:
                raise UserError(
                    f"{where}: no documents of {', '.join(sorted(only_domains))} (its domains: "
                    f"{', '.join(sorted(source_domains))})"
                )
            if only_splits and stats.documents:  # read fine, but every document hashed to another split
                raise UserError(
                    f"{where}: none of its {stats.documents} document(s) falls in the "
                    f"{'/'.join(only_splits)} split (a hash of each id, {split.valid_frac:g} valid / "
                    f"{split.test_frac:g} test): give more documents (`elmforest eval` can also score another "
                    "--split, `all` included; a cached prior needs valid documents, or shards)"
                )
            raise UserError(f"{where}: no usable documents ({stats.summary()})")
        domains: dict[str, dict] = {}
        for (domain, split_name), w in sorted(writers.items()):
            w.flush()
            table = np.stack([np.asarray(w.ends, np.int64), np.asarray(w.nbytes, np.int64)], axis=1)
            np.save(w.tokens_path.with_suffix(".docs.npy"), table, allow_pickle=False)
            domains.setdefault(domain, {"folder": folders[domain], "splits": {}})["splits"][split_name] = {
                "tokens": int(w.count),
                "documents": len(w.ends),
                "bytes": int(sum(w.nbytes)),
            }
        for domain in sorted(read_domains - set(domains)):  # listed, so evaluation can say it is missing
            domains[domain] = {"folder": None, "splits": {}}
        in_train = _held_out_in_train(writers)
        _note_lookalikes(list(domains))
        mapped = domain_map if isinstance(domain_map, DomainMap) else DomainMap(domain_map or {})
        if unused := mapped.unused(source_domains):  # a typo, or another corpus's map
            print(
                f"note: the domain map names {', '.join(unused)}, which the data does not hold",
                file=sys.stderr,
            )
        save_tokenizer(tok, staging)
        index = {
            "version": INDEX_VERSION,
            "source": resolve_source(sources[0])
            if len(sources) == 1
            else [resolve_source(x) for x in sources],
            "tokenizer": {
                "fingerprint": tok.fingerprint(),
                "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id,
                "encoding": ENCODING,
            },
            "dtype": dtype.name,
            "split": asdict(split),
            "read": stats.to_dict(),
            "domains": domains,
        }
        if only_domains is not None:
            index["only_domains"] = sorted(only_domains)
        if domain_map:
            index["domain_map"] = dict(sorted(domain_map.items()))
        if in_train:
            index["in_train"] = in_train
        if saw := tokenizer_saw_held_out(tokenizer, tok, sources, split):
            index["tokenizer_saw_held_out"] = saw
        if by := assigning_clusterer(sources):
            index["assigned_by"] = by
        order_seconds = 0.0
        if orderer is not None:
            if warming is not None:
                warming.join()
            timings = reorder_staging(staging, index, orderer, order_seed)
            order_seconds = timings["seconds"]
            write_json_atomic(staging / TIMINGS_FILE, timings)
        write_json_atomic(staging / "index.json", index)
        replace_dir(staging, out)
    except BaseException as e:  # a full disk, a bad file, a kill: free what was written, raise only once
        bar.close()
        remove_path(staging)
        if warming is not None:
            warming.join()  # not left running in BLAS or numba while the interpreter exits
        err = as_write_error(e, out)
        if err is not None:
            raise err from e
        raise
    return BuildReport(
        str(out),
        stats.to_dict(),
        time.perf_counter() - t0,
        text_bytes,
        total_tokens,
        index.get("order"),
        order_seconds,
    )


def _text_key(text: str) -> int:
    return int.from_bytes(text_key(text, 8), "little")


def _note_lookalikes(names: list[str]) -> None:
    """Domains whose names print alike (NFC and NFD spellings of one word, a case apart, spaces around
    or inside it, an invisible format character such as a zero-width space): separate domains, rows
    that a reader takes for one; said, not changed (the corpus is the user's)."""
    import unicodedata

    def key(n: str) -> str:
        n = unicodedata.normalize("NFC", n)  # ZWNJ and ZWJ change how text is drawn: kept
        n = "".join(c for c in n if unicodedata.category(c) != "Cf" or c in "\u200c\u200d")
        return " ".join(n.split()).casefold()

    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(key(n), []).append(n)
    for same in (g for g in groups.values() if len(g) > 1):
        print(
            f"note: domains {', '.join(map(ascii, sorted(same)))} differ only in case, Unicode form, "
            f"white space or invisible characters: {len(same)} domains that may print alike",
            file=sys.stderr,
        )


def _held_out_in_train(writers: dict) -> dict:
    """Valid and test documents whose text is also a training document's, in any domain (the split
    hashes ids, so a text held under two ids can fall on both sides): {domain: {split: {documents,
    bytes}}}, said on stderr. They are still scored as held out (the corpus is the user's); deduplicate
    it to score only unseen text. Nothing to say where no training split was built."""
    train = [np.frombuffer(w.keys, np.uint64) for (_, s), w in writers.items() if s == "train" and w.keys]
    if not train:
        return {}
    train = np.concatenate(train)
    out: dict[str, dict] = {}
    for (domain, split), w in sorted(writers.items()):
        if split == "train" or not w.keys:
            continue
        hit = np.isin(np.frombuffer(w.keys, np.uint64), train)
        if hit.any():
            nbytes = int(np.asarray(w.nbytes, np.int64)[hit].sum())
            out.setdefault(domain, {})[split] = {"documents": int(hit.sum()), "bytes": nbytes}
    if out:
        parts = [
            f"{d}/{s} {v['documents']} of {len(writers[(d, s)].ends)}"
            for d, x in out.items()
            for s, v in x.items()
        ]
        print(
            f"note: {sum(v['documents'] for x in out.values() for v in x.values())} valid/test document(s) "
            f"are also training text (the same text under another id): {', '.join(parts)}; they are "
            "scored as held out all the same (deduplicate the corpus to score only unseen text)",
            file=sys.stderr,
        )
    return out


_RESERVED = {"index.json", TIMINGS_FILE, *TOKENIZER_FILES}


def _unique_folder(domain: str, folders: dict[str, str]) -> str:
    base = safe_name(domain)
    taken = {f.casefold() for f in folders.values()} | _RESERVED  # case-insensitive file systems
    name, i = base, 1
    while name.casefold() in taken:
        i += 1
        name = f"{base}_{i}"
    return name
