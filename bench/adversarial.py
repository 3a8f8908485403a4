"""Adversarial checks (issue 11: "trust nothing on disk; every fault leaves a clean state").

    python bench/adversarial.py                  # every case; a table; exit 1 if any case fails
    python bench/adversarial.py --only remove    # the cases whose name contains "remove"
    python bench/adversarial.py --list           # what the cases are
    python bench/adversarial.py --out /tmp/adv   # keep the work folder: each case's commands.log;
                                                 # a re-run re-uses its setup/ (delete it to rebuild)

Every case drives the real command line (`python -m elmforest.cli ...`) in subprocesses, with real
SIGKILLs, on a tiny synthetic setup built once in a work folder: a 3-domain JSONL corpus (scripture,
code, legal; 80 random-word documents each), a 400-token BPE, shards (10% valid, 10% test) and a
3-expert `tiny` forest (24 dense steps of 6 sequences). Each case copies what it needs into its own
folder, crafts one fault (a hostile manifest, a link out of the forest, a kill, a flipped byte, a
full or read-only disk), and reports what it observed against what the code promises: a refusal is
exit status 2 with one line naming the culprit and no traceback; a kill or a failed write leaves
nothing half-done that the next run does not clean.

Case names carry the numbers of the list in issue 11 (c20a-e: the variants of case 20). Cases 18 and
19 mount small tmpfs file systems (root only); where `mount` fails they are skipped. Commands run
with umask 022. About 3-4 minutes on 2 CPU cores (more when the machine is busy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PY = sys.executable
HOST = socket.gethostname().replace("~", "-")  # as elmforest.utils.io names its temporaries
TIMEOUT = 300  # seconds, per command
SEED = 0  # of the random kill moments (--seed)
DOMAIN_WORDS = {
    "scripture": "and the lord said unto moses thou shalt not israel king god people land of".split(),
    "code": "def return self import class for in if else none true false lambda yield with as".split(),
    "legal": "license software warranty copyright permission notice holder liability terms shall".split(),
}
TINY_FOREST = ["--preset", "tiny", "--set", "train.steps=24", "--set", "train.batch_size=6", "--no-progress"]
TINY_RUN = ["--preset", "tiny", "--no-progress"]
SPLIT = ["--valid-frac", "0.1", "--test-frac", "0.1"]


# -- running the command line --------------------------------------------------------------------------------
@dataclass
class Ran:
    argv: list[str]
    rc: int
    out: str
    err: str
    secs: float

    @property
    def text(self) -> str:
        return self.out + self.err

    @property
    def error_line(self) -> str:
        """The `elmforest: error:` line (argparse's `error:` line), else the last line printed."""
        lines = [ln for ln in self.text.splitlines() if ln.strip()]
        for ln in lines:
            if "error:" in ln:
                return ln.strip()
        return lines[-1].strip() if lines else ""


LOG: list[str] = []  # what the current case ran, printed in full when it fails


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ELMFOREST_DEBUG"}
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return env


def _log(r: Ran) -> None:
    LOG.append(
        f"$ elmforest {' '.join(r.argv)}   -> rc {r.rc} in {r.secs:.1f}s\n"
        + "".join(f"  | {ln}\n" for ln in r.text.splitlines()[-25:])
    )


def cli(*args, timeout: int = TIMEOUT) -> Ran:
    """Run `python -m elmforest.cli ARGS` to completion."""
    argv = [str(a) for a in args]
    t = time.perf_counter()
    try:
        p = subprocess.run(
            [PY, "-m", "elmforest.cli", *argv], capture_output=True, text=True, env=_env(), timeout=timeout
        )
        r = Ran(argv, p.returncode, p.stdout, p.stderr, time.perf_counter() - t)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        r = Ran(argv, -999, out, f"TIMED OUT after {timeout}s", time.perf_counter() - t)
    _log(r)
    return r


def start(*args, log: Path) -> subprocess.Popen:
    """Start `python -m elmforest.cli ARGS` in the background, its output appended to `log`."""
    with open(log, "ab") as f:
        f.write(f"$ elmforest {' '.join(map(str, args))}\n".encode())
        f.flush()
        return subprocess.Popen(
            [PY, "-m", "elmforest.cli", *[str(a) for a in args]], stdout=f, stderr=f, env=_env()
        )


def python(code: str, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=_env(), timeout=timeout)
    LOG.append(
        f"$ python -c <script>   -> rc {p.returncode}\n"
        + "".join(f"  | {ln}\n" for ln in (p.stdout + p.stderr).splitlines()[-15:])
    )
    return p


TIDY: dict[str, str] = {}  # work-folder paths -> $C (the case's folder) and $S (the setup's), for the table


def short(s: str, n: int = 110) -> str:
    """One line of at most n characters, the work folder's paths shortened."""
    s = " ".join(s.split()).replace("  (set ELMFOREST_DEBUG=1 for a traceback)", "")
    s = s.replace(" (set ELMFOREST_DEBUG=1 for a traceback)", "").replace("elmforest: error: ", "error: ")
    for long, name in TIDY.items():
        s = s.replace(long, name)
    return s if len(s) <= n else s[: n - 1] + "…"


def refused(r: Ran, *needles: str, one_line: bool = True) -> tuple[str, bool]:
    """Exit 2, no traceback, the error line names every needle, and (one_line) stderr is that line."""
    err_lines = [ln for ln in r.err.splitlines() if ln.strip()]
    problems = []
    if r.rc != 2:
        problems.append(f"rc={r.rc}")
    if "Traceback" in r.text:
        problems.append("TRACEBACK")
    missing = [n for n in needles if n not in r.error_line]
    if missing:
        problems.append(f"line lacks {missing}")
    if one_line and len(err_lines) != 1:
        problems.append(f"{len(err_lines)} stderr lines")
    head = f"rc={r.rc}: {r.error_line}" if not problems else f"[{'; '.join(problems)}] {r.error_line}"
    return short(head), not problems


def ok_run(r: Ran) -> bool:
    return r.rc == 0 and "Traceback" not in r.text


# -- the synthetic setup -------------------------------------------------------------------------------------
def make_corpus(root: Path, docs_per_domain: int = 80, seed: int = 0, words_per_doc=(10, 120)) -> Path:
    """One JSONL per domain of random words (as tests/conftest.py), some non-ASCII text."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for domain, words in DOMAIN_WORDS.items():
        with open(root / f"{domain}.jsonl", "w", encoding="utf-8") as f:
            for i in range(docs_per_domain):
                text = " ".join(rng.choices(words, k=rng.randint(*words_per_doc)))
                if i % 7 == 0:
                    text += " — café naïve ✓\n" + text[:40]
                rec = {"id": f"{domain}/{i}", "domain": domain, "text": text}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return root


def random_letters_corpus(path: Path, mbytes: float, seed: int = 0) -> Path:
    """Random lowercase strings: a small BPE barely compresses them (about one token per byte)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    target, written, i = int(mbytes * 1e6), 0, 0
    with open(path, "w") as f:
        while written < target:
            text = " ".join(
                "".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(400)
            )
            line = json.dumps({"id": f"r/{i}", "domain": "noise", "text": text}) + "\n"
            f.write(line)
            written += len(line)
            i += 1
    return path


@dataclass
class Setup:
    root: Path

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    @property
    def tok(self) -> Path:
        return self.root / "tok"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def forest(self) -> Path:
        return self.root / "forest"

    def build(self) -> None:
        if (self.root / "done").is_file():
            print(f"setup: re-using {self.root}")
            return
        if self.root.exists():
            shutil.rmtree(self.root)
        t = time.perf_counter()
        make_corpus(self.corpus)
        steps = [
            ("tokenizer", "train", "--data", self.corpus, "--out", self.tok, "--vocab-size", 400),
            ("shards", "build", "--data", self.corpus, "--tokenizer", self.tok, "--out", self.shards, *SPLIT),
            ("forest", "train", "--forest", self.forest, "--shards", self.shards, *TINY_FOREST),
        ]
        for args in steps:
            r = cli(*args)
            if not ok_run(r):
                sys.exit(f"setup failed:\n{''.join(LOG)}")
        (self.root / "done").write_text("ok\n")
        print(
            f"setup: corpus, tokenizer, shards and a 3-expert tiny forest in {time.perf_counter() - t:.0f}s"
        )


S: Setup  # set in main()


@dataclass
class Ctx:
    """A case's own folder and helpers to copy the setup into it."""

    dir: Path

    def forest(self) -> Path:
        """A private copy of the trained forest at DIR/site/forest."""
        f = self.dir / "site" / "forest"
        shutil.copytree(S.forest, f, symlinks=True)
        return f

    def victim(self) -> Path:
        v = self.dir / "victim" / "important"
        v.mkdir(parents=True)
        (v / "data.txt").write_text("precious")
        return v


def manifest(forest: Path) -> dict:
    return json.loads((forest / "forest.json").read_text())


def write_manifest(forest: Path, data) -> None:
    (forest / "forest.json").write_text(json.dumps(data))


def dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def dot_entries(d: Path, allowed=(".trainer.lock", ".forest.lock")) -> list[str]:
    return (
        sorted(p.name for p in d.iterdir() if p.name.startswith(".") and p.name not in allowed)
        if d.is_dir()
        else []
    )


def empty_or_missing(d: Path) -> bool:
    return not d.exists() or not any(d.iterdir())


def same_weights(a: Path, b: Path) -> tuple[bool, str]:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        return False, "different tensor names"
    diff = [k for k in x if not torch.equal(x[k], y[k])]
    return not diff, f"{len(x) - len(diff)}/{len(x)} tensors bit-identical"


def safetensors_header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return 8 + n, json.loads(raw[8 : 8 + n])


@contextlib.contextmanager
def tmpfs(where: Path, options: str):
    """Mount a tmpfs at `where` (yields False when mounting is not allowed here)."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    except OSError:  # no mount command
        p = None
    if p is None or p.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def df_used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


# -- the case registry ---------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    expected: str
    fn: Callable[[Ctx], tuple[str, bool]]
    doc: str = ""


CASES: list[Case] = []


def case(expected: str):
    """Register a case: `fn(ctx) -> (observed, ok)`; observed starting with "skipped" is a SKIP."""

    def deco(fn):
        CASES.append(Case(fn.__name__, expected, fn, (fn.__doc__ or "").strip()))
        return fn

    return deco


# == trust: a forest from someone else =======================================================================
@case("remove exits 2 naming forest.json; victim survives")
def c01_crafted_expert_name(ctx: Ctx):
    """forest.json's expert name is ../../../victim/important (a folder outside the forest)."""
    f, victim = ctx.forest(), ctx.victim()
    rel = os.path.relpath(victim, f / "experts")
    m = manifest(f)
    m["experts"][0]["name"] = rel
    write_manifest(f, m)
    obs, ok = refused(cli("forest", "remove", "--forest", f, "--expert", rel), "forest.json")
    alive = (victim / "data.txt").is_file()
    return obs + ("" if alive else " | VICTIM DELETED"), ok and alive


def atime_tripwire_works(d: Path) -> bool:
    """Whether this file system records reads in atime (relatime: an atime older than the mtime)."""
    probe = d / "probe"
    probe.write_text("x")
    os.utime(probe, (1, probe.stat().st_mtime))
    probe.read_text()
    return probe.stat().st_atime != 1


def _expert_path_outside(ctx: Ctx, absolute: bool):
    if not atime_tripwire_works(ctx.dir):
        return "skipped (no atime on this file system to see reads outside)", True
    f, victim = ctx.forest(), ctx.victim()
    m = manifest(f)
    shutil.copytree(f / "experts" / m["experts"][0]["name"], victim, dirs_exist_ok=True)  # weights outside
    for p in victim.iterdir():  # tripwire: relatime updates an atime older than the mtime on a read
        os.utime(p, (1, p.stat().st_mtime))
    m["experts"][0]["path"] = str(victim) if absolute else "experts/../../victim/important"
    write_manifest(f, m)
    obs, ok = refused(cli("eval", "--forest", f, "--data", S.shards, "--no-progress"), "forest.json")
    read = [p.name for p in victim.iterdir() if p.stat().st_atime != 1]
    return obs + (f" | READ OUTSIDE: {read}" if read else ""), ok and not read


@case("eval --forest exits 2 (one line); nothing outside read")
def c02a_expert_path_absolute(ctx: Ctx):
    """An expert's `path` is the absolute path of a copy of its weights outside the forest."""
    return _expert_path_outside(ctx, absolute=True)


@case("eval --forest exits 2 (one line); nothing outside read")
def c02b_expert_path_dotdot(ctx: Ctx):
    """An expert's `path` is experts/../../victim/important."""
    return _expert_path_outside(ctx, absolute=False)


@case("list / fsck / remove exit 2 'outside the forest'; target kept")
def c03_expert_dir_symlink_outside(ctx: Ctx):
    """experts/<name> replaced by a symbolic link to a folder outside the forest."""
    f, victim = ctx.forest(), ctx.victim()
    name = manifest(f)["experts"][0]["name"]
    shutil.rmtree(f / "experts" / name)
    os.symlink(victim, f / "experts" / name)
    results = [
        refused(cli("forest", *verb, "--forest", f), "outside the forest")
        for verb in (["list"], ["fsck"], ["remove", "--expert", name])
    ]
    alive = (victim / "data.txt").is_file()
    bad = [o for o, ok in results if not ok]
    obs = bad[0] if bad else f"3/3 refused: {results[0][0]}"
    return obs + ("" if alive else " | TARGET DELETED"), not bad and alive


@case("forest expert exits 2 naming auto_map; code never ran")
def c04_remote_code_from_files(ctx: Ctx):
    """Manifest seed.config.model.trust_remote_code=true, and an expert's config.json auto_map points at
    a Python file in the expert folder that writes a marker when imported."""
    f = ctx.forest()
    marker = ctx.dir / "pwned"
    m = manifest(f)
    m["seed"]["config"]["model"]["trust_remote_code"] = True
    write_manifest(f, m)
    name = m["experts"][0]["name"]
    edir = f / "experts" / name
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaConfig as EvilConfig\n"
    (edir / "evil.py").write_text(code)
    cfg = json.loads((edir / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}
    (edir / "config.json").write_text(json.dumps(cfg))
    expert = ["forest", "expert", "--forest", f, "--shards", S.shards, "--domain", name, "--name", "again"]
    r = cli(*expert, "--branch", f"expert:{name}", "--set", "train.steps=14", "--no-progress")
    obs, ok = refused(r, "auto_map")
    ran = marker.exists()
    return obs + (" | MARKER WRITTEN: the code ran" if ran else ""), ok and not ran


@case("add exits 2 naming the link; no secret, manifest unchanged, no staging")
def c05_add_with_symlink_to_secret(ctx: Ctx):
    """`forest add --expert SRC` where SRC is a copy of an expert plus notes.txt -> a secret file outside."""
    f = ctx.forest()
    secret = ctx.dir / "secret.key"
    secret.write_text("hunter2-TOPSECRET")
    src = ctx.dir / "theirs"
    shutil.copytree(f / "experts" / manifest(f)["experts"][0]["name"], src)
    os.symlink(secret, src / "notes.txt")
    before = (f / "forest.json").read_bytes()
    r = cli("forest", "add", "--forest", f, "--expert", src, "--domain", "x", "--name", "theirs")
    obs, ok = refused(r, "notes.txt")
    leaked = [str(p) for p in f.rglob("*") if p.is_file() and b"hunter2-TOPSECRET" in p.read_bytes()]
    changed = (f / "forest.json").read_bytes() != before
    staging = dot_entries(f / "experts")
    extra = (f" | SECRET IN {leaked}" if leaked else "") + (" | MANIFEST CHANGED" if changed else "")
    extra += f" | STAGING LEFT {staging}" if staging else ""
    return obs + extra, ok and not leaked and not changed and not staging


@case("remove exits 2 'symbolic link', tombstone pending; after rm outside: exit 0, all gone")
def c06_remove_through_run_symlink(ctx: Ctx):
    """runs/<name> is a symbolic link to a run folder outside the forest."""
    f = ctx.forest()
    name = manifest(f)["experts"][0]["name"]
    outside = ctx.dir / "elsewhere-run"
    shutil.move(f / "runs" / name, outside)
    os.symlink(outside, f / "runs" / name)
    r = cli("forest", "remove", "--forest", f, "--expert", name)
    obs, ok = refused(r, "symbolic link")
    problems = []
    if "removed expert" in r.text:
        problems.append("printed 'removed expert'")
    if not (outside / "model").is_dir():
        problems.append("OUTSIDE DELETED")
    tomb = [t for t in manifest(f).get("removed", []) if t.get("name") == name]
    if not (tomb and tomb[0].get("state") == "pending"):
        problems.append(f"tombstone {tomb}")
    shutil.rmtree(outside)  # the owner deletes what lies outside; the dangling link is elmforest's
    r2 = cli("forest", "remove", "--forest", f, "--expert", name)
    if not ok_run(r2):
        problems.append(f"re-run rc={r2.rc}: {short(r2.error_line, 60)}")
    left = [str(p) for a in ("experts", "runs", "branches") if os.path.lexists(p := f / a / name)]
    if left:
        problems.append(f"left {left}")
    obs += f"; re-run rc={r2.rc}" + (f" | {'; '.join(problems)}" if problems else "")
    return obs, ok and not problems


@case("fsck exits 0 'finished removing'; runs/ and experts/ gone; remove again exits 0")
def c07_kill_during_remove(ctx: Ctx):
    """SIGKILL inside `Forest.remove` just after the tombstone is written (shutil.rmtree kills itself)."""
    f = ctx.forest()
    name = manifest(f)["experts"][1]["name"]
    script = textwrap.dedent(
        f"""
        import os, shutil, signal
        from elmforest.forest.manifest import Forest
        def killed(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        shutil.rmtree = killed
        Forest.load({str(f)!r}).remove({name!r})
        """
    )
    p = python(script)
    if p.returncode != -signal.SIGKILL:
        return f"the kill did not land (rc {p.returncode}): {short(p.stderr, 80)}", False
    if not (f / "runs" / name).is_dir():
        return "the kill landed after runs/ was already deleted: nothing to test", False
    r = cli("forest", "fsck", "--forest", f)
    problems = [] if ok_run(r) and f"finished removing expert {name}" in r.out else [f"fsck rc={r.rc}"]
    left = [a for a in ("runs", "experts") if os.path.lexists(f / a / name)]
    if left:
        problems.append(f"left {left}")
    r2 = cli("forest", "remove", "--forest", f, "--expert", name)
    if not ok_run(r2) or "no expert named" in r2.text:
        problems.append(f"remove again rc={r2.rc}: {short(r2.error_line, 60)}")
    fixed = next((ln for ln in r.out.splitlines() if "finished removing" in ln), r.error_line)
    obs = f"fsck rc={r.rc}: {short(fixed, 70)}; remove again rc={r2.rc}"
    return obs + (f" | {problems}" if problems else ""), not problems


@case("average holding it deleted; average with weight 0 kept")
def c08_remove_deletes_merged_copies(ctx: Ctx):
    """`forest average --out A` (all experts) and `--out B --weights <name>=0,...`, then remove <name>."""
    f = ctx.forest()
    names = [e["name"] for e in manifest(f)["experts"]]
    a, b = ctx.dir / "avg-all", ctx.dir / "avg-without"
    w = ",".join(f"{n}={0 if n == names[0] else 1}" for n in names)
    r1 = cli("forest", "average", "--forest", f, "--out", a)
    r2 = cli("forest", "average", "--forest", f, "--out", b, "--weights", w)
    if not (ok_run(r1) and ok_run(r2)):
        return f"average failed: rc {r1.rc}/{r2.rc} {short((r1 if r1.rc else r2).error_line, 60)}", False
    r = cli("forest", "remove", "--forest", f, "--expert", names[0])
    gone, kept = not a.exists(), (b / "model.safetensors").is_file()
    obs = f"remove rc={r.rc}; A {'deleted' if gone else 'STILL THERE'}; B {'kept' if kept else 'DELETED'}"
    return obs, ok_run(r) and gone and kept


# == training under kills and corruption =====================================================================
@case("5 SIGKILLs + restarts: final weights bit-identical; no temporaries left")
def c09_sigkill_training(ctx: Ctx):
    """`train --set train.steps=60 --set train.ckpt_every=5`, SIGKILLed 5 times at random moments and
    restarted each time: first while it starts up, then at a random point of a checkpoint interval."""
    args = ["--shards", S.shards, *TINY_RUN, "--set", "train.steps=60", "--set", "train.ckpt_every=5"]
    straight, run = ctx.dir / "straight", ctx.dir / "run"
    r = cli("train", "--out", straight, *args)
    if not ok_run(r):
        return f"uninterrupted run failed rc={r.rc}: {short(r.error_line, 60)}", False
    interval = json.loads((straight / "summary.json").read_text())["wall_s"] / 12  # between checkpoints
    rng = random.Random(SEED)

    def newest() -> int:
        ck = run / "checkpoints"
        steps = [int(p.name[5:]) for p in ck.iterdir() if p.name.startswith("step-")] if ck.is_dir() else []
        return max(steps, default=0)

    def wait(p, until) -> None:
        t0 = time.monotonic()
        while not until() and p.poll() is None and time.monotonic() - t0 < 120:
            time.sleep(0.005)

    kills, at = 0, []
    for i in range(12):  # 5 kills; a restart that finishes before its kill is not one
        if kills == 5:
            break
        base = newest()
        p = start("train", "--out", run, *args, log=ctx.dir / "killed-runs.log")
        if i == 0:
            time.sleep(rng.uniform(0.3, 2.0))  # during imports, setup or the first steps
        else:  # a random point between the next checkpoint and the one after (the machine's speed varies)
            wait(p, lambda b=base: newest() > b)
            c1, t1, delay = newest(), time.monotonic(), rng.uniform(0, 1) * interval
            wait(p, lambda c=c1, t=t1, d=delay: newest() > c or time.monotonic() - t >= d)
            if newest() > c1:  # a whole interval went by sooner than thought: that is the interval
                interval = time.monotonic() - t1
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
            at.append(newest())
        p.wait()
    r = cli("train", "--out", run, *args)
    if not ok_run(r):
        return f"{kills} kills; final run rc={r.rc}: {short(r.error_line, 70)}", False
    same, how = same_weights(run / "model" / "model.safetensors", straight / "model" / "model.safetensors")
    temps = dot_entries(run) + dot_entries(run / "checkpoints")
    resumed = json.loads((run / "summary.json").read_text()).get("resumed_from")
    obs = f"{kills} kills (newest checkpoint at each: {at}); final run resumed from {resumed}; {how}"
    obs += f" | TEMPORARIES LEFT {temps}" if temps else "; no temporaries left"
    return obs, kills == 5 and same and not temps


@case("rerun exits 0, 'resuming from step-00000010', corrupt-* kept, weights identical")
def c10_corrupt_newest_checkpoint(ctx: Ctx):
    """A flipped byte in the middle of checkpoints/step-00000020/model.safetensors of a paused run."""
    args = ["--shards", S.shards, *TINY_RUN, "--set", "train.steps=30", "--set", "train.ckpt_every=10"]
    args += ["--set", "train.keep_checkpoints=3"]
    straight, run = ctx.dir / "straight", ctx.dir / "run"
    r0 = cli("train", "--out", straight, *args)
    r1 = cli("train", "--out", run, *args, "--set", "train.stop_at=20")
    if not (ok_run(r0) and ok_run(r1)):
        return f"setup runs failed rc {r0.rc}/{r1.rc}", False
    w = run / "checkpoints" / "step-00000020" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    r = cli("train", "--out", run, *args)
    aside = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("corrupt-step-00000020-")]
    said = "resuming from step-00000010" in r.err
    same, how = same_weights(run / "model" / "model.safetensors", straight / "model" / "model.safetensors")
    warn = next((ln for ln in r.err.splitlines() if "warning" in ln), r.error_line)
    obs = f"rc={r.rc}; {short(warn, 60)}; aside {aside}; {how}"
    return obs, ok_run(r) and said and len(aside) == 1 and same


@case("resume exits 2 naming 'fingerprint' and the shards path")
def c11_shards_rebuilt_under_paused_run(ctx: Ctx):
    """A run paused at step 6; its shards are rebuilt at the same path from another corpus (--overwrite)."""
    shards = ctx.dir / "shards"
    shutil.copytree(S.shards, shards)
    args = ["--shards", shards, *TINY_RUN, "--set", "train.steps=12"]
    r = cli("train", "--out", ctx.dir / "run", *args, "--set", "train.stop_at=6")
    other = make_corpus(ctx.dir / "other-corpus", 60, seed=2)
    b = cli("shards", "build", "--data", other, "--tokenizer", S.tok, "--out", shards, "--overwrite")
    if not (ok_run(r) and ok_run(b)):
        return f"setup failed rc {r.rc}/{b.rc}", False
    return refused(cli("train", "--out", ctx.dir / "run", *args), "fingerprint", str(shards))


# == bad input data ==========================================================================================
@case("tokenizer train exits 2; no tokenizer written")
def c12_tokenizer_on_empty_file(ctx: Ctx):
    """`tokenizer train` on an empty JSONL file."""
    data = ctx.dir / "empty.jsonl"
    data.write_text("")
    out = ctx.dir / "tok"
    obs, ok = refused(cli("tokenizer", "train", "--data", data, "--out", out, "--vocab-size", 400))
    return obs + ("" if empty_or_missing(out) else " | TOKENIZER WRITTEN"), ok and empty_or_missing(out)


@case("shards build exits 2 naming x.jsonl; nothing written")
def c13_dangling_symlink_in_data(ctx: Ctx):
    """A dangling x.jsonl symbolic link beside good data files."""
    data = ctx.dir / "corpus"
    shutil.copytree(S.corpus, data)
    os.symlink(ctx.dir / "nowhere.jsonl", data / "x.jsonl")
    out = ctx.dir / "shards"
    r = cli("shards", "build", "--data", data, "--tokenizer", S.tok, "--out", out, "--no-progress")
    obs, ok = refused(r, "x.jsonl")
    return obs, ok and empty_or_missing(out)


@case("shards build of the assign output: no skipped bad records")
def c14_cluster_report_is_not_data(ctx: Ctx):
    """`cluster fit` (k=2), `cluster assign`, then `shards build` of the assign output folder."""
    k, a, sh = ctx.dir / "clusterer", ctx.dir / "assigned", ctx.dir / "shards"
    runs = [
        cli("cluster", "fit", "--data", S.corpus, "--k", 2, "--out", k, "--sample-docs", 200),
        cli("cluster", "assign", "--clusterer", k, "--data", S.corpus, "--out", a, "--no-progress"),
        cli("shards", "build", "--data", a, "--tokenizer", S.tok, "--out", sh, "--no-progress"),
    ]
    bad = next((r for r in runs if not ok_run(r)), None)
    if bad:
        return f"{bad.argv[0]} {bad.argv[1]} rc={bad.rc}: {short(bad.error_line, 70)}", False
    line = next((ln for ln in runs[2].out.splitlines() if ln.startswith("read ")), "")
    return short(line), bool(line) and "skipped" not in line and "from 2 file(s)" in line


@case("A intact and matching its report; the killed one's workers gone within 5 s")
def c15_kill_cluster_assign(ctx: Ctx):
    """SIGKILL `cluster assign --workers 2` (3000 documents) over a complete earlier output A, once its
    staging folder appears and its workers are up."""
    data = make_corpus(ctx.dir / "big", 1000, seed=5, words_per_doc=(600, 1400))  # 18 MB
    k, a = ctx.dir / "clusterer", ctx.dir / "A"
    assign = ["cluster", "assign", "--clusterer", k, "--data", data, "--out", a]
    assign += ["--workers", 2, "--no-progress"]
    r0 = cli("cluster", "fit", "--data", data, "--k", 2, "--out", k, "--sample-docs", 200)
    r1 = cli(*assign)
    if not (ok_run(r0) and ok_run(r1)):
        return f"setup failed rc {r0.rc}/{r1.rc}", False
    before = {p.name: p.read_bytes() for p in a.iterdir()}
    p = start(*assign, log=ctx.dir / "killed-assign.log")
    t0 = time.monotonic()

    def staged() -> list[Path]:
        return [q for q in ctx.dir.iterdir() if q.name.startswith(".A.")]

    def children(pid: int) -> set[int]:
        kids = set()
        for t in Path(f"/proc/{pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                kids |= {int(x) for x in t.read_text().split()}
        return kids

    while p.poll() is None and not staged() and time.monotonic() - t0 < 60:
        time.sleep(0.002)
    t1 = time.monotonic()
    while p.poll() is None and len(children(p.pid)) < 2 and time.monotonic() - t1 < 1.5:
        time.sleep(0.002)
    time.sleep(random.Random(SEED).uniform(0, 0.1))  # the workers are embedding, the parent writing
    kids = children(p.pid)
    if p.poll() is not None:
        return f"assign finished (rc {p.returncode}) before the kill: make the corpus larger", False
    p.send_signal(signal.SIGKILL)
    killed_after = time.monotonic() - t0
    p.wait()

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"

    t2 = time.monotonic()
    while any(alive(c) for c in kids) and time.monotonic() - t2 < 5:
        time.sleep(0.05)
    orphans = [c for c in kids if alive(c)]
    for c in orphans:  # do not leave them behind us either
        with contextlib.suppress(OSError):
            os.kill(c, signal.SIGKILL)
    after = {q.name: q.read_bytes() for q in a.iterdir()}
    report = json.loads(after.get("report.meta.json", b"{}"))
    lines = [after.get(f"cluster{j}.jsonl", b"").count(b"\n") for j in range(len(report.get("sizes", [])))]
    consistent = bool(lines) and lines == report["sizes"] and sum(lines) == report["documents"] == 3000
    left_by_kill = len(staged())
    r2 = cli(*assign)  # the next run removes what the killed one left
    obs = (
        f"killed after {killed_after:.1f}s with {len(kids)} worker(s); A "
        f"{'unchanged' if after == before else 'CHANGED'}, lines {lines} vs report {report.get('sizes')}; "
        f"{'no worker left' if not orphans else f'ORPHANS {orphans}'}; {left_by_kill} staging left, "
        f"{len(staged())} after a re-run (rc={r2.rc})"
    )
    if not left_by_kill:
        obs += " | THE KILL CAME AFTER THE SWAP: nothing tested"
    landed = bool(kids) and left_by_kill > 0
    return obs, landed and after == before and consistent and not orphans and ok_run(r2) and not staged()


@case("eval --model exits 2, one line naming the weights; no OverflowError")
def c16_nan_weights(ctx: Ctx):
    """0xFF bytes over part of a float32 tensor of an expert's model.safetensors (NaNs)."""
    model = ctx.dir / "model"
    shutil.copytree(S.forest / "experts" / "code", model)
    w = model / "model.safetensors"
    start_, header = safetensors_header(w)
    _, info = max(
        ((k, v) for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32"),
        key=lambda kv: kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0],
    )
    lo, hi = info["data_offsets"]
    data = bytearray(w.read_bytes())
    mid = start_ + (lo + hi) // 2
    data[mid : mid + 256] = b"\xff" * 256
    w.write_bytes(bytes(data))
    r = cli("eval", "--model", model, "--data", S.shards, "--no-progress")
    obs, ok = refused(r, str(model))
    return obs, ok and "OverflowError" not in r.text


@case("train / forest fsck remove dead-pid temporaries, keep a live one")
def c17_stale_temporaries(ctx: Ctx):
    """`.model.tmp~HOST~DEADPID` in a run folder and `.forest.json.tmp~HOST~DEADPID~ab12` in a forest,
    beside ones named with this (live) process's pid."""
    dead, live = dead_pid(), os.getpid()
    run = ctx.dir / "run"
    run.mkdir()
    stale_run, live_run = run / f".model.tmp~{HOST}~{dead}", run / f".model.tmp~{HOST}~{live}"
    for d in (stale_run, live_run):
        d.mkdir()
        (d / "model.safetensors").write_text("half")
    r1 = cli("train", "--out", run, "--shards", S.shards, *TINY_RUN, "--set", "train.steps=6")
    f = ctx.forest()
    stale_f, live_f = f / f".forest.json.tmp~{HOST}~{dead}~ab12", f / f".forest.json.tmp~{HOST}~{live}~cd34"
    for p in (stale_f, live_f):
        p.write_text("{half")
    r2 = cli("forest", "fsck", "--forest", f)
    problems = [f"train rc={r1.rc}"] if not ok_run(r1) else []
    problems += [f"fsck rc={r2.rc}"] if not ok_run(r2) else []
    problems += [f"STALE KEPT {p.name}" for p in (stale_run, stale_f) if os.path.lexists(p)]
    problems += [f"LIVE REMOVED {p.name}" for p in (live_run, live_f) if not os.path.lexists(p)]
    obs = f"train rc={r1.rc}, fsck rc={r2.rc}; dead pid {dead}'s 2 gone, live pid's 2 kept"
    return (obs if not problems else f"{problems}"), not problems


# == the file system says no =================================================================================
@case("shards build exits 2 'No space left' naming the path; nothing left, space freed")
def c18_disk_full(ctx: Ctx):
    """`shards build` into a 3 MB tmpfs of a corpus that tokenizes to more than that."""
    data = random_letters_corpus(ctx.dir / "big" / "noise.jsonl", 3.5)
    disk = ctx.dir / "full"
    with tmpfs(disk, "size=3m") as mounted:
        if not mounted:
            return "skipped (cannot mount tmpfs)", True
        used = df_used(disk)
        out = disk / "shards"
        r = cli("shards", "build", "--data", data, "--tokenizer", S.tok, "--out", out, "--no-progress")
        obs, ok = refused(r, str(disk), "No space left")
        left = sorted(p.name for p in disk.iterdir())
        freed = df_used(disk) - used
        obs += f"; left {left}, {freed} bytes still used"
        return obs, ok and not left and freed <= 0


@case("tokenizer train --out RO/tok exits 2 with one line")
def c19_read_only_output(ctx: Ctx):
    """`tokenizer train` into a read-only tmpfs (root ignores chmod)."""
    ro = ctx.dir / "ro"
    with tmpfs(ro, "ro,size=1m") as mounted:
        if not mounted:
            return "skipped (cannot mount tmpfs)", True
        r = cli("tokenizer", "train", "--data", S.corpus, "--out", ro / "tok", "--vocab-size", 400)
        return refused(r, str(ro / "tok"))


def _bad_start(ctx: Ctx, *extra, needle: str):
    run = ctx.dir / "run"
    r = cli("train", "--shards", S.shards, "--out", run, *extra, "--set", "train.steps=6", "--no-progress")
    obs, ok = refused(r, needle)
    clean = empty_or_missing(run)
    return obs + ("" if clean else f" | RUN DIR HOLDS {sorted(p.name for p in run.iterdir())}"), ok and clean


def _init_checkpoint(ctx: Ctx) -> Path:
    ck = ctx.dir / "ck"
    shutil.copytree(S.forest / "runs" / "dense" / "model", ck)
    return ck


@case("exit 2, one line naming the file; run dir empty")
def c20a_truncated_config(ctx: Ctx):
    """`train --config C` with C a run_config.json cut in half."""
    c = ctx.dir / "run_config.json"
    text = (S.forest / "runs" / "dense" / "run_config.json").read_text()
    c.write_text(text[: len(text) // 2])
    return _bad_start(ctx, "--config", c, needle=str(c))


@case("exit 2, one line naming the file; run dir empty")
def c20b_init_from_truncated_config(ctx: Ctx):
    """`train --init-from CK` where CK/config.json is cut in half."""
    ck = _init_checkpoint(ctx)
    text = (ck / "config.json").read_text()
    (ck / "config.json").write_text(text[: len(text) // 2])
    return _bad_start(ctx, "--preset", "tiny", "--init-from", ck, needle=str(ck / "config.json"))


@case("exit 2, one line naming the weights; run dir empty")
def c20c_init_from_weights_missing(ctx: Ctx):
    """`train --init-from CK` where CK/model.safetensors is missing."""
    ck = _init_checkpoint(ctx)
    (ck / "model.safetensors").unlink()
    return _bad_start(ctx, "--preset", "tiny", "--init-from", ck, needle=str(ck))


@case("exit 2, one line naming the file; run dir empty")
def c20d_init_from_weights_truncated(ctx: Ctx):
    """`train --init-from CK` where CK/model.safetensors is cut in half."""
    ck = _init_checkpoint(ctx)
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return _bad_start(ctx, "--preset", "tiny", "--init-from", ck, needle=str(w))


@case("exit 2, one line naming the file; run dir empty")
def c20e_init_from_weights_bad_header(ctx: Ctx):
    """`train --init-from CK` where the 8-byte header length of CK/model.safetensors is garbage."""
    ck = _init_checkpoint(ctx)
    w = ck / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[:8] = struct.pack("<Q", 0x7FFF_FFFF_FFFF)
    w.write_bytes(bytes(data))
    return _bad_start(ctx, "--preset", "tiny", "--init-from", ck, needle=str(w))


@case("forest list exits 2 naming forest.json")
def c21a_manifest_is_an_array(ctx: Ctx):
    """forest.json holds a JSON array."""
    f = ctx.forest()
    write_manifest(f, [manifest(f)])
    return refused(cli("forest", "list", "--forest", f), str(f / "forest.json"))


@case("forest list exits 2 naming forest.json")
def c21b_manifest_truncated(ctx: Ctx):
    """forest.json cut in half."""
    f = ctx.forest()
    text = (f / "forest.json").read_text()
    (f / "forest.json").write_text(text[: len(text) // 2])
    return refused(cli("forest", "list", "--forest", f), str(f / "forest.json"))


@case("exit 2 naming code=abc")
def c22a_average_bad_weight(ctx: Ctx):
    """`forest average --weights code=abc`."""
    f = ctx.forest()
    out = ctx.dir / "avg"
    r = cli("forest", "average", "--forest", f, "--out", out, "--weights", "code=abc")
    obs, ok = refused(r, "code=abc")
    return obs + ("" if not out.exists() else " | OUTPUT WRITTEN"), ok and not out.exists()


@case("exit 2 naming --batch-size")
def c22b_eval_batch_size_zero(ctx: Ctx):
    """`eval --batch-size 0`."""
    r = cli("eval", "--model", S.forest / "experts" / "code", "--data", S.shards, "--batch-size", 0)
    return refused(r, "--batch-size", one_line=False)


@case("exit 2")
def c22c_generate_negative_tokens(ctx: Ctx):
    """`generate --max-new-tokens -1`."""
    r = cli("generate", "--forest", S.forest, "--prompt", "the lord", "--max-new-tokens", -1)
    return refused(r, "--max-new-tokens", one_line=False)


@case("eval says the train-only domain is missing from the test split")
def c23_domain_without_test_documents(ctx: Ctx):
    """Shards of the corpus plus a domain `solo` of one document whose id hashes into train."""
    from elmforest.data.splits import SplitSpec

    data = ctx.dir / "corpus"
    shutil.copytree(S.corpus, data)
    doc_id = next(f"solo/{i}" for i in range(1000) if SplitSpec(0.1, 0.1).assign(f"solo/{i}") == "train")
    rec = {"id": doc_id, "domain": "solo", "text": " ".join(DOMAIN_WORDS["legal"] * 5)}
    (data / "solo.jsonl").write_text(json.dumps(rec) + "\n")
    sh = ctx.dir / "shards"
    b = cli("shards", "build", "--data", data, "--tokenizer", S.tok, "--out", sh, *SPLIT, "--no-progress")
    if not ok_run(b):
        return f"shards build rc={b.rc}: {short(b.error_line, 70)}", False
    r = cli("eval", "--model", S.forest / "experts" / "code", "--data", sh, "--no-progress")
    said = [ln.strip() for ln in r.text.splitlines() if "solo" in ln]
    ok = ok_run(r) and any("no test documents" in ln for ln in said)
    return f"rc={r.rc}; " + (short(" / ".join(said), 100) if said else "SOLO NEVER MENTIONED"), ok


@case("exit 0 and prints 'paused'")
def c24_stop_at_pauses(ctx: Ctx):
    """`train --set train.stop_at=10`."""
    run = ctx.dir / "run"
    steps = ["--set", "train.steps=20", "--set", "train.stop_at=10"]
    r = cli("train", "--out", run, "--shards", S.shards, *TINY_RUN, *steps)
    line = next((ln for ln in r.out.splitlines() if "paused" in ln), r.error_line)
    return f"rc={r.rc}: {short(line, 100)}", ok_run(r) and "paused" in r.out


@case("forest train exits 2 naming 'my data ✓' before training (no runs/)")
def c25_unnameable_domain(ctx: Ctx):
    """Shards of a folder with `my data ✓.jsonl` (records carry no domain: the file name is the domain)."""
    data = ctx.dir / "data"
    data.mkdir()
    with open(data / "my data ✓.jsonl", "w") as f:
        rng = random.Random(3)
        for _ in range(60):
            f.write(
                json.dumps({"text": " ".join(rng.choice(DOMAIN_WORDS["code"]) for _ in range(60))}) + "\n"
            )
    sh = ctx.dir / "shards"
    b = cli("shards", "build", "--data", data, "--tokenizer", S.tok, "--out", sh, "--no-progress")
    if not ok_run(b):
        return f"shards build rc={b.rc}: {short(b.error_line, 70)}", False
    forest = ctx.dir / "forest"
    obs, ok = refused(cli("forest", "train", "--forest", forest, "--shards", sh, *TINY_FOREST), "my data ✓")
    runs = (forest / "runs").exists()
    return obs + (" | runs/ CREATED" if runs else ""), ok and not runs


@case("exit 2 before training; then a valid config in the same --out succeeds")
def c26_seq_len_beyond_position_table(ctx: Ctx):
    """`train --preset tiny --set train.seq_len=4096` (position table 2048)."""
    run = ctx.dir / "run"
    base = ["train", "--out", run, "--shards", S.shards, *TINY_RUN, "--set", "train.steps=6"]
    obs, ok = refused(cli(*base, "--set", "train.seq_len=4096"), "4096")
    trained = (run / "checkpoints").exists() or (run / "metrics.jsonl").exists()
    r = cli(*base)
    obs += f"; valid re-run rc={r.rc}" + (" | TRAINING STARTED" if trained else "")
    return obs, ok and not trained and ok_run(r)


@case("the expert's run_config.json: preset tiny, seq_len 64 (the seed's own)")
def c27_checkpoint_seed_config(ctx: Ctx):
    """`forest seed --from-checkpoint F/runs/dense/model` into a new forest, then `forest expert`."""
    nf = ctx.dir / "forest"
    ck = S.forest / "runs" / "dense" / "model"
    r1 = cli("forest", "seed", "--forest", nf, "--shards", S.shards, "--from-checkpoint", ck)
    expert = ["forest", "expert", "--forest", nf, "--shards", S.shards, "--domain", "code"]
    r2 = cli(*expert, "--set", "train.steps=6", "--no-progress")
    if not (ok_run(r1) and ok_run(r2)):
        return f"seed rc={r1.rc}, expert rc={r2.rc}: {short((r1 if r1.rc else r2).error_line, 70)}", False
    cfg = json.loads((nf / "runs" / "code" / "run_config.json").read_text())
    preset, t = cfg["model"]["preset"], cfg["train"]
    obs = f"preset {preset}, seq_len {t['seq_len']}, batch {t['batch_size']}, lr {cfg['optim']['lr']}"
    return obs, (preset, t["seq_len"]) == ("tiny", 64)


@case("0644 for the run's model, a checkpoint's files, an expert's weights")
def c28_weight_file_modes(ctx: Ctx):
    """Weights written under umask 022."""
    run = ctx.dir / "run"
    steps = ["--set", "train.steps=6", "--set", "train.ckpt_every=3"]
    r = cli("train", "--out", run, "--shards", S.shards, *TINY_RUN, *steps)
    if not ok_run(r):
        return f"train rc={r.rc}", False
    ck = sorted((run / "checkpoints").iterdir())[-1]
    files = [
        run / "model" / "model.safetensors",
        *sorted(ck.iterdir()),
        S.forest / "experts" / "code" / "model.safetensors",
    ]
    modes = {str(p.relative_to(p.parents[1])): oct(p.stat().st_mode & 0o777) for p in files}
    bad = {k: v for k, v in modes.items() if v != "0o644"}
    return (f"{len(files)} files all 0644" if not bad else f"NOT 0644: {bad}"), not bad


@case("forest train exits 0, the expert is back; fsck exits 0")
def c29_expert_dir_deleted(ctx: Ctx):
    """experts/code deleted from a trained forest; `forest train` with the setup's arguments again."""
    f = ctx.forest()
    shutil.rmtree(f / "experts" / "code")
    r = cli("forest", "train", "--forest", f, "--shards", S.shards, *TINY_FOREST)
    back = (f / "experts" / "code" / "model.safetensors").is_file()
    r2 = cli("forest", "fsck", "--forest", f)
    obs = f"train rc={r.rc}, expert {'back' if back else 'MISSING'}, fsck rc={r2.rc}"
    return obs + ("" if ok_run(r) else f": {short(r.error_line, 60)}"), ok_run(r) and back and ok_run(r2)


@case("forest init --clusterer exits 2; nothing copied")
def c30_crafted_clusterer(ctx: Ctx):
    """A clusterer whose clusterer.json names its arrays file `../secret.safetensors`."""
    k = ctx.dir / "k2" / "clusterer"
    r = cli("cluster", "fit", "--data", S.corpus, "--k", 2, "--out", k, "--sample-docs", 200)
    if not ok_run(r):
        return f"cluster fit rc={r.rc}", False
    shutil.copy(k / "arrays.safetensors", k.parent / "secret.safetensors")  # loads fine if followed
    meta = json.loads((k / "clusterer.json").read_text())
    meta["arrays"]["file"] = "../secret.safetensors"
    (k / "clusterer.json").write_text(json.dumps(meta))
    x = ctx.dir / "x"
    obs, ok = refused(cli("forest", "init", "--forest", x, "--clusterer", k), "../secret.safetensors")
    copied = (x / "clusterer").exists()
    return obs + (" | CLUSTERER COPIED" if copied else ""), ok and not copied


# -- main ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="work folder to keep (default: a temporary folder, removed at the end)")
    ap.add_argument("--only", help="run only the cases whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    args = ap.parse_args(argv)
    cases = [c for c in CASES if not args.only or args.only in c.name]
    if args.list:
        for c in cases:
            print(f"{c.name:36s} {' '.join(c.doc.split())}\n{'':36s} expect: {c.expected}")
        return 0
    if not cases:
        print(f"no case matches {args.only!r}", file=sys.stderr)
        return 2
    os.umask(0o022)
    global S, SEED
    SEED = args.seed
    work = Path(args.out or tempfile.mkdtemp(prefix="elmforest-adversarial-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    rows = []
    try:
        S = Setup(work / "setup")
        S.build()
        for c in cases:
            ctx = Ctx(work / "cases" / c.name)
            if ctx.dir.exists():
                shutil.rmtree(ctx.dir)
            ctx.dir.mkdir(parents=True)
            LOG.clear()
            TIDY.clear()
            TIDY.update({str(ctx.dir): "$C", str(S.root): "$S"})
            t = time.perf_counter()
            try:
                observed, ok = c.fn(ctx)
            except Exception as e:  # a broken case is a failure, not the end of the run
                observed, ok = f"case crashed: {type(e).__name__}: {e}", False
            observed = short(observed, 400)
            (ctx.dir / "commands.log").write_text("".join(LOG))
            status = "SKIP" if ok and observed.startswith("skipped") else ("PASS" if ok else "FAIL")
            rows.append((c, observed, status, time.perf_counter() - t, list(LOG)))
            print(f"  {status} {c.name} ({time.perf_counter() - t:.0f}s): {short(observed, 140)}", flush=True)
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    _print_table(rows)
    fails = [r for r in rows if r[2] == "FAIL"]
    for c, observed, _, _, log in fails:
        print(f"\n--- FAIL {c.name}: {c.doc}\nexpected: {c.expected}\nobserved: {observed}\n{''.join(log)}")
    n = {s: sum(r[2] == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}
    print(
        f"\n{n['PASS']} passed, {n['FAIL']} failed, {n['SKIP']} skipped in {time.perf_counter() - t_all:.0f}s"
    )
    return 1 if fails else 0


def _print_table(rows) -> None:
    w_name = max(len(r[0].name) for r in rows)
    w_exp = min(60, max(len(r[0].expected) for r in rows))
    print(f"\n{'case':{w_name}}  {'expected':{w_exp}}  {'ok':4}  observed ($C = case folder, $S = setup)")
    print(f"{'-' * w_name}  {'-' * w_exp}  ----  {'-' * 40}")
    for c, observed, status, _, _ in rows:
        print(f"{c.name:{w_name}}  {short(c.expected, w_exp):{w_exp}}  {status:4}  {short(observed, 150)}")


if __name__ == "__main__":
    sys.exit(main())
