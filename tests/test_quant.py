"""The quantizer maths against naive references and at its edges."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelscope.quant import (
    STEP_FLOOR,
    QuantizerConfig,
    crossquant_step,
    expand_configs,
    per_channel_activation_step,
    per_tensor_step,
    per_token_step,
    qmax_for_bits,
)
from kernelscope.quant import formats as F
from tests import reference as ref


def fmt(name: str, bits: int, alpha: float | None = None, block: int | None = None) -> F.Format:
    return QuantizerConfig(name, bits, alpha, block).format


def kernel_mask(x: torch.Tensor, f: F.Format) -> torch.Tensor:
    return F.kernel_mask(x, f)


def test_qmax_for_every_bit_width():
    assert [qmax_for_bits(b) for b in range(2, 9)] == [1, 3, 7, 15, 31, 63, 127]


@pytest.mark.parametrize("bad", [0, 1, 9, 16, -3, 8.0, True, "8"])
def test_qmax_rejects_bad_bits(bad):
    with pytest.raises(ValueError):
        qmax_for_bits(bad)


def test_steps_match_naive_reference_per_sequence():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 5) * torch.logspace(-2, 1, 5)  # (B, T, I), channels of different scale
    for bits in (8, 4, 2):
        for b in range(3):
            seq = x[b]
            full = lambda s: s.expand(6, 5)  # noqa: E731
            assert torch.equal(full(per_token_step(x, bits)[b]),
                               ref.step_for_sequence(seq, "per_token", bits, None))
            assert torch.equal(full(per_channel_activation_step(x, bits)[b]),
                               ref.step_for_sequence(seq, "per_channel", bits, None))
            assert torch.equal(full(per_tensor_step(x, bits)[b]),
                               ref.step_for_sequence(seq, "per_tensor", bits, None))
            for alpha in (0.0, 0.15, 0.5, 1.0):
                assert torch.equal(crossquant_step(x, bits, alpha)[b],
                                   ref.step_for_sequence(seq, "crossquant", bits, alpha))


def test_channel_max_is_per_sequence_not_across_the_batch():
    # The second sequence has a huge channel 0; it must not change the first sequence's c_0.
    x = torch.ones(2, 4, 3)
    x[1, :, 0] = 1000.0
    step = crossquant_step(x, 8, 0.5)
    assert torch.allclose(step[0], torch.full((4, 3), 1.0 / 127))
    assert torch.allclose(step[1, :, 0], torch.full((4,), math.sqrt(1000.0 * 1000.0) / 127))


def test_crossquant_alpha_one_is_per_token_exactly():
    torch.manual_seed(1)
    x = torch.randn(2, 7, 9)
    for bits in range(2, 9):
        a = crossquant_step(x, bits, 1.0)
        b = per_token_step(x, bits).expand_as(a)
        assert torch.equal(a, b)
        cq, pt = fmt("crossquant", bits, 1.0), fmt("per_token", bits)
        assert torch.equal(kernel_mask(x, cq), kernel_mask(x, pt))
        assert torch.equal(F.fake_quantize(x, cq), F.fake_quantize(x, pt))


def test_crossquant_alpha_zero_is_per_channel_exactly():
    torch.manual_seed(2)
    x = torch.randn(2, 7, 9)
    a = crossquant_step(x, 8, 0.0)
    assert torch.equal(a, per_channel_activation_step(x, 8).expand_as(a))


def test_crossquant_bound_is_below_per_token_exactly_where_c_below_t():
    torch.manual_seed(3)
    x = torch.randn(1, 16, 16) * 3
    cq = crossquant_step(x, 8, 0.15)
    pt = per_token_step(x, 8)
    t = x.abs().amax(-1, keepdim=True)
    c = x.abs().amax(-2, keepdim=True)
    strictly = (c < t * (1 - 1e-6)) | (c > t * (1 + 1e-6))  # away from float ties
    assert torch.equal((cq < pt)[strictly], (c < t).expand_as(cq)[strictly])


def test_kernel_mask_is_round_to_zero_exactly():
    torch.manual_seed(4)
    x = torch.randn(4, 32, 16) * 5
    for f in (fmt("per_token", 8), fmt("crossquant", 4, 0.15), fmt("per_tensor", 2)):
        step = F.scale(x, f)
        assert torch.equal(kernel_mask(x, f), torch.round(x / step) == 0)
        assert torch.equal(kernel_mask(x, f), F.quantize(x, f)[0] == 0)


def test_half_step_ties_round_half_to_even():
    # t = 127 * 2^-3 makes Δ = 2^-3 exactly; x = k/2 · Δ are exact ties for odd k.
    delta = 2.0**-3
    t = 127 * delta
    row = torch.tensor([[t, 0.5 * delta, -0.5 * delta, 1.5 * delta, -1.5 * delta, 2.5 * delta,
                         0.5 * delta * (1 + 2**-20), 0.0]])
    f = fmt("per_token", 8)
    q, step = F.quantize(row, f)
    assert step.item() == delta
    assert q.tolist() == [[127, 0, 0, 2, -2, 2, 1, 0]]
    assert kernel_mask(row, f).tolist() == [[False, True, True, False, False, False, False, True]]
    assert torch.equal(F.zero_bound(row, f), torch.tensor([[0.5 * delta]]))


def test_zero_row_and_zero_column_never_give_nan():
    x = torch.zeros(2, 3, 4)
    x[0, 1, 2] = 5.0  # sequence 0: one non-zero; sequence 1: all zero
    for f in (fmt("per_token", 8), fmt("per_channel", 8), fmt("per_tensor", 8), fmt("crossquant", 8, 0.15),
              fmt("crossquant", 4, 1.0), fmt("crossquant", 4, 0.0)):
        step = F.scale(x, f)
        assert torch.isfinite(step).all() and (step >= STEP_FLOOR).all()
        xq = F.fake_quantize(x, f)
        assert torch.isfinite(xq).all()
        mask = kernel_mask(x, f)
        assert mask[x == 0].all()  # zeros are always in the kernel
    assert per_token_step(x, 8)[1].eq(STEP_FLOOR).all()


def test_quantize_clamps_and_dequantize_roundtrips():
    x = torch.tensor([[-1.75, -1.0, 0.2, 1.0, 3.0]])  # t = 3: INT3 step 1, so -1.75 is -2 and 3 is 3
    x = torch.cat([x, torch.tensor([[4.5, -4.5, 0.75, 1.2, -0.3]])])  # t = 4.5: step 1.5
    original = x.clone()
    f = fmt("per_token", 3)
    q, step = F.quantize(x, f)
    assert step.flatten().tolist() == [1.0, 1.5]
    assert q.tolist() == [[-2, -1, 0, 1, 3], [3, -3, 0, 1, 0]]
    assert F.dequantize(q, step, f).tolist() == [[-2.0, -1.0, 0.0, 1.0, 3.0], [4.5, -4.5, 0.0, 1.5, 0.0]]
    x2 = torch.tensor([[8.0, -20.0, 1.0]])  # per-tensor INT3 of a two-row sequence: clamped at qmax
    q2, _ = F.quantize(torch.cat([x2, torch.tensor([[60.0, 0.0, 0.0]])]), fmt("per_tensor", 3))
    assert q2.tolist() == [[0, -1, 0], [3, 0, 0]]
    F.fake_quantize(x, f)
    assert torch.equal(x, original)  # out-of-place: the input is untouched


def test_int4_kernel_is_a_superset_of_int8():
    torch.manual_seed(5)
    x = torch.randn(2, 64, 32)
    for name, alpha in (("per_token", None), ("crossquant", 0.15)):
        k8, k4 = kernel_mask(x, fmt(name, 8, alpha)), kernel_mask(x, fmt(name, 4, alpha))
        assert (k4 | ~k8).all() and k4.sum() > k8.sum()
        assert k4.sum() == ref.kernel_count(x, name, 4, alpha)


def test_bf16_input_is_measured_in_float32():
    torch.manual_seed(6)
    x32 = torch.randn(2, 16, 8)
    xb = x32.bfloat16()
    step = crossquant_step(xb, 8, 0.15)
    assert step.dtype == torch.float32
    assert torch.equal(step, crossquant_step(xb.float(), 8, 0.15))
    f = fmt("crossquant", 8, 0.15)
    assert torch.equal(kernel_mask(xb, f), kernel_mask(xb.float(), f))
    assert F.fake_quantize(xb, f).dtype == torch.bfloat16
    assert torch.equal(F.fake_quantize(xb, f), ref.int_fake_quantize(xb, step, 8))


def test_weight_steps_per_channel_and_groupwise():
    torch.manual_seed(7)
    w = torch.randn(4, 300)  # a weight (O, I) is one sequence whose rows are the output channels
    per_channel = F.scale(w, fmt("per_token", 4))
    assert per_channel.shape == (4, 1)
    assert torch.equal(per_channel.expand_as(w), ref.int_weight_step(w, 4))
    grouped = fmt("per_group", 4, block=128)
    assert torch.equal(F.expand_scale(F.scale(w, grouped), grouped, 300),
                       ref.int_weight_step(w, 4, 128))  # last: 44
    assert torch.equal(F.fake_quantize(w, grouped),
                       ref.int_fake_quantize(w, ref.int_weight_step(w, 4, 128), 4))
    whole = fmt("per_group", 4, block=300)
    assert torch.equal(F.fake_quantize(w, whole), F.fake_quantize(w, fmt("per_token", 4)))


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), float("inf")])
def test_alpha_out_of_range_is_refused(alpha):
    with pytest.raises(ValueError):
        crossquant_step(torch.ones(1, 2, 2), 8, alpha)
    with pytest.raises(ValueError):
        QuantizerConfig("crossquant", 8, alpha)


def test_configs_validate_themselves():
    with pytest.raises(ValueError):
        QuantizerConfig("per_row", 8)
    with pytest.raises(ValueError):
        QuantizerConfig("per_token", 8, 0.5)
    with pytest.raises(ValueError):
        QuantizerConfig("crossquant", 8)
    configs = expand_configs(["per-token", "CrossQuant"], [8, 4], [0.15, 0.5])
    assert [c.label for c in configs] == [
        "per_token int8", "crossquant a=0.15 int8", "crossquant a=0.5 int8",
        "per_token int4", "crossquant a=0.15 int4", "crossquant a=0.5 int4",
    ]


finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9)),
    bits=st.integers(2, 8),
    alpha=st.sampled_from([0.0, 0.15, 0.5, 0.85, 1.0]),
    data=st.data(),
)
def test_property_kernel_counts_match_reference(shape, bits, alpha, data):
    values = data.draw(st.lists(finite, min_size=math.prod(shape), max_size=math.prod(shape)))
    x = torch.tensor(values, dtype=torch.float32).reshape(shape)
    for name, a in (("per_token", None), ("crossquant", alpha), ("per_tensor", None), ("per_channel", None)):
        cfg = QuantizerConfig(name, bits, a)
        step = cfg.scale(x)
        assert int(kernel_mask(x, cfg.format).sum()) == ref.kernel_count(x, name, bits, a)
        xq = F.fake_quantize(x, cfg.format)
        assert torch.equal(xq, ref.int_fake_quantize(x, step, bits))
        # Within the clamp range the error is at most half a step.
        inside = (x / step).abs() <= cfg.qmax
        assert ((xq - x).abs() <= 0.5 * step * (1 + 1e-6) + 1e-30)[inside].all()
        # Batch safety: each sequence alone gives the same mask as inside the batch.
        for b in range(shape[0]):
            assert torch.equal(kernel_mask(x[b : b + 1], cfg.format), kernel_mask(x, cfg.format)[b : b + 1])
