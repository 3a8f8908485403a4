"""The scaling study: a config with a bad field is refused naming it; a tiny study on a small corpus runs
end to end (all three axes), survives a SIGKILL without retraining finished runs, writes every output,
and a rerun retrains and rescores nothing; the verdicts follow the intervals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_corpus

from elmforest.cli import main
from elmforest.data.shards import Shards
from elmforest.study.analysis import findings, paired_gains, verdict
from elmforest.study.config import load_study_config
from elmforest.study.report import _over, scored_line
from elmforest.utils.errors import UserError
from elmforest.utils.yaml_file import read_yaml


@pytest.mark.parametrize(
    "sets, named",
    [
        (["bogus=1"], "bogus"),
        (["dense_budgets=[1, 2, 4]"], "dense_budgets"),
        (["dense_budgets=[1, 2, 3, 4]"], "spanning >= 8x"),
        (["forest_budgets=[0.5, 1, 8]"], "forest_budgets"),
        (["seeds=[0]"], "seeds"),
        (["cbtm_ks=[]", "cbtm_balance=[tokens]"], "cbtm_balance"),  # with the c-BTM axis off too
        (["cbtm_ks=[]", "cbtm_data=[0, 2]"], "cbtm_data"),
        (["seed_share=1.5"], "seed_share"),
        (["n_boot=abc"], "n_boot"),
        (["seed_pool=domain"], "seed_pool must be one of arm, point"),
        (["lr_grid=[1e-3, 2e-3, 4e-3, 8e-3]"], "expert_lr_grid"),
        (["lr_grid=[1e-3, 2e-3]", "expert_lr_grid=[1e-3, 2e-3, 4e-3, 8e-3]"], "distinct to 3"),
        (
            ["lr_grid=[1e-3, 2e-3, 4e-3, 8e-3]", "expert_lr_grid=[1e-3, 2e-3, 4e-3, 8e-3]", "dense_lr=0.1"],
            "drop dense_lr",
        ),
        # each of its runs would fail on it, after the dry run had passed
        (['overrides=["train.seq_len=100000"]'], "longer than the model's 2048 positions"),
        (['overrides=["model.preset=cpu-small"]'], "model.preset: choose the preset"),  # a label, not a model
    ],
)
def test_a_bad_study_field_is_refused_by_name(sets, named):
    with pytest.raises(UserError, match=named.replace("[", r"\[")):
        load_study_config("tiny", sets)


def test_a_study_config_file_is_read_and_checked(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("preset: tiny\nsteps: 20\nseeds: [3, 4]\n")
    cfg = load_study_config(f)
    assert cfg.steps == 20 and cfg.seeds == [3, 4] and cfg.dense_budgets == [0.5, 1.0, 2.0, 4.0]
    f.write_text("- a list\n")
    with pytest.raises(UserError, match="mapping"):
        load_study_config(f)
    f.write_text("preset: tiny\nsteps: 20\nseeds: [3, 4]\nsteps: 30\n")  # yaml would keep 30 silently
    with pytest.raises(UserError, match="'steps' is given twice .*line 4"):
        load_study_config(f)
    f.write_text('{"preset": "tiny", "seeds": [1, 2],\n "seeds": [3, 4]}')  # JSON too
    with pytest.raises(UserError, match="'seeds' is given twice"):
        load_study_config(f)
    f.write_text("base: &b {steps: 20, seeds: [3, 4]}\nx:\n  <<: *b\n  steps: 30\n")
    assert read_yaml(f)["x"] == {"steps": 30, "seeds": [3, 4]}  # overriding a `<<` merge is no repetition


def test_verdicts_follow_the_intervals():
    assert verdict(1.1, 1.6, 1.0) == "holds"
    assert verdict(0.9, 1.6, 1.0) == "not shown"
    assert verdict(0.5, 0.9, 1.0) == "does not hold"
    # a bound exactly at the null does not exclude it: neither claim is shown
    assert verdict(1.0, 1.5, 1.0) == verdict(0.5, 1.0, 1.0) == verdict(0.0, 0.0, 0.0) == "not shown"
    gains = [
        {"n_domains": 2, "gain": 0.01, "ci": [0.0, 0.02]},
        {"n_domains": 8, "gain": 0.05, "ci": [0.04, 0.06]},
    ]
    cfg = load_study_config("tiny")
    assert findings({"domains": gains}, cfg)[0]["verdict"] == "holds"
    gains[1]["ci"] = [0.015, 0.08]  # overlaps the 2-domain interval
    assert findings({"domains": gains}, cfg)[0]["verdict"] == "not shown"


def test_the_report_says_what_was_scored_and_what_the_intervals_resample():
    scored = {"in_domain": {"a": {"documents": 3, "bytes": 900}, "b": {"documents": 1, "bytes": 5000}}}
    scored["ood"] = {"x": {"documents": 2, "bytes": 1000}}
    line = scored_line(scored, 1000)
    assert line == (
        ": in domain 900-5,000 bytes, out of domain 1,000 bytes per domain; b (5,000 bytes) "
        "scored on one whole document longer than the limit"
    )
    assert scored_line(None, 1000) == ""  # a study.json from before the record
    study = {"config": {"seeds": [0, 1]}, "domains": ["a", "b"], "ood_domains": ["x"]}
    assert _over(study) == "seeds and domains in domain, over seeds out of domain (1 set)"
    study["ood_domains"] = ["x", "y"]
    assert _over(study) == "seeds and domains"


def _one_row_gain(pairs, domains, n_boot, ci, seed=0):
    return paired_gains([(pairs, domains)], n_boot, ci, seed, seed_pool="point")[0]


def test_paired_gain_by_hand():
    pairs = [({"a": 2.0, "b": 4.0}, {"a": 1.0, "b": 2.0}), ({"a": 2.0, "b": 4.0}, {"a": 1.0, "b": 2.0})]
    g = _one_row_gain(pairs, ["a", "b"], n_boot=100, ci=0.9)
    assert g["gain"] == pytest.approx(1.0) and g["ci"] == pytest.approx([1.0, 1.0])
    assert paired_gains([(pairs, ["a", "b"])], 100, 0.9) == [g]  # pooled: no spread is none either
    with pytest.raises(UserError, match="seed_pool must be one of arm, point, got 'row'"):
        paired_gains([(pairs, ["a", "b"])], 100, 0.9, seed_pool="row")
    bad = [({"a": 2.0, "b": 4.0}, {"a": float("nan"), "b": 2.0}), pairs[1]]
    with pytest.raises(UserError, match="row 1 holds a BPB that is not positive and finite"):
        paired_gains([(pairs, ["a", "b"]), (bad, ["a", "b"])], 100, 0.9)
    # gains that differ by seed and domain: the interval is the replicates' 10th and 90th percentiles,
    # each replicate one draw of domains, its mean stretched from every domain's by sqrt(D / (D - 1)) in
    # log space (2 domains: 1 degree of freedom, no t factor), and one of Gaussian seed weights of
    # variance 1 / (n (n - 1))
    pairs = [({"a": 2.0, "b": 4.0}, {"a": 1.0, "b": 3.0}), ({"a": 2.2, "b": 4.0}, {"a": 2.0, "b": 2.0})]
    g = _one_row_gain(pairs, ["a", "b"], n_boot=400, ci=0.8, seed=3)
    rng, dense, forest = np.random.default_rng(3), np.array([[2, 4], [2.2, 4]]), np.array([[1, 3], [2, 2]])
    boots = []
    for _ in range(400):
        cols = rng.integers(0, 2, 2)
        w = rng.normal(0, 1 / np.sqrt(2), 2)
        d, f = dense[:, cols].mean(axis=1), forest[:, cols].mean(axis=1)  # each seed's
        d, f = (x.mean(axis=1) * (y / x.mean(axis=1)) ** np.sqrt(2) for x, y in ((dense, d), (forest, f)))
        boots.append((d.mean() + w @ (d - d.mean())) / (f.mean() + w @ (f - f.mean())) - 1)
    assert g["ci"] == pytest.approx(list(np.quantile(boots, [0.1, 0.9])), rel=1e-12)
    assert g["ci"][0] < g["gain"] < g["ci"][1]


def test_paired_gains_pool_the_seed_spread_over_a_tables_rows():
    """seed_pool "arm": each row's gain moves by (1 + gain) S t_df/z / sqrt(n) u, S^2 the paired relative
    differences' variance pooled over the rows (here 3 rows of 2 seeds: 3 degrees of freedom), so a row
    whose 2 seeds happen to agree gets the table's spread, not none."""
    from scipy.stats import norm, t

    def pair(d, f):
        return {"a": d}, {"a": f}

    rows = [
        ([pair(2.0, 1.9), pair(2.0, 1.9)], ["a"]),  # the seeds agree exactly
        ([pair(2.0, 1.8), pair(2.2, 1.9)], ["a"]),
        ([pair(3.0, 3.1), pair(3.1, 3.0)], ["a"]),
    ]
    got = paired_gains(rows, n_boot=4000, ci=0.8, seed=5)
    dev = (
        [np.array([d["a"] for d, _ in r]) for r, _ in rows],
        [np.array([f["a"] for _, f in r]) for r, _ in rows],
    )
    diffs = [a / a.mean() - b / b.mean() for a, b in zip(*dev, strict=True)]
    s = np.sqrt(sum(x @ x for x in diffs) / 3) * t.ppf(0.9, 3) / norm.ppf(0.9)
    for g, a, b in zip(got, *dev, strict=True):
        gain = a.mean() / b.mean() - 1
        assert g["gain"] == pytest.approx(gain) and g["seeds"] == 2
        # the replicates are (1 + gain) exp(step) - 1 with step ~ N(0, s^2 / 2): the 10th-90th percentiles
        half = s / np.sqrt(2) * norm.ppf(0.9)
        want = [(1 + gain) * np.exp(-half) - 1, (1 + gain) * np.exp(half) - 1]
        assert g["ci"] == pytest.approx(want, abs=0.04 * half)
    # one row alone (1 degree of freedom): t_1 would widen it 2.5x at 80%; it keeps its own spread instead
    (one,) = paired_gains(rows[1:2], n_boot=4000, ci=0.8, seed=5)
    gain, half = dev[0][1].mean() / dev[1][1].mean() - 1, np.sqrt(diffs[1] @ diffs[1] / 2) * norm.ppf(0.9)
    assert one["ci"] == pytest.approx(
        [(1 + gain) * np.exp(-half) - 1, (1 + gain) * np.exp(half) - 1], abs=0.04 * half
    )


def _study_cfg(tmp_path: Path) -> Path:
    corpus = make_corpus(tmp_path / "corpus", docs_per_domain=60)
    cfg = {
        "preset": "tiny",
        "corpus": str(corpus),
        "steps": 14,  # c-BTM at data 0.25 trains 0.25 x 14 = 3.5 -> 4 steps: under 3.5 is refused
        "overrides": [
            "train.batch_size=6",
            "train.seq_len=32",
            "train.log_every=2",
            "train.ckpt_every=0",
            "train.valid_every=0",
        ],
        "domain_counts": [2],
        "seed_shares": [0.25],
        "cbtm_ks": [2],
        "cbtm_data": [0.25, 0.5, 1.0],
        "eval_bytes": 3000,
        "prior_batches": 2,
        "n_boot": 200,
        "workers": 1,
    }
    path = tmp_path / "study.json"
    path.write_text(json.dumps(cfg))
    return path


def _summaries(out: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in (out / "runs").rglob("summary.json")}


@pytest.mark.slow
@pytest.mark.parametrize("given, kept", [([], 0), (["train.keep_checkpoints=3"], 3)])
def test_a_studys_runs_keep_no_checkpoints_unless_its_overrides_say_so(tmp_path, monkeypatch, given, kept):
    import elmforest.study.study as study_mod

    seen = []

    def stop(cfg, base, names):
        seen.append(base.train.keep_checkpoints)
        raise UserError("stopped here")

    monkeypatch.setattr(study_mod, "plan_batch", stop)
    cfg = _study_cfg(tmp_path)
    d = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**d, "overrides": [*d["overrides"], *given]}))
    assert main(["study", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert seen == [kept]


def test_tiny_study_end_to_end_resumes_after_sigkill(tmp_path, capsys, monkeypatch):
    cfg, out = _study_cfg(tmp_path), tmp_path / "out"
    given = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**given, "dense_continue_lr": 0.006}))  # tiny's dense LR is 3e-3
    argv = ["study", str(cfg), "--out", str(out), "--no-progress"]
    p = subprocess.Popen(
        [sys.executable, "-m", "elmforest.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    first = out / "runs" / "b0.5-s0" / "runs" / "dense" / "summary.json"
    deadline = time.time() + 240
    while not first.is_file() and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert first.is_file(), "the study never finished its first run"
    done = _summaries(out)

    assert main(argv) == 0, capsys.readouterr()
    after = _summaries(out)
    assert all(after[k] == v for k, v in done.items())  # finished runs were not trained again
    kept = [s.parent for s in out.rglob("summary.json") if (s.parent / "checkpoints").exists()]
    assert not kept  # finished runs keep no checkpoints: nothing reads them
    study = json.loads((out / "study.json").read_text())
    fits = json.loads((out / "fits.json").read_text())
    arms = {(r["axis"], r["arm"]) for r in study["runs"]}
    assert arms == {
        ("main", "dense"),
        ("main", "dense_tuned"),  # each dense run's second half again at its own LR, on every axis
        ("main", "btm"),
        ("domains", "dense"),
        ("domains", "dense_tuned"),
        ("domains", "btm"),
        ("share", "btm"),
        ("cbtm", "dense"),
        ("cbtm", "dense_tuned"),
        ("cbtm", "cbtm"),
    }
    for r in study["runs"]:  # every dense_tuned run continued its own point's dense run, at the same FLOPs
        if r["arm"] == "dense_tuned" and r["axis"] != "main":
            d = next(x for x in study["runs"] if x["arm"] == "dense" and x["dir"] == r["dir"])
            assert r["flops"] == pytest.approx(d["flops"], rel=1e-9) and r["lr"] == 0.006
            assert r["bpb"] != d["bpb"] and r["domains"] == d["domains"]
    for key in ("cbtm", "cbtm_tuned"):  # c-BTM against each dense arm
        cbtm = [(r["data_fraction"], r["k"], r["balance"]) for r in fits[key]]
        assert sorted(cbtm) == sorted((f, 2, b) for f in (0.25, 0.5, 1.0) for b in ("bytes", "documents"))
    for r in study["runs"]:  # every arm scored on the same test bytes, whatever data it trained on
        assert set(r["bpb"]) == set(r["domains"] if r["axis"] == "domains" else study["domains"])
    one_x = {
        r["seed"]: r["tokens"]
        for r in study["runs"]
        if (r["axis"], r["arm"], r["budget"]) == ("main", "dense", 1)
    }
    for r in study["runs"]:  # a domain-count point trains the main 1x run's tokens, whatever its n
        if r["axis"] == "domains" and r["arm"] == "dense":
            assert r["tokens"] == one_x[r["seed"]]
    main_runs = [r for r in study["runs"] if r["axis"] == "main"]
    assert len(main_runs) == 4 * 2 * 2 + 3 * 2  # dense and dense_tuned at 4 budgets, forests at 3, 2 seeds
    for r in main_runs:  # the same bytes for every arm, FLOPs counted by what ran
        assert set(r["bpb"]) == set(study["domains"]) and r["flops"] > 0
    dense_1x = [r for r in main_runs if r["arm"] == "dense" and r["budget"] == 1.0]
    forest_1x = [r for r in main_runs if r["arm"] == "btm" and r["budget"] == 1.0]
    assert forest_1x[0]["flops"] == pytest.approx(dense_1x[0]["flops"], rel=0.01)  # compute-matched
    for d in (r for r in main_runs if r["arm"] == "dense"):  # the same FLOPs, from the same seed state
        t = next(
            r
            for r in main_runs
            if r["arm"] == "dense_tuned" and (r["budget"], r["seed"]) == (d["budget"], d["seed"])
        )
        assert t["flops"] == pytest.approx(d["flops"], rel=1e-9) and t["lr"] == 0.006 and t["bpb"] != d["bpb"]
        run = json.loads((Path(d["dir"]) / "runs" / "dense-tuned" / "run_config.json").read_text())
        assert run["train"]["init_checkpoint"] == str((Path(d["dir"]) / "seed_state").resolve())
    assert [m["budget"] for m in fits["in_domain_tuned"]["budgets"]] == [0.5, 1.0, 2.0]
    assert fits["in_domain_tuned"]["dense_arm"] == "dense_tuned" and fits["in_domain"]["dense_arm"] == "dense"
    assert [m["budget"] for m in fits["in_domain"]["budgets"]] == [0.5, 1.0, 2.0]
    for m in fits["in_domain"]["budgets"]:
        assert m["status"] in ("ok", "above_range", "below_range", "unreachable") and len(m["ci"]) == 2
    for s in ("", "_tuned"):  # every axis against dense at one LR and against dense_tuned
        assert [g["n_domains"] for g in fits["domains" + s]] == [2, 3]
        assert {x["seed_share"] for x in fits["seed_share" + s]} == {0.25, 0.5}
    assert fits["domains_tuned"] != fits["domains"] and fits["cbtm_tuned"] != fits["cbtm"]
    report = (out / "report.md").read_text()
    assert "## Findings" in report and any(v in report for v in ("holds", "not shown", "does not hold"))
    assert "## Multiplier, in domain, against dense with its second half at its own LR" in report
    assert "the dense runs' second half 0.006 (arm dense_tuned)" in report
    assert "| domains | gain over dense_tuned | CI | gain over dense (one LR) | CI |" in report
    assert "the gain at 2 domain(s) is bootstrapped over that few domains" in report  # 9 replicates
    assert "interval firmer; the gain at 2 domain(s)" in report  # 2 seeds: both caveats, apart
    assert "replicates; the seed spread pooled over each arm's budgets and each table's rows)" in report
    checked = 0  # each multiplier table's last column says whether the interval it prints holds 1
    for row in (
        x for x in report.splitlines() if re.fullmatch(r"\| [\d.]+x \| .* \| \[[\d.]+, [\d.]+\] \| \w+ \|", x)
    ):
        lo, hi = map(float, re.search(r"\[([\d.]+), ([\d.]+)\]", row).groups())
        assert row.endswith(f"| {'yes' if lo <= 1.0 <= hi else 'no'} |"), row
        checked += 1
    assert checked >= 3
    claims = [f["claim"] for f in fits["findings"]]
    assert "BTM, against dense_tuned: the forest's gain grows with the number of domains" in claims
    assert claims.index("BTM, against dense_tuned: a seed of 40-60% of the budget is best") < claims.index(
        "BTM, against dense at one LR: a seed of 40-60% of the budget is best"
    )
    scored = study["scored"]["in_domain"]  # what every arm was scored on, as the report states it
    assert set(scored) == set(study["domains"])
    assert all(v["documents"] >= 1 and (v["bytes"] <= 3000 or v["documents"] == 1) for v in scored.values())
    lo, hi = min(v["bytes"] for v in scored.values()), max(v["bytes"] for v in scored.values())
    assert f"in domain {lo:,}-{hi:,} bytes" in report
    assert all(
        (out / f).stat().st_size > 0 for f in ("curves.png", "multiplier.png", "domains.png", "cbtm.png")
    )
    assert any("c-BTM" in f["claim"] for f in fits["findings"])

    scores = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("study_scores.json")}
    logs = {p: p.stat().st_size for p in (out / "runs").glob("*/score.log")}
    assert logs
    assert main([*argv, "--set", "workers=2"]) == 0  # all done: nothing trained, nothing rescored
    assert _summaries(out) == after
    assert {p: p.stat().st_size for p in (out / "runs").glob("*/score.log")} == logs  # read here
    # and no worker process started per finished run to find it done (2 workers asked): checked here
    pids = {p.read_text() for p in (out / "runs").glob("*/runs/*/worker.pid")}
    assert pids == {str(os.getpid())}, len(pids)
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("study_scores.json")} == scores
    # c-BTM scores from the routing before documents were re-routed on their first tokens are stale
    caches = {p: json.loads(p.read_text())["entries"] for p in scores}
    stale = [
        p for p, e in caches.items() if "btm/bpb" in e and e["btm/bpb"]["key"]["routing"]["mode"] == "cluster"
    ]
    assert stale and len(stale) < len(scores)
    for p in stale:
        old = json.loads(p.read_text())
        for e in old["entries"].values():
            del e["key"]["cluster_routing"]
        p.write_text(json.dumps(old))
    assert main(argv) == 0
    assert _summaries(out) == after  # nothing trained again
    now = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("study_scores.json")}
    assert {p for p in scores if now[p] != scores[p]} == set(stale)  # only those were scored again
    scores = now

    class NoRay:  # a finished study's rerun on Ray started Ray (seconds, or a cluster) to run nothing
        def prepare(self):
            raise AssertionError("Ray was started")

        map = prepare

    import elmforest.study.study as study_mod

    monkeypatch.setattr(study_mod, "make_executor", lambda *a, **kw: NoRay())
    assert main([*argv, "--executor", "ray", "--set", "workers=null"]) == 0  # (Ray refuses workers)
    assert _summaries(out) == after
    monkeypatch.undo()

    capsys.readouterr()
    assert main([*argv, "--analyse-only", "--set", "n_boot=150", "--set", "seed_pool=point"]) == 0
    fits = json.loads((out / "fits.json").read_text())  # fitted again from study.json, with both
    assert (
        fits["n_boot"] == 150
        and fits["seed_pool"] == "point"
        and "one difference per point" in fits["caveat"]
    )
    assert "replicates; each point's seed spread its own)" in (out / "report.md").read_text()
    assert "need a full run" not in capsys.readouterr().out  # the LRs it chose are no change of config
    assert study["config"]["expert_lr"] is None and study["batch_size"] == 6
    assert _summaries(out) == after

    assert main([*argv, "--set", "steps=20"]) == 2  # would change the runs already trained
    assert "steps" in capsys.readouterr().err
    # a point planned otherwise (an older study's LRs): refused with the study's way out, before training
    manifest = out / "runs" / "domains2-s0" / "forest.json"
    planned = json.loads(manifest.read_text())
    planned["plan"]["expert_lr"] *= 2
    manifest.write_text(json.dumps(planned))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "domains2-s0 was planned differently (expert_lr" in err and "another --out" in err
    assert "--forest" not in err and _summaries(out) == after
    planned["plan"]["expert_lr"] /= 2
    manifest.write_text(json.dumps(planned))
    # so is a c-BTM forest, before the seeds and dense runs it branches after
    cbtm = next((out / "runs").glob("cbtm-k2-*-s0")) / "forest.json"
    planned = json.loads(cbtm.read_text())
    planned["plan"]["expert_lr"] *= 2
    cbtm.write_text(json.dumps(planned))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{cbtm.parent.name} was planned differently (expert_lr" in err and "another --out" in err
    assert _summaries(out) == after


@pytest.mark.slow
def test_every_budget_takes_its_own_swept_learning_rates(tmp_path, capsys, monkeypatch):
    """With lr_grid / expert_lr_grid the study sweeps at every main-axis budget (both arms at forest
    budgets, the dense arm alone elsewhere; `elmforest sweep` itself is tested in test_launch.py, here a
    stand-in answers with a different best LR per budget), at each c-BTM data fraction, domain count
    (all three arms on its domains) and seed share (its experts from a seed at the 1x dense LR), and
    trains each point at its own sweep's LRs; the report lists them, the edge of a grid flagged."""
    from elmforest.study import lrs as lrs_mod

    calls = []

    def fake_sweep(shards, where, base, arm, lrs, expert_lrs, seed_share, executor, threads, log, **kw):
        i = {4: 3, 7: 0, 14: 1, 28: 2, 56: 3}[base.train.steps]
        clusters = base.data.domains[0].startswith("cluster")  # c-BTM's cluster experts at a data fraction
        if clusters:  # from the seed of that fraction's dense LR
            assert arm == "experts" and kw["dense_lr"] == lrs[i]
            i = {4: 2, 7: 1, 14: 3}[base.train.steps]  # expert LR 8e-3, 3.2e-2, 2e-3 at data 0.25, 0.5, 1
        elif len(base.data.domains) == 2 or seed_share != 0.5:  # a domain count's or a seed share's, at 1x
            i = 2 if seed_share == 0.5 else 0
        sub = "shards-data" in str(shards)  # a c-BTM subsample
        calls.append((base.train.steps, arm, base.train.seed, seed_share, tuple(base.data.domains), sub))
        if arm == "continue":  # after the dense arm, from its best run
            assert kw["dense_lr"] == lrs[i]
        if arm == "experts" and not clusters:  # a seed share's: from the seed of the 1x dense LR's run
            assert kw["dense_lr"] == lrs[1]
        if arm == "experts":  # in a folder of that seed's own (a seed at another LR: another folder)
            assert Path(where).name == f"from-lr-{kw['dense_lr']:.3g}"
        return {
            "dense": {"best_lr": lrs[i], "at_edge": {0: "lowest", 3: "highest"}.get(i)},
            "experts": {"best_lr": expert_lrs[3 - i], "at_edge": None},
            **(
                {"dense_continue": {"best_lr": expert_lrs[i], "at_edge": None}}
                if arm in ("all", "continue")
                else {}
            ),
            # a cluster with no valid documents: the LR chosen on the other (said in the report)
            **({"domains": base.data.domains, "scored_domains": ["cluster0"]} if clusters and i == 2 else {}),
        }

    monkeypatch.setattr(lrs_mod, "sweep", fake_sweep)
    finished, looked = lrs_mod._finished, []

    def spy(where, experts, cfg, main, dense, seed_lr, shards):  # each on its own shards, from its seed
        looked.append((Path(where), seed_lr, shards))
        return finished(where, experts, cfg, main, dense, seed_lr, shards)

    monkeypatch.setattr(lrs_mod, "_finished", spy)
    cfg_path = _study_cfg(tmp_path)
    cfg = json.loads(cfg_path.read_text())
    cfg.update(
        {
            "lr_grid": [1e-3, 4e-3, 1.6e-2, 6.4e-2],
            "expert_lr_grid": [2e-3, 8e-3, 3.2e-2, 0.128],
            "domain_counts": [2],
            "seed_shares": [0.25],
        }
    )
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert main(["study", str(cfg_path), "--out", str(out), "--no-progress"]) == 0, capsys.readouterr()
    every = tuple(json.loads((out / "study.json").read_text())["domains"])
    assert len(every) == 3
    clusters = [(s, "experts", 0, 0.5, ("cluster0", "cluster1"), False) for s in (4, 4, 7, 7, 14, 14)]
    assert (
        calls
        == [  # the main budgets' dense runs' second half too (all; continue after dense)
            (7, "all", 0, 0.5, every, False),
            (14, "all", 0, 0.5, every, False),
            (28, "all", 0, 0.5, every, False),
            (56, "dense", 0, 0.5, every, False),
            (56, "continue", 0, 0.5, every, False),
            (4, "dense", 0, 0.5, every, True),  # c-BTM at data 0.25 (budget 0.25x), on its own subsample
            (4, "continue", 0, 0.5, every, True),  # (its experts are the cluster experts': swept per k)
            (7, "dense", 0, 0.5, every, True),  # c-BTM at data 0.5; data 1 shares the 1x point
            (7, "continue", 0, 0.5, every, True),
            (14, "all", 0, 0.5, every[:2], False),  # the 2-domain point: its experts at batch 6 / 2
            (14, "experts", 0, 0.25, every, False),  # the seed share 0.25: the experts alone
            *clusters,  # c-BTM's 2 cluster experts per data fraction (budget) and balance
        ]
    )
    study = json.loads((out / "study.json").read_text())
    lrs = study["lrs_by_budget"]
    assert [lrs[b]["dense_lr"] for b in ("0.5", "1", "2", "4")] == cfg["lr_grid"]
    assert [lrs[b]["expert_lr"] for b in ("0.5", "1", "2")] == [0.128, 3.2e-2, 8e-3]
    assert "expert_lr" not in lrs["4"]
    assert [lrs[b]["dense_continue_lr"] for b in ("0.5", "1", "2", "4")] == cfg["expert_lr_grid"]
    assert lrs["data0.25"]["dense_continue_lr"] == 0.128  # its dense run's second half too
    assert lrs["data0.25"]["dense_lr"] == 6.4e-2 and "expert_lr" not in lrs["data0.25"]
    assert (lrs["domains2"]["dense_lr"], lrs["domains2"]["expert_lr"]) == (1.6e-2, 8e-3)
    assert lrs["domains2"]["dense_continue_lr"] == 3.2e-2
    assert (lrs["share0.25"]["dense_lr"], lrs["share0.25"]["expert_lr"]) == (4e-3, 0.128)  # 1x's dense
    assert "dense_continue_lr" not in lrs["share0.25"]  # it trains no dense run
    for f, lr in (("0.25", 8e-3), ("0.5", 3.2e-2), ("1", 2e-3)):  # none the main 1x point's 3.2e-2 at data 1
        for balance in ("documents", "bytes"):
            assert lrs[f"cbtm-k2-{balance}-data{f}"]["expert_lr"] == lr
    axes = set()

    def lr_of(run_dir):
        return json.loads((run_dir / "run_config.json").read_text())["optim"]["lr"]

    for r in study["runs"]:
        where = Path(r["dir"])
        key = {"main": f"{r['budget']:g}", "cbtm": f"data{r['budget']:g}"}.get(r["axis"], "")
        if not key or r["arm"] == "cbtm":  # domains2-s0, share0.25-s1, cbtm-k2-bytes-data0.5-s0
            key = Path(r["dir"]).name.split("-s")[0]
        if key not in lrs:  # c-BTM's dense run at data 1 is the 1x point's
            assert key == "data1"
            key = "1"
        want = lrs[key]
        if r["arm"] != "cbtm":  # a c-BTM forest's dense run is its base point's, checked there
            assert lr_of(where / "runs" / "dense") == want["dense_lr"], (r["axis"], r["budget"])
        if r["arm"] == "dense_tuned":  # its second half at its budget's own swept LR (where it beat the run)
            lr = r["lost_on_valid"]["lr"] if r.get("same_as") else r["lr"]
            assert lr_of(where / "runs" / "dense-tuned") == want["dense_continue_lr"] == lr
        dense = ("dense", "dense_tuned")
        experts = [d for d in (where / "runs").iterdir() if d.name not in ("dense", "dense-tuned")]
        experts = experts if r["arm"] not in dense else []
        assert all(lr_of(d) == want["expert_lr"] for d in experts), (r["axis"], r["budget"], r["arm"])
        axes.add((r["axis"], r["arm"], bool(experts)))
    assert {a[:2] for a in axes} >= {
        ("main", "btm"),
        ("share", "btm"),
        ("domains", "btm"),
        ("domains", "dense_tuned"),
        ("cbtm", "dense"),
        ("cbtm", "cbtm"),
    }
    assert all(has for axis, arm, has in axes if arm in ("btm", "cbtm"))
    assert study["dense_lr"] == 4e-3 and "swept at every budget" in study["lr_source"]
    report = (out / "report.md").read_text()
    assert "Learning rates chosen at each budget" in report and "0.001 (lowest of the grid)" in report
    assert "| c-BTM, data 0.25 (0.25x) | 0.064 (highest of the grid) | - | 0.128 |" in report
    assert "| 2 domains (1x) | 0.016 | 0.008 | 0.032 |" in report
    assert "| seed share 0.25 (1x) | 0.004 | 0.128 | - |" in report
    assert (
        "| c-BTM k = 2 (documents), data 0.25 (0.25x), chosen on 1 of 2 (no valid split) | 0.064 (highest of the grid) | 0.008 | - |"
        in report
    )
    assert "| c-BTM k = 2 (documents), data 0.5 (0.5x) | 0.001 (lowest of the grid) | 0.032 | - |" in report
    assert "| 4x | 0.064 (highest of the grid) | - | 0.128 |" in report
    for where, seed_lr, shards in looked:
        tag = where.parent.name if where.name.startswith("from-") else where.name
        if tag.startswith("cbtm-k"):  # its clusters' shards, its seed at the fraction's dense LR
            f, balance = tag.split("-data")[1], tag.split("-")[2]
            assert Path(shards).name == f"shards-k2-{balance}-data{f}", (tag, shards)
            assert seed_lr == lrs["1" if f == "1" else f"data{f}"]["dense_lr"], tag
        elif tag.startswith("share"):
            assert seed_lr == lrs["1"]["dense_lr"] and shards == str(Path(shards).resolve())
        else:
            assert seed_lr is None, tag
    assert len(looked) == len(lrs)
    assert main(["study", str(cfg_path), "--out", str(out), "--set", "lr_grid=[1e-3, 2e-3, 4e-3, 8e-3]"]) == 2
    assert "lr_grid" in capsys.readouterr().err


def test_the_best_seed_share_is_shown_only_beyond_every_other_shares_interval():
    from elmforest.study.analysis import _gain_findings

    def shares(a, b):
        return {
            "seed_share": [
                {"seed_share": 0.5, "gain": 0.05, "ci": a},
                {"seed_share": 0.25, "gain": 0.04, "ci": b},
            ]
        }

    [f] = _gain_findings(shares([0.03, 0.07], [0.02, 0.06]), "", "")  # the intervals overlap
    assert f["verdict"] == "not shown"
    [f] = _gain_findings(shares([0.045, 0.055], [0.035, 0.044]), "", "")
    assert f["verdict"] == "holds"


def test_dry_run_counts_the_dense_tuned_half_by_the_seed_share():
    """Each dense run's second half again: (1 - seed_share) of its budget (equal to seed_share at 0.5)."""
    from elmforest.study.cost import training_units

    names = [f"d{i}" for i in range(8)]
    half = training_units(load_study_config("cpu"), names)["dense_tuned"]
    quarter = training_units(load_study_config("cpu", ["seed_share=0.25"]), names)["dense_tuned"]
    assert quarter == pytest.approx(half / 0.5 * 0.75)


def test_dry_run_counts_the_training_by_hand(capsys):
    """D units (one 1x dense run each) of the cpu preset, counted by hand: main = dense 2 x (0.5+1+2+4)
    + experts 2 x 0.5 x (0.5+1+2); domains = 2 counts (2, 4; 8 is the main point) x 2 seeds x (1 + 0.5);
    share = 2 shares x 2 seeds x 1 (own seed + experts); c-BTM = dense at 0.25 and 0.5 x 2 seeds +
    experts 0.5 x (0.25+0.5+1) x 3 ks x 2 balances x 2 seeds; dense_tuned = the second half (0.5) of
    every dense run: main 2 x (0.5+1+2+4), domains 2 x 2 x 1, c-BTM 2 x (0.25+0.5); sweeps = 4 LRs x
    each budget + 4 expert LRs x 0.5 x each forest budget, the dense arm and its second half at c-BTM's data 0.25 and 0.5,
    and the continuation (4 expert LRs x 0.5) at every dense budget; all three arms at 1x for the domain
    counts 2 and 4 (8 is the main 1x point); the seed shares 0.25 and 0.75 each a seed of their own and
    4 expert LRs x their experts' share; each of c-BTM's 3 ks x 2 balances x 3 fractions f a seed
    (0.5 f) and 4 expert LRs x 0.5 f."""
    from elmforest.study.cost import training_units

    u = training_units(load_study_config("cpu"), [f"d{i}" for i in range(8)])
    assert u["main"] == pytest.approx(15 + 3.5) and u["domains"] == pytest.approx(6.0)
    assert u["share"] == pytest.approx(4.0) and u["cbtm"] == pytest.approx(1.5 + 10.5)
    assert u["dense_tuned"] == pytest.approx(0.5 * (15 + 4 + 1.5))  # each dense run's second half again
    assert u["lr sweeps"] == 0 and u["total"] == pytest.approx(40.5 + 10.25)
    grids = ["lr_grid=[1e-3, 2e-3, 4e-3, 8e-3]", "expert_lr_grid=[1e-3, 2e-3, 4e-3, 8e-3]"]
    u = training_units(load_study_config("cpu", grids), [f"d{i}" for i in range(8)])
    main_axis = 4 * 7.5 + 4 * 0.5 * 3.5 + (4 + 4 * 0.5) * 0.75 + 4 * 0.5 * 7.5
    other_axes = 2 * (4 + 2 * 4 * 0.5) + (0.25 + 4 * 0.75) + (0.75 + 4 * 0.25)
    other_axes += 3 * 2 * (0.25 + 0.5 + 1) * (0.5 + 4 * 0.5)  # c-BTM: 3 ks x 2 balances x fractions
    assert u["lr sweeps"] == pytest.approx(main_axis + other_axes)
    # a forest budget with no dense run of its own (3x): its dense arm and experts, no second half
    grids += ["forest_budgets=[0.5, 1.0, 3.0]", "domain_counts=[]", "seed_shares=[]", "cbtm_ks=[]"]
    u = training_units(load_study_config("cpu", grids), [f"d{i}" for i in range(8)])
    b = {0.5: (True, True), 1.0: (True, True), 2.0: (False, True), 3.0: (True, False), 4.0: (False, True)}
    want = sum(4 * x + 4 * 0.5 * x * forest + 4 * 0.5 * x * dense for x, (forest, dense) in b.items())
    assert u["lr sweeps"] == pytest.approx(want)
    assert main(["study", "btm-125m", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "25.0 D of training" in out and "GPU-hours" in out
    # checked as the study checks it: a batch of 16 does not split among 3 cluster experts
    assert main(["study", "cpu", "--dry-run", "--set", "cbtm_ks=[3]"]) == 2
    assert "cbtm_ks" in capsys.readouterr().err


def test_a_study_saved_before_a_field_existed_resumes(tmp_path):
    """study_config.json written before lr_grid existed: its missing fields are their defaults, not a
    change; with lr_grid, replacing the first seed (the LR sweeps' seed) is refused."""
    from elmforest.study.study import _check_identity

    cfg = load_study_config("tiny")
    old = cfg.to_dict()
    del old["lr_grid"], old["expert_lr_grid"]
    (tmp_path / "study_config.json").write_text(json.dumps(old))
    _check_identity(tmp_path, cfg)  # no error
    grids = ["lr_grid=[1e-3, 2e-3, 4e-3, 8e-3]", "expert_lr_grid=[1e-3, 2e-3, 4e-3, 8e-3]"]
    (tmp_path / "new").mkdir()
    _check_identity(tmp_path / "new", load_study_config("tiny", grids))
    _check_identity(tmp_path / "new", load_study_config("tiny", [*grids, "seeds=[0, 1, 2]"]))  # seeds added
    with pytest.raises(UserError, match="seeds"):
        _check_identity(tmp_path / "new", load_study_config("tiny", [*grids, "seeds=[5, 0, 1]"]))
    # the same overrides in another order are the same runs; another value is not
    ov = load_study_config("tiny").overrides
    _check_identity(tmp_path / "new", load_study_config("tiny", [*grids, f"overrides={ov[::-1]}"]))
    with pytest.raises(UserError, match="overrides"):
        bigger = [o.replace("batch_size=4", "batch_size=8") for o in ov]
        _check_identity(tmp_path / "new", load_study_config("tiny", [*grids, f"overrides={bigger}"]))
    # an operational field (docs/design.md: train.keep_checkpoints=0 at any time) is not another run
    dropping = json.dumps([*ov, "train.keep_checkpoints=0"])
    _check_identity(tmp_path / "new", load_study_config("tiny", [*grids, f"overrides={dropping}"]))


def test_progress_eta_counts_only_the_tokens_trained_since_the_start(tmp_path, monkeypatch):
    """A resumed study's ETA comes from this invocation's rate: runs finished before it do not count
    as speed (they made the ETA of a resumed study far too short)."""
    from elmforest.study import run as run_mod

    done, todo = tmp_path / "done", tmp_path / "todo"
    done.mkdir()
    todo.mkdir()
    (done / "summary.json").write_text("{}")
    clock = iter([0.0, 60.0])
    monkeypatch.setattr(run_mod.time, "perf_counter", lambda: next(clock))
    prog = run_mod.Progress([("done", done, 0, 100, 10), ("todo", todo, 0, 100, 10)], log=None)
    (todo / "metrics.jsonl").write_text(json.dumps({"step": 25}) + "\n")
    # 250 tokens in 60 s since the start; 750 to go -> 180 s = 3.0 min (not 1.2 min from 1250 tokens)
    assert prog.line() == "      study: 1/2 runs, 62% of the tokens, ETA 3.0 min"
    # a run paused at its end off the log grid (a seed: its last line at 96, its checkpoint at 100)
    monkeypatch.undo()
    (todo / "metrics.jsonl").write_text(json.dumps({"step": 96}) + "\n")
    (todo / "checkpoints" / "step-00000100").mkdir(parents=True)
    (todo / "checkpoints" / "step-00000100" / "state.json").write_text("{}")
    assert run_mod.Progress([("todo", todo, 0, 100, 10)], log=None)._done() == (1, 1000)


def test_seed_position_by_hand(tmp_path):
    from elmforest.study.report import seed_lines
    from elmforest.study.run import seed_position

    cfg = load_study_config("tiny")  # seeds [0, 1], dense budgets up to 4x, seed share 0.5
    curves = {"b1-s0": {4: 6.0, 8: 5.0, 12: 4.6, 16: 4.4}, "b4-s0": {16: 4.5, 32: 4.0, 48: 3.7, 64: 3.5}}
    for tag, c in curves.items():
        d = tmp_path / tag / "runs" / "dense"
        d.mkdir(parents=True)
        (d / "valid.jsonl").write_text(
            "".join(json.dumps({"step": s, "valid_loss": v}) + "\n" for s, v in c.items())
        )
    pos = seed_position(tmp_path, cfg, 16, vocab_size=256)
    ln = 5.545177444479562  # ln 256
    assert pos["seed_steps"] == 8 and pos["seed_valid_loss"] == 5.0
    assert pos["seed_last_doubling_drop"] == pytest.approx(1.0)  # 6.0 at step 4 -> 5.0 at step 8
    assert pos["largest_last_doubling_drop"] == pytest.approx(0.5)  # 4.0 at step 32 -> 3.5 at step 64
    assert pos["share_of_fall"] == pytest.approx((ln - 5.0) / (ln - 3.5))
    text = " ".join(seed_lines(pos, 0.25))
    assert "step 8 (2 tokens per parameter)" in text and "2.0x" in text
    sparse = tmp_path / "b1-s0" / "runs" / "dense" / "valid.jsonl"  # logged too rarely to see a doubling
    sparse.write_text("".join(json.dumps({"step": s, "valid_loss": 5.0}) + "\n" for s in (8, 16)))
    assert seed_position(tmp_path, cfg, 16, 256) is None
    (tmp_path / "b4-s0" / "runs" / "dense" / "valid.jsonl").unlink()  # valid losses off: nothing to say
    assert seed_position(tmp_path, cfg, 16, 256) is None and seed_lines(None, 0.25) == []


def test_the_same_corpus_written_otherwise_is_the_same_study(corpus, tmp_path, monkeypatch):
    """`corpus=DIR/` or a relative path after `corpus=DIR` was refused as "another corpus"."""
    from elmforest.study.study import _check_identity

    _check_identity(tmp_path, load_study_config("tiny", [f"corpus={corpus}"]))
    _check_identity(tmp_path, load_study_config("tiny", [f"corpus={corpus}/"]))
    monkeypatch.chdir(corpus.parent)
    _check_identity(tmp_path, load_study_config("tiny", [f"corpus={corpus.name}"]))
    with pytest.raises(UserError, match="corpus"):
        _check_identity(tmp_path, load_study_config("tiny", [f"corpus={tmp_path}"]))


def test_gain_plots_tick_each_count_measured(tmp_path, monkeypatch):
    """A log2 axis wrote 2^1, 2^2, 2^3 and left a 3-domain point without a tick."""
    from elmforest.study import plots as report

    figs = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figs.append(fig))
    g = [{"n_domains": n, "gain": 0.01, "ci": [0.0, 0.02]} for n in (2, 3, 8)]
    report.plot_domains({"domains": g}, tmp_path / "d.png")
    rows = [
        {"data_fraction": 0.5, "balance": "bytes", "k": k, "gain": 0.01, "ci": [0.0, 0.02]} for k in (2, 4)
    ]
    report.plot_cbtm({"cbtm": rows}, tmp_path / "c.png")
    labels = [[t.get_text() for t in f.axes[0].get_xticklabels()] for f in figs]
    assert labels == [["2", "3", "8"], ["1", "2", "4"]]


def test_the_dense_runs_second_half_lr_and_whether_it_was_tuned():
    """cpu-small carries a swept LR for the dense runs' second half (the dense_tuned arm); a preset
    without one (tiny, btm-*) stands the expert LR in and says it is not tuned; a given one is tuned."""
    from elmforest.model.presets import preset_run_config
    from elmforest.study.lrs import learning_rates as _learning_rates

    def lrs(preset, **given):
        cfg = load_study_config("tiny", [f"preset={preset}", *(f"{k}={v}" for k, v in given.items())])
        return _learning_rates(cfg, preset_run_config(preset), {})

    assert lrs("cpu-small") == (2e-3, 8e-3, 1.6e-2, "preset cpu-small", True)
    assert lrs("tiny")[2:] == (3e-3, "preset tiny", False)  # tiny's expert LR is its dense LR
    assert lrs("tiny", dense_continue_lr=0.006)[2:] == (0.006, "given", True)
    assert lrs("cpu-small", dense_lr=0.004)[2:] == (8e-3, "given", False)  # swept from another dense LR


def test_a_seed_shares_sweep_is_reused_only_from_the_seed_it_needs(tmp_path, shards_dir):
    """A seed share's expert sweep branches from the 1x dense LR's seed: when that LR moved (the 1x sweep
    swept again), its finished sweep.json is not the answer any more; nor is a sweep of other shards
    (clusters fitted again)."""
    from elmforest.study.lrs import _finished

    cfg = load_study_config(
        "tiny", ["lr_grid=[1e-3, 2e-3, 4e-3, 8e-3]", "expert_lr_grid=[1e-3, 2e-3, 4e-3, 8e-3]"]
    )
    grid = sorted(cfg.expert_lr_grid)
    (tmp_path / "sweep.json").write_text(
        json.dumps({"experts": {"grid": grid, "seed_lr": 2e-3, "best_lr": 4e-3}})
    )
    assert _finished(tmp_path, True, cfg, dense=False, seed_lr=2e-3)["experts"]["best_lr"] == 4e-3
    assert _finished(tmp_path, True, cfg, dense=False, seed_lr=4e-3) is None
    assert _finished(tmp_path, True, cfg) is None  # a budget's sweep needs its dense arm too
    sh = Shards(shards_dir)
    for fingerprint, reused in ((sh.fingerprint, True), ("0123456789ab", False)):
        s = json.loads((tmp_path / "sweep.json").read_text())
        (tmp_path / "sweep.json").write_text(json.dumps({**s, "shards_fingerprint": fingerprint}))
        got = _finished(tmp_path, True, cfg, dense=False, seed_lr=2e-3, shards=str(shards_dir))
        assert (got is not None) == reused
    # a sweep.json from before the shards' content was recorded: reused (nothing to compare it with)
    s.pop("shards_fingerprint")
    (tmp_path / "sweep.json").write_text(json.dumps(s))
    assert _finished(tmp_path, True, cfg, dense=False, seed_lr=2e-3, shards=str(shards_dir)) is not None
    # a main budget's sweep cut between its dense arm and its second half is not finished
    (tmp_path / "sweep.json").write_text(json.dumps({"dense": {"grid": grid, "best_lr": 1e-3}}))
    assert _finished(tmp_path, False, cfg, main=True) is None
    (tmp_path / "sweep.json").write_text(
        json.dumps({"dense": {"grid": grid, "best_lr": 1e-3}, "dense_continue": {"best_lr": 2e-3}})
    )
    assert _finished(tmp_path, False, cfg, main=True)["dense_continue"]["best_lr"] == 2e-3


def test_the_lr_table_orders_budgets_then_fractions_domains_shares_and_cluster_sets():
    from elmforest.study.lrs import lrs_table

    r = {"dense_lr": 1e-3}
    keys = [
        "cbtm-k2-documents-data0.5",
        "share0.25",
        "domains2",
        "data0.25",
        "cbtm-k4-documents-data0.25",
        1.0,
        0.5,
    ]
    names = [row.split(" | ")[0][2:] for row in lrs_table({k: r for k in keys})[2:]]
    assert names == [
        "0.5x",
        "1x",
        "c-BTM, data 0.25 (0.25x)",
        "2 domains (1x)",
        "seed share 0.25 (1x)",
        "c-BTM k = 4 (documents), data 0.25 (0.25x)",
        "c-BTM k = 2 (documents), data 0.5 (0.5x)",
    ]


def test_a_study_sweep_of_other_data_is_refused_naming_its_folder(tmp_path, shards_dir):
    """`sweep` refused it naming `--out`, which `study` does not have."""
    from elmforest.study.lrs import check_same_shards

    where = tmp_path / "sweeps" / "cbtm-k2-bytes-data0.5" / "from-lr-0.002"
    check_same_shards(where, str(shards_dir))  # none there yet
    where.mkdir(parents=True)
    (where / "sweep.json").write_text(json.dumps({"shards_fingerprint": Shards(shards_dir).fingerprint}))
    check_same_shards(where, str(shards_dir))
    (where / "sweep.json").write_text(json.dumps({"shards_fingerprint": "0123456789ab"}))
    with pytest.raises(UserError, match=f"delete {where} to sweep it again"):
        check_same_shards(where, str(shards_dir))


def test_the_forests_curve_is_fitted_once_for_both_dense_arms(monkeypatch):
    """analyse bootstrapped the forest's curve (n_boot fits and a 150-start full fit) once in the table
    against dense and again, identically, in the one against dense_tuned."""
    from elmforest.study import analysis

    cfg = load_study_config("tiny", ["n_boot=100"])
    recs = []
    for arm, scale in (("dense", 1.0), ("dense_tuned", 0.99), ("btm", 0.97)):
        for budget in (0.5, 1, 2, 4):
            for seed in (0, 1):
                c = 1e12 * budget
                bpb = {
                    d: scale * (1.5 + 40 * c**-0.15) * (1 + 0.01 * seed + 0.02 * k)
                    for k, d in enumerate("ab")
                }
                recs.append(
                    {
                        "axis": "main",
                        "arm": arm,
                        "budget": budget,
                        "seed": seed,
                        "flops": c,
                        "bpb": bpb,
                        "ood_bpb": {d: 1.3 * v for d, v in bpb.items()},
                    }
                )
    calls = []
    real = analysis.bootstrap_fit
    monkeypatch.setattr(
        analysis, "bootstrap_fit", lambda runs, arm, **k: calls.append(arm) or real(runs, arm, **k)
    )
    fitted: dict = {}
    one = analysis.multiplier_table(recs, "bpb", cfg, fitted=fitted)
    two = analysis.multiplier_table(recs, "bpb", cfg, "dense_tuned", fitted)
    assert calls == ["dense", "btm", "dense_tuned"]
    fresh = real(analysis._runs(recs, "bpb"), "btm", n_boot=cfg.n_boot, ci=cfg.ci)
    assert one["arm_fits"]["btm"] == two["arm_fits"]["btm"] == fresh
    assert two["arm_fits"]["dense_tuned"] == real(
        analysis._runs(recs, "bpb"), "dense_tuned", n_boot=cfg.n_boot, ci=cfg.ci
    )
    ood = analysis.multiplier_table(recs, "ood_bpb", cfg, fitted=fitted)  # its own fits, not in-domain's
    want = real(analysis._runs(recs, "ood_bpb"), "btm", n_boot=cfg.n_boot, ci=cfg.ci)
    assert ood["arm_fits"]["btm"] == want != fresh
