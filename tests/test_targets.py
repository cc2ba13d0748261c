"""Deployment targets against the deploying library itself: every llm-compressor preset's arguments
equal compressed-tensors' ``PRESET_SCHEMES``, and every fake-quantized weight and activation equals
what compressed-tensors' own ``forward_quantize`` gives, bit for bit, on random and adversarial
inputs in float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch

from kernelscope.quant import targets as T

ct = pytest.importorskip("compressed_tensors.quantization")
from compressed_tensors.quantization.lifecycle.forward import forward_quantize  # noqa: E402
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402

LLMC = [t for t in T.TARGETS.values() if t.library == T.LLM_COMPRESSOR]
DTYPES = (torch.float32, torch.bfloat16)


def library_args(target: T.Target, role: str):
    return PRESET_SCHEMES[target.name.upper()].get(role)


def plain(value) -> str:
    """An enum member or its value, as the plain string."""
    return str(getattr(value, "value", value))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (so -0 and +0, and NaN payloads, count as different)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


@pytest.mark.parametrize("target", LLMC, ids=lambda t: t.name)
def test_preset_arguments_are_the_library_s(target):
    for role, mine in (("weights", target.weights), ("input_activations", target.input_activations)):
        theirs = library_args(target, role)
        assert (mine is None) == (theirs is None), role
        if mine is None:
            continue
        dynamic = {True: T.Scaling.DYNAMIC, False: T.Scaling.STATIC, "local": T.Scaling.LOCAL}[
            theirs.dynamic if isinstance(theirs.dynamic, bool) else plain(theirs.dynamic)]
        scale_dtype = None if theirs.scale_dtype is None else str(theirs.scale_dtype).removeprefix("torch.")
        assert (mine.num_bits, str(mine.kind), str(mine.strategy), mine.group_size, mine.scaling,
                mine.scale_dtype, mine.observer) == (
            theirs.num_bits, plain(theirs.type), plain(theirs.strategy),
            theirs.group_size, dynamic, scale_dtype, theirs.observer), role
        assert theirs.symmetric
        fields = [*mine.as_dict()]
        assert ct.QuantizationArgs(**mine.as_dict()).model_dump(include=set(fields)) == \
            theirs.model_dump(include=set(fields)), role


def test_every_library_preset_is_a_target_or_refused_with_a_reason():
    for name in PRESET_SCHEMES:
        key = f"{T.LLM_COMPRESSOR}:{name}".lower()
        if name == "UNQUANTIZED":
            continue
        assert key in T.TARGETS or key in T.UNSUPPORTED, name
    with pytest.raises(ValueError, match="asymmetric zero point"):
        T.get_target("LLM-Compressor:W4A16_asym")
    assert T.get_target(" llm-compressor:w8a8 ") is T.TARGETS["llm-compressor:w8a8"]
    with pytest.raises(ValueError, match="choose from W8A8"):
        T.get_target("llm-compressor:W9A9")
    with pytest.raises(ValueError, match="unknown library 'vllm'"):
        T.get_target("vllm:W8A8")


# -- inputs ------------------------------------------------------------------------------------------

def adversarial(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random heavy-tailed values with planted edges: an all-zero row, exact ties of x / s at k + 1/2
    (a row whose max makes the INT8 step exactly 1), subnormals, huge values, repeated maxima."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 2)
    rows = x.reshape(-1, shape[-1])
    rows[0] = 0.0
    rows[1] = torch.arange(shape[-1]) % 9 - 4.5  # ties at ±0.5, ±1.5, ...
    rows[1, 0] = 127.5  # INT8 step (127.5 / 127.5) = 1: every value above is a tie
    rows[2] = rows[2] * 1e-39  # float32 subnormals
    rows[3, ::3] = 6.0e4
    rows[4] = torch.where(rows[4].abs() > 1, rows[4].sign() * 448.0, rows[4] * 0.001)
    return rows.reshape(shape).to(dtype)


class Holder(torch.nn.Module):
    """A module carrying the parameters compressed-tensors' forward_quantize reads."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        super().__init__()
        self.quantization_status = ct.QuantizationStatus.CALIBRATION
        for name, value in tensors.items():
            setattr(self, name, value)


def zero_point_like(scale: torch.Tensor, args) -> torch.Tensor:
    return torch.zeros(scale.shape, dtype=args.zp_dtype)


def library_weight(w: torch.Tensor, args) -> torch.Tensor:
    """The weight as llm-compressor's min-max observer and compressed-tensors' forward compute it, the
    observer's reductions written out here."""
    gs = None
    strategy = plain(args.strategy)
    if strategy == "tensor_group":
        gs = generate_gparam(w.min(), w.max())
    if strategy == "tensor":
        lo, hi = w.min(), w.max()
    elif strategy == "channel":
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    else:
        groups = w.reshape(w.shape[0], -1, args.group_size)
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale, _ = calculate_qparams(lo, hi, args, global_scale=gs)
    scale = scale.to(w.dtype)  # stored in a parameter of the layer's dtype
    extra = {"weight_global_scale": gs} if gs is not None else {}
    holder = Holder(weight_scale=scale, weight_zero_point=zero_point_like(scale, args), **extra)
    return forward_quantize(holder, w, "weight", args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target", [t for t in LLMC if t.weights is not None], ids=lambda t: t.name)
def test_weights_bit_for_bit(target, dtype):
    for seed, shape in ((0, (48, 256)), (1, (8, 128)), (2, (64, 512))):
        w = adversarial(shape, dtype, seed)
        mine, zero = T.quantize_weight(w, target.weights)
        theirs = library_weight(w, library_args(target, "weights"))
        assert same_bits(mine, theirs), (target.name, seed)
        assert torch.equal(zero, theirs == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target", [t for t in LLMC if t.input_activations is not None],
                         ids=lambda t: t.name)
def test_activations_bit_for_bit(target, dtype):
    args = library_args(target, "input_activations")
    mine_args = target.input_activations
    for seed, shape in ((3, (2, 16, 256)), (4, (1, 9, 128)), (5, (16, 128))):
        x = adversarial(shape, dtype, seed)
        calib_x = adversarial(shape, dtype, seed + 100) * 0.7
        calibration = None
        params = {}
        if mine_args.scaling is T.Scaling.STATIC:
            lo, hi = torch.aminmax(calib_x)  # the static min-max observer over one calibration batch
            calibration = T.calibrate(lo, hi, mine_args, dtype)
            scale, _ = calculate_qparams(lo, hi, args)
            params = {"input_scale": scale.to(dtype), "input_zero_point": zero_point_like(scale, args)}
        elif mine_args.scaling is T.Scaling.LOCAL:
            lo, hi = torch.aminmax(calib_x)
            calibration = T.calibrate(lo, hi, mine_args, dtype)
            params = {"input_global_scale": generate_gparam(lo, hi)}
        mine, zero = T.quantize_activation(x, mine_args, calibration)
        theirs = forward_quantize(Holder(**params), x, "input", args)
        assert same_bits(mine, theirs), (target.name, seed, shape)
        assert torch.equal(zero, theirs == 0)


def test_the_kernel_mask_is_where_the_grid_value_is_zero():
    """The mask counts grid values of zero, not outputs that happen to be zero: a tie at exactly 1/2 of
    an INT8 step is in the kernel, the next float above it is not."""
    args = T.TARGETS["llm-compressor:w8a8"].input_activations
    x = torch.tensor([[[127.5, 0.5, -0.5, 0.50000006, 1.5, 0.0]]])
    out, zero = T.quantize_activation(x, args, None)
    assert zero.tolist() == [[[False, True, True, False, False, True]]]
    assert out.tolist() == [[[127.0, 0.0, -0.0, 1.0, 2.0, 0.0]]]  # levels stop at 127; ties to even


def test_int8_is_not_the_paper_s_int8():
    """compressed-tensors divides by 127.5 and keeps -128; the paper's per-token INT8 divides by 127."""
    from kernelscope.quant import formats as F

    x = torch.tensor([[[127.0, 63.75, -127.0]]])
    mine, _ = T.quantize_activation(x, T.TARGETS["llm-compressor:w8a8"].input_activations, None)
    paper = F.fake_quantize(x, F.get_format("per_token", bits=8))
    assert paper.tolist() == [[[127.0, 64.0, -127.0]]]
    step = torch.tensor(127.0) / torch.tensor(127.5)  # x / step = 127.5 and -127.5: ties, the first clamped
    assert torch.equal(mine, torch.tensor([[[127.0, 64.0, -128.0]]]) * step)


def test_static_activations_refuse_to_run_uncalibrated():
    args = T.TARGETS["llm-compressor:fp8"].input_activations
    with pytest.raises(ValueError, match="not calibrated"):
        T.quantize_activation(torch.ones(1, 2, 4), args, None)
    with pytest.raises(ValueError, match="do not split into groups of 16"):
        T.quantize_activation(torch.ones(1, 2, 24), T.TARGETS["llm-compressor:nvfp4"].input_activations,
                              T.Calibration(None, torch.ones(1)))
