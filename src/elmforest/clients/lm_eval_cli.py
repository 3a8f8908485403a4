"""`elmforest lm-eval ARGS...`: lm-evaluation-harness's own command with the `elmforest` model type
registered first (lm-eval has no plugin entry points, so its `lm_eval` command cannot find it).

lm-eval's standard tasks name a Hugging Face Hub dataset. On a machine without a network the Hub
client retries each request with back-off (about 25 s) before the "Couldn't reach" error. So when the Hub's host does not
answer a connection (3 s) and the user has set neither `HF_*_OFFLINE` variable nor a proxy, the run
is made offline and says so: cached and local tasks run as before, a Hub task fails at once."""

from __future__ import annotations

import os
import socket
import sys
from typing import Annotated
from urllib.parse import urlsplit

import typer

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")


HELP_PREAMBLE = """elmforest lm-eval: lm-evaluation-harness with the `elmforest` model type registered.
  elmforest lm-eval run --model elmforest --model_args forest=DIR[,mode=ensemble|topk|cluster|average,k=2,
      prior=uniform|cached,prior_data=SHARDS,weighting=posterior|fixed,experts=A+B] --tasks TASK
  (or model=DIR for one checkpoint; every model_arg in docs/lm-eval.md). lm-eval's own help follows.
"""


def register(app: typer.Typer) -> None:
    app.command(
        "lm-eval",
        # --help too goes to lm-eval: `elmforest lm-eval run --help` shows lm-eval's options
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    )(lm_eval_)


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be reached ("host:port: error"), or None when it answers or when the user
    has said how to reach it (an `HF_*_OFFLINE` variable set either way, or a proxy: not guessed)."""
    if any(v in os.environ for v in (*OFFLINE_VARS, *PROXY_VARS)):
        return None
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port}: {e}"
    return None


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
    args = list(args or [])
    if not args or (args[0] in ("-h", "--help", "run") and {"-h", "--help"} & set(args)):  # lm-eval's own
        # help (its top level, `run`'s) never names our model type
        print(HELP_PREAMBLE)
    saved = {v: os.environ.get(v) for v in (*OFFLINE_VARS, "DISABLE_MULTIPROC")}
    # lm-eval bootstraps each metric's stderr in a pool forked from this process, which holds torch's
    # threads: a fork taken while one holds a lock never returns (a test run hung there). Unless the
    # user set it, the same seeded replicates are drawn in this process instead.
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    why = hub_unreachable() if any(a == "--tasks" or a.startswith("--tasks=") for a in args) else None
    if why:
        print(
            f"note: the Hugging Face Hub does not answer ({why}), so lm-eval runs offline: a Hub task needs "
            "its dataset in the local cache, local tasks (--include_path) run as usual; set "
            "HF_HUB_OFFLINE=0 to try the network anyway",
            file=sys.stderr,
        )
        os.environ.update(dict.fromkeys(OFFLINE_VARS, "1"))  # read when the Hub clients are imported
    # huggingface_hub reads its variable once, at import, and the CLI has imported it (transformers)
    hub = sys.modules.get("huggingface_hub.constants")
    hub_was = getattr(hub, "HF_HUB_OFFLINE", None)
    if why and hub is not None:
        hub.HF_HUB_OFFLINE = True
    argv = sys.argv
    try:
        from lm_eval.__main__ import cli_evaluate

        import elmforest.clients.lm_eval  # noqa: F401 - registers the model type

        sys.argv = ["lm_eval", *args]
        cli_evaluate()
    finally:
        sys.argv = argv
        if hub is not None:
            hub.HF_HUB_OFFLINE = hub_was
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old
