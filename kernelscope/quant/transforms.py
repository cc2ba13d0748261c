"""Transforms of a Linear's input basis before quantization (DESIGN.md §1b), as registered objects.

A transform is an invertible linear map A of the input-channel axis. It is applied to the activation
as ``x' = x·A`` and to the weight ``W (O, I)`` as ``W' = W·A⁻ᵀ``, so that ``x'·W'ᵀ = x·Wᵀ`` before
anything is quantized; a quantizer then sees ``x'`` (and ``W'``), and its kernel is counted, or
removed, in that basis. ``y·A⁻¹`` maps a tensor of that basis back (after a kernel was zeroed there).

===================  ========================  ========================  =======================
transform            activation ``x·A``        weight ``W·A⁻ᵀ``          inverse ``y·A⁻¹``
===================  ========================  ========================  =======================
``hadamard[:B]``     ``x·D·H``                 ``W·D·H``                 ``y·H·D``
``smoothquant[:α]``  ``x_j / s_j``             ``W_:j · s_j``            ``y_j · s_j``
===================  ========================  ========================  =======================

H is block-diagonal over consecutive blocks of B input channels, each block the normalised
Sylvester–Hadamard matrix ``H_B = H_2^{⊗k} / √B`` (symmetric and orthonormal, so ``A⁻ᵀ = A`` and
``A⁻¹ = H·D``); D holds random ±1 signs per input channel when a seed is given (a randomised Hadamard
transform, as QuaRot, SpinQuant and the MX/NVFP4 recipes of torchao use), else the identity. B
defaults, per layer, to the largest power of two that divides the layer's width, at most
:data:`MAX_DEFAULT_BLOCK`. SmoothQuant's factors ``s_j = max|X_j|^α / max|W_j|^(1-α)`` come from
calibration statistics: the channel maxima of the layer's input over calibration text and the
column maxima of its weight (:class:`ChannelMaxima`).

Transforms compose in order with ``+`` (``smoothquant+hadamard``: smooth, then rotate); ``none`` is
the identity. The spelling avoids the comma, which separates the values of a list option.

Three levels: a :class:`TransformSpec` is what a user names (parsed from text, not bound to any
layer); ``spec.bind(width)`` (or :meth:`TransformStep.bind` with calibration statistics) gives a
:class:`LayerTransform` for one layer, whose :meth:`~LayerTransform.activation`,
:meth:`~LayerTransform.weight` and :meth:`~LayerTransform.inverse` do the work. Everything here is
out-of-place: no tensor passed in is ever changed; work is done in float32 (float64 stays float64)
and results come back in the input's dtype. The registry :data:`TRANSFORMS` is data: parsing, the
command line's choices and its help are read from it.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from kernelscope.quant.primitives import check_alpha, smoothing_factors

MAX_DEFAULT_BLOCK = 4096
"""The largest Hadamard block chosen by default (a layer's width may allow a larger one)."""

RADIX = 64
"""The innermost ``log2(RADIX)`` levels of the fast Walsh–Hadamard transform are applied as one
product with ``H_RADIX`` (a small dense factor); the remaining levels are radix-2 butterflies."""

NONE = "none"
"""The spelling of the identity transform."""

COMPOSE = "+"
"""Joins the steps of a composed transform, applied left to right."""


# -- the fast Walsh–Hadamard transform ----------------------------------------------------------

def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def default_block(width: int) -> int:
    """The largest power of two that divides ``width``, at most :data:`MAX_DEFAULT_BLOCK`."""
    if width < 1:
        raise ValueError(f"an input width must be positive, got {width}")
    return min(width & -width, MAX_DEFAULT_BLOCK)


def _work_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the precision transforms work in: float32, or float64 if it already is (no copy then)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@functools.lru_cache(maxsize=64)
def _hadamard_factor(size: int, block: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``H_size / √block`` (Sylvester order), the dense factor of the innermost levels; never written to.

    Made outside inference mode, so that the cached tensor also serves computations autograd records.
    """
    with torch.inference_mode(False):
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < size:  # H_2m = [[H_m, H_m], [H_m, -H_m]]
            h = torch.cat((torch.cat((h, h), dim=1), torch.cat((h, -h), dim=1)), dim=0)
        return (h / math.sqrt(block)).to(dtype=dtype, device=device)


def fwht(x: torch.Tensor, block: int, *, radix: int = RADIX) -> torch.Tensor:
    """``x·H`` over the last axis, H block-diagonal with ``H_B = H_2^{⊗k} / √B`` on each run of
    ``block`` consecutive channels: a fast Walsh–Hadamard transform, O(I·log B) per row.

    ``H_B = H_(B/r) ⊗ H_r`` with ``r = min(B, radix)``: the inner factor is one product of each run
    of r channels with the r × r matrix ``H_r`` (its log2 r butterfly levels at once, and the
    normalisation), the outer ``log2(B/r)`` levels are radix-2 butterflies between halves of ever
    longer runs. Nothing of size B × B (let alone I × I) is formed. Returns a new tensor in ``x``'s
    dtype, computed in float32 (float64 for a float64 input).
    """
    width = x.shape[-1]
    if not is_power_of_two(block) or block < 2 or width % block:
        raise ValueError(f"a Hadamard block must be a power of two of at least 2 dividing the width "
                         f"{width}, got {block}")
    if not is_power_of_two(radix) or radix < 2:
        raise ValueError(f"the radix must be a power of two of at least 2, got {radix}")
    work = _work_dtype(x)
    inner = min(block, radix)
    factor = _hadamard_factor(inner, block, work.dtype, work.device)
    runs = work.reshape(-1, inner)  # (N·I/r, r)
    y = torch.matmul(runs, factor).view(-1, block)  # (N·I/B, B), a new tensor
    spare = None
    half = inner
    tracked = y.requires_grad  # autograd takes no out= arguments
    while half < block:  # butterflies between the two halves of each run of 2·half channels
        pairs = y.view(-1, block // (2 * half), 2, half)  # (N·I/B, B/2h, 2, h)
        low, high = pairs[:, :, 0], pairs[:, :, 1]  # (N·I/B, B/2h, h) each
        if tracked:
            y = torch.stack((low + high, low - high), dim=2).view(-1, block)  # (N·I/B, B)
        else:  # two buffers used in turn: no allocation after the first level
            spare = torch.empty_like(y) if spare is None else spare
            out = spare.view(pairs.shape)  # (N·I/B, B/2h, 2, h)
            torch.add(low, high, out=out[:, :, 0])
            torch.sub(low, high, out=out[:, :, 1])
            y, spare = spare, y
        half *= 2
    return y.view(x.shape).to(x.dtype)


def random_signs(seed: int, width: int) -> torch.Tensor:
    """±1 for each of ``width`` input channels (float32, CPU), from a ``torch.Generator`` seeded with
    ``seed`` and ``width``: the same seed gives the same signs to every layer of the same width."""
    digest = hashlib.sha256(f"kernelscope hadamard signs {int(seed)} {int(width)}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    bits = torch.randint(0, 2, (width,), generator=generator)
    return bits.mul_(2).sub_(1).to(torch.float32)


# -- bound steps --------------------------------------------------------------------------------

class Step:
    """One transform bound to one layer: a linear map A of the input-channel axis.

    The methods take and return float32 (or float64) tensors of the layer's width on the last axis
    and never change their argument; :class:`LayerTransform` handles dtypes.
    """

    label: str
    input_amax: torch.Tensor | None = None
    """The input abs-max a step's library calibrates with it (ModelOpt's smoothquant): a static input
    quantizer after the step takes this instead of what it observes."""

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """``x·A``."""
        raise NotImplementedError

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """``W·A⁻ᵀ`` for ``W (O, I)``."""
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``y·A⁻¹``."""
        raise NotImplementedError


class _OnDevice:
    """A vector kept on the CPU, handed out on the device and in the dtype asked for (copied once)."""

    def __init__(self, vector: torch.Tensor) -> None:
        self.vector = vector
        self._copies: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def like(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in self._copies:
            with torch.inference_mode(False):  # a copy kept for later calls, in or out of inference mode
                self._copies[key] = self.vector.to(device=x.device, dtype=x.dtype, copy=True)
        return self._copies[key]


class Hadamard(Step):
    """``x·D·H``: block-diagonal Sylvester–Hadamard rotation, optionally after random signs D."""

    def __init__(self, width: int, block: int, signs: torch.Tensor | None = None) -> None:
        if not is_power_of_two(block) or block < 2 or width % block:
            raise ValueError(f"B={block} is not a power of two of at least 2 that divides the width {width}")
        if signs is not None and signs.shape != (width,):
            raise ValueError(f"signs must have shape ({width},), got {tuple(signs.shape)}")
        self.width = width
        self.block = block
        self.signs = None if signs is None else _OnDevice(signs)
        self.label = f"hadamard:{block}"

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return fwht(x if self.signs is None else x * self.signs.like(x), self.block)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return self.activation(w)  # orthonormal: A⁻ᵀ = A, rows of W transform like activations

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        out = fwht(y, self.block)  # H symmetric and orthonormal: H⁻¹ = H; a new tensor
        return out if self.signs is None else out.mul_(self.signs.like(out))


class Smoothing(Step):
    """SmoothQuant's ``x_j / s_j`` (weights ``W_:j · s_j``) with factors calibrated for one layer."""

    def __init__(self, factors: torch.Tensor, alpha: float) -> None:
        if factors.dim() != 1:
            raise ValueError(f"smoothing factors must be a vector (I,), got shape {tuple(factors.shape)}")
        self.factors = factors
        self.alpha = alpha
        self.label = f"smoothquant:{_number(alpha)}"

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.factors  # (..., I) / (I,)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.factors  # column j times s_j

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.factors


class ModelOptSmoothing(Step):
    """ModelOpt's smoothquant on one layer, as its checkpoint export leaves it: the input times its
    ``pre_quant_scale`` buffer (the factors ``s`` in the layer's dtype), the weight times ``1 / s`` in
    float32 and rounded to the layer's dtype, then, where the layers that share the input were given
    the mean of their buffers, times ``old / new`` in float32 and rounded again."""

    def __init__(self, factors: torch.Tensor, buffer: torch.Tensor, shared: torch.Tensor,
                 dtype: torch.dtype, input_amax: torch.Tensor, alpha: float) -> None:
        self.factors, self.buffer, self.shared, self.dtype = factors, buffer, shared, dtype
        self.input_amax = input_amax
        self.label = f"modelopt-smoothquant:{_number(alpha)}"

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.shared.to(x.dtype)  # (..., I) · (I,)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        smoothed = (w * (1.0 / self.factors)).to(self.dtype).float()  # columns times 1 / s
        if torch.equal(self.shared, self.buffer):
            return smoothed
        return smoothed * self.buffer.float() / self.shared.float()

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y / self.shared.to(y.dtype)


@dataclass(frozen=True)
class LayerTransform:
    """A transform bound to one layer of ``width`` input channels: its steps, applied in order.

    ``activation(x)`` is what a quantizer of the layer's input sees; the identity (no steps) returns
    ``x`` itself, every other transform a new tensor in ``x``'s dtype.
    """

    width: int
    steps: tuple[Step, ...] = ()

    @property
    def label(self) -> str:
        """``none``, ``hadamard:64``, ``smoothquant:0.5+hadamard:512``: every value explicit."""
        return COMPOSE.join(step.label for step in self.steps) or NONE

    @property
    def is_identity(self) -> bool:
        return not self.steps

    def then(self, step: Step) -> LayerTransform:
        """This transform followed by ``step``."""
        return LayerTransform(self.width, (*self.steps, step))

    def _apply(self, x: torch.Tensor, maps: Iterable[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
        if x.shape[-1] != self.width:
            raise ValueError(f"a transform bound to width {self.width} got a tensor of width {x.shape[-1]}")
        if not self.steps:
            return x
        out = _work_dtype(x)
        for fn in maps:
            out = fn(out)
        return out.to(x.dtype)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """``x·A`` for an activation ``x (..., I)``."""
        return self._apply(x, [step.activation for step in self.steps])

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """``W·A⁻ᵀ`` for a weight ``W (O, I)``: ``activation(x) · weight(W)ᵀ = x·Wᵀ``."""
        return self._apply(w, [step.weight for step in self.steps])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``y·A⁻¹``: a tensor of the transformed basis mapped back; ``inverse(activation(x)) ≈ x``."""
        return self._apply(y, [step.inverse for step in reversed(self.steps)])


# -- calibration statistics ---------------------------------------------------------------------

class ChannelMaxima(NamedTuple):
    """What a calibrated step is bound with: ``activation`` = max over calibration tokens of |x_j|
    (I,), ``weight`` = max over output channels of |W_oj| (I,), both in the basis the step sees; the
    layer's ``dtype``; and ``shared``, how many bound layers of its fused group (q/k/v, gate/up) take
    the same input, itself included."""

    activation: torch.Tensor
    weight: torch.Tensor
    dtype: torch.dtype = torch.float32
    shared: int = 1


def input_channel_maxima(x: torch.Tensor) -> torch.Tensor:
    """``max_i |x_ij|`` over every token of ``x (..., I)``, float32 ``(I,)`` (one calibration batch)."""
    return x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()  # (N, I) -> (I,)


def weight_column_maxima(w: torch.Tensor) -> torch.Tensor:
    """``max_o |W_oj|`` of a weight ``(O, I)``, float32 ``(I,)``."""
    return w.abs().amax(dim=0).float()


# -- the registry -------------------------------------------------------------------------------

Value = int | float


@dataclass(frozen=True)
class TransformEntry:
    """One transform as data: its name, what may follow ``name:`` and what it is when omitted,
    whether it needs calibration statistics or takes ``--transform-seed``, and how it is bound."""

    name: str
    metavar: str
    summary: str
    takes: str
    default_text: str
    calibrated: bool
    seeded: bool
    parse_value: Callable[[str], Value]
    default: Value | None  # None: chosen per layer by ``check`` and ``bind``
    check: Callable[[Value | None, int], None]  # raises ValueError where the value cannot apply to a width
    bind: Callable[[Value | None, int, int | None, ChannelMaxima | None], Step]
    deployed_by: str | None = None  # which deploying library applies such a transform, its own way

    def __repr__(self) -> str:
        return f"TransformEntry({self.name!r})"

    @property
    def usage(self) -> str:
        """``hadamard[:B]``."""
        return f"{self.name}[:{self.metavar}]"


def _parse_block(text: str) -> int:
    try:
        block = int(text)
    except ValueError:
        raise ValueError(f"B must be a whole number, got {text!r}") from None
    if not is_power_of_two(block) or block < 2:
        raise ValueError(f"B must be a power of two of at least 2, got {block}")
    return block


def _check_block(block: Value | None, width: int) -> None:
    if block is None:
        if default_block(width) < 2:
            raise ValueError(f"no power of two of at least 2 divides its {width} input channels")
    elif width % int(block):
        raise ValueError(f"B={block} does not divide its {width} input channels (the largest power of two "
                         f"that does is {width & -width})")


def _bind_hadamard(block: Value | None, width: int, seed: int | None, stats: ChannelMaxima | None) -> Step:
    _check_block(block, width)
    chosen = default_block(width) if block is None else int(block)
    return Hadamard(width, chosen, None if seed is None else random_signs(seed, width))


def _parse_alpha(text: str) -> float:
    try:
        return check_alpha(float(text))
    except ValueError:
        raise ValueError(f"α must be a number in [0, 1], got {text!r}") from None


def _bind_smoothing(alpha: Value | None, width: int, seed: int | None, stats: ChannelMaxima | None) -> Step:
    if stats is None:
        raise ValueError("smoothquant needs calibration statistics (activation channel and weight column "
                         "maxima)")
    if stats.activation.shape != (width,) or stats.weight.shape != (width,):
        raise ValueError(f"calibration statistics of shape {tuple(stats.activation.shape)} and "
                         f"{tuple(stats.weight.shape)} for width {width}")
    factors = smoothing_factors(stats.activation.to(stats.weight.device), stats.weight, float(alpha))
    return Smoothing(factors, float(alpha))


_TINY_FACTOR = 1.0 / (1 << 31)
"""A smoothing factor at most this sends ModelOpt's smoothquant down a branch that fails (0.47.0)."""


def _bind_modelopt_smoothing(alpha: Value | None, width: int, seed: int | None,
                             stats: ChannelMaxima | None) -> Step:
    """ModelOpt's smoothquant factors ``max|W_:j|^(1-α) / max|X_j|^α`` (the weight's column maxima in its
    dtype, the rest in float32; a channel of abs-max 0 gets 1e4), clamped to [1e-4, 1e4]; its export's
    mean of the buffers of the layers that share the input (all alike at α = 1, the only α modelled)."""
    if stats is None or float(alpha) != MODELOPT_SMOOTHQUANT.default:
        raise ValueError("ModelOpt's smoothquant is modelled at alpha 1, on calibration statistics")
    act = stats.activation.to(stats.weight.device)
    factors = (stats.weight.to(stats.dtype).pow(1 - float(alpha)) / act.pow(float(alpha))).squeeze()
    if factors.min() <= _TINY_FACTOR:
        raise ValueError("an input channel's abs-max of 2^31 or more makes a smoothing factor of 2^-31 or "
                         "less, where ModelOpt's smoothquant (0.47.0) fails; not modelled")
    factors = factors.clamp(min=1e-4, max=1e4)
    buffer = factors.to(stats.dtype)
    shared = torch.mean(torch.stack([buffer] * stats.shared), dim=0) if stats.shared > 1 else buffer
    input_amax = (act.to(stats.dtype) * factors).amax().to(stats.dtype)
    return ModelOptSmoothing(factors, buffer, shared, stats.dtype, input_amax, float(alpha))


MODELOPT_SMOOTHQUANT = TransformEntry(
    name="modelopt-smoothquant", metavar="α", summary="ModelOpt's smoothquant (INT8_SMOOTHQUANT_CFG)",
    takes="the migration strength (1 only)", default_text="1", calibrated=True, seeded=False,
    parse_value=_parse_alpha, default=1.0, check=lambda alpha, width: None, bind=_bind_modelopt_smoothing,
    deployed_by="ModelOpt's INT8_SMOOTHQUANT_CFG")
"""The smoothing of ModelOpt's INT8_SMOOTHQUANT_CFG target: a deployment target's own step, not one a
user names with --transform (so not in :data:`TRANSFORMS`). Its default α, ModelOpt's, is the only one
modelled."""

SMOOTHQUANT_ALPHA = 0.5
"""SmoothQuant's default migration strength."""

TRANSFORMS: dict[str, TransformEntry] = {
    "smoothquant": TransformEntry(
        name="smoothquant", metavar="α",
        summary="divide channel j by s_j = max|X_j|^α / max|W_j|^(1-α) (weights W_:j · s_j)",
        takes="the migration strength in [0, 1]", default_text=f"{SMOOTHQUANT_ALPHA:g}",
        calibrated=True, seeded=False, parse_value=_parse_alpha, default=SMOOTHQUANT_ALPHA,
        check=lambda alpha, width: None, bind=_bind_smoothing,
        deployed_by="llm-compressor's SmoothQuantModifier and ModelOpt's INT8_SMOOTHQUANT_CFG smooth "
                    "norm-Linear pairs, not each Linear: measure the deployed model again"),
    "hadamard": TransformEntry(
        name="hadamard", metavar="B",
        summary="rotate by a block-diagonal normalised Hadamard matrix (x·H, weights W·H)",
        takes="the block size, a power of two dividing each layer's width",
        default_text=f"the largest such power of two up to {MAX_DEFAULT_BLOCK}, per layer",
        calibrated=False, seeded=True, parse_value=_parse_block, default=None,
        check=_check_block, bind=_bind_hadamard,
        deployed_by="llm-compressor's QuIPModifier and SpinQuantModifier rotate Linear inputs by Hadamard "
                    "matrices with their own signs and blocks: measure the deployed model again"),
}
"""name -> entry. A new transform is one entry here (and its :class:`Step`)."""


def _number(value: Value) -> str:
    """The shortest spelling of ``value`` that reads back as the same number: 0.5, 1, 0.123456789."""
    short = f"{value:g}"
    return short if float(short) == float(value) else repr(float(value))


# -- what a user names --------------------------------------------------------------------------

@dataclass(frozen=True)
class TransformStep:
    """One named step of a transform: a registry entry and its value (None: the entry's per-layer default)."""

    entry: TransformEntry
    value: Value | None = None

    @property
    def label(self) -> str:
        return self.entry.name if self.value is None else f"{self.entry.name}:{_number(self.value)}"

    def check(self, width: int) -> None:
        """Raise ValueError where this step cannot apply to a layer of ``width`` input channels."""
        self.entry.check(self.value, width)

    def bind(self, width: int, seed: int | None = None, statistics: ChannelMaxima | None = None) -> Step:
        """This step for one layer; a calibrated step needs its ``statistics`` in the basis it sees."""
        return self.entry.bind(self.value, width, seed if self.entry.seeded else None, statistics)


@dataclass(frozen=True)
class TransformSpec:
    """A transform as named, before it is bound to a layer: steps applied in order, and the seed
    of the random signs (kept only where a step takes one)."""

    steps: tuple[TransformStep, ...] = ()
    seed: int | None = None

    @property
    def label(self) -> str:
        """The canonical name for result rows: ``none``, ``hadamard``, ``hadamard:64``,
        ``smoothquant:0.5+hadamard``; a default chosen per layer is left unsaid."""
        return COMPOSE.join(step.label for step in self.steps) or NONE

    @property
    def is_identity(self) -> bool:
        return not self.steps

    @property
    def needs_calibration(self) -> bool:
        return any(step.entry.calibrated for step in self.steps)

    @property
    def seeded(self) -> bool:
        """True when a step takes the seed (random signs)."""
        return any(step.entry.seeded for step in self.steps)

    def with_seed(self, seed: int | None) -> TransformSpec:
        """The same transform with ``seed``; a transform that takes no seed keeps None."""
        return TransformSpec(self.steps, seed if self.seeded else None)

    def then(self, other: TransformSpec) -> TransformSpec:
        """This transform followed by ``other`` (whose seed, if any, wins)."""
        names = [step.entry.name for step in self.steps]
        twice = [step.entry.name for step in other.steps if step.entry.name in names]
        if twice:
            raise ValueError(f"{self.label} followed by {other.label} applies {twice[0]} twice")
        return TransformSpec((*self.steps, *other.steps), other.seed if other.seed is not None else self.seed)

    def check(self, width: int) -> None:
        """Raise ValueError where a step cannot apply to a layer of ``width`` input channels."""
        for step in self.steps:
            try:
                step.check(width)
            except ValueError as exc:
                raise ValueError(f"{step.label}: {exc}" if len(self.steps) > 1 else str(exc)) from None

    def bind(self, width: int) -> LayerTransform:
        """This transform for a layer of ``width`` input channels (no calibrated step; see
        :meth:`TransformStep.bind` for those)."""
        if self.needs_calibration:
            raise ValueError(f"transform {self.label} needs calibration statistics; bind its steps one by "
                             "one")
        self.check(width)
        bound = LayerTransform(width)
        for step in self.steps:
            bound = bound.then(step.bind(width, self.seed))
        return bound


IDENTITY = TransformSpec()
"""``none``."""


def parse_transform(text: str) -> TransformSpec:
    """``none``, ``hadamard``, ``hadamard:64``, ``smoothquant:0.6+hadamard`` (case-insensitive)."""
    raw = text.strip().lower()
    if raw == NONE:
        return IDENTITY
    if not raw:
        raise ValueError(f"an empty transform; use {NONE} for the identity")
    steps: list[TransformStep] = []
    for part in raw.split(COMPOSE):
        name, colon, value = (s.strip() for s in part.partition(":"))
        entry = TRANSFORMS.get(name)
        if entry is None:
            what = "the identity cannot be composed" if name == NONE else f"unknown transform {name!r}"
            raise ValueError(f"{what}; use {', '.join([NONE, *(e.usage for e in TRANSFORMS.values())])}, "
                             f"composed in order with {COMPOSE!r}")
        if colon and not value:
            raise ValueError(f"{name}: nothing after ':'; give {entry.metavar} ({entry.takes}) or leave "
                             f"out ':' for the default ({entry.default_text})")
        try:
            parsed = entry.parse_value(value) if colon else entry.default
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        if any(step.entry is entry for step in steps):
            raise ValueError(f"{name} is given twice in one transform")
        steps.append(TransformStep(entry, parsed))
    return TransformSpec(tuple(steps))


def parse_transforms(values: Iterable[str]) -> list[TransformSpec]:
    """Several transforms, each value a comma-separated list of transforms; no transform twice."""
    specs: list[TransformSpec] = []
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            spec = parse_transform(part)
            if any(s.label == spec.label for s in specs):
                raise ValueError(f"{spec.label} is given twice")
            specs.append(spec)
    if not specs:
        raise ValueError("no transform given")
    return specs


def describe_layers(bound: Iterable[LayerTransform]) -> str:
    """The bound transforms of a model's layers by label, with the widths each applies to:
    ``hadamard:64 (I=576), hadamard:512 (I=1536)``."""
    widths: dict[str, list[int]] = {}
    for t in bound:
        widths.setdefault(t.label, [])
        if t.width not in widths[t.label]:
            widths[t.label].append(t.width)
    return ", ".join(f"{label} (I={', '.join(map(str, sorted(ws)))})" for label, ws in widths.items())
