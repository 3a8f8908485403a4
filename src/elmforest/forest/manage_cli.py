"""The forest verbs that train nothing (`forest init/list/show/add/remove/fsck/average`, and
`elmforest generate`): they create, inspect, repair, average or sample a forest that exists.

Apart from forest/cli.py, whose training verbs take the shared training options (train/cli.py) and
launch work (launch/): these need neither, so they sit in the forest layer; forest/cli.py registers
them all under one group."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Literal

from elmforest.config import PRIOR_BATCHES
from elmforest.utils.argtypes import (
    finite_float,
    flag,
    given_by_user,
    nonneg_float,
    nonneg_int,
    opt,
    positive_float,
    positive_int,
    unit_fraction,
)
from elmforest.utils.errors import UserError

ForestDir = Annotated[str, opt("forest directory", name="--forest", metavar="DIR")]
Clusterer = Annotated[
    str | None, opt("c-BTM: the clusterer whose clusters the experts are trained on", metavar="DIR")
]


def _load(forest: str, create: bool = False):
    from elmforest.forest.manifest import Forest

    return Forest.init(forest, exist_ok=True) if create else Forest.load(forest)


def init(forest: ForestDir, clusterer: Clusterer = None) -> None:
    """Create an empty forest."""
    from elmforest.forest.manifest import Forest

    if clusterer:  # refuse a bad clusterer before anything is created
        from elmforest.cluster.clusterer import Clusterer as C

        C.load(clusterer)
    f = Forest.init(forest)
    if clusterer:
        f.set_clusterer(clusterer)
    print(f"created an empty forest in {forest}")


def list_(forest: ForestDir) -> None:
    """One line per expert."""
    print(_load(forest).describe())


def show(forest: ForestDir) -> None:
    """The whole manifest (JSON)."""
    print(json.dumps(_load(forest).data, indent=2))


def add(
    forest: ForestDir,
    expert: Annotated[str, opt("HF checkpoint dir or elmforest run dir", metavar="DIR")],
    domain: Annotated[list[str], opt("domain(s) it was trained on (repeatable)", metavar="DOMAIN")],
    name: Annotated[str | None, opt("expert name (default: the first domain)", metavar="NAME")] = None,
) -> None:
    """Register an expert trained elsewhere (an HF checkpoint or run directory)."""
    from elmforest.forest.commands import parents_of, summary_of

    src = Path(expert)
    summary = summary_of(src)
    f = _load(forest)
    parents = parents_of(f, src)
    e = f.add(
        src,
        name or domain[0],
        domain,
        tokens=summary.get("tokens", 0),
        flops=summary.get("flops", 0),
        parents=parents,
        extra={"added_from": str(src.resolve())},  # fsck: its files come back from there, not by training
    )
    origin = (
        "trained elsewhere" if parents[0]["name"] == "external" else f"branched from {parents[0]['name']}"
    )
    print(f"added expert {e['name']} ({', '.join(e['domains'])}; {origin})")
    if not summary:
        print(
            f"note: {src} has no training record (summary.json beside it or its run): the ledger counts "
            "this expert's training as 0 tokens and 0 FLOPs, so the forest's compute is undercounted",
            file=sys.stderr,
        )


def remove(forest: ForestDir, expert: Annotated[str, opt("expert name", metavar="NAME")]) -> None:
    """Opt an expert out: delete its weights, run and merged copies, verified; re-run to finish an
    interrupted removal."""
    from elmforest.forest import commands

    commands.remove(_load(forest), expert)


def fsck(
    forest: ForestDir, quick: Annotated[bool, flag("--quick", "check sizes only, not checksums")] = False
) -> int:
    """Check a forest and repair what is safe: finish pending removals, delete temporary files of dead
    processes (also beside its merged models), verify each expert's weights against their recorded
    checksums and a c-BTM forest's clusterer against the one its experts were trained on."""
    from elmforest.forest import commands

    return commands.fsck(_load(forest), deep=not quick)


def average(
    forest: ForestDir,
    out: Annotated[str, opt("output HF checkpoint directory", metavar="DIR")],
    weights: Annotated[
        str, opt("uniform | posterior (needs --data and --domain) | NAME=W,NAME=W", metavar="W")
    ] = "uniform",
    data: Annotated[
        str | None,
        opt(
            "shards (elmforest shards build) holding the target domain (for posterior weights)",
            metavar="PATH",
        ),
    ] = None,
    domain: Annotated[
        str | None, opt("target domain whose valid split sets the posterior weights", metavar="DOMAIN")
    ] = None,
    # None: not given (a default given by hand, e.g. --density 0.2 with --method linear, was taken silently)
    prior_batches: Annotated[
        int | None, opt(f"valid batches for the posterior weights (default {PRIOR_BATCHES})", positive_int)
    ] = None,
    method: Annotated[
        Literal["linear", "task_arithmetic", "ties"],
        opt("linear: weighted mean; task_arithmetic / ties: merge the experts' updates relative to the seed"),
    ] = "linear",
    scale: Annotated[
        float | None, opt("task_arithmetic / ties: lambda on the merged update (default 1)", finite_float)
    ] = None,
    density: Annotated[
        float | None, opt("ties: fraction of each update kept (default 0.2)", unit_fraction)
    ] = None,
) -> None:
    """Average the experts' parameters into one HF checkpoint."""
    from elmforest.forest import commands

    commands.average(_load(forest), out, weights, data, domain, prior_batches, method, scale, density)


def generate(
    forest: ForestDir,
    prompt: Annotated[str, opt("the text to continue", metavar="TEXT")],
    max_new_tokens: Annotated[int, opt("tokens to sample", positive_int)] = 100,
    temperature: Annotated[float, opt("sampling temperature; 0 = greedy", nonneg_float)] = 1.0,
    top_p: Annotated[
        float, opt("nucleus sampling: the smallest set of tokens of this probability", unit_fraction)
    ] = 1.0,
    seed: Annotated[int, opt("sampling seed", nonneg_int)] = 0,
    weighting: Annotated[
        Literal["posterior", "fixed"], opt("posterior: the experts' weights follow the text so far")
    ] = "posterior",
    show_weights: Annotated[
        bool,
        flag(
            "--show-weights",
            "print the mixture weights the last token was drawn with (the experts' posterior given the "
            "prompt and every earlier token)",
        ),
    ] = False,
    device: Annotated[str, opt("auto | cpu | cuda | cuda:N", metavar="DEVICE")] = "auto",
    cluster_k: Annotated[
        int | None, opt("c-BTM: route each step to the top-k clusters of the context", positive_int)
    ] = None,
    routing_temperature: Annotated[
        float,
        opt(
            "c-BTM: T in exp(-distance^2 / T) when routing to clusters (with --cluster-k)",
            positive_float,
            name=("--routing-temperature", "--temperature-routing"),  # the second: its name before serve's
        ),
    ] = 0.1,
    precision: Annotated[
        str, opt("auto (bf16 where the hardware runs it) | bf16 | fp32", metavar="P")
    ] = "auto",
) -> None:
    """Sample from a forest's ensemble."""
    from elmforest.forest.generate import generate as sample

    # an option of the other way to weigh the experts, taken and dropped without a word
    if cluster_k is None and routing_temperature != 0.1:
        raise UserError(
            f"--routing-temperature {routing_temperature:g} is c-BTM routing's: it needs --cluster-k"
        )
    if cluster_k is not None and weighting != "posterior":
        raise UserError(
            f"--weighting {weighting}: with --cluster-k the clusterer's routing weighs the experts"
        )
    if temperature == 0 and (ignored := [o for o in ("top_p", "seed") if given_by_user(o)]):
        raise UserError(  # greedy decoding draws nothing: taken and dropped without a word
            f"{', '.join('--' + o.replace('_', '-') for o in ignored)} shape(s) sampling; --temperature 0 "
            "decodes greedily: drop one"
        )
    g = sample(
        forest,
        prompt,
        max_new_tokens,
        temperature,
        seed,
        weighting=weighting,
        device=device,
        precision=precision,
        cluster_k=cluster_k,
        routing_temperature=routing_temperature,
        top_p=top_p,
    )
    print(prompt + g.text)
    if show_weights and g.weights:
        print(json.dumps(g.weights[-1], indent=2))
