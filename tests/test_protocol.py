"""The fair comparison: one domain list for every phase, LR sweeps on valid data, priors from valid data
(or uniform when there is none), the posterior restarted at each document."""

import json
import math
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import tiny_config

from elmforest.cli import main
from elmforest.data.shards import Shards
from elmforest.eval.bpb import evaluate_shards, window_batch
from elmforest.forest import btm
from elmforest.forest.evaluate import evaluate_forest_shards
from elmforest.forest.evaluate_text import evaluate_forest
from elmforest.forest.manifest import Forest
from elmforest.launch.forest import train_forest
from elmforest.launch.sweep import format_sweep, lr_grid, sweep
from elmforest.model.build import load_model
from elmforest.utils.errors import UserError
from elmforest.utils.io import read_json

KW = {"seq_len": 32, "batch_size": 4, "device": "cpu", "precision": "fp32"}


def test_data_domains_drive_every_phase(shards_dir, tmp_path):
    """`forest train --set data.domains=[...]` trained the seed and dense run on those domains but an
    expert for every domain of the shards, at a batch share that no longer matched the budget."""
    f = tmp_path / "f"
    argv = ["forest", "train", "--forest", str(f), "--shards", str(shards_dir), "--preset", "tiny"]
    argv += ["--set", "train.steps=8", "--set", "train.batch_size=4", "--set", "train.precision=fp32"]
    argv += ["--set", 'data.domains=["legal","code"]', "--no-progress"]
    assert main(argv) == 0
    forest = Forest.load(f)
    assert sorted(forest.names) == ["code", "legal"]
    plan = btm.Plan(**forest.data["plan"])
    assert plan.n_experts == 2 and sorted(plan.domains) == ["code", "legal"] and plan.expert_batch_size == 2
    dense = read_json(f / "runs" / "dense" / "run_config.json")
    assert sorted(dense["data"]["domains"]) == ["code", "legal"]
    assert sorted(read_json(f / "runs" / "dense" / "summary.json")["domains"]) == ["code", "legal"]
    assert forest.total_flops() == read_json(f / "runs" / "dense" / "summary.json")["flops"]
    # a plan whose experts disagree with the mixture, or a re-run with another plan, is refused
    base = tiny_config(shards_dir, steps=8)
    base.data.domains = ["legal"]
    with pytest.raises(ValueError, match="one domain list must drive every phase"):
        btm.plan_for(base, ["legal", "code"])
    with pytest.raises(ValueError, match="planned differently"):
        plan3, base3 = btm.plan_for(
            tiny_config(shards_dir, steps=8, batch_size=6), Shards(shards_dir).domains
        )
        train_forest(forest, Shards(shards_dir), base3, plan3, progress=False)
    with pytest.raises(ValueError, match="experts are"):
        btm.plan_domains(plan, Shards(shards_dir), ["legal", "code", "scripture"])


def test_a_plan_in_another_order_is_the_same_plan_and_the_order_given_is_the_mixtures(shards_dir):
    """The plan sorts its domains (a set); the seed's sampler draws domains by list position, so the run
    config keeps the order given (its run identity), as runs already trained in that order have it."""
    a_plan, a = btm.plan_for(tiny_config(shards_dir, steps=8), ["legal", "code"])
    b_plan, b = btm.plan_for(tiny_config(shards_dir, steps=8), ["code", "legal"])
    assert a_plan == b_plan and a.data.domains == ["legal", "code"] and b.data.domains == ["code", "legal"]


def test_the_plan_rounds_the_batch_to_its_experts_and_leaves_them_a_step(shards_dir):
    """The dense batch is the preset's rounded to a multiple of the experts (6 over 4 -> 2 each, 8; cut, it
    was 4: another compute-matched budget), and the seed never takes every step (no expert would train)."""
    cfg = tiny_config(shards_dir, steps=8)
    cfg.train.batch_size = 6
    plan, dense = btm.plan_for(cfg, ["code", "legal", "scripture", "news"])
    assert plan.batch_size == dense.train.batch_size == 8 and plan.expert_batch_size == 2
    assert btm.Plan(2, 4, 2, seed_share=0.75).seed_steps == 1
    assert btm.Plan(3, 4, 2, seed_share=0.9).seed_steps == 2


def test_plan_counts_must_match_the_domains(shards_dir):
    plan = btm.Plan(8, 6, 2)  # two experts planned, three domains would train
    with pytest.raises(ValueError, match="between 2 experts"):
        btm.plan_domains(plan, Shards(shards_dir))
    with pytest.raises(ValueError, match="one expert per domain"):
        btm.Plan(8, 6, 2, domains=["a", "b", "c"])
    with pytest.raises(ValueError, match="at least 2 steps"):  # the seed's pause would be the end
        btm.Plan(1, 6, 2)
    with pytest.raises(ValueError, match="at least one expert"):  # not a ZeroDivisionError
        btm.Plan(8, 6, 0)


def test_lr_sweep_tunes_each_arm_on_valid_and_resumes(shards_dir, tmp_path, capsys):
    assert lr_grid(1e-3, 5, 2.0) == [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3]
    base = tiny_config(shards_dir, steps=8, batch_size=6)
    with pytest.raises(ValueError, match="at least 4"):
        sweep(shards_dir, tmp_path / "s0", base, lrs=[1e-3, 2e-3, 4e-3])
    with pytest.raises(ValueError, match="the dense grid repeats 0.001: give each LR once"):
        sweep(shards_dir, tmp_path / "s0", base, lrs=[1e-3, 2e-3, 4e-3, 1e-3, 8e-3])
    lrs, elrs = [1e-4, 1e-3, 1e-2, 3e-2], [1e-4, 1e-3, 1e-2, 1e-1]
    res = sweep(shards_dir, tmp_path / "s", base, lrs=lrs, expert_lrs=elrs, log=None)
    sh = Shards(shards_dir)
    d = res["dense"]
    assert [p["lr"] for p in d["points"]] == lrs
    assert d["best_lr"] == min(d["points"], key=lambda p: p["valid_mean_bpb"])["lr"]
    # scored on the valid split, never test
    best = tmp_path / "s" / "dense" / f"lr-{d['best_lr']:.3g}"
    want = evaluate_shards(
        load_model(best / "runs" / "dense" / "model"), sh, "valid", sh.domains, 64, progress=False
    )
    assert d["best_valid_mean_bpb"] == pytest.approx(want["mean_bpb"])
    assert read_json(best / "runs" / "dense" / "run_config.json")["optim"]["lr"] == d["best_lr"]
    # the expert arm branches from the best dense run's seed, each point at its own LR
    e = res["experts"]
    assert e["seed_lr"] == d["best_lr"] and [p["lr"] for p in e["points"]] == elrs
    for p in e["points"]:
        f = Forest.load(tmp_path / "s" / "experts" / f"lr-{p['lr']:.3g}")
        assert f.data["seed"]["source"].startswith("shared with") and str(best) in f.data["seed"]["source"]
        cfg = read_json(f.root / "runs" / sh.domains[0] / "run_config.json")
        assert cfg["optim"]["lr"] == p["lr"] and cfg["train"]["batch_size"] == 2
        own = evaluate_shards(
            load_model(f.expert_dir(sh.domains[0])), sh, "valid", [sh.domains[0]], 64, progress=False
        )
        assert p["domains"][sh.domains[0]] == pytest.approx(own["mean_bpb"])
    # the dense run's second half, continued from the best dense run's seed at each expert LR: the
    # same steps, batch and data from the same trainer state, only the peak LR differs
    c = res["dense_continue"]
    assert c["seed_lr"] == d["best_lr"] and [p["lr"] for p in c["points"]] == sorted({*elrs, d["best_lr"]})
    dense_flops = read_json(best / "runs" / "dense" / "summary.json")["flops"]
    seed_flops = Forest.load(best).data["seed"]["flops"]
    for p in c["points"]:
        if p["lr"] == d["best_lr"]:  # that run itself (always a point), not trained again
            assert p["valid_mean_bpb"] == d["best_valid_mean_bpb"]
            assert not (
                tmp_path / "s" / "dense-continue" / f"from-lr-{p['lr']:.3g}" / f"lr-{p['lr']:.3g}"
            ).exists()
            continue
        run = tmp_path / "s" / "dense-continue" / f"lr-{d['best_lr']:.3g}".replace("lr-", "from-lr-")
        run = run / f"lr-{p['lr']:.3g}" / "runs" / "dense"
        cfg = read_json(run / "run_config.json")
        assert cfg["optim"]["lr"] == p["lr"] and cfg["train"]["batch_size"] == 6
        assert cfg["train"]["init_checkpoint"] == str((best / "seed_state").resolve())
        assert read_json(run / "summary.json")["flops"] == pytest.approx(dense_flops - seed_flops, rel=1e-9)
        if p.get("diverged"):
            continue
        own = evaluate_shards(load_model(run / "model"), sh, "valid", sh.domains, 64, progress=False)
        assert p["valid_mean_bpb"] == pytest.approx(own["mean_bpb"])
    assert (
        c["best_lr"]
        == min(
            (p for p in c["points"] if p["valid_mean_bpb"] is not None), key=lambda p: p["valid_mean_bpb"]
        )["lr"]
    )
    # at the dense run's own LR a continuation is that run: the same weights, bit for bit
    from elmforest.launch.jobs import DenseContinueJob, run_dense_continue

    job = DenseContinueJob(
        str(tmp_path / "same"),
        str(best / "runs" / "dense" / "run_config.json"),
        str(best / "seed_state"),
        d["best_lr"],
    )
    run_dense_continue(job)
    from safetensors.torch import load_file

    a = load_file(best / "runs" / "dense" / "model" / "model.safetensors")
    b = load_file(job.run_dir() / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = format_sweep(res)
    assert "best dense LR" in text and "best experts LR" in text and "best dense continuation LR" in text
    if e["at_edge"] or d["at_edge"] or c["at_edge"]:
        assert "WARNING" in text
    # a second call trains nothing, starts no worker (each point only checks it is kept) and finds
    # the same answer

    class Refuses:
        def map(self, *args):
            raise AssertionError("workers were started")

    stamp = (best / "runs" / "dense" / "model" / "model.safetensors").stat().st_mtime_ns
    again = sweep(shards_dir, tmp_path / "s", base, lrs=lrs, expert_lrs=elrs, log=None, executor=Refuses())
    assert again["dense"]["best_lr"] == d["best_lr"] and again["experts"]["best_lr"] == e["best_lr"]
    assert again["dense_continue"]["points"] == c["points"]
    assert (best / "runs" / "dense" / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    # other training settings are refused once, up front, for the whole sweep (not once per LR point)
    other = tiny_config(shards_dir, steps=8, batch_size=6)
    other.optim.weight_decay = 0.05
    with pytest.raises(
        ValueError, match=r"this sweep's runs were trained with other settings \(optim.weight_decay"
    ):
        sweep(shards_dir, tmp_path / "s", other, lrs=lrs, expert_lrs=elrs, log=None)
    # so they are for an arm run alone: it branches from (and reports) runs trained with the old ones
    for arm in ("experts", "continue"):
        with pytest.raises(ValueError, match=r"trained with other settings \(optim.weight_decay"):
            sweep(shards_dir, tmp_path / "s", other, arm=arm, expert_lrs=elrs, log=None, executor=Refuses())
    # and for the dense arm on a grid sharing no LR with the runs there (it checked its grid's alone)
    with pytest.raises(ValueError, match=r"trained with other settings \(optim.weight_decay"):
        sweep(
            shards_dir,
            tmp_path / "s",
            other,
            arm="dense",
            lrs=[x * 5 for x in lrs],
            log=None,
            executor=Refuses(),
        )


def test_arms_branched_from_another_dense_run_than_the_best_are_dropped_and_refused(tmp_path):
    """A dense arm rerun on a wider grid moves its best LR: the expert and continuation arms tuned on the
    old best's seed no longer belong beside it (a study taking sweep.json's LRs would pair them)."""
    from elmforest.launch.sweep_checks import drop_stale_arms
    from elmforest.study.config import sweep_continue_lr, sweep_lrs

    said = []
    old = {"seed_lr": 0.008, "best_lr": 0.004}
    r = {"dense": {"best_lr": 0.032}, "experts": dict(old), "dense_continue": dict(old), "grouped": dict(old)}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(r))
    with pytest.raises(UserError, match=r"experts arm branched from the dense run at LR 0.008, not from"):
        sweep_lrs(path)
    r["experts"]["seed_lr"] = 0.032
    path.write_text(json.dumps(r))
    assert sweep_lrs(path) == (0.032, 0.004)
    with pytest.raises(UserError, match=r"dense_continue arm branched from the dense run at LR 0.008"):
        sweep_continue_lr(path)
    drop_stale_arms(r, said.append)
    assert set(r) == {"dense", "experts"} and len(said) == 2 and "no longer the best" in said[0]


def test_edge_of_the_grid_is_reported():
    from elmforest.launch.sweep import choose as _choose

    pts = [{"lr": x, "valid_mean_bpb": 1.0 / x} for x in (1e-3, 2e-3, 4e-3, 8e-3)]
    assert _choose(pts)["at_edge"] == "highest"
    pts[1]["valid_mean_bpb"] = 0.0
    assert _choose(pts)["at_edge"] is None


def test_ensemble_restarts_the_posterior_at_each_document(forest_dir, shards_dir):
    """Brute force: each document's mixture starts from the prior, whatever its window held before."""
    forest, sh = Forest.load(forest_dir), Shards(shards_dir)
    d = sh.domains[0]
    run = {**KW, "domains": [d], "max_bytes": 3000}
    res = evaluate_forest_shards(forest, sh, mode="ensemble", prior="uniform", **run)
    carried = evaluate_forest_shards(forest, sh, mode="ensemble", prior="uniform", reset="window", **run)
    n_tok = res["domains"][d]["tokens"]
    stream = sh.tokens(d, "test")[:n_tok]
    models = [load_model(x).eval() for x in forest.expert_dirs()]
    nll = {"document": 0.0, "window": 0.0}
    for w in range(math.ceil(n_tok / 32)):
        x, y = window_batch(stream, sh.eos_id, 32, [w])
        with torch.no_grad():
            lps = torch.stack([torch.log_softmax(m(input_ids=x).logits[0].double(), -1) for m in models])
        for mode in nll:
            evidence = torch.zeros(len(models), dtype=torch.float64)
            for t in range(32):
                if y[0, t] < 0:
                    continue
                if mode == "document" and int(x[0, t]) == sh.eos_id:
                    evidence.zero_()  # a document starts: back to the (uniform) prior
                lp_t = lps[:, t, y[0, t]]
                w_t = torch.softmax(evidence, 0)
                nll[mode] -= float(torch.logsumexp(w_t.log() + lp_t, 0))
                evidence += lp_t
    assert res["domains"][d]["nll_nats"] == pytest.approx(nll["document"], rel=1e-6)
    assert carried["domains"][d]["nll_nats"] == pytest.approx(nll["window"], rel=1e-6)
    assert res["reset"] == "document" and carried["reset"] == "window"


def test_cached_prior_comes_from_valid_and_falls_back_to_uniform(forest_dir, shards_dir, tmp_path):
    forest, sh = Forest.load(forest_dir), Shards(shards_dir)
    with pytest.raises(ValueError, match="other documents than"):
        evaluate_forest_shards(forest, sh, prior_split="test", **KW)
    res = evaluate_forest_shards(forest, sh, prior_batches=50, **KW)
    for d, v in res["domains"].items():
        n_valid = math.ceil(sh.info(d, "valid")["tokens"] / 32)
        assert v["prior_source"] == f"{d}/valid: {min(n_valid, 50 * 8)} windows"  # every window when fewer
        assert v["prior_max"]["weight"] == max(v["prior"].values())
    # raw user data with a domain that has no valid documents: uniform prior, and the result says so
    data = tmp_path / "ood.jsonl"
    rows = [{"id": f"x{i}", "domain": "odd", "text": "license warranty " * 30} for i in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = evaluate_forest(
        forest_dir, data, split="all", prior="uniform", **{k: v for k, v in KW.items() if k != "seq_len"}
    )
    assert r["split"] == "all" and r["domains"]["odd"]["documents"] == 3
    with pytest.raises(ValueError, match="no held-out data"):
        evaluate_forest(forest_dir, data, split="all")
    # split test by default, like single-model evaluation; the domain has no valid split -> uniform
    from elmforest.data.splits import SplitSpec

    spec = SplitSpec()
    test_ids = [f"t{i}" for i in range(400) if spec.assign(f"t{i}") == "test"][:4]
    data.write_text(
        "".join(
            json.dumps({"id": i, "domain": "odd", "text": "license warranty " * 30}) + "\n" for i in test_ids
        )
    )
    r = evaluate_forest(forest_dir, data, device="cpu", precision="fp32")
    assert r["split"] == "test" and r["domains"]["odd"]["prior_source"] == "uniform: odd has no valid split"
    assert r["split_spec"] == Shards(shards_dir).index["split"]  # the experts' own training fractions
    assert np.allclose(list(r["domains"]["odd"]["prior"].values()), 1 / len(forest.names))


def test_findings_call_a_gap_within_one_percent_a_tie():
    from elmforest.compare import findings

    def res(**bpb):
        return {k: {"mean_bpb": v} for k, v in bpb.items()}

    out = findings(
        res(dense=2.0, ensemble=1.9, ensemble_uniform=2.01, average=1.9, average_uniform=2.3),
        res(dense=4.0, ensemble=4.2, ensemble_fixed=3.99),
        {},
    )
    caveat = [f for f in out if f.startswith("caveat:")]  # the dense run's second half was not tuned
    assert len(caveat) == 1 and "tie the ensemble in domain, 1.000" in caveat[0]
    assert caveat[0].startswith("caveat: no dense_tuned row")
    out = [f for f in out if f not in caveat]
    verdicts = [f.rsplit("-> ", 1)[1] for f in out]
    assert len(out) == 5 and verdicts[0] == "holds"  # 0.95
    assert verdicts[1].startswith("a tie")  # 1.005
    assert verdicts[2] == "does NOT hold here"  # 1.05 out of domain
    assert verdicts[3].startswith("a tie")  # 0.9975
    assert verdicts[4] == "holds"
    # with dense_tuned (the dense run's second half at its own LR) the claims are checked against it,
    # then against dense at one LR for the whole run, as the papers compare; no caveat then
    out = findings(
        res(dense=2.0, dense_tuned=1.8, ensemble=1.9, moe_btx=1.7),
        res(dense=4.0, dense_tuned=4.1, ensemble=4.2),
        {},
    )
    assert not [f for f in out if f.startswith("caveat:")]
    head = [f for f in out if not f.startswith(" ")]
    assert head[0].startswith("the ensemble (cached prior) beats") and "vs dense_tuned 1.8000" in head[0]
    assert head[0].endswith("does NOT hold here")  # 1.9 / 1.8
    assert "vs dense_tuned 4.1000" in head[1] and "moe_btx 1.7000 vs dense_tuned" in head[2]
    under = out[out.index(head[-1]) + 1 :]
    assert head[-1].startswith("dense_tuned is the dense run with its second half at its own LR")
    assert [f.split(":")[0] for f in under] == [
        "  the ensemble beats dense at one LR, in-domain",
        "  the ensemble beats dense at one LR, out-of-domain",
        "  the BTX-fine-tuned MoE beats dense at one LR, in-domain",
    ]
    assert under[0].endswith("holds") and under[1].endswith("does NOT hold here")
    # c-BTM's rows (`quickstart --split clusters`) are checked against dense too, at their FLOPs
    out = findings(
        res(dense=2.0, cbtm_top1=1.9, cbtm_top2=2.1), res(dense=4.0, cbtm_top2=3.0), {"cbtm_top2": 1.2}
    )
    assert [f.split(":")[0] for f in out] == [
        "c-BTM (discovered clusters, top-1) beats dense in-domain",
        "c-BTM (discovered clusters, top-2) beats dense in-domain",
        "c-BTM (top-2) beats dense out-of-domain",
    ]
    assert out[1].endswith("does NOT hold here [NOT compute-matched: 1.200x the dense FLOPs]")
    # the random-split ablation (`quickstart --split random`), in and out of domain
    out = findings(res(dense=2.0, random_ensemble=2.1), res(dense=4.0, random_ensemble=3.5), {})
    assert [f.split(":")[0] for f in out] == [
        "experts on random splits do not beat dense",
        "experts on random splits do not beat dense out-of-domain",
    ]
    assert out[0].endswith("-> holds") and out[1].endswith("-> does NOT hold here")
    # the ratio is printed finely enough to see the side of the 1% line, and a reference row that
    # trained more is flagged too
    out = findings(res(dense=1.0, dense_tuned=1.0, ensemble=0.9901), None, {"dense_tuned": 1.2})
    assert "(ratio 0.9901) -> a tie" in out[0] and out[0].endswith(
        "[dense_tuned NOT compute-matched: 1.200x the dense FLOPs]"
    )


def test_each_method_is_charged_its_own_arms_flops():
    """A forest method (ensemble, top2, c-BTM) takes the forest's FLOPs and a single model its own run's:
    with the forest at the dense run's FLOPs in every test forest, charging it the dense run's went unseen,
    and a forest grown past dense (an expert added later) was never flagged."""
    from elmforest.compare import findings, method_flops

    arms = {"dense": 2.0, "forest": 3.0, "seed": 1.0, "dense_tuned": 2.0}
    got = method_flops({"ensemble": {}, "top2": {}, "seed": {}, "dense": {}, "dense_tuned": {}}, arms)
    assert got == {"ensemble": 1.5, "top2": 1.5, "seed": 0.5, "dense": 1.0, "dense_tuned": 1.0}
    res = {"dense": {"mean_bpb": 2.0}, "dense_tuned": {"mean_bpb": 2.0}, "ensemble": {"mean_bpb": 1.9}}
    assert findings(res, None, got)[0].endswith("[NOT compute-matched: 1.500x the dense FLOPs]")


def test_a_diverged_lr_is_recorded_not_fatal_and_not_retrained(shards_dir, tmp_path, monkeypatch):
    import elmforest.launch.sweep as sw

    calls = []
    real_dense, real_job = sw.run_dense_run, sw.run_job

    def dense(job):
        calls.append(job["forest"])
        if job["forest"].endswith("lr-0.1"):
            raise FloatingPointError("loss is nan at step 3; lower optim.lr?")
        return real_dense(job)

    def expert(job):
        if job["forest"].endswith("lr-1") and job["domain"] == Shards(shards_dir).domains[0]:
            raise FloatingPointError("loss is inf at step 2; lower optim.lr?")
        return real_job(job)

    monkeypatch.setattr(sw, "run_dense_run", dense)
    monkeypatch.setattr(sw, "run_job", expert)
    base = tiny_config(shards_dir, steps=8, batch_size=6)
    lrs, elrs = [1e-4, 1e-3, 1e-2, 1e-1], [1e-3, 1e-2, 1e-1, 1.0]
    res = sw.sweep(shards_dir, tmp_path / "s", base, lrs=lrs, expert_lrs=elrs, log=None)
    top = res["dense"]["points"][-1]
    assert top["diverged"] and top["valid_mean_bpb"] is None
    assert res["dense"]["best_lr"] in lrs[:3] and res["experts"]["points"][-1]["diverged"]
    assert "diverged" in format_sweep(res)
    n = sum(c.endswith("lr-0.1") for c in calls)
    again = sw.sweep(shards_dir, tmp_path / "s", base, lrs=lrs, expert_lrs=elrs, log=None)
    assert (
        sum(c.endswith("lr-0.1") for c in calls) == n == 1
        and again["dense"]["best_lr"] == res["dense"]["best_lr"]
    )  # nothing retrained
    # any other failure still fails the sweep
    monkeypatch.setattr(sw, "run_dense_run", lambda job: 1 / 0)
    with pytest.raises(sw.JobsFailed, match="ZeroDivisionError"):
        sw.sweep(shards_dir, tmp_path / "s2", base, lrs=lrs, arm="dense", log=None)
    with pytest.raises(ValueError, match="share a directory"):
        sw.sweep(shards_dir, tmp_path / "s3", base, lrs=[1e-3, 1.0001e-3, 2e-3, 4e-3], log=None)


def test_choose_skips_diverged_and_nan_points():
    from elmforest.launch.sweep import choose as _choose

    pts = [{"lr": 1e-3, "valid_mean_bpb": float("nan")}, {"lr": 2e-3, "valid_mean_bpb": 2.0}]
    pts += [{"lr": 4e-3, "valid_mean_bpb": 1.5}, {"lr": 8e-3, "valid_mean_bpb": None, "diverged": "x"}]
    c = _choose(pts)
    assert c["best_lr"] == 4e-3 and c["at_edge"] is None
    with pytest.raises(ValueError, match="diverged"):
        _choose([{"lr": 1e-3, "valid_mean_bpb": None}])


def test_the_dense_phases_refuse_a_config_that_mixes_other_domains(shards_dir, tmp_path):
    sh = Shards(shards_dir)
    base = tiny_config(shards_dir, steps=8, batch_size=6)
    plan, cfg = btm.plan_for(base, sh.domains[:2])
    assert btm.Plan(**{**asdict(plan), "domains": plan.domains[::-1]}) == plan  # a set, not a list
    f = Forest.init(tmp_path / "f")
    with pytest.raises(ValueError, match="one domain list"):
        btm.train_seed(f, sh, base, plan, progress=False)  # base mixes all three domains
    assert not (tmp_path / "f" / "runs").exists()


def test_the_dense_continuation_lr_is_the_presets_while_the_dense_lr_is():
    """cpu-small's was swept from its dense run's seed: it holds with another expert LR (which does not
    enter that sweep), not with another dense LR; unswept, the experts' LR; given, the given one."""
    from elmforest.model.presets import get_preset
    from elmforest.quickstart import _continue_lr

    p = get_preset("cpu-small")
    assert p.dense_continue_lr == 0.016
    assert _continue_lr(p, "cpu-small", [], None, 0.008) == (
        0.016,
        "preset cpu-small's, from a recorded LR sweep",
    )
    assert _continue_lr(p, "cpu-small", ["train.steps=20"], None, 0.004)[0] == 0.016  # --expert-lr 0.004
    assert _continue_lr(p, "cpu-small", ["optim.lr=0.004"], None, 0.008) == (
        0.008,
        "not swept: the experts' LR",
    )
    assert _continue_lr(p, "cpu-small", ["optim.lr=0.004"], 0.01, 0.008) == (0.01, "given")
    assert _continue_lr(get_preset("tiny"), "tiny", [], None, 0.02) == (0.02, "not swept: the experts' LR")


def test_the_continuation_arm_alone_adds_the_runs_own_lr_and_refuses_a_point_of_another_seed(
    shards_dir, tmp_path
):
    base = tiny_config(shards_dir, steps=8, batch_size=6)
    with pytest.raises(ValueError, match="the dense continuation grid has 3 learning rate"):  # before any run
        sweep(
            shards_dir, tmp_path / "s", base, arm="continue", dense_lr=1e-3, continue_lrs=[1e-4, 3e-3, 1e-2]
        )
    assert not (tmp_path / "s").exists()
    lines, kw = [], {"arm": "continue", "dense_lr": 1e-3, "continue_lrs": [1e-4, 3e-3, 1e-2, 3e-2]}
    res = sweep(shards_dir, tmp_path / "s", base, log=lines.append, **kw)
    c = res["dense_continue"]
    assert "dense" not in res and "experts" not in res and c["seed_lr"] == 1e-3
    assert [p["lr"] for p in c["points"]] == [1e-4, 1e-3, 3e-3, 1e-2, 3e-2]  # not continuing: a point
    assert any("own LR 0.001 joins the grid" in x for x in lines)
    point = tmp_path / "s" / "dense" / "lr-0.001"
    own = evaluate_shards(
        load_model(point / "runs" / "dense" / "model"),
        Shards(shards_dir),
        "valid",
        Shards(shards_dir).domains,
        64,
        progress=False,
    )
    assert c["points"][1]["valid_mean_bpb"] == pytest.approx(own["mean_bpb"])
    assert not (tmp_path / "s" / "dense-continue" / "from-lr-0.001" / "lr-0.001").exists()
    # the dense run trained again (another seed state): its old continuations are refused, not scored
    state = point / "seed_state" / "state.json"
    state.write_text(state.read_text() + " ")
    with pytest.raises(ValueError, match="continued from another seed state"):
        sweep(shards_dir, tmp_path / "s", base, log=None, **kw)


def test_the_ledger_holds_only_this_runs_rows(forest_dir, tmp_path):
    """A quickstart rerun in the same folder with other settings (no dense_tuned, no MoE training) listed
    the earlier run's dense_tuned and BTX fine-tuning in its compute, rows it no longer had."""
    import shutil

    from elmforest.launch.jobs import DENSE_TUNED_RUN
    from elmforest.quickstart import compute_summary

    shutil.copytree(forest_dir, tmp_path / "f", symlinks=True)
    f = Forest.load(tmp_path / "f")
    dense = read_json(f.root / "runs" / "dense" / "summary.json")
    (f.root / "runs" / DENSE_TUNED_RUN).mkdir()
    (f.root / "runs" / DENSE_TUNED_RUN / "summary.json").write_text(json.dumps({"flops": 5.0, "tokens": 1}))
    ft = {
        "phase": "btx_finetuning",
        "name": "moe-btx",
        "tokens": 1,
        "flops": 7.0,
        "output": str(tmp_path / "moe-btx"),
    }
    f.record_phase(ft)
    methods = {"dense": {}, "seed": {}, "ensemble": {}}
    now = compute_summary(Forest.load(f.root), methods, {}, {})
    assert "dense_tuned" not in now["arms"] and not [r for r in now["ledger"] if r["flops"] in (5.0, 7.0)]
    assert now["arms"]["dense"] == dense["flops"]
    then = compute_summary(
        Forest.load(f.root), {**methods, "dense_tuned": {}, "moe_btx": {}}, {}, {"moe_btx": ft}
    )
    assert then["arms"]["dense_tuned"] == f.data["seed"]["flops"] + 5.0 and then["arms"]["moe_btx"] > 0
    assert sorted(r["flops"] for r in then["ledger"] if r["flops"] in (5.0, 7.0)) == [5.0, 7.0]


def test_a_points_cached_valid_scores_are_those_asked_for(forest_dir, shards_dir, tmp_path):
    """Cached by the bytes alone: scoring a forest again on other domains or windows returned the first
    call's scores (one domain for three, another seq_len's numbers)."""
    from elmforest.launch.sweep_results import score_experts

    root = tmp_path / "f"
    shutil.copytree(forest_dir, root, symlinks=True)
    f, sh = Forest.load(root), Shards(shards_dir)
    one = score_experts(f, sh, sh.domains[:1], 32, max_bytes=3000)
    every = score_experts(f, sh, sh.domains, 32, max_bytes=3000)
    assert list(every["domains"]) == sh.domains and list(one["domains"]) == sh.domains[:1]
    assert every["domains"][sh.domains[0]] == one["domains"][sh.domains[0]]
    other = score_experts(f, sh, sh.domains, 16, max_bytes=3000)
    assert other["domains"] != every["domains"]
    assert score_experts(f, sh, sh.domains, 16, max_bytes=3000) == other  # the same asked again: cached


def test_a_domain_scored_on_a_few_bytes_is_a_caveat_of_the_findings():
    """A domain whose test text was 2 bytes counted a third of the mean and turned the seed-vs-dense order."""
    from elmforest.compare import findings

    def res(bpb, scored):
        dom = {d: {"bpb": bpb, "bytes": b} for d, b in scored.items()}
        return {"domains": dom, "mean_bpb": bpb}

    out = findings(
        {"dense": res(2.0, {"a": 60_000, "mini": 2}), "ensemble": res(1.9, {"a": 60_000, "mini": 2})},
        None,
        {},
    )
    assert (
        out[0].startswith("caveat: mini (2 bytes) scored on less than 1,000 bytes")
        and "1/2 of the mean" in out[0]
    )
    out = findings(
        {"dense": res(2.0, {"a": 60_000, "b": 1000}), "ensemble": res(1.9, {"a": 60_000, "b": 1000})},
        None,
        {},
    )
    assert not any("bytes of test text" in f for f in out)
