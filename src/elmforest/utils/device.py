"""Device and precision choices shared by training and evaluation."""

from __future__ import annotations

import contextlib

import torch

from elmforest.utils.errors import Failed, UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):  # what elmforest runs on (and is tested on)
        raise UserError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Failed(f"device {name!r} requested but CUDA is not available")
    return dev


def cpu_supports_bf16() -> bool:
    """bf16 pays on a CPU with AVX512-BF16 or AMX, and only when PyTorch's kernels may use them: with
    ATEN_CPU_CAPABILITY limited to AVX2 (as on most laptops, and to measure that case) it means fp32."""
    cpu = getattr(torch, "cpu", None)
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, p, lambda: False)() for p in probes)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. `auto` picks bf16 where the hardware has it."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if name != "auto":
        raise UserError(f"unknown precision {name!r}; expected auto, bf16 or fp32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_supports_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def tie_to_launcher() -> None:
    """A rank started by torchrun dies with it. torchrun stops its ranks when it is stopped, but a
    SIGKILLed torchrun (its launcher killed, a job cancelled) left them training on, orphaned, into the
    run directory: a rerun was refused as a second trainer, and they merged their expert on their own."""
    import os

    from elmforest.utils.proc import die_with_parent

    if os.environ.get("TORCHELASTIC_RUN_ID"):  # set by torchrun for its workers
        die_with_parent(os.getppid())


def init_distributed(device: str) -> tuple[int, int, bool]:
    """(rank, world size, whether we created the process group), from torchrun's environment."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    tie_to_launcher()
    owns = False
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return dist.get_rank(), dist.get_world_size(), owns


def scored_on() -> str:
    """Where and in what precision this process scores by default ("cpu/bfloat16"), part of the score
    caches' keys (a study's, a sweep's): one moved to another machine (a GPU, a CPU without bf16) scores
    again rather than compare its points across precisions."""
    dev = resolve_device("auto")
    return f"{dev.type}/{str(resolve_precision('auto', dev) or 'float32').removeprefix('torch.')}"
