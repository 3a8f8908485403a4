"""What elmforest checks in a forest it did not write: every name and path in the manifest, and every
file it copies in.

A forest, a manifest or a checkpoint may come from another data owner, so they are untrusted input.
A name read from forest.json obeys the same rules as one given on the command line, every path is
relative, free of `..`, and still inside the forest root once symbolic links are resolved, and a
checkpoint is taken in as regular files only, never as links to files elsewhere. Remote code is
never turned on by a file (config.py).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
from pathlib import Path, PurePosixPath

from elmforest.model.build import tied_head
from elmforest.utils.errors import UserError

# used by the lineage and by runs/dense, runs/dense-tuned (the dense run's second half: launch/jobs.py)
RESERVED_NAMES = {"seed", "dense", "dense-tuned", "external"}
NAME_RULE = "ASCII letters, digits, '.', '_' or '-', starting with a letter or digit, at most 100"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # NAME_RULE; names also become directory names


def valid_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UserError(f"expert name {name!r}: use {NAME_RULE}")
    if name in RESERVED_NAMES:
        raise UserError(f"expert name {name!r} is reserved ({', '.join(sorted(RESERVED_NAMES))})")
    return name


def case_twin(name: str, names) -> str | None:
    """Another of `names` that differs from `name` only in case: on macOS and Windows the two are one
    folder (an expert's, or an expert's run beside the reserved `runs/dense`)."""
    return next((n for n in names if n != name and n.casefold() == name.casefold()), None)


def count(v, what: str) -> int:
    """A token or FLOP count from a file someone else wrote: a finite, non-negative number."""
    if not _number(v):
        raise UserError(f"{what}: expected a non-negative number, got {v!r}")
    return int(v)


def check_weights(src: Path, refs: list[Path]) -> None:
    """An expert brought in from elsewhere has readable safetensors weights (headers parsed, bytes
    all there), with the tensor names and shapes of the forest: a config that matches says nothing
    about the weights beside it. `refs` are the forest's checkpoints of this shape, best first; the
    first one that reads cleanly is the reference, so a damaged expert already in the forest never
    refuses a sound newcomer (fsck reports that one). An output head tied to the embeddings may be
    saved or not, so it is not compared."""
    from elmforest.utils.errors import NotFound

    got = _shapes(src)
    for ref in refs:
        try:
            want = _shapes(ref)
        except (UserError, NotFound, OSError, ValueError, RuntimeError):
            continue
        if tied_head(src):
            got, want = (
                {k: v for k, v in d.items() if not k.endswith("lm_head.weight")} for d in (got, want)
            )
        if got != want:
            diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            raise UserError(
                f"{src}: its weights do not fit the forest's ({len(diff)} tensor(s) missing, extra, of "
                f"another shape or type, e.g. {diff[0]}: {got.get(diff[0])} vs {want.get(diff[0])})"
            )
        return


def check_finite(src: Path) -> None:
    """Every floating-point tensor of a checkpoint brought in from elsewhere is finite, read one tensor
    at a time: a NaN expert added silently breaks every ensemble, average and merge of the forest
    (the weights are read once more here; the forest's own runs are checked as they train)."""
    import torch
    from safetensors import safe_open

    from elmforest.model.build import weight_files
    from elmforest.utils.errors import NonFiniteWeights

    for f in sorted(set(weight_files(src).values())):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                t = t.float() if t.is_floating_point() and t.element_size() == 1 else t  # fp8: no isfinite
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise NonFiniteWeights(
                        f"{f}: tensor {k} holds non-finite values (NaN or inf): corrupt or diverged weights"
                    )


def _shapes(d: Path) -> dict:
    from safetensors import safe_open

    from elmforest.model.build import weight_files

    out = {}
    for f in sorted(set(weight_files(d).values())):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # shape, and whether floating point (bf16 beside fp32 is fine; int32 is not)
                s = h.get_slice(k)
                t = s.get_dtype()
                kind = "float" if t.startswith(("F", "BF")) else "integer" if t.startswith(("I", "U")) else t
                out[k] = (tuple(s.get_shape()), kind)
    return out


class ManifestError(UserError):
    """forest.json is malformed or names something outside the forest."""


def inside(root: Path, rel, what: str, manifest: Path) -> Path:
    """`root / rel` for a manifest path that is relative, has no `..`, and resolves inside `root`."""
    if not isinstance(rel, str) or not rel:
        raise ManifestError(f"{manifest}: {what} path {rel!r} is not a relative path")
    if not _plain_relative(rel):
        raise ManifestError(f"{manifest}: {what} path {rel!r} must be relative to the forest, without '..'")
    full = root / rel
    real_root = root.resolve()
    if real_root not in full.resolve().parents:
        raise ManifestError(
            f"{manifest}: {what} path {rel!r} resolves to {full.resolve()}, outside the forest {real_root}"
        )
    return full


def _plain_relative(rel) -> bool:
    """A relative path without `..` (not resolved: a link in it is judged where it is followed)."""
    if not isinstance(rel, str) or not rel or "\\" in rel:
        return False
    p = PurePosixPath(rel)
    return not p.is_absolute() and not any(x in ("..", ".") for x in p.parts)


def _number(v) -> bool:
    """A count or weight as elmforest writes it: a finite number >= 0 (JSON's Infinity in a hand-edited
    manifest would make every compute ratio of the forest inf)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf")


def _counts(row: dict, who: str, bad) -> None:
    if not (_number(row.get("tokens", 0)) and _number(row.get("flops", 0))):
        bad(f"{who}: 'tokens' and 'flops' must be non-negative numbers")


def check_manifest(data, root: Path, path: Path) -> dict:
    """Refuse a manifest whose structure, names or paths are not what elmforest writes."""

    def bad(msg: str):
        raise ManifestError(f"{path}: {msg}; the manifest is corrupt or was not written by elmforest")

    if not isinstance(data, dict):
        bad(f"expected a JSON object, got {type(data).__name__}")
    if not isinstance(data.get("experts"), list):
        bad("'experts' must be a list")
    seen = set()
    for i, e in enumerate(data["experts"]):
        if not isinstance(e, dict):
            bad(f"experts[{i}] is not an object")
        try:
            valid_name(e.get("name"))
        except UserError as err:
            raise ManifestError(f"{path}: experts[{i}]: {err}") from None
        if e["name"] in seen:
            bad(f"expert {e['name']!r} appears twice")
        seen.add(e["name"])
        inside(root, e.get("path"), f"expert {e['name']!r}", path)
        run = e.get("run")  # read and deleted from (forest/kept.py, which resolves it there)
        if run is not None and not _plain_relative(run):
            bad(f"expert {e['name']!r}: its run path {run!r} must be relative to the forest, without '..'")
        files = e.get("files") or {}
        if not isinstance(files, dict) or not all(
            isinstance(k, str)
            and k not in ("", ".", "..")
            and "/" not in k
            and "\\" not in k
            and isinstance(v, dict)
            and _number(v.get("bytes"))
            and isinstance(v.get("sha256"), str)
            for k, v in files.items()
        ):
            bad(f"expert {e['name']!r}: 'files' must map plain file names to {{bytes, sha256}}")
        if not (isinstance(e.get("domains"), list) and all(isinstance(d, str) for d in e["domains"])):
            bad(f"expert {e['name']!r}: 'domains' must be a list of strings")
        _counts(e, f"expert {e['name']!r}", bad)
        parents = e.get("parents", [])
        if not isinstance(parents, list) or not all(
            isinstance(p, dict) and isinstance(p.get("name"), str) and _number(p.get("weight"))
            for p in parents
        ):
            bad(f"expert {e['name']!r}: 'parents' must be a list of {{name, weight}}")
    for key in ("seed", "clusterer"):
        v = data.get(key)
        if v is None:
            continue
        if not isinstance(v, dict):
            bad(f"'{key}' must be an object or null")
        inside(root, v.get("path"), key, path)
    seed = data.get("seed")
    if seed:
        _counts(seed, "seed", bad)
    if seed and "config" in seed:
        from elmforest.config import RunConfig

        try:
            RunConfig.from_dict(seed["config"])
        except UserError as err:
            raise ManifestError(f"{path}: seed.config: {err}") from None
    removed = data.get("removed", [])
    if not isinstance(removed, list) or not all(isinstance(r, dict) for r in removed):
        bad("'removed' must be a list of objects")
    for r in removed:
        try:
            valid_name(r.get("name"))
        except UserError as err:
            raise ManifestError(f"{path}: removed: {err}") from None
    for key in ("ledger", "outputs"):
        v = data.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
            bad(f"'{key}' must be a list of objects")
    for row in data.get("ledger", []):
        _counts(row, f"ledger row {row.get('name')!r}", bad)
    for o in data.get("outputs", []):
        if not (isinstance(o.get("path"), str) and isinstance(o.get("experts"), list)):
            bad("each of 'outputs' needs a path and the experts it holds")
        if not isinstance(o.get("relative", ""), str):
            bad("an output's 'relative' (its place from the forest) must be a path")
    if "plan" in data and not isinstance(data["plan"], dict):
        bad("'plan' must be an object")
    return data


# files that hold pickles by convention (torch.save, training_args.bin, sklearn/joblib dumps)
PICKLED = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")


def copy_regular_files(src: Path, dst: Path, link: bool = False) -> None:
    """Copy the regular files directly inside `src` into the existing directory `dst`.

    A symbolic link, device or pipe is refused by name: following a link would pull a file from
    outside the checkpoint (a key, another owner's weights) into the forest. Sub-directories are
    skipped with a note (HF checkpoints are flat). `link` hard-links instead of copying (only for
    files the forest owns: a user's checkpoint may be overwritten later), where this user owns the
    file (another's stays theirs to change or chmod) and the file system allows."""
    for f in sorted(src.iterdir()):
        st = f.lstat()
        if stat.S_ISLNK(st.st_mode):
            raise UserError(
                f"{f}: a symbolic link (to {os.readlink(f)}); elmforest takes in regular files only, never "
                "what a link points to; replace it by a copy of the file if you trust it"
            )
        if stat.S_ISDIR(st.st_mode):
            print(
                f"note: skipped the folder {f} (a checkpoint's files sit at its top level)", file=sys.stderr
            )
            continue
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{f}: not a regular file; elmforest takes in regular files only")
        if f.suffix.lower() in PICKLED:
            # never read here (weights come from safetensors), but a tool given the forest may unpickle it
            print(f"note: skipped {f} (pickled; elmforest keeps safetensors only)", file=sys.stderr)
            continue
        if link and st.st_uid == os.getuid():  # another user's file would stay theirs to change
            try:
                os.link(f, dst / f.name, follow_symlinks=False)
                continue
            except OSError:
                pass
        shutil.copy2(f, dst / f.name, follow_symlinks=False)


def refuse_inside_forest(out: str | Path) -> None:
    """A merged or averaged model is written outside every forest: inside one it lands among the
    checkpoints the manifest owns (an expert's or the seed's folder, or a stray folder fsck flags)."""
    out = Path(out).resolve()
    for d in (out, *out.parents):
        if (d / "forest.json").is_file():
            raise UserError(
                f"{out} is inside the forest {d}; write merged and averaged models outside it (its folders "
                "hold only the checkpoints its manifest owns)"
            )
