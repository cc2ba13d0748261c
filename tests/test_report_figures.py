"""The report's figures and verdicts read truly: paired intervals wherever a change from fp is drawn,
no two series of a figure alike, every evaluated row in one figure, the weight kernels, the kernel's
share with its interval, a threshold applied to its own family only, one formatter per unit, and a
page a browser draws without overlapping labels, every table sortable."""

from __future__ import annotations

import random
import re

import polars as pl
import pytest

from kernelscope.cli import main
from kernelscope.reports import build_report, write_report
from kernelscope.reports import figures as F
from kernelscope.reports import numbers as N
from kernelscope.reports.html import page_data
from kernelscope.results import read_run

KINDS = ("profile", "eval", "threshold", "sweep", "advise")


@pytest.fixture(scope="module")
def five_runs(tmp_path_factory, tiny_llama_dir, text_file):
    """A profile (five formats at two widths, with and without Hadamard, three weight formats), an
    evaluation of four schemes in both bases, a threshold search, an α sweep in both bases and a plan,
    made by the command line on a tiny LLaMA."""
    root = tmp_path_factory.mktemp("five")
    model, common = str(tiny_llama_dir), ["-d", str(text_file), "-n", "4", "-s", "32", "--quiet"]
    commands = {
        "profile": ["profile", model, "-q", "per_token,crossquant,fp8_per_token,mxfp4,nvfp4", "-b", "8,4",
                    "--transform", "none,hadamard", "--weight-format", "per_token:8,per_group:4,mxfp4"],
        "eval": ["eval", model, "--scheme", "fp,w8a8-per-token,w4a4-per-token,nvfp4",
                 "--transform", "none,hadamard"],
        "threshold": ["threshold", model, "--steps", "2"],
        "sweep": ["sweep", model, "--alpha", "0.15,1", "--transform", "none,hadamard"],
        "advise": ["advise", model, "--scheme", "w4a8-g128-per-token"],
    }
    for name, args in commands.items():
        with pytest.raises(SystemExit) as exit_info:
            main([*args, *common, "-o", str(root / name)])
        assert exit_info.value.code == 0, name
    return {name: root / name for name in commands}


@pytest.fixture(scope="module")
def page(five_runs) -> str:
    return build_report([read_run(five_runs[k]) for k in KINDS])


def figure(text: str, title: str) -> dict:
    """The figure of a page whose title starts with ``title``."""
    for key, fig in page_data(text).items():
        shown = (fig.get("layout", {}).get("title") or {}) if key.startswith("fig-") else {}
        if str(shown.get("text", "")).startswith(title):
            return fig
    raise AssertionError(f"no figure titled {title!r}")


def section(text: str, heading: str) -> str:
    start = text.index(f"<h2>{heading}</h2>")
    return text[start:text.index("<h2>", start + 4)]


def rows_of(html: str) -> list[list[str]]:
    """The cells of a table's body rows, markup stripped."""
    body = html[html.index("<tbody>"):html.index("</tbody>")]
    return [[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", tr)]
            for tr in re.findall(r"<tr>(.*?)</tr>", body)]


def test_threshold_and_sweep_draw_the_change_from_fp_with_its_paired_interval(five_runs, page):
    table = pl.read_parquet(five_runs["threshold"] / "threshold.parquet").sort("kernel_fraction")
    trace = figure(page, "Threshold")["data"][0]
    assert trace["x"] == pytest.approx([100 * k for k in table["kernel_fraction"]], abs=1e-4)
    assert trace["y"] == pytest.approx(table["change_pct"].to_list(), abs=1e-4)
    assert trace["error_y"]["array"] == pytest.approx(
        (table["change_pct_ci_high"] - table["change_pct"]).to_list(), abs=1e-4)
    assert trace["error_y"]["arrayminus"] == pytest.approx(
        (table["change_pct"] - table["change_pct_ci_low"]).to_list(), abs=1e-4)
    sweep = pl.read_parquet(five_runs["sweep"] / "sweep.parquet").filter(pl.col("alpha").is_not_null())
    fig = figure(page, "CrossQuant α sweep")
    changes = [t for t in fig["data"] if t.get("xaxis", "x") == "x"]
    assert len(changes) == 2  # one line per transform
    for trace in changes:
        transform = "hadamard" if trace["name"].endswith(", hadamard") else "none"
        mine = sweep.filter(pl.col("transform") == transform).sort("alpha")
        assert trace["x"] == mine["alpha"].to_list()
        assert trace["y"] == pytest.approx(mine["change_pct"].to_list(), abs=1e-4)
        assert trace["error_y"]["array"] == pytest.approx(
            (mine["change_pct_ci_high"] - mine["change_pct"]).to_list(), abs=1e-4)
    assert [s["y0"] for s in fig["layout"]["shapes"]] == [0]  # the fp line: no change


def _style(trace: dict) -> tuple:
    if "lines" in trace.get("mode", "lines"):
        return "line", trace["line"]["color"], trace["line"].get("dash", "solid")
    return "marker", trace["marker"]["color"], trace["marker"].get("symbol", "circle")


def test_no_two_series_of_a_figure_look_alike(page):
    depth = figure(page, "Kernel per block")
    assert len({t["legendgroup"] for t in depth["data"]}) > 8  # more series than the old palette
    for key, fig in page_data(page).items():
        if not key.startswith("fig-"):
            continue
        styles: dict[tuple, set[str]] = {}
        for trace in fig["data"]:
            if trace.get("type") != "heatmap":
                styles.setdefault(_style(trace), set()).add(trace.get("legendgroup") or trace["name"])
        alike = {style: series for style, series in styles.items() if len(series) > 1}
        assert not alike, (fig["layout"]["title"]["text"], alike)
    # a configuration has one colour on the whole page: the threshold's family is drawn in its colour
    colour = {t["name"]: t["line"]["color"] for t in depth["data"]}
    assert figure(page, "Threshold")["data"][0]["line"]["color"] == colour["per_token int8"]
    assert colour["per_token int8"] != colour["crossquant a=0.15 int8"]


def test_many_colours_are_distinct():
    for n in (1, 8, 16, 17, 60):
        colours = F.palette(n)
        assert len(colours) == len(set(colours)) == n
        assert not set(colours) & set(F.MODULE_PALETTE)
    assert len({F.dash_of(i) for i in range(40)}) == 40


def naive_ties(rows: list[dict]) -> list[int]:
    """Reference: a row joins the group before it only when its interval overlaps every member's."""
    groups, members = [], []
    for r in rows:
        lo, hi = r.get("change_pct_ci_low"), r.get("change_pct_ci_high")
        if members and lo is not None and all(
                m["change_pct_ci_low"] is not None and lo <= m["change_pct_ci_high"]
                and m["change_pct_ci_low"] <= hi for m in members):
            members.append(r)
            groups.append(groups[-1])
        else:
            members = [r]
            groups.append(len(set(groups)))
    return groups


def test_tie_groups_follow_overlapping_intervals():
    made = [(-1, -2, 0), (0, -0.5, 0.5), (0.2, 0.1, 0.3), (3, 2, 4), (3.5, None, None), (4, 3, 5),
            (4.5, 3.2, 5)]
    rows = [{"change_pct": c, "change_pct_ci_low": lo, "change_pct_ci_high": hi} for c, lo, hi in made]
    assert F.tie_groups(rows) == naive_ties(rows) == [0, 0, 1, 2, 3, 4, 4]
    rng = random.Random(0)
    for _ in range(200):
        rows = sorted(({"change_pct": (c := rng.uniform(-5, 5)), "change_pct_ci_low": c - rng.uniform(0, 3),
                        "change_pct_ci_high": c + rng.uniform(0, 3)} for _ in range(8)),
                      key=lambda r: r["change_pct"])
        assert F.tie_groups(rows) == naive_ties(rows)


def test_every_evaluated_row_is_in_one_figure_with_its_paired_interval(five_runs, page):
    table = pl.read_parquet(five_runs["eval"] / "eval.parquet").filter(pl.col("change_pct").is_not_null())
    fig = figure(page, "Perplexity change from fp, every evaluated scheme")
    drawn = {}
    for trace in fig["data"]:
        for y, x, up, down in zip(trace["y"], trace["x"], trace["error_x"]["array"],
                                  trace["error_x"]["arrayminus"], strict=True):
            drawn[y] = (x, up, down)
    assert len(drawn) == len(table) == 6  # three schemes x two transforms
    rows = sorted(table.to_dicts(), key=lambda r: r["change_pct"])
    names = [F.series_name(r["scheme"], r["transform"]) for r in rows]
    assert fig["layout"]["yaxis"]["categoryarray"] == names  # best first
    for name, r in zip(names, rows, strict=True):
        assert drawn[name] == pytest.approx((r["change_pct"], r["change_pct_ci_high"] - r["change_pct"],
                                             r["change_pct"] - r["change_pct_ci_low"]), abs=1e-5)
    groups = naive_ties(rows)
    bands = sorted((s["y0"], s["y1"]) for s in fig["layout"].get("shapes", []) if s["type"] == "rect")
    expected = [(min(i for i, g in enumerate(groups) if g == k) - 0.45,
                 max(i for i, g in enumerate(groups) if g == k) + 0.45)
                for k in sorted(set(groups)) if groups.count(k) > 1]
    assert bands == pytest.approx(expected)


def test_weight_kernels_are_shown_per_format_and_module_type(five_runs, page):
    weights = pl.read_parquet(five_runs["profile"] / "weights.parquet")
    shown = {r[0]: r for r in rows_of(section(page, "Weight kernels"))}
    summary = read_run(five_runs["profile"]).summary
    assert len(shown) == len(summary["weights_model_level"]) == 6  # three formats x two bases
    types = weights["module_type"].unique(maintain_order=True).to_list()
    for level in summary["weights_model_level"]:
        row = shown[F.series_name(level["config"], level["transform"])]
        assert row[2] == N.share(level["kernel_fraction"])  # over every layer, as the run recorded it
        for i, t in enumerate(types):
            mine = weights.filter((pl.col("config") == level["config"]) & (pl.col("module_type") == t)
                                  & (pl.col("transform") == level["transform"]))
            assert row[3 + i] == N.share(mine["kernel_elements"].sum() / mine["elements"].sum()), (row, t)
    assert {r[1] for r in shown.values()} == {"INT8", "INT4", "FP4 (E2M1)"}


def test_the_kernel_share_is_shown_with_its_interval(five_runs):
    runs = [read_run(five_runs[k]) for k in ("profile", "advise")]
    advice = runs[1].summary
    advice["sensitivity"][0] |= {"kernel_share": 0.071, "kernel_share_ci_low": -0.46,
                                 "kernel_share_ci_high": 1.59}
    advice["sensitivity"][1] |= {"kernel_share": 0.3, "kernel_share_ci_low": 0.1, "kernel_share_ci_high": 0.5}
    advice["kernel_explains"] = {"share": 0.071, "ci_low": -0.46, "ci_high": 1.59}
    text = build_report(runs)
    plan = section(text, "Plan (advise)")
    assert "7.10% [-46.00%, 159.00%], not separable from 0" in plan
    assert "30.00% [10.00%, 50.00%]<" in plan and "50.00%], not separable" not in plan
    first = text[text.index('<section id="decision">'):text.index("</section>")]
    assert ("Removing only the kernel causes 7.10% [-46.00%, 159.00%], not separable from 0 of that loss"
            in first)


def located_run(five_runs):
    """The threshold run, its search made to have bracketed a crossing at 9.79% [7.87%, 9.87%]."""
    run = read_run(five_runs["threshold"])
    search = run.summary["searches"][0]
    search |= {"status": "crossing bracketed", "threshold_kernel_fraction": 0.0979,
               "crossing_uncertainty": {"kernel_fraction_ci_low": 0.0787, "kernel_fraction_ci_high": 0.0987}}
    return run


def test_a_threshold_judges_only_kernels_of_its_own_family_and_basis(five_runs):
    profile, threshold = read_run(five_runs["profile"]), located_run(five_runs)
    text = build_report([profile, threshold])
    family = threshold.summary["family"]
    verdict = rows_of(section(text, "Verdict"))
    html_rows = re.findall(r"<tr>(.*?)</tr>", section(text, "Verdict"))[1:]
    assert len(verdict) == len(profile.summary["model_level"]) == 14
    for level, cells, raw in zip(profile.summary["model_level"], verdict, html_rows, strict=True):
        assert cells[1] == F.series_name(level["config"], level["transform"])
        if level["config"] == family["label"] and level["transform"] == "none":
            k = level["kernel_fraction"]
            side = "below" if k < 0.0787 else "above" if k > 0.0987 else "within"
            assert "9.79% [7.87%, 9.87%]" in cells[4] and f'class="{side}"' in raw
        else:  # another family (even per-token INT4, or FP4), or the same one in another basis
            assert cells[4] == "no threshold measured for this family"
            assert 'class="below"' not in raw and 'class="above"' not in raw
    first = text[text.index('<section id="decision">'):text.index("</section>")]
    assert "per_token int8 9.79% [7.87%, 9.87%]" in first
    smallest = min((r for r in profile.summary["model_level"] if r["bits"] == 4),
                   key=lambda r: r["kernel_fraction"])
    name = F.series_name(smallest["config"], smallest["transform"])
    assert f"smallest 4-bit kernel measured, {name}, on an {F.grid_name(smallest)} grid" in first
    assert "INT4 kernel measured, nv" not in first and "INT4 kernel measured, mx" not in first


def test_a_single_profile_is_not_judged_by_the_papers_reference(five_runs):
    text = build_report([read_run(five_runs["profile"])])
    assert 'class="below"' not in text and 'class="above"' not in text
    first = text[text.index('<section id="decision">'):text.index("</section>")]
    assert "not judged here" in first
    for command in ("kernelscope threshold", "kernelscope eval", "kernelscope advise"):
        assert command in first, command


def test_the_figures_fit_their_data(page):
    fig = figure(page, "Threshold")
    xs = [x for t in fig["data"] for x in t["x"]]
    low, high = fig["layout"]["xaxis"]["range"]
    span = max(xs) - min(xs)
    assert min(xs) - 0.1 * span <= low <= min(xs) and max(xs) <= high <= max(xs) + 0.1 * span + 1
    heat = figure(page, "profile: kernel % by block")
    bars = [heat["layout"][k]["colorbar"] for k in ("coloraxis", "coloraxis2")]
    assert abs(bars[0]["x"] - bars[1]["x"]) >= 0.1 and all(b["title"]["side"] == "right" for b in bars)
    depth = figure(page, "Kernel per block")
    first = [t for t in depth["data"] if t.get("visible", True) is True]
    assert len({t["legendgroup"] for t in first}) == 7  # the first transform's configurations
    menu = depth["layout"]["updatemenus"][0]["buttons"]
    assert [b["label"] for b in menu] == ["no transform", "hadamard", "all"]
    assert figure(page, "Zero bound")["layout"]["yaxis"]["exponentformat"] == "power"


def test_what_was_measured_says_shared_facts_once(five_runs, page):
    measured = section(page, "What was measured")
    model = read_run(five_runs["profile"]).summary["model"]["path"]
    assert measured.count(model) == 1 and measured.count("text sha256") == 1
    advise = measured[measured.index("<h3>advise"):]
    assert "w4a8-g128-per-token" in advise
    profile = measured[measured.index("<h3>profile"):measured.index("<h3>eval")]
    assert "transforms</td><td>none (the input as it is), hadamard" in profile


def test_one_formatter_per_unit():
    assert N.share(3.4e-5) == "0.0034%" and N.share(0.02257) == "2.26%" and N.share(0) == "0.00%"
    assert N.percent(-0.004, signed=True) == "-0.0040%" and N.percent(1.95, signed=True) == "+1.95%"
    assert N.count(2044) == "2,044" and N.perplexity(1041.93529) == "1,041.9353"
    assert N.magnitude(6.619e-7) == "6.619×10⁻⁷" and N.magnitude(12.3456) == "12.35"
    assert N.magnitude(2044.4) == "2,044" and N.magnitude(0.001234) == "0.001234"
    rng = random.Random(1)
    for _ in range(2000):
        v = rng.choice((-1, 1)) * 10 ** rng.uniform(-9, 5)
        text = N.percent(v, signed=True)
        assert "-0.00%" not in text and text[0] in "+-"
        if "<" in text:
            assert abs(v) < 1e-6
            continue
        shown = float(text.rstrip("%").replace(",", ""))
        close = abs(shown - v) <= 0.005 + 1e-9 if abs(v) >= 0.01 else abs(shown / v - 1) <= 0.05
        assert shown != 0 and close
        mantissa, _, power = N.magnitude(v).replace(",", "").partition("×10")
        power = int(power.translate(str.maketrans("⁻⁰¹²³⁴⁵⁶⁷⁸⁹", "-0123456789")) or 0)
        assert float(mantissa) * 10.0 ** power == pytest.approx(v, rel=5e-4)


def test_the_page_writes_every_number_one_way(five_runs, page):
    body = re.sub(r"<script.*?</script>", "", page, flags=re.S)
    assert "-0.00%" not in body and "-0.00 pt" not in body
    assert not re.search(r"\d\.\d+e[+-]?\d+%", body)  # no scientific percentages
    for cell in re.findall(r'<td class="num">(.*?)</td>', body):
        assert not re.search(r"(?<![\d.,])\d{4,}", cell), cell  # thousands separated
    level = read_run(five_runs["profile"]).summary["model_level"]
    fp8 = next(r for r in level if r["config"] == "fp8_per_token")
    formats = {r[0]: r for r in rows_of(section(page, "Formats side by side"))}
    assert formats["fp8_per_token"][3] == N.share(fp8["kernel_fraction"])
    assert fp8["kernel_fraction"] == 0 or formats["fp8_per_token"][3] != "0.00%"


@pytest.fixture(scope="module")
def browser():
    from tests.test_report import CHROMEDRIVER, CHROMIUM

    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--window-size=1300,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


OVERLAPS = """
const boxes = Array.from(arguments[0].querySelectorAll(arguments[1]))
  .map(e => e.getBoundingClientRect()).filter(r => r.width > 0);
const hits = [];
for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
  const a = boxes[i], b = boxes[j];
  const apart = a.right - 1 <= b.left || b.right - 1 <= a.left
    || a.bottom - 1 <= b.top || b.bottom - 1 <= a.top;
  if (!apart) hits.push([i, j]);
}
return [boxes.length, hits];
"""


def test_the_page_in_a_browser_draws_apart_sorts_and_formats_alike(browser, five_runs, tmp_path):
    from selenium.webdriver.common.by import By

    from tests.test_report import open_page

    out = write_report([five_runs[k] for k in KINDS], tmp_path / "five.html")
    open_page(browser, out)  # the payloads unpack asynchronously: wait until the page has drawn
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    divs = {d.find_element(By.CSS_SELECTOR, ".gtitle").text: d
            for d in browser.find_elements(By.CSS_SELECTOR, "[data-figure]")}
    heat = next(d for title, d in divs.items() if "kernel % by block" in title)
    for selector in (".cbtitle", ".annotation"):  # colour bars' and panels' titles
        count, hits = browser.execute_script(OVERLAPS, heat, selector)
        assert count >= 2 and hits == [], selector
    threshold = next(d for title, d in divs.items() if title.startswith("Threshold"))
    count, hits = browser.execute_script(OVERLAPS, threshold, ".annotation")
    assert count >= 3 and hits == []
    depth = next(d for title, d in divs.items() if title.startswith("Kernel per block"))
    assert len(depth.find_elements(By.CSS_SELECTOR, ".legend .traces")) == 7

    tables = browser.find_elements(By.CSS_SELECTOR, "table:not(.facts)")
    assert len(tables) >= 8 and all(t.find_elements(By.CSS_SELECTOR, "thead th.sortable") for t in tables)
    evaluated = next(t for t in tables if "95% CI (paired)" in t.text)
    header = next(h for h in evaluated.find_elements(By.CSS_SELECTOR, "th") if h.text == "perplexity")
    column = [h.text for h in evaluated.find_elements(By.CSS_SELECTOR, "th")].index("perplexity")

    def values():
        return [float(r.find_elements(By.TAG_NAME, "td")[column].text.replace(",", ""))
                for r in evaluated.find_elements(By.CSS_SELECTOR, "tbody tr")]

    header.click()
    assert values() == sorted(values()) and evaluated.get_attribute("data-sort-dir") == "asc"
    header.click()
    assert values() == sorted(values(), reverse=True) and values()[0] > values()[-1]

    samples = [0, 3.4e-7, 3.4e-5, -4e-5, 0.0226, 0.5, 1.0, 12.345, 6.619e-7, 2044.4, 123456.7, -0.0123]
    js = browser.execute_script("return arguments[0].map(x => [KS_FORMAT.share(x), KS_FORMAT.magnitude(x)])",
                                samples)
    assert js == [[N.share(x), N.magnitude(x)] for x in samples]
    assert browser.execute_script("return KS_FORMAT.count(2044)") == N.count(2044)

