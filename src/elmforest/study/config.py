"""The typed config of a scaling study (`elmforest study CONFIG`), read from YAML or JSON, with presets
as code.

A study measures what BTM's headline claims: the dense compute a forest is worth. It needs the dense
arm at enough budgets for its curve to be fitted (>= 4, spanning >= 8x), the forest at several
budgets inside that range (>= 3), and >= 2 training seeds per point so the bootstrap has something to
resample; the config refuses less, naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from elmforest.config import PRIOR_BATCHES
from elmforest.eval.seed_pool import check_seed_pool
from elmforest.utils.errors import UserError
from elmforest.utils.typed import from_dict


@dataclass
class StudyConfig:
    preset: str = "cpu-small"
    overrides: list[str] = field(default_factory=list)  # `section.key=value`, applied to every run
    corpus: str | None = None  # None: the demo corpus and its out-of-domain sets
    ood: list[str] = field(default_factory=list)  # extra out-of-domain sets (any JSONL/Parquet/txt)
    domains: list[str] | None = None  # the training domains (None: every domain with training data)
    steps: int | None = None  # the 1x budget: dense steps at the preset's batch (None: the preset's)
    dense_budgets: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    forest_budgets: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    seed_share: float = 0.5
    # the arms' learning rates: None takes the preset's (from a recorded `elmforest sweep`); `sweep`
    # names a sweep.json whose best LRs set both
    dense_lr: float | None = None
    expert_lr: float | None = None
    sweep: str | None = None
    # the dense arm's second half at its own LR (arm dense_tuned: each main-axis dense run continued from
    # its seed state at this LR, the same FLOPs), as the experts' phase has its own: None takes the
    # `sweep` file's continuation arm, else the preset's, else the expert LR
    dense_continue_lr: float | None = None
    # LR sweeps at every main-axis budget (each >= 4 LRs; both or neither): the dense arm at each budget
    # and the experts at each forest budget take their own best LR on the valid split (seed `seeds[0]`),
    # and so does c-BTM at each data fraction below 1 (swept on its subsample at its budget), each
    # domain count (on its n domains at 1x), each seed share (its experts alone at 1x) and each set
    # of c-BTM cluster experts (k x balance x data fraction, on its clusters). Costs
    # len(lr_grid) dense runs per budget and len(expert_lr_grid) expert phases per forest budget, on
    # top of the study (--dry-run counts it).
    lr_grid: list[float] = field(default_factory=list)
    expert_lr_grid: list[float] = field(default_factory=list)
    # the axes the papers claim, each at the 1x budget: forests of the first n domains (with a dense
    # run on the same n domains), and forests whose seed took other shares of the budget
    domain_counts: list[int] = field(default_factory=list)
    seed_shares: list[float] = field(default_factory=list)
    # c-BTM: k discovered clusters (k = 1 is the dense run) x the amount of data (fractions of the
    # training documents, the budget scaled with them), clusters balanced by document count or bytes
    cbtm_ks: list[int] = field(default_factory=list)
    cbtm_data: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    cbtm_balance: list[str] = field(default_factory=lambda: ["documents", "bytes"])
    eval_bytes: int = 64_000  # test text per domain: the first whole documents within this many bytes
    prior_batches: int = PRIOR_BATCHES
    n_boot: int = 1000
    ci: float = 0.90
    # the bootstrap's seed part: each arm's seed spread pooled over its budgets ("arm"), or each
    # point's own ("point": 1 degree of freedom with 2 seeds; eval/scaling_bootstrap.pooled_steps)
    seed_pool: str = "arm"
    workers: int | None = None  # jobs at a time (default: 2 on a CPU of 2+ cores)

    def validate(self) -> None:
        bad = []
        dense, forest = sorted(self.dense_budgets), sorted(self.forest_budgets)
        wrong = [
            f"{name} holds {b!r}"
            for name, budgets in (("dense_budgets", dense), ("forest_budgets", forest))
            for b in budgets
            if not (math.isfinite(b) and b > 0)
        ]
        if wrong:
            bad.append(f"{wrong[0]}: budgets must be positive numbers")
        elif len(set(dense)) < 4 or dense[-1] / dense[0] < 8:
            bad.append(f"dense_budgets {dense}: the dense curve needs >= 4 budgets spanning >= 8x")
        elif len(set(forest)) < 3:
            bad.append(f"forest_budgets {forest}: the forest needs >= 3 budgets")
        elif forest[0] < dense[0] or forest[-1] > dense[-1]:
            bad.append(
                f"forest_budgets {forest} must lie within the dense budgets {dense} (the multiplier is read "
                "off the dense curve, never extrapolated)"
            )
        lists = (
            "lr_grid",
            "expert_lr_grid",
            "dense_budgets",
            "forest_budgets",
            "seeds",
            "domain_counts",
            "seed_shares",
            "cbtm_ks",
            "cbtm_data",
            "cbtm_balance",
        )
        dup = [n for n in lists if len(set(getattr(self, n))) != len(getattr(self, n))]
        if dup:
            bad.append(f"{', '.join(dup)}: a value given twice")
        if self.seed_shares and not (1.0 in self.dense_budgets and 1.0 in self.forest_budgets):
            bad.append(
                "seed_shares compares forests at the 1x budget with the 1x dense run: put 1.0 in dense_budgets and forest_budgets"
            )
        if len(set(self.seeds)) < 2 or any(not 0 <= s < 2**64 for s in self.seeds):
            bad.append(f"seeds {self.seeds}: >= 2 distinct training seeds in [0, 2**64)")
        if not 0 < self.seed_share < 1 or not all(0 < s < 1 for s in self.seed_shares):
            bad.append("seed_share and seed_shares must be in (0, 1)")
        if any(n < 2 for n in self.domain_counts):
            bad.append(f"domain_counts {self.domain_counts}: each >= 2")
        data = sorted(set(self.cbtm_data))  # values are checked with the c-BTM axis off too: a typo
        # there is a typo still when the axis is turned back on
        if any(k < 2 for k in self.cbtm_ks):
            bad.append(f"cbtm_ks {self.cbtm_ks}: each >= 2 (k = 1 is the dense run, always there)")
        if not all(0 < f <= 1 for f in data) or (self.cbtm_ks and (len(data) < 3 or data[-1] / data[0] < 4)):
            bad.append(f"cbtm_data {self.cbtm_data}: >= 3 fractions in (0, 1] spanning >= 4x")
        if (self.cbtm_ks and not self.cbtm_balance) or not set(self.cbtm_balance) <= {"documents", "bytes"}:
            bad.append(f"cbtm_balance {self.cbtm_balance}: documents and/or bytes")
        if bool(self.lr_grid) != bool(self.expert_lr_grid):
            bad.append(
                "lr_grid and expert_lr_grid: give both (a sweep at every budget tunes both arms) or neither"
            )
        elif self.lr_grid:
            for name in ("lr_grid", "expert_lr_grid"):
                g = getattr(self, name)
                if len({f"{x:.3g}" for x in g}) < 4 or not all(math.isfinite(x) and x > 0 for x in g):
                    bad.append(f"{name} {g}: >= 4 positive learning rates, distinct to 3 significant digits")
            if not (1.0 in self.dense_budgets and 1.0 in self.forest_budgets):
                bad.append(
                    "lr_grid: the study's own LRs (and the seed-share points' dense LR) are the 1x budget's: put 1.0 in dense_budgets and forest_budgets"
                )
            if (
                self.dense_lr is not None
                or self.expert_lr is not None
                or self.sweep
                or self.dense_continue_lr
            ):
                bad.append(
                    "lr_grid: the sweeps choose the LRs; drop dense_lr, expert_lr, dense_continue_lr and sweep"
                )
        if self.domains is not None and len(set(self.domains)) < len(self.domains):
            bad.append(f"domains {self.domains}: name each domain once")
        elif self.domains is not None and len(set(self.domains)) < 2:
            bad.append(f"domains {self.domains}: a forest needs >= 2 training domains")
        if self.workers is not None and self.workers < 1:
            bad.append(f"workers {self.workers}: >= 1 (or unset for the default)")
        try:  # a malformed override (an unknown key, a whole section) said now, not at the first run
            from elmforest.config import apply_overrides
            from elmforest.model.presets import preset_run_config

            run = apply_overrides(preset_run_config(self.preset, "shards"), [o for o in self.overrides if o])
            if (limit := run.model.max_position_embeddings) and run.train.seq_len > limit:
                bad.append(  # every run would fail on it, after the dry run had passed
                    f"overrides: train.seq_len={run.train.seq_len} is longer than the model's {limit} positions"
                )
        except UserError as e:
            if not str(e).startswith("unknown preset"):
                bad.append(str(e))
        if lr := [o for o in self.overrides if str(o).split("=", 1)[0].strip() == "optim.lr"]:
            bad.append(  # it moved the dense LR only, kept the preset's second-half LR swept for another
                f"overrides {lr}: a study's LRs are dense_lr, expert_lr and dense_continue_lr (or sweep / "
                "lr_grid), each for its own arm"
            )
        owned = self._owned_overrides()
        if owned:
            bad.append(
                f"overrides {owned}: the study sets these for each run (budgets through steps and "
                "dense_budgets, training seeds through seeds, the data and checkpoints itself)"
            )
        if self.steps is not None and self.steps < 4:
            bad.append("steps must be >= 4")
        elif dense and all(map(math.isfinite, dense)) and max(dense) * (one := self.steps_1x()) >= 2**63:
            # found here, not in every run's config after the data was prepared
            bad.append(f"steps x dense_budgets: {max(dense):g} x {one}: a run's steps must be below 2**63")
        for name, least in (("eval_bytes", 1), ("prior_batches", 1), ("n_boot", 100)):
            if getattr(self, name) < least:
                bad.append(f"{name} {getattr(self, name)}: must be >= {least}")
        if not 0.5 <= self.ci < 1:
            bad.append("ci must be in [0.5, 1)")
        try:
            check_seed_pool(self.seed_pool)
        except UserError as e:
            bad.append(str(e))
        for lr, name in (
            (self.dense_lr, "dense_lr"),
            (self.expert_lr, "expert_lr"),
            (self.dense_continue_lr, "dense_continue_lr"),
        ):
            if lr is not None and not (math.isfinite(lr) and lr > 0):
                bad.append(f"{name} must be a positive number")
        if bad:
            raise UserError("invalid study config: " + "; ".join(bad))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def steps_1x(self) -> int:
        """The 1x budget's steps: `steps`, else the preset's (1 where the preset is unknown: refused
        on its own)."""
        from elmforest.model.presets import preset_run_config

        if self.steps is not None:
            return self.steps
        try:
            return preset_run_config(self.preset, "shards").train.steps
        except UserError:
            return 1

    def _owned_overrides(self) -> list[str]:
        """The overrides that set a field the study sets for each run (a whole section is refused by
        apply_overrides, so each is a dotted key)."""
        return [o for o in self.overrides if str(o).split("=", 1)[0].strip() in STUDY_OWNED]


# per run, by the study (train.init_checkpoint: each dense run's second half, arm dense_tuned)
STUDY_OWNED = (
    "train.steps",
    "train.seed",
    "train.init_checkpoint",
    "data.shards",
    "data.domains",  # the study's `domains` (it set them for each run over this override, silently)
    "data.split",  # every run trains on the train split; the study scores the test split (a run on it
    "train.stop_at",  # scored its own training text), and every run goes to its steps
    "model.init_from",
)


def sweep_continue_lr(path: str | Path) -> float | None:
    """The best LR of a sweep.json's continuation arm (`elmforest sweep --arm all`), None without one."""
    from elmforest.utils.io import read_json

    s = read_json(path)
    best = (s.get("dense_continue") or {}).get("best_lr")
    if best is not None and (s.get("dense") or {}).get("best_lr") is not None:
        _same_seed_run(path, s, "dense_continue")
    return float(best) if best is not None else None


def sweep_edges(path: str | Path) -> str:
    """Which of a sweep.json's best LRs lie at an edge of their grid, said as the report says it for a
    study's own sweeps ("" where none do): the optimum may lie outside the grid."""
    from elmforest.utils.io import read_json

    s = read_json(path)
    names = {"dense": "dense", "experts": "expert", "dense_continue": "dense second half"}
    said = [
        f"the {name} LR {float(s[arm]['best_lr']):g} at the {s[arm]['at_edge']} of its grid"
        for arm, name in names.items()
        if isinstance(s.get(arm), dict) and s[arm].get("at_edge") and s[arm].get("best_lr") is not None
    ]
    return "; ".join(said) + ": the optimum may lie outside it" if said else ""


def sweep_lrs(path: str | Path) -> tuple[float, float]:
    """(dense, expert) best LRs of a `elmforest sweep --arm both` result (the study's `sweep`)."""
    from elmforest.utils.io import read_json

    if not Path(path).is_file():
        raise UserError(f"sweep {path}: no such file (a sweep.json written by `elmforest sweep --arm both`)")
    s = read_json(path)
    try:
        lrs = float(s["dense"]["best_lr"]), float(s["experts"]["best_lr"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: not a sweep.json with both arms (elmforest sweep --arm both)") from None
    if not all(math.isfinite(x) and x > 0 for x in lrs):
        raise UserError(f"{path}: best learning rates {lrs} are not positive numbers")
    _same_seed_run(path, s, "experts")
    return lrs


def _same_seed_run(path, s: dict, arm: str) -> None:
    """An arm tuned by branching from another dense run than the dense arm's best (`sweep --arm experts
    --dense-lr X`) would pair LRs no sweep compared."""
    seed, best = (s.get(arm) or {}).get("seed_lr"), s["dense"]["best_lr"]
    if seed is not None and f"{float(seed):.6g}" != f"{float(best):.6g}":
        raise UserError(
            f"{path}: its {arm} arm branched from the dense run at LR {float(seed):g}, not from the dense "
            f"arm's best ({float(best):g}); run `elmforest sweep --arm {'continue' if arm == 'dense_continue' else 'experts'}` "
            "on that --out again, or give the LRs instead of `sweep`"
        )


STUDY_PRESETS: dict[str, dict] = {
    # seconds, for tests: the tiny model on 2 domains; every rule above still holds
    "tiny": {
        "preset": "tiny",
        "steps": 16,
        "overrides": [
            "train.batch_size=4",
            "train.seq_len=32",
            "train.log_every=4",
            "train.ckpt_every=0",
            "train.valid_every=0",
        ],
        "dense_budgets": [0.5, 1.0, 2.0, 4.0],
        "forest_budgets": [0.5, 1.0, 2.0],
        "seeds": [0, 1],
        "eval_bytes": 4_000,
        "prior_batches": 2,
        "n_boot": 200,
    },
    # the demo corpus on 2 CPU cores: cpu-small (1.3M parameters) at 0.5x-4x the quickstart's budget
    "cpu": {
        "preset": "cpu-small",
        "dense_budgets": [0.5, 1.0, 2.0, 4.0],
        "forest_budgets": [0.5, 1.0, 2.0],
        "seeds": [0, 1],
        "domain_counts": [2, 4, 8],
        "seed_shares": [0.25, 0.75],
        "cbtm_ks": [2, 4, 8],
    },
    # the same study at twice the budget, to move the seed (256 steps) further down its curve (it is
    # still on the steep part there: docs/benchmarks.md, "The cpu-long study"); compiled with a fused
    # optimizer (1.6x, docs/benchmarks.md), the prior from 64 valid windows per domain (as many tokens
    # as the test text) instead of 160, to fit in 3 hours on 2 cores
    "cpu-long": {
        "preset": "cpu-small",
        "steps": 512,
        "overrides": ["train.compile=true", "train.fused_optimizer=true"],
        "dense_budgets": [0.5, 1.0, 2.0, 4.0],
        "forest_budgets": [0.5, 1.0, 2.0],
        "seeds": [0, 1],
        "domain_counts": [2, 4, 8],
        "seed_shares": [0.25, 0.75],
        "cbtm_ks": [2, 4, 8],
        "prior_batches": 8,
    },
    # GPU studies at the BTM paper's sizes; `elmforest study btm-125m --dry-run` prints the cost (docs/study.md)
    **{
        name: {
            "preset": name,
            "dense_budgets": [0.25, 0.5, 1.0, 2.0, 4.0],
            "forest_budgets": [0.5, 1.0, 2.0],
            "seeds": [0, 1],
            "domain_counts": [2, 4, 8],
        }
        for name in ("btm-125m", "btm-350m", "btm-750m", "btm-1.3b")
    },
}


def load_study_config(source: str | Path, overrides: list[str] | tuple = ()) -> StudyConfig:
    """A preset's name, or a YAML/JSON file; then `key=value` overrides (values parsed as YAML)."""
    import yaml

    from elmforest.utils.yaml_file import read_yaml

    if str(source) in STUDY_PRESETS:
        raw = dict(STUDY_PRESETS[str(source)])
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"{source}: no such study config file (or preset: {sorted(STUDY_PRESETS)})")
        raw = read_yaml(path)
        if not isinstance(raw, dict):
            raise UserError(f"{path}: a study config is a mapping of fields, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"override {item!r}: expected key=value")
        try:
            raw[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            where = getattr(e, "problem", None) or "not valid YAML"
            raise UserError(f"override {item!r}: {key.strip()}'s value is not valid YAML ({where})") from None
    cfg = from_dict(StudyConfig, raw, where=" (study)")
    cfg.validate()
    return cfg
