"""Resumable training checkpoints without pickle.

A checkpoint is a directory `checkpoints/step-XXXXXXXX/` holding
- model.safetensors      the weights (shared/tied tensors handled by safetensors' save_model),
- optimizer.safetensors  every tensor of the optimizer state, keyed `<param index>.<name>`,
- state.json             step, token and FLOP counters, RNG states, optimizer hyper-parameters,
                         the run config, and the size and sha256 of each tensor file.
It is written under a temporary name and renamed into place, so a run killed at any moment leaves
only complete checkpoints; the newest complete one is where a run resumes. A checkpoint is verified
before it is used (sizes and checksums, safetensors headers): a disk that flipped or lost bytes
makes the trainer fall back to the previous good checkpoint, and the bad one is kept aside.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from elmforest.utils.errors import UserError
from elmforest.utils.io import (
    file_digest,
    fix_modes,
    remove_path,
    sync_dir,
    sync_tree,
    undone_on_failure,
    write_json_atomic,
)

PREFIX = "step-"
CORRUPT_PREFIX = "corrupt-"  # kept aside for inspection: neither listed nor cleaned
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")


class CorruptCheckpoint(UserError):
    """A checkpoint whose files are missing, truncated or altered since they were written."""


# (device, inode, size, mtime_ns, sha256 recorded) of tensor files this process hashed and found as
# recorded: every expert of a forest starts from one seed_state (8 x 1.3B: ~16 GB hashed 8 times)
_HASHED: set[tuple] = set()


def verify_checkpoint(path: Path) -> dict:
    """The checkpoint's state, after checking that nothing in it changed since it was written (sizes
    and sha256 of the tensor files where recorded, hashed once per process while a file's inode, size
    and mtime stay; every checkpoint: readable state.json and safetensors headers that fit their
    files). Raises CorruptCheckpoint naming the file and problem."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{path / 'state.json'}: unreadable ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CorruptCheckpoint(f"{path / 'state.json'}: not a checkpoint state (no step)")
    recorded = state.get("files") or {}
    for name in TENSOR_FILES:
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(f"{f}: missing")
        want = recorded.get(name)
        if want:
            st = f.stat()
            if st.st_size != want["bytes"]:
                raise CorruptCheckpoint(f"{f}: {st.st_size} bytes, {want['bytes']} were written")
            seen = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, want["sha256"])
            if seen not in _HASHED:
                if file_digest(f)["sha256"] != want["sha256"]:
                    raise CorruptCheckpoint(
                        f"{f}: checksum mismatch (the bytes changed since they were written)"
                    )
                _HASHED.add(seen)
        try:
            with safe_open(str(f), framework="pt") as h:
                h.keys()
        except Exception as e:  # safetensors raises its own error type for bad headers and truncation
            raise CorruptCheckpoint(f"{f}: not a readable safetensors file ({e})") from None
    return state


def set_aside(path: Path) -> Path:
    """Move a corrupt checkpoint out of the way, keeping it for inspection."""
    dst = path.with_name(f"{CORRUPT_PREFIX}{path.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(path, dst)
    return dst


def optimizer_param_names(opt: torch.optim.Optimizer, model: torch.nn.Module) -> list[str]:
    """Parameter names in the optimizer's own order (its state is keyed by position)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in opt.param_groups for p in g["params"]]


def _trainer_order(model: torch.nn.Module) -> list[str]:
    """The trainer's optimizer order with every parameter trainable (checkpoints that predate
    recorded names): matrices (weight decay) first, then vectors."""
    named = list(model.named_parameters())
    return [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]


def optimizer_to_flat(
    opt: torch.optim.Optimizer, model: torch.nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    meta = {"param_groups": groups, "scalars": scalars}
    if model is not None:
        meta["param_names"] = optimizer_param_names(opt, model)
    return tensors, meta


def optimizer_from_flat(
    opt: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    meta: dict,
    model: torch.nn.Module | None = None,
) -> None:
    """Restore optimizer state. When this optimizer holds a different set of parameters than the
    saved one (e.g. only the MLPs train, branched from a seed that trained everything), the state is
    matched by parameter name: each trainable parameter continues its own moments."""
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    if model is not None:
        src = meta.get("param_names") or _trainer_order(model)
        dst = optimizer_param_names(opt, model)
        if src != dst:
            pos = {n: i for i, n in enumerate(src)}
            # parameters the saved run did not train start with fresh moments
            state = {j: state[pos[n]] for j, n in enumerate(dst) if n in pos and pos[n] in state}
            ids, start = [], 0
            for g in opt.param_groups:
                ids.append(list(range(start, start + len(g["params"]))))
                start += len(g["params"])
            groups = [{**saved, "params": i} for saved, i in zip(groups, ids, strict=True)]
    # how the update runs is this session's choice (fused kernel, foreach on CUDA), not the saved one's;
    # given to load_state_dict, which places each `step` where that kernel wants it (on the parameter's
    # device for the fused one: a CPU step beside CUDA parameters would fail its first update)
    impl = {
        k: opt.param_groups[0][k]
        for k in ("fused", "foreach")
        if opt.param_groups and k in opt.param_groups[0]
    }
    opt.load_state_dict({"state": state, "param_groups": [{**g, **impl} for g in groups]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()  # this process's device only
    return tensors, {}


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def save_checkpoint(
    ckpt_root: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict, keep: int
) -> Path:
    step = int(state["step"])
    final = ckpt_root / f"{PREFIX}{step:08d}"
    tmp = ckpt_root / f".{PREFIX}{step:08d}.tmp-{os.getpid()}"
    remove_path(tmp)
    with undone_on_failure(tmp, final):  # a full disk: free what this attempt wrote, say where
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = optimizer_to_flat(opt, model)
        rng_tensors, _ = rng_state()
        save_file({**opt_tensors, **rng_tensors}, str(tmp / "optimizer.safetensors"))
        files = {name: file_digest(tmp / name) for name in TENSOR_FILES}
        write_json_atomic(tmp / "state.json", {**state, "optimizer": opt_meta, "files": files})
        fix_modes(tmp)
        sync_tree(tmp)
    if final.exists():  # a previous attempt reached this step: replace it
        trash = final.with_name(f".trash-{final.name}")
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, final)
    if sync_dir(ckpt_root, published=True):  # the new checkpoint's name on disk before older ones go
        prune_checkpoints(ckpt_root, keep)  # (else the next checkpoint prunes them)
    return final


def set_aside_corrupt(ckpt_root: Path) -> None:
    """Set aside the newest checkpoints that fail verification, saying so, until a good one (or none)
    is newest: a flipped byte costs the steps since the previous checkpoint, not the run."""
    ckpts = list_checkpoints(ckpt_root)
    while ckpts:
        try:
            verify_checkpoint(ckpts[-1])
            return
        except CorruptCheckpoint as e:
            aside = set_aside(ckpts.pop())
            then = f"resuming from {ckpts[-1].name}" if ckpts else "no earlier checkpoint: starting over"
            print(f"warning: {e}; kept aside as {aside.name}; {then}", file=sys.stderr, flush=True)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    done = [
        p
        for p in ckpt_root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()
    ]
    return sorted(done, key=_step_of)


def _step_of(ckpt: Path) -> int:
    return int(ckpt.name[len(PREFIX) :])


def newest_step(ckpt_root: Path) -> int | None:
    """The step of the newest complete checkpoint (None: none). A pause (`train.stop_at`) always writes
    one, and logs no line where it falls between two logged steps."""
    done = list_checkpoints(ckpt_root)
    return _step_of(done[-1]) if done else None


def clean_partial(ckpt_root: Path) -> None:
    """Remove leftovers of writes or deletions that were killed (one writer per run directory)."""
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    ckpts = list_checkpoints(ckpt_root)
    for p in ckpts[: max(0, len(ckpts) - max(1, keep))]:
        trash = p.with_name(f".trash-{p.name}")
        os.rename(p, trash)  # leaves the set of complete checkpoints in one step
        shutil.rmtree(trash, ignore_errors=True)


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device,
    verified: bool = False,
) -> dict:
    """Verify (unless `verified`: the caller just did), then load weights, optimizer state and RNG
    states into `model` and `opt`."""
    state = json.loads((path / "state.json").read_text()) if verified else verify_checkpoint(path)
    state.pop("files", None)
    load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))
    tensors = load_file(str(path / "optimizer.safetensors"), device="cpu")
    rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    opt_tensors = {
        k: v.to(device) if not k.endswith(".step") else v
        for k, v in tensors.items()
        if not k.startswith("rng.")
    }
    optimizer_from_flat(opt, opt_tensors, state.pop("optimizer"), model)
    set_rng_state(rng)
    return state
