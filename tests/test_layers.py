"""Dependencies run one way (docs/design.md, "Dependencies"): a module imports only from its own layer
or lower ones, function-level imports included, so no import cycle can grow between layers."""

from __future__ import annotations

import ast
from pathlib import Path

import elmforest

LAYERS = [
    {"utils"},
    {"config"},
    {"model", "data", "corpora"},
    {"eval", "train", "cluster"},
    {"forest", "merge"},
    {"launch", "clients"},  # clients: lm-eval, the HTTP server, the run report
    # and every package's cli.py: argument parsing only
    {"cli", "console", "quickstart", "quickstart_arms", "quickstart_lines", "compare", "study", "xelm"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _layer(module: str) -> int:
    parts = module.split(".")
    if parts[-1] == "cli" or len(parts) < 2:
        return RANK["cli"]
    return RANK[parts[1]]


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("elmforest."):
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("elmforest.")]
    return out


def test_every_import_goes_down_or_sideways():
    root = Path(elmforest.__file__).parent
    upward = []
    for f in sorted(root.rglob("*.py")):
        parts = f.relative_to(root).with_suffix("").parts
        module = ".".join(("elmforest", *parts)).removesuffix(".__init__")
        if module == "elmforest":
            continue
        for target in _imports(f):
            if _layer(target) > _layer(module):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import():
    assert _layer("elmforest.launch.jobs") > _layer("elmforest.forest.btm")  # the cut cycle's direction
    assert _layer("elmforest.forest.cli") == RANK["cli"]
