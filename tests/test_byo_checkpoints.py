"""A user's own checkpoints in a forest: configs written by another transformers version, weight
indexes that point elsewhere, remote code that must travel with a merge, heads tied to the embeddings,
and what opting out says about a seed taken from a checkpoint."""

import json
import shutil
from contextlib import ExitStack

import pytest
from safetensors.torch import load_file, save_file

from elmforest.forest.fingerprint import architecture_fingerprint
from elmforest.forest.manifest import Forest
from elmforest.forest.optout import remove_expert
from elmforest.merge.io import open_matching, remote_code_files
from elmforest.utils.errors import UserError


def _copy(forest_dir, i, dst):
    f = Forest.load(forest_dir)
    shutil.copytree(f.expert_dir(f.names[i]), dst)
    return dst


def _as_transformers_4(d):
    """The config as transformers 4.x wrote it (most checkpoints on the Hub): rope_theta, no head_dim."""
    c = json.loads((d / "config.json").read_text())
    theta = (c.pop("rope_parameters", None) or {}).get("rope_theta", 10000.0)
    c.pop("head_dim", None)
    c.pop("dtype", None)
    c.update(rope_theta=theta, rope_scaling=None, torch_dtype="float32", transformers_version="4.46.0")
    (d / "config.json").write_text(json.dumps(c))


def test_a_seed_written_by_transformers_4_takes_experts_and_a_mismatch_names_the_field(forest_dir, tmp_path):
    """The fingerprint hashed config.json as written: an expert of the same architecture, its config
    rewritten by transformers 5, was refused after it had trained; a real mismatch named two hashes."""
    seed = _copy(forest_dir, 0, tmp_path / "seed")
    _as_transformers_4(seed)
    assert architecture_fingerprint(seed) == architecture_fingerprint(_copy(forest_dir, 1, tmp_path / "e"))
    f = Forest.init(tmp_path / "f")
    f.set_seed(seed, source="a checkpoint")
    f.add(tmp_path / "e", "code", ["code"])
    # a forest written before the fingerprint was normalised recorded the seed file's own
    f.update(lambda d: d.update(architecture=architecture_fingerprint(seed, raw=True)))
    Forest.load(f.root).add(_copy(forest_dir, 2, tmp_path / "e2"), "legal", ["legal"])
    wide = _copy(forest_dir, 0, tmp_path / "wide")
    c = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**c, "vocab_size": c["vocab_size"] + 8}))
    with pytest.raises(UserError, match=r"vocab_size: \d+ vs \d+"):
        Forest.load(f.root).add(wide, "wide", ["wide"])


def test_a_weight_index_pointing_outside_its_folder_is_refused(forest_dir, tmp_path):
    """forest add took an expert whose index named a file elsewhere: its folder in the forest held no
    weights, fsck saw nothing, and averaging read the outside file."""
    e = _copy(forest_dir, 1, tmp_path / "e")
    outside = tmp_path / "outside.safetensors"
    (e / "model.safetensors").rename(outside)
    names = list(load_file(outside))
    (e / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(names, str(outside))})
    )
    f = Forest.init(tmp_path / "f")
    f.set_seed(_copy(forest_dir, 0, tmp_path / "seed"), source="a checkpoint")
    with pytest.raises(UserError, match="is not a file name inside"):
        f.add(e, "code", ["code"])
    assert Forest.load(f.root).names == []


def test_remote_code_travels_and_a_stored_tied_head_merges(forest_dir, tmp_path):
    d = tmp_path / "remote"
    d.mkdir()
    amap = {
        "AutoConfig": "configuration_x.XConfig",
        "AutoModelForCausalLM": ["repo--modeling_x.XModel", None],
    }
    (d / "config.json").write_text(json.dumps({"auto_map": amap}))
    for name in ("configuration_x.py", "modeling_x.py", "unrelated.py"):
        (d / name).write_text("# code\n")  # unrelated.py: a helper the modules import
    assert remote_code_files(d) == ["configuration_x.py", "modeling_x.py", "unrelated.py"]  # helpers too
    # a head tied to the embeddings, stored by one expert and not by the other: the same model
    a, b = _copy(forest_dir, 0, tmp_path / "a"), _copy(forest_dir, 1, tmp_path / "b")
    for x in (a, b):
        c = json.loads((x / "config.json").read_text())
        (x / "config.json").write_text(json.dumps({**c, "tie_word_embeddings": True}))
        w = {k: v for k, v in load_file(x / "model.safetensors").items() if not k.endswith("lm_head.weight")}
        if x == b:
            w["lm_head.weight"] = w["model.embed_tokens.weight"].clone()
        save_file(w, x / "model.safetensors", metadata={"format": "pt"})
    with ExitStack() as stack:
        wa, wb = open_matching([a, b], stack)
        assert set(wa.keys()) == set(wb.keys()) and not any(k.endswith("lm_head.weight") for k in wa.keys())
    c = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps({**c, "tie_word_embeddings": False}))
    (a / "config.json").write_text(json.dumps({**c, "tie_word_embeddings": False}))
    with ExitStack() as stack, pytest.raises(UserError, match=r"it has lm_head.weight"):
        open_matching([a, b], stack)


def test_opting_out_claims_nothing_about_a_seed_from_a_checkpoint(forest_dir, tmp_path):
    """The note "the seed was trained on a mixture that included X's domain" was said of a seed taken
    from a checkpoint, and not of an expert whose name differs from its domain."""
    f = Forest.init(tmp_path / "f")
    f.set_seed(_copy(forest_dir, 0, tmp_path / "seed"), source="a checkpoint")
    f.add(_copy(forest_dir, 1, tmp_path / "e"), "c2", ["code"])
    assert remove_expert(Forest.load(f.root), "c2")["seed_saw_it"] is False
    trained = tmp_path / "trained"
    shutil.copytree(forest_dir, trained)
    t = Forest.load(trained)
    named = t.names[0]
    assert remove_expert(t, named)["seed_saw_it"] is True
