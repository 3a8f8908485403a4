"""The OpenAI-compatible server, through the official `openai` client: it samples what `generate`
samples, scores what `ForestLM.score` and Bayes' rule score, streams what it answers whole, never lets
text past a stop string (scripted tokens split characters too), loses no concurrent request, stops
working for a client that left, answers every bad request with a 4xx error object while it keeps
serving, caps the work of one request, and never leaves a request waiting on a model thread that died."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from elmforest.clients import server, server_engine  # noqa: E402
from elmforest.clients.server import Background, Completion, create_app  # noqa: E402
from elmforest.clients.server_api import CompletionRequest, Prompt  # noqa: E402
from elmforest.clients.server_engine import END, Chunk, Engine, Job, _hold_back, choice_steps  # noqa: E402
from elmforest.forest.generate import Step, generate, generate_steps, sample_token  # noqa: E402
from elmforest.forest.lm import open_lm  # noqa: E402
from elmforest.forest.manifest import Forest  # noqa: E402
from elmforest.model.build import load_model  # noqa: E402


@pytest.fixture(scope="module")
def served(forest_dir):
    lm = open_lm(forest_dir, device="cpu", precision="fp32")
    bg = Background(create_app(lm, max_active=8))
    client = openai.OpenAI(base_url=bg.url + "/v1", api_key="x", max_retries=0, timeout=60)
    yield lm, bg, client
    bg.close()


def _gen(forest_dir, prompt, n):
    return generate(forest_dir, prompt, max_new_tokens=n, temperature=0, device="cpu", precision="fp32")


def test_greedy_completions_are_generates_and_streams_concatenate(served, forest_dir):
    lm, bg, c = served
    prompts = ["the lord", "def return self"]
    r = c.completions.create(model="f", prompt=prompts, max_tokens=10, temperature=0, logprobs=3)
    assert r.object == "text_completion" and r.model == "f" and r.id.startswith("cmpl-")
    for i, p in enumerate(prompts):
        g = _gen(forest_dir, p, 10)
        ch = r.choices[i]
        assert ch.index == i and ch.text == g.text
        assert ch.finish_reason == ("stop" if g.token_ids[-1] == lm.eos_id else "length")
        lp = ch.logprobs  # the chosen tokens with their mixture log-probs, as generate() reports them
        n_text = len(g.token_ids) - (g.token_ids[-1] == lm.eos_id)
        assert "".join(lp.tokens) == ch.text and len(lp.tokens) == n_text
        assert lp.token_logprobs == pytest.approx(g.logprobs[:n_text], abs=1e-6)
        for tok, top, v in zip(lp.tokens, lp.top_logprobs, lp.token_logprobs, strict=True):
            assert len(top) == 3 and top[tok] == pytest.approx(v) and max(top.values()) == pytest.approx(v)
        assert lp.text_offset == [len("".join(lp.tokens[:k])) for k in range(len(lp.tokens))]
        s = c.completions.create(
            model="f",
            prompt=p,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(s)
        assert "".join(x.choices[0].text for x in chunks[:-1]) == g.text
        assert chunks[-2].choices[0].finish_reason == ch.finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(g.token_ids)
    used = sum(len(lm.encode(p)) for p in prompts)
    assert r.usage.prompt_tokens == used and r.usage.total_tokens == used + r.usage.completion_tokens


def test_stop_strings_cut_the_text_also_across_tokens_while_streaming(served, forest_dir):
    lm, bg, c = served
    full = _gen(forest_dir, "the lord", 12).text
    stop = full[3:7]  # spans a token boundary (tokens here are 2-6 characters)
    want = full[: full.find(stop)]
    r = c.completions.create(model="f", prompt="the lord", max_tokens=12, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    s = c.completions.create(
        model="f", prompt="the lord", max_tokens=12, temperature=0, stop=stop, stream=True
    )
    pieces = [x.choices[0].text for x in s]
    assert "".join(pieces) == want and all(stop not in "".join(pieces[:k]) for k in range(len(pieces) + 1))
    assert (
        _hold_back("ab\ufffd", []) == 1 and _hold_back("xx ab", ["abc"]) == 2 and _hold_back("x", ["y"]) == 0
    )
    assert _hold_back("xb\ufffd", ["b中"]) == 2 and _hold_back("ab\ufffd\ufffd", ["zz", "b"]) == 2


class _BytesTok:
    """A tokenizer whose tokens are byte strings, decoded as a byte-level BPE decodes them."""

    def __init__(self, vocab: list[bytes]):
        self.vocab = vocab

    def decode(self, ids) -> str:
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", "replace")

    @property
    def token_bytes(self) -> list[bytes]:
        return self.vocab


def _scripted(monkeypatch, vocab: list[bytes], script: list[int], mixture=None):
    """An lm whose generation yields the `script`ed token ids (id 0 is EOS), whatever the request."""
    mix = torch.zeros(len(vocab), dtype=torch.float64) if mixture is None else mixture

    def steps(pool, tok, prompt_ids, names, *, max_new_tokens, **kw):
        for t in script[:max_new_tokens]:
            yield Step(t, float(mix[t]), mix, {})

    monkeypatch.setattr(server_engine, "generate_steps", steps)
    return SimpleNamespace(tok=_BytesTok(vocab), eos_id=0, pool=None, names=["e"], prior=None,
                           weighting="posterior", routing=None)  # fmt: skip


def _choice(lm, stop, logprobs=None) -> list[Chunk]:
    req = CompletionRequest(prompts=[Prompt("", [])], max_tokens=64, stop=stop, logprobs=logprobs)
    return list(choice_steps(lm, req, req.prompts[0], 0, 0))


def _first_stop_brute(lm, script, stops) -> tuple[str, str]:
    """The text and finish reason, from the whole decoded text after each token: cut before the
    earliest stop in the first text that holds one, a trailing U+FFFD only once no token follows (until
    then it may be the first bytes of a character)."""
    for k in range(1, len(script) + 1):
        text = lm.tok.decode(script[:k])
        text = text if k == len(script) else text.rstrip("\ufffd")
        found = [text.find(s) for s in stops if s in text]
        if found:
            return text[: min(found)], "stop"
    return lm.tok.decode(script), "length"


def test_streamed_text_never_shows_a_stop_string_multibyte_ones_included(monkeypatch):
    zh = "中".encode()  # 3 bytes: a token may end inside the character
    lm = _scripted(monkeypatch, [b"", b"x", b"b", zh[:2], zh[2:]], [1, 2, 3, 4, 1])
    pieces = _choice(lm, ["b中"])  # "xb\ufffd": the "b" must wait with the incomplete character
    assert [c.text for c in pieces] == ["x", "", "", ""] and pieces[-1].finish_reason == "stop"
    lm = _scripted(monkeypatch, [b"", b"he", b"llo wo", b"rld"], [1, 2, 3])
    assert [c.text for c in _choice(lm, ["o w"])] == ["he", "ll"]  # found across a token boundary
    lm = _scripted(monkeypatch, [b"", b"hel", b"lo"], [1, 2])
    assert [c.text for c in _choice(lm, ["lo"])] == ["he", "l"]  # "l" waited: it began the stop
    # random scripts of whole and split characters against the brute-force cut: every streamed prefix
    # is a prefix of it, and all of them together are it
    e, vocab = "é".encode(), [b"", b"a", b"b", b"ab", zh[:1], zh[1:], zh, zh[:2], zh[2:], "é".encode()]
    vocab += [e[:1], e[1:], b" "]
    rng = random.Random(0)
    for _ in range(300):
        script = [rng.randrange(1, len(vocab)) for _ in range(rng.randint(1, 12))]
        stops = [
            "".join(rng.choice("ab中é \ufffd") for _ in range(rng.randint(1, 3)))  # U+FFFD: a lone byte's
            for _ in range(rng.randint(1, 3))
        ]
        lm = _scripted(monkeypatch, vocab, script)
        chunks = _choice(lm, stops)
        want, finish = _first_stop_brute(lm, script, stops)
        texts = [c.text for c in chunks]
        assert "".join(texts) == want and chunks[-1].finish_reason == finish, (script, stops)
        assert all(want.startswith("".join(texts[:k])) for k in range(len(texts))), (script, stops)
    finder = server_engine.StopFinder(["ab"])  # each token searches only where a new stop can be
    assert finder.first("x" * 1000) is None and finder.first("ab" + "x" * 999 + "ab") == 1001


def _owners(raw: bytes) -> list[int]:
    """For each byte, the index in the decoded text of the character it belongs to, from Python's
    incremental UTF-8 decoder fed one byte at a time: a byte that breaks an unfinished character
    belongs to the one after that character's U+FFFD."""
    import codecs

    dec, out, owners = codecs.getincrementaldecoder("utf-8")("replace"), "", []
    for b in raw:
        pending = dec.getstate()[0]
        new = dec.decode(bytes([b]))
        owners.append(len(out) + (1 if pending and new.startswith("\ufffd") else 0))
        out += new
    return owners


def test_text_offsets_point_at_the_character_a_token_starts_in(monkeypatch):
    zh, e = "中".encode(), "é".encode()
    vocab = [b"", b"a", zh[:1], zh[1:], zh[:2], zh[2:], zh, e[:1], e[1:], e, b"\xad"]
    rng = random.Random(0)
    for _ in range(300):
        script = [rng.randrange(1, len(vocab)) for _ in range(rng.randint(1, 10))]
        lm = _scripted(monkeypatch, vocab, script)
        got = [t["offset"] for c in _choice(lm, [], logprobs=0) for t in c.tokens]
        raw, starts = (
            b"".join(vocab[i] for i in script),
            itertools.accumulate([0, *map(len, (vocab[i] for i in script))]),
        )
        owners = _owners(raw)
        assert got == [owners[s] for s in list(starts)[:-1]], script
    # a split character: its second token starts at it, not after it (the old offset was 1)
    lm = _scripted(monkeypatch, vocab, [4, 5, 1])
    assert [t["offset"] for c in _choice(lm, [], logprobs=0) for t in c.tokens] == [0, 0, 1]


def test_top_logprobs_keep_the_likeliest_of_tokens_that_read_alike(monkeypatch):
    mix = torch.tensor([-9.0, -0.5, -1.0, -2.0], dtype=torch.float64)  # ids 1 and 2 both read "a"
    lm = _scripted(monkeypatch, [b"", b"a", b"a", b"b"], [3, 2], mix)
    first, second = (c.tokens[0] for c in _choice(lm, [], logprobs=2)[:2])
    assert first["token"] == "b" and first["top"] == {"a": -0.5, "b": -2.0}
    assert second["token"] == "a" and second["top"] == {"a": -1.0}  # the chosen one: its own value


def test_echo_scores_the_prompt_as_score_and_bayes_rule_do(served, forest_dir):
    lm, bg, c = served
    prompt = "the lord said unto moses"
    ids = lm.encode(prompt)
    r = c.completions.create(model="f", prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=2)
    ch = r.choices[0]
    assert ch.text.startswith(prompt)
    lp = ch.logprobs
    assert (
        "".join(lp.tokens[: len(ids)]) == prompt
        and lp.token_logprobs[0] is None
        and lp.top_logprobs[0] is None
    )
    scored = lm.score([([], ids)], want_vocab=True)[0]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(scored.logprobs[1:], abs=1e-6)
    # brute force: every expert reads EOS + prompt without any cache; the weights are the uniform prior
    # times each expert's likelihood of the text before; the greedy first new token is the argmax after it
    forest = Forest.load(forest_dir)
    seq = torch.tensor([[lm.eos_id, *ids]])
    with torch.no_grad():
        per = torch.stack([
            torch.log_softmax(load_model(forest.expert_dir(n)).eval()(input_ids=seq).logits[0].double(), -1)
            for n in lm.names
        ])  # fmt: skip
    tgt = torch.nn.functional.pad(
        per[:, :-1].gather(-1, seq[0, 1:].expand(len(lm.names), -1)[..., None])[..., 0], (0, 1)
    )
    log_w = torch.log_softmax(torch.cumsum(tgt, -1) - tgt, dim=0)  # [N, T]: Bayes over the prefix
    mix = torch.logsumexp(log_w[..., None] + per, 0)  # [T, V]: the mixture after each token read
    want = [*mix[:-1].gather(-1, seq[0, 1:, None])[:, 0].tolist(), float(mix[-1].max())]
    assert lp.token_logprobs[1 : len(ids) + 1] == pytest.approx(want[1:], abs=1e-4)
    assert lp.tokens[len(ids)] == lm.tok.decode([int(mix[-1].argmax())])
    for i, top in enumerate(lp.top_logprobs[1 : len(ids)], start=1):
        assert max(top.values()) == pytest.approx(float(mix[i].max()), abs=1e-4) and 2 <= len(top) <= 3
    s = c.completions.create(model="f", prompt=prompt, max_tokens=2, temperature=0, echo=True, stream=True)
    assert "".join(x.choices[0].text for x in s) == ch.text
    only = c.completions.create(model="f", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert only.choices[0].text == prompt and only.usage.completion_tokens == 0
    assert only.choices[0].logprobs.token_logprobs == lp.token_logprobs[: len(ids)]


def test_concurrent_requests_are_all_answered_as_if_alone(served):
    """20 requests at once (8 decoded together, 12 waiting): each generation keeps its own KV caches
    while they interleave, so sampled and greedy answers are those of the same requests one by one."""
    lm, bg, c = served
    asks = [
        dict(prompt=p, temperature=t, seed=s)
        for p in ("the lord", "license", "def")
        for t, s in ((0, 0), (1.0, 7))
    ]
    alone = [c.completions.create(model="f", max_tokens=8, **a).choices[0].text for a in asks]
    out: dict[int, str] = {}

    def ask(i):
        out[i] = c.completions.create(model="f", max_tokens=8, **asks[i % len(asks)]).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [out.get(i) for i in range(20)] == [alone[i % len(asks)] for i in range(20)]
    assert httpx.get(bg.url + "/health").json()["active"] == 0


def test_each_choice_of_a_request_samples_with_its_own_seed(served):
    """Choice i of every prompt had seed `seed + i`: the same prompt sent twice in one request gave the
    same sample twice. Now each choice in order takes the next seed, as `n` choices always did."""
    lm, bg, c = served
    two = c.completions.create(model="f", prompt=["the", "the"], max_tokens=8, temperature=1.0, seed=5)
    n2 = c.completions.create(model="f", prompt="the", max_tokens=8, temperature=1.0, seed=5, n=2)
    texts = [ch.text for ch in sorted(two.choices, key=lambda ch: ch.index)]
    assert texts[0] != texts[1] and texts == [ch.text for ch in sorted(n2.choices, key=lambda ch: ch.index)]


def test_broken_weights_met_while_answering_are_the_servers_error_not_the_requests():
    """NonFiniteWeights is a UserError too: an expert first loaded for a request (cluster mode) with NaN
    weights was answered 400, invalid request."""
    from elmforest.clients.server import _error
    from elmforest.utils.errors import NonFiniteWeights, UserError

    assert _error(NonFiniteWeights("x: non-finite")).status == 500
    assert _error(UserError("bad prompt")).status == 400


class _Work:
    """A job's work: `n` items; `gate` holds the first one back; `close` may raise, `next` may raise
    anything (a BaseException gets past every `except Exception`)."""

    def __init__(self, n, gate=None, close_error=None, next_error=None):
        self.n, self.gate, self.close_error, self.next_error, self.closed = (
            n,
            gate,
            close_error,
            next_error,
            False,
        )

    def __iter__(self):
        return self

    def __next__(self):
        if self.gate is not None:
            self.gate.wait(10)
            self.gate = None
        if self.next_error is not None:
            raise self.next_error
        if self.n == 0:
            raise StopIteration
        self.n -= 1
        return self.n

    def close(self):
        self.closed = True
        if self.close_error is not None:
            raise self.close_error


def _sink(events, done):
    def sink(ev):
        events.append(ev)
        if ev is END or isinstance(ev, BaseException):
            done.set()

    return sink


def test_a_job_whose_cleanup_or_sink_fails_ends_alone_and_the_engine_goes_on():
    eng = Engine(None, max_active=4)
    try:
        go, ev, done = threading.Event(), {k: [] for k in "abc"}, {k: threading.Event() for k in "abc"}
        left = eng.submit(_Work(5, gate=go, close_error=ValueError("close")), _sink(ev["a"], done["a"]))
        left.cancel()  # its client left: its next turn closes it, and the close fails
        go.set()

        def bad_sink(e):
            ev["c"].append(e)
            done["c"].set()
            raise ValueError("sink")

        c_work = _Work(5)
        eng.submit(c_work, bad_sink)
        eng.submit(_Work(3), _sink(ev["b"], done["b"]))
        assert all(d.wait(10) for d in done.values())
        assert ev["b"] == [2, 1, 0, END] and isinstance(ev["a"][-1], ValueError) and c_work.closed
        assert eng.alive
    finally:
        eng.close()


class _Bug(BaseException):
    pass


def test_a_dead_engine_answers_every_job_with_an_error():
    eng = Engine(None, max_active=1)
    go, ev, done = threading.Event(), {k: [] for k in "abc"}, {k: threading.Event() for k in "abc"}
    eng.submit(_Work(3, gate=go, next_error=_Bug()), _sink(ev["a"], done["a"]))
    eng.submit(_Work(3), _sink(ev["b"], done["b"]))  # waits: one job at a time
    go.set()
    assert done["a"].wait(10) and done["b"].wait(10)
    eng.submit(_Work(3), _sink(ev["c"], done["c"]))  # after its death: answered at once
    assert done["c"].wait(1) and not eng.alive and isinstance(eng.error, _Bug)
    for k in "abc":
        assert [(e.status, e.type) for e in ev[k]] == [(500, "server_error")], k


def test_a_stream_closed_early_cancels_its_work_at_once():
    async def main():
        engine = SimpleNamespace(lm=None, alive=True, submit=Job)
        req = CompletionRequest(prompts=[Prompt("a", [1]), Prompt("b", [2])], stream=True)
        c = Completion(engine, req, "m")
        c.pending.extend([Chunk(0, "x"), Chunk(1, "y")])
        events = c.events(None)
        assert (await events.__anext__()).startswith("data: {")
        await events.aclose()  # the client left: the response closes the generator
        return [j.cancelled for j in c.jobs]

    assert asyncio.run(main()) == [True, True]


def test_the_bench_reads_the_servers_output_so_it_never_blocks(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).parents[1] / "bench/serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    chatty = (  # the server's first line, then an access log far past a pipe's 64 KiB
        "import sys; print('serving m at http://h:1/v1', flush=True)\n"
        "for i in range(20000): print(f'INFO: 127.0.0.1 - \"POST /v1/completions HTTP/1.1\" 200 OK {i}')"
    )
    proc, url = bench.launch([sys.executable, "-c", chatty])
    try:
        assert url == "http://h:1" and proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def _slow(lm, delay=0.03):
    step = lm.pool.next_logprobs

    def slow(j, ids):
        time.sleep(delay)
        return step(j, ids)

    lm.pool.next_logprobs = slow


def _settles(engine, limit):
    """The engine's step count stops growing, below `limit`."""
    time.sleep(0.5)
    before = engine.steps
    time.sleep(0.5)
    return engine.steps == before < limit


def test_a_client_that_leaves_stops_its_work(forest_dir):
    lm = open_lm(forest_dir, device="cpu", precision="fp32")
    _slow(lm)  # ~0.1 s a step: 60 steps would take 6 s
    bg = Background(create_app(lm))
    try:
        body = {"model": "f", "prompt": "the", "max_tokens": 60, "temperature": 0, "stream": True}
        with httpx.Client(timeout=30) as h, h.stream("POST", bg.url + "/v1/completions", json=body) as r:
            lines = itertools.islice(r.iter_lines(), 6)
            assert sum(line.startswith("data: {") for line in lines) >= 2
        assert _settles(bg.app.state.engine, 30) and lm.pool._decoding == {}  # its KV caches freed
        steps = bg.app.state.engine.steps
        with pytest.raises(httpx.ReadTimeout):  # not streamed: the server notices while it waits
            httpx.post(bg.url + "/v1/completions", json={**body, "stream": False}, timeout=0.6)
        assert _settles(bg.app.state.engine, steps + 30)
        ok = httpx.post(
            bg.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=30
        )
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2
    finally:
        bg.close()


def test_stopping_the_server_ends_requests_in_flight_with_an_error_not_a_cut(forest_dir):
    """Ctrl-C with requests in flight cancelled them at the grace's end: a traceback each, a stream
    cut without [DONE], queued clients an empty reply."""

    lm = open_lm(forest_dir, device="cpu", precision="fp32")
    _slow(lm, delay=0.1)
    bg = Background(create_app(lm, max_active=1))
    body = {"model": "f", "prompt": "the", "max_tokens": 60, "temperature": 0}
    got: dict = {}

    first = threading.Event()

    def stream():
        with (
            httpx.Client(timeout=30) as h,
            h.stream("POST", bg.url + "/v1/completions", json={**body, "stream": True}) as r,
        ):
            got["stream"] = []
            for line in r.iter_lines():
                got["stream"].append(line)
                first.set()

    def whole():  # queued behind the stream (one active at a time)
        got["whole"] = httpx.post(bg.url + "/v1/completions", json=body, timeout=30)

    threads = [threading.Thread(target=stream), threading.Thread(target=whole)]
    try:
        threads[0].start()
        assert first.wait(30)  # the stream is running before the other request queues behind it
        threads[1].start()
        deadline = time.time() + 30
        while bg.app.state.engine.load["waiting"] < 1 and time.time() < deadline:
            time.sleep(0.02)
        t0 = time.time()
        bg.server.handle_exit(signal.SIGINT, None)  # what Ctrl-C calls
        for t in threads:
            t.join(timeout=30)
        # both ended before the 2 s grace ran out (when they would have been cancelled and cut)
        assert time.time() - t0 < 2.0
    finally:
        bg.close()
    events = [x for x in got["stream"] if x.startswith("data: ")]
    assert len(events) >= 3 and events[-1] == "data: [DONE]" and "shutting down" in events[-2], events[-3:]
    assert got["whole"].status_code == 503 and "shutting down" in got["whole"].json()["error"]["message"]


def test_bad_requests_get_openai_errors_and_the_server_goes_on(served):
    lm, bg, c = served
    url, good = bg.url + "/v1/completions", {"model": "f", "prompt": "the"}
    long_prompt = "the lord said unto moses " * 20
    assert len(lm.encode(long_prompt)) > lm.seq_len
    bad = [
        ({**good, "model": "gpt-4"}, 404, "model"),
        ({"prompt": "the"}, 400, "model"),
        ({"model": "f"}, 400, "prompt"),
        ({**good, "max_tokens": -1}, 400, "max_tokens"),
        ({**good, "max_tokens": 0}, 400, "max_tokens"),
        ({**good, "max_tokens": 10**9}, 400, "max_tokens"),
        ({**good, "max_tokens": "10"}, 400, "max_tokens"),
        ({**good, "max_tokens": 2.5}, 400, "max_tokens"),
        ({**good, "temperature": -0.5}, 400, "temperature"),
        ({**good, "temperature": "hot"}, 400, "temperature"),
        ({**good, "top_p": 0}, 400, "top_p"),
        ({**good, "top_p": 1.5}, 400, "top_p"),
        ({**good, "prompt": long_prompt}, 400, "prompt"),
        ({**good, "prompt": 5}, 400, "prompt"),
        ({**good, "prompt": []}, 400, "prompt"),
        ({**good, "prompt": [1, 10**6]}, 400, "prompt"),
        ({**good, "stop": 3}, 400, "stop"),
        ({**good, "stop": [""]}, 400, "stop"),
        ({**good, "echo": "yes"}, 400, "echo"),
        ({**good, "logprobs": 1000}, 400, "logprobs"),
        ({**good, "n": 0}, 400, "n"),
        ({**good, "best_of": 3}, 400, "best_of"),
        ({**good, "suffix": "x"}, 400, "suffix"),
        ({**good, "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ([good], 400, None),
        ({**good, "prompt": ["the"] * 65}, 400, "prompt"),  # work is capped: 64 choices a request
        ({**good, "prompt": ["the"] * 5, "n": 13}, 400, "n"),
        ({**good, "stop": ["x" * 257]}, 400, "stop"),
        ({**good, "stop": ["x"] * 17}, 400, "stop"),
        # vLLM's extensions were answered as if applied (top_k 1 still sampled): refused, as by OpenAI
        ({**good, "top_k": 1, "repetition_penalty": 1.2}, 400, "repetition_penalty"),
        ({**good, "top_k": 40, "num_beams": 1}, 400, "top_k"),
        ({**good, "stream": True, "stream_options": {"include_usage": "yes"}}, 400, "stream_options"),
    ]
    for body, status, param in bad:
        r = httpx.post(url, json=body, timeout=30)
        err = r.json()["error"]
        assert (r.status_code, err["param"]) == (status, param), (body, r.text)
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    deep = b"[" * 100_000 + b"]" * 100_000  # past the parser's recursion limit
    vast = b'{"model": "f", "prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}"  # past int's 4300 digits
    for raw in (b"{", b"\xff\xfe", b"", deep, vast):
        r = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    surrogate = b'{"model": "f", "prompt": "\\ud800abc"}'  # valid JSON, not valid UTF-8: no tokens
    r = httpx.post(url, content=surrogate, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    surrogate = b'{"model": "f", "prompt": "a", "\\ud800x": 1}'  # a key UTF-8 cannot say back
    r = httpx.post(url, content=surrogate, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "\\ud800x", r.text
    r = httpx.get(bg.url + "/v1/nowhere")
    assert r.status_code == 404 and "error" in r.json()
    # what clients pass through at the values that change nothing (lm-eval: a task's num_beams 1)
    neutral = {"top_k": -1, "num_beams": 1, "repetition_penalty": 1.0, "ignore_eos": False, "min_p": None}
    assert httpx.post(url, json={**good, **neutral, "max_tokens": 2}, timeout=30).status_code == 200
    r = httpx.post(bg.url + "/v1/chat/completions", json={"model": "f", "messages": []})
    assert r.status_code == 404 and "no chat endpoint" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x")
    assert httpx.get(bg.url + "/health").json()["status"] == "ok"
    assert (
        c.completions.create(model="f", prompt=[3, 4], max_tokens=2, n=2, temperature=0).choices[1].index == 1
    )


def test_a_prompt_past_what_the_context_can_hold_is_refused_before_tokenizing(served, monkeypatch):
    from elmforest.clients.server_api import max_prompt_bytes

    lm, bg, c = served

    def encode(text, encode=lm.encode):
        assert len(text) < 1000, "a prompt too long for the context was tokenized"
        return encode(text)

    monkeypatch.setattr(lm, "encode", encode)
    for prompt in ("x" * (max_prompt_bytes(lm) + 1), ["the", "\u00e9" * (max_prompt_bytes(lm) // 2 + 1)]):
        r = httpx.post(bg.url + "/v1/completions", json={"model": "f", "prompt": prompt}, timeout=30)
        err = r.json()["error"]
        assert (r.status_code, err["param"], err["code"]) == (400, "prompt", "context_length_exceeded"), (
            r.text
        )
        assert "bytes" in err["message"]
    # an added token written as text ("<|endoftext|>": 13 bytes, one token) counts among the longest
    from types import SimpleNamespace as NS

    added = NS(get_added_tokens_decoder=lambda: {0: NS(content="<|endoftext|>")})
    assert max_prompt_bytes(NS(seq_len=10, tok=NS(token_bytes=[b"", b"ab"], tokenizer=added))) == 2 * 10 * 13


def test_a_token_id_prompt_opening_with_eos_is_not_charged_for_it_twice(served):
    """The EOS that opens every document is put in front of a prompt that lacks it: a token-id prompt
    that opens with it was refused one token short of the context (its EOS counted as a prompt token)."""
    from elmforest.clients.server_api import ApiError, parse_completion

    lm, _, _ = served
    body = [5] * (lm.seq_len - 1)

    def parse(ids, **more):
        return parse_completion({"model": "f", "prompt": ids, **more}, lm, "f", lm.vocab_size)

    parse(body, max_tokens=1)
    parse([lm.eos_id, *body], max_tokens=1)  # refused before: 65 tokens requested of 64
    parse([lm.eos_id, *body, 5], max_tokens=0, echo=True)  # scoring it reads seq_len positions
    for ids, said in (
        ([5, *body], "in the prompt, "),
        ([lm.eos_id, 5, *body], "in the prompt besides its opening EOS"),
    ):
        with pytest.raises(ApiError, match=f"you requested {lm.seq_len + 1} tokens \\({lm.seq_len} {said}"):
            parse(ids, max_tokens=1)  # (usage.prompt_tokens counts all it was sent: said apart here)
    with pytest.raises(ApiError) as e:
        parse(body, max_tokens=10**400)
    assert f"({lm.seq_len - 1} in the prompt, {str(10**400)[:57]}... for" in str(e.value)  # not 400 digits


def test_a_body_larger_than_any_request_could_need_is_refused_as_it_arrives(served, monkeypatch):
    from elmforest.clients.server_api import max_prompt_bytes

    lm, bg, c = served
    limit = server.max_body_bytes(max_prompt_bytes(lm))
    # the largest body a valid request could send still fits: 64 prompts of the longest text, escaped
    assert limit > 6 * 64 * max_prompt_bytes(lm)

    def chunks():  # no Content-Length: the server must count what arrives and stop reading
        for _ in range(limit // 2**16 + 50):
            yield b" " * 2**16

    for content in (b" " * (limit + 1), chunks()):
        r = httpx.post(bg.url + "/v1/completions", content=content, timeout=60)
        assert (r.status_code, r.json()["error"]["code"]) == (413, "request_too_large"), r.text
        assert f"({limit} bytes)" in r.json()["error"]["message"]
    assert httpx.get(bg.url + "/health", timeout=30).json()["status"] == "ok"
    # a body at the limit is read and parsed as usual
    body = json.dumps({"model": "f", "prompt": "hi", "max_tokens": 1}).encode()
    r = httpx.post(bg.url + "/v1/completions", content=body.ljust(limit), timeout=60)
    assert r.status_code == 200, r.text


def test_a_bug_is_an_openai_shaped_500_and_a_dead_engine_fails_health(served, forest_dir, monkeypatch):
    lm, bg, c = served

    def bug(*a):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(server, "parse_completion", bug)
    r = httpx.post(bg.url + "/v1/completions", json={"model": "f", "prompt": "x"}, timeout=30)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
    monkeypatch.undo()
    own = Background(create_app(open_lm(forest_dir, device="cpu", precision="fp32")))
    try:
        engine = own.app.state.engine
        engine.submit(_Work(1, next_error=_Bug()), lambda ev: None)  # the model thread dies
        engine._thread.join(10)
        h = httpx.get(own.url + "/health", timeout=30)
        assert h.status_code == 503 and h.json()["status"] == "error"
        for stream in (False, True):  # answered at once, not left waiting
            r = httpx.post(
                own.url + "/v1/completions", json={"model": "f", "prompt": "x", "stream": stream}, timeout=10
            )
            err = r.json()["error"] if not stream else json.loads(r.text.split("data: ")[1])["error"]
            assert r.status_code == (200 if stream else 500) and err["type"] == "server_error", r.text
    finally:
        own.close()


def test_models_lists_the_served_model(served):
    lm, bg, c = served
    assert [m.id for m in c.models.list().data] == ["f"]
    assert c.models.retrieve("f").owned_by == "elmforest"
    h = httpx.get(bg.url + "/health").json()
    assert h["experts"] == lm.names and h["mode"] == "ensemble"


def test_top_p_samples_only_the_nucleus_renormalised():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_token(probs.log(), 1.0, 0.7, gen) for _ in range(3000)])
    assert set(draws.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: two tokens in the nucleus
    assert (draws == 0).double().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)
    assert {sample_token(probs.log(), 1.0, 1e-9, gen) for _ in range(50)} == {0}
    assert sample_token(probs.log(), 0.0, 0.5, gen) == 0


def test_generate_steps_opens_the_document_with_eos_and_frees_its_caches(forest_dir):
    lm = open_lm(forest_dir, device="cpu", precision="fp32")
    body = lm.encode("the lord")

    def run(ids, n=5):
        return [s[0] for s in generate_steps(lm.pool, lm.tok, ids, lm.names, max_new_tokens=n, temperature=0)]

    assert run(body) == run([lm.eos_id, *body]) == _gen(forest_dir, "the lord", 5).token_ids
    steps = generate_steps(lm.pool, lm.tok, body, lm.names, max_new_tokens=50, temperature=0)
    next(steps)
    assert lm.pool._decoding  # its KV caches, while it runs
    steps.close()
    assert lm.pool._decoding == {}


def test_one_checkpoint_is_served_as_its_own_greedy_decode(forest_dir):
    expert = Forest.load(forest_dir).expert_dir("code")
    lm = open_lm(expert, device="cpu", precision="fp32")
    bg = Background(create_app(lm, name="solo"))
    try:
        c = openai.OpenAI(base_url=bg.url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["solo"]
        assert httpx.get(bg.url + "/health").json()["mode"] == "single"  # not "ensemble" of one
        r = c.completions.create(model="solo", prompt="def return", max_tokens=6, temperature=0)
        m, seq = load_model(expert).eval(), [lm.eos_id, *lm.encode("def return")]
        with torch.no_grad():  # no KV cache: the argmax of the whole sequence at every step
            for _ in range(6):
                seq.append(int(m(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
                if seq[-1] == lm.eos_id:
                    break
        assert r.choices[0].text == lm.tok.decode(
            [t for t in seq[len(lm.encode("def return")) + 1 :] if t != lm.eos_id]
        )
    finally:
        bg.close()


def test_the_serve_verb_starts_prints_its_address_and_stops_on_ctrl_c(forest_dir):
    args = ["serve", "--forest", str(forest_dir), "--port", "0", "--device", "cpu", "--name", "ff"]
    code = (  # the real command line (with `serve` registered, should elmforest.cli not do it yet)
        "from elmforest.cli import build_app; from elmforest.clients import serve_cli; app = build_app()\n"
        "if 'serve' not in [c.name for c in app.registered_commands]: serve_cli.register(app)\n"
        f"app(args={[*args, '--mode', 'topk', '--k', '2']!r}, prog_name='elmforest')"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        line = p.stdout.readline()
        assert line.startswith("serving 'ff' (topk: ") and line.rstrip().endswith("/v1"), line
        url = line.split(" at ")[1].strip()
        assert [m["id"] for m in httpx.get(url + "/models").json()["data"]] == ["ff"]
        r = httpx.post(
            url + "/completions", json={"model": "ff", "prompt": "the", "max_tokens": 3}, timeout=30
        )
        assert r.status_code == 200 and len(json.loads(r.text)["choices"]) == 1
        os.kill(p.pid, signal.SIGINT)
        assert p.wait(timeout=20) in (0, 130)  # 130: stopped by Ctrl-C, after a clean shutdown
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_logprob_tokens_inside_a_utf8_character_are_spelled_as_bytes(tokenizer_dir):
    from elmforest.clients.server_engine import token_text
    from elmforest.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    partial = [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]
    assert partial  # byte-level BPE has a token for each byte, 0x80-0xff among them
    for i in partial:
        shown = token_text(tok, i)
        assert shown.startswith("bytes:\\x")
        raw = bytes.fromhex(shown[len("bytes:") :].replace("\\x", ""))
        assert tok.tokenizer.decode_batch([[i]])[0] == raw.decode("utf-8", "replace")
    assert len({token_text(tok, i) for i in partial}) == len(partial)  # distinct, unlike "\ufffd"


def test_a_diverged_expert_is_an_error_not_empty_text_nor_a_torch_traceback(forest_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from elmforest.utils.errors import Diverged

    bad = tmp_path / "fbad"
    shutil.copytree(forest_dir, bad)
    weights = Forest.load(bad).expert_dir("legal") / "model.safetensors"
    huge = {  # finite weights, far too big (the embedding kept: its rows must differ to overflow)
        k: v if "embed" in k else torch.full_like(v, 8.4e37) for k, v in load_file(weights).items()
    }
    save_file(huge, weights, metadata={"format": "pt"})
    from elmforest.forest.staging import weight_digests

    def diverged(d):  # trained so, not damaged on disk: its recorded checksums are these weights'
        next(e for e in d["experts"] if e["name"] == "legal")["files"] = weight_digests(weights.parent)

    Forest.load(bad).update(diverged)
    for t in (0.0, 1.0):
        with pytest.raises(Diverged, match="legal: non-finite log-probabilities"):
            generate(bad, "the", max_new_tokens=3, temperature=t, device="cpu", precision="fp32")
    bg = Background(create_app(open_lm(bad, device="cpu", precision="fp32"), name="f"))
    try:
        for t in (0, 1):
            body = {"model": "f", "prompt": "the", "max_tokens": 3, "temperature": t}
            r = httpx.post(bg.url + "/v1/completions", json=body, timeout=30)
            assert r.status_code == 500 and "corrupt or diverged weights" in r.json()["error"]["message"], (
                r.text
            )
    finally:
        bg.close()


def test_a_token_id_prompt_opening_with_eos_gets_no_second_eos(forest_dir):
    expert = Forest.load(forest_dir).expert_dir("code")
    lm = open_lm(expert, device="cpu", precision="fp32")
    bg = Background(create_app(lm, name="solo"))
    try:
        ids = [lm.eos_id, *lm.encode("def return self")]
        body = {
            "model": "solo",
            "prompt": ids,
            "max_tokens": 4,
            "temperature": 0,
            "echo": True,
            "logprobs": 1,
        }
        r = httpx.post(bg.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]
        m, seq = load_model(expert).eval(), list(ids)
        with torch.no_grad():  # transformers on the sequence as sent: one EOS in front
            lp = torch.log_softmax(m(input_ids=torch.tensor([seq])).logits[0].double(), -1)
            for _ in range(4):
                seq.append(int(m(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
                if seq[-1] == lm.eos_id:
                    break
        want = [lp[i - 1, t].item() for i, t in enumerate(ids) if i]
        assert r["logprobs"]["token_logprobs"][0] is None
        assert r["logprobs"]["token_logprobs"][1 : len(ids)] == pytest.approx(want, abs=1e-4)
        new = [t for t in seq[len(ids) :] if t != lm.eos_id]
        assert r["text"] == lm.tok.decode(ids) + lm.tok.decode(new)
    finally:
        bg.close()


def test_any_integer_seed_samples_as_the_server_reduces_it(forest_dir):
    def sample(seed):
        return generate(
            forest_dir, "the", 5, temperature=1.0, seed=seed, device="cpu", precision="fp32"
        ).token_ids

    assert sample(2**64 + 7) == sample(7)  # past 64 bits: reduced mod 2**63, not an overflow


def test_a_port_in_use_is_named_before_the_models_load(forest_dir, monkeypatch):
    import socket

    from typer.testing import CliRunner

    from elmforest.clients import serve_cli
    from elmforest.forest import lm as lm_module
    from elmforest.utils.argtypes import group
    from elmforest.utils.errors import UserError

    def no_load(*a, **kw):
        raise AssertionError("the models loaded before the port was checked")

    monkeypatch.setattr(lm_module, "open_lm", no_load)
    app = group("test")
    serve_cli.register(app)
    app.callback()(lambda: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        res = CliRunner().invoke(app, ["serve", "--forest", str(forest_dir), "--port", str(port)])
    assert isinstance(res.exception, UserError), res.output
    assert f"127.0.0.1:{port}" in str(res.exception) and "another --port" in str(res.exception)


def test_a_token_id_prompt_ending_inside_a_character_has_it_finished_in_the_completion(monkeypatch):
    """The completion was decoded alone, so the tokens finishing the prompt's last character read
    U+FFFD; that character now opens the completion, whole, at offset 0."""
    zh = "中".encode()
    vocab = [b"", zh[:1], zh[1:], b"b", zh[1:2], zh[2:]]

    def complete(prompt_ids, script, logprobs=None):
        lm = _scripted(monkeypatch, vocab, script)
        req = CompletionRequest(prompts=[Prompt("", prompt_ids)], max_tokens=64, stop=[], logprobs=logprobs)
        return list(choice_steps(lm, req, req.prompts[0], 0, 0))

    assert "".join(c.text for c in complete([3, 1], [2, 3])) == "中b"
    assert "".join(c.text for c in complete([3, 1], [4, 5, 3])) == "中b"  # finished by two tokens
    assert [t["offset"] for c in complete([3, 1], [4, 5, 3], logprobs=0) for t in c.tokens] == [0, 0, 1]
    assert "".join(c.text for c in complete([3, 1], [3])) == "b"  # left unfinished: not the completion's
    assert "".join(c.text for c in complete([3], [3, 1, 2])) == "b中"  # a whole prompt: as before

    def echoed(prompt_ids, script, max_tokens=64, stop=("zz",)):
        lm = _scripted(monkeypatch, vocab, script)
        prompt = Prompt(lm.tok.decode(prompt_ids), prompt_ids)
        req = CompletionRequest(prompts=[prompt], max_tokens=max_tokens, stop=list(stop), echo=True)
        return "".join(c.text for c in choice_steps(lm, req, prompt, 0, 0))

    # echoed, the prompt's U+FFFD and the finished character showed the character twice ("b\ufffd中b")
    assert echoed([3, 1], [2, 3]) == "b中b" and echoed([3, 1], [4, 5, 3]) == "b中b"
    assert echoed([3, 1], [3]) == "b\ufffdb"  # left unfinished: the prompt's U+FFFD, once
    assert echoed([3, 1], [0]) == "b\ufffd"  # EOS first: the same
    assert echoed([3, 1], [], max_tokens=0) == "b\ufffd"  # the prompt alone, as sent
    assert echoed([3], [3, 1, 2]) == "bb中"
    # a stop never takes the prompt's share: the joined text keeps the prompt as sent
    assert echoed([3, 1], [3, 3], stop=["\ufffd"]) == "b\ufffdbb"  # the U+FFFD is the prompt's
    assert echoed([3, 1], [0], stop=["\ufffd"]) == "b\ufffd"
    assert echoed([3, 1], [2, 3], stop=["中"]) == "b\ufffd"  # the finished character is the completion's
    # the carried token holds text before the character's first byte (GPT-2's b" \xe2\x80"): the
    # stop-string check reused the carry's cut as its own, so from the second token on the completion
    # re-read that text (" “ab" came out "““ab")
    quote = "“".encode()
    vocab = [b"", b" " + quote[:2], quote[2:], b"a", b"b", b"x"]
    for stop in ([], ["zz"]):
        lm = _scripted(monkeypatch, vocab, [2, 3, 4])
        req = CompletionRequest(prompts=[Prompt("", [5, 1])], max_tokens=3, stop=stop)
        assert "".join(c.text for c in choice_steps(lm, req, req.prompts[0], 0, 0)) == "“ab", stop


def test_health_counts_the_job_taking_its_turn():
    """The job whose turn it is is out of the deque meanwhile: 8 admitted read as 7 active."""
    import threading

    entered, release = threading.Event(), threading.Event()

    def work():
        entered.set()
        release.wait(10)
        yield "done"

    engine = Engine(lm=None, max_active=8)
    try:
        engine.submit(work(), lambda item: None)
        assert entered.wait(10)
        assert engine.load == {"active": 1, "waiting": 0}
    finally:
        release.set()
        engine.close()


def test_a_single_checkpoint_refuses_mixture_settings(forest_dir):
    """`serve --model X --mode topk --k 4 --weighting fixed` served X alone, saying `topk: X`."""
    from elmforest.utils.errors import UserError

    expert = Forest.load(forest_dir).expert_dir("code")
    with pytest.raises(UserError, match="k=4 .*single checkpoint, one model"):
        open_lm(expert, mode="topk", k=4, device="cpu")
