"""The sorted-loop CPU expert kernel (model/moe_experts.py): bit-identical to transformers' eager loop
for every MoE architecture elmforest exports or loads, in each precision it runs in; autograd and
unusual layouts go to the eager loop; `load_model` picks it on CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from elmforest.model import moe_experts
from elmforest.model.build import load_model

ARCHS = {  # model_type -> its expert-count field
    "mixtral": "num_local_experts",
    "qwen2_moe": "num_experts",
    "qwen3_moe": "num_experts",
    "flex_olmo": "num_experts",
    "olmoe": "num_experts",
    "phimoe": "num_local_experts",
}


def _model(arch: str, n_experts: int = 6, hidden_size: int = 32, intermediate_size: int = 24, **extra):
    fields = {ARCHS[arch]: n_experts, "num_experts_per_tok": 2}
    if arch in ("qwen2_moe", "qwen3_moe"):
        fields |= {
            "moe_intermediate_size": intermediate_size,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
    fields |= extra
    cfg = AutoConfig.for_model(
        arch,
        vocab_size=97,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        **fields,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").eval()


def _logits(model, ids, impl: str, amp: bool):
    model.set_experts_implementation(impl)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        return model(ids).logits


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_the_sorted_loop_is_bit_identical_to_eager(arch):
    model = _model(arch)
    # 3 x 40 tokens over 6 experts: every expert used; 1 token: most of them idle (a decoding step)
    for ids in (torch.randint(0, 97, (3, 40)), torch.randint(0, 97, (1, 1))):
        for amp in (False, True):
            eager = _logits(model, ids, "eager", amp)
            ours = _logits(model, ids, moe_experts.NAME, amp)
            assert torch.equal(eager, ours), (arch, tuple(ids.shape), amp, (eager - ours).abs().max())


def test_a_bf16_model_without_autocast_sums_in_bf16_as_eager_does():
    """One index_add_ of bf16 sums in fp32 and rounds once; eager rounds after each expert (k=2 hid it:
    0 + a is exact)."""
    for k in (2, 4):
        model = _model("mixtral", num_experts_per_tok=k).to(torch.bfloat16)
        ids = torch.randint(0, 97, (2, 50))
        assert torch.equal(
            _logits(model, ids, "eager", False), _logits(model, ids, moe_experts.NAME, False)
        ), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_reach_each_gemm_in_eagers_order_on_two_threads(dtype):
    """A row's place in a GEMM can change its result (fp32 on 2+ threads, fp64): token-major rows
    differed from eager's slot-major ones by ~1e-7 at FlexOlmo's 2-expert shape, 5-11 tokens."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for arch in ("mixtral", "olmoe"):
            model = _model(arch, n_experts=2, hidden_size=64, intermediate_size=96).to(dtype)
            if arch == "olmoe":
                model.config.norm_topk_prob = True
            for n in range(5, 12):
                ids = torch.randint(0, 97, (1, n))
                want = _logits(model, ids, "eager", False)
                assert torch.equal(want, _logits(model, ids, moe_experts.NAME, False)), (arch, n)
    finally:
        torch.set_num_threads(threads)


def test_with_autograd_it_runs_eager_so_gradients_are_eagers():
    model = _model("mixtral").train()
    ids = torch.randint(0, 97, (2, 30))
    grads = {}
    for impl in ("eager", moe_experts.NAME):
        model.set_experts_implementation(impl)
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads[impl] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(*grads.values(), strict=True))


def test_an_unusual_layout_runs_eager(monkeypatch):
    model = _model("mixtral")
    ids = torch.randint(0, 97, (2, 30))
    want = _logits(model, ids, "eager", False)
    calls = []
    for layer in model.model.layers:
        layer.mlp.experts.has_bias = True  # (no bias tensors: eager ignores the flag, ours must not run)
    monkeypatch.setattr(torch, "argsort", lambda *a, **k: calls.append(1))
    assert torch.equal(_logits(model, ids, moe_experts.NAME, False), want) and not calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="load_model picks it where there is no CUDA")
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_load_model_picks_it_on_cpu(arch, tmp_path):
    _model(arch).save_pretrained(tmp_path / "a")
    loaded = load_model(tmp_path / "a")
    assert loaded.config._experts_implementation == moe_experts.NAME
    loaded.save_pretrained(tmp_path / "b")  # saved again: plain transformers must load it anywhere
    assert "sorted_loop" not in (tmp_path / "b" / "config.json").read_text()


def test_a_router_trained_alone_gets_eagers_gradients_through_it():
    """Experts frozen, the router trained (hidden states need no grad into layer 0): the fast path runs
    there, and the router's gradients flow through its weighted sum as through eager's."""
    model = _model("mixtral").train()
    for name, p in model.named_parameters():
        p.requires_grad_(".mlp.gate." in name)
    ids = torch.randint(0, 97, (2, 30))
    grads, calls = {}, []
    real = torch.argsort
    for impl in ("eager", moe_experts.NAME):
        model.set_experts_implementation(impl)
        model.zero_grad()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "argsort", lambda *a, impl=impl, **k: calls.append(impl) or real(*a, **k))
            model(ids, labels=ids).loss.backward()
        grads[impl] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert calls and set(calls) == {moe_experts.NAME}  # the fast path ran (layer 0)
    assert all(torch.equal(a, b) for a, b in zip(*grads.values(), strict=True))


def test_an_fp64_model_under_autocast_stays_fp64_as_eager_does():
    model = _model("mixtral").to(torch.float64)
    ids = torch.randint(0, 97, (2, 30))
    assert torch.equal(_logits(model, ids, "eager", True), _logits(model, ids, moe_experts.NAME, True))
