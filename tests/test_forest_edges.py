"""Forest, merge and generation inputs a user tried that crashed, were taken in silently or left the
forest inconsistent: each is now refused with a message naming the problem, or handled."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from elmforest.data.tokenizer import load_tokenizer
from elmforest.forest import btm
from elmforest.forest.commands import average, explicit_weights, summary_of
from elmforest.forest.generate import check_context, generate, sample_token
from elmforest.forest.manifest import Forest
from elmforest.merge.average import normalise
from elmforest.merge.moe_train import finetune_moe
from elmforest.utils.errors import AlreadyExists, NotFound, UserError


def _copy(forest_dir, tmp_path, root: str = "f") -> Forest:
    """A copy of the shared forest without the merges other tests recorded in it (the session's forest
    is merged by tests that run before or beside these, in whatever order xdist gives them)."""
    shutil.copytree(forest_dir, tmp_path / root, symlinks=True)
    f = Forest.load(tmp_path / root)
    f.update(lambda d: d.pop("outputs", None))
    return f


def _no_staging_left(f: Forest) -> bool:
    return not [p for p in (f.root / "experts").iterdir() if ".stage~" in p.name]


def test_a_top_p_below_float32s_smallest_number_keeps_the_top_token():
    mix = torch.log_softmax(torch.randn(50), -1)
    g = torch.Generator().manual_seed(0)
    assert sample_token(mix, 1.0, 1e-46, g) == int(mix.argmax())


def test_text_that_is_not_utf8_is_a_user_error(forest_dir):
    tok = load_tokenizer(Forest.load(forest_dir).expert_dir(Forest.load(forest_dir).names[0]))
    with pytest.raises(UserError, match="not valid UTF-8"):
        tok.encode_batch(["ab\udcffcd"])


def test_generation_past_the_models_positions_is_refused(forest_dir, capsys):
    with pytest.raises(UserError, match="past the model's 2048 positions"):
        generate(forest_dir, "word " * 10, max_new_tokens=2100, device="cpu")
    generate(forest_dir, "word", max_new_tokens=70, device="cpu", temperature=0)
    assert "past the 64-token context" in capsys.readouterr().err
    # the positions read: the prompt's and every new token but the last (the server counts the same)
    expert = Forest.load(forest_dir).expert_dir(Forest.load(forest_dir).names[0])
    check_context(expert, 1, 2048)
    with pytest.raises(UserError, match="read 2049 positions"):
        check_context(expert, 1, 2049)
    capsys.readouterr()
    check_context(expert, 2, 63)
    assert "note" not in capsys.readouterr().err
    check_context(expert, 2, 64)
    assert "65 tokens is past the 64-token context" in capsys.readouterr().err


def test_a_prior_given_as_weights_reads_as_evaluation_reads_it(forest_dir):
    """An expert the prior does not name has no weight (it had 1.0, as much as one named); a name that is
    not an expert, or weights that are no distribution, are refused."""
    names = Forest.load(forest_dir).names
    one = generate(forest_dir, "word", max_new_tokens=3, device="cpu", temperature=0, prior={names[0]: 1.0})
    assert one.weights[-1] == pytest.approx({n: float(n == names[0]) for n in names})
    for bad in ({"nobody": 1.0}, {names[0]: -1.0}, {names[0]: 0.0}):
        with pytest.raises(UserError, match="prior"):
            generate(forest_dir, "word", max_new_tokens=1, device="cpu", prior=bad)


@pytest.mark.parametrize("damage", ["missing", "garbage", "reshaped", "nan"])
def test_forest_add_checks_the_weights_not_only_the_config(forest_dir, tmp_path, damage):
    f = _copy(forest_dir, tmp_path)
    src = tmp_path / "ext"
    shutil.copytree(f.expert_dir(f.names[0]), src)
    w = src / "model.safetensors"
    if damage == "missing":
        w.unlink()
    elif damage == "garbage":
        w.write_text("garbage\n")
    else:
        t = load_file(w)
        k = next(k for k in t if "embed_tokens" in k)
        t[k] = (
            t[k][:10].clone()
            if damage == "reshaped"
            else t[k].clone().index_fill_(0, torch.tensor([3]), float("nan"))
        )
        save_file(t, w, metadata={"format": "pt"})
    with pytest.raises((UserError, NotFound)) as e:
        f.add(src, "ext", ["x"])
    assert str(src) in str(e.value)
    if damage == "reshaped":
        assert "do not fit the forest" in str(e.value) and "embed_tokens" in str(e.value)
    if damage == "nan":  # it broke every ensemble, average and merge of the forest after being added
        assert "non-finite values" in str(e.value) and "embed_tokens" in str(e.value)
    assert "ext" not in Forest.load(f.root).names and _no_staging_left(f)


@pytest.mark.parametrize("harm", ["truncated", "same_size_garbage"])
def test_a_damaged_expert_in_the_forest_does_not_refuse_a_sound_newcomer(forest_dir, tmp_path, harm):
    f = _copy(forest_dir, tmp_path)
    src = tmp_path / "ext"
    shutil.copytree(f.expert_dir(f.names[1]), src)
    w = f.expert_dir(f.names[0]) / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[:100] if harm == "truncated" else bytes(8) + data[8:])
    f.add(src, "ext", ["x"])  # the first expert is no reference; the next sound one is
    assert "ext" in Forest.load(f.root).names


def test_the_finiteness_check_reads_fp8_weights(tmp_path):
    from elmforest.forest.trust import check_finite
    from elmforest.utils.errors import NonFiniteWeights

    d = tmp_path / "fp8"
    d.mkdir()
    (d / "config.json").write_text("{}")
    t = torch.linspace(-2, 2, 16).to(torch.float8_e4m3fn)
    save_file({"w": t}, d / "model.safetensors")
    check_finite(d)  # torch.isfinite has no float8 kernel: it raised a RuntimeError
    save_file({"w": torch.full((4,), float("nan")).to(torch.float8_e4m3fn)}, d / "model.safetensors")
    with pytest.raises(NonFiniteWeights):
        check_finite(d)


def _weights(d, tied: bool, **tensors):
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"tie_word_embeddings": tied}))
    save_file({k: torch.zeros(v) for k, v in tensors.items()}, d / "model.safetensors")
    return d


def test_a_tied_output_head_may_be_saved_or_not(tmp_path):
    from elmforest.forest.trust import check_weights

    ref = _weights(tmp_path / "ref", True, **{"model.embed_tokens.weight": (8, 4)})
    src = _weights(tmp_path / "src", True, **{"model.embed_tokens.weight": (8, 4), "lm_head.weight": (8, 4)})
    check_weights(src, [ref])
    bad = _weights(tmp_path / "bad", True, **{"model.embed_tokens.weight": (9, 4)})
    with pytest.raises(UserError, match="embed_tokens"):
        check_weights(bad, [ref])
    untied = _weights(tmp_path / "untied", False, **{"model.embed_tokens.weight": (8, 4)})
    with pytest.raises(UserError, match="lm_head"):
        check_weights(
            untied,
            [
                _weights(
                    tmp_path / "ref2",
                    False,
                    **{"model.embed_tokens.weight": (8, 4), "lm_head.weight": (8, 4)},
                )
            ],
        )


def test_a_refused_average_keeps_an_earlier_record_of_that_path(forest_dir, tmp_path):
    f = _copy(forest_dir, tmp_path)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_text("an earlier MoE's weights")
    f.record_output(out, "moe", f.names)
    with pytest.raises(AlreadyExists):
        average(f, str(out))
    assert [(o["path"], o["kind"]) for o in Forest.load(f.root).data["outputs"]] == [
        (str(out.resolve()), "moe")
    ]


@pytest.mark.parametrize(
    "summary, match",
    [([1, 2], "expected a JSON object"), ({"tokens": "abc"}, "tokens: expected a non-negative number")]
    + [
        ({"tokens": 5, "flops": v}, "flops: expected a non-negative number")
        for v in (float("nan"), -5, 1e400)
    ],
)
def test_forest_add_refuses_a_malformed_summary_and_leaves_nothing(forest_dir, tmp_path, summary, match):
    f = _copy(forest_dir, tmp_path)
    src = tmp_path / "ext"
    shutil.copytree(f.expert_dir(f.names[0]), src)
    (src / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(UserError, match=match):
        s = summary_of(src)
        f.add(src, "ext", ["x"], tokens=s.get("tokens", 0), flops=s.get("flops", 0))
    assert "ext" not in Forest.load(f.root).names and _no_staging_left(f)
    assert not (f.root / "experts" / "ext").exists()


@pytest.mark.parametrize("text", ["{bad", "[]"])
def test_a_malformed_config_json_is_named(forest_dir, tmp_path, text):
    f = _copy(forest_dir, tmp_path)
    src = tmp_path / "ext"
    shutil.copytree(f.expert_dir(f.names[0]), src)
    (src / "config.json").write_text(text)
    with pytest.raises(UserError, match="config.json"):
        f.add(src, "ext", ["x"])


def test_forest_add_needs_a_domain(forest_dir, tmp_path, capsys):
    f = _copy(forest_dir, tmp_path)
    with pytest.raises(UserError, match="at least one domain"):
        f.add(f.expert_dir(f.names[0]), "ext", [""])
    with pytest.raises(UserError, match="each domain once"):
        f.add(f.expert_dir(f.names[0]), "ext", ["code", "code"])
    # a checkpoint with no training record is added, and the user is told the ledger counts it as 0
    from elmforest.cli import main

    src = tmp_path / "hf"
    shutil.copytree(f.expert_dir(f.names[0]), src)
    assert main(["forest", "add", "--forest", str(f.root), "--expert", str(src), "--domain", "x"]) == 0
    assert "no training record" in capsys.readouterr().err and Forest.load(f.root).expert("x")["flops"] == 0


def test_a_same_size_corruption_is_retrained_not_taken_as_done(forest_dir, shards_dir, tmp_path):
    from elmforest.data.shards import Shards

    f = _copy(forest_dir, tmp_path)
    name = f.names[0]
    w = f.expert_dir(name) / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    assert "checksum mismatch" in f.intact(name, deep=True)
    btm.train_expert(f, Shards(shards_dir), f.expert(name)["domains"][0], progress=False)
    assert Forest.load(f.root).intact(name, deep=True) is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "flip, no checkpoint kept"])
def test_a_damaged_expert_sharing_its_files_with_its_run_is_rebuilt_not_re_recorded(
    forest_dir, shards_dir, tmp_path, damage, capsys
):
    """The expert's weights are hard links to its run's final model: a flipped byte in one is in both,
    and "restoring" from the run recorded the damaged file's checksum as the expert's (a truncated one
    failed, while fsck kept advising the same restore)."""
    from elmforest.data.shards import Shards

    f = _copy(forest_dir, tmp_path)
    name = f.names[0]
    recorded = f.expert(name)["files"]
    before = {k: v.clone() for k, v in load_file(str(f.expert_dir(name) / "model.safetensors")).items()}
    for w in (
        f.expert_dir(name) / "model.safetensors",
        f.root / "runs" / name / "model" / "model.safetensors",
    ):
        data = bytearray(w.read_bytes())
        if damage.startswith("flip"):
            data[len(data) // 2] ^= 0xFF
        w.write_bytes(bytes(data if damage.startswith("flip") else data[: len(data) // 2]))
    if damage.endswith("kept"):  # train.keep_checkpoints=0: the run is trained again from the seed
        shutil.rmtree(f.root / "runs" / name / "checkpoints")
    btm.train_expert(f, Shards(shards_dir), f.expert(name)["domains"][0], progress=False)
    said = (
        "training the run again from its start (the seed)"
        if damage.endswith("kept")
        else "from its last checkpoint"
    )
    assert said in capsys.readouterr().out
    g = Forest.load(f.root)
    assert g.intact(name, deep=True) is None and g.expert(name)["files"] == recorded
    after = load_file(str(g.expert_dir(name) / "model.safetensors"))
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_resuming_reads_only_the_files_changed_since_their_sums_last_matched(
    forest_dir, tmp_path, monkeypatch
):
    import os

    from elmforest.forest import digests

    f = _copy(forest_dir, tmp_path)
    (f.root / digests.CACHE).unlink(missing_ok=True)  # the shared forest's, from tests that scored it
    name = f.names[0]
    reads = []
    real = digests.file_digest
    monkeypatch.setattr(digests, "file_digest", lambda p: reads.append(p) or real(p))
    monkeypatch.setattr(digests, "RACY_NS", 10**15)  # as if just written, however slow the copy was
    assert f.intact(name, deep=True, trust_unchanged=True) is None and len(reads) == 1
    # just written: its timestamps are too recent to tell a later change apart, so nothing is cached
    assert not (f.root / digests.CACHE).exists()
    assert f.intact(name, deep=True, trust_unchanged=True) is None and len(reads) == 2
    monkeypatch.setattr(digests, "RACY_NS", -(10**12))  # as if the copy were old
    assert f.intact(name, deep=True) is None and len(reads) == 3  # fsck's check reads, and caches
    assert f.intact(name, deep=True, trust_unchanged=True) is None and len(reads) == 3  # not read
    assert f.intact(name, deep=True) is None and len(reads) == 4  # fsck always reads every byte
    # changed in place, same size: the stat differs, so the resume reads it and sees the change
    w = f.expert_dir(name) / "model.safetensors"
    before = w.stat().st_mtime_ns
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    os.utime(w, ns=(before + 10**9, before + 10**9))  # a coarse clock could have kept the old mtime
    assert "checksum mismatch" in f.intact(name, deep=True, trust_unchanged=True) and len(reads) == 5
    assert f"{f.expert(name)['path']}/model.safetensors" not in json.loads(
        (f.root / digests.CACHE).read_text()
    )
    # a damaged cache is only a reason to read the files again
    (f.root / digests.CACHE).write_text("{not json")
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    assert f.intact(name, deep=True, trust_unchanged=True) is None and len(reads) == 6
    # opted out, nothing of the expert stays: its cached sums go too
    from elmforest.forest.optout import remove_expert

    assert any(k.startswith(f"experts/{name}/") for k in json.loads((f.root / digests.CACHE).read_text()))
    remove_expert(f, name)
    assert not any(k.startswith(f"experts/{name}/") for k in json.loads((f.root / digests.CACHE).read_text()))


def test_init_racing_another_process_never_writes_over_its_forest(tmp_path, monkeypatch):
    """Two jobs calling Forest.init(exist_ok=True) at once: both saw no forest.json, and the later one
    wrote an empty manifest over the entries the other had added meanwhile."""
    from pathlib import Path

    Forest.init(tmp_path / "f").update(lambda d: d.update(marker="theirs"))
    real, seen = Path.exists, []

    def late(self):  # the first look happened before the other process made the forest
        if self.name == "forest.json" and not seen:
            seen.append(self)
            return False
        return real(self)

    monkeypatch.setattr(Path, "exists", late)
    f = Forest.init(tmp_path / "f", exist_ok=True)
    monkeypatch.undo()
    assert seen and f.data.get("marker") == "theirs" == Forest.load(tmp_path / "f").data.get("marker")
    seen.clear()
    monkeypatch.setattr(Path, "exists", late)
    with pytest.raises(FileExistsError, match="already holds a forest"):
        Forest.init(tmp_path / "f")


def test_huge_finite_weights_are_not_a_zero_model():
    assert normalise([1e308, 1e308, 0.0], 3) == [0.5, 0.5, 0.0]
    for bad in ([math.inf, 1.0], [math.nan, 1.0]):  # not a NaN model
        with pytest.raises(UserError, match="finite non-negative"):
            normalise(bad, 2)
    with pytest.raises(UserError, match="nothing to merge"):
        normalise(None, 0)
    assert explicit_weights("a=1e308,b=1e308", ["a", "b", "c"]) == [1.0, 1.0, 0.0]
    with pytest.raises(UserError, match="given twice"):
        explicit_weights("a=1,a=2", ["a", "b"])


def test_a_failed_average_is_not_recorded_as_an_output(forest_dir, tmp_path):
    f = _copy(forest_dir, tmp_path)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("not a merge")
    with pytest.raises(AlreadyExists):  # refused: not an earlier output of this command
        average(f, str(tmp_path / "foreign"))
    with pytest.raises(UserError, match="--scale applies to task_arithmetic and ties"):
        average(f, str(tmp_path / "x"), scale=5.0)
    empty = Forest.init(tmp_path / "empty")
    with pytest.raises(UserError, match="no experts to average"):
        average(empty, str(tmp_path / "y"))
    assert Forest.load(f.root).data.get("outputs", []) == []
    assert (tmp_path / "foreign" / "keep.txt").is_file()
    average(f, str(tmp_path / "avg"))
    assert [o["path"] for o in Forest.load(f.root).data["outputs"]] == [str((tmp_path / "avg").resolve())]


def test_merge_finetune_of_a_dense_model_says_what_it_needs(forest_dir, shards_dir, tmp_path):
    f = Forest.load(forest_dir)
    with pytest.raises(UserError, match="not a merged MoE"):
        finetune_moe(f.expert_dir(f.names[0]), shards_dir, 2, out=tmp_path / "o")


def test_a_manifest_without_optional_keys_lists(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "forest.json").write_text(json.dumps({"version": 1, "experts": []}))
    assert "0 expert(s)" in Forest.load(tmp_path / "q").describe()


def test_a_served_forest_says_what_eval_says_of_its_mode(forest_dir, tmp_path, capsys):
    """serve's topk with --experts B,A kept B (the order given) while its note said the forest's order;
    a k past the experts and an average of experts trained elsewhere were said by eval, not by serve."""
    import shutil

    from elmforest.forest.lm import open_lm

    names = Forest.load(forest_dir).names
    lm = open_lm(forest_dir, mode="topk", k=1, experts=[names[1], names[0]], device="cpu")
    assert lm.names == [names[0]] and f"forest's order ({names[0]})" in capsys.readouterr().err
    assert open_lm(forest_dir, mode="topk", k=9, device="cpu").names == names
    assert f"k=9 is more than the {len(names)} experts" in capsys.readouterr().err
    open_lm(forest_dir, mode="topk", k=len(names), device="cpu")
    assert "more than" not in capsys.readouterr().err
    shutil.copytree(forest_dir, tmp_path / "f")
    m = json.loads((tmp_path / "f" / "forest.json").read_text())
    m["experts"][0]["parents"] = [{"name": "external", "weight": 1.0}]
    (tmp_path / "f" / "forest.json").write_text(json.dumps(m))
    open_lm(tmp_path / "f", mode="average", device="cpu")
    assert f"warning: averaging {names[0]}, trained elsewhere" in capsys.readouterr().err


def test_a_k_above_the_number_of_experts_is_said(forest_dir, shards_dir, capsys):
    from elmforest.data.shards import Shards
    from elmforest.forest.evaluate import evaluate_forest_shards

    f, s = Forest.load(forest_dir), Shards(shards_dir)
    kw = dict(mode="topk", seq_len=32, max_bytes=300, prior_batches=1, domains=s.domains[:1])
    many = evaluate_forest_shards(f, s, k=len(f.names) + 2, **kw)
    assert f"more than the forest's {len(f.names)} experts" in capsys.readouterr().err
    every = evaluate_forest_shards(f, s, k=len(f.names), **kw)
    assert "more than" not in capsys.readouterr().err
    assert json.dumps(many, sort_keys=True, default=str) == json.dumps(every, sort_keys=True, default=str)


def test_cluster_k_counts_clusters_where_one_expert_serves_several(
    forest_dir, clusterer_dir, shards_dir, tmp_path, capsys
):
    """--k was capped at the number of experts: with one expert serving two of three clusters, `--k 3`
    became top-2 clusters (not c-BTM's dense mixture over all three), said as 'every expert is used'."""
    from elmforest.data.shards import Shards
    from elmforest.forest.evaluate import evaluate_forest_shards

    src = Forest.load(forest_dir)
    f = Forest.init(tmp_path / "f")
    f.set_clusterer(clusterer_dir)
    f.add(src.expert_dir(src.names[0]), "c01", ["cluster0", "cluster1"])
    f.add(src.expert_dir(src.names[1]), "cluster2", ["cluster2"])
    s = Shards(shards_dir)
    kw = dict(mode="cluster", seq_len=32, max_bytes=300, domains=s.domains[:1])
    two, three = (evaluate_forest_shards(f, s, k=k, **kw) for k in (2, 3))
    assert "more than" not in capsys.readouterr().err
    more = evaluate_forest_shards(f, s, k=5, **kw)
    assert "--k 5 is more than the 3 clusters with an expert" in capsys.readouterr().err
    assert two["mean_bpb"] != three["mean_bpb"]  # all three clusters weigh in at k=3
    assert (three["k"], more["k"]) == (3, 3) and more["mean_bpb"] == three["mean_bpb"]
    # the reference: the same expert registered once per cluster it serves, c-BTM's top-k over clusters
    ref = Forest.init(tmp_path / "ref")
    ref.set_clusterer(clusterer_dir)
    for j, n in enumerate([src.names[0], src.names[0], src.names[1]]):
        ref.add(src.expert_dir(n), f"cluster{j}", [f"cluster{j}"])
    for k, got in ((2, two), (3, three)):
        want = evaluate_forest_shards(ref, s, k=k, **kw)
        assert abs(got["mean_bpb"] - want["mean_bpb"]) < 1e-5, (k, got["mean_bpb"], want["mean_bpb"])


def test_the_ledger_counts_router_training_and_every_output_that_ran(forest_dir, shards_dir, tmp_path):
    from elmforest.cli import main

    f = _copy(forest_dir, tmp_path)
    out = tmp_path / "moe"
    argv = ["merge", "moe", "--forest", str(f.root), "--out", str(out), "--train-router", "--steps", "2"]
    argv += ["--batch-size", "2", "--train-data", str(shards_dir), "--no-routing", "--no-progress"]
    assert main(argv) == 0
    rt = json.loads((out / "elmforest_moe.json").read_text())["router_training"]
    rows = [r for r in Forest.load(f.root).data.get("ledger", []) if r["phase"] == "router_training"]
    assert [(r["flops"], r["output"]) for r in rows] == [(rt["flops"], str(out.resolve()))] and rt[
        "flops"
    ] > 0
    for where, flops in (("a", 3.0), ("b", 5.0), ("b", 7.0)):  # two outputs named ft; b's rerun replaces b's
        f.record_phase(
            {
                "phase": "btx_finetuning",
                "name": "ft",
                "tokens": 1,
                "flops": flops,
                "output": str(tmp_path / where / "ft"),
            }
        )
    ft = [r["flops"] for r in Forest.load(f.root).data["ledger"] if r["phase"] == "btx_finetuning"]
    assert ft == [3.0, 7.0]


def test_a_copied_folder_rerun_replaces_the_originals_ledger_row(forest_dir, tmp_path):
    """`cp -a qs qs2` and a rerun in qs2: its MoE's fine-tuning is counted once, not once per copy; a row
    written before the relative place was kept is tied to its output through the output's card."""
    import shutil

    for legacy in (False, True):
        top = tmp_path / ("legacy" if legacy else "new")
        f = _copy(forest_dir, top)
        (top / "ft").mkdir()
        (top / "ft" / "elmforest_moe.json").write_text(json.dumps({"forest": str(f.root.resolve())}))
        f.record_phase(
            {"phase": "btx_finetuning", "name": "ft", "tokens": 1, "flops": 3.0, "output": str(top / "ft")}
        )
        if legacy:
            f.update(lambda d: [r.pop("relative") for r in d["ledger"]])
        shutil.copytree(top, tmp_path / "copy", symlinks=True)
        g = Forest.load(tmp_path / "copy" / f.root.name)
        g.record_phase(
            {
                "phase": "btx_finetuning",
                "name": "ft",
                "tokens": 1,
                "flops": 5.0,
                "output": str(tmp_path / "copy" / "ft"),
            }
        )
        rows = [(r["flops"], r["output"]) for r in Forest.load(g.root).data["ledger"]]
        assert rows == [(5.0, str((tmp_path / "copy" / "ft").resolve()))], legacy
        assert [r["flops"] for r in Forest.load(f.root).data["ledger"]] == [3.0]  # the original's is its own
        g.drop_phases(tmp_path / "copy" / "ft")
        assert Forest.load(g.root).data["ledger"] == []
        shutil.rmtree(tmp_path / "copy")
    # a forest moved without its outputs (they sit outside it) still finds them where they were written
    f = _copy(forest_dir, tmp_path / "stay")
    (tmp_path / "stay" / "moe").mkdir()
    f.record_phase(
        {
            "phase": "btx_finetuning",
            "name": "moe",
            "tokens": 1,
            "flops": 3.0,
            "output": str(tmp_path / "stay" / "moe"),
        }
    )
    shutil.move(f.root, tmp_path / "moved")
    m = Forest.load(tmp_path / "moved")
    m.record_phase(
        {
            "phase": "btx_finetuning",
            "name": "moe",
            "tokens": 1,
            "flops": 5.0,
            "output": str(tmp_path / "stay" / "moe"),
        }
    )
    assert [r["flops"] for r in Forest.load(m.root).data["ledger"]] == [5.0]  # not counted twice
    m.drop_phases(tmp_path / "stay" / "moe")
    assert Forest.load(m.root).data["ledger"] == []


def test_opting_out_of_a_copied_forest_moves_its_copys_compute_not_the_originals(forest_dir, tmp_path):
    """A forest copied with its merged MoE (`cp -a qs qs2`): opting an expert out of the copy deletes the
    copy's MoE, so the copy's ledger row of that MoE's fine-tuning (which names the original's path)
    moves to the tombstone; the original keeps its MoE and its row."""
    from elmforest.forest.optout import remove_expert
    from elmforest.merge.moe import MoeSpec, export_moe

    top = tmp_path / "qs"
    f = _copy(forest_dir, top)
    moe = export_moe(f, top / "moe", MoeSpec(router="random"), device="cpu")
    f.record_phase({"phase": "btx_finetuning", "name": "moe", "tokens": 1, "flops": 3.0, "output": str(moe)})
    shutil.copytree(top, tmp_path / "qs2", symlinks=True)
    g = Forest.load(tmp_path / "qs2" / "f")
    gone = g.names[0]
    remove_expert(g, gone)
    g = Forest.load(g.root)
    assert not (tmp_path / "qs2" / "moe").exists() and moe.exists()
    assert g.data.get("ledger", []) == []
    spent = next(r for r in g.data["removed"] if r["name"] == gone)["spent"]
    assert [r["phase"] for r in spent] == ["expert", "btx_finetuning"]
    assert [r["flops"] for r in Forest.load(f.root).data["ledger"]] == [3.0]


def test_a_failed_re_merge_without_an_expert_still_lets_opting_it_out_find_the_old_copy(
    forest_dir, tmp_path, monkeypatch
):
    """`merge moe` again at the same --out, leaving X out, killed or failing while writing: the old MoE
    (which holds X) is still there, so the record keeps X until the new one is written, and opting X out
    deletes the old one; a re-merge that is written holds exactly what it names."""
    from elmforest.forest.optout import remove_expert
    from elmforest.merge import moe
    from elmforest.merge.moe import MoeSpec, export_moe

    f = _copy(forest_dir, tmp_path)
    gone = f.names[0]
    out = export_moe(f, tmp_path / "moe", MoeSpec(router="random"), device="cpu")
    good = export_moe(f, tmp_path / "other", MoeSpec(router="random"), device="cpu")
    export_moe(Forest.load(f.root), good, MoeSpec(router="random", exclude=[gone]), device="cpu")

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(moe, "_write_side_files", full)
    with pytest.raises(Exception, match="No space left"):
        export_moe(Forest.load(f.root), out, MoeSpec(router="random", exclude=[gone]), device="cpu")
    monkeypatch.undo()
    outs = {o["path"]: o["experts"] for o in Forest.load(f.root).data["outputs"]}
    assert gone in outs[str(out.resolve())] and gone not in outs[str(good.resolve())]
    remove_expert(Forest.load(f.root), gone)
    assert not out.exists() and good.exists()


def test_a_copy_of_a_merge_made_before_an_opt_out_is_not_trained_again(forest_dir, shards_dir, tmp_path):
    """A merged MoE copied aside before its expert was opted out, then fine-tuned: the forest recorded
    the new model (the owner's weights carried on, its training in the ledger) and the next `forest
    fsck` deleted it. Refused before anything is written or trained."""
    from elmforest.forest.optout import remove_expert
    from elmforest.merge.moe import MoeSpec, export_moe

    f = _copy(forest_dir, tmp_path)
    gone = f.names[0]
    moe_dir = export_moe(f, tmp_path / "moe", MoeSpec(router="random"), device="cpu")
    shutil.copytree(moe_dir, tmp_path / "kept")
    remove_expert(Forest.load(f.root), gone)
    assert not moe_dir.exists()
    with pytest.raises(UserError, match=f"would hold {gone} .*, opted out of"):
        finetune_moe(tmp_path / "kept", shards_dir, 1, out=tmp_path / "ft", batch_size=2, progress=False)
    assert not (tmp_path / "ft").exists() and not list(tmp_path.glob("*btx*"))
    f = Forest.load(f.root)
    assert not any(p["phase"] == "btx_finetuning" for p in f.ledger())
    assert not any(o["path"].endswith("/ft") for o in f.data.get("outputs", []))
    # the forest as it is now merges and records as before
    export_moe(f, tmp_path / "moe2", MoeSpec(router="random"), device="cpu")


def test_opting_out_moves_the_compute_of_what_it_deletes_to_its_tombstone(forest_dir, tmp_path):
    from elmforest.forest.optout import remove_expert
    from elmforest.merge.moe import MoeSpec, export_moe

    f = _copy(forest_dir, tmp_path)
    gone, kept = f.names[0], f.names[1]
    with_it = export_moe(f, tmp_path / "all", MoeSpec(router="random"), device="cpu")
    without = export_moe(f, tmp_path / "some", MoeSpec(router="random", exclude=[gone]), device="cpu")
    for out, flops in ((with_it, 3.0), (without, 5.0), (tmp_path / "elsewhere", 11.0)):
        f.record_phase(
            {"phase": "btx_finetuning", "name": out.name, "tokens": 1, "flops": flops, "output": str(out)}
        )
    own = Forest.load(f.root).expert(gone)
    remove_expert(Forest.load(f.root), gone)
    g = Forest.load(f.root)
    assert not with_it.exists() and without.exists()
    # the ledger keeps what still exists (and rows it cannot tie to this expert); the tombstone the rest
    assert [r["flops"] for r in g.data["ledger"]] == [5.0, 11.0]
    assert gone not in [r["name"] for r in g.ledger()] and kept in [r["name"] for r in g.ledger()]
    spent = next(r for r in g.data["removed"] if r["name"] == gone)["spent"]
    assert [(r["phase"], r["flops"]) for r in spent] == [("expert", own["flops"]), ("btx_finetuning", 3.0)]
    remove_expert(Forest.load(f.root), gone)  # finishing again keeps what it recorded
    assert next(r for r in Forest.load(f.root).data["removed"] if r["name"] == gone)["spent"] == spent
    from elmforest.clients.report import render_report

    total = own["flops"] + 3.0
    assert f"Opted out, so not in the ledger: {gone} ({total:.3e} FLOPs: btx_finetuning, expert)" in (
        render_report(f.root)
    )
    # its owner adds it back (force) and opts out again: both removals' compute is kept
    Forest.load(f.root).add(
        Forest.load(forest_dir).expert_dir(gone), gone, own["domains"], tokens=1, flops=13, force=True
    )
    assert gone not in Forest.load(f.root).removed
    remove_expert(Forest.load(f.root), gone)
    again = next(r for r in Forest.load(f.root).data["removed"] if r["name"] == gone)["spent"]
    assert [x["flops"] for x in again] == [own["flops"], 3.0, 13]


def test_a_rerun_for_an_existing_expert_keeps_it_only_when_it_asks_for_the_same(
    forest_dir, shards_dir, tmp_path, capsys
):
    """A finished expert is kept on a rerun (pipelines continue that way), but a rerun asking for
    another domain, branch or setting was kept silently too, even with a branch that does not exist."""
    from elmforest.data.shards import Shards

    f, sh = _copy(forest_dir, tmp_path), Shards(shards_dir)
    name, other = f.names[0], f.names[1]
    domain = f.expert(name)["domains"][0]
    entry = btm.train_expert(f, sh, domain, progress=False)
    assert entry == f.expert(name) and "kept (not trained again)" in capsys.readouterr().out
    run = f.root / "runs" / name / "run_config.json"
    steps = json.loads(run.read_text())["train"]["steps"]
    assert btm.train_expert(f, sh, domain, overrides=[f"train.steps={steps}"], progress=False) == entry
    refused = [
        (dict(branch="nearest:vibes"), "unknown branch 'nearest:vibes'"),
        (dict(branch="mixture"), "branched with --branch seed, not mixture"),
        (dict(overrides=[f"train.steps={steps + 1}"]), f"train.steps: {steps} -> {steps + 1}"),
        (dict(name=name, domain=f.expert(other)["domains"][0]), f"trained on \\['{domain}'\\]"),
    ]
    for kw, message in refused:
        kw = {"domain": domain, **kw}
        with pytest.raises(UserError, match=message):
            btm.train_expert(f, sh, kw.pop("domain"), progress=False, **kw)
    assert f.expert(name) == entry


def test_evaluating_a_forest_with_a_deleted_expert_folder_points_to_fsck(
    forest_dir, tmp_path, shards_dir, capsys
):
    from elmforest.cli import main

    f = _copy(forest_dir, tmp_path)
    shutil.rmtree(f.expert_dir(f.names[1]))
    assert main(["eval", "--forest", str(f.root), "--data", str(shards_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"expert {f.names[1]}: " in err and "is missing" in err and "forest fsck" in err, err


def test_opting_out_of_a_copied_tree_deletes_the_copys_merges_not_the_originals(forest_dir, tmp_path, capsys):
    """`cp -a qs qs2` copies a forest with its merges; its manifest names the original's merges by
    absolute path, so `forest remove` in the copy deleted the original's and kept the copy's."""
    from elmforest.forest.commands import average, remove
    from elmforest.merge.moe import MoeSpec, export_moe

    f = _copy(forest_dir, tmp_path, "qs/f")
    gone = f.names[0]
    export_moe(f, tmp_path / "qs" / "moe", MoeSpec(router="random"), device="cpu")
    export_moe(f, tmp_path / "qs" / "some", MoeSpec(router="random", exclude=[gone]), device="cpu")
    average(f, str(tmp_path / "qs" / "avg"))
    for copy in ("qs2", "qs3"):
        shutil.copytree(tmp_path / "qs", tmp_path / copy, symlinks=True)
    # a copy of the forest alone, beside the original: the merges outside it are the original's
    shutil.copytree(tmp_path / "qs" / "f", tmp_path / "qs" / "f2", symlinks=True)
    remove(Forest.load(tmp_path / "qs" / "f2"), gone)
    assert (tmp_path / "qs" / "moe").is_dir() and (tmp_path / "qs" / "avg").is_dir()
    assert "left alone" in capsys.readouterr().out
    # a manifest written before outputs kept their place relative to the forest finds them by the marker
    m = json.loads((tmp_path / "qs3" / "f" / "forest.json").read_text())
    for o in m["outputs"]:
        o.pop("relative", None)
    (tmp_path / "qs3" / "f" / "forest.json").write_text(json.dumps(m))
    capsys.readouterr()
    remove(Forest.load(tmp_path / "qs2" / "f"), gone)
    out = capsys.readouterr().out
    assert (tmp_path / "qs" / "moe").is_dir() and (tmp_path / "qs" / "avg").is_dir()
    assert not (tmp_path / "qs2" / "moe").exists() and not (tmp_path / "qs2" / "avg").exists()
    assert f"{tmp_path / 'qs' / 'moe'} holds {gone}'s weights but was made from the forest at" in out
    remove(Forest.load(tmp_path / "qs3" / "f"), gone)
    assert not (tmp_path / "qs3" / "moe").exists() and not (tmp_path / "qs3" / "avg").exists()
    assert (tmp_path / "qs" / "moe").is_dir() and "left alone" in capsys.readouterr().out
    # the original's own opt-out still deletes its merges; a forest moved with them finds them
    (tmp_path / "qs").rename(tmp_path / "moved")
    remove(Forest.load(tmp_path / "moved" / "f"), gone)
    assert not (tmp_path / "moved" / "moe").exists() and not (tmp_path / "moved" / "avg").exists()
    assert "left alone" not in capsys.readouterr().out
    # the records of the merges still there are kept: the next opt-out finds them too
    other = next(n for n in f.names if n != gone)
    assert (tmp_path / "moved" / "some").is_dir()
    remove(Forest.load(tmp_path / "moved" / "f"), other)
    assert not (tmp_path / "moved" / "some").exists()


def test_settings_given_once_the_seed_exists_are_refused_or_passed_on(forest_dir, tmp_path):
    """`forest train --set optim.weight_decay=0` on a forest with a seed trained experts and the dense run
    with the seed's config, saying nothing; `--set train.trackers=[...]` was dropped the same way."""
    f = _copy(forest_dir, tmp_path)
    ops = ["train.trackers=[]", "train.log_every=1", "train.stop_at=3"]
    assert btm.seed_overrides(f, ops) == ops[:2]  # passed on to the jobs (each phase has its own end)
    wd = f.data["seed"]["config"]["optim"]["weight_decay"]
    assert btm.seed_overrides(f, [f"optim.weight_decay={wd}"]) == []  # the seed's own value: the same command
    with pytest.raises(UserError, match=r"its seed was trained with optim.weight_decay: .*, not 0.123"):
        btm.seed_overrides(f, ["optim.weight_decay=0.123"])
    # a seed config written before a field existed is read with its default, not taken for a change
    m = json.loads((f.root / "forest.json").read_text())
    m["seed"]["config"]["optim"].pop("schedule")
    (f.root / "forest.json").write_text(json.dumps(m))
    assert btm.seed_overrides(Forest.load(f.root), [f"optim.weight_decay={wd}"]) == []


def test_a_byte_flipped_on_disk_is_not_scored_or_merged_without_a_word(forest_dir, tmp_path):
    """Only `forest fsck` and a resumed `forest train` read the checksums: `eval`, `merge moe` and
    `forest average` used a same-size corrupted expert as it was."""
    from elmforest.forest.pool import make_pool
    from elmforest.merge.moe import MoeSpec, export_moe

    f = _copy(forest_dir, tmp_path)
    assert make_pool(f) is not None  # an intact forest: checked, and cached for the next time
    name = f.names[-1]
    w = f.expert_dir(name) / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0x40
    w.write_bytes(bytes(data))
    for use in (
        lambda: make_pool(f),
        lambda: export_moe(f, tmp_path / "moe", MoeSpec(router="random")),
        lambda: average(f, str(tmp_path / "avg")),
    ):
        with pytest.raises(UserError, match=f"expert {name}: .*checksum mismatch.*forest fsck"):
            use()
    assert not (tmp_path / "moe").exists() and not (tmp_path / "avg").exists()


def test_a_forest_whose_cache_cannot_be_written_is_hashed_once_per_process(forest_dir, tmp_path, monkeypatch):
    """eval, merges and averages check the checksums: on a read-only forest (another user's) every
    call read every expert's bytes again, as the cache of what matched could not be saved."""
    from elmforest.forest import digests
    from elmforest.forest.pool import check_intact

    f = _copy(forest_dir, tmp_path)
    (f.root / digests.CACHE).unlink(missing_ok=True)
    reads = []
    real = digests.file_digest
    monkeypatch.setattr(digests, "file_digest", lambda p: reads.append(p) or real(p))
    monkeypatch.setattr(digests, "RACY_NS", -(10**12))  # as if the copy were old

    def refuse(*a, **k):
        raise OSError("read-only file system")

    monkeypatch.setattr(digests, "write_json_atomic", refuse)
    check_intact(f)
    files = len(reads)
    assert files >= len(f.names)
    check_intact(f)
    check_intact(f)
    assert len(reads) == files and not (f.root / digests.CACHE).exists()


def test_forest_add_names_the_seed_or_expert_a_run_started_from(forest_dir, tmp_path, capsys):
    """An expert branched by hand from this forest's seed (or one of its experts) and added back is
    that parent's child in the lineage, not `external`; one from anywhere else stays external."""
    from elmforest.cli import main

    f = _copy(forest_dir, tmp_path)
    first, other = f.names[0], f.names[1]
    cases = [
        ("train", "init_checkpoint", str(f.root / "seed_state"), "seed"),
        ("model", "init_from", str(f.seed_dir), "seed"),
        ("model", "init_from", str(f.expert_dir(other)), other),
        ("train", "init_checkpoint", str(forest_dir / "seed_state"), "external"),  # another forest's
    ]
    for i, (section, key, start, want) in enumerate(cases):
        run = tmp_path / f"run{i}"
        shutil.copytree(f.root / "runs" / first, run)
        cfg = json.loads((run / "run_config.json").read_text())
        cfg["train"]["init_checkpoint"] = cfg["model"]["init_from"] = None
        cfg[section][key] = start
        (run / "run_config.json").write_text(json.dumps(cfg))
        args = [
            "forest",
            "add",
            "--forest",
            str(f.root),
            "--expert",
            str(run),
            "--domain",
            "x",
            "--name",
            f"e{i}",
        ]
        assert main(args) == 0
        assert Forest.load(f.root).expert(f"e{i}")["parents"] == [{"name": want, "weight": 1.0}]
        said = capsys.readouterr().out
        assert ("trained elsewhere" if want == "external" else f"branched from {want}") in said
    # damaged, an added expert comes back from where it was added from, whatever its parent: the forest
    # has no run of it to restore or retrain
    from elmforest.forest.optout import fsck

    (Forest.load(f.root).expert_dir("e0") / "model.safetensors").write_bytes(b"not weights")
    wrong = [w for w in fsck(Forest.load(f.root), deep=True)[1] if w.startswith("expert e0:")]
    assert len(wrong) == 1 and "copy its files back from the original" in wrong[0]


def test_a_replacement_refused_by_the_manifest_check_leaves_the_old_weights(
    forest_dir, tmp_path, monkeypatch
):
    """`forest add --replace` put the new checkpoint in place before the changed manifest was checked:
    a refused manifest left the new weights under the old entry (a checksum mismatch from then on)."""
    import elmforest.forest.manifest as manifest_mod
    from elmforest.utils.io import file_digest

    root = tmp_path / "f"
    shutil.copytree(forest_dir, root, symlinks=True)
    f = Forest.load(root)
    a, b = f.names[:2]
    before = file_digest(f.expert_dir(a) / "model.safetensors")

    real = manifest_mod.check_manifest

    def refused(data, *args):
        if any(e.get("copy_of") for e in data["experts"]):  # the changed manifest, not one read
            raise UserError("refused")
        return real(data, *args)

    monkeypatch.setattr(manifest_mod, "check_manifest", refused)
    with pytest.raises(UserError, match="refused"):
        f.add(f.expert_dir(b), a, f.expert(a)["domains"], tokens=1, flops=1, replace=True)
    monkeypatch.undo()
    g = Forest.load(root)
    assert file_digest(g.expert_dir(a) / "model.safetensors") == before
    assert g.intact(a, deep=True) is None


def test_a_manifest_the_disk_refuses_moves_no_weights_in(forest_dir, tmp_path, monkeypatch):
    """The weights were put in place before forest.json was written: a disk too full for the manifest
    left an expert's new weights under its old record (or an unrecorded folder), said 'nothing changed'."""
    import errno
    from pathlib import Path

    from elmforest.utils.errors import WriteError

    f = _copy(forest_dir, tmp_path)
    src = tmp_path / "ext"
    shutil.copytree(f.expert_dir(f.names[1]), src)
    real = Path.write_text

    def full(self, *a, **k):
        if "forest.json" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    before = (f.root / "forest.json").read_bytes()
    with pytest.raises(WriteError, match="forest.json: cannot write \\(No space left"):
        f.add(src, "ext", ["x"])
    assert not (f.root / "experts" / "ext").exists() and _no_staging_left(f)
    assert (f.root / "forest.json").read_bytes() == before
    monkeypatch.setattr(Path, "write_text", real)
    f.add(src, "ext", ["x"])
    assert "ext" in Forest.load(f.root).names and f.intact("ext", deep=True) is None


def test_forest_add_refuses_integer_weights_of_the_forests_shapes(forest_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    f = _copy(forest_dir, tmp_path)
    src = tmp_path / "ints"
    shutil.copytree(f.expert_dir(f.names[1]), src)
    sd = load_file(str(src / "model.safetensors"))
    save_file({k: (v * 1000).to(torch.int32) for k, v in sd.items()}, str(src / "model.safetensors"))
    with pytest.raises(UserError, match="another shape or type.*'integer'.*'float'"):
        f.add(src, "ints", ["x"])
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(src / "model.safetensors"))
    f.add(src, "halves", ["x"])  # bf16 weights beside fp32 ones are the same kind


def test_averaging_an_expert_trained_elsewhere_is_warned(forest_dir, shards_dir, tmp_path, capsys):
    """`forest add` of a model that did not start from the forest's seed (its lineage "external"), then
    `forest average`, `eval --mode average` or `merge moe` (shared weights averaged): a meaningless
    average of unrelated weights, made without a word."""
    from elmforest.data.shards import Shards
    from elmforest.forest.evaluate import evaluate_forest_shards
    from elmforest.merge.moe import MoeSpec, export_moe

    f = _copy(forest_dir, tmp_path)
    first = f.names[0]
    average(f, str(tmp_path / "a0"))
    assert "trained elsewhere" not in capsys.readouterr().err
    # a byte copy of one of its experts is that expert (copy_of): its origin is known
    f.add(f.expert_dir(first), "twin", ["code"], parents=[{"name": "external", "weight": 1.0}])
    average(Forest.load(f.root), str(tmp_path / "a2"))
    assert "trained elsewhere" not in capsys.readouterr().err
    alien = tmp_path / "alien"
    shutil.copytree(f.expert_dir(first), alien)
    sd = load_file(str(alien / "model.safetensors"))
    save_file(
        {k: v * 1.01 for k, v in sd.items()}, str(alien / "model.safetensors"), metadata={"format": "pt"}
    )
    f.remove("twin")
    f.add(alien, "alien", ["code"], parents=[{"name": "external", "weight": 1.0}])
    f = Forest.load(f.root)
    average(f, str(tmp_path / "a1"))
    assert "warning: averaging alien, trained elsewhere" in capsys.readouterr().err
    kw = dict(seq_len=32, max_bytes=300, prior="uniform", domains=["code"], device="cpu")
    evaluate_forest_shards(f, Shards(shards_dir), mode="average", **kw)
    assert "warning: averaging alien" in capsys.readouterr().err
    evaluate_forest_shards(f, Shards(shards_dir), mode="ensemble", **kw)
    assert "trained elsewhere" not in capsys.readouterr().err  # an ensemble shares no weights
    export_moe(f, tmp_path / "moe", MoeSpec(router="random"), device="cpu")
    assert "averages the attention and embeddings of alien" in capsys.readouterr().err


def test_the_parameter_average_is_built_once_per_distinct_weights(
    forest_dir, shards_dir, tmp_path, monkeypatch
):
    """`eval --mode average` read every expert's weights again for each domain, though a uniform prior
    gives every domain the same average (a 64-expert forest: 54 rebuilds, 70% of its evaluation). Each
    domain's score must still be that of a model averaged afresh with its own weights."""
    from elmforest.data.shards import Shards
    from elmforest.eval.bpb import evaluate_shards
    from elmforest.forest import evaluate
    from elmforest.merge.average import merge_checkpoints
    from elmforest.model.build import load_model

    f = Forest.load(forest_dir)
    shards = Shards(shards_dir)
    built = []
    real = evaluate.average_state_dict
    monkeypatch.setattr(evaluate, "average_state_dict", lambda d, w: built.append(w) or real(d, w))
    kw = dict(seq_len=32, max_bytes=400, device="cpu", precision="fp32")
    evaluate.evaluate_forest_shards(f, shards, mode="average", prior="uniform", **kw)
    assert len(built) == 1
    built.clear()
    res = evaluate.evaluate_forest_shards(f, shards, mode="average", prior="cached", prior_batches=2, **kw)
    assert len(built) == len(res["domains"]) == len({tuple(w) for w in built}) >= 2
    for d, entry in res["domains"].items():  # the reference: a fresh model of this domain's average
        out = merge_checkpoints(f.expert_dirs(), tmp_path / d, list(entry["weights"].values()))
        ref = evaluate_shards(load_model(out), shards, "test", [d], progress=False, **kw)["domains"][d]
        assert entry["bpb"] == ref["bpb"]


def test_forest_train_again_without_preset_takes_the_seeds(forest_dir, shards_dir, tmp_path, capsys):
    """`--preset`'s help says "default cpu-small, or a seed's own": `forest train` run again on a forest
    of the tiny preset without --preset planned a cpu-small forest and was refused as a changed plan."""
    import shutil

    from elmforest.cli import main

    g = tmp_path / "g"
    shutil.copytree(forest_dir, g)
    sets = ["train.steps=24", "train.batch_size=6", "train.precision=fp32"]  # the fixture's own
    argv = ["forest", "train", "--forest", str(g), "--shards", str(shards_dir), "--no-progress"]
    assert main([*argv, *(a for s in sets for a in ("--set", s))]) == 0, capsys.readouterr().err
    assert "planned differently" not in capsys.readouterr().err


def test_an_opt_out_says_which_recorded_merges_it_could_not_check(forest_dir, tmp_path, capsys):
    """A merge moved away (a serving folder), or one whose card was deleted, was passed over and the
    removal printed "verified none is left"; the moved one's record then left the manifest, the last
    trace of a copy of the expert's weights."""
    from elmforest.forest.commands import remove
    from elmforest.merge.moe import MoeSpec, export_moe

    f = _copy(forest_dir, tmp_path)
    gone, other = f.names[0], f.names[1]
    moved = export_moe(f, tmp_path / "moved", MoeSpec(router="random"), device="cpu")
    bare = export_moe(f, tmp_path / "bare", MoeSpec(router="random"), device="cpu")
    shutil.move(moved, tmp_path / "serving")
    (bare / "elmforest_moe.json").unlink()
    capsys.readouterr()
    remove(Forest.load(f.root), gone)
    out, err = capsys.readouterr()
    assert "verified none is left where the forest records them (but 2, below)" in out
    assert f"warning: {moved}, recorded as holding {gone}'s weights, was not checked: not found" in err
    assert f"warning: {bare}, recorded as holding {gone}'s weights, was not checked: no card" in err
    tomb = next(r for r in Forest.load(f.root).data["removed"] if r["name"] == gone)
    assert tomb["state"] == "done" and [u["path"] for u in tomb["unverified"]] == [str(moved), str(bare)]
    assert bare.is_dir() and (tmp_path / "serving").is_dir()  # nothing deleted without its card
    remove(Forest.load(f.root), other)  # the records left: the bare one still, the moved one gone
    assert "was not checked: no card" in capsys.readouterr().err


def test_an_entry_without_recorded_files_still_has_its_weights_checked(forest_dir, tmp_path, capsys):
    """A hand-written or older entry records no sizes or sums: fsck said nothing of its truncated weights,
    which `generate` then failed on."""
    from elmforest.cli import main

    f = _copy(forest_dir, tmp_path)
    name = f.names[0]

    def drop(d):
        next(e for e in d["experts"] if e["name"] == name).pop("files", None)

    f.update(drop)
    f = Forest.load(f.root)
    assert f.intact(name) is None
    w = f.expert_dir(name) / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    assert "truncated" in f.intact(name) and "no checksums recorded" in f.intact(name)
    assert main(["forest", "fsck", "--forest", str(f.root)]) != 0
    said = capsys.readouterr()
    assert "truncated" in said.out + said.err


def test_fsck_says_which_temporaries_another_host_left(forest_dir, tmp_path):
    """Only this host's dead processes' temporaries can be told apart from live ones: another host's
    stayed without a word ("0 problem(s)")."""
    from elmforest.forest.optout import fsck

    f = _copy(forest_dir, tmp_path)
    theirs = f.root / ".forest.json.tmp~otherhost~12"
    theirs.write_text("{}")
    fixed, wrong, notes = fsck(Forest.load(f.root), deep=False)
    assert any(str(theirs) in n and "host otherhost" in n for n in notes) and theirs.exists()
    assert not any(str(theirs) in x for x in fixed + wrong)
