"""The OpenAI completions protocol, checked at the door: a request is parsed and validated in full
(types, ranges, the context window) before any work is queued, so a bad request costs no model time
and gets the error object OpenAI's clients expect, `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # top alternatives per token (OpenAI allows 5, vLLM 20)
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # choices per request, all prompts together: each is a generation queued at once
MAX_STOPS = 16  # OpenAI allows 4
MAX_STOP_CHARS = 256  # per stop string: each token searches the text a stop's length back


class ApiError(Exception):
    """An error answered to the client; the server keeps serving."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type

    def body(self) -> dict:
        """Lone surrogates (JSON allows "\\ud800" in a key the message names) escaped: UTF-8 cannot
        encode them, and the answer became a 500."""

        def utf8(s):
            return s.encode("utf-8", "backslashreplace").decode() if isinstance(s, str) else s

        e = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": {k: utf8(v) for k, v in e.items()}}


@dataclass
class Prompt:
    text: str  # what echo returns: the prompt as sent, or the decoded ids of a token-id prompt
    ids: list[int]  # the document's body (no EOS: generation puts the opening EOS in front)


@dataclass
class CompletionRequest:
    prompts: list[Prompt]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    echo: bool = False
    stream: bool = False
    seed: int = 0
    n: int = 1
    include_usage: bool = False


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _shown(v, limit: int = 60) -> str:
    """A value in an error message, cut short: the request may have sent megabytes of it."""
    r = repr(v) if not isinstance(v, list | dict) else f"a {type(v).__name__} of length {len(v)}"
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _get(body: dict, key: str, default, check, what: str):
    v = body.get(key)
    if v is None:
        return default
    if not check(v):
        raise ApiError(f"'{key}' must be {what}, got {_shown(v)}", key)
    return v


def max_prompt_bytes(lm) -> int:
    """The longest prompt text (UTF-8 bytes) the context could hold: every token the longest there is,
    twice over for a normalizer that shrinks text (accents stripped). Anything longer is refused before
    tokenizing, which costs time in proportion to the text (24 s for 20 MB)."""
    added = (len(t.content.encode("utf-8")) for t in lm.tok.tokenizer.get_added_tokens_decoder().values())
    return 2 * lm.seq_len * max(1, *map(len, lm.tok.token_bytes), *added)  # added: "<|endoftext|>" as text


def _encode(lm, text: str, max_bytes: int | None = None) -> Prompt:
    if (
        max_bytes is not None
        and len(text) * 4 > max_bytes
        and len(text.encode("utf-8", "replace")) > max_bytes
    ):
        raise ApiError(
            f"this model's maximum context length is {lm.seq_len} tokens, however the prompt has "
            f"{len(text.encode('utf-8', 'replace'))} bytes, more than {lm.seq_len} tokens can hold",
            "prompt",
            code="context_length_exceeded",
        )
    try:
        return Prompt(text, lm.encode(text))
    except Exception as e:  # e.g. a lone surrogate ("\ud800"), which JSON allows and UTF-8 does not
        raise ApiError(f"the prompt cannot be tokenized: {type(e).__name__}: {e}", "prompt") from None


def _prompts(raw, lm, vocab: int, max_bytes: int | None = None) -> list[Prompt]:
    """A string, a list of strings, a list of token ids or a list of lists of token ids."""

    def ids_prompt(ids) -> Prompt:
        if not ids or not all(_is_int(t) and 0 <= t < vocab for t in ids):
            raise ApiError(f"a token-id prompt must be a non-empty list of ids in [0, {vocab})", "prompt")
        return Prompt(lm.tok.decode(ids), list(ids))

    if isinstance(raw, str):
        return [_encode(lm, raw, max_bytes)]
    if isinstance(raw, list) and raw:
        if len(raw) > MAX_CHOICES and not all(_is_int(t) for t in raw):
            raise ApiError(f"at most {MAX_CHOICES} prompts per request, got {len(raw)}", "prompt")
        if all(isinstance(p, str) for p in raw):
            return [_encode(lm, p, max_bytes) for p in raw]
        if all(_is_int(t) for t in raw):
            return [ids_prompt(raw)]
        if all(isinstance(p, list) for p in raw):
            return [ids_prompt(p) for p in raw]
    raise ApiError(
        "'prompt' must be a string, a non-empty list of strings, a list of token ids or a list of such lists",
        "prompt",
    )


UNSUPPORTED = {"suffix": None, "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0}
# every argument of OpenAI's completions API; others (vLLM's top_k, repetition_penalty, ...) are refused,
# as OpenAI refuses them, instead of answering as if they had been applied, unless null or at the value
# that changes nothing (clients such as lm-eval's pass a task's settings through: num_beams 1, top_k -1)
KNOWN = {
    *UNSUPPORTED,
    *("model", "prompt", "max_tokens", "echo", "stream", "stream_options", "temperature", "top_p"),
    *("logprobs", "n", "best_of", "seed", "stop", "user"),
}


# sampling settings of other servers and of transformers' generate, at the values that change nothing
NEUTRAL = {
    "top_k": (-1, 0),
    "min_p": (0,),
    "repetition_penalty": (1,),
    "length_penalty": (1,),
    "num_beams": (1,),
    "num_return_sequences": (1,),
    "min_tokens": (0,),
    "ignore_eos": (False,),
    "use_beam_search": (False,),
    "stop_token_ids": ([],),
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
}


def is_neutral(key: str, value) -> bool:
    """A setting this project does not apply, at a value that would change nothing (or null)."""
    if value is None:
        return True
    same = [
        n for n in NEUTRAL.get(key, ()) if type(n) is type(value) or {type(n), type(value)} <= {int, float}
    ]
    return any(value == n for n in same)


def parse_completion(
    body, lm, model_name: str, vocab: int, max_bytes: int | None = None
) -> CompletionRequest:
    """The request, checked against the served model `lm` (a ForestLM, whose tokenizer alone is used
    here: the models belong to the engine's thread) of `vocab` tokens; ApiError if anything is off.
    `max_bytes`: the longest prompt text tokenized (`max_prompt_bytes`)."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError("you must provide a model parameter (a string)", "model")
    if model != model_name:
        raise ApiError(
            f"the model {model!r} does not exist; this server serves {model_name!r}",
            "model",
            404,
            "model_not_found",
        )
    if unknown := sorted(str(k) for k, v in body.items() if k not in KNOWN and not is_neutral(k, v)):
        raise ApiError(f"unrecognized request argument supplied: {', '.join(unknown)}", unknown[0])
    for key, neutral in UNSUPPORTED.items():
        if body.get(key) not in (None, neutral, {}):
            raise ApiError(f"'{key}' is not supported by this server", key)
    if "prompt" not in body:
        raise ApiError("you must provide a prompt", "prompt")
    req = CompletionRequest(prompts=_prompts(body["prompt"], lm, vocab, max_bytes))
    req.max_tokens = _get(body, "max_tokens", 16, lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    req.echo = _get(body, "echo", False, lambda v: isinstance(v, bool), "true or false")
    req.stream = _get(body, "stream", False, lambda v: isinstance(v, bool), "true or false")
    req.temperature = float(
        _get(body, "temperature", 1.0, lambda v: _is_number(v) and v >= 0, "a number >= 0")
    )
    req.top_p = float(_get(body, "top_p", 1.0, lambda v: _is_number(v) and 0 < v <= 1, "in (0, 1]"))
    req.logprobs = _get(
        body,
        "logprobs",
        None,
        lambda v: _is_int(v) and 0 <= v <= MAX_LOGPROBS,
        f"an integer in [0, {MAX_LOGPROBS}]",
    )
    req.n = _get(body, "n", 1, lambda v: _is_int(v) and 1 <= v <= MAX_N, f"an integer in [1, {MAX_N}]")
    if len(req.prompts) * req.n > MAX_CHOICES:
        raise ApiError(
            f"at most {MAX_CHOICES} choices per request (prompts x n), got {len(req.prompts)} x {req.n}", "n"
        )
    best_of = _get(body, "best_of", req.n, _is_int, "an integer")
    if best_of != req.n:
        raise ApiError("'best_of' other than n is not supported by this server", "best_of")
    seed = _get(body, "seed", None, _is_int, "an integer")
    req.seed = secrets.randbits(63) if seed is None else seed % 2**63
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and not (
        isinstance(stops, list)
        and len(stops) <= MAX_STOPS
        and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise ApiError(
            f"'stop' must be a string of 1 to {MAX_STOP_CHARS} characters or a list of at most {MAX_STOPS} "
            "of them",
            "stop",
        )
    req.stop = list(stops or [])
    opts = _get(body, "stream_options", {}, lambda v: isinstance(v, dict), "an object")
    if opts and not req.stream:
        raise ApiError("'stream_options' is only allowed with stream: true", "stream_options")
    req.include_usage = opts.get("include_usage", False)
    if not isinstance(req.include_usage, bool) or set(opts) - {"include_usage"}:
        raise ApiError("'stream_options' takes one field, include_usage: true or false", "stream_options")
    if req.max_tokens == 0 and not req.echo:
        raise ApiError(
            "'max_tokens' must be at least 1 (0 only with echo, to score the prompt)", "max_tokens"
        )
    for p in req.prompts:
        # the document's opening EOS is put in front of a prompt unless it opens with one: not counted twice
        opened = bool(p.ids) and p.ids[0] == lm.eos_id
        n = len(p.ids) - opened
        besides = " besides its opening EOS" if opened else ""  # (usage.prompt_tokens counts that EOS too)
        if n > lm.seq_len:
            raise ApiError(
                f"this model's maximum context length is {lm.seq_len} tokens, however the prompt has "
                f"{n} tokens{besides}",
                "prompt",
                code="context_length_exceeded",
            )
        if n + req.max_tokens > lm.seq_len:
            raise ApiError(
                f"this model's maximum context length is {lm.seq_len} tokens, however you requested "
                f"{_shown(n + req.max_tokens)} tokens ({n} in the prompt{besides}, {_shown(req.max_tokens)} for "
                "the completion); reduce the prompt or max_tokens",
                "max_tokens",
                code="context_length_exceeded",
            )
    return req
