"""Per-layer kernel statistics for several quantizer configurations, streamed over batches.

``observe`` reduces one batch of one layer's input to fixed-size tensors (an :class:`Observation`);
``KernelStats.update`` adds it; ``KernelStats.merge`` adds another accumulator (another process,
another shard of windows). :class:`KernelStatsGroup` updates the accumulators of many layers
together from one stacked observation. Everything stays on the activation's device until ``result``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from kernelscope.quant import (
    STEP_FLOOR,
    ActivationRanges,
    QuantizerConfig,
    as_sequences,
    separable_step,
    zero_bound,
)
from kernelscope.stats import elementwise, native
from kernelscope.stats.arena import Arena
from kernelscope.stats.exact import ExactSum
from kernelscope.stats.histogram import LogHistogram

HISTOGRAM = LogHistogram()
FORMAT_ONLY = ("subnormal_elements", "subnormal_fraction", "blocks", "kernel_blocks", "block_kernel_fraction")
"""Result columns that only formats with float grids or blocks fill."""
QUANTILES = (0.5, 0.9, 0.99)

SUMMED = ("tokens", "elements", "nonfinite", "kernel", "below_per_token", "bound_hist", "c_ge_t")
MAXIMA = ("bound_max", "abs_max", "channel_max")
MINIMA = ("bound_min",)
"""How two accumulated :class:`Observation` states combine, field by field (top-k and bound sums aside)."""


@dataclass
class Observation:
    """One batch of one layer's input, reduced. Fields with a config axis have length C.

    A stacked observation (:func:`summarise_groups`) holds several layers at once: every field
    gains a leading layer axis, and :meth:`layer` takes one layer's out (as views).
    """

    tokens: torch.Tensor  # () int64: rows (tokens) seen
    elements: torch.Tensor  # () int64: positions (B·T·I), finite or not
    nonfinite: torch.Tensor  # () int64: NaN or ±Inf elements, left out of the kernel counts
    kernel: torch.Tensor  # (C,) int64
    below_per_token: torch.Tensor  # (C,) int64: elements whose bound < the per-token bound
    bound_sum: torch.Tensor  # (C, B) float64: sum of the zero bound over each sequence
    bound_min: torch.Tensor  # (C,) float64
    bound_max: torch.Tensor  # (C,) float64
    bound_hist: torch.Tensor  # (C, bins) int64
    c_ge_t: torch.Tensor  # () int64: pairs (i, j) of one sequence with c_j >= t_i
    abs_max: torch.Tensor  # () float32
    channel_max: torch.Tensor  # (I,) float32: max over sequences of c_j
    top_values: torch.Tensor  # (k,) float32: largest t_i
    top_index: torch.Tensor  # (k,) int64: their global token index (-1: empty)

    def layer(self, j: int) -> Observation:
        """Layer ``j`` of a stacked observation."""
        return Observation(**{f.name: getattr(self, f.name)[j] for f in fields(self)})


def count_c_ge_t(token: torch.Tensor, c_sorted: torch.Tensor) -> torch.Tensor:
    """Number of pairs (i, j) with ``c_j >= t_i`` in each sequence, ``(B,)`` int64; by sorting c.

    ``token (B, T, 1)``, ``c_sorted (B, I)`` ascending: O((T + I) log I) instead of T·I comparisons.
    """
    t = token.squeeze(-1).contiguous()  # (B, T)
    below = torch.searchsorted(c_sorted, t, side="left")  # (B, T): how many c_j < t_i
    return (c_sorted.shape[-1] - below).sum(dim=-1)


def separable_step_sums(row: torch.Tensor, col_sorted: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per sequence, the sum over (i, j) of ``max(row_i · col_j / qmax, STEP_FLOOR)``, float64, (B,).

    ``row (B, T, 1)``; ``col_sorted (B, I)`` ascending. Computed in float64 in O((T + I) log I): for
    each row, the columns whose product falls under the floor are found by a search in the sorted
    columns, and the rest add up to ``row_i · (their column sum) / qmax``. This is the sum of the
    steps before their float32 rounding (a relative difference below 1e-7).
    """
    a = row.double().squeeze(-1)  # (B, T)
    b = col_sorted.double()  # (B, I)
    suffix = torch.nn.functional.pad(b.flip(-1).cumsum(-1).flip(-1), (0, 1))  # (B, I + 1): sum of b[k:]
    cutoff = (qmax * STEP_FLOOR) / a  # (B, T): b_j below this gives a step at the floor; a = 0: inf
    under = torch.searchsorted(b, cutoff)  # (B, T): how many b_j < cutoff
    rows = under * STEP_FLOOR + a * suffix.gather(-1, under) / qmax  # (B, T)
    return rows.sum(dim=-1)  # (B,)


def _top_k(values: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest values with their indices along the last axis (each row apart); ties go to
    the smaller index, so the choice does not depend on how the values were split into batches or
    processes."""
    order = torch.argsort(index, dim=-1, stable=True)
    values, index = values.gather(-1, order), index.gather(-1, order)
    order = torch.argsort(values, dim=-1, descending=True, stable=True)[..., :k]
    return values.gather(-1, order), index.gather(-1, order)


def _top_tokens(t: torch.Tensor, k: int) -> torch.Tensor:
    """Positions ``(G, k)`` of the ``k`` largest of each row of ``t (G, n)`` (finite, >= 0), earliest
    first among ties. A non-negative float32's bits order like the float, so one int64 key holds
    value and position."""
    positions = torch.arange(t.shape[-1], device=t.device)  # (n,)
    key = (t.float().view(torch.int32).long() << 32) | (2**32 - 1 - positions)  # (G, n)
    return 2**32 - 1 - (torch.topk(key, min(k, t.shape[-1]), dim=-1).values & (2**32 - 1))


@dataclass
class Measured:
    """What must be read off one batch of one layer's input while it exists: t, c and the counts.

    Everything else (steps, bound sums and histograms, c >= t, outliers) follows from t and c, so
    :func:`summarise` computes it later, for the inputs of many layers at once.
    """

    token: torch.Tensor  # (B, T, 1) t_i, NaN and ±Inf measured as 0
    channel: torch.Tensor  # (B, 1, I) c_j
    kernel: torch.Tensor  # (C,) int64
    below_per_token: torch.Tensor  # (C,) int64
    nonfinite: torch.Tensor  # () int64
    token_offset: int


_PLANS: dict[tuple, native.CountPlan | None] = {}
"""Per list of configurations and statistics dtype, the fixed part of the C count (or None): a
profile measures the same configurations some hundred times a forward pass."""


def measure(
    x: torch.Tensor, configs: list[QuantizerConfig], *, token_offset: int = 0, seq_len: int | None = None,
    arena: Arena | None = None,
) -> Measured:
    """The per-element part of the statistics of ``x (..., T, I)``; ``x`` is neither kept nor changed.

    ``token_offset`` is the global index of the batch's first token; ``seq_len`` splits a flattened
    ``(B·T, I)`` input into its sequences. NaN and ±Inf are counted, measured as zeros for t and c,
    and left out of the kernel counts. With an ``arena`` the returned tensors live in its block.
    """
    x = elementwise.prepare(as_sequences(x, seq_len))  # (B, T, I)
    batch, seq, width = x.shape
    if batch * seq >= 2**31:
        raise ValueError("one batch holds too many tokens; use a smaller batch size")
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = len(configs)
    if arena is None:
        ranges = elementwise.ranges(x)
        counts = None
    else:
        ranges = elementwise.ranges(x, (arena.empty((batch, seq, 1), stat), arena.empty((batch, 1, width), stat)))
        block = arena.empty((2 * n + 1,), torch.int64)  # kernel, below, nonfinite side by side
        counts = (block[:n], block[n : 2 * n], block[2 * n])
    terms = _terms(ranges, configs)
    key = (tuple(configs), stat)
    if key not in _PLANS:
        if len(_PLANS) >= 64:
            _PLANS.clear()
        _PLANS[key] = elementwise.fixed_plan(terms)
    kernel, below, nonfinite = elementwise.count(x, ranges, terms, counts, _PLANS[key])
    return Measured(ranges.token, ranges.channel, kernel, below, nonfinite, token_offset)


def _terms(ranges: ActivationRanges, configs: list[QuantizerConfig]) -> list[elementwise.Term]:
    """Each configuration's step, as the per-element pass takes it, for activations with these ranges."""
    factors: dict[tuple[str, float | None], tuple[torch.Tensor, torch.Tensor]] = {}
    terms = []
    for cfg in configs:
        if cfg.quantizer == "per_token":
            terms.append(elementwise.Term(token_bits=cfg.bits))
        elif cfg.separable:
            key = (cfg.quantizer, cfg.alpha)
            if key not in factors:
                factors[key] = cfg.factors(ranges)  # (B, T, 1), (B, 1, I): the same for every bits
            row, col = factors[key]
            terms.append(elementwise.Term(row=row, col=col, qmax=cfg.qmax, below_bits=cfg.bits))
        else:
            terms.append(elementwise.Term(step=cfg.step(ranges), below_bits=cfg.bits))
    return terms


def measured_nbytes(batch: int, seq: int, width: int, configs: list[QuantizerConfig], element_size: int = 4) -> int:
    """An upper bound of the bytes :func:`measure` keeps in its arena for an input ``(batch, seq, width)``
    (t, c and the counts, each aligned), for sizing an :class:`~kernelscope.stats.arena.Arena`."""
    return batch * (seq + width) * element_size + (2 * len(configs) + 1) * 8 + 3 * 64


def summarise(measured: list[Measured], configs: list[QuantizerConfig], top_k: int = 10) -> list[Observation]:
    """One :class:`Observation` per measurement, the work on t and c done for all of them together
    (see :func:`summarise_groups`)."""
    out: list[Observation | None] = [None] * len(measured)
    for members, stacked in summarise_groups(measured, configs, top_k):
        for j, i in enumerate(members):
            out[i] = stacked.layer(j)
    return out  # type: ignore[return-value]


def summarise_groups(
    measured: list[Measured], configs: list[QuantizerConfig], top_k: int = 10,
) -> list[tuple[list[int], Observation]]:
    """The measurements of each shape as one stacked :class:`Observation`, with their positions in
    ``measured``.

    Measurements of the same shape are stacked, so a batch of 200 Linear inputs costs a few dozen
    tensor operations rather than a few dozen each; :class:`KernelStatsGroup` adds the result the
    same way.
    """
    shapes: dict[tuple, list[int]] = {}
    for i, m in enumerate(measured):
        shapes.setdefault((m.token.shape, m.channel.shape, m.token.dtype, m.token.device), []).append(i)
    return [(members, _summarise_same_shape([measured[i] for i in members], configs, top_k))
            for members in shapes.values()]


def _summarise_same_shape(group: list[Measured], configs: list[QuantizerConfig], top_k: int) -> Observation:
    layers = len(group)
    batch, seq, _ = group[0].token.shape
    width = group[0].channel.shape[-1]
    device = group[0].token.device
    t = torch.cat([m.token for m in group])  # (S, T, 1), S = layers * B sequences
    c = torch.cat([m.channel for m in group])  # (S, 1, I)
    ranges = ActivationRanges(t, c)
    c_order = c.squeeze(-2).argsort(dim=-1)  # (S, I): channels by rising c (and so rising c^(1-α))
    c_sorted = c.squeeze(-2).gather(-1, c_order)  # (S, I)

    def per_layer(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(layers, batch, *v.shape[1:])  # (layers, B, ...)

    n = len(configs)
    bsum: list[torch.Tensor | None] = [None] * n  # (layers, B) each
    bmin: list[torch.Tensor | None] = [None] * n  # (layers,) each
    bmax: list[torch.Tensor | None] = [None] * n
    hist = torch.empty(layers, n, HISTOGRAM.bins, dtype=torch.int64, device=device)  # filled config by config
    separable: dict[tuple[str, float | None], list[int]] = {}
    for i, cfg in enumerate(configs):
        if cfg.separable:
            separable.setdefault((cfg.quantizer, cfg.alpha), []).append(i)
            continue
        step = cfg.step(ranges)  # (S, T|1, I|1): elementwise in t and c, as measure computed it
        weight = seq * width // (step.shape[-2] * step.shape[-1])  # elements each stored step covers
        # B = 0.5·Δ is exact in binary, so the bound's statistics are read off the step.
        bsum[i] = per_layer(0.5 * step.sum(dim=(-2, -1), dtype=torch.float64) * weight)
        bmin[i] = zero_bound(per_layer(step.amin(dim=(-2, -1))).amin(dim=1)).double()
        bmax[i] = zero_bound(per_layer(step.amax(dim=(-2, -1))).amax(dim=1)).double()
        hist[:, i] = HISTOGRAM.counts(zero_bound(step), weight, groups=layers)
    for members in separable.values():
        row, col = configs[members[0]].factors(ranges)  # (S, T, 1), (S, 1, I): as measure computed them
        col_sorted = col.squeeze(-2).gather(-1, c_order)  # (S, I): c^(1-α) rises with c
        # The step rises with each factor, so its extremes come from the factors' extremes.
        row_lo, row_hi = row.amin(dim=-2, keepdim=True), row.amax(dim=-2, keepdim=True)  # (S, 1, 1)
        col_lo, col_hi = col_sorted[:, :1, None], col_sorted[:, -1:, None]  # (S, 1, 1)
        for i in members:
            qmax = configs[i].qmax
            bsum[i] = per_layer(0.5 * separable_step_sums(row, col_sorted, qmax))
            bmin[i] = zero_bound(per_layer(separable_step(row_lo, col_lo, qmax).reshape(-1)).amin(dim=1)).double()
            bmax[i] = zero_bound(per_layer(separable_step(row_hi, col_hi, qmax).reshape(-1)).amax(dim=1)).double()
        # log10 B = log10 row + log10 col - log10 qmax + log10 0.5, floored: binned from two vectors.
        shifts = [-math.log10(configs[i].qmax) for i in members]
        counts = HISTOGRAM.counts_of_sums(torch.log10(row.double()) + math.log10(0.5), torch.log10(col.double()),
                                          math.log10(0.5 * STEP_FLOOR), shifts, groups=layers)  # (layers, M, bins)
        for j, i in enumerate(members):
            hist[:, i] = counts[:, j]
        del counts

    c_ge_t = per_layer(count_c_ge_t(t, c_sorted)).sum(dim=1)  # (layers,)
    flat_t = t.reshape(layers, batch * seq)  # (layers, B*T)
    top = _top_tokens(flat_t, top_k)  # (layers, k)
    top_values = flat_t.gather(1, top).float()
    offsets = torch.tensor([m.token_offset for m in group], device=device).unsqueeze(1)  # (layers, 1)
    abs_max = flat_t.amax(dim=1).float()
    channel_max = per_layer(c.reshape(-1, width)).amax(dim=1).float()  # (layers, I)
    return Observation(
        tokens=torch.full((layers,), batch * seq, dtype=torch.int64, device=device),
        elements=torch.full((layers,), batch * seq * width, dtype=torch.int64, device=device),
        kernel=torch.stack([m.kernel for m in group]),  # (layers, C)
        below_per_token=torch.stack([m.below_per_token for m in group]),
        nonfinite=torch.stack([m.nonfinite for m in group]),  # (layers,)
        bound_sum=torch.stack(bsum, dim=1),  # (layers, C, B)
        bound_min=torch.stack(bmin, dim=1),  # (layers, C)
        bound_max=torch.stack(bmax, dim=1),
        bound_hist=hist,  # (layers, C, bins)
        c_ge_t=c_ge_t,
        abs_max=abs_max,
        channel_max=channel_max,
        top_values=top_values,  # (layers, k)
        top_index=top + offsets,
    )


def observe(
    x: torch.Tensor,
    configs: list[QuantizerConfig],
    *,
    token_offset: int = 0,
    top_k: int = 10,
    seq_len: int | None = None,
) -> Observation:
    """Reduce one layer input ``x (..., T, I)`` for every config: :func:`measure` then :func:`summarise`."""
    return summarise([measure(x, configs, token_offset=token_offset, seq_len=seq_len)], configs, top_k)[0]


def _copy(obs: Observation) -> Observation:
    return Observation(**{f.name: getattr(obs, f.name).clone() for f in fields(obs)})


_STATE_FIELDS = tuple(f.name for f in fields(Observation) if f.name != "bound_sum")
"""The fields an accumulator's state keeps as tensors (the bound sums are held apart, exactly)."""


def _fold(s: Observation, obs: Observation, top_k: int) -> bool:
    """Add ``obs`` to the state ``s`` (one layer, or stacked layers: the top tokens along the last
    axis). In place where the shapes allow, so the state keeps its memory from one batch to the next;
    False when the top tokens grew (fewer than ``top_k`` seen so far) and are new tensors in ``s``."""
    if s.channel_max.shape != obs.channel_max.shape:
        raise ValueError("cannot merge statistics of layers with different widths")
    for name in SUMMED:
        getattr(s, name).add_(getattr(obs, name))
    for name in MAXIMA:
        torch.maximum(getattr(s, name), getattr(obs, name), out=getattr(s, name))
    for name in MINIMA:
        torch.minimum(getattr(s, name), getattr(obs, name), out=getattr(s, name))
    values, index = _top_k(torch.cat([s.top_values, obs.top_values], dim=-1),
                           torch.cat([s.top_index, obs.top_index], dim=-1), top_k)
    if values.shape == s.top_values.shape:
        s.top_values.copy_(values)
        s.top_index.copy_(index)
        return True
    s.top_values, s.top_index = values, index
    return False


class KernelStats:
    """Streaming kernel statistics of one layer for a fixed list of quantizer configurations.

    Counts add as integers, extremes as maxima and minima, and bound sums as :class:`ExactSum`, so
    the result does not depend on how the windows were batched, checkpointed or split over processes.
    """

    _FLUSH = 64  # per-sequence bound sums kept on the device before they are folded into the exact sums

    def __init__(self, configs: list[QuantizerConfig], top_k: int = 10) -> None:
        self.configs = list(configs)
        self.top_k = top_k
        self.state: Observation | None = None
        self.bound_sums = ExactSum(len(self.configs))
        self._held: torch.Tensor | None = None  # (C, >= _FLUSH) float64: per-sequence bound sums not yet added
        self._filled = 0  # columns of _held in use
        self._group: KernelStatsGroup | None = None  # the group whose stacked state this state is a row of

    def flush(self) -> None:
        """Fold the per-sequence bound sums kept on the device into the exact sums (one host sync)."""
        if self._group is not None:
            self._group.flush()
        if self._filled:
            self.bound_sums.add(self._held[:, : self._filled])  # (C, filled)
            self._filled = 0

    def _hold(self, sums: torch.Tensor) -> None:
        """Keep ``sums (C, B)`` until the next flush, in one buffer made once: an accumulator allocates
        nothing after its first batch, so it never leaves small blocks among a model's activations."""
        width = sums.shape[1]
        if self._held is None or self._held.shape[1] < width or self._held.device != sums.device:
            self.flush()
            self._held = torch.empty(len(self.configs), max(self._FLUSH, width), dtype=torch.float64,
                                     device=sums.device)
        elif self._filled + width > self._held.shape[1]:
            self.flush()
        self._held[:, self._filled : self._filled + width].copy_(sums)
        self._filled += width

    def update(self, obs: Observation) -> KernelStats:
        """Add one observation (made with the same configs, in the same order)."""
        if obs.kernel.shape[0] != len(self.configs):
            raise ValueError("the observation was made with a different number of configurations")
        self._hold(obs.bound_sum.detach())
        if self.state is None:
            self._detach()
            self.state = _copy(obs)
            self.state.bound_sum = torch.empty(0, dtype=torch.float64)  # held in self.bound_sums
            self.state.top_values, self.state.top_index = _top_k(obs.top_values, obs.top_index, self.top_k)
            return self
        self._fold(obs)
        return self

    def _fold(self, obs: Observation) -> None:
        if not _fold(self.state, obs, self.top_k):
            self._detach()  # its top tokens are new tensors: the state stops being a row of a group's

    def _detach(self) -> None:
        """Stop being a row of a :class:`KernelStatsGroup` (whose held bound sums are folded in first)."""
        if self._group is not None:
            group, self._group = self._group, None
            group.flush()

    def top_from(self, values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k of candidate tokens ``values (n,)`` at ``index (n,)``, ties to the earlier token."""
        return _top_k(values, index, self.top_k)

    def merge(self, other: KernelStats) -> KernelStats:
        """Fold another accumulator of the same layer and configs into this one."""
        if other.configs != self.configs:
            raise ValueError("cannot merge statistics of different quantizer configurations")
        if other.state is None:
            return self
        self.flush()
        other.flush()
        if self.state is None:
            self._detach()
            self.state = _copy(other.state)
        else:
            self._fold(other.state)
        self.bound_sums.merge(other.bound_sums)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The accumulated state as CPU tensors (empty when nothing was observed), for checkpoints."""
        if self.state is None:
            return {}
        self.flush()
        state = {f.name: getattr(self.state, f.name).detach().cpu() for f in fields(self.state)}
        state["bound_sum"] = self.bound_sums.to_tensor()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> KernelStats:
        """Restore what :meth:`state_dict` returned; the next update continues exactly from there."""
        self._detach()
        self._filled = 0
        if not state:
            self.state = None
            self.bound_sums = ExactSum(len(self.configs))
            return self
        missing = {f.name for f in fields(Observation)} - set(state)
        if missing:
            raise ValueError(f"state lacks {sorted(missing)}")
        self.bound_sums = ExactSum.from_tensor(state["bound_sum"])
        if len(self.bound_sums.totals) != len(self.configs):
            raise ValueError("the saved state was made with a different number of configurations")
        self.state = Observation(**{f.name: state[f.name].to(device) for f in fields(Observation)})
        self.state.bound_sum = torch.empty(0, dtype=torch.float64)
        return self

    @property
    def empty(self) -> bool:
        return self.state is None

    def result(self) -> dict:
        """Plain Python values: layer-wide figures and one dict per config (host sync happens here)."""
        return results([self])[0]

    def _on_host(self) -> Observation:
        """The accumulated state on the CPU, pending bound sums folded in."""
        if self.state is None:
            raise ValueError("no data was observed for this layer")
        self.flush()
        return Observation(**{f.name: getattr(self.state, f.name).cpu() for f in fields(self.state)})

    def _assemble(self, s: Observation, quantiles: list[list[float]]) -> dict:
        """:meth:`result` from the state on the host and its bound quantiles ``(C, len(QUANTILES))``."""
        sums = self.bound_sums.values()
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
        kernel, below = s.kernel.tolist(), s.below_per_token.tolist()
        lows, highs = s.bound_min.tolist(), s.bound_max.tolist()
        per_config = []
        for i, cfg in enumerate(self.configs):
            row = {
                **cfg.as_dict(),
                "kernel_elements": kernel[i],
                "kernel_fraction": kernel[i] / elements if elements else None,
                "bound_mean": sums[i] / positions,
                "bound_min": lows[i],
                "bound_max": highs[i],
                "bound_below_per_token_fraction": None if cfg.quantizer == "per_token" else below[i] / positions,
                **dict.fromkeys(FORMAT_ONLY),  # INT steps from t and c: no subnormal codes, no blocks
            }
            for q, value in zip(QUANTILES, quantiles[i], strict=True):
                row[f"bound_p{round(q * 100)}"] = value
            per_config.append(row)
        return {"layer": layer, "configs": per_config}


class KernelStatsGroup:
    """The accumulators of several layers whose inputs have one shape, updated together from one
    stacked observation (:func:`summarise_groups`): a few dozen tensor operations a batch in all,
    rather than a few dozen per layer (on a GPU, as many kernel launches). The result is the same as
    updating each layer's accumulator alone.

    After the first batch, each accumulator's state is a row of the group's stacked state (views),
    so everything that reads, saves or merges a :class:`KernelStats` works as before. An accumulator
    changed on its own in a way that replaces its state (a load, a first merge) leaves the group; the
    next update then adds the batch layer by layer and stacks the states again.
    """

    def __init__(self, accumulators: list[KernelStats]) -> None:
        if not accumulators:
            raise ValueError("a group needs at least one accumulator")
        first = accumulators[0]
        if any(acc.configs != first.configs or acc.top_k != first.top_k for acc in accumulators):
            raise ValueError("a group's accumulators must have the same configurations and top_k")
        self.accumulators = list(accumulators)
        self.state: Observation | None = None  # fields (layers, ...); bound_sum (layers, 0): see _held
        self._held: torch.Tensor | None = None  # (layers, C, >= _FLUSH) float64: bound sums not yet added
        self._filled = 0

    def update(self, obs: Observation) -> KernelStatsGroup:
        """Add a stacked observation whose layer ``j`` belongs to ``accumulators[j]``."""
        layers, n = len(self.accumulators), len(self.accumulators[0].configs)
        if tuple(obs.kernel.shape) != (layers, n):
            raise ValueError(f"expected an observation of {layers} layers x {n} configurations, "
                             f"got {tuple(obs.kernel.shape)}")
        if not self._stacked():
            if all(acc.state is None for acc in self.accumulators):  # the first batch: the state is the batch's
                state = {name: getattr(obs, name).clone() for name in _STATE_FIELDS}  # (layers, ...) each
                state["top_values"], state["top_index"] = _top_k(obs.top_values, obs.top_index,
                                                                 self.accumulators[0].top_k)
                self._bind(state)
                self._hold(obs.bound_sum.detach())
                return self
            for j, acc in enumerate(self.accumulators):
                acc.update(obs.layer(j))
            self._stack()
            return self
        s = self.state
        if not _fold(s, obs, self.accumulators[0].top_k):  # new top-token tensors: rows of them
            for j, acc in enumerate(self.accumulators):
                acc.state.top_values, acc.state.top_index = s.top_values[j], s.top_index[j]
        self._hold(obs.bound_sum.detach())
        return self

    def _stacked(self) -> bool:
        return self.state is not None and all(acc._group is self for acc in self.accumulators)

    def _stack(self) -> None:
        """Make each accumulator's state a row of one stacked state (where their shapes allow)."""
        states = [acc.state for acc in self.accumulators]
        shapes = [tuple(getattr(st, name).shape for name in _STATE_FIELDS) for st in states]
        if any(shape != shapes[0] for shape in shapes):
            self.state = None  # e.g. top-k lists of different lengths: stay layer by layer
            return
        # (layers, ...) each
        self._bind({name: torch.stack([getattr(st, name) for st in states]) for name in _STATE_FIELDS})

    def _bind(self, stacked: dict[str, torch.Tensor]) -> None:
        """Take ``stacked`` (every field but the bound sums) as the group's state, each accumulator's
        state becoming its row."""
        for acc in self.accumulators:
            acc._detach()
        self.flush()
        self.state = Observation(**stacked, bound_sum=torch.empty(len(self.accumulators), 0, dtype=torch.float64))
        for j, acc in enumerate(self.accumulators):
            acc.state = self.state.layer(j)
            acc._group = self

    def _hold(self, sums: torch.Tensor) -> None:
        """Keep ``sums (layers, C, B)`` until the next flush, in one buffer made once."""
        width = sums.shape[-1]
        if self._held is None or self._held.shape[-1] < width or self._held.device != sums.device:
            self.flush()
            self._held = torch.empty(*sums.shape[:2], max(KernelStats._FLUSH, width), dtype=torch.float64,
                                     device=sums.device)
        elif self._filled + width > self._held.shape[-1]:
            self.flush()
        self._held[:, :, self._filled : self._filled + width].copy_(sums)
        self._filled += width

    def flush(self) -> None:
        """Fold the bound sums held for every layer into its accumulator's exact sums (one host sync)."""
        if self._filled:
            rows = self._held[:, :, : self._filled].cpu().tolist()  # (layers, C, filled)
            self._filled = 0
            for acc, row in zip(self.accumulators, rows, strict=True):
                acc.bound_sums.add(row)

    def release(self) -> None:
        """Fold in the held bound sums and let every accumulator go on alone (its state stays as is)."""
        self.flush()
        for acc in self.accumulators:
            if acc._group is self:
                acc._group = None


_RESULTS_AT_ONCE = 16
"""Layers whose bound quantiles :func:`results` reads together."""


def results(accumulators: list[KernelStats]) -> list[dict]:
    """:meth:`KernelStats.result` of each accumulator; the bound quantiles are read from the
    histograms of many layers together, rather than one layer at a time."""
    states = [acc._on_host() for acc in accumulators]
    quantiles: list[list[float]] = []  # (sum of C, len(QUANTILES))
    for first in range(0, len(states), _RESULTS_AT_ONCE):  # a slice at a time: the copies stay small
        part = states[first : first + _RESULTS_AT_ONCE]
        hist = torch.cat([s.bound_hist for s in part])  # (sum of C, bins)
        lows = torch.cat([s.bound_min for s in part]).tolist()
        highs = torch.cat([s.bound_max for s in part]).tolist()
        quantiles += HISTOGRAM.quantiles(hist, QUANTILES, lows, highs)
    out, first = [], 0
    for acc, s in zip(accumulators, states, strict=True):
        out.append(acc._assemble(s, quantiles[first : first + len(acc.configs)]))
        first += len(acc.configs)
    return out
