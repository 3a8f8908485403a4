"""Shared fixtures: a small synthetic multi-domain corpus built locally (no downloads)."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

# One thread per test process (inherited by the runs tests start in subprocesses). The models here are
# tiny: a second OpenMP thread buys nothing on their matmuls and, on a loaded 2-core machine (Ray
# workers, a DDP pair, anything else running), a step waits for a descheduled thread: the tiny study
# took 2.7 minutes with 2 threads under load and 0.9 with 1. A test that needs more sets them itself.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one worker per core this process may use, a container's CPU quota
    included (xdist's own count is the host's cores, 64 workers on a 2-CPU container of a 64-core host),
    and no more than 8: several tests start processes of their own (torchrun, Ray, a server)."""
    from elmforest.utils.threads import cpu_cores

    return min(cpu_cores(), 8)


DOMAIN_WORDS = {
    "scripture": "and the lord said unto moses thou shalt not israel king god people land of".split(),
    "code": "def return self import class for in if else none true false lambda yield with as".split(),
    "legal": "license software warranty copyright permission notice holder liability terms shall".split(),
}


def make_corpus(root: Path, docs_per_domain: int = 120, seed: int = 0) -> Path:
    """One JSONL per domain; texts mix words with punctuation and some non-ASCII characters."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for domain, words in DOMAIN_WORDS.items():
        with open(root / f"{domain}.jsonl", "w", encoding="utf-8") as f:
            for i in range(docs_per_domain):
                n = rng.randint(10, 120)
                text = " ".join(rng.choice(words) for _ in range(n))
                if i % 7 == 0:
                    text += " — café naïve ✓\n" + text[:40]
                f.write(
                    json.dumps({"id": f"{domain}/{i}", "domain": domain, "text": text}, ensure_ascii=False)
                    + "\n"
                )
    return root


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    from elmforest.data.bpe import train_bpe_on
    from elmforest.data.tokenizer import save_tokenizer

    tok, _ = train_bpe_on(corpus, vocab_size=400, bytes_per_domain=200_000)
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, out)
    return out


@pytest.fixture(scope="session")
def shards_dir(corpus, tokenizer_dir, tmp_path_factory) -> Path:
    from elmforest.data.shards_build import build_shards
    from elmforest.data.splits import SplitSpec

    out = tmp_path_factory.mktemp("shards") / "shards"
    build_shards(corpus, tokenizer_dir, out, SplitSpec(0.1, 0.1), progress=False)
    return out


def make_tiny_encoder(tokenizer_dir: Path, out: Path) -> Path:
    """A tiny random BERT sentence encoder (hidden size 32) that ships the test tokenizer: a stand-in for
    `minilm` wherever elmforest embeds texts with an encoder. Written fresh, so a test may change it."""
    import shutil

    from transformers import BertConfig, BertModel

    from elmforest.data.tokenizer import load_tokenizer

    cfg = BertConfig(
        vocab_size=load_tokenizer(tokenizer_dir).vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(cfg).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, out / f)
    return out


def tiny_config(shards: Path, steps: int = 30, **train_kw):
    from elmforest.model.presets import preset_run_config

    cfg = preset_run_config("tiny", str(shards))
    cfg.train.steps = steps
    cfg.train.precision = "fp32"
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.fixture(scope="session")
def forest_dir(shards_dir, tmp_path_factory):
    """A 3-expert tiny forest trained BTM-style (seed = first half of the dense run)."""
    from elmforest.data.shards import Shards
    from elmforest.forest import btm
    from elmforest.forest.manifest import Forest

    root = tmp_path_factory.mktemp("forest") / "f"
    shards = Shards(shards_dir)
    base = tiny_config(shards_dir, steps=24, batch_size=6)
    plan, base = btm.plan_for(base, shards.domains)
    forest = Forest.init(root)
    btm.train_seed(forest, shards, base, plan, progress=False)
    for d in shards.domains:
        btm.train_expert(forest, shards, d, progress=False)
    btm.train_dense(forest, shards, base, plan, progress=False)
    return root


@pytest.fixture(autouse=True)
def _forest_dir_manifest_unchanged(request):
    """Tests that merge or average the shared forest record their outputs in its manifest, and later
    tests of the same worker (whichever xdist gives it) copied those records: one test's merges became
    another's. The manifest is put back after each test that used the forest."""
    if "forest_dir" not in request.fixturenames:
        yield
        return
    manifest = Path(request.getfixturevalue("forest_dir")) / "forest.json"
    before = manifest.read_bytes()
    yield
    if manifest.read_bytes() != before:
        manifest.write_bytes(before)


@pytest.fixture(scope="session")
def clusterer_dir(corpus, tmp_path_factory):
    from elmforest.cluster.assign import fit_clusterer

    out = tmp_path_factory.mktemp("clusterer")
    fit_clusterer(corpus, 3, out, sample_docs=1000, dims=16, min_df=1)
    return out


@pytest.fixture(scope="session")
def cluster_forest(forest_dir, clusterer_dir, tmp_path_factory):
    """The 3 trained experts of the BTM fixture registered as cluster experts of a c-BTM forest."""
    from elmforest.forest.manifest import Forest

    src = Forest.load(forest_dir)
    root = tmp_path_factory.mktemp("cforest") / "f"
    f = Forest.init(root)
    f.set_clusterer(clusterer_dir)
    for j, n in enumerate(src.names):
        f.add(src.expert_dir(n), f"cluster{j}", [f"cluster{j}"])
    return root


# -- processes (tests that kill a parent and check its workers die with it) ---------------------------
def proc_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, their children, ...), from /proc."""
    parent = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parent[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, todo = set(), [pid]
    while todo:
        q = todo.pop()
        kids = {c for c, pp in parent.items() if pp == q} - found
        found |= kids
        todo.extend(kids)
    return found


def assert_all_die(pids: set[int], within: float = 10.0) -> None:
    """The given processes end within `within` seconds; survivors are killed, then reported."""
    deadline = time.time() + within
    while time.time() < deadline and any(proc_alive(p) for p in pids):
        time.sleep(0.05)
    survivors = [p for p in pids if proc_alive(p)]
    for p in survivors:
        os.kill(p, signal.SIGKILL)
    assert not survivors, f"orphaned workers {survivors}"
