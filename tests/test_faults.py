"""Faults of the disk and of the user's files: a run falls back past a corrupt checkpoint, refuses shards
rebuilt under it, is not blocked by a run that never started, and every write that fails or is
killed leaves nothing behind (or is cleaned by the next write of the same thing)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import make_corpus, tiny_config
from safetensors.torch import load_file

from elmforest.data.shards_build import build_shards
from elmforest.data.splits import SplitSpec
from elmforest.train import checkpoint as ckpt_mod
from elmforest.train.checkpoint import list_checkpoints
from elmforest.train.trainer import train
from elmforest.utils.errors import AlreadyExists, UserError, WriteError
from elmforest.utils.io import FILE_MODE, HOST, atomic_path, clean_stale, write_json_atomic


def _final(run):
    return load_file(str(run / "model" / "model.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage", ["flip", "truncate", "state"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(shards_dir, tmp_path, capfd, damage):
    straight = tmp_path / "straight"
    train(tiny_config(shards_dir, steps=24, ckpt_every=8, keep_checkpoints=3), straight, progress=False)
    run = tmp_path / "run"
    train(
        tiny_config(shards_dir, steps=24, ckpt_every=8, keep_checkpoints=3, stop_at=16), run, progress=False
    )
    newest = list_checkpoints(run / "checkpoints")[-1]
    assert newest.name.endswith("16")
    f = newest / ("state.json" if damage == "state" else "model.safetensors")
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01  # one flipped bit deep inside a tensor: only the checksum sees it
    else:
        data = data[: len(data) // 2]
    f.write_bytes(bytes(data))
    capfd.readouterr()
    summary = train(tiny_config(shards_dir, steps=24, ckpt_every=8, keep_checkpoints=3), run, progress=False)
    err = capfd.readouterr().err
    assert "resuming from step-00000008" in err and str(f.name) in err
    assert summary["resumed_from"] == 8
    assert _same(_final(run), _final(straight))  # the steps since step 8 were simply trained again
    aside = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("corrupt-step-00000016")]
    assert len(aside) == 1 and (aside[0] / f.name).is_file()  # kept for inspection


def test_every_checkpoint_corrupt_starts_over_saying_so(shards_dir, tmp_path, capfd):
    run = tmp_path / "run"
    train(tiny_config(shards_dir, steps=12, ckpt_every=6, stop_at=6), run, progress=False)
    (list_checkpoints(run / "checkpoints")[-1] / "optimizer.safetensors").write_bytes(b"\0" * 10)
    capfd.readouterr()
    summary = train(tiny_config(shards_dir, steps=12, ckpt_every=6), run, progress=False)
    assert "starting over" in capfd.readouterr().err and summary["resumed_from"] is None


def test_a_corrupt_init_checkpoint_is_named(shards_dir, tmp_path):
    src = tmp_path / "src"
    train(tiny_config(shards_dir, steps=12, stop_at=6), src, progress=False)
    ck = list_checkpoints(src / "checkpoints")[-1]
    (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:100])
    cfg = tiny_config(shards_dir, steps=12, init_checkpoint=str(ck))
    with pytest.raises(UserError, match="model.safetensors"):
        train(cfg, tmp_path / "branch", progress=False)


def test_shards_rebuilt_at_the_same_path_are_refused_and_moved_ones_accepted(tokenizer_dir, tmp_path):
    shards = tmp_path / "shards"
    build_shards(
        make_corpus(tmp_path / "a", 60, seed=1), tokenizer_dir, shards, SplitSpec(0.1, 0.1), progress=False
    )
    run = tmp_path / "run"
    train(tiny_config(shards, steps=12, stop_at=6), run, progress=False)
    moved = tmp_path / "moved"
    shutil.copytree(shards, moved)
    build_shards(
        make_corpus(tmp_path / "b", 60, seed=2),
        tokenizer_dir,
        shards,
        SplitSpec(0.1, 0.1),
        overwrite=True,
        progress=False,
    )
    with pytest.raises(UserError, match="fingerprint") as e:
        train(tiny_config(shards, steps=12), run, progress=False)
    assert str(shards) in str(e.value) and "other data" in str(e.value)
    # the same content elsewhere is the same data: the run resumes (the path is not what identifies it)
    assert train(tiny_config(moved, steps=12), run, progress=False)["resumed_from"] == 6


def test_a_run_that_never_reached_a_checkpoint_does_not_block_another_config(shards_dir, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(shards_dir, steps=12)
    cfg.train.seq_len = 4096  # beyond the model's position table
    with pytest.raises(UserError, match="max_position_embeddings"):
        train(cfg, run, progress=False)
    other = tiny_config(shards_dir, steps=12)
    write_json_atomic(
        run / "run_config.json", {**other.to_dict(), "train": {**other.to_dict()["train"], "seed": 9}}
    )
    assert train(other, run, progress=False)["steps"] == 12  # a config with no checkpoint is not a run


def test_weight_files_get_the_usual_mode(shards_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(shards_dir, steps=6, ckpt_every=3), run, progress=False)
    files = [run / "model" / "model.safetensors", *(list_checkpoints(run / "checkpoints")[-1]).iterdir()]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == FILE_MODE, f


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_temporaries_of_dead_processes_are_cleaned_by_the_next_write(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    stale = [
        tmp_path / f".out.json.tmp~{HOST}~{dead}~ab12",
        tmp_path / f".out.json.tmp-{dead}",  # the names of earlier versions
    ]
    stale_dir = tmp_path / f".out.json.old~{HOST}~{dead}"
    for p in stale:
        p.write_text("half")
    kept = [tmp_path / f".out.json.tmp~{HOST}~{live}~cd34", tmp_path / f".out.json.tmp~otherhost~{dead}"]
    for p in kept:
        p.write_text("someone else's")
    write_json_atomic(tmp_path / "out.json", {"a": 1})
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    # the old copy of a directory whose swap was killed halfway is put back, not deleted
    stale_dir.mkdir()
    (stale_dir / "x").write_text("old")
    clean_stale(tmp_path)
    assert not stale_dir.exists()  # out.json exists, so the old copy was garbage
    gone = tmp_path / "model"
    old = tmp_path / f".model.old~{HOST}~{dead}"
    old.mkdir()
    (old / "w").write_text("only copy")
    clean_stale(tmp_path)
    assert (gone / "w").read_text() == "only copy"
    # a killed stage folder's own staging copy is cleaned with the destination it was for
    nested = tmp_path / f"..seed.stage~{HOST}~{dead}.tmp~{HOST}~{dead}"
    nested.mkdir()
    clean_stale(tmp_path, "seed")
    assert not nested.exists()


def test_an_unwritable_destination_is_named_not_its_temporary(tmp_path):
    """A directory where a file goes, or a folder that takes no files, was reported under the
    temporary's name (`.x.json.tmp~HOST~PID~...: Is a directory`), which the user never chose."""
    from elmforest.utils.io import write_json_atomic

    (tmp_path / "adir.json").mkdir()
    for target, reason in (
        (tmp_path / "adir.json", "Is a directory"),
        (Path("/proc/x.json"), "No such file"),
    ):
        with pytest.raises(WriteError, match=f"^{target}: cannot write \\({reason}") as e:
            write_json_atomic(target, {})
        assert ".tmp~" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.json"]


def test_a_refused_read_elsewhere_is_not_a_failure_to_write_the_output(tmp_path):
    """An unreadable input folder read inside a staged write was reported as `OUT: cannot write`."""
    from elmforest.utils.io import as_write_error

    out, tmp = tmp_path / "sh", tmp_path / ".sh.tmp~1"
    read = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "in" / "b" / "x.json"))
    assert as_write_error(read, out, tmp) is None  # the OSError itself names the input
    write = PermissionError(errno.EACCES, "Permission denied", str(tmp / "d" / "train.bin"))
    assert str(as_write_error(write, out, tmp)).startswith(f"{out}: cannot write (Permission denied)")
    assert as_write_error(OSError(errno.ENOSPC, "No space left"), out, tmp) is not None


@pytest.mark.parametrize(
    "text",
    [
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })',
        "Error while serializing: I/O error: No space left on device (os error 28)",  # safetensors 0.8
    ],
)
def test_safetensors_disk_errors_in_either_wording_name_the_output(tmp_path, text):
    from safetensors import SafetensorError

    from elmforest.utils.io import as_write_error

    err = as_write_error(SafetensorError(text), tmp_path / "run", None)
    assert str(err) == f"{tmp_path / 'run'}: cannot write (No space left on device); nothing was changed"
    assert (
        as_write_error(SafetensorError("Error while deserializing header: (os error 2x)"), tmp_path, None)
        is None
    )


def test_a_refused_second_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    from elmforest.utils import io

    dst, staged = tmp_path / "out", tmp_path / "staged"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    staged.mkdir()
    real, calls = os.rename, []

    def rename(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(a, b)

    monkeypatch.setattr(io.os, "rename", rename)
    with pytest.raises(OSError, match="No space"):
        io.replace_dir(staged, dst)
    assert (dst / "old.txt").read_text() == "old" and staged.is_dir()


def test_a_full_disk_leaves_nothing_behind_and_names_the_file(shards_dir, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "x" / "out.json"
    with pytest.raises(WriteError, match="out.json.*No space left"):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            full()
    assert list(target.parent.iterdir()) == []
    run = tmp_path / "run"
    monkeypatch.setattr(ckpt_mod, "save_file", full)
    with pytest.raises(WriteError, match="step-00000003"):
        train(tiny_config(shards_dir, steps=6, ckpt_every=3), run, progress=False)
    assert [p.name for p in (run / "checkpoints").iterdir()] == []  # the failed checkpoint freed its space


def test_a_full_disk_during_shards_build_frees_the_space_and_keeps_the_old_output(
    corpus, tokenizer_dir, tmp_path, monkeypatch
):
    """The cleanup itself used to fail (closing a file flushes it, on a full disk that fails again),
    leaving the staging directory and the disk full."""
    from elmforest.data import shards_build as shards_mod

    out = tmp_path / "sh"
    build_shards(corpus, tokenizer_dir, out, SplitSpec(0.1, 0.1), progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    class FullFile:
        written = 0  # over every file: the disk fills, not one file

        def __init__(self, path, mode):
            self.f = open(path, mode)

        def write(self, b):
            FullFile.written += len(b)
            if FullFile.written > 2000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def writelines(self, parts):
            for b in parts:
                self.write(b)

        def close(self):
            self.f.close()
            raise OSError(errno.ENOSPC, "No space left on device")  # the flush fails too

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

    monkeypatch.setattr(shards_mod, "open", FullFile, raising=False)
    with pytest.raises(WriteError, match="sh: cannot write .*No space left"):
        build_shards(corpus, tokenizer_dir, out, SplitSpec(0.1, 0.1), overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sh"]  # no staging left beside it
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_a_run_that_lost_its_run_config_is_checked_against_its_checkpoint_or_model(shards_dir, tmp_path):
    """A removal killed after run_config.json went (rmtree deletes in the file system's order) left
    checkpoints that a rerun with another LR resumed, and a finished model it kept as the new run's."""
    run = tmp_path / "run"
    cfg = tiny_config(shards_dir, steps=8, ckpt_every=4, stop_at=4)
    train(cfg, run, progress=False)
    (run / "run_config.json").unlink()
    other = tiny_config(shards_dir, steps=8, ckpt_every=4)
    other.optim.lr *= 3
    with pytest.raises(UserError, match=r"different config \(optim.lr"):
        train(other, run, progress=False)
    assert train(tiny_config(shards_dir, steps=8, ckpt_every=4), run, progress=False)["resumed_from"] == 4
    (run / "run_config.json").unlink()  # finished: its model records the config
    with pytest.raises(UserError, match=r"different config \(optim.lr"):
        train(other, run, progress=False)
    assert train(tiny_config(shards_dir, steps=8, ckpt_every=4), run, progress=False)["steps"] == 8
    # what a removal killed later left, a bare model folder: nothing to keep, so trained from the start
    bare = tmp_path / "bare"
    (bare / "model").mkdir(parents=True)
    assert train(other, bare, progress=False)["resumed_from"] is None


def test_a_discarded_folder_goes_whole_or_not_at_all(tmp_path, monkeypatch):
    """The quickstart deleted an out-of-date run or MoE export with rmtree: killed part way, the rest
    (a run without run_config.json, an export without its card) was read on the rerun."""
    from elmforest.utils import io as io_mod

    run = tmp_path / "runs" / "dense-tuned"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run_config.json").write_text("{}")
    (run / "checkpoints" / "x").write_text("1")

    def killed(path, *a, **k):
        (Path(path) / "run_config.json").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(io_mod.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        io_mod.discard_dir(run)
    assert not run.exists()  # gone whole; what is left is a temporary the next write removes
    left = [p.name for p in run.parent.iterdir()]
    assert len(left) == 1 and io_mod.parse_temp(left[0])["tag"] == "trash"


def test_a_full_disk_while_logging_metrics_names_the_log(tmp_path, monkeypatch):
    from elmforest.train import callbacks

    class Full:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

    log = callbacks.JsonlLogger(tmp_path / "metrics.jsonl")
    monkeypatch.setattr(callbacks, "open", Full, raising=False)
    with pytest.raises(WriteError, match=f"^{tmp_path / 'metrics.jsonl'}: cannot write \\(No space left"):
        log.on_log(None, {"step": 1})


def test_keep_checkpoints_0_keeps_one_to_resume_and_none_once_finished(shards_dir, tmp_path):
    """Every finished run kept its last checkpoints (weights and optimizer moments, ~3x the model) though
    nothing reads them once its model and summary are written: a 1.3B forest's runs kept ~190 GB."""
    straight = tmp_path / "straight"
    train(tiny_config(shards_dir, steps=12, ckpt_every=4), straight, progress=False)
    assert len(list_checkpoints(straight / "checkpoints")) == 2  # the default: the last two
    run = tmp_path / "run"
    train(tiny_config(shards_dir, steps=12, ckpt_every=4, keep_checkpoints=0, stop_at=8), run, progress=False)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000008"]  # paused: resumable
    summary = train(tiny_config(shards_dir, steps=12, ckpt_every=4, keep_checkpoints=0), run, progress=False)
    assert summary["resumed_from"] == 8 and not (run / "checkpoints").exists()
    assert _same(_final(run), _final(straight))
    again = train(tiny_config(shards_dir, steps=12, ckpt_every=4, keep_checkpoints=0), run, progress=False)
    assert again["tokens"] == summary["tokens"] and not (run / "checkpoints").exists()  # done: not trained
    # a run finished with keep 2 (or killed between its summary and the deletion) is cleared by a rerun
    # with keep 0, not trained, its model untouched
    model = _final(straight)
    train(tiny_config(shards_dir, steps=12, ckpt_every=4, keep_checkpoints=0), straight, progress=False)
    assert not (straight / "checkpoints").exists() and _same(_final(straight), model)
    assert not [p for p in straight.iterdir() if "trash" in p.name]


def test_keep_checkpoints_0_writes_no_checkpoint_at_the_last_step(shards_dir, tmp_path, monkeypatch):
    """A finishing run with keep 0 wrote a whole checkpoint at its last step (weights, both moments,
    hashed and fsynced) only to delete it a moment later. A kill before its final model resumes from the
    newest periodic checkpoint, to the same weights."""
    from elmforest.train import callbacks
    from elmforest.train.trainer import Trainer

    saved = []
    real = callbacks.save_checkpoint
    monkeypatch.setattr(
        callbacks, "save_checkpoint", lambda *a, **k: saved.append(a[3]["step"]) or real(*a, **k)
    )
    straight = tmp_path / "straight"
    train(tiny_config(shards_dir, steps=12, ckpt_every=4, keep_checkpoints=0), straight, progress=False)
    assert saved == [4, 8]
    saved.clear()
    train(
        tiny_config(shards_dir, steps=12, ckpt_every=4, keep_checkpoints=0, stop_at=12),
        tmp_path / "b",
        progress=False,
    )
    assert saved == [4, 8]  # stop_at at the end is the end
    saved.clear()
    train(
        tiny_config(shards_dir, steps=12, ckpt_every=4, keep_checkpoints=1), tmp_path / "k1", progress=False
    )
    kept = [p.name for p in list_checkpoints(tmp_path / "k1" / "checkpoints")]
    assert saved == [4, 8, 12] and kept == ["step-00000012"]  # keep 1: the last one, written and kept
    saved.clear()
    train(
        tiny_config(shards_dir, steps=12, ckpt_every=4, keep_checkpoints=0, stop_at=10),
        tmp_path / "p",
        progress=False,
    )
    assert saved == [4, 8, 10]  # a pause is resumed from its checkpoint
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(Trainer, "_save_final", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(shards_dir, steps=12, ckpt_every=4, keep_checkpoints=0), run, progress=False)
    summary = train(tiny_config(shards_dir, steps=12, ckpt_every=4, keep_checkpoints=0), run, progress=False)
    assert summary["resumed_from"] == 8 and _same(_final(run), _final(straight))
    assert not (run / "checkpoints").exists()


def test_keep_checkpoints_0_never_leaves_a_half_deleted_checkpoint(shards_dir, tmp_path, monkeypatch):
    """Deleted in place, a kill part-way left a checkpoint missing some files but still holding the
    state.json that makes it look complete. Renamed aside first, a cut deletion leaves only trash."""
    import elmforest.utils.io as io_mod

    def cut(path, *a, **kw):
        for f in sorted(Path(path).rglob("*.safetensors"))[:1]:
            f.unlink()
        raise KeyboardInterrupt

    run = tmp_path / "run"
    train(tiny_config(shards_dir, steps=8, ckpt_every=4), run, progress=False)
    monkeypatch.setattr(io_mod.shutil, "rmtree", cut)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(shards_dir, steps=8, ckpt_every=4, keep_checkpoints=0), run, progress=False)
    assert not (run / "checkpoints").exists()


def test_before_replace_runs_while_the_old_file_is_in_place_and_a_failure_keeps_it(tmp_path):
    """Forest.update moves the weights it records in before_replace: the manifest must change only once
    they have moved, so the hook runs before the rename, and its failure keeps the old file."""
    p = tmp_path / "f.json"
    write_json_atomic(p, {"v": 1})
    seen = []

    def hook():
        seen.append(json.loads(p.read_text()))

    write_json_atomic(p, {"v": 2}, before_replace=hook)
    assert seen == [{"v": 1}] and json.loads(p.read_text()) == {"v": 2}

    def refuse():
        raise OSError("weights could not move")

    with pytest.raises(OSError):
        write_json_atomic(p, {"v": 3}, before_replace=refuse)
    assert json.loads(p.read_text()) == {"v": 2}
    assert os.listdir(tmp_path) == ["f.json"]


def test_a_directory_replaced_twice_leaves_no_old_copy(tmp_path):
    from elmforest.utils.io import staged_dir

    for text in ("one", "two"):
        with staged_dir(tmp_path / "out") as d:
            (d / "x.txt").write_text(text)
    assert os.listdir(tmp_path) == ["out"] and (tmp_path / "out" / "x.txt").read_text() == "two"


def test_a_file_a_library_writes_through_atomic_path_gets_the_usual_mode(tmp_path):
    """safetensors writes 0600 onto the temporary it is given; atomic_path sets the usual mode (the
    clusterer's arrays go this way), or a shared forest's files were unreadable to its group."""
    from safetensors.torch import save_file

    p = tmp_path / "a.safetensors"
    with atomic_path(p) as t:
        save_file({"x": torch.zeros(2)}, str(t))
    assert stat.S_IMODE(p.stat().st_mode) == FILE_MODE


def test_an_atomic_write_is_synced_before_its_rename(tmp_path, monkeypatch):
    """Renamed before its bytes reach the disk, a power cut can leave the new name on an empty file;
    the folder not synced after, it can lose the rename."""
    import elmforest.utils.io as io_mod

    events = []
    real_fsync, real_replace = io_mod.os.fsync, io_mod.os.replace
    monkeypatch.setattr(
        io_mod.os,
        "fsync",
        lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd),
    )
    monkeypatch.setattr(
        io_mod.os, "replace", lambda a, b: events.append(("replace", str(a))) or real_replace(a, b)
    )
    write_json_atomic(tmp_path / "f.json", {"v": 1})
    kinds = [k for k, _ in events]
    assert "fsync" in kinds and kinds.index("fsync") < kinds.index("replace")
    first, renamed = kinds.index("fsync"), kinds.index("replace")
    assert events[first][1] == events[renamed][1]  # the temporary's own bytes
    assert ("fsync", str(tmp_path)) in events[renamed:]  # then the folder's new entry


def test_a_checkpoint_is_hashed_once_per_process_while_its_files_stay(shards_dir, tmp_path, monkeypatch):
    """Every expert of a forest verified the one seed_state again: its tensors' sha256 once per expert
    (8 x 1.3B: ~16 GB hashed 8 times). A file changed since (another mtime) is hashed, and caught."""
    from elmforest.train.checkpoint import verify_checkpoint

    train(tiny_config(shards_dir, steps=4, ckpt_every=2, stop_at=2), tmp_path / "r", progress=False)
    (ck,) = list_checkpoints(tmp_path / "r" / "checkpoints")
    hashed = []
    real = ckpt_mod.file_digest
    monkeypatch.setattr(ckpt_mod, "file_digest", lambda p: hashed.append(Path(p).name) or real(p))
    verify_checkpoint(ck)
    verify_checkpoint(ck)
    assert sorted(hashed) == ["model.safetensors", "optimizer.safetensors"]
    f = ck / "optimizer.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    mtime = f.stat().st_mtime_ns
    f.write_bytes(bytes(data))
    os.utime(f, ns=(mtime + 10**9, mtime + 10**9))
    with pytest.raises(ckpt_mod.CorruptCheckpoint, match="checksum mismatch"):
        verify_checkpoint(ck)


def test_a_model_a_kill_left_aside_while_replacing_it_is_put_back_by_its_readers(forest_dir, tmp_path):
    """A fine-tuning in place killed between replace_dir's two renames left the MoE at `.NAME.old~...`:
    `merge finetune` then said "no record of the experts' shards", then "not a model checkpoint", and
    the merge that would write there took nothing for a trained model to lose."""
    from elmforest.forest.manifest import Forest
    from elmforest.merge.moe import check_untrained
    from elmforest.model.build import resolve_model_dir

    dead = 4_194_305  # above Linux's largest pid: no such process
    expert = Forest.load(forest_dir).expert_dir(Forest.load(forest_dir).names[0])
    m = tmp_path / "m"
    aside = tmp_path / f".m.old~{HOST}~{dead}"
    shutil.copytree(expert, aside)
    assert resolve_model_dir(m) == m and (m / "config.json").is_file() and not aside.exists()
    (m / "elmforest_moe.json").write_text(json.dumps({"finetuning": {"steps": 20}}))
    os.rename(m, aside)
    with pytest.raises(AlreadyExists, match="fine-tuning"):  # a trained MoE, back in place, kept
        check_untrained(m)
    assert (m / "elmforest_moe.json").is_file() and not aside.exists()


def _disk_log(monkeypatch):
    """Every fsync (by the path it flushed) and every rename/replace (by its destination), in order."""
    log = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        log.append(("sync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def rename(a, b):
        real_rename(a, b)
        log.append(("rename", Path(b)))

    def replace(a, b):
        real_replace(a, b)
        log.append(("rename", Path(b)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    return log


def test_a_published_folder_is_on_disk_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    """A power cut, not a kill: every file and folder of a staged output is flushed before the rename
    that publishes it (a late-allocating file system could otherwise publish empty weights), and the
    parent folder after it (else the rename can be lost while later deletions are kept)."""
    from elmforest.utils import io

    staged, dst = tmp_path / "staged", tmp_path / "out"
    (staged / "sub").mkdir(parents=True)
    (staged / "model.safetensors").write_bytes(b"w" * 100)
    (staged / "sub" / "card.json").write_text("{}")
    dst.mkdir()
    log = _disk_log(monkeypatch)
    io.replace_dir(staged, dst)
    publish = log.index(("rename", dst))
    before, after = {p for k, p in log[:publish] if k == "sync"}, {p for k, p in log[publish:] if k == "sync"}
    assert {staged / "model.safetensors", staged / "sub" / "card.json", staged / "sub", staged} <= before
    assert tmp_path in after


def test_a_checkpoint_name_is_on_disk_before_older_ones_are_pruned(shards_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_rmtree, log = shutil.rmtree, _disk_log(monkeypatch)
    monkeypatch.setattr(
        ckpt_mod.shutil, "rmtree", lambda p, *a, **k: log.append(("rm", Path(p))) or real_rmtree(p, *a, **k)
    )
    train(tiny_config(shards_dir, steps=6, ckpt_every=3, keep_checkpoints=1), run, progress=False)
    root = run / "checkpoints"
    second = log.index(("rename", root / "step-00000006"))
    pruned = next(i for i, (k, p) in enumerate(log) if k == "rm" and p.name == ".trash-step-00000003")
    assert second < pruned and ("sync", root) in log[second:pruned]
    files = {p.name for k, p in log[:second] if k == "sync" and p.parent.name.startswith(".step-00000006")}
    assert {"model.safetensors", "optimizer.safetensors", "state.json"} <= files


def test_syncing_skips_what_is_not_a_regular_file_and_a_published_write_stands(tmp_path, monkeypatch):
    """A FIFO in an unpacked package blocked sync_tree's open for ever; a folder sync that fails after
    the rename (a folder writable, not readable) said "nothing was changed" of a file already replaced."""
    from elmforest.utils import io

    (tmp_path / "t").mkdir()
    os.mkfifo(tmp_path / "t" / "fifo")
    (tmp_path / "t" / "link").symlink_to(tmp_path / "nowhere")
    import threading

    synced = threading.Thread(target=io.sync_tree, args=(tmp_path / "t",), daemon=True)
    synced.start()
    synced.join(timeout=30)
    if synced.is_alive():  # blocked in the FIFO's open: a writer frees it, then the test fails
        os.close(os.open(tmp_path / "t" / "fifo", os.O_WRONLY | os.O_NONBLOCK))
    assert not synced.is_alive()
    real = os.open

    def refused(path, flags, *a):
        if flags & os.O_DIRECTORY:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, flags, *a)

    monkeypatch.setattr(os, "open", refused)
    write_json_atomic(tmp_path / "f.json", {"v": 2})
    assert json.loads((tmp_path / "f.json").read_text()) == {"v": 2}
    with pytest.raises(PermissionError):
        io.sync_dir(tmp_path)  # before a rename it is an error
    monkeypatch.setattr(os, "open", real)
    real_fsync = os.fsync

    def unsupported(fd):  # a file system that cannot sync a folder: done, so checkpoints still prune
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", unsupported)
    assert io.sync_dir(tmp_path) is True and io.sync_dir(tmp_path, published=True) is True
