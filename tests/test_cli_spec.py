"""The command line is generated from the verbs' signatures: every verb of the earlier hand-written CLI
exists, every option of every verb has help text and shows in its --help, and the training verbs list
every config key that --set accepts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import pytest
import typer

from elmforest.cli import build_app, main
from elmforest.config import RunConfig, override_keys
from elmforest.utils.argtypes import flag, group, opt, positive_int, verb

VERBS = {
    "quickstart", "study", "sweep", "train", "presets", "eval", "eval-crossdoc", "generate",
    "corpus demo", "corpus multilingual", "tokenizer train", "shards build", "shards reorder", "shards show",
    "forest init", "forest list", "forest show", "forest add", "forest remove", "forest fsck",
    "forest seed", "forest expert", "forest dense", "forest train", "forest average",
    "merge moe", "merge finetune", "merge routing", "merge flexolmo-pair", "merge flexolmo", "cluster fit", "cluster assign", "cluster languages",
    "lm-eval", "serve", "report",
}  # fmt: skip
TRAINING = {"train", "forest seed", "forest expert", "forest train", "sweep", "quickstart"}


def _verbs(cmd, path: tuple = ()) -> dict:
    if hasattr(cmd, "commands"):  # a group (Typer's own click classes)
        out = {}
        for name, sub in cmd.commands.items():
            out.update(_verbs(sub, (*path, name)))
        return out
    return {" ".join(path): cmd}


@pytest.fixture(scope="module")
def verbs():
    return _verbs(typer.main.get_command(build_app()))


def test_every_verb_exists(verbs):
    assert all(cmd.params for name, cmd in verbs.items() if name != "presets")
    assert set(verbs) == VERBS


def test_every_option_is_documented_in_help(verbs, capsys):
    for name, cmd in verbs.items():
        assert cmd.help, f"{name}: no description"
        assert main([*name.split(), "--help"]) == 0
        usage = capsys.readouterr().out
        for p in cmd.params:
            if p.param_type_name == "option":
                assert p.help, f"{name} {p.opts[0]}: no help text"
                assert p.opts[0] in usage, f"{name}: {p.opts[0]} missing from --help"
            else:
                assert p.name in usage.lower() and p.help, f"{name} {p.name}: undocumented"


def test_training_verbs_list_every_config_key(verbs, capsys):
    keys = override_keys()
    assert len(keys) > 30 and any(k.startswith("train.steps: int") for k in keys)
    assert not any(k.startswith("model.trust_remote_code") for k in keys)  # the flag only
    assert not any(k.startswith("model.preset") for k in keys)  # --preset only: --set model.preset is refused
    for name in TRAINING:
        main([*name.split(), "--help"])
        usage = capsys.readouterr().out
        assert "--set KEY=VALUE" in usage and "--no-progress" in usage
        for k in keys:
            assert k.split(":")[0] in usage, f"{name}: {k} missing"
    # and the keys are the dataclass tree's own
    d = RunConfig().to_dict()
    assert {k.split(":")[0] for k in keys} == {
        f"{s}.{f}" for s, fields in d.items() for f in fields if f != "trust_remote_code"
    } - {"model.preset"}


def test_usage_errors_exit_2_and_name_the_problem(capsys):
    assert main(["forest", "seed", "--shards", "s"]) == 2
    assert "--forest" in capsys.readouterr().err
    assert main(["eval", "--data", "d", "--model", "m", "--mode", "nope"]) == 2
    assert "--mode" in capsys.readouterr().err
    assert main(["no-such-verb"]) == 2
    assert main([]) in (0, 2)  # the overview, as with --help


@dataclass
class _Group:
    size: Annotated[int, opt("a size", positive_int)] = 3
    names: Annotated[list[str] | None, opt("names (repeatable)", name="--name")] = None


def test_a_dataclass_parameter_is_an_option_group(capsys):
    got = []
    app = group("test")

    def go(
        out: Annotated[str, opt("where")],
        g: _Group = _Group(),  # noqa: B008
        quiet: Annotated[bool, flag("--quiet")] = False,
    ):
        """Go."""
        got.append((out, g, quiet))
        return 3 if quiet else 0

    verb(app)(go)
    verb(app, "other")(lambda: None)
    with pytest.raises(SystemExit) as e:
        app(["go", "--out", "o", "--size", "5", "--name", "a", "--name", "b"], prog_name="t")
    assert e.value.code == 0 and got[-1] == ("o", _Group(5, ["a", "b"]), False)
    with pytest.raises(SystemExit) as e:
        app(["go", "--out", "o", "--quiet"], prog_name="t")
    assert e.value.code == 3 and got[-1] == ("o", _Group(3, None), True)  # the verb's status
    with pytest.raises(SystemExit) as e:
        app(["go", "--out", "o", "--size", "0"], prog_name="t")
    assert e.value.code == 2 and "--size" in capsys.readouterr().err and len(got) == 2


def test_every_flag_the_docs_show_exists(verbs):
    """Every `elmforest VERB ... --flag` in README.md and docs/*.md names a flag the verb has."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    flags = {
        name: {o for p in cmd.params if p.param_type_name == "option" for o in p.opts} | {"--help"}
        for name, cmd in verbs.items()
    }
    wrong, seen = [], 0
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for cmd in re.findall(r"elmforest ((?:[a-z]+ ?){1,2}[^`\n|&;)]*)", doc.read_text()):
            words = cmd.split()
            name = " ".join(words[:2]) if " ".join(words[:2]) in flags else words[0]
            if name not in flags or name == "lm-eval":  # lm-eval's flags are lm-eval's own
                continue
            seen += 1
            for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", cmd):
                if f not in flags[name]:
                    wrong.append(f"{doc.name}: elmforest {name} {f}")
    assert seen > 30 and not wrong, wrong


def test_the_routing_temperature_has_one_name_in_every_verb_and_the_old_one_still_works(verbs, capsys):
    """`generate` called it --temperature-routing, `serve` --routing-temperature."""
    shown = {
        name: {p.opts[0] for p in cmd.params if p.param_type_name == "option"} for name, cmd in verbs.items()
    }
    assert "--routing-temperature" in shown["generate"] and "--routing-temperature" in shown["serve"]
    assert not [name for name, flags in shown.items() if "--temperature-routing" in flags]
    gen = next(p for p in verbs["generate"].params if "--routing-temperature" in p.opts)
    assert "--temperature-routing" in gen.opts  # the old name: scripts that used it still run
    assert main(["generate", "--forest", "nowhere", "--prompt", "x", "--temperature-routing", "0"]) == 2
    assert "--temperature-routing" in capsys.readouterr().err  # checked like the new name
    # an option of the other weighting, taken and dropped without a word (said before the forest loads)
    base = ["generate", "--forest", "nowhere", "--prompt", "x"]
    assert main([*base, "--routing-temperature", "0.5"]) == 2
    assert "--routing-temperature 0.5 is c-BTM routing's: it needs --cluster-k" in capsys.readouterr().err
    assert main([*base, "--cluster-k", "2", "--weighting", "fixed"]) == 2
    assert "--weighting fixed: with --cluster-k" in capsys.readouterr().err


def test_the_cli_starts_without_importing_torch():
    """`elmforest --help` and a usage error answer in a fraction of a second: the CLI's modules import
    torch (seconds on a cold cache) and scipy (about a second) only inside the verbs that run something."""
    import subprocess
    import sys

    code = "import sys, elmforest.cli; sys.exit('torch' in sys.modules or 'scipy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    # nor transformers (a second on a cold cache) before the arguments are read: --help, a usage error
    code = (
        "import sys\nfrom elmforest.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "sys.exit(sorted({'torch', 'scipy', 'transformers'} & set(sys.modules)) or None)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and "Usage" in run.stdout, run.stderr[-300:]


def test_the_first_process_is_rank_zero_of_torchruns_environment(monkeypatch):
    from elmforest.utils.proc import first_process

    monkeypatch.delenv("RANK", raising=False)
    assert first_process()
    monkeypatch.setenv("RANK", "0")
    assert first_process()
    monkeypatch.setenv("RANK", "1")
    assert not first_process()


def test_a_home_folder_after_an_equals_sign_is_expanded(monkeypatch, tmp_path, capsys):
    """`--forest=~/x` names the home folder's x, as `--forest ~/x` does once the shell expands it; other
    values keep their `~` (a --set value, a short option)."""
    from elmforest.cli import home_expanded, main

    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["forest", "show", "--forest=~/nope"]) == 2
    assert f"{tmp_path}/nope: not a forest" in capsys.readouterr().err
    assert home_expanded("--set=data.x=~y") == "--set=data.x=~y" and home_expanded("-o=~/x") == "-o=~/x"
    assert home_expanded("~/x") == "~/x" and home_expanded("--out=~") == str(f"--out={tmp_path}")


def test_generate_takes_the_precision_and_top_p_that_serve_and_eval_take(monkeypatch, capsys):
    """The CLI always sampled in `auto` precision (bf16 on a CPU) and without nucleus sampling, which the
    Python API and `serve` offer: near-ties read in bf16 picked another token than fp32 would."""
    import elmforest.forest.generate as g

    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        return g.Generation("", [], [], [])

    monkeypatch.setattr(g, "generate", fake)
    argv = ["generate", "--forest", "f", "--prompt", "x", "--precision", "fp32", "--top-p", "0.5"]
    assert main(argv) == 0
    assert (seen["precision"], seen["top_p"]) == ("fp32", 0.5)
    assert main(["generate", "--forest", "f", "--prompt", "x", "--top-p", "0"]) == 2  # (0, 1]
    assert "--top-p" in capsys.readouterr().err
    # greedy decoding draws nothing: a sampling option beside --temperature 0 was dropped without a word
    for extra, said in ((["--top-p", "0.5"], "--top-p"), (["--seed", "0"], "--seed")):
        assert main(["generate", "--forest", "f", "--prompt", "x", "--temperature", "0", *extra]) == 2
        assert f"{said} shape(s) sampling; --temperature 0 decodes greedily" in capsys.readouterr().err
    assert main(["generate", "--forest", "f", "--prompt", "x", "--temperature", "0"]) == 0
