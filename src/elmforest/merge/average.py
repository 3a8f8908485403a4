"""Parameter averaging of experts, tensor by tensor from lazily opened safetensors.

Only one output tensor and one input tensor are in memory beyond what is being written, so
averaging N experts costs about one expert's size whatever N is. On disk the result is an HF
checkpoint (sharded safetensors with an index when larger than `max_shard_bytes`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from elmforest.model.build import resolve_model_dir
from elmforest.utils.io import write_json_atomic

_COPY = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "elmforest_run.json",
)


def weight_files(model_dir: Path) -> list[Path]:
    d = resolve_model_dir(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{d}: no safetensors weights (model.safetensors or an index)")


class LazyWeights:
    """name -> tensor, read on demand from a checkpoint's safetensors files."""

    def __init__(self, model_dir: Path, stack: ExitStack):
        self.where: dict[str, object] = {}
        for f in weight_files(model_dir):
            h = stack.enter_context(safe_open(str(f), framework="pt"))
            for k in h.keys():
                self.where[k] = h

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get_tensor(name)


def normalise(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"need {n} non-negative weights with a positive sum, got {list(weights)}")
    s = float(sum(weights))
    return [float(w) / s for w in weights]


def iter_average(
    model_dirs: Sequence[Path], weights: Sequence[float] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, Σ_j w_j θ_j) tensor by tensor; accumulation in float32, result in the inputs' dtype."""
    w = normalise(weights, len(model_dirs))
    with ExitStack() as stack:
        experts = [LazyWeights(Path(d), stack) for d in model_dirs]
        names = experts[0].keys()
        for e, d in zip(experts[1:], model_dirs[1:], strict=True):
            if set(e.keys()) != set(names):
                raise ValueError(f"{d}: its tensors differ from {model_dirs[0]}'s; cannot average")
        for name in names:
            first = experts[0].get(name)
            acc = first.to(torch.float32) * w[0]
            for e, wj in zip(experts[1:], w[1:], strict=True):
                t = e.get(name)
                if t.shape != first.shape:
                    raise ValueError(f"tensor {name}: shape {tuple(t.shape)} vs {tuple(first.shape)}")
                acc.add_(t.to(torch.float32), alpha=wj)
            yield name, acc.to(first.dtype)


def average_state_dict(model_dirs: Sequence[Path], weights: Sequence[float] | None = None) -> dict:
    return dict(iter_average(model_dirs, weights))


def average_checkpoints(
    model_dirs: Sequence[str | Path],
    out: str | Path,
    weights: Sequence[float] | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    metadata: dict | None = None,
) -> Path:
    """Write the weighted average of HF checkpoints as a new HF checkpoint directory (atomically)."""
    dirs = [resolve_model_dir(d) for d in model_dirs]
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shard: dict[str, torch.Tensor] = {}
    size, files, weight_map = 0, [], {}

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, t in iter_average(dirs, weights):
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = t.contiguous()
        size += nbytes
    flush()
    if len(files) == 1:
        os.rename(tmp / files[0], tmp / "model.safetensors")
    else:
        total = sum((tmp / f).stat().st_size for f in files)
        write_json_atomic(
            tmp / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
    for f in _COPY:
        if (dirs[0] / f).is_file():
            shutil.copy2(dirs[0] / f, tmp / f)
    write_json_atomic(
        tmp / "elmforest_average.json",
        {"experts": [str(d) for d in dirs], "weights": normalise(weights, len(dirs)), **(metadata or {})},
    )
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out
