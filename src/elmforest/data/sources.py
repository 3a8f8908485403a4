"""A data source as one string: a path, or `FORMAT[,KEY=VALUE...]:LOCATION`.

    data/                          a file or folder (JSONL, Parquet, .txt, saved Hugging Face datasets)
    csv:data/*.csv                 through `datasets.load_dataset("csv", ..., streaming=True)`
    csv,text=body,domain=source:data/*.csv
    auto,split=train:data/saved    a plain path read with options (here: one split of a DatasetDict)

FORMAT is `auto` (read the location as a plain path is read) or a `datasets` builder: json, parquet,
csv, text. Keys: `text` (the records' text field, default `text`), `domain` (the field whose value
is the document's domain, default `domain`, else the file or dataset name), `split` (the splits of a
saved DatasetDict to read, `+`-separated, default all) and, passed to the builder, `sample_by`
(text), `field` (json) and `sep` (csv). Values are percent-encoded where they hold `,:/%`.

Why one string rather than parameters: a source crosses many layers (shards, tokenizer training,
evaluation, clustering, the quickstart's --corpus, configs) that take a path and record it, so the
options travel with the path, and what a shards index or an eval result records as its data says
how it was read. Anything that does not start with a known `FORMAT...:` is a path, exactly as
before (write `./json:x` for a file really named so).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

from elmforest.utils.errors import UserError

BUILDERS = ("json", "parquet", "csv", "text")
FORMATS = ("auto", *BUILDERS)
# key -> the formats it applies to
KEYS = {
    "text": FORMATS,
    "domain": FORMATS,
    "split": ("auto",),
    "sample_by": ("text",),
    "field": ("json",),
    "sep": ("csv",),
}
BUILDER_KEYS = ("sample_by", "field", "sep")
SAMPLE_BY = ("line", "paragraph", "document")  # the text builder's
_SPEC = re.compile(r"(?P<fmt>[a-z]+)(?P<opts>(?:,[a-z_]+=[^,:/]*)*):(?P<loc>.+)\Z", re.S)


@dataclass(frozen=True)
class Source:
    format: str | None  # None: a plain path, read as before
    location: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def text_field(self) -> str:
        return self.options.get("text", "text")

    @property
    def domain_field(self) -> str:
        return self.options.get("domain", "domain")

    @property
    def explicit_fields(self) -> tuple[str, ...]:
        """The fields named by the user: a file where none of them occurs is an error, not a silent
        fallback (a misspelt --domain-field would otherwise give every document its file's name)."""
        return tuple(self.options[k] for k in ("text", "domain") if k in self.options)

    @property
    def hf_splits(self) -> list[str] | None:
        s = self.options.get("split")
        return s.split("+") if s else None

    @property
    def builder_kwargs(self) -> dict[str, str]:
        return {k: self.options[k] for k in BUILDER_KEYS if k in self.options}

    def __str__(self) -> str:
        if self.format is None:
            return self.location
        opts = "".join(f",{k}={quote(v, safe='')}" for k, v in self.options.items())
        return f"{self.format}{opts}:{self.location}"


def parse_source(data: str | os.PathLike) -> Source:
    s = os.fspath(data)
    m = _SPEC.match(s)
    if not m or m["fmt"] not in FORMATS:
        return Source(None, s)
    fmt, options = m["fmt"], {}
    for item in filter(None, m["opts"].split(",")):
        key, value = item.split("=", 1)
        if key not in KEYS:
            raise UserError(f"{s}: unknown option {key!r} (known: {', '.join(KEYS)})")
        if fmt not in KEYS[key]:
            raise UserError(f"{s}: option {key!r} applies to {'/'.join(KEYS[key])}, not {fmt}")
        if key in options:
            raise UserError(f"{s}: option {key!r} given twice")
        value = unquote(value)
        if not value:
            raise UserError(f"{s}: option {key!r} is empty")
        if key == "split":  # each split read once: one named twice would duplicate every document
            names = value.split("+")
            if "" in names or len(set(names)) != len(names):
                twice = sorted({n for n in names if names.count(n) > 1})
                raise UserError(f"{s}: split(s) {twice or names} given twice or empty; name each split once")
        if key == "sample_by" and value not in SAMPLE_BY:  # the builder read nothing, without a word
            raise UserError(f"{s}: sample_by {value!r}: expected one of {', '.join(SAMPLE_BY)}")
        options[key] = value
    for key in ("text", "domain"):
        if options.get(key) == key:
            del options[key]  # the default named explicitly: read exactly as without it
    return Source(fmt, m["loc"], options)


def with_options(
    data: str | os.PathLike,
    text_field: str | None = None,
    domain_field: str | None = None,
    hf_split: list[str] | None = None,
) -> str:
    """`data` with the command line's reading options folded in; unchanged when none is given."""
    given = {"text": text_field, "domain": domain_field, "split": "+".join(hf_split or []) or None}
    defaults = {"text": "text", "domain": "domain"}  # named explicitly: read exactly as without them
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return os.fspath(data)
    names = {"text": "--text-field", "domain": "--domain-field", "split": "--hf-split"}
    for k, v in given.items():
        if not v.strip():
            raise UserError(f"{names[k]} is empty")
    src = parse_source(data)
    fmt = src.format or "auto"
    options = dict(src.options)
    for k, v in given.items():  # a default named explicitly contradicts another name in the string too
        if k in options and options[k] != v:
            raise UserError(f"{names[k]} {v!r} contradicts {k}={options[k]!r} in {os.fspath(data)!r}")
    given = {k: v for k, v in given.items() if v != defaults.get(k)}
    if not given:
        return os.fspath(data)
    for k, v in given.items():
        if fmt not in KEYS[k]:
            raise UserError(f"{names[k]} applies to saved datasets and plain paths, not {fmt}: sources")
        options[k] = v
    return str(parse_source(str(Source(fmt, src.location, options))))


def resolve_source(data: str | os.PathLike) -> str:
    """The source with its location made absolute: what to record of where data came from
    (a plain path gives `str(Path(path).resolve())`, as recorded before)."""
    src = parse_source(data)
    if src.format is None:
        return str(Path(data).resolve())
    return str(Source(src.format, os.path.abspath(src.location), src.options))


def refuse_out_in_data(out, data, reader: str) -> None:
    """An output written into the folder it reads is read back as data by the next run (a second
    `cluster assign` counted every document twice; a quickstart failed after training, and no rerun
    could resume: its corpus had changed), and one that is that folder replaces it (the corpus's domain
    labels lost for good). A hidden folder inside is fine: the readers skip dot names."""
    src = Path(parse_source(str(data)).location).expanduser()  # `auto,text=body:DIR` reads DIR too
    if not src.is_dir():
        return  # a file, or data that is not a local folder
    o, d = Path(out).expanduser().resolve(), src.resolve()
    if o != d and (d not in o.parents or any(p.startswith(".") for p in o.relative_to(d).parts)):
        return
    raise UserError(
        f"--out {out} is {'the data' if o == d else 'inside the data'} {reader} reads "
        f"({data}): {'it would replace it' if o == d else 'the next run would read it as documents'}; "
        "pass an --out outside it"
    )
