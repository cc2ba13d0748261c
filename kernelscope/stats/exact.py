"""Running sums of floats that are exact, so that no order of addition can change them.

A profile split into batches, resumed from a checkpoint or spread over processes adds the same
per-sequence values in a different order; float addition would round differently each time. Held
as integers in units of 2^-1100 (below the smallest float64, 2^-1074), the sums are exact and the
result, rounded once at the end, is the same however the work was divided.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

SCALE_BITS = 1100
_SCALE = 1 << SCALE_BITS
NBYTES = 320
"""Bytes per sum in :meth:`ExactSum.to_tensor`: room for 2^1024 · 2^1100 · 2^400 terms, signed."""


def _as_int(value: float) -> int:
    if not math.isfinite(value):
        raise ValueError(f"cannot add {value} to an exact sum")
    num, den = value.as_integer_ratio()  # den is a power of two, at most 2^1074
    return num * (_SCALE // den)


class ExactSum:
    """``n`` exact running sums of float64 values."""

    def __init__(self, n: int) -> None:
        self.totals = [0] * n

    def add(self, values: torch.Tensor | Iterable[Iterable[float]]) -> ExactSum:
        """Add every value of row ``i`` of ``values (n, m)`` to sum ``i``."""
        rows = values.double().cpu().tolist() if isinstance(values, torch.Tensor) else values
        rows = list(rows)
        if len(rows) != len(self.totals):
            raise ValueError(f"expected {len(self.totals)} rows of values, got {len(rows)}")
        for i, row in enumerate(rows):
            self.totals[i] += sum(_as_int(float(v)) for v in row)
        return self

    def merge(self, other: ExactSum) -> ExactSum:
        if len(other.totals) != len(self.totals):
            raise ValueError("cannot merge exact sums of different lengths")
        self.totals = [a + b for a, b in zip(self.totals, other.totals, strict=True)]
        return self

    def values(self) -> list[float]:
        """Each sum, correctly rounded to the nearest float64."""
        return [total / _SCALE for total in self.totals]

    def to_tensor(self) -> torch.Tensor:
        """``(n, NBYTES)`` uint8: the sums as bytes, for checkpoints that hold only tensors."""
        if not self.totals:  # no configuration (a profile of deployment targets alone)
            return torch.zeros((0, NBYTES), dtype=torch.uint8)
        raw = b"".join(total.to_bytes(NBYTES, "little", signed=True) for total in self.totals)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(len(self.totals), NBYTES)

    @classmethod
    def from_tensor(cls, data: torch.Tensor) -> ExactSum:
        """The inverse of :meth:`to_tensor`."""
        if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != NBYTES:
            raise ValueError("not an exact-sum tensor")
        out = cls(data.shape[0])
        out.totals = [int.from_bytes(bytes(row.tolist()), "little", signed=True) for row in data.cpu()]
        return out
