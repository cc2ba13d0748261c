"""What must be read off one batch of one layer's input while it exists (:func:`measure`): t, c and
the per-element counts of every configuration. Everything else follows from t and c (or, for block
formats, from the bound figures counted with the elements), so it is summarised after the forward
pass, for the inputs of many layers at once (:mod:`kernelscope.stats.summary`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernelscope import element
from kernelscope.element import Counted, Plan
from kernelscope.quant import QuantizerConfig, as_sequences
from kernelscope.stats.arena import Arena
from kernelscope.stats.histogram import HISTOGRAM


@dataclass
class Measured:
    """t, c and the counts of one batch of one layer's input."""

    token: torch.Tensor  # (B, T, 1) t_i, NaN and ±Inf measured as 0
    channel: torch.Tensor  # (B, 1, I) c_j
    counted: Counted
    token_offset: int


_PLANS: dict[tuple[QuantizerConfig, ...], Plan] = {}
"""Per list of configurations, how it is counted: a profile measures the same configurations some
hundred times a forward pass."""


def plan_for(configs: Sequence[QuantizerConfig]) -> Plan:
    """The (cached) :class:`~kernelscope.element.Plan` of ``configs``, its block formats' zero bounds
    binned by :data:`~kernelscope.stats.histogram.HISTOGRAM`."""
    key = tuple(configs)
    if key not in _PLANS:
        if len(_PLANS) >= 64:
            _PLANS.clear()
        _PLANS[key] = element.make_plan(key, HISTOGRAM)
    return _PLANS[key]


def measure(
    x: torch.Tensor, configs: Sequence[QuantizerConfig], *, token_offset: int = 0, seq_len: int | None = None,
    arena: Arena | None = None,
) -> Measured:
    """The per-element part of the statistics of ``x (..., T, I)``; ``x`` is neither kept nor changed.

    ``token_offset`` is the global index of the batch's first token; ``seq_len`` splits a flattened
    ``(B·T, I)`` input into its sequences. NaN and ±Inf are counted, measured as zeros for t, c and
    block maxima, and left out of every count. With an ``arena`` the returned tensors live in its block.
    """
    x = element.prepare(as_sequences(x, seq_len))  # (B, T, I)
    batch, seq, width = x.shape
    if batch * seq >= 2**31:
        raise ValueError("one batch holds too many tokens; use a smaller batch size")
    plan = plan_for(configs)
    if arena is None:
        ranges = element.ranges(x)
        out = None
    else:
        ranges = element.ranges(x, (arena.empty((batch, seq, 1), torch.float32),
                                    arena.empty((batch, 1, width), torch.float32)))
        out = element.empty_counted(plan, batch, alloc=arena.empty)
    counted = element.count(x, ranges, plan, element.factors(ranges, plan), out)
    return Measured(ranges.token, ranges.channel, counted, token_offset)


def measured_nbytes(batch: int, seq: int, width: int, configs: Sequence[QuantizerConfig]) -> int:
    """An upper bound of the bytes :func:`measure` keeps in its arena for an input ``(batch, seq,
    width)`` (t, c and the counts, each aligned), for sizing an :class:`~kernelscope.stats.arena.Arena`."""
    blocks = sum(c.format.is_block for c in configs)
    counts = (len(configs) * len(element.COUNTS) + 1) * 8
    return (batch * (seq + width) * 4 + counts + blocks * ((2 + batch) + HISTOGRAM.bins) * 8 + 6 * 64)
