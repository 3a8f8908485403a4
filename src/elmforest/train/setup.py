"""What a run is built from before its first step: the shards and their tokenizer checked against each
other, the process group and device, the model (frozen but for `train.trainable`), the window
sampler, the optimizer and the loss (compiled when asked).

A mixin of `Trainer` (train/trainer.py), apart from the loop, resuming and saving, which only use what
it builds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from elmforest.data.shards import Shards
from elmforest.data.tokenizer import load_tokenizer
from elmforest.model.build import build_model, count_params
from elmforest.train.batches import WindowSampler
from elmforest.train.flops import flops_breakdown
from elmforest.train.moe_loss import moe_shape, router_losses
from elmforest.train.runcheck import check_attention, check_context, check_order, check_same_tokenizer
from elmforest.utils.device import autocast, init_distributed, resolve_device, resolve_precision
from elmforest.utils.errors import UserError
from elmforest.utils.io import read_json


class TrainerSetup:
    def _setup(self) -> None:
        cfg = self.cfg
        if not cfg.data.shards:
            raise UserError("data.shards is not set: point it at a shards directory (elmforest shards build)")
        self.shards = Shards(cfg.data.shards)
        check_order(cfg, self.shards)
        self.tokenizer = load_tokenizer(self.shards.root)
        if self.tokenizer.fingerprint() != self.shards.tokenizer_fingerprint:
            raise UserError(
                f"{self.shards.root}: its tokenizer files are not the tokenizer its tokens were made with "
                "(replaced since `shards build`?); rebuild the shards or restore the tokenizer"
            )
        if cfg.model.init_from:
            check_same_tokenizer(cfg.model.init_from, self.tokenizer.fingerprint(), self.shards)
        if cfg.train.init_checkpoint and not (self.run_dir / "checkpoints").is_dir():
            check_init_checkpoint(Path(cfg.train.init_checkpoint), cfg)  # before the run's files, not after
        self.rank, self.world, self._owns_group = init_distributed(cfg.train.device)
        self.device = resolve_device(cfg.train.device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        if self.world > 1:
            mine = cfg.to_dict()
            mine["train"].pop("device")  # each rank's own by design (cuda:LOCAL_RANK)
            same_on_every_rank({"config": mine, "shards": self.shards.fingerprint}, self.world, self.device)
        if cfg.train.batch_size % self.world:
            raise UserError(
                f"train.batch_size={cfg.train.batch_size} must divide evenly among {self.world} processes"
            )
        self.amp_dtype = resolve_precision(cfg.train.precision, self.device)
        check_attention(cfg.model.attn_implementation, self.device)
        # from init_checkpoint every weight is loaded next (or from this run's own checkpoint, when it has
        # one; a resume without init_checkpoint initialises: its checkpoints may all be set aside as corrupt)
        self.model = build_model(
            cfg.model,
            self.shards.vocab_size,
            self.shards.eos_id,
            seed=cfg.train.seed,
            initialise=not cfg.train.init_checkpoint,
        )
        check_context(self.model, cfg)
        if cfg.train.router_aux_loss > 0 or cfg.train.router_z_loss > 0:
            moe_shape(self.model.config)  # refused before any step for a model with no router
        if cfg.train.frozen_experts:  # and before the run's files: it was refused after them, naming
            n, _ = moe_shape(self.model.config, "train.frozen_experts")  # the router losses
            if bad := [i for i in cfg.train.frozen_experts if not 0 <= i < n]:
                raise UserError(f"train.frozen_experts {bad}: the model has experts 0..{n - 1}")
        self.model.to(self.device)
        # dropout (a GPT-2 checkpoint's 0.1) draws from the global generator: unseeded, two runs of one
        # config differed, and a resumed run from an uninterrupted one. A resume restores its state.
        torch.manual_seed((cfg.train.seed + self.rank) % 2**64)
        self.model.train()
        if cfg.train.trainable:
            freeze_except(self.model, cfg.train.trainable)
        self.n_params = count_params(self.model)
        # after freezing: frozen weights cost no weight gradient (train/flops.py)
        self.flops_info = flops_breakdown(self.model, cfg.train.seq_len)
        self.flops_per_token = self.flops_info["flops_per_token"]
        self.sampler = WindowSampler(
            self.shards,
            cfg.data.domains,
            cfg.data.split,
            cfg.train.seq_len,
            cfg.train.batch_size,
            cfg.train.seed,
            cfg.data.mixture,
        )
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        o = cfg.optim
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            **_optimizer_impl(cfg.train.fused_optimizer, self.device),
        )
        self.forward = self.model
        if self.world > 1:  # data parallel: each process takes its slice of every global batch
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.model, device_ids=ids)
        # the loss (forward, fp32 upcast, cross-entropy) is one function so torch.compile fuses the
        # upcast and the softmax into the LM head's epilogue instead of materialising fp32 logits. Under
        # DDP, Dynamo does not trace into DistributedDataParallel.forward: the wrapped model is compiled
        # (its DDPOptimizer splits graphs at the gradient buckets) and the loss stays eager.
        self.loss_of = self._loss
        if cfg.train.compile and self.world > 1:
            self.forward = torch.compile(self.forward)
        elif cfg.train.compile:
            self.loss_of = torch.compile(self._loss)

    def _loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what is minimised, the LM loss that is logged): with an MoE's router losses on, the first
        adds them (train/moe_loss.py)."""
        t = self.cfg.train
        aux = t.router_aux_loss > 0 or t.router_z_loss > 0
        with autocast(self.device, self.amp_dtype):
            out = self.forward(input_ids=batch[:, :-1], **({"output_router_logits": True} if aux else {}))
        ce = F.cross_entropy(out.logits.float().flatten(0, 1), batch[:, 1:].flatten())
        if not aux:
            return ce, ce
        return ce + router_losses(
            self.model.config, out.router_logits, t.router_aux_loss, t.router_z_loss
        ), ce


def freeze_except(model, pattern: str) -> int:
    """Train only the parameters whose name matches `pattern` (re.search); returns how many do."""
    pat = re.compile(pattern)
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(bool(pat.search(name)))
        n += p.numel() if p.requires_grad else 0
    if n == 0:
        names = [k for k, _ in model.named_parameters()][:4]
        raise UserError(f"train.trainable={pattern!r} matches no parameter (names look like {names})")
    return n


def _optimizer_impl(fused: bool, device: torch.device) -> dict:
    """AdamW's implementation: the fused kernel (one pass over each parameter, CPU and CUDA) when asked,
    else the multi-tensor `foreach` path on CUDA and PyTorch's default elsewhere. The results agree to
    rounding; only the speed differs (bench/trainer_throughput.py)."""
    if fused:
        return {"fused": True}
    return {"foreach": device.type == "cuda" or None}


# the architecture fields that shape its tensors: a longer context (max_position_embeddings, rotary: no
# weights) or another rms_norm_eps branches from a checkpoint as before
SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "tie_embeddings",
)


def check_init_checkpoint(path: Path, cfg) -> None:
    """What `_resume` would refuse after the run's files are written (a size mismatch as a 60-line
    traceback): no checkpoint there, one at or past train.steps, or one of another architecture."""
    state = path / "state.json"
    if not state.is_file():
        raise UserError(
            f"train.init_checkpoint {path}: not a training checkpoint (no state.json; a run's "
            "checkpoints/step-N folder)"
        )
    st = read_json(state)
    at = st.get("step") if isinstance(st, dict) else None
    if isinstance(at, int) and at >= cfg.train.steps:
        raise UserError(f"init_checkpoint is at step {at}, not before train.steps={cfg.train.steps}")
    theirs = ((st.get("config") if isinstance(st, dict) else None) or {}).get("model") or {}
    differ = [
        f"{k} {theirs[k]} vs {getattr(cfg.model, k)}"
        for k in SHAPE_FIELDS
        if theirs.get(k) is not None
        and getattr(cfg.model, k) is not None
        and theirs[k] != getattr(cfg.model, k)
    ]
    if differ:
        raise UserError(
            f"train.init_checkpoint {path} is a checkpoint of another model ({', '.join(differ)}): its "
            "weights do not fit this one"
        )


def same_on_every_rank(setting: dict, world: int, device: torch.device) -> None:
    """Refuse, on every rank, a data-parallel run whose processes were given different settings. Each
    builds its config from its own command line and files: torchrun launched by hand, or a config file
    edited while the ranks start, trained one rank at another LR or seed, or on other rows than the
    ledger counts, without a word; other steps hung the run at its end. Sent as JSON bytes in tensors
    (all_gather_object would pickle)."""
    import json

    import torch.distributed as dist

    from elmforest.train.runcheck import config_diff

    dev = device if device.type == "cuda" else torch.device("cpu")
    mine = json.dumps(setting, sort_keys=True, default=str).encode()
    size = torch.tensor([len(mine)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    buf = torch.zeros(int(max(s.item() for s in sizes)), dtype=torch.uint8, device=dev)
    buf[: len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
    bufs = [torch.zeros_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf)
    texts = [bytes(b[: int(s.item())].cpu().tolist()) for b, s in zip(bufs, sizes, strict=True)]
    other = next((r for r, t in enumerate(texts) if t != texts[0]), None)
    if other is not None:
        diff = config_diff(json.loads(texts[0]), json.loads(texts[other]))
        raise UserError(
            f"the {world} processes of this run were given different settings (rank 0 -> rank {other}: "
            f"{diff}); launch every rank with the same command and files (`elmforest train --nproc N` does)"
        )
