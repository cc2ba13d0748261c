"""Kernel statistics of the formats the pass over t and c does not count: group-wise INT, FP8, MX and
NVFP4 (DESIGN.md §1b). Every element is quantized as its format does it
(:mod:`kernelscope.quant.formats`) and counted: the kernel, the elements that land on a subnormal code,
the blocks that are kernel through and through, and the zero bound ``τ·s`` of every element.

NaN and ±Inf elements are measured as zeros for the scales (as t and c measure them) and left out of
every count; the bound is summed over all positions, as for the INT quantizers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from kernelscope.quant import QuantizerConfig, as_sequences
from kernelscope.quant import formats as F
from kernelscope.stats.exact import ExactSum
from kernelscope.stats.histogram import LogHistogram

SUMMED = ("kernel", "subnormal", "blocks", "kernel_blocks", "bound_hist")
MAXIMA = ("bound_max",)
MINIMA = ("bound_min",)


@dataclass
class FormatObservation:
    """One batch of one layer's input, reduced; every field has a leading config axis C."""

    kernel: torch.Tensor  # (C,) int64: finite elements quantized to zero
    subnormal: torch.Tensor  # (C,) int64: finite elements on a non-zero subnormal code
    blocks: torch.Tensor  # (C,) int64: blocks (0 for formats without blocks)
    kernel_blocks: torch.Tensor  # (C,) int64: blocks whose every element is in the kernel
    bound_min: torch.Tensor  # (C,) float64
    bound_max: torch.Tensor  # (C,) float64
    bound_hist: torch.Tensor  # (C, bins) int64


def observe_formats(
    x: torch.Tensor, configs: list[QuantizerConfig], histogram: LogHistogram, seq_len: int | None = None,
    all_finite: bool = False,
) -> tuple[FormatObservation, torch.Tensor]:
    """The observation of ``x (..., T, I)`` and the bound sums ``(C, B)`` of each sequence (float64).

    ``all_finite``: the caller knows ``x`` holds no NaN or ±Inf, which spares two passes over it."""
    x = as_sequences(x, seq_len)  # (B, T, I)
    finite = None if all_finite else torch.isfinite(x)
    x0 = x if finite is None else torch.where(finite, x, 0.0)
    parts: dict[str, list[torch.Tensor]] = {f.name: [] for f in fields(FormatObservation)}
    sums = []
    for cfg in configs:
        fmt = cfg.format
        s = F.scale(x0, fmt)  # (B, T, 1 | nb) or (B, 1, 1)
        # |x/s| against the grid's thresholds is what rounding decides: no element is rounded here
        a = F.quotient(x0, fmt, s).abs_()  # (B, T, I) float32
        kernel = a.le(fmt.tau) if finite is None else a.le(fmt.tau).logical_and_(finite)
        # one bound per scale, standing for the elements that scale covers (never expanded per element)
        bound = (fmt.tau * s).double()  # (B, T, 1 | nb) or (B, 1, 1)
        covers = _coverage(s, fmt, x.shape)  # like bound
        parts["kernel"].append(kernel.sum())
        sub = fmt.grid.subnormal_range
        on_subnormal = None if sub is None else a.gt(sub[0]) & a.lt(sub[1])  # NaN is on no code
        parts["subnormal"].append(torch.tensor(0) if on_subnormal is None else on_subnormal.sum())
        if fmt.is_block:
            whole = F.whole_blocks(kernel, fmt)  # (B, T, nb)
            parts["blocks"].append(torch.tensor(whole.numel()))
            parts["kernel_blocks"].append(whole.sum())
        else:
            parts["blocks"].append(torch.tensor(0))
            parts["kernel_blocks"].append(torch.tensor(0))
        parts["bound_min"].append(bound.min())
        parts["bound_max"].append(bound.max())
        parts["bound_hist"].append(histogram.counts(bound, covers))
        sums.append((bound * covers).sum(dim=(-2, -1)))  # (B,)
    obs = FormatObservation(
        **{name: torch.stack(values).to(_DTYPES.get(name, torch.int64)) for name, values in parts.items()}
    )
    return obs, torch.stack(sums)  # (C, B)


_DTYPES = {"bound_min": torch.float64, "bound_max": torch.float64}


def _coverage(s: torch.Tensor, fmt: F.Format, shape: torch.Size) -> torch.Tensor:
    """How many elements of an input ``shape (B, T, I)`` each value of the scale ``s`` applies to:
    ``(T/rows)·(I/cols)`` for a token or tensor scale, the block size (the rest for a short last block)
    for a block scale. int64, shaped like ``s``."""
    seq, width = shape[-2], shape[-1]
    if fmt.is_block:
        sizes = torch.full((s.shape[-1],), fmt.block_size, dtype=torch.int64, device=s.device)
        sizes[-1] = width - fmt.block_size * (s.shape[-1] - 1)
        return sizes.expand(s.shape)
    return torch.full(
        s.shape, (seq // s.shape[-2]) * (width // s.shape[-1]), dtype=torch.int64, device=s.device
    )


class FormatStats:
    """The streaming accumulator of one layer's input for ``configs`` (formats counted element by
    element): update, merge, state_dict, result."""

    def __init__(self, configs: list[QuantizerConfig], histogram: LogHistogram) -> None:
        self.configs = list(configs)
        self.histogram = histogram
        self.state: FormatObservation | None = None
        self.bound_sums = ExactSum(len(self.configs))

    def update(self, x: torch.Tensor, seq_len: int | None = None, all_finite: bool = False) -> FormatStats:
        obs, sums = observe_formats(x, self.configs, self.histogram, seq_len, all_finite)
        self.bound_sums.add(sums)
        self._fold(obs)
        return self

    def _fold(self, obs: FormatObservation) -> None:
        if self.state is None:
            self.state = obs
            return
        for name in SUMMED:
            setattr(self.state, name, getattr(self.state, name) + getattr(obs, name))
        for name in MAXIMA:
            setattr(self.state, name, torch.maximum(getattr(self.state, name), getattr(obs, name)))
        for name in MINIMA:
            setattr(self.state, name, torch.minimum(getattr(self.state, name), getattr(obs, name)))

    def merge(self, other: FormatStats) -> FormatStats:
        if other.state is not None:
            self._fold(other.state)
            self.bound_sums.merge(other.bound_sums)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so that a checkpoint is read back with ``weights_only=True``."""
        if self.state is None:
            return {}
        body = {f.name: getattr(self.state, f.name).cpu() for f in fields(FormatObservation)}
        return body | {"bound_sums": self.bound_sums.to_tensor()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> FormatStats:
        if state:
            self.state = FormatObservation(**{f.name: state[f.name] for f in fields(FormatObservation)})
            self.bound_sums = ExactSum.from_tensor(state["bound_sums"])
        return self

    def rows(self, positions: int, elements: int, quantiles: tuple[float, ...]) -> list[dict]:
        """One result row per config; ``positions`` counts every element seen, ``elements`` the finite."""
        if self.state is None:
            raise ValueError("no data was observed for this layer")
        s = FormatObservation(
            **{f.name: getattr(self.state, f.name).cpu() for f in fields(FormatObservation)}
        )
        values = self.histogram.quantiles(s.bound_hist, quantiles, s.bound_min.tolist(), s.bound_max.tolist())
        sums = self.bound_sums.values()
        out = []
        for i, cfg in enumerate(self.configs):
            blocks = int(s.blocks[i])
            row = {
                **cfg.as_dict(),
                "kernel_elements": int(s.kernel[i]),
                "kernel_fraction": int(s.kernel[i]) / elements if elements else None,
                "bound_mean": sums[i] / positions,
                "bound_min": float(s.bound_min[i]),
                "bound_max": float(s.bound_max[i]),
                "bound_below_per_token_fraction": None,
                "subnormal_elements": None if cfg.format.grid.is_int else int(s.subnormal[i]),
                "subnormal_fraction": None
                if cfg.format.grid.is_int or not elements
                else int(s.subnormal[i]) / elements,
                "blocks": blocks if blocks else None,
                "kernel_blocks": int(s.kernel_blocks[i]) if blocks else None,
                "block_kernel_fraction": int(s.kernel_blocks[i]) / blocks if blocks else None,
            }
            for q, value in zip(quantiles, values[i], strict=True):
                row[f"bound_p{round(q * 100)}"] = value
            out.append(row)
        return out
