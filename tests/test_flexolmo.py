"""FlexOlmo's owner training, its first pieces: the seed as a 2-expert MoE that computes exactly the seed,
and an owner's run that trains expert 1 and its router row while expert 0 (the public FFN), its row and
everything outside the MLPs stay bit-identical, checked against a brute-force 2-expert forward."""

from __future__ import annotations

import copy
import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from test_moe_formats import RefMoE
from transformers import AutoModelForCausalLM

from elmforest.data.shards import Shards
from elmforest.forest.manifest import Forest
from elmforest.merge.flexolmo import OWNER_TRAINABLE, public_pair
from elmforest.merge.io import LazyWeights
from elmforest.merge.moe_formats import FORMATS
from elmforest.model.build import load_model, resolve_model_dir
from elmforest.train.trainer import train
from elmforest.utils.errors import UserError

MIX = FORMATS["mixtral"]


def _x(shards_dir, d):
    s = Shards(shards_dir).tokens(d, "test")
    return torch.as_tensor(np.asarray(s[:48], dtype=np.int64)).view(2, 24)


def test_the_pair_is_the_seed_and_an_owner_trains_only_its_expert(forest_dir, shards_dir, tmp_path):
    seed_dir = resolve_model_dir(Forest.load(forest_dir).seed_dir)
    seed = load_model(seed_dir).eval()
    L, H = seed.config.num_hidden_layers, seed.config.hidden_size
    rows = torch.randn(L, 2, H, generator=torch.Generator().manual_seed(0))
    pair = public_pair(seed_dir, tmp_path / "pair", rows)
    x = _x(shards_dir, Shards(shards_dir).domains[0])
    with torch.no_grad():  # two identical experts: the seed's function whatever the router says
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(str(pair)).eval()(input_ids=x).logits,
            seed(input_ids=x).logits,
            rtol=1e-5,
            atol=1e-5,
        )
    with pytest.raises(UserError, match="is already a mixture of experts \\(mixtral\\)"):
        public_pair(pair, tmp_path / "pair2")  # an MoE as the seed: said so, not "cannot merge"

    domain = Shards(shards_dir).domains[1]
    cfg = tiny_config(shards_dir, steps=4, batch_size=4, ckpt_every=0)
    cfg.model.init_from = str(pair)
    cfg.data.domains = [domain]  # the owner sees only its own data
    cfg.optim.lr, cfg.optim.weight_decay = 2e-2, 0.1  # decay too: it must not touch expert 0
    cfg.train.trainable, cfg.train.frozen_experts = OWNER_TRAINABLE, [0]
    train(cfg, tmp_path / "owner", progress=False)
    owner = tmp_path / "owner" / "model"
    with ExitStack() as st:
        s, p, o = LazyWeights(seed_dir, st), LazyWeights(pair, st), LazyWeights(owner, st)
        for layer in range(L):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                want = s.get(f"model.layers.{layer}.mlp.{proj}.weight")
                assert torch.equal(o.get(MIX.expert_name(layer, 0, proj)), want)  # public expert: exact
                assert not torch.equal(o.get(MIX.expert_name(layer, 1, proj)), want)  # the owner's moved
            gate, start = o.get(MIX.router_name(layer)), p.get(MIX.router_name(layer))
            assert torch.equal(gate[0], start[0]) and not torch.equal(gate[1], start[1])
        shared = [k for k in s.keys() if ".mlp." not in k]
        assert shared and all(torch.equal(o.get(k), s.get(k)) for k in shared)  # attention etc.: the seed's
        # brute force: the seed with each MLP replaced by softmax top-2 of [seed MLP, owner's MLP]
        ref = copy.deepcopy(seed)
        for layer, block in enumerate(ref.model.layers):
            mine = copy.deepcopy(block.mlp)
            for proj in ("gate_proj", "up_proj", "down_proj"):
                getattr(mine, proj).weight.data = o.get(MIX.expert_name(layer, 1, proj))
            block.mlp = RefMoE(o.get(MIX.router_name(layer)), [seed.model.layers[layer].mlp, mine], 2)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(owner)).eval()(input_ids=x).logits
        torch.testing.assert_close(got, ref(input_ids=x).logits, rtol=1e-4, atol=1e-4)
        assert (got - seed(input_ids=x).logits).abs().max() > 1e-3  # it did train


def test_frozen_experts_are_refused_where_they_cannot_hold(forest_dir, shards_dir, tmp_path):
    dense = tiny_config(shards_dir, steps=2)
    dense.train.frozen_experts = [0]
    with pytest.raises(UserError, match="has no router"):
        train(dense, tmp_path / "dense", progress=False)
    from elmforest.cli import main
    from elmforest.config import apply_overrides

    seed = resolve_model_dir(Forest.load(forest_dir).seed_dir)
    assert main(["merge", "flexolmo-pair", "--seed", str(seed), "--out", str(tmp_path / "pair")]) == 0
    import shutil

    shutil.copytree(forest_dir, tmp_path / "fcopy", symlinks=True)  # not the session's: a regression writes
    inside = tmp_path / "fcopy" / "experts" / "zz"  # written into the forest's folders before
    assert main(["merge", "flexolmo-pair", "--seed", str(seed), "--out", str(inside)]) == 2
    assert not inside.exists()
    pair = tmp_path / "pair"
    cfg = apply_overrides(tiny_config(shards_dir, steps=2), ["train.frozen_experts=[0]"])
    assert cfg.train.frozen_experts == [0]  # as `--set` gives it
    cfg.model.init_from = str(pair)
    cfg.train.frozen_experts = [2]
    with pytest.raises(UserError, match=r"experts 0\.\.1"):
        train(cfg, tmp_path / "out", progress=False)
    cfg.train.frozen_experts, cfg.train.trainable = [0], r"self_attn"
    with pytest.raises(UserError, match="no trainable per-expert parameter"):
        train(cfg, tmp_path / "attn", progress=False)


def _owner(pair, shards_dir, domain, where, frozen=True):
    cfg = tiny_config(shards_dir, steps=3, batch_size=4, ckpt_every=0)
    cfg.model.init_from, cfg.data.domains = str(pair), [domain]
    cfg.optim.lr = 2e-2
    cfg.train.trainable, cfg.train.frozen_experts = OWNER_TRAINABLE, [0] if frozen else []
    train(cfg, where, progress=False)
    return where / "model"


def test_owners_merge_into_one_moe_with_no_training(forest_dir, shards_dir, tmp_path, capsys):
    """Two owners trained apart from one public pair: the merge keeps the public expert once, adds each
    owner's expert and router row, and equals a brute-force top-2 mixture of [public, owner a, owner b];
    leaving an owner out is the opt-out; an owner whose public expert moved is refused."""
    from elmforest.merge.flexolmo import merge_pairs

    seed_dir = resolve_model_dir(Forest.load(forest_dir).seed_dir)
    seed = load_model(seed_dir).eval()
    L, H = seed.config.num_hidden_layers, seed.config.hidden_size
    pair = public_pair(
        seed_dir, tmp_path / "pair", torch.randn(L, 2, H, generator=torch.Generator().manual_seed(1))
    )
    doms = Shards(shards_dir).domains
    owners = [(d, _owner(pair, shards_dir, d, tmp_path / d)) for d in doms[:2]]
    merged = merge_pairs(owners, tmp_path / "merged", top_k=2)
    moe = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    assert moe.config.num_local_experts == 3
    # the card says what was merged: no forest ("from `None`"), each owner's trained rows, its tokens
    card = (merged / "README.md").read_text()
    assert "from the owners' pairs given one by one" in card and "None" not in card
    assert "each owner's row as its owner trained it" in card and "domain embeddings" in card
    meta = json.loads((merged / "elmforest_moe.json").read_text())
    assert [e["tokens"] for e in meta["experts"]] == [None, 3 * 4 * 64, 3 * 4 * 64]
    ref = copy.deepcopy(seed)
    with ExitStack() as st:
        ws = [LazyWeights(o, st) for _, o in owners]
        for layer, block in enumerate(ref.model.layers):
            mlps = [seed.model.layers[layer].mlp]
            for w in ws:
                m = copy.deepcopy(block.mlp)
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    getattr(m, proj).weight.data = w.get(MIX.expert_name(layer, 1, proj))
                mlps.append(m)
            g = torch.stack(
                [ws[0].get(MIX.router_name(layer))[0], *(w.get(MIX.router_name(layer))[1] for w in ws)]
            )
            block.mlp = RefMoE(g, mlps, 2)
    x = _x(shards_dir, doms[0])
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=x).logits, ref(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    from elmforest.cli import main

    name, path = owners[0]  # owner b opted out: left out of the merge
    assert main(["merge", "flexolmo", "--owner", f"{name}={path}", "--out", str(tmp_path / "optout")]) == 0
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "optout")).config.num_local_experts == 2
    assert main(["merge", "flexolmo", "--owner", "nodir", "--out", str(tmp_path / "x")]) == 2
    loose = _owner(pair, shards_dir, doms[2], tmp_path / "loose", frozen=False)
    with pytest.raises(UserError, match="public expert differs"):
        merge_pairs([owners[0], ("loose", loose)], tmp_path / "bad")
    # an owner whose public router row alone moved: refused, not merged with the first owner's row
    import shutil

    from safetensors.torch import load_file, save_file

    drift = tmp_path / "drift"
    shutil.copytree(resolve_model_dir(owners[1][1]), drift)
    sd = load_file(str(drift / "model.safetensors"))
    sd[MIX.router_name(0)][0] += 0.01
    save_file(sd, str(drift / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="public router rows differ"):
        merge_pairs([owners[0], ("drift", drift)], tmp_path / "bad2")
    # a tensor only a later pair holds was dropped without a word; a shared one that differs names why
    sd = load_file(str(resolve_model_dir(owners[1][1]) / "model.safetensors"))
    save_file(
        {**sd, "extra.weight": torch.zeros(2)}, str(drift / "model.safetensors"), metadata={"format": "pt"}
    )
    with pytest.raises(UserError, match=r"hold different tensors \(\['extra.weight'\]\)"):
        merge_pairs([owners[0], ("drift", drift)], tmp_path / "bad3")
    sd["model.embed_tokens.weight"] += 0.01
    save_file(sd, str(drift / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"differs from .*\(the pairs come from different seeds"):
        merge_pairs([owners[0], ("drift", drift)], tmp_path / "bad4")
    # the public pair given as an owner (not trained): merged, and said
    merge_pairs([owners[0], ("pair", pair)], tmp_path / "withpair")
    assert "owner(s) ['pair']: the owner's expert is still the public one" in capsys.readouterr().err


def test_flexolmo_owners_as_a_forest_phase(forest_dir, shards_dir, tmp_path, capsys):
    """`forest expert --branch flexolmo`: each owner starts from its own pair (public row shared, own row
    from its domain's embedding), trains only its expert and row, is counted in the ledger by what that
    run costs, and the forest's owners merge with `merge flexolmo --forest` (one left out with --exclude)."""
    from safetensors.torch import load_file

    from elmforest.cli import main
    from elmforest.forest import btm
    from elmforest.merge.flexolmo import forest_pairs
    from elmforest.train.flops import flops_breakdown

    src = Forest.load(forest_dir)
    doms = Shards(shards_dir).domains[:2]
    f = btm.share_seed(tmp_path / "fx", src, src.names)
    for d in doms:
        btm.train_expert(
            f, Shards(shards_dir), d, branch="flexolmo", overrides=["optim.lr=2e-2"], progress=False
        )
    f = Forest.load(f.root)
    seed_dir = resolve_model_dir(f.seed_dir)
    public = load_file(str(f.root / "branches" / "flexolmo-public-rows.safetensors"))["rows"]
    torch.testing.assert_close(public.norm(dim=-1), torch.ones(public.shape[0]))
    plan = btm.Plan(**f.data["plan"])
    with ExitStack() as st:
        s = LazyWeights(seed_dir, st)
        for d in doms:
            e = f.expert(d)
            assert e["branch"] == "flexolmo" and [p["name"] for p in e["parents"]] == ["seed"]
            start = LazyWeights(f.root / "branches" / d, st)
            o = LazyWeights(f.expert_dir(d), st)
            for layer in range(public.shape[0]):
                row0 = start.get(MIX.router_name(layer))[0]
                assert torch.equal(row0, public[layer].to(row0.dtype))  # the one public row
                assert torch.equal(o.get(MIX.router_name(layer))[0], row0)
                assert not torch.equal(o.get(MIX.router_name(layer))[1], start.get(MIX.router_name(layer))[1])
                want = s.get(f"model.layers.{layer}.mlp.up_proj.weight")
                assert torch.equal(o.get(MIX.expert_name(layer, 0, "up_proj")), want)
            assert all(torch.equal(o.get(k), s.get(k)) for k in s.keys() if ".mlp." not in k)
            # the ledger: the expert phase's tokens at the cost of a run training only expert + row
            model = load_model(f.expert_dir(d))
            for n, p in model.named_parameters():
                p.requires_grad_(bool(__import__("re").search(OWNER_TRAINABLE, n)))
            seq = f.data["seed"]["config"]["train"]["seq_len"]
            assert e["tokens"] == (plan.total_steps - plan.seed_steps) * plan.expert_batch_size * seq
            assert e["flops"] == e["tokens"] * flops_breakdown(model, seq)["flops_per_token"]
    out = tmp_path / "merged"
    assert main(["merge", "flexolmo", "--forest", str(f.root), "--out", str(out)]) == 0
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.num_local_experts == 3
    import json

    meta = json.loads((out / "elmforest_moe.json").read_text())
    assert [(e["name"], e["domains"]) for e in meta["experts"]] == [("public", []), *((d, [d]) for d in doms)]
    routed = json.loads((out / "routing.json").read_text())  # routing statistics of every merged model
    assert set(routed["domains"]) >= set(doms)
    # BTX fine-tuning of the FlexOlmo merge trains the public expert too (the owners' freeze is theirs)
    from elmforest.merge.moe_train import finetune_moe

    ft = finetune_moe(out, shards_dir, 2, out=tmp_path / "ft", lr=1e-2, batch_size=2, progress=False)
    with ExitStack() as st:
        a, b = LazyWeights(out, st), LazyWeights(ft, st)
        assert not torch.equal(
            a.get(MIX.expert_name(0, 0, "up_proj")), b.get(MIX.expert_name(0, 0, "up_proj"))
        )
    args = ["merge", "flexolmo", "--forest", str(f.root), "--exclude", doms[1], "--out", str(tmp_path / "o")]
    assert main(args) == 0
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "o")).config.num_local_experts == 2
    with pytest.raises(UserError, match="not trained as FlexOlmo owners"):
        forest_pairs(src)
    capsys.readouterr()
    assert main(["merge", "flexolmo", "--forest", str(f.root), "--owner", "a=b", "--out", str(out)]) == 2
    assert "either the owners' pairs" in capsys.readouterr().err
    # owners are MoEs: `merge moe` and branching from one are refused up front, with what to do instead
    from elmforest.merge.moe import export_moe

    with pytest.raises(UserError, match="merge flexolmo --forest"):
        export_moe(f, tmp_path / "m")
    with pytest.raises(UserError, match="cannot branch from FlexOlmo owner"):
        btm.train_expert(f, Shards(shards_dir), doms[0], name="x", branch=f"expert:{doms[0]}", progress=False)
    assert not (f.root / "runs" / "x").exists()  # nothing trained
    # a merge of the forest's owners given one by one (--owner) is recorded with the forest too
    by_hand = tmp_path / "by-hand"
    owners = [f"owner{i}={f.expert_dir(d)}" for i, d in enumerate(doms)]  # the user's names, not the forest's
    assert main(["merge", "flexolmo", "--owner", owners[0], "--owner", owners[1], "--out", str(by_hand)]) == 0
    capsys.readouterr()
    tokens = [e["tokens"] for e in json.loads((by_hand / "elmforest_moe.json").read_text())["experts"]]
    assert tokens == [None, *(f.expert(d)["tokens"] for d in doms)]  # from the forest they were found in
    for bad, message in (
        ([f"public={f.expert_dir(doms[0])}"], "'public' is the public expert's"),
        ([owners[0], f"again={f.expert_dir(doms[0])}"], "are the same checkpoint"),
        (
            [owners[0], f"plain={seed_dir}"],
            r"owner\(s\) \['plain'\] are not FlexOlmo owner models.*flexolmo-pair",
        ),
        ([owners[0]], "is inside the forest"),
    ):
        o = f.root / "inside" if message == "is inside the forest" else tmp_path / "bad"
        assert main(["merge", "flexolmo", *(a for x in bad for a in ("--owner", x)), "--out", str(o)]) == 2
        assert __import__("re").search(message, capsys.readouterr().err), message
    # opting an owner out deletes the merged models holding its expert, not the one made without it
    assert main(["forest", "remove", "--forest", str(f.root), "--expert", doms[1]]) == 0
    assert not out.exists() and (tmp_path / "o" / "elmforest_moe.json").is_file()
    assert not by_hand.exists()
    assert json.loads((tmp_path / "o" / "elmforest_moe.json").read_text())["excluded"] == [doms[1]]


def test_an_empty_forest_is_said_to_be_empty_not_every_owner_excluded(tmp_path):
    from elmforest.merge.flexolmo import forest_pairs

    with pytest.raises(UserError, match="no experts \\(FlexOlmo owners\\) to merge"):
        forest_pairs(Forest.init(tmp_path / "e"))


def test_owner_pairs_given_one_by_one_are_recorded_wherever_they_sit_in_their_forest(
    forest_dir, shards_dir, tmp_path, monkeypatch
):
    """Pairs given by --owner from a forest's folders (experts/E, runs/E): the merge and the MoE fine-tuned
    from it are both recorded with that forest, so opting E out deletes both copies of E's weights; one
    checkpoint given twice, its path spelled two ways, is refused."""
    from elmforest.cli import main
    from elmforest.forest import btm
    from elmforest.merge.flexolmo import merge_pairs
    from elmforest.merge.moe_train import finetune_moe

    src = Forest.load(forest_dir)
    a, b = Shards(shards_dir).domains[:2]
    f = btm.share_seed(tmp_path / "fx", src, src.names)
    for d in (a, b):
        btm.train_expert(f, Shards(shards_dir), d, branch="flexolmo", progress=False)
    merged = tmp_path / "by-hand"
    monkeypatch.chdir(tmp_path)  # the pairs given relative to here, the fine-tuning run from elsewhere
    argv = ["merge", "flexolmo", "--no-routing", "--owner", f"o0=fx/experts/{a}"]
    assert main([*argv, "--owner", f"o1=fx/runs/{b}", "--out", str(merged)]) == 0
    runs_only = tmp_path / "from-runs"  # no pair under experts/: its card names the forest by runs/E alone
    assert main([*argv[:4], f"o0=fx/runs/{a}", "--owner", f"o1=fx/runs/{b}", "--out", str(runs_only)]) == 0
    monkeypatch.chdir(f.root)
    ft = finetune_moe(merged, shards_dir, 1, out=tmp_path / "ft", lr=1e-2, batch_size=2, progress=False)
    outs = {o["path"]: o["experts"] for o in Forest.load(f.root).data["outputs"]}
    assert outs[str(merged.resolve())] == [a, b] and outs[str(ft.resolve())] == [a, b]
    from elmforest.merge.moe_copies import forests_of, record_copies  # a fine-tune killed: its run left

    left = tmp_path / "ft2.finetune-run-0123456789ab"
    meta = json.loads((merged / "elmforest_moe.json").read_text())
    record_copies(meta, forests_of(meta, merged), left, tmp_path / "ft2", "finetune-run")
    assert main(["forest", "remove", "--forest", str(f.root), "--expert", b]) == 0
    assert not merged.exists() and not ft.exists() and not left.exists() and not runs_only.exists()

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="same checkpoint"):
        merge_pairs([("x", f.root / "experts" / a), ("y", Path("fx") / "experts" / a)], tmp_path / "twice")
