"""Merging a forest into a Mixtral MoE, router rows, router training, and the merge methods."""

from __future__ import annotations

import json
import re
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from elmforest.data.shards import Shards
from elmforest.eval.bpb import default_seq_len
from elmforest.forest import btm
from elmforest.forest.btm import share_seed
from elmforest.forest.manifest import Forest
from elmforest.merge.io import LazyWeights, check_same_architecture
from elmforest.merge.methods import get_method
from elmforest.merge.moe import MoeSpec, export_moe, mixtral_config
from elmforest.merge.moe_train import train_router
from elmforest.merge.router import sample_windows
from elmforest.model.build import load_model, resolve_model_dir

FLEX = r"\.mlp\."  # FlexOlmo-style experts: only the MLPs train


@pytest.fixture(scope="module")
def flex_forest(forest_dir, shards_dir, tmp_path_factory):
    """Experts branched from the BTM forest's seed that train only their MLPs."""
    src = Forest.load(forest_dir)
    shards = Shards(shards_dir)
    f = share_seed(tmp_path_factory.mktemp("flex") / "f", src, src.names)
    for d in shards.domains:
        btm.train_expert(f, shards, d, overrides=[f"train.trainable={FLEX}"], progress=False)
    return f.root


def _tokens(shards_dir, n=2, t=24):
    stream = Shards(shards_dir).tokens(Shards(shards_dir).domains[0], "test")
    return torch.as_tensor(np.asarray(stream[: n * t], dtype=np.int64)).view(n, t)


def _route_all_to(j):
    orig = MixtralTopKRouter.forward

    def fwd(self, h):
        logits, scores, idx = orig(self, h)
        return logits, torch.ones_like(scores[:, :1]), torch.full_like(idx[:, :1], j)

    return orig, fwd


def test_mlp_only_experts_keep_the_seeds_shared_weights(flex_forest):
    f = Forest.load(flex_forest)
    with ExitStack() as st:
        seed = LazyWeights(resolve_model_dir(f.seed_dir), st)
        for n in f.names:
            e = LazyWeights(resolve_model_dir(f.expert_dir(n)), st)
            changed = [k for k in e.keys() if not torch.equal(e.get(k), seed.get(k))]
            assert changed and all(".mlp." in k for k in changed)


def test_forced_router_reproduces_each_expert(flex_forest, shards_dir, tmp_path, monkeypatch):
    f = Forest.load(flex_forest)
    out = export_moe(f, tmp_path / "moe", MoeSpec(shared="seed", sample_tokens=256), device="cpu")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == len(f.names)
    x = _tokens(shards_dir)
    for j, n in enumerate(f.names):
        orig, fwd = _route_all_to(j)
        moe = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        monkeypatch.setattr(MixtralTopKRouter, "forward", fwd)
        with torch.no_grad():
            got = moe(input_ids=x).logits
        monkeypatch.setattr(MixtralTopKRouter, "forward", orig)
        with torch.no_grad():
            want = load_model(f.expert_dir(n)).eval()(input_ids=x).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _RefMoE(torch.nn.Module):
    """Top-k softmax routing over the experts' own Llama MLP modules (renormalised top-k weights)."""

    def __init__(self, gate, mlps, k):
        super().__init__()
        self.gate, self.mlps, self.k = gate, torch.nn.ModuleList(mlps), k

    def forward(self, h):
        probs = torch.softmax(h @ self.gate.T, dim=-1)
        top, idx = probs.topk(self.k, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for slot in range(self.k):
            for e, mlp in enumerate(self.mlps):
                sel = (idx[..., slot] == e).unsqueeze(-1)
                out = out + torch.where(sel, top[..., slot : slot + 1] * mlp(h), 0.0)
        return out


def test_hf_mixtral_equals_reference_forward(forest_dir, shards_dir, tmp_path):
    f = Forest.load(forest_dir)
    out = export_moe(f, tmp_path / "moe", MoeSpec(top_k=2, sample_tokens=256), device="cpu")
    moe = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    experts = [load_model(d).eval() for d in f.expert_dirs()]
    ref = load_model(f.expert_dirs()[0]).eval()
    shared = {
        k: sum(e.state_dict()[k] for e in experts) / len(experts)
        for k in ref.state_dict()
        if ".mlp." not in k
    }
    ref.load_state_dict(shared, strict=False)
    with ExitStack() as st:
        w = LazyWeights(out, st)
        for i, layer in enumerate(ref.model.layers):
            gate = w.get(f"model.layers.{i}.block_sparse_moe.gate.weight")
            layer.mlp = _RefMoE(gate, [e.model.layers[i].mlp for e in experts], 2)
    x = _tokens(shards_dir)
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=x).logits, ref(input_ids=x).logits, rtol=1e-4, atol=1e-4)
        # and it generates like any HF model
        g = moe.generate(x[:1, :5], max_new_tokens=4, do_sample=False)
    assert g.shape == (1, 9)


def test_router_rows_match_brute_force(forest_dir, shards_dir, tmp_path):
    f = Forest.load(forest_dir)
    for center in (False, True):
        out = export_moe(
            f, tmp_path / f"moe{center}", MoeSpec(sample_tokens=200, center=center), device="cpu"
        )
        shards = Shards(shards_dir)
        T = default_seq_len(resolve_model_dir(f.expert_dirs()[0]))
        means = []
        for n in f.names:
            model = load_model(f.expert_dir(n)).eval()
            acts: list = [[] for _ in model.model.layers]
            hooks = [
                layer.post_attention_layernorm.register_forward_hook(
                    lambda _m, _a, o, store=acts[i]: store.append(o.detach())
                )
                for i, layer in enumerate(model.model.layers)
            ]
            rows = []
            ((stream, ids),) = sample_windows(shards, f.expert(n)["domains"], "train", T, 200)
            for w in ids:  # one window at a time, every real token kept, then one mean
                lo, hi = w * T, min((w + 1) * T, len(stream))
                tgt = torch.as_tensor(np.asarray(stream[lo:hi], dtype=np.int64))
                prev = int(stream[lo - 1]) if lo > 0 else shards.eos_id
                x = torch.cat([torch.tensor([prev]), tgt[:-1]]).unsqueeze(0)
                with torch.no_grad():
                    model(input_ids=x)
            for h in hooks:
                h.remove()
            rows = torch.stack([torch.cat([a[0] for a in layer_acts]).mean(0) for layer_acts in acts])
            means.append(rows)
        means = torch.stack(means, dim=1).double()  # [L, E, H]
        if center:
            means = means - means.mean(dim=1, keepdim=True)
        want = means / means.norm(dim=-1, keepdim=True)
        with ExitStack() as st:
            w = LazyWeights(out, st)
            got = torch.stack(
                [w.get(f"model.layers.{i}.block_sparse_moe.gate.weight") for i in range(want.shape[0])]
            )
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def _mlp_input_means(model, shards, domains, seq_len, tokens):
    """[layers, hidden]: the mean over every real token of the sampled windows (one window at a time) of
    the hidden state entering each layer's MLP (the output of its post-attention norm)."""
    acts: list = [[] for _ in model.model.layers]
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(
            lambda _m, _a, o, store=acts[i]: store.append(o.detach()[0].double())
        )
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        for stream, ids in sample_windows(shards, domains, "train", seq_len, tokens):
            for w in ids:
                lo, hi = w * seq_len, min((w + 1) * seq_len, len(stream))
                tgt = torch.as_tensor(np.asarray(stream[lo:hi], dtype=np.int64))
                prev = int(stream[lo - 1]) if lo > 0 else shards.eos_id
                with torch.no_grad():
                    model(input_ids=torch.cat([torch.tensor([prev]), tgt[:-1]]).unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([torch.cat(layer_acts).mean(0) for layer_acts in acts])


@pytest.mark.parametrize("shared,center", [("average", False), ("seed", True)])
def test_hidden_state_router_rows_match_brute_force_with_one_common_model(
    forest_dir, shards_dir, tmp_path, shared, center
):
    """`--router hidden-states`: one common model (the experts' average, or the seed with --shared seed)
    embeds every expert's data, so all rows live in one basis (unlike domain-embeddings)."""
    from elmforest.cli import main

    f = Forest.load(forest_dir)
    out = tmp_path / "moe"
    argv = ["merge", "moe", "--forest", str(forest_dir), "--out", str(out), "--router", "hidden-states"]
    argv += ["--shared", shared, "--sample-tokens", "200", "--device", "cpu"]
    assert main(argv + (["--router-center"] if center else [])) == 0
    assert (out / "routing.json").is_file()  # merge moe reports how the merged model routes
    experts = [load_model(d).eval() for d in f.expert_dirs()]
    if shared == "seed":
        common = load_model(f.seed_dir).eval()
    else:  # the uniform average of the experts, by hand
        common = load_model(f.expert_dirs()[0]).eval()
        sds = [e.state_dict() for e in experts]
        common.load_state_dict({k: sum(sd[k] for sd in sds) / len(sds) for k in sds[0]})
    shards = Shards(shards_dir)
    T = default_seq_len(resolve_model_dir(f.expert_dirs()[0]))
    means = torch.stack(
        [_mlp_input_means(common, shards, f.expert(n)["domains"], T, 200) for n in f.names], dim=1
    )  # [L, E, H]
    if center:
        means = means - means.mean(dim=1, keepdim=True)
    want = means / means.norm(dim=-1, keepdim=True)
    with ExitStack() as st:
        w = LazyWeights(out, st)
        got = torch.stack(
            [w.get(f"model.layers.{i}.block_sparse_moe.gate.weight") for i in range(want.shape[0])]
        )
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # not what each expert's own model gives (domain-embeddings): the common model matters
    own = torch.stack(
        [
            _mlp_input_means(e, shards, f.expert(n)["domains"], T, 200)
            for n, e in zip(f.names, experts, strict=True)
        ],
        dim=1,
    )
    if center:
        own = own - own.mean(dim=1, keepdim=True)
    assert not torch.allclose(got.double(), own / own.norm(dim=-1, keepdim=True), atol=1e-3)
    meta = json.loads((out / "elmforest_moe.json").read_text())
    assert meta["spec"]["router"] == "hidden-states" and meta["shared"] == shared


def test_exclude_and_opt_out_give_n_minus_one_experts(forest_dir, shards_dir, tmp_path, capsys):
    f = Forest.load(forest_dir)
    gone = f.names[1]
    out = export_moe(f, tmp_path / "ex", MoeSpec(exclude=[gone], router="random"), device="cpu")
    meta = json.loads((out / "elmforest_moe.json").read_text())
    assert [e["name"] for e in meta["experts"]] == [n for n in f.names if n != gone]
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == len(f.names) - 1
    AutoModelForCausalLM.from_pretrained(str(out))
    with pytest.raises(ValueError, match="no expert named"):
        export_moe(f, tmp_path / "bad", MoeSpec(exclude=["nope"], router="random"))

    copy = tmp_path / "copy"
    shutil.copytree(forest_dir, copy)
    Forest.load(copy).remove(gone)
    out2 = export_moe(copy, tmp_path / "optout", MoeSpec(top_k=2, sample_tokens=128), device="cpu")
    meta2 = json.loads((out2 / "elmforest_moe.json").read_text())
    assert gone in meta2["opted_out"] and gone not in [e["name"] for e in meta2["experts"]]
    assert "opted out" in (out2 / "README.md").read_text()
    # excluding an expert that was opted out says so, and merges the rest
    out3 = export_moe(copy, tmp_path / "ex2", MoeSpec(exclude=[gone], router="random"), device="cpu")
    assert "already opted out" in capsys.readouterr().err
    assert json.loads((out3 / "elmforest_moe.json").read_text())["experts"] == meta2["experts"]
    m = AutoModelForCausalLM.from_pretrained(str(out2))
    assert m.config.num_local_experts == len(f.names) - 1
    # no pickle anywhere in the output: only JSON, markdown and safetensors
    for p in list(out.iterdir()) + list(out2.iterdir()):
        assert p.suffix in (".json", ".safetensors", ".md"), p
        assert not p.read_bytes().startswith(b"\x80"), p


def test_mismatched_architectures_are_refused(forest_dir, tmp_path):
    llama = json.loads((Forest.load(forest_dir).expert_dirs()[0] / "config.json").read_text())
    with pytest.raises(ValueError, match="GPT-2 has learned position embeddings.*forest average"):
        mixtral_config({**llama, "model_type": "gpt2"}, 2, 2)
    with pytest.raises(ValueError, match="attention_bias"):
        mixtral_config({**llama, "attention_bias": True}, 2, 2)
    copy = tmp_path / "copy"
    shutil.copytree(forest_dir, copy)
    f = Forest.load(copy)
    cfg_path = f.expert_dirs()[1] / "config.json"
    cfg_path.write_text(json.dumps({**llama, "intermediate_size": llama["intermediate_size"] * 2}))
    with pytest.raises(ValueError, match="different architecture"):
        check_same_architecture(f.expert_dirs(), f.names)
    with pytest.raises(ValueError, match="different architecture"):
        export_moe(f, tmp_path / "out", MoeSpec(router="random"))
    assert not (tmp_path / "out").exists()
    # an average of tensors that fit, under configs that differ (rms_norm_eps): taken before, silently
    from elmforest.merge.average import average_checkpoints

    cfg_path.write_text(json.dumps({**llama, "rms_norm_eps": 1e-6}))
    with pytest.raises(ValueError, match="different architecture.*rms_norm_eps"):
        average_checkpoints(f.expert_dirs()[:2], tmp_path / "avg")
    assert not (tmp_path / "avg").exists()
    average_checkpoints([f.expert_dirs()[0], f.expert_dirs()[2]], tmp_path / "avg")  # alike: averaged


def test_shards_stay_within_one_expert(forest_dir, tmp_path):
    f = Forest.load(forest_dir)
    out = export_moe(f, tmp_path / "moe", MoeSpec(router="random"))
    one = (resolve_model_dir(f.expert_dirs()[0]) / "model.safetensors").stat().st_size
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert sum(s.stat().st_size for s in shards) > one  # the MoE is bigger than one expert ...
    assert max(s.stat().st_size for s in shards) <= one + 65536  # ... but no shard is


def test_router_training_changes_only_the_router(forest_dir, shards_dir, tmp_path):
    shutil.copytree(forest_dir, tmp_path / "f")  # its training enters the forest's ledger: a copy's
    f = Forest.load(tmp_path / "f")
    out = export_moe(f, tmp_path / "moe", MoeSpec(router="random"), device="cpu")
    before = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    train_router(out, shards_dir, steps=3, lr=1e-2, overrides=["train.precision=fp32"], progress=False)
    after = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("mlp.gate.weight") for k in changed)
    meta = json.loads((out / "elmforest_moe.json").read_text())
    assert meta["router_training"]["steps"] == 3
    assert "Router trained" in (out / "README.md").read_text()
    # trained through Python, not the CLI: its compute is in the forest's ledger all the same
    card = meta["router_training"]
    (row,) = [p for p in Forest.load(tmp_path / "f").ledger() if p.get("phase") == "router_training"]
    assert (row["name"], row["flops"]) == ("moe", card["flops"]) and card["flops"] > 0


def test_merge_cli_and_eval(forest_dir, shards_dir, tmp_path, capsys):
    from elmforest.cli import main

    out = tmp_path / "moe"
    gone = Forest.load(forest_dir).names[0]
    argv = ["merge", "moe", "--forest", str(forest_dir), "--out", str(out), "--exclude", gone]
    assert main([*argv, "--sample-tokens", "128", "--device", "cpu"]) == 0
    res = tmp_path / "ev.json"
    assert (
        main(["eval", "--model", str(out), "--data", str(shards_dir), "--json", str(res), "--no-progress"])
        == 0
    )
    assert np.isfinite(json.loads(res.read_text())["mean_bpb"])
    assert (
        main(["merge", "moe", "--forest", str(forest_dir), "--out", str(tmp_path / "x"), "--exclude", "zz"])
        == 2
    )
    # refused before anything is merged: router-training options without --train-router, a bad --set
    # or other-tokenizer --train-data with it, an output inside the forest
    other = tmp_path / "other-shards"
    shutil.copytree(shards_dir, other)
    index = json.loads((other / "index.json").read_text())
    index["tokenizer"]["fingerprint"] = "0" * 16
    (other / "index.json").write_text(json.dumps(index))
    base = ["merge", "moe", "--forest", str(forest_dir), "--out", str(tmp_path / "y")]
    for extra, message in (
        (["--steps", "7"], "--steps set the router training: add --train-router"),
        (["--steps", "100"], "--steps set the router training"),  # the default given by hand, too
        (["--set", "foo"], "--set set the router training"),
        (["--train-router", "--set", "optim.beta1=abc"], "optim.beta1: expected a number"),
        (["--train-router", "--train-data", str(other)], "different tokenizer"),
        # these were found only once the merge was written, leaving an untrained one in --out
        (["--train-router", "--top-k", "1"], "needs top-k >= 2 (here top-1 of 3"),
        (["--train-router", "--set", "data.domains=[nope]"], "no 'train' split for domain(s) ['nope']"),
        (["--train-router", "--train-data", str(tmp_path / "none")], "not a shards directory"),
    ):
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    inside = ["merge", "moe", "--forest", str(forest_dir), "--out", str(Path(forest_dir) / "experts" / "m")]
    assert main(inside) == 2 and "is inside the forest" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and not (Path(forest_dir) / "experts" / "m").exists()


# -- merge methods -----------------------------------------------------------------------------------


def _ties_brute(ts, w, base, density, scale):
    """TIES element by element in plain Python floats (Yadav et al. 2023): trim each task vector to its
    `density` largest magnitudes, elect the sign of the weighted sum, average the agreeing entries."""
    b = base.double().flatten().tolist()
    deltas = [[x - y for x, y in zip(t.double().flatten().tolist(), b, strict=True)] for t in ts]
    keep = max(1, int(round(density * len(b))))
    trimmed = []
    for d in deltas:
        kept_idx = set(sorted(range(len(d)), key=lambda i, d=d: -abs(d[i]))[:keep])
        trimmed.append([v if i in kept_idx else 0.0 for i, v in enumerate(d)])
    out = []
    for i, x in enumerate(b):
        s = sum(wj * d[i] for wj, d in zip(w, trimmed, strict=True))
        sign = (s > 0) - (s < 0)
        num = den = 0.0
        for wj, d in zip(w, trimmed, strict=True):
            v = d[i]
            if v != 0 and ((v > 0) - (v < 0)) == sign:
                num += wj * v
                den += wj
        out.append(x + scale * (num / den if den else 0.0))
    return torch.tensor(out, dtype=base.dtype).view_as(base)


def test_merge_methods_match_hand_computation():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=g)
    ts = [base + torch.randn(5, 7, generator=g) for _ in range(3)]
    w = [0.5, 0.3, 0.2]
    lin = get_method("linear")([t.clone() for t in ts], w)
    torch.testing.assert_close(lin, sum(wi * t for wi, t in zip(w, ts, strict=True)))
    ta = get_method("task_arithmetic")(ts, w, base=base, scale=1.0)
    torch.testing.assert_close(ta, lin)  # λ = 1 with weights summing to 1 is the average
    ta2 = get_method("task_arithmetic")(ts, w, base=base, scale=0.5)
    torch.testing.assert_close(ta2, base + 0.5 * sum(wi * (t - base) for wi, t in zip(w, ts, strict=True)))
    for density in (0.3, 0.5, 1.0):  # 0.5 of 35 entries: 18 kept (rounded), not 17 (floored)
        got = get_method("ties")(ts, w, base=base, density=density, scale=0.8)
        torch.testing.assert_close(got, _ties_brute(ts, w, base, density, 0.8), rtol=1e-5, atol=1e-6)
    # deltas of few distinct magnitudes (bf16 checkpoints): exactly `density` of each kept, ties by
    # position; every tie at the threshold was kept (65% at density 0.5)
    qb = (base * 4).round() / 4  # exact in float32, as the deltas are
    q = [qb + (torch.randn(5, 7, generator=g) * 2).round() / 4 for _ in range(3)]
    for density in (0.2, 0.5):
        got = get_method("ties")(q, w, base=qb, density=density, scale=1.0)
        torch.testing.assert_close(got, _ties_brute(q, w, qb, density, 1.0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown merge method"):
        get_method("slerp")


def test_forest_average_cli_with_ties(forest_dir, tmp_path):
    from safetensors.torch import load_file

    from elmforest.cli import main

    f = Forest.load(forest_dir)
    out = tmp_path / "ties"
    argv = ["forest", "average", "--forest", str(forest_dir), "--out", str(out)]
    assert main([*argv, "--method", "ties", "--density", "0.5", "--scale", "0.9"]) == 0
    got = load_file(str(out / "model.safetensors"))
    experts = [load_file(str(resolve_model_dir(d) / "model.safetensors")) for d in f.expert_dirs()]
    seed = load_file(str(resolve_model_dir(f.seed_dir) / "model.safetensors"))
    n = len(experts)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        want = _ties_brute([e[name] for e in experts], [1 / n] * n, seed[name], density=0.5, scale=0.9)
        assert not torch.allclose(want, sum(e[name] for e in experts) / n, atol=1e-4)  # not the mean
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6)
    meta = json.loads((out / "elmforest_average.json").read_text())
    assert meta["method"] == "ties" and meta["params"] == {"scale": 0.9, "density": 0.5}
    # an --out that is a link to a folder: the output was renamed onto the link (a real folder on this
    # disk now) while the folder it pointed to kept the old output. Refused, naming the folder
    link = tmp_path / "link"
    link.symlink_to(out)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    argv = ["forest", "average", "--forest", str(forest_dir), "--out", str(link)]
    assert main(argv) == 2 and link.is_symlink()
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_forest_average_refuses_options_of_another_mode_it_would_ignore(
    forest_dir, shards_dir, tmp_path, capsys
):
    """`--data --domain` without `--weights posterior` gave a uniform average, `--density` outside TIES
    did nothing, each without a word (`--scale` outside its methods was refused)."""
    from elmforest.cli import main

    argv = ["forest", "average", "--forest", str(forest_dir), "--out", str(tmp_path / "a")]
    for extra, said in (
        (["--data", str(tmp_path), "--domain", "code"], "--data, --domain choose(s) the posterior weights"),
        (["--prior-batches", "5"], "--prior-batches choose(s) the posterior weights"),
        (["--method", "task_arithmetic", "--density", "0.5"], "--density applies to --method ties"),
        (["--density", "0.5"], "--density applies to --method ties, not --method linear"),
        (["--density", "0.2"], "--density applies to --method ties"),  # the default given by hand, too
    ):
        assert main([*argv, *extra]) == 2, extra
        assert said in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    # a domain with no valid split: this command's own options are offered, not branching's --branch
    shards = tmp_path / "shards"
    shutil.copytree(shards_dir, shards)
    index = json.loads((shards / "index.json").read_text())
    del index["domains"]["code"]["splits"]["valid"]
    (shards / "index.json").write_text(json.dumps(index))
    assert main([*argv, "--weights", "posterior", "--data", str(shards), "--domain", "code"]) == 2
    err = capsys.readouterr().err
    assert (
        "no valid split to weigh the experts on; average with --weights uniform" in err
        and "--branch" not in err
    )


def test_failed_export_leaves_the_old_output_and_no_temp(forest_dir, tmp_path, monkeypatch):
    import elmforest.merge.moe as moe_mod

    f = Forest.load(forest_dir)
    out = export_moe(f, tmp_path / "moe", MoeSpec(router="random"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(moe_mod, "_write_side_files", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_moe(f, out, MoeSpec(router="random", seed=1))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["moe"]
    # an existing directory that is not an earlier export is never replaced
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="not an earlier output"):
        export_moe(f, other, MoeSpec(router="random"))
    assert (other / "notes.txt").read_text() == "keep me"


def test_transformers4_config_keeps_rope_and_architectures(forest_dir, tmp_path):
    from transformers import MixtralConfig

    llama = json.loads((Forest.load(forest_dir).expert_dirs()[0] / "config.json").read_text())
    old = {k: v for k, v in llama.items() if k != "rope_parameters"}
    old.update(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    cfg = MixtralConfig(**{k: v for k, v in mixtral_config(old, 3, 2).items() if k != "model_type"})
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.rope_parameters["rope_theta"] == 500000.0
    bare = {k: v for k, v in llama.items() if k != "rope_parameters"}
    assert (
        MixtralConfig(
            **{k: v for k, v in mixtral_config(bare, 3, 2).items() if k != "model_type"}
        ).rope_parameters["rope_theta"]
        == 10000.0
    )  # Llama's default, not Mixtral's
    out = export_moe(Forest.load(forest_dir), tmp_path / "moe", MoeSpec(router="random"))
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]


def test_router_training_never_reuses_a_run_of_an_older_export(forest_dir, shards_dir, tmp_path):
    shutil.copytree(forest_dir, tmp_path / "f")
    f = Forest.load(tmp_path / "f")
    out = tmp_path / "moe"
    kw = {"steps": 2, "lr": 1e-2, "overrides": ["train.precision=fp32"], "progress": False}
    export_moe(f, out, MoeSpec(router="random", seed=0))
    train_router(out, shards_dir, **kw)
    first = AutoModelForCausalLM.from_pretrained(str(out)).model.layers[0].mlp.gate.weight.detach().clone()
    run1 = json.loads((out / "elmforest_moe.json").read_text())["router_training"]["from_fingerprint"]
    assert not list(tmp_path.glob("moe.router-run-*"))  # the scratch run goes once `out` holds the result
    # a new export into the same place (its router trained again: a plain export there is refused)
    export_moe(f, out, MoeSpec(router="random", seed=1), redo=("router_training",))
    # the run of another export (another fingerprint) killed while its router trained: not this export's
    # to resume, a copy of every expert: deleted, and so is its record (as the finished run's)
    orphan = tmp_path / "moe.router-run-0123456789ab"
    (orphan / "checkpoints").mkdir(parents=True)
    f.record_output(orphan, "router-run", f.names)
    train_router(out, shards_dir, **kw)
    assert not orphan.exists() and not list(tmp_path.glob("moe.router-run-*"))
    assert "router-run" not in [o["kind"] for o in Forest.load(f.root).data["outputs"]]
    second = AutoModelForCausalLM.from_pretrained(str(out)).model.layers[0].mlp.gate.weight.detach()
    assert json.loads((out / "elmforest_moe.json").read_text())["router_training"]["from_fingerprint"] != run1
    assert not torch.equal(first, second)
    export_moe(f, tmp_path / "top1", MoeSpec(router="random", top_k=1))
    with pytest.raises(ValueError, match="top-k >= 2"):
        train_router(tmp_path / "top1", shards_dir, **kw)


def test_routing_stats_match_the_models_own_router_logits(forest_dir, shards_dir, tmp_path, capsys):
    """Load, entropy and top-1 agreement from the hooks equal those computed from the router logits
    transformers itself returns (output_router_logits), on the same windows; the CLI writes them."""
    from elmforest.cli import main
    from elmforest.eval.bpb import window_batch
    from elmforest.merge.routing import routing_stats

    f = Forest.load(forest_dir)
    out = export_moe(f, tmp_path / "moe", MoeSpec(top_k=2, sample_tokens=256), device="cpu")
    meta = json.loads((out / "elmforest_moe.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    sh = Shards(shards_dir)
    stats = routing_stats(model, meta["experts"], sh, split="valid", tokens=96, seq_len=24, batch_size=3)
    E, k = len(meta["experts"]), 2
    for d in sh.domains:
        ((stream, ids),) = sample_windows(sh, [d], "valid", 24, 96)
        x, y = window_batch(stream, sh.eos_id, 24, ids)
        with torch.no_grad():
            logits = model(input_ids=x, output_router_logits=True).router_logits
        keep = (y != -100).reshape(-1)
        own = [e["index"] for e in meta["experts"] if d in e["domains"]]
        loads, ents, hits = [], [], []
        for lg in logits:
            p = torch.softmax(lg.reshape(-1, E)[keep].double(), -1)
            top = p.topk(k, -1).indices
            loads.append([float((top == e).sum()) / (len(p) * k) for e in range(E)])
            ents.append(float(-(p * p.log()).sum(-1).mean()))
            hits.append(float(torch.isin(top[:, 0], torch.tensor(own)).double().mean()))
        got = stats["domains"][d]
        assert got["tokens"] == int(keep.sum())
        np.testing.assert_allclose(got["load"], loads, atol=1e-9)
        assert got["entropy"] == pytest.approx(np.mean(ents), rel=1e-4)
        assert got["top1_own"] == pytest.approx(np.mean(hits), abs=1e-9)
        assert got["own"] == own  # the plot outlines these, not the expert that happens to share d's name
        assert sum(got["load_mean"]) == pytest.approx(1.0)
    for asked in (96, 10**6):  # "short" only where the split is: not where its last window is partial
        assert (
            main(
                ["merge", "routing", "--model", str(out), "--shards", str(shards_dir), "--tokens", str(asked)]
            )
            == 0
        )
        said = capsys.readouterr().out
        assert "top-1 expert = the domain's own" in said
        for d in sh.domains:
            line = next(x for x in said.splitlines() if x.strip().startswith(d))
            assert ("split is short" in line) == (len(sh.tokens(d, "valid")) < asked), line
    # shards of another tokenizer: refused, not routed as if their ids were this model's tokens
    other = tmp_path / "other"
    shutil.copytree(shards_dir, other)
    index = json.loads((other / "index.json").read_text())
    index["tokenizer"]["fingerprint"] = "0" * 16
    (other / "index.json").write_text(json.dumps(index))
    assert main(["merge", "routing", "--model", str(out), "--shards", str(other)]) == 2
    assert "different tokenizer" in capsys.readouterr().err
    assert (out / "routing.png").stat().st_size > 0 and json.loads((out / "routing.json").read_text())[
        "top_k"
    ] == 2
    # a domain without a valid split (a small owner) is not routed: said, not dropped from the mean unseen
    index = json.loads((other / "index.json").read_text())
    index["tokenizer"]["fingerprint"] = Shards(shards_dir).tokenizer_fingerprint
    del index["domains"]["legal"]["splits"]["valid"]
    (other / "index.json").write_text(json.dumps(index))
    assert main(["merge", "routing", "--model", str(out), "--shards", str(other)]) == 0
    assert "(over 2 of 3 domains; no valid split: legal)" in capsys.readouterr().out
    assert json.loads((out / "routing.json").read_text())["missing"] == ["legal"]


def test_router_losses_by_hand_and_a_btx_run_logs_the_lm_loss(forest_dir, shards_dir, tmp_path):
    """train.router_aux_loss / router_z_loss: the objective is the LM loss plus the Switch load-balancing
    loss (E * sum over slots and experts of the slot share times the mean probability, all layers'
    tokens together) and the z-loss (mean squared logsumexp), computed here by hand; a run trains with
    them and logs the LM loss alone; a dense model is refused."""
    from conftest import tiny_config

    from elmforest.train.trainer import Trainer, train
    from elmforest.utils.errors import UserError

    out = export_moe(
        Forest.load(forest_dir), tmp_path / "moe", MoeSpec(top_k=2, sample_tokens=128), device="cpu"
    )
    cfg = tiny_config(shards_dir, steps=3)
    cfg.model.init_from = str(out)
    cfg.train.router_aux_loss, cfg.train.router_z_loss, cfg.train.ckpt_every = 0.05, 0.01, 0
    cfg.train.log_every = 1
    tr = Trainer(cfg, tmp_path / "probe", progress=False)
    tr._setup()
    batch = tr.sampler.batch(0, 0)
    objective, ce = tr._loss(batch)
    seen = []  # the logits rebuilt from what each router reads: not the model's own router_logits
    gates = [layer.mlp.gate for layer in tr.model.model.layers]
    hooks = [
        g.register_forward_pre_hook(lambda m, a: seen.append(a[0].double() @ m.weight.double().T))
        for g in gates
    ]
    with torch.no_grad():
        tr.model(input_ids=batch[:, :-1])
    for h in hooks:
        h.remove()
    E, k = tr.model.config.num_local_experts, 2
    lg = torch.cat([g.reshape(-1, E) for g in seen])
    assert len(seen) == len(gates) and not torch.allclose(lg.sum(-1), torch.ones((), dtype=lg.dtype))
    p = torch.softmax(lg, -1)
    top = p.topk(k, -1).indices
    aux = E * sum(
        float((top[:, j] == e).double().mean()) * float(p[:, e].mean()) for j in range(k) for e in range(E)
    )
    z = float((torch.logsumexp(lg, -1) ** 2).mean())
    assert aux > 0 and z > 0
    assert float(objective - ce) == pytest.approx(0.05 * aux + 0.01 * z, rel=1e-4)
    summary = train(cfg, tmp_path / "btx", progress=False)
    first = json.loads((tmp_path / "btx" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(float(ce), rel=1e-4)  # the LM loss is what is logged
    assert summary["flops"] > 0
    dense = tiny_config(shards_dir, steps=2)
    dense.train.router_aux_loss = 0.01
    with pytest.raises(UserError, match="has no router"):
        train(dense, tmp_path / "dense", progress=False)
    from elmforest.train import moe_loss
    from elmforest.train.moe_loss import router_losses
    from elmforest.utils.errors import Failed

    assert moe_loss.SOFTMAXED_ROUTER_LOGITS is False  # the installed transformers hands out logits
    moe_loss.SOFTMAXED_ROUTER_LOGITS = True  # as on transformers 5.0-5.5
    try:
        with pytest.raises(Failed, match="are probabilities, not logits"):
            router_losses(tr.model.config, seen, 0.05, 0.01)
    finally:
        moe_loss.SOFTMAXED_ROUTER_LOGITS = False


def test_btx_finetuning_trains_every_parameter_and_enters_the_ledger(
    forest_dir, shards_dir, tmp_path, capsys
):
    """`merge finetune`: the whole MoE trains (experts, router, attention, embeddings) with the
    load-balancing loss; the output says what trained; its FLOPs (all parameters trainable: the
    trainer's formula times the tokens) are a phase of the forest's ledger; routing is reported."""
    from elmforest.cli import main
    from elmforest.train.flops import flops_per_token

    root = tmp_path / "f"
    shutil.copytree(forest_dir, root)
    f = Forest.load(root)
    before = f.total_flops()
    moe = export_moe(f, tmp_path / "moe", MoeSpec(top_k=2, sample_tokens=128), device="cpu")
    argv = ["merge", "finetune", "--model", str(moe), "--steps", "3", "--out", str(tmp_path / "ft")]
    argv += [
        "--shards",
        str(shards_dir),
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--set",
        "train.precision=fp32",
    ]
    # into another export (other settings, untrained): it was replaced without a word; a model that is
    # not there was said as "no record of the experts' shards"
    other = export_moe(f, tmp_path / "other", MoeSpec(top_k=1, sample_tokens=128), device="cpu")
    card = (other / "elmforest_moe.json").read_bytes()
    assert main([*argv[:7], str(other), *argv[8:], "--no-progress"]) == 2
    assert "holds another MoE export than" in capsys.readouterr().err
    assert (other / "elmforest_moe.json").read_bytes() == card
    assert main(["merge", "finetune", "--model", str(tmp_path / "nosuch"), "--steps", "1"]) == 2
    assert "not a model checkpoint" in capsys.readouterr().err
    assert main(argv + ["--no-progress"]) == 0
    assert "fine-tuned for 3 steps" in capsys.readouterr().out
    ft = tmp_path / "ft"
    meta = json.loads((ft / "elmforest_moe.json").read_text())["finetuning"]
    assert meta["router_aux_loss"] == 0.01 and meta["trainable"] is None and meta["steps"] == 3
    # the scratch run is gone, its record is not: metrics and TensorBoard events beside the result
    logged = [json.loads(x)["step"] for x in (ft / "train_logs" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == 3 and any((ft / "train_logs" / "tensorboard").iterdir())
    from elmforest.clients.report_data import moe_runs

    runs, absent = moe_runs([ft])  # the report draws the fine-tune's curve from them
    assert (
        [r["name"] for r in runs] == ["ft (MoE fine-tune (BTX))"]
        and runs[0]["steps"][-1] == 3
        and runs[0]["done"]
        and not absent
    )
    with ExitStack() as st:
        a, b = LazyWeights(moe, st), LazyWeights(ft, st)
        unchanged = [k for k in a.keys() if torch.equal(a.get(k), b.get(k))]
    assert not unchanged  # every tensor trained (BTX), unlike router training
    model = AutoModelForCausalLM.from_pretrained(str(ft))
    seq = json.loads((ft / "elmforest_run.json").read_text())["train"]["seq_len"]
    assert meta["flops"] == flops_per_token(model, seq) * meta["tokens"] and meta["tokens"] == 3 * 4 * seq
    phase = next(p for p in Forest.load(root).ledger() if p.get("phase") == "btx_finetuning")
    assert phase["flops"] == meta["flops"]
    assert (
        sum(p["flops"] for p in Forest.load(root).ledger()) == before + meta["flops"]
    )  # seed + experts + BTX
    assert (ft / "routing.json").is_file() and "Fine-tuned afterwards (BTX)" in (ft / "README.md").read_text()
    # fine-tuning it again in place would count one run over another in the ledger: refused; a run
    # killed after its output was written, before its ledger row and tidying, has both done then
    from elmforest.merge.moe_card import export_fingerprint

    left = ft.with_name(f"ft.finetune-run-{export_fingerprint(moe)}")
    (left / "model").mkdir(parents=True)
    (left / "metrics.jsonl").write_text('{"step": 3}\n')
    kept = json.loads((root / "forest.json").read_text())
    row = [p for p in kept["ledger"] if p.get("phase") == "btx_finetuning" and p.get("name") == "ft"]
    (root / "forest.json").write_text(
        json.dumps({**kept, "ledger": [p for p in kept["ledger"] if p not in row]})
    )
    assert main(["merge", "finetune", "--model", str(ft), "--steps", "1", "--shards", str(shards_dir)]) == 2
    assert "already fine-tuned" in capsys.readouterr().err
    again_row = [p for p in Forest.load(root).ledger() if p.get("phase") == "btx_finetuning"]
    assert [(p["tokens"], p["flops"]) for p in again_row] == [(p["tokens"], p["flops"]) for p in row]
    assert not left.exists()
    # a run the trainer refuses (a --trainable that matches nothing) leaves no scratch run, and the
    # forest no record of an output never written
    bad = [*argv[:7], str(tmp_path / "ft3"), *argv[8:], "--trainable", "nomatch", "--no-progress"]
    assert main(bad) == 2 and "matches no parameter" in capsys.readouterr().err
    assert not list(tmp_path.glob("ft3*"))
    recorded = json.loads((root / "forest.json").read_text()).get("outputs", [])
    assert not [o for o in recorded if "ft3" in o["path"]]
    # fine-tuned again into another folder: the card and record keep the first run
    again = tmp_path / "ft2"
    assert (
        main(
            [
                "merge",
                "finetune",
                "--model",
                str(ft),
                "--steps",
                "1",
                "--out",
                str(again),
                *argv[8:],
                "--no-progress",
                "--no-routing",
                "--set",
                "train.frozen_experts=[0]",
            ]
        )
        == 0
    )
    card = (again / "README.md").read_text()
    assert "Fine-tuned afterwards (BTX) for 3 steps" in card and "Fine-tuned again (BTX) for 1 steps" in card
    assert "every parameter trained (experts 0 held frozen)" in card  # the record says what trained
    assert json.loads((again / "elmforest_moe.json").read_text())["finetuning"]["frozen_experts"] == [0]
    assert json.loads((again / "elmforest_moe.json").read_text())["finetuning"]["previous"]["steps"] == 3
    # a fresh merge written over the fine-tuned model would discard its training: refused; over a
    # merge whose router was trained, --train-router again is a rerun, and a plain one is refused
    capsys.readouterr()
    assert main(["merge", "moe", "--forest", str(root), "--out", str(ft), "--no-routing"]) == 2
    assert "holds a trained MoE (BTX fine-tuning (3 steps))" in capsys.readouterr().err
    # and so would a fine-tune of another MoE written into it (its ledger row stayed, its training went)
    assert main([*argv[:5], "1", "--out", str(ft), *argv[8:], "--no-progress"]) == 2
    assert "(BTX fine-tuning (3 steps)); fine-tuning into it would discard" in capsys.readouterr().err
    stamp = (ft / "elmforest_moe.json").stat().st_mtime_ns  # the same run again: kept, not trained again
    # killed after the result was written, before its scratch run (a copy of the experts) was deleted
    left = ft.with_name(f"ft.finetune-run-{export_fingerprint(moe)}")
    (left / "model").mkdir(parents=True)
    (left / "metrics.jsonl").write_text('{"step": 3}\n')
    ledger = json.loads((root / "forest.json").read_text())  # and before its ledger row was written
    rows = [p for p in ledger["ledger"] if p.get("phase") == "btx_finetuning" and p.get("name") == "ft"]
    assert len(rows) == 1
    ledger["ledger"] = [p for p in ledger["ledger"] if p not in rows]
    (root / "forest.json").write_text(json.dumps(ledger))
    assert main(argv + ["--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "already holds this fine-tuning" in out and "fine-tuned for" not in out
    assert (ft / "elmforest_moe.json").stat().st_mtime_ns == stamp
    assert not left.exists() and (ft / "train_logs" / "metrics.jsonl").read_text() == '{"step": 3}\n'
    back = [p for p in Forest.load(root).ledger() if p.get("phase") == "btx_finetuning" and p["name"] == "ft"]
    assert [(p["tokens"], p["flops"]) for p in back] == [(r["tokens"], r["flops"]) for r in rows]
    # with any other setting (a loss weight, a --set) it is not the same run: refused, not kept
    for other in (["--aux-loss", "0.5"], ["--set", "optim.weight_decay=0.3"]):
        assert main(argv + other + ["--no-progress"]) == 2
        assert "holds a trained MoE (BTX fine-tuning (3 steps))" in capsys.readouterr().err
    assert (ft / "train_logs").is_dir()
    # a merge written over an output drops that output's training from the ledger
    f = Forest.load(root)
    f.record_phase({"phase": "router_training", "name": "moe", "tokens": 1, "flops": 7, "output": str(moe)})
    assert any(p.get("output") == str(moe.resolve()) for p in Forest.load(root).ledger())
    export_moe(f, moe, MoeSpec(top_k=2, sample_tokens=128), device="cpu")
    assert not any(p.get("output") == str(moe.resolve()) for p in Forest.load(root).ledger())
    assert any(p.get("output") == str(ft.resolve()) for p in Forest.load(root).ledger())


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_an_expert_with_nan_weights_is_refused_by_name_not_merged_into_nan(forest_dir, tmp_path, method):
    """A NaN passes through averaging, and TIES's trim multiplies it by 0 (NaN again): the merged model
    answered NaN. The expert and the tensor are named, and nothing is written."""
    import shutil

    from safetensors.torch import load_file, save_file

    from elmforest.merge.average import merge_checkpoints
    from elmforest.utils.errors import UserError

    f = Forest.load(forest_dir)
    dirs = [resolve_model_dir(d) for d in f.expert_dirs()]
    bad = tmp_path / "bad"
    shutil.copytree(dirs[1], bad)
    w = load_file(str(bad / "model.safetensors"))
    w["model.norm.weight"][3] = float("nan")
    save_file(w, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"{bad}: tensor model.norm.weight holds NaN"):
        merge_checkpoints(
            [dirs[0], bad], tmp_path / "out", method=method, base_dir=resolve_model_dir(f.seed_dir)
        )
    assert not (tmp_path / "out").exists()


def test_integer_tensors_are_copied_not_averaged_and_must_agree(tmp_path):
    """A checkpoint's integer tensor (saved position ids) averaged in float and cast back lost one
    wherever the weighted sum fell just below a whole number: 365 of 2048 at weights 0.7/0.2/0.1."""
    from safetensors.torch import save_file

    from elmforest.merge.average import iter_merge
    from elmforest.utils.errors import UserError

    g = torch.Generator().manual_seed(0)
    ids, mask = torch.arange(2048), torch.rand(7, generator=g) > 0.5
    dirs = []
    for i in range(3):
        d = tmp_path / f"e{i}"
        d.mkdir()
        (d / "config.json").write_text("{}")
        save_file(
            {"w": torch.randn(3, 4, generator=g), "position_ids": ids, "mask": mask},
            str(d / "model.safetensors"),
        )
        dirs.append(d)
    for method, extra in (("linear", {}), ("ties", {"base_dir": dirs[0], "density": 0.5})):
        got = dict(iter_merge(dirs, [0.7, 0.2, 0.1], method, **extra))
        assert got["position_ids"].dtype == torch.int64 and torch.equal(got["position_ids"], ids), method
        assert got["mask"].dtype == torch.bool and torch.equal(got["mask"], mask)
    save_file(
        {"w": torch.zeros(3, 4), "position_ids": ids.flip(0), "mask": mask},
        str(dirs[2] / "model.safetensors"),
    )
    with pytest.raises(UserError, match=r"tensor position_ids \(torch.int64\) differs between .*e0 and .*e2"):
        dict(iter_merge(dirs, [0.7, 0.2, 0.1]))


def test_a_copied_tree_trains_its_moe_into_its_own_forest_not_the_originals(forest_dir, shards_dir, tmp_path):
    """The card named its forest by absolute path: fine-tuning the MoE of a `cp -r` copy wrote its ledger
    row and its copies of the experts into the original's manifest (whose opt-out then deleted in the
    copy, while the copy's own opt-out missed the fine-tuned model)."""
    from elmforest.merge.moe_train import finetune_moe

    a = tmp_path / "a"
    shutil.copytree(forest_dir, a / "forest")
    export_moe(Forest.load(a / "forest"), a / "moe", MoeSpec(top_k=2, sample_tokens=64), device="cpu")
    shutil.copytree(a, tmp_path / "b")
    before = (a / "forest" / "forest.json").read_bytes()
    b = tmp_path / "b"
    finetune_moe(b / "moe", shards_dir, 1, out=b / "ft", batch_size=2, progress=False)
    assert (a / "forest" / "forest.json").read_bytes() == before  # the original is not touched
    f = Forest.load(b / "forest")
    assert [p["name"] for p in f.ledger() if p["phase"] == "btx_finetuning"] == ["ft"]
    assert any(Path(o["path"]) == (b / "ft").resolve() for o in f.data["outputs"])
    card = json.loads((b / "ft" / "elmforest_moe.json").read_text())
    assert Path(card["forest"]) == (b / "forest").resolve() and card["forest_relative"] == "../forest"
    # the card and ledger row say what ran (its steps, batch and domains; --set of them is refused)
    dom = json.loads((a / "forest" / "forest.json").read_text())["experts"][0]["domains"][0]
    finetune_moe(a / "moe", shards_dir, 2, out=a / "ft", batch_size=1, domains=[dom], progress=False)
    ft = json.loads((a / "ft" / "elmforest_moe.json").read_text())["finetuning"]
    seq = json.loads((a / "ft" / "elmforest_run.json").read_text())["train"]["seq_len"]
    assert (ft["steps"], ft["batch_size"], ft["domains"]) == (2, 1, [dom]) and ft["tokens"] == 2 * seq
    # an --out linked to a folder is refused before training (after it, a scratch copy was left recorded)
    from elmforest.utils.errors import UserError

    (a / "ftlink").symlink_to(a / "ft")
    with pytest.raises(UserError, match="symbolic link to a folder"):
        finetune_moe(a / "moe", shards_dir, 1, out=a / "ftlink", batch_size=2, progress=False)
    assert [p.name for p in a.iterdir() if p.name.startswith("ftlink")] == ["ftlink"]


def test_shards_recorded_but_gone_are_said_as_such(forest_dir, tmp_path, capsys):
    """A copied forest whose recorded shards were moved or deleted: `merge moe` without --data and
    `merge finetune` without --shards said the path was "not a shards directory (build one ...)"."""
    from elmforest.cli import main

    root = tmp_path / "f"
    shutil.copytree(forest_dir, root)
    for d in Forest.load(root).expert_dirs():
        run = resolve_model_dir(d) / "elmforest_run.json"
        cfg = json.loads(run.read_text())
        cfg["data"]["shards"] = str(tmp_path / "gone")
        run.write_text(json.dumps(cfg))
    assert main(["merge", "moe", "--forest", str(root), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "the shards" in err and "are not there (moved or deleted?); pass --data" in err
    fake = tmp_path / "moe"  # only the record `merge finetune` reads its shards from
    fake.mkdir()
    (fake / "elmforest_run.json").write_text(json.dumps({"data": {"shards": str(tmp_path / "gone")}}))
    (fake / "config.json").write_text("{}")  # (a folder that is no model at all is said as such first)
    assert main(["merge", "finetune", "--model", str(fake), "--steps", "1"]) == 2
    assert "are not there (moved or deleted?); pass --shards" in capsys.readouterr().err


def test_an_exports_fingerprint_is_its_content_so_a_copy_is_the_same_export(forest_dir, tmp_path):
    """The card records the weight files' checksums as they are written: a copy with new times (cp -r)
    keeps the fingerprint (the quickstart's fine-tuned row is not trained again in a copied tree), another
    merge does not; a card from before the checksums falls back to the files' times."""
    from elmforest.merge.moe_card import export_fingerprint
    from elmforest.utils.io import file_digest

    shutil.copytree(forest_dir, tmp_path / "f")
    f = Forest.load(tmp_path / "f")
    out = export_moe(f, tmp_path / "moe", MoeSpec(router="random", seed=0))
    card = json.loads((out / "elmforest_moe.json").read_text())
    files = sorted(out.glob("*.safetensors"))
    assert files and card["weight_files"] == {
        p.name: {"sha256": file_digest(p)["sha256"], "bytes": p.stat().st_size} for p in files
    }
    time.sleep(0.01)
    copy = Path(shutil.copytree(out, tmp_path / "copy", copy_function=shutil.copy))  # new modification times
    assert (copy / files[0].name).stat().st_mtime_ns != files[0].stat().st_mtime_ns
    assert export_fingerprint(copy) == export_fingerprint(out)
    other = export_moe(f, tmp_path / "other", MoeSpec(router="random", seed=1))
    assert export_fingerprint(other) != export_fingerprint(out)
    with open(copy / files[0].name, "ab") as fh:  # a weight file that is not the one recorded: its times
        fh.write(b"\0")
    assert export_fingerprint(copy) != export_fingerprint(out)
    for d in (out, copy):  # an older card: names, sizes and times
        old = json.loads((d / "elmforest_moe.json").read_text())
        del old["weight_files"]
        (d / "elmforest_moe.json").write_text(json.dumps(old))
    assert export_fingerprint(copy) != export_fingerprint(out)
    # a weight file rewritten in place at the same size (another merge's): its time tells it apart
    was = export_fingerprint(out)
    time.sleep(0.01)
    data = bytearray(files[0].read_bytes())
    data[-1] ^= 1
    files[0].write_bytes(bytes(data))
    assert export_fingerprint(out) != was


def test_the_load_heatmap_of_a_wide_forest_has_no_cell_labels_and_a_bounded_size(tmp_path, monkeypatch):
    """`merge moe` drew a number in each of 64 x 64 cells on a figure that grew with both: 0.6 GB and
    most of the merge's time (128 experts: 2.4 GB). Past 14 a side the cells go unlabelled and shrink."""
    import matplotlib.axes
    import matplotlib.pyplot as plt
    from PIL import Image

    from elmforest.merge.routing import MAX_FIGURE_INCHES, plot_load

    texts, sizes = [], []
    real_text, real_subplots = matplotlib.axes.Axes.text, plt.subplots
    monkeypatch.setattr(
        matplotlib.axes.Axes, "text", lambda self, *a, **k: texts.append(a) or real_text(self, *a, **k)
    )
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: sizes.append(k["figsize"]) or real_subplots(*a, **k))

    def stats(n):
        names = [f"e{i}" for i in range(n)]
        load = [[1.0 / n] * n for _ in names]
        return {
            "experts": names,
            "top_k": 2,
            "layers": 2,
            "domains": {
                d: {"load_mean": row, "own": [i]} for i, (d, row) in enumerate(zip(names, load, strict=True))
            },
        }

    plot_load(stats(3), tmp_path / "small.png")
    assert len(texts) == 9 and sizes[-1][0] == pytest.approx(1.2 + 0.55 * 3)
    texts.clear()
    plot_load(stats(64), tmp_path / "wide.png")
    assert texts == [] and max(sizes[-1]) <= MAX_FIGURE_INCHES + 1.2
    assert Image.open(tmp_path / "wide.png").size[0] <= (MAX_FIGURE_INCHES + 1.2) * 120
    texts.clear()
    plot_load(stats(14), tmp_path / "edge.png")  # 14 a side is still labelled
    assert len(texts) == 14 * 14
    texts.clear()
    tall = stats(3)
    tall["domains"] = {
        f"d{i}": {"load_mean": [1 / 3] * 3, "own": []} for i in range(64)
    }  # 3 experts, 64 domains
    plot_load(tall, tmp_path / "tall.png")
    assert texts == [] and max(sizes[-1]) <= MAX_FIGURE_INCHES + 1.2


def test_merge_routing_of_a_wide_moe_shows_each_domains_busiest_experts(monkeypatch, capsys):
    """Each domain's line held its load on every expert: 64 experts, 57 lines of ~400 characters."""
    from elmforest.cli import main
    from elmforest.merge import routing

    names = [f"e{i}" for i in range(20)]
    load = [0.0] * 20
    load[7], load[3], load[12], load[0] = 0.5, 0.3, 0.15, 0.05
    stats = {
        "experts": names,
        "split": "valid",
        "top1_own_mean": 0.5,
        "domains": {"dom": {"load_mean": load, "top1_own": 0.5, "entropy_norm": 0.4, "tokens": 10}},
    }
    monkeypatch.setattr(routing, "write_routing", lambda *a: stats)
    assert main(["merge", "routing", "--model", "m", "--device", "cpu", "--tokens", "10"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("dom"))
    assert line.endswith("top e7 0.50, e3 0.30, e12 0.15") and "load [" not in line
    for n, listed in ((15, False), (14, True)):  # as the heatmap: numbers up to 14 experts
        stats["experts"], stats["domains"]["dom"]["load_mean"] = names[:n], load[:n]
        assert main(["merge", "routing", "--model", "m", "--device", "cpu", "--tokens", "10"]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("dom"))
        assert ("load [" in line) == listed and ("top e7" in line) != listed


def test_training_a_merge_that_records_no_forest_writes_no_ledger_row(forest_dir, tmp_path, monkeypatch):
    """A merge of owner pairs given by folder records no forest (`forest: null`): its fine-tuning's row
    went to Path(""), the working directory, so a forest there gained compute it never spent."""
    from elmforest.merge.moe_train import _ledger

    root = tmp_path / "f"
    shutil.copytree(forest_dir, root)
    before = (root / "forest.json").read_text()
    monkeypatch.chdir(root)
    record = {"tokens": 256, "flops": 1e9}
    _ledger({"forest": None}, "finetuning", record, tmp_path / "ft")
    assert (root / "forest.json").read_text() == before
    _ledger({"forest": str(root)}, "finetuning", record, tmp_path / "ft")  # its own forest: recorded
    assert Forest.load(root).data != json.loads(before)


def test_a_paused_fine_tune_says_so_and_the_same_command_continues_it(forest_dir, shards_dir, tmp_path):
    """`--set train.stop_at` paused the run, then the output was made from a model the run had not
    written: 'No such file or directory'."""
    from elmforest.merge.moe_train import finetune_moe
    from elmforest.utils.errors import UserError

    shutil.copytree(forest_dir, tmp_path / "forest")
    export_moe(
        Forest.load(tmp_path / "forest"), tmp_path / "moe", MoeSpec(top_k=2, sample_tokens=64), device="cpu"
    )
    kw = dict(out=tmp_path / "ft", batch_size=2, progress=False)
    with pytest.raises(UserError, match=r"paused at step 1 of 2 \(train.stop_at\).*continues it"):
        finetune_moe(tmp_path / "moe", shards_dir, 2, overrides=["train.stop_at=1"], **kw)
    assert not (tmp_path / "ft").exists()
    finetune_moe(tmp_path / "moe", shards_dir, 2, **kw)
    assert json.loads((tmp_path / "ft" / "elmforest_moe.json").read_text())["finetuning"]["steps"] == 2


def test_fsck_tidies_and_reports_the_forests_outputs(forest_dir, tmp_path, capsys):
    """`forest fsck` on merged models outside the forest: a killed merge's staging copy beside one is
    removed; a cut fine-tuning's scratch run and an output that is gone are notes, not problems; a card's
    trainings (which also carry those of the model it was fine-tuned from) add no ledger row."""
    import subprocess

    from elmforest.cli import main
    from elmforest.utils.io import HOST

    copy = tmp_path / "f"
    shutil.copytree(forest_dir, copy)
    f = Forest.load(copy)
    out = export_moe(f, tmp_path / "moe", MoeSpec(router="random"), device="cpu")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".moe.tmp~{HOST}~{dead.pid}"
    stale.mkdir()
    (stale / "model-00001.safetensors").write_bytes(b"partial")
    card = json.loads((out / "elmforest_moe.json").read_text())
    card["finetuning"] = {"tokens": 1000, "flops": 5.0e9, "steps": 2}
    (out / "elmforest_moe.json").write_text(json.dumps(card))
    scratch = tmp_path / "moe.finetune-run-abc"
    scratch.mkdir()
    marker = {"forest": str(copy.resolve()), "forests": [str(copy.resolve())], "experts": card["experts"]}
    (scratch / "elmforest_source.json").write_text(json.dumps(marker))  # as merge/moe_copies.py marks it
    f.record_output(scratch, "finetune-run", f.names)
    gone = tmp_path / "gone"
    f.record_output(gone, "moe", f.names[:1])

    assert main(["forest", "fsck", "--forest", str(copy), "--quick"]) == 0  # notes only: nothing wrong
    said = capsys.readouterr().out
    assert not stale.exists() and f"cleaned up {stale}" in said
    assert f"note: {scratch}: the run of a `merge finetune` that did not finish" in said
    assert f"note: {gone} (moe of {f.names[0]}) is not there any more" in said
    assert main(["forest", "fsck", "--forest", str(copy), "--quick"]) == 0
    said = capsys.readouterr().out
    assert "0 repair(s), 0 problem(s) left" in said
    assert not [r for r in Forest.load(copy).data.get("ledger", []) if r.get("phase") == "btx_finetuning"]


def test_set_cannot_override_the_trainings_own_options(forest_dir, shards_dir, tmp_path, capsys):
    """`merge finetune --steps 2 --set train.steps=3` trained 3 steps, and `merge moe --train-router
    --steps 2 --set train.steps=5` trained 5 and said 2: --set was applied over the options."""
    from elmforest.cli import main
    from elmforest.merge.moe_train import finetune_moe, own_keys, train_router

    for kind, run in (("finetuning", finetune_moe), ("router_training", train_router)):
        what = {"router_training": "router training", "finetuning": "fine-tuning"}[kind]
        for key, how in own_keys(kind).items():
            with pytest.raises(
                ValueError, match=re.escape(f"--set {key}: the {what} sets it itself ({how})")
            ):
                run(tmp_path / "moe", shards_dir, 2, overrides=[f"{key}=1"])
    assert own_keys("finetuning")["train.steps"] == "give --steps"
    assert "router rows" in own_keys("router_training")["optim.weight_decay"]
    argv = ["merge", "moe", "--forest", str(forest_dir), "--out", str(tmp_path / "m"), "--router", "random"]
    assert main([*argv, "--train-router", "--steps", "2", "--set", "optim.lr=1e-3"]) == 2
    assert "--set optim.lr: the router training sets it itself (give --lr)" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()  # refused before the merge was written


def test_mixed_precision_experts_merge_in_float32_and_a_refused_merge_is_not_recorded(
    forest_dir, tmp_path, capsys
):
    """A bf16 expert beside fp32 ones kept its precision in the MoE file (a first one made transformers load
    the whole MoE in bf16, rounding the fp32 experts); a
    merge refused while writing left its output recorded in forest.json, though nothing was written."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from elmforest.cli import main

    copy = tmp_path / "f"
    shutil.copytree(forest_dir, copy)
    f = Forest.load(copy)
    half = tmp_path / "half"
    shutil.copytree(f.expert_dirs()[0], half)
    w = load_file(str(half / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in w.items()}, str(half / "model.safetensors"))
    assert (
        main(
            [
                "forest",
                "add",
                "--forest",
                str(copy),
                "--expert",
                str(half),
                "--domain",
                "extra",
                "--name",
                "a0",
            ]
        )
        == 0
    )
    out = export_moe(Forest.load(copy), tmp_path / "moe", MoeSpec(router="random"), device="cpu")
    assert (
        "the experts hold bfloat16, float32 weights: the MoE is written in float32" in capsys.readouterr().err
    )
    for p in out.glob("*.safetensors"):
        with safe_open(str(p), "pt") as s:
            assert {s.get_tensor(k).dtype for k in s.keys()} == {torch.float32}
    # an MLP bias no MoE format has a place for: refused while writing, and no record of the output kept
    biased = f.expert_dirs()[1]
    w = load_file(str(biased / "model.safetensors"))
    name = next(k for k in w if k.endswith("mlp.down_proj.weight"))
    w[name.replace(".weight", ".bias")] = torch.zeros(w[name].shape[0])
    for d in f.expert_dirs():
        save_file(
            {
                **load_file(str(d / "model.safetensors")),
                name.replace(".weight", ".bias"): w[name.replace(".weight", ".bias")],
            },
            str(d / "model.safetensors"),
        )
    g = Forest.load(copy)
    with pytest.raises(ValueError, match="an MLP parameter mixtral has no place for"):
        from elmforest.merge import moe

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(moe, "check_intact", lambda *a, **k: None)  # the weights were edited by hand
            moe.export_moe(g, tmp_path / "biased", MoeSpec(router="random", exclude=["a0"]), device="cpu")
    assert not (tmp_path / "biased").exists()
    assert str(tmp_path / "biased") not in [o["path"] for o in Forest.load(copy).data["outputs"]]


def test_merge_routing_puts_back_a_merge_cut_between_its_renames(forest_dir, shards_dir, tmp_path):
    """A merge killed between its two renames left the MoE aside: `merge routing` said it was no MoE."""
    import subprocess

    from elmforest.merge.routing import write_routing
    from elmforest.utils.io import HOST

    copy = tmp_path / "f"
    shutil.copytree(forest_dir, copy)
    out = export_moe(Forest.load(copy), tmp_path / "moe", MoeSpec(router="random"), device="cpu")
    dead = subprocess.Popen(["true"])
    dead.wait()
    out.rename(tmp_path / f".moe.old~{HOST}~{dead.pid}")  # killed after setting it aside
    write_routing(tmp_path / "moe", shards_dir, tokens=64)
    assert (tmp_path / "moe" / "routing.json").is_file()
