"""Symmetric absmax quantization primitives (DESIGN.md §1): the token and channel maxima every scale
is built from, and the INT steps built from them. Quantizing, the kernel and the zero bound of every
format, INT ones included, are :mod:`kernelscope.quant.formats`; a weight ``(O, I)`` is one sequence
whose rows are the output channels there.

Every granularity in one place. ``x`` is an activation ``(..., T, I)`` — one sequence per leading
index, T tokens, I input channels — and ``w`` a weight ``(O, I)``. Statistics are per sequence: the
leading axes are never reduced.

==========================  ==============================  =================
granularity                 step Δ                          step shape
==========================  ==============================  =================
per-tensor (activation)     max|X| / qmax                   (..., 1, 1)
per-token (activation)      t_i / qmax                      (..., T, 1)
per-channel (activation)    c_j / qmax                      (..., 1, I)
CrossQuant(α) (activation)  t_i^α · c_j^(1-α) / qmax        (..., T, I)
==========================  ==============================  =================

with ``t_i = max_j |X_ij|`` (token max), ``c_j = max_i |X_ij|`` (channel max over the T tokens of
the same sequence) and ``qmax = 2^(N-1) - 1``. Every step is floored at :data:`STEP_FLOOR` so that
an all-zero row or column never divides by zero. Half-precision inputs are promoted to float32;
float64 stays float64.

CrossQuant: Liu et al., "CrossQuant: A Post-Training Quantization Method with Smaller Quantization
Kernel", arXiv 2410.07505, eq. (5).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

STEP_FLOOR = 1e-5
"""Smallest step any quantizer uses; keeps all-zero rows and columns finite (DESIGN.md §1)."""

MIN_BITS = 2
MAX_BITS = 8


def qmax_for_bits(bits: int) -> int:
    """Largest quantized magnitude of a symmetric signed N-bit integer: ``2^(N-1) - 1``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return 2 ** (bits - 1) - 1


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float if it is a finite number in [0, 1], else raise ValueError."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    return value


def _stat_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the precision statistics are computed in: float32, or float64 if it already is."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class ActivationRanges(NamedTuple):
    """The two abs-max vectors every activation step is built from, for ``x (..., T, I)``.

    ``token``: t_i, shape ``(..., T, 1)``; ``channel``: c_j over the T tokens of the same sequence,
    shape ``(..., 1, I)`` (``keepdim`` keeps the sequence axis, so a batch never mixes; DESIGN.md §1).
    """

    token: torch.Tensor
    channel: torch.Tensor


def as_sequences(x: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
    """``x`` viewed as ``(B, T, I)`` so that per-sequence statistics never mix sequences.

    Some models flatten tokens before a Linear (OPT's fc1/fc2 see ``(B·T, I)``); given the window
    length ``seq_len``, such an input is split back into its sequences. Without it, a 2-D input is
    one sequence.
    """
    if x.dim() < 2:
        raise ValueError(f"an activation needs at least 2 dimensions, got shape {tuple(x.shape)}")
    width = x.shape[-1]
    if x.dim() == 2:
        if seq_len and x.shape[0] % seq_len == 0:
            return x.reshape(-1, seq_len, width)  # (B, T, I)
        return x.unsqueeze(0)  # (1, T, I)
    return x.reshape(-1, x.shape[-2], width)  # (B, T, I)


def _absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``max |x|`` along ``dim`` (kept), in the statistics dtype, without materialising ``|x|``.

    A maximum is exact in any dtype, so a bf16 input is reduced as it is and only the result widened.
    """
    hi = x.amax(dim=dim, keepdim=True)
    lo = x.amin(dim=dim, keepdim=True)
    return _stat_dtype(torch.maximum(hi, lo.neg_()).abs_())


def activation_ranges(x: torch.Tensor) -> ActivationRanges:
    """t and c of ``x (..., T, I)``, computed once so that several quantizers can share them."""
    return ActivationRanges(_absmax(x, -1), _absmax(x, -2))


Activation = torch.Tensor | ActivationRanges
"""An activation ``(..., T, I)`` or its precomputed :class:`ActivationRanges`."""


def _ranges(x: Activation) -> ActivationRanges:
    return x if isinstance(x, ActivationRanges) else activation_ranges(x)


def token_absmax(x: Activation) -> torch.Tensor:
    """t_i: the abs-max of each token (row), shape ``(..., T, 1)``."""
    return _ranges(x).token


def channel_absmax(x: Activation) -> torch.Tensor:
    """c_j: the abs-max of each channel over the T tokens of its own sequence, ``(..., 1, I)``."""
    return _ranges(x).channel


def absmax_scale(amax: torch.Tensor, divisor: float, floor: float) -> torch.Tensor:
    """``max(amax / divisor, floor)``: the absmax scale of every INT quantizer (divisor qmax, floor
    :data:`STEP_FLOOR`) and of FP8 (divisor 448). The one definition; the native statistics divide
    and compare the same float32 numbers in the same order."""
    return torch.clamp_min(amax / divisor, floor)


def per_tensor_step(x: Activation, bits: int) -> torch.Tensor:
    """Δ = max|X| / qmax for each sequence, shape ``(..., 1, 1)``."""
    return absmax_scale(token_absmax(x).amax(dim=-2, keepdim=True), float(qmax_for_bits(bits)), STEP_FLOOR)


def per_token_step(x: Activation, bits: int) -> torch.Tensor:
    """Δ_ij = t_i / qmax, shape ``(..., T, 1)``."""
    return absmax_scale(token_absmax(x), float(qmax_for_bits(bits)), STEP_FLOOR)


def per_channel_activation_step(x: Activation, bits: int) -> torch.Tensor:
    """Δ_ij = c_j / qmax (activation channels, per sequence), shape ``(..., 1, I)``."""
    return absmax_scale(channel_absmax(x), float(qmax_for_bits(bits)), STEP_FLOOR)


def crossquant_step(x: Activation, bits: int, alpha: float) -> torch.Tensor:
    """CrossQuant step Δ̃_ij = t_i^α · c_j^(1-α) / qmax, shape ``(..., T, I)``.

    α = 1 is exactly per-token and α = 0 exactly per-channel: those ends skip ``pow`` so that the
    identity holds to the last bit, not only to rounding error. In between the step is
    :func:`separable_step` of :func:`crossquant_factors`.
    """
    alpha = check_alpha(alpha)
    qmax = qmax_for_bits(bits)
    t, c = _ranges(x)  # (..., T, 1), (..., 1, I)
    if alpha == 1.0:
        scale = t.expand(*t.shape[:-1], c.shape[-1])  # (..., T, I)
    elif alpha == 0.0:
        scale = c.expand(*c.shape[:-2], t.shape[-2], c.shape[-1])  # (..., T, I)
    else:
        return separable_step(*crossquant_factors(x, alpha), qmax)
    return absmax_scale(scale, float(qmax), STEP_FLOOR)


def crossquant_factors(x: Activation, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t^α (..., T, 1), c^(1-α) (..., 1, I))``: the CrossQuant step is their outer product / qmax.

    The powers are taken of the vectors before anything is broadcast, so the (T, I) work of a step
    is one multiply and one divide.
    """
    alpha = check_alpha(alpha)
    t, c = _ranges(x)  # (..., T, 1), (..., 1, I)
    return _pow_rounded(t, alpha), _pow_rounded(c, 1.0 - alpha)


def separable_step(row: torch.Tensor, col: torch.Tensor, qmax: int | torch.Tensor) -> torch.Tensor:
    """Δ_ij = max(row_i · col_j / qmax, STEP_FLOOR), in that order of rounding.

    The one definition of a step that is an outer product: :func:`crossquant_step` and the fused
    kernel counter (:mod:`kernelscope.element`) both evaluate it, so they agree bit for bit.
    """
    return torch.clamp_min(row * col / qmax, STEP_FLOOR)


def _pow_rounded(v: torch.Tensor, exponent: float) -> torch.Tensor:
    """``v ** exponent`` exactly as torch's vectorised kernel computes it, wherever ``v`` sits.

    On CPU ``torch.pow`` runs a SIMD body and a scalar tail that differ by an ulp, so the same token
    would get a different step depending on its position in a batch; padding the vector to a multiple
    of 64 sends every element through the SIMD body. The result equals ``v.pow(exponent)`` for the
    usual shapes (multiples of 16). An ulp matters: a W8A8 CrossQuant perplexity on one window moved
    by about half a percent under 1-ulp changes of the step in our measurements.
    """
    if v.numel() % 64 == 0 and v.is_contiguous():
        return v.pow(exponent)  # already whole SIMD bodies
    flat = v.reshape(-1)  # (n,)
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % 64), value=1.0)  # (n + pad,)
    return padded.pow(exponent)[: flat.numel()].reshape(v.shape)


def smoothing_factors(act_channel_max: torch.Tensor, weight_channel_max: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``s_j = max|X_j|^α / max|W_j|^(1-α)``, floored at 1e-5.

    Xiao et al., "SmoothQuant", arXiv 2211.10438, eq. (4). Activations are divided by ``s`` and
    weight columns multiplied by it, which leaves ``X·Wᵀ`` unchanged before quantization.
    """
    alpha = check_alpha(alpha)
    a = act_channel_max.double().clamp_min(STEP_FLOOR)
    w = weight_channel_max.double().clamp_min(STEP_FLOOR)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp_min(STEP_FLOOR).float()
