"""The `elmforest` console script. Ctrl-C while the CLI's modules import, or before `cli.main` has set
up its handling, printed a Python traceback; here it is the one line and status 130 that Ctrl-C gives
anywhere else. Apart from cli.py because importing that is the window to cover."""

from __future__ import annotations

import sys


def entry() -> int:
    try:
        from elmforest.cli import main

        return main()
    except KeyboardInterrupt:  # typer turns Ctrl-C inside a verb into exit 130 itself; this is the rest
        print("elmforest: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
