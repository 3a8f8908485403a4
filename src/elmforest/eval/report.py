"""Per-domain result tables for the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_table(
    results: dict[str, dict], title: str = "bits per byte (lower is better)", console: Console | None = None
) -> None:
    """`results` maps a method name to an eval JSON ({"domains": {...}, "mean_bpb": ...})."""
    domains = sorted({d for r in results.values() for d in r["domains"]})
    # wide enough for every column: a pipe or log file would otherwise get 80 columns and truncated names
    need = max(len(d) for d in domains) + sum(max(len(m), 7) + 3 for m in results) + 8
    console = console or Console(width=max(need, Console().width))
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


def plot_results(
    results: dict[str, dict], path, title: str = "bits per byte by domain (lower is better)"
) -> None:
    """Grouped bars: one group per domain (plus the mean), one bar per method; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from elmforest.utils.io import atomic_path

    domains = sorted({d for r in results.values() for d in r["domains"]}) + ["mean"]
    methods = list(results)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(domains)), 4.5))
    x = np.arange(len(domains))
    for i, m in enumerate(methods):
        r = results[m]
        vals = [r["domains"][d]["bpb"] if d in r["domains"] else np.nan for d in domains[:-1]] + [
            r["mean_bpb"]
        ]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, vals, width, label=m)
    ax.set_xticks(x, domains, rotation=30, ha="right")
    ax.set_ylabel("bits per byte")
    lo = min(min(r["domains"][d]["bpb"] for d in r["domains"]) for r in results.values())
    ax.set_ylim(bottom=max(0.0, lo * 0.85))
    ax.set_title(title)
    ax.legend(ncol=min(4, len(methods)), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
