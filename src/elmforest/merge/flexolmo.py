"""FlexOlmo's starting point for one data owner: the seed as a 2-expert MoE whose two experts are both the
seed's FFN (expert 0 the public one, kept frozen while the owner trains expert 1; train/frozen_experts.py).

With two identical experts the MoE computes exactly the seed, whatever the router rows (the routing
weights sum to 1), so an owner starts from the seed's own function and only what it trains moves away
from it. The pair is written in the format of the seed's architecture (merge/moe_formats.py), top-2 of 2:
both experts run on every token, as in the paper's owner training.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch

from elmforest.merge.io import TOKENIZER_FILES, LazyWeights, ShardedWriter
from elmforest.merge.moe import MLP_KEY
from elmforest.merge.moe_formats import format_for
from elmforest.model.build import resolve_model_dir
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
    dense = read_json(seed_dir / "config.json")
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
