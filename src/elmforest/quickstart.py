"""The main job: Branch-Train-Merge on the demo corpus, compared with a compute-matched dense LM.

demo corpus -> tokenizer -> shards -> seed (first half of the dense run) -> one expert per domain
(each alone, continuing the seed) -> dense baseline (the same run, continued) -> bits per byte of
dense, seed, ensembles, top-2, averages on every domain's test split -> table, results.json, plot.

Every stage is skipped when its output exists, so re-running after a crash continues where it
stopped (training itself resumes from its last checkpoint).
"""

from __future__ import annotations

import time
from pathlib import Path

from elmforest.config import apply_overrides
from elmforest.data.shards import Shards, build_shards
from elmforest.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe_on
from elmforest.eval.bpb import evaluate_shards
from elmforest.eval.report import plot_results, print_table
from elmforest.forest import btm
from elmforest.forest.evaluate import evaluate_forest_shards, make_pool
from elmforest.forest.manifest import Forest
from elmforest.model.build import load_model
from elmforest.model.presets import get_preset, preset_run_config
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
    eval_tokens: int = 40_000,
    prior_batches: int = 4,
    clusters: int = 8,
    moe: bool = True,
    moe_router_steps: int = 0,
) -> dict:
    """Run the pipeline into `out`; `corpus` (any JSONL/Parquet/txt data with domains) replaces the demo.

    split="random" adds the BTM ablation: experts trained on random splits of the same data;
    split="clusters" adds c-BTM: `clusters` discovered clusters, one expert each, routed by distance.
    moe merges the experts into one Mixtral MoE (BTX); moe_router_steps > 0 also trains its router.
    """
    if split not in ("domains", "random", "clusters"):
        raise ValueError(f"split must be 'domains', 'random' or 'clusters', got {split!r}")
    out = Path(out)
    p = get_preset(preset)
    t0 = time.perf_counter()
    log = print

    if corpus is None:
        corpus = out / "corpus"
        if not (corpus / "manifest.json").exists():
            from elmforest.data.demo import build_demo_corpus

            log(f"[1/7] building the demo corpus -> {corpus}")
            build_demo_corpus(corpus, domains=domains, progress=progress)
        for name, why in read_json(corpus / "manifest.json").get("skipped", {}).items():
            log(f"      skipped domain {name}: {why}")
    corpus = Path(corpus)

    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        log(f"[2/7] training a {p.vocab_size}-token byte-level BPE on the training split")
        tok, _ = train_bpe_on(corpus, p.vocab_size, bytes_per_domain=1_000_000)
        save_tokenizer(tok, tok_dir)

    shards_dir = out / "shards"
    if not Shards.is_shards_dir(shards_dir):
        log(f"[3/7] tokenizing into shards -> {shards_dir}")
        rep = build_shards(corpus, load_tokenizer(tok_dir), shards_dir, progress=progress)
        log(f"      {rep.tokens:,} tokens from {rep.text_bytes / 1e6:.1f} MB ({rep.mb_per_s:.2f} MB/s)")
    shards = Shards(shards_dir)
    names = domains or [d for d in shards.domains if shards.has(d, "train")]

    base = preset_run_config(preset, str(shards_dir.resolve()))
    base.data.domains = names
    base = apply_overrides(base, list(overrides))
    plan, base = btm.plan_for(base, len(names), seed_share)
    forest = Forest.init(out / "forest", exist_ok=True)
    log(
        f"[4/7] seed: the first {plan.seed_steps} of {plan.total_steps} dense steps "
        f"({plan.batch_size} x {base.train.seq_len} tokens) on {len(names)} domains mixed"
    )
    btm.train_seed(forest, shards, base, plan, progress=progress)
    log(
        f"[5/7] {len(names)} experts, each alone on its domain: {plan.total_steps - plan.seed_steps} steps of "
        f"{plan.expert_batch_size} x {base.train.seq_len} tokens, continuing the seed"
    )
    for d in names:
        if d in forest.removed:
            log(f"      {d}: opted out of this forest (forest remove); not retrained")
            continue
        btm.train_expert(forest, shards, d, progress=progress)
    log("[6/7] dense baseline: the seed's run continued to the full budget")
    dense = btm.train_dense(forest, shards, base, plan, progress=progress)

    random_forest = cforest = None
    if split == "random":
        random_forest = _random_split_forest(out, corpus, forest, len(names), progress, log)
    if split == "clusters":
        cforest = cluster_forest(out, corpus, forest, clusters, progress, log)

    log(f"[7/7] evaluating on each domain's test split (first {eval_tokens:,} tokens of whole documents)")
    common = {
        "split": "test",
        "domains": names,
        "seq_len": base.train.seq_len,
        "batch_size": 16,
        "max_tokens": eval_tokens,
    }
    methods: dict[str, dict] = {}
    methods["dense"] = evaluate_shards(
        load_model(forest.root / "runs" / "dense" / "model"), shards, progress=False, **common
    )
    methods["seed"] = evaluate_shards(load_model(forest.seed_dir), shards, progress=False, **common)
    pool = make_pool(forest, batch_size=16)  # shared: each expert runs once over each domain
    fe = {"prior_batches": prior_batches, "pool": pool, **common}
    methods["ensemble"] = evaluate_forest_shards(forest, shards, mode="ensemble", prior="cached", **fe)
    methods["ensemble_fixed"] = evaluate_forest_shards(
        forest, shards, mode="ensemble", prior="cached", weighting="fixed", **fe
    )
    methods["top2"] = evaluate_forest_shards(forest, shards, mode="topk", k=2, prior="cached", **fe)
    methods["average"] = evaluate_forest_shards(forest, shards, mode="average", prior="cached", **fe)
    methods["average_uniform"] = evaluate_forest_shards(forest, shards, mode="average", prior="uniform", **fe)
    if random_forest is not None:
        rpool = make_pool(random_forest, batch_size=16)
        methods["random_ensemble"] = evaluate_forest_shards(
            random_forest, shards, mode="ensemble", prior="cached", **{**fe, "pool": rpool}
        )
    if cforest is not None:
        cpool = make_pool(cforest, batch_size=16)
        for kk in sorted({1, min(2, clusters)}):
            methods[f"cbtm_top{kk}"] = evaluate_forest_shards(
                cforest, shards, mode="cluster", k=kk, **{**fe, "pool": cpool}
            )
    if moe:
        methods.update(_moe_rows(out, forest, shards, moe_router_steps, common, progress, log))

    compute = {
        "dense_flops": dense["flops"],
        "forest_flops": forest.total_flops(),
        "forest_over_dense": forest.total_flops() / dense["flops"],
    }
    results = {
        "methods": methods,
        "compute": compute,
        "findings": findings(methods),
        "plan": {**plan.__dict__, "seed_steps": plan.seed_steps, "expert_batch_size": plan.expert_batch_size},
        "preset": preset,
    }
    write_json_atomic(out / "results.json", results)
    plot_results(methods, out / "results.png")
    print_table(methods)
    log(
        f"compute: dense {compute['dense_flops']:.3e} FLOPs, forest (seed + experts) {compute['forest_flops']:.3e} "
        f"FLOPs (ratio {compute['forest_over_dense']:.4f})"
    )
    for line in results["findings"]:
        log(f"  - {line}")
    log(
        f"total {time.perf_counter() - t0:.0f}s; {out / 'results.json'}, {out / 'results.png'}; forest in {forest.root}"
    )
    return results


def _moe_rows(
    out: Path, forest: Forest, shards: Shards, router_steps: int, common: dict, progress, log
) -> dict:
    """BTX: the experts' MLPs as the experts of one Mixtral MoE, shared weights averaged, router rows
    from each expert's domain embeddings (no training); optionally the router trained alone."""
    from elmforest.merge.moe import MoeSpec, export_fingerprint, export_moe, train_router

    moe_dir, rows = out / "moe", {}
    meta = moe_dir / "elmforest_moe.json"
    if not meta.is_file() or [e["name"] for e in read_json(meta)["experts"]] != forest.names:
        log(f"      merging {len(forest.names)} experts into one Mixtral MoE (top-2) -> {moe_dir}")
        export_moe(forest, moe_dir, MoeSpec())
    rows["moe"] = evaluate_shards(load_model(moe_dir), shards, progress=False, **common)
    if router_steps:
        rt = out / "moe-router-trained"
        done = rt / "elmforest_moe.json"
        rt_meta = read_json(done).get("router_training", {}) if done.is_file() else {}
        if rt_meta.get("steps") != router_steps or rt_meta.get("from_fingerprint") != export_fingerprint(
            moe_dir
        ):
            log(f"      training the MoE's router alone for {router_steps} steps -> {rt}")
            train_router(moe_dir, shards.root, router_steps, out=rt, progress=progress)
        rows["moe_router_trained"] = evaluate_shards(load_model(rt), shards, progress=False, **common)
    return rows


def forest_sharing_seed(path: Path, forest: Forest, n_experts: int) -> Forest:
    """A new forest grown from the same seed (copied whole, recorded in one manifest write), with the
    budget split between `n_experts` experts (each gets batch / n_experts, so compute stays matched)."""
    other = Forest.init(path, exist_ok=True)
    if not btm.seed_ready(other):
        plan = btm.Plan(**{**forest.data["plan"], "n_experts": n_experts})
        btm.copy_dir_atomic(forest.root / "seed_state", other.root / "seed_state")
        other.set_seed(
            forest.seed_dir,
            tokens=forest.data["seed"]["tokens"],
            flops=forest.data["seed"]["flops"],
            source="shared with " + str(forest.root),
            extra={"plan": plan.__dict__},
            seed_fields={"config": forest.data["seed"]["config"]},
        )
    return other


def _random_split_forest(out: Path, corpus: Path, forest: Forest, k: int, progress: bool, log) -> Forest:
    """BTM's ablation: the same seed, experts on k random groups of the same documents."""
    rshards_dir = out / "shards-random"
    if not Shards.is_shards_dir(rshards_dir):
        build_shards(
            corpus, load_tokenizer(out / "tokenizer"), rshards_dir, random_domains=k, progress=progress
        )
    rshards = Shards(rshards_dir)
    rforest = forest_sharing_seed(out / "forest-random", forest, len(rshards.domains))
    log(f"      ablation: {k} experts on random splits of the data -> {rforest.root}")
    for d in rshards.domains:
        btm.train_expert(rforest, rshards, d, progress=progress)
    return rforest


def cluster_forest(
    out: Path, corpus: Path, forest: Forest, k: int, progress: bool, log, sample_docs: int = 20_000
) -> Forest:
    """c-BTM: discover k clusters on the training split, one expert per cluster from the same seed."""
    from elmforest.cluster.assign import assign_corpus, fit_clusterer
    from elmforest.cluster.clusterer import Clusterer

    cdir = out / f"clusterer-{k}"
    if not (cdir / "clusterer.json").is_file():
        log(f"      fitting {k} balanced clusters (tf-idf -> SVD -> balanced k-means) -> {cdir}")
        fit_clusterer(corpus, k, cdir, sample_docs=sample_docs, split="train")
    assigned = out / f"clusters-{k}"
    if not (assigned / "report.json").is_file():
        rep = assign_corpus(cdir, corpus, assigned, progress=progress)
        log(
            f"      cluster sizes {rep['sizes']}, NMI with the true domains {rep.get('nmi', float('nan')):.3f}"
        )
    cshards_dir = out / f"shards-clusters-{k}"
    if not Shards.is_shards_dir(cshards_dir):
        build_shards(assigned, load_tokenizer(out / "tokenizer"), cshards_dir, progress=progress)
    cshards = Shards(cshards_dir)
    cforest = forest_sharing_seed(out / f"forest-clusters-{k}", forest, len(cshards.domains))
    if not cforest.data.get("clusterer"):
        cforest.set_clusterer(cdir)
    Clusterer.load(cforest.root / "clusterer")
    log(f"      c-BTM: {len(cshards.domains)} cluster experts -> {cforest.root}")
    for d in cshards.domains:
        btm.train_expert(cforest, cshards, d, progress=progress)
    return cforest


def findings(methods: dict) -> list[str]:
    """The paper's three claims, checked on this run and stated plainly either way."""
    out = []
    m = {k: v["mean_bpb"] for k, v in methods.items()}

    def cmp(a, b, claim):
        verdict = "holds" if m[a] < m[b] else "does NOT hold here"
        out.append(
            f"{claim}: {a} {m[a]:.4f} vs {b} {m[b]:.4f} mean BPB (ratio {m[a] / m[b]:.3f}) -> {verdict}"
        )

    cmp("ensemble", "dense", "the ensemble beats the compute-matched dense LM in-domain")
    if "random_ensemble" in m:
        verdict = "holds" if m["random_ensemble"] >= m["dense"] else "does NOT hold here"
        out.append(
            f"random-split experts do not beat dense: random_ensemble {m['random_ensemble']:.4f} vs dense "
            f"{m['dense']:.4f} (ratio {m['random_ensemble'] / m['dense']:.3f}) -> {verdict}"
        )
    cmp("average", "average_uniform", "posterior-weighted averaging beats uniform averaging")
    if "moe" in m:
        best = min((k for k in ("moe", "moe_router_trained") if k in m), key=m.get)
        out.append(
            f"one merged MoE (top-2 per token, no joint training): {best} {m[best]:.4f} vs ensemble "
            f"{m['ensemble']:.4f}, average {m['average']:.4f}, seed {m['seed']:.4f} mean BPB"
            + (
                " -> worse than the seed: experts trained on all their parameters drift apart, so their MLPs no "
                "longer fit the merged attention; train experts MLP-only (--set train.trainable='\\.mlp\\.', "
                "FlexOlmo) to merge them (docs/moe.md)"
                if m[best] >= m["seed"]
                else ""
            )
        )
    return out
