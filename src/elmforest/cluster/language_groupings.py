"""X-ELM's grouping artifacts (`{"groups": {NAME: [codes]}, ...}`, one per k): written, read back and
checked (one language under two spellings in two groups is refused), turned into a domain map, and
asked which group a new language is nearest.

Apart from cluster/languages.py, which finds the groups: what reads an artifact (`shards build
--domain-map`, `sweep --groups`, X-ELM branching) needs none of the clustering.
"""

from __future__ import annotations

import os
from pathlib import Path

from elmforest.cluster.languages import (
    _TIE,
    DEFAULT_FEATURES,
    _installed,
    average_linkage,
    cosine_distances,
    language_vectors,
    load_features,
    resolve_codes,
)
from elmforest.data.domain_map import DomainMap, load_domain_map
from elmforest.utils.errors import AlreadyExists, NotFound, UserError
from elmforest.utils.io import read_json, write_json_atomic


def save_grouping(grouping: dict, path: str | os.PathLike) -> None:
    write_json_atomic(path, grouping)


def write_groupings(
    groupings: dict[int, dict], out: str | os.PathLike, overwrite: bool = False
) -> list[Path]:
    """`out` ending in .json takes the one k's artifact; otherwise it is a directory of k<K>.json files."""
    out = Path(out)
    if out.suffix == ".json":
        if len(groupings) != 1:
            raise UserError(
                f"--out {out} is one file but {len(groupings)} values of k were asked: give a directory"
            )
        paths = {next(iter(groupings)): out}
    else:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory")
        paths = {k: out / f"k{k}.json" for k in groupings}
    clash = [str(p) for p in paths.values() if p.exists()]
    if clash and not overwrite:
        them = (
            "already exist; pass --overwrite to replace them"
            if len(clash) > 1
            else "already exists; pass --overwrite to replace it"
        )
        raise AlreadyExists(f"{', '.join(clash)} {them}")
    for k, p in paths.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        save_grouping(groupings[k], p)
    if out.suffix != ".json":
        _note_other_languages(out, set(paths.values()), next(iter(groupings.values())).get("languages"))
    return list(paths.values())


def _note_other_languages(folder: Path, written: set[Path], languages) -> None:
    """Groupings of other languages left in the folder by an earlier run (its other k): `sweep --groups
    DIR/k*.json` would take them for this run's."""
    import re
    import sys

    stale = []
    for f in sorted(folder.glob("k*.json")):
        if f in written or not re.fullmatch(r"k\d+\.json", f.name):
            continue
        try:
            other = read_json(f).get("languages")
        except (OSError, UserError, AttributeError):
            continue
        if other is not None and sorted(other) != sorted(languages or []):
            stale.append(f.name)
    if stale:
        print(
            f"note: {folder}: {', '.join(stale)} (from an earlier run) group other languages than this run's: "
            "delete them, or give another --out, before passing the folder's groupings to a sweep",
            file=sys.stderr,
        )


def load_grouping(path: str | os.PathLike) -> dict:
    """A grouping artifact, checked: every language in exactly one group."""
    if not Path(path).is_file():
        raise NotFound(f"language grouping {path}: no such file")
    g = read_json(path)
    if not _is_grouping(g):
        raise UserError(f"{path}: not a language grouping (no `groups` object)")
    groups = g["groups"]
    one = _spelling(g)
    seen: dict[str, tuple[str, str]] = {}
    for name, members in groups.items():
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            raise UserError(f"{path}: group {name!r} must be a non-empty list of language codes")
        for m in members:
            if (c := one(m)) in seen:  # `de` in one group and `deu` in another: one language, twice
                was, where = seen[c]
                also = f" (as {was!r})" if was != m else ""
                raise UserError(f"{path}: language {m!r} is in both {where!r}{also} and {name!r}")
            seen[c] = (m, name)
    return g


def check_if_grouping(path: str | os.PathLike) -> None:
    """A domain map that is a grouping artifact (`{"groups": ...}`) is checked as one (load_grouping): the
    domain map alone took `de` in one group and `deu` in another, German in both, with a note that the
    data holds no `de`."""
    try:
        g = read_json(path)
    except (OSError, UserError):
        return  # unreadable: refused, named, where the domain map is read
    if not _is_grouping(g):
        return
    members = [m for ms in g["groups"].values() if isinstance(ms, list) for m in ms]
    # language codes (2 or 3 letters, any case); other domains are names whose case is their own (News, news)
    if members and all(
        isinstance(m, str) and 2 <= len(m) <= 3 and m.isascii() and m.isalpha() for m in members
    ):
        load_grouping(path)


def checked_domain_map(path: str | os.PathLike, role: str = "domain map") -> DomainMap:
    """load_domain_map, and a file that is a grouping of languages checked as one (check_if_grouping)."""
    m = load_domain_map(path, role=role)  # its own errors first
    check_if_grouping(path)
    return m


def _spelling(grouping: dict):
    """code -> one spelling of its language: the artifact's aliases, and lang2vec's two-letter and
    ISO 639-2/B codes where it is installed (a hand-written grouping names no aliases)."""
    aliases = {str(k).lower(): str(v) for k, v in (grouping.get("aliases") or {}).items()}
    letters: dict[str, str] = {}
    if _installed():
        try:
            table = load_features(grouping.get("features", DEFAULT_FEATURES))
        except UserError:  # an unknown feature set: refused where the features are read
            table = None
        if table is not None:
            letters = {k: v for k, v in table.letter_codes.items() if v != k}  # as resolve_codes
    return lambda m: aliases.get(m.lower()) or letters.get(m.lower(), m.lower())


def _is_grouping(g) -> bool:
    return isinstance(g, dict) and isinstance(g.get("groups"), dict) and bool(g["groups"])


def _a_grouping(grouping) -> None:
    if not _is_grouping(grouping):
        raise UserError(
            f"expected a language grouping (the dict load_grouping(path) returns), got {grouping!r:.80}"
        )


def domain_map(grouping: dict) -> dict[str, str]:
    """language -> group: what relabels a corpus's language domains into the forest's group domains."""
    _a_grouping(grouping)
    return {lang: name for name, members in grouping["groups"].items() for lang in members}


def nearest_group(code: str, grouping: dict) -> tuple[str, dict[str, float]]:
    """The group typologically closest to a language (average cosine distance to its members, same
    feature set): where X-ELM branches a new language's expert from. Returns (group, every distance).
    A language a group holds already is not new: that group (the first, if several), whatever the
    distances, which leave the language out of its own group."""
    c, groups, table = _resolved(code, grouping)
    members = sorted({m for g in groups.values() for m in g} | {c})
    d = cosine_distances(language_vectors(members, table))
    dists = {
        name: average_linkage(d, members, [c], [m for m in g if m != c] or g) for name, g in groups.items()
    }
    if held := _holding(c, groups):  # (the groups resolved above: the feature table read once)
        return held[0], dists
    return min(dists, key=lambda n: (round(dists[n], _TIE), n)), dists


def groups_holding(code: str, grouping: dict) -> list[str]:
    """The groups that hold a language already, codes compared as languages (`de`, `ger`, `deu`)."""
    return _holding(*_resolved(code, grouping)[:2])


def _holding(c: str, groups: dict) -> list[str]:
    return [name for name, g in groups.items() if c in g]


def _resolved(code: str, grouping: dict):
    """(the language's ISO 639-3 code, {group: its members' codes}, the feature table)."""
    _a_grouping(grouping)
    if not isinstance(code, str):
        raise UserError(f"nearest_group: code must be one language code (a str), got {code!r}")
    table = load_features(grouping.get("features", DEFAULT_FEATURES))
    [c], _ = resolve_codes([code], table)
    groups = {}
    for name, g in grouping["groups"].items():
        try:  # one by one: an alias and its code (`de`, `deu`) are one language, not a repeat
            groups[name] = list(dict.fromkeys(resolve_codes([m], table)[0][0] for m in g))
        except UserError as e:
            raise UserError(f"group {name!r}: {e}") from None
    return c, groups, table
