"""`elmforest train` and `elmforest presets`, and the options every training verb shares (train, forest
seed/expert/train, sweep): the preset or saved config, the starting checkpoint, `--set` overrides."""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Annotated

import typer

from elmforest.config import override_keys
from elmforest.utils.argtypes import flag, opt, positive_int, verb
from elmforest.utils.errors import UserError
from elmforest.utils.proc import first_process

# The config keys --set accepts, generated from the config dataclasses: the epilog of every training verb.
CONFIG_KEYS = (
    "\b\n--set KEY=VALUE accepts every field of the run config, shown as KEY: TYPE = DEFAULT\n"
    "(the dataclass default; a preset sets its own, see `elmforest presets`); a list is [a, b], a quoted\n"
    "item keeping its commas ('key=[\"a,b\", c]'):\n" + "\n".join(f"  {line}" for line in override_keys())
)

Preset = Annotated[
    str | None,
    opt(
        "model + training preset (see `elmforest presets`; default cpu-small, or a seed's own)",
        metavar="NAME",
    ),
]
ConfigFile = Annotated[
    str | None,
    opt(
        "a run_config.json to start from instead of the preset's defaults (with --preset: the file's "
        "fields over that preset's, so a partial file is completed by it; without, missing fields take the "
        "built-in defaults, and a note says so)",
        name="--config",
        metavar="FILE",
    ),
]
InitFrom = Annotated[
    str | None,
    opt(
        "a local HF causal-LM checkpoint whose weights (and architecture) this training starts from "
        "(for `forest seed`: the dense run starts there; --from-checkpoint instead takes it as the seed itself)",
        metavar="DIR",
    ),
]
TrustRemoteCode = Annotated[bool, flag("--trust-remote-code", "allow custom model code from --init-from")]
Overrides = Annotated[
    list[str] | None,
    opt(
        "override a config field, e.g. --set train.steps=200 --set optim.lr=1e-3 (repeatable; keys below)",
        name="--set",
        metavar="KEY=VALUE",
    ),
]
NoProgress = Annotated[bool, flag("--no-progress", "no progress bars: one line per logged step instead")]


@dataclasses.dataclass(frozen=True)
class TrainArgs:
    """The config options every training verb shares (an option group: see utils/argtypes.verb);
    `run_config` builds the config they name."""

    preset: Preset = None
    config: ConfigFile = None
    init_from: InitFrom = None
    trust_remote_code: TrustRemoteCode = False
    overrides: Overrides = None

    def __post_init__(self):
        object.__setattr__(self, "overrides", list(self.overrides or []))

    def run_config(self, shards: str | None = None):
        from elmforest.model.presets import build_run_config

        return build_run_config(
            self.preset, self.config, shards, self.init_from, self.trust_remote_code, self.overrides
        )


DEFAULT_TRAIN_ARGS = TrainArgs()  # the preset's defaults


def register(app: typer.Typer) -> None:
    verb(app, epilog=CONFIG_KEYS)(train)
    verb(app)(presets)


def train(
    out: Annotated[str, opt("run directory; an existing one is resumed", metavar="DIR")],
    shards: Annotated[str | None, opt("shards directory (sets data.shards)", metavar="DIR")] = None,
    nproc: Annotated[
        int,
        opt("data-parallel processes (torchrun; gloo on CPU, NCCL on GPUs); same global batch", positive_int),
    ] = 1,
    train_args: TrainArgs = DEFAULT_TRAIN_ARGS,
    no_progress: NoProgress = False,
) -> int:
    """Train (or resume) one LM run."""
    run_cfg = train_args.run_config(shards)  # a bad config is refused before any process starts
    run_cfg.check_pause()
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        if run_cfg.train.batch_size % nproc:
            raise UserError(
                f"train.batch_size={run_cfg.train.batch_size} must divide evenly among {nproc} processes"
            )
        from elmforest.utils.device import resolve_device
        from elmforest.utils.threads import cpu_cores

        if resolve_device(run_cfg.train.device).type == "cpu" and nproc > (cores := cpu_cores()):
            print(  # it runs, each process on a fraction of a core: slower than fewer processes
                f"warning: --nproc {nproc} on {cores} CPU core(s): the processes share cores and run slower "
                f"than --nproc {cores}",
                file=sys.stderr,
            )
        return _relaunch_distributed(nproc)
    from elmforest.train.trainer import train as train_run

    summary = train_run(run_cfg, out, progress=not no_progress)
    if not first_process():  # one line for the run, not one per process
        return 0
    if "stopped_at" in summary:  # train.stop_at: paused, resumable
        print(
            f"paused at step {summary['stopped_at']} of {run_cfg.train.steps} ({summary['tokens']:,} tokens) "
            f"-> {summary['checkpoint']}; run it again without train.stop_at to finish"
        )
        return 0
    print(
        f"done: {summary['steps']} steps, {summary['tokens']:,} tokens, {summary['flops']:.3e} FLOPs, "
        f"final loss {summary['final_loss']:.4f} -> {out}/model"
    )
    return 0


def presets() -> None:
    """List the model presets with their training defaults."""
    from elmforest.model.presets import PRESETS

    for p in PRESETS.values():
        t, o = p.train, p.optim
        experts = f", experts {p.expert_lr:g}" if p.expert_lr else ""
        print(
            f"{p.name:10s} d={p.hidden_size:<5d} layers={p.num_layers:<3d} heads={p.num_heads:<3d} "
            f"positions={p.architecture()['max_position_embeddings']:<5d} vocab={p.vocab_size:<6d} {p.description}\n"
            f"{'':11s}{p.parameters() / 1e6:,.1f}M parameters at this vocabulary"
            + (
                ""
                if p.tie_embeddings
                else f" (the untied head {p.vocab_size * p.hidden_size / 1e6:,.1f}M of them)"
            )
            + "\n"
            f"{'':11s}train: {t.steps} steps x batch {t.batch_size * t.grad_accum}"
            + (f" ({t.batch_size} x {t.grad_accum} accumulated)" if t.grad_accum > 1 else "")
            + f" x {t.seq_len} tokens, "
            f"LR {o.lr:g}{experts} ({o.schedule}, warmup {o.warmup_frac:g}), checkpoint every {t.ckpt_every}"
        )


# the command line as given, for re-running it under torchrun (set by elmforest.cli.main)
ARGV: list[str] = []


def _relaunch_distributed(nproc: int) -> int:
    """Run this same command under torchrun with `nproc` processes (the trainer reads its environment)."""
    from elmforest.utils.proc import run_stoppable, tied_to_this_process

    argv, skip = [], False
    for a in ARGV or sys.argv[1:]:  # main() records the command line; a direct call has sys.argv
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        argv.append(a)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "elmforest.cli",
        *argv,
    ]
    env = {**os.environ, "ELMFOREST_LAUNCHED_BY": str(os.getpid())}  # its ranks leave SIGTERM's line to it
    rc = run_stoppable(
        tied_to_this_process(cmd), env=env
    )  # torchrun dies with this process, its ranks with it
    if rc != 0:  # torchrun's own report is above; what to do next is not in it
        print(
            f"elmforest: torchrun exited with {rc} (a training process failed or was stopped; its output "
            "is above); the same command again resumes from the last checkpoint",
            file=sys.stderr,
        )
    return rc
