"""What the run report reads: a quickstart's output dir (results.json, its forests, its merged MoEs)
or a bare forest dir, and each run's metrics. Only reads: a report never changes what it describes.

Anything missing is recorded as a sentence for the page ("absent"), never an error: a forest that
is still training, or one whose experts came from elsewhere, still gets a report of what exists."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from elmforest.forest.manifest import Forest
from elmforest.launch.jobs import DENSE_TUNED_RUN
from elmforest.train.checkpoint import newest_step
from elmforest.utils.errors import ElmforestError, NotFound, UserError
from elmforest.utils.io import read_json, read_jsonl


@dataclass
class Sources:
    root: Path
    kind: str  # "quickstart" or "forest"
    results: dict | None
    forests: list[Forest]  # the main forest first, then ablation forests (random splits, clusters)
    moes: list[Path]  # merged MoE dirs (elmforest_moe.json) made from the main forest
    absent: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # experts opted out after results.json was written

    @property
    def main(self) -> Forest | None:
        """The forest results.json's ledger and MoEs belong to (a quickstart's forest/, or the forest dir
        itself); None where it could not be read: an ablation forest is never taken for it."""
        if self.forests and (self.kind == "forest" or self.forests[0].root == self.root / "forest"):
            return self.forests[0]
        return None


def locate(path: str | Path) -> Sources:
    """Read a quickstart output dir or a forest dir; which one is decided by what it holds."""
    root = Path(path)
    if not root.is_dir():
        raise NotFound(f"{root}: no such directory (give a quickstart --out dir or a forest dir)")
    if (root / "forest.json").is_file():
        src = Sources(root, "forest", None, [Forest.load(root)], [])
        src.absent.append(
            f"{root} is a forest dir, not a quickstart output dir: no results.json, so no results tables, "
            "results plots, priors or posteriors (run `elmforest quickstart`, or `elmforest report` on its "
            "--out dir, for those)"
        )
    elif (root / "results.json").is_file() or (root / "forest" / "forest.json").is_file():
        results = _results(root / "results.json")
        forests, unreadable, held = [], [], set()
        for d in _forest_dirs(root):
            held.add(d.name)
            try:
                forests.append(Forest.load(d))
            except (ElmforestError, OSError) as e:  # one broken ablation forest must not lose the page
                unreadable.append(f"{d}: not readable as a forest ({e}); left out")
        src = Sources(root, "quickstart", results, forests, [], absent=unreadable)
        if results is None:
            src.absent.append(
                f"{root / 'results.json'}: not written yet (the quickstart has not finished its "
                "evaluation): no results tables, results plots, priors or posteriors"
            )
        if not (root / "forest" / "forest.json").is_file():
            src.absent.append(f"{root / 'forest'}: no forest (forest.json) beside the results")
        for name, rows in _results_forests(results or {}):
            if not any(h == name or (name.endswith("-") and h.startswith(name)) for h in held):
                src.absent.append(
                    f"{root / name}{'K' if name.endswith('-') else ''}: no forest, yet results.json has its "
                    f"rows ({rows}): no lineage, curves or ledger for them"
                )
        if src.main is not None and results is not None:
            src.stale = opted_out_since(root / "results.json", src.main, results)
    else:
        raise UserError(
            f"{root}: neither a quickstart output dir (results.json or forest/forest.json in it) nor a "
            "forest dir (forest.json in it)"
        )
    src.moes, gone = _moe_dirs(root if src.kind == "quickstart" else None, [src.main] if src.main else [])
    src.absent += gone.values()
    for m in sorted((src.results or {}).get("methods") or {}):  # rows of a merged MoE whose folder is gone
        folder = m.replace("_", "-")
        if m.startswith("moe") and not any(p.name == folder for p in src.moes):
            if folder not in gone:  # said already, from the forest's record
                src.absent.append(
                    f"{root / folder}: no merged MoE, yet results.json has its row ({m}): no routing or "
                    "training curve for it"
                )
    return src


def opted_out_since(path: Path, forest: Forest, results: dict | None = None) -> list[str]:
    """Experts opted out of `forest` after `path` was written: its numbers still include them. Those
    its ledger names (the file's content, which a copy keeps), else those removed after its file time."""
    import calendar
    import time

    ledger = ((results or {}).get("compute") or {}).get("ledger") or []
    held = {p.get("name") for p in ledger if isinstance(p, dict) and p.get("phase") == "expert"}
    written = path.stat().st_mtime
    out = []
    for r in forest.data.get("removed", []):
        if r.get("name") in held and r.get("name") not in forest.names:
            out.append(r["name"])
            continue
        try:
            when = calendar.timegm(time.strptime(r.get("removed", ""), "%Y-%m-%dT%H:%M:%SZ"))
        except (TypeError, ValueError):
            continue
        if when >= int(written):
            out.append(r["name"])
    return out


def _results(path: Path) -> dict | None:
    if path.exists() and not path.is_file():  # (not "not written yet": something else is there)
        raise UserError(f"{path}: not a file (a quickstart writes its results there)")
    if not path.is_file():
        return None
    r = read_json(path)
    if not isinstance(r, dict) or not isinstance(r.get("methods"), dict):
        raise UserError(f"{path}: not a quickstart results file (no 'methods' table in it)")
    if problem := _shape_problem(r):
        raise UserError(f"{path}: not a quickstart results file as this version writes it ({problem})")
    return r


def _shape_problem(r: dict) -> str | None:
    """What the page needs of results.json that a hand-edited or foreign file lacks (the quickstart's own
    always has it), said instead of a KeyError from deep inside a table."""

    def number(x) -> bool:  # a BPB may be nan: its cell says so, and the row's best is still shaded
        return isinstance(x, int | float) and not isinstance(x, bool)

    def finite(x) -> bool:  # a nan FLOPs ratio was compute-matched (nan - 1 is not > 0.01), shaded best
        return number(x) and math.isfinite(x)

    for key in ("methods", "ood_methods", "added"):
        table = r.get(key)
        if table is None and key != "methods":
            continue
        if not isinstance(table, dict):
            return f"'{key}' is not a table"
        for m, v in table.items():
            if not isinstance(v, dict) or not isinstance(v.get("domains"), dict):
                return f"{key}.{m} has no 'domains' table"
            if not all(isinstance(x, dict) for x in v["domains"].values()):
                return f"{key}.{m}.domains holds something other than per-domain results"
            if "mean_bpb" not in v:
                return f"{key}.{m} has no 'mean_bpb'"
            if not number(v["mean_bpb"]):
                return f"{key}.{m}.mean_bpb is {v['mean_bpb']!r}, not a number"
            for d, x in v["domains"].items():
                if "bpb" in x and not number(x["bpb"]):  # a plot cannot draw a null
                    return f"{key}.{m}.domains.{d}.bpb is {x['bpb']!r}, not a number"
    compute = r.get("compute")
    if compute is not None:
        if not isinstance(compute, dict):
            return "'compute' is not a table"
        # `over_dense`, `arms`: the X-ELM quickstart's; `inference`: the per-token cost of running a row
        for k in ("methods", "over_dense", "arms", "inference"):
            ratios = compute.get(k) or {}
            if not isinstance(ratios, dict) or not all(finite(x) for x in ratios.values()):
                return f"compute.{k} holds something other than finite numbers"
        if not isinstance(compute.get("ledger", []), list) or not all(
            isinstance(x, dict) for x in compute.get("ledger", [])
        ):
            return "compute.ledger is not a list of rows"
        for k in ("dense_flops", "forest_flops"):
            if compute.get(k) is not None and not finite(compute[k]):
                return f"compute.{k} is {compute[k]!r}, not a finite number"
        for row in compute.get("ledger") or []:
            if any(row.get(k) is not None and not finite(row[k]) for k in ("flops", "tokens")):
                return f"compute.ledger row {row.get('name')!r}: flops and tokens must be finite numbers"
    if "seconds" in r and r["seconds"] is not None and not finite(r["seconds"]):
        return f"seconds is {r['seconds']!r}, not a finite number"
    if not isinstance(r.get("findings") or [], list) or not all(
        isinstance(x, str) for x in r.get("findings") or []
    ):
        return "findings is not a list of sentences"
    if not isinstance(r.get("priors") or {}, dict):
        return "priors is not a table"
    for where, rows in (r.get("priors") or {}).items():  # (None: no such sets)
        if not isinstance(rows or {}, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("prior"), dict) for v in (rows or {}).values()
        ):
            return f"priors.{where} holds something other than per-domain priors"
    return None


def _results_forests(r: dict) -> list[tuple[str, str]]:
    """(forest dir name, the rows that score its experts) beside results.json: the random-split
    ablation's, c-BTM's (`forest-clusters-K...`: a name that starts so) and each X-ELM grouping's."""
    methods = r.get("methods") or {}
    out = [(f"forest-k{k}", f"k{k}_*") for k in r.get("groupings") or {}]
    out += [("forest-random", "random_ensemble")] if "random_ensemble" in methods else []
    out += [("forest-clusters-", "cbtm_top*")] if any(m.startswith("cbtm_top") for m in methods) else []
    return out


def other_runs(root: Path, forests: list[Forest]) -> list[dict]:
    """Run dirs directly in a quickstart dir, outside any forest: X-ELM's dense run continued on the
    language added later (`dense-continued/`)."""
    inside = {f.root.resolve() for f in forests}
    return [
        read_run(d, d.name, "run outside the forests" if d.name != "dense-continued" else ROLE_CONTINUED)
        for d in sorted(root.iterdir())
        if d.is_dir() and d.resolve() not in inside and (d / "metrics.jsonl").is_file()
    ]


ROLE_CONTINUED = "dense run continued on the added language"


def _forest_dirs(root: Path) -> list[Path]:
    main = [root / "forest"] if (root / "forest" / "forest.json").is_file() else []
    others = sorted(d for d in root.glob("forest-*") if (d / "forest.json").is_file())
    return main + others


def _moe_dirs(root: Path | None, forests: list[Forest]) -> tuple[list[Path], dict[str, str]]:
    """The merged MoEs to show, and a sentence for each the forest records but that is not shown (by its
    folder's name): where
    it was merged relative to the forest first (a copied or moved tree holds its own), the absolute
    path recorded only if this forest made what is there (a copy's record names the original's MoE,
    which a page about the copy must not show as its own)."""
    from elmforest.forest.copies import ours, recorded_places

    found = sorted(p for p in root.glob("moe*") if (p / "elmforest_moe.json").is_file()) if root else []
    names, gone = {p.name for p in found}, {}
    for f in forests:  # merged elsewhere but recorded in the manifest (it must delete them on opt-out)
        for o in f.data.get("outputs", []):
            recorded = Path(o["path"])
            if o.get("kind") != "moe" or recorded.name in names:
                continue
            there = [p for p in reversed(recorded_places(f, o)) if (p / "elmforest_moe.json").is_file()]
            here = [p for p in there if ours(f, p, recorded)]  # relative to the forest first
            if here:
                found.append(here[0])
                names.add(here[0].name)
            elif there:
                gone[recorded.name] = (
                    f"{recorded}: a merged MoE the forest records, made by another forest (the one this "
                    "was copied from?): not shown as this one's"
                )
            else:
                gone[recorded.name] = (
                    f"{recorded}: a merged MoE the forest records, not found (nor beside the forest as "
                    f"{o.get('relative', '-')}): no routing or training curve for it"
                )
    return found, gone


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    by_step = {}
    for r in rows:
        if isinstance(r.get("step"), int) and isinstance(r.get(key), (int, float)):
            by_step[r["step"]] = float(r[key])  # a resumed run rewrites steps: the last one counts
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def read_run(run_dir: Path, name: str, role: str) -> dict:
    """A run's curves and totals: training loss per logged step (metrics.jsonl), validation loss
    (valid.jsonl), and its summary.json when it finished."""
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    steps, loss = _series(metrics, "loss")
    valid_steps, valid_loss = _series(read_jsonl(run_dir / "valid.jsonl"), "valid_loss")
    summary = {}
    if (run_dir / "summary.json").is_file():
        s = read_json(run_dir / "summary.json")
        summary = s if isinstance(s, dict) else {}
    last = metrics[-1] if metrics else {}
    return {
        "name": name,
        "role": role,
        "dir": run_dir,
        "steps": steps,
        "loss": loss,
        "valid_steps": valid_steps,
        "valid_loss": valid_loss,
        "done": bool(summary),
        "last_step": summary.get("steps", steps[-1] if steps else None),
        "tokens": summary.get("tokens", last.get("tokens")),
        "flops": summary.get("flops", last.get("flops")),
        "wall_s": summary.get("wall_s", last.get("elapsed_s")),
    }


def forest_runs(forest: Forest) -> tuple[list[dict], list[str]]:
    """The run dirs under the forest's runs/ (the dense run, whose first part is the seed, then each
    expert), and what is absent."""
    runs_dir = forest.root / "runs"
    if not runs_dir.is_dir():
        return [], [f"{runs_dir}: no run directories, so no training curves (experts added from elsewhere?)"]
    names = {e.get("run", f"runs/{e['name']}"): e["name"] for e in forest.experts}
    runs, absent = [], []
    dirs = sorted((d for d in runs_dir.iterdir() if d.is_dir()), key=lambda d: (d.name != "dense", d.name))
    for d in dirs:
        if not (d / "metrics.jsonl").is_file():
            absent.append(f"{d}: no metrics.jsonl (the run has not logged a step)")
            continue
        if d.name == "dense":
            role = "seed, then dense baseline" if forest.data.get("seed") else "dense baseline"
            seed_end = seed_steps(forest)
            last = (read_jsonl(d / "metrics.jsonl") or [{}])[-1].get("step")
            # paused at the seed's end (a pause off the log grid logs no line there, its checkpoint stays
            # the newest): not a run killed past the seed, nor one without a plan
            paused = seed_end is not None and (
                last == seed_end
                or (last is not None and last < seed_end and newest_step(d / "checkpoints") == seed_end)
            )
            if forest.data.get("seed") and not (d / "summary.json").is_file() and paused:
                role = (
                    "seed (the dense baseline's first part; its rest is not trained: --no-dense, or not yet)"
                )
        elif d.name == DENSE_TUNED_RUN:
            role = "dense baseline's second half again at its own LR (row dense_tuned)"
        else:
            role = (
                "expert"
                if f"runs/{d.name}" in names
                else "run not finished (training, paused or stopped; not an expert yet)"
                if not (d / "summary.json").is_file()
                else "run (not an expert of the forest now: opted out or replaced)"
            )
        runs.append(read_run(d, d.name, role))
    return runs, absent


def moe_runs(moes: list[Path]) -> tuple[list[dict], list[str]]:
    """The MoE stages' runs (router training, BTX fine-tuning) whose run dirs were kept."""
    runs, absent = [], []
    for m in moes:
        meta = read_json(m / "elmforest_moe.json")
        # a stage trained in a scratch dir leaves its logs in train_logs/: the last stage's (fine-tuning
        # comes after the router training of the merge)
        latest = "finetuning" if isinstance(meta, dict) and isinstance(meta.get("finetuning"), dict) else None
        for key, role in (("router_training", "MoE router training"), ("finetuning", "MoE fine-tune (BTX)")):
            stage = meta.get(key) if isinstance(meta, dict) else None
            if not isinstance(stage, dict):
                continue
            run = stage.get("run")
            if run and (Path(run) / "metrics.jsonl").is_file():
                runs.append(read_run(Path(run), f"{m.name} ({role})", role))
            elif key == (latest or key) and (m / "train_logs" / "metrics.jsonl").is_file():
                runs.append(read_run(m / "train_logs", f"{m.name} ({role})", role))
            else:
                absent.append(
                    f"{m.name}: the {role}'s run directory was not kept (the quickstart trains it in a "
                    "scratch dir), so its training curve is absent; its tokens and FLOPs are in the ledger"
                )
    return runs, absent


def seed_steps(forest: Forest) -> int | None:
    plan = forest.data.get("plan") or {}
    total, share = plan.get("total_steps"), plan.get("seed_share")
    if isinstance(total, int) and isinstance(share, (int, float)):
        return round(total * share)
    return None


def lineage(forest: Forest) -> tuple[list[dict], list[tuple[str, str, float, str | None]]]:
    """Nodes and edges of the forest's family tree. An expert sits one column right of its furthest
    parent; a parent the forest no longer holds (an opted-out expert, an outside source) sits in the
    first column; merged outputs (MoEs) come last, fed by the experts they were made from."""
    experts = {e["name"]: e for e in forest.experts}
    col: dict[str, int] = {}

    def column(name: str, trail: tuple = ()) -> int:
        if name in col:
            return col[name]
        e = experts.get(name)
        if e is None or name in trail:  # outside the forest, or a malformed loop: a root
            return 0
        parents = [p["name"] for p in e.get("parents", [])]
        col[name] = 1 + max((column(p, (*trail, name)) for p in parents), default=0)
        return col[name]

    nodes: dict[str, dict] = {}
    if forest.data.get("seed"):
        s = forest.data["seed"]
        nodes["seed"] = {"name": "seed", "label": f"seed\n{s.get('tokens', 0):,} tokens", "column": 0}
    edges = []
    for name, e in experts.items():
        nodes[name] = {
            "name": name,
            "label": f"{name}\n{e.get('tokens', 0):,} tokens",
            "column": column(name),
            "color": "#e8eef7" if e.get("branch", "seed") == "seed" else "#e6f4ea",
        }
        parents = e.get("parents", [])
        for p in parents:
            if p["name"] not in nodes and p["name"] not in experts:
                gone = p["name"] in forest.removed
                label = f"{p['name']}\n(opted out)" if gone else p["name"]
                nodes[p["name"]] = {"name": p["name"], "label": label, "column": 0, "color": "#f3f3f3"}
            w = float(p.get("weight", 1.0))
            edges.append((p["name"], name, w, None if len(parents) == 1 and w == 1.0 else f"{w:.2f}"))
    last = max((n["column"] for n in nodes.values()), default=0) + 1
    for o in forest.data.get("outputs", []):
        made = [x for x in o.get("experts", []) if x in nodes]
        if o.get("kind") != "moe" or not made:
            continue
        name = Path(o["path"]).name
        nodes[f"out:{name}"] = {"name": f"out:{name}", "label": f"{name}\n(merged MoE)", "column": last}
        nodes[f"out:{name}"]["color"] = "#fbeee0"
        edges += [(x, f"out:{name}", 1.0 / len(made), None) for x in made]
    ordered = sorted(nodes.values(), key=lambda n: n["column"])
    return ordered, edges
