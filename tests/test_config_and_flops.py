import json

import pytest
import torch

from elmforest.config import ModelConfig, RunConfig, apply_overrides
from elmforest.model.build import build_model, load_model
from elmforest.model.presets import PRESETS, preset_run_config
from elmforest.train.flops import flops_per_token, matmul_params


def test_config_round_trip_and_overrides():
    cfg = preset_run_config("tiny", "/data/shards")
    again = RunConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    cfg2 = apply_overrides(
        cfg, ["train.steps=7", "optim.lr=1", 'data.domains=["a","b"]', "model.init_from=/ckpt/dir"]
    )
    assert cfg2.train.steps == 7 and cfg2.optim.lr == 1.0 and isinstance(cfg2.optim.lr, float)
    assert cfg2.data.domains == ["a", "b"] and cfg2.model.init_from == "/ckpt/dir"
    with pytest.raises(ValueError, match="unknown key"):
        apply_overrides(cfg, ["train.stepz=3"])
    with pytest.raises(ValueError, match="expected an integer"):
        apply_overrides(cfg, ["train.steps=lots"])
    with pytest.raises(ValueError, match="unknown key"):
        RunConfig.from_dict({"train": {"nope": 1}})


def test_presets_sizes():
    tiny = build_model(ModelConfig(preset="tiny"), PRESETS["tiny"].vocab_size, 0)
    assert sum(p.numel() for p in tiny.parameters()) < 1_000_000
    small = build_model(ModelConfig(preset="cpu-small"), PRESETS["cpu-small"].vocab_size, 0)
    assert 2_000_000 < sum(p.numel() for p in small.parameters()) < 10_000_000
    # the BTM presets land near their names (checked on the meta device: no memory is allocated)
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, target in [("btm-125m", 125e6), ("btm-350m", 350e6), ("btm-750m", 750e6), ("btm-1.3b", 1.3e9)]:
        p = PRESETS[name]
        with torch.device("meta"):
            m = LlamaForCausalLM(LlamaConfig(vocab_size=p.vocab_size, **p.llama_kwargs()))
        n = sum(x.numel() for x in m.parameters())
        assert 0.8 * target < n < 1.35 * target, (name, n)


def test_flops_formula_by_hand():
    m = build_model(ModelConfig(preset="tiny"), vocab_size=100, eos_id=0)
    c = m.config  # tied embeddings: the table is used once as a lookup and once as the LM head
    layer = 4 * c.hidden_size * c.hidden_size + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    n = c.num_hidden_layers * layer + c.hidden_size + 100 * c.hidden_size
    assert matmul_params(m) == n
    assert flops_per_token(m, 64) == 6 * n + 12 * c.num_hidden_layers * 64 * c.hidden_size


def test_local_checkpoint_with_remote_code_is_refused(tmp_path):
    m = build_model(ModelConfig(preset="tiny"), vocab_size=100, eos_id=0)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="custom code"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="embeddings"):
        cfg.pop("auto_map")
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        load_model(tmp_path, vocab_size=1000)


def test_config_validation_catches_nonsense():
    cfg = preset_run_config("tiny", "/data/shards")
    for bad in [
        "train.grad_accum=0",
        "train.log_every=0",
        "optim.lr=-1",
        "optim.schedule=wavy",
        "train.precision=fp8",
        "data.mixture=weird",
    ]:
        with pytest.raises(ValueError, match="invalid config"):
            apply_overrides(cfg, [bad])
    assert apply_overrides(cfg, ["data.shards=123"]).data.shards == "123"  # a string field stays a string
