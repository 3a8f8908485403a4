"""Resumable training checkpoints without pickle.

A checkpoint is a directory `checkpoints/step-XXXXXXXX/` holding
- model.safetensors      the weights (shared/tied tensors handled by safetensors' save_model),
- optimizer.safetensors  every tensor of the optimizer state, keyed `<param index>.<name>`,
- state.json             step, token and FLOP counters, RNG states, optimizer hyper-parameters,
                         and the run config.
It is written under a temporary name and renamed into place, so a run killed at any moment leaves
only complete checkpoints; the newest complete one is where a run resumes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from elmforest.utils.io import write_json_atomic

PREFIX = "step-"


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
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
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda_{i}"] = s
    return tensors, {}


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)


def save_checkpoint(
    ckpt_root: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict, keep: int
) -> Path:
    step = int(state["step"])
    final = ckpt_root / f"{PREFIX}{step:08d}"
    tmp = ckpt_root / f".{PREFIX}{step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = optimizer_to_flat(opt)
    rng_tensors, _ = rng_state()
    save_file({**opt_tensors, **rng_tensors}, str(tmp / "optimizer.safetensors"))
    write_json_atomic(tmp / "state.json", {**state, "optimizer": opt_meta})
    _fsync_dir(tmp)
    if final.exists():  # a previous attempt reached this step: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    prune_checkpoints(ckpt_root, keep)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    done = [
        p
        for p in ckpt_root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()
    ]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    for p in ckpt_root.iterdir():  # leftovers of writes that were killed
        if p.name.startswith(f".{PREFIX}") and p.name.split(".tmp-")[-1] != str(os.getpid()):
            shutil.rmtree(p, ignore_errors=True)
    ckpts = list_checkpoints(ckpt_root)
    for p in ckpts[: max(0, len(ckpts) - max(1, keep))]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(
    path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device
) -> dict:
    state = json.loads((path / "state.json").read_text())
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))
    tensors = load_file(str(path / "optimizer.safetensors"), device="cpu")
    rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    opt_tensors = {
        k: v.to(device) if not k.endswith(".step") else v
        for k, v in tensors.items()
        if not k.startswith("rng.")
    }
    optimizer_from_flat(opt, opt_tensors, state.pop("optimizer"))
    set_rng_state(rng)
    return state
