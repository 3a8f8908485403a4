"""What a checkpoint must be to join a forest: the forest's tokenizer and architecture (or the derived
shape it started from), and not the weights of an expert its owner opted out. Kept apart from the
manifest's bookkeeping (forest/manifest.py), which calls these under its lock or before staging."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from elmforest.forest.fingerprint import (
    architecture_config,
    architecture_fingerprint,
    config_difference,
    tokenizer_fingerprint,
)
from elmforest.utils.errors import UserError

if TYPE_CHECKING:
    from elmforest.forest.manifest import Forest


def not_a_copy(d: dict, entry: dict, force: bool, ran: bool = False) -> None:
    """A copy of an opted-out expert (its weight files, byte for byte: its tombstone holds their
    digests) brings back what its owner withdrew under a new name: refused (`force`: the owner re-adding
    its own, under its name). A copy of an expert in the forest is one training run: it is counted once,
    the copy at 0 tokens and 0 FLOPs (`copy_of` names the original), said. `ran`: the entry is a run
    that trained here (deterministic training of the same domain and settings gives the same files):
    `copy_of` is kept, and its compute counted, since it ran."""
    name, files = entry["name"], entry["files"]
    if not files:
        return
    twins = (  # not a copy of this very expert (restored from its run: its copy is not its original)
        e["name"]
        for e in d["experts"]
        if e["name"] != name and e.get("files") == files and e.get("copy_of") != name
    )
    if twin := next(twins, None):
        if ran:
            print(
                f"note: expert {name!r} trained to expert {twin!r}'s weights, file for file (the same domain "
                "and settings): one model twice; its run's tokens and FLOPs are counted, it ran",
                file=sys.stderr,
            )
            entry["copy_of"] = twin
        else:
            if entry["tokens"] or entry["flops"]:
                print(
                    f"note: expert {name!r} is expert {twin!r}'s weights, file for file: one model, counted "
                    f"once (under {twin!r}); {name!r} adds 0 tokens and 0 FLOPs to the ledger (a copy's "
                    "record is not a run)",
                    file=sys.stderr,
                )
            entry.update(tokens=0, flops=0, copy_of=twin)
    gone = next((r["name"] for r in d.get("removed", []) if r.get("files") == files), None)
    if gone is not None and not (force and gone == name):
        raise UserError(
            f"expert {name!r}: its weights are those of expert {gone!r}, opted out (forest remove); its "
            "owner's choice is not undone by adding them under another name"
        )


def check_compatible(forest: Forest, model_dir: Path, architecture: str | None = None) -> tuple[str, str]:
    """The tokenizer and architecture fingerprints of a checkpoint that may join `forest`, refused with
    what differs when it may not. `architecture`: the derived shape it must have instead of the seed's
    (a FlexOlmo owner's pair)."""
    tok, arch = tokenizer_fingerprint(model_dir), architecture_fingerprint(model_dir)
    if forest.data.get("tokenizer") and tok != forest.data["tokenizer"]:
        raise UserError(
            f"{model_dir}: its tokenizer (fingerprint {tok}) differs from the forest's "
            f"({forest.data['tokenizer']}); experts of one forest must share a tokenizer"
        )
    if architecture is not None:  # an expert of another, derived shape (a FlexOlmo owner's pair)
        if not forest.data.get("architecture"):
            raise UserError(f"{forest.root}: no seed yet; an expert of a derived architecture needs one")
        if arch != architecture:
            raise UserError(
                f"{model_dir}: its architecture (fingerprint {arch}) is not the {architecture} it "
                "started from; its shape changed in training"
            )
        return tok, arch
    recorded = forest.data.get("architecture")
    # what the forest holds of that architecture: the seed, else its first intact expert
    held = [forest.seed_dir] if forest.seed_dir is not None else []
    held += [forest.expert_dir(n) for n in forest.names[:1] if forest.intact(n) is None]
    ref = next((d for d in held if (d / "config.json").is_file()), None)
    same = (  # a forest written before the fingerprint was normalised (or by another transformers)
        not recorded
        or recorded in (arch, architecture_fingerprint(model_dir, raw=True))
        or (ref is not None and arch == architecture_fingerprint(ref))
    )
    if not same:
        gone = [r["name"] for r in forest.data.get("removed", [])]
        differs = (
            f" ({config_difference(architecture_config(model_dir), architecture_config(ref))}; this "
            "checkpoint's value first)"
            if ref is not None
            else f" (set by expert(s) {gone}, opted out since; a forest keeps its architecture: start "
            "another forest for this one)"
            if gone
            else ""
        )
        raise UserError(
            f"{model_dir}: its architecture (fingerprint {arch}) differs from the forest's "
            f"({recorded}){differs}; experts must share the seed's architecture"
        )
    return tok, recorded or arch
