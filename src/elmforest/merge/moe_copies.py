"""The records that let an owner's opt-out reach every copy of its expert that training a merged MoE
makes: the scratch run (checkpoints and model) and the trained MoE are recorded with every forest whose
experts they hold, and forgotten when deleted (forest/optout.py deletes what is recorded)."""

from __future__ import annotations

from pathlib import Path

from elmforest.forest.manifest import Forest
from elmforest.merge.moe import SOURCE_MARKER
from elmforest.utils.io import read_json, remove_path, write_json_atomic


def drop_other_runs(out: Path, tag: str, run_dir: Path, meta: dict, moe_dir: Path) -> None:
    """A scratch run for `out` made from another export (`merge moe --train-router` killed, then run
    again: the merge is written anew, so its fingerprint and run name change) can never be resumed, and
    holds a full copy of the experts and the optimizer state: deleted, unless a trainer still holds it."""
    import re

    from elmforest.train.runlock import unless_training

    pattern = re.compile(rf"{re.escape(out.name)}\.{tag}-[0-9a-f]{{12}}")
    for d in out.parent.glob(f"{out.name}.{tag}-*"):
        if d == run_dir or not pattern.fullmatch(d.name) or not d.is_dir():
            continue
        with unless_training(d) as idle:
            if idle:
                print(
                    f"note: deleting {d}: the scratch run of an earlier export of {out}, which cannot be "
                    "resumed"
                )
                remove_path(d)
        if idle:
            forget(meta, d, moe_dir)


def forget(meta: dict, run_dir: Path, moe_dir: Path | None = None) -> None:
    """The forests' record of a scratch run deleted: opting out has nothing there to find."""
    for f, _ in forests_of(meta, moe_dir):
        f.forget_output(run_dir)


def forests_of(meta: dict, moe_dir: Path | None) -> list[tuple[Forest, list[str]]]:
    """The forests whose experts a merged MoE holds, each with the names of those experts there: the
    forest it was merged from, and (a FlexOlmo merge of owners' pairs given one by one, which names no
    forest) the forests its pairs sit in (merge/flexolmo.py `owners_in_forests`)."""
    from elmforest.merge.flexolmo import owners_in_forests

    out = []
    root = meta.get("forest")
    if root is not None and (Path(root) / "forest.json").is_file():
        names = [e.get("forest_name") or e["name"] for e in meta["experts"] if e["name"] != "public"]
        out.append((Forest.load(root), names))
    flex = moe_dir / "elmforest_flexolmo.json" if moe_dir is not None else None
    if flex is not None and flex.is_file():
        pairs = [Path(p) for p in read_json(flex).get("pairs") or []]
        names = [e["name"] for e in meta["experts"] if e["name"] != "public"]
        if len(pairs) == len(names):
            forests, held, _ = owners_in_forests(names, pairs, None)
            seen = {f.root.resolve() for f, _ in out}
            out += [(f, held[r]) for r, f in forests.items() if r not in seen]
    return out


def record_copies(meta: dict, held: list, run_dir: Path, out: Path, kind: str) -> None:
    """Training a merged MoE copies every expert (the run's checkpoints and model, the trained MoE): mark the
    run with the experts it holds and record both with every forest they came from, so opting an expert
    out deletes them too (forest/optout.py)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        run_dir / SOURCE_MARKER,
        {  # every forest that records it (a FlexOlmo merge of owners' pairs names no one forest)
            "forest": meta.get("forest"),
            "forests": [str(f.root.resolve()) for f, _ in held],
            "experts": meta["experts"],
        },
    )
    for forest, names in held:
        forest.record_output(run_dir, kind, names)
        forest.record_output(out, "moe", names)


def unrecord_if_untouched(meta: dict, run_dir: Path, out: Path, moe_dir: Path) -> None:
    """record_copies undone for a run the trainer refused before writing anything: the folder held only
    its marker and the forests recorded it and an `out` never written."""
    from elmforest.train.runlock import LOCK

    if not run_dir.is_dir() or {p.name for p in run_dir.iterdir()} - {SOURCE_MARKER, LOCK}:
        return
    remove_path(run_dir)
    forget(meta, run_dir, moe_dir)
    if not (out / "elmforest_moe.json").is_file():
        forget(meta, out, moe_dir)
