"""The run report (`elmforest report`, issue 15): one self-contained HTML page, built from real parts
of a tiny run (the shared forest, a merged MoE, the quickstart's own evaluation) and loaded in
headless Chromium: it renders, every table is there with the numbers of results.json, the browser
logs nothing and the page requests nothing; names are escaped; a bare forest dir gives a report of
what exists that says the results are absent."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from elmforest.clients import report_cli
from elmforest.clients.report import render_report, write_report
from elmforest.utils.argtypes import group
from elmforest.utils.errors import AlreadyExists, UserError

IN_TABLES = ["results-in-domain", "priors-in-domain", "lineage-forest-table", "runs-forest", "ledger-forest"]
QS_TABLES = [*IN_TABLES, "results-out-of-domain", "priors-out-of-domain", "arms", "protocol-table"]


@pytest.fixture(scope="module")
def qs_dir(forest_dir, shards_dir, tmp_path_factory) -> Path:
    """A quickstart output dir made of real parts, cheaper than a quickstart run (test_cli.py runs
    that, report.html included): the shared tiny forest, a merged MoE with its routing statistics,
    and results.json assembled as the quickstart assembles it from the same evaluation
    (compare.evaluate_methods), in domain and on one domain standing in for an out-of-domain set."""
    from elmforest.compare import evaluate_methods, findings, priors_table
    from elmforest.data.shards import Shards
    from elmforest.forest.manifest import Forest
    from elmforest.merge.moe import MoeSpec, export_moe
    from elmforest.merge.routing import write_routing
    from elmforest.quickstart import compute_summary

    qs = tmp_path_factory.mktemp("report") / "qs"
    shutil.copytree(forest_dir, qs / "forest")  # the shared fixture stays as it is
    forest, shards = Forest.load(qs / "forest"), Shards(shards_dir)
    export_moe(forest, qs / "moe", MoeSpec(sample_tokens=512))
    write_routing(qs / "moe", shards.root, tokens=1024)
    common = {"split": "test", "domains": shards.domains, "seq_len": 64, "batch_size": 16, "max_bytes": 3000}
    pools, models = {}, {"moe": qs / "moe"}
    methods, _ = evaluate_methods(forest, shards, common, 1, pools, {}, models)
    ood, _ = evaluate_methods(forest, shards, {**common, "domains": ["legal"]}, 1, pools, {}, models)
    compute = compute_summary(forest, methods, {}, {})  # the quickstart's own, so it cannot drift
    flops = compute["methods"]
    results = {
        "methods": methods,
        "ood_methods": ood,
        "protocol": {"split": "test", "eval_bytes": 3000, "prior_batches": 1},
        "priors": {"in_domain": priors_table(methods), "ood": priors_table(ood)},
        "compute": compute,
        "findings": findings(methods, ood, flops),
        "plan": forest.data["plan"],
        "preset": "tiny",
    }
    (qs / "results.json").write_text(json.dumps(results))
    write_report(qs)
    return qs


class _Page(HTMLParser):
    """Every tag's attributes, table ids and captions, and the text of each table's cells."""

    def __init__(self):
        super().__init__()
        self.attrs: list[tuple[str, dict]] = []
        self.tables: dict[str, str] = {}
        self.cells: dict[str, list[list[str]]] = {}
        self._table = self._in = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.attrs.append((tag, a))
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table], self.cells[self._table] = "", []
        elif tag == "tr" and self._table:
            self.cells[self._table].append([])
        elif tag in ("caption", "td", "th") and self._table:
            self._in = tag
            if tag != "caption":
                self.cells[self._table][-1].append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        if tag in ("caption", "td", "th"):
            self._in = None

    def handle_data(self, data):
        if self._in == "caption":
            self.tables[self._table] += data
        elif self._in:
            self.cells[self._table][-1][-1] += data


def _parse(html: str) -> _Page:
    p = _Page()
    p.feed(html)
    return p


def _no_outside_references(page: _Page) -> None:
    for tag, a in page.attrs:
        assert tag not in ("script", "link", "iframe", "object", "embed"), f"<{tag}> in a self-contained page"
        for k in ("src", "href", "srcset", "action", "data"):
            v = a.get(k)
            if v is not None:
                assert v.startswith(("data:image/png;base64,", "#")), f"<{tag} {k}={v[:60]!r}>"


def test_the_report_holds_every_table_and_the_results_numbers(qs_dir):
    html = (qs_dir / "report.html").read_text(encoding="utf-8")
    results = json.loads((qs_dir / "results.json").read_text())
    page = _parse(html)
    assert set(QS_TABLES) <= set(page.tables), sorted(page.tables)
    assert all(page.tables[t].strip() for t in QS_TABLES)
    _no_outside_references(page)
    # both results tables hold results.json's bits per byte, method by method, domain by domain
    for tid, key in (("results-in-domain", "methods"), ("results-out-of-domain", "ood_methods")):
        header, *rows = page.cells[tid]
        methods = header[1:]
        assert methods == list(results[key]), tid
        by_domain = {r[0]: r[1:] for r in rows}
        for m_i, m in enumerate(methods):
            for d, v in results[key][m]["domains"].items():
                assert by_domain[d][m_i] == f"{v['bpb']:.4f}", (tid, m, d)
            assert by_domain["mean"][m_i] == f"{results[key][m]['mean_bpb']:.4f}", (tid, m)
            ratio = results["compute"]["methods"][m]
            assert by_domain["train FLOPs / dense"][m_i] == f"{ratio:.3f}" + (
                "!" if abs(ratio - 1) > 0.01 else ""
            )
    # the ledger lists every phase the quickstart counted, then the forest's total
    names = [r[1] for r in page.cells["ledger-forest"][1:]]
    assert names == [p["name"] for p in results["compute"]["ledger"]] + [""]
    assert page.cells["ledger-forest"][-1][0] == "forest (seed + experts)"
    assert page.cells["ledger-forest"][-1][3] == f"{results['compute']['forest_flops']:.3e}" or results[
        "compute"
    ]["forest_flops"] == pytest.approx(float(page.cells["ledger-forest"][-1][3]))
    # with the tokens of the rows it sums (the seed and the experts)
    summed = [
        int(r[2].replace(",", "")) for r in page.cells["ledger-forest"][1:-1] if r[0] in ("seed", "expert")
    ]
    assert page.cells["ledger-forest"][-1][2].replace(",", "") == str(sum(summed)) and sum(summed) > 0
    # images: the two results plots, heatmaps, lineage, curves, routing; each a decodable PNG
    ids = {a.get("id") for tag, a in page.attrs if tag == "img"}
    assert {
        "plot-in-domain",
        "plot-out-of-domain",
        "heatmap-in-domain",
        "lineage-forest",
        "curves-forest",
    } <= ids
    assert any(i.startswith("heatmap-routing-") for i in ids)


def test_a_bare_forest_dir_reports_what_exists_and_says_results_are_absent(qs_dir, tmp_path):
    out = write_report(qs_dir / "forest", tmp_path / "f.html")
    page = _parse(out.read_text(encoding="utf-8"))
    assert {"lineage-forest-table", "runs-forest", "ledger-forest"} <= set(page.tables)
    assert not any(t.startswith(("results-", "priors-")) for t in page.tables)
    text = out.read_text(encoding="utf-8")
    assert 'id="absent-list"' in text and "no results.json" in text
    # the seed and each expert are in the lineage table, the dense run among the curves' runs
    lineage = [r[0] for r in page.cells["lineage-forest-table"][1:]]
    assert lineage[0] == "seed" and set(lineage[1:]) == {"scripture", "code", "legal"}
    assert "dense" in [r[0] for r in page.cells["runs-forest"][1:]]
    dense = [r for r in page.cells["ledger-forest"][1:] if r[0] == "dense"]  # with its tokens, as the runs
    assert len(dense) == 1 and dense[0][2].replace(",", "").isdigit()
    summed = [
        int(r[2].replace(",", "")) for r in page.cells["ledger-forest"][1:-1] if r[0] in ("seed", "expert")
    ]
    assert page.cells["ledger-forest"][-1][2].replace(",", "") == str(sum(summed)) and sum(summed) > 0
    _no_outside_references(page)


def test_eval_json_files_are_shown_as_tables_on_a_forest_page(qs_dir, shards_dir, tmp_path, capsys):
    """A forest dir has no results.json: the evaluations run on it (`eval --json`) join its page."""
    from elmforest.cli import main

    f = qs_dir / "forest"
    one, ens = tmp_path / "seed.json", tmp_path / "ensemble.json"
    common = ["--data", str(shards_dir), "--split", "test", "--max-bytes", "3000", "--no-progress"]
    assert main(["eval", "--model", str(f / "seed"), "--json", str(one), *common]) == 0
    assert main(["eval", "--forest", str(f), "--mode", "ensemble", "--json", str(ens), *common]) == 0
    capsys.readouterr()
    out = write_report(f, tmp_path / "f.html", [one, ens])
    page = _parse(out.read_text(encoding="utf-8"))
    for i, path in enumerate((one, ens)):
        res = json.loads(path.read_text())
        assert page.tables[f"eval-{i}"].startswith(f"{path.name}: ")
        assert f"mean BPB {res['mean_bpb']:.4f}" in page.tables[f"eval-{i}"]
        rows = {r[0]: r for r in page.cells[f"eval-{i}"][1:]}
        assert set(rows) == set(res["domains"])
        for d, v in res["domains"].items():
            assert rows[d][1] == f"{v['bpb']:.4f}" and rows[d][2].replace(",", "") == str(v["bytes"])
    assert "forest, mode ensemble" in page.tables["eval-1"] and page.cells["eval-1"][0][-1] == "prior"
    _no_outside_references(page)
    # a file that is not an eval result is refused by name, and nothing is written
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"methods": {}}))
    with pytest.raises(UserError, match=r"--eval .*bad.json: not an `elmforest eval --json` file"):
        write_report(f, tmp_path / "g.html", [bad])
    assert not (tmp_path / "g.html").exists()


def _synthetic_results(root: Path, domain: str) -> Path:
    """A results.json with the quickstart's structure (two methods, priors, compute), no training."""
    experts = ["a", domain]
    posterior = {domain: {"a": 0.25, domain: 0.75}}
    methods = {
        "dense": {"domains": {domain: {"bpb": 2.5}}, "mean_bpb": 2.5, "missing": {}},
        "ensemble": {
            "domains": {domain: {"bpb": 2.25}},
            "mean_bpb": 2.25,
            "missing": {},
            "posterior": posterior,
        },
    }
    prior = {
        domain: {
            "expert": domain,
            "weight": 0.75,
            "source": f"{domain}/valid: 2 windows",
            "prior": posterior[domain],
        }
    }
    results = {
        "methods": methods,
        "ood_methods": None,
        "priors": {"in_domain": prior, "ood": None},
        "compute": {"dense_flops": 100, "methods": {"dense": 1.0, "ensemble": 1.0}, "ledger": [], "arms": {}},
        "findings": [f"{domain} wins"],
        "protocol": {"note": domain},
        "plan": {"domains": experts},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps(results))
    return root


def test_names_are_escaped(tmp_path):
    evil = "<script>alert('x')</script>&"
    html = render_report(_synthetic_results(tmp_path / "qs", evil))
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;" in html
    page = _parse(html)
    assert page.cells["results-in-domain"][1][0] == evil  # the parser reads back the name as given
    assert "no forest" in html  # results without their forest: said, not an error


def test_the_verb_and_its_errors(qs_dir, tmp_path):
    app = group("test")
    report_cli.register(app)
    app.callback()(lambda: None)  # keep `report` a verb of the group (one command would become the root)
    out = tmp_path / "r" / "page.html"
    res = CliRunner().invoke(app, ["report", str(qs_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file() and str(out) in res.output
    assert not list(out.parent.glob(".*")), "a temporary file was left beside the report"
    res = CliRunner().invoke(app, ["report", str(qs_dir), "--out", str(out.parent)])
    assert isinstance(res.exception, UserError) and "is a folder" in str(res.exception)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: neither a quickstart output dir"):
        render_report(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a quickstart results file"):
        render_report(tmp_path / "bad")


def test_out_replaces_only_an_earlier_report_and_names_what_is_wrong(qs_dir, tmp_path):
    app = group("test")
    report_cli.register(app)
    app.callback()(lambda: None)

    def refused(out, match):
        res = CliRunner().invoke(app, ["report", str(qs_dir), "--out", str(out)])
        assert res.exit_code != 0 and isinstance(res.exception, UserError | AlreadyExists), res.output
        assert re.search(match, str(res.exception)), str(res.exception)

    manifest = tmp_path / "forest.json"
    manifest.write_text('{"experts": []}')
    fake = tmp_path / "notes.html"
    fake.write_text("my own notes")
    for p in (manifest, fake):
        refused(p, "not an earlier HTML report")
    assert manifest.read_text() == '{"experts": []}' and fake.read_text() == "my own notes"
    refused(tmp_path / "forest.json" / "x.html", r"forest.json is not a folder")
    refused("", "--out is empty")
    for out in (
        tmp_path / "page.html",
        tmp_path / "page",
    ):  # an earlier report is replaced, whatever its name
        for _ in range(2):
            res = CliRunner().invoke(app, ["report", str(qs_dir), "--out", str(out)])
            assert res.exit_code == 0, res.output


# -- in a real browser ------------------------------------------------------------------------------
def _browser():
    exe = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    )
    driver = shutil.which("chromedriver")
    if not exe or not driver:
        pytest.skip("no headless Chromium here (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (the report extra)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(driver))


def test_the_page_renders_in_chromium_without_errors_or_requests(qs_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium must not look for a driver online
    from_file = _parse((qs_dir / "report.html").read_text(encoding="utf-8"))
    browser = _browser()
    try:
        browser.get((qs_dir / "report.html").resolve().as_uri())
        from selenium.webdriver.common.by import By

        for tid in QS_TABLES:  # every table in the DOM the browser built, with its caption
            caption = browser.find_element(By.CSS_SELECTOR, f"table#{tid} > caption").text
            assert caption and caption == from_file.tables[tid].strip(), tid
        images = browser.find_elements(By.TAG_NAME, "img")
        assert len(images) >= 6
        for img in images:  # each inline PNG decoded (a broken one has no natural width)
            assert (
                browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
            )
        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        console = browser.get_log("browser")
        assert console == [], console  # no errors, no warnings, no messages at all
        urls = []
        for entry in browser.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg["method"] == "Network.requestWillBeSent":
                urls.append(msg["params"]["request"]["url"])
        page_url = (qs_dir / "report.html").resolve().as_uri()
        assert urls and all(u == page_url or u.startswith("data:") for u in urls), urls
        assert not [u for u in urls if re.match(r"(https?|wss?|ftp)://", u)]
    finally:
        browser.quit()


def test_lineage_places_branches_right_of_their_parents_and_keeps_mixture_weights(tmp_path):
    from elmforest.clients.report_data import lineage
    from elmforest.clients.report_plots import lineage_png
    from elmforest.forest.manifest import Forest

    def expert(name, parents, branch="seed"):
        return {
            "name": name,
            "domains": [name],
            "tokens": 10,
            "flops": 1,
            "branch": branch,
            "parents": parents,
        }

    data = {
        "seed": {"path": "seed", "tokens": 100, "flops": 5},
        "experts": [
            expert("a", [{"name": "seed", "weight": 1.0}]),
            expert("mix", [{"name": "a", "weight": 0.3}, {"name": "b", "weight": 0.7}], "mixture"),
            expert("b", [{"name": "seed", "weight": 1.0}]),
            expert("orphan", [{"name": "gone", "weight": 1.0}], "expert:gone"),
        ],
        "removed": [{"name": "gone"}],
        "outputs": [{"path": str(tmp_path / "moe"), "kind": "moe", "experts": ["a", "b"]}],
    }
    nodes, edges = lineage(Forest(tmp_path, data))
    col = {n["name"]: n["column"] for n in nodes}
    assert col == {"seed": 0, "a": 1, "b": 1, "mix": 2, "orphan": 1, "gone": 0, "out:moe": 3}
    assert ("a", "mix", 0.3, "0.30") in edges and ("b", "mix", 0.7, "0.70") in edges
    assert ("seed", "a", 1.0, None) in edges and ("gone", "orphan", 1.0, None) in edges
    assert {e[:2] for e in edges if e[1] == "out:moe"} == {("a", "out:moe"), ("b", "out:moe")}
    assert "opted out" in next(n["label"] for n in nodes if n["name"] == "gone")
    assert lineage_png(nodes, edges)[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resumed_or_still_writing_run_reads_as_one_curve(tmp_path):
    from elmforest.clients.report_data import read_run

    rows = [
        {"step": 2, "loss": 5.0},
        {"step": 4, "loss": 4.0},
        {"step": 4, "loss": 3.5},
        {"step": 6, "loss": 3.0},
    ]
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"step": 8, "lo'  # a partial last line
    (tmp_path / "metrics.jsonl").write_text(text)
    (tmp_path / "valid.jsonl").write_text(json.dumps({"step": 6, "valid_loss": 3.2}) + "\n")
    run = read_run(tmp_path, "r", "expert")
    assert run["steps"] == [2, 4, 6] and run["loss"] == [5.0, 3.5, 3.0]  # a rewritten step: the last
    assert run["valid_steps"] == [6] and run["valid_loss"] == [3.2]
    assert run["done"] is False and run["last_step"] == 6


def test_a_run_in_training_is_not_labelled_as_a_removed_expert(forest_dir, tmp_path):
    """A forest still training showed its expert in training as 'not an expert of the forest now',
    which reads as if it had been removed."""
    from elmforest.clients.report_data import forest_runs
    from elmforest.forest.manifest import Forest

    f = tmp_path / "f"
    shutil.copytree(forest_dir, f)
    training, removed = f / "runs" / "training", f / "runs" / "removed"
    for d in (training, removed):
        shutil.copytree(f / "runs" / "code", d)
    (training / "summary.json").unlink()
    roles = {r["name"]: r["role"] for r in forest_runs(Forest.load(f))[0]}
    assert roles["code"] == "expert"
    assert roles["training"] == "run not finished (training, paused or stopped; not an expert yet)"
    assert roles["removed"].startswith("run (not an expert of the forest now")
    assert roles["dense"] == "seed, then dense baseline"
    # a forest trained with --no-dense: its dense run stopped where the seed ends
    from elmforest.clients.report_data import seed_steps

    end = seed_steps(Forest.load(f))
    metrics = f / "runs" / "dense" / "metrics.jsonl"
    lines = [x for x in metrics.read_text().splitlines() if json.loads(x)["step"] <= end]
    metrics.write_text("".join(x + "\n" for x in lines))
    (f / "runs" / "dense" / "summary.json").unlink()
    # and its newest checkpoint is the pause's (which logs no line off the log grid: 12 of every 5)
    ckpts = sorted((f / "runs" / "dense" / "checkpoints").glob("step-*"))
    for c in ckpts[:-1]:
        shutil.rmtree(c)
    ckpts[-1].rename(ckpts[-1].with_name(f"step-{end:08d}"))
    assert json.loads(lines[-1])["step"] < end
    dense = next(r for r in forest_runs(Forest.load(f))[0] if r["name"] == "dense")
    assert dense["role"].startswith("seed (the dense baseline's first part; its rest is not trained")
    # killed past the seed, before its next checkpoint: part of the dense baseline trained, not a pause
    metrics.write_text(metrics.read_text() + json.dumps({"step": end + 3, "loss": 3.0}) + "\n")
    dense = next(r for r in forest_runs(Forest.load(f))[0] if r["name"] == "dense")
    assert not dense["role"].startswith("seed (the dense baseline's first part")


def test_results_older_than_an_opt_out_are_flagged_and_a_malformed_file_is_named(qs_dir, tmp_path):
    """After `forest remove`, the page showed results.json's tables (with the removed expert) as
    current, and its ledger listed the expert while saying it was opted out."""
    import os

    from elmforest.forest.manifest import Forest
    from elmforest.forest.optout import remove_expert

    assert "Results older than the forest" not in render_report(qs_dir)
    qs = tmp_path / "qs"
    shutil.copytree(qs_dir, qs)
    past = (qs / "results.json").stat().st_mtime - 3600
    os.utime(qs / "results.json", (past, past))
    gone = Forest.load(qs / "forest").names[0]
    remove_expert(Forest.load(qs / "forest"), gone)
    assert f"was written before {gone} opted out" in render_report(qs)
    # a copy without -p dates results.json after the opt-out: its ledger still names the expert
    later = time.time() + 3600
    os.utime(qs / "results.json", (later, later))
    html = render_report(qs)
    page = _parse(html)
    ids = [a.get("id") for _, a in page.attrs if a.get("id")]
    assert "stale-overview" in ids and "stale-results" in ids and len(ids) == len(set(ids))
    assert f"was written before {gone} opted out" in html
    assert "Opted out, so not in the ledger" not in html  # the ledger shown is results.json's, with it
    assert gone in [row[1] for row in page.cells["ledger-forest"][1:]]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text(json.dumps({"methods": {"dense": {"domains": {}}}}))
    with pytest.raises(
        UserError, match=r"results.json: not a quickstart results file as this version .*mean_bpb"
    ):
        render_report(bad)
    good = json.loads((qs_dir / "results.json").read_text())
    good["compute"]["methods"]["dense"] = None
    (bad / "results.json").write_text(json.dumps(good))
    with pytest.raises(UserError, match=r"compute.methods holds something other than finite numbers"):
        render_report(bad)
    good["compute"]["methods"]["dense"] = 1.0
    d = next(iter(good["methods"]["dense"]["domains"]))
    good["methods"]["dense"]["domains"][d]["bpb"] = None  # a plot cannot draw it: refused, not a traceback
    (bad / "results.json").write_text(json.dumps(good))
    with pytest.raises(UserError, match=rf"methods.dense.domains.{d}.bpb is None, not a number"):
        render_report(bad)
    (qs / "results.json").unlink()
    (qs / "results.json").mkdir()  # was "not written yet (the quickstart has not finished ...)"
    with pytest.raises(UserError, match=r"results.json: not a file"):
        render_report(qs)


def test_a_forest_whose_rows_are_in_the_results_but_whose_dir_is_gone_is_said(qs_dir, tmp_path):
    qs = tmp_path / "qs"
    shutil.copytree(qs_dir, qs)
    r = json.loads((qs / "results.json").read_text())
    r["methods"]["cbtm_top1"] = r["methods"]["ensemble"]  # as `quickstart --split clusters` adds it
    (qs / "results.json").write_text(json.dumps(r))
    assert (
        f"{qs / 'forest-clusters-K'}: no forest, yet results.json has its rows (cbtm_top*)"
        in render_report(qs)
    )
    shutil.copytree(qs / "forest", qs / "forest-clusters-4-lr-0.01")
    assert "no forest, yet" not in render_report(qs)


def test_a_copy_without_its_moe_does_not_show_the_originals_and_says_it_is_gone(qs_dir, tmp_path):
    """The copy's forest.json names the original's MoE by its absolute path: the page about the copy
    showed the original's routing and curves as the copy's, and said nothing was missing."""
    qs = tmp_path / "qs"
    shutil.copytree(qs_dir, qs)
    page = render_report(qs)
    assert "heatmap-routing-moe" in page  # the copy's own
    arms = page[page.index('id="arms"') :].split("</table>")[0]  # unmatched FLOPs red, as in the results
    assert re.search(r'<td class="flag">\d\.\d{3}!</td>', arms), arms
    shutil.rmtree(qs / "moe")
    page = render_report(qs)
    assert "heatmap-routing-moe" not in page, "the original's MoE shown as the copy's"
    assert (
        f"{qs_dir / 'moe'}: a merged MoE the forest records, made by another forest" in page
    )  # the original's
    shutil.copytree(qs, tmp_path / "moe-study" / "qs")  # a path holding "/moe" hid the row's note
    shutil.rmtree(tmp_path / "moe-study" / "qs" / "forest")
    assert "qs/moe: no merged MoE, yet results.json has its row (moe)" in render_report(
        tmp_path / "moe-study" / "qs"
    )
    alone = tmp_path / "alone"  # results.json alone: its MoE row's folder is said to be gone too
    alone.mkdir()
    shutil.copy(qs / "results.json", alone)
    assert f"{alone / 'moe'}: no merged MoE, yet results.json has its row (moe)" in render_report(alone)


def test_an_unreadable_main_forest_is_said_and_no_ablation_forest_takes_its_place(qs_dir, tmp_path):
    from elmforest.clients.report_data import locate

    qs = tmp_path / "qs"
    shutil.copytree(qs_dir, qs)
    shutil.copytree(qs / "forest", qs / "forest-random")
    m = json.loads((qs / "forest-random" / "forest.json").read_text())
    for e in m["experts"]:
        e["tokens"], e["flops"] = 1, 1
    (qs / "forest-random" / "forest.json").write_text(json.dumps(m))
    (qs / "forest" / "forest.json").write_text('{"version": 1')  # cut mid-write by hand
    src = locate(qs)
    assert src.main is None and [f.root.name for f in src.forests] == ["forest-random"]
    assert any(f"{qs / 'forest'}: not readable as a forest" in a for a in src.absent)
    html = render_report(qs)
    assert "not readable as a forest" in html and "no forest (forest.json)" not in html
    ledger = _parse(html).cells["ledger-forest-random"]
    experts = [row for row in ledger if row and row[0] == "expert"]
    assert experts and all(row[3] == "1" for row in experts)  # its own ledger, not results.json's


def test_a_nan_cell_leaves_the_best_of_its_row_shaded(qs_dir, tmp_path):
    qs = tmp_path / "qs"
    shutil.copytree(qs_dir, qs)
    r = json.loads((qs / "results.json").read_text())
    domain = sorted(r["methods"]["dense"]["domains"])[0]
    r["methods"]["dense"]["domains"][domain]["bpb"] = float("nan")  # dense: the first column
    (qs / "results.json").write_text(json.dumps(r))
    table = render_report(qs).split('id="results-in-domain"')[1].split("</table>")[0]
    row = next(tr for tr in table.split("<tr")[1:] if f">{domain}<" in tr)
    assert 'class="best"' in row


def test_heatmaps_of_a_wide_forest_stay_page_sized():
    """The report's prior / posterior / routing panels grew 0.45 inch a column: three panels of a
    64-expert forest made a PNG over 8,000 pixels wide, inline in the page."""
    import io

    import numpy as np
    from PIL import Image

    from elmforest.clients.report_plots import heatmaps_png

    def width(n):
        names = [f"e{i}" for i in range(n)]
        panel = ("prior", names, names, np.full((n, n), 1.0 / n))
        return Image.open(io.BytesIO(heatmaps_png([panel, panel, panel]))).size[0]

    small, wide = width(8), width(64)
    assert wide < 3 * small and wide < 3000, (small, wide)
    names, few = [f"d{i}" for i in range(64)], ["e0", "e1", "e2"]  # 64 domains x 3 experts: tall, not wide
    tall = Image.open(io.BytesIO(heatmaps_png([("prior", names, few, np.full((64, 3), 1 / 3))]))).size[1]
    assert tall < 1000, tall


def test_arms_whose_training_flops_are_not_recorded_are_not_shaded_best(qs_dir, tmp_path):
    """Results from before the per-arm FLOPs ratios (compute: only dense_flops, forest_flops,
    forest_over_dense) shaded an arm at 5x the dense run's compute as the best of the row."""
    qs = tmp_path / "qs"
    shutil.copytree(qs_dir, qs)
    r = json.loads((qs / "results.json").read_text())
    r["compute"]["methods"].pop("ensemble")
    for row in r["methods"]["ensemble"]["domains"].values():
        row["bpb"] = 0.01  # the lowest of every row
    (qs / "results.json").write_text(json.dumps(r))
    table = render_report(qs).split('id="results-in-domain"')[1].split("</table>")[0]
    column = ["domain", *r["methods"]].index("ensemble")
    rows = [tr.split("<td")[1:] for tr in table.split("<tr")[1:] if "<td" in tr]
    assert rows and all('class="best"' not in row[column] for row in rows if len(row) > column)
    assert "ensemble: training FLOPs not recorded, not shaded" in table
    r["compute"] = {k: r["compute"][k] for k in ("dense_flops", "forest_flops", "forest_over_dense")}
    (qs / "results.json").write_text(json.dumps(r))
    table = render_report(qs).split('id="results-in-domain"')[1].split("</table>")[0]
    assert 'class="best"' not in table and "so none is shaded as best" in table


def test_hand_edited_results_are_named_or_drawn_never_a_traceback(qs_dir, tmp_path):
    """A domain row without its bpb (which the tables show as -) was a KeyError in the plot; a string
    for seconds, a prior without its table, findings as one string: tracebacks or a bullet per letter."""
    good = json.loads((qs_dir / "results.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    r = json.loads(json.dumps(good))
    d = next(iter(r["methods"]["dense"]["domains"]))
    del r["methods"]["dense"]["domains"][d]["bpb"]
    (bad / "results.json").write_text(json.dumps(r))
    assert 'id="results-in-domain"' in render_report(bad)
    for edit, says in (
        (lambda r: r.update(seconds="12"), "seconds is '12', not a finite number"),
        (lambda r: r.update(findings="one sentence"), "findings is not a list of sentences"),
        (lambda r: r.update(priors=[1]), "priors is not a table"),
        (lambda r: next(iter(r["priors"]["in_domain"].values())).pop("prior"), "priors.in_domain holds"),
        (
            lambda r: r["compute"].update(forest_flops="1e12"),
            "compute.forest_flops is '1e12', not a finite number",
        ),
        (lambda r: r["compute"]["ledger"][0].update(flops="x"), "flops and tokens must be finite numbers"),
        # a nan FLOPs ratio passed as compute-matched (nan - 1 is not > 0.01) and its arm was shaded best
        (
            lambda r: r["compute"]["methods"].update(top2=math.nan),
            "compute.methods holds something other than finite",
        ),
        (lambda r: r.update(seconds=math.inf), "seconds is inf, not a finite number"),
    ):
        r = json.loads(json.dumps(good))
        edit(r)
        (bad / "results.json").write_text(json.dumps(r))
        with pytest.raises(UserError, match=re.escape(says)):
            render_report(bad)


def test_results_copied_without_their_forest_still_show_their_ledger(qs_dir, tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    r = json.loads((qs_dir / "results.json").read_text())
    r["compute"]["forest_flops"] = None  # a hand-edit: the ledger's own sum then
    (alone / "results.json").write_text(json.dumps(r))
    ledger = r["compute"]["ledger"]
    cells = _parse(render_report(alone)).cells["ledger-results-json"]
    assert [row[:2] for row in cells[1 : 1 + len(ledger)]] == [[p["phase"], p["name"]] for p in ledger]


def test_a_nan_flops_ratio_is_flagged_as_not_compute_matched():
    """abs(nan - 1) > 0.01 is False: a nan ratio read as matched in every table that marks the ratio."""
    from elmforest.eval.report import flops_mark

    assert flops_mark(math.nan).endswith("!") and flops_mark(1.2).endswith("!")
    assert flops_mark(1.004) == "1.004" and flops_mark(None) == "-"
