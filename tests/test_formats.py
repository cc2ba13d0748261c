"""Number formats (DESIGN.md §1b) against independent oracles, bit for bit.

Oracles: element grids enumerated from their definition and rounded by a Python loop, torch's own
``float8_e4m3fn`` cast, ``ml_dtypes`` (float8_e4m3fn, float4_e2m1fn, float8_e8m0fnu), a naive
per-element reference of every format written with numpy float32 scalars, the INT primitives, and
torchao's pure-torch ``to_mx`` / ``nvfp4_quantize`` where importable.
"""

from __future__ import annotations

import bisect
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelscope.quant import STEP_FLOOR
from kernelscope.quant.formats import (
    E2M1,
    E2M3,
    E3M2,
    E4M3,
    FORMATS,
    ElementGrid,
    Format,
    ScaleRule,
    block_kernel_mask,
    expand_scale,
    fake_quantize,
    get_format,
    int_grid,
    kernel_mask,
    quantize,
    scale,
    subnormal_mask,
    zero_bound,
)
from tests import reference as ref

ml_dtypes = pytest.importorskip("ml_dtypes")

F32 = np.float32
FLOAT_FORMATS = ["fp8_per_token", "fp8_per_tensor", "mxfp8", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4",
                 "mxfp4_rceil", "nvfp4"]
MX_FLOOR = {"mxfp8": 8, "mxfp6_e2m3": 2, "mxfp6_e3m2": 4, "mxfp4": 2}
"""The MX formats with the FLOOR rule, and their element grids' largest exponent (the scale's shift)."""
INT_FORMATS = ["per_token", "per_tensor", "per_channel", "crossquant", "per_group"]
ALPHA = 0.15


def fmt_of(name: str, bits: int = 8, block_size: int | None = None) -> Format:
    entry = FORMATS[name]
    return get_format(name, bits=bits if entry.grid is None else None, block_size=block_size,
                      alpha=ALPHA if entry.takes_alpha else None)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 != 0.0 and NaN == NaN in comparisons."""
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    diff = bits_of(a) != bits_of(b)
    assert not diff.any(), (f"{int(diff.sum())} elements differ, first at {diff.nonzero()[0].tolist()}: "
                            f"{a[tuple(diff.nonzero()[0])].item()!r} vs "
                            f"{b[tuple(diff.nonzero()[0])].item()!r}")


# ---------------------------------------------------------------------------------------------
# Naive references: element grids from their definition, formats element by element.


def grid_codes(ebits: int, mbits: int, max_value: float) -> list[float]:
    """Every non-negative finite value of a sign-magnitude float, in code order, from its definition."""
    bias = 2 ** (ebits - 1) - 1
    values = []
    for e in range(2**ebits):
        for m in range(2**mbits):
            v = (m / 2**mbits) * 2.0 ** (1 - bias) if e == 0 else (1 + m / 2**mbits) * 2.0 ** (e - bias)
            if v <= max_value:
                values.append(v)
    return values


E4M3_CODES = grid_codes(4, 3, 448.0)
E2M1_CODES = grid_codes(2, 1, 6.0)
E2M3_CODES = grid_codes(2, 3, 7.5)
E3M2_CODES = grid_codes(3, 2, 28.0)
CODES = {"e4m3": E4M3_CODES, "e2m1": E2M1_CODES, "e2m3": E2M3_CODES, "e3m2": E3M2_CODES}


def naive_round(v: float, codes: list[float]) -> float:
    """Nearest code, ties to the even code index, saturating at the largest code."""
    if math.isnan(v):
        return v
    a = abs(v)
    i = bisect.bisect_left(codes, a)
    if i == len(codes):
        r = codes[-1]
    elif codes[i] == a or i == 0:
        r = codes[i]
    else:
        lo, hi = codes[i - 1], codes[i]
        if a - lo < hi - a:
            r = lo
        elif hi - a < a - lo:
            r = hi
        else:
            r = lo if (i - 1) % 2 == 0 else hi
    return math.copysign(r, v)


def naive_e8m0(exponent: int) -> float:
    return 2.0 ** min(max(exponent, -127), 127)


def naive_floor_log2(a: float) -> int:
    """⌊log2 a⌋ of a positive float, exactly, by search."""
    k = math.floor(math.log2(a))
    while 2.0**k > a:
        k -= 1
    while 2.0 ** (k + 1) <= a:
        k += 1
    return k


def naive_ceil_log2(a: float) -> int:
    k = math.ceil(math.log2(a))
    while 2.0**k < a:
        k += 1
    while 2.0 ** (k - 1) >= a:
        k -= 1
    return k


def naive_units(seq: np.ndarray, name: str, block: int | None) -> list[tuple[list[tuple[int, int]], float]]:
    """The scale units of one sequence ``(T, I)``: (element positions, abs-max) pairs."""
    rows, cols = seq.shape
    unit = FORMATS[name].rule.unit
    if unit == "tensor":
        cells = [[(i, j) for i in range(rows) for j in range(cols)]]
    elif unit == "token":
        cells = [[(i, j) for j in range(cols)] for i in range(rows)]
    elif unit == "channel":
        cells = [[(i, j) for i in range(rows)] for j in range(cols)]
    else:
        cells = [[(i, j) for j in range(b, min(b + block, cols))]
                 for i in range(rows) for b in range(0, cols, block)]
    return [(c, max(abs(float(seq[p])) for p in c)) for c in cells]


def naive_scale(name: str, amax: float, tensor_amax: float, bits: int) -> np.float32:
    """A unit's scale by DESIGN.md §1b, in numpy float32 arithmetic."""
    if FORMATS[name].grid is None:
        return max(F32(amax) / F32(2 ** (bits - 1) - 1), F32(1e-5))
    if name == "fp8_per_token":
        return max(F32(amax) / F32(448), F32(1.0) / (F32(448) * F32(512)))
    if name == "fp8_per_tensor":
        return F32(amax) / F32(448)
    if name in MX_FLOOR:
        return F32(naive_e8m0((naive_floor_log2(amax) if amax > 0 else -1000) - MX_FLOOR[name]))
    if name == "mxfp4_rceil":
        d = float(F32(amax) / F32(6))
        return F32(naive_e8m0(naive_ceil_log2(d) if d > 0 else -1000))
    g = F32(tensor_amax) / F32(448 * 6)
    if g == 0:
        return F32(0)
    ratio = min(max(float(F32(F32(amax) / F32(6)) / g), 2.0**-6), 448.0)
    return F32(g * F32(naive_round(ratio, E4M3_CODES)))


def naive_fake_quantize_seq(seq: np.ndarray, name: str, bits: int = 8, block: int | None = None
                            ) -> np.ndarray:
    """One sequence ``(T, I)`` float32, quantized and dequantized element by element."""
    entry = FORMATS[name]
    block = block or entry.block_size
    grid = entry.grid
    out = np.zeros_like(seq)
    tensor_amax = float(np.abs(seq).max()) if seq.size else 0.0
    for cells, amax in naive_units(seq, name, block):
        s = naive_scale(name, amax, tensor_amax, bits)
        for p in cells:
            quot = F32(seq[p]) / (s if s != 0 else F32(1))
            if grid is None:
                qmax = 2 ** (bits - 1) - 1
                q = min(max(float(np.round(quot)), -qmax), qmax)
            else:
                q = naive_round(float(quot), CODES[grid.name])
            out[p] = F32(q) * s
    return out


def naive_fake_quantize(x: torch.Tensor, name: str, bits: int = 8, block: int | None = None) -> torch.Tensor:
    x32 = x.float().reshape(-1, *x.shape[-2:]).numpy()
    out = np.stack([naive_fake_quantize_seq(seq, name, bits, block) for seq in x32])
    return torch.from_numpy(out).reshape(x.shape).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Adversarial inputs.


def nextafter(x: torch.Tensor, toward: float) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, toward))


def grid_probe(codes: list[float]) -> torch.Tensor:
    """Every code, every midpoint and their float32 neighbours, both signs, plus saturation and
    float32 subnormals."""
    c = torch.tensor(codes, dtype=torch.float32)
    mid = (c[:-1] + c[1:]) / 2  # exact: codes have few significant bits
    base = torch.cat([c, mid, torch.tensor([codes[-1] * 1.01, codes[-1] * 2, codes[-1] * 3, 1e30,
                                             2.0**-149, 2.0**-130, 1e-40, 2.0**-126])])
    around = torch.cat([base, nextafter(base, math.inf), nextafter(base, 0.0)])
    return torch.cat([around, -around])


def adversarial(seed: int, shape=(2, 3, 70), block: int = 16) -> torch.Tensor:
    """Rows of very different magnitude, an all-zero row, an all-zero block, float32 subnormals,
    a repeated block max and a huge row; the two sequences differ in scale so any mixing shows."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.logspace(-4, 4, shape[-1]).roll(seed, 0)
    x[0, 0] = 0.0  # all-zero row
    x[0, 1, block:2 * block] = 0.0  # all-zero block
    x[0, 2, :8] = torch.tensor([2.0**-149, -2.0**-140, 1e-40, -3e-39, 2.0**-126, 0.0, -0.0, 1e-45])
    x[1] *= 1e3
    x[1, 0, 5] = -x[1, 0].abs().max()  # block max repeated with the other sign
    x[1, 1] = x[1, 1].abs().max()
    return x


def random_floats(seed: int, n: int, lo: int, hi: int) -> torch.Tensor:
    """Normal samples spread over the binades 2^lo .. 2^hi."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) * torch.pow(2.0, torch.randint(lo, hi, (n,), generator=gen))


# ---------------------------------------------------------------------------------------------
# Element grids.


def test_grid_thresholds_and_ranges():
    assert E4M3.tau == 2.0**-10 and E2M1.tau == 0.25 and int_grid(4).tau == 0.5
    assert (E4M3.emax, E2M1.emax, E4M3.min_normal, E2M1.min_normal) == (8, 2, 2.0**-6, 1.0)
    assert E4M3_CODES[1] == 2.0**-9 and E4M3_CODES[-1] == 448.0 and len(E4M3_CODES) == 127
    assert E2M1_CODES == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert [int_grid(b).max_value for b in range(2, 9)] == [1, 3, 7, 15, 31, 63, 127]


@pytest.mark.parametrize("kwargs", [
    dict(name="bad", bits=8, max_value=448.0, min_subnormal=2.0**-8, exponent_bits=4, mantissa_bits=3),
    dict(name="bad", bits=7, max_value=448.0, min_subnormal=2.0**-9, exponent_bits=4, mantissa_bits=3),
    dict(name="bad", bits=8, max_value=449.0, min_subnormal=2.0**-9, exponent_bits=4, mantissa_bits=3),
    dict(name="bad", bits=8, max_value=2.0**9, min_subnormal=2.0**-9, exponent_bits=4, mantissa_bits=3),
    dict(name="bad", bits=4, max_value=7.0, min_subnormal=0.5, exponent_bits=2, mantissa_bits=1),
    dict(name="int8", bits=8, max_value=128.0),
    dict(name="int9", bits=9, max_value=255.0),
])
def test_grid_validates_itself(kwargs):
    with pytest.raises(ValueError):
        ElementGrid(**kwargs)


@pytest.mark.parametrize("grid, codes", [(E4M3, E4M3_CODES), (E2M1, E2M1_CODES), (E2M3, E2M3_CODES),
                                         (E3M2, E3M2_CODES)])
def test_grid_rounding_equals_naive_round_to_nearest_even(grid, codes):
    random = random_floats(0, 20000, -24, 12)
    v = torch.cat([grid_probe(codes), random])
    expect = torch.tensor([naive_round(float(a), codes) for a in v], dtype=torch.float32)
    assert_bits_equal(grid.round(v), expect)


def test_e4m3_rounding_equals_torch_cast_and_ml_dtypes():
    random = random_floats(1, 200000, -30, 12)
    v = torch.cat([grid_probe(E4M3_CODES), random])
    clamped = v.clamp(-448.0, 448.0)
    mine = E4M3.round(v)
    assert_bits_equal(mine, clamped.to(torch.float8_e4m3fn).float())
    oracle = clamped.numpy().astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert_bits_equal(mine, torch.from_numpy(oracle))


def test_e2m1_rounding_equals_ml_dtypes():
    random = random_floats(2, 200000, -12, 5)
    v = torch.cat([grid_probe(E2M1_CODES), random])
    oracle = v.numpy().astype(ml_dtypes.float4_e2m1fn).astype(np.float32)  # ml_dtypes saturates E2M1
    assert_bits_equal(E2M1.round(v), torch.from_numpy(oracle))


@pytest.mark.parametrize("grid, oracle", [(E2M3, "float6_e2m3fn"), (E3M2, "float6_e3m2fn")])
def test_fp6_rounding_equals_ml_dtypes(grid, oracle):
    random = random_floats(3, 200000, -14, 7)
    v = torch.cat([grid_probe(CODES[grid.name]), random])
    clamped = v.clamp(-grid.max_value, grid.max_value)  # the grids saturate; ml_dtypes' cast need not
    expect = clamped.numpy().astype(getattr(ml_dtypes, oracle)).astype(np.float32)
    assert_bits_equal(grid.round(v), torch.from_numpy(expect))


def test_fp6_grids():
    assert (E2M3.tau, E2M3.emax, E2M3.min_normal, len(E2M3_CODES)) == (1 / 16, 2, 1.0, 32)
    assert (E3M2.tau, E3M2.emax, E3M2.min_normal, len(E3M2_CODES)) == (1 / 32, 4, 0.25, 32)
    assert E2M3_CODES[:3] == [0.0, 0.125, 0.25] and E3M2_CODES[-1] == 28.0


def test_ties_at_tau_go_to_zero_and_one_ulp_above_does_not():
    for grid in (E4M3, E2M1, E2M3, E3M2, int_grid(8), int_grid(4)):
        tau = torch.tensor([grid.tau, -grid.tau])
        assert torch.equal(grid.round(tau), torch.zeros(2))
        assert (grid.round(nextafter(tau, math.copysign(math.inf, 1))).abs()[0] > 0)
        assert (grid.round(nextafter(tau[1:], -math.inf)).abs() > 0).all()


def test_non_saturating_grid_gives_nan_beyond_max():
    grid = ElementGrid("e4m3_nonsat", 8, 448.0, 2.0**-9, exponent_bits=4, mantissa_bits=3, saturating=False)
    out = grid.round(torch.tensor([448.0, 463.9, 464.0, 465.0, 1e9, -500.0]))
    assert out[:3].tolist() == [448.0, 448.0, 448.0]  # 464 is the tie between 448 and 480: even 448
    assert out[3:].isnan().all()
    v = grid_probe(E4M3_CODES)
    oracle = v.numpy().astype(ml_dtypes.float8_e4m3fn).astype(np.float32)  # ml_dtypes does not saturate
    assert_bits_equal(grid.round(v), torch.from_numpy(oracle))


def test_subnormal_codes():
    q = E4M3.round(torch.tensor([0.0, 2.0**-9, 7 * 2.0**-9, 2.0**-6, 448.0, -2.0**-8]))
    assert E4M3.subnormal(q).tolist() == [False, True, True, False, False, True]
    e2m1 = E2M1.subnormal(torch.tensor([0.0, 0.5, -0.5, 1.0, 6.0]))
    assert e2m1.tolist() == [False, True, True, False, False]
    assert not int_grid(4).subnormal(torch.tensor([0.0, 1.0, 7.0])).any()


# ---------------------------------------------------------------------------------------------
# Registry.


def test_registry_entries():
    assert list(FORMATS) == INT_FORMATS + FLOAT_FORMATS
    assert {n: FORMATS[n].block_size for n in FORMATS if FORMATS[n].block_size} == {
        "per_group": 128, "mxfp8": 32, "mxfp6_e2m3": 32, "mxfp6_e3m2": 32, "mxfp4": 32, "mxfp4_rceil": 32,
        "nvfp4": 16}
    assert {n: FORMATS[n].tau for n in FORMATS} == {**dict.fromkeys(INT_FORMATS, 0.5),
                                                   "fp8_per_token": 2.0**-10, "fp8_per_tensor": 2.0**-10,
                                                   "mxfp8": 2.0**-10, "mxfp6_e2m3": 2.0**-4,
                                                   "mxfp6_e3m2": 2.0**-5, "mxfp4": 0.25, "mxfp4_rceil": 0.25,
                                                   "nvfp4": 0.25}
    assert get_format("per_group", bits=4, block_size=64).block_size == 64
    assert get_format("mxfp4").grid.bits == 4 and get_format("mxfp8", bits=8).grid.bits == 8


@pytest.mark.parametrize("call", [
    lambda: get_format("per_token"),
    lambda: get_format("per_token", bits=9),
    lambda: get_format("per_token", bits=1),
    lambda: get_format("crossquant", bits=8),
    lambda: get_format("crossquant", bits=8, alpha=1.5),
    lambda: get_format("per_token", bits=8, alpha=0.5),
    lambda: get_format("mxfp4", bits=8),
    lambda: get_format("fp8_per_token", block_size=16),
    lambda: get_format("nvfp4", block_size=0),
    lambda: get_format("int4"),
    lambda: ScaleRule("row"),
    lambda: ScaleRule("token", "e8m0_floor"),
    lambda: Format("x", ScaleRule("block", "e8m0_floor"), int_grid(8), 32),
    lambda: Format("x", ScaleRule("crossquant", floor=STEP_FLOOR), E4M3, alpha=0.5),
])
def test_registry_rejects_bad_requests(call):
    with pytest.raises(ValueError):
        call()


# ---------------------------------------------------------------------------------------------
# Formats against the naive reference, bit for bit.


@pytest.mark.parametrize("name", INT_FORMATS + FLOAT_FORMATS)
@pytest.mark.parametrize("seed", [0, 1])
def test_fake_quantize_equals_naive_reference(name, seed):
    x = adversarial(seed)
    for bits in ((8, 4, 2) if FORMATS[name].grid is None else (8,)):
        block = 24 if name == "per_group" else None  # 70 inputs: a partial last block for every block size
        fmt = fmt_of(name, bits, block)
        mine = fake_quantize(x, fmt)
        if name == "crossquant":
            expect = ref.int_fake_quantize(x, ref.step_for_sequence_batch(x, "crossquant", bits, ALPHA), bits)
        else:
            expect = naive_fake_quantize(x, name, bits, block)
        assert_bits_equal(mine, expect)


@pytest.mark.parametrize("name", ["fp8_per_token", "fp8_per_tensor", "mxfp8", "mxfp4", "mxfp4_rceil", "nvfp4",
                                  "per_group", "per_token"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_computed_in_float32_and_returned_in_their_dtype(name, dtype):
    x = adversarial(3, shape=(2, 4, 40)).clamp(-6e4, 6e4).to(dtype)  # finite in float16
    fmt = fmt_of(name, 4, 16 if name == "per_group" else None)
    out = fake_quantize(x, fmt)
    assert out.dtype == dtype
    assert_bits_equal(out, naive_fake_quantize(x, name, 4, 16 if name == "per_group" else None))
    assert_bits_equal(out, fake_quantize(x.float(), fmt).to(dtype))


@pytest.mark.parametrize("name", INT_FORMATS + FLOAT_FORMATS)
def test_ties_at_the_zero_bound_are_in_the_kernel(name):
    x = adversarial(4, shape=(2, 3, 64))
    fmt = fmt_of(name, 4)
    grid = FORMATS[name].grid
    tau = 0.5 if grid is None else CODES[grid.name][1] / 2  # half the first code
    s = expand_scale(scale(x, fmt), fmt, x.shape[-1]).expand_as(x)
    bound = tau * s
    assert_bits_equal(zero_bound(x, fmt).expand_as(x), bound)
    tie = torch.where(s > 1e-30, bound, x)  # every element at exactly τ·s of its own scale
    if fmt.rule.unit != "crossquant":  # keep each unit's max, so the scales stay what they were
        tie = torch.where(x.abs() == _unit_max(x, fmt), x, tie)
        assert torch.equal(scale(tie, fmt), scale(x, fmt))
        assert kernel_mask(tie, fmt)[(tie == bound) & (bound > 0)].all()
        assert (quantize(tie, fmt)[0][(tie == bound) & (bound > 0)] == 0).all()
    at_tie = (tie == bound) & (bound > 0)
    above = torch.where(at_tie, nextafter(tie, math.inf), tie)  # one ulp past the tie, unit maxima kept
    assert torch.equal(kernel_mask(above, fmt), quantize(above, fmt)[0] == 0)
    if fmt.rule.unit != "crossquant":
        assert at_tie.any() and not kernel_mask(above, fmt)[at_tie].any()


def _unit_max(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Each element's unit abs-max, broadcast to x (a test helper, naive)."""
    a = x.abs()
    unit = fmt.rule.unit
    if unit == "token":
        return a.amax(-1, keepdim=True)
    if unit == "channel":
        return a.amax(-2, keepdim=True)
    if unit == "tensor":
        return a.amax((-2, -1), keepdim=True)
    g = fmt.block_size
    return torch.stack([a[..., b:b + g].amax(-1) for b in range(0, x.shape[-1], g)], -1).repeat_interleave(
        g, -1)[..., :x.shape[-1]]


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(INT_FORMATS + FLOAT_FORMATS),
    rows=st.integers(1, 3),
    cols=st.integers(1, 40),
    data=st.data(),
)
def test_fake_quantize_equals_naive_reference_on_generated_inputs(name, rows, cols, data):
    values = data.draw(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=2 * rows * cols,
                                max_size=2 * rows * cols))
    x = torch.tensor(values, dtype=torch.float32).reshape(2, rows, cols)
    bits = data.draw(st.sampled_from([2, 4, 8]))
    block = data.draw(st.integers(1, 9)) if name == "per_group" else None
    fmt = fmt_of(name, bits, block)
    mine = fake_quantize(x, fmt)
    if name == "crossquant":
        expect = ref.int_fake_quantize(x, ref.step_for_sequence_batch(x, "crossquant", bits, ALPHA), bits)
    else:
        expect = naive_fake_quantize(x, name, bits, block)
    assert_bits_equal(mine, expect)
    q, _ = quantize(x, fmt)
    assert torch.equal(kernel_mask(x, fmt), q == 0)


@pytest.mark.parametrize("name", INT_FORMATS + FLOAT_FORMATS)
def test_kernel_mask_is_where_fake_quantize_is_zero(name):
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 5, 100, generator=gen) * torch.logspace(-3, 3, 100)
        x[0, 1, :40] = 0.0
        fmt = fmt_of(name, 4)
        assert kernel_mask(x, fmt).dtype == subnormal_mask(x, fmt).dtype == torch.bool
        assert torch.equal(kernel_mask(x, fmt), fake_quantize(x, fmt) == 0)
        assert torch.equal(kernel_mask(x, fmt), x.abs() / expand_scale(scale(x, fmt), fmt, 100) <= fmt.tau)


def test_sequences_of_a_batch_are_never_mixed():
    x = adversarial(5, shape=(2, 4, 48))
    x[1] *= 1e4
    for name in INT_FORMATS + FLOAT_FORMATS:
        fmt = fmt_of(name, 4)
        whole = fake_quantize(x, fmt)
        for b in range(2):
            assert_bits_equal(whole[b], fake_quantize(x[b], fmt))
            assert_bits_equal(whole[b:b + 1], fake_quantize(x[b:b + 1], fmt))
        assert torch.equal(kernel_mask(x, fmt)[0], kernel_mask(x[0], fmt))


def test_inputs_are_not_modified():
    for name in INT_FORMATS + FLOAT_FORMATS:
        for x in (adversarial(6, shape=(2, 3, 64)), adversarial(6, shape=(2, 3, 50))):
            before = x.clone()
            fmt = fmt_of(name, 4)
            fake_quantize(x, fmt), kernel_mask(x, fmt), subnormal_mask(x, fmt), zero_bound(x, fmt)
            assert_bits_equal(x, before)


# ---------------------------------------------------------------------------------------------
# Edges: zeros, saturation, near ±max, float32 subnormals.


@pytest.mark.parametrize("name", INT_FORMATS + FLOAT_FORMATS)
def test_all_zero_sequence_is_all_kernel_without_nan(name):
    x = torch.zeros(2, 3, 40)
    x[1] = torch.randn(3, 40)
    fmt = fmt_of(name, 4)
    out = fake_quantize(x, fmt)
    assert not out.isnan().any() and not zero_bound(x, fmt).isnan().any()
    assert kernel_mask(x, fmt)[0].all() and (out[0] == 0).all()
    if fmt.is_block:
        assert block_kernel_mask(x, fmt)[0].all()


def test_all_zero_block_and_partial_block_masks():
    x = torch.randn(1, 2, 40) + 5.0  # two full blocks of 16 and a partial one of 8
    x[0, 0, 16:32] = 0.0
    x[0, 1, 32:] = 1e-9
    x[0, 1, 0] = 1e3  # G = 1e3 / 2688: the blocks near 5 keep their own scale
    fmt = get_format("nvfp4")
    blocks = block_kernel_mask(x, fmt)
    assert blocks.dtype == torch.bool and blocks.shape == (1, 2, 3)
    assert blocks.tolist() == [[[False, True, False], [False, False, True]]]
    mx = block_kernel_mask(x, get_format("mxfp4"))
    assert mx.shape == (1, 2, 2) and mx.tolist() == [[[False, False], [False, False]]]
    with pytest.raises(ValueError):
        block_kernel_mask(x, fmt_of("per_token"))


@pytest.mark.parametrize("name", FLOAT_FORMATS)
def test_the_unit_max_lands_on_the_grid_and_near_max_saturates(name):
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(7)) * 10
    x[1, 0, 5] = -x[1, 0].abs().max()  # the block max twice, with both signs
    fmt = fmt_of(name)
    q, _ = quantize(x, fmt)
    assert q.abs().max() <= fmt.grid.max_value
    at_max = (x.abs() == _unit_max(x, fmt)) & (x != 0)
    if name.startswith("fp8"):  # the max is divided onto ±448 up to one rounding of x / s
        assert (q[at_max].abs() >= 416).all()
    elif name == "mxfp4_rceil":  # rounded-up scale: the max lands in (3, 6]
        assert (q[at_max].abs() >= 3).all()
    else:
        assert (q[at_max].abs() >= fmt.grid.max_value / 2).all()


def test_float32_subnormal_blocks_get_the_smallest_e8m0_scale():
    x = torch.tensor([[2.0**-149, 2.0**-140, -(2.0**-135), 0.0] + [0.0] * 28])
    for name in ("mxfp8", "mxfp4", "mxfp4_rceil"):
        assert scale(x, get_format(name)).item() == 2.0**-127
    # x / 2^-127: 2^-22 and 2^-13 are below τ = 2^-10; -2^-8 is a subnormal E4M3 code
    assert kernel_mask(x, get_format("mxfp8"))[0, :4].tolist() == [True, True, False, True]
    assert subnormal_mask(x, get_format("mxfp8"))[0, :4].tolist() == [False, False, True, False]
    assert kernel_mask(x, get_format("mxfp4"))[0].all()


def test_e8m0_scales_are_powers_of_two_on_the_e8m0_grid():
    x = adversarial(8, shape=(2, 4, 96)) * torch.logspace(-25, 25, 96)
    for name in ("mxfp8", "mxfp4", "mxfp4_rceil"):
        s = scale(x, get_format(name))
        roundtrip = s.numpy().astype(ml_dtypes.float8_e8m0fnu).astype(np.float32)
        assert_bits_equal(s, torch.from_numpy(roundtrip))
        assert (torch.frexp(s).mantissa == 0.5).all()


def test_mx_floor_and_rceil_exponents_against_exact_logarithms():
    a = torch.cat([torch.logspace(-44, 38, 3000), torch.pow(2.0, torch.arange(-149, 128.0))])
    a = torch.cat([a, nextafter(a, 0.0), nextafter(a, math.inf)]).clamp(max=3e38)
    a = a[a > 0]
    x = a.reshape(-1, 1).expand(-1, 32).contiguous()  # one block per row, its max = a
    for name, expect in (
        ("mxfp8", [naive_e8m0(naive_floor_log2(float(v)) - 8) for v in a]),
        ("mxfp4", [naive_e8m0(naive_floor_log2(float(v)) - 2) for v in a]),
        ("mxfp4_rceil", [naive_e8m0(naive_ceil_log2(d) if d > 0 else -1000)
                         for d in (float(F32(float(v)) / F32(6)) for v in a)]),
    ):
        assert_bits_equal(scale(x, get_format(name))[:, 0], torch.tensor(expect, dtype=torch.float32))


def test_fp8_scale_rules():
    x = torch.tensor([[[0.0, 0.0], [448.0, -1.0], [1e-30, 3.0]]])
    assert scale(x, get_format("fp8_per_token")).flatten().tolist() == [
        F32(1) / F32(448 * 512), 1.0, F32(3) / F32(448)]
    assert scale(x, get_format("fp8_per_tensor")).item() == 1.0
    assert fake_quantize(x, get_format("fp8_per_tensor"))[0, 2].tolist() == [0.0, 3.0]


def test_nvfp4_two_level_scale():
    x = torch.zeros(1, 48)
    x[0, 0] = 2688.0  # G = 1
    x[0, 16] = 6.0 * 3.3  # block scale 3.3 -> e4m3 3.25
    x[0, 32] = 1e-6  # block scale below 2^-6: clamped
    s = scale(x, get_format("nvfp4"))
    assert s.tolist() == [[448.0, 3.25, 2.0**-6]]
    assert fake_quantize(x, get_format("nvfp4"))[0, 16].item() == 3.25 * 6


def test_per_group_partial_last_group():
    w = torch.randn(3, 300)
    s = scale(w, get_format("per_group", bits=4))
    assert s.shape == (3, 3)
    assert torch.equal(s[:, 2], (w[:, 256:].abs().amax(-1) / 7).clamp_min(STEP_FLOOR))


def test_subnormal_mask_matches_codes():
    x = adversarial(9, shape=(2, 3, 64))
    for name in FLOAT_FORMATS:
        fmt = fmt_of(name)
        q, _ = quantize(x, fmt)
        smallest_normal = CODES[fmt.grid.name][2**fmt.grid.mantissa_bits]  # past 0 and the 2^m - 1 subnormals
        assert smallest_normal == {"e4m3": 2.0**-6, "e2m1": 1.0, "e2m3": 1.0, "e3m2": 0.25}[fmt.grid.name]
        expect = (q != 0) & (q.abs() < smallest_normal)
        assert torch.equal(subnormal_mask(x, fmt), expect)
    assert not subnormal_mask(x, fmt_of("per_token", 4)).any()


# ---------------------------------------------------------------------------------------------
# INT entries against the textbook INT quantizer of the test references, bit for bit.


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_entries_equal_the_reference_quantizer(bits):
    x = adversarial(10, shape=(2, 5, 48))
    names = {"per_token": None, "per_tensor": None, "per_channel": None,
             **{f"crossquant {a}": a for a in (0.0, 0.15, 0.5, 1.0)}}
    for label, alpha in names.items():
        name = label.split()[0]
        step = ref.step_for_sequence_batch(x, name, bits, alpha)  # (2, 5, 48)
        fmt = get_format(name, bits=bits, alpha=alpha)
        assert_bits_equal(scale(x, fmt).expand_as(x), step)
        assert_bits_equal(fake_quantize(x, fmt), ref.int_fake_quantize(x, step, bits))
        assert torch.equal(kernel_mask(x, fmt), torch.round(x / step) == 0)
        assert_bits_equal(zero_bound(x, fmt).expand_as(x), 0.5 * step)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_formats_equal_the_reference_weight_quantizer(bits):
    w = adversarial(11, shape=(2, 6, 300))[1]  # (O, I), I not a multiple of the group
    row = get_format("per_token", bits=bits)
    step = ref.int_weight_step(w, bits)
    assert_bits_equal(scale(w, row).expand_as(w), step)
    assert_bits_equal(fake_quantize(w, row), ref.int_fake_quantize(w, step, bits))
    for g in (128, 64, 7):
        fmt = get_format("per_group", bits=bits, block_size=g)
        step = ref.int_weight_step(w, bits, g)
        assert_bits_equal(expand_scale(scale(w, fmt), fmt, 300), step)
        assert_bits_equal(fake_quantize(w, fmt), ref.int_fake_quantize(w, step, bits))
        assert torch.equal(kernel_mask(w, fmt), torch.round(w / step) == 0)


# ---------------------------------------------------------------------------------------------
# torchao's pure-torch reference code.


def _torchao():
    pytest.importorskip("torchao")
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4
    return mx, nv, ScaleCalculationMode, f4_unpacked_to_f32, unpack_uint4


def torchao_mx(x: torch.Tensor, name: str):
    """(scale, grid values, dequantized) from torchao's to_mx / to_dtype."""
    from torchao.prototype.mx_formats import constants, kernels

    mx, _, mode, f4_to_f32, unpack = _torchao()
    elem = {"mxfp8": torch.float8_e4m3fn, "mxfp6_e2m3": constants.DTYPE_FP6_E2M3,
            "mxfp6_e3m2": constants.DTYPE_FP6_E3M2}.get(name, torch.float4_e2m1fn_x2)
    rule = mode.RCEIL if name == "mxfp4_rceil" else mode.FLOOR
    s, data = mx.to_mx(x.contiguous(), elem, 32, rule)
    if name == "mxfp8":
        q = data.float()
    elif name.startswith("mxfp6"):
        q = getattr(kernels, f"f6_{name[-4:]}_unpacked_to_f32")(data)
    else:
        q = f4_to_f32(unpack(data.view(torch.uint8)))
    deq = mx.to_dtype(data, s, elem, 32, x.dtype)
    return mx.get_fp_scale(s), q.reshape(x.shape), deq.reshape(x.shape)


def torchao_nvfp4(x2d: torch.Tensor):
    """(scale, grid values, dequantized) of one sequence from torchao's nvfp4_quantize."""
    _, nv, _, f4_to_f32, unpack = _torchao()
    g = nv.per_tensor_amax_to_scale(x2d.abs().amax())
    s8, data = nv.nvfp4_quantize(x2d.contiguous(), 16, g)
    q = f4_to_f32(unpack(data)).reshape(x2d.shape)
    s = g * s8.float()
    return s, q, (q.unflatten(-1, (-1, 16)) * s.unsqueeze(-1)).flatten(-2)


def normal_range_input(seed: int, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 128, generator=gen) * torch.logspace(-6, 6, 128).roll(seed * 7, 0)
    x[0, 0, :32] = 0.0  # an all-zero MX block
    x[1, 2] = 0.0  # an all-zero row
    x[1, 3, 40] = x[1, 3].abs().max() * 4  # a lone block max
    return x.to(dtype)


@pytest.mark.parametrize("name", ["mxfp8", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "mxfp4_rceil"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mx_equals_torchao_to_mx(name, dtype):
    for seed in range(3):
        x = normal_range_input(seed, dtype)
        s, q, deq = torchao_mx(x, name)
        my_q, my_s = quantize(x, get_format(name))
        assert_bits_equal(my_s, s)
        assert_bits_equal(my_q, q)
        assert_bits_equal(fake_quantize(x, get_format(name)), deq)


def test_nvfp4_equals_torchao_away_from_rounding_ties():
    for seed in range(3):
        for dtype in (torch.float32, torch.bfloat16):
            x = normal_range_input(seed, dtype)
            fmt = get_format("nvfp4")
            for b in range(2):
                s, q, deq = torchao_nvfp4(x[b])
                my_q, my_s = quantize(x[b], fmt)
                assert_bits_equal(my_s, s)
                assert_bits_equal(my_q, q)
                assert_bits_equal(fake_quantize(x[b].float(), fmt), deq)


# Where DESIGN.md §1b and torchao 0.18 part ways; each test pins both outputs.


def test_nvfp4_divides_by_the_scale_where_torchao_multiplies_by_a_reciprocal():
    # torchao scales by (1/G)/e4m3_block rounded twice; DESIGN.md divides by s = G·e4m3_block, so the
    # tie |x / s| = 1/4 is in the kernel here and not in torchao.
    x = torch.zeros(1, 16)
    x[0, 0] = 7.0
    s = scale(x, get_format("nvfp4"))[0, 0]
    x[0, 1] = 0.25 * s  # 0.2916666865348816
    mine, _ = quantize(x, get_format("nvfp4"))
    _, theirs, _ = torchao_nvfp4(x)
    assert mine[0, :2].tolist() == [6.0, 0.0] and theirs[0, :2].tolist() == [6.0, 0.5]
    assert kernel_mask(x, get_format("nvfp4"))[0, 1]


def test_nvfp4_all_zero_sequence_is_zero_where_torchao_gives_nan():
    x = torch.zeros(2, 16)
    _, _theirs, deq = torchao_nvfp4(x)
    assert deq.isnan().all()
    assert torch.equal(fake_quantize(x, get_format("nvfp4")), x)


def test_mx_floor_smallest_scale_where_torchao_quantizes_with_2_to_the_minus_126():
    # E8M0 code 0 is 2^-127; torchao divides by max(2^-127, 2^-126) but multiplies back by 2^-127.
    x = torch.zeros(1, 32)
    x[0, 0] = 2.0**-120
    s, q, deq = torchao_mx(x, "mxfp8")
    my_q, my_s = quantize(x, get_format("mxfp8"))
    assert s.item() == my_s.item() == 2.0**-127
    assert my_q[0, 0].item() == 128.0 and q[0, 0].item() == 64.0
    assert fake_quantize(x, get_format("mxfp8"))[0, 0].item() == 2.0**-120 and deq[0, 0].item() == 2.0**-121


def test_mx_rceil_exact_ceiling_where_torchao_log2_rounds_down():
    # amax/6 one ulp above 2^-20: ⌈log2⌉ = -19, but float32 log2 returns exactly -20.0.
    a = nextafter(torch.tensor(6.0 * 2.0**-20), math.inf)
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = a, a / 16
    s, q, _ = torchao_mx(x, "mxfp4_rceil")
    my_q, my_s = quantize(x, get_format("mxfp4_rceil"))
    assert my_s.item() == 2.0**-19 and s.item() == 2.0**-20
    assert my_q[0, :2].tolist() == [3.0, 0.0] and q[0, :2].tolist() == [6.0, 0.5]


def test_mx_rceil_tiny_block_where_torchao_leaves_it_unscaled():
    # E8M0 code 0: torchao multiplies by 1.0 instead of 2^127, so the whole block rounds to zero.
    x = torch.zeros(1, 32)
    x[0, 0] = 2.0**-126
    s, q, _ = torchao_mx(x, "mxfp4_rceil")
    my_q, my_s = quantize(x, get_format("mxfp4_rceil"))
    assert my_s.item() == s.item() == 2.0**-127
    assert my_q[0, 0].item() == 2.0 and q[0, 0].item() == 0.0


@pytest.mark.parametrize("grid, codes", [(E4M3, E4M3_CODES), (E2M1, E2M1_CODES), (E2M3, E2M3_CODES),
                                         (E3M2, E3M2_CODES)], ids=["e4m3", "e2m1", "e2m3", "e3m2"])
def test_subnormal_range_is_what_rounding_decides(grid, codes):
    # every code, every midpoint between codes, each one float32 ulp either side, and random values
    table = torch.tensor(codes, dtype=torch.float32)
    mids = (table[1:] + table[:-1]) / 2
    v = torch.cat([table, mids, torch.rand(3000) * 2 * grid.min_normal])
    up, down = torch.nextafter(v, torch.tensor(math.inf)), torch.nextafter(v, torch.tensor(-math.inf))
    v = torch.cat([v, up, down])
    lo, hi = grid.subnormal_range
    rounded = [naive_round(float(x), codes) for x in v]
    expected = torch.tensor([0 < abs(r) < grid.min_normal for r in rounded])
    assert torch.equal((v.abs() > lo) & (v.abs() < hi), expected)
    assert int_grid(8).subnormal_range is None
