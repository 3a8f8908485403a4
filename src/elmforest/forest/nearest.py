"""X-ELM's branching for a language added later: from the existing expert most like it.

Two measures, both recorded in the new expert's lineage so the choice can be audited:
- `posterior` (the default): the forest's posterior over its experts on the new domain's valid split
  (BTM's branching weights, forest/branching.py `branch_weights`): the expert that already predicts the new
  data best. Works for any domain.
- `typology`: the URIEL syntax distance (cluster/languages.py) between the new language and each
  expert's languages (average linkage): X-ELM's choice, needing ISO 639-3 domains. An expert trained on
  a group of languages (shards built with `--domain-map`) counts every language of its group.
"""

from __future__ import annotations

import sys
from pathlib import Path

from elmforest.config import PRIOR_BATCHES
from elmforest.data.shards import Shards
from elmforest.forest.manifest import Forest
from elmforest.utils.errors import UserError
from elmforest.utils.io import read_json

MEASURES = ("posterior", "typology")


def nearest_expert(
    forest: Forest,
    shards: Shards,
    domain: str,
    by: str,
    prior_batches: int = PRIOR_BATCHES,
    among: list[str] | None = None,
) -> tuple[str, dict]:
    """(the expert to branch from, the record of why: the measure and every expert's score); `among`
    limits the candidates (default: every expert of the forest)."""
    from elmforest.forest.branching import branch_weights

    if by not in MEASURES:
        raise UserError(f"unknown nearest measure {by!r}; expected nearest:posterior or nearest:typology")
    unknown = sorted(set(among or []) - set(forest.names))
    if unknown:
        raise UserError(f"{forest.root}: no expert(s) {unknown} to branch from; have {forest.names}")
    candidates = [
        n for n in (forest.names if among is None else among) if forest.expert(n).get("branch") != "flexolmo"
    ]
    if not candidates:
        raise UserError(f"{forest.root}: no expert with the seed's architecture to branch from")
    if owners := [n for n in (forest.names if among is None else among) if n not in candidates]:
        print(  # said, as --branch mixture refuses them: their 2-expert MoEs are not the seed's shape
            f"note: FlexOlmo owner(s) {', '.join(owners)} are not candidates to branch from (2-expert MoEs)",
            file=sys.stderr,
        )
    if by == "posterior":
        scores = branch_weights(forest, shards, domain, prior_batches, names=candidates)
        best = max(scores, key=lambda n: (scores[n], n))
        return best, {"by": by, "posterior": scores}
    from elmforest.cluster.language_groupings import groups_holding, nearest_group

    mapping = shards.index.get("domain_map") or {}
    groups = {n: _languages(forest, n, mapping) for n in candidates}
    new = sorted(lang for lang, g in mapping.items() if g == domain) or [domain]
    if len(new) != 1:
        raise UserError(f"{domain!r} is a group of languages {new}; typology branching adds one language")
    try:
        best, dists = nearest_group(new[0], {"groups": groups})
        held = groups_holding(new[0], {"groups": groups})
    except UserError as e:
        raise UserError(
            f"nearest:typology needs every domain to be an ISO 639-3 language, and an expert of a group "
            f"its languages (from the domain map of the shards it trained on, or of --shards): {e}; "
            "or use nearest:posterior"
        ) from None
    if held:  # not new: nearest_group chose the group that trained on it
        print(
            f"note: {new[0]} is already one of the languages of expert(s) {', '.join(held)}; this "
            f"expert branches from {best}, which trained on it (the distances leave it out of its group)",
            file=sys.stderr,
        )
        return best, {"by": by, "syntax_distance": dists, "trained_on_it": held}
    return best, {"by": by, "syntax_distance": dists}


def _languages(forest: Forest, name: str, mapping: dict) -> list[str]:
    """The languages expert `name` trained on: each of its domains, a group named in the domain map of
    the shards it trained on (recorded beside its weights) or else of the shards given, counts as its
    members. The new language's shards need not name the old groups."""
    maps = []
    rec = forest.expert_dir(name) / "elmforest_data.json"
    if rec.is_file():
        index = Path(str(read_json(rec).get("shards", ""))) / "index.json"
        if index.is_file():
            maps.append(read_json(index).get("domain_map") or {})
    maps.append(mapping)
    langs = []
    for d in forest.expert(name)["domains"]:
        members = next((m for m in ([lang for lang, g in dm.items() if g == d] for dm in maps) if m), [d])
        langs += sorted(members)
    return langs
