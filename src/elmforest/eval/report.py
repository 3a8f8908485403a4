"""Per-domain result tables for the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_table(
    results: dict[str, dict], title: str = "bits per byte (lower is better)", console: Console | None = None
) -> None:
    """`results` maps a method name to an eval JSON ({"domains": {...}, "mean_bpb": ...})."""
    console = console or Console()
    domains = sorted({d for r in results.values() for d in r["domains"]})
    table = Table(title=title)
    table.add_column("domain")
    for m in results:
        table.add_column(m, justify="right")
    for d in domains:
        row = [d]
        for r in results.values():
            v = r["domains"].get(d)
            row.append(f"{v['bpb']:.4f}" if v else "-")
        table.add_row(*row)
    table.add_section()
    table.add_row("mean", *[f"{r['mean_bpb']:.4f}" for r in results.values()])
    console.print(table)
