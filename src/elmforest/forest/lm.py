"""A forest, or one checkpoint, as one causal LM for clients that speak other tools' protocols
(lm-evaluation-harness, the OpenAI-compatible server).

Every mixture is the one `elmforest eval` scores (forest/posterior.py, forest/evaluate.py), so a client
cannot drift from the project's own numbers:
- ensemble: all experts, weights = the prior updated by Bayes' rule over every token read so far;
- topk: BTM's sparse ensemble: the k experts of largest prior, chosen once, the prior renormalised over
  them; only they are loaded and run;
- cluster: c-BTM: the top-k experts nearest to the context's tf-idf embedding (the forest's clusterer);
  a request is routed on its own context and only its experts run;
- average: one model, the prior-weighted parameter average of the experts.

The prior is uniform, or the *cached* prior estimated on the valid split of `prior_data` (never on what
is scored), pooled over its domains weighting each window the same. A request is one document that
begins after EOS, as documents do in training, so the posterior starts at the prior for each.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from elmforest.config import PRIOR_BATCHES
from elmforest.data.shards import Shards
from elmforest.data.shards_build import build_shards
from elmforest.data.tokenizer import LoadedTokenizer, load_tokenizer
from elmforest.eval.bpb import default_seq_len, n_windows
from elmforest.eval.held_out import training_split_spec
from elmforest.forest.cluster_route import ClusterContext, ClusterRouting
from elmforest.forest.evaluate import _is_tied
from elmforest.forest.manifest import Forest
from elmforest.forest.mixture import _mixture_nll, tied_at_k, top_experts
from elmforest.forest.mode_options import unused as ignored_by
from elmforest.forest.pool import ExpertPool, check_intact, doc_starts, estimate_prior_info
from elmforest.forest.posterior import ensemble_logprob, log_weights
from elmforest.merge.average import average_state_dict, warn_unrelated
from elmforest.model.build import load_model, read_config, resolve_model_dir
from elmforest.utils.device import autocast, resolve_device, resolve_precision
from elmforest.utils.errors import Diverged, UserError
from elmforest.utils.typed import expert_selection

MODES = ("ensemble", "topk", "cluster", "average")
PRIORS = ("uniform", "cached")


@dataclass
class Scored:
    """One scored sequence: log p of every predicted token under the mixture, and the continuation's."""

    logprobs: list[float]  # per predicted token (the sequence minus its first token, after truncation)
    continuation: float  # summed log p of the last `n_cont` tokens
    greedy: bool  # whether the continuation is the mixture's argmax at every one of its tokens
    experts: list[str]  # the experts that ran
    vocab_logprobs: torch.Tensor | None = None  # [n_cont, V] the mixture's log p over the vocabulary


@dataclass
class ForestLM:
    pool: ExpertPool
    tok: LoadedTokenizer
    names: list[str]  # the experts the pool holds (topk: only the chosen k)
    prior: torch.Tensor  # [len(names)] probabilities
    mode: str
    weighting: str
    seq_len: int
    path: Path
    k: int = 0
    forest: Forest | None = None
    routing: ClusterRouting | None = None
    prior_source: str = "uniform"
    routing_temperature: float = 0.1
    info: dict = field(default_factory=dict)
    _router: object = None  # c-BTM's incremental router, built on first use and reset per request
    _cluster_ctx: object = None  # evaluation's c-BTM routing for rolling scoring, built once

    @property
    def eos_id(self) -> int:
        return self.tok.eos_id

    @property
    def vocab_size(self) -> int:
        return int(self.pool.model(0).config.vocab_size)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as a document's body: the tokenizer's own trailing EOS removed."""
        ids = self.tok.encode_batch([text])[0]
        if self.tok.appends_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return ids

    def experts_for(self, context: list[int]) -> tuple[list[int], torch.Tensor, str]:
        """(pool indices to run, their prior [n], weighting) for a request with this context.

        cluster routes on the context's embedding; its weights are fixed while scoring (c-BTM routes a
        whole sequence once), the other modes start every request from the prior. The context goes
        through the router evaluation uses (built once, reset per request): tf-idf read token by token,
        or a sentence encoder embedding the decoded context."""
        if self.routing is None:
            return list(range(len(self.names))), self.prior, self.weighting
        if self._router is None:
            self._router = self.routing.incremental_router(self.tok)
        self._router.reset()
        for t in [self.eos_id, *context]:
            self._router.push_token(t)
        w_np = self.routing.context_weights(self._router)
        w = torch.as_tensor(w_np, dtype=torch.float64)
        idx = torch.nonzero(w > 0).flatten().tolist()
        return idx, w[idx], "fixed"

    @torch.no_grad()
    def _expert_logprobs(self, j: int, rows: list[list[int]], tails: list[int]):
        """Per-token log-probs [B, T] of expert j on right-padded rows (each row predicts its tokens
        after the first), and its full-vocabulary log-probs [tail, V] at each row's last `tail` tokens."""
        width = max(len(r) for r in rows) - 1
        x = torch.full((len(rows), width), self.eos_id, dtype=torch.long)
        y = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(r) - 1] = torch.tensor(r[:-1])
            y[i, : len(r) - 1] = torch.tensor(r[1:])
        dev = self.pool.device
        with autocast(dev, self.pool.amp):
            logits = self.pool.model(j)(input_ids=x.to(dev)).logits
        lp_all = torch.log_softmax(logits.float(), -1)
        lp = lp_all.gather(-1, y.clamp_min(0).to(dev)[..., None])[..., 0].cpu().masked_fill(y < 0, 0.0)
        if not bool(torch.isfinite(lp).all()):
            raise Diverged(f"{self.pool.dirs[j]}: non-finite log-probabilities: corrupt or diverged weights")
        self.pool.passes += int((y >= 0).sum())
        ends = [len(r) - 1 for r in rows]
        return lp, [lp_all[i, e - c : e].cpu() for i, (e, c) in enumerate(zip(ends, tails, strict=True))]

    def score(
        self, requests: list[tuple[list[int], list[int]]], want_vocab: bool = False, batch_size: int = 16
    ) -> list[Scored]:
        """Score (context, continuation) token-id pairs: the continuation's log-likelihood under the
        mixture given EOS + context, and whether it is the mixture's greedy choice. A sequence longer than
        the context window keeps its last tokens (the context is cut on the left, as lm-eval's HF model
        does); a continuation longer than the window is an error. Requests are batched by length, and
        (c-BTM) grouped by the experts they route to, so an expert runs only on its own requests."""
        out: list[Scored | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        plans = []
        for i, (ctx, cont) in enumerate(requests):
            if not cont:
                raise UserError("a continuation to score must have at least one token")
            if len(cont) > self.seq_len:
                raise UserError(f"a continuation of {len(cont)} tokens exceeds the context of {self.seq_len}")
            seq = [self.eos_id, *ctx, *cont][-(self.seq_len + 1) :]
            # routed on the context the experts read: a context cut on the left was routed on all of it
            run, prior, weighting = self.experts_for(seq[: len(seq) - len(cont)])
            plans.append((seq, len(cont), prior, weighting))
            groups.setdefault(tuple(run), []).append(i)
        for run, members in groups.items():
            order = sorted(members, key=lambda i: -len(plans[i][0]))
            for b in range(0, len(order), batch_size):
                chunk = order[b : b + batch_size]
                per = [
                    self._expert_logprobs(j, [plans[i][0] for i in chunk], [plans[i][1] for i in chunk])
                    for j in run
                ]
                for r, i in enumerate(chunk):
                    seq, c, prior, weighting = plans[i]
                    t = len(seq) - 1
                    lp = torch.stack([p[0][r, :t] for p in per]).double()[:, None, :]  # [n, 1, t]
                    lw = log_weights(lp, prior, weighting)  # [n, 1, t]
                    ens = ensemble_logprob(lp, lw)[0]  # [t]
                    # log Σ_j w_j p_j(v) at every continuation token, one expert at a time: float32 [c, V]
                    # (an echoed 2k-token prompt over a 50k vocabulary is never stacked over experts)
                    lw_c = lw[:, 0, t - c :, None].float()
                    mix = lw_c[0] + per[0][1][r]
                    for j in range(1, len(per)):
                        mix = torch.logaddexp(mix, lw_c[j] + per[j][1][r])
                    greedy = bool((mix.argmax(-1) == torch.tensor(seq[-c:])).all())
                    out[i] = Scored(
                        ens.tolist(),
                        float(ens[t - c :].sum()),
                        greedy,
                        [self.names[j] for j in run],
                        mix.float() if want_vocab else None,
                    )
        return out  # type: ignore[return-value]

    def rolling_nll(self, ids: list[int], eos: bool = False) -> float:
        """Summed NLL (nats) of a whole document in `elmforest eval`'s non-overlapping windows, with its
        posterior (document reset) or c-BTM routing, so its bits per byte are the evaluation's. With
        `eos` the document's closing EOS is predicted too, as evaluation counts it."""

        stream = np.asarray([*ids, *([self.eos_id] if eos else [])], dtype=np.int64)
        if len(stream) == 0:
            return 0.0
        nw = n_windows(len(stream), self.seq_len)
        if self.routing is not None:
            if self._cluster_ctx is None:
                self._cluster_ctx = ClusterContext(
                    self.forest,
                    self.names,
                    None,
                    self.k,
                    self.routing_temperature,
                    "sequence",
                    self.seq_len,
                    tok=self.tok,
                    routing=self.routing,
                )
            return self._cluster_ctx.nll(self.pool, stream, nw)[0]
        starts = doc_starts(stream, self.eos_id, self.seq_len, nw)
        nll, _, _ = _mixture_nll(
            self.pool,
            stream,
            self.eos_id,
            self.seq_len,
            nw,
            self.prior,
            "ensemble",
            len(self.names),
            self.weighting,
            "prior",
            None,
            starts,
        )
        return nll


def open_lm(
    path: str | Path,
    mode: str = "ensemble",
    k: int = 2,
    prior: str = "uniform",
    prior_data: str | Path | None = None,
    weighting: str = "posterior",
    experts: list[str] | None = None,
    device: str = "auto",
    precision: str = "auto",
    seq_len: int | None = None,
    routing_temperature: float = 0.1,
    prior_batches: int = PRIOR_BATCHES,
    given: Collection[str] = (),
) -> ForestLM:
    """Open a forest directory (its manifest) or a single checkpoint directory as one LM. `given`: the
    settings a command line typed out, refused where the mode ignores them even at their default."""
    path = Path(path)
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; expected one of {MODES}")
    if prior not in PRIORS:
        raise UserError(f"unknown prior {prior!r}; expected one of {PRIORS}")
    if weighting not in ("posterior", "fixed"):
        raise UserError(f"unknown weighting {weighting!r}; expected posterior or fixed")
    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    if prior == "cached" and mode == "cluster":
        raise UserError(
            "mode=cluster routes by the clusterer, not a prior: drop prior=cached and prior_data "
            "(--prior, --prior-data)"
        )
    # a mode's own setting given to another was dropped without a word (as `eval` refuses them)
    given = {
        name: label
        for name, label, set_ in (
            ("k", f"k={k} (--k)", k != 2),
            ("weighting", f"weighting={weighting} (--weighting)", weighting != "posterior"),
            (
                "routing_temperature",
                f"routing_temperature={routing_temperature:g} (--routing-temperature)",
                routing_temperature != 0.1,
            ),
            ("prior", f"prior={prior} (--prior)", False),  # (uniform, its default, fits every mode)
        )
        if set_ or name in given
    }
    if unused := ignored_by(mode, given):
        raise UserError(
            f"{', '.join(unused)}: not used by mode={mode} (k is topk's and cluster's, weighting ensemble's "
            "and topk's, routing_temperature cluster's, prior every mode's but cluster's)"
        )
    if prior == "cached" and prior_data is None:
        raise UserError(
            "prior=cached (--prior cached) needs prior_data (--prior-data): shards or raw data whose valid "
            "split gives the prior"
        )
    # refused, not ignored: a prior that silently does nothing would be taken for the one measured
    if prior_data is not None and prior != "cached":
        raise UserError(
            f"prior_data (--prior-data) is only used with prior=cached, not prior={prior}; add prior=cached "
            "(--prior cached) or drop it"
        )
    experts = expert_selection(experts, "experts")  # `experts=` with nothing after it: refused, not all
    if (path / "forest.json").is_file():
        forest = Forest.load(path)
        unknown = sorted(set(experts or []) - set(forest.names))
        if unknown:
            raise UserError(f"{path}: no expert named {', '.join(unknown)}; it has {', '.join(forest.names)}")
        # in the forest's order: a tied prior's top-k are the first of it, as the note says
        names = [n for n in forest.names if n in experts] if experts else forest.names
        if not names:
            raise UserError(f"{path}: the forest has no experts")
        check_intact(forest, names)
        dirs = [forest.expert_dir(n) for n in names]
    elif (path / "config.json").is_file() or (path / "model" / "config.json").is_file():
        mdir = resolve_model_dir(path)  # a checkpoint, or a run directory's final model
        forest, names, dirs = None, [path.name], [mdir]
        if mode == "cluster":
            raise UserError(f"{path}: a single checkpoint has no clusterer; cluster routing needs a forest")
        if unused := ignored_by(None, given):
            raise UserError(
                f"{', '.join(unused)}: {path} is a single checkpoint, one model: nothing to weigh"
            )
    elif (path / "run_config.json").is_file():
        resolve_model_dir(path)  # an unfinished run: it says so, and how to finish it
    else:
        raise UserError(
            f"{path}: neither a forest (forest.json) nor a checkpoint (config.json) or run directory"
        )
    trained = default_seq_len(dirs[0])
    seq_len = seq_len or trained
    limit = read_config(Path(dirs[0])).get("max_position_embeddings")
    if isinstance(limit, int) and seq_len > limit:
        raise UserError(f"seq_len (--seq-len, max_length) {seq_len} is past the model's {limit} positions")
    if seq_len > trained:  # allowed (the positions exist), as generate says
        print(
            f"note: seq_len {seq_len} is past the {trained}-token context the experts were trained on; "
            "expect worse scores and text beyond it",
            file=sys.stderr,
        )
    dev = resolve_device(device)
    pool = ExpertPool(dirs, dev, resolve_precision(precision, dev))
    tok = load_tokenizer(dirs[0])
    pi = torch.full((len(names),), 1.0 / len(names), dtype=torch.float64)
    source = "uniform"
    if prior == "cached" and mode != "cluster":
        pi, source = _cached_prior(pool, tok, dirs[0], prior_data, seq_len, prior_batches)
    lm = ForestLM(
        pool, tok, names, pi, mode, weighting, seq_len, path, k, forest, None, source, routing_temperature
    )
    if mode == "topk" and k > len(names):  # as eval says it
        print(
            f"note: k={k} is more than the {len(names)} experts served: topk keeps them all", file=sys.stderr
        )
    if mode == "topk" and k < len(names):
        top = top_experts(pi, k)
        if tied_at_k(pi, k):  # a tie: the choice says nothing about the data, and must not look as if
            print(
                f"note: topk with a prior that ties ({source}), so the top {k} are the first in the "
                f"forest's order ({', '.join(names[j] for j in top)}); prior=cached (serve: --prior cached "
                "--prior-data PATH) picks them by the data",
                file=sys.stderr,
            )
        lm.names = [names[j] for j in top]
        lm.prior = pi[top] / pi[top].sum()
        lm.pool = ExpertPool(
            [dirs[j] for j in top],
            dev,
            pool.amp,
            _models={i: pool._models[j] for i, j in enumerate(top) if j in pool._models},
        )
    elif mode == "cluster":
        lm.routing = ClusterRouting(forest, names, k, routing_temperature)
    elif mode == "average" and len(names) > 1:
        if forest is not None:
            warn_unrelated(forest, names, "averaging")  # as `eval --mode average` warns
        model = load_model(dirs[0])
        missing, unexpected = model.load_state_dict(average_state_dict(dirs, pi.tolist()), strict=False)
        if unexpected or any(not _is_tied(model, m) for m in missing):
            raise UserError(
                f"averaged weights do not fit the model (missing {missing}, unexpected {unexpected})"
            )
        lm.pool = ExpertPool(dirs[:1], dev, pool.amp, _models={0: model.to(dev).eval()})
        lm.names, lm.prior = [f"average({', '.join(names)})"], torch.ones(1, dtype=torch.float64)
    return lm


def _cached_prior(pool, tok, first: Path, data, seq_len: int, batches: int) -> tuple[torch.Tensor, str]:
    """The cached prior from the valid split of every domain of `data`, each window weighing the same."""
    data = Path(data)

    def pooled(shards: Shards) -> tuple[torch.Tensor, str]:
        if shards.tokenizer_fingerprint != tok.fingerprint():
            raise UserError(f"{data}: tokenized with another tokenizer than the forest's experts")
        shards.check_eos(tok.eos_id, first)
        total, n_win, used = None, 0, []
        for d in shards.domains:
            if not shards.has(d, "valid"):
                continue
            pi, nw = estimate_prior_info(pool, shards.tokens(d, "valid"), tok.eos_id, seq_len, batches)
            total = pi * nw if total is None else total + pi * nw
            n_win += nw
            used.append(f"{d}: {nw}")
        if total is None:
            raise UserError(f"{data}: no domain has a valid split to estimate the cached prior on")
        return total / n_win, f"cached on {data} valid ({', '.join(used)} windows)"

    if Shards.is_shards_dir(data):
        return pooled(Shards(data))
    with tempfile.TemporaryDirectory(prefix="elmforest-prior-") as tmp:
        spec = training_split_spec(first)
        built = build_shards(data, tok, Path(tmp) / "shards", spec, progress=False, only_splits=("valid",))
        return pooled(Shards(built.out))
