"""The OpenAI-compatible server under load: one expert vs the top-2 sparse ensemble vs the full
ensemble, each at 1 and at 8 concurrent clients, side by side in one run.

    python bench/serve.py [--experts 4] [--requests 16] [--prompt-tokens 32] [--new-tokens 32] [--rounds 2]

Builds a forest of randomly initialised `cpu-small` experts on synthetic shards (speed does not depend
on what the weights learned), serves it three ways, each in its own process as `elmforest serve` does
(one expert's checkpoint, `--mode topk --k 2`, `--mode ensemble`), and sends
each `--requests` streamed greedy completions through the `openai` client from 1 or 8 threads. Every
prompt is a different `--prompt-tokens`-token piece of the training text; tokens/s counts what was
generated (EOS may end a completion early: the API has no minimum). Reports requests/s, generated
tokens/s, and the time to first token (the first streamed chunk: the wait for a turn, the prompt
read and one step; `logprobs: 0` makes every token a chunk, even one whose text is an incomplete
UTF-8 character held back) as median and p90 over every request of every round. The configurations and concurrencies are
interleaved within each round, so a machine whose speed drifts affects them alike.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai
import torch

try:
    from common import random_forest
except ImportError:
    from bench.common import random_forest


def load(url: str, model: str, prompts: list[str], concurrency: int, new_tokens: int) -> dict:
    """Send every prompt once (streamed, greedy) from `concurrency` threads; wall time and per-request
    time to first token and generated tokens."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    todo, lock, ttft, tokens = list(prompts), threading.Lock(), [], []

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                p = todo.pop()
            t0, first, n = time.perf_counter(), None, 0
            stream = client.completions.create(
                model=model,
                prompt=p,
                max_tokens=new_tokens,
                temperature=0,
                logprobs=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            for chunk in stream:
                if first is None:
                    first = time.perf_counter() - t0
                if chunk.usage is not None:
                    n = chunk.usage.completion_tokens
            with lock:
                ttft.append(first)
                tokens.append(n)

    t = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {"wall": time.perf_counter() - t, "ttft": ttft, "tokens": sum(tokens), "requests": len(prompts)}


def _drain(stream) -> None:
    for _ in stream:
        pass


def launch(cmd: list[str]) -> tuple[subprocess.Popen, str]:
    """Start a server command that prints `serving ... at URL/v1` first: (process, URL). The rest of
    its output (uvicorn's access log, a line per request) is read and dropped on a thread: left in the
    pipe, it would fill it (64 KiB) and block the server mid-benchmark."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
    if " at " not in line:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the server did not start: {line!r}")
    return proc, line.split(" at ")[1].strip().removesuffix("/v1")


def start(path: Path, mode: str, max_active: int) -> tuple[subprocess.Popen, str]:
    """A server process (`elmforest serve`'s own function) on a free port: (process, its URL)."""
    code = (
        "from elmforest.clients.server import serve; from elmforest.forest.lm import open_lm\n"
        f"serve(open_lm({str(path)!r}, {mode!r}, k=2, device='cpu'), port=0, name='m', max_active={max_active})"
    )
    return launch([sys.executable, "-c", code])


def p90(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(0.9 * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--requests", type=int, default=16, help="per configuration, concurrency and round")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-active", type=int, default=8, help="the server's --max-active")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        forest, shards, tok = random_forest(work, args.experts)
        stream = shards.tokens(shards.domains[0], "train")
        step = args.prompt_tokens
        prompts = [
            tok.decode([int(t) for t in stream[i * step : (i + 1) * step]]) for i in range(args.requests)
        ]
        configs = {
            "one expert": (forest.expert_dir("e0"), "ensemble"),
            "top-2": (forest.root, "topk"),
            f"ensemble ({args.experts})": (forest.root, "ensemble"),
        }
        servers = {name: start(path, mode, args.max_active) for name, (path, mode) in configs.items()}
        try:
            urls = {name: url for name, (_, url) in servers.items()}
            for url in urls.values():  # warm-up
                load(url, "m", prompts[:1], 1, 2)
            runs: dict[tuple[str, int], list[dict]] = {}
            for _ in range(args.rounds):
                for name, url in urls.items():
                    for conc in (1, 8):
                        r = load(url, "m", prompts, conc, args.new_tokens)
                        runs.setdefault((name, conc), []).append(r)
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGINT)
                proc.wait(30)
    print(
        f"{args.experts} cpu-small experts (random init), {args.requests} requests x {args.rounds} rounds, "
        f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy, streamed; "
        f"threads {torch.get_num_threads()}, max-active {args.max_active}"
    )
    head = (
        f"{'config':14s} {'clients':>7s} {'req/s':>7s} {'tokens/s':>9s} {'TTFT median':>12s} {'TTFT p90':>9s}"
    )
    print(head)
    for (name, conc), rs in runs.items():
        rps = statistics.median(r["requests"] / r["wall"] for r in rs)
        tps = statistics.median(r["tokens"] / r["wall"] for r in rs)
        ttft = [x for r in rs for x in r["ttft"]]
        print(
            f"{name:14s} {conc:7d} {rps:7.2f} {tps:9.1f} "
            f"{statistics.median(ttft) * 1000:10.0f}ms {p90(ttft) * 1000:7.0f}ms"
        )


if __name__ == "__main__":
    main()
