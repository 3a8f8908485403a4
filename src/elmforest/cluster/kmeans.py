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
        for j in np.unique(best):
            newcomers = unassigned[best == j]
            members = np.flatnonzero(label == j)
            cand = np.concatenate([members, newcomers])
            amounts = np.concatenate([bid_of[members], bids[best == j]])
            if len(cand) <= cap[j]:
                keep, drop = cand, cand[:0]
            else:
                order = np.argsort(-amounts, kind="stable")
                keep, drop = cand[order[: cap[j]]], cand[order[cap[j] :]]
                price[j] = amounts[order[cap[j] - 1]]  # the lowest accepted bid
            label[keep] = j
            bid_of[newcomers] = bids[best == j]
            label[drop] = -1
            evicted.append(drop)
        unassigned = np.concatenate(evicted) if evicted else unassigned[:0]
    if prices is not None:
        prices[:] = price
    return label


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
    x: np.ndarray, k: int, max_iter: int = 50, seed: int = 0, tol: float = 1e-6
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(centres [K, d], labels [N], info). Each cluster holds ceil(N/K) points at most."""
    n = len(x)
    if k < 1 or k > n:
        raise UserError(f"need 1 <= k <= number of points ({n}), got k={k}")
    from sklearn.cluster import kmeans_plusplus

    rng = np.random.default_rng(seed)  # re-seeds a cluster left empty
    centres, _ = kmeans_plusplus(x, k, random_state=seed)
    cap = -(-n // k)
    labels = np.full(n, -1)
    prices = np.zeros(k)
    iterations, objective = 0, np.inf
    for iterations in range(1, max_iter + 1):  # noqa: B007 (reported below)
        scores = neg_sq_dist(x, centres)
        new = balanced_assign(scores, cap, prices=prices)
        under = np.bincount(new, minlength=k) < cap
        if under.any() and (prices[under] > prices.min() + 1e-12).any():
            prices[:] = 0.0  # a stale price on an under-filled cluster: the warm start may be off, redo cold
            new = balanced_assign(scores, cap, prices=prices)
        for j in range(k):
            members = x[new == j]
            centres[j] = members.mean(0) if len(members) else x[rng.integers(n)]
        obj = float(-neg_sq_dist(x, centres)[np.arange(n), new].sum())
        stable = np.array_equal(new, labels)
        labels = new
        if stable or abs(objective - obj) <= tol * max(abs(obj), 1.0):
            objective = obj
            break
        objective = obj
    sizes = np.bincount(labels, minlength=k)
    return centres, labels, {"iterations": iterations, "objective": objective, "sizes": sizes.tolist()}
