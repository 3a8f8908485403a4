"""A forest scored on raw text or on a shards directory given by path: raw JSONL/Parquet/txt is
split by the id hash at fractions inside what every expert held out, tokenized with the forest's
tokenizer, then scored as shards are (forest/evaluate.py). Apart from it so that module is the
mixture's scoring alone."""

from __future__ import annotations

import sys
from pathlib import Path

from elmforest.data.shards import Shards
from elmforest.data.splits import SplitSpec
from elmforest.data.tokenizer import load_tokenizer
from elmforest.eval.bpb import check_seq_len, default_seq_len, raw_as_shards, read_from_raw
from elmforest.eval.held_out import check_held_out, training_split_spec
from elmforest.forest.evaluate import evaluate_forest_shards
from elmforest.forest.manifest import Forest
from elmforest.forest.pool import check_intact
from elmforest.utils.errors import UserError


def held_out_by_all(expert_dirs: list[Path], given: SplitSpec | None) -> SplitSpec:
    """The fractions raw data is split at for a forest: `given` (--split-fractions), else the experts'
    own when they agree, else the test fraction none exceeds and the valid fraction that keeps valid +
    test inside what every one held out (the hash puts test first, then valid): no test document was
    any model's valid or training document. Models of unknown training data (from elsewhere) do not
    choose."""
    if given is not None:
        return given
    known = [
        d
        for d in expert_dirs
        if (d / "elmforest_data.json").is_file() or (d / "elmforest_run.json").is_file()
    ]
    specs = [training_split_spec(d) for d in known] or [SplitSpec()]
    if len(set(specs)) == 1:
        return specs[0]
    test = min(sp.test_frac for sp in specs)
    spec = SplitSpec(max(0.0, round(min(sp.valid_frac + sp.test_frac for sp in specs) - test, 12)), test)
    print(
        f"note: the models were trained on shards split at different fractions; the data is split at "
        f"valid {spec.valid_frac:g}, test {spec.test_frac:g}, inside what each held out",
        file=sys.stderr,
    )
    return spec


def evaluate_forest(
    forest_dir: str | Path,
    data: str | Path,
    split: str | None = None,
    split_spec: SplitSpec | None = None,
    **kw,
) -> dict:
    """Evaluate on a shards dir (its tokenizer must be the forest's) or on raw JSONL/Parquet/txt data.

    The split is `test` by default, as for single models. Raw data is split by the id hash with the
    fractions of the experts' training shards; its domains' own valid documents give the cached prior
    (a domain with none gets the uniform prior: out-of-domain data from a user). `all` scores every
    document and needs `prior="uniform"` (there is nothing held out to estimate a prior on).
    """
    forest = Forest.load(forest_dir)
    if not forest.names:
        raise UserError(f"{forest_dir}: the forest has no experts")
    chosen = kw.get("experts")  # and the first expert, whose config gives the defaults
    check_intact(forest, list(dict.fromkeys([forest.names[0], *chosen])) if chosen else None)
    first = forest.expert_dir(forest.names[0])
    kw["seq_len"] = kw.get("seq_len") or default_seq_len(first)
    for name in kw.get("experts") or forest.names:  # before raw data is tokenized
        check_seq_len(forest.expert_dir(name), kw["seq_len"])
    split = split or "test"
    if split not in ("train", "valid", "test", "all"):
        raise UserError(f"split must be train, valid, test or all, got {split!r}")
    # each expert's held-out documents (experts may come from shards of their own)
    forest_dirs = [forest.expert_dir(n) for n in kw.get("experts") or forest.names]
    if (
        forest.seed_dir is not None and (forest.seed_dir / "elmforest_data.json").is_file()
    ):  # the experts' start trained on its documents
        forest_dirs.append(forest.seed_dir)
    needs_prior = kw.get("prior", "cached") == "cached" and kw.get("mode", "ensemble") != "cluster"
    if Shards.is_shards_dir(data):
        if split == "all":
            raise UserError("--split all needs raw data (a shards directory keeps its splits apart)")
        if split_spec is not None:  # its splits are fixed: the option would be ignored
            raise UserError(
                f"{data} is a shards directory, split when it was built: --split-fractions applies to raw data"
            )
        sh = Shards(data)
        for d in forest_dirs:
            spec = SplitSpec(**sh.index["split"])
            check_held_out(d, sh.index.get("source"), spec, split, data, prior=needs_prior)
        res = evaluate_forest_shards(forest, sh, split=split, **kw)
    else:
        if split == "all" and needs_prior:
            raise UserError(
                "--split all scores every document, so no held-out data is left to estimate the cached "
                "prior on: pass --prior uniform, or evaluate the test split"
            )
        prior_split = kw.get("prior_split", "valid")
        spec = SplitSpec(0.0, 0.0) if split == "all" else held_out_by_all(forest_dirs, split_spec)
        if needs_prior and split != "all" and spec.valid_frac == 0 and prior_split == "valid":
            raise UserError(
                f"split at valid 0, test {spec.test_frac:g}, the data has no valid documents to read the cached "
                "prior on: pass --prior uniform, or --split-fractions with a valid fraction"
            )
        for d in forest_dirs:
            check_held_out(d, data, spec, split, data, given=split_spec is not None, prior=needs_prior)
        also = (prior_split,) if needs_prior else ()
        with raw_as_shards(data, load_tokenizer(first), spec, split, also) as (shards, stored):
            res = read_from_raw(
                evaluate_forest_shards(forest, shards, split=stored, where=str(data), **kw), shards, spec
            )
        res["split"] = split
    res["forest"] = str(forest_dir)
    res["data"] = str(data)
    return res
