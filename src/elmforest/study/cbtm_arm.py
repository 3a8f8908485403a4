"""The c-BTM arm of a study: its subsamples and cluster shards, made before any training; its forests'
plans checked up front; each forest branched from the seed of the dense run at its data fraction; and
the points it is scored as. Apart from study/study.py, which runs every arm in order."""

from __future__ import annotations

from pathlib import Path

from elmforest.study.config import StudyConfig
from elmforest.study.run import Point, cbtm_base


def cbtm_data(cfg: StudyConfig, data, root: Path, progress: bool, log):
    """(shards of a point, the c-BTM forests, their cluster shards): the subsamples and their clusters
    are made before any training, so a bad clusterer fails the study before hours are spent."""
    from elmforest.study.cbtm import CbtmForest, cluster_shards, subsample, subsample_shards

    sub = {1.0: data.shards}
    forests, cshards = [], {}
    if cfg.cbtm_ks:
        log(f"      c-BTM: k {cfg.cbtm_ks} x data {cfg.cbtm_data} x balance {cfg.cbtm_balance}")
    for f in sorted(set(cfg.cbtm_data) if cfg.cbtm_ks else ()):
        corpus = subsample(data.corpus, root / f"corpus-data{f:g}", f, data.names)
        if f < 1.0:
            sub[f] = subsample_shards(root, corpus, data.tokenizer, f, progress)
        for k in sorted(set(cfg.cbtm_ks)):
            for balance in cfg.cbtm_balance:
                cshards[(f, k, balance)] = cluster_shards(
                    root, corpus, data.tokenizer, f, k, balance, progress
                )
                forests += [CbtmForest(f, s, k, balance) for s in cfg.seeds]
    return (lambda p: sub[p.data_fraction]), forests, cshards


def fraction_shards(shards_of, cfg: StudyConfig) -> dict:
    """{data fraction: its shards} of the c-BTM axis."""
    fractions = sorted(set(cfg.cbtm_data)) if cfg.cbtm_ks else []
    return {
        f: shards_of(Point("cbtm", f, cfg.seeds[0], (), cfg.seed_share, False, True, f)) for f in fractions
    }


def cbtm_lr(c, expert_lr: float, lrs: dict | None) -> float:
    """The expert LR of c-BTM forest `c`: its cluster experts' sweep's when the study sweeps."""
    from elmforest.study.cbtm import sweep_key

    return lrs[sweep_key(c.fraction, c.k, c.balance)]["expert_lr"] if lrs else expert_lr


def check_cbtm_plans(cfg, forests, cshards, runs_dir: Path, expert_lr: float, lrs: dict | None) -> None:
    """A c-BTM forest of this study planned otherwise (an older study's LRs) is refused before any run
    trains, as the points are (study/run.py), not once every seed and dense run has: its experts branch
    only after them. Checked as `share_seed` checks it, against the plan it would make."""
    from elmforest.forest.manifest import Forest
    from elmforest.forest.plan import check_plan
    from elmforest.forest.seeding import shared_plan

    for c in forests:
        here, base = runs_dir / c.tag, runs_dir / cbtm_base(c.fraction, c.seed, cfg)
        if not ((here / "forest.json").is_file() and (base / "forest.json").is_file()):
            continue
        seed = Forest.load(base)
        if seed.data.get("plan"):  # a seed planned (it is, before any c-BTM forest branches from it)
            domains = cshards[(c.fraction, c.k, c.balance)][0].domains
            plan = shared_plan(seed, domains, cbtm_lr(c, expert_lr, lrs))
            check_plan(Forest.load(here), plan, elsewhere="another --out")


def cbtm_seeds(cfg, forests, cshards, runs_dir: Path, expert_lr: float, lrs: dict | None = None) -> list:
    """Each c-BTM forest shares the seed of the dense run at its data fraction and budget; its experts
    train at the expert LR swept for its k, balance and fraction when the study sweeps."""
    from elmforest.forest import btm
    from elmforest.forest.manifest import Forest

    out = []
    for c in forests:
        sh, cdir = cshards[(c.fraction, c.k, c.balance)]
        base = Forest.load(runs_dir / cbtm_base(c.fraction, c.seed, cfg))
        lr = cbtm_lr(c, expert_lr, lrs)
        f = btm.share_seed(runs_dir / c.tag, base, sh.domains, expert_lr=lr, elsewhere="another --out")
        if not f.data.get("clusterer"):
            f.set_clusterer(cdir)
        out.append((f.root, sh))
    return out


def cbtm_points(cfg, forests, data) -> list[tuple]:
    """(point, forest, routing) of every c-BTM forest: scored with top-2 routing by cluster distance."""
    return [
        (
            Point("cbtm", c.fraction, c.seed, tuple(data.names), cfg.seed_share, True, False, c.fraction),
            c,
            {"mode": "cluster", "k": min(2, c.k), "router_context": "window"},  # recorded in each row
        )
        for c in forests
    ]
