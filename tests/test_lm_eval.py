"""The forest as an lm-evaluation-harness model: tasks defined by local YAML over local JSONL (no hub),
run through lm-eval's own evaluator, checked against a brute-force mixture of the experts' log-probs."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-evaluation-harness not installed (pip install -e '.[eval]')"
)

from elmforest.clients.lm_eval import ElmforestLM  # noqa: E402 - after the skip
from elmforest.forest.manifest import Forest  # noqa: E402
from elmforest.model.build import load_model  # noqa: E402
from elmforest.utils.errors import UserError  # noqa: E402

QUESTIONS = [
    ("and the lord said unto", ["moses", "lambda", "warranty"], 0),
    ("def return self import", ["class", "israel", "copyright"], 0),
    ("license software warranty", ["copyright", "yield", "god"], 0),
    ("thou shalt not", ["else", "israel", "liability"], 1),
    ("for in if else", ["notice", "people", "none"], 2),
    ("permission notice holder", ["king", "liability", "true"], 1),
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")


def _models(forest_dir):
    f = Forest.load(forest_dir)
    return [load_model(d).eval() for d in f.expert_dirs()]


@torch.no_grad()
def brute_mixture(models, eos: int, ctx: list[int], cont: list[int], prior=None, fixed=False, window=None):
    """(log p(cont | EOS + ctx), greedy, last argmax) of the mixture, token by token: each expert runs the whole
    sequence once (its last `window` + 1 tokens when given), the weights start at the prior and, unless
    `fixed`, multiply by each token's likelihood."""
    seq = [eos, *ctx, *cont]
    if window is not None:
        seq = seq[-(window + 1) :]
    n = len(models)
    full = [torch.log_softmax(m(input_ids=torch.tensor([seq[:-1]])).logits[0].double(), -1) for m in models]
    logw = [math.log(p) for p in (prior or [1.0 / n] * n)]
    total, greedy, best = 0.0, True, None
    first = len(seq) - 1 - len(cont)
    for t in range(len(seq) - 1):
        z = torch.logsumexp(torch.tensor(logw), 0)
        w = [x - float(z) for x in logw]
        if t >= first:
            mix = torch.logsumexp(torch.stack([w[j] + full[j][t] for j in range(n)]), 0)
            total += float(mix[seq[t + 1]])
            best = int(mix.argmax())
            greedy &= best == seq[t + 1]
        if not fixed:
            logw = [w[j] + float(full[j][t, seq[t + 1]]) for j in range(n)]
    return total, greedy, best  # best: the mixture's argmax at the last position


def _write_task(root, name: str, body: dict, rows: list[dict]):
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {data}"]
    lines += ["test_split: test"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in body.items()]
    (root / f"{name}.yaml").write_text("\n".join(lines) + "\n")


def _evaluate(tmp_path, model_args: str, tasks: list[str]):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="elmforest",
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True,
        batch_size=4,
    )


def test_a_multiple_choice_task_reproduces_the_brute_force_mixture(forest_dir, tmp_path):
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    _write_task(
        tmp_path,
        "ef_mc",
        {
            "output_type": "multiple_choice",
            "doc_to_text": "{{question}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc"}],
        },
        rows,
    )
    res = _evaluate(tmp_path, f"forest={forest_dir},precision=fp32", ["ef_mc"])
    lm = ElmforestLM(forest=str(forest_dir), precision="fp32")
    models = _models(forest_dir)
    correct = []
    for s in res["samples"]["ef_mc"]:
        q, choices, gold = s["doc"]["question"], s["doc"]["choices"], s["doc"]["answer"]
        want = []
        for choice in choices:
            ctx, cont = lm._pair(q, " " + choice)
            want.append(brute_mixture(models, lm.lm.eos_id, ctx, cont)[:2])
        got = [r[0] for r in s["resps"]]  # [(loglik, greedy)] per choice
        for (g_ll, g_greedy), (w_ll, w_greedy) in zip((tuple(x) for x in got), want, strict=True):
            assert g_ll == pytest.approx(w_ll, abs=1e-4)
            assert bool(g_greedy) == w_greedy
        correct.append(max(range(len(want)), key=lambda i: want[i][0]) == gold)
    assert res["results"]["ef_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    assert sum(correct) >= 4  # the domain experts know their words: the check is not vacuous


def test_topk_runs_only_the_chosen_experts_and_cluster_routes_on_the_context(forest_dir, cluster_forest):
    lm = ElmforestLM(
        forest=str(forest_dir), mode="topk", k=2, precision="fp32", experts="code+legal+scripture"
    )
    assert lm.lm.names == ["code", "legal"]  # uniform prior: the first k (torch.topk's stable order)
    ctx, cont = lm._pair("and the lord said unto", " moses")
    [s] = lm.lm.score([(ctx, cont)])
    assert s.experts == ["code", "legal"]
    models = _models(forest_dir)[:2]
    assert s.continuation == pytest.approx(brute_mixture(models, lm.lm.eos_id, ctx, cont)[0], abs=1e-4)

    c = ElmforestLM(forest=str(cluster_forest), mode="cluster", k=1, precision="fp32")
    run, w, weighting = c.lm.experts_for(ctx)
    assert len(run) == 1 and weighting == "fixed" and float(w.sum()) == pytest.approx(1.0)
    [s] = c.lm.score([(ctx, cont)])
    one = [load_model(Forest.load(cluster_forest).expert_dirs()[run[0]]).eval()]
    assert s.experts == [c.lm.names[run[0]]]
    assert s.continuation == pytest.approx(brute_mixture(one, c.lm.eos_id, ctx, cont)[0], abs=1e-4)
    # a context longer than the window is cut on the left: routed on what the experts read, not on the
    # text cut away (c-BTM was routed on text no expert, and no dense model, conditions on)
    gone = c.lm.encode("and the lord said unto moses thou shalt " * 30)
    seen = c.lm.encode("def return self import class for in if else " * 40)[: c.lm.seq_len - len(cont)]
    assert c.lm.experts_for([*gone, *seen])[0] != c.lm.experts_for(seen)[0]  # the cut text routes elsewhere
    [s] = c.lm.score([([*gone, *seen], cont)])
    assert s.experts == [c.lm.names[i] for i in c.lm.experts_for(seen)[0]]


def test_scores_match_the_brute_force_with_a_cached_prior_fixed_weights_and_edge_cases(
    forest_dir, shards_dir
):
    models = _models(forest_dir)
    lm = ElmforestLM(forest=str(forest_dir), precision="fp32", prior="cached", prior_data=str(shards_dir))
    prior = lm.lm.prior.tolist()
    assert "valid" in lm.lm.prior_source and max(prior) - min(prior) > 1e-3  # estimated, not uniform
    fixed = ElmforestLM(
        forest=str(forest_dir),
        precision="fp32",
        prior="cached",
        prior_data=str(shards_dir),
        weighting="fixed",
    )
    eos = lm.lm.eos_id
    ctx, cont = lm._pair("and the lord said unto", " moses")
    long_ctx = lm.lm.encode("def return self import class for in if else " * 20)
    assert len(long_ctx) > lm.max_length  # the context is cut on the left
    # the brute force's own greedy choice after the context: a continuation that must be greedy
    g_tok = brute_mixture(models, eos, ctx, [0], prior=prior)[2]
    cases = [(ctx, cont), ([], lm.lm.encode("and the lord")), (long_ctx, cont), (ctx, [g_tok])]
    got = lm.lm.score(cases)
    got_fixed = fixed.lm.score(cases)
    for (c, x), s, sf in zip(cases, got, got_fixed, strict=True):
        want = brute_mixture(models, eos, c, x, prior=prior, window=lm.max_length)
        assert (s.continuation, s.greedy) == (pytest.approx(want[0], abs=1e-4), want[1])
        want_f = brute_mixture(models, eos, c, x, prior=prior, fixed=True, window=lm.max_length)
        assert (sf.continuation, sf.greedy) == (pytest.approx(want_f[0], abs=1e-4), want_f[1])
    assert got[-1].greedy  # is_greedy can be true, and is
    assert lm._pair("", "and the lord") == ([], lm.lm.encode("and the lord"))  # no prefix added here
    with pytest.raises(UserError, match="unknown elmforest model_args"):
        ElmforestLM(forest=str(forest_dir), weigthing="fixed")


def test_rolling_loglikelihood_equals_elmforest_eval(forest_dir, corpus, tmp_path):
    from elmforest.forest.evaluate_text import evaluate_forest

    text = " ".join(("and the lord said unto moses thou shalt not " * 30).split())  # several windows
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"id": "d0", "text": text, "domain": "scripture"}) + "\n")
    for mode in ("ensemble", "topk", "average"):
        ev = evaluate_forest(
            forest_dir, data, split="all", prior="uniform", mode=mode, k=2, precision="fp32", device="cpu"
        )
        dom = ev["domains"]["scripture"]
        lm = ElmforestLM(
            forest=str(forest_dir),
            mode=mode,
            k=2 if mode == "topk" else None,
            precision="fp32",
            rolling_eos=True,
        )
        assert len(lm.lm.encode(text)) > 2 * lm.max_length
        inst = type("I", (), {"args": (text,)})()
        [ll] = lm.loglikelihood_rolling([inst])
        assert -ll == pytest.approx(dom["nll_nats"], rel=1e-5, abs=1e-4), mode
        bpb = -ll / math.log(2) / (len(text.encode()) + 1)  # eval counts the EOS as one byte
        assert bpb == pytest.approx(dom["bpb"], abs=1e-4), mode


def test_a_rolling_task_reports_the_bits_per_byte_of_its_documents(forest_dir, tmp_path):
    docs = ["and the lord said unto moses " * 20, "def return self import class " * 15]
    _write_task(
        tmp_path,
        "ef_ppl",
        {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": "bits_per_byte"}, {"metric": "byte_perplexity"}],
        },
        [{"text": t} for t in docs],
    )
    # a standard task on local data: lm-eval's own lambada_openai YAML, its dataset swapped for a local file
    import os

    lambada = [{"text": "and the lord said unto moses"}, {"text": "def return self import class"}]
    (tmp_path / "lambada.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lambada))
    std = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "lambada", "lambada_openai.yaml")
    (tmp_path / "lambada_local.yaml").write_text(
        f"include: {std}\ntask: lambada_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'lambada.jsonl'}\n"
    )
    # through the command line, as a user runs it: `elmforest lm-eval` is lm-eval's command
    from elmforest.cli import main

    out = tmp_path / "out"
    args = ["run", "--model", "elmforest", "--model_args", f"forest={forest_dir},precision=fp32"]
    args += ["--tasks", "ef_ppl,lambada_local", "--include_path", str(tmp_path), "--output_path", str(out)]
    assert main(["lm-eval", *args]) == 0
    [written] = list(out.rglob("results_*.json"))
    res = json.loads(written.read_text())
    lm = ElmforestLM(forest=str(forest_dir), precision="fp32")
    nll = sum(lm.lm.rolling_nll(lm.lm.encode(t)) for t in docs)
    nbytes = sum(len(t.encode()) for t in docs)
    assert res["results"]["ef_ppl"]["bits_per_byte,none"] == pytest.approx(
        nll / nbytes / math.log(2), rel=1e-5
    )
    pairs = [lm._pair(r["text"].rsplit(" ", 1)[0], " " + r["text"].rsplit(" ", 1)[1]) for r in lambada]
    lls = [s.continuation for s in lm.lm.score(pairs)]
    assert res["results"]["lambada_local"]["perplexity,none"] == pytest.approx(
        math.exp(-sum(lls) / 2), rel=1e-4
    )


def test_generate_until_stops_at_the_stop_sequences_and_is_the_greedy_generation(forest_dir, tmp_path):
    from elmforest.forest.generate import generate

    prompts = ["and the lord said", "def return self", "license software"]
    full = {
        p: generate(forest_dir, p, max_new_tokens=24, temperature=0.0, precision="fp32").text for p in prompts
    }
    # stop strings taken from the generations themselves, so the cut is always exercised: a few
    # characters from the middle of the first, and one no generation contains
    first = full[prompts[0]]
    stops = [first[len(first) // 2 : len(first) // 2 + 3], "\n#never#"]
    assert stops[0].strip()
    _write_task(
        tmp_path,
        "ef_gen",
        {
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{target}}",
            "generation_kwargs": {"until": stops, "max_gen_toks": 24, "do_sample": False},
            "metric_list": [{"metric": "exact_match"}],
        },
        [{"prompt": p, "target": "x"} for p in prompts],
    )
    res = _evaluate(tmp_path, f"forest={forest_dir},precision=fp32", ["ef_gen"])
    outs = {s["doc"]["prompt"]: s["resps"][0][0] for s in res["samples"]["ef_gen"]}
    for p in prompts:
        cuts = [i for i in (full[p].find(x) for x in stops) if i >= 0]
        want = full[p][: min(cuts)] if cuts else full[p]
        assert outs[p] == want
        assert stops[0] not in outs[p]
    assert len(outs[prompts[0]]) < len(first)  # the first was cut


def test_bad_model_args_are_clear_errors(forest_dir, tmp_path):
    with pytest.raises(UserError, match="exactly one of forest"):
        ElmforestLM()
    with pytest.raises(UserError, match="unknown mode"):
        ElmforestLM(forest=str(forest_dir), mode="best")
    with pytest.raises(UserError, match="prior_data"):
        ElmforestLM(forest=str(forest_dir), prior="cached")
    with pytest.raises(UserError, match="neither a forest"):
        ElmforestLM(forest=str(tmp_path))
    (tmp_path / "run_config.json").write_text("{}")  # a run cut before its model was written
    with pytest.raises(FileNotFoundError, match="a run directory whose training has not finished"):
        ElmforestLM(forest=str(tmp_path))


def test_model_args_and_generation_settings_are_read_as_given_or_refused(forest_dir, capsys):
    """k=abc was a ValueError traceback, max_length=-5 failed on the first request, rolling_eos=no
    was True; top_k=1 still sampled, top_p=0 sampled everything, num_beams was ignored, and a
    max_gen_toks as long as the context kept one context token without a word."""
    f = str(forest_dir)
    for bad, said in (
        ({"k": "abc"}, "k='abc': expected an integer"),
        ({"max_length": -5}, "max_length=-5: expected at least 1"),
        ({"max_length": 0}, "max_length=0"),
        ({"rolling_eos": "nope"}, "rolling_eos='nope': expected true or false"),
        ({"routing_temperature": "nan"}, "routing_temperature='nan': expected a number"),
        ({"max_length": "64.5"}, "max_length='64.5': expected an integer"),
        ({"max_length": "inf"}, "max_length='inf': expected an integer"),
        # a mode's own setting given to another was dropped without a word (as `eval` refuses them)
        (
            {"mode": "average", "weighting": "fixed"},
            "weighting=fixed (--weighting): not used by mode=average",
        ),
        ({"mode": "ensemble", "k": 3}, "k=3 (--k): not used by mode=ensemble"),
        ({"routing_temperature": 0.5}, "routing_temperature=0.5 (--routing-temperature): not used"),
        # given at its default: a choice too (k=2 read as the mode's k)
        ({"mode": "average", "k": 2}, "k=2 (--k): not used by mode=average"),
        ({"mode": "topk", "routing_temperature": "0.1"}, "routing_temperature=0.1 (--routing-temperature)"),
        ({"mode": "cluster", "prior": "uniform"}, "prior=uniform (--prior): not used by mode=cluster"),
        ({"weighting": ""}, "unknown weighting ''"),  # not taken for the default
    ):
        with pytest.raises(UserError, match=re.escape(said)):
            ElmforestLM(forest=f, **bad)
    assert ElmforestLM(forest=f, max_length="64.0").max_length == 64  # as a config file may write it
    assert ElmforestLM(forest=f, rolling_eos="no").rolling_eos is False
    lm = ElmforestLM(forest=f, precision="fp32")
    prompt = "and the lord said unto"
    greedy = lm.generate_one(prompt, {"max_gen_toks": 8})
    sampled = {lm.generate_one(prompt, {"max_gen_toks": 8, "do_sample": True, "seed": s}) for s in range(6)}
    assert len(sampled) > 1  # sampling does sample here, so the next two are greedy by their settings
    # as lm-eval's normalize_gen_kwargs: a temperature samples where do_sample is left out, and the
    # length is read under its other names (max_gen_toks first)
    by_temperature = {
        lm.generate_one(prompt, {"max_gen_toks": 8, "temperature": 1.0, "seed": s}) for s in range(6)
    }
    assert by_temperature == sampled
    nulled = {
        lm.generate_one(prompt, {"max_gen_toks": 8, "do_sample": None, "temperature": 1.0, "seed": s})
        for s in range(6)
    }
    assert nulled == sampled  # do_sample: null is left out, as lm-eval reads it
    for length in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
        assert lm.generate_one(prompt, {length: 8}) == greedy
        assert lm.generate_one(prompt, {length: 2, "max_gen_toks": 8}) == greedy
    assert lm.generate_one(prompt, {"max_new_tokens": 8, "max_tokens": 2}) == greedy
    for kw in ({"top_k": 1}, {"top_p": 0}, {"top_p": 0.0, "temperature": 2.0}):
        assert lm.generate_one(prompt, {"max_gen_toks": 8, "do_sample": True, "seed": 3, **kw}) == greedy, kw
    assert lm.generate_one(prompt, {"max_gen_toks": 8, "num_beams": 1, "top_k": 50}) == greedy  # neutral
    for kw, said in (
        ({"num_beams": 4}, "num_beams=4"),
        ({"do_sample": True, "top_k": 40}, "top_k=40"),
        ({"repetition_penalty": 1.3}, "repetition_penalty=1.3"),
        ({"top_p": 1.5}, "top_p=1.5"),
    ):
        with pytest.raises(UserError, match=re.escape(said)):
            lm.generate_one(prompt, {"max_gen_toks": 8, **kw})
    capsys.readouterr()
    lm.generate_one(prompt, {"max_gen_toks": lm.max_length})
    assert f"max_gen_toks={lm.max_length} leaves 1 of the model's" in capsys.readouterr().err
    with pytest.raises(UserError, match="without a chat template"):
        lm.apply_chat_template([{"role": "user", "content": "hi"}])


def test_unused_prior_data_and_duplicate_experts_are_refused(forest_dir, shards_dir):
    f, data = str(forest_dir), str(shards_dir)
    with pytest.raises(UserError, match=r"prior_data \(--prior-data\) is only used with prior=cached"):
        ElmforestLM(forest=f, prior_data=data)
    with pytest.raises(UserError, match="mode=cluster routes by the clusterer"):
        ElmforestLM(forest=f, mode="cluster", prior="cached", prior_data=data)
    with pytest.raises(UserError, match="experts named more than once: code"):
        ElmforestLM(forest=f, experts="code+code+legal")
    with pytest.raises(UserError, match="experts is an empty list"):  # `experts=`: was every expert
        ElmforestLM(forest=f, experts="")


def test_topk_from_a_uniform_prior_says_the_choice_is_a_tie(forest_dir, capsys):
    lm = ElmforestLM(forest=str(forest_dir), mode="topk", k=2, precision="fp32")
    err = capsys.readouterr().err
    assert "a prior that ties (uniform)" in err and "prior=cached" in err
    assert ", ".join(lm.lm.names) in err
    from elmforest.forest.mixture import top_experts

    # a tie goes to the earlier experts, as the note says (torch.topk gave experts 5, 6 of 8 equal ones)
    assert [top_experts(torch.full((n,), 1.0 / n), k) for n, k in ((8, 1), (8, 2), (5, 2))] == [
        [0],
        [0, 1],
        [0, 1],
    ]
    assert top_experts(torch.tensor([0.1, 0.4, 0.1, 0.4]), 3) == [0, 1, 3]


def test_an_unreachable_hub_runs_lm_eval_offline_and_says_so(monkeypatch, capsys):
    """Offline, the Hub client retries each request for about 25 s before failing: the command probes the
    Hub's host first and, when it does not answer, runs offline; a user's own setting is left alone."""
    import socket

    import lm_eval.__main__

    from elmforest.clients import lm_eval_cli

    for v in (*lm_eval_cli.OFFLINE_VARS, *lm_eval_cli.PROXY_VARS):
        monkeypatch.delenv(v, raising=False)
    import huggingface_hub

    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_OFFLINE", False
    )  # as imported on a networked machine
    seen = []
    monkeypatch.setattr(
        lm_eval.__main__,
        "cli_evaluate",  # what the Hub clients see: the variables, and the client already imported
        lambda: seen.append(
            {v: os.environ.get(v) for v in lm_eval_cli.OFFLINE_VARS}
            | {"hub": huggingface_hub.is_offline_mode()}
        ),
    )
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    assert "hub.invalid:443" in lm_eval_cli.hub_unreachable()
    lm_eval_cli.lm_eval_(["run", "--tasks", "lambada_openai"])
    assert seen[-1] == dict.fromkeys(lm_eval_cli.OFFLINE_VARS, "1") | {"hub": True}
    assert "runs offline" in capsys.readouterr().err
    assert not any(v in os.environ for v in lm_eval_cli.OFFLINE_VARS)  # restored after the run
    lm_eval_cli.lm_eval_(["ls", "tasks"])  # no task run: nothing probed
    assert seen[-1] == dict.fromkeys(lm_eval_cli.OFFLINE_VARS) | {"hub": False}
    assert "offline" not in capsys.readouterr().err and not huggingface_hub.is_offline_mode()
    with socket.create_server(("127.0.0.1", 0)) as srv:  # a Hub that answers
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.getsockname()[1]}")
        assert lm_eval_cli.hub_unreachable() is None
        lm_eval_cli.lm_eval_(["run", "--tasks=lambada_openai"])
        assert seen[-1] == dict.fromkeys(lm_eval_cli.OFFLINE_VARS) | {"hub": False}
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    for v in ("HF_HUB_OFFLINE", "HTTPS_PROXY"):  # the user said how to reach the Hub: not guessed
        monkeypatch.setenv(v, "0" if v == "HF_HUB_OFFLINE" else "http://proxy.invalid:3128")
        assert lm_eval_cli.hub_unreachable() is None
        monkeypatch.delenv(v)


def test_a_context_past_the_training_length_gets_a_note(forest_dir, capsys):
    """serve --seq-len and lm-eval's max_length past the experts' training context were taken
    silently (generate already said so): the positions exist, the text there is worse."""
    from elmforest.eval.bpb import default_seq_len
    from elmforest.forest.lm import open_lm
    from elmforest.forest.manifest import Forest

    trained = default_seq_len(Forest.load(forest_dir).expert_dir(Forest.load(forest_dir).names[0]))
    open_lm(forest_dir, seq_len=trained)
    assert "note:" not in capsys.readouterr().err
    open_lm(forest_dir, seq_len=trained + 1)
    assert f"past the {trained}-token context the experts were trained on" in capsys.readouterr().err
    # the model's last position is usable; one past it is refused (mutation: >= refused the last)
    limit = json.loads(
        (Forest.load(forest_dir).expert_dir(Forest.load(forest_dir).names[0]) / "config.json").read_text()
    )["max_position_embeddings"]
    assert open_lm(forest_dir, seq_len=limit).seq_len == limit
    with pytest.raises(UserError, match=f"past the model's {limit} positions"):
        open_lm(forest_dir, seq_len=limit + 1)


def test_a_continuation_of_exactly_the_window_is_scored_and_one_more_token_refused(forest_dir):
    """The window holds EOS and the continuation less its last token: seq_len tokens fit."""
    from elmforest.forest.lm import open_lm

    lm = open_lm(forest_dir, seq_len=16, precision="fp32")
    models = _models(forest_dir)
    ids = lm.encode("def return self import class for in if else while " * 4)[:17]
    (got,) = lm.score([([], ids[:16])])
    want = brute_mixture(models, lm.eos_id, [], ids[:16], prior=lm.prior.tolist())
    assert got.continuation == pytest.approx(want[0], abs=1e-4)
    with pytest.raises(UserError, match="a continuation of 17 tokens exceeds the context of 16"):
        lm.score([([], ids)])


def test_a_sampled_request_is_the_same_whatever_runs_beside_it(forest_dir):
    """Seeds were taken in turn, so a request's sample depended on the requests lm-eval ordered before
    it (another task, --limit); now each is a function of the base seed, its context and its repeat."""
    lm = ElmforestLM(forest=str(forest_dir), precision="fp32", seed=5)
    kw = {"max_gen_toks": 8, "do_sample": True, "temperature": 1.5}
    a, b = "and the lord said unto", "def return self"
    first = lm.generate_one(a, dict(kw))
    repeat = lm.generate_one(a, dict(kw))
    other = ElmforestLM(forest=str(forest_dir), precision="fp32", seed=5)
    other.generate_one(b, dict(kw))
    other.generate_one(b, dict(kw))
    assert other.generate_one(a, dict(kw)) == first  # after other requests, still its first sample
    assert other.generate_one(a, dict(kw)) == repeat
    samples = {first, repeat, *(lm.generate_one(a, dict(kw)) for _ in range(4))}
    assert len(samples) > 1  # repeats of one request sample afresh


def test_the_stderr_bootstrap_runs_in_process_unless_the_user_says_otherwise(monkeypatch):
    """lm-eval forks a pool for each metric's stderr from a process holding torch's threads: a test run
    hung in it (a fork taken while a thread held a lock)."""
    import os

    import lm_eval.__main__ as lm_main

    from elmforest.cli import main

    seen = []
    monkeypatch.setattr(lm_main, "cli_evaluate", lambda: seen.append(os.environ.get("DISABLE_MULTIPROC")))
    monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)
    assert main(["lm-eval", "ls"]) == 0 and seen == ["1"] and "DISABLE_MULTIPROC" not in os.environ
    monkeypatch.setenv("DISABLE_MULTIPROC", "")
    assert main(["lm-eval", "ls"]) == 0 and seen == ["1", ""]


def test_lm_evals_help_names_the_elmforest_model_type(capsys):
    """`elmforest lm-eval --help` printed lm-eval's help alone: `--model elmforest` and its model_args
    could not be found from it."""
    from elmforest.cli import main

    main(["lm-eval", "--help"])
    out = capsys.readouterr().out
    assert "--model elmforest --model_args forest=DIR" in out and "docs/lm-eval.md" in out
    assert "usage: lm-eval" in out  # and lm-eval's own help after it
