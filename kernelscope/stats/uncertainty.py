"""How sure a perplexity is: percentile bootstrap intervals over evaluation windows.

A perplexity run yields one mean NLL per window, ``m_w`` (every window predicts the same number of
tokens, ``seqlen - 1``, so the run's mean NLL is the mean of the ``m_w``). The windows are the unit
of resampling: tokens inside one window are strongly correlated, windows far apart in the text much
less, so resampling windows (not tokens) is what keeps the interval honest.

Method (Efron's percentile bootstrap, with a fixed seed so that a result is reproducible):

1. draw ``B`` resamples of the ``W`` window indices with replacement (:func:`resample_indices`);
2. for each resample b, the statistic on the resampled windows: ``exp(mean_b m)`` for a perplexity,
   ``mean_b (m_a - m_fp)`` for a paired difference (the same indices for both schemes, so the
   variation the windows share cancels);
3. the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the B values
   (linear interpolation between order statistics, numpy's default).

A difference whose interval contains 0 is *not separable* from the reference on these windows: it
is reported as that, never as a loss or a gain. With a single window there is nothing to resample
and every interval is None.

Everything is vectorised over the resamples: ``B × W`` float64 values, microseconds next to a
forward pass. Pure functions of tensors; no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RESAMPLES = 2000
"""Bootstrap resamples B: the Monte-Carlo error of a 95% percentile bound is then well below the
interval's own width."""
SEED = 0
"""Seed of the resampling generator: the same windows give the same interval, run after run."""
LEVEL = 0.95
METHOD = (f"95% percentile bootstrap over windows ({RESAMPLES} resamples of the windows with "
          f"replacement, seed {SEED}); differences paired on the same resampled windows")


def resample_indices(windows: int, resamples: int = RESAMPLES, seed: int = SEED) -> torch.Tensor:
    """``(resamples, windows)`` int64 window indices drawn uniformly with replacement."""
    if windows < 1 or resamples < 1:
        raise ValueError(f"need at least one window and one resample, got {windows} and {resamples}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(windows, (resamples, windows), generator=gen)  # (B, W)


def resampled_means(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Mean of ``values (..., W)`` over each resample's windows: ``(..., B)`` float64."""
    v = values.to(torch.float64)
    return v[..., indices].mean(dim=-1)  # (..., B, W) -> (..., B)


def percentile_interval(samples: torch.Tensor, level: float = LEVEL) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of ``samples (B,)`` (linear)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(samples.to(torch.float64), q).tolist()
    return lo, hi


def _as_tensor(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64).reshape(-1)


def _indices(n: int, indices: torch.Tensor | None) -> torch.Tensor | None:
    """The resampling indices for ``n`` windows, or None when one window leaves nothing to resample."""
    if n < 2:
        return None
    if indices is None:
        return resample_indices(n)
    if indices.shape[-1] != n:
        raise ValueError(f"indices resample {indices.shape[-1]} windows, the values have {n}")
    return indices


def _exp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x.clamp(max=700.0))  # exp(700) ~ 1e304: a broken model is infinite, not NaN


def perplexity_interval(window_nll, *, indices: torch.Tensor | None = None,
                        level: float = LEVEL) -> tuple[float, float] | None:
    """Bootstrap interval of ``exp(mean NLL)`` from the per-window mean NLLs ``(W,)``; None for one
    window. NaN anywhere gives a NaN interval (the run's perplexity is no measurement then)."""
    m = _as_tensor(window_nll)
    idx = _indices(m.numel(), indices)
    if idx is None:
        return None
    return percentile_interval(_exp(resampled_means(m, idx)), level)


@dataclass(frozen=True)
class Difference:
    """A paired difference of scheme ``a`` from reference ``b`` on the same windows.

    ``delta`` is ``mean NLL_a - mean NLL_b`` = the difference in log perplexity; ``change_pct`` is
    ``100 · (exp(delta) - 1)``, the relative perplexity change. Each has its bootstrap interval
    (None with one window). ``verdict`` says, in words, whether the interval separates it from 0.
    """

    delta: float
    delta_low: float | None
    delta_high: float | None
    change_pct: float
    change_pct_low: float | None
    change_pct_high: float | None
    verdict: str

    @property
    def separable(self) -> bool:
        return self.verdict.startswith(("worse", "better"))

    def as_dict(self, prefix: str = "") -> dict:
        names = ("delta_nll", "delta_nll_ci_low", "delta_nll_ci_high", "change_pct", "change_pct_ci_low",
                 "change_pct_ci_high")
        values = (self.delta, self.delta_low, self.delta_high, self.change_pct, self.change_pct_low,
                  self.change_pct_high)
        return ({prefix + k: v for k, v in zip(names, values, strict=True)}
                | {prefix + "verdict": self.verdict})


def verdict(low: float | None, high: float | None, reference: str = "fp") -> str:
    """``worse than fp`` / ``better than fp`` when the interval lies wholly above / below 0, else
    ``not separable from fp`` (also with no interval, or a NaN one)."""
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return (f"not separable from {reference} (no interval)" if low is None
                else f"not separable from {reference}")
    if low > 0:
        return f"worse than {reference}"
    if high < 0:
        return f"better than {reference}"
    return f"not separable from {reference}"


def _pct(delta: torch.Tensor | float) -> torch.Tensor | float:
    if isinstance(delta, torch.Tensor):
        return 100.0 * torch.expm1(delta.clamp(max=700.0))
    return 100.0 * math.expm1(min(delta, 700.0))


def paired_difference(window_nll_a, window_nll_b, *, indices: torch.Tensor | None = None,
                      level: float = LEVEL, reference: str = "fp",
                      delta: float | None = None) -> Difference:
    """Scheme ``a`` against reference ``b`` on the same windows (per-window mean NLLs, ``(W,)`` each).

    ``delta`` is the point estimate (default: the mean of the per-window differences; a caller with
    the exact totals passes ``nll_a - nll_b``). Identical inputs give exactly 0 and a [0, 0] interval.
    """
    a, b = _as_tensor(window_nll_a), _as_tensor(window_nll_b)
    if a.shape != b.shape:
        raise ValueError(f"paired windows differ in number: {a.numel()} and {b.numel()}")
    d = a - b  # (W,)
    point = float(d.mean()) if delta is None else float(delta)
    idx = _indices(d.numel(), indices)
    if idx is None:
        return Difference(point, None, None, _pct(point), None, None, verdict(None, None, reference))
    samples = resampled_means(d, idx)  # (B,)
    lo, hi = percentile_interval(samples, level)
    plo, phi = percentile_interval(_pct(samples), level)
    return Difference(point, lo, hi, _pct(point), plo, phi, verdict(lo, hi, reference))


def _within(curve: torch.Tensor, reference: torch.Tensor, tolerance: float,
            idx: torch.Tensor) -> torch.Tensor:
    """``(P, B)`` bool: point p within tolerance of the reference on resample b."""
    ppl = _exp(resampled_means(curve, idx))  # (P, B)
    ref = _exp(resampled_means(reference, idx))  # (B,)
    return ppl <= ref * (1 + tolerance)


def within_probabilities(curve_nll, reference_nll, tolerance: float, *,
                         indices: torch.Tensor | None = None) -> list[float] | None:
    """For each row of ``curve_nll (P, W)``, the share of resamples in which ``exp(mean NLL) <= (1 +
    tolerance) · exp(mean reference NLL)``, both on the same resampled windows: how often the
    within-tolerance decision comes out the same way as it may on other windows of the same text.
    None for one window."""
    curve = torch.as_tensor(curve_nll, dtype=torch.float64)
    ref = _as_tensor(reference_nll)
    idx = _indices(ref.numel(), indices)
    if idx is None:
        return None
    return _within(curve, ref, tolerance, idx).double().mean(dim=-1).tolist()


@dataclass(frozen=True)
class CrossingUncertainty:
    """How the located threshold moves when the windows are resampled.

    The threshold rule is applied to every resample: walking the evaluated points in order of
    kernel fraction, the threshold is the kernel fraction of the last point within tolerance before
    the first one beyond it (0 when the first point is already beyond, the largest fraction when none
    is). ``low``/``high`` is the percentile interval of that threshold, on the grid of evaluated
    points (the points themselves are not moved); ``bracket_probability`` the share of resamples in
    which the observed bracket holds (its lower point within, its upper point beyond).
    """

    low: float
    high: float
    bracket_probability: float | None
    resamples: int

    def as_dict(self) -> dict:
        return {"kernel_fraction_ci_low": self.low, "kernel_fraction_ci_high": self.high,
                "bracket_probability": self.bracket_probability, "resamples": self.resamples}


def crossing_interval(curve_nll, fractions, reference_nll, tolerance: float, *,
                      bracket: tuple[int | None, int | None] = (None, None),
                      indices: torch.Tensor | None = None,
                      level: float = LEVEL) -> CrossingUncertainty | None:
    """Resampled threshold of a curve: ``curve_nll (P, W)`` per-window NLLs of P points sorted by
    kernel fraction ``fractions (P,)``; ``bracket`` the rows of the observed bracket (within,
    beyond; None where absent). None for one window or an empty curve."""
    curve = torch.as_tensor(curve_nll, dtype=torch.float64)
    frac = _as_tensor(fractions)
    ref = _as_tensor(reference_nll)
    idx = _indices(ref.numel(), indices)
    if idx is None or curve.shape[0] == 0:
        return None
    within = _within(curve, ref, tolerance, idx)  # (P, B)
    beyond = ~within
    first_beyond = torch.where(beyond.any(dim=0), beyond.double().argmax(dim=0), curve.shape[0])  # (B,)
    padded = torch.cat([torch.zeros(1, dtype=torch.float64), frac])  # threshold 0 before the first point
    threshold = padded[first_beyond]  # (B,): fraction of the point before the first beyond
    lo, hi = percentile_interval(threshold, level)
    inside, outside = bracket
    holds = torch.ones(idx.shape[0], dtype=torch.bool)
    if inside is not None:
        holds &= within[inside]
    if outside is not None:
        holds &= beyond[outside]
    p = float(holds.double().mean()) if inside is not None or outside is not None else None
    return CrossingUncertainty(lo, hi, p, idx.shape[0])


def ratio_interval(numerator_nll, denominator_nll, reference_nll, *, indices: torch.Tensor | None = None,
                   level: float = LEVEL) -> tuple[float, tuple[float, float] | None] | None:
    """The share ``(NLL_num - NLL_ref) / (NLL_den - NLL_ref)`` of two losses on the same windows
    (e.g. how much of a scheme's loss removing its kernel alone causes), and its paired bootstrap
    interval. None when the denominator's own interval does not separate it from 0 (the share is
    then undefined); the interval is None with one window."""
    num = _as_tensor(numerator_nll) - _as_tensor(reference_nll)
    den = _as_tensor(denominator_nll) - _as_tensor(reference_nll)
    point_den = float(den.mean())
    idx = _indices(den.numel(), indices)
    if idx is None:
        return (float(num.mean()) / point_den, None) if point_den > 0 else None
    den_b = resampled_means(den, idx)  # (B,)
    lo, _ = percentile_interval(den_b, level)
    if not lo > 0:
        return None
    return float(num.mean()) / point_den, percentile_interval(resampled_means(num, idx) / den_b, level)
