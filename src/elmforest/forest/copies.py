"""Where copies of an expert's weights are outside its own folders: the merged models this forest
recorded writing from it (manifest `outputs`, found where they were written or at the same place
relative to a copied or moved forest), mixture branches, and the staging or set-aside copies a merge
killed while writing left beside them. Opting out (forest/optout.py) deletes what these find."""

from __future__ import annotations

import json
import os
from pathlib import Path

from elmforest.forest.manifest import Forest
from elmforest.forest.records import MARKERS, marker_forest, marker_meta
from elmforest.train.runlock import training_now
from elmforest.utils.io import clean_stale, parse_temp


def outputs_holding(forest: Forest, name: str, others: list | None = None) -> list[Path]:
    """Merged models known to hold `name`'s weights: recorded outputs and mixture branches whose marker
    still lists it (a re-export without it, or a directory that is no longer ours, is left alone).

    A recorded output is looked for where it was written and at the same place relative to the forest:
    a forest copied or moved together with its merges (`cp -a qs qs2`) finds its own copies, and does
    not delete the original's, which another forest holds (those are appended to `others`)."""
    candidates = []
    for o in forest.data.get("outputs", []):
        if name not in o["experts"]:
            continue
        recorded = Path(o["path"])
        for c in recorded_places(forest, o):
            if not marker_lists(c, name):
                continue
            if ours(forest, c, recorded):
                candidates.append(c)
            elif others is not None:  # another forest's (None: no forest made it, said as a problem)
                found = origins(c)
                others.append((c, marker_forest(c) or (str(found[0]) if found else None)))
    branches = forest.root / "branches"
    if branches.is_dir():
        mixed = [p for p in branches.iterdir() if p.name != name and not p.is_symlink()]
        candidates += [p for p in mixed if marker_lists(p, name)]
    return candidates


def recorded_places(forest: Forest, o: dict) -> list[Path]:
    """Where a recorded output may be: where it was written, and there relative to the forest."""
    recorded = Path(o["path"])
    rel = o.get("relative") or relative_from_marker(recorded)
    return list(
        dict.fromkeys([recorded] + ([Path(os.path.normpath(forest.root.resolve() / rel))] if rel else []))
    )


def temporaries(forest: Forest, name: str) -> list[Path]:
    """The staging and set-aside copies (`.OUT.tmp~HOST~PID`, `.OUT.old~HOST~PID`) of every output
    recorded as holding `name`: a merge killed while writing leaves its shards there."""
    out = []
    for c in output_places(forest, name):
        try:
            entries = list(c.parent.iterdir())
        except OSError:
            continue
        for p in entries:
            t = parse_temp(p.name)
            inner = t and t["name"] and parse_temp(t["name"])
            if t and (inner["name"] if inner else t["name"]) == c.name:
                out.append(p)
    return out


def output_places(forest: Forest, name: str) -> list[Path]:
    return [
        c for o in forest.data.get("outputs", []) if name in o["experts"] for c in recorded_places(forest, o)
    ]


def recorded_places_exist(forest: Forest, o: dict) -> bool:
    rel = o.get("relative")
    return Path(o["path"]).exists() or bool(rel and (forest.root.resolve() / rel).exists())


def relative_from_marker(recorded: Path) -> str | None:
    """Where an output recorded before its place relative to the forest was kept sits from its forest."""
    f = marker_forest(recorded) if recorded.is_dir() else None
    return os.path.relpath(recorded, f) if f else None


def ours(forest: Forest, output: Path, recorded: Path) -> bool:
    """Whether this forest made `output` (or is a copy made together with it), rather than another
    forest whose manifest this one was copied from (a sibling copy finds the original's outputs at the
    same place: only an existing other forest's claim makes them not ours). An output outside the forest
    that names no forest is not ours either: a manifest received from elsewhere could otherwise point a
    removal at any folder whose card lists the expert."""
    root = forest.root.resolve()
    found = origins(output)
    if not found:  # nothing says which forest made it: this one's if inside it; outside, a record in a
        return root in output.resolve().parents  # forest.json (perhaps written by hand) is not enough
    for o in found:
        if o.resolve() == root:
            return True
        if output != recorded and os.path.relpath(recorded, o) == os.path.relpath(output, root):
            return True  # copied or moved together with this forest (found at its place relative to us)
    return not any((o / "forest.json").is_file() for o in found)  # theirs, unless they are gone (moved)


def origins(output: Path) -> list[Path]:
    """The forests a merged output names as its makers: its marker's forest and (a FlexOlmo merge, whose
    owners' pairs may come from several forests) the forests its pairs sit in (FOREST/experts/NAME,
    FOREST/runs/NAME/model, FOREST/branches/NAME), and the forests a scratch run names."""
    made_by = marker_forest(output)
    pairs = marker_meta(output, ("elmforest_flexolmo.json",)).get("pairs") or []
    found = [Path(made_by)] if made_by else []
    found += [Path(f) for f in marker_meta(output).get("forests") or [] if isinstance(f, str) and f]
    for p in (Path(p).parts for p in pairs if isinstance(p, str) and p):  # a pair sits in its forest's
        i = next((i for i in range(len(p) - 2, 0, -1) if p[i] in ("experts", "runs", "branches")), None)
        if i is not None:  # folders for its expert (experts/E, runs/E/model, branches/E: where
            found.append(Path(*p[:i]))  # merge/flexolmo.py owners_in_forests records it), moved or not
    return list(dict.fromkeys(found))


def marker_lists(path: Path, name: str) -> bool:
    for m in MARKERS:
        f = path / m
        if f.is_file():
            try:
                meta = json.loads(f.read_text())
            except (OSError, ValueError):
                return True  # unreadable marker on a recorded output: assume the worst, delete it
            names = meta.get("names") or [
                e.get("forest_name") or e.get("name") for e in meta.get("experts", []) if isinstance(e, dict)
            ]
            weights = meta.get("weights") or [1.0] * len(names)
            return any(n == name and w > 0 for n, w in zip(names, weights, strict=False))
    return False


# the scratch runs of merge/moe_train.py (its _TAGS), by the kind they are recorded under
SCRATCH_KINDS = {"router-run": "merge moe --train-router", "finetune-run": "merge finetune"}


def check_outputs(forest: Forest) -> tuple[list[str], list[str]]:
    """`forest fsck` on the merged models this forest recorded writing: (repairs, notes). Repairs: the
    staging copies a killed merge left beside an output (a rerun of that merge removes them too). Notes,
    which are not problems: an output that is gone (deleted, or moved where opting out cannot find it),
    and the scratch run of a cut fine-tuning, which holds copies of the experts until it is resumed or
    deleted. (A training's ledger row a kill left out is not guessed from the output's card here, which
    also carries the trainings of the model it started from: the rerun of that command writes it.)"""
    fixed, notes = [], []
    for o in forest.data.get("outputs", []):
        places = recorded_places(forest, o)
        for p in places:
            fixed += [f"cleaned up {t} (left by a process that died)" for t in clean_stale(p.parent, p.name)]
        there = [p for p in places if p.exists()]
        mine = [p for p in there if ours(forest, p, Path(o["path"]))]  # not a copied forest's original
        if not there:
            notes.append(
                f"{o['path']} ({o.get('kind')} of {', '.join(o['experts'])}) is not there any more: fine if "
                "it was deleted; a copy moved elsewhere is not found when an expert is opted out"
            )
        elif o.get("kind") in SCRATCH_KINDS and mine and not training_now(mine[0]):
            notes.append(
                f"{mine[0]}: the run of a `{SCRATCH_KINDS[o['kind']]}` that did not finish (it holds "
                f"copies of {', '.join(o['experts'])}): run the same command again to finish it, or delete it"
            )
    return fixed, notes


def stray_work(forest: Forest) -> list[str]:
    """`forest fsck`'s notes on runs/ and branches/ folders no expert names (not problems: a run may be
    training, or be resumed): a cut `forest expert`, whose compute no ledger counts until its command
    runs again, or a mixture branch left when a rerun took another --branch. The dense baseline's runs
    and an opted-out owner's new run are the forest's own; an expert folder beside one is fsck's problem."""
    from elmforest.forest.trust import RESERVED_NAMES  # runs/dense, runs/dense-tuned: the dense baseline's

    known = {*forest.names, *RESERVED_NAMES, *(Path(e["run"]).name for e in forest.experts if e.get("run"))}
    known |= set(forest.removed)  # an owner's new run, or a pending removal's leftover (fsck's problem)
    notes = []
    for area, what in (
        ("runs", "a run no expert names (cut, or still training; its compute is in no ledger until then)"),
        ("branches", "a mixture branch no expert names (left by a cut or changed `forest expert --branch`)"),
    ):
        root = forest.root / area
        for p in sorted(root.iterdir()) if root.is_dir() else []:
            if p.is_dir() and not p.name.startswith(".") and p.name not in known:
                if not (forest.root / "experts" / p.name).exists():
                    notes.append(
                        f"{p}: {what}: run the `forest expert` command that made it again to finish it, or "
                        "delete it"
                    )
    return notes
