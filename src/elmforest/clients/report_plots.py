"""The run report's figures, each rendered by matplotlib (Agg) straight to PNG bytes, so the page can
carry them inline as base64 and open with no file or network beside it.

Text in a figure comes from data (domain and expert names a user chose); mathtext is off, so a name
with `$` in it is drawn as written instead of failing to parse."""

from __future__ import annotations

import io
from contextlib import contextmanager

import numpy as np

from elmforest.merge.routing import MAX_CELL_LABELS  # past it a heatmap's cells have no numbers

MAX_CELLS_DRAWN = 16  # ... and with more than this, smaller cells (a 64-expert forest's page stays a page)


@contextmanager
def _figure(width: float, height: float, ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"text.parse_math": False, "font.size": 8, "axes.titlesize": 9}):
        fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
        try:
            yield fig, list(axes[0])
        finally:
            plt.close(fig)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=96)
    return buf.getvalue()


def bars_png(results: dict[str, dict], title: str) -> bytes:
    """Grouped bars of bits per byte: one group per domain plus the mean, one bar per method."""
    domains = sorted({d for r in results.values() for d in r["domains"]}) + ["mean"]
    methods = list(results)
    with _figure(max(7.0, 0.9 * len(domains) + 0.25 * len(methods)), 3.6) as (fig, (ax,)):
        width = 0.8 / len(methods)
        x = np.arange(len(domains))
        for i, m in enumerate(methods):
            r = results[m]
            vals = [r["domains"].get(d, {}).get("bpb", np.nan) for d in domains[:-1]]
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, [*vals, r["mean_bpb"]], width, label=m)
        ax.set_xticks(x, domains, rotation=30, ha="right")
        ax.set_ylabel("bits per byte")
        lows = [
            v["bpb"]
            for r in results.values()
            for v in r["domains"].values()
            if np.isfinite(v.get("bpb", np.nan))
        ]
        if lows:
            ax.set_ylim(bottom=max(0.0, min(lows) * 0.85))
        ax.set_title(title)
        ax.legend(ncol=min(6, len(methods)), fontsize=6)
        ax.grid(axis="y", alpha=0.3)
        return _png(fig)


def heatmaps_png(panels: list[tuple[str, list[str], list[str], np.ndarray]]) -> bytes:
    """Side-by-side heatmaps, one per (title, row names, column names, matrix): the share of the
    weight (prior, posterior or routed tokens) each domain gives each expert; rows sum to about 1."""
    ncols = len(panels)
    rows = max(len(p[1]) for p in panels)
    cols = max(len(p[2]) for p in panels)
    cell = min(1.0, MAX_CELLS_DRAWN / max(rows, cols))  # past 16 a side the cells shrink, not the page grow
    with _figure(max(4.0, 0.45 * cell * cols + 2.2) * ncols, max(2.6, 0.32 * cell * rows + 1.8), ncols) as (
        fig,
        axes,
    ):
        same_rows = all(p[1] == panels[0][1] for p in panels)
        for k, (ax, (title, row_names, col_names, m)) in enumerate(zip(axes, panels, strict=True)):
            im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(col_names)), col_names, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(row_names)), row_names if k == 0 or not same_rows else [], fontsize=7)
            ax.set_xlabel("expert")
            ax.set_title(title)
            if len(row_names) <= MAX_CELL_LABELS and len(col_names) <= MAX_CELL_LABELS:
                for i in range(m.shape[0]):
                    for j in range(m.shape[1]):
                        v = m[i, j]
                        if np.isfinite(v):
                            color = "black" if v > 0.6 else "white"
                            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color=color)
        fig.colorbar(im, ax=axes, shrink=0.8, label="weight")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
        return buf.getvalue()


def curves_png(runs: list[dict], marks: dict[str, int] | None = None) -> bytes:
    """Training loss (left) and validation loss (right) against the step, one line per run; experts
    continue the seed's step count, so a branch starts where the seed stopped (the dashed lines)."""
    with _figure(11.0, 3.8, 2) as (fig, (train_ax, valid_ax)):
        for r in runs:
            (line,) = train_ax.plot(r["steps"], r["loss"], lw=1.0, label=r["name"])
            if r["valid_steps"]:
                valid_ax.plot(r["valid_steps"], r["valid_loss"], "o-", ms=3, lw=1.0, color=line.get_color())
        for ax, what in ((train_ax, "training loss"), (valid_ax, "validation loss (fixed valid windows)")):
            for label, step in (marks or {}).items():
                ax.axvline(step, ls="--", lw=0.8, color="grey")
                ax.annotate(label, (step, 1.0), xycoords=("data", "axes fraction"), fontsize=6, va="top")
            ax.set_xlabel("step")
            ax.set_ylabel("loss (nats per token)")
            ax.set_title(what)
            ax.grid(alpha=0.3)
        train_ax.legend(fontsize=6, ncol=2)
        if not any(r["valid_steps"] for r in runs):
            valid_ax.text(0.5, 0.5, "no valid.jsonl in any run", ha="center", transform=valid_ax.transAxes)
        return _png(fig)


def lineage_png(nodes: list[dict], edges: list[tuple[str, str, float, str | None]]) -> bytes:
    """The forest's family tree, left to right: the seed (and any outside source), the experts branched
    from it, experts branched from experts or from a weighted mixture of them, and merged outputs.
    Each node is {name, label, column, color}; an edge (parent, child, weight, text) is drawn thicker
    for a larger weight, with its text (the weight of a mixture's parent) on it."""
    columns: dict[int, list[dict]] = {}
    for n in nodes:
        columns.setdefault(n["column"], []).append(n)
    tallest = max(len(c) for c in columns.values())
    ncol = max(columns) + 1
    pos = {}
    for c, members in columns.items():
        for i, n in enumerate(members):
            pos[n["name"]] = (c, (len(members) - 1) / 2 - i)  # each column centred on y = 0
    with _figure(max(6.0, 3.0 * ncol), max(2.0, 0.42 * tallest + 0.8)) as (fig, (ax,)):
        # a box's half width in data units (a column is about 3 inches; a 7-point character 0.054)
        half = {n["name"]: 0.018 * max(map(len, n["label"].split("\n"))) / 2 + 0.03 for n in nodes}
        for parent, child, w, text in edges:
            (x0, y0), (x1, y1) = pos[parent], pos[child]
            ax.annotate(
                "",
                xy=(x1 - half[child], y1),
                xytext=(x0 + half[parent], y0),
                arrowprops={"arrowstyle": "->", "lw": 0.4 + 2.0 * w, "color": "#4a6fa5", "alpha": 0.7},
            )
            if text:
                ax.text(x0 + 0.62 * (x1 - x0), y0 + 0.62 * (y1 - y0), text, fontsize=6, color="#333")
        for n in nodes:
            x, y = pos[n["name"]]
            ax.text(
                x,
                y,
                n["label"],
                ha="center",
                va="center",
                fontsize=7,
                bbox={"boxstyle": "round,pad=0.3", "fc": n.get("color", "#e8eef7"), "ec": "#4a6fa5"},
            )
        ax.set_xlim(-0.6, ncol - 0.4)
        ax.set_ylim(-tallest / 2 - 0.1, tallest / 2 + 0.1)
        ax.axis("off")
        return _png(fig)
