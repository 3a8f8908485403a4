"""Merge a forest into one sparse mixture-of-experts model in a Hugging Face MoE format (Mixtral for
Llama/Mistral experts; merge/moe_formats.py has the others and the architectures that cannot merge).

BTX (Sukhbaatar et al. 2024) / FlexOlmo (Shi, Bhagia et al. 2025): expert i's feed-forward block
becomes expert i of every MoE layer; everything else (embeddings, attention, norms, LM head) is
shared, either averaged over the experts (BTX) or taken from the seed (FlexOlmo's frozen anchor).
Router rows come from each expert's data (merge/router.py), so the model routes with no training.

The checkpoint uses the format's per-expert tensor names (for Mixtral `block_sparse_moe.experts.{e}.
w1/w2/w3`), the layout transformers' own `save_pretrained` writes and its loaders read (transformers 5
fuses them on load). It is written tensor by tensor into shards no larger than one expert, so peak
memory is about one expert plus one shard, whatever the number of experts.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

import torch

from elmforest.forest.manifest import Forest
from elmforest.forest.pool import check_intact
from elmforest.forest.trust import refuse_inside_forest
from elmforest.merge.average import warn_unrelated
from elmforest.merge.io import (
    TOKENIZER_FILES,
    LazyWeights,
    ShardedWriter,
    check_same_architecture,
    open_matching,
    weight_files,
)
from elmforest.merge.methods import linear
from elmforest.merge.moe_card import model_card, record_weight_files
from elmforest.merge.moe_formats import PROJ, MoeFormat, format_for
from elmforest.merge.router import (
    ROUTERS,
    expert_data,
    mean_mlp_inputs,
    normalise_rows,
    parallel_pairs,
    random_rows,
    sample_windows,
    warn_parallel,
)
from elmforest.model.build import load_model, resolve_model_dir
from elmforest.utils.device import resolve_device
from elmforest.utils.errors import AlreadyExists, UserError
from elmforest.utils.io import (
    read_json,
    restore_swapped,
    undone_on_failure,
    write_json_atomic,
    write_text_atomic,
)

MLP_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
SHARED = ("average", "seed")
SOURCE_MARKER = "elmforest_source.json"  # in a router-training run: the experts its weights hold


@dataclass
class MoeSpec:
    top_k: int = 2
    shared: str = "average"  # average (BTX) | seed (FlexOlmo)
    router: str = "domain-embeddings"
    center: bool = False  # subtract the mean row over experts before normalising
    sample_tokens: int = 16384  # per expert, for the router rows
    exclude: list[str] = field(default_factory=list)
    parallel_threshold: float = 0.99
    seed: int = 0

    def validate(self) -> None:
        if self.shared not in SHARED:
            raise UserError(f"--shared must be one of {SHARED}, got {self.shared!r}")
        if self.router not in ROUTERS:
            raise UserError(f"--router must be one of {ROUTERS}, got {self.router!r}")
        if self.top_k < 1:
            raise UserError(f"--top-k must be >= 1, got {self.top_k}")
        if self.sample_tokens < 1:
            raise UserError("--sample-tokens must be positive")


def mixtral_config(dense: dict, n_experts: int, top_k: int) -> dict:
    """The Mixtral config equivalent to a Llama/Mistral config with its MLP replaced by n experts."""
    fmt = format_for(dense)
    if fmt.model_type != "mixtral":
        raise UserError(f"{dense.get('model_type')!r} experts merge into {fmt.model_type}, not mixtral")
    return fmt.config(dense, n_experts, top_k)


def _router_rows(forest: Forest, names, dirs, spec: MoeSpec, data, device, cfg, base_dir) -> torch.Tensor:
    from elmforest.eval.bpb import default_seq_len

    L, H = cfg["num_hidden_layers"], cfg["hidden_size"]
    if spec.router == "random":
        return random_rows(L, len(names), H, spec.seed)
    seq_len = default_seq_len(dirs[0])
    tok_fp = forest.data["tokenizer"]
    means = torch.zeros(L, len(names), H)
    common = None
    if spec.router == "hidden-states":
        if base_dir is not None:
            common = load_model(base_dir).to(device).eval()
        else:  # the experts' uniform average as one dense model, filled in tensor by tensor
            from elmforest.merge.average import iter_average

            common = load_model(dirs[0])
            params = common.state_dict()
            with torch.no_grad():
                for name, t in iter_average(dirs):
                    params[name].copy_(t)
            common.to(device).eval()
    for i, (n, d) in enumerate(zip(names, dirs, strict=True)):
        shards, domains = expert_data(d, forest.expert(n)["domains"], data, tok_fp)
        samples = sample_windows(shards, domains, "train", seq_len, spec.sample_tokens)
        model = common if common is not None else load_model(d).to(device).eval()
        means[:, i] = mean_mlp_inputs(model, samples, shards.eos_id, seq_len, device=device)
        if common is None:
            del model
    return normalise_rows(means, spec.center)


def export_moe(
    forest: Forest | str | Path,
    out: str | Path,
    spec: MoeSpec | None = None,
    data: str | Path | None = None,
    device: str = "auto",
    max_shard_bytes: int | None = None,
    redo: tuple[str, ...] = (),
) -> Path:
    """Write the forest's experts as one MoE checkpoint at `out` (atomically); returns `out`. An `out`
    holding a trained MoE is refused unless its training is in `redo` ("router_training": the caller
    trains the router again), and the ledger forgets the training of the model written over."""
    spec = spec or MoeSpec()
    spec.validate()
    refuse_inside_forest(out)
    check_untrained(out, redo)
    forest = forest if isinstance(forest, Forest) else Forest.load(forest)
    unknown = sorted(set(spec.exclude) - set(forest.names))
    gone = [n for n in unknown if n in forest.removed]
    if gone:  # already out of every merge: excluding it again is what the user wants, said plainly
        print(f"note: --exclude {gone}: already opted out of {forest.root} (forest remove)", file=sys.stderr)
        unknown = [n for n in unknown if n not in gone]
    if unknown:
        raise UserError(f"--exclude: no expert named {unknown} in {forest.root}; have {forest.names}")
    names = [n for n in forest.names if n not in spec.exclude]
    if not names:
        raise UserError(f"{forest.root}: no experts left to merge")
    owners = [n for n in names if forest.expert(n).get("branch") == "flexolmo"]
    if owners:
        raise UserError(
            f"{forest.root}: expert(s) {owners} are FlexOlmo owners (2-expert MoEs); merge them with "
            "`elmforest merge flexolmo --forest`"
        )
    if spec.shared == "seed" and forest.seed_dir is None:
        raise UserError(f"{forest.root}: --shared seed needs a seed, and this forest has none")
    check_intact(forest, names)  # after the cheap checks: it may read every expert's bytes
    dirs = [resolve_model_dir(forest.expert_dir(n)) for n in names]
    dense = check_same_architecture(dirs, names)
    if spec.shared == "average":  # attention, embeddings and norms: every expert's averaged
        warn_unrelated(forest, names, "--shared average averages the attention and embeddings of")
    top_k = min(spec.top_k, len(names))
    if top_k < spec.top_k:  # said, not only seen in the last line's "top-N"
        print(
            f"note: --top-k {spec.top_k} > {len(names)} experts: every token uses all {top_k}",
            file=sys.stderr,
        )
    fmt = format_for(dense)
    cfg = fmt.config(dense, len(names), top_k)
    base_dir = None
    if spec.shared == "seed":
        base_dir = resolve_model_dir(forest.seed_dir)
        check_same_architecture([dirs[0], base_dir], [names[0], "seed"])

    dev = resolve_device(device)
    rows = _router_rows(forest, names, dirs, spec, data, dev, cfg, base_dir)
    pairs = parallel_pairs(rows, names, spec.parallel_threshold) if spec.router != "random" else []
    warn_parallel(pairs)

    one_expert = sum(f.stat().st_size for f in weight_files(dirs[0]))
    writer = ShardedWriter(
        out, max_shard_bytes or min(2 * 1024**3, max(one_expert, 1)), replaces="elmforest_moe.json"
    )
    # recorded before writing: opting an expert out finds every copy
    with forest.recording_output(out, "moe", names, "elmforest_moe.json"):
        with undone_on_failure(writer.tmp, writer.out):
            _write_tensors(writer, fmt, dirs, base_dir, rows, cfg)
            _write_side_files(writer, forest, names, dirs, dense, cfg, spec, top_k, pairs, base_dir)
            path = writer.commit(finish=record_weight_files)
    forest.drop_phases(path)
    forest.settle_output(path, names)
    return path


TRAINING = {"router_training": "router training", "finetuning": "BTX fine-tuning"}


def check_untrained(out: str | Path, redo: tuple[str, ...] = (), doing: str = "merging") -> None:
    """Refuse to write a fresh merge over a trained one: its training (and the ledger's record of it)
    would be lost without a word. Reruns that train again (`redo`) may."""
    restore_swapped(out)  # a trained one a kill left aside is still one to keep
    card = Path(out) / "elmforest_moe.json"
    if not card.is_file():
        return
    meta = read_json(card)
    lost = [
        f"{TRAINING[k]} ({meta[k].get('steps', '?')} steps)"
        for k in TRAINING
        if meta.get(k) and k not in redo
    ]
    if lost:
        raise AlreadyExists(
            f"{out} holds a trained MoE ({', '.join(lost)}); {doing} into it would discard that training: "
            "choose another --out, or delete it first"
        )


def _write_tensors(
    writer: ShardedWriter, fmt: MoeFormat, dirs: list[Path], base_dir, rows: torch.Tensor, cfg: dict
) -> None:
    with ExitStack() as stack:
        experts = open_matching(dirs, stack)
        base = LazyWeights(base_dir, stack) if base_dir is not None else None
        names = experts[0].keys()
        # experts in other precisions (forest add takes a bf16 one beside fp32 ones) are written in the
        # widest: in the first one's, transformers loaded the whole MoE in it (fp32 experts rounded to bf16)
        held = {w.get(names[0]).dtype for w in [*experts, *([base] if base is not None else [])]}
        dtype = next(iter(held)) if len(held) == 1 else torch.float32
        add = writer.add if len(held) == 1 else (lambda n, t: writer.add(n, t.to(dtype)))
        if len(held) > 1:
            kinds = ", ".join(sorted(str(d).removeprefix("torch.") for d in held))
            print(f"note: the experts hold {kinds} weights: the MoE is written in float32", file=sys.stderr)
        seen = set()
        for name in names:
            m = MLP_KEY.match(name)
            if m:
                layer, proj = int(m.group(1)), m.group(2)
                seen.add((layer, proj))
                for i, e in enumerate(experts):
                    add(fmt.expert_name(layer, i, proj), e.get(name))
                continue
            if ".mlp." in name:
                raise UserError(
                    f"tensor {name}: an MLP parameter {fmt.model_type} has no place for (a bias?)"
                )
            if base is not None:
                if name not in base:
                    raise UserError(f"{base_dir}: the seed lacks {name}")
                add(name, base.get(name))
            else:
                first, n = experts[0].get(name), len(experts)
                rest = (e.get(name).to(torch.float32) for e in experts[1:])
                mean = linear(chain([first.to(torch.float32)], rest), [1 / n] * n)
                add(name, mean if len(held) > 1 else mean.to(first.dtype))  # mixed: float32, unrounded
        L = cfg["num_hidden_layers"]
        missing = [(layer, p) for layer in range(L) for p in PROJ if (layer, p) not in seen]
        if missing:
            raise UserError(f"{dirs[0]}: no MLP weights for (layer, projection) {missing[:3]}")
        for layer in range(L):
            add(fmt.router_name(layer), rows[layer].to(dtype))
        for name, t in fmt.extra(cfg, dtype) if fmt.extra else ():
            add(name, t)


def _write_side_files(writer, forest, names, dirs, dense, cfg, spec, top_k, pairs, base_dir) -> None:
    from transformers import AutoConfig

    AutoConfig.for_model(**cfg).save_pretrained(str(writer.tmp))
    writer.copy_side_files(dirs[0], (*TOKENIZER_FILES, "generation_config.json", "elmforest_run.json"))
    experts = [
        {
            "index": i,
            "name": n,
            "domains": forest.expert(n)["domains"],
            "tokens": forest.expert(n).get("tokens"),
        }
        for i, n in enumerate(names)
    ]
    meta = {
        "forest": str(forest.root.resolve()),
        # where the forest sits from the MoE: a copy of both (cp -r, rsync) finds its own forest there,
        # not the original's (merge/moe_train.py `located`)
        "forest_relative": os.path.relpath(forest.root.resolve(), writer.out.resolve()),
        "experts": experts,
        "excluded": list(spec.exclude),
        "opted_out": forest.removed,
        "shared": spec.shared,
        "shared_from": str(Path(base_dir).resolve())
        if base_dir is not None
        else [str(Path(d).resolve()) for d in dirs],
        "spec": asdict(spec),
        "top_k": top_k,
        "near_parallel_router_rows": pairs,
        "dense_model_type": dense.get("model_type"),
        "moe_model_type": cfg["model_type"],
    }
    write_json_atomic(writer.tmp / "elmforest_moe.json", meta)
    write_text_atomic(writer.tmp / "README.md", model_card(meta))
