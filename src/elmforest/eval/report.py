"""Per-domain result tables for the terminal, and the results plot."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

FLOPS_TOLERANCE = 0.01  # arms whose training FLOPs differ by more than this are flagged


def flops_mark(ratio: float | None) -> str:
    """The training-FLOPs ratio to dense as a cell: flagged with '!' when it is not matched within 1%."""
    if ratio is None:
        return "-"
    return f"{ratio:.3f}" + ("" if abs(ratio - 1) <= FLOPS_TOLERANCE else "!")  # nan: flagged


def _scored(results: dict[str, dict], domain: str) -> str:
    """ "64,012 (9)": the bytes and documents every result scored of `domain` ("varies" where they differ)."""
    seen = {
        (v.get("bytes"), v.get("documents"))
        for r in results.values()
        if (v := r["domains"].get(domain)) and v.get("bytes") is not None
    }
    if len(seen) != 1:
        return "varies" if seen else "-"
    ((b, n),) = seen
    return f"{b:,}" + (f" ({n})" if n is not None else "")


def _over_limit(results: dict[str, dict]) -> list[tuple[str, str, int, int]]:
    """(method, domain, bytes, limit) where a result scored past its byte limit: whole documents are
    kept, so a first document longer than the limit is scored alone, and whole (`bytes` counts its EOS
    as 1)."""
    return [
        (m, d, v["bytes"] - 1, r["max_bytes"])
        for m, r in results.items()
        if r.get("max_bytes")
        for d, v in sorted(r["domains"].items())
        if v.get("documents") == 1 and v.get("bytes") is not None and v["bytes"] - 1 > r["max_bytes"]
    ]


INFERENCE_ROW = "inference FLOPs/token / dense"


def inference_mark(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def print_table(
    results: dict[str, dict],
    title: str = "bits per byte (lower is better)",
    console: Console | None = None,
    flops: dict[str, float] | None = None,
    inference: dict[str, float] | None = None,
) -> None:
    """`results` maps a method name to an eval JSON ({"domains": {...}, "mean_bpb": ...}); `flops` maps
    a method to its training FLOPs over the dense baseline's (a last row, '!' where not matched). Domains
    a result left out (`missing`: no documents in its split) are named under the table. What each domain's
    score rests on (bytes, whole documents) is a column: a few long documents make a noisy score."""
    domains = sorted({d for r in results.values() for d in r["domains"]})
    scored = {d: _scored(results, d) for d in domains}
    # wide enough for every column: a pipe or log file would otherwise get 80 columns and truncated names
    need = (
        max(len(d) for d in domains + ["train FLOPs / dense", INFERENCE_ROW])
        + sum(max(len(m), 7) + 3 for m in results)
        + max(len(s) + 3 for s in [*scored.values(), "bytes (docs)"])
        + 8
    )
    console = console or Console(width=max(need, Console().width))
    table = Table(title=title)
    table.add_column("domain")
    table.add_column("bytes (docs)", justify="right")
    for m in results:
        table.add_column(m, justify="right")
    for d in domains:
        row = [d, scored[d]]
        for r in results.values():
            v = r["domains"].get(d)
            row.append(f"{v['bpb']:.4f}" if v else "-")
        table.add_row(*row)
    table.add_section()
    table.add_row("mean", "", *[f"{r['mean_bpb']:.4f}" for r in results.values()])
    if flops:
        table.add_row("train FLOPs / dense", "", *[flops_mark(flops.get(m)) for m in results])
    if inference:  # what running it costs per token: an ensemble matched in training runs k models
        table.add_row(INFERENCE_ROW, "", *[inference_mark(inference.get(m)) for m in results])
    console.print(table)
    for m, r in results.items():  # a domain without documents in the split must not vanish unnoticed
        if r.get("missing"):
            who = f"{m}: " if len(results) > 1 else ""
            gone = ", ".join(f"{d} ({why})" for d, why in r["missing"].items())
            console.print(f"  {who}left out of the table and the mean: {gone}")
    said: dict[tuple, list[str]] = {}  # one note per (domain, bytes, limit), naming the methods if not all
    for m, d, n, limit in _over_limit(results):
        said.setdefault((d, n, limit), []).append(m)
    for (d, n, limit), methods in said.items():
        who = "" if len(methods) == len(results) else f"{', '.join(methods)}: "
        console.print(
            f"  note: {who}{d}'s first document alone ({n:,} bytes) is longer than the byte limit ({limit:,}): "
            "it is scored on that one whole document",
            soft_wrap=True,  # one line: a log is searched for it
        )
    if flops and any(abs(v - 1) > FLOPS_TOLERANCE for m, v in flops.items() if m in results):
        console.print(
            "  '!': this arm's training FLOPs differ from the dense baseline's by more than "
            f"{FLOPS_TOLERANCE:.0%}: not a compute-matched comparison"
        )


def plot_results(
    results: dict[str, dict],
    path,
    title: str = "bits per byte by domain (lower is better)",
    ood: dict[str, dict] | None = None,
) -> None:
    """Grouped bars: one group per domain (plus the mean), one bar per method; a second panel for the
    out-of-domain sets when given. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from elmforest.utils.io import atomic_path

    panels = [("in-domain (test splits of the training domains)", results)]
    if ood:
        panels.append(("out-of-domain (no model trained on these)", ood))
    widest = max(len({d for r in res.values() for d in r["domains"]}) for _, res in panels) + 1
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.3 * widest), 4.5 * len(panels)), squeeze=False)
    for ax, (label, res) in zip(axes[:, 0], panels, strict=True):
        _bars(ax, res, f"{title}: {label}" if len(panels) > 1 else title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _bars(ax, results: dict[str, dict], title: str) -> None:
    import numpy as np

    domains = sorted({d for r in results.values() for d in r["domains"]}) + ["mean"]
    methods = list(results)
    width = 0.8 / len(methods)
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
    ax.set_title(title, fontsize=10)
    ax.legend(ncol=min(4, len(methods)), fontsize=7)
    ax.grid(axis="y", alpha=0.3)
