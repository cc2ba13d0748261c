"""Number formats as data: a scale rule, an element grid and the zero threshold τ (DESIGN.md §1b).

Every deployed quantizer divides ``x`` by a scale ``s``, rounds the quotient to an element grid
(round to nearest, ties to even, saturating at ±max) and multiplies back. Its kernel is
``{x : |x / s| <= τ}`` with τ half the smallest positive grid value, so the zero bound is ``τ · s``.
A format is therefore three pieces of data: an :class:`ElementGrid`, a :class:`ScaleRule` and, for
block formats, a block size. :data:`FORMATS` names the ones people deploy.

``x`` is an activation ``(..., T, I)`` — one sequence per leading index — or a weight ``(O, I)``
(one "sequence" whose rows are the output channels). No statistic reduces over the leading axes.
Everything is computed in float32 (the formats are defined on float32 values); results of
:func:`fake_quantize` come back in ``x``'s dtype.

==================  =========================================================  ===================
format              scale s (one sequence)                                     scale shape
==================  =========================================================  ===================
per_tensor          max(max|X| / qmax, 1e-5)                                   (..., 1, 1)
per_token           max(t_i / qmax, 1e-5); on a weight: per output channel     (..., T, 1)
per_channel         max(c_j / qmax, 1e-5) (activation channels)                (..., 1, I)
crossquant          max(t_i^α · c_j^(1-α) / qmax, 1e-5)                        (..., T, I)
per_group           max(amax_b / qmax, 1e-5), g consecutive inputs of a row    (..., T, ⌈I/g⌉)
fp8_per_token       max(t_i / 448, 1 / (448·512))                              (..., T, 1)
fp8_per_tensor      max|X| / 448                                               (..., 1, 1)
mxfp8               2^clamp(⌊log2 amax_b⌋ − 8, −127, 127), block 32            (..., T, ⌈I/32⌉)
mxfp6_e2m3, _e3m2   2^clamp(⌊log2 amax_b⌋ − 2 or − 4, −127, 127), block 32     (..., T, ⌈I/32⌉)
mxfp4               2^clamp(⌊log2 amax_b⌋ − 2, −127, 127), block 32            (..., T, ⌈I/32⌉)
mxfp4_rceil         2^clamp(⌈log2(amax_b / 6)⌉, −127, 127), block 32           (..., T, ⌈I/32⌉)
nvfp4               G · e4m3(clamp(amax_b/6/G, 2⁻⁶, 448)), G = max|X| / 2688   (..., T, ⌈I/16⌉)
==================  =========================================================  ===================

A block is ``block_size`` consecutive input channels of one row; a last block shorter than that is
a block of its own. A zero scale (only an all-zero sequence under ``fp8_per_tensor`` or ``nvfp4``)
divides by 1 instead, so that sequence quantizes to zeros, all in the kernel, with no NaN.

References: OCP Microscaling Formats (MX) v1.0 (E8M0 scales, FLOOR rule); NVIDIA cuBLAS block
scaling (RCEIL); torchao ``to_mx`` and ``nvfp4_quantize`` (two-level NVFP4); vLLM dynamic FP8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import torch

from kernelscope.quant.primitives import (
    MAX_BITS,
    MIN_BITS,
    STEP_FLOOR,
    ActivationRanges,
    absmax_scale,
    activation_ranges,
    check_alpha,
    crossquant_step,
    qmax_for_bits,
)

_F32_MANTISSA = 23
_F32_BIAS = 127
E8M0_MIN_EXPONENT = -127
E8M0_MAX_EXPONENT = 127


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2^e as float32, built from its bits: exact for integer ``e`` in [-149, 127], subnormals too."""
    e = exponent.to(torch.int32)
    normal = (e + _F32_BIAS).clamp_min(0) << _F32_MANTISSA
    subnormal = torch.ones_like(e) << (e + 149).clamp(0, _F32_MANTISSA - 1)
    return torch.where(e >= 1 - _F32_BIAS, normal, subnormal).view(torch.float32)


def _exponent_field(a: torch.Tensor) -> torch.Tensor:
    """⌊log2 a⌋ read from the exponent field of float32 ``a >= 0`` (-127 for zero and subnormals)."""
    return ((a.view(torch.int32) >> _F32_MANTISSA) & 0xFF) - _F32_BIAS


@dataclass(frozen=True)
class ElementGrid:
    """The values a quantized element can take: symmetric integers or a small sign-magnitude float.

    An integer grid has ``exponent_bits == 0``: levels ``-qmax..qmax`` with ``qmax = 2^(bits-1) - 1``.
    A float grid has ``exponent_bits`` and ``mantissa_bits`` (bias ``2^(e-1) - 1``), subnormals down
    to ``min_subnormal`` and a largest finite value ``max_value`` (448 for E4M3 "fn", whose top code
    is NaN; 6 for E2M1). Rounding is to nearest, ties to even; beyond ±max it saturates, or gives
    NaN when ``saturating`` is False.
    """

    name: str
    bits: int
    max_value: float
    min_subnormal: float = 1.0
    exponent_bits: int = 0
    mantissa_bits: int = 0
    saturating: bool = True

    def __post_init__(self) -> None:
        if self.is_int:
            if self.max_value != qmax_for_bits(self.bits) or self.min_subnormal != 1.0 or self.mantissa_bits:
                raise ValueError(f"integer grid {self.name!r} must have qmax = 2^(bits-1)-1 and step 1")
            return
        e, m = self.exponent_bits, self.mantissa_bits
        if e < 1 or m < 0 or self.bits != 1 + e + m:
            raise ValueError(f"float grid {self.name!r}: bits must be 1 + exponent_bits + mantissa_bits")
        if self.min_subnormal != 2.0 ** (2 - 2 ** (e - 1) - m):
            raise ValueError(f"float grid {self.name!r}: smallest subnormal must be 2^(2 - bias - m)")
        top = math.floor(math.log2(self.max_value)) if self.max_value > 0 else -math.inf
        if not self.min_normal <= self.max_value or top > 2**e - 1 - (2 ** (e - 1) - 1):
            raise ValueError(f"float grid {self.name!r}: max_value out of the exponent range")
        if (self.max_value / 2.0**top * 2**m) % 1:
            raise ValueError(f"float grid {self.name!r}: max_value needs more than {m} mantissa bits")

    @property
    def is_int(self) -> bool:
        return self.exponent_bits == 0

    @property
    def tau(self) -> float:
        """Zero threshold, half the smallest positive value: 1/2 (INT), 2⁻¹⁰ (E4M3), 1/4 (E2M1)."""
        return self.min_subnormal / 2

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value: 2⁻⁶ (E4M3), 1 (E2M1); 1 for INT, which has no subnormals."""
        return self.min_subnormal * 2.0**self.mantissa_bits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value: 1 - bias (-6 for E4M3, 0 for E2M1); 0 for INT."""
        return 0 if self.is_int else 1 - (2 ** (self.exponent_bits - 1) - 1)

    @property
    def emax(self) -> int:
        """Exponent of the largest power of two on the grid (8 for E4M3, 2 for E2M1): MX's shift."""
        return math.floor(math.log2(self.max_value))

    def round(self, v: torch.Tensor) -> torch.Tensor:
        """float32 ``v`` rounded to the grid: nearest, ties to even, saturating (or NaN) beyond ±max.

        A float is rounded with the spacing of its own binade, ``2^(max(⌊log2|v|⌋, emin) − m)``, so the
        division and multiplication by the spacing are exact and only ``torch.round`` rounds.
        """
        if self.is_int:
            return v.round().clamp_(-self.max_value, self.max_value)
        a = v.abs().clamp_max_(2 * self.max_value)  # beyond 2·max every value saturates; keeps a/step finite
        step = _pow2(_exponent_field(a).clamp_min_(self.emin) - self.mantissa_bits)
        r = a.div_(step).round_().mul_(step)
        r = r.clamp_max_(self.max_value) if self.saturating else torch.where(r > self.max_value, torch.nan, r)
        return r.copysign_(v)

    @property
    def subnormal_range(self) -> tuple[float, float] | None:
        """The magnitudes of ``x / s`` that round to a non-zero subnormal code, both bounds open:
        above τ and below ``min_normal − min_subnormal / 2`` (that tie rounds up to ``min_normal``,
        whose mantissa is even). None for an integer grid. Lets a count skip the rounding itself."""
        return None if self.is_int else (self.tau, self.min_normal - self.min_subnormal / 2)

    def subnormal(self, q: torch.Tensor) -> torch.Tensor:
        """True where grid values ``q`` sit on a non-zero subnormal code (never for an integer grid)."""
        if self.is_int:
            return torch.zeros_like(q, dtype=torch.bool)
        a = q.abs()
        return (a > 0) & (a < self.min_normal)


def int_grid(bits: int) -> ElementGrid:
    """The symmetric INT-N grid, N from 2 to 8."""
    return ElementGrid(f"int{bits}", bits, float(qmax_for_bits(bits)))


E4M3 = ElementGrid("e4m3", 8, 448.0, 2.0**-9, exponent_bits=4, mantissa_bits=3)
"""FP8 E4M3 "fn" (OCP): max 448, smallest subnormal 2⁻⁹, no infinities, saturating."""

E2M1 = ElementGrid("e2m1", 4, 6.0, 0.5, exponent_bits=2, mantissa_bits=1)
"""FP4 E2M1: {0, 0.5, 1, 1.5, 2, 3, 4, 6}, saturating."""

E2M3 = ElementGrid("e2m3", 6, 7.5, 0.125, exponent_bits=2, mantissa_bits=3)
"""FP6 E2M3 (OCP MX): max 7.5, smallest subnormal 1/8, saturating."""

E3M2 = ElementGrid("e3m2", 6, 28.0, 0.0625, exponent_bits=3, mantissa_bits=2)
"""FP6 E3M2 (OCP MX): max 28, smallest subnormal 1/16, saturating."""

class Unit(StrEnum):
    """What one scale covers: the abs-max of a scale is taken over it."""

    TOKEN = "token"  # a row (on a weight: an output channel)
    TENSOR = "tensor"  # a whole sequence (a whole weight)
    CHANNEL = "channel"  # a column over the sequence's tokens
    CROSSQUANT = "crossquant"  # t^α·c^(1-α): a row's and a column's maxima together
    BLOCK = "block"  # consecutive inputs of one row

    @property
    def spans_tokens(self) -> bool:
        """True when one token's scale depends on the sequence's other tokens."""
        return self in (Unit.TENSOR, Unit.CHANNEL, Unit.CROSSQUANT)


class Form(StrEnum):
    """How a scale is formed from its unit's abs-max."""

    ABSMAX = "absmax"  # max(amax / max_value, floor)
    E8M0_FLOOR = "e8m0_floor"  # 2^(⌊log2 amax⌋ − emax), OCP MX
    E8M0_RCEIL = "e8m0_rceil"  # 2^⌈log2(amax / max_value)⌉, NVIDIA
    NVFP4 = "nvfp4"  # an E4M3 block scale under a float32 tensor scale

    @property
    def e8m0(self) -> bool:
        """True for a power-of-two (E8M0) scale."""
        return self in (Form.E8M0_FLOOR, Form.E8M0_RCEIL)


def _member(kind: type[StrEnum], value: str, what: str) -> StrEnum:
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"unknown scale {what} {value!r}; choose from {', '.join(kind)}") from None


@dataclass(frozen=True)
class ScaleRule:
    """How a format's scale is formed: over which ``unit`` the abs-max is taken, and by which ``form``.

    units: ``token`` (a row), ``tensor`` (a whole sequence), ``channel`` (a column over the sequence's
    tokens), ``crossquant`` (t^α·c^(1-α)), ``block`` (consecutive inputs of one row).
    forms: ``absmax`` ``max(amax / max_value, floor)``; ``e8m0_floor`` ``2^(⌊log2 amax⌋ − emax)`` (OCP
    MX); ``e8m0_rceil`` ``2^⌈log2(amax / max_value)⌉`` (NVIDIA); ``nvfp4`` the two-level E4M3 block scale.
    """

    unit: Unit
    form: Form = Form.ABSMAX
    floor: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "unit", _member(Unit, self.unit, "unit"))
        object.__setattr__(self, "form", _member(Form, self.form, "form"))
        if self.form is not Form.ABSMAX and self.unit is not Unit.BLOCK:
            raise ValueError(f"scale form {self.form!r} needs block units")
        if self.unit is Unit.CROSSQUANT and self.floor != STEP_FLOOR:
            raise ValueError("crossquant scales are INT steps floored at STEP_FLOOR")
        if not self.floor >= 0.0:
            raise ValueError(f"scale floor must be non-negative, got {self.floor!r}")

    @property
    def spans_tokens(self) -> bool:
        """True when a token's scale depends on the other tokens of its sequence: a per-sequence,
        per-channel or CrossQuant scale, or NVFP4's per-sequence tensor scale. Such a scale changes
        when padding is added to the sequence; a per-token or per-block scale does not."""
        return self.unit.spans_tokens or self.form is Form.NVFP4


@dataclass(frozen=True)
class Format:
    """One concrete format: scale rule, element grid, block size (block units) and α (CrossQuant)."""

    name: str
    rule: ScaleRule
    grid: ElementGrid
    block_size: int | None = None
    alpha: float | None = None

    def __post_init__(self) -> None:
        blocks = self.rule.unit is Unit.BLOCK
        if blocks != (self.block_size is not None):
            raise ValueError(f"format {self.name!r}: a block size goes with block units, and only with them")
        if blocks and (isinstance(self.block_size, bool) or not isinstance(self.block_size, int)
                       or self.block_size < 1):
            raise ValueError(f"format {self.name!r}: block size must be a positive integer")
        if (self.rule.unit is Unit.CROSSQUANT) != (self.alpha is not None):
            raise ValueError(f"format {self.name!r}: alpha goes with crossquant, and only with it")
        if self.alpha is not None:
            object.__setattr__(self, "alpha", check_alpha(self.alpha))
        if self.rule.unit is Unit.CROSSQUANT and not self.grid.is_int:
            raise ValueError("crossquant is defined for integer grids")
        if self.rule.form is not Form.ABSMAX and self.grid.is_int:
            raise ValueError(f"scale form {self.rule.form!r} needs a float grid")

    @property
    def tau(self) -> float:
        return self.grid.tau

    @property
    def is_block(self) -> bool:
        return self.rule.unit is Unit.BLOCK

    @property
    def per_token_comparable(self) -> bool:
        """True for an INT format other than per-token itself: its step can be compared, position by
        position, with the per-token step at the same width (where its zero bound is the smaller)."""
        return self.grid.is_int and self.rule.unit is not Unit.TOKEN

    @property
    def layout(self) -> Unit:
        """The unit the scale is really taken over: the rule's, except that CrossQuant at α = 1 is
        exactly per-token and at α = 0 exactly per-channel (its step is then a broadcast vector)."""
        if self.rule.unit is Unit.CROSSQUANT and self.alpha in (0.0, 1.0):
            return Unit.TOKEN if self.alpha == 1.0 else Unit.CHANNEL
        return self.rule.unit


@dataclass(frozen=True)
class FormatEntry:
    """A registry entry: the rule and grid of a format (``grid=None``: INT, bits chosen by the caller)."""

    rule: ScaleRule
    grid: ElementGrid | None
    block_size: int | None
    description: str

    @property
    def tau(self) -> float:
        return 0.5 if self.grid is None else self.grid.tau

    @property
    def takes_alpha(self) -> bool:
        return self.rule.unit is Unit.CROSSQUANT


_INT_STEP = dict(floor=STEP_FLOOR)
FORMATS: dict[str, FormatEntry] = {
    "per_token": FormatEntry(ScaleRule(Unit.TOKEN, **_INT_STEP), None, None,
                             "INT-N, one step per token (row); on a weight, per output channel"),
    "per_tensor": FormatEntry(ScaleRule(Unit.TENSOR, **_INT_STEP), None, None,
                              "INT-N, one step per sequence"),
    "per_channel": FormatEntry(ScaleRule(Unit.CHANNEL, **_INT_STEP), None, None,
                               "INT-N, one step per input channel over the sequence's tokens"),
    "crossquant": FormatEntry(ScaleRule(Unit.CROSSQUANT, **_INT_STEP), None, None,
                              "INT-N, CrossQuant step t^a * c^(1-a) / qmax"),
    "per_group": FormatEntry(ScaleRule(Unit.BLOCK, **_INT_STEP), None, 128,
                             "INT-N, one step per g consecutive input channels of a row"),
    "fp8_per_token": FormatEntry(ScaleRule(Unit.TOKEN, floor=1.0 / (448.0 * 512.0)), E4M3, None,
                                 "FP8 E4M3, per-token dynamic scale (vLLM)"),
    "fp8_per_tensor": FormatEntry(ScaleRule(Unit.TENSOR), E4M3, None, "FP8 E4M3, one scale per sequence"),
    "mxfp8": FormatEntry(ScaleRule(Unit.BLOCK, Form.E8M0_FLOOR), E4M3, 32,
                         "OCP MXFP8: E4M3 elements, E8M0 block scale (FLOOR)"),
    "mxfp6_e2m3": FormatEntry(ScaleRule(Unit.BLOCK, Form.E8M0_FLOOR), E2M3, 32,
                              "OCP MXFP6: E2M3 elements, E8M0 block scale (FLOOR)"),
    "mxfp6_e3m2": FormatEntry(ScaleRule(Unit.BLOCK, Form.E8M0_FLOOR), E3M2, 32,
                              "OCP MXFP6: E3M2 elements, E8M0 block scale (FLOOR)"),
    "mxfp4": FormatEntry(ScaleRule(Unit.BLOCK, Form.E8M0_FLOOR), E2M1, 32,
                         "OCP MXFP4: E2M1 elements, E8M0 block scale (FLOOR)"),
    "mxfp4_rceil": FormatEntry(ScaleRule(Unit.BLOCK, Form.E8M0_RCEIL), E2M1, 32,
                               "MXFP4 with the E8M0 scale rounded up (NVIDIA RCEIL)"),
    "nvfp4": FormatEntry(ScaleRule(Unit.BLOCK, Form.NVFP4), E2M1, 16,
                         "NVFP4: E2M1 elements, E4M3 block scale under a per-sequence float32 scale"),
}
"""name -> :class:`FormatEntry`; :func:`get_format` makes a concrete :class:`Format` of one."""


FULL_PRECISION_BITS = 16
"""Bits a weight kept in full precision costs (a bf16/fp16 deployment)."""


def stored_bits(bits: int, block: int | None, scale_bits: float = FULL_PRECISION_BITS) -> float:
    """Bits one weight parameter costs: its element width plus its block's scale shared among the block's
    elements (a per-channel scale, one per thousands of elements, is not counted)."""
    return bits + (scale_bits / block if block else 0.0)


def get_format(name: str, *, bits: int | None = None, block_size: int | None = None,
               alpha: float | None = None) -> Format:
    """The registry's format ``name``; INT formats need ``bits``, CrossQuant ``alpha``.

    ``block_size`` overrides the entry's default (block formats only).
    """
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; choose from {', '.join(FORMATS)}")
    entry = FORMATS[name]
    if entry.grid is None:
        if bits is None:
            raise ValueError(f"format {name!r} needs bits ({MIN_BITS} to {MAX_BITS})")
        grid = int_grid(bits)
    elif bits is not None and bits != entry.grid.bits:
        raise ValueError(f"format {name!r} has {entry.grid.bits}-bit elements, got bits={bits}")
    else:
        grid = entry.grid
    if block_size is not None and entry.block_size is None:
        raise ValueError(f"format {name!r} has no blocks")
    return Format(name, entry.rule, grid, entry.block_size if block_size is None else block_size, alpha)


def _blocks(x: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """float32 ``x (..., R, I)`` as ``(..., R, ⌈I/size⌉, size)``, the last block padded with ``fill``."""
    x = _f32(x)
    pad = -x.shape[-1] % size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=fill)  # (..., R, nb·size)
    return x.unflatten(-1, (-1, size))  # (..., R, nb, size)


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _check(x: torch.Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"formats work on (..., T, I) or (O, I) tensors, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"formats quantize floating-point tensors, got {x.dtype}")


def _block_amax(x: torch.Tensor, size: int) -> torch.Tensor:
    """abs-max of each block, ``(..., R, ⌈I/size⌉)`` float32."""
    return _blocks(x, size).abs().amax(dim=-1)  # (..., R, nb)


def _sequence_amax(x: torch.Tensor) -> torch.Tensor:
    """max|X| of each sequence (or of a whole weight), ``(..., 1, 1)`` float32."""
    return activation_ranges(x).token.amax(dim=-2, keepdim=True).float()  # (..., 1, 1)


def _e8m0_floor(amax: torch.Tensor, emax: int) -> torch.Tensor:
    """OCP MX scale ``2^(⌊log2 amax⌋ − emax)`` clamped to E8M0, ⌊log2⌋ read from the float32
    exponent field (as torchao's ``to_mx`` does; a zero or subnormal ``amax`` reads -127 and clamps
    the same)."""
    e = (_exponent_field(amax) - emax).clamp_(E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)
    return torch.where(amax.isnan(), torch.nan, _pow2(e))


def _e8m0_rceil(amax: torch.Tensor, max_value: float) -> torch.Tensor:
    """NVIDIA's RCEIL scale ``2^⌈log2(amax / max)⌉``: the float32 quotient rounded up to E8M0.

    With ``d = m · 2^k``, ``m ∈ [0.5, 1)`` (frexp, exact for subnormals), ``⌈log2 d⌉`` is ``k - 1``
    when ``d`` is a power of two (``m = 0.5``) and ``k`` otherwise; a zero block gets the smallest
    scale. The float32 ``log2`` is not used: it returns ``k - 1`` for ``d`` a few ulps above ``2^(k-1)``.
    """
    mantissa, k = torch.frexp(amax / max_value)
    e = torch.where(mantissa == 0.5, k - 1, k)
    e = torch.where(mantissa > 0, e, E8M0_MIN_EXPONENT).clamp_(E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)
    return torch.where(amax.isnan(), torch.nan, _pow2(e))


NVFP4_BLOCK_GRID = E4M3
"""The grid NVFP4's block scales are rounded to."""


def nvfp4_tensor_divisor(grid: ElementGrid) -> float:
    """NVFP4's tensor scale is ``max|X|`` over this: the block grid's largest value times the element
    grid's (448·6)."""
    return NVFP4_BLOCK_GRID.max_value * grid.max_value


def _nvfp4(amax: torch.Tensor, tensor_amax: torch.Tensor, grid: ElementGrid) -> torch.Tensor:
    """Two-level NVFP4 scale ``G · e4m3(clamp(amax_b / 6 / G, 2⁻⁶, 448))``, ``G = max|X| / (448·6)``.

    An all-zero sequence has ``G = 0`` and so a zero scale (its quotient is taken as 0, see
    :func:`quotient`), where the two divisions would give NaN.
    """
    inner = NVFP4_BLOCK_GRID
    g = tensor_amax / nvfp4_tensor_divisor(grid)  # (..., 1, 1)
    ratio = torch.where(g > 0, amax / grid.max_value / g, 0.0)  # (..., R, nb)
    block = inner.round(ratio.clamp_(inner.min_normal, inner.max_value))
    return g * block


def unit_amax(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The abs-max over each unit of ``fmt``'s scale: ``(..., T, 1)`` per token, ``(..., 1, 1)`` per
    tensor, ``(..., 1, I)`` per channel, ``(..., T, ⌈I/g⌉)`` per block; float32. Not for CrossQuant,
    whose step combines two maxima (:func:`scale`)."""
    unit = fmt.rule.unit
    if unit is Unit.BLOCK:
        return _block_amax(x, fmt.block_size)  # (..., T, nb)
    if unit is Unit.TENSOR:
        return _sequence_amax(x)  # (..., 1, 1)
    ranges = activation_ranges(x)
    return (ranges.token if unit is Unit.TOKEN else ranges.channel).float()  # (..., T, 1) | (..., 1, I)


def scale_of(amax: torch.Tensor, fmt: Format, sequence_amax: torch.Tensor | None = None) -> torch.Tensor:
    """The scale of ``fmt`` from the abs-max of each of its units (:func:`unit_amax`), float32.

    The one definition of every scale rule's form; ``sequence_amax`` ``(..., 1, 1)`` is max|X| of each
    sequence, which NVFP4's tensor scale needs. The native statistics evaluate the same operations in
    the same order.
    """
    rule, grid = fmt.rule, fmt.grid
    if rule.form is Form.E8M0_FLOOR:
        return _e8m0_floor(amax, grid.emax)
    if rule.form is Form.E8M0_RCEIL:
        return _e8m0_rceil(amax, grid.max_value)
    if rule.form is Form.NVFP4:
        if sequence_amax is None:
            raise ValueError("the NVFP4 scale needs each sequence's max|X|")
        return _nvfp4(amax, sequence_amax, grid)
    return absmax_scale(amax, grid.max_value, rule.floor)


def scale(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The scale s of ``fmt`` for ``x (..., T, I)`` or a weight ``(O, I)``, float32.

    ====================  ==================  ==========================
    unit                  activation          weight (O, I)
    ====================  ==================  ==========================
    token                 (..., T, 1)         (O, 1): per output channel
    tensor                (..., 1, 1)         (1, 1)
    channel               (..., 1, I)         (1, I)
    crossquant            (..., T, I)         —
    block of g            (..., T, ⌈I/g⌉)     (O, ⌈I/g⌉)
    ====================  ==================  ==========================

    Block scales are one per block; :func:`expand_scale` spreads them over the inputs.
    """
    _check(x)
    if fmt.rule.unit is Unit.CROSSQUANT:
        return crossquant_step(_f32(x), fmt.grid.bits, fmt.alpha)
    sequence = _sequence_amax(x) if fmt.rule.form is Form.NVFP4 else None
    return scale_of(unit_amax(x, fmt), fmt, sequence)


def scale_from_ranges(ranges: ActivationRanges, fmt: Format) -> torch.Tensor:
    """The scale of a token, tensor or channel format from t ``(..., T, 1)`` and c ``(..., 1, I)``
    alone, as :func:`scale` gives it for the activation they were measured on (CrossQuant at α = 0
    and 1 too: see :attr:`Format.layout`)."""
    unit = fmt.layout
    if unit is Unit.TOKEN:
        amax = ranges.token.float()  # (..., T, 1)
    elif unit is Unit.TENSOR:
        amax = ranges.token.float().amax(dim=-2, keepdim=True)  # (..., 1, 1)
    elif unit is Unit.CHANNEL:
        amax = ranges.channel.float()  # (..., 1, I)
    else:
        raise ValueError(f"the scale of {fmt.name!r} does not follow from t and c alone")
    return scale_of(amax, fmt)


def bound_of(s: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The zero bound ``B = τ · s`` of each scale, float32: what every element that scale covers is
    compared with (up to the rounding of ``x / s``)."""
    return fmt.tau * s


def expand_scale(s: torch.Tensor, fmt: Format, width: int) -> torch.Tensor:
    """A scale from :func:`scale` made broadcastable to ``(..., T, I)`` with ``I = width``.

    Block scales ``(..., T, ⌈I/g⌉)`` become ``(..., T, I)``; other scales already broadcast.
    """
    if not fmt.is_block:
        return s
    return s.repeat_interleave(fmt.block_size, dim=-1)[..., :width]  # (..., T, I)


def _safe(s: torch.Tensor) -> torch.Tensor:
    """``s`` with zero scales (all-zero units) replaced by 1, so that 0 / s is 0 and not NaN."""
    return torch.where(s == 0, 1.0, s)


def quotient(x: torch.Tensor, fmt: Format, s: torch.Tensor | None = None) -> torch.Tensor:
    """``x / s`` in float32, shaped like ``x``: the number the element grid rounds.

    ``s`` is :func:`scale` of ``x`` unless given. A block format divides each block by its own scale.
    """
    _check(x)
    s = _safe(scale(x, fmt) if s is None else s)
    if not fmt.is_block:
        return torch.div(_f32(x), s)
    q = torch.div(_blocks(x, fmt.block_size), s.unsqueeze(-1))  # (..., T, nb, g)
    return q.flatten(-2)[..., : x.shape[-1]]  # (..., T, I)


def quantize(x: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, s)``: the grid values ``q`` (float32, shaped like ``x``) and the scale from :func:`scale`."""
    s = scale(x, fmt)
    return fmt.grid.round(quotient(x, fmt, s)), s


def dequantize(q: torch.Tensor, s: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``q · s`` in float32, block scales spread over their inputs."""
    return q * expand_scale(s, fmt, q.shape[-1])


def fake_quantize(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``x`` quantized and dequantized exactly as ``fmt`` does; a new tensor in ``x``'s dtype.

    The arithmetic is float32 whatever the input dtype; only the result is cast back.
    """
    q, s = quantize(x, fmt)
    return dequantize(q, s, fmt).to(x.dtype)


def kernel_limit(fmt: Format, scale: float = 1.0) -> float:
    """``scale · τ``: the largest ``|x / s|`` in the kernel of ``fmt`` at ``scale`` times its zero bound."""
    return scale * fmt.tau


def in_kernel(q: torch.Tensor, fmt: Format, scale: float = 1.0) -> torch.Tensor:
    """The definition of the kernel, on quotients ``q = x / s``: True where ``|q| <= scale · τ``.

    With ``scale`` 1 this is exactly where ``fmt`` quantizes to zero: the grid rounds to nearest with
    ties to even, so the tie at exactly τ goes to zero (whose code is even) and anything larger goes
    to the smallest non-zero code. NaN is never in the kernel. Every kernel in kernelscope (the mask,
    its removal, the statistics' count) is this comparison; the C code makes the same one.
    """
    return q.abs().le(kernel_limit(fmt, scale))


def kernel_mask(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The quantization kernel: True exactly where ``fmt`` quantizes ``x`` to zero (:func:`in_kernel`
    of ``x``'s quotients)."""
    return in_kernel(quotient(x, fmt), fmt)


def zero_bound(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """:func:`bound_of` the scales of ``x``, broadcastable to ``x``: elements with ``|x| <= B`` are (up
    to the rounding of ``x / s``) rounded to zero."""
    return expand_scale(bound_of(scale(x, fmt), fmt), fmt, x.shape[-1])


def subnormal_mask(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """True where ``x`` quantizes to a non-zero subnormal code: nonzero, but with fewer significant
    bits than a normal value (half the precision of E4M3 already lost at 2⁻⁸). Never for INT grids."""
    q, _ = quantize(x, fmt)
    return fmt.grid.subnormal(q)


def block_kernel_mask(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``(..., T, ⌈I/g⌉)``: True for the blocks whose every element is in the kernel.

    A block format only; a short last block is judged on its own elements.
    """
    return whole_blocks(kernel_mask(x, fmt), fmt)


def whole_blocks(mask: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``(..., T, ⌈I/g⌉)``: True for the blocks of ``fmt`` where ``mask (..., T, I)`` holds for every
    element (a short last block judged on its own elements)."""
    if not fmt.is_block:
        raise ValueError(f"format {fmt.name!r} has no blocks")
    return _blocks(mask, fmt.block_size, fill=1.0).eq(1.0).all(dim=-1)  # (..., T, nb)


def remove_kernel(x: torch.Tensor, fmt: Format, *, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` with the elements ``|x / s| <= scale · τ`` set to zero (``scale`` 1: exactly ``fmt``'s
    kernel) and every other element left as it was; and how many were zeroed. ``x`` is not changed."""
    mask = in_kernel(quotient(x, fmt), fmt, scale)  # (..., T, I)
    return torch.where(mask, 0.0, x), torch.count_nonzero(mask)
