"""A fixed log-spaced histogram: exact counts, approximate quantiles, trivially mergeable."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

_SPECTRUM_ELEMENTS = 1 << 17
"""How many spectrum values :meth:`LogHistogram.counts_of_sums` holds at once (2 MiB of complex128).
With its inputs and products the transform holds several times that, which, on short windows, is
more than the forward pass itself frees and takes; smaller chunks were no slower."""


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

    @cached_property
    def edges(self) -> torch.Tensor:
        """The ``bins - 1`` interior bin edges ``10**(low + k / per_decade)``, float64: bin ``k`` holds
        the values in ``[edge_k, edge_(k+1))``. The one definition of the binning; the native
        statistics search the same edges."""
        k = torch.arange(1, self.bins, dtype=torch.float64)
        return torch.pow(10.0, self.low + k / self.per_decade)

    def bin_of(self, values: torch.Tensor) -> torch.Tensor:
        """The bin of each positive value (below the range: the first, above: the last), int64."""
        edges = self.edges.to(values.device)
        return torch.searchsorted(edges, values.to(torch.float64).contiguous(), right=True)

    @property
    def relative_resolution(self) -> float:
        """Width of one bin as a ratio of its edges minus one (0.0233 for 100 bins a decade)."""
        return 10 ** (1 / self.per_decade) - 1

    def counts(self, values: torch.Tensor, weight: int | torch.Tensor = 1,
               groups: int | None = None) -> torch.Tensor:
        """int64 counts of positive ``values``, each standing for ``weight`` items (one number, or an
        integer tensor shaped like ``values``): ``(bins,)``, or with ``groups``, ``(groups, bins)``
        counting each of that many equal leading slices apart."""
        bins = self.bin_of(values.reshape(groups or 1, -1))  # (G, n)
        if isinstance(weight, torch.Tensor):
            counts = _bincount_rows(bins, self.bins, weight.reshape(bins.shape).double()).round().long()
        else:
            counts = _bincount_rows(bins, self.bins)
            counts = counts * weight if weight != 1 else counts  # (G, bins)
        return counts[0] if groups is None else counts

    def counts_of_sums(
        self, row: torch.Tensor, col: torch.Tensor, lowest: float, shifts: Sequence[float] = (0.0,),
        groups: int = 1, fine: int = 16,
    ) -> torch.Tensor:
        """int64 counts ``(groups, len(shifts), bins)`` of ``10**max(row_i + col_j + shift, lowest)``
        over every pair (i, j) of each sequence, for each shift, each group of sequences apart.

        ``row (S, T, 1)`` and ``col (S, 1, I)`` hold log10 parts, float64 (-inf allowed: such a pair
        sits at ``lowest``), for S sequences in ``groups`` equal consecutive groups (the layers of a
        batch). Instead of T·I logarithms or sums, each vector is binned on a grid ``fine`` times
        finer than the histogram's and the two binnings are convolved (by FFT, exact in integers):
        O(T + I + L log L) for a grid of L points, shared by every shift (CrossQuant at several bit
        widths differs only by -log10 qmax). A value within 1/``fine`` of a bin's width of an edge
        may land in the neighbouring bin, far below the histogram's stated resolution.
        """
        seqs = row.shape[0]
        unit = self.per_decade * fine  # grid points per decade
        first = math.floor((lowest - self.low) * self.per_decade)  # the bin the floor falls in
        r = row.reshape(seqs, -1)  # (S, T)
        k = col.reshape(seqs, -1)  # (S, I)
        out = torch.zeros(groups, len(shifts), self.bins, dtype=torch.int64, device=row.device)
        r_top, k_top = float(r.max()), float(k.max())
        if not (math.isfinite(r_top) and math.isfinite(k_top)):  # every row or every column is zero
            out[:, :, first] = r.shape[1] * k.shape[1] * (seqs // groups)
            return out
        # A pair below the floor lands in the first bin whatever its exact value, so each vector can
        # be clamped just below (floor minus the other vector's maximum) without changing a count.
        under = lowest - max(shifts) - 1.0 / self.per_decade
        r = (r - self.low).clamp_(min=under - self.low - k_top)
        k = k.clamp(min=under - r_top)
        r_grid = torch.floor(r * unit).long()  # (S, T): grid points at or below
        k_grid = torch.floor(k * unit).long()  # (S, I)
        r0, k0 = int(r_grid.min()), int(k_grid.min())
        lr, lk = int(r_grid.max()) - r0 + 1, int(k_grid.max()) - k0 + 1
        n = lr + lk - 1
        size = 1 << (n - 1).bit_length()
        # r_grid + k_grid <= true sum < r_grid + k_grid + 2: the middle, + 1, is the estimate.
        grid = torch.arange(n, device=row.device, dtype=torch.float64) + (r0 + k0 + 1)  # (n,)
        bins = [torch.floor((grid + shift * unit) / fine).long().clamp_(first, self.bins - 1)
                for shift in shifts]
        # A few groups at a time, so that the spectra (size/2 + 1 complex numbers a sequence) stay small.
        per_group = seqs // groups
        step = max(1, _SPECTRUM_ELEMENTS // (per_group * size))
        for g in range(0, groups, step):
            rows = slice(g * per_group, min(g + step, groups) * per_group)
            hr = _bincount_rows(r_grid[rows] - r0, lr).double()  # (s, Lr)
            hk = _bincount_rows(k_grid[rows] - k0, lk).double()  # (s, Lk)
            spectrum = torch.fft.rfft(hr, size) * torch.fft.rfft(hk, size)  # (s, size/2 + 1)
            spectrum = spectrum.reshape(-1, per_group, spectrum.shape[-1]).sum(dim=1)  # (g, size/2 + 1)
            pairs = torch.fft.irfft(spectrum, size)[:, :n].round_()  # (g, n): pairs at grid point r0 + k0 + s
            for i, b in enumerate(bins):
                out[g : g + pairs.shape[0], i] = _bincount_rows(b.expand(pairs.shape[0], -1), self.bins,
                                                                pairs).round_().long()
        return out

    def quantile(self, counts: torch.Tensor, q: float, lo: float, hi: float) -> float:
        """The ``q``-quantile of the counted values, kept inside the exact observed ``[lo, hi]``."""
        return self.quantiles(counts.reshape(1, -1), [q], [lo], [hi])[0][0]

    def quantiles(self, counts: torch.Tensor, qs: Sequence[float], lo: Sequence[float],
                  hi: Sequence[float]) -> list[list[float]]:
        """For each row of ``counts (R, bins)``, its ``qs``-quantiles kept inside ``[lo[r], hi[r]]``
        (NaN for an empty row): ``R`` lists of ``len(qs)`` floats, computed together."""
        counts = counts.detach().to(torch.float64).cpu().numpy()  # (R, bins)
        cum = np.cumsum(counts, axis=1)  # (R, bins); exact: integer counts below 2**53
        total = cum[:, -1:]  # (R, 1)
        targets = np.asarray(qs, dtype=np.float64)[None, :] * total  # (R, Q)
        # Per row, the first bin whose running count reaches the target (a search in each row).
        b = np.minimum((cum[:, None, :] < targets[:, :, None]).sum(axis=-1), self.bins - 1)  # (R, Q)
        before = np.where(b > 0, np.take_along_axis(cum, np.maximum(b - 1, 0), axis=1), 0.0)  # (R, Q)
        inside = np.take_along_axis(counts, b, axis=1)  # (R, Q)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(inside == 0, 0.0, np.clip((targets - before) / inside, 0.0, 1.0))
        values = 10.0 ** (self.low + (b + frac) / self.per_decade)  # (R, Q)
        lo_, hi_ = (np.asarray(v, dtype=np.float64).reshape(-1, 1) for v in (lo, hi))  # (R, 1)
        values = np.minimum(np.maximum(values, lo_), hi_)
        values[total[:, 0] == 0] = math.nan
        return values.tolist()


def _bincount_rows(index: torch.Tensor, width: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of ``index (G, n)`` (integers in ``[0, width)``), the counts (or summed ``weights
    (G, n)``) of each integer: ``(G, width)``. Added into a tensor of that size, not by ``bincount``,
    whose output size depends on the data: on a GPU it would wait for the largest index to come back."""
    rows = index.shape[0]
    flat = (index + torch.arange(rows, device=index.device).unsqueeze(1) * width).reshape(-1)  # (G * n,)
    added = torch.ones_like(flat) if weights is None else weights.reshape(-1)  # (G * n,)
    counts = torch.zeros(rows * width, dtype=added.dtype, device=index.device)  # (G * width,)
    return counts.index_add_(0, flat, added).view(rows, width)


HISTOGRAM = LogHistogram()
"""The histogram every zero-bound distribution is binned into."""
