"""The X-ELM comparison's scores: every arm and routing option on the same bytes of each language.

Routing options (X-ELM compares them; each forest k is scored with all):
- `ensemble`: BTM's Bayesian posterior, the prior cached from the language's valid split;
- `uniform`: the posterior from a uniform prior (nothing known about the text);
- `top1`: only the expert whose group holds the text's language (the language is known);
- `typology`: fixed weights softmax(-d^2 / T) over the experts, d the URIEL syntax distance from the
  text's language to each expert's group (average linkage), T = 0.1: X-ELM's cluster-distance routing
  with the language as the thing routed.
The experts' log-probabilities are cached per forest, so the options after the first only re-mix them.
"""

from __future__ import annotations

import math

import numpy as np

from elmforest.compare import TIE, compute_flag
from elmforest.data.shards import Shards
from elmforest.eval.bpb import evaluate_shards
from elmforest.eval.report import print_table
from elmforest.forest.evaluate import evaluate_forest_shards, make_pool
from elmforest.forest.manifest import Forest
from elmforest.model.build import load_model
from elmforest.utils.io import read_json

TEMPERATURE = 0.1
OPTIONS = ("ensemble", "uniform", "top1", "typology")
# what the routing options know of a test text that the dense LM does not: its language (a label no
# deployed model is given); said beside each finding, so a win read from them is read as such
USES_LABEL = {
    "ensemble": "its prior is cached from the text's language's valid split",
    "top1": "routed by the text's language",
    "typology": "routed by the text's language's typology",
}


def typology_weights(
    lang: str, groups: dict[str, list[str]], distances: dict, t: float = TEMPERATURE
) -> dict:
    """softmax(-d^2 / T) over the groups, d = mean syntax distance from `lang` to the group's members."""
    d = {g: float(np.mean([distances[lang][m] for m in members])) for g, members in groups.items()}
    z = {g: -(x * x) / t for g, x in d.items()}
    top = max(z.values())
    e = {g: math.exp(v - top) for g, v in z.items()}
    s = sum(e.values())
    return {g: v / s for g, v in e.items()}


class Scorer:
    """Scores shared by every table: same split, bytes and windows; one expert pool per expert set."""

    def __init__(
        self,
        shards: Shards,
        eval_bytes: int,
        prior_batches: int,
        seq_len: int,
        device: str = "auto",
        precision: str = "auto",
    ):
        self.shards, self.prior_batches, self.pools = shards, prior_batches, {}
        self.common = {"split": "test", "seq_len": seq_len, "batch_size": 16, "max_bytes": eval_bytes}
        self.common |= {"device": device, "precision": precision}  # as the quickstart's precision line says

    def model(self, path, domains: list[str]) -> dict:
        return evaluate_shards(load_model(path), self.shards, progress=False, domains=domains, **self.common)

    def pool(self, f: Forest, experts: list[str]):
        key = (str(f.root), tuple(experts))
        if key not in self.pools:
            pool = make_pool(
                f, experts, batch_size=16, device=self.common["device"], precision=self.common["precision"]
            )
            for (root, names), other in self.pools.items():  # experts already run on these texts
                if root == key[0] and set(names) & set(experts):
                    pool.adopt(other)
            self.pools[key] = pool
        return self.pools[key]

    def forest(self, f: Forest, experts: list[str], domains: list[str], prior: str, given=None) -> dict:
        kw = {"weighting": "fixed"} if given is not None else {}
        return evaluate_forest_shards(
            f,
            self.shards,
            mode="ensemble",
            prior=prior,
            given_prior=given,
            experts=experts,
            pool=self.pool(f, experts),
            domains=domains,
            prior_batches=self.prior_batches,
            **kw,
            **self.common,
        )

    def options(self, f: Forest, groups: dict[str, list[str]], distances: dict, langs: list[str]) -> dict:
        experts = list(groups)
        home = {lang: g for g, members in groups.items() for lang in members}
        return {
            "ensemble": self.forest(f, experts, langs, "cached"),
            "uniform": self.forest(f, experts, langs, "uniform"),
            "top1": self.forest(f, experts, langs, "given", {x: {home[x]: 1.0} for x in langs}),
            "typology": self.forest(
                f, experts, langs, "given", {x: typology_weights(x, groups, distances) for x in langs}
            ),
        }


def evaluate_all(
    forest,
    forests,
    groupings,
    shards,
    langs,
    new,
    added,
    eval_bytes,
    prior_batches,
    seq_len,
    others=None,
    mixture: str = "uniform",
    device: str = "auto",
    precision: str = "auto",
):
    """Every table of results.json: `methods` (first-round languages), `added` (the second round),
    the FLOPs of each arm, per-language gains and the findings. `others`: the tf-idf cluster forests
    (scored with the posterior and with c-BTM's routing by distance to the cluster centres, top-1)."""
    sc = Scorer(shards, eval_bytes, prior_batches, seq_len, device, precision)
    dense_dir = forest.root / "runs" / "dense" / "model"
    methods = {"dense": sc.model(dense_dir, langs), "seed": sc.model(forest.seed_dir, langs)}
    dense_flops = read_json(forest.root / "runs" / "dense" / "summary.json")["flops"]
    arms = {"dense": dense_flops, "seed": forest.data["seed"]["flops"]}
    for k, f in forests.items():
        groups = groupings[k]["groups"]
        for opt, res in sc.options(f, groups, groupings[k]["distances"], langs).items():
            methods[f"k{k}_{opt}"] = res
            arms[f"k{k}_{opt}"] = arms["seed"] + sum(f.expert(g)["flops"] for g in groups)
    for name, f in (others or {}).items():
        methods[f"{name}_ensemble"] = sc.forest(f, f.names, langs, "cached")
        methods[f"{name}_cluster"] = evaluate_forest_shards(
            f,
            shards,
            mode="cluster",
            k=1,
            pool=sc.pool(f, f.names),
            domains=langs,
            **sc.common,
        )
        arms[f"{name}_ensemble"] = arms[f"{name}_cluster"] = arms["seed"] + sum(
            f.expert(n)["flops"] for n in f.names
        )
    out = {"methods": methods, "temperature": TEMPERATURE}
    if added is not None:
        out["added"], extra = _added(
            sc, forest, forests[added["k"]], groupings[added["k"]], langs, new, added
        )
        arms.update(extra)
        arms["dense_continued"] = dense_flops + added["dense_continued"]["flops"]
    out["compute"] = {"arms": arms, "over_dense": {m: v / dense_flops for m, v in arms.items()}}
    out["gains"] = {
        m: {x: 1 - r["domains"][x]["bpb"] / methods["dense"]["domains"][x]["bpb"] for x in langs}
        for m, r in methods.items()
        if m != "dense"
    }
    out["train_bytes"] = {x: int(shards.info(x, "train")["bytes"]) for x in langs}
    out["findings"] = findings(out, langs, new, mixture)
    return out


def _added(sc: Scorer, forest, fk: Forest, grouping: dict, langs, new, added) -> tuple[dict, dict]:
    """The second round: the new language's BPB for every way of adding it, and every first-round
    language's BPB before and after (the experts are untouched; the dense LM is not)."""
    every = [*langs, new]
    groups = dict(grouping["groups"])
    home = {lang: g for g, members in groups.items() for lang in members}
    seed_flops = forest.data["seed"]["flops"]
    base = seed_flops + sum(fk.expert(g)["flops"] for g in groups)
    k = added["k"]
    res = {
        "dense": sc.model(forest.root / "runs" / "dense" / "model", every),
        "dense_continued": sc.model(added["dense_continued"]["model"], every),
        f"k{k}_ensemble": sc.forest(fk, list(groups), every, "cached"),
    }
    arms = {}
    for how, name in added["experts"].items():
        experts = [*groups, name]
        res[f"k{k}+{how}_ensemble"] = sc.forest(fk, experts, every, "cached")
        res[f"k{k}+{how}_top1"] = sc.forest(
            fk, experts, every, "given", {**{x: {home[x]: 1.0} for x in langs}, new: {name: 1.0}}
        )
        for opt in ("ensemble", "top1"):
            arms[f"k{k}+{how}_{opt}"] = base + fk.expert(name)["flops"]
    return res, arms


def findings(out: dict, langs: list[str], new: str | None, mixture: str = "uniform") -> list[str]:
    """X-ELM's claims on this run, each stated plainly as holding or not (ties within TIE). The curse of
    multilinguality is about a language's share of the training mix: under a uniform mixture every
    language has the same share whatever its corpus size, so the smallest corpus is only repeated more,
    which is said instead of a verdict."""
    m, lines = out["methods"], []
    dense = m["dense"]["domains"]
    over = (out.get("compute") or {}).get("over_dense") or {}

    for name, r in m.items():
        if name in ("dense", "seed"):
            continue
        # compare.findings' rule per language: within TIE a tie, which one seed cannot separate
        ratio = {x: r["domains"][x]["bpb"] / dense[x]["bpb"] for x in langs}
        worse = [x for x in langs if ratio[x] >= 1 and abs(ratio[x] - 1) >= TIE]
        tied = [x for x in langs if abs(ratio[x] - 1) < TIE]
        if worse:
            verdict = f"does NOT hold: worse in {', '.join(worse)}"
        elif tied:
            rest = ", better in the rest" if len(tied) < len(langs) else ""
            verdict = f"not shown: a tie (within {TIE:.0%}) in {', '.join(tied)}{rest}"
        else:
            verdict = "holds"
        label = USES_LABEL.get(name.rsplit("_", 1)[-1])
        lines.append(
            f"{name} beats the jointly trained dense LM in every language: {verdict} (mean {r['mean_bpb']:.4f} "
            f"vs {m['dense']['mean_bpb']:.4f}; within {TIE:.0%} of dense in {len(tied)} of {len(langs)})"
            + (f" [uses the test text's language label: {label}]" if label else "")
            + compute_flag(over.get(name, 1.0))
        )
    small = min(langs, key=lambda x: out["train_bytes"][x])
    mb = out["train_bytes"][small] / 1e6
    for name in [n for n in m if n.endswith("_ensemble")]:
        g = out["gains"][name]
        lines.append(
            f"{name}: gain over dense on the language with the smallest training corpus, {small} ({mb:.2f} MB), "
            f"{g[small]:+.1%} vs mean gain {np.mean(list(g.values())):+.1%} "
            + (
                "(not a test of the curse of multilinguality: the languages are mixed uniformly, so each gets "
                "the same share of training tokens whatever its corpus size)"
                if mixture == "uniform"
                else f"(the curse of multilinguality predicts the largest gains there; mixture {mixture})"
            )
        )
    a = out.get("added")
    if a and new:
        k = next(int(n[1:].split("_")[0]) for n in a if n.startswith("k") and "+" not in n)
        b = {n: r["domains"][new]["bpb"] for n, r in a.items()}
        near, seed = b.get(f"k{k}+nearest_ensemble"), b.get(f"k{k}+seed_ensemble")
        r = near / seed  # compare.findings' rule: within TIE a tie, exactly TIE a result
        lines.append(
            f"adding {new}: forest + expert branched from the nearest expert {near:.4f} vs from the seed "
            f"{seed:.4f} BPB on {new} (ratio {r:.4f}) -> nearest-expert branching "
            + ("is a tie" if abs(r - 1) < TIE else "helps" if r < 1 else "hurts")
        )
        lines.append(
            f"adding {new}: forest {near:.4f} vs dense continued on every language for the same extra compute "
            f"{b['dense_continued']:.4f} ({near / b['dense_continued'] - 1:+.1%}); dense before {b['dense']:.4f}, "
            f"forest before {b[f'k{k}_ensemble']:.4f}"
        )
        top_before = m[f"k{k}_top1"]["domains"]
        top_after = a[f"k{k}+nearest_top1"]["domains"]
        d_top = max(abs(top_after[x]["bpb"] - top_before[x]["bpb"]) for x in langs)
        ens_before, ens_after = m[f"k{k}_ensemble"]["domains"], a[f"k{k}+nearest_ensemble"]["domains"]
        d_ens = np.mean([ens_after[x]["bpb"] / ens_before[x]["bpb"] - 1 for x in langs])
        dc = a["dense_continued"]["domains"]
        d_dense = np.mean([dc[x]["bpb"] / dense[x]["bpb"] - 1 for x in langs])
        lines.append(
            f"no forgetting: after adding {new}, each first-round language's own expert scores it with max "
            f"|change| {d_top:.2e} BPB (the experts are untouched); the ensemble changes by {d_ens:+.2%} on "
            f"average; the dense LM continued with {new} changes by {d_dense:+.2%} on the first-round languages"
        )
    return lines


def print_results(results: dict, log=print) -> None:
    m, over = results["methods"], results["compute"]["over_dense"]
    main = {n: r for n, r in m.items() if n in ("dense", "seed") or n.endswith("_ensemble")}
    print_table(main, "per-language bits per byte (test splits; lower is better)", flops=over)
    routing = {n: r for n, r in m.items() if n not in main}
    print_table(
        routing, "routing options: uniform prior, top-1 known-language expert, typology weights", flops=over
    )
    if results.get("added"):
        arms = results["compute"]["arms"]  # the same extra compute for every way of adding the language
        print_table(
            results["added"],
            f"adding {results['new_language']} later (second round; FLOPs over the dense LM continued with it)",
            flops={m: arms[m] / arms["dense_continued"] for m in results["added"] if m in arms},
        )
    for line in results["findings"]:
        log(f"  - {line}")
