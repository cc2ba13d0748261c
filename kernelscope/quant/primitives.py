"""Symmetric absmax quantization primitives (DESIGN.md §1).

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
per-channel (weight)        max_j |W_oj| / qmax             (O, 1)
group-wise g (weight)       max over the g inputs / qmax    (O, I)
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


def abs_in_stat_dtype(x: torch.Tensor) -> torch.Tensor:
    """A new tensor ``|x|`` in the statistics dtype (one pass for float32, two for half types)."""
    return x.abs() if x.dtype in (torch.float32, torch.float64) else x.float().abs_()


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


def _floored(step: torch.Tensor) -> torch.Tensor:
    return step.clamp_min(STEP_FLOOR)


def per_tensor_step(x: Activation, bits: int) -> torch.Tensor:
    """Δ = max|X| / qmax for each sequence, shape ``(..., 1, 1)``."""
    qmax = qmax_for_bits(bits)
    return _floored(token_absmax(x).amax(dim=-2, keepdim=True) / qmax)


def per_token_step(x: Activation, bits: int) -> torch.Tensor:
    """Δ_ij = t_i / qmax, shape ``(..., T, 1)``."""
    qmax = qmax_for_bits(bits)
    return _floored(token_absmax(x) / qmax)


def per_channel_activation_step(x: Activation, bits: int) -> torch.Tensor:
    """Δ_ij = c_j / qmax (activation channels, per sequence), shape ``(..., 1, I)``."""
    qmax = qmax_for_bits(bits)
    return _floored(channel_absmax(x) / qmax)


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
    return _floored(scale / qmax)


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
    kernel counter (:mod:`kernelscope.stats.elementwise`) both evaluate it, so they agree bit for bit.
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


def per_channel_weight_step(w: torch.Tensor, bits: int) -> torch.Tensor:
    """One step per output row of ``w (O, I)``: ``max_j |W_oj| / qmax``, shape ``(O, 1)``."""
    return _floored(_stat_dtype(w).abs().amax(dim=-1, keepdim=True) / qmax_for_bits(bits))


def groupwise_weight_step(w: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """One step per ``group_size`` consecutive input channels of each row, expanded to ``(O, I)``.

    A last group shorter than ``group_size`` (I not a multiple of g) gets its own step.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    qmax = qmax_for_bits(bits)
    w = _stat_dtype(w)
    out_features, in_features = w.shape
    groups = -(-in_features // group_size)
    padded = torch.nn.functional.pad(w.abs(), (0, groups * group_size - in_features))  # (O, G*g)
    group_max = padded.view(out_features, groups, group_size).amax(dim=-1)  # (O, G)
    step = group_max.repeat_interleave(group_size, dim=-1)[:, :in_features]  # (O, I)
    return _floored(step / qmax)


def quantize(x: torch.Tensor, step: torch.Tensor, qmax: int) -> torch.Tensor:
    """q = clamp(round(x / Δ), -qmax, qmax), integer-valued, in the statistics dtype.

    ``torch.round`` rounds half to even, so ``|x / Δ| = 0.5`` gives 0: that element is in the kernel.
    The rounding and clamping work in place on the fresh quotient, never on ``x``.
    """
    q = torch.div(_stat_dtype(x), step)
    return q.round_().clamp_(-qmax, qmax)


def dequantize(q: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """x̂ = q · Δ."""
    return q * step


def fake_quantize(x: torch.Tensor, step: torch.Tensor, qmax: int) -> torch.Tensor:
    """Quantize then dequantize ``x`` with ``step``; returns a new tensor in ``x``'s dtype."""
    return quantize(x, step, qmax).mul_(step).to(x.dtype)


def kernel_mask(
    x: torch.Tensor, step: torch.Tensor, *, is_abs: bool = False, scale: float = 1.0
) -> torch.Tensor:
    """The quantization kernel: True exactly where ``round(x / Δ) == 0``.

    Written as ``|x| / Δ <= 0.5``, which is the same set bit for bit: IEEE division is symmetric in
    sign, and half-to-even rounding sends ±0.5 to zero and anything larger in magnitude away from it.
    NaN is never in the kernel. ``is_abs=True`` says ``x`` already holds ``|x|`` (saves one pass).
    ``scale`` = λ widens the zero bound to λ·B (``|x| / Δ <= 0.5·λ``): the one-parameter family the
    threshold search walks along; λ = 1 is the quantizer's own kernel, λ = 0 only the exact zeros.
    """
    ratio = torch.div(_stat_dtype(x), step) if is_abs else abs_in_stat_dtype(x).div_(step)
    return torch.le(ratio, 0.5 * scale)


def remove_kernel(x: torch.Tensor, step: torch.Tensor, *, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` with exactly its kernel set to zero and every other element left in full precision.

    Returns the new tensor (``x``'s dtype; ``x`` is not changed) and the number of kernel elements.
    This isolates the loss caused by the kernel alone (CrossQuant paper, §3).
    """
    mask = kernel_mask(x, step, scale=scale)
    return torch.where(mask, 0.0, x), torch.count_nonzero(mask)


def fake_quantize_counted(x: torch.Tensor, step: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fake_quantize` that also returns how many elements quantized to zero (the kernel)."""
    q = quantize(x, step, qmax)
    zeros = q.numel() - torch.count_nonzero(q)
    return q.mul_(step).to(x.dtype), zeros


def fake_quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Weight ``(O, I)`` quantized per output channel, or per ``group_size`` inputs, and dequantized."""
    step = per_channel_weight_step(w, bits) if group_size is None else groupwise_weight_step(w, bits, group_size)
    return fake_quantize(w, step, qmax_for_bits(bits))


def smoothing_factors(act_channel_max: torch.Tensor, weight_channel_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``s_j = max|X_j|^α / max|W_j|^(1-α)``, floored at 1e-5.

    Xiao et al., "SmoothQuant", arXiv 2211.10438, eq. (4). Activations are divided by ``s`` and
    weight columns multiplied by it, which leaves ``X·Wᵀ`` unchanged before quantization.
    """
    alpha = check_alpha(alpha)
    a = act_channel_max.double().clamp_min(STEP_FLOOR)
    w = weight_channel_max.double().clamp_min(STEP_FLOOR)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp_min(STEP_FLOOR).float()


def zero_bound(step: torch.Tensor) -> torch.Tensor:
    """B = 0.5 · Δ: elements with ``|x| <= B`` are rounded to zero (half to even at equality)."""
    return 0.5 * step
