"""Bootstrap intervals over windows, against a naive resampling loop written here, and the per-window
NLLs they are computed from."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kernelscope.data import make_windows
from kernelscope.runs.evaluate import evaluate, run_scheme
from kernelscope.runs.schemes import Scheme, parse_scheme
from kernelscope.runs.sweep import alpha_sweep
from kernelscope.runs.threshold import threshold_search
from kernelscope.stats import uncertainty as U
from tests.conftest import tiny_model

REL = 1e-12  # float64 sums in another order


def window_values(n: int, seed: int = 0, mean: float = 3.0, sd: float = 0.3) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return (mean + sd * torch.randn(n, generator=g, dtype=torch.float64)).tolist()


def naive_means(values: list[float], indices: torch.Tensor) -> list[float]:
    """For each resample, the plain mean of the resampled windows' values."""
    return [sum(values[i] for i in row) / len(row) for row in indices.tolist()]


def naive_interval(samples: list[float]) -> tuple[float, float]:
    lo, hi = np.percentile(np.array(samples), [2.5, 97.5])
    return float(lo), float(hi)


def test_indices_are_seeded_uniform_draws_with_replacement():
    a, b = U.resample_indices(7), U.resample_indices(7)
    assert a.shape == (U.RESAMPLES, 7) and torch.equal(a, b)
    assert not torch.equal(a, U.resample_indices(7, seed=1))
    assert int(a.min()) == 0 and int(a.max()) == 6
    counts = torch.bincount(a.reshape(-1), minlength=7).double() / a.numel()
    assert torch.allclose(counts, torch.full((7,), 1 / 7, dtype=torch.float64), atol=0.01)


def test_percentile_interval_is_numpys_linear_percentile():
    samples = torch.tensor(window_values(101, seed=3))
    assert U.percentile_interval(samples) == pytest.approx(naive_interval(samples.tolist()), rel=1e-15)
    assert U.percentile_interval(torch.tensor([1.0, 2.0]), 0.5) == pytest.approx((1.25, 1.75))


def test_perplexity_interval_equals_a_naive_resampling_loop():
    values = window_values(9)
    idx = U.resample_indices(len(values))
    expected = naive_interval([math.exp(m) for m in naive_means(values, idx)])
    assert U.perplexity_interval(values, indices=idx) == pytest.approx(expected, rel=REL)
    assert U.perplexity_interval(values) == pytest.approx(expected, rel=REL)  # same default seed
    lo, hi = expected
    assert lo < math.exp(sum(values) / len(values)) < hi


def test_paired_difference_equals_a_naive_resampling_loop():
    a, b = window_values(12, seed=1), window_values(12, seed=2)
    idx = U.resample_indices(12)
    diffs = naive_means([x - y for x, y in zip(a, b, strict=True)], idx)
    d = U.paired_difference(a, b, indices=idx)
    assert d.delta == pytest.approx(sum(a) / 12 - sum(b) / 12, rel=REL)
    assert (d.delta_low, d.delta_high) == pytest.approx(naive_interval(diffs), rel=REL)
    pct = naive_interval([100 * (math.exp(x) - 1) for x in diffs])
    assert (d.change_pct_low, d.change_pct_high) == pytest.approx(pct, rel=REL)
    assert d.change_pct == pytest.approx(100 * math.expm1(d.delta), rel=REL)


def test_pairing_cancels_what_the_windows_share():
    """Two schemes whose windows move together differ by a constant: the paired interval is that
    constant to rounding, far narrower than either perplexity's interval."""
    base = window_values(16, seed=4, sd=1.0)
    shifted = [x + 0.01 for x in base]
    d = U.paired_difference(shifted, base)
    assert d.delta_low == pytest.approx(0.01, abs=1e-12) and d.delta_high == pytest.approx(0.01, abs=1e-12)
    assert d.verdict == "worse than fp" and d.separable
    lo, hi = U.perplexity_interval(base)
    assert hi - lo > 100 * (d.delta_high - d.delta_low + 1e-9)


def test_identical_schemes_give_exactly_zero():
    a = window_values(8, seed=5)
    d = U.paired_difference(a, list(a))
    assert (d.delta, d.delta_low, d.delta_high, d.change_pct) == (0.0, 0.0, 0.0, 0.0)
    assert d.verdict == "not separable from fp" and not d.separable


@pytest.mark.parametrize(("low", "high", "word"), [
    (0.0, 1.0, "not separable from fp"), (-1.0, 0.0, "not separable from fp"), (1e-12, 1.0, "worse than fp"),
    (-1.0, -1e-12, "better than fp"), (None, None, "not separable from fp (no interval)"),
    (math.nan, 1.0, "not separable from fp")])
def test_verdict_at_its_edges(low, high, word):
    assert U.verdict(low, high) == word


def test_one_window_has_no_interval():
    assert U.perplexity_interval([3.0]) is None
    d = U.paired_difference([3.1], [3.0])
    assert d.delta == pytest.approx(0.1) and d.delta_low is None and "no interval" in d.verdict
    assert U.within_probabilities([[3.0]], [3.0], 0.01) is None
    assert U.crossing_interval([[3.0]], [0.1], [3.0], 0.01) is None


def test_the_interval_shrinks_as_windows_grow():
    widths = []
    for n in (4, 16, 64, 256):
        lo, hi = U.perplexity_interval(window_values(n, seed=n))
        widths.append(hi - lo)
    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0] / 4


def test_within_probability_and_crossing_equal_a_naive_loop():
    fp = window_values(10, seed=6)
    curve = [[x + shift + 0.004 * j for j, x in enumerate(fp)] for shift in (0.0, 0.005, 0.01, 0.02)]
    fractions = [0.1, 0.2, 0.3, 0.4]
    idx = U.resample_indices(10)
    ref = [math.exp(m) for m in naive_means(fp, idx)]
    within = [[math.exp(m) <= r * 1.01 for m, r in zip(naive_means(c, idx), ref, strict=True)] for c in curve]
    probs = U.within_probabilities(curve, fp, 0.01, indices=idx)
    assert probs == pytest.approx([sum(w) / len(w) for w in within], abs=0)
    thresholds = []
    for b in range(idx.shape[0]):
        t = 0.0
        for f, w in zip(fractions, within, strict=True):
            if not w[b]:
                break
            t = f
        thresholds.append(t)
    got = U.crossing_interval(curve, fractions, fp, 0.01, bracket=(1, 2), indices=idx)
    assert (got.low, got.high) == pytest.approx(naive_interval(thresholds), abs=0)
    held = [within[1][b] and not within[2][b] for b in range(idx.shape[0])]
    assert got.bracket_probability == sum(held) / len(held)


def test_ratio_interval_equals_a_naive_loop_and_is_undefined_without_a_loss():
    fp = window_values(10, seed=7)
    den = [x + 0.05 + 0.01 * math.sin(i) for i, x in enumerate(fp)]
    num = [x + 0.02 + 0.01 * math.cos(i) for i, x in enumerate(fp)]
    idx = U.resample_indices(10)
    n = naive_means([a - f for a, f in zip(num, fp, strict=True)], idx)
    d = naive_means([a - f for a, f in zip(den, fp, strict=True)], idx)
    share, ci = U.ratio_interval(num, den, fp, indices=idx)
    assert share == pytest.approx((sum(num) - sum(fp)) / (sum(den) - sum(fp)), rel=1e-9)
    assert ci == pytest.approx(naive_interval([a / b for a, b in zip(n, d, strict=True)]), rel=1e-9)
    assert U.ratio_interval(num, fp, fp) is None  # no loss to explain


# -- per-window NLLs from the model ------------------------------------------------------------------

def windows_for(n: int = 3, seqlen: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return make_windows(torch.randint(1, 500, (n * seqlen,), generator=g), seqlen, n)


def test_window_nll_equals_a_loop_over_windows_written_here():
    model, windows = tiny_model("llama"), windows_for(4)
    row = run_scheme(model, windows, Scheme("fp", "fp"), [], batch_size=3)
    with torch.no_grad():
        naive = [torch.nn.functional.cross_entropy(model(input_ids=w[None]).logits[0, :-1].double(),
                                                   w[1:]).item()
                 for w in windows.tokens]
    assert row["window_nll"] == pytest.approx(naive, rel=1e-6)
    assert row["nll"] == pytest.approx(sum(naive) / 4, rel=1e-6)
    lo, hi = row["perplexity_ci_low"], row["perplexity_ci_high"]
    assert (lo, hi) == pytest.approx(U.perplexity_interval(row["window_nll"]), rel=1e-12)


def test_eval_rows_carry_windows_intervals_and_a_paired_verdict(tmp_path):
    model, windows = tiny_model("llama"), windows_for(3)
    schemes = [parse_scheme("fp"), Scheme("fp, again", "fp"), parse_scheme("w4a4-per-token")]
    result = evaluate(model, windows, schemes)
    fp, again, w4 = result.summary["results"]
    assert fp["vs_fp"] is None and fp["delta_nll"] is None
    assert again["window_nll"] == fp["window_nll"]
    assert (again["delta_nll"], again["delta_nll_ci_low"], again["delta_nll_ci_high"]) == (0.0, 0.0, 0.0)
    assert again["vs_fp"] == "not separable from fp"
    d = U.paired_difference(w4["window_nll"], fp["window_nll"], delta=w4["nll"] - fp["nll"])
    assert (w4["delta_nll"], w4["change_pct_ci_low"], w4["vs_fp"]) == (d.delta, d.change_pct_low, d.verdict)
    saved = result.save(tmp_path / "ev")
    import polars as pl

    table = pl.read_parquet(saved / "eval.parquet")
    assert table["window_nll"].to_list()[2] == w4["window_nll"] and "perplexity_ci_low" in table.columns


def test_sweep_and_threshold_rows_carry_intervals():
    model, windows = tiny_model("llama"), windows_for(3)
    sweep = alpha_sweep(model, windows, [0.15, 1.0])
    fp, a, _ = sweep.summary["results"]
    assert fp["vs_fp"] is None and a["perplexity_ci_low"] < a["perplexity"] < a["perplexity_ci_high"]
    assert a["vs_fp"] in ("not separable from fp", "worse than fp", "better than fp")
    assert len(sweep.table["window_nll"][0]) == 3
    th = threshold_search(model, windows, tolerance=0.01, steps=1)
    (search,) = th.summary["searches"]
    for point in search["curve"]:
        assert 0.0 <= point["within_probability"] <= 1.0
    u = search["crossing_uncertainty"]
    assert u is not None and 0.0 <= u["kernel_fraction_ci_low"] <= u["kernel_fraction_ci_high"] <= 1.0
