"""A model's training documents, read from another file or format, scored as held out.

Splits hash each document's id, and ids come from where a document was read: the same corpus as
Parquet instead of JSONL, or as a folder of .txt files, gives every document another id and so
another split. eval/held_out.check_held_out refuses the model's own corpus read otherwise by its
location; a copy elsewhere passed, and its "test" split was mostly the model's training documents (18
of 19 in a new user's Parquet copy). Here the text decides: the scored documents are hashed and looked
up among the documents the model trained on (or was tuned on, for a test split), read from the corpus
its training shards were built from.

Only what the model could have seen counts: the domains it (and the seed it branched from) trained on,
under the shards' domain map; and only texts that occur once in that corpus (a line such as `}` sits in
every split of a corpus read a line per document, and a real duplicate is no sign of a re-split copy).
Data that shares no domain with them is not read at all, a corpus over MAX_BYTES is not checked (this is
a guard against a slip, not an audit), and each corpus is read once per process (a forest's experts
share it).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from elmforest.data.documents import text_key
from elmforest.data.readers import iter_documents
from elmforest.data.splits import SplitSpec
from elmforest.utils.errors import UserError
from elmforest.utils.io import file_stamps, read_json

MAX_BYTES = 2_000_000_000  # training corpora larger than this are not read again to check
# (corpus stamp, split spec, domains, domain map) -> {text: split} of unique texts
_SEEN: dict[tuple, dict | None] = {}
# (source stamp, split spec, splits, domains, domain map) -> the documents scored
_READ: dict[tuple, list | None] = {}
_SAID: set = set()


def _sources(source) -> list[str]:
    return [str(x) for x in (source if isinstance(source, list) else [source]) if x]


def _stamp(sources: list[str]) -> tuple:
    """The sources as they are now: a memo of an earlier read of files since rewritten is stale."""
    return tuple((x, tuple(map(tuple, file_stamps([x])))) for x in sources)


# a merge of a forest's experts (an average, an MoE, a FlexOlmo merge): its elmforest_run.json is its
# first expert's, naming that domain alone; what it read is its experts' domains and their seed's
MERGE_RECORDS = ("elmforest_average.json", "elmforest_moe.json", "elmforest_flexolmo.json")


def model_domains(mdir: Path, hops: int = 4) -> set[str] | None:
    """The domains a model's training read: its run's `data.domains` and those of the model or training
    state it started from (`model.init_from`, `train.init_checkpoint`: an expert's is the seed's state,
    which mixed every domain), None for all of them."""
    out: set[str] = set()
    for _ in range(hops):
        if merged := next((f for f in MERGE_RECORDS if (mdir / f).is_file()), None):
            inner = _merge_domains(mdir, merged, hops - 1)
            return None if inner is None else out | inner
        run, state = mdir / "elmforest_run.json", mdir / "state.json"
        if run.is_file():
            cfg = read_json(run)
        elif state.is_file() and isinstance(cfg := read_json(state).get("config"), dict):
            pass  # a training state (a checkpoint, the forest's seed_state): its run's config
        else:
            return None if not out else out  # a checkpoint from elsewhere: only what is known
        doms = (cfg.get("data") or {}).get("domains")
        if not doms:
            return None
        out |= set(doms)
        if (start := _started_from(cfg)) is None:
            return out
        mdir = start
    return out


def _started_from(cfg: dict) -> Path | None:
    """The model or training state a run started from (`model.init_from`, `train.init_checkpoint`)."""
    start = (cfg.get("model") or {}).get("init_from") or (cfg.get("train") or {}).get("init_checkpoint")
    return Path(start) if start and Path(start).is_dir() else None


def _merge_domains(mdir: Path, record: str, hops: int) -> set[str] | None:
    """The domains a merge's experts read: an average's experts (their dirs, each followed to its
    seed), an MoE's experts' domains and the seed its first expert started from; None (every domain)
    where the record does not say."""
    rec = read_json(mdir / record)
    experts = rec.get("experts")
    if not isinstance(experts, list) or not experts:
        return None
    if record == "elmforest_average.json" and all(isinstance(e, str) for e in experts):
        out: set[str] = set()
        for e in experts:
            d = model_domains(Path(e), hops) if Path(e).is_dir() else None
            if d is None:
                return None
            out |= d
        return out
    if record == "elmforest_moe.json" and all(isinstance(e, dict) for e in experts):
        own = {x for e in experts for x in e.get("domains") or []}
        run = read_json(mdir / "elmforest_run.json") if (mdir / "elmforest_run.json").is_file() else {}
        seed = model_domains(start, hops) if (start := _started_from(run)) else None
        return own | seed if own and seed is not None else None
    return None


def _split_key(spec: SplitSpec, dmap: dict) -> tuple:
    """Everything of a split that decides which document lands where, for the caches' keys."""
    return (spec.valid_frac, spec.test_frac, spec.by_file, json.dumps(dmap, sort_keys=True))


def _unique_texts(index: dict, held: SplitSpec, allowed: frozenset, dmap: dict) -> dict | None:
    """{text key: its split} of the texts that occur once among the training corpus's documents of the
    `allowed` domains (mapped names); None when the corpus is too large or cannot be read any more."""
    sources = _sources(index.get("source"))
    stamp = _stamp(sources)
    if sum(size for _, files in stamp for _, size, _ in files) > MAX_BYTES:
        return None
    k = (stamp, *_split_key(held, dmap), allowed)
    if k not in _SEEN:
        counts: Counter = Counter()
        split_of: dict[bytes, str] = {}
        try:
            for x in sources:
                for d in iter_documents(x):
                    if dmap.get(d.domain, d.domain) in allowed:
                        key = text_key(d.text)
                        counts[key] += 1
                        split_of[key] = held.assign(d.id)
        except (UserError, OSError):
            _SEEN[k] = None
        else:
            _SEEN[k] = {key: s for key, s in split_of.items() if counts[key] == 1}
    return _SEEN[k]


def check_same_text(
    mdir: Path,
    index_path: Path,
    held: SplitSpec,
    source,
    spec: SplitSpec,
    split: str,
    data,
    prior: bool = False,
) -> None:
    """Refuse when more than half of the documents read as `split` (or as the prior's valid split) are
    documents `mdir` trained on (a test split: or was tuned on, its valid split); note a few, once."""
    reads = [s for s, on in (("test", split == "test"), ("valid", split == "valid" or prior)) if on]
    if not reads:
        return
    index = read_json(index_path)
    dmap = index.get("domain_map") or {}
    allowed = frozenset(model_domains(mdir) or index.get("domains") or {})
    k = (_stamp(_sources(source)), *_split_key(spec, dmap), tuple(reads), allowed)
    if k not in _READ:  # once per process: a forest's experts and seed are each checked
        try:
            _READ[k] = [
                (s, text_key(d.text))
                for x in _sources(source)
                for d in iter_documents(x)
                if dmap.get(d.domain, d.domain) in allowed and (s := spec.assign(d.id)) in reads
            ]
        except (UserError, OSError):
            _READ[k] = None  # unreadable here: the evaluation itself says why
    docs = _READ[k]
    if not docs or (seen := _unique_texts(index, held, allowed, dmap)) is None:
        return
    for s in reads:
        keys = [key for r, key in docs if r == s]
        bad = {"train", "valid"} if s == "test" else {"train"}
        n = sum(seen.get(key) in bad for key in keys)
        if not keys or not n:
            continue
        what = "trained or was tuned on" if s == "test" else "trained on"
        said = (
            f"{data}: {n} of the {len(keys)} {s} documents read are documents {mdir} {what} (the same text, "
            f"in its {'train or valid' if s == 'test' else 'train'} split of {index.get('source')})"
        )
        if 2 * n > len(keys):
            raise UserError(
                f"{said}: read from another file or format, they got other ids, so other splits; evaluate "
                "on the model's own shards, or the files it was trained on as they were read"
            )
        if (str(data), s, n) not in _SAID:
            _SAID.add((str(data), s, n))
            print(f"note: {said}; their BPB is not wholly held out", file=sys.stderr)
