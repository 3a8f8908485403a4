"""Errors a person can act on: one line naming the file and the problem, exit status 2, nothing changed;
advice names flags that exist; defaults come from what the user gave; bugs keep their traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_corpus

from elmforest.cli import main
from elmforest.forest.manifest import Forest
from elmforest.utils.errors import UserError


def _run(argv, capsys) -> tuple[int, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse refusing an argument
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_a_truncated_config_names_its_file(shards_dir, tmp_path, capsys):
    bad = tmp_path / "cfg.json"
    bad.write_text('{\n  "model": ')
    rc, out = _run(["train", "--shards", shards_dir, "--out", tmp_path / "r", "--config", bad], capsys)
    assert rc == 2 and str(bad) in out and "Traceback" not in out
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["eval", "--model", "m", "--data", "d", "--batch-size", "0"], "--batch-size"),
        (["eval", "--model", "m", "--data", "d", "--max-bytes", "-1"], "--max-bytes"),
        (["generate", "--forest", "f", "--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens"),
        (["forest", "train", "--forest", "f", "--shards", "s", "--workers", "0"], "--workers"),
        (["sweep", "--shards", "s", "--out", "o", "--lrs", "1e-3,abc"], "--lrs"),
        (["merge", "moe", "--forest", "f", "--out", "o", "--top-k", "0"], "--top-k"),
    ],
)
def test_bad_numbers_are_refused_naming_the_flag(argv, flag, capsys):
    rc, out = _run(argv, capsys)
    assert rc == 2 and flag in out


def test_bad_average_weights_name_the_item(forest_dir, tmp_path, capsys):
    rc, out = _run(
        ["forest", "average", "--forest", forest_dir, "--out", tmp_path / "a", "--weights", "code=abc"],
        capsys,
    )
    assert rc == 2 and "code=abc" in out and not (tmp_path / "a").exists()


def test_a_paused_run_is_reported_as_paused(shards_dir, tmp_path, capsys):
    argv = ["train", "--shards", shards_dir, "--out", tmp_path / "r", "--preset", "tiny", "--no-progress"]
    rc, out = _run([*argv, "--set", "train.steps=8", "--set", "train.stop_at=4"], capsys)
    assert rc == 0 and "paused at step 4 of 8" in out
    assert main(["eval", "--model", str(tmp_path / "r"), "--data", str(shards_dir)]) == 2
    assert "a run directory whose training has not finished" in capsys.readouterr().err
    rc, out = _run([*argv, "--set", "train.steps=8"], capsys)
    assert rc == 0 and "done: 8 steps" in out
    # a run an older version saved with a pause past its end (it finished) still loads to be run again
    for saved in (tmp_path / "r" / "run_config.json", tmp_path / "r" / "model" / "elmforest_run.json"):
        if saved.is_file():
            cfg = json.loads(saved.read_text())
            cfg["train"]["stop_at"] = 100
            saved.write_text(json.dumps(cfg))
    rc, out = _run([*argv, "--set", "train.steps=8"], capsys)
    assert rc == 0 and "done: 8 steps" in out, out


def test_what_would_fail_inside_torch_is_refused_in_one_line(shards_dir, forest_dir, tmp_path, capsys):
    """A device torch does not know, a batch torchrun's processes cannot split, windows past the
    model's positions: each was a traceback (from torch, from every rank, or from the embedding)."""

    model = Forest.load(forest_dir).expert_dir(Forest.load(forest_dir).names[0])
    for argv, said in (
        (["eval", "--model", str(model), "--data", str(shards_dir), "--device", "tpu"], "expected auto, cpu"),
        (["eval", "--model", str(model), "--data", str(shards_dir), "--seq-len", "4096"], "2048 positions"),
        (["eval", "--forest", str(forest_dir), "--data", str(shards_dir), "--seq-len", "4096"], "2048 positions"),
        (
            ["train", "--shards", str(shards_dir), "--out", str(tmp_path / "n"), "--preset", "tiny", "--nproc", "2",
             "--set", "train.batch_size=9"],
            "must divide evenly among 2 processes",
        ),
        (
            ["train", "--shards", str(shards_dir), "--out", str(tmp_path / "n"), "--preset", "tiny",
             "--set", "train.seq_len=4096"],
            "4096 is longer than the model's 2048 positions (max_position_embeddings of preset tiny)",
        ),
        (  # the user's own limit is named as theirs, not the preset's
            ["train", "--shards", str(shards_dir), "--out", str(tmp_path / "n"), "--preset", "tiny",
             "--set", "model.max_position_embeddings=16"],
            "64 is longer than the model's 16 positions (model.max_position_embeddings=16 as set)",
        ),
        (  # an ImportError traceback; flex failed at the first backward, leaving the run's files
            ["train", "--shards", str(shards_dir), "--out", str(tmp_path / "n"), "--preset", "tiny",
             "--set", "model.attn_implementation=flash_attention_2"],
            "flash_attention_2 runs on CUDA GPUs only (device cpu); use sdpa",
        ),
        (
            ["train", "--shards", str(shards_dir), "--out", str(tmp_path / "n"), "--preset", "tiny",
             "--set", "model.attn_implementation=flex_attention", "--set", "train.steps=3"],
            "flex_attention cannot train on CPU",
        ),
    ):  # fmt: skip
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err
    assert not (tmp_path / "n").exists()  # refused before torchrun started anything


def test_only_the_projects_errors_become_one_line(shards_dir, tmp_path, monkeypatch):
    """A KeyError is a bug in elmforest: it keeps its traceback instead of passing for a user error."""

    def bug(*a, **k):
        raise KeyError("steps")

    monkeypatch.setattr("elmforest.train.trainer.train", bug)
    with pytest.raises(KeyError):
        main(["train", "--shards", str(shards_dir), "--out", str(tmp_path / "r"), "--preset", "tiny"])


def test_unusable_domain_names_are_refused_before_any_training(tokenizer_dir, tmp_path, capsys):
    data = make_corpus(tmp_path / "data", 40)
    (data / "legal.jsonl").rename(data / "my data ✓.jsonl")
    for f in data.glob("*.jsonl"):  # the file name is the domain
        f.write_text(
            "\n".join(
                json.dumps({k: v for k, v in json.loads(x).items() if k != "domain"})
                for x in f.read_text().splitlines()
            )
            + "\n"
        )
    sh = tmp_path / "sh"
    assert (
        _run(
            ["shards", "build", "--data", data, "--tokenizer", tokenizer_dir, "--out", sh, "--no-progress"],
            capsys,
        )[0]
        == 0
    )
    rc, out = _run(
        ["forest", "train", "--forest", tmp_path / "f", "--shards", sh, "--preset", "tiny", "--no-progress"],
        capsys,
    )
    assert rc == 2 and "my data ✓" in out and "rename its data file" in out
    assert not (tmp_path / "f" / "runs").exists()  # nothing trained


def test_experts_of_a_checkpoint_seed_take_the_seeds_own_config(forest_dir, shards_dir, tmp_path, capsys):
    """After `forest seed --from-checkpoint`, `forest expert` used the cpu-small preset's full schedule."""
    seed = Path(forest_dir) / "runs" / "dense" / "model"  # an elmforest export: carries elmforest_run.json
    f = tmp_path / "f"
    # training options beside it were parsed and dropped without a word (the checkpoint trains no further)
    argv = ["forest", "seed", "--forest", f, "--shards", shards_dir, "--from-checkpoint", seed]
    rc, out = _run([*argv, "--preset", "tiny", "--set", "train.steps=8", "--seed-share", "0.3"], capsys)
    assert rc == 2 and "--seed-share, --preset, --set: not used with --from-checkpoint" in out
    assert not f.exists()
    assert (
        _run(["forest", "seed", "--forest", f, "--shards", shards_dir, "--from-checkpoint", seed], capsys)[0]
        == 0
    )
    rc, out = _run(
        [
            "forest",
            "expert",
            "--forest",
            f,
            "--shards",
            shards_dir,
            "--domain",
            "code",
            "--no-progress",
            "--set",
            "train.steps=6",
        ],
        capsys,
    )
    assert rc == 0 and "the seed's own training config" in out
    run_cfg = json.loads((f / "runs" / "code" / "run_config.json").read_text())
    own = json.loads((seed / "elmforest_run.json").read_text())
    assert run_cfg["model"]["preset"] == own["model"]["preset"] == "tiny"
    assert run_cfg["train"]["seq_len"] == own["train"]["seq_len"] and run_cfg["train"]["steps"] == 6


def test_a_checkpoint_seeds_broken_run_config_is_said_when_taken_in_and_named_when_used(
    forest_dir, shards_dir, tmp_path, capsys
):
    """An unknown key in the checkpoint's elmforest_run.json was taken in unsaid, then failed the first
    `forest expert` with an error naming no file."""
    seed = tmp_path / "ckpt"
    shutil.copytree(Path(forest_dir) / "runs" / "dense" / "model", seed)
    cfg = json.loads((seed / "elmforest_run.json").read_text())
    cfg["model"]["new_field"] = 1
    (seed / "elmforest_run.json").write_text(json.dumps(cfg))
    f = tmp_path / "f"
    rc, out = _run(
        ["forest", "seed", "--forest", f, "--shards", shards_dir, "--from-checkpoint", seed], capsys
    )
    assert rc == 0 and f"note: {seed / 'elmforest_run.json'}: " in out and "need --preset or --config" in out
    argv = ["forest", "expert", "--forest", f, "--shards", shards_dir, "--domain", "code", "--no-progress"]
    rc, out = _run(argv, capsys)  # where the file is used: refused, naming it once
    assert rc == 2 and out.count(str(seed / "elmforest_run.json")) == 0 and "new_field" in out
    assert out.count("elmforest_run.json") == 1 and not (f / "runs").exists()


def test_advice_in_errors_names_flags_that_exist(forest_dir, shards_dir, tmp_path, capsys):
    f = tmp_path / "f"
    shutil.copytree(forest_dir, f)
    name = Forest.load(f).names[0]
    assert _run(["forest", "remove", "--forest", f, "--expert", name], capsys)[0] == 0
    argv = ["forest", "expert", "--forest", f, "--shards", shards_dir, "--domain", name, "--no-progress"]
    rc, out = _run(argv, capsys)
    assert rc == 2 and "--force" in out
    rc, usage = _run(["forest", "expert", "--help"], capsys)
    assert rc == 0 and "--force" in usage  # the advised flag exists
    rc, out = _run([*argv, "--force", "--set", "train.seed=3"], capsys)
    assert rc == 0 and name in Forest.load(f).names  # the owner asked for it back


def test_a_deleted_expert_directory_is_noticed_and_restored(forest_dir, shards_dir, tmp_path, capsys):
    f = tmp_path / "f"
    shutil.copytree(forest_dir, f)
    forest = Forest.load(f)
    name = forest.names[0]
    shutil.rmtree(f / "experts" / name)
    argv = ["forest", "train", "--forest", f, "--shards", shards_dir, "--preset", "tiny", "--no-progress"]
    argv += ["--set", "train.steps=24", "--set", "train.batch_size=6"]
    rc, out = _run(argv, capsys)
    assert rc == 0, out
    assert f"note: expert {name}" in (f / "runs" / name / "job.log").read_text()
    assert Forest.load(f).intact(name) is None
    # a --set the seed was not trained with would not reach the experts: refused, before any job runs
    shutil.rmtree(f / "experts" / name)
    rc, out = _run([*argv, "--set", "optim.weight_decay=0.123"], capsys)
    assert (
        rc == 2
        and "its seed was trained with optim.weight_decay" in out
        and not (f / "experts" / name).exists()
    )
    # a tracker whose package is missing: said once, before any job (each job failed alone on it)
    import sys

    sys.modules["mlflow"], had = None, sys.modules.get("mlflow")
    try:
        rc, out = _run([*argv, "--set", "train.trackers=[mlflow]"], capsys)
    finally:
        sys.modules.pop("mlflow") if had is None else sys.modules.__setitem__("mlflow", had)
    assert rc == 2 and out.count("mlflow cannot be imported") == 1, out
    assert not (f / "experts" / name).exists()


def test_a_run_of_a_missing_or_doubled_tracker_is_refused_before_its_folder_is_written(
    shards_dir, tmp_path, capsys, monkeypatch
):
    """`train` refused a missing tracker package only after writing run_config.json and inputs.json into
    a new run folder; `[wandb,wandb]` was taken. MLflow's network defaults (7 retries, 120 s each) held
    an unreachable server's run up for 4.6 minutes: ours apply where the user set none."""
    import sys

    from elmforest.train import tracking_mlflow

    argv = ["train", "--out", tmp_path / "r", "--shards", shards_dir, "--preset", "tiny", "--no-progress"]
    monkeypatch.setitem(sys.modules, "mlflow", None)
    rc, out = _run([*argv, "--set", "train.trackers=[mlflow]"], capsys)
    assert rc == 2 and "mlflow cannot be imported" in out and not (tmp_path / "r").exists(), out
    rc, out = _run([*argv, "--set", "train.trackers=[tensorboard,tensorboard]"], capsys)
    assert rc == 2 and "train.trackers: ['tensorboard'] named twice" in out
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    env = tracking_mlflow._env()
    assert env["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "20" and "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in env


def test_a_newcomer_sees_the_defaults_progress_lines_and_no_broken_pipe(shards_dir, tmp_path, capsys):
    rc, out = _run(["presets"], capsys)
    assert rc == 0 and "train: 256 steps x batch 16 x 256 tokens, LR 0.002, experts 0.008" in out
    assert (
        "batch 32 (8 x 4 accumulated) x 1024 tokens" in out
    )  # batch_size 8 is what --set and run_config say
    # the model's position table (what eval --seq-len may reach), not the training length under it
    assert "tiny       d=64    layers=2   heads=4   positions=2048" in out
    assert out.count("1.3M parameters") == 1  # counted once, not also in the description
    rc, out = _run(
        [
            "train",
            "--shards",
            shards_dir,
            "--out",
            tmp_path / "r",
            "--preset",
            "tiny",
            "--no-progress",
            "--set",
            "train.steps=10",
            "--set",
            "train.log_every=5",
        ],
        capsys,
    )
    assert rc == 0 and "r: step 5/10 loss" in out and "r: step 10/10 loss" in out  # never silent
    import subprocess
    import sys

    p = subprocess.Popen(
        [sys.executable, "-m", "elmforest.cli", "shards", "show", str(shards_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    p.stdout.close()  # the reader leaves at once, as `| head` does once it has its lines
    err = p.stderr.read()
    assert p.wait() == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_sweep_grids_are_one_comma_separated_value(shards_dir, tmp_path, capsys):
    argv = ["sweep", "--shards", shards_dir, "--out", tmp_path / "s", "--preset", "tiny"]
    rc, out = _run([*argv, "--lrs", "1e-3,2e-3"], capsys)  # parsed as a grid: refused for its size only
    assert rc == 2 and "at least 4" in out and "Traceback" not in out
    rc, out = _run([*argv, "--expert-lrs", "1e-3,-2"], capsys)
    assert rc == 2 and "--expert-lrs" in out
    # past float32: its job failed after the grid's other runs had trained
    rc, out = _run([*argv, "--arm", "dense", "--lrs", "1e39,1e-3,2e-3,4e-3"], capsys)
    assert rc == 2 and "grid must hold positive learning rates of at most 3.4e+38" in out, out
    # refused after the folder was made (the plan, the expert arm's need of a dense sweep): no folder left
    rc, out = _run(
        [*argv, "--arm", "dense", "--lrs", "1e-3,2e-3,4e-3,8e-3", "--set", "train.steps=1"], capsys
    )
    assert rc == 2 and "at least 2 steps" in out, out
    rc, out = _run([*argv, "--arm", "experts", "--expert-lrs", "1e-3,2e-3,4e-3,8e-3"], capsys)
    assert rc == 2 and "branches from the best dense run" in out, out
    rc, out = _run(
        [*argv, "--arm", "experts", "--dense-lr", "1e39", "--expert-lrs", "1e-3,2e-3,4e-3,8e-3"], capsys
    )
    assert rc == 2 and "--dense-lr 1e+39: a positive learning rate of at most" in out, (
        out
    )  # its seed run's files
    assert not (tmp_path / "s").exists()


def test_a_sweeps_finished_runs_keep_no_checkpoints_unless_asked(shards_dir, tmp_path, monkeypatch, capsys):
    """~80% of a sweep's disk was its finished runs' checkpoints, which nothing reads again."""
    import elmforest.launch.sweep as sweep_mod

    seen = []

    def stop(shards, out, run_cfg, **kw):
        seen.append(run_cfg.train.keep_checkpoints)
        raise UserError("stopped here")

    monkeypatch.setattr(sweep_mod, "sweep", stop)
    argv = ["sweep", "--shards", shards_dir, "--out", tmp_path / "s", "--preset", "tiny"]
    assert _run(argv, capsys)[0] == 2
    assert _run([*argv, "--set", "train.keep_checkpoints=3"], capsys)[0] == 2
    assert seen == [0, 3]


def test_sigterm_unwinds_like_ctrl_c_leaving_no_temporaries(shards_dir, tmp_path):
    """A killed `shards reorder` left its half-written copy (as big as the shards) beside --out."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "reordered"
    script = f"""
import os, signal, time
from elmforest.data import reorder
def slow(*a, **k):
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    except SystemExit:  # as Ray's wait re-raises it: another SystemExit, its status lost
        raise SystemExit("shut down")
reorder.reorder_staging = slow
from elmforest.cli import main
raise SystemExit(main(["shards", "reorder", {str(shards_dir)!r}, "--out", {str(out)!r}, "--order", "random"]))
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, p.stderr
    assert "terminated (SIGTERM)" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())  # no .reordered.tmp~... left
    # the handler is the caller's again after main returns (tests call main in-process)
    before = signal.getsignal(signal.SIGTERM)
    main(["presets"])
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_single_valued_option_given_twice_is_refused(capsys):
    """`--data A --data B` read only B (click keeps the last value): a whole source dropped silently."""
    rc, out = _run(["shards", "build", "--data", "a", "--data=b", "--tokenizer", "t", "--out", "o"], capsys)
    assert rc == 2 and "--data given more than once" in out
    # repeatable options still repeat
    rc, out = _run(["train", "--shards", "s", "--out", "o", "--set", "x=1", "--set", "y=2"], capsys)
    assert "more than once" not in out


def test_executor_options_of_the_other_executor_are_refused(shards_dir, tmp_path, capsys):
    """`--executor ray --workers 2` ran one Ray job per CPU and `--address` without `--executor ray` ran
    locally, both without a word."""
    base = ["forest", "train", "--forest", tmp_path / "f", "--shards", shards_dir, "--preset", "tiny"]
    for extra, said in [
        (["--executor", "ray", "--workers", "2"], "--workers 2 is the local executor's"),
        (["--address", "auto"], "--address: Ray's (--executor ray)"),
        (["--max-retries", "1"], "--max-retries: Ray's"),
        (["--cpus-per-expert", "2"], "--cpus-per-expert (--cpus-per-job): Ray's"),
        (["--cpus-per-expert", "1"], "--cpus-per-expert (--cpus-per-job): Ray's"),  # taken, then dropped
        (["--gpus-per-expert", "1"], "--gpus-per-expert (--gpus-per-job): Ray's"),  # trained on the CPU
        # two busy processes on one reserved CPU
        (["--executor", "ray", "--procs-per-expert", "2", "--cpus-per-expert", "1"], "--cpus-per-expert 1 <"),
    ]:
        rc, out = _run([*base, *extra], capsys)
        assert rc == 2 and said in out, out
    assert not (tmp_path / "f").exists()  # refused before the forest was made
    rc, out = _run(
        ["sweep", "--shards", shards_dir, "--out", tmp_path / "s", "--workers", "2", "--executor", "ray"],
        capsys,
    )
    assert rc == 2 and "--workers 2 is the local executor's" in out
    for verb in (
        ["sweep", "--shards", shards_dir, "--out", tmp_path / "s"],
        ["study", "tiny", "--out", tmp_path / "t"],
    ):
        rc, out = _run([*verb, "--cpus-per-job", "1"], capsys)  # the local executor ran as if not given
        assert rc == 2 and "--cpus-per-expert (--cpus-per-job): Ray's" in out, out
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()


def test_ray_reserves_a_cpu_for_each_data_parallel_process(shards_dir, tmp_path, capsys, monkeypatch):
    """`--procs-per-expert 2` on Ray reserved the default 1 CPU for two busy processes."""
    import elmforest.launch.executor as executor

    asked = []

    def make(kind, address, cpus, *rest):
        asked.append((kind, cpus))
        raise UserError("stop here")

    monkeypatch.setattr(executor, "make_executor", make)
    base = ["forest", "train", "--forest", tmp_path / "f", "--shards", shards_dir, "--preset", "tiny"]
    for extra in (["--executor", "ray", "--procs-per-expert", "2"], ["--procs-per-expert", "2"]):
        rc, out = _run([*base, *extra], capsys)
        assert rc == 2 and "stop here" in out
    assert asked == [("ray", 2.0), ("local", None)]  # none given: the local executor's refusal stays quiet


def test_a_ray_address_where_nothing_listens_is_said(shards_dir, tmp_path, capsys):
    """ray.init retried such an address for minutes, printing only its own GCS timeouts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    argv = ["forest", "train", "--forest", tmp_path / "f", "--shards", shards_dir, "--preset", "tiny"]
    rc, out = _run([*argv, "--executor", "ray", "--address", f"127.0.0.1:{port}"], capsys)
    assert rc == 2 and f"Ray at --address 127.0.0.1:{port}: nothing answers there" in out, out
    assert not (tmp_path / "f").exists()  # said before the forest was made (an empty one was left)


def test_ctrl_c_says_it_was_interrupted_and_how_to_continue(shards_dir, tmp_path, monkeypatch, capsys):
    """Typer turns Ctrl-C into exit 130 without a word: the user could not tell a stop from a crash."""

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("elmforest.train.trainer.train", interrupted)
    rc = main(["train", "--shards", str(shards_dir), "--out", str(tmp_path / "r"), "--preset", "tiny"])
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted (Ctrl-C)" in err and "last checkpoint" in err, err
    monkeypatch.setattr("elmforest.model.presets.PRESETS", type("P", (), {"values": interrupted})())
    assert main(["presets"]) == 130
    err = capsys.readouterr().err
    assert "interrupted (Ctrl-C)" in err and "checkpoint" not in err, err


def test_sigterm_is_said_once_with_how_to_continue(shards_dir, tmp_path, monkeypatch, capsys):
    """SIGTERM's line lacked Ctrl-C's hint, and a second SIGTERM while unwinding printed it again."""
    import os
    import signal
    import time

    def terminated_twice(*a, **k):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        except SystemExit:  # a second one while unwinding (a process group's, a supervisor's retry)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)

    monkeypatch.setattr("elmforest.train.trainer.train", terminated_twice)
    rc = main(["train", "--shards", str(shards_dir), "--out", str(tmp_path / "r"), "--preset", "tiny"])
    err = capsys.readouterr().err
    assert rc == 128 + signal.SIGTERM and err.count("terminated (SIGTERM)") == 1, err
    assert "the same command again continues from the last checkpoint" in err, err


def test_more_processes_than_cores_is_a_warning(shards_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("elmforest.utils.threads.cpu_cores", lambda: 2)
    monkeypatch.setattr("elmforest.train.cli._relaunch_distributed", lambda n: 0)  # no torchrun here
    argv = ["train", "--shards", str(shards_dir), "--out", str(tmp_path / "r"), "--preset", "tiny"]
    assert main([*argv, "--nproc", "4", "--set", "train.batch_size=8", "--set", "train.device=cpu"]) == 0
    assert "warning: --nproc 4 on 2 CPU core(s)" in capsys.readouterr().err
    assert main([*argv, "--nproc", "2", "--set", "train.batch_size=8", "--set", "train.device=cpu"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_an_expert_batch_that_processes_cannot_share_is_refused_before_the_forest_is_made(
    shards_dir, tmp_path, capsys
):
    argv = [
        "forest",
        "train",
        "--forest",
        str(tmp_path / "f"),
        "--shards",
        str(shards_dir),
        "--preset",
        "tiny",
    ]
    assert main([*argv, "--procs-per-expert", "7", "--set", "train.batch_size=4"]) == 2
    err = capsys.readouterr().err
    assert "must divide among --procs-per-expert 7" in err
    # the batch the plan trains at, where it is not the one asked for: said (4 over 3 experts -> 3)
    assert "note: dense batch 4 -> 3, a multiple of the 3 experts (1 sequence(s) each)" in err
    assert main([*argv, "--procs-per-expert", "7", "--set", "train.batch_size=6"]) == 2
    assert "note: dense batch" not in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def test_sigterm_is_said_once_by_the_launcher_not_by_each_data_parallel_rank(monkeypatch, capsys):
    """`train --nproc 2` under SIGTERM printed the terminated line from the launcher and each rank."""
    import signal

    from elmforest import cli

    for rank, said in ((None, True), ("1", False)):
        monkeypatch.setattr(cli, "_STOPPED_BY", [])
        if rank is None:
            monkeypatch.delenv("ELMFOREST_LAUNCHED_BY", raising=False)
        else:
            monkeypatch.setenv("ELMFOREST_LAUNCHED_BY", rank)
        with pytest.raises(SystemExit) as e:
            cli._terminated(signal.SIGTERM, None)
        assert e.value.code == 143 and cli._STOPPED_BY == [143]
        assert ("terminated (SIGTERM)" in capsys.readouterr().err) is said


def test_out_of_range_settings_are_refused_before_anything_is_written(
    shards_dir, forest_dir, corpus, tmp_path, capsys
):
    """Each was a traceback from torch or scikit-learn after the run folder was written (a seed of
    2**64, an lr past float32), trained nothing without a word (an infinite eps), read only the last of
    two keys of a --config file, trained an expert on another domain than the forest records, or was
    dropped (a top-k or cluster option given to another mode)."""
    run = tmp_path / "r"
    train = ["train", "--shards", shards_dir, "--out", run, "--preset", "tiny", "--set", "train.steps=4"]
    dup = tmp_path / "dup.json"
    dup.write_text('{"train": {"steps": 4, "steps": 5000000}}')
    study = tmp_path / "s.yaml"
    study.write_text("preset: tiny\n")
    for side in ("A", "B"):  # two out-of-domain sources of one name: refused by the dry run too
        (tmp_path / side).mkdir()
        (tmp_path / side / "news.jsonl").write_text('{"text": "a day of news"}\n')
    two_ood = f"ood=[{tmp_path / 'A'}, {tmp_path / 'B'}]"
    f = tmp_path / "f"
    shutil.copytree(forest_dir, f, symlinks=True)
    ev = ["eval", "--forest", forest_dir, "--data", shards_dir, "--json", tmp_path / "e.json"]
    for argv, said in (
        ([*train, "--set", "train.seed=18446744073709551616"], "train.seed must be in [0, 2**64)"),
        ([*train, "--set", "train.stop_at=5"], "is past train.steps=4: the run would finish, not pause"),  # steps=4
        ([*train, "--set", "optim.lr=1e39"], "optim.lr: expected a finite number of at most 3.4e+38"),
        ([*train, "--set", "optim.eps=Infinity"], "optim.eps: expected a finite number"),
        ([*train, "--set", "model.rms_norm_eps=Infinity"], "model.rms_norm_eps: expected a finite number"),
        ([*train, "--config", dup], "key 'steps' is given twice"),
        ([*train, "--set", "optim.weight_decay=1" + "0" * 400], "too large for a number"),
        ([*train, "--set", "train.steps=1" + "0" * 26], "train.steps: expected an integer below 2**63"),
        (["study", study, "--dry-run", "--set", "dense_budgets=[0.5, 1, 2, 1e300]"], "below 2**63"),
        # steps left to the preset's: its steps count, not 1
        (["study", study, "--dry-run", "--set", "dense_budgets=[0.5, 1, 2, 1e18]"], "1e+18 x 40"),
        (["study", study, "--dry-run", "--set", "seeds=[0, 1"], "seeds's value is not valid YAML"),
        (["study", study, "--dry-run", "--set", two_ood], "same name from more than one source (news in"),
        (["study", study, "--dry-run", "--set", "seeds=[0, 18446744073709551616]"], "in [0, 2**64)"),
        (["cluster", "fit", "--data", corpus, "--out", tmp_path / "c", "--k", "2", "--seed", "4294967296"], "2**32"),
        (
            ["forest", "expert", "--forest", f, "--shards", shards_dir, "--domain", "code", "--name", "c2",
             "--set", "data.domains=[legal]"],
            "an expert's data is its --domain",
        ),
        (  # the same as a whole section went round that check: recorded as code, trained on legal
            ["forest", "expert", "--forest", f, "--shards", shards_dir, "--domain", "code", "--name", "c2",
             "--set", 'data={"domains": ["legal"]}'],
            "data is a section; set its fields one by one",
        ),
        (  # its valid split is where the forest's priors come from
            ["forest", "expert", "--forest", f, "--shards", shards_dir, "--domain", "code", "--name", "c2",
             "--set", "data.split=valid"],
            "an expert's data is its --domain",
        ),
        ([*ev, "--select", "prefix:4"], "--select prefix:4: not used by --mode ensemble"),
        ([*ev, "--mode", "topk", "--route", "segment:8"], "--route segment:8: not used by --mode topk"),
        # taken and dropped without a word (some recorded in the JSON beside the prior they never shaped)
        ([*ev, "--mode", "average", "--k", "3"], "--k 3: not used by --mode average"),
        ([*ev, "--mode", "average", "--weighting", "demix"], "--weighting demix: not used by --mode average"),
        ([*ev, "--mode", "cluster", "--prior", "uniform"], "--prior uniform: not used by --mode cluster"),
        # typed at their defaults: a choice too, refused alike (eval's and serve's)
        ([*ev, "--mode", "average", "--k", "2"], "--k 2: not used by --mode average"),
        ([*ev, "--mode", "topk", "--temperature", "0.1"], "--temperature 0.1: not used by --mode topk"),
        (["serve", "--forest", f, "--mode", "average", "--k", "2", "--port", "0"], "k=2 (--k): not used by mode=average"),
        (["serve", "--forest", f, "--weighting", "posterior", "--mode", "cluster", "--port", "0"], "weighting=posterior"),
        (["serve", "--forest", f, "--prior", "uniform", "--mode", "cluster", "--port", "0"], "prior=uniform (--prior): not used"),
        ([*ev, "--prior", "uniform", "--prior-ema", "0.3"], "--prior-ema 0.3: it estimates the cached prior"),
        ([*ev, "--prior", "uniform", "--prior-batches", "3"], "--prior uniform does not read"),
    ):  # fmt: skip
        rc, out = _run(argv, capsys)
        assert rc == 2 and said in out and "Traceback" not in out, (argv, out)
    assert not run.exists() and not (tmp_path / "c").exists() and not (f / "runs" / "c2").exists()
    assert not (tmp_path / "e.json").exists()


def test_a_refused_setting_leaves_no_forest_or_quickstart_folder(shards_dir, corpus, tmp_path, capsys):
    """`forest seed` and `forest train` made the forest (and the seed's run folder, for a domain the
    shards do not hold) before the config was refused; the quickstart built its corpus, tokenizer and
    shards first."""
    for verb in ("seed", "train"):
        for bad, said in (
            ("train.steps=abc", "expected an integer"),
            ("data.domains=[nope]", "holds no training documents of nope"),
        ):
            where = tmp_path / f"{verb}-f"
            argv = [
                "forest",
                verb,
                "--forest",
                where,
                "--shards",
                shards_dir,
                "--preset",
                "tiny",
                "--set",
                bad,
            ]
            rc, out = _run(argv, capsys)
            assert rc == 2 and said in out and not where.exists(), (verb, bad, out)
    for bad, said in (("train.steps=abc", "expected an integer"), ("optim.lr=-1", "optim.lr must be")):
        argv = ["quickstart", "--out", tmp_path / "qs", "--preset", "tiny", "--data", corpus, "--set", bad]
        rc, out = _run(argv, capsys)
        assert rc == 2 and said in out and not (tmp_path / "qs").exists(), out


def test_a_run_refused_for_its_start_or_its_frozen_experts_leaves_no_run_folder(
    shards_dir, forest_dir, tmp_path, capsys
):
    """An expert asked for fewer steps than its seed's checkpoint, and frozen experts on a dense model,
    were refused after the run's run_config.json and inputs.json were written (the second naming the
    router losses)."""
    f = tmp_path / "f"
    shutil.copytree(forest_dir, f, symlinks=True)
    argv = ["forest", "expert", "--forest", f, "--shards", shards_dir, "--domain", "code", "--name", "c2"]
    rc, out = _run([*argv, "--set", "train.steps=1"], capsys)
    assert rc == 2 and "not before train.steps=1" in out and not (f / "runs" / "c2").exists(), out
    run = tmp_path / "r"
    argv = [
        "train",
        "--shards",
        shards_dir,
        "--out",
        run,
        "--preset",
        "tiny",
        "--set",
        "train.frozen_experts=[0]",
    ]
    rc, out = _run(argv, capsys)
    assert (
        rc == 2 and "train.frozen_experts need(s) a mixture-of-experts model" in out and not run.exists()
    ), out


def test_ctrl_c_before_the_cli_has_set_up_its_handling_is_one_line(monkeypatch, capsys):
    """Ctrl-C while the CLI's modules imported printed a traceback (the console script's window)."""
    from elmforest import cli
    from elmforest.console import entry

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", interrupted)
    assert entry() == 130
    assert capsys.readouterr().err == "elmforest: interrupted (Ctrl-C)\n"
    monkeypatch.setattr(cli, "main", lambda: 0)
    assert entry() == 0
