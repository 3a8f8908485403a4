"""The server's one model thread: every completion is a generator of steps, and one worker thread
runs the steps of all admitted completions in turn (round-robin), so concurrent streams advance
together, none is lost or starved, and the models (not thread-safe) are only ever touched from here.

A completion's step is one decoding step (or the echo's scoring): cancelling a job (its client left)
closes its generator at its next turn, which frees its KV caches and stops its work."""

from __future__ import annotations

import collections
import contextlib
import math
import queue
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from elmforest.clients.server_api import ApiError, CompletionRequest, Prompt
from elmforest.forest.generate import generate_steps


@dataclass
class Chunk:
    """A piece of one choice: new text, the tokens generated since the last piece, and at the end why
    it finished (with the token counts for `usage`)."""

    index: int
    text: str
    tokens: list[dict] = field(default_factory=list)  # {token, logprob, top, offset}, with logprobs on
    finish_reason: str | None = None
    completion_tokens: int = 0


class Job:
    def __init__(self, work: Iterator, sink: Callable[[object], None]):
        self.work, self.sink, self.cancelled = work, sink, False

    def cancel(self) -> None:
        self.cancelled = True


END = object()  # the sink's last event of a job that ran to its end


def engine_stopped() -> ApiError:
    return ApiError(
        "the server's model thread has stopped; restart the server", None, 500, type="server_error"
    )


class Engine:
    """Runs jobs' steps on one thread; `max_active` jobs advance together, the rest wait in order.

    A job's failure (its step, its cleanup or its sink raising) ends that job only; should the thread
    itself ever die, every job it held or that comes later gets an error at once (`alive` turns false,
    /health says so) instead of waiting forever."""

    def __init__(self, lm, max_active: int = 8):
        self.lm, self.max_active = lm, max_active
        self.steps = 0  # steps run, all jobs together (tests watch it stop when a client leaves)
        self.error: BaseException | None = None  # what stopped the thread, if anything did
        self._inbox: queue.Queue = queue.Queue()
        self._active: collections.deque = collections.deque()
        self._closed = self._stopped = False
        self._current = None  # the job whose turn it is (the worker thread's; /health reads it)
        self.stopping = False  # the server is shutting down: requests end with a 503 (server.py)
        self._thread = threading.Thread(target=self._run, name="elmforest-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return not self._stopped and self._thread.is_alive()

    def submit(self, work: Iterator, sink: Callable[[object], None]) -> Job:
        """Queue `work`: each of its items goes to `sink` (from the worker thread), then END, or the
        exception it raised."""
        job = Job(work, sink)
        self._inbox.put(job)
        if self._stopped:  # put after the thread's last look at its inbox: nobody else will answer
            self._fail_waiting()
        return job

    @property
    def load(self) -> dict:
        # the job taking its turn is out of the deque meanwhile: counted, or 8 admitted read as 7
        return {"active": len(self._active) + (self._current is not None), "waiting": self._inbox.qsize()}

    def close(self) -> None:
        self._closed = True
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def _admit(self, block: bool) -> None:
        while len(self._active) < self.max_active:
            try:
                job = self._inbox.get(block=block and not self._active)
            except queue.Empty:
                return
            if job is None:
                return
            self._active.append(job)

    def _run(self) -> None:
        job = None  # the job whose turn it is, out of the deque during its turn
        try:
            while not self._closed:
                self._admit(block=True)
                if not self._active:
                    continue
                job = self._current = self._active.popleft()
                try:
                    self._turn(job)
                except Exception as e:  # its cleanup or its sink failed: this job ends, the rest go on
                    _abandon(job, e)
                job = self._current = None
        except BaseException as e:  # a bug: the thread ends, everyone is answered below, /health says so
            self.error = e
            traceback.print_exception(e, file=sys.stderr)
        finally:
            self._stopped = True
            if job is not None and job not in self._active:
                _abandon(job, engine_stopped())
            while self._active:
                _abandon(self._active.popleft(), engine_stopped())
            self._fail_waiting()

    def _turn(self, job: Job) -> None:
        if job.cancelled:
            job.work.close()  # its generator's cleanup runs now: the KV caches go
            return
        try:
            event = next(job.work)
        except StopIteration:
            _deliver(job, END)
            return
        except Exception as e:  # the request fails, the server goes on
            _deliver(job, e)
            return
        self.steps += 1
        _deliver(job, event)
        self._active.append(job)

    def _fail_waiting(self) -> None:
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                _abandon(job, engine_stopped())


def _deliver(job: Job, event) -> None:
    try:
        job.sink(event)
    except RuntimeError:  # the event loop is gone (the server is shutting down)
        job.cancel()


def _abandon(job: Job, error: Exception) -> None:
    """End `job` with `error`, whatever its generator's cleanup or its sink do."""
    job.cancel()
    with contextlib.suppress(Exception):
        job.work.close()
    with contextlib.suppress(Exception):
        job.sink(error)


def _finite(v: float) -> float:
    """JSON has no -inf: a token the mixture rules out gets OpenAI's floor instead."""
    return float(v) if math.isfinite(v) else -9999.0


def _hold_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` must wait: an incomplete UTF-8 character (decoded as
    U+FFFD, which the next token may turn into anything) and, before it, the start of a stop string
    that the next tokens may complete. Only positions holding a stop's first character are tried."""
    body = text.rstrip("\ufffd")
    start = len(body)
    for s in stops:
        p = body.find(s[0], max(0, len(body) - len(s) + 1))
        while 0 <= p < start:
            if s.startswith(body[p:]):
                start = p  # the earliest start of all stops: the longest suffix to hold
                break
            p = body.find(s[0], p + 1)
    return len(text) - start


class StopFinder:
    """The first stop string in a text that grows a token at a time, each call searching only where a
    new one can be: from one stop's length before the end of the text already searched (the text
    before a trailing U+FFFD does not change any more)."""

    def __init__(self, stops: list[str]):
        self.stops, self.longest, self.searched = stops, max(map(len, stops), default=0), 0
        self.floor = 0  # text before it is the prompt's (an echoed U+FFFD the completion carries)

    def first(self, text: str, final: bool = False) -> int | None:
        """`final`: the text is whole (no token follows), so a trailing U+FFFD is one; until then it may
        be a character's first bytes, and a stop holding U+FFFD matched it there."""
        settled = text if final else text.rstrip("\ufffd")
        lo = max(self.floor, self.searched - self.longest + 1)
        found = [i for i in (settled.find(s, lo) for s in self.stops) if i >= 0]
        self.searched = len(settled)
        return min(found) if found else None


def token_text(tok, token_id: int) -> str:
    """A token as logprobs show it: its text, or, for a token that is only part of a UTF-8 character
    (it decodes to U+FFFD), OpenAI's `bytes:\\xNN...` spelling of its bytes, so tokens stay distinct."""
    text = tok.decode([token_id])
    if "\ufffd" not in text:
        return text
    raw = tok.token_bytes[token_id]
    try:
        raw.decode("utf-8")  # a token that spells U+FFFD itself keeps its text
        return text
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{c:02x}" for c in raw)


def _continues_a_character(tok, ids: list[int], token_id: int) -> bool:
    """Whether `token_id` opens with bytes that continue a UTF-8 character the bytes of `ids` left
    unfinished. Decoded, that character is a U+FFFD at the end of the text so far, and the token's
    text starts at it, not after it (its text_offset)."""
    raw = tok.token_bytes[token_id]
    return bool(raw) and raw[0] & 0xC0 == 0x80 and bool(_unfinished(tok, ids))


def _unfinished(tok, ids: list[int]) -> list[int]:
    """The last of `ids` from the one holding the first byte of a UTF-8 character their bytes leave
    unfinished ([] where they end on a whole character): a token-id prompt may end inside one."""
    raw = b""
    for n in range(1, min(len(ids), 4) + 1):
        raw = tok.token_bytes[ids[-n]] + raw
        for k in range(1, min(len(raw), 4) + 1):  # the last byte that is not a continuation byte
            c = raw[-k]
            if c & 0xC0 != 0x80:
                need = 2 if c & 0xE0 == 0xC0 else 3 if c & 0xF0 == 0xE0 else 4 if c & 0xF8 == 0xF0 else 1
                return ids[-n:] if need > k else []
        if len(raw) >= 4:
            return []
    return []


def _text_offset(tok, ids: list[int], text: str, token_id: int) -> int:
    """Where the token after `ids` (decoded: `text`) starts in the text."""
    return (
        len(text) - 1 if text.endswith("\ufffd") and _continues_a_character(tok, ids, token_id) else len(text)
    )


def choice_steps(lm, req: CompletionRequest, prompt: Prompt, index: int, seed: int) -> Iterator[Chunk]:
    """One choice of a completion as a generator of Chunks, one per unit of model work: the echoed
    prompt (scored with `lm.score` when logprobs are asked for: the mixture the evaluation scores),
    then one per generated token. Text never runs past a stop string: text that could be the start of
    one is held back until the next tokens decide."""
    tok, n_top, offset = lm.tok, req.logprobs, 0

    def info(token_id: int, logprob, top, at: int) -> dict:
        logprob = None if logprob is None else _finite(logprob)
        alts, token = None, token_text(tok, token_id)
        if top is not None:  # most likely first: of tokens that read alike, the likeliest is shown
            alts = {}
            for t, v in top:
                alts.setdefault(token_text(tok, t), _finite(v))
            alts[token] = logprob  # the chosen token is always listed, with its own log-prob
        return {"token": token, "logprob": logprob, "top": alts, "offset": at}

    # the document opens with EOS, put in front only when the prompt does not open with it already
    # (a token-id prompt may): scoring and generation read the same tokens
    lead = 1 if prompt.ids and prompt.ids[0] == lm.eos_id else 0
    # a token-id prompt ending inside a character: the tokens that finish it finish it in the text (its
    # whole character opens the completion), where decoded alone they read U+FFFD
    carry = _unfinished(tok, prompt.ids)
    cut = len(tok.decode(carry)) - 1  # where the unfinished character's U+FFFD starts
    # echoed, the prompt leaves that U+FFFD to the completion, which opens with the whole character (or,
    # where the next token leaves it unfinished, with the U+FFFD): echo + completion show it once
    held = 1 if req.echo and carry and req.max_tokens else 0
    if req.echo:
        tokens = []
        if n_top is not None and prompt.ids:
            body = prompt.ids[lead:]
            scored = lm.score([([], body)], want_vocab=True)[0] if body else None
            for i, t in enumerate(prompt.ids):
                at = _text_offset(tok, prompt.ids[:i], tok.decode(prompt.ids[:i]), t)
                if i == 0:  # OpenAI's convention: the first token has no context, so no log-prob
                    tokens.append(info(t, None, None, at))
                    continue
                vocab = scored.vocab_logprobs[i - lead]
                v, top = vocab.topk(min(n_top, vocab.shape[-1]))
                tokens.append(
                    info(t, scored.logprobs[i - lead], zip(top.tolist(), v.tolist(), strict=True), at)
                )
        offset = len(prompt.text) - held
        if req.max_tokens == 0:
            yield Chunk(index, prompt.text, tokens, "length")
            return
        yield Chunk(index, prompt.text[:offset], tokens)
    steps = generate_steps(
        lm.pool,
        tok,
        prompt.ids if lead else [lm.eos_id, *prompt.ids],
        lm.names,
        max_new_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=seed,
        prior=lm.prior,
        weighting=lm.weighting,
        routing=lm.routing,
    )
    ids: list[int] = []
    text, sent, count, finish, stops = "", 0, 0, "length", StopFinder(req.stop)
    left = ""  # the prompt's U+FFFD the echo left out, where the next token does not finish it
    try:
        for step in steps:
            count += 1
            if step.token_id == lm.eos_id:
                finish = "stop"
                break
            if carry and not ids and not _continues_a_character(tok, carry, step.token_id):
                carry = []  # the prompt's character is left unfinished: not the completion's
                left = "\ufffd" * held
                stops.floor = held  # a stop is the completion's, never the prompt's U+FFFD
            before = len(left) + _text_offset(tok, carry + ids, text[len(left) :], step.token_id)
            ids.append(step.token_id)
            text = left + (tok.decode(carry + ids)[cut:] if carry else tok.decode(ids))
            tokens = []
            if n_top is not None:
                tokens = [info(step.token_id, step.logprob, step.top(n_top), offset + before)]
            hit = stops.first(text) if req.stop else None  # not `cut`: the carried character's, reused
            if hit is not None:  # below (reused as this, it re-read the carried token's earlier text)
                # cut at 0 where the echo left the prompt's U+FFFD here: echo + completion keep the prompt
                text, finish = text[: max(hit, sent)] or "\ufffd" * held, "stop"
                yield Chunk(index, text[sent:], tokens, "stop", count)
                return
            safe = max(len(text) - _hold_back(text, req.stop), sent)
            yield Chunk(index, text[sent:safe], tokens)
            sent = safe
    finally:
        steps.close()
    if held and not ids:  # EOS came first: the character stays unfinished, its U+FFFD the echo left out
        text, stops.floor = "\ufffd", 1
    if req.stop and (hit := stops.first(text, final=True)) is not None:  # one ending in U+FFFD, now settled
        text, finish = text[: max(hit, sent)] or "\ufffd" * held, "stop"
    yield Chunk(index, text[sent:], [], finish, count)
