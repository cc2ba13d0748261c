"""The per-element part of the kernel statistics, in as few passes over an activation as possible.

Everything a profile learns from an activation ``x (B, T, I)`` itself, rather than from its t and c
vectors, comes from two functions: :func:`ranges` (t and c: one reading of ``x``) and :func:`count`
(for every configuration at once: kernel elements, elements whose step is below the per-token
step, non-finite elements: one more reading). On CPU both are compiled with ``torch.compile``, which
fuses each into a single loop with no (B, T, I) temporary; elsewhere, or where compiling is not
possible, the very same functions run eagerly. The two give identical integers: every operation
in them is exactly rounded (absolute value, comparison, one multiply and one divide of the
separable step, multiplication by 0.5), so fusing cannot change a count.

The kernel test is ``|x| <= 0.5·Δ``. For a step Δ >= STEP_FLOOR this is the same set, bit for bit,
as ``round(x / Δ) == 0`` (see :func:`kernelscope.quant.kernel_mask`): 0.5·Δ is exact, and any float
above it gives a quotient past the midpoint between 0.5 and the next float, so it rounds up.

Set ``KERNELSCOPE_COMPILE=0`` to run eagerly everywhere.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kernelscope.quant import ActivationRanges, abs_in_stat_dtype, separable_step

log = logging.getLogger(__name__)

_INT32_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Term:
    """How one configuration's step is formed, and what it is compared against.

    Either ``step``, broadcastable to ``(B, T, I)`` (per-token ``(B, T, 1)``, per-channel
    ``(B, 1, I)``, per-tensor ``(B, 1, 1)``), or the separable factors ``row (B, T, 1)``,
    ``col (B, 1, I)`` and ``qmax`` with Δ = separable_step(row, col, qmax). ``per_token`` is the
    per-token step at the same bit width, for counting the elements whose step is smaller; None for
    per-token itself.
    """

    step: torch.Tensor | None = None
    row: torch.Tensor | None = None
    col: torch.Tensor | None = None
    qmax: int | None = None
    per_token: torch.Tensor | None = None

    @property
    def separable(self) -> bool:
        return self.step is None


def _ranges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ax = abs_in_stat_dtype(x)  # (B, T, I)
    ax = torch.where(ax < math.inf, ax, 0.0)  # NaN and ±Inf fail `<`: measured as 0
    return ax.amax(dim=-1, keepdim=True), ax.amax(dim=-2, keepdim=True)  # (B, T, 1), (B, 1, I)


@functools.cache
def _make_counter(layout: tuple[tuple[bool, bool], ...], count_dtype: torch.dtype) -> Callable:
    """A counting function for one layout: per term, (separable?, has a per-token step?)."""

    def counter(x: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ax = abs_in_stat_dtype(x)  # (B, T, I)
        args = iter(tensors)
        kernel, below = [], []
        for separable, has_per_token in layout:
            if separable:
                row, col, qmax = next(args), next(args), next(args)
                step = separable_step(row, col, qmax)  # (B, T, I)
            else:
                step = next(args)  # broadcastable to (B, T, I)
            kernel.append((ax <= 0.5 * step).sum(dtype=count_dtype))  # NaN and Inf are never in it
            if has_per_token:
                smaller = torch.lt(step, next(args)).expand_as(ax)  # (B, T, I)
                below.append(smaller.sum(dtype=count_dtype))
            else:
                below.append(torch.zeros((), dtype=count_dtype, device=x.device))
        nonfinite = torch.logical_not(ax < math.inf).sum(dtype=count_dtype)
        return torch.stack(kernel).long(), torch.stack(below).long(), nonfinite.long()

    return counter


class _Backend:
    """Compiled versions of the two passes, built on first use; eager where compiling fails."""

    def __init__(self) -> None:
        self._compiled: dict[object, Callable] = {}
        self.failure: str | None = None

    @property
    def wanted(self) -> bool:
        return os.environ.get("KERNELSCOPE_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")

    def enabled(self, device: torch.device) -> bool:
        return device.type == "cpu" and self.failure is None and self.wanted

    def describe(self, device: torch.device | str = "cpu") -> str:
        """``compiled`` or ``eager`` (with the reason), as recorded in a run's summary."""
        device = torch.device(device)
        if self.enabled(device):
            return "compiled"
        if not self.wanted:
            return "eager (KERNELSCOPE_COMPILE=0)"
        if self.failure is not None:
            return f"eager (torch.compile failed: {self.failure})"
        return f"eager ({device.type})"

    def run(self, key: object, make: Callable[[], Callable], *args: torch.Tensor):
        fn = make()
        if not self.enabled(args[0].device):
            return fn(*args)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = torch.compile(fn, dynamic=True)
        try:
            return compiled(*args)
        except Exception as exc:  # no C++ compiler, an unsupported platform: same maths, eagerly
            lines = str(exc).strip().splitlines()
            self.failure = f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
            log.warning("kernelscope: statistics run eagerly; torch.compile failed (%s)", self.failure)
            return fn(*args)


BACKEND = _Backend()


def ranges(x: torch.Tensor) -> ActivationRanges:
    """t ``(B, T, 1)`` and c ``(B, 1, I)`` of ``x (B, T, I)`` with NaN and ±Inf measured as 0."""
    return ActivationRanges(*BACKEND.run("ranges", lambda: _ranges, x))


def count(x: torch.Tensor, terms: Sequence[Term]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kernel (C,), below_per_token (C,), nonfinite ())`` int64 counts over ``x (B, T, I)``.

    ``kernel``: finite elements with ``|x| <= 0.5·Δ``; ``below_per_token``: positions whose step is
    smaller than the per-token step (0 for terms without one); ``nonfinite``: NaN and ±Inf elements.
    """
    layout = tuple((t.separable, t.per_token is not None) for t in terms)
    count_dtype = torch.int32 if x.numel() <= _INT32_LIMIT else torch.int64
    tensors: list[torch.Tensor] = []
    for t in terms:
        if t.separable:
            tensors += [t.row, t.col, _constant(float(t.qmax), t.row.dtype, t.row.device)]
        else:
            tensors.append(t.step)
        if t.per_token is not None:
            tensors.append(t.per_token)
    key = ("count", layout, count_dtype)
    return BACKEND.run(key, lambda: _make_counter(layout, count_dtype), x, *tensors)


@functools.cache
def _constant(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-d tensor, made once: as a tensor (not a Python number) it does not specialise the compiled
    function, so INT8 and INT4 share one compilation."""
    return torch.tensor(value, dtype=dtype, device=device)
