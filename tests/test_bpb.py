import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from elmforest.config import ModelConfig
from elmforest.data.shards import Shards
from elmforest.eval.bpb import evaluate_shards, select_documents, stream_nll, windows
from elmforest.model.build import build_model


class UniformLM(torch.nn.Module):
    """Every next token has probability 1/V: NLL per token is exactly ln V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_windows_predict_every_token_exactly_once():
    stream = np.arange(1, 12)  # 11 tokens
    x, y = windows(stream, eos_id=0, seq_len=4)
    assert x.shape == (3, 4)
    assert y[y != -100].tolist() == list(range(1, 12))
    assert x[0, 0] == 0  # the leading EOS is context only
    # every target's input is the token right before it in the stream
    full = [0, *range(1, 12)]
    for w in range(3):
        for t in range(4):
            if y[w, t] != -100:
                assert x[w, t] == full[full.index(int(y[w, t])) - 1]


def test_bpb_hand_computable_case(shards_dir):
    sh = Shards(shards_dir)
    res = evaluate_shards(
        UniformLM(sh.vocab_size),
        sh,
        split="test",
        seq_len=16,
        batch_size=4,
        device="cpu",
        precision="fp32",
        progress=False,
    )
    for d, r in res["domains"].items():
        tokens = sh.info(d, "test")["tokens"]
        nbytes = sh.info(d, "test")["bytes"] + sh.info(d, "test")["documents"]
        assert r["tokens"] == tokens and r["bytes"] == nbytes
        assert r["bpb"] == pytest.approx(tokens * math.log(sh.vocab_size) / math.log(2) / nbytes, rel=1e-6)
        assert r["ppl"] == pytest.approx(sh.vocab_size, rel=1e-6)
    assert res["mean_bpb"] == pytest.approx(np.mean([r["bpb"] for r in res["domains"].values()]))


def test_stream_nll_matches_brute_force():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"), vocab_size=50, eos_id=0, seed=1).eval()
    stream = np.random.default_rng(0).integers(1, 50, size=37)
    got = stream_nll(model, stream, 0, seq_len=8, batch_size=3, device=torch.device("cpu"), amp_dtype=None)
    full = [0, *stream.tolist()]
    want = 0.0
    with torch.no_grad():
        for start in range(0, len(full) - 1, 8):  # window by window, position by position
            ctx = full[start : start + 8]
            logp = torch.log_softmax(model(input_ids=torch.tensor([ctx])).logits[0].double(), -1)
            for t in range(len(ctx)):
                if start + t + 1 < len(full):
                    want -= float(logp[t, full[start + t + 1]])
    assert got == pytest.approx(want, rel=1e-5)


def test_max_bytes_selects_whole_documents_by_their_text():
    docs = np.array([[10, 30], [25, 40], [40, 50]])  # (token end, bytes)
    assert select_documents(docs, None) == (3, 40, 120)
    assert select_documents(docs, 70) == (2, 25, 70)  # 30 + 40 bytes fit, the third does not
    assert select_documents(docs, 69) == (1, 10, 30)
    assert select_documents(docs, 5) == (1, 10, 30)  # at least one document


def test_two_tokenizers_score_exactly_the_same_documents_and_bytes(corpus, tmp_path):
    """Selecting by tokens gave a fine-grained tokenizer fewer documents than a coarse one; by bytes,
    every tokenizer scores the same documents."""
    from elmforest.data.bpe import train_bpe_on
    from elmforest.data.shards_build import build_shards
    from elmforest.data.splits import SplitSpec

    picked = []
    for vocab in (270, 600):
        tok, _ = train_bpe_on(corpus, vocab_size=vocab, bytes_per_domain=200_000)
        sh = Shards(
            build_shards(corpus, tok, tmp_path / f"v{vocab}", SplitSpec(0.1, 0.1), progress=False).out
        )
        per = {}
        for d in sh.domains:
            n_docs, n_tok, n_bytes = select_documents(sh.documents(d, "test"), 1500)
            per[d] = (n_docs, n_bytes, n_tok)
        picked.append(per)
    a, b = picked
    assert {d: v[:2] for d, v in a.items()} == {d: v[:2] for d, v in b.items()}
    assert any(a[d][2] != b[d][2] for d in a)  # the tokenizers did differ
    # ... and by tokens, the same budget would have picked different documents
    d = next(d for d in a if a[d][2] != b[d][2])
    by_tokens = []
    for vocab in (270, 600):
        ends = Shards(tmp_path / f"v{vocab}").documents(d, "test")[:, 0]
        by_tokens.append(int(np.searchsorted(ends, min(a[d][2], b[d][2]), side="right")))
    assert by_tokens[0] != by_tokens[1]


@pytest.mark.parametrize("limit, want", [(4096, 1024), (128, 128), (None, 1024)])
def test_a_checkpoint_of_elsewhere_is_read_at_its_positions_capped_at_1024(tmp_path, limit, want):
    """Without elmforest's run config, the window is the model's positions, at most 1024 (a 4096-
    position model read 4096-token windows: another number than the other rows' 1024)."""
    from elmforest.eval.bpb import default_seq_len

    cfg = {"model_type": "llama"} | ({"max_position_embeddings": limit} if limit else {})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert default_seq_len(tmp_path) == want
