"""From what a forward pass measured (:class:`~kernelscope.stats.measure.Measured`) to one
:class:`~kernelscope.stats.observation.Observation` per layer input: the zero bound's sums, extremes
and histogram, c ≥ t, outlier channels and tokens. All of it follows from t and c (block formats
bring their bound figures from the count), so the inputs of one shape are stacked and summarised
together, in a few dozen tensor operations rather than a few dozen each."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kernelscope import element
from kernelscope.quant import ActivationRanges, QuantizerConfig, separable_step
from kernelscope.quant import formats as F
from kernelscope.stats.histogram import HISTOGRAM
from kernelscope.stats.measure import Measured, measure, plan_for
from kernelscope.stats.observation import Observation


def count_c_ge_t(token: torch.Tensor, c_sorted: torch.Tensor) -> torch.Tensor:
    """Number of pairs (i, j) with ``c_j >= t_i`` in each sequence, ``(B,)`` int64; by sorting c.

    ``token (B, T, 1)``, ``c_sorted (B, I)`` ascending: O((T + I) log I) instead of T·I comparisons.
    """
    t = token.squeeze(-1).contiguous()  # (B, T)
    below = torch.searchsorted(c_sorted, t, side="left")  # (B, T): how many c_j < t_i
    return (c_sorted.shape[-1] - below).sum(dim=-1)


def separable_step_sums(row: torch.Tensor, col_sorted: torch.Tensor, qmax: int, floor: float) -> torch.Tensor:
    """Per sequence, the sum over (i, j) of ``max(row_i · col_j / qmax, floor)``, float64, (B,).

    ``row (B, T, 1)``; ``col_sorted (B, I)`` ascending. Computed in float64 in O((T + I) log I): for
    each row, the columns whose product falls under the floor are found by a search in the sorted
    columns, and the rest add up to ``row_i · (their column sum) / qmax``. This is the sum of the
    steps before their float32 rounding (a relative difference below 1e-7).
    """
    a = row.double().squeeze(-1)  # (B, T)
    b = col_sorted.double()  # (B, I)
    suffix = torch.nn.functional.pad(b.flip(-1).cumsum(-1).flip(-1), (0, 1))  # (B, I + 1): sum of b[k:]
    cutoff = (qmax * floor) / a  # (B, T): b_j below this gives a step at the floor; a = 0: inf
    if bool((cutoff <= b[:, :1]).all()):  # the usual case: no step at the floor, nothing to search
        under = torch.zeros_like(cutoff, dtype=torch.int64)
    else:
        under = torch.searchsorted(b, cutoff)  # (B, T): how many b_j < cutoff
    rows = under * floor + a * suffix.gather(-1, under) / qmax  # (B, T)
    return rows.sum(dim=-1)  # (B,)


def _top_tokens(t: torch.Tensor, k: int) -> torch.Tensor:
    """Positions ``(G, k)`` of the ``k`` largest of each row of ``t (G, n)`` (finite, >= 0), earliest
    first among ties. A non-negative float32's bits order like the float, so one int64 key holds
    value and position."""
    positions = torch.arange(t.shape[-1], device=t.device)  # (n,)
    key = (t.float().view(torch.int32).long() << 32) | (2**32 - 1 - positions)  # (G, n)
    return 2**32 - 1 - (torch.topk(key, min(k, t.shape[-1]), dim=-1).values & (2**32 - 1))


def summarise(measured: list[Measured], configs: Sequence[QuantizerConfig],
              top_k: int = 10) -> list[Observation]:
    """One :class:`Observation` per measurement, the work on t and c done for all of them together
    (see :func:`summarise_groups`)."""
    out: list[Observation | None] = [None] * len(measured)
    for members, stacked in summarise_groups(measured, configs, top_k):
        for j, i in enumerate(members):
            out[i] = stacked.layer(j)
    return out  # type: ignore[return-value]


def summarise_groups(
    measured: list[Measured], configs: Sequence[QuantizerConfig], top_k: int = 10,
) -> list[tuple[list[int], Observation]]:
    """The measurements of each shape as one stacked :class:`Observation`, with their positions in
    ``measured``; :class:`~kernelscope.stats.accumulator.KernelStatsGroup` adds the result the same way.
    """
    shapes: dict[tuple, list[int]] = {}
    for i, m in enumerate(measured):
        shapes.setdefault((m.token.shape, m.channel.shape, m.token.device), []).append(i)
    return [(members, _summarise_same_shape([measured[i] for i in members], list(configs), top_k))
            for members in shapes.values()]


class _Bounds:
    """The zero-bound figures of every configuration for ``layers`` stacked layers of ``batch``
    sequences, filled configuration by configuration."""

    def __init__(self, layers: int, batch: int, n: int, device) -> None:
        self.layers, self.batch = layers, batch
        self.sums = torch.empty(layers, n, batch, dtype=torch.float64, device=device)
        self.low = torch.empty(layers, n, dtype=torch.float64, device=device)
        self.high = torch.empty(layers, n, dtype=torch.float64, device=device)
        self.hist = torch.empty(layers, n, HISTOGRAM.bins, dtype=torch.int64, device=device)

    def per_layer(self, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(self.layers, self.batch, *v.shape[1:])  # (layers, B, ...)

    def from_scales(self, i: int, bound: torch.Tensor, weight: int) -> None:
        """Configuration ``i`` from one zero bound per stored scale ``(S, T|1, 1|I)``, each standing
        for ``weight`` elements."""
        self.sums[:, i] = self.per_layer(bound.sum(dim=(-2, -1), dtype=torch.float64) * weight)
        self.low[:, i] = self.per_layer(bound.amin(dim=(-2, -1))).amin(dim=1).double()
        self.high[:, i] = self.per_layer(bound.amax(dim=(-2, -1))).amax(dim=1).double()
        self.hist[:, i] = element.histogram(bound, weight, self.layers, binning=HISTOGRAM)

    def from_counts(self, i: int, slot: int, group: list[Measured]) -> None:
        """Configuration ``i``, a block format, from the figures counted with its elements."""
        bounds = torch.stack([m.counted.bounds[slot] for m in group])  # (layers, 2 + B)
        self.low[:, i], self.high[:, i], self.sums[:, i] = bounds[:, 0], bounds[:, 1], bounds[:, 2:]
        self.hist[:, i] = torch.stack([m.counted.hist[slot] for m in group])

    def separable(self, members: list[int], configs: list[QuantizerConfig], ranges: ActivationRanges,
                  c_order: torch.Tensor) -> None:
        """Configurations ``members`` of one separable quantizer, from its two factor vectors."""
        first = configs[members[0]]
        tau, floor = first.format.tau, first.format.rule.floor
        row, col = first.factors(ranges)  # (S, T, 1), (S, 1, I): as the count computed them
        col_sorted = col.squeeze(-2).gather(-1, c_order)  # (S, I): c^(1-α) rises with c
        # The step rises with each factor, so its extremes come from the factors' extremes.
        row_lo, row_hi = row.amin(dim=-2, keepdim=True), row.amax(dim=-2, keepdim=True)  # (S, 1, 1)
        col_lo, col_hi = col_sorted[:, :1, None], col_sorted[:, -1:, None]  # (S, 1, 1)
        for i in members:
            qmax = configs[i].qmax
            self.sums[:, i] = self.per_layer(tau * separable_step_sums(row, col_sorted, qmax, floor))
            low = F.bound_of(separable_step(row_lo, col_lo, qmax), configs[i].format).reshape(-1)
            high = F.bound_of(separable_step(row_hi, col_hi, qmax), configs[i].format).reshape(-1)
            self.low[:, i] = self.per_layer(low).amin(dim=1).double()
            self.high[:, i] = self.per_layer(high).amax(dim=1).double()
        # log10 B = log10 row + log10 col - log10 qmax + log10 τ, floored: binned from two vectors.
        shifts = [-math.log10(configs[i].qmax) for i in members]
        counts = HISTOGRAM.counts_of_sums(torch.log10(row.double()) + math.log10(tau),
                                          torch.log10(col.double()), math.log10(tau * floor), shifts,
                                          groups=self.layers)  # (layers, M, bins)
        for j, i in enumerate(members):
            self.hist[:, i] = counts[:, j]


def stacked_ranges(group: list[Measured], sort: bool = True) -> tuple[torch.Tensor, ...]:
    """t ``(S, T, 1)`` and c ``(S, 1, I)`` of measurements of one shape, stacked (S = layers · B
    sequences), and (with ``sort``, else None) c sorted ascending with the channels' order ``(S, I)``."""
    t = torch.cat([m.token for m in group])  # (S, T, 1)
    c = torch.cat([m.channel for m in group])  # (S, 1, I)
    if not sort:
        return t, c, None, None
    c_sorted, c_order = c.squeeze(-2).sort(dim=-1)  # (S, I), (S, I)
    return t, c, c_sorted, c_order


def config_figures(group: list[Measured], configs: list[QuantizerConfig],
                   stacked: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, _Bounds]:
    """The per-configuration figures of measurements of one shape, stacked: the counts ``(layers, C,
    4)`` and the zero bound's sums, extremes and histograms (a :class:`_Bounds`). ``stacked``: what
    :func:`stacked_ranges` gives for ``group``, when the caller has it."""
    plan = plan_for(configs)
    batch, seq, _ = group[0].token.shape
    width = group[0].channel.shape[-1]
    t, c, _, c_order = stacked or stacked_ranges(group, sort=bool(plan.separable))
    ranges = ActivationRanges(t, c)
    bounds = _Bounds(len(group), batch, len(configs), t.device)
    for i, cfg in enumerate(configs):
        fmt = cfg.format
        if fmt.is_block:
            bounds.from_counts(i, plan.slots[i], group)
        elif not cfg.separable:
            s = F.scale_from_ranges(ranges, fmt)  # (S, T|1, 1|I): as the count computed it
            bounds.from_scales(i, F.bound_of(s, fmt), seq * width // (s.shape[-2] * s.shape[-1]))
    if plan.separable:  # c_order: channels by rising c, and so rising c^(1-α)
        for members in plan.separable.values():
            bounds.separable(members, configs, ranges, c_order)
    return torch.stack([m.counted.counts for m in group]), bounds  # (layers, C, 4)


def _summarise_same_shape(group: list[Measured], configs: list[QuantizerConfig], top_k: int) -> Observation:
    layers = len(group)
    batch, seq, _ = group[0].token.shape
    width = group[0].channel.shape[-1]
    device = group[0].token.device
    stacked = stacked_ranges(group)
    t, c, c_sorted, _ = stacked  # (S, T, 1), (S, 1, I), (S, I)
    counts, bounds = config_figures(group, configs, stacked)  # (layers, C, 4)
    blocks = torch.tensor([batch * seq * -(-width // cfg.block_size) if cfg.format.is_block else 0
                           for cfg in configs], dtype=torch.int64, device=device)
    flat_t = t.reshape(layers, batch * seq)  # (layers, B*T)
    top = _top_tokens(flat_t, top_k)  # (layers, k)
    offsets = torch.tensor([m.token_offset for m in group], device=device).unsqueeze(1)  # (layers, 1)
    return Observation(
        tokens=torch.full((layers,), batch * seq, dtype=torch.int64, device=device),
        elements=torch.full((layers,), batch * seq * width, dtype=torch.int64, device=device),
        nonfinite=torch.stack([m.counted.nonfinite for m in group]),  # (layers,)
        kernel=counts[..., 0].contiguous(),  # (layers, C)
        subnormal=counts[..., 1].contiguous(),
        below_per_token=counts[..., 2].contiguous(),
        kernel_blocks=counts[..., 3].contiguous(),
        blocks=blocks.expand(layers, -1).contiguous(),
        bound_sum=bounds.sums,  # (layers, C, B)
        bound_min=bounds.low,  # (layers, C)
        bound_max=bounds.high,
        bound_hist=bounds.hist,  # (layers, C, bins)
        c_ge_t=bounds.per_layer(count_c_ge_t(t, c_sorted)).sum(dim=1),  # (layers,)
        abs_max=flat_t.amax(dim=1).float(),
        channel_max=bounds.per_layer(c.reshape(-1, width)).amax(dim=1).float(),  # (layers, I)
        top_values=flat_t.gather(1, top).float(),  # (layers, k)
        top_index=top + offsets,
    )


def observe(x: torch.Tensor, configs: Sequence[QuantizerConfig], *, token_offset: int = 0, top_k: int = 10,
            seq_len: int | None = None) -> Observation:
    """Reduce one layer input ``x (..., T, I)`` for every config: :func:`measure` then :func:`summarise`."""
    return summarise([measure(x, configs, token_offset=token_offset, seq_len=seq_len)], configs, top_k)[0]
