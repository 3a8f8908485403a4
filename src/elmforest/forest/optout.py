"""Opting an expert out, and `forest fsck`: a promise to a data owner, kept even across crashes.

Removal is two-phase. First the manifest drops the expert and records a *pending* tombstone (one
atomic, locked write), then everything of the expert is deleted: its checkpoint (experts/NAME), its
training run (runs/NAME), its mixture branch (branches/NAME), mixture branches averaged from it, and
the merged models this forest wrote from it (manifest `outputs`). Only when a check finds none of
them left does the tombstone become *done*. A kill at any point leaves a pending tombstone that
`forest remove` or `forest fsck` finishes; a path that cannot be deleted (a symbolic link to
somewhere outside the forest, a permission error) makes removal fail loudly, naming it. Nothing
outside the forest is deleted except merged outputs that still carry the marker naming the expert.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from elmforest.forest.copies import (
    check_outputs,
    output_places,
    outputs_holding,
    recorded_places,
    recorded_places_exist,
    stray_work,
    temporaries,
)
from elmforest.forest.manifest import Forest, UnknownExpert
from elmforest.forest.records import MARKERS
from elmforest.forest.trust import valid_name
from elmforest.train.runlock import LOCK, training_now
from elmforest.utils.errors import Failed, UserError
from elmforest.utils.io import HOST, clean_stale, parse_temp

AREAS = ("experts", "runs", "branches")


def remove_expert(forest: Forest, name: str) -> dict:
    """Tombstone, delete, verify. Re-running it finishes (or re-checks) an earlier removal."""
    valid_name(name)
    run = forest.root / "runs" / name
    unfinished = name not in forest.names and run.is_dir() and not run.is_symlink()
    if not unfinished:
        return _remove(forest, name, unfinished)
    # an owner leaving while its expert trains: the run holds what it learned so far. Its lock is held
    # through the removal, so no trainer starts on it meanwhile (one that does later is refused: the
    # name is tombstoned)
    from elmforest.utils.io import held_lock

    busy = (
        f"{run} is training now (its trainer holds the run's lock): stop it, then run `forest remove` again"
    )
    with held_lock(run / LOCK, busy):
        return _remove(forest, name, unfinished)


def _remove(forest: Forest, name: str, unfinished: bool) -> dict:
    def tombstone(d):
        entry = next((e for e in d["experts"] if e["name"] == name), None)
        if entry is not None:
            d["experts"] = [e for e in d["experts"] if e["name"] != name]
        elif name not in [r["name"] for r in d.get("removed", [])] and not unfinished:
            raise UnknownExpert(
                f"{forest.root}: no expert named {name!r} (and none was removed); have {forest.names}"
            )
        old = next((r for r in d.get("removed", []) if r["name"] == name), {})
        d["removed"] = [r for r in d.get("removed", []) if r["name"] != name]
        record = {"name": name, "removed": old.get("removed", _now()), "state": "pending"}
        domains = (entry or {}).get("domains") or old.get("domains")
        if domains:  # what it trained on, for the note on what the seed saw
            record["domains"] = list(domains)
        if files := (entry or {}).get("files") or old.get("files"):  # its weights, never added back as
            record["files"] = files  # another expert (forest/manifest.py's add)
        # the compute that ran for it leaves the ledger with it, and is kept here
        spent = old.get("spent") or []
        if entry is not None:  # (an expert re-added after an opt-out carries what that one discarded)
            spent = (
                spent
                + entry.get("spent_before", [])
                + [
                    {
                        "phase": "expert",
                        "name": name,
                        "tokens": entry.get("tokens", 0),
                        "flops": entry.get("flops", 0),
                    }
                ]
            )
        d["removed"].append({**record, "spent": spent})

    forest.update(tombstone)  # manifest first: from here on the expert is out, whatever happens next
    return finish_removal(forest, name, run_locked_here=unfinished)


def finish_removal(forest: Forest, name: str, run_locked_here: bool = False) -> dict:
    """Delete what is left of `name`, then verify nothing is; mark the tombstone done or fail loudly.
    `run_locked_here`: the caller holds the run's trainer lock (no trainer can be on it)."""
    problems, deleted, others = [], [], []
    for c in output_places(forest, name):  # a killed merge's stage: deleted; a set-aside copy: put back,
        clean_stale(c.parent, c.name)  # then found below by its marker
    for p in temporaries(forest, name):
        t = parse_temp(p.name)
        problems.append(
            f"{p} is being written by a running process (a merge of {name}'s weights): stop it, then run "
            "`forest remove` again"
            if t["host"] == HOST
            else f"{p} holds a copy of {name}'s weights left by a merge on host {t['host']} (process "
            f"{t['pid']}), which cannot be checked from here: once no merge runs there, delete it, then "
            "run `forest remove` again"
        )
    tomb = next((r for r in forest.data.get("removed", []) if r["name"] == name), {})
    run = forest.root / "runs" / name  # the owner's own, if it trains the expert again (--force)
    owners = tomb.get("retraining") or (not run_locked_here and training_now(run))
    areas = [a for a in AREAS if a != "runs" or not owners]
    places = [forest.root / area / name for area in areas] + outputs_holding(forest, name, others)
    problems += [
        f"{c} holds {name}'s weights by its card and is recorded in this forest's manifest, but names no "
        f"forest that made it and lies outside {forest.root}: not deleted (a manifest alone never makes "
        "elmforest delete outside its forest); delete it yourself if it is this forest's, then run `forest "
        "remove` again"
        for c, made_by in others
        if made_by is None
    ]
    # ledger rows name their output resolved; a recorded output deleted by a killed earlier attempt
    # has no marker left to find it by
    held = {str(p.resolve()) for p in places} | {
        str(Path(o["path"]).resolve()) for o in forest.data.get("outputs", []) if name in o["experts"]
    }
    unverified = _unverified(forest, name, places)  # before deleting: what is gone then was found
    from elmforest.forest import digests

    digests.forget(forest.root, f"experts/{name}/")  # its cached sums go with it
    for p in places:
        if p.is_symlink():
            if p.exists():
                problems.append(
                    f"{p} is a symbolic link to {p.resolve()}: elmforest deletes nothing outside the forest "
                    "through a link; delete that yourself, then run `forest remove` again"
                )
                continue
            p.unlink()  # a dangling link: the link itself is all there is
            deleted.append(str(p))
        elif p.exists():
            error = _delete_tree(p)
            if error:
                problems.append(f"could not delete {p} ({error})")
            deleted.append(str(p))
    clean_stale(forest.root / "experts", name)  # a copy of it staged by a killed `add`
    left = [str(p) for p in places if p.is_symlink() or p.exists()]
    if left or problems:
        raise Failed(
            f"{forest.root}: expert {name!r} is out of the manifest but not all of it is gone: "
            + "; ".join(problems or [f"{p} remains" for p in left])
            + ". Its removal stays pending: fix that, then run `elmforest forest remove` or `forest fsck` again"
        )

    def done(d):
        # phases of merged outputs deleted with it (their fine-tuning) move to its tombstone, so the
        # ledger is uniformly what the forest and its outputs now hold cost
        # (where each sits for this forest: a copied forest's row still names the original's output, which
        # is another forest's and stays)
        theirs = {str(Path(c).resolve()) for c, _ in others}
        gone = [
            p
            for p in d.get("ledger", [])
            if (at := (forest.ledger_places(p) & held) - theirs) and not any(Path(x).exists() for x in at)
        ]
        for r in d.get("removed", []):
            if r["name"] == name:
                r.update(state="done", verified=_now())
                r["spent"] = r.get("spent", []) + gone
                if unverified:  # the trace of a copy that may still hold its weights, kept
                    r["unverified"] = unverified
        d["ledger"] = [p for p in d.get("ledger", []) if p not in gone]
        # a record stays while its output is where it was written or where it sits relative to us (a moved
        # forest's records must still find the merges of its other experts)
        d["outputs"] = [o for o in d.get("outputs", []) if recorded_places_exist(forest, o)]

    forest.update(done)
    derived = [  # branched from it, or its weights added again under another name (forest add)
        e["name"]
        for e in forest.experts
        if name in [p["name"] for p in e.get("parents", [])] or e.get("copy_of") == name
    ]
    return {
        "name": name,
        "deleted": deleted,
        "derived": derived,
        "derived_runs": _runs_begun_from(forest, [forest.root / "experts" / name, *map(Path, deleted)]),
        "seed_saw_it": _seed_saw(forest, name),
        "other_forests": [(str(p), f) for p, f in others],
        "unverified": unverified,
    }


def _unverified(forest: Forest, name: str, places: list[Path]) -> list[dict]:
    """Recorded outputs holding `name` that the removal can neither delete nor clear: not where they were
    written nor there relative to the forest (moved: a copy that still holds its weights, or deleted by
    an earlier attempt of this removal), or there without the card that says what they hold (deleted
    only while it lists the expert, docs/design.md). Said, and kept in the tombstone: the output's
    record leaves the manifest, and with it the last trace of such a copy."""
    out = []
    for o in forest.data.get("outputs", []):
        if name not in o["experts"]:
            continue
        found = [c for c in recorded_places(forest, o) if c.exists() or c.is_symlink()]
        if not found:
            why = "not found where it was written: moved (a copy that still holds its weights), or deleted"
            out.append({"path": o["path"], "why": why})
        for c in found:
            if c.is_dir() and c not in places and not any((c / m).is_file() for m in MARKERS):
                out.append({"path": str(c), "why": "no card of what it holds (elmforest_*.json): kept"})
    return out


def _runs_begun_from(forest: Forest, sources: list[Path]) -> list[str]:
    """Runs not (yet) an expert that began from one of `sources` (the removed expert's folder, a mixture
    branch averaged from it): a cut `forest expert --branch nearest|mixture|expert:NAME` whose
    checkpoints carry what the removed expert learned, which no manifest entry names."""
    from elmforest.train.runcheck import saved_config

    gone = {str(p.resolve()) for p in sources}
    out = []
    runs = forest.root / "runs"
    for r in sorted(runs.iterdir()) if runs.is_dir() else []:
        cfg = r / "run_config.json"
        if r.name in forest.names or r.is_symlink() or not cfg.is_file():
            continue
        try:
            c = saved_config(cfg)
        except (UserError, ValueError, OSError):  # a damaged config of a run no expert names: not said here
            continue
        if any(x and str(Path(x).resolve()) in gone for x in (c.model.init_from, c.train.init_checkpoint)):
            out.append(str(r))  # (the forest writes both resolved)
    return out


def _delete_tree(p: Path) -> str | None:
    """Delete a directory tree, returning the first error instead of ignoring it."""
    errors = []
    shutil.rmtree(p, onerror=lambda fn, path, exc: errors.append(f"{path}: {exc[1]}"))
    return errors[0] if errors else None


def _seed_saw(forest: Forest, name: str) -> bool:
    """Whether the seed's mixture included one of this expert's domains (BTM's seed trains on every
    domain of its plan). A seed taken from a checkpoint (`--from-checkpoint`) was not trained here:
    what it saw is not known, so nothing is claimed."""
    seed = forest.data.get("seed") or {}
    if "config" not in seed:
        return False
    gone = [r for r in forest.data.get("removed", []) if r.get("name") == name]
    domains = (gone[-1].get("domains") if gone else None) or [name]
    mixed = (forest.data.get("plan") or {}).get("domains")
    return mixed is None or any(d in mixed for d in domains)


def mark_retraining(forest: Forest, name: str) -> None:
    """The owner trains an opted-out expert again (`forest expert --force`): its tombstone says so, so
    `forest fsck` does not take the new run for what the removal left (a new `forest remove` clears it)."""

    def mark(d):
        for r in d.get("removed", []):
            if r["name"] == name:
                r["retraining"] = _now()

    forest.update(mark)


def pending(forest: Forest) -> list[str]:
    return [r["name"] for r in forest.data.get("removed", []) if r.get("state") == "pending"]


def fsck(forest: Forest, deep: bool = True) -> tuple[list[str], list[str], list[str]]:
    """(what was repaired, what is still wrong, notes). Finishes pending removals, re-checks finished ones,
    removes temporary files of dead processes (in the forest and beside its recorded outputs), checks each
    expert's checkpoint (`deep`: checksums); notes what is left of the recorded outputs (check_outputs)."""
    fixed, wrong = [], []
    for r in forest.data.get("removed", []):
        name = r["name"]
        leftover = [p for p in (forest.root / a / name for a in AREAS) if p.is_symlink() or p.exists()]
        if r.get("state") == "done" and not (
            leftover or outputs_holding(forest, name) or temporaries(forest, name)
        ):
            continue
        if r.get("state") == "done" and r.get("retraining"):  # the owner's new run, live or cut: kept
            if not training_now(forest.root / "runs" / name):
                wrong.append(
                    f"expert {name}: opted out, and its owner began training it again (forest expert --force, "
                    f"{r['retraining']}), not finished: run that again to finish it, or `forest remove` "
                    "it again to delete its run"
                )
            continue
        try:
            rep = finish_removal(forest, name)
            fixed.append(
                f"finished removing expert {name}: deleted {', '.join(rep['deleted']) or 'nothing left'}"
            )
        except Failed as e:
            wrong.append(str(e))
    dirs = [forest.root, forest.root / "experts", forest.root / "branches", forest.root / "runs"]
    runs = forest.root / "runs"
    if runs.is_dir():
        for r in runs.iterdir():
            if r.is_dir() and not r.is_symlink():
                dirs += [r, r / "checkpoints"]
    foreign = []  # another host's process cannot be checked from here: said, never deleted
    for d in dirs:
        for p in clean_stale(d):
            fixed.append(f"removed {p} (left by a process that died)")
        try:
            foreign += [p for p in d.iterdir() if (t := parse_temp(p.name)) and t["host"] != HOST]
        except OSError:
            pass
    for name in forest.names:
        problem = forest.intact(name, deep=deep)
        if problem:
            e = forest.expert(name)
            # added from outside (`forest add`; before added_from was recorded, its only parent "external")
            external = "added_from" in e or [p.get("name") for p in e.get("parents", [])] == ["external"]
            wrong.append(
                f"expert {name}: {problem}; "
                + (
                    "it was added from outside the forest (`forest add`): copy its files back from the "
                    "original, or opt it out (`forest remove`)"
                    if external
                    else f"`elmforest forest train` (or `forest expert`) restores it from runs/{name} or "
                    "trains it again"
                )
            )
    wrong += _seed_problems(forest)
    if problem := forest.clusterer_problem():
        wrong.append(problem)
    known = set(forest.names)
    experts = forest.root / "experts"
    if experts.is_dir():
        for p in experts.iterdir():
            if not p.name.startswith(".") and p.name not in known:
                # trained here, cut before the manifest recorded it: `forest add` would record a copy (no
                # lineage, 0 FLOPs, kept as such for good); the command that trained it records it
                ran = (forest.root / "runs" / p.name / "summary.json").is_file()
                wrong.append(
                    f"{p} belongs to no expert of the manifest ("
                    + (
                        f"trained here by runs/{p.name}, cut before it was recorded: run the `forest expert` "
                        "(or `forest train`) command that trained it again, which records it with its "
                        "lineage and FLOPs; not `forest add`, which records a copy"
                        if ran
                        else "delete it, or `forest add` it"
                    )
                    + ")"
                )
    repaired, notes = check_outputs(forest)
    notes += [
        f"{p}: a temporary of a process on host {parse_temp(p.name)['host']}, which cannot be checked from "
        "here: once nothing of that host writes to this forest, delete it"
        for p in foreign
    ]
    return fixed + repaired, wrong, notes + stray_work(forest)


def _seed_problems(forest: Forest) -> list[str]:
    """The seed has no recorded checksums (it is not an expert), but its folders must be whole: every
    new expert branches from them (seed_state: the weights and optimizer state the experts continue)."""
    from safetensors import safe_open

    if not forest.data.get("seed"):
        return []
    advice = (
        "new experts branch from it (and `merge moe --shared seed` reads it): copy it back from a backup; "
        "experts already trained are not affected"
    )
    seed, state = forest.seed_dir, forest.root / "seed_state"
    if not (seed / "config.json").is_file():
        return [f"the seed: {seed / 'config.json'} is missing; {advice}"]
    files = [f for f in seed.iterdir() if f.name.endswith(".safetensors")]
    if not files:
        return [f"the seed: {seed} holds no weights; {advice}"]
    if "config" in forest.data["seed"]:  # a trained seed: its experts continue its state
        if not state.is_dir():
            return [f"the seed: {state} (its weights and optimizer state) is missing; {advice}"]
        files += [f for f in state.iterdir() if f.name.endswith(".safetensors")]
    for f in files:
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # safetensors' own error type: a header cut short or not covering the data
            return [f"the seed: {f} cannot be read ({str(e).splitlines()[0]}); {advice}"]
    return []


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
