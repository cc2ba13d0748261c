"""Deployment targets: one library's quantization scheme, computed with that library's own arithmetic.

The formats of :mod:`kernelscope.quant.formats` are the paper's quantizers, exact to their own
definitions (an INT8 step of ``amax / 127``, levels ±127, a step floor of 1e-5). A deploying library
defines its schemes differently, and on real weights the difference is not academic: the last bit of
``x / s`` decides exact ties, so only the same operations, in the same order and the same dtype, give
the model that library produces. A :class:`Target` is such a scheme as data: the arguments of its
weight and input-activation quantizers (:class:`Args`, the fields of a compressed-tensors
``QuantizationArgs`` that decide the arithmetic), the library it names and the version its arithmetic
was checked against, bit for bit, in the tests.

compressed-tensors' arithmetic (the library under llm-compressor and vLLM), symmetric quantizers:

- range: INT-N levels ``[-2^(N-1), 2^(N-1) - 1]``; FP8 E4M3 ±448, FP6 E2M3 ±7.5, FP4 E2M1 ±6;
- scale: ``amax / (span / 2)`` with ``span = qmax - qmin`` (so INT8 divides by 127.5), computed in the
  dtype of the observed tensor; times the tensor-group (global) scale; rounded to ``scale_dtype``
  (E4M3 for NVFP4; E8M0 exponents for MX, from the block maximum rounded to a power of two); a zero
  scale becomes that dtype's eps (0.125 for E4M3, 1 for E8M0 exponents, else ``finfo.eps``);
- fake quantization: ``x / s`` (``s`` divided by the global scale first), clamped to the range, then
  rounded (``torch.round`` for INT, the cast to E4M3, the nearest E2M3/E2M1 value, ties to even), times
  ``s``;
- where a scale comes from: ``dynamic`` from each tensor as it comes (per token, per tensor, per group);
  static weights from the weight's own min and max; static activations from the min and max over every
  calibration input (the ``static_minmax`` observer); NVFP4's ``local`` activations take block scales
  from each tensor under a calibrated global scale ``448·6 / amax``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import torch

from kernelscope.quant import quant_cfg
from kernelscope.quant.formats import E2M1, E2M3, E4M3, FULL_PRECISION_BITS, stored_bits
from kernelscope.quant.transforms import MODELOPT_SMOOTHQUANT


class Kind(StrEnum):
    INT = "int"
    FLOAT = "float"


class Strategy(StrEnum):
    """What one scale covers."""

    TENSOR = "tensor"
    CHANNEL = "channel"  # a weight's output channel
    TOKEN = "token"  # an activation's token (dynamic only)
    GROUP = "group"  # group_size consecutive inputs of a row
    TENSOR_GROUP = "tensor_group"  # groups under one global scale (NVFP4)


class Arithmetic(StrEnum):
    """Whose operations a quantizer runs."""

    COMPRESSED_TENSORS = "compressed-tensors"  # x / s in the tensor's dtype, s = amax / (span / 2)
    MODELOPT = "modelopt"  # float32: x · (qmax / amax), rounded, clamped, divided by the same multiplier

    @property
    def fuses_part_of_a_group(self) -> bool:
        """Whether the quantized layers of a fused group (:data:`FUSED`) share one NVFP4 weight scale
        when the group is quantized only in part: ModelOpt's export fuses the quantized linears that
        share an input, whichever they are; llm-compressor needs the whole group (it asserts otherwise)."""
        return self is Arithmetic.MODELOPT

    @property
    def calibration_attention(self) -> str | None:
        """How the library's calibration passes compute attention: llm-compressor forces eager attention
        (``calibration_forward_context``), which moves activation maxima by a few ulps against sdpa;
        ModelOpt runs the model as it is (None)."""
        return "eager" if self is Arithmetic.COMPRESSED_TENSORS else None


class Scaling(StrEnum):
    """When a scale is computed."""

    STATIC = "static"  # once: from the weight itself, or calibrated on activations by an observer
    DYNAMIC = "dynamic"  # from each tensor as it comes
    LOCAL = "local"  # block scales from each tensor, the global scale calibrated (NVFP4 activations)


FLOAT_MAX = {8: 448.0, 6: 7.5, 4: 6.0}
_ELEMENT_NAMES = {8: "e4m3", 6: "e2m3", 4: "e2m1"}
"""A float element's largest value by width: E4M3, E2M3, E2M1 (the only float elements it has)."""
MX_ROUNDING_MANTISSA = {8: 1, 6: 3, 4: 1}
"""How many mantissa bits of the block maximum the MX scale keeps before rounding to a power of two:
the library uses E2M3's three for FP6 and E2M1's one otherwise (MXFP8 included)."""
SCALE_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "uint8": torch.uint8}
"""``scale_dtype`` values: E4M3 block scales (NVFP4), E8M0 exponents as uint8 (MX)."""
MODELOPT_BLOCKS = {("float8_e4m3fn", 16): Strategy.TENSOR_GROUP, ("uint8", 32): Strategy.GROUP}
"""ModelOpt's FP4 block quantizers kernelscope computes, by (scale dtype, block): NVFP4 (E4M3 block scales
under a global amax) and MXFP4 (E8M0 block scales)."""
OBSERVERS = ("minmax", "static_minmax", "memoryless_minmax", "max")
"""Observers whose result, on one tensor, is its min and max (a weight's scales); of a sequence of
calibration batches only ``static_minmax`` (and ModelOpt's ``max``) keep the min and max of them all."""
STATIC_MINMAX = "static_minmax"
_OBSERVED = {
    None: "its observer is not named, and llm-compressor picks one by version",
    "minmax": "llm-compressor's minmax observer keeps a moving average of each batch's min and max "
              "(constant 0.01), which depends on the batches' order and size (oneshot shuffles them)",
    "memoryless_minmax": "memoryless_minmax keeps the last calibration batch's min and max only",
}
"""Why a static activation observer other than ``static_minmax`` is refused."""


@dataclass(frozen=True)
class Args:
    """One quantizer of a target: the ``QuantizationArgs`` fields that decide its arithmetic."""

    num_bits: int
    kind: Kind
    strategy: Strategy
    group_size: int | None = None
    scaling: Scaling = Scaling.STATIC
    scale_dtype: str | None = None
    observer: str | None = None
    arithmetic: Arithmetic = Arithmetic.COMPRESSED_TENSORS
    narrow_range: bool = False  # ModelOpt INT: levels ±(2^(N-1) - 1) instead of [-2^(N-1), 2^(N-1) - 1]

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))
        object.__setattr__(self, "arithmetic", Arithmetic(self.arithmetic))
        if self.narrow_range and (self.arithmetic is not Arithmetic.MODELOPT or self.kind is not Kind.INT):
            raise ValueError("a narrow range is modelled for ModelOpt's INT quantizers only")
        object.__setattr__(self, "strategy", Strategy(self.strategy))
        if self.arithmetic is Arithmetic.MODELOPT and not self._modelopt_modelled:
            raise ValueError("ModelOpt's arithmetic is modelled for INT and FP8 E4M3 per tensor, channel "
                             "or token, NVFP4 (E2M1 in blocks of 16 under E4M3 scales) and MXFP4 (E2M1 in "
                             "blocks of 32 under E8M0 scales) only")
        object.__setattr__(self, "scaling", Scaling(self.scaling))
        grouped = self.strategy in (Strategy.GROUP, Strategy.TENSOR_GROUP)
        if grouped != (self.group_size is not None) or (grouped and self.group_size < 1):
            raise ValueError(f"strategy {self.strategy} {'needs' if grouped else 'takes no'} group_size")
        if self.kind is Kind.INT and not 2 <= self.num_bits <= 8:
            raise ValueError(f"int quantization takes 2 to 8 bits, got {self.num_bits}")
        if self.kind is Kind.FLOAT and self.num_bits not in FLOAT_MAX:
            raise ValueError(f"float quantization takes 4, 6 or 8 bits, got {self.num_bits}")
        if self.strategy is Strategy.TOKEN and self.scaling is not Scaling.DYNAMIC:
            raise ValueError("a per-token scale is dynamic")
        if self.scaling is Scaling.LOCAL and self.strategy is not Strategy.TENSOR_GROUP:
            raise ValueError("local scaling goes with the tensor_group strategy only")
        if self.scale_dtype is not None and self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype {self.scale_dtype!r}: choose from {', '.join(SCALE_DTYPES)}")
        if self.observer is not None and self.observer not in OBSERVERS:
            raise ValueError(f"observer {self.observer!r} is not a min-max observer; kernelscope runs "
                             f"only {', '.join(OBSERVERS)}")

    @property
    def _modelopt_modelled(self) -> bool:
        """A quantizer whose ModelOpt arithmetic kernelscope computes."""
        if self.group_size is None:
            return self.scale_dtype is None and (self.kind is Kind.INT or self.num_bits == 8)
        block = MODELOPT_BLOCKS.get((self.scale_dtype, self.group_size))
        return self.kind is Kind.FLOAT and self.num_bits == 4 and block is self.strategy

    @property
    def dynamic(self) -> bool:
        """True when some scale comes from each tensor as it comes."""
        return self.scaling is not Scaling.STATIC

    @property
    def qrange(self) -> tuple[float, float]:
        if self.kind is Kind.INT:
            return -(2.0 ** (self.num_bits - 1)), 2.0 ** (self.num_bits - 1) - 1
        return -FLOAT_MAX[self.num_bits], FLOAT_MAX[self.num_bits]

    @property
    def element(self) -> str:
        """The element grid by kernelscope's name of it: int8, e4m3, e2m3, e2m1."""
        return f"int{self.num_bits}" if self.kind is Kind.INT else _ELEMENT_NAMES[self.num_bits]

    @property
    def tau(self) -> float:
        """The element grid's zero threshold: ``|x / s| <= τ`` rounds to zero (ties go to the even zero)."""
        return 0.5 if self.kind is Kind.INT else {8: E4M3, 6: E2M3, 4: E2M1}[self.num_bits].tau

    @property
    def saturation_scale(self) -> float:
        """The λ from which ``|x / s| <= λ·τ`` holds for every element a dynamic scale leaves in range."""
        return max(abs(v) for v in self.qrange) / self.tau

    @property
    def is_mx(self) -> bool:
        """An MX format: float elements in groups of 32 under E8M0 exponents."""
        return self.kind is Kind.FLOAT and self.group_size == 32 and self.scale_dtype == "uint8"

    @property
    def label(self) -> str:
        group = f" g{self.group_size}" if self.group_size else ""
        narrow = " narrow" if self.narrow_range else ""
        return f"{self.kind}{self.num_bits}{narrow} {self.strategy}{group} {self.scaling}"

    def as_dict(self) -> dict:
        """The compressed-tensors ``QuantizationArgs`` fields, as a recipe writes them."""
        d = {"num_bits": self.num_bits, "type": str(self.kind), "strategy": str(self.strategy),
             "symmetric": True, "dynamic": {Scaling.STATIC: False, Scaling.DYNAMIC: True,
                                            Scaling.LOCAL: "local"}[self.scaling]}
        if self.group_size is not None:
            d["group_size"] = self.group_size
        if self.scale_dtype is not None:
            d["scale_dtype"] = self.scale_dtype
        if self.observer is not None:
            d["observer"] = self.observer
        return d


# -- the arithmetic ---------------------------------------------------------------------------------

def _eps(args: Args, dtype: torch.dtype) -> float:
    """What a zero scale becomes: the eps of the scale's dtype (0.125 for E4M3, 1 for E8M0)."""
    if args.scale_dtype == "float8_e4m3fn":
        return 0.125
    if args.scale_dtype == "uint8":
        return 1.0
    return torch.finfo(dtype).eps


_FIELDS = {torch.float32: (23, 8), torch.bfloat16: (7, 8), torch.float16: (10, 5), torch.float64: (52, 11)}
"""(mantissa bits, exponent bits) of each float dtype a block maximum can come in."""


def _power_of_two_exponent(amax: torch.Tensor, args: Args) -> torch.Tensor:
    """The biased E8M0 exponent of an MX block: its maximum rounded to a power of two (upwards once its
    mantissa reaches the rounding point), less the element's ⌊log2 max⌋, plus 127; in ``amax``'s dtype."""
    mantissa_bits, exponent_bits = _FIELDS[amax.dtype]
    as_int = {2: torch.uint16, 4: torch.uint32, 8: torch.uint64}[amax.element_size()]
    bits = amax.view(as_int).to(torch.int64 if as_int is torch.uint64 else torch.int32)
    carry = 1 << (mantissa_bits - MX_ROUNDING_MANTISSA[args.num_bits] - 1)
    sign_exponent = ((1 << (exponent_bits + 1)) - 1) << mantissa_bits
    rounded = torch.bitwise_and(bits + carry, sign_exponent)
    power = (rounded.to(as_int) if as_int is torch.uint16 else rounded).view(amax.dtype)
    offset = math.floor(math.log2(FLOAT_MAX[args.num_bits]))
    return 127 + torch.floor(torch.log2(power)) - offset


def _to_scale_dtype(scale: torch.Tensor, args: Args) -> torch.Tensor:
    """``scale`` rounded to ``args.scale_dtype`` (saturating) and back to its own dtype."""
    target = SCALE_DTYPES[args.scale_dtype]
    if target.is_floating_point:
        info = torch.finfo(target)
        return torch.clamp(scale, info.min, info.max).to(target).to(scale.dtype)
    info = torch.iinfo(target)
    return torch.round(torch.clamp(scale, info.min, info.max)).to(target).to(scale.dtype)


def scale_of(amin: torch.Tensor, amax: torch.Tensor, args: Args,
             global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The scale of each unit from its min and max (any shape, the observed tensor's dtype)."""
    amin = torch.min(amin, torch.zeros_like(amin))
    amax = torch.max(amax, torch.zeros_like(amax))
    magnitude = torch.max(torch.abs(amin), torch.abs(amax))
    if args.is_mx:
        scale = _power_of_two_exponent(magnitude, args)
    else:
        qmin, qmax = (torch.tensor(v) for v in args.qrange)
        scale = magnitude / ((qmax - qmin).to(magnitude.dtype) / 2)
    if global_scale is not None:
        scale = global_scale * scale
    if args.scale_dtype is not None:
        scale = _to_scale_dtype(scale, args)
    if args.is_mx:
        scale = (2.00 ** ((scale.to(torch.int32) - 127).to(torch.float))).to(scale.dtype)
    scale = torch.where(scale == 0, torch.tensor(_eps(args, scale.dtype), dtype=scale.dtype), scale)
    return scale.reshape(1) if scale.ndim == 0 else scale


def global_scale_of(amin: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """NVFP4's global scale ``448·6 / amax`` (float32, shape (1,)); 1 where that is not finite."""
    amin = torch.min(amin, torch.zeros_like(amin))
    amax = torch.max(amax, torch.zeros_like(amax))
    magnitude = torch.max(torch.abs(amin), torch.abs(amax))
    magnitude = torch.clamp(magnitude, min=torch.finfo(magnitude.dtype).tiny)
    scale = FLOAT_MAX[8] * FLOAT_MAX[4] / magnitude
    return torch.nan_to_num(scale, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32).reshape([1])


def _round(t: torch.Tensor, args: Args) -> torch.Tensor:
    """``t`` (already clamped to the range) rounded to the element grid, ties to even, same dtype."""
    if args.kind is Kind.INT:
        return torch.round(t)
    if args.num_bits == 8:
        return t.to(torch.float8_e4m3fn).to(t.dtype)
    grid = E2M1 if args.num_bits == 4 else E2M3
    return grid.round(t.float()).to(t.dtype)


def in_kernel(scaled: torch.Tensor, args: Args, kernel_scale: float = 1.0) -> torch.Tensor:
    """Where the library's quotient ``x / s`` (as it computes it) is at most ``kernel_scale·τ`` in
    magnitude: at 1, exactly where the element rounds to zero; NaN never."""
    return scaled.float().abs() <= kernel_scale * args.tau


def _quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, args: Args, global_scale: torch.Tensor | None,
                         kernel_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dequantized, kernel)``: ``x`` through the grid at ``scale`` (broadcast), and its kernel at
    ``kernel_scale`` (at 1, where it rounded to zero). A zero point of zero is added and taken away as
    the library does (it turns -0 into +0)."""
    if global_scale is not None:
        scale = scale / global_scale
    scaled = x / scale
    scaled = scaled + torch.zeros((), dtype=x.dtype)
    qmin, qmax = (torch.tensor(v) for v in args.qrange)
    q = _round(torch.clamp(scaled, qmin, qmax), args)
    out = (q.to(scale.dtype) - torch.zeros((), dtype=scale.dtype)) * scale
    return out, in_kernel(scaled, args, kernel_scale)


_TINY_AMAX = 1.0 / (1 << 24)
"""ModelOpt treats an abs-max at or below 2⁻²⁴ as zero."""


def _modelopt(x: torch.Tensor, amax: torch.Tensor, args: Args,
              kernel_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ModelOpt's fake quantization on CPU, in float32: INT as ``round(x · qmax/amax)`` clamped to
    ``[-2^(N-1), qmax]`` (``[-qmax, qmax]`` with a narrow range) and divided by the multiplier
    (an abs-max ≤ 2⁻²⁴ quantizes to 0); FP8 as
    ``e4m3(clamp(x · 448/amax, ±448)) · fl(1 / (448/amax))`` (such an abs-max taken as 1)."""
    if args.group_size is not None:
        blocks = _modelopt_nvfp4 if args.strategy is Strategy.TENSOR_GROUP else _modelopt_mxfp4
        return blocks(x, amax, args, kernel_scale)
    dtype, xf, a = x.dtype, x.float(), amax.float()
    tiny = a <= _TINY_AMAX
    if args.kind is Kind.FLOAT:
        scale = 448.0 / torch.where(tiny, torch.ones_like(a), a)
        scaled = (xf * scale).clamp(min=-448.0, max=448.0)
        q = scaled.to(torch.float8_e4m3fn)
        return (q.to(torch.float32) * (1 / scale)).to(dtype), in_kernel(scaled, args, kernel_scale)
    top = torch.tensor(2.0 ** (args.num_bits - 1) - 1.0)
    scale = top / a
    scale = torch.where(tiny, torch.zeros_like(scale), scale)
    scaled = xf * scale
    q = torch.clamp(torch.round(scaled), -top if args.narrow_range else -top - 1, top)
    out = q / torch.where(tiny, torch.ones_like(scale), scale)
    return out.to(dtype), in_kernel(scaled, args, kernel_scale)


_E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
_E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_TIES = torch.tensor([0.75, 1.75, 3.5])
"""The E2M1 magnitudes, the midpoints between them, and the midpoints whose upper neighbour is even."""


def _e2m1_magnitude(scaled: torch.Tensor, ties_to_even: bool) -> torch.Tensor:
    """``|scaled|`` (float32) on the E2M1 grid as ModelOpt's pure-torch code rounds it: the code is the
    number of midpoints below it (so 6 above 5), a tie going down, or, with ``ties_to_even``, up at 0.75,
    1.75 and 3.5 (NVFP4QTensor._cast_fp4; MXFP4QTensor's cast_fp4 keeps them down)."""
    a = scaled.abs()
    code = torch.bucketize(a, _E2M1_BOUNDS.to(a.device))
    if ties_to_even:
        code += torch.isin(a, _E2M1_TIES.to(a.device))
    return _E2M1_VALUES.to(a.device)[code]


def _modelopt_nvfp4(x: torch.Tensor, amax: torch.Tensor, args: Args,
                    kernel_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ModelOpt's NVFP4 as its pure-torch code quantizes (NVFP4QTensor, what its checkpoint export
    writes): ``s2 = amax / (6·448)`` in float32; each block of 16 scaled by
    ``e4m3(clamp(bmax / (6·s2), 2⁻⁹, 448))·s2`` (a zero ratio taken as 1), float32 quotients rounded to
    E2M1 ties to even, saturating at 6."""
    g = args.group_size
    blocks = x.unflatten(-1, (x.shape[-1] // g, g))  # (..., I/g, g)
    second = amax.float() / (FLOAT_MAX[4] * FLOAT_MAX[8])
    ratio = blocks.abs().amax(dim=-1).float() / (FLOAT_MAX[4] * second)  # (..., I/g)
    ratio = torch.where(ratio == 0, torch.ones_like(ratio), ratio)
    step = ratio.clamp(min=2.0**-9, max=FLOAT_MAX[8]).to(torch.float8_e4m3fn).float() * second
    scaled = blocks / step.unsqueeze(-1)
    q = _e2m1_magnitude(scaled, ties_to_even=True).copysign(scaled) + 0.0  # its zero code decodes to +0
    out = q * step.unsqueeze(-1)
    return out.flatten(-2).to(x.dtype), in_kernel(scaled, args, kernel_scale).flatten(-2)  # (..., I)


def _modelopt_mxfp4(x: torch.Tensor, amax: torch.Tensor | None, args: Args,
                    kernel_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ModelOpt's MXFP4 as its pure-torch code quantizes (MXFP4QTensor, what its export writes): each
    block of 32 divided by ``2^ceil(max(log2(bmax / 6), -127))`` (float32 ``torch.log2``), rounded to E2M1
    with ties toward zero, saturating at 6. ``amax`` is not used: every scale comes from its block."""
    g = args.group_size
    blocks = x.unflatten(-1, (x.shape[-1] // g, g))  # (..., I/g, g)
    descale = blocks.float().abs().amax(dim=-1, keepdim=True) / FLOAT_MAX[4]  # (..., I/g, 1)
    power = torch.exp2(torch.ceil(torch.maximum(torch.log2(descale), torch.tensor(-127.0))))
    scaled = blocks / power
    magnitude = _e2m1_magnitude(scaled, ties_to_even=False)
    out = torch.where(scaled > 0, magnitude, -magnitude) * power  # a zero takes the sign bit, as it does
    return out.flatten(-2).to(x.dtype), in_kernel(scaled, args, kernel_scale).flatten(-2)  # (..., I)


def _abs_max(x: torch.Tensor, args: Args) -> torch.Tensor:
    """ModelOpt's abs-max of each unit: the whole tensor (NVFP4's global amax; MX blocks take none), each
    row (a weight's output channel) or each token (every axis but the last kept)."""
    if args.strategy is Strategy.GROUP:
        return torch.ones(())  # not used: an MX block's scale is its own
    if args.strategy in (Strategy.TENSOR, Strategy.TENSOR_GROUP):
        return x.abs().amax()
    return x.abs().amax(dim=-1, keepdim=True)  # (O, 1) | (..., T, 1)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, args: Args, global_scale: torch.Tensor | None = None,
                  kernel_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x fake-quantized, its kernel mask at kernel_scale)``, ``x (..., I)`` and its scales as the
    strategy lays them out: ``(..., I / g)`` per group, else broadcastable to ``x``. Output in ``x``'s
    dtype. Under ModelOpt's arithmetic ``scale`` is the unit's abs-max."""
    if args.arithmetic is Arithmetic.MODELOPT:
        return _modelopt(x, scale, args, kernel_scale)
    if args.group_size is None:
        out, zero = _quantize_dequantize(x, scale, args, global_scale, kernel_scale)
        return out.to(x.dtype), zero
    while scale.ndim < 2:
        scale = scale.unsqueeze(1)
    if x.shape[-1] % args.group_size:
        raise ValueError(f"{x.shape[-1]} inputs do not split into groups of {args.group_size}")
    groups = x.unflatten(-1, (x.shape[-1] // args.group_size, args.group_size))  # (..., I/g, g)
    out, zero = _quantize_dequantize(groups, scale.unsqueeze(-1), args, global_scale, kernel_scale)
    return out.flatten(-2).to(x.dtype), zero.flatten(-2)  # (..., I)


def observe(x: torch.Tensor, args: Args) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` of each unit of ``x`` a scale of ``args`` covers (a dynamic scale's reduction;
    a weight ``(O, I)``'s for a static one)."""
    if args.strategy is Strategy.TENSOR:
        return torch.aminmax(x)
    if args.strategy is Strategy.CHANNEL:
        return torch.amin(x, dim=-1, keepdim=True), torch.amax(x, dim=-1, keepdim=True)  # (O, 1)
    if args.strategy is Strategy.TOKEN:
        dims = tuple(range(2, x.ndim))
        if not dims:  # a 2-D input has no token axis the library keeps: one scale for all of it
            return torch.aminmax(x)
        return torch.amin(x, dim=dims, keepdim=True), torch.amax(x, dim=dims, keepdim=True)  # (B, T, 1)
    if x.shape[-1] % args.group_size:
        raise ValueError(f"{x.shape[-1]} inputs do not split into groups of {args.group_size}")
    groups = x.unflatten(-1, (x.shape[-1] // args.group_size, args.group_size))  # (..., I/g, g)
    return torch.amin(groups, dim=-1), torch.amax(groups, dim=-1)  # (..., I/g)


def dynamic_scale(x: torch.Tensor, args: Args, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The scale a dynamic quantizer computes from ``x`` itself (ModelOpt: its abs-max)."""
    if args.arithmetic is Arithmetic.MODELOPT:
        return _abs_max(x, args)
    return scale_of(*observe(x, args), args, global_scale)


@dataclass(frozen=True)
class Calibration:
    """What a static quantizer learnt: its scale and, for tensor groups, the global scale."""

    scale: torch.Tensor | None
    global_scale: torch.Tensor | None = None


def calibrate(amin: torch.Tensor, amax: torch.Tensor, args: Args, dtype: torch.dtype) -> Calibration:
    """The scales of a static quantizer (or an NVFP4 activation's global scale) from the min and max of
    everything its observer saw; a scale is stored in ``dtype`` (the layer's), a global one in float32.
    ModelOpt's max calibration keeps the abs-max itself."""
    if args.arithmetic is Arithmetic.MODELOPT:
        return Calibration(torch.max(torch.abs(amin), torch.abs(amax)))
    if args.strategy is Strategy.TENSOR_GROUP:
        return Calibration(None, global_scale_of(amin, amax))
    return Calibration(scale_of(amin, amax, args).to(dtype))


FUSED = (("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj"), ("q_a_proj", "kv_a_proj_with_mqa"),
         ("w1", "w3"))
"""Layers of one module that vLLM runs as one matrix, so that llm-compressor (0.14,
``fuse_weight_observers``) gives their tensor-group (NVFP4) weights one global scale, from the min and
max of all of them; ModelOpt's checkpoint export does the same with their amax (``preprocess_linear_fusion``
on the linears that share an input)."""


def fused_groups(names: Iterable[str], part: bool = False) -> dict[str, tuple[str, ...]]:
    """Each of ``names`` (module names) that belongs to a whole fused group among them -> that group;
    with ``part``, to the two or more members of a fused group that are among them."""
    present = set(names)
    groups: dict[str, tuple[str, ...]] = {}
    for name in present:
        parent, _, own = name.rpartition(".")
        for fused in FUSED:
            members = tuple(f"{parent}.{n}" if parent else n for n in fused)
            found = tuple(m for m in members if m in present)
            if own in fused and (found == members or (part and len(found) > 1)):
                groups[name] = found
    return groups


def split_fused_groups(quantized: Iterable[str], present: Iterable[str]) -> list[tuple[str, ...]]:
    """The fused groups among the module names ``present`` that ``quantized`` covers only in part."""
    covered = set(quantized)
    return sorted({group for group in fused_groups(present).values()
                   if any(m in covered for m in group) and not all(m in covered for m in group)})


def quantize_weight(w: torch.Tensor, args: Args, joint: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight ``(O, I)`` fake-quantized with scales from its own min and max (a tensor-group global
    scale from ``joint``, the min and max of its fused group, where it has one), and its kernel mask."""
    if args.arithmetic is Arithmetic.MODELOPT:
        amax = _abs_max(w, args) if joint is None else torch.max(joint[0].abs(), joint[1].abs())
        return _modelopt(w, amax, args)
    global_scale = None
    if args.strategy is Strategy.TENSOR_GROUP:
        global_scale = global_scale_of(*(joint if joint is not None else torch.aminmax(w)))
    scale = scale_of(*observe(w, args), args, global_scale).to(w.dtype)
    return fake_quantize(w, scale, args, global_scale)


def quantize_activation(x: torch.Tensor, args: Args, calibration: Calibration | None,
                        kernel_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """An input activation, exactly as the module receives it, fake-quantized; and its kernel mask
    (``|x / s| <= kernel_scale·τ``, at 1 where it rounded to zero)."""
    calibrated_amax = args.scaling is Scaling.LOCAL and args.arithmetic is Arithmetic.MODELOPT
    if args.scaling is Scaling.STATIC or calibrated_amax:  # ModelOpt's NVFP4 blocks sit under an amax
        if calibration is None or calibration.scale is None:
            raise ValueError(f"the static {args.label} activation quantizer is not calibrated")
        return fake_quantize(x, calibration.scale, args, kernel_scale=kernel_scale)
    global_scale = None
    if args.scaling is Scaling.LOCAL:
        if calibration is None or calibration.global_scale is None:
            raise ValueError(f"the {args.label} activation quantizer's global scale is not calibrated")
        global_scale = calibration.global_scale
    return fake_quantize(x, dynamic_scale(x, args, global_scale), args, global_scale, kernel_scale)


# -- the registry -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Coverage:
    """Which modules a recipe quantizes, as compressed-tensors matches them: a target or an ignore entry
    is ``re:PATTERN`` (matched from the start of the module's name), a module's exact name, or the name
    of one of its classes (``Linear``)."""

    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ()

    @staticmethod
    def _hit(entry: str, name: str, classes: tuple[str, ...]) -> bool:
        if entry.startswith("re:"):
            return re.match(entry.removeprefix("re:"), name) is not None
        return entry == name or entry in classes

    def covers(self, name: str, classes: tuple[str, ...]) -> bool:
        """True for a module ``name`` whose class and base classes are named ``classes``."""
        return (any(self._hit(t, name, classes) for t in self.targets)
                and not any(self._hit(i, name, classes) for i in self.ignore))

    def describe(self) -> str:
        return f"targets {', '.join(self.targets)}"


class Covers(Protocol):
    """Which modules a user's file quantizes (a recipe's targets and ignore, a ModelOpt quant_cfg)."""

    def covers(self, name: str, classes: tuple[str, ...]) -> bool:
        """True for the module ``name`` whose class and base classes are named ``classes``."""
        ...

    def describe(self) -> str:
        """What the file names, for a message that it matched nothing."""
        ...


@dataclass(frozen=True)
class Target:
    """A deployed scheme: its library, its name there, the arithmetic version it was checked against,
    and its weight and input-activation quantizers (None: left in full precision). ``coverage`` is the
    modules a user's file names; None for a preset, which covers the run's selected layers. ``shipped``
    is every module the preset quantizes as its library ships it, where that reaches beyond Linear
    layers (ModelOpt's turns on LayerNorm inputs): a model with such a module is refused."""

    library: str
    name: str
    checked: str
    weights: Args | None
    input_activations: Args | None
    coverage: Covers | None = None
    shipped: Covers | None = None
    smoothquant_alpha: float | None = None  # ModelOpt's smoothquant before quantizing, at this α

    @property
    def label(self) -> str:
        return f"{self.library}:{self.name}"

    @property
    def computes(self) -> tuple:
        """What decides the target's arithmetic: its quantizers and its smoothing (two names with the
        same are one scheme)."""
        return self.weights, self.input_activations, self.smoothquant_alpha

    @property
    def needs_calibration(self) -> bool:
        """True when an activation scale is calibrated on calibration windows before evaluation."""
        act = self.input_activations
        return act is not None and act.scaling is not Scaling.DYNAMIC

    @property
    def quantizes_activations(self) -> bool:
        return self.input_activations is not None

    @property
    def weight_bits(self) -> float:
        """Bits a weight parameter costs under the target: 8-bit block scales where it names a scale
        dtype (E4M3, E8M0), else 16-bit ones; full precision where it leaves weights alone."""
        w = self.weights
        if w is None:
            return float(FULL_PRECISION_BITS)
        return stored_bits(w.num_bits, w.group_size, 8 if w.scale_dtype is not None else FULL_PRECISION_BITS)


LLM_COMPRESSOR = "llm-compressor"
CHECKED = "compressed-tensors 0.20.1"


def _int(bits: int, strategy: Strategy, group: int | None = None, scaling: Scaling = Scaling.STATIC) -> Args:
    return Args(bits, Kind.INT, strategy, group, scaling)


def _fl(bits: int, strategy: Strategy, group: int | None = None, scaling: Scaling = Scaling.STATIC,
        scale_dtype: str | None = None, observer: str | None = None) -> Args:
    return Args(bits, Kind.FLOAT, strategy, group, scaling, scale_dtype, observer)


_TOKEN = (Strategy.TOKEN, None, Scaling.DYNAMIC)
_W8 = _int(8, Strategy.CHANNEL)
_NV_W = _fl(4, Strategy.TENSOR_GROUP, 16, scale_dtype="float8_e4m3fn")
_MX_W = {b: _fl(b, Strategy.GROUP, 32, scale_dtype="uint8") for b in (4, 6, 8)}
_MX_A = {b: _fl(b, Strategy.GROUP, 32, Scaling.DYNAMIC, "uint8") for b in (4, 8)}

_PRESETS: dict[str, tuple[Args | None, Args | None]] = {
    "W8A8": (_W8, _int(8, *_TOKEN)),
    "INT8": (_W8, _int(8, *_TOKEN)),
    **{f"W{w}A{a}": (_int(w, Strategy.GROUP, 128), _int(a, *_TOKEN) if a < 16 else None)
       for w in range(2, 9) for a in (4, 8, 16) if w <= a and (w, a) != (8, 8)},
    "W4AFP8": (_int(4, Strategy.GROUP, 128), _fl(8, *_TOKEN)),
    "FP8": (_fl(8, Strategy.TENSOR), _fl(8, Strategy.TENSOR, observer="static_minmax")),
    "FP8_DYNAMIC": (_fl(8, Strategy.CHANNEL), _fl(8, *_TOKEN)),
    "NVFP4A16": (_NV_W, None),
    "NVFP4": (_NV_W, _fl(4, Strategy.TENSOR_GROUP, 16, Scaling.LOCAL, "float8_e4m3fn", "static_minmax")),
    "MXFP4A16": (_MX_W[4], None),
    "MXFP4": (_MX_W[4], _MX_A[4]),
    "MXFP4XFP8": (_MX_W[4], _fl(8, Strategy.GROUP, 128, Scaling.DYNAMIC)),
    "MXFP6A16": (_MX_W[6], None),
    "MXFP6A8": (_MX_W[6], _MX_A[8]),
    "MXFP8A16": (_MX_W[8], None),
    "MXFP8": (_MX_W[8], _MX_A[8]),
}
"""llm-compressor's preset schemes (compressed-tensors ``PRESET_SCHEMES``) that kernelscope computes
exactly, by name. Not here: ``W4A16_ASYM`` (an asymmetric zero point) and ``FP8_BLOCK`` (128×128 weight
blocks), which kernelscope does not model."""

MODELOPT = "modelopt"
MODELOPT_CHECKED = "nvidia-modelopt 0.47.0"


def _mo(kind: Kind, bits: int, strategy: Strategy, scaling: Scaling = Scaling.STATIC) -> Args:
    return Args(bits, kind, strategy, None, scaling, observer="max" if scaling is Scaling.STATIC else None,
                arithmetic=Arithmetic.MODELOPT)


def modelopt_fp4(scale_dtype: str, block: int, scaling: Scaling) -> Args:
    """A ModelOpt FP4 block quantizer (NVFP4: its amax max-calibrated; MX: none)."""
    strategy = MODELOPT_BLOCKS[(scale_dtype, block)]
    observer = "max" if strategy is Strategy.TENSOR_GROUP else None
    return Args(4, Kind.FLOAT, strategy, block, scaling, scale_dtype, observer, Arithmetic.MODELOPT)


_MODELOPT_CONFIGS: dict[str, tuple[Args, Args]] = {
    "INT8_DEFAULT_CFG": (_mo(Kind.INT, 8, Strategy.CHANNEL), _mo(Kind.INT, 8, Strategy.TENSOR)),
    "FP8_DEFAULT_CFG": (_mo(Kind.FLOAT, 8, Strategy.TENSOR), _mo(Kind.FLOAT, 8, Strategy.TENSOR)),
    "FP8_PER_CHANNEL_PER_TOKEN_CFG": (_mo(Kind.FLOAT, 8, Strategy.CHANNEL),
                                      _mo(Kind.FLOAT, 8, Strategy.TOKEN, Scaling.DYNAMIC)),
    "INT8_SMOOTHQUANT_CFG": (_mo(Kind.INT, 8, Strategy.CHANNEL), _mo(Kind.INT, 8, Strategy.TENSOR)),
    "NVFP4_DEFAULT_CFG": (modelopt_fp4("float8_e4m3fn", 16, Scaling.STATIC),
                          modelopt_fp4("float8_e4m3fn", 16, Scaling.LOCAL)),
    "MXFP4_DEFAULT_CFG": (modelopt_fp4("uint8", 32, Scaling.STATIC),
                          modelopt_fp4("uint8", 32, Scaling.DYNAMIC)),
}
"""ModelOpt's ``mtq`` configs kernelscope computes exactly: every Linear but ``lm_head`` quantized, weights
from their own abs-max, static input abs-maxima calibrated by max over the calibration windows. INT and
FP8 in ModelOpt's CPU arithmetic (checked against its own functions and ``mtq.quantize``). NVFP4 and MXFP4,
which ModelOpt fake-quantizes only in CUDA kernels, in the arithmetic of its pure-torch quantizers
(``NVFP4QTensor``, ``MXFP4QTensor``: what its checkpoint export writes, fused q/k/v and gate/up weights
under one NVFP4 amax as that export gives them); its CUDA kernels differ from them in blocks whose scale
underflows (NVFP4) and in ties (MXFP4 rounds them to even there), see docs/deploy.md.
INT8_SMOOTHQUANT_CFG is INT8_DEFAULT_CFG's quantizers after ModelOpt's smoothquant (α 1,
:data:`~kernelscope.quant.transforms.MODELOPT_SMOOTHQUANT`)."""
MODELOPT_SMOOTHQUANT_ALPHA = {"INT8_SMOOTHQUANT_CFG": MODELOPT_SMOOTHQUANT.default}
"""ModelOpt's configs whose algorithm is its smoothquant, and their α."""

_AWQ = "it runs AWQ's search for per-channel scales, which kernelscope does not run"
_CUDA_ONLY = ("ModelOpt fake-quantizes it with CUDA kernels only, and kernelscope does not model its "
              "pure-torch MXFP8 quantizer (MXFP8QTensor)")
UNSUPPORTED = {
    f"{LLM_COMPRESSOR}:w4a16_asym": "its weights have an asymmetric zero point, which kernelscope does not "
                                    "model",
    f"{LLM_COMPRESSOR}:fp8_block": "its weights have 128x128 blocks, which kernelscope does not model",
    f"{MODELOPT}:w4a8_awq_beta_cfg": _AWQ,
    f"{MODELOPT}:int4_awq_cfg": _AWQ,
    f"{MODELOPT}:mxfp8_default_cfg": _CUDA_ONLY,
}
"""Targets a library has that kernelscope refuses, with the reason."""

TARGETS: dict[str, Target] = {
    **{f"{LLM_COMPRESSOR}:{name}".lower(): Target(LLM_COMPRESSOR, name, CHECKED, w, a)
       for name, (w, a) in _PRESETS.items()},
    **{f"{MODELOPT}:{name}".lower(): Target(MODELOPT, name, MODELOPT_CHECKED, w, a,
                                            shipped=quant_cfg.shipped(w is not None, a is not None),
                                            smoothquant_alpha=MODELOPT_SMOOTHQUANT_ALPHA.get(name))
       for name, (w, a) in _MODELOPT_CONFIGS.items()},
}
"""``library:NAME`` in lower case -> :class:`Target`."""


def get_target(text: str) -> Target:
    """The target ``library:NAME`` (case-insensitive)."""
    key = text.strip().lower()
    if key in TARGETS:
        return TARGETS[key]
    if key in UNSUPPORTED:
        raise ValueError(f"{text.strip()} is not supported: {UNSUPPORTED[key]}")
    library = key.partition(":")[0]
    names = [t.name for t in TARGETS.values() if t.library == library]
    if not names:
        libraries = sorted({t.library for t in TARGETS.values()})
        raise ValueError(f"unknown library {library!r} in {text.strip()!r}; choose from "
                         f"{', '.join(libraries)}")
    raise ValueError(f"unknown {library} scheme {text.strip()!r}; choose from {', '.join(names)}")


_REFUSED_FIELDS = {
    "actorder": "activation ordering belongs to GPTQ, which kernelscope does not run",
    "block_structure": "2-D weight blocks are not modelled",
    "observer_kwargs": "kernelscope's observers take no arguments",
}
_FIELDS_READ = {"num_bits", "type", "symmetric", "group_size", "strategy", "dynamic", "observer",
                "scale_dtype", "zp_dtype", *_REFUSED_FIELDS}


def _strategy_of(fields: dict) -> Strategy:
    """The strategy given, or the one compressed-tensors infers from the group size."""
    if fields.get("strategy") is not None:
        try:
            return Strategy(str(fields["strategy"]).lower())
        except ValueError:
            raise ValueError(f"strategy {fields['strategy']!r} is not modelled; kernelscope has "
                             f"{', '.join(Strategy)}") from None
    group = fields.get("group_size")
    return Strategy.TENSOR if group is None else Strategy.CHANNEL if group == -1 else Strategy.GROUP


def args_from_dict(fields: dict, role: str) -> Args:
    """:class:`Args` from a recipe's ``QuantizationArgs`` fields (``weights`` or ``input_activations``),
    with compressed-tensors' defaults (8-bit symmetric INT, static) and its inference of the strategy;
    a field that asks for anything but round-to-nearest with a min-max scale is refused with the reason."""
    unknown = sorted(set(fields) - _FIELDS_READ)
    if unknown:
        raise ValueError(f"{role}: unknown field {unknown[0]!r}")
    for name, why in _REFUSED_FIELDS.items():
        if fields.get(name):
            raise ValueError(f"{role}: {name} is not supported ({why})")
    if fields.get("symmetric", True) is not True:
        raise ValueError(f"{role}: asymmetric quantization (a zero point) is not modelled")
    strategy = _strategy_of(fields)
    group = fields.get("group_size") if strategy in (Strategy.GROUP, Strategy.TENSOR_GROUP) else None
    dynamic = fields.get("dynamic", False)
    scaling = (Scaling.LOCAL if str(dynamic).lower() == "local" else
               Scaling.DYNAMIC if dynamic is True or str(dynamic).lower() == "true" else Scaling.STATIC)
    scale_dtype = fields.get("scale_dtype")
    if scale_dtype is not None:
        scale_dtype = str(scale_dtype).removeprefix("torch.")
    args = Args(int(fields.get("num_bits", 8)), Kind(str(fields.get("type", "int")).lower()), strategy, group,
                scaling, scale_dtype, fields.get("observer"))
    static = args.scaling is Scaling.STATIC
    if role == "input_activations" and static and args.strategy is not Strategy.TENSOR:
        raise ValueError(f"{role}: static {args.strategy} activation scales are not modelled (static "
                         "activations: per tensor)")
    if role == "input_activations" and args.scaling is not Scaling.DYNAMIC and args.observer != STATIC_MINMAX:
        raise ValueError(f"{role}: {_OBSERVED.get(args.observer, f'observer {args.observer!r}')}, which "
                         f"kernelscope does not reproduce; it calibrates with observer: {STATIC_MINMAX} (the "
                         "min and max over every calibration batch)")
    return args


def target_rows() -> list[dict]:
    """Every target and every refused one, as ``kernelscope targets`` lists them."""
    rows = [{"scheme": t.label, "library": t.library, "checked": t.checked,
             "weights": t.weights.label if t.weights else None,
             "input_activations": t.input_activations.label if t.input_activations else None,
             "calibrated": t.needs_calibration,
             "smoothquant_alpha": t.smoothquant_alpha, "refused": None} for t in TARGETS.values()]
    rows += [{"scheme": key, "library": key.partition(":")[0], "checked": None, "weights": None,
              "input_activations": None, "calibrated": None, "smoothquant_alpha": None, "refused": why}
             for key, why in UNSUPPORTED.items()]
    return rows
