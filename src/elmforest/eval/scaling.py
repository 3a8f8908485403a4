"""Scaling fits of BPB against training FLOPs, and the forest's compute multiplier (issue 13).

A forest that is "better than dense" at one budget says little: the claim worth making is how much
dense compute buys the forest's BPB. So each arm's BPB is fitted with a saturating power law
L(C) = E + A * (C / c0) ** -alpha, and the multiplier is the dense compute whose fitted BPB equals
the forest's, over the forest's own compute. The fit follows Li, Kudugunta & Zettlemoyer 2025
("(Mis)Fitting"), reduced to one variable: log space, a Huber loss, L-BFGS-B from every point of a
grid of starts, the best loss kept; E = exp(e) and A = exp(a) keep both positive without bounds.

With three parameters and a handful of budgets the fit is weakly determined (E and alpha trade off
against each other), so seeds stay separate points rather than being averaged away, nothing is ever
read off the curve outside the compute range it saw, and every number comes with a bootstrap CI.
"""

from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy.optimize import minimize

from elmforest.utils.errors import Failed, UserError

try:  # installed with scikit-learn
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None


def _one_blas_thread(fn):
    """L-BFGS-B's tiny LAPACK calls on a 3-vector cost ~5x more when OpenBLAS wakes its threads for
    each (worse still on a loaded machine), and a fit makes thousands of them. Set once per public
    call: entering the limit costs about as much as one fit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with threadpool_limits(1, "blas") if threadpool_limits else nullcontext():
            return fn(*args, **kwargs)

    return wrapper


# c0 is the geometric mean of the fitted C, so log(C/c0) is centred and A is the reducible loss at a
# typical budget: for BPB ~0.5-5 that is ~0.02-3, hence a from -4 to 1. The e grid covers E of
# 0.37-1.65; log(0.9 * min L) is added per fit, a start just under the data for any BPB scale.
DEFAULT_GRID = {
    "a": [-4.0, -3.0, -2.0, -1.0, 0.0, 1.0],
    "e": [-1.0, -0.5, 0.0, 0.5],
    "alpha": [0.1, 0.3, 0.5, 1.0, 1.5],
}
_BOUNDS = [(-30.0, 30.0), (-30.0, 30.0), (0.0, 5.0)]  # a, e, alpha; a and e only to keep exp finite
# the objective is divided by delta and its minimum can be ~0: L-BFGS-B's default ftol is absolute
# below 1, so it would stop long before noise-free data are fitted
_OPTIONS = {"ftol": 1e-15, "gtol": 1e-10, "maxiter": 1000}
_LBFGSB = {"jac": True, "method": "L-BFGS-B", "bounds": _BOUNDS, "options": _OPTIONS}


def huber_objective(theta, x, y, delta: float) -> tuple[float, np.ndarray]:
    """Σ Huber(log L_hat - log L) and its gradient in theta = (a, e, alpha), with x = log(C/c0) and
    y = log L. Analytic, so that each of the many starts costs tens of evaluations, not hundreds."""
    a, e, alpha = theta
    u = a - alpha * x
    lse = np.logaddexp(u, e)  # log L_hat
    r = lse - y
    wu = np.exp(u - lse)  # d log L_hat / d a; the weight of e is 1 - wu
    c = np.minimum(np.maximum(r, -delta), delta)  # Huber's derivative; its loss is c * (r - c / 2)
    gu = c * wu
    sgu = gu.sum()
    return float(c @ (r - 0.5 * c)), np.array([sgu, c.sum() - sgu, -(gu @ x)])


def _scaled(theta, x, y, delta):
    loss, grad = huber_objective(theta, x, y, delta)
    return loss / delta, grad / delta


@dataclass
class PowerLawFit:
    """L(C) = E + A * (C / c0) ** -alpha, with how well it fits and the compute range it saw: the range
    is what `multiplier` refuses to leave."""

    E: float
    A: float
    alpha: float
    c0: float
    loss: float
    rmse_log: float
    r2_log: float
    n_points: int
    c_min: float
    c_max: float
    init: dict

    def predict(self, C) -> np.ndarray:
        return self.E + self.A * (np.asarray(C, dtype=float) / self.c0) ** -self.alpha

    def compute_for(self, L: float) -> float:
        """The least compute whose predicted loss is at most L (predict's inverse): math.inf when L <= E,
        since the curve only approaches E. A flat curve (alpha = 0) reaches L at no compute or never."""
        L = float(L)
        if L <= self.E:
            return math.inf
        if self.alpha == 0:
            return 0.0 if L >= self.E + self.A else math.inf
        log_c = math.log(self.c0) - (math.log(L - self.E) - math.log(self.A)) / self.alpha
        return math.exp(log_c) if log_c < 709.0 else math.inf

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PowerLawFit:
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise UserError(f"a power-law fit record lacks {', '.join(missing)}")
        conv = {"n_points": int, "init": dict}
        return cls(**{n: conv.get(n, float)(d[n]) for n in names})


def _check_points(C, L) -> tuple[np.ndarray, np.ndarray]:
    C, L = np.asarray(C, dtype=float).ravel(), np.asarray(L, dtype=float).ravel()
    if C.size != L.size:
        raise UserError(f"compute and loss differ in length: {C.size} FLOPs values, {L.size} losses")
    for name, v in (("FLOPs", C), ("loss", L)):
        bad = np.flatnonzero(~(np.isfinite(v) & (v > 0)))
        if bad.size:
            raise UserError(
                f"every {name} value must be positive and finite; point {bad[0]} is {v[bad[0]]:.6g}"
            )
    distinct = np.unique(C)
    if distinct.size < 3:
        raise UserError(
            "a saturating power law has 3 parameters and needs >= 3 distinct compute values; got "
            f"{distinct.size} ({', '.join(f'{c:.3g}' for c in distinct)})"
        )
    return C, L


@_one_blas_thread
def fit_power_law(
    C, L, delta: float = 1e-3, grid: dict | None = None, *, c0: float | None = None, starts=None
) -> PowerLawFit:
    """Fit L(C) from every start of `grid` (DEFAULT_GRID's keys a, e, alpha, each a list; any key given
    replaces the default). `c0` and `starts` (a list of (a, e, alpha)) exist for the bootstrap: its
    replicates keep the full fit's c0, so A stays comparable, and start from near the full fit.

    Every start is run, not just until one converges: the Huber loss in log space has several local
    minima along the E-alpha ridge, and with 3 parameters on few budgets they can be close. Check
    `rmse_log` and `r2_log` before trusting E or alpha; the bootstrap shows how loosely they are held."""
    unknown = set(grid or {}) - set(DEFAULT_GRID)
    if unknown:
        raise UserError(f"unknown grid key(s) {sorted(unknown)}; the grid has a, e and alpha")
    return _fit(C, L, delta, grid, c0, starts)


def _fit(C, L, delta, grid, c0, starts) -> PowerLawFit:
    C, L = _check_points(C, L)
    if not delta > 0:
        raise UserError(f"the Huber delta must be positive, got {delta}")
    c0 = float(np.exp(np.mean(np.log(C)))) if c0 is None else float(c0)
    x, y = np.log(C / c0), np.log(L)
    if starts is None:
        g = {**DEFAULT_GRID, **(grid or {})}
        es = list(g["e"]) + ([] if grid and "e" in grid else [math.log(0.9 * L.min())])
        starts = [(a, e, al) for a in g["a"] for e in es for al in g["alpha"]]
    best = None
    for s in starts:
        try:
            res = minimize(_scaled, np.asarray(s, dtype=float), args=(x, y, delta), **_LBFGSB)
        except (ArithmeticError, ValueError):
            continue
        if np.isfinite(res.fun) and np.all(np.isfinite(res.x)) and (best is None or res.fun < best[0]):
            best = (float(res.fun), res.x, s)
    if best is None:
        raise Failed(f"no start of the power-law fit converged to a finite loss ({len(starts)} tried)")
    a, e, alpha = (float(v) for v in best[1])
    loss, _ = huber_objective(best[1], x, y, delta)
    r = np.logaddexp(a - alpha * x, e) - y
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    ss_res = float(np.sum(r * r))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    return PowerLawFit(
        E=math.exp(e),
        A=math.exp(a),
        alpha=alpha,
        c0=c0,
        loss=loss,
        rmse_log=math.sqrt(ss_res / y.size),
        r2_log=r2,
        n_points=int(y.size),
        c_min=float(C.min()),
        c_max=float(C.max()),
        init=dict(zip(("a", "e", "alpha"), (float(v) for v in best[2]), strict=True)),
    )


@dataclass
class Multiplier:
    """Dense compute reaching the forest's BPB over the forest's compute; `value` is None whenever the
    answer would need the dense curve outside the budgets it was fitted on, and `status` says which side
    ("ok", "above_range", "below_range", "unreachable": BPB <= E, no dense compute reaches it)."""

    value: float | None
    status: str
    dense_compute: float | None
    forest_flops: float
    forest_bpb: float
    edge_compute: float | None = None  # the dense budget an out-of-range status refers to
    dense_floor: float | None = None  # E of the dense fit, for "unreachable"

    def text(self) -> str:
        if self.status == "ok":
            return f"{self.value:.2f}x"
        if self.status == "unreachable":
            return f"unreachable (BPB {self.forest_bpb:.4f} <= dense floor E = {self.dense_floor:.4f})"
        side, which = (">", "largest") if self.status == "above_range" else ("<", "smallest")
        bound = self.edge_compute / self.forest_flops
        return f"{side} the {which} dense budget ({self.edge_compute:.1e} FLOPs, {bound:.2g}x)"


def multiplier(dense: PowerLawFit, forest_bpb: float, forest_flops: float) -> Multiplier:
    """Never extrapolates: the equivalent dense compute must lie within [dense.c_min, dense.c_max]."""
    bpb, ff = float(forest_bpb), float(forest_flops)
    if not (math.isfinite(ff) and ff > 0 and math.isfinite(bpb) and bpb > 0):
        raise UserError(f"a forest point needs positive finite FLOPs and BPB; got {ff} FLOPs, BPB {bpb}")
    c = dense.compute_for(bpb)
    if bpb <= dense.E:
        return Multiplier(None, "unreachable", None, ff, bpb, dense.c_max, dense.E)
    if c > dense.c_max:
        return Multiplier(None, "above_range", None, ff, bpb, dense.c_max, dense.E)
    if c < dense.c_min:
        return Multiplier(None, "below_range", None, ff, bpb, dense.c_min, dense.E)
    return Multiplier(c / ff, "ok", c, ff, bpb, None, dense.E)


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
        macro_bpb(r, domains)  # refuses a missing domain, naming the run
    B = np.array([[r["bpb"][d] for d in domains] for r in chosen], dtype=float)
    flops = np.array([r["flops"] for r in chosen], dtype=float)
    for name, v in (("FLOPs", flops), ("BPB", B.min(axis=1))):
        bad = np.flatnonzero(~(np.isfinite(v) & (v > 0)))
        if bad.size:
            r = chosen[bad[0]]
            raise UserError(
                f"run arm={r['arm']!r} budget={r['budget']!r} seed={r['seed']!r}: {name} must be "
                f"positive and finite, got {r['flops'] if name == 'FLOPs' else r['bpb']}"
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
                f"arm {arm!r} budget {budget!r} has a single seed ({seeds[0]!r}); the bootstrap resamples "
                "seeds within each point and needs >= 2 (or pass resample_seeds=False)"
            )
    # each point's runs in seed order: when every point has the same seeds, a replicate draws the seeds
    # once for all of them (runs of one seed share an initialisation and data order, and a forest shares
    # its seed run with the dense run of its budget, so the arms stay paired on seeds too)
    ordered = {p: sorted(i, key=lambda j: str(chosen[j]["seed"])) for p, i in points.items()}
    paired = len({tuple(str(chosen[j]["seed"]) for j in i) for i in ordered.values()}) == 1
    return domains, B, flops, {p: np.array(i) for p, i in ordered.items()}, paired


def _near(fit: PowerLawFit) -> list[tuple[float, float, float]]:
    """Replicate starts. A replicate perturbs the full data a little, so the full fit's optimum is the
    right basin in nearly every replicate (in trials the full grid found a lower loss in under 1 replicate
    in 300, by ~1%); one more start, steeper with a lower floor, covers the E-alpha trade-off tipping
    over. Two starts instead of the grid's 150 keep 1000 replicates to a few seconds."""
    a, e, al = math.log(fit.A), math.log(fit.E), fit.alpha
    return [(a, e, al), (a, e - 0.5, min(max(al, 0.05) * 2.0, 4.5))]


def _check_boot(n_boot, ci):
    if not (isinstance(n_boot, int | np.integer) and n_boot >= 1):
        raise UserError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < ci < 1:
        raise UserError(f"ci must lie strictly between 0 and 1, got {ci}")
    return (1 - ci) / 2, 1 - (1 - ci) / 2


def _replicate_fits(B, flops, points, arm, full, n_boot, seed, delta, resample_seeds, paired_seeds=False):
    """Per replicate: one draw of the domains shared by every run (arms stay paired on the same
    domains), the seeds drawn with replacement (one draw for every point when they all have the same
    seeds, `paired_seeds`), and the fit of `arm` on the resampled runs,
    None when it fails (one bad replicate is counted, never fatal). Yields (fit, run metrics, picks)."""
    rng = np.random.default_rng(seed)
    D = B.shape[1]
    sizes = {i.size for i in points.values()}
    paired = paired_seeds and len(sizes) == 1
    for _ in range(n_boot):
        m = B @ (np.bincount(rng.integers(0, D, D), minlength=D) / D)
        if not resample_seeds:
            pick = dict(points)
        elif paired:  # one draw of the seeds for every point
            n = next(iter(sizes))
            s = rng.integers(0, n, n)
            pick = {p: i[s] for p, i in points.items()}
        else:
            pick = {p: i[rng.integers(0, i.size, i.size)] for p, i in points.items()}
        idx = np.concatenate([i for p, i in pick.items() if p[0] == arm])
        try:
            fit = _fit(flops[idx], m[idx], delta, None, full.c0, _near(full))
        except (Failed, UserError, ArithmeticError):
            fit = None
        yield fit, m, pick


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
) -> dict:
    """The forest's compute multiplier at each of its budgets, with a percentile CI over domains and
    seeds. An out-of-range replicate counts as +inf (above the dense range, or unreachable) or 0 (below)
    and the fractions are reported, so a CI reaching inf says the data cannot bound it, not that it is
    large (the CI may hold inf: json writes it as Infinity). Replicates whose fit fails are skipped and
    counted in n_failed."""
    q = _check_boot(n_boot, ci)
    domains, B, flops, points, paired = _prepare(runs, [dense_arm, forest_arm], domains, resample_seeds)
    forest_pts = sorted((p for p in points if p[0] == forest_arm), key=lambda p: flops[points[p]].mean())
    full = _full_fit(B, flops, points, dense_arm, delta)
    reps, n_failed = {p: [] for p in forest_pts}, 0
    for fit, m, pick in _replicate_fits(
        B, flops, points, dense_arm, full, n_boot, seed, delta, resample_seeds, paired
    ):
        n_failed += fit is None
        for p in forest_pts if fit else ():
            mu = multiplier(fit, m[pick[p]].mean(), flops[pick[p]].mean())
            reps[p].append(mu.value if mu.status == "ok" else 0.0 if mu.status == "below_range" else math.inf)
    out = []
    for p in forest_pts:
        v, est = np.array(reps[p]), multiplier(full, B[points[p]].mean(), flops[points[p]].mean())
        lo = float(np.quantile(v, q[0], method="lower")) if v.size else None
        hi = float(np.quantile(v, q[1], method="higher")) if v.size else None
        out.append(
            {
                "budget": p[1],
                "flops": est.forest_flops,
                "bpb": est.forest_bpb,
                "n_seeds": int(points[p].size),
                "value": est.value,
                "status": est.status,
                "text": est.text(),
                "dense_compute": est.dense_compute,
                "ci": None if lo is None else [lo, hi],
                "ci_includes_1": lo is not None and lo <= 1.0 <= hi,
                "frac_above_range": float(np.mean(np.isinf(v))) if v.size else None,
                "frac_below_range": float(np.mean(v == 0.0)) if v.size else None,
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
) -> dict:
    """CIs of E, A and alpha for one arm, resampled as in `bootstrap_multiplier`; A is at the full fit's
    c0 in every replicate, so its CI is of one quantity. Wide CIs here are the weak determination of a
    3-parameter fit on few budgets made visible, which is the point of reporting them."""
    q = _check_boot(n_boot, ci)
    domains, B, flops, points, paired = _prepare(runs, [arm], domains, resample_seeds)
    full = _full_fit(B, flops, points, arm, delta)
    fits = [
        f
        for f, _, _ in _replicate_fits(
            B, flops, points, arm, full, n_boot, seed, delta, resample_seeds, paired
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
