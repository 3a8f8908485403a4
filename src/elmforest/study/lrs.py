"""Each arm of a study at its own best learning rate at every budget ("Don't sweep your LR under the rug").

The optimal LR moves with the training length, so an LR swept at 1x and reused at 0.5x and 4x favours
whichever arm sits nearer its optimum there, and a multiplier read off such a curve measures the tuning,
not the method. With `lr_grid` / `expert_lr_grid` the study runs `elmforest sweep` (launch/sweep.py) at
every main-axis budget before it trains anything: the dense arm over `lr_grid` (whole dense runs at that
budget), and at forest budgets the experts over `expert_lr_grid`, branched from the best dense run's seed,
both chosen on the valid split with training seed `seeds[0]`, and wherever a dense run is swept the best
one's second half continued from its seed over `expert_lr_grid` (the `dense_tuned` arm's LR, as the
experts' phase has its own); c-BTM's smaller data fractions (dense and second half) at their own budgets on
their own subsamples (c-BTM at all the data shares the 1x point); each domain-count point (all three
arms on its n domains: its experts train at batch B / n, not the B / N of the main sweep, and the best
expert LR moves with the batch per expert); each seed share other than the study's (the experts
arm alone, branched from the 1x dense LR's seed at that share: the experts' length changes with it);
and c-BTM's k cluster experts at each data fraction and balance (the experts arm alone on the cluster
shards at batch B / k, from a seed at that fraction's dense LR: that seed mixes the clusters, where
the study's mixes the metadata domains, an approximation made for the LR's sake only).
A best LR at either end of its grid is reported as such (the optimum may lie outside it). Sweeps are
ordinary sweep directories under `sweeps/`, resumable like every run.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

from elmforest.data.shards import Shards
from elmforest.launch.sweep import sweep
from elmforest.launch.sweep_grid import point_tag
from elmforest.model.presets import get_preset
from elmforest.study.cbtm import sweep_key
from elmforest.study.config import StudyConfig, sweep_continue_lr, sweep_edges, sweep_lrs
from elmforest.study.run import budget_steps, lr_key, plan_points
from elmforest.utils.errors import UserError
from elmforest.utils.io import read_json


def cbtm_key(fraction: float, cfg) -> float | str:
    """The `budget_lrs` entry a c-BTM forest at this data fraction trains at: the 1x main budget's when
    it shares the 1x point (all the data), else its own sweep's ("data0.25")."""
    return 1.0 if fraction == 1.0 and 1.0 in cfg.dense_budgets else f"data{fraction:g}"


def budget_lrs(
    cfg,
    base,
    names: list[str],
    shards_root: str,
    out: Path,
    steps_1x: int,
    executor,
    threads,
    log,
    subsamples: dict | None = None,
    cbtm_shards: dict | None = None,
):
    """{budget, "data<f>", "domains<n>" or "share<s>": {"dense_lr", "expert_lr" (forests), "dense_edge",
    "expert_edge", "sweep"}}; {} when the study sweeps nothing. Main-axis budgets are swept on all the
    data; each c-BTM data fraction f that does not share the 1x point is swept at budget f on its own
    subsample (`subsamples` {f: shards root}), for c-BTM's dense run (k = 1) and its second half. Each
    domain-count and seed-share point of plan_points is swept at 1x on its own domains and at its own
    seed share; a seed-share point's dense LR is the 1x budget's (it trains no dense run). The sweeps
    are `sweep_specs`'s, which study/cost.py counts.
    `cbtm_shards` {(f, k, balance): (cluster shards, clusterer)}: each set of c-BTM cluster experts is
    swept on its clusters at budget f, its entry keyed by cbtm.sweep_key (its dense LR: the fraction's)."""
    result = {}
    for spec in sweep_specs(cfg, names):
        kind, *at = spec.shards
        root, domains = shards_root, list(spec.domains)
        if kind == "subsample":
            root = str((subsamples or {})[at[0]])
        elif kind == "clusters":  # the clusters of that subsample, k and balance
            sh = (cbtm_shards or {})[tuple(at)][0]
            root, domains = str(Path(sh.root).resolve()), list(sh.domains)
        c = copy.deepcopy(base)
        c.train.steps = budget_steps(spec.budget, steps_1x)
        c.train.seed = cfg.seeds[0]
        c.data.domains = domains
        # an experts-only sweep branches from the seed of another's dense LR, in a folder of that LR's (a
        # seed at another LR: another folder, not the old points)
        seed_lr = None if spec.dense else result[spec.seed_of]["dense_lr"]
        where = out / "sweeps" / spec.tag / ("" if spec.dense else f"from-{point_tag(seed_lr)}")
        s = _finished(where, spec.experts, cfg, spec.main, spec.dense, seed_lr, root)
        if s is None:
            check_same_shards(where, root)
            cbtm = kind == "clusters"
            what = f", {len(domains)} domains" if len(domains) < len(names) and not cbtm else ""
            what += f", seed share {spec.seed_share:g}" if spec.seed_share != cfg.seed_share else ""
            what += f", c-BTM's {len(domains)} cluster experts" if cbtm else ""
            what += ", c-BTM subsample" if root != shards_root and spec.budget != 1 else ""
            log(f"      LR sweep at {spec.budget:g}x ({c.train.steps} steps{what}): {where}")
            kw = dict(seed_share=spec.seed_share, executor=executor, threads=threads, log=log)
            grids = (list(cfg.lr_grid), list(cfg.expert_lr_grid))
            if not spec.dense:
                s = sweep(root, where, c, "experts", *grids, dense_lr=seed_lr, **kw)
            else:
                arm = ("all" if spec.main else "both") if spec.experts else "dense"
                s = sweep(root, where, c, arm, *grids, **kw)
            if spec.main and not spec.experts:  # a dense-only sweep: its dense run's second half after it
                s = sweep(root, where, c, "continue", *grids, dense_lr=s["dense"]["best_lr"], **kw)
        if spec.dense:
            r = {"dense_lr": s["dense"]["best_lr"], "dense_edge": s["dense"]["at_edge"]}
        else:
            r = {"dense_lr": seed_lr, "dense_edge": result[spec.seed_of]["dense_edge"]}
        r["sweep"] = str(where)
        if s.get("scored_domains"):  # some of its domains (small clusters) had no valid documents
            r["chosen_on"] = [len(s["scored_domains"]), len(s["domains"])]
        if spec.experts:
            r |= {"expert_lr": s["experts"]["best_lr"], "expert_edge": s["experts"]["at_edge"]}
        if spec.main:
            c_ = s["dense_continue"]
            r |= {"dense_continue_lr": c_["best_lr"], "dense_continue_edge": c_["at_edge"]}
        result[spec.key] = r
    return result


@dataclass(frozen=True)
class SweepSpec:
    """One LR sweep of a study: what `budget_lrs` runs and study/cost.py counts, from one list."""

    key: float | str  # its entry in budget_lrs's answer
    budget: float
    shards: tuple  # ("main",), ("subsample", f) or ("clusters", f, k, balance): budget_lrs finds them
    domains: tuple  # a c-BTM cluster set's: its clusters, read from its shards
    seed_share: float
    dense: bool  # its dense arm swept; else its experts alone, from the seed of `seed_of`'s dense LR
    experts: bool
    main: bool  # its dense run's second half swept too (a dense run the study compares with)
    tag: str  # its folder under sweeps/
    seed_of: float | str | None = None

    def units(self, cfg) -> float:
        """D units it trains at most: the dense grid, the expert grid's second halves, the continuation's
        (its point at the dense run's own LR is that run, not trained again); an experts-only sweep's seed."""
        half = len(cfg.expert_lr_grid) * (1 - self.seed_share) * self.budget
        if not self.dense:
            return self.seed_share * self.budget + half
        return len(cfg.lr_grid) * self.budget + half * self.experts + half * self.main


def sweep_specs(cfg, names: list[str]) -> list[SweepSpec]:
    """Every sweep of a study with `lr_grid`, in the order they run (a sweep whose seed takes another's
    dense LR after it); [] without."""
    if not cfg.lr_grid:
        return []
    forest, dense_budgets, share = set(cfg.forest_budgets), set(cfg.dense_budgets), cfg.seed_share
    specs = [
        SweepSpec(b, b, ("main",), tuple(names), share, True, b in forest, b in dense_budgets, f"b{b:g}")
        for b in sorted(dense_budgets | forest)
    ]
    fractions = sorted(set(cfg.cbtm_data)) if cfg.cbtm_ks else []
    for f in fractions:  # c-BTM's dense run and its second half (its experts: the cluster sets' below)
        if isinstance(key := cbtm_key(f, cfg), str):
            specs.append(
                SweepSpec(key, f, ("subsample", f), tuple(names), share, True, False, True, f"cbtm-{key}")
            )
    for p in plan_points(cfg, names):
        key = lr_key(p)
        if p.axis in ("domains", "share") and key not in [s.key for s in specs]:
            specs.append(
                SweepSpec(key, 1.0, ("main",), p.domains, p.seed_share, p.dense, True, p.dense, key, 1.0)
            )
    for f in fractions:
        for k in sorted(set(cfg.cbtm_ks)):
            for balance in sorted(set(cfg.cbtm_balance)):
                key = sweep_key(f, k, balance)
                where = ("clusters", f, k, balance)
                specs.append(SweepSpec(key, f, where, (), share, False, True, False, key, cbtm_key(f, cfg)))
    return specs


def _finished(
    where: Path,
    experts: bool,
    cfg,
    main: bool = False,
    dense: bool = True,
    seed_lr: float | None = None,
    shards: str | None = None,
) -> dict | None:
    """A sweep.json that already holds this budget's answer over these grids (a rerun dispatches none
    of its jobs again); `seed_lr`: its experts must have branched from the dense run at that LR (a
    seed share's, from the 1x dense LR: swept again if that moved); `shards`: swept on their content
    (clusters fitted again are other data: `sweep` then says so)."""
    if not (where / "sweep.json").is_file():
        return None
    s = read_json(where / "sweep.json")
    had = s.get("shards_fingerprint")
    if shards is not None and had is not None and had not in Shards(shards).fingerprints:
        return None
    if seed_lr is not None and (s.get("experts") or {}).get("seed_lr") != seed_lr:
        return None
    arms = [("dense", cfg.lr_grid)] if dense else []
    arms += [("experts", cfg.expert_lr_grid)] if experts else []
    arms += [("dense_continue", None)] if main else []
    ok = all(
        (s.get(a) or {}).get("grid") == sorted(set(map(float, g)))
        if g is not None
        else (s.get(a) or {}).get("best_lr") is not None  # its grid also holds the dense run's own LR
        for a, g in arms
    )
    return s if ok else None


def check_same_shards(where: Path, shards: str) -> None:
    """A study's sweep folder swept on other data than its shards now hold (clusters fitted again by
    another version) is refused naming the folder: `sweep` itself would say "another --out", an option
    `study` does not have."""
    had = (
        read_json(where / "sweep.json").get("shards_fingerprint")
        if (where / "sweep.json").is_file()
        else None
    )
    if had is not None and had not in (now := Shards(shards)).fingerprints:
        raise UserError(
            f"{where} was swept on other data (shards content {had}) than {shards} holds now "
            f"({now.fingerprint}); delete {where} to sweep it again on these"
        )


def lrs_table(lrs: dict) -> list[str]:
    """Markdown rows of the report: each budget's chosen LRs, the grid's edge flagged."""
    if not lrs:
        return []
    rows = ["| swept for | dense LR | expert LR | dense second-half LR |", "| --- | --- | --- | --- |"]

    for b, r in sorted(lrs.items(), key=lambda kv: _row(kv[0])[0]):
        d = f"{r['dense_lr']:g}" + (f" ({r['dense_edge']} of the grid)" if r.get("dense_edge") else "")
        e = "-"
        if "expert_lr" in r:
            e = f"{r['expert_lr']:g}" + (f" ({r['expert_edge']} of the grid)" if r.get("expert_edge") else "")
        t = "-"
        if "dense_continue_lr" in r:
            edge = r.get("dense_continue_edge")
            t = f"{r['dense_continue_lr']:g}" + (f" ({edge} of the grid)" if edge else "")
        on = (
            f", chosen on {r['chosen_on'][0]} of {r['chosen_on'][1]} (no valid split)"
            if r.get("chosen_on")
            else ""
        )
        rows.append(f"| {_row(b)[1]}{on} | {d} | {e} | {t} |")
    return rows


def _row(key) -> tuple[tuple, str]:
    """(sort key, name) of a `budget_lrs` entry's row: the budgets, then c-BTM's data fractions, the
    domain counts, the seed shares and c-BTM's cluster experts."""
    k = str(key)
    if m := re.fullmatch(r"cbtm-k(\d+)-(\w+)-data(.+)", k):
        n, balance, f = m.groups()
        return (4, float(f), int(n), balance), f"c-BTM k = {n} ({balance}), data {f} ({f}x)"
    for i, (prefix, name) in enumerate(
        (
            ("data", "c-BTM, data {0} ({0}x)"),
            ("domains", "{0} domains (1x)"),
            ("share", "seed share {0} (1x)"),
        ),
        1,
    ):
        if k.startswith(prefix):
            return (i, float(k.removeprefix(prefix))), name.format(k.removeprefix(prefix))
    return (0, float(k)), f"{float(k):g}x"


def sweep_matches(path, names: list[str], steps_1x: int, batch: int, shards: str) -> None:
    """A sweep.json is this study's best LRs only if it swept the study's 1x run: the same domains, steps
    and batch (a sweep of another corpus, budget or preset tunes another run; give its LRs by hand to
    use them anyway). The model is not recorded in a sweep.json, so not compared."""
    s = read_json(path)
    plan = s.get("plan") or {}
    have = (sorted(s.get("domains") or []), plan.get("total_steps"), plan.get("batch_size"))
    want = (sorted(names), steps_1x, batch)
    if have != want:
        raise UserError(
            f"sweep {path} tuned {have[1]} steps x batch {have[2]} on domains {have[0]}; this study's 1x "
            f"run is {want[1]} steps x batch {want[2]} on {want[0]}: sweep that run (`elmforest sweep --shards "
            f"{shards} --preset PRESET --set train.steps={want[1]} --set train.batch_size={want[2]} ...`), or "
            "give dense_lr / expert_lr / dense_continue_lr instead of `sweep`"
        )


def learning_rates(cfg: StudyConfig, base, lrs: dict) -> tuple[float, float, float, str, bool]:
    """(dense LR, expert LR, LR of the dense run's second half, where they come from, whether that last
    one was tuned at all) at 1x: swept at every budget, given, else a sweep.json's best, else the
    preset's (the second half's: the expert LR where neither has one, not tuned)."""
    if lrs:
        one = lrs[1.0]
        source = "swept at every budget (lrs_by_budget)"
        return one["dense_lr"], one["expert_lr"], one["dense_continue_lr"], source, True
    p = get_preset(cfg.preset)
    dense, expert, source = base.optim.lr, p.expert_lr or base.optim.lr, f"preset {cfg.preset}"
    cont = p.dense_continue_lr if cfg.dense_lr is None else None  # swept from the preset's dense run
    if cfg.sweep:
        dense, expert = sweep_lrs(cfg.sweep)
        cont = sweep_continue_lr(cfg.sweep)
        source = f"sweep {cfg.sweep}" + (f", {edges}" if (edges := sweep_edges(cfg.sweep)) else "")
    if cfg.dense_lr is not None or cfg.expert_lr is not None or cfg.dense_continue_lr is not None:
        source = "given"
    expert = cfg.expert_lr or expert
    tuned = (cfg.dense_continue_lr or cont) is not None
    return cfg.dense_lr or dense, expert, cfg.dense_continue_lr or cont or expert, source, tuned
