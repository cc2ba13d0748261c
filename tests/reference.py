"""Naive reference implementations of DESIGN.md §1, written independently of kernelscope.quant.

They loop over sequences and use the textbook definitions (``round(x / Δ) == 0``), so that the
package's vectorised, shared and streamed computations are checked against the formulas themselves.
"""

from __future__ import annotations

import torch

FLOOR = 1e-5


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def vpow(v: torch.Tensor, e: float) -> torch.Tensor:
    """``v ** e`` as torch's vectorised pow gives it: each value repeated 64 times, so that it never
    falls into the scalar tail whose result can differ by an ulp."""
    return (v.reshape(-1, 1).expand(-1, 64).contiguous() ** e)[:, 0].reshape(v.shape)


def step_for_sequence(x: torch.Tensor, quantizer: str, bits: int, alpha: float | None) -> torch.Tensor:
    """Δ for one sequence ``x (T, I)`` in float32, as a full (T, I) matrix."""
    x = x.float()
    T, I = x.shape
    t = x.abs().max(dim=1).values.reshape(T, 1)
    c = x.abs().max(dim=0).values.reshape(1, I)
    q = qmax(bits)
    if quantizer == "per_token":
        step = (t / q).expand(T, I)
    elif quantizer == "per_channel":
        step = (c / q).expand(T, I)
    elif quantizer == "per_tensor":
        step = (x.abs().max() / q).expand(T, I)
    elif quantizer == "crossquant":
        if alpha == 1.0:
            s = t.expand(T, I)
        elif alpha == 0.0:
            s = c.expand(T, I)
        else:
            s = vpow(t, alpha) * vpow(c, 1 - alpha)
        step = s / q
    else:
        raise ValueError(quantizer)
    return torch.clamp(step, min=FLOOR)


def kernel_count(x: torch.Tensor, quantizer: str, bits: int, alpha: float | None) -> int:
    """Elements of ``x (..., T, I)`` that round to zero, one sequence at a time."""
    seqs = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() > 2 else x[None]
    total = 0
    for seq in seqs:
        step = step_for_sequence(seq, quantizer, bits, alpha)
        total += int((torch.round(seq.float() / step) == 0).sum())
    return total


def c_ge_t_pairs(x: torch.Tensor) -> int:
    """Pairs (i, j) with c_j >= t_i, by brute force, one sequence at a time."""
    seqs = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() > 2 else x[None]
    total = 0
    for seq in seqs:
        a = seq.float().abs()
        t = a.max(dim=1).values
        c = a.max(dim=0).values
        total += int((c[None, :] >= t[:, None]).sum())
    return total


def below_per_token_count(x: torch.Tensor, quantizer: str, bits: int, alpha: float | None) -> int:
    """Positions of ``x (..., T, I)`` whose step is smaller than the per-token step, one sequence at a
    time."""
    seqs = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() > 2 else x[None]
    total = 0
    for seq in seqs:
        step = step_for_sequence(seq, quantizer, bits, alpha)
        total += int((step < step_for_sequence(seq, "per_token", bits, None)).sum())
    return total


def int_fake_quantize(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round(x / Δ), -qmax, qmax) · Δ`` in float32, returned in ``x``'s dtype: the textbook INT
    quantizer (``torch.round`` rounds half to even)."""
    q = qmax(bits)
    return (torch.clamp(torch.round(x.float() / step), -q, q) * step).to(x.dtype)


def int_weight_step(w: torch.Tensor, bits: int, group: int | None = None) -> torch.Tensor:
    """The step of an INT weight ``(O, I)``: per output row, or per ``group`` consecutive inputs (the
    last group possibly shorter), expanded to ``(O, I)``, by a loop over rows and groups."""
    w = w.float()
    out = torch.empty_like(w)
    size = w.shape[1] if group is None else group
    for o in range(w.shape[0]):
        for start in range(0, w.shape[1], size):
            block = w[o, start : start + size]
            step = block.abs().max() / qmax(bits)  # float32 division, as the quantizer's own
            out[o, start : start + size] = torch.clamp(step, min=FLOOR)
    return out


def step_for_sequence_batch(x: torch.Tensor, quantizer: str, bits: int, alpha: float | None) -> torch.Tensor:
    """:func:`step_for_sequence` of every sequence of ``x (B, T, I)``, stacked: ``(B, T, I)``."""
    return torch.stack([step_for_sequence(seq, quantizer, bits, alpha) for seq in x])
