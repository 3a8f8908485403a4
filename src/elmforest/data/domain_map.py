"""Which expert a document trains: its domain as read, replaced at build time by a domain map
(X-ELM: language -> language group, from `elmforest cluster languages` or a plain JSON object) or by
one of K random groups (BTM's random-split ablation).

Apart from data/shards.py because a map is read and checked on its own (`--groups` files, `shards
build --domain-map`) before any tokenizing, and says nothing about how shards are laid out.
"""

from __future__ import annotations

import os
from pathlib import Path

from elmforest.data.splits import random_domain
from elmforest.utils.errors import NotFound, UserError
from elmforest.utils.io import read_json


def _relabeller(random_domains: int | None, domain_map: dict[str, str] | None):
    if random_domains and domain_map:
        raise UserError("--random-domains and --domain-map both replace the domains: give one")
    if random_domains:
        return lambda doc: random_domain(doc.id, random_domains)
    if not domain_map:
        return lambda doc: doc.domain

    def mapped(doc) -> str:
        try:
            return domain_map[doc.domain]
        except KeyError:
            raise UserError(
                f"domain {doc.domain!r} (document {doc.id}) is in no group of the domain map "
                f"(it names {', '.join(sorted(domain_map))})"
            ) from None

    return mapped


def load_domain_map(path: str | os.PathLike, role: str = "domain map") -> dict[str, str]:
    """A domain -> new domain map from JSON: a grouping artifact (`{"groups": {"group0": ["deu", ...]}}`,
    elmforest cluster languages) or a plain `{"deu": "group0", ...}` object. `role`: what the file is
    to the command, for its errors."""
    if not Path(path).is_file():
        what = "a directory, not a JSON file" if Path(path).is_dir() else "no such file"
        if str(path).lstrip().startswith("{"):
            what += " (inline JSON is not read: write it to a file and give its path)"
        raise NotFound(f"{role} {path}: {what}")
    m, aliases = read_json(path, unique_keys=True), {}
    if isinstance(m, dict) and isinstance(m.get("groups"), dict):
        groups = m["groups"]
        if not all(isinstance(v, list) and v for v in groups.values()):
            raise UserError(f"{path}: every group must be a non-empty list of domains")
        pairs = [(d, g) for g, members in groups.items() for d in members]
        # the codes the user gave (two-letter `de` for `deu`) name the same languages as domains
        group_of = dict(pairs)
        given = m.get("aliases") if isinstance(m.get("aliases"), dict) else {}
        aliases = {a: c for a, c in given.items() if c in group_of and a not in group_of}
        pairs += [(a, group_of[c]) for a, c in aliases.items()]
    elif isinstance(m, dict):
        pairs = list(m.items())
    else:
        raise UserError(f"{path}: a domain map is a JSON object")
    out: dict[str, str] = {}
    for d, g in pairs:
        if not (isinstance(d, str) and d and isinstance(g, str) and g):
            raise UserError(f"{path}: bad entry {d!r} -> {g!r} (domain names are non-empty strings)")
        if out.setdefault(d, g) != g:
            raise UserError(f"{path}: domain {d!r} is mapped to both {out[d]!r} and {g!r}")
    if not out:
        raise UserError(f"{path}: the domain map is empty")
    return DomainMap(out, aliases=aliases)


class DomainMap(dict):
    """domain -> group, knowing which keys are other spellings (`aliases`: `de` -> `deu`) of another key,
    so a corpus holding one spelling is not told it lacks the other."""

    def __init__(self, pairs: dict, aliases: dict | None = None):
        super().__init__(pairs)
        self.aliases = dict(aliases or {})

    def unused(self, held: set[str]) -> list[str]:
        spellings = {k: {k} for k in self}
        for a, c in self.aliases.items():
            spellings[a].add(c)
            spellings[c].add(a)
        return sorted(k for k in self if not spellings[k] & held)
