"""Scoring a study's runs on the same bytes: per-domain test BPB of every dense run and every forest,
in domain and out of domain, cached beside each point and keyed by what was scored.

Scoring is a job like training (`ScoreJob`, run by the executor: local workers or Ray), so a study's
points are scored side by side rather than one after another in the driver; a job is a plain dict, and
a rerun finds the cache and returns at once.

The cache holds one entry per (arm, scored set), each under its own key, so what changed is all that is
scored again: a rebuilt out-of-domain set rescores the out-of-domain rows only, a new routing the forest
only. The single-key cache of earlier versions is read as such entries.

A point's `dense_tuned` is the better on valid of its dense run and that run's second half continued at
another LR: a two-point grid, as `elmforest sweep`'s continuation arm always holds the run's own LR. The
continuation LR is swept at some points and carried unswept to others (study/run.py `continue_lr`), and
where it loses on valid the dense run is the tuned arm, not the worse continuation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from elmforest.data.shards import Shards
from elmforest.forest.manifest import Forest
from elmforest.launch.jobs import DENSE_TUNED_RUN, logged
from elmforest.launch.ood_sets import ood_stamp
from elmforest.launch.sweep_results import DIVERGED
from elmforest.study.config import StudyConfig
from elmforest.study.run import Point
from elmforest.utils.device import scored_on
from elmforest.utils.errors import Diverged, UserError
from elmforest.utils.io import read_json, write_json_atomic

ENSEMBLE = {"mode": "ensemble", "prior": "cached"}
# c-BTM's routing points changed (documents re-routed on their first tokens): part of the cache key
CLUSTER_ROUTING = "the window's own text; document and window starts re-routed at 1, 2, 4, ... tokens"
CACHE_VERSION = 2


def _entry_keys(
    p: Point,
    cfg: StudyConfig,
    seq_len: int,
    ood: Shards | None,
    routing: dict,
    tuned_lr: float | None,
    choose: bool = True,
) -> dict[str, dict]:
    """{"arm/set": the key of that score}: only what the score depends on, so one change rescores only
    what it touches (a dense run does not depend on the forest's routing or prior). `choose`: the point's
    domains have a valid split to choose dense_tuned on."""
    common = {"eval_bytes": cfg.eval_bytes, "seq_len": seq_len, "scored_on": scored_on()}
    sets: dict[str, dict] = {"bpb": {}}
    if tuned_lr is not None and choose:  # the whole valid split, as a sweep chooses: not eval_bytes
        sets["valid"] = {"eval_bytes": None, "valid_bytes": "all"}
    if ood is not None:
        sets["ood_bpb"] = {"ood": sorted(ood.domains), "ood_sources": ood_stamp(ood.root)}
    arms: dict[str, dict] = {}
    if p.dense:
        arms["dense"] = {}
        if tuned_lr is not None:
            arms["dense_tuned"] = {"dense_tuned_lr": tuned_lr}
    if p.forest:
        arms["btm"] = {"prior_batches": cfg.prior_batches, "routing": routing}
        if routing.get("mode") == "cluster":  # scores of the routing before it are stale: scored again
            arms["btm"]["cluster_routing"] = CLUSTER_ROUTING
    return {
        f"{a}/{s}": {**common, **sk, **ak}
        for a, ak in arms.items()
        for s, sk in sets.items()
        if s != "valid" or a != "btm"  # valid: the dense_tuned choice only
    }


def _read_cache(path: Path) -> dict[str, dict]:
    """{"arm/set": {"key", "value"}}; an earlier version's single key (every score made under it) is read
    as entries under that key, so only the entries whose own key changed are scored again."""
    if not path.is_file():
        return {}
    old = read_json(path)
    if old.get("version") == CACHE_VERSION:
        return old["entries"]
    key, out = old.get("key") or {}, {}
    for arm, s in (old.get("scores") or {}).items():
        for name in ("bpb", "ood_bpb"):
            if name in s:
                v1 = {**key, "dense_tuned_lr": s.get("lr", key.get("dense_tuned_lr"))}
                out[f"{arm}/{name}"] = {"key": v1, "value": s[name], "v1": True}
    return out


def _hit(entries: dict, name: str, key: dict):
    e = entries.get(name)
    if e is None:
        return None
    if "scored_on" not in e["key"]:  # made before it was recorded: taken as made here, as it then was
        key = {k: v for k, v in key.items() if k != "scored_on"}
    if e.get("v1"):  # an old single key holds more fields: this entry's must all match
        return e["value"] if all(e["key"].get(k) == v for k, v in key.items()) else None
    return e["value"] if e["key"] == key else None


def score_point(
    p: Point,
    where: Path,
    shards: Shards,
    ood: Shards | None,
    cfg: StudyConfig,
    seq_len: int,
    routing: dict | None = None,
    tuned_lr: float | None = None,
    cached_only: bool = False,
) -> dict:
    """Per-domain test BPB of the point's dense run, of its dense_tuned run (the second half continued at
    `tuned_lr`, None where the study asks for none) where it beats the dense run on valid, and of its forest
    (by default the ensemble: cached prior from the valid split, the posterior restarted at each document;
    c-BTM: `routing` = {"mode": "cluster", "k": 2}), in domain and out of domain, on the same first
    `eval_bytes` of every domain for every model."""
    routing = routing or ENSEMBLE
    from elmforest.eval.bpb import evaluate_shards
    from elmforest.forest.evaluate import evaluate_forest_shards, make_pool
    from elmforest.model.build import load_model

    tuned = where / "runs" / DENSE_TUNED_RUN
    if not (p.dense and (tuned / "summary.json").is_file()):
        tuned_lr = None  # none trained: its LR is the dense run's own, or it diverged in training
    elif tuned_lr is not None:
        had = read_json(tuned / "run_config.json")["optim"]["lr"]
        if f"{had:.3g}" != f"{tuned_lr:.3g}":
            raise UserError(f"{tuned} was trained at LR {had:g}; the study asks for {tuned_lr:g}: delete it")
    valid = [d for d in p.domains if shards.has(d, "valid")]  # none: no choice, the continuation stands
    keys = _entry_keys(p, cfg, seq_len, ood, routing, tuned_lr, choose=bool(valid))
    cache = where / "study_scores.json"
    entries = _read_cache(cache)
    got = {name: v for name, k in keys.items() if (v := _hit(entries, name, k)) is not None}
    sets = {"bpb": (shards, "test", list(p.domains)), "valid": (shards, "valid", valid)}
    if ood is not None:
        sets["ood_bpb"] = (ood, "test", [d for d in ood.domains if ood.has(d, "test")])
    common = {"seq_len": seq_len, "batch_size": 16, "max_bytes": cfg.eval_bytes}

    def score_dense(arm: str, run: Path, names: list[str]) -> None:
        names = [n for n in names if n in keys and n not in got]
        if not names:
            return
        if cached_only:
            raise Uncached
        model = load_model(run / "model")
        for name in names:
            sh, split, doms = sets[name.split("/")[1]]
            # valid: all of it, the bytes a sweep chooses on (study/lrs.py, `elmforest sweep`)
            kw = {**common, "max_bytes": None} if split == "valid" else common
            try:
                r = evaluate_shards(model, sh, split, doms, progress=False, **kw)
            except Diverged as e:  # finite in training, not on valid: it loses the choice
                if name != "dense_tuned/valid":
                    raise
                got[name] = {"mean": None, "diverged": f"Diverged on valid: {e}"}
                continue
            per = {d: v["bpb"] for d, v in r["domains"].items()}
            got[name] = {"mean": r["mean_bpb"]} if split == "valid" else per

    score_dense("dense", where / "runs" / "dense", [f"dense/{s}" for s in sets])
    if tuned_lr is not None:  # valid first: a continuation that loses there is not the arm
        score_dense("dense_tuned", tuned, ["dense_tuned/valid"])
        if _continued_wins(got):
            score_dense("dense_tuned", tuned, [f"dense_tuned/{s}" for s in sets])
    forest = Forest.load(where)
    todo = [n for n in keys if n.startswith("btm/") and n not in got]
    if todo and cached_only:
        raise Uncached
    if todo:
        missing = [d for d in forest.data["plan"]["domains"] if d not in forest.names]  # c-BTM: clusters
        if missing:
            raise UserError(f"{where}: expert(s) {missing} were not trained; run the study again")
        pool = make_pool(forest, batch_size=16)
        for name in todo:
            sh, split, doms = sets[name.split("/")[1]]
            r = evaluate_forest_shards(
                forest,
                sh,
                split=split,
                domains=doms,
                prior_batches=cfg.prior_batches,
                pool=pool,
                **routing,
                **common,
            )
            got[name] = {d: v["bpb"] for d, v in r["domains"].items()}
    now = {"version": CACHE_VERSION, "entries": {n: {"key": keys[n], "value": v} for n, v in got.items()}}
    if not cache.is_file() or read_json(cache) != now:  # a rerun that scored nothing leaves it be
        write_json_atomic(cache, now)
    return _scores(p, where, forest, got, tuned_lr, tuned)


def _continued_wins(got: dict) -> bool:
    """The continuation is the arm where it beats the dense run on valid (or nothing can be chosen on:
    no valid split; the continuation stands, as before there was a choice)."""
    if "dense_tuned/valid" not in got:
        return True
    mean = got["dense_tuned/valid"]["mean"]
    return mean is not None and mean < got["dense/valid"]["mean"]


def _scores(p: Point, where: Path, forest: Forest, got: dict, tuned_lr: float | None, tuned: Path) -> dict:
    """{arm: {"flops", "tokens", "bpb", "ood_bpb", ...}} as study.json records them."""

    def sets(arm: str) -> dict:
        return {s: got[f"{arm}/{s}"] for s in ("bpb", "ood_bpb") if f"{arm}/{s}" in got}

    scores: dict = {}
    if p.dense:
        summary = read_json(where / "runs" / "dense" / "summary.json")
        scores["dense"] = {"flops": summary["flops"], "tokens": summary["tokens"], **sets("dense")}
    if tuned_lr is not None:
        chose = "dense_tuned/valid" in got
        valid = (
            {"dense": got["dense/valid"]["mean"], "continued": got["dense_tuned/valid"]["mean"]}
            if chose
            else {}
        )
        if _continued_wins(got):
            summary, seed = read_json(tuned / "summary.json"), forest.data["seed"]
            scores["dense_tuned"] = {
                "flops": seed["flops"] + summary["flops"],  # the seed's (shared), then its own half
                "tokens": seed["tokens"] + summary["tokens"],
                "lr": tuned_lr,
                **({"valid_mean_bpb": valid} if chose else {"not_chosen": "no valid split"}),
                **sets("dense_tuned"),
            }
        else:
            why = got["dense_tuned/valid"].get("diverged")
            lost = {"lr": tuned_lr, "valid_mean_bpb": valid}
            scores["dense_tuned"] = {
                **scores["dense"],
                "same_as": "dense",
                **({"diverged": why} if why else {"lost_on_valid": lost}),
            }
    if p.forest:
        scores["btm"] = {
            "flops": float(forest.total_flops()),
            "tokens": sum(r["tokens"] for r in forest.ledger()),
            **sets("btm"),
        }
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
    tuned_lr: float | None = None  # the dense_tuned run's LR; None: the study asks for none

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
    tuned_lr: float | None = None,
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
        tuned_lr,
    )


def run_score(job: ScoreJob | dict) -> dict:
    """Score one point here (its log: <point>/score.log); returns the scores."""
    job = ScoreJob(**job) if isinstance(job, dict) else job
    return logged(Path(job.where), job.label, job.threads, lambda log: _score(job), log_name="score.log")


class Uncached(Exception):
    """A point has something left to score (`score_point(cached_only=True)`)."""


def score_all(jobs: list[ScoreJob], executor) -> list[dict]:
    """Each point's scores: read here where its cache holds them all, else by the executor (a rerun
    of a finished study started a worker process per point to read its cache)."""
    results: list[dict | None] = [None] * len(jobs)
    todo = []
    for i, j in enumerate(jobs):
        try:
            results[i] = _score(j, cached_only=True)
        except Uncached:
            todo.append(i)
    if todo:
        got = executor.map(
            run_score,
            [asdict(jobs[i]) for i in todo],
            [jobs[i].label for i in todo],
            [jobs[i].log_path() for i in todo],
        )
        for i, r in zip(todo, got, strict=True):
            results[i] = r
    return results


def _score(job: ScoreJob, cached_only: bool = False) -> dict:
    p = Point(**{**job.point, "domains": tuple(job.point["domains"])})
    ood = Shards(job.ood) if job.ood else None
    cfg = StudyConfig(**job.config)
    args = (job.seq_len, job.routing, job.tuned_lr, cached_only)
    return score_point(p, Path(job.where), Shards(job.shards), ood, cfg, *args)
