"""A fixed log-spaced histogram: exact counts, approximate quantiles, trivially mergeable."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogHistogram:
    """Bins of equal width in log10 between ``10**low`` and ``10**high``.

    Values below the range count in the first bin and values above in the last (clamped, never
    dropped), so counts always add up to the number of values. Quantiles are read by log-linear
    interpolation inside a bin; with 100 bins a decade their relative error is below 2.33%.
    """

    low: float = -8.0
    high: float = 6.0
    per_decade: int = 100

    @property
    def bins(self) -> int:
        return round((self.high - self.low) * self.per_decade)

    @property
    def relative_resolution(self) -> float:
        """Width of one bin as a ratio of its edges minus one (0.0233 for 100 bins a decade)."""
        return 10 ** (1 / self.per_decade) - 1

    def counts(self, values: torch.Tensor, weight: int = 1) -> torch.Tensor:
        """int64 counts ``(bins,)`` of positive ``values``; each value stands for ``weight`` items."""
        idx = torch.log10(values.reshape(-1)).sub_(self.low).mul_(self.per_decade)  # (n,)
        return self._tally(idx, 0.0, weight)

    def counts_of_sums(self, row: torch.Tensor, col: torch.Tensor, lowest: float, weight: int = 1) -> torch.Tensor:
        """int64 counts of the values ``10**max(row_i + col_j, lowest)``, from their log10 parts.

        ``row (..., T, 1)`` and ``col (..., 1, I)`` broadcast to the full matrix; one add replaces a
        logarithm per element. A value within float rounding of a bin edge may land in the bin next
        to the one ``counts`` would choose, which is below the histogram's stated resolution.
        """
        shift = (row - self.low) * self.per_decade  # (..., T, 1), float64
        idx = torch.add(shift.float(), (col * self.per_decade).float())  # (..., T, I)
        return self._tally(idx.reshape(-1), (lowest - self.low) * self.per_decade, weight)

    def _tally(self, idx: torch.Tensor, first: float, weight: int) -> torch.Tensor:
        """Counts of fractional bin positions ``idx (n,)``, clamped to ``[first, bins)``; NaN goes to ``first``."""
        bins = idx.nan_to_num_(nan=first).clamp_(min=first, max=self.bins - 1).floor_().int()
        counts = torch.bincount(bins, minlength=self.bins)
        return counts * weight if weight != 1 else counts

    def quantile(self, counts: torch.Tensor, q: float, lo: float, hi: float) -> float:
        """The ``q``-quantile of the counted values, kept inside the exact observed ``[lo, hi]``."""
        counts = counts.to(torch.float64).cpu()
        total = float(counts.sum())
        if total == 0:
            return math.nan
        cum = torch.cumsum(counts, 0)
        target = q * total
        b = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)).item())
        b = min(b, self.bins - 1)
        before = float(cum[b - 1]) if b > 0 else 0.0
        inside = float(counts[b])
        frac = 0.0 if inside == 0 else min(max((target - before) / inside, 0.0), 1.0)
        value = 10 ** (self.low + (b + frac) / self.per_decade)
        return min(max(value, lo), hi)
