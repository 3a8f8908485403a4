import json

import pytest
import torch

from elmforest.config import ModelConfig, RunConfig, apply_overrides
from elmforest.model.build import build_model, load_model
from elmforest.model.presets import PRESETS, preset_run_config
from elmforest.train.flops import flops_breakdown, flops_per_token, matmul_params
from elmforest.train.setup import freeze_except
from elmforest.utils.errors import UserError


def test_config_round_trip_and_overrides():
    cfg = preset_run_config("tiny", "/data/shards")
    again = RunConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    cfg2 = apply_overrides(
        cfg, ["train.steps=7", "optim.lr=1", 'data.domains=["a","b"]', "model.init_from=/ckpt/dir"]
    )
    assert cfg2.train.steps == 7 and cfg2.optim.lr == 1.0 and isinstance(cfg2.optim.lr, float)
    assert cfg2.data.domains == ["a", "b"] and cfg2.model.init_from == "/ckpt/dir"
    # a list field takes bare names in brackets; a string field (a regex) keeps its brackets
    cfg3 = apply_overrides(cfg, ["data.domains=[a, b]", "train.trackers=[]", "train.trainable=[ab]"])
    assert cfg3.data.domains == ["a", "b"] and cfg3.train.trackers == [] and cfg3.train.trainable == "[ab]"
    cfg4 = apply_overrides(cfg, ["data.domains=[2023, 'b']", "train.frozen_experts=[0, 1,]"])
    assert cfg4.data.domains == ["2023", "b"] and cfg4.train.frozen_experts == [0, 1]
    assert apply_overrides(cfg, ["data.domains=[2023, 2024]"]).data.domains == ["2023", "2024"]
    # a quoted name keeps its comma: it was split into two domains never asked for, silently
    assert apply_overrides(cfg, ["data.domains=['a,b', legal]"]).data.domains == ["a,b", "legal"]
    assert apply_overrides(cfg, ['data.domains=[ "x, y" ,z]']).data.domains == ["x, y", "z"]
    # an apostrophe inside a quoted name does not close it
    assert apply_overrides(cfg, ["data.domains=['o'reilly', legal]"]).data.domains == ["o'reilly", "legal"]
    from elmforest.utils.typed import split_list  # the command line's lists (eval --domains) alike

    assert split_list("'a,b',legal", "-d") == ["a,b", "legal"] and split_list("a, b,,", "-d") == ["a", "b"]
    assert split_list("'o'reilly', '80s", "-d") == ["o'reilly", "'80s"]  # a quote closing nowhere is text
    assert split_list(None, "-d") is None
    for empty in (" , ", ""):  # not given is the default; given empty was taken as not given, silently
        with pytest.raises(UserError, match="--domains is empty"):
            split_list(empty, "--domains")
    with pytest.raises(ValueError, match="neptune"):
        apply_overrides(cfg, ["train.trackers=[neptune]"])
    with pytest.raises(ValueError, match="unknown key"):
        apply_overrides(cfg, ["train.stepz=3"])
    with pytest.raises(ValueError, match="expected an integer"):
        apply_overrides(cfg, ["train.steps=lots"])
    with pytest.raises(ValueError, match="unknown key"):
        RunConfig.from_dict({"train": {"nope": 1}})
    # YAML 1.1 reads 1e-3 (no dot) as a string: a number field takes it as the number it is
    assert RunConfig.from_dict({"optim": {"lr": "1e-3"}}).optim.lr == 1e-3
    with pytest.raises(ValueError, match="expected a number"):
        RunConfig.from_dict({"optim": {"lr": "1e-3x"}})


def test_presets_sizes():
    tiny = build_model(ModelConfig(preset="tiny"), PRESETS["tiny"].vocab_size, 0)
    assert sum(p.numel() for p in tiny.parameters()) < 1_000_000
    small = build_model(ModelConfig(preset="cpu-small"), PRESETS["cpu-small"].vocab_size, 0)
    assert 1_000_000 < sum(p.numel() for p in small.parameters()) < 2_000_000
    medium = build_model(ModelConfig(preset="cpu-medium"), PRESETS["cpu-medium"].vocab_size, 0)
    assert 3_000_000 < sum(p.numel() for p in medium.parameters()) < 6_000_000
    assert PRESETS["cpu-small"].expert_lr is not None  # from the recorded sweep (docs/benchmarks.md)
    # the BTM presets land near their names (checked on the meta device: no memory is allocated)
    from transformers import LlamaConfig, LlamaForCausalLM

    from elmforest.model.presets import llama_kwargs

    for name, target in [("btm-125m", 125e6), ("btm-350m", 350e6), ("btm-750m", 750e6), ("btm-1.3b", 1.3e9)]:
        p = PRESETS[name]
        with torch.device("meta"):
            m = LlamaForCausalLM(
                LlamaConfig(vocab_size=p.vocab_size, **llama_kwargs(ModelConfig(preset=name)))
            )
        n = sum(x.numel() for x in m.parameters())
        assert 0.8 * target < n < 1.35 * target, (name, n)
        assert n == p.parameters(), name  # what `elmforest presets` prints
    for m, name in ((tiny, "tiny"), (small, "cpu-small"), (medium, "cpu-medium")):
        assert sum(x.numel() for x in m.parameters()) == PRESETS[name].parameters(), name


def test_flops_formula_by_hand():
    m = build_model(ModelConfig(preset="tiny"), vocab_size=100, eos_id=0)
    c = m.config  # tied embeddings: the table is used once as a lookup and once as the LM head
    h, i, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    attn, mlp, head = 4 * h * h, 3 * h * i, 100 * h  # matrices only: norms are no multiplies
    n = L * (attn + mlp) + head
    assert matmul_params(m) == n
    assert flops_per_token(m, 64) == 6 * n + 12 * L * 64 * h
    # FlexOlmo-style: only the MLPs train. Layer 0's attention is in front of every trainable weight
    # (forward only: 2 per weight, no backward through its products), layer 0's gate/up need no input
    # gradient (nothing before them trains), everything after costs 4 (forward + input gradient), and
    # the MLPs add their weight gradient.
    freeze_except(m, r"\.mlp\.")
    gate_up, down = 2 * h * i, h * i
    by_hand = (
        2 * attn
        + 4 * 64 * h  # layer 0 attention: forward only
        + 4 * gate_up
        + 6 * down  # layer 0 MLP: forward + weight grad; down also its input grad
        + (L - 1) * (4 * attn + 12 * 64 * h + 6 * mlp)  # later layers
        + 4 * head  # frozen (tied) head: forward + input gradient
    )
    assert flops_per_token(m, 64) == by_hand
    info = flops_breakdown(m, 64)
    assert info["trainable_params"] == L * mlp and info["weight_grad"] == 2 * L * mlp


def _flop_counter_per_token(model, seq_len: int) -> float:
    """What autograd actually runs, counted by torch (matmuls of the forward and backward passes)."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randint(0, model.config.vocab_size, (1, seq_len + 1))
    with FlopCounterMode(display=False) as fc:
        logits = model(input_ids=x[:, :-1]).logits
        F.cross_entropy(logits.float().flatten(0, 1), x[0, 1:]).backward()
    return fc.get_total_flops() / seq_len


@pytest.mark.parametrize(
    "trainable",
    [
        None,
        r"\.mlp\.",
        r"lm_head|embed",
        r"layers\.1\.",
        r"self_attn\.o_proj",
        r"norm",
        r"layers\.0\.post_attention_layernorm",
        r"layers\.1\.input_layernorm",
        r"^model\.norm",
    ],
)
def test_flops_match_torch_flop_counter_dense(trainable):
    m = build_model(ModelConfig(preset="tiny", attn_implementation="eager"), vocab_size=100, eos_id=0)
    if trainable:
        freeze_except(m, trainable)
    assert flops_per_token(m, 16) == _flop_counter_per_token(m, 16)


@pytest.mark.parametrize("trainable", [None, r"\.mlp\.gate\.weight$", r"\.mlp\.experts\."])
def test_flops_match_torch_flop_counter_moe(trainable):
    """An MoE runs only its top-k experts per token; router-only training backpropagates into every
    layer after the first router but not into the first layer's experts."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = MixtralConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    c._attn_implementation = "eager"
    torch.manual_seed(0)
    m = MixtralForCausalLM(c)
    m.set_experts_implementation("eager")
    if trainable:
        freeze_except(m, trainable)
    info = flops_breakdown(m, 16)
    assert info["moe_active_share"] == 0.5
    assert info["flops_per_token"] == _flop_counter_per_token(m, 16)


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
        "data.split=bogus",
        "data.domains=[]",
        "data.domains=[code,code]",
        "train.device=tpu",
        "model.hidden_size=-4",
        "model.num_kv_heads=3",  # does not divide the tiny preset's 4 heads
        "model.num_heads=3",  # 64 is not a multiple of 3
        "model.num_heads=64",  # head size 1: rotary embeddings need an even one
    ]:
        with pytest.raises(ValueError, match="invalid config"):
            apply_overrides(cfg, [bad])
    preset_run_config("tiny").train.trackers.append("wandb")  # a caller's own copy
    assert "wandb" not in preset_run_config("tiny").train.trackers
    with pytest.raises(ValueError, match="train is a section"):  # it reset the section's other fields
        apply_overrides(cfg, ['train={"steps": 3}'])
    assert apply_overrides(cfg, ["data.shards=123"]).data.shards == "123"  # a string field stays a string
    # full attention stays full: the preset's kv count (its num_heads) followed a new num_heads before,
    # a grouped-query model unsaid; given both, both are taken
    assert cfg.model.num_kv_heads == cfg.model.num_heads == 4
    assert apply_overrides(cfg, ["model.num_heads=8"]).model.num_kv_heads == 8
    assert apply_overrides(cfg, ["model.num_heads=2"]).model.num_kv_heads == 2  # refused before: 2 of 4
    both = apply_overrides(cfg, ["model.num_heads=8", "model.num_kv_heads=2"]).model
    assert (both.num_heads, both.num_kv_heads) == (8, 2)
    gqa = apply_overrides(cfg, ["model.num_kv_heads=2"])  # a grouped-query config keeps its kv count
    assert apply_overrides(gqa, ["model.num_heads=8"]).model.num_kv_heads == 2
    # a bad value corrected by a later --set: the earlier one must not make the good one a string
    assert apply_overrides(cfg, ["train.steps=abc", "train.steps=3"]).train.steps == 3
    # a text field whose default is null still takes a name that looks like a number
    assert apply_overrides(cfg, ["model.init_from=x", "model.init_from=2024"]).model.init_from == "2024"


def test_a_preset_label_an_attention_and_a_whole_config_of_a_gone_preset(tmp_path):
    """`--set model.preset=cpu-small` on `--preset tiny` trained tiny's model labelled cpu-small; a
    mistyped attn_implementation was a transformers traceback; a whole run config naming a preset since
    renamed could not be read, though it needs nothing from it."""
    import json

    from elmforest.model.presets import build_run_config, fill_architecture

    with pytest.raises(UserError, match="model.preset: choose the preset with --preset"):
        build_run_config("tiny", overrides=["model.preset=cpu-small"])
    with pytest.raises(UserError, match="model.attn_implementation must be one of sdpa, eager"):
        build_run_config("tiny", overrides=["model.attn_implementation=eager2"])
    cfg = build_run_config("tiny")
    whole = json.loads(json.dumps(cfg.to_dict()))
    whole["model"]["preset"] = "renamed-since"
    (tmp_path / "c.json").write_text(json.dumps(whole))
    again = build_run_config(None, config_file=str(tmp_path / "c.json"))
    assert fill_architecture(again.model).hidden_size == cfg.model.hidden_size


def test_a_partial_config_file_over_a_preset_keeps_full_attention_and_its_label(tmp_path):
    """A file setting num_heads over --preset made a grouped-query model without a word (as --set once
    did); a file's model.preset relabelled the preset's model; a seq_len past a whole config's renamed
    preset was answered with an unknown-preset error."""
    import json

    from elmforest.model.presets import build_run_config
    from elmforest.train.runcheck import check_context

    (tmp_path / "h.json").write_text(json.dumps({"model": {"num_heads": 8}}))
    m = build_run_config("tiny", config_file=str(tmp_path / "h.json")).model
    assert m.num_heads == m.num_kv_heads == 8
    (tmp_path / "p.json").write_text(json.dumps({"model": {"preset": "cpu-small"}}))
    with pytest.raises(UserError, match="model.preset 'cpu-small' with --preset tiny"):
        build_run_config("tiny", config_file=str(tmp_path / "p.json"))
    (tmp_path / "same.json").write_text(json.dumps({"model": {"preset": "tiny"}}))
    assert build_run_config("tiny", config_file=str(tmp_path / "same.json")).model.preset == "tiny"
    whole = build_run_config("tiny").to_dict()
    whole["model"]["preset"] = "renamed-since"
    whole["train"]["seq_len"] = 4096
    (tmp_path / "w.json").write_text(json.dumps(whole))
    cfg = build_run_config(None, config_file=str(tmp_path / "w.json"))
    model = type("M", (), {"config": type("C", (), {"max_position_embeddings": 2048})()})()
    with pytest.raises(UserError, match="longer than the model's 2048 positions"):
        check_context(model, cfg)
