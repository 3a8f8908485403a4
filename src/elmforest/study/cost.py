"""What a study costs before it runs: its training in units of D (one 1x dense run), tokens and FLOPs,
from the plan alone (`elmforest study CONFIG --dry-run`), and the hours that means on a GPU at a stated
utilisation.

The unit D keeps the count honest across arms: a forest point that shares its seed with the dense run
at its budget adds only its experts, (1 - seed share) x budget, and each dense run (of every axis) its
second half again at its own LR (dense_tuned), as much; a forest point without a dense run at
its budget (the seed-share axis) pays for its own seed; c-BTM at data fraction f costs f (its dense run,
k = 1) plus (1 - seed share) x f per forest; an LR sweep at a budget costs its grid's runs. FLOPs per
token are elmforest's FLOPs formula (train/flops.py) on the preset's model, built on the meta device.
"""

from __future__ import annotations

from pathlib import Path

from elmforest.config import apply_overrides
from elmforest.model.presets import get_preset, preset_run_config
from elmforest.study.config import StudyConfig, sweep_lrs
from elmforest.study.lrs import sweep_specs
from elmforest.study.run import check_budget_steps, plan_batch, plan_points
from elmforest.utils.errors import NotFound, UserError

# bf16 dense matmul peaks (FLOP/s) of common accelerators, for the hours estimate
GPU_PEAKS = {"H100 SXM": 989e12, "A100": 312e12}
MFU = 0.40  # a typical model-FLOPs utilisation of a well-tuned small-model training run


def training_units(cfg: StudyConfig, names: list[str], tuned: bool = True) -> dict[str, float]:
    """D units of training per part of the study; `tuned`: the dense runs' second half is trained again
    at its own LR (False where that LR is the dense run's: dense_tuned is the dense run itself)."""
    units = {"main": 0.0, "dense_tuned": 0.0, "domains": 0.0, "share": 0.0, "cbtm": 0.0, "lr sweeps": 0.0}
    for p in plan_points(cfg, names):
        experts = (1 - p.seed_share) * p.budget
        if p.axis == "cbtm":
            units["cbtm"] += p.budget  # its dense run (k = 1); at all the data it is the main 1x point
        elif p.dense:
            units[p.axis] += p.budget + (experts if p.forest else 0.0)
        else:  # a forest whose dense run is another point's (or none): its own seed, then its experts
            units[p.axis] += p.budget
        if p.dense and tuned:  # every dense run's second half again at its own LR
            units["dense_tuned"] += (1 - p.seed_share) * p.budget
    for f in set(cfg.cbtm_data) if cfg.cbtm_ks else ():
        units["cbtm"] += (
            (1 - cfg.seed_share) * f * len(set(cfg.cbtm_ks)) * len(cfg.cbtm_balance) * len(cfg.seeds)
        )
    units["lr sweeps"] = sum(s.units(cfg) for s in sweep_specs(cfg, names))  # what study/lrs.py sweeps
    units["total"] = sum(units.values())
    return units


def study_cost(cfg: StudyConfig, names: list[str]) -> dict:
    import torch

    from elmforest.model.build import build_model
    from elmforest.train.flops import flops_per_token

    base = apply_overrides(preset_run_config(cfg.preset), list(cfg.overrides))
    steps = cfg.steps_1x()
    plan_points(cfg, names)  # a domain count past the corpus's, said before the batch's advice (as the study)
    batch = plan_batch(cfg, base, names)  # what the runs use; refused here as in the study
    check_budget_steps(cfg, steps)
    with torch.device("meta"):
        model = build_model(base.model, get_preset(cfg.preset).vocab_size, 0)
    fpt = flops_per_token(model, base.train.seq_len)
    tokens_d = steps * batch * base.train.grad_accum * base.train.seq_len
    p = get_preset(cfg.preset)
    dense = cfg.dense_lr or base.optim.lr  # as study._learning_rates resolves them (a sweep file aside)
    cont = (
        cfg.dense_continue_lr
        or (p.dense_continue_lr if cfg.dense_lr is None else None)
        or cfg.expert_lr
        or p.expert_lr
        or dense
    )
    units = training_units(cfg, names, tuned=bool(cfg.lr_grid) or f"{cont:.3g}" != f"{dense:.3g}")
    flops = units["total"] * tokens_d * fpt
    return {
        "units_D": units,
        "steps_1x": steps,
        "tokens_per_D": tokens_d,
        "flops_per_token": fpt,
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_flops": flops,
        "gpu_hours": {gpu: flops / (peak * MFU) / 3600 for gpu, peak in GPU_PEAKS.items()},
        "mfu_assumed": MFU,
    }


def format_cost(cfg: StudyConfig, c: dict, n_domains: int) -> str:
    u = c["units_D"]
    parts = ", ".join(f"{k} {v:.1f}" for k, v in u.items() if k != "total" and v)
    hours = "; ".join(f"{g} {h:,.3g} GPU-hours" for g, h in c["gpu_hours"].items())
    return (
        f"study {cfg.preset} on {n_domains} domains: {u['total']:.1f} D of training ({parts}); "
        f"D = one 1x dense run = {c['steps_1x']:,} steps = {c['tokens_per_D']:,} tokens = "
        f"{c['tokens_per_D'] * c['flops_per_token']:.3g} FLOPs ({c['parameters']:,} parameters with the "
        f"preset's {get_preset(cfg.preset).vocab_size:,}-token vocabulary, "
        f"{c['flops_per_token']:,} FLOPs/token); {c['training_flops']:.3g} training FLOPs in all; "
        f"at {c['mfu_assumed']:.0%} of the bf16 peak: {hours} (scoring and clustering not included)"
    )


def domain_names(cfg: StudyConfig) -> list[str]:
    """The training domains the study would use: its `domains` (each checked to have training
    documents), the demo corpus's, or those of the corpus with training documents (read once), as
    data preparation keeps them."""
    if cfg.corpus is None:
        from elmforest.corpora.demo import DEMO_DOMAINS

        have = sorted(DEMO_DOMAINS)
    else:
        from elmforest.data.readers import iter_documents
        from elmforest.data.splits import SplitSpec

        spec = SplitSpec()
        try:
            have = sorted({d.domain for d in iter_documents(cfg.corpus) if spec.assign(d.id) == "train"})
        except (UserError, NotFound) as e:  # named as the config's field: the path alone did not say whose
            raise type(e)(f"corpus {e}") from None
    where = cfg.corpus or "the demo corpus"
    missing = [d for d in cfg.domains or () if d not in have]
    if missing:
        raise UserError(
            f"domains {missing}: not domains of {where} with training documents ({', '.join(have)})"
        )
    names = list(cfg.domains) if cfg.domains else have
    if len(names) < 2:
        raise UserError(
            f"{where}: {len(names)} domain(s) with training documents ({', '.join(names) or 'none'}); "
            "a forest needs >= 2 to compare with a dense LM"
        )
    return names


def dry_run(source, overrides=(), log=print) -> dict:
    """`elmforest study CONFIG --dry-run`: the config checked as the study checks it, and its cost
    printed; nothing trained."""
    from elmforest.study.config import load_study_config

    cfg = load_study_config(source, overrides)
    names = domain_names(cfg)
    for path in cfg.ood:
        if not Path(path).exists():
            raise UserError(f"ood {path}: no such file or folder")
    if cfg.ood:  # the study would refuse it after tokenizing the corpus
        from elmforest.launch.ood_sets import check_ood_names, scan_ood_sources

        check_ood_names(scan_ood_sources(None, [Path(p) for p in cfg.ood], names)[0], names)
    if cfg.sweep:
        sweep_lrs(cfg.sweep)
    c = study_cost(cfg, names)
    log(format_cost(cfg, c, len(names)))
    return c
