"""Streaming statistics: exact counts, mergeable, memory that does not grow with tokens."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from kernelscope import element
from kernelscope.element import reference
from kernelscope.quant import (
    STEP_FLOOR,
    ActivationRanges,
    QuantizerConfig,
    crossquant_factors,
    crossquant_step,
    default_configs,
    expand_configs,
    per_token_step,
    qmax_for_bits,
    separable_step,
)
from kernelscope.stats import HISTOGRAM, KernelStats, LogHistogram, observe
from kernelscope.stats.accumulator import KernelStatsGroup
from kernelscope.stats.exact import ExactSum
from kernelscope.stats.measure import measure, plan_for
from kernelscope.stats.summary import count_c_ge_t, separable_step_sums, summarise, summarise_groups
from kernelscope.stats.table import results
from tests import reference as ref


def result_of(stats: KernelStats) -> dict:
    """One layer's figures as plain values, as a profile's table reads them."""
    return results([stats])[0]

CONFIGS = [*default_configs(), QuantizerConfig("per_tensor", 8), QuantizerConfig("per_channel", 4)]


def activations(seed: int, shape=(3, 40, 24)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[-1])  # channels of many scales
    x[..., 5] *= 5000  # an outlier channel, well above the largest regular one
    return x


def test_counts_match_reference():
    x = activations(0)
    res = result_of(KernelStats(CONFIGS).update(observe(x, CONFIGS)))
    assert res["layer"]["elements"] == x.numel()
    assert res["layer"]["tokens"] == 3 * 40
    for cfg, row in zip(CONFIGS, res["configs"], strict=True):
        expect = ref.kernel_count(x, cfg.quantizer, cfg.bits, cfg.alpha)
        assert row["kernel_elements"] == expect, cfg.label
        assert row["kernel_fraction"] == expect / x.numel()
    assert res["layer"]["c_ge_t_pairs"] == ref.c_ge_t_pairs(x)
    assert res["layer"]["abs_max"] == x.abs().max().item()


def test_c_ge_t_by_sorting_equals_brute_force_with_ties():
    x = torch.tensor([[[1.0, 2.0, 2.0], [2.0, 0.5, 0.0], [0.0, 0.0, 0.0]]])  # t = (2, 2, 0), c = (2, 2, 2)
    t = x.abs().amax(-1, keepdim=True)
    c = x.abs().amax(-2, keepdim=True)
    assert int(count_c_ge_t(t, c.squeeze(-2).sort(dim=-1).values).sum()) == ref.c_ge_t_pairs(x) == 9


def test_streaming_equals_one_batch_and_merge_is_exact():
    xs = [activations(s) for s in range(4)]
    whole = KernelStats(CONFIGS).update(observe(torch.cat(xs), CONFIGS))
    streamed = KernelStats(CONFIGS)
    for i, x in enumerate(xs):
        streamed.update(observe(x, CONFIGS, token_offset=i * 3 * 40))
    left, right = KernelStats(CONFIGS), KernelStats(CONFIGS)
    for i, x in enumerate(xs):
        (left if i < 2 else right).update(observe(x, CONFIGS, token_offset=i * 3 * 40))
    merged = left.merge(right)
    a, b, c = result_of(whole), result_of(streamed), result_of(merged)
    for other in (b, c):
        assert other["layer"]["elements"] == a["layer"]["elements"]
        assert other["layer"]["c_ge_t_pairs"] == a["layer"]["c_ge_t_pairs"]
        assert other["layer"]["top_channels"] == a["layer"]["top_channels"]
        assert other["layer"]["top_token_index"] == a["layer"]["top_token_index"]
        for ra, ro in zip(a["configs"], other["configs"], strict=True):
            for key in ("kernel_elements", "bound_p50", "bound_p90", "bound_p99", "bound_min", "bound_max",
                        "bound_below_per_token_fraction"):
                assert ro[key] == ra[key], key
            assert ro["bound_mean"] == pytest.approx(ra["bound_mean"], rel=1e-12)


def test_bound_statistics_against_direct_computation():
    x = activations(7, (2, 64, 48))
    cq = QuantizerConfig("crossquant", 8, 0.15)
    pt = QuantizerConfig("per_token", 8)
    res = result_of(KernelStats([pt, cq]).update(observe(x, [pt, cq])))
    hist = LogHistogram()
    for cfg, row in zip((pt, cq), res["configs"], strict=True):
        bound = (cfg.format.tau * cfg.scale(x)).expand_as(x).reshape(-1).double()
        assert row["bound_mean"] == pytest.approx(bound.mean().item(), rel=1e-9)
        assert row["bound_min"] == bound.min().item() and row["bound_max"] == bound.max().item()
        for q in (0.5, 0.9, 0.99):
            exact = torch.quantile(bound, q, interpolation="lower").item()
            got = row[f"bound_p{round(q * 100)}"]
            assert abs(got / exact - 1) <= hist.relative_resolution + 1e-9, (cfg.label, q)
    below = (crossquant_step(x, 8, 0.15) < per_token_step(x, 8)).sum().item() / x.numel()
    assert res["configs"][1]["bound_below_per_token_fraction"] == below
    assert res["configs"][0]["bound_below_per_token_fraction"] is None


def test_top_channels_and_tokens():
    x = activations(3)
    res = result_of(KernelStats(CONFIGS, top_k=4).update(observe(x, CONFIGS, token_offset=1000)))["layer"]
    c = x.abs().amax(dim=(0, 1))
    assert res["top_channels"] == torch.topk(c, 4).indices.tolist()
    assert res["top_channels"][0] == 5
    t = x.abs().amax(-1).reshape(-1)
    top = torch.topk(t, 4)
    assert res["top_token_index"] == (top.indices + 1000).tolist()
    assert res["top_token_absmax"] == pytest.approx(top.values.tolist())


def test_state_size_does_not_grow_with_tokens():
    small, large = KernelStats(CONFIGS), KernelStats(CONFIGS)
    small.update(observe(activations(1, (1, 16, 24)), CONFIGS))  # at least top_k tokens
    for i in range(20):
        large.update(observe(activations(i, (2, 128, 24)), CONFIGS))

    def nbytes(acc):
        return sum(v.numel() * v.element_size() for v in vars(acc.state).values())

    assert nbytes(small) == nbytes(large)


def test_zero_rows_and_all_zero_input_give_finite_statistics():
    x = torch.zeros(2, 8, 6)
    x[0, 3] = torch.arange(6.0)
    res = result_of(KernelStats(CONFIGS).update(observe(x, CONFIGS)))
    for row in res["configs"]:
        for key, value in row.items():
            if isinstance(value, float):
                assert value == value, key  # no NaN
    assert res["layer"]["nonfinite_elements"] == 0


def test_two_dimensional_input_is_one_sequence():
    x = activations(2, (1, 16, 8))
    a = result_of(KernelStats(CONFIGS).update(observe(x[0], CONFIGS)))
    b = result_of(KernelStats(CONFIGS).update(observe(x, CONFIGS)))
    assert a == b


def test_merge_refuses_different_configs():
    a = KernelStats(CONFIGS[:2]).update(observe(activations(0), CONFIGS[:2]))
    b = KernelStats(CONFIGS[:3]).update(observe(activations(0), CONFIGS[:3]))
    with pytest.raises(ValueError):
        a.merge(b)


def test_nan_and_inf_are_counted_and_never_poison_statistics():
    x = activations(11, (2, 16, 8))
    clean = x.clone()
    x[0, 3, 2] = float("nan")
    x[1, 5, 0] = float("inf")
    x[1, 6, 7] = float("-inf")
    res = result_of(KernelStats(CONFIGS).update(observe(x, CONFIGS)))
    assert res["layer"]["nonfinite_elements"] == 3
    assert res["layer"]["elements"] == x.numel() - 3
    # the statistics are those of the finite elements, with the bad ones measured as zeros
    zeroed = clean.clone()
    zeroed[0, 3, 2] = zeroed[1, 5, 0] = zeroed[1, 6, 7] = 0.0
    for cfg, row in zip(CONFIGS, res["configs"], strict=True):
        assert row["kernel_elements"] == ref.kernel_count(zeroed, cfg.quantizer, cfg.bits, cfg.alpha) - 3
        for key, value in row.items():
            if isinstance(value, float):
                assert value == value and abs(value) != float("inf"), (cfg.label, key)
    assert all(v == v for v in (res["layer"]["abs_max"], res["layer"]["c_ge_t_fraction"]))


def test_denormal_activations_are_measured_exactly():
    x = activations(12, (1, 16, 8)) * 1e-39  # far below float32's smallest normal number
    assert (x[x != 0].abs() < 1.18e-38).any()
    res = result_of(KernelStats(CONFIGS).update(observe(x, CONFIGS)))
    for cfg, row in zip(CONFIGS, res["configs"], strict=True):
        # every step is floored at 1e-5, so all of these tiny values round to zero
        assert row["kernel_elements"] == ref.kernel_count(x, cfg.quantizer, cfg.bits, cfg.alpha) == x.numel()
        floor_bound = float(torch.tensor(1e-5, dtype=torch.float32) * 0.5)
        assert row["bound_min"] == row["bound_max"] == floor_bound


# --- the per-element passes (C and torch), exact sums, the separable histogram -----------------

needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="the native statistics need a C compiler"
)
EDGE_CONFIGS = CONFIGS + expand_configs(["per_channel", "per_tensor", "crossquant"], [8, 4], [0.0, 0.5, 1.0])


def edge_activations(nonfinite: bool = False) -> torch.Tensor:
    """Elements set to exactly half of their CrossQuant and per-token steps, and one ulp either side,
    plus a zero row, a zero channel and a -0.0; with ``nonfinite``, a NaN, a -Inf and an Inf too."""
    x = activations(21, (2, 48, 40))
    x[0, 7] = 0.0
    x[1, :, 11] = 0.0
    for bits in (8, 4):
        for step in (crossquant_step(x, bits, 0.15), per_token_step(x, bits).expand_as(x)):
            half = 0.5 * step
            g = torch.Generator().manual_seed(bits)
            pick = torch.rand(x.shape, generator=g) < 0.05
            pick &= x.abs() < 0.9 * x.abs().amax(-1, keepdim=True)  # leave t and c as they are
            pick &= x.abs() < 0.9 * x.abs().amax(-2, keepdim=True)
            nudge = torch.randint(-1, 2, x.shape, generator=g)  # one ulp down, none, one ulp up
            tie = torch.where(nudge < 0, torch.nextafter(half, torch.zeros_like(half)),
                              torch.where(nudge > 0, torch.nextafter(half, torch.full_like(half, 1e9)), half))
            x = torch.where(pick, torch.where(x < 0, -tie, tie), x)
    x[1, 9, 13] = -0.0
    if nonfinite:
        x[0, 3, 2], x[1, 5, 0], x[1, 6, 7] = float("nan"), float("-inf"), float("inf")
    return x


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_counts_equal_torch_and_reference_at_ties(monkeypatch, dtype):
    x = edge_activations(nonfinite=True).to(dtype)
    assert element.describe().startswith("native"), element.describe()
    native = result_of(KernelStats(EDGE_CONFIGS).update(observe(x, EDGE_CONFIGS)))
    monkeypatch.setenv("KERNELSCOPE_NATIVE", "0")
    assert element.describe() == "torch (KERNELSCOPE_NATIVE=0)"
    torch_code = result_of(KernelStats(EDGE_CONFIGS).update(observe(x, EDGE_CONFIGS)))
    assert native == torch_code
    assert native["layer"]["nonfinite_elements"] == 3
    clean = torch.where(x.float().isfinite(), x.float(), 0.0)
    for cfg, row in zip(EDGE_CONFIGS, native["configs"], strict=True):
        assert (row["kernel_elements"]
                == ref.kernel_count(clean, cfg.quantizer, cfg.bits, cfg.alpha) - 3), cfg.label


@needs_compiler
@pytest.mark.parametrize("labels", [
    ["crossquant a=0.15 int8"],  # no per-token term: the non-finite count runs alone
    ["crossquant a=0.15 int8", "crossquant a=0.15 int6", "crossquant a=0.15 int4"],
    ["per_token int4"],  # one per-token term: counted with the non-finite elements, its pair empty
    ["per_token int8", "per_token int6", "per_token int4", "crossquant a=0.5 int2", "per_channel int8"],
])
def test_native_counts_equal_reference_for_any_grouping_of_terms(monkeypatch, labels):
    """The C count takes the per-token terms two by two, with the non-finite elements; whatever
    the grouping, each term's counts are its own."""
    by_label = {c.label: c for c in expand_configs(["per_token", "per_channel", "crossquant"], [8, 6, 4, 2],
                                                   [0.15, 0.5])}
    configs = [by_label[label] for label in labels]
    x = edge_activations(nonfinite=True)
    native = result_of(KernelStats(configs).update(observe(x, configs)))
    monkeypatch.setenv("KERNELSCOPE_NATIVE", "0")
    assert native == result_of(KernelStats(configs).update(observe(x, configs)))
    clean = torch.where(x.isfinite(), x, 0.0)
    for cfg, row in zip(configs, native["configs"], strict=True):
        assert (row["kernel_elements"]
                == ref.kernel_count(clean, cfg.quantizer, cfg.bits, cfg.alpha) - 3), cfg.label
        if cfg.quantizer != "per_token":
            below = ref.below_per_token_count(clean, cfg.quantizer, cfg.bits, cfg.alpha)
            assert row["bound_below_per_token_fraction"] == below / x.numel(), cfg.label


@needs_compiler
@pytest.mark.parametrize("pair", [False, True])
def test_native_separable_counts_where_the_step_overflows(monkeypatch, pair):
    """Rows whose row · col reaches +Inf take the C code's capped path: a bound of +Inf admits every
    finite element and never an infinite one, as in the torch code; the other rows compare bounds."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn((2, 6, 40), generator=g) * 1e30
    x[0, 1, :4] = torch.tensor([float("inf"), float("-inf"), 3e38, -3.4e38])
    row = torch.logspace(-20, 20, 12).reshape(2, 6, 1)  # rows at 1e8 and above overflow against col's top
    col = torch.logspace(-40, 30, 80).reshape(2, 1, 40)
    x[1, 2, :] = 0.5 * separable_step(row, col, 7)[1, 2, :]  # exactly half a step: in the kernel
    configs = ([QuantizerConfig("crossquant", 8, 0.15)]
               + ([QuantizerConfig("crossquant", 4, 0.15)] if pair else []))
    plan = element.make_plan(configs, HISTOGRAM)
    assert plan.native is not None
    ranges = ActivationRanges(*reference.ranges(x))
    pairs = [(row, col)] * len(configs)
    got = element.count(x, ranges, plan, pairs)
    monkeypatch.setenv("KERNELSCOPE_NATIVE", "0")
    want = element.count(x, ranges, plan, pairs)
    assert torch.equal(got.counts, want.counts) and torch.equal(got.nonfinite, want.nonfinite)
    assert got.nonfinite == int(x.isinf().sum()) >= 2
    finite = torch.where(x.isfinite(), x.abs(), math.nan)
    for cfg, counts in zip(configs, got.counts, strict=True):
        step = separable_step(row, col, cfg.qmax)  # (2, 6, 40)
        assert torch.isinf(step).any()
        bound = torch.clamp_max(0.5 * step, torch.finfo(torch.float32).max)
        assert counts[0] == int((finite <= bound).sum())
        assert counts[2] == int((step < per_token_step(ranges, cfg.bits)).sum())  # t: non-finite as 0


ALL_FORMATS = expand_configs(["per_token", "crossquant", "per_tensor", "per_channel", "per_group",
                              "fp8_per_token", "fp8_per_tensor", "mxfp8", "mxfp4", "mxfp4_rceil", "nvfp4"],
                             [8, 4], [0.15, 0.0, 1.0], group_size=16)


def count_of(x: torch.Tensor, configs) -> element.Counted:
    plan = element.make_plan(configs, HISTOGRAM)
    ranges = element.ranges(x)
    return element.count(x, ranges, plan, element.factors(ranges, plan))


def assert_same_counts(a: element.Counted, b: element.Counted) -> None:
    assert torch.equal(a.counts, b.counts) and torch.equal(a.nonfinite, b.nonfinite)
    assert torch.equal(a.hist, b.hist) and torch.equal(a.bounds[:, :2], b.bounds[:, :2])
    assert torch.allclose(a.bounds[:, 2:], b.bounds[:, 2:], rtol=1e-12, atol=0)  # sums, added in other orders


@needs_compiler
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 17), (3, 5, 33), (2, 64, 16)])
def test_native_passes_equal_torch_on_odd_shapes(monkeypatch, shape):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[-1])
    x.view(-1)[::7] = float("nan")  # whole rows and channels may be NaN: measured as 0
    got = element.ranges(x), count_of(x, ALL_FORMATS)
    monkeypatch.setenv("KERNELSCOPE_NATIVE", "0")
    want = element.ranges(x), count_of(x, ALL_FORMATS)
    assert all(torch.equal(a, b) for a, b in zip(got[0], want[0], strict=True))
    assert_same_counts(got[1], want[1])


def test_more_configurations_than_the_native_code_takes_run_as_torch_code():
    from kernelscope.element import native

    x = activations(6, (2, 16, 24))
    repeat = native.MAX_TERMS // len(ALL_FORMATS) + 1
    many = ALL_FORMATS * repeat  # past the C code's limit
    assert len(many) > native.MAX_TERMS and element.make_plan(many, HISTOGRAM).native is None
    got, want = count_of(x, many), count_of(x, ALL_FORMATS)  # within the limit: the C code
    assert (torch.equal(got.counts, want.counts.repeat(repeat, 1))
            and torch.equal(got.nonfinite, want.nonfinite))
    assert torch.equal(got.hist, want.hist.repeat(repeat, 1))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cached_plan_counts_every_batch_alike(dtype):
    """measure builds the fixed part of the C count once per list of configurations; later batches
    of other shapes counted with it give what a fresh plan gives, and broadcast factors are made full
    before the C code reads them."""
    x = edge_activations(nonfinite=True).to(dtype)
    first = measure(x, ALL_FORMATS)
    assert plan_for(ALL_FORMATS) is plan_for(list(ALL_FORMATS))
    again = measure(x[:1, :20], ALL_FORMATS)  # another shape, the cached plan
    assert_same_counts(again.counted, count_of(x[:1, :20], ALL_FORMATS))
    assert int(first.counted.nonfinite) == 3
    plan = element.make_plan(ALL_FORMATS, HISTOGRAM)
    ranges = element.ranges(x)
    pairs = element.factors(ranges, plan)
    shared = [None if p is None else (p[0][:1], p[1]) for p in pairs]  # the first sequence's rows, broadcast
    full = [None if p is None else (p[0][:1].expand_as(p[0]), p[1]) for p in pairs]
    assert_same_counts(element.count(x, ranges, plan, shared), element.count(x, ranges, plan, full))


def test_without_the_native_library_the_torch_code_runs(monkeypatch, tmp_path):
    from kernelscope.element import native

    x = edge_activations(nonfinite=True)
    want = result_of(KernelStats(EDGE_CONFIGS).update(observe(x, EDGE_CONFIGS)))
    monkeypatch.setattr(native, "LIBRARY_DIR", tmp_path)  # as installed without a C compiler: none there
    native.reset()
    try:
        assert native.library() is None
        assert element.describe() == f"torch (native library unavailable: {native.failure})"
        assert native.failure.startswith("no native library for this CPU")
        assert result_of(KernelStats(EDGE_CONFIGS).update(observe(x, EDGE_CONFIGS))) == want
    finally:
        native.reset()


def test_summarising_many_layers_at_once_equals_one_at_a_time():
    xs = [activations(30 + i, (2, 40, 24)) for i in range(3)] + [activations(40, (2, 40, 16))]
    measured = [measure(x, CONFIGS, token_offset=80 * i) for i, x in enumerate(xs)]
    together = summarise(measured, CONFIGS, top_k=5)
    for i, x in enumerate(xs):
        alone = result_of(KernelStats(CONFIGS, top_k=5).update(observe(x, CONFIGS, token_offset=80 * i,
                                                                       top_k=5)))
        assert result_of(KernelStats(CONFIGS, top_k=5).update(together[i])) == alone


def test_a_group_updates_as_each_layer_alone(monkeypatch):
    monkeypatch.setattr(KernelStats, "_FLUSH", 3)  # the held bound sums fill up and are folded in mid-run
    layers, top_k = 3, 4
    batches = []
    for b, (batch, seq) in enumerate([(1, 2), (2, 5), (3, 5), (1, 5), (2, 5)]):  # 2 tokens: top-k still short
        xs = [activations(100 * b + j, (batch, seq, 24)) for j in range(layers)]
        xs[1][0, 0, :] = 0.0  # a zero row
        xs[2][-1, -1, 3] = math.nan
        batches.append(xs)
    alone = [KernelStats(CONFIGS, top_k) for _ in range(layers)]
    together = [KernelStats(CONFIGS, top_k) for _ in range(layers)]
    group = KernelStatsGroup(together)
    offset = 0
    for b, xs in enumerate(batches):
        measured = [measure(x, CONFIGS, token_offset=offset) for x in xs]
        offset += xs[0].shape[0] * xs[0].shape[1]
        for acc, obs in zip(alone, summarise(measured, CONFIGS, top_k), strict=True):
            acc.update(obs)
        [(members, stacked)] = summarise_groups(measured, CONFIGS, top_k)
        assert members == list(range(layers))
        group.update(stacked)
        if b == 2:  # one layer restored on its own leaves the group; the next update takes it back
            together[1].load_state_dict(together[1].state_dict())
            assert together[1]._group is None
        if b == 3:  # read mid-run, while the group holds sums
            assert result_of(together[0]) == result_of(alone[0])
    group.release()
    for mine, theirs in zip(together, alone, strict=True):
        assert result_of(mine) == result_of(theirs)
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(acc._group is None for acc in together)


def test_results_read_in_slices_equal_results_read_together(monkeypatch):
    accs = [KernelStats(CONFIGS).update(observe(activations(60 + i), CONFIGS)) for i in range(5)]
    together = results(accs)
    monkeypatch.setattr("kernelscope.stats.table._AT_ONCE", 2)
    assert results(accs) == together == [result_of(acc) for acc in accs]


def test_a_group_refuses_an_observation_of_other_layers():
    group = KernelStatsGroup([KernelStats(CONFIGS) for _ in range(2)])
    [(_, stacked)] = summarise_groups([measure(activations(1), CONFIGS)], CONFIGS)
    with pytest.raises(ValueError, match="2 layers"):
        group.update(stacked)


def test_top_tokens_break_ties_by_position():
    x = torch.zeros(2, 6, 4)
    x[0, 1, 0] = x[0, 4, 1] = x[1, 0, 2] = x[1, 5, 3] = 3.0  # four tokens with the same abs-max
    x[1, 2, 0] = 5.0
    whole = result_of(KernelStats(CONFIGS, top_k=3).update(observe(x, CONFIGS)))["layer"]
    assert whole["top_token_index"] == [8, 1, 4]  # 5.0 first, then the earliest of the ties
    split = KernelStats(CONFIGS, top_k=3)
    split.update(observe(x[1:], CONFIGS, token_offset=6)).update(observe(x[:1], CONFIGS))
    assert result_of(split)["layer"]["top_token_index"] == [8, 1, 4]


def test_exact_sums_do_not_depend_on_order():
    g = torch.Generator().manual_seed(5)
    values = (torch.randn(3, 500, generator=g, dtype=torch.float64)
              * 10.0 ** torch.randint(-12, 12, (3, 500), generator=g))
    forward = ExactSum(3).add(values)
    backward = ExactSum(3).add(values.flip(-1))
    halves = ExactSum(3).add(values[:, 250:]).merge(ExactSum(3).add(values[:, :250]))
    assert forward.values() == backward.values() == halves.values()
    assert forward.values() == [math.fsum(row) for row in values.tolist()]  # correctly rounded
    assert ExactSum.from_tensor(forward.to_tensor()).totals == forward.totals
    naive = [sum(row) for row in values.tolist()]
    assert naive != [sum(reversed(row)) for row in values.tolist()]  # float addition would differ


def test_separable_step_sums_against_float64_reference():
    # edge activations have steps at the floor (columns are searched); the other input has none
    wide = 1.0 + torch.rand(3, 40, 24, generator=torch.Generator().manual_seed(4))
    for x, floored in ((edge_activations(), True), (wide, False)):
        for bits in (8, 4):
            row, col = crossquant_factors(x, 0.15)
            exact = row.double() * col.double() / qmax_for_bits(bits)
            assert bool((exact < STEP_FLOOR).any()) == floored
            want = exact.clamp(min=STEP_FLOOR).sum(dim=(-2, -1))
            got = separable_step_sums(row, col.squeeze(-2).sort(dim=-1).values, qmax_for_bits(bits),
                                      STEP_FLOOR)
            assert torch.allclose(got, want, rtol=1e-12, atol=0)
            # and within float32 rounding of the steps kernelscope quantizes with
            rounded = crossquant_step(x, bits, 0.15).double().sum(dim=(-2, -1))
            assert torch.allclose(got, rounded, rtol=1e-7, atol=0)


def test_separable_histogram_moves_only_values_at_bin_edges():
    hist = LogHistogram()
    g = torch.Generator().manual_seed(9)
    t = torch.rand(3, 200, 1, generator=g, dtype=torch.float64) * 50
    c = (torch.rand(3, 1, 150, generator=g, dtype=torch.float64)
         * 10.0 ** torch.randint(-6, 3, (3, 1, 150), generator=g))
    t[1, 17] = 0.0  # a zero row: all its steps sit at the floor
    r, k = 0.15 * torch.log10(t), 0.85 * torch.log10(c)
    lowest = math.log10(0.5 * STEP_FLOOR)
    shifts = [-math.log10(127), -math.log10(7)]
    got = hist.counts_of_sums(r, k, lowest, shifts)[0]
    assert got.shape == (2, hist.bins)
    per_sequence = hist.counts_of_sums(r, k, lowest, shifts, groups=3)  # (3, 2, bins)
    assert torch.equal(per_sequence.sum(dim=0), got)
    for s, shift in enumerate(shifts):
        position = ((r + k + shift).clamp(min=lowest) - hist.low) * hist.per_decade  # (3, 200, 150) bins
        for counts, where in ((got[s], position), *((per_sequence[g, s], position[g]) for g in range(3))):
            want = torch.bincount(where.floor().long().clamp(0, hist.bins - 1).reshape(-1),
                                  minlength=hist.bins)
            assert int(counts.sum()) == int(want.sum()) == where.numel()
            near_edge = ((where - where.round()).abs() < 2 / 16).sum().item()
            moved = (counts - want).abs().sum().item() // 2
            assert moved <= near_edge
            assert moved < 0.05 * counts.sum().item()
    zero = torch.full((1, 4, 1), -math.inf, dtype=torch.float64)
    all_floor = hist.counts_of_sums(zero, torch.zeros(1, 1, 5, dtype=torch.float64), lowest)[0, 0]
    assert int(all_floor[math.floor((lowest - hist.low) * hist.per_decade)]) == 20 == int(all_floor.sum())


def test_the_histogram_of_sums_does_not_depend_on_how_many_groups_are_transformed_at_once(monkeypatch):
    hist = LogHistogram()
    g = torch.Generator().manual_seed(11)
    r = 0.15 * torch.log10(torch.rand(6, 50, 1, generator=g, dtype=torch.float64) * 50)
    k = 0.85 * torch.log10(torch.rand(6, 1, 40, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(
        -6, 3, (6, 1, 40), generator=g))
    args = (r, k, math.log10(0.5 * STEP_FLOOR), [-math.log10(127)])
    whole = hist.counts_of_sums(*args, groups=3)  # (3, 1, bins): one transform for all
    monkeypatch.setattr("kernelscope.stats.histogram._SPECTRUM_ELEMENTS", 1)  # one group at a time
    assert torch.equal(hist.counts_of_sums(*args, groups=3), whole)


def test_arena_hands_out_aligned_tensors_and_falls_back_when_full():
    from kernelscope.stats.arena import Arena

    arena = Arena(256)
    a, b = arena.empty((10,), torch.float32), arena.empty((5,), torch.int64)
    start = arena.block.data_ptr()
    assert a.data_ptr() == start and b.data_ptr() == start + 64  # inside the block, 64-byte aligned
    assert a.shape == (10,) and b.dtype == torch.int64
    big = arena.empty((100,), torch.float32)  # 400 bytes do not fit after 104 used
    assert not start <= big.data_ptr() < start + 256 and big.shape == (100,)
    arena.reset()
    measured = measure(activations(3), CONFIGS, arena=Arena(1 << 20))
    plain = measure(activations(3), CONFIGS)
    assert summarise([measured], CONFIGS)[0].kernel.tolist() == summarise([plain], CONFIGS)[0].kernel.tolist()


def test_rows_of_single_measurements_equal_the_accumulated_rows():
    """Weights are summarised straight from their measurements (no accumulator); their rows are those
    an accumulator gives the same input."""
    from kernelscope.stats.table import measured_rows

    configs = ALL_FORMATS
    xs = [activations(80 + i, (1, 40, 24)) for i in range(3)] + [activations(90, (1, 32, 48))]
    xs[1][0, 3, 4] = math.nan
    rows = measured_rows([measure(x, configs) for x in xs], configs)
    for x, mine in zip(xs, rows, strict=True):
        want = result_of(KernelStats(configs).update(observe(x, configs)))["configs"]
        for a, b in zip(mine, want, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                if key == "bound_mean":
                    assert a[key] == pytest.approx(b[key], rel=1e-12)
                else:
                    assert a[key] == b[key] or (a[key] != a[key] and b[key] != b[key]), key
