"""YAML files read safely: a key given twice refused with its line, alias bombs and unparseable values
one-line errors naming the file (utils/io.read_json's rules, for the study's config files)."""

from __future__ import annotations

import os
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from elmforest.utils.errors import UserError
from elmforest.utils.io import parse_errors


def read_yaml(path: str | os.PathLike) -> Any:
    """A YAML (or JSON) file's contents, a key given twice in one mapping refused with its line: PyYAML
    keeps the last one silently, so a config that sets a field twice would run with one of them."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node):
        seen = set()
        for key_node, _ in node.value:  # the keys as written: a `<<` merge's may be overridden
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # construct_mapping refuses it with yaml's own message
            if key in seen:
                line = key_node.start_mark.line + 1
                raise UserError(f"{path}: key {key!r} is given twice in one mapping (again at line {line})")
            seen.add(key)
        loader.flatten_mapping(node)
        return loader.construct_mapping(node, deep=True)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    with parse_errors(path, "YAML/JSON"):
        try:
            loaded = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as e:  # one line: PyYAML's own text quotes the source over several
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UserError(f"{path}: not valid YAML/JSON ({what}{at})") from None
    return _bounded(loaded, path)


def _bounded(obj: Any, path, limit: int = 1_000_000) -> Any:
    """`obj`, refused once walking it passes `limit` values: YAML aliases share one object, so a
    300-byte file of nested aliases expands to billions of values when anything walks or prints it."""
    stack, seen = [obj], 0
    while stack:
        x = stack.pop()
        seen += 1
        if seen > limit:
            raise UserError(f"{path}: holds more than {limit:,} values once its aliases are expanded")
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return obj
