"""Plotly figures from run tables. Every string that came from a model or a file is HTML-escaped
before it reaches plotly, which interprets a few tags in text."""

from __future__ import annotations

import html

import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from kernelscope.quant.transforms import NONE

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
"""The colours of quantizer configurations (one each, the same in every figure)."""
MODULE_PALETTE = ("#333333", "#b8860b", "#708090", "#c71585", "#556b2f", "#4b0082")
"""The colours of module types where a figure draws them (c >= t), none of them a configuration's."""
_AXIS = dict(gridcolor="#e5e5e5", zerolinecolor="#cccccc")
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


def colour_of(names: list[str]) -> dict[str, str]:
    """One colour per name, given in order of first appearance over every run of a report, so that a
    configuration has the same colour in every run and figure."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(dict.fromkeys(names))}


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
    """Each line of a figure with one panel per module group: ``(run index, run, panel column, module
    type, series, its rows by block)``, over the decoder blocks' rows that ``keep`` admits."""
    for r, (run, layers) in enumerate(profiles):
        in_blocks = layers.filter(pl.col("block").is_not_null())
        in_blocks = in_blocks if keep is None else in_blocks.filter(keep)
        for col, (_, types) in enumerate(groups, start=1):
            mine = in_blocks.filter(pl.col("module_type") == types[0])
            for config in mine["series"].unique(maintain_order=True):
                yield r, run, col, types[0], config, mine.filter(pl.col("series") == config).sort("block")


def depth_kernel(profiles: list[tuple[str, pl.DataFrame]], colours: dict[str, str],
                 threshold: float | None = None) -> go.Figure:
    """Kernel % against the block, one panel per module type (types fed the same tensor in one), one
    colour per quantizer configuration (and transform), one line style per run; the threshold located
    on the model as a line."""
    groups = module_groups(profiles)
    fig = _module_panels(groups)
    shown: set[str] = set()
    for r, run, col, module_type, config, rows in _panel_lines(profiles, groups):
        name = f"{run}: {config}"
        fig.add_trace(go.Scatter(
            x=rows["block"].to_list(), y=[round(100 * v, 4) for v in rows["kernel_fraction"]],
            mode="lines+markers", marker={"size": 4}, name=esc(name), legendgroup=esc(name),
            showlegend=name not in shown, text=[esc(f"block {b}, {module_type}") for b in rows["block"]],
            hovertemplate="%{text}<br>kernel %{y:.2f}%<extra>%{fullData.name}</extra>",
            line={"color": colours[config], "dash": ("solid", "dot", "dash")[r % 3]}), row=1, col=col)
        shown.add(name)
    if threshold is not None:
        fig.add_hline(y=100 * threshold, line={"color": "#555555", "dash": "dash"},
                      annotation_text=f"threshold {100 * threshold:.2f}%", annotation_position="top left")
    fig.update_layout(**{**LAYOUT, "height": 440, "margin": {"l": 60, "r": 20, "t": 80, "b": 50}},
                      title="Kernel per block, by module type")
    fig.update_xaxes(title_text="block", **_AXIS)
    fig.update_yaxes(title_text="kernel %", row=1, col=1)
    fig.update_yaxes(**_AXIS)
    return fig


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
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[esc(c) for c, _ in panels],
                        shared_yaxes=True, horizontal_spacing=0.05)
    in_blocks = layers.filter(pl.col("block").is_not_null())
    groups = module_groups([(run, layers)])
    blocks = sorted(in_blocks["block"].unique().to_list())
    for i, (config, axis) in enumerate(panels):
        sub = in_blocks.filter(pl.col("series") == config)
        cell = {(r["module_type"], r["block"]): r["kernel_fraction"] for r in sub.iter_rows(named=True)}
        z = [[round(100 * cell[(types[0], b)], 3) if (types[0], b) in cell else None for b in blocks]
             for _, types in groups]
        fig.add_trace(go.Heatmap(z=z, x=blocks, y=[esc(name) for name, _ in groups],
                                 coloraxis=_colour_axis(axis),
                                 hovertemplate="block %{x}, %{y}: %{z:.2f}%<extra></extra>"),
                      row=1, col=i + 1)
    axes = {}
    for axis, width in ((1, "8-bit" if eight else "these"), (2, "4-bit")):
        mine = [c for c, a in panels if a == axis]
        if mine:
            top = max(in_blocks.filter(pl.col("series").is_in(mine))["kernel_fraction"].max() or 0.0,
                      1e-9) * 100
            axes[_colour_axis(axis)] = {"colorscale": "Viridis", "cmin": 0, "cmax": top,
                                        "colorbar": {"title": f"kernel %, {width} panels",
                                                     "x": 1.0 + 0.1 * (axis - 1), "len": 0.9}}
    fig.update_layout(**{**LAYOUT, "height": 170 + 32 * len(groups),
                         "margin": {"l": 170, "r": 90, "t": 60, "b": 50}},
                      title=esc(f"{run}: kernel % by block and module type"), **axes)
    fig.update_xaxes(title_text="block")
    fig.update_yaxes(title_text="module type", row=1, col=1)
    return fig


def _colour_axis(n: int) -> str:
    return "coloraxis" if n == 1 else f"coloraxis{n}"


def zero_bounds(profiles: list[tuple[str, pl.DataFrame]], colours: dict[str, str]) -> go.Figure:
    """Median and 99th percentile of the INT8 zero bound against the block, one panel per module type
    (types fed the same tensor in one): per-token B against CrossQuant B̃, one colour per configuration,
    one pair of line styles (p50, p99) per run."""
    groups = module_groups(profiles)
    fig = _module_panels(groups)
    styles = (("solid", "dot"), ("dash", "dashdot"), ("longdash", "longdashdot"))
    shown: set[str] = set()
    for r, run, col, module_type, config, rows in _panel_lines(profiles, groups, pl.col("bits") == 8):
        for stat, dash in zip(("bound_p50", "bound_p99"), styles[r % len(styles)], strict=True):
            name = f"{run}: {config} {stat[6:]}"
            fig.add_trace(go.Scatter(
                x=rows["block"].to_list(), y=[float(f"{v:.4g}") for v in rows[stat]], mode="lines",
                name=esc(name), legendgroup=esc(name), showlegend=name not in shown,
                text=[esc(f"block {b}, {module_type}") for b in rows["block"]],
                hovertemplate="%{text}<br>%{y:.3g}<extra>%{fullData.name}</extra>",
                line={"color": colours[config], "dash": dash}), row=1, col=col)
            shown.add(name)
    fig.update_layout(**{**LAYOUT, "height": 440, "margin": {"l": 70, "r": 20, "t": 80, "b": 50},
                         "legend": {"orientation": "h", "y": -0.25}},
                      title="Zero bound per block, by module type (INT8): B per-token vs B̃ CrossQuant")
    fig.update_xaxes(title_text="block", **_AXIS)
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
                x=rows["block"].to_list(), y=[round(100 * v, 4) for v in rows["c_ge_t_fraction"]],
                mode="lines+markers", marker={"size": 4},
                name=esc(f"{run}: {name}" + ("" if basis == NONE else f", {basis} basis")),
                hovertemplate="block %{x}<br>c ≥ t: %{y:.2f}%<extra>%{fullData.name}</extra>",
                line={"color": MODULE_PALETTE[g % len(MODULE_PALETTE)],
                      "dash": ("solid", "dot", "dash")[r % 3]}))
    fig.update_layout(**LAYOUT, title="Pairs with c_j ≥ t_i per block, by module type", xaxis_title="block",
                      yaxis_title="c ≥ t %")
    return fig


def searches_of(summary: dict) -> list[dict]:
    """The searches of a threshold run, one per transform (a run of an earlier version holds one)."""
    return summary.get("searches") or [summary]


def _named(run: str, what: str, transform: str | None) -> str:
    return f"{run}: {what}" if transform in (None, NONE) else f"{run}: {what}, {transform}"


def threshold_curve(runs: list[tuple[str, dict]]) -> go.Figure:
    """Remove-kernel perplexity change from fp against kernel proportion, each point with its 95%
    interval, with the fp line, the tolerance, the crossing and its 95% interval, and the model's own
    kernels as dotted vertical lines."""
    fig = go.Figure()
    fig.add_hline(y=0, line={"color": "#777777"}, annotation_text="fp", annotation_position="bottom left")
    trace = 0
    for run, summary in runs:
        fp = summary["fp_perplexity"]
        fig.add_hline(y=100 * summary["tolerance"],
                      line={"color": PALETTE[trace % len(PALETTE)], "dash": "dot"},
                      annotation_text=esc(f"{run}: fp + {100 * summary['tolerance']:g}%"))
        for search in searches_of(summary):
            color = PALETTE[trace % len(PALETTE)]
            trace += 1
            curve = sorted(search["curve"], key=lambda p: p["kernel_fraction"])
            fig.add_trace(go.Scatter(
                x=[round(100 * p["kernel_fraction"], 4) for p in curve],
                y=[round(100 * (p["perplexity"] / fp - 1), 4) for p in curve],
                mode="lines+markers", name=esc(_named(run, "remove-kernel", search.get("transform"))),
                error_y=_interval(curve, lambda v, fp=fp: 100 * (v / fp - 1)),
                line={"color": color},
                text=[f"λ={p['lambda']:.4g}, ppl {p['perplexity']:.4f}" for p in curve],
                hovertemplate="%{text}<br>kernel %{x:.2f}%<br>%{y:+.2f}% from fp"
                              "<extra>%{fullData.name}</extra>"))
            within = (search.get("bracket") or {}).get("within")
            if within and search.get("status") == "crossing bracketed":
                fig.add_vline(x=100 * within["kernel_fraction"], line={"color": color, "dash": "dash"},
                              annotation_text=esc(f"threshold {100 * within['kernel_fraction']:.2f}%"))
            spread = search.get("crossing_uncertainty") or {}
            if spread.get("kernel_fraction_ci_low") is not None:
                fig.add_vrect(x0=100 * spread["kernel_fraction_ci_low"],
                              x1=100 * spread["kernel_fraction_ci_high"],
                              fillcolor=color, opacity=0.08, line_width=0)
            for i, k in enumerate(search.get("actual_kernels") or []):  # where the model's own kernels sit
                fig.add_vline(x=round(100 * k["kernel_fraction"], 4),
                              line={"color": color, "dash": "dot", "width": 1},
                              annotation_text=esc(f"{k['config']}: {100 * k['kernel_fraction']:.2f}%"),
                              annotation_position="top right" if i % 2 == 0 else "bottom right",
                              annotation_font_size=10)
    fig.update_layout(**LAYOUT, title="Threshold: remove-kernel perplexity change vs kernel proportion",
                      xaxis_title="kernel %", yaxis_title="perplexity change from fp, %")
    return fig


def _fp_kernel(row: dict) -> float | None:
    """A sweep row's kernel on full-precision activations (``kernel_fraction`` in a run written before
    ``kernel_fraction`` meant the kernel of the row's own pass, beside ``quantized_kernel_fraction``)."""
    return row["kernel_fraction"] if "quantized_kernel_fraction" in row else row.get("fp_kernel_fraction")


def alpha_sweep(runs: list[tuple[str, dict]]) -> go.Figure:
    """Perplexity with its interval (and the fp line) and kernel % against CrossQuant α (α = 1 is
    per-token), in two panels, one line per run and transform."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["perplexity, 95% interval (dotted: fp)",
                                                        "kernel % on fp activations"], horizontal_spacing=0.1)
    trace = 0
    for run, summary in runs:
        rows = [x for x in summary["results"] if x["alpha"] is not None]
        for transform in dict.fromkeys(x.get("transform") for x in rows):
            color = PALETTE[trace % len(PALETTE)]
            trace += 1
            mine = [x for x in rows if x.get("transform") == transform]
            alphas = [x["alpha"] for x in mine]
            fig.add_trace(go.Scatter(x=alphas, y=[x["perplexity"] for x in mine], mode="lines+markers",
                                     name=esc(_named(run, "perplexity", transform)), line=dict(color=color),
                                     error_y=_interval(mine)), row=1, col=1)
            kernels = [_fp_kernel(x) for x in mine]
            fig.add_trace(go.Scatter(x=alphas, y=[None if k is None else round(100 * k, 4) for k in kernels],
                                     mode="lines+markers", name=esc(_named(run, "kernel %", transform)),
                                     line=dict(color=color)), row=1, col=2)
        if summary.get("fp_perplexity") is not None:  # after the traces: an empty panel takes no line
            fig.add_hline(y=summary["fp_perplexity"], line=dict(color="#777777", dash="dot"), row=1, col=1,
                          annotation_text=esc(f"{run}: fp {summary['fp_perplexity']:.4f}"),
                          annotation_position="bottom right")
    fig.update_layout(**LAYOUT, title="CrossQuant α sweep")
    fig.update_xaxes(title_text="α", **_AXIS)
    fig.update_yaxes(**_AXIS)
    fig.update_yaxes(title_text="perplexity", row=1, col=1)
    fig.update_yaxes(title_text="kernel %", row=1, col=2)
    return fig


def _interval(rows: list[dict], scale=lambda v: v) -> dict | None:
    """Asymmetric error bars from each row's ``perplexity_ci_low`` and ``perplexity_ci_high`` (through
    ``scale``), or None when no row has them."""
    if not any(r.get("perplexity_ci_low") is not None for r in rows):
        return None
    up = [None if r.get("perplexity_ci_high") is None
          else round(scale(r["perplexity_ci_high"]) - scale(r["perplexity"]), 4)
          for r in rows]
    down = [None if r.get("perplexity_ci_low") is None
            else round(scale(r["perplexity"]) - scale(r["perplexity_ci_low"]), 4)
            for r in rows]
    return {"type": "data", "symmetric": False, "array": up, "arrayminus": down, "thickness": 1, "width": 3}
