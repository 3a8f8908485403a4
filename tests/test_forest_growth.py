"""Growing a forest beyond the default recipe: a seed from a checkpoint of another architecture, an expert
branched from another expert, and experts trained by several data-parallel processes each."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from elmforest.cli import main
from elmforest.config import RunConfig
from elmforest.data.shards import Shards
from elmforest.forest.manifest import Forest
from elmforest.model.build import load_model, resolve_model_dir
from elmforest.train.batches import WindowSampler


def _run(argv, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out + out.err


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _first_batch_loss(model_dir: Path, run_dir: Path) -> float:
    """The loss `model_dir`'s weights give on the first batch of the run in `run_dir`: what the run
    logs at step 1 when it starts from exactly those weights (the loss is taken before the update)."""
    cfg = RunConfig.from_dict(json.loads((run_dir / "run_config.json").read_text()))
    assert cfg.train.grad_accum == 1 and cfg.train.precision == "fp32"
    sampler = WindowSampler(
        Shards(cfg.data.shards),
        cfg.data.domains,
        cfg.data.split,
        cfg.train.seq_len,
        cfg.train.batch_size,
        cfg.train.seed,
        cfg.data.mixture,
    )
    batch = sampler.batch(0, 0)
    model = load_model(model_dir)  # train mode as the trainer uses it; the models here have no dropout
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1]).logits
    return float(F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()))


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(resolve_model_dir(model_dir) / "model.safetensors"))


# -- a seed of another architecture ------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_checkpoint(tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny GPT-2 (no dropout, wide random init so its loss is its own) shipping the shards' tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from elmforest.data.tokenizer import load_tokenizer, save_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    out = tmp_path_factory.mktemp("gpt2") / "seed"
    cfg = GPT2Config(
        vocab_size=tok.vocab_size,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=0.3,
        bos_token_id=tok.eos_id,
        eos_token_id=tok.eos_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(str(out))
    save_tokenizer(tok, out)
    return out


def test_a_gpt2_checkpoint_seeds_a_forest_whose_experts_start_from_it(
    gpt2_checkpoint, corpus, tmp_path, capsys
):
    seed, sh, f = gpt2_checkpoint, tmp_path / "shards", tmp_path / "f"
    argv = ["shards", "build", "--data", corpus, "--tokenizer", seed, "--out", sh, "--no-progress"]
    assert _run(argv, capsys)[0] == 0
    assert _run(["forest", "seed", "--forest", f, "--shards", sh, "--from-checkpoint", seed], capsys)[0] == 0
    rc, out = _run(
        [
            *("forest", "expert", "--forest", f, "--shards", sh, "--domain", "code", "--preset", "tiny"),
            *("--no-progress", "--set", "train.steps=3", "--set", "train.batch_size=2"),
            *("--set", "train.log_every=1", "--set", "train.precision=fp32"),
        ],
        capsys,
    )
    assert rc == 0, out
    forest = Forest.load(f)
    assert forest.names == ["code"] and forest.expert("code")["parents"] == [{"name": "seed", "weight": 1.0}]
    expert_dir = forest.expert_dir("code")
    assert json.loads((expert_dir / "config.json").read_text())["model_type"] == "gpt2"
    run = f / "runs" / "code"
    cfg = json.loads((run / "run_config.json").read_text())
    assert (
        cfg["model"]["init_from"] == str(forest.seed_dir.resolve())
        and cfg["train"]["init_checkpoint"] is None
    )
    # the run started from the seed's weights: its first logged loss is the seed's loss on that batch
    first = _metrics(run)[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(_first_batch_loss(seed, run), rel=1e-5)
    # ... and it trained them: same tensors, moved
    start, end = _weights(seed), _weights(expert_dir)
    assert start.keys() == end.keys()
    assert any(not torch.equal(start[k], end[k]) for k in start)
    assert json.loads((run / "summary.json").read_text())["steps"] == 3

    # a rerun that asks for other settings: the whole config is compared ("kept" compared nothing)
    again = [*("forest", "expert", "--forest", f, "--shards", sh, "--domain", "code", "--preset", "tiny")]
    again += [*("--no-progress", "--set", "train.batch_size=2", "--set", "train.precision=fp32")]
    rc, out = _run([*again, "--set", "train.steps=4"], capsys)
    assert rc == 2 and "trained with other settings (train.steps: 3 -> 4)" in out, out
    rc, out = _run([*again, "--set", "train.steps=3", "--set", "train.log_every=1"], capsys)
    assert rc == 0 and "trained as asked; kept" in out, out
    # forest train would have trained a seed of its own over the checkpoint (and mixed two seeds)
    digests = _weights(forest.seed_dir)
    rc, out = _run(
        ["forest", "train", "--forest", f, "--shards", sh, "--preset", "tiny", "--no-progress"], capsys
    )
    assert rc == 2 and "its seed is a local checkpoint" in out and "forest expert --domain" in out, out
    # another checkpoint does not replace the seed its experts branched from; the same one is kept
    other = tmp_path / "other"
    shutil.copytree(seed, other)
    w = _weights(other)
    save_file({k: v + 1 for k, v in w.items()}, str(other / "model.safetensors"), metadata={"format": "pt"})
    rc, out = _run(["forest", "seed", "--forest", f, "--shards", sh, "--from-checkpoint", other], capsys)
    assert rc == 2 and "has a seed already" in out and "1 expert(s) branched from it" in out, out
    rc, out = _run(["forest", "seed", "--forest", f, "--shards", sh, "--from-checkpoint", seed], capsys)
    assert rc == 0 and "its seed has these weights already; kept" in out, out
    after = _weights(Forest.load(f).seed_dir)
    assert after.keys() == digests.keys() and all(torch.equal(after[k], digests[k]) for k in after)
    # a broken checkpoint is refused as the seed, not stored to fail at the first expert
    save_file(
        {k: v * float("nan") for k, v in w.items()},
        str(other / "model.safetensors"),
        metadata={"format": "pt"},
    )
    rc, out = _run(
        ["forest", "seed", "--forest", tmp_path / "g", "--shards", sh, "--from-checkpoint", other], capsys
    )
    assert rc == 2 and "non-finite" in out, out
    assert not (tmp_path / "g").exists()  # no empty forest left behind
    # generation past GPT-2's n_positions: refused, not torch's IndexError
    rc, out = _run(["generate", "--forest", f, "--prompt", "a b " * 40, "--max-new-tokens", "5"], capsys)
    assert rc == 2 and "past the model's 64 positions" in out, out


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_flops_of_other_architectures_match_torch_flop_counter(arch):
    """A learned position-embedding table (GPT-2's wpe, OPT's embed_positions) is a lookup: it was
    counted as a weight matrix, 6 x |table| FLOPs per token too many."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    from elmforest.train.flops import flops_per_token

    if arch == "gpt2":
        c = GPT2Config(
            vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
        )
        c._attn_implementation = "eager"
        m = GPT2LMHeadModel(c)
    else:
        c = OPTConfig(
            vocab_size=100,
            max_position_embeddings=32,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            word_embed_proj_dim=32,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        )
        c._attn_implementation = "eager"
        m = OPTForCausalLM(c)
    x = torch.randint(2, 100, (1, 17))
    with FlopCounterMode(display=False) as fc:
        logits = m(input_ids=x[:, :-1]).logits
        F.cross_entropy(logits.float().flatten(0, 1), x[0, 1:]).backward()
    assert flops_per_token(m, 16) == fc.get_total_flops() / 16


# -- branching from one expert -----------------------------------------------------------------------
def test_branching_from_one_expert_starts_from_its_weights(forest_dir, shards_dir, tmp_path, capsys):
    f = tmp_path / "f"
    shutil.copytree(forest_dir, f)
    before = Forest.load(f)
    src, domain = before.names[0], before.names[1]
    kept = {n: _weights(before.expert_dir(n)) for n in before.names}
    rc, out = _run(
        [
            *(
                "forest",
                "expert",
                "--forest",
                f,
                "--shards",
                shards_dir,
                "--domain",
                domain,
                "--name",
                "grown",
            ),
            *(
                "--branch",
                f"expert:{src}",
                "--no-progress",
                "--set",
                "train.steps=2",
                "--set",
                "train.log_every=1",
            ),
        ],
        capsys,
    )
    assert rc == 0, out
    # a second expert on a planned domain is compute beyond the matched budget: said, as for a new domain
    assert f"note: {domain!r} is the plan's expert for {domain!r} already" in out
    forest = Forest.load(f)
    e = forest.expert("grown")
    assert e["parents"] == [{"name": src, "weight": 1.0}] and e["branch"] == f"expert:{src}"
    assert e["domains"] == [domain]
    run = f / "runs" / "grown"
    cfg = json.loads((run / "run_config.json").read_text())
    assert cfg["model"]["init_from"] == str(before.expert_dir(src).resolve())
    assert cfg["train"]["init_checkpoint"] is None  # a branch starts a schedule of its own
    assert cfg["data"]["domains"] == [domain]
    # its first step ran on the source expert's weights, not on the seed's (nor the domain's own expert's)
    first = _metrics(run)[0]["loss"]
    assert first == pytest.approx(_first_batch_loss(before.expert_dir(src), run), rel=1e-5)
    for other in (before.seed_dir, before.expert_dir(domain)):
        assert first != pytest.approx(_first_batch_loss(other, run), rel=1e-3)
    # growing the forest touched none of the existing experts
    for n, w in kept.items():
        now = _weights(forest.expert_dir(n))
        assert all(torch.equal(now[k], w[k]) for k in w), n


# -- data parallel experts -----------------------------------------------------------------------------
def test_procs_per_expert_trains_each_expert_with_two_gloo_processes(
    shards_dir, tmp_path, capsys, monkeypatch
):
    """`forest train --procs-per-expert 2` on CPU: the expert runs under torchrun with 2 gloo processes and
    ends where the one-process expert ends (same global batch: the mean gradient is the same)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the torchrun workers inherit it: 2 workers on 2 cores
    results = {}
    for procs in (1, 2):
        f = tmp_path / f"p{procs}"
        argv = ["forest", "train", "--forest", f, "--shards", shards_dir, "--preset", "tiny", "--no-progress"]
        argv += ["--no-dense", "--procs-per-expert", procs, "--set", 'data.domains=["code"]']
        for o in ("train.steps=4", "train.batch_size=4", "train.log_every=1", "train.precision=fp32"):
            argv += ["--set", o]
        rc, out = _run(argv, capsys)
        log = f / "runs" / "code" / "job.log"
        assert rc == 0, out + (log.read_text() if log.exists() else "")
        assert "training 1 job(s) (code); each writes to" in out  # --no-progress still says where
        results[procs] = f
    one, two = (Forest.load(results[p]) for p in (1, 2))
    assert one.names == two.names == ["code"]
    s1, s2 = (json.loads((results[p] / "runs" / "code" / "summary.json").read_text()) for p in (1, 2))
    assert (s1["processes"], s2["processes"]) == (1, 2)
    assert s2["tokens"] == s1["tokens"] and two.expert("code")["tokens"] == s2["tokens"] > 0
    l1 = [m["loss"] for m in _metrics(results[1] / "runs" / "code")]
    l2 = [m["loss"] for m in _metrics(results[2] / "runs" / "code")]
    assert len(l1) == len(l2) >= 2 and l2 == pytest.approx(l1, rel=1e-4)
    w1, w2 = _weights(one.expert_dir("code")), _weights(two.expert_dir("code"))
    seed = _weights(one.seed_dir)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k
    assert any(not torch.allclose(w1[k], seed[k], atol=1e-3) for k in w1)  # the experts did move


def test_a_domain_without_held_out_documents_is_said_before_the_seed_trains(
    corpus, tokenizer_dir, tmp_path, capsys
):
    """A 4-document domain got a full share of the seed's mix and an expert no evaluation could score,
    without a word."""
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    (data / "tiny.jsonl").write_text(
        "".join(json.dumps({"id": f"t{i}", "text": f"a tiny text {i} " * 30}) + "\n" for i in range(4))
    )
    argv = [
        "shards",
        "build",
        "--data",
        str(data),
        "--tokenizer",
        str(tokenizer_dir),
        "--out",
        str(tmp_path / "sh"),
    ]
    assert main(argv) == 0
    sh = Shards(tmp_path / "sh")
    assert sh.has("tiny", "train") and not sh.has("tiny", "test")  # 4 ids hashed at 5%/5%: all train here
    capsys.readouterr()
    seed = [
        "forest",
        "seed",
        "--forest",
        str(tmp_path / "f"),
        "--shards",
        str(tmp_path / "sh"),
        "--preset",
        "tiny",
    ]
    assert main([*seed, "--set", "train.steps=2", "--no-progress"]) == 0
    assert "note: tiny: no valid or no test documents" in capsys.readouterr().err
    # --experts N (a number of experts, not domains) has nothing to name: no note, no TypeError traceback
    seed[3] = str(tmp_path / "f2")
    assert main([*seed, "--experts", "2", "--set", "train.steps=2", "--no-progress"]) == 0


def test_a_forest_sharing_a_seed_refuses_a_seed_trained_otherwise(forest_dir, tmp_path):
    """A sweep's expert points are kept by expert LR: rerun with another --dense-lr, they were reported
    as branched from that LR's seed while every one had grown from the first seed."""
    from elmforest.forest import btm
    from elmforest.utils.errors import UserError

    src = Forest.load(forest_dir)
    shared = [f for d in ("seed", "seed_state") for f in (src.root / d).iterdir() if f.is_file()]
    modes, links = {f: f.stat().st_mode for f in shared}, {f: f.stat().st_nlink for f in shared}
    for f in shared:
        f.chmod(0o444)  # an owner who made the seed read-only
    try:
        btm.share_seed(tmp_path / "x", src, src.names)
        linked = all(f.stat().st_nlink == links[f] + 1 for f in shared)
        assert linked and all(f.stat().st_mode & 0o777 == 0o444 for f in shared)  # linked, mode as it was
    finally:
        for f in shared:
            f.chmod(modes[f])
    btm.share_seed(tmp_path / "x", src, src.names)  # a rerun from the same seed
    other = tmp_path / "other"
    shutil.copytree(forest_dir, other)
    m = json.loads((other / "forest.json").read_text())
    lr = m["seed"]["config"]["optim"]["lr"]
    m["seed"]["config"]["optim"]["lr"] = 0.5
    (other / "forest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match=f"optim.lr: {lr!r} -> 0.5"):
        btm.share_seed(tmp_path / "x", Forest.load(other), src.names)


def test_another_users_seed_is_copied_not_linked(forest_dir, tmp_path, monkeypatch):
    """A link to another user's file (group-writable, or where protected_hardlinks is off) is a file they
    may change or make read-only later, under this forest."""
    from elmforest.forest import btm

    theirs = tmp_path / "theirs"
    shutil.copytree(forest_dir, theirs)
    owner = (theirs / "forest.json").stat().st_uid
    monkeypatch.setattr(os, "getuid", lambda: owner + 1)  # this process runs as someone else
    btm.share_seed(tmp_path / "mine", Forest.load(theirs), Forest.load(theirs).names)
    mine = [f for d in ("seed", "seed_state") for f in (tmp_path / "mine" / d).iterdir() if f.is_file()]
    assert mine and all(f.stat().st_nlink == 1 for f in mine)


def test_a_flexolmo_owner_of_a_checkpoint_seed_is_kept_on_a_rerun(shards_dir, tmp_path, capsys):
    """The rerun compared the config asked for before the owner's settings were applied to it, and
    refused the very same command (train.frozen_experts: [0] -> [])."""
    quick = [
        "--preset",
        "tiny",
        "--no-progress",
        "--set",
        "train.batch_size=2",
        "--set",
        "train.precision=fp32",
    ]
    rc, out = _run(
        ["train", "--shards", shards_dir, "--out", tmp_path / "ck", *quick, "--set", "train.steps=1"], capsys
    )
    assert rc == 0, out
    f = tmp_path / "f"
    rc, out = _run(
        [
            "forest",
            "seed",
            "--forest",
            f,
            "--shards",
            shards_dir,
            "--from-checkpoint",
            tmp_path / "ck" / "model",
        ],
        capsys,
    )
    assert rc == 0, out
    argv = [
        "forest",
        "expert",
        "--forest",
        f,
        "--shards",
        shards_dir,
        "--domain",
        "code",
        "--branch",
        "flexolmo",
    ]
    argv += [*quick, "--set", "train.steps=2"]
    assert _run(argv, capsys)[0] == 0
    rc, out = _run(argv, capsys)
    assert rc == 0 and "trained as asked; kept" in out, out
    rc, out = _run([*argv[:-1], "train.steps=3"], capsys)  # another setting is still said
    assert rc == 2 and "train.steps: 2 -> 3" in out, out


def test_a_planned_expert_given_another_length_by_set_is_said_off_the_plan(
    forest_dir, shards_dir, tmp_path, capsys
):
    """`forest expert --set train.steps=N` on a domain of the plan trained N - seed steps where the plan
    gives each expert its share: the ledger counted it, but nothing said the forest was no longer
    compute-matched (an expert off the plan, or a second one on a domain, is said)."""
    from elmforest.data.shards import Shards
    from elmforest.forest import btm

    src = Forest.load(forest_dir)
    f = btm.share_seed(tmp_path / "x", src, src.names)
    shards = Shards(shards_dir)
    a, b = src.names[:2]
    capsys.readouterr()
    share = btm.train_expert(
        f, shards, a, overrides=["train.batch_size=1", "train.grad_accum=2"], progress=False
    )
    assert "off the matched budget" not in capsys.readouterr().out  # the same tokens, accumulated
    longer = btm.train_expert(f, shards, b, overrides=["train.steps=30"], progress=False)
    out = capsys.readouterr().out
    assert longer["tokens"] == 1.5 * share["tokens"]  # 18 steps, not 12
    assert (
        f"note: expert {b} trains {longer['tokens']:,} tokens of 64 (the plan's share: {share['tokens']:,} of 64)"
        in out
    )
    # from the seed's weights instead of its state: the whole schedule again, twice the share
    c = src.names[2]
    fresh = btm.train_expert(
        f,
        shards,
        c,
        overrides=["train.init_checkpoint=null", f"model.init_from={f.seed_dir}"],
        progress=False,
    )
    assert fresh["tokens"] == 2 * share["tokens"] and f"note: expert {c} trains" in capsys.readouterr().out
    # the same tokens in sequences half as long: another per-token cost, and another share of the windows
    g = btm.share_seed(tmp_path / "y", src, src.names)
    btm.train_expert(g, shards, a, overrides=["train.seq_len=32", "train.batch_size=4"], progress=False)
    assert (
        f"note: expert {a} trains {share['tokens']:,} tokens of 32 (the plan's share: {share['tokens']:,} of 64)"
        in capsys.readouterr().out
    )


def test_a_run_that_loads_every_weight_next_reads_only_the_checkpoints_architecture(
    gpt2_checkpoint, monkeypatch
):
    """An expert of a seed that started from a checkpoint loaded that checkpoint's weights, then the
    seed's over them: the architecture alone is made, with the buffers a load makes."""
    import transformers
    from safetensors.torch import load_model as load_into

    from elmforest.config import ModelConfig
    from elmforest.model.build import build_model, load_model

    full = load_model(gpt2_checkpoint).eval()
    weights = gpt2_checkpoint / "model.safetensors"
    with monkeypatch.context() as m:
        m.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: 1 / 0)
        bare = build_model(ModelConfig(init_from=str(gpt2_checkpoint)), 300, 0, initialise=False)
    assert type(bare) is type(full)
    load_into(bare, str(weights), strict=True)  # as train/checkpoint.py loads a seed's state
    bare.eval()
    assert {k: v for k, v in bare.named_buffers()}.keys() == {k: v for k, v in full.named_buffers()}.keys()
    for (k, a), b in zip(bare.named_buffers(), full.buffers(), strict=True):
        assert torch.equal(a, b), k
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(bare(x).logits, full(x).logits)
