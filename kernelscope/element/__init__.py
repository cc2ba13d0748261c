"""The per-element work on an activation ``x (B, T, I)``, for any
:class:`~kernelscope.quant.formats.Format`: the statistics a profile reads off ``x`` itself, and
``x`` fake-quantized or with its kernel removed. The one place that decides which code runs.

Statistics: :func:`ranges` (t and c, one reading of ``x``) and :func:`count` (for every configuration
of a :class:`Plan` at once, in one more reading: the kernel, the elements on a subnormal code, the
positions whose step is below the per-token step, the blocks that are kernel through and through,
the non-finite elements, and for block formats the zero bound's extremes, sums and histogram), with
:func:`histogram` for zero bounds summarised later. Treatments: :func:`fake_quantize` and
:func:`remove_kernel`, each with how many elements went to zero.

Two backends compute the same integers and the same tensors bit for bit: the torch code of
:mod:`kernelscope.element.reference`, which is the definition, and the C loops of
:mod:`kernelscope.element.native` (built when the package is installed). The C code runs where it
can: on CPU, for float32 and bfloat16 inputs, where a library was built and loads, and unless
``KERNELSCOPE_NATIVE=0``; the torch code everywhere else. :func:`describe` says which, and why.

The C code compares ``|x|`` with the largest float ``k`` whose quotient ``k / s`` still rounds to at
most τ, which is ``τ · s`` itself whenever that product is a normal float (τ is a power of two, so
the product is exact, and the next float above it divides to more than half an ulp above τ).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence

import torch

from kernelscope.element import native, reference
from kernelscope.element.plan import COUNTS, Binning, Counted, Plan, empty_counted, factors, fields, slots_of
from kernelscope.quant import ActivationRanges, QuantizerConfig, crossquant_factors
from kernelscope.quant import formats as F

__all__ = ["COUNTS", "Binning", "Counted", "Plan", "count", "describe", "empty_counted", "factors",
           "fake_quantize", "fields", "histogram", "make_plan", "prepare", "ranges", "remove_kernel"]


def _wanted() -> bool:
    return os.environ.get("KERNELSCOPE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _library() -> ctypes.CDLL | None:
    """The C library where it is to run (wanted, built, loaded), else None."""
    return native.library() if _wanted() else None


def _native_input(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as the C loops take it (contiguous float32 or bfloat16 on CPU), or None where the torch
    code is to run on it: the backend decision, made here only."""
    if x.device.type != "cpu" or x.dtype not in native.DTYPES or _library() is None:
        return None
    return x.contiguous()


def describe(device: torch.device | str = "cpu") -> str:
    """Which code computes the per-element work on ``device``, as a run's summary records it."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"torch ({device.type})"
    if not _wanted():
        return "torch (KERNELSCOPE_NATIVE=0)"
    if native.library() is None:
        return f"torch (native library unavailable: {native.failure})"
    return f"native ({native.built_with}, {torch.get_num_threads()} threads)"


def prepare(x: torch.Tensor) -> torch.Tensor:
    """``x`` as both passes read it fastest: where the C loops run, a float16 (or other non-native
    float) input is widened to float32 here, once, rather than left to the torch code."""
    narrow = x.dtype.is_floating_point and x.dtype not in native.DTYPES
    if narrow and x.device.type == "cpu" and _library() is not None:
        return x.float()  # statistics are float32 anyway
    return x


def make_plan(configs: Sequence[QuantizerConfig], binning: Binning) -> Plan:
    """The plan for ``configs``, whose block formats' zero bounds are binned by ``binning``; its C
    part only where the C count runs and takes that many configurations."""
    configs = tuple(configs)
    slots = slots_of(configs)
    part = None
    if _library() is not None and len(configs) <= native.MAX_TERMS:
        part = native.CountPlan([c.format for c in configs], list(slots), binning.edges)
    return Plan(configs, slots, binning, part)


def ranges(x: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None) -> ActivationRanges:
    """t ``(B, T, 1)`` and c ``(B, 1, I)`` of ``x (B, T, I)``, float32, NaN and ±Inf measured as 0.

    ``out``: two float32 tensors of those shapes to write them into (on ``x``'s device).
    """
    nx = _native_input(x)
    if nx is not None:
        return ActivationRanges(*native.ranges(native.library(), nx, out))
    t, c = reference.ranges(x)
    if out is None:
        return ActivationRanges(t, c)
    out[0].copy_(t)
    out[1].copy_(c)
    return ActivationRanges(*out)


def count(x: torch.Tensor, ranges: ActivationRanges, plan: Plan,
          pairs: list[tuple[torch.Tensor, torch.Tensor] | None], out: Counted | None = None) -> Counted:
    """The counts of :class:`Counted` over ``x (B, T, I)`` whose t and c are ``ranges`` (as
    :func:`ranges` measured them), for the configurations of ``plan``; ``pairs`` are the separable
    ones' factors (:func:`factors`). Written into ``out`` when given."""
    nx = _native_input(x)
    if nx is None or plan.native is None:
        result = reference.count(x, ranges, plan, pairs)
        if out is None:
            return result
        for dst, src in zip(fields(out), fields(result), strict=True):
            dst.copy_(src)
        return out
    if out is None:
        out = empty_counted(plan, x.shape[0])
    batch, seq, width = x.shape  # the C code reads full vectors: broadcast ones are made full first
    rows = [None if p is None else p[0].expand(batch, seq, 1).contiguous() for p in pairs]  # read as (B, T)
    cols = [None if p is None else p[1].expand(batch, 1, width).contiguous() for p in pairs]  # read as (B, I)
    plan.native.run(native.library(), nx, ranges.token.contiguous(), ranges.channel.contiguous(), rows, cols,
                    fields(out))
    return out


@functools.cache
def _bin_table(binning: Binning) -> torch.Tensor:
    return native.bin_table(binning.edges.double())


def histogram(values: torch.Tensor, weight: int, groups: int, *, binning: Binning) -> torch.Tensor:
    """``binning.counts(values, weight, groups=groups)`` of non-negative zero bounds: the same counts,
    from the C code's bin table where it runs (one reading instead of a float64 search)."""
    nv = _native_input(values) if values.dtype == torch.float32 else None
    if nv is None:
        return binning.counts(values, weight, groups=groups)
    return native.histogram(native.library(), nv, groups, weight, binning.edges, _bin_table(binning))


def _treat(x: torch.Tensor, fmt: F.Format, mode: int,
           limit: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The C code's treatment of ``x`` (``mode`` of :mod:`~kernelscope.element.native`), or None
    where the torch code is to run."""
    nx = _native_input(x)
    if nx is None:
        return None
    pair = crossquant_factors(nx.float(), fmt.alpha) if fmt.layout is F.Unit.CROSSQUANT else None
    return native.quantize(native.library(), nx, fmt, mode, limit, pair)


def fake_quantize(x: torch.Tensor, fmt: F.Format) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (B, T, I)`` quantized and dequantized by ``fmt``, as
    :func:`kernelscope.quant.formats.fake_quantize` defines it (a new tensor of ``x``'s dtype), and
    how many elements went to zero (an int64 tensor on ``x``'s device)."""
    done = _treat(x, fmt, native.QUANTIZE, 0.0)  # no limit: every element is rounded
    return reference.fake_quantize(x, fmt) if done is None else done


def remove_kernel(x: torch.Tensor, fmt: F.Format, kernel_scale: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (B, T, I)`` with only its kernel at ``kernel_scale`` times the zero bound set to zero and
    every other element as it was, as :func:`kernelscope.quant.formats.remove_kernel` defines it (a
    new tensor), and how many elements were zeroed."""
    done = _treat(x, fmt, native.REMOVE_KERNEL, F.kernel_limit(fmt, kernel_scale))
    return reference.remove_kernel(x, fmt, kernel_scale) if done is None else done
