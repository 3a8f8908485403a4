"""X-ELM's second round: a language added to a trained forest, and the dense LM's way to add it.

Why a module of its own: the second round is an experiment of its own (X-ELM's incremental step,
with its own baseline, the dense LM continued) run on whatever the first round trained, and its
settings are tuned apart (bench/xelm_lr_sweep.py picks DENSE_CONTINUE_LR); the first round and the
comparison stay in :mod:`elmforest.xelm.quickstart`, which calls it.
"""

from __future__ import annotations

from pathlib import Path

from elmforest.config import RunConfig
from elmforest.data.shards import Shards
from elmforest.forest import btm
from elmforest.forest.manifest import Forest

# The dense LM continued with the added language: `python bench/xelm_lr_sweep.py --out OUT --continue-lrs
# 5e-4,1e-3,2e-3,4e-3,8e-3`, chosen by the mean valid BPB over all 13 languages (docs/xelm.md): higher
# LRs learn the new language faster but cost the others more.
DENSE_CONTINUE_LR = 1e-3


def add_language(
    out: Path,
    forest: Forest,
    fk: Forest,
    k: int,
    groups: list[str],
    shards: Shards,
    new: str,
    plan,
    progress,
    log,
):
    """X-ELM's second round on forest `fk`: the new language's expert branched from the nearest expert
    (by URIEL syntax distance, and by the forest's posterior when that picks another), and from the seed;
    the dense LM continued on every language (the new one included) for the same extra compute."""
    from elmforest.forest.nearest import nearest_expert

    picks = {}
    for by in ("typology", "posterior"):  # among the first round's experts, also on a rerun
        src, why = nearest_expert(fk, shards, new, by, among=groups)
        picks[by] = {"expert": src, **why}
    log(
        f"[7/8] adding {new} to the k={k} forest: nearest expert by syntax distance {picks['typology']['expert']}, "
        f"by posterior {picks['posterior']['expert']}; and from the seed; dense continued for the same compute"
    )
    names = {"nearest": f"{new}-nearest", "seed": f"{new}-seed"}
    kw = {"candidates": groups, "progress": progress}  # the lineage records the measure and scores
    btm.train_expert(fk, shards, new, names["nearest"], "nearest:typology", **kw)
    if picks["posterior"]["expert"] != picks["typology"]["expert"]:
        names["posterior"] = f"{new}-posterior"
        btm.train_expert(fk, shards, new, names["posterior"], "nearest:posterior", **kw)
    steps = plan.total_steps - plan.seed_steps
    btm.train_expert(
        fk, shards, new, names["seed"], "seed", overrides=fresh_from_seed(fk, steps), progress=progress
    )
    batch = plan.batch_size // k
    dense_cont = continue_dense(
        out / "dense-continued", forest, shards, new, steps, batch, progress, DENSE_CONTINUE_LR
    )
    return {"k": k, "groups": groups, "experts": names, "picks": picks, "dense_continued": dense_cont}


def fresh_from_seed(forest: Forest, steps: int) -> list[str]:
    """The seed's weights with a schedule of the expert's own, as the nearest expert's branch starts
    one: the two differ in where they start only. Branched the BTM way, the seed's expert continued the
    seed's run (its optimizer state, its LR already half decayed) while the nearest expert's warmed up
    to the full peak LR: a schedule difference X-ELM's comparison would have credited to the choice of
    expert. X-ELM branches both from finished models."""
    return [
        "train.init_checkpoint=null",
        f"model.init_from={forest.seed_dir.resolve()}",
        f"train.steps={steps}",
    ]


def continue_dense(
    run_dir: Path,
    forest: Forest,
    shards: Shards,
    new: str,
    steps: int,
    batch: int,
    progress,
    lr: float | None = None,
):
    """The dense LM's way to add a language: continue it on every language (the new one included, mixed
    equally) with a fresh schedule peaking at `lr` (default: the dense run's), for as many steps and
    sequences as the new expert."""
    from elmforest.train.trainer import train

    cfg = RunConfig.from_dict(forest.data["seed"]["config"])
    cfg.model.init_from = str((forest.root / "runs" / "dense" / "model").resolve())
    cfg.train.init_checkpoint, cfg.train.stop_at = None, None
    cfg.train.steps, cfg.train.batch_size = steps, batch
    cfg.data.domains = [*cfg.data.domains, new]
    cfg.data.shards = str(Path(shards.root).resolve())
    if lr is not None:
        cfg.optim.lr = lr
    summary = train(cfg, run_dir, progress=progress, label="dense+" + new)
    return {
        "model": str((run_dir / "model").resolve()),
        "tokens": summary["tokens"],
        "flops": summary["flops"],
    }
