"""Where the data came from and what was said of it, kept in a shards index beside what it holds (outside
its fingerprint: data/shards.py): the clusterer that assigned c-BTM's clusters, and whether the tokenizer
learned from documents the shards hold out."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from elmforest.data.sources import parse_source, resolve_source
from elmforest.data.splits import SplitSpec
from elmforest.data.tokenizer import LoadedTokenizer, training_record
from elmforest.utils.errors import UserError
from elmforest.utils.io import read_json

# `cluster assign`'s report beside the corpus it writes (cluster/assign.py): its clusterer's checksum
ASSIGN_REPORT = "report.meta.json"


def assigning_clusterer(sources: list[str]) -> dict | None:
    """The clusterer that assigned the corpus's clusters (`cluster assign`'s output), kept in the index:
    c-BTM's forest verbs check it against the forest's clusterer, and read it beside the corpus only,
    so shards whose corpus folder was moved or deleted went unchecked."""
    if len(sources) != 1 or parse_source(sources[0]).format is not None:
        return None
    report = Path(sources[0]) / ASSIGN_REPORT
    try:
        r = read_json(report) if report.is_file() else None
    except UserError:
        return None
    digest = r.get("clusterer_sha256") if isinstance(r, dict) else None
    if not isinstance(digest, str):
        return None
    out = {"clusterer": r.get("clusterer"), "clusterer_sha256": digest}
    if isinstance(r.get("balanced_split"), dict):
        out["balanced_split"] = r["balanced_split"]
    return out


def check_balanced_split(sources: list[str], split: SplitSpec) -> None:
    """`cluster assign --balanced` capped the clusters' training documents as a split at its fractions
    told them apart; shards split at others train on another set, which the cap never balanced (an
    audit: built at 0.2/0.2 from clusters balanced at 0.05/0.05, without a word)."""
    by = assigning_clusterer(sources)
    at = (by or {}).get("balanced_split")
    if not at:
        return
    try:
        theirs = SplitSpec(**{k: at[k] for k in ("valid_frac", "test_frac", "by_file") if k in at})
    except (TypeError, UserError):
        return  # a report of another version: no claim
    if theirs != split:
        raise UserError(
            f"{sources[0]}: its clusters were balanced on the training split at valid/test fractions "
            f"{theirs.valid_frac}/{theirs.test_frac} (by file: {theirs.by_file}), but these shards split at "
            f"{split.valid_frac}/{split.test_frac} (by file: {split.by_file}): their training documents are "
            "another set, which the cap never balanced; build at the assignment's fractions, or assign "
            "again at these (`cluster assign --balanced --valid-frac ... --test-frac ...`)"
        )


def tokenizer_saw_held_out(
    tokenizer, tok: LoadedTokenizer, sources: list[str], split: SplitSpec
) -> dict | None:
    """What `tokenizer train` learned from, when it read documents these shards hold out: the same data
    (or a folder holding it, or a file of it) with a smaller share held out. Said, and recorded in the
    index, not refused: the held-out text shaped the vocabulary, which flatters held-out BPB a little."""
    if isinstance(tokenizer, LoadedTokenizer) or (record := training_record(tokenizer, tok)) is None:
        return None
    seen = record.get("split") or {}
    try:
        ours = SplitSpec(**seen)
    except (TypeError, UserError):
        return None  # a record of another version: no claim
    if (
        ours.by_file != split.by_file
        or ours.valid_frac + ours.test_frac >= split.valid_frac + split.test_frac
    ):
        return None  # none held out here (a larger share held out), or cannot tell (split by file or not)

    def within(a: str, b: str) -> bool:
        if a == b:
            return True
        if parse_source(a).format is not None or parse_source(b).format is not None:
            return False
        pa, pb = Path(a), Path(b)
        return pa in pb.parents or pb in pa.parents

    data = str(record.get("data"))
    if not any(within(data, resolve_source(s)) for s in sources):
        return None
    print(
        f"note: the tokenizer learned from documents these shards hold out: it was trained on {data} with "
        f"{ours.valid_frac:g} valid / {ours.test_frac:g} test held out, and these shards hold out "
        f"{split.valid_frac:g} / {split.test_frac:g}, so held-out text shaped its vocabulary (a slightly "
        "flattering held-out BPB); train the tokenizer with the same --valid-frac and --test-frac",
        file=sys.stderr,
    )
    return {"data": data, "split": asdict(ours)}
