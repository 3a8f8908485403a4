"""Which forest mixture mode uses which setting: one table for `eval`, `serve` and lm-eval, which each
refuse a setting given to a mode that ignores it (dropped without a word, it read as part of what was
measured). Kept free of torch so a usage error is answered at once."""

from __future__ import annotations

USED_BY = {
    "k": ("topk", "cluster"),
    "weighting": ("ensemble", "topk"),
    "prior": ("ensemble", "topk", "average"),
    "select": ("topk",),
    "route": ("cluster",),
    "router_context": ("cluster",),
    "routing_temperature": ("cluster",),
}


def unused(mode: str | None, given: dict[str, str]) -> list[str]:
    """The labels of `given` ({setting: how the caller names it}, the settings given) that `mode` ignores;
    `mode` None: a single model, which uses none of them."""
    return [label for name, label in given.items() if mode is None or mode not in USED_BY[name]]
