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
) -> None:
    """One self-contained HTML page about a run: results tables and plots, priors and routing
    heatmaps, the forest's lineage, training curves and the FLOPs ledger; opens offline."""
    from pathlib import Path

    from elmforest.clients.report import write_report
    from elmforest.utils.errors import UserError

    if out is not None and Path(out).is_dir():  # checked before the page is rendered
        raise UserError(
            f"--out {out}: is a folder; give the HTML file to write (e.g. {Path(out) / 'report.html'})"
        )
    print(write_report(dir, out))
