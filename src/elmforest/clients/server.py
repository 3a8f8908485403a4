"""An OpenAI-compatible HTTP server for a forest (or one checkpoint): `POST /v1/completions`
(streamed or not, with logprobs and echo), `GET /v1/models`, `GET /health`.

The model is a ForestLM (forest/lm.py), so what the server samples and scores is the mixture that
`elmforest eval` measures, in any of its modes. The HTTP side is asynchronous and never touches a
model: requests are checked in full first (server_api.py), then their choices are queued to the one
model thread (server_engine.py), whose events come back through an asyncio queue. A client that
leaves is noticed while its events are awaited, and its work is cancelled at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import socket
import threading
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from elmforest.clients.server_api import (
    MAX_CHOICES,
    ApiError,
    CompletionRequest,
    max_prompt_bytes,
    parse_completion,
)
from elmforest.clients.server_engine import END, Chunk, Engine, choice_steps, engine_stopped
from elmforest.model.build import read_config
from elmforest.utils.errors import Diverged, UserError

POLL_S = 0.1  # how often a waiting request checks that its client is still there


def _logprobs(tokens: list[dict]) -> dict:
    return {
        "tokens": [t["token"] for t in tokens],
        "token_logprobs": [t["logprob"] for t in tokens],
        "top_logprobs": [t["top"] for t in tokens],
        "text_offset": [t["offset"] for t in tokens],
    }


def _error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    # broken weights are the server's fault, not the request's (NonFiniteWeights is a UserError too: an
    # expert loaded when a request is first routed to it, in cluster mode, would be answered 400)
    if isinstance(e, UserError) and not isinstance(e, Diverged):
        return ApiError(str(e))
    return ApiError(
        f"the model failed on this request: {type(e).__name__}: {e}", None, 500, type="server_error"
    )


class Completion:
    """One request's choices, queued to the engine. Their chunks gather in a deque from the engine's
    thread, which wakes the event loop for every chunk of a stream but, for an answer sent whole, only
    when a choice ends: the loop then costs the model thread nothing per token."""

    def __init__(self, engine: Engine, req: CompletionRequest, model: str):
        self.req, self.model, self.engine = req, model, engine
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.pending: collections.deque = collections.deque()
        self.wake = asyncio.Event()
        loop = asyncio.get_running_loop()

        def sink(ev):  # called from the engine's thread
            self.pending.append(ev)
            if req.stream or not isinstance(ev, Chunk) or ev.finish_reason:
                loop.call_soon_threadsafe(self.wake.set)

        self.jobs = []
        for p, prompt in enumerate(req.prompts):
            for i in range(req.n):
                k = p * req.n + i  # every choice its own seed: the same prompt twice samples twice
                work = choice_steps(engine.lm, req, prompt, k, req.seed + k)
                self.jobs.append(engine.submit(work, sink))
        self.completion_tokens = 0

    def cancel(self) -> None:
        for j in self.jobs:
            j.cancel()

    async def chunks(self, request: Request):
        """Every choice's chunks in the order they come; cancels the work if the client leaves."""
        running = len(self.jobs)
        try:
            while running:
                if self.engine.stopping:  # ended now, not cancelled with a traceback at the grace's end
                    raise ApiError(
                        "the server is shutting down; send the request again once it is back",
                        None,
                        503,
                        "server_shutting_down",
                        type="server_error",
                    )
                self.wake.clear()  # before looking: a chunk added after the look sets it again
                if not self.pending:
                    try:
                        await asyncio.wait_for(self.wake.wait(), POLL_S)
                    except TimeoutError:
                        if await request.is_disconnected():
                            return
                        if not self.engine.alive and not self.pending:  # a safety net: it answers
                            raise engine_stopped() from None
                    continue
                ev = self.pending.popleft()
                if ev is END:
                    running -= 1
                elif isinstance(ev, Exception):
                    raise _error(ev)
                else:
                    self.completion_tokens += ev.completion_tokens
                    yield ev
        finally:
            self.cancel()  # a no-op for finished jobs; stops the rest (client gone, or an error)

    def usage(self) -> dict:
        prompt = sum(len(p.ids) for p in self.req.prompts)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
        }

    def head(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}

    def choice(self, c: Chunk, tokens: list[dict], text: str) -> dict:
        lp = _logprobs(tokens) if self.req.logprobs is not None else None
        return {"text": text, "index": c.index, "logprobs": lp, "finish_reason": c.finish_reason}

    async def response(self, request: Request) -> dict:
        texts: dict[int, list[str]] = {}
        tokens: dict[int, list[dict]] = {}
        last: dict[int, Chunk] = {}
        async with contextlib.aclosing(self.chunks(request)) as chunks:
            async for c in chunks:
                texts.setdefault(c.index, []).append(c.text)
                tokens.setdefault(c.index, []).extend(c.tokens)
                last[c.index] = c
        choices = [self.choice(last[i], tokens[i], "".join(texts[i])) for i in sorted(last)]
        return {**self.head(), "choices": choices, "usage": self.usage()}

    async def events(self, request: Request):
        """Server-sent events: a chunk per piece of a choice, then (if asked) the usage, then [DONE]."""
        try:
            # closed on the way out, whichever it is (a client gone closes this generator): the work
            # is cancelled then, not whenever the garbage collector finalises an abandoned generator
            async with contextlib.aclosing(self.chunks(request)) as chunks:
                async for c in chunks:
                    if c.text or c.tokens or c.finish_reason:
                        body = {**self.head(), "choices": [self.choice(c, c.tokens, c.text)]}
                        if self.req.include_usage:
                            body["usage"] = None
                        yield f"data: {json.dumps(body)}\n\n"
            if self.req.include_usage:
                yield f"data: {json.dumps({**self.head(), 'choices': [], 'usage': self.usage()})}\n\n"
        except Exception as e:  # the status line is sent already: the error is an event
            yield f"data: {json.dumps(_error(e).body())}\n\n"
        yield "data: [DONE]\n\n"


def vocab_size(lm) -> int:
    """From the checkpoint's config, so the HTTP side never loads (or touches) a model."""
    v = read_config(Path(lm.pool.dirs[0])).get("vocab_size")
    return int(v) if isinstance(v, int) else lm.vocab_size


def max_body_bytes(max_bytes: int) -> int:
    """The largest request body read: every prompt a request may hold at the longest text the context
    could take, each byte written as a 6-character JSON escape, plus room for the other fields.
    Anything larger is refused while it arrives, so a client cannot make the server hold (or parse on
    its event loop) an unbounded body."""
    return 6 * MAX_CHOICES * max_bytes + 2**16


async def read_body(request: Request, limit: int) -> bytes:
    too_big = ApiError(
        f"the request body is larger than this server reads ({limit} bytes): the prompts could not fit "
        "in the model's context",
        None,
        413,
        "request_too_large",
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_big
        parts.append(part)
    return b"".join(parts)


def parse_body(raw: bytes, lm, name: str, vocab: int, max_bytes: int) -> CompletionRequest:
    try:
        body = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer past Python's 4300 digits
        raise ApiError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError("the request body's JSON is nested too deeply") from None
    return parse_completion(body, lm, name, vocab, max_bytes)


def shown_mode(lm) -> str:
    """`single` for one checkpoint (its mode, ensemble by default, weighs nothing), else the forest's mode."""
    return lm.mode if lm.forest is not None else "single"


def create_app(lm, name: str | None = None, max_active: int = 8) -> FastAPI:
    """The app serving `lm` (forest/lm.py's ForestLM) as the model `name` (default: its directory's
    name). `app.state.engine` runs the model; close it with `app.state.engine.close()`."""
    name = name or lm.path.name
    vocab, max_bytes = vocab_size(lm), max_prompt_bytes(lm)
    engine = Engine(lm, max_active)
    app = FastAPI(title="elmforest", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.model = engine, name
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # unknown routes, wrong methods
        return JSONResponse(ApiError(str(e.detail), None, e.status_code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):  # a bug: still an answer clients can read
        err = ApiError(f"internal server error: {type(e).__name__}: {e}", None, 500, type="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health():
        """503 once the model thread has stopped: every request would fail, so a supervisor can
        restart the server."""
        ok = engine.alive
        body = {"status": "ok" if ok else "error", "model": name, "mode": shown_mode(lm), "experts": lm.names}
        if not ok:
            body["error"] = f"the model thread stopped: {engine.error!r}"
        return JSONResponse({**body, **engine.load}, status_code=200 if ok else 503)

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "elmforest"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != name:
            raise ApiError(f"the model {model_id!r} does not exist", "model", 404, "model_not_found")
        return model_card()

    max_body = max_body_bytes(max_bytes)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):  # said, not a bare "Not Found": OpenAI clients call it by default
        raise ApiError(
            "this server has no chat endpoint: the experts are language models without a chat template; "
            "use /v1/completions with the text to continue",
            None,
            404,
            "unsupported_endpoint",
        )

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await read_body(request, max_body)
        # parsing and tokenizing are off the event loop: a long prompt never holds back /health or
        # other requests
        req = await asyncio.to_thread(parse_body, raw, lm, name, vocab, max_bytes)
        c = Completion(engine, req, name)
        if req.stream:
            return StreamingResponse(c.events(request), media_type="text/event-stream")
        return JSONResponse(await c.response(request))

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free one), so a caller knows the port before serving, and a port
    in use is said before the models load, not after."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        shown = f"[{host}]" if ":" in host else host
        raise UserError(
            f"cannot listen on {shown}:{port}: {e.strerror or e}; choose another --port (0: any free one)"
            + (" or --host" if e.errno != errno.EADDRINUSE else "")
        ) from None
    return sock


class Background:
    """The app served by uvicorn on a thread of this process (tests, benchmarks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.app, self.sock = app, bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = _server(app, log_level="warning", timeout_graceful_shutdown=2)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.app.state.engine.stopping = True
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.app.state.engine.close()
        with contextlib.suppress(OSError):
            self.sock.close()


def _server(app: FastAPI, **config):
    """uvicorn's server, which on Ctrl-C or SIGTERM first tells the requests in flight to end (streams
    with an error event and [DONE], others with a 503), so they finish within the graceful shutdown
    instead of being cancelled at its end with a traceback each and a stream cut without [DONE]."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.engine.stopping = True
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, **config))


def serve(
    lm, host: str = "127.0.0.1", port: int = 8000, name: str | None = None, max_active: int = 8
) -> None:
    """Serve until interrupted (Ctrl-C); the port is bound once the models have loaded."""
    if lm.routing is None:  # every expert loads now: a broken checkpoint fails here, not on a request
        for j in range(len(lm.names)):
            lm.pool.model(j)
    app = create_app(lm, name, max_active)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {app.state.model!r} ({shown_mode(lm)}: {', '.join(lm.names)}) at "
        f"http://{shown}:{sock.getsockname()[1]}/v1",
        flush=True,
    )
    try:
        _server(app, log_level="info", timeout_graceful_shutdown=5).run(sockets=[sock])
    finally:
        app.state.engine.close()
        sock.close()
