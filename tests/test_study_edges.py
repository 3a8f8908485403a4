"""Study and training-config inputs a user tried that ran and printed something meaningless, or were
silently ignored: each is now refused naming the field, or said."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from elmforest.cli import main
from elmforest.model.presets import build_run_config, preset_run_config
from elmforest.study.config import load_study_config
from elmforest.study.report import write_report
from elmforest.utils.errors import UserError


def test_a_partial_run_config_with_a_preset_is_completed_by_that_preset(tmp_path, capsys):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"train": {"steps": 7}}))
    tiny, default = preset_run_config("tiny"), build_run_config(None, str(f))
    cfg = build_run_config("tiny", str(f))
    assert cfg.train.steps == 7 and default.train.steps == 7
    assert cfg.model == tiny.model and cfg.optim == tiny.optim  # the preset was used, not ignored
    assert cfg.model != default.model
    # without --preset the file is taken as given (a run started from it resumes), and that is said
    named = tmp_path / "named.json"
    named.write_text(json.dumps({"train": {"steps": 7}, "model": {"preset": "tiny"}}))
    capsys.readouterr()
    assert build_run_config(None, str(named)).train.batch_size == 16  # the built-in default, not tiny's 8
    err = capsys.readouterr().err
    assert "take elmforest's built-in defaults, not preset tiny's; add --preset tiny" in err
    full = tmp_path / "full.json"
    full.write_text(json.dumps(tiny.to_dict()))
    assert build_run_config(None, str(full)) == tiny and "leaves out" not in capsys.readouterr().err
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  steps: 5\n")
    with pytest.raises(UserError, match="a run config is JSON"):
        build_run_config(None, str(y))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"steps": "abc"}}))
    for preset in (None, "tiny"):  # the error names the file the user must edit
        with pytest.raises(UserError, match=r"--config .*bad.json: config.train.steps: expected an integer"):
            build_run_config(preset, str(bad))


def test_a_run_from_a_checkpoint_records_no_preset_architecture(tmp_path):
    """The checkpoint is the architecture: the preset's fields are not recorded as if they applied, and
    an architecture override, which could not apply, is refused."""
    from elmforest.config import ARCHITECTURE_FIELDS
    from elmforest.train.runcheck import run_identity

    cfg = build_run_config("tiny", init_from=str(tmp_path))
    assert all(getattr(cfg.model, k) is None for k in ARCHITECTURE_FIELDS)
    with pytest.raises(UserError, match="model.hidden_size, model.num_layers: a run from a checkpoint"):
        build_run_config(
            "tiny", init_from=str(tmp_path), overrides=["model.hidden_size=128", "model.num_layers=7"]
        )
    # a run started before this recorded the preset's fields: it still resumes as the same run
    old = preset_run_config("tiny").to_dict()
    old["model"]["init_from"] = str(tmp_path)
    assert run_identity(old) == run_identity(cfg.to_dict())


@pytest.mark.parametrize(
    "sets, named",
    [
        (["domains=[code]"], ">= 2 training domains"),
        (["domains=[code, code, legal]"], "name each domain once"),
        (["domains=[legal, legal]"], "name each domain once"),  # was "needs >= 2 training domains"
        (["n_boot=0"], "n_boot 0: must be >= 100"),  # one message named three fields
        (["eval_bytes=-1"], "eval_bytes -1: must be >= 1"),
        (["workers=0"], "workers 0"),
        (["overrides=[train.steps=5]"], "the study sets these"),
        (["overrides=[train.seed=3]"], "train.seed"),
        # a whole section went round these (every run would have started from that checkpoint)
        (["""overrides=['model={"init_from": "gpt2"}']"""], "model is a section"),
        (["overrides=[optim.nope=1]"], "unknown key 'optim.nope'"),
        (["overrides=[optim.lr=0.01]"], "dense_lr, expert_lr and dense_continue_lr"),
        # the study's domains: this one was set over for each run, silently
        (["overrides=['data.domains=[drama]']"], "the study sets these"),
        (["overrides=[train.init_checkpoint=x]"], "the study sets these"),
        # every run trained on the split the study scores (the experts copy the seed's config), or paused
        (["overrides=[data.split=test]"], "the study sets these"),
        (["overrides=[train.stop_at=2]"], "the study sets these"),
    ],
)
def test_study_fields_it_would_ignore_or_misread_are_refused(sets, named):
    with pytest.raises(UserError, match=named):
        load_study_config("tiny", sets)


@pytest.mark.parametrize(
    "sets, named",
    [
        (["domains=[news, nosuchdomain]"], "nosuchdomain"),
        (["ood=[/nonexistent/ood.jsonl]"], "/nonexistent/ood.jsonl"),
        (["sweep=/nonexistent/sweep.json"], "no such file"),
        (["domain_counts=[2, 16]"], "the corpus has 8"),
        # budgets that train the same steps (or fewer than 4) would each record a budget that never ran
        (["steps=16", "dense_budgets=[0.05, 0.1, 1, 2]"], "0.05x -> 4, 0.1x -> 4"),
        (["steps=8", "forest_budgets=[0.5, 1.0, 1.05]"], "1x -> 8, 1.05x -> 8"),
        (["steps=8", "dense_budgets=[0.5, 1, 2, 8]"], "cbtm_data: at 1x = 8 steps they train 0.25x -> 4"),
    ],
)
def test_dry_run_checks_what_the_study_would_refuse(capsys, sets, named):
    argv = ["study", "cpu", "--dry-run"] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and "'d0'" not in err


def test_dry_run_names_a_domain_count_past_the_corpus_before_the_batch(capsys):
    """tiny's batch of 8 does not divide among 16: --dry-run advised a batch of 16, which then met
    the real error (the corpus has 8 domains), as the study itself says first."""
    assert main(["study", "tiny", "--dry-run", "--set", "domain_counts=[16]"]) == 2
    err = capsys.readouterr().err
    assert "the corpus has 8" in err and "train.batch_size" not in err


def test_a_one_domain_corpus_is_refused_before_any_training(tmp_path, capsys):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "only.jsonl").write_text(
        "".join(json.dumps({"id": str(i), "text": f"document {i} " * 20}) + "\n" for i in range(200))
    )
    assert main(["study", "tiny", "--dry-run", "--set", f"corpus={corpus}"]) == 2
    assert "a forest needs >= 2" in capsys.readouterr().err
    assert (
        main(["study", "tiny", "--set", f"corpus={corpus}", "--out", str(tmp_path / "o"), "--no-progress"])
        == 2
    )
    assert "a forest needs >= 2" in capsys.readouterr().err
    assert not (tmp_path / "o" / "runs").exists()


def test_analyse_only_says_which_changes_it_leaves_for_a_full_run(tmp_path, monkeypatch):
    import elmforest.study.study as study

    cfg = load_study_config("tiny").to_dict()
    (tmp_path / "study.json").write_text(json.dumps({"config": {**cfg, "steps": 99}}))
    monkeypatch.setattr(study, "reanalyse", lambda out, log: {})
    lines = []
    study.run_study("tiny", tmp_path, ["n_boot=300"], analyse_only=True, log=lines.append)
    assert any("steps" in line and "need a full run" in line for line in lines)
    assert json.loads((tmp_path / "study.json").read_text())["config"]["n_boot"] == 300
    lines.clear()
    study.run_study("tiny", tmp_path, ["steps=99"], analyse_only=True, log=lines.append)
    assert not lines  # nothing but n_boot/ci differs: nothing to say
    turned = f"overrides={cfg['overrides'][::-1]}"  # the same settings in another order
    study.run_study("tiny", tmp_path, ["steps=99", turned], analyse_only=True, log=lines.append)
    assert not lines
    study.run_study(
        "tiny", tmp_path, ["steps=99", "overrides=[train.batch_size=8]"], analyse_only=True, log=lines.append
    )
    assert any("overrides" in line and "need a full run" in line for line in lines)
    # an older study recorded the LR it resolved in its config: a config leaving it to the preset is that
    lines.clear()
    (tmp_path / "study.json").write_text(
        json.dumps({"config": {**cfg, "steps": 99, "expert_lr": 0.008}, "expert_lr": 0.008})
    )
    study.run_study("tiny", tmp_path, ["steps=99"], analyse_only=True, log=lines.append)
    assert not lines
    study.run_study("tiny", tmp_path, ["steps=99", "expert_lr=0.004"], analyse_only=True, log=lines.append)
    assert any("expert_lr" in line and "need a full run" in line for line in lines)


def test_analyse_only_refuses_a_study_json_it_cannot_read(tmp_path):
    from elmforest.study.study import reanalyse

    cfg = load_study_config("tiny").to_dict()
    run = {"axis": "main", "arm": "dense", "budget": 1.0, "seed": 0, "flops": 1.0, "bpb": {"a": 1.0}}
    run |= {"seed_share": cfg["seed_share"], "n_domains": 1, "domains": ["a"], "data_fraction": 1.0}
    for study, named in (
        ({"config": {**cfg, "bogus": 1}, "runs": [run], "steps_1x": 16}, "bogus"),
        ({"config": cfg, "runs": [], "steps_1x": 16}, "no config or no runs"),
        (
            {"config": cfg, "runs": [{k: v for k, v in run.items() if k != "flops"}], "steps_1x": 16},
            "lacks flops",
        ),
    ):
        (tmp_path / "study.json").write_text(json.dumps(study))
        with pytest.raises(UserError, match=named):
            reanalyse(tmp_path, log=lambda *a: None)
    # a NaN BPB (strict JSON writes null) was a TypeError; a study with no forest run, one from plotting
    dense = [
        {**run, "budget": b, "seed": s, "flops": 1e12 * b, "bpb": {"a": 2.0 * b**-0.1 + 0.01 * s}}
        for b in (0.5, 1.0, 2.0, 4.0)
        for s in (0, 1)
    ]
    forest = [
        {
            **run,
            "arm": "btm",
            "budget": b,
            "seed": s,
            "flops": 1e12 * b,
            "bpb": {"a": 1.9 * b**-0.1 + 0.01 * s},
        }
        for b in (0.5, 1.0, 2.0)
        for s in (0, 1)
    ]
    forest[1]["bpb"] = {"a": None}
    fake = copy.deepcopy(forest)
    fake[2]["flops"] *= 2  # 1x labelled, 2x counted: the point would sit at the wrong place on the curve
    for runs, named in (
        (dense + forest, "its BPB on 'a' must be a positive finite number, got None"),
        (dense, r"main-axis points btm 0.5x seed 0, btm 0.5x seed 1, btm 1x seed 0, .* have no scored run"),
        (dense[2:] + forest, r"main-axis points dense 0.5x seed 0, dense 0.5x seed 1 have no scored run"),
        (
            dense + fake,
            r"run 10 \(btm, main axis, budget 1, seed 0\) counts 2e\+12 FLOPs; its budget is 1 x 1e\+12",
        ),
        (
            dense + [{**forest[0], "flops": "1e12"}],
            r"run 8 \(btm\): its flops '1e12' is not a positive number",
        ),
    ):
        (tmp_path / "study.json").write_text(json.dumps({"config": cfg, "runs": runs, "steps_1x": 16}))
        with pytest.raises(UserError, match=named):
            reanalyse(tmp_path, log=lambda *a: None)
    with pytest.raises(UserError, match="holds no scored forest run"):  # a study's own runs, none scored
        write_report(tmp_path, {"runs": dense}, {})


def test_a_second_study_in_the_same_folder_is_refused_at_once(tmp_path, capsys):
    """Two studies into one --out prepared the same data side by side and then both failed on the
    runs' locks; the second is now refused before it does anything."""
    import fcntl

    out = tmp_path / "o"
    out.mkdir()
    with open(out / ".study.lock", "a") as held:  # as the first study holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["study", "tiny", "--out", str(out), "--no-progress"]) == 2
        (out / "study.json").write_text("{}")
        assert main(["study", "tiny", "--out", str(out), "--analyse-only"]) == 2
    err = capsys.readouterr().err
    assert "another study is running in this folder; wait for it" in err
    assert "analyse it again once that one has finished" in err
    assert sorted(p.name for p in out.iterdir()) == [".study.lock", "study.json"]  # nothing prepared
    (empty := tmp_path / "empty").mkdir()
    assert main(["study", "tiny", "--out", str(empty), "--analyse-only"]) == 2  # no study there: no lock
    assert "no finished study" in capsys.readouterr().err and not any(empty.iterdir())


def test_a_dead_run_counts_as_diverged_in_a_sweep(tmp_path):
    """A sweep chose LR 80 as best: its loss had blown up to 2e6, then sat at ln(vocabulary) with a
    gradient norm of exactly 0, a BPB lower than the grid's other diverged points."""
    from elmforest.launch.sweep_results import dead

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 4, "loss": 2136797.0, "grad_norm": 9e9}, {"step": 8, "loss": 6.089, "grad_norm": 0.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "grad norm 0 at step 8" in dead(run)
    rows[-1]["grad_norm"] = 1e-3
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert dead(run) is None and dead(tmp_path / "nowhere") is None


def test_clusters_assigned_by_an_older_version_are_kept_with_a_note(corpus, tokenizer_dir, tmp_path, capsys):
    """An older version's balanced cap covered held-out documents too; a resumed study reused its
    assignment (and the experts trained on it) without a word."""
    from elmforest.study.cbtm import cluster_shards

    sh, _ = cluster_shards(tmp_path, corpus, tokenizer_dir, 1.0, 2, "documents", progress=False)
    assert "older elmforest" not in capsys.readouterr().err
    report = tmp_path / "clusters-k2-documents-data1" / "report.meta.json"
    old = json.loads(report.read_text())
    del old["balanced_split"]  # as an assignment written before the training-split cap
    report.write_text(json.dumps(old))
    again, _ = cluster_shards(tmp_path, corpus, tokenizer_dir, 1.0, 2, "documents", progress=False)
    assert again.root == sh.root and json.loads(report.read_text()) == old  # kept, not redone
    assert "was assigned by an older elmforest" in capsys.readouterr().err


def test_dry_run_refuses_an_ood_set_named_like_a_training_domain(tmp_path, capsys):
    """The study refuses it only after building the corpus and tokenizer; --dry-run said nothing."""
    from elmforest.corpora.demo import DEMO_DOMAINS

    name = sorted(DEMO_DOMAINS)[0]
    (tmp_path / f"{name}.jsonl").write_text('{"text": "a held-out document"}\n')
    (tmp_path / "fine.jsonl").write_text('{"text": "another"}\n')
    argv = ["study", "cpu", "--dry-run", "--set", f"ood=[{tmp_path / 'fine.jsonl'}, {tmp_path / name}.jsonl]"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"out-of-domain set(s) ['{name}'] share a name with a training domain" in err
    argv[-1] = f"ood=[{tmp_path / 'fine.jsonl'}]"
    assert main(argv) == 0


def test_a_diverged_dense_tuned_run_is_its_dense_run_said_so_and_not_trained_again(
    tmp_path, monkeypatch, capsys
):
    """The continuation at dense_continue_lr diverges at one point: the study finishes, that point's
    dense_tuned is its dense run (the run's own LR, a sweep grid's fallback) with the reason kept and
    said in the report; a rerun does not train it again; asking for another LR there is refused."""
    from elmforest.cli import main
    from elmforest.launch import jobs
    from elmforest.study import run as study_run

    real, calls = jobs.run_dense_continue, []

    def cont(job):
        calls.append(job["point"])
        if job["point"].endswith("b1-s1"):
            raise FloatingPointError("loss is nan at step 9; lower optim.lr?")
        return real(job)

    monkeypatch.setattr(study_run, "run_dense_continue", cont)
    from conftest import make_corpus

    cfg = load_study_config("tiny", ["domain_counts=[]", "seed_shares=[]", "cbtm_ks=[]"])
    cfg.corpus, cfg.steps, cfg.dense_continue_lr = (
        str(make_corpus(tmp_path / "corpus", docs_per_domain=60)),
        14,
        0.006,
    )
    cfg.overrides = ["train.batch_size=6", "train.seq_len=32", "train.ckpt_every=0", "train.valid_every=0"]
    cfg.workers, cfg.n_boot, cfg.eval_bytes, cfg.prior_batches = 1, 100, 2000, 2
    path = tmp_path / "study.json"
    path.write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "out"
    argv = ["study", str(path), "--out", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr()
    assert "b1-s1/dense-tuned at LR 0.006 diverged" in capsys.readouterr().out
    runs = json.loads((out / "study.json").read_text())["runs"]
    tuned = {(r["budget"], r["seed"]): r for r in runs if r["arm"] == "dense_tuned"}
    dense = {(r["budget"], r["seed"]): r for r in runs if r["arm"] == "dense"}
    bad = tuned[(1.0, 1)]
    assert bad["same_as"] == "dense" and "nan" in bad["diverged"] and bad["bpb"] == dense[(1.0, 1)]["bpb"]
    assert "diverged at its LR for 1 point(s) (b1-s1)" in (out / "report.md").read_text()
    # elsewhere dense_tuned is the better on valid of the dense run and its continuation
    won = []
    for k, r in tuned.items():
        if k != (1.0, 1):
            v = r["valid_mean_bpb"] if "same_as" not in r else r["lost_on_valid"]["valid_mean_bpb"]
            assert ("same_as" in r) == (v["continued"] >= v["dense"]) and "diverged" not in r
            won += [k] if "same_as" not in r else []
    assert won
    # a continuation that loses on valid is not the arm: the dense run is, and the report says so
    from elmforest.eval import bpb

    real_eval = bpb.evaluate_shards
    worse = _worse_on_valid_for_continuations(real_eval)

    point = Path(tuned[won[0]]["dir"])
    (point / "study_scores.json").unlink()
    monkeypatch.setattr(bpb, "evaluate_shards", worse)
    assert main(argv) == 0, capsys.readouterr()
    runs = json.loads((out / "study.json").read_text())["runs"]
    lost = next(r for r in runs if r["arm"] == "dense_tuned" and r["dir"] == str(point))
    assert lost["same_as"] == "dense" and lost["lost_on_valid"]["lr"] == 0.006
    assert lost["bpb"] == dense[won[0]]["bpb"] != tuned[won[0]]["bpb"]
    entries = json.loads((point / "study_scores.json").read_text())["entries"]
    assert "dense_tuned/valid" in entries and "dense_tuned/bpb" not in entries  # not scored on test
    assert entries["dense_tuned/valid"]["key"]["valid_bytes"] == "all"  # chosen as a sweep chooses
    assert (
        f"scored worse on valid than the dense run for 1 point(s) ({point.name} at LR 0.006"
        in (out / "report.md").read_text()
    )
    monkeypatch.setattr(bpb, "evaluate_shards", real_eval)
    n = calls.count(bad["dir"])
    assert main(argv) == 0 and calls.count(bad["dir"]) == n == 1  # the diverged point is not tried again
    cfg.dense_continue_lr = 0.004
    path.write_text(json.dumps(cfg.to_dict()))
    assert main(argv) == 2 and "delete that folder" in capsys.readouterr().err
    cfg.dense_continue_lr = 3e-3  # tiny's dense LR: no continuation asked for, the old mark is not news
    path.write_text(json.dumps(cfg.to_dict()))
    assert main(argv) == 0, capsys.readouterr()
    runs = json.loads((out / "study.json").read_text())["runs"]
    assert not any(r.get("diverged") for r in runs) and "diverged" not in (out / "report.md").read_text()
    # an analysis that fails (or is killed) leaves the last finished study.json, the runs beside it
    from elmforest.study import study as study_mod

    real_analyse, finished = study_mod.analyse, (out / "study.json").read_text()

    def broken(*a, **k):
        raise RuntimeError("the fit failed")

    monkeypatch.setattr(study_mod, "analyse", broken)
    with pytest.raises(RuntimeError, match="the fit failed"):
        main(argv)
    assert (out / "study.json").read_text() == finished  # --analyse-only still has it to work from
    assert len(json.loads((out / "study.partial.json").read_text())["runs"]) == len(runs)
    monkeypatch.setattr(study_mod, "analyse", real_analyse)
    assert main(argv) == 0 and not (out / "study.partial.json").exists()


def test_an_older_score_cache_is_reused_only_where_each_score_s_own_key_holds(tmp_path):
    """A study scored by an earlier version (one key for every score) is not scored again whole when one
    thing changes: a rebuilt out-of-domain set rescores the out-of-domain rows, a new routing the forest."""
    from types import SimpleNamespace

    from elmforest.study.run import Point
    from elmforest.study.score import ENSEMBLE, _entry_keys, _hit, _read_cache

    cfg = load_study_config("tiny", ["eval_bytes=100", "prior_batches=2"])
    (tmp_path / "sources.json").write_text(json.dumps({"revision": 3}))
    ood = SimpleNamespace(root=str(tmp_path), domains=["x"])
    p = Point("main", 1.0, 0, ("a",), 0.5, True, True)
    old_key = {"eval_bytes": 100, "prior_batches": 2, "seq_len": 32, "ood": ["x"], "routing": ENSEMBLE}
    old_key |= {
        "ood_sources": {"revision": 2},
        "arms": ["dense", "forest", "dense_tuned"],
        "dense_tuned_lr": 0.01,
    }
    s = {"flops": 1.0, "tokens": 2, "bpb": {"a": 1.5}, "ood_bpb": {"x": 4.0}}
    (tmp_path / "cache.json").write_text(
        json.dumps({"key": old_key, "scores": {"dense": s, "dense_tuned": {**s, "lr": 0.01}, "btm": s}})
    )
    entries = _read_cache(tmp_path / "cache.json")

    def hits(routing, tuned_lr):
        keys = _entry_keys(p, cfg, 32, ood, routing, tuned_lr)
        return {n for n, k in keys.items() if _hit(entries, n, k) is not None}, set(keys)

    got, wanted = hits(ENSEMBLE, 0.01)
    assert got == {"dense/bpb", "dense_tuned/bpb", "btm/bpb"}  # out of domain: other halves now
    assert wanted - got == {
        "dense/ood_bpb",
        "dense_tuned/ood_bpb",
        "btm/ood_bpb",
        "dense/valid",
        "dense_tuned/valid",
    }
    assert hits({"mode": "ensemble", "prior": "uniform"}, 0.01)[0] == {"dense/bpb", "dense_tuned/bpb"}
    assert hits(ENSEMBLE, 0.02)[0] == {"dense/bpb", "btm/bpb"}  # another continuation LR: another run
    assert not any(n.endswith("/valid") for n in _entry_keys(p, cfg, 32, ood, ENSEMBLE, 0.01, choose=False))
    (tmp_path / "sources.json").write_text(json.dumps({"revision": 2}))
    assert hits(ENSEMBLE, 0.01)[0] == {
        f"{a}/{s}" for a in ("dense", "dense_tuned", "btm") for s in ("bpb", "ood_bpb")
    }


def _worse_on_valid_for_continuations(real_eval):
    """evaluate_shards with every dense-tuned run made to lose on valid (its test scores untouched)."""

    def worse(model, shards, split="test", *a, **kw):
        r = real_eval(model, shards, split, *a, **kw)
        if split == "valid" and "dense-tuned" in model.config._name_or_path:
            r = {**r, "mean_bpb": r["mean_bpb"] + 5.0}
        return r

    return worse


@pytest.mark.slow
def test_untuned_continuations_that_all_lose_on_valid_are_kept_and_said(tmp_path, capsys, monkeypatch):
    """With no continuation LR of its own the expert LR stands in; when every such run loses on valid,
    dense_tuned is the dense run everywhere, but the arm and the report still say what was trained."""
    from conftest import make_corpus

    from elmforest.eval import bpb

    real_eval = bpb.evaluate_shards
    worse = _worse_on_valid_for_continuations(real_eval)

    monkeypatch.setattr(bpb, "evaluate_shards", worse)
    cfg = load_study_config("tiny", ["domain_counts=[]", "seed_shares=[]", "cbtm_ks=[]"])
    cfg.corpus = str(make_corpus(tmp_path / "corpus", docs_per_domain=40))
    cfg.steps, cfg.expert_lr, cfg.dense_continue_lr = 12, 0.006, None
    cfg.overrides = ["train.batch_size=6", "train.seq_len=32", "train.ckpt_every=0", "train.valid_every=0"]
    cfg.workers, cfg.n_boot, cfg.eval_bytes, cfg.prior_batches = 1, 100, 1500, 2
    path = tmp_path / "study.json"
    path.write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "out"
    assert main(["study", str(path), "--out", str(out), "--no-progress"]) == 0, capsys.readouterr()
    study = json.loads((out / "study.json").read_text())
    tuned = [r for r in study["runs"] if r["arm"] == "dense_tuned"]
    assert tuned and all(r["same_as"] == "dense" and r["lost_on_valid"]["lr"] == 0.006 for r in tuned)
    assert study["dense_continue_lr"] == 0.006
    assert (
        f"scored worse on valid than the dense run for {len(tuned)} point(s)"
        in (out / "report.md").read_text()
    )


def test_the_valid_choice_counts_a_non_finite_continuation_as_lost_and_keeps_one_with_nothing_to_choose_on():
    from elmforest.study.score import _continued_wins

    dense = {"dense/valid": {"mean": 3.0}}
    assert _continued_wins({**dense, "dense_tuned/valid": {"mean": 2.9}})
    assert not _continued_wins({**dense, "dense_tuned/valid": {"mean": 3.0}})  # a tie: the run's own LR
    assert not _continued_wins(
        {**dense, "dense_tuned/valid": {"mean": None, "diverged": "Diverged on valid"}}
    )
    assert _continued_wins({})  # no valid split: no choice, the continuation stands


def test_cbtm_gain_grows_only_when_no_k_at_the_least_data_could_reach_the_most_datas_best():
    """The best k at each end was compared by its point estimate alone: the dense run (0, no interval)
    won at the least data while k = 2 there reached +0.8%, and +0.5% [+0.1, +0.9] at all the data
    'held'."""
    from elmforest.study.analysis import _cbtm_findings

    def rows(low_k2, high_k4):
        return [
            {"balance": "bytes", "data_fraction": 0.25, "k": 2, "gain": low_k2[0], "ci": list(low_k2[1:])},
            {"balance": "bytes", "data_fraction": 1.0, "k": 4, "gain": high_k4[0], "ci": list(high_k4[1:])},
        ]

    def grows(r):
        return next(x for x in _cbtm_findings(r) if "gain over dense grows" in x["claim"])["verdict"]

    assert grows(rows((-0.001, -0.010, 0.008), (0.005, 0.001, 0.009))) == "not shown"
    assert grows(rows((-0.001, -0.010, 0.0005), (0.005, 0.001, 0.009))) == "holds"
    assert grows(rows((0.02, 0.015, 0.025), (-0.01, -0.02, -0.005))) == "does not hold"


def test_a_multipliers_interval_bound_shows_its_side_of_one():
    """[1.00, 1.24] was printed for 'holds' (1.004) and for 'not shown' (0.997)."""
    from elmforest.study.analysis import ci_bound

    assert [ci_bound(x) for x in (1.004, 0.997, 1.0, 1.2358, 0.5)] == [
        "1.004",
        "0.997",
        "1.00",
        "1.24",
        "0.50",
    ]
    assert float(ci_bound(1.00001)) > 1 and float(ci_bound(0.99999)) < 1


def test_a_score_made_on_another_device_or_precision_is_made_again(tmp_path, monkeypatch):
    """A study moved from a GPU (or a bf16 CPU) to this machine scores its points again here: its
    points would otherwise be compared across precisions. A score from before the field is kept."""
    from elmforest.study import score
    from elmforest.study.run import Point

    cfg = load_study_config("tiny", ["eval_bytes=100", "prior_batches=2"])
    p = Point("main", 1.0, 0, ("a",), 0.5, True, True)
    keys = score._entry_keys(p, cfg, 32, None, score.ENSEMBLE, None)
    assert {k["scored_on"] for k in keys.values()} == {score.scored_on()}
    entries = {n: {"key": k, "value": 1.0} for n, k in keys.items()}
    assert all(score._hit(entries, n, k) == 1.0 for n, k in keys.items())
    monkeypatch.setattr(score, "scored_on", lambda: "cuda/bfloat16")
    moved = score._entry_keys(p, cfg, 32, None, score.ENSEMBLE, None)
    assert all(score._hit(entries, n, k) is None for n, k in moved.items())
    older = {
        n: {"key": {f: v for f, v in k.items() if f != "scored_on"}, "value": 2.0} for n, k in keys.items()
    }
    assert all(score._hit(older, n, k) == 2.0 for n, k in moved.items())


def test_a_study_on_ray_without_ray_is_refused_before_its_data_is_prepared(tmp_path, capsys, monkeypatch):
    """The refusal came after the corpus, tokenizer and shards were built (30 s and 114 MB here)."""
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as where it is not installed
    assert main(["study", "tiny", "--out", str(tmp_path / "s"), "--executor", "ray", "--no-progress"]) == 2
    assert "needs Ray" in capsys.readouterr().err
    assert not (tmp_path / "s" / "data").exists()
    # the config's `workers` is the local executor's: taken, then dropped without a word on Ray
    argv = ["study", "tiny", "--out", str(tmp_path / "s"), "--executor", "ray", "--set", "workers=3"]
    assert main([*argv, "--no-progress"]) == 2
    assert "workers 3 (the study config's) is the local executor's" in capsys.readouterr().err
    assert not (tmp_path / "s" / "data").exists()
    from elmforest.launch.executor import job_threads

    assert job_threads("ray", 0.5, 1) == 1  # half a CPU: one thread, not 0 (never set)


def test_a_missing_tracker_package_is_said_once_before_any_data_or_run(tmp_path, capsys, monkeypatch):
    """Each job failed alone on it, after its run folder was written, every one with the same message."""
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)
    argv = ["study", "tiny", "--out", str(tmp_path / "s"), "--no-progress"]
    assert main([*argv, "--set", "overrides=['train.trackers=[mlflow]']"]) == 2
    err = capsys.readouterr().err
    assert err.count("train.trackers includes mlflow, but mlflow cannot be imported") == 1
    assert not (tmp_path / "s" / "data").exists()


def test_a_refused_config_does_not_bind_the_out_folder_to_itself(tmp_path, capsys):
    """study_config.json was written first: steps refused after the data was prepared, or a domain typo,
    left `--out` refusing the corrected config ("was started with other steps") with nothing trained."""
    out = tmp_path / "s"
    assert main(["study", "tiny", "--out", str(out), "--no-progress", "--set", "steps=4"]) == 2
    assert "dense_budgets" in capsys.readouterr().err
    assert not (out / "data").exists() and not (out / "study_config.json").exists()  # as --dry-run does
    corpus = tmp_path / "c.jsonl"
    rows = [
        {"id": f"{d}{i}", "domain": d, "text": f"{d} text {i} " * 30} for d in ("aa", "bb") for i in range(60)
    ]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["study", "tiny", "--out", str(out), "--no-progress", "--set", f"corpus={corpus}"]
    assert main([*argv, "--set", "domains=[aa, Bb]"]) == 2
    assert "Bb" in capsys.readouterr().err
    assert not (out / "study_config.json").exists()
    # a sweep.json of another run (4 steps) is refused before any run, and binds nothing either
    sweep = tmp_path / "sweep.json"
    arm = {"best_lr": 0.01, "seed_lr": 0.01}
    sweep.write_text(
        json.dumps(
            {
                "domains": ["aa", "bb"],
                "plan": {"total_steps": 4, "batch_size": 8},
                "dense": arm,
                "experts": arm,
            }
        )
    )
    assert main([*argv, "--set", f"sweep={sweep}"]) == 2
    assert (
        "tuned 4 steps x batch 8 on domains ['aa', 'bb']; this study's 1x run is 16"
        in capsys.readouterr().err
    )
    assert not (out / "study_config.json").exists() and not (out / "runs").exists()


def test_a_sweep_of_another_run_than_the_studys_1x_is_refused(tmp_path):
    from elmforest.study.lrs import sweep_matches as _sweep_matches

    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"domains": ["b", "a"], "plan": {"total_steps": 16, "batch_size": 8}}))
    _sweep_matches(path, ["a", "b"], 16, 8, "S")
    for args in ((["a", "b", "c"], 16, 8), (["a", "b"], 32, 8), (["a", "b"], 16, 4)):
        with pytest.raises(UserError, match=r"tuned 16 steps x batch 8 on domains \['a', 'b'\]; this study"):
            _sweep_matches(path, *args, "S")


def test_a_sweep_files_lrs_at_the_edge_of_their_grid_are_said_where_the_lrs_come_from(tmp_path):
    """A study's own sweeps flag a best LR at a grid's edge in the report; one given as a sweep.json
    file lost the flag (the report named only the file)."""
    from types import SimpleNamespace

    from elmforest.study.lrs import learning_rates as _learning_rates

    path = tmp_path / "sweep.json"
    arms = {
        "dense": {"best_lr": 0.002, "at_edge": "lowest"},
        "experts": {"best_lr": 0.008, "at_edge": None, "seed_lr": 0.002},
        "dense_continue": {"best_lr": 0.064, "at_edge": "highest", "seed_lr": 0.002},
    }
    path.write_text(json.dumps(arms))
    cfg = load_study_config("tiny", [])
    cfg.sweep = str(path)
    base = SimpleNamespace(optim=SimpleNamespace(lr=3e-3))
    dense, expert, cont, source, tuned = _learning_rates(cfg, base, {})
    assert (dense, expert, cont, tuned) == (0.002, 0.008, 0.064, True)
    assert source == (
        f"sweep {path}, the dense LR 0.002 at the lowest of its grid; the dense second half LR 0.064 at the "
        "highest of its grid: the optimum may lie outside it"
    )
    arms["dense"]["at_edge"] = arms["dense_continue"]["at_edge"] = None
    path.write_text(json.dumps(arms))
    assert _learning_rates(cfg, base, {})[3] == f"sweep {path}"


def test_the_studys_progress_lines_reach_its_output_while_the_driver_runs_a_job(tmp_path):
    """With one worker the driver runs each job itself, its fd 1 and sys.stdout pointed at the job's
    log meanwhile: the progress thread's lines went into whichever job.log was open."""
    import subprocess
    import sys

    script = (
        "import contextlib, sys\n"
        "from pathlib import Path\n"
        "from elmforest.launch.jobs import logged\n"
        "from elmforest.launch.jobs import driver_log as _driver_log\n"
        "print('before', flush=True)\n"
        "with contextlib.ExitStack() as stack:\n"
        "    log = _driver_log(stack)\n"
        "    logged(Path(sys.argv[1]), 'x', None, lambda f: log('study: 1/2 runs'))\n"
        "    log('after')\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "job")], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["before", "study: 1/2 runs", "after"]
    assert "study:" not in (tmp_path / "job" / "job.log").read_text()


def test_every_domain_count_point_trains_the_main_runs_batch():
    """The plan rounded each point's batch to its own n domains (tiny: 8 sequences at 8 domains, 4 at 2, 3
    at 3), so the gain against the number of domains compared forests of other budgets. Each point now
    trains the main 1x run's batch, and an n that cannot split it evenly is refused before any run."""
    from elmforest.config import apply_overrides
    from elmforest.model.presets import preset_run_config
    from elmforest.study.run import plan_batch, plan_points, point_plan

    names = [f"d{i}" for i in range(8)]
    cfg = load_study_config("tiny", ["domain_counts=[2, 4]"])
    base = apply_overrides(preset_run_config(cfg.preset, "."), list(cfg.overrides))
    base.train.batch_size = plan_batch(cfg, base, names)
    batches = {
        (p.axis, len(p.domains)): point_plan(cfg, base, p, 16)[0].batch_size for p in plan_points(cfg, names)
    }
    assert batches[("domains", 2)] == batches[("domains", 4)] == batches[("main", 8)] == 8
    cfg = load_study_config("tiny", ["domain_counts=[3]"])
    with pytest.raises(UserError, match="does not divide among domain_counts"):
        plan_batch(cfg, base, names)


def test_config_errors_are_one_line_naming_the_field_and_value(tmp_path, capsys):
    """PyYAML's own error quoted the source over six lines ("in <unicode string>", not the file); a
    negative budget named neither list nor value; a missing corpus gave its path alone."""
    cases = {
        "b.yaml": ("preset: tiny\nsteps: [16\n", "b.yaml: not valid YAML/JSON (expected ',' or ']'"),
        "d.yaml": (
            "preset: tiny\ndense_budgets: [-0.5, 1, 2, 4]\n",
            "dense_budgets holds -0.5: budgets must",
        ),
        "c.yaml": (
            f"preset: tiny\ncorpus: {tmp_path / 'none'}\n",
            f"corpus {tmp_path / 'none'}: no such file",
        ),
    }
    for name, (text, said) in cases.items():
        (tmp_path / name).write_text(text)
        assert main(["study", str(tmp_path / name), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
