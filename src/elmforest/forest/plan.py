"""The budget plan of a BTM forest: how one dense run's steps and batch are split between the seed and
k experts, which domains the experts train on, and the experts' LR. One plan per forest: every
phase is checked against it, so the arms of a comparison never see different data or budgets.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

from elmforest.config import RunConfig
from elmforest.data.shards import Shards
from elmforest.forest.manifest import Forest
from elmforest.utils.errors import UserError


@dataclass
class Plan:
    """How the budget of one dense run is split between the seed and k experts."""

    total_steps: int
    batch_size: int  # dense and seed batch (sequences per micro-batch)
    n_experts: int
    seed_share: float = 0.5
    # The experts' domains, one each (None when only their number is known yet): the same list the
    # seed and the dense run mix, unless the forest shares another forest's seed (c-BTM, ablations).
    domains: list[str] | None = None
    expert_lr: float | None = None  # peak LR of the schedule the experts continue; None: the seed's

    def __post_init__(self):
        if self.total_steps < 2:
            raise UserError(
                f"train.steps={self.total_steps}: a forest needs at least 2 steps, the seed's and the experts'"
            )
        if not (isinstance(self.n_experts, int) and self.n_experts >= 1):
            raise UserError(f"a plan needs at least one expert, got {self.n_experts}")
        if not 0 < self.seed_share < 1:
            raise UserError(f"seed_share must be in (0, 1), got {self.seed_share}")
        if self.batch_size % self.n_experts:
            raise UserError(
                f"batch size {self.batch_size} is not divisible by {self.n_experts} experts; "
                "use a multiple so each expert gets an equal share (compute matching)"
            )
        if self.domains is not None:
            self.domains = sorted(self.domains)  # a set of domains: the same plan in any order
            if len(self.domains) != self.n_experts or len(set(self.domains)) != len(self.domains):
                raise UserError(
                    f"the plan has {self.n_experts} experts but {len(self.domains)} domains "
                    f"{self.domains}; one expert per domain, each domain once"
                )
        if self.expert_lr is not None and not (self.expert_lr > 0 and math.isfinite(self.expert_lr)):
            raise UserError(f"expert_lr must be a positive number, got {self.expert_lr}")

    @property
    def seed_steps(self) -> int:
        return max(1, min(self.total_steps - 1, round(self.total_steps * self.seed_share)))

    @property
    def expert_batch_size(self) -> int:
        return self.batch_size // self.n_experts


def plan_for(
    base: RunConfig, domains: list[str] | int, seed_share: float = 0.5, expert_lr: float | None = None
) -> tuple[Plan, RunConfig]:
    """The plan for one expert per domain (or for `domains` experts not named yet), and the dense config.

    The batch is rounded to a multiple of the number of experts (at least one sequence each). When the
    domains are named, the seed and the dense run mix exactly those (`data.domains`); a config that
    names other domains is refused, so the arms never see different data.
    """
    names = None if isinstance(domains, int) else list(domains)
    n = domains if isinstance(domains, int) else len(names)
    if n < 1:
        raise UserError("a forest needs at least one expert")
    cfg = copy.deepcopy(base)
    if names is not None:
        check_expert_names(names)
        if cfg.data.domains is not None and sorted(cfg.data.domains) != sorted(names):
            raise UserError(
                f"data.domains={cfg.data.domains} (the seed and dense mixture) differs from the experts' "
                f"domains {names}; one domain list must drive every phase"
            )
        # in the order given: the sampler draws by list position, so another order is another seed
        # (the plan, a set, records them sorted; a run's config keeps the order, and a paused run
        # resumed with another order is refused as another config: sorting here refused runs made so)
        cfg.data.domains = names
    per_expert = max(1, round(base.train.batch_size / n))
    cfg.train.batch_size = per_expert * n
    return Plan(cfg.train.steps, cfg.train.batch_size, n, seed_share, names, expert_lr), cfg


def check_expert_names(domains: list[str]) -> None:
    """Each domain names its expert: check every name before any training starts (a seed trained for
    nothing is the alternative)."""
    from elmforest.forest.trust import RESERVED_NAMES, case_twin, valid_name

    for i, d in enumerate(domains):
        try:
            valid_name(d)
            if other := case_twin(d, [*sorted(RESERVED_NAMES), *domains[:i]]):
                raise UserError(f"it differs from {other!r} only in case, one folder where case is not kept")
        except UserError as e:
            raise UserError(
                f"domain {d!r} cannot name an expert ({e}); rename its data file (or folder, for .txt files) "
                'or set the documents\' "domain" field'
            ) from None


def check_plan(forest: Forest, plan: Plan, elsewhere: str = "another --forest") -> None:
    """A forest is planned once: re-running a phase with another plan would mix two budgets.
    `elsewhere`: how the command that asks names a new forest (the quickstart's is its --out)."""
    old = forest.data.get("plan")
    if old is None:
        return
    have = asdict(Plan(**old))
    diff = {k: (have[k], v) for k, v in asdict(plan).items() if have.get(k) != v}
    if diff:
        raise UserError(
            f"{forest.root} was planned differently ("
            + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            + f"); use a new forest ({elsewhere}) or the same settings"
        )


def plan_domains(plan: Plan, shards: Shards, domains: list[str] | None = None) -> list[str]:
    """The experts' domains: the plan's; a different list (or count) is refused."""
    if plan.domains is not None:
        if domains is not None and sorted(domains) != sorted(plan.domains):
            raise UserError(f"the plan's experts are {plan.domains}, not {domains}")
        names = plan.domains
    else:
        names = list(domains or [d for d in shards.domains if shards.has(d, "train")])
        if len(names) != plan.n_experts:
            raise UserError(
                f"the plan shares the budget between {plan.n_experts} experts, but {len(names)} domains "
                f"would train ({names}); each expert's batch would not match the budget"
            )
    check_expert_names(names)
    missing = [d for d in names if not shards.has(d, "train")]
    if missing:
        raise UserError(f"{shards.root}: no training data for domain(s) {missing}; have {shards.domains}")
    return list(names)
