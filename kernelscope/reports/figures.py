"""Plotly figures from run tables. Every string that came from a model or a file is HTML-escaped
before it reaches plotly, which interprets a few tags in text.

A quantizer configuration has one colour on the whole page (:func:`colour_of`), and within a figure a
transform or run has one line style (:func:`dash_of`), so that no two lines of a figure look alike;
every number in a label is written by :mod:`~kernelscope.reports.numbers`, as in the tables."""

from __future__ import annotations

import colorsys
import html
import math
import re
from dataclasses import dataclass, field

import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from kernelscope.quant.transforms import NONE
from kernelscope.reports import numbers as N
from kernelscope.stats.uncertainty import paired_difference

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
           "#bcbd22", "#000080", "#00a087", "#800000", "#aec7e8", "#98df8a", "#ff9896", "#c5b0d5")
"""The first colours of quantizer configurations; :func:`palette` adds as many more as a page needs."""
MODULE_PALETTE = ("#333333", "#b8860b", "#708090", "#c71585", "#556b2f", "#4b0082")
"""The colours of module types where a figure draws them (c >= t), none of them a configuration's."""
TRANSFORM_MARKS = (("#222222", "circle"), ("#8c8c8c", "diamond"), ("#555555", "square"),
                   ("#b3b3b3", "triangle-up"), ("#000000", "x"), ("#6e6e6e", "star"))
"""Marker colour and symbol per transform in the evaluation figure, none of them a configuration's."""
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
_AXIS = dict(gridcolor="#e5e5e5", zerolinecolor="#cccccc", exponentformat="power", separatethousands=True)
# No template: plotly would embed a copy of it (about 7 kB) in every figure.
LAYOUT = dict(template=None, height=380, margin=dict(l=60, r=20, t=40, b=50), plot_bgcolor="white",
              legend=dict(orientation="h", y=-0.2), hovermode="closest", xaxis=_AXIS, yaxis=_AXIS)


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def series_name(config: str, transform: str) -> str:
    """What one line of a figure draws: the configuration, and the transform where it is not the
    identity (``per_token int4 · hadamard``)."""
    return config if transform == NONE else f"{config} · {transform}"


def with_series(layers: pl.DataFrame) -> pl.DataFrame:
    """``layers`` with a ``series`` column, :func:`series_name` of each row."""
    pairs = layers.select("config", "transform").unique(maintain_order=True)
    pairs = pairs.with_columns(pl.Series("series", [series_name(c, t) for c, t in pairs.iter_rows()],
                                         dtype=pl.String))
    return layers.join(pairs, on=["config", "transform"], how="left", maintain_order="left")


def palette(n: int) -> list[str]:
    """``n`` distinct colours: :data:`PALETTE`, then hues a golden angle apart at three lightnesses,
    none of them grey and none repeated."""
    colours = list(PALETTE[:n])
    i = 0
    while len(colours) < n:
        hue, lightness = (i * 0.618034) % 1.0, (0.35, 0.5, 0.65)[i % 3]
        rgb = colorsys.hls_to_rgb(hue, lightness, 0.75)
        colour = "#" + "".join(f"{round(255 * c):02x}" for c in rgb)
        if colour not in colours and colour not in MODULE_PALETTE:
            colours.append(colour)
        i += 1
    return colours


def colour_of(names: list[str]) -> dict[str, str]:
    """One colour per name (a configuration, a threshold family, a swept quantizer), given in order of
    first appearance over every run of a report and never given twice, so that a configuration has the
    same colour in every run and figure of the page."""
    unique = list(dict.fromkeys(names))
    return dict(zip(unique, palette(len(unique)), strict=True))


def dash_of(i: int) -> str:
    """The ``i``-th line style of a figure: plotly's six, then dash patterns of their own, all distinct."""
    if i < len(DASHES):
        return DASHES[i]
    j = i - len(DASHES)
    return f"{4 + 2 * (j % 5)}px,{2 + 2 * (j // 5)}px"


def grid_name(row: dict) -> str:
    """A format named by its element grid: ``INT4``, ``FP4 (E2M1)``, ``FP8 (E4M3)``."""
    fmt = str(row.get("format") or "")
    found = re.fullmatch(r"e(\d)m(\d)", fmt.lower())
    if found:
        return f"FP{1 + int(found[1]) + int(found[2])} ({fmt.upper()})"
    if fmt:
        return fmt.upper()
    return f"INT{row['bits']}" if row.get("bits") else ""


def same_family(family: dict, row: dict) -> bool:
    """Whether a kernel (a profile's or a threshold search's row) was counted by the quantizer family
    a threshold was located for: the same quantizer, bits, α, element format and block where both
    record them; the same label where neither records a quantizer."""
    if "quantizer" not in family or "quantizer" not in row:
        return family.get("label") == row.get("config")
    keys = ("quantizer", "bits", "alpha", "format", "block_size")
    return all(family[k] == row[k] for k in keys if k in family and k in row)


@dataclass
class Threshold:
    """A kernel threshold a threshold run located (its crossing bracketed): the family it holds for
    (``family``, as the run's summary records it), the basis it was measured in, the kernel proportion
    and its 95% interval where the run resampled one."""

    family: dict
    basis: str
    value: float
    low: float | None = None
    high: float | None = None
    run: str = ""
    searched: dict = field(default_factory=dict)
    where: tuple = ()  # the text and windows it was located on

    @property
    def label(self) -> str:
        """The family's configuration, with its basis: ``per_token int8 · hadamard``."""
        return series_name(self.family.get("label", "threshold family"), self.basis)

    def text(self) -> str:
        """``9.79% [7.87%, 9.87%]``: the threshold with its interval."""
        spread = N.interval(self.low, self.high, N.share)
        return N.share(self.value) + (f" {spread}" if spread else "")

    def applies_to(self, row: dict) -> bool:
        """Whether a kernel row is of this threshold's family and basis."""
        return same_family(self.family, row) and row.get("transform", NONE) == self.basis


def module_groups(profiles: list[tuple[str, pl.DataFrame]]) -> list[tuple[str, list[str]]]:
    """Module types of the decoder blocks, those with the same figures in every row of every run (q/k/v
    and gate/up, fed the same tensor) joined: ``("q_proj / k_proj / v_proj", [...])``."""
    types: list[str] = []
    values: dict[str, tuple] = {}
    for _, layers in profiles:
        in_blocks = layers.filter(pl.col("block").is_not_null())
        for t in in_blocks["module_type"].unique(maintain_order=True).to_list():
            if t not in types:
                types.append(t)
            mine = in_blocks.filter(pl.col("module_type") == t).sort("series", "block")
            values[t] = (*values.get(t, ()), tuple(mine["kernel_fraction"].to_list()))
    groups: list[list[str]] = []
    for t in types:
        same = next((g for g in groups if values[g[0]] == values[t]), None)
        if same is None:
            groups.append([t])
        else:
            same.append(t)
    return [(" / ".join(g), g) for g in groups]


def _module_panels(groups: list[tuple[str, list[str]]]) -> go.Figure:
    """One panel per module group, side by side, sharing the y axis."""
    return make_subplots(rows=1, cols=max(len(groups), 1), shared_yaxes=True, horizontal_spacing=0.02,
                         subplot_titles=[esc(name) for name, _ in groups])


def _panel_lines(profiles: list[tuple[str, pl.DataFrame]], groups: list[tuple[str, list[str]]],
                 keep: pl.Expr | None = None):
    """Each line of a figure with one panel per module group: ``(run, panel column, module type,
    configuration, transform, its rows by block)``, over the decoder blocks' rows that ``keep`` admits."""
    for run, layers in profiles:
        in_blocks = layers.filter(pl.col("block").is_not_null())
        in_blocks = in_blocks if keep is None else in_blocks.filter(keep)
        for col, (_, types) in enumerate(groups, start=1):
            mine = in_blocks.filter(pl.col("module_type") == types[0])
            pairs = mine.select("config", "transform").unique(maintain_order=True)
            for config, transform in pairs.iter_rows():
                rows = mine.filter((pl.col("config") == config) & (pl.col("transform") == transform))
                yield run, col, types[0], config, transform, rows.sort("block")


def _variants(profiles: list[tuple[str, pl.DataFrame]]) -> list[tuple[str, str]]:
    """Every (run, transform) of the profiles, in order: what one line style of a figure stands for."""
    return list(dict.fromkeys((run, t) for run, layers in profiles
                              for t in layers["transform"].unique(maintain_order=True).to_list()))


def _variant_label(variant: tuple[str, str], runs: int) -> str:
    """How a menu names a (run, transform): the transform, and the run where there are several."""
    run, transform = variant
    shown = "no transform" if transform == NONE else transform
    return f"{run}: {shown}" if runs > 1 else shown


def _variant_menu(fig: go.Figure, labels: list[str], of_trace: list[int | None]) -> None:
    """A menu that shows the lines of one variant (run and transform) at a time, the first at first, or
    all of them; a trace of no variant (``None``) always shows. Nothing where there is one variant."""
    if len(labels) < 2:
        return

    def visible(v: int | None) -> list[bool]:
        return [t is None or v is None or t == v for t in of_trace]

    for trace, shown in zip(fig.data, visible(0), strict=True):
        trace.visible = shown
    buttons = [{"label": esc(label), "method": "restyle", "args": [{"visible": visible(i)}]}
               for i, label in enumerate(labels)]
    buttons.append({"label": "all", "method": "restyle", "args": [{"visible": visible(None)}]})
    fig.update_layout(updatemenus=[{"buttons": buttons, "direction": "down", "active": 0, "showactive": True,
                                    "x": 0.0, "xanchor": "left", "y": 1.2, "yanchor": "bottom",
                                    "pad": {"r": 2, "t": 2}}])


def _block_ticks(profiles: list[tuple[str, pl.DataFrame]]) -> dict:
    """Whole-number block ticks, about six of them."""
    blocks = max((layers["block"].max() or 0 for _, layers in profiles), default=0) + 1
    return {"tick0": 0, "dtick": max(1, math.ceil(blocks / 6))}


def depth_kernel(profiles: list[tuple[str, pl.DataFrame]], colours: dict[str, str],
                 thresholds: list[Threshold] = ()) -> go.Figure:
    """Kernel % against the block, one panel per module type (types fed the same tensor in one), one
    colour per quantizer configuration, one line style per run and transform (a menu shows one at a
    time); each threshold located on the model as a line in its family's colour, with its interval."""
    groups = module_groups(profiles)
    fig = _module_panels(groups)
    variants = _variants(profiles)
    runs = len(profiles)
    shown: set[str] = set()
    of_trace = []
    for run, col, module_type, config, transform, rows in _panel_lines(profiles, groups):
        v = variants.index((run, transform))
        name = series_name(config, transform) if runs == 1 else f"{run}: {series_name(config, transform)}"
        fig.add_trace(go.Scatter(
            x=rows["block"].to_list(), y=[round(100 * x, 6) for x in rows["kernel_fraction"]],
            mode="lines+markers", marker={"size": 4}, name=esc(name), legendgroup=esc(name),
            showlegend=name not in shown,
            text=[N.share(x) for x in rows["kernel_fraction"]],
            hovertemplate=f"block %{{x}}, {esc(module_type)}: kernel %{{text}}"
                          "<extra>%{fullData.name}</extra>",
            line={"color": colours[config], "dash": dash_of(v)}), row=1, col=col)
        of_trace.append(v)
        shown.add(name)
    for t in thresholds:
        line = {"color": colours.get(t.family.get("label"), "#555555"), "dash": "dash", "width": 1}
        for col in range(1, len(groups) + 1):
            label = {"annotation_text": esc(f"{t.label} threshold {t.text()}"), "annotation_font_size": 10,
                     "annotation_position": "top left"} if col == 1 else {}
            fig.add_hline(y=100 * t.value, row=1, col=col, line=line, **label)
    _variant_menu(fig, [_variant_label(v, runs) for v in variants], of_trace)
    fig.update_layout(**{**LAYOUT, "height": 460, "margin": {"l": 60, "r": 20, "t": 100, "b": 50}},
                      title="Kernel per block, by module type")
    fig.update_xaxes(title_text="block", **_AXIS, **_block_ticks(profiles))
    fig.update_yaxes(title_text="kernel %", row=1, col=1)
    fig.update_yaxes(**_AXIS)
    return fig


def _panel_title(name: str) -> str:
    """A heatmap panel's title, its transform on a line of its own."""
    return "<br>".join(esc(part) for part in name.split(" · "))


def heatmap(run: str, layers: pl.DataFrame) -> go.Figure:
    """Block × module type kernel %: the 8-bit configurations (per-token INT8 beside CrossQuant INT8, or
    the first ones, and the first of another transform), then the 4-bit ones; module types fed the
    same tensor share a row. Each width has its own colour range, that of its panels, and its own
    colour bar."""
    eight = layers.filter(pl.col("bits") == 8)["series"].unique(maintain_order=True).to_list()[:2]
    configs = eight or layers["series"].unique(maintain_order=True).to_list()[:2]
    other = layers.filter((pl.col("transform") != NONE) & (pl.col("config") == layers["config"][0]))
    configs += [c for c in other["series"].unique(maintain_order=True).to_list()[:1] if c not in configs]
    four = [c for c in layers.filter((pl.col("bits") == 4) & (pl.col("transform") == NONE))["series"]
            .unique(maintain_order=True).to_list()[:2] if c not in configs]
    panels = [(c, 1) for c in configs] + [(c, 2) for c in four]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[_panel_title(c) for c, _ in panels],
                        shared_yaxes=True, horizontal_spacing=0.03)
    in_blocks = layers.filter(pl.col("block").is_not_null())
    groups = module_groups([(run, layers)])
    blocks = sorted(in_blocks["block"].unique().to_list())
    for i, (config, axis) in enumerate(panels):
        sub = in_blocks.filter(pl.col("series") == config)
        cell = {(r["module_type"], r["block"]): r["kernel_fraction"] for r in sub.iter_rows(named=True)}
        values = [[cell.get((types[0], b)) for b in blocks] for _, types in groups]
        z = [[None if v is None else round(100 * v, 6) for v in row] for row in values]
        fig.add_trace(go.Heatmap(z=z, x=blocks, y=[esc(name) for name, _ in groups],
                                 coloraxis=_colour_axis(axis),
                                 text=[[N.share(v) for v in row] for row in values],
                                 hovertemplate="block %{x}, %{y}: %{text}<extra></extra>"),
                      row=1, col=i + 1)
    axes = {}
    for axis, width in ((1, "8-bit" if eight else "these"), (2, "4-bit")):
        mine = [c for c, a in panels if a == axis]
        if mine:
            top = max(in_blocks.filter(pl.col("series").is_in(mine))["kernel_fraction"].max() or 0.0,
                      1e-9) * 100
            axes[_colour_axis(axis)] = {"colorscale": "Viridis", "cmin": 0, "cmax": top,
                                        "colorbar": {"title": {"text": f"{width} kernel %", "side": "right"},
                                                     "x": 1.01 + 0.11 * (axis - 1), "xanchor": "left",
                                                     "len": 0.9, "thickness": 12}}
    fig.update_layout(**{**LAYOUT, "height": 200 + 32 * len(groups),
                         "margin": {"l": 170, "r": 150, "t": 90, "b": 50}},
                      title=esc(f"{run}: kernel % by block and module type"), **axes)
    fig.update_annotations(font_size=12)  # the panels' titles
    fig.update_xaxes(title_text="block", **_block_ticks([(run, layers)]))
    fig.update_yaxes(title_text="module type", row=1, col=1)
    return fig


def _colour_axis(n: int) -> str:
    return "coloraxis" if n == 1 else f"coloraxis{n}"


def zero_bounds(profiles: list[tuple[str, pl.DataFrame]], colours: dict[str, str]) -> go.Figure:
    """Median and 99th percentile of the 8-bit zero bound against the block, one panel per module type
    (types fed the same tensor in one): per-token B against CrossQuant B̃, one colour per configuration,
    one line style per run, transform and statistic (a menu shows one run and transform at a time)."""
    groups = module_groups(profiles)
    fig = _module_panels(groups)
    variants = _variants(profiles)
    runs = len(profiles)
    shown: set[str] = set()
    of_trace = []
    with_bounds = (pl.col("bits") == 8) & pl.col("bound_p50").is_not_null()  # a target's rows have none
    for run, col, module_type, config, transform, rows in _panel_lines(profiles, groups, with_bounds):
        v = variants.index((run, transform))
        for s, stat in enumerate(("bound_p50", "bound_p99")):
            name = f"{series_name(config, transform)} {stat[6:]}"
            name = name if runs == 1 else f"{run}: {name}"
            fig.add_trace(go.Scatter(
                x=rows["block"].to_list(), y=[float(f"{x:.4g}") for x in rows[stat]], mode="lines",
                name=esc(name), legendgroup=esc(name), showlegend=name not in shown,
                text=[N.magnitude(x) for x in rows[stat]],
                hovertemplate=f"block %{{x}}, {esc(module_type)}: %{{text}}<extra>%{{fullData.name}}</extra>",
                line={"color": colours[config], "dash": dash_of(2 * v + s)}), row=1, col=col)
            of_trace.append(v)
            shown.add(name)
    _variant_menu(fig, [_variant_label(v, runs) for v in variants], of_trace)
    fig.update_layout(**{**LAYOUT, "height": 460, "margin": {"l": 70, "r": 20, "t": 100, "b": 50},
                         "legend": {"orientation": "h", "y": -0.25}},
                      title="Zero bound per block, by module type (8-bit): B per-token vs B̃ CrossQuant")
    fig.update_xaxes(title_text="block", **_AXIS, **_block_ticks(profiles))
    fig.update_yaxes(type="log", **_AXIS)
    fig.update_yaxes(title_text="zero bound, in units of |x| (p50, p99)", row=1, col=1)
    return fig


def c_ge_t(profiles: list[tuple[str, pl.DataFrame]]) -> go.Figure:
    """Share of pairs with c_j ≥ t_i per block, one line per module type (those fed the same tensor as
    one) and line style per run: where CrossQuant's bound is not below per-token's. In the input's own
    basis."""
    fig = go.Figure()
    groups = module_groups(profiles)
    for r, (run, layers) in enumerate(profiles):
        basis = NONE if (layers["transform"] == NONE).any() else layers["transform"][0]
        own = layers.filter((pl.col("transform") == basis) & pl.col("block").is_not_null())
        for g, (name, types) in enumerate(groups):
            rows = (own.filter(pl.col("module_type") == types[0])
                    .unique(subset="layer", maintain_order=True).sort("block"))
            fig.add_trace(go.Scatter(
                x=rows["block"].to_list(), y=[round(100 * v, 6) for v in rows["c_ge_t_fraction"]],
                mode="lines+markers", marker={"size": 4},
                name=esc(f"{run}: {name}" + ("" if basis == NONE else f", {basis} basis")),
                text=[N.share(v) for v in rows["c_ge_t_fraction"]],
                hovertemplate="block %{x}: c ≥ t %{text}<extra>%{fullData.name}</extra>",
                line={"color": MODULE_PALETTE[g % len(MODULE_PALETTE)], "dash": dash_of(r)}))
    fig.update_layout(**LAYOUT, title="Pairs with c_j ≥ t_i per block, by module type", xaxis_title="block",
                      yaxis_title="c ≥ t %")
    fig.update_xaxes(**_block_ticks(profiles))
    return fig


def searches_of(summary: dict) -> list[dict]:
    """The searches of a threshold run, one per transform (a run of an earlier version holds one)."""
    return summary.get("searches") or [summary]


def _named(run: str, what: str, transform: str | None) -> str:
    return f"{run}: {what}" if transform in (None, NONE) else f"{run}: {what}, {transform}"


def paired_bars(rows: list[dict], field: str = "change_pct") -> dict | None:
    """Asymmetric error bars of each row's paired interval (``field``'s ``_ci_low`` and ``_ci_high``,
    resampled together with fp's windows), or None when no row has one."""
    if not any(r.get(f"{field}_ci_low") is not None for r in rows):
        return None

    def reach(r: dict, end: str, sign: int) -> float | None:
        bound = r.get(f"{field}_ci_{end}")
        return None if bound is None or r.get(field) is None else round(sign * (bound - r[field]), 6)

    return {"type": "data", "symmetric": False, "array": [reach(r, "high", 1) for r in rows],
            "arrayminus": [reach(r, "low", -1) for r in rows], "thickness": 1, "width": 3}


def _change_text(r: dict) -> str:
    """``+1.95% [-0.23%, +4.24%]``: a row's change from fp with its paired interval."""
    spread = N.interval(r.get("change_pct_ci_low"), r.get("change_pct_ci_high"), signed=True)
    return N.percent(r.get("change_pct"), signed=True) + (f" {spread}" if spread else "")


def _search_points(search: dict, fp: float, table: pl.DataFrame | None) -> list[dict]:
    """A search's points by kernel proportion, each with its change from fp and paired interval (from
    the run's table, where it has them; a run without them has its change and no interval)."""
    if table is not None and {"lambda", "change_pct_ci_low"} <= set(table.columns):
        mine = table.filter(pl.col("lambda").is_not_null())
        if "transform" in table.columns:
            mine = mine.filter(pl.col("transform") == search.get("transform", NONE))
        if len(mine):
            return sorted(mine.to_dicts(), key=lambda p: p["kernel_fraction"])
    return sorted(({**p, "change_pct": 100 * (p["perplexity"] / fp - 1)} for p in search["curve"]),
                  key=lambda p: p["kernel_fraction"])


def threshold_curve(runs: list[tuple[str, dict, pl.DataFrame | None]], colours: dict[str, str]) -> go.Figure:
    """Remove-kernel perplexity change from fp against kernel proportion, each point with its paired 95%
    interval, with the fp line, the tolerance, the crossing and its 95% interval, and the model's own
    kernels of the searched family (the only ones the threshold applies to) as dotted lines; the x axis
    fits the points."""
    fig = go.Figure()
    fig.add_hline(y=0, line={"color": "#777777"}, annotation_text="fp", annotation_position="bottom left")
    xs: list[float] = []
    variant = marks = found_count = 0
    for run, summary, table in runs:
        fig.add_hline(y=100 * summary["tolerance"], line={"color": "#555555", "dash": "dot"},
                      annotation_text=esc(f"{run}: tolerance, fp + {100 * summary['tolerance']:g}%"),
                      annotation_position="top right", annotation_font_size=10)
        family = summary.get("family") or {}
        color = colours.get(family.get("label"), PALETTE[0])
        for search in searches_of(summary):
            transform = search.get("transform", NONE)
            curve = _search_points(search, summary["fp_perplexity"], table)
            xs += [100 * p["kernel_fraction"] for p in curve]
            fig.add_trace(go.Scatter(
                x=[round(100 * p["kernel_fraction"], 6) for p in curve],
                y=[round(p["change_pct"], 6) for p in curve], mode="lines+markers",
                name=esc(_named(run, f"remove-kernel, {family.get('label', 'family')}", transform)),
                error_y=paired_bars(curve), line={"color": color, "dash": dash_of(variant)},
                text=[esc(f"λ={p['lambda']:.4g}, kernel {N.share(p['kernel_fraction'])}: {_change_text(p)}")
                      for p in curve],
                hovertemplate="%{text}<extra>%{fullData.name}</extra>"))
            variant += 1
            spread = search.get("crossing_uncertainty") or {}
            if search.get("status") == "crossing bracketed" and search.get("threshold_kernel_fraction"):
                found = Threshold(family, transform, search["threshold_kernel_fraction"],
                                  spread.get("kernel_fraction_ci_low"), spread.get("kernel_fraction_ci_high"))
                xs.append(100 * found.value)
                fig.add_vline(x=round(100 * found.value, 6), line={"color": color, "dash": "dash"},
                              annotation_text=esc(f"threshold {found.text()}"), annotation_font_size=11,
                              annotation_position="top right", annotation_yshift=-14 * found_count)
                found_count += 1
                if found.low is not None:
                    fig.add_vrect(x0=100 * found.low, x1=100 * found.high, fillcolor=color, opacity=0.08,
                                  line_width=0)
            for k in search.get("actual_kernels") or []:  # the model's own kernels of this family
                if same_family(family, k) and k.get("transform", transform) == transform:
                    xs.append(100 * k["kernel_fraction"])
                    fig.add_vline(x=round(100 * k["kernel_fraction"], 6),
                                  line={"color": color, "dash": "dot", "width": 1},
                                  annotation_text=esc(f"{series_name(k['config'], transform)}: "
                                                      f"{N.share(k['kernel_fraction'])}"),
                                  annotation_position="bottom right", annotation_font_size=10,
                                  annotation_yshift=14 * marks)
                    marks += 1
    fig.update_layout(**LAYOUT, title="Threshold: remove-kernel perplexity change vs kernel proportion",
                      xaxis_title="kernel %", yaxis_title="perplexity change from fp, % (95% paired)")
    if xs:
        low, high = min(xs), max(xs)
        pad = 0.05 * (high - low) or 0.5
        fig.update_xaxes(range=[max(0.0, low - pad), high + pad])
    return fig


def _fp_kernel(row: dict) -> float | None:
    """A sweep row's kernel on full-precision activations (``kernel_fraction`` in a run written before
    ``kernel_fraction`` meant the kernel of the row's own pass, beside ``quantized_kernel_fraction``)."""
    return row["kernel_fraction"] if "quantized_kernel_fraction" in row else row.get("fp_kernel_fraction")


def swept(row: dict) -> str:
    """What one line of the α sweep draws, and its colour's name: the quantizer without its α."""
    quantizer = re.sub(r"\s*a=\S+", "", str(row.get("quantizer") or "crossquant"))
    return f"{quantizer} over α"


def alpha_sweep(runs: list[tuple[str, dict]], colours: dict[str, str]) -> go.Figure:
    """Perplexity change from fp with its paired interval (and the fp line), and kernel % against
    CrossQuant α (α = 1 is per-token), in two panels, one line per run, quantizer and transform."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["perplexity change from fp, % (95% paired)",
                                                        "kernel % on fp activations"], horizontal_spacing=0.1)
    variant = 0
    for run, summary in runs:
        fp = summary.get("fp_perplexity")
        rows = [x for x in summary["results"] if x["alpha"] is not None]
        for key, transform in dict.fromkeys((swept(x), x.get("transform")) for x in rows):
            mine = [x for x in rows if swept(x) == key and x.get("transform") == transform]
            mine = [x if x.get("change_pct") is not None or fp is None or x.get("perplexity") is None
                    else {**x, "change_pct": 100 * (x["perplexity"] / fp - 1)} for x in mine]
            name = esc(_named(run, key, transform))
            line = {"color": colours.get(key, PALETTE[0]), "dash": dash_of(variant)}
            variant += 1
            alphas = [x["alpha"] for x in mine]
            changes = [None if x.get("change_pct") is None else round(x["change_pct"], 6) for x in mine]
            fig.add_trace(go.Scatter(
                x=alphas, y=changes, mode="lines+markers", name=name, legendgroup=name, line=line,
                error_y=paired_bars(mine),
                text=[esc(f"α={x['alpha']:g}: {_change_text(x)}") for x in mine],
                hovertemplate="%{text}<extra>%{fullData.name}</extra>"), row=1, col=1)
            kernels = [_fp_kernel(x) for x in mine]
            fig.add_trace(go.Scatter(
                x=alphas, y=[None if k is None else round(100 * k, 6) for k in kernels], mode="lines+markers",
                name=name, legendgroup=name, showlegend=False, line=line,
                text=[f"α={a:g}: kernel {N.share(k)}" for a, k in zip(alphas, kernels, strict=True)],
                hovertemplate="%{text}<extra>%{fullData.name}</extra>"), row=1, col=2)
    fig.add_hline(y=0, line={"color": "#777777", "dash": "dot"}, row=1, col=1, annotation_text="fp",
                  annotation_position="bottom right")
    fig.update_layout(**LAYOUT, title="CrossQuant α sweep")
    fig.update_xaxes(title_text="α", **_AXIS)
    fig.update_yaxes(**_AXIS)
    fig.update_yaxes(title_text="change from fp, %", row=1, col=1)
    fig.update_yaxes(title_text="kernel %", row=1, col=2)
    return fig


def tie_groups(rows: list[dict]) -> list[int]:
    """For rows in order of their change from fp, the group of each: a row joins the group before it
    where its paired interval overlaps the interval of every row of that group (read as a tie: each
    interval is against fp, not between the schemes), else starts a group; a row without an interval
    is a group of its own."""
    groups: list[int] = []
    low = high = None  # the group's intersection of intervals
    for r in rows:
        lo, hi = r.get("change_pct_ci_low"), r.get("change_pct_ci_high")
        if groups and lo is not None and low is not None and lo <= high and hi >= low:
            groups.append(groups[-1])
            low, high = max(low, lo), min(high, hi)
        else:
            groups.append(groups[-1] + 1 if groups else 0)
            low, high = lo, hi
    return groups


def eval_forest(evals: list[tuple[str, dict]]) -> go.Figure | None:
    """Every evaluated row's perplexity change from fp with its paired 95% interval, one row per scheme
    and transform, best first; rows whose intervals all overlap share a shaded band, to be read as
    ties (:func:`tie_groups`). None when no row has a change from fp."""
    rows = []
    for run, s in evals:
        for r in s["results"]:
            if r.get("change_pct") is not None:
                name = series_name(r["scheme"], r.get("transform", NONE))
                rows.append({**r, "row": name if len(evals) == 1 else f"{run}: {name}"})
    if not rows:
        return None
    rows.sort(key=lambda r: r["change_pct"])
    seen: dict[str, int] = {}
    for r in rows:  # a category name once
        seen[r["row"]] = seen.get(r["row"], 0) + 1
        r["row"] += "" if seen[r["row"]] == 1 else f" ({seen[r['row']]})"
    groups = tie_groups(rows)
    fig = go.Figure()
    for g in sorted(set(groups)):
        at = [i for i, x in enumerate(groups) if x == g]
        if len(at) > 1:
            fig.add_hrect(y0=at[0] - 0.45, y1=at[-1] + 0.45, fillcolor="#000000", line_width=0,
                          opacity=0.05 + 0.04 * (g % 2))
    for t, transform in enumerate(dict.fromkeys(r.get("transform", NONE) for r in rows)):
        mine = [r for r in rows if r.get("transform", NONE) == transform]
        colour, symbol = TRANSFORM_MARKS[t % len(TRANSFORM_MARKS)]
        fig.add_trace(go.Scatter(
            x=[round(r["change_pct"], 6) for r in mine], y=[esc(r["row"]) for r in mine], mode="markers",
            name=esc("no transform" if transform == NONE else transform), error_x=paired_bars(mine),
            marker={"color": colour, "symbol": symbol, "size": 8},
            text=[esc(f"{_change_text(r)}, {r.get('vs_fp') or ''}") for r in mine],
            hovertemplate="%{y}: %{text}<extra></extra>"))
    fig.add_vline(x=0, line={"color": "#777777", "dash": "dot"}, annotation_text="fp",
                  annotation_position="top")
    legend = {"orientation": "h", "x": 1, "xanchor": "right", "y": 1, "yanchor": "bottom"}
    fig.update_layout(**{**LAYOUT, "height": 160 + 24 * len(rows), "legend": legend,
                         "margin": {"l": 230, "r": 20, "t": 70, "b": 50}},
                      title={"x": 0, "xref": "paper",
                             "text": "Perplexity change from fp, every evaluated scheme (95% paired)"})
    fig.update_xaxes(title_text="perplexity change from fp, %", **_AXIS)
    fig.update_yaxes(categoryorder="array", categoryarray=[esc(r["row"]) for r in rows],
                     autorange="reversed", **_AXIS)
    return fig


@dataclass
class SearchPoint:
    """One keep-set the plan search measured: the kept share of the covered parameters, the change from
    fp on the selection windows and its paired 95% interval (None where it cannot be computed)."""

    kept_cells: int
    kept_layers: int
    share: float | None
    change_pct: float | None
    low: float | None = None
    high: float | None = None
    within: bool | None = None


def search_points(search: pl.DataFrame, total: int | None, fp_window_nll: list[float] | None,
                  known: dict[int, dict]) -> list[SearchPoint]:
    """The plan search's measured keep-sets (``search.parquet``), fewest kept parameters first. A point's
    paired interval is resampled from its per-window NLLs against fp's on the same windows
    (``fp_window_nll``, where given); without them, the interval summary.json records for a point
    (``known``, by kept cells: the scheme alone and the plan), else none."""
    points = []
    for r in search.sort("parameters", "kept_cells", maintain_order=True).iter_rows(named=True):
        low = high = None
        own = r.get("window_nll")
        if fp_window_nll is not None and own is not None and len(own) == len(fp_window_nll) > 1:
            diff = paired_difference(own, fp_window_nll)
            low, high = diff.change_pct_low, diff.change_pct_high
        elif r["kept_cells"] in known:
            low, high = known[r["kept_cells"]].get("change_pct_ci_low"), known[r["kept_cells"]].get(
                "change_pct_ci_high")
        share = r["parameters"] / total if total else None
        points.append(SearchPoint(r["kept_cells"], r["kept_layers"], share, r.get("change_pct"), low, high,
                                  r.get("within_tolerance")))
    return points


def _bars(rows: list[tuple[float | None, float | None, float | None]]) -> dict | None:
    """Asymmetric error bars from ``(value, low, high)`` triples, None where no row has an interval."""
    if not any(low is not None for _, low, _ in rows):
        return None
    return {"type": "data", "symmetric": False, "thickness": 1, "width": 3,
            "array": [None if h is None or v is None else round(h - v, 6) for v, _, h in rows],
            "arrayminus": [None if lo is None or v is None else round(v - lo, 6) for v, lo, _ in rows]}


def _point_text(what: str, change: float | None, low: float | None, high: float | None) -> str:
    spread = N.interval(low, high, signed=True)
    return esc(f"{what}: {N.percent(change, signed=True)}" + (f" {spread}" if spread else ""))


def search_curve(run: str, points: list[SearchPoint], tolerance: float | None, plan: SearchPoint | None,
                 held: SearchPoint | None, held_windows: int | None) -> go.Figure:
    """The plan search: each measured keep-set's change from fp (selection windows, paired 95% interval
    where known) against the share of the covered parameters it keeps in full precision, the fp line,
    the tolerance, the chosen plan marked, and the plan measured again on held-out windows."""
    fig = go.Figure()
    fig.add_hline(y=0, line={"color": "#777777"}, annotation_text="fp", annotation_position="bottom left")
    if tolerance is not None:
        fig.add_hline(y=100 * tolerance, line={"color": "#555555", "dash": "dot"},
                      annotation_text=esc(f"tolerance, fp + {100 * tolerance:g}%"),
                      annotation_position="top right", annotation_font_size=10)

    def x(p: SearchPoint) -> float | None:
        return None if p.share is None else round(100 * p.share, 6)

    fig.add_trace(go.Scatter(
        x=[x(p) for p in points],
        y=[None if p.change_pct is None else round(p.change_pct, 6) for p in points],
        mode="lines+markers", name="keep-sets measured (selection windows)",
        line={"color": PALETTE[0], "dash": "solid"}, marker={"color": PALETTE[0], "size": 7},
        error_y=_bars([(p.change_pct, p.low, p.high) for p in points]),
        text=[_point_text(f"keep {p.kept_cells} cells ({p.kept_layers} layers, {N.share(p.share)} of the "
                          "parameters)", p.change_pct, p.low, p.high) for p in points],
        hovertemplate="%{text}<extra></extra>"))
    marks = [(plan, "the plan (selection windows)", "star", PALETTE[1]),
             (held, f"the plan on {held_windows or 'the'} held-out windows", "diamond", PALETTE[2])]
    for point, name, symbol, colour in marks:
        if point is None or point.change_pct is None:
            continue
        fig.add_trace(go.Scatter(
            x=[x(point)], y=[round(point.change_pct, 6)], mode="markers", name=esc(name),
            marker={"color": colour, "symbol": symbol, "size": 14, "line": {"width": 1, "color": "#222222"}},
            error_y=_bars([(point.change_pct, point.low, point.high)]),
            text=[_point_text(name, point.change_pct, point.low, point.high)],
            hovertemplate="%{text}<extra></extra>"))
    fig.update_layout(**LAYOUT, title=esc(f"{run}: the plan search, change from fp by kept parameters"),
                      xaxis_title="kept in full precision, % of the covered parameters",
                      yaxis_title="perplexity change from fp, % (95% paired)")
    xs = [v for v in map(x, [*points, *(p for p in (plan, held) if p is not None)]) if v is not None]
    if xs:  # room on the right for the tolerance's label, none left of 0 where nothing lies
        low, high = min(xs), max(xs)
        span = max(high - low, 5.0)  # percentage points
        fig.update_xaxes(range=[low - 0.05 * span, high + 0.3 * span])
    return fig
