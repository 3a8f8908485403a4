"""A rerun of `forest expert` for an expert the forest holds already.

Reruns are how interrupted pipelines continue (the quickstart, X-ELM's rounds), so a finished expert is
kept, not trained again. But a rerun that asks for something else (another domain, branch or training
setting) must say so: keeping the old expert silently would let a user believe the new settings ran.
"""

from __future__ import annotations

from elmforest.forest.manifest import Forest
from elmforest.utils.errors import UserError

BRANCHES = "seed, expert:NAME, mixture, nearest[:posterior|typology] or flexolmo"


def check_branch(branch: str) -> None:
    from elmforest.forest.nearest import MEASURES

    kind, _, arg = branch.partition(":")
    ok = (
        branch in ("seed", "mixture", "flexolmo", "nearest")
        or (kind == "expert" and arg)
        or (kind == "nearest" and arg in MEASURES)
    )
    if not ok:
        raise UserError(f"unknown branch {branch!r}; expected {BRANCHES}")


def _same_branch(a: str, b: str) -> bool:
    norm = {"nearest": "nearest:posterior"}
    return norm.get(a, a) == norm.get(b, b)


def check_kept(
    forest: Forest, name: str, trained: list[str], branch: str, overrides: list[str], config=None
) -> None:
    """Refuse a rerun for the existing expert `name` that differs from how it was trained: its domains,
    its --branch (as recorded in the manifest), or a --set that would change its saved run config.
    `config`: the whole run config asked for, when it is not the seed's plus `overrides` (a checkpoint
    seed's experts take the preset, --config and --set each time: comparing `overrides` alone, with
    none given, compared nothing)."""
    from elmforest.config import apply_overrides
    from elmforest.train.runcheck import saved_config, settings_diff

    entry = forest.expert(name)
    redo = (  # reached from `forest expert` and `forest train` (which has no --name or --branch)
        "train another under a new name (`elmforest forest expert --name NEW ...`), or opt it out "
        "(`forest remove`) and train it again (`forest expert ... --force`)"
    )
    if sorted(entry["domains"]) != sorted(trained):
        raise UserError(
            f"{forest.root}: expert {name!r} exists, trained on {entry['domains']}, not {trained}; {redo}"
        )
    was = entry.get("branch")
    if "added_from" in entry and branch != "seed":  # a copy has no branch: "trained as asked" was untrue
        raise UserError(
            f"{forest.root}: expert {name!r} exists, added from outside the forest (`forest add`), not "
            f"branched with --branch {branch} here; {redo}"
        )
    if was is not None and not _same_branch(was, branch):
        raise UserError(
            f"{forest.root}: expert {name!r} exists, branched with --branch {was}, not {branch}; {redo}"
        )
    saved = forest.root / (entry.get("run") or f"runs/{name}") / "run_config.json"
    if (overrides or config is not None) and saved.is_file():
        old = saved_config(saved)
        new = config if config is not None else apply_overrides(old, list(overrides))
        if diff := settings_diff(old, new):
            raise UserError(
                f"{forest.root}: expert {name!r} exists, trained with other settings ({diff}); {redo}"
            )


def set_aside_damaged_run_model(forest: Forest, name: str) -> None:
    """Before an expert is restored from its run's final model, check that model against the digests
    the expert was added with. The two share files (hard links), so damage to one is damage to both;
    restoring from it would record the damaged weights as the expert's. A model that does not match is
    removed, and the run rebuilds it from its last checkpoint (training what is missing)."""
    from elmforest.forest.trust import inside
    from elmforest.utils.io import file_digest, remove_path

    entry = forest.expert(name)
    # resolved: a run folder linked outside the forest is refused, never deleted from
    run = inside(
        forest.root, entry.get("run") or f"runs/{name}", f"expert {name!r}'s run", forest.root / "forest.json"
    )
    model = run / "model"
    recorded = entry.get("files") or {}
    if not model.is_dir() or not recorded:
        return
    for fname, want in recorded.items():
        f = model / fname
        if not f.is_file() or f.stat().st_size != want["bytes"] or file_digest(f)["sha256"] != want["sha256"]:
            from elmforest.train.checkpoint import list_checkpoints

            how = (
                "rebuilding the run's model from its last checkpoint"
                if list_checkpoints(run / "checkpoints")
                else "no checkpoint was kept (train.keep_checkpoints=0): training the run again from its start"
                + (
                    " (the seed)"
                    if entry.get("branch") in (None, "seed")
                    else f" (--branch {entry['branch']})"
                )
            )
            print(
                f"note: {f} is not the file expert {name} was added with either (they share their data); {how}"
            )
            remove_path(model)
            return
