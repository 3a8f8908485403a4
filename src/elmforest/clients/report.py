"""`elmforest report`: one self-contained HTML page about a run, to read or to send to someone.

From a quickstart's output dir: the results tables (bits per byte per domain per method, in and out
of domain, each arm's training FLOPs as the quickstart prints them), their plots, the cached priors,
posteriors and MoE routing as domain x expert heatmaps, the forest's lineage, every run's training
curves and the FLOPs ledger. From a bare forest dir: what exists (lineage, curves, ledger), and a
note of what is absent. The page fetches nothing (inline PNGs, inline CSS, no scripts, and a
Content-Security-Policy that forbids any request), so it opens the same offline or as an attachment.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import elmforest
from elmforest.clients import report_plots as plots
from elmforest.clients.report_data import (
    Sources,
    forest_runs,
    lineage,
    locate,
    moe_runs,
    other_runs,
    seed_steps,
)
from elmforest.clients.report_html import absent, bullets, esc, image, page, para, section, slug, table
from elmforest.clients.report_tables import SETS, eval_tables, ledger_section, results_section
from elmforest.utils.errors import AlreadyExists, UserError
from elmforest.utils.io import read_json, write_text_atomic


def write_report(path: str | Path, out: str | Path | None = None, evals: Sequence[str | Path] = ()) -> Path:
    """Write the report of the quickstart or forest dir `path` to `out` (default: path/report.html),
    with a table for each `elmforest eval --json` file in `evals`."""
    out = check_out(out if out is not None else Path(path) / "report.html")  # before rendering
    tables = eval_tables(evals)  # a bad file refused before the page is rendered
    write_text_atomic(out, render_report(path, tables))
    return out


def write_run_report(path: str | Path) -> str:
    """A quickstart's report page (path/report.html), never at the results' cost: results.json is written
    by then, so a failure is said on stderr and the line tells how to rebuild it. Returns what to print."""
    import sys

    try:
        return str(write_report(path))
    except Exception as e:  # noqa: BLE001 - the results stand; say what failed
        print(f"elmforest: warning: the run report was not written: {e}", file=sys.stderr)
        return f"no report ({type(e).__name__}: {e}; rerun `elmforest report {path}`)"


def check_out(out: str | Path) -> Path:
    """`out` as a Path, or a UserError saying why it must not be written. Only an earlier report may be
    replaced: `--out forest/forest.json` once replaced a forest's manifest with HTML."""
    if not str(out).strip():
        raise UserError("--out is empty; give the HTML file to write (e.g. report.html)")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give the HTML file to write (e.g. {out / 'report.html'})")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is not a folder")
    if out.exists() and not _is_html(out):
        raise AlreadyExists(
            f"--out {out}: exists and is not an earlier HTML report; refusing to replace it "
            "(remove it, or choose another --out)"
        )
    return out


def _is_html(p: Path) -> bool:
    """An earlier report (or another HTML page), by its content: any name --out was given."""
    try:
        with open(p, "rb") as f:
            head = f.read(512).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    except OSError:
        return False
    return head.startswith((b"<!doctype html", b"<html"))


def render_report(path: str | Path, evals: str = "") -> str:
    return _render(locate(path), evals)


def _render(src: Sources, evals: str = "") -> str:
    sections = [("overview", "Overview", _overview(src))]
    if evals:
        sections.append(("evaluations", "Evaluations", evals))
    if src.results is not None:
        sections += [
            ("results", "Results", _stale(src, "stale-results") + results_section(src.results)),
            ("priors", "Priors, posteriors and routing", _priors(src)),
        ]
    elif src.moes:
        sections.append(("priors", "MoE routing", _priors(src)))
    sections += [
        ("lineage", "Lineage", _lineage(src)),
        ("curves", "Training curves", _curves(src)),
        ("ledger", "FLOPs ledger", ledger_section(src)),
    ]
    if src.results is not None:
        sections.append(("protocol", "Protocol", _protocol(src.results)))
    if src.absent:
        sections.append(("absent", "Absent", absent(src.absent, "absent-list")))
    title = f"elmforest run report: {src.root.resolve().name}"
    sub = [
        f"{src.root} ({'quickstart output' if src.kind == 'quickstart' else 'forest'}); written "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by elmforest {elmforest.__version__}"
    ]
    return page(title, sub, [(sid, t, section(sid, t, [body])) for sid, t, body in sections])


# -- sections ---------------------------------------------------------------------------------------
def _overview(src: Sources) -> str:
    r = src.results
    items = []
    for f in src.forests:
        seed = "a seed" if f.data.get("seed") else "no seed"
        items.append(
            f"forest {f.root.name}/: {len(f.names)} expert(s) and {seed}; seed and experts trained with "
            f"{f.total_flops():.4e} FLOPs"
        )
    items += [f"merged MoE: {m.name}" for m in src.moes]
    body = [bullets(items)]
    if r is None:  # said first, not only at the bottom: the page lacks its main tables
        body.insert(0, absent([src.absent[0]], "no-results") if src.absent else "")
    if src.stale:
        body.insert(0, _stale(src, "stale-overview"))
    if r is not None:
        secs = r.get("seconds")
        preset = r.get("preset") or (r.get("protocol") or {}).get("preset", "?")  # X-ELM: in its protocol
        body.insert(0, para(f"preset {preset}" + (f"; {secs:.0f} s end to end" if secs else "")))
        if r.get("findings"):
            body.append("<h3>Findings (as the quickstart states them)</h3>")
            body.append(bullets(r["findings"], "findings"))
    return "".join(body)


def _stale(src: Sources, sid: str) -> str:
    if not src.stale:
        return ""
    names = ", ".join(src.stale)
    return (
        f'<div class="absent" id="{sid}"><strong>Results older than the forest</strong>'
        + para(
            f"{src.root / 'results.json'} was written before {names} opted out (forest remove): its tables, "
            f"priors, findings and ledger still include {names} and the merged models deleted with "
            f"{'it' if len(src.stale) == 1 else 'them'}. Run the quickstart again for results without them."
        )
        + "</div>"
    )


def _matrix(rows_of: dict) -> tuple[list[str], list[str], np.ndarray]:
    rows = list(rows_of)
    cols: list[str] = []
    for v in rows_of.values():
        cols += [c for c in v if c not in cols]
    m = np.full((len(rows), len(cols)), np.nan)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            x = rows_of[r].get(c)
            if isinstance(x, (int, float)):
                m[i, j] = x
    return rows, cols, m


def _priors(src: Sources) -> str:
    r, body = src.results, []
    if r is not None:
        for where, key, label in SETS:
            methods = r.get(key) or {}
            prior_tab = (r.get("priors") or {}).get(where) or {}
            panels = []
            if prior_tab:
                panels.append(("cached prior (valid split)", {d: v["prior"] for d, v in prior_tab.items()}))
            for m in ("ensemble", "ensemble_uniform"):
                if (methods.get(m) or {}).get("posterior"):
                    panels.append((f"{m}: mean posterior (test split)", methods[m]["posterior"]))
            if not panels:
                continue
            body.append(f"<h3>{esc(label)}</h3>")
            png = plots.heatmaps_png([(t, *_matrix(tab)) for t, tab in panels])
            body.append(
                image(png, f"{label} priors and posteriors, domains x experts", f"heatmap-{slug(label)}")
            )
            if prior_tab:
                rows = [[d, v.get("expert"), v.get("weight"), v.get("source")] for d, v in prior_tab.items()]
                cap = f"{label}: the cached prior's largest entry per domain"
                body.append(
                    table(
                        f"priors-{slug(label)}", cap, ["domain", "expert", "weight", "estimated from"], rows
                    )
                )
    routing = []
    for m in src.moes:
        f = m / "routing.json"
        if not f.is_file():
            src.absent.append(
                f"{m.name}: no routing.json (written by `elmforest merge routing`), so no routing heatmap"
            )
            continue
        stats = read_json(f)
        names = stats.get("experts", [])
        tab = {
            d: dict(zip(names, v.get("load_mean", []), strict=False))
            for d, v in stats.get("domains", {}).items()
        }
        if tab:
            routing.append((f"{m.name}: share of routed tokens ({stats.get('split', '?')} split)", tab))
    if routing:
        body.append("<h3>merged MoE routing</h3>")
        body.append(
            para("each domain's tokens: the share sent to each expert, top-k slots averaged over layers")
        )
        for title, tab in routing:
            png = plots.heatmaps_png([(title, *_matrix(tab))])
            body.append(image(png, title, f"heatmap-routing-{slug(title.split(':')[0])}"))
    return "".join(body) or para("no priors, posteriors or routing statistics recorded")


def _lineage(src: Sources) -> str:
    body = []
    for f in src.forests:
        body.append(f"<h3>forest {esc(f.root.name)}/</h3>")
        nodes, edges = lineage(f)
        if nodes:
            body.append(
                image(
                    plots.lineage_png(nodes, edges),
                    f"lineage of {f.root.name}",
                    f"lineage-{slug(f.root.name)}",
                )
            )
        seed = f.data.get("seed")
        rows = []
        if seed:
            rows.append(
                ["seed", "(mixed)", "-", seed.get("source", ""), seed.get("tokens"), seed.get("flops")]
            )
        for e in f.experts:
            parents = (
                ", ".join(f"{p['name']} x{p.get('weight', 1.0):.3f}" for p in e.get("parents", [])) or "-"
            )
            rows.append(
                [
                    e["name"],
                    ", ".join(e.get("domains", [])),
                    e.get("branch", "-"),
                    parents,
                    e.get("tokens"),
                    e.get("flops"),
                ]
            )
        header = ["name", "domains", "branch", "branched from (name x weight)", "tokens", "FLOPs"]
        body.append(
            table(f"lineage-{slug(f.root.name)}-table", f"{f.root.name}: seed and experts", header, rows)
        )
        if f.removed:
            body.append(para("opted out (forest remove): " + ", ".join(f.removed)))
    return "".join(body) or para("no forest")


def _curves(src: Sources) -> str:
    body = []
    for f in src.forests:
        runs, gone = forest_runs(f)
        src.absent.extend(gone)
        if not runs:
            continue
        body.append(f"<h3>forest {esc(f.root.name)}/</h3>")
        marks = {"seed ends": seed_steps(f)} if f.data.get("seed") and seed_steps(f) else None
        body.append(
            image(
                plots.curves_png(runs, marks),
                f"training curves of {f.root.name}",
                f"curves-{slug(f.root.name)}",
            )
        )
        body.append(_runs_table(f"runs-{slug(f.root.name)}", f"{f.root.name}: runs", runs))
    if src.kind == "quickstart" and (runs := other_runs(src.root, src.forests)):
        body.append("<h3>other runs</h3>")
        body.append(image(plots.curves_png(runs), "training curves of the other runs", "curves-other"))
        body.append(_runs_table("runs-other", "other runs", runs))
    runs, gone = moe_runs(src.moes)
    src.absent.extend(gone)
    if runs:
        body.append("<h3>merged MoE stages</h3>")
        body.append(image(plots.curves_png(runs), "training curves of the MoE stages", "curves-moe"))
        body.append(_runs_table("runs-moe", "MoE stages: runs", runs))
    return "".join(body) or para("no run directories with metrics to plot")


def _runs_table(tid: str, caption: str, runs: list[dict]) -> str:
    rows = [
        [
            r["name"],
            r["role"],
            r["last_step"],
            r["tokens"],
            r["flops"],
            r["loss"][-1] if r["loss"] else None,
            r["valid_loss"][-1] if r["valid_loss"] else None,
            f"{r['wall_s']:.0f}" if isinstance(r["wall_s"], (int, float)) else None,
            "finished" if r["done"] else "not finished",
        ]
        for r in runs
    ]
    header = [
        "run",
        "role",
        "last step",
        "tokens",
        "FLOPs",
        "last loss",
        "last valid loss",
        "seconds",
        "state",
    ]
    return table(tid, caption, header, rows)


def _protocol(r: dict) -> str:
    rows = [[f"protocol.{k}", v] for k, v in (r.get("protocol") or {}).items()]
    rows += [[f"plan.{k}", v] for k, v in (r.get("plan") or {}).items()]
    return table("protocol-table", "how the numbers above were measured", ["setting", "value"], rows)
