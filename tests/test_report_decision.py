"""The report's first screen makes the deployment decision of an advise run: the candidate to deploy with
its held-out change and interval, the runners-up, the files and the commands, what was not evaluated that
might beat it, the diagnostics (never recommended); a plan that failed its held-out check says so first;
the candidates table and the plan search's figure, made from real runs of the command line."""

from __future__ import annotations

import html
import json
import re
import shlex

import polars as pl
import pytest

from kernelscope.cli import main
from kernelscope.quant.targets import TARGETS
from kernelscope.reports import build_report, write_report
from kernelscope.reports import numbers as N
from kernelscope.reports.html import page_data
from kernelscope.results import read_run
from tests.test_cli import run_cli
from tests.test_report import (
    browser,  # noqa: F401  (the headless Chromium fixture)
    open_page,
)
from tests.test_report_figures import rows_of

SCHEMES = "w8a8-per-token,llm-compressor:W8A8,w8a8-crossquant"


@pytest.fixture(scope="module")
def plans(tmp_path_factory, tiny_llama_dir, text_file):
    """Advise runs of a tiny LLaMA on 4 windows: three schemes under two transforms ranked as deploy
    candidates (CrossQuant a diagnostic) and one deployment target under a 0.1% tolerance, which keeps
    layers and does not hold on the held-out windows, both checked on 4 held-out windows; and a
    SmoothQuant scheme in a Hadamard basis, calibrated, with no held-out windows (``--holdout 0``)."""
    root = tmp_path_factory.mktemp("decision")
    common = [str(tiny_llama_dir), "-d", str(text_file), "-n", "4", "-s", "32", "--kernel-groups", "none",
              "--quiet"]
    runs = {"candidates": ["--scheme", SCHEMES, "--transform", "none,hadamard"],
            "tight": ["--scheme", "llm-compressor:W8A8", "--tolerance", "0.001"],
            "smooth": ["--scheme", "w8a8-smoothquant", "--smooth-alpha", "0.7", "--transform", "hadamard",
                       "--calib-dataset", str(text_file), "--calib-nsamples", "2", "--holdout", "0"]}
    for name, args in runs.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["advise", *common, *args, "-o", str(root / name)])
        assert exit_info.value.code == 0, name
    return {name: root / name for name in runs}


def first_screen(text: str) -> str:
    return text[text.index('<section id="decision">'):text.index("</section>")]


def plain(fragment: str) -> str:
    """A fragment of the page as its reader sees it: markup stripped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def listed(first: str, heading: str) -> list[str]:
    """The items of the list under a bold heading of the first screen, as read."""
    found = re.search(rf"<b>{re.escape(heading)}</b>:</p><ul>(.*?)</ul>", first)
    return [] if found is None else [plain(item) for item in re.findall(r"<li>(.*?)</li>", found[1])]


def commands(first: str) -> dict[str, str]:
    """The commands the first screen gives, by what they do."""
    return {what: html.unescape(code) for what, code in re.findall(
        r"<b>(Measure it again|What the recipe itself deploys)</b>[^<]*<code>(.*?)</code>", first)}


def weight_bits(target) -> float:
    """Bits per weight of a deployment target, written out: the element's bits, and its block's scale
    (8 bits where the target names a scale dtype, else 16) shared among the block."""
    w = target.weights
    if w is None:
        return 16.0
    return w.num_bits + ((8 if w.scale_dtype else 16) / w.group_size if w.group_size else 0.0)


def ranked(summary: dict) -> list[dict]:
    return sorted(summary["candidates"], key=lambda r: r["rank"])


def behind(best: dict, r: dict) -> str:
    """Why ``r`` ranks behind ``best``, by the ranking rule written out: holding the tolerance, then bits
    per weight, then exact before approximate, then the change from fp."""
    if best["within_tolerance"] != r["within_tolerance"]:
        return "it does not hold the tolerance"
    if round(best["bits_per_weight"], 6) != round(r["bits_per_weight"], 6):
        return f"more bits per weight ({r['bits_per_weight']:.2f} against {best['bits_per_weight']:.2f})"
    if best["deployable"] != r["deployable"]:
        return "it is deployed approximately, the first exactly"
    return "a larger change from fp"


def test_the_first_screen_names_the_candidate_to_deploy_with_its_held_out_interval(plans):
    run = read_run(plans["candidates"])
    s, text = run.summary, build_report([run])
    first = first_screen(text)
    assert re.search(r"<h2>(.*?)</h2>", text)[1] == "Decision"  # the first thing on the page
    deployable = [r for r in ranked(s) if r["deployable"] != "none"]
    best = deployable[0]
    assert best["held_out"] and best["within_tolerance"], "the run was made to hold its tolerance"
    lead = plain(re.search(r'<p class="deploy">(.*?)</p>', first)[1])
    assert first.index('<p class="deploy">') < first.index("<b>Runners-up</b>")
    held = s["plan"]["holdout"]
    assert (held["plan"]["change_pct"], held["plan"]["change_pct_ci_high"]) == (
        best["change_pct"], best["change_pct_ci_high"])  # the folder's plan is the first candidate's
    figure = (f"{N.percent(best['change_pct'], signed=True)} "
              f"{N.interval(best['change_pct_ci_low'], best['change_pct_ci_high'], signed=True)} "
              f"on {held['windows']['windows']} held-out windows")
    assert lead.startswith(f"Deploy {best['scheme']} with {best['kept_layers']} Linear layer")
    assert figure in lead and "within the 1% tolerance" in lead
    by_interval = best["change_pct_ci_high"] <= 100 * s["tolerance"]
    assert ("by its interval" in lead) is by_interval
    assert ("by its point estimate only" in lead) is not by_interval
    # the two runners-up, one line each, in rank order, with their held-out interval
    runners = listed(first, "Runners-up")
    assert len(runners) == 2
    for line, r in zip(runners, deployable[1:3], strict=True):
        basis = "" if r["transform"] == "none" else f" in the {r['transform']} basis"
        assert line.startswith(f"#{r['rank']} {r['scheme']}{basis}: ")
        assert N.interval(r["change_pct_ci_low"], r["change_pct_ci_high"], signed=True) in line
        assert f"(behind #1: {behind(best, r)})" in line
    # the diagnostics, never recommended, with the reason
    diagnostics = [r for r in ranked(s) if r["deployable"] == "none"]
    shown = listed(first, "Diagnostics, never recommended")
    assert diagnostics and len(shown) == len(diagnostics)
    for line, r in zip(shown, diagnostics, strict=True):
        assert line.startswith(f"#{r['rank']} {r['scheme']}") and r["deploy_with"] in line
        assert r["scheme"] not in lead


def test_the_first_screen_gives_the_files_and_commands_that_deploy_it(plans, capsys, tiny_llama_dir,
                                                                        text_file):
    run = read_run(plans["candidates"])
    s, first = run.summary, first_screen(build_report([run]))
    folder, exports = plans["candidates"].resolve(), run.summary["exports"]
    files = [exports[k] for k in ("recipe", "modelopt", "modules") if exports.get(k)]
    assert exports["recipe"] and files
    assert all((folder / f).is_file() and str(folder / f) in plain(first) for f in files)
    for key, note in (("recipe", "recipe_note"), ("modelopt", "modelopt_note")):
        assert exports.get(key) or exports[note] in plain(first)  # a file not written: why
    found = commands(first)
    assert set(found) == {"Measure it again", "What the recipe itself deploys"}
    again = found["Measure it again"]
    assert again.startswith(f"kernelscope eval {tiny_llama_dir} -d {text_file} -s 32 -n 4 ")
    assert again.endswith(f"--ignore @{folder}")
    for command in found.values():  # each runs as written and measures the plan again, to the bit
        code, stdout, stderr = run_cli(capsys, *shlex.split(command)[1:], "--json")
        assert code == 0, stderr
        row = next(r for r in json.loads(stdout)["results"] if r["scheme"] != "fp")
        assert row["perplexity"] == s["plan"]["perplexity"]


def test_the_first_screen_names_what_was_not_evaluated_that_might_beat_it(plans):
    for name in ("candidates", "tight"):
        run = read_run(plans[name])
        s, first = run.summary, first_screen(build_report([run]))
        offers = ranked(s) if s.get("candidates") else [{"scheme": s["scheme"]["scheme"],
                                                         "transform": s["transform"], "deployable": "exact"}]
        plan, share = s["plan"], s["plan"]["parameter_share"]
        own = weight_bits(TARGETS[s["scheme"]["scheme"].lower()])
        best_bits = share * 16 + (1 - share) * own
        tried = {o["scheme"].lower() for o in offers}
        fewer = [t for key, t in TARGETS.items() if t.input_activations is not None and key not in tried
                 and weight_bits(t) < best_bits - 1e-9]
        untried = " ".join(listed(first, "Not evaluated, and might beat it"))
        nearest = max(weight_bits(t) for t in fewer)
        assert any(f"{t.label} ({nearest:.2f})" in untried for t in fewer if weight_bits(t) == nearest), name
        assert not any(f"{label} (" in untried.lower() for label in tried)
        transforms = {step.partition(":")[0] for o in offers for step in o["transform"].split("+")} - {"none"}
        for transform in ("hadamard", "smoothquant"):  # untried, and a chance only where layers are kept
            said = f"the {transform} transform, which no candidate tried" in untried
            assert said is (transform not in transforms and plan["kept_layers"] > 0), (name, transform)


def test_the_candidates_table_holds_every_candidate_in_rank_order(plans):
    run = read_run(plans["candidates"])
    text = build_report([run])
    start = text.index("<h2>Deploy candidates</h2>")
    section = text[start:text.index("<h2>", start + 4)]
    header = [plain(h) for h in re.findall(r"<th>(.*?)</th>", section)]
    rows = rows_of(section)
    table = run.tables["candidates"].sort("rank").to_dicts()
    assert len(rows) == len(table) and "candidates_ranking" in run.summary
    assert html.unescape(run.summary["candidates_ranking"]) in plain(section)
    at = {name: header.index(name) for name in ("rank", "role", "scheme", "transform", "deployable",
                                                  "bits / weight", "change from fp", "95% CI (paired)")}
    roles = []
    for row, r in zip(rows, table, strict=True):
        assert [html.unescape(row[at[k]]) for k in ("rank", "scheme", "transform", "deployable")] == [
            str(r["rank"]), r["scheme"], r["transform"], r["deployable"]]
        assert row[at["bits / weight"]] == N.bits(r["bits_per_weight"])
        assert row[at["change from fp"]] == N.percent(r["change_pct"], signed=True)
        assert row[at["95% CI (paired)"]] == N.interval(r["change_pct_ci_low"], r["change_pct_ci_high"],
                                                        signed=True)
        roles.append((row[at["role"]], r["deployable"]))
    deployable = [role for role, status in roles if status != "none"]
    assert deployable[:3] == ["deploy", "runner-up", "runner-up"]
    assert all(role == "diagnostic" for role, status in roles if status == "none")


def test_a_diagnostic_is_never_the_recommendation_even_with_the_best_figure(plans):
    run = read_run(plans["candidates"])
    rows = ranked(run.summary)
    deployable = [r for r in rows if r["deployable"] != "none"]
    diagnostic = next(r for r in rows if r["deployable"] == "none")
    best_change = min(r["change_pct"] for r in rows) - 1.0
    diagnostic |= {"change_pct": best_change, "change_pct_ci_low": best_change - 0.1,
                   "change_pct_ci_high": best_change + 0.1, "within_tolerance": True, "rank": 0,
                   "bits_per_weight": min(r["bits_per_weight"] for r in rows) - 1.0}
    first = first_screen(build_report([run]))
    lead = plain(re.search(r'<p class="deploy">(.*?)</p>', first)[1])
    assert lead.startswith(f"Deploy {deployable[0]['scheme']}") and diagnostic["scheme"] not in lead
    line = next(x for x in listed(first, "Diagnostics, never recommended") if x.startswith("#0 "))
    assert "(a better figure than the candidate to deploy)" in line and diagnostic["deploy_with"] in line
    for r in rows:  # every candidate a diagnostic: nothing is recommended
        r["deployable"] = "none"
    first = first_screen(build_report([run]))
    assert "No candidate can be deployed as measured" in first and '<p class="deploy">' not in first
    assert "Runners-up" not in first and len(listed(first, "Diagnostics, never recommended")) == len(rows)


def test_a_plan_that_failed_its_held_out_check_says_so_first(plans):
    run = read_run(plans["tight"])
    s = run.summary
    plan, held = s["plan"], s["plan"]["holdout"]
    assert plan["within_tolerance"] and not held["within_tolerance"], "the run was made to fail held out"
    first = first_screen(build_report([run]))
    block = first[first.index('<div class="deploy">'):]
    assert block.startswith('<div class="deploy"><p class="failed"><b>The plan failed its held-out check.')
    assert '<p class="deploy">' not in first  # never "Deploy"
    warning = plain(re.search(r'<p class="failed">(.*?)</p>', first)[1])
    figure = held["plan"]
    assert (f"{N.percent(figure['change_pct'], signed=True)} "
            f"{N.interval(figure['change_pct_ci_low'], figure['change_pct_ci_high'], signed=True)} on "
            f"{held['windows']['windows']} held-out windows, beyond the 0.1% tolerance") in warning
    assert f"({N.percent(plan['change_pct'], signed=True)} on the windows it was chosen on)" in warning
    kept = plan["kept_layers"]
    assert f"with {kept} Linear layer{'s' * (kept != 1)} kept in full precision" in warning
    # among candidates: the first deployable one failed, so none held
    run = read_run(plans["candidates"])
    for r in run.summary["candidates"]:
        r["within_tolerance"] = False
    first = first_screen(build_report([run]))
    assert "The plan failed its held-out check." in first and "No deployable candidate held it." in first


def test_a_plan_not_checked_on_held_out_windows_still_decides(plans, capsys, text_file):
    run = read_run(plans["smooth"])  # --holdout 0, as a run of an earlier version has no held-out figure
    s, plan = run.summary, run.summary["plan"]
    assert "holdout" not in plan and not s.get("candidates")
    text = build_report([run])
    first = first_screen(text)
    lead = plain(re.search(r'<p class="(?:deploy|failed)">(.*?)</p>', first)[1])
    assert (f"{N.percent(plan['change_pct'], signed=True)} "
            f"{N.interval(plan['change_pct_ci_low'], plan['change_pct_ci_high'], signed=True)} on the "
            f"{s['windows']['windows']} windows it was chosen on, not checked on held-out windows") in lead
    assert "w8a8-smoothquant in the smoothquant:0.7+hadamard basis" in lead
    section = text[text.index("<h2>Plan (advise)</h2>"):text.index("<h2>What was measured</h2>")]
    assert "held-out" not in section
    # the command repeats the scheme's own smoothing, the basis added to it and the calibration text
    again = commands(first)["Measure it again"]
    assert (f"--scheme fp,w8a8-smoothquant --smooth-alpha 0.7 --transform hadamard --calib-dataset "
            f"{text_file} --calib-nsamples 2 --ignore @{plans['smooth'].resolve()}") in again
    code, stdout, stderr = run_cli(capsys, *shlex.split(again)[1:], "--json")
    assert code == 0, stderr
    row = next(r for r in json.loads(stdout)["results"] if r["scheme"] != "fp")
    assert row["perplexity"] == plan["perplexity"]


def search_figure(text: str) -> dict:
    return next(f for key, f in page_data(text).items() if key.startswith("fig-")
                and "the plan search" in f["layout"]["title"]["text"])


def trace(fig: dict, name: str) -> dict:
    return next(t for t in fig["data"] if t["name"].startswith(name))


def ends(t: dict) -> list[tuple]:
    """Each point's interval, as drawn: (low, high), None where it has none."""
    bars = t.get("error_y")
    if not bars:
        return [None] * len(t["y"])
    return [None if up is None else (y - down, y + up)
            for y, up, down in zip(t["y"], bars["array"], bars["arrayminus"], strict=True)]


def test_the_search_curve_draws_each_keep_set_with_its_paired_interval(plans, capsys, tmp_path):
    run = read_run(plans["tight"])
    s, plan = run.summary, run.summary["plan"]
    search = run.tables["search"].sort("parameters")
    total = run.tables["cells"]["parameters"].sum()
    assert len(search) >= 3  # the scheme alone, and keep-sets the search measured
    text = build_report([run])
    fig = search_figure(text)
    points = trace(fig, "keep-sets measured")
    assert points["x"] == pytest.approx([100 * p / total for p in search["parameters"]], abs=1e-5)
    assert points["y"] == pytest.approx(search["change_pct"].to_list(), abs=1e-5)
    assert [shape["y0"] for shape in fig["layout"]["shapes"]] == pytest.approx([0, 100 * s["tolerance"]])
    star, diamond = trace(fig, "the plan (selection"), trace(fig, "the plan on 4 held-out")
    assert star["x"] == diamond["x"] == pytest.approx([100 * plan["parameter_share"]], abs=1e-5)
    assert star["y"] == pytest.approx([plan["change_pct"]], abs=1e-5)
    held = plan["holdout"]["plan"]
    assert diamond["y"] == pytest.approx([held["change_pct"]], abs=1e-5)
    assert ends(diamond)[0] == pytest.approx((held["change_pct_ci_low"], held["change_pct_ci_high"]),
                                             abs=1e-5)
    # the search table holds its own fp row (every cell kept, the reference pass): every point carries
    # its paired interval, and the two summary.json holds equal what advise computed itself
    assert search.filter(pl.col("stage") == "fp")["kept_cells"].to_list() == [len(run.tables["cells"])]
    whole = s["quantized"]
    known = {0: (whole["change_pct_ci_low"], whole["change_pct_ci_high"]),
             len(plan["kept_cells"]): (plan["change_pct_ci_low"], plan["change_pct_ci_high"])}
    drawn = ends(points)
    assert all(interval is not None and interval[0] <= y <= interval[1]
               for interval, y in zip(drawn, search["change_pct"], strict=True))
    for kept, interval in zip(search["kept_cells"], drawn, strict=True):
        if kept in known:
            assert interval == pytest.approx(known[kept], abs=1e-5)
    # the eval the page suggests measures fp on the same windows, to the bit: beside it, the same intervals
    again = commands(first_screen(text))["Measure it again"]
    code, _, stderr = run_cli(capsys, *shlex.split(again)[1:], "-o", str(tmp_path / "again"), "--quiet")
    assert code == 0, stderr
    fp = read_run(tmp_path / "again").tables["eval"].filter(pl.col("scheme") == "fp").row(0, named=True)
    assert fp["window_nll"] == search.filter(pl.col("stage") == "fp")["window_nll"][0].to_list()
    both = build_report([run, read_run(tmp_path / "again")])
    beside = ends(trace(search_figure(both), "keep-sets measured"))
    assert beside == [pytest.approx(i, abs=1e-9) for i in drawn]


def test_the_first_screen_in_a_browser(browser, plans, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    page = write_report([plans["candidates"], plans["tight"]], tmp_path / "decision.html")
    open_page(browser, page)  # the payloads unpack asynchronously: wait until the page has drawn
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    drawn = browser.execute_script("return Array.from(document.querySelectorAll('[data-figure]'))"
                                   ".filter(d => d.querySelector('.main-svg')).length")
    assert drawn == browser.execute_script("return document.querySelectorAll('[data-figure]').length") >= 2
    decision = browser.find_element(By.ID, "decision")
    lead = decision.find_element(By.CSS_SELECTOR, "p.deploy, p.failed")
    assert lead.location["y"] + lead.size["height"] < 1000  # on the first screen
    table = next(t for t in browser.find_elements(By.CSS_SELECTOR, "table") if "bits / weight" in t.text)
    header = next(h for h in table.find_elements(By.CSS_SELECTOR, "th") if h.text == "change from fp")
    column = [h.text for h in table.find_elements(By.CSS_SELECTOR, "th")].index("change from fp")

    def values():
        return [float(r.find_elements(By.TAG_NAME, "td")[column].text.rstrip("%"))
                for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]

    header.click()
    assert values() == sorted(values())
    header.click()
    assert values() == sorted(values(), reverse=True)
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_a_run_folder_named_with_markup_is_escaped_on_the_first_screen(plans, tmp_path):
    import shutil

    from tests.test_report import EVIL

    named = tmp_path / EVIL.replace("/", "_")
    shutil.copytree(plans["candidates"], named)
    text = build_report([read_run(named), read_run(plans["tight"])])
    first = first_screen(text)
    raw = EVIL.replace("/", "_")
    assert raw not in text and html.escape(raw) in first  # its heading, its files and its command
    assert f"--ignore {html.escape(shlex.quote(f'@{named.resolve()}'))}" in first  # quoted for a shell


def test_a_plan_not_written_to_a_folder_names_no_files(plans, tmp_path):
    from kernelscope.results import RunFolder

    summary = {k: v for k, v in read_run(plans["candidates"]).summary.items() if k != "output"}
    first = first_screen(build_report([RunFolder(tmp_path / "advise", summary, {})]))
    best = next(r for r in ranked(summary) if r["deployable"] != "none")
    assert "This plan was not written to a folder" in first and "<b>Files</b>" not in first
    assert f"--scheme {best['scheme']}" in html.unescape(first) and "-o runs/advice" in first
    assert first.index('<p class="deploy">') < first.index("This plan was not written")
