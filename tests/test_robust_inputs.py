"""Issue 11: trust nothing on disk. Corrupt weights, broken checkpoints and missing domains are one-line
errors (or a visible note), never a traceback nor a silent gap; killed runs leave no orphan process."""

import json
import math
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_all_die, descendants
from safetensors.torch import load_file, save_file

from elmforest.config import ModelConfig
from elmforest.data.shards import Shards
from elmforest.data.tokenizer import load_tokenizer, save_tokenizer
from elmforest.eval.bpb import StreamScore, evaluate, evaluate_shards
from elmforest.eval.report import print_table
from elmforest.forest.evaluate import evaluate_forest_shards
from elmforest.forest.manifest import Forest
from elmforest.model.build import build_model, load_model
from elmforest.utils.errors import Diverged, NotFound, UserError
from elmforest.utils.io import read_json

EVAL = {"seq_len": 32, "batch_size": 4, "device": "cpu", "precision": "fp32", "max_bytes": 1500}


def _model_dir(shards_dir: Path, out: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny model with the shards' tokenizer: enough to test loading and scoring."""
    sh = Shards(shards_dir)
    build_model(ModelConfig(preset="tiny"), sh.vocab_size, sh.eos_id, seed=seed).save_pretrained(
        str(out), safe_serialization=True
    )
    save_tokenizer(load_tokenizer(shards_dir), out)
    return out


@pytest.fixture(scope="module")
def model_dir(shards_dir, tmp_path_factory) -> Path:
    return _model_dir(shards_dir, tmp_path_factory.mktemp("robust") / "model")


def _edited(src: Path, dst: Path, name: str, value: float) -> Path:
    """A copy of checkpoint `src` with every value of tensor `name` set to `value` (still a valid file)."""
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    tensors[name] = torch.full_like(tensors[name], value)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# -- item 3: corrupt weights -------------------------------------------------------------------------
def test_perplexity_of_a_huge_loss_is_inf_not_a_crash(model_dir, shards_dir, tmp_path):
    assert StreamScore(1e6, 10, 100).ppl == math.inf
    assert math.isnan(StreamScore(math.nan, 10, 100).ppl)
    # huge but finite logits (a flipped exponent bit): a finite, enormous loss
    big = _edited(model_dir, tmp_path / "big", "model.norm.weight", 1e6)
    res = evaluate(big, shards_dir, progress=False, **EVAL)
    for r in res["domains"].values():
        assert r["ppl"] == math.inf and math.isfinite(r["bpb"]) and r["bpb"] > 1000


def test_non_finite_loss_is_an_error_naming_the_model_and_the_domain(model_dir, shards_dir, tmp_path):
    bad = _edited(model_dir, tmp_path / "bad", "model.norm.weight", 3e38)  # finite, but logits overflow
    load_model(bad)  # the weights themselves are finite
    d = Shards(shards_dir).domains[0]
    with pytest.raises(Diverged, match=rf"{bad}.*{d}") as e:
        evaluate(bad, shards_dir, progress=False, **EVAL)
    assert "\n" not in str(e.value)
    # a forest with that expert: the error names the expert's directory in the forest
    f = Forest.init(tmp_path / "forest")
    f.add(model_dir, "good", ["a"])
    f.add(bad, "bad", ["b"])
    for mode in ("ensemble", "topk", "average"):
        with pytest.raises(Diverged, match=rf"{d}") as e:
            evaluate_forest_shards(f, Shards(shards_dir), mode=mode, k=2, prior="uniform", **EVAL)
        want = str(f.root) if mode == "average" else str(f.expert_dir("bad"))
        assert want in str(e.value) and "\n" not in str(e.value), mode


def test_load_model_refuses_non_finite_weights(model_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    for value in (math.nan, math.inf):
        bad = _edited(model_dir, tmp_path / f"w{value}", name, value)
        with pytest.raises(UserError, match=rf"model\.safetensors.*{name}") as e:
            load_model(bad)
        assert "\n" not in str(e.value)


# -- item 4: broken checkpoints ----------------------------------------------------------------------
def _truncate(p: Path, keep: int) -> None:
    p.write_bytes(p.read_bytes()[:keep])


def _break_config(d: Path) -> None:
    _truncate(d / "config.json", 2)


def _no_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _truncated_weights(d: Path) -> None:
    _truncate(d / "model.safetensors", (d / "model.safetensors").stat().st_size - 100)


def _truncated_header(d: Path) -> None:
    _truncate(d / "model.safetensors", 50)


def _bad_header(d: Path) -> None:
    data = bytearray((d / "model.safetensors").read_bytes())
    data[8:12] = b"\xff\xfe{x"  # the JSON header after the 8-byte length
    (d / "model.safetensors").write_bytes(bytes(data))


def _dropped_tensor(d: Path) -> None:
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]  # transformers would initialise it at random
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _config_of_another_size(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] *= 2  # transformers' own error only points at a report it logged
    (d / "config.json").write_text(json.dumps(cfg))


def _pickle_weights_only(d: Path) -> None:
    (d / "model.safetensors").rename(d / "pytorch_model.bin")  # never unpickled, whatever it holds


@pytest.mark.parametrize(
    "breaks, error, names",
    [
        (_break_config, UserError, "config.json"),
        (_no_weights, NotFound, "model.safetensors"),
        (_truncated_weights, UserError, "model.safetensors"),
        (_truncated_header, UserError, "model.safetensors"),
        (_bad_header, UserError, "model.safetensors"),
        (_dropped_tensor, UserError, "model.layers.1.mlp.up_proj.weight"),
        (_config_of_another_size, UserError, "model.layers.0.mlp.down_proj.weight is [64, 128]"),
        (_pickle_weights_only, UserError, "pytorch_model.bin"),
    ],
)
def test_broken_checkpoints_are_one_line_errors_naming_the_file(model_dir, tmp_path, breaks, error, names):
    d = tmp_path / "ckpt"
    shutil.copytree(model_dir, d)
    breaks(d)
    for load in (lambda: load_model(d), lambda: build_model(ModelConfig(init_from=str(d)), 10, 0)):
        with pytest.raises(error) as e:
            load()
        msg = str(e.value)
        assert names in msg and str(d) in msg and "\n" not in msg, msg


def test_a_sharded_checkpoint_loads_until_a_shard_is_missing(model_dir, tmp_path):
    """What transformers writes for big models (an index and its shards) passes the checks..."""
    d = tmp_path / "sharded"
    shutil.copytree(model_dir, d)
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    keys = sorted(tensors)
    parts = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    for f, ks in parts.items():
        save_file({k: tensors[k] for k in ks}, d / f, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    want = load_model(model_dir).state_dict()
    got = load_model(d).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # ... and a shard that is not there is named, with the index that lists it
    (d / "b.safetensors").unlink()
    with pytest.raises(NotFound, match=r"b\.safetensors.*model\.safetensors\.index\.json") as e:
        load_model(d)
    assert "\n" not in str(e.value)
    # a shard with a non-finite tensor is named with that tensor
    name = keys[2]
    save_file(
        {k: tensors[k] if k != name else tensors[k] * math.nan for k in parts["a.safetensors"]},
        d / "a.safetensors",
        metadata={"format": "pt"},
    )
    save_file({k: tensors[k] for k in parts["b.safetensors"]}, d / "b.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=rf"a\.safetensors: tensor {name} "):
        load_model(d)


def test_read_json_names_the_file_it_cannot_parse(tmp_path):
    p = tmp_path / "cut.json"
    p.write_text('{"a": 1,\n')
    with pytest.raises(UserError, match=r"cut\.json") as e:
        read_json(p)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


# -- item 5: a domain without documents in the evaluated split ---------------------------------------
@pytest.fixture()
def gap_shards(shards_dir, tmp_path) -> tuple[Path, str]:
    """The test shards with one domain's test split gone (it keeps its train and valid splits)."""
    dst = tmp_path / "shards"
    shutil.copytree(shards_dir, dst)
    index = json.loads((dst / "index.json").read_text())
    gone = sorted(index["domains"])[0]
    del index["domains"][gone]["splits"]["test"]
    (dst / "index.json").write_text(json.dumps(index))
    return dst, gone


def test_a_domain_without_test_documents_is_named_not_dropped_silently(
    model_dir, gap_shards, tmp_path, capsys
):
    sh_dir, gone = gap_shards
    sh = Shards(sh_dir)
    res = evaluate_shards(load_model(model_dir), sh, progress=False, **EVAL)
    assert gone not in res["domains"] and len(res["domains"]) == len(sh.domains) - 1
    assert res["missing"] == {gone: "no test documents"}
    assert gone in capsys.readouterr().err  # a note when it happens
    print_table({"model": res})
    out = capsys.readouterr().out
    assert gone in out and "no test documents" in out
    for v in res["domains"].values():  # what each score rests on: its bytes and whole documents
        assert f"{v['bytes']:,} ({v['documents']})" in out
    # the same for a forest
    f = Forest.init(tmp_path / "forest")
    f.add(model_dir, "only", ["a"])
    for mode in ("ensemble", "average"):
        fres = evaluate_forest_shards(f, sh, mode=mode, prior="uniform", **EVAL)
        assert fres["missing"] == {gone: "no test documents"} and gone not in fres["domains"]
        assert gone in capsys.readouterr().err
    # every domain present: nothing is reported missing
    full = evaluate_shards(
        load_model(model_dir),
        Shards(sh_dir),
        domains=[d for d in sh.domains if d != gone],
        progress=False,
        **EVAL,
    )
    assert full.get("missing", {}) == {}


# -- processes die with their parent -----------------------------------------------------------------
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_local_executor_workers_die_with_a_killed_parent(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            """
            import time
            from elmforest.launch.executor import LocalExecutor

            def job(j):
                time.sleep(120)
                return j

            if __name__ == "__main__":
                LocalExecutor(workers=2).map(job, [{}, {}], ["a", "b"], ["a.log", "b.log"])
            """
        )
    )
    log = open(tmp_path / "run.log", "wb")  # the killed run's resource tracker warns of leaked semaphores
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stderr=log)
    workers: set[int] = set()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None and len(workers) < 2:
            time.sleep(0.1)
            workers = {p for p in descendants(proc.pid) if "spawn_main" in _cmdline(p)}
        assert len(workers) == 2, f"the workers never started: {(tmp_path / 'run.log').read_text()}"
        time.sleep(2)  # the workers are past their initializer and running the jobs
    finally:
        proc.kill()
        proc.wait()
        log.close()
    assert_all_die(workers)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_first_document_longer_than_the_byte_limit_is_said_under_the_table(model_dir, shards_dir, capsys):
    """Whole documents are kept, so a limit below the first document scores that document alone, past
    the limit: the table says so for each such domain, and nothing where the limit held."""
    sh = Shards(shards_dir)
    kw = {**EVAL, "max_bytes": 1}
    res = evaluate_shards(load_model(model_dir), sh, progress=False, **kw)
    capsys.readouterr()
    print_table({"model": res})
    out = capsys.readouterr().out
    for d, v in res["domains"].items():
        assert v["documents"] == 1
        assert (
            f"note: {d}'s first document alone ({v['bytes'] - 1:,} bytes) is longer than the byte limit (1)"
            in out
        )
    kw["max_bytes"] = 10**9
    print_table({"model": evaluate_shards(load_model(model_dir), sh, progress=False, **kw)})
    assert "longer than the byte limit" not in capsys.readouterr().out
