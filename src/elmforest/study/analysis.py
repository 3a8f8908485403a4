"""What a study's runs say: the forest's compute multiplier with its confidence interval (in domain and
out of domain), the gain against the number of domains, the seed share, and each claim of the papers
stated as holds / does not hold / not shown.

The curve fits and the bootstrap are eval/scaling.py's and eval/scaling_bootstrap.py's; here they are applied to the study's records.
A claim "holds" only when its confidence interval excludes the null (a multiplier of 1, a gain of 0);
an interval that includes it is "not shown", whatever the point estimate says.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from elmforest.eval.scaling_bootstrap import (
    bootstrap_fit,
    bootstrap_multiplier,
    draw_domains,
    pooled_steps,
    seed_scale,
)
from elmforest.eval.seed_pool import check_seed_pool
from elmforest.study.config import StudyConfig
from elmforest.utils.errors import UserError


def _runs(recs: list[dict], key: str) -> list[dict]:
    return [
        {"arm": r["arm"], "budget": r["budget"], "seed": r["seed"], "flops": r["flops"], "bpb": r[key]}
        for r in recs
        if r.get(key)
    ]


def multiplier_table(
    recs: list[dict], key: str, cfg: StudyConfig, dense_arm: str = "dense", fitted: dict | None = None
) -> dict | None:
    """The multiplier at every forest budget on one evaluation set (`bpb` or `ood_bpb`) against the
    fitted curve of `dense_arm` (dense, or dense_tuned: its second half at its own LR), and each arm's
    fitted curve with its parameters' intervals. `fitted` keeps each (key, arm)'s curve for the next
    table: the forest's is the same against either dense arm (its bootstrap, 1000 fits, ran twice)."""
    runs = _runs([r for r in recs if r["axis"] == "main"], key)
    if not any(r["arm"] == "btm" for r in runs) or not any(r["arm"] == dense_arm for r in runs):
        return None
    boot = dict(n_boot=cfg.n_boot, ci=cfg.ci, seed_pool=cfg.seed_pool)
    res = bootstrap_multiplier(runs, forest_arm="btm", dense_arm=dense_arm, **boot)
    fitted = {} if fitted is None else fitted
    for arm in (dense_arm, "btm"):
        if (key, arm) not in fitted:
            fitted[key, arm] = bootstrap_fit(runs, arm, **boot)
    res["arm_fits"] = {arm: copy.deepcopy(fitted[key, arm]) for arm in (dense_arm, "btm")}
    res["dense_arm"] = dense_arm
    return res


def _macro(bpb: dict, domains) -> float:
    return float(np.mean([bpb[d] for d in domains]))


def paired_gains(
    rows: list[tuple[list[tuple[dict, dict]], list[str]]],
    n_boot: int,
    ci: float,
    seed: int = 0,
    seed_pool="arm",
) -> list[dict]:
    """For each row (paired runs: same seed, same budget; and its domains) the relative gain
    dense/forest - 1, macro-averaged over the domains, with a bootstrap interval over seeds and domains:
    one domain draw for both arms, and a seed part that moves both arms alike, so the pairs stay paired.
    seed_pool "arm": 1 + gain moves by exp(step), a step of the seeds' paired relative differences
    pooled over the rows (eval/scaling_bootstrap.pooled_steps: a table's rows share how far seeds
    disagree); "point": each row's means by its own seeds' deviations (eval/scaling_bootstrap.seed_scale)."""
    check_seed_pool(seed_pool)
    mats = [
        (
            np.array([[d[x] for x in doms] for d, _ in pairs]),
            np.array([[f[x] for x in doms] for _, f in pairs]),
        )
        for pairs, doms in rows
    ]
    for j, (dense, forest) in enumerate(mats):  # pooled, one bad number would spread to every row
        if not all(np.isfinite(x).all() and (x > 0).all() for x in (dense, forest)):
            raise UserError(f"paired gains: row {j} holds a BPB that is not positive and finite")
    rngs = [np.random.default_rng(seed) for _ in rows]  # one per row: a row's draws are its own
    boots: list[list[float]] = [[] for _ in rows]
    for _ in range(n_boot):
        per_seed, zs = [], []
        for (dense, forest), rng in zip(mats, rngs, strict=True):
            both = draw_domains(rng, np.stack([dense, forest]), ci)  # one draw for both arms
            per_seed.append((both[0], both[1]))
            zs.append(rng.standard_normal(dense.shape[0]))
        if seed_pool == "point":
            for j, ((a, b), z) in enumerate(zip(per_seed, zs, strict=True)):
                w = seed_scale(a.size) * z
                boots[j].append(float((a.mean() + w @ (a - a.mean())) / (b.mean() + w @ (b - b.mean())) - 1))
            continue
        steps = pooled_steps([a / a.mean() - b / b.mean() for a, b in per_seed], zs, ci)
        for j, ((a, b), step) in enumerate(zip(per_seed, steps, strict=True)):
            boots[j].append(float(a.mean() / b.mean() * math.exp(step) - 1))
    out = []
    for (dense, forest), row in zip(mats, boots, strict=True):
        lo, hi = np.quantile(row, [(1 - ci) / 2, (1 + ci) / 2])
        every = np.arange(dense.shape[1])  # every domain, indexed as a replicate's draw is (same rounding)
        gain = float(dense[:, every].mean(axis=1).mean() / forest[:, every].mean(axis=1).mean() - 1)
        out.append({"gain": gain, "ci": [float(lo), float(hi)], "seeds": len(dense)})
    return out


def domain_gains(recs: list[dict], cfg: StudyConfig, dense_arm: str = "dense") -> list[dict]:
    """The forest's gain over the dense LM (`dense_arm`) at the 1x budget against the number of domains
    (each point on its own n domains); the main 1x point stands for all the domains."""
    by_n: dict[int, dict[int, dict]] = {}
    for r in recs:
        if r["budget"] != 1.0 or r["axis"] not in ("main", "domains") or r["seed_share"] != cfg.seed_share:
            continue
        by_n.setdefault(r["n_domains"], {}).setdefault(r["seed"], {})[r["arm"]] = r
    items = []
    for n in sorted(by_n):
        if n not in cfg.domain_counts and n != max(by_n):
            continue
        pairs = [(v[dense_arm], v["btm"]) for v in by_n[n].values() if dense_arm in v and "btm" in v]
        doms = pairs[0][1]["domains"] if pairs else []
        items.append(({"n_domains": n, "domains": doms}, [(d["bpb"], f["bpb"]) for d, f in pairs], doms))
    return _gain_rows(items, cfg)


def _gain_rows(items: list[tuple[dict, list, list]], cfg: StudyConfig) -> list[dict]:
    """A table's rows (row fields, paired runs, domains) of >= 2 pairs with their gains, bootstrapped
    together: with seed_pool "arm" the rows pool their seed spread (`paired_gains`)."""
    items = [it for it in items if len(it[1]) >= 2]
    gains = paired_gains([(pairs, doms) for _, pairs, doms in items], cfg.n_boot, cfg.ci, 0, cfg.seed_pool)
    return [{**row, **g} for (row, _, _), g in zip(items, gains, strict=True)]


def share_table(recs: list[dict], cfg: StudyConfig, dense_arm: str = "dense") -> list[dict]:
    """The forest's gain over the 1x dense run (`dense_arm`) for every seed share."""
    dense = {
        r["seed"]: r for r in recs if r["arm"] == dense_arm and r["axis"] == "main" and r["budget"] == 1.0
    }
    items = []
    for share in sorted({cfg.seed_share, *cfg.seed_shares}):
        forests = [
            r
            for r in recs
            if r["arm"] == "btm" and r["budget"] == 1.0 and r["seed_share"] == share and r["axis"] in ("main", "share")
            and r["n_domains"] == max(x["n_domains"] for x in recs)
        ]  # fmt: skip
        pairs = [(dense[f["seed"]]["bpb"], f["bpb"]) for f in forests if f["seed"] in dense]
        doms = forests[0]["domains"] if forests else []
        bpb = float(np.mean([_macro(f, doms) for _, f in pairs])) if pairs else None
        items.append(({"seed_share": share, "forest_bpb": bpb}, pairs, doms))
    return _gain_rows(items, cfg)


def cbtm_table(recs: list[dict], cfg: StudyConfig, dense_arm: str = "dense") -> list[dict]:
    """c-BTM's gain over the dense run (`dense_arm`) of the same data and budget, for every k x data
    fraction x balance (k = 1, the dense run itself, is 0 by definition)."""
    full = max((r["n_domains"] for r in recs), default=0)
    dense = {
        (r.get("data_fraction", 1.0), r["seed"]): r
        for r in recs
        if r["arm"] == dense_arm and r["budget"] == r.get("data_fraction", 1.0) and r["n_domains"] == full
        and r["seed_share"] == cfg.seed_share and r["axis"] in ("main", "cbtm")
    }  # fmt: skip
    groups: dict[tuple, list] = {}
    for r in recs:
        if r["arm"] == "cbtm":
            groups.setdefault((r["data_fraction"], r["k"], r["balance"]), []).append(r)
    items = []
    for (f, k, balance), rs in sorted(groups.items()):
        pairs = [(dense[(f, r["seed"])]["bpb"], r["bpb"]) for r in rs if (f, r["seed"]) in dense]
        items.append(({"data_fraction": f, "k": k, "balance": balance}, pairs, rs[0]["domains"]))
    return _gain_rows(items, cfg)


def _cbtm_findings(rows: list[dict], against: str = "") -> list[dict]:
    """c-BTM's claims; `against` names the dense arm in each claim ("" for dense at one LR)."""
    out = []
    for balance in sorted({r["balance"] for r in rows}):
        rs = [r for r in rows if r["balance"] == balance]
        fs = sorted({r["data_fraction"] for r in rs})
        if len(fs) < 2:
            continue
        zero = {"k": 1, "gain": 0.0, "ci": [0.0, 0.0]}  # the dense run: k = 1

        def best(f, rs=rs, zero=zero):
            return max([zero, *[r for r in rs if r["data_fraction"] == f]], key=lambda r: r["gain"])

        def at(f, k, rs=rs, zero=zero):
            return next((r for r in rs if r["data_fraction"] == f and r["k"] == k), zero)

        lo_f, hi_f = fs[0], fs[-1]
        b_lo, b_hi = best(lo_f), best(hi_f)
        ev = "; ".join(f"data {f:g}: best k {best(f)['k']} ({best(f)['gain']:+.2%})" for f in fs)
        rival = at(hi_f, b_lo["k"])  # at the most data, the best k of the least data
        # each end clear of the other's choice: the large k wins at the most data, the small at the least
        low_rival = at(lo_f, b_hi["k"])
        both_clear = b_hi["ci"][0] > rival["ci"][1] and b_lo["ci"][0] > low_rival["ci"][1]
        if b_hi["k"] > b_lo["k"] and both_clear:
            v = "holds"
        elif b_hi["k"] < b_lo["k"] and both_clear:
            v = "does not hold"
        else:
            v = "not shown"
        out.append(
            {
                "claim": f"c-BTM ({balance}-balanced{against}): the best number of clusters grows with the data",
                "evidence": ev,
                "verdict": v,
            }
        )
        ev = f"best gain at data {lo_f:g}: {b_lo['gain']:+.2%} {_ci(b_lo)}; at data {hi_f:g}: {b_hi['gain']:+.2%} {_ci(b_hi)}"

        def reach(f, rs=rs, zero=zero):  # the most any k (the dense run too) may gain at f
            return max(r["ci"][1] for r in [zero, *[r for r in rs if r["data_fraction"] == f]])

        out.append(
            {
                "claim": f"c-BTM ({balance}-balanced{against}): the gain over dense grows with the data",
                "evidence": ev,
                # each end's best against every k at the other end, not that end's best point alone: a k
                # whose estimate lost at the least data but whose interval reached past the most data's
                # best left the claim open, and was read as holding
                "verdict": verdict(b_hi["ci"][0] - reach(lo_f), reach(hi_f) - b_lo["ci"][0], 0.0),
            }
        )
        top = max((r for r in rs if r["data_fraction"] == hi_f), key=lambda r: r["k"], default=None)
        if top is not None:
            out.append(
                {
                    "claim": f"c-BTM ({balance}-balanced, {top['k']} clusters, data {hi_f:g}{against}): beats the compute-matched dense LM",
                    "evidence": f"{top['gain']:+.2%} {_ci(top)}",
                    "verdict": verdict(top["ci"][0], top["ci"][1], 0.0),
                }
            )
    return out


def ci_bound(x: float) -> str:
    """A multiplier's interval bound in two decimals, more where two would read as 1.00: the verdict
    turns on which side of 1 it lies, and [1.00, 1.24] was printed both for holds (1.004) and not shown
    (0.997)."""
    for digits in (2, 3, 4, 6):
        s = f"{x:.{digits}f}"
        if float(s) != 1.0 or x == 1.0:
            break
    return s


def _ci(r: dict) -> str:
    return f"[{r['ci'][0]:+.2%}, {r['ci'][1]:+.2%}]"


def verdict(lo: float, hi: float, null: float, is_open: tuple[bool, bool] = (False, False)) -> str:
    """`is_open`: an end that is a strict bound (a multiplier past the dense range): "< 1.00" is below 1."""
    if lo > null or (is_open[0] and lo >= null):
        return "holds"
    if hi < null or (is_open[1] and hi <= null):
        return "does not hold"
    return "not shown"


def ci_text(lo: float, hi: float, is_open=(False, False)) -> str:
    """A multiplier's interval, an open end (an out-of-range bound) written with its side: [0.00, < 1.00]."""
    return f"[{'> ' if is_open[0] else ''}{ci_bound(lo)}, {'< ' if is_open[1] else ''}{ci_bound(hi)}]"


def findings(fits: dict, cfg: StudyConfig) -> list[dict]:
    """The papers' claims, each with the evidence and a verdict."""
    out = []
    for where, label in (
        ("in_domain_tuned", "in domain, against dense with its second half at its own LR"),
        ("ood_tuned", "out of domain, against dense with its second half at its own LR"),
        ("in_domain", "in domain, against dense at one LR"),
        ("ood", "out of domain, against dense at one LR"),
    ):
        table = fits.get(where)
        if not table:
            continue
        for m in table["budgets"]:
            claim = f"BTM ({label}, {m['budget']:g}x budget): the forest equals a dense LM trained with more compute"
            if m["status"] == "no_fit":
                ev, v = m["text"], "not shown"
            elif m["ci"] is None:
                ev, v = f"{m['text']}; no bootstrap replicate could be fitted", "not shown"
            else:
                (lo, hi), is_open = m["ci"], m.get("ci_open") or (False, False)  # (none before 2026-12-07)
                ev = f"{m['text']}, {table['ci_level']:.0%} CI {ci_text(lo, hi, is_open)}"
                v = verdict(lo, hi, 1.0, is_open)
                miss, gain = m.get("fit_miss"), m.get("measured_gain")
                if miss is not None and abs(miss) >= abs(gain):  # the curve cannot tell them apart here
                    ev += (
                        f"; but the dense fit misses the dense run measured at this budget by {miss:+.2%}, "
                        f"as much as the forest differs from that run at the same compute ({gain:+.2%}): "
                        "the multiplier is not determined"
                    )
                    v = "not shown"
                if failed := table.get("n_failed", 0):  # fits that failed are left out of the interval
                    ev += (
                        f"; {failed} of {table['n_boot']} bootstrap replicates could not be fitted (left out)"
                    )
                    if failed / table["n_boot"] > (1 - table["ci_level"]) / 2:  # more than a tail holds:
                        ev += ", more than the interval's tail holds, so it is not determined"  # on one
                        v = "not shown"  # side they could move its bound past 1
            out.append({"claim": claim, "evidence": ev, "verdict": v})
    for suffix, against in TUNED_FIRST:
        out += _gain_findings(fits, suffix, against)
    return out


# (fits key suffix, words in each claim): against the tuned dense runs first, then dense at one LR
TUNED_FIRST = (("_tuned", ", against dense_tuned"), ("", ", against dense at one LR"))


def _gain_findings(fits: dict, suffix: str, against: str) -> list[dict]:
    """The domain-count and seed-share claims against one dense arm (fits' "domains" + suffix, ...)."""
    out = []
    gains = fits.get("domains" + suffix) or []
    if len(gains) >= 2:
        first, last = gains[0], gains[-1]
        rising = all(a["gain"] < b["gain"] for a, b in zip(gains, gains[1:], strict=False))
        ev = "; ".join(
            f"{g['n_domains']} domains {g['gain']:+.2%} [{g['ci'][0]:+.2%}, {g['ci'][1]:+.2%}]" for g in gains
        )
        if rising and last["ci"][0] > first["ci"][1]:
            v = "holds"
        elif not rising and last["gain"] < first["gain"] and last["ci"][1] < first["ci"][0]:
            v = "does not hold"
        else:
            v = "not shown"
        out.append(
            {
                "claim": f"BTM{against}: the forest's gain grows with the number of domains",
                "evidence": ev,
                "verdict": v,
            }
        )
    shares = fits.get("seed_share" + suffix) or []
    if len(shares) >= 2:
        best = max(shares, key=lambda s: s["gain"])
        rest = [s for s in shares if s is not best]
        clear = all(best["ci"][0] > s["ci"][1] for s in rest)  # best beyond every other's interval
        ev = "; ".join(
            f"share {s['seed_share']:g}: {s['gain']:+.2%} [{s['ci'][0]:+.2%}, {s['ci'][1]:+.2%}]"
            for s in shares
        )
        inside = 0.4 <= best["seed_share"] <= 0.6
        v = "not shown" if not clear else ("holds" if inside else "does not hold")
        out.append(
            {"claim": f"BTM{against}: a seed of 40-60% of the budget is best", "evidence": ev, "verdict": v}
        )
    return out


def analyse(recs: list[dict], cfg: StudyConfig) -> dict:
    fitted: dict = {}  # each arm's curve fitted once, shared by the tables against both dense arms
    fits = {
        "in_domain": multiplier_table(recs, "bpb", cfg, fitted=fitted),
        "ood": multiplier_table(recs, "ood_bpb", cfg, fitted=fitted),
        # against the dense runs with their second half at its own LR, as the experts' phase has its own
        "in_domain_tuned": multiplier_table(recs, "bpb", cfg, "dense_tuned", fitted),
        "ood_tuned": multiplier_table(recs, "ood_bpb", cfg, "dense_tuned", fitted),
        "ci": cfg.ci,
        "n_boot": cfg.n_boot,
        "seed_pool": cfg.seed_pool,
    }
    for suffix, _ in TUNED_FIRST:  # every axis against both dense arms (the tuned one's first)
        arm = "dense" + suffix
        fits["domains" + suffix] = domain_gains(recs, cfg, arm)
        fits["seed_share" + suffix] = share_table(recs, cfg, arm)
        fits["cbtm" + suffix] = cbtm_table(recs, cfg, arm)
    fits["findings"] = findings(fits, cfg)
    for suffix, against in TUNED_FIRST:
        fits["findings"] += _cbtm_findings(fits["cbtm" + suffix], against)
    # coverage with 2 seeds: bench/study_ci_coverage.py, docs/benchmarks.md
    if len(cfg.seeds) < 3 and cfg.seed_pool == "arm":
        fits["caveat"] = (
            f"{len(cfg.seeds)} training seeds per point: the seed-to-seed spread is pooled over each arm's "
            "budgets (over a table's rows for the gains) and widened to Student's t; in simulations of the "
            "presets' design the 90% intervals covered the true multiplier 88-95% of the time (80-83% where "
            "seed-to-seed noise dominates) and the true gain 95-96% (91%; 87-88% for the noisiest row of a "
            "table whose rows differ in noise; a table of one row keeps its own spread: 85%); 3 or more "
            "seeds (--set seeds=[0,1,2]) make every interval firmer"
        )
    elif len(cfg.seeds) < 3:
        fits["caveat"] = (
            f"{len(cfg.seeds)} training seeds per point: the seed-to-seed spread is read off one difference "
            f"per point, so the {cfg.ci:.0%} intervals are narrower than they say (in simulations of the "
            "presets' design the 90% ones covered the true multiplier 75-93% of the time and the true gain "
            "85%, 67-73% and 70% where seed-to-seed noise dominates); read holds / does not hold as "
            "indicative: seed_pool=arm pools the spread, and 3 or more seeds (--set seeds=[0,1,2]) make them firmer"
        )
    if few := sorted(n for n in set(cfg.domain_counts) if n < 5):
        # 2 domains: a domain draw has 3 outcomes, an interval that looks tight and excludes 0
        fits["caveat"] = (fits.get("caveat", "") + "; " if "caveat" in fits else "") + (
            f"the gain at {', '.join(map(str, few))} domain(s) is bootstrapped over that few domains: its "
            "domain draw has a handful of outcomes and understates the spread; read it as indicative"
        )
    return fits
