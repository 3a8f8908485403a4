"""The data every comparison starts from: a corpus (the demo one unless given), a tokenizer trained on
its training split, tokenized shards, and the out-of-domain sets tokenized apart. Each stage is
skipped when its output exists, so a rerun after a crash continues. Shared by the quickstart and the
scaling study."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from elmforest.data.bpe import MIN_VOCAB, train_bpe_on
from elmforest.data.readers import quiet_notes
from elmforest.data.reorder import resolve_orderer
from elmforest.data.shards import Shards
from elmforest.data.shards_build import build_shards
from elmforest.data.sources import resolve_source
from elmforest.data.splits import SplitSpec
from elmforest.data.tokenizer import load_tokenizer, save_tokenizer, write_training_record
from elmforest.forest.plan import check_expert_names
from elmforest.launch.corpus_source import (
    SOURCE_FILE,
    check_listing,
    check_shards_source,
    check_source,
    corpus_digests,
    corpus_listing,
)
from elmforest.launch.ood_sets import build_ood_shards
from elmforest.utils.errors import UserError
from elmforest.utils.io import discard_dir, read_json, write_json_atomic
from elmforest.utils.typed import check_call_args


@dataclass
class PreparedData:
    corpus: Path
    tokenizer: Path
    shards: Shards
    ood_shards: Shards | None
    names: list[str]  # the training domains
    corpus_domains: list[str]  # every domain of the corpus with training documents, `names` or not


def _no_training_documents(names: list[str], corpus, have: list[str]) -> UserError:
    return UserError(
        f"domains {names}: no training documents in {corpus} (its domains with some: {', '.join(have)})"
    )


def prepare_data(
    out: Path,
    vocab_size: int,
    domains: list[str] | None = None,
    corpus: str | Path | None = None,
    ood: list | None = None,
    progress: bool = True,
    log=print,
    tokenizer_sample_bytes: int = 1_000_000,
    order=None,
    order_seed: int = 0,
    unused: bool = False,
) -> PreparedData:
    """Corpus (the demo one unless given) -> tokenizer (trained on at most `tokenizer_sample_bytes` of
    each domain's training split) -> shards (PreparedData: where each is), and the out-of-domain sets tokenized apart (the demo's
    evaluation-only domains and `ood`; `ood=None` with a corpus given: none, and nothing said about
    them); each stage skipped when its output exists. Shared by the quickstarts and the scaling study.
    `domains` (None: every one with training documents) are the only ones the tokenizer learns from
    and the shards hold, so the corpus's others shape nothing of a run. Another list in an output dir
    is refused, unless the caller says nothing was trained from it yet (`unused`: a run refused for
    its domains and given others, as the refusal advised): then both are made again.

    `order` (None or "source": as read; "random", "icp" or an orderer, data/reorder.py) orders each
    domain's training documents, seeded by `order_seed`; see `shards_dir_for` for where they go."""
    ints = dict(vocab_size=vocab_size, order_seed=order_seed, tokenizer_sample_bytes=tokenizer_sample_bytes)
    check_call_args("prepare_data", ints, dict(domains=domains, ood=ood))
    domains = None if domains is None else list(domains)  # (an iterator is read once)
    if domains is not None and not domains:  # (a filter that matched nothing): not every domain
        raise UserError("prepare_data: domains is an empty list; pass None for every domain")
    if vocab_size < MIN_VOCAB:  # before anything is announced or written
        raise UserError(
            f"prepare_data: vocab_size {vocab_size}: at least {MIN_VOCAB} (the 256 bytes and an EOS)"
        )
    out = Path(out)
    ood_sources = [Path(x) for x in (ood or [])]
    from elmforest.data.sources import refuse_out_in_data

    for src in ([corpus] if corpus is not None else []) + ood_sources:
        refuse_out_in_data(out, src, "the run")
    orderer = _orderer(order)
    shards_dir = shards_dir_for(out, orderer, order_seed)
    # before building anything: the output dir may be another corpus's (its tokenizer, or its shards)
    if Shards.is_shards_dir(shards_dir):
        check_shards_source(Shards(shards_dir), corpus, out)
    source_file = out / SOURCE_FILE
    if source_file.is_file():
        recorded = read_json(source_file)
        check_source(recorded.get("source"), corpus, out, out)
        built = (out / "tokenizer" / "tokenizer.json").exists() or Shards.is_shards_dir(shards_dir)
        if corpus is not None and recorded.get("files") is not None and not built:
            # nothing made of it yet (refused before its tokenizer was saved: a domain's name): read afresh
            listing = corpus_listing(corpus)
            write_json_atomic(
                source_file, {**recorded, "files": listing, "digests": corpus_digests(corpus, listing)}
            )
        elif corpus is not None and recorded.get("files") is not None:
            fresh = check_listing(recorded["files"], corpus, out, recorded.get("digests"))
            if fresh != recorded.get("digests"):  # a copy's new mtimes: hashed once, not on every rerun
                write_json_atomic(source_file, {**recorded, "digests": fresh})
    else:
        import glob

        from elmforest.data.sources import parse_source

        loc = parse_source(corpus).location if corpus is not None else None
        if (
            loc is not None and not glob.has_magic(loc) and not Path(loc).exists()
        ):  # not recorded as this dir's
            raise UserError(f"{corpus}: no such file or directory")
        record = {"source": resolve_source(corpus if corpus is not None else out / "corpus")}
        if corpus is not None:
            record["files"] = corpus_listing(corpus)
            record["digests"] = corpus_digests(corpus, record["files"])
        write_json_atomic(source_file, record)
    if corpus is None:
        corpus = out / "corpus"
        from elmforest.corpora.demo import build_demo_corpus

        if not (corpus / "manifest.json").exists():
            log(f"[1/8] building the demo corpus -> {corpus}")
            build_demo_corpus(corpus, domains=domains, progress=progress)
        elif not (out / "tokenizer" / "tokenizer.json").exists():  # nothing is made of it yet
            from elmforest.corpora.demo import DEMO_DOMAINS

            had = read_json(corpus / "manifest.json").get("domains") or {}
            if again := [d for d in (domains or DEMO_DOMAINS) if d not in had]:  # skipped (a source down)
                log(
                    f"[1/8] building the demo corpus's missing domains again ({', '.join(again)}) -> {corpus}"
                )
                build_demo_corpus(corpus, domains=again, progress=progress)
        for name, why in read_json(corpus / "manifest.json").get("skipped", {}).items():
            log(f"      skipped domain {name}: {why}")
        from elmforest.corpora.demo_ood import EVAL_ONLY_REVISION

        demo_ood = out / "corpus-ood"
        seen = read_json(demo_ood / "manifest.json") if (demo_ood / "manifest.json").exists() else {}
        if seen.get("revision") != EVAL_ONLY_REVISION:
            log(f"      building the evaluation-only demo domains -> {demo_ood}")
            build_demo_corpus(demo_ood, eval_only=True, progress=progress)
        if read_json(demo_ood / "manifest.json").get("domains"):
            ood_sources.insert(0, demo_ood)
    elif not (out / "tokenizer" / "tokenizer.json").exists():  # step 1 said, not skipped from [2/8]
        log(f"[1/8] your corpus: {corpus} (the demo corpus is not built)")
    corpus = Path(corpus)

    tok_dir = out / "tokenizer"
    record = read_json(source_file)
    had_tok, every = record.get("tokenizer"), record.get("corpus_domains")  # both recorded since 12-07
    built_tok = (tok_dir / "tokenizer.json").exists()
    # a tokenizer made before 12-07 recorded no domains: it learnt every one, and its shards hold (or,
    # built now, will hold) every one, as they always did
    legacy = built_tok and (had_tok is None or "domains" not in had_tok)
    only = sorted(set(domains)) if domains else None
    if only is not None and every is not None and only == sorted(every):
        only = None  # every domain named: the same tokenizer and shards as none named
    want_tok = {"vocab_size": vocab_size, "sample_bytes_per_domain": tokenizer_sample_bytes}
    if not legacy:
        want_tok["domains"] = only
    if built_tok and not legacy:
        if every is not None and (lost := sorted(set(only or ()) - set(every))):
            raise _no_training_documents(lost, corpus, every)
        had = had_tok["domains"]
        if had is not None and every is not None and sorted(had) == sorted(every):
            had = None  # recorded as a list of every domain (12-07's first version): every domain
        if had != only and unused:
            log(
                f"      the tokenizer and shards in {out} were made of "
                + (", ".join(had) if had else "every domain")
                + "; nothing was trained from them: made again of "
                + (", ".join(only) if only else "every domain")
            )
            for d in (tok_dir, *(p for p in out.glob("shards*") if Shards.is_shards_dir(p))):
                discard_dir(d)
            built_tok = False
        elif had != only:
            raise UserError(
                f"{tok_dir} and the shards beside it are made of "
                + (", ".join(had) if had else "every domain of the corpus")
                + "; this run asks for "
                + (", ".join(only) if only else "every domain")
                + f", and everything in {out} is tokenized with the one there: use another --out"
            )
    same_bpe = ("vocab_size", "sample_bytes_per_domain")  # its domains: checked above
    if built_tok and had_tok is not None and any(had_tok.get(k) != want_tok[k] for k in same_bpe):
        raise UserError(
            f"{tok_dir} is a {had_tok['vocab_size']}-token BPE trained on at most "
            f"{had_tok['sample_bytes_per_domain']:,} bytes of each domain; this run asks for "
            f"{vocab_size} tokens on {tokenizer_sample_bytes:,} bytes (another preset?), and everything in "
            f"{out} is tokenized with the one there: use another --out"
        )
    said = nullcontext
    if not (tok_dir / "tokenizer.json").exists():
        log(
            f"[2/8] training a {vocab_size}-token byte-level BPE on the training split (at most "
            f"{tokenizer_sample_bytes:,} bytes of each domain)"
        )
        found: set[str] = set()
        said = quiet_notes  # read once here: the shards' read below says nothing more about its files
        tok, _ = train_bpe_on(
            corpus, vocab_size, bytes_per_domain=tokenizer_sample_bytes, domains=found, only=only
        )
        if lost := sorted(set(only or ()) - found):  # before it is saved: a corrected rerun trains afresh
            raise _no_training_documents(lost, corpus, sorted(found))
        check_expert_names(list(domains or sorted(found)))  # before the shards: each names an expert
        every = sorted(found)
        only = None if only == every else only
        write_json_atomic(  # before the tokenizer: with it, the record says of what it is made
            source_file, {**record, "tokenizer": {**want_tok, "domains": only}, "corpus_domains": every}
        )
        save_tokenizer(tok, tok_dir)
        write_training_record(tok_dir, tok, resolve_source(corpus), asdict(SplitSpec()))

    if not Shards.is_shards_dir(shards_dir):
        how = f" (training documents in {orderer.name} order, seed {order_seed})" if orderer else ""
        log(f"[3/8] tokenizing into shards{how} -> {shards_dir}")
        with said():
            rep = build_shards(
                corpus,
                load_tokenizer(tok_dir),
                shards_dir,
                progress=progress,
                order=orderer,
                order_seed=order_seed,
                only_domains=None if legacy else only,
            )
        log(f"      {rep.tokens:,} tokens from {rep.text_bytes / 1e6:.1f} MB ({rep.mb_per_s:.2f} MB/s)")
        if rep.read.get("skipped"):  # said: an empty document is no document, and a split may lack it
            from elmforest.data.documents import ReadStats

            log(f"      {ReadStats.from_dict(rep.read).summary()}")
        if rep.order:
            kept = sum(d["documents_after"] for d in rep.order["domains"].values())
            read = sum(d["documents_before"] for d in rep.order["domains"].values())
            log(f"      ordered in {rep.order_seconds:.1f}s: {kept:,} of {read:,} training documents kept")
    shards = Shards(shards_dir)
    if shards.tokenizer_fingerprint != load_tokenizer(tok_dir).fingerprint():
        raise UserError(
            f"{shards_dir} was tokenized with another tokenizer than {tok_dir} (trained again since?): "
            f"use another --out, or delete {shards_dir} and every run trained on it"
        )
    if order is not None:
        check_shards_order(shards, orderer, order_seed)
    every = every or [d for d in shards.domains if shards.has(d, "train")]  # before 12-07 they held all
    missing = [d for d in domains or () if not shards.has(d, "train")]
    if missing:
        raise _no_training_documents(missing, corpus, every)
    names = domains or [d for d in shards.domains if shards.has(d, "train")]
    ood_shards = (
        build_ood_shards(out / "shards-ood", ood_sources, tok_dir, names, progress, corpus)
        if ood_sources
        else None
    )
    if ood_shards is None:
        if ood is not None:
            log(
                "      no out-of-domain sets (the demo corpus brings its own; --ood PATH, or a study's `ood`, adds yours)"
            )
    else:
        log(
            "      out-of-domain sets (valid tokens for the prior / test documents): "
            + ", ".join(
                f"{d} {ood_shards.info(d, 'valid')['tokens'] if ood_shards.has(d, 'valid') else 0:,}"
                f" / {ood_shards.info(d, 'test')['documents'] if ood_shards.has(d, 'test') else 0}"
                for d in ood_shards.domains
            )
        )

    return PreparedData(corpus, tok_dir, shards, ood_shards, names, every)


def check_quickstart_overrides(overrides, preset: str | None = None) -> None:
    """A quickstart builds and scores its own shards, in source order. `--set data.shards` would train
    on other data than it scores, and a `data.order` other than source is refused at the seed's start,
    after the corpus and shards stages: both are refused before anything runs, saying what to do. So
    is any override the preset's config refuses (`train.steps=abc`, `optim.lr=-1`), which failed after
    the corpus, tokenizer and shards were built."""
    from elmforest.config import RunConfig, apply_overrides

    if preset is not None:
        from elmforest.model.presets import preset_run_config

        apply_overrides(preset_run_config(preset), list(overrides)).validate()

    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key == "data.shards":
            raise UserError(
                f"--set {item}: a quickstart trains and scores on the shards it builds from its corpus; "
                "to train on other shards, use `elmforest forest train --shards DIR` (docs/btm.md)"
            )
        order = apply_overrides(RunConfig(), [item]).data.order if key == "data.order" else None
        if order not in (None, "source"):
            raise UserError(
                f"--set {item}: a quickstart trains on its own shards in source order. For {order} order, "
                f"build them (elmforest shards reorder OUT/shards --out DIR --order {order}) and train a "
                f"forest on them (elmforest forest train --shards DIR --set data.order={order}); "
                "bench/icp_compare.py compares ICP with random order at matched compute (docs/icp.md)"
            )


def _orderer(order):
    if order in ("dedup", "icp"):  # imported only when asked for: the embedding pulls in scikit-learn
        from elmforest.cluster.icp_shards import make_orderer

        return make_orderer(order)
    return resolve_orderer(order)


def shards_dir_for(out: Path, orderer, seed: int) -> Path:
    """Where prepare_data keeps shards in an order: `shards` for the source order (as before orders
    existed), `shards-<method>-seed<N>` otherwise. Beside each other rather than one replacing the
    other, since the point of an order is a comparison (ICP vs random vs source) on one corpus and
    tokenizer, and rebuilding in place would change the data under runs that trained on it."""
    return out / ("shards" if orderer is None else f"shards-{orderer.name}-seed{seed}")


def check_shards_order(shards: Shards, orderer, seed: int) -> None:
    """Existing shards are reused only in the order asked for (same method, seed and parameters)."""
    have = shards.order
    want = (
        {"method": "source"}
        if orderer is None
        else {"method": orderer.name, "seed": int(seed), "params": dict(orderer.params())}
    )
    if {k: have.get(k) for k in want} != want:
        raise UserError(
            f"{shards.root} holds training documents in another order ({_describe(have)}) than asked "
            f"for ({_describe(want)}); delete it to rebuild, or ask for the order it holds"
        )


def _describe(o: dict) -> str:
    if o["method"] == "source":
        return "source"
    return f"{o['method']}, seed {o.get('seed')}, params {o.get('params')}"
