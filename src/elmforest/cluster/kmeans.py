"""Balanced k-means: every cluster gets (about) N/K members, enforced by a balanced assignment.

The assignment step is a capacity-constrained linear assignment solved with the auction
algorithm (Bertsekas), as c-BTM does following BASE layers: points bid for clusters, a full
cluster keeps its highest bidders and raises its price, and outbid points bid again. With bid
increment eps the result is within N·eps of the optimal total score.

The initial centres are scikit-learn's k-means++ (greedy, seeded by `seed`) rather than a copy of
our own; `assign_labels` is the one rule for documents that cannot be vectorised, used by both
`Clusterer.assign` and `cluster assign`.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from elmforest.utils.errors import Failed, UserError


def balanced_assign(
    scores: np.ndarray,
    capacity: np.ndarray | int,
    eps: float | None = None,
    max_rounds: int = 100_000,
    prices: np.ndarray | None = None,
) -> np.ndarray:
    """Labels [N] maximising Σ scores[i, label_i] with at most capacity[j] points in cluster j.

    `prices` (length K, updated in place) warm-starts the auction, e.g. from the previous k-means
    iteration, whose centres moved little: far fewer rounds. Only a cold start (prices None or 0)
    carries the N·eps optimality bound when some cluster ends below capacity.
    """
    n, k = scores.shape
    cap = np.full(k, capacity, dtype=np.int64) if np.isscalar(capacity) else np.asarray(capacity, np.int64)
    if cap.sum() < n:
        raise UserError(f"capacities sum to {cap.sum()} < {n} points")
    if eps is None:
        spread = float(scores.max() - scores.min()) if n else 1.0
        eps = max(spread, 1e-12) / (4.0 * max(n, 1))
    scores = scores.astype(np.float64)
    if prices is None:
        price = np.zeros(k)
    else:  # only price differences matter: shift so the cheapest cluster costs 0
        finite = prices[np.isfinite(prices)]
        price = prices - (finite.min() if finite.size else 0.0)
    label = np.full(n, -1, dtype=np.int64)
    bid_of = np.zeros(n)  # the price each assigned point paid
    full_clusters = cap <= 0
    price[full_clusters] = np.inf  # zero-capacity clusters never take anyone
    unassigned = np.arange(n)
    members = [(np.zeros(0), np.zeros(0, np.int64))] * k  # each cluster's (-bid, index), sorted
    rounds = 0
    while unassigned.size:
        rounds += 1
        if rounds > max_rounds:
            raise Failed("balanced assignment did not converge")
        v = scores[unassigned] - price
        best = np.argmax(v, axis=1)
        v_best = v[np.arange(len(unassigned)), best]
        v[np.arange(len(unassigned)), best] = -np.inf
        v_second = v.max(axis=1) if k > 1 else v_best
        v_second = np.where(np.isfinite(v_second), v_second, v_best)
        bids = price[best] + (v_best - v_second) + eps
        evicted = []
        by_cluster = np.argsort(best, kind="stable")  # each cluster's bidders, in bidding order
        clusters, starts = np.unique(best[by_cluster], return_index=True)
        for j, group in zip(clusters, np.split(by_cluster, starts[1:]), strict=True):
            newcomers, offers = unassigned[group], bids[group]
            na, idx = members[j]
            excess = len(idx) + len(newcomers) - cap[j]
            n_base = max(len(idx) - max(excess, 0), 0)
            # Only the `excess` lowest members can lose their place. Ties go to members before newcomers,
            # members by index: the order of one stable sort of every member (by index) and newcomer.
            tail = idx[n_base:]
            cand = np.concatenate([tail, newcomers])
            amounts = np.concatenate([bid_of[tail], offers])
            order = np.argsort(-amounts, kind="stable") if excess > 0 else np.arange(len(cand))
            n_keep = len(cand) - max(excess, 0)
            keep, drop = cand[order[:n_keep]], cand[order[n_keep:]]
            if excess > 0:  # the lowest accepted bid
                price[j] = min(
                    amounts[order[n_keep - 1]] if n_keep else np.inf, -na[n_base - 1] if n_base else np.inf
                )
            label[keep] = j
            bid_of[newcomers] = offers
            label[drop] = -1
            evicted.append(drop)
            members[j] = _merged(na[:n_base], idx[:n_base], -bid_of[keep], keep)
        unassigned = np.concatenate(evicted) if evicted else unassigned[:0]
    if prices is not None:
        prices[:] = price
    return label


def _merged(na: np.ndarray, idx: np.ndarray, add_na: np.ndarray, add_idx: np.ndarray):
    """(na, idx) sorted by (na, idx) with the pairs (add_na, add_idx) inserted: a copy of the members,
    not a sort of them, so a bid costs the cluster's size in memory moves and the bids' in comparisons."""
    if len(add_na) == 1:  # most bids late in an auction: one place found, two copies made
        pos = int(na.searchsorted(add_na[0]))
        if (hi := int(na.searchsorted(add_na[0], "right"))) > pos:  # equal bids: by index
            pos += int(idx[pos:hi].searchsorted(add_idx[0]))
        return np.concatenate((na[:pos], add_na, na[pos:])), np.concatenate((idx[:pos], add_idx, idx[pos:]))
    order = np.lexsort((add_idx, add_na))
    add_na, add_idx = add_na[order], add_idx[order]
    pos = na.searchsorted(add_na, "left")
    for t in np.flatnonzero(na.searchsorted(add_na, "right") > pos):  # equal bids: by index
        hi = na.searchsorted(add_na[t], "right")
        pos[t] += idx[pos[t] : hi].searchsorted(add_idx[t])
    at = pos + np.arange(len(pos))  # where each lands in the merged arrays (np.insert, without its overhead)
    old = np.ones(len(na) + len(at), dtype=bool)
    old[at] = False
    out_na, out_idx = np.empty(len(old)), np.empty(len(old), dtype=np.int64)
    out_na[at], out_idx[at], out_na[old], out_idx[old] = add_na, add_idx, na, idx
    return out_na, out_idx


def weighted_balanced_assign(
    scores: np.ndarray,
    weights: np.ndarray,
    capacity: np.ndarray | float,
    rounds: int = 300,
    exact: bool = True,
) -> np.ndarray:
    """_relaxed_assign's labels; on a small instance (N·K <= EXACT_SMALL, `exact`) the exact optimum
    where the solver finds it within seconds: the relaxation's worst case there lost 0.4 of a score
    spread per document (an audit, 1,500 random instances of 8 documents), where corpora's many
    documents lose ~1e-3 (docs/cbtm.md). k-means steps pass exact=False: a solve can take its 5 s."""
    labels = _relaxed_assign(scores, weights, capacity, rounds)
    n, k = scores.shape
    if exact and 0 < n * k <= EXACT_SMALL and not (labels == scores.argmax(1)).all():  # (argmax: optimal)
        w = np.asarray(weights, dtype=np.float64)
        cap = np.broadcast_to(np.asarray(capacity, dtype=np.float64), (k,)).copy()
        s = scores.astype(np.float64)
        exact = _exact(s, w, cap, time_limit=5.0)
        rows = np.arange(n)
        if exact is not None and s[rows, exact].sum() > s[rows, labels].sum():
            return exact
    return labels


EXACT_SMALL = 2_000  # documents x clusters where the relaxation's result is checked against the optimum


def _relaxed_assign(
    scores: np.ndarray, weights: np.ndarray, capacity: np.ndarray | float, rounds: int = 300
) -> np.ndarray:
    """Labels [N] maximising Σ scores[i, label_i] with each cluster's total *weight* (a document's bytes
    or tokens) at most capacity[j]: c-BTM balanced by size, not by count.

    Hand-written because no library solves it at corpus scale: with weights the exact problem is a
    generalised assignment (NP-hard), so this takes its Lagrangian relaxation. Each cluster has a price
    per unit of weight; every document goes where score - price x weight is highest, and the prices of
    overfull clusters rise until the loads fit (dual subgradient steps, shrinking). Where no pass fits
    (most instances), a repair moves, out of any cluster still over its capacity, the documents that
    lose least score per unit of weight to their best cluster with room, from the last pass and else
    from the pass least over its caps. Where neither can make room (a few large documents and little
    slack), they are placed largest first, each in its best cluster with room, and said; where that
    corners itself, a small instance (N·K <= EXACT_MAX) is solved exactly (scipy's MILP, HiGHS), and
    only an instance that does not pack raises. With equal weights it is an ordinary balanced
    assignment, up to the relaxation's gap.
    """
    n, k = scores.shape
    w = np.asarray(weights, dtype=np.float64)
    cap = np.broadcast_to(np.asarray(capacity, dtype=np.float64), (k,)).copy()
    if w.shape != (n,) or not (np.isfinite(w).all() and (w > 0).all()):
        raise UserError("weights must be one positive number per document")
    if cap.sum() < w.sum() * (1 - 1e-12) or (n and cap.max() < w.max()):
        raise UserError(
            f"capacities (sum {cap.sum():.6g}, largest {cap.max():.6g}) cannot hold the documents "
            f"(total {w.sum():.6g}, largest {w.max() if n else 0:.6g})"
        )
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    scores = scores.astype(np.float64)
    unit = w.mean()
    wn = w / unit  # prices are per mean document, so steps are on the scores' scale
    price = np.zeros(k)
    step = max(float(scores.max() - scores.min()), 1e-12)
    labels = scores.argmax(1)
    best, best_score = None, -np.inf
    least_over, least = labels, np.inf
    rows = np.arange(n)
    for _ in range(rounds):
        labels = np.argmax(scores - price[None, :] * wn[:, None], axis=1)
        over = np.bincount(labels, weights=w, minlength=k) - cap
        if (excess := float(np.maximum(over, 0).sum())) < least:
            least_over, least = labels, excess
        if (over <= 0).all():  # feasible: keep the best such iterate, and lower the prices that bind
            total = float(scores[rows, labels].sum())
            if total > best_score:
                best, best_score = labels.copy(), total
            if not (price > 0).any():
                return labels  # nothing priced: the unconstrained optimum fits
        price = np.maximum(0.0, price + step * over / cap.mean())
        step *= 0.97
    if best is not None:
        return best
    for start in (labels,) if least_over is labels else (labels, least_over):
        if (fixed := _repaired(scores, w, wn, cap, start.copy())) is not None:
            return fixed
    print(
        f"note: the size-balanced assignment could not be repaired ({n:,} documents, {k} clusters, a few too "
        "large for the slack): documents placed largest first, each in its best cluster with room; more "
        "slack gives clusters closer to the centres",
        file=sys.stderr,
    )
    try:
        return _largest_first(scores, w, cap)
    except UserError:  # cornered: a small instance may still pack (an exact solve takes seconds, or more)
        if n * k <= EXACT_MAX and (exact := _exact(scores, w, cap)) is not None:
            return exact
        raise


EXACT_MAX = 20_000  # documents x clusters solved exactly where nothing else packs them


def assign_by_bytes(
    scores: np.ndarray, w: np.ndarray, slack: float, exact: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, the caps they keep) under byte_caps; where those do not pack (a document's own cluster
    held to its size leaves the others a tight packing: 1000, 1, 1, 1 bytes in 3 clusters), the other
    clusters may hold up to the largest document's size or (1 + slack) W/K, as one cap for all did."""
    caps = byte_caps(scores, w, slack)
    try:
        return weighted_balanced_assign(scores, w, caps, exact=exact), caps
    except UserError:
        loose = np.where(caps < w.max(), max(float(w.sum()) / len(caps) * (1 + slack), float(w.max())), caps)
        if np.array_equal(loose, caps):
            raise
        print(
            "note: the documents did not pack under caps that give each document over (1 + slack)/K of "
            "the text a cluster of its own: the other clusters may hold up to the largest one's size",
            file=sys.stderr,
        )
        return weighted_balanced_assign(scores, w, loose, exact=exact), loose


def byte_caps(scores: np.ndarray, w: np.ndarray, slack: float) -> np.ndarray:
    """Each cluster's cap on the bytes it holds: (1 + slack) W/K, except that a document larger than
    that takes a cluster of its own (its best-scoring one still free, largest document first), capped
    at its size, and the other clusters share the rest's bytes so. One cap for all, raised to the
    largest document, let every cluster grow to it (an audit: 54% of the text in one of 3 clusters).
    Terminates: the m documents over a cap sum to more than m caps, so m < the clusters still free."""
    if not slack >= 0:
        raise UserError(f"slack must be a non-negative number, got {slack!r}")
    k = scores.shape[1]
    cap = np.zeros(k)
    free, rest = np.ones(k, bool), np.ones(len(w), bool)
    while True:
        base = float(w[rest].sum()) / int(free.sum()) * (1 + slack)
        big = np.flatnonzero(rest & (w > base))
        if big.size == 0:
            cap[free] = base
            return cap
        for i in big[np.argsort(-w[big], kind="stable")]:
            open_ = np.flatnonzero(free)
            j = open_[np.argmax(scores[i, open_])]
            cap[j], free[j], rest[i] = w[i], False, False


def _repaired(scores: np.ndarray, w: np.ndarray, wn: np.ndarray, cap: np.ndarray, labels: np.ndarray):
    """`labels` with documents moved out of every cluster over its capacity, those losing least score
    per unit of weight first, each to its best cluster with room; None where that cannot make room."""
    load = np.bincount(labels, weights=w, minlength=len(cap))
    for j in np.argsort(cap - load):  # the most overfull first
        if load[j] <= cap[j]:
            continue
        members = np.flatnonzero(labels == j)
        alt_scores = scores[members].copy()
        alt_scores[:, j] = -np.inf
        best_alt = alt_scores.argmax(1)
        loss = (scores[members, j] - alt_scores[np.arange(len(members)), best_alt]) / wn[members]
        for i in members[np.argsort(loss, kind="stable")]:
            if load[j] <= cap[j]:
                break
            room = cap - load
            room[j] = -np.inf
            fits = np.flatnonzero(room >= w[i])
            if fits.size == 0:
                continue
            to = fits[np.argmax(scores[i, fits])]
            labels[i], load[j], load[to] = to, load[j] - w[i], load[to] + w[i]
        if load[j] > cap[j] * (1 + 1e-9):
            return None
    return labels


def _exact(scores: np.ndarray, w: np.ndarray, cap: np.ndarray, time_limit: float = 60.0) -> np.ndarray | None:
    """The generalised assignment solved exactly (a MILP; a small instance only: it is NP-hard). None
    where the solver finds no assignment within its time limit."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array, eye, kron

    n, k = scores.shape
    one_each = kron(eye(n), np.ones((1, k)), format="csr")  # x[i*k + j]: document i in cluster j
    loads = csr_array((np.repeat(w, k), (np.tile(np.arange(k), n), np.arange(n * k))), shape=(k, n * k))
    sys.stdout.flush()  # HiGHS writes some messages to the process's stdout (fd 1), not Python's
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    try:
        res = milp(
            -scores.ravel(),
            constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(loads, -np.inf, cap)],
            integrality=np.ones(n * k),
            bounds=Bounds(0, 1),
            options={"time_limit": time_limit},
        )
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)
    if res.x is None:
        return None
    labels = res.x.reshape(n, k).argmax(1)
    fits = (np.bincount(labels, weights=w, minlength=k) <= cap * (1 + 1e-9)).all()
    return labels if fits else None


def _largest_first(scores: np.ndarray, w: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """The fallback when moving documents out one at a time cannot empty a cluster enough (a few large
    documents, little slack): place them largest first, each in its best cluster with room; where that
    paints itself into a corner, each in the cluster with the most room (packing first, then scores)."""
    for by_score in (True, False):
        labels = np.zeros(len(w), dtype=np.int64)
        room = cap.copy()
        for i in np.argsort(-w, kind="stable"):
            fits = np.flatnonzero(room >= w[i])
            if fits.size == 0:
                break
            labels[i] = fits[np.argmax(scores[i, fits])] if by_score else int(np.argmax(room))
            room[labels[i]] -= w[i]
        else:
            return labels
    raise UserError(
        "could not place the documents under the clusters' size caps: a few documents are too large "
        "for the slack; allow more slack (`cluster assign --slack`; `cluster fit`'s is 5%, fixed: sample more "
        "documents, --sample-docs), fewer clusters, or balance by documents"
    )


def assign_labels(
    scores: np.ndarray,
    ok: np.ndarray,
    capacity: np.ndarray | int | None = None,
    sizes: np.ndarray | None = None,
) -> np.ndarray:
    """Labels [N]: the nearest centre, or a balanced assignment under per-cluster `capacity`.

    Rows with ok=False (documents that could not be vectorised) have no meaningful scores but are never
    dropped: they go, one by one, where there is most room left under `capacity`, or else to the
    smallest cluster, counting `sizes` (documents already assigned, e.g. by earlier chunks of a stream).
    """
    k = scores.shape[1]
    ok = np.asarray(ok, bool)
    labels = np.zeros(len(scores), dtype=np.int64)
    if capacity is not None:
        cap = np.broadcast_to(np.asarray(capacity, np.int64), (k,)).copy()
        if ok.any():
            labels[ok] = balanced_assign(scores[ok].astype(np.float64), cap)
        room = (cap - np.bincount(labels[ok], minlength=k)).astype(float)
    else:
        labels[ok] = scores[ok].argmax(1)
        room = -(sizes if sizes is not None else np.zeros(k)).astype(float) - np.bincount(
            labels[ok], minlength=k
        )
    for i in np.flatnonzero(~ok):
        j = int(np.argmax(room))
        labels[i] = j
        room[j] -= 1
    return labels


def neg_sq_dist(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """-||x - c||² for every pair, [N, K]."""
    return -(np.square(x).sum(1)[:, None] - 2 * x @ centres.T + np.square(centres).sum(1)[None, :])


def balanced_kmeans(
    x: np.ndarray,
    k: int,
    max_iter: int = 50,
    seed: int = 0,
    tol: float = 1e-6,
    weights: np.ndarray | None = None,
    slack: float = 0.05,
    patience: int = 5,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(centres [K, d], labels [N], info). Each cluster holds ceil(N/K) points at most; with `weights`
    (each point's size) instead a total weight of at most (1 + slack) W/K (a point heavier than that: a
    cluster of its own, byte_caps): clusters balanced by size, for corpora whose document counts are
    skewed.

    Size-balanced assignment steps are approximate, so the objective need not fall at every step (it
    can oscillate to max_iter): the best iterate is returned, and the loop stops once `patience` steps
    in a row did not improve on it. info["converged"]: the labels (or the objective, within tol)
    settled on the iterate returned."""
    n = len(x)
    if k < 1 or k > n:
        raise UserError(f"need 1 <= k <= number of points ({n}), got k={k}")
    from sklearn.cluster import kmeans_plusplus

    rng = np.random.default_rng(seed)  # re-seeds a cluster left empty
    centres, _ = kmeans_plusplus(x, k, random_state=seed)
    cap = -(-n // k)
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
    labels, caps = np.full(n, -1), None
    stop = "limit"
    prices = np.zeros(k)
    iterations, objective, converged = 0, np.inf, False
    kept, since_best = (
        (np.inf, centres.copy(), labels, None),
        0,
    )  # the best: (objective, centres, labels, caps)
    for iterations in range(1, max_iter + 1):  # noqa: B007 (reported below)
        scores = neg_sq_dist(x, centres)
        if weights is not None:
            new, caps = assign_by_bytes(scores, weights, slack, exact=False)
        else:
            new = balanced_assign(scores, cap, prices=prices)
            under = np.bincount(new, minlength=k) < cap
            if under.any() and (prices[under] > prices.min() + 1e-12).any():
                prices[:] = (
                    0.0  # a stale price on an under-filled cluster: the warm start may be off, redo cold
                )
                new = balanced_assign(scores, cap, prices=prices)
        for j in range(k):
            members = x[new == j]
            centres[j] = members.mean(0) if len(members) else x[rng.integers(n)]
        obj = float(-neg_sq_dist(x, centres)[np.arange(n), new].sum())
        stable = np.array_equal(new, labels)
        labels = new
        converged = stable or abs(objective - obj) <= tol * max(abs(obj), 1.0)
        objective = obj
        if obj <= kept[0]:  # equal: labels that settled, the iterate they settled on
            kept, since_best = (obj, centres.copy(), labels, caps), 0
        else:
            since_best += 1
        if converged or since_best >= patience:
            stop = "settled" if converged else "patience"
            break
    converged = converged and since_best == 0  # settled on the iterate returned
    objective, centres, labels, caps = kept
    sizes = np.bincount(labels, minlength=k)
    info = {
        "iterations": iterations,
        "objective": objective,
        "sizes": sizes.tolist(),
        "converged": bool(converged),
        # why it stopped: labels settled, `patience` steps without a better one, or max_iter
        "stopped": stop,
    }
    if weights is not None:
        info["weights"] = np.bincount(labels, weights=weights, minlength=k).tolist()
        info["caps"] = [round(float(c), 3) for c in caps]
    return centres, labels, info
