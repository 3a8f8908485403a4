"""Issue 12's reproducibility faults: the run config names the whole model, a validation loss that
changes nothing, small domains refused aloud, a replaced expert never left half-swapped, children that
die with their parent without a preexec_fn."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import assert_all_die, descendants, tiny_config
from safetensors.torch import load_file

from elmforest.config import ARCHITECTURE_FIELDS
from elmforest.forest.manifest import Forest
from elmforest.model import presets
from elmforest.train.trainer import train
from elmforest.utils.errors import UserError
from elmforest.utils.proc import wait_for


def test_the_run_config_names_the_whole_model_and_a_changed_preset_is_refused(
    shards_dir, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    train(tiny_config(shards_dir, steps=12, stop_at=6), run, progress=False)
    saved = json.loads((run / "run_config.json").read_text())["model"]
    assert {k: saved[k] for k in ARCHITECTURE_FIELDS} == presets.PRESETS["tiny"].architecture()
    # presets.py changes later: the run is still the model it was, and resuming it as another is refused
    wider = presets.dataclasses.replace(presets.PRESETS["tiny"], hidden_size=96)
    monkeypatch.setitem(presets.PRESETS, "tiny", wider)
    with pytest.raises(UserError, match="model.hidden_size: 64 -> 96"):
        train(tiny_config(shards_dir, steps=12), run, progress=False)
    cfg = tiny_config(shards_dir, steps=12)
    for k, v in saved.items():  # the saved architecture rebuilds exactly the saved model
        setattr(cfg.model, k, v)
    assert train(cfg, run, progress=False)["resumed_from"] == 6


def test_a_run_saved_before_the_architecture_was_stored_still_resumes(shards_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(shards_dir, steps=12, stop_at=6), run, progress=False)
    cfg = json.loads((run / "run_config.json").read_text())
    for k in ARCHITECTURE_FIELDS:
        del cfg["model"][k]
    (run / "run_config.json").write_text(json.dumps(cfg))
    assert train(tiny_config(shards_dir, steps=12), run, progress=False)["resumed_from"] == 6


def test_the_validation_loss_is_logged_and_changes_no_weight(shards_dir, tmp_path):
    with_v, without = tmp_path / "v", tmp_path / "none"
    train(tiny_config(shards_dir, steps=12, ckpt_every=4, valid_windows=6), with_v, progress=False)
    train(tiny_config(shards_dir, steps=12, ckpt_every=4, valid_every=0), without, progress=False)
    lines = [json.loads(x) for x in (with_v / "valid.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [4, 8, 12] and all(m["windows"] == 6 for m in lines)
    assert lines[-1]["valid_loss"] < lines[0]["valid_loss"]  # it learns, and the measure sees it
    assert not (without / "valid.jsonl").exists() or not (without / "valid.jsonl").read_text()
    a, b = (
        load_file(str(with_v / "model" / "model.safetensors")),
        load_file(str(without / "model" / "model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_validation_loss_equals_a_brute_force_mean(shards_dir, tmp_path):
    from elmforest.data.shards import Shards
    from elmforest.model.build import load_model

    run = tmp_path / "run"
    train(tiny_config(shards_dir, steps=4, ckpt_every=4, valid_windows=3), run, progress=False)
    logged = json.loads((run / "valid.jsonl").read_text().splitlines()[-1])["valid_loss"]
    sh, model, T = Shards(shards_dir), load_model(run).eval(), 64
    nll, n = 0.0, 0
    for d in sorted(sh.domains):  # one window per domain: 3 windows over 3 domains
        w = torch.as_tensor(sh.tokens(d, "valid")[: T + 1].astype("int64"))[None]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=w[:, :-1]).logits.double(), -1)
        nll -= float(lp.gather(-1, w[:, 1:, None]).sum())
        n += T
    assert logged == pytest.approx(nll / n, rel=1e-5)


def test_a_domain_too_small_to_train_on_is_an_error_not_a_silent_drop(shards_dir, tmp_path):
    cfg = tiny_config(shards_dir, steps=4)
    cfg.train.seq_len = 1900  # longer than a test domain's valid split, shorter than the model's table
    cfg.data.split = "valid"
    with pytest.raises(UserError, match=r"fewer than seq_len \+ 1 = 1901 tokens .*tokens\)"):
        train(cfg, tmp_path / "r", progress=False)


_KILL_BETWEEN_RENAMES = """
import os, signal, sys
from elmforest.forest.manifest import Forest
from elmforest.utils import io
real, calls = os.rename, []
def rename(a, b):
    calls.append(b)
    if len(calls) == 2:  # the old checkpoint stepped aside; the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    real(a, b)
io.os.rename = rename
f = Forest.load(sys.argv[1])
name = f.names[0]
f.add(f.expert_dir(name), name, f.expert(name)["domains"], replace=True)
"""


def test_a_kill_between_the_renames_of_a_replaced_expert_is_repaired(forest_dir, tmp_path):
    f = tmp_path / "f"
    shutil.copytree(forest_dir, f)
    name = Forest.load(f).names[0]
    before = (f / "experts" / name / "model.safetensors").read_bytes()
    p = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, str(f)], capture_output=True)
    assert p.returncode == -signal.SIGKILL
    assert not (f / "experts" / name).exists()  # the manifest points at nothing until repaired
    forest = Forest.load(f)  # any read of the forest puts the stepped-aside copy back
    assert forest.intact(name) is None
    assert (f / "experts" / name / "model.safetensors").read_bytes() == before


def test_a_tied_child_dies_with_its_parent(tmp_path):
    script = textwrap.dedent(
        """
        import subprocess, time
        from elmforest.utils.proc import tied_to_this_process
        subprocess.Popen(tied_to_this_process(["sleep", "120"]))
        time.sleep(120)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not descendants(parent.pid):
            time.sleep(0.05)
        time.sleep(0.5)  # past the exec: the child is `sleep` now
        kids = descendants(parent.pid)
        assert kids, "the child never started"
    finally:
        parent.kill()
        parent.wait()
    assert_all_die(kids)


def test_a_rank_started_by_torchrun_dies_with_it(tmp_path):
    """A SIGKILLed torchrun left its ranks training on, orphaned, into the run directory."""
    script = textwrap.dedent(
        """
        import os, subprocess, sys, time
        rank = (
            "import pathlib, sys, time; from elmforest.utils.device import tie_to_launcher; tie_to_launcher(); "
            "pathlib.Path(sys.argv[1]).touch(); time.sleep(120)"
        )
        env = {**os.environ, "TORCHELASTIC_RUN_ID": "x"}
        subprocess.Popen([sys.executable, "-c", rank, sys.argv[1]], env=env)
        time.sleep(120)
        """
    )
    ready = tmp_path / "tied"
    launcher = subprocess.Popen([sys.executable, "-c", script, str(ready)])
    try:
        assert wait_for([ready], 60), "the rank never tied itself to its launcher"
        kids = descendants(launcher.pid)
        assert kids
    finally:
        launcher.kill()
        launcher.wait()
    assert_all_die(kids)


def test_raw_data_evaluation_never_guesses_which_documents_were_held_out(corpus, tokenizer_dir, tmp_path):
    """With its training shards moved, raw-data evaluation used the default fractions (5%/5%), so its
    `test` documents were not the model's held-out ones (these shards hold out 10%/10%)."""
    from elmforest.data.shards_build import build_shards
    from elmforest.data.splits import SplitSpec
    from elmforest.eval.bpb import evaluate

    shards = tmp_path / "shards"
    build_shards(corpus, tokenizer_dir, shards, SplitSpec(0.1, 0.1), progress=False)
    run = tmp_path / "run"
    train(tiny_config(shards, steps=4), run, progress=False)
    want = evaluate(run, shards, progress=False)  # the shards' own test split
    shutil.move(shards, tmp_path / "elsewhere")
    got = evaluate(run, corpus, progress=False)  # elmforest_data.json keeps the fractions
    assert got["split_spec"] == {"valid_frac": 0.1, "test_frac": 0.1, "by_file": False}
    for d, r in want["domains"].items():
        assert (got["domains"][d]["bytes"], got["domains"][d]["documents"]) == (r["bytes"], r["documents"])
    (run / "model" / "elmforest_data.json").unlink()  # a model saved before that file
    with pytest.raises(UserError, match="--split-fractions"):
        evaluate(run, corpus, progress=False)
    given = evaluate(run, corpus, progress=False, split_spec=SplitSpec(0.1, 0.1))
    assert given["domains"] == got["domains"]


def test_fsck_knows_every_scratch_run_the_moe_trainings_make():
    """forest/copies.py names the scratch runs of merge/moe_train.py by their tags (forest/ cannot read
    merge/'s table): a tag added on one side only left its cut runs unnoted by fsck."""
    from elmforest.forest.copies import SCRATCH_KINDS
    from elmforest.merge.moe_train import _TAGS

    assert sorted(_TAGS.values()) == sorted(SCRATCH_KINDS)
