"""The per-element statistics and treatments as torch code: their definition, and what runs wherever
the C code does not (GPUs, float16 and other dtypes, ``KERNELSCOPE_NATIVE=0``, no library built).

Every count is of ``|x / s|`` against the format's thresholds, with ``s`` from
:func:`kernelscope.quant.formats.scale_of` and the kernel from
:func:`kernelscope.quant.formats.in_kernel`; fake quantization and kernel removal are those of
:mod:`kernelscope.quant.formats` itself. The C code (:mod:`kernelscope.element.native`) evaluates the
same float operations in the same order, and its tests compare it with this module at ties.
"""

from __future__ import annotations

import math

import torch

from kernelscope.element.plan import Counted, Plan, empty_counted
from kernelscope.quant import ActivationRanges, QuantizerConfig, per_token_step, separable_step
from kernelscope.quant import formats as F


def _abs32(x: torch.Tensor) -> torch.Tensor:
    """A new float32 tensor ``|x|``: every statistic is computed in float32."""
    return x.abs() if x.dtype == torch.float32 else x.float().abs_()


def ranges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t ``(B, T, 1)`` and c ``(B, 1, I)`` of ``x (B, T, I)``, float32, NaN and ±Inf measured as 0."""
    ax = _abs32(x)  # (B, T, I)
    ax = torch.where(ax < math.inf, ax, 0.0)  # NaN and ±Inf fail `<`: measured as 0
    return ax.amax(dim=-1, keepdim=True), ax.amax(dim=-2, keepdim=True)  # (B, T, 1), (B, 1, I)


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


def count(x: torch.Tensor, ranges: ActivationRanges, plan: Plan,
          pairs: list[tuple[torch.Tensor, torch.Tensor] | None]) -> Counted:
    """The counts of :class:`~kernelscope.element.plan.Counted` over ``x (B, T, I)`` whose t and c
    are ``ranges``, for the configurations of ``plan``, as new tensors on ``x``'s device. ``pairs``:
    the separable configurations' factors. Reads no value back from the device, and compiles into
    one graph."""
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
        kernel = F.in_kernel(q, fmt)
        out.counts[i, 0] = kernel.sum()
        sub = fmt.grid.subnormal_range
        if sub is not None:
            out.counts[i, 1] = (q.gt(sub[0]) & q.lt(sub[1])).sum()
        if fmt.per_token_comparable:
            out.counts[i, 2] = torch.lt(wide, per_token_step(ranges, cfg.bits)).expand_as(ax).sum()
        if fmt.is_block:
            out.counts[i, 3] = F.whole_blocks(kernel, fmt).sum()
            _block_bounds(out, plan, plan.slots[i], F.bound_of(s, fmt),
                          _coverage(s.shape[-1], fmt, width, x.device))
    out.nonfinite.copy_(torch.logical_not(finite).sum())
    return out


def _block_bounds(out: Counted, plan: Plan, slot: int, bound: torch.Tensor, coverage: torch.Tensor) -> None:
    """Row ``slot`` of the block outputs from the zero bounds ``(B, T, nb)`` of one block format."""
    out.bounds[slot, 0] = bound.min().double()
    out.bounds[slot, 1] = bound.max().double()
    out.bounds[slot, 2:] = (bound.double() * coverage).sum(dim=(-2, -1))  # (B,)
    out.hist[slot] = plan.binning.counts(bound, coverage.expand(bound.shape))


def fake_quantize(x: torch.Tensor, fmt: F.Format) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` quantized and dequantized by ``fmt`` (a new tensor of ``x``'s dtype) and how many of its
    elements the grid rounded to zero."""
    q, s = F.quantize(x, fmt)
    zeros = q.numel() - torch.count_nonzero(q)  # the kernel: what rounds to zero
    return F.dequantize(q, s, fmt).to(x.dtype), zeros


def remove_kernel(x: torch.Tensor, fmt: F.Format, kernel_scale: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` with only its kernel at ``kernel_scale`` times the zero bound set to zero, and how many
    elements were zeroed."""
    return F.remove_kernel(x, fmt, scale=kernel_scale)
