"""The per-element part of the kernel statistics, in as few passes over an activation as possible.

Everything a profile learns from an activation ``x (B, T, I)`` itself, rather than from its t and c
vectors, comes from two functions: :func:`ranges` (t and c: one reading of ``x``) and :func:`count`
(for every configuration at once, in one more reading: the kernel, the elements on a subnormal code,
the positions whose step is below the per-token step, the blocks that are kernel through and
through, the non-finite elements, and for block formats the zero bound's extremes, sums and
histogram). On CPU, for float32 and bfloat16 inputs, both run as small C loops
(:mod:`kernelscope.stats.native`, built when the package is installed); elsewhere, or where no
library was built, the torch code below computes the same integers. The torch code is the definition: every
count is of ``|x / s|`` against the format's thresholds, with ``s`` from
:func:`kernelscope.quant.formats.scale_of`; the C code evaluates the same float operations in the
same order (a test checks it at ties).

The C code compares ``|x|`` with the largest float ``k`` whose quotient ``k / s`` still rounds to at
most τ, which is ``τ · s`` itself whenever that product is a normal float (τ is a power of two, so
the product is exact, and the next float above it divides to more than half an ulp above τ).

Set ``KERNELSCOPE_NATIVE=0`` to run the torch code everywhere.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernelscope.quant import ActivationRanges, QuantizerConfig, per_token_step, separable_step
from kernelscope.quant import formats as F
from kernelscope.stats import native
from kernelscope.stats.histogram import HISTOGRAM

COUNTS = native.COUNTS
"""The four counts of each configuration, in the order of :attr:`Counted.counts`' columns."""


@dataclass(frozen=True)
class Plan:
    """How one list of configurations is counted: each block format's row of the block outputs
    (``slots``, -1 for the others) and, where the C count can take them, its fixed part."""

    configs: tuple[QuantizerConfig, ...]
    slots: tuple[int, ...]
    native: native.CountPlan | None

    @property
    def blocks(self) -> int:
        """How many configurations are block formats (rows of the block outputs)."""
        return max(self.slots, default=-1) + 1

    @property
    def separable(self) -> dict[tuple[str, float | None], list[int]]:
        """The separable configurations by the factors they share (one quantizer at several widths)."""
        shared: dict[tuple[str, float | None], list[int]] = {}
        for i, cfg in enumerate(self.configs):
            if cfg.separable:
                shared.setdefault((cfg.quantizer, cfg.alpha), []).append(i)
        return shared


def make_plan(configs: Sequence[QuantizerConfig]) -> Plan:
    """The plan for ``configs``; its native part only where the C count runs and takes that many."""
    configs = tuple(configs)
    slots, taken = [], 0
    for cfg in configs:
        slots.append(taken if cfg.format.is_block else -1)
        taken += cfg.format.is_block
    plan = None
    if _wanted() and native.library() is not None and len(configs) <= native.MAX_TERMS:
        plan = native.CountPlan([c.format for c in configs], slots, HISTOGRAM.edges)
    return Plan(configs, tuple(slots), plan)


@dataclass
class Counted:
    """What :func:`count` reads off one activation ``(B, T, I)`` for C configurations."""

    counts: torch.Tensor  # (C, 4) int64: kernel, subnormal, below_per_token, kernel_blocks
    nonfinite: torch.Tensor  # () int64: NaN and ±Inf elements
    bounds: torch.Tensor  # (blocks, 2 + B) float64: smallest and largest zero bound, each sequence's sum
    hist: torch.Tensor  # (blocks, bins) int64: the zero bound's histogram, by elements


def empty_counted(plan: Plan, batch: int, device: torch.device | str = "cpu", alloc=None) -> Counted:
    """Outputs of :func:`count` to write into, made by ``alloc(shape, dtype)`` (an arena's ``empty``)
    or, without it, as new tensors on ``device``."""
    shapes = (((len(plan.configs), len(COUNTS)), torch.int64), ((), torch.int64),
              ((plan.blocks, 2 + batch), torch.float64), ((plan.blocks, HISTOGRAM.bins), torch.int64))
    if alloc is None:
        return Counted(*(torch.empty(s, dtype=d, device=device) for s, d in shapes))
    return Counted(*(alloc(s, d) for s, d in shapes))


def _abs32(x: torch.Tensor) -> torch.Tensor:
    """A new float32 tensor ``|x|``: every statistic is computed in float32."""
    return x.abs() if x.dtype == torch.float32 else x.float().abs_()


def _ranges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ax = _abs32(x)  # (B, T, I)
    ax = torch.where(ax < math.inf, ax, 0.0)  # NaN and ±Inf fail `<`: measured as 0
    return ax.amax(dim=-1, keepdim=True), ax.amax(dim=-2, keepdim=True)  # (B, T, 1), (B, 1, I)


def factors(ranges: ActivationRanges, plan: Plan) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Each separable configuration's ``(row (B, T, 1), col (B, 1, I))`` (one pair per quantizer,
    shared between its widths), None for the others."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(plan.configs)
    for members in plan.separable.values():
        pair = plan.configs[members[0]].factors(ranges)
        for i in members:
            out[i] = pair
    return out


def _scales(cfg: QuantizerConfig, ranges: ActivationRanges, x0: torch.Tensor | None,
            pair: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, expanded)``: the configuration's scale as :mod:`~kernelscope.quant.formats` defines it
    and the same broadcastable to ``(B, T, I)``. ``x0``: ``|x|`` with non-finite elements as 0."""
    fmt = cfg.format
    if fmt.layout is F.Unit.CROSSQUANT:
        s = separable_step(*pair, cfg.qmax)  # (B, T, I)
        return s, s
    if fmt.layout is F.Unit.BLOCK:
        s = F.scale_of(F.unit_amax(x0, fmt), fmt, ranges.token.amax(dim=-2, keepdim=True))  # (B, T, nb)
        return s, F.expand_scale(s, fmt, x0.shape[-1])
    s = F.scale_from_ranges(ranges, fmt)  # (B, T|1, 1|I)
    return s, s


def _coverage(nb: int, fmt: F.Format, width: int, device) -> torch.Tensor:
    """The elements each block of a row covers: the block size, the rest for a short last block."""
    sizes = torch.full((nb,), fmt.block_size, dtype=torch.int64, device=device)
    sizes[-1] = width - fmt.block_size * (nb - 1)
    return sizes


def _count(x: torch.Tensor, ranges: ActivationRanges, plan: Plan,
           pairs: list[tuple[torch.Tensor, torch.Tensor] | None]) -> Counted:
    batch, _, width = x.shape
    out = empty_counted(plan, batch, x.device)
    out.counts.zero_()
    ax = _abs32(x)  # (B, T, I)
    finite = ax < math.inf
    x0 = torch.where(finite, ax, 0.0) if plan.blocks else None  # the scales measure non-finite as 0
    ax = torch.where(finite, ax, math.nan)  # no comparison admits a NaN: non-finite is never in a kernel
    for i, cfg in enumerate(plan.configs):
        fmt = cfg.format
        s, wide = _scales(cfg, ranges, x0, pairs[i])
        q = ax / torch.where(wide == 0, 1.0, wide)  # (B, T, I): a zero scale (an all-zero unit) as 1
        kernel = q <= fmt.tau
        out.counts[i, 0] = kernel.sum()
        sub = fmt.grid.subnormal_range
        if sub is not None:
            out.counts[i, 1] = (q.gt(sub[0]) & q.lt(sub[1])).sum()
        if fmt.per_token_comparable:
            out.counts[i, 2] = torch.lt(wide, per_token_step(ranges, cfg.bits)).expand_as(ax).sum()
        if fmt.is_block:
            out.counts[i, 3] = F.whole_blocks(kernel, fmt).sum()
            _block_bounds(out, plan.slots[i], F.bound_of(s, fmt),
                          _coverage(s.shape[-1], fmt, width, x.device))
    out.nonfinite.copy_(torch.logical_not(finite).sum())
    return out


def _block_bounds(out: Counted, slot: int, bound: torch.Tensor, coverage: torch.Tensor) -> None:
    """Row ``slot`` of the block outputs from the zero bounds ``(B, T, nb)`` of one block format."""
    out.bounds[slot, 0] = bound.min().double()
    out.bounds[slot, 1] = bound.max().double()
    out.bounds[slot, 2:] = (bound.double() * coverage).sum(dim=(-2, -1))  # (B,)
    out.hist[slot] = HISTOGRAM.counts(bound, coverage.expand(bound.shape))


def _wanted() -> bool:
    return os.environ.get("KERNELSCOPE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def native_input(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as the C loops take it (contiguous float32 or bfloat16 on CPU), or None for torch code."""
    if x.device.type != "cpu" or x.dtype not in native.DTYPES or not _wanted() or native.library() is None:
        return None
    return x.contiguous()


def prepare(x: torch.Tensor) -> torch.Tensor:
    """``x`` as both passes read it fastest: where the C loops run, a float16 (or other non-native
    float) input is widened to float32 here, once, rather than left to the torch code."""
    narrow = x.dtype.is_floating_point and x.dtype not in native.DTYPES
    if narrow and x.device.type == "cpu" and _wanted() and native.library() is not None:
        return x.float()  # statistics are float32 anyway
    return x


def describe(device: torch.device | str = "cpu") -> str:
    """Which code computes the per-element statistics on ``device``, as a run's summary records it."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"torch ({device.type})"
    if not _wanted():
        return "torch (KERNELSCOPE_NATIVE=0)"
    if native.library() is None:
        return f"torch (native library unavailable: {native.failure})"
    return f"native ({native.built_with}, {torch.get_num_threads()} threads)"


def ranges(x: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None) -> ActivationRanges:
    """t ``(B, T, 1)`` and c ``(B, 1, I)`` of ``x (B, T, I)``, float32, NaN and ±Inf measured as 0.

    ``out``: two float32 tensors of those shapes to write them into (on ``x``'s device).
    """
    nx = native_input(x)
    if nx is None:
        t, c = _ranges(x)
        if out is None:
            return ActivationRanges(t, c)
        out[0].copy_(t)
        out[1].copy_(c)
        return ActivationRanges(*out)
    return ActivationRanges(*native.ranges(native.library(), nx, out))


def count(x: torch.Tensor, ranges: ActivationRanges, plan: Plan,
          pairs: list[tuple[torch.Tensor, torch.Tensor] | None], out: Counted | None = None) -> Counted:
    """The counts of :class:`Counted` over ``x (B, T, I)`` whose t and c are ``ranges`` (as
    :func:`ranges` measured them), for the configurations of ``plan``; ``pairs`` are the separable
    ones' factors (:func:`factors`). Written into ``out`` when given."""
    nx = native_input(x)
    if nx is None or plan.native is None:
        result = _count(x, ranges, plan, pairs)
        if out is None:
            return result
        for dst, src in zip(_fields(out), _fields(result), strict=True):
            dst.copy_(src)
        return out
    if out is None:
        out = empty_counted(plan, x.shape[0])
    batch, seq, width = x.shape  # the C code reads full vectors: broadcast ones are made full first
    rows = [None if p is None else p[0].expand(batch, seq, 1).contiguous() for p in pairs]  # read as (B, T)
    cols = [None if p is None else p[1].expand(batch, 1, width).contiguous() for p in pairs]  # read as (B, I)
    plan.native.run(native.library(), nx, ranges.token.contiguous(), ranges.channel.contiguous(), rows, cols,
                    _fields(out))
    return out


@functools.cache
def _histogram_table() -> torch.Tensor:
    return native.bin_table(HISTOGRAM.edges.double())


def histogram(values: torch.Tensor, weight: int, groups: int) -> torch.Tensor:
    """``HISTOGRAM.counts(values, weight, groups=groups)`` of non-negative zero bounds: the same
    counts, from the C code's bin table where it runs (one reading instead of a float64 search)."""
    nv = native_input(values) if values.dtype == torch.float32 else None
    if nv is None:
        return HISTOGRAM.counts(values, weight, groups=groups)
    return native.histogram(native.library(), nv, groups, weight, HISTOGRAM.edges, _histogram_table())


def _fields(c: Counted) -> tuple[torch.Tensor, ...]:
    return c.counts, c.bounds, c.hist, c.nonfinite
