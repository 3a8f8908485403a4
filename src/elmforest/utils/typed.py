"""A dataclass tree from parsed JSON/YAML with exact types: unknown keys named with their path, no bool
taken for an int, YAML 1.1's `1e-3` (a string to it) read as the number it means. Hand-written: the
libraries that do this (pydantic, cattrs) would be a dependency for these ~60 lines, with errors worded
by their own conventions instead of the dotted path the user typed (`config.train.steps: ...`).
Also the typing a command line's parser does for its user, for Python callers (`check_call_args`) and
for lists given as text (`split_list`)."""

from __future__ import annotations

import dataclasses
import re
import types
import typing

from elmforest.utils.errors import UserError


def from_dict(cls, d: dict, where: str = ""):
    if not isinstance(d, dict):
        raise UserError(f"config{where}: expected an object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise UserError(f"config{where}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        t = hints[k]
        kwargs[k] = (
            from_dict(t, v, f"{where}.{k}") if dataclasses.is_dataclass(t) else _coerce(t, v, f"{where}.{k}")
        )
    return cls(**kwargs)


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _short(v) -> str:
    """A value as an error shows it, bounded: a YAML list of aliases printed whole is billions of items."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlevel = 120, 120, 3
    return r.repr(v)


def _coerce(t, v, where: str):
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        if v is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, v, where)
            except (TypeError, ValueError):
                continue
        raise UserError(f"config{where}: {_short(v)} does not fit {t}")
    if origin is list:
        if not isinstance(v, list):
            raise UserError(f"config{where}: expected a list, got {_short(v)}")
        (a,) = typing.get_args(t)
        return [_coerce(a, x, where) for x in v]
    if t is bool:
        if isinstance(v, bool):
            return v
        raise UserError(f"config{where}: expected true/false, got {_short(v)}")
    if t is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        raise UserError(f"config{where}: expected an integer, got {_short(v)}")
    if t is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                return float(v)
            except OverflowError:  # an integer past any float: said as validate says of huge floats
                raise UserError(f"config{where}: {str(v)[:12]}...: too large for a number") from None
        if isinstance(v, str) and _NUMBER.fullmatch(v.strip()):  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(v)
        raise UserError(f"config{where}: expected a number, got {_short(v)}")
    if t is str:
        if isinstance(v, str):
            return v
        raise UserError(f"config{where}: expected a string, got {_short(v)}")
    return v


def check_call_args(where: str, ints: dict | None = None, lists: dict | None = None) -> None:
    """What the CLI's parser types for its user, checked for a Python caller: an integer given as a
    string, a float or a bool (`ints`), and one string or path where a list belongs (`lists`; None
    allowed): iterated, a string is a list of its characters, each taken for a name."""
    import operator
    from pathlib import PurePath

    for name, v in (ints or {}).items():
        try:
            if isinstance(v, bool):
                raise TypeError
            operator.index(v)
        except TypeError:
            raise UserError(f"{where}: {name} must be an integer, got {v!r}") from None
    for name, v in (lists or {}).items():
        if isinstance(v, str | bytes | PurePath | int | float):  # (one number: iterated, a TypeError)
            raise UserError(
                f"{where}: {name} must be a list, got one {type(v).__name__} ({v!r}); give [{v!r}]"
            )


def split_list(s: str | None, flag: str, required: bool = False) -> list[str] | None:
    """A comma-separated command-line list `flag` (None when not given); a quoted item keeps its commas
    (`--domains "'a,b',legal"`: a domain named `a,b`, and legal). Given with no item (`--domains ","`
    or `""`, a slip of quoting or of a script) it is refused: taken as not given, it silently meant
    the default (every domain: a subset's evaluation became the whole one's)."""
    if s is None:
        return None
    items = split_quoted(s)
    if not items:
        then = "give at least one item" if required else "leave it out for the default"
        raise UserError(f"{flag} is empty ({s!r}); {then}")
    return items


def split_quoted(s: str) -> list[str]:
    """Comma-separated items, blanks dropped, each stripped; an item in single or double quotes, the
    closing quote followed by a comma or the end, is taken whole and as written, commas and apostrophes
    and all (`'o'reilly', 'a,b'`). A quote that closes nowhere is text like any other. Hand-written:
    csv takes one quote character, shlex splits on spaces."""
    import re

    items, i, n = [], 0, len(s)
    while i <= n:
        while i < n and s[i].isspace():
            i += 1
        if i < n and s[i] in "'\"":
            if m := re.compile(re.escape(s[i]) + r"\s*(,|$)").search(s, i + 1):
                items.append(s[i + 1 : m.start()])
                i = m.end() if m.group(1) else n + 1
                continue
        j = s.find(",", i)
        items.append(s[i : j if j >= 0 else n].strip())
        i = j + 1 if j >= 0 else n + 1
    return [x for x in items if x]


def expert_selection(experts, where: str) -> list[str] | None:
    """A caller's subset of experts as a list, or None (every expert): one string (iterated, its letters
    taken for names), an empty list (meant as all of them, silently) and a name given twice (counted
    twice in a mixture) are refused here for every entry point alike."""
    if experts is None:
        return None
    check_call_args(where, lists={"experts": experts})
    experts = list(experts)
    if not experts:
        raise UserError(
            f"{where}: experts is an empty list; name the experts to use, or leave it out for all"
        )
    if dupes := sorted({n for n in experts if experts.count(n) > 1}):
        raise UserError(f"experts named more than once: {', '.join(map(str, dupes))}")
    return experts
