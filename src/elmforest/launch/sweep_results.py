"""What a sweep's points scored on the valid split, the LR chosen from them, and the sweep as tables.

Apart from launch/sweep.py, which plans and runs the points, because benchmarks score and choose
forests they trained themselves (bench/moe_quality.py, bench/cbtm_quality.py) with the same criterion
and the same record of a diverged point, without a sweep's planning around them.
"""

from __future__ import annotations

import math
from pathlib import Path

from elmforest.data.shards import Shards
from elmforest.eval.bpb import evaluate_shards
from elmforest.forest.manifest import Forest
from elmforest.model.build import load_model
from elmforest.utils.device import scored_on
from elmforest.utils.errors import Diverged, UserError
from elmforest.utils.io import read_json, write_json_atomic

DIVERGED = "diverged.json"  # in a point's directory: its training hit a non-finite loss


def _diverged(point: Path) -> dict | None:
    if (point / DIVERGED).is_file():
        return {"valid_mean_bpb": None, "diverged": read_json(point / DIVERGED)["why"], "domains": {}}
    return None


def dead(run_dir: Path) -> str | None:
    """Why a run that ended with finite numbers is as diverged as a non-finite one: its last logged
    gradient norm is exactly 0 (a blow-up killed every unit; the loss then sits at the log of the
    vocabulary and its BPB can beat the grid's other diverged points), else None."""
    from elmforest.utils.io import read_jsonl

    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "grad_norm" in r]
    if rows and rows[-1]["grad_norm"] == 0.0:
        return (
            f"Diverged: the gradients vanished (grad norm 0 at step {rows[-1].get('step')}): a dead network"
        )
    return None


def scored_domains(shards: Shards, domains: list[str], log=None) -> list[str]:
    """The domains an LR is chosen on: those with a valid split. A domain with training documents but
    no valid ones (a small c-BTM cluster of a subsample, a user's domain of a handful of documents)
    still trains in every arm, as it does in the forest the sweep tunes for; refusing the whole sweep
    for it stopped a study with `lr_grid` at its c-BTM cluster sets."""
    if missing := [d for d in domains if not shards.has(d, "train")]:
        raise UserError(f"{shards.root}: no train split for {', '.join(missing)}: nothing to sweep there")
    scored = [d for d in domains if shards.has(d, "valid")]
    if not scored:
        raise UserError(f"{shards.root}: none of {', '.join(domains)} has a valid split to choose an LR on")
    if len(scored) < len(domains) and log is not None:
        bare = ", ".join(d for d in domains if d not in scored)
        log(f"note: {bare}: no valid documents in {shards.root}; trained, but the LR is chosen on the others")
    return scored


def choose(points: list[dict]) -> dict:
    """The best finite point; an edge is judged against the whole grid (a diverged LR above the best
    one bounds it as well as a worse one does)."""
    ok = [p for p in points if p.get("valid_mean_bpb") is not None and math.isfinite(p["valid_mean_bpb"])]
    if not ok:
        raise UserError("every LR of the grid diverged: sweep lower learning rates")
    best = min(ok, key=lambda p: p["valid_mean_bpb"])
    lrs = [p["lr"] for p in points]
    edge = None
    if best["lr"] == min(lrs):
        edge = "lowest"
    elif best["lr"] == max(lrs):
        edge = "highest"
    return {"best_lr": best["lr"], "best_valid_mean_bpb": best["valid_mean_bpb"], "at_edge": edge}


def _cached(path: Path, key: dict) -> dict | None:
    """A point's valid scores, unless they were measured otherwise: on other bytes, shards, domains,
    windows or groups (keyed by the bytes alone, a call with other domains or seq_len got the first
    call's scores)."""
    if path.is_file():
        got = read_json(path)
        # a score made before "scored_on" was recorded: taken as made here, as the study's cache does
        if all(got.get(k) == v for k, v in key.items() if k != "scored_on" or k in got):
            return _point(got)
    return None


def _point(scores: dict) -> dict:
    """What a sweep point reports of its scores (the key they were cached under stays in valid.json)."""
    return {k: scores[k] for k in ("valid_mean_bpb", "domains", "max_bytes")}


def _key(shards: Shards, domains: list[str], seq_len: int, max_bytes, experts=None) -> dict:
    return {
        "max_bytes": max_bytes,
        "shards_fingerprint": shards.fingerprint,
        "scored_domains": list(domains),
        "seq_len": seq_len,
        "groups": experts,
        "scored_on": scored_on(),  # device and precision: a sweep resumed elsewhere scores again
    }


def score_dense(
    point: Path, shards: Shards, domains: list[str], seq_len: int, max_bytes: int | None = None
) -> dict:
    """The dense run's valid BPB, macro-averaged over the domains as the comparison reports it."""
    if (bad := _diverged(point)) is not None:
        return bad
    key = _key(shards, domains, seq_len, max_bytes)
    if (hit := _cached(point / "valid.json", key)) is not None:
        return hit
    if why := dead(point / "runs" / "dense"):
        write_json_atomic(point / DIVERGED, {"job": "dense", "why": why})
        return _diverged(point)
    try:
        model = load_model(point / "runs" / "dense" / "model")
        res = evaluate_shards(model, shards, "valid", domains, seq_len, max_bytes=max_bytes, progress=False)
    except Diverged as e:  # finite training loss, non-finite on valid: as diverged as it gets
        write_json_atomic(point / DIVERGED, {"job": "dense", "why": f"Diverged: {e}"})
        return _diverged(point)
    per = {d: v["bpb"] for d, v in res["domains"].items()}
    out = {"valid_mean_bpb": res["mean_bpb"], "domains": per, **key}
    write_json_atomic(point / "valid.json", out)
    return _point(out)


def score_experts(
    forest: Forest,
    shards: Shards,
    domains: list[str],
    seq_len: int,
    experts: dict[str, list[str]] | None = None,
    max_bytes: int | None = None,
) -> dict:
    """Each domain's valid BPB under the expert trained on it, and their mean over domains (cached in
    the forest). That expert is the domain's own, or with `experts` ({expert name: [domains]}: X-ELM's
    groups) the one whose group holds the domain, as X-ELM routes a known language."""
    if (bad := _diverged(forest.root)) is not None:
        return bad
    cached = forest.root / "valid.json"
    key = _key(shards, domains, seq_len, max_bytes, experts)
    if (hit := _cached(cached, key)) is not None:
        return hit
    experts = experts or {n: [n] for n in forest.names}  # one per domain, named after it; unscored too
    per = {}
    for name in experts:  # every expert, scored or not: one that died makes the whole LR diverged
        if why := dead(forest.root / "runs" / name):
            write_json_atomic(forest.root / DIVERGED, {"job": name, "why": why})
            return _diverged(forest.root)
    for name, mine in experts.items():
        if not (mine := [d for d in mine if d in domains]):  # its domains have no valid documents
            continue
        try:
            model = load_model(forest.expert_dir(name))
            res = evaluate_shards(model, shards, "valid", mine, seq_len, max_bytes=max_bytes, progress=False)
        except Diverged as e:
            write_json_atomic(forest.root / DIVERGED, {"job": name, "why": f"Diverged: {e}"})
            return _diverged(forest.root)
        per.update({d: res["domains"][d]["bpb"] for d in mine})
    per = {d: per[d] for d in domains}
    out = {"valid_mean_bpb": sum(per.values()) / len(per), "domains": per, **key}
    write_json_atomic(cached, out)
    return _point(out)


def format_sweep(result: dict) -> str:
    """The sweep as Markdown tables, with the choice (and an edge warning) under each."""
    names = {"dense": "dense", "experts": "experts", "dense_continue": "dense continuation"}
    arms = [(names[a], result.get(a), result["criterion"].get(a)) for a in names]
    arms += [
        (f"experts {label}", r, result["criterion"]["grouped"])
        for label, r in result.get("grouped", {}).items()
    ]
    lines = []
    for arm, r, criterion in arms:
        if not r:
            continue
        domains = next(list(p["domains"]) for p in r["points"] if p["domains"])
        scored = f", first {r['max_bytes']} valid bytes per domain" if r.get("max_bytes") else ""
        lines.append(f"{arm} arm ({criterion}{scored}):")
        lines.append("| LR | mean valid BPB | " + " | ".join(domains) + " |")
        lines.append("| ---: | ---: | " + " | ".join("---:" for _ in domains) + " |")
        for p in r["points"]:
            mark = " **" if p["lr"] == r["best_lr"] else ""
            if p.get("diverged"):
                lines.append(f"| {p['lr']:g} | diverged | " + " | ".join("-" for _ in domains) + " |")
                continue
            cells = " | ".join(f"{p['domains'][d]:.4f}" for d in domains)
            lines.append(f"| {p['lr']:g}{mark} | {p['valid_mean_bpb']:.4f} | {cells} |")
        if arm == "dense continuation":
            lines.append(
                f"the dense run at LR {r['seed_lr']:g} continued from its seed; at {r['seed_lr']:g}, that run itself"
            )
        if "groups" in r:
            lines.append("groups: " + "; ".join(f"{g} = {', '.join(ms)}" for g, ms in r["groups"].items()))
        note = f"best {arm} LR {r['best_lr']:g} (mean valid BPB {r['best_valid_mean_bpb']:.4f})"
        if r["at_edge"]:
            note += (
                f" -- WARNING: at the {r['at_edge']} end of the grid; the optimum may lie outside it, "
                "extend the grid"
            )
        lines.append(note)
        lines.append("")
    return "\n".join(lines)
