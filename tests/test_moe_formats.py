"""Merging experts of every architecture with a Hugging Face MoE counterpart (Llama/Mistral -> Mixtral,
Qwen2 -> Qwen2-MoE, Qwen3 -> Qwen3-MoE, OLMo-2 -> FlexOlmo), each checked for logit parity against a
reference built from the experts' own modules; and the refusals, each with its reason."""

from __future__ import annotations

import json
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from elmforest.data.shards import Shards
from elmforest.data.tokenizer import load_tokenizer, save_tokenizer
from elmforest.forest.manifest import Forest
from elmforest.merge.io import LazyWeights
from elmforest.merge.moe import MoeSpec, export_moe
from elmforest.merge.moe_formats import FORMATS, format_for
from elmforest.train.flops import flops_breakdown
from elmforest.utils.errors import UserError

DENSE = {  # the dense architecture -> its own extras (the biases or norms that make it itself)
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},  # q/k/v biases
    "qwen3": {},  # per-head q/k norms
    "olmo2": {},  # norms after each sublayer, q/k norms
}


class RefMoE(torch.nn.Module):
    """Softmax -> top-k -> renormalised weights over the experts' own MLP modules, token by token."""

    def __init__(self, gate, mlps, k):
        super().__init__()
        self.gate, self.mlps, self.k = gate, torch.nn.ModuleList(mlps), k

    def forward(self, h):
        probs = torch.softmax(h.float() @ self.gate.float().T, dim=-1)
        top, idx = probs.topk(self.k, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for slot in range(self.k):
            for e, mlp in enumerate(self.mlps):
                sel = (idx[..., slot] == e).unsqueeze(-1)
                out = out + torch.where(sel, top[..., slot : slot + 1] * mlp(h), 0.0)
        return out


def _experts(arch: str, tokenizer_dir, root, n=3):
    tok = load_tokenizer(tokenizer_dir)
    dirs = []
    for i in range(n):
        cfg = AutoConfig.for_model(
            arch,
            vocab_size=tok.vocab_size,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            initializer_range=0.2,  # wide enough that the experts differ visibly
            bos_token_id=tok.eos_id,
            eos_token_id=tok.eos_id,
            pad_token_id=None,
            tie_word_embeddings=False,
            **DENSE[arch],
        )
        torch.manual_seed(100 + i)
        m = AutoModelForCausalLM.from_config(cfg)
        if arch == "qwen2":  # random biases, so a dropped or misplaced bias shows
            for layer in m.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    torch.nn.init.normal_(p.bias, std=0.2)
        if arch in ("qwen3", "olmo2"):  # q/k norm weights away from 1
            for layer in m.model.layers:
                for p in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    torch.nn.init.normal_(p.weight, mean=1.0, std=0.3)
        d = root / f"e{i}"
        m.save_pretrained(str(d))
        save_tokenizer(tok, d)
        dirs.append(d)
    return dirs


@pytest.mark.parametrize("arch", list(DENSE))
def test_every_supported_architecture_merges_with_logit_parity(arch, tokenizer_dir, shards_dir, tmp_path):
    domains = Shards(shards_dir).domains
    dirs = _experts(arch, tokenizer_dir, tmp_path, n=len(domains))
    f = Forest.init(tmp_path / "f")
    for d, dom in zip(dirs, domains, strict=True):
        f.add(d, dom, [dom])
    out = export_moe(f, tmp_path / "moe", MoeSpec(top_k=2, sample_tokens=256), data=shards_dir, device="cpu")
    cfg = json.loads((out / "config.json").read_text())
    fmt = format_for(json.loads((dirs[0] / "config.json").read_text()))
    assert cfg["model_type"] == fmt.model_type and arch in fmt.dense
    moe = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(moe).__name__ == fmt.architecture  # plain AutoModelForCausalLM, no remote code
    assert flops_breakdown(moe, 24)["moe_active_share"] == pytest.approx(2 / 3)  # top-2 of 3 in the ledger

    experts = [AutoModelForCausalLM.from_pretrained(str(d)).eval() for d in f.expert_dirs()]
    ref = AutoModelForCausalLM.from_pretrained(str(f.expert_dirs()[0])).eval()
    shared = {
        k: sum(e.state_dict()[k] for e in experts) / len(experts)
        for k in ref.state_dict()
        if ".mlp." not in k
    }
    ref.load_state_dict(shared, strict=False)  # BTX: everything but the MLPs averaged
    with ExitStack() as st:
        w = LazyWeights(out, st)
        for i, layer in enumerate(ref.model.layers):
            layer.mlp = RefMoE(w.get(fmt.router_name(i)), [e.model.layers[i].mlp for e in experts], 2)
    stream = Shards(shards_dir).tokens(domains[0], "test")
    x = torch.as_tensor(np.asarray(stream[:48], dtype=np.int64)).view(2, 24)
    with torch.no_grad():
        want = ref(input_ids=x).logits
        torch.testing.assert_close(moe(input_ids=x).logits, want, rtol=1e-4, atol=1e-4)
        # a forest of distinct experts: the reference is not the first expert's (the check can fail)
        assert (experts[0](input_ids=x).logits - want).abs().max() > 1e-2
        assert moe.generate(x[:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)


@pytest.mark.parametrize(
    "arch, why",
    [
        ("gpt2", "learned position embeddings"),
        ("opt", "learned position embeddings"),
        ("gemma", "gated-GELU"),
        ("phi3", "PhiMoE"),
        ("gemma3_text", "Gemma-3's layers"),  # a Gemma-3 text checkpoint's model_type
        ("bert", "no MoE format for 'bert'"),
    ],
)
def test_architectures_without_an_moe_counterpart_are_refused_with_the_reason(arch, why):
    with pytest.raises(UserError, match=why) as e:
        format_for({"model_type": arch})
    assert "forest average" in str(e.value) and "qwen2 -> qwen2_moe" in str(e.value)


def test_a_qwen2_with_biased_attention_is_not_refused_but_a_biased_mlp_is():
    assert format_for({"model_type": "qwen2"}).model_type == "qwen2_moe"  # the old refusal was wrong
    for cfg, why in (
        ({"mlp_bias": True}, "mlp_bias"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ):  # each says what to do instead, as the other refusals do
        with pytest.raises(UserError, match=f"{why}.*Instead, merge the experts by parameter averaging"):
            format_for({"model_type": "llama", **cfg})
    assert format_for({"model_type": "olmo2", "attention_bias": True}).model_type == "flex_olmo"
    for mt in ("qwen2", "qwen3"):  # the MoE places its sliding windows by another rule than the dense model
        with pytest.raises(UserError, match="sliding window"):
            format_for({"model_type": mt, "use_sliding_window": True, "max_window_layers": 1})
    assert {f.model_type for f in FORMATS.values()} == {"mixtral", "qwen2_moe", "qwen3_moe", "flex_olmo"}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "olmo2"])
def test_flexolmo_owner_pairs_of_every_format_merge_into_a_loadable_moe(arch, tokenizer_dir, tmp_path):
    """transformers 5 saves Qwen3-MoE's expert count as `num_local_experts`: the merged owners' config
    kept the pair's 2 beside `num_experts`, and the merged model did not load. Owners not trained yet
    hold the seed's MLP in every expert, so any renormalised routing computes the seed."""
    import shutil

    from elmforest.merge.flexolmo import merge_pairs, public_pair

    (seed,) = _experts(arch, tokenizer_dir, tmp_path, n=1)
    pair = public_pair(seed, tmp_path / "pair")
    owners = []
    for i in range(3):
        o = tmp_path / f"o{i}"
        shutil.copytree(pair, o)
        owners.append((f"o{i}", o))
    merged = merge_pairs(owners, tmp_path / "merged")
    moe = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    assert moe.model.layers[0].mlp.gate.weight.shape[0] == 4
    dense = AutoModelForCausalLM.from_pretrained(str(seed)).eval()
    x = torch.randint(0, dense.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=x).logits, dense(input_ids=x).logits, atol=2e-5, rtol=2e-5)


def test_a_field_the_experts_files_leave_out_keeps_the_dense_default_and_non_arch_keys_do_not_block(
    tokenizer_dir, shards_dir, tmp_path
):
    """merge moe read the raw config.json: a file silent on rms_norm_eps exported Mixtral's default
    (1e-5) for Llama's (1e-6), and `use_cache: false` in one expert (as HF Trainer writes it) refused a
    merge that `forest add` had accepted."""
    from transformers import LlamaConfig

    domains = Shards(shards_dir).domains
    dirs = _experts("llama", tokenizer_dir, tmp_path, n=len(domains))
    for i, d in enumerate(dirs):
        cfg = json.loads((d / "config.json").read_text())
        del cfg["rms_norm_eps"]
        if i == 1:
            cfg["use_cache"] = False
        (d / "config.json").write_text(json.dumps(cfg))
    f = Forest.init(tmp_path / "f")
    for d, dom in zip(dirs, domains, strict=True):
        f.add(d, dom, [dom])
    out = export_moe(f, tmp_path / "moe", MoeSpec(router="random"), device="cpu")
    assert json.loads((out / "config.json").read_text())["rms_norm_eps"] == LlamaConfig().rms_norm_eps == 1e-6
    from elmforest.merge.flexolmo import public_pair  # the FlexOlmo pair is made from the seed alike

    pair = public_pair(dirs[0], tmp_path / "pair")
    assert json.loads((pair / "config.json").read_text())["rms_norm_eps"] == 1e-6
