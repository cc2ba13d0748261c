"""What one batch of one layer's input leaves behind once reduced (:class:`Observation`), and how
two such states add up: counts and histograms summed, extremes by maximum and minimum, top tokens
merged. Every accumulator and the cross-process merge read the field lists declared here."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

SUMMED = ("tokens", "elements", "nonfinite", "kernel", "subnormal", "below_per_token", "kernel_blocks",
          "blocks", "bound_hist", "c_ge_t")
MAXIMA = ("bound_max", "abs_max", "channel_max")
MINIMA = ("bound_min",)
"""How two accumulated states combine, field by field (top tokens and bound sums aside)."""


@dataclass
class Observation:
    """One batch of one layer's input, reduced. Fields with a config axis have length C.

    A stacked observation (:func:`kernelscope.stats.summary.summarise_groups`) holds several layers
    at once: every field gains a leading layer axis, and :meth:`layer` takes one layer's out (as
    views).
    """

    tokens: torch.Tensor  # () int64: rows (tokens) seen
    elements: torch.Tensor  # () int64: positions (B·T·I), finite or not
    nonfinite: torch.Tensor  # () int64: NaN or ±Inf elements, left out of the kernel counts
    kernel: torch.Tensor  # (C,) int64
    subnormal: torch.Tensor  # (C,) int64: elements on a non-zero subnormal code (float grids)
    below_per_token: torch.Tensor  # (C,) int64: elements whose bound < the per-token bound
    kernel_blocks: torch.Tensor  # (C,) int64: blocks whose every element is in the kernel
    blocks: torch.Tensor  # (C,) int64: blocks (0 for formats without blocks)
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


STATE_FIELDS = tuple(f.name for f in fields(Observation) if f.name != "bound_sum")
"""The fields an accumulator's state keeps as tensors (the bound sums are held apart, exactly)."""


def copy(obs: Observation) -> Observation:
    return Observation(**{f.name: getattr(obs, f.name).clone() for f in fields(obs)})


def top_k(values: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest values with their indices along the last axis (each row apart); ties go to
    the smaller index, so the choice does not depend on how the values were split into batches or
    processes."""
    order = torch.argsort(index, dim=-1, stable=True)
    values, index = values.gather(-1, order), index.gather(-1, order)
    order = torch.argsort(values, dim=-1, descending=True, stable=True)[..., :k]
    return values.gather(-1, order), index.gather(-1, order)


def fold(s: Observation, obs: Observation, k: int) -> bool:
    """Add ``obs`` to the state ``s`` (one layer, or stacked layers: the top tokens along the last
    axis). In place where the shapes allow, so the state keeps its memory from one batch to the next;
    False when the top tokens grew (fewer than ``k`` seen so far) and are new tensors in ``s``."""
    if s.channel_max.shape != obs.channel_max.shape:
        raise ValueError("cannot merge statistics of layers with different widths")
    for name in SUMMED:
        getattr(s, name).add_(getattr(obs, name))
    for name in MAXIMA:
        torch.maximum(getattr(s, name), getattr(obs, name), out=getattr(s, name))
    for name in MINIMA:
        torch.minimum(getattr(s, name), getattr(obs, name), out=getattr(s, name))
    values, index = top_k(torch.cat([s.top_values, obs.top_values], dim=-1),
                          torch.cat([s.top_index, obs.top_index], dim=-1), k)
    if values.shape == s.top_values.shape:
        s.top_values.copy_(values)
        s.top_index.copy_(index)
        return True
    s.top_values, s.top_index = values, index
    return False
