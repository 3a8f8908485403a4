"""The forest on disk: `forest.json` plus one Hugging Face checkpoint directory per expert.

    forest.json          manifest (written atomically): tokenizer and architecture fingerprints,
                         the seed, and one entry per expert with its lineage and compute
    seed/                the seed LM (HF checkpoint), when the forest was grown from one
    experts/<name>/      each expert's HF checkpoint (safetensors + tokenizer)

Experts may come from anywhere (another machine, another data owner): `add` checks that their
tokenizer and architecture match the forest's before anything is written, and takes in regular
files only. A manifest is checked whenever it is read (forest/trust.py): names, paths inside the
forest, structure. Removing an expert (forest/optout.py) changes nothing else.
"""

from __future__ import annotations

import copy
import fcntl
from contextlib import contextmanager
from pathlib import Path

from elmforest.forest.admission import check_compatible, not_a_copy
from elmforest.forest.records import ForestRecords, _now
from elmforest.forest.staging import WEIGHT_SUFFIXES, _copy_checkpoint, _stage_checkpoint, weight_digests
from elmforest.forest.trust import (
    RESERVED_NAMES,
    case_twin,
    check_finite,
    check_manifest,
    check_weights,
    count,
    inside,
    valid_name,
)
from elmforest.model.build import resolve_model_dir
from elmforest.utils.errors import AlreadyExists, NotFound, UserError
from elmforest.utils.io import (
    clean_stale,
    read_json,
    remove_path,
    replace_dir,
    write_json_atomic,
)

VERSION = 1


class UnknownExpert(UserError, LookupError):
    """No expert of that name in the forest."""


__all__ = ["RESERVED_NAMES", "Forest", "UnknownExpert", "valid_name"]


def _in_plan_order(d: dict, experts: list[dict]) -> list[dict]:
    """Experts in the order of the plan's domains (the ones it does not name after them, as added):
    experts trained side by side finish in any order, and that order became the MoE's expert index,
    the tables' columns and the ensemble's, different from one run to the next."""
    rank = {n: i for i, n in enumerate((d.get("plan") or {}).get("domains") or [])}
    return sorted(experts, key=lambda e: rank.get(e["name"], len(rank)))


class Forest(ForestRecords):
    """One forest on disk: `root` and its manifest `data` as last read. `Forest.load(root)` reads it,
    `Forest.init(root)` makes one; every change goes through `update`, under the manifest's lock."""

    def __init__(self, root: str | Path, data: dict):
        self.root = Path(root)
        self.data = data

    # -- creation and persistence ---------------------------------------------------------------
    @classmethod
    def init(cls, root: str | Path, exist_ok: bool = False) -> Forest:
        root = Path(root)
        if (root / "forest.json").exists():
            if exist_ok:
                return cls.load(root)
            raise AlreadyExists(f"{root} already holds a forest (forest.json)")
        root.mkdir(parents=True, exist_ok=True)
        f = cls(
            root,
            {
                "version": VERSION,
                "created": _now(),
                "tokenizer": None,
                "architecture": None,
                "seed": None,
                "experts": [],
            },
        )
        with f._locked():  # checked again under the lock: another process may have made it meanwhile,
            made = not (root / "forest.json").exists()  # and added experts an empty one would erase
            if made:
                write_json_atomic(root / "forest.json", f.data)
        if made:
            return f
        if exist_ok:
            return cls.load(root)
        raise AlreadyExists(f"{root} already holds a forest (forest.json)")

    @classmethod
    def load(cls, root: str | Path) -> Forest:
        """The forest at `root`, its manifest checked (forest/trust.py); NotFound where there is none."""
        root = Path(root)
        path = root / "forest.json"
        if not path.is_file():
            raise NotFound(f"{root}: not a forest (no forest.json); create one with `elmforest forest init`")
        forest = cls(root, _read_manifest(root))
        for d in (root, root / "experts"):  # put back a checkpoint whose swap a kill interrupted
            clean_stale(d, restore_only=True)
        return forest

    def reload(self) -> Forest:
        """Re-read the manifest: jobs in other processes (or on Ray) add their experts to it on disk."""
        self.data = Forest.load(self.root).data
        return self

    def save(self) -> None:
        with self._locked():
            write_json_atomic(self.root / "forest.json", self.data)

    @contextmanager
    def _locked(self):
        with open(self.root / ".forest.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def update(self, change, before_write=None) -> None:
        """Apply `change(data)` to the manifest on disk under a lock, so experts finishing at the same
        time in different processes never overwrite each other's entries. `before_write()` runs under
        the same lock once the changed manifest passed its checks (a checkpoint put in place: not before
        a manifest that would be refused, which left new weights under the old entry)."""
        with self._locked():
            path = self.root / "forest.json"
            self.data = _read_manifest(self.root) if path.is_file() else self.data
            on_disk = copy.deepcopy(self.data)
            try:
                change(self.data)
                check_manifest(self.data, self.root, path)
                # the new manifest on disk first: a disk too full for it refuses before the weights
                # move, so "nothing was changed" holds
                write_json_atomic(path, self.data, before_replace=before_write)
            except BaseException:
                self.data = on_disk  # a refused change is not kept in memory either
                raise

    @property
    def removed(self) -> list[str]:
        return [r["name"] for r in self.data.get("removed", [])]

    def check_new_name(self, name: str) -> None:
        """A name an expert may take here: checked before its training too (a clash found when the trained
        expert was added left a run that no ledger counted), against the opted-out names as well (their
        runs' folders)."""
        valid_name(name)
        if name not in self.names and (
            twin := case_twin(name, [*sorted(RESERVED_NAMES), *self.names, *self.removed])
        ):
            whose = (
                f"the reserved name {twin!r} (any case: {', '.join(sorted(RESERVED_NAMES))})"
                if twin in RESERVED_NAMES
                else f"expert {twin!r}" + (" (opted out)" if twin in self.removed else "")
            )
            raise UserError(
                f"{self.root}: expert {name!r} differs from {whose} only in case: one folder on a file "
                "system that does not keep case (macOS, Windows); add it under another --name"
            )

    # -- queries -----------------------------------------------------------------------------------
    @property
    def experts(self) -> list[dict]:
        return list(self.data["experts"])

    @property
    def names(self) -> list[str]:
        return [e["name"] for e in self.data["experts"]]

    def expert(self, name: str) -> dict:
        for e in self.data["experts"]:
            if e["name"] == name:
                return e
        raise UnknownExpert(f"{self.root}: no expert named {name!r}; have {self.names}")

    def expert_dir(self, name: str) -> Path:
        return inside(self.root, self.expert(name)["path"], f"expert {name!r}", self.root / "forest.json")

    def expert_dirs(self) -> list[Path]:
        return [self.expert_dir(n) for n in self.names]

    def intact(self, name: str, deep: bool = False, trust_unchanged: bool = False) -> str | None:
        """None when the expert's checkpoint is all there (config, weights of the recorded sizes; `deep`:
        their checksums too, not read again for a file unchanged since they last matched with
        `trust_unchanged`: forest/digests.py), else what is wrong."""
        from elmforest.forest.digests import DigestCheck

        d = self.expert_dir(name)
        if d.is_symlink() or not d.is_dir():
            return f"{d} is missing"
        if (d / "config.json").is_symlink() or not (d / "config.json").is_file():
            return f"{d / 'config.json'} is missing (or a symbolic link)"
        recorded = self.expert(name).get("files") or {}
        if not recorded and not any(f.name.endswith(WEIGHT_SUFFIXES) for f in d.iterdir()):
            return f"{d} holds no weights"
        if not recorded:  # a hand-written or older entry: no sizes or sums to check by, the headers still
            from elmforest.model.build import weight_files

            try:
                weight_files(d)
            except UserError as e:  # (NotFound is one)
                return f"{e} (no checksums recorded for it)"
        sums = DigestCheck(self.root, trust_unchanged) if deep else None
        rel = self.expert(name)["path"]
        try:
            for fname, want in recorded.items():
                f = d / fname
                if f.is_symlink():  # its bytes would come from outside the forest
                    return f"{f} is a symbolic link, not the file that was added"
                if not f.is_file() or f.stat().st_size != want["bytes"]:
                    return f"{f} is missing or not the size it was added with"
                if deep and not sums.matches(f"{rel}/{fname}", f, want["sha256"]):
                    return f"{f}: checksum mismatch (changed since it was added)"
            return None
        finally:
            if sums is not None:
                sums.save()

    def expert_for_domain(self, domain: str) -> str | None:
        for e in self.data["experts"]:
            if domain in e["domains"]:
                return e["name"]
        return None

    @property
    def seed_dir(self) -> Path | None:
        s = self.data.get("seed")
        return inside(self.root, s["path"], "seed", self.root / "forest.json") if s else None

    # -- changes -----------------------------------------------------------------------------------
    def set_seed(
        self,
        model_dir: str | Path,
        tokens: int = 0,
        flops: int = 0,
        source: str = "",
        extra: dict | None = None,
        link: bool = False,
        seed_fields: dict | None = None,
    ) -> None:
        """Store the seed; `seed_fields` (its run config) and top-level `extra` (the plan) land in the
        same atomic manifest write, so a crash never leaves a seed without them."""
        src = resolve_model_dir(model_dir)
        tok, arch = check_compatible(self, src)
        _copy_checkpoint(src, self.root / "seed", link=link)
        seed = {
            "path": "seed",
            "tokens": int(tokens),
            "flops": int(flops),
            "source": source,
            "added": _now(),
            **(seed_fields or {}),
        }

        def change(d):
            d["tokenizer"], d["architecture"], d["seed"] = tok, arch, seed
            d.update(extra or {})

        self.update(change)

    def add(
        self,
        model_dir: str | Path,
        name: str,
        domains: list[str],
        parents: list[dict] | None = None,
        tokens: int = 0,
        flops: int = 0,
        data_fingerprint: str | None = None,
        replace: bool = False,
        extra: dict | None = None,
        force: bool = False,
        architecture: str | None = None,
        ran: bool = False,
    ) -> dict:
        """Register a trained expert: copy its checkpoint in, then record it in the manifest.

        `force` re-adds an expert that was opted out (only its owner should ask for that). `ran`: its
        tokens and FLOPs are a run that trained it here (counted even where it trained to another
        expert's very weights), not a copy's record (`forest add`: a twin's copy counts 0).
        `architecture`: the fingerprint this expert must have when it is not the seed's own shape (a
        FlexOlmo owner is the seed as a 2-expert MoE); the forest's architecture stays the seed's."""
        self.check_new_name(name)
        src = resolve_model_dir(model_dir)
        if name in self.names and not replace:
            raise UserError(
                f"{self.root}: an expert named {name!r} exists; add it under another --name, or remove that one first (forest remove)"
            )
        if not domains or not all(isinstance(d, str) and d.strip() for d in domains):
            raise UserError(
                f"expert {name!r}: needs at least one domain, each a non-empty name; got {domains}"
            )
        if len(set(domains)) != len(domains):
            raise UserError(f"expert {name!r}: each domain once; got {list(domains)}")
        tokens, flops = count(tokens, f"expert {name!r}: tokens"), count(flops, f"expert {name!r}: flops")
        tok, arch = check_compatible(self, src, architecture)
        forest_arch = self.data["architecture"] if architecture is not None else arch
        same = [  # experts of this shape so far (a FlexOlmo owner's pair has a shape of its own)
            n
            for n in self.names
            if n != name and self.expert(n).get("fingerprints", {}).get("architecture") == arch
        ]
        refs = [self.expert_dir(n) for n in same if self.intact(n) is None]
        if architecture is None and self.seed_dir is not None:
            refs.append(self.seed_dir)
        check_weights(src, [r for r in refs if r.is_dir()])
        rel = f"experts/{name}"
        owned = self.root.resolve() in src.resolve().parents  # our own run dirs: hard links are safe
        if not owned:
            check_finite(src)
        staged = _stage_checkpoint(src, self.root / rel, link=owned)
        try:  # the staged copy never outlives this call
            entry = {
                "name": name,
                "domains": list(domains),
                "path": rel,
                "parents": parents or [],
                "tokens": int(tokens),
                "flops": int(flops),
                "fingerprints": {"tokenizer": tok, "architecture": arch, "data": data_fingerprint},
                "files": weight_digests(staged),
                "added": _now(),
                **(extra or {}),
            }

            def change(d):
                if d.get("tokenizer") not in (None, tok) or d.get("architecture") not in (None, forest_arch):
                    raise UserError(f"{self.root}: the forest changed underneath; {name} no longer fits it")
                if not replace and name in [e["name"] for e in d["experts"]]:
                    raise UserError(f"{self.root}: an expert named {name!r} exists (added meanwhile)")
                if not (replace or force) and name in [r["name"] for r in d.get("removed", [])]:
                    raise UserError(
                        f"{self.root}: expert {name!r} was opted out (forest remove); its owner's choice is not "
                        "undone by adding it back"
                    )
                not_a_copy(d, entry, force, ran)
                old = next((e for e in d["experts"] if e["name"] == name), {}) if replace else {}
                d["experts"] = _in_plan_order(d, [e for e in d["experts"] if e["name"] != name] + [entry])
                d["tokenizer"], d["architecture"] = tok, forest_arch
                # re-added after an opt-out: what its removal discarded goes with it, not lost (also
                # through a replaced entry: a damaged re-added expert restored from its run)
                spent = list(old.get("spent_before", []))
                spent += [x for r in d.get("removed", []) if r["name"] == name for x in r.get("spent", [])]
                if spent:
                    entry["spent_before"] = spent
                d["removed"] = [r for r in d.get("removed", []) if r["name"] != name]

            # the checkpoint lands under the same lock as its manifest entry, once that entry passed its
            # checks; a replaced one steps aside whole, so a kill between the renames leaves it to be
            # put back, never a dangling entry
            self.update(change, lambda: replace_dir(staged, self.root / rel))
        finally:
            remove_path(staged)
        return entry

    def remove(self, name: str) -> dict:
        """Opt an expert out (forest/optout.py): tombstone first, then delete and verify."""
        from elmforest.forest.optout import remove_expert

        return remove_expert(self, name)

    def describe(self) -> str:
        lines = [
            f"forest {self.root}: {len(self.data['experts'])} expert(s), tokenizer {self.data.get('tokenizer')}, "
            f"architecture {self.data.get('architecture')}"
        ]
        if self.data.get("seed"):
            s = self.data["seed"]
            lines.append(f"  seed: {s['tokens']:,} tokens, {s['flops']:.3e} FLOPs {s.get('source', '')}")
        for e in self.data["experts"]:
            parents = ", ".join(f"{p['name']}×{p['weight']:.2f}" for p in e.get("parents", [])) or "-"
            lines.append(
                f"  {e['name']:20s} domains={','.join(e.get('domains', []))}  from {parents}  "
                f"{e.get('tokens', 0):,} tokens  {e.get('flops', 0):.3e} FLOPs"
            )
        return "\n".join(lines)


def _read_manifest(root: Path) -> dict:
    path = root / "forest.json"
    data = read_json(path)
    if not isinstance(data, dict) or data.get("version") != VERSION:
        found = data.get("version") if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{path}: not a forest manifest of version {VERSION} (found {found})")
    return check_manifest(data, root, path)
