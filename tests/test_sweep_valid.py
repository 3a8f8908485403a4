"""A sweep over domains one of which has no valid documents (a small c-BTM cluster of a subsample)."""

import json
import shutil

import pytest
from conftest import tiny_config

from elmforest.data.shards import Shards
from elmforest.eval.bpb import evaluate_shards
from elmforest.forest.manifest import Forest
from elmforest.launch.sweep import sweep
from elmforest.launch.sweep_results import score_experts
from elmforest.model.build import load_model


def _without_valid(shards_dir, out, domains):
    shutil.copytree(shards_dir, out)
    index = json.loads((out / "index.json").read_text())
    for d in domains:
        del index["domains"][d]["splits"]["valid"]
    (out / "index.json").write_text(json.dumps(index))
    return out


def test_a_domain_without_valid_documents_trains_but_the_lr_is_chosen_on_the_others(shards_dir, tmp_path):
    """It stopped a study with `lr_grid` at a c-BTM cluster set whose smallest cluster drew no valid
    document: the sweep refused the whole set. The domain's expert still trains (the forest being
    tuned has it); each arm is scored on the domains that can be."""
    sh = Shards(_without_valid(shards_dir, tmp_path / "shards", ["legal"]))
    assert not sh.has("legal", "valid") and sh.has("legal", "train")
    lines = []
    lrs = [1e-4, 1e-3, 1e-2, 3e-2]
    base = tiny_config(sh.root, steps=8, batch_size=8)
    res = sweep(sh.root, tmp_path / "s", base, "all", lrs, lrs, log=lines.append)
    scored = [d for d in sh.domains if d != "legal"]
    assert res["domains"] == sh.domains and res["scored_domains"] == scored
    assert any("legal: no valid documents" in x for x in lines)
    for arm in ("dense", "experts", "dense_continue"):
        assert all(sorted(p["domains"]) == sorted(scored) for p in res[arm]["points"]), arm
    best = tmp_path / "s" / "experts" / f"lr-{res['experts']['best_lr']:.3g}"
    assert Forest.load(best).intact("legal") is None  # trained all the same
    dense = tmp_path / "s" / "dense" / f"lr-{res['dense']['best_lr']:.3g}" / "runs" / "dense" / "model"
    want = evaluate_shards(load_model(dense), sh, "valid", scored, 64, progress=False)["mean_bpb"]
    assert res["dense"]["best_valid_mean_bpb"] == pytest.approx(want)
    # an expert that died (grad norm 0) makes its LR diverged, scored or not: the unscored one is the
    # one trained on the fewest documents, the likeliest to die at the top of the grid
    point = tmp_path / "dead"
    shutil.copytree(best, point)
    (point / "valid.json").unlink()
    log = point / "runs" / "legal" / "metrics.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    rows[-1] = {**rows[-1], "grad_norm": 0.0} if "grad_norm" in rows[-1] else {"step": 8, "grad_norm": 0.0}
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = score_experts(Forest.load(point), sh, scored, 64)
    assert got["valid_mean_bpb"] is None and "gradients vanished" in got["diverged"]
    # X-ELM's groups: a group's domains without valid documents are left out of its scoring, not read
    forest = Forest.load(best)
    other = scored[0]
    got = score_experts(forest, sh, scored, 64, experts={"legal": ["legal", other], scored[1]: [scored[1]]})
    assert sorted(got["domains"]) == sorted(scored)
    by_legal = evaluate_shards(
        load_model(forest.expert_dir("legal")), sh, "valid", [other], 64, progress=False
    )
    assert got["domains"][other] == pytest.approx(by_legal["domains"][other]["bpb"])


def test_a_domain_named_without_training_documents_is_refused(shards_dir, tmp_path):
    sh = Shards(_without_valid(shards_dir, tmp_path / "shards", []))
    index = json.loads((sh.root / "index.json").read_text())
    del index["domains"]["legal"]["splits"]["train"]
    (sh.root / "index.json").write_text(json.dumps(index))
    base = tiny_config(sh.root, steps=8)
    base.data.domains = ["code", "legal", "scripture"]
    with pytest.raises(ValueError, match="no train split for legal: nothing to sweep there"):
        sweep(sh.root, tmp_path / "s", base, lrs=[1e-4, 1e-3, 1e-2, 3e-2], log=None)


def test_a_sweep_with_no_valid_documents_at_all_is_refused(shards_dir, tmp_path):
    sh = Shards(_without_valid(shards_dir, tmp_path / "shards", Shards(shards_dir).domains))
    with pytest.raises(ValueError, match="has a valid split to choose an LR on"):
        sweep(sh.root, tmp_path / "s", tiny_config(sh.root, steps=8), lrs=[1e-4, 1e-3, 1e-2, 3e-2], log=None)
    assert not (tmp_path / "s").exists()


def test_expert_points_of_another_seed_are_named_all_at_once(shards_dir, tmp_path):
    """The best dense LR moved: the expert points branched from the old seed were refused one per rerun
    ("use another directory"), the user deleting them one by one."""
    base, grid = tiny_config(shards_dir, steps=8), [1e-4, 1e-3, 1e-2, 3e-2]
    sweep(shards_dir, tmp_path / "s", base, "experts", expert_lrs=grid, dense_lr=1e-3, log=None)
    with pytest.raises(ValueError, match="expert point") as e:
        sweep(shards_dir, tmp_path / "s", base, "experts", expert_lrs=grid, dense_lr=2e-3, log=None)
    for lr in ("0.0001", "0.001", "0.01", "0.03"):
        assert str(tmp_path / "s" / "experts" / f"lr-{lr}") in str(e.value)
    for lr in ("0.0001", "0.001", "0.01", "0.03"):
        shutil.rmtree(tmp_path / "s" / "experts" / f"lr-{lr}")
    res = sweep(shards_dir, tmp_path / "s", base, "experts", expert_lrs=grid, dense_lr=2e-3, log=None)
    assert res["experts"]["seed_lr"] == 2e-3
    # each point's seed and trainer state are the seed's files, hard-linked, not a copy per point
    for part in ("seed_state/optimizer.safetensors", "seed/model.safetensors"):
        have = {(p / part).stat().st_ino for p in (tmp_path / "s" / "experts").glob("lr-*")}
        assert have == {(tmp_path / "s" / "dense" / "lr-0.002" / part).stat().st_ino}, part
