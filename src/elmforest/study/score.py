"""Scoring a study's runs on the same bytes: per-domain test BPB of every dense run and every forest,
in domain and out of domain, cached beside each point and keyed by what was scored.

Scoring is a job like training (`ScoreJob`, run by the executor: local workers or Ray), so a study's
points are scored side by side rather than one after another in the driver; a job is a plain dict, and
a rerun finds the cache and returns at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from elmforest.data.shards import Shards
from elmforest.forest.manifest import Forest
from elmforest.launch.jobs import DENSE_TUNED_RUN, logged
from elmforest.launch.sweep_results import DIVERGED
from elmforest.study.config import StudyConfig
from elmforest.study.run import Point
from elmforest.utils.errors import UserError
from elmforest.utils.io import read_json, write_json_atomic

ENSEMBLE = {"mode": "ensemble", "prior": "cached"}
# c-BTM's routing points changed (documents re-routed on their first tokens): part of the cache key
CLUSTER_ROUTING = "document starts re-routed at 1, 2, 4, ... tokens"


def _stamp(sh: Shards | None):
    """What an out-of-domain shards directory was built from (launch/prepare.py writes it)."""
    if sh is None or not (Path(sh.root) / "sources.json").is_file():
        return None
    return read_json(Path(sh.root) / "sources.json")


def score_point(
    p: Point,
    where: Path,
    shards: Shards,
    ood: Shards | None,
    cfg: StudyConfig,
    seq_len: int,
    routing: dict | None = None,
) -> dict:
    """Per-domain test BPB of the point's dense run and of its forest (by default the ensemble: cached
    prior from the valid split, the posterior restarted at each document; c-BTM: `routing` =
    {"mode": "cluster", "k": 2}), in domain and out of domain, on the same first `eval_bytes` of every
    domain for every model."""
    routing = routing or ENSEMBLE
    from elmforest.eval.bpb import evaluate_shards
    from elmforest.forest.evaluate import evaluate_forest_shards, make_pool
    from elmforest.model.build import load_model

    key = {"eval_bytes": cfg.eval_bytes, "prior_batches": cfg.prior_batches, "seq_len": seq_len}
    key["ood"] = sorted(ood.domains) if ood is not None else []
    key["ood_sources"] = _stamp(ood)  # a rebuilt out-of-domain set is scored again
    key["routing"] = routing
    if routing.get("mode") == "cluster":  # scores of the routing before it are stale: scored again
        key["cluster_routing"] = CLUSTER_ROUTING
    key["arms"] = [a for a, on in (("dense", p.dense), ("forest", p.forest)) if on]
    tuned = where / "runs" / DENSE_TUNED_RUN
    has_tuned = p.dense and (tuned / "summary.json").is_file()
    if has_tuned:  # its dense run's second half at its own LR: arm dense_tuned
        key["arms"].append("dense_tuned")
        key["dense_tuned_lr"] = read_json(tuned / "run_config.json")["optim"]["lr"]
    cache = where / "study_scores.json"
    old = read_json(cache) if cache.is_file() else {}
    if old.get("key") == key:
        return _with_same(p, old["scores"], tuned)
    before = {k: v for k, v in key.items() if k != "dense_tuned_lr"}
    before["arms"] = [a for a in key["arms"] if a != "dense_tuned"]
    common = {"split": "test", "seq_len": seq_len, "batch_size": 16, "max_bytes": cfg.eval_bytes}
    sets = [("bpb", shards, list(p.domains))]
    if ood is not None:
        sets.append(("ood_bpb", ood, [d for d in ood.domains if ood.has(d, "test")]))
    # the same scores before the dense_tuned run existed: only that run is scored
    scores: dict = dict(old["scores"]) if has_tuned and old.get("key") == before else {}
    forest = Forest.load(where)
    if p.dense and "dense" not in scores:
        model = load_model(where / "runs" / "dense" / "model")
        summary = read_json(where / "runs" / "dense" / "summary.json")
        s = scores["dense"] = {"flops": summary["flops"], "tokens": summary["tokens"]}
        for name, sh, doms in sets:
            r = evaluate_shards(model, sh, domains=doms, progress=False, **common)
            s[name] = {d: v["bpb"] for d, v in r["domains"].items()}
    if has_tuned and "dense_tuned" not in scores:
        summary, seed = read_json(tuned / "summary.json"), forest.data["seed"]
        t = scores["dense_tuned"] = {
            "flops": seed["flops"] + summary["flops"],  # the seed's (shared), then its own half
            "tokens": seed["tokens"] + summary["tokens"],
            "lr": key["dense_tuned_lr"],
        }
        model = load_model(tuned / "model")
        for name, sh, doms in sets:
            r = evaluate_shards(model, sh, domains=doms, progress=False, **common)
            t[name] = {d: v["bpb"] for d, v in r["domains"].items()}
    if p.forest and "btm" not in scores:
        missing = [d for d in forest.data["plan"]["domains"] if d not in forest.names]  # c-BTM: clusters
        if missing:
            raise UserError(f"{where}: expert(s) {missing} were not trained; run the study again")
        pool = make_pool(forest, batch_size=16)
        s = scores["btm"] = {
            "flops": float(forest.total_flops()),
            "tokens": sum(r["tokens"] for r in forest.ledger()),
        }
        for name, sh, doms in sets:
            r = evaluate_forest_shards(
                forest, sh, domains=doms, prior_batches=cfg.prior_batches, pool=pool, **routing, **common
            )
            s[name] = {d: v["bpb"] for d, v in r["domains"].items()}
    write_json_atomic(cache, {"key": key, "scores": scores})
    return _with_same(p, scores, tuned)


def _with_same(p: Point, scores: dict, tuned: Path) -> dict:
    """A dense run with no second run is its own dense_tuned: its second half's LR was its own, or the
    second run at another LR diverged (`tuned` holds the mark; a sweep's grid, which always holds the
    run's own LR, would choose the run then too). study.py drops the arm where that LR was never tuned."""
    if p.dense and "dense_tuned" not in scores:
        mark = tuned / DIVERGED
        why = {"diverged": read_json(mark).get("why", "")} if mark.is_file() else {}
        return {**scores, "dense_tuned": {**scores["dense"], "same_as": "dense", **why}}
    return scores


def scored_text(shards: Shards, domains, eval_bytes: int) -> dict:
    """The test text every model is scored on, per domain: {"documents", "bytes"} (bytes of text, EOS
    not counted). A domain whose first test document alone is longer than `eval_bytes` is scored on that
    whole document, so the bytes can exceed `eval_bytes`: the report says so from this record."""
    from elmforest.eval.bpb import select_documents

    out = {}
    for d in domains:
        if shards.has(d, "test"):
            n_docs, _, n_bytes = select_documents(shards.documents(d, "test"), eval_bytes)
            out[d] = {"documents": n_docs, "bytes": n_bytes}
    return out


@dataclass
class ScoreJob:
    """One point's scoring, as plain data an executor can ship to a worker."""

    point: dict  # Point fields
    where: str
    shards: str
    ood: str | None
    config: dict  # StudyConfig fields
    seq_len: int
    routing: dict | None = None
    threads: int | None = None

    @property
    def label(self) -> str:
        return f"{Path(self.where).name}/score"

    def log_path(self) -> Path:
        return Path(self.where) / "score.log"


def score_job(
    p: Point,
    where: Path,
    shards: Shards,
    ood: Shards | None,
    cfg: StudyConfig,
    seq_len: int,
    routing: dict | None = None,
    threads: int | None = None,
) -> ScoreJob:
    return ScoreJob(
        asdict(p),
        str(where),
        str(Path(shards.root).resolve()),
        str(Path(ood.root).resolve()) if ood is not None else None,
        cfg.to_dict(),
        seq_len,
        routing,
        threads,
    )


def run_score(job: ScoreJob | dict) -> dict:
    """Score one point here (its log: <point>/score.log); returns the scores."""
    job = ScoreJob(**job) if isinstance(job, dict) else job
    p = Point(**{**job.point, "domains": tuple(job.point["domains"])})
    where = Path(job.where)

    def work(log):
        ood = Shards(job.ood) if job.ood else None
        cfg = StudyConfig(**job.config)
        return score_point(p, where, Shards(job.shards), ood, cfg, job.seq_len, job.routing)

    return logged(where, job.label, job.threads, work, log_name="score.log")


def score_all(jobs: list[ScoreJob], executor) -> list[dict]:
    return executor.map(
        run_score, [asdict(j) for j in jobs], [j.label for j in jobs], [j.log_path() for j in jobs]
    )
