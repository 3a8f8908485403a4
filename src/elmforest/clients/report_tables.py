"""The report's numeric tables: results per domain and method with each arm's training FLOPs, and the
FLOPs ledger of every forest (clients/report.py assembles the page). results.json comes from the
demo quickstart (`compute.methods`, `ledger`) or the X-ELM quickstart (`compute.arms`, `over_dense`,
a second-round table `added`): `compute_of` reads both the same way."""

from __future__ import annotations

import math
import re
from pathlib import Path

from elmforest.clients import report_plots as plots
from elmforest.clients.report_data import Sources
from elmforest.clients.report_html import esc, image, para, slug, table
from elmforest.eval.report import FLOPS_TOLERANCE, INFERENCE_ROW, flops_mark, inference_mark
from elmforest.forest.manifest import Forest
from elmforest.utils.errors import UserError
from elmforest.utils.io import read_json

SETS = (
    ("in_domain", "methods", "in-domain"),
    ("ood", "ood_methods", "out-of-domain"),
    ("added", "added", "added language (X-ELM's second round)"),
)


def compute_of(r: dict, key: str = "methods") -> dict:
    """results.json's compute as the tables read it: each method's training FLOPs over its dense run's
    (`methods`) and that run's FLOPs. The X-ELM quickstart records `arms` (FLOPs) and `over_dense`; its
    added-language arms are set against the dense run continued on the new language, as it prints them."""
    c = dict(r.get("compute") or {})
    arms = c.get("arms") if isinstance(c.get("arms"), dict) else {}
    if key == "added" and arms.get("dense_continued"):
        base = arms["dense_continued"]
        return {**c, "methods": {m: v / base for m, v in arms.items()}, "dense_flops": base}
    c.setdefault("methods", c.get("over_dense") or {})
    if not c.get("dense_flops") and arms.get("dense"):
        c["dense_flops"] = arms["dense"]
    return c


def results_section(r: dict) -> str:
    body = []
    for where, key, label in SETS:
        methods = r.get(key)
        if not methods:
            if where != "added":  # only the X-ELM quickstart adds a language
                body.append(para(f"no {label} results in results.json"))
            continue
        against = "the dense run continued on it" if key == "added" else "the dense run"
        body.append(_results_table(f"results-{slug(label)}", label, methods, compute_of(r, key), against))
        png = plots.bars_png(methods, f"{label} bits per byte by domain (lower is better)")
        body.append(image(png, f"{label} bits per byte by domain and method", f"plot-{slug(label)}"))
    return "".join(body)


def _results_table(tid: str, label: str, methods: dict, compute: dict, against: str = "the dense run") -> str:
    names = list(methods)
    domains = sorted({d for m in methods.values() for d in m["domains"]})
    rows = [[d, *(methods[m]["domains"].get(d, {}).get("bpb") for m in names)] for d in domains]
    rows.append(["mean", *(methods[m].get("mean_bpb") for m in names)])
    ratios = compute.get("methods") or {}
    # "best" only among the arms at the dense run's compute (a flagged arm used another amount; one with
    # none recorded, results from before the per-arm ratios, might have), by the value as printed, so
    # arms that tie on the page are shaded alike
    fair = [m in ratios and not flops_mark(ratios[m]).endswith("!") for m in names]
    classes = {}

    def finite(v) -> bool:  # a NaN (a hand-edited file) shades nothing and hides no other cell's shade
        return isinstance(v, (int, float)) and math.isfinite(v)

    for i, row in enumerate(rows):
        vals = [round(v, 4) for v, ok in zip(row[1:], fair, strict=True) if ok and finite(v)]
        for j, (v, ok) in enumerate(zip(row[1:], fair, strict=True), start=1):
            if ok and vals and finite(v) and round(v, 4) == min(vals):
                classes[(i, j)] = "best"
    dense = compute.get("dense_flops")
    sums = [rows.pop()]
    if ratios:
        marks = [flops_mark(ratios.get(m)) for m in names]
        sums.append(["train FLOPs / dense", *marks])
        for j, mark in enumerate(marks, start=1):
            if mark.endswith("!"):
                classes[(len(rows) + 1, j)] = "flag"
        if dense:
            sums.append(["train FLOPs", *(ratios[m] * dense if m in ratios else None for m in names)])
    if serve := compute.get("inference"):  # per-token cost of running each row (results before: none)
        sums.append([INFERENCE_ROW, *(inference_mark(serve.get(m)) for m in names)])
    unknown = [m for m in names if m not in ratios]
    caption = f"{label} bits per byte (test splits; lower is better; " + (
        "no arm's training FLOPs are recorded in results.json, so none is shaded as best)"
        if len(unknown) == len(names)
        else f"best of each row shaded among the arms trained with {against}'s compute: one marked ! used "
        "another amount"
        + (f"; {', '.join(unknown)}: training FLOPs not recorded, not shaded)" if unknown else ")")
    )
    html = table(tid, caption, ["domain", *names], rows, sums, classes)
    notes = []
    for m, v in methods.items():
        gone = v.get("missing") or {}
        if gone:
            notes.append(
                f"{m}: left out of the table and the mean: "
                + ", ".join(f"{d} ({w})" for d, w in gone.items())
            )
    if any(isinstance(v, float) and abs(v - 1) > FLOPS_TOLERANCE for v in ratios.values()):
        notes.append(
            f"'!': this arm's training FLOPs differ from the dense baseline's by more than {FLOPS_TOLERANCE:.0%}: "
            "not a compute-matched comparison"
        )
    return html + "".join(para(n) for n in notes)


def ledger_section(src: Sources) -> str:
    body = []
    compute = compute_of(src.results or {})
    arms = compute.get("arms")
    if src.main is None and compute.get("ledger"):  # results.json without its forest (copied alone)
        ledger = compute["ledger"]
        total = compute.get("forest_flops") or sum(
            p.get("flops") or 0 for p in ledger if p.get("phase") in _FOREST
        )
        body.append(_ledger_table("results.json", ledger, compute.get("dense_flops"), total))
    for f in src.forests:
        body.append(f"<h3>forest {esc(f.root.name)}/</h3>")
        total_flops = f.total_flops()
        if f is src.main and compute.get("ledger"):  # the results' own ledger and total: the page never mixes
            rows, dense = compute["ledger"], compute.get("dense_flops")  # them with a forest changed since
            total_flops = compute.get("forest_flops", total_flops)
        else:
            rows, run = f.ledger(), _dense_run(f)
            if (dense := run.get("flops")) and f is src.main:
                rows.append({"phase": "dense", "name": "dense", "flops": dense, "tokens": run.get("tokens")})
            elif f is not src.main:  # an ablation forest (random splits, clusters) against the main dense run
                dense = compute.get("dense_flops") or (src.main and _dense_run(src.main).get("flops"))
        body.append(_ledger_table(f.root.name, rows, dense, total_flops))
        # its own arms (X-ELM's forest-k4: k4_*, k4+nearest_*), all when none is named after it
        own = [
            v
            for m, v in (arms or {}).items()
            if re.split(r"[_+]", m)[0] == f.root.name.removeprefix("forest-")
        ]
        if arms and dense and total_flops > max(own or arms.values()) * (1 + FLOPS_TOLERANCE):
            body.append(  # X-ELM's k-forest holds the added language's expert three ways
                para(
                    f"No arm uses all of {f.root.name}'s experts ({total_flops / dense:.3f}x the dense run's "
                    "FLOPs together): each arm's own training FLOPs are in the table of arms below"
                )
            )
        shown = {p.get("name") for p in rows if p.get("phase") == "expert"}
        gone = [r for r in f.data.get("removed", []) if r.get("spent") and r["name"] not in shown]
        if gone:  # opting out discards compute that ran: said, never silently dropped
            body.append(
                para(
                    "Opted out, so not in the ledger: "
                    + "; ".join(
                        f"{r['name']} ({sum(x.get('flops') or 0 for x in r['spent']):.3e} FLOPs: "
                        + ", ".join(sorted({x["phase"] for x in r["spent"]}))
                        + ")"
                        for r in gone
                    )
                )
            )
    if arms and compute.get("dense_flops"):
        rows = [[a, v, flops_mark(v / compute["dense_flops"])] for a, v in arms.items()]
        flagged = {(i, 2): "flag" for i, r in enumerate(rows) if r[2].endswith("!")}  # red, as the results'
        body.append(
            table("arms", "training FLOPs of each arm", ["arm", "FLOPs", "/ dense"], rows, classes=flagged)
        )
    return "".join(body) or para("no forest, so no ledger")


_FOREST = ("seed", "expert")  # the phases a forest's total_flops sums


def _ledger_table(name: str, rows: list[dict], dense, total_flops) -> str:
    table_rows = [
        [
            p.get("phase"),
            p.get("name"),
            p.get("tokens"),
            p.get("flops"),
            (p.get("flops") or 0) / dense if dense else None,
        ]
        for p in rows
    ]
    counted = [p for p in rows if p.get("phase") in _FOREST]
    same = sum(p.get("flops") or 0 for p in counted) == total_flops
    tokens = sum(p.get("tokens") or 0 for p in counted) if same else None
    total = [["forest (seed + experts)", "", tokens, total_flops, total_flops / dense if dense else None]]
    header = ["phase", "name", "tokens", "FLOPs", "FLOPs / dense"]
    cap = f"{name}: every training phase, counted by what ran"
    return table(f"ledger-{slug(name)}", cap, header, table_rows, total)


def _dense_run(f: Forest) -> dict:
    p = f.root / "runs" / "dense" / "summary.json"
    s = read_json(p) if p.is_file() else None
    return s if isinstance(s, dict) else {}


def eval_tables(paths) -> str:
    """One table per `elmforest eval --json` file: each domain's bits per byte with the bytes, tokens and
    documents scored (and, for a forest, where its prior came from), the file named in the caption. A
    forest dir has no results.json; the evaluations a user ran on it belong on its page too."""
    out = []
    for i, p in enumerate(paths):
        p = Path(p)
        try:
            res = read_json(p)
            domains = res["domains"]
            mean = float(res["mean_bpb"])
            rows = [
                [d, f"{v['bpb']:.4f}", v.get("bytes", "-"), v.get("tokens", "-"), v.get("documents", "-")]
                + ([v.get("prior_source", "-")] if "mode" in res else [])
                for d, v in domains.items()
            ]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(
                f"--eval {p}: not an `elmforest eval --json` file (domains and mean_bpb): {type(e).__name__}: {e}"
            ) from None
        what = f"forest, mode {res['mode']}" if "mode" in res else "one model"
        caption = f"{p.name}: {what}, split {res.get('split', '?')}, mean BPB {mean:.4f}" + (
            f", first {res['max_bytes']:,} bytes per domain" if res.get("max_bytes") else ""
        )
        header = ["domain", "BPB", "bytes", "tokens", "documents"] + (["prior"] if "mode" in res else [])
        out.append(table(f"eval-{i}", caption, header, rows))
    return "".join(out)
