"""Which documents a model held out, so that `eval` never scores one it trained or was tuned on as
held out: the split fractions its shards were built with (raw data is split again at those), and the
model's own training corpus recognised wherever it is read from (its location and reading format here;
its text, when a copy of it sits elsewhere: eval/leakage.py).

Apart from eval/bpb.py, which scores the documents these checks let through.
"""

from __future__ import annotations

from pathlib import Path

from elmforest.data.shards import Shards
from elmforest.data.splits import SplitSpec
from elmforest.utils.errors import UserError
from elmforest.utils.io import read_json


def training_split_spec(mdir: Path, given: SplitSpec | None = None) -> SplitSpec:
    """The split fractions of the model's training shards, so raw-data `test` means the documents it
    never trained on: `given` (--split-fractions) first, then the model's elmforest_data.json, then its
    training shards (models saved before that file). An elmforest model whose shards are gone is an
    error rather than a guess (default fractions could put its training documents in `test`); a
    checkpoint from elsewhere, whose training data elmforest cannot know, takes the defaults."""
    if given is not None:
        return given
    if (mdir / "elmforest_data.json").is_file():
        return _training_record(mdir)[1]
    run_cfg = mdir / "elmforest_run.json"
    if not run_cfg.is_file():
        return SplitSpec()
    try:
        shards = read_json(run_cfg)["data"]["shards"]
    except (KeyError, TypeError) as e:
        raise UserError(f"{run_cfg}: not a run config naming its shards ({e!r})") from None
    if shards and Shards.is_shards_dir(shards):
        return SplitSpec(**Shards(shards).index["split"])
    raise UserError(
        f"{mdir}: its training shards {shards or '(none recorded)'} are gone, so which documents it held out "
        "is unknown; pass --split-fractions VALID,TEST (the --valid-frac and --test-frac they were built with)"
    )


def _training_record(mdir: Path) -> tuple[dict, SplitSpec]:
    """The model's elmforest_data.json and its split, or a UserError naming it: a file that came with a
    contributed checkpoint is checked, not trusted."""
    record = mdir / "elmforest_data.json"
    try:
        rec = read_json(record)
        return rec, SplitSpec(**rec["split"])
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{record}: not a record of the training shards and their split ({e!r})") from None


def check_held_out(
    mdir: Path, source, spec: SplitSpec, split: str, data, given: bool = False, prior: bool = False
) -> None:
    """Refuse scoring documents the model trained or was tuned on as held out. Data read from the
    model's own training corpus (the same location, a file or folder inside it, or a folder holding
    it) is split by the id hash, which puts test first, then valid: the scored test split must lie
    inside the model's test split (its valid documents chose LRs, branch weights and priors), and the
    valid split read (`split` valid, or `prior` for a forest's prior) inside what it held out. Read
    in another format than the model's (`text:` lines vs whole files, a builder vs the native reader),
    or `.txt` documents from another folder (named by their path under the folder given), documents
    get other ids, so other splits: refused too. Other corpora, and models whose training corpus is
    unknown, pass. `given`: the fractions are the command line's --split-fractions (said in the advice)."""
    if split in ("train", "all") or not (mdir / "elmforest_data.json").is_file():
        return
    rec, held = _training_record(mdir)
    trained = Path(str(rec.get("shards", ""))) / "index.json"
    if not trained.is_file() or not source:
        return
    out = held.valid_frac + held.test_frac  # the model held out the documents hashed below this
    mine = False  # read from the model's own corpus: judged by its location, else by its text
    for t, t_fmt in _locations(read_json(trained).get("source")):
        for e, e_fmt in _locations(source):
            if not (t == e or t.is_relative_to(e) or e.is_relative_to(t)):
                continue
            mine = True
            inner = t if t.is_relative_to(e) else e
            if t_fmt != e_fmt:
                raise UserError(
                    f"{data}: read as {e_fmt or 'a plain path'}, but {mdir} was trained on {t} read as "
                    f"{t_fmt or 'a plain path'}: its documents get other ids, so other splits, and some of "
                    f"the {split} documents were training documents; read it as the model's shards did"
                )
            if t != e and _has_txt(inner):
                raise UserError(
                    f"{data}: {inner} holds .txt documents of {mdir}'s training corpus ({t}), which are "
                    f"named by their path under the folder given: read from {e} they get other names, so "
                    f"other splits, and some of its {split} documents were training documents; pass --data "
                    f"{t} (with --domains to choose)"
                )
            bad = []
            if split == "test" and spec.test_frac > held.test_frac + 1e-12:
                bad.append(
                    f"its test split reaches {spec.test_frac:g} of the id hash, past the model's {held.test_frac:g}"
                )
            if (split == "valid" or prior) and spec.test_frac + spec.valid_frac > out + 1e-12:
                bad.append(
                    f"its valid split reaches {spec.test_frac + spec.valid_frac:g}, past the {out:g} the model "
                    "held out"
                )
            if not bad:
                continue
            raise UserError(
                f"{data}: split at valid {spec.valid_frac}, test {spec.test_frac}, it is cut from {mdir}'s own "
                f"training corpus ({t}), split for it at valid {held.valid_frac}, test {held.test_frac}: "
                f"{'; '.join(bad)}, so some of the documents read were trained or tuned on; "
                + (
                    "give --split-fractions inside the model's (e.g. "
                    f"{held.valid_frac},{held.test_frac}) or leave them out"
                    if given
                    else f"build the shards with --valid-frac {held.valid_frac} --test-frac {held.test_frac}"
                )
            )
    if not mine:  # a copy of it elsewhere, in another format, has other ids (eval/leakage.py)
        from elmforest.eval.leakage import check_same_text

        check_same_text(mdir, trained, held, source, spec, split, data, prior)


def _locations(source) -> list[tuple[Path, str | None]]:
    """(resolved location, format) of a source or of each source shards built from several record; a
    plain path reads as `auto`; a glob stands for the folder above its first wildcard."""
    import glob

    from elmforest.data.sources import parse_source

    locs = []
    for x in source if isinstance(source, list) else [source]:
        if not x:
            continue
        try:
            src = parse_source(str(x))
            loc, fmt = src.location, (src.format or "auto")
        except UserError:
            loc, fmt = str(x), "auto"
        if glob.has_magic(loc):
            parts = Path(loc).parts
            loc = str(Path(*parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]))
        locs.append((Path(loc).resolve(), None if fmt == "auto" else fmt))
    return locs


def _has_txt(p: Path) -> bool:  # not cached by path: the folder may gain .txt files in one process
    if p.is_file():
        return p.suffix == ".txt"
    return p.is_dir() and any(True for _ in p.rglob("*.txt"))
