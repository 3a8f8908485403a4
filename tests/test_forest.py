import json
import math
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from elmforest.data.shards import Shards
from elmforest.eval.bpb import evaluate_shards, window_batch
from elmforest.forest import branching, btm
from elmforest.forest.evaluate import estimate_prior, evaluate_forest_shards, make_pool
from elmforest.forest.generate import generate, mixture_logprobs
from elmforest.forest.manifest import Forest
from elmforest.forest.mixture import tied_at_k
from elmforest.forest.posterior import cached_prior, ensemble_logprob, log_weights, sequence_posterior
from elmforest.merge.average import average_checkpoints
from elmforest.model.build import load_model
from elmforest.utils.errors import UserError


def _eval(forest_dir, shards_dir, **kw):
    kw = {"seq_len": 32, "batch_size": 4, "device": "cpu", "precision": "fp32", "prior_batches": 2, **kw}
    return evaluate_forest_shards(Forest.load(forest_dir), Shards(shards_dir), **kw)


# -- the mixture math against brute force ------------------------------------------------------------
def test_posterior_weights_match_brute_force():
    g = torch.Generator().manual_seed(0)
    n, b, t = 3, 2, 6
    lp = -torch.rand(n, b, t, generator=g, dtype=torch.float64) * 5
    prior = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    lw = log_weights(lp, prior, "posterior")
    lw_demix = log_weights(lp, prior, "demix")
    for bi in range(b):
        for ti in range(t):
            unnorm = [
                float(prior[j]) * math.prod(math.exp(float(lp[j, bi, s])) for s in range(ti))
                for j in range(n)
            ]
            want = [u / sum(unnorm) for u in unnorm]
            assert lw[:, bi, ti].exp().tolist() == pytest.approx(want, rel=1e-7)  # float64, other order
            prev = [float(prior[j]) * (math.exp(float(lp[j, bi, ti - 1])) if ti else 1.0) for j in range(n)]
            assert lw_demix[:, bi, ti].exp().tolist() == pytest.approx(
                [p / sum(prev) for p in prev], rel=1e-7
            )
            mix = sum(want[j] * math.exp(lp[j, bi, ti]) for j in range(n))
            assert float(ensemble_logprob(lp, lw)[bi, ti]) == pytest.approx(math.log(mix), rel=1e-7)
    assert torch.allclose(log_weights(lp, prior, "fixed").exp()[:, 0, 0], prior)
    seq = sequence_posterior(lp, prior)
    assert torch.allclose(seq, torch.softmax(torch.log(prior)[:, None] + lp.sum(-1), 0))


def test_window_posterior_keeps_a_far_behind_expert_above_zero():
    # float32 evidence: 120 nats behind is exp(-120) ~ 8e-53, below float32's smallest number; a cached
    # prior averaging such windows would give the expert exactly 0 and -inf log weight for good
    lp = torch.full((2, 3, 100), -3.0, dtype=torch.float32)
    lp[1] -= 1.2
    post = sequence_posterior(lp)
    assert post.dtype == torch.float64
    assert float(post[1, 0]) == pytest.approx(math.exp(-120) / (1 + math.exp(-120)), rel=1e-4)
    assert float(cached_prior([post])[1]) > 0


def test_posterior_is_stable_for_very_long_prefixes():
    lp = torch.full((2, 1, 5000), -8.0, dtype=torch.float64)
    lp[0] -= 0.01  # expert 1 slightly better on every token: its weight must go to 1, not NaN
    w = log_weights(lp, None, "posterior").exp()
    assert torch.isfinite(w).all() and w[1, 0, -1] > 0.999999


def test_cached_prior_is_a_bias_corrected_ema():
    posts = [torch.tensor([[0.9, 0.7], [0.1, 0.3]]), torch.tensor([[0.2, 0.4], [0.8, 0.6]])]
    means = [p.double().mean(-1).numpy() for p in posts]
    # batch i of n weighs alpha (1 - alpha)^(n - i), normalised: nothing is left on a uniform start
    w = np.array([0.3 * 0.7, 0.3])
    want = (w[0] * means[0] + w[1] * means[1]) / w.sum()
    assert cached_prior(posts, 0.3).numpy() == pytest.approx(want)


def test_cached_prior_by_default_weighs_every_window_alike():
    posts = [torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), torch.tensor([[0.0], [1.0]])]
    assert cached_prior(posts).tolist() == pytest.approx([0.5, 0.5])  # 2 of 4 windows each
    # BTM's moving average instead follows the last batch
    assert float(cached_prior(posts, 0.3)[1]) > 0.5


def test_cached_prior_keeps_no_weight_on_uniform():
    """Started at uniform, one one-hot batch gave 0.3 + 0.7/N to the right expert, four batches 0.82:
    the fixed weights, the average and top-2's second expert were all shrunk toward uniform."""
    one_hot = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    for n in (1, 4, 20):
        for alpha in (None, 0.3):
            pi = cached_prior([one_hot] * n, alpha)
            assert float(pi[0]) == pytest.approx(1.0) and float(pi.sum()) == pytest.approx(1.0)


def test_posterior_restarts_at_each_document():
    """With document starts, the evidence of a window's earlier document does not carry over."""
    torch.manual_seed(1)
    lp = -torch.rand(3, 2, 10) * 4
    starts = torch.zeros(2, 10, dtype=torch.bool)
    starts[0, 0] = starts[0, 6] = starts[1, 3] = True
    prior = torch.tensor([0.5, 0.3, 0.2])
    got = log_weights(lp, prior, "posterior", starts).exp()
    for b in range(2):
        for t in range(10):
            s0 = max(s for s in [0, *starts[b].nonzero().flatten().tolist()] if s <= t)
            w = prior.double().log() + lp[:, b, s0:t].double().sum(-1)
            assert torch.allclose(got[:, b, t].double(), torch.softmax(w, 0), atol=1e-6)
    carried = log_weights(lp, prior, "posterior").exp()
    assert not torch.allclose(carried[:, 0, 7], got[:, 0, 7])  # window mode keeps the first document
    assert torch.allclose(got[:, 0, 6], prior)  # a new document starts from the prior
    demix = log_weights(lp, prior, "demix", starts).exp()
    assert torch.allclose(demix[:, 1, 3].double(), prior.double())


# -- the forest on real (tiny) experts ----------------------------------------------------------------
def test_ensemble_distribution_sums_to_one_and_matches_scoring(forest_dir, shards_dir):
    forest, sh = Forest.load(forest_dir), Shards(shards_dir)
    models = [load_model(d).eval() for d in forest.expert_dirs()]
    x, y = window_batch(sh.tokens(sh.domains[0], "test"), sh.eos_id, 16, [0, 1])
    with torch.no_grad():
        full = torch.stack(
            [torch.log_softmax(m(input_ids=x).logits.double(), -1) for m in models]
        )  # [N,B,T,V]
    lp = full.gather(-1, y.clamp_min(0)[None, :, :, None].expand(len(models), -1, -1, 1))[..., 0]
    lw = log_weights(lp, torch.tensor([0.2, 0.3, 0.5]), "posterior")
    mix = mixture_logprobs(full, lw)  # [B, T, V]
    assert torch.allclose(mix.exp().sum(-1), torch.ones(2, 16, dtype=torch.float64), atol=1e-7)
    assert torch.allclose(mix.gather(-1, y[..., None])[..., 0], ensemble_logprob(lp, lw), atol=1e-7)


def test_one_expert_forest_equals_that_expert(forest_dir, shards_dir, tmp_path):
    full = Forest.load(forest_dir)
    name = full.names[0]
    solo = Forest.init(tmp_path / "solo")
    solo.add(full.expert_dir(name), name, full.expert(name)["domains"])
    res = _eval(tmp_path / "solo", shards_dir, prior="uniform")
    ref = evaluate_shards(
        load_model(full.expert_dir(name)),
        Shards(shards_dir),
        "test",
        seq_len=32,
        batch_size=4,
        device="cpu",
        precision="fp32",
        progress=False,
    )
    for d, r in res["domains"].items():
        assert r["bpb"] == pytest.approx(ref["domains"][d]["bpb"], rel=1e-6)
        assert r["posterior"] == {name: pytest.approx(1.0)}


def test_topk_with_all_experts_equals_full_ensemble_and_topk_runs_only_k(forest_dir, shards_dir):
    n = len(Forest.load(forest_dir).names)
    full = _eval(forest_dir, shards_dir, mode="ensemble")
    topn = _eval(forest_dir, shards_dir, mode="topk", k=n)
    prefix = _eval(forest_dir, shards_dir, mode="topk", k=n, select="prefix:8")
    for d in full["domains"]:
        # the experts' float32 forward passes run in other batches here: equal to float32 rounding
        assert topn["domains"][d]["bpb"] == pytest.approx(full["domains"][d]["bpb"], rel=1e-6)
        assert prefix["domains"][d]["bpb"] == pytest.approx(full["domains"][d]["bpb"], rel=1e-6)
        assert sum(full["domains"][d]["posterior"].values()) == pytest.approx(1.0)
    # prefix selection with k < n, each window one piece (--reset window): every expert reads the first
    # w tokens, the chosen k the whole window where it has tokens past them (per document: below)
    sh = Shards(shards_dir)
    pre = _eval(forest_dir, shards_dir, mode="topk", k=1, select="prefix:8", reset="window")
    for d, r in pre["domains"].items():
        assert r["bpb"] > 0 and sum(r["posterior"].values()) == pytest.approx(1.0)
        assert sh.info(d, "test")["tokens"] == r["tokens"]
    lengths = [
        min(32, r["tokens"] - 32 * w)
        for r in pre["domains"].values()
        for w in range(math.ceil(r["tokens"] / 32))
    ]
    heads, tails = sum(min(8, t) for t in lengths), sum(t for t in lengths if t > 8)
    assert lengths and pre["compute"]["expert_token_passes"] == n * heads + tails
    # a prefix as long as the window is the full ensemble: no second pass is counted
    whole = _eval(forest_dir, shards_dir, mode="topk", k=1, select="prefix:500")
    assert whole["compute"]["fraction_of_full"] == pytest.approx(1.0)
    assert whole["mean_bpb"] == pytest.approx(full["mean_bpb"], rel=1e-6)
    top1 = _eval(forest_dir, shards_dir, mode="topk", k=1)
    assert top1["compute"]["fraction_of_full"] == pytest.approx(1 / n)
    assert full["compute"]["fraction_of_full"] == pytest.approx(1.0)
    for r in top1["domains"].values():
        assert len(r["experts_run"]) == 1
        assert r["experts_run"][0] == max(r["prior"], key=r["prior"].get)


def test_a_top_k_that_a_prior_tie_chose_says_so(forest_dir, shards_dir, capsys):
    """With a uniform prior (given, or a domain with no valid split to read one from) the experts tie and
    top-k keeps the first k in the forest's order: `eval` reported that row as if chosen."""
    names = Forest.load(forest_dir).names
    tied = _eval(forest_dir, shards_dir, mode="topk", k=1, prior="uniform")
    err = capsys.readouterr().err
    for r in tied["domains"].values():
        assert r["experts_run"] == names[:1] and "tie" in r["top_by"]
    # one clause for every domain the tie gave the same experts (64 domains were 64 clauses, one line)
    assert f"ties for {', '.join(tied['domains'])} ({names[0]}):" in err
    from elmforest.forest.evaluate import _some

    assert _some([f"d{i}" for i in range(8)]) == "d0, d1, d2, d3, d4, d5 and 2 more"
    assert _some([f"d{i}" for i in range(6)]) == "d0, d1, d2, d3, d4, d5"
    assert "top-1 by the prior, which ties for" in err
    chosen = _eval(forest_dir, shards_dir, mode="topk", k=1, prior_batches=4)  # cached: no tie
    # chosen per window by the data (prefix), or no choice at all (the ensemble): nothing to say
    by_prefix = _eval(forest_dir, shards_dir, mode="topk", k=1, prior="uniform", select="prefix:8")
    every = _eval(forest_dir, shards_dir, mode="ensemble", prior="uniform")
    for res in (chosen, by_prefix, every):
        assert all("top_by" not in r for r in res["domains"].values())
    assert "ties for" not in capsys.readouterr().err
    # the tie at the k-th place is what matters, not one above it
    assert tied_at_k(torch.tensor([0.3, 0.4, 0.3]), 2) and not tied_at_k(torch.tensor([0.4, 0.2, 0.4]), 2)
    assert not tied_at_k(torch.tensor([0.5, 0.5]), 2)


def test_cached_prior_prefers_the_domain_expert(forest_dir, shards_dir):
    res = _eval(forest_dir, shards_dir, mode="ensemble", prior_batches=4)
    for d, r in res["domains"].items():
        assert max(r["prior"], key=r["prior"].get) == d  # experts are named after their domain
    fixed = _eval(forest_dir, shards_dir, mode="ensemble", weighting="fixed", prior_batches=4)
    assert fixed["weighting"] == "fixed" and fixed["mean_bpb"] > 0


def test_average_equals_hand_computed_mean(forest_dir, tmp_path):
    forest = Forest.load(forest_dir)
    dirs = forest.expert_dirs()
    weights = [0.5, 0.3, 0.2]
    out = average_checkpoints(dirs, tmp_path / "avg", weights)
    got = load_file(str(out / "model.safetensors"))
    tensors = [load_file(str(d / "model.safetensors")) for d in dirs]
    for k, v in got.items():
        want = sum(w * t[k] for w, t in zip(weights, tensors, strict=True))
        assert torch.allclose(v, want, atol=1e-7), k
    # a sharded write gives the same tensors and loads with transformers
    sharded = average_checkpoints(dirs, tmp_path / "avg_sharded", weights, max_shard_bytes=20_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    m = AutoModelForCausalLM.from_pretrained(str(sharded))
    sd = m.state_dict()
    for k, v in got.items():
        assert torch.equal(sd[k], v), k
    assert not [p for p in sharded.rglob("*") if p.suffix in (".bin", ".pkl", ".pt")]


def test_average_records_its_experts_from_anywhere(forest_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(forest_dir)
    rel = [d.relative_to(forest_dir) for d in Forest.load(forest_dir).expert_dirs()]
    out = average_checkpoints(rel[:2], tmp_path / "avg_rel")
    meta = json.loads((out / "elmforest_average.json").read_text())
    assert meta["experts"] == [str((forest_dir / d).resolve()) for d in rel[:2]]  # not cwd-relative


def test_compute_is_matched_and_lineage_recorded(forest_dir):
    forest = Forest.load(forest_dir)
    dense = json.loads((forest.root / "runs" / "dense" / "summary.json").read_text())
    assert forest.total_flops() == dense["flops"]  # seed + experts == dense, exactly
    plan = btm.Plan(**forest.data["plan"])
    dense_lr = {
        m["step"]: m["lr"]
        for m in map(json.loads, (forest.root / "runs" / "dense" / "metrics.jsonl").read_text().splitlines())
    }
    for e in forest.experts:
        # the expert continues the seed's step counter and LR schedule
        first = json.loads((forest.root / "runs" / e["name"] / "metrics.jsonl").read_text().splitlines()[0])
        assert first["step"] > plan.seed_steps and first["lr"] == pytest.approx(dense_lr[first["step"]])
        assert e["parents"] == [{"name": "seed", "weight": 1.0}]
        assert e["tokens"] == (plan.total_steps - plan.seed_steps) * plan.expert_batch_size * 64
        fp = e["fingerprints"]
        assert fp["tokenizer"] == forest.data["tokenizer"] and fp["data"]


def test_add_remove_and_incompatible_experts(forest_dir, shards_dir, corpus, tmp_path):
    from elmforest.config import ModelConfig
    from elmforest.data.bpe import train_bpe_on
    from elmforest.data.tokenizer import save_tokenizer
    from elmforest.model.build import build_model

    src = Forest.load(forest_dir)
    f = Forest.init(tmp_path / "f")
    for n in src.names:
        f.add(src.expert_dir(n), n, src.expert(n)["domains"])
    f.remove(src.names[1])
    again = Forest.load(tmp_path / "f")
    assert again.names == [src.names[0], src.names[2]]
    # experts trained side by side finish in any order: forest.json lists them as the plan does
    g = Forest.init(tmp_path / "g")
    g.update(lambda d: d.update(plan={"domains": src.names[::-1][:2]}))
    for n in src.names:
        g.add(src.expert_dir(n), n, src.expert(n)["domains"])
    assert g.names == [src.names[2], src.names[1], src.names[0]]  # one outside the plan last
    assert not (tmp_path / "f" / "experts" / src.names[1]).exists()
    assert all((tmp_path / "f" / e["path"] / "model.safetensors").is_file() for e in again.experts)

    sh = Shards(shards_dir)
    wide = build_model(ModelConfig(preset="cpu-small"), sh.vocab_size, sh.eos_id)
    wide.save_pretrained(tmp_path / "wide")
    save_tokenizer(load_tokenizer_of(shards_dir), tmp_path / "wide")
    with pytest.raises(ValueError, match="architecture"):
        again.add(tmp_path / "wide", "wide", ["x"])
    other_tok, _ = train_bpe_on(corpus, vocab_size=300)
    m = load_model(src.expert_dir(src.names[0]))
    m.save_pretrained(tmp_path / "othertok")
    save_tokenizer(other_tok, tmp_path / "othertok")
    with pytest.raises(ValueError, match="tokenizer"):
        again.add(tmp_path / "othertok", "othertok", ["x"])
    assert Forest.load(tmp_path / "f").names == again.names  # refusals changed nothing
    with pytest.raises(ValueError, match="exists"):
        again.add(src.expert_dir(src.names[0]), src.names[0], ["x"])
    for twin, said in (
        (src.names[0].upper(), f"expert {src.names[0]!r}"),
        ("Dense", "the reserved name 'dense'"),
    ):
        with pytest.raises(ValueError, match=f"differs from {said} .*only in case"):  # one folder on macOS
            again.add(src.expert_dir(src.names[0]), twin, ["x"])  # and Windows (runs/dense)
    name = src.names[0]  # a forest holding a case twin from before keeps replacing its experts
    again.data["experts"] = [*again.data["experts"], {**again.expert(name), "name": name.upper()}]
    again.add(src.expert_dir(name), name, again.expert(name)["domains"], replace=True)


def load_tokenizer_of(path):
    from elmforest.data.tokenizer import load_tokenizer

    return load_tokenizer(path)


def test_branching_from_a_mixture_uses_the_posterior(forest_dir, shards_dir, tmp_path):
    import shutil

    shutil.copytree(forest_dir, tmp_path / "f")
    forest = Forest.load(tmp_path / "f")
    shards = Shards(shards_dir)
    new_domain = shards.domains[0]
    want = branching.branch_weights(forest, shards, new_domain, prior_batches=20, device="cpu")
    pool = make_pool(forest, device="cpu")
    pi = estimate_prior(pool, shards.tokens(new_domain, "valid"), shards.eos_id, 64, 20)
    assert list(want.values()) == pytest.approx(pi.tolist())
    e = btm.train_expert(
        forest,
        shards,
        new_domain,
        name="grown",
        branch="mixture",
        progress=False,
        overrides=["train.steps=4"],
    )
    assert [(p["name"], p["weight"]) for p in e["parents"]] == [
        (n, pytest.approx(w)) for n, w in want.items()
    ]
    # exactly the weights averaged, as a re-run cut after the average reads them back (the raw
    # posterior differed from them in the last digits: two lineages for one expert)
    avg = json.loads((tmp_path / "f" / "branches" / "grown" / "elmforest_average.json").read_text())
    assert [p["weight"] for p in e["parents"]] == avg["weights"]
    init = load_file(str(tmp_path / "f" / "branches" / "grown" / "model.safetensors"))
    tensors = [load_file(str(forest.expert_dir(n) / "model.safetensors")) for n in want]
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(
        init[k], sum(w * t[k] for w, t in zip(want.values(), tensors, strict=True)), atol=1e-6
    )
    # growing the forest touched none of the existing experts
    before = {n: load_file(str(Forest.load(forest_dir).expert_dir(n) / "model.safetensors")) for n in want}
    for n in want:
        after = load_file(str(forest.expert_dir(n) / "model.safetensors"))
        assert all(torch.equal(after[t], before[n][t]) for t in after)
    assert "grown" in Forest.load(tmp_path / "f").names
    # --prior-batches: the posterior on fewer valid batches, as `forest average --prior-batches` weighs
    from elmforest.cli import main

    argv = ["forest", "expert", "--forest", str(tmp_path / "f"), "--shards", str(shards_dir)]
    argv += ["--domain", new_domain, "--name", "few", "--set", "train.steps=4", "--no-progress"]
    assert main([*argv, "--prior-batches", "1"]) == 2  # the seed branch has no posterior to weigh
    assert main([*argv, "--branch", "mixture", "--prior-batches", "1"]) == 0
    forest = Forest.load(tmp_path / "f")
    others = [n for n in forest.names if n != "few"]
    few = branching.branch_weights(forest, shards, new_domain, 1, names=others, device="cpu")
    many = branching.branch_weights(forest, shards, new_domain, 20, names=others, device="cpu")
    assert few != pytest.approx(many, rel=1e-3)  # another posterior than the 20 batches' (~one-hot here)
    assert {p["name"]: p["weight"] for p in forest.expert("few")["parents"]} == pytest.approx(few)


def test_a_mixture_branch_cut_before_training_is_averaged_again_for_another_domain(
    forest_dir, shards_dir, tmp_path
):
    """A mixture-branched expert cut after its average was written, then run again for another domain,
    started from the posterior on the first domain's text and recorded it as its parents."""
    import shutil

    shutil.copytree(forest_dir, tmp_path / "f")
    forest, shards = Forest.load(tmp_path / "f"), Shards(shards_dir)
    first, other = shards.domains[0], shards.domains[1]
    cut = branching.branch_weights(forest, shards, first, prior_batches=20, device="cpu")
    init = tmp_path / "f" / "branches" / "newx"
    average_checkpoints(  # what the cut run left
        [forest.expert_dir(n) for n in cut],
        init,
        list(cut.values()),
        metadata={"branch_for": first, "names": list(cut)},
    )
    want = branching.branch_weights(forest, shards, other, prior_batches=20, device="cpu")
    assert want != pytest.approx(cut)
    e = btm.train_expert(
        forest, shards, other, name="newx", branch="mixture", progress=False, overrides=["train.steps=2"]
    )
    assert [(p["name"], p["weight"]) for p in e["parents"]] == [
        (n, pytest.approx(w)) for n, w in want.items()
    ]
    assert json.loads((init / "elmforest_average.json").read_text())["branch_for"] == other
    # a run already begun from such an average is not silently continued for another domain
    average_checkpoints(
        [forest.expert_dir(n) for n in cut],
        tmp_path / "f" / "branches" / "newy",
        list(cut.values()),
        metadata={"branch_for": first, "names": list(cut)},
    )
    (tmp_path / "f" / "runs" / "newy" / "checkpoints" / "step-2").mkdir(parents=True)
    (tmp_path / "f" / "runs" / "newy" / "checkpoints" / "step-2" / "state.json").write_text("{}")
    with pytest.raises(UserError, match=f"its run began from an average weighed for domain '{first}'"):
        btm.train_expert(forest, shards, other, name="newy", branch="mixture", progress=False)


def test_a_mixture_branch_weighs_a_copy_once_and_warns_of_experts_trained_elsewhere(
    forest_dir, shards_dir, tmp_path, capsys
):
    """A copy of an expert added under another name took its own posterior weight (the same model
    weighed twice); an expert trained elsewhere was averaged in silently (`forest average` warns)."""
    import shutil

    from elmforest.data.tokenizer import save_tokenizer

    shutil.copytree(forest_dir, tmp_path / "f")
    forest, shards = Forest.load(tmp_path / "f"), Shards(shards_dir)
    a = forest.names[0]
    forest.add(forest.expert_dir(a), "twin", forest.expert(a)["domains"])
    assert forest.expert("twin")["copy_of"] == a
    m = load_model(forest.expert_dir(a))
    with torch.no_grad():
        next(m.parameters()).mul_(1.01)  # not a copy: a model trained elsewhere
    m.save_pretrained(tmp_path / "alien")
    save_tokenizer(load_tokenizer_of(forest.expert_dir(a)), tmp_path / "alien")
    forest.add(
        tmp_path / "alien", "alien", ["x"], parents=[{"name": "external", "weight": 1.0}]
    )  # as `forest add`
    capsys.readouterr()
    e = btm.train_expert(
        forest,
        shards,
        shards.domains[1],
        name="newx",
        branch="mixture",
        progress=False,
        overrides=["train.steps=2"],
    )
    assert sorted(p["name"] for p in e["parents"]) == sorted({*forest.names} - {"twin", "newx"})
    assert "warning: branching newx from an average of alien, trained elsewhere" in capsys.readouterr().err
    # `forest average --weights uniform` too: the copy once, and not warned of as trained elsewhere
    from elmforest.forest.commands import average

    average(forest, str(tmp_path / "avg"), "uniform")
    rec = json.loads((tmp_path / "avg" / "elmforest_average.json").read_text())
    w = dict(zip(rec["names"], rec["weights"], strict=True))
    assert w["twin"] == 0 and w[a] == pytest.approx(1 / (len(forest.names) - 1))
    err = capsys.readouterr().err
    assert f"twin (a copy of {a}) averaged once" in err and "averaging alien, trained elsewhere" in err
    assert "twin, trained" not in err and ", twin" not in err


def test_a_name_that_differs_only_in_case_is_refused_before_the_expert_trains(
    forest_dir, shards_dir, tmp_path
):
    """`--name Seed` (or an expert's name in other case) trained the whole expert, then was refused when
    it was added, leaving runs/Seed: compute no ledger counted (and on macOS the seed's own folder)."""
    import shutil

    shutil.copytree(forest_dir, tmp_path / "f")
    forest, shards = Forest.load(tmp_path / "f"), Shards(shards_dir)
    d = shards.domains[0]
    forest.data["removed"] = [{"name": "gone"}]  # an opted-out owner's name in other case as well
    # train.steps=2 is below the seed's step: any training attempt fails with another message, so a
    # refusal that came after the training (the old order) would not match
    for name, said in (
        ("Seed", "the reserved name 'seed'"),
        (d.upper(), f"expert {d!r}"),
        ("GONE", "expert 'gone' (opted out)"),
    ):
        with pytest.raises(UserError, match=re.escape(f"differs from {said}")):
            btm.train_expert(forest, shards, d, name=name, progress=False, overrides=["train.steps=2"])
        assert not (tmp_path / "f" / "runs" / name).exists()


def test_generation_with_one_expert_is_that_experts_greedy_decode(forest_dir, tmp_path):
    full = Forest.load(forest_dir)
    name = full.names[0]
    solo = Forest.init(tmp_path / "solo")
    solo.add(full.expert_dir(name), name, [name])
    g = generate(
        tmp_path / "solo", "the lord", max_new_tokens=12, temperature=0, device="cpu", precision="fp32"
    )
    from elmforest.data.tokenizer import load_tokenizer

    tok = load_tokenizer(full.expert_dir(name))
    m = load_model(full.expert_dir(name)).eval()
    prompt = [tok.eos_id] + tok.encode_batch(["the lord"])[0]
    seq = torch.tensor([prompt + g.token_ids])
    with torch.no_grad():  # no KV cache: every generated token must be the expert's argmax (up to float ties)
        lp = torch.log_softmax(m(input_ids=seq).logits[0].double(), -1)
    for i, t in enumerate(g.token_ids):
        row = lp[len(prompt) - 1 + i]
        assert row[t] >= row.max() - 1e-5, (i, t, int(row.argmax()))
        # the KV-cached step gives the same distribution as recomputing the whole sequence
        assert g.logprobs[i] == pytest.approx(float(row[t]), abs=1e-4)
    assert len(g.token_ids) == 12 or g.token_ids[-1] == tok.eos_id
    gm = generate(forest_dir, "the lord", max_new_tokens=8, temperature=1.0, seed=3, device="cpu")
    assert gm.token_ids == generate(forest_dir, "the lord", max_new_tokens=8, seed=3, device="cpu").token_ids
    assert all(sum(w.values()) == pytest.approx(1.0) for w in gm.weights)


def test_generation_reads_an_expert_as_evaluation_scores_it(forest_dir, shards_dir):
    """One pool serves both: generation's KV-cached reading, caught up in pieces, gives the log-probs
    of evaluation's window pass."""
    sh = Shards(shards_dir)
    pool = make_pool(Forest.load(forest_dir), device="cpu", precision="fp32")
    stream, T = sh.tokens(sh.domains[0], "test"), 32
    want = pool.logprobs(1, stream, sh.eos_id, T, [0])[0]
    ids = [sh.eos_id] + [int(t) for t in stream[: T - 1]]
    lp = torch.cat([pool.advance(1, ids[:5]), pool.advance(1, ids[:20]), pool.advance(1, ids)])
    got = lp.gather(1, torch.as_tensor(np.asarray(stream[:T], dtype=np.int64))[:, None])[:, 0]
    assert torch.allclose(got, want, atol=1e-4)
    passes = pool.passes
    assert torch.equal(pool.next_logprobs(1, ids), lp[-1]) and pool.passes == passes  # nothing new to read


def test_forest_cli_verbs(forest_dir, shards_dir, tmp_path, capsys):
    from elmforest.cli import main

    src = Forest.load(forest_dir)
    f = str(tmp_path / "f")
    assert main(["forest", "init", "--forest", f]) == 0
    for n in src.names:
        run_dir = forest_dir / "runs" / n  # an elmforest run dir: tokens and FLOPs come from its summary
        assert main(["forest", "add", "--forest", f, "--expert", str(run_dir), "--domain", n]) == 0
    assert main(["forest", "list", "--forest", f]) == 0
    listing = capsys.readouterr().out
    assert all(n in listing for n in src.names)
    assert Forest.load(f).expert(src.names[0])["tokens"] == src.expert(src.names[0])["tokens"]
    out_json = tmp_path / "ev.json"
    assert (
        main(
            [
                "eval",
                "--forest",
                f,
                "--data",
                str(shards_dir),
                "--mode",
                "topk",
                "--k",
                "2",
                "--prior-batches",
                "1",
                "--seq-len",
                "32",
                "--json",
                str(out_json),
                "--no-progress",
            ]
        )
        == 0
    )
    res = json.loads(out_json.read_text())
    assert res["mode"] == "topk" and res["compute"]["fraction_of_full"] == pytest.approx(2 / 3)
    assert set(res["posterior"]) == set(res["domains"])
    assert (
        main(
            [
                "forest",
                "average",
                "--forest",
                f,
                "--out",
                str(tmp_path / "avg"),
                "--weights",
                f"{src.names[0]}=3,{src.names[1]}=1",
            ]
        )
        == 0
    )
    avg = load_file(str(tmp_path / "avg" / "model.safetensors"))
    a = load_file(str(src.expert_dir(src.names[0]) / "model.safetensors"))
    b = load_file(str(src.expert_dir(src.names[1]) / "model.safetensors"))
    k = "model.norm.weight"
    assert torch.allclose(avg[k], 0.75 * a[k] + 0.25 * b[k], atol=1e-7)
    capsys.readouterr()
    assert (
        main(["generate", "--forest", f, "--prompt", "the", "--max-new-tokens", "5", "--temperature", "0"])
        == 0
    )
    assert capsys.readouterr().out.startswith("the")
    assert main(["forest", "remove", "--forest", f, "--expert", src.names[0]]) == 0
    assert Forest.load(f).names == src.names[1:]
    assert main(["forest", "remove", "--forest", f, "--expert", "nobody"]) == 2
    assert main(["eval", "--forest", f, "--model", str(forest_dir), "--data", str(shards_dir)]) == 2


def test_forest_cli_show_and_fsck(forest_dir, tmp_path, capsys):
    """`forest show` prints the manifest; `forest fsck` finds a clean forest clean, repairs what is safe
    (a dead process's temporary, an interrupted removal) and reports what is not (altered weights)."""
    import shutil
    import subprocess

    from elmforest.cli import main
    from elmforest.utils.io import HOST

    root = tmp_path / "f"
    shutil.copytree(forest_dir, root)
    f = str(root)
    names = Forest.load(root).names
    assert main(["forest", "show", "--forest", f]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((root / "forest.json").read_text())
    assert main(["forest", "list", "--forest", f]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 2 + len(names)  # header, seed, one line per expert
    for n in names:
        assert any(line.split()[0] == n and f"domains={n}" in line for line in listing[2:]), n

    assert main(["forest", "fsck", "--forest", f]) == 0
    assert "0 repair(s), 0 problem(s) left" in capsys.readouterr().out

    # a checkpoint temporary of a process that died (kept: one of a live process), and a removal killed
    # half-way
    dead = subprocess.Popen(["true"])
    dead.wait()
    ckpts = root / "runs" / names[0] / "checkpoints"
    ckpts.mkdir(exist_ok=True)
    stale = ckpts / f".step-00000099.tmp~{HOST}~{dead.pid}"
    live = ckpts / f".step-00000099.tmp~{HOST}~{os.getpid()}"
    for p in (stale, live):
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"partial")
    victim = names[1]

    def tombstone(d):
        d["experts"] = [e for e in d["experts"] if e["name"] != victim]
        d["removed"] = [*d.get("removed", []), {"name": victim, "removed": "now", "state": "pending"}]

    Forest.load(root).update(tombstone)  # the manifest write of `forest remove`, then a kill
    assert (root / "experts" / victim).is_dir() and (root / "runs" / victim).is_dir()
    assert main(["forest", "fsck", "--forest", f]) == 0
    out = capsys.readouterr().out
    assert f"finished removing expert {victim}" in out and str(stale) in out
    assert not stale.exists() and live.exists()
    assert not (root / "experts" / victim).exists() and not (root / "runs" / victim).exists()
    assert Forest.load(root).data["removed"][-1]["state"] == "done"
    assert main(["forest", "fsck", "--forest", f]) == 0  # nothing left to repair
    assert "0 repair(s), 0 problem(s) left" in capsys.readouterr().out
    shutil.rmtree(live)

    # a weights file altered in place, same size: --quick (sizes) misses it, the checksum check does not
    weights = root / "experts" / names[0] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    assert main(["forest", "fsck", "--forest", f, "--quick"]) == 0
    capsys.readouterr()
    assert main(["forest", "fsck", "--forest", f]) == 1
    out = capsys.readouterr().out
    assert f"expert {names[0]}" in out and "checksum mismatch" in out and "1 problem(s) left" in out


def test_forest_eval_on_raw_data_equals_eval_on_its_shards(forest_dir, shards_dir, corpus, tmp_path):
    """`eval --forest F --data <raw corpus>` re-tokenizes the documents with the experts' tokenizer and
    splits them with the experts' fractions: the same test documents, priors and bits per byte."""
    from elmforest.cli import main

    res = {}
    for what, data in (("shards", shards_dir), ("raw", corpus)):
        out = tmp_path / f"{what}.json"
        argv = ["eval", "--forest", str(forest_dir), "--data", str(data), "--json", str(out)]
        argv += ["--prior-batches", "2", "--device", "cpu", "--precision", "fp32", "--no-progress"]
        assert main(argv) == 0
        res[what] = json.loads(out.read_text())
    a, b = res["shards"], res["raw"]
    assert a["split"] == b["split"] == "test"
    assert b["split_spec"] == Shards(shards_dir).index["split"]
    assert a["domains"] and set(a["domains"]) == set(b["domains"])
    for d, want in a["domains"].items():
        got = b["domains"][d]
        for key in ("documents", "tokens", "bytes"):
            assert got[key] == want[key], (d, key)
        assert got["prior"] == pytest.approx(want["prior"], rel=1e-6), d  # from the same valid documents
        assert got["nll_nats"] == pytest.approx(want["nll_nats"], rel=1e-6), d
        assert got["bpb"] == pytest.approx(want["bpb"], rel=1e-6), d
    assert b["mean_bpb"] == pytest.approx(a["mean_bpb"], rel=1e-6)


_ADDER = """
import sys, time
from pathlib import Path
from elmforest.forest.manifest import Forest

root, prefix, ready, go, *srcs = sys.argv[1:]
f = Forest.load(root)  # loaded before the other process adds anything
Path(ready).touch()
deadline = time.time() + 120
while not Path(go).exists():
    if time.time() > deadline:
        sys.exit(3)
    time.sleep(0.001)
for i, src in enumerate(srcs):
    f.add(src, f"{prefix}{i}", [f"{prefix}{i}"])
"""


def test_concurrent_adds_keep_both_and_opt_out_is_durable(forest_dir, shards_dir, tmp_path):
    import subprocess
    import sys
    import time

    src = Forest.load(forest_dir)
    root = tmp_path / "f"
    Forest.init(root)
    srcs = [str(src.expert_dir(n)) for n in src.names]
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _ADDER,
                str(root),
                prefix,
                str(tmp_path / f"ready-{prefix}"),
                str(go),
                *srcs,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for prefix in ("a", "b")
    ]
    try:  # two processes, each with the forest loaded, then adding at the same moment
        deadline = time.time() + 120
        while not all((tmp_path / f"ready-{x}").exists() for x in "ab") and time.time() < deadline:
            dead = [p for p in procs if p.poll() is not None]
            assert not dead, [p.stderr.read() for p in dead]
            time.sleep(0.01)
        assert all((tmp_path / f"ready-{x}").exists() for x in "ab"), "the adders never got ready"
        go.touch()
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs
    f = Forest.load(root)
    want = [f"{p}{i}" for p in "ab" for i in range(len(srcs))]
    assert sorted(f.names) == want  # every entry of both processes landed, none overwritten
    assert all(f.intact(n, deep=True) is None for n in want)
    assert sorted(p.name for p in (root / "experts").iterdir() if not p.name.startswith(".")) == want
    from elmforest.launch.jobs import DENSE_TUNED_RUN

    for reserved in ("dense", DENSE_TUNED_RUN):  # runs/dense-tuned is the dense run's second half
        with pytest.raises(ValueError, match="reserved"):
            f.add(src.expert_dir(src.names[1]), reserved, ["y"])

    import shutil

    shutil.copytree(forest_dir, tmp_path / "g")
    g = Forest.load(tmp_path / "g")
    victim = g.names[0]
    g.remove(victim)
    assert not (tmp_path / "g" / "runs" / victim).exists()  # what was learned from the data is gone too
    with pytest.raises(ValueError, match="opted out"):
        btm.train_expert(g, Shards(shards_dir), victim, progress=False)
    with pytest.raises(ValueError, match="opted out"):  # a job that was already running cannot re-add it
        g.add(src.expert_dir(victim), victim, [victim])
    assert victim not in Forest.load(tmp_path / "g").names


def test_a_tiny_temperature_samples_the_argmax_and_top_p_keeps_the_nucleus():
    from elmforest.forest.generate import sample_token

    mix = torch.log_softmax(torch.tensor([0.1, 2.0, 1.9, -3.0], dtype=torch.float64), 0)
    gen = torch.Generator().manual_seed(0)
    assert all(sample_token(mix, t, 1.0, gen) == 1 for t in (0.0, 1e-320, 1e-6))  # never NaN
    # token 1 holds 0.485 of the mass: top_p 0.4 keeps it alone, 0.5 adds token 2 (0.439), never 0 or 3
    assert {sample_token(mix, 1.0, 0.4, gen) for _ in range(50)} == {1}
    assert {sample_token(mix, 1.0, 0.5, gen) for _ in range(200)} == {1, 2}
    assert len({sample_token(mix, 1.0, 1.0, gen) for _ in range(200)}) >= 2


def test_pool_adopts_the_cached_logprobs_of_shared_experts(forest_dir, shards_dir):
    """A pool over other experts reuses what another pool already computed for the experts both hold
    (same numbers as computing them afresh); an expert only it holds still runs."""
    import torch

    from elmforest.data.shards import Shards
    from elmforest.forest.evaluate import make_pool
    from elmforest.forest.manifest import Forest

    f, sh = Forest.load(forest_dir), Shards(shards_dir)
    a, b, c = f.names[:3]
    stream = sh.tokens(sh.domains[0], "valid")
    first = make_pool(f, [a, b], precision="fp32")
    want = first.logprobs(1, stream, sh.eos_id, 32, range(2), key="k")
    second = make_pool(f, [b, c], precision="fp32")
    second.adopt(first)
    second.passes = 0
    got = second.logprobs(0, stream, sh.eos_id, 32, range(2), key="k")
    assert torch.equal(got, want) and second.passes == first.passes  # from the cache, counted as compute
    fresh = make_pool(f, [b], precision="fp32").logprobs(0, stream, sh.eos_id, 32, range(2), key="k")
    assert torch.allclose(got, fresh)
    other = second.logprobs(1, stream, sh.eos_id, 32, range(2), key="k")  # c: computed, not borrowed
    assert not torch.equal(other, want)


def test_pool_cache_keeps_the_most_recently_used_within_its_bytes(forest_dir, shards_dir):
    f, sh = Forest.load(forest_dir), Shards(shards_dir)
    stream = sh.tokens(sh.domains[0], "valid")
    pool = make_pool(f, f.names[:2], precision="fp32")
    one = 2 * 32 * 4  # two windows of 32 float32 log-probs
    pool.cache_bytes = 2 * one
    a = pool.logprobs(0, stream, sh.eos_id, 32, range(2), key="k")
    pool.logprobs(1, stream, sh.eos_id, 32, range(2), key="k")
    pool.logprobs(0, stream, sh.eos_id, 32, range(2), key="k")  # a hit: expert 0 is the most recent now
    pool.logprobs(0, stream, sh.eos_id, 32, range(2, 4), key="k")  # evicts expert 1, the least recent
    assert [ck[0] for ck in pool._cache] == [0, 0] and pool._cached == 2 * one
    before = pool.passes
    again = pool.logprobs(0, stream, sh.eos_id, 32, range(2), key="k")
    assert again is a and pool.passes == before + int(
        (window_batch(stream, sh.eos_id, 32, [0, 1])[1] != -100).sum()
    )
    pool.clear_cache()
    assert not pool._cache and pool._cached == 0
    other = make_pool(f, f.names[:2], precision="fp32")
    other.logprobs(0, stream, sh.eos_id, 32, range(2), key="k")
    pool.adopt(other)
    pool.adopt(other)  # a key adopted twice is counted once
    assert len(pool._cache) == 1 and pool._cached == one
    pool.cache_bytes = one - 1  # an entry larger than the budget is not kept, nor empties the rest
    pool.logprobs(1, stream, sh.eos_id, 32, range(2), key="k")
    assert len(pool._cache) == 1 and pool._cached == one


def test_forest_evaluation_keeps_one_domains_logprobs_not_the_whole_splits(
    forest_dir, shards_dir, monkeypatch
):
    import elmforest.forest.evaluate as ev

    made, held = [], []
    real_nll = ev._mixture_nll

    def spy_nll(pool, *a, **kw):
        held.append(len(pool._cache))  # entries alive when a domain starts: the prior's only
        return real_nll(pool, *a, **kw)

    monkeypatch.setattr(ev, "make_pool", lambda *a, **kw: made.append(make_pool(*a, **kw)) or made[-1])
    monkeypatch.setattr(ev, "_mixture_nll", spy_nll)
    res = _eval(forest_dir, shards_dir, mode="ensemble", prior_batches=1)
    n = len(Forest.load(forest_dir).names)
    assert len(res["domains"]) >= 2 and held == [n] * len(res["domains"]) and not made[0]._cache


class _TablePool:
    """An expert pool whose log-probs are a fixed table [N, windows, T], counting the real tokens each
    request runs (as ExpertPool counts them)."""

    def __init__(self, lp: torch.Tensor, n_tok: int):
        self.lp, self.n_tok, self.dirs, self.passes = lp, n_tok, list(range(lp.shape[0])), 0

    def logprobs(self, j, stream, eos, seq_len, window_ids, upto=None, key=None):
        ids, u = list(window_ids), upto or seq_len
        out = torch.zeros(len(ids), seq_len, dtype=self.lp.dtype)
        out[:, :u] = self.lp[j, ids, :u]
        self.passes += sum(max(0, min(u, self.n_tok - b * seq_len)) for b in ids)
        return out

    def all_logprobs(self, experts, stream, eos, seq_len, window_ids, key=None):
        return torch.stack([self.logprobs(j, stream, eos, seq_len, window_ids) for j in experts])


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("weighting", ["posterior", "fixed", "demix"])
def test_prefix_top_k_chooses_for_each_document_on_its_own_first_tokens(weighting, k):
    """--select prefix:W under --reset document, against a position-by-position reference: each
    document in a window is chosen for on its own first W tokens (the choice was once per window, so
    the end of one document picked the experts of the next), scored by the full ensemble there and by
    its chosen k (prior restricted and renormalised, evidence from the document's start) after. An
    expert reads a window again only past what every expert read for the heads, and not at all where
    every expert reading on to the end costs no more. --reset window: the window is one piece, as before."""
    from elmforest.forest.mixture import _mixture_nll
    from elmforest.forest.pool import doc_starts

    g = torch.Generator().manual_seed(3)
    n, T, w, eos = 4, 16, 3, 0
    docs = [[5, 6, 7], [8, 9, 9, 9, 9, 9], [7] * 7, [], [6] * 5, [4] * 14]  # [] : two EOS in a row
    stream = np.array([t for d in docs for t in [*d, eos]][:-1])
    nw = math.ceil(len(stream) / T)
    lp = -torch.rand(n, nw, T, generator=g, dtype=torch.float64) * 4
    lp.view(n, -1)[:, len(stream) :] = 0.0  # padding
    pi = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    starts = doc_starts(stream, eos, T, nw)

    def reference(reset: bool):
        want, passes, weights = 0.0, 0, torch.zeros(n, dtype=torch.float64)
        for b in range(nw):
            real = min(T, len(stream) - b * T)
            opens = [t for t in range(real) if t == 0 or reset and starts[b, t]]
            head_end, tail_end = 0, [0] * n
            for a, e in zip(opens, [*opens[1:], real], strict=True):
                h = min(a + w, e)
                chosen = list(range(n))
                if h < e:
                    score = [math.log(pi[j]) + float(lp[j, b, a:h].sum()) for j in range(n)]
                    chosen = sorted(range(n), key=lambda j: -score[j])[:k]
                for t in range(a, e):
                    use = range(n) if t < h else chosen
                    lw = {}
                    for j in use:
                        lw[j] = math.log(pi[j])
                        if weighting == "posterior":
                            lw[j] += float(lp[j, b, a:t].sum())
                        elif weighting == "demix" and t > a:
                            lw[j] += float(lp[j, b, t - 1])
                    z = torch.logsumexp(torch.tensor(list(lw.values()), dtype=torch.float64), 0)
                    want -= float(torch.logsumexp(torch.stack([lw[j] - z + lp[j, b, t] for j in use]), 0))
                    for j in use:
                        weights[j] += math.exp(lw[j] - z)
                head_end = max(head_end, h)
                for j in chosen if h < e else []:
                    tail_end[j] = max(tail_end[j], e)
            round_up = lambda u, keep: u if u in (keep, T) else min(T, 1 << (u - 1).bit_length())  # noqa: E731
            read = round_up(head_end, w)  # every expert read this far; a chosen one reads again only past it
            if head_end < real and k * round_up(real, T) >= n * (round_up(real, T) - read):
                read = round_up(real, w)  # the last piece's second read would cost as much: all read on
            passes += n * min(real, read) + sum(min(real, round_up(u, T)) for u in tail_end if u > read)
        return want, weights / len(stream), passes

    for reset, where in ((True, starts), (False, None)):
        pool = _TablePool(lp, len(stream))
        nll, mean_w, _ = _mixture_nll(
            pool, stream, eos, T, nw, pi, "topk", k, weighting, f"prefix:{w}", None, where
        )
        want, weights, passes = reference(reset)
        assert nll == pytest.approx(want, rel=1e-12), reset
        assert mean_w.tolist() == pytest.approx(weights.tolist(), rel=1e-12)
        assert pool.passes == passes <= n * len(stream)  # never more than the full ensemble
    if k < 3:  # one piece per window: N·w + k·T each (k = 3 of 4: the last, short window read once by all)
        assert pool.passes == n * w * nw + k * len(stream)
    # k >= N: the full ensemble, read once
    pool = _TablePool(lp, len(stream))
    full, _, _ = _mixture_nll(pool, stream, eos, T, nw, pi, "topk", n, weighting, f"prefix:{w}", None, starts)
    lw = log_weights(lp, pi, weighting, starts)
    assert full == pytest.approx(-float(ensemble_logprob(lp, lw).sum()), rel=1e-12)
    assert pool.passes == len(stream) * n


def test_branch_weights_name_a_domain_the_shards_lack(forest_dir, shards_dir):
    """`forest average --weights posterior --domain nosuch` said "domain 'nosuch' has no valid split",
    as if it existed."""
    with pytest.raises(UserError, match="no domain 'nosuch'; it has "):
        branching.branch_weights(Forest.load(forest_dir), Shards(shards_dir), "nosuch", device="cpu")


def test_averaging_one_expert_says_so_and_estimates_no_posterior(
    forest_dir, shards_dir, tmp_path, capsys, monkeypatch
):
    import shutil

    from elmforest.forest import branching
    from elmforest.forest.commands import average, remove

    shutil.copytree(forest_dir, tmp_path / "f")
    forest = Forest.load(tmp_path / "f")
    for n in forest.names[1:]:
        remove(forest, n)
    forest = Forest.load(tmp_path / "f")
    [only] = forest.names

    def boom(*a, **k):
        raise AssertionError("a posterior estimated over one expert")

    monkeypatch.setattr(branching, "branch_weights", boom)
    average(forest, str(tmp_path / "avg"), "posterior", str(shards_dir), Shards(shards_dir).domains[0])
    assert f"note: one expert ({only}): the average is its weights" in capsys.readouterr().err
    got = load_file(str(tmp_path / "avg" / "model.safetensors"))
    want = load_file(str(forest.expert_dir(only) / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in got)
