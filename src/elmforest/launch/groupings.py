"""Groupings for a sweep's expert arm: X-ELM trains one expert per *group* of domains (languages grouped
by typology, `elmforest cluster languages`), so its expert LR has to be swept with those experts, not
with one expert per domain. A grouping is {expert name: [domains]}; a sweep takes several, by label
(k2, k4, ...), all sharing the one dense arm and seed, as X-ELM's forests do.

Everything is checked before any training: a domain in two groups would be scored by whichever group
came last, a domain outside the sweep's domains would never be compared with the dense run, and a
grouping that leaves a domain out would average over fewer domains than the dense arm does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from elmforest.data.shards import Shards
from elmforest.forest.trust import NAME, NAME_RULE, RESERVED_NAMES
from elmforest.utils.errors import UserError


def load_grouping(path: str | Path, held: set[str] | frozenset = frozenset()) -> dict[str, list[str]]:
    """{expert name: [domains]} from a grouping artifact (`{"groups": {"group0": ["deu", ...]}}`, as
    `elmforest cluster languages` writes it) or a plain {domain: group} map (data/domain_map.py's domain
    maps: a domain in two groups or an empty group is refused there). A language the artifact also
    knows by the code the user gave (`de` for `deu`) is listed once, as the shards in `held` spell it."""
    from elmforest.cluster.language_groupings import checked_domain_map

    m = checked_domain_map(path, role="--groups file")
    spelled = {c: a for a, c in m.aliases.items() if a in held and c not in held}
    groups: dict[str, list[str]] = {}
    for d, g in m.items():
        if d not in m.aliases:
            groups.setdefault(g, []).append(spelled.get(d, d))
    return groups


def load_groupings(
    paths: list[str | Path], held: set[str] | frozenset = frozenset()
) -> dict[str, dict[str, list[str]]]:
    """Several grouping files, each labelled by its file name's stem (groups/k4.json -> k4)."""
    out: dict[str, dict[str, list[str]]] = {}
    for p in paths:
        label = Path(p).stem
        if label in out:
            raise UserError(f"two groupings are named {label!r} (their file names): rename one")
        out[label] = load_grouping(p, held)
    return out


def normalize(groups: Mapping) -> dict[str, dict[str, list[str]]]:
    """{label: {expert: [domains]}}; one bare grouping {expert: [domains]} is labelled `groups`."""
    if not isinstance(groups, Mapping) or not groups:
        raise UserError("groups: give {expert name: [domains]} or {label: {expert name: [domains]}}")
    if not any(isinstance(v, Mapping) for v in groups.values()):
        groups = {"groups": groups}
    out = {}
    for label, grouping in groups.items():
        if not isinstance(grouping, Mapping) or not grouping:
            raise UserError(f"grouping {label!r}: expected a non-empty {{expert name: [domains]}} mapping")
        # the label names only the directory experts-LABEL, so reserved expert names are fine
        if not (isinstance(label, str) and NAME.fullmatch(label)):
            raise UserError(
                f"grouping label {label!r} (its file name) names a directory: use {NAME_RULE}; "
                "rename the file"
            )
        out[label] = {g: list(ms) if isinstance(ms, list | tuple) else ms for g, ms in grouping.items()}
    return out


def check_groupings(
    groupings: dict[str, dict[str, list[str]]], domains: list[str] | None, shards: Shards
) -> list[str]:
    """Each grouping splits the same domains (`domains`, or the first grouping's) into disjoint, non-empty
    groups of domains the shards can train and score; returns the domains. Each group's domains are put
    in sorted order: the order its expert mixes them in, whatever the file's."""
    want = sorted(domains) if domains is not None else None
    for label, grouping in groupings.items():
        seen: dict[str, str] = {}
        for g, members in grouping.items():
            _check_group_name(label, g)
            if not isinstance(members, list):
                raise UserError(f"grouping {label!r}: group {g!r} is not a list of domains: {members!r}")
            if not members:
                raise UserError(f"grouping {label!r}: group {g!r} is empty; every group needs domains")
            for d in members:
                if not isinstance(d, str) or not d:
                    raise UserError(f"grouping {label!r}: group {g!r} lists {d!r}, not a domain name")
                if d in seen:
                    where = "twice" if seen[d] == g else f"in groups {seen[d]!r} and {g!r}"
                    raise UserError(
                        f"grouping {label!r}: domain {d!r} is {where}; each domain belongs to one group"
                    )
                seen[d] = g
        unknown = sorted(d for d in seen if not shards.has(d, "train"))
        if unknown:
            raise UserError(
                f"grouping {label!r}: unknown domain(s) {unknown}: {shards.root} has {shards.domains}"
            )
        if want is None:
            want = sorted(seen)
        elif sorted(seen) != want:
            missing, extra = sorted(set(want) - set(seen)), sorted(set(seen) - set(want))
            raise UserError(
                f"grouping {label!r} must split exactly the swept domains {want}"
                + (f"; it leaves out {missing}" if missing else "")
                + (f"; it adds {extra}" if extra else "")
            )
        for g in grouping:
            grouping[g] = sorted(grouping[g])
    return list(domains) if domains is not None else want


def _check_group_name(label: str, g) -> None:
    """Each group names its expert, so it follows the expert names' rule (reserved names included)."""
    if not (isinstance(g, str) and NAME.fullmatch(g)):
        raise UserError(
            f"grouping {label!r}: group {g!r} cannot name an expert: use {NAME_RULE}; rename the group"
        )
    if g in RESERVED_NAMES:
        raise UserError(
            f"grouping {label!r}: group {g!r} cannot name an expert ({sorted(RESERVED_NAMES)} are reserved); "
            "rename the group"
        )


def canon(grouping: dict) -> dict:
    """A grouping as compared across runs: its members' order does not matter."""
    return {g: sorted(ms) for g, ms in grouping.items()}
