"""c-BTM's sparse routing: the top-k experts by distance of the context's embedding to the cluster
centres. Evaluation (per window or per segment of W tokens, each document routed on its own context;
evaluate.py holds the rest) and generation (incremental, token by token) share `ClusterRouting`, so
the cluster -> expert map and the fallback before any known word cannot drift apart between them."""

from __future__ import annotations

import sys

import numpy as np
import torch

from elmforest.data.shards import Shards
from elmforest.forest.manifest import Forest
from elmforest.forest.pool import ExpertPool, doc_starts, valid_mask
from elmforest.utils.errors import UserError


def width(spec: str, what: str) -> int:
    """W of a `name:W` option (`segment:W`, `prefix:W`): a whole number of tokens, at least 1."""
    w = spec.split(":", 1)[1]
    if not (w.strip().isascii() and w.strip().isdecimal()) or int(w) < 1:
        raise UserError(f"{what} {spec!r}: W must be a whole number of tokens >= 1")
    return int(w)


class ClusterRouting:
    """The forest's clusterer and which expert serves each cluster: context embeddings -> expert weights."""

    def __init__(self, forest: Forest, names: list[str], k: int, temperature: float):
        from elmforest.cluster.clusterer import Clusterer

        if k is not None and k < 1 or not temperature > 0:  # said before the clusterer and experts load
            raise UserError(
                f"cluster routing needs top-k >= 1 and a temperature > 0, got k={k}, T={temperature}"
            )

        info = forest.data.get("clusterer")
        if not info:
            raise UserError(
                f"{forest.root}: the forest has no clusterer; cluster routing needs a c-BTM forest: experts "
                "trained on `cluster assign` shards by `elmforest forest train --clusterer DIR ...`"
            )
        self.clusterer = Clusterer.load(forest.root / info["path"])
        if problem := forest.clusterer_problem(load=False):  # another clusterer of the same shape
            raise UserError(f"{forest.root}: {problem}")
        # a cluster served by several experts goes to the last of them (in `names` order): said, as
        # the others then never run (an expert added later on a cluster, `forest add` / `forest expert`)
        self.expert_of, shared = {}, []
        for j in range(self.clusterer.k):
            serving = [i for i, n in enumerate(names) if f"cluster{j}" in forest.expert(n)["domains"]]
            if serving:
                self.expert_of[j] = serving[-1]
            if len(serving) > 1:
                shared.append(f"cluster{j}: {', '.join(names[i] for i in serving)} -> {names[serving[-1]]}")
        if shared:
            print(
                f"note: {forest.root}: a cluster served by several experts is routed to the last of them "
                f"alone ({'; '.join(shared)}); the others never run in cluster routing",
                file=sys.stderr,
            )
        if not self.expert_of:  # nothing could be routed to: every weight would be 0/0
            raise UserError(
                f"{forest.root}: no expert is trained on a cluster (domains cluster0..cluster{self.clusterer.k - 1})"
            )
        self.allowed = np.array([j in self.expert_of for j in range(self.clusterer.k)])
        sizes = np.asarray(
            self.clusterer.meta.get("fit", {}).get("sizes") or np.ones(self.clusterer.k), float
        )
        # an empty context (no known word yet) has no embedding: the fit's cluster sizes are the prior
        self.fallback = np.where(self.allowed, sizes, 0.0)
        self.k, self.temperature, self.n = k, temperature, len(names)
        ranked = np.sort(self.fallback[self.allowed])[::-1]
        if k is not None and k < len(ranked) and ranked[k - 1] == ranked[k]:  # count-balanced: ceil(N/K)
            first = np.argsort(-self.fallback, kind="stable")[:k]
            print(
                f"note: {forest.root}: clusters of equal fitted size tie for a context with no known word yet "
                f"(a document's first tokens); the tie is broken by number: "
                f"{', '.join(f'cluster{j}' for j in first)}",
                file=sys.stderr,
            )

    def incremental_router(self, tok):
        """A router over this clusterer that reads the token ids of `tok` one at a time."""
        from elmforest.cluster.router import IncrementalRouter

        return IncrementalRouter(self.clusterer, tok.token_bytes, tok.eos_id)

    def expert_weights(self, z: np.ndarray, ok: np.ndarray) -> np.ndarray:
        """Expert weights [P, N] (zero outside the top-k) for context embeddings z [P, d]."""
        w_cluster = self.clusterer.route(z, self.k, self.temperature, allowed=self.allowed)
        if (~ok).any():  # no known word yet: the k largest clusters with an expert, weighted by size
            fb = self.fallback.copy()
            if self.k is not None:  # None: every cluster, as Clusterer.route reads it (NaN weights before)
                fb[np.argsort(-fb, kind="stable")[self.k :]] = 0.0
            w_cluster[~ok] = fb / fb.sum()
        w = np.zeros((len(z), self.n))
        for j, i in self.expert_of.items():
            w[:, i] += w_cluster[:, j]
        return w

    def context_weights(self, router) -> np.ndarray:
        """Expert weights [N] for everything `router` (from `incremental_router`) has read: generation
        re-routes after every token without re-reading the context."""
        h, ok = router.embedding()
        return self.expert_weights(h[None], np.array([ok]))[0]


def prefix_runs(routed: np.ndarray):
    """(expert, windows, length) runs that cover `routed` [nw, T, N] (True where a position takes the
    expert): the models are causal, so an expert routed to a window's positions up to t needs only its
    first t + 1 tokens. A window opening inside a document re-routes 1, 2, 4, ... tokens in, so the
    experts of its early routing points need a few tokens, not the window. Lengths are rounded up to a
    power of two (at most T) so that runs batch: the re-routing offsets are powers of two, so that
    rounding is exact there; the passes counted are the tokens that run."""
    nw, T, n = routed.shape
    last = np.where(routed, np.arange(T)[None, :, None], -1).max(1) if nw else np.zeros((0, n), int)
    for i in range(n):
        wins = np.flatnonzero(last[:, i] >= 0)
        if not len(wins):
            continue
        need = last[wins, i] + 1
        upto = np.minimum(T, 1 << np.ceil(np.log2(need)).astype(np.int64))
        for u in np.unique(upto):
            yield i, wins[upto == u], int(u)


# what the router reads before a position: its document's text in its own window (what every model scored
# conditions on: the default), or in the whole document before it, across windows (text the dense model
# and the posterior ensemble never see for that window: c-BTM rows scored that way read more context)
CONTEXTS = ("window", "document")


class ClusterContext(ClusterRouting):
    """c-BTM routing state for one evaluation: the shared routing plus where the routing points fall."""

    def __init__(
        self,
        forest: Forest,
        names: list[str],
        shards: Shards | None,
        k: int,
        temperature: float,
        route: str,
        seq_len: int,
        reset: str = "document",
        tok=None,
        reroute: bool = True,
        context: str = "window",
        routing: ClusterRouting | None = None,
    ):
        """`routing`: one already built for these experts (a ForestLM's), taken as it is rather than
        loading the clusterer and saying its notes again."""
        from elmforest.data.tokenizer import load_tokenizer as _load_tok

        if context not in CONTEXTS:
            raise UserError(f"unknown router context {context!r}; expected one of {', '.join(CONTEXTS)}")
        if context == "window" and (reset != "document" or not reroute):
            raise UserError(  # each window starts from an empty context, re-routed only on its first tokens
                "c-BTM routing on the window's own text re-routes each window and document on its first "
                "tokens; with --reset window or --no-reroute every routing point left would read an empty "
                "context (routed by the cluster sizes): give --router-context document"
            )
        if routing is not None:
            self.__dict__.update(vars(routing))
        else:
            super().__init__(forest, names, k, temperature)
        if route == "sequence":
            self.seg = seq_len
        elif route.startswith("segment:"):
            self.seg = width(route, "--route")
        else:
            raise UserError(f"unknown route {route!r}; expected 'sequence' or 'segment:W'")
        # re-route each document 1, 2, 4, ... tokens into it (`points`); off: c-BTM's own routing points
        self.seq_len, self.reset, self.reroute, self.context = seq_len, reset, reroute, context
        self.router = self.incremental_router(tok or _load_tok(shards.root))  # a client passes its own

    def points(self, stream: np.ndarray, nw: int) -> np.ndarray:
        """[nw, T] True at the routing points: every W tokens (the window start for `sequence`) and,
        with reset="document", each document's first token and then 1, 2, 4, ... (< W) tokens into it,
        until the next document.

        A document's first token has an empty context, so it is routed by the size prior (the largest
        cluster). Routed only there, a document opening inside a window would keep that fallback to the
        window's end (14% of the quickstart's test tokens, 0.6% with this, measured with the router
        reading the document before the window). With context="window" a window that opens inside a
        document starts from an empty context as well, and is re-routed the same way from its start.
        Re-routing stays causal (each point sees only the text before it) and costs log2(W) embeddings."""
        T, seg, n_tok = self.seq_len, self.seg, len(stream)
        points = np.zeros((nw, T), dtype=bool)
        points[:, ::seg] = True
        if self.reset == "document":
            starts = doc_starts(stream, self.router.eos_id, T, nw).numpy()
            points |= starts
        if self.reset == "document" and self.reroute:
            # offsets counted from where the context starts (the document, or with context="window" a
            # window that opens inside it: its context is empty there too), across segment boundaries,
            # up to W tokens in and never into the next context
            if self.context == "window":
                starts = starts.copy()
                starts[:, 0] = True
            first = np.flatnonzero(starts.reshape(-1))  # stream positions, sorted
            nxt = np.append(first[1:], nw * T)
            flat_points = points.reshape(-1)  # a view: setting it sets `points`
            off = 1
            while off < seg:
                q = first + off
                flat_points[q[q < np.minimum(nxt, nw * T)]] = True
                off *= 2
        points &= np.arange(nw * T).reshape(nw, T) < n_tok
        points[:, 0] |= True  # every window routes at its start (trailing padding windows never exist)
        return points

    def nll(self, pool: ExpertPool, stream: np.ndarray, nw: int):
        """Each position takes the routing of the latest routing point at or before it in its window
        (`points`), so no document is routed by the one before it. Also returns the share of scored
        tokens routed by the size prior because their document had no known word yet."""
        from elmforest.cluster.router import route_stream

        T, n_tok = self.seq_len, len(stream)
        points = self.points(stream, nw)
        flat = np.arange(nw * T).reshape(nw, T)
        positions = flat[points]  # sorted stream positions
        z, ok = route_stream(
            self.router,
            stream,
            np.minimum(positions, max(n_tok - 1, 0)),
            window=T if self.context == "window" else None,
        )
        w_route = self.expert_weights(z, ok)  # [P, N]
        # the routing point each position follows: the latest one at or before it in its window
        t_idx = np.where(points, np.arange(T)[None, :], 0)
        latest = np.maximum.accumulate(t_idx, axis=1)
        row_of = np.full(nw * T, -1, dtype=np.int64)
        row_of[positions] = np.arange(len(positions))
        rows = row_of[(np.arange(nw)[:, None] * T + latest).reshape(-1)].reshape(nw, T)
        w_pos_np = w_route[rows]  # [nw, T, N]
        valid = valid_mask(nw, T, n_tok)
        lp = torch.zeros(self.n, nw, T, dtype=torch.float64)
        ran = set()  # the last window's padding needs no expert to run over it
        for i, wins, upto in prefix_runs((w_pos_np > 0) & (valid > 0).numpy()[:, :, None]):
            lp[i, torch.as_tensor(wins), :upto] = pool.logprobs(
                i, stream, self.router.eos_id, T, wins.tolist(), upto=None if upto == T else upto
            )[:, :upto].double()
            ran.add(i)
        w_pos = torch.from_numpy(w_pos_np).permute(2, 0, 1)  # [N, nw, T]
        log_w = torch.log(w_pos)
        # positions past the end of the stream are padding: they count 0
        ens = torch.where(valid > 0, torch.logsumexp(log_w + lp, dim=0), torch.zeros(()))
        mean_w = (w_pos * valid).sum((1, 2)) / valid.sum().clamp_min(1)
        fallback = float((torch.from_numpy(~ok[rows]).double() * valid).sum() / valid.sum().clamp_min(1))
        return -float(ens.sum()), mean_w, sorted(ran), fallback
