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
from dataclasses import asdict, dataclass, fields, replace

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
        since the curve only approaches E (within rounding of E too: a fit's E is only known to ~1e-15).
        A flat curve (alpha = 0) reaches L at no compute or never."""
        L = float(L)
        if L - self.E <= 1e-12 * max(1.0, abs(self.E)):
            return math.inf
        if self.alpha == 0:
            return 0.0 if L >= self.E + self.A else math.inf
        log_c = math.log(self.c0) - (math.log(L - self.E) - math.log(self.A)) / self.alpha
        return math.exp(log_c) if log_c < 709.0 else math.inf

    def flat(self) -> str | None:
        """Why this curve cannot convert BPB into compute, or None: a dense curve that does not fall
        with compute (alpha at its bound 0) maps any BPB to no compute or to never, and a multiplier
        read off it would be the fit's artefact, not a finding ((Mis)Fitting); e.g. out-of-domain BPB
        that rises with training. R^2 is no test here: the Huber fit rightly ignores one outlier that
        alone can push R^2 below 0 on a curve that clearly falls."""
        if self.alpha <= 1e-6:
            return f"does not fall with compute (alpha {self.alpha:.2g}, R^2(log) {self.r2_log:.2f})"
        return None

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


# Fits already made in this process, by their exact inputs. A study fits the same points many times:
# each dense arm's curve (and its bootstrap replicates, drawn alike) once per forest arm it is compared
# with and again for its own parameters' intervals, the forest's curve once per dense arm, and a rerun
# of the analysis all of them again; the fit is a pure function of its inputs, so a repeat is looked up
# (the tiny study's analysis took 2/3 of its test's time). Bounded: emptied when full.
_FITS: dict[tuple, PowerLawFit] = {}
_FITS_MAX = 50_000


def _fit(C, L, delta, grid, c0, starts) -> PowerLawFit:
    C, L = _check_points(C, L)
    if not delta > 0:
        raise UserError(f"the Huber delta must be positive, got {delta}")
    c0 = float(np.exp(np.mean(np.log(C)))) if c0 is None else float(c0)
    if starts is None:
        g = {**DEFAULT_GRID, **(grid or {})}
        es = list(g["e"]) + ([] if grid and "e" in grid else [math.log(0.9 * L.min())])
        starts = [(a, e, al) for a in g["a"] for e in es for al in g["alpha"]]
    key = (C.tobytes(), L.tobytes(), float(delta), c0, tuple(tuple(map(float, s)) for s in starts))
    if (hit := _FITS.get(key)) is None:
        if len(_FITS) >= _FITS_MAX:
            _FITS.clear()
        hit = _FITS[key] = _fit_from(C, L, delta, c0, starts)
    return replace(hit, init=dict(hit.init))  # a caller's change to its copy stays its own


def _fit_from(C, L, delta, c0, starts) -> PowerLawFit:
    x, y = np.log(C / c0), np.log(L)
    ends = []
    for s in starts:
        try:
            res = minimize(_scaled, np.asarray(s, dtype=float), args=(x, y, delta), **_LBFGSB)
        except (ArithmeticError, ValueError):
            continue
        if np.isfinite(res.fun) and np.all(np.isfinite(res.x)):
            ends.append((float(res.fun), res.x, s))
    if not ends:
        raise Failed(f"no start of the power-law fit converged to a finite loss ({len(starts)} tried)")
    best = _least_squares_of_the_best(ends, x, y)
    res = minimize(_tie_broken, best[1], args=(x, y, delta), **_LBFGSB)  # one point of a flat optimum
    if np.isfinite(res.fun) and np.all(np.isfinite(res.x)):
        best = (best[0], res.x, best[2])
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


_TIE = 1e-3  # the squared error's weight in the polish, against the Huber loss's (both over delta)


def _tie_broken(theta, x, y, delta):
    """The Huber loss plus a little of the squared error, from the best start: a unique point. With
    seeds straddling the curve at every budget and the Huber delta below their spread, every curve
    passing between each pair has the same Huber loss: a flat region L-BFGS-B stops anywhere in, and
    the first start to reach it won, so E, alpha and the multiplier moved with the order of the points
    (by up to 0.06x out of domain on the recorded studies). The squared error picks the curve nearest
    the points inside that region, and moves a fit with a unique optimum by O(_TIE * delta)."""
    a, e, alpha = theta
    u = a - alpha * x
    lse = np.logaddexp(u, e)
    r = lse - y
    wu = np.exp(u - lse)
    loss, grad = huber_objective(theta, x, y, delta)
    g = 2 * r * wu
    grad_sq = np.array([g.sum(), 2 * r.sum() - g.sum(), -(g @ x)])
    return (loss + _TIE * float(r @ r)) / delta, (grad + _TIE * grad_sq) / delta


def _least_squares_of_the_best(ends: list, x, y):
    """The start whose end has the least squared error among those at the lowest Huber loss (within
    1e-9 of it, relative): where the polish (_tie_broken) begins."""
    low = min(f for f, _, _ in ends)
    tied = [t for t in ends if t[0] <= low + 1e-9 * max(abs(low), 1e-300)]

    def sq(theta) -> float:
        a, e, alpha = theta
        return float(np.sum((np.logaddexp(a - alpha * x, e) - y) ** 2))

    return min(tied, key=lambda t: (sq(t[1]), tuple(t[1])))


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
        if self.status == "unreachable":  # said from what was measured first: E is itself extrapolated
            return (
                f"> {self.edge_compute / self.forest_flops:.2g}x (above the largest dense budget, "
                f"{self.edge_compute:.1e} FLOPs; below even the dense fit's floor, BPB "
                f"{self.forest_bpb:.4f} <= E = {self.dense_floor:.4f}: on the fitted curve unreachable)"
            )
        # the bound on the multiplier first: "< the smallest dense budget (.., 1x)" read as a budget
        side, where = (
            (">", "above the largest") if self.status == "above_range" else ("<", "below the smallest")
        )
        bound = self.edge_compute / self.forest_flops
        return f"{side} {bound:.2g}x ({where} dense budget, {self.edge_compute:.1e} FLOPs)"


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
