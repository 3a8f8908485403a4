"""Typological language groups for X-ELM: URIEL syntax vectors, cosine distance, bottom-up merging.

X-ELM (Blevins et al. 2024) trains one expert per group of typologically similar languages, the groups
found by clustering lang2vec's syntax features. The features are read from the data files the PyPI
package `lang2vec` ships (numpy archives), not through `lang2vec.lang2vec`: that module imports
`pkg_resources`, which current setuptools no longer has, prints instead of raising, and loads every
archive at import time. Only reading its data keeps the numbers identical and the package optional.

The default feature set is `syntax_knn`: URIEL's 103 syntax features with every value a language lacks
in WALS/SSWL/Ethnologue imputed from its k nearest languages, so every one of lang2vec's 7,970 languages
has a complete 0/1 vector and the cosine distance is defined without deciding what a missing value
means. `syntax_average` and the raw sources leave most values missing (-1): they are accepted only for
languages with no value missing.

Grouping is greedy agglomeration: start with every language alone and repeatedly merge the two groups
with the smallest average-linkage distance (mean cosine distance over the pairs of members; X-ELM's
description says only "merge the closest clusters"). Every k is a cut of the same merge sequence, so
the groups for k = 8 nest inside those for k = 4 and k = 2, as X-ELM's hierarchy of experts needs.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from elmforest.utils.errors import UserError

METHOD = "lang2vec-syntax"
# feature set -> (archive in lang2vec/data, source column): lang2vec 1.1.2's FEATURE_SETS_DICT, syntax rows
FEATURE_SETS = {
    "syntax_knn": ("feature_predictions.npz", "predicted"),
    "syntax_average": ("feature_averages.npz", "avg"),
    "syntax_wals": ("features.npz", "WALS"),
    "syntax_sswl": ("features.npz", "SSWL"),
    "syntax_ethnologue": ("features.npz", "ETHNO"),
}
DEFAULT_FEATURES = "syntax_knn"
EXTRA_HINT = 'pip install -e ".[xelm]" (or pip install lang2vec==1.1.2)'
_TIE = 12  # decimals: distances equal to this precision are ties, broken by the groups' names


def _data_dir() -> Path:
    # Located through the installed distribution, not by import: lang2vec also installs a script
    # bin/lang2vec.py, which shadows the package for every console script run from that bin/
    # (`elmforest` included: sys.path[0] is the script's folder), and its module needs pkg_resources.
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        d = Path(distribution("lang2vec").locate_file("lang2vec/data"))
    except PackageNotFoundError:
        raise UserError(f"language grouping needs the lang2vec package: {EXTRA_HINT}") from None
    if not (d / "letter_codes.json").is_file():
        raise UserError(f"{d}: lang2vec is installed without its data files; reinstall it: {EXTRA_HINT}")
    return d


def _installed() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("lang2vec")
    except PackageNotFoundError:
        return False
    return True


def lang2vec_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lang2vec")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class FeatureTable:
    """One syntax feature set for every language lang2vec knows (-1 = missing)."""

    name: str
    languages: np.ndarray  # [L] ISO 639-3 codes
    features: np.ndarray  # [F] feature names
    values: np.ndarray  # [L, F] float64
    letter_codes: dict  # ISO 639-1 -> 639-3, lang2vec's own table

    def row(self, code: str) -> np.ndarray:
        return self.values[self._index[code]]

    @cached_property
    def _index(self) -> dict:
        return {c: i for i, c in enumerate(self.languages.tolist())}


def load_features(features: str = DEFAULT_FEATURES) -> FeatureTable:
    if features not in FEATURE_SETS:
        raise UserError(f"unknown feature set {features!r} (known: {', '.join(FEATURE_SETS)})")
    d = _data_dir()
    archive, source = FEATURE_SETS[features]
    with np.load(d / archive, allow_pickle=False) as z:
        names = z["feats"]
        cols = np.char.startswith(names, "S_")
        src = int(np.flatnonzero(z["sources"] == source)[0])
        values = np.asarray(z["data"][:, cols, src], dtype=np.float64)
        langs = z["langs"]
    letter = json.loads((d / "letter_codes.json").read_text())
    return FeatureTable(features, langs, names[cols], values, letter)


def resolve_codes(codes: list[str], table: FeatureTable) -> tuple[list[str], dict[str, str]]:
    """Normalise the user's codes to lang2vec's ISO 639-3 ones; two-letter (ISO 639-1) and ISO 639-2/B
    codes through lang2vec's own table. Unknown or duplicate codes are refused, naming them."""
    known = set(table.languages.tolist())
    out, aliases, given = [], {}, {}
    for raw in codes:
        c = raw.strip().lower()
        # ISO 639-1, or a 639-2/B code (ger, fre); first, as lang2vec maps them: gre and alb are also
        # codes of their own in its table, whose features are not Greek's and Albanian's
        if table.letter_codes.get(c, c) != c:
            c = table.letter_codes[c]
        elif len(c) == 2:
            two = sorted(k for k in table.letter_codes if len(k) == 2)
            close = [
                f"{k} ({table.letter_codes[k]})" for k in difflib.get_close_matches(c, two, n=4, cutoff=0.5)
            ]
            raise UserError(
                f"language {raw!r}: lang2vec has no ISO 639-3 code for this two-letter code"
                + (f" (close: {', '.join(close)})" if close else "")
                + "; give the three-letter ISO 639-3 code (e.g. deu, not de)"
            )
        if c not in known:
            close = difflib.get_close_matches(c, sorted(known), n=4)
            raise UserError(
                f"language {raw!r} is not one of lang2vec's {len(known)} ISO 639-3 codes"
                + (f" (close: {', '.join(close)})" if close else "")
                + "; list them with `elmforest cluster languages --list`"
            )
        if c in out:
            first = given[c]
            if first == raw:
                raise UserError(f"language {raw!r} given twice")
            raise UserError(f"language {c} given twice: {first!r} and {raw!r} are both {c}")
        out.append(c)
        given[c] = raw
        for spelling in dict.fromkeys((raw.strip(), raw.strip().lower())):  # as given (`DE`, `KOR`), and
            if spelling != c:  # in lower case (`de`): either may be what the corpus calls the domain
                aliases[spelling] = c
    return out, aliases


def supported_languages(features: str = DEFAULT_FEATURES) -> list[str]:
    """Codes with no missing value in `features` (all 7,970 for syntax_knn)."""
    t = load_features(features)
    return sorted(t.languages[(t.values != -1).all(axis=1)].tolist())


def list_languages(features: str = DEFAULT_FEATURES) -> list[tuple[str, str]]:
    """(ISO 639-3 code, its aliases in lang2vec's table, comma-separated) for every language `features`
    covers fully: `deu` -> `de,ger`."""
    t = load_features(features)
    alias: dict[str, list[str]] = {}
    for a, c in sorted(t.letter_codes.items(), key=lambda kv: (len(kv[0]), kv[0])):
        alias.setdefault(c, []).append(a)
    return [(c, ",".join(alias.get(c, []))) for c in supported_languages(features)]


def language_vectors(codes: list[str], table: FeatureTable) -> np.ndarray:
    x = np.stack([table.row(c) for c in codes])
    missing = [c for c, r in zip(codes, x, strict=True) if (r == -1).any()]
    if missing:
        raise UserError(
            f"{table.name} leaves values missing for {', '.join(missing)}; use {DEFAULT_FEATURES} "
            "(missing values imputed from the nearest languages)"
        )
    zero = [c for c, r in zip(codes, x, strict=True) if not r.any()]
    if zero:
        raise UserError(f"{table.name}: all-zero vector for {', '.join(zero)}: no cosine distance")
    return x


def cosine_distances(x: np.ndarray) -> np.ndarray:
    """1 - cos(x_i, x_j) for every pair of rows; exactly 0 on the diagonal, symmetric."""
    x = np.asarray(x, dtype=np.float64)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.clip(1.0 - u @ u.T, 0.0, 2.0)
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    return d


def agglomerate(
    d: np.ndarray, names: list[str], max_size: int | None = None
) -> list[tuple[tuple[str, ...], tuple[str, ...], float]]:
    """The average-linkage merge sequence: (group a, group b, their distance) for n - 1 merges, or
    fewer where `max_size` (languages a group may hold) leaves no admissible pair.

    Lance-Williams update, O(n^2) a merge. Ties (equal to _TIE decimals) go to the pair whose sorted
    member lists come first, so the result depends on neither input order nor float noise."""
    n = len(names)
    groups: dict[int, tuple[str, ...]] = {i: (names[i],) for i in range(n)}
    dist = np.array(d, dtype=np.float64, copy=True)
    merges = []
    while len(groups) > 1:
        ids = sorted(groups)
        best = None
        for ai, a in enumerate(ids):
            for b in ids[ai + 1 :]:
                if max_size and len(groups[a]) + len(groups[b]) > max_size:
                    continue
                ga, gb = sorted((groups[a], groups[b]))
                key = (round(float(dist[a, b]), _TIE), ga, gb)
                if best is None or key < best[0]:
                    best = (key, a, b)
        if best is None:
            break
        (_, ga, gb), a, b = best
        na, nb = len(groups[a]), len(groups[b])
        merges.append((ga, gb, float(dist[a, b])))
        for m in groups:  # a takes the merged group; average linkage weights by member counts
            if m not in (a, b):
                dist[a, m] = dist[m, a] = (na * dist[a, m] + nb * dist[b, m]) / (na + nb)
        groups[a] = tuple(sorted(groups[a] + groups.pop(b)))
    return merges


def cut(names: list[str], merges, k: int) -> list[list[str]]:
    """The groups after the first n - k merges, each sorted, ordered by their first member."""
    if not 1 <= k <= len(names):
        raise UserError(f"k = {k}: need 1 <= k <= the number of languages ({len(names)})")
    if len(names) - len(merges) > k:
        raise UserError(
            f"k = {k}: the group size cap stops the merging at {len(names) - len(merges)} groups; "
            "raise --max-group-size or ask for more groups"
        )
    member_of = {c: (c,) for c in names}
    for ga, gb, _ in merges[: len(names) - k]:
        g = tuple(sorted(ga + gb))
        for c in g:
            member_of[c] = g
    return sorted({tuple(g) for g in member_of.values()}, key=lambda g: g[0])


def average_linkage(d: np.ndarray, names: list[str], a: list[str], b: list[str]) -> float:
    idx = {c: i for i, c in enumerate(names)}
    return float(np.mean([d[idx[x], idx[y]] for x in a for y in b]))


def group_languages(
    codes: list[str], ks: list[int], features: str = DEFAULT_FEATURES, max_group_size: int | None = None
) -> tuple[dict[int, dict], dict[str, str]]:
    """The grouping artifact (a plain dict, written by language_groupings.write_groupings) for each k; and the two-letter aliases
    that were resolved. Languages are clustered in sorted order, so the order given changes nothing.
    `max_group_size` caps the languages a group may hold (balance: no expert left with most of them);
    the groups for every k are still cuts of one merge sequence."""
    from elmforest.utils.typed import check_call_args

    check_call_args("group_languages", lists=dict(codes=codes, ks=ks))
    table = load_features(features)
    names, aliases = resolve_codes(codes, table)
    if len(names) < 2:
        raise UserError(f"grouping needs at least 2 languages, got {len(names)}")
    for k in ks:
        if not 1 <= k <= len(names):
            raise UserError(f"k = {k} but only {len(names)} languages: each group needs a language")
    names = sorted(names)
    d = cosine_distances(language_vectors(names, table))
    merges = agglomerate(d, names, max_group_size)
    pairwise = {a: {b: round(float(d[i, j]), 6) for j, b in enumerate(names)} for i, a in enumerate(names)}
    out = {}
    for k in ks:
        groups = {f"group{i}": list(g) for i, g in enumerate(cut(names, merges, k))}
        gnames = list(groups)
        out[k] = {
            "version": 1,
            "method": METHOD,
            "features": features,
            "feature_count": int(table.values.shape[1]),
            "distance": "cosine",
            "linkage": "average",
            "max_group_size": max_group_size,
            "k": k,
            "languages": names,
            "aliases": aliases,
            "groups": groups,
            "group_distances": {
                a: {b: round(average_linkage(d, names, groups[a], groups[b]), 6) for b in gnames if b != a}
                for a in gnames
            },
            "distances": pairwise,
            "merges": [{"a": list(ga), "b": list(gb), "distance": round(x, 6)} for ga, gb, x in merges],
            "lang2vec_version": lang2vec_version(),
        }
    return out, aliases


_MOVED = {
    "save_grouping",
    "write_groupings",
    "load_grouping",
    "check_if_grouping",
    "domain_map",
    "nearest_group",
}


def __getattr__(name: str):
    """The grouping artifacts' functions moved to cluster/language_groupings.py (2026-12-07); the names
    docs/xelm.md gave here still import."""
    if name in _MOVED:
        from elmforest.cluster import language_groupings

        return getattr(language_groupings, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
