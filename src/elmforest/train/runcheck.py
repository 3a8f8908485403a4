"""What identifies a run, checked before a run directory is reused: the config (minus what may
change between invocations), and its inputs by content (shards, the checkpoint it branched from, the
HF checkpoint it started from), never by path; and what a model can take (context length, tokenizer)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from elmforest.config import ARCHITECTURE_FIELDS, RunConfig
from elmforest.data.shards import Shards
from elmforest.data.tokenizer import load_tokenizer
from elmforest.model.build import resolve_model_dir
from elmforest.model.presets import PRESETS, fill_architecture
from elmforest.utils.errors import UserError
from elmforest.utils.io import file_digest, read_json

OPERATIONAL_FIELDS = (
    "device",
    "stop_at",
    "log_every",
    "ckpt_every",
    "keep_checkpoints",
    "compile",
    "fused_optimizer",
    "valid_every",
    "valid_windows",
    "trackers",
)


def run_identity(cfg: dict) -> dict:
    """The config minus fields that may change between invocations of the same run: operational
    settings, where the inputs lie (their content is checked instead: inputs.json), the order the
    shards must hold (only a check: the shards' fingerprint records their order), and remote code,
    which only the command line turns on (config.py)."""
    # from a checkpoint, its fingerprint is the architecture (runs before that was so recorded the
    # preset's fields here, which never applied)
    skip = ("trust_remote_code", "init_from", *(ARCHITECTURE_FIELDS if cfg["model"].get("init_from") else ()))
    return {
        **cfg,
        "model": {k: v for k, v in cfg["model"].items() if k not in skip},
        "data": {k: v for k, v in cfg["data"].items() if k not in ("shards", "order")},
        "train": {k: v for k, v in cfg["train"].items() if k not in (*OPERATIONAL_FIELDS, "init_checkpoint")},
    }


def input_fingerprints(cfg: RunConfig, shards: Shards, previous: dict | None = None) -> dict:
    """{shards, init_checkpoint, init_from}: each {path, fingerprint[, stamp]} or None. A checkpoint's
    weights are hashed whole once; while their path, sizes and modification times stay what
    `previous` recorded, its fingerprint is reused (resuming a 5 GB model does not re-read it)."""

    def entry(path, fp, **extra):
        return {"path": str(Path(path).resolve()), "fingerprint": fp, **extra}

    out = {
        "shards": entry(shards.root, shards.fingerprint),
        "init_checkpoint": None,
        "init_from": None,
    }
    if cfg.train.init_checkpoint:
        state = Path(cfg.train.init_checkpoint) / "state.json"  # holds the tensor files' checksums
        if state.is_file():
            out["init_checkpoint"] = entry(state.parent, hashlib.sha256(state.read_bytes()).hexdigest()[:16])
    if cfg.model.init_from:
        try:
            d = resolve_model_dir(cfg.model.init_from)
        except FileNotFoundError:
            return out
        files = [d / "config.json", *sorted(d.glob("*.safetensors"))]
        stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]
        old = (previous or {}).get("init_from") or {}
        if old.get("path") == str(d.resolve()) and old.get("stamp") == stamp:
            out["init_from"] = old
        else:
            h = hashlib.sha256()
            for f in files:
                if f.is_file():
                    h.update(f"{f.name}:{file_digest(f)['sha256']}".encode())
            out["init_from"] = entry(d, h.hexdigest()[:16], stamp=stamp)
    return out


def check_order(cfg: RunConfig, shards: Shards) -> None:
    """data.order names the order a run's training stream must be in (an ICP run on shards built in
    source order would silently be a baseline): refused before anything is built or written."""
    want = cfg.data.order
    have = shards.order
    if want is None or want == have["method"]:
        return
    seed = f" (seed {have['seed']})" if "seed" in have else ""
    raise UserError(
        f"data.order={want!r} but the shards in {shards.root} hold their training documents in "
        f"{have['method']!r} order{seed}; "
        + (  # only shards in source order can be reordered; others are built again
            f"reorder a copy (elmforest shards reorder {shards.root} --out DIR --order {want})"
            if have["method"] == "source"
            else f"build shards in {want} order (elmforest shards build --data CORPUS --tokenizer "
            f"{shards.root} --out DIR --order {want})"
        )
        + f" and point data.shards at DIR, or set data.order={have['method']}"
    )


def check_attention(impl: str, device) -> None:
    """Attention backends transformers accepts by name but that cannot train here failed after the
    run's files were written (flex: at the first backward on CPU) or with a traceback (flash: an
    ImportError): refused first, with what to use instead."""
    if impl.startswith("flash_attention"):
        from transformers import utils

        if device.type != "cuda":
            raise UserError(
                f"model.attn_implementation={impl} runs on CUDA GPUs only (device {device}); use sdpa"
            )
        if not getattr(utils, f"is_flash_attn_{impl[-1]}_available")():
            raise UserError(
                f"model.attn_implementation={impl} needs the FlashAttention {impl[-1]} package, not installed "
                "here; install it or use sdpa"
            )
    if impl == "flex_attention" and device.type == "cpu":
        raise UserError(
            "model.attn_implementation=flex_attention cannot train on CPU (PyTorch has no backward for it there); use sdpa"
        )


def check_context(model, cfg: RunConfig) -> None:
    """Windows longer than the model's position table fail deep inside transformers (an IndexError in
    the embedding): refuse them before anything is written."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    if limit and cfg.train.seq_len > limit:
        if cfg.model.init_from:
            where = f"max_position_embeddings in {cfg.model.init_from}/config.json"
        elif (p := PRESETS.get(cfg.model.preset)) and limit == p.architecture()["max_position_embeddings"]:
            where = f"max_position_embeddings of preset {cfg.model.preset}"
        else:  # set by the user (--set, a config file), not the preset's
            where = f"model.max_position_embeddings={limit} as set"
        raise UserError(
            f"train.seq_len={cfg.train.seq_len} is longer than the model's {limit} positions "
            f"({where}); set train.seq_len={limit} or less (`--set`; a study's `overrides` list)"
        )


def check_same_tokenizer(model_dir: str, fingerprint: str, shards: Shards) -> None:
    """A checkpoint trained with another tokenizer would read the shards' ids as different tokens, and
    one that ends documents with another token would read every boundary as text (Shards.check_eos)."""
    try:
        theirs = load_tokenizer(resolve_model_dir(model_dir))
    except (ValueError, FileNotFoundError):
        return  # the checkpoint ships no tokenizer: nothing to compare against
    if theirs.fingerprint() != fingerprint:
        raise UserError(
            f"{model_dir}: its tokenizer files differ from those the shards in {shards.root} were built with "
            "(compared as files: the same vocabulary saved again by another library counts as another); "
            f"build the shards with --tokenizer {model_dir}"
        )
    shards.check_eos(theirs.eos_id, model_dir)


def config_diff(a: dict, b: dict, prefix: str = "") -> str:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "(absent)"), b.get(k, "(absent)")
        if isinstance(va, dict) and isinstance(vb, dict):
            d = config_diff(va, vb, f"{prefix}{k}.")
            if d:
                out.append(d)
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return "; ".join(out)


def saved_config(path: Path) -> RunConfig:
    """A run's saved config, read as it was meant: fields added since take their defaults, and a
    config saved before the architecture was stored is filled from its preset."""
    cfg = RunConfig.from_dict(read_json(path))
    fill_architecture(cfg.model)
    return cfg


def recorded_config(run_dir: Path) -> dict | None:
    """The config a run with progress was trained with: run_config.json, else the one its model or its
    newest checkpoint records. A removal of the run killed after run_config.json went (rmtree's order
    is the file system's) left checkpoints a rerun with another config resumed, or a model it kept."""
    from elmforest.train.checkpoint import list_checkpoints

    saved = run_dir / "run_config.json"
    if saved.exists():
        return saved_config(saved).to_dict()
    found = [run_dir / "model" / "elmforest_run.json"]
    found += [p / "state.json" for p in reversed(list_checkpoints(run_dir / "checkpoints"))]
    for f in found:
        if f.is_file():
            d = read_json(f)
            d = d.get("config") if f.name == "state.json" else d
            if isinstance(d, dict):
                c = RunConfig.from_dict(d)
                fill_architecture(c.model)
                return c.to_dict()
    return None


def has_progress(run_dir: Path) -> bool:
    """A checkpoint or a final model: something a different config must not overwrite."""
    from elmforest.train.checkpoint import list_checkpoints

    return bool(list_checkpoints(run_dir / "checkpoints")) or (run_dir / "model").exists()


def settings_diff(a: RunConfig | dict, b: RunConfig | dict) -> str:
    """How two configs (or their saved dicts) differ in what shapes a run (run_identity), as config_diff
    says it; '' when they do not."""

    def ident(c) -> dict:
        return run_identity((RunConfig.from_dict(c) if isinstance(c, dict) else c).to_dict())

    return config_diff(ident(a), ident(b))


def config_change(run_dir: Path, cfg: RunConfig) -> str | None:
    """How `cfg` differs from the run with progress in `run_dir` (config_diff), or None: the same, or
    nothing to keep there (no checkpoint yet: a run that failed before its first)."""
    if not has_progress(run_dir):
        return None
    was = recorded_config(run_dir)
    if was is None:
        from elmforest.train.checkpoint import list_checkpoints

        if (
            not list_checkpoints(run_dir / "checkpoints")
            and not (run_dir / "model" / "config.json").is_file()
        ):
            return None  # what a killed removal left: nothing to resume or keep, trained from the start
        return "run_config.json is missing and no checkpoint or model records the config"
    now = cfg.to_dict()
    old, new = run_identity(was), run_identity(now)
    if old == new:
        return None
    a, b = was["model"].get("init_from"), now["model"].get("init_from")
    if (a is None) == (b is None):
        return config_diff(old, new)
    # one starts from a checkpoint (its architecture), the other from the config's: the start differs,
    # which the architecture fields (absent on one side) would only hide
    for d in (old, new):
        d["model"] = {k: v for k, v in d["model"].items() if k not in ARCHITECTURE_FIELDS}
    rest = config_diff(old, new)
    lead = f"model.init_from: {a!r} -> {b!r}, another starting checkpoint (--branch or --init-from)"
    return "; ".join(x for x in (lead, rest) if x)


def check_config(run_dir: Path, cfg: RunConfig) -> None:
    """A run with progress resumes only with the same config."""
    if diff := config_change(run_dir, cfg):
        hint = ""
        if diff.startswith("model.num_kv_heads") and ";" not in diff:  # the only difference
            hint = (  # the same --set, read the new way: a run made before takes the kv count it had
                " (since 2026-12-07 `--set model.num_heads=N` alone keeps full attention; a run made "
                "before kept the preset's key/value heads: add --set model.num_kv_heads with its count)"
            )
        raise UserError(
            f"{run_dir} holds a run with a different config ({diff}){hint}; resume it "
            f"with the same settings, or delete {run_dir} to train it again with the new ones"
        )


def check_finished_data(run_dir: Path, cfg: RunConfig) -> None:
    """A finished run asked for again on other shards is refused as an unfinished one is, instead of
    answering "done" for data it never saw (only the shards: a finished run's starting checkpoint may be
    gone by now, and it no longer matters)."""
    saved = run_dir / "inputs.json"
    if not saved.is_file() or not cfg.data.shards or not Shards.is_shards_dir(cfg.data.shards):
        return
    sh = Shards(cfg.data.shards)
    now = {"path": str(cfg.data.shards), "fingerprint": sh.fingerprint}
    _refuse_changed(run_dir, read_json(saved), {"shards": now}, sh.fingerprints, finished=True)


def check_inputs(run_dir: Path, cfg: RunConfig, shards: Shards) -> dict:
    """The run's inputs (input_fingerprints), refused when a run with progress started from other
    content: shards rebuilt at the same path would silently continue on other text, while a moved
    corpus or forest is accepted."""
    saved = run_dir / "inputs.json"
    old = read_json(saved) if saved.is_file() and has_progress(run_dir) else None
    inputs = input_fingerprints(cfg, shards, old)
    if old:
        _refuse_changed(run_dir, old, inputs, shards.fingerprints)
    return inputs


def _refuse_changed(
    run_dir: Path, old: dict, new: dict, shards_fps: tuple[str, ...], finished: bool = False
) -> None:
    """`shards_fps`: every fingerprint of the shards' content (Shards.fingerprints: as older versions
    wrote it too)."""
    for key, now in new.items():
        was = old.get(key)
        same = shards_fps if key == "shards" else ()
        if was and now and was.get("fingerprint") and was["fingerprint"] not in (now["fingerprint"], *same):
            what = {"shards": "shards", "init_from": "model.init_from"}.get(key, f"train.{key}")
            start = "is a finished run trained on" if finished else "was started from"
            raise UserError(
                f"{run_dir} {start} {what} {was['path']} (fingerprint {was['fingerprint']}) "
                f"but {now['path']} holds other data (fingerprint {now['fingerprint']}); point it at the "
                f"original, or delete {run_dir} to start over"
            )
