"""Per-layer kernel statistics for several quantizer configurations, streamed over batches.

``observe`` reduces one batch of one layer's input to fixed-size tensors (an :class:`Observation`);
``KernelStats.update`` adds it; ``KernelStats.merge`` adds another accumulator (another process,
another shard of windows). Everything stays on the activation's device until ``result``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from kernelscope.quant import (
    STEP_FLOOR,
    crossquant_log10_factors,
    QuantizerConfig,
    abs_in_stat_dtype,
    ActivationRanges,
    as_sequences,
    kernel_mask,
    per_token_step,
    zero_bound,
)
from kernelscope.stats.histogram import LogHistogram

HISTOGRAM = LogHistogram()
QUANTILES = (0.5, 0.9, 0.99)


@dataclass
class Observation:
    """One batch of one layer's input, reduced. Fields with a config axis have length C."""

    tokens: torch.Tensor  # () int64: rows (tokens) seen
    elements: torch.Tensor  # () int64: positions (B·T·I), finite or not
    nonfinite: torch.Tensor  # () int64: NaN or ±Inf elements, left out of the kernel counts
    kernel: torch.Tensor  # (C,) int64
    below_per_token: torch.Tensor  # (C,) int64: elements whose bound < the per-token bound
    bound_sum: torch.Tensor  # (C,) float64
    bound_min: torch.Tensor  # (C,) float64
    bound_max: torch.Tensor  # (C,) float64
    bound_hist: torch.Tensor  # (C, bins) int64
    c_ge_t: torch.Tensor  # () int64: pairs (i, j) of one sequence with c_j >= t_i
    abs_max: torch.Tensor  # () float32
    channel_max: torch.Tensor  # (I,) float32: max over sequences of c_j
    top_values: torch.Tensor  # (k,) float32: largest t_i
    top_index: torch.Tensor  # (k,) int64: their global token index (-1: empty)


def count_c_ge_t(token: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    """Number of pairs (i, j) with ``c_j >= t_i`` within each sequence, summed; by sorting c.

    ``token (B, T, 1)``, ``channel (B, 1, I)``: O((T + I) log I) instead of T·I comparisons.
    """
    c_sorted = channel.squeeze(-2).sort(dim=-1).values  # (B, I)
    t = token.squeeze(-1).contiguous()  # (B, T)
    below = torch.searchsorted(c_sorted, t, side="left")  # (B, T): how many c_j < t_i
    return (channel.shape[-1] - below).sum()


def _top_k(values: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = min(k, values.numel())
    top = torch.topk(values, k)
    return top.values, index[top.indices]


def observe(
    x: torch.Tensor,
    configs: list[QuantizerConfig],
    *,
    token_offset: int = 0,
    top_k: int = 10,
    seq_len: int | None = None,
) -> Observation:
    """Reduce one layer input ``x (..., T, I)`` for every config. ``x`` is neither kept nor changed.

    ``token_offset`` is the global index of the batch's first token, so that the top tokens can be
    traced back to the text; ``seq_len`` splits a flattened ``(B·T, I)`` input into its sequences.
    """
    x = as_sequences(x, seq_len)  # (B, T, I)
    batch, seq, width = x.shape
    ax = abs_in_stat_dtype(x)  # (B, T, I), a copy of our own
    nonfinite = ax.numel() - torch.count_nonzero(ax < math.inf)  # NaN and +Inf fail `<`
    # NaN and ±Inf are counted, then measured as zeros, so that no statistic turns into NaN; the
    # kernel counts below take them out again (a zero is always in the kernel).
    ax.nan_to_num_(nan=0.0, posinf=0.0)
    ranges = ActivationRanges(ax.amax(dim=-1, keepdim=True), ax.amax(dim=-2, keepdim=True))
    t, c = ranges  # (B, T, 1), (B, 1, I)
    elements = x.numel()  # positions; the finite ones are elements - nonfinite

    kernel, below, bsum, bmin, bmax, hist = [], [], [], [], [], []
    per_token_cache: dict[int, torch.Tensor] = {}
    for cfg in configs:
        step = cfg.step(ranges)  # broadcastable to (B, T, I)
        kernel.append(torch.count_nonzero(kernel_mask(ax, step, is_abs=True)) - nonfinite)
        if cfg.quantizer == "per_token":
            below.append(torch.zeros((), dtype=torch.int64, device=x.device))
        else:
            if cfg.bits not in per_token_cache:
                per_token_cache[cfg.bits] = per_token_step(ranges, cfg.bits)
            below.append(torch.count_nonzero((step < per_token_cache[cfg.bits]).expand(batch, seq, width)))
        # B = 0.5·Δ is exact in binary, so the bound's statistics are read off the step.
        weight = elements // step.numel()  # each stored step stands for this many elements
        bsum.append(0.5 * step.sum(dtype=torch.float64) * weight)
        bmin.append(zero_bound(step.min()).double())
        bmax.append(zero_bound(step.max()).double())
        if cfg.quantizer == "crossquant" and 0.0 < cfg.alpha < 1.0:  # separable: Δ̃_ij = f(t_i)·g(c_j)
            r, k = crossquant_log10_factors(ranges, cfg.bits, cfg.alpha)
            hist.append(HISTOGRAM.counts_of_sums(r + math.log10(0.5), k, math.log10(0.5 * STEP_FLOOR)))
        else:
            hist.append(HISTOGRAM.counts(zero_bound(step), weight))

    flat_t = t.reshape(-1)  # (B*T,)
    index = torch.arange(flat_t.numel(), device=x.device) + token_offset
    top_values, top_index = _top_k(flat_t, index, top_k)
    return Observation(
        tokens=torch.tensor(batch * seq, dtype=torch.int64, device=x.device),
        elements=torch.tensor(elements, dtype=torch.int64, device=x.device),
        nonfinite=nonfinite,
        kernel=torch.stack(kernel),
        below_per_token=torch.stack(below),
        bound_sum=torch.stack(bsum),
        bound_min=torch.stack(bmin),
        bound_max=torch.stack(bmax),
        bound_hist=torch.stack(hist),
        c_ge_t=count_c_ge_t(t, c),
        abs_max=t.max().float(),
        channel_max=c.amax(dim=0).reshape(-1).float(),  # (I,)
        top_values=top_values.float(),
        top_index=top_index,
    )


class KernelStats:
    """Streaming kernel statistics of one layer for a fixed list of quantizer configurations."""

    def __init__(self, configs: list[QuantizerConfig], top_k: int = 10) -> None:
        self.configs = list(configs)
        self.top_k = top_k
        self.state: Observation | None = None

    def update(self, obs: Observation) -> KernelStats:
        """Add one observation (made with the same configs, in the same order)."""
        if self.state is None:
            self.state = Observation(**{f.name: getattr(obs, f.name).clone() for f in fields(obs)})
            self.state.top_values, self.state.top_index = _top_k(obs.top_values, obs.top_index, self.top_k)
            return self
        s = self.state
        for name in ("tokens", "elements", "nonfinite", "kernel", "below_per_token", "bound_sum",
                     "bound_hist", "c_ge_t"):
            getattr(s, name).add_(getattr(obs, name))
        s.bound_min = torch.minimum(s.bound_min, obs.bound_min)
        s.bound_max = torch.maximum(s.bound_max, obs.bound_max)
        s.abs_max = torch.maximum(s.abs_max, obs.abs_max)
        if s.channel_max.shape != obs.channel_max.shape:
            raise ValueError("cannot merge statistics of layers with different widths")
        s.channel_max = torch.maximum(s.channel_max, obs.channel_max)
        s.top_values, s.top_index = _top_k(
            torch.cat([s.top_values, obs.top_values]), torch.cat([s.top_index, obs.top_index]),
            self.top_k,
        )
        return self

    def merge(self, other: KernelStats) -> KernelStats:
        """Fold another accumulator of the same layer and configs into this one."""
        if other.configs != self.configs:
            raise ValueError("cannot merge statistics of different quantizer configurations")
        if other.state is not None:
            self.update(other.state)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The accumulated state as CPU tensors (empty when nothing was observed), for checkpoints."""
        if self.state is None:
            return {}
        return {f.name: getattr(self.state, f.name).detach().cpu() for f in fields(self.state)}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> KernelStats:
        """Restore what :meth:`state_dict` returned; the next update continues exactly from there."""
        if not state:
            self.state = None
            return self
        missing = {f.name for f in fields(Observation)} - set(state)
        if missing:
            raise ValueError(f"state lacks {sorted(missing)}")
        self.state = Observation(**{f.name: state[f.name].to(device) for f in fields(Observation)})
        return self

    @property
    def empty(self) -> bool:
        return self.state is None

    def result(self) -> dict:
        """Plain Python values: layer-wide figures and one dict per config (host sync happens here)."""
        if self.state is None:
            raise ValueError("no data was observed for this layer")
        s = Observation(**{f.name: getattr(self.state, f.name).cpu() for f in fields(self.state)})
        positions = int(s.elements)
        elements = positions - int(s.nonfinite)  # the finite elements the kernel is counted over
        k = min(self.top_k, s.channel_max.numel())
        top_channels = torch.topk(s.channel_max, k)
        valid = s.top_index >= 0
        layer = {
            "tokens": int(s.tokens),
            "elements": elements,
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
        per_config = []
        for i, cfg in enumerate(self.configs):
            lo, hi = float(s.bound_min[i]), float(s.bound_max[i])
            row = {
                **cfg.as_dict(),
                "kernel_elements": int(s.kernel[i]),
                "kernel_fraction": int(s.kernel[i]) / elements if elements else None,
                "bound_mean": float(s.bound_sum[i]) / positions,
                "bound_min": lo,
                "bound_max": hi,
                "bound_below_per_token_fraction": (
                    None if cfg.quantizer == "per_token" else int(s.below_per_token[i]) / positions
                ),
            }
            for q in QUANTILES:
                row[f"bound_p{round(q * 100)}"] = HISTOGRAM.quantile(s.bound_hist[i], q, lo, hi)
            per_config.append(row)
        return {"layer": layer, "configs": per_config}
