"""Documents from Hugging Face formats: folders saved by `save_to_disk`, and local files read by a
`datasets` builder (`json:`, `parquet:`, `csv:`, `text:` sources, data/sources.py).

Saved datasets are read with pyarrow alone, not `datasets.load_from_disk`: their `.arrow` files are
Arrow IPC streams listed in `state.json`, so reading them needs no optional package, creates no
cache files, and goes batch by batch through a memory map like Parquet; `dataset_info.json` gives
the ClassLabel names, so a label column can name the domains. A DatasetDict is read split after
split (those of `split=`/--hf-split, else all, in `dataset_dict.json`'s order); which HF split a
record came from does not decide elmforest's train/valid/test split, the id hash does (splits.py).

Builders stream each matched file through `datasets.load_dataset(builder, data_files=[file],
streaming=True)`, one file at a time, so that, as for the native readers, a document without an
`id` field is `<name>:<row>` (the file's name without suffixes, the row counted from 1; a line of
a `text` file is a row) and takes the file's name as its domain unless it has a domain field. Only
local files are accepted, with the hub switched off (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE), and the
builder's lock files go to a temporary folder. A file the builder cannot parse is an error naming
it: unlike the native JSONL reader, the json builder parses whole blocks, not line by line.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from elmforest.data.documents import (
    DataError,
    Document,
    ReadStats,
    _check_record,
    _decode_bytes,
    _InvalidUtf8,
    batch_records,
    check_columns,
    record_columns,
)
from elmforest.data.readers import (
    _PART,
    _TOKENIZER_FILES,
    _check_data_file,
    _is_tokenizer_output,
    _note,
    _say_shared_names,
    is_metadata,
    read_once,
)
from elmforest.data.sources import Source
from elmforest.utils.errors import UserError

# the suffixes a builder takes from a folder, each also compressed (the builders decompress them)
BUILDER_SUFFIXES = {
    "json": (".jsonl", ".json", ".ndjson"),
    "parquet": (".parquet", ".pq"),
    "csv": (".csv", ".tsv"),
    "text": (".txt", ".text", ".md"),
}
COMPRESSED = ("", ".gz", ".bz2", ".xz", ".zst")


# ---- saved datasets (save_to_disk) -------------------------------------------------------------


def read_saved(path: Path, stats: ReadStats, src: Source) -> Iterator[Document]:
    path = Path(os.path.abspath(path))  # `hf/agnews/train/..` or `.` named the domain `..` / missed the dict
    name = _dataset_name(path)
    if (path / "dataset_dict.json").is_file():
        splits = _read_json(path / "dataset_dict.json").get("splits")
        if not (isinstance(splits, list) and all(_plain_name(s) for s in splits)):
            raise DataError(f"{path}/dataset_dict.json: no list of split names")
        wanted = src.hf_splits or splits
        unknown = [s for s in wanted if s not in splits]
        if unknown:
            raise DataError(f"{path}: no split(s) {', '.join(unknown)} (splits: {', '.join(splits)})")
        for split in wanted:
            yield from _read_saved_split(path / split, stats, src, name, f"{name}:{split}")
        return
    parent = path.parent  # one split of a DatasetDict, named as when the whole dict is read
    if (parent / "dataset_dict.json").is_file():
        if path.name in (_read_json(parent / "dataset_dict.json").get("splits") or []):
            if src.hf_splits and src.hf_splits != [path.name]:  # not silently the split given instead
                raise DataError(
                    f"{path}: split {path.name!r} of a saved DatasetDict, but split(s) "
                    f"{'+'.join(src.hf_splits)} were asked for: pass the DatasetDict's folder {parent}"
                )
            name = _dataset_name(parent)
            yield from _read_saved_split(path, stats, src, name, f"{name}:{path.name}")
            return
    if src.hf_splits:
        raise DataError(
            f"{path}: a saved Dataset, not a DatasetDict, so it has no split {'+'.join(src.hf_splits)} to "
            "read; drop --hf-split (split=) to read it whole"
        )
    yield from _read_saved_split(path, stats, src, name, name)


def _plain_name(s) -> bool:
    """A file or folder name inside its folder: a string, no path separator, not `.` or `..`."""
    return isinstance(s, str) and s not in ("", ".", "..") and "/" not in s and os.sep not in s


def _dataset_name(path: Path) -> str:
    return path.name or path.resolve().name or "dataset"


def _read_json(path: Path) -> dict:
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if not isinstance(out, dict):
        raise DataError(f"{path}: not a JSON object")
    return out


def _read_saved_split(
    path: Path, stats: ReadStats, src: Source, domain: str, id_prefix: str
) -> Iterator[Document]:
    import pyarrow as pa

    if not (path / "state.json").is_file():
        raise DataError(f"{path}: not a saved dataset (no state.json)")
    try:
        files = [d["filename"] for d in _read_json(path / "state.json")["_data_files"]]
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}/state.json: no list of data files") from e
    if bad := [f for f in files if not _plain_name(f)]:  # `../test/x.arrow` read the other split's file
        raise DataError(f"{path}/state.json: data file(s) {bad[:3]} are not file names in {path}")
    convert = _class_label_names(path, src.domain_field)
    row = 0
    for name in files:
        f = path / name
        if not f.exists():
            raise DataError(f"{f}: no such file (listed in {path}/state.json)")
        _check_data_file(f)
        stats.files += 1
        try:
            reader = _open_arrow(pa, f)
        except Exception as e:  # pyarrow raises several types for unreadable files
            raise DataError(f"{f}: cannot read as Arrow ({e})") from e
        names = set(reader.schema.names)
        check_columns(f, names, src, "saved dataset")
        columns = record_columns(names, src)
        for batch in _arrow_batches(reader, f):
            for rec in batch_records(batch, columns, src.text_field, convert):
                row += 1
                if isinstance(rec[src.text_field], _InvalidUtf8):
                    stats.skipped["invalid_utf8"] += 1
                    continue
                doc = _check_record(
                    rec, stats, domain, f"{id_prefix}:{row}", src.text_field, src.domain_field
                )
                if doc is not None:
                    yield doc


def _open_arrow(pa, f: Path):
    """save_to_disk writes Arrow IPC streams; an IPC file (random-access format) is read too."""
    source = pa.memory_map(str(f))
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        return pa.ipc.open_file(source)


def _arrow_batches(reader, f: Path):
    if hasattr(reader, "num_record_batches"):  # an IPC file
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
        return
    it = iter(reader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as e:  # a truncated or corrupt file part-way through
            raise DataError(f"{f}: cannot read Arrow data ({e})") from e
        yield batch


def _class_label_names(path: Path, column: str) -> dict | None:
    """A ClassLabel domain column holds ids: map them to the label names dataset_info.json lists."""
    info = path / "dataset_info.json"
    feature = (_read_json(info).get("features") or {}).get(column) if info.is_file() else None
    if not (isinstance(feature, dict) and feature.get("_type") == "ClassLabel"):
        return None
    names = feature.get("names") or []
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise DataError(f"{info}: the ClassLabel {column!r} has no list of names")

    def name(v):
        return names[v] if isinstance(v, int) and 0 <= v < len(names) else v

    return {column: name}


# ---- builders (load_dataset, streaming) --------------------------------------------------------


def read_builder(src: Source, stats: ReadStats) -> Iterator[Document]:
    files = builder_files(src.format, src.location)
    datasets = _import_datasets(src)
    kwargs = dict(src.builder_kwargs)
    if src.format == "csv":  # every cell as written: an id 007 stays "007", a year-named domain a name
        kwargs["converters"] = {c: str for c in ("id", src.domain_field, src.text_field)}
        # pandas' missing-value words (NA, nan, null, None, N/A) are text too: a language `nan` (Min Nan),
        # an id `NA`, a text `NA` were read as missing; an empty cell is still missing
        kwargs |= {"keep_default_na": False, "na_values": [""]}
    lines = src.format == "text" and kwargs.get("sample_by", "line") == "line"
    with tempfile.TemporaryDirectory(prefix="elmforest-hf-") as cache, _builders_quiet():
        for f in files:
            stats.files += 1
            domain = _builder_domain(f, src.format)
            ids = f"{domain}/{f.name}" if _builder_part(f, src.format) else domain  # parts: no id twice
            tsv = src.format == "csv" and "sep" not in kwargs and ".tsv" in f.suffixes
            try:
                ds = datasets.load_dataset(
                    src.format,
                    data_files=[str(f)],
                    split="train",
                    streaming=True,
                    cache_dir=cache,
                    **(kwargs | {"sep": "\t"} if tsv else kwargs),
                )
            except Exception as e:  # the builders raise many types (bad options, unreadable files)
                raise DataError(f"{f}: cannot read with the {src.format} builder ({e})") from e
            row = 0
            for rec in _records(ds, f, src.format):
                row += 1
                if row == 1:
                    check_columns(f, set(rec), src, f"{src.format} file")
                    text = rec.get("text")
                    if src.format == "text" and isinstance(text, str) and text.startswith("\ufeff"):
                        rec = {**rec, "text": text[1:]}  # a byte-order mark, as the .txt reader drops it
                if lines and isinstance(rec.get("text"), str) and not rec["text"].strip():
                    continue  # a blank line is no record, as in JSON lines
                if isinstance(rec.get(src.text_field), bytes):  # a binary column, decoded as the native
                    rec = {**rec, src.text_field: _decode_bytes(rec[src.text_field])}  # reader decodes it
                    if isinstance(rec[src.text_field], _InvalidUtf8):
                        stats.skipped["invalid_utf8"] += 1
                        continue
                doc = _check_record(rec, stats, domain, f"{ids}:{row}", src.text_field, src.domain_field)
                if doc is not None:
                    yield doc


def _records(ds, f: Path, builder: str):
    it = iter(ds)
    while True:
        try:
            rec = next(it)
        except StopIteration:
            return
        except Exception as e:  # a parse error part-way through the file
            raise DataError(f"{f}: cannot read with the {builder} builder ({e})") from e
        yield rec


def _in_tokenizer_output(f: Path, root: Path) -> bool:
    """A file of a tokenizer, shards or model folder written inside the data folder (or the tokenizer's
    own files where the data folder is one): its JSON is not data, as the native reader leaves it out."""
    inside = [root / d for d in f.relative_to(root).parents if d != Path(".")]
    return any(_is_tokenizer_output(d) for d in inside) or (
        f.parent == root and f.name in _TOKENIZER_FILES and _is_tokenizer_output(root)
    )


def builder_files(builder: str, location: str) -> list[Path]:
    """The local files a builder source names: a file, a glob (`**` recursive), or a folder (its
    files with the builder's suffixes, recursively); hidden files and elmforest metadata excluded."""
    if "://" in location or location.startswith("hf:"):
        raise DataError(f"{builder}:{location}: only local files are read (no hub or URL)")
    p = Path(location)
    if glob.has_magic(location):
        found = [Path(x) for x in glob.glob(location, recursive=True)]
        files = sorted(f for f in found if not f.is_dir() and not is_metadata(f.name))
        if not files:
            raise DataError(f"{location}: matches no file")
    elif p.is_dir():
        suffixes = tuple(s + c for s in BUILDER_SUFFIXES[builder] for c in COMPRESSED)
        files = [
            f
            for f in sorted(p.rglob("*"))
            if f.name.endswith(suffixes)
            and not is_metadata(f.name)
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
            and not (f.is_dir() and not f.is_symlink())
            and not _in_tokenizer_output(f, p)
        ]
        if not files:
            raise DataError(
                f"{p}: no {builder} files found (expected {', '.join(BUILDER_SUFFIXES[builder])})"
            )
    elif p.exists() or p.is_symlink():
        files = [p]
    else:
        raise DataError(f"{p}: no such file or directory")
    files, links = read_once(files)  # as the native reader: a linked file read twice could span splits
    if links:
        _note(
            f"note: {builder}:{location}: read once: "
            + ", ".join(f"{f} (a link to {t})" for f, t in links[:5])
            + (" ..." if len(links) > 5 else "")
        )
    for f in files:
        _check_data_file(f)
    if len(files) > 1:  # as the native reader says it of a folder: a domain spread over folders
        root = p if p.is_dir() else Path(os.path.commonpath([f.parent for f in files]))
        _say_shared_names(
            root,
            files,
            lambda f: _builder_domain(f, builder),  # a part's folder is its table's
            f"a {builder} file's",
        )
    return files


def _builder_part(f: Path, builder: str) -> bool:
    """A part file of a table written as a folder named like a data file (Spark's
    `news.parquet/part-00000-....parquet`): as for the native reader, the folder names the domain."""
    return bool(_PART.match(f.name)) and _builder_name(f.parent.name, builder) is not None


def _builder_name(name: str, builder: str) -> str | None:
    """A file name without its builder suffix and compression, or None where it has neither suffix."""
    for c in COMPRESSED[1:]:
        name = name.removesuffix(c)
    for s in BUILDER_SUFFIXES[builder]:
        if name.endswith(s):
            return name[: -len(s)] or name
    return None


def _builder_domain(f: Path, builder: str) -> str:
    if _builder_part(f, builder):
        return _builder_name(f.parent.name, builder)
    if (name := _builder_name(f.name, builder)) is not None:
        return name
    name = f.name  # a file a glob or the user named, of another suffix
    for c in COMPRESSED[1:]:
        name = name.removesuffix(c)
    return Path(name).stem or name


@contextlib.contextmanager
def _builders_quiet():
    """The builders' own error log lines off while they read ("Failed to load JSON from file ..."):
    the failure is raised, and said in one line naming the file; the log said it first, again."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _import_datasets(src: Source):
    # set before the import, which reads them: the builders resolve local files only
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError as e:
        raise UserError(
            f"{src}: reading {src.format}: sources needs the optional `datasets` package: "
            "pip install 'elmforest[datasets]'"
        ) from e
    return datasets
