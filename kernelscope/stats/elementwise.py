"""The per-element part of the kernel statistics, in as few passes over an activation as possible.

Everything a profile learns from an activation ``x (B, T, I)`` itself, rather than from its t and c
vectors, comes from two functions: :func:`ranges` (t and c: one reading of ``x``) and :func:`count`
(for every configuration at once: kernel elements, elements whose step is below the per-token
step, non-finite elements: one more reading). On CPU, for float32 and bfloat16 inputs, both run as
small C loops (:mod:`kernelscope.stats.native`, built once per machine); elsewhere, or where no C
compiler is found, the torch code below computes the same integers. Every operation in either is
exactly rounded (absolute value, comparison, one multiply and one divide of the separable step,
multiplication by 0.5) and done in the same order, so the two cannot differ; a test checks it at
ties.

The kernel test is ``|x| <= 0.5·Δ``. For a step Δ >= STEP_FLOOR this is the same set, bit for bit,
as ``round(x / Δ) == 0`` (see :func:`kernelscope.quant.kernel_mask`): 0.5·Δ is exact, and any float
above it gives a quotient past the midpoint between 0.5 and the next float, so it rounds up.

Set ``KERNELSCOPE_NATIVE=0`` to run the torch code everywhere.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernelscope.quant import ActivationRanges, abs_in_stat_dtype, per_token_step, qmax_for_bits, separable_step
from kernelscope.stats import native

_INT32_LIMIT = 2**31 - 1

Outputs = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Term:
    """How one configuration's step is formed, and whether it is compared with the per-token step.

    One of three forms: ``token_bits``, the per-token step at that width (formed from t by whichever
    code counts, so that it costs no tensor of its own); ``step``, broadcastable to ``(B, T, I)``
    (per-token ``(B, T, 1)``, per-channel ``(B, 1, I)``, per-tensor ``(B, 1, 1)``); or the separable
    factors ``row (B, T, 1)``, ``col (B, 1, I)`` and ``qmax`` with Δ = separable_step(row, col, qmax).
    ``below_bits``: count the positions whose step is smaller than the per-token step at that width;
    None for no count (per-token itself).
    """

    token_bits: int | None = None
    step: torch.Tensor | None = None
    row: torch.Tensor | None = None
    col: torch.Tensor | None = None
    qmax: int | None = None
    below_bits: int | None = None

    @property
    def separable(self) -> bool:
        return self.row is not None


def _ranges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ax = abs_in_stat_dtype(x)  # (B, T, I)
    ax = torch.where(ax < math.inf, ax, 0.0)  # NaN and ±Inf fail `<`: measured as 0
    return ax.amax(dim=-1, keepdim=True), ax.amax(dim=-2, keepdim=True)  # (B, T, 1), (B, 1, I)


def _count(x: torch.Tensor, ranges: ActivationRanges, terms: Sequence[Term]) -> Outputs:
    ax = abs_in_stat_dtype(x)  # (B, T, I)
    finite = ax < math.inf
    count_dtype = torch.int32 if x.numel() <= _INT32_LIMIT else torch.int64
    ax = torch.where(finite, ax, math.nan)  # no comparison admits a NaN: non-finite is never in a kernel
    per_token: dict[int, torch.Tensor] = {}  # bits -> (B, T, 1)

    def token_step(bits: int) -> torch.Tensor:
        if bits not in per_token:
            per_token[bits] = per_token_step(ranges, bits)
        return per_token[bits]

    kernel, below = [], []
    for t in terms:
        if t.token_bits is not None:
            step = token_step(t.token_bits)
        else:
            step = separable_step(t.row, t.col, t.qmax) if t.separable else t.step  # broadcastable to (B, T, I)
        kernel.append((ax <= 0.5 * step).sum(dtype=count_dtype))
        if t.below_bits is not None:
            below.append(torch.lt(step, token_step(t.below_bits)).expand_as(ax).sum(dtype=count_dtype))  # (B, T, I)
        else:
            below.append(torch.zeros((), dtype=count_dtype, device=x.device))
    nonfinite = torch.logical_not(finite).sum(dtype=count_dtype)
    return torch.stack(kernel).long(), torch.stack(below).long(), nonfinite.long()


def _wanted() -> bool:
    return os.environ.get("KERNELSCOPE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _native_input(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as the C loops take it (contiguous float32 or bfloat16 on CPU), or None for torch code."""
    if x.device.type != "cpu" or x.dtype not in native.DTYPES or not _wanted() or native.library() is None:
        return None
    return x.contiguous()


def prepare(x: torch.Tensor) -> torch.Tensor:
    """``x`` as both passes read it fastest: where the C loops run, a float16 (or other narrow float)
    input is widened to float32 here, once, rather than left to the torch code."""
    narrow = x.dtype.is_floating_point and x.dtype not in native.DTYPES and x.dtype != torch.float64
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
        return f"torch (native build failed: {native.failure})"
    return f"native ({native.built_with}, {torch.get_num_threads()} threads)"


def ranges(x: torch.Tensor, out: Outputs | None = None) -> ActivationRanges:
    """t ``(B, T, 1)`` and c ``(B, 1, I)`` of ``x (B, T, I)`` with NaN and ±Inf measured as 0.

    ``out``: two tensors of those shapes to write them into (stats dtype, on ``x``'s device).
    """
    nx = _native_input(x)
    if nx is None:
        return ActivationRanges(*_into(_ranges(x), out))
    return ActivationRanges(*native.ranges(native.library(), nx, out))


def count(x: torch.Tensor, ranges: ActivationRanges, terms: Sequence[Term], out: Outputs | None = None,
          plan: native.CountPlan | None = None) -> Outputs:
    """``(kernel (C,), below_per_token (C,), nonfinite ())`` int64 counts over ``x (B, T, I)`` whose
    t and c are ``ranges`` (as :func:`ranges` measured them).

    ``kernel``: finite elements with ``|x| <= 0.5·Δ``; ``below_per_token``: positions whose step is
    smaller than the per-token step (0 for terms without ``below_bits``); ``nonfinite``: NaN and ±Inf
    elements. ``out``: three int64 tensors of those shapes to write them into. ``plan``: what
    :func:`fixed_plan` made for terms of these forms, which spares this call from making it again.
    """
    nx = _native_input(x)
    token = ranges.token
    batch, seq, width = x.shape
    if plan is not None and nx is not None:
        rows = [t.row if t.separable else None for t in terms]  # (B, T, 1) each: the C code reads (B, T)
        cols = [t.col if t.separable else None for t in terms]  # (B, 1, I) each: read as (B, I)
        # The C code reads each vector's memory whole: only full contiguous float32 vectors go as they are.
        sized = [(token, batch * seq), *((v, batch * seq) for v in rows), *((v, batch * width) for v in cols)]
        if all(v is None or _whole(v, size) for v, size in sized):
            return plan.run(native.library(), nx, token, rows, cols, out)
    vectors = None if nx is None or token.dtype != torch.float32 else [_vector(t) for t in terms]
    if vectors is None or None in vectors or len(terms) > native.MAX_TERMS:
        return _into(_count(x, ranges, terms), out)

    def flat(v: torch.Tensor | None) -> torch.Tensor | None:
        return None if v is None else _flat(v, batch, seq, width)

    kinds, first, second, qmax = zip(*vectors, strict=True)
    return native.count(native.library(), nx, flat(token), list(kinds), [flat(v) for v in first],
                        [flat(v) for v in second], list(qmax), _below_qmax(terms), out)


def fixed_plan(terms: Sequence[Term]) -> native.CountPlan | None:
    """The fixed part of the C count for terms whose form does not depend on the data (per-token
    steps and separable steps whose factors are full contiguous vectors), to pass to :func:`count`
    for every later batch of terms of the same forms; None where the C count cannot take them so."""
    if not terms or len(terms) > native.MAX_TERMS or not all(t.token_bits is not None or t.separable for t in terms):
        return None
    vectors = [_vector(t) for t in terms]
    if None in vectors:
        return None
    kinds, _, _, qmax = zip(*vectors, strict=True)
    return native.CountPlan(list(kinds), list(qmax), _below_qmax(terms))


def _whole(v: torch.Tensor, size: int) -> bool:
    """Whether the C code can read ``v`` as it is: contiguous float32 holding ``size`` elements."""
    return v.is_contiguous() and v.dtype == torch.float32 and v.numel() == size


def _below_qmax(terms: Sequence[Term]) -> list[float]:
    """Each term's per-token width as the C count takes it: its qmax, or 0 for no below count."""
    return [0.0 if t.below_bits is None else float(qmax_for_bits(t.below_bits)) for t in terms]


def _into(results: Outputs, out: Outputs | None) -> Outputs:
    if out is None:
        return results
    for dst, src in zip(out, results, strict=True):
        dst.copy_(src)
    return out


def _vector(t: Term) -> tuple[int, torch.Tensor | None, torch.Tensor | None, float] | None:
    """A term as the C loops take it: (kind, first vector, second vector, qmax), the vectors without
    their broadcast; None if the C loops cannot take it."""
    if t.token_bits is not None:
        return native.TOKEN, None, None, float(qmax_for_bits(t.token_bits))
    if t.separable:
        kind, first, second, qmax = native.SEP, _unbroadcast(t.row), _unbroadcast(t.col), float(t.qmax)
    else:
        first, second, qmax = _unbroadcast(t.step), None, 0.0
        kind = native.COL if first.shape[-1] != 1 else native.ROW
    vectors = [v for v in (first, second) if v is not None]
    if any(v.dtype != torch.float32 or v.shape[-1] != 1 and v.shape[-2] != 1 for v in vectors):
        return None
    return kind, first, second, qmax


def _unbroadcast(v: torch.Tensor) -> torch.Tensor:
    """An expanded vector (stride 0 along T or I) back to its ``(..., T|1, 1)`` or ``(..., 1, I|1)``."""
    if v.shape[-1] > 1 and v.stride(-1) == 0:
        v = v[..., :1]
    if v.shape[-2] > 1 and v.stride(-2) == 0:
        v = v[..., :1, :]
    return v


def _flat(v: torch.Tensor, batch: int, seq: int, width: int) -> torch.Tensor:
    """A step vector ``(B|1, T|1, 1)`` or ``(B|1, 1, I)`` as contiguous rows ``(B, T)`` or columns
    ``(B, I)`` (the C code reads only its memory, so a full contiguous vector is passed as it is)."""
    rows = v.shape[-1] == 1
    if _whole(v, batch * (seq if rows else width)):  # float32: _vector took only float32 vectors
        return v
    if rows:
        return v.expand(batch, seq, 1).reshape(batch, seq).contiguous()  # (B, T)
    return v.expand(batch, 1, width).reshape(batch, width).contiguous()  # (B, I)
