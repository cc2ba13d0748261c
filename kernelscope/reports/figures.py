"""Plotly figures from run tables. Every string that came from a model or a file is HTML-escaped
before it reaches plotly, which interprets a few tags in text."""

from __future__ import annotations

import html

import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
_AXIS = dict(gridcolor="#e5e5e5", zerolinecolor="#cccccc")
# No template: plotly would embed a copy of it (about 7 kB) in every figure.
LAYOUT = dict(template=None, height=380, margin=dict(l=60, r=20, t=40, b=50), plot_bgcolor="white",
              legend=dict(orientation="h", y=-0.2), hovermode="closest", xaxis=_AXIS, yaxis=_AXIS)


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def with_series(layers: pl.DataFrame) -> pl.DataFrame:
    """``layers`` with a ``series`` column: the configuration, and the transform where it is not the
    identity (``per_token int4 · hadamard``): what one line of a figure draws."""
    return layers.with_columns(pl.when(pl.col("transform") == "none").then(pl.col("config"))
                               .otherwise(pl.format("{} · {}", "config", "transform")).alias("series"))


def colour_of(names: list[str]) -> dict[str, str]:
    """One colour per name, given in order of first appearance over every run of a report, so that a
    configuration has the same colour in every run and figure."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(dict.fromkeys(names))}


def layer_order(layers: pl.DataFrame) -> pl.DataFrame:
    """One row per layer in capture order, with its index along depth and a short hover name."""
    return (layers.select("layer", "block", "module_type").unique(subset="layer", maintain_order=True)
            .with_row_index("depth")
            .with_columns(pl.when(pl.col("block").is_not_null())
                          .then(pl.format("{}.{}", pl.col("block"), pl.col("module_type")))
                          .otherwise(pl.col("layer")).alias("short")))


def depth_kernel(profiles: list[tuple[str, pl.DataFrame]], colours: dict[str, str]) -> go.Figure:
    """Kernel % of every layer along depth, per quantizer configuration (and transform) and run."""
    fig = go.Figure()
    for r, (run, layers) in enumerate(profiles):
        order = layer_order(layers)
        for config in layers["series"].unique(maintain_order=True):
            rows = layers.filter(pl.col("series") == config).join(order.select("layer", "depth", "short"), on="layer")
            fig.add_trace(go.Scatter(
                x=rows["depth"].to_list(), y=[round(100 * v, 4) for v in rows["kernel_fraction"]],
                mode="lines", name=esc(f"{run}: {config}"), text=[esc(n) for n in rows["short"]],
                hovertemplate="%{text}<br>kernel %{y:.2f}%<extra>%{fullData.name}</extra>",
                line=dict(color=colours[config], dash=("solid", "dot", "dash")[r % 3])))
    fig.update_layout(**LAYOUT, title="Kernel per layer along depth", xaxis_title="layer (capture order)",
                      yaxis_title="kernel %")
    return fig


def heatmap(run: str, layers: pl.DataFrame) -> go.Figure:
    """Block × module type kernel %, per-token INT8 beside CrossQuant INT8 (or the first configs, and
    the first of another transform); the colour range is that of what is drawn."""
    configs = layers.filter(pl.col("bits") == 8)["series"].unique(maintain_order=True).to_list()[:2]
    configs = configs or layers["series"].unique(maintain_order=True).to_list()[:2]
    other = layers.filter((pl.col("transform") != "none") & (pl.col("config") == layers["config"][0]))
    configs += other["series"].unique(maintain_order=True).to_list()[:1]  # the first beside it in another basis
    fig = make_subplots(rows=1, cols=len(configs), subplot_titles=[esc(c) for c in configs],
                        shared_yaxes=True, horizontal_spacing=0.08)
    in_blocks = layers.filter(pl.col("block").is_not_null())
    types = in_blocks["module_type"].unique(maintain_order=True).to_list()
    blocks = sorted(in_blocks["block"].unique().to_list())
    drawn = in_blocks.filter(pl.col("series").is_in(configs))
    top = max(drawn["kernel_fraction"].max() or 0.0, 1e-9) * 100
    for i, config in enumerate(configs):
        sub = in_blocks.filter(pl.col("series") == config)
        cell = {(r["module_type"], r["block"]): r["kernel_fraction"] for r in sub.iter_rows(named=True)}
        z = [[round(100 * cell[(t, b)], 3) if (t, b) in cell else None for b in blocks] for t in types]
        fig.add_trace(go.Heatmap(z=z, x=blocks, y=[esc(t) for t in types], zmin=0, zmax=top,
                                 colorscale="Viridis", showscale=i == len(configs) - 1,
                                 colorbar=dict(title="kernel %"),
                                 hovertemplate="block %{x}, %{y}: %{z:.2f}%<extra></extra>"),
                      row=1, col=i + 1)
    fig.update_layout(**{**LAYOUT, "height": 120 + 28 * len(types)},
                      title=esc(f"{run}: kernel % by block and module type"))
    fig.update_xaxes(title_text="block")
    fig.update_yaxes(automargin=True)
    return fig


def zero_bounds(profiles: list[tuple[str, pl.DataFrame]], colours: dict[str, str]) -> go.Figure:
    """Median and 99th percentile of the zero bound along depth: per-token B against CrossQuant B̃."""
    fig = go.Figure()
    for run, layers in profiles:
        order = layer_order(layers)
        for config in layers.filter(pl.col("bits") == 8)["series"].unique(maintain_order=True):
            rows = layers.filter(pl.col("series") == config).join(order.select("layer", "depth", "short"), on="layer")
            for stat, dash in (("bound_p50", "solid"), ("bound_p99", "dot")):
                fig.add_trace(go.Scatter(
                    x=rows["depth"].to_list(), y=[float(f"{v:.4g}") for v in rows[stat]], mode="lines",
                    name=esc(f"{run}: {config} {stat[6:]}"), text=[esc(n) for n in rows["short"]],
                    hovertemplate="%{text}<br>%{y:.3g}<extra>%{fullData.name}</extra>",
                    line=dict(color=colours[config], dash=dash)))
    fig.update_layout(**LAYOUT, title="Zero bound along depth (INT8): B per-token vs B̃ CrossQuant",
                      xaxis_title="layer (capture order)", yaxis_title="zero bound (p50 solid, p99 dotted)",
                      yaxis_type="log")
    return fig


def c_ge_t(profiles: list[tuple[str, pl.DataFrame]]) -> go.Figure:
    """Share of pairs with c_j ≥ t_i per layer: where CrossQuant's bound is not below per-token's."""
    fig = go.Figure()
    for r, (run, layers) in enumerate(profiles):
        order = layer_order(layers)
        for b, basis in enumerate(layers["transform"].unique(maintain_order=True).to_list()):
            mine = layers.filter(pl.col("transform") == basis)
            rows = mine.unique(subset="layer", maintain_order=True).join(order.select("layer", "depth", "short"),
                                                                         on="layer")
            fig.add_trace(go.Scatter(
                x=rows["depth"].to_list(), y=[round(100 * v, 4) for v in rows["c_ge_t_fraction"]], mode="lines",
                name=esc(run if basis == "none" else f"{run}, {basis}"), text=[esc(n) for n in rows["short"]],
                hovertemplate="%{text}<br>c ≥ t: %{y:.2f}%<extra>%{fullData.name}</extra>",
                line=dict(color=PALETTE[r % len(PALETTE)], dash=("solid", "dot", "dash")[b % 3])))
    fig.update_layout(**LAYOUT, title="Pairs with c_j ≥ t_i per layer", xaxis_title="layer (capture order)",
                      yaxis_title="c ≥ t %")
    return fig


def _searches(summary: dict) -> list[dict]:
    """The searches of a threshold run, one per transform (a run of an earlier version holds one)."""
    return summary.get("searches") or [summary]


def _named(run: str, what: str, transform: str | None) -> str:
    return f"{run}: {what}" if transform in (None, "none") else f"{run}: {what}, {transform}"


def threshold_curve(runs: list[tuple[str, dict]]) -> go.Figure:
    """Remove-kernel perplexity against kernel proportion, with the tolerance and the crossing."""
    fig = go.Figure()
    trace = 0
    for run, summary in runs:
        fig.add_hline(y=summary["target_perplexity"], line=dict(color=PALETTE[trace % len(PALETTE)], dash="dot"),
                      annotation_text=esc(f"{run}: fp + {100 * summary['tolerance']:g}%"))
        for search in _searches(summary):
            color = PALETTE[trace % len(PALETTE)]
            trace += 1
            curve = sorted(search["curve"], key=lambda p: p["kernel_fraction"])
            fig.add_trace(go.Scatter(
                x=[round(100 * p["kernel_fraction"], 4) for p in curve], y=[p["perplexity"] for p in curve],
                mode="lines+markers", name=esc(_named(run, "remove-kernel", search.get("transform"))),
                line=dict(color=color), text=[f"λ={p['lambda']:.4g}" for p in curve],
                hovertemplate="%{text}<br>kernel %{x:.2f}%<br>ppl %{y:.4f}<extra>%{fullData.name}</extra>"))
            within = (search.get("bracket") or {}).get("within")
            if within and search.get("status") == "crossing bracketed":
                fig.add_vline(x=100 * within["kernel_fraction"], line=dict(color=color, dash="dash"),
                              annotation_text=esc(f"threshold {100 * within['kernel_fraction']:.2f}%"))
    fig.update_layout(**LAYOUT, title="Threshold: remove-kernel perplexity vs kernel proportion",
                      xaxis_title="kernel %", yaxis_title="perplexity")
    return fig


def alpha_sweep(runs: list[tuple[str, dict]]) -> go.Figure:
    """Perplexity and kernel % against CrossQuant α (α = 1 is per-token), one pair of lines per
    run and transform."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    trace = 0
    for run, summary in runs:
        rows = [x for x in summary["results"] if x["alpha"] is not None]
        for transform in dict.fromkeys(x.get("transform") for x in rows):
            color = PALETTE[trace % len(PALETTE)]
            trace += 1
            mine = [x for x in rows if x.get("transform") == transform]
            alphas = [x["alpha"] for x in mine]
            fig.add_trace(go.Scatter(x=alphas, y=[x["perplexity"] for x in mine], mode="lines+markers",
                                     name=esc(_named(run, "perplexity", transform)), line=dict(color=color)),
                          secondary_y=False)
            fig.add_trace(go.Scatter(x=alphas, y=[round(100 * x["kernel_fraction"], 4) for x in mine],
                                     mode="lines+markers", name=esc(_named(run, "kernel %", transform)),
                                     line=dict(color=color, dash="dot")), secondary_y=True)
    fig.update_layout(**LAYOUT, title="CrossQuant α sweep")
    fig.update_xaxes(title_text="α")
    fig.update_yaxes(title_text="perplexity", secondary_y=False)
    fig.update_yaxes(title_text="kernel %", secondary_y=True)
    return fig
