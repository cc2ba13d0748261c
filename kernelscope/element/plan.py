"""What both backends of the per-element statistics share: how a list of configurations is counted
(:class:`Plan`), what one count writes (:class:`Counted`) and the separable factors it reads."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from kernelscope.quant import ActivationRanges, QuantizerConfig

COUNTS = ("kernel", "subnormal", "below_per_token", "kernel_blocks")
"""The four counts of each configuration, in the order of :attr:`Counted.counts`' columns (the C
code's KS_KERNEL ... KS_KERNEL_BLOCKS)."""


class Binning(Protocol):
    """The histogram the zero bounds of block formats are binned into (a
    :class:`~kernelscope.stats.histogram.LogHistogram`): its interior edges, its number of bins and
    its counting, which is the definition the C code's bin table follows."""

    @property
    def edges(self) -> torch.Tensor: ...

    @property
    def bins(self) -> int: ...

    def counts(self, values: torch.Tensor, weight: int | torch.Tensor = 1,
               groups: int | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class Plan:
    """How one list of configurations is counted: each block format's row of the block outputs
    (``slots``, -1 for the others), the histogram its zero bounds are binned into and, where the C
    count takes them, its fixed part (a :class:`kernelscope.element.native.CountPlan`)."""

    configs: tuple[QuantizerConfig, ...]
    slots: tuple[int, ...]
    binning: Binning
    native: Any = None

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


def slots_of(configs: Sequence[QuantizerConfig]) -> tuple[int, ...]:
    """Each block format's row of the block outputs, in order, and -1 for every other format."""
    slots, taken = [], 0
    for cfg in configs:
        slots.append(taken if cfg.format.is_block else -1)
        taken += cfg.format.is_block
    return tuple(slots)


@dataclass
class Counted:
    """What a count reads off one activation ``(B, T, I)`` for C configurations."""

    counts: torch.Tensor  # (C, 4) int64: kernel, subnormal, below_per_token, kernel_blocks
    nonfinite: torch.Tensor  # () int64: NaN and ±Inf elements
    bounds: torch.Tensor  # (blocks, 2 + B) float64: smallest and largest zero bound, each sequence's sum
    hist: torch.Tensor  # (blocks, bins) int64: the zero bound's histogram, by elements


def empty_counted(plan: Plan, batch: int, device: torch.device | str = "cpu",
                  alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None) -> Counted:
    """Outputs of a count to write into, made by ``alloc(shape, dtype)`` (an arena's ``empty``) or,
    without it, as new tensors on ``device``."""
    shapes = (((len(plan.configs), len(COUNTS)), torch.int64), ((), torch.int64),
              ((plan.blocks, 2 + batch), torch.float64), ((plan.blocks, plan.binning.bins), torch.int64))
    if alloc is None:
        return Counted(*(torch.empty(s, dtype=d, device=device) for s, d in shapes))
    return Counted(*(alloc(s, d) for s, d in shapes))


def fields(c: Counted) -> tuple[torch.Tensor, ...]:
    """The outputs of ``c`` in the order the C count takes them: counts, bounds, hist, nonfinite."""
    return c.counts, c.bounds, c.hist, c.nonfinite


def factors(ranges: ActivationRanges, plan: Plan) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Each separable configuration's ``(row (B, T, 1), col (B, 1, I))`` (one pair per quantizer,
    shared between its widths), None for the others."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(plan.configs)
    for members in plan.separable.values():
        pair = plan.configs[members[0]].factors(ranges)
        for i in members:
            out[i] = pair
    return out
