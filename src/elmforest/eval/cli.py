"""`elmforest eval`: bits per byte per domain, of one model or of a forest."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import typer

from elmforest.config import PRIOR_BATCHES
from elmforest.data.cli import DEFAULT_READ, ReadArgs, print_read
from elmforest.data.splits import SplitSpec
from elmforest.utils.argtypes import (
    NoProgressBar,
    flag,
    fraction,
    nonneg_int,
    opt,
    positive_float,
    positive_int,
    unit_fraction,
    verb,
)
from elmforest.utils.errors import UserError
from elmforest.utils.typed import split_list


def split_fractions(s):
    """VALID,TEST: the hash-split fractions of held-out documents (a SplitSpec)."""
    if isinstance(s, SplitSpec):
        return s
    parts = [x.strip() for x in str(s).split(",")]
    if len(parts) != 2:
        raise typer.BadParameter(f"expected VALID,TEST (two fractions), got {s!r}")
    try:
        return SplitSpec(fraction(parts[0]), fraction(parts[1]))
    except UserError as e:
        raise typer.BadParameter(str(e)) from None


split_fractions.metavar = "VALID,TEST"


Model = Annotated[str | None, opt("a run directory or HF checkpoint directory", metavar="DIR")]
Json = Annotated[str | None, opt("write the result here", metavar="FILE")]


def check_json_out(path: str | None) -> None:
    """Before an evaluation, not after it: a --json that cannot be written is refused up front."""
    from pathlib import Path

    if path and Path(path).is_dir():
        raise UserError(f"--json {path}: is a folder; give a file name")


Domains = Annotated[
    str | None, opt("comma-separated subset (quote a name holding a comma: \"'a,b',c\")", metavar="A,B,...")
]
Prior = Annotated[Literal["cached", "uniform"], opt("forest: the prior over experts")]
PriorBatches = Annotated[
    int,
    opt("forest: valid batches for the cached prior (every valid window when there are fewer)", positive_int),
]


@dataclasses.dataclass(frozen=True)
class RunArgs:
    """Where and how a model runs (an option group, shared by the eval verbs)."""

    device: Annotated[str, opt("auto | cpu | cuda | cuda:N", metavar="DEVICE")] = "auto"
    precision: Annotated[
        str,
        opt("auto (bf16 where the hardware runs it) | bf16 | fp32", metavar="P"),
    ] = "auto"
    trust_remote_code: Annotated[
        bool, flag("--trust-remote-code", "allow custom model code from --model")
    ] = False


DEFAULT_RUN = RunArgs()


def register(app: typer.Typer) -> None:
    verb(app, "eval")(eval_)
    verb(app, "eval-crossdoc")(eval_crossdoc)


def eval_(
    data: Annotated[
        str,
        opt(
            "a shards dir, or raw data: JSONL / Parquet / .txt, a save_to_disk dataset, or "
            "json:|parquet:|csv:|text:PATH_OR_GLOB (docs/data-formats.md)",
            metavar="PATH",
        ),
    ],
    model: Model = None,
    forest: Annotated[str | None, opt("evaluate a forest instead of one model", metavar="DIR")] = None,
    json: Json = None,
    split: Annotated[
        str,
        opt(
            "train|valid|test (default, for models and forests alike), or all (raw data: every document)",
            metavar="SPLIT",
        ),
    ] = "test",
    domains: Domains = None,
    max_bytes: Annotated[
        int | None,
        opt(
            "per domain: the first whole documents that fit in this many bytes of text (the same documents "
            "for every model and tokenizer; at least one, even when it is longer)",
            positive_int,
        ),
    ] = None,
    split_fractions_: Annotated[
        SplitSpec | None,
        opt(
            "raw data: the hash-split fractions that held documents out of training (default: the model's "
            "own, recorded beside its weights)",
            split_fractions,
            name="--split-fractions",
        ),
    ] = None,
    seq_len: Annotated[
        int | None, opt("window length (default: the model's training context)", positive_int)
    ] = None,
    batch_size: Annotated[int, opt("windows per forward pass", positive_int)] = 16,
    run: RunArgs = DEFAULT_RUN,
    no_progress: NoProgressBar = False,
    mode: Annotated[
        Literal["ensemble", "topk", "average", "cluster"],
        opt("forest: cluster is c-BTM routing by distance to the forest's cluster centres"),
    ] = "ensemble",
    k: Annotated[
        int,
        opt(
            "forest: experts used: --mode topk, the k of the largest prior (or prefix) weights; --mode cluster, "
            "the k nearest clusters",
            positive_int,
        ),
    ] = 2,
    prior: Prior = "cached",
    weighting: Annotated[
        Literal["posterior", "fixed", "demix"],
        opt(
            "forest: posterior: Bayes over the whole prefix; fixed: the prior as fixed weights; demix: the "
            "previous token only"
        ),
    ] = "posterior",
    select: Annotated[
        str, opt("forest, top-k selection: prior | prefix:W (each document's first W tokens)", metavar="S")
    ] = "prior",
    prior_batches: PriorBatches = PRIOR_BATCHES,
    prior_ema: Annotated[
        float | None,
        opt(
            "forest: estimate the cached prior with BTM's (bias-corrected) moving average of per-batch means at "
            "this alpha (BTM: 0.3) instead of the mean over every valid window",
            positive_float,
        ),
    ] = None,
    reset: Annotated[
        Literal["document", "window"],
        opt(
            "forest: document: the posterior and c-BTM routing restart at each document inside a window; "
            "window: carried across documents within a window"
        ),
    ] = "document",
    temperature: Annotated[float, opt("forest: c-BTM routing temperature T", positive_float)] = 0.1,
    route: Annotated[str, opt("forest: c-BTM routing: sequence | segment:W", metavar="R")] = "sequence",
    no_reroute: Annotated[
        bool,
        flag(
            "--no-reroute",
            "forest, --mode cluster: route a document only at its first token (by the cluster sizes) and "
            "every W tokens, as c-BTM does, not also 1, 2, 4, ... tokens into it",
        ),
    ] = False,
    router_context: Annotated[
        Literal["window", "document"],
        opt(
            "forest, --mode cluster: the text c-BTM's router reads before a position: its document's in the "
            "window scored (what every model conditions on), or all of it, across windows (more context "
            "than the dense model gets)"
        ),
    ] = "window",
    read: ReadArgs = DEFAULT_READ,
) -> None:
    """Bits per byte per domain, of one model (--model) or a forest (--forest)."""
    from elmforest.eval.report import print_table
    from elmforest.utils.io import write_json_atomic

    if bool(model) == bool(forest):
        raise UserError("eval takes either --model or --forest")
    if no_reroute and (not forest or mode != "cluster" or reset != "document"):
        raise UserError(
            "--no-reroute is c-BTM routing's at document starts: it takes --forest with --mode cluster "
            "(and --reset document, the default; --reset window routes at the grid only)"
        )
    from elmforest.forest.mode_options import unused as ignored_by
    from elmforest.utils.argtypes import given_by_user

    given = {  # a mode's own option given to another was dropped without a word
        name: label
        for name, label, set_ in (
            ("select", f"--select {select}", select != "prior"),
            ("route", f"--route {route}", route != "sequence"),
            ("router_context", f"--router-context {router_context}", router_context != "window"),
            ("routing_temperature", f"--temperature {temperature:g}", temperature != 0.1),
            ("k", f"--k {k}", k != 2),
            ("weighting", f"--weighting {weighting}", weighting != "posterior"),
            ("prior", f"--prior {prior}", prior != "cached"),
        )
        if set_ or given_by_user("temperature" if name == "routing_temperature" else name)
    }
    if unused := ignored_by(mode if forest else None, given):
        raise UserError(
            f"{', '.join(unused)}: not used by {'--mode ' + mode if forest else 'a single --model'} "
            "(--select is --mode topk's; --route, --router-context and --temperature are --mode cluster's; "
            "--k is topk's and cluster's; --weighting is ensemble's and topk's; --prior is every mode's but "
            "cluster's, which routes by the clusterer)"
        )
    cached = forest and mode != "cluster" and prior == "cached"  # what reads the valid split for a prior
    if not cached and (
        estimate := [
            o
            for o, given in (
                (f"--prior-batches {prior_batches}", prior_batches != PRIOR_BATCHES),
                (f"--prior-ema {prior_ema:g}" if prior_ema is not None else "", prior_ema is not None),
            )
            if given
        ]
    ):
        raise UserError(
            f"{', '.join(estimate)}: {'they estimate' if len(estimate) > 1 else 'it estimates'} the cached "
            + (
                "prior, which --prior uniform does not read"
                if forest and mode != "cluster"
                else f"prior; {'--mode cluster' if forest else 'a single --model'} has none"
            )
        )
    check_json_out(json)
    if read != DEFAULT_READ:
        from elmforest.data.shards import Shards

        if Shards.is_shards_dir(data):
            raise UserError(
                "--text-field, --domain-field and --hf-split read raw data, not a shards directory"
            )
        data = read.source(data)
    common = dict(
        split=split,
        split_spec=split_fractions_,
        domains=split_list(domains, "--domains"),
        seq_len=seq_len,
        batch_size=batch_size,
        max_bytes=max_bytes,
        device=run.device,
        precision=run.precision,
    )
    if forest:
        from elmforest.forest.evaluate_text import evaluate_forest

        res = evaluate_forest(
            forest,
            data,
            mode=mode,
            k=k,
            prior=prior,
            weighting=weighting,
            select=select,
            prior_batches=prior_batches,
            temperature=temperature,
            route=route,
            reset=reset,
            reroute=not no_reroute,
            router_context=router_context,
            prior_alpha=prior_ema,
            **common,
        )
        if json:  # before printing: the result is kept even if the terminal cannot show it
            write_json_atomic(json, res)
        if "read" in res:
            print_read(res["read"])
        print_table({f"forest {mode}": res})
        c = res["compute"]
        print(
            f"expert token passes: {c['expert_token_passes']:,} = {c['fraction_of_full']:.2f} of the full "
            "ensemble's"
        )
        if mode == "cluster":
            share = res["fallback_share"]
            print(f"tokens routed by the cluster sizes (no known word of their document yet): {share:.1%}")
    else:
        from elmforest.eval.bpb import evaluate

        res = evaluate(
            model, data, progress=not no_progress, trust_remote_code=run.trust_remote_code, **common
        )
        if json:  # before printing: the result is kept even if the terminal cannot show it
            write_json_atomic(json, res)
        if "read" in res:
            print_read(res["read"])
        print_table({"model": res})


def eval_crossdoc(
    data: Annotated[str, opt("a shards directory made with the model's tokenizer", metavar="DIR")],
    model: Model = None,
    forest: Annotated[
        str | None, opt("score a forest's full ensemble (BTM posterior) instead of one model", metavar="DIR")
    ] = None,
    json: Json = None,
    tasks: Annotated[
        str, opt("retrieval (nearest train documents as context) and/or second_half", metavar="A,B")
    ] = "retrieval,second_half",
    max_docs: Annotated[int, opt("test documents per domain and task, drawn by --seed", positive_int)] = 200,
    seed: Annotated[int, opt("draws the test documents and the random contexts", nonneg_int)] = 0,
    seq_len: Annotated[
        int | None, opt("context + target tokens (default: the model's training context)", positive_int)
    ] = None,
    target_len: Annotated[
        int | None,
        opt("retrieval: target tokens, the document's first (default: seq_len // 2)", positive_int),
    ] = None,
    neighbours: Annotated[int, opt("retrieval: candidate neighbours per target", positive_int)] = 64,
    max_cosine: Annotated[
        float,
        opt(
            "retrieval: neighbours this similar (tf-idf cosine) or more are near copies, left out",
            unit_fraction,
        ),
    ] = 0.9,
    domains: Domains = None,
    prior: Prior = "cached",
    prior_batches: PriorBatches = PRIOR_BATCHES,
    batch_size: Annotated[int, opt("sequences per forward pass", positive_int)] = 16,
    run: RunArgs = DEFAULT_RUN,
    no_progress: NoProgressBar = False,
) -> None:
    """Cross-document bits per byte (In-Context Pretraining): a test document after its nearest train
    documents, after random ones, or alone; a long document's second half with and without its first."""
    from elmforest.eval.report import print_table

    if bool(model) == bool(forest):
        raise UserError("eval-crossdoc takes either --model or --forest")
    check_json_out(json)
    common = dict(
        seq_len=seq_len,
        target_len=target_len,
        max_docs=max_docs,
        seed=seed,
        tasks=tasks,
        neighbours=neighbours,
        max_cosine=max_cosine,
        domains=split_list(domains, "--domains"),
        batch_size=batch_size,
        device=run.device,
        precision=run.precision,
        progress=not no_progress,
        out=json,
    )
    if forest:
        from elmforest.forest.crossdoc import evaluate_forest_crossdoc

        res = evaluate_forest_crossdoc(forest, data, prior=prior, prior_batches=prior_batches, **common)
    else:
        from elmforest.eval.crossdoc import evaluate_crossdoc

        res = evaluate_crossdoc(model, data, trust_remote_code=run.trust_remote_code, **common)
    from elmforest.eval.crossdoc_tasks import retrieval_notes, skipped_note

    for task, r in res["tasks"].items():
        if not all(c.get("domains") for c in r["conditions"].values()):  # nothing was scored
            print(f"{task}: no test document qualifies (e.g. none longer than the context); nothing scored")
            continue
        print_table(r["conditions"], title=f"{task}: bits per byte (lower is better)")
        for g, v in r["gain"].items():
            if v.get("mean") is not None:
                print(
                    f"  gain {g}: {v['mean']:+.4f} bits per byte (mean over domains; positive: the context helps)"
                )
        if task == "retrieval":
            for note in retrieval_notes(res):
                print(f"  note: {note}")
    if note := skipped_note(res):  # every task's
        print(f"note: {note}")
