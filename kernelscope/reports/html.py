"""One self-contained HTML page from one or more run folders: plotly.js embedded once, every
model- or file-provided string escaped, sections without data replaced by the command that fills them.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.io as pio
import polars as pl

from kernelscope.errors import KernelscopeError
from kernelscope.quant.modes import Mode
from kernelscope.quant.transforms import NONE
from kernelscope.reports import figures as F
from kernelscope.reports import packing
from kernelscope.reports.figures import esc
from kernelscope.reports.packing import asset
from kernelscope.results import RunFolder, check_report_file, default_mode, read_run
from kernelscope.results.paths import REPORT_TAG
from kernelscope.results.run_dir import make_parents, remove_made
from kernelscope.version import __version__

PROFILE_COMMAND = "kernelscope profile MODEL -o DIR"
ZEROSHOT_COMMAND = ("kernelscope zeroshot MODEL --scheme fp --scheme w8a8-per-token "
                    "--tasks arc_easy,piqa -o DIR")
REFERENCE_THRESHOLDS = {"OPT": 0.19, "LLaMA": 0.01}
"""Kernel proportions below which the CrossQuant paper finds perplexity near-lossless, per family."""
FAMILIES = {"OPT": ("opt",), "LLaMA": ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma")}
"""Which model types (or architecture names' beginnings) each paper reference applies to."""

TABLE_COLUMNS = ("run", "layer", "block", "module_type", "transform", "config", "kernel_fraction",
                 "bound_p50", "bound_below_per_token_fraction", "c_ge_t_fraction", "abs_max")

STYLE = asset("report.css")
"""The page's style sheet."""

SCRIPT = asset("report.js")
"""The page's own script: it draws the figures and the layer table from the packed data."""


BOOT = asset("boot.js")
"""Unpacks plotly.js and runs it, before the page's own script draws."""


def _packed_script(element_id: str, packed: tuple[str, int, int]) -> str:
    """A payload packed by :mod:`~kernelscope.reports.packing` in an inert ``<script>`` element."""
    text, packed_size, size = packed
    return (f'<script type="text/plain" id="{element_id}" data-packed="{packed_size}" data-size="{size}">'
            f"{text}</script>")


def page_data(html: str) -> dict:
    """The figures and tables a report page carries (what its script draws), read back from the page."""
    start = html.index('<script type="text/plain" id="ks-data"')
    head, _, rest = html[start:].partition(">")
    packed_size = int(head.split('data-packed="')[1].split('"')[0])
    return json.loads(packing.unpack(rest.partition("</script>")[0], packed_size))


class _Page:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.figures = 0
        self.data: dict[str, object] = {}  # what the page's script draws, packed once

    def add(self, html: str) -> None:
        self.parts.append(html)

    def figure(self, fig) -> None:
        fid = f"fig-{self.figures}"
        self.figures += 1
        data = json.loads(pio.to_json(fig, validate=False, pretty=False))
        self.data[fid] = data
        self.add(f'<div class="figure" data-figure="{fid}"></div>')

    def missing(self, what: str, command: str, fills: str = "this section") -> None:
        self.add(f'<p class="missing">No {esc(what)} in these runs: <code>{esc(command)}</code> '
                 f"fills {esc(fills)}.</p>")


def _section(page: _Page, title: str, figures: list) -> None:
    page.add(f"<h2>{esc(title)}</h2>")
    for fig in figures:
        page.figure(fig)


def _label_runs(runs: Sequence[RunFolder]) -> list[str]:
    labels, seen = [], {}
    for run in runs:
        base = run.path.name or str(run.path)
        seen[base] = seen.get(base, 0) + 1
        labels.append(base if seen[base] == 1 else f"{base} ({seen[base]})")
    return labels


NUMBER = re.compile(r"^(\[)?[+-]?[0-9][0-9,.]*(e[+-]?[0-9]+)?( ?%| pt)?"
                    r"(, [+-]?[0-9][0-9,.]*(e[+-]?[0-9]+)?%?\])?$")
"""A cell that is a number (``1,024``, ``+2.97%``, ``-8.80 pt``) or an interval (``[+1.2, +3.4%]``):
right-aligned, on one line."""


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], css: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if NUMBER.match(str(c)) else f"<td>{c}</td>"
                                    for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _pct(x: float | None) -> str:
    """A share as a percentage; one below 0.0001 (an FP8 kernel) in scientific form."""
    if x is None:
        return ""
    return f"{100 * x:.1e}%" if 0 < abs(x) < 1e-4 else f"{100 * x:.2f}%"


def _measured(page: _Page, runs: list[tuple[str, RunFolder]]) -> None:
    page.add("<h2>What was measured</h2>")
    for label, run in runs:
        s = run.summary
        m, t, w = s.get("model") or {}, s.get("text") or {}, s.get("windows") or {}
        what = ", ".join(q.get("label", "") for q in s.get("quantizers", [])) or ", ".join(dict.fromkeys(
            r.get("scheme", "") for r in s.get("results", [])
            if isinstance(r, dict) and r.get("scheme"))) or (
            (s.get("family") or {}).get("label", ""))
        tokens = s.get("tokens") or (w.get("windows", 0) * w.get("seqlen", 0))
        params = f", {m['parameters'] / 1e6:,.1f}M parameters" if m.get("parameters") else ""
        rows = [
            ("model", (f"{m.get('path', m.get('architecture', ''))} ({m.get('architecture', '')}{params}, "
                       f"{m.get('dtype', '')}, {m.get('device', '')})")),
            ("text", t.get("description", "")), ("text sha256", t.get("sha256", "")),
            ("windows", w.get("description", "")), ("tokens", f"{tokens:,}" if tokens else ""),
            ("tasks", ", ".join(str(task.get("task", "")) for task in s.get("tasks") or [])),
            ("protocol", s.get("protocol", "")), ("quantizers / schemes", what),
            ("versions", ", ".join(f"{k} {v}" for k, v in (s.get("versions") or {}).items())),
            ("date", s.get("created", "")),
        ]
        page.add(f"<h3>{esc(label)} <small>({esc(s.get('kind', ''))})</small></h3>")
        page.add(_table(["", ""], [[esc(k), esc(v)] for k, v in rows if v], css="facts"))


def family_of(model: dict) -> str | None:
    """The paper's family a run's model belongs to (LLaMA-like or OPT), or None."""
    name = str(model.get("model_type") or model.get("architecture") or "").lower()
    return next((fam for fam, prefixes in FAMILIES.items() if name.startswith(prefixes)), None)


BRACKETED = "crossing bracketed"
"""The status of a threshold search that found the crossing between two measured points."""


def located_thresholds(thresholds) -> dict[str, float]:
    """The kernel thresholds the threshold runs located (their crossing bracketed), by basis; the
    first run's where several located one in the same basis."""
    found: dict[str, float] = {}
    for _, summary in thresholds:
        for search in F.searches_of(summary):
            if search.get("status") == BRACKETED and search.get("threshold_kernel_fraction") is not None:
                found.setdefault(search.get("transform", NONE), search["threshold_kernel_fraction"])
    return found


def _deployable(row: dict) -> bool:
    """An evaluation row of a scheme one could deploy: fake quantization, not a diagnostic pass
    (remove-kernel) or a reference."""
    return row.get("mode") == Mode.FAKE_QUANT


def _measured_on(summary: dict) -> tuple:
    """What a run's figures depend on besides the model: the text, the windows and their length."""
    return ((summary.get("text") or {}).get("sha256"), (summary.get("windows") or {}).get("tokens_sha256"),
            (summary.get("windows") or {}).get("seqlen"))


def _change(row: dict) -> str:
    """``+2.97% [2.50, 3.44]``: a row's perplexity change from fp with its paired interval."""
    if row.get("change_pct") is None:
        return ""
    ci = "" if row.get("change_pct_ci_low") is None else (
        f" [{row['change_pct_ci_low']:+.2f}, {row['change_pct_ci_high']:+.2f}]")
    return f"{row['change_pct']:+.2f}%{ci}"


def _weights(row: dict) -> str:
    ("What a scheme does to the weights, in words: ``weights int4 g128``, ``weights mxfp4``, "
     "or empty for fp.")
    if row.get("weight_format"):
        return f"weights {row['weight_format']}"
    if row.get("weight_bits"):
        group = f" g{row['group_size']}" if row.get("group_size") else " per output channel"
        return f"weights int{row['weight_bits']}{group}"
    return ""


def _share(x: float) -> str:
    """A share of a loss in %, with a decimal where it is small."""
    return f"{100 * x:.1f}%" if abs(x) < 0.1 else f"{100 * x:.0f}%"


def _recommendation(evals, sweeps, advices) -> list[str]:
    """Sentences on what to deploy: advise's plan first, else the evaluated scheme closest to fp."""
    said = []
    for _, s in advices[:1]:
        plan, whole = s["plan"], s["quantized"]
        basis = "" if s.get("transform", NONE) == NONE else f" in the {s['transform']} basis"
        said.append(f"Deploy <b>{esc((s.get('scheme') or {}).get('scheme', ''))}"
                    f"</b>{esc(basis)} with {plan['kept_layers']} Linear "
                    f"layer{'s' * (plan['kept_layers'] != 1)} kept in full precision "
                    f"({_pct(plan.get('parameter_share'))} of the covered parameters): perplexity "
                    f"{_fixed(plan.get('perplexity')) or 'not finite'}, {esc(_change(plan))} from fp"
                    f"{'' if plan.get('within_tolerance') else ', not within the tolerance'} (advise).")
        tolerance, high = s.get("tolerance"), plan.get("change_pct_ci_high")
        if (plan.get("within_tolerance") and tolerance is not None and high is not None
                and high > 100 * tolerance):
            said.append(f"Its interval reaches {high:+.2f}%, beyond the {100 * tolerance:g}% tolerance: "
                        "the plan is within it by its point estimate only; more windows (<code>-n</code>) "
                        "narrow the interval.")
        said.append(f"Quantizing every layer costs {esc(_change(whole))}.")
        share = s.get("kernel_explains") or {}
        if share.get("share") is not None:
            ci = "" if share.get("ci_low") is None else (
                f" [{_share(share['ci_low'])}, {_share(share['ci_high'])}]")
            said.append(f"Removing only the kernel causes {_share(share['share'])}{ci} of that loss.")
    quantized = [r for _, s in evals for r in s["results"]
                 if r.get("change_pct") is not None and r.get("perplexity") is not None and _deployable(r)]
    if quantized:
        best = min(quantized, key=lambda r: r["perplexity"])
        basis = "" if best.get("transform", NONE) == NONE else f", {best['transform']}"
        weights = f" ({_weights(best)})" if _weights(best) else ""
        said.append(f"Of the schemes evaluated{' with every layer quantized' if advices else ''}, "
                    f"<b>{esc(best['scheme'] + basis)}</b>{esc(weights)} is closest to fp: "
                    f"{esc(_change(best))} ({esc(best.get('vs_fp') or '')}).")
    for _, s in sweeps[:1]:
        rows = [r for r in s["results"] if r.get("alpha") is not None and r.get("perplexity") is not None]
        if rows:
            best = min(rows, key=lambda r: r["perplexity"])
            said.append(f"The CrossQuant sweep is best at α = {best['alpha']:g} ({esc(_change(best))}).")
    return said


def _smallest_int4(profiles, bases=None) -> dict | None:
    """The smallest model-level INT4 kernel of the profiles (counted in one of ``bases`` where given)."""
    rows = [r for _, run in profiles for r in run.summary.get("model_level") or []
            if r.get("bits") == 4 and (bases is None or r.get("transform", NONE) in bases)]
    return min(rows, key=lambda r: r["kernel_fraction"], default=None)


def _int4(evals, profiles, located, advices=()) -> list[str]:
    """Whether 4-bit activations are viable: measured in an evaluation, else the INT4 kernel against
    the threshold located on this model."""
    rows = [r for _, s in evals for r in s["results"] if r.get("activation_bits") == 4
            and r.get("change_pct") is not None and r.get("perplexity") is not None and _deployable(r)]
    for _, advice in advices:
        scheme = advice.get("scheme") or {}
        if (scheme.get("activation_bits") == 4
                and (advice.get("quantized") or {}).get("perplexity") is not None):
            rows.append({**advice["quantized"], "transform": advice.get("transform", NONE)})
    said = []
    if rows:
        best = min(rows, key=lambda r: r["perplexity"])
        weights = f", {_weights(best)}" if _weights(best) else ""
        said.append(f"4-bit activations: the best evaluated, {esc(best['scheme'])}"
                    f"{'' if best.get('transform', NONE) == NONE else ', ' + esc(best['transform'])}"
                    f"{esc(weights)}, costs {esc(_change(best))} with every layer quantized.")
    best = _smallest_int4(profiles, located)
    if best is None:
        return said
    basis = best.get("transform", NONE)
    threshold = located[basis]
    verdict = "below" if best["kernel_fraction"] <= threshold else "above"
    said.append(f"{'Its' if said else '4-bit activations: the'} smallest INT4 kernel measured, "
                f"{esc(_series(best))} at {_pct(best['kernel_fraction'])}, is {verdict} the "
                f"{_pct(threshold)} threshold located on this model"
                + ("" if basis == NONE else f" in the {esc(basis)} basis") + ".")
    return said


FEW_WINDOWS = 8
"""Below this many windows a bootstrap interval is too rough to act on; the first screen says so."""
INTERVAL_KINDS = ("eval", "threshold", "sweep", "advise", "sensitivity")
"""The runs whose figures carry intervals resampled over their windows."""


def _model_name(summary: dict) -> str:
    model = summary.get("model") or {}
    return str(model.get("path") or model.get("architecture") or "")


def _of_model(pairs, name: str) -> list:
    """The (label, run or summary) pairs whose run was made on the model ``name``."""
    return [(label, run) for label, run in pairs
            if _model_name(run.summary if isinstance(run, RunFolder) else run) == name]


def _advice_sentences(profiles, thresholds, evals, sweeps, advices, family: str | None) -> list[str]:
    """What to do, in words, from the runs of one model."""
    located = located_thresholds(thresholds)
    said = _recommendation(evals, sweeps, advices) + _int4(evals, profiles, located, advices)
    for label, run in profiles[:1]:  # what the profile measured, in one sentence
        level = run.summary.get("model_level") or []
        if level:
            said.append(f"The model-level kernel ({esc(label)}): " + ", ".join(
                f"{esc(_series(r))} {_pct(r['kernel_fraction'])}" for r in level) + ".")
    if located and not any("threshold located" in x for x in said):
        said.append("The kernel threshold located on this model is " + ", ".join(
            _pct(v) + ("" if basis == NONE else f" in the {esc(basis)} basis")
            for basis, v in located.items()) + ".")
    unbracketed = [search for _, t in thresholds for search in F.searches_of(t)
                   if search.get("status") != BRACKETED
                   and search.get("threshold_kernel_fraction") is not None]
    for search in unbracketed[:1]:
        said.append(f"The threshold search did not bracket a crossing ({esc(search.get('status', ''))}): "
                    f"every kernel up to {_pct(search['threshold_kernel_fraction'])} "
                    "stayed within the tolerance.")
    if family and not located:
        reference = REFERENCE_THRESHOLDS[family]
        said.append(f"The CrossQuant paper's reference for {family} models is {100 * reference:g}% "
                    "(the paper's, not measured here: <code>kernelscope threshold</code> "
                    "locates this model's).")
        best = _smallest_int4(profiles[:1])
        if best is not None:
            side = "below" if best["kernel_fraction"] <= reference else "above"
            said.append(f"The smallest INT4 kernel measured, {esc(_series(best))} at "
                        f"{_pct(best['kernel_fraction'])}, is {side} it.")
    if not said:
        said.append("No evaluation in these runs: <code>kernelscope advise MODEL</code> or "
                    "<code>kernelscope eval MODEL</code> measures what a scheme costs.")
    return said


def _decision(page: _Page, labelled, profiles, thresholds, evals, sweeps, advices) -> None:
    """The first screen: what was measured on what, and for each model one paragraph on what to do,
    from that model's runs only."""
    page.add('<section id="decision"><h2>Decision</h2>')
    names = list(dict.fromkeys(_model_name(run.summary) for _, run in labelled))
    texts: dict[str, list[str]] = {}
    for label, run in labelled:
        text = run.summary.get("text") or {}
        shown = str(text.get("description") or text.get("source") or "")
        if shown:
            texts.setdefault(shown, []).append(label)
    if len(names) == 1:
        models = f"<b>Model</b> {esc(names[0])}"
    else:
        models = "<b>Models</b> " + "; ".join(
            f"{esc(name)} ({esc(', '.join(label for label, _ in _of_model(labelled, name)))})"
            for name in names)
    if len(texts) == 1 and len(next(iter(texts.values()))) == len(labelled):
        models += f". <b>Text</b> {esc(next(iter(texts)))}"
    elif texts:
        models += ". <b>Texts</b> " + "; ".join(f"{esc(t)} ({esc(', '.join(labels))})"
                                                for t, labels in texts.items())
    page.add(f"<p>{models}.</p>")
    for name in names:
        model = next(run.summary.get("model") or {} for _, run in _of_model(labelled, name))
        said = _advice_sentences(_of_model(profiles, name), _of_model(thresholds, name),
                                 _of_model(evals, name), _of_model(sweeps, name), _of_model(advices, name),
                                 family_of(model))
        lead = "" if len(names) == 1 else f"<b>{esc(name)}</b>: "
        page.add(f'<p class="decision">{lead}{" ".join(said)}</p>')
    bases = {}
    for label, run in labelled:
        if run.summary.get("text") or run.summary.get("windows"):
            bases.setdefault(_measured_on(run.summary), []).append(label)
    if len(bases) > 1:
        groups = "; ".join(", ".join(labels) for labels in bases.values())
        page.add(f'<p class="warning">These runs were measured on different text, windows or lengths '
                 f"({esc(groups)}): compare their figures with care.</p>")
    few = {label: n for label, run in labelled if run.summary.get("kind") in INTERVAL_KINDS
           and (n := (run.summary.get("windows") or {}).get("windows") or 0) and n < FEW_WINDOWS}
    if few:
        page.add(f'<p class="warning">The intervals of {esc(", ".join(few))} come from resampling '
                 f"{esc(', '.join(sorted({str(n) for n in few.values()})))} windows: too few to trust them "
                 f"(give <code>-n</code> {FEW_WINDOWS} or more).</p>")
    page.add("</section>")


def _verdict(page: _Page, profiles, thresholds) -> None:
    page.add("<h2>Verdict</h2>")
    if not profiles and not thresholds:
        page.missing("kernel measurement", PROFILE_COMMAND)
        return
    located = {
        (label if search.get("transform", NONE) == NONE else f"{label}, {search['transform']}"): (search, s)
        for label, s in thresholds for search in F.searches_of(s)
        if search.get("threshold_kernel_fraction") is not None and search.get("status") == BRACKETED}
    rows = []
    for label, run in profiles:
        for r in run.summary.get("model_level", []):
            cells = [esc(label), esc(_series(r)), _pct(r["kernel_fraction"])]
            family = family_of(run.summary.get("model") or {})
            ref = REFERENCE_THRESHOLDS.get(family)
            side = None if ref is None else ("below" if r["kernel_fraction"] < ref else "above")
            cells.append('<span class="missing">no reference for this family</span>' if ref is None
                         else f'<span class="{side}">{side} the paper\'s {family} {100 * ref:g}%</span>')
            located_txt = []
            for tl, (ts, where) in located.items():
                t = ts["threshold_kernel_fraction"]
                side = "below" if r["kernel_fraction"] <= t else "above"
                other = ("" if _measured_on(where) == _measured_on(run.summary)
                         else ", located on other text or windows")
                located_txt.append(f'<span class="{side}">{side} {_pct(t)} ({esc(tl + other)})</span>')
            cells.append("<br>".join(located_txt) or '<span class="missing">none located</span>')
            rows.append(cells)
    if rows:
        page.add("<p>Model-level kernel, elements-weighted over every covered Linear input, against any "
                 "threshold located by <code>kernelscope threshold</code> and the CrossQuant paper's "
                 "reference for the model's own family (perplexity near-lossless below about 19% on OPT, "
                 "1% on LLaMA).</p>")
        page.add(_table(["run", "quantizer", "kernel", "located threshold", "paper's reference"],
                        [[*row[:3], row[4], row[3]] for row in rows]))
    for label, s in thresholds:
        for search in F.searches_of(s):
            basis = "" if search.get("transform", NONE) == NONE else f", {search['transform']}"
            page.add(f"<p><b>{esc(label + basis)}</b> ({esc(search.get('status', ''))}):</p><ul>"
                     + "".join(f"<li>{esc(v)}</li>" for v in search.get("verdicts", [])) + "</ul>")
    if not thresholds:
        page.missing("located threshold", "kernelscope threshold MODEL -o DIR")


def _tokens(row: dict) -> str:
    """A layer's top tokens, each once with how often it occurs, and where in its window: a token at
    position 0 is the window's first, where attention sinks put their outliers whatever the word."""
    where = row.get("top_token_window_positions") or [None] * len(row["top_tokens"])
    seen: dict[tuple[str, bool], list[float]] = {}
    for token, pos, value in zip(row["top_tokens"], where, row["top_token_absmax"], strict=False):
        seen.setdefault((token, pos == 0), []).append(value)
    parts = []
    for (token, sink), values in list(seen.items())[:5]:
        count = f" ×{len(values)}" if len(values) > 1 else ""
        place = " <b>first token (attention sink)</b>" if sink else ""
        parts.append(f"<code>{esc(repr(token))}</code>{count} ({max(values):.3g}){place}")
    return ", ".join(parts)


def _one_row_per_input(layers: pl.DataFrame) -> pl.DataFrame:
    """Layers fed the same tensor (q/k/v, gate/up: the same block, maximum and outliers) as one row
    named by all of them."""
    key = [c for c in ("block", "abs_max", "top_channels", "top_token_positions") if c in layers.columns]
    return (layers.group_by(key, maintain_order=True)
            .agg(pl.col("layer").str.join(" / "), pl.exclude([*key, "layer"]).first())
            .select(layers.columns))


def _outliers(page: _Page, profiles) -> None:
    page.add("<h2>Top outlier channels and tokens</h2>")
    channel_layers: dict[int, set[tuple[str, str]]] = {}
    for label, run in profiles:
        table = _with_transform(run.tables["layers"])
        basis = NONE if (table["transform"] == NONE).any() else table["transform"][0]
        layers = table.filter(pl.col("transform") == basis).unique(subset="layer", maintain_order=True)
        inputs = _one_row_per_input(layers)  # q/k/v (gate/up) once: one input
        for r in inputs.iter_rows(named=True):
            for c in r["top_channels"][:5]:
                channel_layers.setdefault(c, set()).add((label, r["layer"]))
        top = inputs.sort("abs_max", descending=True, maintain_order=True).head(12)
        rows, sinks = [], 0
        for r in top.iter_rows(named=True):
            channels = ", ".join(f"{c} ({v:.3g})" for c, v
                                 in zip(r["top_channels"][:5], r["top_channel_absmax"][:5], strict=False))
            sinks += bool(r.get("top_token_window_positions")) and r["top_token_window_positions"][0] == 0
            rows.append([esc(r["layer"]), f"{r['abs_max']:.4g}", esc(channels), _tokens(r)])
        page.add(f"<p><b>{esc(label)}</b>"
                 + ("" if basis == NONE
                    else f" (in the {esc(basis)} basis: the profile did not count the input as it is)")
                 + ": the 12 layers with the largest |x|, their largest channels (c_j) "
                 "and tokens (t_i, decoded, with how often each occurs and its largest |x|). "
                 f"In {sinks} of them the largest token is the first of its window: an attention sink, an "
                 "effect of the position rather than of the word.</p>")
        page.add(_table(["layer", "max |x|", "top channels (c_j)", "top tokens (t_i)"], rows))
    persistent = sorted(((len(where), c, len({run for run, _ in where}))
                         for c, where in channel_layers.items() if len(where) >= 3), reverse=True)[:8]
    if persistent:
        page.add("<p>Channels among the five largest of many layers (the same outlier dimensions run through "
                 "the residual stream): " + ", ".join(
                     f"<b>{c}</b> in {n} layer inputs" + (f" of {runs} runs" if runs > 1 else "")
                     for n, c, runs in persistent) + ".</p>")


def _formats(page: _Page, profiles: list[tuple[str, RunFolder]]) -> None:
    """Every quantizer of each profile side by side: its grid and block, its model-level kernel, the
    shares on subnormal codes and in whole-kernel blocks, and its kernel per module type."""
    page.add("<h2>Formats side by side</h2>")
    for label, run in profiles:
        level = run.summary.get("model_level") or []
        by_type = run.summary.get("by_module_type") or []
        types = list(dict.fromkeys(r["module_type"] for r in by_type))
        cell = {(_series(r), r["module_type"]): r["kernel_fraction"] for r in by_type}
        rows = [[esc(_series(r)), esc(r.get("format") or ""), esc(r.get("block_size") or ""),
                 _pct(r["kernel_fraction"]), _pct(r.get("subnormal_fraction")),
                 _pct(r.get("block_kernel_fraction")),
                 *(_pct(cell.get((_series(r), t))) for t in types)] for r in level]
        page.add(f"<h3>{esc(label)}</h3>" + _table(
            ["quantizer", "grid", "block", "kernel", "on subnormals", "whole blocks", *types], rows))
        _transforms_side_by_side(page, level)


def _series(row: dict) -> str:
    """A row's configuration, with its transform where that is not the identity."""
    return F.series_name(row["config"], row.get("transform", NONE))


def _transforms_side_by_side(page: _Page, level: list[dict]) -> None:
    """Each configuration's model-level kernel in every basis the profile counted, and the change
    from the first (nothing when it counted one)."""
    bases = list(dict.fromkeys(r.get("transform", NONE) for r in level))
    if len(bases) < 2:
        return
    cell = {(r["transform"], r["config"]): r["kernel_fraction"] for r in level}
    rows = []
    for config in dict.fromkeys(r["config"] for r in level):
        first = cell.get((bases[0], config))
        row = [esc(config), _pct(first)]
        for basis in bases[1:]:
            value = cell.get((basis, config))
            row += [_pct(value), "" if value is None or first is None else f"{100 * (value - first):+.2f} pt"]
        rows.append(row)
    header = ["quantizer", bases[0]] + [h for b in bases[1:] for h in (b, f"{b} vs {bases[0]}")]
    page.add("<p>The model-level kernel in each basis (the input counted after the transform):</p>"
             + _table(header, rows))


def _eval_table(page: _Page, evals) -> None:
    page.add("<h2>Perplexity under quantization</h2>")
    if not evals:
        page.missing("evaluation", "kernelscope eval MODEL --scheme fp --scheme w8a8-per-token "
                                   "--scheme w8a8-crossquant -o DIR")
        return
    for label, s in evals:
        reference = next((r for r in s["results"] if r["scheme"] == "fp"), None)
        fp = reference["perplexity"] if reference else None
        rows = [[esc(r["scheme"]), esc(_weights(r).removeprefix("weights ")) or "fp",
                 "" if r.get("alpha") is None else f"{r['alpha']:g}",
                 esc(r.get("transform", NONE)), f"{r['perplexity']:.4f}",
                 _ci(r, "perplexity", "{:.4f}"),
                 "" if fp is None or r is reference else f"{100 * (r['perplexity'] / fp - 1):+.2f}%",
                 _ci(r, "change_pct", "{:+.2f}%"), esc(r.get("vs_fp") or ""),
                 _pct(r.get("kernel_fraction")), esc(r["tokens"])] for r in s["results"]]
        page.add(f"<p><b>{esc(label)}</b>: {esc(s.get('protocol', ''))}</p>")
        page.add(_table(["scheme", "weights", "α", "transform", "perplexity", "95% CI", "vs fp",
                         "95% CI (paired)", "verdict", "activation kernel", "tokens"], rows))
        if s.get("uncertainty"):
            page.add(f"<p><small>{esc(s['uncertainty'])}</small></p>")


def _ci(row: dict, field: str, spec: str) -> str:
    """``[low, high]`` of a row's interval, empty where it has none (one window, or an older run)."""
    low, high = row.get(f"{field}_ci_low"), row.get(f"{field}_ci_high")
    return "" if low is None or high is None else esc(f"[{spec.format(low)}, {spec.format(high)}]")


def _fixed(value: float | None, spec: str = "{:.4f}") -> str:
    """A number as ``spec`` writes it, empty where there is none (a pass whose perplexity overflowed)."""
    return "" if value is None else spec.format(value)


def _group_kind(row: dict) -> str | None:
    """A sensitivity row's group kind (``kind`` in a run of schema version 2)."""
    return row.get("group_kind", row.get("kind"))


def _advice_section(page: _Page, advices) -> None:
    """What advise measured and chose: the scheme and tolerance, the plan against quantizing every
    layer, the most sensitive groups of each kind, and the layers the plan keeps."""
    page.add("<h2>Plan (advise)</h2>")
    if not advices:
        page.missing("plan", "kernelscope advise MODEL --scheme w4a8-g128-per-token -o DIR")
        return
    for label, s in advices:
        scheme, plan, whole = s.get("scheme") or {}, s.get("plan") or {}, s.get("quantized") or {}
        weights = _weights(scheme)
        tolerance = ("" if s.get("tolerance") is None
                     else f", tolerance {100 * s['tolerance']:g}% above fp's perplexity")
        page.add(f"<p><b>{esc(label)}</b>: {esc(scheme.get('scheme', ''))}"
                 + (f" ({esc(weights)})" if weights else "")
                 + f"{tolerance}; {s.get('forward_passes') or 0:.1f} full-pass equivalents.</p>")
        kept = plan.get("kept_modules") or []
        rows = [["every layer quantized", _fixed(whole.get("perplexity")), _ci(whole, "perplexity", "{:.4f}"),
                 esc(_change(whole)), esc(whole.get("vs_fp") or ""), ""],
                [(f"the plan: {len(kept)} layer{'s' * (len(kept) != 1)} kept "
                  f"({_pct(plan.get('parameter_share'))} of the parameters)"),
                 _fixed(plan.get("perplexity")), _ci(plan, "perplexity", "{:.4f}"),
                 esc(_change(plan)), esc(plan.get("vs_fp") or ""),
                 "yes" if plan.get("within_tolerance") else "no"]]
        page.add(_table(["", "perplexity", "95% CI", "vs fp (paired)", "verdict", "within tolerance"], rows))
        groups = s.get("sensitivity") or []
        top = [r for k in dict.fromkeys(map(_group_kind, groups))
               for r in sorted((g for g in groups if _group_kind(g) == k),
                               key=lambda g: g.get("rank") or 0)[:5]]
        if top:
            page.add("<p>The most sensitive groups of each kind, each quantized alone (the rest in full "
                     "precision), and the share of that loss its kernel alone causes where it was "
                     "measured:</p>")
            page.add(_table(["kind", "group", "rank", "layers", "vs fp", "KL", "kernel's share"],
                            [[esc(_group_kind(r)), esc(r.get("group", "")), esc(r.get("rank", "")),
                              esc(r.get("layer_count", "")), esc(_change(r)), _fixed(r.get("kl"), "{:.4g}"),
                              "" if r.get("kernel_share") is None else _share(r["kernel_share"])]
                             for r in top]))
        if kept:
            page.add(f"<details><summary>The {len(kept)} layer{'s' * (len(kept) != 1)} the plan keeps in "
                     "full precision</summary><p>" + ", ".join(f"<code>{esc(m)}</code>" for m in kept)
                     + "</p></details>")


def _zeroshot_table(page: _Page, zeroshots) -> None:
    """Task x scheme: accuracy ± its standard error, and below it the change from fp, in points."""
    page.add("<h2>Zero-shot accuracy</h2>")
    if not zeroshots:
        page.missing("zero-shot evaluation", ZEROSHOT_COMMAND)
        return
    for label, s in zeroshots:
        results = s["results"]
        schemes = list(dict.fromkeys(r["scheme"] for r in results))
        keys = list(dict.fromkeys((r["task"], r["metric"], r["filter"]) for r in results))
        cell = {(r["task"], r["metric"], r["filter"], r["scheme"]): r for r in results}
        rows = []
        for task, metric, filter_key in keys:
            shown = task if filter_key == "none" else f"{task} ({filter_key})"
            rows.append([esc(shown), esc(metric), *(_accuracy(cell.get((task, metric, filter_key, scheme)))
                                                    for scheme in schemes)])
        page.add(f"<p><b>{esc(label)}</b>: accuracy in % ± its standard error; below it the change from fp, "
                 "in points (protocol above, under What was measured).</p>")
        page.add(_table(["task", "metric", *schemes], rows))


def _accuracy(r: dict | None) -> str:
    if r is None:
        return ""
    text = f"{100 * r['accuracy']:.2f}" + ("" if r.get("stderr") is None else f" ± {100 * r['stderr']:.2f}")
    if r.get("change_from_fp") is not None:
        text += f"<br><small>{100 * r['change_from_fp']:+.2f}</small>"
    return text


def _with_transform(layers: pl.DataFrame) -> pl.DataFrame:
    """A profile's rows with their ``transform`` (``none`` in a run written before profiles had one)."""
    return layers if "transform" in layers.columns else layers.with_columns(pl.lit(NONE).alias("transform"))


def _layer_table(page: _Page, profiles) -> None:
    page.add("<h2>Layers</h2>")
    frames = [_with_transform(run.tables["layers"]).with_columns(pl.lit(label).alias("run"))
              .select(TABLE_COLUMNS) for label, run in profiles]
    table = pl.concat(frames, how="vertical_relaxed")
    cols = [{"name": c, "pct": c.endswith("fraction")} for c in TABLE_COLUMNS]
    # Repeated strings travel once: such a column holds indices into its "values".
    for i, c in enumerate(TABLE_COLUMNS):
        if table.schema[c] == pl.String:
            values = table[c].unique(maintain_order=True).to_list()
            cols[i]["values"] = values
            table = table.with_columns(pl.col(c).replace_strict(values, list(range(len(values)))).alias(c))
    rows = [[float(f"{v:.5g}") if isinstance(v, float) else v for v in row] for row in table.iter_rows()]
    names = {"kernel_fraction": "kernel", "bound_p50": "bound p50",
             "bound_below_per_token_fraction": "bound < per-token",
             "c_ge_t_fraction": "c ≥ t", "abs_max": "max |x|", "module_type": "module type"}
    for c in cols:
        c["title"] = names.get(c["name"], c["name"])
        c["numeric"] = table.schema[c["name"]].is_numeric() and "values" not in c
    page.add('<p>Click a header to sort (layer names in natural order); type to filter: the box below '
             'matches every word somewhere in a row, as shown (<code>down_proj int8</code>), the boxes under '
             'the headers one column each (<code>&gt;5</code> or <code>&lt;0.1%</code> for numbers). The CSV '
             'holds the rows shown under the column names of the results files, shares as fractions, to 5 '
             'significant digits (the files hold them in full). '
             '<span id="layer-count"></span></p>'
             '<input id="layer-filter" type="search" placeholder="filter, e.g. down_proj int8"> '
             '<button id="layer-wide" type="button">wide view (quantizers side by side)</button> '
             '<button id="layer-csv" type="button">download CSV of the rows shown</button>'
             '<div class="scroll"><table id="layer-table"><thead></thead><tbody></tbody></table></div>')
    page.data["layer-rows"], page.data["layer-cols"] = rows, cols


def build_report(runs: Sequence[RunFolder], *, title: str | None = None) -> str:
    """The whole page as a string."""
    if not runs:
        raise KernelscopeError("a report needs at least one run folder")
    labelled = list(zip(_label_runs(runs), runs, strict=True))
    by_kind = lambda kind: [(lab, run) for lab, run in labelled if run.summary.get("kind") == kind]  # noqa: E731
    profiles = [(lab, run) for lab, run in by_kind("profile") if "layers" in run.tables]
    thresholds = [(lab, run.summary) for lab, run in by_kind("threshold")]
    sweeps = [(lab, run.summary) for lab, run in by_kind("sweep")]
    evals = [(lab, run.summary) for lab, run in by_kind("eval")]
    zeroshots = [(lab, run.summary) for lab, run in by_kind("zeroshot")]
    advices = [(lab, run.summary) for lab, run in by_kind("advise")]

    page = _Page()
    heading = title or "kernelscope report: " + ", ".join(lab for lab, _ in labelled)
    page.add(f"<h1>{esc(heading)}</h1>")
    located = located_thresholds(thresholds)
    _decision(page, labelled, profiles, thresholds, evals, sweeps, advices)
    _measured(page, labelled)
    _verdict(page, profiles, thresholds)
    tables = [(lab, F.with_series(_with_transform(run.tables["layers"]))) for lab, run in profiles]
    colours = F.colour_of([name for _, layers in tables for name in layers["series"].to_list()])
    if tables:
        _section(page, "Kernel along depth", [F.depth_kernel(tables, colours, located.get(NONE))])
        _section(page, "Kernel by block and module type", [F.heatmap(lab, layers) for lab, layers in tables])
        _section(page, "Zero bounds", [F.zero_bounds(tables, colours)])
        _section(page, "Where CrossQuant cannot shrink the bound", [F.c_ge_t(tables)])
        _formats(page, profiles)
        _outliers(page, profiles)
    else:
        page.add("<h2>Per-layer kernel</h2>")
        page.missing("profile", PROFILE_COMMAND,
                     "the per-layer, heatmap, zero-bound, c ≥ t, outlier and layer sections")
    page.add("<h2>Threshold</h2>")
    if thresholds:
        page.figure(F.threshold_curve(thresholds))
    else:
        page.missing("threshold search", "kernelscope threshold MODEL -o DIR")
    page.add("<h2>CrossQuant α sweep</h2>")
    if sweeps:
        page.figure(F.alpha_sweep(sweeps))
    else:
        page.missing("α sweep", "kernelscope sweep MODEL --alpha 0.15,0.45,0.75,1 -o DIR")
    _eval_table(page, evals)
    _advice_section(page, advices)
    _zeroshot_table(page, zeroshots)
    if profiles:
        _layer_table(page, profiles)
    page.add(f'<p class="missing">Written by kernelscope {esc(__version__)}.</p>')

    data = json.dumps(page.data, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">" + REPORT_TAG +
            f"<title>{esc(heading)}</title><style>\n{STYLE}</style>"
            f"</head><body>" + "\n".join(page.parts)
            + _packed_script("ks-plotly", packing.packed_plotly())
            + _packed_script("ks-data", packing.pack(data.encode("utf-8")))
            + f"<script>\n{packing.UNPACK_JS}\n{BOOT}</script><script>\n{SCRIPT}</script></body></html>\n")


def write_report(run_dirs: Sequence[str | Path] | Sequence[RunFolder], output: str | Path, *,
                 overwrite: bool = False, title: str | None = None, option: str = "report") -> Path:
    """Read the run folders and write the report to ``output`` atomically.

    An existing ``output`` is replaced only with ``overwrite`` and only when kernelscope wrote it;
    ``option`` is how error messages name the path (the command-line option that gave it).
    """
    staged = stage_report(run_dirs, output, overwrite=overwrite, title=title, option=option)
    staged.commit()
    return staged.final


@dataclass
class StagedReport:
    """A complete report in a hidden file beside its final place."""

    final: Path
    file: Path | None = None  # None until the hidden file is made: nothing of the user's is ever removed
    made: list[Path] = field(default_factory=list)

    def commit(self) -> None:
        os.replace(self.file, self.final)

    def discard(self) -> None:
        if self.file is not None:
            self.file.unlink(missing_ok=True)
        remove_made(self.made)


def stage_report(run_dirs: Sequence[str | Path] | Sequence[RunFolder], output: str | Path, *,
                 overwrite: bool = False, title: str | None = None, option: str = "report") -> StagedReport:
    """Build the report of the run folders and write it in full beside ``output``, to be committed (put in
    place) or discarded together with other output. A place that cannot be written is one error naming
    ``option``, with nothing left behind."""
    out = check_report_file(output, overwrite, option=option)
    folders = [Path(r).expanduser().resolve() for r in run_dirs if not isinstance(r, RunFolder)]
    if len(set(folders)) != len(folders):
        twice = next(f for f in folders if folders.count(f) > 1)
        raise KernelscopeError(f"the run folder {twice} is given twice; give each run once")
    runs = [r if isinstance(r, RunFolder) else read_run(r) for r in run_dirs]
    try:
        text = build_report(runs, title=title)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, pl.exceptions.PolarsError) as exc:
        if isinstance(exc, KernelscopeError):
            raise
        names = ", ".join(str(r.path) for r in runs)
        raise KernelscopeError(f"cannot build a report: a run folder among {names} is incomplete or damaged "
                               f"({type(exc).__name__}: {exc})") from None
    staged = StagedReport(out)
    try:
        staged.made = make_parents(out)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
        staged.file = Path(name)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        default_mode(staged.file, directory=False)
    except BaseException as exc:
        staged.discard()
        if isinstance(exc, OSError):
            raise KernelscopeError(f"{option} {output} cannot be written ({exc.strerror or exc}); "
                                   "nothing was written") from None
        raise
    return staged
