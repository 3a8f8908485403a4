"""The scaling study: a config with a bad field is refused naming it; a tiny study on a small corpus runs
end to end (all three axes), survives a SIGKILL without retraining finished runs, writes every output,
and a rerun retrains and rescores nothing; the verdicts follow the intervals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_corpus

from elmforest.cli import main
from elmforest.study.analysis import findings, paired_gain, verdict
from elmforest.study.config import load_study_config
from elmforest.utils.errors import UserError


@pytest.mark.parametrize(
    "sets, named",
    [
        (["bogus=1"], "bogus"),
        (["dense_budgets=[1, 2, 4]"], "dense_budgets"),
        (["dense_budgets=[1, 2, 3, 4]"], "spanning >= 8x"),
        (["forest_budgets=[0.5, 1, 8]"], "forest_budgets"),
        (["seeds=[0]"], "seeds"),
        (["seed_share=1.5"], "seed_share"),
        (["n_boot=abc"], "n_boot"),
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


def test_verdicts_follow_the_intervals():
    assert verdict(1.1, 1.6, 1.0) == "holds"
    assert verdict(0.9, 1.6, 1.0) == "not shown"
    assert verdict(0.5, 0.9, 1.0) == "does not hold"
    gains = [
        {"n_domains": 2, "gain": 0.01, "ci": [0.0, 0.02]},
        {"n_domains": 8, "gain": 0.05, "ci": [0.04, 0.06]},
    ]
    cfg = load_study_config("tiny")
    assert findings({"domains": gains}, cfg)[0]["verdict"] == "holds"
    gains[1]["ci"] = [0.015, 0.08]  # overlaps the 2-domain interval
    assert findings({"domains": gains}, cfg)[0]["verdict"] == "not shown"


def test_paired_gain_by_hand():
    pairs = [({"a": 2.0, "b": 4.0}, {"a": 1.0, "b": 2.0}), ({"a": 2.0, "b": 4.0}, {"a": 1.0, "b": 2.0})]
    g = paired_gain(pairs, ["a", "b"], n_boot=100, ci=0.9)
    assert g["gain"] == pytest.approx(1.0) and g["ci"] == pytest.approx([1.0, 1.0])


def _study_cfg(tmp_path: Path) -> Path:
    corpus = make_corpus(tmp_path / "corpus", docs_per_domain=60)
    cfg = {
        "preset": "tiny",
        "corpus": str(corpus),
        "steps": 12,
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
def test_tiny_study_end_to_end_resumes_after_sigkill(tmp_path, capsys):
    cfg, out = _study_cfg(tmp_path), tmp_path / "out"
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
    study = json.loads((out / "study.json").read_text())
    fits = json.loads((out / "fits.json").read_text())
    arms = {(r["axis"], r["arm"]) for r in study["runs"]}
    assert arms == {
        ("main", "dense"),
        ("main", "btm"),
        ("domains", "dense"),
        ("domains", "btm"),
        ("share", "btm"),
        ("cbtm", "dense"),
        ("cbtm", "cbtm"),
    }
    cbtm = [(r["data_fraction"], r["k"], r["balance"]) for r in fits["cbtm"]]
    assert sorted(cbtm) == sorted((f, 2, b) for f in (0.25, 0.5, 1.0) for b in ("bytes", "documents"))
    for r in study["runs"]:  # every arm scored on the same test bytes, whatever data it trained on
        assert set(r["bpb"]) == set(r["domains"] if r["axis"] == "domains" else study["domains"])
    main_runs = [r for r in study["runs"] if r["axis"] == "main"]
    assert len(main_runs) == 4 * 2 + 3 * 2  # dense at 4 budgets, forests at 3, two seeds each
    for r in main_runs:  # the same bytes for every arm, FLOPs counted by what ran
        assert set(r["bpb"]) == set(study["domains"]) and r["flops"] > 0
    dense_1x = [r for r in main_runs if r["arm"] == "dense" and r["budget"] == 1.0]
    forest_1x = [r for r in main_runs if r["arm"] == "btm" and r["budget"] == 1.0]
    assert forest_1x[0]["flops"] == pytest.approx(dense_1x[0]["flops"], rel=0.01)  # compute-matched
    assert [m["budget"] for m in fits["in_domain"]["budgets"]] == [0.5, 1.0, 2.0]
    for m in fits["in_domain"]["budgets"]:
        assert m["status"] in ("ok", "above_range", "below_range", "unreachable") and len(m["ci"]) == 2
    assert [g["n_domains"] for g in fits["domains"]] == [2, 3]
    assert {s["seed_share"] for s in fits["seed_share"]} == {0.25, 0.5}
    report = (out / "report.md").read_text()
    assert "## Findings" in report and any(v in report for v in ("holds", "not shown", "does not hold"))
    assert all(
        (out / f).stat().st_size > 0 for f in ("curves.png", "multiplier.png", "domains.png", "cbtm.png")
    )
    assert any("c-BTM" in f["claim"] for f in fits["findings"])

    scores = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("study_scores.json")}
    assert main(argv) == 0  # all done: nothing trained, nothing rescored
    assert _summaries(out) == after
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("study_scores.json")} == scores

    assert main([*argv, "--analyse-only", "--set", "n_boot=150"]) == 0  # fits again from study.json
    assert json.loads((out / "fits.json").read_text())["n_boot"] == 150
    assert _summaries(out) == after

    assert main([*argv, "--set", "steps=20"]) == 2  # would change the runs already trained
    assert "steps" in capsys.readouterr().err
