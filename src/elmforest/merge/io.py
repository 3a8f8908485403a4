"""Lazy reads and sharded, atomic writes of HF safetensors checkpoints.

Every merge streams tensors: read one tensor of each input on demand, write each output tensor into
the current shard, flush shards as they fill. Peak memory is one shard plus the tensors in flight,
whatever the number of inputs.
"""

from __future__ import annotations

import os
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from elmforest.data.tokenizer import TOKENIZER_FILES
from elmforest.forest.fingerprint import architecture_config, config_difference
from elmforest.model.build import read_config_as_transformers, resolve_model_dir, tied_head
from elmforest.utils.errors import AlreadyExists, UserError
from elmforest.utils.io import replace_dir, temp_sibling, write_json_atomic

# Files copied from the first input so the output is a complete, loadable HF checkpoint; every
# file a tokenizer may consist of (TOKENIZER_FILES) among them, so it travels whole and unchanged.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    *TOKENIZER_FILES,
    "elmforest_run.json",
    "elmforest_data.json",
)


def check_same_architecture(dirs: list[Path], names: list[str]) -> dict:
    """The first expert's config as transformers reads it (class defaults filled in), once every expert
    computes as it does. Compared as `forest add` compares them (forest/fingerprint.py), so a 4.x file
    and its 5.x rewrite, or `use_cache: false`, merge; and a field the files leave out takes the dense
    class's default, not the MoE class's (Llama's rms_norm_eps 1e-6 against Mixtral's 1e-5)."""
    archs = [architecture_config(d) for d in dirs]
    for a, n in zip(archs[1:], names[1:], strict=True):
        if a != archs[0]:
            raise UserError(
                f"expert {n!r} has a different architecture than {names[0]!r} "
                f"({config_difference(archs[0], a)}); cannot merge"
            )
    return read_config_as_transformers(dirs[0])


def remote_code_files(src: Path) -> list[str]:
    """A checkpoint's remote code, when its config has an `auto_map`: every Python file at its top level
    (the modules auto_map names and the helpers they import). A model of the same architecture written
    from it needs them beside its config.json, or it cannot load."""
    import json

    try:
        amap = json.loads((src / "config.json").read_text(encoding="utf-8")).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return []
    if not amap:
        return []
    return sorted(p.name for p in src.iterdir() if p.suffix == ".py" and p.is_file() and not p.is_symlink())


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files, as model/build.py checks them (inside its folder, whole), none
    a link out of it (`within`)."""
    from elmforest.model.build import weight_files as checked

    d = resolve_model_dir(model_dir)
    return sorted({within(f, d) for f in checked(d).values()})


def within(f: Path, checkpoint: Path) -> Path:
    """`f`, refused when it is a symbolic link leading out of `checkpoint`: a merge would read, and
    publish in its output, whatever the checkpoint's owner pointed it at (a key file, another owner's
    weights that then survive that owner's opt-out). Hugging Face cache snapshots link into their blob
    store this way: copy those out with `cp -rL` first."""
    if f.is_symlink():
        target, root = f.resolve(), Path(checkpoint).resolve()
        if target != root and root not in target.parents:
            raise UserError(
                f"{f} is a symbolic link to {target}, outside its checkpoint {checkpoint}: a merge reads only "
                "the checkpoint's own files; copy the file in (cp -L) if it belongs there"
            )
    return f


class LazyWeights:
    """name -> tensor, read on demand from a checkpoint's safetensors files (none linked from elsewhere)."""

    def __init__(self, model_dir: Path, stack: ExitStack):
        self.where: dict[str, object] = {}
        for f in weight_files(model_dir):
            h = stack.enter_context(safe_open(str(f), framework="pt"))
            for k in h.keys():
                self.where[k] = h

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        return self.where[name].get_tensor(name)


def open_matching(dirs: list[Path], stack: ExitStack) -> list[LazyWeights]:
    """Open several checkpoints lazily, refusing any whose tensor names differ from the first's. A
    head tied to the embeddings that a checkpoint stores anyway is left out: it is the embedding
    matrix (`forest add` does not compare it either), and the merged model ties it again."""

    opened = [LazyWeights(Path(d), stack) for d in dirs]
    if tied_head(resolve_model_dir(Path(dirs[0]))):
        for w in opened:
            for k in [k for k in w.keys() if k.endswith("lm_head.weight")]:
                del w.where[k]
    names = set(opened[0].keys())
    for w, d in zip(opened[1:], dirs[1:], strict=True):
        if set(w.keys()) != names:
            extra, missing = sorted(set(w.keys()) - names), sorted(names - set(w.keys()))
            said = "; ".join(
                f"{what} {', '.join(ks[:3])}{' ...' if len(ks) > 3 else ''}"
                for what, ks in (("it has", extra), ("it lacks", missing))
                if ks
            )
            raise UserError(f"{d}: its tensors differ from {dirs[0]}'s ({said}); cannot merge")
    return opened


class ShardedWriter:
    """Collects tensors into `model-0000k.safetensors` shards in a temporary directory; `commit`
    writes the index (or renames a lone shard to model.safetensors) and renames the directory into
    place, so `out` is never a half-written checkpoint (a crash between moving the old output aside
    and renaming the new one in leaves the old one at `.NAME.old-PID`)."""

    def __init__(self, out: str | Path, max_shard_bytes: int = 2 * 1024**3, replaces: str | None = None):
        """`replaces`: a marker file an existing `out` must hold to be replaced (an earlier output of
        the same kind); any other non-empty directory is refused rather than deleted."""
        self.out = Path(out)
        if self.out.exists() and not (self.out.is_dir() and not any(self.out.iterdir())):
            if replaces is None or not (self.out / replaces).is_file():
                raise AlreadyExists(
                    f"{self.out} exists and is not an earlier output of this command (no {replaces}); "
                    "choose another output directory or remove it"
                )
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_sibling(self.out)  # a killed export's leftovers go now
        self.tmp.mkdir()
        self.max_shard_bytes = max_shard_bytes
        self.shard: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.weight_map or name in self.shard:
            raise UserError(f"tensor {name} written twice")
        nbytes = t.numel() * t.element_size()
        if self.shard and self.size + nbytes > self.max_shard_bytes:
            self._flush()
        self.shard[name] = t.contiguous()
        self.size += nbytes

    def _flush(self) -> None:
        if self.shard:
            name = f"model-{len(self.files) + 1:05d}.safetensors"
            save_file(self.shard, str(self.tmp / name), metadata={"format": "pt"})
            self.files.append(name)
            self.weight_map.update({k: name for k in self.shard})
            self.shard, self.size = {}, 0

    def copy_side_files(self, src: Path, names=SIDE_FILES) -> None:
        for f in names:
            if (src / f).is_file():
                shutil.copy2(within(src / f, src), self.tmp / f)

    def commit(self, finish=None) -> Path:
        """Writes the last shard and the index, calls `finish(tmp)` (the folder complete but for what
        it adds), and puts the folder in place."""
        self._flush()
        if len(self.files) == 1:
            os.rename(self.tmp / self.files[0], self.tmp / "model.safetensors")
        else:
            total = sum((self.tmp / f).stat().st_size for f in self.files)
            write_json_atomic(
                self.tmp / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": self.weight_map},
            )
        if finish is not None:
            finish(self.tmp)
        return replace_dir(self.tmp, self.out)
