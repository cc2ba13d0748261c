"""What an accumulator's state says, as plain Python values: one dict of layer-wide figures and one
row per configuration, with the columns every run table takes. A column a format does not have (no
subnormal codes on an INT grid, no blocks without block scales) is None, read from the format's data.
"""

from __future__ import annotations

import torch

from kernelscope.stats.accumulator import KernelStats
from kernelscope.stats.histogram import HISTOGRAM
from kernelscope.stats.observation import Observation

QUANTILES = (0.5, 0.9, 0.99)
"""The zero bound's quantiles every row reports (``bound_p50``, ...)."""

_AT_ONCE = 16
"""Layers whose bound quantiles :func:`results` reads together."""


def results(accumulators: list[KernelStats]) -> list[dict]:
    """Each accumulator's figures as plain Python values (host sync happens here): layer-wide figures and
    one dict per config; the bound quantiles are read from the histograms of many layers together,
    rather than one layer at a time."""
    states = [acc.on_host() for acc in accumulators]
    quantiles: list[list[float]] = []  # (sum of C, len(QUANTILES))
    for first in range(0, len(states), _AT_ONCE):  # a slice at a time: the copies stay small
        part = states[first : first + _AT_ONCE]
        hist = torch.cat([s.bound_hist for s in part])  # (sum of C, bins)
        lows = torch.cat([s.bound_min for s in part]).tolist()
        highs = torch.cat([s.bound_max for s in part]).tolist()
        quantiles += HISTOGRAM.quantiles(hist, QUANTILES, lows, highs)
    out, first = [], 0
    for acc, s in zip(accumulators, states, strict=True):
        out.append(_assemble(acc, s, quantiles[first : first + len(acc.configs)]))
        first += len(acc.configs)
    return out


def _layer(s: Observation, top: int) -> dict:
    positions = int(s.elements)
    k = min(top, s.channel_max.numel())
    top_channels = torch.topk(s.channel_max, k)
    valid = s.top_index >= 0
    return {
        "tokens": int(s.tokens),
        "elements": positions - int(s.nonfinite),  # the finite elements the kernel is counted over
        "nonfinite_elements": int(s.nonfinite),
        "c_ge_t_pairs": int(s.c_ge_t),
        "c_ge_t_fraction": int(s.c_ge_t) / positions,
        "abs_max": float(s.abs_max),
        "in_features": int(s.channel_max.numel()),
        "top_channels": top_channels.indices.tolist(),
        "top_channel_absmax": top_channels.values.double().tolist(),
        "top_token_index": s.top_index[valid].tolist(),
        "top_token_absmax": s.top_values[valid].double().tolist(),
    }


def _share(count: int, of: int) -> float | None:
    return count / of if of else None


FIGURES = ("kernel_elements", "kernel_fraction", "bound_mean", "bound_min", "bound_max",
           "bound_below_per_token_fraction", "subnormal_elements", "subnormal_fraction", "blocks",
           "kernel_blocks", "block_kernel_fraction", *(f"bound_p{round(q * 100)}" for q in QUANTILES))
"""The columns of a configuration's row beyond the configuration itself, in :func:`config_rows`' order."""


def config_rows(configs, values: dict[str, list], sums: list[float], quantiles: list[list[float]],
                positions: int, elements: int) -> list[dict]:
    """One result row per configuration from its counts and bound figures (``values``: per field a
    list over configurations), with None where a format has no such figure."""
    rows = []
    for i, cfg in enumerate(configs):
        fmt = cfg.format
        subnormal = None if fmt.grid.is_int else values["subnormal"][i]
        blocks = values["blocks"][i] if fmt.is_block else None
        kernel_blocks = values["kernel_blocks"][i] if fmt.is_block else None
        row = {
            **cfg.as_dict(),
            "kernel_elements": values["kernel"][i],
            "kernel_fraction": _share(values["kernel"][i], elements),
            "bound_mean": sums[i] / positions,
            "bound_min": values["bound_min"][i],
            "bound_max": values["bound_max"][i],
            "bound_below_per_token_fraction":
                values["below_per_token"][i] / positions if fmt.per_token_comparable else None,
            "subnormal_elements": subnormal,
            "subnormal_fraction": None if subnormal is None else _share(subnormal, elements),
            "blocks": blocks,
            "kernel_blocks": kernel_blocks,
            "block_kernel_fraction": None if blocks is None else _share(kernel_blocks, blocks),
        }
        for q, value in zip(QUANTILES, quantiles[i], strict=True):
            row[f"bound_p{round(q * 100)}"] = value
        rows.append(row)
    return rows


def _assemble(acc: KernelStats, s: Observation, quantiles: list[list[float]]) -> dict:
    """The result of one accumulator from its state on the host and its bound quantiles
    ``(C, len(QUANTILES))``."""
    layer = _layer(s, acc.top_k)
    values = {name: getattr(s, name).tolist() for name in
              ("kernel", "subnormal", "below_per_token", "kernel_blocks", "blocks", "bound_min", "bound_max")}
    rows = config_rows(acc.configs, values, acc.bound_sums.values(), quantiles, int(s.elements),
                       layer["elements"])
    return {"layer": layer, "configs": rows}


def measured_rows(measured: list, configs) -> list[list[dict]]:
    """The configuration rows of each measurement on its own (no accumulator: each one a whole
    result, such as a weight's), the inputs of one shape summarised together."""
    from kernelscope.stats.summary import config_figures

    configs = list(configs)
    out: list[list[dict] | None] = [None] * len(measured)
    shapes: dict[tuple, list[int]] = {}
    for i, m in enumerate(measured):
        shapes.setdefault((m.token.shape, m.channel.shape), []).append(i)
    for members in shapes.values():
        group = [measured[i] for i in members]
        counts, bounds = config_figures(group, configs)  # (layers, C, 4)
        counts = counts.cpu()
        quantiles = HISTOGRAM.quantiles(bounds.hist.reshape(-1, HISTOGRAM.bins), QUANTILES,
                                        bounds.low.reshape(-1).tolist(), bounds.high.reshape(-1).tolist())
        batch, seq, _ = group[0].token.shape
        width = group[0].channel.shape[-1]
        blocks = [batch * seq * -(-width // c.block_size) if c.format.is_block else 0 for c in configs]
        for j, i in enumerate(members):
            values = {name: counts[j, :, k].tolist() for k, name in enumerate(COUNT_FIELDS)}
            values |= {"blocks": blocks, "bound_min": bounds.low[j].tolist(),
                       "bound_max": bounds.high[j].tolist()}
            positions = batch * seq * width
            elements = positions - int(group[j].counted.nonfinite)
            sums = bounds.sums[j].sum(dim=-1).tolist()  # (C,)
            out[i] = config_rows(configs, values, sums, quantiles[j * len(configs):(j + 1) * len(configs)],
                                 positions, elements)
    return out  # type: ignore[return-value]


COUNT_FIELDS = ("kernel", "subnormal", "below_per_token", "kernel_blocks")
"""The four counts of :attr:`kernelscope.element.Counted.counts`, by column."""
