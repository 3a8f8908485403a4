"""Evaluation, sweep and c-BTM inputs a user tried that crashed, returned stale numbers or silently
changed the forest: each is now refused naming the problem, or said."""

from __future__ import annotations

import json
import shutil

import pytest

from elmforest.cli import main
from elmforest.config import RunConfig
from elmforest.forest.manifest import Forest
from elmforest.launch.sweep import sweep
from elmforest.utils.errors import UserError


def test_crossdoc_with_no_qualifying_document_says_so(forest_dir, shards_dir, tmp_path, capsys):
    model = Forest.load(forest_dir).expert_dir(Forest.load(forest_dir).names[0])
    argv = ["eval-crossdoc", "--data", str(shards_dir), "--model", str(model), "--tasks", "second_half"]
    argv += ["--max-docs", "3", "--seq-len", "2048", "--no-progress"]  # no test document is that long
    assert main(argv) == 0
    assert "second_half: no test document qualifies" in capsys.readouterr().out
    (tmp_path / "j").mkdir()
    assert main([*argv, "--json", str(tmp_path / "j")]) == 2  # refused before the evaluation
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "opts", [["--mode", "cluster", "--route", "segment:abc"], ["--mode", "topk", "--select", "prefix:0"]]
)
def test_a_malformed_window_width_is_refused(cluster_forest, shards_dir, capsys, opts):
    assert main(["eval", "--forest", str(cluster_forest), "--data", str(shards_dir), *opts]) == 2
    err = capsys.readouterr().err
    assert "W must be a whole number of tokens >= 1" in err and "Traceback" not in err


def test_a_sweep_rerun_on_other_shards_is_refused(shards_dir, tmp_path):
    out = tmp_path / "sw"
    out.mkdir()
    (out / "sweep.json").write_text(
        json.dumps({"shards": "/elsewhere", "shards_fingerprint": "0123456789abcdef"})
    )
    with pytest.raises(UserError, match="a sweep on other shards needs another --out"):
        sweep(shards_dir, out, RunConfig(), lrs=[1e-3, 2e-3, 4e-3, 8e-3], arm="dense")
    assert not (out / "dense").exists()


def test_a_trained_cluster_forest_keeps_its_clusterer(cluster_forest, corpus, tmp_path):
    from elmforest.cluster.assign import fit_clusterer

    f = tmp_path / "f"
    shutil.copytree(cluster_forest, f, symlinks=True)
    other = tmp_path / "other"
    fit_clusterer(corpus, 2, other, sample_docs=300, dims=8, min_df=1)
    with pytest.raises(UserError, match="a new clusterer needs a new forest"):
        Forest.load(f).set_clusterer(other)
    assert Forest.load(f).data["clusterer"]["k"] == 3
    Forest.load(f).set_clusterer(f / "clusterer")  # the same clusterer again is fine
