"""The bootstrap's seed parts by name, apart from eval/scaling_bootstrap.py so that a config can check
one without importing scipy (the CLI starts in a fraction of a second)."""

from __future__ import annotations

from elmforest.utils.errors import UserError

# the seed part's spread: pooled over an arm's budgets (a gain table's rows), or each point's own
SEED_POOLS = ("arm", "point")


def check_seed_pool(seed_pool: str) -> None:
    if seed_pool not in SEED_POOLS:
        raise UserError(f"seed_pool must be one of {', '.join(SEED_POOLS)}, got {seed_pool!r}")
