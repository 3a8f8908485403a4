"""FlexOlmo's starting point for one data owner: the seed as a 2-expert MoE whose two experts are both the
seed's FFN (expert 0 the public one, kept frozen while the owner trains expert 1; train/frozen_experts.py).

With two identical experts the MoE computes exactly the seed, whatever the router rows (the routing
weights sum to 1), so an owner starts from the seed's own function and only what it trains moves away
from it. The pair is written in the format of the seed's architecture (merge/moe_formats.py), top-2 of 2:
both experts run on every token, as in the paper's owner training.
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from pathlib import Path

import torch

from elmforest.merge.io import TOKENIZER_FILES, LazyWeights, ShardedWriter
from elmforest.merge.moe import MLP_KEY, check_untrained
from elmforest.merge.moe_card import record_weight_files
from elmforest.merge.moe_formats import PROJ, format_for
from elmforest.model.build import read_config_as_transformers, resolve_model_dir
from elmforest.utils.errors import UserError
from elmforest.utils.io import read_json, undone_on_failure, write_json_atomic

# the parameters an owner trains: the experts and the router (expert 0 and row 0 then held by
# train.frozen_experts=[0]); attention, embeddings, norms and head stay the seed's
OWNER_TRAINABLE = r"\.mlp\.(experts|gate)\."


def public_pair(seed_dir: str | Path, out: str | Path, rows: torch.Tensor | None = None) -> Path:
    """Write the seed as a 2-expert MoE at `out` (atomically); `rows` [layers, 2, hidden] are the router
    rows (default zeros: equal weights; any rows give the same function at the start)."""
    from transformers import AutoConfig

    seed_dir = resolve_model_dir(seed_dir)
    dense = read_config_as_transformers(seed_dir)  # a field the file leaves out: the dense class's default
    from elmforest.merge.moe_formats import FORMATS

    if dense.get("model_type") in {f.model_type for f in FORMATS.values()}:
        raise UserError(
            f"{seed_dir} is already a mixture of experts ({dense['model_type']}); the FlexOlmo pair is made from "
            "the dense seed (forest seed, or the checkpoint it was branched from)"
        )
    fmt = format_for(dense)
    cfg = fmt.config(dense, 2, 2)
    L, H = cfg["num_hidden_layers"], cfg["hidden_size"]
    if rows is None:
        rows = torch.zeros(L, 2, H)
    if tuple(rows.shape) != (L, 2, H):
        raise UserError(f"router rows of shape {tuple(rows.shape)}; the pair needs {(L, 2, H)}")
    writer = ShardedWriter(out, replaces="elmforest_pair.json")
    with undone_on_failure(writer.tmp, writer.out), ExitStack() as stack:
        w = LazyWeights(seed_dir, stack)
        dtype = None
        for name in w.keys():
            t = w.get(name)
            dtype = dtype or t.dtype
            m = MLP_KEY.match(name)
            if m:
                layer, proj = int(m.group(1)), m.group(2)
                for e in (0, 1):
                    writer.add(fmt.expert_name(layer, e, proj), t.clone())  # two tensors on disk
            elif ".mlp." in name:
                raise UserError(
                    f"tensor {name}: an MLP parameter {fmt.model_type} has no place for (a bias?)"
                )
            else:
                writer.add(name, t)
        for layer in range(L):
            writer.add(fmt.router_name(layer), rows[layer].to(dtype))
        for name, t in fmt.extra(cfg, dtype) if fmt.extra else ():
            writer.add(name, t)
        AutoConfig.for_model(**cfg).save_pretrained(str(writer.tmp))
        writer.copy_side_files(seed_dir, (*TOKENIZER_FILES, "generation_config.json", "elmforest_run.json"))
        write_json_atomic(
            writer.tmp / "elmforest_pair.json",
            {
                "seed": str(seed_dir.resolve()),
                "format": fmt.model_type,
                "public_expert": 0,
                "owner_expert": 1,
            },
        )
        return writer.commit()


def owner_rows(
    seed_dir: str | Path,
    shards,
    public_domains: list[str],
    owner_domains: list[str],
    public_rows: Path,
    tokens: int = 16384,
) -> torch.Tensor:
    """[layers, 2, hidden] router rows for one owner's pair, from domain embeddings (FlexOlmo): row 0
    the seed's mean MLP input on the public data (its training mix), row 1 on the owner's own data,
    each L2-normalised. Row 0 is computed once and kept at `public_rows` (safetensors), so every owner's
    pair carries the bit-identical public row the merge requires, wherever the owner computes its own."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from elmforest.eval.bpb import default_seq_len
    from elmforest.merge.router import mean_mlp_inputs, normalise_rows, sample_windows
    from elmforest.model.build import load_model
    from elmforest.utils.io import remove_path, temp_sibling

    seed_dir = resolve_model_dir(seed_dir)
    seq_len = default_seq_len(seed_dir)
    model = load_model(seed_dir).eval()

    def embed(domains):
        samples = sample_windows(shards, domains, "train", seq_len, tokens)
        return normalise_rows(mean_mlp_inputs(model, samples, shards.eos_id, seq_len)[:, None], False)[:, 0]

    meta = {"domains": ",".join(public_domains)}
    if not public_rows.is_file():
        public_rows.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(public_rows)
        try:
            save_file({"rows": embed(public_domains).contiguous()}, str(tmp), metadata=meta)
            os.link(tmp, public_rows)  # the first writer wins: owners racing here share one row
        except FileExistsError:
            pass
        finally:
            remove_path(tmp)
    with safe_open(str(public_rows), "pt") as f:
        if f.metadata() != meta:
            raise UserError(
                f"{public_rows}: the public router row was computed on {f.metadata()}, not on the public "
                f"domains {public_domains}; every owner of a forest must share one (remove the file only "
                "if no owner has trained yet)"
            )
        public = f.get_tensor("rows")
    return torch.stack([public, embed(owner_domains)], dim=1)


def forest_pairs(forest, exclude: list[str] = ()) -> list[tuple[str, Path]]:
    """(name, checkpoint) of every owner of `forest` trained with `forest expert --branch flexolmo`,
    minus `exclude`; refuses a forest with other experts (they have no public expert to share)."""
    from elmforest.forest.manifest import Forest
    from elmforest.forest.pool import check_intact

    f = forest if isinstance(forest, Forest) else Forest.load(forest)
    if not f.names:
        raise UserError(f"{f.root}: no experts (FlexOlmo owners) to merge")
    unknown = sorted(set(exclude) - set(f.names))
    gone = [n for n in unknown if n in f.removed]
    if gone:  # already out of every merge, as `merge moe --exclude` says
        print(f"note: --exclude {gone}: already opted out of {f.root} (forest remove)", file=sys.stderr)
        unknown = [n for n in unknown if n not in gone]
    if unknown:
        raise UserError(f"{f.root}: no expert(s) {unknown} to exclude; have {f.names}")
    other = [n for n in f.names if f.expert(n).get("branch") != "flexolmo" and n not in exclude]
    if other:
        raise UserError(
            f"{f.root}: expert(s) {other} were not trained as FlexOlmo owners (forest expert --branch "
            "flexolmo); merge them with `merge moe`, or the owners' pairs with --owner"
        )
    pairs = [(n, f.expert_dir(n)) for n in f.names if n not in exclude]
    if not pairs:
        raise UserError(f"{f.root}: every owner excluded; nothing to merge")
    check_intact(f, [n for n, _ in pairs])
    return pairs


def merge_pairs(
    pairs: list[tuple[str, Path]],
    out: str | Path,
    top_k: int = 2,
    forest: str | Path | None = None,
    excluded: list[str] = (),
) -> Path:
    """FlexOlmo's merge, no training: the public expert once (expert 0), then each owner's expert 1 in
    the order given, with the router rows to match; everything else taken from the first pair after
    checking that every pair holds exactly the same tensors there (and the same public expert and row),
    as owners trained from one public pair with train.frozen_experts=[0] do. Opting an owner out is
    leaving its pair out. Written atomically at `out`; returns `out`."""
    from transformers import AutoConfig

    from elmforest.forest.trust import refuse_inside_forest, valid_name
    from elmforest.merge.moe_formats import FORMATS

    if not pairs:
        raise UserError("no owner pairs to merge")
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise UserError(f"owner names given twice: {names}")
    for n in names:
        valid_name(n)
        if n == "public":
            raise UserError("owner name 'public' is the public expert's (expert 0); name the owner otherwise")
    refuse_inside_forest(out)
    check_untrained(out)  # a fine-tuned merge keeps elmforest_flexolmo.json: not written over unasked
    dirs = [resolve_model_dir(d) for _, d in pairs]
    same = [d.resolve() for d in dirs]  # one checkpoint however its path is spelled
    twice = sorted({n for (n, _), d in zip(pairs, same, strict=True) if same.count(d) > 1})
    if twice:
        raise UserError(f"owners {twice} are the same checkpoint; each owner's pair is merged once")
    cfgs = [read_json(d / "config.json") for d in dirs]
    fmt = FORMATS.get(cfgs[0].get("model_type"))
    n_of = lambda c: c.get("num_local_experts") or c.get("num_experts")  # noqa: E731
    bad = [
        n
        for n, c in zip(names, cfgs, strict=True)
        if FORMATS.get(c.get("model_type")) is None or n_of(c) != 2
    ]
    if bad:  # an unknown format, or not a 2-expert MoE
        raise UserError(
            f"owner(s) {bad} are not FlexOlmo owner models (2-expert MoEs: the public expert and "
            "the owner's); make the public pair with `elmforest merge flexolmo-pair` and train each owner's "
            "from it (`forest expert --branch flexolmo`)"
        )
    skip = {"num_local_experts", "num_experts", "num_experts_per_tok", "transformers_version", "dtype"}
    for c, n in zip(cfgs[1:], names[1:], strict=True):
        diff = sorted(k for k in set(c) | set(cfgs[0]) if k not in skip and c.get(k) != cfgs[0].get(k))
        if diff:
            raise UserError(f"owner {n!r} has another architecture than {names[0]!r} ({diff})")
    E, L = len(pairs) + 1, cfgs[0]["num_hidden_layers"]
    cfg = {**cfgs[0], **fmt.moe_fields(cfgs[0], E, min(top_k, E))}
    for k in ("num_local_experts", "num_experts"):  # transformers 5 saves Qwen3-MoE's count under the
        if k in cfgs[0]:  # other name: left at 2, the merged model did not load
            cfg[k] = E
    expert = {fmt.expert_name(layer, e, p) for layer in range(L) for e in (0, 1) for p in PROJ}
    router = {fmt.router_name(layer) for layer in range(L)}
    writer = ShardedWriter(out, replaces="elmforest_flexolmo.json")
    recorded, known_as, held = _record_in_forests(out, names, dirs, forest)
    removed = list(recorded[Path(forest).resolve()].removed) if forest is not None else []
    with undone_on_failure(writer.tmp, writer.out), ExitStack() as stack:
        ws = [LazyWeights(d, stack) for d in dirs]
        for w, n in zip(ws[1:], names[1:], strict=True):  # a tensor only a later pair holds was dropped
            if extra := sorted(set(w.keys()) ^ set(ws[0].keys())):
                raise UserError(
                    f"owner {n!r} and {names[0]!r} hold different tensors ({extra[:3]}): not pairs of one seed"
                )
        for name in ws[0].keys():
            if name in expert or name in router:
                continue
            t = ws[0].get(name)
            for w, n in zip(ws[1:], names[1:], strict=True):
                if not torch.equal(w.get(name), t):
                    raise UserError(
                        f"owner {n!r}: {name} differs from {names[0]!r}'s; shared weights must be identical "
                        "(the pairs come from different seeds or public pairs, or an owner trained its shared "
                        "weights: train only its expert, `forest expert --branch flexolmo`)"
                    )
            writer.add(name, t)
        same = dict.fromkeys(names, 0)
        for layer in range(L):
            for p in PROJ:
                public = ws[0].get(fmt.expert_name(layer, 0, p))
                for w, n in zip(ws[1:], names[1:], strict=True):
                    if not torch.equal(w.get(fmt.expert_name(layer, 0, p)), public):
                        raise UserError(
                            f"owner {n!r}: its public expert differs (trained without frozen_experts=[0]?)"
                        )
                writer.add(fmt.expert_name(layer, 0, p), public)
                for w, n in zip(ws, names, strict=True):  # its expert still the public one: untrained
                    same[n] += torch.equal(w.get(fmt.expert_name(layer, 1, p)), public)
                for i, w in enumerate(ws, start=1):
                    writer.add(fmt.expert_name(layer, i, p), w.get(fmt.expert_name(layer, 1, p)))
            gates = [w.get(fmt.router_name(layer)) for w in ws]
            if any(not torch.equal(g[0], gates[0][0]) for g in gates[1:]):
                raise UserError(f"layer {layer}: the owners' public router rows differ")
            writer.add(fmt.router_name(layer), torch.stack([gates[0][0], *(g[1] for g in gates)]))
        AutoConfig.for_model(**cfg).save_pretrained(
            str(writer.tmp)
        )  # extras (a 0-wide shared expert) came with the pair
        writer.copy_side_files(dirs[0], (*TOKENIZER_FILES, "generation_config.json", "elmforest_run.json"))
        write_json_atomic(
            writer.tmp / "elmforest_flexolmo.json",
            {
                "experts": ["public", *names],
                "pairs": [str(d.resolve()) for d in dirs],  # read again from any working directory
                "top_k": cfg["num_experts_per_tok"],
            },
        )
        _write_moe_card(writer.tmp, names, dirs, cfg, forest, list(excluded), removed, known_as)
        path = writer.commit(finish=record_weight_files)
    for root, f in recorded.items():
        f.drop_phases(path)
        f.settle_output(path, held[root])
    if untrained := [n for n in names if same[n] == L * len(PROJ)]:
        print(
            f"warning: owner(s) {untrained}: the owner's expert is still the public one in every layer (the "
            "public pair itself, or an owner not trained yet?): merged as a second copy of the public expert",
            file=sys.stderr,
        )
    return path


def _record_in_forests(out, names: list[str], dirs: list[Path], forest) -> tuple[dict, dict, dict]:
    """Before writing: record `out` with every forest holding one of the owners' experts, so opting an
    owner out finds this copy of its expert, also when the pairs were given one by one (--owner NAME=DIR,
    NAME the user's). Returns ({forest root: Forest}, owner name -> its expert's name in its forest,
    {forest root: the experts of it that `out` holds})."""
    forests, held, known_as = owners_in_forests(names, dirs, forest)
    for root, owned in held.items():
        forests[root].record_output(out, "moe", owned)
    return forests, known_as, held


def owners_in_forests(names: list[str], dirs: list[Path], forest) -> tuple[dict, dict, dict]:
    """Which forests' experts the owners' pairs are: ({forest root: Forest}, {forest root: expert names},
    owner name -> its expert's name in its forest). A pair is a forest's expert `E` wherever it sits in
    that forest's folders for E (experts/E, runs/E/model or a checkpoint of runs/E, branches/E): each is
    a copy of E's weights that opting E out deletes. With `forest` given, every owner is its expert."""
    from elmforest.forest.manifest import Forest

    given = None if forest is None else Path(forest).resolve()
    forests = {} if given is None else {given: Forest.load(given)}
    held = {} if given is None else {given: list(names)}
    known_as = {}
    for n, d in zip(names, dirs, strict=True):
        d = Path(d).resolve()
        root = next((p for p in d.parents if (p / "forest.json").is_file()), None)
        if root is None or root == given:
            continue
        if root not in forests:
            forests[root] = Forest.load(root)
        parts = d.relative_to(root).parts
        if (
            len(parts) >= 2
            and parts[0] in ("experts", "runs", "branches")
            and parts[1] in forests[root].names
        ):
            held.setdefault(root, []).append(parts[1])
            known_as[n] = parts[1]
    return {r: forests[r] for r in held}, held, known_as


def _write_moe_card(
    tmp: Path, names, dirs, cfg: dict, forest, excluded: list[str], removed: list[str], known_as: dict
) -> None:
    """The card every merged MoE carries (elmforest_moe.json, README.md), so routing statistics,
    router training and BTX fine-tuning work on a FlexOlmo merge as on `merge moe`'s."""
    from elmforest.merge.moe_card import model_card
    from elmforest.utils.io import write_text_atomic

    def domains_of(d: Path) -> list[str]:
        run = d / "elmforest_run.json"
        return list((read_json(run).get("data") or {}).get("domains") or []) if run.is_file() else []

    def tokens_of(n: str, d: Path) -> int | None:
        """The owner's training tokens: the record of the forest holding it (given, or found above a
        pair given by --owner), else its run's summary.json (`elmforest train --out RUN` writes the
        model to RUN/model)."""
        from elmforest.forest.manifest import Forest

        above = next((p for p in Path(d).resolve().parents if (p / "forest.json").is_file()), None)
        for root in (Path(forest) if forest is not None else None, above):
            if root is not None and (root / "forest.json").is_file():
                held = Forest.load(root)
                if known_as.get(n, n) in held.names:
                    return held.expert(known_as.get(n, n)).get("tokens")
        runs = [d / "summary.json"] + ([d.parent / "summary.json"] if d.name == "model" else [])
        for s in runs:
            if s.is_file() and isinstance(t := read_json(s).get("tokens"), int):
                return t
        return None

    experts = [{"index": 0, "name": "public", "domains": [], "tokens": None}]
    experts += [
        {"index": i, "name": n, "domains": domains_of(d), "tokens": tokens_of(n, d)}
        | ({"forest_name": known_as[n]} if n in known_as else {})  # what opting it out calls it
        for i, (n, d) in enumerate(zip(names, dirs, strict=True), 1)
    ]
    meta = {
        "kind": "flexolmo",
        "forest": str(Path(forest).resolve()) if forest is not None else None,
        "experts": experts,
        "excluded": excluded,
        "opted_out": removed,
        "shared": "seed",
        "shared_from": str(Path(dirs[0]).resolve()),
        "spec": {"router": "owner-rows", "center": False},
        "top_k": cfg["num_experts_per_tok"],
        "near_parallel_router_rows": [],
        "dense_model_type": None,
        "moe_model_type": cfg["model_type"],
    }
    write_json_atomic(tmp / "elmforest_moe.json", meta)
    made = f"from `{meta['forest']}`" if forest is not None else "from the owners' pairs given one by one"
    card = model_card(meta).replace(
        f"Made by `elmforest merge moe` from `{meta['forest']}`",
        f"Made by `elmforest merge flexolmo` (no training) {made}",
    )
    write_text_atomic(tmp / "README.md", card)
