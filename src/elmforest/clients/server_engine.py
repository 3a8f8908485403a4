"""The server's one model thread: every completion is a generator of steps, and one worker thread
runs the steps of all admitted completions in turn (round-robin), so concurrent streams advance
together, none is lost or starved, and the models (not thread-safe) are only ever touched from here.

A completion's step is one decoding step (or the echo's scoring): cancelling a job (its client left)
closes its generator at its next turn, which frees its KV caches and stops its work."""

from __future__ import annotations

import collections
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from elmforest.clients.server_api import CompletionRequest, Prompt
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


class Engine:
    """Runs jobs' steps on one thread; `max_active` jobs advance together, the rest wait in order."""

    def __init__(self, lm, max_active: int = 8):
        self.lm, self.max_active = lm, max_active
        self.steps = 0  # steps run, all jobs together (tests watch it stop when a client leaves)
        self._inbox: queue.Queue = queue.Queue()
        self._active: collections.deque = collections.deque()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="elmforest-engine", daemon=True)
        self._thread.start()

    def submit(self, work: Iterator, sink: Callable[[object], None]) -> Job:
        """Queue `work`: each of its items goes to `sink` (from the worker thread), then END, or the
        exception it raised."""
        job = Job(work, sink)
        self._inbox.put(job)
        return job

    @property
    def load(self) -> dict:
        return {"active": len(self._active), "waiting": self._inbox.qsize()}

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
        while not self._closed:
            self._admit(block=True)
            if not self._active:
                continue
            job = self._active.popleft()
            if job.cancelled:
                job.work.close()  # its generator's cleanup runs now: the KV caches go
                continue
            try:
                event = next(job.work)
            except StopIteration:
                _deliver(job, END)
                continue
            except Exception as e:  # the request fails, the server goes on
                _deliver(job, e)
                continue
            self.steps += 1
            _deliver(job, event)
            self._active.append(job)
        for job in self._active:
            job.work.close()


def _deliver(job: Job, event) -> None:
    try:
        job.sink(event)
    except RuntimeError:  # the event loop is gone (the server is shutting down)
        job.cancel()


def _finite(v: float) -> float:
    """JSON has no -inf: a token the mixture rules out gets OpenAI's floor instead."""
    return float(v) if math.isfinite(v) else -9999.0


def _hold_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` must wait: the start of a stop string that the next
    tokens may complete, or an incomplete UTF-8 character (decoded as U+FFFD)."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return max(hold, k)
    return hold


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def choice_steps(lm, req: CompletionRequest, prompt: Prompt, index: int, seed: int) -> Iterator[Chunk]:
    """One choice of a completion as a generator of Chunks, one per unit of model work: the echoed
    prompt (scored with `lm.score` when logprobs are asked for: the mixture the evaluation scores),
    then one per generated token. Text never runs past a stop string: text that could be the start of
    one is held back until the next tokens decide."""
    tok, n_top, offset = lm.tok, req.logprobs, 0

    def info(token_id: int, logprob, top, at: int) -> dict:
        logprob = None if logprob is None else _finite(logprob)
        alts = None
        if top is not None:
            alts = {tok.decode([t]): _finite(v) for t, v in top}
            alts.setdefault(tok.decode([token_id]), logprob)  # the chosen token is always listed
        return {"token": tok.decode([token_id]), "logprob": logprob, "top": alts, "offset": at}

    if req.echo:
        tokens = []
        if n_top is not None and prompt.ids:
            scored = lm.score([([], prompt.ids)], want_vocab=True)[0]
            for i, t in enumerate(prompt.ids):
                at = len(tok.decode(prompt.ids[:i]))
                if i == 0:  # OpenAI's convention: the first token has no context, so no log-prob
                    tokens.append(info(t, None, None, at))
                    continue
                v, top = scored.vocab_logprobs[i].topk(min(n_top, scored.vocab_logprobs.shape[-1]))
                tokens.append(info(t, scored.logprobs[i], zip(top.tolist(), v.tolist(), strict=True), at))
        offset = len(prompt.text)
        if req.max_tokens == 0:
            yield Chunk(index, prompt.text, tokens, "length")
            return
        yield Chunk(index, prompt.text, tokens)
    steps = generate_steps(
        lm.pool,
        tok,
        [lm.eos_id, *prompt.ids],
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
    text, sent, count, finish = "", 0, 0, "length"
    try:
        for step in steps:
            count += 1
            if step.token_id == lm.eos_id:
                finish = "stop"
                break
            ids.append(step.token_id)
            before, text = len(text), tok.decode(ids)
            tokens = []
            if n_top is not None:
                tokens = [info(step.token_id, step.logprob, step.top(n_top), offset + before)]
            cut = _first_stop(text, req.stop) if req.stop else None
            if cut is not None:
                text, finish = text[: max(cut, sent)], "stop"
                yield Chunk(index, text[sent:], tokens, "stop", count)
                return
            safe = max(len(text) - _hold_back(text, req.stop), sent)
            yield Chunk(index, text[sent:safe], tokens)
            sent = safe
    finally:
        steps.close()
    yield Chunk(index, text[sent:], [], finish, count)
