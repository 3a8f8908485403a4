"""The main job: Branch-Train-Merge on the demo corpus, compared with a compute-matched dense LM.

demo corpus (8 training domains + 4 evaluation-only ones) -> tokenizer -> shards -> seed (the first
half of a domain-balanced dense run) -> one expert per domain (each alone, continuing the seed, at the
experts' own swept LR) -> dense baseline (the same run, continued) -> bits per byte of every method on
the same bytes of each domain's test split and of the out-of-domain sets -> table, results.json, plot,
report.html (one self-contained page: clients/report.py).

The protocol is the one a reviewer of the BTM papers would ask for: balanced mixtures, each arm at its
own best LR (the preset's, from a recorded `elmforest sweep`), priors from valid data only, the
posterior restarted at each document, out-of-domain rows, and each arm's training FLOPs counted by
what ran, with any arm that is not compute-matched flagged.

Every stage is skipped when its output exists, so re-running after a crash continues where it
stopped (training itself resumes from its last checkpoint).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from elmforest.clients.report import write_run_report
from elmforest.compare import (
    DENSE_TUNED_RUN,
    arm_flops,
    evaluate_methods,
    findings,
    inference_ratios,
    method_flops,
    priors_table,
)
from elmforest.config import PRIOR_BATCHES, UNKEPT, apply_overrides
from elmforest.data.shards import Shards
from elmforest.eval.report import FLOPS_TOLERANCE, plot_results, print_table
from elmforest.forest import btm
from elmforest.forest.manifest import Forest
from elmforest.launch.executor import LocalExecutor, local_workers
from elmforest.launch.forest import train_forest
from elmforest.launch.ood_sets import OOD_SPLIT
from elmforest.launch.prepare import check_quickstart_overrides, prepare_data
from elmforest.model.presets import get_preset, preset_run_config
from elmforest.quickstart_arms import _moe_models, _random_split_forest, cluster_forest, dense_tuned
from elmforest.quickstart_lines import precision_line, print_ledger, print_priors
from elmforest.utils.errors import UserError
from elmforest.utils.io import read_json, write_json_atomic


def quickstart(
    out: str | Path = "quickstart",
    preset: str = "cpu-small",
    domains: list[str] | None = None,
    overrides: list[str] | tuple = (),
    progress: bool = True,
    corpus: str | Path | None = None,
    split: str = "domains",
    seed_share: float = 0.5,
    eval_bytes: int = 64_000,
    prior_batches: int = PRIOR_BATCHES,
    clusters: int = 8,
    moe: bool = True,
    moe_router_steps: int = 0,
    moe_finetune_steps: int = 64,
    ood: list[str | Path] | None = None,
    expert_lr: float | None = None,
    workers: int | None = None,
    dense_continue_lr: float | None = None,
) -> dict:
    """Run the pipeline into `out`; `corpus` (any JSONL/Parquet/txt data with domains) replaces the demo.

    split="random" adds the BTM ablation: experts trained on random splits of the same data;
    split="clusters" adds c-BTM: `clusters` discovered clusters, one expert each, routed by distance.
    moe merges the experts into one Mixtral MoE (BTX); moe_router_steps > 0 also trains its router;
    moe_finetune_steps > 0 also fine-tunes the whole MoE on the mix (BTX, row moe_btx, at the preset's
    swept moe_finetune_lr; its FLOPs on top of the forest's, flagged as not compute-matched).
    `ood` adds out-of-domain sets (any data; each file or domain one set) to the demo's evaluation-only
    domains (used when the corpus is the demo). `expert_lr` overrides the preset's expert LR,
    `dense_continue_lr` its LR of the dense run's second half (row dense_tuned, trained where it
    differs from the whole run's; `sweep`'s continuation arm finds it).
    `workers` trains that many experts (and the dense run) at a time in worker processes (default:
    2 on a CPU with 2 or more cores, 1 on a GPU).
    """
    if split not in ("domains", "random", "clusters"):
        raise UserError(f"split must be 'domains', 'random' or 'clusters', got {split!r}")
    p = get_preset(preset)
    check_quickstart_overrides(overrides, preset)
    out = Path(out)
    t0 = time.perf_counter()
    log = print

    own_data = corpus is not None  # the user's corpus, not the demo one
    if domains is not None and (len(set(domains)) < 2 or len(set(domains)) < len(domains)):
        raise UserError(  # before the tokenizer is made of them, which a corrected rerun could not reuse
            f"--domains {','.join(domains)}: name at least 2 domains, each once (a forest is compared with "
            "a dense LM)"
        )
    # nothing trained from this --out's tokenizer yet: a rerun with other --domains (as a refusal
    # advised) makes it and the shards again
    unused = not (out / "forest" / "runs").exists()
    data = prepare_data(out, p.vocab_size, domains, corpus, ood, progress, log, unused=unused)
    corpus, shards, ood_shards, names = data.corpus, data.shards, data.ood_shards, data.names
    shards_dir = Path(shards.root)
    every = data.corpus_domains
    if split != "domains" and sorted(names) != sorted(every):
        raise UserError(
            f"--split {split} with --domains {','.join(names)}: the ablation forest is built from the whole "
            f"corpus ({', '.join(every)}), so it would train on domains the main forest never saw; give a "
            "corpus with only these domains"
        )

    base = preset_run_config(preset, str(shards_dir.resolve()))
    base.data.domains = names
    base = apply_overrides(base, [UNKEPT, *overrides])  # finished runs keep no checkpoints, unless asked
    # before any training: scoring (or the first step) would fail after it
    _check_domains(shards, names, base.train.seq_len + 1, every=domains is None)
    clusters_batch = None
    if split == "clusters" and base.train.batch_size % (step := math.lcm(len(names), clusters)):
        # the c-BTM forest shares the seed's plan: its experts split the batch the domain experts split,
        # which must then divide by both (else it failed once everything else had trained)
        was = base.train.batch_size
        base.train.batch_size = max(step, round(was / step) * step)
        clusters_batch = (was, base.train.batch_size, step)
    plan, base = btm.plan_for(base, names, seed_share, expert_lr if expert_lr is not None else p.expert_lr)
    e_lr = plan.expert_lr if plan.expert_lr is not None else base.optim.lr
    c_lr, c_source = _continue_lr(p, preset, overrides, dense_continue_lr, e_lr)
    ft_lr = p.moe_finetune_lr if p.moe_finetune_lr is not None else base.optim.lr
    precision = precision_line(base.train.precision, base.train.device, eval_bytes)
    forest = Forest.init(out / "forest", exist_ok=True)
    log(f"      precision: {precision}")
    if clusters_batch:
        log(
            f"      --split clusters: dense batch {clusters_batch[0]} -> {clusters_batch[1]}, a multiple of "
            f"{len(names)} domains and {clusters} clusters ({clusters_batch[2]}): every expert of both forests "
            "gets an equal share"
        )
    log(
        f"      protocol: data.mixture={base.data.mixture} ("
        + ("every domain equally likely" if base.data.mixture == "uniform" else "domains sampled by size")
        + f") for the seed and dense runs; dense LR {base.optim.lr:g}, expert LR {e_lr:g}"
        + (f" (preset {preset}'s, from a recorded LR sweep)" if p.expert_lr and expert_lr is None else "")
        + f"; the dense run's second half at LR {c_lr:g} too ({c_source})"
    )
    swept = f"preset {preset}'s, swept on the demo corpus" + (" (not on this corpus)" if own_data else "")
    lr_sources = {  # results.json says which arm is at a swept LR (a tiny or cpu-medium run: none)
        "dense_lr_source": "given (--set optim.lr)"
        if any(o.split("=", 1)[0].strip() == "optim.lr" for o in overrides)
        else (swept if p.expert_lr else f"preset {preset}'s default: not swept"),
        "expert_lr_source": "given (--expert-lr)"
        if expert_lr is not None
        else (swept if p.expert_lr else "not swept: the dense LR"),
    }
    lr_given = (
        expert_lr is not None
        and dense_continue_lr is not None
        and any(o.split("=", 1)[0].strip() == "optim.lr" for o in overrides)
    )
    if own_data and not lr_given:  # each arm at its own best LR: on this data, not the demo's
        sets = "".join(f" --set {o}" for o in overrides if o.split("=", 1)[0].strip() != "optim.lr")
        log(
            f"      note: the preset's LRs were {'swept on the demo corpus' if p.expert_lr else 'not swept'}, "
            f"not on {corpus}; for each arm at its own best LR on it, run `elmforest sweep --shards "
            f"{shards_dir} --out SWEEP --preset {preset}{sets}` and pass what it finds (--set optim.lr=X "
            "--expert-lr Y --dense-continue-lr Z) to a quickstart in a new --out"
        )
    log(
        f"[4/8] seed: the first {plan.seed_steps} of {plan.total_steps} dense steps "
        f"({plan.batch_size} x {base.train.seq_len} tokens) on {len(names)} domains mixed"
    )
    btm.check_plan(forest, plan, elsewhere="another --out")  # before train_seed's, which names --forest
    _check_seed_settings(forest, shards, base, plan, out)
    btm.train_seed(forest, shards, base, plan, progress=progress)
    removed = [d for d in names if d in forest.removed]
    for d in removed:
        log(f"      {d}: opted out of this forest (forest remove); not retrained")
    workers, threads = local_workers(base.train.device, workers)
    log(
        f"[5/8] {len(names) - len(removed)} experts, each alone on its domain: "
        f"{plan.total_steps - plan.seed_steps} steps of {plan.expert_batch_size} x {base.train.seq_len} "
        f"tokens, continuing the seed"
    )
    log(
        "[6/8] dense baseline: the seed's run continued to the full budget"
        + (f" (experts and dense run {workers} at a time, {threads} thread(s) each)" if workers > 1 else "")
    )
    train_forest(
        forest,
        shards,
        base,
        plan,
        executor=LocalExecutor(workers),
        threads=threads,
        progress=progress,
        monitor_every=30.0,
    )

    others: dict[str, Forest] = {}
    if split == "random":
        rf = _random_split_forest(out, corpus, forest, len(names), progress, log)
        others["random_ensemble"] = rf
    if split == "clusters":
        cf = cluster_forest(out, corpus, forest, clusters, progress, log)
        for kk in sorted({1, min(2, clusters)}):
            others[f"cbtm_top{kk}"] = cf
    models, phases = (
        _moe_models(out, forest, shards, moe_router_steps, moe_finetune_steps, ft_lr, progress, log)
        if moe
        else ({}, {})
    )
    if c_lr != base.optim.lr:  # the dense arm's second half at its own LR too (the same FLOPs)
        models = {"dense_tuned": dense_tuned(forest, c_lr, progress, log), **models}

    common = {"split": "test", "domains": names, "seq_len": base.train.seq_len, "batch_size": 16}
    # scored where and how the precision line says (train.device / train.precision), not "auto"
    common |= {"max_bytes": eval_bytes, "device": base.train.device, "precision": base.train.precision}
    log(
        f"[7/8] evaluating on each domain's test split (the first whole documents within {eval_bytes:,} "
        f"bytes; cached priors from up to {prior_batches} valid batches)"
    )
    pools: dict = {}
    methods, ablations = evaluate_methods(forest, shards, common, prior_batches, pools, others, models)
    ood_methods = ood_ablations = None
    if ood_shards is not None:
        ood_names = [d for d in ood_shards.domains if ood_shards.has(d, "test")]
        log(
            f"[8/8] evaluating out of domain on {len(ood_names)} sets no model trained on: {', '.join(ood_names)}"
        )
        ood_common = {**common, "domains": ood_names}
        ood_methods, ood_ablations = evaluate_methods(
            forest, ood_shards, ood_common, prior_batches, pools, others, models
        )

    compute = compute_summary(forest, methods, others, phases)
    flops = compute["methods"]
    compute["inference"] = inference_ratios(
        methods, models, forest.root / "runs" / "dense" / "model", base.train.seq_len
    )
    results = {
        "methods": methods,
        "ood_methods": ood_methods,
        "protocol": {
            "mixture": base.data.mixture,
            "dense_lr": base.optim.lr,
            "expert_lr": e_lr,
            "dense_continue_lr": c_lr,
            "dense_continue_lr_source": c_source,
            **lr_sources,
            "preset": preset,
            "corpus": str(Path(corpus).resolve()) if own_data else "demo",
            "precision": precision,
            "split": "test",
            "eval_bytes": eval_bytes,
            "prior_split": "valid",
            "prior_batches": prior_batches,
            "prior_estimate": "mean of the posteriors of every valid window used",
            "reset": "document",
            "ood_split": {"valid": OOD_SPLIT.valid_frac, "test": OOD_SPLIT.test_frac, "by_file": True},
        },
        "priors": {
            "in_domain": priors_table(methods),
            "ood": priors_table(ood_methods) if ood_methods else None,
        },
        "ablations": {"in_domain": ablations, "ood": ood_ablations},
        "compute": compute,
        "findings": findings(methods, ood_methods, flops)
        + (
            ["no arm's LR was swept (the preset's defaults): no arm is at its own best LR; `elmforest sweep`"]
            if all("not swept" in v for v in lr_sources.values())
            else []
        ),
        "plan": {**plan.__dict__, "seed_steps": plan.seed_steps, "expert_batch_size": plan.expert_batch_size},
        "preset": preset,
    }
    results["seconds"] = time.perf_counter() - t0
    write_json_atomic(out / "results.json", results)
    plot_results(methods, out / "results.png", ood=ood_methods)
    serve = compute["inference"]
    print_table(
        methods, "in-domain bits per byte (test splits; lower is better)", flops=flops, inference=serve
    )
    if ood_methods:
        print_table(
            ood_methods,
            "out-of-domain bits per byte (test halves; lower is better)",
            flops=flops,
            inference=serve,
        )
    print_ledger(compute, log)
    print_priors(results["priors"], ablations, ood_ablations, log)
    for line in results["findings"]:
        log(f"  - {line}")
    report = write_run_report(out)  # one offline HTML page: tables, plots, lineage, curves, ledger
    log(
        f"total {time.perf_counter() - t0:.0f}s; {out / 'results.json'}, {out / 'results.png'}, {report}; "
        f"forest in {forest.root}"
    )
    return results


def compute_summary(forest: Forest, methods: dict, others: dict[str, Forest], phases: dict) -> dict:
    """results.json's "compute", apart so that tests build the report from what the quickstart writes.
    Only this run's rows: a dense_tuned run or a trained MoE an earlier run with other settings left in
    the folder is not this run's compute."""
    arms = arm_flops(forest, others, phases, tuned="dense_tuned" in methods)
    dense = forest.root / "runs" / "dense" / "summary.json"
    tokens = read_json(dense).get("tokens") if dense.is_file() else None
    ours = {str(Path(p["output"]).resolve()) for p in phases.values() if p.get("output")}
    return {
        "dense_flops": arms["dense"],
        "forest_flops": arms["forest"],
        "forest_over_dense": arms["forest"] / arms["dense"],
        "ledger": [
            *(
                r
                for r in forest.ledger()
                if r["phase"] in ("seed", "expert") or forest.ledger_places(r) & ours
            ),
            {"phase": "dense", "name": "dense", "flops": arms["dense"], "tokens": tokens},
            *_second_half(forest, arms),
        ],
        # each ablation forest's rows (random split, clusters; experts branched from the same seed) by
        # its folder, and the arms it is: their FLOPs itemised as the main forest's are
        "ablation_ledgers": {
            f.root.name: {"arms": sorted(n for n, g in others.items() if g is f), "ledger": f.ledger()}
            for f in {id(f): f for f in others.values()}.values()
        },
        "arms": arms,
        "methods": method_flops(methods, arms),
        "tolerance": FLOPS_TOLERANCE,
    }


def _second_half(forest: Forest, arms: dict) -> list[dict]:
    """The ledger row of the dense run's second half at its own LR (row dense_tuned): its own training
    only, the seed's counted once above."""
    if "dense_tuned" not in arms:
        return []
    s = read_json(forest.root / "runs" / DENSE_TUNED_RUN / "summary.json")
    return [
        {
            "phase": "dense",
            "name": "dense_tuned (second half)",
            "flops": s["flops"],
            "tokens": s.get("tokens"),
        }
    ]


def _continue_lr(p, preset, overrides, given, e_lr) -> tuple[float, str]:
    """The LR of the dense run's second half (row dense_tuned) and where it comes from. The preset's was
    swept from its dense run's seed, so it holds while the dense LR is the preset's (the experts' LR
    does not enter that sweep); unswept, it is the experts' LR, the second-phase LR the forest has."""
    if given is not None:
        return given, "given"
    lr_set = any(o.split("=", 1)[0].strip() == "optim.lr" for o in overrides)
    if p.dense_continue_lr is not None and not lr_set:
        return p.dense_continue_lr, f"preset {preset}'s, from a recorded LR sweep"
    return e_lr, "not swept: the experts' LR"


def _check_domains(shards: Shards, names: list[str], window: int, every: bool = True) -> None:
    """`every`: no --domains given, so a domain of the corpus with held-out documents only (a few
    documents, all hashed to valid or test) would be left out of every table without a word. `window`:
    the training tokens each domain needs (the trainer's own refusal names data.domains, not --domains)."""
    if every and (held := [d for d in shards.domains if d not in names and not shards.has(d, "train")]):
        raise UserError(
            f"{shards.root}: domain(s) {', '.join(held)} have no training documents (too few documents for "
            "the id-hash split: all of them are held out): no expert could train on them, and they would be "
            "left out of every table; leave them out (--domains) or give them more documents"
        )
    if len(names) < 2:
        raise UserError(
            f"{shards.root}: {len(names)} domain(s) with training documents ({', '.join(names)}); a forest "
            "needs at least 2 to compare with a dense LM (give each document a `domain`, or one file or "
            "folder per domain)"
        )
    if short := {d: n for d in names if (n := shards.info(d, "train")["tokens"]) < window}:
        raise UserError(
            f"{shards.root}: domain(s) with fewer training tokens than one window (train.seq_len + 1 = "
            f"{window}): "
            + ", ".join(f"{d} ({n} tokens)" for d, n in short.items())
            + "; give them more text, leave them out (--domains), or lower train.seq_len (--set)"
        )
    bare = shards.unscorable(names)
    if bare:
        raise UserError(
            f"{shards.root}: domain(s) {', '.join(bare)} have no valid or no test documents (too few "
            "documents for the id-hash split): their experts could not be scored nor a prior read for them; "
            "leave them out (--domains) or give them more documents"
        )


def _check_seed_settings(forest, shards, base, plan, out: Path) -> None:
    """A rerun into a finished `out` with another `--set` (the LR a sweep found, a seed) kept the seed,
    experts and dense run trained before and labelled their scores with the new settings: refused,
    naming what differs (operational settings may change)."""
    from elmforest.train.runcheck import settings_diff

    if not btm.seed_ready(forest):
        return
    want = btm.dense_config(base, plan, shards)
    want.train.stop_at = plan.seed_steps
    if diff := settings_diff(forest.data["seed"]["config"], want):
        raise UserError(
            f"{out} was run with other settings ({diff}); its seed, experts and dense run were trained with "
            "them, so their scores would be reported under the new ones: use another --out, or delete it"
        )
