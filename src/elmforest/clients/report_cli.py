"""`elmforest report DIR --out report.html`: the run report's command line (parsing only)."""

from __future__ import annotations

from typing import Annotated

import typer

from elmforest.utils.argtypes import arg, opt, verb


def register(app: typer.Typer) -> None:
    verb(app, "report")(report)


def report(
    dir: Annotated[str, arg("a quickstart --out dir, or a forest dir (forest.json)")],
    out: Annotated[
        str | None, opt("the HTML file to write (default: DIR/report.html)", metavar="FILE")
    ] = None,
    eval: Annotated[
        list[str] | None,
        opt("an `elmforest eval --json` file to show as a table (repeatable)", metavar="FILE"),
    ] = None,
) -> None:
    """One self-contained HTML page about a run: results tables and plots, priors and routing
    heatmaps, the forest's lineage, training curves and the FLOPs ledger; opens offline."""
    from elmforest.clients.report import write_report

    print(write_report(dir, out, eval or []))  # which checks --out and --eval before the page is rendered
