"""Bootstrap confidence intervals for the scaling fits of eval/scaling.py: the forest's compute multiplier
at each budget and each arm's curve parameters, resampling domains (one draw per replicate, shared by
every run, so arms stay paired) and training seeds (one Gaussian draw per seed, shared by every point
that ran it, `seed_scale`), each arm's seed spread pooled over its budgets by default
(`_pooled_moves`)."""

from __future__ import annotations

import functools
import math
import numbers

import numpy as np

from elmforest.eval.scaling import PowerLawFit, _fit, _one_blas_thread, multiplier
from elmforest.eval.seed_pool import check_seed_pool
from elmforest.utils.errors import Failed, UserError

MIN_POOLED_DF = 3  # fewer degrees of freedom pooled: each point's own spread (`pooled_steps`)


def macro_bpb(run: dict, domains=None) -> float:
    """The run's metric: every domain weighs the same, however much text it has."""
    bpb = run["bpb"]
    domains = sorted(bpb) if domains is None else list(domains)
    missing = [d for d in domains if d not in bpb]
    if missing or not domains:
        raise UserError(
            f"run arm={run.get('arm')!r} budget={run.get('budget')!r} seed={run.get('seed')!r} has no BPB "
            f"for domain(s) {', '.join(map(repr, missing)) or '(none requested)'}"
        )
    for d in domains:  # a NaN saved as null, an inf as "inf" (strict JSON), or a hand edit
        v = bpb[d]
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
            raise UserError(
                f"run arm={run.get('arm')!r} budget={run.get('budget')!r} seed={run.get('seed')!r}: its BPB "
                f"on {d!r} must be a positive finite number, got {v!r}"
            )
    return float(np.mean([bpb[d] for d in domains]))


def _prepare(runs, arms, domains, resample_seeds):
    """Runs of `arms` as a (run x domain) BPB matrix, their FLOPs, and their (arm, budget) points."""
    chosen = [r for r in runs if r.get("arm") in arms]
    for r in chosen:
        lack = [k for k in ("budget", "seed", "flops", "bpb") if k not in r]
        if lack:
            raise UserError(f"a run of arm {r['arm']!r} lacks {', '.join(lack)}: {r!r}")
    for arm in arms:
        if not any(r.get("arm") == arm for r in chosen):
            have = sorted({str(r.get("arm")) for r in runs})
            raise UserError(f"no runs of arm {arm!r}; the runs have arms {', '.join(have) or '(none)'}")
    domains = sorted({d for r in chosen for d in r["bpb"]}) if domains is None else list(domains)
    for r in chosen:
        macro_bpb(r, domains)  # refuses a missing domain or a BPB that is not positive, naming the run
    B = np.array([[r["bpb"][d] for d in domains] for r in chosen], dtype=float)
    flops = np.array([r["flops"] for r in chosen], dtype=float)
    bad = np.flatnonzero(~(np.isfinite(flops) & (flops > 0)))
    if bad.size:
        r = chosen[bad[0]]
        raise UserError(
            f"run arm={r['arm']!r} budget={r['budget']!r} seed={r['seed']!r}: FLOPs must be "
            f"positive and finite, got {r['flops']}"
        )
    points: dict[tuple, list[int]] = {}
    for i, r in enumerate(chosen):
        points.setdefault((r["arm"], r["budget"]), []).append(i)
    for (arm, budget), idx in points.items():
        seeds = [chosen[i].get("seed") for i in idx]
        if len(set(seeds)) != len(seeds):
            raise UserError(f"arm {arm!r} budget {budget!r} has the same seed twice: {seeds}")
        if resample_seeds and len(idx) < 2:
            raise UserError(
                f"arm {arm!r} budget {budget!r} has a single seed ({seeds[0]!r}); the bootstrap's seed part "
                "needs >= 2 within each point (or pass resample_seeds=False)"
            )
    # each point's runs and the index of each one's seed among all the seeds: a replicate draws one weight
    # per seed, shared by every point that ran it (runs of one seed share an initialisation and data
    # order, and a forest shares its seed run with the dense run of its budget: the arms stay paired)
    labels = {s: k for k, s in enumerate(sorted({str(r["seed"]) for r in chosen}))}
    ordered = {p: sorted(i, key=lambda j: str(chosen[j]["seed"])) for p, i in points.items()}
    seeds_of = {p: np.array([labels[str(chosen[j]["seed"])] for j in i]) for p, i in ordered.items()}
    return domains, B, flops, {p: np.array(i) for p, i in ordered.items()}, seeds_of


def seed_scale(n: int) -> float:
    """The per-point seed part (seed_pool "point"): weights w = seed_scale(n) * z, z standard normal
    per seed, move a point's mean by sum_s w_s (x_s - mean), whose variance is then s^2 / n on average,
    the unbiased variance of a mean of n seeds. Drawing the seeds with replacement gives (n - 1)/n of
    it, and with 2 seeds only 3 outcomes: in simulations of the study's design
    (bench/study_ci_coverage.py: 4 dense budgets, 2 seeds, 8 domains, seed noise sized from
    docs/results) its 90% intervals covered the true multiplier 70-82% of the time, 58% where seed noise
    dominates; these weights, 75-93% and 67-73% (one difference per point still estimates the spread:
    `pooled_steps` pools it, 88-95% and 80-83%). Gaussian weights (a wild bootstrap) keep the
    deviations' pattern across points when one draw per seed serves every point that ran it, so arms
    that share a seed stay paired, and give a continuous distribution."""
    return 1.0 / math.sqrt(n * (n - 1)) if n > 1 else 0.0


def pooled_steps(devs: list[np.ndarray], zs: list[np.ndarray], ci: float) -> list[float]:
    """The seed part with the spread pooled over points that share it: point j's mean moves by a
    relative step S / sqrt(n_j) * u_j, S^2 the variance of the relative deviations `devs` (each point's
    runs, or paired differences, from its mean) pooled over the points (sum_j (n_j - 1) degrees of
    freedom), u_j = z_j @ r_j / |r_j| the point's own deviation pattern applied to its seeds' Gaussian
    draws `zs` (standard normal; arms that share a seed stay paired, as in `seed_scale`), widened by
    t_df / z at the CI's upper quantile for the pooled estimate's own noise. One difference per point
    estimates its spread with 1 degree of freedom, which the per-point part (`seed_scale`) takes at
    face value; pooled over an arm of 4 budgets of 2 seeds it has 4. Under `MIN_POOLED_DF` (one row
    of 2 seeds, or two) the t factor alone would be 3.8x at 90%, 25x at 99% (simulated, a one-row
    table's 90% intervals covered 99%): each point then keeps its own spread, as `seed_scale` does.
    A step is applied in log space (x exp(step)), so a large one never makes a BPB negative."""
    df = sum(r.size - 1 for r in devs)
    if df < MIN_POOLED_DF:
        return [seed_scale(r.size) * float(z @ r) for r, z in zip(devs, zs, strict=True)]
    s = math.sqrt(sum(float(r @ r) for r in devs) / df) * _widen(df, ci)
    out = []
    for r, z in zip(devs, zs, strict=True):
        size = math.sqrt(float(r @ r))
        u = z @ r / size if size > 0 else (z[-1] - z[0]) / math.sqrt(2)  # no spread: the seeds' contrast
        out.append(s / math.sqrt(r.size) * float(u))
    return out


@functools.lru_cache(maxsize=64)
def _widen(df: int, ci: float) -> float:
    """t_df / z at the CI's upper quantile (the same for every replicate: computed once)."""
    from scipy.stats import norm, t

    return float(t.ppf((1 + ci) / 2, df) / norm.ppf((1 + ci) / 2))


def domain_widen(n_domains: int, ci: float) -> float:
    """How far a replicate's domain draw is stretched from the mean over every domain (in log space:
    mean x (draw / mean) ** widen): sqrt(D / (D - 1)) for the unbiased variance of a mean of D domains
    (drawing them with replacement gives (D - 1) / D of it), and t_{D-1} / z at the CI's quantile for
    that variance's own noise, as the seed part (`pooled_steps`) has, from MIN_POOLED_DF degrees of
    freedom. Without it, where the forest's gain differs from domain to domain, the 90% intervals of 8
    domains covered the population's multiplier 78-88% of the time (bench/study_ci_coverage.py
    --domain-spread; 88-90% with it)."""
    if n_domains < 2:
        return 1.0
    df = n_domains - 1
    return math.sqrt(n_domains / df) * (_widen(df, ci) if df >= MIN_POOLED_DF else 1.0)


def draw_domains(rng, values: np.ndarray, ci: float) -> np.ndarray:
    """One replicate's draw of the domains (the last axis of `values`, positive BPBs) with replacement,
    its mean stretched from the mean over every domain by `domain_widen`: the same draw for every row."""
    D = values.shape[-1]
    full = values.mean(axis=-1)
    drawn = values[..., rng.integers(0, D, D)].mean(axis=-1)
    return full * (drawn / full) ** domain_widen(D, ci)


def _pooled_moves(m, points, seeds_of, z, ci):
    """`pooled_steps` for each arm's points (its seed spread pooled over its budgets), as moves of m."""
    moves = np.zeros_like(m)
    for arm in {p[0] for p in points}:
        pts = [p for p in points if p[0] == arm]
        devs = [m[points[p]] / m[points[p]].mean() - 1 for p in pts]
        for p, step in zip(pts, pooled_steps(devs, [z[seeds_of[p]] for p in pts], ci), strict=True):
            moves[points[p]] = m[points[p]].mean() * math.expm1(step)
    return moves


def _near(fit: PowerLawFit) -> list[tuple[float, float, float]]:
    """Replicate starts. A replicate perturbs the full data a little, so the full fit's optimum is the
    right basin in nearly every replicate (in trials the full grid found a lower loss in under 1 replicate
    in 300, by ~1%); one more start, steeper with a lower floor, covers the E-alpha trade-off tipping
    over. Two starts instead of the grid's 150 keep 1000 replicates to a few seconds."""
    a, e, al = math.log(fit.A), math.log(fit.E), fit.alpha
    return [(a, e, al), (a, e - 0.5, min(max(al, 0.05) * 2.0, 4.5))]


def _check_boot(n_boot, ci, seed_pool="arm"):
    check_seed_pool(seed_pool)
    if not (isinstance(n_boot, int | np.integer) and n_boot >= 1):
        raise UserError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < ci < 1:
        raise UserError(f"ci must lie strictly between 0 and 1, got {ci}")
    return (1 - ci) / 2, 1 - (1 - ci) / 2


def _replicate_fits(
    B, flops, points, arm, full, n_boot, seed, delta, resample_seeds, seeds_of, seed_pool, ci
):
    """Per replicate: one draw of the domains shared by every run (arms stay paired on the same
    domains), each point's runs moved together by its seed part (one Gaussian draw per seed,
    `seeds_of` naming each run's: a seed's runs move alike at every point that ran it; scaled by the
    arm's pooled spread, `_pooled_moves`, or with seed_pool "point" by the point's own, `seed_scale`),
    and the fit of `arm` on those runs, None when it fails (one bad replicate is counted, never fatal).
    Yields (fit, run metrics)."""
    rng = np.random.default_rng(seed)
    n_seeds = 1 + max(int(s.max()) for s in seeds_of.values())
    for _ in range(n_boot):
        m = draw_domains(rng, B, ci)
        if resample_seeds:
            z = rng.standard_normal(n_seeds)
            if seed_pool == "arm":
                m += _pooled_moves(m, points, seeds_of, z, ci)
            else:
                for p, i in points.items():
                    m[i] += (seed_scale(i.size) * z[seeds_of[p]]) @ (m[i] - m[i].mean())
        idx = np.concatenate([i for p, i in points.items() if p[0] == arm])
        try:
            fit = _fit(flops[idx], m[idx], delta, None, full.c0, _near(full))
        except (Failed, UserError, ArithmeticError):
            fit = None
        yield fit, m


def _full_fit(B, flops, points, arm, delta):
    idx = np.concatenate([i for p, i in points.items() if p[0] == arm])
    return _fit(flops[idx], B.mean(axis=1)[idx], delta, None, None, None)


@_one_blas_thread
def bootstrap_multiplier(
    runs: list[dict],
    forest_arm: str,
    dense_arm: str = "dense",
    n_boot: int = 1000,
    ci: float = 0.90,
    seed: int = 0,
    delta: float = 1e-3,
    domains=None,
    resample_seeds: bool = True,
    seed_pool: str = "arm",
) -> dict:
    """The forest's compute multiplier at each of its budgets, with a percentile CI over domains and
    seeds. An out-of-range replicate counts as the range it is known to lie in (`replicate_range`): above
    the dense range (or unreachable) (c_max/F, inf), below it (0, c_min/F); an interval end it sets is
    that bound, marked open in `ci_open` (a multiplier below the range is not 0.00), and the fractions
    are reported, so a CI reaching inf says the data cannot bound it, not that it is large (the CI may
    hold inf: json writes it as Infinity). Replicates whose fit fails are skipped and
    counted in n_failed. `seed_pool`: each arm's seed spread pooled over its budgets ("arm"), or each
    point's own ("point"; `pooled_steps` says why not)."""
    q = _check_boot(n_boot, ci, seed_pool)
    domains, B, flops, points, seeds_of = _prepare(runs, [dense_arm, forest_arm], domains, resample_seeds)
    forest_pts = sorted((p for p in points if p[0] == forest_arm), key=lambda p: flops[points[p]].mean())
    full = _full_fit(B, flops, points, dense_arm, delta)
    reps, n_failed, flat = {p: [] for p in forest_pts}, 0, full.flat()
    head = dict(domains=domains, n_boot=n_boot, n_failed=n_failed, ci_level=ci, seed=seed, delta=delta)
    if flat:  # no multiplier to bound: each budget says why instead
        ans = {"forest_arm": forest_arm, "dense_arm": dense_arm, **head, "dense_fit": full.to_dict()}
        ans["budgets"] = [
            {
                "budget": p[1],
                "flops": float(flops[points[p]].mean()),
                "bpb": float(B[points[p]].mean()),
                "n_seeds": int(points[p].size),
                "value": None,
                "status": "no_fit",
                "text": f"no multiplier: the dense curve {flat}",
                "dense_compute": None,
                "ci": None,
                "ci_includes_1": False,
                "frac_above_range": None,
                "frac_below_range": None,
            }
            for p in forest_pts
        ]
        return ans
    for fit, m in _replicate_fits(
        B, flops, points, dense_arm, full, n_boot, seed, delta, resample_seeds, seeds_of, seed_pool, ci
    ):
        n_failed += fit is None
        for p in forest_pts if fit else ():
            reps[p].append(replicate_range(multiplier(fit, m[points[p]].mean(), flops[points[p]].mean())))
    out = []
    for p in forest_pts:
        est = multiplier(full, B[points[p]].mean(), flops[points[p]].mean())
        lo, hi, is_open = _interval(reps[p], q)
        d = points.get((dense_arm, p[1]))  # the dense run measured at this budget, if there is one
        check = {}
        if d is not None:  # how far the fit is from it, against how far the forest is: said with the verdict
            measured = float(B[d].mean())
            check = {
                "measured_dense_bpb": measured,
                "fit_miss": float(full.predict(flops[d].mean()) / measured - 1),
                "measured_gain": float(measured / est.forest_bpb - 1),
            }
        out.append(
            {
                **check,
                "budget": p[1],
                "flops": est.forest_flops,
                "bpb": est.forest_bpb,
                "n_seeds": int(points[p].size),
                "value": est.value,
                "status": est.status,
                "text": est.text(),
                "dense_compute": est.dense_compute,
                "ci": None if lo is None else [lo, hi],
                "ci_open": is_open,
                "ci_includes_1": lo is not None and includes(lo, hi, is_open, 1.0),
                "frac_above_range": _share(reps[p], ("above_range", "unreachable")),
                "frac_below_range": _share(reps[p], ("below_range",)),
            }
        )
    head = dict(domains=domains, n_boot=n_boot, n_failed=n_failed, ci_level=ci, seed=seed, delta=delta)
    return {
        "forest_arm": forest_arm,
        "dense_arm": dense_arm,
        **head,
        "dense_fit": full.to_dict(),
        "budgets": out,
    }


@_one_blas_thread
def bootstrap_fit(
    runs: list[dict],
    arm: str,
    n_boot: int = 1000,
    ci: float = 0.90,
    seed: int = 0,
    delta: float = 1e-3,
    domains=None,
    resample_seeds: bool = True,
    seed_pool: str = "arm",
) -> dict:
    """CIs of E, A and alpha for one arm, resampled as in `bootstrap_multiplier`; A is at the full fit's
    c0 in every replicate, so its CI is of one quantity. Wide CIs here are the weak determination of a
    3-parameter fit on few budgets made visible, which is the point of reporting them."""
    q = _check_boot(n_boot, ci, seed_pool)
    domains, B, flops, points, seeds_of = _prepare(runs, [arm], domains, resample_seeds)
    full = _full_fit(B, flops, points, arm, delta)
    fits = [
        f
        for f, _ in _replicate_fits(
            B, flops, points, arm, full, n_boot, seed, delta, resample_seeds, seeds_of, seed_pool, ci
        )
    ]
    v = np.array([(f.E, f.A, f.alpha) for f in fits if f]).reshape(-1, 3)
    out = dict(
        arm=arm, domains=domains, n_boot=n_boot, n_failed=n_boot - len(v), ci_level=ci, seed=seed, delta=delta
    )
    out["fit"] = full.to_dict()
    for j, name in enumerate(("E", "A", "alpha")):
        ends = [float(np.quantile(v[:, j], q[0])), float(np.quantile(v[:, j], q[1]))] if len(v) else None
        out[name] = {"value": getattr(full, name), "ci": ends}
    return out


def replicate_range(mu) -> tuple[float, float, str]:
    """(lowest, highest, status) a replicate's multiplier can be. Out of the dense range it is known only
    to lie past a bound, strictly: below the smallest budget in (0, c_min/F), above the largest (or past
    the fit's floor) in (c_max/F, inf). An interval end set by such a replicate is that bound, open."""
    if mu.status == "ok":
        return mu.value, mu.value, "ok"
    bound = mu.edge_compute / mu.forest_flops
    return (0.0, bound, mu.status) if mu.status == "below_range" else (bound, math.inf, mu.status)


def _interval(reps: list, q: tuple[float, float]) -> tuple[float | None, float | None, list[bool]]:
    """The percentile interval over replicates' ranges: its low end from their lowest values, its high
    end from their highest (each replicate's range holds its multiplier, so the interval holds the
    one its true values would give), and whether each end is an out-of-range bound (open)."""
    if not reps:
        return None, None, [False, False]
    lows, highs, status = zip(*reps, strict=True)
    lo = float(np.quantile(np.array(lows), q[0], method="lower"))
    hi = float(np.quantile(np.array(highs), q[1], method="higher"))
    ok = {v for v, s in zip(lows, status, strict=True) if s == "ok"}
    return lo, hi, [lo not in ok and lo != 0.0, hi not in ok and math.isfinite(hi)]


def includes(lo: float, hi: float, is_open: list[bool], x: float) -> bool:
    """Whether [lo, hi] holds x, an open end (a strict bound) not holding its own value."""
    return (lo < x or (lo == x and not is_open[0])) and (x < hi or (x == hi and not is_open[1]))


def _share(reps: list, statuses: tuple[str, ...]) -> float | None:
    return float(np.mean([r[2] in statuses for r in reps])) if reps else None
