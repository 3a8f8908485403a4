import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from elmforest.config import OptimConfig, apply_overrides
from elmforest.data.shards import Shards
from elmforest.eval.bpb import evaluate, evaluate_shards
from elmforest.model.build import build_model
from elmforest.train.checkpoint import list_checkpoints
from elmforest.train.schedule import lr_at
from elmforest.train.trainer import train
from elmforest.utils.errors import UserError


def _weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def test_train_then_eval_loss_falls(shards_dir, tmp_path):
    cfg = tiny_config(shards_dir, steps=60, log_every=5)
    summary = train(cfg, tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(5, 61, 5))
    assert lines[-1]["loss"] < lines[0]["loss"] - 1.0
    assert summary["tokens"] == 60 * cfg.train.tokens_per_step
    assert summary["flops"] == summary["tokens"] * summary["flops_per_token"]
    # the run directory: config, HF checkpoint, tokenizer, metrics, no pickle anywhere
    run = tmp_path / "run"
    for name in [
        "run_config.json",
        "summary.json",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
    ]:
        assert (run / name).is_file(), name
    suffixes = {p.suffix for p in run.rglob("*") if p.is_file() and p.parent.name != "tensorboard"}
    assert suffixes <= {".json", ".jsonl", ".safetensors", ".lock"}, suffixes  # .lock: an empty flock file
    # TensorBoard's event files (protobuf records, train.trackers' default) sit in their own folder
    assert [p.name.split(".")[:3] for p in (run / "tensorboard").iterdir()] == [["events", "out", "tfevents"]]
    trained = evaluate(run, shards_dir, split="test", progress=False)
    untrained_model = build_model(cfg.model, Shards(shards_dir).vocab_size, Shards(shards_dir).eos_id, seed=0)
    untrained = evaluate_shards(
        untrained_model,
        Shards(shards_dir),
        "test",
        seq_len=64,
        device="cpu",
        precision="fp32",
        progress=False,
    )
    assert trained["mean_bpb"] < 0.7 * untrained["mean_bpb"]


def test_eval_on_raw_data_matches_eval_on_shards(shards_dir, corpus, tmp_path):
    cfg = tiny_config(shards_dir, steps=5)
    train(cfg, tmp_path / "run", progress=False)
    a = evaluate(tmp_path / "run", shards_dir, split="test", progress=False)
    # no split given: `test`, the documents the model's own shards hold out (its split fractions)
    b = evaluate(tmp_path / "run", corpus, progress=False)
    assert b["split"] == "test" and b["split_spec"] == Shards(shards_dir).index["split"]
    assert a["domains"] and set(a["domains"]) == set(b["domains"])
    for d, want in a["domains"].items():
        got = b["domains"][d]
        # the same documents, re-tokenized into the same token stream: identical counts ...
        assert (got["documents"], got["tokens"], got["bytes"]) == (
            want["documents"],
            want["tokens"],
            want["bytes"],
        ), d
        # ... and the same windows scored by the same model (rel=1e-6: the batches run separately)
        assert got["nll_nats"] == pytest.approx(want["nll_nats"], rel=1e-6), d
        assert got["bpb"] == pytest.approx(want["bpb"], rel=1e-6), d
    assert b["mean_bpb"] == pytest.approx(a["mean_bpb"], rel=1e-6)
    # the test split of a domain is not the whole domain: the comparison above picked out one split
    c = evaluate(tmp_path / "run", corpus, split="all", progress=False)
    for d in a["domains"]:
        assert c["domains"][d]["documents"] > a["domains"][d]["documents"]
        assert c["domains"][d]["tokens"] > a["domains"][d]["tokens"]
        assert c["domains"][d]["bpb"] > 0


def test_completed_run_is_not_retrained_and_config_changes_are_refused(shards_dir, tmp_path):
    cfg = tiny_config(shards_dir, steps=6)
    s1 = train(cfg, tmp_path / "run", progress=False)
    mtime = (tmp_path / "run" / "model" / "model.safetensors").stat().st_mtime_ns
    s2 = train(cfg, tmp_path / "run", progress=False)
    assert s1 == s2
    assert (tmp_path / "run" / "model" / "model.safetensors").stat().st_mtime_ns == mtime
    cfg.optim.lr = 1e-4
    with pytest.raises(ValueError, match="optim.lr"):
        train(cfg, tmp_path / "run", progress=False)
    # started from a checkpoint instead: the start is named, not the architecture fields that only the
    # config-built run records (they read '(absent)' on the other side)
    from elmforest.train.runcheck import config_change

    cfg.optim.lr, cfg.model.init_from = tiny_config(shards_dir).optim.lr, str(tmp_path / "run" / "model")
    change = config_change(tmp_path / "run", cfg)
    assert change.startswith("model.init_from: None -> ") and "absent" not in change, change
    # the finished run asked for again on other shards: refused, not "done" for data it never saw
    import shutil

    other = tmp_path / "other-shards"
    shutil.copytree(shards_dir, other)
    index = json.loads((other / "index.json").read_text())
    index["split"] = {"valid_frac": 0.2, "test_frac": 0.2}
    (other / "index.json").write_text(json.dumps(index))
    cfg = tiny_config(other, steps=6)
    with pytest.raises(ValueError, match="finished run trained on shards .* holds other data"):
        train(cfg, tmp_path / "run", progress=False)
    moved = tmp_path / "moved-shards"  # the same shards elsewhere: still done
    shutil.copytree(shards_dir, moved)
    assert train(tiny_config(moved, steps=6), tmp_path / "run", progress=False) == s1


def _train_cmd(shards, out, steps):
    return [
        sys.executable,
        "-m",
        "elmforest.cli",
        "train",
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--no-progress",
        "--set",
        f"train.steps={steps}",
        "--set",
        "train.ckpt_every=4",
        "--set",
        "train.precision=fp32",
        "--set",
        "train.log_every=2",
        "--set",
        "train.keep_checkpoints=2",
    ]


def test_sigkill_then_resume_gives_identical_weights(shards_dir, tmp_path):
    steps = 120
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(
        _train_cmd(shards_dir, tmp_path / "ref", steps), env=env, capture_output=True, text=True
    )
    assert ref.returncode == 0, ref.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(shards_dir, run, steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not list_checkpoints(run / "checkpoints") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(random.Random(0).uniform(0.0, 0.3))  # somewhere mid-run, maybe mid-checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list_checkpoints(run / "checkpoints")
    assert done, "the run never wrote a checkpoint before being killed"
    killed_at = int(done[-1].name.split("-")[1])
    assert killed_at < steps, "the run finished before it was killed; make it longer"
    assert not (run / "summary.json").exists()

    res = subprocess.run(_train_cmd(shards_dir, run, steps), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "killed: resuming from its checkpoint at step " in res.stdout  # said, not only done
    assert "resuming" not in ref.stdout
    a, b = _weights(tmp_path / "ref"), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    metrics = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(2, steps + 1, 2))  # no duplicated or missing log lines
    assert len(list_checkpoints(run / "checkpoints")) <= 2


def test_lr_schedule_shapes():
    o = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_frac=0.1, schedule="cosine")
    lrs = [lr_at(s, 100, o) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    # the warm-up is warmup_frac of the steps rounded (0.08 x 60 = 4.8 -> 5), not cut (4)
    w = OptimConfig(lr=1.0, warmup_frac=0.08, schedule="constant")
    assert [lr_at(s, 60, w) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    o.schedule = "linear"
    assert lr_at(55, 100, o) == pytest.approx(1.0 - 0.9 * 0.5)
    o.schedule = "bogus"
    with pytest.raises(ValueError, match="unknown schedule 'bogus'"):
        lr_at(50, 100, o)


def test_grad_accumulation_equals_one_big_batch(shards_dir, tmp_path):
    """One step with 2 micro-batches of 4 == one AdamW step on the gradient of those 8 sequences."""
    from elmforest.train.batches import WindowSampler

    cfg = tiny_config(shards_dir, steps=1, batch_size=4, grad_accum=2, log_every=1)
    cfg.optim.grad_clip = 0.0
    cfg.optim.warmup_frac = 0.0
    cfg.optim.schedule = "constant"
    # Adam's first step is ~lr*sign(g): a large eps makes it ~lr*g, so float summation order can't flip it
    cfg.optim.eps, cfg.optim.lr = 1.0, 1.0
    train(cfg, tmp_path / "run", progress=False)
    got = _weights(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tokens"] == 1 * 4 * 2 * cfg.train.seq_len  # both micro-batches counted (and their FLOPs)
    assert summary["flops"] == pytest.approx(summary["tokens"] * summary["flops_per_token"], rel=1e-12)

    sh = Shards(shards_dir)
    model = build_model(cfg.model, sh.vocab_size, sh.eos_id, seed=cfg.train.seed)
    s = WindowSampler(sh, None, "train", cfg.train.seq_len, 4, cfg.train.seed)
    big = torch.cat([s.batch(0, 0), s.batch(0, 1)])
    logits = model(input_ids=big[:, :-1]).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), big[:, 1:].flatten()).backward()
    o = cfg.optim
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
    )
    # with clipping off the norm is still measured and logged (the divergence guard reads it)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    (m,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert m["grad_norm"] == pytest.approx(float(norm), rel=1e-4)
    opt.step()
    want = model.state_dict()
    for k, v in got.items():
        assert torch.allclose(v, want[k], atol=1e-6, rtol=0), k
    # and the step really moved the weights (so the comparison above is not vacuous)
    init = build_model(cfg.model, sh.vocab_size, sh.eos_id, seed=cfg.train.seed).state_dict()
    assert not torch.allclose(
        got["model.layers.0.mlp.up_proj.weight"], init["model.layers.0.mlp.up_proj.weight"]
    )


def test_pause_and_continue_from_another_runs_checkpoint(shards_dir, tmp_path, monkeypatch):
    """stop_at pauses a run; init_checkpoint continues weights, Adam moments and LR schedule exactly
    (its model built without a random initialisation: every weight is loaded next)."""
    from elmforest.train import setup

    built = []
    real = setup.build_model
    monkeypatch.setattr(setup, "build_model", lambda *a, **k: built.append(k["initialise"]) or real(*a, **k))
    full = tiny_config(shards_dir, steps=12, log_every=2, ckpt_every=6)
    train(full, tmp_path / "full", progress=False)

    paused = tiny_config(shards_dir, steps=12, log_every=2, ckpt_every=6)
    paused.train.stop_at = 6
    out = train(paused, tmp_path / "paused", progress=False)
    assert out["stopped_at"] == 6 and not (tmp_path / "paused" / "model").exists()

    # a second run (another directory, as an expert would be) continues from the paused run's step 6
    cont = tiny_config(shards_dir, steps=12, log_every=2, ckpt_every=6)
    cont.train.init_checkpoint = out["checkpoint"]
    s = train(cont, tmp_path / "cont", progress=False)
    assert s["start_step"] == 6 and s["tokens"] == 6 * cont.train.tokens_per_step
    assert built == [True, True, False]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cont")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # and the paused run itself finishes when asked again without stop_at
    paused.train.stop_at = None
    train(paused, tmp_path / "paused", progress=False)
    c = _weights(tmp_path / "paused")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_a_pause_off_the_log_grid_logs_what_an_uninterrupted_run_logs(shards_dir, tmp_path):
    """A pause at step 5 (log_every 2) logged step 5 and restarted the loss window: the resumed run's
    step 6 averaged one step where the uninterrupted run's averaged two."""

    def logged(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [(m["step"], m["loss"]) for m in map(json.loads, lines)]

    train(tiny_config(shards_dir, steps=8, log_every=2, ckpt_every=4), tmp_path / "full", progress=False)
    cfg = tiny_config(shards_dir, steps=8, log_every=2, ckpt_every=4, stop_at=5)
    assert train(cfg, tmp_path / "paused", progress=False)["stopped_at"] == 5
    cfg.train.stop_at = None
    train(cfg, tmp_path / "paused", progress=False)
    assert [s for s, _ in logged(tmp_path / "paused")] == [2, 4, 6, 8]
    assert logged(tmp_path / "paused") == logged(tmp_path / "full")


def test_torn_metrics_line_does_not_block_resume(shards_dir, tmp_path):
    cfg = tiny_config(shards_dir, steps=8, log_every=2, ckpt_every=4)
    cfg.train.stop_at = 4
    train(cfg, tmp_path / "run", progress=False)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a write cut short by a crash
    cfg.train.stop_at = None
    s = train(cfg, tmp_path / "run", progress=False)
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8] and math.isfinite(s["final_loss"])


def test_runs_started_before_a_config_field_existed_still_resume(shards_dir, tmp_path):
    cfg = tiny_config(shards_dir, steps=8, log_every=2, ckpt_every=4)
    cfg.train.stop_at = 4
    train(cfg, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    del saved["train"]["trainable"]  # as written by an older elmforest
    (tmp_path / "run" / "run_config.json").write_text(json.dumps(saved))
    cfg.train.stop_at = None
    assert train(cfg, tmp_path / "run", progress=False)["steps"] == 8
    cfg.optim.lr *= 2  # a real difference is still refused, and named
    with pytest.raises(ValueError, match="optim.lr"):
        train(cfg, tmp_path / "run", progress=False)


def test_frozen_parameters_stay_put_and_branching_keeps_moments_by_name(shards_dir, tmp_path):
    from elmforest.model.build import load_model

    cfg = tiny_config(shards_dir, steps=6, ckpt_every=3)
    cfg.train.stop_at = 3
    train(cfg, tmp_path / "base", progress=False)
    ckpt = list_checkpoints(tmp_path / "base" / "checkpoints")[-1]
    start = load_file(str(ckpt / "model.safetensors"))
    part = tiny_config(shards_dir, steps=6, ckpt_every=3, init_checkpoint=str(ckpt), trainable=r"\.mlp\.")
    summary = train(part, tmp_path / "mlp", progress=False)
    # the ledger counts what ran: frozen weights cost forward (+ input gradient behind a trainable one)
    c = load_model(tmp_path / "mlp").config
    h, i, n_layers, v, t = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size, 64
    attn, mlp = 4 * h * h, 3 * h * i
    by_hand = (
        2 * attn + 4 * t * h + 4 * 2 * h * i + 6 * h * i + (n_layers - 1) * (4 * attn + 12 * t * h + 6 * mlp)
    )
    by_hand += 4 * v * h  # the tied head, frozen
    assert summary["flops_per_token"] == by_hand and summary["flops"] == by_hand * summary["tokens"]
    assert summary["trainable_params"] == n_layers * mlp
    assert by_hand < 6 * (n_layers * (attn + mlp) + v * h) + 12 * n_layers * t * h  # below the 6N upper bound
    end = load_model(tmp_path / "mlp").state_dict()
    moved = {k for k in start if not torch.equal(start[k], end[k])}
    assert moved and all(".mlp." in k for k in moved)
    # the MLP-only run continued the seed's Adam moments, each under its own parameter's name
    from elmforest.train.checkpoint import load_checkpoint
    from elmforest.train.setup import freeze_except

    model = build_model(part.model, Shards(shards_dir).vocab_size, Shards(shards_dir).eos_id)
    freeze_except(model, part.train.trainable)
    groups = [
        [p for p in model.parameters() if p.requires_grad and p.dim() >= 2],
        [p for p in model.parameters() if p.requires_grad and p.dim() < 2],
    ]
    opt = torch.optim.AdamW([{"params": g} for g in groups])
    load_checkpoint(ckpt, model, opt, torch.device("cpu"))
    saved = load_file(str(ckpt / "optimizer.safetensors"))
    saved_names = json.loads((ckpt / "state.json").read_text())["optimizer"]["param_names"]
    name_of = {id(p): n for n, p in model.named_parameters()}
    checked = 0
    for p, st in opt.state.items():
        i = saved_names.index(name_of[id(p)])
        assert torch.equal(st["exp_avg"], saved[f"{i}.exp_avg"])
        checked += 1
    assert checked == sum(len(g) for g in groups) and checked < len(saved_names)
    # a frozen run resumes from its own checkpoint
    part2 = tiny_config(shards_dir, steps=6, ckpt_every=2, trainable=r"\.mlp\.", stop_at=2)
    train(part2, tmp_path / "mlp2", progress=False)
    part2.train.stop_at = None
    assert train(part2, tmp_path / "mlp2", progress=False)["resumed_from"] is not None
    bad = tiny_config(shards_dir, steps=6, trainable="no_such_param")
    with pytest.raises(ValueError, match="matches no parameter"):
        train(bad, tmp_path / "bad", progress=False)


def test_two_process_gloo_ddp_matches_one_process(shards_dir, tmp_path):
    """Data parallel over 2 CPU processes (gloo) with the same global batch: the same loss curve."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        "train",
        "--shards",
        str(shards_dir),
        "--preset",
        "tiny",
        "--no-progress",
        "--set",
        "train.steps=12",
        "--set",
        "train.log_every=1",
        "--set",
        "train.precision=fp32",
        "--set",
        "train.batch_size=8",
    ]
    one = subprocess.run(
        [sys.executable, "-m", "elmforest.cli", *args, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr
    two_args = [sys.executable, "-m", "elmforest.cli", *args, "--out", str(tmp_path / "two"), "--nproc", "2"]
    paused = subprocess.run(
        [*two_args, "--set", "train.stop_at=6"], env=env, capture_output=True, text=True, timeout=300
    )
    assert paused.returncode == 0, paused.stderr[-3000:]
    assert paused.stdout.count("paused at step 6") == 1, paused.stdout  # said once, not once per process
    two = subprocess.run(two_args, env=env, capture_output=True, text=True, timeout=300)  # resumed
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("done:") == 1, two.stdout  # one line for the run, not one per process
    a = [json.loads(x)["loss"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 12
    assert a == pytest.approx(b, rel=1e-4)
    assert a[0] - a[-1] > 0.3  # it learned, so matching curves are not trivially flat
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    wa, wb = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


def test_data_parallel_ranks_given_different_settings_are_refused(shards_dir, tmp_path):
    """torchrun launched by hand with one rank told another LR: refused on every rank, naming the
    setting, before any step (it trained, recording rank 0's config)."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import os, sys\n"
        "from elmforest.cli import main\n"
        "extra = ['--set', 'optim.lr=0.01'] if os.environ['RANK'] == '1' else []\n"
        "sys.exit(main(sys.argv[1:] + extra))\n"
    )
    out = tmp_path / "run"
    args = ["train", "--shards", str(shards_dir), "--preset", "tiny", "--no-progress", "--out", str(out)]
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
        + [*args, "--set", "train.steps=4", "--set", "train.batch_size=4", "--set", "train.device=cpu"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)},  # torchelastic's folders
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    assert "were given different settings (rank 0 -> rank 1: config.optim.lr:" in run.stderr, run.stderr[
        -3000:
    ]
    assert not (out / "metrics.jsonl").exists() and not (out / "model").exists()


def test_sigterm_to_a_data_parallel_run_stops_its_workers(shards_dir, tmp_path):
    """subprocess.run SIGKILLed torchrun when the launcher got SIGTERM: its workers, in sessions of
    their own, went on training into the run directory, orphaned."""
    from conftest import assert_all_die, descendants

    run = tmp_path / "run"
    argv = ["train", "--shards", str(shards_dir), "--preset", "tiny", "--no-progress", "--out", str(run)]
    argv += ["--nproc", "2", "--set", "train.steps=100000", "--set", "train.ckpt_every=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        [sys.executable, "-m", "elmforest.cli", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None and not (run / "checkpoints").is_dir():
            time.sleep(0.2)
        assert p.poll() is None, p.communicate()[1][-2000:]
        below = descendants(p.pid)
        assert len(below) >= 3  # torchrun and its two workers
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143, err[-2000:]
    assert_all_die(below, within=5)


def test_a_second_trainer_in_the_same_run_directory_is_refused(shards_dir, tmp_path):
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".trainer.lock", "a") as held:  # as if an orphaned trainer were still running
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another trainer"):
            train(tiny_config(shards_dir, steps=2), run, progress=False)
    assert train(tiny_config(shards_dir, steps=2), run, progress=False)["steps"] == 2  # free again


@pytest.mark.parametrize(
    "trainable",
    [
        r"layers\.1\.",
        r"embed_tokens|layers\.0\.self_attn\.o_proj",
        # the first trained matrices are Q, K or V: only the attention products their gradients need
        r"v_proj",
        r"q_proj|v_proj",
        r"layers\.1\.self_attn\.k_proj",
    ],
)
def test_flops_of_a_frozen_run_are_what_torch_counts(shards_dir, tmp_path, trainable):
    """A run with train.trainable records per-token FLOPs equal to train/flops.py's count for that split,
    and to what torch's FlopCounterMode counts for one training step of the trained model, so split."""
    from torch.utils.flop_counter import FlopCounterMode

    from elmforest.model.build import load_model
    from elmforest.train.flops import flops_breakdown
    from elmforest.train.setup import freeze_except

    cfg = tiny_config(shards_dir, steps=2, trainable=trainable)
    s = train(cfg, tmp_path / "run", progress=False)
    model = load_model(tmp_path / "run", attn_implementation="eager")
    freeze_except(model, trainable)
    t = cfg.train.seq_len
    assert s["flops_breakdown"] == flops_breakdown(model, t)
    x = torch.randint(0, model.config.vocab_size, (1, t + 1))
    with FlopCounterMode(display=False) as fc:
        logits = model(input_ids=x[:, :-1]).logits
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[0, 1:]).backward()
    assert s["flops_per_token"] == fc.get_total_flops() / t
    assert s["flops"] == s["tokens"] * s["flops_per_token"] and s["tokens"] == 2 * cfg.train.tokens_per_step
    assert s["steps"] == 2 and s["processes"] == 1
    # frozen weights cost less than training everything (6N + attention)
    full = build_model(cfg.model, Shards(shards_dir).vocab_size, Shards(shards_dir).eos_id)
    assert s["flops_per_token"] < flops_breakdown(full, t)["flops_per_token"]
    assert s["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_compiled_loss_and_fused_adamw_train_the_same_model(shards_dir, tmp_path, monkeypatch):
    """train.compile (forward + cross-entropy compiled as one function) and train.fused_optimizer are
    speed switches: a few steps end at the eager run's weights (to compiler rounding), and both
    switches really take effect (the compiled function and the fused AdamW are the ones used)."""
    from elmforest.train import trainer as trainer_mod

    made = {}
    real_adamw = torch.optim.AdamW

    def spy_adamw(*a, **kw):
        made["adamw"] = kw
        return real_adamw(*a, **kw)

    real_compile = torch.compile

    def spy_compile(fn, *a, **kw):
        made["compiled"] = getattr(fn, "__name__", str(fn))
        return real_compile(fn, *a, **kw)

    monkeypatch.setattr(trainer_mod.torch.optim, "AdamW", spy_adamw)
    monkeypatch.setattr(trainer_mod.torch, "compile", spy_compile)
    cfg = tiny_config(shards_dir, steps=6, log_every=1, ckpt_every=0, valid_every=0)
    cfg.optim.warmup_frac = 0.0
    train(cfg, tmp_path / "eager", progress=False)
    assert "compiled" not in made and not made["adamw"].get("fused")  # off by default
    cfg.train.compile, cfg.train.fused_optimizer = True, True
    train(cfg, tmp_path / "fast", progress=False)
    assert made["adamw"].get("fused") is True and made["compiled"] == "_loss"
    eager, fast = _weights(tmp_path / "eager"), _weights(tmp_path / "fast")
    init = build_model(
        cfg.model, Shards(shards_dir).vocab_size, Shards(shards_dir).eos_id, seed=0
    ).state_dict()
    for k, v in eager.items():
        moved = (v - init[k]).abs().max()
        assert moved > 0, k
        assert (fast[k] - v).abs().max() <= 0.05 * moved + 1e-6, k
    loss = [json.loads(x)["loss"] for x in (tmp_path / "fast" / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x)["loss"] for x in (tmp_path / "eager" / "metrics.jsonl").read_text().splitlines()]
    assert loss == pytest.approx(want, rel=1e-3)


def test_a_last_step_that_breaks_the_weights_is_a_divergence_not_a_result(shards_dir, tmp_path):
    """The logged loss is computed before the step's update: a step whose gradient makes the weights
    NaN still logs a finite loss. On the last step nothing would log the NaN that follows, and the
    broken weights were saved as the run's model (a sweep's expert at LR 300 did)."""
    from elmforest.train.callbacks import Callback, DivergenceGuard
    from elmforest.utils.errors import Diverged

    class BreakLastStep(Callback):
        def on_log(self, trainer, m):
            if trainer.step == trainer.end:  # after the guard has read this log line
                with torch.no_grad():
                    next(trainer.model.parameters()).view(-1)[0] = float("nan")

    cfg = tiny_config(shards_dir, steps=4, log_every=2, ckpt_every=0)
    with pytest.raises(Diverged, match="weights are not finite after step 4"):
        train(cfg, tmp_path / "run", False, [BreakLastStep()])
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "summary.json").exists()
    assert not list_checkpoints(tmp_path / "run" / "checkpoints")  # nothing to resume into a result

    class Stub:
        run_dir = "r"

    guard = DivergenceGuard()
    guard.on_log(Stub(), {"step": 3, "loss": 2.0, "grad_norm": None})  # no clipping: no norm to check
    with pytest.raises(Diverged, match="grad_norm is nan at step 3"):
        guard.on_log(Stub(), {"step": 3, "loss": 2.0, "grad_norm": float("nan")})
    for step, norm in ((1, 0.0), (2, 0.5), (3, 0.0)):  # one zero norm alone is not a dead network
        guard.on_log(Stub(), {"step": step, "loss": 2.0, "grad_norm": norm})


def test_a_dead_network_ends_the_run_as_diverged(shards_dir, tmp_path):
    """A blow-up that kills every unit leaves a finite loss (the log of the vocabulary) and a gradient
    norm of exactly 0 for good: the run trained on to a 'done' model, which a sweep then had to tell
    from a real one."""
    from elmforest.train.callbacks import Callback
    from elmforest.utils.errors import Diverged

    class KillEveryUnit(Callback):
        def on_train_start(self, trainer):
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.zero_()

    cfg = tiny_config(shards_dir, steps=6, log_every=1, ckpt_every=0)
    with pytest.raises(Diverged, match=r"gradients vanished \(grad norm 0 at step 2\): a dead network"):
        train(cfg, tmp_path / "run", False, [KillEveryUnit()])
    assert not (tmp_path / "run" / "model").exists()
    # paused after the first zero norm: the resumed run counts on from it, and stops where this one did
    cfg = tiny_config(shards_dir, steps=6, log_every=1, ckpt_every=0, stop_at=1)
    train(cfg, tmp_path / "paused", False, [KillEveryUnit()])
    cfg.train.stop_at = None
    with pytest.raises(Diverged, match=r"grad norm 0 at step 2\)"):
        train(cfg, tmp_path / "paused", False, [KillEveryUnit()])


def test_a_resume_in_another_precision_is_said(shards_dir, tmp_path, capsys):
    """`device` may change on a resume, and with precision `auto` the precision with it: no longer
    bit-identical to an uninterrupted run, which was said nowhere."""
    import json

    cfg = tiny_config(shards_dir, steps=3, ckpt_every=0, stop_at=1)
    train(cfg, tmp_path / "run", False)
    [ckpt] = list_checkpoints(tmp_path / "run" / "checkpoints")
    state = json.loads((ckpt / "state.json").read_text())
    assert state["precision"] == "float32"
    capsys.readouterr()
    cfg.train.stop_at = 2
    train(cfg, tmp_path / "run", False)
    assert "warning" not in capsys.readouterr().err
    [ckpt] = list_checkpoints(tmp_path / "run" / "checkpoints")[-1:]
    (ckpt / "state.json").write_text(
        json.dumps({**json.loads((ckpt / "state.json").read_text()), "precision": "bfloat16"})
    )
    cfg.train.stop_at = None
    train(cfg, tmp_path / "run", False)
    assert "trained in bfloat16 up to step 2, resumed in float32" in capsys.readouterr().err


def test_a_run_refused_before_it_starts_leaves_no_empty_folder(shards_dir, tmp_path):
    cfg = tiny_config(shards_dir, steps=4)
    cfg.data.domains = ["no_such_domain"]
    with pytest.raises(ValueError, match="no_such_domain"):
        train(cfg, tmp_path / "runs" / "a", progress=False)
    assert not (tmp_path / "runs" / "a").exists()
    # a folder the user made (or a run to resume) is kept, refused or not
    (tmp_path / "mine").mkdir()
    with pytest.raises(ValueError, match="no_such_domain"):
        train(cfg, tmp_path / "mine", progress=False)
    assert (tmp_path / "mine").is_dir()


def test_a_run_that_fails_in_this_process_frees_its_directory(shards_dir, tmp_path):
    """The lock was held until the garbage collector freed the failed trainer: training the run again (or
    opting it out) from the same process said another trainer was running."""
    from elmforest.train.callbacks import Callback
    from elmforest.train.runlock import training_now

    class Stop(Callback):
        def on_step_end(self, trainer, is_last):
            if trainer.step == 2:
                raise KeyboardInterrupt

    import gc

    gc.disable()  # the cycle that kept the trainer alive is not collected meanwhile
    try:
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(shards_dir, steps=4, ckpt_every=2), tmp_path / "run", False, [Stop()])
        assert not training_now(tmp_path / "run")
        assert train(tiny_config(shards_dir, steps=4, ckpt_every=2), tmp_path / "run", False)["steps"] == 4
    finally:
        gc.enable()


def test_configs_built_in_code_are_checked_before_anything_is_written(shards_dir, tmp_path):
    """`train()` with a config made in Python (not read from a file): a bad field is named before the run
    folder is made; a stop_at not past an init_checkpoint's step is refused, not an IndexError."""
    for field, value, says in (
        ("log_every", 0, "train.log_every"),
        ("seed", -1, r"train.seed must be in \[0, 2\*\*64\)"),
    ):
        cfg = tiny_config(shards_dir, steps=4)
        setattr(cfg.train, field, value)
        with pytest.raises(UserError, match=says):
            train(cfg, tmp_path / field, progress=False)
        assert not (tmp_path / field).exists()
    cfg = tiny_config(shards_dir, steps=4)
    cfg.data.domains = [cfg.data.domains[0]] * 2 if cfg.data.domains else ["code", "code"]
    with pytest.raises(UserError, match="each domain once"):
        train(cfg, tmp_path / "twice", progress=False)
    paused = tiny_config(shards_dir, steps=6, ckpt_every=2)
    paused.train.stop_at = 2
    ckpt = train(paused, tmp_path / "a", progress=False)["checkpoint"]
    again = tiny_config(shards_dir, steps=6, ckpt_every=2)
    again.train.stop_at, again.train.init_checkpoint = 2, ckpt
    with pytest.raises(UserError, match="stop_at=2 is not past step 2"):
        train(again, tmp_path / "b", progress=False)
    # a checkpoint of another model, or no checkpoint, as the branch: refused before the run's files (a
    # size-mismatch traceback after run_config.json and inputs.json were written, before)
    wide = tiny_config(shards_dir, steps=6, ckpt_every=2)
    wide.model.num_kv_heads = 2
    wide.train.init_checkpoint = ckpt
    with pytest.raises(UserError, match="a checkpoint of another model .num_kv_heads 4 vs 2"):
        train(wide, tmp_path / "c", progress=False)
    wide.train.init_checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="not a training checkpoint"):
        train(wide, tmp_path / "d", progress=False)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
    longer = tiny_config(shards_dir, steps=6, ckpt_every=2)  # a longer context has no weights: branches
    longer.model.max_position_embeddings *= 2
    longer.train.init_checkpoint = ckpt
    assert train(longer, tmp_path / "e", progress=False)["steps"] == 6
    # a run made when `--set model.num_heads` alone kept the preset's kv heads, resumed with that --set
    # (now full attention): refused for its kv count, with what to add
    gqa = apply_overrides(
        tiny_config(shards_dir, steps=6, ckpt_every=2), ["model.num_heads=8", "model.num_kv_heads=4"]
    )
    gqa.train.stop_at = 2
    train(gqa, tmp_path / "g", progress=False)
    now = apply_overrides(tiny_config(shards_dir, steps=6, ckpt_every=2), ["model.num_heads=8"])
    with pytest.raises(
        UserError, match=r"num_kv_heads: 4 -> 8\) \(since 2026-12-07.*add --set model.num_kv_heads"
    ):
        train(now, tmp_path / "g", progress=False)


def test_weights_broken_between_logged_steps_are_never_checkpointed(shards_dir, tmp_path):
    """A step between two logged ones that makes the weights NaN was checkpointed (the guard read the
    weights only at the last step), and a rerun resumed from the broken weights."""
    from elmforest.train.callbacks import Callback
    from elmforest.utils.errors import Diverged

    class BreakStep3(Callback):
        def on_step_end(self, trainer, is_last):
            if trainer.step == 3:
                with torch.no_grad():
                    next(trainer.model.parameters()).view(-1)[0] = float("nan")

    cfg = tiny_config(shards_dir, steps=8, log_every=8, ckpt_every=2)
    with pytest.raises(Diverged, match="weights are not finite after step 4"):
        train(cfg, tmp_path / "run", False, [BreakStep3()])
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000002"]


def test_a_run_checkpointed_only_at_its_end_is_validated_at_its_end(shards_dir, tmp_path):
    """valid_every unset means at each checkpoint and at the end: with ckpt_every 0 nothing was measured."""
    cfg = tiny_config(shards_dir, steps=4, log_every=2, ckpt_every=0)
    train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "valid.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4]
    cfg.train.valid_every = 0  # never, said so
    train(cfg, tmp_path / "off", progress=False)
    assert (
        not (tmp_path / "off" / "valid.jsonl").exists() or not (tmp_path / "off" / "valid.jsonl").read_text()
    )


def test_a_run_resumed_with_the_fused_optimizer_uses_it(shards_dir, tmp_path):
    """Loading the optimizer state took the saved run's `fused`/`foreach` too: a resume asking for the
    fused kernel kept the one it was paused with (a speed switch, so only the kernel differs)."""
    from elmforest.train.callbacks import Callback

    seen = []

    class Kernel(Callback):
        def on_train_start(self, trainer):
            seen.append(trainer.opt.param_groups[0].get("fused"))

    cfg = tiny_config(shards_dir, steps=4, ckpt_every=2)
    cfg.train.stop_at = 2
    train(cfg, tmp_path / "run", False, [Kernel()])
    cfg.train.stop_at, cfg.train.fused_optimizer = None, True
    train(cfg, tmp_path / "run", False, [Kernel()])
    assert not seen[0] and seen[1] is True


def test_a_model_with_dropout_trains_the_same_whatever_the_process_drew_before(shards_dir, tmp_path):
    """Dropout draws from torch's global generator, which a process starts at a random state: the
    trainer seeds it from train.seed, so one config trains one model (and a resume matches it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from elmforest.data.tokenizer import load_tokenizer, save_tokenizer

    tok = load_tokenizer(shards_dir)
    c = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=64, attention_dropout=0.5,
        eos_token_id=0, bos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(c).save_pretrained(tmp_path / "drop")
    save_tokenizer(tok, tmp_path / "drop")
    got = []
    for i, before in enumerate((1, 2)):
        cfg = tiny_config(shards_dir, steps=3, batch_size=2, trackers=[], valid_every=0, seq_len=32)
        cfg.model.init_from, cfg.model.attn_implementation = str(tmp_path / "drop"), "eager"
        torch.manual_seed(before)  # what the process happened to draw before
        train(cfg, tmp_path / f"r{i}", progress=False)
        got.append(_weights(tmp_path / f"r{i}"))
    for k in got[0]:
        assert torch.equal(got[0][k], got[1][k]), k


def test_data_parallel_dropout_streams_are_per_rank_and_survive_a_pause(
    forest_dir, shards_dir, tmp_path, monkeypatch
):
    """Only rank 0's generator is checkpointed: every rank loaded it on a resume (and from an
    init_checkpoint, as every expert branches), so ranks drew one dropout stream and a paused run ended
    elsewhere than an uninterrupted one. Ranks past 0 now draw from (seed, rank, step)."""
    import shutil

    from elmforest.cli import main
    from elmforest.forest.manifest import Forest

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the torchrun workers inherit it: 2 workers on 2 cores
    drop = tmp_path / "drop"
    shutil.copytree(Forest.load(forest_dir).expert_dir(Forest.load(forest_dir).names[0]), drop)
    cfg = json.loads((drop / "config.json").read_text())
    (drop / "config.json").write_text(json.dumps({**cfg, "attention_dropout": 0.3}))
    common = ["--init-from", str(drop), "--shards", str(shards_dir), "--nproc", "2", "--no-progress"]
    for o in ("train.steps=8", "train.batch_size=4", "train.seq_len=32", "train.ckpt_every=4", "train.log_every=4",
              "train.precision=fp32", "train.device=cpu", "train.trackers=[]"):  # fmt: skip
        common += ["--set", o]
    assert main(["train", "--out", str(tmp_path / "whole"), *common]) == 0
    assert main(["train", "--out", str(tmp_path / "paused"), *common, "--set", "train.stop_at=4"]) == 0
    assert main(["train", "--out", str(tmp_path / "paused"), *common]) == 0
    a = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "paused" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_being_set_up_is_held_against_deletion(shards_dir, tmp_path, monkeypatch):
    """The lock was taken after setup (the model loaded, init_from hashed: minutes for a large MoE), so
    meanwhile the run looked like a dead leftover that `merge finetune` deleted under it."""
    import elmforest.train.trainer as tr
    from elmforest.train.runlock import training_now, unless_training

    seen = {}
    real = tr.check_inputs

    def spy(run_dir, *a, **kw):
        seen["training"] = training_now(run_dir)
        with unless_training(run_dir) as idle:
            seen["idle"] = idle
        return real(run_dir, *a, **kw)

    monkeypatch.setattr(tr, "check_inputs", spy)
    train(tiny_config(shards_dir, steps=2), tmp_path / "run", progress=False)
    assert seen == {"training": True, "idle": False}
    assert not training_now(tmp_path / "run")  # freed once done, and again on a finished rerun
    train(tiny_config(shards_dir, steps=2), tmp_path / "run", progress=False)
    assert not training_now(tmp_path / "run")


def test_a_refused_run_leaves_no_folder_and_a_deleted_one_is_said(shards_dir, tmp_path):
    from elmforest.train.runlock import unless_training

    bad = tiny_config(shards_dir, steps=2)
    bad.data.domains = ["no-such-domain"]
    with pytest.raises(Exception, match="no-such-domain"):
        train(bad, tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()  # its lock file is not "something written"
    with unless_training(tmp_path / "gone") as idle:
        assert idle is False
    t = tr_trainer(tiny_config(shards_dir, steps=2), tmp_path / "run")
    t.run_dir.mkdir()
    t.run_dir.rmdir()
    with pytest.raises(RuntimeError, match="deleted by another process"):
        t._lock_run_dir()


def tr_trainer(cfg, run_dir):
    from elmforest.train.trainer import Trainer

    return Trainer(cfg, run_dir, [], False, None)


@pytest.mark.parametrize("recorded", ["before", "after"])
def test_shards_rebuilt_by_another_version_from_the_same_data_are_the_same_data(
    shards_dir, tmp_path, recorded
):
    """Shards built before the split recorded `by_file` (always false then) fingerprinted otherwise: the
    same data rebuilt by the other version refused every finished and paused run as "other data"."""
    import shutil

    sh = tmp_path / "sh"
    shutil.copytree(shards_dir, sh)
    index = json.loads((sh / "index.json").read_text())
    assert index["split"]["by_file"] is False
    old = {**index, "split": {k: v for k, v in index["split"].items() if k != "by_file"}}

    def write(ix):
        (sh / "index.json").write_text(json.dumps(ix))

    write(old if recorded == "before" else index)
    fp = Shards(sh).fingerprint
    cfg = tiny_config(sh, steps=4, ckpt_every=2)
    cfg.train.stop_at = 2
    train(cfg, tmp_path / "run", progress=False)  # paused at step 2
    write(index if recorded == "before" else old)  # rebuilt by the other version
    assert Shards(sh).fingerprint != fp and fp in Shards(sh).fingerprints
    cfg.train.stop_at = None
    assert train(cfg, tmp_path / "run", progress=False)["steps"] == 4  # resumed, not refused
    assert train(cfg, tmp_path / "run", progress=False)["steps"] == 4  # finished: kept
    index["documents_changed"] = 1  # other content stays other
    write(index)
    with pytest.raises(UserError, match="holds other data"):
        train(cfg, tmp_path / "run", progress=False)


def test_how_the_documents_were_read_is_not_the_data(shards_dir, tmp_path):
    """The read counts (files, records) were part of the fingerprint: the same documents from 1 Arrow file
    or from 2 were other data to every run. Runs that recorded the older digest (with them) still match."""
    import hashlib
    import shutil

    sh = tmp_path / "sh"
    shutil.copytree(shards_dir, sh)
    index = json.loads((sh / "index.json").read_text())
    before = Shards(sh).fingerprint
    old = hashlib.sha256(
        json.dumps({k: v for k, v in index.items() if k != "source"}, sort_keys=True).encode()
    ).hexdigest()[:16]  # as versions before 2026-12-07 digested it
    index["read"] = {**index["read"], "files": index["read"].get("files", 1) + 1}
    (sh / "index.json").write_text(json.dumps(index))
    assert Shards(sh).fingerprint == before
    (sh / "index.json").write_text(
        json.dumps({**index, "read": json.loads((shards_dir / "index.json").read_text())["read"]})
    )
    assert old in Shards(sh).fingerprints and old != before


def test_a_checkpoint_exports_its_own_weights_and_reads_none_from_init_from(shards_dir, tmp_path):
    """The seed's export builds the model without weights and loads the checkpoint's: it read
    `model.init_from`'s weights first (a second model's disk reads, thrown away), and failed where they
    were gone though the checkpoint holds every weight."""
    import shutil

    from elmforest.forest.seeding import export_checkpoint

    base = tiny_config(shards_dir, steps=3)
    train(base, tmp_path / "base", progress=False)
    start = tmp_path / "start"
    shutil.copytree(tmp_path / "base" / "model", start)
    cfg = tiny_config(shards_dir, steps=3, ckpt_every=3)
    cfg.model.init_from = str(start)
    train(cfg, tmp_path / "run", progress=False)
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    (start / "model.safetensors").unlink()  # only its config is needed to build the architecture
    out = export_checkpoint(ckpt, cfg, Shards(shards_dir), tmp_path / "export")
    want, got = load_file(ckpt / "model.safetensors"), load_file(out / "model.safetensors")
    tied = {"model.embed_tokens.weight": "lm_head.weight"}  # the tiny preset ties them; each file keeps one
    assert got and all(name in want or tied.get(name) in want for name in got)
    for name, t in got.items():
        assert torch.equal(t, want.get(name, want.get(tied.get(name)))), name
