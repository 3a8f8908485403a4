"""X-ELM's comparison on the multilingual corpus (`elmforest quickstart --corpus multilingual`).

multilingual corpus (languages as domains, ISO 639-3) -> a BPE trained with a per-language sample cap
-> shards -> URIEL syntax groups for k = 2, 4, 8 -> one seed (the first half of a dense run mixing every
language equally) -> for each k, one expert per group of languages (each alone, on its languages mixed
equally, batch B/k, continuing the seed) -> the dense baseline (the same run, continued) -> a language
added later (X-ELM's second round: its expert branched from the nearest expert, or from the seed; the
dense LM continued on every language for the same extra compute) -> per-language BPB of every arm and
routing option on the same bytes -> tables, results.json.

The forests differ only in how the expert phase's budget is split, so each is compute-matched to the
dense run by construction; the seed, the dense run and every group are shared as the files allow, and
every stage is skipped (or resumed) when its output exists.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from elmforest.clients.report import write_run_report
from elmforest.cluster.language_groupings import write_groupings
from elmforest.cluster.languages import group_languages
from elmforest.config import UNKEPT, apply_overrides
from elmforest.forest import btm
from elmforest.forest.manifest import Forest
from elmforest.launch.executor import LocalExecutor
from elmforest.launch.jobs import ExpertJob, as_dict, run_job
from elmforest.launch.prepare import check_quickstart_overrides, prepare_data
from elmforest.launch.progress import ProgressMonitor
from elmforest.model.presets import get_preset, preset_run_config
from elmforest.utils.errors import UserError
from elmforest.utils.io import read_json, write_json_atomic
from elmforest.utils.typed import check_call_args
from elmforest.xelm.second_round import DENSE_CONTINUE_LR, add_language, continue_dense  # noqa: F401

# 12 languages in 3 scripts (Latin, Cyrillic, Han/Kana), 10 with >= 1 MB in the corpus and Finnish
# with 0.27 MB (the low-resource end); Portuguese (0.69 MB) is the language added later.
LANGUAGES = ("ces", "deu", "fin", "fra", "ita", "jpn", "pol", "rus", "spa", "tur", "ukr", "zho")
NEW_LANGUAGE = "por"
KS = (2, 4, 8)
MAX_BYTES = 800_000  # per language: above the 0.2-0.3 MB the dense run reads of each; quicker to tokenize
TOKENIZER_CAP = 300_000  # training-split bytes per language the BPE learns from: no language dominates
# Peak LRs from `elmforest sweep --shards OUT/shards --out OUT/sweep --preset cpu-small --groups
# OUT/groups/k2.json,OUT/groups/k4.json,OUT/groups/k8.json --lrs 2e-3,4e-3,8e-3,1.6e-2 --expert-lrs
# 4e-3,8e-3,1.6e-2,3.2e-2 --eval-bytes 32000` on the default run (docs/xelm.md, "Learning rates"): the
# dense run's (also the seed's) and the expert phase's for each k, each the best of its grid on the valid
# split, none on its grid's edge. The tf-idf forest borrows the LR of the k closest to its own (not swept).
# The command sweeps the quickstart's configs only with the same `--set` overrides as its run, if any.
DENSE_LR = 8e-3
EXPERT_LRS = {2: 1.6e-2, 4: 1.6e-2, 8: 8e-3}
ADD_K = 4  # the forest the new language is added to


def quickstart_xelm(
    out: str | Path = "quickstart-xelm",
    preset: str = "cpu-small",
    languages: list[str] | None = None,
    new_language: str | None = NEW_LANGUAGE,
    ks: tuple[int, ...] | list[int] = KS,
    overrides: list[str] | tuple = (),
    progress: bool = True,
    corpus: str | Path | None = None,
    seed_share: float = 0.5,
    eval_bytes: int = 32_000,
    prior_batches: int = 5,
    workers: int | None = None,
    dense_lr: float | None = None,
    expert_lrs: dict[int, float] | None = None,
    max_bytes: int = MAX_BYTES,
    tfidf_k: int = 4,
) -> dict:
    """Run the X-ELM comparison into `out`; `corpus` (JSONL/Parquet/txt with ISO 639-3 domains)
    replaces the built multilingual corpus. `new_language=None` skips the added-language experiment;
    `tfidf_k` > 0 adds X-ELM's alternative grouping: that many balanced tf-idf clusters of documents
    (c-BTM's clustering), one expert each, at the same budget (rows tfidf<K>_*); 0 skips it."""
    from elmforest.launch.executor import local_workers
    from elmforest.quickstart_lines import precision_line
    from elmforest.xelm.evaluate import evaluate_all, print_results

    out, t0, log = Path(out), time.perf_counter(), print
    p = get_preset(preset)
    check_quickstart_overrides(overrides, preset)
    check_call_args("quickstart_xelm", lists=dict(languages=languages, ks=ks))
    ks = sorted({int(k) for k in ks})
    if bad := [k for k in (expert_lrs or {}) if isinstance(k, bool | str | float)]:
        raise UserError(  # a string key ("4", as the run record writes them) was looked up as nothing
            f"expert_lrs: key(s) {bad} are not integers (a forest's k: {{4: 0.004}})"
        )
    if not ks or min(ks) < 2:
        raise UserError(f"k = {ks}: every forest needs at least 2 groups (k = 1 is the dense model)")
    if new_language is not None and new_language in (languages or LANGUAGES):
        raise UserError(f"the added language {new_language!r} is also one of the first round's languages")
    twice = sorted({x for x in languages or () if list(languages).count(x) > 1})
    if twice:  # before the corpus, tokenizer and shards are built
        raise UserError(f"language(s) {', '.join(twice)} given twice")
    asked = len(set(languages or LANGUAGES))
    if [k for k in ks if k > asked]:  # before the corpus is built; again below, after languages are skipped
        raise UserError(f"k = {ks} but {asked} languages were asked for: each group needs one")
    if corpus is None:  # an unknown code refused before the corpus is built: the builder's, the typology's
        from elmforest.corpora.multilingual import check_codes

        check_codes([*(languages or LANGUAGES), *([new_language] if new_language else [])])
        _groupings(sorted(set(languages or LANGUAGES)), ks, say=False)
    data = prepare(out, languages, new_language, p.vocab_size, corpus, max_bytes, progress, log)
    shards, langs, new = data["shards"], data["languages"], data["new"]
    too_many = [k for k in ks if k > len(langs)]
    if too_many:
        raise UserError(f"k = {too_many} but only {len(langs)} languages can train: each group needs one")
    if tfidf_k:  # its first-round corpus is made of the languages' files: checked before any training
        lacking = [x for x in langs if not (Path(data["corpus"]) / f"{x}.jsonl").is_file()]
        if lacking:
            raise UserError(
                f"{data['corpus']}: the tf-idf forest needs one <language>.jsonl per language ({lacking} "
                "missing); pass tfidf_k=0 to skip it"
            )

    base = preset_run_config(preset, str(Path(shards.root).resolve()))
    base.data.domains = list(langs)
    base.optim.lr = dense_lr if dense_lr is not None else DENSE_LR
    base = apply_overrides(base, [UNKEPT, *overrides])  # finished runs keep no checkpoints, unless asked
    lrs = {k: (expert_lrs or {}).get(k, EXPERT_LRS.get(k, base.optim.lr)) for k in ks}
    # the batch splits evenly between the experts of every forest (B/k each: compute matched)
    plan, base = btm.plan_for(base, math.lcm(*ks, max(tfidf_k, 1)), seed_share)
    groupings = _groupings(langs, ks)
    _check_stamp(
        out,
        {
            "languages": langs,
            "new_language": new,
            "ks": ks,
            "tfidf_k": tfidf_k,
            "corpus": str(Path(data["corpus"]).resolve()),
            "max_bytes": max_bytes,
            "seed_config": base.to_dict(),
            "plan": {**plan.__dict__},
            "expert_lrs": {str(k): v for k, v in lrs.items()},
            "continue_lr": DENSE_CONTINUE_LR,
            # the seed's new-language expert on a schedule of its own (second_round.fresh_from_seed);
            # absent from outputs that continued the seed's: refused, not an expert trained otherwise
            "added_from_seed": "own schedule" if new else None,
            "groups": {str(k): g["groups"] for k, g in groupings.items()},
        },
    )
    write_groupings(groupings, out / "groups", overwrite=True)
    log(f"      precision: {precision_line(base.train.precision, base.train.device, eval_bytes)}")
    log(
        f"      protocol: every language equally likely in the seed and dense runs (data.mixture="
        f"{base.data.mixture}) and within each group; dense LR {base.optim.lr:g}, expert LRs "
        + ", ".join(f"k={k} {lrs[k]:g}" for k in ks)
    )
    forest = Forest.init(out / "forest", exist_ok=True)
    log(
        f"[5/8] seed: the first {plan.seed_steps} of {plan.total_steps} dense steps ({plan.batch_size} x "
        f"{base.train.seq_len} tokens) on {len(langs)} languages mixed equally"
    )
    btm.train_seed(forest, shards, base, plan, progress=progress)
    forests = {
        k: btm.share_seed(out / f"forest-k{k}", forest, list(groupings[k]["groups"]), lrs[k]) for k in ks
    }
    workers, threads = local_workers(base.train.device, workers)
    log(
        f"[6/8] dense baseline (the seed's run continued) and {sum(ks)} group experts for k = "
        + ", ".join(map(str, ks))
        + f", each {plan.total_steps - plan.seed_steps} steps at batch {plan.batch_size} / k"
        + (f" ({workers} jobs at a time)" if workers > 1 else "")
    )
    _train_jobs(forest, forests, groupings, shards, plan, workers, threads, progress)
    others = {}
    if tfidf_k:
        others[f"tfidf{tfidf_k}"] = _tfidf_forest(out, data, forest, tfidf_k, lrs, progress, log)
    added = None
    if new is not None:
        ka = ADD_K if ADD_K in forests else ks[len(ks) // 2]
        groups = list(groupings[ka]["groups"])
        added = add_language(out, forest, forests[ka], ka, groups, shards, new, plan, progress, log)
    log(
        f"[8/8] per-language bits per byte on each language's test split (the first whole documents within "
        f"{eval_bytes:,} bytes)"
    )
    results = evaluate_all(
        forest,
        forests,
        groupings,
        shards,
        langs,
        new,
        added,
        eval_bytes,
        prior_batches,
        base.train.seq_len,
        others,
        base.data.mixture,
        base.train.device,
        base.train.precision,
    )
    results.update(
        {
            "languages": langs,
            "new_language": new,
            "skipped": data["skipped"],
            "bytes_per_token": data["bytes_per_token"],
            "groupings": {k: g["groups"] for k, g in groupings.items()},
            "added_language": None if added is None else {k: v for k, v in added.items() if k != "groups"},
            "protocol": {
                "preset": preset,
                "mixture": base.data.mixture,
                "dense_lr": base.optim.lr,
                "expert_lrs": lrs,
                "dense_continue_lr": DENSE_CONTINUE_LR,
                "seed_share": seed_share,
                "split": "test",
                "eval_bytes": eval_bytes,
                "prior_split": "valid",
                "prior_batches": prior_batches,
                "typology_temperature": results.pop("temperature"),
                "max_bytes_per_language": max_bytes,
                "tokenizer_sample_bytes_per_language": TOKENIZER_CAP,
            },
            "plan": {**plan.__dict__, "seed_steps": plan.seed_steps},
        }
    )
    results["seconds"] = time.perf_counter() - t0
    write_json_atomic(out / "results.json", results)
    print_results(results, log)
    log(f"total {results['seconds']:.0f}s; {out / 'results.json'}, {write_run_report(out)}")
    return results


DATA_SETTINGS = ("languages", "new_language", "corpus", "max_bytes")  # what the built shards hold


def _check_stamp(out: Path, stamp: dict) -> None:
    """Everything the trained stages depend on, written once; a rerun with other settings (languages,
    LRs, seed, overrides, budget, corpus) is refused instead of mixing old runs into new results.
    While no model has been trained (no weights anywhere in `out`), settings that only the training
    uses may still change: there is nothing to mix."""
    from elmforest.train.runcheck import settings_diff

    path = out / "xelm-settings.json"
    stamp = json.loads(json.dumps(stamp))  # the JSON form, as it is read back
    if path.is_file():
        old = read_json(path)

        def differs(key: str) -> bool:  # the seed's config by what shapes a run (not keep_checkpoints)
            if key == "seed_config" and old.get(key) and stamp.get(key):
                return bool(settings_diff(old[key], stamp[key]))
            return old.get(key) != stamp.get(key)

        diff = sorted(k for k in set(old) | set(stamp) if differs(k))
        if diff and set(diff).isdisjoint(DATA_SETTINGS) and next(out.rglob("*.safetensors"), None) is None:
            print(f"note: {out} holds no trained model yet: its settings ({', '.join(diff)}) are replaced")
            write_json_atomic(path, stamp)
            return
        if diff:
            raise UserError(
                f"{out} was run with other settings ({', '.join(diff)} differ; see {path}); its seed, experts "
                "and shards would not match them: use another --out, or delete it"
            )
        return
    write_json_atomic(path, stamp)


def prepare(out: Path, languages, new, vocab_size: int, corpus, max_bytes: int, progress, log) -> dict:
    """Corpus -> tokenizer (per-language cap) -> shards; languages without a train, valid and test split
    are reported and skipped (never merged into another); bytes per token of each language's test text."""
    wanted = list(languages or LANGUAGES)
    if new is not None and new in wanted:
        raise UserError(f"the added language {new!r} is also one of the first round's languages")
    every = wanted + ([new] if new else [])
    if corpus is None:
        corpus = out / "corpus"
        man = read_json(corpus / "manifest.json") if (corpus / "manifest.json").is_file() else {}
        # a language skipped before is built again: its download may have failed (no network then)
        built = man.get("domains", {})  # a language built under another cap is built again
        todo = [
            x for x in every if x not in built or built[x].get("max_bytes", man.get("max_bytes")) != max_bytes
        ]
        if todo:
            from elmforest.corpora.multilingual import build_multilingual_corpus

            log(f"[1/8] building the multilingual corpus ({len(todo)} languages) -> {corpus}")
            build_multilingual_corpus(
                corpus, todo, max_bytes=max_bytes, min_bytes=max_bytes // 2, progress=progress
            )  # flagged: under half the cap (a capped language's whole documents fall just under it)
        man = read_json(corpus / "manifest.json") if (corpus / "manifest.json").is_file() else {}
        if not set(every) & set(man.get("domains", {})):
            raise UserError(  # said here, not as "no data files found" by the tokenizer stage
                "no language of the multilingual corpus could be built: "
                + "; ".join(f"{k}: {v}" for k, v in man.get("skipped", {}).items())
            )
    corpus = Path(corpus)
    shards = prepare_data(out, vocab_size, None, corpus, None, progress, log, TOKENIZER_CAP).shards
    man = read_json(corpus / "manifest.json") if (corpus / "manifest.json").is_file() else {}
    stale = [  # in the corpus, yet not in the tokenizer and shards an earlier run of `out` built
        x
        for x in every
        if x not in shards.domains and (x in man.get("domains", {}) or (corpus / f"{x}.jsonl").is_file())
    ]
    if stale:
        raise UserError(
            f"{out}: its tokenizer and shards were built by an earlier run for other languages, without "
            f"{', '.join(stale)}; use another --out, or delete {out} to build them again"
        )
    skipped = {}
    for lang in every:
        lacking = [s for s in ("train", "valid", "test") if not shards.has(lang, s)]
        if lang not in shards.domains:
            skipped[lang] = man.get("skipped", {}).get(lang) or (
                "not in the corpus (no document left after cleaning, or not built)"
            )
        elif lacking:
            skipped[lang] = f"too little text: no {'/'.join(lacking)} split"
    for lang, why in skipped.items():
        log(f"      skipped language {lang}: {why}")
    langs = [x for x in wanted if x not in skipped]
    if new in skipped:
        log(f"      no added-language experiment: {new} was skipped")
        new = None
    bpt = {}
    for lang in langs + ([new] if new else []):
        info = shards.info(lang, "test")
        bpt[lang] = info["bytes"] / max(info["tokens"], 1)
    log("      bytes per token (test split): " + ", ".join(f"{x} {v:.2f}" for x, v in bpt.items()))
    return {
        "shards": shards,
        "corpus": corpus,
        "languages": langs,
        "new": new,
        "skipped": skipped,
        "bytes_per_token": bpt,
    }


def _groupings(langs: list[str], ks: list[int], say: bool = True) -> dict[int, dict]:
    """URIEL syntax groups (cluster/languages.py; saved as OUT/groups/k<K>.json). No group may hold more
    than half the languages: every expert gets the same compute (B/k), and unbalanced merging (k = 4:
    9, 1, 1 and 1 of these 12 languages) would starve the big group's languages. Where that cap stops
    the merging short of a k (ces deu fin jpn rus tur: 3 groups of 2, none of which may join another),
    the cap is raised one language at a time until every k is reached, and said."""
    cap = math.ceil(len(langs) / 2)
    while True:
        try:
            groupings, _ = group_languages(langs, ks, max_group_size=cap)
            break
        except UserError:
            if cap >= len(langs):
                raise
            cap += 1
    if say and cap > math.ceil(len(langs) / 2):
        print(f"note: groups of at most half the languages cannot make k = {ks}; groups hold up to {cap}")
    for k in ks if say else ():
        print(f"[4/8] k={k}: " + " · ".join(" ".join(g) for g in groupings[k]["groups"].values()))
    return groupings


def _train_jobs(forest, forests, groupings, shards, plan, workers, threads, progress) -> None:
    """The dense run's second half and every group expert, as independent jobs (two at a time on a
    2-core CPU); finished ones are skipped, cut ones resume."""
    sroot = str(Path(shards.root).resolve())
    jobs = [ExpertJob(str(forest.root), sroot, "", kind="dense", threads=threads)]
    for k, f in forests.items():
        for g, members in groupings[k]["groups"].items():
            jobs.append(ExpertJob(str(f.root), sroot, members[0], name=g, threads=threads, mix=list(members)))
    runs = {f"{Path(j.forest).name}/{j.label}": j.run_dir() for j in jobs}
    log_path = forest.root.parent / "progress.log"
    with ProgressMonitor(runs, plan.total_steps, log_path, every=30.0, echo=progress):
        LocalExecutor(workers).map(
            run_job, [as_dict(j) for j in jobs], list(runs), [j.run_dir() / "job.log" for j in jobs]
        )
    for f in forests.values():
        f.reload()


def _tfidf_forest(out: Path, data: dict, forest: Forest, k: int, lrs: dict, progress, log) -> Forest:
    """X-ELM's other grouping: balanced tf-idf clusters of the first round's documents (whatever their
    language), one expert each from the same seed, at the k-expert LR when swept (else the nearest k's)."""
    from elmforest.quickstart_arms import cluster_forest

    first = out / "corpus-first-round"  # the new language must not shape the first round's clusters
    if not first.is_dir():
        tmp = out / "corpus-first-round.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        for lang in data["languages"]:
            src = Path(data["corpus"]) / f"{lang}.jsonl"
            if not src.is_file():
                raise UserError(f"{src}: --corpus multilingual needs one <language>.jsonl per language")
            (tmp / src.name).unlink(missing_ok=True)
            (tmp / src.name).hardlink_to(src)
        tmp.rename(first)
    lr = lrs[min(lrs, key=lambda kk: (abs(kk - k), kk))]
    log(f"[6/8] X-ELM's alternative grouping: {k} balanced tf-idf clusters of documents, one expert each")
    return cluster_forest(out, first, forest, k, progress, log, expert_lr=lr)
