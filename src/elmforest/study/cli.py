"""`elmforest study CONFIG`: each verb is its signature (see utils/argtypes.py); the work is in study/."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from elmforest.study.config import STUDY_PRESETS
from elmforest.train.cli import NoProgress
from elmforest.utils.argtypes import arg, flag, nonneg_float, opt, positive_float, verb


def register(app: typer.Typer) -> None:
    verb(app)(study)


def study(
    config: Annotated[
        str,
        arg(
            f"a study config (YAML or JSON) or a preset: {', '.join(STUDY_PRESETS)}",
            metavar="CONFIG",
        ),
    ],
    out: Annotated[str, opt("study directory; an existing one is resumed", metavar="DIR")] = "study",
    overrides: Annotated[
        list[str] | None,
        opt(
            "override a study config field, e.g. --set seeds=[0,1,2] (repeatable)",
            name="--set",
            metavar="KEY=VALUE",
        ),
    ] = None,
    executor: Annotated[Literal["local", "ray"], opt("where the runs train")] = "local",
    address: Annotated[
        str | None, opt("Ray cluster address (default: start a local Ray instance)", metavar="ADDR")
    ] = None,
    cpus_per_job: Annotated[float | None, opt("Ray: CPUs per run (default 1)", positive_float)] = None,
    gpus_per_job: Annotated[float, opt("Ray: GPUs per run", nonneg_float)] = 0.0,
    analyse_only: Annotated[
        bool,
        flag(
            "--analyse-only",
            "recompute the fits, findings and report from study.json; train and score nothing",
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        flag(
            "--dry-run",
            "check the config and print what the study would train (D units, tokens, FLOPs, GPU-hours); run nothing",
        ),
    ] = False,
    no_progress: NoProgress = False,
) -> None:
    """The forest's compute multiplier (with confidence intervals) and the papers' scaling claims, measured
    on your corpus: dense and forest arms at several budgets and seeds, fitted curves, a report."""
    if dry_run:
        from elmforest.study.cost import dry_run as plan_only

        plan_only(config, overrides or [])
        return
    from elmforest.study.study import run_study

    run_study(
        config,
        out,
        overrides or [],
        executor=executor,
        address=address,
        cpus_per_job=cpus_per_job,
        gpus_per_job=gpus_per_job,
        progress=not no_progress,
        analyse_only=analyse_only,
    )
