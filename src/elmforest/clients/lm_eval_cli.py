"""`elmforest lm-eval ARGS...`: lm-evaluation-harness's own command with the `elmforest` model type
registered first (lm-eval has no plugin entry points, so its `lm_eval` command cannot find it)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command(
        "lm-eval",
        # --help too goes to lm-eval: `elmforest lm-eval run --help` shows lm-eval's options
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    )(lm_eval_)


def lm_eval_(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="lm-eval's own arguments, e.g. run --model elmforest --model_args forest=DIR,mode=topk,k=2 "
            "--tasks TASK --include_path DIR (`elmforest lm-eval run --help` shows lm-eval's options)",
            metavar="ARGS...",
        ),
    ] = None,
) -> None:
    """Evaluate a forest with lm-evaluation-harness: `--model elmforest` (needs `pip install -e ".[eval]"`)."""
    from lm_eval.__main__ import cli_evaluate

    import elmforest.clients.lm_eval  # noqa: F401 - registers the model type

    argv = sys.argv
    sys.argv = ["lm_eval", *(args or [])]
    try:
        cli_evaluate()
    finally:
        sys.argv = argv
