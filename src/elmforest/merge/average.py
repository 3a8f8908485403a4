"""Parameter merging of experts (averaging, task arithmetic, TIES), tensor by tensor.

Inputs are read lazily, one tensor of one expert at a time, so averaging and task arithmetic hold
the shard being written plus two copies of one tensor whatever N is (about one expert in all); TIES
holds N copies of one tensor (merge/methods.py). On disk the result is an HF checkpoint (sharded
safetensors with an index when larger than `max_shard_bytes`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch

from elmforest.merge.io import (
    SIDE_FILES,
    LazyWeights,
    ShardedWriter,
    check_same_architecture,
    open_matching,
    remote_code_files,
)
from elmforest.merge.methods import NEEDS_BASE, get_method
from elmforest.model.build import resolve_model_dir
from elmforest.utils.errors import UserError
from elmforest.utils.io import undone_on_failure, write_json_atomic


def warn_unrelated(forest, names: list[str], what: str) -> None:
    """Experts added from elsewhere whose run did not start from this forest's seed (`forest add`
    records them as "external") share no initialisation with the rest: BTM's parameter averaging
    works for experts branched from one seed, and a task vector θ − θ_seed of a model that never was
    the seed means nothing. Warned, not refused: the user may know where it started."""
    alien = [  # a copy of one of the forest's experts (`forest add` of its files): its origin is known
        n
        for n in names
        if [p.get("name") for p in forest.expert(n).get("parents") or []] == ["external"]
        and forest.expert(n).get("copy_of") not in forest.names
    ]
    if alien:
        print(
            f"warning: {what} {', '.join(alien)}, trained elsewhere (not from this forest's seed, as far "
            "as the forest knows): averaging weights of models that did not start from one seed gives a "
            "meaningless model",
            file=sys.stderr,
        )


def normalise(weights: Sequence[float] | None, n: int) -> list[float]:
    if n == 0:
        raise UserError("nothing to merge: no experts")
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n or any(not (0 <= w < math.inf) for w in weights) or sum(weights) <= 0:
        raise UserError(f"need {n} finite non-negative weights with a positive sum, got {list(weights)}")
    top = float(max(weights))  # scaled first: 1e308 + 1e308 is inf, and w / inf is 0
    s = sum(float(w) / top for w in weights)
    return [float(w) / top / s for w in weights]


def _finite(t: torch.Tensor, name: str, where) -> torch.Tensor:
    """`t` in float32, refused if it holds a NaN or an inf: a diverged expert's NaN passes through every
    method (TIES's trim multiplies it by 0, which is NaN) into a merged model that answers NaN."""
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise UserError(f"{where}: tensor {name} holds NaN or inf values (a diverged run?); not merged")
    return t


def iter_merge(
    model_dirs: Sequence[Path],
    weights: Sequence[float] | None = None,
    method: str = "linear",
    base_dir: Path | None = None,
    **params,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merged tensor) one at a time; arithmetic in float32, result in the inputs' dtype."""
    fn = get_method(method)
    if method in NEEDS_BASE and base_dir is None:
        raise UserError(f"merge method {method!r} is relative to a base model (the seed); none given")
    w = normalise(weights, len(model_dirs))
    with ExitStack() as stack:
        experts = open_matching(list(model_dirs), stack)
        base = LazyWeights(Path(base_dir), stack) if base_dir is not None else None
        names = experts[0].keys()
        if base is not None and method in NEEDS_BASE:
            missing = [n for n in names if n not in base]
            if missing:
                raise UserError(f"{base_dir}: base model lacks tensors {missing[:3]}; not the experts' seed?")
        for name in names:
            first = experts[0].get(name)
            if not first.is_floating_point():  # position ids, masks, counters: not weights to average
                yield name, _same_everywhere(name, first, model_dirs, experts, base)
                continue

            def tensors(name=name, first=first):
                yield _finite(first, name, model_dirs[0])
                for d, e in zip(model_dirs[1:], experts[1:], strict=True):
                    t = e.get(name)
                    if t.shape != first.shape:
                        raise UserError(f"tensor {name}: shape {tuple(t.shape)} vs {tuple(first.shape)}")
                    yield _finite(t, name, d)

            kw = dict(params)
            if method in NEEDS_BASE:
                b = base.get(name)
                if b.shape != first.shape:
                    raise UserError(f"tensor {name}: base shape {tuple(b.shape)} vs {tuple(first.shape)}")
                kw["base"] = _finite(b, name, base_dir)
            yield name, fn(tensors(), w, **kw).to(first.dtype)


def _same_everywhere(name, first, model_dirs, experts, base) -> torch.Tensor:
    """An integer or bool tensor, copied as it is where every input holds it alike: averaged in float and
    cast back it lost one wherever the weighted sum fell just below a whole number (uneven weights)."""
    others = [(d, e.get(name)) for d, e in zip(model_dirs[1:], experts[1:], strict=True)]
    if base is not None and name in base:
        others.append(("the base model", base.get(name)))
    for d, t in others:
        if t.dtype != first.dtype or t.shape != first.shape or not torch.equal(t, first):
            raise UserError(
                f"tensor {name} ({first.dtype}) differs between {model_dirs[0]} and {d}: a non-float tensor "
                "is not a weight to average; the experts must hold the same one"
            )
    return first


def iter_average(
    model_dirs: Sequence[Path], weights: Sequence[float] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, Σ_j w_j θ_j) tensor by tensor."""
    return iter_merge(model_dirs, weights, "linear")


def average_state_dict(model_dirs: Sequence[Path], weights: Sequence[float] | None = None) -> dict:
    return dict(iter_average(model_dirs, weights))


def merge_checkpoints(
    model_dirs: Sequence[str | Path],
    out: str | Path,
    weights: Sequence[float] | None = None,
    method: str = "linear",
    base_dir: str | Path | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    metadata: dict | None = None,
    **params,
) -> Path:
    """Write the merge of HF checkpoints as a new HF checkpoint directory (atomically)."""
    dirs = [resolve_model_dir(d) for d in model_dirs]
    base = resolve_model_dir(base_dir) if base_dir is not None else None
    # tensors of matching shapes from configs that differ (rms_norm_eps, a vocabulary edited by hand)
    # averaged under the first one's config without a word, as `merge moe` refuses them
    every = [*dirs, *([base] if base is not None else [])]
    names = [d.parent.name if d.name == "model" else d.name for d in dirs]
    check_same_architecture(every, names + ([f"{base.name} (the base)"] if base is not None else []))
    writer = ShardedWriter(out, max_shard_bytes, replaces="elmforest_average.json")
    with undone_on_failure(writer.tmp, writer.out):
        for name, t in iter_merge(dirs, weights, method, base, **params):
            writer.add(name, t)
        writer.copy_side_files(dirs[0], (*SIDE_FILES, *remote_code_files(dirs[0])))
        write_json_atomic(
            writer.tmp / "elmforest_average.json",
            {
                "method": method,
                "params": params,
                "base": str(base.resolve()) if base is not None else None,  # provenance from any directory
                "experts": [str(d.resolve()) for d in dirs],
                "weights": normalise(weights, len(dirs)),
                **(metadata or {}),
            },
        )
        return writer.commit()


def average_checkpoints(
    model_dirs: Sequence[str | Path],
    out: str | Path,
    weights: Sequence[float] | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    metadata: dict | None = None,
) -> Path:
    """The weighted average of HF checkpoints as a new HF checkpoint directory (atomically)."""
    return merge_checkpoints(model_dirs, out, weights, "linear", None, max_shard_bytes, metadata)
