"""The arms a comparison adds beside a forest and its dense baseline: BTM's random-split ablation and
c-BTM's cluster experts (forests grown from the same seed), and BTX's MoE merged from the experts,
its router trained alone or the whole MoE fine-tuned, their training in the forest's ledger.

Apart from quickstart.py, which runs the protocol and reports it, because X-ELM's quickstart
(xelm/quickstart.py) grows its c-BTM arm the same way. An arm already there is reused, so a rerun
continues.
"""

from __future__ import annotations

from pathlib import Path

from elmforest.data.shards import Shards
from elmforest.data.shards_build import build_shards
from elmforest.data.tokenizer import load_tokenizer
from elmforest.forest import btm
from elmforest.forest.manifest import Forest
from elmforest.utils.errors import UserError
from elmforest.utils.io import discard_dir, read_json


def _moe_models(
    out: Path, forest: Forest, shards: Shards, router_steps: int, ft_steps: int, ft_lr: float, progress, log
):
    """BTX: the experts' MLPs as the experts of one Mixtral MoE, shared weights averaged, router rows
    from each expert's domain embeddings (no training); optionally the router trained alone, and the
    whole MoE fine-tuned on the mix (BTX's last stage), their compute recorded in the forest's ledger.
    Each MoE's routing statistics land beside it. Returns (row -> model dir, row -> ledger phase)."""
    from elmforest.merge.moe import MoeSpec, export_moe
    from elmforest.merge.moe_card import export_fingerprint
    from elmforest.merge.moe_train import finetune_moe, train_router

    moe_dir, models, phases = out / "moe", {}, {}
    meta = moe_dir / "elmforest_moe.json"
    if not meta.is_file() or [e["name"] for e in read_json(meta)["experts"]] != forest.names:
        log(f"      merging {len(forest.names)} experts into one Mixtral MoE (top-2) -> {moe_dir}")
        export_moe(forest, moe_dir, MoeSpec())
    models["moe"] = moe_dir
    fp = export_fingerprint(moe_dir) if router_steps or ft_steps else None
    if router_steps:
        rt = out / "moe-router-trained"

        def run_router():
            log(f"      training the MoE's router alone for {router_steps} steps -> {rt}")
            train_router(moe_dir, shards.root, router_steps, out=rt, progress=progress)

        want = {"steps": router_steps, "from_fingerprint": fp}
        phases["moe_router_trained"] = _moe_phase(forest, rt, "router_training", want, run_router, log)
        models["moe_router_trained"] = rt
    if ft_steps:
        ft = out / "moe-btx"

        def run_btx():
            log(
                f"      BTX: fine-tuning the whole MoE on the mix for {ft_steps} steps at LR {ft_lr:g} -> {ft}"
            )
            finetune_moe(moe_dir, shards.root, ft_steps, out=ft, lr=ft_lr, progress=progress)

        want = {"steps": ft_steps, "lr": ft_lr, "from_fingerprint": fp}
        phases["moe_btx"] = _moe_phase(forest, ft, "finetuning", want, run_btx, log, phase="btx_finetuning")
        models["moe_btx"] = ft
    from elmforest.merge.routing import summary_line, write_routing

    for name, d in models.items():  # an export or router training replaces the directory: recomputed
        stats = read_json(d / "routing.json") if (d / "routing.json").is_file() else None
        stats = stats or write_routing(d, shards.root)
        log(f"      {name}: {summary_line(stats)} ({d / 'routing.png'})")
    return models, phases


def _moe_phase(
    forest: Forest, out_dir: Path, key: str, want: dict, run, log, phase: str | None = None
) -> dict:
    """A training stage of a merged MoE (router training, BTX fine-tuning), rerun unless the output's
    card records exactly `want` under `key`; its tokens and FLOPs enter the forest's ledger. One trained
    otherwise (other steps or LR, another export: a re-merge, a copied folder's new file times) is this
    quickstart's own output and out of date, so it is replaced, said, where `merge finetune` refuses."""
    card = out_dir / "elmforest_moe.json"
    meta = read_json(card).get(key, {}) if card.is_file() else {}
    if any(meta.get(k) != v for k, v in want.items()):
        if card.is_file() and meta:
            log(f"      {out_dir.name}: trained from another export or with other settings; trained again")
            discard_dir(out_dir)
        run()
        meta = read_json(card)[key]
    rec = {
        "phase": phase or key,
        "name": out_dir.name,
        "tokens": meta["tokens"],
        "flops": meta["flops"],
        "output": str(out_dir),
    }
    # the training wrote its row in the forest its card names; this quickstart's forest is the one
    # compared (a copied folder's card may still name the original's): recorded here too (replaced)
    forest.record_phase(rec)
    return rec


def _random_split_forest(out: Path, corpus: Path, forest: Forest, k: int, progress: bool, log) -> Forest:
    """BTM's ablation: the same seed, experts on k random groups of the same documents."""
    rshards_dir = out / "shards-random"
    if not Shards.is_shards_dir(rshards_dir):
        build_shards(
            corpus, load_tokenizer(out / "tokenizer"), rshards_dir, random_domains=k, progress=progress
        )
    rshards = Shards(rshards_dir)
    rforest = btm.share_seed(out / "forest-random", forest, rshards.domains)
    log(f"      ablation: {k} experts on random splits of the data -> {rforest.root}")
    for d in rshards.domains:
        btm.train_expert(rforest, rshards, d, progress=progress)
    return rforest


def cluster_forest(
    out: Path,
    corpus: Path,
    forest: Forest,
    k: int,
    progress: bool,
    log,
    sample_docs: int = 20_000,
    expert_lr: float | None = None,
) -> Forest:
    """c-BTM: discover k clusters on the training split, one expert per cluster from the same seed
    (at `expert_lr`, in its own forest directory, when given; else the seed forest's expert LR)."""
    from elmforest.cluster.assign import assign_corpus, fit_clusterer
    from elmforest.cluster.clusterer import Clusterer

    cdir = out / f"clusterer-{k}"
    if not (cdir / "clusterer.json").is_file():
        log(f"      fitting {k} balanced clusters (tf-idf -> SVD -> balanced k-means) -> {cdir}")
        fit_clusterer(corpus, k, cdir, sample_docs=sample_docs, split="train")
    assigned = out / f"clusters-{k}"
    if not (assigned / "report.meta.json").is_file():
        rep = assign_corpus(cdir, corpus, assigned, progress=progress)
        log(
            f"      cluster sizes {rep['sizes']}, NMI with the true domains {rep.get('nmi', float('nan')):.3f}"
        )
    cshards_dir = out / f"shards-clusters-{k}"
    if not Shards.is_shards_dir(cshards_dir):
        build_shards(assigned, load_tokenizer(out / "tokenizer"), cshards_dir, progress=progress)
    cshards = Shards(cshards_dir)
    if expert_lr == (forest.data.get("plan") or {}).get("expert_lr"):
        expert_lr = None  # the default forest already trains at this LR
    name = f"forest-clusters-{k}" + ("" if expert_lr is None else f"-lr-{expert_lr:g}")
    cforest = btm.share_seed(out / name, forest, cshards.domains, expert_lr=expert_lr)
    if not cforest.data.get("clusterer"):
        cforest.set_clusterer(cdir)
    Clusterer.load(cforest.root / "clusterer")
    log(f"      c-BTM: {len(cshards.domains)} cluster experts -> {cforest.root}")
    for d in cshards.domains:
        btm.train_expert(cforest, cshards, d, progress=progress)
    return cforest


def dense_tuned(forest: Forest, lr: float, progress: bool, log) -> Path:
    """The dense run's second half again at its own LR (row dense_tuned): the same seed state (weights,
    optimizer moments, step), data order, steps and batch, so the same FLOPs; only `optim.lr` differs.

    The experts' phase trains at an LR swept for it, while the dense run's second half kept the whole
    run's: one more tuned setting for the forest. An audit found the forest's in-domain advantage on
    the demo corpus came from that (docs/benchmarks.md, "The dense run's second half"); `sweep`'s
    continuation arm (launch/sweep_continue.py) tunes that half as this row trains it."""
    from elmforest.compare import DENSE_TUNED_RUN
    from elmforest.launch.jobs import continuation_config
    from elmforest.train.trainer import train

    run = forest.root / "runs" / DENSE_TUNED_RUN
    had = read_json(run / "run_config.json")["optim"]["lr"] if (run / "run_config.json").is_file() else lr
    if had != lr:  # this quickstart's own row, out of date
        from elmforest.train.runlock import unless_training

        with unless_training(run) as free:  # deleted under its lock: not under a trainer in another process
            if not free and run.is_dir():
                raise UserError(
                    f"{run} is training in another process (a second quickstart into this --out?)"
                )
            log(f"      {DENSE_TUNED_RUN}: trained at another LR ({had:g}); trained again")
            if run.is_dir():  # (gone since it was read: nothing to delete)
                discard_dir(run)
    if not (run / "summary.json").is_file():
        log(f"      the dense run's second half again at its own LR {lr:g} (row dense_tuned)")
    cfg = continuation_config(
        forest.root / "runs" / "dense" / "run_config.json", forest.root / "seed_state", lr
    )
    train(cfg, run, progress=progress, label="dense, second half at its own LR")
    return run / "model"
