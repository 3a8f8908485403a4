"""The `elmforest` command: one verb per function, generated from the functions' typed signatures.

Each package's cli.py holds its verbs (data, cluster, train, eval, forest, merge, launch, study, clients); this module
puts them under one root and turns the project's errors into one line and exit status 2."""

from __future__ import annotations

import os
import signal
import sys
import threading

import typer

from elmforest.clients import lm_eval_cli, report_cli, serve_cli
from elmforest.cluster import cli as cluster_cli
from elmforest.data import cli as data_cli
from elmforest.eval import cli as eval_cli
from elmforest.forest import cli as forest_cli
from elmforest.launch import cli as launch_cli
from elmforest.merge import cli as merge_cli
from elmforest.study import cli as study_cli
from elmforest.train import cli as train_cli
from elmforest.utils.argtypes import group
from elmforest.utils.errors import ElmforestError
from elmforest.utils.threads import threads_within_quota


def build_app():
    app = group("Train language models as forests of independently trained expert LMs.")
    launch_cli.register(app)  # quickstart, sweep
    study_cli.register(app)  # study
    data_cli.register(app)  # corpus, tokenizer, shards
    train_cli.register(app)  # train, presets
    eval_cli.register(app)  # eval
    forest_cli.register(app)  # forest ..., generate
    merge_cli.register(app)  # merge moe|finetune|routing|flexolmo|flexolmo-pair
    cluster_cli.register(app)  # cluster fit|assign|languages
    lm_eval_cli.register(app)  # lm-eval (lm-evaluation-harness with --model elmforest)
    serve_cli.register(app)  # serve (an OpenAI-compatible HTTP API)
    report_cli.register(app)  # report (one self-contained HTML page)
    return app


def main(argv: list[str] | None = None) -> int:
    argv = [home_expanded(a) for a in (sys.argv[1:] if argv is None else argv)]
    train_cli.ARGV[:] = argv  # `train --nproc N` runs this same command again under torchrun
    threads_within_quota()  # before anything imports torch
    # our own bars report progress; HF's per-file bars are noise. Said by the environment, which
    # transformers reads when it is first imported, so that `--help` and usage errors never import it
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers.utils.logging" in sys.modules:  # imported already (main called in-process): told
        sys.modules["transformers.utils.logging"].disable_progress_bar()
    # SIGTERM (a scheduler, `kill`, a container stopping) unwinds like Ctrl-C: temporaries are removed
    # and trackers told, instead of the process vanishing mid-write
    main_thread = threading.current_thread() is threading.main_thread()
    _STOPPED_BY.clear()
    before = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        # the click command, built once (no pretty tracebacks to lose: the groups turn them off)
        cmd = typer.main.get_command(build_app())
        if twice := repeated_option(cmd, argv):
            print(f"elmforest: error: {twice} given more than once; it takes one value", file=sys.stderr)
            return 2
        cmd(args=argv, prog_name="elmforest")
    except SystemExit as e:  # the verb's status, a usage error (2) or --help (0)
        if _STOPPED_BY:  # SIGTERM's status, even when a library re-raised it as another SystemExit (Ray)
            return _STOPPED_BY[-1]
        if e.code == 130 and _interrupted(e):  # typer turns Ctrl-C into a silent exit 130
            print(f"elmforest: interrupted (Ctrl-C){_resumes_hint(argv)}", file=sys.stderr)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except (ElmforestError, OSError) as e:  # the project's own errors and the file system's, nothing else
        if os.environ.get("ELMFOREST_DEBUG"):
            raise
        print(f"elmforest: error: {error_line(e)}  (set ELMFOREST_DEBUG=1 for a traceback)", file=sys.stderr)
        return 2
    finally:
        if before is not None:  # None: the handler was not set from Python; ours stays
            signal.signal(signal.SIGTERM, before)
    return 0


def home_expanded(arg: str) -> str:
    """`--out=~/runs` with the home folder, as the shell gives `--out ~/runs`: a shell expands `~` only
    at a word's start, so the `=` form made a folder named `~` in the working directory."""
    name, eq, value = arg.partition("=")
    return f"{name}={os.path.expanduser(value)}" if arg.startswith("--") and eq and value[:1] == "~" else arg


def repeated_option(cmd, argv: list[str]) -> str | None:
    """The first single-valued option given twice (`--data A --data B`), which click would silently
    answer with the last value: a whole data source dropped without a word. `cmd`: the app's click
    command (typer carries its own copy of click: groups and options are told apart by what they have)."""
    i = 0
    while hasattr(cmd, "commands") and i < len(argv) and argv[i] in cmd.commands:
        cmd, i = cmd.commands[argv[i]], i + 1
    if hasattr(cmd, "commands"):
        return None
    given = [a.split("=", 1)[0] for a in argv[i:] if a.startswith("-")]
    for p in cmd.params:
        single = p.param_type_name == "option" and not (p.multiple or p.is_flag or p.count)
        if single and sum(a in p.opts for a in given) > 1:
            return "/".join(p.opts)
    return None


_STOPPED_BY: list[int] = []
RESUMABLE = {  # verbs that continue where they stopped when run again
    *("train", "sweep", "study", "quickstart", "merge finetune"),
    *("forest seed", "forest expert", "forest dense", "forest train"),
}


def _terminated(signum, frame):
    # said once: a second SIGTERM (a process group's, a supervisor's retry) only unwinds, and a
    # data-parallel rank (torchrun's worker) leaves it to the elmforest command that launched it (which
    # marks its ranks: LOCAL_RANK alone is set for a whole job by some launchers, which say nothing)
    if not _STOPPED_BY and "ELMFOREST_LAUNCHED_BY" not in os.environ:
        print(f"elmforest: terminated (SIGTERM){_resumes_hint(train_cli.ARGV)}", file=sys.stderr)
    _STOPPED_BY.append(128 + signum)
    raise SystemExit(128 + signum)


def _resumes_hint(argv: list[str]) -> str:
    resumes = " ".join(argv[:2]) in RESUMABLE or bool(argv[:1] and argv[0] in RESUMABLE)
    return "; the same command again continues from the last checkpoint" if resumes else ""


def _interrupted(e: BaseException) -> bool:
    """Whether a KeyboardInterrupt is among the exceptions that led to `e`."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def error_line(e: BaseException) -> str:
    """One line for a person: the project's message, or the path and reason of a file-system error."""
    if isinstance(e, OSError) and not isinstance(e, ElmforestError):
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
        return f"{where}: {e.strerror or e}" if where else str(e.strerror or e)
    return str(e).strip()


if __name__ == "__main__":
    raise SystemExit(main())
