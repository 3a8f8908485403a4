"""Build a causal LM: a Llama from a preset, or any local Hugging Face checkpoint.

A checkpoint is checked before transformers reads it (config.json parses, every weights file is
there and whole, safetensors only: pickled weights are never loaded) and its weights after (all
finite), so a broken one is a one-line error naming the file, not a traceback from a library.
"""

from __future__ import annotations

import json
import math
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from elmforest.config import ModelConfig
from elmforest.model.presets import llama_kwargs
from elmforest.utils.errors import NonFiniteWeights, NotFound, UserError
from elmforest.utils.io import read_json, restore_swapped

# a Qwen2-MoE without a shared expert has 0-size linears, whose init torch warns about on every load:
# harmless, and filtered by its exact text once for the process (catch_warnings is not thread-safe)
warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# bytes per element of the safetensors dtypes (sub-byte and unknown ones are left to safetensors)
_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}  # fmt: skip


def resolve_model_dir(path: str | Path) -> Path:
    """Accept a run directory (its `model/` holds the final checkpoint) or an HF checkpoint dir."""
    p = Path(path)
    restore_swapped(p)  # a kill while it was being replaced (a fine-tuning in place) left it aside
    if (p / "model" / "config.json").is_file():
        return p / "model"
    if (p / "config.json").is_file():
        return p
    if (p / "run_config.json").is_file():  # a run without its final model: paused (stop_at) or cut
        raise NotFound(
            f"{p}: a run directory whose training has not finished (no model/ yet; its checkpoints are in "
            f"{p / 'checkpoints'}); finish it by running the command that started it again (without "
            "train.stop_at if it was paused; `elmforest forest train` for a forest's runs)"
        )
    raise NotFound(f"{p}: not a model checkpoint (no config.json) nor a run directory (no model/)")


def read_config(d: Path) -> dict:
    cfg = read_json(d / "config.json")
    if not isinstance(cfg, dict):
        raise UserError(f"{d / 'config.json'}: not a model config (expected a JSON object)")
    return cfg


def position_limit(cfg: dict) -> int | None:
    """The positions a config.json's model has: `max_position_embeddings`, or GPT-2's `n_positions`
    (transformers maps one to the other on the config object, not in the file)."""
    most = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    return int(most) if isinstance(most, int | float) and most > 0 else None


def read_config_as_transformers(d: Path) -> dict:
    """The config as transformers reads it, without remote code: its class defaults filled in, a
    transformers-4.x file (`rope_theta`, no `head_dim`) and its 5.x rewrite alike; the file's own keys
    for an architecture only remote code defines."""
    try:
        return AutoConfig.from_pretrained(str(d), local_files_only=True).to_dict()
    except (ValueError, KeyError, OSError):
        return read_config(d)


def tied_head(d: Path) -> bool:
    """Whether checkpoint `d`'s output head is its embedding matrix (its class default when the file
    is silent); False for a config that cannot be read."""
    try:
        return bool(read_config_as_transformers(d).get("tie_word_embeddings", False))
    except UserError:
        return False


def weight_files(d: Path) -> dict[str, Path]:
    """Every safetensors file of checkpoint `d`, checked whole, by the tensor names it holds ("" for a
    single file). Pickled weights are refused: unpickling a file runs whatever code it holds."""
    single, index = d / WEIGHTS, d / WEIGHTS_INDEX
    if single.exists():
        files = {"": single}
    elif index.exists():
        wm = read_json(index)
        wm = wm.get("weight_map") if isinstance(wm, dict) else None
        if not isinstance(wm, dict) or not wm or not all(isinstance(f, str) for f in wm.values()):
            raise UserError(f"{index}: not a safetensors index (no weight_map of tensor names to files)")
        outside = sorted({f for f in wm.values() if Path(f).name != f or f in ("", ".", "..")})
        if outside:  # weights read from elsewhere would pass every check made on this folder's files
            raise UserError(
                f"{index}: {outside[0]!r} is not a file name inside {d}; an index names the weight files "
                "beside it"
            )
        files = {name: d / f for name, f in wm.items()}
    elif pickled := [d / f for f in PICKLED if (d / f).exists()]:
        raise UserError(
            f"{pickled[0]}: pickled weights are refused (loading them can run arbitrary code); "
            "convert the checkpoint to safetensors (model.safetensors)"
        )
    else:
        raise NotFound(f"{single}: no such file (nor {WEIGHTS_INDEX}): the checkpoint has no weights")
    for f in sorted(set(files.values())):
        if not f.is_file():
            listed = f" (listed in {index.name})" if f != single else ""
            raise NotFound(f"{f}: no such weights file{listed}")
        check_safetensors(f)
    return files


def check_safetensors(f: Path) -> None:
    """The header parses and every tensor's bytes lie inside the file (a truncated copy is caught
    here, not half-way through loading), then safetensors' own checks."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise UserError(
                f"{f}: truncated or not a safetensors file (header length {n}, file {size} bytes)"
            )
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # (nested past Python's stack)
            header = None
    if not isinstance(header, dict):
        raise UserError(f"{f}: corrupt safetensors header (not a JSON object)")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            numel = math.prod(int(x) for x in info["shape"])
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{f}: corrupt safetensors header (entry of tensor {name})") from None
        if not 0 <= begin <= end or end > data:
            raise UserError(
                f"{f}: truncated: tensor {name} needs data bytes {begin}..{end}, the file has {data}"
            )
        if dtype in _DTYPE_BYTES and end - begin != numel * _DTYPE_BYTES[dtype]:
            raise UserError(
                f"{f}: corrupt safetensors header (tensor {name}: {end - begin} bytes for its shape)"
            )
    try:
        from safetensors import safe_open

        with safe_open(str(f), framework="pt"):
            pass
    except Exception as e:  # safetensors' own error type: its message names the problem
        raise UserError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0]})") from e


def build_model(
    cfg: ModelConfig, vocab_size: int, eos_id: int, seed: int = 0, initialise: bool = True
) -> PreTrainedModel:
    """A freshly initialised model, or the weights of `cfg.init_from`. `initialise=False`: its weights
    are left as allocated, for a caller that loads every one of them next (a run from a checkpoint:
    at 1.3B parameters the random initialisation alone takes ~20 s on one core; an expert of a seed
    that started from `cfg.init_from` reads the seed's weights, not that checkpoint's)."""
    if cfg.init_from:
        return load_model(
            cfg.init_from,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
            vocab_size=vocab_size,
            weights=initialise,
        )
    config = LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        attn_implementation=cfg.attn_implementation,
        **llama_kwargs(cfg),
    )
    from transformers.initialization import no_init_weights

    with torch.random.fork_rng(devices=[]), nullcontext() if initialise else no_init_weights():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if not initialise:
        model.tie_weights()  # skipped with the initialisation (transformers' init_weights does both)
    return model


def load_model(
    path: str | Path,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    weights: bool = True,
) -> PreTrainedModel:
    """Load a local checkpoint offline; refuse remote code unless asked, and check the vocabulary fits.
    `weights=False`: its architecture only, the weights left as allocated, for a caller that loads every
    one next (strictly: train/checkpoint.py); the buffers a model computes are made as in a load."""
    d = resolve_model_dir(path)
    raw = read_config(d)
    if raw.get("auto_map") and not trust_remote_code:
        raise UserError(
            f"{d}: checkpoint needs custom code (auto_map in config.json); elmforest runs it only "
            "when the command line says --trust-remote-code (never because a file asks), so only if you trust it"
        )
    try:
        config = AutoConfig.from_pretrained(
            str(d), trust_remote_code=trust_remote_code, local_files_only=True
        )
    except (ValueError, KeyError, OSError) as e:  # e.g. an unknown model_type
        raise UserError(f"{d / 'config.json'}: not a usable model config ({_first_line(e)})") from e
    extra = {}
    moe = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)  # Qwen2-MoE's
    if moe and not torch.cuda.is_available():
        # transformers picks grouped_mm for MoE experts; on CPU its eager per-expert loop is faster
        # (1.3x-1.8x, bench/moe_kernels.py) and our sorted loop (bit-identical) faster again, 5-7% end to
        # end (bench/forest_inference.py)
        from elmforest.model.moe_experts import NAME

        extra["experts_implementation"] = NAME
    if not weights:
        from transformers.initialization import no_init_weights

        with no_init_weights():
            model = AutoModelForCausalLM.from_config(
                config,
                trust_remote_code=trust_remote_code,
                dtype=dtype,
                attn_implementation=attn_implementation,
                **extra,
            )
        model.tie_weights()  # skipped with the initialisation
        return _check_vocab(model, d, vocab_size)
    files = weight_files(d)  # (every header checked: not for the architecture alone)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(d),
            config=config,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
            dtype=dtype,
            attn_implementation=attn_implementation,
            output_loading_info=True,
            **extra,
        )
    except (OSError, ValueError, RuntimeError) as e:  # e.g. tensor shapes that do not fit config.json
        why = _shape_mismatch(d, files, config, trust_remote_code) or _first_line(e)
        raise UserError(f"{d}: cannot load the weights ({why})") from e
    if info.get("missing_keys"):  # transformers would initialise them at random, with a mere warning
        name = sorted(info["missing_keys"])[0]
        where = files.get("", d / WEIGHTS_INDEX)
        raise UserError(
            f"{where}: tensor {name} is missing ({len(info['missing_keys'])} in all): incomplete weights"
        )
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            where = files.get(name, files.get("", d / WEIGHTS_INDEX))
            raise NonFiniteWeights(
                f"{where}: tensor {name} holds non-finite values (NaN or inf): corrupt or diverged weights"
            )
    return _check_vocab(model, d, vocab_size)


def _check_vocab(model: PreTrainedModel, d: Path, vocab_size: int | None) -> PreTrainedModel:
    if vocab_size is not None and model.get_input_embeddings().num_embeddings < vocab_size:
        raise UserError(
            f"{d}: model has {model.get_input_embeddings().num_embeddings} embeddings but the "
            f"tokenizer has {vocab_size} tokens"
        )
    return model


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shape_mismatch(d: Path, files: dict[str, Path], config, trust_remote_code: bool) -> str | None:
    """The first tensor whose shape in the weight files is not the one config.json gives it, said with
    both shapes: transformers' own error only points at a report it logged (hidden from CLI users).
    None when no such tensor is found (tensor names transformers renames while loading are skipped)."""
    from safetensors import safe_open

    try:
        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        want = {name: list(t.shape) for name, t in built.state_dict().items()}
        for f in sorted(set(files.values())):
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    shape = list(h.get_slice(name).get_shape())
                    if name in want and shape != want[name]:
                        return (
                            f"tensor {name} is {shape} in {f.name}; {d / 'config.json'} makes it {want[name]}"
                        )
    except Exception:  # only an explanation: never hide the error being explained
        return None
    return None
