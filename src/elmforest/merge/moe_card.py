"""What a merged model says of itself: its model card (README.md: how it was merged, what trained it
since, which experts it holds) and the fingerprint of its weight files, by which a rerun knows an
export (a copy included) from another merge."""

from __future__ import annotations

from pathlib import Path

from elmforest.merge.io import weight_files
from elmforest.utils.io import file_digest, read_json, write_json_atomic


def _frozen(record: dict) -> str:
    """The experts a training held frozen (`--set train.frozen_experts=[...]`), said in the card."""
    frozen = record.get("frozen_experts") or []
    return f" (experts {', '.join(map(str, frozen))} held frozen)" if frozen else ""


def model_card(meta: dict) -> str:
    shared = (
        "the **average of the experts'** (BTX: Sukhbaatar et al. 2024)"
        if meta["shared"] == "average"
        else "the **seed's** (FlexOlmo's frozen anchor: Shi, Bhagia et al. 2025)"
    )
    router = {
        "domain-embeddings": "each expert's normalised mean hidden state entering each layer's MLP, computed by "
        "the expert itself on a sample of its own training data (FlexOlmo's domain embeddings)",
        "hidden-states": "the normalised mean hidden state entering each layer's MLP, computed by one common "
        "dense model on a sample of each expert's training data (mergekit-moe's hidden-state gates)",
        "random": "random N(0, 0.02²) rows (no routing signal; train the router before use)",
        "owner-rows": "the public row of the pair every owner started from, and each owner's row as its owner "
        "trained it (FlexOlmo; `forest expert --branch flexolmo` starts both from domain embeddings, "
        "`merge flexolmo-pair` from zeros)",
    }[meta["spec"]["router"]]
    if meta["spec"]["center"] and meta["spec"]["router"] != "random":
        router += ", centred over the experts before normalising"
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [{meta.get('moe_model_type', 'mixtral')}, moe, elmforest, branch-train-mix]",
        "---",
        "",
        f"# Mixture of {len(meta['experts'])} experts merged from an ELMforest",
        "",
        f"Made by `elmforest merge moe` from `{meta['forest']}`. Load with "
        "`AutoModelForCausalLM.from_pretrained(DIR)`; top-"
        f"{meta['top_k']} routing per token.",
        "",
        "- Each expert's feed-forward block (gate/up/down projections) is expert *i* of every MoE layer.",
        f"- Shared parameters (embeddings, attention, norms, LM head) are {shared}.",
        f"- Router rows: {router}.",
    ]
    if meta.get("router_training"):
        rt = meta["router_training"]
        lines.append(
            f"- Router trained afterwards for {rt['steps']} steps of {rt.get('batch_size', '?')} sequences on "
            f"{rt['data']} (everything else frozen)."
        )
    if meta.get("finetuning"):
        runs, ft = [], meta["finetuning"]
        while ft:  # the earliest fine-tuning first
            runs.insert(0, ft)
            ft = ft.get("previous")
        for i, ft in enumerate(runs):
            lines.append(
                f"- Fine-tuned {'afterwards' if i == 0 else 'again'} (BTX) for {ft['steps']} steps of "
                f"{ft.get('batch_size', '?')} sequences on {ft['data']}: {ft.get('trainable') or 'every parameter'} "
                f"trained{_frozen(ft)}, load-balancing loss x {ft.get('router_aux_loss', 0):g}, router z-loss x "
                f"{ft.get('router_z_loss', 0):g}."
            )
    if meta["excluded"] or meta["opted_out"]:
        lines.append(
            f"- Left out: {', '.join(dict.fromkeys(meta['excluded'] + meta['opted_out']))} (opted out or excluded)."
        )
    if meta["near_parallel_router_rows"]:
        lines.append(
            f"- Warning: {len(meta['near_parallel_router_rows'])} expert pair(s) have nearly parallel router rows."
        )
    lines += ["", "| expert | name | domains | training tokens |", "| ---: | --- | --- | ---: |"]
    for e in meta["experts"]:
        lines.append(f"| {e['index']} | {e['name']} | {', '.join(e['domains'])} | {e['tokens'] or '?'} |")
    return "\n".join(lines) + "\n"


def weight_digests(moe_dir: Path) -> dict:
    """{file name: {"sha256", "bytes"}} of an MoE's weight files, recorded in its card as it is written."""
    return {
        f.name: {"sha256": file_digest(f)["sha256"], "bytes": f.stat().st_size} for f in weight_files(moe_dir)
    }


def record_weight_files(moe_dir: Path) -> None:
    """The card in `moe_dir` with its weight files' checksums (`weight_files`), once they are all
    written (the writer's last shard is written and named on commit)."""
    card = Path(moe_dir) / "elmforest_moe.json"
    write_json_atomic(card, {**read_json(card), "weight_files": weight_digests(moe_dir)})


def export_fingerprint(moe_dir: Path) -> str:
    """Identifies one export by content: its card, which records its weight files' checksums (written
    with them), so a copy (`cp -r`, new times) is the same export and another merge is not, with no
    gigabytes hashed again on every rerun. The sizes are checked against the card; a card from before
    the checksums were recorded: the files' names, sizes and modification times."""
    import hashlib
    import json

    card = (moe_dir / "elmforest_moe.json").read_bytes()
    h = hashlib.sha256(card)
    files = sorted(moe_dir.glob("*.safetensors"))  # by stat alone: nothing read on a rerun
    recorded = json.loads(card).get("weight_files") or {}
    if recorded and {f.name: f.stat().st_size for f in files} == {n: w["bytes"] for n, w in recorded.items()}:
        return h.hexdigest()[:12]
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]
