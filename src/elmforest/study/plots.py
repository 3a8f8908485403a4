"""A study's plots: BPB against training FLOPs with each arm's fitted curve, the multiplier against the
budget, the gain against the number of domains and c-BTM's gain against k for each data size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from elmforest.eval.scaling import PowerLawFit
from elmforest.utils.io import atomic_path

ARM_STYLE = {
    "dense": ("tab:gray", "o", "dense (one LR)"),
    "dense_tuned": ("tab:blue", "D", "dense, second half at its own LR where it wins on valid"),
    "btm": ("tab:green", "s", "BTM forest (ensemble)"),
}


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_curves(recs: list[dict], fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [(k, t) for k, t in (("bpb", "in domain"), ("ood_bpb", "out of domain")) if fits.get(_where(k))]
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 4.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], sets, strict=True):
        main = [r for r in recs if r["axis"] == "main" and r.get(key)]
        for arm, (color, marker, label) in ARM_STYLE.items():
            pts = [(r["flops"], np.mean(list(r[key].values()))) for r in main if r["arm"] == arm]
            if not pts:
                continue
            c, b = np.array(pts).T
            ax.scatter(c, b, color=color, marker=marker, label=label, alpha=0.8)
            tables = (fits[_where(key)], fits.get(_where(key) + "_tuned") or {})
            fit = next((t["arm_fits"][arm] for t in tables if arm in (t.get("arm_fits") or {})), None)
            if fit:
                f = PowerLawFit.from_dict(fit["fit"])
                grid = np.geomspace(c.min() / 1.2, c.max() * 1.2, 100)
                ax.plot(grid, f.predict(grid), color=color, lw=1.2)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("mean bits per byte (macro over domains)")
        ax.set_title(f"BPB vs training compute, {title}")
        ax.legend()
    _save(fig, path)


def _where(key: str) -> str:
    return "in_domain" if key == "bpb" else "ood"


def plot_multiplier(fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    series = (
        ("in_domain_tuned", "in domain, vs dense_tuned"),
        ("ood_tuned", "out of domain, vs dense_tuned"),
        ("in_domain", "in domain, vs dense at one LR"),
        ("ood", "out of domain, vs dense at one LR"),
    )
    for (where, label), dx, color in zip(
        series, (0.94, 0.98, 1.02, 1.06), ("C0", "C1", "C7", "C3"), strict=True
    ):
        t = fits.get(where)
        if not t:
            continue
        # a measured multiplier with its interval (an unbounded end drawn to the top); a budget whose
        # equivalent dense compute lies outside the dense budgets only as the bound it is known to pass
        # (a triangle pointing away); one with no multiplier (unreachable, a flat dense fit) not at all
        bs = [m for m in t["budgets"] if m["status"] == "ok" and m["ci"] is not None]
        fit = t["dense_fit"]
        edge = {"above_range": (fit["c_max"], "^"), "below_range": (fit["c_min"], "v")}
        if bs:
            x = np.array([m["budget"] for m in bs]) * dx
            y = np.array([m["value"] for m in bs], dtype=float)
            finite = [v for m in bs for v in m["ci"] if np.isfinite(v)]
            top = 10 * max([1.0, *finite])
            lo = np.array([min(m["ci"][0], top) for m in bs])
            hi = np.array([min(m["ci"][1], top) for m in bs])
            y = np.clip(y, lo, hi)
            ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o-", capsize=4, label=label, color=color)
            for xi, m in zip(x, bs, strict=True):  # an end drawn at the top is not a bound: marked so
                if m["ci"][1] > top:
                    ax.annotate("∞", (xi, top), ha="center", va="bottom", color=color)
        for status, (c, marker) in edge.items():
            out = [m for m in t["budgets"] if m["status"] == status]
            if out:
                ax.scatter(
                    [m["budget"] * dx for m in out],
                    [c / m["flops"] for m in out],
                    marker=marker,
                    color=color,
                    label=f"{label}: {'>' if marker == '^' else '<'} the dense budgets' bound",
                )
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("forest budget (x the 1x dense run)")
    ax.set_ylabel("compute multiplier (dense FLOPs / forest FLOPs)")
    ax.set_title(f"the forest's compute multiplier, {fits['ci']:.0%} CI")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    _save(fig, path)


def plot_domains(fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    counts = []
    for suffix, fmt, label in (("_tuned", "D-", "over dense_tuned"), ("", "o--", "over dense at one LR")):
        g = fits.get("domains" + suffix) or []
        if g:
            n = [x["n_domains"] for x in g]
            y = np.array([x["gain"] for x in g]) * 100
            lo = np.array([x["ci"][0] for x in g]) * 100
            hi = np.array([x["ci"][1] for x in g]) * 100
            ax.errorbar(n, y, yerr=[y - lo, hi - y], fmt=fmt, capsize=4, label=label)
            counts += n
    ax.axhline(0.0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    _integer_ticks(ax, counts)
    ax.legend(fontsize=8)
    ax.set_xlabel("domains (one expert each)")
    ax.set_ylabel("gain over dense at 1x budget (%)")
    ax.set_title("BTM's gain vs the number of domains")
    _save(fig, path)


def _integer_ticks(ax, values) -> None:
    """A tick at each count measured, written as the count (a log axis wrote 2^1, 2^2 and left a
    3-domain point without one)."""
    if values:
        ticks = sorted(set(values))
        ax.set_xticks(ticks, [str(v) for v in ticks])
        ax.minorticks_off()


def plot_cbtm(fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # against the tuned dense runs where the study has them at every point (a study.json from before
    # every axis had them holds only the 1x point's)
    keys = [
        {(r["data_fraction"], r["k"], r["balance"]) for r in fits.get(k) or []}
        for k in ("cbtm", "cbtm_tuned")
    ]
    tuned = bool(keys[1]) and keys[1] >= keys[0]
    rows = fits.get("cbtm_tuned" if tuned else "cbtm") or []
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (f, balance), style in zip(
        sorted({(r["data_fraction"], r["balance"]) for r in rows}),
        ["o-", "s--", "^-", "v--", "D-", "x--"] * 4,
        strict=False,
    ):
        rs = sorted(
            (r for r in rows if r["data_fraction"] == f and r["balance"] == balance), key=lambda r: r["k"]
        )
        k = [1] + [r["k"] for r in rs]
        y = np.array([0.0] + [r["gain"] for r in rs]) * 100
        lo = np.array([0.0] + [r["ci"][0] for r in rs]) * 100
        hi = np.array([0.0] + [r["ci"][1] for r in rs]) * 100
        ax.errorbar(k, y, yerr=[y - lo, hi - y], fmt=style, capsize=3, label=f"data {f:g}, {balance}")
    ax.axhline(0.0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    _integer_ticks(ax, [1] + [r["k"] for r in rows])
    ax.set_xlabel("clusters k (k = 1: the dense run)")
    ax.set_ylabel(f"gain over {'dense_tuned' if tuned else 'dense'} at the same data and compute (%)")
    ax.set_title("c-BTM: gain vs k for each amount of data")
    ax.legend(fontsize=8)
    _save(fig, path)
