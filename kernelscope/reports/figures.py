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


def series_name(config: str, transform: str) -> str:
    """What one line of a figure draws: the configuration, and the transform where it is not the
    identity (``per_token int4 · hadamard``)."""
    return config if transform == "none" else f"{config} · {transform}"


def with_series(layers: pl.DataFrame) -> pl.DataFrame:
    """``layers`` with a ``series`` column, :func:`series_name` of each row."""
    pairs = layers.select("config", "transform").unique(maintain_order=True)
    pairs = pairs.with_columns(pl.Series("series", [series_name(c, t) for c, t in pairs.iter_rows()], dtype=pl.String))
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
            values[t] = values.get(t, ()) + (tuple(mine["kernel_fraction"].to_list()),)
    groups: list[list[str]] = []
    for t in types:
        same = next((g for g in groups if values[g[0]] == values[t]), None)
        if same is None:
            groups.append([t])
        else:
            same.append(t)
    return [(" / ".join(g), g) for g in groups]


def depth_kernel(profiles: list[tuple[str, pl.DataFrame]], colours: dict[str, str],
                 threshold: float | None = None) -> go.Figure:
    """Kernel % against the block, one panel per module type (types fed the same tensor in one), one
    colour per quantizer configuration (and transform), one line style per run; the threshold located
    on the model as a line."""
    groups = module_groups(profiles)
    fig = make_subplots(rows=1, cols=max(len(groups), 1), shared_yaxes=True, horizontal_spacing=0.02,
                        subplot_titles=[esc(name) for name, _ in groups])
    shown: set[str] = set()
    for r, (run, layers) in enumerate(profiles):
        for col, (_, types) in enumerate(groups, start=1):
            mine = layers.filter(pl.col("module_type") == types[0]).filter(pl.col("block").is_not_null())
            for config in mine["series"].unique(maintain_order=True):
                rows = mine.filter(pl.col("series") == config).sort("block")
                name = f"{run}: {config}"
                fig.add_trace(go.Scatter(
                    x=rows["block"].to_list(), y=[round(100 * v, 4) for v in rows["kernel_fraction"]],
                    mode="lines+markers", marker={"size": 4}, name=esc(name), legendgroup=esc(name),
                    showlegend=name not in shown, text=[esc(f"block {b}, {types[0]}") for b in rows["block"]],
                    hovertemplate="%{text}<br>kernel %{y:.2f}%<extra>%{fullData.name}</extra>",
                    line={"color": colours[config], "dash": ("solid", "dot", "dash")[r % 3]}), row=1, col=col)
                shown.add(name)
    if threshold is not None:
        fig.add_hline(y=100 * threshold, line={"color": "#555555", "dash": "dash"},
                      annotation_text=f"threshold {100 * threshold:.2f}%", annotation_position="top left")
    fig.update_layout(**{**LAYOUT, "height": 440, "margin": {"l": 60, "r": 20, "t": 80, "b": 50}},
                      title="Kernel per block, by module type")
    fig.update_xaxes(title_text="block")
    fig.update_yaxes(title_text="kernel %", row=1, col=1)
    return fig


def heatmap(run: str, layers: pl.DataFrame) -> go.Figure:
    """Block × module type kernel %, per-token INT8 beside CrossQuant INT8 (or the first configs, and
    the first of another transform); module types fed the same tensor share a row; the colour range
    is that of what is drawn."""
    configs = layers.filter(pl.col("bits") == 8)["series"].unique(maintain_order=True).to_list()[:2]
    configs = configs or layers["series"].unique(maintain_order=True).to_list()[:2]
    other = layers.filter((pl.col("transform") != "none") & (pl.col("config") == layers["config"][0]))
    configs += [c for c in other["series"].unique(maintain_order=True).to_list()[:1]
                if c not in configs]  # the first beside it in another basis
    int4 = layers.filter((pl.col("bits") == 4) & (pl.col("transform") == "none"))["series"].unique(maintain_order=True)
    configs += [c for c in int4.to_list()[:1] if c not in configs]  # and a 4-bit panel, on its own colour range
    fig = make_subplots(rows=1, cols=len(configs), subplot_titles=[esc(c) for c in configs],
                        shared_yaxes=True, horizontal_spacing=0.08)
    in_blocks = layers.filter(pl.col("block").is_not_null())
    groups = module_groups([(run, layers)])
    blocks = sorted(in_blocks["block"].unique().to_list())
    four = set(int4.to_list()[:1]) - set(configs[:-1])
    for i, config in enumerate(configs):
        same_range = [c for c in configs if (c in four) == (config in four)]
        top = max(in_blocks.filter(pl.col("series").is_in(same_range))["kernel_fraction"].max() or 0.0, 1e-9) * 100
        sub = in_blocks.filter(pl.col("series") == config)
        cell = {(r["module_type"], r["block"]): r["kernel_fraction"] for r in sub.iter_rows(named=True)}
        z = [[round(100 * cell[(types[0], b)], 3) if (types[0], b) in cell else None for b in blocks]
             for _, types in groups]
        fig.add_trace(go.Heatmap(z=z, x=blocks, y=[esc(name) for name, _ in groups], zmin=0, zmax=top,
                                 colorscale="Viridis", showscale=i == len(configs) - 1 or config in four,
                                 colorbar={"title": "kernel %", "x": 1.02 if config not in four else 1.12},
                                 hovertemplate="block %{x}, %{y}: %{z:.2f}%<extra></extra>"),
                      row=1, col=i + 1)
    fig.update_layout(**{**LAYOUT, "height": 160 + 32 * len(groups), "margin": {"l": 170, "r": 20, "t": 60, "b": 50}},
                      title=esc(f"{run}: kernel % by block and module type"))
    fig.update_xaxes(title_text="block")
    fig.update_yaxes(title_text="module type", row=1, col=1)
    return fig


def zero_bounds(profiles: list[tuple[str, pl.DataFrame]], colours: dict[str, str]) -> go.Figure:
    """Median and 99th percentile of the INT8 zero bound against the block, one panel per module type
    (types fed the same tensor in one): per-token B against CrossQuant B̃, one colour per configuration,
    one pair of line styles (p50, p99) per run."""
    groups = module_groups(profiles)
    fig = make_subplots(rows=1, cols=max(len(groups), 1), shared_yaxes=True, horizontal_spacing=0.02,
                        subplot_titles=[esc(name) for name, _ in groups])
    styles = (("solid", "dot"), ("dash", "dashdot"), ("longdash", "longdashdot"))
    shown: set[str] = set()
    for r, (run, layers) in enumerate(profiles):
        eight = layers.filter((pl.col("bits") == 8) & pl.col("block").is_not_null())
        for col, (_, types) in enumerate(groups, start=1):
            mine = eight.filter(pl.col("module_type") == types[0])
            for config in mine["series"].unique(maintain_order=True):
                rows = mine.filter(pl.col("series") == config).sort("block")
                for stat, dash in zip(("bound_p50", "bound_p99"), styles[r % len(styles)], strict=True):
                    name = f"{run}: {config} {stat[6:]}"
                    fig.add_trace(go.Scatter(
                        x=rows["block"].to_list(), y=[float(f"{v:.4g}") for v in rows[stat]], mode="lines",
                        name=esc(name), legendgroup=esc(name), showlegend=name not in shown,
                        text=[esc(f"block {b}, {types[0]}") for b in rows["block"]],
                        hovertemplate="%{text}<br>%{y:.3g}<extra>%{fullData.name}</extra>",
                        line={"color": colours[config], "dash": dash}), row=1, col=col)
                    shown.add(name)
    fig.update_layout(**{**LAYOUT, "height": 440, "margin": {"l": 70, "r": 20, "t": 80, "b": 50},
                         "legend": {"orientation": "h", "y": -0.25}},
                      title="Zero bound per block, by module type (INT8): B per-token vs B̃ CrossQuant")
    fig.update_xaxes(title_text="block")
    fig.update_yaxes(type="log")
    fig.update_yaxes(title_text="zero bound, in units of |x| (p50, p99)", row=1, col=1)
    return fig


def c_ge_t(profiles: list[tuple[str, pl.DataFrame]]) -> go.Figure:
    """Share of pairs with c_j ≥ t_i per block, one line per module type (those fed the same tensor as
    one) and line style per run: where CrossQuant's bound is not below per-token's. In the input's own
    basis."""
    fig = go.Figure()
    groups = module_groups(profiles)
    for r, (run, layers) in enumerate(profiles):
        basis = "none" if (layers["transform"] == "none").any() else layers["transform"][0]
        own = layers.filter((pl.col("transform") == basis) & pl.col("block").is_not_null())
        for g, (name, types) in enumerate(groups):
            rows = own.filter(pl.col("module_type") == types[0]).unique(subset="layer", maintain_order=True).sort("block")
            fig.add_trace(go.Scatter(
                x=rows["block"].to_list(), y=[round(100 * v, 4) for v in rows["c_ge_t_fraction"]], mode="lines+markers",
                marker={"size": 4}, name=esc(f"{run}: {name}" + ("" if basis == "none" else f", {basis} basis")),
                hovertemplate="block %{x}<br>c ≥ t: %{y:.2f}%<extra>%{fullData.name}</extra>",
                line={"color": PALETTE[g % len(PALETTE)], "dash": ("solid", "dot", "dash")[r % 3]}))
    fig.update_layout(**LAYOUT, title="Pairs with c_j ≥ t_i per block, by module type", xaxis_title="block",
                      yaxis_title="c ≥ t %")
    return fig


def searches_of(summary: dict) -> list[dict]:
    """The searches of a threshold run, one per transform (a run of an earlier version holds one)."""
    return summary.get("searches") or [summary]


def _named(run: str, what: str, transform: str | None) -> str:
    return f"{run}: {what}" if transform in (None, "none") else f"{run}: {what}, {transform}"


def threshold_curve(runs: list[tuple[str, dict]]) -> go.Figure:
    """Remove-kernel perplexity change from fp against kernel proportion, with the fp line, the
    tolerance, the crossing and its 95% interval, and the model's own kernels marked."""
    fig = go.Figure()
    fig.add_hline(y=0, line={"color": "#777777"}, annotation_text="fp", annotation_position="bottom left")
    trace = 0
    for run, summary in runs:
        fp = summary["fp_perplexity"]
        fig.add_hline(y=100 * summary["tolerance"], line={"color": PALETTE[trace % len(PALETTE)], "dash": "dot"},
                      annotation_text=esc(f"{run}: fp + {100 * summary['tolerance']:g}%"))
        for search in searches_of(summary):
            color = PALETTE[trace % len(PALETTE)]
            trace += 1
            curve = sorted(search["curve"], key=lambda p: p["kernel_fraction"])
            fig.add_trace(go.Scatter(
                x=[round(100 * p["kernel_fraction"], 4) for p in curve],
                y=[round(100 * (p["perplexity"] / fp - 1), 4) for p in curve],
                mode="lines+markers", name=esc(_named(run, "remove-kernel", search.get("transform"))),
                line={"color": color}, text=[f"λ={p['lambda']:.4g}, ppl {p['perplexity']:.4f}" for p in curve],
                hovertemplate="%{text}<br>kernel %{x:.2f}%<br>%{y:+.2f}% from fp<extra>%{fullData.name}</extra>"))
            within = (search.get("bracket") or {}).get("within")
            if within and search.get("status") == "crossing bracketed":
                fig.add_vline(x=100 * within["kernel_fraction"], line={"color": color, "dash": "dash"},
                              annotation_text=esc(f"threshold {100 * within['kernel_fraction']:.2f}%"))
            spread = search.get("crossing_uncertainty") or {}
            if spread.get("kernel_fraction_ci_low") is not None:
                fig.add_vrect(x0=100 * spread["kernel_fraction_ci_low"], x1=100 * spread["kernel_fraction_ci_high"],
                              fillcolor=color, opacity=0.08, line_width=0)
            kernels = search.get("actual_kernels") or []
            fig.add_trace(go.Scatter(
                x=[round(100 * k["kernel_fraction"], 4) for k in kernels], y=[0.0] * len(kernels),
                mode="markers+text", marker={"symbol": "triangle-up", "size": 10, "color": color},
                text=[esc(k["config"]) for k in kernels], textposition="top center",
                name=esc(_named(run, "the model's kernels", search.get("transform"))),
                hovertemplate="%{text}: kernel %{x:.2f}%<extra></extra>"))
    fig.update_layout(**LAYOUT, title="Threshold: remove-kernel perplexity change vs kernel proportion",
                      xaxis_title="kernel %", yaxis_title="perplexity change from fp, %")
    return fig


def _fp_kernel(row: dict) -> float | None:
    """A sweep row's kernel on full-precision activations (``kernel_fraction`` in a run written before
    ``kernel_fraction`` meant the kernel of the row's own pass, beside ``quantized_kernel_fraction``)."""
    return row["kernel_fraction"] if "quantized_kernel_fraction" in row else row.get("fp_kernel_fraction")


def alpha_sweep(runs: list[tuple[str, dict]]) -> go.Figure:
    """Perplexity (with the fp line) and kernel % against CrossQuant α (α = 1 is per-token), in two
    panels, one line per run and transform."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["perplexity (dotted: fp)", "kernel % on fp activations"],
                        horizontal_spacing=0.1)
    trace = 0
    for run, summary in runs:
        rows = [x for x in summary["results"] if x["alpha"] is not None]
        if summary.get("fp_perplexity") is not None:
            fig.add_hline(y=summary["fp_perplexity"], line=dict(color="#777777", dash="dot"), row=1, col=1)
        for transform in dict.fromkeys(x.get("transform") for x in rows):
            color = PALETTE[trace % len(PALETTE)]
            trace += 1
            mine = [x for x in rows if x.get("transform") == transform]
            alphas = [x["alpha"] for x in mine]
            fig.add_trace(go.Scatter(x=alphas, y=[x["perplexity"] for x in mine], mode="lines+markers",
                                     name=esc(_named(run, "perplexity", transform)), line=dict(color=color)),
                          row=1, col=1)
            kernels = [_fp_kernel(x) for x in mine]
            fig.add_trace(go.Scatter(x=alphas, y=[None if k is None else round(100 * k, 4) for k in kernels],
                                     mode="lines+markers", name=esc(_named(run, "kernel %", transform)),
                                     line=dict(color=color, dash="dot")), row=1, col=2)
    fig.update_layout(**LAYOUT, title="CrossQuant α sweep")
    fig.update_xaxes(title_text="α")
    fig.update_yaxes(title_text="perplexity", row=1, col=1)
    fig.update_yaxes(title_text="kernel %", row=1, col=2)
    return fig
