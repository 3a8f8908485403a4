"""`elmforest sweep` over groups of domains (X-ELM): one expert per group, trained on the group's domains
mixed, each domain scored by the expert whose group holds it; several groupings share one dense arm."""

import json

import pytest
from conftest import tiny_config

from elmforest.cli import main
from elmforest.data.shards import Shards
from elmforest.eval.bpb import evaluate_shards
from elmforest.forest.manifest import Forest
from elmforest.launch.groupings import check_groupings, load_grouping, load_groupings, normalize
from elmforest.launch.sweep import format_sweep, sweep
from elmforest.model.build import load_model
from elmforest.utils.errors import UserError
from elmforest.utils.io import read_json

LRS, ELRS = [1e-3, 3e-3, 1e-2, 3e-2], [1e-3, 3e-3, 1e-2, 3e-2]
SEED_LR = 3e-3  # the expert arm alone, from this dense run (the dense arm is tested in test_protocol.py)
CFG = ["--set", "train.steps=6", "--set", "train.batch_size=5", "--set", "train.precision=fp32"]


def test_grouped_sweep_trains_one_expert_per_group_and_scores_each_domain_by_its_group(
    shards_dir, tmp_path, capsys
):
    sh = Shards(shards_dir)
    a, b, c = sh.domains
    # the quickstart's case: `c` is in the shards (like `por`, the language added later) but in no group
    groups = {"k2": {"x": [b], "y": [a]}, "k1": {"all": [b, a]}}
    base = tiny_config(shards_dir, steps=6, batch_size=5)
    lines = []
    kw = {"arm": "experts", "dense_lr": SEED_LR, "expert_lrs": ELRS, "groups": groups, "log": lines.append}
    res = sweep(shards_dir, tmp_path / "s", base, **kw)
    assert "experts" not in res and sorted(res["grouped"]) == ["k1", "k2"]
    # the batch splits evenly for every grouping (lcm of 2 and 1 experts), and the log says so
    assert res["plan"]["batch_size"] == 4 and res["plan"]["n_experts"] == 2
    assert any("dense batch 5 -> 4" in x for x in lines)
    assert any(
        x.startswith(f"note: {c} in ") and "in no group" in x for x in lines
    )  # said, not dropped silently
    # the dense run (and seed) mixes exactly the grouped domains, sorted, not every domain of the shards
    best = tmp_path / "s" / "dense" / f"lr-{SEED_LR:.3g}"
    assert res["domains"] == sorted([a, b])
    assert read_json(best / "runs" / "dense" / "run_config.json")["data"]["domains"] == sorted([a, b])
    # the expert arm alone branches from that run's seed: the rest of the dense run is not trained
    from elmforest.launch.jobs import dense_done

    assert not dense_done(best / "runs" / "dense") and any("its seed at LR" in x for x in lines)
    seq = base.train.seq_len
    full = {}  # (label, lr, domain) -> valid BPB on the whole split
    for label, grouping in groups.items():
        r = res["grouped"][label]
        # each group's domains in sorted order, whatever the file's: the order its expert mixes them in
        assert r["groups"] == {g: sorted(ms) for g, ms in grouping.items()}
        assert r["seed_lr"] == SEED_LR and r["max_bytes"] is None
        assert [p["lr"] for p in r["points"]] == ELRS
        assert r["best_lr"] == min(r["points"], key=lambda p: p["valid_mean_bpb"])["lr"]
        for p in r["points"]:
            f = Forest.load(tmp_path / "s" / f"experts-{label}" / f"lr-{p['lr']:.3g}")
            assert str(best) in f.data["seed"]["source"] and sorted(f.names) == sorted(grouping)
            for name, mix in grouping.items():
                assert sorted(f.expert(name)["domains"]) == sorted(mix)  # the manifest records its mix
                cfg = read_json(f.root / "runs" / name / "run_config.json")
                assert cfg["data"]["domains"] == sorted(mix) and cfg["optim"]["lr"] == p["lr"]
                assert cfg["train"]["batch_size"] == 4 // len(grouping)
            # brute force: each domain alone under the expert whose group holds it
            own = {d: name for name, mix in grouping.items() for d in mix}
            want = {
                d: evaluate_shards(load_model(f.expert_dir(own[d])), sh, "valid", [d], seq, progress=False)[
                    "mean_bpb"
                ]
                for d in (a, b)
            }
            assert p["domains"] == pytest.approx(want, rel=1e-6)
            assert p["valid_mean_bpb"] == pytest.approx(sum(want.values()) / 2, rel=1e-6)
            full.update({(label, p["lr"], d): v for d, v in want.items()})
    # the two-expert groups differ from one expert for all: the scores are not the same model's
    k1, k2 = (res["grouped"][x]["points"][0]["domains"][a] for x in ("k1", "k2"))
    assert k1 != pytest.approx(k2, rel=1e-9)
    text = format_sweep(res)
    assert (
        "experts k2 arm" in text
        and f"all = {', '.join(sorted([a, b]))}" in text
        and "best experts k1 LR" in text
    )

    # --eval-bytes: k2 alone rescored on the first n bytes (no training); k1 keeps its own record
    n = int(sh.documents(a, "valid")[:, 1].sum()) // 3
    part = sweep(shards_dir, tmp_path / "s", base, **{**kw, "groups": {"k2": groups["k2"]}, "max_bytes": n})
    assert part["grouped"]["k2"]["max_bytes"] == n and part["grouped"]["k1"]["max_bytes"] is None
    assert "max_bytes" not in part and f"first {n} valid bytes" in format_sweep(part)
    p = part["grouped"]["k2"]["points"][1]
    f = tmp_path / "s" / "experts-k2" / f"lr-{p['lr']:.3g}"
    model = load_model(Forest.load(f).expert_dir("y"))
    want = evaluate_shards(model, sh, "valid", [a], seq, max_bytes=n, progress=False)["mean_bpb"]
    assert p["domains"][a] == pytest.approx(want, rel=1e-6)
    assert want != pytest.approx(full["k2", p["lr"], a], rel=1e-6)  # n bytes are not the whole split
    assert read_json(f / "valid.json")["max_bytes"] == n
    # back to the whole split: rescored, not the cached n-byte scores
    again = sweep(shards_dir, tmp_path / "s", base, **{**kw, "groups": {"k2": groups["k2"]}})
    assert read_json(f / "valid.json")["max_bytes"] is None and again["grouped"]["k2"]["max_bytes"] is None
    assert again["grouped"]["k2"]["points"][1]["domains"][a] == pytest.approx(
        full["k2", p["lr"], a], rel=1e-6
    )

    # the command line: grouping files as `elmforest cluster languages` writes them, resumed with no training
    for label, grouping in groups.items():
        (tmp_path / f"{label}.json").write_text(json.dumps({"k": len(grouping), "groups": grouping}))
    seed_weights = Forest.load(best).seed_dir / "model.safetensors"
    stamp = seed_weights.stat().st_mtime_ns
    files = f"{tmp_path / 'k2.json'},{tmp_path / 'k1.json'}"
    argv = ["sweep", "--shards", str(shards_dir), "--out", str(tmp_path / "s"), "--groups", files]
    argv += ["--arm", "experts", "--dense-lr", str(SEED_LR), "--expert-lrs", ",".join(map(str, ELRS))]
    argv += ["--preset", "tiny", *CFG, "--json", str(tmp_path / "again.json"), "--no-progress"]
    capsys.readouterr()
    assert main(argv) == 0
    again = read_json(tmp_path / "again.json")
    for label in groups:
        assert again["grouped"][label]["best_lr"] == res["grouped"][label]["best_lr"]
    assert seed_weights.stat().st_mtime_ns == stamp and not dense_done(best / "runs" / "dense")
    assert "experts k1 arm" in capsys.readouterr().out
    # the same label with other groups is refused, not mixed with the points swept before
    with pytest.raises(UserError, match="was swept here"):
        sweep(shards_dir, tmp_path / "s", base, **{**kw, "groups": {"k2": {"x": [a, b]}}})
    # a seed planned for these groupings is not branched from by a sweep planned otherwise
    for other in ({"groups": None}, {"groups": {"k3": {"x": [a], "y": [b], "z": [c]}}}):
        with pytest.raises(UserError, match="planned by another sweep .*batch_size: 4 -> 6.*another --out"):
            sweep(shards_dir, tmp_path / "s", base, **{**kw, **other})
    assert sorted(read_json(tmp_path / "s" / "sweep.json")["grouped"]) == ["k1", "k2"]


def test_bad_groups_are_refused_before_any_work(shards_dir, tmp_path, capsys):
    a, b, c = Shards(shards_dir).domains
    base = tiny_config(shards_dir, steps=6, batch_size=4)
    bad = [
        ({"g": [a, b], "h": [b, c]}, f"domain '{b}' is in groups 'g' and 'h'"),
        ({"g": [a, a], "h": [b, c]}, f"domain '{a}' is twice"),
        ({"g": [a, b], "h": [c, "klingon"]}, r"unknown domain\(s\) \['klingon'\]"),
        ({"g": [a, b, c], "h": []}, "group 'h' is empty"),
        ({"k2": {"g": [a, b], "h": [c]}, "k1": {"all": [a, b]}}, rf"grouping 'k1' .* leaves out \['{c}'\]"),
        ({"g/..": [a, b, c]}, "group .g/... cannot name an expert"),
        ({"seed": [a, b, c]}, r"group 'seed' cannot name an expert \(.*reserved\); rename the group"),
        ({"g": a, "h": [b, c]}, f"group 'g' is not a list of domains: '{a}'"),
        ({"k2": {"g": [a], "h": b}}, f"grouping 'k2': group 'h' is not a list of domains: '{b}'"),
        ({"k 2": {"g": [a, b, c]}}, "grouping label 'k 2' .*rename the file"),
        ({}, "give"),
    ]
    for groups, msg in bad:
        with pytest.raises(UserError, match=msg):
            sweep(shards_dir, tmp_path / "s", base, lrs=LRS, groups=groups, log=None)
    assert not (tmp_path / "s").exists()
    # a grouping must split exactly the configured domains (data.domains), when they are given
    base.data.domains = [a, b]
    with pytest.raises(UserError, match=rf"adds \['{c}'\]"):
        sweep(shards_dir, tmp_path / "s", base, lrs=LRS, groups={"g": [a], "h": [b, c]}, log=None)
    # files named like the reserved expert names label their groupings (experts-seed/, ...) like any other
    for name in ("seed", "dense", "external"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"groups": {"g": [a, b], "h": [c]}}))
    named = normalize(load_groupings([tmp_path / f"{x}.json" for x in ("seed", "dense", "external")]))
    assert sorted(named) == ["dense", "external", "seed"]
    assert check_groupings(named, None, Shards(shards_dir)) == sorted([a, b, c])
    # files: a domain in two groups is refused by the loader, and on the command line without a traceback
    (tmp_path / "two.json").write_text(json.dumps({"groups": {"g": [a, b], "h": [b, c]}}))
    with pytest.raises(UserError, match="mapped to both"):
        load_grouping(tmp_path / "two.json")
    argv = ["sweep", "--shards", str(shards_dir), "--out", str(tmp_path / "s"), "--preset", "tiny"]
    assert main([*argv, "--groups", str(tmp_path / "two.json")]) == 2
    out = capsys.readouterr()
    assert "mapped to both" in out.err + out.out and "Traceback" not in out.err + out.out
    assert main([*argv, "--groups", str(tmp_path / "none.json")]) != 0
    assert not (tmp_path / "s").exists()


def test_a_grouping_file_with_the_users_language_codes_reads_as_the_shards_spell_them(tmp_path):
    """`cluster languages --langs de,fr,...` records `de` as an alias of `deu`: the loader listed both
    in the group, so the sweep refused the file on shards of either spelling."""
    f = tmp_path / "k2.json"
    f.write_text(
        json.dumps({"groups": {"g0": ["deu", "fra"], "g1": ["rus"]}, "aliases": {"de": "deu", "ru": "rus"}})
    )
    assert load_grouping(f, {"deu", "fra", "rus"}) == {"g0": ["deu", "fra"], "g1": ["rus"]}
    assert load_grouping(f, {"de", "fra", "ru"}) == {"g0": ["de", "fra"], "g1": ["ru"]}
    assert load_grouping(f) == {"g0": ["deu", "fra"], "g1": ["rus"]}


def test_a_sweep_score_made_on_another_device_or_precision_is_made_again(shards_dir, tmp_path, monkeypatch):
    """The sweep's valid.json was keyed without where it was scored: a sweep resumed on a CPU without
    bf16 (or a GPU) compared its new points with the old ones' bf16 scores. A score from before the key
    was recorded is taken as made here, as the study's cache takes it."""
    from elmforest.launch import sweep_results as sr

    monkeypatch.setattr(sr, "scored_on", lambda: "cpu/bfloat16")
    key = sr._key(Shards(shards_dir), ["code"], 32, 1000)
    assert key["scored_on"] == "cpu/bfloat16"
    path = tmp_path / "valid.json"
    scores = {"valid_mean_bpb": 3.0, "domains": {"code": 3.0}, "max_bytes": 1000}
    path.write_text(json.dumps({**scores, **key}))
    assert sr._cached(path, key) == scores
    monkeypatch.setattr(sr, "scored_on", lambda: "cpu/float32")
    assert sr._cached(path, sr._key(Shards(shards_dir), ["code"], 32, 1000)) is None
    path.write_text(json.dumps({**scores, **{k: v for k, v in key.items() if k != "scored_on"}}))
    assert sr._cached(path, sr._key(Shards(shards_dir), ["code"], 32, 1000)) == scores
