"""How often the study's multiplier intervals cover the truth: a Monte-Carlo of its design.

Each trial draws a synthetic study whose truth is known (every domain on its own saturating power law;
the forest's BPB at compute C is dense's at M * C, so its multiplier is exactly M), adds noise at four
levels in log space (a seed effect shared by every run of that seed, one shared by the dense and forest
runs of a (budget, seed), one per run, one per domain), and runs the study's own analysis on it:
`bootstrap_multiplier` (what `multiplier_table` calls) and `analysis.findings` for the verdict. It reports,
per forest budget, the share of 90% intervals holding M, with its standard error, and the share of
verdicts other than "not shown". The noise levels are sized from docs/results/*/study.json (the mean
absolute difference between a point's two seeds: 0.005-0.009 in macro log-BPB, 0.009-0.013 per domain,
across the four studies). `--seed-pool` picks the seed part (each arm's spread pooled over its budgets,
the default, or each point's own); `--trend a` scales the per-(budget, seed) and per-run noise by
budget^-a, seed noise that is not the same at every budget (which pooling assumes); `--domain-spread s`
gives each domain its own multiplier M exp(s z), the truth then the population's (the domains a sample). `--gains R`
measures instead the paired gains' intervals (domains, seed share, c-BTM: `paired_gains`) on tables of R
rows whose true gain is `--gain` (`--row-noise 1,1,3`: rows whose noise differs, which pooling does not
assume away). Hand-written: no library simulates this design.

    OMP_NUM_THREADS=1 python bench/study_ci_coverage.py --trials 100 --seeds 2 --seed-pool arm
    OMP_NUM_THREADS=1 python bench/study_ci_coverage.py --gains 3 --trials 300 --seed-pool arm
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from elmforest.eval.scaling_bootstrap import bootstrap_multiplier
from elmforest.study.analysis import findings, paired_gains

C1 = 9.92e12  # the cpu preset's 1x budget in FLOPs (any scale would do: the fit works in ratios)
DENSE = [0.5, 1, 2, 4]
FOREST = [0.5, 1, 2]


def draw_domains(rng, n: int):
    e = rng.uniform(0.1, 0.6, n)  # like the in-domain fits: E small, alpha 0.18-0.35
    alpha = rng.uniform(0.18, 0.35, n)
    a = rng.uniform(1.9, 2.9, n) - e  # BPB at 1x of 1.9-2.9
    return e, alpha, a


def population_multiplier(m: float, spread: float, budget: float, n: int = 400_000) -> float:
    """With `--domain-spread`, the multiplier the intervals estimate: the domains are a sample of a
    population, each with its own multiplier m * exp(spread * z); the population's macro BPB at `budget`
    equals the dense LM's at this multiplier (by Monte Carlo over the same domain distribution)."""
    from scipy.optimize import brentq

    rng = np.random.default_rng(12345)
    _, alpha, a = draw_domains(rng, n)
    md = m * np.exp(spread * rng.standard_normal(n))
    want = np.mean(a * (md * budget) ** -alpha)
    return math.exp(brentq(lambda x: np.mean(a * (math.exp(x) * budget) ** -alpha) - want, -5, 5))


def make_runs(
    rng, domains: int, seeds: int, m: float, sig: list[float], trend: float = 0.0, spread: float = 0.0
) -> list[dict]:
    e, alpha, a = draw_domains(rng, domains)
    if spread:  # each domain's own multiplier (the forest's gain differs from domain to domain)
        m = m * np.exp(spread * rng.standard_normal(domains))
    s_seed, s_point, s_run, s_dom = sig
    u = rng.normal(0, s_seed, seeds)
    v = {(b, s): rng.normal(0, s_point * b**-trend) for b in DENSE for s in range(seeds)}
    runs = []
    for arm, budgets, mult in (("dense", DENSE, 1.0), ("btm", FOREST, m)):
        for b in budgets:
            for s in range(seeds):
                bpb = (e + a * (mult * b) ** -alpha) * np.exp(
                    u[s] + v[b, s] + rng.normal(0, s_run * b**-trend) + rng.normal(0, s_dom, domains)
                )
                runs.append(
                    {
                        "arm": arm,
                        "budget": float(b),
                        "seed": s,
                        "flops": b * C1,
                        "bpb": dict(enumerate(bpb.tolist())),
                    }
                )
    for r in runs:
        r["bpb"] = {f"d{k}": v for k, v in r["bpb"].items()}
    return runs


def gain_table(
    rng, scales: list[float], domains: int, seeds: int, gain: float, sig: list[float]
) -> list[tuple]:
    """A table of paired gains, one row per noise scale in `scales` (like the seed shares, or the
    numbers of domains, at one budget): each row's forest is truly `gain` better than its dense run on
    every domain, and the pair shares its seed's effects; each run has its own run and domain noise."""
    out = []
    for scale in scales:
        s_seed, s_point, s_run, s_dom = (scale * s for s in sig)
        truth, pairs = rng.uniform(1.9, 2.9, domains), []
        for _ in range(seeds):
            shared = rng.normal(0, s_seed) + rng.normal(0, s_point)
            d, f = (
                level * np.exp(shared + rng.normal(0, s_run) + rng.normal(0, s_dom, domains))
                for level in (truth, truth / (1 + gain))
            )
            pairs.append(tuple({f"d{k}": v for k, v in enumerate(x.tolist())} for x in (d, f)))
        out.append((pairs, [f"d{k}" for k in range(domains)]))
    return out


def gains(args, sig) -> None:
    scales = [float(x) for x in args.row_noise.split(",")] if args.row_noise else [1.0] * args.gains
    rng, t0, covered = np.random.default_rng(args.rng), time.perf_counter(), []
    for _ in range(args.trials):
        table = gain_table(rng, scales, args.domains, args.seeds, args.gain, sig)
        res = paired_gains(table, args.n_boot, 0.9, seed_pool=args.seed_pool)
        covered.append([g["ci"][0] <= args.gain <= g["ci"][1] for g in res])
    c = np.array(covered, dtype=float)  # table x row; a table's rows share their pooled spread
    se = c.mean(axis=1).std(ddof=1) / math.sqrt(len(c))
    print(
        f"{args.trials} tables of {len(scales)} rows (noise x {scales}), {args.seeds} seeds, {args.domains} domains, "
        f"gain {args.gain}, noise {sig}, {args.n_boot} replicates, seed_pool {args.seed_pool}: "
        f"{time.perf_counter() - t0:.0f} s\n  90% interval covers the gain in {c.mean():.3f} +- {se:.3f} "
        f"(per row: {' / '.join(f'{v:.3f}' for v in c.mean(axis=0))})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--domains", type=int, default=8)
    ap.add_argument("--multiplier", type=float, default=1.0)
    ap.add_argument("--noise", default="0.004,0.004,0.004,0.007", help="seed, (budget, seed), run, domain")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--rng", type=int, default=11)
    ap.add_argument("--seed-pool", default="arm", choices=["arm", "point"])
    ap.add_argument("--trend", type=float, default=0.0, help="multiplier: seed noise scales as budget^-trend")
    ap.add_argument(
        "--domain-spread",
        type=float,
        default=0.0,
        help="multiplier: each domain's is M x exp(spread x z); the truth is the population's",
    )
    ap.add_argument(
        "--gains", type=int, default=0, help="instead: tables of this many paired gains (no --trend)"
    )
    ap.add_argument("--gain", type=float, default=0.01, help="the paired gains' true value")
    ap.add_argument(
        "--row-noise",
        default="",
        help="gains: each row's noise scale, e.g. 1,1,3 (sets the rows, over --gains)",
    )
    args = ap.parse_args()
    sig = [float(x) for x in args.noise.split(",")]
    if args.gains or args.row_noise:
        return gains(args, sig)
    rng, t0 = np.random.default_rng(args.rng), time.perf_counter()
    rows = []
    for _ in range(args.trials):
        runs = make_runs(rng, args.domains, args.seeds, args.multiplier, sig, args.trend, args.domain_spread)
        res = bootstrap_multiplier(runs, "btm", n_boot=args.n_boot, ci=0.9, seed_pool=args.seed_pool)
        verdicts = [f["verdict"] for f in findings({"in_domain": res}, None)]
        rows.append([(b["ci"], v) for b, v in zip(res["budgets"], verdicts, strict=True)])
    print(
        f"{args.trials} trials, {args.seeds} seeds, {args.domains} domains, M={args.multiplier}, noise {sig}, "
        f"domain spread {args.domain_spread}, {args.n_boot} replicates: {time.perf_counter() - t0:.0f} s"
    )
    for j, b in enumerate(FOREST):
        truth = (
            population_multiplier(args.multiplier, args.domain_spread, b)
            if args.domain_spread
            else args.multiplier
        )
        cover = np.mean([ci is not None and ci[0] <= truth <= ci[1] for ci, _ in (t[j] for t in rows)])
        claimed = np.mean([v != "not shown" for _, v in (t[j] for t in rows)])
        se = math.sqrt(cover * (1 - cover) / len(rows))
        print(
            f"  forest {b}x: 90% interval covers M in {cover:.2f} +- {se:.2f}; a verdict other than 'not shown' in {claimed:.2f}"
        )


if __name__ == "__main__":
    main()
