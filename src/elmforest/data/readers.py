"""Stream documents from the user's files: JSONL, Parquet, folders of .txt, saved Hugging Face
datasets, and `datasets` builders (json/parquet/csv/text) through a source spec (data/sources.py;
the saved datasets and builders are read in data/hf_readers.py, and a record becomes a Document or a
counted skip in data/documents.py).

Nothing is loaded whole: JSONL is read line by line, Parquet batch by batch. Bad records are
skipped and counted by reason so the caller can report them; a file that cannot be read at all is
an error that names the file, and so is anything named like a data file that is not a readable
regular file (a dangling link, a fifo, a device): skipping it would silently drop its data. A folder
is searched whatever its name (Spark writes `x.parquet/` folders of part files).
`manifest.json` and `*.meta.json` (elmforest's own metadata, such as the report of `cluster
assign`) sit beside data and are never read as data. A folder saved by `save_to_disk` found inside
a folder is read as one dataset, not as its files.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from elmforest.data.documents import (
    DataError,
    Document,
    FieldCheck,
    ReadStats,
    _check_record,
    _InvalidUtf8,
    batch_records,
    check_columns,
    record_columns,
)
from elmforest.data.sources import Source, parse_source, with_options

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
TEXT_SUFFIXES = (".txt",)
SUPPORTED = JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES
META_SUFFIX = ".meta.json"  # elmforest metadata beside data files: never data


_PART = re.compile(r"part[-_.]?\d")  # Spark/Hadoop output files: news.parquet/part-00000-....parquet


def _is_part(path: Path) -> bool:
    parent = path.parent.name
    return bool(_PART.match(path.name)) and parent.endswith(SUPPORTED) and not is_metadata(parent)


def _domain_from_name(path: Path) -> str:
    if _is_part(path):  # the parts of one written table are one domain, named by their folder
        path = path.parent
    name = path.name
    for suffix in SUPPORTED:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _id_prefix(path: Path, domain: str) -> str:
    """Default ids are `<domain>:<line or row>`; parts sharing a domain add their own name, so that
    no two documents share an id."""
    return f"{domain}/{path.name}" if _is_part(path) else domain


def is_metadata(name: str) -> bool:
    return name == "manifest.json" or name.endswith(META_SUFFIX)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _is_tokenizer_output(folder: Path) -> bool:
    """`tokenizer train`, `shards build` and Hugging Face models write these two side by side; their JSON
    read as JSON lines failed every later read of a data folder they were written into."""
    return (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    try:
        return (path / "dataset_dict.json").is_file() or (
            (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
        )
    except PermissionError:  # an unreadable folder: said as such, not as a file inside it
        raise DataError(f"{path}: cannot read this folder (permission denied)") from None


def list_data_files(path: str | os.PathLike) -> list[Path]:
    """Files under `path` (a file or a folder, searched recursively) in a stable order; a saved
    dataset's folder stands for its files."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        if re.match(
            r"[A-Za-z][A-Za-z0-9+.-]*:/", os.fspath(path)
        ):  # hf://..., https://... (a Path keeps one /)
            raise DataError(
                f"{os.fspath(path)}: only local files are read (no hub or URL); download it first, e.g. "
                "`datasets.load_dataset(...).save_to_disk(DIR)`, and pass DIR"
            )
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir() and is_saved_dataset(p):
        return [p]
    if not p.is_dir():
        if not p.name.endswith(SUPPORTED):
            raise DataError(f"{p}: unsupported file type (expected one of {', '.join(SUPPORTED)})")
        if p.name.endswith(META_SUFFIX):
            raise DataError(f"{p}: elmforest metadata ({META_SUFFIX}), not data; pass its folder")
        _check_data_file(p)
        return [p]
    files: list[Path] = []
    saved: set[Path] = set()
    tools: set[Path] = set()  # a tokenizer, shards or model written inside the data folder: not data
    passed: list[str] = []  # files and folders a user may have meant as data, said once
    for f in sorted(p.rglob("*")):
        if saved and not saved.isdisjoint(f.parents):
            continue  # inside a saved dataset, which is read whole
        if tools and not tools.isdisjoint(f.parents):
            continue
        if f.is_dir() and not f.is_symlink() and _is_tokenizer_output(f):
            tools.add(f)
            passed.append(f"{f.relative_to(p)}/ (a tokenizer, shards or model folder)")
            continue
        hidden = any(part.startswith(".") for part in f.relative_to(p).parts)
        if f.is_dir() and not f.is_symlink() and not hidden:
            if not os.access(f, os.R_OK | os.X_OK):  # rglob would skip what is in it without a word
                raise DataError(f"{f}: cannot read this folder (permission denied)")
            if is_saved_dataset(f):
                saved.add(f)
                files.append(f)
                continue
        if hidden or is_metadata(f.name) or (f.is_dir() and not f.is_symlink()):
            continue  # a folder is searched, whatever its name (x.parquet/)
        if f.is_dir() or not f.name.endswith(SUPPORTED):
            passed.append(f"{f.relative_to(p)}{'/ (a link to a folder)' if f.is_dir() else ''}")
            continue
        if f.parent == p and f.name in _TOKENIZER_FILES and _is_tokenizer_output(p):  # --data is one
            passed.append(f"{f.name} (a tokenizer's file)")
            continue
        _check_data_file(f)
        files.append(f)
    files, links = read_once(files)
    passed += [f"{f.relative_to(p)} (a link to {t.relative_to(p)}, read once)" for f, t in links]
    if passed:
        _note(
            f"note: {p}: left out {len(passed)} file(s) or folder(s) not read as data (data files: "
            f"{', '.join(SUPPORTED)}): {', '.join(passed[:5])}{' ...' if len(passed) > 5 else ''} (a compressed "
            "file is read as json:PATH or csv:PATH; a linked folder, passed as --data itself)"
        )
    if not files:
        raise DataError(f"{p}: no data files found (expected {', '.join(SUPPORTED)})")
    _say_shared_names(p, files)
    return files


def read_once(files: list[Path]) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """`files` with each real file once, and the (link, file read instead) pairs left out: a link to a
    file also listed (or two links to one) read it twice, the same text under two ids, which the split
    could put in train and in test. The file itself is kept over links to it."""
    real: dict[Path, Path] = {}
    for f in sorted(files, key=lambda f: f.is_symlink()):
        real.setdefault(f.resolve(), f)
    return [f for f in files if real[f.resolve()] is f], [
        (f, real[f.resolve()]) for f in files if real[f.resolve()] is not f
    ]


def _say_shared_names(
    root: Path, files: list[Path], named=None, what: str = "a JSONL/Parquet file's"
) -> None:
    """JSONL/Parquet files of one name in different folders (drama/part1.jsonl, legal/part1.jsonl) name
    one domain where their records have no `domain` field, and their default ids (`part1:<line>`) are
    the same: the two folders' documents are mixed into one domain and paired into the same split. The
    layout of a folder per domain holds for .txt files only; said, since the records decide. So are
    two Spark tables of one name in two folders (`a/news.parquet/part-0...`, `b/news.parquet/...`). `named`
    gives a file's domain, or None for files the rule leaves out (a builder's files: hf_readers)."""

    def native(f: Path) -> str | None:  # a part's folder is its table: parts of one table share it
        ok = f.is_file() and not f.name.endswith(TEXT_SUFFIXES)
        return _domain_from_name(f) if ok else None

    by: dict[str, set[Path]] = {}
    for f in files:
        if (name := (named or native)(f)) is not None:
            by.setdefault(name, set()).add(f.parent)
    shared = {name: dirs for name, dirs in by.items() if len(dirs) > 1}
    if shared:
        name, dirs = next(iter(sorted(shared.items())))
        where = ", ".join(str(d.relative_to(root) if d.is_relative_to(root) else d) for d in sorted(dirs))
        _note(
            f"note: {root}: {len(shared)} file name(s) appear in several folders ({name} in {where}): without "
            f"a `domain` field {what} domain is its name, not its folder, so those files are "
            "one domain with colliding ids; give the records a `domain` field or rename the files"
        )


def _check_data_file(f: Path) -> None:
    if f.is_symlink() and not f.exists():
        raise DataError(f"{f}: dangling symbolic link (its target {os.readlink(f)} does not exist)")
    if f.is_dir():
        raise DataError(f"{f}: a directory named like a data file; rename it")
    if not f.is_file():
        raise DataError(f"{f}: not a regular file (a fifo, socket or device); data must be a file")
    if not os.access(f, os.R_OK):
        raise DataError(f"{f}: cannot open (permission denied)")


_QUIET: ContextVar[bool] = ContextVar("quiet_notes", default=False)


@contextmanager
def quiet_notes() -> Iterator[None]:
    """Reads without the notes on the files (left out, named alike, spread JSON), for one of two reads of
    the same sources (the corpus: the tokenizer's, then the shards'; the out-of-domain sets: their
    checks, then their build), so each note is said once."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


def _note(text: str) -> None:
    if not _QUIET.get():
        print(text, file=sys.stderr)


_PLAIN = Source(None, "")  # the default fields
LOOSE_TXT_NOTE = 20  # loose .txt files in the root given, each its own domain: likely the wrong root
SPLIT_NAMES = {"train", "training", "valid", "validation", "val", "dev", "test", "eval", "evaluation"}
_ARRAY = (
    "{path}: a JSON array, not JSON lines (one object per line); convert it "
    "(`jq -c '.[]' FILE > FILE.jsonl`) or read it with the `json:` source (docs/data-formats.md)"
)
_SPREAD = (
    "note: {path}: a JSON object spread over lines (pretty-printed), not JSON lines (one object per "
    "line): no document read from it; convert it (`jq -c . FILE > FILE.jsonl`) or read it with the "
    "`json:` source (docs/data-formats.md)"
)


def _read_jsonl(path: Path, stats: ReadStats, src: Source = _PLAIN) -> Iterator[Document]:
    domain = _domain_from_name(path)
    at = _id_prefix(path, domain)
    fields = FieldCheck(path, src)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror or e})") from e
    first, spread, read = True, False, 0  # the first non-blank line; it a lone "{"; records read
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:  # a BOM on any line: files that each open with one, joined by `cat`, lost all but the first's
                line = raw.decode("utf-8").removeprefix("\ufeff")
            except UnicodeDecodeError:
                first = False
                stats.skipped["invalid_utf8"] += 1
                continue
            if not line.strip():  # (a BOM alone)
                continue
            was_first, first = first, False  # a bad first line does not make a later array the file's
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):  # a syntax error, nesting past the stack, a huge int
                if was_first and line.lstrip().startswith("["):
                    raise DataError(_ARRAY.format(path=path)) from None
                spread = spread or (was_first and line.strip() == "{")  # its lines each skipped
                stats.skipped["invalid_json"] += 1
                continue
            if was_first and isinstance(rec, list):
                raise DataError(_ARRAY.format(path=path))
            fields.see(rec)
            read += 1
            doc = _check_record(rec, stats, domain, f"{at}:{lineno}", src.text_field, src.domain_field)
            if doc is not None:
                yield doc
    if spread and not read:  # said, not fatal: a stray config.json beside the data read nothing before
        _note(_SPREAD.format(path=path))
    elif first:  # no line but blank ones: a file truncated to nothing vanished without a word
        _note(f"note: {path}: empty (no line but blank ones): no document read from it")
    fields.done()


def _read_parquet(
    path: Path, stats: ReadStats, batch_size: int = 1024, src: Source = _PLAIN
) -> Iterator[Document]:
    import pyarrow.parquet as pq

    domain = _domain_from_name(path)
    at = _id_prefix(path, domain)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: cannot read as Parquet ({e})") from e
    names = set(pf.schema_arrow.names)
    check_columns(path, names, src, "Parquet file")
    columns = record_columns(names, src)
    row = 0
    for batch in _batches(pf, path, batch_size, columns):
        for rec in batch_records(batch, columns, src.text_field):
            row += 1
            if isinstance(rec[src.text_field], _InvalidUtf8):
                stats.skipped["invalid_utf8"] += 1
                continue
            doc = _check_record(rec, stats, domain, f"{at}:{row}", src.text_field, src.domain_field)
            if doc is not None:
                yield doc


def _batches(pf, path: Path, batch_size: int, columns: list[str]):
    it = pf.iter_batches(batch_size=batch_size, columns=columns)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as e:  # a corrupt row group part-way through the file
            raise DataError(f"{path}: cannot read Parquet data ({e})") from e
        yield batch


def _read_txt(path: Path, root: Path, stats: ReadStats) -> Iterator[Document]:
    rel = path.relative_to(root) if root.is_dir() else Path(path.name)
    # root/<domain>/**/*.txt takes the folder's name; a file directly in root takes its own name.
    domain = rel.parts[0] if len(rel.parts) > 1 else _domain_from_name(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror or e})") from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        stats.skipped["invalid_utf8"] += 1
        return
    doc = _check_record({"text": text}, stats, domain, rel.as_posix())
    if doc is not None:
        yield doc


def iter_documents(
    path: str | os.PathLike,
    stats: ReadStats | None = None,
    *,
    text_field: str | None = None,
    domain_field: str | None = None,
    hf_split: list[str] | None = None,
) -> Iterator[Document]:
    """Yield every usable document of a source (a path, or a spec: data/sources.py); skipped
    records are counted in `stats`. The keyword options are folded into the source's own."""
    stats = stats if stats is not None else ReadStats()
    src = parse_source(with_options(path, text_field, domain_field, hf_split))
    if src.format not in (None, "auto"):
        from elmforest.data.hf_readers import read_builder

        yield from read_builder(src, stats)
        return
    root = Path(src.location) if src.format else Path(path)
    files = list_data_files(src.location if src.format else path)  # as given: a URL keeps its //
    if src.hf_splits and not any(f.is_dir() for f in files):  # else every row read, whatever was asked
        raise DataError(
            f"{root}: --hf-split (split=) picks splits of a saved Hugging Face DatasetDict, and there is "
            "none here; drop it to read these files whole"
        )
    loose = [f for f in files if f.suffix == ".txt" and f.parent == root]
    if len(loose) >= LOOSE_TXT_NOTE:
        _note(
            f"note: {root}: {len(loose)} .txt files sit directly in it, so each is its own domain and its "
            "id is its bare file name; to make the folder a domain, pass the folder above it (as the "
            "data was given to `shards build`: ids and so splits depend on the path below the root given)"
        )
    if split_like := sorted({f.name for f in files if _domain_from_name(f).lower() in SPLIT_NAMES}):
        _note(
            f"note: {root}: {', '.join(split_like)}: named like a split, but read as data like any file: each "
            "document's split is a hash of its id (--valid-frac, --test-frac), so a split made beforehand "
            "is not kept (a test document may train)"
        )
    for f in files:
        if f.is_dir():  # a saved Hugging Face dataset
            from elmforest.data.hf_readers import read_saved

            yield from read_saved(f, stats, src)
            continue
        stats.files += 1
        if f.name.endswith(JSONL_SUFFIXES):
            yield from _read_jsonl(f, stats, src)
        elif f.name.endswith(PARQUET_SUFFIXES):
            yield from _read_parquet(f, stats, src=src)
        else:
            yield from _read_txt(f, root, stats)
