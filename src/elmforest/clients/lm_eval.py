"""The forest as a model type of lm-evaluation-harness: `--model elmforest`.

Registered through lm-eval's own model registry (`register_model`), no fork. lm-eval 0.4 finds models
only in its registry and has no plugin entry points, so its `lm_eval` command cannot import a third
party's model by name; `elmforest lm-eval ARGS...` is that same command with this module imported first
(`lm_eval.simple_evaluate(model="elmforest", ...)` works from Python after `import
elmforest.clients.lm_eval`).

Every number is the project's own (forest/lm.py): the same posterior, top-k choice, c-BTM routing and
parameter average as `elmforest eval`; `loglikelihood_rolling` scores a document in `elmforest eval`'s
non-overlapping windows (lm-eval's HF model gives the last window a full context instead), so its bits per
byte are the evaluation's. Model arguments (`--model_args k=v,...`):

    forest=DIR (or model=DIR, a single checkpoint)   mode=ensemble|topk|cluster|average   k=2
    prior=uniform|cached   prior_data=PATH (valid split gives the cached prior)   weighting=posterior|fixed
    experts=a+b (a subset)   device=auto   precision=auto|fp32|bf16   batch_size=16   max_length=N
    rolling_eos=false (true: the closing EOS is predicted, as `elmforest eval` counts it)
"""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path

from elmforest.clients.server_api import is_neutral
from elmforest.forest.lm import ForestLM, open_lm
from elmforest.utils.errors import UserError

try:
    import lm_eval.models  # noqa: F401 - fills lm-eval's registry first, so its own models stay found
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise UserError(f'lm-evaluation-harness is not installed: pip install -e ".[eval]" ({e})') from None


# what lm-eval passes every model type besides its model_args
LM_EVAL_SETTINGS = {"max_batch_size", "device"}
# a continuation's length under each name lm-eval's tasks give it, first taken first
_LENGTHS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


def _batch_size(v) -> int:
    """lm-eval passes its --batch_size here: a number, or "auto"/"auto:N" (no probing: 16)."""
    try:
        return max(1, int(v))
    except (TypeError, ValueError):
        return 16


@register_model("elmforest")
class ElmforestLM(LM):
    def __init__(
        self,
        forest: str | None = None,
        model: str | None = None,
        mode: str = "ensemble",
        k: int | None = None,  # None: 2 (None where a mode's own setting has a default: given is told
        prior: str | None = None,  # from left out, and refused where the mode ignores it, as the CLI does)
        prior_data: str | None = None,
        weighting: str | None = None,  # None: posterior
        experts: str | None = None,
        device: str | None = "auto",
        precision: str = "auto",
        batch_size=16,
        max_length: int | None = None,
        rolling_eos: bool = False,
        routing_temperature: float | None = None,  # None: 0.1
        seed: int = 0,
        **lm_eval_settings,  # lm-eval's own settings that apply to other model types
    ) -> None:
        super().__init__()
        unknown = sorted(set(lm_eval_settings) - LM_EVAL_SETTINGS)
        if unknown:  # a misspelt argument would silently evaluate the default mixture
            raise UserError(f"unknown elmforest model_args: {', '.join(unknown)}")
        if (forest is None) == (model is None):
            raise UserError("elmforest model_args need exactly one of forest=DIR or model=DIR")
        names = [x for x in str(experts).replace(";", "+").split("+") if x] if experts is not None else None
        max_length = None if max_length is None else _number(max_length, "max_length", int, 1)
        given = [
            n
            for n, v in (
                ("k", k),
                ("weighting", weighting),
                ("routing_temperature", routing_temperature),
                ("prior", prior),
            )
            if v is not None
        ]
        self.lm: ForestLM = open_lm(
            Path(forest or model),
            mode=mode,
            k=2 if k is None else _number(k, "k", int, 1),
            prior="uniform" if prior is None else prior,
            prior_data=prior_data,
            weighting="posterior" if weighting is None else weighting,
            experts=names,
            device=device or "auto",
            precision=precision,
            seq_len=max_length,
            routing_temperature=0.1
            if routing_temperature is None
            else _number(routing_temperature, "routing_temperature", float, 0),
            given=given,
        )
        self.batch_size = _batch_size(batch_size)
        self.rolling_eos = _flag(rolling_eos, "rolling_eos")
        self.seed = _number(seed, "seed", int)
        self._repeats: dict[str, int] = {}  # times each context was asked for: lm-eval's repeats differ
        self._said_short_context = False

    def chat_template(self, chat_template=False):
        """lm-eval asks for it when given --apply_chat_template (with --output_path): said here."""
        if chat_template:
            self.apply_chat_template([])
        return ""

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True):
        raise UserError(
            "--apply_chat_template: elmforest's experts are language models without a chat template; "
            "drop the flag"
        )

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """model_args win over lm-eval's own settings; lm-eval's `--device cuda...` on a machine without
        CUDA falls back to the CPU, as its HF model does."""
        import torch

        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        dev = extra.pop("device", None)
        if "device" not in arg_dict and dev is not None:
            no_cuda = str(dev).startswith("cuda") and not torch.cuda.is_available()
            arg_dict = {**arg_dict, "device": "auto" if no_cuda else dev}
        return cls(**{**extra, **arg_dict})

    @property
    def tokenizer_name(self) -> str:
        return f"elmforest-{self.lm.tok.fingerprint()}"

    @property
    def max_length(self) -> int:
        return self.lm.seq_len

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation) as lm-eval's HF model splits them: trailing spaces of the
        context move to the continuation, and the continuation is whatever encoding the whole adds. An
        empty context still encodes to the tokenizer's own prefix (a BOS, if it adds one), so that
        prefix is context, never part of the scored continuation."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.lm.encode(context + continuation)
        ctx = self.lm.encode(context)
        return ctx, whole[len(ctx) :]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._pair(*r.args) for r in requests]
        for (_, cont), r in zip(pairs, requests, strict=True):
            if not cont:
                raise UserError(f"the continuation {r.args[1]!r} encodes to no token after its context")
        scored = self.lm.score(pairs, batch_size=self.batch_size)
        out = [(s.continuation, s.greedy) for s in scored]
        for r, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for r in requests:
            (text,) = r.args
            nll = self.lm.rolling_nll(self.lm.encode(text), eos=self.rolling_eos)
            out.append(-nll)
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, -nll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in requests:
            context, kw = r.args
            text = self.generate_one(context, dict(kw or {}))
            out.append(text)
            self.cache_hook.add_partial("generate_until", r.args, text)
        return out

    def _request_seed(self, context: str) -> int:
        """A sampled request's seed from the base seed, its context and how many times that context came
        before. lm-eval orders requests by length, so a seed taken in turn depended on which other
        requests ran (another task, `--limit`): the same request sampled other text."""
        n = self._repeats.get(context, 0)
        self._repeats[context] = n + 1
        digest = hashlib.sha256(f"{self.seed}\0{n}\0{context}".encode("utf-8", "surrogatepass")).digest()
        return int.from_bytes(digest[:8], "big") >> 1

    def generate_one(self, context: str, kw: dict) -> str:
        """One continuation, cut before the first stop string. Greedy unless `do_sample`, or, where the
        task leaves it out, a temperature above 0; the length under any name lm-eval takes for it, the
        first of max_gen_toks > max_new_tokens > max_tokens > max_completion_tokens (both as lm-eval's
        normalize_gen_kwargs). The context keeps its last tokens when it and the length do not fit the
        window (as lm-eval's HF model)."""
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        named = [(k, v) for k in _LENGTHS if (v := kw.pop(k, None)) is not None]
        length, max_gen = named[0] if named else ("max_gen_toks", 256)
        max_gen = _number(max_gen, length, int, 1)
        if kw.get("do_sample") is not None:
            sample = _flag(kw.pop("do_sample"), "do_sample")
        else:
            kw.pop("do_sample", None)  # null: left to the temperature, as lm-eval reads it
            sample = _number(kw.get("temperature", 0.0), "temperature", float, 0) > 0
        temperature = _number(kw.pop("temperature", 1.0 if sample else 0.0), "temperature", float, 0)
        top_p = _number(kw.pop("top_p", 1.0), "top_p", float, 0)
        if top_p > 1:
            raise UserError(f"generate_until: top_p={top_p!r}: expected at most 1")
        top_k = kw.pop("top_k", None)
        if top_p == 0 or top_k == 1:  # the likeliest token alone (as transformers keeps one)
            sample = False
        if not sample:
            temperature, top_p = 0.0, 1.0
        seed = kw.pop("seed", None)
        if seed is None:
            seed = self._request_seed(context)
        applied = {k: v for k, v in kw.items() if not is_neutral(k, v)}
        if not is_neutral("top_k", top_k) and top_k != 1 and sample:
            applied["top_k"] = top_k
        if applied:  # else answered as if applied: another sampler than the task asks for
            raise UserError(
                "generate_until: elmforest does not apply "
                + ", ".join(f"{k}={v!r}" for k, v in sorted(applied.items()))
                + " (it samples with temperature and top_p, or greedily); drop them from the task's "
                "generation_kwargs or --gen_kwargs"
            )
        from elmforest.forest.generate import generate_steps

        lm = self.lm
        if max_gen > lm.seq_len // 2 and not self._said_short_context:
            self._said_short_context = True
            print(
                f"elmforest: generate_until: max_gen_toks={max_gen} leaves "
                f"{max(1, lm.seq_len - max_gen)} of the model's {lm.seq_len} context tokens for the task's "
                "prompt (its last tokens are kept); pass a smaller max_gen_toks (--gen_kwargs "
                "max_gen_toks=N) to keep more of it",
                file=sys.stderr,
            )
        max_gen = max(1, min(max_gen, lm.seq_len - 1))
        ids = lm.encode(context)[-(lm.seq_len - max_gen) :] if lm.seq_len - max_gen > 0 else []
        new: list[int] = []
        text = ""
        steps = generate_steps(
            lm.pool,
            lm.tok,
            [lm.eos_id, *ids],
            lm.names,
            max_new_tokens=max_gen,
            temperature=temperature,
            top_p=top_p,
            seed=int(seed),
            prior=lm.prior,
            weighting=lm.weighting,
            routing=lm.routing,
        )
        try:
            for step in steps:
                tok_id = int(step[0])
                if tok_id == lm.eos_id:
                    break
                new.append(tok_id)
                text = lm.tok.decode(new)
                cut = _first_stop(text, until)
                if cut is not None:
                    return text[:cut]
        finally:
            steps.close()
        return text


def _number(v, name: str, kind: type, least: float | None = None):
    """A model_arg or generation setting as `kind` (lm-eval passes strings, ints and floats), at least
    `least`; said with its name instead of a ValueError traceback or a silently changed value."""
    try:
        x = kind(float(v)) if kind is int and isinstance(v, str) and v.strip() else kind(v)
        if isinstance(v, bool) or not math.isfinite(x) or (kind is int and float(v) != x):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{name}={v!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if least is not None and x < least:
        raise UserError(f"{name}={v!r}: expected at least {least:g}")
    return x


def _flag(v, name: str) -> bool:
    """true/false (also 1/0, yes/no): bool("no") would be True."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no", ""):
        return False
    raise UserError(f"{name}={v!r}: expected true or false")


def _first_stop(text: str, until: list[str]) -> int | None:
    hits = [text.find(s) for s in until if s and s in text]
    return min(hits) if hits else None
