"""A study's markdown report, every claim with a verdict, beside its plots (study/plots.py)."""

from __future__ import annotations

from pathlib import Path

from elmforest.study.analysis import ci_text
from elmforest.study.lrs import lrs_table
from elmforest.study.plots import plot_cbtm, plot_curves, plot_domains, plot_multiplier
from elmforest.utils.errors import UserError
from elmforest.utils.io import write_text_atomic

_POOLS = {  # the seed part the fits used (a fits.json without seed_pool predates it: per point)
    "arm": "the seed spread pooled over each arm's budgets and each table's rows",
    "point": "each point's seed spread its own",
}


def _over(study: dict) -> str:
    """What the bootstrap resamples: one seed or one domain leaves nothing to resample on that axis."""
    seeds = len(study["config"].get("seeds") or [0])
    n_in, n_ood = len(study.get("domains") or []), len(study.get("ood_domains") or [])

    def axes(n_dom):
        a = [w for w, n in (("seeds", seeds), ("domains", n_dom)) if n > 1]
        return " and ".join(a) or "nothing (one seed, one domain: no interval)"

    if n_ood and axes(n_ood) != axes(n_in):
        sets = f"{n_ood} set{'s' if n_ood > 1 else ''}"
        return f"{axes(n_in)} in domain, over {axes(n_ood)} out of domain ({sets})"
    return axes(n_in)


def scored_line(scored: dict | None, eval_bytes: int) -> str:
    """What was scored, from study.json's record: the range of bytes per domain, and the domains whose
    first test document alone is longer than `eval_bytes` (scored whole: more than the limit)."""
    if not scored:
        return ""  # a study.json from before the record
    parts = []
    for key, what in (("in_domain", "in domain"), ("ood", "out of domain")):
        s = scored.get(key) or {}
        if s:
            b = [v["bytes"] for v in s.values()]
            parts.append(
                f"{what} {min(b):,}-{max(b):,} bytes" if min(b) != max(b) else f"{what} {b[0]:,} bytes"
            )
    over = {d: v for s in scored.values() for d, v in s.items() if v["bytes"] > eval_bytes}
    line = f": {', '.join(parts)} per domain" if parts else ""
    if over:
        line += "; " + ", ".join(f"{d} ({v['bytes']:,} bytes)" for d, v in sorted(over.items()))
        line += " scored on one whole document longer than the limit"
    return line


def diverged_lines(recs: list[dict]) -> list[str]:
    """The points whose dense_tuned is the dense run itself because the second half at its LR diverged or
    scored worse on valid: the report says which."""
    tuned = [r for r in recs if r["arm"] == "dense_tuned"]
    bad = [r for r in tuned if r.get("diverged")]
    lost = [r for r in tuned if r.get("lost_on_valid")]
    out = []
    if bad:
        where = ", ".join(Path(r["dir"]).name for r in bad)  # the point's folder: b1-s0, domains2-s1, ...
        out += [
            f"The dense run's second half diverged at its LR for {len(bad)} point(s) ({where}): there "
            "`dense_tuned` is the dense run itself (its own LR, which a sweep's grid always holds); a lower "
            "`dense_continue_lr` (or `lr_grid`) tunes it.",
            "",
        ]
    if lost:
        where = ", ".join(
            f"{Path(r['dir']).name} at LR {r['lost_on_valid']['lr']:g}: "
            f"{r['lost_on_valid']['valid_mean_bpb']['continued']:.4f} against "
            f"{r['lost_on_valid']['valid_mean_bpb']['dense']:.4f}"
            for r in lost
        )
        out += [
            f"The dense run's second half at its LR scored worse on valid than the dense run for {len(lost)} "
            f"point(s) ({where}, mean valid BPB): there `dense_tuned` is the dense run itself, the better of "
            "the two LRs on valid (a two-point grid holding the run's own LR, as a sweep's).",
            "",
        ]
    return out


def seed_lines(pos: dict | None, tokens_per_param_per_step: float) -> list[str]:
    """Where the 1x forest's seed stops on its loss curve (study/run.seed_position)."""
    if not pos:
        return []
    ratio = pos["seed_last_doubling_drop"] / max(pos["largest_last_doubling_drop"], 1e-9)
    return [
        f"Seed position: the 1x forest's seed stops at step {pos['seed_steps']} "
        f"({pos['seed_steps'] * tokens_per_param_per_step:.2g} tokens per parameter) at valid loss "
        f"{pos['seed_valid_loss']:.3f}, having made {pos['share_of_fall']:.0%} of the fall from the uniform "
        f"loss ({pos['uniform_loss']:.2f}) to the largest dense run's final {pos['largest_run_valid_loss']:.3f} "
        f"(step {pos['largest_run_steps']}). Over its last doubling of steps the loss fell "
        f"{pos['seed_last_doubling_drop']:.3f} nats, {ratio:.1f}x what the largest run lost over its own last "
        f"doubling ({pos['largest_last_doubling_drop']:.3f}, with the schedule's decay).",
        "",
    ]


def markdown(study: dict, fits: dict) -> str:
    cfg = study["config"]
    lines = [
        "# Scaling study",
        "",
        f"Preset `{cfg['preset']}`, 1x budget = {study['steps_1x']} dense steps of {study['batch_size']} x "
        f"{study['seq_len']} tokens; dense budgets {cfg['dense_budgets']}, forest budgets {cfg['forest_budgets']}, "
        f"seeds {cfg['seeds']}, seed share {cfg['seed_share']}; dense LR {study['dense_lr']:g}, expert LR "
        f"{study['expert_lr']:g}"
        + (
            f", the dense runs' second half {study['dense_continue_lr']:g} (arm dense_tuned)"
            if study.get("dense_continue_lr") is not None
            else ""
        )
        + f" ({study['lr_source']}). {len(study['runs'])} results (dense runs and forests); "
        f"the model has {study['parameters']:,} parameters; {study['tokens_per_parameter_1x']:.2g} training tokens per "
        f"parameter at 1x ({study['tokens_per_expert_1x']:,} tokens per expert).",
        "",
        *diverged_lines(study["runs"]),
        *seed_lines(
            study.get("seed_position"),
            study["steps_1x"] and study["tokens_per_parameter_1x"] / study["steps_1x"],
        ),
        "Every arm is scored on the same bytes (the first whole test documents within "
        f"{cfg['eval_bytes']:,} bytes of each domain{scored_line(study.get('scored'), cfg['eval_bytes'])}); "
        "the forest is its ensemble with the cached prior from "
        "valid data. FLOPs are counted by what ran (the forest: seed + experts). The multiplier is the dense "
        "compute that reaches the forest's BPB on the fitted dense curve over the forest's compute, read "
        f"only inside the measured dense range; intervals are {fits['ci']:.0%} bootstrap intervals over "
        f"{_over(study)} ({fits['n_boot']} replicates; {_POOLS[fits.get('seed_pool', 'point')]}).",
        "",
        *(
            [
                "Learning rates chosen at each budget on the valid split (study/lrs.py):",
                "",
                *lrs_table(study.get("lrs_by_budget") or {}),
                "",
            ]
            if study.get("lrs_by_budget")
            else []
        ),
        "## Findings",
        "",
        *([f"Caveat: {fits['caveat']}.", ""] if fits.get("caveat") else []),
        "| claim | evidence | verdict |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {f['claim']} | {f['evidence']} | **{f['verdict']}** |" for f in fits["findings"]]
    for where, label in (
        ("in_domain_tuned", "in domain, against dense with its second half at its own LR (dense_tuned)"),
        ("ood_tuned", "out of domain, against dense_tuned"),
        ("in_domain", "in domain, against dense at one LR for the whole run"),
        ("ood", "out of domain, against dense at one LR"),
    ):
        t = fits.get(where)
        if not t:
            continue
        lines += [
            "",
            f"## Multiplier, {label}",
            "",
            "| forest budget | forest FLOPs | multiplier | CI | CI includes 1 |",
        ]
        lines += ["| --- | --- | --- | --- | --- |"]
        for m in t["budgets"]:
            ci = "-" if m["ci"] is None else ci_text(*m["ci"], m.get("ci_open") or (False, False))
            # no interval (a flat dense fit) is not an interval that excludes 1
            includes = "-" if m["ci"] is None else "yes" if m["ci_includes_1"] else "no"
            lines.append(f"| {m['budget']:g}x | {m['flops']:.3g} | {m['text']} | {ci} | {includes} |")
        for arm, b in (t.get("arm_fits") or {}).items():
            f = b["fit"]
            cis = ", ".join(
                f"{k} [{b[k]['ci'][0]:.3g}, {b[k]['ci'][1]:.3g}]" for k in ("E", "A", "alpha") if b[k]["ci"]
            )
            lines.append(
                f"\n{arm} fit: L(C) = {f['E']:.3f} + {f['A']:.3f} (C/{f['c0']:.3g})^-{f['alpha']:.3f}; "
                f"RMSE(log) {f['rmse_log']:.4f}, R^2(log) {f['r2_log']:.3f}, {f['n_points']} points; {cis}"
                + (
                    " (E at its bound: these budgets do not identify the loss floor, the fit is a pure power law)"
                    if f["E"] < 1e-6
                    else ""
                )
            )
    gain_tables = [
        ("domains", "Gain vs domains (1x budget)", ["domains"], lambda g: [g["n_domains"]]),
        ("seed_share", "Seed share (1x budget)", ["seed share"], lambda g: [f"{g['seed_share']:g}"]),
        (
            "cbtm",
            "c-BTM: clusters x data (budget scaled with the data; top-2 cluster routing)",
            ["data", "k", "balanced by"],
            lambda g: [f"{g['data_fraction']:g}", g["k"], g["balance"]],
        ),
    ]
    for key, title, heads, cells in gain_tables:
        lines += _gain_table(fits, key, title, heads, cells)
    lines += [
        "",
        "Plots: "
        + ", ".join(
            ["curves.png", "multiplier.png"]
            + [f"{k}.png" for k in ("domains", "cbtm") if fits.get(k) or fits.get(k + "_tuned")]
        )
        + ". Data: study.json, fits.json.",
        "",
    ]
    return "\n".join(lines)


def _ci_text(g: dict) -> str:
    return f"[{g['ci'][0]:+.2%}, {g['ci'][1]:+.2%}]"


def _gain_table(fits: dict, key: str, title: str, heads: list[str], cells) -> list[str]:
    """One axis's gains, a row per point: over dense_tuned (fits[key + "_tuned"]) first where the study
    has it, then over dense at one LR; a point with only one of them shows "-" for the other."""
    arms = [(s, name) for s, name in (("_tuned", "dense_tuned"), ("", "dense (one LR)")) if fits.get(key + s)]
    if not arms:
        return []
    rows: dict[tuple, dict] = {}
    for s, _ in arms:
        for g in fits[key + s]:
            rows.setdefault(tuple(str(c) for c in cells(g)), {})[s] = g
    heads = [*heads, *(h for _, name in arms for h in (f"gain over {name}", "CI"))]
    out = ["", f"## {title}", "", "| " + " | ".join(heads) + " |", "|" + " --- |" * len(heads)]
    for row, by in rows.items():
        gains = [(f"{by[s]['gain']:+.2%}", _ci_text(by[s])) if s in by else ("-", "-") for s, _ in arms]
        out.append("| " + " | ".join([*row, *(x for g in gains for x in g)]) + " |")
    return out


def write_report(out: Path, study: dict, fits: dict) -> None:
    recs = study["runs"]
    if not any(r.get("arm") == "btm" and r.get("axis") == "main" and r.get("bpb") for r in recs):
        raise UserError(
            f"{out}: study.json holds no scored forest run (arm btm, main axis): nothing to compare with the "
            "dense LM; rerun the study (without --analyse-only) to train and score them"
        )
    plot_curves(recs, fits, out / "curves.png")
    plot_multiplier(fits, out / "multiplier.png")
    if fits.get("domains") or fits.get("domains_tuned"):
        plot_domains(fits, out / "domains.png")
    if fits.get("cbtm") or fits.get("cbtm_tuned"):
        plot_cbtm(fits, out / "cbtm.png")
    write_text_atomic(out / "report.md", markdown(study, fits))
