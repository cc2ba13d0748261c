"""One self-contained HTML page from one or more run folders: plotly.js embedded once, every
model- or file-provided string escaped, sections without data replaced by the command that fills them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.io as pio
import polars as pl

from kernelscope.errors import KernelscopeError
from kernelscope.quant.formats import FULL_PRECISION_BITS, stored_bits
from kernelscope.quant.modes import Mode
from kernelscope.quant.targets import TARGETS
from kernelscope.quant.transforms import COMPOSE, NONE, TRANSFORMS
from kernelscope.reports import figures as F
from kernelscope.reports import numbers as N
from kernelscope.reports import packing
from kernelscope.reports.figures import esc
from kernelscope.reports.packing import asset
from kernelscope.results import RunFolder, check_report_file, default_mode, read_run
from kernelscope.results.paths import REPORT_TAG
from kernelscope.results.run_dir import make_parents, remove_made
from kernelscope.version import __version__

NEXT_COMMANDS = {
    "profile": ("-o", "runs/profile"),
    "threshold": ("-o", "runs/threshold"),
    "sweep": ("--alpha", "0.15,0.45,0.75,1", "-o", "runs/sweep"),
    "eval": ("--scheme", "fp,w8a8-per-token,w8a8-crossquant", "-o", "runs/eval"),
    "advise": ("--scheme", "w4a8-g128-per-token", "-o", "runs/advice"),
    "zeroshot": ("--scheme", "fp,w8a8-per-token", "--tasks", "arc_easy,piqa", "-o", "runs/zeroshot"),
}
"""What each command a section without data names adds to the runs' own model, text and windows."""
WINDOWED = ("profile", "eval", "threshold", "sweep", "advise")
"""The commands that read windows of a text (``--dataset``, ``--seqlen``, ``--nsamples``)."""
LEAST = {"threshold": (2, 2), "advise": (2, 2), "eval": (1, 2), "sweep": (1, 2)}
"""The fewest windows and tokens a window each command takes (a threshold search and advise resample
at least 2 windows; perplexity predicts every token of a window but the first)."""
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


def rerun_options(summary: dict, command: str) -> list[str]:
    """The arguments that give ``command`` a run's model, text and windows: the model and ``--dataset``
    as given, ``--seqlen`` and ``-n`` (raised to the least ``command`` takes), and ``--windows random`` with
    its ``--seed`` where the windows were drawn. What the summary does not record is left out (a run
    made through the Python API names no model: ``MODEL`` stands for it)."""
    model = summary.get("model") or {}
    args = [str(model.get("model") or model.get("path") or "MODEL")]
    if command not in WINDOWED:
        return args
    text, windows = summary.get("text") or {}, summary.get("windows") or {}
    least_windows, least_seqlen = LEAST.get(command, (1, 1))
    if text.get("source"):
        args += ["-d", str(text["source"])]
    if windows.get("seqlen"):
        args += ["-s", str(max(int(windows["seqlen"]), least_seqlen))]
    if windows.get("windows"):
        args += ["-n", str(max(int(windows["windows"]), least_windows))]
    if windows.get("selection") == "random":
        args += ["--windows", "random", "--seed", str(windows.get("seed") or 0)]
    return args


def rerun_command(summary: dict, command: str, *extra: str) -> str:
    """``kernelscope COMMAND`` on a run's model, text and windows (:func:`rerun_options`), then ``extra``:
    a command that runs as written, in a shell, and measures what the run measured."""
    return shlex.join(["kernelscope", command, *rerun_options(summary, command), *extra])


def point_estimate_only(plan: dict, tolerance: float | None) -> str | None:
    """Where a plan is within the tolerance by its point estimate while its interval reaches beyond, the
    words that say so, the same in the report and on the terminal; None otherwise."""
    high = plan.get("change_pct_ci_high")
    if not plan.get("within_tolerance") or tolerance is None or high is None or high <= 100 * tolerance:
        return None
    return (f"within the {100 * tolerance:g}% tolerance by its point estimate only: its interval reaches "
            f"{high:+.2f}%, beyond it; more windows (-n) narrow the interval")


def _source(summaries: Sequence[dict]) -> dict:
    """The summary whose model, text and windows a suggested command repeats: the first that records a
    text and windows, else the first."""
    first = summaries[0] if summaries else {}
    return next((s for s in summaries if s.get("text") and s.get("windows")), first)


def _suggested(source: dict, command: str) -> str:
    """The command that runs ``command`` on ``source``'s model, text and windows, as code in a sentence."""
    return f"<code>{esc(rerun_command(source, command, *NEXT_COMMANDS[command]))}</code>"


class _Page:
    def __init__(self, source: dict | None = None) -> None:
        self.parts: list[str] = []
        self.figures = 0
        self.data: dict[str, object] = {}  # what the page's script draws, packed once
        self.source = source or {}  # the run summary whose model, text and windows suggestions repeat

    def command(self, command: str) -> str:
        """The command that fills a section without data, on the runs' own model, text and windows."""
        return rerun_command(self.source, command, *NEXT_COMMANDS[command])

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


def family_of(model: dict) -> str | None:
    """The paper's family a run's model belongs to (LLaMA-like or OPT), or None."""
    name = str(model.get("model_type") or model.get("architecture") or "").lower()
    return next((fam for fam, prefixes in FAMILIES.items() if name.startswith(prefixes)), None)


BRACKETED = "crossing bracketed"
"""The status of a threshold search that found the crossing between two measured points."""


def located_thresholds(thresholds) -> list[F.Threshold]:
    """The kernel thresholds the threshold runs located (their crossing bracketed), each with the
    quantizer family and basis it holds for and its 95% interval; the first run's where several
    located one for the same family and basis."""
    found: dict[tuple, F.Threshold] = {}
    for label, summary in thresholds:
        family = summary.get("family") or {}
        for search in F.searches_of(summary):
            if search.get("status") == BRACKETED and search.get("threshold_kernel_fraction") is not None:
                spread = search.get("crossing_uncertainty") or {}
                located = F.Threshold(
                    family, search.get("transform", NONE), search["threshold_kernel_fraction"],
                    spread.get("kernel_fraction_ci_low"), spread.get("kernel_fraction_ci_high"), label,
                    search, _measured_on(summary))
                found.setdefault((family.get("label"), located.basis), located)
    return list(found.values())


def _side(row: dict, threshold: F.Threshold) -> str:
    """Where a kernel lies against a threshold of its own family: ``below`` its interval, ``above`` it,
    or ``within`` it (undetermined by the search's windows)."""
    low = threshold.value if threshold.low is None else threshold.low
    high = threshold.value if threshold.high is None else threshold.high
    return "below" if row["kernel_fraction"] < low else "above" if row["kernel_fraction"] > high else "within"


def _against(row: dict, thresholds: list[F.Threshold], run: dict | None = None) -> str:
    """A kernel against the thresholds located for its own family and basis, as coloured words: below,
    above, or within the threshold's interval; a kernel of another family or basis is not compared."""
    mine = [t for t in thresholds if t.applies_to(row)]
    if not mine:
        return '<span class="missing">no threshold measured for this family</span>'
    said = []
    for t in mine:
        side = _side(row, t)
        words = {"below": "below the threshold", "above": "above the threshold",
                 "within": "within the interval of the threshold"}[side]
        other = "" if run is None or t.where == _measured_on(run) else ", located on other text or windows"
        said.append(f'<span class="{side}">{words} {esc(t.text())}</span> ({esc(t.run + other)})')
    return "<br>".join(said)


def _deployable(row: dict) -> bool:
    """An evaluation row of a scheme one could deploy: fake quantization, not a diagnostic pass
    (remove-kernel) or a reference."""
    return row.get("mode") == Mode.FAKE_QUANT


def _measured_on(summary: dict) -> tuple:
    """What a run's figures depend on besides the model: the text, the windows and their length."""
    return ((summary.get("text") or {}).get("sha256"), (summary.get("windows") or {}).get("tokens_sha256"),
            (summary.get("windows") or {}).get("seqlen"))


def _change(row: dict) -> str:
    """``+2.97% [+2.50%, +3.44%]``: a row's perplexity change from fp with its paired interval."""
    ci = N.interval(row.get("change_pct_ci_low"), row.get("change_pct_ci_high"), signed=True)
    return N.percent(row.get("change_pct"), signed=True) + (f" {ci}" if ci else "")


def _weights(row: dict) -> str:
    ("What a scheme does to the weights, in words: ``weights int4 g128``, ``weights mxfp4``, "
     "or empty for fp.")
    if row.get("weight_format"):
        return f"weights {row['weight_format']}"
    if row.get("weight_bits"):
        group = f" g{row['group_size']}" if row.get("group_size") else " per output channel"
        return f"weights int{row['weight_bits']}{group}"
    return ""


def _kernel_share(share: float | None, low: float | None, high: float | None) -> str:
    """The share of a loss that removing the kernel alone causes, with its 95% interval, and "not
    separable" where the interval holds 0 (the windows cannot tell the kernel's part from none)."""
    if share is None:
        return ""
    spread = N.interval(low, high, N.share)
    text = N.share(share) + (f" {spread}" if spread else "")
    return text + (", not separable from 0" if spread and low <= 0 <= high else "")


# -- the deployment decision of an advise run ------------------------------------------------------

SHOWN_RUNNERS_UP = 2
"""How many runners-up the first screen names, one line each (the candidates table holds them all)."""
SHOWN_UNTRIED = 6
"""How many deployment targets with fewer bits the first screen names before counting the rest."""
DEPLOYED = {"exact": "deployed exactly as measured", "approximate": "deployed approximately",
            "none": "no deployment path"}
"""A candidate's ``deployable`` in words."""


def _short(how: object) -> str:
    """A candidate's ``deploy_with`` up to its first explanation (``ModelOpt, whose arithmetic differs
    below the format``); the candidates table holds it whole."""
    return str(how or "").split(": ", 1)[0]


def _scheme_bits(scheme: dict) -> float | None:
    """Bits a quantized weight parameter costs under a run's scheme: a deployment target's from its
    registry entry, an INT weight's width with its group's 16-bit scale; None where the summary does
    not say (a weight format of its own)."""
    target = TARGETS.get(str(scheme.get("scheme", "")).lower())
    if target is not None:
        return target.weight_bits
    if scheme.get("weight_bits") and not scheme.get("weight_format"):
        return stored_bits(scheme["weight_bits"], scheme.get("group_size"))
    return None


def _windows_of(summary: dict, held_out: bool) -> int | None:
    """How many windows a figure of an advise run was measured on: its held-out or selection windows."""
    if held_out:
        return (((summary.get("plan") or {}).get("holdout") or {}).get("windows") or {}).get("windows")
    return (summary.get("windows") or {}).get("windows")


def _single_deployment(summary: dict) -> tuple[str | None, str]:
    """``(deployable, how)`` of a run of one scheme, from the files its exports wrote: ``exact`` where a
    library file was written without notes, ``approximate`` with notes, None where none was written
    (``how`` then says why, in the exports' words)."""
    e = summary.get("exports") or {}
    libraries = [name for name, key in (("llm-compressor", "recipe"), ("ModelOpt", "modelopt")) if e.get(key)]
    notes = [str(n) for n in e.get("notes") or []]
    if libraries:
        how = " or ".join(libraries)
        return ("approximate", f"{how}, whose arithmetic differs below the format: " + "; ".join(notes)) \
            if notes else ("exact", how)
    reasons = dict.fromkeys(str(e[k]) for k in ("recipe_note", "modelopt_note") if e.get(k))
    return None, "; ".join(reasons) or "no library file was written"


def _offers(summary: dict, run: RunFolder | None = None) -> list[dict]:
    """An advise run's deploy candidates, rank 1 first (summary.json's, else candidates.parquet's), each
    with ``windows``, the number its figure was measured on; a run of one scheme and transform is one
    candidate, its plan (held out where it was checked, else on the windows it was chosen on)."""
    rows = summary.get("candidates")
    if not rows and run is not None and "candidates" in run.tables:
        rows = run.tables["candidates"].to_dicts()
    if rows:
        return [{**r, "windows": _windows_of(summary, bool(r.get("held_out")))}
                for r in sorted(rows, key=lambda r: r.get("rank") or 0)]
    plan = summary.get("plan") or {}
    held = plan.get("holdout")
    figure = (held.get("plan") or {}) if held else plan
    share, bits = plan.get("parameter_share"), _scheme_bits(summary.get("scheme") or {})
    status, how = _single_deployment(summary)
    return [{"scheme": (summary.get("scheme") or {}).get("scheme", ""),
             "transform": summary.get("transform", NONE), "deployable": status, "deploy_with": how,
             "kept_layers": plan.get("kept_layers") or 0,
             "parameter_share_kept": share,
             "bits_per_weight": None if bits is None or share is None
             else share * FULL_PRECISION_BITS + (1 - share) * bits,
             "selection_change_pct": plan.get("change_pct"),
             "selection_within_tolerance": plan.get("within_tolerance"), "held_out": bool(held),
             **{k: figure.get(k) for k in ("change_pct", "change_pct_ci_low", "change_pct_ci_high",
                                           "perplexity")},
             "within_tolerance": bool(held["within_tolerance"] if held else plan.get("within_tolerance")),
             "windows": _windows_of(summary, bool(held)), "rank": 1}]


def _holds(offer: dict, tolerance: float | None, *, short: bool = False) -> str:
    """Whether a candidate held the tolerance, and how: by its whole interval, by its point estimate
    only (its interval reaching beyond), or not at all."""
    goal = "the tolerance" if tolerance is None else f"the {100 * tolerance:g}% tolerance"
    high = offer.get("change_pct_ci_high")
    if not offer.get("within_tolerance"):
        return f"beyond {goal}"
    if tolerance is None:  # (a run that does not record it: its interval cannot be judged against it)
        return f"within {goal}"
    if high is not None and high <= 100 * tolerance:
        return f"within {goal} by its interval" + ("" if short else f" (its upper end, "
                                                   f"{N.percent(high, signed=True)}, is within it)")
    only = point_estimate_only({"within_tolerance": True, "change_pct_ci_high": high}, tolerance)
    if only is None:
        return f"within {goal} by its point estimate (it has no interval: one window)"
    return f"within {goal} by its point estimate only" if short else only


def _how_held(offer: dict, tolerance: float | None) -> str:
    """A table cell of :func:`_holds`: ``within, by its interval``, ``within, by its point estimate
    only``, or ``beyond``."""
    if not offer.get("within_tolerance"):
        return "beyond"
    high = offer.get("change_pct_ci_high")
    if tolerance is None or high is None:
        return "within"
    return "within, by its interval" if high <= 100 * tolerance else "within, by its point estimate only"


def _where(offer: dict, *, short: bool = False) -> str:
    """On which windows a candidate's figure was measured."""
    n = offer.get("windows")
    if offer.get("held_out"):
        return f"on {n} held-out windows" if n else "on the held-out windows"
    chosen = f"on the {n} windows it was chosen on" if n else "on the windows it was chosen on"
    return chosen if short else f"{chosen}, not checked on held-out windows"


def _named(offer: dict) -> str:
    """``<b>scheme</b>`` and, where it is not the identity, its basis."""
    basis = "" if offer.get("transform", NONE) == NONE else f" in the {offer['transform']} basis"
    return f"<b>{esc(offer.get('scheme', ''))}</b>{esc(basis)}"


def _kept(offer: dict, *, short: bool = False) -> str:
    """How many Linear layers a candidate keeps in full precision, and their share of the parameters."""
    k, share = offer.get("kept_layers") or 0, _pct(offer.get("parameter_share_kept"))
    if short:
        return f"{k} layer{'s' * (k != 1)} kept ({share} of the parameters)"
    return f"{k} Linear layer{'s' * (k != 1)} kept in full precision ({share} of the covered parameters)"


def _offer_change(offer: dict) -> str:
    """``+0.31% [-0.10%, +0.72%]``: a candidate's change from fp with its paired interval."""
    return esc(_change(offer)) or "not finite"


def _lead(offer: dict, tolerance: float | None, none_held: bool) -> str:
    """The first screen's sentence on the candidate to deploy, or, where it failed its check, the
    warning that says so first."""
    figure = f"<b>{_offer_change(offer)}</b> {esc(_where(offer))}"
    if offer.get("within_tolerance"):
        verb = "Deploy" if offer.get("deployable") in ("exact", "approximate") else "The plan:"
        return (f'<p class="deploy">{verb} {_named(offer)} with {esc(_kept(offer))}: {figure}, '
                f"{esc(_holds(offer, tolerance)).replace('(-n)', '(<code>-n</code>)')}.</p>")
    chosen = N.percent(offer.get("selection_change_pct"), signed=True)
    check = "held-out check" if offer.get("held_out") else "check on the windows it was chosen on"
    others = " No deployable candidate held it." if none_held else ""
    return (f'<p class="failed"><b>The plan failed its {check}.</b> {_named(offer)} with '
            f"{esc(_kept(offer))}: {figure}, {esc(_holds(offer, tolerance))}"
            + (f" ({esc(chosen)} on the windows it was chosen on)" if offer.get("held_out") and chosen
               else "")
            + f".{others} Do not deploy it as it is: advise on more windows (<code>-n</code>) chooses on "
            "more evidence, and a smaller <code>--tolerance</code> keeps more layers.</p>")


def _behind(best: dict, other: dict) -> str:
    """Why a candidate ranks behind the first, by the first rule of the ranking on which the two differ
    (holding the tolerance, bits per weight, exact before approximate, the change from fp); empty where
    none of them puts it behind."""
    bits = [None if o.get("bits_per_weight") is None else round(o["bits_per_weight"], 6)
            for o in (best, other)]
    rules = [(not best.get("within_tolerance"), not other.get("within_tolerance"),
              "it does not hold the tolerance"),
             (*bits, f"more bits per weight ({N.bits(bits[1])} against {N.bits(bits[0])})"),
             (best.get("deployable") != "exact", other.get("deployable") != "exact",
              "it is deployed approximately, the first exactly"),
             (best.get("change_pct"), other.get("change_pct"), "a larger change from fp")]
    for first, second, words in rules:
        if first is not None and second is not None and first != second:
            return words if second > first else ""
    return ""


def _offer_line(offer: dict, best: dict | None, tolerance: float | None) -> str:
    """One candidate in one line: its change and windows, whether it holds the tolerance, what it keeps,
    its bits per weight, how it deploys, and why it ranks behind the first."""
    how = str(offer.get("deploy_with") or "") if offer.get("deployable") == "none" else _short(
        offer.get("deploy_with"))
    status = DEPLOYED.get(str(offer.get("deployable")), "")
    behind = "" if best is None else _behind(best, offer)
    return (f"#{esc(offer.get('rank', ''))} {_named(offer)}: {_offer_change(offer)} "
            f"{esc(_where(offer, short=True))}, {esc(_holds(offer, tolerance, short=True))}; "
            f"{esc(_kept(offer, short=True))}, {esc(N.bits(offer.get('bits_per_weight')) or '?')} bits per "
            "weight; "
            f"{esc(status)}{': ' + esc(how) if how else ''}"
            + (f" (behind #{esc(best.get('rank', ''))}: {esc(behind)})" if behind else ""))


def _better(diagnostic: dict, best: dict | None) -> bool:
    """Whether a diagnostic measured better than the candidate to deploy: within tolerance with a
    smaller change from fp, or with fewer bits per weight."""
    if best is None or not diagnostic.get("within_tolerance"):
        return False
    smaller = (diagnostic.get("change_pct") is not None and best.get("change_pct") is not None
               and diagnostic["change_pct"] < best["change_pct"])
    fewer = (diagnostic.get("bits_per_weight") is not None and best.get("bits_per_weight") is not None
             and diagnostic["bits_per_weight"] < best["bits_per_weight"] - 1e-9)
    return smaller or fewer


def _own_basis(scheme: str, transform: str) -> tuple[str, list[str]]:
    """The ``--transform`` that gives ``scheme`` a run's basis, and the options its own transform
    needs: a ``*-smoothquant`` scheme smooths by itself (its migration strength as ``--smooth-alpha``)."""
    steps = [] if transform in ("", NONE) else transform.split(COMPOSE)
    extra: list[str] = []
    if scheme.endswith("-smoothquant") and steps and steps[0].startswith("smoothquant"):
        strength = steps.pop(0).partition(":")[2]
        extra = ["--smooth-alpha", strength] if strength else []
    return COMPOSE.join(steps) or NONE, extra


def measure_again(summary: dict, folder: Path) -> str:
    """The eval command that measures an advise run's plan again on the windows it was chosen on: its
    model, text and windows, fp and its scheme in its basis, the calibration text it was calibrated on,
    and the run folder as ``--ignore @DIR`` (the layers the plan keeps)."""
    scheme = summary.get("scheme") or {}
    name = str(scheme.get("scheme", "SCHEME"))
    basis, extra = _own_basis(name, str(summary.get("transform") or NONE))
    extra = ["--scheme", f"fp,{name}", *extra]
    if basis != NONE:
        extra += ["--transform", basis]
    if scheme.get("alpha") is not None and name.endswith("crossquant"):
        extra += ["--alpha", f"{scheme['alpha']:g}"]
    calibration = summary.get("calibration") or {}
    if (calibration.get("text") or {}).get("source"):
        extra += ["--calib-dataset", str(calibration["text"]["source"]),
                  "--calib-nsamples", str((calibration.get("windows") or {}).get("windows") or 1)]
    return rerun_command(summary, "eval", *extra, "--ignore", f"@{folder}")


def _deploy_files(summary: dict, folder: Path, best: dict) -> str:
    """The files that deploy the candidate, by their absolute paths in the run folder, and the commands
    that measure it again; where the folder holds another candidate's files (its first is a diagnostic),
    the command that writes this one's."""
    scheme = (summary.get("scheme") or {}).get("scheme")
    if (scheme, summary.get("transform", NONE)) != (best.get("scheme"), best.get("transform", NONE)):
        basis = [] if best.get("transform", NONE) == NONE else ["--transform", str(best["transform"])]
        write = rerun_command(summary, "advise", "--scheme", str(best.get("scheme")), *basis, "-o",
                              "runs/deploy")
        return (f"<p>This folder holds the files of {esc(scheme)}, not of {esc(best.get('scheme'))}: "
                f"<code>{esc(write)}</code> writes them.</p>")
    e = summary.get("exports") or {}
    named = [("llm-compressor recipe", "recipe", "recipe_note"),
             ("ModelOpt config", "modelopt", "modelopt_note"),
             ("the kept layers, one a line", "modules", None)]
    files, missing = [], {}
    for what, key, note in named:
        if e.get(key):
            files.append(f"{esc(what)} <code>{esc(folder / str(e[key]))}</code>")
        elif note and e.get(note):
            missing.setdefault(str(e[note]), []).append(what)
    missing = [f"no {esc(' or '.join(whats))}: {esc(why)}" for why, whats in missing.items()]
    said = [f"<b>Files</b>: {'; '.join(files)}."
            + (f" <small>({'; '.join(missing)})</small>" if missing else "")]
    said.append(f"<b>Measure it again</b> on the windows it was chosen on: "
                f"<code>{esc(measure_again(summary, folder))}</code>")
    if e.get("recipe"):
        recipe = rerun_command(summary, "eval", "--scheme", f"fp,llm-compressor:@{folder / str(e['recipe'])}")
        said.append(f"<b>What the recipe itself deploys</b>: <code>{esc(recipe)}</code>")
    return "".join(f"<p>{line}</p>" for line in said)


def _step_names(transform: object) -> set[str]:
    """The transforms a basis label applies: ``smoothquant:0.5+hadamard`` → smoothquant, hadamard."""
    return {step.partition(":")[0] for step in str(transform or NONE).split(COMPOSE) if step != NONE}


def _fewer_bits(summary: dict, offers: list[dict], best: dict) -> str | None:
    """The deployment targets with fewer bits per weight than the candidate to deploy, none of them
    among the candidates (each ranks above it wherever it holds the tolerance), with the advise command
    that ranks the nearest three; None where there is none or the bits are unknown."""
    mine = best.get("bits_per_weight")
    if mine is None:
        return None
    tried = {str(o.get("scheme", "")).lower() for o in offers}
    seen = {(t.weights, t.input_activations) for key, t in TARGETS.items() if key in tried}
    found = []
    for t in sorted(TARGETS.values(), key=lambda t: -t.weight_bits):  # the nearest first
        arithmetic = (t.weights, t.input_activations)  # one name of two for the same scheme
        if t.quantizes_activations and arithmetic not in seen and t.weight_bits < mine - 1e-9:
            seen.add(arithmetic)
            found.append((t.weight_bits, t))
    if not found:
        return None
    shown = ", ".join(f"{esc(t.label)} ({N.bits(bits)})" for bits, t in found[:SHOWN_UNTRIED])
    more = f" and {len(found) - SHOWN_UNTRIED} more" if len(found) > SHOWN_UNTRIED else ""
    added = [_own_basis(str(o.get("scheme", "")), str(o.get("transform") or NONE))[0] for o in offers]
    tried = sorted(dict.fromkeys(added), key=lambda b: b != NONE)  # the bases given, as --transform
    basis = [] if tried == [NONE] else ["--transform", ",".join(tried)]
    calibration = ((summary.get("calibration") or {}).get("text") or {}).get("source")
    if calibration and any(t.needs_calibration for _, t in found[:3]):  # on the run's calibration text
        basis += ["--calib-dataset", str(calibration)]
    command = rerun_command(summary, "advise", "--scheme", ",".join(t.label for _, t in found[:3]), *basis,
                            "-o", "runs/fewer-bits")
    return (f"deployment targets with fewer bits per weight than its {esc(N.bits(mine))}, none of them a "
            f"candidate: {shown}{more}; each ranks above it wherever it holds the tolerance "
            f"(<code>{esc(command)}</code> ranks the nearest three)")


def _untried(summary: dict, offers: list[dict], best: dict) -> list[str]:
    """What was not evaluated that might beat the candidate to deploy: deployment targets with fewer
    bits, transforms a library deploys that no candidate tried (where layers stay in full precision,
    which a transform may spare), and per-layer figures where the plan keeps layers without them."""
    said = [line for line in [_fewer_bits(summary, offers, best)] if line]
    tried = set().union(*(_step_names(o.get("transform")) for o in offers))
    keeps = (best.get("kept_layers") or 0) > 0
    if keeps or best.get("deployable") != "exact":
        for name, entry in TRANSFORMS.items():
            if name not in tried and entry.deployed_by:
                said.append(f"the {esc(name)} transform, which no candidate tried: it may let fewer layers "
                            f"stay in full precision, deployed approximately "
                            f"({esc(_short(entry.deployed_by))})")
    if keeps and "layer" not in ((summary.get("settings") or {}).get("groups") or ["layer"]):
        said.append("each layer's own figure: <code>--per-layer</code> plans from them and may keep fewer "
                    "parameters")
    return said


def _deploy_decision(label: str | None, summary: dict, run: RunFolder | None) -> str:
    """The first screen of an advise run: the candidate to deploy in one sentence with its held-out
    change and interval (or the warning that it failed its check), how it deploys, the runners-up in a
    line each, the files and commands, what was not evaluated that might beat it, and the diagnostics,
    never recommended, with the reason."""
    tolerance, offers = summary.get("tolerance"), _offers(summary, run)
    deployable = [o for o in offers if o.get("deployable") != "none"]
    diagnostics = [o for o in offers if o.get("deployable") == "none"]
    best = deployable[0] if deployable else None
    parts = [f"<h3>{esc(label)}</h3>"] if label else []
    if best is None:
        parts.append('<p class="failed"><b>No candidate can be deployed as measured</b>: every one is a '
                     "diagnostic, and none is recommended.</p>")
    else:
        parts.append(_lead(best, tolerance, len(deployable) > 1 and not any(
            o.get("within_tolerance") for o in deployable)))
        status = DEPLOYED.get(str(best.get("deployable")))
        how = str(best.get("deploy_with") or "").rstrip(".")
        if how and status:  # (a plan no library file was written for: the files say why)
            again = best.get("deployable") == "approximate" and "measure the deployed model again" not in how
            parts.append(f"<p><b>How</b>: {esc(status)}, by {esc(how)}."
                         + (" Measure the deployed model again." if again else "") + "</p>")
        if run is not None and (summary.get("output") or (run.path / "summary.json").is_file()):
            parts.append(_deploy_files(summary, run.path.resolve(), best))
        else:  # a result shown before it was written (no -o): no files yet
            basis = [] if best.get("transform", NONE) == NONE else ["--transform", str(best["transform"])]
            write = rerun_command(summary, "advise", "--scheme", str(best.get("scheme")), *basis, "-o",
                                  "runs/advice")
            parts.append(f"<p>This plan was not written to a folder: <code>{esc(write)}</code> writes its "
                         "files and prints the command that measures it again.</p>")
        runners = deployable[1:1 + SHOWN_RUNNERS_UP]
        if runners:
            parts.append("<p><b>Runners-up</b>:</p><ul>" + "".join(
                f"<li>{_offer_line(o, best, tolerance)}</li>" for o in runners) + "</ul>")
        untried = _untried(summary, offers, best)
        if untried:
            parts.append("<p><b>Not evaluated, and might beat it</b>:</p><ul>"
                         + "".join(f"<li>{line}</li>" for line in untried) + "</ul>")
    if diagnostics:
        parts.append("<p><b>Diagnostics, never recommended</b>:</p><ul>" + "".join(
            f"<li>{_offer_line(o, None, tolerance)}"
            + (" <b>(a better figure than the candidate to deploy)</b>" if _better(o, best) else "")
            + "</li>" for o in diagnostics) + "</ul>")
    return '<div class="deploy">' + "".join(parts) + "</div>"


def _recommendation(evals, sweeps, advices) -> list[str]:
    """Sentences on what to deploy: advise's plan first, else the evaluated scheme closest to fp."""
    said = []
    for _, s in advices[:1]:  # the candidate to deploy is said above, in the advise run's own words
        whole = s.get("quantized") or {}
        held = ((s.get("plan") or {}).get("holdout") or {}).get("quantized")
        said.append(f"Quantizing every layer with {esc((s.get('scheme') or {}).get('scheme', 'the scheme'))} "
                    f"costs {esc(_change(whole)) or 'a loss that is not finite'} on the windows the plan was "
                    "chosen on" + (f", {esc(_change(held))} on the held-out windows" if held else "") + ".")
        share = s.get("kernel_explains") or {}
        if share.get("share") is not None:
            said.append("Removing only the kernel causes "
                        f"{esc(_kernel_share(share['share'], share.get('ci_low'), share.get('ci_high')))} "
                        "of that loss.")
        elif share.get("note"):
            said.append(f"The kernel's share of that loss is {esc(share['note'])}.")
    quantized = [{**r, "ignored": (s.get("layers") or {}).get("ignore")}
                 for _, s in evals for r in s["results"]
                 if r.get("change_pct") is not None and r.get("perplexity") is not None and _deployable(r)]
    if quantized:
        best = min(quantized, key=lambda r: r["perplexity"])
        basis = "" if best.get("transform", NONE) == NONE else f", {best['transform']}"
        weights = f" ({_weights(best)})" if _weights(best) else ""
        kept = f", the layers of --ignore {best['ignored']} kept in full precision" if best["ignored"] else ""
        every = " with every layer quantized" if advices and not kept else ""
        said.append(f"Of the schemes evaluated{every}, "
                    f"<b>{esc(best['scheme'] + basis)}</b>{esc(weights + kept)} is closest to fp: "
                    f"{esc(_change(best))} ({esc(best.get('vs_fp') or '')}).")
    for _, s in sweeps[:1]:
        rows = [r for r in s["results"] if r.get("alpha") is not None and r.get("perplexity") is not None]
        if rows:
            best = min(rows, key=lambda r: r["perplexity"])
            said.append(f"The CrossQuant sweep is best at α = {best['alpha']:g} ({esc(_change(best))}).")
    return said


def _smallest_4bit(profiles) -> dict | None:
    """The smallest model-level 4-bit kernel of the profiles, whatever its grid (INT4, FP4)."""
    rows = [r for _, run in profiles for r in run.summary.get("model_level") or [] if r.get("bits") == 4]
    return min(rows, key=lambda r: r["kernel_fraction"], default=None)


def _int4(evals, profiles, located, advices=()) -> list[str]:
    """Whether 4-bit activations are viable: measured in an evaluation, else the smallest 4-bit kernel,
    named by its grid, against a threshold located on this model for its own family and basis."""
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
    best = _smallest_4bit(profiles)
    if best is None or not located:
        return said
    lead = (f"{'Its' if said else '4-bit activations: the'} smallest 4-bit kernel measured, "
            f"{esc(_series(best))}, on an {esc(F.grid_name(best))} grid, at {_pct(best['kernel_fraction'])}")
    mine = [t for t in located if t.applies_to(best)]
    if mine:
        words = {"below": "is below", "above": "is above", "within": "lies within the interval of"}
        said.append(f"{lead}, {words[_side(best, mine[0])]} the {esc(mine[0].text())} threshold located on "
                    "this model for its family.")
    else:
        said.append(f"{lead}: no threshold measured for its family (the one located holds for "
                    f"{esc(', '.join(t.label for t in located))} only).")
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


def _advice_sentences(profiles, thresholds, evals, sweeps, advices, family: str | None,
                      source: dict) -> list[str]:
    """What to do, in words, from the runs of one model (``source``: the summary whose model, text and
    windows the commands suggested repeat)."""
    located = located_thresholds(thresholds)
    said = _recommendation(evals, sweeps, advices) + _int4(evals, profiles, located, advices)
    for label, run in profiles[:1]:  # what the profile measured, in one sentence
        level = run.summary.get("model_level") or []
        if level:
            said.append(f"The model-level kernel ({esc(label)}): " + ", ".join(
                f"{esc(_series(r))} {_pct(r['kernel_fraction'])}" for r in level) + ".")
    if located:
        said.append("The kernel threshold located on this model, for its own family and basis only: "
                    + "; ".join(f"{esc(t.label)} {esc(t.text())}" for t in located) + ".")
    unbracketed = [(t.get("family") or {}, search) for _, t in thresholds for search in F.searches_of(t)
                   if search.get("status") != BRACKETED
                   and search.get("threshold_kernel_fraction") is not None]
    for searched, search in unbracketed[:1]:
        said.append(f"The threshold search did not bracket a crossing ({esc(search.get('status', ''))}): "
                    f"every {esc(searched.get('label', ''))} kernel up to "
                    f"{_pct(search['threshold_kernel_fraction'])} stayed within the tolerance.")
    if family and not located:
        reference = REFERENCE_THRESHOLDS[family]
        said.append(f"The CrossQuant paper's reference for {family} models is {100 * reference:g}% "
                    f"(the paper's, not measured here: {_suggested(source, 'threshold')} locates this "
                    "model's).")
    if profiles and not located:  # no judging against another model's reference
        steps = [] if family else [f"{_suggested(source, 'threshold')} locates one"]
        if not evals and not advices:
            steps.append(f"{_suggested(source, 'eval')} or {_suggested(source, 'advise')} measures what a "
                         "scheme costs")
        said.append("With no kernel threshold bracketed on this model, its kernels are not judged here"
                    + (": " + "; ".join(steps) if steps else "") + ".")
    if not said:
        said.append(f"No evaluation in these runs: {_suggested(source, 'advise')} or "
                    f"{_suggested(source, 'eval')} measures what a scheme costs.")
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
        own = [run.summary for _, run in _of_model(labelled, name)]
        deciding = [(label, run) for label, run in _of_model(labelled, name)
                    if run.summary.get("kind") == "advise"]
        for label, run in deciding:  # the deployment decision first, one block per advise run
            named = len(deciding) > 1 or len(names) > 1
            page.add(_deploy_decision(label if named else None, run.summary, run))
        said = _advice_sentences(_of_model(profiles, name), _of_model(thresholds, name),
                                 _of_model(evals, name), _of_model(sweeps, name), _of_model(advices, name),
                                 family_of(model), _source(own))
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
        page.missing("kernel measurement", page.command("profile"))
        return
    located = located_thresholds(thresholds)
    rows = []
    for label, run in profiles:
        family = family_of(run.summary.get("model") or {})
        ref = ('<span class="missing">none for this family</span>' if family is None
               else f"{family} {100 * REFERENCE_THRESHOLDS[family]:g}% <small>(the paper's models)</small>")
        rows += [[esc(label), esc(_series(r)), esc(F.grid_name(r)), _pct(r["kernel_fraction"]),
                  _against(r, located, run.summary), ref] for r in run.summary.get("model_level", [])]
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
    """What a threshold search says of the model's own kernels it counted: a kernel of the searched
    family against the threshold with its interval (or the search's own words where it located none),
    any other kernel not compared."""
    family, basis = summary.get("family") or {}, search.get("transform", NONE)
    kernels, words = search.get("actual_kernels") or [], search.get("verdicts") or []
    if len(kernels) != len(words):  # a run of an earlier version: its own words
        return [esc(v) for v in words]
    located = located_thresholds([(label, {**summary, "searches": [search]})])
    items = []
    for kernel, verdict in zip(kernels, words, strict=True):
        row = {"transform": basis, **kernel}
        head = f"{esc(_series(row))} kernel {_pct(kernel['kernel_fraction'])}: "
        mine = [t for t in located if t.applies_to(row)]
        if not F.same_family(family, row):
            items.append(head + '<span class="missing">no threshold measured for this family</span>')
        elif mine:
            items.append(head + _against(row, mine))
        else:
            items.append(esc(verdict))
    return items


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
        cell = {(_series(r), r["module_type"]): r["kernel_fraction"] for r in by_type}
        rows = [[esc(_series(r)), esc(r.get("format") or ""), esc(r.get("block_size") or ""),
                 _pct(r["kernel_fraction"]), _pct(r.get("subnormal_fraction")),
                 _pct(r.get("block_kernel_fraction")),
                 *(_pct(cell.get((_series(r), t))) for t in types)] for r in level]
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
        rows = [[esc(_series(r)), esc(F.grid_name(r)), _pct(r["kernel_elements"] / r["elements"]),
                 *(_pct(cell.get((r["config"], r["transform"], t))) for t in types)]
                for r in whole.iter_rows(named=True) if r["elements"]]
        page.add(f"<h3>{esc(label)}</h3>"
                 + _table(["weight format", "grid", "every layer", *types], rows))


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
        rows = [[esc(r["scheme"]), esc(_weights(r).removeprefix("weights ")) or "fp",
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
             esc(_change(whole)), esc(whole.get("vs_fp") or ""), ""],
            [name, _fixed(plan.get("perplexity")), _ci(plan, "perplexity"), esc(_change(plan)),
             esc(plan.get("vs_fp") or ""), esc(_holds(chosen, tolerance, short=True))]]
    held = plan.get("holdout")
    if held:
        n = (held.get("windows") or {}).get("windows")
        on = f", on {n} held-out windows" if n else ", held out"
        h_whole, h_plan = held.get("quantized") or {}, held.get("plan") or {}
        rows += [[f"every layer quantized{on}", _fixed(h_whole.get("perplexity")), _ci(h_whole, "perplexity"),
                  esc(_change(h_whole)), esc(h_whole.get("vs_fp") or ""), ""],
                 [f"the plan{on}", _fixed(h_plan.get("perplexity")), _ci(h_plan, "perplexity"),
                  esc(_change(h_plan)), esc(h_plan.get("vs_fp") or ""),
                  esc(_holds({**h_plan, "within_tolerance": held.get("within_tolerance")}, tolerance,
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
        weights = _weights(scheme)
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
                              N.count(r.get("layer_count")), esc(_change(r)), N.magnitude(r.get("kl")),
                              esc(_kernel_share(r.get("kernel_share"), r.get("kernel_share_ci_low"),
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
        s, offers = run.summary, _offers(run.summary, run)
        deployable = [o for o in offers if o.get("deployable") != "none"]
        roles = {id(o): "deploy" if i == 0 else "runner-up" if i <= SHOWN_RUNNERS_UP else ""
                 for i, o in enumerate(deployable)}
        rows = [[esc(o.get("rank", "")), esc(roles.get(id(o), "diagnostic")), esc(o.get("scheme", "")),
                 esc(o.get("transform", NONE)), esc(o.get("deployable", "")), N.count(o.get("kept_layers")),
                 _pct(o.get("parameter_share_kept")), N.bits(o.get("bits_per_weight")),
                 esc(N.percent(o.get("change_pct"), signed=True)),
                 esc(N.interval(o.get("change_pct_ci_low"), o.get("change_pct_ci_high"), signed=True)),
                 esc(_where(o, short=True).removeprefix("on ")),
                 esc(_how_held(o, s.get("tolerance"))),
                 esc(N.percent(o.get("selection_change_pct"), signed=True))] for o in offers]
        page.add(f"<p><b>{esc(label)}</b>: each scheme under each transform planned on the windows it was "
                 "chosen on, then measured again on held-out windows. Ranked: "
                 f"{esc(s.get('candidates_ranking') or 'as advise ranks them')}</p>")
        page.add(_table(["rank", "role", "scheme", "transform", "deployable", "kept layers",
                         "kept parameters", "bits / weight", "change from fp", "95% CI (paired)",
                         "measured on", "tolerance", "on the selection windows"], rows))
        page.add("<details><summary>How each candidate deploys</summary><ul>" + "".join(
            f"<li>#{esc(o.get('rank', ''))} {_named(o)}: {esc(o.get('deploy_with') or '')}</li>"
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

    page = _Page(_source([run.summary for _, run in labelled]))
    heading = title or "kernelscope report: " + ", ".join(lab for lab, _ in labelled)
    page.add(f"<h1>{esc(heading)}</h1>")
    located = located_thresholds(thresholds)
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
