"""What the `forest` verbs do beyond parsing: opt-out reports, fsck, the experts' config of a checkpoint
seed, explicit averaging weights."""

from __future__ import annotations

import sys
from pathlib import Path

from elmforest.config import PRIOR_BATCHES
from elmforest.forest.trust import refuse_inside_forest
from elmforest.utils.errors import UserError


def remove(forest, name: str) -> None:
    rep = forest.remove(name)
    unverified = rep.get("unverified") or []
    print(
        f"removed expert {name}: deleted {len(rep['deleted'])} location(s) and verified none is left"
        + (f" where the forest records them (but {len(unverified)}, below)" if unverified else "")
        + f"; {len(forest.names)} expert(s) remain"
    )
    for p in rep["deleted"]:
        print(f"  deleted {p}")
    for u in unverified:
        print(
            f"warning: {u['path']}, recorded as holding {name}'s weights, was not checked: {u['why']}; delete "
            "any copy that still holds them yourself (kept in the manifest's `removed` entry as `unverified`)",
            file=sys.stderr,
        )
    if rep["derived"]:
        print(
            f"note: expert(s) {', '.join(rep['derived'])} were branched from {name} (or are its copies) and carry what it learned; "
            "remove them too if the opt-out covers derived models"
        )
    for p in rep.get("derived_runs", []):
        print(
            f"note: {p} (a run not yet an expert, cut or still training) began from {name}'s weights and its "
            "checkpoints carry what it learned: delete it if the opt-out covers derived models"
        )
    for p, made_by in rep.get("other_forests", []):
        if made_by is None:  # a problem that keeps the removal pending, said there
            continue
        print(
            f"note: {p} holds {name}'s weights but was made from the forest at {made_by}, not this one (this "
            f"forest is a copy of it?): left alone; opt {name} out of that forest too if the opt-out covers it"
        )
    if rep["seed_saw_it"]:
        print(
            f"note: the seed was trained on a mixture that included {name}'s domain; removing the expert does "
            "not remove what the seed (and the dense run) learned from it"
        )


def fsck(forest, deep: bool) -> int:
    from elmforest.forest.optout import fsck as check

    fixed, wrong, notes = check(forest, deep=deep)
    for line in fixed:
        print(f"fixed: {line}")
    for line in wrong:
        print(f"problem: {line}")
    for line in notes:
        print(f"note: {line}")
    print(
        f"{forest.root}: {len(forest.names)} expert(s), {len(fixed)} repair(s), {len(wrong)} problem(s) left"
    )
    return 1 if wrong else 0


def checkpoint_seed_config(forest, args, shards: str):
    """The experts' config when the seed is a checkpoint: the seed's own training config
    (elmforest_run.json, e.g. an elmforest export) unless --config or --preset is given, else the
    default preset; --set applies on top. Says which. `args` holds what the command was told
    (preset, config, trust_remote_code, overrides; `run_config(shards)` builds it)."""
    from elmforest.config import apply_overrides
    from elmforest.forest.seeding import read_seed_config
    from elmforest.model.presets import DEFAULT_PRESET

    own = forest.seed_dir / "elmforest_run.json"
    if args.config or args.preset or not own.is_file():
        cfg = args.run_config(shards)
        source = f"--config {args.config}" if args.config else f"preset {args.preset or DEFAULT_PRESET}"
    else:
        cfg = read_seed_config(own)
        cfg.model.trust_remote_code = bool(args.trust_remote_code)
        cfg = apply_overrides(cfg, args.overrides)
        source = f"the seed's own training config ({own})"
    t = cfg.train
    print(
        f"experts of this checkpoint seed train with {source}: {t.steps} steps x batch {t.batch_size} x "
        f"{t.seq_len} tokens at LR {cfg.optim.lr:g} (change with --preset, --config or --set)"
    )
    return cfg


def seed_config(forest):
    from elmforest.config import RunConfig

    return RunConfig.from_dict(forest.data["seed"]["config"])


def summary_of(src: Path) -> dict:
    from elmforest.utils.io import read_json

    for p in (src / "summary.json", src.parent / "summary.json"):
        if p.is_file():
            s = read_json(p)
            if not isinstance(s, dict):
                raise UserError(f"{p}: expected a JSON object (a run's summary), got {type(s).__name__}")
            return s
    return {}


def parents_of(forest, src: Path) -> list[dict]:
    """The lineage of an expert trained elsewhere: its run's config (run_config.json beside it or its
    run) says where its weights started (train.init_checkpoint, else model.init_from). When that is
    this forest's seed, the seed's trainer state or one of its experts, the lineage names it, not
    `external` (an expert branched by hand from the forest's seed is the seed's child). Paths are only
    compared, never opened: the file is the user's."""
    from elmforest.utils.io import read_json

    targets = {}
    if forest.data.get("seed"):
        targets[forest.seed_dir.resolve()] = "seed"
        targets[(forest.root / "seed_state").resolve()] = "seed"
    for n in forest.names:
        targets[forest.expert_dir(n).resolve()] = n
    for p in (src / "run_config.json", src.parent / "run_config.json"):
        if not p.is_file():
            continue
        try:
            cfg = read_json(p)
            start = cfg["train"].get("init_checkpoint") or cfg["model"].get("init_from")
        except (ValueError, KeyError, TypeError, AttributeError):
            break  # not a run's config: nothing known about where it started
        if isinstance(start, str) and Path(start).is_absolute() and Path(start).resolve() in targets:
            return [{"name": targets[Path(start).resolve()], "weight": 1.0}]
        break
    return [{"name": "external", "weight": 1.0}]


def explicit_weights(spec: str, names: list[str]) -> list[float]:
    """--weights NAME=W,NAME=W: every name an expert of the forest, every W a non-negative number."""
    import math

    pairs = {}
    for item in spec.split(","):
        name, sep, w = item.partition("=")
        try:
            value = float(w) if sep else math.nan
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"--weights {item!r}: expected NAME=W with W a non-negative number")
        if name.strip() in pairs:
            raise UserError(f"--weights: {name.strip()!r} is given twice")
        pairs[name.strip()] = value
    unknown = set(pairs) - set(names)
    if unknown:
        raise UserError(f"unknown expert(s) in --weights: {sorted(unknown)}; have {names}")
    if sum(pairs.values()) <= 0:
        raise UserError("--weights: at least one weight must be positive")
    if not math.isfinite(sum(pairs.values())):
        top = max(pairs.values())
        pairs = {k: v / top for k, v in pairs.items()}
    return [pairs.get(n, 0.0) for n in names]


def average(
    forest,
    out: str,
    weights: str = "uniform",
    data: str | None = None,
    domain: str | None = None,
    prior_batches: int | None = None,
    method: str = "linear",
    scale: float | None = None,
    density: float | None = None,
) -> None:
    """None: not given (the defaults 20, 1.0 and 0.2), so an option of another mode given at its default
    value is refused like any other."""
    from elmforest.forest.pool import check_intact
    from elmforest.merge.average import merge_checkpoints
    from elmforest.merge.methods import NEEDS_BASE

    names = forest.names
    if not names:
        raise UserError(f"{forest.root}: the forest has no experts to average")
    refuse_inside_forest(out)
    if method not in NEEDS_BASE and scale is not None:
        raise UserError(f"--scale applies to task_arithmetic and ties, not --method {method}")
    if method != "ties" and density is not None:  # options of another mode were ignored without a word
        raise UserError(f"--density applies to --method ties, not --method {method}")
    if weights != "posterior" and (data or domain or prior_batches is not None):
        given = [
            f
            for f, v in (
                ("--data", data),
                ("--domain", domain),
                ("--prior-batches", prior_batches is not None),
            )
            if v
        ]
        raise UserError(
            f"{', '.join(given)} choose(s) the posterior weights: add --weights posterior (the weights are "
            f"{weights!r} now)"
        )
    prior_batches = PRIOR_BATCHES if prior_batches is None else prior_batches
    scale = 1.0 if scale is None else scale
    density = 0.2 if density is None else density
    if method in NEEDS_BASE and forest.seed_dir is None:
        raise UserError(f"--method {method} merges updates relative to the seed; {forest.root} has none")
    if weights == "posterior" and not (data and domain):
        raise UserError("--weights posterior needs --data (shards) and --domain")
    ws = explicit_weights(weights, names) if weights not in ("uniform", "posterior") else None
    check_intact(forest, names)  # after the cheap checks: it may read every expert's bytes
    if len(names) == 1:
        print(f"note: one expert ({names[0]}): the average is its weights", file=sys.stderr)
    if weights == "posterior" and len(names) == 1:
        ws = [1.0]  # its posterior is 1 whatever the data: not estimated
    elif weights == "uniform":  # a copy beside its original (`forest add`, copy_of) would double its weight
        copies = [n for n in names if forest.expert(n).get("copy_of") in names]
        ws = [0.0 if n in copies else 1.0 for n in names]
        if copies:
            print(
                "note: "
                + ", ".join(f"{n} (a copy of {forest.expert(n)['copy_of']})" for n in copies)
                + " averaged once, under the original's weight (as a branch from the mixture does); give "
                "NAME=W,... weights to count a copy again",
                file=sys.stderr,
            )
    elif weights == "posterior":
        from elmforest.data.shards import Shards
        from elmforest.forest.branching import branch_weights

        instead = "average with --weights uniform or NAME=W,..."
        w = branch_weights(forest, Shards(data), domain, prior_batches, instead=instead)
        ws = [w[n] for n in names]
    params, base = {}, None
    if method in NEEDS_BASE:
        base, params["scale"] = forest.seed_dir, scale
        if method == "ties":
            params["density"] = density
    held = [n for n, w in zip(names, ws, strict=True) if w > 0]
    from elmforest.merge.average import warn_unrelated

    warn_unrelated(forest, held, "averaging")
    with forest.recording_output(out, "average", held, "elmforest_average.json"):
        out = merge_checkpoints(
            forest.expert_dirs(),
            out,
            ws,
            method,
            base,
            metadata={"names": names, "forest": str(forest.root.resolve())},
            **params,
        )
    forest.settle_output(out, held)
    print(
        f"merged ({method}) {len(names)} experts with weights "
        + ", ".join(f"{n}={w / sum(ws):.3f}" for n, w in zip(names, ws, strict=True))
        + f" -> {out}"
    )
