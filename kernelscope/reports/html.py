"""One self-contained HTML page from one or more run folders: plotly.js embedded once, every
model- or file-provided string escaped, sections without data replaced by the command that fills them.

What the page decides (which candidate to deploy and why, where a kernel lies against a threshold, what
to run next) is :mod:`.decision`'s, in words and values; this module escapes it and lays it out.
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
from kernelscope.quant.transforms import NONE
from kernelscope.reports import decision as D
from kernelscope.reports import figures as F
from kernelscope.reports import numbers as N
from kernelscope.reports import packing
from kernelscope.reports.decision import family_of
from kernelscope.reports.decision import point_estimate_only as point_estimate_only  # the terminal's too
from kernelscope.reports.decision import rerun_command as rerun_command  # the terminal's too
from kernelscope.reports.figures import esc
from kernelscope.reports.packing import asset
from kernelscope.results import RunFolder, check_report_file, default_mode, read_run
from kernelscope.results.paths import REPORT_TAG
from kernelscope.results.run_dir import make_parents, remove_made
from kernelscope.version import __version__

TABLE_COLUMNS = ("run", "layer", "block", "module_type", "transform", "config", "kernel_fraction",
                 "bound_p50", "bound_below_per_token_fraction", "c_ge_t_fraction", "abs_max")

STYLE = asset("report.css")
"""The page's style sheet."""

SCRIPT = asset("report.js")
"""The page's own script: it draws the figures and the layer table from the packed data."""


BOOT = asset("boot.js")
"""Unpacks plotly.js and the data, runs plotly.js, then hands the data to the page's own script."""


def _packed_script(element_id: str, packed: str) -> str:
    """A payload packed by :mod:`~kernelscope.reports.packing` in an inert ``<script>`` element."""
    return f'<script type="text/plain" id="{element_id}">{packed}</script>'


def page_data(html: str) -> dict:
    """The figures and tables a report page carries (what its script draws), read back from the page."""
    tag = '<script type="text/plain" id="ks-data">'
    start = html.index(tag) + len(tag)
    return json.loads(packing.unpack(html[start:html.index("</script>", start)]))


class _Page:
    def __init__(self, source: dict | None = None) -> None:
        self.parts: list[str] = []
        self.figures = 0
        self.data: dict[str, object] = {}  # what the page's script draws, packed once
        self.source = source or {}  # the run summary whose model, text and windows suggestions repeat

    def command(self, command: str) -> str:
        """The command that fills a section without data, on the runs' own model, text and windows."""
        return D.next_command(self.source, command)

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


NUMBER = re.compile(r"^(\[)?<?[+-]?[0-9][0-9,.]*(×10[⁻⁰¹²³⁴⁵⁶⁷⁸⁹]+)?( ?%| pt)?"
                    r"(, [+-]?[0-9][0-9,.]*%?\])?$")
"""A cell that is a number (``1,024``, ``+2.97%``, ``-8.80 pt``, ``6.619×10⁻⁷``) or an interval
(``[+1.2%, +3.4%]``): right-aligned, on one line."""


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], css: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if NUMBER.match(str(c)) else f"<td>{c}</td>"
                                    for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _pct(x: float | None) -> str:
    """A share as a percentage, as every percentage of the page is written (:func:`numbers.share`)."""
    return N.share(x)


def _facts(s: dict) -> dict[str, str]:
    """What one run measured, fact by fact: the model, text and windows, what it quantized (its
    quantizers or schemes, advise's scheme and tolerance, the weight formats) and in which bases, the
    protocol, versions and date; only the facts the run records."""
    m, t, w = s.get("model") or {}, s.get("text") or {}, s.get("windows") or {}
    scheme = s.get("scheme") if isinstance(s.get("scheme"), dict) else {}
    plan = s.get("plan") if isinstance(s.get("plan"), dict) else {}
    what = ", ".join(q.get("label", "") for q in s.get("quantizers", [])) or ", ".join(dict.fromkeys(
        r.get("scheme", "") for r in s.get("results", [])
        if isinstance(r, dict) and r.get("scheme"))) or scheme.get("scheme") or (
        (s.get("family") or {}).get("label", ""))
    candidates = [c for c in s.get("candidates") or [] if isinstance(c, dict)]  # advise's, ranked
    if candidates:
        what = ", ".join(dict.fromkeys(str(c.get("scheme", "")) for c in candidates)) + " (deploy candidates)"
    if scheme and s.get("tolerance") is not None:
        what += f", tolerance {100 * s['tolerance']:g}% above fp's perplexity"
    bases = [x.get("transform", "") for x in s.get("transforms") or [] if isinstance(x, dict)]
    bases = bases or sorted(dict.fromkeys(str(c.get("transform", NONE)) for c in candidates),
                            key=lambda basis: basis != NONE)
    bases = bases or ([s["transform"]] if isinstance(s.get("transform"), str) else [])
    tokens = s.get("tokens") or (w.get("windows", 0) * w.get("seqlen", 0))
    params = f", {m['parameters'] / 1e6:,.1f}M parameters" if m.get("parameters") else ""
    rows = [
        ("model", (f"{m.get('path', m.get('architecture', ''))} ({m.get('architecture', '')}{params}, "
                   f"{m.get('dtype', '')}, {m.get('device', '')})") if m else ""),
        ("text", t.get("description", "")), ("text sha256", t.get("sha256", "")),
        ("windows", w.get("description", "")), ("tokens", N.count(tokens) if tokens else ""),
        ("held-out windows", ((plan.get("holdout") or {}).get("windows") or {}).get("description", "")),
        ("tasks", ", ".join(str(task.get("task", "")) for task in s.get("tasks") or [])),
        ("protocol", s.get("protocol", "")), ("quantizers / schemes", what),
        ("weight formats", ", ".join(q.get("label", "") for q in s.get("weight_formats") or [])),
        ("transforms", ", ".join(b if b != NONE else "none (the input as it is)" for b in bases)),
        ("versions", ", ".join(f"{k} {v}" for k, v in (s.get("versions") or {}).items())),
        ("date", s.get("created", "")),
    ]
    return {k: str(v) for k, v in rows if v}


def _measured(page: _Page, runs: list[tuple[str, RunFolder]]) -> None:
    """The facts of every run; a fact that two or more runs record alike (the model, the text, the
    windows, the protocol) once, before the facts of each run, naming its runs where not all have it."""
    page.add("<h2>What was measured</h2>")
    facts = [(label, run.summary, _facts(run.summary)) for label, run in runs]
    shared = {}
    for key in dict.fromkeys(k for *_, f in facts for k in f):
        holders = [label for label, _, f in facts if key in f]
        if key != "date" and len(holders) > 1 and len({f[key] for *_, f in facts if key in f}) == 1:
            shared[key] = holders
    if shared:
        page.add(f"<p>Common to the runs ({esc(', '.join(label for label, *_ in facts))}):</p>")
        rows = [[esc(key) + ("" if len(who) == len(facts) else f" <small>({esc(', '.join(who))})</small>"),
                 esc(next(f[key] for *_, f in facts if key in f))] for key, who in shared.items()]
        page.add(_table(["", ""], rows, css="facts"))
    for label, s, f in facts:
        own = [[esc(k), esc(v)] for k, v in f.items() if k not in shared]
        page.add(f"<h3>{esc(label)} <small>({esc(s.get('kind', ''))})</small></h3>")
        if own:
            page.add(_table(["", ""], own, css="facts"))


MARKUP = {D.STRONG: "b", D.CODE: "code", D.ASIDE: "small"}
"""The element each mark of the decision's words is written in."""


def _piece(piece: D.Piece) -> str:
    """A piece of a sentence as HTML: words escaped whole, the report's own (:class:`decision.Own`) as
    they are, marked words escaped in their element."""
    if isinstance(piece, D.Marked):
        return f"<{MARKUP[piece.mark]}>{esc(piece.text)}</{MARKUP[piece.mark]}>"
    return piece if isinstance(piece, D.Own) else esc(piece)


def _words(words: Sequence[D.Piece]) -> str:
    """A sentence of :mod:`.decision` as HTML."""
    return "".join(map(_piece, words))


def _against_list(said: list[D.Against]) -> str:
    """A kernel against the thresholds located for its own family and basis (:func:`decision.against`),
    as coloured words; where none holds for it, that no threshold was measured for its family."""
    if not said:
        return f'<span class="missing">{esc(D.NO_THRESHOLD)}</span>'
    return "<br>".join(f'<span class="{a.side}">{esc(a.words)} {esc(a.threshold)}</span> ({esc(a.source)})'
                       for a in said)


def _list(heading: str, items: Sequence[Sequence[D.Piece]]) -> str:
    """A bold heading and its items, a list under it; nothing where there are none."""
    if not items:
        return ""
    return f"<p><b>{esc(heading)}</b>:</p><ul>" + "".join(f"<li>{_words(i)}</li>" for i in items) + "</ul>"


def _deploy_decision(label: str | None, summary: dict, run: RunFolder | None) -> str:
    """The first screen of an advise run (:func:`decision.deploy_decision`): its heading where several
    are shown, the lead, how it deploys, the files and commands, the runners-up, what was not evaluated
    that might beat it, and the diagnostics."""
    said = D.deploy_decision(summary, run)
    parts = [f"<h3>{esc(label)}</h3>"] if label else []
    parts.append(f'<p class="{said.lead.kind}">{_words(said.lead.words)}</p>')
    parts += [f"<p>{_words(p)}</p>" for p in ([said.how] if said.how else []) + said.files]
    parts += [_list("Runners-up", said.runners), _list("Not evaluated, and might beat it", said.untried),
              _list("Diagnostics, never recommended", said.diagnostics)]
    return '<div class="deploy">' + "".join(parts) + "</div>"


def _decision(page: _Page, labelled, profiles, thresholds, evals, sweeps, advices) -> None:
    """The first screen: what was measured on what, and for each model one paragraph on what to do,
    from that model's runs only."""
    page.add('<section id="decision"><h2>Decision</h2>')
    names = list(dict.fromkeys(D.model_name(run.summary) for _, run in labelled))
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
            f"{esc(name)} ({esc(', '.join(label for label, _ in D.of_model(labelled, name)))})"
            for name in names)
    if len(texts) == 1 and len(next(iter(texts.values()))) == len(labelled):
        models += f". <b>Text</b> {esc(next(iter(texts)))}"
    elif texts:
        models += ". <b>Texts</b> " + "; ".join(f"{esc(t)} ({esc(', '.join(labels))})"
                                                for t, labels in texts.items())
    page.add(f"<p>{models}.</p>")
    for name in names:
        mine = D.of_model(labelled, name)
        model = next(run.summary.get("model") or {} for _, run in mine)
        deciding = [(label, run) for label, run in mine if run.summary.get("kind") == "advise"]
        for label, run in deciding:  # the deployment decision first, one block per advise run
            named = len(deciding) > 1 or len(names) > 1
            page.add(_deploy_decision(label if named else None, run.summary, run))
        runs = [D.of_model(kind, name) for kind in (profiles, thresholds, evals, sweeps, advices)]
        said = D.advice_sentences(*runs, family_of(model), D.source_of([run.summary for _, run in mine]))
        lead = "" if len(names) == 1 else f"<b>{esc(name)}</b>: "
        page.add(f'<p class="decision">{lead}{" ".join(_words(words) for words in said)}</p>')
    apart = D.measured_apart(labelled)
    if apart:
        groups = "; ".join(", ".join(labels) for labels in apart)
        page.add(f'<p class="warning">These runs were measured on different text, windows or lengths '
                 f"({esc(groups)}): compare their figures with care.</p>")
    few = D.too_few_windows(labelled)
    if few:
        page.add(f'<p class="warning">The intervals of {esc(", ".join(few))} come from resampling '
                 f"{esc(', '.join(sorted({str(n) for n in few.values()})))} windows: too few to trust them "
                 f"(give <code>-n</code> {D.FEW_WINDOWS} or more).</p>")
    page.add("</section>")


def _verdict(page: _Page, profiles, thresholds) -> None:
    page.add("<h2>Verdict</h2>")
    if not profiles and not thresholds:
        page.missing("kernel measurement", page.command("profile"))
        return
    located = D.located_thresholds(thresholds)
    rows = []
    for label, run in profiles:
        reference = D.paper_reference(family_of(run.summary.get("model") or {}))
        ref = ('<span class="missing">none for this family</span>' if reference is None
               else f"{esc(reference)} <small>(the paper's models)</small>")
        rows += [[esc(label), esc(D.series(r)), esc(F.grid_name(r)), _pct(r["kernel_fraction"]),
                  _against_list(D.against(r, located, run.summary)), ref]
                 for r in run.summary.get("model_level", [])]
    if rows:
        page.add("<p>Model-level kernel, elements-weighted over every covered Linear input, against the "
                 "threshold located by <code>kernelscope threshold</code> for its own quantizer family and "
                 "basis, with that threshold's 95% interval (a kernel within it is undetermined); a kernel "
                 "of another family or basis is not compared with it. The CrossQuant paper's reference for "
                 "the model's family (perplexity near-lossless below about 19% on OPT, 1% on LLaMA, on the "
                 "paper's models) is shown beside it, not as a verdict on this model.</p>")
        page.add(_table(["run", "quantizer", "grid", "kernel", "threshold of its family",
                         "paper's reference"], rows))
    for label, s in thresholds:
        for search in F.searches_of(s):
            basis = "" if search.get("transform", NONE) == NONE else f", {search['transform']}"
            page.add(f"<p><b>{esc(label + basis)}</b> ({esc(search.get('status', ''))}; a threshold for "
                     f"{esc((s.get('family') or {}).get('label', 'its family'))} kernels):</p><ul>"
                     + "".join(f"<li>{item}</li>" for item in _search_verdicts(label, s, search)) + "</ul>")
    if not thresholds:
        page.missing("located threshold", page.command("threshold"))


def _search_verdicts(label: str, summary: dict, search: dict) -> list[str]:
    """What a threshold search says of the model's own kernels it counted (:func:`decision.search_verdicts`),
    an item each."""
    return [esc(v.words) if v.against is None else f"{esc(v.kernel)}: " + _against_list(v.against)
            for v in D.search_verdicts(label, summary, search)]


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
        parts.append(f"<code>{esc(repr(token))}</code>{count} ({N.magnitude(max(values))}){place}")
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
            channels = ", ".join(f"{c} ({N.magnitude(v)})" for c, v
                                 in zip(r["top_channels"][:5], r["top_channel_absmax"][:5], strict=False))
            sinks += bool(r.get("top_token_window_positions")) and r["top_token_window_positions"][0] == 0
            rows.append([esc(r["layer"]), N.magnitude(r["abs_max"]), esc(channels), _tokens(r)])
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
        cell = {(D.series(r), r["module_type"]): r["kernel_fraction"] for r in by_type}
        rows = [[esc(D.series(r)), esc(r.get("format") or ""), esc(r.get("block_size") or ""),
                 _pct(r["kernel_fraction"]), _pct(r.get("subnormal_fraction")),
                 _pct(r.get("block_kernel_fraction")),
                 *(_pct(cell.get((D.series(r), t))) for t in types)] for r in level]
        page.add(f"<h3>{esc(label)}</h3>" + _table(
            ["quantizer", "grid", "block", "kernel", "on subnormals", "whole blocks", *types], rows))
        _transforms_side_by_side(page, level)


def _weight_kernels(page: _Page, profiles: list[tuple[str, RunFolder]]) -> None:
    """Each profile's weight kernels (``weights.parquet``): per weight format and basis, the kernel over
    every covered Linear weight and per module type, elements-weighted."""
    runs = [(label, run.tables["weights"]) for label, run in profiles
            if "weights" in run.tables and len(run.tables["weights"])]
    if not runs:
        return
    page.add("<h2>Weight kernels</h2><p>The share of each weight's elements that its weight format rounds "
             "to zero, per weight format and basis: over every covered Linear weight, and per module "
             "type.</p>")
    for label, weights in runs:
        weights = _with_transform(weights)
        keys = ["config", "transform"]
        whole = weights.group_by(keys, maintain_order=True).agg(
            pl.col("format").first(), pl.col("bits").first(), pl.col("kernel_elements").sum(),
            pl.col("elements").sum())
        by_type = weights.group_by([*keys, "module_type"], maintain_order=True).agg(
            pl.col("kernel_elements").sum(), pl.col("elements").sum())
        types = by_type["module_type"].unique(maintain_order=True).to_list()
        cell = {(r["config"], r["transform"], r["module_type"]): r["kernel_elements"] / r["elements"]
                for r in by_type.iter_rows(named=True) if r["elements"]}
        rows = [[esc(D.series(r)), esc(F.grid_name(r)), _pct(r["kernel_elements"] / r["elements"]),
                 *(_pct(cell.get((r["config"], r["transform"], t))) for t in types)]
                for r in whole.iter_rows(named=True) if r["elements"]]
        page.add(f"<h3>{esc(label)}</h3>"
                 + _table(["weight format", "grid", "every layer", *types], rows))


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
            row += [_pct(value), "" if value is None or first is None else N.points(100 * (value - first))]
        rows.append(row)
    header = ["quantizer", bases[0]] + [h for b in bases[1:] for h in (b, f"{b} vs {bases[0]}")]
    page.add("<p>The model-level kernel in each basis (the input counted after the transform):</p>"
             + _table(header, rows))


def _eval_table(page: _Page, evals) -> None:
    page.add("<h2>Perplexity under quantization</h2>")
    if not evals:
        page.missing("evaluation", page.command("eval"))
        return
    forest = F.eval_forest(evals)
    if forest is not None:
        page.add("<p>Every evaluated scheme's change from fp with its paired 95% interval (resampled "
                 "together with fp's windows), best first; rows in one shaded band have intervals that all "
                 "overlap: read them as ties on these windows (each interval is against fp, not between "
                 "two schemes).</p>")
        page.figure(forest)
    for label, s in evals:
        reference = next((r for r in s["results"] if r["scheme"] == "fp"), None)
        fp = reference["perplexity"] if reference else None
        rows = [[esc(r["scheme"]), esc(D.weights(r).removeprefix("weights ")) or "fp",
                 "" if r.get("alpha") is None else f"{r['alpha']:g}",
                 esc(r.get("transform", NONE)), _fixed(r["perplexity"]),
                 _ci(r, "perplexity", N.perplexity),
                 N.percent(r["change_pct"], signed=True) if r.get("change_pct") is not None
                 else "" if fp is None or r is reference or r["perplexity"] is None
                 else N.percent(100 * (r["perplexity"] / fp - 1), signed=True),
                 _ci(r, "change_pct", N.percent, signed=True), esc(r.get("vs_fp") or ""),
                 _pct(r.get("kernel_fraction")), N.count(r.get("tokens"))] for r in s["results"]]
        page.add(f"<p><b>{esc(label)}</b>: {esc(s.get('protocol', ''))}</p>")
        page.add(_table(["scheme", "weights", "α", "transform", "perplexity", "95% CI", "vs fp",
                         "95% CI (paired)", "verdict", "activation kernel", "tokens"], rows))
        if s.get("uncertainty"):
            page.add(f"<p><small>{esc(s['uncertainty'])}</small></p>")


def _ci(row: dict, field: str, form=N.perplexity, **options) -> str:
    """``[low, high]`` of a row's interval as ``form`` writes each end, empty where it has none (one
    window, or an older run)."""
    return esc(N.interval(row.get(f"{field}_ci_low"), row.get(f"{field}_ci_high"), form, **options))


def _fixed(value: float | None, form=N.perplexity) -> str:
    """A number as ``form`` writes it (a perplexity), empty where there is none (a pass whose
    perplexity overflowed)."""
    return form(value)


def _group_kind(row: dict) -> str | None:
    """A sensitivity row's group kind (``kind`` in a run of schema version 2)."""
    return row.get("group_kind", row.get("kind"))


def _plan_rows(s: dict) -> list[list[str]]:
    """The plan against quantizing every layer: on the windows it was chosen on, and again on the
    held-out windows where it was checked there."""
    plan, whole, tolerance = s.get("plan") or {}, s.get("quantized") or {}, s.get("tolerance")
    kept = plan.get("kept_modules") or []
    name = (f"the plan: {len(kept)} layer{'s' * (len(kept) != 1)} kept "
            f"({_pct(plan.get('parameter_share'))} of the parameters)")
    chosen = {**plan, "within_tolerance": plan.get("within_tolerance")}
    rows = [["every layer quantized", _fixed(whole.get("perplexity")), _ci(whole, "perplexity"),
             esc(D.change(whole)), esc(whole.get("vs_fp") or ""), ""],
            [name, _fixed(plan.get("perplexity")), _ci(plan, "perplexity"), esc(D.change(plan)),
             esc(plan.get("vs_fp") or ""), esc(D.holds(chosen, tolerance, short=True))]]
    held = plan.get("holdout")
    if held:
        n = (held.get("windows") or {}).get("windows")
        on = f", on {n} held-out windows" if n else ", held out"
        h_whole, h_plan = held.get("quantized") or {}, held.get("plan") or {}
        rows += [[f"every layer quantized{on}", _fixed(h_whole.get("perplexity")), _ci(h_whole, "perplexity"),
                  esc(D.change(h_whole)), esc(h_whole.get("vs_fp") or ""), ""],
                 [f"the plan{on}", _fixed(h_plan.get("perplexity")), _ci(h_plan, "perplexity"),
                  esc(D.change(h_plan)), esc(h_plan.get("vs_fp") or ""),
                  esc(D.holds({**h_plan, "within_tolerance": held.get("within_tolerance")}, tolerance,
                             short=True))]]
    return rows


def _same_windows(a: dict, b: dict) -> bool:
    """Whether two runs measured the same model, in the same dtype, on the same windows."""
    ma, mb = a.get("model") or {}, b.get("model") or {}
    wa, wb = a.get("windows") or {}, b.get("windows") or {}
    same_model = (ma.get("identity") or ma.get("path")) == (mb.get("identity") or mb.get("path"))
    return (bool(wa.get("tokens_sha256")) and same_model and ma.get("dtype") == mb.get("dtype")
            and all(wa.get(k) == wb.get(k) for k in ("tokens_sha256", "seqlen", "windows")))


def _fp_windows(run: RunFolder, evals) -> tuple[list[float] | None, str]:
    """fp's per-window NLLs on the windows an advise plan was chosen on, and where they come from: the
    search table's own fp row (every cell kept), else the fp row, in the same basis, of an evaluation in
    the report measured on the same model and windows; None where neither holds them."""
    search, cells = run.tables.get("search"), run.tables.get("cells")
    every = len(cells) if cells is not None and len(cells) else None
    for r in search.iter_rows(named=True) if search is not None and "window_nll" in search.columns else ():
        if r.get("stage") == "fp" or (every is not None and r.get("kept_cells") == every):
            return list(r["window_nll"]), "the search's own fp row"
    basis = run.summary.get("transform", NONE)
    for label, other in evals:
        table = other.tables.get("eval")
        if (table is None or "window_nll" not in table.columns
                or not _same_windows(run.summary, other.summary)):
            continue
        same_basis = (pl.col("transform") == basis) if "transform" in table.columns else pl.lit(basis == NONE)
        fp = table.filter((pl.col("scheme") == "fp") & same_basis)
        if len(fp) and fp["window_nll"][0] is not None:
            return fp["window_nll"][0].to_list(), f"the fp row of {label}, on the same model and windows"
    return None, ""


def _search_figure(page: _Page, label: str, run: RunFolder, evals) -> None:
    """The plan search of an advise run (:func:`figures.search_curve`), and where its intervals come
    from."""
    search, s = run.tables.get("search"), run.summary
    drawn = {"kept_cells", "kept_layers", "parameters", "change_pct"}
    if search is None or not len(search) or not drawn <= set(search.columns):
        return
    plan, cells = s.get("plan") or {}, run.tables.get("cells")
    counted = cells is not None and "parameters" in cells.columns and len(cells)
    total = (int(cells["parameters"].sum()) if counted
             else plan["parameters"] / plan["parameter_share"] if plan.get("parameter_share") else None)
    fp, source = _fp_windows(run, evals)
    k = len(plan.get("kept_cells") or [])
    points = F.search_points(search, total, fp, {} if fp else {0: s.get("quantized") or {}, k: plan})
    chosen = next((p for p in points if p.kept_cells == k and p.kept_layers == plan.get("kept_layers")), None)
    held = plan.get("holdout")
    figure = (held or {}).get("plan") or {}
    again = (F.SearchPoint(k, plan.get("kept_layers") or 0, plan.get("parameter_share"),
                           figure.get("change_pct"), figure.get("change_pct_ci_low"),
                           figure.get("change_pct_ci_high"), held.get("within_tolerance")) if held else None)
    n = (s.get("windows") or {}).get("windows")
    said = (f"each with its paired 95% interval against fp's windows ({esc(source)})" if fp else
            "with paired 95% intervals where summary.json records them (the scheme alone, the plan): the "
            "others need fp's per-window losses, which this folder does not hold; an evaluation with fp on "
            "the same windows, in the same report (the command under Decision measures one), gives each its "
            "interval")
    page.add(f"<p>The keep-sets the search measured on the {n or ''} windows the plan was chosen on, "
             f"{said}. The star is the plan"
             + (", the diamond the plan on the held-out windows" if again else "") + ".</p>")
    page.figure(F.search_curve(label, points, s.get("tolerance"), chosen, again,
                               ((held or {}).get("windows") or {}).get("windows")))


def _advice_section(page: _Page, advices, evals=()) -> None:
    """What advise measured and chose: the scheme and tolerance, the plan against quantizing every
    layer (held out too, where it was checked), the plan search, the most sensitive groups of each kind,
    and the layers the plan keeps."""
    page.add("<h2>Plan (advise)</h2>")
    if not advices:
        page.missing("plan", page.command("advise"))
        return
    for label, run in advices:
        s = run.summary
        scheme, plan = s.get("scheme") or {}, s.get("plan") or {}
        weights = D.weights(scheme)
        tolerance = ("" if s.get("tolerance") is None
                     else f", tolerance {100 * s['tolerance']:g}% above fp's perplexity")
        page.add(f"<p><b>{esc(label)}</b>: {esc(scheme.get('scheme', ''))}"
                 + (f" ({esc(weights)})" if weights else "")
                 + f"{tolerance}; {s.get('forward_passes') or 0:.1f} full-pass equivalents.</p>")
        page.add(_table(["", "perplexity", "95% CI", "vs fp (paired)", "verdict", "within tolerance"],
                        _plan_rows(s)))
        _search_figure(page, label, run, evals)
        groups = s.get("sensitivity") or []
        top = [r for k in dict.fromkeys(map(_group_kind, groups))
               for r in sorted((g for g in groups if _group_kind(g) == k),
                               key=lambda g: g.get("rank") or 0)[:5]]
        if top:
            page.add("<p>The most sensitive groups of each kind, each quantized alone (the rest in full "
                     "precision), and the share of that loss its kernel alone causes where it was "
                     "measured, with its 95% interval (not separable from 0 where the interval holds "
                     "it):</p>")
            page.add(_table(["kind", "group", "rank", "layers", "vs fp", "KL", "kernel's share"],
                            [[esc(_group_kind(r)), esc(r.get("group", "")), esc(r.get("rank", "")),
                              N.count(r.get("layer_count")), esc(D.change(r)), N.magnitude(r.get("kl")),
                              esc(D.kernel_share(r.get("kernel_share"), r.get("kernel_share_ci_low"),
                                                r.get("kernel_share_ci_high")))]
                             for r in top]))
        kept = plan.get("kept_modules") or []
        if kept:
            page.add(f"<details><summary>The {len(kept)} layer{'s' * (len(kept) != 1)} the plan keeps in "
                     "full precision</summary><p>" + ", ".join(f"<code>{esc(m)}</code>" for m in kept)
                     + "</p></details>")


def _candidates_section(page: _Page, advices) -> None:
    """Every deploy candidate of each advise run that ranked several, rank 1 first, in a sortable table:
    its role, what it keeps, its bits per weight, how it deploys, its change from fp with its paired
    interval and on which windows, whether it held the tolerance, its figure on the selection windows."""
    ranked = [(label, run) for label, run in advices
              if run.summary.get("candidates") or "candidates" in run.tables]
    if not ranked:
        return
    page.add("<h2>Deploy candidates</h2>")
    for label, run in ranked:
        s, offers = run.summary, D.offers(run.summary, run)
        rows = [[esc(o.get("rank", "")), esc(role), esc(o.get("scheme", "")),
                 esc(o.get("transform", NONE)), esc(o.get("deployable", "")), N.count(o.get("kept_layers")),
                 _pct(o.get("parameter_share_kept")), N.bits(o.get("bits_per_weight")),
                 esc(N.percent(o.get("change_pct"), signed=True)),
                 esc(N.interval(o.get("change_pct_ci_low"), o.get("change_pct_ci_high"), signed=True)),
                 esc(D.where(o, short=True).removeprefix("on ")),
                 esc(D.how_held(o, s.get("tolerance"))),
                 esc(N.percent(o.get("selection_change_pct"), signed=True))]
                for o, role in zip(offers, D.roles(offers), strict=True)]
        page.add(f"<p><b>{esc(label)}</b>: each scheme under each transform planned on the windows it was "
                 "chosen on, then measured again on held-out windows. Ranked: "
                 f"{esc(s.get('candidates_ranking') or 'as advise ranks them')}</p>")
        page.add(_table(["rank", "role", "scheme", "transform", "deployable", "kept layers",
                         "kept parameters", "bits / weight", "change from fp", "95% CI (paired)",
                         "measured on", "tolerance", "on the selection windows"], rows))
        page.add("<details><summary>How each candidate deploys</summary><ul>" + "".join(
            f"<li>#{esc(o.get('rank', ''))} {_words(D.named(o))}: {esc(o.get('deploy_with') or '')}</li>"
            for o in offers) + "</ul></details>")


def _zeroshot_table(page: _Page, zeroshots) -> None:
    """Task x scheme: accuracy ± its standard error, and below it the change from fp, in points."""
    page.add("<h2>Zero-shot accuracy</h2>")
    if not zeroshots:
        page.missing("zero-shot evaluation", page.command("zeroshot"))
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
    stderr = "" if r.get("stderr") is None else f" ± {N.points(100 * r['stderr'], signed=False, unit='')}"
    text = N.points(100 * r["accuracy"], signed=False, unit="") + stderr
    if r.get("change_from_fp") is not None:
        text += f"<br><small>{N.points(100 * r['change_from_fp'], unit='')}</small>"
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
        c["float"] = table.schema[c["name"]].is_float()  # a magnitude, written as numbers.magnitude does
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


def _colours(tables, thresholds, sweeps) -> dict[str, str]:
    """One colour per quantizer configuration over the whole page: the profiles' configurations, the
    threshold searches' families (a family has its configuration's colour) and the swept quantizers."""
    names = [name for _, layers in tables for name in layers["config"].to_list()]
    names += [(s.get("family") or {}).get("label") for _, s in thresholds]
    names += [F.swept(r) for _, s in sweeps for r in s["results"] if r.get("alpha") is not None]
    return F.colour_of([name for name in names if name])


def _threshold_and_sweep(page: _Page, thresholds: list[tuple[str, RunFolder]], sweeps,
                         colours: dict[str, str]) -> None:
    """The threshold curve and the α sweep, or the commands that measure them."""
    page.add("<h2>Threshold</h2>")
    if thresholds:
        page.figure(F.threshold_curve([(lab, run.summary, run.tables.get("threshold"))
                                       for lab, run in thresholds], colours))
    else:
        page.missing("threshold search", page.command("threshold"))
    page.add("<h2>CrossQuant α sweep</h2>")
    if sweeps:
        page.figure(F.alpha_sweep(sweeps, colours))
    else:
        page.missing("α sweep", page.command("sweep"))


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

    page = _Page(D.source_of([run.summary for _, run in labelled]))
    heading = title or "kernelscope report: " + ", ".join(lab for lab, _ in labelled)
    page.add(f"<h1>{esc(heading)}</h1>")
    located = D.located_thresholds(thresholds)
    _decision(page, labelled, profiles, thresholds, evals, sweeps, advices)
    plans = by_kind("advise")
    decisive = [(plans, lambda: (_candidates_section(page, plans),
                                 _advice_section(page, plans, by_kind("eval")))),
                (evals, lambda: _eval_table(page, evals)),
                (zeroshots, lambda: _zeroshot_table(page, zeroshots))]
    for present, draw in decisive:  # what the decision rests on, right after it
        if present:
            draw()
    _measured(page, labelled)
    _verdict(page, profiles, thresholds)
    tables = [(lab, F.with_series(_with_transform(run.tables["layers"]))) for lab, run in profiles]
    colours = _colours(tables, thresholds, sweeps)
    if tables:
        _section(page, "Kernel along depth", [F.depth_kernel(tables, colours, located)])
        _section(page, "Kernel by block and module type", [F.heatmap(lab, layers) for lab, layers in tables])
        _section(page, "Zero bounds", [F.zero_bounds(tables, colours)])
        _section(page, "Where CrossQuant cannot shrink the bound", [F.c_ge_t(tables)])
        _formats(page, profiles)
        _weight_kernels(page, profiles)
        _outliers(page, profiles)
    else:
        page.add("<h2>Per-layer kernel</h2>")
        page.missing("profile", page.command("profile"),
                     "the per-layer, heatmap, zero-bound, c ≥ t, outlier and layer sections")
    _threshold_and_sweep(page, by_kind("threshold"), sweeps, colours)
    for present, draw in decisive:  # a section without data: the command that fills it
        if not present:
            draw()
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
