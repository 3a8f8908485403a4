"""A forest from someone else is untrusted input: crafted manifests and checkpoints cannot make elmforest
delete, read or run anything outside the forest, and opting an expert out is verified and survives a kill.

Each forest here is a copy of the session's trained tiny forest with one thing crafted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from elmforest.cli import main
from elmforest.config import RunConfig, apply_overrides
from elmforest.forest.manifest import Forest
from elmforest.forest.trust import ManifestError
from elmforest.merge.moe import MoeSpec, export_moe
from elmforest.merge.moe_train import train_router
from elmforest.utils.errors import UserError


@pytest.fixture
def forest(forest_dir, tmp_path) -> Path:
    """A private copy of the trained 3-expert forest, inside tmp_path/site/forest."""
    root = tmp_path / "site" / "forest"
    shutil.copytree(forest_dir, root, symlinks=True)
    m = _manifest(root)
    m.pop("outputs", None)  # merged models other tests wrote from the shared forest are theirs
    _write_manifest(root, m)
    return root


def _manifest(root: Path) -> dict:
    return json.loads((root / "forest.json").read_text())


def _write_manifest(root: Path, data) -> None:
    (root / "forest.json").write_text(json.dumps(data))


def _victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim" / "important"
    v.mkdir(parents=True)
    (v / "data.txt").write_text("precious")
    return v


def _run(argv, capsys) -> tuple[int, str]:
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out + out.err


# -- escapes -----------------------------------------------------------------------------------------
def test_a_crafted_expert_name_cannot_delete_outside_the_forest(forest, tmp_path, capsys):
    victim = _victim(tmp_path)
    m = _manifest(forest)
    rel = os.path.relpath(victim, forest / "experts")
    m["experts"][0]["name"] = rel  # ../../../victim/important
    _write_manifest(forest, m)
    with pytest.raises(ManifestError, match="expert name"):
        Forest.load(forest)
    rc, out = _run(["forest", "remove", "--forest", str(forest), "--expert", rel], capsys)
    assert rc == 2 and "forest.json" in out
    assert (victim / "data.txt").read_text() == "precious"


@pytest.mark.parametrize("path", ["ABSOLUTE", "experts/../../victim/important"])
def test_expert_paths_must_stay_inside_the_forest(forest, tmp_path, capsys, path):
    victim = _victim(tmp_path)
    name = _manifest(forest)["experts"][0]["name"]
    shutil.copytree(forest / "experts" / name, victim, dirs_exist_ok=True)  # weights elsewhere
    m = _manifest(forest)
    m["experts"][0]["path"] = str(victim) if path == "ABSOLUTE" else path
    _write_manifest(forest, m)
    with pytest.raises(ManifestError, match="path"):
        Forest.load(forest)
    rc, out = _run(["eval", "--forest", str(forest), "--data", str(forest), "--no-progress"], capsys)
    assert rc == 2 and "must be relative" in out


@pytest.mark.parametrize("field", ["run", "linked run", "files"])
def test_an_experts_run_and_file_names_must_stay_inside_the_forest(forest, tmp_path, field):
    """A restore deleted `forest.root / entry["run"] / "model"` after hashing `files` there: a run path
    outside the forest (or a file name with '..') made `forest expert` delete a folder outside it."""
    from elmforest.forest.kept import set_aside_damaged_run_model

    victim = _victim(tmp_path)
    (victim / "model").mkdir()
    m = _manifest(forest)
    e = m["experts"][0]
    if field == "run":
        e["run"] = str(victim)
    elif field == "linked run":
        shutil.rmtree(forest / e["run"])
        os.symlink(victim, forest / e["run"])
    else:
        e["files"] = {"../../../victim/important/data.txt": {"bytes": 8, "sha256": "0" * 64}}
    _write_manifest(forest, m)
    with pytest.raises(ManifestError, match="run|plain file names|outside the forest"):
        set_aside_damaged_run_model(Forest.load(forest), e["name"])
    assert (victim / "model").is_dir() and (victim / "data.txt").read_text() == "precious"


def test_a_weight_file_linked_outside_the_forest_is_not_intact(forest, tmp_path):
    """The folder was checked for a link, its files were not: weights read through a link passed."""
    name = _manifest(forest)["experts"][0]["name"]
    f = next((forest / "experts" / name).glob("*.safetensors"))
    shutil.copy(f, tmp_path / "outside.safetensors")
    f.unlink()
    os.symlink(tmp_path / "outside.safetensors", f)
    assert "symbolic link" in Forest.load(forest).intact(name, deep=True)


def test_a_manifest_cannot_point_a_removal_at_an_output_no_forest_made(forest, tmp_path, capsys):
    """An output outside the forest whose card names no forest that made it (a FlexOlmo merge of loose
    pairs; hand-made) was deleted because a forest.json said so: a received manifest could delete it."""
    from elmforest.merge.average import merge_checkpoints

    f = Forest.load(forest)
    name = f.names[0]
    out = merge_checkpoints(f.expert_dirs(), tmp_path / "elsewhere", metadata={"names": f.names})
    m = _manifest(forest)
    m["outputs"] = [{"path": str(out), "relative": os.path.relpath(out, forest), "experts": f.names}]
    _write_manifest(forest, m)
    rc, text = _run(["forest", "remove", "--forest", str(forest), "--expert", name], capsys)
    assert rc == 2 and "names no forest that made it" in text and "removed expert" not in text
    assert (out / "model.safetensors").is_file()  # not deleted
    shutil.rmtree(out)  # its owner deletes it: the removal finishes
    rc, text = _run(["forest", "remove", "--forest", str(forest), "--expert", name], capsys)
    assert rc == 0 and "verified" in text


def test_a_merge_reads_no_file_linked_out_of_a_checkpoint(forest, tmp_path):
    """A side file (tokenizer) or a weight file linked elsewhere was read and published in the merge: a
    key beside the checkpoint, or another owner's weights that then survived that owner's opt-out."""
    from elmforest.merge.average import merge_checkpoints

    f = Forest.load(forest)
    a, b = (tmp_path / "owner_a", tmp_path / "owner_b")
    for d, name in ((a, f.names[0]), (b, f.names[1])):
        shutil.copytree(f.expert_dir(name), d)
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    (a / "vocab.txt").unlink(missing_ok=True)
    os.symlink(secret, a / "vocab.txt")
    with pytest.raises(
        UserError, match="vocab.txt is a symbolic link to .*secret.txt, outside its checkpoint"
    ):
        merge_checkpoints([a, b], tmp_path / "avg")
    assert not (tmp_path / "avg").exists()
    (a / "vocab.txt").unlink()
    w = b / "model.safetensors"
    w.unlink()
    os.symlink(f.expert_dir(f.names[2]) / "model.safetensors", w)
    with pytest.raises(UserError, match="model.safetensors is a symbolic link"):
        merge_checkpoints([a, b], tmp_path / "avg")
    os.symlink("model.safetensors", a / "alias.txt")  # a link inside the checkpoint is its own file
    from elmforest.merge.io import within

    assert within(a / "alias.txt", a) == a / "alias.txt"


def test_a_deeply_nested_safetensors_header_is_a_corrupt_header(tmp_path):
    from elmforest.model.build import weight_files

    header = b"[" * 200_000 + b"]" * 200_000
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(UserError, match="corrupt safetensors header"):
        weight_files(tmp_path)


def test_an_expert_directory_linked_outside_the_forest_is_refused(forest, tmp_path):
    victim = _victim(tmp_path)
    name = _manifest(forest)["experts"][0]["name"]
    shutil.rmtree(forest / "experts" / name)
    os.symlink(victim, forest / "experts" / name)
    with pytest.raises(ManifestError, match="outside the forest"):
        Forest.load(forest)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: [],  # a JSON array
        lambda m: {**m, "experts": {"a": 1}},
        lambda m: {**m, "experts": [{"name": "x", "path": "experts/x", "domains": "legal"}]},
        lambda m: {**m, "seed": {"path": "seed", "config": {"model": {"preset": 3}}}},
        lambda m: {**m, "removed": [{"name": "../x"}]},
        # JSON's Infinity for a count: every compute ratio of the forest would be inf
        lambda m: {**m, "experts": [{**m["experts"][0], "flops": float("inf")}, *m["experts"][1:]]},
        lambda m: {**m, "seed": {**(m.get("seed") or {"path": "seed"}), "tokens": float("inf")}},
        lambda m: {
            **m,
            "ledger": [{"phase": "btx_finetuning", "name": "moe", "tokens": 1, "flops": float("inf")}],
        },
    ],
)
def test_a_malformed_manifest_is_one_line_naming_the_file(forest, capsys, change):
    _write_manifest(forest, change(_manifest(forest)))
    rc, out = _run(["forest", "list", "--forest", str(forest)], capsys)
    assert rc == 2 and str(forest / "forest.json") in out and "Traceback" not in out


def test_a_truncated_manifest_names_the_file(forest, capsys):
    text = (forest / "forest.json").read_text()
    (forest / "forest.json").write_text(text[: len(text) // 2])
    rc, out = _run(["forest", "show", "--forest", str(forest)], capsys)
    assert rc == 2 and "forest.json" in out


def test_remote_code_is_never_turned_on_by_a_file(forest, shards_dir, tmp_path, capsys):
    """A manifest saying trust_remote_code plus an auto_map in an expert's config.json used to run the
    expert's Python file on `forest expert --branch expert:NAME`, with no flag given."""
    marker = tmp_path / "pwned"
    m = _manifest(forest)
    m["seed"]["config"]["model"]["trust_remote_code"] = True
    _write_manifest(forest, m)
    name = m["experts"][0]["name"]
    edir = forest / "experts" / name
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaConfig as EvilConfig\n"
    (edir / "evil.py").write_text(code)
    cfg = json.loads((edir / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}
    (edir / "config.json").write_text(json.dumps(cfg))
    rc, out = _run(
        [
            "forest",
            "expert",
            "--forest",
            str(forest),
            "--shards",
            str(shards_dir),
            "--domain",
            name,
            "--name",
            "again",
            "--branch",
            f"expert:{name}",
            "--no-progress",
            "--set",
            "train.steps=14",
        ],
        capsys,
    )
    assert rc == 2 and "auto_map" in out and "--trust-remote-code" in out
    assert not marker.exists()
    # the same holds for a --config file and a run_config.json: reading any file turns it off
    d = RunConfig().to_dict()
    d["model"]["trust_remote_code"] = True
    assert RunConfig.from_dict(d).model.trust_remote_code is False
    with pytest.raises(UserError, match="--trust-remote-code"):
        apply_overrides(RunConfig(), ["model.trust_remote_code=true"])


def test_forest_add_takes_in_regular_files_only(forest, tmp_path, capsys):
    secret = tmp_path / "secret.key"
    secret.write_text("hunter2")
    name = _manifest(forest)["experts"][0]["name"]
    src = tmp_path / "theirs"
    shutil.copytree(forest / "experts" / name, src)
    os.symlink(secret, src / "notes.txt")
    before = (forest / "forest.json").read_text()
    rc, out = _run(
        ["forest", "add", "--forest", str(forest), "--expert", str(src), "--domain", "x", "--name", "theirs"],
        capsys,
    )
    assert rc == 2 and "symbolic link" in out and "notes.txt" in out
    assert (forest / "forest.json").read_text() == before
    assert not any("hunter2" in p.read_text(errors="ignore") for p in forest.rglob("*") if p.is_file())
    assert not [p for p in (forest / "experts").iterdir() if p.name.startswith(".")]  # no staging left
    (src / "notes.txt").unlink()
    os.mkfifo(src / "pipe")
    rc, out = _run(
        ["forest", "add", "--forest", str(forest), "--expert", str(src), "--domain", "x", "--name", "theirs"],
        capsys,
    )
    assert rc == 2 and "not a regular file" in out
    (src / "pipe").unlink()
    (src / "training_args.bin").write_bytes(b"\x80\x04N.")  # a pickle: never read, and not taken in
    rc, out = _run(
        ["forest", "add", "--forest", str(forest), "--expert", str(src), "--domain", "x", "--name", "theirs"],
        capsys,
    )
    assert rc == 0 and "theirs" in Forest.load(forest).names and "skipped" in out
    assert not list(forest.rglob("training_args.bin"))


# -- opting out --------------------------------------------------------------------------------------
def test_removal_through_a_link_fails_loudly_and_finishes_once_fixed(forest, tmp_path, capsys):
    name = _manifest(forest)["experts"][0]["name"]
    elsewhere = tmp_path / "elsewhere-run"
    shutil.move(forest / "runs" / name, elsewhere)
    os.symlink(elsewhere, forest / "runs" / name)
    rc, out = _run(["forest", "remove", "--forest", str(forest), "--expert", name], capsys)
    assert rc == 2 and "symbolic link" in out and "removed expert" not in out
    assert (elsewhere / "model").is_dir()  # nothing deleted through the link
    f = Forest.load(forest)
    assert name not in f.names and {"name": name, "state": "pending"}.items() <= f.data["removed"][0].items()
    assert not (forest / "experts" / name).exists()
    shutil.rmtree(elsewhere)  # the owner deletes what lies outside; the dangling link is elmforest's
    rc, out = _run(["forest", "remove", "--forest", str(forest), "--expert", name], capsys)
    assert rc == 0 and "verified" in out
    assert not os.path.lexists(forest / "runs" / name)
    assert Forest.load(forest).data["removed"][0]["state"] == "done"
    rc, out = _run(["forest", "remove", "--forest", str(forest), "--expert", name], capsys)
    assert rc == 0  # re-checking a finished removal is fine


def test_a_removal_killed_after_the_manifest_write_is_finished_by_rerunning(forest, capsys):
    name = _manifest(forest)["experts"][1]["name"]
    script = textwrap.dedent(
        f"""
        import os, shutil, signal
        from elmforest.forest.manifest import Forest
        def killed(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        shutil.rmtree = killed
        Forest.load({str(forest)!r}).remove({name!r})
        """
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert p.returncode == -signal.SIGKILL
    assert name not in Forest.load(forest).names and (forest / "runs" / name).is_dir()  # the old failure
    rc, out = _run(["forest", "fsck", "--forest", str(forest)], capsys)
    assert rc == 0 and f"finished removing expert {name}" in out
    assert not (forest / "runs" / name).exists() and not (forest / "experts" / name).exists()
    rc, out = _run(["forest", "remove", "--forest", str(forest), "--expert", name], capsys)
    assert rc == 0 and "no expert named" not in out


def test_removal_deletes_merged_copies_it_knows_of(forest, tmp_path, capsys):
    names = Forest.load(forest).names
    avg, other = tmp_path / "avg-all", tmp_path / "avg-others"
    assert _run(["forest", "average", "--forest", str(forest), "--out", str(avg)], capsys)[0] == 0
    w = ",".join(f"{n}={0 if n == names[0] else 1}" for n in names)
    assert (
        _run(["forest", "average", "--forest", str(forest), "--out", str(other), "--weights", w], capsys)[0]
        == 0
    )
    rc, out = _run(["forest", "remove", "--forest", str(forest), "--expert", names[0]], capsys)
    assert rc == 0 and str(avg) in out
    assert not avg.exists() and (other / "model.safetensors").is_file()  # holds nothing of it: kept


def test_removal_names_the_unfinished_runs_begun_from_the_owners_weights(forest, capsys):
    """A cut `forest expert --branch nearest` (from experts/OWNER) or `--branch mixture` (from a
    branch averaged from it) kept checkpoints of what the owner's expert learned; removal said nothing."""
    from elmforest.merge.average import average_checkpoints

    f = Forest.load(forest)
    owner, other = f.names[:2]
    average_checkpoints(
        [f.expert_dir(n) for n in (owner, other)],
        forest / "branches" / "mixed",
        [0.5, 0.5],
        metadata={"branch_for": "x", "names": [owner, other]},
    )
    for run, start in (
        ("near", forest / "experts" / owner),
        ("mixed", forest / "branches" / "mixed"),
        ("fromother", forest / "experts" / other),
    ):
        (forest / "runs" / run).mkdir()
        c = json.loads((forest / "runs" / owner / "run_config.json").read_text())
        c["model"]["init_from"] = str(start.resolve())
        (forest / "runs" / run / "run_config.json").write_text(json.dumps(c))
    rc, out = _run(["forest", "remove", "--forest", str(forest), "--expert", owner], capsys)
    assert rc == 0, out
    said = [line for line in out.splitlines() if "a run not yet an expert" in line]
    assert [line.split()[1] for line in said] == [str(forest / "runs" / r) for r in ("mixed", "near")]
    assert not (forest / "branches" / "mixed").exists()


def test_removal_deletes_a_merged_moe_and_its_router_training(forest, shards_dir, tmp_path, capsys):
    f = Forest.load(forest)
    moe = export_moe(f, tmp_path / "moe", MoeSpec(router="random"), device="cpu")
    kept = tmp_path / "router-run"  # a run placed by the caller stays, and is recorded
    trained = train_router(
        moe, shards_dir, steps=2, out=tmp_path / "moe-trained", run_dir=kept, batch_size=2, progress=False
    )
    assert (kept / "model" / "model.safetensors").is_file() and (trained / "model.safetensors").is_file()
    rc, out = _run(["forest", "remove", "--forest", str(forest), "--expert", f.names[0]], capsys)
    assert rc == 0
    assert not moe.exists() and not trained.exists() and not kept.exists()


def test_a_crafted_clusterer_cannot_point_outside_its_folder(tmp_path, corpus, capsys):
    from elmforest.cluster.assign import fit_clusterer

    c = tmp_path / "c"
    fit_clusterer(corpus, 2, c, sample_docs=200, dims=8, min_df=1)
    shutil.copy(c / "arrays.safetensors", tmp_path / "secret.safetensors")
    meta = json.loads((c / "clusterer.json").read_text())
    meta["arrays"]["file"] = "../secret.safetensors"
    (c / "clusterer.json").write_text(json.dumps(meta))
    rc, out = _run(["forest", "init", "--forest", str(tmp_path / "f"), "--clusterer", str(c)], capsys)
    assert rc == 2 and "must be a file name inside" in out and not (tmp_path / "f").exists()


def test_an_owner_leaving_while_its_expert_trains_is_opted_out(forest, shards_dir, capsys):
    """`forest remove` of an expert still training (or interrupted) said "no expert named" and kept its
    run, trained on that owner's data, which a later `forest expert` resumed."""
    import fcntl

    from elmforest.data.shards import Shards
    from elmforest.forest import btm

    run = forest / "runs" / "late"
    (run / "checkpoints" / "step-00000004").mkdir(parents=True)
    (run / "run_config.json").write_text("{}")
    with open(run / ".trainer.lock", "a") as held:  # its trainer is running
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc, out = _run(["forest", "remove", "--forest", str(forest), "--expert", "late"], capsys)
        assert rc == 2 and "is training now" in out and run.is_dir()
    rc, out = _run(["forest", "remove", "--forest", str(forest), "--expert", "late"], capsys)
    assert rc == 0 and not run.exists(), out
    f = Forest.load(forest)
    assert [r["state"] for r in f.data["removed"] if r["name"] == "late"] == ["done"]
    domain = Shards(shards_dir).domains[0]
    with pytest.raises(UserError, match="was opted out"):
        btm.train_expert(f, Shards(shards_dir), domain, name="late", progress=False)


def test_removal_refuses_an_unknown_name_and_a_crafted_one(forest, capsys):
    rc, out = _run(["forest", "remove", "--forest", str(forest), "--expert", "nobody"], capsys)
    assert rc == 2 and "no expert named" in out
    with pytest.raises(UserError, match="expert name"):
        Forest.load(forest).remove("../runs")


def test_fsck_reports_missing_or_altered_weights(forest, capsys):
    f = Forest.load(forest)
    a, b = f.names[:2]
    (forest / "experts" / a / "model.safetensors").unlink()
    weights = forest / "experts" / b / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    rc, out = _run(["forest", "fsck", "--forest", str(forest)], capsys)
    assert rc == 1 and f"expert {a}" in out and "checksum mismatch" in out
    assert "the seed" not in out


def test_an_expert_cut_before_it_was_recorded_is_finished_by_its_command_not_forest_add(
    forest, capsys, shards_dir
):
    """fsck said `forest add` it: that recorded the trained expert as a copy (no lineage, 0 FLOPs), and
    the rerun of its `forest expert --branch mixture` then kept the copy as "trained as asked"."""
    from elmforest.data.shards import Shards
    from elmforest.forest import btm

    f = Forest.load(forest)
    a = f.names[0]
    for where in ("experts", "runs"):  # as a cut `forest expert --name late` leaves them
        shutil.copytree(forest / where / a, forest / where / "late")
    shutil.copytree(forest / "experts" / a, forest / "experts" / "stray")  # no run: a copy, add or delete it
    (forest / "runs" / "cut").mkdir()  # runs and branches no expert names: noted, never problems
    (forest / "branches" / "orph").mkdir(parents=True)
    rc, out = _run(["forest", "fsck", "--forest", str(forest)], capsys)
    assert rc == 1 and "trained here by runs/late" in out and "not `forest add`" in out
    assert f"note: {forest / 'runs' / 'cut'}: a run no expert names" in out
    assert f"note: {forest / 'branches' / 'orph'}: a mixture branch no expert names" in out
    assert "runs/late: a run" not in out and "2 problem(s)" in out
    assert "stray belongs to no expert of the manifest (delete it, or `forest add` it)" in out
    domain = f.expert(a)["domains"][0]
    add = ["forest", "add", "--forest", str(forest), "--expert", str(forest / "experts" / "stray")]
    rc, out = _run([*add, "--domain", domain, "--name", "stray"], capsys)
    assert rc == 0, out
    with pytest.raises(UserError, match="added from outside the forest .*not branched with --branch mixture"):
        btm.train_expert(
            Forest.load(forest), Shards(shards_dir), domain, name="stray", branch="mixture", progress=False
        )


@pytest.mark.parametrize("harm", ["truncated_state", "no_seed", "no_state"])
def test_fsck_reports_a_damaged_seed(forest, capsys, harm):
    """A truncated seed_state or a deleted seed passed fsck; the next `forest expert` then failed."""
    f = Forest.load(forest)
    assert _run(["forest", "fsck", "--forest", str(forest)], capsys)[0] == 0
    if harm == "no_seed":
        shutil.rmtree(f.seed_dir)
    elif harm == "no_state":
        shutil.rmtree(forest / "seed_state")
    else:
        w = forest / "seed_state" / "model.safetensors"
        w.write_bytes(w.read_bytes()[:3000])
    rc, out = _run(["forest", "fsck", "--forest", str(forest)], capsys)
    assert rc == 1 and "problem: the seed: " in out and "copy it back from a backup" in out, out
    want = {"truncated_state": "model.safetensors cannot be read", "no_seed": "config.json is missing"}
    assert want.get(harm, "seed_state (its weights and optimizer state) is missing") in out


def _retrain_cut(forest, shards_dir, name, domain, monkeypatch) -> Path:
    """The owner trains its opted-out expert again (`forest expert --force`), stopped after its first
    checkpoint; returns the run."""
    from elmforest.data.shards import Shards
    from elmforest.forest import btm

    def cut(cfg, run_dir, progress=True):
        (Path(run_dir) / "checkpoints" / "step-00000004").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(btm, "train", cut)
    with pytest.raises(KeyboardInterrupt):
        btm.train_expert(
            Forest.load(forest), Shards(shards_dir), domain, name=name, force=True, progress=False
        )
    return forest / "runs" / name


def test_fsck_keeps_the_run_of_an_opted_out_expert_its_owner_trains_again(
    forest, shards_dir, capsys, monkeypatch
):
    """`forest fsck` took the run of `forest expert --force` (the owner training an opted-out expert
    again) for what the removal had left, and deleted it under the live trainer."""
    import fcntl

    f = Forest.load(forest)
    name = f.names[0]
    domain = f.expert(name)["domains"][0]
    assert _run(["forest", "remove", "--forest", str(forest), "--expert", name], capsys)[0] == 0
    run = _retrain_cut(forest, shards_dir, name, domain, monkeypatch)
    with open(run / ".trainer.lock", "a") as held:  # still training
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc, out = _run(["forest", "fsck", "--forest", str(forest)], capsys)
        assert rc == 0 and (run / "checkpoints").is_dir(), out
    rc, out = _run(["forest", "fsck", "--forest", str(forest)], capsys)  # cut: said, still kept
    assert rc == 1 and "began training it again" in out and (run / "checkpoints").is_dir()
    assert _run(["forest", "remove", "--forest", str(forest), "--expert", name], capsys)[0] == 0
    assert not run.exists() and _run(["forest", "fsck", "--forest", str(forest)], capsys)[0] == 0


def test_removal_deletes_the_copies_a_killed_merge_left_beside_its_output(forest, tmp_path, capsys):
    """A merge killed while writing leaves its shards in `.OUT.tmp~HOST~PID`, and one killed between the
    renames of replace_dir its only copy in `.OUT.old~HOST~PID`: `forest remove` said it verified none
    of the expert was left, and `forest fsck` found no problem."""
    from elmforest.utils.io import HOST

    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a dead process's id
    f = Forest.load(forest)
    name = f.names[0]
    avg = tmp_path / "avg"
    assert _run(["forest", "average", "--forest", str(forest), "--out", str(avg)], capsys)[0] == 0
    aside = tmp_path / f".avg.old~{HOST}~{pid}"
    avg.rename(aside)  # killed between the two renames
    f.record_output(tmp_path / "moe", "moe", f.names)  # recorded before writing, then killed
    stage = tmp_path / f".moe.tmp~{HOST}~{pid}"
    stage.mkdir()
    (stage / "model-00001.safetensors").write_bytes(b"weights")
    f.record_output(tmp_path / "live", "moe", f.names)
    writing = tmp_path / f".live.tmp~{HOST}~{os.getpid()}"  # a merge still running
    writing.mkdir()
    rc, out = _run(["forest", "remove", "--forest", str(forest), "--expert", name], capsys)
    assert rc != 0 and f"{writing} is being written by a running process" in out
    assert not stage.exists() and not aside.exists() and not avg.exists()
    writing.rmdir()
    rc, out = _run(["forest", "fsck", "--forest", str(forest)], capsys)
    assert rc == 0 and f"finished removing expert {name}" in out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_merge_copy_from_another_host_is_named_and_a_pending_removal_keeps_the_owners_new_run(
    forest, shards_dir, capsys, monkeypatch
):
    """A killed merge's copy left by a process on another machine (a shared file system) was said to be
    "written by a running process"; and with the removal pending, `forest fsck` deleted the run of the
    owner training the expert again (`forest expert --force`) under its live trainer."""
    import fcntl

    f = Forest.load(forest)
    name = f.names[0]
    domain = f.expert(name)["domains"][0]
    f.record_output(forest.parent / "moe", "moe", f.names)
    foreign = forest.parent / ".moe.tmp~node-a~4242"
    foreign.mkdir()
    rc, out = _run(["forest", "remove", "--forest", str(forest), "--expert", name], capsys)
    assert (
        rc != 0 and "left by a merge on host node-a (process 4242), which cannot be checked from here" in out
    )
    assert foreign.is_dir() and Forest.load(forest).data["removed"][-1]["state"] == "pending"
    run = _retrain_cut(forest, shards_dir, name, domain, monkeypatch)
    foreign.rmdir()  # its owner deleted it
    with open(run / ".trainer.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc, out = _run(["forest", "fsck", "--forest", str(forest)], capsys)
        assert rc == 0 and f"finished removing expert {name}" in out and (run / "checkpoints").is_dir(), out


def test_a_run_that_trained_anothers_weights_is_counted_and_a_restore_keeps_earlier_spend(forest):
    """Deterministic training of a second expert on the same domain gives the first's files: the run
    was booked at 0 tokens and 0 FLOPs, right after being told it would be counted. And a re-added
    expert restored from its run (replace) lost what its earlier opt-out had discarded."""
    f = Forest.load(forest)
    a, b = f.names[:2]
    total = f.total_flops()
    e = f.add(f.expert_dir(a), "a_again", f.expert(a)["domains"], tokens=5, flops=7, ran=True)
    assert (e["tokens"], e["flops"], e["copy_of"]) == (5, 7, a) and f.total_flops() == total + 7
    a_files = forest.parent / "a_backup"  # `a` restored from its run: not a copy of its own copy
    shutil.copytree(f.expert_dir(a), a_files)
    e = f.add(a_files, a, f.expert(a)["domains"], tokens=11, flops=13, replace=True, ran=True)
    assert "copy_of" not in e and Forest.load(forest).expert("a_again")["copy_of"] == a
    backup, domains = forest.parent / "b_backup", f.expert(b)["domains"]
    shutil.copytree(f.expert_dir(b), backup)
    f.remove(b)
    gone = [r for r in Forest.load(forest).data["removed"] if r["name"] == b][0]["spent"]
    assert gone
    f = Forest.load(forest)
    e = f.add(backup, b, domains, tokens=3, flops=4, force=True)
    assert e["spent_before"] == gone
    e = f.add(backup, b, domains, tokens=3, flops=4, replace=True)  # restored: the earlier spend stays
    assert e["spent_before"] == gone
    assert Forest.load(forest).expert(b)["spent_before"] == gone


def test_an_experts_copy_is_counted_once_and_an_opted_out_experts_copy_is_refused(forest):
    """`forest add` took an expert's own weights under a new name: its run counted twice in the ledger,
    and after the original's opt-out the copy stayed (unsaid), or came back under a new name."""
    f = Forest.load(forest)
    a, b = f.names[:2]
    total = f.total_flops()
    e = f.add(f.expert_dir(a), "a_copy", f.expert(a)["domains"], tokens=5, flops=7)
    assert (e["tokens"], e["flops"], e["copy_of"]) == (0, 0, a) and f.total_flops() == total
    backup = forest.parent / "b_backup"
    shutil.copytree(f.expert_dir(b), backup)
    rep = f.remove(a)
    assert "a_copy" in rep["derived"]
    f.remove(b)
    with pytest.raises(UserError, match=f"its weights are those of expert '{b}', opted out"):
        Forest.load(forest).add(backup, "b_again", ["x"])
    assert "b_again" not in Forest.load(forest).names


def test_a_removal_cut_before_it_deleted_anything_is_finished_before_the_owner_trains_again(
    forest, shards_dir, monkeypatch
):
    """Killed between its tombstone and its deletions, a removal left the old run: `forest expert
    --force` resumed it at its last step (no training) and its compute entered the tombstone twice."""
    import elmforest.forest.optout as optout
    from elmforest.data.shards import Shards
    from elmforest.forest import btm

    f = Forest.load(forest)
    name = f.names[0]
    domain = f.expert(name)["domains"][0]
    run = forest / "runs" / name
    assert (run / "summary.json").is_file()
    monkeypatch.setattr(optout, "finish_removal", lambda *a, **k: {})  # killed right after the tombstone
    f.remove(name)
    monkeypatch.undo()
    assert run.is_dir() and name in optout.pending(Forest.load(forest))
    seen = []

    def train(cfg, run_dir, progress=True):
        seen.append(Path(run_dir).exists())
        raise KeyboardInterrupt

    monkeypatch.setattr(btm, "train", train)
    with pytest.raises(KeyboardInterrupt):
        btm.train_expert(
            Forest.load(forest),
            Shards(shards_dir),
            domain,
            name=name,
            force=True,
            progress=False,
        )
    assert seen == [False]  # the old run was gone before training started
    tomb = next(r for r in Forest.load(forest).data["removed"] if r["name"] == name)
    assert tomb["state"] == "done" and len([s for s in tomb["spent"] if s["phase"] == "expert"]) == 1
