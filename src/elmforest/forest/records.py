"""What a forest records beside its experts: the training phases behind it (the ledger a
compute-matched comparison is judged by), the merged outputs that hold copies of its experts'
weights (so that opting an expert out finds and deletes them), and the c-BTM clusterer that routes
to its experts.

A mixin of `Forest` (forest/manifest.py), apart from the manifest's reading, checking and taking in of
experts: these entries change no expert. Every change goes through `Forest.update`, under the
manifest's lock.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from elmforest.forest.trust import copy_regular_files
from elmforest.utils.errors import UserError
from elmforest.utils.io import staged_dir


class ForestRecords:
    def total_flops(self) -> int:
        """Training FLOPs of the seed and the current experts (the forest used as an ensemble)."""
        seed = (self.data.get("seed") or {}).get("flops", 0) or 0
        return int(seed + sum(e.get("flops", 0) or 0 for e in self.data["experts"]))

    def ledger(self) -> list[dict]:
        """Every training phase behind this forest, each counted by what actually ran (train/flops.py):
        the seed, each current expert, and recorded extra phases (a merged model's router training or
        BTX fine-tuning), as rows with at least phase, name, tokens and flops."""
        seed = self.data.get("seed") or {}
        rows = []
        if seed:
            rows.append(
                {
                    "phase": "seed",
                    "name": "seed",
                    "tokens": seed.get("tokens", 0),
                    "flops": seed.get("flops", 0),
                }
            )
        for e in self.data["experts"]:
            rows.append({"phase": "expert", "name": e["name"], "tokens": e["tokens"], "flops": e["flops"]})
        return rows + [dict(p) for p in self.data.get("ledger", [])]

    def record_phase(self, phase: dict) -> None:
        """Put a training phase that is neither the seed nor an expert (e.g. the router training of a
        model merged from this forest) in the ledger. The same phase of the same output (its resolved
        path; the name when there is none) is replaced, as a rerun overwrites that output; two
        outputs that share a folder name both ran, so both stay. An output is the same one where it sits
        at the same place relative to the forest: a quickstart folder copied with its forest
        (`cp -a qs qs2`) and rerun replaces the original's row rather than counting that training twice."""
        if not {"phase", "name", "tokens", "flops"} <= set(phase):
            raise UserError(f"a ledger phase needs phase, name, tokens and flops; got {sorted(phase)}")
        phase = dict(phase)
        if phase.get("output"):
            phase["output"] = str(Path(phase["output"]).resolve())
            phase["relative"] = os.path.relpath(phase["output"], self.root.resolve())

        mine = self.ledger_places(phase)

        def same(p: dict) -> bool:
            if p.get("phase") != phase.get("phase"):
                return False
            theirs = self.ledger_places(p)
            return bool(theirs & mine) if theirs or mine else p.get("name") == phase.get("name")

        def change(d):
            d["ledger"] = [p for p in d.get("ledger", []) if not same(p)] + [phase]

        self.update(change)

    def drop_phases(self, output: str | Path) -> None:
        """Forget the recorded training of an output that was just written over with an untrained model:
        the ledger counts what the forest and its outputs now hold, and that training is gone."""
        path = str(Path(output).resolve())
        if not any(path in self.ledger_places(p) for p in self.data.get("ledger", [])):
            return

        def change(d):
            d["ledger"] = [p for p in d.get("ledger", []) if path not in self.ledger_places(p)]

        try:
            self.update(change)
        except OSError:  # a read-only forest: nothing of it was recorded by this run either
            pass

    def ledger_places(self, phase: dict) -> set[str]:
        """Where a ledger row's output may be for this forest: where it was written, and at its place
        relative to the forest when that is known (kept since it was recorded, or read from the card of an
        output written before, which names the forest it was merged from). A tree copied with its outputs
        (`cp -a qs qs2`) finds its own copy at the relative place; a forest moved without them (merged
        outputs sit outside it) still finds them where they were written."""
        out = phase.get("output")
        if not out:
            return set()
        places = {str(Path(out).resolve())}
        rel = phase.get("relative")
        if not isinstance(rel, str):
            made_by = marker_forest(Path(out))
            rel = os.path.relpath(Path(out).resolve(), Path(made_by).resolve()) if made_by else None
        if rel:
            places.add(os.path.normpath(self.root.resolve() / rel))
        return places

    def record_output(self, path: str | Path, kind: str, experts: list[str]) -> dict | None:
        """Remember a merged model about to be written from these experts (it holds copies of their
        weights), so that opting one out also deletes its copies. Returns the entry this one replaced, if
        any. Until `settle_output` says the write is done, the entry keeps the experts the output there
        held before as well: a write that fails or is killed leaves that output in place, and opting one
        of them out must still find it (opt-out deletes only what an output's own card lists)."""
        self.refuse_opted_out(experts, path)
        path = str(Path(path).resolve())
        before = []

        def change(d):
            before[:] = [o for o in d.get("outputs", []) if o["path"] == path]
            held = list(experts)
            for o in before:
                held += [x for x in o.get("experts", []) if x not in held]
            d["outputs"] = [o for o in d.get("outputs", []) if o["path"] != path]
            d["outputs"].append(
                {
                    "path": path,
                    "relative": os.path.relpath(path, self.root.resolve()),  # found again in a copied tree
                    "kind": kind,
                    "experts": held,
                    "written": _now(),
                }
            )

        try:
            self.update(change)
        except OSError as e:  # a read-only forest (someone else's) can still be merged from
            print(
                f"warning: could not record {path} in {self.root / 'forest.json'} ({e}); opting an expert "
                "out of this forest will not find this copy",
                file=sys.stderr,
            )
        return before[0] if before else None

    def refuse_opted_out(self, experts: list[str], path: str | Path) -> None:
        """A new output may not hold an expert opted out of this forest (and not trained again): made
        from a copy that predates the removal (a merged MoE copied elsewhere, then fine-tuned), it would
        carry the owner's weights on, and the next `forest fsck` would delete it, training and all."""
        gone = [
            f"{r['name']} (removed {r.get('removed', '?')})"
            for r in self.data.get("removed", [])
            if r["name"] in experts and r["name"] not in self.names
        ]
        if gone:
            raise UserError(
                f"{path} would hold {', '.join(gone)}, opted out of {self.root}: its weights are not to be "
                "used again. Merge again from the forest as it is now (without it)"
            )

    def settle_output(self, path: str | Path, experts: list[str]) -> None:
        """The output at `path` is written and holds exactly `experts`: its record no longer keeps the
        experts the output there held before (`record_output`)."""
        path = str(Path(path).resolve())
        entry = next((o for o in self.data.get("outputs", []) if o["path"] == path), None)
        if entry is None or entry.get("experts") == list(experts):
            return

        def change(d):
            for o in d.get("outputs", []):
                if o["path"] == path:
                    o["experts"] = list(experts)

        try:
            self.update(change)
        except OSError:  # a read-only forest: it could not record the output either
            pass

    @contextmanager
    def recording_output(self, path: str | Path, kind: str, experts: list[str], card: str) -> Iterator[None]:
        """`record_output` for the write in the block, undone if the block fails before a finished output
        (its `card` file) is in place: a refused merge leaves the record as it was. A kill -9 leaves it
        recorded, the safe way for opting out."""
        previous = self.record_output(path, kind, experts)
        try:
            yield
        except BaseException:
            if previous is not None or not (Path(path) / card).is_file():
                self.forget_output(path, previous)
            raise

    def forget_output(self, path: str | Path, previous: dict | None = None) -> None:
        """Undo `record_output` for a merge that failed: put back the entry it replaced (`previous`,
        whose copies may still be there), or drop the path when there was none."""
        path = str(Path(path).resolve())

        def change(d):
            d["outputs"] = [o for o in d.get("outputs", []) if o["path"] != path]
            if previous is not None:
                d["outputs"].append(previous)

        try:
            self.update(change)
        except OSError:
            pass

    def set_clusterer(self, clusterer_dir: str | Path) -> None:
        """Keep a copy of the c-BTM clusterer that defines the experts' clusters (for routing)."""
        from elmforest.cluster.assign import clusterer_digest
        from elmforest.cluster.clusterer import Clusterer

        c = Clusterer.load(clusterer_dir)  # refuses corrupted or mismatched files
        have = self.root / "clusterer"
        digest = clusterer_digest(clusterer_dir)  # the centres, projection and vocabulary, not notes
        if self.data.get("clusterer") and self.names and have.is_dir():
            if clusterer_digest(have) != digest:  # its experts were trained on the old clusters
                raise UserError(
                    f"{self.root}: its experts were trained on the clusters of another clusterer "
                    f"(k={self.data['clusterer'].get('k')}); a new clusterer needs a new forest"
                )
        with staged_dir(self.root / "clusterer") as tmp:
            copy_regular_files(Path(clusterer_dir), tmp)
        self.update(
            lambda d: d.update(clusterer={"path": "clusterer", "k": c.k, "dims": c.dims, "sha256": digest})
        )

    def clusterer_problem(self, load: bool = True) -> str | None:
        """What is wrong with the forest's copy of its clusterer: unreadable, or another clusterer than the
        one its experts were trained on (a consistent clusterer of the same k put in its place routed text
        to the wrong experts without a word). Forests made before the checksum was recorded: readability.
        `load=False`: the caller loads it itself (routing), so it is read once."""
        from elmforest.cluster.assign import clusterer_digest
        from elmforest.cluster.clusterer import Clusterer, ClustererError

        info = self.data.get("clusterer")
        if not info:
            return None
        where = self.root / info["path"]
        try:
            if load:
                Clusterer.load(where)
        except ClustererError as e:
            return f"the clusterer: {e}"
        if info.get("sha256") is not None and clusterer_digest(where) != info["sha256"]:
            return (
                f"the clusterer: {where} is not the clusterer its experts were trained on (its checksum is not "
                "forest.json's): routing would send text to the wrong experts; put back the clusterer "
                "`forest train --clusterer` was given"
            )
        return None


# the manifest's timestamps: forest/manifest.py stamps the forest, its seed and its experts with it too
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# the cards a merged output carries, each naming the forest it was merged from (forest/copies.py too)
MARKERS = ("elmforest_moe.json", "elmforest_average.json", "elmforest_source.json")


def marker_meta(path: Path, marker_names=MARKERS) -> dict:
    for m in marker_names:
        try:
            return json.loads((path / m).read_text())
        except (OSError, ValueError):
            continue
    return {}


def marker_forest(path: Path) -> str | None:
    """The forest a merged output's card says it was merged from (None when it has no such card)."""
    f = marker_meta(path).get("forest")
    return f if isinstance(f, str) and f else None
